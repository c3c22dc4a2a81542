//! Developer and CI tasks for agent-guard: `cargo xtask <command>`.
//!
//! The eBPF crate (`agent-guard-ebpf/`) is excluded from the workspace and is
//! only ever built for `bpfel-unknown-none` with nightly and `-Z build-std`.
//! Its object is embedded in the daemon through `AGENT_GUARD_EBPF_OBJ`.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod package;
mod soak;

/// Debian packages needed to build bpf-linker against LLVM 22.
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "clang-22",
];
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const EBPF_TARGET: &str = "bpfel-unknown-none";
const EBPF_CRATE_DIR: &str = "agent-guard-ebpf";
const EBPF_BIN_NAME: &str = "agent-guard-ebpf";
/// How long to keep retrying apt-get while another apt/dpkg holds its lock.
const APT_LOCK_WAIT: Duration = Duration::from_secs(300);

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, run, test, benchmark and lint agent-guard",
    after_help = "\
Examples:
  cargo xtask setup                    # install the eBPF toolchain if missing
  cargo xtask build --release          # target/release/agent-guard with eBPF embedded
  sudo -E cargo xtask run              # start the daemon with the default policy
  sudo -E cargo xtask run -- --policy /etc/agent-guard/policy.toml
  cargo xtask test                     # every test, real kernel included
  cargo xtask test -- --nocapture      # extra args go to the test binaries
  cargo xtask test -- -p agent-guard -- --test-threads=1
  sudo -E cargo xtask bench            # connect() cost; --quick for a smoke run
  sudo -E cargo xtask soak --minutes 10  # one daemon under churn, then leak/loss checks
  cargo xtask fuzz --seconds 60        # every fuzz target for a minute
  cargo xtask package                  # target/debian/agent-guard_*.deb
  cargo xtask lint"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check the toolchain (LLVM 22, bpf-linker, nightly rust-src, promtool,
    /// iproute2) and install only what is missing.
    #[command(after_help = "Examples:\n  cargo xtask setup\n  sudo -E cargo xtask setup")]
    Setup,
    /// Build the eBPF object, then the daemon and the test crate with the
    /// object embedded.
    #[command(after_help = "Examples:\n  cargo xtask build\n  cargo xtask build --release")]
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `agent-guard daemon ARGS...` in the foreground (root).
    #[command(after_help = "\
Examples:
  sudo -E cargo xtask run
  sudo -E cargo xtask run --release -- --policy /abs/policy.toml --metrics-addr 127.0.0.1:9464")]
    Run {
        /// Build and run the release binary.
        #[arg(long)]
        release: bool,
        /// Arguments passed to `agent-guard daemon`.
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Build, then run `cargo test --workspace` with the binaries' paths set.
    ///
    /// Extra args after `--` go to the test binaries (`--nocapture`,
    /// `--test-threads=N`, a name filter). If they contain a second `--`,
    /// they are passed to `cargo test` verbatim instead, so cargo options can
    /// be given too.
    #[command(after_help = "\
Examples:
  cargo xtask test
  cargo xtask test -- --nocapture --test-threads=1
  cargo xtask test -- connect
  cargo xtask test -- -p agent-guard -- --nocapture")]
    Test {
        /// Arguments for the test binaries (or for cargo test, see above).
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Build --release, then measure (root) how soon grant/revoke are
    /// enforced by the kernel, and loopback TCP connect() cost with
    /// agent-guard-probe: (a) nothing attached, (b) daemon running and an
    /// untagged process, (c) a tagged process with 10,000 endpoint entries,
    /// (d) a tagged process reaching the listener through a rate-limited
    /// grant among 10,000 grant entries; then `audit verify` / `replay`
    /// speed at 1 M records and a deny flood from every core through the
    /// event pipeline (attempts vs audited vs lost). Prints tables and
    /// writes target/bench/results.json.
    #[command(after_help = "\
Examples:
  sudo -E cargo xtask bench                 # 50 grant/revoke rounds; 7 rounds of a b c d d c b a
  sudo -E cargo xtask bench --quick         # smoke run: 2 rounds, 5000 connects
  sudo -E cargo xtask bench --skip-grants --skip-audit --skip-flood   # connect cost only
  sudo -E cargo xtask bench --rounds 15 --connects 10000")]
    Bench(bench::BenchArgs),
    /// Fuzz the library's parsers and verifiers (cargo-fuzz, nightly) for
    /// N seconds per target, then print a table (target, runs, exec/s,
    /// result). Installs cargo-fuzz if missing. Fails when a target
    /// crashes, naming the saved input.
    #[command(after_help = "\
Targets: policy, control_request, dns_message, audit_record, token.

Examples:
  cargo xtask fuzz                          # every target, 30 s each
  cargo xtask fuzz --seconds 10             # what CI runs
  cargo xtask fuzz --seconds 600 dns_message token
  cargo +nightly fuzz run token fuzz/artifacts/token/crash-...   # replay a crash")]
    Fuzz(fuzz::FuzzArgs),
    /// Build the Debian package: a release build with the eBPF object
    /// embedded, man pages and completions generated from the CLI, then
    /// cargo-deb (installed if missing) from [package.metadata.deb] in
    /// agent-guard/Cargo.toml. Writes target/debian/agent-guard_*.deb (binary
    /// stripped) and agent-guard-dbgsym_*.ddeb (its debug info).
    #[command(after_help = "\
Examples:
  cargo xtask package
  sudo apt install ./target/debian/agent-guard_0.1.0-1_amd64.deb
  cargo test -p agent-guard-tests --test package -- --nocapture   # check the .deb")]
    Package,
    /// Build --release, then run one daemon under N minutes of churn (root):
    /// short-lived tagged agents (forks, threads, task scopes, sub-agents,
    /// DNS), grants issued, used up, revoked and expiring, a policy reload
    /// every few seconds and a deny flood, all on loopback. Fails unless
    /// every decision was audited or counted lost, the maps are back to
    /// their baseline, grants agree with the kernel, the daemon's RSS has
    /// not doubled and `audit verify` passes. Prints a summary and writes
    /// target/soak/results.json.
    #[command(after_help = "\
Examples:
  sudo -E cargo xtask soak --minutes 10     # the reference run (BENCHMARKS.md, Soak)
  sudo -E cargo xtask soak --minutes 1      # what CI runs
  sudo -E cargo xtask soak --minutes 5 --launchers 4 --flood-burst 20000 --no-dns")]
    Soak(soak::SoakArgs),
    /// cargo fmt --check and cargo clippy -D warnings over the workspace.
    #[command(after_help = "Examples:\n  cargo xtask lint")]
    Lint,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Print the cause chain without a backtrace, whatever
            // RUST_BACKTRACE says.
            eprintln!("xtask: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    let ws = Workspace::locate()?;
    match cli.command {
        Cmd::Setup => {
            setup()?;
            eprintln!("xtask setup: toolchain complete");
            Ok(())
        }
        Cmd::Build { release } => build(&ws, release).map(|_| ()),
        Cmd::Run { release, args } => run(&ws, release, &args),
        Cmd::Test { args } => test(&ws, &args),
        Cmd::Bench(args) => {
            if !is_root() {
                bail!(
                    "the benchmark starts the daemon, which attaches eBPF programs to the \
                     cgroup2 root; that needs root. Run:\n  sudo -E cargo xtask bench"
                );
            }
            let built = build(&ws, true)?;
            bench::bench(&ws, &built, &args)
        }
        Cmd::Fuzz(args) => fuzz::fuzz(&ws, &args),
        Cmd::Package => package::package(&ws).map(|_| ()),
        Cmd::Soak(args) => {
            if !is_root() {
                bail!(
                    "the soak starts the daemon, which attaches eBPF programs to the \
                     cgroup2 root; that needs root. Run:\n  sudo -E cargo xtask soak --minutes {}",
                    args.minutes
                );
            }
            let built = build(&ws, !args.debug)?;
            soak::soak(&ws, &built, &args)
        }
        Cmd::Lint => lint(&ws),
    }
}

/// Paths of the workspace.
struct Workspace {
    root: PathBuf,
    target: PathBuf,
}

impl Workspace {
    fn locate() -> Result<Self> {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .with_context(|| format!("{} has no parent directory", manifest_dir.display()))?
            .to_path_buf();
        let target = root.join("target");
        Ok(Self { root, target })
    }

    fn profile_dir(&self, release: bool) -> PathBuf {
        self.target.join(if release { "release" } else { "debug" })
    }

    fn ebpf_target_dir(&self) -> PathBuf {
        self.target.join("ebpf")
    }

    fn ebpf_object(&self) -> PathBuf {
        self.ebpf_target_dir()
            .join(EBPF_TARGET)
            .join("release")
            .join(EBPF_BIN_NAME)
    }
}

/// What `build` produced.
struct Built {
    daemon: PathBuf,
    probe: PathBuf,
    ebpf_object: PathBuf,
}

// ---------------------------------------------------------------------------
// Process helpers
// ---------------------------------------------------------------------------

/// Shell-like rendering of a command for messages.
fn describe(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let _ = write!(s, "{}={} ", k.to_string_lossy(), quote(v));
        }
    }
    s.push_str(&quote(cmd.get_program()));
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(arg));
    }
    s
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with inherited stdio; fails unless it exits with status 0.
fn run_cmd(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    eprintln!("xtask: running {what}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed: {status}");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout, or None when it cannot be
/// started or exits non-zero.
fn probe_output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    // Effective uid is the second field of the `Uid:` line.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

/// The rustup `cargo` proxy (needed for `cargo +nightly`); `sudo` may have
/// dropped `~/.cargo/bin` from PATH, so look in CARGO_HOME too.
fn cargo_program() -> PathBuf {
    find_in_path("cargo")
        .or_else(|| {
            cargo_home()
                .map(|h| h.join("bin/cargo"))
                .filter(|p| is_executable(p))
        })
        .unwrap_or_else(|| PathBuf::from("cargo"))
}

/// PATH with `extra` directories in front, or None when they are all on
/// PATH already.
fn path_with(extra: &[PathBuf]) -> Option<std::ffi::OsString> {
    let current: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let mut dirs: Vec<PathBuf> = extra
        .iter()
        .filter(|d| !current.contains(d))
        .cloned()
        .collect();
    if dirs.is_empty() {
        return None;
    }
    dirs.extend(current);
    std::env::join_paths(dirs).ok()
}

/// A host `cargo` command in the workspace root, with the target directory
/// pinned to `<root>/target` so the paths we print and pass are right.
fn host_cargo(ws: &Workspace) -> Command {
    let mut cmd = Command::new(cargo_program());
    cmd.current_dir(&ws.root)
        .env("CARGO_TARGET_DIR", &ws.target)
        .env_remove("CARGO_BUILD_TARGET_DIR");
    cmd
}

// ---------------------------------------------------------------------------
// setup
// ---------------------------------------------------------------------------

/// One missing piece of the toolchain and how to get it.
struct Missing {
    what: &'static str,
    why: &'static str,
    kind: Fix,
}

enum Fix {
    Apt(Vec<&'static str>),
    RustSrc,
    BpfLinker,
}

fn dpkg_installed(packages: &[&str]) -> BTreeSet<String> {
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${Status}\n")
        .args(packages)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    // dpkg-query exits 1 when some package is unknown but still prints the
    // others, so look at stdout whatever the status.
    let Ok(out) = out else {
        return BTreeSet::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        // Strip a `:arch` qualifier.
        .map(|p| p.split(':').next().unwrap_or(p).to_owned())
        .collect()
}

fn bpf_linker_path() -> Option<PathBuf> {
    find_in_path("bpf-linker").or_else(|| {
        cargo_home()
            .map(|h| h.join("bin/bpf-linker"))
            .filter(|p| is_executable(p))
    })
}

fn has_nightly_rust_src() -> bool {
    probe_output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|out| out.lines().any(|l| l.trim().starts_with("rust-src")))
}

fn find_missing() -> Vec<Missing> {
    let mut missing = Vec::new();

    let installed = dpkg_installed(LLVM_PACKAGES);
    let absent: Vec<&'static str> = LLVM_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(*p))
        .collect();
    if !absent.is_empty() {
        missing.push(Missing {
            what: "LLVM 22 development files",
            why: "bpf-linker is built against LLVM 22 (at least as new as nightly rustc's LLVM)",
            kind: Fix::Apt(absent),
        });
    }
    if probe_output(Command::new("promtool").arg("--version")).is_none() {
        missing.push(Missing {
            what: "promtool (Debian package prometheus)",
            why: "the tests validate the daemon's /metrics output with `promtool check metrics`",
            kind: Fix::Apt(vec!["prometheus"]),
        });
    }
    if probe_output(Command::new("ip").arg("-V")).is_none() {
        missing.push(Missing {
            what: "ip (Debian package iproute2)",
            why: "the tests create network namespaces and interfaces with `ip`",
            kind: Fix::Apt(vec!["iproute2"]),
        });
    }
    if !has_nightly_rust_src() {
        missing.push(Missing {
            what: "rust-src for the nightly toolchain",
            why: "the eBPF crate is built with `-Z build-std=core` for bpfel-unknown-none",
            kind: Fix::RustSrc,
        });
    }
    if bpf_linker_path().is_none() {
        missing.push(Missing {
            what: "bpf-linker",
            why: "rustc links bpfel-unknown-none objects with bpf-linker",
            kind: Fix::BpfLinker,
        });
    }
    missing
}

const RUST_SRC_CMD: &str = "rustup component add rust-src --toolchain nightly";
const BPF_LINKER_CMD: &str = "PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --locked --no-default-features --features llvm-22";

fn setup() -> Result<()> {
    let missing = find_missing();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask setup: missing:");
    for m in &missing {
        eprintln!("  - {}: {}", m.what, m.why);
    }

    let apt: Vec<&str> = missing
        .iter()
        .filter_map(|m| match &m.kind {
            Fix::Apt(p) => Some(p),
            _ => None,
        })
        .flatten()
        .copied()
        .collect();

    if !apt.is_empty() && !is_root() {
        let mut msg = String::from(
            "installing Debian packages needs root. Run these commands, then retry:\n",
        );
        let _ = writeln!(msg, "  sudo apt-get update");
        let _ = writeln!(
            msg,
            "  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
            apt.join(" ")
        );
        for m in &missing {
            match &m.kind {
                Fix::RustSrc => {
                    let _ = writeln!(msg, "  {RUST_SRC_CMD}");
                }
                Fix::BpfLinker => {
                    let _ = writeln!(msg, "  {BPF_LINKER_CMD}");
                }
                Fix::Apt(_) => {}
            }
        }
        let _ = write!(msg, "(or run `sudo -E cargo xtask setup`)");
        bail!(msg);
    }

    if !apt.is_empty() {
        eprintln!("xtask setup: installing Debian packages: {}", apt.join(" "));
        apt_get(&["update"])?;
        let mut args = vec!["install", "-y"];
        args.extend(&apt);
        apt_get(&args)?;
    }

    for m in &missing {
        match &m.kind {
            Fix::Apt(_) => {}
            Fix::RustSrc => {
                eprintln!("xtask setup: adding rust-src to the nightly toolchain");
                run_cmd(Command::new("rustup").args([
                    "component",
                    "add",
                    "rust-src",
                    "--toolchain",
                    "nightly",
                ]))?;
            }
            Fix::BpfLinker => {
                eprintln!(
                    "xtask setup: building bpf-linker against LLVM 22 (takes a minute or two)"
                );
                let mut cmd = Command::new(cargo_program());
                cmd.args([
                    "install",
                    "bpf-linker",
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ]);
                if let Some(path) = path_with(&[PathBuf::from(LLVM_BIN)]) {
                    cmd.env("PATH", path);
                }
                scrub_build_env(&mut cmd);
                run_cmd(&mut cmd)?;
                if bpf_linker_path().is_none() {
                    bail!("bpf-linker was installed but is neither on PATH nor in $CARGO_HOME/bin");
                }
            }
        }
    }

    let still = find_missing();
    if !still.is_empty() {
        let names: Vec<&str> = still.iter().map(|m| m.what).collect();
        bail!("still missing after setup: {}", names.join(", "));
    }
    Ok(())
}

/// Runs `apt-get ARGS` non-interactively, retrying for up to five minutes
/// while another apt/dpkg process holds the lock.
fn apt_get(args: &[&str]) -> Result<()> {
    let deadline = Instant::now() + APT_LOCK_WAIT;
    loop {
        let mut cmd = Command::new("apt-get");
        cmd.args(["-o", "DPkg::Lock::Timeout=60"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        let what = describe(&cmd);
        eprintln!("xtask: running {what}");
        let out = cmd
            .spawn()
            .and_then(|child| child.wait_with_output())
            .with_context(|| format!("could not start `{what}`"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprint!("{stderr}");
        if out.status.success() {
            return Ok(());
        }
        let locked = stderr.contains("Could not get lock") || stderr.contains("Unable to lock");
        if locked && Instant::now() < deadline {
            eprintln!("xtask setup: apt/dpkg lock is held by another process; retrying in 10 s");
            std::thread::sleep(Duration::from_secs(10));
            continue;
        }
        bail!("`{what}` failed: {}", out.status);
    }
}

// ---------------------------------------------------------------------------
// build
// ---------------------------------------------------------------------------

/// Removes environment that would change how a nested cargo builds: flags,
/// wrappers and toolchain pins inherited from the user or from the cargo that
/// runs xtask.
fn scrub_build_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let drop = matches!(
            key,
            "RUSTFLAGS"
                | "RUSTDOCFLAGS"
                | "RUSTC"
                | "RUSTDOC"
                | "RUSTC_WRAPPER"
                | "RUSTC_WORKSPACE_WRAPPER"
                | "RUSTUP_TOOLCHAIN"
                | "CARGO"
                | "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_DIR"
        ) || key.starts_with("CARGO_ENCODED_")
            || key.starts_with("CARGO_BUILD_")
            || key.starts_with("CARGO_TARGET_")
            || key.starts_with("CARGO_PROFILE_")
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_CRATE_")
            || key.starts_with("CARGO_BIN_");
        if drop {
            cmd.env_remove(key);
        }
    }
}

fn build_ebpf(ws: &Workspace) -> Result<PathBuf> {
    let mut cmd = Command::new(cargo_program());
    scrub_build_env(&mut cmd);
    // bpf-linker may live in $CARGO_HOME/bin without that being on PATH
    // (e.g. under sudo); rustc finds it through PATH.
    let mut extra = Vec::new();
    if let Some(dir) = bpf_linker_path().and_then(|p| p.parent().map(Path::to_path_buf)) {
        extra.push(dir);
    }
    cmd.current_dir(ws.root.join(EBPF_CRATE_DIR))
        .args([
            "+nightly",
            "build",
            "-Z",
            "build-std=core",
            "--target",
            EBPF_TARGET,
            "--release",
        ])
        .env("CARGO_TARGET_DIR", ws.ebpf_target_dir())
        // cpu v3: atomic fetch-add on map values (grant use counts, rate
        // windows) needs BPF_ATOMIC with BPF_FETCH (kernel >= 5.12).
        .env(
            "RUSTFLAGS",
            "-C debuginfo=2 -C link-arg=--btf -C target-cpu=v3",
        );
    if let Some(path) = path_with(&extra) {
        cmd.env("PATH", path);
    }
    run_cmd(&mut cmd).context("building the eBPF object failed")?;
    let obj = ws.ebpf_object();
    if !obj.is_file() {
        bail!("eBPF build succeeded but {} does not exist", obj.display());
    }
    Ok(obj)
}

fn build(ws: &Workspace, release: bool) -> Result<Built> {
    setup()?;
    let ebpf_object = build_ebpf(ws)?;
    let mut cmd = host_cargo(ws);
    cmd.args(["build", "-p", "agent-guard", "-p", "agent-guard-tests"])
        .env("AGENT_GUARD_EBPF_OBJ", &ebpf_object);
    if release {
        cmd.arg("--release");
    }
    // Optional daemon features, e.g. AGENT_GUARD_FEATURES=kubernetes (the
    // Containerfile passes its build argument of that name).
    let features: Vec<String> = std::env::var("AGENT_GUARD_FEATURES")
        .unwrap_or_default()
        .split([',', ' '])
        .filter(|f| !f.is_empty())
        .map(|f| format!("agent-guard/{f}"))
        .collect();
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    run_cmd(&mut cmd)?;
    let dir = ws.profile_dir(release);
    let built = Built {
        daemon: dir.join("agent-guard"),
        probe: dir.join("agent-guard-probe"),
        ebpf_object,
    };
    eprintln!("xtask build: eBPF object {}", built.ebpf_object.display());
    eprintln!("xtask build: probe        {}", built.probe.display());
    eprintln!("xtask build: daemon       {}", built.daemon.display());
    Ok(built)
}

// ---------------------------------------------------------------------------
// run, test, lint
// ---------------------------------------------------------------------------

fn run(ws: &Workspace, release: bool, args: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "the daemon loads eBPF programs and attaches them to the cgroup2 root, \
             which needs root. Run:\n  sudo -E cargo xtask run{}",
            if release { " --release" } else { "" }
        );
    }
    let built = build(ws, release)?;
    let mut cmd = Command::new(&built.daemon);
    cmd.arg("daemon").args(args);
    let what = describe(&cmd);
    eprintln!("xtask: exec {what}");
    // exec only returns on failure.
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not exec `{what}`"))
}

fn test(ws: &Workspace, args: &[String]) -> Result<()> {
    let built = build(ws, false)?;
    let mut cmd = host_cargo(ws);
    cmd.args(["test", "--workspace"])
        .env("AGENT_GUARD_EBPF_OBJ", &built.ebpf_object)
        .env("AGENT_GUARD_BIN", &built.daemon)
        .env("AGENT_GUARD_PROBE", &built.probe);
    if args.iter().any(|a| a == "--") {
        // cargo options, `--`, test-binary options: pass through verbatim.
        cmd.args(args);
    } else if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    run_cmd(&mut cmd)?;
    // The `kubernetes` feature is off by default; its code (the
    // AgentGuardPolicy watcher and apply path) is built and tested here.
    run_cmd(
        host_cargo(ws)
            .args(KUBERNETES_FEATURE_TESTS)
            .env("AGENT_GUARD_EBPF_OBJ", &built.ebpf_object),
    )
}

/// `cargo xtask test`'s run of the daemon's unit tests with the
/// `kubernetes` feature: the modules that feature touches.
const KUBERNETES_FEATURE_TESTS: &[&str] = &[
    "test",
    "-p",
    "agent-guard",
    "--features",
    "kubernetes",
    "--lib",
    "--",
    "daemon::kubernetes",
    "policy::crd",
];

fn lint(ws: &Workspace) -> Result<()> {
    run_cmd(host_cargo(ws).args(["fmt", "--all", "--", "--check"]))?;
    // The eBPF crate is outside the workspace; check its formatting too.
    let mut fmt_ebpf = Command::new(cargo_program());
    scrub_build_env(&mut fmt_ebpf);
    fmt_ebpf
        .current_dir(ws.root.join(EBPF_CRATE_DIR))
        .args(["fmt", "--all", "--", "--check"]);
    run_cmd(&mut fmt_ebpf)?;
    // Clippy runs the daemon's build script, which embeds the eBPF object.
    setup()?;
    let obj = build_ebpf(ws)?;
    run_cmd(
        host_cargo(ws)
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .env("AGENT_GUARD_EBPF_OBJ", &obj),
    )?;
    // And the daemon with its optional `kubernetes` feature.
    run_cmd(
        host_cargo(ws)
            .args([
                "clippy",
                "-p",
                "agent-guard",
                "--all-targets",
                "--features",
                "kubernetes",
                "--",
                "-D",
                "warnings",
            ])
            .env("AGENT_GUARD_EBPF_OBJ", &obj),
    )?;
    // The fuzz targets are their own workspace (nightly): check that they
    // still compile against the library, warnings denied, so a change to a
    // public API does not first show up in `cargo xtask fuzz`.
    let mut fuzz = Command::new(cargo_program());
    scrub_build_env(&mut fuzz);
    fuzz.current_dir(ws.root.join(fuzz::FUZZ_DIR))
        .args(["+nightly", "check", "--bins"])
        .env("CARGO_TARGET_DIR", ws.target.join("fuzz-check"))
        .env("RUSTFLAGS", "-D warnings")
        .env("AGENT_GUARD_EBPF_OBJ", &obj);
    run_cmd(&mut fuzz)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cmd {
        let argv = std::iter::once("xtask").chain(args.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli.command,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn trailing_args_keep_inner_double_dash() {
        match parse(&["test", "--", "-p", "agent-guard", "--", "--nocapture"]) {
            Cmd::Test { args } => assert_eq!(args, ["-p", "agent-guard", "--", "--nocapture"]),
            _ => panic!("not test"),
        }
        match parse(&["test", "--", "--test-threads=1"]) {
            Cmd::Test { args } => assert_eq!(args, ["--test-threads=1"]),
            _ => panic!("not test"),
        }
        match parse(&["run", "--release", "--", "--policy", "/p.toml"]) {
            Cmd::Run { release, args } => {
                assert!(release);
                assert_eq!(args, ["--policy", "/p.toml"]);
            }
            _ => panic!("not run"),
        }
    }

    #[test]
    fn fuzz_arguments() {
        match parse(&["fuzz"]) {
            Cmd::Fuzz(args) => {
                assert_eq!(args.seconds, 30);
                assert!(args.targets.is_empty());
                assert_eq!(args.selected(), fuzz::TARGETS);
            }
            _ => panic!("not fuzz"),
        }
        match parse(&["fuzz", "--seconds", "10", "token", "policy", "token"]) {
            Cmd::Fuzz(args) => {
                assert_eq!(args.seconds, 10);
                assert_eq!(args.selected(), ["token", "policy"]);
            }
            _ => panic!("not fuzz"),
        }
        match parse(&["fuzz", "dns_message", "--seconds=5"]) {
            Cmd::Fuzz(args) => {
                assert_eq!((args.seconds, args.selected()), (5, vec!["dns_message"]));
            }
            _ => panic!("not fuzz"),
        }
        for bad in [
            &["fuzz", "nonesuch"][..],
            &["fuzz", "--seconds", "0"],
            &["fuzz", "--seconds", "-3"],
            &["fuzz", "--seconds"],
        ] {
            let argv = std::iter::once("xtask").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn soak_arguments() {
        match parse(&["soak", "--minutes", "1"]) {
            Cmd::Soak(args) => {
                assert_eq!(args.minutes, 1.0);
                assert_eq!((args.launchers, args.reload_every), (2, 3));
                assert!(!args.no_dns && !args.debug);
            }
            _ => panic!("not soak"),
        }
        match parse(&["soak"]) {
            Cmd::Soak(args) => assert_eq!(args.minutes, 10.0),
            _ => panic!("not soak"),
        }
        for bad in [
            &["soak", "--minutes", "0"][..],
            &["soak", "--minutes", "x"],
            &["soak", "--launchers", "0"],
        ] {
            let argv = std::iter::once("xtask").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote(OsStr::new("a/b-c")), "a/b-c");
        assert_eq!(quote(OsStr::new("-C debuginfo=2")), "'-C debuginfo=2'");
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
