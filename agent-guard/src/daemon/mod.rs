//! `agent-guard daemon`: load, attach, serve, write the audit trail, and
//! clean up on SIGTERM/SIGINT.

pub mod adopt;
pub mod approvals;
pub mod dns;
pub mod events;
pub mod flows;
pub mod grants;
pub mod kubernetes;
pub mod launch;
pub mod persist;
pub mod state;
pub mod subjects;
pub mod takeover;
pub mod webhook;
pub mod whois;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};

use crate::{
    audit::{AuditRecord, AuditWriter, NODE_LOG},
    control,
    kernel::{Kernel, fs as kfs},
    metrics::Metrics,
    policy::{DEFAULT_POLICY, DEFAULT_POLICY_ORIGIN, Policy},
};

/// Lets every tagged process reach the control socket (a sub-agent is
/// started through it) under its abstract name only; see
/// [`control::abstract_name`].
fn allow_control_socket(state: &state::State, socket: &std::path::Path) -> anyhow::Result<()> {
    let name = control::abstract_name(socket);
    let key = agent_guard_common::unix::UnixPath::new(&name)
        .context("the control socket's abstract name does not fit sun_path")?;
    state
        .kernel()
        .insert_unix_path(&key, agent_guard_common::unix::CONTROL_PATH_ID)
        .context("registering the control socket with the kernel")
}

/// Default policy path; when absent the embedded default policy is used.
pub const DEFAULT_POLICY_PATH: &str = "/etc/agent-guard/policy.toml";

#[derive(Debug, Clone)]
pub struct Options {
    pub policy: Option<PathBuf>,
    /// `--policy-source`: the file above, or an AgentGuardPolicy object
    /// (then the file is only the policy to start with).
    pub policy_source: kubernetes::PolicySource,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub audit_dir: PathBuf,
    pub metrics_addr: SocketAddr,
    pub cgroup_root: Option<PathBuf>,
    /// Event ring buffer size in bytes.
    pub ring_bytes: u32,
    /// DNS server for tool `host` endpoints; `None` = the system's.
    pub dns_server: Option<SocketAddr>,
    /// How long an address stays allowed after it left a name's answer.
    pub dns_grace: std::time::Duration,
    /// Per-agent DNS: tagged processes' DNS goes through the daemon's proxy.
    pub dns_per_agent: bool,
    pub dns_proxy_port: u16,
    /// Answers the per-agent DNS proxy caches; 0: none.
    pub dns_cache_entries: u64,
    /// Attach the Unix socket hooks (when the kernel has them).
    pub unix_fencing: bool,
    /// Task and sub-agent subjects with no process left are retired after
    /// this.
    pub idle_subject_age: std::time::Duration,
    /// Holds the audit signing key (absolute).
    pub state_dir: PathBuf,
    /// Rotate an audit file before it grows past this many bytes.
    pub audit_max_file_bytes: u64,
    /// Audit files kept per chain (0 keeps all).
    pub audit_retain_files: usize,
    /// How often audit files are fsynced.
    pub audit_fsync_interval: std::time::Duration,
    /// Sign a checkpoint after this many records of a chain...
    pub checkpoint_every: u64,
    /// ...or after this long with new records.
    pub checkpoint_interval: std::time::Duration,
    /// Audit records kept in memory per chain while writing fails.
    pub audit_buffer_records: usize,
    /// Control group, node id and token clock skew.
    pub control: launch::ControlConfig,
    /// Approval requests nobody decided end after this.
    pub approval_timeout: std::time::Duration,
    pub approval_webhook: Option<webhook::Webhook>,
    /// `--flow-records` with its `--flow-interval`; `None`: per call.
    pub flow_records: Option<std::time::Duration>,
    /// `--map-capacity NAME=N`.
    pub map_capacities: Vec<(&'static str, u32)>,
    /// `--export KIND=TARGET`: where audit records go besides the chain.
    pub exports: Vec<crate::export::ExportSpec>,
}

fn require_absolute(flag: &str, p: &std::path::Path) -> anyhow::Result<()> {
    if !p.is_absolute() {
        bail!("{flag} must be an absolute path, got {}", p.display());
    }
    Ok(())
}

/// Reads the policy to start with: `--policy`, else the default path if it
/// exists, else the embedded default policy.
fn initial_policy(opt: Option<&PathBuf>) -> anyhow::Result<(Policy, String, Option<PathBuf>)> {
    let path = match opt {
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from(DEFAULT_POLICY_PATH)).filter(|p| p.exists()),
    };
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("reading policy {}", p.display()))?;
            let policy = Policy::from_str(&text, &p.display().to_string())?;
            Ok((policy, text, Some(p)))
        }
        None => {
            tracing::info!(
                "no policy file at {DEFAULT_POLICY_PATH}; using the embedded default policy (monitor mode)"
            );
            Ok((
                Policy::from_str(DEFAULT_POLICY, DEFAULT_POLICY_ORIGIN)?,
                DEFAULT_POLICY.to_string(),
                None,
            ))
        }
    }
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    for (flag, p) in [
        ("--socket", &opts.socket),
        ("--pin-dir", &opts.pin_dir),
        ("--audit-dir", &opts.audit_dir),
        ("--state-dir", &opts.state_dir),
    ] {
        require_absolute(flag, p)?;
    }
    if let Some(p) = &opts.cgroup_root {
        require_absolute("--cgroup-root", p)?;
    }
    let page = 4096;
    if !opts.ring_bytes.is_power_of_two() || opts.ring_bytes < page {
        bail!(
            "--ring-bytes must be a power of two of at least {page}, got {}",
            opts.ring_bytes
        );
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("agent-guard daemon must run as root (it loads eBPF programs and manages cgroups)");
    }
    // Refuse bad policy before touching the kernel.
    let (policy, policy_text, policy_path) = initial_policy(opts.policy.as_ref())?;
    // One source of truth: with the policy from Kubernetes, the file is
    // neither watched nor re-read on SIGHUP.
    let policy_path = policy_path.filter(|_| opts.policy_source.is_file());

    // The control socket first: if another daemon holds it, stop before
    // creating anything (and never remove its socket).
    let abstract_listener = control::server::bind_abstract(&opts.socket)?;
    let listener = control::server::bind(&opts.socket)?;
    if let Some(gid) = opts.control.control_gid {
        control::server::open_to_group(&opts.socket, gid)?;
    }
    let setup = (|| -> anyhow::Result<_> {
        let cgroup_mount = kfs::cgroup2_mount()?;
        let cgroup_root = opts
            .cgroup_root
            .clone()
            .unwrap_or_else(|| cgroup_mount.join("agent-guard"));
        let created_root = !cgroup_root.exists();
        kfs::ensure_cgroup_dir(&cgroup_mount, &cgroup_root)?;
        let bpffs = kfs::ensure_bpffs(&opts.pin_dir)?;
        Ok((cgroup_mount, cgroup_root, created_root, bpffs))
    })();
    let (cgroup_mount, cgroup_root, created_root, bpffs) = match setup {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&opts.socket);
            return Err(e);
        }
    };

    let mut kept = false;
    let result = serve(
        opts.clone(),
        (policy, policy_text, policy_path),
        cgroup_mount,
        cgroup_root.clone(),
        (listener, abstract_listener),
        &mut kept,
    )
    .await;

    // Clean up what this daemon created, even when serving failed; the
    // pins too, unless tagged processes still run (then they keep the
    // fence up for the next daemon).
    let _ = std::fs::remove_file(&opts.socket);
    if !kept {
        let _ = std::fs::remove_file(crate::kernel::procs_pin(&opts.pin_dir));
        for name in crate::kernel::TAKEOVER_MAPS {
            let _ = std::fs::remove_file(opts.pin_dir.join(name));
        }
        if bpffs.mounted {
            kfs::unmount(&opts.pin_dir);
        }
        if bpffs.mounted || bpffs.created_dir {
            let _ = std::fs::remove_dir(&opts.pin_dir);
        }
    }
    if created_root {
        let _ = std::fs::remove_dir(&cgroup_root);
    }
    result
}

fn audit_config(opts: &Options) -> anyhow::Result<crate::audit::WriterConfig> {
    if opts.audit_max_file_bytes < 4096 {
        bail!("--audit-max-file-bytes must be at least 4096");
    }
    if opts.checkpoint_every == 0 || opts.audit_buffer_records == 0 {
        bail!("--checkpoint-every and --audit-buffer-records must be at least 1");
    }
    let signer = crate::audit::checkpoint::Signer::load_or_create(&opts.state_dir)
        .context("audit signing key")?;
    Ok(crate::audit::WriterConfig {
        max_file_bytes: opts.audit_max_file_bytes,
        retain_files: opts.audit_retain_files,
        fsync_interval: opts.audit_fsync_interval,
        checkpoint_every: opts.checkpoint_every,
        checkpoint_interval: opts.checkpoint_interval,
        buffer_records: opts.audit_buffer_records,
        signer: Some(signer),
    })
}

async fn serve(
    opts: Options,
    (policy, policy_text, policy_path): (Policy, String, Option<PathBuf>),
    cgroup_mount: PathBuf,
    cgroup_root: PathBuf,
    (listener, abstract_listener): (tokio::net::UnixListener, tokio::net::UnixListener),
    kept: &mut bool,
) -> anyhow::Result<()> {
    // Suspensions outlive the daemon: read before touching the kernel and
    // restored before the policy is applied, so no agent of a suspended
    // tenant is ever unsuspended by a restart.
    let suspended = state::State::load_suspended(&opts.state_dir)?;
    // Used launch tokens likewise: a restart must not reopen one.
    let used_jtis = launch::UsedJtis::load(&opts.state_dir)?;
    // What a takeover restores (damaged: refuse to start, naming the file).
    let saved = persist::load(&opts.state_dir)?;
    // A predecessor that died without shutting down left its programs
    // enforcing; hold them until ours are in place (takeover.rs).
    let leftovers =
        takeover::collect(&opts.pin_dir).context("reading a previous instance's pins")?;
    if let Some(l) = &leftovers {
        tracing::warn!(
            links = l.found,
            "a previous agent-guard left its programs attached (killed or crashed?): taking over"
        );
    }
    let (mut kernel, mut maps, ring) = Kernel::load(
        &cgroup_mount,
        &opts.pin_dir,
        opts.ring_bytes,
        opts.unix_fencing,
        &opts.map_capacities,
        opts.dns_per_agent,
    )
    .context("loading the eBPF programs")?;
    tracing::info!(programs = ?kernel.attached, cgroup2 = %cgroup_mount.display(), "programs attached at the cgroup2 root");

    let maps_flow_table = maps.take_flow_table();
    let (audit_tx, audit_rx) = mpsc::unbounded_channel();
    let metrics = Metrics::new().context("creating metrics")?;
    let mut state = state::State::new(
        maps,
        cgroup_mount,
        cgroup_root,
        audit_tx,
        metrics,
        kernel.attached.clone(),
        opts.socket.clone(),
        opts.ring_bytes,
        policy_path,
        crate::kernel::procs_pin(&opts.pin_dir),
    );
    if let Some(interval) = opts.flow_records {
        let table = maps_flow_table.context("--flow-records: the eBPF object has no flow table")?;
        state.flows = Some(
            flows::Flows::start(table, interval, &state.metrics.registry)
                .context("--flow-records")?,
        );
        tracing::info!(
            interval = %humantime::format_duration(interval),
            "flow records: allowed calls are counted per flow in the kernel"
        );
    }
    state.idle_subject_age = opts.idle_subject_age;
    state.program_ids = kernel.program_ids.clone();
    state.dns_grace = opts.dns_grace;
    state.state_dir = opts.state_dir.clone();
    state.control = opts.control.clone();
    state.approval_timeout = opts.approval_timeout;
    state.approval_webhook = opts.approval_webhook.clone();
    state.used_jtis = std::sync::Mutex::new(used_jtis);
    if !suspended.is_empty() {
        tracing::warn!(
            ?suspended,
            "restoring suspensions from {}",
            opts.state_dir.display()
        );
    }
    state.registry().suspended = suspended;
    state.unix_support = kernel.unix.clone();
    // Exporters read what the audit writer wrote (its tap), never the ring.
    let (fanout, exporters) = crate::export::start(&opts.exports, &state.metrics)?;
    state.exports = exporters.stats.clone();
    allow_control_socket(&state, &opts.socket)?;
    let state = Arc::new(state);
    if opts.dns_per_agent {
        dns::agent::start(
            &state,
            opts.dns_server,
            opts.dns_proxy_port,
            opts.dns_cache_entries,
        )
        .context("starting the per-agent DNS proxy")?;
        tracing::info!(
            port = opts.dns_proxy_port,
            "per-agent DNS: tagged processes' DNS goes through the daemon"
        );
    }
    let mut writer = AuditWriter::with_config(&opts.audit_dir, audit_config(&opts)?)?;
    if !opts.exports.is_empty() {
        writer.set_tap(Box::new(fanout));
    }
    // Servers stop first; the pipeline last, so it writes the final records.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (pipeline_stop_tx, pipeline_stop_rx) = watch::channel(false);
    let pipeline =
        events::Pipeline::new(state.clone(), ring, audit_rx, writer).context("ring buffer")?;
    let pipeline = tokio::spawn(pipeline.run(pipeline_stop_rx));

    let mut start = AuditRecord::new("daemon");
    start.detail = Some(format!(
        "started pid {} version {}",
        std::process::id(),
        env!("CARGO_PKG_VERSION")
    ));
    state.audit(NODE_LOG, start);

    let outcome = async {
        state.apply_policy(policy, &policy_text).context("applying the policy")?;
        if let Some(l) = leftovers {
            let r = state.take_over(l, saved.as_ref());
            tracing::warn!(?r, "took over from the previous instance");
            let mut rec = AuditRecord::new("daemon");
            rec.detail = Some(format!(
                "took over from a previous instance that did not shut down: {} links detached; restored {} task/sub-agent subjects, {} grants, {} approval requests ({} saved entries no longer fit the policy); {} processes re-tagged, {} quarantined (moved, unknown or no longer fitting: they reach nothing), {} leftover cgroups quarantined",
                r.links,
                r.restored.subjects,
                r.restored.grants,
                r.restored.approvals,
                r.restored.skipped,
                r.retagged,
                r.quarantined,
                r.cgroups_quarantined
            ));
            state.audit(NODE_LOG, rec);
            let lost: std::collections::BTreeMap<String, u64> = r
                .lost
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| (agent_guard_common::event::kind::name(k as u8).to_string(), *n))
                .collect();
            if !lost.is_empty() {
                // The old instance's tenants are not known by name any more:
                // the gap goes to the node log and every current tenant.
                let mut logs = state.tenants();
                logs.push(NODE_LOG.to_string());
                for log in logs {
                    let mut gap = AuditRecord::new("gap");
                    gap.lost = Some(lost.clone());
                    gap.detail = Some("while no daemon ran: events the previous instance never read, or its kernel ring could not hold".into());
                    state.audit(&log, gap);
                }
            }
        }
        // What is restored (or, on a fresh start, nothing) is the registry
        // on disk from now on.
        state.save_registry();
        // Handle SIGTERM before anyone can see the daemon ready (socket,
        // /readyz, READY=1): a stop right after must still clean up.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let ready = crate::metrics::Readiness::default();
        let (bound, metrics_fut) = crate::metrics::serve(opts.metrics_addr, scrape(&state), ready.clone(), shutdown_rx.clone())
            .await
            .with_context(|| format!("binding metrics address {}", opts.metrics_addr))?;
        *state.metrics_addr.write().unwrap_or_else(|p| p.into_inner()) = Some(bound);
        let metrics_task = tokio::spawn(metrics_fut);
        let control_task = tokio::spawn(control::server::serve(listener, state.clone(), shutdown_rx.clone()));
        let abstract_task = tokio::spawn(control::server::serve(abstract_listener, state.clone(), shutdown_rx.clone()));
        tracing::info!(socket = %opts.socket.display(), metrics = %bound, "agent-guard daemon ready");
        // Programs attached, policy applied, sockets served: /readyz and
        // systemd (Type=notify; a no-op without NOTIFY_SOCKET) hear it now.
        ready.set(true);
        notify_systemd(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("programs attached, policy applied")]);

        let watch_task = tokio::spawn(watch_policy(state.clone(), shutdown_rx.clone()));
        let kube_task = kubernetes::spawn(&opts.policy_source, state.clone(), &opts.control.node_id, shutdown_rx.clone());
        // A node without a resolver configuration still enforces; tools
        // named by host then reach nothing (fail closed), loudly.
        let dns_task = if opts.dns_per_agent {
            Some(tokio::spawn(dns::agent::sweep(state.clone(), shutdown_rx.clone())))
        } else { match dns::resolve::resolver(opts.dns_server) {
            Ok(resolver) => Some(tokio::spawn(dns::resolve::run(state.clone(), resolver, opts.dns_grace, shutdown_rx.clone()))),
            Err(e) => {
                tracing::error!("no DNS resolver ({e:#}); tools named by host get no addresses");
                None
            }
        } };
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                _ = hup.recv() => { tracing::info!("SIGHUP: reloading the policy"); state.reload_file(); }
            }
        }
        ready.set(false);
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        watch_task.abort();
        if let Some(t) = kube_task {
            t.abort();
        }
        if let Some(t) = dns_task {
            t.abort();
        }
        let _ = shutdown_tx.send(true);
        let _ = control_task.await;
        let _ = abstract_task.await;
        let _ = metrics_task.await;
        anyhow::Ok(())
    }
    .await;

    // Tagged processes still running stay fenced: the programs remain
    // attached (pinned) until a daemon with this --pin-dir takes over.
    // Stopping the daemon must never set an agent free.
    let running: std::collections::BTreeSet<u32> = state
        .kernel()
        .processes()
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    let mut stop = AuditRecord::new("daemon");
    let how = match &outcome {
        Ok(()) => "stopped".to_string(),
        Err(e) => format!("stopped on error: {e:#}"),
    };
    stop.detail = Some(if running.is_empty() {
        how
    } else {
        kernel.keep_attached();
        *kept = true;
        tracing::warn!(
            tagged = running.len(),
            pin_dir = %opts.pin_dir.display(),
            "tagged processes are still running: leaving the programs attached so they stay fenced; a daemon started with this --pin-dir takes over (stop the agents first for a full clean-up)"
        );
        format!(
            "{how}; {} tagged processes still running: programs left attached (pinned in {}) until a daemon takes over",
            running.len(),
            opts.pin_dir.display()
        )
    });
    state.audit(NODE_LOG, stop);
    let _ = shutdown_tx.send(true);
    let _ = pipeline_stop_tx.send(true);
    let _ = pipeline.await;
    // The writer (and with it the exporters' queues) is gone: let them
    // deliver the last records, briefly.
    exporters.finish().await;

    // Detach programs before removing cgroups: tagged processes still alive
    // keep their cgroup (rmdir fails with EBUSY), which we report.
    drop(kernel);
    let created = std::mem::take(
        &mut *state
            .created_cgroups
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    for dir in created.iter().rev() {
        if let Err(e) = std::fs::remove_dir(dir) {
            tracing::warn!("leaving cgroup {}: {e}", dir.display());
        }
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
    outcome
}

impl state::State {
    /// Parses, validates and applies policy text; on any error the current
    /// policy stays in force and the error says why.
    pub fn reload_from_text(&self, text: &str, origin: &str) -> Result<u32, String> {
        let result = Policy::from_str(text, origin)
            .map_err(|e| e.to_string())
            .and_then(|p| self.apply_policy(p, text).map_err(|e| format!("{e:#}")));
        if let Err(e) = &result {
            self.metrics
                .policy_reloads
                .with_label_values(&["error"])
                .inc();
            let mut rec = AuditRecord::new("policy");
            rec.detail = Some(format!("refused, current policy kept: {e}"));
            self.audit(NODE_LOG, rec);
        }
        result.map_err(|e| format!("policy refused, the current policy stays in force:\n{e}"))
    }

    /// Re-reads the policy file (SIGHUP, or a change on disk).
    pub fn reload_file(&self) {
        let Some(path) = self.policy_path.clone() else {
            tracing::info!(
                "no policy file to re-read: the policy is the embedded default, or comes from \
                 --policy-source kubernetes"
            );
            return;
        };
        // Remember what was read, so the file watcher does not reload the
        // same content a second time after a SIGHUP.
        *self.policy_stamp.lock().unwrap_or_else(|p| p.into_inner()) = file_stamp(&path);
        match std::fs::read_to_string(&path) {
            Ok(text) => match self.reload_from_text(&text, &path.display().to_string()) {
                Ok(generation) => {
                    tracing::info!(generation, "policy reloaded from {}", path.display())
                }
                Err(e) => tracing::error!("{e}"),
            },
            Err(e) => {
                self.metrics
                    .policy_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(
                    "reading policy {}: {e}; the current policy stays in force",
                    path.display()
                );
            }
        }
    }
}

/// The file's modification time and size, to notice edits without inotify.
fn file_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Reloads the policy when its file changes (checked every second).
async fn watch_policy(state: Arc<state::State>, mut shutdown: watch::Receiver<bool>) {
    let Some(path) = state.policy_path.clone() else {
        return;
    };
    *state.policy_stamp.lock().unwrap_or_else(|p| p.into_inner()) = file_stamp(&path);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = file_stamp(&path);
                let last = *state.policy_stamp.lock().unwrap_or_else(|p| p.into_inner());
                if now != last && now.is_some() {
                    tracing::info!("policy file {} changed", path.display());
                    state.reload_file();
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Tells systemd about a state change when it started us (NOTIFY_SOCKET
/// set and not empty); a failure is logged, never fatal.
fn notify_systemd(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none_or(|s| s.is_empty()) {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("sd_notify: {e}");
    }
}

/// The metrics server's view of the daemon: gauges refreshed from the
/// state, then the registry rendered.
fn scrape(state: &Arc<state::State>) -> crate::metrics::Scrape {
    let state = state.clone();
    Arc::new(move || {
        state.refresh_gauges();
        state.metrics.render()
    })
}
