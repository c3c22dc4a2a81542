//! Real-kernel tests of `daemon --flow-records`: allowed calls are counted
//! per flow in the kernel and written as one record per flow and interval
//! with `calls`; denied calls stay one record each; nothing is ever
//! unaccounted (full table, several intervals, a stop right after a burst,
//! a killed daemon).

use std::process::Command;

use agent_guard_tests::{
    Daemon, Endpoint, Listener, Policy, agent_guard_bin, kernel_test, parse_metrics, probe,
};
use serde_json::Value;

fn policy(cidr: &str, port: u16) -> Policy {
    Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tool("search", [Endpoint::tcp(cidr, port)])
        .agent("acme", "researcher", &["search"])
}

/// A daemon in flow mode with its signing key in a test-owned state dir.
fn start(policy: &Policy, extra: &[&str]) -> (Daemon, tempfile::TempDir) {
    let state = tempfile::tempdir().expect("state dir");
    let mut args = vec![
        "--state-dir",
        state.path().to_str().expect("utf-8"),
        "--flow-records",
    ];
    args.extend_from_slice(extra);
    (Daemon::start_with(&policy.build(), &args), state)
}

/// `n` TCP connects to 127.0.0.1:`port` from one tagged process, expecting
/// the probe's exit code `want`.
fn burst(d: &Daemon, n: u64, port: u16, want: i32) {
    let (n, port) = (n.to_string(), port.to_string());
    assert_eq!(
        d.probe(
            "acme",
            "researcher",
            &["repeat", &n, "tcp", "127.0.0.1", &port]
        ),
        want,
        "{n} connects to port {port}"
    );
}

/// Allowed connect records to `port`: (flow records, per-call records).
fn allowed(recs: &[Value], port: u16) -> (Vec<&Value>, Vec<&Value>) {
    recs.iter()
        .filter(|r| r["kind"] == "connect" && r["verdict"] == "allow" && r["port"] == port)
        .partition(|r| r.get("calls").is_some())
}

/// Calls the records stand for: `calls` of a flow record, 1 otherwise.
fn calls(recs: &[&Value]) -> u64 {
    recs.iter().map(|r| r["calls"].as_u64().unwrap_or(1)).sum()
}

fn denied(recs: &[Value]) -> Vec<&Value> {
    recs.iter()
        .filter(|r| r["kind"] == "connect" && r["verdict"] == "deny")
        .collect()
}

/// Sum of a metric's samples whose labels include `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse_metrics(text)
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

fn verify_ok(d: &Daemon) {
    let out = Command::new(agent_guard_bin())
        .args(["audit", "verify", "--audit-dir"])
        .arg(&d.audit_dir)
        .output()
        .expect("audit verify");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn allowed_calls_become_flow_records_that_add_up_and_denied_calls_stay_per_call() {
    if !kernel_test("allowed_calls_become_flow_records_that_add_up_and_denied_calls_stay_per_call")
    {
        return;
    }
    const N: u64 = 300;
    const M: usize = 7;
    let l = Listener::tcp("127.0.0.1");
    let (mut d, _state) = start(
        &policy("127.0.0.1/32", l.port),
        &["--flow-interval", "300ms"],
    );
    burst(&d, N, l.port, probe::OK);
    burst(&d, M as u64, 1, probe::EPERM);
    let recs = d.wait_audit("acme", "N allowed calls in flow records", |r| {
        calls(&allowed(r, l.port).0) + calls(&allowed(r, l.port).1) >= N && denied(r).len() >= M
    });
    let (flows, per_call) = allowed(&recs, l.port);
    assert!(
        per_call.is_empty(),
        "no fallback with room in the table: {per_call:?}"
    );
    assert_eq!(calls(&flows), N, "flow records: {flows:?}");
    // One process, one destination: a handful of records, not N.
    assert!(
        flows.len() < 10,
        "{} flow records for {N} calls",
        flows.len()
    );
    for f in &flows {
        assert_eq!(f["ts"], f["first_ts"], "{f}");
        assert!(f["first_ts"].as_str() <= f["last_ts"].as_str(), "{f}");
        assert_eq!(
            (f["tool"].as_str(), f["reason"].as_str()),
            (Some("search"), Some("granted"))
        );
        assert!(
            f["pid"].as_u64().is_some() && f["subject"] == "acme/researcher",
            "{f}"
        );
    }
    let deny = denied(&recs);
    assert_eq!(deny.len(), M);
    assert!(deny.iter().all(|r| r.get("calls").is_none()), "{deny:?}");

    let text = d.metrics();
    let dec = "agent_guard_decisions_total";
    assert_eq!(
        metric(&text, dec, &[("tenant", "acme"), ("verdict", "allow")]),
        N as f64
    );
    assert_eq!(
        metric(&text, dec, &[("tenant", "acme"), ("verdict", "deny")]),
        M as f64
    );
    assert_eq!(metric(&text, "agent_guard_flow_calls_total", &[]), N as f64);
    assert_eq!(metric(&text, "agent_guard_flow_fallback_total", &[]), 0.0);
    let st = d.status();
    let fr = &st["flow_records"];
    assert_eq!(fr["enabled"], true, "{fr}");
    assert_eq!(fr["interval_ms"], 300, "{fr}");
    assert_eq!(fr["calls_flushed"], N, "{fr}");
    assert_eq!(
        fr["records_flushed"].as_u64(),
        Some(flows.len() as u64),
        "{fr}"
    );
    assert_eq!(fr["fallbacks_table_full"], 0, "{fr}");
    // The kernel counted every decision the trail holds.
    assert_eq!(st["decisions"]["allow"], N, "{st}");

    // Replay shows the count.
    let out = Command::new(agent_guard_bin())
        .args(["audit", "replay", "--tenant", "acme", "--audit-dir"])
        .arg(&d.audit_dir)
        .output()
        .expect("audit replay");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("granted ×"), "{text}");
    d.stop();
    verify_ok(&d);
}

#[test]
fn a_full_flow_table_falls_back_to_per_call_records_and_counts_every_call() {
    if !kernel_test("a_full_flow_table_falls_back_to_per_call_records_and_counts_every_call") {
        return;
    }
    let l = Listener::tcp("0.0.0.0");
    let (mut d, _state) = start(
        &policy("127.0.0.0/8", l.port),
        &["--flow-interval", "200ms", "--map-capacity", "FLOWS=2"],
    );
    assert_eq!(
        d.status()["flow_records"]["table_capacity"],
        2,
        "--map-capacity FLOWS=2 sizes the table"
    );
    // 12 processes, each to its own address: 12 flows for 2 slots.
    let port = l.port.to_string();
    let mut total = 0;
    for host in 1..=12 {
        let addr = format!("127.0.0.{host}");
        assert_eq!(
            d.probe("acme", "researcher", &["repeat", "5", "tcp", &addr, &port]),
            probe::OK
        );
        total += 5;
    }
    let recs = d.wait_audit("acme", "every call in a record", |r| {
        let (f, p) = allowed(r, l.port);
        calls(&f) + calls(&p) >= total
    });
    let (flows, per_call) = allowed(&recs, l.port);
    assert_eq!(calls(&flows) + calls(&per_call), total);
    assert!(!per_call.is_empty(), "a table of 2 cannot hold 12 flows");
    assert!(!flows.is_empty(), "the table still took what fit");
    let st = d.wait_status("fallbacks counted", 5, |s| {
        s["flow_records"]["fallbacks_table_full"] == per_call.len() as u64
    });
    assert_eq!(
        st["flow_records"]["fallbacks_table_full"],
        per_call.len() as u64
    );
    let text = d.metrics();
    assert_eq!(
        metric(&text, "agent_guard_flow_fallback_total", &[]),
        per_call.len() as f64
    );
    assert_eq!(
        metric(
            &text,
            "agent_guard_decisions_total",
            &[("tenant", "acme"), ("verdict", "allow")]
        ),
        total as f64
    );
    d.stop();
    verify_ok(&d);
}

#[test]
fn calls_of_one_flow_across_several_intervals_are_all_counted() {
    if !kernel_test("calls_of_one_flow_across_several_intervals_are_all_counted") {
        return;
    }
    let l = Listener::tcp("127.0.0.1");
    let (mut d, _state) = start(
        &policy("127.0.0.1/32", l.port),
        &["--flow-interval", "150ms"],
    );
    let port = l.port.to_string();
    // One process, 12 calls 100 ms apart: about 1.2 s, 8 intervals.
    assert_eq!(
        d.probe(
            "acme",
            "researcher",
            &["repeat", "12", "after", "100", "tcp", "127.0.0.1", &port]
        ),
        probe::OK
    );
    let recs = d.wait_audit("acme", "all 12 calls", |r| {
        calls(&allowed(r, l.port).0) >= 12
    });
    let (flows, per_call) = allowed(&recs, l.port);
    assert!(per_call.is_empty(), "{per_call:?}");
    assert_eq!(calls(&flows), 12);
    assert!(
        flows.len() >= 3,
        "calls over several intervals make several records: {flows:?}"
    );
    // One process: every record is the same flow, in time order.
    let pids: std::collections::BTreeSet<u64> =
        flows.iter().filter_map(|f| f["pid"].as_u64()).collect();
    assert_eq!(pids.len(), 1, "{flows:?}");
    for pair in flows.windows(2) {
        assert!(
            pair[0]["last_ts"].as_str() < pair[1]["first_ts"].as_str(),
            "{pair:?}"
        );
    }
    d.stop();
    verify_ok(&d);
}

#[test]
fn a_stop_right_after_a_burst_writes_every_counted_call() {
    if !kernel_test("a_stop_right_after_a_burst_writes_every_counted_call") {
        return;
    }
    const N: u64 = 500;
    let l = Listener::tcp("127.0.0.1");
    // An interval far longer than the test: only the shutdown collects.
    let (mut d, _state) = start(&policy("127.0.0.1/32", l.port), &["--flow-interval", "1h"]);
    burst(&d, N, l.port, probe::OK);
    assert_eq!(d.status()["flow_records"]["records_flushed"], 0);
    d.stop();
    let recs = d.audit("acme");
    let (flows, per_call) = allowed(&recs, l.port);
    assert_eq!(
        calls(&flows) + calls(&per_call),
        N,
        "flows: {flows:?}, per call: {}",
        per_call.len()
    );
    verify_ok(&d);
}

#[test]
fn a_killed_daemons_uncollected_flows_are_counted_by_its_successor() {
    if !kernel_test("a_killed_daemons_uncollected_flows_are_counted_by_its_successor") {
        return;
    }
    const N: u64 = 40;
    let l = Listener::tcp("127.0.0.1");
    let (mut d, _state) = start(&policy("127.0.0.1/32", l.port), &["--flow-interval", "1h"]);
    burst(&d, N, l.port, probe::OK);
    d.kill();
    d.restart();
    // The successor cannot name the old subjects: the calls are in its
    // takeover gap record, counted, like records left in the old ring.
    let recs = d.wait_audit("acme", "the takeover gap", |r| {
        r.iter().any(|r| r["kind"] == "gap")
    });
    let gap = recs
        .iter()
        .find(|r| r["kind"] == "gap")
        .expect("a gap record");
    assert_eq!(gap["lost"]["connect"], N, "{gap}");
    d.stop();
    verify_ok(&d);
}

#[test]
fn per_call_mode_has_no_flow_fields_and_no_flow_status() {
    if !kernel_test("per_call_mode_has_no_flow_fields_and_no_flow_status") {
        return;
    }
    let l = Listener::tcp("127.0.0.1");
    let state = tempfile::tempdir().expect("state dir");
    let mut d = Daemon::start_with(
        &policy("127.0.0.1/32", l.port).build(),
        &["--state-dir", state.path().to_str().expect("utf-8")],
    );
    let port = l.port.to_string();
    assert_eq!(
        d.probe(
            "acme",
            "researcher",
            &["repeat", "3", "tcp", "127.0.0.1", &port]
        ),
        probe::OK
    );
    let recs = d.wait_audit("acme", "3 per-call records", |r| {
        allowed(r, l.port).1.len() >= 3
    });
    assert!(allowed(&recs, l.port).0.is_empty());
    assert!(d.status()["flow_records"].is_null());
    d.stop();
}
