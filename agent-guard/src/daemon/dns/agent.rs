//! Per-agent DNS (`--dns-mode per-agent`): the glue between the proxy
//! (proxy.rs), the kernel redirect (decide.rs, dns.rs in the eBPF
//! crate) and the capability image.
//!
//! Every DNS call (port 53) of a tagged process is sent by the kernel to
//! its subject's own proxy address, so the daemon knows whose query it is.
//! A name is answered only when one of the subject's current tools (base
//! set or grants) has it as a `host` endpoint; the answer's addresses are
//! then installed for that subject alone, before the reply reaches it,
//! and leave again when the answer's TTL plus `--dns-grace` has passed.
//! Names no tool names get REFUSED and never leave the node, which also
//! closes DNS as a channel for data. Each query is an audit record (`kind`
//! `dns`) and counted in `agent_guard_dns_queries_total`.
//!
//! The proxy caches upstream answers for all subjects (`--dns-cache-entries`,
//! hits and misses in `agent_guard_dns_cache_total`), but a cached answer
//! goes through [`DnsGate::may_resolve`] and [`DnsGate::learned`] below
//! like a fresh one: the cache saves the upstream round trip, never the
//! decision or this subject's kernel entries.
//!
//! When an answer needs a capability entry that does not fit (`CAPS` is
//! full, or a grant's entries in `GRANTS`), nothing of it is opened: the
//! entries written for it are taken out again, the agent gets SERVFAIL (the
//! server could not serve this answer; REFUSED would say the name is not
//! the agent's, which is not true), the audit record (`kind` `dns`, reason
//! `map_full`) names the map and `--map-capacity`, and what earlier answers
//! opened stays open.
//!
//! Left as it is: an address shared by many names (CDN, load balancer) is
//! reachable for all of them once one allowed name resolved to it.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::proxy::{DnsGate, DnsProxy, ProxyConfig};
use crate::audit::AuditRecord;
use crate::daemon::state::{Registry, State};
use crate::daemon::subjects::Identity;

/// Why an answer could not be opened to the subject that asked (the proxy
/// then replies SERVFAIL).
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("{name} is no longer a tool of subject {subject}")]
    NotItsTool { name: String, subject: u32 },
    /// A capability entry did not fit; nothing of the answer was opened.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    /// A grant reaching the subject could not take the new addresses.
    #[error("{0}")]
    Grant(String),
}

/// Bounds on how long one answer keeps an address open.
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(3600);

/// The proxy's view of the daemon; weak, so the proxy (owned by the state)
/// does not keep the state alive.
struct Gate {
    state: Weak<State>,
}

impl DnsGate for Gate {
    /// A name of the subject's tools; in monitor mode any name (the answer
    /// is then recorded as `would_deny` and opens nothing, like a call).
    fn may_resolve(&self, subject: u32, name: &str) -> bool {
        self.state.upgrade().is_some_and(|s| {
            let reg = s.registry();
            !s.dns_tools(&reg, subject, name).is_empty() || monitored(&reg, subject)
        })
    }

    fn learned(&self, subject: u32, name: &str, answers: &[(IpAddr, u32)]) -> Result<(), String> {
        let state = self.state.upgrade().ok_or("daemon is shutting down")?;
        state
            .dns_learned(subject, name, answers)
            .map_err(|e| e.to_string())
    }

    fn refused(&self, subject: u32, name: &str, qtype: &str) {
        if let Some(state) = self.state.upgrade() {
            state.dns_query_record(subject, name, Vec::new(), Some(qtype), "");
        }
    }

    fn cache_lookup(&self, _subject: u32, hit: bool) {
        if let Some(state) = self.state.upgrade() {
            cache_counter(&state, hit).inc();
        }
    }
}

fn cache_counter(state: &State, hit: bool) -> prometheus::IntCounter {
    state
        .metrics
        .dns_cache
        .with_label_values(&[if hit { "hit" } else { "miss" }])
}

/// Starts the proxy (one address per active subject, an answer cache of
/// `cache_entries`, 0 for none) and turns the kernel redirect on with the
/// next `CONFIG` write.
pub fn start(
    state: &Arc<State>,
    upstream: Option<std::net::SocketAddr>,
    port: u16,
    cache_entries: u64,
) -> anyhow::Result<()> {
    let upstreams = match upstream {
        Some(u) => vec![u],
        None => {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            super::proxy::upstreams_from_resolv_conf(&text)
        }
    };
    if upstreams.is_empty() {
        anyhow::bail!(
            "per-agent DNS needs an upstream resolver: none in /etc/resolv.conf; pass --dns-server IP:PORT"
        );
    }
    // Something bound to 0.0.0.0:PORT (a node-local DNS cache) would make
    // every subject's bind fail later, one log line at a time: say so now.
    let probe = std::net::SocketAddr::from((std::net::Ipv4Addr::new(127, 64, 0, 0), port));
    std::net::UdpSocket::bind(probe)
        .and_then(|_| std::net::TcpListener::bind(probe))
        .map_err(|e| {
            anyhow::anyhow!(
                "per-agent DNS cannot bind its proxy port {port} on 127.64.0.0/10 ({e}); is something bound to 0.0.0.0:{port}? pick another with --dns-proxy-port"
            )
        })?;
    let proxy = DnsProxy::new(
        ProxyConfig {
            port,
            upstreams,
            timeout: super::proxy::DEFAULT_TIMEOUT,
            cache_entries,
        },
        Arc::new(Gate {
            state: Arc::downgrade(state),
        }),
    );
    if state.dns_proxy.set(proxy).is_err() {
        anyhow::bail!("the DNS proxy was started twice");
    }
    if cache_entries > 0 {
        // Both series from the start, so the hit ratio is defined at once.
        for hit in [true, false] {
            cache_counter(state, hit);
        }
    }
    state.registry().dns_per_agent = true;
    state.kernel().set_dns_proxy_port(port);
    Ok(())
}

/// Drops learned addresses whose time ran out, once a second.
pub async fn sweep(state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => state.sweep_learned(),
            _ = shutdown.changed() => return,
        }
    }
}

/// Is the subject in monitor mode (allow, but record what would be refused)?
fn monitored(reg: &Registry, subject: u32) -> bool {
    reg.identities
        .get(&subject)
        .is_some_and(|i| i.mode == crate::policy::Mode::Monitor)
}

fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl State {
    /// Tools in `subject`'s current set with a `host` endpoint for `name`.
    fn dns_tools(&self, reg: &Registry, subject: u32, name: &str) -> Vec<String> {
        let Some(loaded) = reg.loaded.as_ref() else {
            return Vec::new();
        };
        if !reg.identities.get(&subject).is_some_and(|i| i.active) {
            return Vec::new();
        }
        let name = normalise(name);
        let current = reg.current_tools(subject);
        loaded
            .compiled
            .tools
            .iter()
            .zip(&loaded.compiled.tool_hosts)
            .filter(|(tool, hosts)| {
                current.contains(*tool) && hosts.iter().any(|h| normalise(&h.name) == name)
            })
            .map(|(tool, _)| tool.clone())
            .collect()
    }

    /// An answer the proxy is about to give `subject`: open its addresses
    /// to that subject (base set and grants) before the reply goes out.
    pub fn dns_learned(
        &self,
        subject: u32,
        name: &str,
        answers: &[(IpAddr, u32)],
    ) -> Result<(), LearnError> {
        let now = Instant::now();
        let tools = {
            let mut reg = self.registry();
            let tools = self.dns_tools(&reg, subject, name);
            if tools.is_empty() {
                if monitored(&reg, subject) {
                    drop(reg);
                    self.dns_query_record(subject, name, Vec::new(), Some("A/AAAA"), "");
                    return Ok(());
                }
                // The policy changed between the question and the answer.
                return Err(LearnError::NotItsTool {
                    name: name.to_string(),
                    subject,
                });
            }
            let entry = reg
                .learned
                .entry(subject)
                .or_default()
                .entry(normalise(name))
                .or_default();
            let mut opened = Vec::new();
            for (addr, ttl) in answers {
                let ttl = Duration::from_secs(u64::from(*ttl)).clamp(MIN_TTL, MAX_TTL);
                let until = now + ttl + self.dns_grace;
                match entry.get_mut(addr) {
                    Some(e) => *e = (*e).max(until),
                    None => {
                        entry.insert(*addr, until);
                        opened.push(*addr);
                    }
                }
            }
            (tools, opened)
        };
        let (tools, opened) = tools;
        // A repeated answer only moves the deadline (kept here, swept by
        // the daemon); the kernel entries change only for new addresses.
        if !opened.is_empty()
            && let Err(e) = self.refresh_subject_dns(subject)
        {
            self.forget_learned(subject, name, &opened);
            self.dns_failed_record(subject, name, &e);
            return Err(e);
        }
        let addrs = answers.iter().map(|(a, _)| a.to_string()).collect();
        self.dns_query_record(subject, name, addrs, None, &tools.join(","));
        Ok(())
    }

    /// One audit record per proxied query; refused when `addrs` is empty
    /// and `qtype` says what was asked.
    fn dns_query_record(
        &self,
        subject: u32,
        name: &str,
        addrs: Vec<String>,
        qtype: Option<&str>,
        tools: &str,
    ) {
        let Some(ident) = self.identity(subject) else {
            return;
        };
        let refused = qtype.is_some();
        let mut rec = dns_record(&ident, name);
        if refused && ident.mode == crate::policy::Mode::Monitor {
            rec.verdict = Some("would_deny".into());
            rec.reason = Some("dns_refused".into());
            rec.detail = Some(format!(
                "{} query answered (monitor mode) though no current tool names it; nothing opened",
                qtype.unwrap_or("?")
            ));
        } else if refused {
            rec.verdict = Some("deny".into());
            rec.reason = Some("dns_refused".into());
            // A task scope or sub-agent asking for a name outside its
            // declared tools diverges from its intent like a refused call
            // (counted, and on_divergence may act).
            if self.divergence(subject) {
                rec.divergence = Some(true);
            }
            rec.detail = Some(format!(
                "{} query refused: no current tool names it",
                qtype.unwrap_or("?")
            ));
        } else {
            rec.verdict = Some("allow".into());
            rec.reason = Some("granted".into());
            rec.tool = Some(tools.to_string());
            rec.detail = Some(format!("answered {}", addrs.join(" ")));
        }
        self.metrics
            .dns_queries
            .with_label_values(&[
                ident.tenant.as_str(),
                ident.agent.as_str(),
                if refused { "refused" } else { "answered" },
            ])
            .inc();
        // One per query: batched, so a query does not wake the pipeline.
        self.audit_batched(&ident.tenant, rec);
    }

    /// Takes back the addresses an answer added to `learned` whose
    /// entries could not be written, and puts the subject's entries back
    /// to what they were (grants included).
    fn forget_learned(&self, subject: u32, name: &str, addrs: &[IpAddr]) {
        {
            let mut reg = self.registry();
            if let Some(names) = reg.learned.get_mut(&subject) {
                if let Some(known) = names.get_mut(&normalise(name)) {
                    for a in addrs {
                        known.remove(a);
                    }
                }
                names.retain(|_, a| !a.is_empty());
            }
            reg.learned.retain(|_, names| !names.is_empty());
        }
        if let Err(e) = self.refresh_subject_dns(subject) {
            tracing::warn!(subject, "restoring DNS entries after a failed answer: {e}");
        }
    }

    /// The audit record of an allowed name whose answer could not be
    /// opened (the agent got SERVFAIL).
    fn dns_failed_record(&self, subject: u32, name: &str, error: &LearnError) {
        let Some(ident) = self.identity(subject) else {
            return;
        };
        let mut rec = dns_record(&ident, name);
        rec.verdict = Some("deny".into());
        rec.reason = Some(
            match error {
                LearnError::Kernel(crate::kernel::KernelError::MapFull { .. }) => "map_full",
                _ => "dns_not_opened",
            }
            .into(),
        );
        rec.detail = Some(format!(
            "answer not opened, the agent got SERVFAIL: {error}"
        ));
        self.metrics
            .dns_queries
            .with_label_values(&[ident.tenant.as_str(), ident.agent.as_str(), "failed"])
            .inc();
        self.audit(&ident.tenant, rec);
    }

    /// Rewrites `subject`'s base entries (current generation) and the
    /// entries of grants reaching it from the current learned addresses:
    /// new keys first, then stale ones removed. When a new key does not
    /// fit, the ones written before it are removed again: the subject
    /// keeps exactly its old entries.
    pub fn refresh_subject_dns(&self, subject: u32) -> Result<(), LearnError> {
        let grants: Vec<u32> = {
            let mut reg = self.registry();
            let Some(generation) = reg.loaded.as_ref().map(|l| l.generation) else {
                return Ok(());
            };
            if !reg.identities.get(&subject).is_some_and(|i| i.active) {
                return Ok(());
            }
            let caps = reg.caps_for(subject, generation);
            let old = reg.caps.get(&subject).cloned().unwrap_or_default();
            {
                let mut kernel = self.kernel();
                let mut written = Vec::new();
                for (rule, value) in &caps {
                    if !old.contains(rule) {
                        if let Err(e) = kernel.insert_cap(rule, *value) {
                            for r in &written {
                                kernel.remove_cap(r);
                            }
                            return Err(e.into());
                        }
                        written.push(*rule);
                    }
                }
                for rule in &old {
                    if !caps.iter().any(|(r, _)| r == rule) {
                        kernel.remove_cap(rule);
                    }
                }
            }
            reg.caps
                .insert(subject, caps.into_iter().map(|(r, _)| r).collect());
            let grants = reg.grants.values();
            grants
                .filter(|g| reg.grant_reaches(g, subject))
                .map(|g| g.id)
                .collect()
        };
        for g in grants {
            self.reinstall_grant(g).map_err(LearnError::Grant)?;
        }
        Ok(())
    }

    /// Forgets learned addresses whose time ran out and closes them.
    pub fn sweep_learned(&self) {
        let now = Instant::now();
        let subjects: Vec<u32> = {
            let mut reg = self.registry();
            let mut touched = Vec::new();
            let active: BTreeSet<u32> = reg
                .identities
                .values()
                .filter(|i| i.active)
                .map(|i| i.subject_id)
                .collect();
            reg.learned.retain(|s, _| active.contains(s));
            for (subject, names) in reg.learned.iter_mut() {
                let before: usize = names.values().map(|a| a.len()).sum();
                for addrs in names.values_mut() {
                    addrs.retain(|_, until| *until > now);
                }
                names.retain(|_, a| !a.is_empty());
                if names.values().map(|a| a.len()).sum::<usize>() != before {
                    touched.push(*subject);
                }
            }
            reg.learned.retain(|_, names| !names.is_empty());
            touched
        };
        for s in subjects {
            if let Err(e) = self.refresh_subject_dns(s) {
                tracing::warn!(subject = s, "closing expired DNS answers: {e}");
            }
        }
    }

    /// Serves exactly the active subjects: a new subject gets its proxy
    /// address before its launcher execs, a retired one loses it.
    pub fn sync_dns_proxy(&self) {
        let Some(proxy) = self.dns_proxy.get() else {
            return;
        };
        let active: BTreeSet<u32> = self
            .registry()
            .identities
            .values()
            .filter(|i| i.active)
            .map(|i| i.subject_id)
            .collect();
        let served: BTreeSet<u32> = proxy.subjects().into_iter().collect();
        for s in served.difference(&active) {
            proxy.remove_subject(*s);
        }
        for s in active.difference(&served) {
            if let Err(e) = proxy.add_subject_now(*s) {
                // The agent's DNS then fails (nothing answers): closed.
                tracing::error!(subject = s, "DNS proxy address: {e}");
            }
        }
    }
}

/// The audit record (`kind` `dns`) of a query for `name` by `ident`: who
/// asked and for what; the verdict is the caller's to fill in.
fn dns_record(ident: &Identity, name: &str) -> AuditRecord {
    let mut rec = AuditRecord::new("dns");
    rec.tenant = Some(ident.tenant.clone());
    rec.agent = Some(ident.agent.clone());
    rec.subject = Some(ident.chain.clone());
    rec.task = ident.task.as_ref().map(|t| t.text.clone());
    rec.task_id = ident.task.as_ref().map(|t| t.id.clone());
    rec.dst = Some(normalise(name));
    rec.proto = Some("dns".into());
    rec
}
