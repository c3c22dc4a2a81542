//! Real-kernel tests of overlapping grants: several live grants covering
//! the same endpoint of the same agent (the same tool twice, two tools
//! sharing an endpoint, a shorter prefix, a process-tree grant beside an
//! agent-wide one) each hold on their own. After every step the registry
//! (`status --json`) is compared with the kernel's `GRANTS` and
//! `GRANT_STATE` maps, read straight from the kernel by map id, and the
//! verdict is checked with real connects from new tagged processes and
//! sub-agents.

use std::{collections::BTreeSet, time::Duration};

use agent_guard_tests::{Agent, Daemon, Endpoint, Listener, Policy, kernel_test, probe};
use serde_json::Value;

struct Ports {
    pay: Listener,
}

/// `researcher` has no tool of its own on `pay`'s port: `payments` and
/// `billing` name the same endpoint, `wide` the whole loopback /8 on it.
fn policy(p: &Ports) -> String {
    let pay = p.pay.port;
    Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tool("payments", [Endpoint::tcp("127.0.0.1/32", pay)])
        .tool("billing", [Endpoint::tcp("127.0.0.1/32", pay)])
        .tool("wide", [Endpoint::tcp("127.0.0.0/8", pay)])
        .with_agent(Agent::new("acme", "researcher", &[]).max_delegation_depth(1))
        .build()
}

fn grant(d: &Daemon, args: &[&str]) -> u32 {
    d.grant("acme", "researcher", args)
}

fn revoke(d: &Daemon, id: u32) {
    d.revoke(id)
}

fn active(status: &Value) -> BTreeSet<u32> {
    status["grants"]
        .as_array()
        .expect("status.grants")
        .iter()
        .filter_map(|g| g["id"].as_u64().map(|i| i as u32))
        .collect()
}

/// The registry and the kernel agree: the daemon's own check finds
/// nothing, every grant `status` lists is live in `GRANT_STATE` and sits in
/// `GRANTS`, and no other grant id does. Returns the active ids.
fn agree(d: &Daemon, step: &str) -> BTreeSet<u32> {
    let s = d.status();
    assert_eq!(
        s["grant_disagreements"],
        serde_json::json!([]),
        "{step}: the daemon's check"
    );
    let listed = active(&s);
    let state = d.kernel_grant_state();
    let in_state: BTreeSet<u32> = state.keys().copied().collect();
    assert_eq!(in_state, listed, "{step}: GRANT_STATE vs status");
    assert!(
        state.values().all(|(_, revoked)| !revoked),
        "{step}: a revoked grant left in GRANT_STATE: {state:?}"
    );
    let keys = d.kernel_grants();
    let in_keys: BTreeSet<u32> = keys.values().flatten().copied().collect();
    assert_eq!(in_keys, listed, "{step}: GRANTS vs status: {keys:?}");
    listed
}

fn call(d: &Daemon, p: &Ports) -> i32 {
    d.probe(
        "acme",
        "researcher",
        &["tcp", "127.0.0.1", &p.pay.port.to_string()],
    )
}

fn sub_agent_call(d: &Daemon, p: &Ports, tool: &str) -> (i32, String) {
    d.sub_agent(
        "acme",
        "researcher",
        &["--agent", "helper", "--tools", tool],
        &["tcp", "127.0.0.1", &p.pay.port.to_string()],
    )
}

/// Waits until the daemon has swept grant `id` (expired or spent).
fn wait_gone(d: &Daemon, id: u32) {
    d.wait_status(&format!("grant {id} swept"), 10, |s| {
        !active(s).contains(&id)
    });
}

#[test]
fn revoking_one_of_two_grants_of_a_tool_leaves_the_other_in_force() {
    if !kernel_test("revoking_one_of_two_grants_of_a_tool_leaves_the_other_in_force") {
        return;
    }
    let p = Ports {
        pay: Listener::tcp("127.0.0.1"),
    };
    let d = Daemon::start(&policy(&p));
    assert_eq!(call(&d, &p), probe::EPERM, "no grant yet");
    let g1 = grant(&d, &["--tool", "payments", "--ttl", "60s"]);
    let g2 = grant(&d, &["--tool", "payments", "--ttl", "60s"]);
    assert_eq!(agree(&d, "two grants"), BTreeSet::from([g1, g2]));
    revoke(&d, g1);
    assert_eq!(agree(&d, "first revoked"), BTreeSet::from([g2]));
    assert_eq!(call(&d, &p), probe::OK, "grant {g2} still holds");
    let (code, err) = sub_agent_call(&d, &p, "payments");
    assert_eq!(code, probe::OK, "sub-agent under grant {g2}: {err}");
    revoke(&d, g2);
    agree(&d, "both revoked");
    assert_eq!(call(&d, &p), probe::EPERM, "nothing left");
    let (code, _) = sub_agent_call(&d, &p, "payments");
    assert_eq!(
        code, 125,
        "a sub-agent cannot ask for a tool its parent lost"
    );

    // Revoked in the other order.
    let g3 = grant(&d, &["--tool", "payments", "--ttl", "60s"]);
    let g4 = grant(&d, &["--tool", "payments", "--ttl", "60s"]);
    revoke(&d, g4);
    assert_eq!(agree(&d, "newer revoked"), BTreeSet::from([g3]));
    assert_eq!(call(&d, &p), probe::OK, "grant {g3} still holds");

    // Two tools that share the endpoint.
    let g5 = grant(&d, &["--tool", "billing", "--ttl", "60s"]);
    revoke(&d, g3);
    assert_eq!(
        agree(&d, "other tool's grant revoked"),
        BTreeSet::from([g5])
    );
    assert_eq!(call(&d, &p), probe::OK, "billing grant {g5} holds");
    let recs = d.wait_audit("acme", "a call under the billing grant", |r| {
        r.iter()
            .any(|x| x["kind"] == "connect" && x["grant"] == g5.to_string().as_str())
    });
    let last = recs
        .iter()
        .rev()
        .find(|x| x["kind"] == "connect")
        .expect("a connect record");
    assert_eq!(
        (last["tool"].as_str(), last["verdict"].as_str()),
        (Some("billing"), Some("allow")),
        "recorded under the grant that allowed it"
    );
}

#[test]
fn overlapping_grants_expire_and_spend_each_on_their_own() {
    if !kernel_test("overlapping_grants_expire_and_spend_each_on_their_own") {
        return;
    }
    let p = Ports {
        pay: Listener::tcp("127.0.0.1"),
    };
    let d = Daemon::start(&policy(&p));

    // A short grant expiring before a long one...
    let short = grant(&d, &["--tool", "payments", "--ttl", "1s"]);
    let long = grant(&d, &["--tool", "payments", "--ttl", "60s"]);
    agree(&d, "short + long");
    std::thread::sleep(Duration::from_millis(1200));
    // ...in the kernel, before the daemon sweeps it: the long one holds.
    assert_eq!(call(&d, &p), probe::OK, "expired {short} hides {long}");
    wait_gone(&d, short);
    assert_eq!(agree(&d, "short swept"), BTreeSet::from([long]));
    assert_eq!(call(&d, &p), probe::OK, "after the sweep too");
    revoke(&d, long);

    // A grant issued after an earlier one expired in the kernel but before
    // the daemon swept it: the sweep must not take the new one's entry.
    let old = grant(&d, &["--tool", "payments", "--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1050));
    let fresh = grant(&d, &["--tool", "payments", "--ttl", "3s"]);
    assert_eq!(
        call(&d, &p),
        probe::OK,
        "fresh grant {fresh} from its first call"
    );
    wait_gone(&d, old);
    assert_eq!(agree(&d, "old swept"), BTreeSet::from([fresh]));
    assert_eq!(
        call(&d, &p),
        probe::OK,
        "fresh grant {fresh} after the sweep"
    );
    revoke(&d, fresh);

    // A use-counted grant beside an unlimited one: calls go under the
    // unlimited grant and never spend the counted use.
    let counted = grant(&d, &["--tool", "payments", "--ttl", "60s", "--uses", "1"]);
    let open = grant(&d, &["--tool", "billing", "--ttl", "60s"]);
    for _ in 0..3 {
        assert_eq!(call(&d, &p), probe::OK);
    }
    assert_eq!(
        d.kernel_grant_state().get(&counted).map(|s| s.0),
        Some(1),
        "no use of {counted} spent while {open} covers the call"
    );
    revoke(&d, open);
    agree(&d, "unlimited revoked");
    assert_eq!(call(&d, &p), probe::OK, "the counted use");
    assert_eq!(call(&d, &p), probe::EPERM, "spent");
    wait_gone(&d, counted);
    assert_eq!(agree(&d, "counted swept"), BTreeSet::new());

    // A shorter prefix (127.0.0.0/8) beside a /32: the /32 key must not
    // hide the /8 grant once its own grant dies.
    let wide = grant(&d, &["--tool", "wide", "--ttl", "60s"]);
    let narrow = grant(&d, &["--tool", "payments", "--ttl", "1s"]);
    agree(&d, "wide + narrow");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        call(&d, &p),
        probe::OK,
        "expired /32 {narrow} hides /8 {wide}"
    );
    wait_gone(&d, narrow);
    agree(&d, "narrow swept");
    assert_eq!(call(&d, &p), probe::OK);
    let narrow2 = grant(&d, &["--tool", "payments", "--ttl", "60s"]);
    revoke(&d, wide);
    assert_eq!(agree(&d, "wide revoked"), BTreeSet::from([narrow2]));
    assert_eq!(call(&d, &p), probe::OK, "/32 grant {narrow2} holds alone");
}

#[test]
fn a_process_tree_grant_and_an_agent_grant_are_revoked_apart() {
    if !kernel_test("a_process_tree_grant_and_an_agent_grant_are_revoked_apart") {
        return;
    }
    let p = Ports {
        pay: Listener::tcp("127.0.0.1"),
    };
    let d = Daemon::start(&policy(&p));
    let port = p.pay.port.to_string();
    let target = d.spawn_probe(
        "acme",
        "researcher",
        &["after", "2500", "tcp", "127.0.0.1", &port],
    );
    std::thread::sleep(Duration::from_millis(400));
    let agent_wide = grant(&d, &["--tool", "payments", "--ttl", "60s"]);
    let tree = grant(
        &d,
        &[
            "--tool",
            "payments",
            "--ttl",
            "60s",
            "--pid",
            &target.id().to_string(),
        ],
    );
    agree(&d, "agent + tree");
    revoke(&d, agent_wide);
    assert_eq!(agree(&d, "agent grant revoked"), BTreeSet::from([tree]));
    assert_eq!(call(&d, &p), probe::EPERM, "another process lost it");
    let mut target = target;
    let code = target.wait().expect("wait").code().unwrap_or(-1);
    assert_eq!(code, probe::OK, "the process tree keeps grant {tree}");
    revoke(&d, tree);
    // Too many grants on one endpoint is refused clearly, nothing changes.
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(grant(&d, &["--tool", "payments", "--ttl", "60s"]));
    }
    let before = agree(&d, "eight more");
    let out = d.try_grant(
        "acme",
        "researcher",
        &["--tool", "payments", "--ttl", "60s"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at most 8 live grants"), "{err}");
    assert_eq!(agree(&d, "ninth refused"), before);
    assert_eq!(call(&d, &p), probe::OK);
}
