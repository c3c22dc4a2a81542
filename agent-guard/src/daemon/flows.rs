//! `--flow-records`: allowed calls of tagged processes are counted per flow
//! in the kernel (`FLOWS`, see kernel/flows.rs) and become one audit record
//! per flow and `--flow-interval`, with `calls`, `first_ts` and `last_ts`.
//! Denied and would-deny calls stay one record per call.
//!
//! The event pipeline collects the table on its own timer and writes the
//! flows through the same enrichment and writer as ring records, so a flow
//! record lands in its tenant's chain when it is collected (after per-call
//! records of the same interval that were already drained). At shutdown
//! flow mode is turned off first (later calls go to the ring) and every
//! flow is written; a daemon that was killed leaves its flows pinned, and
//! its successor counts them in the takeover's `gap` record.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use agent_guard_common::event::{Event, verdict};
use prometheus::{IntCounter, IntGauge, Opts, Registry};

use crate::kernel::flows::{Flow, FlowError, FlowTable, grace_period};

/// Flow mode as the daemon runs it.
pub struct Flows {
    /// How often the table is collected.
    pub interval: Duration,
    table: Mutex<FlowTable>,
    /// Flow records written and the calls they carry.
    records: AtomicU64,
    calls: AtomicU64,
    /// Flows in the table when it was last collected.
    last_entries: AtomicU64,
    metrics: FlowMetrics,
}

struct FlowMetrics {
    records: IntCounter,
    calls: IntCounter,
    fallbacks: IntCounter,
    entries: IntGauge,
}

impl FlowMetrics {
    fn new(r: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::with_opts(Opts::new(name, help))?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let entries = IntGauge::with_opts(Opts::new(
            "agent_guard_flow_entries",
            "Flows in the kernel flow table at its last collection (--flow-records).",
        ))?;
        r.register(Box::new(entries.clone()))?;
        Ok(Self {
            records: counter(
                "agent_guard_flow_records_total",
                "Flow audit records written (--flow-records): one per flow and interval.",
            )?,
            calls: counter(
                "agent_guard_flow_calls_total",
                "Allowed calls carried by flow audit records (--flow-records).",
            )?,
            fallbacks: counter(
                "agent_guard_flow_fallback_total",
                "Allowed calls recorded one by one in flow mode because the kernel flow table was full (size it with --map-capacity FLOWS=N).",
            )?,
            entries,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error(transparent)]
    Kernel(#[from] FlowError),
    #[error("registering flow metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl Flows {
    /// Turns flow mode on in the kernel. Fails (and flow mode stays off)
    /// when this kernel cannot give the grace period collection needs.
    pub fn start(
        mut table: FlowTable,
        interval: Duration,
        registry: &Registry,
    ) -> Result<Self, FlowsError> {
        grace_period()?;
        let metrics = FlowMetrics::new(registry)?;
        table.set_enabled(true)?;
        Ok(Self {
            interval,
            table: Mutex::new(table),
            records: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            last_entries: AtomicU64::new(0),
            metrics,
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, FlowTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The flows of the interval that just ended. `last`: turn flow mode
    /// off first and take every flow (shutdown). An error is logged and
    /// the flows stay in the table for the next try.
    pub fn collect(&self, last: bool) -> Vec<Flow> {
        let mut table = self.table();
        let entries = table.entries() as u64;
        let got = if last {
            table.collect_all()
        } else {
            table.collect()
        };
        let fallbacks = table.fallbacks();
        drop(table);
        self.last_entries.store(entries, Ordering::Relaxed);
        self.metrics.entries.set(entries as i64);
        let seen = self.metrics.fallbacks.get();
        self.metrics
            .fallbacks
            .inc_by(fallbacks.saturating_sub(seen));
        match got {
            Ok(flows) => flows,
            Err(e) => {
                tracing::error!("collecting flow records: {e}; trying again next interval");
                Vec::new()
            }
        }
    }

    /// Counts a written flow record of `calls` calls.
    pub fn written(&self, calls: u64) {
        self.records.fetch_add(1, Ordering::Relaxed);
        self.calls.fetch_add(calls, Ordering::Relaxed);
        self.metrics.records.inc();
        self.metrics.calls.inc_by(calls);
    }

    /// What `status --json` shows under `flow_records`.
    pub fn status(&self) -> serde_json::Value {
        let table = self.table();
        serde_json::json!({
            "enabled": table.enabled(),
            "interval_ms": self.interval.as_millis() as u64,
            "interval": humantime::format_duration(self.interval).to_string(),
            "records_flushed": self.records.load(Ordering::Relaxed),
            "calls_flushed": self.calls.load(Ordering::Relaxed),
            "table_entries": table.entries(),
            "table_entries_at_last_flush": self.last_entries.load(Ordering::Relaxed),
            "table_capacity": crate::kernel::maps::capacity_of(agent_guard_common::maps::FLOWS),
            "fallbacks_table_full": table.fallbacks(),
        })
    }
}

/// The per-call record a flow stands for (its first call), for the
/// pipeline's enrichment.
pub fn event(flow: &Flow) -> Event {
    let k = &flow.key;
    let mut ev = Event::zeroed();
    ev.ts_ns = flow.first_ns;
    ev.cgroup_id = flow.cgroup_id;
    ev.kind = k.kind;
    ev.verdict = verdict::ALLOW;
    ev.reason = k.reason;
    ev.proto = k.proto;
    ev.family = k.family;
    ev.port = k.port;
    ev.subject = k.subject;
    ev.pid = k.tgid;
    ev.tid = k.tgid;
    ev.uid = flow.uid;
    ev.tool_id = k.tool_id;
    ev.grant_id = k.grant_id;
    ev.addr = k.addr;
    ev
}
