//! Real-kernel tests of `whois`: a tool server asks who is on the other
//! end of a connection it accepted; the answer comes from the socket cookie
//! the connect program recorded, found by 4-tuple through sock_diag. Also
//! runs the example tool server (examples/tool_server.py), which refuses
//! callers of another tenant and untagged ones.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use agent_guard_tests::{AsUser as _, Daemon, agent_guard_bin, free_port, kernel_test, probe_bin};
use serde_json::Value;

const CONTROL_GID: u32 = 64_100;

fn policy(port: u16) -> String {
    format!(
        r#"
default_mode = "enforce"

[[tenant]]
name = "acme"

[[tenant]]
name = "globex"

[[tool]]
name = "svc"
endpoints = [{{ cidr = "127.0.0.1/32", port = {port} }}, {{ cidr = "::1/128", port = {port} }}]

[[agent]]
tenant = "acme"
name = "researcher"
tools = ["svc"]

[[agent]]
tenant = "globex"
name = "bot"
tools = ["svc"]
"#
    )
}

fn whois(d: &Daemon, uid: u32, peer: &str, local: &str) -> (i32, Value, String) {
    let out = d.cli_as(
        uid,
        uid,
        &["whois", "--peer", peer, "--local", local, "--json"],
    );
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn addr(a: std::net::SocketAddr) -> String {
    a.to_string()
}

#[test]
fn whois_names_the_agent_behind_a_connection_from_the_kernels_view() {
    if !kernel_test("whois_names_the_agent_behind_a_connection_from_the_kernels_view") {
        return;
    }
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = server.local_addr().expect("addr").port();
    let gid = CONTROL_GID.to_string();
    let d = Daemon::start_with(&policy(port), &["--control-group", &gid]);
    let dir = d.socket.parent().expect("socket dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let port_s = port.to_string();
    let mut agent = d.spawn_probe("acme", "researcher", &["tcp-call", "127.0.0.1", &port_s]);
    server.set_nonblocking(false).expect("blocking");
    let (mut conn, peer) = server.accept().expect("accept");
    let local = conn.local_addr().expect("local");
    let (code, v, err) = whois(&d, 0, &addr(peer), &addr(local));
    assert_eq!(code, 0, "{err} {v}");
    assert_eq!(v["tagged"], true, "{v}");
    assert_eq!(v["tenant"], "acme");
    assert_eq!(v["agent"], "researcher");
    assert_eq!(v["subject"], "acme/researcher");
    assert_eq!(v["tool"], "svc");
    assert_eq!(v["pid"], agent.id(), "the probe's own pid: {v}");
    assert!(
        v["exe"]
            .as_str()
            .is_some_and(|e| e.ends_with("agent-guard-probe")),
        "{v}"
    );
    // A member of the control group may ask too (read-only), nobody else.
    let (code, v2, err) = whois(&d, 64_101, &addr(peer), &addr(local));
    assert_eq!(code, 1, "{v2}");
    assert!(
        err.contains("refused") && err.contains("root only"),
        "{err}"
    );
    let mut member = Command::new(agent_guard_bin());
    member
        .args([
            "whois",
            "--peer",
            &addr(peer),
            "--local",
            &addr(local),
            "--json",
        ])
        .env("AGENT_GUARD_SOCKET", &d.socket)
        .as_user(64_101, CONTROL_GID);
    let out = member.output().expect("whois");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    conn.write_all(b"ok\n").expect("answer");
    drop(conn);
    assert!(agent.wait().expect("wait").success());

    // An untagged client (this test) is said to be one.
    let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (conn, peer) = server.accept().expect("accept");
    let (code, v, _) = whois(&d, 0, &addr(peer), &addr(conn.local_addr().expect("local")));
    assert_eq!(code, 3, "{v}");
    assert_eq!(
        (v["known"].as_bool(), v["tagged"].as_bool()),
        (Some(true), Some(false))
    );
    drop((client, conn));
    // No such connection.
    let (code, v, _) = whois(&d, 0, "127.0.0.1:1", &format!("127.0.0.1:{port}"));
    assert_eq!(code, 3);
    assert_eq!(v["known"], false, "{v}");
    // Bad input is named.
    let (code, _, err) = whois(&d, 0, "nonsense", "127.0.0.1:1");
    assert_eq!(code, 1);
    assert!(err.contains("--peer \"nonsense\""), "{err}");

    let node = d.wait_audit("_node", "whois control records", |r| {
        r.iter()
            .filter(|x| x["kind"] == "control" && x["op"] == "whois")
            .count()
            >= 4
    });
    assert!(
        node.iter()
            .any(|x| x["op"] == "whois" && x["uid"] == 64_101 && x["verdict"] == "deny"),
        "the refused whois is on the record"
    );
}

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("tool_server.py")
}

#[test]
fn the_example_tool_server_serves_its_tenant_and_refuses_everyone_else() {
    if !kernel_test("the_example_tool_server_serves_its_tenant_and_refuses_everyone_else") {
        return;
    }
    let port = free_port();
    let d = Daemon::start(&policy(port));
    let mut server = Command::new("python3")
        .arg(example())
        .args(["--tenant", "acme", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--socket")
        .arg(&d.socket)
        .arg("--agent-guard")
        .arg(agent_guard_bin())
        .args(["--once", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 examples/tool_server.py");
    let mut lines = BufReader::new(server.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("read");
    assert!(first.starts_with("listening "), "{first}");
    let port_s = port.to_string();
    let call = |tenant: &str, agent: &str| {
        let out = d.run(
            tenant,
            agent,
            &[
                probe_bin().to_str().expect("utf-8"),
                "tcp-call",
                "127.0.0.1",
                &port_s,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let mine = call("acme", "researcher");
    assert!(
        mine.starts_with("allow tenant=acme agent=researcher subject=acme/researcher"),
        "{mine}"
    );
    let theirs = call("globex", "bot");
    assert!(
        theirs.starts_with("refuse caller is tenant 'globex'"),
        "{theirs}"
    );
    let mut untagged = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    untagged
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = String::new();
    BufReader::new(&mut untagged)
        .read_line(&mut answer)
        .expect("answer");
    assert!(answer.starts_with("refuse not an agent"), "{answer}");
    assert!(server.wait().expect("server").success());
}
