//! Just-in-time grants, revocation, suspension and divergence handling.
//!
//! A grant's life (expiry, uses, revoked) is one `GRANT_STATE` entry that
//! every kernel key of the grant points at, so expiry is enforced by the
//! kernel at call time and a revoke is a single map write.

use std::{collections::HashMap, sync::Arc};

use agent_guard_common::grant::{
    GRANT_LIMITED_USES, GRANT_REVOKED, GRANT_SLOTS, GrantSlots, GrantState,
};

use super::{
    state::{Registry, State, mono_now_ns},
    subjects::Grant,
};
use crate::{
    audit::{AuditRecord, format_ts},
    kernel::{KernelMaps, maps::CapRule},
    policy::DivergenceAction,
};

/// A grant about to be made, for a subject already chosen.
#[derive(Debug, Clone)]
pub struct NewGrant {
    pub tenant: String,
    pub agent: String,
    pub tool: String,
    pub subject_id: u32,
    pub ttl_ms: u64,
    pub uses: Option<u32>,
    pub pid: Option<u32>,
    /// Why it was made, when not by `agent-guard grant` (recorded).
    pub why: Option<String>,
    /// Set when a takeover restores a predecessor's grant as it was.
    pub restore: Option<RestoredGrant>,
}

/// A predecessor's grant, restored with its id, deadline and uses left.
#[derive(Debug, Clone)]
pub struct RestoredGrant {
    pub id: u32,
    pub expires_at_ns: u64,
    /// Uses left as the old kernel counted them.
    pub uses_left: Option<i64>,
    pub created: String,
}

/// What `agent-guard grant` asks for.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    pub tenant: String,
    pub agent: String,
    pub tool: String,
    pub ttl_ms: u64,
    pub uses: Option<u32>,
    pub pid: Option<u32>,
}

impl State {
    fn grant_record(&self, kind: &str, g: &Grant, reason: Option<&str>, detail: String) {
        let mut rec = AuditRecord::new(kind);
        rec.tenant = Some(g.tenant.clone());
        rec.agent = Some(g.agent.clone());
        rec.subject = self.identity(g.subject_id).map(|i| i.chain.clone());
        rec.tool = Some(g.tool.clone());
        rec.grant = Some(g.id.to_string());
        rec.pid = g.pid;
        rec.reason = reason.map(str::to_string);
        rec.detail = Some(detail);
        self.audit(&g.tenant, rec);
    }

    /// Creates a grant and returns it once the kernel enforces it.
    pub fn grant(&self, req: &GrantRequest) -> Result<Grant, String> {
        if req.ttl_ms == 0 {
            return Err("--ttl must be longer than zero".into());
        }
        if req.uses == Some(0) {
            return Err("--uses must be at least 1".into());
        }
        let mut reg = self.registry();
        let known_tool = reg
            .loaded
            .as_ref()
            .is_some_and(|l| l.compiled.tools.contains(&req.tool));
        if !known_tool {
            let tools = reg
                .loaded
                .as_ref()
                .map(|l| l.compiled.tools.join(", "))
                .unwrap_or_default();
            return Err(format!(
                "unknown tool {:?} (known tools: {tools})",
                req.tool
            ));
        }
        let needs_approval = reg
            .loaded
            .as_ref()
            .and_then(|l| l.policy.tool(&req.tool))
            .is_some_and(|t| t.approval.is_some());
        if needs_approval {
            return Err(format!(
                "tool {:?} needs two-person approval: an agent's call to it opens a request (`agent-guard approvals list`), and two approvers' `agent-guard approve ID` grant it",
                req.tool
            ));
        }
        let root = reg
            .identities
            .values()
            .find(|i| i.active && i.is_root() && i.tenant == req.tenant && i.agent == req.agent)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "unknown agent {}/{} in the current policy",
                    req.tenant, req.agent
                )
            })?;
        // --pid: the process (and its tree) gets a subject of its own, so
        // the grant reaches it and nothing else of the agent.
        let subject_id = match req.pid {
            None => root.subject_id,
            Some(pid) => {
                drop(reg);
                let current = self
                    .process_subject(pid)
                    .ok_or_else(|| format!("process {pid} is not tagged"))?;
                let ident = self
                    .identity(current)
                    .ok_or_else(|| format!("process {pid} has an unknown subject"))?;
                if ident.root_id != root.subject_id {
                    return Err(format!(
                        "process {pid} is {}, not an agent of {}/{}",
                        ident.chain, req.tenant, req.agent
                    ));
                }
                let s = self.derive_for_process(pid)?;
                reg = self.registry();
                s
            }
        };
        drop(reg);
        self.issue_grant(&NewGrant {
            tenant: req.tenant.clone(),
            agent: req.agent.clone(),
            tool: req.tool.clone(),
            subject_id,
            ttl_ms: req.ttl_ms,
            uses: req.uses,
            pid: req.pid,
            why: None,
            restore: None,
        })
    }

    /// Creates grant `g` for its subject and returns it once the kernel
    /// enforces it (state first, then keys), with a `grant` record.
    pub(super) fn issue_grant(&self, n: &NewGrant) -> Result<Grant, String> {
        let mut reg = self.registry();
        let id = match &n.restore {
            Some(r) => {
                reg.next_grant = reg.next_grant.max(r.id + 1);
                r.id
            }
            None => {
                let id = reg.next_grant;
                reg.next_grant += 1;
                id
            }
        };
        let now = mono_now_ns();
        let g = Grant {
            id,
            tenant: n.tenant.clone(),
            agent: n.agent.clone(),
            tool: n.tool.clone(),
            subject_id: n.subject_id,
            expires_at_ns: n.restore.as_ref().map_or_else(
                || now.saturating_add(n.ttl_ms.saturating_mul(1_000_000)),
                |r| r.expires_at_ns,
            ),
            uses: n.uses,
            pid: n.pid,
            created: n.restore.as_ref().map_or_else(
                || format_ts(time::OffsetDateTime::now_utc()),
                |r| r.created.clone(),
            ),
            entries: Vec::new(),
        };
        reg.grants.insert(id, g.clone());
        drop(reg);
        let state = GrantState {
            expires_at_ns: g.expires_at_ns,
            uses_left: n
                .restore
                .as_ref()
                .and_then(|r| r.uses_left)
                .unwrap_or(i64::from(g.uses.unwrap_or(0))),
            flags: if g.uses.is_some() {
                GRANT_LIMITED_USES
            } else {
                0
            },
            _pad: 0,
        };
        if let Err(e) = self.kernel().set_grant_state(id, state) {
            self.registry().grants.remove(&id);
            return Err(e.to_string());
        }
        if let Err(e) = self.reinstall_grant(id) {
            self.drop_grant(id);
            return Err(e);
        }
        self.grant_record(
            "grant",
            &g,
            n.restore.as_ref().map(|_| "restored"),
            format!(
                "ttl {}{}{}{}",
                humantime::format_duration(std::time::Duration::from_millis(match &n.restore {
                    // Whole seconds left of a restored grant.
                    Some(_) => g.expires_at_ns.saturating_sub(now) / 1_000_000_000 * 1000,
                    None => n.ttl_ms,
                })),
                g.uses.map_or(String::new(), |u| format!(", {u} uses")),
                g.pid
                    .map_or(String::new(), |p| format!(", process tree of pid {p}")),
                n.why.as_deref().map_or(String::new(), |w| format!(", {w}")),
            ),
        );
        Ok(g)
    }

    /// (Re)writes the `GRANTS` keys of grant `id` for every subject it
    /// reaches now. Each touched key is rewritten whole from the registry
    /// (every grant covering it), keys that keep a holder before keys that
    /// lose their last one are removed, so a call allowed before and after
    /// is never refused in between, and no other grant's entry is lost.
    pub fn reinstall_grant(&self, id: u32) -> Result<(), String> {
        let mut reg = self.registry();
        let Some(g) = reg.grants.get(&id).cloned() else {
            return Ok(());
        };
        if reg.tool_keys(&g.tool, g.subject_id).is_none() {
            drop(reg);
            self.revoke_with(id, "revoked", "tool no longer in the policy");
            return Ok(());
        }
        let subjects: Vec<u32> = reg
            .identities
            .keys()
            .copied()
            .filter(|s| reg.grant_reaches(&g, *s))
            .collect();
        let mut entries = Vec::new();
        for s in subjects {
            // Per subject: with per-agent DNS each resolved its own addresses.
            for ep in &reg.tool_keys(&g.tool, s).unwrap_or_default() {
                let rule = CapRule {
                    subject: s,
                    generation: 0,
                    proto: ep.proto,
                    port: ep.port,
                    addr: ep.addr,
                    prefix_len: ep.prefix_len,
                };
                if !entries.contains(&rule) {
                    entries.push(rule);
                }
            }
        }
        let mut touched = g.entries.clone();
        touched.extend(entries.iter().copied());
        if let Some(g) = reg.grants.get_mut(&id) {
            g.entries = entries;
        }
        let keys = covered_keys(&reg, &touched);
        // Refuse before writing anything: a key holds GRANT_SLOTS grants.
        if let Some(full) = keys.iter().find(|k| holders(&reg, k).len() > GRANT_SLOTS) {
            let msg = format!(
                "{} grants would overlap on {}: at most {GRANT_SLOTS} live grants can cover one endpoint of one agent; revoke one first",
                holders(&reg, full).len(),
                endpoint_text(full),
            );
            if let Some(now) = reg.grants.get_mut(&id) {
                now.entries = g.entries;
            }
            return Err(msg);
        }
        let mut kernel = self.kernel();
        sync_grant_keys(&mut reg, &mut kernel, &keys)
    }

    fn drop_grant(&self, id: u32) -> Option<Grant> {
        let mut reg = self.registry();
        let g = reg.grants.remove(&id)?;
        let keys = covered_keys(&reg, &g.entries);
        let mut kernel = self.kernel();
        if let Err(e) = sync_grant_keys(&mut reg, &mut kernel, &keys) {
            tracing::error!(grant = id, "rewriting GRANTS after dropping a grant: {e}");
        }
        kernel.remove_grant_state(id);
        Some(g)
    }

    /// Compares the registry's grants with the kernel's `GRANTS` and
    /// `GRANT_STATE` maps; returns every disagreement (empty = they agree).
    pub fn grant_disagreements(&self) -> Vec<String> {
        let mut reg = self.registry();
        let kernel = self.kernel();
        let mut problems = Vec::new();
        let mut expected: HashMap<CapRule, Vec<(u32, u32)>> = HashMap::new();
        let all: Vec<CapRule> = reg
            .grants
            .values()
            .flat_map(|g| g.entries.clone())
            .collect();
        for k in all {
            expected
                .entry(k)
                .or_insert_with(|| slot_pairs(&mut reg, &k));
        }
        let actual: HashMap<CapRule, Vec<(u32, u32)>> = kernel
            .grant_entries()
            .into_iter()
            .map(|(k, v)| (k, v.iter().collect()))
            .collect();
        for (k, want) in &expected {
            match actual.get(k) {
                None => problems.push(format!("{}: missing in the kernel", endpoint_text(k))),
                Some(have) if have != want => problems.push(format!(
                    "{}: kernel holds (tool, grant) {have:?}, registry {want:?}",
                    endpoint_text(k)
                )),
                Some(_) => {}
            }
        }
        for (k, have) in &actual {
            if !expected.contains_key(k) {
                problems.push(format!(
                    "{}: in the kernel ({have:?}) but no grant of the registry covers it",
                    endpoint_text(k)
                ));
            }
        }
        for g in reg.grants.values() {
            match kernel.grant_state(g.id) {
                None => problems.push(format!("grant {}: no GRANT_STATE entry", g.id)),
                Some(st) if st.expires_at_ns != g.expires_at_ns => problems.push(format!(
                    "grant {}: kernel expiry {} ns, registry {} ns",
                    g.id, st.expires_at_ns, g.expires_at_ns
                )),
                Some(st) if st.flags & GRANT_REVOKED != 0 => problems.push(format!(
                    "grant {}: revoked in the kernel, active in the registry",
                    g.id
                )),
                Some(_) => {}
            }
        }
        problems.sort();
        problems
    }

    /// Revokes a grant: one `GRANT_STATE` write makes every key of it deny
    /// at once (before this returns); then the keys are removed.
    pub fn revoke(&self, id: u32) -> Result<Grant, String> {
        if !self.registry().grants.contains_key(&id) {
            return Err(format!("no active grant {id} (see `agent-guard status`)"));
        }
        self.revoke_with(id, "revoked", "revoked by an operator")
            .ok_or_else(|| format!("grant {id} vanished"))
    }

    fn revoke_with(&self, id: u32, reason: &str, detail: &str) -> Option<Grant> {
        {
            let mut kernel = self.kernel();
            if let Some(mut st) = kernel.grant_state(id) {
                st.flags |= GRANT_REVOKED;
                let _ = kernel.set_grant_state(id, st);
            }
        }
        let g = self.drop_grant(id)?;
        self.grant_record("revoke", &g, Some(reason), detail.to_string());
        Some(g)
    }

    /// Ends grants the kernel already treats as dead (expired, uses spent),
    /// with an audit record each.
    pub fn expire_grants(&self) {
        let now = mono_now_ns();
        let ids: Vec<(u32, u64)> = self
            .registry()
            .grants
            .values()
            .map(|g| (g.id, g.expires_at_ns))
            .collect();
        for (id, expires) in ids {
            let spent = self
                .kernel()
                .grant_state(id)
                .is_some_and(|s| s.flags & GRANT_LIMITED_USES != 0 && s.uses_left <= 0);
            if now >= expires {
                self.revoke_with(id, "expired", "the grant's TTL ran out");
            } else if spent {
                self.revoke_with(id, "uses_exhausted", "every use of the grant was taken");
            }
        }
    }

    /// Suspends (or resumes) a tenant or one agent: every subject of it is
    /// denied everything at once.
    pub fn set_suspended(
        &self,
        tenant: &str,
        agent: Option<&str>,
        suspend: bool,
    ) -> Result<usize, String> {
        let mut reg = self.registry();
        let known = reg
            .identities
            .values()
            .any(|i| i.active && i.tenant == tenant && agent.is_none_or(|a| i.agent == a));
        if !known {
            return Err(match agent {
                Some(a) => format!("unknown agent {tenant}/{a} in the current policy"),
                None => format!("unknown tenant {tenant:?} in the current policy"),
            });
        }
        let key = (tenant.to_string(), agent.map(str::to_string));
        let before = reg.suspended.clone();
        if suspend {
            reg.suspended.insert(key);
        } else if !reg.suspended.remove(&key) {
            return Err(format!(
                "{} is not suspended{}",
                agent.map_or(tenant.to_string(), |a| format!("{tenant}/{a}")),
                if agent.is_some() && reg.suspended.contains(&(tenant.to_string(), None)) {
                    " (its tenant is; resume the tenant)"
                } else {
                    ""
                }
            ));
        }
        // On disk first: a suspension must survive a restart of the daemon.
        if let Err(e) = self.save_suspended(&reg.suspended) {
            reg.suspended = before;
            return Err(format!("could not record the suspension: {e}"));
        }
        let ids: Vec<u32> = reg
            .identities
            .values()
            .filter(|i| i.active && i.tenant == tenant && agent.is_none_or(|a| i.agent == a))
            .map(|i| i.subject_id)
            .collect();
        drop(reg);
        self.rewrite_subjects(&ids)?;
        let mut rec = AuditRecord::new(if suspend { "suspend" } else { "resume" });
        rec.tenant = Some(tenant.to_string());
        rec.agent = agent.map(str::to_string);
        rec.detail = Some(format!("{} subjects", ids.len()));
        self.audit(tenant, rec);
        Ok(ids.len())
    }

    /// A task-scoped (or sub-agent) process called outside its declared
    /// tools. Returns true when this call is divergence (the caller marks
    /// the record); applies `on_divergence` when its threshold is reached.
    pub fn divergence(&self, subject_id: u32) -> bool {
        let mut reg = self.registry();
        let Some(ident) = reg.identities.get(&subject_id).cloned() else {
            return false;
        };
        if ident.requested_tools.is_none() && ident.task.is_none() {
            return false;
        }
        // Counted, and acted on, at the outermost scoped subject, so a
        // fresh sub-agent neither resets the count nor escapes the action.
        let scope = reg.scope_root(subject_id);
        let n = {
            let c = reg.divergences.entry(scope).or_insert(0);
            *c += 1;
            *c
        };
        self.metrics
            .divergence
            .with_label_values(&[&ident.tenant, &ident.agent])
            .inc();
        let rule = reg
            .loaded
            .as_ref()
            .and_then(|l| l.policy.agent(&ident.tenant, &ident.agent))
            .and_then(|a| a.on_divergence);
        let Some(rule) = rule else { return true };
        if n != rule.after {
            return true;
        }
        match rule.action {
            DivergenceAction::Revoke => {
                let ids = reg.subtree(scope);
                reg.revoked_subjects.extend(ids.iter().copied());
                drop(reg);
                let _ = self.rewrite_subjects(&ids);
                self.divergence_record(&ident, "revoke", n);
            }
            DivergenceAction::Suspend => {
                drop(reg);
                let _ = self.set_suspended(&ident.tenant, Some(&ident.agent), true);
                self.divergence_record(&ident, "suspend", n);
            }
        }
        true
    }

    fn divergence_record(&self, ident: &Arc<super::subjects::Identity>, action: &str, n: u32) {
        let mut rec = AuditRecord::new(action);
        rec.tenant = Some(ident.tenant.clone());
        rec.agent = Some(ident.agent.clone());
        rec.subject = Some(ident.chain.clone());
        rec.task = ident.task.as_ref().map(|t| t.text.clone());
        rec.task_id = ident.task.as_ref().map(|t| t.id.clone());
        rec.reason = Some("divergence".into());
        rec.detail = Some(format!(
            "on_divergence: {action} after {n} calls outside the declared tools"
        ));
        self.audit(&ident.tenant, rec);
    }
}

/// `touched` plus every installed grant key that one of them covers: the
/// keys whose holders change when the grants at `touched` do.
fn covered_keys(reg: &Registry, touched: &[CapRule]) -> Vec<CapRule> {
    let mut keys: Vec<CapRule> = Vec::new();
    let mut add = |k: CapRule| {
        if !keys.contains(&k) {
            keys.push(k);
        }
    };
    for t in touched {
        add(*t);
    }
    for g in reg.grants.values() {
        for e in &g.entries {
            if touched.iter().any(|t| t.covers(e)) {
                add(*e);
            }
        }
    }
    keys
}

/// Grants covering `key` (an entry of theirs at the key or at a shorter
/// prefix containing it), in slot order: no use count first, then by id,
/// so a call an unlimited grant covers never spends a counted use.
fn holders<'a>(reg: &'a Registry, key: &CapRule) -> Vec<&'a Grant> {
    let mut out: Vec<&Grant> = reg
        .grants
        .values()
        .filter(|g| g.entries.iter().any(|e| e.covers(key)))
        .collect();
    out.sort_by_key(|g| (g.uses.is_some(), g.id));
    out
}

/// The (tool id, grant id) slots `key` should hold: none unless a grant
/// has an entry at exactly this key (shorter prefixes live in keys of
/// their own).
fn slot_pairs(reg: &mut Registry, key: &CapRule) -> Vec<(u32, u32)> {
    if !reg.grants.values().any(|g| g.entries.contains(key)) {
        return Vec::new();
    }
    let found: Vec<(String, u32)> = holders(reg, key)
        .into_iter()
        .take(GRANT_SLOTS)
        .map(|g| (g.tool.clone(), g.id))
        .collect();
    found
        .into_iter()
        .map(|(tool, id)| (reg.ids.tool(&tool), id))
        .collect()
}

/// Rewrites each of `keys` in `GRANTS` from the registry: keys with
/// holders first, then the keys left without one are removed.
fn sync_grant_keys(
    reg: &mut Registry,
    kernel: &mut KernelMaps,
    keys: &[CapRule],
) -> Result<(), String> {
    let mut empty = Vec::new();
    let mut first_err = None;
    for k in keys {
        let pairs = slot_pairs(reg, k);
        if pairs.is_empty() {
            empty.push(*k);
            continue;
        }
        let mut slots = GrantSlots::default();
        for (i, (tool, grant)) in pairs.iter().enumerate() {
            slots.tool_ids[i] = *tool;
            slots.grant_ids[i] = *grant;
        }
        slots.len = pairs.len() as u32;
        if let Err(e) = kernel.insert_grant(k, slots) {
            first_err.get_or_insert_with(|| format!("{}: {e}", endpoint_text(k)));
        }
    }
    for k in &empty {
        kernel.remove_grant(k);
    }
    first_err.map_or(Ok(()), Err)
}

/// A grant key for people: `subject 7 tcp 127.0.0.1/32:18081`.
fn endpoint_text(k: &CapRule) -> String {
    let addr = std::net::Ipv6Addr::from(k.addr);
    let (addr, len) = match addr.to_ipv4_mapped() {
        Some(v4) if k.prefix_len >= 96 => (v4.to_string(), k.prefix_len - 96),
        _ => (addr.to_string(), k.prefix_len),
    };
    if k.proto == agent_guard_common::unix::PROTO_UNIX {
        return format!(
            "subject {} unix path {}",
            k.subject,
            std::net::Ipv6Addr::from(k.addr)
        );
    }
    let proto = match k.proto {
        6 => "tcp".to_string(),
        17 => "udp".to_string(),
        p => format!("proto {p}"),
    };
    format!("subject {} {proto} {addr}/{len}:{}", k.subject, k.port)
}
