//! Taking over from a daemon that died without shutting down.
//!
//! Links are pinned (kernel/mod.rs), so a killed or crashed daemon leaves
//! its programs attached and the kernel keeps enforcing its last state:
//! tagged processes stay fenced, grants and task scopes still expire on the
//! kernel's clock. Nothing can be granted, revoked or launched meanwhile,
//! and records are lost once its ring buffer is full.
//!
//! A new daemon with the same `--pin-dir` takes over without a moment in
//! which a tagged process is free:
//! 1. before loading, it opens the old links and maps from their pins and
//!    removes the pins (holding the fds keeps the old programs attached);
//! 2. it loads and attaches its own programs and applies the policy (root
//!    agents' cgroups are tagged again);
//! 3. it restores what the old instance saved in `registry.json`
//!    (persist.rs): task scopes, sub-agents and process-tree subjects under
//!    their parents (their cgroups adopted), grants with their ids,
//!    deadlines and the uses the old kernel left, pending approval requests.
//!    Then it re-tags every process the old instance tracked: one whose old
//!    subject was restored gets the restored subject; one still in its root
//!    agent's cgroup (`<cgroup-root>/<tenant>/<agent>`) whose agent is in
//!    the policy becomes that root agent again; anything else (a subject
//!    that no longer fits the policy, a process that left its cgroup, an
//!    agent the policy no longer has) is quarantined: judged under a
//!    subject that does not exist, so it reaches nothing. Leftover task and
//!    sub-agent cgroups not restored are quarantined the same way, so their
//!    future children are too. The scan repeats until it finds no new
//!    process (children forked meanwhile);
//! 4. then it closes the old fds: the old programs detach. What they left
//!    unread is counted into the takeover's `gap` record: records in the
//!    old ring, and the calls of flows (`--flow-records`) the old instance
//!    never collected (read after a grace period, so no old program still
//!    counts into them).

use std::{
    collections::BTreeSet,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use agent_guard_common::flow::{FlowKey, FlowStats};
use agent_guard_common::grant::GrantState;
use agent_guard_common::{
    event::{Event, kind},
    maps as names,
};
use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf};

use super::state::State;
use crate::kernel::{LINKS_PREFIX, fs as kfs, procs_pin};

/// Subject id of quarantined processes: never allocated, never in
/// `SUBJECTS`, so the programs refuse everything (`unknown_subject`).
pub const QUARANTINE: u32 = u32::MAX - 1;

/// What a dead predecessor left pinned.
pub struct Leftovers {
    /// Old links, held open until the new programs are in place.
    links: Vec<OwnedFd>,
    procs: Option<HashMap<MapData, u32, u32>>,
    /// Uses left of the old instance's grants.
    grant_state: Option<HashMap<MapData, u32, GrantState>>,
    /// Records the kernel could not deliver, per kind.
    lost: Option<PerCpuArray<MapData, u64>>,
    /// The old ring: records nobody read.
    ring: Option<RingBuf<MapData>>,
    /// The old flow table: allowed calls counted but never collected.
    flows: Option<PerCpuHashMap<MapData, FlowKey, FlowStats>>,
    /// Old daemon's pid, if it recorded one (for the audit record).
    pub found: usize,
}

/// What the takeover did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Events of the old instance that never reached an audit log, by
    /// kind: unread in its ring plus refused by a full ring.
    pub lost: [u64; kind::COUNT as usize],
    pub links: usize,
    pub retagged: usize,
    pub quarantined: usize,
    pub cgroups_quarantined: usize,
    /// Restored from `registry.json`.
    pub restored: super::persist::Restored,
}

/// Step 1: opens what a predecessor left in `pin_dir` and removes its
/// pins. `None` when there is nothing (the usual start).
pub fn collect(pin_dir: &Path) -> anyhow::Result<Option<Leftovers>> {
    let mut dirs = Vec::new();
    for e in std::fs::read_dir(pin_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(LINKS_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && daemon_alive(pid) {
            anyhow::bail!(
                "another agent-guard daemon (pid {pid}) has its programs pinned in {}; give this one another --pin-dir",
                pin_dir.display()
            );
        }
        dirs.push(e.path());
    }
    let paths: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path())
        .collect();
    if paths.is_empty() {
        for d in &dirs {
            let _ = std::fs::remove_dir(d);
        }
        return Ok(None);
    }
    let mut links = Vec::new();
    for p in &paths {
        match crate::kernel::unix::get_object(p) {
            Ok(fd) => links.push(fd),
            Err(e) => tracing::warn!("left-over link pin {}: {e}", p.display()),
        }
    }
    let procs = MapData::from_pin(procs_pin(pin_dir))
        .ok()
        .and_then(|d| HashMap::<_, u32, u32>::try_from(Map::HashMap(d)).ok());
    let grant_state = MapData::from_pin(pin_dir.join(names::GRANT_STATE))
        .ok()
        .and_then(|d| HashMap::<_, u32, GrantState>::try_from(Map::HashMap(d)).ok());
    let lost = MapData::from_pin(pin_dir.join(names::LOST))
        .ok()
        .and_then(|d| PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(d)).ok());
    let ring = MapData::from_pin(pin_dir.join(names::EVENTS))
        .ok()
        .and_then(|d| RingBuf::try_from(Map::RingBuf(d)).ok());
    let flows = crate::kernel::flows::FlowTable::pinned_flows(&pin_dir.join(names::FLOWS));
    // The new instance pins its own under the same names; the fds above
    // keep the old objects alive until step 4.
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    for d in &dirs {
        let _ = std::fs::remove_dir(d);
    }
    let _ = std::fs::remove_file(procs_pin(pin_dir));
    for name in crate::kernel::TAKEOVER_MAPS {
        let _ = std::fs::remove_file(pin_dir.join(name));
    }
    Ok(Some(Leftovers {
        found: links.len(),
        links,
        procs,
        grant_state,
        lost,
        ring,
        flows,
    }))
}

/// Is `pid` a running agent-guard daemon (not a dead one's reused pid)?
fn daemon_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
        args.first().is_some_and(|a| a.ends_with(b"agent-guard"))
            && args.get(1) == Some(&&b"daemon"[..])
    })
}

/// The cgroup of `pid` relative to `cgroup_root`, or `None` outside it
/// (or gone).
fn cgroup_under(pid: u32, cgroup_mount: &Path, cgroup_root: &Path) -> Option<Vec<String>> {
    let full = cgroup_mount.join(kfs::process_cgroup(pid)?);
    let rel = full.strip_prefix(cgroup_root).ok()?;
    Some(
        rel.components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect(),
    )
}

impl State {
    /// Steps 3 and 4 (after the policy is applied).
    pub fn take_over(&self, old: Leftovers, saved: Option<&super::persist::Saved>) -> Report {
        let mut report = Report {
            lost: [0; kind::COUNT as usize],
            links: old.links.len(),
            retagged: 0,
            quarantined: 0,
            cgroups_quarantined: 0,
            restored: Default::default(),
        };
        // Task and sub-agent cgroups of the old instance: quarantined, so
        // whatever is (or is forked) in them reaches nothing.
        for tenant in std::fs::read_dir(&self.cgroup_root)
            .into_iter()
            .flatten()
            .flatten()
        {
            for agent in std::fs::read_dir(tenant.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                for derived in std::fs::read_dir(agent.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if derived.file_type().is_ok_and(|t| t.is_dir())
                        && let Ok(id) = kfs::cgroup_id(&derived.path())
                        && self.kernel().tag_cgroup(id, QUARANTINE).is_ok()
                    {
                        report.cgroups_quarantined += 1;
                    }
                }
            }
        }
        // What the predecessor saved comes back (its cgroups re-tagged to
        // the restored subjects); old subject id -> new one.
        let moved: std::collections::HashMap<u32, u32> = match saved {
            Some(s) => {
                let uses = |id: u32| {
                    old.grant_state
                        .as_ref()
                        .and_then(|m| m.get(&id, 0).ok())
                        .map(|st| st.uses_left)
                };
                let (map, restored) = self.restore(s, &uses);
                report.restored = restored;
                map
            }
            None => Default::default(),
        };
        if let Some(procs) = &old.procs {
            let mut done: BTreeSet<u32> = BTreeSet::new();
            // Repeat until a pass finds nothing new: children forked by
            // old tagged processes meanwhile are in the old map too.
            for _ in 0..8 {
                let pids: Vec<u32> = procs
                    .keys()
                    .filter_map(Result::ok)
                    .filter(|p| !done.contains(p))
                    .collect();
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    done.insert(pid);
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        continue;
                    }
                    let root = cgroup_under(pid, &self.cgroup_mount, &self.cgroup_root)
                        .filter(|c| c.len() == 2)
                        .and_then(|c| {
                            let reg = self.registry();
                            reg.identities
                                .values()
                                .find(|i| {
                                    i.active && i.is_root() && i.tenant == c[0] && i.agent == c[1]
                                })
                                .map(|i| i.subject_id)
                        });
                    let restored = procs
                        .get(&pid, 0)
                        .ok()
                        .and_then(|old_subject| moved.get(&old_subject).copied());
                    let found = restored.or(root);
                    let subject = found.unwrap_or(QUARANTINE);
                    if self.kernel().tag_process(pid, subject).is_ok() {
                        if found.is_some() {
                            report.retagged += 1;
                        } else {
                            report.quarantined += 1;
                        }
                    }
                }
            }
        }
        // Step 4: the old programs detach when the last fd closes; then
        // nothing writes the old ring any more and it can be counted.
        let Leftovers {
            links,
            lost,
            ring,
            flows,
            ..
        } = old;
        drop(links);
        if let Some(mut flows) = flows {
            // Detached, but a program that started before may still run.
            if let Err(e) = crate::kernel::flows::grace_period() {
                tracing::warn!("{e}; reading the old flow table anyway");
            }
            for flow in crate::kernel::flows::drain(&mut flows, None) {
                if let Some(slot) = report.lost.get_mut(usize::from(flow.key.kind)) {
                    *slot += flow.calls;
                }
            }
        }
        if let Some(lost) = &lost {
            for (k, slot) in report.lost.iter_mut().enumerate() {
                if let Ok(v) = lost.get(&(k as u32), 0) {
                    *slot += v.iter().sum::<u64>();
                }
            }
        }
        if let Some(mut ring) = ring {
            let at = std::mem::offset_of!(Event, kind);
            while let Some(rec) = ring.next() {
                if let Some(&k) = rec.get(at)
                    && let Some(slot) = report.lost.get_mut(usize::from(k))
                {
                    *slot += 1;
                }
            }
        }
        report
    }
}
