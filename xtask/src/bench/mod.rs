//! `cargo xtask bench`: what agent-guard adds to a loopback TCP `connect()`.
//!
//! Four configurations, each sample one `agent-guard-probe bench-connect`
//! run of N connects to a listener owned by this process:
//! - `a`: no agent-guard daemon (nothing of ours attached);
//! - `b`: daemon running, probe untagged;
//! - `c`: daemon running, probe tagged (`agent-guard run`), its agent
//!   holding ~10,000 endpoint entries; every connect is allowed, so it takes
//!   the full decision path and emits one audit event.
//! - `d`: daemon running, probe tagged as agent `d`, which has no tools of
//!   its own but ~10,000 `GRANTS` entries from 101 just-in-time grants; the
//!   listener is reached through a grant of a tool with a rate limit (one
//!   that never limits), so every connect takes the grant path (`CAPS`
//!   miss, `GRANTS` hit, `GRANT_STATE`) plus the rate-limit window update.
//!
//! Each round runs `a, [start daemon, grants] b, c, d, d, c, b, [stop
//! daemon] a`, so a linear drift within a round cancels out of the per-round
//! paired ratios (mean of the round's two b, c or d samples over the mean of
//! its two a samples). The daemon is started afresh in every round, so `a`
//! always runs with nothing of ours attached.
//!
//! Before the rounds, part 1 (`grants`) measures how soon after a
//! `grant` / `revoke` returns the kernel enforces it. After them come part
//! 3 and 4 (`audit`), part 5 (`local`) and part 6 (`control`: token
//! launches, whois, two-person approval). `--only PART,...` runs a subset.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

mod audit;
pub(crate) mod common;
mod control;
mod cost;
mod grants;
mod local;

use self::common::{
    AGENT, Guard, PAY_TOOL, PROBE_EPERM, Part, TENANT, cgroup2_mount, control_request,
    daemon_status, events_lost, median, output_of, tagged_probe, wait_for_foreign_daemons,
};
use self::grants::GrantLatency;
use crate::{Built, Workspace, describe};

pub use self::common::BenchArgs;

/// Target: daemon running, untagged process (median paired ratio b/a).
const TARGET_B: f64 = 1.005;
/// Target: tagged process, 10,000 endpoints (median paired ratio c/a).
const TARGET_C: f64 = 1.02;
/// Target: tagged process, 10,000 grant entries and a rate limit (median
/// paired ratio d/a).
const TARGET_D: f64 = 1.02;
/// The agent of `d`: no tools of its own, everything through grants.
const AGENT_D: &str = "d";
/// The rate-limited tool covering the listener, granted to agent `d`.
const RL_TOOL: &str = "listener_rl";
/// Its rate limit: high enough never to refuse a call, so the window update
/// runs on every connect without ever changing the verdict.
const RL_CALLS: u32 = 1_000_000_000;
/// Tools granted to agent `d` besides RL_TOOL, and endpoints in each: every
/// grant installs one `GRANTS` key per endpoint of its tool.
const GRANT_TOOLS: u32 = 100;
const GRANT_TOOL_ENDPOINTS: u32 = 100;
/// TTL of `d`'s grants: far longer than a round.
const GRANT_TTL_MS: u64 = 3_600_000;
/// Endpoints per `[[tool]]` in the generated policy.
const ENDPOINTS_PER_TOOL: u32 = 1000;
/// A sample whose listener dropped a connection is run again, at most this often.
const MAX_ATTEMPTS: u32 = 3;
/// Threads accepting (and at once dropping) connections; a second one keeps
/// the queue drained while one is preempted.
const ACCEPT_THREADS: usize = 2;
/// Accept queue length (the kernel caps it at net.core.somaxconn). std
/// listens with 128, which a busy daemon on 2 CPUs can starve the accept
/// threads past: the SYN is dropped and the connect stalls for a 1 s
/// retransmit.
const LISTEN_BACKLOG: i32 = 4096;
/// Connects per sample above which port search dominates (see --connects).
const PORT_PRESSURE: u32 = 10_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    A,
    B,
    C,
    D,
}

impl Config {
    const ALL: [Config; 4] = [Config::A, Config::B, Config::C, Config::D];

    fn key(self) -> &'static str {
        match self {
            Config::A => "a",
            Config::B => "b",
            Config::C => "c",
            Config::D => "d",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Config::A => "no agent-guard programs",
            Config::B => "daemon running, untagged",
            Config::C => "tagged, allowed, 10k endpoints",
            Config::D => "tagged, via grant, 10k grants+rl",
        }
    }
}

/// One probe run.
struct Sample {
    config: Config,
    round: u32,
    ns_per_connect: f64,
    /// The probe's own CPU time (user + sys) per connect.
    cpu_ns_per_connect: f64,
    /// Probe runs needed (more than 1 when the listener dropped a connection).
    attempts: u32,
    /// Listen queue overflows during the kept run (0 unless every attempt
    /// overflowed).
    listen_overflows: u64,
    /// Sockets in TIME_WAIT before the run.
    time_wait_before: u64,
    /// Other `agent-guard daemon` processes seen on the host before the run.
    foreign_daemons: usize,
}

/// What one round's daemon reported just before it was stopped.
struct RoundStatus {
    allow: u64,
    /// CPU time the daemon used from start to stop (user + system).
    daemon_cpu: Option<Duration>,
    events_lost: u64,
    startup: Duration,
    /// `GRANTS` entries after agent `d`'s grants were made.
    grant_entries: u64,
    /// How long making those grants took.
    grant_setup: Duration,
}

pub fn bench(ws: &Workspace, built: &Built, args: &BenchArgs) -> Result<()> {
    let rounds = args.rounds.unwrap_or(if args.quick { 2 } else { 7 });
    let n = args
        .connects
        .unwrap_or(if args.quick { 5000 } else { 8000 });

    if args.runs(Part::Connect) && n > PORT_PRESSURE {
        eprintln!(
            "bench: warning: {n} connects per sample exceed ~{PORT_PRESSURE}; expect samples \
             dominated by ephemeral port search (see --help)"
        );
    }
    let cgroup2 = cgroup2_mount()?;
    let pin = Pinning::choose(args.no_pin);

    let (grant_latency, connect) = if args.runs(Part::Grants) || args.runs(Part::Connect) {
        grants_and_connect(built, &cgroup2, &pin, args, rounds, n)?
    } else {
        (None, None)
    };

    let audit_speed = if args.runs(Part::Audit) {
        let records = args
            .audit_records
            .unwrap_or(if args.quick { 100_000 } else { 1_000_000 });
        eprintln!(
            "bench: part 3: audit generate / verify / replay at {records} records, {} runs each",
            args.audit_runs
        );
        let a = audit::audit_speed(built, records, args.audit_runs)?;
        print!("{}", a.table());
        Some(a)
    } else {
        None
    };
    let flood = if args.runs(Part::Flood) {
        let f = audit::flood(built, &cgroup2, args)?;
        print!("{}", f.table());
        Some(f)
    } else {
        None
    };

    let local = if args.runs(Part::Local) {
        let (unix_n, dns_n) = if args.quick {
            (2000, 500)
        } else {
            (5000, 2000)
        };
        let l = local::local_cost(built, &cgroup2, rounds, unix_n, dns_n)?;
        print!("{}", l.table());
        Some(l)
    } else {
        None
    };

    let control_plane = if args.runs(Part::Control) {
        let runs = args
            .control_runs
            .unwrap_or(if args.quick { 50 } else { 200 });
        let approve_rounds = args
            .approve_rounds
            .unwrap_or(if args.quick { 10 } else { 40 });
        let c = control::measure(
            built,
            &cgroup2,
            usize::try_from(runs).unwrap_or(usize::MAX),
            approve_rounds,
            args.watch_spacing_ns,
        )?;
        print!("{}", c.table());
        Some(c)
    } else {
        None
    };

    let cost = if args.runs(Part::Cost) {
        let c = cost::side_by_side(
            built,
            &cgroup2,
            &pin,
            args.cost_rounds.unwrap_or(if args.quick { 3 } else { 12 }),
            cost::Calls::new(args.quick),
        )?;
        print!("{}", c.table());
        Some(c)
    } else {
        None
    };

    // Everything once more at the end, where it is easy to find.
    if let Some(c) = &connect {
        print!("{}", c.table);
    }
    if let Some(g) = &grant_latency {
        print!("{}", g.table());
    }
    if let Some(a) = &audit_speed {
        print!("{}", a.table());
    }
    if let Some(f) = &flood {
        print!("{}", f.table());
    }
    if let Some(l) = &local {
        print!("{}", l.table());
    }
    if let Some(c) = &control_plane {
        print!("{}", c.table());
    }
    if let Some(c) = &cost {
        print!("{}", c.table());
    }

    let mut results = match &connect {
        Some(c) => results_json(
            ws,
            &c.wall,
            &c.cpu,
            c.judged,
            &c.samples,
            &c.statuses,
            rounds,
            n,
            args,
        ),
        None => {
            let mut r = run_json(ws);
            r["connect_cost"] = json!({ "skipped": args.why_not(Part::Connect) });
            r
        }
    };
    let skipped = |part: Part| json!({ "skipped": args.why_not(part) });
    results["pinning"] = pin.json();
    results["grant_latency"] = grant_latency
        .as_ref()
        .map_or_else(|| skipped(Part::Grants), GrantLatency::json);
    results["audit_speed"] = audit_speed
        .as_ref()
        .map_or_else(|| skipped(Part::Audit), audit::AuditSpeed::json);
    results["deny_flood"] = flood
        .as_ref()
        .map_or_else(|| skipped(Part::Flood), audit::Flood::json);
    results["local_endpoints"] = local
        .as_ref()
        .map_or_else(|| skipped(Part::Local), local::LocalCost::json);
    results["control_plane"] = control_plane
        .as_ref()
        .map_or_else(|| skipped(Part::Control), control::ControlPlane::json);
    results["cost_side_by_side"] = cost
        .as_ref()
        .map_or_else(|| skipped(Part::Cost), cost::SideBySide::json);
    let dir = ws.target.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("results.json");
    let text = serde_json::to_string_pretty(&results).context("serializing results")?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    println!("results: {}", path.display());
    Ok(())
}

/// Part 2's figures.
struct ConnectCost {
    wall: Report,
    cpu: Report,
    judged: Metric,
    samples: Vec<Sample>,
    statuses: Vec<RoundStatus>,
    table: String,
}

/// Parts 1 and 2, which share one policy, work directory and listeners;
/// each runs only if selected.
fn grants_and_connect(
    built: &Built,
    cgroup2: &Path,
    pin: &Pinning,
    args: &BenchArgs,
    rounds: u32,
    n: u32,
) -> Result<(Option<GrantLatency>, Option<ConnectCost>)> {
    let pause = Duration::from_millis(args.pause_ms);
    let listener = Listener::start(pin.listener_cpu)?;
    let port = listener.addr.port();
    // The `pay` tool's listener for part 1 (granted and revoked).
    let pay_listener = Listener::start(None)?;
    let mut guard = Guard::create(cgroup2, "")?;

    let policy = policy_toml(port, pay_listener.addr.port(), args.endpoints);
    std::fs::write(&guard.policy, &policy)
        .with_context(|| format!("writing {}", guard.policy.display()))?;
    let mut check = Command::new(&built.daemon);
    check.arg("policy").arg("check").arg(&guard.policy);
    let out = output_of(&mut check)?;
    if !out.status.success() {
        bail!(
            "the generated policy does not load: `{}` failed ({}):\n{}{}",
            describe(&check),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let grant_latency: Option<GrantLatency> = if args.runs(Part::Grants) {
        eprintln!(
            "bench: part 1: {} x (grant, {} ms, revoke, {} ms) with a tagged watch-connect probe",
            args.grant_rounds, args.grant_gap_ms, args.grant_gap_ms
        );
        let g = grants::measure(
            built,
            &mut guard,
            pay_listener.addr.port(),
            args.grant_rounds,
            args.watch_spacing_ns,
            Duration::from_millis(args.grant_gap_ms),
        )?;
        print!("{}", g.table());
        Some(g)
    } else {
        None
    };
    if !args.runs(Part::Connect) {
        return Ok((grant_latency, None));
    }

    eprintln!(
        "bench: part 2: {rounds} rounds x (a b c d d c b a), {n} connects per sample, {} \
         endpoint entries, {} grant entries, listener {}, work dir {}; {}",
        args.endpoints,
        GRANT_TOOLS * GRANT_TOOL_ENDPOINTS + 1,
        listener.addr,
        guard.dir.display(),
        pin.describe()
    );
    let runner = Runner {
        built,
        guard_socket: guard.socket.clone(),
        listener: &listener,
        n,
        pause,
        probe_cpu: pin.probe_cpu,
    };

    // Warm up caches, the probe binary and the listener; not recorded.
    runner.probe_once(Config::A, n.div_ceil(4).max(100))?;

    let mut samples: Vec<Sample> = Vec::new();
    let mut statuses: Vec<RoundStatus> = Vec::new();
    for round in 0..rounds {
        eprintln!("bench: round {}/{rounds}", round + 1);
        samples.push(runner.sample(Config::A, round)?);
        let started = Instant::now();
        guard.start_daemon(&built.daemon)?;
        let startup = started.elapsed();
        runner.check_enforcing()?;
        let started = Instant::now();
        let grant_entries = runner.make_grants()?;
        let grant_setup = started.elapsed();
        for config in [
            Config::B,
            Config::C,
            Config::D,
            Config::D,
            Config::C,
            Config::B,
        ] {
            samples.push(runner.sample(config, round)?);
        }
        let status = daemon_status(&built.daemon, &guard.socket)?;
        let daemon_cpu = guard.daemon_cpu();
        guard.stop_daemon()?;
        let allow = status["decisions"]["allow"].as_u64().unwrap_or(0);
        let events_lost = events_lost(&status);
        // The four tagged samples' connects must have been judged and
        // allowed, otherwise `c` and `d` did not measure the decision path.
        if allow < 4 * u64::from(n) {
            bail!(
                "round {}: the daemon counted {allow} allowed decisions, expected at least {} \
                 from the four tagged samples; the tagged probe was not judged",
                round + 1,
                4 * u64::from(n)
            );
        }
        statuses.push(RoundStatus {
            allow,
            daemon_cpu,
            events_lost,
            startup,
            grant_entries,
            grant_setup,
        });
        samples.push(runner.sample(Config::A, round)?);
    }
    drop(guard);

    let wall = Report::new(&samples, rounds, Metric::Wall);
    let cpu = Report::new(&samples, rounds, Metric::Cpu);
    let judged = if cpu.spread() < wall.spread() {
        Metric::Cpu
    } else {
        Metric::Wall
    };
    let mut table = wall.table(rounds, n, args.endpoints, judged);
    table += &cpu.table(rounds, n, args.endpoints, judged);
    let _ = writeln!(
        table,
        "stability: mean paired-ratio spread (max - min, over b, c, d): wall x{:.4}, probe CPU \
         x{:.4}; targets judged on {} (the more stable)",
        wall.spread(),
        cpu.spread(),
        judged.name()
    );
    print!("{table}");

    Ok((
        grant_latency,
        Some(ConnectCost {
            wall,
            cpu,
            judged,
            samples,
            statuses,
            table,
        }),
    ))
}

// ---------------------------------------------------------------------------
// Running samples
// ---------------------------------------------------------------------------

struct Runner<'a> {
    built: &'a Built,
    guard_socket: PathBuf,
    listener: &'a Listener,
    n: u32,
    pause: Duration,
    /// CPU the probe (and `agent-guard run` before it) is pinned to.
    probe_cpu: Option<usize>,
}

impl Runner<'_> {
    fn probe_command(&self, config: Config, args: &[String]) -> Command {
        let mut cmd = self.probe_command_unpinned(config, args);
        if let Some(cpu) = self.probe_cpu {
            pin_command(&mut cmd, cpu);
        }
        cmd
    }

    fn probe_command_unpinned(&self, config: Config, args: &[String]) -> Command {
        match config {
            Config::A | Config::B => {
                let mut cmd = Command::new(&self.built.probe);
                cmd.args(args);
                cmd
            }
            Config::C | Config::D => {
                let agent = if config == Config::D { AGENT_D } else { AGENT };
                let mut cmd = tagged_probe(self.built, &self.guard_socket, TENANT, agent);
                cmd.args(args);
                cmd
            }
        }
    }

    /// One probe run of `n` connects; returns wall and CPU ns per connect.
    fn probe_once(&self, config: Config, n: u32) -> Result<(f64, f64)> {
        let args = [
            "bench-connect".to_owned(),
            self.listener.addr.ip().to_string(),
            self.listener.addr.port().to_string(),
            n.to_string(),
        ];
        let mut cmd = self.probe_command(config, &args);
        let accepted_before = self.listener.accepted.load(Ordering::Relaxed);
        let out = output_of(&mut cmd)?;
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}{}",
                describe(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut words = stdout.split_whitespace().map(str::parse::<f64>);
        let (Some(Ok(ns)), Some(Ok(cpu_ns)), None) = (words.next(), words.next(), words.next())
        else {
            bail!(
                "`{}` printed {:?}, not `WALL_NS CPU_NS` per connect",
                describe(&cmd),
                stdout.trim()
            );
        };
        if !ns.is_finite() || ns <= 0.0 || !cpu_ns.is_finite() || cpu_ns < 0.0 {
            bail!(
                "`{}` reported {ns} wall ns and {cpu_ns} CPU ns per connect",
                describe(&cmd)
            );
        }
        // Let the accept threads drain the queue so the next run starts
        // with it empty.
        let want = accepted_before + u64::from(n);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.listener.accepted.load(Ordering::Relaxed) < want {
            if Instant::now() > deadline {
                eprintln!(
                    "bench: warning: the listener accepted {} of {n} connections within 10 s",
                    self.listener.accepted.load(Ordering::Relaxed) - accepted_before
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok((ns, cpu_ns))
    }

    /// One recorded sample; re-run (up to MAX_ATTEMPTS) when the listen
    /// queue overflowed, since a dropped SYN costs a 1 s retransmit.
    fn sample(&self, config: Config, round: u32) -> Result<Sample> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            std::thread::sleep(self.pause);
            let foreign_daemons = wait_for_foreign_daemons(&self.guard_socket);
            let time_wait_before = time_wait_sockets();
            let overflows_before = listen_overflows();
            let (ns, cpu_ns) = self.probe_once(config, self.n)?;
            let listen_overflows = listen_overflows().saturating_sub(overflows_before);
            if listen_overflows > 0 && attempts < MAX_ATTEMPTS {
                eprintln!(
                    "bench:   {}: listener dropped a connection {listen_overflows} times \
                     ({ns:.0} ns/connect); running the sample again",
                    config.key()
                );
                continue;
            }
            if listen_overflows > 0 {
                eprintln!(
                    "bench: warning: {}: listener dropped a connection in {attempts} runs; \
                     keeping the last one, marked in results.json",
                    config.key()
                );
            }
            if foreign_daemons > 0 {
                eprintln!(
                    "bench: warning: {foreign_daemons} other agent-guard daemon(s) running; \
                     their programs add to every configuration"
                );
            }
            eprintln!(
                "bench:   {}: {ns:.1} ns/connect, probe CPU {cpu_ns:.1} ns/connect",
                config.key()
            );
            return Ok(Sample {
                config,
                round,
                ns_per_connect: ns,
                cpu_ns_per_connect: cpu_ns,
                attempts,
                listen_overflows,
                time_wait_before,
                foreign_daemons,
            });
        }
    }

    /// A tagged connect to a port the agent holds no grant for must be
    /// refused with EPERM, or `c` would not measure enforcement.
    fn check_enforcing(&self) -> Result<()> {
        // Port 9 (discard) on loopback: EPERM when denied, ECONNREFUSED or
        // success when the fence is not in the way. Not in the policy.
        self.expect_eperm(Config::C, 9)
    }

    /// A tagged connect of `config`'s agent to 127.0.0.1:`port` must be
    /// refused with EPERM.
    fn expect_eperm(&self, config: Config, port: u16) -> Result<()> {
        let args = ["tcp".to_owned(), "127.0.0.1".to_owned(), port.to_string()];
        let mut cmd = self.probe_command(config, &args);
        let out = output_of(&mut cmd)?;
        if out.status.code() != Some(PROBE_EPERM) {
            bail!(
                "sanity check failed: `{}` should be refused with EPERM (exit {PROBE_EPERM}) \
                 but exited with {}: {}{}",
                describe(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Gives agent `d` its grants through the control socket: RL_TOOL (the
    /// listener, rate-limited) and the GRANT_TOOLS `g*` tools. Checks first
    /// that `d` cannot reach the listener without them, and afterwards that
    /// the kernel holds at least 10,000 `GRANTS` entries. Returns the count.
    fn make_grants(&self) -> Result<u64> {
        self.expect_eperm(Config::D, self.listener.addr.port())?;
        let tools = std::iter::once(RL_TOOL.to_owned()).chain(grant_tool_names());
        for tool in tools {
            control_request(
                &self.guard_socket,
                &json!({
                    "op": "grant", "tenant": TENANT, "agent": AGENT_D, "tool": tool,
                    "ttl_ms": GRANT_TTL_MS,
                }),
            )
            .with_context(|| format!("granting {tool} to {TENANT}/{AGENT_D}"))?;
        }
        let status = daemon_status(&self.built.daemon, &self.guard_socket)?;
        let entries = status["maps"]["GRANTS"].as_u64().with_context(|| {
            format!(
                "`status --json` has no maps.GRANTS count: {}",
                status["maps"]
            )
        })?;
        let want = u64::from(GRANT_TOOLS * GRANT_TOOL_ENDPOINTS);
        if entries < want {
            bail!(
                "sanity check failed: {} grants made, but the kernel holds {entries} GRANTS \
                 entries, fewer than {want}",
                GRANT_TOOLS + 1
            );
        }
        Ok(entries)
    }
}

// ---------------------------------------------------------------------------
// CPU pinning
// ---------------------------------------------------------------------------

/// Where part 2 pins the probe and the listener's accept threads.
struct Pinning {
    probe_cpu: Option<usize>,
    listener_cpu: Option<usize>,
    why_not: Option<&'static str>,
}

impl Pinning {
    /// Probe on CPU 0, listener on CPU 1, when this process may run on 2+
    /// CPUs and pinning was not turned off.
    fn choose(no_pin: bool) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let why_not = if no_pin {
            Some("--no-pin")
        } else if cpus < 2 {
            Some("fewer than 2 CPUs")
        } else {
            None
        };
        match why_not {
            Some(_) => Self {
                probe_cpu: None,
                listener_cpu: None,
                why_not,
            },
            None => Self {
                probe_cpu: Some(0),
                listener_cpu: Some(1),
                why_not,
            },
        }
    }

    fn describe(&self) -> String {
        match (self.probe_cpu, self.listener_cpu, self.why_not) {
            (Some(p), Some(l), _) => {
                format!("probe pinned to CPU {p}, listener threads to CPU {l}")
            }
            (_, _, Some(why)) => format!("no CPU pinning ({why})"),
            _ => "no CPU pinning".to_owned(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "probe_cpu": self.probe_cpu,
            "listener_cpu": self.listener_cpu,
            "not_pinned_because": self.why_not,
        })
    }
}

/// sched_setaffinity(2) for `pid` (0: the calling thread) to one CPU.
/// xtask does not depend on libc; std links it, so declare the function.
/// The mask is a 1024-bit cpu_set_t.
fn set_affinity(pid: i32, cpu: usize) -> std::io::Result<()> {
    unsafe extern "C" {
        fn sched_setaffinity(
            pid: std::ffi::c_int,
            cpusetsize: usize,
            mask: *const std::ffi::c_ulong,
        ) -> std::ffi::c_int;
    }
    const WORDS: usize = 1024 / 64;
    if cpu >= WORDS * 64 {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    let mut mask: [std::ffi::c_ulong; WORDS] = [0; WORDS];
    mask[cpu / 64] = 1 << (cpu % 64);
    // SAFETY: the mask is an owned array of exactly `cpusetsize` bytes
    // that outlives the call; the kernel only reads it.
    let rc = unsafe { sched_setaffinity(pid, std::mem::size_of_val(&mask), mask.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    set_affinity(0, cpu)
}

/// Pins the child to `cpu` between fork and exec; the affinity is inherited
/// by what it execs and spawns (`agent-guard run` and then the probe).
fn pin_command(cmd: &mut Command, cpu: usize) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure makes one async-signal-safe system call and does
    // not allocate (the mask lives on the stack).
    unsafe {
        cmd.pre_exec(move || set_affinity(0, cpu));
    }
}

// ---------------------------------------------------------------------------
// Listener
// ---------------------------------------------------------------------------

/// A loopback listener whose threads accept and at once drop connections.
/// The threads live until the process exits.
struct Listener {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
}

impl Listener {
    /// `cpu`: pin the accept threads to it.
    fn start(cpu: Option<usize>) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("binding a listener on 127.0.0.1")?;
        let addr = listener.local_addr().context("listener address")?;
        set_backlog(&listener, LISTEN_BACKLOG)?;
        let accepted = Arc::new(AtomicU64::new(0));
        for i in 0..ACCEPT_THREADS {
            let l = listener.try_clone().context("cloning the listener")?;
            let count = Arc::clone(&accepted);
            std::thread::Builder::new()
                .name(format!("bench-accept-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu
                        && let Err(e) = pin_current_thread(cpu)
                    {
                        eprintln!(
                            "bench: warning: could not pin an accept thread to CPU {cpu}: {e}"
                        );
                    }
                    accept_loop(&l, &count)
                })
                .context("starting an accept thread")?;
        }
        Ok(Self { addr, accepted })
    }
}

/// listen(2) again on a listening socket: Linux then only changes the
/// backlog. std has no API for it and xtask does not depend on libc, so
/// declare the C function (std links libc anyway).
fn set_backlog(listener: &TcpListener, backlog: i32) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    unsafe extern "C" {
        fn listen(sockfd: std::ffi::c_int, backlog: std::ffi::c_int) -> std::ffi::c_int;
    }
    // SAFETY: a plain syscall wrapper on a socket fd we own; no memory is
    // passed.
    let rc = unsafe { listen(listener.as_raw_fd(), backlog) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("listen(2) with a larger backlog");
    }
    Ok(())
}

fn accept_loop(listener: &TcpListener, count: &AtomicU64) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                drop(stream);
                count.fetch_add(1, Ordering::Relaxed);
            }
            // EMFILE and friends: back off briefly instead of spinning.
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

// ---------------------------------------------------------------------------
// Host facts
// ---------------------------------------------------------------------------

/// `TcpExt: ListenDrops` in /proc/net/netstat: SYNs or handshakes a
/// listener dropped (it includes ListenOverflows, the accept queue full).
fn listen_overflows() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/net/netstat") else {
        return 0;
    };
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let [names, values] = lines.as_slice() else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == "ListenDrops")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// TCP sockets in TIME_WAIT (`tw` in /proc/net/sockstat).
fn time_wait_sockets() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("TCP:"))?;
            let fields: Vec<&str> = line.split_whitespace().collect();
            let i = fields.iter().position(|f| *f == "tw")?;
            fields.get(i + 1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn git(ws: &Workspace, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(&ws.root)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Current UTC time as RFC 3339 (no date crate needed).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------

/// Names of the tools granted to agent `d` besides RL_TOOL.
fn grant_tool_names() -> impl Iterator<Item = String> {
    (0..GRANT_TOOLS).map(|i| format!("g{i:03}"))
}

/// The port of endpoint entry `k` (ports spread over 1..=65535).
fn entry_port(k: u32) -> u64 {
    1 + u64::from(k) * 7919 % 65_535
}

/// Appends tools `t0`, `t1`, ... holding `endpoints` distinct
/// 10.x.y.z/32 entries (ENDPOINTS_PER_TOOL each; map keys only, nothing is
/// ever sent to them); returns their names.
fn endpoint_tools(s: &mut String, endpoints: u32) -> Vec<String> {
    let mut tools = Vec::new();
    let mut k: u32 = 0;
    while k < endpoints {
        let name = format!("t{}", k / ENDPOINTS_PER_TOOL);
        let _ = writeln!(s, "[[tool]]\nname = \"{name}\"\nendpoints = [");
        let end = endpoints.min(k + ENDPOINTS_PER_TOOL);
        while k < end {
            let [_, x, y, z] = k.to_be_bytes();
            let port = entry_port(k);
            let _ = writeln!(s, "  {{ cidr = \"10.{x}.{y}.{z}/32\", port = {port} }},");
            k += 1;
        }
        let _ = writeln!(s, "]\n");
        tools.push(name);
    }
    tools
}

/// The bench policy:
/// - agent `bench/a` holds the listener's endpoint plus `endpoints` distinct
///   10.x.y.z/32 entries (map keys only; nothing is ever sent to them),
///   split into tools of ENDPOINTS_PER_TOOL;
/// - tool `pay` (the second listener) is in no agent's tools: part 1 grants
///   and revokes it for `a`;
/// - agent `bench/d` has no tools; it is granted RL_TOOL (the listener
///   again, with a rate limit that never limits) and the GRANT_TOOLS `g*`
///   tools of GRANT_TOOL_ENDPOINTS distinct 10.x.y.z/32 entries each.
fn policy_toml(listener_port: u16, pay_port: u16, endpoints: u32) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# generated by `cargo xtask bench`");
    let _ = writeln!(s, "default_mode = \"enforce\"\n");
    let _ = writeln!(s, "[[tenant]]\nname = \"{TENANT}\"\n");
    let _ = writeln!(s, "[[tool]]\nname = \"listener\"");
    let _ = writeln!(
        s,
        "endpoints = [{{ cidr = \"127.0.0.1/32\", port = {listener_port} }}]\n"
    );
    let mut tools = vec!["listener".to_owned()];
    tools.extend(endpoint_tools(&mut s, endpoints));
    let _ = writeln!(s, "[[tool]]\nname = \"{PAY_TOOL}\"");
    let _ = writeln!(
        s,
        "endpoints = [{{ cidr = \"127.0.0.1/32\", port = {pay_port} }}]\n"
    );
    let _ = writeln!(s, "[[tool]]\nname = \"{RL_TOOL}\"");
    let _ = writeln!(
        s,
        "endpoints = [{{ cidr = \"127.0.0.1/32\", port = {listener_port} }}]"
    );
    let _ = writeln!(s, "rate_limit = {{ calls = {RL_CALLS}, per = \"1s\" }}\n");
    for (i, name) in (0u32..).zip(grant_tool_names()) {
        let _ = writeln!(s, "[[tool]]\nname = \"{name}\"\nendpoints = [");
        for j in 0..GRANT_TOOL_ENDPOINTS {
            let k = i * GRANT_TOOL_ENDPOINTS + j;
            let [_, _, y, z] = k.to_be_bytes();
            // 10.200.0.0/16 and up, apart from `a`'s entries; ports spread.
            let port = 1 + (u64::from(k) * 104_729 + 17) % 65_535;
            let _ = writeln!(s, "  {{ cidr = \"10.200.{y}.{z}/32\", port = {port} }},");
        }
        let _ = writeln!(s, "]\n");
    }
    let list: Vec<String> = tools.iter().map(|t| format!("\"{t}\"")).collect();
    let _ = writeln!(
        s,
        "[[agent]]\ntenant = \"{TENANT}\"\nname = \"{AGENT}\"\ntools = [{}]\n",
        list.join(", ")
    );
    let _ = writeln!(
        s,
        "[[agent]]\ntenant = \"{TENANT}\"\nname = \"{AGENT_D}\"\ntools = []"
    );
    s
}

// ---------------------------------------------------------------------------
// Statistics and output
// ---------------------------------------------------------------------------

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

struct PerConfig {
    config: Config,
    samples: Vec<f64>,
    median: f64,
    /// median(config) / median(a).
    ratio: f64,
    /// Per round: mean(config samples) / mean(a samples) of that round.
    paired: Vec<f64>,
    paired_median: f64,
    target: Option<f64>,
}

/// Which per-connect figure a report is about.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Metric {
    /// Mean wall time per connect.
    Wall,
    /// The probe process's CPU time (user + sys, getrusage) per connect.
    Cpu,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Wall => "wall time",
            Metric::Cpu => "probe CPU time",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Metric::Wall => "wall",
            Metric::Cpu => "cpu",
        }
    }

    fn of(self, s: &Sample) -> f64 {
        match self {
            Metric::Wall => s.ns_per_connect,
            Metric::Cpu => s.cpu_ns_per_connect,
        }
    }
}

struct Report {
    metric: Metric,
    configs: Vec<PerConfig>,
}

impl Report {
    fn new(samples: &[Sample], rounds: u32, metric: Metric) -> Self {
        let of = |c: Config, round: Option<u32>| -> Vec<f64> {
            samples
                .iter()
                .filter(|s| s.config == c && round.is_none_or(|r| s.round == r))
                .map(|s| metric.of(s))
                .collect()
        };
        let median_a = median(&of(Config::A, None));
        let configs = Config::ALL
            .iter()
            .map(|&config| {
                let values = of(config, None);
                let med = median(&values);
                let paired: Vec<f64> = (0..rounds)
                    .map(|r| mean(&of(config, Some(r))) / mean(&of(Config::A, Some(r))))
                    .collect();
                PerConfig {
                    config,
                    median: med,
                    ratio: med / median_a,
                    paired_median: median(&paired),
                    paired,
                    samples: values,
                    target: match config {
                        Config::A => None,
                        Config::B => Some(TARGET_B),
                        Config::C => Some(TARGET_C),
                        Config::D => Some(TARGET_D),
                    },
                }
            })
            .collect();
        Self { metric, configs }
    }

    /// Mean over b, c, d of the paired ratios' max - min: how much the
    /// same comparison swings between rounds.
    fn spread(&self) -> f64 {
        let spreads: Vec<f64> = self
            .configs
            .iter()
            .filter(|c| c.target.is_some())
            .map(|c| {
                let (lo, hi) = min_max(&c.paired);
                hi - lo
            })
            .collect();
        mean(&spreads)
    }

    fn table(&self, rounds: u32, n: u32, endpoints: u32, judged: Metric) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nloopback TCP connect(), {}: {rounds} rounds x (a b c d d c b a), {n} connects per \
             sample, {endpoints} endpoint entries (c), {} grant entries + rate limit (d)",
            match self.metric {
                Metric::Wall => "mean wall time per connect",
                Metric::Cpu => "probe CPU time (user+sys) per connect",
            },
            GRANT_TOOLS * GRANT_TOOL_ENDPOINTS + 1
        );
        let _ = writeln!(
            s,
            "{:<3} {:<32} {:>12} {:>9} {:>13} {:>19} {:>16}",
            "",
            "configuration",
            match self.metric {
                Metric::Wall => "median ns",
                Metric::Cpu => "median CPU ns",
            },
            "vs a",
            "paired median",
            "paired min..max",
            "target"
        );
        for c in &self.configs {
            let (lo, hi) = min_max(&c.paired);
            let (paired, range, target) = match c.target {
                None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
                Some(t) => (
                    format!("x{:.4}", c.paired_median),
                    format!("x{lo:.4}..x{hi:.4}"),
                    format!(
                        "<= x{t} {}",
                        if self.metric != judged {
                            "(info)"
                        } else if c.paired_median <= t {
                            "met"
                        } else {
                            "MISSED"
                        }
                    ),
                ),
            };
            let _ = writeln!(
                s,
                "{:<3} {:<32} {:>12.1} {:>9} {:>13} {:>19} {:>16}",
                c.config.key(),
                c.config.label(),
                c.median,
                format!("x{:.4}", c.ratio),
                paired,
                range,
                target
            );
        }
        if self.metric == judged {
            let _ = writeln!(
                s,
                "(targets are judged on the median of the per-round paired ratios of {})",
                self.metric.name()
            );
        }
        s
    }
}

/// `configs`, `ratios_of_medians`, `paired_ratios` and `targets` of one
/// metric's report.
fn report_json(report: &Report, judged: Metric) -> serde_json::Map<String, Value> {
    let mut configs = serde_json::Map::new();
    let mut ratios = serde_json::Map::new();
    let mut paired = serde_json::Map::new();
    let mut targets = serde_json::Map::new();
    for c in &report.configs {
        let (lo, hi) = min_max(&c.paired);
        configs.insert(
            c.config.key().to_owned(),
            json!({
                "description": c.config.label(),
                "samples_ns": c.samples,
                "median_ns": c.median,
            }),
        );
        if let Some(t) = c.target {
            ratios.insert(format!("{}/a", c.config.key()), json!(c.ratio));
            paired.insert(
                format!("{}/a", c.config.key()),
                json!({
                    "per_round": c.paired,
                    "median": c.paired_median,
                    "min": lo,
                    "max": hi,
                }),
            );
            targets.insert(
                format!("{}/a", c.config.key()),
                json!({
                    "max": t,
                    "paired_median": c.paired_median,
                    "met": c.paired_median <= t,
                    "metric": report.metric.key(),
                    "judged": report.metric == judged,
                }),
            );
        }
    }
    let mut out = serde_json::Map::new();
    out.insert("configs".into(), Value::Object(configs));
    out.insert("ratios_of_medians".into(), Value::Object(ratios));
    out.insert("paired_ratios".into(), Value::Object(paired));
    out.insert("paired_spread_mean".into(), json!(report.spread()));
    out.insert("targets".into(), Value::Object(targets));
    out
}

#[allow(clippy::too_many_arguments)]
fn results_json(
    ws: &Workspace,
    wall: &Report,
    cpu: &Report,
    judged: Metric,
    samples: &[Sample],
    statuses: &[RoundStatus],
    rounds: u32,
    n: u32,
    args: &BenchArgs,
) -> Value {
    let wall_json = report_json(wall, judged);
    let cpu_json = report_json(cpu, judged);
    let judged_json = if judged == Metric::Cpu {
        &cpu_json
    } else {
        &wall_json
    };
    let sample_log: Vec<Value> = samples
        .iter()
        .map(|s| {
            json!({
                "round": s.round + 1,
                "config": s.config.key(),
                "ns_per_connect": s.ns_per_connect,
                "cpu_ns_per_connect": s.cpu_ns_per_connect,
                "attempts": s.attempts,
                "listen_overflows": s.listen_overflows,
                "time_wait_before": s.time_wait_before,
                "other_agent_guard_daemons": s.foreign_daemons,
            })
        })
        .collect();
    let daemon_rounds: Vec<Value> = statuses
        .iter()
        .enumerate()
        .map(|(i, r)| {
            json!({
                "round": i + 1,
                "startup_ms": r.startup.as_millis(),
                "allow_decisions": r.allow,
                "daemon_cpu_ms": r.daemon_cpu.map(|d| d.as_millis()),
                "events_lost": r.events_lost,
                "grants_map_entries": r.grant_entries,
                "grant_setup_ms": r.grant_setup.as_millis(),
            })
        })
        .collect();
    let mut r = run_json(ws);
    let more = json!({
        "rounds": rounds,
        "connects_per_sample": n,
        "endpoint_entries": args.endpoints,
        "d_grants": {
            "grants": GRANT_TOOLS + 1,
            "tools": format!("{RL_TOOL} (listener, rate_limit {RL_CALLS}/1s) + {GRANT_TOOLS} \
                tools of {GRANT_TOOL_ENDPOINTS} endpoints"),
            "ttl_ms": GRANT_TTL_MS,
        },
        "pause_ms": args.pause_ms,
        "order": "a, start daemon, grants for d, b, c, d, d, c, b, stop daemon, a (per round)",
        "configs": wall_json.get("configs").cloned().unwrap_or_default(),
        "ratios_of_medians": wall_json.get("ratios_of_medians").cloned().unwrap_or_default(),
        "paired_ratios": wall_json.get("paired_ratios").cloned().unwrap_or_default(),
        "probe_cpu": Value::Object(cpu_json.clone()),
        "stability": {
            "paired_spread_mean_wall": wall.spread(),
            "paired_spread_mean_cpu": cpu.spread(),
            "judged_on": judged.key(),
            "rule": "targets are judged on the metric whose paired ratios (b/a, c/a, d/a) \
                     have the smaller mean max-min spread in this run",
        },
        "targets": judged_json.get("targets").cloned().unwrap_or_default(),
        "samples": sample_log,
        "daemon_rounds": daemon_rounds,
    });
    if let (Some(r), Value::Object(more)) = (r.as_object_mut(), more) {
        r.extend(more);
    }
    r
}

/// What every results.json has: when, where, which commit.
fn run_json(ws: &Workspace) -> Value {
    let dirty = git(ws, &["status", "--porcelain"]).map(|s| !s.is_empty());
    json!({
        "benchmark": "loopback TCP connect() cost",
        "date": utc_now(),
        "machine": {
            "hostname": read_trimmed("/proc/sys/kernel/hostname"),
            "cpu_model": cpu_model(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
            "kernel": read_trimmed("/proc/sys/kernel/osrelease"),
            "kernel_version": read_trimmed("/proc/version"),
            "tcp_tw_reuse": read_trimmed("/proc/sys/net/ipv4/tcp_tw_reuse"),
            "ip_local_port_range": read_trimmed("/proc/sys/net/ipv4/ip_local_port_range"),
        },
        "git": { "commit": git(ws, &["rev-parse", "HEAD"]), "dirty": dirty },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_has_distinct_endpoints() {
        let p = policy_toml(4242, 4343, 2500);
        assert!(p.contains("{ cidr = \"127.0.0.1/32\", port = 4242 }"));
        assert!(p.contains("{ cidr = \"127.0.0.1/32\", port = 4343 }"));
        let cidrs: std::collections::BTreeSet<&str> = p
            .lines()
            .filter(|l| l.contains("cidr = \"10.") && !l.contains("cidr = \"10.200."))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        assert_eq!(cidrs.len(), 2500);
        let granted: std::collections::BTreeSet<&str> = p
            .lines()
            .filter(|l| l.contains("cidr = \"10.200."))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        assert_eq!(granted.len(), (GRANT_TOOLS * GRANT_TOOL_ENDPOINTS) as usize);
        assert!(p.contains("tools = []"));
        assert!(p.contains("tools = [\"listener\", \"t0\", \"t1\", \"t2\"]"));
        assert!(!p.contains("port = 0 "));
    }

    #[test]
    fn dates() {
        let d = utc_now();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20"), "{d}");
    }
}
