//! Real-kernel tests of Unix socket endpoints (`cgroup/connect_unix`,
//! `cgroup/sendmsg_unix`): real Unix socket servers, real tagged processes.

use std::{
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr as UnixAddr, UnixDatagram, UnixListener},
    },
    path::{Path, PathBuf},
};

use agent_guard_tests::{Agent, Daemon, Endpoint, Policy, kernel_test, probe};
use serde_json::Value;

/// Unix socket servers in a private directory: two stream listeners, two
/// datagram sockets and two abstract listeners, one of each allowed.
struct Servers {
    dir: tempfile::TempDir,
    _held: Vec<UnixListener>,
    _dgrams: Vec<UnixDatagram>,
    abstract_ok: String,
    abstract_other: String,
}

impl Servers {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("agent-guard-unix-")
            .tempdir()
            .expect("tempdir");
        let mut held = Vec::new();
        for name in ["allowed.sock", "other.sock"] {
            held.push(UnixListener::bind(dir.path().join(name)).expect("bind stream"));
        }
        let mut dgrams = Vec::new();
        for name in ["dgram-allowed.sock", "dgram-other.sock"] {
            dgrams.push(UnixDatagram::bind(dir.path().join(name)).expect("bind dgram"));
        }
        let tag = format!(
            "agent-guard-test-{}-{}",
            std::process::id(),
            dir.path().display()
        )
        .replace('/', "-");
        let abstract_ok = format!("@{tag}-ok");
        let abstract_other = format!("@{tag}-other");
        for name in [&abstract_ok, &abstract_other] {
            let addr = UnixAddr::from_abstract_name(&name.as_bytes()[1..]).expect("abstract");
            held.push(UnixListener::bind_addr(&addr).expect("bind abstract"));
        }
        Self {
            dir,
            _held: held,
            _dgrams: dgrams,
            abstract_ok,
            abstract_other,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir
            .path()
            .join(name)
            .to_str()
            .expect("utf-8")
            .to_string()
    }

    fn policy(&self, researcher_tools: &[&str]) -> Policy {
        Policy::new()
            .tenant("acme")
            .tool(
                "local-proxy",
                [
                    Endpoint::unix(self.path("allowed.sock")),
                    Endpoint::unix(self.path("dgram-allowed.sock")),
                    Endpoint::unix(&self.abstract_ok),
                ],
            )
            .tool("runtime", [Endpoint::unix(self.path("other.sock"))])
            .agent("acme", "researcher", researcher_tools)
            // Without the launcher's hardening, so the kernel hooks alone are tested.
            .with_agent(Agent::new("acme", "lab", &["local-proxy"]).hardening("off"))
    }
}

fn unix_records(recs: &[Value]) -> Vec<Value> {
    recs.iter()
        .filter(|r| r["proto"] == "unix" && r["kind"] != "policy")
        .cloned()
        .collect()
}

fn record_for<'a>(recs: &'a [Value], dst: &str, verdict: &str) -> Option<&'a Value> {
    recs.iter()
        .find(|r| r["dst"] == dst && r["verdict"] == verdict)
}

#[test]
fn only_listed_unix_sockets_are_reachable() {
    if !kernel_test("only_listed_unix_sockets_are_reachable") {
        return;
    }
    let s = Servers::new();
    let d = Daemon::start(&s.policy(&["local-proxy"]).build());
    let st = d.status();
    assert_eq!(
        st["unix_socket_fencing"]["enforced"], true,
        "status: {st:#}"
    );
    let programs = st["programs"].to_string();
    assert!(programs.contains("cgroup/connect_unix"), "{programs}");
    assert!(programs.contains("cgroup/sendmsg_unix"), "{programs}");

    let allowed = s.path("allowed.sock");
    let other = s.path("other.sock");
    for agent in ["researcher", "lab"] {
        assert_eq!(
            d.probe("acme", agent, &["unix", &allowed]),
            probe::OK,
            "{agent}"
        );
        assert_eq!(
            d.probe("acme", agent, &["unix", &other]),
            probe::EPERM,
            "{agent}"
        );
        assert_eq!(
            d.probe("acme", agent, &["unix", &s.abstract_ok]),
            probe::OK,
            "{agent}"
        );
        assert_eq!(
            d.probe("acme", agent, &["unix", &s.abstract_other]),
            probe::EPERM,
            "{agent}"
        );
        assert_eq!(
            d.probe(
                "acme",
                agent,
                &["unix-dgram", &s.path("dgram-allowed.sock")]
            ),
            probe::OK,
            "{agent}"
        );
        assert_eq!(
            d.probe("acme", agent, &["unix-dgram", &s.path("dgram-other.sock")]),
            probe::EPERM,
            "{agent}"
        );
    }
    // Untagged processes are not fenced.
    std::os::unix::net::UnixStream::connect(&other).expect("untagged connect");

    let recs = d.wait_audit("acme", "unix decisions", |r| unix_records(r).len() >= 12);
    let u = unix_records(&recs);
    let ok = record_for(&u, &allowed, "allow").expect("allow record");
    assert_eq!(ok["tool"], "local-proxy", "{ok}");
    assert_eq!(ok["reason"], "granted");
    assert_eq!(ok["kind"], "connect");
    let no = record_for(&u, &other, "deny").expect("deny record");
    assert_eq!(no["reason"], "no_capability", "{no}");
    assert!(no["tool"].is_null(), "{no}");
    assert!(
        record_for(&u, &s.abstract_other, "deny").is_some(),
        "abstract deny recorded"
    );
    let dg = record_for(&u, &s.path("dgram-other.sock"), "deny").expect("dgram deny");
    assert_eq!(dg["kind"], "sendmsg", "{dg}");
}

/// The kernel matches the exact bytes the caller passes: other spellings
/// of a listed path, symlinks to an unlisted socket and relative paths
/// are all refused (fail closed).
#[test]
fn other_spellings_and_symlinks_do_not_reach_unlisted_sockets() {
    if !kernel_test("other_spellings_and_symlinks_do_not_reach_unlisted_sockets") {
        return;
    }
    let s = Servers::new();
    let d = Daemon::start(&s.policy(&["local-proxy"]).build());
    let dir = s.dir.path();
    // A symlink the agent could plant, pointing at an unlisted socket.
    let link = dir.join("link.sock");
    std::os::unix::fs::symlink(dir.join("other.sock"), &link).expect("symlink");
    let double = format!("{}//allowed.sock", dir.display());
    let dotted = format!("{}/./allowed.sock", dir.display());
    for target in [link.to_str().expect("utf-8"), &double, &dotted] {
        assert_eq!(
            d.probe("acme", "lab", &["unix", target]),
            probe::EPERM,
            "{target}"
        );
    }
    // A relative path from inside the directory.
    let out = run_in(&d, dir, &["unix", "allowed.sock"]);
    assert_eq!(out, probe::EPERM, "relative path");

    // Bytes after a NUL inside sun_path: the kernel connects to the part
    // before it, and so the hook judges that part.
    let allowed = s.path("allowed.sock");
    let other = s.path("other.sock");
    assert_eq!(
        d.probe("acme", "lab", &["unix-nul", &other, &allowed]),
        probe::EPERM,
        "unlisted path with a listed one hidden after the NUL"
    );
    assert_eq!(
        d.probe("acme", "lab", &["unix-nul", &allowed, "trailing"]),
        probe::OK,
        "listed path with junk after the NUL"
    );
    // io_uring's connect goes through the same hook.
    assert_eq!(
        d.probe("acme", "lab", &["uring-connect-unix", &other]),
        probe::EPERM
    );
    assert_eq!(
        d.probe("acme", "lab", &["uring-connect-unix", &allowed]),
        probe::OK
    );
}

fn run_in(d: &Daemon, cwd: &Path, args: &[&str]) -> i32 {
    let mut cmd = d.launch("acme", "lab").probe_command(args);
    cmd.current_dir(cwd);
    cmd.status().expect("run").code().unwrap_or(-1)
}

/// The control socket stays reachable for every tagged process (sub-agents
/// are started through it), even one with no Unix tool at all, but only
/// under its abstract name: the path is judged like any other socket, so
/// an agent that could swap the path's file for a symlink gains nothing.
#[test]
fn the_control_socket_stays_reachable_for_tagged_processes() {
    if !kernel_test("the_control_socket_stays_reachable_for_tagged_processes") {
        return;
    }
    let s = Servers::new();
    let d = Daemon::start(&s.policy(&[]).build());
    let abstract_name = d.status()["daemon"]["socket_abstract"]
        .as_str()
        .expect("socket_abstract")
        .to_string();
    assert!(
        abstract_name.starts_with("@agent-guard-"),
        "{abstract_name}"
    );
    assert_eq!(
        d.probe("acme", "researcher", &["unix", &abstract_name]),
        probe::OK
    );
    let sock = d.socket.to_str().expect("utf-8").to_string();
    assert_eq!(
        d.probe("acme", "researcher", &["unix", &sock]),
        probe::EPERM
    );
    assert_eq!(
        d.probe("acme", "researcher", &["unix", &s.path("allowed.sock")]),
        probe::EPERM
    );
    // And a sub-agent can still be started from inside the agent.
    let (code, err) = d.sub_agent("acme", "lab", &["--agent", "helper"], &["pid"]);
    assert_eq!(code, probe::OK, "{err}");
    let recs = d.wait_audit("acme", "control socket record", |r| {
        r.iter().any(|x| x["reason"] == "control_socket")
    });
    let rec = recs
        .iter()
        .find(|x| x["reason"] == "control_socket")
        .expect("record");
    assert_eq!(rec["verdict"], "allow");
    assert_eq!(rec["dst"], abstract_name.as_str());
}

/// Grants, task scopes and reloads work for Unix tools as for IP tools.
#[test]
fn unix_tools_follow_grants_task_scopes_and_reloads() {
    if !kernel_test("unix_tools_follow_grants_task_scopes_and_reloads") {
        return;
    }
    let s = Servers::new();
    let d = Daemon::start(&s.policy(&["local-proxy"]).build());
    let other = s.path("other.sock");
    let allowed = s.path("allowed.sock");

    // A grant of the `runtime` tool opens other.sock; revoke closes it.
    assert_eq!(
        d.probe("acme", "researcher", &["unix", &other]),
        probe::EPERM
    );
    let id = d.grant("acme", "researcher", &["--tool", "runtime", "--ttl", "5m"]);
    assert_eq!(d.probe("acme", "researcher", &["unix", &other]), probe::OK);
    d.revoke(id);
    assert_eq!(
        d.probe("acme", "researcher", &["unix", &other]),
        probe::EPERM
    );

    // A task scope without the tool loses it.
    let out = d
        .launch("acme", "researcher")
        .task("no local sockets")
        .tools("")
        .probe(&["unix", &allowed]);
    assert_eq!(
        out.status.code(),
        Some(probe::EPERM),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A reload that drops the endpoint closes it; one that adds it back
    // opens it again.
    let narrowed = s
        .policy(&["local-proxy"])
        .edit_tool("local-proxy", |t| {
            t.without_endpoint(&Endpoint::unix(&allowed))
        })
        .build();
    assert!(!narrowed.contains(&allowed));
    apply(&d, &narrowed);
    assert_eq!(
        d.probe("acme", "researcher", &["unix", &allowed]),
        probe::EPERM
    );
    apply(&d, &s.policy(&["local-proxy"]).build());
    assert_eq!(
        d.probe("acme", "researcher", &["unix", &allowed]),
        probe::OK
    );
}

fn apply(d: &Daemon, policy: &str) {
    let f: PathBuf = d.dir.path().join("next.toml");
    std::fs::write(&f, policy).expect("write policy");
    let out = d.cli(&["policy", "apply", f.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Without the hooks (here turned off; on kernels before 6.7 they are
/// missing), Unix sockets are not fenced, and `status` and `doctor` say
/// so instead of implying they are.
#[test]
fn status_and_doctor_say_when_unix_sockets_are_not_fenced() {
    if !kernel_test("status_and_doctor_say_when_unix_sockets_are_not_fenced") {
        return;
    }
    let s = Servers::new();
    let d = Daemon::start_with(&s.policy(&[]).build(), &["--unix-fencing", "off"]);
    let st = d.status();
    assert_eq!(st["unix_socket_fencing"]["enforced"], false, "{st:#}");
    assert!(
        st["unix_socket_fencing"]["why"]
            .as_str()
            .is_some_and(|w| w.contains("turned off")),
        "{st:#}"
    );
    assert!(!st["programs"].to_string().contains("connect_unix"));
    // Really unfenced: a socket no tool lists is reachable.
    assert_eq!(
        d.probe("acme", "researcher", &["unix", &s.path("other.sock")]),
        probe::OK
    );
    let out = d.cli(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("does not fence Unix sockets"),
        "doctor: {text}"
    );
    let out = d.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("NOT fenced"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// With `--flow-records`, allowed calls to a listed socket are counted in
/// the kernel under the path's id: the audit trail names the path and the
/// call count; a refused call still gets its own record with its path.
#[test]
fn flow_records_count_unix_calls_under_their_path() {
    if !kernel_test("flow_records_count_unix_calls_under_their_path") {
        return;
    }
    let s = Servers::new();
    let d = Daemon::start_with(
        &s.policy(&["local-proxy"]).build(),
        &["--flow-records", "--flow-interval", "1s"],
    );
    let allowed = s.path("allowed.sock");
    let other = s.path("other.sock");
    assert_eq!(
        d.probe("acme", "researcher", &["bench-unix", &allowed, "40"]),
        probe::OK
    );
    assert_eq!(
        d.probe("acme", "researcher", &["unix", &other]),
        probe::EPERM
    );
    let counted = |recs: &[Value]| -> u64 {
        unix_records(recs)
            .iter()
            .filter(|r| r["dst"] == allowed.as_str() && r["verdict"] == "allow")
            .map(|r| r["calls"].as_u64().unwrap_or(1))
            .sum()
    };
    let recs = d.wait_audit("acme", "40 counted calls and the refused one", |r| {
        counted(r) >= 40 && record_for(&unix_records(r), &other, "deny").is_some()
    });
    assert_eq!(counted(&recs), 40, "each call counted once");
    let u = unix_records(&recs);
    let flows: Vec<&Value> = u
        .iter()
        .filter(|r| r["dst"] == allowed.as_str() && r["verdict"] == "allow")
        .collect();
    assert!(
        flows.iter().all(|r| r["calls"].as_u64().is_some()),
        "allowed calls come as flow records: {flows:#?}"
    );
    assert!(flows.len() < 40, "counted, not one record each: {flows:#?}");
    assert_eq!(flows[0]["tool"], "local-proxy", "{:#}", flows[0]);
    let no = record_for(&u, &other, "deny").expect("deny record");
    assert!(no["calls"].is_null(), "refused calls stay per call: {no}");
}
