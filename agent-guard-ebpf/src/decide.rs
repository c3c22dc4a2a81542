//! The one decision path shared by connect4/6 and sendmsg4/6, so the hooks
//! cannot drift apart.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use core::ffi::c_void;

use agent_guard_common::{
    dns::{self, DnsOrig},
    event::{AF_INET, AF_INET6, kind, reason, verdict},
    grant::{
        APPROVAL_REQUIRED, FIXED_PREFIX_BITS, GRANT_LIMITED_USES, GRANT_REVOKED, GRANT_SLOTS,
        GrantKey, PROTO_TCP, PROTO_UDP, RateWindow, rate_key,
    },
    subject::{FLAG_REVOKED, FLAG_SUSPENDED, MODE_ENFORCE, MODE_MONITOR},
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_socket_cookie,
        bpf_ktime_get_ns,
    },
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};

use crate::judgement::{ALLOW, DENY, Judgement};
use crate::{
    emit, flows,
    maps::{
        CAPS, CAPS_EXACT, CGROUPS, CONFIG, DECISIONS, DNS_ORIG, GRANT_STATE, GRANTS, PROCS, RATE,
        SUBJECTS, TOOLS, bump,
    },
};

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

/// What a capability lookup found: the tool and grant it matched, and the
/// verdict reason.
struct Match {
    tool_id: u32,
    grant_id: u32,
    reason: u8,
}

/// Is the call covered? Base capabilities first, then just-in-time grants
/// (whose expiry and revocation live in `GRANT_STATE`).
#[inline(always)]
fn find_capability(
    subject_id: u32,
    generation: u8,
    proto: u8,
    port: u16,
    addr: [u8; 16],
    now: u64,
) -> Match {
    let mut key = Key::new(
        FIXED_PREFIX_BITS + 128,
        GrantKey::new(subject_id, generation, proto, port, addr),
    );
    // A base tool that needs two-person approval is reached only under a
    // live grant (made when the approval's quorum is reached).
    let mut refused = Match {
        tool_id: 0,
        grant_id: 0,
        reason: reason::NO_CAPABILITY,
    };
    // SAFETY: plain data copied out.
    let base = match unsafe { CAPS_EXACT.get(&key.data) } {
        Some(cap) => Some(*cap),
        None => CAPS.get(&key).copied(),
    };
    if let Some(cap) = base {
        if cap.grant_id != APPROVAL_REQUIRED {
            return Match {
                tool_id: cap.tool_id,
                grant_id: 0,
                reason: reason::GRANTED,
            };
        }
        refused = Match {
            tool_id: cap.tool_id,
            grant_id: 0,
            reason: reason::APPROVAL_REQUIRED,
        };
    }
    key.data.generation = 0;
    let Some(slots) = GRANTS.get(&key) else {
        return refused;
    };
    // The first live grant of the key wins; if none is alive, the first
    // slot's reason is reported.
    let mut dead: Option<Match> = None;
    let len = slots.len as usize;
    for i in 0..GRANT_SLOTS {
        if i >= len {
            break;
        }
        let m = Match {
            tool_id: slots.tool_ids[i],
            grant_id: slots.grant_ids[i],
            reason: grant_standing(slots.grant_ids[i], now),
        };
        if m.reason == reason::GRANTED {
            return m;
        }
        if dead.is_none() {
            dead = Some(m);
        }
    }
    // Pending approval says more than a dead grant of the same tool.
    if refused.reason == reason::APPROVAL_REQUIRED {
        return refused;
    }
    dead.unwrap_or(refused)
}

/// Is grant `grant_id` alive at `now`: not revoked, not expired, a use
/// left? (The use itself is taken after the rate limit, in `take_use`.)
#[inline(always)]
fn grant_standing(grant_id: u32, now: u64) -> u8 {
    // SAFETY: plain data copied out.
    match unsafe { GRANT_STATE.get(&grant_id) }.copied() {
        None => reason::REVOKED,
        Some(st) if st.flags & GRANT_REVOKED != 0 => reason::REVOKED,
        Some(st) if st.expires_at_ns != 0 && now >= st.expires_at_ns => reason::EXPIRED,
        Some(st) if st.flags & GRANT_LIMITED_USES != 0 && st.uses_left <= 0 => reason::EXHAUSTED,
        Some(_) => reason::GRANTED,
    }
}

/// Fixed-window rate limit per (agent, tool). A window reset can race with
/// another CPU and let a few extra calls through at the boundary.
#[inline(always)]
fn rate_limited(agent_id: u32, tool_id: u32, now: u64) -> bool {
    // SAFETY: plain data copied out.
    let Some(limit) = (unsafe { TOOLS.get(&tool_id) }).copied() else {
        return false;
    };
    if limit.calls == 0 || limit.per_ns == 0 {
        return false;
    }
    let window = now / limit.per_ns;
    let key = rate_key(agent_id, tool_id);
    match RATE.get_ptr_mut(&key) {
        Some(w) => {
            // SAFETY: valid map value pointer; the count is updated atomically.
            unsafe {
                if (*w).window != window {
                    (*w).window = window;
                    (*w).count = 0;
                }
                let count =
                    atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*w).count, 1);
                count >= u64::from(limit.calls)
            }
        }
        None => {
            let _ = RATE.insert(&key, &RateWindow { window, count: 1 }, 0);
            false
        }
    }
}

/// Takes one use of a use-counted grant; false when none is left.
#[inline(always)]
fn take_use(grant_id: u32) -> bool {
    let Some(state) = GRANT_STATE.get_ptr_mut(&grant_id) else {
        return false;
    };
    // SAFETY: valid map value pointer; the counter is updated atomically.
    unsafe {
        if (*state).flags & GRANT_LIMITED_USES == 0 {
            return true;
        }
        atomic_xadd::<i64, i64, { AtomicOrdering::SeqCst }>(&raw mut (*state).uses_left, -1) > 0
    }
}

/// Why a subject may reach nothing right now (missing, suspended,
/// revoked, expired), or `None` when it is in good standing; and its mode.
#[inline(always)]
fn standing(subject_id: u32, now: u64) -> (Option<u8>, u8, u32) {
    // SAFETY: plain data copied out.
    let Some(subject) = unsafe { SUBJECTS.get(&subject_id) }.copied() else {
        // Fail closed: a tagged process whose subject vanished reaches nothing.
        return (Some(reason::UNKNOWN_SUBJECT), MODE_ENFORCE, 0);
    };
    let why = if subject.flags & FLAG_SUSPENDED != 0 {
        Some(reason::SUSPENDED)
    } else if subject.flags & FLAG_REVOKED != 0 {
        Some(reason::REVOKED)
    } else if subject.expires_at_ns != 0 && now >= subject.expires_at_ns {
        Some(reason::EXPIRED)
    } else {
        None
    };
    (why, subject.mode, subject.agent_id)
}

/// Judges a call of `subject_id` to the capability key (proto, port,
/// addr) at `now`: subject state, base set, grants, rate limit, uses.
/// Counts the verdict.
#[inline(always)]
pub fn judge(
    subject_id: u32,
    generation: u8,
    proto: u8,
    port: u16,
    addr: [u8; 16],
    now: u64,
) -> Judgement {
    let (why, mode, agent_id) = standing(subject_id, now);
    if let Some(r) = why {
        return settle(0, 0, r, mode);
    }
    let mut m = find_capability(subject_id, generation, proto, port, addr, now);
    if m.reason == reason::GRANTED && rate_limited(agent_id, m.tool_id, now) {
        m.reason = reason::RATE_LIMITED;
    }
    // Uses are taken last, so a refused call never spends one.
    if m.reason == reason::GRANTED && m.grant_id != 0 && !take_use(m.grant_id) {
        m.reason = reason::EXHAUSTED;
    }
    settle(m.tool_id, m.grant_id, m.reason, mode)
}

/// A DNS call of a subject in good standing goes to its own proxy address;
/// the original destination is kept for the replies' source. v4-mapped
/// for v6 sockets; an unconnected IPv6 send cannot be rewritten to a
/// v4-mapped address (the kernel refuses it), so it is refused here.
#[inline(always)]
fn redirect_dns(
    ctx: &SockAddrContext,
    subject_id: u32,
    proxy_port: u16,
    kind: u8,
    v6: bool,
    addr: [u8; 16],
    now: u64,
) -> Judgement {
    let (why, mode, _) = standing(subject_id, now);
    if let Some(r) = why {
        return settle(0, 0, r, mode);
    }
    if (v6 && kind == kind::SENDMSG) || subject_id > dns::MAX_SUBJECT {
        return settle(0, 0, reason::UNSUPPORTED_PROTOCOL, MODE_ENFORCE);
    }
    let sa = ctx.sock_addr;
    let orig = DnsOrig {
        addr,
        port_be: ctx_u32!(sa, user_port) as u16,
        _pad: [0; 6],
    };
    // SAFETY: the context pointer is valid for this call.
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut c_void) };
    if DNS_ORIG.insert(&cookie, &orig, 0).is_err() {
        return settle(0, 0, reason::UNSUPPORTED_PROTOCOL, MODE_ENFORCE);
    }
    let to = dns::subject_addr(subject_id).to_be_bytes();
    let port = u32::from(proxy_port.to_be());
    // SAFETY: connect4/6 and sendmsg4/6 may write the user address fields.
    unsafe {
        if v6 {
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[0]), 0);
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[1]), 0);
            core::ptr::write_volatile(
                core::ptr::addr_of_mut!((*sa).user_ip6[2]),
                u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            );
            core::ptr::write_volatile(
                core::ptr::addr_of_mut!((*sa).user_ip6[3]),
                u32::from_ne_bytes(to),
            );
        } else {
            core::ptr::write_volatile(
                core::ptr::addr_of_mut!((*sa).user_ip4),
                u32::from_ne_bytes(to),
            );
        }
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_port), port);
    }
    settle(0, 0, reason::DNS_PROXIED, mode)
}

/// Is this a DNS call the proxy takes: port 53 over TCP or UDP, or any
/// call to the proxy's own addresses (so an agent cannot speak to another
/// subject's resolver address directly).
#[inline(always)]
fn is_dns(proxy_port: u16, proto: u8, port: u16, addr: &[u8; 16]) -> bool {
    if proxy_port == 0 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return false;
    }
    let v4_mapped = addr[..10] == [0u8; 10] && addr[10] == 0xff && addr[11] == 0xff;
    let v4 = u32::from_be_bytes([addr[12], addr[13], addr[14], addr[15]]);
    port == dns::DNS_PORT || (v4_mapped && dns::is_subject_addr(v4) && port == proxy_port)
}

/// Turns a reason into a verdict under `mode` and counts it.
#[inline(always)]
pub fn settle(tool_id: u32, grant_id: u32, reason: u8, mode: u8) -> Judgement {
    let allowed = reason == reason::GRANTED
        || reason == reason::DNS_PROXIED
        || reason == reason::CONTROL_SOCKET;
    let (verdict, ret) = if allowed {
        (verdict::ALLOW, ALLOW)
    } else if mode == MODE_MONITOR {
        (verdict::WOULD_DENY, ALLOW)
    } else {
        (verdict::DENY, DENY)
    };
    bump(&DECISIONS, verdict as u32);
    Judgement {
        tool_id,
        grant_id,
        reason,
        verdict,
        ret,
    }
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
    let now = unsafe { bpf_ktime_get_ns() };
    // CONFIG once per call: generation, DNS proxy port, wakeup threshold.
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    let proxy_port = cfg.dns_proxy_port as u16;
    let j = if is_dns(proxy_port, proto, port, &addr) {
        redirect_dns(ctx, subject_id, proxy_port, kind, v6, addr, now)
    } else {
        judge(subject_id, cfg.generation as u8, proto, port, addr, now)
    };

    if flows::counted(subject_id, &j, addr, port, family, kind, proto, now) {
        return j.ret;
    }

    let sa = ctx.sock_addr;
    emit::decision(kind, subject_id, now, &j, cfg.wakeup_bytes, |ev| {
        // SAFETY: a zeroed decision record; fields before `comm` only.
        unsafe {
            (*ev).proto = proto;
            (*ev).family = family;
            (*ev).port = port;
            (*ev).addr = addr;
            if kind == kind::CONNECT {
                // SAFETY: the context pointer is valid for this call.
                (*ev).cookie = bpf_get_socket_cookie(sa as *mut c_void);
            }
        }
    });
    j.ret
}
