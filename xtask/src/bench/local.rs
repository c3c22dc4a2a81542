//! `cargo xtask bench`, part 5: what the Unix socket hooks and per-agent
//! DNS cost a tagged process (issue 4's local endpoints and subject-aware
//! resolution).
//!
//! One daemon with `--dns-mode per-agent`, a Unix socket server and a DNS
//! server (UDP, on loopback) run by this process. Per round:
//! - Unix, a b b a: `bench-unix PATH N` (N stream connects to a listed
//!   socket) run untagged (a, baseline) and as a tagged agent (b);
//! - DNS, a b c c b a: `bench-resolve` (N A queries, connected UDP as glibc
//!   does) untagged straight to the DNS server (a, baseline), and as a
//!   tagged agent asking 127.0.0.1:53, which the kernel sends through the
//!   agent's proxy in the daemon: b asks a name answered with TTL 300 s,
//!   so every query is a warm cache hit (redirect, parse, policy check,
//!   cache lookup, the answer's addresses (re)learned for the agent, audit
//!   record, reply); c asks a name answered with TTL 0, which is never
//!   cached, so every query also makes the upstream round trip.
//!
//! Reported: median ns per call of each, and the median of the per-round
//! ratios b/a and c/a; the warm-cache target is b/a <= 1.3. Sanity checks
//! first: an unlisted socket gives EPERM, an unlisted name REFUSED, so the
//! fenced samples really went through the fence; and the proxy's counters
//! afterwards show that b's queries were cache hits and c's were not.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::common::{AGENT, Guard, TENANT, daemon_status, dns_reply, median, output_of};
use crate::Built;

const NAME: &str = "api.bench.agent-guard.test";
/// Answered with TTL 0: never cached, every query goes upstream.
const FRESH: &str = "fresh.bench.agent-guard.test";
/// Goal for a warm-cache query through the proxy against asking the
/// upstream directly (issue 11).
const WARM_TARGET: f64 = 1.3;

/// Results of part 5.
pub(crate) struct LocalCost {
    rounds: u32,
    unix_n: u32,
    dns_n: u32,
    /// ns per call: (baseline, fenced) per round.
    unix: Vec<(f64, f64)>,
    /// (direct, through the proxy from a warm cache) per round.
    dns: Vec<(f64, f64)>,
    /// (direct, through the proxy, not cacheable) per round.
    dns_uncached: Vec<(f64, f64)>,
    /// The proxy's counters after the rounds (`status` dns_proxy.stats).
    proxy_stats: Value,
}

fn ratio_median(pairs: &[(f64, f64)]) -> f64 {
    median(&pairs.iter().map(|(a, b)| b / a).collect::<Vec<_>>())
}

fn col(pairs: &[(f64, f64)], fenced: bool) -> f64 {
    median(
        &pairs
            .iter()
            .map(|(a, b)| if fenced { *b } else { *a })
            .collect::<Vec<_>>(),
    )
}

impl LocalCost {
    pub(crate) fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\npart 5: local endpoints and per-agent DNS ({} rounds; median of rounds)",
            self.rounds
        );
        let _ = writeln!(
            t,
            "  {:<44} {:>12} {:>12} {:>9}",
            "call", "untagged", "tagged", "b/a"
        );
        for (label, pairs) in [
            (format!("unix connect (x{})", self.unix_n), &self.unix),
            (
                format!("DNS query, warm cache (x{})", self.dns_n),
                &self.dns,
            ),
            (
                format!("DNS query, uncacheable TTL 0 (x{})", self.dns_n),
                &self.dns_uncached,
            ),
        ] {
            let _ = writeln!(
                t,
                "  {:<44} {:>9.0} ns {:>9.0} ns {:>8.2}x",
                label,
                col(pairs, false),
                col(pairs, true),
                ratio_median(pairs)
            );
        }
        let warm = ratio_median(&self.dns);
        let _ = writeln!(
            t,
            "  warm-cache DNS query vs asking the upstream directly: {warm:.2}x (target <= {WARM_TARGET}x: {})",
            if warm <= WARM_TARGET {
                "MET"
            } else {
                "NOT MET"
            }
        );
        t
    }

    pub(crate) fn json(&self) -> Value {
        let side = |pairs: &[(f64, f64)], n: u32| {
            json!({
                "calls_per_sample": n,
                "untagged_ns": pairs.iter().map(|p| p.0).collect::<Vec<_>>(),
                "tagged_ns": pairs.iter().map(|p| p.1).collect::<Vec<_>>(),
                "median_untagged_ns": col(pairs, false),
                "median_tagged_ns": col(pairs, true),
                "median_ratio": ratio_median(pairs),
            })
        };
        let warm = ratio_median(&self.dns);
        json!({
            "rounds": self.rounds,
            "unix_connect": side(&self.unix, self.unix_n),
            "dns_query": side(&self.dns, self.dns_n),
            "dns_query_uncached": side(&self.dns_uncached, self.dns_n),
            "dns_proxy_stats": self.proxy_stats,
            "target": {
                "what": "warm-cache DNS query through the proxy / the same query asked of the upstream directly",
                "max_ratio": WARM_TARGET,
                "ratio": warm,
                "met": warm <= WARM_TARGET,
            },
        })
    }
}

/// A DNS server on 127.0.0.1 answering every A query with 127.0.0.1, TTL
/// 300 s ([`FRESH`]: TTL 0); stops when dropped.
struct Upstream {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start() -> Result<Self> {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the DNS server")?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(r) = answer(&buf[..n]) {
                    let _ = sock.send_to(&r, from);
                }
            }
        });
        Ok(Self { addr, stop })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The reply to one single-question query: A 127.0.0.1 for type A.
fn answer(q: &[u8]) -> Option<Vec<u8>> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(q.get(i..i + len)?.to_ascii_lowercase());
        i += len;
    }
    let ttl: u32 = if labels.join(&b'.') == FRESH.as_bytes() {
        0
    } else {
        300
    };
    dns_reply(q, i, ttl)
}

fn policy(sock: &Path) -> String {
    format!(
        r#"[[tenant]]
name = "{TENANT}"

[[tool]]
name = "local"
endpoints = [{{ unix = "{}" }}]

[[tool]]
name = "api"
endpoints = [{{ host = "{NAME}", port = 443 }}, {{ host = "{FRESH}", port = 443 }}]

[[agent]]
tenant = "{TENANT}"
name = "{AGENT}"
tools = ["local", "api"]
"#,
        sock.display()
    )
}

/// Runs the probe with `args`, tagged (through `agent-guard run`) or not;
/// returns its exit code and stdout.
fn probe(built: &Built, guard: &Guard, tagged: bool, args: &[String]) -> Result<(i32, String)> {
    let mut cmd = if tagged {
        let mut c = Command::new(&built.daemon);
        c.args(["run", "--tenant", TENANT, "--agent", AGENT, "--socket"])
            .arg(&guard.socket)
            .arg("--")
            .arg(&built.probe);
        c
    } else {
        Command::new(&built.probe)
    };
    cmd.args(args);
    let out = output_of(&mut cmd)?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// A tagged probe resolves `name` over a connected UDP socket, expecting
/// 127.0.0.1; its exit code and stdout.
fn resolve(built: &Built, guard: &Guard, name: &str) -> Result<(i32, String)> {
    probe(
        built,
        guard,
        true,
        &[
            "resolve".into(),
            "udp-connected".into(),
            name.into(),
            "127.0.0.1".into(),
        ],
    )
}

fn per_call_ns(built: &Built, guard: &Guard, tagged: bool, args: &[String]) -> Result<f64> {
    let (code, out) = probe(built, guard, tagged, args)?;
    let ns = out
        .split_whitespace()
        .next()
        .and_then(|w| w.parse::<f64>().ok());
    match (code, ns) {
        (0, Some(ns)) if ns.is_finite() && ns > 0.0 => Ok(ns),
        _ => bail!(
            "probe {args:?} ({}) failed with exit {code}: {}",
            if tagged { "tagged" } else { "untagged" },
            out.trim()
        ),
    }
}

pub(crate) fn local_cost(
    built: &Built,
    cgroup2: &Path,
    rounds: u32,
    unix_n: u32,
    dns_n: u32,
) -> Result<LocalCost> {
    eprintln!(
        "bench: part 5: Unix connect and per-agent DNS, {rounds} rounds x (a b b a), \
         {unix_n} connects / {dns_n} queries per sample"
    );
    let mut guard = Guard::create(cgroup2, "-local")?;
    let sock = guard.dir.join("tool.sock");
    let listener = UnixListener::bind(&sock).context("binding the Unix socket server")?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let upstream = Upstream::start()?;
    // The proxy's port: free on 127.0.0.1 now, so very likely free on
    // 127.64.0.0/10 too.
    let proxy_port = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    std::fs::write(&guard.policy, policy(&sock))
        .with_context(|| format!("writing {}", guard.policy.display()))?;
    for a in [
        "--state-dir".to_string(),
        guard.dir.join("state").display().to_string(),
        "--dns-mode".into(),
        "per-agent".into(),
        "--dns-proxy-port".into(),
        proxy_port.to_string(),
        "--dns-server".into(),
        upstream.addr.to_string(),
    ] {
        guard.extra_args.push(a.into());
    }
    guard.start_daemon(&built.daemon)?;

    // Sanity: the fence is really in the way of the tagged samples.
    let other = guard.dir.join("other.sock");
    let _other = UnixListener::bind(&other).context("binding a second Unix socket")?;
    let (code, out) = probe(
        built,
        &guard,
        true,
        &["unix".into(), other.display().to_string()],
    )?;
    if code != 10 {
        bail!("sanity check: an unlisted Unix socket was not refused (exit {code}): {out}");
    }
    let (code, out) = resolve(built, &guard, "unlisted.bench.agent-guard.test")?;
    if code != 12 {
        bail!("sanity check: an unlisted name was not REFUSED (exit {code}): {out}");
    }

    let unix_args = vec![
        "bench-unix".to_string(),
        sock.display().to_string(),
        unix_n.to_string(),
    ];
    let dns_args = |to: SocketAddr, name: &str| {
        vec![
            "bench-resolve".to_string(),
            to.ip().to_string(),
            to.port().to_string(),
            name.to_string(),
            dns_n.to_string(),
        ]
    };
    let direct = dns_args(upstream.addr, NAME);
    let fenced = dns_args(SocketAddr::from((Ipv4Addr::LOCALHOST, 53)), NAME);
    let uncached = dns_args(SocketAddr::from((Ipv4Addr::LOCALHOST, 53)), FRESH);
    // Warm the cache (and the agent's learned address) once.
    let (code, out) = resolve(built, &guard, NAME)?;
    if code != 0 {
        bail!("warming the DNS cache failed (exit {code}): {out}");
    }
    let stats = |guard: &Guard| -> Result<Value> {
        let st = daemon_status(&built.daemon, &guard.socket)?;
        Ok(st["dns_proxy"]["stats"].clone())
    };
    let before = stats(&guard)?;
    let mut unix = Vec::new();
    let mut dns = Vec::new();
    let mut dns_uncached = Vec::new();
    for _ in 0..rounds {
        let a1 = per_call_ns(built, &guard, false, &unix_args)?;
        let b1 = per_call_ns(built, &guard, true, &unix_args)?;
        let b2 = per_call_ns(built, &guard, true, &unix_args)?;
        let a2 = per_call_ns(built, &guard, false, &unix_args)?;
        unix.push(((a1 + a2) / 2.0, (b1 + b2) / 2.0));
        let a1 = per_call_ns(built, &guard, false, &direct)?;
        let b1 = per_call_ns(built, &guard, true, &fenced)?;
        let c1 = per_call_ns(built, &guard, true, &uncached)?;
        let c2 = per_call_ns(built, &guard, true, &uncached)?;
        let b2 = per_call_ns(built, &guard, true, &fenced)?;
        let a2 = per_call_ns(built, &guard, false, &direct)?;
        let a = (a1 + a2) / 2.0;
        dns.push((a, (b1 + b2) / 2.0));
        dns_uncached.push((a, (c1 + c2) / 2.0));
    }
    // Every warm query hit (the 300 s TTL may run out once in a long run),
    // every uncacheable one missed.
    let after = stats(&guard)?;
    let delta = |k: &str| after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
    let queries = u64::from(rounds) * 2 * u64::from(dns_n);
    if delta("cache_hits") + 2 * u64::from(rounds) < queries || delta("cache_misses") < queries {
        bail!(
            "sanity check: expected {queries} cache hits and {queries} misses, got {} and {}",
            delta("cache_hits"),
            delta("cache_misses")
        );
    }
    guard.stop_daemon()?;
    drop(upstream);
    Ok(LocalCost {
        rounds,
        unix_n,
        dns_n,
        unix,
        dns,
        dns_uncached,
        proxy_stats: after,
    })
}
