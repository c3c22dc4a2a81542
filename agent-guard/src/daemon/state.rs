//! The daemon's shared state: the loaded policy, identities, and the handles
//! the control socket and event pipeline work through.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, RwLock},
    time::Instant,
};

use agent_guard_common::{
    Config, capacity,
    event::kind,
    grant::{GrantValue, UNLIMITED_USES},
    maps as map_names,
    subject::{MODE_ENFORCE, MODE_MONITOR, Subject},
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::{
    audit::{AuditRecord, NODE_LOG},
    control::Registration,
    kernel::{KernelMaps, fs as kfs, maps::GrantRule},
    metrics::Metrics,
    policy::{Hardening, Mode, Policy},
};

/// Force a consumer wakeup when this share of the ring buffer waits; below
/// it the daemon drains on its timer.
pub const WAKEUP_DIVISOR: u32 = 16;

/// Who a subject id stands for. Ids are allocated per (tenant, agent) for
/// the daemon's lifetime and never reused, so processes tagged before a
/// reload keep meaning the same identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub subject_id: u32,
    pub tenant: String,
    pub agent: String,
    /// Delegation chain, e.g. `acme/researcher`.
    pub chain: String,
    pub mode: Mode,
    pub hardening: Hardening,
    pub cgroup_dir: PathBuf,
    /// Still in the current policy.
    pub active: bool,
}

/// The policy in force.
pub struct Loaded {
    pub policy: Policy,
    pub generation: u32,
    pub hash: String,
    pub origin: String,
    /// Kernel rules installed for this generation (removed on the next flip).
    pub rules: Vec<GrantRule>,
}

/// A message for the event pipeline.
pub enum PipelineMsg {
    /// Append `record` to `log`.
    Audit(String, Box<AuditRecord>),
    /// A launcher registered `pid`; its parent is known now, while it lives.
    Launched { pid: u32, ppid: Option<u32> },
}

pub struct State {
    pub kernel: Mutex<KernelMaps>,
    pub loaded: RwLock<Option<Loaded>>,
    identities: RwLock<HashMap<u32, Arc<Identity>>>,
    ids: Mutex<Ids>,
    pub cgroup_mount: PathBuf,
    pub cgroup_root: PathBuf,
    pub audit_tx: mpsc::UnboundedSender<PipelineMsg>,
    pub metrics: Metrics,
    pub attached: Vec<String>,
    pub started: Instant,
    pub socket: PathBuf,
    pub metrics_addr: RwLock<Option<std::net::SocketAddr>>,
    /// Size of the event ring buffer in bytes.
    pub ring_bytes: u32,
    /// Cgroup directories this daemon created, removed at shutdown.
    pub created_cgroups: Mutex<Vec<PathBuf>>,
}

/// Stable id allocation for subjects and tools.
#[derive(Default)]
struct Ids {
    subjects: HashMap<(String, String), u32>,
    tools: HashMap<String, u32>,
    tool_names: HashMap<u32, String>,
}

impl Ids {
    fn subject(&mut self, tenant: &str, agent: &str) -> u32 {
        let next = self.subjects.len() as u32 + 1;
        *self
            .subjects
            .entry((tenant.to_string(), agent.to_string()))
            .or_insert(next)
    }
    fn tool(&mut self, name: &str) -> u32 {
        let next = self.tools.len() as u32 + 1;
        let id = *self.tools.entry(name.to_string()).or_insert(next);
        self.tool_names.insert(id, name.to_string());
        id
    }
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
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
    ) -> Self {
        Self {
            kernel: Mutex::new(kernel),
            loaded: RwLock::new(None),
            identities: RwLock::new(HashMap::new()),
            ids: Mutex::new(Ids::default()),
            cgroup_mount,
            cgroup_root,
            audit_tx,
            metrics,
            attached,
            started: Instant::now(),
            socket,
            metrics_addr: RwLock::new(None),
            ring_bytes,
            created_cgroups: Mutex::new(Vec::new()),
        }
    }

    pub fn kernel(&self) -> MutexGuard<'_, KernelMaps> {
        self.kernel.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn audit(&self, log: &str, record: AuditRecord) {
        // The writer task outlives every sender except at shutdown, where a
        // failed send has nowhere left to go.
        let _ = self
            .audit_tx
            .send(PipelineMsg::Audit(log.to_string(), Box::new(record)));
    }

    pub fn identity(&self, subject_id: u32) -> Option<Arc<Identity>> {
        self.identities
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&subject_id)
            .cloned()
    }

    pub fn tool_name(&self, tool_id: u32) -> Option<String> {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tool_names
            .get(&tool_id)
            .cloned()
    }

    fn identity_by_name(&self, tenant: &str, agent: &str) -> Option<Arc<Identity>> {
        self.identities
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|i| i.active && i.tenant == tenant && i.agent == agent)
            .cloned()
    }

    /// Validates and installs `policy` as the next generation, then flips.
    ///
    /// New rules go in beside the old ones under the next generation number;
    /// one write of `CONFIG` switches every subject at once; then the old
    /// generation's rules are deleted. Subjects dropped from the policy lose
    /// their `SUBJECTS` entry, so their processes fail closed.
    pub fn apply_policy(&self, policy: Policy, text: &str) -> anyhow::Result<u32> {
        let compiled = policy.compile()?;
        let mut loaded = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        let generation = loaded.as_ref().map_or(1, |l| l.generation + 1);

        let mut new_identities = Vec::new();
        let mut rules = Vec::new();
        {
            let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            for agent in &compiled.agents {
                let id = ids.subject(&agent.tenant, &agent.name);
                new_identities.push(Identity {
                    subject_id: id,
                    tenant: agent.tenant.clone(),
                    agent: agent.name.clone(),
                    chain: format!("{}/{}", agent.tenant, agent.name),
                    mode: agent.mode,
                    hardening: agent.hardening,
                    cgroup_dir: self.cgroup_root.join(&agent.tenant).join(&agent.name),
                    active: true,
                });
            }
            for rule in &compiled.rules {
                let Some(name) = compiled.tool_name(rule.tool_id) else {
                    continue;
                };
                let tool_id = ids.tool(name);
                rules.push((
                    GrantRule {
                        subject: new_identities[rule.agent_index].subject_id,
                        generation: generation as u8,
                        proto: rule.proto,
                        port: rule.port,
                        addr: rule.addr,
                        prefix_len: rule.prefix_len,
                    },
                    tool_id,
                ));
            }
        }

        // Agent cgroups first: nothing is written to the kernel if one
        // cannot be made.
        let mut cgroup_ids = Vec::new();
        for ident in &new_identities {
            if !ident.cgroup_dir.exists() {
                kfs::ensure_cgroup_dir(&self.cgroup_mount, &ident.cgroup_dir)?;
                self.created_cgroups
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(ident.cgroup_dir.clone());
            }
            cgroup_ids.push(kfs::cgroup_id(&ident.cgroup_dir)?);
        }

        let mut kernel = self.kernel();
        let mut installed = Vec::new();
        for (rule, tool_id) in &rules {
            let value = GrantValue {
                tool_id: *tool_id,
                grant_id: 0,
                expires_at_ns: 0,
                uses_left: UNLIMITED_USES,
                _pad: 0,
            };
            if let Err(e) = kernel.insert_grant(rule, value) {
                // Roll back this generation; the old one is still in force.
                for r in &installed {
                    kernel.remove_grant(r);
                }
                return Err(e.into());
            }
            installed.push(*rule);
        }
        for (ident, cg) in new_identities.iter().zip(&cgroup_ids) {
            let tenant_id = compiled.tenant_id(&ident.tenant).unwrap_or(0);
            kernel.set_subject(
                ident.subject_id,
                Subject {
                    tenant_id,
                    agent_id: ident.subject_id,
                    parent: 0,
                    depth: 0,
                    mode: if ident.mode == Mode::Monitor {
                        MODE_MONITOR
                    } else {
                        MODE_ENFORCE
                    },
                    flags: 0,
                    _pad: 0,
                },
            )?;
            kernel.tag_cgroup(*cg, ident.subject_id)?;
        }
        kernel.set_config(Config {
            generation,
            wakeup_bytes: self.ring_bytes / WAKEUP_DIVISOR,
        })?;
        if let Some(old) = loaded.as_ref() {
            for r in &old.rules {
                kernel.remove_grant(r);
            }
        }

        // Identities no longer in the policy: their processes fail closed.
        let mut identities = self.identities.write().unwrap_or_else(|p| p.into_inner());
        let keep: std::collections::HashSet<u32> =
            new_identities.iter().map(|i| i.subject_id).collect();
        for (id, ident) in identities.iter_mut() {
            if !keep.contains(id) && ident.active {
                let _ = kernel.remove_subject(*id);
                let mut retired = (**ident).clone();
                retired.active = false;
                *ident = Arc::new(retired);
            }
        }
        drop(kernel);
        for ident in new_identities {
            identities.insert(ident.subject_id, Arc::new(ident));
        }
        drop(identities);

        let hash = sha256_hex(text);
        let origin = policy.origin.clone();
        *loaded = Some(Loaded {
            policy,
            generation,
            hash: hash.clone(),
            origin: origin.clone(),
            rules: installed,
        });
        drop(loaded);
        self.metrics.policy_reloads.with_label_values(&["ok"]).inc();
        let mut rec = AuditRecord::new("policy");
        rec.detail = Some(format!("generation {generation} from {origin}"));
        rec.policy_hash = Some(hash);
        self.audit(NODE_LOG, rec);
        Ok(generation)
    }

    /// The identity a process is judged under, by pid then by cgroup.
    pub fn process_identity(&self, pid: u32) -> Option<Arc<Identity>> {
        let subject = {
            let kernel = self.kernel();
            kernel.process_subject(pid).or_else(|| {
                let rel = kfs::process_cgroup(pid)?;
                let id = kfs::cgroup_id(&self.cgroup_mount.join(rel)).ok()?;
                kernel.cgroup_subject(id)
            })
        }?;
        self.identity(subject).or_else(|| {
            Some(Arc::new(Identity {
                subject_id: subject,
                tenant: String::new(),
                agent: String::new(),
                chain: String::from("<unknown>"),
                mode: Mode::Enforce,
                hardening: Hardening::Strict,
                cgroup_dir: PathBuf::new(),
                active: false,
            }))
        })
    }

    /// Tags `pid` (the peer of the control connection) as (tenant, agent):
    /// `PROCS` first, then its agent cgroup, before the launcher execs.
    pub fn register(&self, pid: u32, tenant: &str, agent: &str) -> Result<Registration, String> {
        let wanted = self
            .identity_by_name(tenant, agent)
            .ok_or_else(|| self.unknown_identity(tenant, agent))?;
        if let Some(current) = self.process_identity(pid)
            && current.subject_id != wanted.subject_id
        {
            return Err(format!(
                "refused: this process is already tagged as {} and may only start processes under that identity \
                     (a tagged process cannot change tenant or agent; sub-agents are not supported yet)",
                current.chain
            ));
        }
        {
            let mut kernel = self.kernel();
            kernel
                .tag_process(pid, wanted.subject_id)
                .map_err(|e| format!("tagging pid {pid}: {e}"))?;
        }
        let _ = self.audit_tx.send(PipelineMsg::Launched {
            pid,
            ppid: ppid_of(pid),
        });
        if let Err(e) = kfs::move_to_cgroup(&wanted.cgroup_dir, pid) {
            // The pid anchor holds on its own; the cgroup is the second one.
            tracing::warn!(pid, "could not move into agent cgroup: {e}");
        }
        Ok(Registration {
            subject: wanted.chain.clone(),
            subject_id: wanted.subject_id,
            hardening: wanted.hardening,
            mode: wanted.mode,
            cgroup: wanted.cgroup_dir.display().to_string(),
        })
    }

    fn unknown_identity(&self, tenant: &str, agent: &str) -> String {
        let identities = self.identities.read().unwrap_or_else(|p| p.into_inner());
        let mut known: Vec<&str> = identities
            .values()
            .filter(|i| i.active)
            .map(|i| i.chain.as_str())
            .collect();
        known.sort_unstable();
        let tenant_known = identities.values().any(|i| i.active && i.tenant == tenant);
        let what = if tenant_known {
            format!("tenant {tenant:?} has no agent {agent:?}")
        } else {
            format!("unknown tenant {tenant:?}")
        };
        format!(
            "{what} in the current policy (known agents: {})",
            known.join(", ")
        )
    }

    /// Tenants with a log: every tenant of every identity seen.
    pub fn tenants(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .identities
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|i| i.tenant.clone())
            .collect();
        t.sort_unstable();
        t.dedup();
        t
    }

    /// Updates gauges that are read from the maps rather than counted.
    pub fn refresh_gauges(&self) {
        let kernel = self.kernel();
        for (name, n) in kernel.entry_counts() {
            self.metrics
                .map_entries
                .with_label_values(&[name])
                .set(n as i64);
        }
        let procs = kernel.processes();
        drop(kernel);
        for (name, cap) in [
            (map_names::PROCS, capacity::PROCS),
            (map_names::CGROUPS, capacity::CGROUPS),
            (map_names::SUBJECTS, capacity::SUBJECTS),
            (map_names::GRANTS, capacity::GRANTS),
        ] {
            self.metrics
                .map_capacity
                .with_label_values(&[name])
                .set(i64::from(cap));
        }
        let mut per_tenant: BTreeMap<String, i64> = BTreeMap::new();
        for ident in self
            .identities
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            per_tenant.entry(ident.tenant.clone()).or_insert(0);
        }
        for (_, subject) in procs {
            if let Some(ident) = self.identity(subject) {
                *per_tenant.entry(ident.tenant.clone()).or_insert(0) += 1;
            }
        }
        for (tenant, n) in per_tenant {
            self.metrics
                .tracked_processes
                .with_label_values(&[&tenant])
                .set(n);
            self.metrics
                .active_grants
                .with_label_values(&[&tenant])
                .set(0);
        }
    }

    /// What `agent-guard status --json` shows.
    pub fn status(&self) -> serde_json::Value {
        let (generation, origin, hash) = {
            let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
            loaded
                .as_ref()
                .map(|l| (l.generation, l.origin.clone(), l.hash.clone()))
                .unwrap_or_default()
        };
        let kernel = self.kernel();
        let lost = kernel.lost();
        let decisions = kernel.decisions();
        let procs = kernel.processes();
        let entries = kernel.entry_counts();
        drop(kernel);
        let mut agents: Vec<serde_json::Value> = self
            .identities
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|i| i.active)
            .map(|i| {
                let tracked = procs.iter().filter(|(_, s)| *s == i.subject_id).count();
                serde_json::json!({
                    "subject": i.chain, "tenant": i.tenant, "agent": i.agent,
                    "mode": i.mode.as_str(), "hardening": i.hardening,
                    "tracked_processes": tracked, "cgroup": i.cgroup_dir,
                })
            })
            .collect();
        agents.sort_by(|a, b| a["subject"].as_str().cmp(&b["subject"].as_str()));
        let lost_by_kind: BTreeMap<&str, u64> = (1..kind::COUNT as u8)
            .map(|k| (kind::name(k), lost[k as usize]))
            .collect();
        serde_json::json!({
            "daemon": { "pid": std::process::id(), "version": env!("CARGO_PKG_VERSION"),
                        "uptime_seconds": self.started.elapsed().as_secs(),
                        "socket": self.socket, "cgroup_root": self.cgroup_root,
                        "metrics_addr": self.metrics_addr.read().unwrap_or_else(|p| p.into_inner()).map(|a| a.to_string()) },
            "programs": self.attached,
            "policy": { "generation": generation, "origin": origin, "sha256": hash },
            "tracked_processes": procs.len(),
            "agents": agents,
            "events_lost": lost_by_kind,
            "decisions": { "allow": decisions[0], "deny": decisions[1], "would_deny": decisions[2] },
            "maps": entries.iter().map(|(n, c)| (n.to_string(), *c)).collect::<BTreeMap<_, _>>(),
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
