//! The resolver side of `host` endpoints (`--dns-mode shared`): keeps every
//! name of the policy fresh in the [`DnsTable`](super::table::DnsTable) and
//! rebuilds the capability image when an answer changes.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_resolver::{
    Resolver, TokioResolver,
    config::{NameServerConfigGroup, ResolverConfig},
    name_server::TokioConnectionProvider,
};
use tokio::sync::watch;

use super::table::RETRY;
use crate::daemon::state::State;

/// A resolver for `server`, else the system configuration (resolv.conf).
/// Caching is off: the daemon keeps answers and their TTLs itself.
pub fn resolver(server: Option<SocketAddr>) -> anyhow::Result<TokioResolver> {
    let mut builder = match server {
        Some(addr) => {
            let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            Resolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], group),
                TokioConnectionProvider::default(),
            )
        }
        None => Resolver::builder_tokio()?,
    };
    builder.options_mut().cache_size = 0;
    Ok(builder.build())
}

/// Keeps every name fresh until shutdown.
pub async fn run(
    state: Arc<State>,
    resolver: TokioResolver,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = Instant::now();
        let due = state.registry().dns.due(now);
        let mut changes = Vec::new();
        for name in due {
            let fqdn = if name.ends_with('.') {
                name.clone()
            } else {
                format!("{name}.")
            };
            match resolver.lookup_ip(fqdn.as_str()).await {
                Ok(lookup) => {
                    let answer: BTreeSet<IpAddr> = lookup.iter().collect();
                    let ttl = lookup
                        .valid_until()
                        .saturating_duration_since(Instant::now());
                    if let Some(c) =
                        state
                            .registry()
                            .dns
                            .update(&name, answer, ttl, grace, Instant::now())
                    {
                        changes.push(c);
                    }
                }
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                    // The name has no addresses now: they leave after grace.
                    if let Some(c) = state.registry().dns.update(
                        &name,
                        BTreeSet::new(),
                        RETRY,
                        grace,
                        Instant::now(),
                    ) {
                        changes.push(c);
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        name,
                        "resolving tool host: {e}; keeping the previous answer for the grace period"
                    );
                    if let Some(c) =
                        state
                            .registry()
                            .dns
                            .failed(&name, e.to_string(), grace, Instant::now())
                    {
                        changes.push(c);
                    }
                }
            }
        }
        if let Some(c) = state.registry().dns.expire(Instant::now()) {
            changes.push(c);
        }
        if !changes.is_empty() {
            let detail = changes.join("; ");
            tracing::info!("tool addresses changed: {detail}");
            if let Err(e) = state.rebuild(&format!("dns: {detail}")) {
                tracing::error!("installing resolved addresses: {e:#}");
            }
        }
    }
}
