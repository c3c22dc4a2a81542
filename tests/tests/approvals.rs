//! Real-kernel tests of two-person approval: a tagged call to a tool with
//! `approval = "two-person"` is refused (`approval_required`) and opens a
//! request; two distinct approvers (uids listed in the policy) make a grant
//! the kernel enforces; the requester, root, a tagged process or one
//! approver twice never can; requests can be denied and expire; a webhook
//! hears of each new request.

use std::{
    io::{Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    process::{Command, Output},
    sync::mpsc,
    time::Duration,
};

use agent_guard_tests::{
    AsUser as _, Daemon, Listener, agent_guard_bin, dump, kernel_test, probe, probe_bin,
};
use serde_json::Value;

const CONTROL_GID: u32 = 64_100;
const ALICE: u32 = 64_201;
const BOB: u32 = 64_202;
const CAROL: u32 = 64_203;

fn policy(pay: u16, key: &str) -> String {
    format!(
        r#"
default_mode = "enforce"

[[tenant]]
name = "acme"
token_keys = ["{key}"]

[[tenant]]
name = "globex"

[[tool]]
name = "payments"
endpoints = [{{ cidr = "127.0.0.1/32", port = {pay} }}]
approval = "two-person"
approval_ttl = "1m"

[[agent]]
tenant = "acme"
name = "researcher"
tools = ["payments"]

[[approver]]
name = "alice"
uid = {ALICE}

[[approver]]
name = "bob"
uid = {BOB}

[[approver]]
name = "carol"
uid = {CAROL}
tenants = ["globex"]
"#
    )
}

fn keygen(dir: &std::path::Path) -> String {
    let out = Command::new(agent_guard_bin())
        .args(["token", "keygen", "--out"])
        .arg(dir.join("k"))
        .output()
        .expect("keygen");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn start(extra: &[&str]) -> (Daemon, Listener, tempfile::TempDir) {
    let keys = tempfile::tempdir().expect("tempdir");
    let key = keygen(keys.path());
    let pay = Listener::tcp("127.0.0.1");
    let gid = CONTROL_GID.to_string();
    let mut args = vec!["--control-group", gid.as_str()];
    args.extend_from_slice(extra);
    let d = Daemon::start_with(&policy(pay.port, &key), &args);
    let dir = d.socket.parent().expect("socket dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    std::fs::set_permissions(keys.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    (d, pay, keys)
}

/// An agent-guard client command as `uid` (0: root), in the control group.
fn as_user(d: &Daemon, uid: u32, args: &[&str]) -> Output {
    d.cli_as(uid, CONTROL_GID, args)
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn pending(d: &Daemon) -> Vec<Value> {
    let out = as_user(d, 0, &["approvals", "list", "--json"]);
    assert!(out.status.success(), "{}", err(&out));
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn call(d: &Daemon, pay: &Listener) -> i32 {
    d.probe(
        "acme",
        "researcher",
        &["tcp", "127.0.0.1", &pay.port.to_string()],
    )
}

fn approvals(recs: &[Value]) -> Vec<(String, Option<String>)> {
    recs.iter()
        .filter(|r| r["kind"] == "approval")
        .map(|r| {
            (
                r["op"].as_str().unwrap_or("").to_string(),
                r["approver"].as_str().map(str::to_string),
            )
        })
        .collect()
}

#[test]
fn two_distinct_approvers_open_a_two_person_tool_and_nobody_else_can() {
    if !kernel_test("two_distinct_approvers_open_a_two_person_tool_and_nobody_else_can") {
        return;
    }
    let (d, pay, _keys) = start(&[]);
    assert_eq!(call(&d, &pay), probe::EPERM, "refused until approved");
    assert_eq!(call(&d, &pay), probe::EPERM);
    let list = d.wait_status("a pending request", 10, |s| {
        s["approvals"].as_array().is_some_and(|a| a.len() == 1)
    })["approvals"]
        .clone();
    let req = &list[0];
    assert_eq!(req["tool"], "payments");
    assert_eq!(req["subject"], "acme/researcher");
    assert!(
        req["endpoint"]
            .as_str()
            .is_some_and(|e| e.ends_with(&format!(":{}", pay.port))),
        "{req}"
    );
    let id = req["id"].to_string();
    // Nobody but two distinct approvers.
    let out = as_user(&d, 0, &["approve", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err(&out).contains("uid 0 is not an approver"),
        "{}",
        err(&out)
    );
    let out = as_user(&d, CAROL, &["approve", &id]);
    assert!(
        err(&out).contains("may not decide requests of tenant \"acme\""),
        "{}",
        err(&out)
    );
    let out = as_user(&d, 64_299, &["approve", &id]);
    assert!(err(&out).contains("not an approver"), "{}", err(&out));
    let out = as_user(&d, ALICE, &["approve", &id]);
    assert!(out.status.success(), "{}", err(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("needs another approver"));
    let out = as_user(&d, ALICE, &["approve", &id]);
    assert!(err(&out).contains("already approved"), "{}", err(&out));
    assert_eq!(call(&d, &pay), probe::EPERM, "one approval is not enough");
    // A tagged process cannot reach the verb, even as root.
    let bin = agent_guard_bin();
    let out = d.run(
        "acme",
        "researcher",
        &[
            bin.to_str().expect("utf-8"),
            "approve",
            &id,
            "--socket",
            d.socket.to_str().expect("utf-8"),
        ],
    );
    assert!(!out.status.success());
    assert!(err(&out).contains("tagged process"), "{}", err(&out));
    let out = as_user(&d, BOB, &["approve", &id]);
    assert!(out.status.success(), "{}", err(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("grant"),
        "{:?}",
        out
    );
    assert_eq!(call(&d, &pay), probe::OK, "approved: the kernel allows it");
    assert!(pending(&d).is_empty(), "the request ended");
    let s = d.status();
    let g = &s["grants"][0];
    assert_eq!(g["tool"], "payments");
    assert!(
        g["expires_in_seconds"]
            .as_f64()
            .is_some_and(|t| t > 50.0 && t <= 60.0),
        "{g}"
    );
    assert_eq!(s["grant_disagreements"], serde_json::json!([]));

    // Revoked, then asked again and denied.
    assert!(
        as_user(&d, 0, &["revoke", "--grant", &g["id"].to_string()])
            .status
            .success()
    );
    assert_eq!(call(&d, &pay), probe::EPERM);
    // The request is opened from the refusal's kernel record: wait for it.
    let again = d.wait_status("a new request", 10, |s| {
        s["approvals"].as_array().is_some_and(|a| a.len() == 1)
    })["approvals"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let id2 = again[0]["id"].to_string();
    assert_ne!(id2, id);
    let out = as_user(&d, BOB, &["deny", &id2]);
    assert!(out.status.success(), "{}", err(&out));
    assert!(pending(&d).is_empty());
    let out = as_user(&d, ALICE, &["approve", &id2]);
    assert!(
        err(&out).contains("no pending approval request"),
        "{}",
        err(&out)
    );
    assert_eq!(call(&d, &pay), probe::EPERM, "denied: nothing granted");
    let recs = d.wait_audit("acme", "every refused call", |r| {
        r.iter()
            .filter(|x| x["kind"] == "connect" && x["reason"] == "approval_required")
            .count()
            == 5
    });
    assert!(
        pending(&d).is_empty(),
        "a denied request is not asked again at once"
    );
    let last = recs
        .iter()
        .rev()
        .find(|x| x["kind"] == "connect")
        .expect("connect");
    assert_eq!(
        last["approval"],
        id2.as_str(),
        "recorded under the denied request"
    );
    let steps = approvals(&recs);
    let want = [
        ("request", None),
        ("approve", Some("alice")),
        ("approve", Some("bob")),
        ("granted", None),
        ("request", None),
        ("deny", Some("bob")),
    ];
    let got: Vec<(&str, Option<&str>)> = steps
        .iter()
        .map(|(o, a)| (o.as_str(), a.as_deref()))
        .collect();
    assert_eq!(got, want, "{}", dump(&recs));
    let refused: Vec<&Value> = recs
        .iter()
        .filter(|r| r["kind"] == "connect" && r["reason"] == "approval_required")
        .collect();
    assert!(
        refused.iter().all(|r| r["approval"].is_string()),
        "refused calls name their request: {}",
        dump(&recs)
    );
    let controls: Vec<&Value> = recs
        .iter()
        .filter(|r| r["kind"] == "control" && r["op"] == "approve")
        .collect();
    assert!(
        controls
            .iter()
            .any(|r| r["uid"] == BOB && r["verdict"] == "allow")
            && controls
                .iter()
                .any(|r| r["uid"] == 0 && r["verdict"] == "deny"),
        "{}",
        dump(&recs)
    );
}

#[test]
fn the_requesting_uid_never_approves_and_requests_expire_with_a_webhook_notice() {
    if !kernel_test("the_requesting_uid_never_approves_and_requests_expire_with_a_webhook_notice") {
        return;
    }
    // A one-shot HTTP server on loopback: the webhook's receiver.
    let hook = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/approvals", hook.local_addr().expect("addr"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = hook.accept() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = vec![0u8; 65536];
            let mut got = Vec::new();
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break;
                    }
                }
            }
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
            let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
        }
    });
    let (d, pay, keys) = start(&["--approval-timeout", "2s", "--approval-webhook", &url]);
    // The agent runs as alice's uid (launched by alice with a token).
    let tok = Command::new(agent_guard_bin())
        .args(["token", "issue", "--key"])
        .arg(keys.path().join("k"))
        .args(["--tenant", "acme", "--agent", "researcher", "--jti", "a1"])
        .output()
        .expect("issue");
    assert!(tok.status.success());
    let tpath = keys.path().join("t.jwt");
    std::fs::write(&tpath, &tok.stdout).expect("write");
    std::fs::set_permissions(&tpath, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = Command::new(agent_guard_bin())
        .arg("run")
        .arg("--socket")
        .arg(&d.socket)
        .arg("--token")
        .arg(&tpath)
        .arg("--")
        .arg(probe_bin())
        .args(["tcp", "127.0.0.1", &pay.port.to_string()])
        .as_user(ALICE, CONTROL_GID)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(probe::EPERM), "{}", err(&out));
    let list = d.wait_status("a pending request", 10, |s| {
        s["approvals"].as_array().is_some_and(|a| a.len() == 1)
    })["approvals"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(list[0]["uid"], ALICE);
    let id = list[0]["id"].to_string();
    let out = as_user(&d, ALICE, &["approve", &id]);
    assert!(
        err(&out).contains("nobody approves their own request"),
        "{}",
        err(&out)
    );
    // The webhook heard of it.
    let posted = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("webhook POST");
    assert!(posted.starts_with("POST /approvals "), "{posted}");
    assert!(posted.contains("\"tool\":\"payments\""), "{posted}");
    assert!(posted.contains(&format!("\"id\":{id}")), "{posted}");
    // Nobody decides: it expires, and an approval after that finds nothing.
    d.wait_status("the request expired", 10, |s| {
        s["approvals"].as_array().is_some_and(|a| a.is_empty())
    });
    let out = as_user(&d, BOB, &["approve", &id]);
    assert!(
        err(&out).contains("no pending approval request"),
        "{}",
        err(&out)
    );
    let recs = d.wait_audit("acme", "expire record", |r| {
        approvals(r).iter().any(|(op, _)| op == "expire")
    });
    let steps: Vec<String> = approvals(&recs).into_iter().map(|(o, _)| o).collect();
    assert_eq!(steps, ["request", "expire"], "{}", dump(&recs));
    let m = d.metrics();
    assert!(
        m.contains("agent_guard_approvals_total{step=\"expire\",tenant=\"acme\"} 1"),
        "{m}"
    );
}

#[test]
fn a_pending_request_survives_a_sigkill_takeover() {
    if !kernel_test("a_pending_request_survives_a_sigkill_takeover") {
        return;
    }
    let (mut d, pay, _keys) = start(&[]);
    assert_eq!(call(&d, &pay), probe::EPERM);
    let id = d.wait_status("a pending request", 10, |s| {
        s["approvals"].as_array().is_some_and(|a| a.len() == 1)
    })["approvals"][0]["id"]
        .to_string();
    // Let the housekeeping tick write it (requests come from kernel
    // records, not commands).
    std::thread::sleep(Duration::from_millis(1500));
    d.kill();
    d.restart();
    let dir = d.socket.parent().expect("socket dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let list = pending(&d);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"].to_string(), id, "same id after the takeover");
    assert!(as_user(&d, ALICE, &["approve", &id]).status.success());
    let out = as_user(&d, BOB, &["approve", &id]);
    assert!(out.status.success(), "{}", err(&out));
    assert_eq!(call(&d, &pay), probe::OK, "granted after the takeover");
}
