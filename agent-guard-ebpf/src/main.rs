//! agent-guard kernel side: cgroup socket hooks that fence tagged processes
//! and sched tracepoints that keep their identity across fork/exec/exit.
//!
//! Every program is small: look up, compare, count, emit. Parsing, name
//! resolution and enrichment happen in the daemon.
#![no_std]
#![no_main]
// Atomic fetch-add on map values: the BPF target has no CAS, so the
// `Atomic*` types lack fetch_add; the intrinsic lowers to BPF_ATOMIC|FETCH.
// It must be SeqCst: LLVM's BPF backend lowers a relaxed atomicrmw to the
// legacy XADD, which returns nothing (the "old value" is then garbage).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod connect;
mod decide;
mod dns;
mod emit;
mod flows;
mod judgement;
mod maps;
mod process;
mod sendmsg;
mod sock_create;
mod unix;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier refuses programs with reachable panics.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
