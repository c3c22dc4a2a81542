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
