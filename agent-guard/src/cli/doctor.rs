//! `agent-guard doctor`: what this node offers and what agent-guard needs.

use std::process::ExitCode;

use super::SocketArg;
use crate::{
    control::{Request, client},
    kernel::fs as kfs,
};

#[derive(clap::Args)]
#[command(
    after_help = "Exit status: 0 when every required check passes, 1 otherwise.\n\nExample:\n  agent-guard doctor"
)]
pub struct Args {
    #[command(flatten)]
    socket: SocketArg,
    /// The daemon's state directory, whose files are checked.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/agent-guard/state")]
    state_dir: std::path::PathBuf,
}

enum Level {
    Ok,
    Info,
    /// Works, but with a gap the operator should know about.
    Warn,
    Fail,
}

fn line(level: Level, what: &str, detail: impl AsRef<str>) -> bool {
    let tag = match level {
        Level::Ok => "ok  ",
        Level::Info => "info",
        Level::Warn => "WARN",
        Level::Fail => "FAIL",
    };
    println!("[{tag}] {what:<28} {}", detail.as_ref());
    !matches!(level, Level::Fail)
}

fn kernel_version() -> Option<(u32, u32)> {
    let release = nix::sys::utsname::uname()
        .ok()?
        .release()
        .to_string_lossy()
        .into_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn bpf_syscall_works() -> Result<(), std::io::Error> {
    // BPF_MAP_CREATE of a one-entry array, closed at once.
    let mut attr = [0u32; 32];
    attr[0] = 2;
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = 1;
    // SAFETY: attr is a zeroed, large-enough bpf_attr for BPF_MAP_CREATE.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel and is ours.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let mut healthy = true;
    let root = nix::unistd::geteuid().is_root();
    healthy &= line(
        if root { Level::Ok } else { Level::Fail },
        "privileges",
        if root {
            "running as root"
        } else {
            "not root: the daemon needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON)"
        },
    );
    match kernel_version() {
        Some((maj, min)) if (maj, min) >= (5, 8) => {
            healthy &= line(
                Level::Ok,
                "kernel",
                format!("{maj}.{min} (>= 5.8: ring buffer, cgroup socket hooks)"),
            );
        }
        Some((maj, min)) => {
            healthy &= line(
                Level::Fail,
                "kernel",
                format!("{maj}.{min}: agent-guard needs >= 5.8"),
            )
        }
        None => healthy &= line(Level::Fail, "kernel", "cannot read the kernel version"),
    }
    match kfs::cgroup2_mount() {
        Ok(p) => {
            healthy &= line(
                Level::Ok,
                "cgroup v2",
                format!("mounted at {}", p.display()),
            )
        }
        Err(e) => healthy &= line(Level::Fail, "cgroup v2", e.to_string()),
    }
    if root {
        match bpf_syscall_works() {
            Ok(()) => healthy &= line(Level::Ok, "bpf() syscall", "works (map created and closed)"),
            Err(e) => healthy &= line(Level::Fail, "bpf() syscall", format!("refused: {e}")),
        }
    }
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    line(
        Level::Info,
        "BPF LSM",
        if lsm.split(',').any(|l| l.trim() == "bpf") {
            "enabled (not used by agent-guard)"
        } else {
            "not enabled (not needed)"
        },
    );
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    let mode = lockdown
        .split_whitespace()
        .find(|w| w.starts_with('['))
        .unwrap_or("[unknown]");
    line(
        Level::Info,
        "lockdown",
        format!("{mode} (fentry/kprobes may be refused; agent-guard does not need them)"),
    );
    let tracefs =
        std::path::Path::new("/sys/kernel/tracing/events/sched/sched_process_fork/format").exists();
    line(
        Level::Info,
        "tracefs",
        if tracefs {
            "mounted at /sys/kernel/tracing"
        } else {
            "not mounted; the daemon mounts it at start"
        },
    );
    // The Unix hooks need the hook (6.7+) and the kernel's BTF to find the
    // caller's address; without them Unix socket endpoints are not fenced.
    let unix_hook = kernel_version().is_some_and(|v| v >= (6, 7));
    let layout = crate::kernel::unix::Layout::from_kernel();
    let _ = match (unix_hook, &layout) {
        (true, Ok(_)) => line(
            Level::Ok,
            "cgroup/connect_unix",
            "available (kernel >= 6.7, BTF layout found): Unix socket endpoints are fenced",
        ),
        (true, Err(e)) => line(
            Level::Warn,
            "cgroup/connect_unix",
            format!("hook present but {e}: tagged processes' Unix socket calls are NOT fenced"),
        ),
        (false, _) => line(
            Level::Warn,
            "cgroup/connect_unix",
            "not available (kernel < 6.7): tagged processes can reach any Unix socket their file permissions allow; `unix` endpoints are accepted but not enforced",
        ),
    };
    match client::call(&args.socket.socket, &Request::Status) {
        Ok(s) => {
            line(
                Level::Ok,
                "daemon",
                format!(
                    "running at {} (policy generation {})",
                    args.socket.socket.display(),
                    s["policy"]["generation"]
                ),
            );
            if s["unix_socket_fencing"]["enforced"] == false {
                line(
                    Level::Warn,
                    "unix sockets",
                    format!(
                        "the running daemon does not fence Unix sockets: {}",
                        s["unix_socket_fencing"]["why"]
                            .as_str()
                            .unwrap_or("unknown")
                    ),
                );
            }
        }
        Err(_) => {
            line(
                Level::Info,
                "daemon",
                format!("not reachable at {}", args.socket.socket.display()),
            );
        }
    }
    healthy &= state_files(&args.state_dir);
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
}

/// The state files a start reads: a damaged one stops the daemon.
fn state_files(dir: &std::path::Path) -> bool {
    use crate::daemon::{launch, persist, state::State};
    let mut healthy = true;
    let checks: [(&str, anyhow::Result<String>); 3] = [
        (
            persist::REGISTRY_FILE,
            persist::load(dir).map(|s| match s {
                Some(s) => format!(
                    "{} task/sub-agent subjects, {} grants, {} approval requests",
                    s.subjects.len(),
                    s.grants.len(),
                    s.approvals.len()
                ),
                None => "nothing to restore".into(),
            }),
        ),
        (
            crate::daemon::state::SUSPENDED_FILE,
            State::load_suspended(dir).map(|s| format!("{} suspensions", s.len())),
        ),
        (
            launch::JTI_FILE,
            launch::UsedJtis::load(dir).map(|u| format!("{} used launch tokens", u.len())),
        ),
    ];
    for (name, result) in checks {
        healthy &= match result {
            Ok(what) => line(Level::Ok, name, what),
            Err(e) => line(Level::Fail, name, format!("{e:#}")),
        };
    }
    healthy
}
