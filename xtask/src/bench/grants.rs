//! `cargo xtask bench`, part 1: how long after `grant` / `revoke` returns
//! does the kernel enforce it (issue 4, goal < 1 ms)?
//!
//! The daemon writes the kernel maps before it replies, so enforcement should
//! come before the reply. This checks it from outside: one long-lived tagged
//! `agent-guard-probe watch-connect` connects to the `pay` listener in a loop
//! and records the CLOCK_MONOTONIC time of every verdict change, while the
//! bench sends `grant` and `revoke` requests for `pay` straight to the control
//! socket and records when each was sent and when its reply arrived (same
//! clock). Afterwards each request is matched with the first change to its
//! verdict after it was sent.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::common::{
    AGENT, Change, Guard, PAY_TOOL, ProbeLog, TENANT, control_request, daemon_status, events_lost,
    median, mono_ns, ns_to_us, percentile, picked, signed_diff, start_watch_probe,
    wait_for_foreign_daemons,
};
use crate::Built;

/// Goal: the kernel enforces a grant or revoke within 1 ms of the command
/// returning.
pub(crate) const TARGET_NS: i64 = 1_000_000;
/// How long each grant would last if it were not revoked.
const PAY_TTL_MS: u64 = 60_000;
/// Time the probe gets to start (tagging, exec) before the first request.
const PROBE_SETTLE: Duration = Duration::from_millis(300);
/// Probe run time beyond the rounds' planned length.
const PROBE_SLACK_MS: u64 = 3000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Grant,
    Revoke,
}

/// One control request as the bench saw it.
struct Request {
    op: Op,
    round: u32,
    sent_ns: u64,
    returned_ns: u64,
}

/// A request matched with the first change to its verdict.
struct Matched {
    /// First connect seen with the new verdict minus the reply's arrival
    /// (negative: enforced before the reply arrived).
    after_return_ns: i64,
    /// The same for the last connect that still saw the old verdict: the
    /// change happened between the two.
    previous_after_return_ns: i64,
}

/// For each request, the first change to its verdict at or after it was sent
/// and before the next request was sent (or the probe ended).
fn match_requests(
    requests: &[Request],
    changes: &[Change],
    probe_end: u64,
) -> Vec<Option<Matched>> {
    requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let until = requests.get(i + 1).map_or(probe_end, |n| n.sent_ns);
            let want_allow = r.op == Op::Grant;
            changes
                .iter()
                .find(|c| c.allow == want_allow && c.at_ns >= r.sent_ns && c.at_ns < until)
                .map(|c| Matched {
                    after_return_ns: signed_diff(c.at_ns, r.returned_ns),
                    previous_after_return_ns: signed_diff(c.previous_ns, r.returned_ns),
                })
        })
        .collect()
}

/// The measured figures for one operation (grant or revoke), in µs.
struct OpStats {
    requests: usize,
    rtt_median_us: f64,
    rtt_p99_us: f64,
    rtt_max_us: f64,
    seen: usize,
    after_return_median_us: f64,
    after_return_max_us: f64,
    /// Rounds whose first connect with the new verdict started before the
    /// reply arrived.
    before_reply: usize,
    /// Per seen change, the time between the last connect with the old
    /// verdict and the first with the new one: the resolution.
    bracket_median_us: f64,
    bracket_max_us: f64,
    /// Rounds where a connect entered after the reply arrived still saw the
    /// old verdict: enforcement provably lagged the reply.
    proven_late: usize,
    /// Largest such lag (lower bound), µs; 0 when none.
    proven_late_max_us: f64,
    per_round: Vec<Value>,
}

/// Whether the goal was shown to be met, shown to be missed, or neither
/// (a probe gap wider than the margin).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Verdict {
    Met,
    Missed,
    NotResolved,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::NotResolved => "not resolved",
        }
    }
}

impl OpStats {
    fn new(op: Op, requests: &[Request], matched: &[Option<Matched>]) -> Self {
        let (pairs, seen) = picked(requests, matched, |r| r.op == op);
        let rtt: Vec<f64> = pairs
            .iter()
            .map(|(r, _)| ns_to_us(signed_diff(r.returned_ns, r.sent_ns)))
            .collect();
        let after: Vec<f64> = seen.iter().map(|m| ns_to_us(m.after_return_ns)).collect();
        let bracket: Vec<f64> = seen
            .iter()
            .map(|m| ns_to_us(m.after_return_ns - m.previous_after_return_ns))
            .collect();
        let per_round = pairs
            .iter()
            .map(|(r, m)| {
                json!({
                    "round": r.round + 1,
                    "rtt_us": ns_to_us(signed_diff(r.returned_ns, r.sent_ns)),
                    "first_connect_after_return_us":
                        m.as_ref().map(|m| ns_to_us(m.after_return_ns)),
                    "last_old_connect_after_return_us":
                        m.as_ref().map(|m| ns_to_us(m.previous_after_return_ns)),
                })
            })
            .collect();
        Self {
            requests: pairs.len(),
            rtt_median_us: median(&rtt),
            rtt_p99_us: percentile(&rtt, 99.0),
            rtt_max_us: percentile(&rtt, 100.0),
            seen: seen.len(),
            after_return_median_us: median(&after),
            after_return_max_us: percentile(&after, 100.0),
            before_reply: seen.iter().filter(|m| m.after_return_ns < 0).count(),
            bracket_median_us: median(&bracket),
            bracket_max_us: percentile(&bracket, 100.0),
            proven_late: seen
                .iter()
                .filter(|m| m.previous_after_return_ns > 0)
                .count(),
            proven_late_max_us: seen
                .iter()
                .map(|m| ns_to_us(m.previous_after_return_ns))
                .fold(0.0, f64::max),
            per_round,
        }
    }

    /// Met: every change seen, each within the goal even at the upper bound
    /// (first connect with the new verdict). Missed: some round's lower
    /// bound (last connect with the old verdict) is past the goal, or a
    /// change was never seen. Otherwise the probe's gaps hide the answer.
    fn verdict(&self) -> Verdict {
        let target_us = TARGET_NS as f64 / 1000.0;
        if self.seen < self.requests || self.proven_late_max_us >= target_us {
            Verdict::Missed
        } else if self.after_return_max_us < target_us {
            Verdict::Met
        } else {
            Verdict::NotResolved
        }
    }

    fn json(&self) -> Value {
        json!({
            "requests": self.requests,
            "request_round_trip_us": {
                "median": self.rtt_median_us, "p99": self.rtt_p99_us, "max": self.rtt_max_us,
            },
            "changes_seen": self.seen,
            "first_connect_after_return_us": {
                "median": self.after_return_median_us, "max": self.after_return_max_us,
            },
            "first_connect_before_reply": self.before_reply,
            "resolution_us": { "median": self.bracket_median_us, "max": self.bracket_max_us },
            "old_verdict_after_reply": {
                "rounds": self.proven_late, "max_lag_lower_bound_us": self.proven_late_max_us,
            },
            "target_us": TARGET_NS as f64 / 1000.0,
            "goal": self.verdict().as_str(),
            "per_round": self.per_round,
        })
    }
}

/// The result of part 1.
pub(crate) struct GrantLatency {
    rounds: u32,
    spacing_ns: u64,
    grant: OpStats,
    revoke: OpStats,
    probe: ProbeLog,
    foreign_daemons: usize,
    events_lost: u64,
    decisions: Value,
    daemon_cpu: Option<Duration>,
}

/// Runs part 1 with a daemon of its own (started and stopped here).
pub(crate) fn measure(
    built: &Built,
    guard: &mut Guard,
    pay_port: u16,
    rounds: u32,
    spacing_ns: u64,
    gap: Duration,
) -> Result<GrantLatency> {
    let foreign_daemons = wait_for_foreign_daemons(&guard.socket);
    guard.start_daemon(&built.daemon)?;

    // One round is a grant, a gap, a revoke and a gap; give the probe room.
    let gap_ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX);
    let duration_ms = PROBE_SLACK_MS + u64::from(rounds) * (2 * gap_ms + 10);
    let watch = start_watch_probe(
        built,
        &guard.socket,
        &guard.dir,
        pay_port,
        duration_ms,
        spacing_ns,
    )?;
    let probe_end = watch.started + duration_ms * 1_000_000;
    std::thread::sleep(PROBE_SETTLE);

    let mut requests = Vec::new();
    for round in 0..rounds {
        // Stop early rather than run past the probe.
        if mono_ns() + 2 * (gap_ms + 50) * 1_000_000 > probe_end {
            eprintln!(
                "bench: warning: grant latency: the probe ends soon; stopping after {round} \
                 of {rounds} rounds"
            );
            break;
        }
        let sent_ns = mono_ns();
        let data = control_request(
            &guard.socket,
            &json!({
                "op": "grant", "tenant": TENANT, "agent": AGENT, "tool": PAY_TOOL,
                "ttl_ms": PAY_TTL_MS,
            }),
        )?;
        let returned_ns = mono_ns();
        let id = data["id"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .with_context(|| format!("the grant reply has no numeric id: {data}"))?;
        requests.push(Request {
            op: Op::Grant,
            round,
            sent_ns,
            returned_ns,
        });
        std::thread::sleep(gap);
        let sent_ns = mono_ns();
        control_request(&guard.socket, &json!({ "op": "revoke", "grant": id }))?;
        let returned_ns = mono_ns();
        requests.push(Request {
            op: Op::Revoke,
            round,
            sent_ns,
            returned_ns,
        });
        std::thread::sleep(gap);
    }

    let status = daemon_status(&built.daemon, &guard.socket)?;
    let daemon_cpu = guard.daemon_cpu();

    let log = watch.finish();
    guard.stop_daemon()?;
    // The watch loop filled the audit log; the connect rounds start afresh.
    if guard.audit_dir.exists() {
        std::fs::remove_dir_all(&guard.audit_dir)
            .with_context(|| format!("removing {}", guard.audit_dir.display()))?;
    }
    let log = log?;
    // Before the first grant the probe must have been refused, or the
    // grants did not change anything.
    match log.changes.first() {
        Some(c) if !c.allow => {}
        other => bail!(
            "sanity check failed: the tagged watch-connect probe should start denied (no `{PAY_TOOL}` \
             grant yet), but its first verdict was {other:?}"
        ),
    }
    let matched = match_requests(&requests, &log.changes, probe_end);
    let events_lost = events_lost(&status);
    Ok(GrantLatency {
        rounds: u32::try_from(requests.len() / 2).unwrap_or(u32::MAX),
        spacing_ns,
        grant: OpStats::new(Op::Grant, &requests, &matched),
        revoke: OpStats::new(Op::Revoke, &requests, &matched),
        probe: log,
        foreign_daemons,
        events_lost,
        decisions: status["decisions"].clone(),
        daemon_cpu,
    })
}

impl GrantLatency {
    fn period_us(&self) -> f64 {
        self.probe.elapsed_ns as f64 / self.probe.attempts.max(1) as f64 / 1000.0
    }

    pub(crate) fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\ngrant/revoke -> kernel enforcement, {} rounds; tagged probe connect loop: {} \
             attempts, mean period {:.1} us, longest gap {:.0} us{}",
            self.rounds,
            self.probe.attempts,
            self.period_us(),
            self.probe.max_gap_ns as f64 / 1000.0,
            if self.spacing_ns > 0 {
                format!(", spaced {} ns", self.spacing_ns)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "{:<7} {:>11} {:>11} {:>6} {:>13} {:>13} {:>7} {:>17} {:>14} {:>13}",
            "op",
            "rtt med",
            "rtt p99",
            "seen",
            "after ret med",
            "after ret max",
            "before",
            "resolution med/max",
            "old after rep",
            "goal <1ms"
        );
        for (name, st) in [("grant", &self.grant), ("revoke", &self.revoke)] {
            let _ = writeln!(
                s,
                "{:<7} {:>9.1}us {:>9.1}us {:>6} {:>11.1}us {:>11.1}us {:>7} {:>17} {:>14} {:>13}",
                name,
                st.rtt_median_us,
                st.rtt_p99_us,
                format!("{}/{}", st.seen, st.requests),
                st.after_return_median_us,
                st.after_return_max_us,
                format!("{}/{}", st.before_reply, st.seen),
                format!("{:.1}/{:.1}us", st.bracket_median_us, st.bracket_max_us),
                format!("{} ({:.1}us)", st.proven_late, st.proven_late_max_us),
                st.verdict().as_str()
            );
        }
        let _ = writeln!(
            s,
            "(after ret = first connect with the new verdict minus the reply's arrival, negative = \
             enforced first; before = rounds where that connect was entered before the reply \
             arrived; resolution = gap to the last connect with the old verdict; old after rep = \
             rounds (max lag) where a connect entered after the reply still saw the old verdict)"
        );
        if self.probe.errors > 0 {
            let _ = writeln!(
                s,
                "warning: {} probe connects failed otherwise: {}",
                self.probe.errors,
                self.probe.notes.join("; ")
            );
        }
        s
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "description": "time from a grant/revoke control request returning to the kernel \
                enforcing it, seen by one tagged probe connecting in a loop",
            "rounds": self.rounds,
            "probe": {
                "attempts": self.probe.attempts,
                "errors": self.probe.errors,
                "notes": self.probe.notes,
                "elapsed_ns": self.probe.elapsed_ns,
                "mean_period_us": self.period_us(),
                "max_gap_us": self.probe.max_gap_ns as f64 / 1000.0,
                "spacing_ns": self.spacing_ns,
                "verdict_changes": self.probe.changes.len(),
            },
            "grant": self.grant.json(),
            "revoke": self.revoke.json(),
            "other_agent_guard_daemons": self.foreign_daemons,
            "daemon": {
                "events_lost": self.events_lost,
                "decisions": self.decisions,
                "cpu_ms": self.daemon_cpu.map(|d| d.as_millis()),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_first_change_in_window() {
        let req = |op, sent_ns, returned_ns| Request {
            op,
            round: 0,
            sent_ns,
            returned_ns,
        };
        let requests = [
            req(Op::Grant, 1000, 1100),
            req(Op::Revoke, 2000, 2100),
            req(Op::Grant, 3000, 3100),
        ];
        let ch = |at_ns, previous_ns, allow| Change {
            at_ns,
            previous_ns,
            allow,
        };
        // Grant seen before its reply, revoke never seen (so the second
        // grant changes nothing either).
        let changes = [ch(10, 0, false), ch(1050, 1040, true)];
        let m = match_requests(&requests, &changes, 4000);
        assert_eq!(m[0].as_ref().map(|m| m.after_return_ns), Some(-50));
        assert_eq!(m[0].as_ref().map(|m| m.previous_after_return_ns), Some(-60));
        assert!(m[1].is_none());
        assert!(m[2].is_none());
    }
}
