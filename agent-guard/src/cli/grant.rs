//! `grant`, `revoke`, `suspend`, `resume`: the capability lifecycle.

use std::{process::ExitCode, time::Duration};

use super::SocketArg;
use crate::control::{Request, client};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  agent-guard grant --tenant acme --agent researcher --tool payments --ttl 5m
  agent-guard grant --tenant acme --agent researcher --tool payments --ttl 30s --uses 1
  agent-guard grant --tenant acme --agent researcher --tool payments --ttl 5m --pid 4242

Prints the grant id. Expiry and use counts are enforced by the kernel at call time,
so a grant ends on time even while the daemon is busy or stopped with SIGSTOP.")]
pub struct GrantArgs {
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    agent: String,
    /// A tool of the policy.
    #[arg(long)]
    tool: String,
    /// How long the grant lives (e.g. 30s, 5m, 2h).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// How many calls it allows (default: unlimited until it expires).
    #[arg(long, value_name = "N")]
    uses: Option<u32>,
    /// Only for this process (and what it starts from now on).
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  agent-guard revoke --grant 7\n\nThe kernel refuses the grant's endpoints before this command returns."
)]
pub struct RevokeArgs {
    /// Grant id, as printed by `grant` and listed by `status`.
    #[arg(long, value_name = "ID")]
    grant: u32,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  agent-guard suspend --tenant acme\n  agent-guard suspend --tenant acme --agent researcher\n  agent-guard resume --tenant acme"
)]
pub struct SuspendArgs {
    #[arg(long)]
    tenant: String,
    /// Only this agent (default: the whole tenant).
    #[arg(long)]
    agent: Option<String>,
    #[command(flatten)]
    socket: SocketArg,
}

pub fn grant(a: GrantArgs) -> anyhow::Result<ExitCode> {
    let req = Request::Grant {
        tenant: a.tenant,
        agent: a.agent,
        tool: a.tool,
        ttl_ms: u64::try_from(a.ttl.as_millis()).unwrap_or(u64::MAX),
        uses: a.uses,
        pid: a.pid,
    };
    let g = client::call(&a.socket.socket, &req)?;
    println!("{}", g["id"]);
    Ok(ExitCode::SUCCESS)
}

pub fn revoke(a: RevokeArgs) -> anyhow::Result<ExitCode> {
    client::call(&a.socket.socket, &Request::Revoke { grant: a.grant })?;
    println!("grant {} revoked", a.grant);
    Ok(ExitCode::SUCCESS)
}

pub fn suspend(a: SuspendArgs, suspend: bool) -> anyhow::Result<ExitCode> {
    let who = a
        .agent
        .as_ref()
        .map_or(a.tenant.clone(), |ag| format!("{}/{ag}", a.tenant));
    let req = if suspend {
        Request::Suspend {
            tenant: a.tenant,
            agent: a.agent,
        }
    } else {
        Request::Resume {
            tenant: a.tenant,
            agent: a.agent,
        }
    };
    let r = client::call(&a.socket.socket, &req)?;
    println!(
        "{who} {} ({} subjects)",
        if suspend { "suspended" } else { "resumed" },
        r["subjects"]
    );
    Ok(ExitCode::SUCCESS)
}
