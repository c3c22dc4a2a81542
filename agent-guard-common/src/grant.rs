//! Capabilities: which (protocol, port, address prefix) a subject may reach.
//!
//! `GRANTS` is an LPM trie. The key bytes are laid out most significant
//! first so that the fixed part (subject, generation, protocol, port) is an
//! exact-match prefix and only the address is matched by prefix length.

/// Bits of the fixed part of a [`GrantKey`]: subject(32) + generation(8) +
/// proto(8) + port(16).
pub const FIXED_PREFIX_BITS: u32 = 64;

/// IPPROTO_TCP / IPPROTO_UDP as the kernel reports them.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// LPM trie key (the map's key is `{ prefix_len: u32, data: GrantKey }`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrantKey {
    /// Subject id, big-endian.
    pub subject: [u8; 4],
    /// Low 8 bits of the policy generation the entry belongs to.
    pub generation: u8,
    pub proto: u8,
    /// Destination port, big-endian (network order, as in `bpf_sock_addr`).
    pub port: [u8; 2],
    /// IPv6 address; IPv4 is stored v4-mapped (`::ffff:a.b.c.d`).
    pub addr: [u8; 16],
}

impl GrantKey {
    pub const fn new(subject: u32, generation: u8, proto: u8, port: u16, addr: [u8; 16]) -> Self {
        Self {
            subject: subject.to_be_bytes(),
            generation,
            proto,
            port: port.to_be_bytes(),
            addr,
        }
    }
}

/// `CAPS[key]`: what a matching call is allowed under.
///
/// `CAPS` holds the policy's base capability sets (keys carry the policy
/// generation); `GRANTS` holds just-in-time grants (generation 0, values
/// [`GrantSlots`]), whose life is in `GRANT_STATE[grant_id]`. Two tries,
/// because an LPM lookup returns only the longest match: a dead grant must
/// not hide a base entry.
///
/// Owner: daemon writes; programs read per call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantValue {
    pub tool_id: u32,
    /// 0 for the agent's base capability set from policy.
    pub grant_id: u32,
}

/// How many grants one `GRANTS` key can hold at once.
pub const GRANT_SLOTS: usize = 8;

/// `GRANTS[key]`: every live grant that covers the key, so overlapping
/// grants (same endpoint: the same tool granted twice, two tools sharing an
/// endpoint, a shorter prefix of another grant) each hold on their own. The
/// daemon folds the grants of shorter covering prefixes into each key
/// (an LPM lookup returns only the longest match) and orders the slots:
/// grants without a use count first, then by id. The programs take the
/// first slot whose grant is alive.
///
/// Owner: daemon writes; programs read per call when `CAPS` misses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantSlots {
    /// Slots in use, from the front (at most [`GRANT_SLOTS`]).
    pub len: u32,
    pub _pad: u32,
    pub tool_ids: [u32; GRANT_SLOTS],
    pub grant_ids: [u32; GRANT_SLOTS],
}

impl GrantSlots {
    /// The (tool id, grant id) pairs in use.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        let n = (self.len as usize).min(GRANT_SLOTS);
        self.tool_ids[..n]
            .iter()
            .copied()
            .zip(self.grant_ids[..n].iter().copied())
    }
}

/// `GrantValue::grant_id` of a `CAPS` entry whose tool needs two-person
/// approval: the call is refused with reason `approval_required`.
pub const APPROVAL_REQUIRED: u32 = u32::MAX;

/// `GrantState::flags`: the grant counts uses.
pub const GRANT_LIMITED_USES: u32 = 1;
/// `GrantState::flags`: revoked; denies at once, entries are removed later.
pub const GRANT_REVOKED: u32 = 2;

/// `GRANT_STATE[grant id]`: the life of one grant, shared by every entry
/// (endpoint, sub-agent copy) of it, so expiry, uses and revocation apply
/// to all of them at once.
///
/// Owner: daemon creates and revokes; programs check and count uses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantState {
    /// `bpf_ktime_get_ns()` deadline; 0 = none.
    pub expires_at_ns: u64,
    /// Uses left when [`GRANT_LIMITED_USES`] is set; decremented atomically
    /// by the programs, may go below zero under a race (still denied).
    pub uses_left: i64,
    pub flags: u32,
    pub _pad: u32,
}

/// `TOOLS[tool id]`: per-tool limits. Owner: daemon writes, programs read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ToolLimit {
    /// Calls allowed per window per agent; 0 = no limit.
    pub calls: u32,
    pub _pad: u32,
    pub per_ns: u64,
}

/// `RATE[(agent id << 32) | tool id]`: the current fixed window's count.
/// Owner: programs (LRU, so it stays bounded).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    pub window: u64,
    pub count: u64,
}

pub const fn rate_key(agent_id: u32, tool_id: u32) -> u64 {
    ((agent_id as u64) << 32) | tool_id as u64
}
