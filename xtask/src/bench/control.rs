//! `cargo xtask bench`, part 6: the control plane's own latencies: signed
//! launch tokens, `whois`, and two-person approval.
//!
//! One daemon of its own, started with `--control-group GID` and a
//! `--state-dir` in the work directory (a real disk file system here, so
//! the jti file's fsync is real). Its policy: tenant `bench` with one
//! Ed25519 token key (`agent-guard token keygen`), agent `bench/a` with
//! tool `svc` (a listener of this process) and the two-person tool
//! `payments` (a second listener), and two approvers, uids that need not
//! exist (the kernel only compares numbers).
//!
//! 1. **Launch.** N launches of `/bin/true` of each of three kinds, all
//!    as root and timed as whole processes (spawn to exit):
//!    `agent-guard run --tenant bench --agent a -- /bin/true` (root),
//!    the same with `--task T` (root, task scope), and `agent-guard run
//!    --token FILE -- /bin/true` (token). Every token has its own jti and
//!    is issued with `agent-guard token issue` before the timed loop. The
//!    kinds run in batches of BATCH, in blocks of three batches whose order
//!    flips every block (root task token | token task root | ...), so drift
//!    hits all alike; reported are the median and p99 of each, the ratios
//!    of the medians and the median of the per-block ratios. A token launch
//!    makes a task scope of its own (a new subject and cgroup, which the
//!    daemon writes to its registry file before it replies), so token vs
//!    task isolates the signature check and the jti file's write + fsync +
//!    rename + directory fsync; that write sequence is also timed alone on
//!    the same file system, after every batch (a shared disk's fsync
//!    latency changes from minute to minute). The three kinds run once more against a daemon
//!    whose state directory is on tmpfs (/dev/shm), where fsync is free:
//!    what is left is the launch paths' own work.
//! 2. **Whois.** A tagged `agent-guard-probe tcp-call` connects to `svc` and
//!    waits for a line; while the bench holds that connection,
//!    `agent-guard whois --peer P --local L --json` (a whole process) and
//!    the same `whois` request sent straight to the control socket
//!    alternate, N of each (a new probe connection every BATCH pairs). The
//!    difference is what process start and the CLI cost.
//! 3. **Approve → enforced.** A tagged `watch-connect` probe calls
//!    `payments` in a loop (as in part 1), so a refused call opens an
//!    approval request. Each round waits for the request to be listed,
//!    approves it as approver A and then as approver B, and takes the time
//!    from sending B's approve to the first connect the kernel let through.
//!    Rounds alternate between the CLI (`agent-guard approve ID` run with
//!    the approver's uid and the control group's gid; the clock starts at
//!    spawn) and the `approve` request written on a control socket
//!    connection opened with the approver's credentials (the clock starts at
//!    the write), which splits off process start. Then the grant is revoked
//!    and the next refused call opens the next request; the time from the
//!    revoke to that request being listed is reported too, and, per round,
//!    `approvals list` as a process and on the socket (process start under
//!    this phase's load: the probe busy-waits on one CPU). Requests are
//!    only ever approved: a denied one would block new ones for
//!    `--approval-timeout`. The kernel flipped between the last refused and
//!    the first allowed connect, so both are reported (lower and upper
//!    bound).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::common::{
    AGENT, Change, ChildGuard, Guard, PROBE_EPERM, ProbeLog, TENANT, control_request,
    control_request_on, ensure_success, events_lost, fs_type, median, mono_ns, ns_to_us,
    percentile, picked, signed_diff, start_watch_probe, tagged_probe, wait_for_foreign_daemons,
};
use crate::{Built, describe};

/// The daemon's `--control-group`; approvers run with it as their gid.
const CONTROL_GID: u32 = 64_300;
/// The two approvers' uids.
const APPROVER_A: u32 = 64_301;
const APPROVER_B: u32 = 64_302;
/// The daemon's jti file in its state directory (daemon/launch.rs).
const JTI_FILE: &str = "launch-tokens-used.json";
/// The tool the whois probe connects to.
const SVC_TOOL: &str = "svc";
/// The two-person tool.
const TWO_PERSON_TOOL: &str = "payments";
/// Launches (and whois calls) of one kind in a row before another kind.
const BATCH: usize = 10;
/// Untimed launches of each kind before the timed ones.
const WARMUP: usize = 3;
/// Pause after B's approve (so the probe sees the allow) and after the
/// revoke.
const APPROVE_GAP: Duration = Duration::from_millis(20);
/// How long a refused call gets to show up as a listed request.
const REQUEST_WAIT: Duration = Duration::from_secs(5);
/// Time the watch probe gets to start (tagging, exec) before the first round.
const PROBE_SETTLE: Duration = Duration::from_millis(300);
/// Planned length of one approval round beyond its two gaps, for the
/// watch probe's duration (rounds stop early rather than outlive it).
const ROUND_ALLOWANCE_MS: u64 = 150;
/// Watch probe run time beyond the rounds' planned length.
const PROBE_SLACK_MS: u64 = 1500;
/// `agent-guard whois` exit status for a tagged peer.
const WHOIS_TAGGED: i32 = 0;

/// Samples of one quantity, in µs.
struct Dist(Vec<f64>);

impl Dist {
    fn median(&self) -> f64 {
        median(&self.0)
    }

    fn p99(&self) -> f64 {
        percentile(&self.0, 99.0)
    }

    fn max(&self) -> f64 {
        percentile(&self.0, 100.0)
    }

    fn json(&self) -> Value {
        json!({
            "n": self.0.len(),
            "median_us": self.median(),
            "p99_us": self.p99(),
            "max_us": self.max(),
            "samples_us": self.0,
        })
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// How an approval round sent its approves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    /// `agent-guard approve ID` as the approver's uid; clocked from spawn.
    Cli,
    /// The request written on a connection opened with the approver's
    /// credentials; clocked from the write.
    Raw,
}

impl Via {
    fn key(self) -> &'static str {
        match self {
            Via::Cli => "cli",
            Via::Raw => "raw",
        }
    }
}

/// One approval round as the bench saw it (CLOCK_MONOTONIC ns).
struct Round {
    via: Via,
    request: u64,
    /// B's approve: sent (spawn or write) and returned (exit or reply).
    sent_ns: u64,
    returned_ns: u64,
    revoke_sent_ns: u64,
    /// Revoke returned → the next request listed (none for the last round).
    reopened_ns: Option<u64>,
}

/// A round matched with the probe's verdict changes. The kernel flipped
/// between the last refused connect and the first allowed one.
struct Seen {
    /// First allowed connect minus B's approve sent: an upper bound.
    after_send_ns: i64,
    /// Last refused connect minus B's approve sent: a lower bound
    /// (negative when the probe was refused before the approve was sent
    /// and next tried after).
    lower_after_send_ns: i64,
    /// First allowed connect minus B's approve returned (negative: the
    /// kernel let a connect through before the reply or exit).
    after_return_ns: i64,
    /// First allowed connect minus the last refused one.
    resolution_ns: i64,
}

/// For each round, the first change to allow at or after B's approve was
/// sent and before the revoke was sent.
fn match_rounds(rounds: &[Round], changes: &[Change]) -> Vec<Option<Seen>> {
    rounds
        .iter()
        .map(|r| {
            changes
                .iter()
                .find(|c| c.allow && c.at_ns >= r.sent_ns && c.at_ns < r.revoke_sent_ns)
                .map(|c| Seen {
                    after_send_ns: signed_diff(c.at_ns, r.sent_ns),
                    lower_after_send_ns: signed_diff(c.previous_ns, r.sent_ns),
                    after_return_ns: signed_diff(c.at_ns, r.returned_ns),
                    resolution_ns: signed_diff(c.at_ns, c.previous_ns),
                })
        })
        .collect()
}

/// Approve → enforced figures of one [`Via`].
struct ApproveStats {
    via: Via,
    rounds: usize,
    seen: usize,
    after_send: Dist,
    lower_after_send: Dist,
    after_return: Dist,
    /// B's approve: spawn → exit (CLI) or write → reply (raw).
    round_trip: Dist,
    resolution: Dist,
    before_return: usize,
}

impl ApproveStats {
    fn new(via: Via, rounds: &[Round], seen: &[Option<Seen>]) -> Self {
        let (pairs, got) = picked(rounds, seen, |r| r.via == via);
        Self {
            via,
            rounds: pairs.len(),
            seen: got.len(),
            after_send: Dist(got.iter().map(|s| ns_to_us(s.after_send_ns)).collect()),
            lower_after_send: Dist(
                got.iter()
                    .map(|s| ns_to_us(s.lower_after_send_ns))
                    .collect(),
            ),
            after_return: Dist(got.iter().map(|s| ns_to_us(s.after_return_ns)).collect()),
            round_trip: Dist(
                pairs
                    .iter()
                    .map(|(r, _)| ns_to_us(signed_diff(r.returned_ns, r.sent_ns)))
                    .collect(),
            ),
            resolution: Dist(got.iter().map(|s| ns_to_us(s.resolution_ns)).collect()),
            before_return: got.iter().filter(|s| s.after_return_ns < 0).count(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "rounds": self.rounds,
            "changes_seen": self.seen,
            "approve_sent_to_first_allowed_connect": self.after_send.json(),
            "approve_sent_to_last_refused_connect": self.lower_after_send.json(),
            "approve_returned_to_first_allowed_connect": self.after_return.json(),
            "approve_round_trip": self.round_trip.json(),
            "resolution": self.resolution.json(),
            "first_allowed_connect_before_return": self.before_return,
        })
    }
}

/// The result of part 6.
pub(crate) struct ControlPlane {
    runs: usize,
    /// The daemon's state directory on the work directory's file system.
    disk: Launches,
    /// The same with the state directory on tmpfs (None: no tmpfs at
    /// /dev/shm).
    tmpfs: Option<Launches>,
    whois_cli: Dist,
    whois_raw: Dist,
    approve_cli: ApproveStats,
    approve_raw: ApproveStats,
    reopen: Dist,
    /// `approvals list` during the approval rounds: as a process (approver
    /// A) and on the socket (root).
    list_cli: Dist,
    list_raw: Dist,
    probe: ProbeLog,
    spacing_ns: u64,
    foreign_daemons: usize,
    events_lost: u64,
    daemon_cpu: Option<Duration>,
    /// Wall time of each phase, seconds.
    phases: Vec<(&'static str, f64)>,
    /// /proc/loadavg when the part started and ended (other work on the
    /// host shows here).
    loadavg: [String; 2],
}

impl ControlPlane {
    pub(crate) fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\npart 6: control plane (wall time in us; p99 is the nearest rank, = max below 100 \
             samples)"
        );
        let _ = writeln!(t, "  {:<62} {:>9} {:>9} {:>6}", "", "median", "p99", "n");
        self.disk.table(&mut t);
        if let Some(m) = &self.tmpfs {
            m.table(&mut t);
        }
        row(
            &mut t,
            "  token issue (CLI process, before timing)",
            &self.disk.issue,
        );
        row(
            &mut t,
            "whois: agent-guard whois --peer --local --json (process)",
            &self.whois_cli,
        );
        row(
            &mut t,
            "whois: the same request on the control socket",
            &self.whois_raw,
        );
        let _ = writeln!(
            t,
            "    process start and CLI: {:.0} us of {:.0} us ({:.0}%)",
            self.whois_cli.median() - self.whois_raw.median(),
            self.whois_cli.median(),
            100.0 * (1.0 - self.whois_raw.median() / self.whois_cli.median())
        );
        for a in [&self.approve_cli, &self.approve_raw] {
            let (what, trip) = match a.via {
                Via::Cli => (
                    "approve B -> first allowed connect, CLI (from spawn)",
                    "  CLI approve B: spawn -> exit",
                ),
                Via::Raw => (
                    "approve B -> first allowed connect, socket (from write)",
                    "  socket approve B: write -> reply",
                ),
            };
            row(&mut t, what, &a.after_send);
            row(&mut t, trip, &a.round_trip);
            let _ = writeln!(
                t,
                "    seen {}/{}; last refused connect {:.0} us after the send (median, lower \
                 bound); allowed before {} in {}/{}; resolution median {:.0} us",
                a.seen,
                a.rounds,
                a.lower_after_send.median(),
                match a.via {
                    Via::Cli => "the CLI exited",
                    Via::Raw => "the reply",
                },
                a.before_return,
                a.seen,
                a.resolution.median()
            );
        }
        row(
            &mut t,
            "  meanwhile: agent-guard approvals list --json (process)",
            &self.list_cli,
        );
        row(
            &mut t,
            "  meanwhile: approvals_list on the socket",
            &self.list_raw,
        );
        row(
            &mut t,
            "revoke returned -> next request listed (refusal -> request)",
            &self.reopen,
        );
        let _ = writeln!(
            t,
            "    watch probe: {} attempts, spaced {} ns, longest gap {:.0} us",
            self.probe.attempts,
            self.spacing_ns,
            self.probe.max_gap_ns as f64 / 1000.0
        );
        if self.probe.errors > 0 {
            let _ = writeln!(
                t,
                "    warning: {} probe connects failed otherwise: {}",
                self.probe.errors,
                self.probe.notes.join("; ")
            );
        }
        let phases: Vec<String> = self
            .phases
            .iter()
            .map(|(name, secs)| format!("{name} {secs:.1} s"))
            .collect();
        let _ = writeln!(t, "    took: {}", phases.join(", "));
        let _ = writeln!(
            t,
            "    load average at start: {}; at end: {}{}",
            self.loadavg[0],
            self.loadavg[1],
            if self.foreign_daemons > 0 {
                format!(
                    "; {} other agent-guard daemon(s) were running",
                    self.foreign_daemons
                )
            } else {
                String::new()
            }
        );
        t
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "description": "control plane latencies: token launch vs root launch, whois (CLI \
                and raw request), two-person approve -> kernel enforcement",
            "runs_per_kind": self.runs,
            "batch": BATCH,
            "launch": {
                "state_dir_on_disk": self.disk.json(),
                "state_dir_on_tmpfs": self.tmpfs.as_ref().map(Launches::json),
            },
            "whois": {
                "cli": self.whois_cli.json(),
                "raw_request": self.whois_raw.json(),
            },
            "approve": {
                "cli": self.approve_cli.json(),
                "raw_request": self.approve_raw.json(),
                "revoke_returned_to_next_request_listed": self.reopen.json(),
                "approvals_list_cli_during_rounds": self.list_cli.json(),
                "approvals_list_raw_during_rounds": self.list_raw.json(),
                "gap_ms": APPROVE_GAP.as_millis(),
                "probe": {
                    "attempts": self.probe.attempts,
                    "errors": self.probe.errors,
                    "notes": self.probe.notes,
                    "spacing_ns": self.spacing_ns,
                    "max_gap_us": self.probe.max_gap_ns as f64 / 1000.0,
                    "verdict_changes": self.probe.changes.len(),
                },
            },
            "other_agent_guard_daemons": self.foreign_daemons,
            "daemon": {
                "events_lost": self.events_lost,
                "cpu_ms": self.daemon_cpu.map(|d| d.as_millis()),
            },
            "loadavg_start_end": self.loadavg,
            "phases_s": self.phases.iter().map(|(n, s)| json!({ "phase": n, "s": s }))
                .collect::<Vec<_>>(),
        })
    }
}

fn policy(key: &str, svc_port: u16, pay_port: u16) -> String {
    format!(
        r#"# generated by `cargo xtask bench` (part 6)
default_mode = "enforce"

[[tenant]]
name = "{TENANT}"
token_keys = ["{key}"]

[[tool]]
name = "{SVC_TOOL}"
endpoints = [{{ cidr = "127.0.0.1/32", port = {svc_port} }}]

[[tool]]
name = "{TWO_PERSON_TOOL}"
endpoints = [{{ cidr = "127.0.0.1/32", port = {pay_port} }}]
approval = "two-person"
approval_ttl = "10m"

[[agent]]
tenant = "{TENANT}"
name = "{AGENT}"
tools = ["{SVC_TOOL}", "{TWO_PERSON_TOOL}"]

[[approver]]
name = "alice"
uid = {APPROVER_A}

[[approver]]
name = "bob"
uid = {APPROVER_B}
"#
    )
}

/// Runs `cmd` to completion; its output and wall time. An error when it
/// cannot start; the exit status is the caller's to judge.
fn timed(cmd: &mut Command) -> Result<(Duration, Output)> {
    cmd.stdin(Stdio::null());
    let started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    Ok((started.elapsed(), out))
}

/// As [`timed`], and an error unless it exits with `want`.
fn timed_ok(cmd: &mut Command, want: i32) -> Result<(Duration, Output)> {
    let (d, out) = timed(cmd)?;
    if out.status.code() != Some(want) {
        bail!(
            "`{}` exited with {} (expected {want}): {}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((d, out))
}

/// Sets this thread's effective gid and uid (real and saved ids stay 0).
/// The raw system calls change the calling thread only; glibc's wrappers
/// would change every thread of the process.
fn set_thread_ids(uid: u32, gid: u32) -> std::io::Result<()> {
    unsafe extern "C" {
        fn syscall(num: std::ffi::c_long, ...) -> std::ffi::c_long;
    }
    #[cfg(target_arch = "x86_64")]
    const SETRESUID_SETRESGID: Option<(std::ffi::c_long, std::ffi::c_long)> = Some((117, 119));
    #[cfg(target_arch = "aarch64")]
    const SETRESUID_SETRESGID: Option<(std::ffi::c_long, std::ffi::c_long)> = Some((147, 149));
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    const SETRESUID_SETRESGID: Option<(std::ffi::c_long, std::ffi::c_long)> = None;
    let Some((setresuid, setresgid)) = SETRESUID_SETRESGID else {
        return Err(std::io::Error::from(std::io::ErrorKind::Unsupported));
    };
    // -1: leave that id as it is.
    const KEEP: std::ffi::c_uint = std::ffi::c_uint::MAX;
    // SAFETY: setresgid/setresuid take three uid_t/gid_t (unsigned int)
    // arguments by value; no memory is passed.
    let rc = unsafe { syscall(setresgid, KEEP, gid as std::ffi::c_uint, KEEP) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe { syscall(setresuid, KEEP, uid as std::ffi::c_uint, KEEP) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A control socket connection whose peer credentials (fixed at connect
/// time, SO_PEERCRED) are `uid`/`gid`: connected from a short-lived thread
/// that first takes on those ids. The thread ends with them; the rest of
/// the bench stays root.
fn connect_as(socket: &Path, uid: u32, gid: u32) -> Result<UnixStream> {
    let path = socket.to_path_buf();
    let joined = std::thread::Builder::new()
        .name("bench-approver".into())
        .spawn(move || -> std::io::Result<UnixStream> {
            set_thread_ids(uid, gid)?;
            UnixStream::connect(&path)
        })
        .context("starting the approver thread")?
        .join();
    match joined {
        Ok(r) => {
            r.with_context(|| format!("connecting to {} as uid {uid} gid {gid}", socket.display()))
        }
        Err(_) => bail!("the approver thread panicked"),
    }
}

/// `agent-guard ARGS --socket S` run with `uid` and `gid` (all
/// supplementary groups dropped: std does that when a root parent sets the
/// uid).
fn as_user(built: &Built, socket: &Path, uid: u32, gid: u32, args: &[&str]) -> Command {
    let mut cmd = Command::new(&built.daemon);
    cmd.args(args).arg("--socket").arg(socket).uid(uid).gid(gid);
    cmd
}

/// The newest listed approval request with an id above `after`.
fn wait_for_request(socket: &Path, after: Option<u64>) -> Result<(u64, u64)> {
    let deadline = Instant::now() + REQUEST_WAIT;
    loop {
        let data = control_request(socket, &json!({ "op": "approvals_list" }))?;
        let newest = data["approvals"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["tool"] == TWO_PERSON_TOOL)
            .filter_map(|a| a["id"].as_u64())
            .filter(|id| after.is_none_or(|a| *id > a))
            .max();
        if let Some(id) = newest {
            return Ok((id, mono_ns()));
        }
        if Instant::now() > deadline {
            bail!(
                "no new approval request for `{TWO_PERSON_TOOL}` was listed within {} s of a \
                 refused call (listed: {})",
                REQUEST_WAIT.as_secs(),
                data["approvals"]
            );
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// A loopback listener whose thread accepts and at once drops connections
/// (the watch probe's allowed connects need something to connect to).
fn drop_listener() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a listener")?;
    let port = l.local_addr().context("listener address")?.port();
    std::thread::Builder::new()
        .name("bench-control-accept".into())
        .spawn(move || {
            loop {
                if l.accept().is_err() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
        .context("starting an accept thread")?;
    Ok(port)
}

/// Accepts one connection within `timeout`.
fn accept_within(l: &TcpListener, timeout: Duration) -> Result<(TcpStream, SocketAddr)> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, peer)) => {
                s.set_nonblocking(false)?;
                return Ok((s, peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("the tagged tcp-call probe did not connect within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("accepting the probe's connection"),
        }
    }
}

/// The first three fields of /proc/loadavg.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A directory removed (with everything in it) on drop.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.0)
        {
            eprintln!("bench: cleanup: removing {}: {e}", self.0.display());
        }
    }
}

/// What the daemon's jti write does (daemon/state.rs `write_state_bytes`):
/// write a temporary file, fsync it, rename it over the old one, fsync the
/// directory.
fn jti_write_sequence(dir: &Path, bytes: &[u8]) -> Result<Duration> {
    let tmp = dir.join("f.tmp");
    let started = Instant::now();
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("f"))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(started.elapsed())
}

/// Launch figures with one daemon (one state directory).
struct Launches {
    /// File system of the daemon's state directory.
    state_fs: String,
    issue: Dist,
    root: Dist,
    task: Dist,
    token: Dist,
    /// Per block of three adjacent batches: median(token) / median(root)
    /// and median(token) / median(task).
    block_ratios_root: Vec<f64>,
    block_ratios_task: Vec<f64>,
    /// Size of the jti file at the end.
    jti_file_bytes: usize,
    /// The jti file's write sequence alone (at the jti file's size then),
    /// on the state directory's file system, once after every batch.
    jti_write: Dist,
}

impl Launches {
    fn table(&self, t: &mut String) {
        let _ = writeln!(
            t,
            "  launches of /bin/true, the daemon's state dir on {}:",
            self.state_fs
        );
        row(
            t,
            "  as root: run --tenant bench --agent a -- /bin/true",
            &self.root,
        );
        row(
            t,
            "  as root, task scope: run ... --task T -- /bin/true",
            &self.task,
        );
        row(
            t,
            "  with a token: run --token FILE -- /bin/true",
            &self.token,
        );
        for (name, base, blocks) in [
            ("root", &self.root, &self.block_ratios_root),
            ("task", &self.task, &self.block_ratios_task),
        ] {
            let _ = writeln!(
                t,
                "      token/{name}: x{:.3} (medians), x{:.3} (median of {} blocks); {:+.0} us",
                self.token.median() / base.median(),
                median(blocks),
                blocks.len(),
                self.token.median() - base.median()
            );
        }
        row(
            t,
            &format!(
                "    jti write sequence alone ({} B), between batches",
                self.jti_file_bytes
            ),
            &self.jti_write,
        );
    }

    fn json(&self) -> Value {
        json!({
            "state_dir_fs": self.state_fs,
            "root": self.root.json(),
            "root_task_scope": self.task.json(),
            "token": self.token.json(),
            "token_over_root_ratio_of_medians": self.token.median() / self.root.median(),
            "token_over_root_block_ratios": self.block_ratios_root,
            "token_over_root_block_ratio_median": median(&self.block_ratios_root),
            "token_minus_root_median_us": self.token.median() - self.root.median(),
            "token_over_task_ratio_of_medians": self.token.median() / self.task.median(),
            "token_over_task_block_ratios": self.block_ratios_task,
            "token_over_task_block_ratio_median": median(&self.block_ratios_task),
            "token_minus_task_median_us": self.token.median() - self.task.median(),
            "token_issue_cli": self.issue.json(),
            "jti_file_bytes_at_end": self.jti_file_bytes,
            "jti_write_sequence_alone_between_batches": self.jti_write.json(),
        })
    }
}

/// One table row: label, median, p99, n.
fn row(t: &mut String, what: &str, d: &Dist) {
    let _ = writeln!(
        t,
        "  {what:<62} {:>9.0} {:>9.0} {:>6}",
        d.median(),
        d.p99(),
        d.0.len()
    );
}

/// Phase 1 against the running daemon at `socket`, whose state directory
/// is `state_dir`: issues the tokens (into `token_dir`), then times `runs`
/// launches of each kind, and the jti write sequence alone in `scratch`
/// (on the state directory's file system) after every batch.
fn launches(
    built: &Built,
    socket: &Path,
    key_file: &Path,
    token_dir: &Path,
    state_dir: &Path,
    scratch: &Path,
    runs: usize,
) -> Result<Launches> {
    std::fs::create_dir_all(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    std::fs::create_dir_all(token_dir)
        .with_context(|| format!("creating {}", token_dir.display()))?;
    let pid = std::process::id();
    let total = runs + WARMUP + 1;
    eprintln!("bench: part 6: issuing {total} launch tokens");
    let mut tokens: Vec<PathBuf> = Vec::with_capacity(total);
    let mut issue = Vec::with_capacity(total);
    let tag = token_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for i in 0..total {
        let mut cmd = Command::new(&built.daemon);
        cmd.args(["token", "issue", "--key"])
            .arg(key_file)
            .args(["--tenant", TENANT, "--agent", AGENT, "--valid-for", "10m"])
            .arg("--jti")
            .arg(format!("bench-{pid}-{tag}-{i}"));
        let (d, out) = timed_ok(&mut cmd, 0)?;
        issue.push(us(d));
        let path = token_dir.join(format!("t{i}.jwt"));
        std::fs::write(&path, String::from_utf8_lossy(&out.stdout).trim())
            .with_context(|| format!("writing {}", path.display()))?;
        tokens.push(path);
    }
    let mut tokens = tokens.into_iter();
    let root_launch = |task: bool| {
        let mut c = Command::new(&built.daemon);
        c.arg("run")
            .arg("--socket")
            .arg(socket)
            .args(["--tenant", TENANT, "--agent", AGENT]);
        if task {
            c.args(["--task", "bench task"]);
        }
        c.args(["--", "/bin/true"]);
        c
    };
    let token_launch = |token: &Path, program: &[&Path]| {
        let mut c = Command::new(&built.daemon);
        c.arg("run")
            .arg("--socket")
            .arg(socket)
            .arg("--token")
            .arg(token)
            .arg("--")
            .args(program);
        c
    };
    // Sanity: a token launch is fenced (a connect outside the policy is
    // refused with EPERM), so the timed ones do launch tagged.
    let first = tokens.next().context("no token")?;
    let mut check = token_launch(&first, &[built.probe.as_path()]);
    check.args(["tcp", "127.0.0.1", "9"]);
    timed_ok(&mut check, PROBE_EPERM).context(
        "sanity check: a token-launched probe should be refused a connect outside the policy",
    )?;
    let true_bin = Path::new("/bin/true");
    for _ in 0..WARMUP {
        timed_ok(&mut root_launch(false), 0)?;
        timed_ok(&mut root_launch(true), 0)?;
        let t = tokens.next().context("no token")?;
        timed_ok(&mut token_launch(&t, &[true_bin]), 0)?;
    }
    let state_fs = fs_type(state_dir).unwrap_or_else(|| "?".to_owned());
    eprintln!(
        "bench: part 6: {runs} launches of /bin/true each as root, as root with a task scope \
         and with a token, in blocks of three batches of {BATCH}; state dir on {state_fs}"
    );
    let mut all: [Vec<f64>; 3] = Default::default();
    let mut jti_write = Vec::with_capacity(3 * runs / BATCH);
    let mut block_ratios_root = Vec::new();
    let mut block_ratios_task = Vec::new();
    for block in 0..runs / BATCH {
        let mut got: [Vec<f64>; 3] = Default::default();
        // root, task, token | token, task, root | ...
        let order = if block % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        for kind in order {
            for _ in 0..BATCH {
                let d = if kind == 2 {
                    let t = tokens.next().context("ran out of tokens")?;
                    timed_ok(&mut token_launch(&t, &[true_bin]), 0)?.0
                } else {
                    timed_ok(&mut root_launch(kind == 1), 0)?.0
                };
                got[kind].push(us(d));
            }
            let size = std::fs::metadata(state_dir.join(JTI_FILE)).map_or(0, |m| m.len());
            let bytes = vec![b'x'; usize::try_from(size).unwrap_or(0).max(1)];
            jti_write.push(us(jti_write_sequence(scratch, &bytes).with_context(
                || format!("timing a write + fsync in {}", scratch.display()),
            )?));
        }
        block_ratios_root.push(median(&got[2]) / median(&got[0]));
        block_ratios_task.push(median(&got[2]) / median(&got[1]));
        for (into, from) in all.iter_mut().zip(got) {
            into.extend(from);
        }
    }
    let jti_file_bytes = std::fs::read(state_dir.join(JTI_FILE))
        .map(|b| b.len())
        .unwrap_or(0);
    let [root, task, token] = all;
    Ok(Launches {
        state_fs,
        issue: Dist(issue),
        root: Dist(root),
        task: Dist(task),
        token: Dist(token),
        block_ratios_root,
        block_ratios_task,
        jti_file_bytes,
        jti_write: Dist(jti_write),
    })
}

/// Runs part 6 with a daemon of its own (started and stopped here).
pub(crate) fn measure(
    built: &Built,
    cgroup2: &Path,
    runs: usize,
    approve_rounds: u32,
    spacing_ns: u64,
) -> Result<ControlPlane> {
    let runs = runs.div_ceil(BATCH) * BATCH;
    let load_start = loadavg();
    let mut phases: Vec<(&'static str, f64)> = Vec::new();
    let mut phase = Instant::now();
    let mut lap = |name: &'static str| {
        phases.push((name, phase.elapsed().as_secs_f64()));
        phase = Instant::now();
    };
    let mut guard = Guard::create(cgroup2, "-control")?;
    // Approvers (other uids) must reach the socket in here.
    std::fs::set_permissions(&guard.dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("chmod 0711 {}", guard.dir.display()))?;
    let key_file = guard.dir.join("issuer.key");
    let (_, out) = timed_ok(
        Command::new(&built.daemon)
            .args(["token", "keygen", "--out"])
            .arg(&key_file),
        0,
    )?;
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let svc = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the svc listener")?;
    let svc_port = svc.local_addr()?.port();
    let pay_port = drop_listener()?;
    std::fs::write(&guard.policy, policy(&key, svc_port, pay_port))
        .with_context(|| format!("writing {}", guard.policy.display()))?;
    let state_dir = guard.dir.join("state");
    for a in [
        "--control-group".to_owned(),
        CONTROL_GID.to_string(),
        "--state-dir".to_owned(),
        state_dir.display().to_string(),
    ] {
        guard.extra_args.push(a.into());
    }
    let foreign_daemons = wait_for_foreign_daemons(&guard.socket);
    lap("setup");
    guard.start_daemon(&built.daemon)?;
    let socket = guard.socket.clone();
    lap("daemon start");

    // 1. Launch.
    let disk = launches(
        built,
        &socket,
        &key_file,
        &guard.dir.join("tokens-disk"),
        &state_dir,
        &guard.dir.join("fsync"),
        runs,
    )?;
    // The daemon's jti write, alone, on the same file system and at the
    // jti file's final size.
    lap("launches (state dir on disk)");

    // 2. Whois.
    eprintln!("bench: part 6: {runs} whois as a process and {runs} on the socket");
    let mut whois_cli = Vec::with_capacity(runs);
    let mut whois_raw = Vec::with_capacity(runs);
    for batch in 0..runs / BATCH {
        let mut cmd = tagged_probe(built, &socket, TENANT, AGENT);
        cmd.args(["tcp-call", "127.0.0.1"])
            .arg(svc_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
        let mut probe = ChildGuard(Some(child));
        let (mut conn, peer) = accept_within(&svc, Duration::from_secs(10))?;
        let local = conn.local_addr()?;
        let (peer, local) = (peer.to_string(), local.to_string());
        let request = json!({ "op": "whois", "peer": peer, "local": local });
        if batch == 0 {
            let data = control_request(&socket, &request)?;
            if data["tagged"] != true || data["tenant"] != TENANT || data["agent"] != AGENT {
                bail!("sanity check: whois should name {TENANT}/{AGENT}; it answered {data}");
            }
        }
        for i in 0..2 * BATCH {
            // cli, raw | raw, cli | ...
            if (i % 2 == 0) == (i / 2 % 2 == 0) {
                let mut c = Command::new(&built.daemon);
                c.args([
                    "whois", "--peer", &peer, "--local", &local, "--json", "--socket",
                ])
                .arg(&socket);
                whois_cli.push(us(timed_ok(&mut c, WHOIS_TAGGED)?.0));
            } else {
                let started = Instant::now();
                let data = control_request(&socket, &request)?;
                let d = started.elapsed();
                if data["tagged"] != true {
                    bail!("whois lost the tagged peer: {data}");
                }
                whois_raw.push(us(d));
            }
        }
        conn.write_all(b"ok\n")?;
        drop(conn);
        let out = probe
            .0
            .take()
            .context("probe gone")?
            .wait_with_output()
            .context("waiting for the tcp-call probe")?;
        ensure_success(&cmd, &out)?;
    }

    lap("whois");

    // 3. Approve -> enforced.
    let gap_ms = u64::try_from(APPROVE_GAP.as_millis()).unwrap_or(u64::MAX);
    let duration_ms =
        PROBE_SLACK_MS + u64::from(approve_rounds) * (2 * gap_ms + ROUND_ALLOWANCE_MS);
    eprintln!(
        "bench: part 6: {approve_rounds} approval rounds (CLI and socket alternating) with a \
         tagged watch-connect probe for {duration_ms} ms"
    );
    let watch = start_watch_probe(
        built,
        &socket,
        &guard.dir,
        pay_port,
        duration_ms,
        spacing_ns,
    )?;
    let probe_end = watch.started + duration_ms * 1_000_000;
    std::thread::sleep(PROBE_SETTLE);

    let mut rounds: Vec<Round> = Vec::new();
    let mut list_cli = Vec::new();
    let mut list_raw = Vec::new();
    let mut next = wait_for_request(&socket, None)?;
    for round in 0..approve_rounds {
        if mono_ns() + (2 * gap_ms + ROUND_ALLOWANCE_MS) * 1_000_000 > probe_end {
            eprintln!(
                "bench: warning: approve latency: the probe ends soon; stopping after {round} \
                 of {approve_rounds} rounds"
            );
            break;
        }
        let (id, _) = next;
        let id_s = id.to_string();
        let via = if round % 2 == 0 { Via::Cli } else { Via::Raw };
        // A read-only verb both ways under this phase's load (the watch
        // probe busy-waits on one CPU): what process start costs here.
        let mut l = as_user(
            built,
            &socket,
            APPROVER_A,
            CONTROL_GID,
            &["approvals", "list", "--json"],
        );
        list_cli.push(us(timed_ok(&mut l, 0)?.0));
        let started = Instant::now();
        control_request(&socket, &json!({ "op": "approvals_list" }))?;
        list_raw.push(us(started.elapsed()));
        let approve = json!({ "op": "approve", "id": id });
        let (sent_ns, returned_ns, grant) = match via {
            Via::Cli => {
                let mut a = as_user(built, &socket, APPROVER_A, CONTROL_GID, &["approve", &id_s]);
                timed_ok(&mut a, 0)?;
                let mut b = as_user(built, &socket, APPROVER_B, CONTROL_GID, &["approve", &id_s]);
                b.stdin(Stdio::null());
                let sent_ns = mono_ns();
                let out = b
                    .output()
                    .with_context(|| format!("could not start `{}`", describe(&b)))?;
                let returned_ns = mono_ns();
                let text = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() {
                    bail!(
                        "`{}` failed ({}): {}{}",
                        describe(&b),
                        out.status,
                        text.trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                // "request ID approved by two approvers: grant G for Ns"
                let grant = text
                    .split_whitespace()
                    .skip_while(|w| *w != "grant")
                    .nth(1)
                    .and_then(|g| g.parse::<u64>().ok())
                    .with_context(|| format!("`{}` printed no grant id: {text}", describe(&b)))?;
                (sent_ns, returned_ns, grant)
            }
            Via::Raw => {
                let a = connect_as(&socket, APPROVER_A, CONTROL_GID)?;
                control_request_on(a, &approve).context("approving as approver A")?;
                let b = connect_as(&socket, APPROVER_B, CONTROL_GID)?;
                let sent_ns = mono_ns();
                let data = control_request_on(b, &approve).context("approving as approver B")?;
                let returned_ns = mono_ns();
                let grant = data["grant"]
                    .as_u64()
                    .with_context(|| format!("the second approve made no grant: {data}"))?;
                (sent_ns, returned_ns, grant)
            }
        };
        std::thread::sleep(APPROVE_GAP);
        let revoke_sent_ns = mono_ns();
        control_request(&socket, &json!({ "op": "revoke", "grant": grant }))?;
        let revoke_returned_ns = mono_ns();
        let reopened_ns = if round + 1 < approve_rounds {
            next = wait_for_request(&socket, Some(id))?;
            Some(next.1.saturating_sub(revoke_returned_ns))
        } else {
            None
        };
        rounds.push(Round {
            via,
            request: id,
            sent_ns,
            returned_ns,
            revoke_sent_ns,
            reopened_ns,
        });
        std::thread::sleep(APPROVE_GAP);
    }
    let status = control_request(&socket, &json!({ "op": "status" }))?;
    let daemon_cpu = guard.daemon_cpu();
    let log = watch.finish();
    guard.stop_daemon()?;
    lap("approvals");
    let log = log?;
    match log.changes.first() {
        Some(c) if !c.allow => {}
        other => bail!(
            "sanity check failed: the tagged watch-connect probe should start refused \
             (`{TWO_PERSON_TOOL}` needs two approvals), but its first verdict was {other:?}"
        ),
    }
    let seen = match_rounds(&rounds, &log.changes);
    let reopen = Dist(
        rounds
            .iter()
            .filter_map(|r| r.reopened_ns)
            .map(|ns| ns as f64 / 1000.0)
            .collect(),
    );
    if let Some(r) = rounds.iter().zip(&seen).find(|(_, s)| s.is_none()) {
        eprintln!(
            "bench: warning: approve latency: request {} ({}): no allowed connect seen between \
             the approve and the revoke",
            r.0.request,
            r.0.via.key()
        );
    }

    // 1 again with the state directory on tmpfs, where fsync costs
    // nothing: what the launch paths cost without their durable writes.
    let shm = Path::new("/dev/shm");
    let tmpfs = if fs_type(shm).as_deref() == Some("tmpfs") {
        let dir = RemoveOnDrop(shm.join(format!("agent-guard-bench-{}", std::process::id())));
        let tmpfs_state = dir.0.join("state");
        if let Some(i) = guard.extra_args.iter().position(|a| a == "--state-dir") {
            guard.extra_args[i + 1] = tmpfs_state.clone().into_os_string();
        }
        guard.start_daemon(&built.daemon)?;
        lap("daemon restart");
        let m = launches(
            built,
            &socket,
            &key_file,
            &guard.dir.join("tokens-tmpfs"),
            &tmpfs_state,
            &dir.0.join("fsync"),
            runs,
        )?;
        guard.stop_daemon()?;
        lap("launches (state dir on tmpfs)");
        Some(m)
    } else {
        eprintln!("bench: warning: /dev/shm is not a tmpfs; no launches without fsync");
        None
    };
    Ok(ControlPlane {
        runs,
        disk,
        tmpfs,
        whois_cli: Dist(whois_cli),
        whois_raw: Dist(whois_raw),
        approve_cli: ApproveStats::new(Via::Cli, &rounds, &seen),
        approve_raw: ApproveStats::new(Via::Raw, &rounds, &seen),
        reopen,
        list_cli: Dist(list_cli),
        list_raw: Dist(list_raw),
        probe: log,
        spacing_ns,
        foreign_daemons,
        events_lost: events_lost(&status),
        daemon_cpu,
        phases,
        loadavg: [load_start, loadavg()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_match_the_first_allow_before_the_revoke() {
        let round = |via, sent_ns, returned_ns, revoke_sent_ns| Round {
            via,
            request: 1,
            sent_ns,
            returned_ns,
            revoke_sent_ns,
            reopened_ns: None,
        };
        let rounds = [
            round(Via::Cli, 1000, 1500, 2000),
            round(Via::Raw, 3000, 3100, 4000),
        ];
        let ch = |at_ns, previous_ns, allow| Change {
            at_ns,
            previous_ns,
            allow,
        };
        // First round allowed before its CLI exited; the second round's
        // allow comes after its revoke was sent, so it is not seen.
        let changes = [
            ch(10, 0, false),
            ch(1200, 1180, true),
            ch(2050, 2040, false),
            ch(4100, 4090, true),
        ];
        let seen = match_rounds(&rounds, &changes);
        let s = seen[0].as_ref().expect("seen");
        assert_eq!(
            (
                s.after_send_ns,
                s.lower_after_send_ns,
                s.after_return_ns,
                s.resolution_ns
            ),
            (200, 180, -300, 20)
        );
        assert!(seen[1].is_none());
        let cli = ApproveStats::new(Via::Cli, &rounds, &seen);
        assert_eq!((cli.rounds, cli.seen, cli.before_return), (1, 1, 1));
        let raw = ApproveStats::new(Via::Raw, &rounds, &seen);
        assert_eq!((raw.rounds, raw.seen), (1, 0));
        assert_eq!(raw.round_trip.0, vec![0.1]);
    }

    #[test]
    fn policy_has_the_approval_tool_and_approvers() {
        let p = policy("ed25519:00", 1000, 2000);
        assert!(p.contains("token_keys = [\"ed25519:00\"]"));
        assert!(p.contains("approval = \"two-person\""));
        assert!(p.contains(&format!("uid = {APPROVER_A}")));
        assert!(p.contains(&format!("uid = {APPROVER_B}")));
        assert!(p.contains("port = 2000"));
    }
}
