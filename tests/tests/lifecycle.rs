//! The daemon's own life: a daemon that is killed leaves the fence up (its
//! links are pinned), and a new daemon with the same pin directory takes
//! over without a moment in which a tagged process is free.

use std::process::Child;

use agent_guard_tests::{Daemon, Endpoint, Listener, Policy, kernel_test, probe};

/// `researcher` may use `search`, and `other` when it is given.
fn policy(search: u16, other: Option<u16>) -> String {
    let mut p = Policy::new()
        .tenant("acme")
        .tool("search", [Endpoint::tcp("127.0.0.1/32", search)]);
    let mut tools = vec!["search"];
    if let Some(other) = other {
        p = p.tool("other", [Endpoint::tcp("127.0.0.1/32", other)]);
        tools.push("other");
    }
    p.agent("acme", "researcher", &tools).build()
}

fn code(mut c: Child) -> i32 {
    c.wait().expect("wait").code().unwrap_or(-1)
}

/// Waits until each launcher has exec'd its probe (so it was tagged and
/// its launcher is done with the daemon): the status count alone can be
/// reached while a launcher still waits for its reply.
fn wait_exec(children: &[&Child]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for c in children {
        let exe = format!("/proc/{}/exe", c.id());
        while !std::fs::read_link(&exe)
            .is_ok_and(|p| p.to_string_lossy().ends_with("agent-guard-probe"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "launcher {} never exec'd its probe",
                c.id()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[test]
fn a_killed_daemon_leaves_the_fence_up_and_a_new_one_takes_over() {
    if !kernel_test("a_killed_daemon_leaves_the_fence_up_and_a_new_one_takes_over") {
        return;
    }
    let search = Listener::tcp_dual();
    let other = Listener::tcp_dual();
    let (s, o) = (search.port.to_string(), other.port.to_string());
    let mut d = Daemon::start(&policy(search.port, None));

    // Tagged processes that call while the daemon is dead...
    let down_denied = d.spawn_probe(
        "acme",
        "researcher",
        &["after", "2000", "tcp", "127.0.0.1", &o],
    );
    let down_allowed = d.spawn_probe(
        "acme",
        "researcher",
        &["after", "2000", "tcp", "127.0.0.1", &s],
    );
    // ...and after a new daemon took over with a wider policy.
    let later_root = d.spawn_probe(
        "acme",
        "researcher",
        &["after", "10000", "tcp", "127.0.0.1", &o],
    );
    // Neither policy allows `third`: refused only if the new state still
    // knows the process as the researcher.
    let third = Listener::tcp_dual();
    let t = third.port.to_string();
    let later_denied = d.spawn_probe(
        "acme",
        "researcher",
        &["after", "10000", "tcp", "127.0.0.1", &t],
    );
    let later_task = d
        .launch("acme", "researcher")
        .task("t")
        .tools("search")
        .spawn_probe(&["after", "10000", "tcp", "127.0.0.1", &s]);
    // All five launched (tagged and exec'd) before the kill.
    wait_exec(&[
        &down_denied,
        &down_allowed,
        &later_root,
        &later_denied,
        &later_task,
    ]);

    d.kill();
    assert_eq!(
        code(down_denied),
        probe::EPERM,
        "fence held while the daemon was dead"
    );
    assert_eq!(
        code(down_allowed),
        probe::OK,
        "allowed calls still work while it is dead"
    );

    // The new daemon's policy also allows `other`: only a call judged by
    // the new state (the old programs gone) can reach it.
    std::fs::write(&d.policy_path, policy(search.port, Some(other.port))).expect("write policy");
    d.restart();
    assert_eq!(
        code(later_root),
        probe::OK,
        "the root agent's process was re-tagged under the new policy and the old programs detached:\n{}",
        d.log()
    );
    assert_eq!(
        code(later_denied),
        probe::EPERM,
        "the re-tagged root agent is still fenced by the new daemon"
    );
    assert_eq!(
        code(later_task),
        probe::OK,
        "a task scope of the old daemon is restored from its registry.json (tests/tests/restore.rs has the rest)"
    );
    let node = std::fs::read_to_string(d.audit_dir.join("_node/audit.jsonl")).expect("node log");
    assert!(
        node.contains("took over from a previous instance"),
        "{node}"
    );
    // The two calls made while no daemon ran never reached a log: the new
    // daemon counts them in a gap record (node log and tenant log).
    let acme = d.audit("acme");
    let gap = acme.iter().find(|r| r["kind"] == "gap").unwrap_or_else(|| {
        panic!(
            "no gap record in the acme log:\n{}",
            agent_guard_tests::dump(&acme)
        )
    });
    assert!(gap["lost"]["connect"].as_u64() >= Some(2), "{gap}");
    // Only the new instance's links are pinned.
    let st = d.status();
    let attached = st["programs"].as_array().map_or(0, Vec::len);
    let pinned = std::fs::read_dir(d.pin_dir.join(format!("links-{}", d.pid())))
        .expect("links dir")
        .count();
    let dirs = std::fs::read_dir(&d.pin_dir)
        .expect("pin dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("links-"))
        .count();
    assert_eq!(dirs, 1, "the old instance's link directory is gone");
    assert_eq!(pinned, attached, "{st:#}");
}

/// Stopping the daemon never sets an agent free: with tagged processes
/// still running the programs stay attached (and the next daemon takes
/// over); with none left, a stop detaches everything.
#[test]
fn a_stop_keeps_running_agents_fenced_and_otherwise_detaches_everything() {
    if !kernel_test("a_stop_keeps_running_agents_fenced_and_otherwise_detaches_everything") {
        return;
    }
    let other = Listener::tcp_dual();
    let o = other.port.to_string();
    let mut d = Daemon::start(&policy(1, None));
    let late = d.spawn_probe(
        "acme",
        "researcher",
        &["after", "2500", "tcp", "127.0.0.1", &o],
    );
    wait_exec(&[&late]);
    d.stop();
    assert_eq!(
        code(late),
        probe::EPERM,
        "still fenced after the daemon stopped"
    );
    let log = d.log();
    assert!(log.contains("leaving the programs attached"), "{log}");
    // The next daemon takes over; with no agent left, its stop detaches.
    d.restart();
    d.stop();
    let links = std::fs::read_dir(&d.pin_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("links-"))
        .count();
    assert_eq!(
        links, 0,
        "no link pin left after a stop with no agent running"
    );
}

/// A suspension is on disk before `suspend` returns: a restart (clean or
/// not) never lifts it; a damaged state file stops the daemon from
/// starting rather than forgetting it.
#[test]
fn a_suspension_survives_a_restart() {
    if !kernel_test("a_suspension_survives_a_restart") {
        return;
    }
    let search = Listener::tcp_dual();
    let s = search.port.to_string();
    let mut d = Daemon::start(&policy(search.port, None));
    d.cli_ok(&["suspend", "--tenant", "acme"]);
    d.stop();
    d.restart();
    assert_eq!(d.status()["suspended"][0], "acme");
    assert_eq!(
        d.probe("acme", "researcher", &["tcp", "127.0.0.1", &s]),
        probe::EPERM,
        "still suspended after a clean restart"
    );
    d.kill();
    d.restart();
    assert_eq!(
        d.probe("acme", "researcher", &["tcp", "127.0.0.1", &s]),
        probe::EPERM,
        "still suspended after a crash and takeover"
    );
    d.cli_ok(&["resume", "--tenant", "acme"]);
    assert_eq!(
        d.probe("acme", "researcher", &["tcp", "127.0.0.1", &s]),
        probe::OK
    );
    d.stop();
    // A damaged file: refuse to start, say which file and what to do.
    let state = d.dir.path().join("state/suspended.json");
    std::fs::write(&state, "{ not json").expect("damage the state file");
    let err = d
        .try_restart()
        .expect_err("a damaged state file must stop the start");
    assert!(err.contains("suspended.json is damaged"), "{err}");
}
