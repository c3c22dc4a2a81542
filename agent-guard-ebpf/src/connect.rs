//! `cgroup/connect4` and `cgroup/connect6`: TCP and connected UDP.

use agent_guard_common::event::kind;
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::decide::decide;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, kind::CONNECT, false)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, kind::CONNECT, true)
}
