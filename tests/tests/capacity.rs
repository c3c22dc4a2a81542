//! Real-kernel tests of full maps: with a map sized small
//! (`daemon --map-capacity MAP=N`), whatever would need one more entry (a
//! grant, a task scope, a larger policy) is refused with an error naming
//! the map, nothing half-made stays behind, and agents already running keep
//! exactly what they had. Metrics show entries and capacity per map.

use agent_guard_tests::{Daemon, Endpoint, Listener, Policy, kernel_test, probe};

fn tools(ports: &[u16]) -> Policy {
    let mut p = Policy::new().mode("enforce").tenant("acme");
    for (i, port) in ports.iter().enumerate() {
        p = p.tool(&format!("t{i}"), [Endpoint::tcp("127.0.0.1/32", *port)]);
    }
    p
}

fn call(d: &Daemon, port: u16) -> i32 {
    d.probe(
        "acme",
        "researcher",
        &["tcp", "127.0.0.1", &port.to_string()],
    )
}

#[test]
fn a_full_grants_map_refuses_the_next_grant_and_keeps_the_others() {
    if !kernel_test("a_full_grants_map_refuses_the_next_grant_and_keeps_the_others") {
        return;
    }
    let ls: Vec<Listener> = (0..6).map(|_| Listener::tcp("127.0.0.1")).collect();
    let ports: Vec<u16> = ls.iter().map(|l| l.port).collect();
    let policy = tools(&ports).agent("acme", "researcher", &["t0"]).build();
    let d = Daemon::start_with(&policy, &["--map-capacity", "GRANTS=4"]);
    for t in ["t1", "t2", "t3", "t4"] {
        d.grant("acme", "researcher", &["--tool", t, "--ttl", "5m"]);
    }
    let out = d.try_grant("acme", "researcher", &["--tool", "t5", "--ttl", "5m"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kernel map GRANTS is full (4 entries)") && err.contains("--map-capacity"),
        "{err}"
    );
    let s = d.status();
    assert_eq!(s["grants"].as_array().map(Vec::len), Some(4), "{s:#}");
    assert_eq!(s["grant_disagreements"], serde_json::json!([]));
    assert_eq!(
        call(&d, ports[5]),
        probe::EPERM,
        "the refused grant opened nothing"
    );
    assert_eq!(
        call(&d, ports[1]),
        probe::OK,
        "an earlier grant still holds"
    );
    assert_eq!(call(&d, ports[0]), probe::OK, "the base tool too");
    let m = d.metrics();
    assert!(
        m.contains("agent_guard_map_capacity{map=\"GRANTS\"} 4"),
        "{m}"
    );
    assert!(
        m.contains("agent_guard_map_entries{map=\"GRANTS\"} 4"),
        "{m}"
    );
    let recs = d.wait_audit("acme", "the refused grant's record", |r| {
        r.iter()
            .any(|x| x["kind"] == "control" && x["op"] == "grant" && x["verdict"] == "deny")
    });
    let refused = recs
        .iter()
        .find(|x| x["kind"] == "control" && x["verdict"] == "deny")
        .expect("control record");
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|t| t.contains("GRANTS is full")),
        "{refused}"
    );
}

#[test]
fn a_full_subjects_map_refuses_a_new_task_scope_and_keeps_running_agents() {
    if !kernel_test("a_full_subjects_map_refuses_a_new_task_scope_and_keeps_running_agents") {
        return;
    }
    let l = Listener::tcp("127.0.0.1");
    let policy = tools(&[l.port])
        .agent("acme", "researcher", &["t0"])
        .build();
    // One root agent + two task scopes fill it.
    let d = Daemon::start_with(&policy, &["--map-capacity", "SUBJECTS=3"]);
    let port = l.port.to_string();
    let running: Vec<_> = (0..2)
        .map(|i| {
            d.launch("acme", "researcher")
                .task(&format!("job {i}"))
                .spawn_probe(&["after", "2500", "tcp", "127.0.0.1", &port])
        })
        .collect();
    d.wait_status("two task scopes", 10, |s| {
        s["agents"].as_array().is_some_and(|a| a.len() == 3)
    });
    let out =
        d.launch("acme", "researcher")
            .task("one too many")
            .probe(&["tcp", "127.0.0.1", &port]);
    assert_eq!(out.status.code(), Some(125), "nothing started");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kernel map SUBJECTS is full (3 entries)"),
        "{err}"
    );
    assert_eq!(
        d.status()["agents"].as_array().map(Vec::len),
        Some(3),
        "no half-made subject"
    );
    for mut c in running {
        assert_eq!(
            c.wait().expect("wait").code(),
            Some(probe::OK),
            "running scopes keep their tools"
        );
    }
    assert_eq!(
        call(&d, l.port),
        probe::OK,
        "the root agent launches as before"
    );
}

#[test]
fn a_policy_that_does_not_fit_caps_is_refused_and_the_old_one_kept() {
    if !kernel_test("a_policy_that_does_not_fit_caps_is_refused_and_the_old_one_kept") {
        return;
    }
    let ls: Vec<Listener> = (0..8).map(|_| Listener::tcp("127.0.0.1")).collect();
    let ports: Vec<u16> = ls.iter().map(|l| l.port).collect();
    let small = tools(&ports)
        .agent("acme", "researcher", &["t0", "t1"])
        .build();
    // During a reload both generations are in CAPS: 2 + 7 > 8.
    let d = Daemon::start_with(&small, &["--map-capacity", "CAPS=8"]);
    let names: Vec<String> = (0..7).map(|i| format!("t{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let big = tools(&ports).agent("acme", "researcher", &refs).build();
    // Not the watched file: only `policy apply` tries it.
    let file = d.dir.path().join("big.toml");
    std::fs::write(&file, &big).expect("policy");
    let out = d.cli(&["policy", "apply", file.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAPS is full"), "{err}");
    assert_eq!(call(&d, ports[1]), probe::OK, "the old policy holds");
    assert_eq!(
        call(&d, ports[5]),
        probe::EPERM,
        "nothing of the refused one"
    );
    let m = d.metrics();
    assert!(
        m.contains("agent_guard_map_entries{map=\"CAPS\"} 2"),
        "no leftovers: {m}"
    );
    assert!(
        m.contains("agent_guard_policy_reloads_total{result=\"error\"} 1"),
        "{m}"
    );
}

/// Found by the soak: every task scope ever started stayed in the daemon's
/// memory after retirement. Retired identities are now forgotten after six
/// idle ages, so the daemon's state is bounded by live work.
#[test]
fn retired_task_scopes_do_not_pile_up_in_the_daemon() {
    if !kernel_test("retired_task_scopes_do_not_pile_up_in_the_daemon") {
        return;
    }
    let l = Listener::tcp("127.0.0.1");
    let policy = tools(&[l.port])
        .agent("acme", "researcher", &["t0"])
        .build();
    let d = Daemon::start_with(&policy, &["--idle-subject-age", "1s"]);
    let roots = d.status()["subjects_known"]
        .as_u64()
        .expect("subjects_known");
    for i in 0..5 {
        let out = d
            .launch("acme", "researcher")
            .task(&format!("job {i}"))
            .probe(&["tcp", "127.0.0.1", &l.port.to_string()]);
        assert_eq!(out.status.code(), Some(probe::OK));
    }
    let grew = d.status()["subjects_known"]
        .as_u64()
        .expect("subjects_known");
    assert_eq!(grew, roots + 5, "each launch made a scope");
    d.wait_status("retired scopes forgotten", 30, |s| {
        s["subjects_known"].as_u64() == Some(roots)
    });
}

/// Unix socket listeners in a private directory, one per name.
fn unix_sockets(names: &[&str]) -> (tempfile::TempDir, Vec<std::os::unix::net::UnixListener>) {
    let dir = tempfile::Builder::new()
        .prefix("agent-guard-capacity-")
        .tempdir()
        .expect("tempdir");
    let held = names
        .iter()
        .map(|n| std::os::unix::net::UnixListener::bind(dir.path().join(n)).expect("bind"))
        .collect();
    (dir, held)
}

#[test]
fn a_policy_with_a_unix_path_that_does_not_fit_is_refused_and_the_old_one_kept() {
    if !kernel_test("a_policy_with_a_unix_path_that_does_not_fit_is_refused_and_the_old_one_kept") {
        return;
    }
    let (dir, _held) = unix_sockets(&["a.sock", "b.sock"]);
    let path = |n: &str| dir.path().join(n).to_str().expect("utf-8").to_string();
    let (a, b) = (path("a.sock"), path("b.sock"));
    let old = Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tool("a", [Endpoint::unix(&a)])
        .agent("acme", "researcher", &["a"])
        .build();
    // The daemon's control socket takes one entry, the policy's path the
    // other.
    let d = Daemon::start_with(&old, &["--map-capacity", "UNIX_PATHS=2"]);
    let m = d.metrics();
    assert!(
        m.contains("agent_guard_map_entries{map=\"UNIX_PATHS\"} 2"),
        "full before the reload: {m}"
    );
    // Started now, calls after the refused reload.
    let running = d
        .launch("acme", "researcher")
        .spawn_probe(&["after", "2500", "unix", &a]);
    let new = Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tool("a", [Endpoint::unix(&a)])
        .tool("b", [Endpoint::unix(&b)])
        .agent("acme", "researcher", &["a", "b"])
        .build();
    let file = d.dir.path().join("new.toml");
    std::fs::write(&file, &new).expect("policy");
    let out = d.cli(&["policy", "apply", file.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kernel map UNIX_PATHS is full (2 entries)")
            && err.contains("--map-capacity UNIX_PATHS=N"),
        "{err}"
    );
    assert_eq!(
        d.probe("acme", "researcher", &["unix", &a]),
        probe::OK,
        "the old policy holds"
    );
    assert_eq!(
        d.probe("acme", "researcher", &["unix", &b]),
        probe::EPERM,
        "nothing of the refused one"
    );
    let mut running = running;
    assert_eq!(
        running.wait().expect("wait").code(),
        Some(probe::OK),
        "a running agent keeps its socket"
    );
    let m = d.metrics();
    assert!(
        m.contains("agent_guard_map_capacity{map=\"UNIX_PATHS\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("agent_guard_map_entries{map=\"UNIX_PATHS\"} 2"),
        "no leftovers: {m}"
    );
    assert!(
        m.contains("agent_guard_policy_reloads_total{result=\"error\"} 1"),
        "{m}"
    );
}

/// A DNS server on loopback answering A queries for fixed names (TTL 300 s,
/// so nothing expires during a test), NXDOMAIN for the rest.
struct Names {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Names {
    fn serve(answers: &[(&str, std::net::Ipv4Addr)]) -> Names {
        use std::sync::atomic::Ordering;
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind dns");
        sock.set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .expect("timeout");
        let port = sock.local_addr().expect("addr").port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, answers) = (
            stop.clone(),
            answers
                .iter()
                .map(|(n, a)| (n.to_string(), *a))
                .collect::<Vec<_>>(),
        );
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf)
                    && let Some(reply) = dns_reply(&buf[..n], &answers)
                {
                    let _ = sock.send_to(&reply, from);
                }
            }
        });
        Names { port, stop }
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The reply to one query (RFC 1035 wire format).
fn dns_reply(q: &[u8], answers: &[(String, std::net::Ipv4Addr)]) -> Option<Vec<u8>> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*q.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let name = labels.join(".");
    let found = answers.iter().find(|(n, _)| *n == name).map(|(_, a)| *a);
    let mut r = q.get(0..2)?.to_vec();
    r.extend_from_slice(&[0x84, if found.is_some() { 0x80 } else { 0x83 }]);
    r.extend_from_slice(&[0, 1, 0, u8::from(found.is_some() && qtype == 1), 0, 0, 0, 0]);
    r.extend_from_slice(q.get(12..i + 4)?);
    if let Some(ip) = found.filter(|_| qtype == 1) {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

#[test]
fn a_dns_answer_that_does_not_fit_caps_stays_closed_and_gets_servfail() {
    if !kernel_test("a_dns_answer_that_does_not_fit_caps_stays_closed_and_gets_servfail") {
        return;
    }
    let tool = Listener::tcp_dual();
    let port = tool.port.to_string();
    let (first, second) = ("first.agent-guard.test", "second.agent-guard.test");
    let dns = Names::serve(&[
        (first, std::net::Ipv4Addr::new(127, 0, 0, 2)),
        (second, std::net::Ipv4Addr::new(127, 0, 0, 3)),
    ]);
    let policy = Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tool(
            "search",
            [
                Endpoint::host(first, tool.port),
                Endpoint::host(second, tool.port),
            ],
        )
        .agent("acme", "researcher", &["search"])
        .build();
    let proxy_port = agent_guard_tests::free_port().to_string();
    // Per-agent DNS opens each answer with one CAPS entry for the agent
    // that asked; the first answer fills the map.
    let d = Daemon::start_with(
        &policy,
        &[
            "--dns-mode",
            "per-agent",
            "--dns-proxy-port",
            &proxy_port,
            "--dns-server",
            &format!("127.0.0.1:{}", dns.port),
            "--map-capacity",
            "CAPS=1",
        ],
    );
    let resolve = |name: &str| {
        d.launch("acme", "researcher")
            .probe(&["resolve", "udp", name, "127.0.0.1"])
    };
    let out = resolve(first);
    assert_eq!(out.status.code(), Some(probe::OK), "{out:?}");
    assert_eq!(
        call_host(&d, 2, &port),
        probe::OK,
        "the first answer is open"
    );
    let m = d.metrics();
    assert!(
        m.contains("agent_guard_map_entries{map=\"CAPS\"} 1"),
        "full: {m}"
    );
    // Started now, calls the first address after the refused answer.
    let running =
        d.launch("acme", "researcher")
            .spawn_probe(&["after", "2500", "tcp", "127.0.0.2", &port]);

    // Twice: the second time the answer comes from the proxy's cache and
    // must be refused all the same.
    for attempt in ["upstream", "cached"] {
        let out = resolve(second);
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(probe::OTHER), "{attempt}: {said}");
        assert!(said.contains("rcode 2"), "{attempt}: SERVFAIL, not {said}");
        assert_eq!(
            call_host(&d, 3, &port),
            probe::EPERM,
            "{attempt}: the answer that did not fit opened nothing"
        );
    }
    assert_eq!(
        call_host(&d, 2, &port),
        probe::OK,
        "the first answer stays open"
    );
    let mut running = running;
    assert_eq!(
        running.wait().expect("wait").code(),
        Some(probe::OK),
        "a running agent keeps what it had"
    );
    let st = d.status();
    assert_eq!(
        st["dns"][second]["addresses"],
        serde_json::json!([]),
        "not counted as learned: {st:#}"
    );
    let m = d.metrics();
    assert!(
        m.contains("agent_guard_map_capacity{map=\"CAPS\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("agent_guard_map_entries{map=\"CAPS\"} 1"),
        "no leftovers: {m}"
    );
    assert!(
        m.contains(
            "agent_guard_dns_queries_total{agent=\"researcher\",result=\"failed\",tenant=\"acme\"} 2"
        ),
        "{m}"
    );
    let recs = d.wait_audit("acme", "the failed answer's records", |r| {
        r.iter()
            .filter(|x| x["kind"] == "dns" && x["reason"] == "map_full")
            .count()
            == 2
    });
    let failed = recs
        .iter()
        .find(|x| x["kind"] == "dns" && x["reason"] == "map_full")
        .expect("dns record");
    assert_eq!(failed["verdict"], "deny", "{failed}");
    assert_eq!(failed["dst"], second, "{failed}");
    assert!(
        failed["detail"]
            .as_str()
            .is_some_and(|t| t.contains("SERVFAIL")
                && t.contains("kernel map CAPS is full (1 entries)")
                && t.contains("--map-capacity CAPS=N")),
        "{failed}"
    );
}

/// A tagged connect to 127.0.0.`host`:`port`.
fn call_host(d: &Daemon, host: u8, port: &str) -> i32 {
    d.probe(
        "acme",
        "researcher",
        &["tcp", &format!("127.0.0.{host}"), port],
    )
}
