//! `cgroup/connect_unix` and `cgroup/sendmsg_unix` (kernel 6.7+): tagged
//! processes reach only the Unix socket paths their tools list, plus the
//! daemon's control socket.
//!
//! aya 0.14 knows neither attach type, so these programs sit in a section
//! aya parses (`cgroup/connect4`) and the daemon loads them itself with the
//! right expected attach type (agent-guard/src/kernel/unix.rs); aya never
//! loads them.
//!
//! The path is not in `bpf_sock_addr`'s user-visible fields. The program's
//! context is really a `struct bpf_sock_addr_kern` whose `uaddr` points at
//! the kernel's copy of the caller's address; the daemon reads the field
//! offsets from the kernel's BTF into `CONFIG`, and the program copies the
//! fields with `bpf_probe_read_kernel` (allowed for privileged loaders).

use core::ffi::c_void;

use agent_guard_common::{
    Config, UNIX_OFFSETS_UNKNOWN,
    event::{Event, UnixEvent, kind, reason},
    subject::MODE_ENFORCE,
    unix::{AF_UNIX, CONTROL_PATH_ID, PROTO_UNIX, SUN_PATH_LEN, UnixPath, path_addr},
};
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_probe_read_kernel},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::{
    decide::{current_subject, judge, settle},
    emit, flows,
    judgement::{ALLOW, Judgement},
    maps::{CONFIG, UNIX_PATHS},
};

/// Both fields must lie in the first `HEAD` bytes of `bpf_sock_addr_kern`
/// (40 bytes on 6.7+): a bound on offsets the daemon read from BTF.
const HEAD: usize = 64;

// Section `cgroup/connect4` only so aya 0.14 parses the object; loaded with
// expected attach type BPF_CGROUP_UNIX_CONNECT by the daemon.
#[cgroup_sock_addr(connect4)]
pub fn connect_unix(ctx: SockAddrContext) -> i32 {
    decide_unix(&ctx, kind::CONNECT)
}

// Loaded with expected attach type BPF_CGROUP_UNIX_SENDMSG.
#[cgroup_sock_addr(connect4)]
pub fn sendmsg_unix(ctx: SockAddrContext) -> i32 {
    decide_unix(&ctx, kind::SENDMSG)
}

/// Copies the address the caller named into `key` the way the kernel will
/// use it: a pathname up to its first NUL, an abstract name whole. False
/// when it cannot be read.
#[inline(always)]
fn read_path(ctx: &SockAddrContext, cfg: &Config, key: &mut UnixPath) -> bool {
    let uaddr_off = cfg.unix_uaddr_off as usize;
    let len_off = cfg.unix_uaddrlen_off as usize;
    if cfg.unix_uaddr_off == UNIX_OFFSETS_UNKNOWN || uaddr_off + 8 > HEAD || len_off + 4 > HEAD {
        return false;
    }
    // Two reads of exactly the two fields: copying the struct's first 64
    // bytes once and picking the fields out byte by byte measured ~100 ns
    // more per call (BENCHMARKS part 7).
    let base = ctx.sock_addr as *const u8;
    let mut uaddr: u64 = 0;
    let mut addr_len: u32 = 0;
    // SAFETY: both offsets lie inside the struct (checked above); the
    // helper copies from a kernel address and fails cleanly.
    unsafe {
        if bpf_probe_read_kernel(
            core::ptr::addr_of_mut!(uaddr).cast(),
            8,
            base.add(uaddr_off).cast(),
        ) < 0
            || bpf_probe_read_kernel(
                core::ptr::addr_of_mut!(addr_len).cast(),
                4,
                base.add(len_off).cast(),
            ) < 0
        {
            return false;
        }
    }
    if uaddr == 0 {
        return false;
    }
    // Only the bytes the caller passed: `key` is zeroed, so everything past
    // them stays zero, as the key the daemon wrote has it.
    let mut n = addr_len.saturating_sub(2);
    if n > SUN_PATH_LEN as u32 {
        n = SUN_PATH_LEN as u32;
    }
    // n <= 108 already; the mask tells the verifier so.
    let n = n & 0x7f;
    // sun_family is 2 bytes; sun_path follows.
    let src = (uaddr + 2) as *const c_void;
    // SAFETY: copies at most SUN_PATH_LEN bytes into `key.path` from the
    // kernel's sockaddr_storage copy; the helper fails cleanly.
    if unsafe { bpf_probe_read_kernel(key.path.as_mut_ptr().cast(), n, src) } < 0 {
        return false;
    }
    // An abstract name (leading NUL) is all of its bytes.
    if key.path[0] == 0 {
        key.len = n;
        return true;
    }
    key.len = pathname_end(&mut key.path, n);
    true
}

/// A pathname ends at its first NUL (the kernel compares no further):
/// zeroes everything after it within the first `n` bytes and returns its
/// length. Four bytes at a time, and only as far as the caller's bytes.
#[inline(always)]
fn pathname_end(path: &mut [u8; SUN_PATH_LEN], n: u32) -> u32 {
    let words = path.as_mut_ptr().cast::<u32>();
    let mut len = n;
    let mut ended = false;
    let mut k: u32 = 0;
    while k < (SUN_PATH_LEN / 4) as u32 {
        if k * 4 >= n {
            break;
        }
        // SAFETY: k < 27 words of the 108-byte path, which sits 4-aligned
        // in `UnixPath`.
        unsafe {
            let at = words.add(k as usize);
            let w = at.read();
            if ended {
                at.write(0);
            } else {
                // The lowest 0x80 bit marks the first zero byte exactly.
                let z = w.wrapping_sub(0x0101_0101) & !w & 0x8080_8080;
                if z != 0 {
                    let (i, keep) = if z & 0x80 != 0 {
                        (0, 0)
                    } else if z & 0x8000 != 0 {
                        (1, 0xff)
                    } else if z & 0x80_0000 != 0 {
                        (2, 0xffff)
                    } else {
                        (3, 0xff_ffff)
                    };
                    at.write(w & keep);
                    ended = true;
                    if k * 4 + i < len {
                        len = k * 4 + i;
                    }
                }
            }
        }
        k += 1;
    }
    len
}

#[inline(always)]
fn decide_unix(ctx: &SockAddrContext, kind: u8) -> i32 {
    let Some(subject_id) = current_subject() else {
        return ALLOW;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let mut key = UnixPath::zeroed();
    let mut id = 0;
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    let j: Judgement = if !read_path(ctx, &cfg, &mut key) {
        // Fail closed: an address we cannot read is not on any list.
        settle(0, 0, reason::NO_CAPABILITY, MODE_ENFORCE)
    } else {
        // SAFETY: plain u32 copied out. Path id 0 is never allocated, so an
        // unlisted path matches no capability.
        id = unsafe { UNIX_PATHS.get(&key) }.copied().unwrap_or(0);
        if id == CONTROL_PATH_ID {
            settle(0, 0, reason::CONTROL_SOCKET, MODE_ENFORCE)
        } else {
            judge(
                subject_id,
                cfg.generation as u8,
                PROTO_UNIX,
                0,
                path_addr(id),
                now,
            )
        }
    };

    // A path of the policy: the daemon knows it by its id (ids are never
    // reused), so the record is a plain decision, or no record at all when
    // flow mode counts the allowed call.
    if id != 0 && id != CONTROL_PATH_ID {
        let addr = path_addr(id);
        if flows::counted(subject_id, &j, addr, 0, AF_UNIX, kind, PROTO_UNIX, now) {
            return j.ret;
        }
        let len = key.len;
        emit::decision(kind, subject_id, now, &j, cfg.wakeup_bytes, |ev| {
            // SAFETY: a zeroed decision record; fields before `comm` only.
            unsafe {
                (*ev).proto = PROTO_UNIX;
                (*ev).family = AF_UNIX;
                (*ev).aux = len;
                (*ev).addr = addr;
            }
        });
        return j.ret;
    }
    // Any other address: the record carries the bytes the caller named.
    if let Some(mut entry) = emit::reserve::<UnixEvent>(kind) {
        let rec = entry.as_mut_ptr();
        // SAFETY: the reservation is sizeof(UnixEvent) bytes; the event is
        // written whole, then the path.
        unsafe {
            let ev = core::ptr::addr_of_mut!((*rec).event);
            ev.write(Event::zeroed());
            emit::fill_decision(ev, kind, subject_id, now, &j);
            (*ev).proto = PROTO_UNIX;
            (*ev).family = AF_UNIX;
            (*ev).aux = key.len;
            (*ev).addr = path_addr(id);
            (*rec).path = key.path;
            (*rec)._pad = 0;
        }
        entry.submit(emit::wake_flags(cfg.wakeup_bytes));
    }
    j.ret
}
