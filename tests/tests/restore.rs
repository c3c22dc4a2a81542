//! Real-kernel tests of the registry surviving a crash: task scopes,
//! sub-agents and grants (with the uses left) made before the daemon is
//! SIGKILLed are restored by the daemon that takes over, so the same calls
//! are allowed and refused exactly as before, and deadlines keep counting
//! on the kernel's clock. A damaged state file stops the start, naming it.

use std::{process::Child, time::Duration};

use agent_guard_tests::{Daemon, Endpoint, Listener, Policy, dump, kernel_test, probe};

struct Ports {
    search: Listener,
    pay: Listener,
    other: Listener,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            search: Listener::tcp("127.0.0.1"),
            pay: Listener::tcp("127.0.0.1"),
            other: Listener::tcp("127.0.0.1"),
        }
    }
}

fn policy(p: &Ports) -> String {
    Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tool("search", [Endpoint::tcp("127.0.0.1/32", p.search.port)])
        .tool("payments", [Endpoint::tcp("127.0.0.1/32", p.pay.port)])
        .tool("other", [Endpoint::tcp("127.0.0.1/32", p.other.port)])
        .raw(
            r#"
[[agent]]
tenant = "acme"
name = "researcher"
tools = ["search", "other"]
max_delegation_depth = 1
"#,
        )
        .build()
}

fn code(mut c: Child) -> i32 {
    c.wait().expect("wait").code().unwrap_or(-1)
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn call(port: u16) -> Vec<String> {
    ["after", "6000", "tcp", "127.0.0.1"]
        .iter()
        .map(|s| s.to_string())
        .chain([port.to_string()])
        .collect()
}

#[test]
fn task_scopes_sub_agents_and_grants_survive_a_sigkill_takeover() {
    if !kernel_test("task_scopes_sub_agents_and_grants_survive_a_sigkill_takeover") {
        return;
    }
    let p = Ports::new();
    let mut d = Daemon::start(&policy(&p));

    // Processes that call only after the daemon was killed and replaced.
    let scoped = d
        .launch("acme", "researcher")
        .task("triage")
        .tools("search");
    let task_ok = scoped.spawn_probe(&refs(&call(p.search.port)));
    let task_narrowed = scoped.spawn_probe(&refs(&call(p.other.port)));
    let short = d
        .launch("acme", "researcher")
        .task("brief")
        .tools("search")
        .ttl("3s");
    let task_expired = short.spawn_probe(&refs(&call(p.search.port)));
    let sub_ok = d.launch("acme", "researcher").spawn(&d.sub_agent_cmd(
        &["--agent", "helper", "--tools", "search"],
        &refs(&call(p.search.port)),
    ));
    let sub_narrowed = d.launch("acme", "researcher").spawn(&d.sub_agent_cmd(
        &["--agent", "helper", "--tools", "search"],
        &refs(&call(p.other.port)),
    ));
    // A grant with two uses; one spent before the crash.
    let grant = d
        .grant(
            "acme",
            "researcher",
            &["--tool", "payments", "--ttl", "60s", "--uses", "2"],
        )
        .to_string();
    let pay = p.pay.port.to_string();
    assert_eq!(
        d.probe("acme", "researcher", &["tcp", "127.0.0.1", &pay]),
        probe::OK
    );
    // Three task scopes and two sub-agents.
    let before = d.wait_status("five derived subjects", 10, |s| {
        s["agents"]
            .as_array()
            .is_some_and(|a| a.iter().filter(|x| x["subject_id"] != 1).count() >= 5)
    });
    std::thread::sleep(Duration::from_millis(300));

    d.kill();
    d.restart();

    let after = d.status();
    let g = &after["grants"][0];
    assert_eq!(
        g["id"].to_string(),
        grant,
        "the grant keeps its id: {after:#}"
    );
    assert_eq!(g["uses_left"], 1, "one use was spent before the crash");
    assert!(
        g["expires_in_seconds"]
            .as_f64()
            .is_some_and(|t| t < 60.0 && t > 40.0),
        "counting down on the kernel clock: {g}"
    );
    assert_eq!(after["grant_disagreements"], serde_json::json!([]));
    let subjects = |s: &serde_json::Value| {
        let mut v: Vec<String> = s["agents"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| format!("{} {} {}", x["subject"], x["task"]["text"], x["tools"]))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    assert_eq!(subjects(&after), subjects(&before), "{after:#}");

    assert_eq!(code(task_ok), probe::OK, "task scope restored");
    assert_eq!(code(task_narrowed), probe::EPERM, "its subset too");
    assert_eq!(
        code(task_expired),
        probe::EPERM,
        "its TTL ran out meanwhile"
    );
    assert_eq!(code(sub_ok), probe::OK, "sub-agent restored");
    assert_eq!(code(sub_narrowed), probe::EPERM, "with its subset");
    assert_eq!(
        d.probe("acme", "researcher", &["tcp", "127.0.0.1", &pay]),
        probe::OK,
        "the second use"
    );
    assert_eq!(
        d.probe("acme", "researcher", &["tcp", "127.0.0.1", &pay]),
        probe::EPERM,
        "no third"
    );
    let recs = d.wait_audit("acme", "the restored calls", |r| {
        r.iter()
            .filter(|x| x["kind"] == "connect" && x["reason"] == "expired")
            .count()
            >= 1
    });
    let expired: Vec<_> = recs
        .iter()
        .filter(|x| x["kind"] == "connect" && x["reason"] == "expired")
        .collect();
    assert_eq!(expired[0]["task"], "brief", "{}", dump(&recs));
    let node = d.audit("_node");
    assert!(
        node.iter().any(|r| r["detail"]
            .as_str()
            .is_some_and(|t| t.contains("restored 5 task/sub-agent subjects, 1 grants"))),
        "{}",
        dump(&node)
    );
}

#[test]
fn a_damaged_registry_file_stops_the_start_and_names_itself() {
    if !kernel_test("a_damaged_registry_file_stops_the_start_and_names_itself") {
        return;
    }
    let p = Ports::new();
    let mut d = Daemon::start(&policy(&p));
    let file = d.dir.path().join("state").join("registry.json");
    assert!(file.exists(), "written at start");
    d.stop();
    std::fs::write(&file, "{ not json").expect("damage");
    let err = d.try_restart().expect_err("must not start");
    assert!(
        err.contains("registry.json is damaged") && err.contains("move it away"),
        "{err}"
    );
    let doctor = d.cli(&[
        "doctor",
        "--state-dir",
        d.dir.path().join("state").to_str().expect("utf-8"),
    ]);
    let text = String::from_utf8_lossy(&doctor.stdout).into_owned()
        + &String::from_utf8_lossy(&doctor.stderr);
    assert!(text.contains("registry.json"), "doctor names it: {text}");
    std::fs::remove_file(&file).expect("remove");
    d.restart();
}

#[test]
fn a_saved_scope_that_no_longer_fits_the_policy_stays_quarantined() {
    if !kernel_test("a_saved_scope_that_no_longer_fits_the_policy_stays_quarantined") {
        return;
    }
    let p = Ports::new();
    let mut d = Daemon::start(&policy(&p));
    let scoped = d
        .launch("acme", "researcher")
        .task("t")
        .tools("search,other");
    let late = scoped.spawn_probe(&refs(&call(p.search.port)));
    d.wait_status("the task scope", 10, |s| {
        s["agents"].as_array().is_some_and(|a| a.len() >= 2)
    });
    std::thread::sleep(Duration::from_millis(300));
    d.kill();
    // The new policy takes `other` from the researcher: the saved scope
    // asks for more than its parent has now, so it is not restored.
    let narrower = policy(&p).replace(r#"tools = ["search", "other"]"#, r#"tools = ["search"]"#);
    assert_ne!(narrower, policy(&p));
    std::fs::write(&d.policy_path, narrower).expect("policy");
    d.restart();
    assert_eq!(code(late), probe::EPERM, "quarantined: reaches nothing");
    // Its subject is unknown to the new daemon: recorded in the node log.
    let recs = d.wait_audit("_node", "the quarantined call", |r| {
        r.iter().any(|x| x["kind"] == "connect")
    });
    let c = recs
        .iter()
        .find(|x| x["kind"] == "connect")
        .expect("connect");
    assert_eq!(c["reason"], "unknown_subject", "{}", dump(&recs));
}
