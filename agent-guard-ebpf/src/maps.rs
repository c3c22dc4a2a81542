//! Maps and load-time globals. Each map documents key, value, capacity and
//! owner (who writes, who reads).

use agent_guard_common::{
    Config, capacity,
    dns::DnsOrig,
    event::{kind, verdict},
    flow::{FlowConfig, FlowKey, FlowStats, fallback},
    grant::{GrantKey, GrantSlots, GrantState, GrantValue, RateWindow, ToolLimit},
    subject::Subject,
    unix::UnixPath,
};
use aya_ebpf::{
    Global,
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};

/// tgid -> subject id. Written by the daemon (launch) and the fork
/// tracepoint (inheritance); removed by the exit tracepoint. Read per call.
/// The daemon sizes it to the kernel's pid_max at load (every pid and tid
/// fits, so an agent cannot fill it to have a child go untagged); not
/// preallocated, so the size costs memory only as entries are used.
#[map]
pub static PROCS: HashMap<u32, u32> = HashMap::with_max_entries(capacity::PROCS, BPF_F_NO_PREALLOC);

/// cgroup id -> subject id. Written by the daemon when it creates an agent
/// cgroup. Read per call when `PROCS` misses.
#[map]
pub static CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(capacity::CGROUPS, 0);

/// subject id -> tenant, agent, mode, flags. Written by the daemon.
#[map]
pub static SUBJECTS: HashMap<u32, Subject> = HashMap::with_max_entries(capacity::SUBJECTS, 0);

/// (subject, generation, proto, port, address prefix) -> tool: the base
/// capability sets compiled from policy. Written by the daemon; read per
/// tagged call.
#[map]
pub static CAPS: LpmTrie<GrantKey, GrantValue> = LpmTrie::with_max_entries(capacity::CAPS, 0);

/// The full-length entries of `CAPS` (one address, one port: most tools,
/// every DNS answer and Unix path), keyed by the same `GrantKey`: a hash
/// lookup costs a fraction of a 10,000-entry trie walk. Checked first;
/// a miss falls through to `CAPS`, which holds every entry, so an entry
/// missing here (this map full) costs time, never a verdict. The daemon
/// adds here after `CAPS` and removes here before `CAPS`, so nothing here
/// is ever absent from `CAPS`. Sized like `CAPS`; not preallocated.
#[map]
pub static CAPS_EXACT: HashMap<GrantKey, GrantValue> =
    HashMap::with_max_entries(capacity::CAPS, BPF_F_NO_PREALLOC);

/// (subject, 0, proto, port, address prefix) -> every live (tool, grant id)
/// covering it: just-in-time grants. Written by the daemon; read when
/// `CAPS` has no match.
#[map]
pub static GRANTS: LpmTrie<GrantKey, GrantSlots> = LpmTrie::with_max_entries(capacity::GRANTS, 0);

/// grant id -> expiry, uses, revoked flag. Written by the daemon; programs
/// check it and count uses.
#[map]
pub static GRANT_STATE: HashMap<u32, GrantState> =
    HashMap::with_max_entries(capacity::GRANT_STATE, 0);

/// tool id -> rate limit. Written by the daemon.
#[map]
pub static TOOLS: HashMap<u32, ToolLimit> = HashMap::with_max_entries(capacity::TOOLS, 0);

/// (agent, tool) -> current rate window. Written by the programs.
#[map]
pub static RATE: LruHashMap<u64, RateWindow> = LruHashMap::with_max_entries(capacity::RATE, 0);

/// Unix socket path -> path id (exact match). Written by the daemon at
/// policy load (before the generation flip that uses the ids) and for its
/// control socket; read by the Unix socket hooks for tagged callers.
#[map]
pub static UNIX_PATHS: HashMap<UnixPath, u32> = HashMap::with_max_entries(capacity::UNIX_PATHS, 0);

/// socket cookie -> where a redirected DNS call was meant to go. Written by
/// connect4/6 and sendmsg4/6 when they send a tagged process's DNS call to
/// its per-agent proxy; read by recvmsg4/6 to restore the replies' source.
#[map]
pub static DNS_ORIG: LruHashMap<u64, DnsOrig> = LruHashMap::with_max_entries(capacity::DNS_ORIG, 0);

/// Index 0: [`Config`]. Written by the daemon.
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// One ring buffer for every record. Written by the programs, drained by the
/// daemon.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

/// Per-CPU count of records that could not be reserved, by kind. The daemon
/// turns deltas into `gap` audit records.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(kind::COUNT, 0);

/// (epoch, subject, tgid, destination, hook, reason, tool, grant) -> per
/// CPU {calls, first/last time, cgroup, uid}: allowed calls counted in flow
/// mode (`--flow-records`). Inserted and counted by connect4/6 and
/// sendmsg4/6; read and deleted by the daemon one epoch at a time, after a
/// grace period (see `agent_guard_common::flow`). Preallocated: an insert
/// on the hot path takes no allocator lock. The daemon sizes it
/// (`--map-capacity FLOWS=N`); a full table sends the call to the ring.
#[map]
pub static FLOWS: PerCpuHashMap<FlowKey, FlowStats> =
    PerCpuHashMap::with_max_entries(capacity::FLOWS, 0);

/// Index 0: [`FlowConfig`] (on/off, current epoch). Written by the daemon.
#[map]
pub static FLOW_CONFIG: Array<FlowConfig> = Array::with_max_entries(1, 0);

/// Per-CPU count of allowed calls that got a per-call ring record in flow
/// mode because `FLOWS` was full, by `fallback::*`. Read by the daemon.
#[map]
pub static FLOW_FALLBACKS: PerCpuArray<u64> = PerCpuArray::with_max_entries(fallback::COUNT, 0);

/// Per-CPU count of decisions by verdict (allow, deny, would_deny), so the
/// daemon can check attempts = audited + lost.
#[map]
pub static DECISIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(verdict::COUNT, 0);

// Tracepoint field offsets differ between kernels; the daemon reads them
// from tracefs `format` files and sets these at load time. The defaults are
// the 6.18 layout.
#[unsafe(no_mangle)]
pub static FORK_CHILD_PID_OFF: Global<u32> = Global::new(20);
#[unsafe(no_mangle)]
pub static EXEC_FILENAME_OFF: Global<u32> = Global::new(8);
#[unsafe(no_mangle)]
pub static EXEC_OLD_PID_OFF: Global<u32> = Global::new(16);
/// `u32::MAX` when the kernel's exit tracepoint has no `group_dead` field.
#[unsafe(no_mangle)]
pub static EXIT_GROUP_DEAD_OFF: Global<u32> = Global::new(32);

/// Increments slot `index` of a per-CPU counter array.
#[inline(always)]
pub fn bump(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = counters.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *slot += 1 };
    }
}
