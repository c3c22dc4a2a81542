//! Workload identity: who a tagged process is.
//!
//! `PROCS: tgid (u32) -> subject id (u32)` and
//! `CGROUPS: cgroup id (u64) -> subject id (u32)` are the two anchors; the
//! subject id then selects a [`Subject`] in `SUBJECTS`.

/// `Subject::agent_id` is the root agent's subject id: sub-agents and task
/// scopes share their root's rate limits.
///
/// Subject id 0 is never allocated, so a zeroed value cannot alias a subject.
pub const NO_SUBJECT: u32 = 0;

/// Decision mode of a subject.
pub const MODE_ENFORCE: u8 = 0;
/// Monitor: allow, but report `would_deny`.
pub const MODE_MONITOR: u8 = 1;

/// `Subject::flags`: everything is denied (tenant or agent suspended).
pub const FLAG_SUSPENDED: u8 = 1;
/// `Subject::flags`: this subject's capabilities were taken (divergence).
pub const FLAG_REVOKED: u8 = 2;

/// `SUBJECTS[subject id]`.
///
/// Owner: daemon writes at policy load and launch; programs read per call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Subject {
    pub tenant_id: u32,
    pub agent_id: u32,
    /// Parent subject for sub-agents, [`NO_SUBJECT`] for a root agent.
    pub parent: u32,
    pub depth: u8,
    pub mode: u8,
    pub flags: u8,
    pub _pad: u8,
    /// `bpf_ktime_get_ns()` after which the subject reaches nothing (task
    /// TTL); 0 = no expiry.
    pub expires_at_ns: u64,
}
