//! Real-kernel tests of the control plane: policy validation, launcher
//! failures, status, metrics, and cleanup.

use std::process::Command;

use agent_guard_tests::{
    Daemon, Endpoint, Listener, Policy, agent_guard_bin, dump, kernel_test, probe,
};

/// `researcher` may use `search` (127.0.0.1, `port`).
fn policy(port: u16) -> Policy {
    Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tool("search", [Endpoint::tcp("127.0.0.1/32", port)])
        .agent("acme", "researcher", &["search"])
}

/// [`policy`] with `search` taken from the researcher.
fn without_search(port: u16) -> String {
    policy(port)
        .edit_agent("acme", "researcher", |a| a.tools(&[]))
        .build()
}

const BAD_POLICY: &str = r#"default_mode = "enforce"

[[tenant]]
name = "acme"

[[agent]]
tenant = "acme"
name = "researcher"
tools = ["serch"]
"#;

#[test]
fn policy_check_names_file_line_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, BAD_POLICY).expect("write");
    let out = Command::new(agent_guard_bin())
        .args(["policy", "check"])
        .arg(&bad)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.toml:9:"), "names file and line: {err}");
    assert!(err.contains("serch"), "names the bad value: {err}");

    let good = dir.path().join("good.toml");
    std::fs::write(&good, policy(18081).build()).expect("write");
    let out = Command::new(agent_guard_bin())
        .args(["policy", "check"])
        .arg(&good)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn daemon_refuses_to_start_with_a_bad_policy() {
    if !kernel_test("daemon_refuses_to_start_with_a_bad_policy") {
        return;
    }
    let Err(e) = Daemon::try_start(BAD_POLICY) else {
        panic!("daemon started with a bad policy");
    };
    assert!(e.contains("policy.toml:9:"), "{e}");
}

#[test]
fn bad_policy_apply_is_refused_and_the_old_policy_stays_in_force() {
    if !kernel_test("bad_policy_apply_is_refused_and_the_old_policy_stays_in_force") {
        return;
    }
    let allowed = Listener::tcp_dual();
    let d = Daemon::start(&policy(allowed.port).build());
    let bad = d.dir.path().join("bad.toml");
    std::fs::write(&bad, BAD_POLICY).expect("write");
    let out = d.cli(&["policy", "apply", bad.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:9:"));
    assert_eq!(d.status()["policy"]["generation"], 1);
    let port = allowed.port.to_string();
    assert_eq!(
        d.probe("acme", "researcher", &["tcp", "127.0.0.1", &port]),
        probe::OK
    );

    // A good policy that drops the tool takes effect for new and running
    // processes alike (same subject, next generation).
    let narrowed = without_search(allowed.port);
    let good = d.dir.path().join("narrow.toml");
    std::fs::write(&good, narrowed).expect("write");
    let out = d.cli(&["policy", "apply", good.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.status()["policy"]["generation"], 2);
    assert_eq!(
        d.probe("acme", "researcher", &["tcp", "127.0.0.1", &port]),
        probe::EPERM
    );
    let node = {
        let text =
            std::fs::read_to_string(d.audit_dir.join("_node/audit.jsonl")).expect("node log");
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
            .collect::<Vec<_>>()
    };
    let policies: Vec<_> = node.iter().filter(|r| r["kind"] == "policy").collect();
    // Two applied (each with its hash) and the refused one, audited too.
    let applied: Vec<_> = policies
        .iter()
        .filter(|r| r["policy_hash"].as_str().is_some_and(|h| h.len() == 64))
        .collect();
    let refused: Vec<_> = policies
        .iter()
        .filter(|r| r["detail"].as_str().is_some_and(|d| d.contains("refused")))
        .collect();
    assert_eq!((applied.len(), refused.len()), (2, 1), "{}", dump(&node));
    assert!(
        d.metrics()
            .contains(r#"agent_guard_policy_reloads_total{result="error"} 1"#)
    );
}

#[test]
fn run_against_a_stopped_daemon_fails_and_starts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("started");
    let out = Command::new(agent_guard_bin())
        .args([
            "run",
            "--tenant",
            "acme",
            "--agent",
            "researcher",
            "--socket",
        ])
        .arg(dir.path().join("no-daemon.sock"))
        .args(["--", "/bin/touch"])
        .arg(&marker)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the agent-guard daemon"), "{err}");
    assert!(err.contains("nothing was started"), "{err}");
    assert!(!marker.exists(), "the command must not run");
}

#[test]
fn run_with_an_unknown_tenant_or_agent_fails_and_starts_nothing() {
    if !kernel_test("run_with_an_unknown_tenant_or_agent_fails_and_starts_nothing") {
        return;
    }
    let d = Daemon::start(&policy(1).build());
    let marker = d.dir.path().join("started");
    let m = marker.to_str().expect("utf-8");
    for (tenant, agent, expect) in [
        ("globex", "researcher", "unknown tenant \"globex\""),
        ("acme", "writer", "tenant \"acme\" has no agent \"writer\""),
    ] {
        let out = d.run(tenant, agent, &["/bin/touch", m]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(err.contains(expect), "{err}");
        assert!(err.contains("acme/researcher"), "lists known agents: {err}");
        assert!(!marker.exists());
    }
}

#[test]
fn status_reports_programs_policy_agents_and_tracked_processes() {
    if !kernel_test("status_reports_programs_policy_agents_and_tracked_processes") {
        return;
    }
    let d = Daemon::start(&policy(1).build());
    // A long-running tagged process shows up as tracked.
    let mut child = d
        .launch("acme", "researcher")
        .command(&["/bin/sleep", "30"])
        .spawn()
        .expect("spawn");
    let status = d.wait_status("a tracked process", 10, |s| {
        s["tracked_processes"].as_u64() >= Some(1)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status["tracked_processes"], 1, "{status:#}");
    let programs: Vec<&str> = status["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    for p in [
        "cgroup/connect4",
        "cgroup/connect6",
        "cgroup/sendmsg4",
        "cgroup/sendmsg6",
        "cgroup/sock_create",
    ] {
        assert!(programs.contains(&p), "{p} attached: {programs:?}");
    }
    assert_eq!(status["policy"]["generation"], 1);
    let agent = &status["agents"][0];
    assert_eq!(agent["subject"], "acme/researcher");
    assert_eq!(agent["mode"], "enforce");
    assert_eq!(agent["hardening"], "strict");
    let human = d.cli(&["status"]);
    assert!(human.status.success());
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("acme/researcher") && text.contains("hardening=strict"),
        "{text}"
    );
}

#[test]
fn metrics_are_valid_prometheus_text_with_bounded_labels() {
    if !kernel_test("metrics_are_valid_prometheus_text_with_bounded_labels") {
        return;
    }
    let allowed = Listener::tcp_dual();
    let other = Listener::tcp_dual();
    let d = Daemon::start(&policy(allowed.port).build());
    assert_eq!(
        d.probe(
            "acme",
            "researcher",
            &["tcp", "127.0.0.1", &allowed.port.to_string()]
        ),
        probe::OK
    );
    assert_eq!(
        d.probe(
            "acme",
            "researcher",
            &["tcp", "127.0.0.1", &other.port.to_string()]
        ),
        probe::EPERM
    );
    d.wait_audit("acme", "two connects", |r| {
        r.iter().filter(|x| x["kind"] == "connect").count() >= 2
    });
    let body = d.metrics();
    for needle in [
        r#"agent_guard_decisions_total{agent="researcher",reason="granted",tenant="acme",tool="search",verdict="allow"} 1"#,
        r#"agent_guard_decisions_total{agent="researcher",reason="no_capability",tenant="acme",tool="none",verdict="deny"} 1"#,
        r#"agent_guard_events_total{kind="connect"} 2"#,
        r#"agent_guard_map_capacity{map="GRANTS"}"#,
        r#"agent_guard_policy_reloads_total{result="ok"} 1"#,
        r#"agent_guard_build_info{version=""#,
        r#"agent_guard_tracked_processes{tenant="acme"}"#,
    ] {
        assert!(body.contains(needle), "missing {needle} in:\n{body}");
    }
    assert!(!body.contains("127.0.0.1"), "no addresses in labels");
    // The latency histograms are fed by real records.
    for h in [
        "agent_guard_event_delivery_seconds_count",
        "agent_guard_audit_write_seconds_count",
    ] {
        let n: f64 = body
            .lines()
            .find(|l| l.starts_with(h))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(n >= 2.0, "{h} = {n}:\n{body}");
    }
    // Real Prometheus tooling must accept the exposition.
    let promtool = Command::new("promtool").arg("--version").output();
    let required = std::env::var("AGENT_GUARD_REQUIRE_KERNEL_TESTS").is_ok_and(|v| v == "1");
    match promtool {
        Ok(o) if o.status.success() => {
            let mut child = Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("promtool");
            std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), body.as_bytes())
                .expect("write");
            let out = child.wait_with_output().expect("promtool");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // promtool exits 3 for lint warnings only (e.g. naming style);
            // 1 means the text could not be parsed.
            assert_ne!(
                out.status.code(),
                Some(1),
                "promtool rejected the metrics: {text}"
            );
        }
        _ if required => panic!("promtool is missing; `cargo xtask setup` installs it"),
        _ => eprintln!("promtool not installed; skipped the promtool check"),
    }
}

#[test]
fn stopping_the_daemon_detaches_and_removes_what_it_created() {
    if !kernel_test("stopping_the_daemon_detaches_and_removes_what_it_created") {
        return;
    }
    let other = Listener::tcp_dual();
    let mut d = Daemon::start(&policy(1).build());
    assert!(d.cgroup_root.join("acme/researcher").is_dir());
    let log = d.stop();
    assert!(!d.socket.exists(), "socket removed");
    assert!(!d.cgroup_root.exists(), "cgroup root removed:\n{log}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(d.pin_dir.to_str().expect("utf-8")),
        "bpffs unmounted"
    );
    // Programs are gone: the agent-guard cgroup programs no longer judge
    // anything (a plain connect works; nothing is tagged any more either).
    assert!(std::net::TcpStream::connect(("127.0.0.1", other.port)).is_ok());
    let node = std::fs::read_to_string(d.audit_dir.join("_node/audit.jsonl")).expect("node log");
    assert!(
        node.lines()
            .last()
            .is_some_and(|l| l.contains("\"stopped\"")),
        "{node}"
    );
}

#[test]
fn ring_buffer_overflow_is_counted_and_written_as_gap_records() {
    if !kernel_test("ring_buffer_overflow_is_counted_and_written_as_gap_records") {
        return;
    }
    let other = Listener::tcp_dual();
    // A one-page ring holds about 40 records; a burst of denied connects
    // overflows it between two drains.
    let d = Daemon::start_with(&policy(1).build(), &["--ring-bytes", "4096"]);
    const ATTEMPTS: u64 = 3000;
    let code = d.probe(
        "acme",
        "researcher",
        &[
            "repeat",
            &ATTEMPTS.to_string(),
            "tcp",
            "127.0.0.1",
            &other.port.to_string(),
        ],
    );
    assert_eq!(code, probe::EPERM);
    let lost_connects = |recs: &[serde_json::Value]| -> u64 {
        recs.iter()
            .filter(|r| r["kind"] == "gap")
            .filter_map(|r| r["lost"]["connect"].as_u64())
            .sum()
    };
    // Every attempt is either audited or counted as lost: nothing vanishes.
    let recs = d.wait_audit("acme", "attempts = audited + lost", |r| {
        let audited = r.iter().filter(|x| x["kind"] == "connect").count() as u64;
        audited + lost_connects(r) == ATTEMPTS
    });
    let lost = lost_connects(&recs);
    assert!(lost > 0, "the tiny ring must overflow in this burst");
    assert_eq!(d.status()["decisions"]["deny"], ATTEMPTS);
    assert!(d.metrics().contains(&format!(
        "agent_guard_events_lost_total{{kind=\"connect\"}} {lost}"
    )));
    // The node log gets the gap too.
    let node = std::fs::read_to_string(d.audit_dir.join("_node/audit.jsonl")).expect("node log");
    assert!(node.contains("\"kind\":\"gap\""));
}

#[test]
fn the_policy_file_is_reloaded_when_it_changes_and_on_sighup() {
    if !kernel_test("the_policy_file_is_reloaded_when_it_changes_and_on_sighup") {
        return;
    }
    let allowed = Listener::tcp_dual();
    let d = Daemon::start(&policy(allowed.port).build());
    let port = allowed.port.to_string();
    assert_eq!(
        d.probe("acme", "researcher", &["tcp", "127.0.0.1", &port]),
        probe::OK
    );
    // Edit the file in place: the watcher picks it up within seconds.
    std::fs::write(&d.policy_path, without_search(allowed.port)).expect("write");
    d.wait_status("the file change to be picked up", 10, |s| {
        s["policy"]["generation"] == 2
    });
    assert_eq!(
        d.probe("acme", "researcher", &["tcp", "127.0.0.1", &port]),
        probe::EPERM
    );
    // A broken edit is refused and the last good policy stays.
    std::fs::write(&d.policy_path, "default_mode = \"enforce\"\n[[bogus]]\n").expect("write");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(d.status()["policy"]["generation"], 2);
    // SIGHUP re-reads the file.
    std::fs::write(&d.policy_path, policy(allowed.port).build()).expect("write");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("hup");
    d.wait_status("the SIGHUP reload", 10, |s| s["policy"]["generation"] == 3);
    assert_eq!(
        d.probe("acme", "researcher", &["tcp", "127.0.0.1", &port]),
        probe::OK
    );
    // One refused reload, counted once (watcher and SIGHUP do not double up).
    assert!(
        d.metrics()
            .contains(r#"agent_guard_policy_reloads_total{result="error"} 1"#),
        "{}",
        d.metrics()
    );
}

#[test]
fn doctor_reports_what_the_node_offers() {
    if !kernel_test("doctor_reports_what_the_node_offers") {
        return;
    }
    let d = Daemon::start(&policy(1).build());
    let out = d.cli(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for line in [
        "cgroup v2",
        "bpf() syscall",
        "BPF LSM",
        "cgroup/connect_unix",
        "daemon",
    ] {
        assert!(text.contains(line), "doctor mentions {line}: {text}");
    }
    assert!(
        text.contains("running at"),
        "doctor finds the daemon: {text}"
    );
}

#[test]
fn a_reload_the_kernel_cannot_hold_is_rolled_back_whole() {
    if !kernel_test("a_reload_the_kernel_cannot_hold_is_rolled_back_whole") {
        return;
    }
    let allowed = Listener::tcp_dual();
    let d = Daemon::start(&policy(allowed.port).build());
    // 600 agents x 500 endpoints = 300,000 capability entries: more than
    // the CAPS map holds (262,144), so the install fails part-way.
    let wide = (0..500).map(|i| Endpoint::tcp(format!("10.9.{}.{}/32", i / 250, i % 250), 443));
    let mut big = Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tool("wide", wide);
    for a in 0..600 {
        big = big.agent("acme", &format!("bulk{a}"), &["wide"]);
    }
    let file = d.dir.path().join("big.toml");
    std::fs::write(&file, big.build()).expect("write");
    let out = d.cli(&["policy", "apply", file.to_str().expect("utf-8")]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("current policy stays in force") && err.contains("CAPS"),
        "refused by the kernel map, not the parser: {err}"
    );
    // Everything is as before: generation, agents, entries, enforcement.
    let s = d.status();
    assert_eq!(s["policy"]["generation"], 1);
    let agents: Vec<&str> = s["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .filter_map(|a| a["subject"].as_str())
        .collect();
    assert_eq!(
        agents,
        vec!["acme/researcher"],
        "the refused policy's agents are not registrable"
    );
    assert_eq!(
        d.probe(
            "acme",
            "researcher",
            &["tcp", "127.0.0.1", &allowed.port.to_string()]
        ),
        probe::OK
    );
    let out = d.run("acme", "bulk1", &["/bin/true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        s["maps"]["GRANTS"].as_u64() == Some(0) && s["maps"]["CAPS"].as_u64() == Some(1),
        "{:#}",
        s["maps"]
    );
}
