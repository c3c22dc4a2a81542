use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;

use crate::{control::DEFAULT_SOCKET, daemon};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  agent-guard daemon\n  agent-guard daemon --policy /etc/agent-guard/policy.toml --metrics-addr 0.0.0.0:9753\n  agent-guard daemon --socket /tmp/ag/sock --pin-dir /tmp/ag/bpf --audit-dir /tmp/ag/audit \\\n      --cgroup-root /sys/fs/cgroup/unified/ag-test --metrics-addr 127.0.0.1:0\n  agent-guard daemon --dns-mode per-agent      # agents resolve only their tools' names, through the daemon\n  agent-guard daemon --export otlp=http://127.0.0.1:4318 --export ocsf-file=/var/log/agent-guard/ocsf.jsonl\n  agent-guard daemon --export syslog            # RFC 5424 to /dev/log; or syslog=udp://127.0.0.1:514, syslog=unix:/PATH"
)]
pub struct Args {
    /// Policy file (TOML). Default: /etc/agent-guard/policy.toml if it exists,
    /// else the embedded default policy (monitor mode).
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Where the policy comes from: `file` (--policy, reloaded when it
    /// changes) or `kubernetes`: the AgentGuardPolicy object named by
    /// --policy-object, applied whenever it changes (builds with the
    /// `kubernetes` feature only). With `kubernetes`, the file policy is
    /// what the daemon starts with until the object is seen, and a deleted
    /// object leaves the policy in force.
    #[arg(long, value_name = "SOURCE", default_value = "file", value_parser = ["file", "kubernetes"])]
    policy_source: String,
    /// The AgentGuardPolicy (cluster-scoped) to follow with
    /// --policy-source kubernetes. Default: `default`.
    #[arg(long, value_name = "NAME")]
    policy_object: Option<String>,
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
    /// DNS server (IP:PORT) for tools' `host` endpoints; default: the
    /// system resolver configuration (/etc/resolv.conf).
    #[arg(long, value_name = "IP:PORT")]
    dns_server: Option<SocketAddr>,
    /// How long an address stays allowed after it left a name's answer
    /// (per-agent mode: after the answer's TTL ran out).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    dns_grace: std::time::Duration,
    /// How `host` endpoints become addresses. `shared`: the daemon resolves
    /// each name and every agent with the tool reaches every address.
    /// `per-agent`: every DNS call of a tagged process (port 53) goes to a
    /// per-agent proxy in the daemon, which answers only names of that
    /// agent's current tools (others: REFUSED) and opens exactly the
    /// addresses it answered, to that agent only, until the answer's TTL
    /// (plus --dns-grace) runs out.
    #[arg(long, value_name = "MODE", default_value = "shared", value_parser = ["shared", "per-agent"])]
    dns_mode: String,
    /// Port the per-agent DNS proxy listens on, at 127.64.0.0/10 + the
    /// subject id (one address per agent, task or sub-agent).
    #[arg(long, value_name = "PORT", default_value_t = 53)]
    dns_proxy_port: u16,
    /// Upstream answers the per-agent DNS proxy caches (TTL-bound; NXDOMAIN
    /// and NODATA per RFC 2308, at most 5 min), shared by all agents: each
    /// query is still judged and opened for the agent that asks. 0 turns
    /// the cache off.
    #[arg(long, value_name = "N", default_value_t = daemon::dns::proxy::DEFAULT_CACHE_ENTRIES)]
    dns_cache_entries: u64,
    /// Fence tagged processes' Unix socket connects and sends
    /// (`cgroup/connect_unix`, kernel 6.7+). `off` leaves them unfenced
    /// (`status` and `doctor` say so), e.g. to rule agent-guard out while
    /// debugging a local service.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    unix_fencing: String,
    /// Directory for the daemon's own state: the audit signing key
    /// (`audit-signing.key`, 0600, generated on first start; absolute).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/agent-guard/state")]
    state_dir: PathBuf,
    /// Rotate a tenant's audit.jsonl to audit-NNNNNN.jsonl before it grows
    /// past this size; the hash chain continues across files.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024 * 1024)]
    audit_max_file_bytes: u64,
    /// Audit files kept per tenant, current one included; older ones are
    /// deleted after a signed anchor records where the chain now starts.
    /// 0 keeps all.
    #[arg(long, value_name = "N", default_value_t = 0)]
    audit_retain_files: usize,
    /// How often audit files are fsynced; a crash loses at most this much.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    audit_fsync_interval: std::time::Duration,
    /// Sign a checkpoint of a tenant's chain after this many records.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    checkpoint_every: u64,
    /// Sign a checkpoint of a chain with new records at least this often
    /// (and always at shutdown).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    checkpoint_interval: std::time::Duration,
    /// Audit records kept in memory per tenant while the disk cannot be
    /// written; beyond that records are counted as lost and a gap record
    /// says how many.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    audit_buffer_records: usize,
    /// Retire task and sub-agent subjects this long after their last
    /// process exited.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    idle_subject_age: std::time::Duration,
    /// Members of this group (name or gid) may use the control socket to
    /// launch agents with a signed token (`run --token`); the socket becomes
    /// root:GROUP 0660. Every other verb stays root's.
    #[arg(long, value_name = "GROUP")]
    control_group: Option<String>,
    /// This node's id: a launch token's `aud` must name it (or be `*`).
    /// Default: the host name.
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Clock difference allowed when checking a launch token's `exp` and
    /// `nbf`.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    token_clock_skew: std::time::Duration,
    /// Two-person approval requests nobody decided end after this.
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = humantime::parse_duration)]
    approval_timeout: std::time::Duration,
    /// POST each new approval request as JSON to this http:// URL (in the
    /// background, with --approval-webhook-timeout; never blocks enforcement).
    #[arg(long, value_name = "URL")]
    approval_webhook: Option<String>,
    /// How long one webhook notice may take.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    approval_webhook_timeout: std::time::Duration,
    /// Count allowed calls of tagged processes per flow in the kernel and
    /// write one audit record per flow and --flow-interval (`calls`,
    /// `first_ts`, `last_ts`) instead of one per call: cheaper per call,
    /// coarser trail. Denied and would-deny calls stay one record each; a
    /// full flow table (--map-capacity FLOWS=N) falls back to per-call
    /// records, counted in agent_guard_flow_fallback_total.
    #[arg(long)]
    flow_records: bool,
    /// How often flows become audit records (--flow-records).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration, requires = "flow_records")]
    flow_interval: std::time::Duration,
    /// Size of a kernel map (repeatable): CGROUPS, SUBJECTS, CAPS, GRANTS,
    /// GRANT_STATE, UNIX_PATHS or FLOWS, e.g. `--map-capacity GRANTS=262144`.
    /// A full map refuses what would need a new entry (fail closed) with an
    /// error naming the map; `agent_guard_map_entries` / `_capacity` show
    /// how full each is.
    #[arg(long, value_name = "MAP=N", value_parser = crate::kernel::parse_map_capacity)]
    map_capacity: Vec<(&'static str, u32)>,
    /// Also send every audit record, once it is in its chain, to KIND
    /// (repeatable): `otlp=http://HOST:4318` (OpenTelemetry logs over
    /// OTLP/HTTP; /v1/logs is added to a URL without a path),
    /// `ocsf-file=/PATH` (OCSF 1.3 JSON lines), `syslog` (RFC 5424 to
    /// /dev/log), `syslog=udp://IP:PORT` or `syslog=unix:/PATH`. At most
    /// once, bounded, never in the way of enforcement: what an exporter
    /// cannot deliver is counted (agent_guard_export_dropped_total) and
    /// noted in the chain as a gap record; the chain stays the source of
    /// truth.
    #[arg(long = "export", value_name = "KIND[=TARGET]", value_parser = crate::export::parse_spec)]
    export: Vec<crate::export::ExportSpec>,
    /// Log format: `text` (default) or `json` for log shippers.
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    tune_malloc();
    init_logging(&args.log_format);
    let control_gid = args
        .control_group
        .as_deref()
        .map(resolve_group)
        .transpose()?;
    let policy_source = daemon::kubernetes::PolicySource::from_args(
        &args.policy_source,
        args.policy_object.as_deref(),
    )?;
    let opts = daemon::Options {
        policy: args.policy,
        policy_source,
        socket: args.socket,
        pin_dir: args.pin_dir,
        audit_dir: args.audit_dir,
        metrics_addr: args.metrics_addr,
        cgroup_root: args.cgroup_root,
        ring_bytes: args.ring_bytes,
        dns_server: args.dns_server,
        dns_grace: args.dns_grace,
        dns_per_agent: args.dns_mode == "per-agent",
        dns_proxy_port: args.dns_proxy_port,
        dns_cache_entries: args.dns_cache_entries,
        unix_fencing: args.unix_fencing == "on",
        idle_subject_age: args.idle_subject_age,
        state_dir: args.state_dir,
        audit_max_file_bytes: args.audit_max_file_bytes,
        audit_retain_files: args.audit_retain_files,
        audit_fsync_interval: args.audit_fsync_interval,
        checkpoint_every: args.checkpoint_every,
        checkpoint_interval: args.checkpoint_interval,
        audit_buffer_records: args.audit_buffer_records,
        control: daemon::launch::ControlConfig {
            node_id: args.node_id.unwrap_or_else(daemon::launch::node_id),
            token_skew: args.token_clock_skew,
            control_gid,
        },
        flow_records: args.flow_records.then_some(args.flow_interval),
        approval_timeout: args.approval_timeout,
        map_capacities: args.map_capacity,
        exports: args.export,
        approval_webhook: args
            .approval_webhook
            .as_deref()
            .map(|u| daemon::webhook::Webhook::parse(u, args.approval_webhook_timeout))
            .transpose()
            .map_err(anyhow::Error::msg)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(daemon::run(opts))?;
    Ok(ExitCode::SUCCESS)
}

/// glibc malloc for a long-running daemon, before any other thread exists:
/// at most two arenas (each tokio and blocking thread would otherwise get
/// one, each keeping its own freed memory), and a fixed mmap threshold, so a
/// large buffer (BTF parsed at load, a burst of records) is unmapped when
/// freed instead of raising the threshold and staying in the heap. Under the
/// soak this took ~5 MiB off the daemon's resident heap (BENCHMARKS.md,
/// Soak). `MALLOC_ARENA_MAX` or malloc tunables in `GLIBC_TUNABLES` in the
/// environment win.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() || tunables.contains("glibc.malloc.") {
            return;
        }
        // SAFETY: mallopt only sets allocator parameters; no other thread
        // allocates yet. A refused setting (0) leaves glibc's default.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
    }
}

/// A group name or numeric gid, checked to exist.
fn resolve_group(name: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => anyhow::bail!(
            "--control-group {name:?}: no such group (create it with `groupadd {name}`, or give a numeric gid)"
        ),
        Err(e) => anyhow::bail!("--control-group {name:?}: looking the group up: {e}"),
    }
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
