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

/// `uses_left` value for a grant without a use limit.
pub const UNLIMITED_USES: u32 = u32::MAX;

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

/// `GRANTS[key]`: what a matching call is allowed under.
///
/// Owner: daemon writes; programs read per call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantValue {
    pub tool_id: u32,
    /// 0 for the agent's base capability set from policy.
    pub grant_id: u32,
    /// `bpf_ktime_get_ns()` deadline; 0 = no expiry.
    pub expires_at_ns: u64,
    /// Remaining uses, [`UNLIMITED_USES`] for none.
    pub uses_left: u32,
    pub _pad: u32,
}
