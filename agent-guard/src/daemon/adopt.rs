//! Agents named by cgroup: `[[agent]] cgroup_glob = "/kubepods.slice/*/cri-containerd-*.scope"`.
//!
//! Containers started by a runtime are not launched through `agent-guard
//! run`; their cgroup says what they are. Every housekeeping tick the daemon
//! looks for cgroup directories (relative to the cgroup2 mount) matching an
//! agent's pattern and tags each as that root agent in `CGROUPS`, so every
//! process in it is judged as the agent from its next call; the processes
//! already in it are also tagged in `PROCS`, so one that moves itself out
//! of the cgroup later stays fenced (and its children inherit it at fork).
//! An adopted cgroup that disappears or no longer matches (policy changed)
//! is untagged. Matching is per path component (`*`, `?`, `[..]` within one
//! component); the daemon's own agent cgroups and cgroups another daemon or
//! mechanism already tagged are left alone.
//!
//! Not done: label or annotation sources (no API server here); a process
//! that joins an adopted cgroup is cgroup-anchored until the next tick puts
//! it in `PROCS` too.

use std::path::{Path, PathBuf};

use super::state::State;
use crate::{audit::AuditRecord, kernel::fs as kfs};

/// Directories under `mount` whose path (relative to it) matches
/// `pattern` component by component.
pub fn matching_dirs(mount: &Path, pattern: &str) -> Vec<PathBuf> {
    let parts: Vec<glob::Pattern> = pattern
        .trim_start_matches('/')
        .split('/')
        .filter_map(|c| glob::Pattern::new(c).ok())
        .collect();
    let mut level = vec![mount.to_path_buf()];
    for part in &parts {
        let mut next = Vec::new();
        for dir in &level {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir())
                    && part.matches(&e.file_name().to_string_lossy())
                {
                    next.push(e.path());
                }
            }
        }
        level = next;
        if level.is_empty() {
            break;
        }
    }
    level
}

impl State {
    /// One pass: adopts matching cgroups, drops vanished ones. Returns the
    /// number of cgroups adopted now.
    pub fn adopt_cgroups(&self) -> usize {
        let wanted: Vec<(u32, String, String, String)> = {
            let reg = self.registry();
            let Some(l) = reg.loaded.as_ref() else {
                return 0;
            };
            l.policy
                .agents
                .iter()
                .filter_map(|a| {
                    let glob = a.cgroup_glob.clone()?;
                    let root = reg.identities.values().find(|i| {
                        i.active && i.is_root() && i.tenant == a.tenant && i.agent == a.name
                    })?;
                    Some((root.subject_id, a.tenant.clone(), a.name.clone(), glob))
                })
                .collect()
        };
        let mut seen: Vec<u64> = Vec::new();
        let mut adopted = 0;
        for (subject, tenant, agent, glob) in &wanted {
            for dir in matching_dirs(&self.cgroup_mount, glob) {
                if dir.starts_with(&self.cgroup_root) {
                    continue; // our own agents' cgroups
                }
                let Ok(id) = kfs::cgroup_id(&dir) else {
                    continue;
                };
                if seen.contains(&id) {
                    continue; // two agents' patterns: the first wins
                }
                seen.push(id);
                let known = self.registry().adopted.get(&id).map(|(_, s)| *s);
                if known != Some(*subject) {
                    let taken = {
                        let mut kernel = self.kernel();
                        match kernel.cgroup_subject(id) {
                            Some(other) if known.is_none() => Err(other),
                            _ => kernel.tag_cgroup(id, *subject).map_err(|_| 0),
                        }
                    };
                    match taken {
                        Ok(()) => {
                            self.registry().adopted.insert(id, (dir.clone(), *subject));
                            adopted += 1;
                            let mut rec = AuditRecord::new("adopt");
                            rec.tenant = Some(tenant.clone());
                            rec.agent = Some(agent.clone());
                            rec.subject = Some(format!("{tenant}/{agent}"));
                            rec.cgroup = Some(id);
                            rec.detail = Some(format!(
                                "cgroup {} matches cgroup_glob {glob:?}: its processes are this agent",
                                dir.display()
                            ));
                            self.audit(tenant, rec);
                        }
                        Err(other) => {
                            tracing::warn!(cgroup = %dir.display(), other, "cgroup_glob: already tagged by something else; left alone");
                            continue;
                        }
                    }
                }
                // Its processes get the pid anchor too.
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                let mut kernel = self.kernel();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                    if kernel.process_subject(pid).is_none() {
                        let _ = kernel.tag_process(pid, *subject);
                    }
                }
            }
        }
        let gone: Vec<(u64, PathBuf)> = {
            let mut reg = self.registry();
            let ids: Vec<u64> = reg
                .adopted
                .keys()
                .copied()
                .filter(|id| !seen.contains(id))
                .collect();
            ids.into_iter()
                .filter_map(|id| reg.adopted.remove(&id).map(|(p, _)| (id, p)))
                .collect()
        };
        for (id, dir) in gone {
            self.kernel().untag_cgroup(id);
            tracing::info!(cgroup = %dir.display(), "cgroup_glob: no longer matched or gone; untagged");
        }
        adopted
    }
}
