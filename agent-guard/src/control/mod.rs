//! The control socket: newline-delimited JSON over a Unix stream socket.
//!
//! One request line, one response line. The daemon identifies the peer with
//! SO_PEERCRED; a tagged process may only `register` itself under its own
//! identity, nothing else.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

/// Default control socket path.
pub const DEFAULT_SOCKET: &str = "/run/agent-guard/agent-guard.sock";

/// The abstract socket name the daemon also listens on for the control
/// socket at `path` (NUL first, as the kernel compares it). Tagged
/// processes reach the daemon only through this name: the kernel hook lets
/// it through for every tagged process, while the socket *path* is judged
/// like any other (an agent able to replace the path's file with a
/// symlink would otherwise reach the symlink's target through the
/// exemption). Abstract names cannot be replaced or linked to.
pub fn abstract_name(path: &std::path::Path) -> Vec<u8> {
    use sha2::Digest as _;
    use std::os::unix::ffi::OsStrExt as _;
    let digest = sha2::Sha256::digest(path.as_os_str().as_bytes());
    let mut name = b"\0agent-guard-".to_vec();
    name.extend_from_slice(hex::encode(&digest[..16]).as_bytes());
    name
}

/// Largest request line the daemon reads; longer requests are refused.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Tag the calling process (the peer) before it execs: as (tenant,
    /// agent), a task scope of it, or a sub-agent of the caller.
    ///
    /// With `token`, every other field is taken from the signed token and
    /// must be left out.
    Register {
        #[serde(default)]
        tenant: Option<String>,
        #[serde(default)]
        agent: String,
        #[serde(default)]
        task: Option<String>,
        #[serde(default)]
        tools: Option<Vec<String>>,
        #[serde(default)]
        ttl_ms: Option<u64>,
        /// A signed launch token (compact JWS), see `identity::token`.
        #[serde(default)]
        token: Option<String>,
    },
    /// Give (tenant, agent) a tool for a while.
    Grant {
        tenant: String,
        agent: String,
        tool: String,
        ttl_ms: u64,
        #[serde(default)]
        uses: Option<u32>,
        #[serde(default)]
        pid: Option<u32>,
    },
    /// End a grant now.
    Revoke { grant: u32 },
    /// Deny everything to a tenant or one agent until resumed.
    Suspend {
        tenant: String,
        #[serde(default)]
        agent: Option<String>,
    },
    Resume {
        tenant: String,
        #[serde(default)]
        agent: Option<String>,
    },
    /// Daemon state for `agent-guard status`.
    Status,
    /// Replace the policy with `text` (validated first; old policy kept on error).
    PolicyApply { text: String, origin: String },
    /// Pending two-person approval requests (root and approvers).
    ApprovalsList,
    /// Approve request `id` (approvers only; two distinct ones grant it).
    Approve { id: u32 },
    /// Deny request `id` (approvers only; it ends).
    Deny { id: u32 },
    /// Who holds the TCP connection from `peer` to `local` (`IP:PORT` as
    /// the tool server sees them)? Root and the control group; read-only.
    Whois { peer: String, local: String },
}

/// Reply to a [`Request`]: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            data,
        }
    }
    pub fn err(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            data: serde_json::Value::Null,
        }
    }
}

/// What `register` answers: how the launcher must harden itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    pub subject: String,
    pub subject_id: u32,
    pub hardening: crate::policy::Hardening,
    pub mode: crate::policy::Mode,
    pub cgroup: String,
    #[serde(default)]
    pub task_id: Option<String>,
    /// The daemon's pid, so the launcher can keep the agent from signalling it.
    #[serde(default)]
    pub daemon_pid: u32,
    /// Every thread id of the daemon (a signal to any of them, e.g.
    /// `tkill(tid, SIGKILL)`, would stop the whole daemon).
    #[serde(default)]
    pub daemon_tids: Vec<u32>,
    /// Where `PROCS` is pinned, so the launcher can check with the kernel
    /// that it was really tagged before it execs.
    #[serde(default)]
    pub procs_pin: Option<String>,
}
