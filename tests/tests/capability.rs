//! Real-kernel tests of the capability lifecycle: grants (TTL, uses,
//! revoke), suspension, sub-agents, task scopes, divergence, rate limits
//! and reload.

use std::{
    process::Child,
    time::{Duration, Instant},
};

use agent_guard_tests::{
    Agent, Daemon, Endpoint, Listener, Policy, dump, kernel_test, probe, probe_bin,
};
use serde_json::Value;

struct Ports {
    search: Listener,
    payments: Listener,
    other: Listener,
}

impl Ports {
    fn new() -> Self {
        Ports {
            search: Listener::tcp_dual(),
            payments: Listener::tcp_dual(),
            other: Listener::tcp_dual(),
        }
    }
    fn s(&self) -> String {
        self.search.port.to_string()
    }
    fn p(&self) -> String {
        self.payments.port.to_string()
    }
    fn o(&self) -> String {
        self.other.port.to_string()
    }
}

/// `researcher` has search; payments only by grant; `other` is no tool.
fn policy(p: &Ports) -> Policy {
    Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tenant("globex")
        .tool("search", [Endpoint::tcp("127.0.0.1/32", p.search.port)])
        .tool("payments", [Endpoint::tcp("127.0.0.1/32", p.payments.port)])
        .with_agent(Agent::new("acme", "researcher", &["search"]).max_delegation_depth(1))
        .agent("globex", "bot", &["search"])
}

fn connects(recs: &[Value]) -> Vec<Value> {
    recs.iter()
        .filter(|r| r["kind"] == "connect")
        .cloned()
        .collect()
}

/// Starts a tagged probe that runs `args` later, without waiting for it.
fn spawn_probe(d: &Daemon, tenant: &str, agent: &str, args: &[&str]) -> Child {
    d.spawn_probe(tenant, agent, args)
}

fn wait_code(mut c: Child) -> i32 {
    c.wait().expect("wait").code().unwrap_or(-1)
}

/// The grant's id as records carry it.
fn grant(d: &Daemon, args: &[&str]) -> String {
    d.grant("acme", "researcher", args).to_string()
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("signal");
}

#[test]
fn a_grant_opens_a_tool_until_it_expires_even_while_the_daemon_is_frozen() {
    if !kernel_test("a_grant_opens_a_tool_until_it_expires_even_while_the_daemon_is_frozen") {
        return;
    }
    let p = Ports::new();
    let d = Daemon::start(&policy(&p).build());
    d.launch("acme", "researcher")
        .expect_probe(&["tcp", "127.0.0.1", &p.p()], probe::EPERM);
    let id = grant(&d, &["--tool", "payments", "--ttl", "2s"]);
    d.launch("acme", "researcher")
        .expect_probe(&["tcp", "127.0.0.1", &p.p()], probe::OK);
    // A process started now calls after the TTL, while the daemon is
    // stopped: only the kernel can refuse it.
    let late = spawn_probe(
        &d,
        "acme",
        "researcher",
        &["after", "3000", "tcp", "127.0.0.1", &p.p()],
    );
    std::thread::sleep(Duration::from_millis(300));
    signal(d.pid(), nix::sys::signal::Signal::SIGSTOP);
    let code = wait_code(late);
    signal(d.pid(), nix::sys::signal::Signal::SIGCONT);
    assert_eq!(
        code,
        probe::EPERM,
        "expired grant must deny while the daemon is frozen"
    );
    let recs = d.wait_audit("acme", "expired connect and grant records", |r| {
        connects(r).iter().any(|x| x["reason"] == "expired")
            && r.iter().any(|x| x["kind"] == "revoke")
    });
    let c = connects(&recs);
    let used: Vec<_> = c.iter().filter(|x| x["grant"] == id.as_str()).collect();
    assert_eq!(
        used.len(),
        2,
        "one allowed and one expired use of grant {id}:\n{}",
        dump(&recs)
    );
    assert_eq!(used[0]["verdict"], "allow");
    assert_eq!(used[0]["tool"], "payments");
    assert_eq!(
        (used[1]["verdict"].as_str(), used[1]["reason"].as_str()),
        (Some("deny"), Some("expired"))
    );
    let g: Vec<_> = recs.iter().filter(|x| x["kind"] == "grant").collect();
    assert_eq!(g.len(), 1);
    assert_eq!(g[0]["grant"], id.as_str());
    let r: Vec<_> = recs.iter().filter(|x| x["kind"] == "revoke").collect();
    assert_eq!(r[0]["reason"], "expired");
}

#[test]
fn a_grant_with_one_use_allows_exactly_once() {
    if !kernel_test("a_grant_with_one_use_allows_exactly_once") {
        return;
    }
    let p = Ports::new();
    let d = Daemon::start(&policy(&p).build());
    let id = grant(&d, &["--tool", "payments", "--ttl", "5m", "--uses", "1"]);
    assert_eq!(
        d.status()["grants"][0]["uses_left"],
        1,
        "uses left, as the kernel counts them"
    );
    d.expect_probes(
        "acme",
        "researcher",
        &[
            (&["tcp", "127.0.0.1", &p.p()], probe::OK),
            (&["tcp", "127.0.0.1", &p.p()], probe::EPERM),
            (&["tcp", "127.0.0.1", &p.p()], probe::EPERM),
        ],
    );
    let recs = d.wait_audit("acme", "uses_exhausted", |r| {
        connects(r)
            .iter()
            .filter(|x| x["reason"] == "uses_exhausted")
            .count()
            >= 1
            && r.iter().any(|x| x["kind"] == "revoke")
    });
    let c = connects(&recs);
    assert_eq!(
        c.iter().filter(|x| x["verdict"] == "allow").count(),
        1,
        "{}",
        dump(&recs)
    );
    assert_eq!(c[0]["grant"], id.as_str());
    // A refused call never spends a use, and the base tool is unaffected.
    d.launch("acme", "researcher")
        .expect_probe(&["tcp", "127.0.0.1", &p.s()], probe::OK);
    assert!(
        d.status()["grants"]
            .as_array()
            .is_some_and(|g| g.is_empty()),
        "spent grant is gone"
    );
}

#[test]
fn revoke_takes_effect_before_the_command_returns() {
    if !kernel_test("revoke_takes_effect_before_the_command_returns") {
        return;
    }
    let p = Ports::new();
    let d = Daemon::start(&policy(&p).build());
    let id = grant(&d, &["--tool", "payments", "--ttl", "10m"]);
    let running = spawn_probe(
        &d,
        "acme",
        "researcher",
        &["after", "1500", "tcp", "127.0.0.1", &p.p()],
    );
    d.launch("acme", "researcher")
        .expect_probe(&["tcp", "127.0.0.1", &p.p()], probe::OK);
    let status = d.status();
    assert_eq!(status["grants"][0]["id"].to_string(), id, "{status:#}");
    assert!(
        status["grants"][0]["expires_in_seconds"]
            .as_f64()
            .is_some_and(|s| s > 500.0)
    );
    d.cli_ok(&["revoke", "--grant", &id]);
    d.launch("acme", "researcher")
        .expect_probe(&["tcp", "127.0.0.1", &p.p()], probe::EPERM);
    assert_eq!(
        wait_code(running),
        probe::EPERM,
        "an already running process loses the grant too"
    );
    let out = d.cli(&["revoke", "--grant", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no active grant"));
    let recs = d.wait_audit("acme", "revoke record", |r| {
        r.iter().any(|x| x["kind"] == "revoke")
    });
    let r: Vec<_> = recs.iter().filter(|x| x["kind"] == "revoke").collect();
    assert_eq!(
        (r[0]["grant"].as_str(), r[0]["reason"].as_str()),
        (Some(id.as_str()), Some("revoked"))
    );
}

#[test]
fn a_suspended_tenant_is_denied_everything_and_resumed_allowed_again() {
    if !kernel_test("a_suspended_tenant_is_denied_everything_and_resumed_allowed_again") {
        return;
    }
    let p = Ports::new();
    let d = Daemon::start(&policy(&p).build());
    let running = spawn_probe(
        &d,
        "acme",
        "researcher",
        &["after", "1000", "tcp", "127.0.0.1", &p.s()],
    );
    d.cli_ok(&["suspend", "--tenant", "acme"]);
    d.launch("acme", "researcher")
        .expect_probe(&["tcp", "127.0.0.1", &p.s()], probe::EPERM);
    assert_eq!(wait_code(running), probe::EPERM);
    // Another tenant is untouched.
    d.launch("globex", "bot")
        .expect_probe(&["tcp", "127.0.0.1", &p.s()], probe::OK);
    assert_eq!(d.status()["suspended"][0], "acme");
    d.cli_ok(&["resume", "--tenant", "acme"]);
    d.launch("acme", "researcher")
        .expect_probe(&["tcp", "127.0.0.1", &p.s()], probe::OK);
    let recs = d.wait_audit("acme", "suspend and resume", |r| {
        r.iter().any(|x| x["kind"] == "resume")
    });
    assert!(
        connects(&recs).iter().any(|x| x["reason"] == "suspended"),
        "{}",
        dump(&recs)
    );
    assert!(recs.iter().any(|x| x["kind"] == "suspend"));
    // Agent-level suspension too, and a clear error for unknown names.
    d.cli_ok(&["suspend", "--tenant", "acme", "--agent", "researcher"]);
    d.launch("acme", "researcher")
        .expect_probe(&["tcp", "127.0.0.1", &p.s()], probe::EPERM);
    let out = d.cli(&["suspend", "--tenant", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown tenant"));
}

/// A sub-agent of the researcher (see [`Daemon::sub_agent`]).
fn sub_agent(d: &Daemon, sub_args: &[&str], probe_args: &[&str]) -> (i32, String) {
    d.sub_agent("acme", "researcher", sub_args, probe_args)
}

#[test]
fn a_sub_agent_only_ever_gets_less_than_its_parent() {
    if !kernel_test("a_sub_agent_only_ever_gets_less_than_its_parent") {
        return;
    }
    let p = Ports::new();
    let d = Daemon::start(&policy(&p).build());
    // Inherits the parent's tools, and is recorded under the chain.
    let (code, err) = sub_agent(
        &d,
        &["--agent", "summarizer"],
        &["tcp", "127.0.0.1", &p.s()],
    );
    assert_eq!(code, probe::OK, "{err}");
    let (code, _) = sub_agent(
        &d,
        &["--agent", "summarizer"],
        &["tcp", "127.0.0.1", &p.p()],
    );
    assert_eq!(code, probe::EPERM);
    // Cannot ask for a tool the parent lacks.
    let (code, err) = sub_agent(
        &d,
        &["--agent", "summarizer", "--tools", "payments"],
        &["tcp", "127.0.0.1", &p.p()],
    );
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("not in the capability set"), "{err}");
    // Narrowed to nothing: even the parent's tool is gone.
    let (code, err) = sub_agent(
        &d,
        &["--agent", "reader", "--tools", ""],
        &["tcp", "127.0.0.1", &p.s()],
    );
    assert_eq!(code, probe::EPERM, "{err}");
    // Cannot change tenant.
    let (code, err) = sub_agent(
        &d,
        &["--tenant", "globex", "--agent", "bot"],
        &["tcp", "127.0.0.1", &p.s()],
    );
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("never change tenant"), "{err}");
    // Cannot exceed max_delegation_depth (1 for researcher).
    let inner = d
        .sub_agent_cmd(&["--agent", "deeper"], &["tcp", "127.0.0.1", &p.s()])
        .join(" ");
    let (code, err) = sub_agent(&d, &["--agent", "summarizer"], &["exec-sh", &inner]);
    let _ = err;
    assert_eq!(code, 125, "depth 2 must be refused");
    let recs = d.wait_audit("acme", "sub-agent records", |r| {
        connects(r)
            .iter()
            .any(|x| x["subject"] == "acme/researcher/summarizer")
    });
    let sub: Vec<_> = connects(&recs)
        .into_iter()
        .filter(|x| x["subject"] == "acme/researcher/summarizer")
        .collect();
    assert!(
        sub.iter()
            .all(|x| x["agent"] == "researcher" && x["tenant"] == "acme"),
        "{}",
        dump(&sub)
    );
    assert!(recs.iter().any(|x| x["kind"] == "delegate"));
}

#[test]
fn revoking_the_parents_grant_takes_it_from_the_sub_agent_too() {
    if !kernel_test("revoking_the_parents_grant_takes_it_from_the_sub_agent_too") {
        return;
    }
    let p = Ports::new();
    let d = Daemon::start(&policy(&p).build());
    let id = grant(&d, &["--tool", "payments", "--ttl", "10m"]);
    // A sub-agent started with the granted tool, calling after the revoke.
    let payer = ["--agent", "payer", "--tools", "payments"];
    let cmd = d.sub_agent_cmd(&payer, &["tcp", "127.0.0.1", &p.p()]);
    let out = d.run("acme", "researcher", &cmd);
    assert_eq!(
        out.status.code(),
        Some(probe::OK),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let later = d.sub_agent_cmd(&payer, &["after", "1500", "tcp", "127.0.0.1", &p.p()]);
    let child = d.launch("acme", "researcher").spawn(&later);
    std::thread::sleep(Duration::from_millis(500));
    d.cli_ok(&["revoke", "--grant", &id]);
    assert_eq!(
        wait_code(child),
        probe::EPERM,
        "the sub-agent lost the revoked grant"
    );
}

#[test]
fn a_task_scope_narrows_tools_records_the_task_and_expires() {
    if !kernel_test("a_task_scope_narrows_tools_records_the_task_and_expires") {
        return;
    }
    let p = Ports::new();
    let d = Daemon::start(&policy(&p).build());
    let task = |tools: &str, ttl: &str, args: &[&str]| -> (i32, String) {
        let out = d
            .launch("acme", "researcher")
            .task("summarise ticket 42")
            .tools(tools)
            .ttl(ttl)
            .probe(args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(
        task("search", "1m", &["tcp", "127.0.0.1", &p.s()]).0,
        probe::OK
    );
    let (code, err) = task("payments", "1m", &["tcp", "127.0.0.1", &p.p()]);
    assert_eq!(code, 125, "not a tool of the agent: {err}");
    // TTL: the task's processes lose everything when it runs out.
    assert_eq!(
        task(
            "search",
            "1s",
            &["after", "1500", "tcp", "127.0.0.1", &p.s()]
        )
        .0,
        probe::EPERM
    );
    let recs = d.wait_audit("acme", "task records", |r| {
        connects(r).iter().any(|x| x["reason"] == "expired")
    });
    let c = connects(&recs);
    assert!(
        c.iter().all(|x| x["task"] == "summarise ticket 42"),
        "{}",
        dump(&c)
    );
    let ids: std::collections::HashSet<_> = c
        .iter()
        .map(|x| x["task_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 2, "each launch is its own task id: {}", dump(&c));
    assert!(recs.iter().any(|x| x["kind"] == "task"));
}

#[test]
fn divergence_is_counted_and_on_divergence_revokes() {
    if !kernel_test("divergence_is_counted_and_on_divergence_revokes") {
        return;
    }
    let p = Ports::new();
    let d = Daemon::start(
        &policy(&p)
            .edit_agent("acme", "researcher", |a| a.on_divergence(2, "revoke"))
            .build(),
    );
    let probe = probe_bin();
    let pp = probe.to_str().expect("utf-8");
    // One task process: search (declared), other (divergent) twice, then
    // search again, which the revoke has taken away.
    // After the revoke, a sub-agent started to get the rights back is
    // refused too.
    let sub = d
        .sub_agent_cmd(&["--agent", "escapee"], &["tcp", "127.0.0.1", &p.s()])
        .join(" ");
    let script = format!(
        "{pp} tcp 127.0.0.1 {s}; {pp} tcp 127.0.0.1 {o}; {pp} tcp 127.0.0.1 {o}; sleep 0.5; \
         {sub}; echo sub=$?; \
         exec {pp} tcp 127.0.0.1 {s}",
        s = p.s(),
        o = p.o(),
    );
    let out = d
        .launch("acme", "researcher")
        .task("fetch docs")
        .tools("search")
        .output(&["/bin/sh", "-c", &script]);
    assert_eq!(
        out.status.code(),
        Some(probe::EPERM),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sub=125"),
        "a revoked task cannot start a sub-agent: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let recs = d.wait_audit(
        "acme",
        "divergence revoke and the refused call after it",
        |r| {
            r.iter()
                .any(|x| x["kind"] == "revoke" && x["reason"] == "divergence")
                && connects(r).iter().any(|x| x["reason"] == "revoked")
        },
    );
    let c = connects(&recs);
    assert_eq!(
        c.iter().filter(|x| x["divergence"] == true).count(),
        2,
        "{}",
        dump(&c)
    );
    assert!(c.iter().any(|x| x["reason"] == "revoked"), "{}", dump(&c));
    assert!(
        d.metrics()
            .contains(r#"agent_guard_divergence_total{agent="researcher",tenant="acme"} 2"#)
    );
    // The agent itself (outside the task) is not affected.
    d.launch("acme", "researcher")
        .expect_probe(&["tcp", "127.0.0.1", &p.s()], probe::OK);
}

#[test]
fn a_rate_limit_allows_the_burst_and_denies_the_rest() {
    if !kernel_test("a_rate_limit_allows_the_burst_and_denies_the_rest") {
        return;
    }
    let p = Ports::new();
    let pol = policy(&p)
        .edit_tool("search", |t| t.rate_limit(5, "1h"))
        .build();
    assert!(pol.contains("rate_limit"));
    let d = Daemon::start(&pol);
    d.expect_probes(
        "acme",
        "researcher",
        &[
            (&["repeat", "5", "tcp", "127.0.0.1", &p.s()], probe::OK),
            (&["tcp", "127.0.0.1", &p.s()], probe::EPERM),
        ],
    );
    let recs = d.wait_audit("acme", "rate limited", |r| connects(r).len() >= 6);
    let c = connects(&recs);
    assert_eq!(c.iter().filter(|x| x["verdict"] == "allow").count(), 5);
    assert_eq!(c[5]["reason"], "rate_limited");
    assert!(d.metrics().contains(r#"reason="rate_limited""#));
}

#[test]
fn reload_under_concurrent_connects_never_allows_a_disallowed_call() {
    if !kernel_test("reload_under_concurrent_connects_never_allows_a_disallowed_call") {
        return;
    }
    let p = Ports::new();
    // A allows search; B allows search and payments; neither allows other.
    let a = policy(&p).build();
    let b = policy(&p)
        .edit_agent("acme", "researcher", |a| a.tools(&["search", "payments"]))
        .build();
    assert_ne!(a, b);
    let d = Daemon::start(&a);
    let fa = d.dir.path().join("a.toml");
    let fb = d.dir.path().join("b.toml");
    std::fs::write(&fa, &a).expect("write");
    std::fs::write(&fb, &b).expect("write");
    let s = p.s();
    let o = p.o();
    let both = spawn_probe(
        &d,
        "acme",
        "researcher",
        &["repeat", "3000", "tcp", "127.0.0.1", &s],
    );
    let neither = spawn_probe(
        &d,
        "acme",
        "researcher",
        &["repeat", "3000", "tcp", "127.0.0.1", &o],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut reloads = 0;
    let mut both = Some(both);
    let mut neither = Some(neither);
    while (both
        .as_mut()
        .is_some_and(|c| c.try_wait().ok().flatten().is_none())
        || neither
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none()))
        && Instant::now() < deadline
    {
        let f = if reloads % 2 == 0 { &fb } else { &fa };
        d.cli_ok(&["policy", "apply", f.to_str().expect("utf-8")]);
        reloads += 1;
    }
    let _ = both.take().map(wait_code);
    let _ = neither.take().map(wait_code);
    assert!(
        reloads >= 3,
        "reloads happened during the connects ({reloads})"
    );
    let recs = d.wait_audit("acme", "6000 connects", |r| connects(r).len() >= 6000);
    let c = connects(&recs);
    let wrong_deny = c
        .iter()
        .filter(|x| x["port"] == p.search.port && x["verdict"] != "allow")
        .count();
    let wrong_allow = c
        .iter()
        .filter(|x| x["port"] == p.other.port && x["verdict"] != "deny")
        .count();
    assert_eq!(
        (wrong_deny, wrong_allow),
        (0, 0),
        "across {reloads} reloads"
    );
}

/// One-address tools are judged through `CAPS_EXACT` before the trie:
/// a reload that drops one closes it, while a wider prefix that still
/// covers the address answers through the trie. (A stale exact entry under
/// an unchanged generation is what dns.rs catches: an expired answer must
/// close.)
#[test]
fn a_dropped_one_address_tool_closes_and_a_covering_prefix_still_answers() {
    if !kernel_test("a_dropped_one_address_tool_closes_and_a_covering_prefix_still_answers") {
        return;
    }
    let p = Ports::new();
    let both = policy(&p)
        .edit_agent("acme", "researcher", |a| a.tools(&["search", "payments"]))
        .build();
    let wide = policy(&p)
        .tool("loopback", [Endpoint::tcp("127.0.0.0/8", p.payments.port)])
        .edit_agent("acme", "researcher", |a| a.tools(&["search", "loopback"]))
        .build();
    let narrow = policy(&p).build();
    let d = Daemon::start(&both);
    let apply = |name: &str, text: &str| {
        let f = d.dir.path().join(name);
        std::fs::write(&f, text).expect("write");
        d.cli_ok(&["policy", "apply", f.to_str().expect("utf-8")]);
    };
    let reach = |port: &str| d.probe("acme", "researcher", &["tcp", "127.0.0.1", port]);
    // (CAPS, CAPS_EXACT) entries: only one-address entries are mirrored, and
    // a reload leaves none of the old generation behind in either.
    let maps = || {
        let m = &d.status()["maps"];
        (m["CAPS"].as_u64(), m["CAPS_EXACT"].as_u64())
    };
    let all_exact = |(caps, exact): (Option<u64>, Option<u64>)| {
        assert!(caps.is_some_and(|c| c > 0), "{caps:?}");
        assert_eq!(caps, exact, "every entry is one address");
    };
    assert_eq!((reach(&p.s()), reach(&p.p())), (probe::OK, probe::OK));
    all_exact(maps());
    let before = maps();
    apply("wide.toml", &wide);
    assert_eq!((reach(&p.s()), reach(&p.p())), (probe::OK, probe::OK));
    let (caps, exact) = maps();
    assert!(
        exact < caps,
        "the /8 entries stay out of CAPS_EXACT: {caps:?} {exact:?}"
    );
    apply("narrow.toml", &narrow);
    assert_eq!((reach(&p.s()), reach(&p.p())), (probe::OK, probe::EPERM));
    all_exact(maps());
    apply("both.toml", &both);
    assert_eq!((reach(&p.s()), reach(&p.p())), (probe::OK, probe::OK));
    assert_eq!(maps(), before, "back to the first policy's entries");
}

#[test]
fn grant_errors_are_clear_and_change_nothing() {
    if !kernel_test("grant_errors_are_clear_and_change_nothing") {
        return;
    }
    let p = Ports::new();
    let d = Daemon::start(&policy(&p).build());
    for (args, want) in [
        (vec!["--tool", "nope", "--ttl", "1m"], "unknown tool"),
        (
            vec!["--tool", "payments", "--ttl", "0s"],
            "longer than zero",
        ),
        (
            vec!["--tool", "payments", "--ttl", "1m", "--uses", "0"],
            "at least 1",
        ),
    ] {
        let out = d.try_grant("acme", "researcher", &args);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = d.try_grant("acme", "ghost", &["--tool", "payments", "--ttl", "1m"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown agent"));
    let out = d.try_grant(
        "acme",
        "researcher",
        &["--tool", "payments", "--ttl", "soon"],
    );
    assert_eq!(out.status.code(), Some(2), "clap rejects a bad duration");
    assert!(
        d.status()["grants"]
            .as_array()
            .is_some_and(|g| g.is_empty())
    );
    d.launch("acme", "researcher")
        .expect_probe(&["tcp", "127.0.0.1", &p.p()], probe::EPERM);
}

#[test]
fn a_process_tree_grant_reaches_that_tree_only() {
    if !kernel_test("a_process_tree_grant_reaches_that_tree_only") {
        return;
    }
    let p = Ports::new();
    let d = Daemon::start(&policy(&p).build());
    // Two processes of the same agent; the grant names one of them.
    let target = spawn_probe(
        &d,
        "acme",
        "researcher",
        &["after", "1500", "fork", "tcp", "127.0.0.1", &p.p()],
    );
    let sibling = spawn_probe(
        &d,
        "acme",
        "researcher",
        &["after", "1500", "tcp", "127.0.0.1", &p.p()],
    );
    std::thread::sleep(Duration::from_millis(400));
    let id = grant(
        &d,
        &[
            "--tool",
            "payments",
            "--ttl",
            "1m",
            "--pid",
            &target.id().to_string(),
        ],
    );
    assert!(!id.is_empty());
    assert_eq!(
        wait_code(target),
        probe::OK,
        "the named process (and its child) got the grant"
    );
    assert_eq!(
        wait_code(sibling),
        probe::EPERM,
        "another process of the agent did not"
    );
    let out = d.try_grant(
        "acme",
        "researcher",
        &["--tool", "payments", "--ttl", "1m", "--pid", "1"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not tagged"));
}

#[test]
fn a_tool_needing_two_person_approval_fails_closed() {
    if !kernel_test("a_tool_needing_two_person_approval_fails_closed") {
        return;
    }
    let p = Ports::new();
    let pol = policy(&p)
        .edit_tool("payments", |t| t.approval("two-person"))
        .edit_agent("acme", "researcher", |a| a.tools(&["search", "payments"]))
        .build();
    assert!(pol.contains("two-person") && pol.contains("\"search\", \"payments\""));
    let d = Daemon::start(&pol);
    d.expect_probes(
        "acme",
        "researcher",
        &[
            (&["tcp", "127.0.0.1", &p.p()], probe::EPERM),
            (&["tcp", "127.0.0.1", &p.s()], probe::OK),
        ],
    );
    let recs = d.wait_audit("acme", "approval_required", |r| connects(r).len() >= 2);
    let c = connects(&recs);
    assert_eq!(
        (c[0]["reason"].as_str(), c[0]["tool"].as_str()),
        (Some("approval_required"), Some("payments"))
    );
    let out = d.try_grant("acme", "researcher", &["--tool", "payments", "--ttl", "1m"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("two-person approval"));
}

#[test]
fn finished_tasks_and_sub_agents_are_retired_from_the_kernel() {
    if !kernel_test("finished_tasks_and_sub_agents_are_retired_from_the_kernel") {
        return;
    }
    let p = Ports::new();
    let d = Daemon::start_with(&policy(&p).build(), &["--idle-subject-age", "1s"]);
    let baseline = d.status()["maps"]["SUBJECTS"].as_u64().expect("subjects");
    let caps = d.status()["maps"]["CAPS"].as_u64().expect("caps");
    for _ in 0..3 {
        let out = d
            .launch("acme", "researcher")
            .task("t")
            .tools("search")
            .probe(&["tcp", "127.0.0.1", &p.s()]);
        assert_eq!(out.status.code(), Some(probe::OK));
    }
    let (code, err) = sub_agent(&d, &["--agent", "helper"], &["tcp", "127.0.0.1", &p.s()]);
    assert_eq!(code, probe::OK, "{err}");
    assert_eq!(
        d.status()["maps"]["SUBJECTS"].as_u64(),
        Some(baseline + 4),
        "one subject per launch"
    );
    // A live task is not retired.
    let live = spawn_probe(
        &d,
        "acme",
        "researcher",
        &["after", "4000", "tcp", "127.0.0.1", &p.s()],
    );
    d.wait_status("idle subjects to be retired", 15, |s| {
        s["maps"]["SUBJECTS"].as_u64() == Some(baseline) && s["maps"]["CAPS"].as_u64() == Some(caps)
    });
    assert_eq!(
        wait_code(live),
        probe::OK,
        "the root agent's live process kept its rights"
    );
    let leftover: Vec<_> = std::fs::read_dir(d.cgroup_root.join("acme/researcher"))
        .expect("agent cgroup")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name())
        .collect();
    assert!(
        leftover.is_empty(),
        "task and sub-agent cgroups removed: {leftover:?}"
    );
}
