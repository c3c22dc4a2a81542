//! Real-kernel tests of escape paths: what a root process inside the fence
//! would try in order to reach an endpoint its capabilities do not cover,
//! to take over an untagged process, or to change its own identity.
//!
//! Tests marked `#[ignore = "known bypass: ..."]` document a path that is
//! open today; run them with `--ignored` to see it.

use std::{
    io::BufRead,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agent_guard_tests::{
    Agent, Daemon, Endpoint, Listener, Policy, agent_guard_bin, kernel_test, probe, probe_bin,
    udp_sink,
};

/// Tenant `acme`: `researcher` (strict hardening, the default) and `lab`
/// (hardening off) may reach `allowed` over tcp and `udp` over udp;
/// `helper` has the same tools. Tenant `other`: `intruder` may reach only
/// `other_port`.
fn policy(allowed: u16, udp: u16, other_port: u16) -> Policy {
    let search_and_sink: &[&str] = &["search", "sink"];
    Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tenant("other")
        .tool(
            "search",
            [
                Endpoint::tcp("127.0.0.1/32", allowed),
                Endpoint::tcp("::1/128", allowed),
            ],
        )
        .tool("sink", [Endpoint::udp("127.0.0.0/8", udp)])
        .tool("elsewhere", [Endpoint::tcp("127.0.0.1/32", other_port)])
        .agent("acme", "researcher", search_and_sink)
        .agent("acme", "helper", search_and_sink)
        .with_agent(Agent::new("acme", "lab", search_and_sink).hardening("off"))
        .agent("other", "intruder", &["elsewhere"])
}

/// A daemon with two TCP listeners (`allowed`, `denied`), a third one only
/// tenant `other` may reach, and a UDP sink the agents may reach.
struct Setup {
    d: Daemon,
    a: String,
    o: String,
    x: String,
    u: String,
    o_udp: String,
    _l: [Listener; 3],
    _s: [std::net::UdpSocket; 2],
}

fn setup() -> Setup {
    let allowed = Listener::tcp_dual();
    let denied = Listener::tcp_dual();
    let elsewhere = Listener::tcp_dual();
    let (s1, udp) = udp_sink("127.0.0.1");
    let (s2, other_udp) = udp_sink("127.0.0.1");
    let d = Daemon::start(&policy(allowed.port, udp, elsewhere.port).build());
    Setup {
        d,
        a: allowed.port.to_string(),
        o: denied.port.to_string(),
        x: elsewhere.port.to_string(),
        u: udp.to_string(),
        o_udp: other_udp.to_string(),
        _l: [allowed, denied, elsewhere],
        _s: [s1, s2],
    }
}

/// `Daemon::probe`, with the probe's output logged (libtest shows it when
/// the test fails).
fn run_probe(d: &Daemon, tenant: &str, agent: &str, args: &[&str]) -> i32 {
    let out = d.launch(tenant, agent).probe(args);
    let code = out.status.code().unwrap_or(-1);
    eprintln!(
        "{tenant}/{agent} {args:?} -> {code}\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    code
}

/// `CMD IP PORT EXTRA..` as `acme/AGENT`, for each of `ips`: EPERM to the
/// denied listener, success to the allowed one.
fn assert_fenced(s: &Setup, agent: &str, cmd: &str, ips: &[&str], extra: &[&str]) {
    let l = s.d.launch("acme", agent);
    for ip in ips {
        for (port, want) in [(&s.o, probe::EPERM), (&s.a, probe::OK)] {
            let mut args = vec![cmd, ip, port.as_str()];
            args.extend_from_slice(extra);
            l.expect_probe(&args, want);
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Kills a process this test started, by PID, and reaps it.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tagged_root_cannot_call_bpf() {
    if !kernel_test("tagged_root_cannot_call_bpf") {
        return;
    }
    let s = setup();
    let d = &s.d;
    // Strict hardening: seccomp refuses bpf(), whatever capabilities remain,
    // also from forks, threads and after exec.
    for wrap in [&[][..], &["fork"], &["thread"], &["exec"]] {
        let mut args = wrap.to_vec();
        args.push("bpf");
        d.launch("acme", "researcher")
            .expect_probe(&args, probe::EPERM);
    }
    // The untagged test process itself may (sanity: the call works here).
    let out = Command::new(probe_bin())
        .arg("bpf")
        .output()
        .expect("probe");
    assert_eq!(out.status.code(), Some(probe::OK), "{}", text(&out.stdout));

    // hardening = "off": what the kernel hooks alone guarantee. They do not
    // stop a root agent from using bpf() at all (with CAP_BPF/CAP_SYS_ADMIN
    // it could detach the fence), but every connect, UDP send and raw
    // socket is still judged.
    d.launch("acme", "lab").expect_probes(&[
        (&["bpf"], probe::OK),
        (&["tcp", "127.0.0.1", &s.o], probe::EPERM),
        (&["tcp", "127.0.0.1", &s.a], probe::OK),
        (&["udp-send", "127.0.0.1", &s.o_udp], probe::EPERM),
        (&["raw"], probe::EPERM),
    ]);
}

#[test]
fn moving_itself_out_of_its_cgroup_does_not_free_a_tagged_process() {
    if !kernel_test("moving_itself_out_of_its_cgroup_does_not_free_a_tagged_process") {
        return;
    }
    let s = setup();
    let d = &s.d;
    let root = path_str(&d.cgroup_mount).to_string();
    for agent in ["lab", "researcher"] {
        d.launch("acme", agent).expect_probes(&[
            // The probe reports OTHER when the move itself fails, so
            // EPERM means: moved to the root cgroup, and still refused.
            (
                &["escape-cgroup", &root, "tcp", "127.0.0.1", &s.o],
                probe::EPERM,
            ),
            (
                &["escape-cgroup", &root, "udp-send", "127.0.0.1", &s.o_udp],
                probe::EPERM,
            ),
            // Its rights are unchanged too.
            (
                &["escape-cgroup", &root, "tcp", "127.0.0.1", &s.a],
                probe::OK,
            ),
            // Children forked after the move, and before it.
            (
                &["escape-cgroup", &root, "fork", "tcp", "127.0.0.1", &s.o],
                probe::EPERM,
            ),
            (
                &["fork", "escape-cgroup", &root, "tcp", "127.0.0.1", &s.o],
                probe::EPERM,
            ),
            (
                &["escape-cgroup", &root, "orphan", "tcp", "127.0.0.1", &s.o],
                probe::EPERM,
            ),
        ]);
    }
}

#[test]
fn moving_into_another_agents_cgroup_does_not_grant_its_rights() {
    if !kernel_test("moving_into_another_agents_cgroup_does_not_grant_its_rights") {
        return;
    }
    let s = setup();
    let d = &s.d;
    // Sanity: the other tenant's agent reaches its endpoint.
    d.launch("other", "intruder")
        .expect_probe(&["tcp", "127.0.0.1", &s.x], probe::OK);
    let theirs = d.cgroup_root.join("other").join("intruder");
    assert!(theirs.is_dir(), "agent cgroup {} exists", theirs.display());
    let theirs = path_str(&theirs).to_string();
    for agent in ["researcher", "lab"] {
        // The process anchor wins over the cgroup.
        d.launch("acme", agent).expect_probe(
            &["escape-cgroup", &theirs, "tcp", "127.0.0.1", &s.x],
            probe::EPERM,
        );
    }
}

#[test]
fn io_uring_connect_is_fenced() {
    if !kernel_test("io_uring_connect_is_fenced") {
        return;
    }
    let s = setup();
    // inline: in the submitting task; async: on an io-wq worker thread;
    // sqpoll: on the ring's kernel polling thread.
    for agent in ["researcher", "lab"] {
        for mode in ["inline", "async", "sqpoll"] {
            assert_fenced(&s, agent, "uring-connect", &["127.0.0.1", "::1"], &[mode]);
        }
    }
}

#[test]
fn tcp_fast_open_sendto_is_fenced() {
    if !kernel_test("tcp_fast_open_sendto_is_fenced") {
        return;
    }
    let s = setup();
    let ips = ["127.0.0.1", "::1", "::ffff:127.0.0.1"];
    assert_fenced(&s, "researcher", "tfo", &ips, &[]);
}

#[test]
fn mptcp_connect_is_fenced() {
    if !kernel_test("mptcp_connect_is_fenced") {
        return;
    }
    let s = setup();
    // Untagged: is MPTCP available at all?
    let out = Command::new(probe_bin())
        .args(["mptcp", "127.0.0.1", &s.a])
        .output()
        .expect("probe");
    if out.status.code() != Some(probe::OK) {
        eprintln!("mptcp not available here: {}", text(&out.stdout));
        return;
    }
    assert_fenced(&s, "researcher", "mptcp", &["127.0.0.1", "::1"], &[]);
}

#[test]
fn sendmmsg_is_fenced() {
    if !kernel_test("sendmmsg_is_fenced") {
        return;
    }
    let s = setup();
    let d = &s.d;
    d.launch("acme", "researcher").expect_probes(&[
        (
            &["udp-sendmmsg", "127.0.0.1", &s.o_udp, &s.o_udp],
            probe::EPERM,
        ),
        (&["udp-sendmmsg", "127.0.0.1", &s.u, &s.u], probe::OK),
        // Allowed first, then denied: the batch stops at the denied message.
        (&["udp-sendmmsg", "127.0.0.1", &s.u, &s.o_udp], probe::EPERM),
    ]);
}

#[test]
fn other_udp_send_paths_are_fenced() {
    if !kernel_test("other_udp_send_paths_are_fenced") {
        return;
    }
    let s = setup();
    let d = &s.d;
    d.launch("acme", "researcher").expect_probes(&[
        // IP_PKTINFO changes the source, never the judged destination.
        (&["udp-pktinfo", "127.0.0.1", &s.o_udp], probe::EPERM),
        (&["udp-pktinfo", "127.0.0.1", &s.u], probe::OK),
        // An AF_INET6 socket sending to a v4-mapped address.
        (&["udp6-send", "::ffff:127.0.0.1", &s.o_udp], probe::EPERM),
        (&["udp6-send", "::ffff:127.0.0.1", &s.u], probe::OK),
        // A socket connected to an allowed endpoint, then sendto() elsewhere.
        (
            &["udp-connected-sendto", "127.0.0.1", &s.u, &s.o_udp],
            probe::EPERM,
        ),
        // Another loopback address than the sink's, with the sink's port, is
        // covered by 127.0.0.0/8; a port outside the tool is not.
        (&["udp-send", "127.0.0.2", &s.o_udp], probe::EPERM),
    ]);
}

#[test]
fn reconnecting_or_binding_first_does_not_skip_the_check() {
    if !kernel_test("reconnecting_or_binding_first_does_not_skip_the_check") {
        return;
    }
    let s = setup();
    let d = &s.d;
    for ip in ["127.0.0.1", "::1"] {
        d.launch("acme", "researcher").expect_probes(&[
            // connect(allowed), connect(AF_UNSPEC), connect(denied).
            (&["tcp-reconnect", ip, &s.a, &s.o], probe::EPERM),
            (&["tcp-reconnect", ip, &s.a, &s.a], probe::OK),
            (&["tcp-bind", ip, &s.o], probe::EPERM),
        ]);
    }
    // 0.0.0.0 and :: mean "this host" to connect(); judged as written.
    d.launch("acme", "researcher").expect_probes(&[
        (&["tcp", "0.0.0.0", &s.o], probe::EPERM),
        (&["tcp", "::", &s.o], probe::EPERM),
    ]);
}

#[test]
fn tagged_process_cannot_use_other_control_verbs() {
    if !kernel_test("tagged_process_cannot_use_other_control_verbs") {
        return;
    }
    let s = setup();
    let d = &s.d;
    let bin = agent_guard_bin();
    let bin = path_str(&bin);
    let sock = path_str(&d.socket);
    let out = d.run("acme", "researcher", &[bin, "status", "--socket", sock]);
    assert!(
        !out.status.success(),
        "status from inside: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("refused"),
        "{}",
        text(&out.stderr)
    );

    // A policy that would give researcher everything.
    let wide = d.dir.path().join("wide.toml");
    let mut everything = policy(s.o.parse().expect("port"), 1, 2);
    for agent in ["researcher", "helper", "lab"] {
        everything =
            everything.edit_agent("acme", agent, |a| a.tools(&["search", "sink", "elsewhere"]));
    }
    std::fs::write(&wide, everything.build()).expect("write policy");
    let out = d.run(
        "acme",
        "researcher",
        &[bin, "policy", "apply", path_str(&wide), "--socket", sock],
    );
    assert!(
        !out.status.success(),
        "policy apply from inside: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("refused"),
        "{}",
        text(&out.stderr)
    );
    // The policy in force is unchanged.
    d.launch("acme", "researcher").expect_probes(&[
        (&["tcp", "127.0.0.1", &s.o], probe::EPERM),
        (&["tcp", "127.0.0.1", &s.a], probe::OK),
    ]);

    // Also from a child that left the agent cgroup first.
    let root = path_str(&d.cgroup_mount);
    let script = format!("echo $$ > {root}/cgroup.procs && exec {bin} status --socket {sock}");
    let out = d.run("acme", "lab", &["/bin/sh", "-c", &script]);
    assert!(
        !out.status.success(),
        "status after leaving the cgroup: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("refused"),
        "{}",
        text(&out.stderr)
    );
}

/// Runs a nested `agent-guard run` as (tenant, agent) from inside
/// (outer_tenant, outer_agent), the inner command touching a marker file;
/// returns (exit code, stderr, whether the marker exists).
fn nested_run(
    d: &Daemon,
    outer: (&str, &str),
    inner: (&str, &str),
    prefix: &str,
) -> (Option<i32>, String, bool) {
    let marker = d
        .dir
        .path()
        .join(format!("marker-{}-{}-{prefix}", inner.0, inner.1));
    let _ = std::fs::remove_file(&marker);
    let bin = agent_guard_bin();
    let script = format!(
        "{prefix}exec {} run --tenant {} --agent {} --socket {} -- /bin/sh -c 'touch {}'",
        bin.display(),
        inner.0,
        inner.1,
        d.socket.display(),
        marker.display()
    );
    let out = d.run(outer.0, outer.1, &["/bin/sh", "-c", &script]);
    (out.status.code(), text(&out.stderr), marker.exists())
}

#[test]
fn tagged_process_cannot_change_tenant_via_nested_run() {
    if !kernel_test("tagged_process_cannot_change_tenant_via_nested_run") {
        return;
    }
    let s = setup();
    let d = &s.d;
    let root = path_str(&d.cgroup_mount).to_string();
    // Sanity: the same identity may start a process (the marker works).
    let (code, err, made) = nested_run(d, ("acme", "researcher"), ("acme", "researcher"), "");
    assert_eq!((code, made), (Some(0), true), "{err}");
    let leave = format!("echo $$ > {root}/cgroup.procs && ");
    for outer in [("acme", "researcher"), ("acme", "lab")] {
        for prefix in ["", leave.as_str()] {
            // Another agent name of the same tenant starts a (narrower)
            // sub-agent, tested in capability.rs; another tenant never.
            for inner in [("other", "intruder"), ("other", "researcher")] {
                let (code, err, made) = nested_run(d, outer, inner, prefix);
                assert_eq!(code, Some(125), "{outer:?} -> {inner:?} ({prefix}): {err}");
                assert!(err.contains("refused"), "{err}");
                assert!(!made, "{outer:?} -> {inner:?}: the command must not start");
            }
        }
    }
}

#[test]
fn fork_variants_stay_fenced() {
    if !kernel_test("fork_variants_stay_fenced") {
        return;
    }
    let s = setup();
    let d = &s.d;
    for agent in ["researcher", "lab"] {
        for wrap in [
            &["orphan"][..],
            &["spawn"],
            &["exec-from-thread"],
            &["leader-exit"],
            &["thread", "orphan"],
            &["orphan", "spawn", "thread"],
        ] {
            let deny = [wrap, &["tcp", "127.0.0.1", &s.o]].concat();
            let allow = [wrap, &["tcp", "127.0.0.1", &s.a]].concat();
            d.launch("acme", agent)
                .expect_probes(&[(&deny, probe::EPERM), (&allow, probe::OK)]);
        }
    }
    // A shell's background job that outlives the shell (reparented to
    // init or a subreaper) writes its result where we can read it.
    let result = d.dir.path().join("bg-result");
    let script = format!(
        "( sleep 0.3; {} tcp 127.0.0.1 {}; echo $? > {}.tmp; mv {}.tmp {} ) >/dev/null 2>&1 &",
        probe_bin().display(),
        s.o,
        result.display(),
        result.display(),
        result.display()
    );
    let out = d.run("acme", "researcher", &["/bin/sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !result.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let code = std::fs::read_to_string(&result).expect("background job result");
    assert_eq!(code.trim(), probe::EPERM.to_string());
}

#[test]
fn ptrace_of_untagged_process_is_refused() {
    if !kernel_test("ptrace_of_untagged_process_is_refused") {
        return;
    }
    let s = setup();
    let d = &s.d;
    let victim = Reap(
        Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .spawn()
            .expect("sleep"),
    );
    let v = victim.0.id().to_string();
    let me = std::process::id().to_string();
    let daemon = d.pid().to_string();
    d.launch("acme", "researcher").expect_probes(&[
        (&["ptrace-attach", &v], probe::EPERM),
        (&["ptrace-attach", &me], probe::EPERM),
        (&["ptrace-attach", &daemon], probe::EPERM),
        (&["process-vm-read", &v], probe::EPERM),
        (&["process-vm-read", &daemon], probe::EPERM),
        // Stealing a descriptor (a BPF link, the control socket) of the daemon.
        (&["pidfd-getfd", &daemon, "3"], probe::EPERM),
    ]);
    let p = |args: &[&str]| run_probe(d, "acme", "researcher", args);
    assert_ne!(p(&["proc-mem", &v]), probe::OK);
    assert_ne!(p(&["proc-mem", &daemon]), probe::OK);
    // Sanity: untagged root may do all of it.
    for args in [
        &["ptrace-attach", &v][..],
        &["process-vm-read", &v],
        &["proc-mem", &v],
    ] {
        let out = Command::new(probe_bin())
            .args(args)
            .output()
            .expect("probe");
        assert_eq!(
            out.status.code(),
            Some(probe::OK),
            "{args:?}: {}",
            text(&out.stdout)
        );
    }
}

/// Restores a sysctl value on drop.
struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, self.old.trim());
    }
}

#[test]
fn icmp_ping_sockets_are_fenced() {
    if !kernel_test("icmp_ping_sockets_are_fenced") {
        return;
    }
    let s = setup();
    let d = &s.d;
    let path = PathBuf::from("/proc/sys/net/ipv4/ping_group_range");
    let old = std::fs::read_to_string(&path).expect("read ping_group_range");
    let _restore = Sysctl {
        path: path.clone(),
        old,
    };
    let p = path_str(&path);
    // The agent widens ping_group_range itself (uid 0 may write net sysctls
    // without CAP_NET_ADMIN), then sends an ICMP echo carrying data to a
    // destination no tool covers.
    for ip in ["127.0.0.1", "::1"] {
        // An ICMP echo to `ip`.
        d.launch("acme", "researcher")
            .expect_probe(&["write-file", p, "0 0", "ping", ip], probe::EPERM);
    }
}

#[test]
#[ignore = "known gap: AF_VSOCK (non-IP) connects are not fenced and strict hardening does not refuse the family; needs a vsock loopback transport to show"]
fn vsock_connect_is_fenced() {
    if !kernel_test("vsock_connect_is_fenced") {
        return;
    }
    let s = setup();
    let d = &s.d;
    // An untagged vsock listener on this machine (local CID 1).
    // SAFETY: plain syscalls on a descriptor we own.
    let (fd, port) = unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            eprintln!("no AF_VSOCK here: {}", std::io::Error::last_os_error());
            return;
        }
        let mut sa: libc::sockaddr_vm = std::mem::zeroed();
        sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        sa.svm_cid = libc::VMADDR_CID_ANY;
        sa.svm_port = 40000 + std::process::id() % 20000;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        if libc::bind(fd, (&sa as *const libc::sockaddr_vm).cast(), len) != 0
            || libc::listen(fd, 16) != 0
        {
            eprintln!("vsock listen: {}", std::io::Error::last_os_error());
            libc::close(fd);
            return;
        }
        (fd, sa.svm_port.to_string())
    };
    struct Close(i32);
    impl Drop for Close {
        fn drop(&mut self) {
            // SAFETY: our descriptor.
            unsafe { libc::close(self.0) };
        }
    }
    let _fd = Close(fd);
    let out = Command::new(probe_bin())
        .args(["vsock-connect", "1", &port])
        .output()
        .expect("probe");
    if out.status.code() != Some(probe::OK) {
        eprintln!("no vsock loopback transport here: {}", text(&out.stdout));
        return;
    }
    d.launch("acme", "researcher")
        .expect_probe(&["vsock-connect", "1", &port], probe::EPERM);
}

#[test]
fn a_strict_agent_cannot_signal_the_daemon() {
    if !kernel_test("a_strict_agent_cannot_signal_the_daemon") {
        return;
    }
    let s = setup();
    let d = &s.d;
    let daemon = d.pid().to_string();
    let group = format!("-{daemon}");
    // The daemon's pid, its process group, and "everyone" (-1) are refused
    // by the launcher's seccomp filter, for SIGKILL, SIGTERM and SIGSTOP.
    let researcher = d.launch("acme", "researcher");
    for target in [daemon.as_str(), group.as_str(), "-1"] {
        for sig in ["9", "15", "19"] {
            // kill(target, sig), then a denied connect.
            researcher.expect_probe(
                &["kill", target, sig, "tcp", "127.0.0.1", &s.o],
                probe::EPERM,
            );
        }
    }
    // Any of its threads (a signal to one kills the process), and through
    // a pidfd from open("/proc/PID").
    let tids: Vec<String> = std::fs::read_dir(format!("/proc/{daemon}/task"))
        .expect("daemon tasks")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(tids.len() >= 2, "the daemon has worker threads: {tids:?}");
    for tid in &tids {
        researcher.expect_probe(&["tkill", tid, "9", "tcp", "127.0.0.1", &s.o], probe::EPERM);
    }
    // pidfd_send_signal.
    researcher.expect_probe(
        &["pidfd-kill", &daemon, "9", "tcp", "127.0.0.1", &s.o],
        probe::EPERM,
    );
    // The daemon is still there and still fencing.
    assert!(d.cli(&["status"]).status.success(), "daemon survived");
    researcher.expect_probe(&["tcp", "127.0.0.1", &s.o], probe::EPERM);
}

#[test]
/// Links are pinned: a hardening = "off" root agent that SIGKILLs the
/// daemon is still fenced (the kernel keeps the last state).
fn killing_the_daemon_does_not_free_a_tagged_process() {
    if !kernel_test("killing_the_daemon_does_not_free_a_tagged_process") {
        return;
    }
    let s = setup();
    let d = &s.d;
    let daemon = d.pid().to_string();
    d.launch("acme", "lab").expect_probe(
        &["kill", &daemon, "9", "tcp", "127.0.0.1", &s.o],
        probe::EPERM,
    );
}

#[test]

fn control_socket_cannot_be_hijacked_by_a_tagged_process() {
    if !kernel_test("control_socket_cannot_be_hijacked_by_a_tagged_process") {
        return;
    }
    let s = setup();
    let d = &s.d;
    let sock = path_str(&d.socket);
    let mut child = d
        .launch("acme", "researcher")
        .probe_command(&["fake-daemon", sock])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn fake daemon");
    let stdout = child.stdout.take().expect("stdout");
    let fake = Reap(child);
    let mut line = String::new();
    let _ = std::io::BufReader::new(stdout).read_line(&mut line);
    if line.contains("listening") {
        // An operator now starts another agent, as usual.
        let code = run_probe(d, "acme", "researcher", &["tcp", "127.0.0.1", &s.o]);
        drop(fake);
        assert!(
            code == probe::EPERM || code == 125,
            "a launcher talking to the agent's fake daemon ran its command unfenced (exit {code})"
        );
    } else {
        drop(fake);
        assert!(line.contains("EPERM") || line.is_empty(), "{line}");
    }
}

#[test]
fn a_strict_agent_cannot_open_non_ip_sockets() {
    if !kernel_test("a_strict_agent_cannot_open_non_ip_sockets") {
        return;
    }
    let s = setup();
    let d = &s.d;
    d.launch("acme", "researcher").expect_probes(&[
        // AF_VSOCK, AF_PACKET, AF_XDP, AF_KEY and AF_BRIDGE would reach
        // out without the inet hooks; strict seccomp refuses the families.
        (&["socket-family", "40", "stream"], probe::EPERM),
        (&["socket-family", "17", "dgram"], probe::EPERM),
        (&["socket-family", "44", "dgram"], probe::EPERM),
        (&["socket-family", "15", "dgram"], probe::EPERM),
        (&["socket-family", "7", "dgram"], probe::EPERM),
        // Unix, inet, inet6 and netlink stay usable.
        (&["socket-family", "1", "stream"], probe::OK),
        (&["socket-family", "2", "stream"], probe::OK),
        (&["socket-family", "10", "stream"], probe::OK),
        (&["socket-family", "16", "dgram"], probe::OK),
    ]);
    // Without hardening the family check is not there (documented gap).
    assert_ne!(
        run_probe(d, "acme", "lab", &["socket-family", "40", "stream"]),
        probe::EPERM
    );
}

#[test]
fn a_connection_left_by_an_exited_child_cannot_carry_control_verbs() {
    if !kernel_test("a_connection_left_by_an_exited_child_cannot_carry_control_verbs") {
        return;
    }
    let s = setup();
    let d = &s.d;
    let sock = path_str(&d.socket);
    // Sanity: the trick really reaches the daemon (untagged it is allowed).
    let out = Command::new(probe_bin())
        .args([
            "control-dead-peer",
            sock,
            r#"{"op":"status"}"#,
            "parent-writes",
        ])
        .output()
        .expect("probe");
    assert_eq!(
        out.status.code(),
        Some(probe::EPERM),
        "a dead peer is refused even untagged: {}",
        text(&out.stdout)
    );
    // Tagged processes reach the daemon only through its abstract name;
    // the path is judged like any other Unix socket (not listed: refused).
    let abstract_name = d.status()["daemon"]["socket_abstract"]
        .as_str()
        .expect("socket_abstract")
        .to_string();
    for mode in ["parent-writes", "child-writes"] {
        for req in [r#"{"op":"status"}"#, r#"{"op":"suspend","tenant":"acme"}"#] {
            for agent in ["researcher", "lab"] {
                d.launch("acme", agent).expect_probes(&[
                    (
                        &["control-dead-peer", &abstract_name, req, mode],
                        probe::EPERM,
                    ),
                    // The path connect is refused.
                    (&["control-dead-peer", sock, req, mode], probe::OTHER),
                ]);
            }
        }
    }
    assert!(
        d.status()["suspended"]
            .as_array()
            .is_some_and(|a| a.is_empty()),
        "nothing was suspended"
    );
}

#[test]
fn protocols_that_bypass_the_send_hooks_are_refused() {
    if !kernel_test("protocols_that_bypass_the_send_hooks_are_refused") {
        return;
    }
    let s = setup();
    let d = &s.d;
    // SCTP (132) sets up associations on sendmsg without the cgroup
    // sendmsg hook; SOCK_SEQPACKET likewise. Refused in sock_create (with
    // hardening off, so the kernel hook alone is tested). A kernel without
    // SCTP (like this test machine's) says "not supported" before the hook
    // runs, so here this shows only that they are not reachable; the
    // refusal path itself runs only where SCTP is built.
    for (ty, proto) in [("stream", "132"), ("seqpacket", "132"), ("dgram", "255")] {
        let code = run_probe(d, "acme", "lab", &["socket-family", "2", ty, proto]);
        assert_ne!(code, probe::OK, "{ty} {proto} must not be creatable");
    }
    // TCP, MPTCP, UDP and UDP-Lite stay usable.
    d.launch("acme", "lab").expect_probes(&[
        (&["socket-family", "2", "stream", "6"], probe::OK),
        (&["socket-family", "2", "stream", "262"], probe::OK),
        (&["socket-family", "2", "dgram", "17"], probe::OK),
        (&["socket-family", "2", "dgram", "136"], probe::OK),
    ]);
}
