//! What more than one part of `cargo xtask bench` uses: the command-line
//! arguments, the tenant and agent names, the [`Guard`] that owns a bench
//! daemon and cleans up after it, requests to a running daemon, host facts
//! and the median.
//!
//! The parts (`grants`, `audit`, `local`, `control`) import from here and
//! from the crate root only, never from each other or from `mod.rs`, which
//! runs them.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{Built, describe};

/// The tenant of the bench policies of parts 1, 2, 5 and 6.
pub(crate) const TENANT: &str = "bench";
/// The agent of `c` (base capabilities), of the grant latency probe and of
/// parts 5 and 6.
pub(crate) const AGENT: &str = "a";
/// The tool granted and revoked in part 1; it is not among agent `a`'s own
/// tools.
pub(crate) const PAY_TOOL: &str = "pay";
/// How long the daemon gets to answer `status`.
const DAEMON_READY: Duration = Duration::from_secs(30);
/// How long the daemon gets to exit after SIGTERM.
const DAEMON_STOP: Duration = Duration::from_secs(30);
/// How long a sample waits for other agent-guard daemons (e.g. a test run)
/// to go away before it runs with them and says so.
const FOREIGN_WAIT: Duration = Duration::from_secs(60);
/// `agent-guard-probe` exit status for EPERM.
pub(crate) const PROBE_EPERM: i32 = 10;
/// How long a control request may take before the bench gives up.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Rounds of `a b c c b a` samples [default: 7, or 2 with --quick].
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) rounds: Option<u32>,
    /// connect() calls per sample [default: 8000, or 5000 with --quick].
    /// Above ~10000 the samples measure ephemeral port search instead: a
    /// port whose TIME_WAIT is younger than 1 s cannot be reused, and
    /// connect() prefers half of the 28k-port range, so loopback connects
    /// jump from ~11 us to ~55 us on the reference machine.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(100..=1_000_000))]
    pub(crate) connects: Option<u32>,
    /// Smoke run: 2 rounds of 5000 connects per sample.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Endpoint entries (distinct 10.x.y.z/32, various ports) in the tagged
    /// agent's tools, besides the listener's own entry.
    #[arg(long, value_name = "E", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub(crate) endpoints: u32,
    /// Pause before each sample so the previous sample's TIME_WAIT ports are
    /// reusable again (tcp_tw_reuse waits >1 s) and every sample starts alike.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub(crate) pause_ms: u64,
    /// Skip part 1, the grant/revoke -> enforcement latency measurement.
    #[arg(long)]
    pub(crate) skip_grants: bool,
    /// Grant + revoke rounds in part 1.
    #[arg(long, value_name = "K", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) grant_rounds: u32,
    /// Pause after each grant and each revoke in part 1.
    #[arg(long, value_name = "MS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub(crate) grant_gap_ms: u64,
    /// Space the connect attempts of the part-1 and part-6 probes this far
    /// apart (busy wait), which bounds the resolution; 0 is a tight loop.
    /// Every attempt is a decision event the daemon must audit: a tight
    /// loop (~3.5 us per attempt here) floods it with ~300k events/s, which
    /// slows its replies (grant ~5 ms) and preempts the probe for
    /// milliseconds.
    #[arg(long, value_name = "NS", default_value_t = 20_000)]
    pub(crate) watch_spacing_ns: u64,
    /// Do not pin the connect probe to CPU 0 and the listener's threads to
    /// CPU 1 (pinning needs 2+ CPUs and is skipped otherwise).
    #[arg(long)]
    pub(crate) no_pin: bool,
    /// Skip part 3, `audit verify` / `audit replay` speed.
    #[arg(long)]
    pub(crate) skip_audit: bool,
    /// Records generated for part 3 [default: 1000000, or 100000 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1000..=100_000_000))]
    pub(crate) audit_records: Option<u64>,
    /// Timed runs of each audit command in part 3 (the median is reported).
    #[arg(long, value_name = "K", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) audit_runs: u32,
    /// Skip part 4, the deny flood through the event pipeline.
    #[arg(long)]
    pub(crate) skip_flood: bool,
    /// Attempts per flood probe = what one probe alone does in this many
    /// seconds (calibrated before the flood; with every core flooding and
    /// the daemon busy the flood lasts ~3x longer) [default: 3, or 1 with
    /// --quick].
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..=600))]
    pub(crate) flood_seconds: Option<u64>,
    /// Attempts per flood probe, instead of calibrating to --flood-seconds.
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub(crate) flood_attempts: Option<u32>,
    /// Run the deny flood at the default ring size only, even if events
    /// were lost (no retries with 16 and 64 MiB rings).
    #[arg(long)]
    pub(crate) flood_default_ring_only: bool,
    /// Skip part 5, Unix socket connects and per-agent DNS queries.
    #[arg(long)]
    pub(crate) skip_local: bool,
    /// Skip part 6, the control plane (token launch, whois, approve).
    #[arg(long)]
    pub(crate) skip_control: bool,
    /// Part 6: runs of each kind (root, task-scope and token launches,
    /// against each of the two state directories; whois as a process and
    /// on the socket), rounded up to a multiple of 10 [default: 200, or 50
    /// with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(10..=100_000))]
    pub(crate) control_runs: Option<u32>,
    /// Part 6: two-person approval rounds, CLI and socket alternating
    /// [default: 40, or 10 with --quick].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(2..=10_000))]
    pub(crate) approve_rounds: Option<u32>,
    /// Skip part 7, the side-by-side cost per call.
    #[arg(long)]
    pub(crate) skip_cost: bool,
    /// Part 7: rounds [default: 12, or 3 with --quick]; 0 runs only the
    /// pass with the kernel's per-program statistics (no timed rounds).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub(crate) cost_rounds: Option<u32>,
    /// Run only these parts (comma-separated); the --skip-* flags still
    /// apply. results.json then holds only them.
    #[arg(long, value_enum, value_name = "PART", value_delimiter = ',')]
    pub(crate) only: Vec<Part>,
}

/// The parts of `cargo xtask bench`, for --only.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Part {
    /// Part 1: grant/revoke -> kernel enforcement latency.
    Grants,
    /// Part 2: loopback connect() cost, configurations a-d.
    Connect,
    /// Part 3: audit verify / replay speed.
    Audit,
    /// Part 4: deny flood through the event pipeline.
    Flood,
    /// Part 5: Unix socket connects and per-agent DNS.
    Local,
    /// Part 6: control plane (token launch, whois, approve).
    Control,
    /// Part 7: cost per call side by side (none, nftables, untagged,
    /// tagged per call and with --flow-records; TCP, UDP, Unix).
    Cost,
}

impl BenchArgs {
    /// Whether `part` runs: selected by --only (or no --only) and not
    /// skipped.
    pub(crate) fn runs(&self, part: Part) -> bool {
        let skipped = match part {
            Part::Grants => self.skip_grants,
            Part::Connect => false,
            Part::Audit => self.skip_audit,
            Part::Flood => self.skip_flood,
            Part::Local => self.skip_local,
            Part::Control => self.skip_control,
            Part::Cost => self.skip_cost,
        };
        !skipped && (self.only.is_empty() || self.only.contains(&part))
    }

    /// Why `part` does not run (for results.json).
    pub(crate) fn why_not(&self, part: Part) -> String {
        if self.only.is_empty() || self.only.contains(&part) {
            format!("--skip-{}", part.name())
        } else {
            "not in --only".to_owned()
        }
    }
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Grants => "grants",
            Part::Connect => "connect",
            Part::Audit => "audit",
            Part::Flood => "flood",
            Part::Local => "local",
            Part::Control => "control",
            Part::Cost => "cost",
        }
    }
}

// ---------------------------------------------------------------------------
// Daemon and cleanup
// ---------------------------------------------------------------------------

/// Owns everything the bench creates outside its own process: the work
/// directory, the daemon process and the daemon's cgroup subtree. Drop
/// stops the daemon (SIGTERM by pid, then SIGKILL), unmounts the pin
/// directory if the daemon left it mounted, removes the cgroup subtree and
/// the work directory.
pub(crate) struct Guard {
    pub(crate) dir: PathBuf,
    pub(crate) policy: PathBuf,
    pub(crate) socket: PathBuf,
    pin_dir: PathBuf,
    pub(crate) audit_dir: PathBuf,
    log: PathBuf,
    cgroup_root: PathBuf,
    daemon: Option<Child>,
    /// More `agent-guard daemon` arguments (e.g. `--ring-bytes`).
    pub(crate) extra_args: Vec<std::ffi::OsString>,
}

impl Guard {
    /// `tag` tells apart the work directories (and cgroup roots) of several
    /// guards in one run; "" for the first.
    pub(crate) fn create(cgroup2: &Path, tag: &str) -> Result<Self> {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("agent-guard-bench-{pid}{tag}"));
        if dir.exists() {
            bail!(
                "{} exists already (left over from an earlier run?); remove it",
                dir.display()
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let guard = Self {
            policy: dir.join("policy.toml"),
            socket: dir.join("agent-guard.sock"),
            pin_dir: dir.join("bpf"),
            audit_dir: dir.join("audit"),
            log: dir.join("daemon.log"),
            cgroup_root: cgroup2.join(format!("ag-bench-{pid}{tag}")),
            dir,
            daemon: None,
            extra_args: Vec::new(),
        };
        Ok(guard)
    }

    pub(crate) fn start_daemon(&mut self, bin: &Path) -> Result<()> {
        if self.daemon.is_some() {
            bail!("internal error: the bench daemon is already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("creating {}", self.log.display()))?;
        let log_err = log.try_clone().context("duplicating the log file")?;
        let mut cmd = Command::new(bin);
        cmd.arg("daemon")
            .arg("--policy")
            .arg(&self.policy)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--audit-dir")
            .arg(&self.audit_dir)
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
        self.daemon = Some(child);

        let deadline = Instant::now() + DAEMON_READY;
        loop {
            if let Some(child) = self.daemon.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.daemon = None;
                bail!(
                    "the daemon exited during startup ({status}); its log:\n{}",
                    self.log_tail()
                );
            }
            let ready = Command::new(bin)
                .arg("status")
                .arg("--socket")
                .arg(&self.socket)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon did not answer `status` within {} s; its log:\n{}",
                    DAEMON_READY.as_secs(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM by pid and wait; an error if it does not exit in time or
    /// exits with a failure.
    pub(crate) fn stop_daemon(&mut self) -> Result<()> {
        let Some(mut child) = self.daemon.take() else {
            return Ok(());
        };
        let pid = child.id();
        match terminate(&mut child, DAEMON_STOP) {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => bail!(
                "the daemon (pid {pid}) exited with {status} after SIGTERM; its log:\n{}",
                self.log_tail()
            ),
            Err(e) => Err(e.context(format!("stopping the daemon (pid {pid})"))),
        }
    }

    /// The running daemon's pid.
    pub(crate) fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// utime + stime of the running daemon from /proc/PID/stat (clock ticks
    /// of 10 ms, USER_HZ on Linux).
    pub(crate) fn daemon_cpu(&self) -> Option<Duration> {
        let pid = self.daemon.as_ref()?.id();
        Some(Duration::from_millis(cpu_ticks(pid)? * 10))
    }

    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(30);
        lines[from..].join("\n")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let pid = child.id();
            if let Err(e) = terminate(&mut child, DAEMON_STOP) {
                eprintln!("bench: cleanup: daemon pid {pid}: {e:#}");
            }
        }
        // The daemon unmounts its pin dir and removes its cgroups on a clean
        // exit; after a crash or SIGKILL do it here.
        if is_mount_point(&self.pin_dir) {
            let ok = Command::new("umount")
                .arg(&self.pin_dir)
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!(
                    "bench: cleanup: could not unmount {}",
                    self.pin_dir.display()
                );
            }
        }
        if self.cgroup_root.exists()
            && let Err(e) = remove_cgroup_tree(&self.cgroup_root)
        {
            eprintln!(
                "bench: cleanup: could not remove cgroup {}: {e}",
                self.cgroup_root.display()
            );
        }
        if is_mount_point(&self.pin_dir) {
            eprintln!(
                "bench: cleanup: {} is still mounted; leaving {}",
                self.pin_dir.display(),
                self.dir.display()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("bench: cleanup: removing {}: {e}", self.dir.display());
        }
    }
}

/// SIGTERM to `child` by its pid, wait up to `timeout`, then SIGKILL (std
/// kills by pid too) and reap. Returns the exit status after SIGTERM, or an
/// error when SIGKILL was needed.
fn terminate(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Ok(status);
    }
    let pid = child.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if sent {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().context("waiting for the daemon")? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    if sent {
        bail!("no exit within {} s of SIGTERM; killed", timeout.as_secs())
    }
    bail!("could not send SIGTERM (`kill -TERM {pid}`); killed")
}

/// rmdir a cgroup directory and its children, deepest first (cgroupfs
/// refuses unlinking its files; rmdir removes an empty cgroup whole).
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Runs `cmd` with stdin from /dev/null and collects its output; an error
/// only when it cannot be started.
pub(crate) fn output_of(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))
}

/// An error naming `cmd`, its exit status and its stderr unless `out` (what
/// `cmd` left) is a success.
pub(crate) fn ensure_success(cmd: &Command, out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// As [`output_of`], and an error unless `cmd` exits 0.
pub(crate) fn output_ok(cmd: &mut Command) -> Result<Output> {
    let out = output_of(cmd)?;
    ensure_success(cmd, &out)?;
    Ok(out)
}

/// Runs `cmd` and returns its stdout; an error unless it exits 0.
pub(crate) fn run_output(cmd: &mut Command) -> Result<String> {
    output_ok(cmd).map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn daemon_status(bin: &Path, socket: &Path) -> Result<Value> {
    let mut cmd = Command::new(bin);
    cmd.arg("status").arg("--socket").arg(socket).arg("--json");
    let out = output_ok(&mut cmd)?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("`{}` did not print JSON", describe(&cmd)))
}

/// Lost events of every kind (`events_lost`) in a `status --json` reply.
pub(crate) fn events_lost(status: &Value) -> u64 {
    status["events_lost"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v.as_u64())
        .sum()
}

/// `a - b` as a signed count of nanoseconds (saturating).
pub(crate) fn signed_diff(a: u64, b: u64) -> i64 {
    if a >= b {
        i64::try_from(a - b).unwrap_or(i64::MAX)
    } else {
        -i64::try_from(b - a).unwrap_or(i64::MAX)
    }
}

pub(crate) fn ns_to_us(ns: i64) -> f64 {
    ns as f64 / 1000.0
}

/// The `items` that `keep` picks, each beside its outcome (`outcomes[i]`
/// belongs to `items[i]`), and the outcomes among those that were seen.
pub(crate) fn picked<'a, T, O>(
    items: &'a [T],
    outcomes: &'a [Option<O>],
    keep: impl Fn(&T) -> bool,
) -> (Vec<(&'a T, &'a Option<O>)>, Vec<&'a O>) {
    let pairs: Vec<(&T, &Option<O>)> = items
        .iter()
        .zip(outcomes)
        .filter(|(item, _)| keep(item))
        .collect();
    let seen = pairs.iter().filter_map(|(_, o)| o.as_ref()).collect();
    (pairs, seen)
}

/// The reply to the single-question DNS query `q` whose name ends before
/// `q[name_end]`: for type A one answer, 127.0.0.1 with a TTL of `ttl`
/// seconds; no answer for other types. None when `q` is cut short.
pub(crate) fn dns_reply(q: &[u8], name_end: usize, ttl: u32) -> Option<Vec<u8>> {
    let i = name_end;
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question = q.get(12..i + 4)?;
    let mut r = Vec::with_capacity(64);
    r.extend_from_slice(q.get(0..2)?);
    r.extend_from_slice(&[0x84, 0x80, 0, 1, 0, u8::from(qtype == 1), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if qtype == 1 {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&[0, 4, 127, 0, 0, 1]);
    }
    Some(r)
}

/// utime + stime of `pid` in clock ticks (USER_HZ = 100 on Linux).
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 of the whole line.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `agent-guard run --socket SOCKET --tenant TENANT --agent AGENT --
/// agent-guard-probe`: the probe tagged as that agent. The probe's own
/// arguments (and stdio) are the caller's to add.
pub(crate) fn tagged_probe(built: &Built, socket: &Path, tenant: &str, agent: &str) -> Command {
    let mut cmd = Command::new(&built.daemon);
    cmd.arg("run")
        .arg("--socket")
        .arg(socket)
        .args(["--tenant", tenant, "--agent", agent, "--"])
        .arg(&built.probe);
    cmd
}

/// One request line to the control socket; the reply's `data` when `ok`.
pub(crate) fn control_request(socket: &Path, request: &Value) -> Result<Value> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the control socket {}", socket.display()))?;
    control_request_on(stream, request)
}

/// [`control_request`] on a connection opened already (e.g. with other
/// credentials: the daemon judges the peer's credentials at connect time).
pub(crate) fn control_request_on(mut stream: UnixStream, request: &Value) -> Result<Value> {
    let mut line = serde_json::to_string(request).context("serializing a control request")?;
    line.push('\n');
    stream
        .set_read_timeout(Some(CONTROL_TIMEOUT))
        .context("setting a read timeout on the control socket")?;
    stream
        .write_all(line.as_bytes())
        .context("writing to the control socket")?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("reading the control socket's reply")?;
    let value: Value = serde_json::from_str(reply.trim())
        .with_context(|| format!("the daemon replied {:?}, not JSON", reply.trim()))?;
    if value["ok"] != Value::Bool(true) {
        bail!(
            "the daemon refused {}: {}",
            line.trim(),
            value["error"].as_str().unwrap_or("(no error text)")
        );
    }
    Ok(value["data"].clone())
}

// ---------------------------------------------------------------------------
// Watching the kernel flip a verdict
// ---------------------------------------------------------------------------

/// Current CLOCK_MONOTONIC in ns, the clock the probe stamps its lines with.
pub(crate) fn mono_ns() -> u64 {
    #[repr(C)]
    struct Timespec {
        tv_sec: std::ffi::c_long,
        tv_nsec: std::ffi::c_long,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: std::ffi::c_int, tp: *mut Timespec) -> std::ffi::c_int;
    }
    const CLOCK_MONOTONIC: std::ffi::c_int = 1;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec that we own; the struct
    // matches the C layout on 64-bit Linux (two longs).
    unsafe { clock_gettime(CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// One verdict change a `watch-connect` probe saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Change {
    /// Start of the first connect with the new verdict.
    pub(crate) at_ns: u64,
    /// Start of the connect before it (old verdict), 0 for the first.
    pub(crate) previous_ns: u64,
    pub(crate) allow: bool,
}

/// What a `watch-connect` probe printed.
#[derive(Debug, Default)]
pub(crate) struct ProbeLog {
    pub(crate) changes: Vec<Change>,
    pub(crate) attempts: u64,
    pub(crate) errors: u64,
    pub(crate) elapsed_ns: u64,
    pub(crate) max_gap_ns: u64,
    pub(crate) notes: Vec<String>,
}

/// Parses what `agent-guard-probe watch-connect` printed.
pub(crate) fn parse_probe(text: &str) -> Result<ProbeLog> {
    let mut log = ProbeLog::default();
    let mut summary = false;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["#", "started", _] => {}
            ["#", "previous_attempt_ns", p] => {
                let p: u64 = p.parse().with_context(|| format!("probe line {line:?}"))?;
                let Some(last) = log.changes.last_mut() else {
                    bail!("probe line {line:?} before any verdict line");
                };
                last.previous_ns = p;
            }
            [
                "#",
                "attempts",
                a,
                "errors",
                e,
                "elapsed_ns",
                x,
                "max_gap_ns",
                g,
            ] => {
                let num = |s: &str| -> Result<u64> {
                    s.parse().with_context(|| format!("probe line {line:?}"))
                };
                log.attempts = num(a)?;
                log.errors = num(e)?;
                log.elapsed_ns = num(x)?;
                log.max_gap_ns = num(g)?;
                summary = true;
            }
            ["#", ..] => log.notes.push(line.trim_start_matches("# ").to_owned()),
            [t, v @ ("allow" | "deny")] => log.changes.push(Change {
                at_ns: t.parse().with_context(|| format!("probe line {line:?}"))?,
                previous_ns: 0,
                allow: *v == "allow",
            }),
            _ => bail!("unexpected probe line {line:?}"),
        }
    }
    if !summary {
        bail!("the probe printed no summary line; its output:\n{text}");
    }
    Ok(log)
}

/// Kills a child (by its pid) and reaps it unless it was waited for.
pub(crate) struct ChildGuard(pub(crate) Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Host facts
// ---------------------------------------------------------------------------

/// Mount entries of /proc/self/mountinfo as (mount point, fs type).
fn mounts() -> Result<Vec<(PathBuf, String)>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let fstype = post.split(' ').next()?;
            Some((
                PathBuf::from(unescape_mount(mount_point)),
                fstype.to_owned(),
            ))
        })
        .collect())
}

/// Undo mountinfo's octal escapes (`\040` for space and so on).
fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(oct) = bytes.get(i + 1..i + 4)
            && let Ok(v) = u8::from_str_radix(&String::from_utf8_lossy(oct), 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file system type of the mount that holds the absolute path `p`.
pub(crate) fn fs_type(p: &Path) -> Option<String> {
    mounts()
        .ok()?
        .into_iter()
        .filter(|(mp, _)| p.starts_with(mp))
        .max_by_key(|(mp, _)| mp.as_os_str().len())
        .map(|(_, fstype)| fstype)
}

pub(crate) fn cgroup2_mount() -> Result<PathBuf> {
    mounts()?
        .into_iter()
        .find(|(_, fstype)| fstype == "cgroup2")
        .map(|(p, _)| p)
        .context("no cgroup2 file system in /proc/self/mountinfo")
}

fn is_mount_point(p: &Path) -> bool {
    mounts().is_ok_and(|m| m.iter().any(|(mp, _)| mp == p))
}

/// Waits (up to FOREIGN_WAIT) for other `agent-guard daemon` processes to
/// exit; returns how many are still running.
pub(crate) fn wait_for_foreign_daemons(our_socket: &Path) -> usize {
    let waited = Instant::now();
    let mut foreign_daemons = count_foreign_daemons(our_socket);
    if foreign_daemons > 0 {
        eprintln!(
            "bench:   {foreign_daemons} other agent-guard daemon(s) running; waiting up \
             to {} s for them to exit",
            FOREIGN_WAIT.as_secs()
        );
    }
    while foreign_daemons > 0 && waited.elapsed() < FOREIGN_WAIT {
        std::thread::sleep(Duration::from_secs(1));
        foreign_daemons = count_foreign_daemons(our_socket);
    }
    foreign_daemons
}

/// Other `agent-guard daemon` processes (not ours, which is the one serving
/// `our_socket`): their programs sit at the cgroup2 root too and would tax
/// every configuration.
fn count_foreign_daemons(our_socket: &Path) -> usize {
    use std::os::unix::ffi::OsStrExt as _;
    let ours = our_socket.as_os_str().as_bytes();
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = cmdline.split(|b| *b == 0);
            let argv0 = args.next().unwrap_or_default();
            argv0.ends_with(b"agent-guard")
                && args.next() == Some(b"daemon".as_slice())
                && !args.any(|a| a == ours)
        })
        .count()
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile of `values` (p in 0..=100).
pub(crate) fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// A running `watch-connect` probe (see [`start_watch_probe`]).
pub(crate) struct WatchProbe {
    /// Ended when dropped.
    pub(crate) probe: ChildGuard,
    /// Its verdict lines after `# started T`.
    pub(crate) reader: BufReader<std::process::ChildStdout>,
    /// T: CLOCK_MONOTONIC ns when it started.
    pub(crate) started: u64,
    /// Its command line, for errors.
    pub(crate) what: String,
    /// Where its stderr goes.
    pub(crate) err_path: PathBuf,
}

impl WatchProbe {
    /// Reads the probe's verdict lines to its end, waits for it and parses
    /// them; a probe that failed is an error with its output and stderr.
    pub(crate) fn finish(mut self) -> Result<ProbeLog> {
        let mut rest = String::new();
        self.reader
            .read_to_string(&mut rest)
            .context("reading the probe's output")?;
        let exit = self
            .probe
            .0
            .take()
            .map(|mut c| c.wait())
            .transpose()
            .context("waiting for the probe")?;
        if exit.is_some_and(|s| !s.success()) {
            bail!(
                "`{}` failed ({}): {}\n{}",
                self.what,
                exit.map(|s| s.to_string()).unwrap_or_default(),
                rest.trim(),
                std::fs::read_to_string(&self.err_path).unwrap_or_default()
            );
        }
        parse_probe(&rest)
    }
}

/// Starts a tagged `agent-guard-probe watch-connect` against `port` for
/// `duration_ms` and reads its `# started T` line. Its stderr goes to
/// `dir/watch-connect.stderr`.
pub(crate) fn start_watch_probe(
    built: &Built,
    socket: &Path,
    dir: &Path,
    port: u16,
    duration_ms: u64,
    spacing_ns: u64,
) -> Result<WatchProbe> {
    let err_path = dir.join("watch-connect.stderr");
    let err_file = std::fs::File::create(&err_path)
        .with_context(|| format!("creating {}", err_path.display()))?;
    let mut cmd = tagged_probe(built, socket, TENANT, AGENT);
    cmd.args(["watch-connect", "127.0.0.1"])
        .arg(port.to_string())
        .arg(duration_ms.to_string())
        .arg(spacing_ns.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err_file);
    let child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
    let mut probe = ChildGuard(Some(child));
    let stdout = probe
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .context("the probe's stdout was not captured")?;
    let mut reader = BufReader::new(stdout);
    let mut first = String::new();
    reader
        .read_line(&mut first)
        .context("reading the probe's first line")?;
    let started: u64 = first
        .trim()
        .strip_prefix("# started ")
        .and_then(|t| t.parse().ok())
        .with_context(|| {
            format!(
                "`{}` printed {:?} instead of `# started T`; stderr:\n{}",
                describe(&cmd),
                first.trim(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            )
        })?;
    Ok(WatchProbe {
        probe,
        reader,
        started,
        what: describe(&cmd),
        err_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mount(r"/a\040b"), "/a b");
        assert_eq!(unescape_mount("/sys/fs/cgroup"), "/sys/fs/cgroup");
    }

    #[test]
    fn parses_probe_output() {
        let log = parse_probe(
            "100 deny\n# previous_attempt_ns 0\n250 allow\n# previous_attempt_ns 240\n\
             # error 2 x Connection refused\n\
             # attempts 9 errors 2 elapsed_ns 1000 max_gap_ns 40\n",
        )
        .expect("parses");
        assert_eq!(
            log.changes,
            vec![
                Change {
                    at_ns: 100,
                    previous_ns: 0,
                    allow: false
                },
                Change {
                    at_ns: 250,
                    previous_ns: 240,
                    allow: true
                }
            ]
        );
        assert_eq!((log.attempts, log.errors, log.max_gap_ns), (9, 2, 40));
        assert_eq!(log.notes.len(), 1);
        assert!(parse_probe("100 deny\n").is_err());
        assert!(parse_probe("x allow\n# attempts 1 errors 0 elapsed_ns 1 max_gap_ns 0").is_err());
    }

    #[test]
    fn only_selects_parts_and_skips_still_apply() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
                .map(|c| c.bench)
        };
        let all = parse(&[]).expect("parses");
        assert!(all.runs(Part::Connect) && all.runs(Part::Control));
        let some = parse(&["--only", "control,grants", "--skip-grants"]).expect("parses");
        assert!(some.runs(Part::Control));
        assert!(!some.runs(Part::Grants) && !some.runs(Part::Connect));
        assert_eq!(some.why_not(Part::Grants), "--skip-grants");
        assert_eq!(some.why_not(Part::Audit), "not in --only");
        assert!(parse(&["--only", "nonesuch"]).is_err());
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[5.0], 99.0), 5.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn clock_moves() {
        let a = mono_ns();
        let b = mono_ns();
        assert!(a > 0 && b >= a);
    }
}
