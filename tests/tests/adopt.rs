//! Real-kernel tests of agents named by cgroup (`cgroup_glob`): a process
//! a "runtime" (this test) put into a matching cgroup, never launched with
//! `agent-guard run`, is fenced as that agent; a cgroup that stops matching
//! is let go. Real cgroups under the cgroup2 mount, removed at the end.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use agent_guard_tests::{Daemon, Endpoint, Listener, Policy, kernel_test, probe, probe_bin};

/// A cgroup tree of the test's own ("kubepods"), removed on drop.
struct Pods {
    root: PathBuf,
}

impl Pods {
    fn new(mount: &Path) -> Pods {
        let root = mount.join(format!("ag-test-pods-{}", std::process::id()));
        std::fs::create_dir_all(root.join("pod-a").join("ctr-1")).expect("cgroup");
        std::fs::create_dir_all(root.join("pod-a").join("sidecar")).expect("cgroup");
        Pods { root }
    }
    fn dir(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        // Move anything left back to the root cgroup, then remove leaves first.
        for rel in ["pod-a/ctr-1", "pod-a/sidecar"] {
            let procs =
                std::fs::read_to_string(self.dir(rel).join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines() {
                let _ =
                    std::fs::write(self.root.parent().expect("mount").join("cgroup.procs"), pid);
            }
            let _ = std::fs::remove_dir(self.dir(rel));
        }
        let _ = std::fs::remove_dir(self.dir("pod-a"));
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// An untagged probe that calls after `ms`, moved into `cgroup` at once
/// (as a container runtime would put its process).
fn contained(cgroup: &Path, ms: &str, port: u16) -> Child {
    let child = Command::new(probe_bin())
        .args(["after", ms, "tcp", "127.0.0.1", &port.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .expect("probe");
    std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string()).expect("move into cgroup");
    child
}

fn code(mut c: Child) -> i32 {
    c.wait().expect("wait").code().unwrap_or(-1)
}

#[test]
fn a_process_in_a_cgroup_matching_cgroup_glob_is_fenced_as_that_agent() {
    if !kernel_test("a_process_in_a_cgroup_matching_cgroup_glob_is_fenced_as_that_agent") {
        return;
    }
    let tool = Listener::tcp("127.0.0.1");
    let other = Listener::tcp("127.0.0.1");
    let mount = agent_guard_tests::cgroup2_mount();
    let pods = Pods::new(&mount);
    let rel = pods.root.strip_prefix(&mount).expect("under the mount");
    let glob = format!("/{}/pod-*/ctr-*", rel.display());
    let policy = |glob: &str| {
        Policy::new()
            .mode("enforce")
            .tenant("acme")
            .tool("search", [Endpoint::tcp("127.0.0.1/32", tool.port)])
            .raw(&format!(
                "[[agent]]\ntenant = \"acme\"\nname = \"ctr\"\ntools = [\"search\"]\ncgroup_glob = \"{glob}\"\n"
            ))
            .build()
    };
    let d = Daemon::start(&policy(&glob));
    let allowed = contained(&pods.dir("pod-a/ctr-1"), "3000", tool.port);
    let denied = contained(&pods.dir("pod-a/ctr-1"), "3000", other.port);
    // Not matching the pattern: untouched.
    let sidecar = contained(&pods.dir("pod-a/sidecar"), "3000", other.port);
    let s = d.wait_status("the container's cgroup adopted", 10, |s| {
        s["adopted_cgroups"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
    });
    assert_eq!(s["adopted_cgroups"][0]["subject"], "acme/ctr", "{s:#}");
    assert_eq!(code(allowed), probe::OK, "the agent's tool");
    assert_eq!(code(denied), probe::EPERM, "default deny for the container");
    assert_eq!(
        code(sidecar),
        probe::OK,
        "a cgroup the pattern does not name is untouched"
    );
    let recs = d.wait_audit("acme", "adopt and connect records", |r| {
        r.iter().any(|x| x["kind"] == "adopt")
            && r.iter().filter(|x| x["kind"] == "connect").count() >= 2
    });
    let c: Vec<_> = recs.iter().filter(|x| x["kind"] == "connect").collect();
    assert!(c.iter().all(|x| x["subject"] == "acme/ctr"), "{recs:?}");

    // A policy whose pattern no longer matches lets the cgroup go.
    std::fs::write(&d.policy_path, policy("/nowhere/*")).expect("policy");
    let out = d.cli(&["policy", "apply", d.policy_path.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.wait_status("the cgroup let go", 10, |s| {
        s["adopted_cgroups"]
            .as_array()
            .is_some_and(|a| a.is_empty())
    });
    let later = contained(&pods.dir("pod-a/ctr-1"), "200", other.port);
    assert_eq!(code(later), probe::OK, "untagged again");
}

#[test]
fn a_bad_cgroup_glob_is_refused_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (glob, why) in [
        ("kubepods/*", "must start with /"),
        ("/", "every process"),
        ("/a/../b", ".."),
        ("/a/[", "component"),
    ] {
        let p = dir.path().join("p.toml");
        std::fs::write(
            &p,
            format!("[[tenant]]\nname = \"acme\"\n\n[[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = []\ncgroup_glob = \"{glob}\"\n"),
        )
        .expect("write");
        let out = Command::new(agent_guard_tests::agent_guard_bin())
            .args(["policy", "check"])
            .arg(&p)
            .output()
            .expect("policy check");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{glob}");
        assert!(err.contains(why) && err.contains(":8:"), "{glob}: {err}");
    }
}
