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

/// The daemon/CLI binary under test.
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

fn cgroup2_mount() -> PathBuf {
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
}

impl Daemon {
    /// Starts a daemon enforcing `policy` and waits until it answers.
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
        let log =
            std::fs::File::create(dir.path().join("daemon.log")).map_err(|e| e.to_string())?;
        let child = Command::new(agent_guard_bin())
            .arg("daemon")
            .arg("--policy")
            .arg(&policy_path)
            .arg("--socket")
            .arg(&socket)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--audit-dir")
            .arg(&audit_dir)
            .arg("--cgroup-root")
            .arg(&cgroup_root)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", agent_guard_bin().display()))?;
        let mut d = Daemon {
            child: Some(child),
            dir,
            socket,
            audit_dir,
            pin_dir,
            cgroup_root,
            cgroup_mount,
            policy_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = d.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("daemon exited with {status}:\n{}", d.log()));
            }
            if d.cli(&["status"]).status.success() {
                return Ok(d);
            }
            if Instant::now() > deadline {
                return Err(format!("daemon not ready after 30 s:\n{}", d.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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

    /// `agent-guard run --tenant T --agent A -- CMD...`.
    pub fn run(&self, tenant: &str, agent: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--tenant", tenant, "--agent", agent, "--"];
        args.extend_from_slice(cmd);
        self.cli(&args)
    }

    /// Runs the probe as a tagged process and returns its exit status.
    pub fn probe(&self, tenant: &str, agent: &str, args: &[&str]) -> i32 {
        let probe = probe_bin();
        let mut cmd = vec![probe.to_str().expect("utf-8 path")];
        cmd.extend_from_slice(args);
        let out = self.run(tenant, agent, &cmd);
        out.status.code().unwrap_or(-1)
    }

    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
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
