//! Unix socket endpoints (`cgroup/connect_unix`, `cgroup/sendmsg_unix`).
//!
//! A path is matched exactly, byte for byte, against `UNIX_PATHS`, which
//! maps each path the policy names to a small path id. The id is then
//! looked up in the same capability tries as an IP endpoint, as the key
//! (subject, generation, [`PROTO_UNIX`], port 0, [`path_addr`]`(id)`/128),
//! so base sets, task narrowing, sub-agents, grants, expiry, use counts and
//! rate limits all work for Unix endpoints unchanged.

/// Bytes of `sockaddr_un::sun_path`.
pub const SUN_PATH_LEN: usize = 108;

/// `AF_UNIX` as in `bpf_sock_addr::user_family`.
pub const AF_UNIX: u16 = 1;

/// "Protocol" of a Unix endpoint in capability keys. No IP endpoint uses it
/// (those are TCP or UDP only).
pub const PROTO_UNIX: u8 = 0xfe;

/// Path id of the daemon's own control socket: every tagged process may
/// reach it (a sub-agent is started through it), without a tool.
pub const CONTROL_PATH_ID: u32 = u32::MAX;

/// `UNIX_PATHS` key: a socket address as the kernel compares it. For a
/// pathname socket, the bytes up to the first NUL (at most
/// [`SUN_PATH_LEN`]); for an abstract socket, `\0` and the name's bytes.
/// Bytes past `len` are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixPath {
    pub len: u32,
    pub path: [u8; SUN_PATH_LEN],
}

impl UnixPath {
    pub const fn zeroed() -> Self {
        Self {
            len: 0,
            path: [0; SUN_PATH_LEN],
        }
    }

    /// Key for `bytes` (a path as the policy names it, or `\0name` for an
    /// abstract socket); `None` when it does not fit `sun_path`.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || bytes.len() > SUN_PATH_LEN {
            return None;
        }
        let mut k = Self::zeroed();
        let mut i = 0;
        while i < bytes.len() {
            k.path[i] = bytes[i];
            i += 1;
        }
        k.len = bytes.len() as u32;
        Some(k)
    }

    /// The significant bytes.
    pub fn bytes(&self) -> &[u8] {
        let n = (self.len as usize).min(SUN_PATH_LEN);
        &self.path[..n]
    }
}

/// The address bytes of path id `id` in a capability key.
pub const fn path_addr(id: u32) -> [u8; 16] {
    let b = id.to_be_bytes();
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b[0], b[1], b[2], b[3]]
}

/// Inverse of [`path_addr`].
pub const fn path_id(addr: &[u8; 16]) -> u32 {
    u32::from_be_bytes([addr[12], addr[13], addr[14], addr[15]])
}
