//! Real-kernel tests of signed launch tokens: an orchestrator that is not
//! root (an unprivileged uid in the daemon's `--control-group`) launches
//! agents with `agent-guard run --token`; the fence holds as for a root
//! launch, the token's principal is on every record of the tree, and each
//! kind of bad token is refused with its own error and audit record.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use agent_guard_tests::{
    AsUser as _, Daemon, Listener, agent_guard_bin, dump, kernel_test, probe, probe_bin,
};
use serde_json::Value;

/// The orchestrator's uid and the control group's gid: no such user or
/// group needs to exist, the kernel only compares numbers.
const ORCH_UID: u32 = 64_101;
const CONTROL_GID: u32 = 64_100;
const NODE: &str = "test-node";

struct Setup {
    d: Daemon,
    tool: Listener,
    other: Listener,
    keys: tempfile::TempDir,
}

/// Runs `cmd` (`what` names it if it cannot start); its stdout, asserting
/// it exits 0.
fn stdout_of(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().expect(what);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn keygen(dir: &Path, name: &str) -> String {
    let mut cmd = Command::new(agent_guard_bin());
    cmd.args(["token", "keygen", "--out"]).arg(dir.join(name));
    stdout_of(&mut cmd, "keygen").trim().to_string()
}

/// The test's directory is 0700; the orchestrator must reach the socket.
fn open_socket_dir(d: &Daemon) {
    let dir = d.socket.parent().expect("socket dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
}

fn setup() -> Setup {
    let keys = tempfile::tempdir().expect("tempdir");
    let acme = keygen(keys.path(), "acme.key");
    let acme2 = keygen(keys.path(), "acme2.key");
    let globex = keygen(keys.path(), "globex.key");
    let tool = Listener::tcp("127.0.0.1");
    let other = Listener::tcp("127.0.0.1");
    let policy = format!(
        r#"
default_mode = "enforce"

[[tenant]]
name = "acme"
token_keys = ["{acme}", "{acme2}"]

[[tenant]]
name = "globex"
token_keys = ["{globex}"]

[[tool]]
name = "search"
endpoints = [{{ cidr = "127.0.0.1/32", port = {t} }}]

[[tool]]
name = "other"
endpoints = [{{ cidr = "127.0.0.1/32", port = {o} }}]

[[agent]]
tenant = "acme"
name = "researcher"
tools = ["search"]
max_delegation_depth = 1

[[agent]]
tenant = "globex"
name = "bot"
tools = ["search", "other"]
"#,
        t = tool.port,
        o = other.port
    );
    let gid = CONTROL_GID.to_string();
    let d = Daemon::start_with(
        &policy,
        &[
            "--control-group",
            &gid,
            "--node-id",
            NODE,
            "--token-clock-skew",
            "0s",
        ],
    );
    open_socket_dir(&d);
    Setup {
        d,
        tool,
        other,
        keys,
    }
}

impl Setup {
    fn key(&self, name: &str) -> PathBuf {
        self.keys.path().join(name)
    }

    /// `token issue` with `args`, written to a file the orchestrator can read.
    fn token(&self, key: &str, args: &[&str]) -> PathBuf {
        let mut cmd = Command::new(agent_guard_bin());
        cmd.args(["token", "issue", "--key"])
            .arg(self.key(key))
            .args(args);
        self.write_token(&stdout_of(&mut cmd, "issue"))
    }

    /// A token for acme/researcher with audience `aud`, signed with `key`,
    /// with `extra` arguments to `token issue`.
    fn researcher_token(&self, key: &str, aud: &str, extra: &[&str]) -> PathBuf {
        let mut args = vec!["--tenant", "acme", "--agent", "researcher", "--aud", aud];
        args.extend_from_slice(extra);
        self.token(key, &args)
    }

    fn write_token(&self, text: &str) -> PathBuf {
        let n = std::fs::read_dir(self.keys.path()).map_or(0, |d| d.count());
        let path = self.keys.path().join(format!("t{n}.jwt"));
        std::fs::write(&path, text.trim()).expect("write token");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::set_permissions(self.keys.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        path
    }

    /// `run --token FILE -- probe ARGS` as (`uid`, primary `gid`).
    fn launch(&self, uid: u32, gid: u32, token: &Path, probe_args: &[String]) -> Output {
        self.launch_with(uid, gid, &[], token, probe_args)
    }

    /// `run RUN_ARGS --socket S --token FILE -- probe ARGS` as (`uid`,
    /// primary `gid`).
    fn launch_with(
        &self,
        uid: u32,
        gid: u32,
        run_args: &[&str],
        token: &Path,
        probe_args: &[String],
    ) -> Output {
        let mut cmd = Command::new(agent_guard_bin());
        cmd.arg("run")
            .args(run_args)
            .arg("--socket")
            .arg(&self.d.socket)
            .arg("--token")
            .arg(token)
            .arg("--")
            .arg(probe_bin())
            .args(probe_args)
            .stdin(Stdio::null())
            .as_user(uid, gid);
        cmd.output().expect("run --token")
    }

    fn connect(&self, port: u16) -> Vec<String> {
        vec!["tcp".into(), "127.0.0.1".into(), port.to_string()]
    }
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn controls(recs: &[Value]) -> Vec<Value> {
    recs.iter()
        .filter(|r| r["kind"] == "control")
        .cloned()
        .collect()
}

#[test]
fn an_unprivileged_orchestrator_launches_a_fenced_agent_with_a_token() {
    if !kernel_test("an_unprivileged_orchestrator_launches_a_fenced_agent_with_a_token") {
        return;
    }
    let s = setup();
    let t = s.researcher_token(
        "acme.key",
        NODE,
        &["--on-behalf-of", "alice@example.com", "--jti", "launch-1"],
    );
    let args = s.connect(s.tool.port);
    let out = s.launch(ORCH_UID, CONTROL_GID, &t, &args);
    assert_eq!(code(&out), probe::OK, "{}", stderr(&out));
    // A second key of the same tenant works too (rotation), and the fence
    // holds for a token launch as for any.
    let t2 = s.researcher_token("acme2.key", "*", &[]);
    let args = s.connect(s.other.port);
    let out = s.launch(ORCH_UID, CONTROL_GID, &t2, &args);
    assert_eq!(
        code(&out),
        probe::EPERM,
        "not a tool of researcher: {}",
        stderr(&out)
    );

    let recs = s.d.wait_audit("acme", "the token launch's records", |r| {
        r.iter().filter(|x| x["kind"] == "connect").count() >= 2
    });
    let mine: Vec<&Value> = recs.iter().filter(|x| x["jti"] == "launch-1").collect();
    let kinds: Vec<&str> = mine.iter().filter_map(|x| x["kind"].as_str()).collect();
    assert!(
        kinds.contains(&"connect") && kinds.contains(&"exec") && kinds.contains(&"control"),
        "records of the tree carry the jti: {kinds:?}\n{}",
        dump(&recs)
    );
    assert!(
        mine.iter()
            .all(|x| x["on_behalf_of"] == "alice@example.com"),
        "{}",
        dump(&recs)
    );
    let c = controls(&recs);
    let launch = c
        .iter()
        .find(|x| x["jti"] == "launch-1")
        .expect("control record of the launch");
    assert_eq!(launch["verdict"], "allow");
    assert_eq!(launch["op"], "run");
    assert_eq!(launch["uid"], ORCH_UID);
    let connect = mine
        .iter()
        .find(|x| x["kind"] == "connect")
        .expect("connect");
    assert_eq!(
        (connect["verdict"].as_str(), connect["tool"].as_str()),
        (Some("allow"), Some("search"))
    );
}

#[test]
fn bad_tokens_are_refused_each_with_its_own_reason_and_record() {
    if !kernel_test("bad_tokens_are_refused_each_with_its_own_reason_and_record") {
        return;
    }
    let mut s = setup();
    let issue = |key: &str, extra: &[&str]| s.researcher_token(key, NODE, extra);
    let good = issue("acme.key", &["--jti", "once"]);
    let forged_tenant = issue("globex.key", &["--jti", "x1"]);
    let expired = issue("acme.key", &["--valid-for", "1s", "--jti", "x2"]);
    let early = issue("acme.key", &["--not-before", "1h", "--jti", "x3"]);
    let elsewhere = s.researcher_token("acme.key", "node-9", &["--jti", "x4"]);
    let too_many_tools = issue("acme.key", &["--tools", "search,other", "--jti", "x5"]);
    let unknown_agent = {
        let a = [
            "--tenant", "acme", "--agent", "ghost", "--aud", NODE, "--jti", "x6",
        ];
        s.token("acme.key", &a)
    };
    let text = std::fs::read_to_string(&good).expect("token");
    let (signed, sig) = text.rsplit_once('.').expect("jws");
    let flipped: String = sig
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 3 {
                if c == 'A' { 'B' } else { 'A' }
            } else {
                c
            }
        })
        .collect();
    let bad_sig = s.write_token(&format!("{signed}.{flipped}"));
    let claims = signed.split('.').nth(1).expect("claims");
    // {"alg":"none"}
    let alg_none = s.write_token(&format!("eyJhbGciOiJub25lIn0.{claims}."));
    let garbage = s.write_token("not-a-token");
    std::thread::sleep(std::time::Duration::from_millis(2100));

    let args = s.connect(s.tool.port);
    let cases: [(&Path, &str, &str); 9] = [
        (
            &forged_tenant,
            "token_wrong_tenant",
            "signed by a key of tenant \"globex\"",
        ),
        (&expired, "token_expired", "expired"),
        (&early, "token_not_yet_valid", "not valid for another"),
        (&elsewhere, "token_wrong_audience", "node-9"),
        (&too_many_tools, "token_tools_outside_policy", "other"),
        (&unknown_agent, "token_unknown_agent", "acme/ghost"),
        (&bad_sig, "token_bad_signature", "does not verify"),
        (&alg_none, "token_bad_algorithm", "\"none\""),
        (&garbage, "token_malformed", "compact JWS"),
    ];
    for (token, _, msg) in &cases {
        let out = s.launch(ORCH_UID, CONTROL_GID, token, &args);
        assert_eq!(code(&out), 125, "{msg}: {}", stderr(&out));
        assert!(stderr(&out).contains(msg), "want {msg:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("nothing was started"),
            "{}",
            stderr(&out)
        );
    }
    // Used once, then never again; not even after a restart.
    let out = s.launch(ORCH_UID, CONTROL_GID, &good, &args);
    assert_eq!(code(&out), probe::OK, "{}", stderr(&out));
    let out = s.launch(ORCH_UID, CONTROL_GID, &good, &args);
    assert_eq!(code(&out), 125);
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));
    let fresh = issue("acme.key", &["--jti", "fresh"]);
    s.d.stop();
    s.d.restart();
    open_socket_dir(&s.d);
    let out = s.launch(ORCH_UID, CONTROL_GID, &good, &args);
    assert_eq!(code(&out), 125, "a restart must not reopen a used token");
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));

    // Who may use a token at all: root, or the control group; nobody else.
    let out = s.launch(ORCH_UID, ORCH_UID, &fresh, &args);
    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out).contains("neither root nor in the control group"),
        "{}",
        stderr(&out)
    );
    // Without a token, a non-root caller may launch nothing.
    let out = {
        let mut cmd = Command::new(agent_guard_bin());
        cmd.args(["run", "--socket"])
            .arg(&s.d.socket)
            .args(["--tenant", "acme", "--agent", "researcher", "--"])
            .arg(probe_bin())
            .args(&args)
            .as_user(ORCH_UID, CONTROL_GID);
        cmd.output().expect("run")
    };
    assert_eq!(code(&out), 125);
    assert!(stderr(&out).contains("root only"), "{}", stderr(&out));
    // A tagged process cannot launch with a token (it could only widen).
    let bin = agent_guard_bin();
    let pr = probe_bin();
    let inner = [
        bin.to_str().expect("utf-8"),
        "run",
        "--socket",
        s.d.socket.to_str().expect("utf-8"),
        "--token",
        fresh.to_str().expect("utf-8"),
        "--",
        pr.to_str().expect("utf-8"),
        "tcp",
        "127.0.0.1",
        &s.tool.port.to_string(),
    ];
    let out = s.d.run("globex", "bot", &inner);
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot launch with a token"),
        "{}",
        stderr(&out)
    );

    let recs =
        s.d.wait_audit("acme", "a refusal record per bad token", |r| {
            controls(r)
                .iter()
                .filter(|x| x["verdict"] == "deny")
                .count()
                >= cases.len() - 1
        });
    let reasons: Vec<String> = controls(&recs)
        .iter()
        .filter(|x| x["verdict"] == "deny")
        .filter_map(|x| x["reason"].as_str().map(str::to_string))
        .collect();
    for (_, reason, _) in &cases {
        if *reason == "token_malformed" {
            continue; // names no tenant: recorded in the node log
        }
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} record: {reasons:?}\n{}",
            dump(&recs)
        );
    }
    assert!(reasons.iter().any(|r| r == "token_replayed"), "{reasons:?}");
    let node = s.d.audit("_node");
    assert!(
        controls(&node)
            .iter()
            .any(|x| x["reason"] == "token_malformed"),
        "{}",
        dump(&node)
    );
}

/// In a pod the launcher has a cgroup namespace of its own: its
/// /proc/self/cgroup reads `/../<path>` once the daemon moved it out of the
/// namespace's root. It must still confirm its fencing.
#[test]
fn a_launcher_in_its_own_cgroup_namespace_confirms_its_fencing() {
    if !kernel_test("a_launcher_in_its_own_cgroup_namespace_confirms_its_fencing") {
        return;
    }
    let s = setup();
    let t = s.researcher_token("acme.key", NODE, &[]);
    // The namespace's root is a cgroup of the test's own, a sibling of the
    // agent cgroups: once moved, the launcher sees `/../...`.
    let ns_root =
        agent_guard_tests::cgroup2_mount().join(format!("ag-test-ns-{}", std::process::id()));
    std::fs::create_dir_all(&ns_root).expect("cgroup");
    let script = format!(
        "echo $$ > {root}/cgroup.procs && exec unshare --cgroup setpriv --reuid {uid} --regid {gid} --clear-groups \"$@\"",
        root = ns_root.display(),
        uid = ORCH_UID,
        gid = CONTROL_GID,
    );
    let out = Command::new("sh")
        .args(["-c", &script, "sh"])
        .arg(agent_guard_bin())
        .arg("run")
        .arg("--socket")
        .arg(&s.d.socket)
        .arg("--token")
        .arg(&t)
        .arg("--")
        .arg(probe_bin())
        .args(["tcp", "127.0.0.1", &s.tool.port.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("sh");
    let _ = std::fs::remove_dir(&ns_root);
    assert_eq!(code(&out), probe::OK, "{}", stderr(&out));
}

/// INTERFACE.md writes `run --tenant T --agent A --token FILE`: the names
/// may be given, and must be the token's (they never override it).
#[test]
fn tenant_and_agent_given_with_a_token_must_be_the_tokens() {
    if !kernel_test("tenant_and_agent_given_with_a_token_must_be_the_tokens") {
        return;
    }
    let s = setup();
    let launch = |tenant: &str, agent: &str, jti: &str| {
        let t = s.researcher_token("acme.key", NODE, &["--jti", jti]);
        let run_args = ["--tenant", tenant, "--agent", agent];
        s.launch_with(
            ORCH_UID,
            CONTROL_GID,
            &run_args,
            &t,
            &s.connect(s.tool.port),
        )
    };
    let out = launch("acme", "researcher", "named-1");
    assert_eq!(code(&out), probe::OK, "{}", stderr(&out));
    let out = launch("globex", "bot", "named-2");
    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out)
            .contains("the token is for acme/researcher, but --tenant/--agent say globex/bot"),
        "{}",
        stderr(&out)
    );
}
