//! Ring buffer output without waking the daemon on every record.
//!
//! Waking the consumer per event cost x1.66 on connect in our measurements
//! (DESIGN.md); we submit with NO_WAKEUP and force a wakeup only when enough
//! data waits. The daemon also drains on a short timer.

use agent_guard_common::event::{DecisionRecord, Event};
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
///
/// # Safety
/// `ev` points at a writable record at least [`DECISION_LEN`](agent_guard_common::event::DECISION_LEN) bytes long.
#[inline(always)]
unsafe fn fill_ids(ev: *mut Event, kind: u8, subject: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the caller's promise; only fields before `comm` are written.
    unsafe {
        (*ev).cgroup_id = aya_ebpf::helpers::bpf_get_current_cgroup_id();
        (*ev).kind = kind;
        (*ev).subject = subject;
        (*ev).pid = (pid_tgid >> 32) as u32;
        (*ev).tid = pid_tgid as u32;
        (*ev).uid = bpf_get_current_uid_gid() as u32;
    }
}

/// Fills the caller of a process record (fork, exec, exit, socket): its
/// ids, the time and its comm. The daemon remembers the comm per process
/// for the decision records, which do not carry it.
#[inline(always)]
pub fn fill_caller(ev: &mut Event, kind: u8, subject: u32) {
    // SAFETY: a whole Event.
    unsafe { fill_ids(ev, kind, subject) };
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.comm = bpf_get_current_comm().unwrap_or([0; 16]);
}

/// Fills a decision (the per-call hot path): caller ids, the one clock
/// read the decision already made, the verdict. No comm: copying it on
/// every call cost more than it told (the daemon has it from exec/fork).
///
/// # Safety
/// `ev` points at a writable record at least [`DECISION_LEN`](agent_guard_common::event::DECISION_LEN) bytes long,
/// zeroed.
#[inline(always)]
pub unsafe fn fill_decision(ev: *mut Event, kind: u8, subject: u32, now: u64, j: &Judgement) {
    // SAFETY: the caller's promise; only fields before `comm` are written.
    unsafe {
        fill_ids(ev, kind, subject);
        (*ev).ts_ns = now;
        (*ev).verdict = j.verdict;
        (*ev).reason = j.reason;
        (*ev).tool_id = j.tool_id;
        (*ev).grant_id = j.grant_id;
    }
}

/// Writes one decision record ([`DECISION_LEN`](agent_guard_common::event::DECISION_LEN) bytes, no comm): the
/// caller's ids, `now`, the judgement, then whatever `fill` sets (the
/// hook's destination fields, never `comm`). Counted as lost when the
/// ring is full.
#[inline(always)]
pub fn decision(
    kind: u8,
    subject: u32,
    now: u64,
    j: &Judgement,
    wakeup_bytes: u32,
    fill: impl FnOnce(*mut Event),
) {
    let Some(mut entry) = reserve::<DecisionRecord>(kind) else {
        return;
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: the reservation is DECISION_LEN bytes, zeroed whole before
    // any field (all before `comm`) is written.
    unsafe {
        rec.write(DecisionRecord::zeroed());
        let ev = rec.cast::<Event>();
        fill_decision(ev, kind, subject, now, j);
        fill(ev);
    }
    entry.submit(wake_flags(wakeup_bytes));
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
