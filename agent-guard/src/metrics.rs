//! Prometheus metrics and the `/metrics` endpoint, with `/healthz` (200
//! while the daemon serves) and `/readyz` (200 once it enforces, see
//! [`Readiness`]) on the same listener.
//!
//! Label values come from policy names and fixed code tables only, never
//! from pids or addresses, so cardinality stays bounded; destinations that
//! match no tool are counted under `tool="none"`.

use std::net::SocketAddr;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub decisions: IntCounterVec,
    pub events: IntCounterVec,
    pub events_lost: IntCounterVec,
    pub tracked_processes: IntGaugeVec,
    pub active_grants: IntGaugeVec,
    pub approvals_pending: IntGaugeVec,
    pub approvals: IntCounterVec,
    pub map_entries: IntGaugeVec,
    pub map_capacity: IntGaugeVec,
    pub policy_reloads: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub audit_records: IntCounterVec,
    pub divergence: IntCounterVec,
    pub dns_queries: IntCounterVec,
    pub dns_cache: IntCounterVec,
    /// Decisions counted in the kernel (exact even when events are lost).
    pub kernel_decisions: IntGaugeVec,
    pub audit_write_errors: IntCounterVec,
    pub audit_dropped: IntCounterVec,
    pub audit_write_seconds: Histogram,
    pub event_delivery_seconds: Histogram,
    pub audit_buffered_records: IntGauge,
    pub export_sent: IntCounterVec,
    pub export_dropped: IntCounterVec,
    pub export_queue: IntGaugeVec,
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        let m = Self {
            decisions: counter(
                &r,
                "agent_guard_decisions_total",
                "Connect/sendmsg/socket decisions on tagged processes.",
                &["tenant", "agent", "tool", "verdict", "reason"],
            )?,
            events: counter(
                &r,
                "agent_guard_events_total",
                "Events received from the kernel, by kind.",
                &["kind"],
            )?,
            events_lost: counter(
                &r,
                "agent_guard_events_lost_total",
                "Events the kernel could not deliver (ring buffer full), by kind.",
                &["kind"],
            )?,
            tracked_processes: gauge(
                &r,
                "agent_guard_tracked_processes",
                "Tagged processes, by tenant.",
                &["tenant"],
            )?,
            active_grants: gauge(
                &r,
                "agent_guard_active_grants",
                "Active just-in-time grants, by tenant.",
                &["tenant"],
            )?,
            approvals_pending: gauge(
                &r,
                "agent_guard_approvals_pending",
                "Two-person approval requests waiting for a decision, by tenant.",
                &["tenant"],
            )?,
            approvals: counter(
                &r,
                "agent_guard_approvals_total",
                "Steps of two-person approval requests, by tenant and step (request, approve, deny, expire, granted).",
                &["tenant", "step"],
            )?,
            map_entries: gauge(
                &r,
                "agent_guard_map_entries",
                "Entries in each kernel map.",
                &["map"],
            )?,
            map_capacity: gauge(
                &r,
                "agent_guard_map_capacity",
                "Capacity of each kernel map.",
                &["map"],
            )?,
            policy_reloads: counter(
                &r,
                "agent_guard_policy_reloads_total",
                "Policy loads, by result (ok, error).",
                &["result"],
            )?,
            build_info: gauge(
                &r,
                "agent_guard_build_info",
                "Always 1; the version label says which build runs.",
                &["version"],
            )?,
            audit_records: counter(
                &r,
                "agent_guard_audit_records_total",
                "Audit records written, by log.",
                &["log"],
            )?,
            divergence: counter(
                &r,
                "agent_guard_divergence_total",
                "Calls of task-scoped processes outside their declared tools (intent-vs-action divergence).",
                &["tenant", "agent"],
            )?,
            dns_queries: counter(
                &r,
                "agent_guard_dns_queries_total",
                "Queries to the per-agent DNS proxy, by result: answered (addresses opened to that agent), refused (a name none of its current tools names) or failed (an allowed answer whose entries did not fit a full map: SERVFAIL, nothing opened). Upstream failures are in `status` (dns_proxy).",
                &["tenant", "agent", "result"],
            )?,
            dns_cache: counter(
                &r,
                "agent_guard_dns_cache_total",
                "Allowed per-agent DNS queries looked up in the proxy's answer cache, by result: hit (answered without asking upstream; still judged and opened per agent) or miss.",
                &["result"],
            )?,
            kernel_decisions: gauge(
                &r,
                "agent_guard_kernel_decisions",
                "Decisions counted by the kernel itself, by verdict: exact even when events were lost (a counter read from per-CPU maps).",
                &["verdict"],
            )?,
            audit_write_errors: counter(
                &r,
                "agent_guard_audit_write_errors_total",
                "Audit records that could not be written, by log.",
                &["log"],
            )?,
            audit_dropped: counter(
                &r,
                "agent_guard_audit_records_dropped_total",
                "Audit records lost because writing failed and the in-memory buffer was full, by log (each loss is also a gap record).",
                &["log"],
            )?,
            audit_write_seconds: histogram(
                &r,
                "agent_guard_audit_write_seconds",
                "Time to hash, append and flush a batch of audit records, per record.",
                &[
                    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2, 0.1,
                ],
            )?,
            event_delivery_seconds: histogram(
                &r,
                "agent_guard_event_delivery_seconds",
                "Lag from the kernel event's timestamp to its audit record written.",
                &[
                    1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ],
            )?,
            audit_buffered_records: {
                let g = IntGauge::new(
                    "agent_guard_audit_buffered_records",
                    "Audit records held in memory, not yet written (grows while writing fails).",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            export_sent: counter(
                &r,
                "agent_guard_export_sent_total",
                "Audit records delivered by each --export exporter.",
                &["exporter"],
            )?,
            export_dropped: counter(
                &r,
                "agent_guard_export_dropped_total",
                "Audit records an --export exporter did not deliver (queue full, or retries used up); each loss is also a gap record in the chain, where the records themselves are.",
                &["exporter"],
            )?,
            export_queue: gauge(
                &r,
                "agent_guard_export_queue",
                "Audit records waiting in an --export exporter's queue.",
                &["exporter"],
            )?,
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Series that alerts watch exist from the start at 0, so
        // `increase()` sees their first movement.
        for result in ["ok", "error"] {
            m.policy_reloads.with_label_values(&[result]).inc_by(0);
        }
        for k in 1..agent_guard_common::event::kind::COUNT as u8 {
            let name = agent_guard_common::event::kind::name(k);
            m.events_lost.with_label_values(&[name]).inc_by(0);
            m.events.with_label_values(&[name]).inc_by(0);
        }
        Ok(m)
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// What a scrape renders: the daemon refreshes its gauges from a snapshot
/// of its state and renders the registry. Metrics know nothing of the
/// daemon's state; the daemon hands them this.
pub type Scrape = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

/// Whether the daemon enforces: its programs are attached and its policy
/// applied (the moment it tells systemd READY=1). Cleared again when it
/// starts to stop. `/readyz` answers from it.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct Endpoints {
    scrape: Scrape,
    ready: Readiness,
}

async fn metrics_handler(State(e): State<Endpoints>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        (e.scrape)(),
    )
}

/// Liveness: the daemon's runtime answers at all.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: 200 while enforcing, 503 before (loading, applying the
/// policy, taking over) and while stopping.
async fn readyz(State(e): State<Endpoints>) -> impl IntoResponse {
    if e.ready.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Binds `addr` and returns the bound address and the server future.
pub async fn serve(
    addr: SocketAddr,
    scrape: Scrape,
    ready: Readiness,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Endpoints { scrape, ready });
    let fut = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await
    };
    Ok((bound, fut))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GET `path` over a plain TCP connection; returns the status code.
    async fn get_status(addr: SocketAddr, path: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {buf:?}"))
    }

    #[tokio::test]
    async fn healthz_always_readyz_only_when_ready() {
        let ready = Readiness::default();
        let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let scrape: Scrape = Arc::new(|| "m 1\n".to_string());
        let (addr, fut) = serve(
            "127.0.0.1:0".parse().unwrap(),
            scrape,
            ready.clone(),
            stop_rx,
        )
        .await
        .unwrap();
        tokio::spawn(fut);
        assert_eq!(get_status(addr, "/healthz").await, 200);
        assert_eq!(get_status(addr, "/readyz").await, 503);
        assert_eq!(get_status(addr, "/metrics").await, 200);
        ready.set(true);
        assert_eq!(get_status(addr, "/readyz").await, 200);
        ready.set(false);
        assert_eq!(get_status(addr, "/readyz").await, 503);
        assert_eq!(get_status(addr, "/nonesuch").await, 404);
    }
}
