//! Flow records (`agent-guard daemon --flow-records`): allowed connect and
//! sendmsg calls of tagged processes counted per flow in the kernel instead
//! of one ring record each. Denied and would-deny calls stay per call.
//!
//! The daemon flips [`FlowConfig::epoch`] every `--flow-interval`, waits for
//! an RCU grace period (no program still holds the old epoch), then reads
//! and deletes every key of the old epoch and writes one audit record per
//! flow with the call count.

/// `FLOWS` key: everything a per-call allowed record of the same call would
/// carry, except the time, thread, uid and cgroup (kept in the value).
///
/// Field order keeps every field aligned: 40 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub subject: u32,
    /// Caller process (tgid).
    pub tgid: u32,
    pub tool_id: u32,
    pub grant_id: u32,
    /// Destination, IPv6 or v4-mapped.
    pub addr: [u8; 16],
    /// Destination port in host order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: which hook judged the call.
    pub family: u16,
    /// `kind::CONNECT` or `kind::SENDMSG`.
    pub kind: u8,
    pub proto: u8,
    pub reason: u8,
    /// [`FlowConfig::epoch`] when the call was counted (0 or 1).
    pub epoch: u8,
}

/// `FLOWS` value, one per CPU: the calls this CPU counted for the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub calls: u64,
    /// `bpf_ktime_get_ns()` of the first and last call counted on this CPU
    /// (0 = none on this CPU).
    pub first_ns: u64,
    pub last_ns: u64,
    /// Cgroup of the first caller on this CPU.
    pub cgroup_id: u64,
    /// uid of the first caller on this CPU.
    pub uid: u32,
    pub _pad: u32,
}

/// `FLOW_CONFIG[0]`. Owner: the daemon writes, programs read on every
/// allowed tagged call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowConfig {
    /// 1: count allowed calls in `FLOWS`; 0: one ring record per call.
    pub enabled: u32,
    /// Epoch new calls are counted under (0 or 1).
    pub epoch: u32,
}

/// Slots of the per-CPU `FLOW_FALLBACKS` counters.
pub mod fallback {
    /// Calls recorded per call because `FLOWS` was full.
    pub const TABLE_FULL: u32 = 0;
    pub const COUNT: u32 = 1;
}
