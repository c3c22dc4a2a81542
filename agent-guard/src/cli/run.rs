//! `agent-guard run`: tag this process, close the escape doors, exec CMD.
//!
//! The launcher registers *itself* (the daemon reads its pid from
//! SO_PEERCRED, so no pid can be forged) and then execs the command in
//! place: not one instruction of CMD runs untagged, and stdin/stdout/stderr,
//! signals and the exit status are CMD's own because there is no supervisor
//! process in between for an agent to attack.

use std::{os::unix::process::CommandExt, path::PathBuf, process::ExitCode, time::Duration};

use super::SocketArg;
use crate::{
    control::{Registration, Request, client},
    identity::harden,
};

/// Exit status when agent-guard could not start CMD (as `env`/`docker` use).
const EXIT_LAUNCH_FAILED: u8 = 125;
const EXIT_NOT_EXECUTABLE: u8 = 126;
const EXIT_NOT_FOUND: u8 = 127;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  agent-guard run --tenant acme --agent researcher -- python3 agent.py
  agent-guard run --tenant acme --agent researcher --task \"summarise ticket 42\" \\
      --tools search --ttl 15m -- python3 agent.py
  # from inside a tagged agent: start a narrower sub-agent
  agent-guard run --agent summarizer --tools search -- python3 summarize.py
  # as an orchestrator that is not root (in the daemon's --control-group):
  agent-guard token issue --key issuer.key --tenant acme --agent researcher \\
      --tools search --ttl 15m --on-behalf-of alice@example.com > launch.jwt
  agent-guard run --token launch.jwt -- python3 agent.py

Exit status: CMD's own; 125 when agent-guard could not start it (daemon unreachable, unknown
tenant/agent, refused), 126 when CMD is not executable, 127 when it is not found.")]
pub struct Args {
    /// Tenant the agent belongs to (required outside an agent; inside one it
    /// can only be the caller's own).
    #[arg(long)]
    tenant: Option<String>,
    /// Agent name (as in the policy's [[agent]] table); from inside a tagged
    /// process, the name of the new sub-agent.
    #[arg(long, required_unless_present = "token")]
    agent: Option<String>,
    /// What the process is started to do; recorded in every audit record.
    #[arg(long, value_name = "TEXT", conflicts_with = "token")]
    task: Option<String>,
    /// Only these tools (comma-separated), a subset of the agent's.
    #[arg(
        long,
        value_name = "TOOL,...",
        value_delimiter = ',',
        conflicts_with = "token"
    )]
    tools: Option<Vec<String>>,
    /// The process and its children lose every capability after this long
    /// (e.g. 30s, 15m, 2h).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "token")]
    ttl: Option<Duration>,
    #[command(flatten)]
    socket: SocketArg,
    /// Signed launch token (`agent-guard token issue`; `-` reads standard
    /// input). Tenant, agent, task, tools and TTL come from the token; the
    /// caller need not be root, only in the daemon's --control-group.
    #[arg(long, value_name = "FILE")]
    token: Option<PathBuf>,
    /// The command to start, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let token = match &args.token {
        None => None,
        Some(path) => match read_token(path) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("agent-guard run: {e}");
                eprintln!("agent-guard run: nothing was started");
                return Ok(ExitCode::from(EXIT_LAUNCH_FAILED));
            }
        },
    };
    let request = Request::Register {
        token,
        tenant: args.tenant.clone(),
        agent: args.agent.clone().unwrap_or_default(),
        task: args.task.clone(),
        // `--tools ""` asks for no tools at all.
        tools: args
            .tools
            .clone()
            .map(|v| v.into_iter().filter(|t| !t.is_empty()).collect()),
        ttl_ms: args
            .ttl
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    };
    let registration: Registration =
        match client::call(&args.socket.socket, &request).and_then(|v| {
            serde_json::from_value(v)
                .map_err(|e| client::ClientError::Refused(format!("bad reply: {e}")))
        }) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("agent-guard run: {e}");
                eprintln!("agent-guard run: nothing was started");
                return Ok(ExitCode::from(EXIT_LAUNCH_FAILED));
            }
        };
    if let Err(e) = verify_tagged(&registration) {
        eprintln!("agent-guard run: {e}");
        eprintln!("agent-guard run: nothing was started");
        return Ok(ExitCode::from(EXIT_LAUNCH_FAILED));
    }
    // From here on this process is tagged: whatever fails, it stays fenced.
    let mut protect: Vec<u32> = Some(registration.daemon_pid)
        .filter(|p| *p > 1)
        .into_iter()
        .collect();
    for tid in &registration.daemon_tids {
        if *tid > 1 && !protect.contains(tid) {
            protect.push(*tid);
        }
    }
    if let Err(e) = harden::apply_protecting(registration.hardening, &protect) {
        eprintln!("agent-guard run: hardening the agent process failed: {e}");
        eprintln!("agent-guard run: nothing was started");
        return Ok(ExitCode::from(EXIT_LAUNCH_FAILED));
    }
    let (program, rest) = match args.command.split_first() {
        Some(split) => split,
        None => return Ok(ExitCode::from(EXIT_LAUNCH_FAILED)),
    };
    let err = std::process::Command::new(program).args(rest).exec();
    eprintln!("agent-guard run: cannot execute {program}: {err}");
    Ok(ExitCode::from(
        if err.kind() == std::io::ErrorKind::NotFound {
            EXIT_NOT_FOUND
        } else {
            EXIT_NOT_EXECUTABLE
        },
    ))
}

/// Reads a token file (`-`: standard input), refusing oversized ones.
fn read_token(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read as _;
    let limit = crate::identity::token::MAX_TOKEN_BYTES as u64 + 2;
    let mut text = String::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin().take(limit).read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(limit).read_to_string(&mut text))
    };
    read.map_err(|e| format!("reading token {}: {e}", path.display()))?;
    if text.len() as u64 >= limit {
        return Err(format!(
            "token {} is larger than {} bytes",
            path.display(),
            crate::identity::token::MAX_TOKEN_BYTES
        ));
    }
    Ok(text.trim().to_string())
}

/// Checks with the kernel, not just the socket's word, that this process is
/// tagged as the reply says: a tagged root agent could put a fake daemon on
/// the socket path, but it cannot create or pin a BPF map.
///
/// A launcher that already runs under seccomp was started inside a strict
/// agent: it is tagged by inheritance and cannot call bpf(); skipped there.
fn verify_tagged(reg: &Registration) -> Result<(), String> {
    // Only our own filter (proven by its canary, which no other policy
    // answers the same way) means "started inside a strict agent".
    if harden::under_strict_filter() {
        return Ok(());
    }
    // Not root (an orchestrator launching with a token): bpf() is not ours
    // to call, so check the cgroup instead. Only root can move a process
    // into the agent's cgroup, so a fake daemon could not have.
    if !nix::unistd::geteuid().is_root() {
        return verify_cgroup(reg);
    }
    let refuse = |why: String| {
        format!("could not confirm with the kernel that this process is fenced: {why}")
    };
    let pin = reg
        .procs_pin
        .as_deref()
        .ok_or_else(|| refuse("the daemon did not say where PROCS is pinned".into()))?;
    let pin = std::path::Path::new(pin);
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let on_bpffs = pin
        .parent()
        .and_then(|d| nix::sys::statfs::statfs(d).ok())
        .is_some_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if !on_bpffs {
        return Err(refuse(format!("{} is not on a bpffs", pin.display())));
    }
    let me = std::process::id();
    match crate::kernel::pinned_process_subject(pin, me) {
        // Any subject proves the real kernel map tagged us (a fake daemon
        // cannot write it); another than the reply's is a process-tree
        // grant (`grant --pid`) that moved us between reply and check.
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(refuse("this process is not in the kernel's PROCS map (is the socket served by a real daemon?)".into())),
        Err(e) => Err(refuse(e.to_string())),
    }
}

/// The non-root check: this process sits in the cgroup the daemon named.
fn verify_cgroup(reg: &Registration) -> Result<(), String> {
    let refuse = |why: String| format!("could not confirm that this process is fenced: {why}");
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| refuse(format!("reading /proc/self/cgroup: {e}")))?;
    let mine = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| refuse("no cgroup2 entry in /proc/self/cgroup".into()))?;
    // Inside a cgroup namespace (a pod) the path is relative to the
    // namespace's root and starts with `/..` parts: compare the rest.
    let mut mine = mine;
    while let Some(rest) = mine.strip_prefix("/..") {
        mine = rest;
    }
    if mine.len() > 1 && mine.starts_with('/') && reg.cgroup.ends_with(mine) {
        Ok(())
    } else {
        Err(refuse(format!(
            "this process is in cgroup {mine}, the daemon said {}",
            reg.cgroup
        )))
    }
}
