//! `agent-guard run`: tag this process, close the escape doors, exec CMD.
//!
//! The launcher registers *itself* (the daemon reads its pid from
//! SO_PEERCRED, so no pid can be forged) and then execs the command in
//! place: not one instruction of CMD runs untagged, and stdin/stdout/stderr,
//! signals and the exit status are CMD's own because there is no supervisor
//! process in between for an agent to attack.

use std::{os::unix::process::CommandExt, path::PathBuf, process::ExitCode};

use super::SocketArg;
use crate::{
    control::{Registration, Request, client},
    identity::harden,
};

/// Exit status when agent-guard could not start CMD (as `env`/`docker` use).
const EXIT_LAUNCH_FAILED: u8 = 125;
const EXIT_NOT_EXECUTABLE: u8 = 126;
const EXIT_NOT_FOUND: u8 = 127;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  agent-guard run --tenant acme --agent researcher -- python3 agent.py\n  agent-guard run --tenant acme --agent researcher -- curl -sS http://127.0.0.1:18081/\n\nExit status: CMD's own; 125 when agent-guard could not start it (daemon unreachable, unknown\ntenant/agent, refused), 126 when CMD is not executable, 127 when it is not found."
)]
pub struct Args {
    /// Tenant the agent belongs to.
    #[arg(long)]
    tenant: String,
    /// Agent name (as in the policy's [[agent]] table).
    #[arg(long)]
    agent: String,
    #[command(flatten)]
    socket: SocketArg,
    /// Signed identity token (not supported yet).
    #[arg(long, value_name = "FILE")]
    token: Option<PathBuf>,
    /// The command to start, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    if args.token.is_some() {
        eprintln!(
            "agent-guard run: --token is not supported yet; identity comes from the launcher"
        );
        return Ok(ExitCode::from(EXIT_LAUNCH_FAILED));
    }
    let request = Request::Register {
        tenant: args.tenant.clone(),
        agent: args.agent.clone(),
    };
    let registration: Registration =
        match client::call(&args.socket.socket, &request).and_then(|v| {
            serde_json::from_value(v)
                .map_err(|e| client::ClientError::Refused(format!("bad reply: {e}")))
        }) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("agent-guard run: {e}");
                eprintln!("agent-guard run: nothing was started");
                return Ok(ExitCode::from(EXIT_LAUNCH_FAILED));
            }
        };
    // From here on this process is tagged: whatever fails, it stays fenced.
    if let Err(e) = harden::apply(registration.hardening) {
        eprintln!("agent-guard run: hardening the agent process failed: {e}");
        eprintln!("agent-guard run: nothing was started");
        return Ok(ExitCode::from(EXIT_LAUNCH_FAILED));
    }
    let (program, rest) = match args.command.split_first() {
        Some(split) => split,
        None => return Ok(ExitCode::from(EXIT_LAUNCH_FAILED)),
    };
    let err = std::process::Command::new(program).args(rest).exec();
    eprintln!("agent-guard run: cannot execute {program}: {err}");
    Ok(ExitCode::from(
        if err.kind() == std::io::ErrorKind::NotFound {
            EXIT_NOT_FOUND
        } else {
            EXIT_NOT_EXECUTABLE
        },
    ))
}
