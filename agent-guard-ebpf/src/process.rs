//! sched tracepoints: identity follows a tagged process through fork, exec
//! and exit. Field offsets come from the daemon (tracefs `format` files).

use agent_guard_common::event::{EXEC_PATH_LEN, Event, ExecEvent, kind};
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    decide::current_subject,
    emit,
    maps::{EXEC_FILENAME_OFF, EXEC_OLD_PID_OFF, EXIT_GROUP_DEAD_OFF, FORK_CHILD_PID_OFF, PROCS},
};

/// Sends a process record (fork/exit) of `kind` with `aux`.
#[inline(always)]
fn emit_process(kind: u8, subject: u32, aux: u32) {
    if let Some(mut entry) = emit::reserve::<Event>(kind) {
        let ev = entry.as_mut_ptr();
        // SAFETY: reservation is sizeof(Event); fully written.
        unsafe {
            ev.write(Event::zeroed());
            emit::fill_caller(&mut *ev, kind, subject);
            (*ev).aux = aux;
        }
        entry.submit(emit::submit_flags());
    }
}

/// The child inherits the parent's subject in `PROCS`, whichever anchor the
/// parent was found by, so leaving the cgroup later does not free it.
/// In this tracepoint the current task is the parent.
#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let Some(subject) = current_subject() else {
        return 0;
    };
    // SAFETY: offset read from this kernel's format file.
    let Ok(child) = (unsafe { ctx.read_at::<u32>(FORK_CHILD_PID_OFF.load() as usize) }) else {
        return 0;
    };
    // Threads are inserted too (the tracepoint cannot tell them apart); the
    // exit tracepoint removes their entries.
    let _ = PROCS.insert(&child, &subject, 0);
    emit_process(kind::FORK, subject, child);
    0
}

/// Records the executed file. When a non-leader thread execs, its old tid
/// disappears without an exit event, so its entry is removed here.
#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let Some(subject) = current_subject() else {
        return 0;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let old_pid = unsafe { ctx.read_at::<u32>(EXEC_OLD_PID_OFF.load() as usize) }.unwrap_or(tgid);
    if old_pid != tgid {
        let _ = PROCS.remove(&old_pid);
    }
    let Some(mut entry) = emit::reserve::<ExecEvent>(kind::EXEC) else {
        return 0;
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: reservation is sizeof(ExecEvent); header and path written
    // before submit (path zeroed first so a short read leaves no garbage).
    unsafe {
        (*rec).event = Event::zeroed();
        (*rec).path = [0; EXEC_PATH_LEN];
        emit::fill_caller(&mut (*rec).event, kind::EXEC, subject);
        (*rec).event.aux = old_pid;
        // __data_loc: low 16 bits offset from the record start, high 16 length.
        if let Ok(loc) = ctx.read_at::<u32>(EXEC_FILENAME_OFF.load() as usize) {
            let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
            let _ = bpf_probe_read_kernel_str_bytes(src, &mut (*rec).path);
        }
    }
    entry.submit(emit::submit_flags());
    0
}

/// Fires per thread. A thread's own entry goes with it; the process entry
/// goes only when the whole group is dead, so still-running threads keep
/// their identity.
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if tid != tgid {
        let _ = PROCS.remove(&tid);
    }
    let off = EXIT_GROUP_DEAD_OFF.load();
    if off == u32::MAX {
        // Older kernels: the daemon sweeps entries of dead processes.
        return 0;
    }
    let group_dead = unsafe { ctx.read_at::<u8>(off as usize) }.unwrap_or(0) != 0;
    if !group_dead {
        return 0;
    }
    let Some(subject) = current_subject() else {
        return 0;
    };
    let _ = PROCS.remove(&tgid);
    emit_process(kind::EXIT, subject, 0);
    0
}
