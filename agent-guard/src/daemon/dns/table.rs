//! Tools named by DNS: the daemon resolves each `host` endpoint, installs
//! its addresses as capability entries, re-resolves before the answer's TTL
//! runs out, and removes addresses that left the answer after a grace
//! period (connections being set up to them are not cut mid-handshake).
//!
//! Every change goes through the same generation flip as a policy reload,
//! so an address is never briefly missing for a call both answers allow.
//!
//! Not done: per-subject resolution (allowing only addresses the agent
//! itself resolved). A name's addresses are reachable by every subject
//! whose tools list the name, including any other service that shares
//! those addresses (CDNs, shared load balancers).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

/// Bounds on how often a name is re-resolved.
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(300);
/// Retry delay after a failed lookup (the old answer stays meanwhile).
pub(super) const RETRY: Duration = Duration::from_secs(5);

/// The current answer for one name.
#[derive(Debug, Clone)]
pub struct NameState {
    pub current: BTreeSet<IpAddr>,
    /// Addresses that left the answer, kept until the deadline.
    pub leaving: BTreeMap<IpAddr, Instant>,
    pub next_refresh: Instant,
    pub last_error: Option<String>,
    /// When the name last resolved (errors keep the answer only so long).
    pub last_ok: Option<Instant>,
}

/// Every resolved name of the policy.
#[derive(Debug, Default, Clone)]
pub struct DnsTable {
    pub names: BTreeMap<String, NameState>,
}

impl DnsTable {
    /// Addresses to install for `name`: the answer plus those in grace.
    pub fn addresses(&self, name: &str) -> Vec<IpAddr> {
        self.names
            .get(name)
            .map(|n| {
                n.current
                    .iter()
                    .chain(n.leaving.keys())
                    .copied()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Follows the policy: new names are due now, dropped names go.
    pub fn set_names(&mut self, names: BTreeSet<String>, now: Instant) {
        self.names.retain(|n, _| names.contains(n));
        for n in names {
            self.names.entry(n).or_insert_with(|| NameState {
                current: BTreeSet::new(),
                leaving: BTreeMap::new(),
                next_refresh: now,
                last_error: None,
                last_ok: None,
            });
        }
    }

    pub fn due(&self, now: Instant) -> Vec<String> {
        self.names
            .iter()
            .filter(|(_, s)| s.next_refresh <= now)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Applies an answer; returns a description when the installed set
    /// changed.
    pub fn update(
        &mut self,
        name: &str,
        answer: BTreeSet<IpAddr>,
        ttl: Duration,
        grace: Duration,
        now: Instant,
    ) -> Option<String> {
        let state = self.names.get_mut(name)?;
        let before: BTreeSet<IpAddr> = state
            .current
            .iter()
            .chain(state.leaving.keys())
            .copied()
            .collect();
        for gone in state.current.difference(&answer) {
            state.leaving.insert(*gone, now + grace);
        }
        for back in &answer {
            state.leaving.remove(back);
        }
        state.current = answer;
        state.last_ok = Some(now);
        // Refresh at 80% of the TTL, within bounds.
        state.next_refresh = now + (ttl.mul_f64(0.8)).clamp(MIN_REFRESH, MAX_REFRESH);
        state.last_error = None;
        let after: BTreeSet<IpAddr> = state
            .current
            .iter()
            .chain(state.leaving.keys())
            .copied()
            .collect();
        describe(name, &before, &after)
    }

    /// A lookup failed (timeout, SERVFAIL). The previous answer is kept
    /// for `grace` after the last success, then the name counts as not
    /// resolving: its addresses leave (fail closed). Returns a description
    /// when that changed the installed set.
    pub fn failed(
        &mut self,
        name: &str,
        error: String,
        grace: Duration,
        now: Instant,
    ) -> Option<String> {
        let stale = {
            let s = self.names.get_mut(name)?;
            s.last_error = Some(error.clone());
            s.next_refresh = now + RETRY;
            s.last_ok.is_none_or(|t| now.duration_since(t) >= grace)
        };
        if !stale {
            return None;
        }
        let change = self.update(name, BTreeSet::new(), RETRY, grace, now);
        if let Some(s) = self.names.get_mut(name) {
            // Keep reporting the error; the empty answer was not a success.
            s.last_error = Some(error);
        }
        change
    }

    /// Drops addresses whose grace ran out; returns a description if any.
    pub fn expire(&mut self, now: Instant) -> Option<String> {
        let mut changes = Vec::new();
        for (name, s) in &mut self.names {
            let gone: Vec<IpAddr> = s
                .leaving
                .iter()
                .filter(|(_, d)| **d <= now)
                .map(|(a, _)| *a)
                .collect();
            for a in &gone {
                s.leaving.remove(a);
            }
            if !gone.is_empty() {
                changes.push(format!("{name} -{}", join(&gone)));
            }
        }
        (!changes.is_empty()).then(|| changes.join("; "))
    }

    pub fn status(&self) -> serde_json::Value {
        self.names
            .iter()
            .map(|(n, s)| {
                (
                    n.clone(),
                    serde_json::json!({
                        "addresses": s.current.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                        "leaving": s.leaving.keys().map(|a| a.to_string()).collect::<Vec<_>>(),
                        "error": s.last_error,
                    }),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

fn join(a: &[IpAddr]) -> String {
    a.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn describe(name: &str, before: &BTreeSet<IpAddr>, after: &BTreeSet<IpAddr>) -> Option<String> {
    let added: Vec<IpAddr> = after.difference(before).copied().collect();
    let removed: Vec<IpAddr> = before.difference(after).copied().collect();
    if added.is_empty() && removed.is_empty() {
        return None;
    }
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!("+{}", join(&added)));
    }
    if !removed.is_empty() {
        parts.push(format!("-{}", join(&removed)));
    }
    Some(format!("{name} {}", parts.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(a: &[&str]) -> BTreeSet<IpAddr> {
        a.iter().map(|s| s.parse().expect("ip")).collect()
    }

    #[test]
    fn an_address_that_leaves_the_answer_stays_for_the_grace_period() {
        let t0 = Instant::now();
        let mut t = DnsTable::default();
        t.set_names(["a.example".to_string()].into(), t0);
        let grace = Duration::from_secs(10);
        assert!(
            t.update(
                "a.example",
                ips(&["10.0.0.1"]),
                Duration::from_secs(60),
                grace,
                t0
            )
            .is_some()
        );
        assert_eq!(
            t.addresses("a.example"),
            vec!["10.0.0.1".parse::<IpAddr>().expect("ip")]
        );
        let c = t.update(
            "a.example",
            ips(&["10.0.0.2"]),
            Duration::from_secs(60),
            grace,
            t0,
        );
        assert_eq!(c.as_deref(), Some("a.example +10.0.0.2"));
        assert_eq!(t.addresses("a.example").len(), 2, "old address in grace");
        assert!(t.expire(t0 + Duration::from_secs(5)).is_none());
        assert_eq!(t.expire(t0 + grace).as_deref(), Some("a.example -10.0.0.1"));
        assert_eq!(t.addresses("a.example").len(), 1);
    }

    #[test]
    fn a_name_whose_server_keeps_failing_loses_its_addresses_after_grace() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let mut t = DnsTable::default();
        t.set_names(["a.example".to_string()].into(), t0);
        t.update(
            "a.example",
            ips(&["10.0.0.1"]),
            Duration::from_secs(60),
            grace,
            t0,
        );
        assert!(
            t.failed(
                "a.example",
                "timeout".into(),
                grace,
                t0 + Duration::from_secs(5)
            )
            .is_none()
        );
        assert_eq!(t.addresses("a.example").len(), 1, "kept within grace");
        let late = t0 + Duration::from_secs(11);
        assert!(
            t.failed("a.example", "timeout".into(), grace, late)
                .is_none(),
            "leaving, still installed"
        );
        assert_eq!(
            t.expire(late + grace).as_deref(),
            Some("a.example -10.0.0.1")
        );
        assert!(t.addresses("a.example").is_empty(), "fail closed");
    }

    #[test]
    fn refresh_follows_the_ttl_within_bounds() {
        let t0 = Instant::now();
        let mut t = DnsTable::default();
        t.set_names(["a.example".to_string()].into(), t0);
        assert_eq!(t.due(t0), vec!["a.example".to_string()]);
        t.update(
            "a.example",
            ips(&["10.0.0.1"]),
            Duration::from_secs(100),
            Duration::ZERO,
            t0,
        );
        assert!(t.due(t0 + Duration::from_secs(79)).is_empty());
        assert_eq!(t.due(t0 + Duration::from_secs(80)).len(), 1);
        t.update(
            "a.example",
            ips(&["10.0.0.1"]),
            Duration::ZERO,
            Duration::ZERO,
            t0,
        );
        assert_eq!(t.due(t0 + MIN_REFRESH).len(), 1);
        // Dropping the name from the policy forgets it.
        t.set_names(BTreeSet::new(), t0);
        assert!(t.addresses("a.example").is_empty());
    }
}
