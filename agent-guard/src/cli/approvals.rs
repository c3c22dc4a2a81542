//! `approvals list`, `approve`, `deny`: two-person approval of tools with
//! `approval = "two-person"`.

use std::process::ExitCode;

use super::SocketArg;
use crate::control::{Request, client};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Requests waiting for a decision (root and approvers).
    #[command(
        after_help = "Example:\n  agent-guard approvals list\n  agent-guard approvals list --json"
    )]
    List {
        /// The daemon's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(clap::Args)]
#[command(after_help = "Examples:
  agent-guard approvals list
  agent-guard approve 3      # as one approver (a uid listed in the policy's [[approver]] tables)
  agent-guard approve 3      # as a second, different approver: the grant is made

The requesting agent then reaches the tool for the tool's approval_ttl (default 10m),
enforced by the kernel like any grant. Approvers that are not root must be in the
daemon's --control-group to reach its socket.")]
pub struct DecideArgs {
    /// Request id, as `approvals list` shows it.
    #[arg(value_name = "ID")]
    id: u32,
    #[command(flatten)]
    socket: SocketArg,
}

pub fn main(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::List { json, socket } => {
            let r = client::call(&socket.socket, &Request::ApprovalsList)?;
            let list = r["approvals"].as_array().cloned().unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&r["approvals"])?);
                return Ok(ExitCode::SUCCESS);
            }
            if list.is_empty() {
                println!("no pending approval requests");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<4} {:<28} {:<12} {:<22} {:>6} {:>5} {:>9}  ON BEHALF OF",
                "ID", "SUBJECT", "TOOL", "ENDPOINT", "PID", "OK", "EXPIRES"
            );
            for a in list {
                println!(
                    "{:<4} {:<28} {:<12} {:<22} {:>6} {:>3}/2 {:>8.0}s  {}",
                    a["id"],
                    a["subject"].as_str().unwrap_or("?"),
                    a["tool"].as_str().unwrap_or("?"),
                    a["endpoint"].as_str().unwrap_or("?"),
                    a["pid"],
                    a["approvals"].as_array().map_or(0, Vec::len),
                    a["expires_in_seconds"].as_f64().unwrap_or(0.0),
                    a["on_behalf_of"].as_str().unwrap_or("-"),
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn approve(a: DecideArgs) -> anyhow::Result<ExitCode> {
    let r = client::call(&a.socket.socket, &Request::Approve { id: a.id })?;
    match r.get("grant") {
        Some(g) => println!(
            "request {} approved by two approvers: grant {g} for {}s",
            a.id, r["expires_in_seconds"]
        ),
        None => println!(
            "request {} approved ({} of {}); it needs another approver",
            a.id, r["approvals"], r["needed"]
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn deny(a: DecideArgs) -> anyhow::Result<ExitCode> {
    client::call(&a.socket.socket, &Request::Deny { id: a.id })?;
    println!("request {} denied", a.id);
    Ok(ExitCode::SUCCESS)
}
