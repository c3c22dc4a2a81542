//! Types shared by the eBPF programs and the daemon.
//!
//! Every type here is `#[repr(C)]` and plain old data: the kernel writes it
//! into maps and the ring buffer, userspace reads the same bytes. Organised by
//! concept (`subject`, `grant`, `event`), as kunai does. With feature `user`
//! the types also implement `aya::Pod` so the daemon can use them as map keys
//! and values.
#![no_std]

pub mod event;
pub mod flow;
pub mod grant;
pub mod subject;
pub mod unix;

/// Per-agent DNS: where a tagged process's DNS calls are redirected.
pub mod dns {
    /// `127.64.0.0/10`: subject `S` is `127.64.0.0 | S`.
    pub const SUBJECT_NET: u32 = 0x7f40_0000;
    pub const SUBJECT_MASK: u32 = 0xffc0_0000;
    /// Largest subject id an address can carry.
    pub const MAX_SUBJECT: u32 = !SUBJECT_MASK;
    pub const DNS_PORT: u16 = 53;

    /// Host-order IPv4 address of subject `id`'s resolver.
    pub const fn subject_addr(id: u32) -> u32 {
        SUBJECT_NET | (id & MAX_SUBJECT)
    }

    pub const fn is_subject_addr(addr: u32) -> bool {
        addr & SUBJECT_MASK == SUBJECT_NET
    }

    /// `DNS_ORIG[socket cookie]`: where the caller meant to send, restored
    /// as the source of the proxy's replies (`cgroup/recvmsg4/6`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct DnsOrig {
        /// The destination as the hook saw it: IPv4 in `addr[12..16]`
        /// (v4 hooks) or the IPv6 bytes (v6 hooks).
        pub addr: [u8; 16],
        /// Network order, as in `bpf_sock_addr::user_port`.
        pub port_be: u16,
        pub _pad: [u8; 6],
    }
}

/// Names of the maps, shared so the loader and the programs cannot disagree.
pub mod maps {
    pub const PROCS: &str = "PROCS";
    pub const CGROUPS: &str = "CGROUPS";
    pub const SUBJECTS: &str = "SUBJECTS";
    pub const CAPS: &str = "CAPS";
    pub const CAPS_EXACT: &str = "CAPS_EXACT";
    pub const GRANTS: &str = "GRANTS";
    pub const GRANT_STATE: &str = "GRANT_STATE";
    pub const TOOLS: &str = "TOOLS";
    pub const RATE: &str = "RATE";
    pub const CONFIG: &str = "CONFIG";
    pub const EVENTS: &str = "EVENTS";
    pub const LOST: &str = "LOST";
    pub const DECISIONS: &str = "DECISIONS";
    pub const UNIX_PATHS: &str = "UNIX_PATHS";
    pub const DNS_ORIG: &str = "DNS_ORIG";
    pub const FLOWS: &str = "FLOWS";
    pub const FLOW_CONFIG: &str = "FLOW_CONFIG";
    pub const FLOW_FALLBACKS: &str = "FLOW_FALLBACKS";
}

/// Capacities of the maps; the daemon reports them as
/// `agent_guard_map_capacity{map}`.
pub mod capacity {
    pub const PROCS: u32 = 65_536;
    pub const CGROUPS: u32 = 4_096;
    pub const SUBJECTS: u32 = 16_384;
    pub const CAPS: u32 = 262_144;
    pub const GRANTS: u32 = 65_536;
    pub const GRANT_STATE: u32 = 16_384;
    pub const TOOLS: u32 = 4_096;
    pub const RATE: u32 = 16_384;
    /// Distinct Unix socket paths named by the policy, plus the control
    /// socket.
    pub const UNIX_PATHS: u32 = 4_096;
    /// Sockets whose DNS traffic was redirected to the per-agent proxy
    /// (LRU: the oldest are forgotten first).
    pub const DNS_ORIG: u32 = 65_536;
    /// Flows (`--flow-records`) counted between two flushes, both epochs
    /// together; when full, a call gets its own ring record instead.
    pub const FLOWS: u32 = 16_384;
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 24;
}

/// Global configuration written by the daemon into `CONFIG[0]`.
///
/// Owner: daemon writes, programs read on every tagged call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Policy generation currently in force; grant keys carry it so a reload
    /// can install the next generation beside the current one and flip.
    pub generation: u32,
    /// Force a consumer wakeup when this many bytes wait in the ring buffer.
    pub wakeup_bytes: u32,
    /// Offsets of `uaddr` and `uaddrlen` in the kernel's
    /// `struct bpf_sock_addr_kern` (read from the kernel's BTF), for the
    /// Unix socket hooks; [`UNIX_OFFSETS_UNKNOWN`] when not known, and then
    /// the Unix hooks deny every tagged call.
    pub unix_uaddr_off: u32,
    pub unix_uaddrlen_off: u32,
    /// Port of the per-agent DNS proxy; 0 = off. When set, every DNS call
    /// (port 53, TCP or UDP) of a tagged process goes to
    /// `dns::subject_addr(subject):dns_proxy_port` instead.
    pub dns_proxy_port: u32,
    pub _pad: u32,
}

/// [`Config::unix_uaddr_off`] when the layout is not known.
pub const UNIX_OFFSETS_UNKNOWN: u32 = u32::MAX;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain data with no padding holes
    // that the kernel would reject (padding is explicit and zeroed).
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::subject::Subject {}
    unsafe impl aya::Pod for super::grant::GrantKey {}
    unsafe impl aya::Pod for super::grant::GrantValue {}
    unsafe impl aya::Pod for super::grant::GrantSlots {}
    unsafe impl aya::Pod for super::grant::GrantState {}
    unsafe impl aya::Pod for super::grant::ToolLimit {}
    unsafe impl aya::Pod for super::grant::RateWindow {}
    unsafe impl aya::Pod for super::unix::UnixPath {}
    unsafe impl aya::Pod for super::dns::DnsOrig {}
    unsafe impl aya::Pod for super::flow::FlowKey {}
    unsafe impl aya::Pod for super::flow::FlowStats {}
    unsafe impl aya::Pod for super::flow::FlowConfig {}
}
