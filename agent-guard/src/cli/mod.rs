//! Command line: one module per subcommand.

mod approvals;
mod audit;
mod daemon;
mod doctor;
mod generate;
mod grant;
mod policy;
mod run;
mod status;
mod token;
mod whois;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::control::DEFAULT_SOCKET;

/// Exit status for errors of agent-guard itself.
pub const EXIT_FAILURE: u8 = 1;

/// `--version`: which source (git commit, `unknown` outside a git tree)
/// and which eBPF object (its SHA-256, `none` when built without one) this
/// binary was built from; set by build.rs. `-V` prints the version alone.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ngit commit: ",
    env!("AGENT_GUARD_GIT_SHA"),
    "\neBPF object sha256: ",
    env!("AGENT_GUARD_EBPF_SHA256"),
);

#[derive(Parser)]
#[command(
    name = "agent-guard",
    version,
    long_version = LONG_VERSION,
    about = "Kernel-enforced egress fence and audit trail for AI agent processes",
    long_about = "agent-guard tags agent processes with a workload identity (tenant, agent) and lets the \
kernel refuse every connect()/sendto() that the agent's capability set does not cover. \
Every call becomes one record in a per-tenant, hash-chained audit trail.",
    after_help = "Examples:\n  agent-guard daemon --policy /etc/agent-guard/policy.toml\n  agent-guard run --tenant acme --agent researcher -- python3 agent.py\n  agent-guard status\n  agent-guard policy check policy.toml"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the daemon's many flags make that variant big,
// which costs nothing here.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the daemon: load and attach the eBPF programs, serve the control
    /// socket, write the audit trail and metrics.
    Daemon(daemon::Args),
    /// Start a command as a tagged agent process (tenant, agent).
    Run(run::Args),
    /// Give an agent a tool for a while (just-in-time grant).
    Grant(grant::GrantArgs),
    /// End a grant now.
    Revoke(grant::RevokeArgs),
    /// Deny everything to a tenant or an agent until resumed.
    Suspend(grant::SuspendArgs),
    /// Lift a suspension.
    Resume(grant::SuspendArgs),
    /// Show what the running daemon enforces.
    Status(status::Args),
    /// Check what this node offers and what agent-guard needs.
    Doctor(doctor::Args),
    /// Check or apply a policy file.
    #[command(subcommand)]
    Policy(policy::Command),
    /// Verify or replay the audit trail.
    #[command(subcommand)]
    Audit(audit::Command),
    /// Two-person approval requests.
    #[command(subcommand)]
    Approvals(approvals::Command),
    /// Approve a two-person approval request (two distinct approvers grant it).
    Approve(approvals::DecideArgs),
    /// Deny a two-person approval request.
    Deny(approvals::DecideArgs),
    /// For a tool server: who is on the other end of a connection.
    Whois(whois::Args),
    /// Make signing keys and signed launch tokens (`run --token`).
    #[command(subcommand)]
    Token(token::Command),
    /// Write man pages or shell completions generated from this CLI
    /// (used by packaging).
    #[command(subcommand, hide = true)]
    Generate(generate::Command),
}

/// `--socket`, shared by the client subcommands.
#[derive(clap::Args, Clone)]
pub struct SocketArg {
    /// Control socket of the daemon.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET, env = "AGENT_GUARD_SOCKET")]
    pub socket: PathBuf,
}

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Daemon(args) => daemon::main(args),
        Command::Run(args) => run::main(args),
        Command::Status(args) => status::main(args),
        Command::Policy(cmd) => policy::main(cmd),
        Command::Audit(cmd) => audit::main(cmd),
        Command::Token(cmd) => token::main(cmd),
        Command::Whois(args) => whois::main(args),
        Command::Approvals(cmd) => approvals::main(cmd),
        Command::Approve(args) => approvals::approve(args),
        Command::Deny(args) => approvals::deny(args),
        Command::Doctor(args) => doctor::main(args),
        Command::Grant(args) => grant::grant(args),
        Command::Revoke(args) => grant::revoke(args),
        Command::Suspend(args) => grant::suspend(args, true),
        Command::Resume(args) => grant::suspend(args, false),
        Command::Generate(cmd) => generate::main(cmd),
    }
}

/// An error and its causes on one line, leaving out causes whose text the
/// message already includes (typed errors here print their source).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}
