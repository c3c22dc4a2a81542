//! `cgroup/sock_create`: tagged processes may not open raw or ICMP
//! IPv4/IPv6 sockets (they would bypass connect/sendmsg). The hook never sees
//! AF_PACKET; the launcher drops CAP_NET_RAW for that.

use agent_guard_common::{
    event::{Event, kind, reason, verdict},
    subject::MODE_MONITOR,
};
use aya_ebpf::{macros::cgroup_sock, programs::SockContext};

use crate::{
    decide::current_subject,
    emit,
    judgement::{ALLOW, DENY},
    maps::{DECISIONS, SUBJECTS, bump},
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_UDPLITE: u32 = 136;
const IPPROTO_MPTCP: u32 = 262;
const SOCK_RAW: u32 = 3;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_ICMPV6: u32 = 58;
/// Obsolete SOCK_PACKET on an inet socket, also a raw path.
const SOCK_PACKET: u32 = 10;

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock; volatile keeps each load at
    // a constant offset from the context register, as the verifier wants.
    let (family, sock_type, protocol) = unsafe {
        let sk = ctx.sock;
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*sk).family)),
            core::ptr::read_volatile(core::ptr::addr_of!((*sk).type_)),
            core::ptr::read_volatile(core::ptr::addr_of!((*sk).protocol)),
        )
    };
    // ICMP "ping" sockets (SOCK_DGRAM + IPPROTO_ICMP/ICMPV6) send through
    // a path with no cgroup sendmsg hook, so they are refused like raw ones.
    let icmp = sock_type == SOCK_DGRAM && (protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6);
    // Only protocols whose sends pass the connect/sendmsg hooks: TCP and
    // MPTCP streams, UDP and UDP-Lite datagrams. SCTP (implicit association
    // setup on sendmsg), SOCK_SEQPACKET and others are refused.
    let known = match sock_type {
        SOCK_STREAM => protocol == 0 || protocol == IPPROTO_TCP || protocol == IPPROTO_MPTCP,
        SOCK_DGRAM => {
            protocol == 0 || protocol == IPPROTO_UDP || protocol == IPPROTO_UDPLITE || icmp
        }
        _ => false,
    };
    let other = !known && sock_type != SOCK_RAW && sock_type != SOCK_PACKET;
    if sock_type != SOCK_RAW && sock_type != SOCK_PACKET && !icmp && !other {
        return ALLOW;
    }
    let Some(subject_id) = current_subject() else {
        return ALLOW;
    };
    let monitor = unsafe { SUBJECTS.get(&subject_id) }.is_some_and(|s| s.mode == MODE_MONITOR);
    let (v, ret) = if monitor {
        (verdict::WOULD_DENY, ALLOW)
    } else {
        (verdict::DENY, DENY)
    };
    bump(&DECISIONS, v as u32);
    if let Some(mut entry) = emit::reserve::<Event>(kind::SOCKET) {
        let ev = entry.as_mut_ptr();
        // SAFETY: reservation is sizeof(Event); fully written.
        unsafe {
            ev.write(Event::zeroed());
            let ev = &mut *ev;
            emit::fill_caller(ev, kind::SOCKET, subject_id);
            ev.verdict = v;
            ev.reason = if icmp {
                reason::ICMP_SOCKET
            } else if other {
                reason::UNSUPPORTED_PROTOCOL
            } else {
                reason::RAW_SOCKET
            };
            ev.family = family as u16;
            ev.proto = protocol as u8;
            ev.aux = sock_type;
        }
        entry.submit(emit::submit_flags());
    }
    ret
}
