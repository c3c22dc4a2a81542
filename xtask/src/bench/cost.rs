//! Part 7 (`cost`): what one call costs the calling process, side by side
//! in ONE run, against nothing attached and against nftables.
//!
//! Workloads (each sample one `agent-guard-probe` loop of N calls, pinned
//! to CPU 0; the servers' threads on CPU 1):
//! - `tcp`: socket + blocking connect + close with SO_LINGER 0
//!   (`bench-tcp-rst`): the whole call a client makes, without the
//!   TIME_WAIT ports that make plain close() samples drift;
//! - `udp`: 64-byte `sendto(2)` on one unconnected socket (`bench-sendto`);
//! - `unix`: socket + connect + close to a listed Unix socket (`bench-unix`).
//!
//! Configurations:
//! - `none`: no daemon, no nftables table (the baseline, twice per round);
//! - `nftables`: no daemon; an `inet` table whose output chain looks every
//!   packet up in a set holding the same 10,000 (addr, proto, port)
//!   entries as the agent plus the targets (Unix sockets: not filtered);
//! - `untagged`: the daemon running (default per-call mode), probe untagged;
//! - `tagged`: the probe tagged as an agent holding those 10,000 entries,
//!   one audit record per call;
//! - `tagged, flow`: the daemon with `--flow-records` (skipped, and said
//!   so, when the daemon has no such flag).
//!
//! Each round runs `none, nftables, [daemon] untagged tagged, [daemon
//! --flow-records] tagged, none` and every other round the reverse, so a
//! linear drift cancels. Per round and workload, a configuration's ratio is
//! its sample over the mean of the round's two baseline samples; the table
//! shows the median ratio over the rounds and the 25th..75th percentile,
//! for the probe's own CPU time per call (user + sys: our programs run in
//! its system calls; time it was preempted by other tenants is left out),
//! and the median wall-time ratio beside it. Targets are judged on CPU.
//!
//! After the rounds, one more pass with `kernel.bpf_stats_enabled=1` (it
//! adds two clock reads per program run, so never during the timed rounds)
//! says which of our programs ran per call and what each cost in the
//! kernel: the breakdown for a missed target.

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::common::{
    AGENT, Guard, PROBE_EPERM, TENANT, daemon_status, events_lost, median, percentile, run_output,
    tagged_probe,
};
use super::{Listener, Pinning, endpoint_tools, pin_command, pin_current_thread};
use crate::{Built, describe, find_in_path};

/// Endpoint entries of the tagged agent (and elements of the nft set).
const ENTRIES: u32 = 10_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Tcp,
    Udp,
    Unix,
}

impl Workload {
    const ALL: [Self; 3] = [Self::Tcp, Self::Udp, Self::Unix];

    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp connect+close",
            Self::Udp => "udp sendto 64 B",
            Self::Unix => "unix connect+close",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Unix => "unix",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    None,
    Nft,
    Untagged,
    Tagged,
    Flow,
}

impl Config {
    const MEASURED: [Self; 4] = [Self::Nft, Self::Untagged, Self::Tagged, Self::Flow];

    fn name(self) -> &'static str {
        match self {
            Self::None => "none (no program, no nftables)",
            Self::Nft => "nftables, 10k-element set",
            Self::Untagged => "agent-guard, untagged",
            Self::Tagged => "agent-guard, tagged 10k, per call",
            Self::Flow => "agent-guard, tagged 10k, --flow-records",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Nft => "nftables",
            Self::Untagged => "untagged",
            Self::Tagged => "tagged",
            Self::Flow => "tagged_flow",
        }
    }

    /// The target for this configuration and workload, if any.
    fn target(self, w: Workload) -> Option<f64> {
        match (self, w) {
            (Self::Untagged, Workload::Tcp) => Some(1.005),
            (Self::Tagged, Workload::Tcp) => Some(1.02),
            (Self::Tagged, Workload::Udp) => Some(1.15),
            (Self::Tagged, Workload::Unix) => Some(1.05),
            _ => None,
        }
    }
}

/// Calls per sample.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Calls {
    tcp: u32,
    udp: u32,
    unix: u32,
}

impl Calls {
    pub(crate) fn new(quick: bool) -> Self {
        if quick {
            Self {
                tcp: 1500,
                udp: 10_000,
                unix: 3000,
            }
        } else {
            Self {
                tcp: 3000,
                udp: 40_000,
                unix: 8000,
            }
        }
    }

    fn of(self, w: Workload) -> u32 {
        match w {
            Workload::Tcp => self.tcp,
            Workload::Udp => self.udp,
            Workload::Unix => self.unix,
        }
    }
}

/// Which figure of a sample: the probe's wall time per call, or its own
/// CPU time (user + sys) per call, which leaves out time preempted by other
/// tenants of the machine.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Metric {
    Cpu,
    Wall,
}

/// Samples (wall ns, CPU ns per call) of one round, by (config, workload).
#[derive(Default)]
struct Round {
    samples: Vec<(Config, Workload, [f64; 2])>,
}

impl Round {
    fn pick(s: &[f64; 2], m: Metric) -> f64 {
        match m {
            Metric::Wall => s[0],
            Metric::Cpu => s[1],
        }
    }

    fn baseline(&self, w: Workload, m: Metric) -> Option<f64> {
        let v: Vec<f64> = self
            .samples
            .iter()
            .filter(|(c, x, _)| *c == Config::None && *x == w)
            .map(|s| Self::pick(&s.2, m))
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    fn of(&self, c: Config, w: Workload, m: Metric) -> Option<f64> {
        self.samples
            .iter()
            .find(|(x, y, _)| *x == c && *y == w)
            .map(|s| Self::pick(&s.2, m))
    }
}

/// Part 7's figures.
pub(crate) struct SideBySide {
    rounds: Vec<Round>,
    calls: Calls,
    /// Configurations not measured, and why.
    skipped: Vec<(Config, String)>,
    /// Events the daemon lost over all its runs (must be 0).
    lost: u64,
    pinned: bool,
    /// The kernel's own statistics of our programs, one pass after the
    /// rounds (`None`: not taken, and why).
    kernel: Result<Vec<KernelRow>, String>,
}

/// What our programs cost in the kernel during one sample, from the
/// kernel's per-program statistics (`kernel.bpf_stats_enabled`).
struct KernelRow {
    config: Config,
    workload: Workload,
    calls: u32,
    /// (program, runs per call, ns per run) of each program that ran.
    programs: Vec<(String, f64, f64)>,
}

impl KernelRow {
    fn ns_per_call(&self) -> f64 {
        self.programs.iter().map(|(_, runs, ns)| runs * ns).sum()
    }
}

struct Row {
    config: Config,
    workload: Workload,
    /// Median ns per call, CPU time.
    median_ns: f64,
    /// Per-round ratios to the round's baseline, CPU time.
    ratios: Vec<f64>,
    /// The same for wall time.
    wall_ns: f64,
    wall_ratios: Vec<f64>,
}

impl SideBySide {
    fn series(&self, c: Config, w: Workload, m: Metric) -> (Vec<f64>, Vec<f64>) {
        let pairs: Vec<(f64, f64)> = self
            .rounds
            .iter()
            .filter_map(|r| {
                let b = r.baseline(w, m)?;
                let x = if c == Config::None { b } else { r.of(c, w, m)? };
                Some((x, b))
            })
            .collect();
        (
            pairs.iter().map(|p| p.0).collect(),
            pairs.iter().map(|(x, b)| x / b).collect(),
        )
    }

    fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        for w in Workload::ALL {
            for c in [Config::None].into_iter().chain(Config::MEASURED) {
                let (ns, ratios) = self.series(c, w, Metric::Cpu);
                let (wall, wall_ratios) = self.series(c, w, Metric::Wall);
                if ns.is_empty() {
                    continue;
                }
                rows.push(Row {
                    config: c,
                    workload: w,
                    median_ns: median(&ns),
                    ratios,
                    wall_ns: median(&wall),
                    wall_ratios,
                });
            }
        }
        rows
    }

    pub(crate) fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nside by side, one run: {} rounds, the probe's CPU ns per call, ratio = median over \
             rounds of (sample / the round's baseline) (tcp {} / udp {} / unix {} calls per \
             sample){}",
            self.rounds.len(),
            self.calls.tcp,
            self.calls.udp,
            self.calls.unix,
            if self.pinned {
                ", probe pinned to CPU 0"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "{:<20} {:<42} {:>9} {:>9} {:>18} {:>9} {:>9} {:>15}",
            "workload", "configuration", "CPU ns", "ratio", "p25..p75", "wall ns", "wall", "target"
        );
        for r in self.rows() {
            let ratio = median(&r.ratios);
            let spread = format!(
                "x{:.3}..x{:.3}",
                percentile(&r.ratios, 25.0),
                percentile(&r.ratios, 75.0)
            );
            let target = match r.config.target(r.workload) {
                Some(t) if ratio <= t => format!("<= x{t} met"),
                Some(t) => format!("<= x{t} MISSED"),
                None => "-".into(),
            };
            let _ = writeln!(
                s,
                "{:<20} {:<42} {:>9.0} {:>9} {:>18} {:>9.0} {:>9} {:>15}",
                r.workload.name(),
                r.config.name(),
                r.median_ns,
                format!("x{ratio:.3}"),
                if r.config == Config::None {
                    "-".into()
                } else {
                    spread
                },
                r.wall_ns,
                format!("x{:.3}", median(&r.wall_ratios)),
                target
            );
        }
        for (c, why) in &self.skipped {
            let _ = writeln!(s, "not measured: {}: {why}", c.name());
        }
        let _ = writeln!(
            s,
            "events lost by the daemon over the part: {} (must be 0)",
            self.lost
        );
        match &self.kernel {
            Ok(rows) => {
                let _ = writeln!(
                    s,
                    "\nin-kernel cost of our programs per call (bpf_stats, one extra pass; runs x \
                     ns per run)"
                );
                for r in rows {
                    let parts: Vec<String> = r
                        .programs
                        .iter()
                        .map(|(p, runs, ns)| format!("{p} {runs:.2} x {ns:.0} ns"))
                        .collect();
                    let _ = writeln!(
                        s,
                        "{:<20} {:<42} {:>7.0} ns/call  {}",
                        r.workload.name(),
                        r.config.name(),
                        r.ns_per_call(),
                        parts.join(", ")
                    );
                }
            }
            Err(why) => {
                let _ = writeln!(s, "in-kernel cost: not measured: {why}");
            }
        }
        s
    }

    pub(crate) fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows()
            .iter()
            .map(|r| {
                json!({
                    "workload": r.workload.key(),
                    "config": r.config.key(),
                    "median_cpu_ns": r.median_ns,
                    "median_ratio": median(&r.ratios),
                    "median_wall_ns": r.wall_ns,
                    "median_wall_ratio": median(&r.wall_ratios),
                    "wall_ratios": r.wall_ratios,
                    "p25_ratio": percentile(&r.ratios, 25.0),
                    "p75_ratio": percentile(&r.ratios, 75.0),
                    "ratios": r.ratios,
                    "target": r.config.target(r.workload),
                })
            })
            .collect();
        json!({
            "rounds": self.rounds.len(),
            "calls": { "tcp": self.calls.tcp, "udp": self.calls.udp, "unix": self.calls.unix },
            "rows": rows,
            "skipped": self.skipped.iter().map(|(c, why)| json!({"config": c.key(), "why": why})).collect::<Vec<_>>(),
            "events_lost": self.lost,
            "pinned": self.pinned,
            "kernel_cost": match &self.kernel {
                Ok(rows) => Value::Array(rows.iter().map(|r| json!({
                    "workload": r.workload.key(),
                    "config": r.config.key(),
                    "calls": r.calls,
                    "ns_per_call": r.ns_per_call(),
                    "programs": r.programs.iter().map(|(p, runs, ns)| json!({
                        "program": p, "runs_per_call": runs, "ns_per_run": ns,
                    })).collect::<Vec<_>>(),
                })).collect()),
                Err(why) => json!({ "skipped": why }),
            },
        })
    }
}

/// The servers the probe calls: a TCP listener, a UDP socket drained by a
/// thread, a Unix listener.
struct Targets {
    tcp: SocketAddr,
    udp: SocketAddr,
    unix: PathBuf,
}

impl Targets {
    fn start(dir: &Path, cpu: Option<usize>) -> Result<Self> {
        let tcp = Listener::start(cpu)?.addr;
        let udp_socket =
            UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a UDP socket")?;
        let udp = udp_socket.local_addr().context("UDP address")?;
        let unix = dir.join("tool.sock");
        let unix_listener = UnixListener::bind(&unix)
            .with_context(|| format!("binding the Unix socket {}", unix.display()))?;
        std::thread::Builder::new()
            .name("bench-udp-drain".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = pin_current_thread(cpu);
                }
                let mut buf = [0u8; 2048];
                while udp_socket.recv_from(&mut buf).is_ok() {}
            })
            .context("starting the UDP drain thread")?;
        std::thread::Builder::new()
            .name("bench-unix-accept".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = pin_current_thread(cpu);
                }
                for conn in unix_listener.incoming() {
                    drop(conn);
                }
            })
            .context("starting the Unix accept thread")?;
        Ok(Self { tcp, udp, unix })
    }

    fn args(&self, w: Workload, n: u32) -> Vec<String> {
        let n = n.to_string();
        match w {
            Workload::Tcp => vec![
                "bench-tcp-rst".into(),
                self.tcp.ip().to_string(),
                self.tcp.port().to_string(),
                n,
            ],
            Workload::Udp => vec![
                "bench-sendto".into(),
                self.udp.ip().to_string(),
                self.udp.port().to_string(),
                n,
            ],
            Workload::Unix => vec!["bench-unix".into(), self.unix.display().to_string(), n],
        }
    }
}

/// The policy: agent `bench/a` holds the three targets plus ENTRIES
/// 10.x.y.z/32 entries (map keys only; nothing is sent to them).
fn policy(t: &Targets) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# generated by `cargo xtask bench` (part 7, cost)");
    let _ = writeln!(s, "default_mode = \"enforce\"\n");
    let _ = writeln!(s, "[[tenant]]\nname = \"{TENANT}\"\n");
    let _ = writeln!(
        s,
        "[[tool]]\nname = \"targets\"\nendpoints = [\n  {{ cidr = \"127.0.0.1/32\", port = {} }},\n  \
         {{ cidr = \"127.0.0.1/32\", port = {}, proto = \"udp\" }},\n  {{ unix = \"{}\" }},\n]\n",
        t.tcp.port(),
        t.udp.port(),
        t.unix.display()
    );
    let mut tools = vec!["targets".to_owned()];
    tools.extend(endpoint_tools(&mut s, ENTRIES));
    let list: Vec<String> = tools.iter().map(|t| format!("\"{t}\"")).collect();
    let _ = writeln!(
        s,
        "[[agent]]\ntenant = \"{TENANT}\"\nname = \"{AGENT}\"\ntools = [{}]",
        list.join(", ")
    );
    s
}

/// An nftables table with the same allowlist; deleted on drop.
struct NftTable {
    name: String,
}

impl NftTable {
    fn load(dir: &Path, t: &Targets) -> Result<Self> {
        let name = format!("agbench{}", std::process::id());
        let mut s = String::new();
        let _ = writeln!(s, "table inet {name} {{");
        let _ = writeln!(
            s,
            "  set allow {{\n    type ipv4_addr . inet_proto . inet_service\n    size 65536\n    elements = {{"
        );
        let _ = writeln!(s, "      127.0.0.1 . tcp . {},", t.tcp.port());
        let _ = writeln!(s, "      127.0.0.1 . udp . {},", t.udp.port());
        for k in 0..ENTRIES {
            let [_, x, y, z] = k.to_be_bytes();
            let _ = writeln!(s, "      10.{x}.{y}.{z} . tcp . {},", super::entry_port(k));
        }
        let _ = writeln!(s, "    }}\n  }}");
        let _ = writeln!(
            s,
            "  chain out {{\n    type filter hook output priority 0; policy accept;\n    \
             ip daddr . meta l4proto . th dport @allow counter accept\n  }}\n}}"
        );
        let file = dir.join("nft.conf");
        std::fs::write(&file, s).with_context(|| format!("writing {}", file.display()))?;
        let mut cmd = Command::new("nft");
        cmd.arg("-f").arg(&file);
        run_output(&mut cmd)?;
        Ok(Self { name })
    }

    /// Packets the set matched so far.
    fn matched(&self) -> Result<u64> {
        let mut cmd = Command::new("nft");
        cmd.args(["list", "chain", "inet", &self.name, "out"]);
        let out = run_output(&mut cmd)?;
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no counter in `{}`: {out}", describe(&cmd)))
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether nft is there (installed from Debian's package when missing).
fn nft_ready() -> Result<(), String> {
    if find_in_path("nft").is_some() {
        return Ok(());
    }
    eprintln!("bench: part 7: nft is missing; installing Debian's nftables package");
    crate::apt_get(&["install", "-y", "-q", "nftables"]).map_err(|e| format!("{e:#}"))?;
    find_in_path("nft")
        .map(drop)
        .ok_or_else(|| "nft still missing after installing nftables".into())
}

/// Whether this daemon build has `--flow-records`.
fn flow_supported(built: &Built) -> bool {
    Command::new(&built.daemon)
        .args(["daemon", "--help"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--flow-records"))
}

struct Runner<'a> {
    built: &'a Built,
    targets: Targets,
    calls: Calls,
    cpu: Option<usize>,
}

impl Runner<'_> {
    /// One probe loop: wall and CPU ns per call.
    fn sample(&self, w: Workload, tagged: Option<&Path>) -> Result<[f64; 2]> {
        let mut cmd = match tagged {
            Some(socket) => tagged_probe(self.built, socket, TENANT, AGENT),
            None => Command::new(&self.built.probe),
        };
        cmd.args(self.targets.args(w, self.calls.of(w)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cpu) = self.cpu {
            pin_command(&mut cmd, cpu);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        let output = child.wait_with_output().context("waiting for the probe")?;
        let ns: Vec<f64> = out
            .split_whitespace()
            .filter_map(|w| w.parse::<f64>().ok())
            .collect();
        match (output.status.code(), ns.as_slice()) {
            (Some(0), &[wall, cpu]) if wall > 0.0 && cpu > 0.0 && wall.is_finite() => {
                Ok([wall, cpu])
            }
            (code, _) => bail!(
                "probe {} ({}) failed with exit {code:?}: {} {}",
                w.key(),
                if tagged.is_some() {
                    "tagged"
                } else {
                    "untagged"
                },
                out.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        }
    }

    fn all(&self, round: &mut Round, c: Config, tagged: Option<&Path>) -> Result<()> {
        for w in Workload::ALL {
            if c == Config::Nft && w == Workload::Unix {
                continue;
            }
            let ns = self.sample(w, tagged)?;
            round.samples.push((c, w, ns));
        }
        Ok(())
    }

    /// The fence is in the way: a tagged connect to 127.0.0.1:9 (not in the
    /// policy) is refused.
    fn sanity(&self, socket: &Path) -> Result<()> {
        let mut cmd = tagged_probe(self.built, socket, TENANT, AGENT);
        cmd.args(["tcp", "127.0.0.1", "9"]);
        let status = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
        if status.code() != Some(PROBE_EPERM) {
            bail!("sanity check: a tagged connect to 127.0.0.1:9 was not refused ({status})");
        }
        Ok(())
    }
}

/// Starts the daemon with its state in the guard's directory, in flow mode
/// (`--flow-records`) or per call.
fn start_daemon(runner: &Runner, guard: &mut Guard, flow: bool) -> Result<()> {
    guard.extra_args.clear();
    guard.extra_args.push("--state-dir".into());
    guard.extra_args.push(guard.dir.join("state").into());
    if flow {
        guard.extra_args.push("--flow-records".into());
    }
    guard.start_daemon(&runner.built.daemon)
}

/// Starts the daemon (per-call or flow mode), runs `configs`, stops it;
/// returns the events it lost.
fn with_daemon(
    runner: &Runner,
    guard: &mut Guard,
    flow: bool,
    configs: &[Config],
    round: &mut Round,
) -> Result<u64> {
    start_daemon(runner, guard, flow)?;
    runner.sanity(&guard.socket)?;
    for &c in configs {
        let tagged = matches!(c, Config::Tagged | Config::Flow).then_some(guard.socket.as_path());
        runner.all(round, c, tagged)?;
    }
    let status = daemon_status(&runner.built.daemon, &guard.socket)?;
    let lost = events_lost(&status);
    guard.stop_daemon()?;
    Ok(lost)
}

/// `kernel.bpf_stats_enabled` on for the guard's life, then back to what
/// it was.
struct BpfStats {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self> {
        let before = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_owned();
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing 1 to {BPF_STATS}"))?;
        Ok(Self { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.before);
    }
}

/// program -> (run count, run time ns), from `status --json`.
fn program_stats(status: &Value) -> std::collections::BTreeMap<String, (u64, u64)> {
    status["program_stats"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(name, v)| {
                    (
                        name.clone(),
                        (
                            v["run_count"].as_u64().unwrap_or(0),
                            v["run_time_ns"].as_u64().unwrap_or(0),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One pass with the kernel's statistics on: per configuration of the
/// daemon (`flow` or per call) and workload, one sample, and what each of
/// our programs ran meanwhile.
fn kernel_pass(runner: &Runner, guard: &mut Guard, flow: bool) -> Result<Vec<KernelRow>> {
    start_daemon(runner, guard, flow)?;
    let configs: &[Config] = if flow {
        &[Config::Flow]
    } else {
        &[Config::Untagged, Config::Tagged]
    };
    let mut rows = Vec::new();
    for &c in configs {
        let tagged = matches!(c, Config::Tagged | Config::Flow).then_some(guard.socket.as_path());
        for w in Workload::ALL {
            let before = program_stats(&daemon_status(&runner.built.daemon, &guard.socket)?);
            runner.sample(w, tagged)?;
            let after = program_stats(&daemon_status(&runner.built.daemon, &guard.socket)?);
            let calls = runner.calls.of(w);
            let programs = after
                .iter()
                .filter_map(|(name, &(count, ns))| {
                    let (c0, t0) = before.get(name).copied().unwrap_or((0, 0));
                    let runs = count.saturating_sub(c0);
                    // Programs that ran for fewer than 1 in 20 calls are
                    // other processes' (and the daemon's own) calls.
                    (runs * 20 >= u64::from(calls)).then(|| {
                        (
                            name.clone(),
                            runs as f64 / f64::from(calls),
                            ns.saturating_sub(t0) as f64 / runs as f64,
                        )
                    })
                })
                .collect();
            rows.push(KernelRow {
                config: c,
                workload: w,
                calls,
                programs,
            });
        }
    }
    guard.stop_daemon()?;
    Ok(rows)
}

pub(crate) fn side_by_side(
    built: &Built,
    cgroup2: &Path,
    pin: &Pinning,
    rounds: u32,
    calls: Calls,
) -> Result<SideBySide> {
    eprintln!(
        "bench: part 7: cost per call side by side (none, nftables, untagged, tagged, tagged \
         --flow-records), {rounds} rounds"
    );
    let mut guard = Guard::create(cgroup2, "-cost")?;
    let targets = Targets::start(&guard.dir, pin.listener_cpu)?;
    std::fs::write(&guard.policy, policy(&targets))
        .with_context(|| format!("writing {}", guard.policy.display()))?;
    let mut skipped = Vec::new();
    let nft = match nft_ready() {
        Ok(()) => true,
        Err(why) => {
            skipped.push((Config::Nft, why));
            false
        }
    };
    let flow = flow_supported(built);
    if !flow {
        skipped.push((
            Config::Flow,
            "this agent-guard daemon has no --flow-records flag".into(),
        ));
    }
    let runner = Runner {
        built,
        targets,
        calls,
        cpu: pin.probe_cpu,
    };
    let mut lost = 0;
    let mut out = Vec::new();
    for i in 0..rounds {
        let mut round = Round::default();
        runner.all(&mut round, Config::None, None)?;
        let forward = i % 2 == 0;
        let mut steps: Vec<u8> = vec![0, 1, 2];
        if !forward {
            steps.reverse();
        }
        for step in steps {
            match step {
                0 if nft => {
                    let table = NftTable::load(&guard.dir, &runner.targets)?;
                    runner.all(&mut round, Config::Nft, None)?;
                    if table.matched()? == 0 {
                        bail!("sanity check: the nftables set matched no packet");
                    }
                }
                1 => {
                    let order = if forward {
                        [Config::Untagged, Config::Tagged]
                    } else {
                        [Config::Tagged, Config::Untagged]
                    };
                    lost += with_daemon(&runner, &mut guard, false, &order, &mut round)?;
                }
                2 if flow => {
                    lost += with_daemon(&runner, &mut guard, true, &[Config::Flow], &mut round)?;
                }
                _ => {}
            }
        }
        runner.all(&mut round, Config::None, None)?;
        eprintln!(
            "bench: part 7: round {}/{rounds}: tcp tagged x{:.3}, udp tagged x{:.3}",
            i + 1,
            ratio(&round, Config::Tagged, Workload::Tcp),
            ratio(&round, Config::Tagged, Workload::Udp),
        );
        out.push(round);
    }
    // The kernel's own statistics cost two clock reads per program run, so
    // they are taken in a pass of their own, after the timed rounds.
    let kernel = match BpfStats::enable() {
        Ok(_on) => {
            let mut rows = kernel_pass(&runner, &mut guard, false)?;
            if flow {
                rows.extend(kernel_pass(&runner, &mut guard, true)?);
            }
            Ok(rows)
        }
        Err(e) => Err(format!("{e:#}")),
    };
    Ok(SideBySide {
        rounds: out,
        calls,
        skipped,
        lost,
        pinned: pin.probe_cpu.is_some(),
        kernel,
    })
}

fn ratio(r: &Round, c: Config, w: Workload) -> f64 {
    match (r.of(c, w, Metric::Cpu), r.baseline(w, Metric::Cpu)) {
        (Some(x), Some(b)) => x / b,
        _ => f64::NAN,
    }
}
