//! Real-kernel tests of the audit trail: a real daemon records real calls,
//! then the trail is altered in each way an attacker could, and `audit
//! verify` must name the first bad record; replay filters, tree and what-if
//! read the same recorded scenario.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use agent_guard_tests::{
    Daemon, Endpoint, Listener, Policy, agent_guard_bin, kernel_test, probe, probe_bin,
};
use serde_json::Value;

fn policy(search_port: u16) -> Policy {
    Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tool("search", [Endpoint::tcp("127.0.0.1/32", search_port)])
        .agent("acme", "researcher", &["search"])
        .agent("acme", "writer", &["search"])
}

/// A daemon with its signing key in a test-owned state dir.
fn start(policy: &Policy, extra: &[&str]) -> (Daemon, tempfile::TempDir) {
    let state = tempfile::tempdir().expect("state dir");
    let mut args = vec!["--state-dir", state.path().to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    (Daemon::start_with(&policy.build(), &args), state)
}

fn audit_cli(args: &[&str]) -> Output {
    Command::new(agent_guard_bin())
        .arg("audit")
        .args(args)
        .output()
        .expect("run agent-guard audit")
}

fn verify(dir: &Path) -> (Option<i32>, String) {
    let out = audit_cli(&["verify", "--audit-dir", dir.to_str().expect("utf-8")]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// A copy of the trail to alter, so each alteration starts from intact.
fn copy_of(dir: &Path) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let st = Command::new("cp")
        .arg("-a")
        .arg(dir)
        .arg(tmp.path())
        .status()
        .expect("cp");
    assert!(st.success());
    let copy = tmp.path().join(dir.file_name().expect("name"));
    (tmp, copy)
}

fn rewrite_lines(file: &Path, f: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = std::fs::read_to_string(file)
        .expect("read")
        .lines()
        .map(str::to_string)
        .collect();
    f(&mut lines);
    std::fs::write(file, lines.join("\n") + "\n").expect("write");
}

/// Records `n` allowed and `n` denied connects of acme/researcher, then
/// stops the daemon (which signs a final checkpoint).
fn recorded_trail(n: usize) -> (Daemon, tempfile::TempDir) {
    let allowed = Listener::tcp_dual();
    let (mut d, state) = start(&policy(allowed.port), &[]);
    let a = allowed.port.to_string();
    let n_s = n.to_string();
    assert_eq!(
        d.probe(
            "acme",
            "researcher",
            &["repeat", &n_s, "tcp", "127.0.0.1", &a]
        ),
        probe::OK
    );
    assert_eq!(
        d.probe(
            "acme",
            "researcher",
            &["repeat", &n_s, "tcp", "127.0.0.1", "1"]
        ),
        probe::EPERM
    );
    d.wait_audit("acme", "the denied connects", |r| {
        r.iter().filter(|r| r["verdict"] == "deny").count() >= n
    });
    d.stop();
    (d, state)
}

#[test]
fn intact_trail_verifies_and_each_alteration_names_the_first_bad_record() {
    if !kernel_test("intact_trail_verifies_and_each_alteration_names_the_first_bad_record") {
        return;
    }
    let (d, _state) = recorded_trail(5);
    let (code, text) = verify(&d.audit_dir);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("acme: ok"), "{text}");
    assert!(text.contains("last checkpoint seq"), "{text}");

    let log = |dir: &Path| dir.join("acme").join("audit.jsonl");
    let lines = std::fs::read_to_string(log(&d.audit_dir)).expect("read");
    let denied_line = lines
        .lines()
        .position(|l| l.contains("\"verdict\":\"deny\""))
        .expect("a denied connect")
        + 1;

    // Edit a field: a refused call made to look allowed.
    let (_t, dir) = copy_of(&d.audit_dir);
    rewrite_lines(&log(&dir), |l| {
        l[denied_line - 1] =
            l[denied_line - 1].replace("\"verdict\":\"deny\"", "\"verdict\":\"allow\"")
    });
    let (code, text) = verify(&dir);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!("audit.jsonl:{denied_line}")),
        "{text}"
    );
    assert!(text.contains("edited"), "{text}");

    // Delete a line.
    let (_t, dir) = copy_of(&d.audit_dir);
    rewrite_lines(&log(&dir), |l| {
        l.remove(denied_line - 1);
    });
    let (code, text) = verify(&dir);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("removed"), "{text}");
    assert!(
        text.contains(&format!("audit.jsonl:{denied_line}")),
        "{text}"
    );

    // Swap two lines.
    let (_t, dir) = copy_of(&d.audit_dir);
    rewrite_lines(&log(&dir), |l| l.swap(denied_line - 1, denied_line));
    let (code, text) = verify(&dir);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("reordered"), "{text}");

    // Truncate the tail: only the signed checkpoint can tell.
    let (_t, dir) = copy_of(&d.audit_dir);
    rewrite_lines(&log(&dir), |l| l.truncate(l.len() - 3));
    let (code, text) = verify(&dir);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("truncated"), "{text}");
    assert!(text.contains("but checkpoint signed seq"), "{text}");

    // Forge a checkpoint (sign a later seq without the key).
    let (_t, dir) = copy_of(&d.audit_dir);
    rewrite_lines(&dir.join("acme").join("checkpoints.jsonl"), |l| {
        let last = l.len() - 1;
        let cp: Value = serde_json::from_str(&l[last]).expect("checkpoint json");
        let seq = cp["seq"].as_u64().expect("seq");
        l[last] = l[last].replace(&format!("\"seq\":{seq}"), &format!("\"seq\":{}", seq + 5));
    });
    let (code, text) = verify(&dir);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("bad signature"), "{text}");
    assert!(text.contains("checkpoints.jsonl"), "{text}");
}

#[test]
fn rotation_keeps_one_chain_and_a_deleted_rotated_file_is_detected() {
    if !kernel_test("rotation_keeps_one_chain_and_a_deleted_rotated_file_is_detected") {
        return;
    }
    let allowed = Listener::tcp_dual();
    let (mut d, _state) = start(&policy(allowed.port), &["--audit-max-file-bytes", "8192"]);
    let a = allowed.port.to_string();
    assert_eq!(
        d.probe(
            "acme",
            "researcher",
            &["repeat", "100", "tcp", "127.0.0.1", &a]
        ),
        probe::OK
    );
    d.wait_audit("acme", "an exit record", |r| {
        r.iter().any(|r| r["kind"] == "exit")
    });
    d.stop();
    let chain = d.audit_dir.join("acme");
    assert!(
        chain.join("audit-000003.jsonl").exists(),
        "rotated at least 3 times"
    );
    let (code, text) = verify(&d.audit_dir);
    assert_eq!(code, Some(0), "{text}");

    let (_t, dir) = copy_of(&d.audit_dir);
    std::fs::remove_file(dir.join("acme").join("audit-000002.jsonl")).expect("rm");
    let (code, text) = verify(&dir);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("file deleted"), "{text}");
    assert!(text.contains("audit-000003.jsonl:1"), "{text}");

    // The oldest file deleted by hand: no signed anchor allows the new start.
    let (_t, dir) = copy_of(&d.audit_dir);
    std::fs::remove_file(dir.join("acme").join("audit-000001.jsonl")).expect("rm");
    let (code, text) = verify(&dir);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("file deleted"), "{text}");
}

#[test]
fn retention_deletes_old_files_and_the_chain_still_verifies() {
    if !kernel_test("retention_deletes_old_files_and_the_chain_still_verifies") {
        return;
    }
    let allowed = Listener::tcp_dual();
    let (mut d, _state) = start(
        &policy(allowed.port),
        &[
            "--audit-max-file-bytes",
            "8192",
            "--audit-retain-files",
            "2",
        ],
    );
    let a = allowed.port.to_string();
    assert_eq!(
        d.probe(
            "acme",
            "researcher",
            &["repeat", "100", "tcp", "127.0.0.1", &a]
        ),
        probe::OK
    );
    d.wait_audit("acme", "an exit record", |r| {
        r.iter().any(|r| r["kind"] == "exit")
    });
    d.stop();
    let files = std::fs::read_dir(d.audit_dir.join("acme"))
        .expect("dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("audit"))
        })
        .count();
    assert_eq!(files, 2);
    let (code, text) = verify(&d.audit_dir);
    assert_eq!(code, Some(0), "{text}");
    let acme = text
        .lines()
        .find(|l| l.starts_with("acme: ok"))
        .expect("acme ok");
    assert!(
        !acme.contains("seq 0.."),
        "the chain starts after seq 0: {text}"
    );
    assert!(
        d.audit("acme").iter().any(|r| r["kind"] == "retention"),
        "deletions are recorded in the chain"
    );
}

#[test]
fn sigkill_during_heavy_writing_leaves_a_verifiable_trail() {
    if !kernel_test("sigkill_during_heavy_writing_leaves_a_verifiable_trail") {
        return;
    }
    let allowed = Listener::tcp_dual();
    let (d, _state) = start(&policy(allowed.port), &["--checkpoint-every", "100"]);
    let a = allowed.port.to_string();
    let socket = d.socket.clone();
    let writer = std::thread::spawn(move || {
        Command::new(agent_guard_bin())
            .args(["run", "--tenant", "acme", "--agent", "researcher", "--"])
            .arg(probe_bin())
            .args(["repeat", "2000", "tcp", "127.0.0.1", &a])
            .env("AGENT_GUARD_SOCKET", socket)
            .output()
            .expect("probe")
    });
    d.wait_audit("acme", "heavy writing under way", |r| r.len() > 300);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    let _ = writer.join();
    std::thread::sleep(Duration::from_millis(100));
    let (code, text) = verify(&d.audit_dir);
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("  ") && !l.contains("note:"))
        .collect();
    assert!(
        code == Some(0) || problems.iter().all(|p| p.contains("torn tail")),
        "after kill -9 only a torn tail may be reported:\n{text}"
    );
    assert!(text.contains("last checkpoint seq"), "{text}");
}

fn replay(dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["replay", "--audit-dir", dir.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    let out = audit_cli(&all);
    assert!(
        out.status.success(),
        "replay {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("replay --json line"))
        .collect()
}

#[test]
fn replay_filters_tree_and_what_if_answer_from_the_recorded_trail() {
    if !kernel_test("replay_filters_tree_and_what_if_answer_from_the_recorded_trail") {
        return;
    }
    let allowed = Listener::tcp_dual();
    let (mut d, _state) = start(&policy(allowed.port), &[]);
    let a = allowed.port.to_string();
    assert_eq!(
        d.probe("acme", "researcher", &["tcp", "127.0.0.1", &a]),
        probe::OK
    );
    assert_eq!(
        d.probe("acme", "researcher", &["fork", "tcp", "127.0.0.1", "1"]),
        probe::EPERM
    );
    assert_eq!(
        d.probe("acme", "writer", &["tcp", "127.0.0.1", &a]),
        probe::OK
    );
    // A sub-agent of the researcher, started from inside it.
    let summarizer = d.sub_agent_cmd(&["--agent", "summarizer"], &["tcp", "127.0.0.1", &a]);
    let out = d.run("acme", "researcher", &summarizer);
    assert_eq!(
        out.status.code(),
        Some(probe::OK),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.wait_audit("acme", "four connects", |r| {
        r.iter().filter(|r| r["kind"] == "connect").count() >= 4
    });
    d.stop();
    let dir = d.audit_dir.clone();

    let all = json_lines(&replay(&dir, &["--tenant", "acme", "--json"]));
    assert!(all.iter().any(|r| r["agent"] == "writer"));
    let researcher = json_lines(&replay(&dir, &["--agent", "researcher", "--json"]));
    assert!(!researcher.is_empty());
    // An agent's records include its sub-agents'.
    assert!(researcher.iter().all(|r| {
        r["subject"]
            .as_str()
            .is_some_and(|s| s.starts_with("acme/researcher"))
    }));
    assert!(
        researcher
            .iter()
            .any(|r| r["subject"] == "acme/researcher/summarizer")
    );
    let denied = json_lines(&replay(&dir, &["--verdict", "deny", "--json"]));
    assert_eq!(denied.len(), 1, "{denied:?}");
    let pid = denied[0]["pid"].as_u64().expect("pid").to_string();
    let by_pid = json_lines(&replay(&dir, &["--pid", &pid, "--json"]));
    assert!(
        by_pid
            .iter()
            .all(|r| r["pid"].as_u64().map(|p| p.to_string()) == Some(pid.clone()))
    );
    assert!(by_pid.iter().any(|r| r["verdict"] == "deny"));
    assert_eq!(
        json_lines(&replay(&dir, &["--since", "1h", "--json"])).len(),
        all.len()
    );
    assert!(replay(&dir, &["--since", "2099-01-01T00:00:00Z", "--json"]).is_empty());
    let by_tool = json_lines(&replay(&dir, &["--tool", "search", "--json"]));
    assert_eq!(by_tool.len(), 3);

    let timeline = replay(&dir, &["--tenant", "acme", "--utc"]);
    assert!(timeline.starts_with("TIME"), "{timeline}");
    assert!(timeline.contains("no_capability") && timeline.contains("127.0.0.1:1/tcp"));

    let tree = replay(&dir, &["--tenant", "acme", "--tree"]);
    assert!(
        tree.contains("acme/researcher\n") && tree.contains("acme/writer\n"),
        "{tree}"
    );
    assert!(tree.contains("fork -> pid"), "{tree}");
    assert!(
        tree.contains("acme/researcher/summarizer"),
        "sub-agent in the tree: {tree}"
    );
    assert!(tree.contains(&format!("pid {pid} ")), "{tree}");

    // What-if: a policy that takes `search` from the writer.
    let new_policy = dir.parent().expect("parent").join("what-if.toml");
    std::fs::write(
        &new_policy,
        policy(allowed.port)
            .edit_agent("acme", "writer", |a| a.tools(&[]))
            .build(),
    )
    .expect("write policy");
    let out = replay(
        &dir,
        &[
            "--tenant",
            "acme",
            "--what-if",
            new_policy.to_str().expect("utf-8"),
        ],
    );
    assert!(out.contains("allow -> deny"), "{out}");
    assert!(out.contains("acme/writer"), "{out}");
    assert!(
        out.contains("1 allowed -> denied, 0 denied -> allowed"),
        "{out}"
    );
}

/// A synthetic trail of `n` records in one chain, shaped like `audit
/// generate`'s (replay does not check hashes, so they are left out).
fn synthetic_trail(dir: &Path, n: u64) {
    use std::io::Write as _;
    let chain = dir.join("acme");
    std::fs::create_dir_all(&chain).expect("mkdir");
    let file = std::fs::File::create(chain.join("audit.jsonl")).expect("create");
    let mut w = std::io::BufWriter::new(file);
    for i in 0..n {
        let (s, us) = (i / 1_000_000, i % 1_000_000);
        let head = format!(
            r#"{{"seq":{i},"ts":"2026-01-01T00:{:02}:{:02}.{us:06}000Z","kind":"{}","tenant":"acme","agent":"researcher","subject":"acme/researcher","pid":{},"ppid":9999,"uid":1000,"comm":"python3","exe":"/usr/bin/python3""#,
            s / 60,
            s % 60,
            if i % 50 == 0 { "exec" } else { "connect" },
            10_000 + i / 50
        );
        let call = if i % 50 == 0 {
            String::new()
        } else if i % 7 == 0 {
            r#","dst":"127.0.0.1","port":18082,"proto":"tcp","verdict":"deny","reason":"no_capability""#.to_string()
        } else {
            r#","dst":"127.0.0.1","port":18081,"proto":"tcp","verdict":"allow","reason":"granted","tool":"search""#.to_string()
        };
        writeln!(w, "{head}{call},\"prev\":\"0\"}}").expect("write");
    }
    w.flush().expect("flush");
}

/// Peak RSS (KiB) of `agent-guard audit replay ARGS`, from wait4's rusage
/// of that child alone.
#[allow(clippy::zombie_processes, reason = "reaped by wait4, for its rusage")]
fn replay_peak_rss_kib(dir: &Path, args: &[&str]) -> i64 {
    let child = Command::new(agent_guard_bin())
        .args(["audit", "replay", "--audit-dir"])
        .arg(dir)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start replay");
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    let mut status = 0;
    // SAFETY: plain syscall on our own child; both out-pointers are ours.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let got = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(got, pid, "wait4: {}", std::io::Error::last_os_error());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "replay {args:?} failed: status {status}"
    );
    usage.ru_maxrss
}

/// Replay used to hold every record (about 1.2 KiB each): its memory grew
/// with the trail. Four times the records must not need (nearly) four
/// times the memory: the growth per added record stays far below what
/// holding records costs. Sizes are small so it runs in seconds on a debug
/// build; `cargo xtask bench --only audit` measures 10 M records.
#[test]
fn replay_memory_does_not_grow_with_the_trail() {
    const N: u64 = 15_000;
    let small = tempfile::tempdir().expect("tempdir");
    let large = tempfile::tempdir().expect("tempdir");
    synthetic_trail(small.path(), N);
    synthetic_trail(large.path(), 4 * N);
    let policy = small.path().join("what-if.toml");
    std::fs::write(&policy, policy_text_for_memory_test()).expect("write policy");
    let policy = policy.to_str().expect("utf-8");
    for args in [
        &["--tree"][..],
        &["--verdict", "deny"][..],
        &["--what-if", policy][..],
    ] {
        let a = replay_peak_rss_kib(small.path(), args);
        let b = replay_peak_rss_kib(large.path(), args);
        let per_record = (b - a) as f64 * 1024.0 / (3 * N) as f64;
        eprintln!(
            "replay {args:?}: peak RSS {a} KiB at {N} records, {b} KiB at {} ({per_record:.0} bytes per added record)",
            4 * N
        );
        assert!(
            (b as f64) < 2.0 * a as f64 && per_record < 200.0,
            "replay {args:?} grows with the trail: {a} KiB at {N} records, {b} KiB at {} \
             ({per_record:.0} bytes per added record)",
            4 * N
        );
    }
}

fn policy_text_for_memory_test() -> String {
    Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tool("search", [Endpoint::tcp("127.0.0.1/32", 18082)])
        .agent("acme", "researcher", &["search"])
        .build()
}

/// A damaged `ts` at the end of year 9999 has no local time east of UTC;
/// replay shows it as recorded instead of panicking.
#[test]
fn replay_shows_a_time_without_a_local_form_as_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chain = dir.path().join("acme");
    std::fs::create_dir_all(&chain).expect("mkdir");
    let ts = "9999-12-31T23:59:59.000000000Z";
    std::fs::write(
        chain.join("audit.jsonl"),
        format!(
            r#"{{"seq":0,"ts":"{ts}","kind":"connect","tenant":"acme","subject":"acme/a","pid":1,"dst":"127.0.0.1","port":1,"proto":"tcp","verdict":"deny","prev":"0"}}"#
        ) + "\n",
    )
    .expect("write");
    for form in [&[][..], &["--tree"][..]] {
        let out = Command::new(agent_guard_bin())
            .args(["audit", "replay", "--audit-dir"])
            .arg(dir.path())
            .args(form)
            // A POSIX zone string: no zoneinfo files needed.
            .env("TZ", "JST-9")
            .output()
            .expect("run replay");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(ts),
            "replay {form:?}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
