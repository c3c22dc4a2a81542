//! Tools named by DNS: the daemon resolves them (here against a DNS server
//! this test runs on loopback), installs their addresses, follows changes,
//! and drops addresses that left the answer after the grace period.

use std::{
    net::{Ipv4Addr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use agent_guard_tests::{Agent, Daemon, Endpoint, Listener, Policy, free_port, kernel_test, probe};

/// A minimal authoritative DNS server for one name, answering A queries
/// with whatever `answer` holds (TTL 1 s unless started with another),
/// NXDOMAIN for other names.
struct DnsServer {
    port: u16,
    answer: Arc<Mutex<Vec<Ipv4Addr>>>,
    stop: Arc<AtomicBool>,
    /// Every name asked, in order.
    asked: Arc<Mutex<Vec<String>>>,
}

impl DnsServer {
    fn start(name: &str, first: Ipv4Addr) -> DnsServer {
        Self::start_with_ttl(name, first, 1)
    }

    fn start_with_ttl(name: &str, first: Ipv4Addr, ttl: u32) -> DnsServer {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind dns");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let port = sock.local_addr().expect("addr").port();
        let answer = Arc::new(Mutex::new(vec![first]));
        let stop = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        let (a, s, name) = (answer.clone(), stop.clone(), name.to_ascii_lowercase());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(q) = question_name(&buf[..n]) {
                    log.lock().expect("lock").push(q);
                }
                if let Some(reply) = respond(&buf[..n], &name, &a.lock().expect("lock"), ttl) {
                    let _ = sock.send_to(&reply, from);
                }
            }
        });
        DnsServer {
            port,
            answer,
            stop,
            asked,
        }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().expect("lock").clone()
    }

    fn set(&self, ips: &[Ipv4Addr]) {
        *self.answer.lock().expect("lock") = ips.to_vec();
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The question's name of a query, lowercased.
fn question_name(q: &[u8]) -> Option<String> {
    question(q).map(|(name, _)| name)
}

/// The question's name of a query, lowercased, and the offset just past
/// it (where qtype and qclass follow). Labels start at offset 12.
fn question(q: &[u8]) -> Option<(String, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            return Some((labels.join("."), i));
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
}

/// Builds the reply to one query (RFC 1035 wire format).
fn respond(q: &[u8], name: &str, ips: &[Ipv4Addr], ttl: u32) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    let (asked, i) = question(q)?;
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question = &q[12..i + 4];
    let matches = asked == name;
    let answers: Vec<Ipv4Addr> = if matches && qtype == 1 {
        ips.to_vec()
    } else {
        Vec::new()
    };
    let mut r = Vec::new();
    r.extend_from_slice(&q[0..2]); // id
    let rcode: u8 = if matches { 0 } else { 3 };
    r.extend_from_slice(&[0x84, 0x80 | rcode]); // QR, AA, RA
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(question);
    for ip in answers {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]); // name ptr, A, IN
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

fn policy(port: u16) -> Policy {
    Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tool("search", [Endpoint::host("search.agent-guard.test", port)])
        .agent("acme", "researcher", &["search"])
}

/// A tagged TCP connect of acme/`agent` to `ip`:`port`; the probe's exit
/// code.
fn connect(d: &Daemon, agent: &str, ip: &str, port: &str) -> i32 {
    d.probe("acme", agent, &["tcp", ip, port])
}

/// acme/`agent` asks `server`:53 for `name` over `mode` (`udp`,
/// `udp-connected` or `tcp`); the probe's exit code.
fn resolve(d: &Daemon, agent: &str, mode: &str, name: &str, server: &str) -> i32 {
    d.probe("acme", agent, &["resolve", mode, name, server])
}

/// acme/researcher's sub-agent `reader`, given `tools`, runs the probe with
/// `args`; its exit code and stderr.
fn reader(d: &Daemon, tools: &str, args: &[&str]) -> (i32, String) {
    d.sub_agent(
        "acme",
        "researcher",
        &["--agent", "reader", "--tools", tools],
        args,
    )
}

/// Polls a tagged connect until it gives `want` (up to 15 s).
fn eventually(d: &Daemon, ip: &str, port: &str, want: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if connect(d, "researcher", ip, port) == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn a_tool_named_by_dns_follows_its_answer() {
    if !kernel_test("a_tool_named_by_dns_follows_its_answer") {
        return;
    }
    let tool = Listener::tcp_dual();
    let port = tool.port.to_string();
    let dns = DnsServer::start("search.agent-guard.test", Ipv4Addr::new(127, 0, 0, 1));
    let d = Daemon::start_with(
        &policy(tool.port).build(),
        &[
            "--dns-server",
            &format!("127.0.0.1:{}", dns.port),
            "--dns-grace",
            "2s",
        ],
    );
    assert!(
        eventually(&d, "127.0.0.1", &port, probe::OK),
        "resolved address becomes reachable"
    );
    assert_eq!(connect(&d, "researcher", "127.0.0.2", &port), probe::EPERM);
    assert_eq!(
        d.status()["dns"]["search.agent-guard.test"]["addresses"][0],
        "127.0.0.1"
    );

    // The answer moves to 127.0.0.2: the new address is followed...
    dns.set(&[Ipv4Addr::new(127, 0, 0, 2)]);
    assert!(
        eventually(&d, "127.0.0.2", &port, probe::OK),
        "new address followed"
    );
    // ...and the old one is dropped once its grace has passed.
    assert!(
        eventually(&d, "127.0.0.1", &port, probe::EPERM),
        "old address removed after grace"
    );
    let node = std::fs::read_to_string(d.audit_dir.join("_node/audit.jsonl")).expect("node log");
    assert!(node.contains("\"kind\":\"dns\""), "{node}");
    assert!(
        node.contains("+127.0.0.2") && node.contains("-127.0.0.1"),
        "{node}"
    );

    // A name that stops resolving loses its addresses (fail closed).
    dns.set(&[]);
    assert!(
        eventually(&d, "127.0.0.2", &port, probe::EPERM),
        "no answer, no access"
    );
}

fn per_agent_policy(port: u16) -> String {
    policy(port)
        .agent("acme", "writer", &[])
        .with_agent(Agent::new("acme", "watcher", &[]).mode("monitor"))
        .build()
}

/// A daemon with `policy` in per-agent DNS mode whose upstream is `dns`,
/// given `extra` arguments too; also returns its proxy port.
fn per_agent_daemon(policy: &str, dns: &DnsServer, extra: &[&str]) -> (Daemon, String) {
    let proxy_port = free_port().to_string();
    let upstream = format!("127.0.0.1:{}", dns.port);
    let mut args = vec![
        "--dns-mode",
        "per-agent",
        "--dns-proxy-port",
        &proxy_port,
        "--dns-server",
        &upstream,
    ];
    args.extend_from_slice(extra);
    let d = Daemon::start_with(policy, &args);
    (d, proxy_port)
}

/// Per-agent DNS: an agent resolves only its tools' names, through the
/// daemon, and reaches exactly the addresses it was answered, alone and
/// only until the answer's TTL (+ grace) runs out.
#[test]
fn per_agent_dns_opens_only_what_the_agent_itself_resolved() {
    if !kernel_test("per_agent_dns_opens_only_what_the_agent_itself_resolved") {
        return;
    }
    let tool = Listener::tcp_dual();
    let port = tool.port.to_string();
    let name = "search.agent-guard.test";
    let dns = DnsServer::start(name, Ipv4Addr::new(127, 0, 0, 1));
    let (d, proxy_port) =
        per_agent_daemon(&per_agent_policy(tool.port), &dns, &["--dns-grace", "1s"]);
    assert_eq!(d.status()["dns_mode"], "per-agent");

    // Nothing is open before the agent asks: the daemon does not resolve
    // the name for everyone.
    assert_eq!(connect(&d, "researcher", "127.0.0.1", &port), probe::EPERM);
    // The agent believes it asks 127.0.0.1:53; the kernel sends it to its
    // own proxy address, and the reply still comes "from" 127.0.0.1:53.
    for mode in ["udp", "udp-connected", "tcp"] {
        assert_eq!(
            resolve(&d, "researcher", mode, name, "127.0.0.1"),
            probe::OK,
            "{mode}"
        );
    }
    assert_eq!(
        connect(&d, "researcher", "127.0.0.1", &port),
        probe::OK,
        "the answered address is open to the agent that asked"
    );
    let st = d.status();
    assert_eq!(
        st["dns"][name]["by_subject"]["acme/researcher"][0], "127.0.0.1",
        "{st:#}"
    );
    assert!(st["dns"][name]["by_subject"]["acme/writer"].is_null());
    // IPv6 sockets: connect() (as glibc does) is redirected to the
    // v4-mapped proxy address; an unconnected IPv6 sendto cannot be
    // (the kernel refuses a v4-mapped rewrite there), so it is refused.
    for mode in ["udp-connected", "tcp"] {
        assert_eq!(
            resolve(&d, "researcher", mode, name, "::1"),
            probe::OK,
            "{mode} over IPv6"
        );
    }
    assert_eq!(
        resolve(&d, "researcher", "udp", name, "::1"),
        probe::EPERM,
        "unconnected IPv6 sendto to port 53"
    );
    // Another agent of the same tenant without the tool: refused, and the
    // researcher's answer opens nothing for it.
    assert_eq!(
        resolve(&d, "writer", "udp", name, "127.0.0.1"),
        probe::REFUSED
    );
    assert_eq!(connect(&d, "writer", "127.0.0.1", &port), probe::EPERM);
    // Monitor mode: answered (the agent keeps working) but recorded as
    // would_deny, and nothing is opened for it.
    assert_eq!(resolve(&d, "watcher", "udp", name, "127.0.0.1"), probe::OK);
    // A name no tool names never leaves the node (no DNS tunnel).
    let secret = "c2VjcmV0.exfil.agent-guard.test";
    assert_eq!(
        resolve(&d, "researcher", "udp", secret, "127.0.0.1"),
        probe::REFUSED
    );
    let secret_lc = secret.to_ascii_lowercase();
    assert!(
        !dns.asked().contains(&secret_lc),
        "refused name reached upstream: {:?}",
        dns.asked()
    );
    // Nor can the agent talk to the proxy address of another subject.
    assert_eq!(
        resolve(&d, "researcher", "udp", name, "127.64.0.250"),
        probe::OK,
        "a DNS call to any address goes to the caller's own proxy"
    );
    // Straight to another subject's proxy address and port: the writer
    // still speaks as itself (refused), never as the researcher.
    let researcher = d.status()["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["subject"] == "acme/researcher")
        .and_then(|a| a["subject_id"].as_u64())
        .expect("researcher subject id");
    let theirs = format!("127.64.{}.{}", researcher >> 8, researcher & 0xff);
    for mode in ["udp", "tcp"] {
        assert_eq!(
            d.probe(
                "acme",
                "writer",
                &["resolve", mode, name, &theirs, &proxy_port]
            ),
            probe::REFUSED,
            "{mode} to {theirs}:{proxy_port}"
        );
    }

    // The answer's TTL is 1 s, grace 1 s: then the address closes again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = connect(&d, "researcher", "127.0.0.1", &port);
        if r == probe::EPERM {
            break;
        }
        assert!(Instant::now() < deadline, "learned address never expired");
        std::thread::sleep(Duration::from_millis(200));
    }

    let recs = d.wait_audit("acme", "dns query records", |r| {
        r.iter()
            .any(|x| x["kind"] == "dns" && x["verdict"] == "deny")
            && r.iter()
                .any(|x| x["kind"] == "dns" && x["verdict"] == "allow")
    });
    let allow = recs
        .iter()
        .find(|x| x["kind"] == "dns" && x["verdict"] == "allow")
        .expect("allow");
    assert_eq!(allow["dst"], name);
    assert_eq!(allow["tool"], "search");
    assert_eq!(allow["subject"], "acme/researcher");
    let deny = recs
        .iter()
        .find(|x| x["kind"] == "dns" && x["dst"] == secret_lc.as_str())
        .expect("refused record");
    assert_eq!(deny["reason"], "dns_refused", "{deny}");
    let watched = recs
        .iter()
        .find(|x| x["kind"] == "dns" && x["subject"] == "acme/watcher")
        .expect("monitor-mode record");
    assert_eq!(watched["verdict"], "would_deny", "{watched}");
    // The kernel records the redirected calls themselves.
    assert!(
        recs.iter()
            .any(|x| x["kind"] == "sendmsg" && x["reason"] == "dns_proxied" && x["port"] == 53),
        "redirected sendto recorded"
    );
    let m = d.metrics();
    assert!(
        m.contains(
            r#"agent_guard_dns_queries_total{agent="researcher",result="refused",tenant="acme"}"#
        ),
        "{m}"
    );
}

/// An agent without the DNS-named tool cannot resolve its name until a
/// grant gives it the tool (grants widen the resolvable names), and
/// sub-agents resolve as themselves.
#[test]
fn per_agent_dns_follows_grants() {
    if !kernel_test("per_agent_dns_follows_grants") {
        return;
    }
    let tool = Listener::tcp_dual();
    let port = tool.port.to_string();
    let name = "search.agent-guard.test";
    let dns = DnsServer::start(name, Ipv4Addr::new(127, 0, 0, 1));
    let (d, _) = per_agent_daemon(&per_agent_policy(tool.port), &dns, &["--dns-grace", "30s"]);
    assert_eq!(
        resolve(&d, "writer", "udp", name, "127.0.0.1"),
        probe::REFUSED
    );
    let out = d.cli(&[
        "grant", "--tenant", "acme", "--agent", "writer", "--tool", "search", "--ttl", "5m",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(resolve(&d, "writer", "udp", name, "127.0.0.1"), probe::OK);
    assert_eq!(connect(&d, "writer", "127.0.0.1", &port), probe::OK);
    // Sub-agents resolve as themselves: only what their narrower set
    // names, and their parent's answers open nothing for them.
    let query = ["resolve", "udp", name, "127.0.0.1"];
    assert_eq!(d.probe("acme", "researcher", &query), probe::OK);
    assert_eq!(connect(&d, "researcher", "127.0.0.1", &port), probe::OK);
    let (code, err) = reader(&d, "", &query);
    assert_eq!(code, probe::REFUSED, "sub-agent without the tool: {err}");
    // Asking outside its declared tools is divergence, like a refused call.
    d.wait_audit("acme", "divergent DNS query", |r| {
        r.iter().any(|x| {
            x["kind"] == "dns"
                && x["subject"] == "acme/researcher/reader"
                && x["divergence"] == true
        })
    });
    let (code, err) = reader(&d, "search", &["tcp", "127.0.0.1", &port]);
    assert_eq!(
        code,
        probe::EPERM,
        "parent's answer is not the child's: {err}"
    );
    let (code, err) = reader(&d, "search", &query);
    assert_eq!(code, probe::OK, "sub-agent with the tool: {err}");
    // Revoking the grant closes the learned address at once.
    assert!(d.cli(&["revoke", "--grant", &id]).status.success());
    assert_eq!(connect(&d, "writer", "127.0.0.1", &port), probe::EPERM);
    assert_eq!(
        resolve(&d, "writer", "udp", name, "127.0.0.1"),
        probe::REFUSED
    );
}

/// The proxy's answer cache holds answers, never decisions: a second agent
/// asking the same name is answered from the cache (the upstream is asked
/// once), yet the answer's address opens for that agent only when it was
/// answered to it, and an agent whose tools do not name it is still
/// refused.
#[test]
fn per_agent_dns_cache_shares_answers_not_decisions() {
    if !kernel_test("per_agent_dns_cache_shares_answers_not_decisions") {
        return;
    }
    let tool = Listener::tcp_dual();
    let port = tool.port.to_string();
    let name = "search.agent-guard.test";
    // TTL 60 s: the second agent's question comes well within it.
    let dns = DnsServer::start_with_ttl(name, Ipv4Addr::new(127, 0, 0, 1), 60);
    let (d, _) = per_agent_daemon(
        &policy(tool.port)
            .agent("acme", "analyst", &["search"])
            .agent("acme", "writer", &[])
            .build(),
        &dns,
        &["--dns-cache-entries", "100"],
    );
    let asked_upstream = || dns.asked().iter().filter(|n| *n == name).count();
    let query = ["resolve", "udp", name, "127.0.0.1"];

    // The researcher asks first: a miss, asked upstream, opened for it.
    assert_eq!(d.probe("acme", "researcher", &query), probe::OK);
    assert_eq!(asked_upstream(), 1);
    assert_eq!(connect(&d, "researcher", "127.0.0.1", &port), probe::OK);
    // The upstream's answer changes; the cache still has the first one.
    dns.set(&[Ipv4Addr::new(127, 0, 0, 2)]);

    // The analyst may resolve the name too, but has not: nothing is open
    // for it although the answer sits in the cache.
    assert_eq!(connect(&d, "analyst", "127.0.0.1", &port), probe::EPERM);
    // Its question is answered from the cache (upstream not asked) and the
    // answered address is opened for it before the reply.
    for mode in ["udp", "udp-connected", "tcp"] {
        assert_eq!(
            resolve(&d, "analyst", mode, name, "127.0.0.1"),
            probe::OK,
            "{mode}"
        );
    }
    assert_eq!(asked_upstream(), 1, "the analyst's questions hit the cache");
    assert_eq!(connect(&d, "analyst", "127.0.0.1", &port), probe::OK);
    // Only what each agent was answered: 127.0.0.2 (the upstream's new
    // answer, given to nobody) is open for neither.
    for agent in ["researcher", "analyst"] {
        assert_eq!(
            connect(&d, agent, "127.0.0.2", &port),
            probe::EPERM,
            "{agent}"
        );
    }
    // The writer's tools do not name it: refused although cached, and the
    // cached answer opened nothing for it.
    for mode in ["udp", "tcp"] {
        assert_eq!(
            resolve(&d, "writer", mode, name, "127.0.0.1"),
            probe::REFUSED,
            "{mode}"
        );
    }
    assert_eq!(connect(&d, "writer", "127.0.0.1", &port), probe::EPERM);
    assert_eq!(asked_upstream(), 1);

    let st = d.status();
    for agent in ["acme/researcher", "acme/analyst"] {
        assert_eq!(
            st["dns"][name]["by_subject"][agent][0], "127.0.0.1",
            "{agent}: {st:#}"
        );
    }
    assert!(st["dns"][name]["by_subject"]["acme/writer"].is_null());
    let stats = &st["dns_proxy"]["stats"];
    assert_eq!(stats["cache_hits"], 3, "{stats}");
    assert_eq!(stats["cache_misses"], 1, "{stats}");
    assert_eq!(stats["refused"], 2, "{stats}");
    let m = d.metrics();
    assert!(
        m.contains(r#"agent_guard_dns_cache_total{result="hit"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"agent_guard_dns_cache_total{result="miss"} 1"#),
        "{m}"
    );
    // Every query, cached or not, is its own audit record.
    let recs = d.wait_audit("acme", "the analyst's dns records", |r| {
        r.iter()
            .filter(|x| x["kind"] == "dns" && x["subject"] == "acme/analyst")
            .count()
            >= 3
    });
    assert!(recs.iter().any(|x| x["kind"] == "dns"
        && x["subject"] == "acme/writer"
        && x["reason"] == "dns_refused"));
}
