//! Self-hardening applied by `agent-guard run` just before it execs the agent.
//!
//! The daemon fences an agent by tagging its pid in the kernel; every
//! `connect()` it (or any descendant) makes then goes through our eBPF
//! programs. A *root* agent could undo that fence: detach or replace the BPF
//! programs, move itself to another cgroup or network namespace, load a
//! kernel module, or poke at another process's memory. [`apply`] closes those
//! doors for the calling process and, through exec/fork inheritance, for
//! everything it starts. It cannot be undone.
//!
//! Three layers, each covering what the others miss:
//! 1. capabilities ([`DROPPED_CAPS`]) are removed from the bounding,
//!    inheritable and ambient sets, so no exec (setuid root included) can
//!    get them back, then from the effective and permitted sets;
//! 2. `PR_SET_NO_NEW_PRIVS`, so setuid/file-capability binaries confer
//!    nothing, and so an unprivileged process may install the filter;
//! 3. a seccomp filter ([`refused_syscalls`]) that refuses the dangerous
//!    syscalls outright, whatever capabilities remain — including the
//!    user-namespace route, where a process is "root" inside a namespace it
//!    just created.
//!
//! Call [`apply`] from the thread that will exec the agent: capability sets
//! are per thread (the seccomp filter and no-new-privs are synchronised to
//! every thread of the process).

use std::collections::BTreeMap;
use std::io;

use caps::{CapSet, Capability};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// How much to harden the agent process (per agent `hardening` in policy).
pub use crate::policy::Hardening;

/// Which step of [`apply`] failed, with the underlying OS error.
#[derive(thiserror::Error, Debug)]
pub enum HardenError {
    /// seccomp filters are only written for x86_64 and aarch64.
    #[error("hardening: unsupported architecture {0} (only x86_64 and aarch64)")]
    UnsupportedArch(&'static str),
    /// Compiling the seccomp filter failed (nothing has been changed yet).
    #[error("hardening: building the {filter} seccomp filter failed: {source}")]
    BuildFilter {
        filter: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    /// Reading a capability set of the calling thread failed.
    #[error("hardening: reading the {set} capability set failed: {source}")]
    ReadCaps {
        set: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    /// Dropping a capability failed (the message carries the errno).
    #[error("hardening: dropping {cap} from the {set} capability set failed: {source}")]
    DropCap {
        cap: Capability,
        set: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    /// Writing a capability set without [`DROPPED_CAPS`] (one `capset`) failed.
    #[error("hardening: removing the dropped capabilities from the {set} set failed: {source}")]
    SetCaps {
        set: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)` failed.
    #[error("hardening: prctl(PR_SET_NO_NEW_PRIVS) failed: {0}")]
    NoNewPrivs(#[source] io::Error),
    /// Loading a seccomp filter into the kernel failed.
    #[error("hardening: installing the {filter} seccomp filter failed: {source}")]
    InstallFilter {
        filter: &'static str,
        #[source]
        source: seccompiler::Error,
    },
}

/// The capabilities removed by [`Hardening::Strict`], and why each matters.
pub const DROPPED_CAPS: &[Capability] = &[
    // Load, detach or rewrite BPF programs and maps: the fence itself.
    Capability::CAP_BPF,
    // Catch-all: mount, setns, cgroup moves, bpf on older kernels, ...
    Capability::CAP_SYS_ADMIN,
    // Reconfigure interfaces, routes, netfilter, tc/XDP programs.
    Capability::CAP_NET_ADMIN,
    // Raw/packet sockets that do not go through connect().
    Capability::CAP_NET_RAW,
    // perf_event_open and tracing-type BPF programs.
    Capability::CAP_PERFMON,
    // ptrace or read/write the memory of the daemon or other processes.
    Capability::CAP_SYS_PTRACE,
    // Load kernel modules: arbitrary kernel code.
    Capability::CAP_SYS_MODULE,
    // reboot / kexec a different kernel.
    Capability::CAP_SYS_BOOT,
];

/// `open_tree_attr` (Linux 6.15); same number on every architecture, not yet in `libc`.
const SYS_OPEN_TREE_ATTR: libc::c_long = 467;

/// Namespace kinds an agent must not enter or create: a fresh network stack
/// escapes per-netns state, a fresh cgroup/mount view hides or moves the
/// cgroup the fence is keyed on, and a user namespace makes the process root
/// (with every capability) inside it.
const FORBIDDEN_NS_FLAGS: &[u64] = &[
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUSER as u64,
];

/// Syscalls refused with `EPERM` whatever their arguments.
const ALWAYS_REFUSED: &[(&str, libc::c_long)] = &[
    // Load/attach/detach BPF programs, edit the daemon's maps.
    ("bpf", libc::SYS_bpf),
    // Tracing; also a way to attach BPF programs.
    ("perf_event_open", libc::SYS_perf_event_open),
    // Mounting: bpffs/cgroupfs tricks, hiding /sys/fs/bpf pins.
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("fsopen", libc::SYS_fsopen),
    ("fsmount", libc::SYS_fsmount),
    ("fsconfig", libc::SYS_fsconfig),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("open_tree_attr", SYS_OPEN_TREE_ATTR),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("pivot_root", libc::SYS_pivot_root),
    // Kernel modules: arbitrary kernel code.
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    // Boot another kernel.
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    // Take over another process (the daemon, an unfenced shell).
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("process_vm_readv", libc::SYS_process_vm_readv),
];

/// Syscalls refused with `EPERM` only when their flags name a forbidden
/// namespace (`setns` also when `nstype` is 0, "any namespace").
const NS_REFUSED: &[&str] = &["unshare", "setns", "clone"];

/// Refused with `EPERM` for some arguments only: `socket` for address
/// families other than unix/inet/inet6/netlink; the signal calls (with a
/// protected pid) are added by [`apply_protecting`].
const ARG_REFUSED: &[&str] = &["socket"];

/// Refused with `ENOSYS`: its flags live in memory where seccomp cannot see
/// them; libc then falls back to `clone`, whose flags we can check.
const ENOSYS_REFUSED: &[&str] = &["clone3"];

/// Every syscall name the seccomp filter can refuse (`unshare`, `setns` and
/// `clone` only for namespace flags, see the module docs), for `status`/docs.
pub fn refused_syscalls() -> &'static [&'static str] {
    static NAMES: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    NAMES.get_or_init(|| {
        ALWAYS_REFUSED
            .iter()
            .map(|(name, _)| *name)
            .chain(NS_REFUSED.iter().copied())
            .chain(ARG_REFUSED.iter().copied())
            .chain(ENOSYS_REFUSED.iter().copied())
            .collect()
    })
}

/// Applies `level` to the calling process (and, through exec/fork
/// inheritance, everything it starts). Irreversible.
///
/// Strict: builds the seccomp filters first (so a build error changes
/// nothing), drops [`DROPPED_CAPS`] from the bounding, inheritable and
/// ambient sets, sets `PR_SET_NO_NEW_PRIVS`, installs the filters, and
/// finally drops [`DROPPED_CAPS`] from the effective and permitted sets.
pub fn apply(level: Hardening) -> Result<(), HardenError> {
    apply_protecting(level, &[])
}

/// [`apply`], and under Strict also refuse signals (`kill`, `tkill`,
/// `tgkill`, `rt_sigqueueinfo`, `pidfd_open`) aimed at `protect` (the
/// daemon's pid), its process group, or every process (`kill(-1)`): an
/// agent must not be able to stop the daemon that fences it.
pub fn apply_protecting(level: Hardening, protect: &[u32]) -> Result<(), HardenError> {
    match level {
        Hardening::Off => Ok(()),
        Hardening::Strict => apply_strict(protect),
    }
}

fn apply_strict(protect: &[u32]) -> Result<(), HardenError> {
    let filters = build_filters(protect)?;
    drop_inheritable_caps()?;
    set_no_new_privs()?;
    install_filters(&filters)?;
    drop_caps_from(CapSet::Effective, "effective")?;
    drop_caps_from(CapSet::Permitted, "permitted")?;
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn target_arch() -> Result<TargetArch, HardenError> {
    Ok(TargetArch::x86_64)
}

#[cfg(target_arch = "aarch64")]
fn target_arch() -> Result<TargetArch, HardenError> {
    Ok(TargetArch::aarch64)
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn target_arch() -> Result<TargetArch, HardenError> {
    Err(HardenError::UnsupportedArch(std::env::consts::ARCH))
}

/// A compiled filter and a name for error messages.
struct NamedFilter {
    name: &'static str,
    program: BpfProgram,
}

/// One rule per bit: "arg `index` has `bit` set" (32-bit compare: the
/// kernel only looks at the low 32 bits of these arguments, so junk in the
/// high half must not change the outcome).
fn has_bit(index: u8, bit: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(bit),
        bit,
    )?])
}

fn ns_bit_rules(index: u8) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    FORBIDDEN_NS_FLAGS
        .iter()
        .map(|&bit| has_bit(index, bit))
        .collect()
}

/// `getpriority(CANARY_WHICH, 0)` fails with [`CANARY_ERRNO`] only under
/// agent-guard's own filter (the kernel itself answers EINVAL for this
/// `which`): a launcher started inside a strict agent can tell that it is
/// there, and one under some other seccomp policy (a container runtime's)
/// cannot be fooled into thinking so.
pub const CANARY_WHICH: u32 = 0x4147_4744;
pub const CANARY_ERRNO: libc::c_int = libc::ENOTRECOVERABLE;

/// Is the calling process under agent-guard's strict filter?
pub fn under_strict_filter() -> bool {
    // SAFETY: plain syscall with an invalid `which`; it changes nothing.
    let rc = unsafe { libc::syscall(libc::SYS_getpriority, CANARY_WHICH as libc::c_long, 0) };
    rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(CANARY_ERRNO)
}

/// "arg `index` equals `value`" (32-bit compare, as for pids).
fn arg_eq(index: u8, value: u32) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(value),
    )?])
}

/// socket(domain, ...): only AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK.
/// Other families (AF_VSOCK, AF_PACKET, AF_XDP, ...) reach the network
/// without passing the cgroup inet hooks.
fn socket_family_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let allowed = [
        libc::AF_UNIX,
        libc::AF_INET,
        libc::AF_INET6,
        libc::AF_NETLINK,
    ];
    let mut rules = vec![SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Gt,
        libc::AF_NETLINK as u64,
    )?])?];
    for family in 0..libc::AF_NETLINK {
        if !allowed.contains(&family) {
            rules.push(arg_eq(0, family as u32)?);
        }
    }
    Ok(rules)
}

/// Rules refusing signals to the protected pids (see [`apply_protecting`]).
fn signal_rules(
    rules: &mut BTreeMap<i64, Vec<SeccompRule>>,
    protect: &[u32],
) -> Result<(), seccompiler::BackendError> {
    if protect.is_empty() {
        return Ok(());
    }
    let mut kill = vec![arg_eq(0, u32::MAX)?]; // kill(-1, sig): everyone
    let mut by_pid = Vec::new();
    for &pid in protect {
        kill.push(arg_eq(0, pid)?);
        // kill(-pgid): the daemon's process group.
        kill.push(arg_eq(0, (pid as i32).wrapping_neg() as u32)?);
        by_pid.push(arg_eq(0, pid)?);
    }
    rules.insert(libc::SYS_kill, kill);
    // A pidfd to the daemon can also come from open("/proc/PID"), which
    // seccomp cannot tell apart: signalling through pidfds is refused
    // outright for strict agents.
    rules.insert(libc::SYS_pidfd_send_signal, Vec::new());
    for nr in [
        libc::SYS_tkill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
        libc::SYS_pidfd_open,
    ] {
        rules.insert(nr, by_pid.clone());
    }
    Ok(())
}

fn eperm_rules(
    protect: &[u32],
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALWAYS_REFUSED
        .iter()
        .map(|&(_, nr)| (nr, Vec::new()))
        .collect();
    // unshare(flags): new cgroup/net/mount/user namespace.
    rules.insert(libc::SYS_unshare, ns_bit_rules(0)?);
    // clone(flags, ...): same, while creating a child (flags are arg 0 on
    // both x86_64 and aarch64). Plain threads and fork carry none of them.
    rules.insert(libc::SYS_clone, ns_bit_rules(0)?);
    // setns(fd, nstype): nstype 0 joins whatever namespace fd refers to.
    let mut setns = ns_bit_rules(1)?;
    setns.push(SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        0,
    )?])?);
    rules.insert(libc::SYS_setns, setns);
    rules.insert(libc::SYS_socket, socket_family_rules()?);
    signal_rules(&mut rules, protect)?;
    Ok(rules)
}

fn build_filters(protect: &[u32]) -> Result<Vec<NamedFilter>, HardenError> {
    let arch = target_arch()?;
    let compile = |name: &'static str,
                   rules: Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError>,
                   errno: libc::c_int| {
        let wrap = |source| HardenError::BuildFilter {
            filter: name,
            source,
        };
        let filter = SeccompFilter::new(
            rules.map_err(wrap)?,
            SeccompAction::Allow,
            SeccompAction::Errno(errno.unsigned_abs()),
            arch,
        )
        .map_err(wrap)?;
        let program = BpfProgram::try_from(filter).map_err(wrap)?;
        Ok::<_, HardenError>(NamedFilter { name, program })
    };
    let mut filters = vec![
        // Also kills the process on a syscall made under another ABI (i386
        // `int 0x80`), whose numbers this table does not cover.
        compile("EPERM", eperm_rules(protect), libc::EPERM)?,
        compile(
            "clone3",
            Ok(BTreeMap::from([(libc::SYS_clone3, Vec::new())])),
            libc::ENOSYS,
        )?,
        compile(
            "canary",
            arg_eq(0, CANARY_WHICH).map(|r| BTreeMap::from([(libc::SYS_getpriority, vec![r])])),
            CANARY_ERRNO,
        )?,
    ];
    if let Some(x32) = x32_filter() {
        filters.push(x32);
    }
    Ok(filters)
}

/// x32 syscalls share the x86_64 audit arch but are numbered
/// `nr | 0x4000_0000`; a filter keyed on x86_64 numbers alone would let
/// `bpf` through that way on kernels built with x32 support.
#[cfg(target_arch = "x86_64")]
fn x32_filter() -> Option<NamedFilter> {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    let program = vec![
        ins(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        ins(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        ins(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        ins(JGE_K, 0, 1, X32_SYSCALL_BIT),
        ins(
            RET_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS.unsigned_abs(),
        ),
        ins(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    Some(NamedFilter {
        name: "x32",
        program,
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn x32_filter() -> Option<NamedFilter> {
    None
}

/// Bounding set: what any later exec (setuid root included) can ever hold.
/// Inheritable/ambient: what an exec passes on without a setuid bit.
fn drop_inheritable_caps() -> Result<(), HardenError> {
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(|source| HardenError::ReadCaps {
            set: "permitted",
            source,
        })?;
    let can_setpcap =
        caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(|source| {
            HardenError::ReadCaps {
                set: "effective",
                source,
            }
        })?;
    // Dropping from the bounding set needs CAP_SETPCAP. A process with no
    // capabilities at all cannot, and need not: with no-new-privs and user
    // namespaces refused, it can never gain a capability again.
    let unprivileged = permitted.is_empty() && !can_setpcap;
    for &cap in DROPPED_CAPS {
        let in_bounding =
            caps::has_cap(None, CapSet::Bounding, cap).map_err(|source| HardenError::ReadCaps {
                set: "bounding",
                source,
            })?;
        if in_bounding && !unprivileged {
            caps::drop(None, CapSet::Bounding, cap).map_err(|source| HardenError::DropCap {
                cap,
                set: "bounding",
                source,
            })?;
        }
    }
    drop_caps_from(CapSet::Inheritable, "inheritable")?;
    for &cap in DROPPED_CAPS {
        caps::drop(None, CapSet::Ambient, cap).map_err(|source| HardenError::DropCap {
            cap,
            set: "ambient",
            source,
        })?;
    }
    Ok(())
}

fn drop_caps_from(set: CapSet, set_name: &'static str) -> Result<(), HardenError> {
    let mut current = caps::read(None, set).map_err(|source| HardenError::ReadCaps {
        set: set_name,
        source,
    })?;
    let before = current.len();
    for cap in DROPPED_CAPS {
        current.remove(cap);
    }
    if current.len() == before {
        return Ok(());
    }
    caps::set(None, set, &current).map_err(|source| HardenError::SetCaps {
        set: set_name,
        source,
    })
}

/// setuid/file capabilities confer nothing after this, and it is what lets
/// a process without CAP_SYS_ADMIN install a seccomp filter.
fn set_no_new_privs() -> Result<(), HardenError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(HardenError::NoNewPrivs(io::Error::last_os_error()));
    }
    Ok(())
}

/// Installs every filter on all threads of the process (TSYNC).
fn install_filters(filters: &[NamedFilter]) -> Result<(), HardenError> {
    for f in filters {
        seccompiler::apply_filter_all_threads(&f.program).map_err(|source| {
            HardenError::InstallFilter {
                filter: f.name,
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork, geteuid};
    use std::io::Write;

    /// Exit code a child uses when the tested call unexpectedly succeeded.
    const SUCCEEDED: i32 = 200;
    /// Exit code when `apply` itself failed in the child.
    const APPLY_FAILED: i32 = 201;
    /// Exit code when the child's check panicked.
    const PANICKED: i32 = 202;

    fn is_root() -> bool {
        if geteuid().is_root() {
            return true;
        }
        eprintln!("!!!!! SKIPPED: harden tests need root (real capabilities and seccomp) !!!!!");
        false
    }

    /// Writes straight to fd 2: the test harness's capture does not survive fork.
    fn child_say(msg: &str) {
        let _ = std::io::stderr().write_all(format!("[harden child] {msg}\n").as_bytes());
    }

    /// Forks; the child applies `level`, runs `check` and exits with its
    /// code. Returns that code. The test process itself stays unhardened.
    fn in_child(level: Hardening, check: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only runs `check` and then `_exit`s.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let code = match apply(level) {
                    Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(check))
                        .unwrap_or(PANICKED),
                    Err(e) => {
                        child_say(&format!("apply failed: {e}"));
                        APPLY_FAILED
                    }
                };
                // SAFETY: ends the forked child without running the parent's atexit handlers.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => match waitpid(child, None).expect("waitpid") {
                WaitStatus::Exited(_, code) => code,
                other => panic!("hardened child did not exit normally: {other:?}"),
            },
        }
    }

    fn errno() -> i32 {
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// Runs a raw syscall result through: errno if it failed, SUCCEEDED if not.
    fn outcome(rc: libc::c_long) -> i32 {
        if rc < 0 { errno() } else { SUCCEEDED }
    }

    /// Checks every (label, errno-or-SUCCEEDED, wanted) triple; 0 if all
    /// match, else 1 + the index of the first mismatch.
    fn expect_all(results: &[(&str, i32, i32)]) -> i32 {
        for (i, (label, got, want)) in results.iter().enumerate() {
            if got != want {
                child_say(&format!("{label}: got {got}, want {want}"));
                return 1 + i as i32;
            }
        }
        0
    }

    fn bpf_map_create() -> i32 {
        // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
        let mut attr = [0u32; 32];
        attr[0] = 2; // BPF_MAP_TYPE_ARRAY
        attr[1] = 4;
        attr[2] = 4;
        attr[3] = 1;
        // SAFETY: attr is a valid, fully initialised 128-byte buffer.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0, // BPF_MAP_CREATE
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        outcome(rc)
    }

    fn status_field(name: &str) -> String {
        let status = std::fs::read_to_string("/proc/self/status").expect("read status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    }

    fn cap_mask(name: &str) -> u64 {
        u64::from_str_radix(&status_field(name), 16).expect("hex cap mask")
    }

    fn dropped_mask() -> u64 {
        DROPPED_CAPS
            .iter()
            .map(|c| c.bitmask())
            .fold(0, |a, b| a | b)
    }

    fn no_new_privs() -> i32 {
        // SAFETY: integer-only prctl.
        unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) }
    }

    fn ns_fd(kind: &str) -> i32 {
        let path = std::ffi::CString::new(format!("/proc/self/ns/{kind}")).expect("path");
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) }
    }

    #[test]
    fn strict_refuses_bpf_syscall() {
        if !is_root() {
            return;
        }
        assert_eq!(in_child(Hardening::Strict, bpf_map_create), libc::EPERM);
    }

    #[test]
    fn strict_refuses_mount() {
        if !is_root() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("harden-mnt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let target = std::ffi::CString::new(dir.to_str().expect("utf8")).expect("cstr");
        let code = in_child(Hardening::Strict, || {
            // SAFETY: valid NUL-terminated strings, null data.
            let mount = outcome(
                unsafe {
                    libc::mount(
                        c"none".as_ptr(),
                        target.as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        std::ptr::null(),
                    )
                }
                .into(),
            );
            // SAFETY: as above.
            let umount =
                outcome(unsafe { libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH) }.into());
            // SAFETY: valid NUL-terminated string.
            let fsopen = outcome(unsafe { libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), 0) });
            expect_all(&[
                ("mount", mount, libc::EPERM),
                ("umount2", umount, libc::EPERM),
                ("fsopen", fsopen, libc::EPERM),
            ])
        });
        if code == 1 {
            // It mounted after all: clean up before failing.
            let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir(&dir);
        assert_eq!(code, 0);
    }

    #[test]
    fn strict_refuses_unshare_of_cgroup_and_net_namespaces() {
        if !is_root() {
            return;
        }
        let code = in_child(Hardening::Strict, || {
            let try_unshare = |flags| {
                // SAFETY: unshare takes an integer.
                outcome(unsafe { libc::unshare(flags) }.into())
            };
            expect_all(&[
                (
                    "unshare(NEWCGROUP)",
                    try_unshare(libc::CLONE_NEWCGROUP),
                    libc::EPERM,
                ),
                (
                    "unshare(NEWNET)",
                    try_unshare(libc::CLONE_NEWNET),
                    libc::EPERM,
                ),
                (
                    "unshare(NEWNS)",
                    try_unshare(libc::CLONE_NEWNS),
                    libc::EPERM,
                ),
                (
                    "unshare(NEWUSER)",
                    try_unshare(libc::CLONE_NEWUSER),
                    libc::EPERM,
                ),
                (
                    "unshare(NEWUTS|NEWNET)",
                    try_unshare(libc::CLONE_NEWUTS | libc::CLONE_NEWNET),
                    libc::EPERM,
                ),
            ])
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn strict_refuses_setns_any() {
        if !is_root() {
            return;
        }
        let code = in_child(Hardening::Strict, || {
            let net = ns_fd("net");
            let cgroup = ns_fd("cgroup");
            let mnt = ns_fd("mnt");
            assert!(net >= 0 && cgroup >= 0 && mnt >= 0, "open ns fds");
            let try_setns = |fd, nstype| {
                // SAFETY: setns takes integers.
                outcome(unsafe { libc::setns(fd, nstype) }.into())
            };
            expect_all(&[
                ("setns(net, 0)", try_setns(net, 0), libc::EPERM),
                (
                    "setns(net, NEWNET)",
                    try_setns(net, libc::CLONE_NEWNET),
                    libc::EPERM,
                ),
                ("setns(cgroup, 0)", try_setns(cgroup, 0), libc::EPERM),
                (
                    "setns(cgroup, NEWCGROUP)",
                    try_setns(cgroup, libc::CLONE_NEWCGROUP),
                    libc::EPERM,
                ),
                (
                    "setns(mnt, NEWNS)",
                    try_setns(mnt, libc::CLONE_NEWNS),
                    libc::EPERM,
                ),
            ])
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn strict_refuses_ptrace() {
        if !is_root() {
            return;
        }
        let code =
            in_child(Hardening::Strict, || {
                // SAFETY: PTRACE_TRACEME takes no pointers.
                let traceme = outcome(unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) });
                let mut buf = [0u8; 8];
                let src = [7u8; 8];
                let local = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                };
                let remote = libc::iovec {
                    iov_base: src.as_ptr() as *mut libc::c_void,
                    iov_len: src.len(),
                };
                // SAFETY: both iovecs point at live buffers of the stated length.
                let readv = outcome(unsafe {
                    libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0)
                } as libc::c_long);
                expect_all(&[
                    ("ptrace(TRACEME)", traceme, libc::EPERM),
                    ("process_vm_readv", readv, libc::EPERM),
                ])
            });
        assert_eq!(code, 0);
    }

    #[test]
    fn strict_drops_caps_from_bounding_set() {
        if !is_root() {
            return;
        }
        let before = cap_mask("CapBnd");
        assert_ne!(
            before & dropped_mask(),
            0,
            "test needs the caps to start with"
        );
        let code = in_child(Hardening::Strict, || {
            let mut bad = 0;
            for (i, set) in ["CapBnd", "CapInh", "CapAmb", "CapEff", "CapPrm"]
                .iter()
                .enumerate()
            {
                let mask = cap_mask(set);
                if mask & dropped_mask() != 0 {
                    child_say(&format!("{set} still has {:#x}", mask & dropped_mask()));
                    bad = 10 + i as i32;
                }
            }
            // Everything else stays: root keeps e.g. CAP_CHOWN and CAP_SETPCAP.
            let others = Capability::CAP_CHOWN.bitmask() | Capability::CAP_SETPCAP.bitmask();
            if cap_mask("CapBnd") & others != others || cap_mask("CapEff") & others != others {
                child_say("an unrelated capability was dropped");
                bad = 20;
            }
            bad
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn strict_still_allows_threads_and_fork_and_exec() {
        if !is_root() {
            return;
        }
        let code = in_child(Hardening::Strict, || {
            // pthread_create: clone3 gets ENOSYS, glibc falls back to clone.
            let thread = std::thread::spawn(|| 41 + 1).join();
            if thread.ok() != Some(42) {
                return 1;
            }
            // SAFETY: single-threaded again (thread joined); grandchild only _exits.
            match unsafe { fork() } {
                Ok(ForkResult::Child) => unsafe { libc::_exit(7) },
                Ok(ForkResult::Parent { child }) => match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, 7)) => {}
                    other => {
                        child_say(&format!("fork: {other:?}"));
                        return 2;
                    }
                },
                Err(e) => {
                    child_say(&format!("fork: {e}"));
                    return 3;
                }
            }
            match std::process::Command::new("/bin/true").status() {
                Ok(s) if s.success() => {}
                other => {
                    child_say(&format!("exec /bin/true: {other:?}"));
                    return 4;
                }
            }
            // A shell pipeline: sh forks and execs several children.
            match std::process::Command::new("/bin/sh")
                .args(["-c", "echo hi | cat >/dev/null && /bin/true"])
                .status()
            {
                Ok(s) if s.success() => {}
                other => {
                    child_say(&format!("sh pipeline: {other:?}"));
                    return 5;
                }
            }
            // clone3 is refused with ENOSYS (not EPERM) so libc falls back.
            // SAFETY: null args pointer; the filter answers before the kernel reads it.
            let clone3 =
                outcome(unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) });
            if clone3 != libc::ENOSYS {
                child_say(&format!("clone3: {clone3}"));
                return 6;
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn the_canary_tells_our_filter_from_none() {
        assert!(!under_strict_filter(), "the test process is not hardened");
        if !is_root() {
            return;
        }
        let code = in_child(
            Hardening::Strict,
            || if under_strict_filter() { 0 } else { 1 },
        );
        assert_eq!(code, 0);
        let code = in_child(Hardening::Off, || if under_strict_filter() { 1 } else { 0 });
        assert_eq!(code, 0);
    }

    #[test]
    fn strict_sets_no_new_privs() {
        if !is_root() {
            return;
        }
        let code = in_child(Hardening::Strict, || {
            if no_new_privs() != 1 {
                return 1;
            }
            if status_field("Seccomp") != "2" {
                return 2;
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn off_changes_nothing() {
        if !is_root() {
            return;
        }
        let bnd = cap_mask("CapBnd");
        let eff = cap_mask("CapEff");
        let nnp = no_new_privs();
        let seccomp = status_field("Seccomp");
        let code = in_child(Hardening::Off, || {
            expect_all(&[
                ("CapBnd", (cap_mask("CapBnd") == bnd) as i32, 1),
                ("CapEff", (cap_mask("CapEff") == eff) as i32, 1),
                ("no_new_privs", no_new_privs(), nnp),
                ("Seccomp", (status_field("Seccomp") == seccomp) as i32, 1),
                // Root can still create a BPF map: the strict tests are not vacuous.
                ("bpf(MAP_CREATE)", bpf_map_create(), SUCCEEDED),
            ])
        });
        assert_eq!(code, 0);
    }

    /// The filter alone, with every capability still held, refuses the
    /// doors: proves the EPERMs above are not only the capability drop.
    #[test]
    fn seccomp_filter_alone_refuses_with_full_caps() {
        if !is_root() {
            return;
        }
        let code = in_child(Hardening::Off, || {
            let filters = match build_filters(&[]) {
                Ok(f) => f,
                Err(e) => {
                    child_say(&e.to_string());
                    return 100;
                }
            };
            if set_no_new_privs().is_err() || install_filters(&filters).is_err() {
                return 101;
            }
            let net = ns_fd("net");
            // SAFETY (all below): integer-only syscalls, or a valid C string.
            let unshare_net = outcome(unsafe { libc::unshare(libc::CLONE_NEWNET) }.into());
            let unshare_uts = outcome(unsafe { libc::unshare(libc::CLONE_NEWUTS) }.into());
            let setns0 = outcome(unsafe { libc::setns(net, 0) }.into());
            let traceme = outcome(unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) });
            let open_tree_attr =
                outcome(unsafe { libc::syscall(SYS_OPEN_TREE_ATTR, -1, c"".as_ptr(), 0, 0, 0) });
            let x32_getpid = outcome(unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) });
            let bpf = bpf_map_create();
            let caps_held = caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN)
                .unwrap_or(false) as i32;
            expect_all(&[
                ("CAP_SYS_ADMIN still held", caps_held, 1),
                ("bpf", bpf, libc::EPERM),
                ("unshare(NEWNET)", unshare_net, libc::EPERM),
                // Only the listed namespace bits are refused.
                ("unshare(NEWUTS)", unshare_uts, SUCCEEDED),
                ("setns(net, 0)", setns0, libc::EPERM),
                ("ptrace(TRACEME)", traceme, libc::EPERM),
                ("open_tree_attr", open_tree_attr, libc::EPERM),
                // (Also ENOSYS on kernels without x32; never a pid.)
                ("x32 getpid", x32_getpid, libc::ENOSYS),
            ])
        });
        assert_eq!(code, 0);
    }

    /// Without the filter, open_tree_attr exists on this kernel (so the
    /// hard-coded number is right) and fails for its own reasons.
    #[test]
    fn open_tree_attr_number_is_real() {
        // SAFETY: invalid fd and empty path: the kernel rejects before doing anything.
        let rc = unsafe { libc::syscall(SYS_OPEN_TREE_ATTR, -1, c"".as_ptr(), 0, 0, 0) };
        assert_eq!(rc, -1);
        assert_ne!(
            errno(),
            libc::ENOSYS,
            "kernel lacks open_tree_attr (6.15+)?"
        );
    }

    #[test]
    fn refused_names_match_filter_table() {
        let names = refused_syscalls();
        for must in [
            "bpf",
            "perf_event_open",
            "mount",
            "umount2",
            "fsopen",
            "fsmount",
            "fsconfig",
            "move_mount",
            "open_tree",
            "pivot_root",
            "init_module",
            "finit_module",
            "delete_module",
            "kexec_load",
            "kexec_file_load",
            "ptrace",
            "process_vm_writev",
            "process_vm_readv",
            "unshare",
            "setns",
            "clone",
            "clone3",
        ] {
            assert!(names.contains(&must), "{must} missing");
        }
        let rules = eperm_rules(&[]).expect("rules");
        assert_eq!(
            rules.len(),
            ALWAYS_REFUSED.len() + NS_REFUSED.len() + ARG_REFUSED.len()
        );
        let protected = eperm_rules(&[4242]).expect("rules");
        assert!(
            protected.contains_key(&libc::SYS_kill)
                && protected.contains_key(&libc::SYS_pidfd_open)
        );
        assert!(build_filters(&[]).is_ok());
    }
}
