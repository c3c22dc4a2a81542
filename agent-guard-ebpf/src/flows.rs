//! Flow mode (`--flow-records`): an allowed call is counted in `FLOWS`
//! instead of getting its own ring record. The daemon turns each flow into
//! one audit record per `--flow-interval`.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use agent_guard_common::{
    event::verdict,
    flow::{FlowKey, FlowStats, fallback},
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid},
};

use crate::{
    judgement::Judgement,
    maps::{FLOW_CONFIG, FLOW_FALLBACKS, FLOWS, bump},
};

/// `-EEXIST` from a map update with `BPF_NOEXIST`.
const EEXIST: i32 = -17;

/// The epoch to count under, or `None` when flow mode is off.
#[inline(always)]
pub fn epoch() -> Option<u8> {
    let cfg = FLOW_CONFIG.get(0)?;
    (cfg.enabled != 0).then_some((cfg.epoch & 1) as u8)
}

/// Flow mode: an allowed call is counted, not recorded one by one (denied
/// and would-deny calls always are). True when the call was counted, so
/// the caller writes no per-call record.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn counted(
    subject: u32,
    j: &Judgement,
    addr: [u8; 16],
    port: u16,
    family: u16,
    kind: u8,
    proto: u8,
    now: u64,
) -> bool {
    if j.verdict != verdict::ALLOW {
        return false;
    }
    let Some(epoch) = epoch() else {
        return false;
    };
    let key = FlowKey {
        subject,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        tool_id: j.tool_id,
        grant_id: j.grant_id,
        addr,
        port,
        family,
        kind,
        proto,
        reason: j.reason,
        epoch,
    };
    count(&key, now)
}

/// Counts one call of `key` at `now`. False when it could not be counted
/// (table full): the caller then emits the per-call record, so a full table
/// costs speed, never accounting.
#[inline(always)]
fn count(key: &FlowKey, now: u64) -> bool {
    if let Some(v) = FLOWS.get_ptr_mut(key) {
        add(v, now);
        return true;
    }
    let first = FlowStats {
        calls: 1,
        first_ns: now,
        last_ns: now,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        uid: bpf_get_current_uid_gid() as u32,
        _pad: 0,
    };
    match FLOWS.insert(key, &first, BPF_NOEXIST as u64) {
        Ok(()) => return true,
        // Another call of the same flow inserted it first: count on it.
        Err(EEXIST) => {
            if let Some(v) = FLOWS.get_ptr_mut(key) {
                add(v, now);
                return true;
            }
        }
        Err(_) => {}
    }
    bump(&FLOW_FALLBACKS, fallback::TABLE_FULL);
    false
}

/// One more call on this CPU's value of a flow.
#[inline(always)]
fn add(v: *mut FlowStats, now: u64) {
    // SAFETY: a valid map value pointer (this CPU's). The count is added
    // atomically: another program run on this CPU may interleave with this
    // one (migration is disabled, preemption is not).
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*v).calls, 1);
        if (*v).first_ns == 0 {
            // First call of this flow on this CPU (another CPU inserted it).
            (*v).first_ns = now;
            (*v).cgroup_id = bpf_get_current_cgroup_id();
            (*v).uid = bpf_get_current_uid_gid() as u32;
        }
        (*v).last_ns = now;
    }
}
