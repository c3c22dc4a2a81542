//! `cargo xtask soak --minutes N`: one daemon under N minutes of churn,
//! then checks that nothing was lost, leaked or left disagreeing.
//!
//! One daemon (release build, its own socket, pin dir, audit dir, state
//! dir and cgroup root; `--idle-subject-age 2s`; per-agent DNS against a
//! DNS server of this process unless `--no-dns`) and, concurrently until
//! the deadline, all traffic to 127.0.0.1 (the per-agent DNS proxy answers
//! on 127.64.0.0/10, also loopback):
//! - launcher threads: short-lived tagged probes, one after another, from a
//!   fixed rotation (plain, UDP, fork, thread, task scopes narrowed or
//!   expiring, sub-agents, a sub-agent of a task, a second tenant, DNS);
//!   each has an expected exit status (0 allowed, 10 EPERM, 12 REFUSED);
//! - a grant thread: short grants (TTL 1.5 s, some revoked, the rest left
//!   to expire), use-counted grants (`uses` 1), grant / revoke / deny
//!   checks; a second grant thread gives grants to one process (`--pid`);
//! - a reload thread: `agent-guard policy apply` alternating two policies;
//! - a flood thread: a tagged probe refused in a tight loop
//!   (`repeat N tcp 127.0.0.1 PORT`, a port no tool names, whose listener
//!   must never accept), in bursts;
//! - a sampler: daemon RSS (and the ring buffer's mapping) and map counts
//!   every 5 s.
//!
//! Then, with every agent gone: map counts back to their baseline after the
//! idle-retire interval, 0 unaccounted decisions (kernel counters = audited
//! records + counted losses), no grant disagreement, RSS not doubled since
//! warm-up, a clean daemon stop, `audit verify` passing. Prints a summary
//! and writes target/soak/results.json.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::bench::common::{
    Guard, cgroup2_mount, control_request, cpu_ticks, dns_reply, median, run_output,
};
use crate::{Built, Workspace, describe};

/// The tenants of the soak policies.
const TENANT: &str = "soak";
const TENANT2: &str = "soak2";
/// The name the DNS tool names (answered 127.0.0.1 by our DNS server).
const DNS_NAME: &str = "api.soak.agent-guard.test";
/// Probe exit statuses.
const OK: i32 = 0;
const EPERM: i32 = 10;
const REFUSED: i32 = 12;
/// A launch that has not exited by then is killed (by its pid) and counted
/// as a problem.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the sampler reads RSS and map counts.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The daemon's `--idle-subject-age`.
const IDLE_SUBJECT_AGE: &str = "2s";
/// After the load: how long the maps get to return to their baseline.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Short grants' TTL.
const SHORT_TTL_MS: u64 = 1500;
/// Live (or not yet swept) grants per payer agent at most; the daemon
/// refuses a ninth grant covering one endpoint of one subject.
const MAX_LIVE_GRANTS: usize = 6;
/// How long a grant may hold its slot after it expired or was revoked
/// (the daemon sweeps expired grants once a second).
const SLOT_GRACE: Duration = Duration::from_millis(2500);
/// A clear leak: the daemon's RSS without the ring at the end over the
/// same after warm-up.
const RSS_LEAK_FACTOR: f64 = 2.0;
/// Kept in results.json at most (the count is always complete).
const MAX_PROBLEMS: usize = 50;

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// How long the load runs, in minutes (fractions allowed).
    #[arg(long, value_name = "N", default_value_t = 10.0, value_parser = parse_minutes)]
    pub(crate) minutes: f64,
    /// Launcher threads, i.e. agents launched concurrently (besides the
    /// grant, flood and reload threads' own).
    #[arg(long, value_name = "K", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub(crate) launchers: u32,
    /// Refused connects per deny-flood burst (one tagged probe, tight loop).
    #[arg(long, value_name = "N", default_value_t = 5000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub(crate) flood_burst: u32,
    /// Pause between deny-flood bursts.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub(crate) flood_pause_ms: u64,
    /// Seconds between policy reloads.
    #[arg(long, value_name = "S", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) reload_every: u64,
    /// No DNS churn: shared DNS mode, no resolver agent.
    #[arg(long)]
    pub(crate) no_dns: bool,
    /// Soak the debug build instead of the release build.
    #[arg(long)]
    pub(crate) debug: bool,
}

fn parse_minutes(s: &str) -> Result<f64, String> {
    let m: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(0.05..=1440.0).contains(&m) {
        return Err(format!("{m} is outside 0.05..=1440 minutes"));
    }
    Ok(m)
}

// ---------------------------------------------------------------------------
// Shared state of the load threads
// ---------------------------------------------------------------------------

/// Ports of the listeners this process owns.
#[derive(Clone, Copy, Debug)]
struct Ports {
    /// Tool `search` (TCP), also what `api` resolves to.
    search: u16,
    /// Tool `udp`.
    udp: u16,
    /// Tool `pay`, reached through grants only.
    pay: u16,
    /// No tool names it: every connect must be refused.
    flood: u16,
}

/// Which of the two policies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    A,
    B,
}

struct Ctx {
    daemon: PathBuf,
    probe: PathBuf,
    socket: PathBuf,
    ports: Ports,
    dns: bool,
    started: Instant,
    deadline: Instant,
    stop: AtomicBool,
    /// Operations done, by kind.
    counts: Mutex<BTreeMap<String, u64>>,
    /// Results that contradict the policy (they fail the soak).
    problems: Mutex<Vec<String>>,
    problem_count: AtomicU64,
    /// Errors that ended a thread (they fail the soak).
    fatal: Mutex<Vec<String>>,
    /// (seconds since start, ms) of plain launches, grants and reloads.
    launch_ms: Mutex<Vec<(f64, f64)>>,
    grant_ms: Mutex<Vec<(f64, f64)>>,
    reload_ms: Mutex<Vec<(f64, f64)>>,
    samples: Mutex<Vec<Sample>>,
    disagreements_seen: Mutex<Vec<Value>>,
    /// Accepted connections on the flood port (must stay 0).
    flood_accepts: Arc<AtomicU64>,
    dns_queries: Arc<AtomicU64>,
    /// The policy in force: the reload thread's last apply.
    current: Mutex<Variant>,
    policy_files: [PathBuf; 2],
    reload_every: Duration,
}

impl Ctx {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }

    fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn bump(&self, what: &str, n: u64) {
        *lock(&self.counts).entry(what.to_owned()).or_default() += n;
    }

    fn problem(&self, msg: String) {
        let n = self.problem_count.fetch_add(1, Ordering::Relaxed);
        if n < 10 {
            eprintln!("soak: PROBLEM at {:.1} s: {msg}", self.elapsed_s());
        }
        let mut p = lock(&self.problems);
        if p.len() < MAX_PROBLEMS {
            p.push(format!("{:.1} s: {msg}", self.elapsed_s()));
        }
    }

    /// Counts `what` and checks the exit status against `want`.
    fn expect(&self, what: &str, got: (i32, String), want: i32) {
        self.bump(what, 1);
        if got.0 != want {
            self.problem(format!(
                "{what}: exit {}, expected {want} ({}); stderr: {}",
                got.0,
                status_name(want),
                got.1.trim()
            ));
        }
    }

    /// `agent-guard run --socket S --tenant T --agent A SCOPE.. --`.
    fn agent(&self, tenant: &str, agent: &str, scope: &[String]) -> Command {
        let mut cmd = Command::new(&self.daemon);
        cmd.arg("run")
            .arg("--socket")
            .arg(&self.socket)
            .args(["--tenant", tenant, "--agent", agent])
            .args(scope)
            .arg("--");
        cmd
    }

    /// The tagged probe: `agent-guard run ... -- agent-guard-probe ARGS`.
    fn probe_as(&self, tenant: &str, agent: &str, scope: &[String], args: &[String]) -> Command {
        let mut cmd = self.agent(tenant, agent, scope);
        cmd.arg(&self.probe).args(args);
        cmd
    }

    /// A sub-agent started from inside a tagged process: the outer
    /// launcher execs the inner one.
    fn sub_agent(
        &self,
        tenant: &str,
        agent: &str,
        scope: &[String],
        sub: &str,
        tools: &str,
        args: &[String],
    ) -> Command {
        let mut cmd = self.agent(tenant, agent, scope);
        cmd.arg(&self.daemon)
            .arg("run")
            .arg("--socket")
            .arg(&self.socket)
            .args(["--agent", sub, "--tools", tools, "--"])
            .arg(&self.probe)
            .args(args);
        cmd
    }

    fn tcp(&self, port: u16) -> Vec<String> {
        strings(&["tcp", "127.0.0.1", &port.to_string()])
    }

    fn fatal(&self, msg: String) {
        eprintln!("soak: FATAL: {msg}");
        lock(&self.fatal).push(msg);
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn status_name(code: i32) -> &'static str {
    match code {
        OK => "allowed",
        EPERM => "EPERM",
        REFUSED => "REFUSED",
        _ => "?",
    }
}

/// Runs `cmd` with stdin and stdout on /dev/null, keeping stderr; kills it
/// (by its pid, as std does) when it has not exited within LAUNCH_TIMEOUT.
/// Returns the exit status (-1 for a signal) and stderr.
fn run_child(cmd: &mut Command) -> Result<(i32, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    let started = Instant::now();
    let mut nap = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for a child")? {
            break status;
        }
        if started.elapsed() > LAUNCH_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Ok((
                -1,
                format!(
                    "killed after {} s: `{}`",
                    LAUNCH_TIMEOUT.as_secs(),
                    describe(cmd)
                ),
            ));
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    Ok((status.code().unwrap_or(-1), err))
}

// ---------------------------------------------------------------------------
// Policies and loopback servers
// ---------------------------------------------------------------------------

/// Policy A or B. Both have the same tenants, agents and base verdicts on
/// the soak's ports; they differ in tool `extra` (endpoints that nothing
/// connects to, so `CAPS` changes on every reload) and B's rate limit on it.
fn policy_text(ports: &Ports, variant: Variant, dns: bool) -> String {
    let extra_n = match variant {
        Variant::A => 16,
        Variant::B => 48,
    };
    let extra: Vec<String> = (0..extra_n)
        .map(|i| {
            format!(
                "{{ cidr = \"10.77.{}.{}/32\", port = 443 }}",
                i / 200,
                i % 200 + 1
            )
        })
        .collect();
    let mut t = String::new();
    let _ = writeln!(t, "# cargo xtask soak: policy {variant:?}");
    let _ = writeln!(t, "default_mode = \"enforce\"\n");
    for tenant in [TENANT, TENANT2] {
        let _ = writeln!(t, "[[tenant]]\nname = \"{tenant}\"\n");
    }
    let _ = writeln!(
        t,
        "[[tool]]\nname = \"search\"\nendpoints = [{{ cidr = \"127.0.0.1/32\", port = {} }}]\n",
        ports.search
    );
    let _ = writeln!(
        t,
        "[[tool]]\nname = \"udp\"\nendpoints = [{{ cidr = \"127.0.0.1/32\", port = {}, proto = \"udp\" }}]\n",
        ports.udp
    );
    let _ = writeln!(
        t,
        "[[tool]]\nname = \"pay\"\nendpoints = [{{ cidr = \"127.0.0.1/32\", port = {} }}]\n",
        ports.pay
    );
    let _ = writeln!(
        t,
        "[[tool]]\nname = \"extra\"\nendpoints = [\n  {}\n]",
        extra.join(",\n  ")
    );
    if variant == Variant::B {
        let _ = writeln!(t, "rate_limit = {{ calls = 1000, per = \"1s\" }}");
    }
    t.push('\n');
    if dns {
        let _ = writeln!(
            t,
            "[[tool]]\nname = \"api\"\nendpoints = [{{ host = \"{DNS_NAME}\", port = {} }}]\n",
            ports.search
        );
    }
    let mut agents: Vec<(&str, String, &str)> = vec![
        (TENANT, "worker".into(), "\"search\", \"udp\", \"extra\""),
        (TENANT, "flooder".into(), "\"search\""),
        (TENANT2, "worker".into(), "\"search\", \"udp\""),
    ];
    for payer in PAYERS_TTL
        .iter()
        .chain(&[PAYER_USES, PAYER_REVOKE, PAYER_PID])
    {
        agents.push((TENANT, (*payer).to_owned(), "\"extra\""));
    }
    if dns {
        agents.push((TENANT, "resolver".into(), "\"api\""));
    }
    for (tenant, name, tools) in agents {
        let _ = writeln!(
            t,
            "[[agent]]\ntenant = \"{tenant}\"\nname = \"{name}\"\ntools = [{tools}]\n"
        );
    }
    t
}

/// Payer agents of the short grants (round robin, to stay far below the
/// daemon's 8 live grants per endpoint and subject).
const PAYERS_TTL: [&str; 4] = ["payer-ttl-0", "payer-ttl-1", "payer-ttl-2", "payer-ttl-3"];
const PAYER_USES: &str = "payer-uses";
const PAYER_REVOKE: &str = "payer-revoke";
const PAYER_PID: &str = "payer-pid";

/// A TCP listener on 127.0.0.1 whose thread accepts and drops every
/// connection, counting them. The thread lives as long as this process.
fn tcp_server(count: Arc<AtomicU64>) -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a TCP listener")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            if conn.is_ok() {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok(port)
}

/// A UDP socket on 127.0.0.1 that drains what it is sent.
fn udp_server() -> Result<u16> {
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a UDP socket")?;
    let port = s.local_addr()?.port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while s.recv_from(&mut buf).is_ok() {}
    });
    Ok(port)
}

/// A DNS server on 127.0.0.1 answering every A query with 127.0.0.1,
/// TTL 1 s (so agents' learned answers churn).
fn dns_server(count: Arc<AtomicU64>) -> Result<SocketAddr> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the DNS server")?;
    let addr = sock.local_addr()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if let Some(r) = dns_answer(&buf[..n]) {
                count.fetch_add(1, Ordering::Relaxed);
                let _ = sock.send_to(&r, from);
            }
        }
    });
    Ok(addr)
}

/// The reply to one single-question query: A 127.0.0.1 (TTL 1 s) for
/// type A, no answer for other types.
fn dns_answer(q: &[u8]) -> Option<Vec<u8>> {
    let mut i = 12;
    loop {
        let len = *q.get(i)? as usize;
        i += 1 + len;
        if len == 0 {
            break;
        }
    }
    dns_reply(q, i, 1)
}

// ---------------------------------------------------------------------------
// The load
// ---------------------------------------------------------------------------

/// The launchers' rotation; `task-expiry` (1.5 s) runs every 25th turn.
const ROTATION: &[&str] = &[
    "plain",
    "udp",
    "fork",
    "thread",
    "fork-deny",
    "task",
    "task-narrow",
    "sub",
    "sub-narrow",
    "task-sub",
    "tenant2",
    "dns",
    "dns-refused",
    "task-dns",
];

fn launcher(ctx: &Ctx, id: u32) -> Result<()> {
    let p = ctx.ports;
    let udp = strings(&["udp-send", "127.0.0.1", &p.udp.to_string()]);
    let with = |head: &[&str], tail: &[String]| -> Vec<String> {
        let mut v = strings(head);
        v.extend_from_slice(tail);
        v
    };
    let mut turn: u64 = 0;
    while ctx.running() {
        turn += 1;
        let what = if turn % 25 == u64::from(id) % 25 {
            "task-expiry"
        } else {
            ROTATION[((turn + u64::from(id) * 5) % ROTATION.len() as u64) as usize]
        };
        let task = |tools: &str, ttl: &str| -> Vec<String> {
            strings(&[
                "--task",
                &format!("soak task {id}-{turn}"),
                "--tools",
                tools,
                "--ttl",
                ttl,
            ])
        };
        let started = Instant::now();
        match what {
            "plain" => {
                let r = run_child(&mut ctx.probe_as(TENANT, "worker", &[], &ctx.tcp(p.search)))?;
                lock(&ctx.launch_ms).push((ctx.elapsed_s(), ms(started.elapsed())));
                ctx.expect("launch plain (tcp)", r, OK);
            }
            "udp" => {
                let r = run_child(&mut ctx.probe_as(TENANT, "worker", &[], &udp))?;
                ctx.expect("launch udp", r, OK);
            }
            "fork" => {
                let args = with(&["fork"], &ctx.tcp(p.search));
                let r = run_child(&mut ctx.probe_as(TENANT, "worker", &[], &args))?;
                ctx.expect("launch fork", r, OK);
            }
            "thread" => {
                let args = with(&["thread"], &udp);
                let r = run_child(&mut ctx.probe_as(TENANT, "worker", &[], &args))?;
                ctx.expect("launch thread", r, OK);
            }
            "fork-deny" => {
                let args = with(&["fork", "thread"], &ctx.tcp(p.flood));
                let r = run_child(&mut ctx.probe_as(TENANT, "worker", &[], &args))?;
                ctx.expect("launch fork+thread, refused", r, EPERM);
            }
            "task" => {
                let args = with(&["repeat", "3"], &ctx.tcp(p.search));
                let r =
                    run_child(&mut ctx.probe_as(TENANT, "worker", &task("search", "20s"), &args))?;
                ctx.expect("task scope", r, OK);
            }
            "task-narrow" => {
                let r = run_child(&mut ctx.probe_as(
                    TENANT,
                    "worker",
                    &task("udp", "20s"),
                    &ctx.tcp(p.search),
                ))?;
                ctx.expect("task scope, outside its tools", r, EPERM);
            }
            "task-expiry" => {
                let args = with(&["after", "1500"], &ctx.tcp(p.search));
                let r =
                    run_child(&mut ctx.probe_as(TENANT, "worker", &task("search", "1s"), &args))?;
                ctx.expect("task scope, after its TTL", r, EPERM);
            }
            "sub" => {
                let args = with(&["fork"], &ctx.tcp(p.search));
                let r = run_child(&mut ctx.sub_agent(
                    TENANT,
                    "worker",
                    &[],
                    "helper",
                    "search",
                    &args,
                ))?;
                ctx.expect("sub-agent", r, OK);
            }
            "sub-narrow" => {
                let r = run_child(&mut ctx.sub_agent(
                    TENANT,
                    "worker",
                    &[],
                    "reader",
                    "udp",
                    &ctx.tcp(p.search),
                ))?;
                ctx.expect("sub-agent, outside its tools", r, EPERM);
            }
            "task-sub" => {
                let args = with(&["thread"], &udp);
                let r = run_child(&mut ctx.sub_agent(
                    TENANT,
                    "worker",
                    &task("search,udp", "20s"),
                    "helper",
                    "udp",
                    &args,
                ))?;
                ctx.expect("sub-agent of a task scope", r, OK);
            }
            "tenant2" => {
                let args = with(&["fork"], &udp);
                let r = run_child(&mut ctx.probe_as(TENANT2, "worker", &[], &args))?;
                ctx.expect("second tenant", r, OK);
            }
            "dns" | "task-dns" if ctx.dns => {
                let probe = ctx.probe.display().to_string();
                let script = format!(
                    "'{probe}' resolve udp-connected {DNS_NAME} 127.0.0.1 >/dev/null && \
                     '{probe}' tcp 127.0.0.1 {}",
                    p.search
                );
                let scope = if what == "dns" {
                    Vec::new()
                } else {
                    task("api", "20s")
                };
                let mut cmd = ctx.agent(TENANT, "resolver", &scope);
                cmd.arg(&ctx.probe).arg("exec-sh").arg(script);
                let r = run_child(&mut cmd)?;
                ctx.expect(
                    if what == "dns" {
                        "DNS: resolve, then connect"
                    } else {
                        "DNS: task scope resolves, then connects"
                    },
                    r,
                    OK,
                );
            }
            "dns-refused" if ctx.dns => {
                let other = format!("other.{DNS_NAME}");
                let args = strings(&["resolve", "udp-connected", &other, "127.0.0.1"]);
                let r = run_child(&mut ctx.probe_as(TENANT, "resolver", &[], &args))?;
                ctx.expect("DNS: a name no tool names", r, REFUSED);
            }
            _ => {
                // DNS turns without DNS: a plain launch instead.
                let r = run_child(&mut ctx.probe_as(TENANT, "worker", &[], &ctx.tcp(p.search)))?;
                ctx.expect("launch plain (tcp)", r, OK);
            }
        }
    }
    Ok(())
}

/// Operations counted so far, the deny flood's single attempts left out
/// (its bursts count).
fn operations(counts: &BTreeMap<String, u64>) -> u64 {
    counts
        .iter()
        .filter(|(k, _)| k.as_str() != FLOOD_ATTEMPTS)
        .map(|(_, v)| v)
        .sum()
}

const FLOOD_ATTEMPTS: &str = "deny flood attempts";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Grants that may still hold a slot of one payer agent.
#[derive(Default)]
struct Slots(Vec<Instant>);

impl Slots {
    /// Waits (while the soak runs) until a slot is free; false when the
    /// soak ended meanwhile.
    fn wait_free(&mut self, ctx: &Ctx) -> bool {
        loop {
            let now = Instant::now();
            self.0.retain(|until| *until > now);
            if self.0.len() < MAX_LIVE_GRANTS {
                return true;
            }
            if !ctx.running() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One grant: through the control socket, or (every `cli`th) the CLI.
/// Returns the grant id and when the request was sent.
fn grant(
    ctx: &Ctx,
    agent: &str,
    ttl_ms: u64,
    uses: Option<u32>,
    pid: Option<u32>,
    cli: bool,
) -> Result<(u32, Instant)> {
    let sent = Instant::now();
    let id = if cli {
        let mut cmd = Command::new(&ctx.daemon);
        cmd.arg("grant")
            .arg("--socket")
            .arg(&ctx.socket)
            .args(["--tenant", TENANT, "--agent", agent, "--tool", "pay"])
            .args(["--ttl", &format!("{ttl_ms}ms")]);
        if let Some(u) = uses {
            cmd.args(["--uses", &u.to_string()]);
        }
        if let Some(p) = pid {
            cmd.args(["--pid", &p.to_string()]);
        }
        let out = run_output(&mut cmd)?;
        ctx.bump("grants (CLI)", 1);
        out.trim()
            .parse::<u32>()
            .with_context(|| format!("`agent-guard grant` printed {:?}, not an id", out.trim()))?
    } else {
        let mut req = json!({
            "op": "grant", "tenant": TENANT, "agent": agent, "tool": "pay", "ttl_ms": ttl_ms,
        });
        if let Some(u) = uses {
            req["uses"] = json!(u);
        }
        if let Some(p) = pid {
            req["pid"] = json!(p);
        }
        let data = control_request(&ctx.socket, &req)?;
        ctx.bump("grants (socket)", 1);
        data["id"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .with_context(|| format!("grant reply without an id: {data}"))?
    };
    lock(&ctx.grant_ms).push((ctx.elapsed_s(), ms(sent.elapsed())));
    if uses.is_some() {
        ctx.bump("grants with --uses", 1);
    }
    Ok((id, sent))
}

fn revoke(ctx: &Ctx, id: u32, cli: bool) -> Result<()> {
    if cli {
        let mut cmd = Command::new(&ctx.daemon);
        cmd.arg("revoke")
            .arg("--socket")
            .arg(&ctx.socket)
            .args(["--grant", &id.to_string()]);
        run_output(&mut cmd)?;
    } else {
        control_request(&ctx.socket, &json!({ "op": "revoke", "grant": id }))?;
    }
    ctx.bump("revokes", 1);
    Ok(())
}

/// Short grants (left to expire or revoked), use-counted grants and
/// grant/revoke round trips, each checked by a tagged connect.
fn granter(ctx: &Ctx) -> Result<()> {
    let pay = ctx.tcp(ctx.ports.pay);
    let mut slots: BTreeMap<&str, Slots> = BTreeMap::new();
    let mut turn: u64 = 0;
    while ctx.running() {
        turn += 1;
        let cli = turn.is_multiple_of(4);
        // A short grant: allowed while it lives; then revoked (odd turns)
        // or left to expire.
        let payer = PAYERS_TTL[(turn % PAYERS_TTL.len() as u64) as usize];
        let s = slots.entry(payer).or_default();
        if !s.wait_free(ctx) {
            break;
        }
        let (id, sent) = grant(ctx, payer, SHORT_TTL_MS, None, None, cli)?;
        let r = run_child(&mut ctx.probe_as(TENANT, payer, &[], &pay))?;
        let alive = sent.elapsed() + Duration::from_millis(50) < ms_dur(SHORT_TTL_MS);
        if alive {
            ctx.expect("short grant: connect within its TTL", r, OK);
        } else {
            ctx.bump("short grant: connect too late to judge", 1);
        }
        if turn % 2 == 1 && sent.elapsed() + Duration::from_millis(200) < ms_dur(SHORT_TTL_MS) {
            revoke(ctx, id, !cli)?;
            s.0.push(Instant::now() + SLOT_GRACE);
        } else {
            ctx.bump("short grants left to expire", 1);
            s.0.push(sent + ms_dur(SHORT_TTL_MS) + SLOT_GRACE);
        }

        // Every 3rd turn: one use, then refused; revoked afterwards so the
        // next turn starts without a live grant.
        if turn.is_multiple_of(3) {
            let s = slots.entry(PAYER_USES).or_default();
            if !s.wait_free(ctx) {
                break;
            }
            let (id, sent) = grant(ctx, PAYER_USES, 10_000, Some(1), None, cli)?;
            let first = run_child(&mut ctx.probe_as(TENANT, PAYER_USES, &[], &pay))?;
            let second = run_child(&mut ctx.probe_as(TENANT, PAYER_USES, &[], &pay))?;
            if sent.elapsed() < Duration::from_secs(9) {
                ctx.expect("grant --uses 1: first connect", first, OK);
                ctx.expect("grant --uses 1: second connect", second, EPERM);
            }
            // The daemon retires a grant once the kernel reports its last
            // use taken; a revoke may find it gone already.
            match revoke(ctx, id, cli) {
                Err(e) if format!("{e:#}").contains("no active grant") => {
                    ctx.bump("grant --uses 1: retired when used up, before the revoke", 1);
                }
                other => other?,
            }
            s.0.push(Instant::now() + SLOT_GRACE);
        }

        // Every 3rd turn: allowed, revoked, refused.
        if turn % 3 == 1 {
            let s = slots.entry(PAYER_REVOKE).or_default();
            if !s.wait_free(ctx) {
                break;
            }
            let (id, _) = grant(ctx, PAYER_REVOKE, 60_000, None, None, cli)?;
            let before = run_child(&mut ctx.probe_as(TENANT, PAYER_REVOKE, &[], &pay))?;
            revoke(ctx, id, cli)?;
            let after = run_child(&mut ctx.probe_as(TENANT, PAYER_REVOKE, &[], &pay))?;
            ctx.expect("grant then revoke: before", before, OK);
            ctx.expect("grant then revoke: after", after, EPERM);
            s.0.push(Instant::now() + SLOT_GRACE);
        }
    }
    Ok(())
}

fn ms_dur(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Grants to one process (`--pid`): a probe that connects after 1 s gets
/// a grant for its own tree meanwhile.
///
/// The grant is made only once the launcher has exec'd the probe: a
/// `--pid` grant made between the launcher's registration and its exec
/// moves the process to a subject of its own, and the launcher, which
/// checks its subject in the kernel before it execs, then refuses to start
/// the command (exit 125). Those launches are not what this thread soaks.
fn pid_granter(ctx: &Ctx) -> Result<()> {
    let mut args = strings(&["after", "1000"]);
    args.extend(ctx.tcp(ctx.ports.pay));
    let mut turn: u64 = 0;
    while ctx.running() {
        turn += 1;
        let mut cmd = ctx.probe_as(TENANT, PAYER_PID, &[], &args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
        let pid = child.id();
        let exec_done = || {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("agent-guard-pro"))
        };
        while !exec_done() && spawned.elapsed() < Duration::from_millis(700) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut granted = None;
        while exec_done() && spawned.elapsed() < Duration::from_millis(700) {
            match grant(
                ctx,
                PAYER_PID,
                5000,
                None,
                Some(pid),
                turn.is_multiple_of(4),
            ) {
                Ok((id, _)) => {
                    granted = Some(id);
                    break;
                }
                Err(e) if format!("{e:#}").contains("not tagged") => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e.context(format!("grant --pid {pid}")));
                }
            }
        }
        let in_time = granted.is_some() && spawned.elapsed() < Duration::from_millis(900);
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        let code = loop {
            if let Some(st) = child.try_wait()? {
                break st.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break -1;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        ctx.bump("grants with --pid", u64::from(granted.is_some()));
        if in_time {
            ctx.expect("grant --pid: the process connects", (code, err), OK);
        } else {
            ctx.bump("grant --pid: too late to judge", 1);
        }
    }
    Ok(())
}

/// `agent-guard policy apply` alternating B and A; A is in force at the
/// end.
fn reloader(ctx: &Ctx) -> Result<()> {
    let mut next = Variant::B;
    loop {
        let wait_until = Instant::now() + ctx.reload_every;
        while Instant::now() < wait_until && ctx.running() {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !ctx.running() {
            if *lock(&ctx.current) == Variant::B {
                apply(ctx, Variant::A)?;
            }
            return Ok(());
        }
        apply(ctx, next)?;
        next = if next == Variant::A {
            Variant::B
        } else {
            Variant::A
        };
    }
}

fn apply(ctx: &Ctx, v: Variant) -> Result<()> {
    let file = &ctx.policy_files[usize::from(v == Variant::B)];
    let mut cmd = Command::new(&ctx.daemon);
    cmd.args(["policy", "apply"])
        .arg(file)
        .arg("--socket")
        .arg(&ctx.socket);
    let t = Instant::now();
    run_output(&mut cmd)?;
    lock(&ctx.reload_ms).push((ctx.elapsed_s(), ms(t.elapsed())));
    *lock(&ctx.current) = v;
    ctx.bump("policy reloads", 1);
    Ok(())
}

/// Bursts of refused connects from one tagged probe in a tight loop.
fn flooder(ctx: &Ctx, burst: u32, pause: Duration) -> Result<()> {
    let mut args = strings(&["repeat", &burst.to_string()]);
    args.extend(ctx.tcp(ctx.ports.flood));
    while ctx.running() {
        let r = run_child(&mut ctx.probe_as(TENANT, "flooder", &[], &args))?;
        ctx.expect("deny flood bursts", r, EPERM);
        ctx.bump(FLOOD_ATTEMPTS, u64::from(burst));
        let until = Instant::now() + pause;
        while Instant::now() < until && ctx.running() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Samples: RSS and map counts
// ---------------------------------------------------------------------------

/// The daemon's memory, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Mem {
    rss: u64,
    hwm: u64,
    anon: u64,
    file: u64,
    shmem: u64,
    /// Rss of the `anon_inode:bpf-map` mappings: the ring buffer (its data
    /// pages are mapped twice) and its consumer page.
    ring: u64,
}

impl Mem {
    fn read(pid: u32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        let mut m = parse_status_mem(&status)?;
        m.ring = ring_rss_kib(&smaps);
        Some(m)
    }

    /// RSS without the ring buffer's mapping: heap, stacks, binary.
    fn rss_no_ring(&self) -> u64 {
        self.rss.saturating_sub(self.ring)
    }

    fn json(&self) -> Value {
        json!({
            "vm_rss_kib": self.rss, "vm_hwm_kib": self.hwm, "rss_anon_kib": self.anon,
            "rss_file_kib": self.file, "rss_shmem_kib": self.shmem,
            "ring_mapping_rss_kib": self.ring,
            "rss_without_ring_kib": self.rss_no_ring(),
        })
    }
}

fn parse_status_mem(status: &str) -> Option<Mem> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some(Mem {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
        anon: field("RssAnon:").unwrap_or(0),
        file: field("RssFile:").unwrap_or(0),
        shmem: field("RssShmem:").unwrap_or(0),
        ring: 0,
    })
}

/// Sum of `Rss:` over the mappings named `anon_inode:bpf-map` in smaps.
fn ring_rss_kib(smaps: &str) -> u64 {
    let mut in_bpf = false;
    let mut total = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_bpf = line.split_whitespace().nth(5) == Some("anon_inode:bpf-map");
        } else if in_bpf && first == "Rss:" {
            total += words
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

#[derive(Clone, Debug)]
struct Sample {
    t_s: f64,
    mem: Mem,
    maps: BTreeMap<String, u64>,
    tracked: u64,
    cpu_ticks: u64,
    launches: u64,
}

impl Sample {
    fn json(&self) -> Value {
        json!({
            "t_s": self.t_s, "mem": self.mem.json(), "maps": self.maps,
            "tracked_processes": self.tracked, "daemon_cpu_s": self.cpu_ticks as f64 / 100.0,
            "operations_so_far": self.launches,
        })
    }
}

fn maps_of(status: &Value) -> BTreeMap<String, u64> {
    status["maps"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

fn status(ctx_socket: &Path) -> Result<Value> {
    control_request(ctx_socket, &json!({ "op": "status" }))
}

fn take_sample(ctx: &Ctx, pid: u32) -> Result<Sample> {
    let st = status(&ctx.socket)?;
    let mem = Mem::read(pid).with_context(|| format!("reading /proc/{pid}/status"))?;
    let dis = &st["grant_disagreements"];
    if dis.as_array().is_some_and(|a| !a.is_empty()) {
        let mut seen = lock(&ctx.disagreements_seen);
        if seen.len() < MAX_PROBLEMS {
            seen.push(json!({ "t_s": ctx.elapsed_s(), "grant_disagreements": dis }));
        }
    }
    Ok(Sample {
        t_s: ctx.elapsed_s(),
        mem,
        maps: maps_of(&st),
        tracked: st["tracked_processes"].as_u64().unwrap_or(0),
        cpu_ticks: cpu_ticks(pid).unwrap_or(0),
        launches: operations(&lock(&ctx.counts)),
    })
}

fn sampler(ctx: &Ctx, pid: u32) -> Result<()> {
    while ctx.running() {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("the daemon (pid {pid}) is gone");
        }
        let s = take_sample(ctx, pid)?;
        lock(&ctx.samples).push(s);
        let until = Instant::now() + SAMPLE_EVERY;
        while Instant::now() < until && ctx.running() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Audit trail counts
// ---------------------------------------------------------------------------

/// What the audit trail holds, over every log (tenants and `_node`).
#[derive(Default, Debug, PartialEq)]
struct AuditCounts {
    by_kind: BTreeMap<String, u64>,
    /// connect + sendmsg + socket records: one per kernel decision.
    decisions: u64,
    gap_records: u64,
    /// Sum of gap records' `lost.audit`: records the writer dropped.
    lost_writer: u64,
    bytes: u64,
    files: u64,
}

/// The kinds whose records are kernel decisions.
const DECISION_KINDS: [&str; 3] = ["connect", "sendmsg", "socket"];

fn count_audit(audit_dir: &Path) -> Result<AuditCounts> {
    let mut c = AuditCounts::default();
    let logs =
        std::fs::read_dir(audit_dir).with_context(|| format!("reading {}", audit_dir.display()))?;
    for log in logs.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()) {
        for f in std::fs::read_dir(log.path())?.filter_map(|e| e.ok()) {
            let name = f.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("audit") && name.ends_with(".jsonl")) {
                continue;
            }
            c.files += 1;
            let file = std::fs::File::open(f.path())
                .with_context(|| format!("opening {}", f.path().display()))?;
            c.bytes += file.metadata().map(|m| m.len()).unwrap_or(0);
            for line in BufReader::with_capacity(1 << 20, file).split(b'\n') {
                let line = line.with_context(|| format!("reading {}", f.path().display()))?;
                count_line(&mut c, &line);
            }
        }
    }
    Ok(c)
}

fn count_line(c: &mut AuditCounts, line: &[u8]) {
    const KEY: &[u8] = b"\"kind\":\"";
    let Some(at) = line.windows(KEY.len()).position(|w| w == KEY) else {
        return;
    };
    let rest = &line[at + KEY.len()..];
    let Some(end) = rest.iter().position(|b| *b == b'"') else {
        return;
    };
    let kind = String::from_utf8_lossy(&rest[..end]).into_owned();
    if DECISION_KINDS.contains(&kind.as_str()) {
        c.decisions += 1;
    }
    if kind == "gap" {
        c.gap_records += 1;
        if let Ok(v) = serde_json::from_slice::<Value>(line) {
            c.lost_writer += v["lost"]["audit"].as_u64().unwrap_or(0);
        }
    }
    *c.by_kind.entry(kind).or_default() += 1;
}

/// Decisions the kernel counted vs audited + counted lost.
#[derive(Debug, PartialEq)]
struct Accounting {
    kernel: u64,
    audited: u64,
    lost_ring: u64,
    lost_writer: u64,
}

impl Accounting {
    /// kernel − audited − lost in the ring. The writer's drops are of any
    /// kind, so with drops this may lie in 0..=lost_writer.
    fn missing(&self) -> i128 {
        i128::from(self.kernel) - i128::from(self.audited) - i128::from(self.lost_ring)
    }

    /// 0 when every decision is accounted for; with writer drops, what is
    /// outside the range they can explain.
    fn unaccounted(&self) -> i128 {
        let m = self.missing();
        if m < 0 {
            m
        } else {
            (m - i128::from(self.lost_writer)).max(0)
        }
    }
}

// ---------------------------------------------------------------------------
// The soak
// ---------------------------------------------------------------------------

/// The body of one load thread.
type Job = Box<dyn FnOnce(&Ctx) -> Result<()> + Send>;

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

pub(crate) fn soak(ws: &Workspace, built: &Built, args: &SoakArgs) -> Result<()> {
    let duration = Duration::from_secs_f64(args.minutes * 60.0);
    let cgroup2 = cgroup2_mount()?;
    let out_dir = ws.target.join("soak");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    // Loopback servers of this process.
    let accepts = Arc::new(AtomicU64::new(0));
    let flood_accepts = Arc::new(AtomicU64::new(0));
    let dns_queries = Arc::new(AtomicU64::new(0));
    let ports = Ports {
        search: tcp_server(accepts.clone())?,
        udp: udp_server()?,
        pay: tcp_server(accepts.clone())?,
        flood: tcp_server(flood_accepts.clone())?,
    };
    let dns = !args.no_dns;
    let dns_upstream = if dns {
        Some(dns_server(dns_queries.clone())?)
    } else {
        eprintln!("soak: DNS churn skipped (--no-dns)");
        None
    };

    let mut guard = Guard::create(&cgroup2, "-soak")?;
    let files = [
        guard.dir.join("policy-a.toml"),
        guard.dir.join("policy-b.toml"),
    ];
    for (f, v) in files.iter().zip([Variant::A, Variant::B]) {
        std::fs::write(f, policy_text(&ports, v, dns))
            .with_context(|| format!("writing {}", f.display()))?;
    }
    std::fs::write(&guard.policy, policy_text(&ports, Variant::A, dns))
        .with_context(|| format!("writing {}", guard.policy.display()))?;
    let state_dir = guard.dir.join("state");
    let mut extra: Vec<String> = vec![
        "--state-dir".into(),
        state_dir.display().to_string(),
        "--idle-subject-age".into(),
        IDLE_SUBJECT_AGE.into(),
    ];
    if let Some(up) = dns_upstream {
        // The proxy's port: free on 127.0.0.1 now, so very likely free on
        // 127.64.0.0/10 too.
        let proxy_port = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        extra.extend([
            "--dns-mode".into(),
            "per-agent".into(),
            "--dns-proxy-port".into(),
            proxy_port.to_string(),
            "--dns-server".into(),
            up.to_string(),
            "--dns-grace".into(),
            "2s".into(),
        ]);
    }
    guard.extra_args.extend(extra.iter().map(Into::into));
    guard.start_daemon(&built.daemon)?;
    let pid = guard
        .daemon_pid()
        .context("internal error: no daemon pid")?;
    eprintln!(
        "soak: daemon pid {pid} ({}), {:.1} min, {} launcher thread(s); work dir {}",
        built.daemon.display(),
        args.minutes,
        args.launchers,
        guard.dir.display()
    );

    let ctx = Arc::new(Ctx {
        daemon: built.daemon.clone(),
        probe: built.probe.clone(),
        socket: guard.socket.clone(),
        ports,
        dns,
        started: Instant::now(),
        deadline: Instant::now() + duration,
        stop: AtomicBool::new(false),
        counts: Mutex::default(),
        problems: Mutex::default(),
        problem_count: AtomicU64::new(0),
        fatal: Mutex::default(),
        launch_ms: Mutex::default(),
        grant_ms: Mutex::default(),
        reload_ms: Mutex::default(),
        samples: Mutex::default(),
        disagreements_seen: Mutex::default(),
        flood_accepts,
        dns_queries,
        current: Mutex::new(Variant::A),
        policy_files: files,
        reload_every: Duration::from_secs(args.reload_every),
    });

    let baseline_status = status(&ctx.socket)?;
    let baseline = maps_of(&baseline_status);
    let roots = baseline_status["agents"].as_array().map_or(0, |a| a.len());
    let start = take_sample(&ctx, pid)?;
    lock(&ctx.samples).push(start.clone());
    sanity(&ctx)?;

    let load_s = run_load(&ctx, args, pid)?;

    // Settle: every agent gone, idle subjects retired, grants expired.
    let mut checks = Vec::new();
    let (settled, end_status, settle_s) = settle(&ctx, &baseline, roots).with_context(|| {
        format!(
            "the daemon no longer answers after the load (load errors: {}); its log:\n{}",
            lock(&ctx.fatal).join("; "),
            guard.log_tail()
        )
    })?;
    // A few more idle-retire intervals, then the final figures.
    std::thread::sleep(Duration::from_secs(3));
    let final_status = status(&ctx.socket).unwrap_or(end_status);
    let end_maps = maps_of(&final_status);
    let end_mem = Mem::read(pid).unwrap_or_default();
    let end_cpu = cpu_ticks(pid).unwrap_or(0);
    let leftover = leak_diff(&baseline, &end_maps);
    checks.push(Check {
        name: "maps back to baseline (no leak)",
        ok: settled && leftover.is_empty(),
        detail: if leftover.is_empty() {
            format!("after {settle_s:.1} s: {}", fmt_maps(&end_maps))
        } else {
            format!("left over: {leftover:?} (baseline {})", fmt_maps(&baseline))
        },
    });
    let active = final_status["agents"].as_array().map_or(0, |a| a.len());
    checks.push(Check {
        name: "only root subjects active",
        ok: active == roots,
        detail: format!("{active} active, {roots} roots"),
    });
    let cgroup_root = PathBuf::from(
        final_status["daemon"]["cgroup_root"]
            .as_str()
            .unwrap_or_default(),
    );
    let stray = stray_cgroups(&cgroup_root);
    checks.push(Check {
        name: "no derived cgroup directories left",
        ok: stray.is_empty(),
        detail: if stray.is_empty() {
            "none".into()
        } else {
            format!("{} left, e.g. {}", stray.len(), stray[0].display())
        },
    });
    let disagreements = final_status["grant_disagreements"].clone();
    checks.push(Check {
        name: "grant_disagreements empty",
        ok: disagreements.as_array().is_some_and(|a| a.is_empty()),
        detail: format!(
            "at the end: {disagreements}; seen in {} sample(s) during the load",
            lock(&ctx.disagreements_seen).len()
        ),
    });

    // Memory.
    let samples = lock(&ctx.samples).clone();
    let warm_at = (duration.as_secs_f64() / 4.0).clamp(15.0, 120.0);
    let (warm_t, warm) = samples
        .iter()
        .find(|s| s.t_s >= warm_at)
        .or(samples.last())
        .map_or((0.0, start.mem), |s| (s.t_s, s.mem));
    let growth = end_mem.rss_no_ring() as f64 / warm.rss_no_ring().max(1) as f64;
    let per_min = per_minute(warm.rss_no_ring(), end_mem.rss_no_ring(), load_s - warm_t);
    checks.push(Check {
        name: "RSS (without the ring) not doubled since warm-up",
        ok: growth <= RSS_LEAK_FACTOR,
        detail: format!(
            "warm {:.1} MiB -> end {:.1} MiB (x{growth:.2}, {per_min:+.2} MiB/min); \
             goal < 30 MiB VmRSS is a report item",
            mib(warm.rss_no_ring()),
            mib(end_mem.rss_no_ring())
        ),
    });

    // Daemon stop and its cleanup.
    let decisions = &final_status["decisions"];
    let kernel_decisions: u64 = ["allow", "deny", "would_deny"]
        .iter()
        .map(|k| decisions[*k].as_u64().unwrap_or(0))
        .sum();
    let lost = final_status["events_lost"].clone();
    let lost_ring: u64 = DECISION_KINDS
        .iter()
        .map(|k| lost[*k].as_u64().unwrap_or(0))
        .sum();
    let lost_other: u64 = lost
        .as_object()
        .map(|o| o.values().filter_map(Value::as_u64).sum::<u64>())
        .unwrap_or(0)
        - lost_ring;
    let stopped = guard.stop_daemon();
    checks.push(Check {
        name: "daemon stops cleanly (SIGTERM, exit 0)",
        ok: stopped.is_ok(),
        detail: match &stopped {
            Ok(()) => "ok".into(),
            Err(e) => format!("{e:#}"),
        },
    });
    let pin_dir = guard.dir.join("bpf");
    let pins_left = is_mounted(&pin_dir) || has_links(&pin_dir);
    checks.push(Check {
        name: "daemon removed its cgroups and pins",
        ok: !cgroup_root.as_os_str().is_empty() && !cgroup_root.exists() && !pins_left,
        detail: format!(
            "cgroup root {} {}; pin dir {} {}",
            cgroup_root.display(),
            if cgroup_root.exists() {
                "LEFT"
            } else {
                "removed"
            },
            pin_dir.display(),
            if pins_left {
                "still mounted/pinned"
            } else {
                "clean"
            }
        ),
    });

    // Accounting: every decision audited or counted lost.
    let audit = count_audit(&guard.audit_dir)?;
    let acct = Accounting {
        kernel: kernel_decisions,
        audited: audit.decisions,
        lost_ring,
        lost_writer: audit.lost_writer,
    };
    checks.push(Check {
        name: "0 unaccounted decisions",
        ok: acct.unaccounted() == 0,
        detail: format!(
            "kernel {} = audited {} + lost in ring {} + missing {} (writer dropped {} records of any kind)",
            acct.kernel,
            acct.audited,
            acct.lost_ring,
            acct.missing(),
            acct.lost_writer
        ),
    });
    let verify_t = Instant::now();
    let verify = Command::new(&built.daemon)
        .args(["audit", "verify", "--audit-dir"])
        .arg(&guard.audit_dir)
        .stdin(Stdio::null())
        .output()
        .context("running `agent-guard audit verify`")?;
    let verify_s = verify_t.elapsed().as_secs_f64();
    let verify_text = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    checks.push(Check {
        name: "audit verify exits 0",
        ok: verify.status.success(),
        detail: format!(
            "{} in {verify_s:.1} s: {}",
            verify.status,
            verify_text.lines().last().unwrap_or("").trim()
        ),
    });

    // What the load did.
    let problems = lock(&ctx.problems).clone();
    let problem_count = ctx.problem_count.load(Ordering::Relaxed);
    checks.push(Check {
        name: "every verdict as the policy says",
        ok: problem_count == 0,
        detail: format!("{problem_count} unexpected result(s)"),
    });
    let flood_leaks = ctx.flood_accepts.load(Ordering::Relaxed);
    checks.push(Check {
        name: "deny-flood listener never accepted",
        ok: flood_leaks == 0,
        detail: format!("{flood_leaks} accepted"),
    });
    let fatal = lock(&ctx.fatal).clone();
    checks.push(Check {
        name: "load ran to the end",
        ok: fatal.is_empty(),
        detail: if fatal.is_empty() {
            format!("{load_s:.1} s")
        } else {
            fatal.join("; ")
        },
    });

    let counts = lock(&ctx.counts).clone();
    let lat = Latency {
        launch: lock(&ctx.launch_ms).clone(),
        grant: lock(&ctx.grant_ms).clone(),
        reload: lock(&ctx.reload_ms).clone(),
    };
    let report = Report {
        args,
        load_s,
        counts: &counts,
        acct: &acct,
        audit: &audit,
        lost_other,
        decisions,
        start: start.mem,
        warm,
        warm_t,
        end: end_mem,
        samples: &samples,
        baseline: &baseline,
        end_maps: &end_maps,
        lat: &lat,
        checks: &checks,
        daemon_cpu_s: end_cpu as f64 / 100.0,
        dns_queries: ctx.dns_queries.load(Ordering::Relaxed),
        accepts: accepts.load(Ordering::Relaxed),
    };
    print!("{}", report.table());
    let mut results = report.json();
    results["problems"] = json!(problems);
    results["problem_count"] = json!(problem_count);
    results["fatal"] = json!(fatal);
    results["grant_disagreements_seen"] = json!(*lock(&ctx.disagreements_seen));
    results["audit_verify_output"] = json!(verify_text);
    let path = out_dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("soak: wrote {}", path.display());
    let log = guard.dir.join("daemon.log");
    let _ = std::fs::copy(&log, out_dir.join("daemon.log"));

    let failed: Vec<&Check> = checks.iter().filter(|c| !c.ok).collect();
    if failed.is_empty() {
        return Ok(());
    }
    // Keep the evidence: the audit trail and state move next to results.json.
    for (from, to) in [(&guard.audit_dir, "audit"), (&state_dir, "state")] {
        let dest = out_dir.join(to);
        let _ = std::fs::remove_dir_all(&dest);
        match std::fs::rename(from, &dest) {
            Ok(()) => eprintln!("soak: kept {} as {}", from.display(), dest.display()),
            Err(e) => eprintln!("soak: could not keep {}: {e}", from.display()),
        }
    }
    let mut msg = String::from("the soak failed:");
    for c in failed {
        let _ = write!(msg, "\n  - {}: {}", c.name, c.detail);
    }
    for p in problems.iter().take(5) {
        let _ = write!(msg, "\n    problem: {p}");
    }
    let _ = write!(
        msg,
        "\n  (results: {}; daemon log: {})",
        path.display(),
        out_dir.join("daemon.log").display()
    );
    bail!(msg)
}

/// Runs the load threads until the deadline (or a fatal error); returns
/// how long the load ran, in seconds.
fn run_load(ctx: &Arc<Ctx>, args: &SoakArgs, pid: u32) -> Result<f64> {
    let mut threads = Vec::new();
    let spawn = |name: String, f: Job| {
        let ctx = ctx.clone();
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Err(e) = f(&ctx) {
                    ctx.fatal(format!("{name}: {e:#}"));
                }
            })
            .context("starting a soak thread")
    };
    for id in 0..args.launchers {
        threads.push(spawn(
            format!("launcher-{id}"),
            Box::new(move |c: &Ctx| launcher(c, id)),
        )?);
    }
    threads.push(spawn("grants".into(), Box::new(granter))?);
    threads.push(spawn("pid-grants".into(), Box::new(pid_granter))?);
    threads.push(spawn("reload".into(), Box::new(reloader))?);
    let (burst, pause) = (args.flood_burst, Duration::from_millis(args.flood_pause_ms));
    threads.push(spawn(
        "flood".into(),
        Box::new(move |c: &Ctx| flooder(c, burst, pause)),
    )?);
    threads.push(spawn(
        "sampler".into(),
        Box::new(move |c: &Ctx| sampler(c, pid)),
    )?);

    let mut last_report = Instant::now();
    while ctx.running() {
        std::thread::sleep(Duration::from_millis(200));
        if last_report.elapsed() >= Duration::from_secs(60) {
            last_report = Instant::now();
            let ops = operations(&lock(&ctx.counts));
            let rss = lock(&ctx.samples).last().map_or(0, |s| s.mem.rss);
            eprintln!(
                "soak: {:.0} s: {ops} operations, {} problem(s), daemon RSS {:.1} MiB",
                ctx.elapsed_s(),
                ctx.problem_count.load(Ordering::Relaxed),
                rss as f64 / 1024.0
            );
        }
    }
    ctx.stop.store(true, Ordering::Relaxed);
    let load_s = ctx.elapsed_s();
    eprintln!("soak: load ended after {load_s:.1} s; waiting for every thread");
    for t in threads {
        if t.join().is_err() {
            ctx.fatal("a soak thread panicked".into());
        }
    }
    Ok(load_s)
}

/// Waits (up to SETTLE_TIMEOUT) until the maps are back to `baseline`,
/// only the `roots` are active and no grant is left; returns whether they
/// got there, the last status and how long it took.
fn settle(ctx: &Ctx, baseline: &BTreeMap<String, u64>, roots: usize) -> Result<(bool, Value, f64)> {
    let settle_start = Instant::now();
    let (settled, end_status) = loop {
        let st = status(&ctx.socket)?;
        let now = maps_of(&st);
        let agents = st["agents"].as_array().map_or(0, |a| a.len());
        let learned = st["dns_proxy"]["learned_addresses"].as_u64().unwrap_or(0);
        let leftover = leak_diff(baseline, &now);
        if leftover.is_empty()
            && agents == roots
            && st["grants"].as_array().is_some_and(|g| g.is_empty())
        {
            break (true, st);
        }
        if settle_start.elapsed() > SETTLE_TIMEOUT {
            eprintln!(
                "soak: maps not back to baseline after {} s: {leftover:?}, {agents} active subjects \
                 (roots {roots}), {learned} learned DNS addresses",
                SETTLE_TIMEOUT.as_secs()
            );
            break (false, st);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    Ok((settled, end_status, settle_start.elapsed().as_secs_f64()))
}

/// Before the load: the fence is in the way where it should be.
fn sanity(ctx: &Ctx) -> Result<()> {
    let p = ctx.ports;
    let checks: Vec<(&str, Command, i32)> = {
        let mut v = vec![
            (
                "worker -> search",
                ctx.probe_as(TENANT, "worker", &[], &ctx.tcp(p.search)),
                OK,
            ),
            (
                "worker -> flood port",
                ctx.probe_as(TENANT, "worker", &[], &ctx.tcp(p.flood)),
                EPERM,
            ),
            (
                "payer -> pay without a grant",
                ctx.probe_as(TENANT, PAYER_REVOKE, &[], &ctx.tcp(p.pay)),
                EPERM,
            ),
        ];
        if ctx.dns {
            v.push((
                "resolver -> search before resolving",
                ctx.probe_as(TENANT, "resolver", &[], &ctx.tcp(p.search)),
                EPERM,
            ));
        }
        v
    };
    for (what, mut cmd, want) in checks {
        let (code, err) = run_child(&mut cmd)?;
        if code != want {
            bail!(
                "sanity check `{what}`: exit {code}, expected {want} ({}): {}",
                status_name(want),
                err.trim()
            );
        }
    }
    Ok(())
}

/// Maps whose count differs from the baseline (UNIX_PATHS and the like
/// included), as name -> (baseline, now).
fn leak_diff(
    baseline: &BTreeMap<String, u64>,
    now: &BTreeMap<String, u64>,
) -> BTreeMap<String, (u64, u64)> {
    let names: std::collections::BTreeSet<&String> = baseline.keys().chain(now.keys()).collect();
    names
        .into_iter()
        .filter_map(|n| {
            let b = baseline.get(n).copied().unwrap_or(0);
            let c = now.get(n).copied().unwrap_or(0);
            (b != c).then(|| (n.clone(), (b, c)))
        })
        .collect()
}

fn fmt_maps(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Directories below `<root>/<tenant>/<agent>/`: task scopes', sub-agents'
/// and process trees' cgroups that outlived their subject.
fn stray_cgroups(root: &Path) -> Vec<PathBuf> {
    let dirs = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    dirs(root)
        .iter()
        .flat_map(|t| dirs(t))
        .flat_map(|a| dirs(&a))
        .collect()
}

fn is_mounted(p: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = p.display().to_string();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| mp == want)
}

fn has_links(pin_dir: &Path) -> bool {
    std::fs::read_dir(pin_dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("links-"))
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// MiB per minute from `from` to `to` KiB over `seconds`.
fn per_minute(from: u64, to: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    (mib(to) - mib(from)) * 60.0 / seconds
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

struct Latency {
    launch: Vec<(f64, f64)>,
    grant: Vec<(f64, f64)>,
    reload: Vec<(f64, f64)>,
}

/// Median of the values in [from, to) seconds, and how many.
fn window_median(v: &[(f64, f64)], from: f64, to: f64) -> (f64, usize) {
    let in_window: Vec<f64> = v
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|(_, x)| *x)
        .collect();
    (median(&in_window), in_window.len())
}

struct Report<'a> {
    args: &'a SoakArgs,
    load_s: f64,
    counts: &'a BTreeMap<String, u64>,
    acct: &'a Accounting,
    audit: &'a AuditCounts,
    lost_other: u64,
    decisions: &'a Value,
    start: Mem,
    warm: Mem,
    /// When the warm sample was taken (s into the load).
    warm_t: f64,
    end: Mem,
    samples: &'a [Sample],
    baseline: &'a BTreeMap<String, u64>,
    end_maps: &'a BTreeMap<String, u64>,
    lat: &'a Latency,
    checks: &'a [Check],
    daemon_cpu_s: f64,
    dns_queries: u64,
    accepts: u64,
}

impl Report<'_> {
    /// First and last minute (or quarter, if shorter) of the load.
    fn windows(&self) -> [(f64, f64); 2] {
        let w = (self.load_s / 4.0).min(60.0);
        [(0.0, w), (self.load_s - w, self.load_s + 1.0)]
    }

    fn peak_maps(&self) -> BTreeMap<String, u64> {
        let mut peak: BTreeMap<String, u64> = BTreeMap::new();
        for s in self.samples {
            for (k, v) in &s.maps {
                let p = peak.entry(k.clone()).or_default();
                *p = (*p).max(*v);
            }
        }
        peak
    }

    fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nsoak: {:.1} min of load ({} launcher threads, deny-flood bursts of {} every {} ms, \
             reload every {} s, DNS churn {})",
            self.load_s / 60.0,
            self.args.launchers,
            self.args.flood_burst,
            self.args.flood_pause_ms,
            self.args.reload_every,
            if self.args.no_dns { "off" } else { "on" }
        );
        let _ = writeln!(t, "  {:<48} {:>10}", "operation", "count");
        for (k, v) in self.counts {
            let _ = writeln!(t, "  {k:<48} {v:>10}");
        }
        let _ = writeln!(
            t,
            "  {:<48} {:>10}\n  {:<48} {:>10}",
            "connections accepted (search, pay)",
            self.accepts,
            "DNS queries answered upstream",
            self.dns_queries
        );
        let _ = writeln!(t, "\nevents");
        let _ = writeln!(
            t,
            "  kernel decisions {} (allow {}, deny {}, would_deny {})",
            self.acct.kernel,
            self.decisions["allow"],
            self.decisions["deny"],
            self.decisions["would_deny"]
        );
        let _ = writeln!(
            t,
            "  audited decision records {}, lost in ring {} (other kinds {}), dropped by writer {}, \
             unaccounted {}",
            self.acct.audited,
            self.acct.lost_ring,
            self.lost_other,
            self.acct.lost_writer,
            self.acct.unaccounted()
        );
        let kinds: Vec<String> = self
            .audit
            .by_kind
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            t,
            "  audit records by kind: {} ({} files, {:.1} MiB)",
            kinds.join(", "),
            self.audit.files,
            self.audit.bytes as f64 / 1048576.0
        );
        let _ = writeln!(
            t,
            "\ndaemon memory (MiB)   {:>8} {:>8} {:>8} {:>8}",
            "start", "warm", "end", "HWM"
        );
        let row = |name: &str, f: &dyn Fn(&Mem) -> u64| {
            format!(
                "  {name:<20} {:>8.1} {:>8.1} {:>8.1}\n",
                mib(f(&self.start)),
                mib(f(&self.warm)),
                mib(f(&self.end))
            )
        };
        let _ = write!(
            t,
            "  {:<20} {:>8.1} {:>8.1} {:>8.1} {:>8.1}\n{}{}{}",
            "VmRSS",
            mib(self.start.rss),
            mib(self.warm.rss),
            mib(self.end.rss),
            mib(self.end.hwm),
            row("ring mapping", &|m| m.ring),
            row("RSS without ring", &|m| m.rss_no_ring()),
            row("RssAnon (heap)", &|m| m.anon),
        );
        let _ = writeln!(
            t,
            "  (warm = the sample at {:.0} s; warm -> end without ring {:+.2} MiB/min, \
             heap {:+.2} MiB/min; daemon CPU {:.1} s)",
            self.warm_t,
            per_minute(
                self.warm.rss_no_ring(),
                self.end.rss_no_ring(),
                self.load_s - self.warm_t
            ),
            per_minute(self.warm.anon, self.end.anon, self.load_s - self.warm_t),
            self.daemon_cpu_s
        );
        let peak = self.peak_maps();
        let _ = writeln!(
            t,
            "\nmap entries           {:>9} {:>9} {:>9}",
            "baseline", "peak", "end"
        );
        for (k, b) in self.baseline {
            let _ = writeln!(
                t,
                "  {k:<20} {b:>9} {:>9} {:>9}",
                peak.get(k).copied().unwrap_or(0),
                self.end_maps.get(k).copied().unwrap_or(0)
            );
        }
        let [first, last] = self.windows();
        let _ = writeln!(t, "\nlatency (median ms)   {:>12} {:>12}", "first", "last");
        for (name, v) in [
            ("plain launch", &self.lat.launch),
            ("grant", &self.lat.grant),
            ("policy apply", &self.lat.reload),
        ] {
            let (a, na) = window_median(v, first.0, first.1);
            let (b, nb) = window_median(v, last.0, last.1);
            let _ = writeln!(t, "  {name:<20} {a:>7.1} ({na:>3}) {b:>7.1} ({nb:>3})");
        }
        let _ = writeln!(
            t,
            "  (first/last {:.0} s of the load; count in brackets)",
            first.1
        );
        let _ = writeln!(t, "\nchecks");
        for c in self.checks {
            let _ = writeln!(
                t,
                "  {:<4} {:<48} {}",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        t
    }

    fn json(&self) -> Value {
        let [first, last] = self.windows();
        let lat = |v: &[(f64, f64)]| {
            let (a, na) = window_median(v, first.0, first.1);
            let (b, nb) = window_median(v, last.0, last.1);
            json!({
                "median_ms_all": median(&v.iter().map(|x| x.1).collect::<Vec<_>>()),
                "first_window_median_ms": a, "first_window_n": na,
                "last_window_median_ms": b, "last_window_n": nb,
            })
        };
        let date = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let checks: Vec<Value> = self
            .checks
            .iter()
            .map(|c| json!({ "name": c.name, "ok": c.ok, "detail": c.detail }))
            .collect();
        let (warm, end, seconds) = (self.warm, self.end, self.load_s - self.warm_t);
        json!({
            "date_unix_s": date,
            "kernel": kernel.trim(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "args": {
                "minutes": self.args.minutes, "launchers": self.args.launchers,
                "flood_burst": self.args.flood_burst, "flood_pause_ms": self.args.flood_pause_ms,
                "reload_every_s": self.args.reload_every, "dns": !self.args.no_dns,
                "build": if self.args.debug { "debug" } else { "release" },
                "idle_subject_age": IDLE_SUBJECT_AGE,
            },
            "load_s": self.load_s,
            "operations": self.counts,
            "connections_accepted": self.accepts,
            "dns_queries_upstream": self.dns_queries,
            "decisions": self.decisions,
            "accounting": {
                "kernel_decisions": self.acct.kernel,
                "audited_decision_records": self.acct.audited,
                "lost_ring_decision_kinds": self.acct.lost_ring,
                "lost_ring_other_kinds": self.lost_other,
                "dropped_by_audit_writer": self.acct.lost_writer,
                "missing": self.acct.missing().to_string(),
                "unaccounted": self.acct.unaccounted().to_string(),
            },
            "audit": {
                "records_by_kind": self.audit.by_kind, "gap_records": self.audit.gap_records,
                "files": self.audit.files, "bytes": self.audit.bytes,
            },
            "memory": {
                "start": self.start.json(), "warm": self.warm.json(), "end": self.end.json(),
                "warm_at_s": self.warm_t,
                "growth_without_ring_warm_to_end":
                    self.end.rss_no_ring() as f64 / self.warm.rss_no_ring().max(1) as f64,
                "growth_without_ring_mib_per_min":
                    per_minute(warm.rss_no_ring(), end.rss_no_ring(), seconds),
                "growth_anon_mib_per_min": per_minute(warm.anon, end.anon, seconds),
            },
            "daemon_cpu_s": self.daemon_cpu_s,
            "maps": { "baseline": self.baseline, "peak": self.peak_maps(), "end": self.end_maps },
            "latency": {
                "window_s": first.1,
                "plain_launch": lat(&self.lat.launch),
                "grant": lat(&self.lat.grant),
                "policy_apply": lat(&self.lat.reload),
            },
            "checks": checks,
            "ok": self.checks.iter().all(|c| c.ok),
            "samples": self.samples.iter().map(Sample::json).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_are_bounded() {
        assert_eq!(parse_minutes("10"), Ok(10.0));
        assert_eq!(parse_minutes("0.5"), Ok(0.5));
        assert!(parse_minutes("0").is_err());
        assert!(parse_minutes("-1").is_err());
        assert!(parse_minutes("x").is_err());
        assert!(parse_minutes("100000").is_err());
    }

    #[test]
    fn reads_ring_rss_from_smaps() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fe:00 123 /usr/bin/agent-guard
Rss:                1024 kB
7f024062e000-7f024262f000 r--s 00001000 00:10 1038                       anon_inode:bpf-map
Size:              32772 kB
Rss:               32772 kB
Pss:               16386 kB
7f0243f80000-7f0243f81000 rw-s 00000000 00:10 1038                       anon_inode:bpf-map
Rss:                   4 kB
7f0243f90000-7f0243f91000 rw-p 00000000 00:00 0
Rss:                   8 kB
";
        assert_eq!(ring_rss_kib(smaps), 32776);
        let status = "Name:\tagent-guard\nVmHWM:\t   61180 kB\nVmRSS:\t   51672 kB\n\
                      RssAnon:\t    8692 kB\nRssFile:\t   42980 kB\nRssShmem:\t       0 kB\n";
        let m = parse_status_mem(status).expect("parses");
        assert_eq!((m.rss, m.hwm, m.anon, m.file), (51672, 61180, 8692, 42980));
        assert!(parse_status_mem("Name: x\n").is_none());
    }

    #[test]
    fn counts_audit_lines() {
        let mut c = AuditCounts::default();
        for line in [
            r#"{"seq":0,"ts":"t","kind":"connect","verdict":"deny"}"#,
            r#"{"seq":1,"ts":"t","kind":"sendmsg","verdict":"allow"}"#,
            r#"{"seq":2,"ts":"t","kind":"socket","verdict":"deny"}"#,
            r#"{"seq":3,"ts":"t","kind":"exec"}"#,
            r#"{"seq":4,"ts":"t","kind":"control","verdict":"allow","op":"run"}"#,
            r#"{"seq":5,"ts":"t","kind":"gap","lost":{"audit":3,"connect":2}}"#,
            "",
        ] {
            count_line(&mut c, line.as_bytes());
        }
        assert_eq!(c.decisions, 3);
        assert_eq!(c.gap_records, 1);
        assert_eq!(c.lost_writer, 3);
        assert_eq!(c.by_kind["control"], 1);
    }

    #[test]
    fn accounting() {
        let a = |kernel, audited, lost_ring, lost_writer| Accounting {
            kernel,
            audited,
            lost_ring,
            lost_writer,
        };
        assert_eq!(a(10, 8, 2, 0).unaccounted(), 0);
        assert_eq!(a(10, 7, 2, 0).unaccounted(), 1);
        assert_eq!(a(10, 9, 2, 0).unaccounted(), -1);
        // Writer drops explain up to their number.
        assert_eq!(a(10, 6, 2, 5).unaccounted(), 0);
        assert_eq!(a(10, 1, 2, 5).unaccounted(), 2);
    }

    #[test]
    fn policies_differ_only_in_extra() {
        let p = Ports {
            search: 1001,
            udp: 1002,
            pay: 1003,
            flood: 1004,
        };
        let a = policy_text(&p, Variant::A, true);
        let b = policy_text(&p, Variant::B, true);
        assert_ne!(a, b);
        for text in [&a, &b] {
            assert!(text.contains("port = 1001 }"));
            assert!(text.contains("proto = \"udp\""));
            assert!(!text.contains("1004"), "no tool names the flood port");
            assert!(text.contains(DNS_NAME));
            assert_eq!(text.matches("[[agent]]").count(), 3 + 4 + 3 + 1);
        }
        assert!(!policy_text(&p, Variant::A, false).contains(DNS_NAME));
    }

    #[test]
    fn leak_diff_names_changed_maps() {
        let m = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
            v.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
        };
        let base = m(&[("PROCS", 0), ("SUBJECTS", 10)]);
        assert!(leak_diff(&base, &base).is_empty());
        let d = leak_diff(&base, &m(&[("PROCS", 2), ("SUBJECTS", 10), ("GRANTS", 1)]));
        assert_eq!(d.len(), 2);
        assert_eq!(d["PROCS"], (0, 2));
        assert_eq!(d["GRANTS"], (0, 1));
    }

    #[test]
    fn dns_answers_a_queries() {
        // id 0x1234, one question: a.b A IN.
        let q = [
            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 1, b'b', 0, 0, 1, 0, 1,
        ];
        let r = dns_answer(&q).expect("answers");
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(&r[r.len() - 4..], &[127, 0, 0, 1]);
        assert!(dns_answer(&q[..10]).is_none());
    }

    #[test]
    fn medians_by_window() {
        let v = [(0.5, 1.0), (1.0, 3.0), (5.0, 10.0)];
        assert_eq!(window_median(&v, 0.0, 2.0), (2.0, 2));
        assert_eq!(window_median(&v, 4.0, 6.0), (10.0, 1));
        assert!(window_median(&v, 7.0, 8.0).0.is_nan());
    }
}
