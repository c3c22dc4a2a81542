//! Subjects: who a tagged process is, what it may reach, and how the
//! kernel image of that is written.
//!
//! A root subject is one (tenant, agent) of the policy. Derived subjects
//! narrow it: a task scope (`run --task --tools --ttl`), a sub-agent
//! (`run --agent SUB` from inside a tagged process) or a process-tree grant
//! (`grant --pid`). A derived subject's tools are always a subset of its
//! parent's, and its expiry never outlives its parent's.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
};

use agent_guard_common::{
    Config,
    grant::{APPROVAL_REQUIRED, GrantValue, ToolLimit},
    subject::{FLAG_REVOKED, FLAG_SUSPENDED, MODE_ENFORCE, MODE_MONITOR, Subject},
    unix::{PROTO_UNIX, UnixPath, path_addr},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::state::{Loaded, PipelineMsg, Registry, State, WAKEUP_DIVISOR, mono_now_ns, ppid_of};
use crate::{
    audit::{AuditRecord, NODE_LOG},
    control::Registration,
    kernel::{fs as kfs, maps::CapRule},
    policy::{Hardening, Mode, Policy, ToolEndpoint, check_name},
};

/// A retired task/sub-agent identity is kept for late records this many
/// times `--idle-subject-age` (default 10 s: a minute), then forgotten.
const RETIRED_KEEP_FACTOR: u32 = 6;

/// A task scope: what the process was started to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub text: String,
}

/// Who a token-launched process tree acts for: on every record of the
/// tree and of its sub-agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub on_behalf_of: Option<String>,
    /// The launch token's id.
    pub jti: String,
}

/// Who a subject id stands for. Ids are allocated for the daemon's lifetime
/// and never reused, so processes tagged before a reload keep meaning the
/// same identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub subject_id: u32,
    /// The root agent's subject id (rate limits are per root agent).
    pub root_id: u32,
    pub parent: Option<u32>,
    pub depth: u8,
    pub tenant: String,
    /// The root agent's policy name (bounded: used in metric labels).
    pub agent: String,
    /// Delegation chain, e.g. `acme/researcher/summarizer`.
    pub chain: String,
    pub mode: Mode,
    pub hardening: Hardening,
    pub cgroup_dir: PathBuf,
    /// Narrowed tool set; `None` = all of the parent's (for a root: the
    /// policy's tools for the agent).
    pub requested_tools: Option<BTreeSet<String>>,
    /// Monotonic deadline, 0 = none.
    pub expires_at_ns: u64,
    pub task: Option<Task>,
    /// Set for a tree launched with a signed token (inherited).
    pub principal: Option<Principal>,
    /// Still in force (root in the policy, parent alive).
    pub active: bool,
    /// When a derived subject was made (idle ones are retired after a
    /// while); `None` for roots.
    pub created: Option<std::time::Instant>,
}

impl Identity {
    /// Placeholder for a tagged process whose subject the daemon lost.
    pub fn unknown(subject_id: u32) -> Self {
        Self {
            subject_id,
            root_id: subject_id,
            parent: None,
            depth: 0,
            tenant: String::new(),
            agent: String::new(),
            chain: "<unknown>".into(),
            mode: Mode::Enforce,
            hardening: Hardening::Strict,
            cgroup_dir: PathBuf::new(),
            requested_tools: None,
            expires_at_ns: 0,
            task: None,
            principal: None,
            active: false,
            created: None,
        }
    }

    /// Own name: the last element of the chain.
    pub fn name(&self) -> &str {
        self.chain.rsplit('/').next().unwrap_or(&self.chain)
    }

    pub fn is_root(&self) -> bool {
        self.parent.is_none()
    }
}

/// A just-in-time grant.
#[derive(Debug, Clone)]
pub struct Grant {
    pub id: u32,
    pub tenant: String,
    pub agent: String,
    pub tool: String,
    /// The subject the grant was given to; it also reaches that subject's
    /// derived subjects whose tool set allows the tool.
    pub subject_id: u32,
    pub expires_at_ns: u64,
    pub uses: Option<u32>,
    pub pid: Option<u32>,
    pub created: String,
    /// `GRANTS` keys installed for it.
    pub entries: Vec<CapRule>,
}

impl Grant {
    pub fn status(&self, now: u64) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "tenant": self.tenant, "agent": self.agent, "tool": self.tool,
            "pid": self.pid, "uses": self.uses, "created": self.created,
            "expires_in_seconds": self.expires_at_ns.saturating_sub(now) as f64 / 1e9,
        })
    }
}

/// Stable id allocation for root subjects and tools.
#[derive(Default)]
pub struct Ids {
    roots: HashMap<(String, String), u32>,
    next_subject: u32,
    tools: HashMap<String, u32>,
    pub tool_names: HashMap<u32, String>,
    tenants: HashMap<String, u32>,
}

impl Ids {
    pub fn new_subject(&mut self) -> u32 {
        self.next_subject += 1;
        self.next_subject
    }
    fn root(&mut self, tenant: &str, agent: &str) -> u32 {
        if let Some(id) = self.roots.get(&(tenant.to_string(), agent.to_string())) {
            return *id;
        }
        let id = self.new_subject();
        self.roots
            .insert((tenant.to_string(), agent.to_string()), id);
        id
    }
    pub fn tool(&mut self, name: &str) -> u32 {
        let next = self.tools.len() as u32 + 1;
        let id = *self.tools.entry(name.to_string()).or_insert(next);
        self.tool_names.insert(id, name.to_string());
        id
    }
    pub fn tenant(&mut self, name: &str) -> u32 {
        let next = self.tenants.len() as u32 + 1;
        *self.tenants.entry(name.to_string()).or_insert(next)
    }
}

/// A derived subject (task scope, sub-agent, process-tree subject) about
/// to be made under a parent.
#[derive(Debug, Clone)]
pub struct Derive {
    pub name: String,
    pub depth: u8,
    pub requested: Option<BTreeSet<String>>,
    /// Monotonic deadline, 0 = none.
    pub expires: u64,
    pub task: Option<Task>,
    /// `None`: the parent's.
    pub principal: Option<Principal>,
    pub cgroup: CgroupPlan,
}

/// Where a derived subject's processes live.
#[derive(Debug, Clone)]
pub enum CgroupPlan {
    /// A new cgroup under the parent's.
    Make,
    /// A cgroup left by a predecessor daemon (takeover), adopted.
    Existing(PathBuf),
    /// None (the processes stay where they are: process-tree grants).
    None,
}

/// What a launcher asks for (see `control::Request::Register`).
#[derive(Debug, Clone, Default)]
pub struct LaunchRequest {
    pub tenant: Option<String>,
    pub agent: String,
    pub task: Option<String>,
    pub tools: Option<Vec<String>>,
    pub ttl_ms: Option<u64>,
    /// Set for a launch with a signed token: the tree always gets a scope
    /// of its own that carries it.
    pub principal: Option<Principal>,
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl Registry {
    pub fn is_suspended(&self, tenant: &str, agent: &str) -> bool {
        self.suspended.contains(&(tenant.to_string(), None))
            || self
                .suspended
                .contains(&(tenant.to_string(), Some(agent.to_string())))
    }

    fn root_of(&self, tenant: &str, agent: &str) -> Option<Arc<Identity>> {
        self.identities
            .values()
            .find(|i| i.active && i.is_root() && i.tenant == tenant && i.agent == agent)
            .cloned()
    }

    /// Policy tools of a root agent.
    fn policy_tools(&self, tenant: &str, agent: &str) -> BTreeSet<String> {
        self.loaded
            .as_ref()
            .and_then(|l| l.policy.agent(tenant, agent))
            .map(|a| a.tools.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Base tools of a subject: its root's policy tools narrowed by every
    /// requested set on the way down.
    pub fn base_tools(&self, id: u32) -> BTreeSet<String> {
        let Some(ident) = self.identities.get(&id) else {
            return BTreeSet::new();
        };
        let inherited = match ident.parent {
            None => self.policy_tools(&ident.tenant, &ident.agent),
            Some(p) => self.base_tools(p),
        };
        match &ident.requested_tools {
            None => inherited,
            Some(req) => inherited.intersection(req).cloned().collect(),
        }
    }

    /// Tools a subject holds through grants (its own or an ancestor's).
    fn granted_tools(&self, id: u32) -> BTreeSet<String> {
        self.grants
            .values()
            .filter(|g| self.grant_reaches(g, id))
            .map(|g| g.tool.clone())
            .collect()
    }

    /// Does grant `g` reach subject `id`? It reaches the subject it was
    /// given to and every derived subject below it whose requested tools
    /// (if any) include the tool.
    pub fn grant_reaches(&self, g: &Grant, id: u32) -> bool {
        let mut cur = id;
        loop {
            let Some(ident) = self.identities.get(&cur) else {
                return false;
            };
            if !ident.active {
                return false;
            }
            if cur == g.subject_id {
                return true;
            }
            if let Some(req) = &ident.requested_tools
                && !req.contains(&g.tool)
            {
                return false;
            }
            match ident.parent {
                Some(p) => cur = p,
                None => return false,
            }
        }
    }

    /// Everything a subject can use now: base tools and granted tools.
    pub fn current_tools(&self, id: u32) -> BTreeSet<String> {
        let mut t = self.base_tools(id);
        t.extend(self.granted_tools(id));
        t
    }

    /// Kernel keys of a tool: its CIDR endpoints plus the current
    /// addresses of its `host` endpoints. `None` for a tool not in the
    /// policy.
    ///
    /// With per-agent DNS, a `host` endpoint's addresses are those that
    /// `subject` itself resolved through the proxy and whose TTL (plus
    /// grace) has not run out; otherwise the daemon's shared answer.
    pub fn tool_keys(&self, tool: &str, subject: u32) -> Option<Vec<ToolEndpoint>> {
        let loaded = self.loaded.as_ref()?;
        let i = loaded.compiled.tools.iter().position(|t| t == tool)?;
        let mut keys = loaded
            .compiled
            .tool_endpoints
            .get(i)
            .cloned()
            .unwrap_or_default();
        for path in loaded.compiled.tool_unix.get(i).into_iter().flatten() {
            // Every path of the policy has an id (apply_generation).
            if let Some(id) = self.unix_ids.get(path) {
                let k = ToolEndpoint {
                    proto: PROTO_UNIX,
                    port: 0,
                    addr: path_addr(*id),
                    prefix_len: 128,
                };
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
        }
        let now = std::time::Instant::now();
        for h in loaded.compiled.tool_hosts.get(i).into_iter().flatten() {
            let addrs: Vec<std::net::IpAddr> = if self.dns_per_agent {
                self.learned
                    .get(&subject)
                    .and_then(|names| names.get(&h.name.to_ascii_lowercase()))
                    .map(|a| {
                        a.iter()
                            .filter(|(_, until)| **until > now)
                            .map(|(ip, _)| *ip)
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                self.dns.addresses(&h.name)
            };
            for addr in addrs {
                let addr = match addr {
                    std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                    std::net::IpAddr::V6(a) => a.octets(),
                };
                let k = ToolEndpoint {
                    proto: h.proto,
                    port: h.port,
                    addr,
                    prefix_len: 128,
                };
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
        }
        Some(keys)
    }

    /// `CAPS` keys of a subject for `generation`, with the stable tool id.
    pub(super) fn caps_for(&mut self, id: u32, generation: u32) -> Vec<(CapRule, GrantValue)> {
        let tools = self.base_tools(id);
        let Some(loaded) = self.loaded.as_ref() else {
            return Vec::new();
        };
        let mut out: Vec<(CapRule, GrantValue)> = Vec::new();
        let mut wanted = Vec::new();
        for name in &loaded.compiled.tools {
            if tools.contains(name) {
                wanted.push((name.clone(), self.tool_keys(name, id).unwrap_or_default()));
            }
        }
        for (name, endpoints) in wanted {
            let tool_id = self.ids.tool(&name);
            // A tool that needs two-person approval fails closed: the
            // approval flow is not built, so its calls are refused with
            // reason approval_required.
            let needs_approval = self
                .loaded
                .as_ref()
                .and_then(|l| l.policy.tool(&name))
                .is_some_and(|t| t.approval.is_some());
            let value = GrantValue {
                tool_id,
                grant_id: if needs_approval { APPROVAL_REQUIRED } else { 0 },
            };
            for ep in endpoints {
                let rule = CapRule {
                    subject: id,
                    generation: generation as u8,
                    proto: ep.proto,
                    port: ep.port,
                    addr: ep.addr,
                    prefix_len: ep.prefix_len,
                };
                // First tool listed wins a shared endpoint.
                if !out.iter().any(|(r, _)| *r == rule) {
                    out.push((rule, value));
                }
            }
        }
        out
    }

    /// The kernel's view of a subject.
    pub fn kernel_subject(&mut self, ident: &Identity) -> Subject {
        let mut flags = 0;
        if self.is_suspended(&ident.tenant, &ident.agent) {
            flags |= FLAG_SUSPENDED;
        }
        if self.revoked_in_chain(ident.subject_id) {
            flags |= FLAG_REVOKED;
        }
        Subject {
            tenant_id: self.ids.tenant(&ident.tenant),
            agent_id: ident.root_id,
            parent: ident.parent.unwrap_or(0),
            depth: ident.depth,
            mode: if ident.mode == Mode::Monitor {
                MODE_MONITOR
            } else {
                MODE_ENFORCE
            },
            flags,
            _pad: 0,
            expires_at_ns: ident.expires_at_ns,
        }
    }

    /// The outermost ancestor of `id` (or `id` itself) that is scoped (a
    /// task or narrowed tools).
    pub fn scope_root(&self, id: u32) -> u32 {
        let mut best = id;
        let mut cur = id;
        for _ in 0..64 {
            let Some(ident) = self.identities.get(&cur) else {
                break;
            };
            if ident.requested_tools.is_some() || ident.task.is_some() {
                best = cur;
            }
            match ident.parent {
                Some(p) => cur = p,
                None => break,
            }
        }
        best
    }

    /// Is `id` or any of its ancestors revoked (on_divergence)?
    pub fn revoked_in_chain(&self, id: u32) -> bool {
        let mut cur = Some(id);
        for _ in 0..64 {
            let Some(c) = cur else { return false };
            if self.revoked_subjects.contains(&c) {
                return true;
            }
            cur = self.identities.get(&c).and_then(|i| i.parent);
        }
        true
    }

    /// Active subjects derived (transitively) from `id`, `id` included.
    pub fn subtree(&self, id: u32) -> Vec<u32> {
        let mut out = vec![id];
        let mut i = 0;
        while i < out.len() {
            let cur = out[i];
            out.extend(
                self.identities
                    .values()
                    .filter(|x| x.active && x.parent == Some(cur))
                    .map(|x| x.subject_id),
            );
            i += 1;
        }
        out
    }
}

impl State {
    /// Validates and installs `policy` as the next generation, then flips.
    ///
    /// New `CAPS` entries go in beside the old ones under the next
    /// generation number; one write of `CONFIG` switches every subject at
    /// once; then the old generation's entries are deleted. So no call is
    /// allowed that neither policy allows, and none allowed by both is
    /// refused during the switch. Subjects whose agent left the policy lose
    /// their `SUBJECTS` entry, so their processes fail closed.
    pub fn apply_policy(&self, policy: Policy, text: &str) -> anyhow::Result<u32> {
        self.apply_generation(policy, text, None)
    }

    /// Re-installs the current policy as a new generation, e.g. after a
    /// tool host's addresses changed; `why` goes into the audit record.
    pub fn rebuild(&self, why: &str) -> anyhow::Result<u32> {
        let (policy, text) = {
            let reg = self.registry();
            let Some(l) = reg.loaded.as_ref() else {
                anyhow::bail!("no policy loaded")
            };
            (l.policy.clone(), l.text.clone())
        };
        self.apply_generation(policy, &text, Some(why))
    }

    fn apply_generation(
        &self,
        policy: Policy,
        text: &str,
        why: Option<&str>,
    ) -> anyhow::Result<u32> {
        let compiled = policy.compile()?;
        let mut reg = self.registry();
        let generation = reg.loaded.as_ref().map_or(1, |l| l.generation + 1);
        let hash = sha256_hex(text);
        let origin = policy.origin.clone();

        // Root subjects of the new policy; their cgroups first, so nothing
        // reaches the kernel if one cannot be made.
        let mut roots = Vec::new();
        for agent in &compiled.agents {
            let id = reg.ids.root(&agent.tenant, &agent.name);
            let cgroup_dir = self.cgroup_root.join(&agent.tenant).join(&agent.name);
            if !cgroup_dir.exists() {
                kfs::ensure_cgroup_dir(&self.cgroup_mount, &cgroup_dir)?;
                self.created_cgroup(cgroup_dir.clone());
            }
            let cgroup_id = kfs::cgroup_id(&cgroup_dir)?;
            roots.push((
                Identity {
                    subject_id: id,
                    root_id: id,
                    parent: None,
                    depth: 0,
                    tenant: agent.tenant.clone(),
                    agent: agent.name.clone(),
                    chain: format!("{}/{}", agent.tenant, agent.name),
                    mode: agent.mode,
                    hardening: agent.hardening,
                    cgroup_dir,
                    requested_tools: None,
                    expires_at_ns: 0,
                    task: None,
                    principal: None,
                    active: true,
                    created: None,
                },
                cgroup_id,
            ));
        }
        let names: BTreeSet<String> = compiled
            .tool_hosts
            .iter()
            .flatten()
            .map(|h| h.name.clone())
            .collect();
        // Unix socket addresses get path ids before the flip; ids of paths
        // the new policy drops are removed after it.
        let unix_paths: BTreeSet<Vec<u8>> = compiled.tool_unix.iter().flatten().cloned().collect();
        // What a failure before the flip must put back. Not `next_unix_id`:
        // an id is never given out twice, also after a failed apply (a call
        // may have been recorded under it meanwhile).
        let undo = (
            reg.identities.clone(),
            reg.dns.clone(),
            reg.unix_ids.clone(),
        );
        reg.dns.set_names(names, std::time::Instant::now());
        let mut new_unix = Vec::new();
        for p in &unix_paths {
            if !reg.unix_ids.contains_key(p) {
                reg.next_unix_id += 1;
                let id = reg.next_unix_id;
                reg.unix_ids.insert(p.clone(), id);
                reg.unix_names.insert(id, p.clone());
                new_unix.push((p.clone(), id));
            }
        }
        let old = reg.loaded.replace(Loaded {
            policy,
            text: text.to_string(),
            compiled,
            generation,
            hash: hash.clone(),
            origin: origin.clone(),
        });

        // The new identity table: roots replaced, derived subjects kept
        // (with their root's new mode) while their root stays.
        let keep_roots: BTreeSet<u32> = roots.iter().map(|(i, _)| i.subject_id).collect();
        let mut retired = Vec::new();
        let derived: Vec<Arc<Identity>> = reg
            .identities
            .values()
            .filter(|i| !i.is_root() && i.active)
            .cloned()
            .collect();
        for (ident, _) in &roots {
            reg.identities
                .insert(ident.subject_id, Arc::new(ident.clone()));
        }
        let root_ids: Vec<u32> = reg
            .identities
            .values()
            .filter(|i| i.is_root())
            .map(|i| i.subject_id)
            .collect();
        for id in root_ids {
            if !keep_roots.contains(&id)
                && let Some(ident) = reg.identities.get(&id).cloned()
                && ident.active
            {
                let mut r = (*ident).clone();
                r.active = false;
                reg.identities.insert(id, Arc::new(r));
                retired.push(id);
            }
        }
        for ident in derived {
            let root = reg.identities.get(&ident.root_id).cloned();
            let mut d = (*ident).clone();
            match root {
                Some(r) if r.active => {
                    d.mode = r.mode;
                    d.hardening = r.hardening;
                }
                _ => {
                    d.active = false;
                    retired.push(d.subject_id);
                }
            }
            reg.identities.insert(d.subject_id, Arc::new(d));
        }

        let active: Vec<Arc<Identity>> = reg
            .identities
            .values()
            .filter(|i| i.active)
            .cloned()
            .collect();
        let mut new_caps: HashMap<u32, Vec<CapRule>> = HashMap::new();
        let mut all_caps = Vec::new();
        for ident in &active {
            let caps = reg.caps_for(ident.subject_id, generation);
            new_caps.insert(ident.subject_id, caps.iter().map(|(r, _)| *r).collect());
            all_caps.extend(caps);
        }
        let subjects: Vec<(u32, Subject)> = active
            .iter()
            .map(|i| (i.subject_id, reg.kernel_subject(i)))
            .collect();
        let limits: Vec<(u32, Option<ToolLimit>)> = {
            let loaded = reg.loaded.as_ref().map(|l| {
                l.compiled
                    .tools
                    .iter()
                    .cloned()
                    .zip(l.compiled.tool_limits.iter().cloned())
                    .collect::<Vec<_>>()
            });
            loaded
                .unwrap_or_default()
                .into_iter()
                .map(|(name, limit)| {
                    let id = reg.ids.tool(&name);
                    let l = limit.map(|(calls, per)| ToolLimit {
                        calls,
                        _pad: 0,
                        per_ns: u64::try_from(per.as_nanos()).unwrap_or(u64::MAX),
                    });
                    (id, l)
                })
                .collect()
        };

        let mut kernel = self.kernel();
        let mut installed = Vec::new();
        let mut installed_paths = Vec::new();
        let mut failed = None;
        for (path, id) in &new_unix {
            let key = UnixPath::new(path)
                .ok_or_else(|| anyhow::anyhow!("unix path {path:?} does not fit sun_path"));
            match key.and_then(|k| Ok(kernel.insert_unix_path(&k, *id).map(|()| k)?)) {
                Ok(k) => installed_paths.push(k),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if failed.is_none() {
            for (rule, value) in &all_caps {
                if let Err(e) = kernel.insert_cap(rule, *value) {
                    failed = Some(e.into());
                    break;
                }
                installed.push(*rule);
            }
        }
        // What loosens (monitor mode, a laxer or no rate limit) is written
        // before the flip and what tightens after it, so during the switch
        // nothing is refused that both policies allow.
        // Until the flip, a failure rolls this generation back: the old one
        // stays in force and no new entry is left behind.
        let before_flip = match failed {
            Some(e) => Err(e),
            None => (|| -> Result<_, crate::kernel::KernelError> {
                let mut tighten_subjects = Vec::new();
                for (id, s) in &subjects {
                    let stricter = s.mode == MODE_ENFORCE
                        && kernel
                            .subject(*id)
                            .is_some_and(|old| old.mode == MODE_MONITOR);
                    if stricter {
                        tighten_subjects.push((*id, *s));
                    } else {
                        kernel.set_subject(*id, *s)?;
                    }
                }
                let mut tighten_limits = Vec::new();
                for (tool_id, limit) in limits {
                    if looser_or_equal(kernel.tool_limit(tool_id), limit) {
                        kernel.set_tool_limit(tool_id, limit)?;
                    } else {
                        tighten_limits.push((tool_id, limit));
                    }
                }
                for (ident, cgroup_id) in &roots {
                    kernel.tag_cgroup(*cgroup_id, ident.subject_id)?;
                }
                kernel.set_config(Config {
                    generation,
                    wakeup_bytes: self.ring_bytes / WAKEUP_DIVISOR,
                    // Filled in by set_config.
                    unix_uaddr_off: 0,
                    unix_uaddrlen_off: 0,
                    dns_proxy_port: 0,
                    _pad: 0,
                })?;
                Ok((tighten_subjects, tighten_limits))
            })()
            .map_err(anyhow::Error::from),
        };
        let (tighten_subjects, tighten_limits) = match before_flip {
            Ok(t) => t,
            Err(e) => {
                // Roll back this generation; the old one is still in force.
                for r in &installed {
                    kernel.remove_cap(r);
                }
                for k in &installed_paths {
                    kernel.remove_unix_path(k);
                }
                drop(kernel);
                reg.loaded = old;
                for (_, id) in &new_unix {
                    reg.retire_unix_id(*id);
                }
                (reg.identities, reg.dns, reg.unix_ids) = undo;
                return Err(e);
            }
        };
        for (id, s) in tighten_subjects {
            kernel.set_subject(id, s)?;
        }
        for (tool_id, limit) in tighten_limits {
            kernel.set_tool_limit(tool_id, limit)?;
        }
        for rules in reg.caps.values() {
            for r in rules {
                kernel.remove_cap(r);
            }
        }
        for id in &retired {
            let _ = kernel.remove_subject(*id);
        }
        let gone: Vec<Vec<u8>> = reg
            .unix_ids
            .keys()
            .filter(|p| !unix_paths.contains(*p))
            .cloned()
            .collect();
        for p in gone {
            if let Some(k) = UnixPath::new(&p) {
                kernel.remove_unix_path(&k);
            }
            if let Some(id) = reg.unix_ids.remove(&p) {
                reg.retire_unix_id(id);
            }
        }
        drop(kernel);
        reg.caps = new_caps;
        // Grants follow the new tool definitions.
        let grant_ids: Vec<u32> = reg.grants.keys().copied().collect();
        drop(reg);
        for id in grant_ids {
            if let Err(e) = self.reinstall_grant(id) {
                tracing::warn!(grant = id, "grant after reload: {e}");
            }
        }

        let mut rec = AuditRecord::new(if why.is_some() { "dns" } else { "policy" });
        match why {
            Some(w) => rec.detail = Some(format!("generation {generation}: {w}")),
            None => {
                self.metrics.policy_reloads.with_label_values(&["ok"]).inc();
                rec.detail = Some(format!("generation {generation} from {origin}"));
            }
        }
        rec.policy_hash = Some(hash);
        self.audit(NODE_LOG, rec);
        self.sync_dns_proxy();
        Ok(generation)
    }

    fn unknown_identity(reg: &Registry, tenant: &str, agent: &str) -> String {
        let mut known: Vec<&str> = reg
            .identities
            .values()
            .filter(|i| i.active && i.is_root())
            .map(|i| i.chain.as_str())
            .collect();
        known.sort_unstable();
        let tenant_known = reg
            .identities
            .values()
            .any(|i| i.active && i.tenant == tenant);
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

    /// Tags `pid` (the peer of the control connection) before the launcher
    /// execs: as a root agent, a task scope of one, or (from inside a tagged
    /// process) a sub-agent of the caller. Never wider than the caller.
    ///
    /// `caller` is the subject the peer was judged under, looked up by the
    /// control server while it proved the peer alive (see server.rs).
    pub fn register(
        &self,
        pid: u32,
        req: &LaunchRequest,
        caller: Option<u32>,
    ) -> Result<Registration, String> {
        let mut reg = self.registry();
        let now = mono_now_ns();
        let ttl_ns = req.ttl_ms.map(|ms| ms.saturating_mul(1_000_000));
        let wants_scope = req.task.is_some()
            || req.tools.is_some()
            || ttl_ns.is_some()
            || req.principal.is_some();

        let (parent, name, depth) = match caller {
            None => {
                let tenant = req
                    .tenant
                    .as_deref()
                    .ok_or("--tenant is required outside an agent")?;
                let root = reg
                    .root_of(tenant, &req.agent)
                    .ok_or_else(|| Self::unknown_identity(&reg, tenant, &req.agent))?;
                if !wants_scope {
                    drop(reg);
                    return self.tag(pid, &root, None);
                }
                (root, "task".to_string(), 0)
            }
            Some(subject) => {
                let parent = reg.identities.get(&subject).cloned().filter(|i| i.active).ok_or(
                    "refused: this process is tagged with a subject that is no longer in force; it can start nothing",
                )?;
                if reg.revoked_in_chain(parent.subject_id) {
                    return Err(format!(
                        "refused: the capabilities of {} were revoked (on_divergence); it can start nothing",
                        parent.chain
                    ));
                }
                if let Some(t) = &req.tenant
                    && *t != parent.tenant
                {
                    return Err(format!(
                        "refused: this process belongs to tenant {:?} ({}); a tagged process can never change tenant",
                        parent.tenant, parent.chain
                    ));
                }
                if req.agent == parent.name() && !wants_scope {
                    drop(reg);
                    return self.tag(pid, &parent, None);
                }
                check_name("sub-agent", &req.agent).map_err(|e| format!("refused: {e}"))?;
                let max = reg
                    .loaded
                    .as_ref()
                    .and_then(|l| {
                        l.compiled
                            .agents
                            .iter()
                            .find(|a| a.tenant == parent.tenant && a.name == parent.agent)
                    })
                    .map_or(0, |a| a.max_delegation_depth);
                let depth = parent.depth + 1;
                if depth > max {
                    return Err(format!(
                        "refused: sub-agent {:?} would be at delegation depth {depth}, but agent {}/{} allows at most {max}",
                        req.agent, parent.tenant, parent.agent
                    ));
                }
                let name = req.agent.clone();
                (parent, name, depth)
            }
        };

        // The narrowed tool set: a subset of what the parent holds now.
        let have = reg.current_tools(parent.subject_id);
        let requested = match &req.tools {
            None => None,
            Some(list) => {
                let set: BTreeSet<String> = list.iter().cloned().collect();
                if let Some(missing) = set.iter().find(|t| !have.contains(*t)) {
                    return Err(format!(
                        "refused: tool {missing:?} is not in the capability set of {} (it has: {})",
                        parent.chain,
                        have.iter().cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
                Some(set)
            }
        };
        let mut expires = ttl_ns.map_or(0, |t| now.saturating_add(t));
        if parent.expires_at_ns != 0 && (expires == 0 || expires > parent.expires_at_ns) {
            expires = parent.expires_at_ns;
        }
        let task = match &req.task {
            Some(text) => {
                let id = format!("t{:x}-{}", self.started_unix(), reg.next_task);
                reg.next_task += 1;
                Some(Task {
                    id,
                    text: text.clone(),
                })
            }
            None => parent.task.clone(),
        };
        let is_task = depth == parent.depth;
        let ident = self.install_derived(
            reg,
            &parent,
            Derive {
                name,
                depth,
                requested,
                expires,
                task,
                principal: req.principal.clone(),
                cgroup: CgroupPlan::Make,
            },
        )?;
        let id = ident.subject_id;
        let mut rec = AuditRecord::new(if is_task { "task" } else { "delegate" });
        rec.tenant = Some(ident.tenant.clone());
        rec.agent = Some(ident.agent.clone());
        rec.subject = Some(ident.chain.clone());
        rec.pid = Some(pid);
        rec.task = ident.task.as_ref().map(|t| t.text.clone());
        rec.task_id = ident.task.as_ref().map(|t| t.id.clone());
        rec.on_behalf_of = ident
            .principal
            .as_ref()
            .and_then(|p| p.on_behalf_of.clone());
        rec.jti = ident.principal.as_ref().map(|p| p.jti.clone());
        rec.detail = Some(format!(
            "subject {id} under {}: tools {}, depth {depth}{}",
            parent.chain,
            ident
                .requested_tools
                .as_ref()
                .map_or("(all of the parent's)".to_string(), |t| t
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(",")),
            if ident.expires_at_ns != 0 {
                format!(
                    ", expires in {}s",
                    (ident.expires_at_ns - now) / 1_000_000_000
                )
            } else {
                String::new()
            }
        ));
        self.audit(&ident.tenant, rec);
        self.tag(pid, &ident, ident.task.clone())
    }

    /// Creates a subject under `parent` and writes its kernel image: its
    /// `CAPS` keys, `SUBJECTS` entry, cgroup (when `cgroup`) and the copies
    /// of its ancestors' grants that reach it.
    pub(super) fn install_derived(
        &self,
        mut reg: std::sync::MutexGuard<'_, Registry>,
        parent: &Identity,
        spec: Derive,
    ) -> Result<Identity, String> {
        let Derive {
            name,
            depth,
            requested,
            expires,
            task,
            principal,
            cgroup,
        } = spec;
        let id = reg.ids.new_subject();
        let is_task = depth == parent.depth;
        let chain = if is_task {
            parent.chain.clone()
        } else {
            format!("{}/{}", parent.chain, name)
        };
        let cgroup_dir = match &cgroup {
            CgroupPlan::Existing(dir) => dir.clone(),
            CgroupPlan::Make | CgroupPlan::None => parent.cgroup_dir.join(if is_task {
                format!("task-{id}")
            } else {
                format!("{name}-{id}")
            }),
        };
        let ident = Identity {
            subject_id: id,
            root_id: parent.root_id,
            parent: Some(parent.subject_id),
            depth,
            tenant: parent.tenant.clone(),
            agent: parent.agent.clone(),
            chain,
            mode: parent.mode,
            hardening: parent.hardening,
            cgroup_dir,
            requested_tools: requested,
            expires_at_ns: expires,
            task,
            principal: principal.or_else(|| parent.principal.clone()),
            active: true,
            created: Some(std::time::Instant::now()),
        };
        reg.identities.insert(id, Arc::new(ident.clone()));
        let generation = reg.loaded.as_ref().map_or(0, |l| l.generation);
        let caps = reg.caps_for(id, generation);
        let subject = reg.kernel_subject(&ident);
        reg.caps.insert(id, caps.iter().map(|(r, _)| *r).collect());
        let grants: Vec<u32> = reg
            .grants
            .values()
            .filter(|g| reg.grant_reaches(g, id))
            .map(|g| g.id)
            .collect();

        let made_cgroup = match cgroup {
            CgroupPlan::Make => {
                let ok = kfs::ensure_cgroup_dir(&self.cgroup_mount, &ident.cgroup_dir).is_ok();
                if ok {
                    self.created_cgroup(ident.cgroup_dir.clone());
                }
                ok
            }
            // A predecessor's cgroup, adopted: removed at retirement too.
            CgroupPlan::Existing(_) => {
                let ok = ident.cgroup_dir.is_dir();
                if ok {
                    self.created_cgroup(ident.cgroup_dir.clone());
                }
                ok
            }
            CgroupPlan::None => false,
        };
        // The kernel image is written while the registry is still held, so
        // a reload cannot flip generations (and clean up) in between and
        // leave this subject with stale entries.
        let written = {
            let mut kernel = self.kernel();
            let mut installed = Vec::new();
            let mut result = Ok(());
            for (rule, value) in &caps {
                if let Err(e) = kernel.insert_cap(rule, *value) {
                    result = Err(e.to_string());
                    break;
                }
                installed.push(*rule);
            }
            if result.is_ok() {
                result = kernel.set_subject(id, subject).map_err(|e| e.to_string());
            }
            if result.is_ok()
                && made_cgroup
                && let Ok(cg) = kfs::cgroup_id(&ident.cgroup_dir)
            {
                result = kernel.tag_cgroup(cg, id).map_err(|e| e.to_string());
            }
            if result.is_err() {
                for r in &installed {
                    kernel.remove_cap(r);
                }
                let _ = kernel.remove_subject(id);
            }
            result
        };
        if let Err(e) = written {
            let mut gone = ident.clone();
            gone.active = false;
            reg.identities.insert(id, Arc::new(gone));
            reg.caps.remove(&id);
            return Err(format!("installing subject {id}: {e}"));
        }
        drop(reg);
        for g in grants {
            self.reinstall_grant(g).map_err(|e| e.to_string())?;
        }
        Ok(ident)
    }

    /// Retires derived subjects whose processes are all gone (no `PROCS`
    /// entry, empty cgroup, no live child subject) and that are older than
    /// `min_age`: their kernel entries and cgroup are removed, so task and
    /// sub-agent launches do not fill the maps over time. The identity stays
    /// (inactive) for enrichment of late records.
    pub fn retire_idle_subjects(&self, min_age: std::time::Duration) -> usize {
        self.forget_retired(min_age.saturating_mul(RETIRED_KEEP_FACTOR));
        let in_use: BTreeSet<u32> = self
            .kernel()
            .processes()
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        let mut reg = self.registry();
        let parents: BTreeSet<u32> = reg
            .identities
            .values()
            .filter(|i| i.active)
            .filter_map(|i| i.parent)
            .collect();
        let idle: Vec<Arc<Identity>> = reg
            .identities
            .values()
            .filter(|i| {
                i.active
                    && !i.is_root()
                    && i.created.is_some_and(|c| c.elapsed() >= min_age)
                    && !in_use.contains(&i.subject_id)
                    && !parents.contains(&i.subject_id)
                    && std::fs::read_to_string(i.cgroup_dir.join("cgroup.procs"))
                        .map_or(true, |p| p.trim().is_empty())
            })
            .cloned()
            .collect();
        if idle.is_empty() {
            return 0;
        }
        let mut caps = Vec::new();
        for ident in &idle {
            let mut r = (**ident).clone();
            r.active = false;
            reg.identities.insert(r.subject_id, Arc::new(r));
            caps.extend(reg.caps.remove(&ident.subject_id).unwrap_or_default());
            reg.divergences.remove(&ident.subject_id);
            reg.learned.remove(&ident.subject_id);
        }
        let grants: Vec<u32> = reg.grants.keys().copied().collect();
        drop(reg);
        {
            let mut kernel = self.kernel();
            for r in &caps {
                kernel.remove_cap(r);
            }
            for ident in &idle {
                let _ = kernel.remove_subject(ident.subject_id);
                if let Ok(cg) = kfs::cgroup_id(&ident.cgroup_dir) {
                    kernel.untag_cgroup(cg);
                }
            }
        }
        {
            // Only cgroups this daemon made (or adopted at a takeover) go,
            // and leave its list, so neither grows with every launch.
            let mut made = self
                .created_cgroups
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for ident in &idle {
                if let Some(at) = made.iter().position(|d| *d == ident.cgroup_dir) {
                    made.swap_remove(at);
                    let _ = std::fs::remove_dir(&ident.cgroup_dir);
                }
            }
        }
        {
            // Retired identities stay a while for late records, then go.
            let mut reg = self.registry();
            let now = std::time::Instant::now();
            reg.retired.extend(idle.iter().map(|i| (i.subject_id, now)));
        }
        // Grant keys of retired subjects go with the grants' next install.
        for g in grants {
            let _ = self.reinstall_grant(g);
        }
        self.sync_dns_proxy();
        idle.len()
    }

    /// Drops identities retired more than `keep` ago (still inactive): a
    /// record that late is enriched as an unknown subject instead.
    fn forget_retired(&self, keep: std::time::Duration) {
        let mut reg = self.registry();
        while let Some(&(id, at)) = reg.retired.front() {
            if at.elapsed() < keep {
                break;
            }
            reg.retired.pop_front();
            if reg.identities.get(&id).is_some_and(|i| !i.active) {
                reg.identities.remove(&id);
            }
        }
    }

    /// Moves `pid`, its threads and its descendants that share its subject
    /// to a new subject of their own (for a process-tree grant); returns it.
    pub fn derive_for_process(&self, pid: u32) -> Result<u32, String> {
        let current = self
            .process_subject(pid)
            .ok_or_else(|| format!("process {pid} is not tagged"))?;
        let reg = self.registry();
        let parent = reg
            .identities
            .get(&current)
            .cloned()
            .filter(|i| i.active)
            .ok_or_else(|| format!("process {pid} has a subject that is no longer in force"))?;
        let ident = self.install_derived(
            reg,
            &parent,
            Derive {
                name: format!("pid-{pid}"),
                depth: parent.depth,
                requested: None,
                expires: parent.expires_at_ns,
                task: parent.task.clone(),
                principal: None,
                cgroup: CgroupPlan::None,
            },
        )?;
        let mut kernel = self.kernel();
        for (p, s) in kernel.processes() {
            if s == current && is_in_tree(p, pid) {
                kernel
                    .tag_process(p, ident.subject_id)
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(ident.subject_id)
    }

    /// Writes `PROCS[pid]` and moves the process into the subject's cgroup.
    fn tag(&self, pid: u32, ident: &Identity, task: Option<Task>) -> Result<Registration, String> {
        self.kernel()
            .tag_process(pid, ident.subject_id)
            .map_err(|e| format!("tagging pid {pid}: {e}"))?;
        let _ = self.audit_tx.send(PipelineMsg::Launched {
            pid,
            ppid: ppid_of(pid),
        });
        if let Err(e) = kfs::move_to_cgroup(&ident.cgroup_dir, pid) {
            // The pid anchor holds on its own; the cgroup is the second one.
            tracing::warn!(pid, "could not move into agent cgroup: {e}");
        }
        tracing::info!(pid, subject = %ident.chain, id = ident.subject_id, "registered process");
        Ok(Registration {
            subject: ident.chain.clone(),
            subject_id: ident.subject_id,
            hardening: ident.hardening,
            mode: ident.mode,
            cgroup: ident.cgroup_dir.display().to_string(),
            task_id: task.map(|t| t.id),
            daemon_pid: std::process::id(),
            daemon_tids: own_tids(),
            procs_pin: Some(self.procs_pin.display().to_string()),
        })
    }

    fn started_unix(&self) -> u64 {
        let elapsed = self.started.elapsed().as_secs();
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs().saturating_sub(elapsed))
    }

    /// Rewrites one subject's `SUBJECTS` entry from the registry.
    pub fn rewrite_subjects(&self, ids: &[u32]) -> Result<(), String> {
        let mut reg = self.registry();
        let mut out = Vec::new();
        for id in ids {
            if let Some(ident) = reg.identities.get(id).cloned()
                && ident.active
            {
                out.push((*id, reg.kernel_subject(&ident)));
            }
        }
        drop(reg);
        let mut kernel = self.kernel();
        for (id, s) in out {
            kernel.set_subject(id, s).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Is `p` (a process or thread id) `root` itself, a thread of it, or a
/// descendant? Walks parent links in /proc (bounded).
fn is_in_tree(p: u32, root: u32) -> bool {
    let tgid = std::fs::read_to_string(format!("/proc/{p}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Tgid:")
                    .and_then(|v| v.trim().parse::<u32>().ok())
            })
        })
        .unwrap_or(p);
    let mut cur = tgid;
    for _ in 0..64 {
        if cur == root {
            return true;
        }
        match ppid_of(cur) {
            Some(pp) if pp > 1 => cur = pp,
            _ => return false,
        }
    }
    false
}

/// Does `new` allow at least as many calls per unit of time as `old`?
fn looser_or_equal(old: Option<ToolLimit>, new: Option<ToolLimit>) -> bool {
    match (old, new) {
        (_, None) => true,
        (None, Some(_)) => false,
        // calls_new / per_new >= calls_old / per_old, in u128 to avoid overflow.
        (Some(o), Some(n)) => {
            u128::from(n.calls) * u128::from(o.per_ns) >= u128::from(o.calls) * u128::from(n.per_ns)
        }
    }
}

/// The daemon's thread ids (its tokio workers are fixed at start; it uses
/// no blocking pool, so no threads appear later).
fn own_tids() -> Vec<u32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(calls: u32, per_ms: u64) -> Option<ToolLimit> {
        Some(ToolLimit {
            calls,
            _pad: 0,
            per_ns: per_ms * 1_000_000,
        })
    }

    #[test]
    fn a_limit_is_loosened_before_the_flip_and_tightened_after() {
        assert!(
            looser_or_equal(limit(10, 1000), None),
            "dropping a limit loosens"
        );
        assert!(
            !looser_or_equal(None, limit(10, 1000)),
            "adding one tightens"
        );
        assert!(looser_or_equal(limit(10, 1000), limit(20, 1000)));
        assert!(looser_or_equal(limit(10, 1000), limit(10, 1000)));
        assert!(
            !looser_or_equal(limit(10, 1000), limit(10, 2000)),
            "same calls over a longer window is stricter"
        );
        assert!(
            looser_or_equal(limit(10, 1000), limit(600, 60_000)),
            "10/s == 600/min"
        );
    }
}
