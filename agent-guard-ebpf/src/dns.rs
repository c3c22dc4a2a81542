//! `cgroup/recvmsg4` and `cgroup/recvmsg6`: a reply from the per-agent DNS
//! proxy shows, as its source, the server the caller asked, so resolvers
//! that check where an answer came from accept it. Only sockets whose DNS
//! call was redirected (they have a `DNS_ORIG` entry) are touched.

use core::ffi::c_void;

use agent_guard_common::dns;
use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};

use crate::maps::{CONFIG, DNS_ORIG};

/// recvmsg programs must return 1 (anything else is an error to the caller).
const PASS: i32 = 1;

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_source(&ctx, false);
    PASS
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_source(&ctx, true);
    PASS
}

#[inline(always)]
fn restore_source(ctx: &SockAddrContext, v6: bool) {
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    let proxy_port = cfg.dns_proxy_port as u16;
    if proxy_port == 0 {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: context reads at constant offsets.
    let (src, port) = unsafe {
        let port = core::ptr::read_volatile(core::ptr::addr_of!((*sa).user_port)) as u16;
        let src = if v6 {
            let w2 = core::ptr::read_volatile(core::ptr::addr_of!((*sa).user_ip6[2]));
            if w2 != u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
                return;
            }
            core::ptr::read_volatile(core::ptr::addr_of!((*sa).user_ip6[3]))
        } else {
            core::ptr::read_volatile(core::ptr::addr_of!((*sa).user_ip4))
        };
        (u32::from_be(src), u16::from_be(port))
    };
    if port != proxy_port || !dns::is_subject_addr(src) {
        return;
    }
    // SAFETY: the context pointer is valid for this call.
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut c_void) };
    // SAFETY: plain data copied out.
    let Some(orig) = (unsafe { DNS_ORIG.get(&cookie) }).copied() else {
        return;
    };
    let a = orig.addr;
    // SAFETY: recvmsg4/6 may write the user address fields.
    unsafe {
        if v6 {
            // One write per word: context writes need constant offsets.
            let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[0]), w(0));
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[1]), w(4));
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[2]), w(8));
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[3]), w(12));
        } else {
            core::ptr::write_volatile(
                core::ptr::addr_of_mut!((*sa).user_ip4),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            );
        }
        core::ptr::write_volatile(
            core::ptr::addr_of_mut!((*sa).user_port),
            u32::from(orig.port_be),
        );
    }
}
