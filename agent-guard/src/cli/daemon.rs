use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;

use crate::{control::DEFAULT_SOCKET, daemon};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  agent-guard daemon\n  agent-guard daemon --policy /etc/agent-guard/policy.toml --metrics-addr 0.0.0.0:9753\n  agent-guard daemon --socket /tmp/ag/sock --pin-dir /tmp/ag/bpf --audit-dir /tmp/ag/audit \\\n      --cgroup-root /sys/fs/cgroup/unified/ag-test --metrics-addr 127.0.0.1:0"
)]
pub struct Args {
    /// Policy file (TOML). Default: /etc/agent-guard/policy.toml if it exists,
    /// else the embedded default policy (monitor mode).
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Control socket path (absolute).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// bpffs directory for this daemon's pins (mounted if needed; absolute).
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/agent-guard")]
    pin_dir: PathBuf,
    /// Audit trail directory; one subdirectory per tenant (absolute).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/agent-guard/audit")]
    audit_dir: PathBuf,
    /// Address of the Prometheus /metrics endpoint (port 0 picks a free one;
    /// `status` shows it).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9753")]
    metrics_addr: SocketAddr,
    /// Directory inside the cgroup2 hierarchy for agent cgroups (created if
    /// missing). Default: <cgroup2 mount>/agent-guard.
    #[arg(long, value_name = "DIR")]
    cgroup_root: Option<PathBuf>,
    /// Size of the kernel's event ring buffer in bytes (power of two, at
    /// least 4096). Larger rides out longer bursts before events are lost.
    #[arg(long, value_name = "BYTES", default_value_t = agent_guard_common::capacity::EVENTS_BYTES)]
    ring_bytes: u32,
    /// Log format: `text` (default) or `json` for log shippers.
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    init_logging(&args.log_format);
    let opts = daemon::Options {
        policy: args.policy,
        socket: args.socket,
        pin_dir: args.pin_dir,
        audit_dir: args.audit_dir,
        metrics_addr: args.metrics_addr,
        cgroup_root: args.cgroup_root,
        ring_bytes: args.ring_bytes,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(daemon::run(opts))?;
    Ok(ExitCode::SUCCESS)
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
