//! Ring buffer output without waking the daemon on every record.
//!
//! Waking the consumer per event cost x1.66 on connect in our measurements
//! (DESIGN.md); we submit with NO_WAKEUP and force a wakeup only when enough
//! data waits. The daemon also drains on a short timer.

use agent_guard_common::event::Event;
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
    },
    maps::ring_buf::RingBufEntry,
};

use crate::{
    judgement::Judgement,
    maps::{CONFIG, EVENTS, LOST, bump},
};

/// Fills the caller ids every record shares (no clock, no comm).
#[inline(always)]
fn fill_ids(ev: &mut Event, kind: u8, subject: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ev.cgroup_id = unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() };
    ev.kind = kind;
    ev.subject = subject;
    ev.pid = (pid_tgid >> 32) as u32;
    ev.tid = pid_tgid as u32;
    ev.uid = bpf_get_current_uid_gid() as u32;
}

/// Fills the caller of a process record (fork, exec, exit, socket): its
/// ids, the time and its comm. The daemon remembers the comm per process
/// for the decision records, which do not carry it.
#[inline(always)]
pub fn fill_caller(ev: &mut Event, kind: u8, subject: u32) {
    fill_ids(ev, kind, subject);
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.comm = bpf_get_current_comm().unwrap_or([0; 16]);
}

/// Fills a decision record (the per-call hot path): caller ids, the one
/// clock read the decision already made, the verdict. No comm: copying it
/// on every call cost more than it told (the daemon has it from exec/fork).
#[inline(always)]
pub fn fill_decision(ev: &mut Event, kind: u8, subject: u32, now: u64, j: &Judgement) {
    fill_ids(ev, kind, subject);
    ev.ts_ns = now;
    ev.verdict = j.verdict;
    ev.reason = j.reason;
    ev.tool_id = j.tool_id;
    ev.grant_id = j.grant_id;
}

/// Reserves a record of type `T`, or counts it as lost for `kind`.
#[inline(always)]
pub fn reserve<T: 'static>(kind: u8) -> Option<RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none() {
        bump(&LOST, kind as u32);
    }
    entry
}

/// Submit flags: wake the consumer only when the backlog is large.
#[inline(always)]
pub fn submit_flags() -> u64 {
    wake_flags(CONFIG.get(0).map(|c| c.wakeup_bytes).unwrap_or(0))
}

/// [`submit_flags`] for a caller that already read `CONFIG`.
#[inline(always)]
pub fn wake_flags(wakeup_bytes: u32) -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= u64::from(wakeup_bytes) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}
