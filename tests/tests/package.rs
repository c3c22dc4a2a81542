//! The Debian package made by `cargo xtask package`: what it holds, that it
//! installs (maintainer scripts included) into a throwaway root, upgrades
//! keeping a changed conffile and purges; that the packaged binary, default
//! policy, man pages, completions and systemd unit are sound.
//!
//! Tests the newest `target/debian/agent-guard_*.deb` (or `AGENT_GUARD_DEB`);
//! it never builds one (a release build takes minutes; `.ci/run` runs
//! `cargo xtask package` once, before the tests). Without a .deb it fails
//! when `AGENT_GUARD_REQUIRE_PACKAGE=1` (CI) and is skipped loudly
//! otherwise. It always prints one `package-tests:` line naming every check
//! it could not run here, and why.
//!
//! It never touches the host's systemd or dpkg database: dpkg works on the
//! throwaway root (`--root`, scripts run chrootless with DPKG_ROOT set), with
//! `systemctl` and `deb-systemd-invoke` replaced by stubs that only log.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Highest `systemd-analyze security` exposure accepted for the unit.
const MAX_EXPOSURE: f64 = 4.0;
const UNIT: &str = "agent-guard.service";

fn say(line: &str) {
    // Straight to stderr: the test harness does not capture this, so the
    // line shows in CI logs.
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            d.join(tool)
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

fn run(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not start {what}: {e}"))
}

/// Runs `cmd`, panics with its output unless it succeeds; returns stdout.
fn ok(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The .deb to test: `AGENT_GUARD_DEB`, else the newest one in
/// target/debian.
fn find_deb() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AGENT_GUARD_DEB") {
        return Some(PathBuf::from(p));
    }
    std::fs::read_dir(workspace().join("target/debian"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("agent-guard_") && n.ends_with(".deb"))
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

/// Checks that could not run, each with its reason.
#[derive(Default)]
struct NotRun(Vec<String>);

impl NotRun {
    fn add(&mut self, what: &str, why: &str) {
        self.0.push(format!("{what} ({why})"));
    }
}

#[test]
fn the_deb_installs_runs_and_carries_a_sound_unit() {
    let required = std::env::var("AGENT_GUARD_REQUIRE_PACKAGE").is_ok_and(|v| v == "1");
    let Some(deb) = find_deb().filter(|p| p.is_file()) else {
        let why = "no target/debian/agent-guard_*.deb; run `cargo xtask package` first";
        assert!(!required, "AGENT_GUARD_REQUIRE_PACKAGE=1 but {why}");
        say(&format!("package-tests: SKIPPED: {why}"));
        return;
    };
    if !on_path("dpkg-deb") {
        assert!(!required, "dpkg-deb is missing");
        say("package-tests: SKIPPED: dpkg-deb is not installed (Debian package dpkg)");
        return;
    }
    say(&format!("package-tests: testing {}", deb.display()));
    let mut not_run = NotRun::default();
    let tmp = tempfile::Builder::new()
        .prefix("agent-guard-package-")
        .tempdir()
        .expect("tempdir");

    check_control(&deb);
    let contents = check_contents(&deb);

    let root = tmp.path().join("root");
    let installed = install(&deb, &root, tmp.path(), &mut not_run);
    if !installed {
        ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    }

    let bin = root.join("usr/bin/agent-guard");
    check_binary(&bin, &mut not_run);
    check_policy(&bin, &root);
    check_man_pages(&bin, &root, &contents, tmp.path(), &mut not_run);
    check_completions(&root, &mut not_run);
    check_unit(&root, &mut not_run);
    if installed {
        upgrade_and_purge(&deb, &root, tmp.path());
    }

    // A unit cannot be started without systemd as PID 1; where systemd
    // runs, the test still leaves the host's services alone.
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    if pid1.trim() == "systemd" {
        not_run.add(
            "starting agent-guard.service",
            "the test does not touch the host's systemd",
        );
    } else {
        not_run.add(
            "starting agent-guard.service under systemd",
            &format!("PID 1 here is `{}`, not systemd", pid1.trim()),
        );
    }
    say(&format!(
        "package-tests: could not run: {}",
        not_run.0.join("; ")
    ));
}

/// Control fields, conffiles and maintainer scripts.
fn check_control(deb: &Path) {
    let info = ok(Command::new("dpkg-deb").arg("--info").arg(deb));
    for want in ["Package: agent-guard", "Section: admin"] {
        assert!(info.contains(want), "control lacks `{want}`:\n{info}");
    }
    let depends = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends:"))
        .unwrap_or_else(|| panic!("no Depends:\n{info}"));
    assert!(
        depends.contains("passwd"),
        "postinst runs groupadd: {depends}"
    );
    let conffiles = ok(Command::new("dpkg-deb")
        .arg("--info")
        .arg(deb)
        .arg("conffiles"));
    for want in ["/etc/agent-guard/policy.toml", "/etc/default/agent-guard"] {
        assert!(
            conffiles.lines().any(|l| l.trim() == want),
            "{want} is not a conffile:\n{conffiles}"
        );
    }
    let script = |name: &str| ok(Command::new("dpkg-deb").arg("--info").arg(deb).arg(name));
    let postinst = script("postinst");
    for want in [
        "groupadd --system",
        "deb-systemd-helper",
        UNIT,
        "deb-systemd-invoke",
        "restart",
    ] {
        assert!(
            postinst.contains(want),
            "postinst lacks `{want}`:\n{postinst}"
        );
    }
    assert!(
        !postinst.contains("#DEBHELPER#"),
        "the systemd snippets were not filled in:\n{postinst}"
    );
    assert_eq!(
        postinst.matches("deb-systemd-helper enable").count(),
        1,
        "the systemd snippets appear more than once:\n{postinst}"
    );
    let prerm = script("prerm");
    assert!(
        prerm.contains(UNIT),
        "prerm does not stop the unit:\n{prerm}"
    );
    let postrm = script("postrm");
    assert!(postrm.contains("purge"), "postrm:\n{postrm}");
}

/// The file list; returns it (paths without the leading `.`).
fn check_contents(deb: &Path) -> Vec<String> {
    let listing = ok(Command::new("dpkg-deb").arg("--contents").arg(deb));
    let mut files = Vec::new();
    for line in listing.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 {
            continue;
        }
        let path = f[5].trim_start_matches('.').to_string();
        if path == "/usr/bin/agent-guard" {
            assert_eq!(f[0], "-rwxr-xr-x", "{line}");
            assert!(matches!(f[1], "root/root" | "0/0"), "{line}");
        }
        files.push(path);
    }
    let has = |p: &str| files.iter().any(|f| f == p);
    let unit = ["/lib/systemd/system/", "/usr/lib/systemd/system/"]
        .iter()
        .any(|d| has(&format!("{d}{UNIT}")));
    assert!(unit, "no {UNIT} in the package:\n{listing}");
    for want in [
        "/usr/bin/agent-guard",
        "/usr/libexec/agent-guard/agent-guard-prepare",
        "/etc/agent-guard/policy.toml",
        "/etc/default/agent-guard",
        "/usr/share/man/man1/agent-guard.1.gz",
        "/usr/share/man/man1/agent-guard-daemon.1.gz",
        "/usr/share/man/man1/agent-guard-policy-check.1.gz",
        "/usr/share/bash-completion/completions/agent-guard",
        "/usr/share/zsh/vendor-completions/_agent-guard",
        "/usr/share/fish/vendor_completions.d/agent-guard.fish",
    ] {
        assert!(has(want), "{want} missing from the package:\n{listing}");
    }
    files
}

/// `dpkg --root ROOT -i`, maintainer scripts included. False (with the
/// reason recorded) when it cannot run here.
fn install(deb: &Path, root: &Path, tmp: &Path, not_run: &mut NotRun) -> bool {
    if !on_path("dpkg") {
        not_run.add("installing with dpkg --root", "dpkg is not installed");
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        not_run.add(
            "installing with dpkg --root (maintainer scripts)",
            "not root; unpacked with dpkg-deb -x instead",
        );
        return false;
    }
    // The least of a system the scripts need: dpkg's database and the
    // account files groupadd --prefix edits.
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/log",
        "etc",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    for (f, text) in [
        ("var/lib/dpkg/status", ""),
        ("var/lib/dpkg/available", ""),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ("etc/group", "root:x:0:\n"),
        ("etc/gshadow", "root:*::\n"),
    ] {
        std::fs::write(root.join(f), text).expect("write");
    }
    dpkg(root, tmp, &["--install"], deb);
    let status = ok(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--status", "agent-guard"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(
        group.lines().any(|l| l.starts_with("agent-guard:")),
        "postinst did not create the agent-guard group:\n{group}"
    );
    if on_path("deb-systemd-helper") {
        let wants = root
            .join("etc/systemd/system/multi-user.target.wants")
            .join(UNIT);
        assert!(
            wants.symlink_metadata().is_ok(),
            "postinst did not enable the unit ({} missing)",
            wants.display()
        );
    } else {
        not_run.add(
            "enabling the unit in postinst",
            "deb-systemd-helper (init-system-helpers) is not installed",
        );
    }
    true
}

/// Runs dpkg on the throwaway root with the systemd stubs first on PATH.
fn dpkg(root: &Path, tmp: &Path, args: &[&str], deb: &Path) -> String {
    let stubs = tmp.join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let log = tmp.join("stubs.log");
    for tool in ["systemctl", "deb-systemd-invoke"] {
        let p = stubs.join(tool);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho \"{tool} $*\" >> '{}'\n", log.display()),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = std::env::join_paths(
        std::iter::once(stubs).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display()))
        .arg(format!("--log={}", tmp.join("dpkg.log").display()))
        .args(["--force-script-chrootless", "--force-depends"])
        .args(args)
        .env("PATH", path);
    if args.contains(&"--install") {
        cmd.arg(deb);
    } else {
        cmd.arg("agent-guard");
    }
    ok(&mut cmd)
}

fn check_binary(bin: &Path, not_run: &mut NotRun) {
    let version = ok(Command::new(bin).arg("--version"));
    say(&format!(
        "package-tests: {}",
        version.trim().replace('\n', ", ")
    ));
    let lines: Vec<&str> = version.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("agent-guard ") && l.len() > "agent-guard ".len()),
        "{version}"
    );
    let commit = lines
        .iter()
        .find_map(|l| l.strip_prefix("git commit: "))
        .unwrap_or_else(|| panic!("no git commit:\n{version}"));
    // A .deb older than the tree is still tested, but said so.
    let head = Command::new("git")
        .current_dir(workspace())
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(head) = head.filter(|h| h != commit) {
        say(&format!(
            "package-tests: note: the .deb is from commit {commit}, HEAD is {head}; `cargo xtask package` rebuilds it"
        ));
    }
    let digest = lines
        .iter()
        .find_map(|l| l.strip_prefix("eBPF object sha256: "))
        .unwrap_or_else(|| panic!("no eBPF digest:\n{version}"));
    assert!(
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "the packaged binary has no eBPF object embedded: {digest}"
    );
    if on_path("readelf") {
        let sections = ok(Command::new("readelf").args(["-S", "-W"]).arg(bin));
        assert!(
            !sections.contains(".debug_info"),
            "the packaged binary carries debug info (not stripped)"
        );
    } else {
        not_run.add(
            "checking the binary is stripped",
            "readelf (binutils) is not installed",
        );
    }
    let size = bin.metadata().map(|m| m.len()).unwrap_or(0);
    say(&format!(
        "package-tests: /usr/bin/agent-guard is {:.1} MiB",
        size as f64 / 1048576.0
    ));
}

fn check_policy(bin: &Path, root: &Path) {
    let policy = root.join("etc/agent-guard/policy.toml");
    let text = std::fs::read_to_string(&policy).unwrap();
    assert!(
        text.lines()
            .any(|l| l.trim() == r#"default_mode = "monitor""#),
        "the default policy must be monitor mode:\n{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("\"enforce\"")),
        "the default policy must not enforce anything:\n{text}"
    );
    let out = ok(Command::new(bin).args(["policy", "check"]).arg(&policy));
    assert!(out.contains("ok"), "{out}");
}

/// Every page renders without warnings, and the package has exactly the
/// pages the packaged binary generates (none stale, none missing).
fn check_man_pages(bin: &Path, root: &Path, contents: &[String], tmp: &Path, not_run: &mut NotRun) {
    let fresh = tmp.join("man-fresh");
    ok(Command::new(bin).args(["generate", "man"]).arg(&fresh));
    let mut want: Vec<String> = std::fs::read_dir(&fresh)
        .unwrap()
        .map(|e| format!("{}.gz", e.unwrap().file_name().to_string_lossy()))
        .collect();
    want.sort();
    let mut have: Vec<String> = contents
        .iter()
        .filter_map(|p| p.strip_prefix("/usr/share/man/man1/"))
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    have.sort();
    assert_eq!(have, want, "packaged man pages differ from the CLI's");

    let renderer = if on_path("man") {
        "man"
    } else if on_path("groff") && on_path("zcat") {
        "groff"
    } else {
        not_run.add(
            "rendering the man pages",
            "neither man (man-db) nor groff is installed",
        );
        return;
    };
    for page in &have {
        let path = root.join("usr/share/man/man1").join(page);
        let out = match renderer {
            "man" => run(Command::new("man")
                .args(["--warnings", "-l"])
                .arg(&path)
                .env("MANWIDTH", "80")
                .env_remove("MAN_KEEP_FORMATTING")
                .env("LC_ALL", "C.UTF-8")),
            _ => run(Command::new("sh")
                .arg("-c")
                .arg("zcat \"$1\" | groff -man -Tutf8 -ww")
                .arg("sh")
                .arg(&path)),
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{page}: {stderr}");
        assert!(
            stderr.trim().is_empty(),
            "{page} renders with warnings: {stderr}"
        );
        let name = page.trim_end_matches(".1.gz");
        assert!(
            stdout.contains("NAME") && stdout.contains(name),
            "{page} rendered without its NAME section:\n{stdout}"
        );
    }
    say(&format!(
        "package-tests: {} man pages render without warnings ({renderer})",
        have.len()
    ));
}

/// Each completion script parses in its shell, where that shell exists.
fn check_completions(root: &Path, not_run: &mut NotRun) {
    for (shell, file, check) in [
        (
            "bash",
            "usr/share/bash-completion/completions/agent-guard",
            "-n",
        ),
        ("zsh", "usr/share/zsh/vendor-completions/_agent-guard", "-n"),
        (
            "fish",
            "usr/share/fish/vendor_completions.d/agent-guard.fish",
            "--no-execute",
        ),
    ] {
        let path = root.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("daemon"),
            "{file} does not complete subcommands"
        );
        if on_path(shell) {
            ok(Command::new(shell).arg(check).arg(&path));
        } else {
            not_run.add(
                &format!("parsing the {shell} completions"),
                &format!("{shell} is not installed"),
            );
        }
    }
}

/// `systemd-analyze verify` and `security` on the packaged unit, with the
/// throwaway root as the file system root: its binary, prepare script and
/// man pages are checked there. What other packages provide (the targets it
/// is ordered against, /bin/kill of ExecReload=) is copied in from the host.
fn check_unit(root: &Path, not_run: &mut NotRun) {
    if !on_path("systemd-analyze") {
        not_run.add(
            "systemd-analyze verify/security on the unit",
            "systemd-analyze is not installed (Debian package systemd)",
        );
        return;
    }
    let unit = ["lib/systemd/system", "usr/lib/systemd/system"]
        .iter()
        .map(|d| root.join(d).join(UNIT))
        .find(|p| p.is_file())
        .expect("the unit file");
    let unit_dir = unit.parent().unwrap();
    let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|d| Path::new(d).join("sysinit.target").exists())
        .expect("systemd-analyze without the host's unit files");
    // --no-clobber: the packaged unit stays, whatever the host has.
    ok(Command::new("cp")
        .args(["-a", "--no-clobber"])
        .arg(format!("{host_units}/."))
        .arg(unit_dir));
    let kill = root.join("bin/kill");
    if !kill.exists() {
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::copy("/bin/kill", &kill).expect("copy /bin/kill");
    }
    let verify = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(&unit)
        // Documentation=man:... is looked up with man(1), in the package.
        .env("MANPATH", root.join("usr/share/man")));
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {}: {}\n{stderr}",
        unit.display(),
        verify.status
    );
    let security = ok(Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(format!("--root={}", root.display()))
        .arg(&unit));
    let line = security
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level:\n{security}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unreadable exposure: {line}"));
    say(&format!(
        "package-tests: systemd-analyze verify: ok; {}",
        line.trim_start_matches(|c: char| !c.is_ascii_alphabetic())
    ));
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}:\n{security}"
    );
}

/// Reinstalling keeps a changed conffile, removal keeps it, purge deletes
/// the package's files and its enable link.
fn upgrade_and_purge(deb: &Path, root: &Path, tmp: &Path) {
    let policy = root.join("etc/agent-guard/policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str("# changed by the administrator\n");
    std::fs::write(&policy, &text).unwrap();
    dpkg(root, tmp, &["--install"], deb);
    assert_eq!(
        std::fs::read_to_string(&policy).unwrap(),
        text,
        "reinstalling overwrote a changed conffile"
    );
    dpkg(root, tmp, &["--remove"], deb);
    assert!(
        !root.join("usr/bin/agent-guard").exists(),
        "remove left the binary"
    );
    assert!(policy.exists(), "remove deleted a conffile");
    dpkg(root, tmp, &["--purge"], deb);
    assert!(!policy.exists(), "purge left the policy");
    let wants = root
        .join("etc/systemd/system/multi-user.target.wants")
        .join(UNIT);
    assert!(
        wants.symlink_metadata().is_err(),
        "purge left {}",
        wants.display()
    );
    say(
        "package-tests: install, reinstall (changed conffile kept), remove and purge ran with their maintainer scripts",
    );
}
