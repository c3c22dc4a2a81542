//! Real-kernel tests of the egress fence: the real eBPF programs, real
//! sockets on loopback, real tagged processes started by `agent-guard run`.

use agent_guard_tests::{
    Agent, Daemon, Endpoint, Launch, Listener, Policy, dump, kernel_test, probe, udp_sink,
};
use serde_json::Value;

/// One tenant `acme`, agent `researcher` allowed `allowed_port` on
/// 127.0.0.1 and ::1 (tcp) and `udp_port` on 127.0.0.1 (udp).
fn policy(mode: &str, allowed_port: u16, udp_port: u16) -> String {
    Policy::new()
        .mode(mode)
        .tenant("acme")
        .tool(
            "search",
            [
                Endpoint::tcp("127.0.0.1/32", allowed_port),
                Endpoint::tcp("::1/128", allowed_port),
            ],
        )
        .tool("metrics-sink", [Endpoint::udp("127.0.0.0/8", udp_port)])
        .agent("acme", "researcher", &["search", "metrics-sink"])
        // Without the launcher's hardening, so the kernel hooks alone are tested.
        .with_agent(Agent::new("acme", "lab", &["search"]).hardening("off"))
        .build()
}

/// A daemon in `mode` (`policy(mode, allowed, 1)`), with a listener on the
/// port `researcher` may reach and one on a port no tool covers.
struct Setup {
    d: Daemon,
    allowed: Listener,
    other: Listener,
    /// `allowed.port` and `other.port` as probe arguments.
    a: String,
    o: String,
}

fn setup(mode: &str) -> Setup {
    let allowed = Listener::tcp_dual();
    let other = Listener::tcp_dual();
    let d = Daemon::start(&policy(mode, allowed.port, 1));
    Setup {
        d,
        a: allowed.port.to_string(),
        o: other.port.to_string(),
        allowed,
        other,
    }
}

impl Setup {
    /// Launches as `acme/researcher`, the agent with the `search` tool.
    fn researcher(&self) -> Launch<'_> {
        self.d.launch("acme", "researcher")
    }
}

fn decisions(recs: &[Value], kind: &str) -> Vec<Value> {
    recs.iter().filter(|r| r["kind"] == kind).cloned().collect()
}

#[test]
fn allowed_endpoint_connects_and_uncovered_endpoint_gets_eperm() {
    if !kernel_test("allowed_endpoint_connects_and_uncovered_endpoint_gets_eperm") {
        return;
    }
    let s = setup("enforce");
    s.researcher().expect_probes(&[
        (&["tcp", "127.0.0.1", &s.a], probe::OK),
        (&["tcp", "127.0.0.1", &s.o], probe::EPERM),
        // The same port on another loopback address is not covered by /32.
        (&["tcp", "127.0.0.2", &s.a], probe::EPERM),
    ]);
}

#[test]
fn ipv6_and_ipv4_mapped_destinations_are_judged_like_their_address() {
    if !kernel_test("ipv6_and_ipv4_mapped_destinations_are_judged_like_their_address") {
        return;
    }
    let s = setup("enforce");
    let d = &s.d;
    s.researcher().expect_probes(&[
        (&["tcp", "::1", &s.a], probe::OK),
        (&["tcp", "::1", &s.o], probe::EPERM),
        // An AF_INET6 socket to ::ffff:127.0.0.1 is judged as 127.0.0.1.
        (&["tcp", "::ffff:127.0.0.1", &s.a], probe::OK),
        (&["tcp", "::ffff:127.0.0.1", &s.o], probe::EPERM),
    ]);
    let recs = d.wait_audit("acme", "4 connect records", |r| {
        decisions(r, "connect").len() >= 4
    });
    let mapped: Vec<_> = decisions(&recs, "connect")
        .into_iter()
        .filter(|r| r["dst"] == "127.0.0.1")
        .collect();
    assert_eq!(
        mapped.len(),
        2,
        "v4-mapped destinations are recorded as IPv4:\n{}",
        dump(&recs)
    );
}

#[test]
fn connected_and_unconnected_udp_are_fenced() {
    if !kernel_test("connected_and_unconnected_udp_are_fenced") {
        return;
    }
    let (_sink, udp_port) = udp_sink("127.0.0.1");
    let (_other, other_port) = udp_sink("127.0.0.1");
    let d = Daemon::start(&policy("enforce", 1, udp_port));
    let u = udp_port.to_string();
    let o = other_port.to_string();
    let researcher = d.launch("acme", "researcher");
    researcher.expect_probes(&[
        (&["udp-send", "127.0.0.1", &u], probe::OK),
        (&["udp-send", "127.0.0.1", &o], probe::EPERM),
        (&["udp-connect", "127.0.0.1", &u], probe::OK),
        (&["udp-connect", "127.0.0.1", &o], probe::EPERM),
    ]);
    // The udp tool does not cover tcp on the same port.
    let _tcp = std::net::TcpListener::bind(("127.0.0.1", udp_port));
    researcher.expect_probe(&["tcp", "127.0.0.1", &u], probe::EPERM);
    let recs = d.wait_audit("acme", "udp records", |r| {
        decisions(r, "sendmsg").len() >= 2
    });
    let sends = decisions(&recs, "sendmsg");
    assert!(
        sends.iter().all(|r| r["proto"] == "udp"),
        "{}",
        dump(&sends)
    );
    assert_eq!(
        sends.iter().filter(|r| r["verdict"] == "deny").count(),
        1,
        "{}",
        dump(&sends)
    );
}

#[test]
fn forked_child_thread_and_exec_are_judged_under_the_parent_identity() {
    if !kernel_test("forked_child_thread_and_exec_are_judged_under_the_parent_identity") {
        return;
    }
    let s = setup("enforce");
    let d = &s.d;
    for wrapper in ["fork", "thread", "exec"] {
        s.researcher().expect_probes(&[
            (&[wrapper, "tcp", "127.0.0.1", &s.o], probe::EPERM),
            (&[wrapper, "tcp", "127.0.0.1", &s.a], probe::OK),
        ]);
    }
    // Grandchildren too, and a shell in between.
    s.researcher().expect_probe(
        &["fork", "fork", "thread", "tcp", "127.0.0.1", &s.o],
        probe::EPERM,
    );
    let probe_path = agent_guard_tests::probe_bin();
    let script = format!("{} tcp 127.0.0.1 {}", probe_path.display(), s.o);
    let out = d.run("acme", "researcher", &["/bin/sh", "-c", &script]);
    assert_eq!(
        out.status.code(),
        Some(probe::EPERM),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let denies = |r: &[Value]| {
        decisions(r, "connect")
            .into_iter()
            .filter(|x| x["verdict"] == "deny")
            .count()
    };
    d.wait_audit("acme", "5 denied connects and fork/exec records", |r| {
        denies(r) >= 5 && !decisions(r, "fork").is_empty() && decisions(r, "exec").len() >= 8
    });
    // A late duplicate would show up here.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let recs = d.audit("acme");
    let denied: Vec<_> = decisions(&recs, "connect")
        .into_iter()
        .filter(|r| r["verdict"] == "deny")
        .collect();
    assert_eq!(denied.len(), 5, "{}", dump(&recs));
    assert!(denied.iter().all(|r| r["subject"] == "acme/researcher"));
}

#[test]
fn untagged_processes_are_not_affected() {
    if !kernel_test("untagged_processes_are_not_affected") {
        return;
    }
    let s = setup("enforce");
    let d = &s.d;
    let probe_path = agent_guard_tests::probe_bin();
    // The test process and its plain children are untagged.
    let out = std::process::Command::new(&probe_path)
        .args(["tcp", "127.0.0.1", &s.other.port.to_string()])
        .output()
        .expect("probe");
    assert_eq!(out.status.code(), Some(probe::OK));
    assert!(std::net::TcpStream::connect(("127.0.0.1", s.other.port)).is_ok());
    let (_s, p) = udp_sink("127.0.0.1");
    assert!(
        std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.send_to(b"x", ("127.0.0.1", p)))
            .is_ok()
    );
    // And they produce no records.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(decisions(&d.audit("acme"), "connect").is_empty());
}

#[test]
fn monitor_mode_allows_and_records_would_deny() {
    if !kernel_test("monitor_mode_allows_and_records_would_deny") {
        return;
    }
    let s = setup("monitor");
    let d = &s.d;
    s.researcher()
        .expect_probe(&["tcp", "127.0.0.1", &s.o], probe::OK);
    d.launch("acme", "lab").expect_probe(&["raw"], probe::OK);
    let recs = d.wait_audit("acme", "would_deny records", |r| {
        r.iter().filter(|x| x["verdict"] == "would_deny").count() >= 2
    });
    let c = decisions(&recs, "connect");
    assert_eq!(c.len(), 1, "{}", dump(&recs));
    assert_eq!(c[0]["reason"], "no_capability");
    let s = decisions(&recs, "socket");
    assert_eq!(s[0]["reason"], "raw_socket");
}

#[test]
fn each_call_produces_exactly_one_audit_record_with_identity() {
    if !kernel_test("each_call_produces_exactly_one_audit_record_with_identity") {
        return;
    }
    let s = setup("enforce");
    let d = &s.d;
    s.researcher().expect_probes(&[
        (&["repeat", "7", "tcp", "127.0.0.1", &s.a], probe::OK),
        (&["repeat", "5", "tcp", "127.0.0.1", &s.o], probe::EPERM),
    ]);
    d.wait_audit("acme", "12 connect records", |r| {
        decisions(r, "connect").len() >= 12
    });
    // Give a late duplicate the chance to show up before counting.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let recs = d.audit("acme");
    let connects = decisions(&recs, "connect");
    assert_eq!(connects.len(), 12, "{}", dump(&recs));
    let allowed_recs: Vec<_> = connects
        .iter()
        .filter(|r| r["port"] == s.allowed.port)
        .collect();
    let denied_recs: Vec<_> = connects
        .iter()
        .filter(|r| r["port"] == s.other.port)
        .collect();
    assert_eq!((allowed_recs.len(), denied_recs.len()), (7, 5));
    for r in &allowed_recs {
        assert_eq!(
            (
                r["verdict"].as_str(),
                r["reason"].as_str(),
                r["tool"].as_str()
            ),
            (Some("allow"), Some("granted"), Some("search"))
        );
    }
    for r in &denied_recs {
        assert_eq!(
            (r["verdict"].as_str(), r["reason"].as_str()),
            (Some("deny"), Some("no_capability"))
        );
        assert!(r.get("tool").is_none());
    }
    let pids: std::collections::HashSet<_> = connects.iter().map(|r| r["pid"].as_u64()).collect();
    assert_eq!(pids.len(), 2, "one probe process per run");
    for r in &connects {
        assert_eq!(r["tenant"], "acme");
        assert_eq!(r["agent"], "researcher");
        assert_eq!(r["subject"], "acme/researcher");
        assert_eq!(r["dst"], "127.0.0.1");
        assert_eq!(r["proto"], "tcp");
        assert_eq!(r["comm"], "agent-guard-pro");
        assert!(
            r["exe"]
                .as_str()
                .is_some_and(|e| e.ends_with("agent-guard-probe")),
            "{r}"
        );
        assert!(r["ppid"].as_u64().is_some(), "{r}");
        assert!(
            r["ts"]
                .as_str()
                .is_some_and(|t| t.len() == 30 && t.ends_with('Z')),
            "{r}"
        );
    }
    // seq has no holes and the chain links up.
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["seq"].as_u64(), Some(i as u64));
        if i > 0 {
            assert_eq!(r["prev"], recs[i - 1]["hash"]);
        }
    }
}

#[test]
fn raw_sockets_are_refused_for_tagged_processes() {
    if !kernel_test("raw_sockets_are_refused_for_tagged_processes") {
        return;
    }
    let d = Daemon::start(&policy("enforce", 1, 1));
    // With hardening the capability is gone before the kernel hook runs;
    // without it, cgroup/sock_create refuses.
    d.launch("acme", "researcher")
        .expect_probe(&["raw"], probe::EPERM);
    d.launch("acme", "lab").expect_probe(&["raw"], probe::EPERM);
    // Untagged root may still open one: only tagged processes are fenced.
    let out = std::process::Command::new(agent_guard_tests::probe_bin())
        .arg("raw")
        .output()
        .expect("probe");
    assert_eq!(out.status.code(), Some(probe::OK));
    let recs = d.wait_audit("acme", "socket record", |r| {
        !decisions(r, "socket").is_empty()
    });
    let s = decisions(&recs, "socket");
    assert_eq!(
        (s[0]["verdict"].as_str(), s[0]["reason"].as_str()),
        (Some("deny"), Some("raw_socket"))
    );
}

#[test]
fn exit_status_of_the_command_is_passed_through() {
    if !kernel_test("exit_status_of_the_command_is_passed_through") {
        return;
    }
    let d = Daemon::start(&policy("enforce", 1, 1));
    let out = d.run(
        "acme",
        "researcher",
        &["/bin/sh", "-c", "echo hello; echo oops >&2; exit 3"],
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("oops"));
    let out = d.run("acme", "researcher", &["/nonexistent/command"]);
    assert_eq!(out.status.code(), Some(127));
}

#[test]
fn a_socket_passed_in_from_an_untagged_process_is_judged_by_its_user() {
    if !kernel_test("a_socket_passed_in_from_an_untagged_process_is_judged_by_its_user") {
        return;
    }
    let other = Listener::tcp_dual();
    let d = Daemon::start(&policy("enforce", 1, 1));
    // Created here, untagged, without CLOEXEC so the agent inherits it.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    let code = d.probe(
        "acme",
        "researcher",
        &[
            "connect-fd",
            &fd.to_string(),
            "127.0.0.1",
            &other.port.to_string(),
        ],
    );
    unsafe { libc::close(fd) };
    assert_eq!(code, probe::EPERM);
}

#[test]
fn a_thread_exiting_does_not_untag_its_process() {
    if !kernel_test("a_thread_exiting_does_not_untag_its_process") {
        return;
    }
    let s = setup("enforce");
    let d = &s.d;
    s.researcher().expect_probes(&[
        (
            &["threads-exit-then", "tcp", "127.0.0.1", &s.o],
            probe::EPERM,
        ),
        (
            &["threads-exit-then", "fork", "tcp", "127.0.0.1", &s.o],
            probe::EPERM,
        ),
    ]);
    // Thread entries are cleaned up with their threads; the process
    // entry with its process.
    d.wait_status("no stale PROCS entries once the processes exited", 5, |s| {
        s["maps"]["PROCS"] == 0
    });
}
