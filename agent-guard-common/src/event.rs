//! Records the programs send to the daemon through the `EVENTS` ring buffer,
//! plus the verdict and reason codes shared by both sides.

/// Kind tag, the first byte of every record.
pub mod kind {
    pub const CONNECT: u8 = 1;
    pub const SENDMSG: u8 = 2;
    pub const EXEC: u8 = 3;
    pub const FORK: u8 = 4;
    pub const EXIT: u8 = 5;
    pub const SOCKET: u8 = 6;
    /// Number of kinds + 1, the size of the per-kind counter arrays.
    pub const COUNT: u32 = 7;

    pub fn name(kind: u8) -> &'static str {
        match kind {
            CONNECT => "connect",
            SENDMSG => "sendmsg",
            EXEC => "exec",
            FORK => "fork",
            EXIT => "exit",
            SOCKET => "socket",
            _ => "unknown",
        }
    }
}

pub mod verdict {
    pub const ALLOW: u8 = 0;
    pub const DENY: u8 = 1;
    pub const WOULD_DENY: u8 = 2;
    /// Records that carry no decision (exec, fork, exit).
    pub const NONE: u8 = 3;
    pub const COUNT: u32 = 4;

    pub fn name(v: u8) -> &'static str {
        match v {
            ALLOW => "allow",
            DENY => "deny",
            WOULD_DENY => "would_deny",
            _ => "none",
        }
    }
}

pub mod reason {
    pub const NONE: u8 = 0;
    pub const GRANTED: u8 = 1;
    pub const NO_CAPABILITY: u8 = 2;
    pub const EXPIRED: u8 = 3;
    pub const EXHAUSTED: u8 = 4;
    pub const SUSPENDED: u8 = 5;
    pub const UNKNOWN_SUBJECT: u8 = 6;
    pub const RAW_SOCKET: u8 = 7;
    pub const REVOKED: u8 = 8;
    pub const RATE_LIMITED: u8 = 9;
    pub const ICMP_SOCKET: u8 = 10;
    pub const APPROVAL_REQUIRED: u8 = 11;
    pub const UNSUPPORTED_PROTOCOL: u8 = 12;
    /// A DNS call sent to the caller's own per-agent DNS proxy (allowed).
    pub const DNS_PROXIED: u8 = 13;
    /// A connect to agent-guard's own control socket (always allowed).
    pub const CONTROL_SOCKET: u8 = 14;

    pub fn name(r: u8) -> &'static str {
        match r {
            GRANTED => "granted",
            NO_CAPABILITY => "no_capability",
            EXPIRED => "expired",
            EXHAUSTED => "uses_exhausted",
            SUSPENDED => "suspended",
            UNKNOWN_SUBJECT => "unknown_subject",
            RAW_SOCKET => "raw_socket",
            REVOKED => "revoked",
            RATE_LIMITED => "rate_limited",
            ICMP_SOCKET => "icmp_socket",
            APPROVAL_REQUIRED => "approval_required",
            UNSUPPORTED_PROTOCOL => "unsupported_protocol",
            DNS_PROXIED => "dns_proxied",
            CONTROL_SOCKET => "control_socket",
            _ => "none",
        }
    }
}

/// Address family values as in `bpf_sock_addr::user_family`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// One record in the ring buffer. Fixed size for every kind: decisions use
/// the address fields, exec/fork/exit reuse `aux` (parent or old pid) and
/// `path` only for exec.
///
/// Field order keeps 8-byte fields aligned so there is no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// `bpf_ktime_get_ns()` when the call was judged (monotonic).
    pub ts_ns: u64,
    pub cgroup_id: u64,
    /// connect: the socket's cookie (`bpf_get_socket_cookie`), so `whois`
    /// can tell whose socket a tool server's peer is; 0 otherwise.
    pub cookie: u64,
    pub kind: u8,
    pub verdict: u8,
    pub reason: u8,
    pub proto: u8,
    pub family: u16,
    /// Destination port in host order.
    pub port: u16,
    pub subject: u32,
    /// Process (tgid) and thread id of the caller.
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    /// fork: child pid; exec: old pid; socket: socket type.
    pub aux: u32,
    pub tool_id: u32,
    pub grant_id: u32,
    pub _pad: u32,
    /// Destination, IPv6 or v4-mapped.
    pub addr: [u8; 16],
    pub comm: [u8; 16],
}

/// Bytes of an exec record's file name copied by the kernel.
pub const EXEC_PATH_LEN: usize = 128;

/// An exec record: the common [`Event`] followed by the executed file name.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    pub event: Event,
    pub path: [u8; EXEC_PATH_LEN],
}

impl Event {
    pub const fn zeroed() -> Self {
        Self {
            ts_ns: 0,
            cgroup_id: 0,
            cookie: 0,
            kind: 0,
            verdict: verdict::NONE,
            reason: reason::NONE,
            proto: 0,
            family: 0,
            port: 0,
            subject: 0,
            pid: 0,
            tid: 0,
            uid: 0,
            aux: 0,
            tool_id: 0,
            grant_id: 0,
            _pad: 0,
            addr: [0; 16],
            comm: [0; 16],
        }
    }
}

/// Bytes of a decision record (connect, sendmsg): an [`Event`] up to,
/// not including, `comm`. A decision never carries a comm (the daemon has
/// it from the exec and fork records), and every byte less is less the
/// per-call path writes into the ring. Read back with
/// [`Event::from_record`], which takes the missing tail as zeros.
pub const DECISION_LEN: usize = core::mem::offset_of!(Event, comm);

/// The ring reservation of a decision record: [`DECISION_LEN`] bytes laid
/// out as the start of an [`Event`].
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct DecisionRecord {
    pub bytes: [u8; DECISION_LEN],
}

impl DecisionRecord {
    pub const fn zeroed() -> Self {
        Self {
            bytes: [0; DECISION_LEN],
        }
    }
}

impl Event {
    /// The event at the start of a ring record: a full [`Event`], or a
    /// [`DecisionRecord`] whose missing `comm` reads as zeros. `None` when
    /// the record is shorter than either.
    pub fn from_record(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < DECISION_LEN {
            return None;
        }
        let mut ev = Self::zeroed();
        let n = bytes.len().min(core::mem::size_of::<Self>());
        // SAFETY: Event is #[repr(C)] plain data without implicit padding;
        // `n` bytes fit both the record and the event.
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut ev).cast::<u8>(), n);
        }
        Some(ev)
    }
}

/// A decision on a Unix socket call (`family` = `AF_UNIX`) whose path has
/// no id the daemon knows (not in `UNIX_PATHS`, or the control socket):
/// the common [`Event`] (`tool_id`, `grant_id` as usual; `addr` holds the
/// path id, 0 when the path is not in `UNIX_PATHS`; `aux` the path length)
/// followed by the path the caller named, as the kernel compared it. A
/// call to a path of the policy is a plain [`DecisionRecord`] with the
/// path id: the daemon knows the path of every id it gave out (ids are
/// never reused).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UnixEvent {
    pub event: Event,
    pub path: [u8; crate::unix::SUN_PATH_LEN],
    pub _pad: u32,
}
