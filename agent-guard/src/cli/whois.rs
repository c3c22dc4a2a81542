//! `agent-guard whois`: for a tool server, who is on the other end of a
//! connection it accepted.

use std::process::ExitCode;

use super::SocketArg;
use crate::control::{Request, client};

/// Exit status when the peer is not a tagged agent (untagged or unknown).
const EXIT_NOT_TAGGED: u8 = 3;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  # in a tool server that accepted a connection from 127.0.0.1:51234 on 127.0.0.1:8443
  agent-guard whois --peer 127.0.0.1:51234 --local 127.0.0.1:8443
  agent-guard whois --peer [::1]:51234 --local [::1]:8443 --json

The answer comes from the kernel: the connect program recorded the socket's
cookie, and the daemon finds the peer's socket by its 4-tuple (sock_diag).
TCP only. Root, or a member of the daemon's --control-group, may ask.

Exit status: 0 the peer is a tagged agent; 3 it is not (untagged process,
no such connection, or another network namespace); 1 error.")]
pub struct Args {
    /// The connection's remote end, as the tool server sees it (IP:PORT).
    #[arg(long, value_name = "IP:PORT")]
    peer: String,
    /// The connection's local end on the tool server (IP:PORT).
    #[arg(long, value_name = "IP:PORT")]
    local: String,
    /// Print the daemon's JSON answer.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArg,
}

pub fn main(a: Args) -> anyhow::Result<ExitCode> {
    let r = client::call(
        &a.socket.socket,
        &Request::Whois {
            peer: a.peer,
            local: a.local,
        },
    )?;
    let tagged = r["tagged"].as_bool() == Some(true);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else if tagged && r["subject"].is_string() {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
        println!("tenant:        {}", s("tenant"));
        println!("agent:         {}", s("agent"));
        println!("subject:       {}", s("subject"));
        println!("task:          {} ({})", s("task"), s("task_id"));
        println!("pid:           {} ({})", r["pid"], s("exe"));
        println!("on behalf of:  {}", s("on_behalf_of"));
        println!("connected as:  tool {} grant {}", s("tool"), r["grant"]);
        println!("grants now:    {}", r["grants_in_force"]);
    } else {
        println!(
            "{}: {}",
            if tagged {
                "tagged"
            } else {
                "not a tagged agent"
            },
            r["why"].as_str().unwrap_or("")
        );
    }
    Ok(if tagged {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_TAGGED)
    })
}
