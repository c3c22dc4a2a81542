//! The Prometheus rules and the Grafana dashboard in `deploy/`, checked by
//! real Prometheus tooling against a real daemon:
//!
//! - `promtool check rules` and the human-written `alerts_test.yml`;
//! - `promtool test rules` on a test file generated from two real scrapes
//!   of a daemon driven through allowed and denied connects, a ring
//!   overflow, divergence, a refused policy and an audit write failure,
//!   with the expected alerts derived from those scrapes (and none when the
//!   series stay flat);
//! - every dashboard query run by a real Prometheus scraping a real daemon.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use agent_guard_tests::{
    Daemon, Endpoint, Listener, Policy, Prometheus, Sample, kernel_test, parse_metrics, probe,
    prometheus_tool,
};
use serde_json::Value;

/// Refused DNS queries in the incident: above the alert's threshold (10).
const DNS_REFUSALS: u32 = 12;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn alerts_yml() -> PathBuf {
    deploy().join("prometheus/alerts.yml")
}

const ALERTS: [&str; 10] = [
    "AgentGuardDown",
    "AgentGuardEventsLost",
    "AgentGuardDenySpike",
    "AgentGuardDivergence",
    "AgentGuardDnsRefused",
    "AgentGuardMapNearCapacity",
    "AgentGuardMapAlmostFull",
    "AgentGuardAuditWriteFailures",
    "AgentGuardPolicyReloadFailed",
    "AgentGuardAuditLag",
];

/// `acme/researcher` may use `search`; `globex/bot` has no tools.
fn policy(search: u16) -> String {
    Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tenant("globex")
        .tool("search", [Endpoint::tcp("127.0.0.1/32", search)])
        .agent("acme", "researcher", &["search"])
        .agent("globex", "bot", &[])
        .build()
}

const BAD_POLICY: &str = r#"default_mode = "enforce"

[[tenant]]
name = "acme"

[[agent]]
tenant = "acme"
name = "researcher"
tools = ["serch"]
"#;

/// Burst size: with `--ring-bytes 4096` it overflows the ring.
const BURST: u64 = 3000;

struct Scenario {
    search: Listener,
    other: Listener,
}

impl Scenario {
    fn new() -> Self {
        Scenario {
            search: Listener::tcp_dual(),
            other: Listener::tcp_dual(),
        }
    }

    fn start_daemon(&self) -> Daemon {
        // Per-agent DNS, so refused queries produce their series. No query
        // in the scenario goes upstream (only refused names are asked), so
        // the upstream is a port nothing answers on.
        let proxy_port = agent_guard_tests::free_port().to_string();
        Daemon::start_with(
            &policy(self.search.port),
            &[
                "--ring-bytes",
                "4096",
                "--dns-mode",
                "per-agent",
                "--dns-proxy-port",
                &proxy_port,
                "--dns-server",
                "127.0.0.1:9",
            ],
        )
    }

    /// Normal activity: one allowed and one denied connect.
    fn warm_up(&self, d: &Daemon) {
        let s = self.search.port.to_string();
        let o = self.other.port.to_string();
        assert_eq!(
            d.probe("acme", "researcher", &["tcp", "127.0.0.1", &s]),
            probe::OK
        );
        assert_eq!(
            d.probe("acme", "researcher", &["tcp", "127.0.0.1", &o]),
            probe::EPERM
        );
        d.wait_audit("acme", "warm-up connects", |r| {
            r.iter().filter(|x| x["kind"] == "connect").count() >= 2
        });
    }

    /// The incident: a deny flood that overflows the ring, a task that
    /// calls outside its declared tools, a refused policy, and a tenant
    /// whose audit log cannot be written.
    fn incident(&self, d: &Daemon) {
        let o = self.other.port.to_string();
        let n = BURST.to_string();
        // globex has written nothing yet, so its log directory does not
        // exist: a plain file in its place makes every write fail. Blocked
        // before the burst: the burst's `gap` record goes to every tenant's
        // log, globex's included, and would otherwise create it first.
        let globex = d.audit_dir.join("globex");
        assert!(
            !globex.exists(),
            "globex's log is opened lazily (nothing written yet)"
        );
        std::fs::write(&globex, "not a directory").expect("block globex's log");
        assert_eq!(
            d.probe(
                "acme",
                "researcher",
                &["repeat", &n, "tcp", "127.0.0.1", &o]
            ),
            probe::EPERM
        );
        let out = d
            .launch("acme", "researcher")
            .task("fetch docs")
            .tools("search")
            .probe(&["tcp", "127.0.0.1", &o]);
        assert_eq!(
            out.status.code(),
            Some(probe::EPERM),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // An agent asking for names no tool names (refused by its DNS
        // proxy, never sent upstream).
        assert_eq!(
            d.probe(
                "acme",
                "researcher",
                &[
                    "repeat",
                    &DNS_REFUSALS.to_string(),
                    "resolve",
                    "udp",
                    "c2VjcmV0.exfil.example",
                    "127.0.0.1"
                ]
            ),
            probe::REFUSED
        );
        wait_metrics(
            d,
            r#"agent_guard_dns_queries_total{agent="researcher",result="refused",tenant="acme"}"#,
        );
        // A broken policy file reaches the daemon's reload (SIGHUP / file
        // change) and is refused there. (`policy apply` of a bad file is
        // refused by the CLI before the daemon sees it, so it is not a
        // reload.)
        std::fs::write(&d.policy_path, BAD_POLICY).expect("write bad policy");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        );
        wait_metrics(d, r#"agent_guard_policy_reloads_total{result="error"}"#);
        assert_eq!(
            d.probe("globex", "bot", &["tcp", "127.0.0.1", &o]),
            probe::EPERM
        );
        // Everything has reached the daemon: every acme attempt is audited
        // or counted lost, and globex's record has failed.
        let lost = |r: &[Value]| -> u64 {
            r.iter()
                .filter(|x| x["kind"] == "gap")
                .filter_map(|x| x["lost"]["connect"].as_u64())
                .sum()
        };
        let recs = d.wait_audit("acme", "burst audited or lost", |r| {
            let connects = r.iter().filter(|x| x["kind"] == "connect").count() as u64;
            connects + lost(r) > 2 + BURST
        });
        assert!(lost(&recs) > 0, "the burst must overflow the tiny ring");
        wait_metrics(d, "agent_guard_audit_write_errors_total{");
    }
}

/// Waits (up to 10 s) until the daemon's metrics contain `needle`.
fn wait_metrics(d: &Daemon, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.metrics().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "metrics never showed {needle}:\n{}\n{}",
            d.metrics(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every `agent_guard_*` metric name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("agent_guard_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

fn assert_names_exist(what: &str, expr: &str, scraped: &BTreeSet<String>) {
    for name in metric_names(expr) {
        assert!(
            scraped.contains(&name),
            "{what} uses `{name}`, which the daemon does not expose (exposed: {scraped:?})\n  expr: {expr}"
        );
    }
}

fn run_promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("run promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn alert_rules_pass_promtool_check_and_the_static_rule_tests() {
    if !prometheus_tool(
        "alert_rules_pass_promtool_check_and_the_static_rule_tests",
        "promtool",
    ) {
        return;
    }
    let rules = alerts_yml();
    let (ok, out) = run_promtool(&["check", "rules", rules.to_str().expect("utf-8")]);
    assert!(ok, "promtool check rules:\n{out}");
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", ALERTS.len())),
        "{out}"
    );
    let text = std::fs::read_to_string(&rules).expect("alerts.yml");
    for alert in ALERTS {
        assert!(
            text.contains(&format!("alert: {alert}\n")),
            "{alert} missing"
        );
    }
    let tests = deploy().join("prometheus/alerts_test.yml");
    let (ok, out) = run_promtool(&["test", "rules", tests.to_str().expect("utf-8")]);
    assert!(ok, "promtool test rules alerts_test.yml:\n{out}");
}

/// An alerting rule as Prometheus itself parsed it (`/api/v1/rules`).
struct Rule {
    name: String,
    query: String,
    duration: f64,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until every rule of alerts.yml has been evaluated on the real
/// scrapes, asserts none failed, and returns them.
fn loaded_rules(prom: &Prometheus) -> Vec<Rule> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = prom.api("rules");
        assert_eq!(v["status"], "success", "{v}");
        let rules: Vec<&Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let evaluated = rules.len() == ALERTS.len()
            && rules.iter().all(|r| {
                !r["lastEvaluation"]
                    .as_str()
                    .unwrap_or("0001")
                    .starts_with("0001")
            });
        if evaluated {
            for r in &rules {
                assert_eq!(
                    r["health"], "ok",
                    "rule {} fails on the real series: {}",
                    r["name"], r["lastError"]
                );
            }
            return rules
                .iter()
                .map(|r| Rule {
                    name: r["name"].as_str().unwrap_or_default().to_string(),
                    query: r["query"].as_str().unwrap_or_default().to_string(),
                    duration: r["duration"].as_f64().unwrap_or_default(),
                    labels: string_map(&r["labels"]),
                    annotations: string_map(&r["annotations"]),
                })
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "rules not all evaluated: {v}\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Renders an annotation template for the given expression-result labels.
/// Only `{{ $labels.NAME }}` is supported; anything else (e.g. `$value`)
/// fails here so the test's expectations stay exact.
fn render(template: &str, labels: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let end = rest[i..]
            .find("}}")
            .unwrap_or_else(|| panic!("unclosed {{{{ in {template:?}"));
        let inner = rest[i + 2..i + end].trim();
        let name = inner.strip_prefix("$labels.").unwrap_or_else(|| {
            panic!("annotation template {inner:?} unsupported by the rule test (only $labels.NAME)")
        });
        let value = labels
            .get(name)
            .unwrap_or_else(|| panic!("template uses $labels.{name}, absent from {labels:?}"));
        out.push_str(value);
        rest = &rest[i + end + 2..];
    }
    out.push_str(rest);
    out
}

/// A series as the test file names it, with the labels Prometheus adds.
type Key = (String, BTreeMap<String, String>);

fn key(s: &Sample, target: &BTreeMap<String, String>) -> Key {
    let mut labels = s.labels.clone();
    labels.extend(target.clone());
    (s.name.clone(), labels)
}

fn selector((name, labels): &Key) -> String {
    let l: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}={}", serde_json::to_string(v).expect("json")))
        .collect();
    format!("{name}{{{}}}", l.join(","))
}

fn num(v: f64) -> String {
    format!("{v}")
}

/// Scrape 1 (before) and scrape 2 (after), keyed by series.
struct Scrapes {
    before: BTreeMap<Key, f64>,
    after: BTreeMap<Key, f64>,
    target: BTreeMap<String, String>,
}

impl Scrapes {
    /// Series of `name` in scrape 2 whose value grew from scrape 1 (or is
    /// new and above zero), optionally filtered by a label value.
    fn grew(&self, name: &str, filter: Option<(&str, &str)>) -> Vec<BTreeMap<String, String>> {
        self.after
            .iter()
            .filter(|((n, l), _)| {
                n == name && filter.is_none_or(|(k, v)| l.get(k).is_some_and(|x| x == v))
            })
            .filter(|(k, after)| **after > self.before.get(*k).copied().unwrap_or(0.0))
            .map(|((_, l), _)| l.clone())
            .collect()
    }

    /// Increase between the scrapes of series present in both (a series
    /// new in scrape 2 has no rate over a window ending on its first
    /// samples).
    fn delta(&self, k: &Key) -> f64 {
        match (self.before.get(k), self.after.get(k)) {
            (Some(b), Some(a)) => a - b,
            _ => 0.0,
        }
    }
}

/// `histogram_quantile` over the increase of each bucket between scrapes,
/// grouped by (instance, job) like the AuditLag rule.
fn p99_lag(s: &Scrapes, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut by_le: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for k in s.after.keys().filter(|(n, _)| n == name) {
        let le = k.1.get("le").expect("le label");
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().expect("le")
        };
        let group = format!("{:?}", s.target);
        by_le.entry(group).or_default().push((le, s.delta(k)));
    }
    let mut out = Vec::new();
    for (_, mut buckets) in by_le {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
        if total <= 0.0 {
            continue; // NaN: no alert
        }
        let rank = 0.99 * total;
        let (mut lower, mut prev) = (0.0, 0.0);
        let mut q = f64::NAN;
        for (i, &(le, cum)) in buckets.iter().enumerate() {
            if cum >= rank {
                q = if le.is_infinite() {
                    buckets.get(i.wrapping_sub(1)).map(|b| b.0).unwrap_or(0.0)
                } else {
                    lower + (le - lower) * (rank - prev) / (cum - prev)
                };
                break;
            }
            lower = le;
            prev = cum;
        }
        out.push((s.target.clone(), q));
    }
    out
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("json")
}

/// One `alert_rule_test` entry.
fn alert_test(rule: &Rule, eval_min: u32, firing: &[BTreeMap<String, String>], out: &mut String) {
    out.push_str(&format!(
        "      - eval_time: {eval_min}m\n        alertname: {}\n",
        rule.name
    ));
    if firing.is_empty() {
        out.push_str("        exp_alerts: []\n");
        return;
    }
    out.push_str("        exp_alerts:\n");
    for labels in firing {
        let mut all = labels.clone();
        all.extend(rule.labels.clone());
        out.push_str("          - exp_labels:\n");
        for (k, v) in &all {
            out.push_str(&format!("              {k}: {}\n", yaml_str(v)));
        }
        out.push_str("            exp_annotations:\n");
        for (k, t) in &rule.annotations {
            out.push_str(&format!(
                "              {k}: {}\n",
                yaml_str(&render(t, labels))
            ));
        }
    }
}

/// Minutes: scrape 1 holds for t = 0..=60, scrape 2 for 61..=90, and the
/// failed scrape after the daemon stopped for 91..=100.
const JUMP: u32 = 61;
const FLAT_END: u32 = 90;
const DOWN_END: u32 = 100;

/// The generated promtool test file: input series from the two scrapes,
/// expected alerts derived from them. `sabotage` drops the expected
/// EventsLost alert, which promtool must then reject.
fn generate_rule_tests(rules: &[Rule], s: &Scrapes, sabotage: bool) -> String {
    let rule = |name: &str| {
        rules
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("rule {name} not loaded"))
    };
    let mut keys: BTreeSet<&Key> = s.before.keys().collect();
    keys.extend(s.after.keys());
    let up: Key = ("up".into(), s.target.clone());
    let phase = |v: Option<&f64>, n: u32| match v {
        Some(v) => format!("{}x{n}", num(*v)),
        None => format!("_x{n}"),
    };

    let mut f = format!(
        "# Generated by tests/tests/observability.rs from two real scrapes.\n\
         rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n",
        yaml_str(&alerts_yml().display().to_string())
    );

    // Test 1: the incident between the scrapes, then the daemon stops.
    f.push_str("  - name: incident between two real scrapes, then the daemon stops\n    interval: 1m\n    input_series:\n");
    f.push_str(&format!(
        "      - series: {}\n        values: \"1x{} 0x{}\"\n",
        yaml_str(&selector(&up)),
        FLAT_END,
        DOWN_END - FLAT_END - 1
    ));
    for k in &keys {
        // t=0..60 (61 samples), 61..90 (30), 91..100 absent (10).
        f.push_str(&format!(
            "      - series: {}\n        values: \"{} {} _x{}\"\n",
            yaml_str(&selector(k)),
            phase(s.before.get(*k), JUMP - 1),
            phase(s.after.get(*k), FLAT_END - JUMP),
            DOWN_END - FLAT_END - 1
        ));
    }
    f.push_str("    alert_rule_test:\n");
    let target = vec![s.target.clone()];
    // Deny spike per tenant: the rule's 5m rate at t=64 extrapolates the
    // increase over 4 of 5 minutes.
    let mut deny_by_tenant: BTreeMap<String, f64> = BTreeMap::new();
    for k in s.after.keys().filter(|(n, l)| {
        n == "agent_guard_decisions_total" && l.get("verdict").is_some_and(|v| v == "deny")
    }) {
        *deny_by_tenant.entry(k.1["tenant"].clone()).or_default() += s.delta(k);
    }
    let mut spikes = Vec::new();
    for (tenant, d) in &deny_by_tenant {
        let rate5m = d * 5.0 / 4.0 / 300.0;
        assert!(
            !(0.35..=0.7).contains(&rate5m),
            "deny rate {rate5m}/s of {tenant} is too close to the 0.5/s floor to predict"
        );
        if rate5m > 0.5 {
            spikes.push(BTreeMap::from([("tenant".to_string(), tenant.clone())]));
        }
    }
    let lag: Vec<_> = p99_lag(s, "agent_guard_event_delivery_seconds_bucket")
        .into_iter()
        .filter(|(_, q)| *q > 5.0)
        .map(|(l, _)| l)
        .collect();
    // The maps over a share of their capacity in the real scrape.
    let over = |share: f64| -> Vec<_> {
        s.after
            .iter()
            .filter(|((n, _), _)| n == "agent_guard_map_entries")
            .filter(|((_, l), entries)| {
                let cap = s
                    .after
                    .get(&("agent_guard_map_capacity".to_string(), l.clone()))
                    .copied()
                    .unwrap_or(0.0);
                cap > 0.0 && **entries / cap > share
            })
            .map(|((_, l), _)| l.clone())
            .collect()
    };
    // The map alerts and the maps each must name.
    let map_alerts = [
        ("AgentGuardMapNearCapacity", over(0.8)),
        ("AgentGuardMapAlmostFull", over(0.9)),
    ];
    let map_alert = |name: &str| map_alerts.iter().find(|(n, _)| *n == name);
    let mut lost = s.grew("agent_guard_events_lost_total", None);
    if sabotage {
        lost.clear();
    }
    let at_jump: Vec<(&str, Vec<BTreeMap<String, String>>)> = vec![
        ("AgentGuardDown", vec![]),
        ("AgentGuardEventsLost", lost),
        ("AgentGuardDenySpike", spikes),
        (
            "AgentGuardDivergence",
            s.grew("agent_guard_divergence_total", None),
        ),
        (
            "AgentGuardDnsRefused",
            s.grew("agent_guard_dns_queries_total", Some(("result", "refused"))),
        ),
        (
            "AgentGuardAuditWriteFailures",
            s.grew("agent_guard_audit_write_errors_total", None),
        ),
        (
            "AgentGuardPolicyReloadFailed",
            s.grew(
                "agent_guard_policy_reloads_total",
                Some(("result", "error")),
            ),
        ),
        ("AgentGuardAuditLag", lag),
    ];
    let eval = JUMP + 3;
    for (name, firing) in &at_jump {
        let r = rule(name);
        assert!(
            r.duration <= 120.0,
            "{name}: `for` over 2m cannot be checked at {eval}m in this timeline"
        );
        alert_test(r, eval, firing, &mut f);
    }
    // Gauges hold from t=61: a `for` of up to 29m is over by t=90.
    for (name, firing) in &map_alerts {
        alert_test(rule(name), FLAT_END, firing, &mut f);
    }
    // By t=90 the counters have been flat for 29 minutes: nothing fires.
    for name in ALERTS {
        if map_alert(name).is_none() {
            alert_test(rule(name), FLAT_END, &[], &mut f);
        }
    }
    // The daemon really stopped and its scrape failed: up = 0 from t=91.
    alert_test(rule("AgentGuardDown"), DOWN_END - 5, &target, &mut f);

    // Test 2: the scrape-2 series flat for 90 minutes: nothing but a map
    // that is really near capacity fires.
    f.push_str("  - name: real series that stay flat\n    interval: 1m\n    input_series:\n");
    f.push_str(&format!(
        "      - series: {}\n        values: \"1x{FLAT_END}\"\n",
        yaml_str(&selector(&up))
    ));
    for (k, v) in &s.after {
        f.push_str(&format!(
            "      - series: {}\n        values: \"{}x{FLAT_END}\"\n",
            yaml_str(&selector(k)),
            num(*v)
        ));
    }
    f.push_str("    alert_rule_test:\n");
    for name in ALERTS {
        let firing = map_alert(name).map(|(_, f)| f.clone()).unwrap_or_default();
        alert_test(rule(name), 70, &firing, &mut f);
    }
    f
}

#[test]
fn alert_rules_fire_on_series_a_real_daemon_produced() {
    if !kernel_test("alert_rules_fire_on_series_a_real_daemon_produced") {
        return;
    }
    if !prometheus_tool(
        "alert_rules_fire_on_series_a_real_daemon_produced",
        "promtool",
    ) || !prometheus_tool(
        "alert_rules_fire_on_series_a_real_daemon_produced",
        "prometheus",
    ) {
        return;
    }
    let sc = Scenario::new();
    let mut d = sc.start_daemon();
    let addr = d.metrics_addr();
    // Prometheus parses the rules and evaluates them on the real series
    // (no evaluation errors such as duplicate label sets).
    let rules_path = alerts_yml();
    let prom = Prometheus::start(&[&addr], &[&rules_path]);
    prom.wait_for(r#"up{job="agent-guard"} == 1"#, 30);

    sc.warm_up(&d);
    let before = parse_metrics(&d.metrics());
    sc.incident(&d);
    let after_text = d.metrics();
    let after = parse_metrics(&after_text);
    prom.wait_for("agent_guard_events_lost_total > 0", 30);
    let rules = loaded_rules(&prom);
    assert_eq!(
        rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ALERTS.to_vec()
    );

    // Every metric an alert uses is one the daemon really exposes.
    let names: BTreeSet<String> = after.iter().map(|s| s.name.clone()).collect();
    for r in &rules {
        assert_names_exist(&format!("alert {}", r.name), &r.query, &names);
    }

    // The scenario must have moved what the alerts watch.
    let target = BTreeMap::from([
        ("instance".to_string(), addr.clone()),
        ("job".to_string(), "agent-guard".to_string()),
    ]);
    let s = Scrapes {
        before: before.iter().map(|x| (key(x, &target), x.value)).collect(),
        after: after.iter().map(|x| (key(x, &target), x.value)).collect(),
        target: target.clone(),
    };
    for (what, grew) in [
        ("events lost", s.grew("agent_guard_events_lost_total", None)),
        ("divergence", s.grew("agent_guard_divergence_total", None)),
        (
            "audit write errors",
            s.grew("agent_guard_audit_write_errors_total", None),
        ),
        (
            "policy reload errors",
            s.grew(
                "agent_guard_policy_reloads_total",
                Some(("result", "error")),
            ),
        ),
    ] {
        assert!(
            !grew.is_empty(),
            "the scenario did not move {what}:\n{after_text}"
        );
    }

    // The daemon stops; its scrape now fails, which is what up == 0 means.
    d.stop();
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "the metrics endpoint still answers after stop"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let check = |name: &str, text: &str| -> (bool, String) {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write test file");
        // Kept for inspection next to the build output.
        let keep = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/observability")
            .join(name);
        let _ = std::fs::create_dir_all(keep.parent().expect("parent"));
        let _ = std::fs::write(&keep, text);
        run_promtool(&["test", "rules", path.to_str().expect("utf-8")])
    };
    let generated = generate_rule_tests(&rules, &s, false);
    let (ok, out) = check("generated_alerts_test.yml", &generated);
    assert!(
        ok,
        "promtool test rules on the real series failed:\n{out}\n--- test file ---\n{generated}"
    );
    // The harness is not vacuous: an expectation that ignores the lost
    // events is rejected.
    let (ok, out) = check(
        "sabotaged_alerts_test.yml",
        &generate_rule_tests(&rules, &s, true),
    );
    assert!(!ok, "promtool accepted a wrong expectation:\n{out}");
    assert!(out.contains("AgentGuardEventsLost"), "{out}");
}

/// Every PromQL expression in the dashboard (panel targets, nested panels)
/// with its panel title.
fn dashboard_exprs(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            let title = m
                .get("title")
                .and_then(Value::as_str)
                .unwrap_or(title)
                .to_string();
            if let Some(e) = m.get("expr").and_then(Value::as_str) {
                out.push((title.clone(), e.to_string()));
            }
            for (k, v) in m {
                if k != "templating" {
                    dashboard_exprs(v, &title, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, title, out)),
        _ => {}
    }
}

/// Grafana variables replaced the way "All" and a 1s scrape would.
fn substitute(expr: &str) -> String {
    let mut e = expr.to_string();
    for (var, val) in [
        ("$__rate_interval", "1m"),
        ("${__rate_interval}", "1m"),
        ("$__interval", "5s"),
        ("${__interval}", "5s"),
        ("$__range", "5m"),
        ("${__range}", "5m"),
        ("${tenant}", ".*"),
        ("$tenant", ".*"),
        ("${agent}", ".*"),
        ("$agent", ".*"),
        ("${instance}", ".*"),
        ("$instance", ".*"),
    ] {
        e = e.replace(var, val);
    }
    assert!(!e.contains('$'), "unknown dashboard variable in {expr}");
    e
}

/// Panels that must show data after the scenario.
const KEY_PANELS: [&str; 12] = [
    "Daemons up",
    "Tracked processes",
    "Active grants",
    "Decisions by verdict per tenant / agent / tool",
    "Denies by reason",
    "Top tools (calls in range)",
    "Divergence (calls outside declared tools)",
    "Tracked processes and active grants per tenant",
    "Kernel events / s and events lost / s",
    "Kernel map fill ratio",
    "Event delivery lag, kernel to audit record (p50 / p99)",
    "Policy reloads",
];

#[test]
fn dashboard_queries_run_on_a_real_prometheus_scraping_a_real_daemon() {
    let name = "dashboard_queries_run_on_a_real_prometheus_scraping_a_real_daemon";
    if !kernel_test(name) || !prometheus_tool(name, "prometheus") {
        return;
    }
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/agent-guard.json")).expect("dashboard"),
    )
    .expect("dashboard is JSON");
    assert_eq!(dash["schemaVersion"], 39);
    let mut exprs = Vec::new();
    dashboard_exprs(&dash["panels"], "", &mut exprs);
    assert!(exprs.len() >= 15, "{exprs:?}");
    for t in KEY_PANELS {
        assert!(exprs.iter().any(|(p, _)| p == t), "no panel {t:?}");
    }
    // Every panel and query names the data source variable.
    let text = dash.to_string();
    assert!(text.contains("${DS_PROMETHEUS}"));

    let sc = Scenario::new();
    let d = sc.start_daemon();
    let addr = d.metrics_addr();
    let rules_path = alerts_yml();
    let prom = Prometheus::start(&[&addr], &[&rules_path]);
    prom.wait_for(r#"up{job="agent-guard"} == 1"#, 30);
    sc.warm_up(&d);
    sc.incident(&d);
    // Rates need a few scrapes after the activity.
    prom.wait_for("agent_guard_events_lost_total > 0", 30);
    std::thread::sleep(Duration::from_secs(3));
    let names: BTreeSet<String> = parse_metrics(&d.metrics())
        .into_iter()
        .map(|s| s.name)
        .collect();

    let mut empty = Vec::new();
    for (panel, expr) in &exprs {
        assert_names_exist(&format!("panel {panel:?}"), expr, &names);
        let q = substitute(expr);
        let v = prom.query(&q);
        assert_eq!(
            v["status"], "success",
            "panel {panel:?}: query {q} failed: {v}"
        );
        let n = v["data"]["result"].as_array().map_or(0, Vec::len);
        if n == 0 {
            empty.push(format!("{panel}: {q}"));
        }
        if KEY_PANELS.contains(&panel.as_str()) {
            assert!(n > 0, "key panel {panel:?} has no data: {q}\n{v}");
        }
    }
    eprintln!("observability: panels without data (allowed): {empty:?}");

    // Template variables: label_values(SELECTOR, LABEL) has values.
    for var in dash["templating"]["list"].as_array().expect("templating") {
        let Some(def) = var["definition"].as_str() else {
            continue;
        };
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {def} is not label_values(...)"));
        let (sel, label) = inner.rsplit_once(',').expect("label_values(sel, label)");
        let q = format!("count by ({}) ({})", label.trim(), substitute(sel.trim()));
        let v = prom.query(&q);
        assert_eq!(v["status"], "success", "variable {def}: {v}");
        let vals: Vec<String> = v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["metric"][label.trim()].as_str().map(String::from))
            .collect();
        assert!(!vals.is_empty(), "variable {def} has no values");
        if label.trim() == "tenant" {
            assert!(vals.contains(&"acme".to_string()), "{vals:?}");
        }
    }
    // The alert rules also evaluate cleanly on these series.
    let rules = loaded_rules(&prom);
    assert_eq!(rules.len(), ALERTS.len());
}
