//! `cgroup/sendmsg4` and `cgroup/sendmsg6`: unconnected UDP (sendto /
//! sendmsg with an address). Connected UDP was judged at connect().

use agent_guard_common::event::kind;
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::decide::decide;

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, kind::SENDMSG, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, kind::SENDMSG, true)
}
