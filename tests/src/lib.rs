//! Harness for agent-guard's real-kernel integration tests.
//!
//! Each test starts its own daemon with its own socket, pin dir, audit dir
//! and cgroup root, so tests run side by side; [`Daemon`]'s `Drop` stops it
//! by PID and removes what it created, also when the test fails.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

mod expect;
mod launch;
mod policy;

pub use expect::ProbeRow;
pub use launch::Launch;
pub use policy::{Agent, Endpoint, Policy, Tool};

/// The daemon/CLI binary under test.
/// Runs a command as another user: `uid` with primary group `gid`, no
/// supplementary groups (std drops them when a root parent sets the uid).
/// uid 0 leaves the command as it is (root).
pub trait AsUser {
    fn as_user(&mut self, uid: u32, gid: u32) -> &mut Self;
}

impl AsUser for Command {
    fn as_user(&mut self, uid: u32, gid: u32) -> &mut Self {
        use std::os::unix::process::CommandExt as _;
        if uid != 0 {
            self.uid(uid).gid(gid);
        }
        self
    }
}

pub fn agent_guard_bin() -> PathBuf {
    let p = std::env::var_os("AGENT_GUARD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/agent-guard")
        });
    std::fs::canonicalize(&p).unwrap_or(p)
}

/// Exit statuses of `agent-guard-probe`.
pub mod probe {
    pub const OK: i32 = 0;
    pub const EPERM: i32 = 10;
    pub const OTHER: i32 = 11;
    /// `resolve`: the DNS server answered REFUSED.
    pub const REFUSED: i32 = 12;

    /// An exit status with its constant's name, for messages: `10 (EPERM)`.
    pub fn name(code: i32) -> String {
        let name = match code {
            OK => "OK",
            EPERM => "EPERM",
            OTHER => "OTHER",
            REFUSED => "REFUSED",
            _ => return code.to_string(),
        };
        format!("{code} ({name})")
    }
}

/// Whether a kernel test can run here. Without root it is skipped loudly,
/// unless `AGENT_GUARD_REQUIRE_KERNEL_TESTS=1` (CI), where it fails.
pub fn kernel_test(name: &str) -> bool {
    let required = std::env::var("AGENT_GUARD_REQUIRE_KERNEL_TESTS").is_ok_and(|v| v == "1");
    let problem = if !nix::unistd::geteuid().is_root() {
        Some("not running as root")
    } else if !agent_guard_bin().is_file() {
        Some("agent-guard binary not built (run `cargo xtask test`)")
    } else {
        None
    };
    if let Some(why) = problem {
        if required {
            panic!("kernel test {name} cannot run: {why} (AGENT_GUARD_REQUIRE_KERNEL_TESTS=1)");
        }
        // Written straight to stderr so it shows even under libtest capture.
        let _ = writeln!(std::io::stderr(), "kernel-tests: SKIPPED {name}: {why}");
        return false;
    }
    let _ = writeln!(std::io::stderr(), "kernel-tests: ran {name}");
    true
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .expect("a cgroup2 mount")
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A daemon started for one test.
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub audit_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub cgroup_root: PathBuf,
    pub cgroup_mount: PathBuf,
    pub policy_path: PathBuf,
    /// Extra `daemon` flags, kept for [`Daemon::restart`].
    extra: Vec<String>,
}

impl Daemon {
    /// Starts a daemon enforcing `policy` (its TOML text, e.g. from
    /// [`Policy::build`]) and waits until it answers.
    pub fn start(policy: &str) -> Daemon {
        Self::try_start(policy).unwrap_or_else(|e| panic!("daemon did not start: {e}"))
    }

    pub fn try_start(policy: &str) -> Result<Daemon, String> {
        Self::try_start_with(policy, &[])
    }

    /// Starts a daemon with extra `daemon` flags (e.g. `--ring-bytes`).
    pub fn start_with(policy: &str, extra: &[&str]) -> Daemon {
        Self::try_start_with(policy, extra).unwrap_or_else(|e| panic!("daemon did not start: {e}"))
    }

    pub fn try_start_with(policy: &str, extra: &[&str]) -> Result<Daemon, String> {
        let dir = tempfile::Builder::new()
            .prefix("agent-guard-test-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let cgroup_mount = cgroup2_mount();
        let cgroup_root = cgroup_mount.join(format!("agent-guard-test-{}-{n}", std::process::id()));
        let policy_path = dir.path().join("policy.toml");
        std::fs::write(&policy_path, policy).map_err(|e| e.to_string())?;
        let socket = dir.path().join("agent-guard.sock");
        let audit_dir = dir.path().join("audit");
        let pin_dir = dir.path().join("bpf");
        let mut d = Daemon {
            child: None,
            dir,
            socket,
            audit_dir,
            pin_dir,
            cgroup_root,
            cgroup_mount,
            policy_path,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn()?;
        Ok(d)
    }

    /// Starts the daemon process with this daemon's paths and flags and
    /// waits until it answers (its log is appended to).
    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .map_err(|e| e.to_string())?;
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let child = Command::new(agent_guard_bin())
            .arg("daemon")
            .arg("--policy")
            .arg(&self.policy_path)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--audit-dir")
            .arg(&self.audit_dir)
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .args(["--metrics-addr", "127.0.0.1:0"])
            // The audit signing key goes into the test's own directory,
            // unless the test picks one.
            .args(if extra.contains(&"--state-dir") {
                vec![]
            } else {
                vec![
                    "--state-dir".into(),
                    self.dir.path().join("state").into_os_string(),
                ]
            })
            .args(&extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", agent_guard_bin().display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("daemon exited with {status}:\n{}", self.log()));
            }
            if self.cli(&["status"]).status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("daemon not ready after 30 s:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the daemon (no clean shutdown: its pinned programs stay).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a new daemon process with the same paths and flags (after
    /// [`Daemon::kill`] or [`Daemon::stop`]).
    pub fn restart(&mut self) {
        self.spawn()
            .unwrap_or_else(|e| panic!("daemon did not restart: {e}"));
    }

    /// [`Daemon::restart`] that returns the failure (with the daemon's log)
    /// instead of panicking.
    pub fn try_restart(&mut self) -> Result<(), String> {
        self.spawn()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Runs an agent-guard client subcommand against this daemon; the
    /// `--socket` flag is added after the subcommand words.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(agent_guard_bin());
        cmd.args(args)
            .env("AGENT_GUARD_SOCKET", &self.socket)
            .stdin(Stdio::null());
        cmd.output().expect("run agent-guard")
    }

    /// [`Daemon::cli`] as user `uid` with primary group `gid` (uid 0: as
    /// root, unchanged). std drops supplementary groups when a root parent
    /// sets the uid, so `gid` is the only group the command has.
    pub fn cli_as(&self, uid: u32, gid: u32, args: &[&str]) -> Output {
        let mut cmd = Command::new(agent_guard_bin());
        cmd.args(args)
            .env("AGENT_GUARD_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .as_user(uid, gid);
        cmd.output().expect("run agent-guard")
    }

    /// `agent-guard grant --tenant T --agent A ARGS...` (ARGS: `--tool`,
    /// `--ttl`, `--uses`, `--pid`, ...), the output as it came.
    pub fn try_grant(&self, tenant: &str, agent: &str, args: &[&str]) -> Output {
        let mut all = vec!["grant", "--tenant", tenant, "--agent", agent];
        all.extend_from_slice(args);
        self.cli(&all)
    }

    /// [`Daemon::try_grant`] that must succeed; the grant's id.
    pub fn grant(&self, tenant: &str, agent: &str, args: &[&str]) -> u32 {
        let out = self.try_grant(tenant, agent, args);
        assert!(
            out.status.success(),
            "grant {tenant}/{agent} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("grant prints its id")
    }

    /// `agent-guard revoke --grant ID`, which must succeed.
    pub fn revoke(&self, id: u32) {
        self.cli_ok(&["revoke", "--grant", &id.to_string()]);
    }

    /// `agent-guard run --tenant T --agent A -- CMD...` (see
    /// [`Daemon::launch`] for task scopes and spawning).
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, tenant: &str, agent: &str, cmd: &[S]) -> Output {
        self.launch(tenant, agent).output(cmd)
    }

    /// Runs the probe as a tagged process and returns its exit status.
    pub fn probe(&self, tenant: &str, agent: &str, args: &[&str]) -> i32 {
        let out = self.launch(tenant, agent).probe(args);
        out.status.code().unwrap_or(-1)
    }

    pub fn status(&self) -> Value {
        let out = self.cli_ok(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// A map of this daemon's programs, opened by kernel id (found through
    /// the program ids `status --json` reports), so a test can read what
    /// the kernel holds without asking the daemon.
    pub fn kernel_map(&self, name: &str) -> aya::maps::MapData {
        let status = self.status();
        let ids: Vec<u32> = status["program_ids"]
            .as_object()
            .expect("status.program_ids")
            .values()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect();
        for info in aya::programs::loaded_programs().flatten() {
            if !ids.contains(&info.id()) {
                continue;
            }
            for map_id in info.map_ids().ok().flatten().unwrap_or_default() {
                let Ok(m) = aya::maps::MapInfo::from_id(map_id) else {
                    continue;
                };
                if m.name_as_str() == Some(name) {
                    return aya::maps::MapData::from_id(map_id).expect("open map by id");
                }
            }
        }
        panic!("no map {name} among the daemon's programs {ids:?}");
    }

    /// What the kernel's `GRANTS` map holds: (subject id, port, prefix
    /// length) -> grant ids in slot order.
    pub fn kernel_grants(&self) -> std::collections::BTreeMap<(u32, u16, u32), Vec<u32>> {
        use agent_guard_common::grant::{GrantKey, GrantSlots};
        let map = aya::maps::Map::LpmTrie(self.kernel_map("GRANTS"));
        let trie: aya::maps::LpmTrie<_, GrantKey, GrantSlots> =
            aya::maps::LpmTrie::try_from(map).expect("GRANTS is an LPM trie");
        trie.iter()
            .map(|r| {
                let (k, v) = r.expect("read GRANTS");
                let d = k.data();
                (
                    (
                        u32::from_be_bytes(d.subject),
                        u16::from_be_bytes(d.port),
                        k.prefix_len(),
                    ),
                    v.iter().map(|(_, g)| g).collect(),
                )
            })
            .collect()
    }

    /// What the kernel's `GRANT_STATE` map holds: grant id -> (uses left,
    /// revoked).
    pub fn kernel_grant_state(&self) -> std::collections::BTreeMap<u32, (i64, bool)> {
        use agent_guard_common::grant::{GRANT_REVOKED, GrantState};
        let map = aya::maps::Map::HashMap(self.kernel_map("GRANT_STATE"));
        let h: aya::maps::HashMap<_, u32, GrantState> =
            aya::maps::HashMap::try_from(map).expect("GRANT_STATE is a hash map");
        h.iter()
            .map(|r| {
                let (id, st) = r.expect("read GRANT_STATE");
                (id, (st.uses_left, st.flags & GRANT_REVOKED != 0))
            })
            .collect()
    }

    /// Polls `status --json` (up to `secs`) until `pred` holds; returns that
    /// status, or fails the test naming `what` and the last status.
    pub fn wait_status(&self, what: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("timed out after {secs} s waiting for {what}; status:\n{s:#}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `agent-guard run --agent SUB [--tools ..] -- probe ARGS` from
    /// inside a tagged process of (`tenant`, `parent`); returns the exit
    /// code and stderr.
    pub fn sub_agent(
        &self,
        tenant: &str,
        parent: &str,
        sub_args: &[&str],
        probe_args: &[&str],
    ) -> (i32, String) {
        let out = self.run(tenant, parent, &self.sub_agent_cmd(sub_args, probe_args));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts a tagged probe that runs `args` (typically `after MS ...`)
    /// without waiting for it.
    pub fn spawn_probe(&self, tenant: &str, agent: &str, args: &[&str]) -> Child {
        self.launch(tenant, agent).spawn_probe(args)
    }

    /// Every record of a tenant's log, parsed.
    pub fn audit(&self, tenant: &str) -> Vec<Value> {
        let path = self.audit_dir.join(tenant).join("audit.jsonl");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// Waits (up to 10 s) until `pred` holds for the tenant's records.
    pub fn wait_audit(
        &self,
        tenant: &str,
        what: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let recs = self.audit(tenant);
            if pred(&recs) {
                return recs;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for audit records ({what}); have:\n{}",
                    dump(&recs)
                );
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// Body of `GET /metrics`.
    pub fn metrics(&self) -> String {
        let addr = self.status()["daemon"]["metrics_addr"]
            .as_str()
            .expect("metrics addr")
            .to_string();
        let mut s = TcpStream::connect(&addr).expect("connect metrics");
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").expect("send");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read metrics");
        body.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    /// Stops the daemon with SIGTERM and waits for it; returns its log.
    pub fn stop(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.log()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        // Belt and braces if the daemon died: remove the cgroups it made
        // (after moving any stray test process out) and its bpffs.
        remove_cgroup_tree(&self.cgroup_root, &self.cgroup_mount);
        let _ = nix::mount::umount2(&self.pin_dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn remove_cgroup_tree(dir: &Path, mount: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path(), mount);
        }
    }
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines() {
            let _ = std::fs::write(mount.join("cgroup.procs"), pid);
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// A port free on 127.0.0.1 right now (for a daemon's per-agent DNS
/// proxy, which binds it on 127.0.0.0/10 + subject id: daemons running side
/// by side need their own).
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn probe_bin() -> PathBuf {
    let p = std::env::var_os("AGENT_GUARD_PROBE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/agent-guard-probe")
        });
    std::fs::canonicalize(&p).unwrap_or(p)
}

pub fn dump(recs: &[Value]) -> String {
    recs.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A TCP listener on loopback that accepts and drops connections in the
/// background, for "allowed" endpoints.
pub struct Listener {
    pub port: u16,
}

impl Listener {
    pub fn tcp(addr: &str) -> Listener {
        let l = std::net::TcpListener::bind(format!("{addr}:0")).expect("bind listener");
        let port = l.local_addr().expect("local addr").port();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                drop(conn);
            }
        });
        Listener { port }
    }

    /// A TCP listener on `[::]` (dual-stack) so v4, v6 and v4-mapped
    /// connects all reach it.
    pub fn tcp_dual() -> Listener {
        Self::tcp("[::]")
    }
}

/// A UDP socket on loopback that receives and drops datagrams.
pub fn udp_sink(addr: &str) -> (std::net::UdpSocket, u16) {
    let s = std::net::UdpSocket::bind(format!("{addr}:0")).expect("bind udp");
    let port = s.local_addr().expect("local addr").port();
    (s, port)
}

// ---------------------------------------------------------------------------
// Observability helpers: Prometheus tools, HTTP and the text exposition.

/// Whether the Prometheus tool `tool` (`promtool`, `prometheus`) runs here.
/// Missing with `AGENT_GUARD_REQUIRE_KERNEL_TESTS=1` fails the test;
/// otherwise the test is skipped loudly.
pub fn prometheus_tool(test: &str, tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    let required = std::env::var("AGENT_GUARD_REQUIRE_KERNEL_TESTS").is_ok_and(|v| v == "1");
    if required {
        panic!(
            "{test}: `{tool}` is missing (Debian package `prometheus`; `cargo xtask setup` installs it)"
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "kernel-tests: SKIPPED {test}: `{tool}` not installed (Debian package `prometheus`)"
    );
    false
}

/// A plain HTTP/1.0 GET; returns the status code and the body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("read {addr}{path}: {e}"))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {resp:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((code, body.to_string()))
}

/// Percent-encodes a URL query value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One sample of the Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// `name{a="x",b="y"}` with labels sorted, as an identity key.
    pub fn series(&self) -> String {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
            .collect();
        format!("{}{{{}}}", self.name, labels.join(","))
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Parses the Prometheus text exposition format (comments skipped,
/// timestamps ignored). Panics on a line it cannot read, so a malformed
/// exposition fails the test that scraped it.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_sample(l).unwrap_or_else(|| panic!("bad exposition line {l:?}")))
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let i = line.find(['{', ' '])?;
    let name = line[..i].to_string();
    let mut labels = std::collections::BTreeMap::new();
    let mut rest = &line[i..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices();
        loop {
            let mut key = String::new();
            let end = loop {
                match chars.next()? {
                    (_, '=') => break None,
                    (i, '}') if key.trim().is_empty() => break Some(i),
                    (_, ',') if key.trim().is_empty() => {}
                    (_, c) => key.push(c),
                }
            };
            if let Some(i) = end {
                rest = &r[i + 1..];
                break;
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut val = String::new();
            loop {
                match chars.next()?.1 {
                    '\\' => match chars.next()?.1 {
                        'n' => val.push('\n'),
                        c => val.push(c),
                    },
                    '"' => break,
                    c => val.push(c),
                }
            }
            labels.insert(key.trim().to_string(), val);
        }
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

impl Daemon {
    /// The address the daemon's `/metrics` endpoint listens on.
    pub fn metrics_addr(&self) -> String {
        self.status()["daemon"]["metrics_addr"]
            .as_str()
            .expect("metrics addr")
            .to_string()
    }
}

/// A real Prometheus server for one test, scraping given targets every
/// second (job `agent-guard`) and evaluating given rule files every second.
/// `Drop` kills it by PID and removes its storage.
pub struct Prometheus {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub addr: String,
}

impl Prometheus {
    pub fn start(targets: &[&str], rule_files: &[&Path]) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("agent-guard-prometheus-")
            .tempdir()
            .expect("tempdir");
        let rules: Vec<String> = rule_files
            .iter()
            .map(|p| format!("  - {:?}\n", p.display().to_string()))
            .collect();
        let targets: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{}\
             scrape_configs:\n  - job_name: agent-guard\n    static_configs:\n      - targets: [{}]\n",
            if rules.is_empty() {
                "  []\n".to_string()
            } else {
                rules.concat()
            },
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let mut p = Prometheus {
            child: None,
            dir,
            addr: String::new(),
        };
        // The port is picked free, then bound by Prometheus: retry if
        // something else took it in between.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            p.addr = format!("127.0.0.1:{port}");
            let log = std::fs::File::create(p.dir.path().join("prometheus.log")).expect("log");
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    p.dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={}", p.addr))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn prometheus");
            p.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(Ok(Some(_))) = p.child.as_mut().map(|c| c.try_wait()) {
                    p.child = None;
                    break;
                }
                if http_get(&p.addr, "/-/ready").is_ok_and(|(c, _)| c == 200) {
                    return p;
                }
                if Instant::now() > deadline {
                    panic!("prometheus not ready after 30 s:\n{}", p.log());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("prometheus did not start:\n{}", p.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>` parsed as JSON (whatever its status).
    pub fn api(&self, path: &str) -> Value {
        let (code, body) = http_get(&self.addr, &format!("/api/v1/{path}"))
            .unwrap_or_else(|e| panic!("prometheus API {path}: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| {
            panic!("prometheus API {path}: HTTP {code}, not JSON ({e}): {body}")
        })
    }

    /// An instant query; returns the whole API answer.
    pub fn query(&self, expr: &str) -> Value {
        self.api(&format!("query?query={}", url_encode(expr)))
    }

    /// Waits (up to `secs`) until `expr` returns at least one sample.
    pub fn wait_for(&self, expr: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.query(expr);
            if v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "prometheus: no result for {expr} after {secs} s: {v}\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
