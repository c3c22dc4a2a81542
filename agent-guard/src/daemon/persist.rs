//! The registry on disk, so a crash loses nothing a takeover can restore.
//!
//! `registry.json` in the state directory holds what the policy alone does
//! not say: derived subjects (task scopes, tool subsets, sub-agent chains,
//! process-tree subjects) with their deadlines, grants with their
//! deadlines, and pending approval requests. It is written (temp file,
//! fsync, rename) before a control command that changed any of it
//! replies, and after housekeeping changed it. Deadlines are on the
//! kernel's monotonic clock, which runs on across daemon restarts (not
//! across reboots: the file names the boot it belongs to and is ignored
//! after another).
//!
//! A daemon taking over from one that died (takeover.rs) restores them:
//! each derived subject again under its parent (its cgroup adopted, its
//! processes re-tagged to it), each grant with its id, deadline and the uses
//! its predecessor's kernel left (read from the pinned `GRANT_STATE`), each
//! request with its id. What no longer fits the policy (an agent or tool
//! gone, a subset no longer a subset) is not restored and its processes
//! stay quarantined: fail closed.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{
    approvals::ApprovalRequest,
    grants::{NewGrant, RestoredGrant},
    state::{State, mono_now_ns, write_state_bytes},
    subjects::{CgroupPlan, Derive, Principal, Task},
};

/// File in the state directory.
pub const REGISTRY_FILE: &str = "registry.json";
/// Version of its format; another version is refused with a clear message.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Saved {
    pub version: u32,
    /// `/proc/sys/kernel/random/boot_id` when written.
    pub boot_id: String,
    pub roots: Vec<SavedRoot>,
    /// Parents before children.
    pub subjects: Vec<SavedSubject>,
    pub grants: Vec<SavedGrant>,
    pub approvals: Vec<ApprovalRequest>,
    pub next_grant: u32,
    pub next_approval: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedRoot {
    pub id: u32,
    pub tenant: String,
    pub agent: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedSubject {
    pub id: u32,
    pub parent: u32,
    pub name: String,
    pub depth: u8,
    pub requested_tools: Option<Vec<String>>,
    pub expires_at_ns: u64,
    pub task: Option<Task>,
    pub principal: Option<Principal>,
    pub cgroup_dir: PathBuf,
    /// Whether it has a cgroup of its own (process-tree subjects do not).
    pub own_cgroup: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedGrant {
    pub id: u32,
    pub tenant: String,
    pub agent: String,
    pub tool: String,
    pub subject: u32,
    pub expires_at_ns: u64,
    pub uses: Option<u32>,
    pub pid: Option<u32>,
    pub created: String,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Reads the file an earlier run left: `None` when there is none or it is
/// of another boot; an error naming the file when it is damaged.
pub fn load(state_dir: &Path) -> anyhow::Result<Option<Saved>> {
    let path = state_dir.join(REGISTRY_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
    };
    let saved: Saved = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is damaged ({e}); it holds the task scopes, sub-agents, grants and approval requests a takeover restores: fix it, or move it away to start without them (their processes then stay quarantined)",
            path.display()
        )
    })?;
    if saved.version != FORMAT_VERSION {
        anyhow::bail!(
            "{} has format version {}, this agent-guard reads version {FORMAT_VERSION}; move it away to start without it",
            path.display(),
            saved.version
        );
    }
    if saved.boot_id != boot_id() {
        tracing::info!(
            "{} is from another boot; nothing in it is restored",
            path.display()
        );
        return Ok(None);
    }
    Ok(Some(saved))
}

impl State {
    /// What `registry.json` should hold now.
    fn snapshot(&self) -> Saved {
        let reg = self.registry();
        let mut roots = Vec::new();
        let mut subjects: Vec<(u8, SavedSubject)> = Vec::new();
        for i in reg.identities.values().filter(|i| i.active) {
            if i.is_root() {
                roots.push(SavedRoot {
                    id: i.subject_id,
                    tenant: i.tenant.clone(),
                    agent: i.agent.clone(),
                });
                continue;
            }
            let Some(parent) = i.parent else { continue };
            let name = i.chain.rsplit('/').next().unwrap_or("task").to_string();
            let parent_depth = reg.identities.get(&parent).map_or(0, |p| p.depth);
            subjects.push((
                i.depth,
                SavedSubject {
                    id: i.subject_id,
                    parent,
                    name: if i.depth == parent_depth {
                        "task".into()
                    } else {
                        name
                    },
                    depth: i.depth,
                    requested_tools: i
                        .requested_tools
                        .as_ref()
                        .map(|t| t.iter().cloned().collect()),
                    expires_at_ns: i.expires_at_ns,
                    task: i.task.clone(),
                    principal: i.principal.clone(),
                    cgroup_dir: i.cgroup_dir.clone(),
                    own_cgroup: i.cgroup_dir.is_dir(),
                },
            ));
        }
        // Parents first: by depth, then by id (a task scope has its
        // parent's depth but a larger id).
        subjects.sort_by_key(|(d, s)| (*d, s.id));
        Saved {
            version: FORMAT_VERSION,
            boot_id: boot_id(),
            roots,
            subjects: subjects.into_iter().map(|(_, s)| s).collect(),
            grants: reg
                .grants
                .values()
                .map(|g| SavedGrant {
                    id: g.id,
                    tenant: g.tenant.clone(),
                    agent: g.agent.clone(),
                    tool: g.tool.clone(),
                    subject: g.subject_id,
                    expires_at_ns: g.expires_at_ns,
                    uses: g.uses,
                    pid: g.pid,
                    created: g.created.clone(),
                })
                .collect(),
            approvals: reg.approvals.values().cloned().collect(),
            next_grant: reg.next_grant,
            next_approval: reg.next_approval,
        }
    }

    /// Writes `registry.json` from the registry as it is now. Serialised
    /// by a lock of its own so two writers never interleave renames.
    pub fn save_registry(&self) {
        let mut last = self.persist_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(text) = serde_json::to_string_pretty(&self.snapshot()) else {
            return;
        };
        if *last == text {
            return;
        }
        if let Err(e) = write_state_bytes(&self.state_dir, REGISTRY_FILE, text.as_bytes()) {
            tracing::error!(
                "could not write {}: {e}; a crash now would lose task scopes, sub-agents, grants and approval requests made since the last write",
                self.state_dir.join(REGISTRY_FILE).display()
            );
            return;
        }
        *last = text;
    }

    /// Restores what a predecessor saved (after the policy is applied);
    /// returns old subject id -> new subject id for re-tagging, and counts.
    pub fn restore(
        &self,
        saved: &Saved,
        old_uses: &dyn Fn(u32) -> Option<i64>,
    ) -> (HashMap<u32, u32>, Restored) {
        let mut map: HashMap<u32, u32> = HashMap::new();
        let mut counts = Restored::default();
        {
            let reg = self.registry();
            for r in &saved.roots {
                if let Some(i) = reg
                    .identities
                    .values()
                    .find(|i| i.active && i.is_root() && i.tenant == r.tenant && i.agent == r.agent)
                {
                    map.insert(r.id, i.subject_id);
                }
            }
        }
        let now = mono_now_ns();
        for s in &saved.subjects {
            let Some(&parent_id) = map.get(&s.parent) else {
                counts.skipped += 1;
                continue;
            };
            let reg = self.registry();
            let Some(parent) = reg.identities.get(&parent_id).cloned() else {
                counts.skipped += 1;
                continue;
            };
            let requested = s
                .requested_tools
                .as_ref()
                .map(|t| t.iter().cloned().collect::<BTreeSet<String>>());
            if let Some(req) = &requested {
                let have = reg.current_tools(parent_id);
                if !req.is_subset(&have) {
                    tracing::warn!(
                        old = s.id,
                        "not restored: its tools are no longer a subset of its parent's"
                    );
                    counts.skipped += 1;
                    continue;
                }
            }
            let cgroup = if s.own_cgroup && s.cgroup_dir.is_dir() {
                CgroupPlan::Existing(s.cgroup_dir.clone())
            } else {
                CgroupPlan::None
            };
            match self.install_derived(
                reg,
                &parent,
                Derive {
                    name: s.name.clone(),
                    depth: s.depth,
                    requested,
                    expires: s.expires_at_ns,
                    task: s.task.clone(),
                    principal: s.principal.clone(),
                    cgroup,
                },
            ) {
                Ok(ident) => {
                    map.insert(s.id, ident.subject_id);
                    counts.subjects += 1;
                }
                Err(e) => {
                    tracing::warn!(old = s.id, "not restored: {e}");
                    counts.skipped += 1;
                }
            }
        }
        for g in &saved.grants {
            let Some(&subject_id) = map.get(&g.subject) else {
                counts.skipped += 1;
                continue;
            };
            if g.expires_at_ns <= now {
                continue; // expired meanwhile: the kernel already refused it
            }
            let uses_left = old_uses(g.id);
            if g.uses.is_some() && uses_left.is_some_and(|u| u <= 0) {
                continue; // spent meanwhile
            }
            let r = self.issue_grant(&NewGrant {
                tenant: g.tenant.clone(),
                agent: g.agent.clone(),
                tool: g.tool.clone(),
                subject_id,
                ttl_ms: 0,
                uses: g.uses,
                pid: g.pid,
                why: Some("restored after a takeover".into()),
                restore: Some(RestoredGrant {
                    id: g.id,
                    expires_at_ns: g.expires_at_ns,
                    uses_left,
                    created: g.created.clone(),
                }),
            });
            match r {
                Ok(_) => counts.grants += 1,
                Err(e) => {
                    tracing::warn!(grant = g.id, "not restored: {e}");
                    counts.skipped += 1;
                }
            }
        }
        {
            let mut reg = self.registry();
            reg.next_grant = reg.next_grant.max(saved.next_grant);
            reg.next_approval = reg.next_approval.max(saved.next_approval);
            for a in &saved.approvals {
                if let Some(&subject_id) = map.get(&a.subject_id)
                    && a.expires_at_ns > now
                {
                    let mut a = a.clone();
                    a.subject_id = subject_id;
                    reg.approvals.insert(a.id, a);
                    counts.approvals += 1;
                }
            }
        }
        (map, counts)
    }
}

/// What a restore brought back.
#[derive(Debug, Default, Clone, Copy)]
pub struct Restored {
    pub subjects: usize,
    pub grants: usize,
    pub approvals: usize,
    /// Saved entries that no longer fit the policy (left quarantined).
    pub skipped: usize,
}
