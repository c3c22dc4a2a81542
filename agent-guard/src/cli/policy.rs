use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;

use super::SocketArg;
use crate::{
    control::{Request, client},
    policy::Policy,
};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Validate a policy file without applying it; exits 0 when it is valid.
    #[command(after_help = "Example:\n  agent-guard policy check /etc/agent-guard/policy.toml")]
    Check {
        /// Policy file (TOML).
        file: PathBuf,
    },
    /// Validate a policy file and make the running daemon enforce it; on any
    /// error the daemon keeps its current policy.
    #[command(after_help = "Example:\n  agent-guard policy apply /etc/agent-guard/policy.toml")]
    Apply {
        /// Policy file (TOML).
        file: PathBuf,
        #[command(flatten)]
        socket: SocketArg,
    },
}

pub fn main(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Check { file } => {
            let policy = Policy::from_file(&file)?;
            let compiled = policy.compile()?;
            println!(
                "{}: ok ({} tenants, {} tools, {} agents, {} kernel rules)",
                file.display(),
                compiled.tenants.len(),
                compiled.tools.len(),
                compiled.agents.len(),
                compiled.rules.len()
            );
            for w in unix_warnings(&compiled) {
                eprintln!("warning: {w}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply { file, socket } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // The daemon validates (same FILE:LINE:COL errors), so every
            // refused apply is counted and audited where it is enforced.
            let origin = std::fs::canonicalize(&file)
                .unwrap_or(file.clone())
                .display()
                .to_string();
            let reply = client::call(&socket.socket, &Request::PolicyApply { text, origin })?;
            println!(
                "{}: applied as generation {}",
                file.display(),
                reply["generation"]
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Checks the `unix` endpoints against this node: the kernel judges the
/// path an agent passes before the kernel looks it up, so whoever can
/// replace a listed socket's file (a directory writable by others, without
/// the sticky bit) can point a listed path at another socket.
fn unix_warnings(compiled: &crate::policy::CompiledPolicy) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    for (tool, paths) in compiled.tools.iter().zip(&compiled.tool_unix) {
        for key in paths {
            let shown = crate::policy::unix_display(key);
            if shown.starts_with('@') {
                continue;
            }
            let path = std::path::Path::new(&shown);
            if !path.exists() {
                out.push(format!(
                    "tool {tool:?}: {shown} does not exist on this node"
                ));
            }
            for dir in path.ancestors().skip(1) {
                let Ok(meta) = std::fs::metadata(dir) else {
                    continue;
                };
                let mode = meta.permissions().mode();
                if mode & 0o002 != 0 && mode & 0o1000 == 0 {
                    out.push(format!(
                        "tool {tool:?}: {} is writable by everyone (mode {:o}): anyone there can replace {shown} with a link to another socket",
                        dir.display(),
                        mode & 0o7777
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn unix_endpoints_in_world_writable_directories_are_warned_about() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let sticky = dir.path().join("sticky");
        std::fs::create_dir(&sticky).expect("mkdir");
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let text = format!(
            "[[tenant]]\nname = \"acme\"\n[[tool]]\nname = \"p\"\nendpoints = [{{ unix = \"{}/a.sock\" }}, {{ unix = \"{}/b.sock\" }}, {{ unix = \"@abs\" }}]\n",
            open.display(),
            sticky.display()
        );
        let compiled = crate::policy::Policy::from_str(&text, "p.toml")
            .expect("policy")
            .compile()
            .expect("compile");
        let w = super::unix_warnings(&compiled);
        let writable: Vec<&String> = w.iter().filter(|l| l.contains("writable")).collect();
        assert_eq!(writable.len(), 1, "{w:?}");
        assert!(writable[0].contains(open.to_str().expect("utf-8")), "{w:?}");
        assert_eq!(
            w.iter().filter(|l| l.contains("does not exist")).count(),
            2,
            "{w:?}"
        );
    }
}
