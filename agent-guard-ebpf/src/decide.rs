//! The one decision path shared by connect4/6 and sendmsg4/6, so the hooks
//! cannot drift apart.

use agent_guard_common::{
    event::{AF_INET, AF_INET6, Event, reason, verdict},
    grant::{FIXED_PREFIX_BITS, GrantKey, UNLIMITED_USES},
    subject::{FLAG_SUSPENDED, MODE_MONITOR},
};
use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};

use crate::{
    emit,
    maps::{CGROUPS, CONFIG, DECISIONS, GRANTS, PROCS, SUBJECTS, bump},
};

/// Return value that lets the call proceed.
pub const ALLOW: i32 = 1;
/// Return value that makes the call fail with EPERM.
pub const DENY: i32 = 0;

/// Subject of the calling task: its process first, then its cgroup. Both
/// keys come from the task, never from the socket (a passed-in socket is
/// judged by who uses it).
#[inline(always)]
pub fn current_subject() -> Option<u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: plain u32 values, copied out at once.
    if let Some(s) = unsafe { PROCS.get(&tgid) } {
        return Some(*s);
    }
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    unsafe { CGROUPS.get(&cgroup) }.copied()
}

/// Reads one u32 field of the context. The verifier only accepts context
/// loads at a constant offset from the context register; volatile reads stop
/// the compiler from forming a derived pointer first.
macro_rules! ctx_u32 {
    ($sa:expr, $($field:tt)+) => {
        // SAFETY: the kernel hands a valid bpf_sock_addr to these programs.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$sa).$($field)+)) }
    };
}

/// Destination of a sock_addr call as (family, v6-or-v4-mapped bytes, port).
/// `v6` is a constant per hook: a v4 hook may not even read `user_ip6`.
#[inline(always)]
fn destination(ctx: &SockAddrContext, v6: bool) -> (u16, [u8; 16], u16) {
    let sa = ctx.sock_addr;
    let family = if v6 { AF_INET6 } else { AF_INET };
    let port = u16::from_be(ctx_u32!(sa, user_port) as u16);
    let mut addr = [0u8; 16];
    if !v6 {
        let v4 = ctx_u32!(sa, user_ip4).to_ne_bytes();
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..16].copy_from_slice(&v4);
    } else {
        let w0 = ctx_u32!(sa, user_ip6[0]).to_ne_bytes();
        let w1 = ctx_u32!(sa, user_ip6[1]).to_ne_bytes();
        let w2 = ctx_u32!(sa, user_ip6[2]).to_ne_bytes();
        let w3 = ctx_u32!(sa, user_ip6[3]).to_ne_bytes();
        addr[0..4].copy_from_slice(&w0);
        addr[4..8].copy_from_slice(&w1);
        addr[8..12].copy_from_slice(&w2);
        addr[12..16].copy_from_slice(&w3);
    }
    (family, addr, port)
}

/// Judges one connect/sendmsg call of kind `kind`. Untagged callers cost
/// two hash lookups and nothing else.
#[inline(always)]
pub fn decide(ctx: &SockAddrContext, kind: u8, v6: bool) -> i32 {
    let Some(subject_id) = current_subject() else {
        return ALLOW;
    };
    let proto = ctx_u32!(ctx.sock_addr, protocol) as u8;
    let (family, addr, port) = destination(ctx, v6);

    let mut tool_id = 0;
    let mut grant_id = 0;
    let mode;
    let mut why = reason::NO_CAPABILITY;
    let mut covered = false;

    match unsafe { SUBJECTS.get(&subject_id) } {
        // Fail closed: a tagged process whose subject vanished reaches nothing.
        None => {
            mode = 0;
            why = reason::UNKNOWN_SUBJECT;
        }
        Some(subject) => {
            mode = subject.mode;
            if subject.flags & FLAG_SUSPENDED != 0 {
                why = reason::SUSPENDED;
            } else {
                let generation = CONFIG.get(0).map(|c| c.generation).unwrap_or(0) as u8;
                let key = Key::new(
                    FIXED_PREFIX_BITS + 128,
                    GrantKey::new(subject_id, generation, proto, port, addr),
                );
                if let Some(grant) = GRANTS.get(&key) {
                    tool_id = grant.tool_id;
                    grant_id = grant.grant_id;
                    let now = unsafe { bpf_ktime_get_ns() };
                    if grant.expires_at_ns != 0 && now >= grant.expires_at_ns {
                        why = reason::EXPIRED;
                    } else if grant.uses_left != UNLIMITED_USES && grant.uses_left == 0 {
                        why = reason::EXHAUSTED;
                    } else {
                        why = reason::GRANTED;
                        covered = true;
                    }
                }
            }
        }
    }

    let (v, ret) = if covered {
        (verdict::ALLOW, ALLOW)
    } else if mode == MODE_MONITOR {
        (verdict::WOULD_DENY, ALLOW)
    } else {
        (verdict::DENY, DENY)
    };
    bump(&DECISIONS, v as u32);

    if let Some(mut entry) = emit::reserve::<Event>(kind) {
        let ev = entry.as_mut_ptr();
        // SAFETY: the reservation is sizeof(Event) bytes; fully written below.
        unsafe {
            ev.write(Event::zeroed());
            let ev = &mut *ev;
            emit::fill_caller(ev, kind, subject_id);
            ev.verdict = v;
            ev.reason = why;
            ev.proto = proto;
            ev.family = family;
            ev.port = port;
            ev.addr = addr;
            ev.tool_id = tool_id;
            ev.grant_id = grant_id;
        }
        entry.submit(emit::submit_flags());
    }
    ret
}
