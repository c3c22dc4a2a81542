//! The daemon's shared state and the handles the control socket and the
//! event pipeline work through.
//!
//! Lock order: `registry` before `kernel`. The registry is the daemon's
//! view of subjects, grants and the policy; the kernel maps are its image.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, RwLock},
    time::Instant,
};

use agent_guard_common::{event::kind, maps as map_names};
use tokio::sync::mpsc;

use super::subjects::{Grant, Identity, Ids};
use crate::{
    audit::AuditRecord,
    kernel::{KernelMaps, fs as kfs, maps::CapRule},
    metrics::Metrics,
    policy::{CompiledPolicy, Policy},
};

/// Force a consumer wakeup when this share of the ring buffer waits; below
/// it the daemon drains on its timer.
pub const WAKEUP_DIVISOR: u32 = 16;

/// Paths of Unix path ids no longer in the policy kept for late records.
pub const RETIRED_UNIX_PATHS: usize = 4096;

/// The policy in force.
pub struct Loaded {
    pub policy: Policy,
    /// The policy's source text (kept to rebuild on DNS changes).
    pub text: String,
    pub compiled: CompiledPolicy,
    pub generation: u32,
    pub hash: String,
    pub origin: String,
}

/// The daemon's capability state. Everything in here changes together
/// under one lock, so the kernel image is always written from one
/// consistent view.
#[derive(Default)]
pub struct Registry {
    pub loaded: Option<Loaded>,
    pub identities: HashMap<u32, Arc<Identity>>,
    pub ids: Ids,
    pub grants: BTreeMap<u32, Grant>,
    pub next_grant: u32,
    /// (tenant, None) suspends a whole tenant, (tenant, Some(agent)) one agent.
    pub suspended: BTreeSet<(String, Option<String>)>,
    /// Subjects whose capabilities were taken (on_divergence = revoke).
    pub revoked_subjects: BTreeSet<u32>,
    /// `CAPS` keys installed per subject for the current generation.
    pub caps: HashMap<u32, Vec<CapRule>>,
    /// Divergent calls per task-scoped subject.
    pub divergences: HashMap<u32, u32>,
    pub next_task: u32,
    /// Addresses of the policy's `host` endpoints.
    pub dns: super::dns::table::DnsTable,
    /// Path ids of the policy's Unix socket addresses (in `UNIX_PATHS`).
    /// Ids are never reused, so a stale key can never name another path.
    pub unix_ids: BTreeMap<Vec<u8>, u32>,
    pub next_unix_id: u32,
    /// Path of every id given out, also after its path left the policy
    /// (records of calls made before a reload arrive after it); the oldest
    /// retired ones are forgotten past [`RETIRED_UNIX_PATHS`].
    pub unix_names: HashMap<u32, Vec<u8>>,
    pub retired_unix_ids: std::collections::VecDeque<u32>,
    /// Per-agent DNS (`--dns-mode per-agent`): `host` endpoints open only
    /// the addresses in `learned` of the subject.
    pub dns_per_agent: bool,
    /// subject -> name (lowercase) -> address -> allowed until.
    pub learned: HashMap<u32, BTreeMap<String, BTreeMap<std::net::IpAddr, Instant>>>,
    /// Two-person approval requests waiting for a decision.
    pub approvals: BTreeMap<u32, super::approvals::ApprovalRequest>,
    pub next_approval: u32,
    /// (subject, tool) -> (denied request, monotonic deadline): calls
    /// until then open no new request (no asking again and again).
    pub denied: HashMap<(u32, String), (u32, u64)>,
    /// (subject, tool) -> the request whose quorum made its last grant, so
    /// a refusal read after that grant names the request it belonged to.
    pub approved: HashMap<(u32, String), u32>,
    /// Cgroups tagged because they match an agent's `cgroup_glob`:
    /// cgroup id -> (directory, root subject).
    pub adopted: BTreeMap<u64, (PathBuf, u32)>,
    /// Retired derived subjects, oldest first, forgotten after a while.
    pub retired: std::collections::VecDeque<(u32, Instant)>,
}

/// A message for the event pipeline.
pub enum PipelineMsg {
    /// Append `record` to `log`.
    Audit(String, Box<AuditRecord>),
    /// A launcher registered `pid`; its parent is known now, while it lives.
    Launched { pid: u32, ppid: Option<u32> },
    /// Drain the ring buffer now, then answer (whois needs the records of
    /// connects that already happened).
    Sync(tokio::sync::oneshot::Sender<()>),
}

impl Registry {
    /// Path id `id` left the policy: its path is kept for records still on
    /// their way, until [`RETIRED_UNIX_PATHS`] newer ids have retired.
    pub fn retire_unix_id(&mut self, id: u32) {
        self.retired_unix_ids.push_back(id);
        while self.retired_unix_ids.len() > RETIRED_UNIX_PATHS {
            if let Some(old) = self.retired_unix_ids.pop_front() {
                self.unix_names.remove(&old);
            }
        }
    }
}

pub struct State {
    pub kernel: Mutex<KernelMaps>,
    pub registry: Mutex<Registry>,
    pub cgroup_mount: PathBuf,
    pub cgroup_root: PathBuf,
    pub audit_tx: mpsc::UnboundedSender<PipelineMsg>,
    /// Records the pipeline takes at its next drain (every
    /// `DRAIN_INTERVAL`, like the kernel's) instead of being woken for
    /// each: one per proxied DNS query.
    pub audit_batched: Mutex<Vec<(String, AuditRecord)>>,
    pub metrics: Metrics,
    pub attached: Vec<String>,
    /// (name, kernel program id) of our programs, for run statistics.
    pub program_ids: Vec<(String, u32)>,
    pub started: Instant,
    pub socket: PathBuf,
    pub metrics_addr: RwLock<Option<std::net::SocketAddr>>,
    /// Size of the event ring buffer in bytes.
    pub ring_bytes: u32,
    /// Idle task/sub-agent subjects are retired after this.
    pub idle_subject_age: std::time::Duration,
    /// Modification stamp of the policy file as last read.
    pub policy_stamp: Mutex<Option<(std::time::SystemTime, u64)>>,
    /// Where `PROCS` is pinned (told to launchers).
    pub procs_pin: PathBuf,
    /// Policy file to re-read on SIGHUP and when it changes on disk.
    pub policy_path: Option<PathBuf>,
    /// Cgroup directories this daemon created, removed at shutdown.
    pub created_cgroups: Mutex<Vec<PathBuf>>,
    /// Whether Unix socket calls are fenced on this kernel.
    pub unix_support: crate::kernel::UnixSupport,
    /// The per-agent DNS proxy, when `--dns-mode per-agent`.
    pub dns_proxy: std::sync::OnceLock<super::dns::proxy::DnsProxy>,
    /// Learned addresses stay this long past their TTL.
    pub dns_grace: std::time::Duration,
    /// The daemon's state directory (suspensions survive restarts here).
    pub state_dir: PathBuf,
    /// Who may use the control socket besides root, and how launch
    /// tokens are checked.
    pub control: super::launch::ControlConfig,
    /// Launch token ids already used, persisted in the state directory.
    pub used_jtis: Mutex<super::launch::UsedJtis>,
    /// Approval requests nobody decided end after this.
    pub approval_timeout: std::time::Duration,
    /// Told of each new approval request (`--approval-webhook`).
    pub approval_webhook: Option<super::webhook::Webhook>,
    /// Allowed connects' sockets by cookie, for whois.
    pub sockets: Mutex<super::whois::SocketTable>,
    /// `--flow-records`: allowed calls counted per flow in the kernel.
    pub flows: Option<super::flows::Flows>,
    /// What `registry.json` last got (one writer at a time; unchanged
    /// snapshots are not written again).
    pub persist_lock: Mutex<String>,
    /// The `--export` exporters' counters.
    pub exports: Vec<Arc<crate::export::ExportStats>>,
}

/// File in the state directory that holds the suspended tenants/agents.
pub const SUSPENDED_FILE: &str = "suspended.json";

impl State {
    /// Writes the suspension set (temp file, fsync, rename).
    pub fn save_suspended(&self, set: &BTreeSet<(String, Option<String>)>) -> std::io::Result<()> {
        let list: Vec<serde_json::Value> = set
            .iter()
            .map(|(t, a)| serde_json::json!({ "tenant": t, "agent": a }))
            .collect();
        write_state_file(&self.state_dir, SUSPENDED_FILE, &list)
    }

    /// Reads the suspension set saved by an earlier run; a missing file is
    /// an empty set, a damaged one an error (starting without it could lift
    /// a suspension).
    pub fn load_suspended(state_dir: &Path) -> anyhow::Result<BTreeSet<(String, Option<String>)>> {
        let path = state_dir.join(SUSPENDED_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
        };
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            tenant: String,
            agent: Option<String>,
        }
        let list: Vec<Entry> = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{} is damaged ({e}); it lists the suspended tenants and agents: fix it, or remove it to lift every suspension",
                path.display()
            )
        })?;
        Ok(list.into_iter().map(|e| (e.tenant, e.agent)).collect())
    }
}

/// Writes `value` as JSON to `dir/name` so that a crash leaves the old
/// file or the new one, never a torn one: temp file, fsync, rename, fsync
/// of the directory.
pub fn write_state_file(
    dir: &Path,
    name: &str,
    value: &impl serde::Serialize,
) -> std::io::Result<()> {
    write_state_bytes(dir, name, serde_json::to_string_pretty(value)?.as_bytes())
}

/// [`write_state_file`] for bytes already serialised.
pub fn write_state_bytes(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Monotonic nanoseconds, the clock `bpf_ktime_get_ns()` reads.
pub fn mono_now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

impl State {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kernel: KernelMaps,
        cgroup_mount: PathBuf,
        cgroup_root: PathBuf,
        audit_tx: mpsc::UnboundedSender<PipelineMsg>,
        metrics: Metrics,
        attached: Vec<String>,
        socket: PathBuf,
        ring_bytes: u32,
        policy_path: Option<PathBuf>,
        procs_pin: PathBuf,
    ) -> Self {
        Self {
            kernel: Mutex::new(kernel),
            registry: Mutex::new(Registry {
                next_grant: 1,
                next_task: 1,
                next_approval: 1,
                ..Registry::default()
            }),
            cgroup_mount,
            cgroup_root,
            audit_tx,
            audit_batched: Mutex::new(Vec::new()),
            metrics,
            attached,
            program_ids: Vec::new(),
            started: Instant::now(),
            socket,
            metrics_addr: RwLock::new(None),
            ring_bytes,
            policy_path,
            procs_pin,
            policy_stamp: Mutex::new(None),
            idle_subject_age: std::time::Duration::from_secs(10),
            created_cgroups: Mutex::new(Vec::new()),
            unix_support: crate::kernel::UnixSupport::Unavailable("not loaded".into()),
            dns_proxy: std::sync::OnceLock::new(),
            dns_grace: std::time::Duration::from_secs(30),
            state_dir: PathBuf::new(),
            control: super::launch::ControlConfig::default(),
            used_jtis: Mutex::new(super::launch::UsedJtis::default()),
            approval_timeout: super::approvals::DEFAULT_TIMEOUT,
            approval_webhook: None,
            sockets: Mutex::new(super::whois::SocketTable::default()),
            flows: None,
            persist_lock: Mutex::new(String::new()),
            exports: Vec::new(),
        }
    }

    pub fn kernel(&self) -> MutexGuard<'_, KernelMaps> {
        self.kernel.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn audit(&self, log: &str, record: AuditRecord) {
        // The writer task outlives every sender except at shutdown, where a
        // failed send has nowhere left to go.
        let _ = self
            .audit_tx
            .send(PipelineMsg::Audit(log.to_string(), Box::new(record)));
    }

    /// [`State::audit`] without waking the pipeline: the record is written
    /// with the next drain of the ring buffer (at most `DRAIN_INTERVAL`
    /// later, and at shutdown), so a stream of them costs one write per
    /// drain instead of a wake-up and a write each.
    pub fn audit_batched(&self, log: &str, record: AuditRecord) {
        self.audit_batched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((log.to_string(), record));
    }

    /// What [`State::audit_batched`] queued since the last call, in order.
    pub fn take_batched(&self) -> Vec<(String, AuditRecord)> {
        std::mem::take(&mut *self.audit_batched.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn identity(&self, subject_id: u32) -> Option<Arc<Identity>> {
        self.registry().identities.get(&subject_id).cloned()
    }

    /// The Unix socket path of path id `id`.
    pub fn unix_path(&self, id: u32) -> Option<Vec<u8>> {
        self.registry().unix_names.get(&id).cloned()
    }

    pub fn tool_name(&self, tool_id: u32) -> Option<String> {
        self.registry().ids.tool_names.get(&tool_id).cloned()
    }

    /// Remembers a cgroup directory to remove at shutdown.
    pub fn created_cgroup(&self, dir: PathBuf) {
        self.created_cgroups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dir);
    }

    /// The subject a process is judged under, by pid then by cgroup.
    pub fn process_subject(&self, pid: u32) -> Option<u32> {
        let kernel = self.kernel();
        kernel.process_subject(pid).or_else(|| {
            let rel = kfs::process_cgroup(pid)?;
            let id = kfs::cgroup_id(&self.cgroup_mount.join(rel)).ok()?;
            kernel.cgroup_subject(id)
        })
    }

    /// The identity a process is judged under; a tagged process whose
    /// subject the daemon does not know is still reported as tagged.
    pub fn process_identity(&self, pid: u32) -> Option<Arc<Identity>> {
        let subject = self.process_subject(pid)?;
        Some(
            self.identity(subject)
                .unwrap_or_else(|| Arc::new(Identity::unknown(subject))),
        )
    }

    /// Tenants with a log: every tenant of every identity seen.
    pub fn tenants(&self) -> Vec<String> {
        let reg = self.registry();
        let t: BTreeSet<String> = reg.identities.values().map(|i| i.tenant.clone()).collect();
        t.into_iter().collect()
    }

    /// Updates gauges that are read from the maps rather than counted.
    pub fn refresh_gauges(&self) {
        let reg = self.registry();
        let kernel = self.kernel();
        for (name, n) in kernel.entry_counts() {
            self.metrics
                .map_entries
                .with_label_values(&[name])
                .set(n as i64);
        }
        let procs = kernel.processes();
        let decisions = kernel.decisions();
        drop(kernel);
        for (i, v) in ["allow", "deny", "would_deny"].iter().enumerate() {
            self.metrics
                .kernel_decisions
                .with_label_values(&[v])
                .set(decisions[i] as i64);
        }
        for name in [
            map_names::PROCS,
            map_names::CGROUPS,
            map_names::SUBJECTS,
            map_names::CAPS,
            map_names::CAPS_EXACT,
            map_names::GRANTS,
            map_names::GRANT_STATE,
            map_names::UNIX_PATHS,
        ] {
            self.metrics
                .map_capacity
                .with_label_values(&[name])
                .set(i64::from(crate::kernel::maps::capacity_of(name)));
        }
        let mut tracked: BTreeMap<String, i64> = BTreeMap::new();
        let mut grants: BTreeMap<String, i64> = BTreeMap::new();
        let mut pending: BTreeMap<String, i64> = BTreeMap::new();
        for ident in reg.identities.values() {
            tracked.entry(ident.tenant.clone()).or_insert(0);
            grants.entry(ident.tenant.clone()).or_insert(0);
            pending.entry(ident.tenant.clone()).or_insert(0);
        }
        for a in reg.approvals.values() {
            *pending.entry(a.tenant.clone()).or_insert(0) += 1;
        }
        for (tenant, n) in pending {
            self.metrics
                .approvals_pending
                .with_label_values(&[&tenant])
                .set(n);
        }
        for (_, subject) in procs {
            if let Some(ident) = reg.identities.get(&subject) {
                *tracked.entry(ident.tenant.clone()).or_insert(0) += 1;
            }
        }
        for g in reg.grants.values() {
            *grants.entry(g.tenant.clone()).or_insert(0) += 1;
        }
        for (tenant, n) in tracked {
            self.metrics
                .tracked_processes
                .with_label_values(&[&tenant])
                .set(n);
        }
        for (tenant, n) in grants {
            self.metrics
                .active_grants
                .with_label_values(&[&tenant])
                .set(n);
        }
    }

    /// What `agent-guard status --json` shows.
    pub fn status(&self) -> serde_json::Value {
        // Before the registry lock: the check takes it itself.
        let grant_problems = self.grant_disagreements();
        let subjects_known = self.registry().identities.len();
        let reg = self.registry();
        let (generation, origin, hash) = reg
            .loaded
            .as_ref()
            .map(|l| (l.generation, l.origin.clone(), l.hash.clone()))
            .unwrap_or_default();
        let kernel = self.kernel();
        let lost = kernel.lost();
        let decisions = kernel.decisions();
        let procs = kernel.processes();
        let entries = kernel.entry_counts();
        drop(kernel);
        let now = mono_now_ns();
        let mut agents: Vec<serde_json::Value> = reg
            .identities
            .values()
            .filter(|i| i.active)
            .map(|i| {
                let tracked = procs.iter().filter(|(_, s)| *s == i.subject_id).count();
                let suspended = reg.is_suspended(&i.tenant, &i.agent);
                serde_json::json!({
                    "subject": i.chain, "subject_id": i.subject_id, "tenant": i.tenant, "agent": i.agent,
                    "mode": i.mode.as_str(), "hardening": i.hardening, "depth": i.depth,
                    "task": i.task.as_ref().map(|t| serde_json::json!({"id": t.id, "text": t.text})),
                    "tools": i.requested_tools,
                    "expires_in_seconds": (i.expires_at_ns != 0).then(|| i.expires_at_ns.saturating_sub(now) / 1_000_000_000),
                    "suspended": suspended,
                    "tracked_processes": tracked, "cgroup": i.cgroup_dir,
                })
            })
            .collect();
        agents.sort_by(|a, b| {
            (a["subject"].as_str(), a["subject_id"].as_u64())
                .cmp(&(b["subject"].as_str(), b["subject_id"].as_u64()))
        });
        let grants: Vec<serde_json::Value> = {
            let kernel = self.kernel();
            reg.grants
                .values()
                .map(|g| {
                    let mut v = g.status(now);
                    // Uses are counted by the kernel; show what is left.
                    if g.uses.is_some()
                        && let Some(st) = kernel.grant_state(g.id)
                    {
                        v["uses_left"] = serde_json::json!(st.uses_left.max(0));
                    }
                    v
                })
                .collect()
        };
        // Per-agent DNS: what each subject was answered (and may reach);
        // shared: the daemon's own answer for everyone.
        let dns = if reg.dns_per_agent {
            let mut by_name: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
            for name in reg.dns.names.keys() {
                by_name.entry(name.clone()).or_default();
            }
            let now_i = Instant::now();
            for (subject, names) in &reg.learned {
                let chain = reg
                    .identities
                    .get(subject)
                    .map_or_else(|| subject.to_string(), |i| i.chain.clone());
                for (name, addrs) in names {
                    let live: Vec<String> = addrs
                        .iter()
                        .filter(|(_, until)| **until > now_i)
                        .map(|(a, _)| a.to_string())
                        .collect();
                    by_name
                        .entry(name.clone())
                        .or_default()
                        .insert(chain.clone(), live);
                }
            }
            serde_json::Value::Object(
                by_name
                    .into_iter()
                    .map(|(name, subjects)| {
                        let mut all: Vec<String> = subjects.values().flatten().cloned().collect();
                        all.sort();
                        all.dedup();
                        (
                            name,
                            serde_json::json!({ "addresses": all, "by_subject": subjects, "error": null }),
                        )
                    })
                    .collect(),
            )
        } else {
            reg.dns.status()
        };
        let dns_mode = if reg.dns_per_agent {
            "per-agent"
        } else {
            "shared"
        };
        let learned: usize = reg
            .learned
            .values()
            .flat_map(|n| n.values())
            .map(|a| a.len())
            .sum();
        let suspended: Vec<String> = reg
            .suspended
            .iter()
            .map(|(t, a)| a.as_ref().map_or_else(|| t.clone(), |a| format!("{t}/{a}")))
            .collect();
        let adopted: Vec<serde_json::Value> = reg
            .adopted
            .iter()
            .map(|(id, (dir, subject))| {
                serde_json::json!({
                    "cgroup_id": id, "cgroup": dir, "subject_id": subject,
                    "subject": reg.identities.get(subject).map(|i| i.chain.clone()),
                })
            })
            .collect();
        drop(reg);
        let lost_by_kind: BTreeMap<&str, u64> = (1..kind::COUNT as u8)
            .map(|k| (kind::name(k), lost[k as usize]))
            .collect();
        serde_json::json!({
            "daemon": { "pid": std::process::id(), "version": env!("CARGO_PKG_VERSION"),
                        "uptime_seconds": self.started.elapsed().as_secs(),
                        "socket": self.socket, "cgroup_root": self.cgroup_root,
                        // How tagged processes reach the daemon (see control::abstract_name).
                        "socket_abstract": format!("@{}", String::from_utf8_lossy(&crate::control::abstract_name(&self.socket)[1..])),
                        "metrics_addr": self.metrics_addr.read().unwrap_or_else(|p| p.into_inner()).map(|a| a.to_string()),
                        "ring_bytes": self.ring_bytes },
            "programs": self.attached,
            // Per-program calls and run time (kernel.bpf_stats_enabled=1).
            "program_stats": crate::kernel::program_stats(&self.program_ids)
                .into_iter()
                .map(|(n, (count, ns))| (n, serde_json::json!({ "run_count": count, "run_time_ns": ns })))
                .collect::<serde_json::Map<_, _>>(),
            "bpf_stats_enabled": std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").map(|s| s.trim() == "1").unwrap_or(false),
            "unix_socket_fencing": match &self.unix_support {
                crate::kernel::UnixSupport::Enforced => serde_json::json!({ "enforced": true }),
                crate::kernel::UnixSupport::Unavailable(why) => serde_json::json!({ "enforced": false, "why": why }),
            },
            "policy": { "generation": generation, "origin": origin, "sha256": hash },
            "tracked_processes": procs.len(),
            // Identities the daemon holds, retired ones included (they are
            // forgotten a while after retirement: bounded by live work).
            "subjects_known": subjects_known,
            "agents": agents,
            "grants": grants,
            "approvals": self.approvals(),
            // The registry's grants checked against the kernel's GRANTS and
            // GRANT_STATE maps: empty when status and kernel agree.
            "grant_disagreements": grant_problems,
            "program_ids": self.program_ids.iter().map(|(n, id)| (n.clone(), serde_json::json!(id))).collect::<serde_json::Map<_, _>>(),
            "dns": dns,
            // Cgroups tagged by an agent's cgroup_glob.
            "adopted_cgroups": adopted,
            "dns_mode": dns_mode,
            "dns_proxy": self.dns_proxy.get().map(|p| serde_json::json!({
                "subjects_served": p.subjects().len(),
                "learned_addresses": learned,
                "stats": p.stats(),
            })),
            "suspended": suspended,
            "events_lost": lost_by_kind,
            "decisions": { "allow": decisions[0], "deny": decisions[1], "would_deny": decisions[2] },
            // `--flow-records`: null in per-call mode.
            "flow_records": self.flows.as_ref().map(|f| f.status()),
            "maps": entries.iter().map(|(n, c)| (n.to_string(), *c)).collect::<BTreeMap<_, _>>(),
            "exports": self.exports.iter().map(|e| e.status()).collect::<Vec<_>>(),
        })
    }

    /// Removes `PROCS` entries whose process is gone (a stale entry fails
    /// closed, but must not tag a new process that reuses the pid).
    pub fn sweep_stale(&self) -> usize {
        let mut kernel = self.kernel();
        let mut removed = 0;
        for (pid, _) in kernel.processes() {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                kernel.untag_process(pid);
                removed += 1;
            }
        }
        removed
    }
}

/// Parent pid from /proc/PID/stat (fields follow the last ')', since comm
/// may contain spaces and parentheses).
pub fn ppid_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}
