//! `agent-guard generate` (hidden): man pages and shell completions made
//! from this very command line definition, so they can never drift from
//! `--help`. `cargo xtask package` calls it to fill the .deb. Also the
//! AgentGuardPolicy CRD, from the policy file's own types.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// The name the binary is installed and invoked under.
const BIN: &str = "agent-guard";

#[derive(clap::Subcommand)]
pub enum Command {
    /// Write man pages into DIR: agent-guard.1 and one page per
    /// subcommand (agent-guard-daemon.1, agent-guard-policy-check.1, ...).
    #[command(after_help = "Examples:\n  agent-guard generate man target/release/package/man")]
    Man {
        /// Output directory (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Write the completion script for SHELL into DIR (bash: agent-guard.bash,
    /// zsh: _agent-guard, fish: agent-guard.fish).
    #[command(
        after_help = "Examples:\n  agent-guard generate completions bash target/release/package/completions\n  agent-guard generate completions zsh ~/.zfunc"
    )]
    Completions {
        #[arg(value_name = "SHELL")]
        shell: Shell,
        /// Output directory (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Write the AgentGuardPolicy CustomResourceDefinition (YAML), whose
    /// spec is the policy file's schema, to stdout or FILE.
    #[command(
        after_help = "Examples:\n  agent-guard generate crd --out deploy/kubernetes/crd/agentguardpolicy.yaml\n  agent-guard generate crd | kubectl apply -f -"
    )]
    Crd {
        /// Write here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

pub fn main(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Man { dir } => {
            create(&dir)?;
            for page in man_pages(&dir)? {
                println!("{}", page.display());
            }
        }
        Command::Completions { shell, dir } => {
            create(&dir)?;
            let path = clap_complete::generate_to(shell, &mut Cli::command(), BIN, &dir)
                .with_context(|| format!("writing {shell} completions into {}", dir.display()))?;
            println!("{}", path.display());
        }
        Command::Crd { out } => {
            let text = crate::policy::crd::crd_yaml()?;
            match out {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{text}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn create(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// One page per visible command, subcommands named `agent-guard-<sub>`
/// (clap's display name); hidden commands and clap's `help` are left out.
/// Returns the files written.
pub fn man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(cmd: &clap::Command, dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        let page = clap_mangen::Man::new(cmd.clone())
            .manual("agent-guard manual")
            .source(concat!("agent-guard ", env!("CARGO_PKG_VERSION")))
            .generate_to(dir)
            .with_context(|| format!("writing the man page of {}", cmd.get_name()))?;
        out.push(page);
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            walk(sub, dir, out)?;
        }
        Ok(())
    }
    // The pages name the version only; the commit and eBPF digest of
    // `--version` belong to one build, not to its documentation.
    let mut cmd = Cli::command()
        .long_version(None::<&str>)
        .disable_help_subcommand(true);
    // Building sets each subcommand's display name (`agent-guard-daemon`).
    cmd.build();
    let mut pages = Vec::new();
    walk(&cmd, dir, &mut pages)?;
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_cover_every_visible_subcommand_and_no_hidden_one() {
        let dir = tempfile::tempdir().unwrap();
        let pages = man_pages(dir.path()).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "agent-guard.1",
            "agent-guard-daemon.1",
            "agent-guard-run.1",
            "agent-guard-policy-check.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("generate") || n.contains("help")),
            "{names:?}"
        );
        let top = std::fs::read_to_string(dir.path().join("agent-guard.1")).unwrap();
        assert!(
            top.starts_with(".ie") || top.contains(".TH"),
            "not roff: {top:.200}"
        );
        assert!(top.contains("daemon"), "subcommands not listed");
    }

    #[test]
    fn completions_for_bash_zsh_fish() {
        let dir = tempfile::tempdir().unwrap();
        for (shell, file) in [
            (Shell::Bash, "agent-guard.bash"),
            (Shell::Zsh, "_agent-guard"),
            (Shell::Fish, "agent-guard.fish"),
        ] {
            main(Command::Completions {
                shell,
                dir: dir.path().to_path_buf(),
            })
            .unwrap();
            let text = std::fs::read_to_string(dir.path().join(file)).unwrap();
            assert!(
                text.contains("daemon"),
                "{file} does not complete subcommands"
            );
        }
    }
}
