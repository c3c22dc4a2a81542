//! What the daemon attaches follows its configuration: every program costs
//! every process on the node something, so one with nothing to do is not
//! attached (issue: untagged processes pay for hooks they never use).

use agent_guard_tests::{Daemon, Policy, free_port, kernel_test};

fn programs(d: &Daemon) -> Vec<String> {
    d.status()["programs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn recvmsg_hooks_are_attached_only_for_per_agent_dns() {
    if !kernel_test("recvmsg_hooks_are_attached_only_for_per_agent_dns") {
        return;
    }
    let policy = Policy::new().tenant("acme").build();
    let shared = Daemon::start(&policy);
    let p = programs(&shared);
    assert!(p.contains(&"cgroup/connect4".to_string()), "{p:?}");
    assert!(
        !p.iter().any(|x| x.contains("recvmsg")),
        "shared DNS mode: no recvmsg hooks: {p:?}"
    );
    let port = free_port().to_string();
    let per_agent = Daemon::start_with(
        &policy,
        &[
            "--dns-mode",
            "per-agent",
            "--dns-proxy-port",
            &port,
            "--dns-server",
            "127.0.0.1:9",
        ],
    );
    let p = programs(&per_agent);
    assert!(
        p.contains(&"cgroup/recvmsg4".to_string()) && p.contains(&"cgroup/recvmsg6".to_string()),
        "per-agent DNS restores answers' source: {p:?}"
    );
}
