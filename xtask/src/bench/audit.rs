//! `cargo xtask bench`, parts 3 and 4 (issue 5's benchmark).
//!
//! Part 3: `audit verify` and `audit replay` speed. The hidden
//! `agent-guard audit generate` writes N realistic records (hash chain,
//! rotation, signed checkpoints) through the daemon's own writer; then
//! `audit verify`, `audit replay --tenant tenant0 --json` (to /dev/null) and
//! `audit replay --tenant tenant0 --what-if POLICY` (timeline to a file) are
//! each timed K times; the median wall time and records/s are reported.
//! Then replay in bounded memory (issue 9): a second trail of 10x the
//! records (10 M by default, 1 M with --quick) is generated the same way,
//! and `audit replay --tenant tenant0` is run once each as a timeline, with
//! a filter (`--verdict deny`), as `--tree` and with `--what-if`, output to
//! /dev/null; its wall time, records/s and peak RSS (the child's own
//! `ru_maxrss` from wait4) are reported against the 200 MiB goal.
//!
//! Part 4: the event pipeline under a deny flood from every core. A daemon
//! (default ring size) with one agent; `nproc` tagged probes each run
//! `repeat M tcp 127.0.0.1 PORT` at once, PORT a listening socket outside
//! the policy, so every attempt is refused with EPERM by our program (not
//! by a connection refusal). When the daemon has drained, attempts are
//! compared with the audited `connect` records and the counted losses
//! (`status --json` → `events_lost.connect`, and `gap` records):
//! unaccounted = attempts − audited − lost must be 0. If events were lost
//! at the default ring size, the flood is repeated with 16 and 64 MiB.

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::common::{
    BenchArgs, Guard, PROBE_EPERM, cpu_ticks, daemon_status, median, tagged_probe,
    wait_for_foreign_daemons,
};
use crate::{Built, describe};

// ---------------------------------------------------------------------------
// Part 3: verify / replay speed
// ---------------------------------------------------------------------------

/// The tenant `audit generate` writes with `--tenants 1`.
const GEN_TENANT: &str = "tenant0";

/// A directory removed (with everything in it) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn create(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        if dir.exists() {
            bail!(
                "{} exists already (left over from an earlier run?); remove it",
                dir.display()
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("bench: cleanup: removing {}: {e}", self.0.display());
        }
    }
}

/// Timings of one audit command over its runs.
struct Timed {
    what: &'static str,
    command: String,
    runs: Vec<Duration>,
}

impl Timed {
    fn secs(&self) -> Vec<f64> {
        self.runs.iter().map(Duration::as_secs_f64).collect()
    }

    fn median_s(&self) -> f64 {
        median(&self.secs())
    }

    fn json(&self, records: u64) -> Value {
        let m = self.median_s();
        json!({
            "command": self.command,
            "runs_s": self.secs(),
            "median_s": m,
            "records_per_s": records as f64 / m,
        })
    }
}

/// The result of part 3.
pub(crate) struct AuditSpeed {
    records: u64,
    files: usize,
    bytes: u64,
    generate: Duration,
    timed: Vec<Timed>,
    what_if_summary: String,
    replay_memory: ReplayMemory,
}

impl AuditSpeed {
    pub(crate) fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\naudit trail at {} records ({:.0} MB in {} file(s), one tenant), release build, \
             median of {} runs",
            self.records,
            self.bytes as f64 / 1e6,
            self.files,
            self.timed.first().map_or(0, |t| t.runs.len())
        );
        let _ = writeln!(
            s,
            "{:<44} {:>10} {:>21} {:>14}",
            "what", "median s", "min..max s", "records/s"
        );
        let gen_s = self.generate.as_secs_f64();
        let _ = writeln!(
            s,
            "{:<44} {:>10.2} {:>21} {:>14.0}",
            "generate (hash, write, rotate, checkpoints)",
            gen_s,
            "(1 run)",
            self.records as f64 / gen_s
        );
        for t in &self.timed {
            let (lo, hi) = t
                .secs()
                .iter()
                .fold((f64::INFINITY, 0.0_f64), |(lo, hi), v| {
                    (lo.min(*v), hi.max(*v))
                });
            let m = t.median_s();
            let _ = writeln!(
                s,
                "{:<44} {:>10.2} {:>21} {:>14.0}",
                t.what,
                m,
                format!("{lo:.2}..{hi:.2}"),
                self.records as f64 / m
            );
        }
        let _ = writeln!(s, "{}", self.what_if_summary);
        s.push_str(&self.replay_memory.table());
        s
    }

    pub(crate) fn json(&self) -> Value {
        let mut timed = serde_json::Map::new();
        for t in &self.timed {
            timed.insert(t.what.to_owned(), t.json(self.records));
        }
        json!({
            "records": self.records,
            "files": self.files,
            "bytes": self.bytes,
            "generate_s": self.generate.as_secs_f64(),
            "generate_records_per_s": self.records as f64 / self.generate.as_secs_f64(),
            "timed": timed,
            "what_if_summary": self.what_if_summary,
            "replay_memory": self.replay_memory.json(),
        })
    }
}

/// The what-if policy: the generated trail's agent with its `search` tool
/// (127.0.0.1:18081) plus `fetch` (127.0.0.1:18082), so the denied calls
/// (about 1 in 7 connects) would now be allowed and are listed.
fn what_if_policy() -> String {
    format!(
        "# generated by `cargo xtask bench` (part 3)\n\
         default_mode = \"enforce\"\n\n\
         [[tenant]]\nname = \"{GEN_TENANT}\"\n\n\
         [[tool]]\nname = \"search\"\n\
         endpoints = [{{ cidr = \"127.0.0.1/32\", port = 18081 }}]\n\n\
         [[tool]]\nname = \"fetch\"\n\
         endpoints = [{{ cidr = \"127.0.0.1/32\", port = 18082 }}]\n\n\
         [[agent]]\ntenant = \"{GEN_TENANT}\"\nname = \"researcher\"\n\
         tools = [\"search\", \"fetch\"]\n"
    )
}

/// Runs `cmd` to completion and checks it succeeded; returns its wall time
/// and stderr.
fn run_timed(cmd: &mut Command) -> Result<(Duration, String)> {
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    let started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            stderr.trim()
        );
    }
    Ok((took, stderr))
}

/// Audit files of one tenant directory: `audit.jsonl` and the rotated
/// `audit-NNNNNN.jsonl`, oldest first.
/// A directory that does not exist (yet) holds none.
fn audit_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other.with_context(|| format!("reading {}", dir.display()))?,
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit") && n.ends_with(".jsonl"))
        })
        .collect();
    // audit-000001.jsonl < ... < audit.jsonl ('-' sorts before '.').
    files.sort();
    Ok(files)
}

fn total_bytes(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// A trail `audit generate` wrote into a temporary directory, with the
/// what-if policy beside it.
struct Trail {
    audit_dir: PathBuf,
    /// The generated tenant's files, oldest first.
    files: Vec<PathBuf>,
    policy: PathBuf,
    /// How long `audit generate` took.
    generate: Duration,
}

/// Generates a trail of `records` records under `tmp` (audit files in
/// `audit/`, daemon state in `state/`) and writes the what-if policy; an
/// error when no audit file was written.
fn generate_trail(bin: &Path, tmp: &TempDir, records: u64) -> Result<Trail> {
    let audit_dir = tmp.0.join("audit");
    let mut cmd = Command::new(bin);
    cmd.args(["audit", "generate", "--records", &records.to_string()])
        .arg("--audit-dir")
        .arg(&audit_dir)
        .arg("--state-dir")
        .arg(tmp.0.join("state"))
        .stdout(Stdio::null());
    let (generate, _) = run_timed(&mut cmd)?;
    let files = audit_files(&audit_dir.join(GEN_TENANT))?;
    if files.is_empty() {
        bail!(
            "`{}` wrote no audit file under {}",
            describe(&cmd),
            audit_dir.join(GEN_TENANT).display()
        );
    }
    let policy = tmp.0.join("what-if.toml");
    std::fs::write(&policy, what_if_policy())
        .with_context(|| format!("writing {}", policy.display()))?;
    Ok(Trail {
        audit_dir,
        files,
        policy,
        generate,
    })
}

pub(crate) fn audit_speed(built: &Built, records: u64, runs: u32) -> Result<AuditSpeed> {
    let tmp = TempDir::create("agent-guard-bench-audit")?;
    let bin = &built.daemon;
    let Trail {
        audit_dir,
        files,
        policy,
        generate,
    } = generate_trail(bin, &tmp, records)?;
    eprintln!(
        "bench:   generated {records} records in {:.2} s",
        generate.as_secs_f64()
    );

    let mut check = Command::new(bin);
    check
        .arg("policy")
        .arg("check")
        .arg(&policy)
        .stdout(Stdio::null());
    run_timed(&mut check).context("the what-if policy does not load")?;

    let audit_dir_s = audit_dir.display().to_string();
    let what_if_out = tmp.0.join("what-if.out");
    let mut timed = vec![
        Timed {
            what: "audit verify",
            command: format!("agent-guard audit verify --audit-dir {audit_dir_s}"),
            runs: Vec::new(),
        },
        Timed {
            what: "audit replay --json (every record)",
            command: format!(
                "agent-guard audit replay --audit-dir {audit_dir_s} --tenant {GEN_TENANT} \
                 --json > /dev/null"
            ),
            runs: Vec::new(),
        },
        Timed {
            what: "audit replay --what-if (timeline of changes)",
            command: format!(
                "agent-guard audit replay --audit-dir {audit_dir_s} --tenant {GEN_TENANT} \
                 --what-if {} > FILE",
                policy.display()
            ),
            runs: Vec::new(),
        },
    ];
    let mut what_if_summary = String::new();
    // Interleave the commands so a slow spell of the machine spreads over all.
    for run in 0..runs {
        eprintln!("bench:   audit run {}/{runs}", run + 1);
        for t in &mut timed {
            let mut cmd = Command::new(bin);
            cmd.arg("audit");
            match t.what {
                "audit verify" => {
                    cmd.arg("verify")
                        .arg("--audit-dir")
                        .arg(&audit_dir)
                        .stdout(Stdio::null());
                }
                "audit replay --json (every record)" => {
                    cmd.args(["replay", "--tenant", GEN_TENANT, "--json"])
                        .arg("--audit-dir")
                        .arg(&audit_dir)
                        .stdout(Stdio::null());
                }
                _ => {
                    let out = std::fs::File::create(&what_if_out)
                        .with_context(|| format!("creating {}", what_if_out.display()))?;
                    cmd.args(["replay", "--tenant", GEN_TENANT])
                        .arg("--audit-dir")
                        .arg(&audit_dir)
                        .arg("--what-if")
                        .arg(&policy)
                        .stdout(out);
                }
            }
            let (took, _) = run_timed(&mut cmd)?;
            eprintln!("bench:     {}: {:.2} s", t.what, took.as_secs_f64());
            t.runs.push(took);
        }
        // The summary is the last line starting with "what-if".
        let text = std::fs::read_to_string(&what_if_out)
            .with_context(|| format!("reading {}", what_if_out.display()))?;
        what_if_summary = text
            .lines()
            .rev()
            .find(|l| l.starts_with("what-if"))
            .map(|l| l.replace(&policy.display().to_string(), "POLICY"))
            .context("`audit replay --what-if` printed no summary line")?;
    }
    let (files, bytes) = (files.len(), total_bytes(&files));
    // The large trail needs the disk space.
    drop(tmp);
    let replay_memory = replay_memory(built, records.saturating_mul(10))?;
    Ok(AuditSpeed {
        records,
        files,
        bytes,
        generate,
        timed,
        what_if_summary,
        replay_memory,
    })
}

// ---------------------------------------------------------------------------
// Part 3, second half: replay in bounded memory
// ---------------------------------------------------------------------------

/// Issue 9's goal for `audit replay` at 10 M records.
const REPLAY_RSS_GOAL_KIB: u64 = 200 * 1024;

/// The replay forms measured, with their arguments after `--tenant tenant0`
/// (`POLICY` stands for the what-if policy's path).
const REPLAY_FORMS: [(&str, &[&str]); 4] = [
    ("timeline", &[]),
    ("filter --verdict deny", &["--verdict", "deny"]),
    ("--tree", &["--tree"]),
    ("--what-if", &["--what-if", "POLICY"]),
];

struct ReplayRun {
    what: &'static str,
    command: String,
    wall: Duration,
    peak_rss_kib: u64,
}

pub(crate) struct ReplayMemory {
    records: u64,
    files: usize,
    bytes: u64,
    generate: Duration,
    runs: Vec<ReplayRun>,
}

impl ReplayMemory {
    fn goal_met(&self) -> bool {
        !self.runs.is_empty()
            && self
                .runs
                .iter()
                .all(|r| r.peak_rss_kib < REPLAY_RSS_GOAL_KIB)
    }

    fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\naudit replay at {} records ({:.1} GB in {} file(s), one tenant; generated in \
             {:.0} s), one run each, output to /dev/null",
            self.records,
            self.bytes as f64 / 1e9,
            self.files,
            self.generate.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "{:<28} {:>10} {:>12} {:>14}",
            "replay", "wall s", "records/s", "peak RSS MiB"
        );
        for r in &self.runs {
            let _ = writeln!(
                s,
                "{:<28} {:>10.1} {:>12.0} {:>14.1}",
                r.what,
                r.wall.as_secs_f64(),
                self.records as f64 / r.wall.as_secs_f64(),
                r.peak_rss_kib as f64 / 1024.0
            );
        }
        let _ = writeln!(
            s,
            "goal (every form under {} MiB peak RSS): {}",
            REPLAY_RSS_GOAL_KIB / 1024,
            if self.goal_met() { "MET" } else { "MISSED" }
        );
        s
    }

    fn json(&self) -> Value {
        json!({
            "records": self.records,
            "files": self.files,
            "bytes": self.bytes,
            "generate_s": self.generate.as_secs_f64(),
            "runs": self.runs.iter().map(|r| json!({
                "what": r.what,
                "command": r.command,
                "wall_s": r.wall.as_secs_f64(),
                "records_per_s": self.records as f64 / r.wall.as_secs_f64(),
                "peak_rss_kib": r.peak_rss_kib,
            })).collect::<Vec<_>>(),
            "goal": format!("peak RSS under {} MiB", REPLAY_RSS_GOAL_KIB / 1024),
            "goal_met": self.goal_met(),
        })
    }
}

/// Runs `cmd` to completion; its wall time and peak RSS (KiB), from the
/// rusage wait4 reports for this child alone.
#[allow(clippy::zombie_processes, reason = "reaped by wait4, for its rusage")]
fn run_measured(cmd: &mut Command, stderr_to: &Path) -> Result<(Duration, u64)> {
    let err = std::fs::File::create(stderr_to)
        .with_context(|| format!("creating {}", stderr_to.display()))?;
    cmd.stdin(Stdio::null()).stderr(err);
    let started = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    let pid = libc::pid_t::try_from(child.id()).context("child pid out of range")?;
    let mut status = 0;
    // SAFETY: a plain syscall on our own child; both out-pointers are ours.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let got = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = started.elapsed();
    if got != pid {
        bail!(
            "waiting for `{}`: {}",
            describe(cmd),
            std::io::Error::last_os_error()
        );
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let text = std::fs::read_to_string(stderr_to).unwrap_or_default();
        bail!(
            "`{}` failed (wait status {status}): {}",
            describe(cmd),
            text.trim()
        );
    }
    Ok((wall, u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}

fn replay_memory(built: &Built, records: u64) -> Result<ReplayMemory> {
    let tmp = TempDir::create("agent-guard-bench-replay")?;
    let bin = &built.daemon;
    eprintln!("bench: part 3: replay memory at {records} records: generating the trail");
    let Trail {
        audit_dir,
        files,
        policy,
        generate,
    } = generate_trail(bin, &tmp, records)?;
    let stderr_file = tmp.0.join("replay.stderr");
    let mut runs = Vec::new();
    for (what, extra) in REPLAY_FORMS {
        let mut cmd = Command::new(bin);
        cmd.args(["audit", "replay", "--tenant", GEN_TENANT, "--quiet"])
            .arg("--audit-dir")
            .arg(&audit_dir)
            .stdout(Stdio::null());
        for a in extra {
            if *a == "POLICY" {
                cmd.arg(&policy);
            } else {
                cmd.arg(a);
            }
        }
        let command = format!(
            "agent-guard audit replay --tenant {GEN_TENANT} --audit-dir DIR {} > /dev/null",
            extra.join(" ")
        );
        let (wall, peak_rss_kib) = run_measured(&mut cmd, &stderr_file)?;
        eprintln!(
            "bench:     replay {what}: {:.1} s, peak RSS {:.1} MiB",
            wall.as_secs_f64(),
            peak_rss_kib as f64 / 1024.0
        );
        runs.push(ReplayRun {
            what,
            command,
            wall,
            peak_rss_kib,
        });
    }
    Ok(ReplayMemory {
        records,
        files: files.len(),
        bytes: total_bytes(&files),
        generate,
        runs,
    })
}

// ---------------------------------------------------------------------------
// Part 4: deny flood
// ---------------------------------------------------------------------------

const FLOOD_TENANT: &str = "flood";
const FLOOD_AGENT: &str = "a";
/// Ring sizes tried after the default when events were lost.
const BIGGER_RINGS: [u32; 2] = [16 << 20, 64 << 20];
/// Attempts of the calibration probe (alone, before the flood).
const CALIBRATION_ATTEMPTS: u32 = 20_000;
/// The daemon has drained when its tenant log has not grown for this long
/// (it flushes every 20 ms and writes gap records every ~1 s).
const DRAIN_QUIET: Duration = Duration::from_millis(2500);
/// Give up waiting for the drain after this long.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Counts taken from a tenant's audit files.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
struct LogCounts {
    connect: u64,
    /// Sum of `lost.connect` over `gap` records (the kernel's ring was full).
    gap_connect: u64,
    /// Sum of `lost.audit` over `gap` records (the writer's bounded buffer
    /// was full and it dropped records).
    gap_audit: u64,
    gap_records: u64,
}

/// Counts `kind=connect` records and `gap` records' lost connects. The
/// daemon writes compact JSON, so a connect record contains
/// `"kind":"connect"`; gap lines are parsed.
fn count_log(tenant_dir: &Path) -> Result<LogCounts> {
    let mut c = LogCounts::default();
    for f in audit_files(tenant_dir)? {
        let file = std::fs::File::open(&f).with_context(|| format!("opening {}", f.display()))?;
        let reader = BufReader::with_capacity(1 << 20, file);
        for line in reader.split(b'\n') {
            let line = line.with_context(|| format!("reading {}", f.display()))?;
            if contains(&line, b"\"kind\":\"connect\"") {
                c.connect += 1;
            } else if contains(&line, b"\"kind\":\"gap\"") {
                c.gap_records += 1;
                // A torn line would not parse; it would be no gap record.
                if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                    c.gap_connect += v["lost"]["connect"].as_u64().unwrap_or(0);
                    c.gap_audit += v["lost"]["audit"].as_u64().unwrap_or(0);
                }
            }
        }
    }
    Ok(c)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// What `status --json` says about connect events.
#[derive(Default, Clone, Copy, Debug)]
struct StatusCounts {
    lost_connect: u64,
    deny: u64,
}

fn status_counts(built: &Built, guard: &Guard) -> Result<StatusCounts> {
    let s = daemon_status(&built.daemon, &guard.socket)?;
    Ok(StatusCounts {
        lost_connect: s["events_lost"]["connect"].as_u64().unwrap_or(0),
        deny: s["decisions"]["deny"]
            .as_u64()
            .context("`status --json` has no decisions.deny")?,
    })
}

/// One flood at one ring size.
struct FloodRun {
    /// None: the daemon's default.
    ring_bytes_arg: Option<u32>,
    ring_bytes: u64,
    probes: usize,
    per_probe: u32,
    attempts: u64,
    /// Kernel deny decisions during the flood (status decisions.deny).
    kernel_denies: u64,
    audited: u64,
    lost_status: u64,
    lost_gap: u64,
    /// Records the daemon's audit writer dropped (gap records' lost.audit).
    lost_writer: u64,
    gap_records: u64,
    flood: Duration,
    drain: Duration,
    daemon_cpu_s: Option<f64>,
    probe_failures: Vec<String>,
}

impl FloodRun {
    /// Every loss counted: the kernel's (ring full) and the writer's.
    fn lost(&self) -> u64 {
        self.lost_status + self.lost_writer
    }

    fn unaccounted(&self) -> i128 {
        i128::from(self.attempts) - i128::from(self.audited) - i128::from(self.lost())
    }

    fn records_per_s(&self) -> f64 {
        self.audited as f64 / self.flood.as_secs_f64()
    }

    fn json(&self) -> Value {
        json!({
            "ring_bytes_arg": self.ring_bytes_arg,
            "ring_bytes": self.ring_bytes,
            "probes": self.probes,
            "attempts_per_probe": self.per_probe,
            "attempts": self.attempts,
            "kernel_deny_decisions": self.kernel_denies,
            "audited_connect_records": self.audited,
            "lost_status_events_lost_connect": self.lost_status,
            "lost_in_gap_records": self.lost_gap,
            "lost_by_audit_writer_gap_lost_audit": self.lost_writer,
            "lost_total": self.lost(),
            "gap_records": self.gap_records,
            "unaccounted": self.unaccounted().to_string(),
            "unaccounted_is_zero": self.unaccounted() == 0,
            "flood_s": self.flood.as_secs_f64(),
            "attempts_per_s": self.attempts as f64 / self.flood.as_secs_f64(),
            "records_per_s_written": self.records_per_s(),
            "records_per_s_until_drained":
                self.audited as f64 / (self.flood + self.drain).as_secs_f64(),
            "drain_after_flood_s": self.drain.as_secs_f64(),
            "daemon_cpu_s": self.daemon_cpu_s,
            "probe_failures": self.probe_failures,
        })
    }
}

/// The result of part 4.
pub(crate) struct Flood {
    calibration_per_s: f64,
    runs: Vec<FloodRun>,
}

impl Flood {
    fn default_run(&self) -> Option<&FloodRun> {
        self.runs.iter().find(|r| r.ring_bytes_arg.is_none())
    }

    /// Goal (issue 5): 0 unaccounted and 0 lost at the default ring size.
    fn goal_met(&self) -> bool {
        self.default_run()
            .is_some_and(|r| r.unaccounted() == 0 && r.lost() == 0)
    }

    /// The smallest ring tried that lost nothing, if any was needed.
    fn ring_needed(&self) -> Option<u64> {
        self.runs
            .iter()
            .find(|r| r.lost() == 0 && r.unaccounted() == 0)
            .map(|r| r.ring_bytes)
    }

    fn any_unaccounted(&self) -> bool {
        self.runs.iter().any(|r| r.unaccounted() != 0)
    }

    pub(crate) fn table(&self) -> String {
        let mut s = String::new();
        let (probes, m) = self
            .runs
            .first()
            .map_or((0, 0), |r| (r.probes, r.per_probe));
        let _ = writeln!(
            s,
            "\ndeny flood: {probes} tagged probes (one per CPU) x {m} refused connects, all at \
             once (one probe alone: {:.0} attempts/s)",
            self.calibration_per_s
        );
        let _ = writeln!(
            s,
            "{:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>12} {:>8} {:>11} {:>8} {:>9}",
            "ring",
            "attempts",
            "audited",
            "lost ring",
            "gap sum",
            "lost wrtr",
            "unaccounted",
            "flood s",
            "records/s",
            "drain s",
            "daemon s"
        );
        for r in &self.runs {
            let _ = writeln!(
                s,
                "{:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>12} {:>8.2} {:>11.0} {:>8.2} {:>9}",
                format!(
                    "{} MiB{}",
                    r.ring_bytes >> 20,
                    if r.ring_bytes_arg.is_none() { "*" } else { "" }
                ),
                r.attempts,
                r.audited,
                r.lost_status,
                r.lost_gap,
                r.lost_writer,
                r.unaccounted(),
                r.flood.as_secs_f64(),
                r.records_per_s(),
                r.drain.as_secs_f64(),
                r.daemon_cpu_s.map_or("-".to_owned(), |c| format!("{c:.2}"))
            );
        }
        let _ = writeln!(
            s,
            "(* default ring size; lost ring = status events_lost.connect (kernel ring full); \
             gap sum = lost.connect over gap records (should equal it); lost wrtr = lost.audit \
             over gap records (the daemon's audit writer dropped records past its buffer); \
             unaccounted = attempts - audited - lost ring - lost wrtr; records/s = audited / \
             flood wall time; daemon s = its CPU time from flood start to drained)"
        );
        for r in &self.runs {
            if r.kernel_denies != r.attempts {
                let _ = writeln!(
                    s,
                    "WARNING: the kernel counted {} deny decisions for {} attempts ({} MiB ring)",
                    r.kernel_denies,
                    r.attempts,
                    r.ring_bytes >> 20
                );
            }
            if r.lost_gap != r.lost_status {
                let _ = writeln!(
                    s,
                    "WARNING: gap records account for {} lost connects, status for {} ({} MiB \
                     ring)",
                    r.lost_gap,
                    r.lost_status,
                    r.ring_bytes >> 20
                );
            }
            for f in &r.probe_failures {
                let _ = writeln!(s, "WARNING: {f}");
            }
        }
        if self.any_unaccounted() {
            let _ = writeln!(
                s,
                "!!! BUG: UNACCOUNTED EVENTS: attempts != audited + lost in at least one run \
                 above. Events vanished without being counted as lost. !!!"
            );
        }
        let goal = if self.goal_met() {
            "MET".to_owned()
        } else {
            match (self.default_run(), self.ring_needed()) {
                (None, _) => "not measured".to_owned(),
                (Some(_), Some(b)) => format!(
                    "MISSED at the default ring size; lost = 0 with --ring-bytes {} ({} MiB)",
                    b,
                    b >> 20
                ),
                (Some(_), None) => "MISSED; events were lost at every ring size tried".to_owned(),
            }
        };
        let _ = writeln!(
            s,
            "goal (0 unaccounted, 0 lost at the default ring size): {goal}"
        );
        s
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "calibration_attempts_per_s_one_probe": self.calibration_per_s,
            "runs": self.runs.iter().map(FloodRun::json).collect::<Vec<_>>(),
            "goal": "0 unaccounted and 0 lost at the default ring size",
            "goal_met": self.goal_met(),
            "any_unaccounted": self.any_unaccounted(),
            "ring_bytes_with_no_loss": self.ring_needed(),
        })
    }
}

/// Kills and reaps still-running children (by their pids) on drop.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn flood_policy() -> String {
    format!(
        "# generated by `cargo xtask bench` (part 4)\n\
         default_mode = \"enforce\"\n\n\
         [[tenant]]\nname = \"{FLOOD_TENANT}\"\n\n\
         [[tool]]\nname = \"api\"\n\
         endpoints = [{{ cidr = \"10.99.0.1/32\", port = 443 }}]\n\n\
         [[agent]]\ntenant = \"{FLOOD_TENANT}\"\nname = \"{FLOOD_AGENT}\"\ntools = [\"api\"]\n"
    )
}

fn probe_cmd(built: &Built, guard: &Guard, port: u16, attempts: u32) -> Command {
    let mut cmd = tagged_probe(built, &guard.socket, FLOOD_TENANT, FLOOD_AGENT);
    cmd.args(["repeat", &attempts.to_string(), "tcp", "127.0.0.1"])
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Waits until the tenant log has stopped growing for DRAIN_QUIET and the
/// gap records account for every loss `status` reports (or the timeout).
fn wait_drained(built: &Built, guard: &Guard, tenant_dir: &Path) -> Result<()> {
    let started = Instant::now();
    let mut last = (u64::MAX, u64::MAX);
    let mut quiet_since = Instant::now();
    loop {
        let size = total_bytes(&audit_files(tenant_dir)?);
        let lost = status_counts(built, guard)?.lost_connect;
        if (size, lost) != last {
            last = (size, lost);
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= DRAIN_QUIET {
            return Ok(());
        }
        if started.elapsed() > DRAIN_TIMEOUT {
            eprintln!(
                "bench: warning: the daemon's audit log still grew after {} s; counting anyway",
                DRAIN_TIMEOUT.as_secs()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs `probes` tagged probes of `attempts` each, all at once; returns
/// the wall time and failure notes.
fn run_probes(
    built: &Built,
    guard: &Guard,
    port: u16,
    probes: usize,
    attempts: u32,
) -> Result<(Duration, Vec<String>)> {
    let mut children = Children(Vec::with_capacity(probes));
    let started = Instant::now();
    for _ in 0..probes {
        let mut cmd = probe_cmd(built, guard, port, attempts);
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
        children.0.push(child);
    }
    let mut failures = Vec::new();
    for child in std::mem::take(&mut children.0) {
        let out = child
            .wait_with_output()
            .context("waiting for a flood probe")?;
        if out.status.code() != Some(PROBE_EPERM) {
            failures.push(format!(
                "a flood probe exited with {} (expected {PROBE_EPERM}, EPERM): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok((started.elapsed(), failures))
}

/// One daemon, one calibration (if `per_probe` is None) and one flood.
fn flood_once(
    built: &Built,
    cgroup2: &Path,
    ring: Option<u32>,
    per_probe: Option<u32>,
    seconds: u64,
    probes: usize,
) -> Result<(FloodRun, Option<f64>)> {
    let tag = format!("-flood-{}", ring.map_or(0, |r| r >> 20));
    let mut guard = Guard::create(cgroup2, &tag)?;
    std::fs::write(&guard.policy, flood_policy())
        .with_context(|| format!("writing {}", guard.policy.display()))?;
    guard.extra_args.push("--state-dir".into());
    guard.extra_args.push(guard.dir.join("state").into());
    if let Some(r) = ring {
        guard.extra_args.push("--ring-bytes".into());
        guard.extra_args.push(r.to_string().into());
    }
    // A port that is listening, so a connect that got through would
    // succeed: EPERM can only come from us.
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a listener on 127.0.0.1")?;
    let port = listener.local_addr().context("listener address")?.port();

    let foreign = wait_for_foreign_daemons(&guard.socket);
    if foreign > 0 {
        eprintln!("bench: warning: {foreign} other agent-guard daemon(s) running during the flood");
    }
    guard.start_daemon(&built.daemon)?;
    let pid = guard
        .daemon_pid()
        .context("internal error: no daemon pid")?;
    let status = daemon_status(&built.daemon, &guard.socket)?;
    let ring_bytes = status["daemon"]["ring_bytes"]
        .as_u64()
        .context("`status --json` has no daemon.ring_bytes")?;
    let tenant_dir = guard.audit_dir.join(FLOOD_TENANT);

    // Sanity: one tagged attempt is refused with EPERM.
    let (_, failures) = run_probes(built, &guard, port, 1, 1)?;
    if let Some(f) = failures.first() {
        bail!("sanity check failed: a tagged connect to 127.0.0.1:{port} was not refused: {f}");
    }

    let mut calibration = None;
    let per_probe = match per_probe {
        Some(m) => m,
        None => {
            let (took, failures) = run_probes(built, &guard, port, 1, CALIBRATION_ATTEMPTS)?;
            if let Some(f) = failures.first() {
                bail!("the calibration probe failed: {f}");
            }
            let rate = f64::from(CALIBRATION_ATTEMPTS) / took.as_secs_f64();
            calibration = Some(rate);
            // Each probe alone would take `seconds`; sharing the CPUs with
            // each other and the daemon, the flood lasts longer.
            let m = (rate * seconds as f64) as u64;
            u32::try_from(m.clamp(1000, 50_000_000)).unwrap_or(50_000_000)
        }
    };

    wait_drained(built, &guard, &tenant_dir)?;
    let before_log = count_log(&tenant_dir)?;
    let before = status_counts(built, &guard)?;
    let cpu_before = cpu_ticks(pid);

    eprintln!(
        "bench:   flood: {probes} probes x {per_probe} attempts, ring {} MiB",
        ring_bytes >> 20
    );
    let (flood, probe_failures) = run_probes(built, &guard, port, probes, per_probe)?;
    let flood_end = Instant::now();
    wait_drained(built, &guard, &tenant_dir)?;
    let drain = flood_end.elapsed().saturating_sub(DRAIN_QUIET);
    let cpu_after = cpu_ticks(pid);
    let after = status_counts(built, &guard)?;
    let after_log = count_log(&tenant_dir)?;
    guard.stop_daemon()?;
    drop(listener);

    let attempts = u64::from(per_probe) * probes as u64;
    let run = FloodRun {
        ring_bytes_arg: ring,
        ring_bytes,
        probes,
        per_probe,
        attempts,
        kernel_denies: after.deny.saturating_sub(before.deny),
        audited: after_log.connect.saturating_sub(before_log.connect),
        lost_status: after.lost_connect.saturating_sub(before.lost_connect),
        lost_gap: after_log.gap_connect.saturating_sub(before_log.gap_connect),
        lost_writer: after_log.gap_audit.saturating_sub(before_log.gap_audit),
        gap_records: after_log.gap_records.saturating_sub(before_log.gap_records),
        flood,
        drain,
        daemon_cpu_s: cpu_before
            .zip(cpu_after)
            .map(|(b, a)| a.saturating_sub(b) as f64 / 100.0),
        probe_failures,
    };
    eprintln!(
        "bench:   attempts {} audited {} lost {} (ring {}, writer {}) unaccounted {} in {:.2} s",
        run.attempts,
        run.audited,
        run.lost(),
        run.lost_status,
        run.lost_writer,
        run.unaccounted(),
        run.flood.as_secs_f64()
    );
    Ok((run, calibration))
}

pub(crate) fn flood(built: &Built, cgroup2: &Path, args: &BenchArgs) -> Result<Flood> {
    let probes = std::thread::available_parallelism().map_or(1, |n| n.get());
    let seconds = args.flood_seconds.unwrap_or(if args.quick { 1 } else { 3 });
    eprintln!(
        "bench: part 4: deny flood from {probes} tagged probes, {seconds} s of attempts per probe \
         (calibrated alone), default ring size"
    );
    let (first, calibration) =
        flood_once(built, cgroup2, None, args.flood_attempts, seconds, probes)?;
    let per_probe = first.per_probe;
    let lost = first.lost() > 0 || first.unaccounted() != 0;
    let mut runs = vec![first];
    if lost && !args.flood_default_ring_only {
        for ring in BIGGER_RINGS {
            eprintln!(
                "bench: part 4: events lost; the same flood with --ring-bytes {ring} ({} MiB)",
                ring >> 20
            );
            let (run, _) =
                flood_once(built, cgroup2, Some(ring), Some(per_probe), seconds, probes)?;
            let clean = run.lost() == 0 && run.unaccounted() == 0;
            runs.push(run);
            if clean {
                break;
            }
        }
    }
    Ok(Flood {
        calibration_per_s: calibration.unwrap_or(f64::NAN),
        runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_connect_and_gap_lines() {
        let dir = std::env::temp_dir().join(format!("ag-xtask-count-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let text = concat!(
            "{\"seq\":0,\"kind\":\"exec\"}\n",
            "{\"seq\":1,\"kind\":\"connect\",\"verdict\":\"deny\"}\n",
            "{\"seq\":2,\"kind\":\"gap\",\"lost\":{\"connect\":5,\"exec\":1}}\n",
            "{\"seq\":3,\"kind\":\"gap\",\"lost\":{\"audit\":7}}\n",
        );
        std::fs::write(dir.join("audit-000001.jsonl"), text).expect("write");
        std::fs::write(
            dir.join("audit.jsonl"),
            "{\"seq\":3,\"kind\":\"connect\"}\n",
        )
        .expect("write");
        std::fs::write(dir.join("checkpoints.jsonl"), "{\"kind\":\"connect\"}\n").expect("write");
        let c = count_log(&dir).expect("count");
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(
            c,
            LogCounts {
                connect: 2,
                gap_connect: 5,
                gap_audit: 7,
                gap_records: 2
            }
        );
    }

    #[test]
    fn policies_name_their_agent() {
        assert!(what_if_policy().contains("tools = [\"search\", \"fetch\"]"));
        assert!(flood_policy().contains("name = \"a\""));
    }
}
