//! `--export`: the audit trail, record by record, to where responders
//! already look: an OpenTelemetry collector (OTLP/HTTP logs), a file of
//! OCSF events for a SIEM shipper, or syslog (RFC 5424).
//!
//! The local hash chain stays the source of truth. Exporters only ever see
//! lines after the audit writer put them in the chain's file (a
//! [`crate::audit::writer::Tap`]), in chain order, and they never hold the
//! writer up: each exporter has a bounded queue that the writer's task
//! `try_send`s into; a full queue drops the records and counts them.
//! Delivery is at most once: a batch is retried with exponential backoff a
//! few times, then dropped and counted. Every drop is in
//! `agent_guard_export_dropped_total{exporter}` and, within a second (then
//! at most once a minute per chain and exporter), in the chain itself as a
//! `gap` record with `lost.export = N` and `exporter` naming the target.

pub mod ocsf;
pub mod otlp;
pub mod syslog;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::audit::{AuditRecord, format_ts, writer::Tap};

/// Records one exporter holds in memory at most (queued and in flight).
pub const QUEUE_RECORDS: u64 = 65_536;
/// Records per delivery (one OTLP request, one file write, ...).
pub const BATCH_RECORDS: usize = 512;
/// Tries of one batch before it is dropped.
pub const MAX_ATTEMPTS: u32 = 4;
/// Backoff between tries: doubles from the first to the last.
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long one delivery may take.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// After the first `gap` record of an exporter's losses in a chain, the
/// next one waits this long (losses in between are added up), so an
/// exporter that is down for a day does not flood the chain.
pub const GAP_EVERY: Duration = Duration::from_secs(60);
/// How long a stopping daemon gives exporters to deliver what is queued.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A bad `--export` value.
#[derive(Debug, Error)]
pub enum SpecError {
    #[error(
        "unknown export kind {0:?}: use otlp=http://HOST:4318, ocsf-file=/ABSOLUTE/PATH, syslog, syslog=udp://IP:PORT or syslog=unix:/PATH"
    )]
    UnknownKind(String),
    #[error("{kind} needs {what}, e.g. {example}")]
    Missing {
        kind: &'static str,
        what: &'static str,
        example: &'static str,
    },
    #[error("{spec:?}: {why}")]
    Bad { spec: String, why: String },
}

/// Where one exporter sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Otlp(otlp::Endpoint),
    OcsfFile(PathBuf),
    Syslog(syslog::Destination),
}

/// One `--export` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub target: Target,
    /// Canonical text of the target (`otlp=http://h:4318/v1/logs`): the
    /// `exporter` label, the gap record's `exporter`, `status`'s `target`.
    pub name: String,
}

impl std::fmt::Display for ExportSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Parses `KIND[=TARGET]` (clap's value parser for `--export`).
pub fn parse_spec(s: &str) -> Result<ExportSpec, SpecError> {
    let (kind, value) = match s.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (s, None),
    };
    let bad = |why: String| SpecError::Bad {
        spec: s.to_string(),
        why,
    };
    let target = match kind {
        "otlp" => {
            let url = value.filter(|v| !v.is_empty()).ok_or(SpecError::Missing {
                kind: "otlp",
                what: "the collector's OTLP/HTTP URL",
                example: "otlp=http://127.0.0.1:4318",
            })?;
            Target::Otlp(otlp::Endpoint::parse(url).map_err(bad)?)
        }
        "ocsf-file" => {
            let path = value.filter(|v| !v.is_empty()).ok_or(SpecError::Missing {
                kind: "ocsf-file",
                what: "a file path",
                example: "ocsf-file=/var/log/agent-guard/ocsf.jsonl",
            })?;
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(bad("the path must be absolute".into()));
            }
            if path.is_dir() {
                return Err(bad("is a directory; name a file in it".into()));
            }
            Target::OcsfFile(path)
        }
        "syslog" => Target::Syslog(syslog::Destination::parse(value).map_err(bad)?),
        other => return Err(SpecError::UnknownKind(other.to_string())),
    };
    let name = match &target {
        Target::Otlp(e) => format!("otlp={}", e.url()),
        Target::OcsfFile(p) => format!("ocsf-file={}", p.display()),
        Target::Syslog(d) => format!("syslog={d}"),
    };
    Ok(ExportSpec { target, name })
}

/// Why one delivery failed.
#[derive(Debug, Error)]
pub enum ExportError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(String),
    #[error("the collector answered HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status { status: u16, body: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sending to {dest}: {source}")]
    Socket {
        dest: String,
        #[source]
        source: std::io::Error,
    },
}

impl ExportError {
    /// Whether trying the same batch again may work. A collector that
    /// refuses the data itself (HTTP 400, 413, ...) will refuse it again.
    pub fn retryable(&self) -> bool {
        match self {
            ExportError::Status { status, .. } => matches!(status, 408 | 429 | 502 | 503 | 504),
            ExportError::Socket { source, .. } => {
                source.raw_os_error() != Some(nix::libc::EMSGSIZE)
            }
            _ => true,
        }
    }
}

/// One record as an exporter gets it: the chain it is in, its exact line
/// and the parsed record.
pub struct Exported<'a> {
    pub log: &'a str,
    pub line: &'a str,
    pub record: AuditRecord,
}

/// What `status` and the metrics show of one exporter, and the losses not
/// yet noted in the chains.
pub struct ExportStats {
    pub name: String,
    sent: AtomicU64,
    dropped: AtomicU64,
    queued: AtomicU64,
    last_error: Mutex<Option<(String, String)>>,
    losses: Mutex<Losses>,
    sent_metric: prometheus::IntCounter,
    dropped_metric: prometheus::IntCounter,
    queue_metric: prometheus::IntGauge,
}

#[derive(Default)]
struct Losses {
    /// Per chain: records lost since its last gap record.
    unreported: BTreeMap<String, u64>,
    /// Per chain: when its last gap record was written.
    last_gap: HashMap<String, Instant>,
}

impl ExportStats {
    fn new(name: &str, metrics: &crate::metrics::Metrics) -> Self {
        Self {
            name: name.to_string(),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            last_error: Mutex::new(None),
            losses: Mutex::new(Losses::default()),
            sent_metric: metrics.export_sent.with_label_values(&[name]),
            dropped_metric: metrics.export_dropped.with_label_values(&[name]),
            queue_metric: metrics.export_queue.with_label_values(&[name]),
        }
    }

    fn losses(&self) -> std::sync::MutexGuard<'_, Losses> {
        self.losses.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drop_records(&self, log: &str, n: u64) {
        if n == 0 {
            return;
        }
        self.dropped.fetch_add(n, Ordering::Relaxed);
        self.dropped_metric.inc_by(n);
        *self.losses().unreported.entry(log.to_string()).or_insert(0) += n;
    }

    fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
        self.sent_metric.inc_by(n);
    }

    fn queue_add(&self, n: u64) {
        let now = self.queued.fetch_add(n, Ordering::Relaxed) + n;
        self.queue_metric.set(now as i64);
    }

    fn queue_sub(&self, n: u64) {
        let before = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(n))
            })
            .unwrap_or(0);
        self.queue_metric.set(before.saturating_sub(n) as i64);
    }

    fn failed(&self, e: &ExportError) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((format_ts(time::OffsetDateTime::now_utc()), e.to_string()));
    }

    /// Losses due to be noted in their chains (`every` after the previous
    /// note of the same chain; the first one at once), taken out of the
    /// account.
    pub fn gaps_due(&self, every: Duration) -> Vec<(String, u64)> {
        let mut losses = self.losses();
        let Losses {
            unreported,
            last_gap,
        } = &mut *losses;
        let now = Instant::now();
        let due: Vec<String> = unreported
            .keys()
            .filter(|log| last_gap.get(*log).is_none_or(|t| now - *t >= every))
            .cloned()
            .collect();
        due.into_iter()
            .filter_map(|log| {
                let n = unreported.remove(&log)?;
                last_gap.insert(log.clone(), now);
                Some((log, n))
            })
            .collect()
    }

    /// The last delivery error, if any: (when, what).
    pub fn last_error(&self) -> Option<(String, String)> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `status --json`'s entry for this exporter.
    pub fn status(&self) -> serde_json::Value {
        let last = self.last_error();
        serde_json::json!({
            "target": self.name,
            "sent": self.sent.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
            "queue": self.queued.load(Ordering::Relaxed),
            "last_error": last.as_ref().map(|(_, e)| e.clone()),
            "last_error_at": last.map(|(at, _)| at),
        })
    }
}

/// A run of lines of one chain, shared by every exporter's queue.
#[derive(Clone)]
struct Chunk {
    log: Arc<str>,
    lines: Arc<Vec<u8>>,
    records: u64,
}

struct Queue {
    tx: mpsc::Sender<Chunk>,
    stats: Arc<ExportStats>,
}

/// The audit writer's tap: offers each written run of lines to every
/// exporter's queue without waiting.
pub struct Fanout {
    queues: Vec<Queue>,
}

impl Tap for Fanout {
    fn written(&mut self, log: &str, lines: Vec<u8>) {
        let records = lines
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64;
        if records == 0 {
            return;
        }
        let chunk = Chunk {
            log: Arc::from(log),
            lines: Arc::new(lines),
            records,
        };
        for q in &self.queues {
            if q.stats.queued.load(Ordering::Relaxed) + records > QUEUE_RECORDS {
                q.stats.drop_records(log, records);
                continue;
            }
            match q.tx.try_send(chunk.clone()) {
                Ok(()) => q.stats.queue_add(records),
                Err(_) => q.stats.drop_records(log, records),
            }
        }
    }
}

/// The running exporters.
pub struct Exporters {
    /// For `status`, metrics and the pipeline's gap records.
    pub stats: Vec<Arc<ExportStats>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Opens every exporter (an OCSF file that cannot be opened is an error
/// now, at startup) and starts its task. The returned [`Fanout`] goes to
/// the audit writer; when the writer is dropped the queues close, and
/// [`Exporters::finish`] lets the tasks deliver what is left.
pub fn start(
    specs: &[ExportSpec],
    metrics: &crate::metrics::Metrics,
) -> anyhow::Result<(Fanout, Exporters)> {
    let mut queues = Vec::new();
    let mut exporters = Exporters {
        stats: Vec::new(),
        tasks: Vec::new(),
    };
    let host = hostname();
    for spec in specs {
        let sink = match &spec.target {
            Target::Otlp(e) => Sink::Otlp(otlp::Client::new(e.clone(), &host)),
            Target::OcsfFile(p) => Sink::Ocsf(
                ocsf::FileSink::open(p, &host)
                    .map_err(|e| anyhow::anyhow!("--export {}: {e}", spec.name))?,
            ),
            Target::Syslog(d) => Sink::Syslog(syslog::Sender::new(d.clone(), &host)),
        };
        let stats = Arc::new(ExportStats::new(&spec.name, metrics));
        // Chunks are bounded by records (QUEUE_RECORDS) in `Fanout`; the
        // channel's own bound only caps the number of small chunks.
        let (tx, rx) = mpsc::channel(4096);
        exporters
            .tasks
            .push(tokio::spawn(run(sink, rx, stats.clone())));
        exporters.stats.push(stats.clone());
        queues.push(Queue { tx, stats });
        tracing::info!(exporter = %spec.name, "exporting audit records");
    }
    Ok((Fanout { queues }, exporters))
}

impl Exporters {
    /// Waits (up to [`SHUTDOWN_GRACE`]) for the exporters to deliver what
    /// is queued; the audit writer (and its [`Fanout`]) must be gone.
    pub async fn finish(self) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        for (task, stats) in self.tasks.into_iter().zip(&self.stats) {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
                let left = stats.queued.load(Ordering::Relaxed);
                if left > 0 {
                    stats.dropped.fetch_add(left, Ordering::Relaxed);
                    stats.dropped_metric.inc_by(left);
                    tracing::warn!(
                        exporter = %stats.name,
                        records = left,
                        "stopping: these records were not exported (they are in the audit trail)"
                    );
                }
            }
        }
    }
}

enum Sink {
    Otlp(otlp::Client),
    Ocsf(ocsf::FileSink),
    Syslog(syslog::Sender),
}

impl Sink {
    async fn send(&mut self, batch: &[Exported<'_>]) -> Result<(), ExportError> {
        let fut = async {
            match self {
                Sink::Otlp(c) => c.send(batch).await,
                Sink::Ocsf(f) => f.send(batch).await,
                Sink::Syslog(s) => s.send(batch).await,
            }
        };
        tokio::time::timeout(SEND_TIMEOUT, fut)
            .await
            .unwrap_or(Err(ExportError::Timeout(SEND_TIMEOUT)))
    }
}

/// One exporter: takes chunks off its queue, delivers them in batches of
/// at most [`BATCH_RECORDS`], retries with backoff, drops and counts what
/// cannot be delivered.
async fn run(mut sink: Sink, mut rx: mpsc::Receiver<Chunk>, stats: Arc<ExportStats>) {
    let mut backoff = MIN_BACKOFF;
    while let Some(first) = rx.recv().await {
        let mut taken = first.records;
        let mut chunks = vec![first];
        while taken < BATCH_RECORDS as u64 {
            match rx.try_recv() {
                Ok(c) => {
                    taken += c.records;
                    chunks.push(c);
                }
                Err(_) => break,
            }
        }
        let mut records = Vec::with_capacity(taken as usize);
        for chunk in &chunks {
            for line in chunk.lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let parsed = std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| Some((l, serde_json::from_str::<AuditRecord>(l).ok()?)));
                match parsed {
                    Some((line, record)) => records.push(Exported {
                        log: &chunk.log,
                        line,
                        record,
                    }),
                    None => {
                        // Our own writer's bytes: never expected.
                        tracing::warn!(exporter = %stats.name, log = %chunk.log, "export: an audit line did not parse; dropped");
                        stats.drop_records(&chunk.log, 1);
                    }
                }
            }
        }
        for batch in records.chunks(BATCH_RECORDS) {
            deliver(&mut sink, batch, &stats, &mut backoff).await;
        }
        stats.queue_sub(taken);
    }
}

async fn deliver(
    sink: &mut Sink,
    batch: &[Exported<'_>],
    stats: &ExportStats,
    backoff: &mut Duration,
) {
    let mut attempt = 1;
    loop {
        match sink.send(batch).await {
            Ok(()) => {
                stats.sent(batch.len() as u64);
                *backoff = MIN_BACKOFF;
                return;
            }
            Err(e) => {
                stats.failed(&e);
                if !e.retryable() || attempt >= MAX_ATTEMPTS {
                    tracing::warn!(
                        exporter = %stats.name,
                        records = batch.len(),
                        attempts = attempt,
                        "export failed: {e}; records dropped (they are in the audit trail; a gap record notes it)"
                    );
                    let mut per_log: BTreeMap<&str, u64> = BTreeMap::new();
                    for r in batch {
                        *per_log.entry(r.log).or_insert(0) += 1;
                    }
                    for (log, n) in per_log {
                        stats.drop_records(log, n);
                    }
                    return;
                }
                tracing::debug!(exporter = %stats.name, attempt, "export failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(*backoff).await;
                *backoff = (*backoff * 2).min(MAX_BACKOFF);
                attempt += 1;
            }
        }
    }
}

/// The gap record that notes `n` records of a chain lost to `exporter`.
pub fn gap_record(stats: &ExportStats, n: u64) -> AuditRecord {
    let mut gap = AuditRecord::new("gap");
    gap.lost = Some(BTreeMap::from([("export".to_string(), n)]));
    gap.exporter = Some(stats.name.clone());
    let why = stats
        .last_error()
        .map_or_else(|| "its queue was full".to_string(), |(_, e)| e);
    gap.detail = Some(format!(
        "{n} record{} of this chain not exported to {} (last error: {why}); the chain has them",
        if n == 1 { "" } else { "s" },
        stats.name
    ));
    gap
}

/// This node's host name (resource attribute, syslog HOSTNAME, OCSF device).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Nanoseconds since the epoch of a record's `ts`.
pub fn unix_nanos(ts: &str) -> Option<i128> {
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_values_parse_or_say_what_is_wrong() {
        let s = parse_spec("otlp=http://127.0.0.1:4318").expect("otlp");
        assert_eq!(s.name, "otlp=http://127.0.0.1:4318/v1/logs");
        let s = parse_spec("otlp=http://collector:4318/custom/logs").expect("otlp path");
        assert_eq!(s.name, "otlp=http://collector:4318/custom/logs");
        assert!(
            parse_spec("otlp=https://x:4318")
                .unwrap_err()
                .to_string()
                .contains("http://")
        );
        assert!(parse_spec("otlp=not a url").is_err());
        assert!(parse_spec("otlp").unwrap_err().to_string().contains("e.g."));
        let s = parse_spec("ocsf-file=/var/log/ag.jsonl").expect("ocsf");
        assert_eq!(s.target, Target::OcsfFile("/var/log/ag.jsonl".into()));
        assert!(
            parse_spec("ocsf-file=rel.jsonl")
                .unwrap_err()
                .to_string()
                .contains("absolute")
        );
        assert!(parse_spec("ocsf-file=").is_err());
        assert!(parse_spec("ocsf-file=/").is_err());
        assert_eq!(
            parse_spec("syslog").expect("syslog").name,
            "syslog=unix:/dev/log"
        );
        assert_eq!(
            parse_spec("syslog=udp://127.0.0.1:514").expect("udp").name,
            "syslog=udp://127.0.0.1:514"
        );
        assert_eq!(
            parse_spec("syslog=unix:/run/x.sock").expect("unix").name,
            "syslog=unix:/run/x.sock"
        );
        assert!(parse_spec("syslog=tcp://127.0.0.1:514").is_err());
        assert!(parse_spec("syslog=udp://localhost").is_err());
        let e = parse_spec("kafka=x").unwrap_err().to_string();
        assert!(
            e.contains("unknown export kind") && e.contains("ocsf-file="),
            "{e}"
        );
    }

    #[test]
    fn losses_are_noted_at_once_then_at_most_every_interval() {
        let m = crate::metrics::Metrics::new().expect("metrics");
        let s = ExportStats::new("syslog=unix:/dev/log", &m);
        s.drop_records("acme", 3);
        s.drop_records("_node", 1);
        let mut due = s.gaps_due(Duration::from_secs(60));
        due.sort();
        assert_eq!(due, vec![("_node".into(), 1), ("acme".into(), 3)]);
        s.drop_records("acme", 2);
        assert!(s.gaps_due(Duration::from_secs(60)).is_empty(), "too soon");
        assert_eq!(s.gaps_due(Duration::ZERO), vec![("acme".into(), 2)]);
        assert_eq!(s.status()["dropped"], 6);
        let gap = gap_record(&s, 2);
        assert_eq!(gap.kind, "gap");
        assert_eq!(gap.lost.as_ref().and_then(|l| l.get("export")), Some(&2));
        assert_eq!(gap.exporter.as_deref(), Some("syslog=unix:/dev/log"));
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let m = crate::metrics::Metrics::new().expect("metrics");
        let stats = Arc::new(ExportStats::new("t", &m));
        let (tx, mut rx) = mpsc::channel(1);
        let mut fan = Fanout {
            queues: vec![Queue {
                tx,
                stats: stats.clone(),
            }],
        };
        fan.written("acme", b"{\"a\":1}\n{\"a\":2}\n".to_vec());
        // The channel holds one chunk; the second is dropped, not awaited.
        fan.written("acme", b"{\"a\":3}\n".to_vec());
        assert_eq!(stats.status()["queue"], 2);
        assert_eq!(stats.status()["dropped"], 1);
        let c = rx.recv().await.expect("chunk");
        assert_eq!((c.records, &*c.log), (2, "acme"));
        assert!(
            m.render()
                .contains("agent_guard_export_dropped_total{exporter=\"t\"} 1")
        );
    }
}
