//! The event pipeline: ring buffer -> enrichment -> audit writer + metrics.
//!
//! One task owns the ring buffer and the audit writer, so records of a
//! tenant are written in the order the kernel produced them and `seq` has
//! no holes. Other parts of the daemon send records through a channel.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, Ipv6Addr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use agent_guard_common::{
    event::{AF_INET, EXEC_PATH_LEN, Event, ExecEvent, UnixEvent, kind, reason, verdict},
    unix::AF_UNIX,
};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::Interest,
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use super::state::{PipelineMsg, State, ppid_of};
use crate::audit::{AuditRecord, AuditWriter, NODE_LOG, format_ts, writer::Appended};

/// IP protocol number of TCP.
const IPPROTO_TCP: u8 = 6;
/// Records taken from the ring buffer between two flushes.
const DRAIN_BATCH: usize = 8192;
/// How often the daemon drains the ring buffer without a kernel wakeup.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(20);
/// How often lost-event counters become gap records and stale pids are swept.
const HOUSEKEEPING_EVERY: u32 = 50;
/// Processes remembered for enrichment (exe, ppid) from exec/fork events:
/// a backstop, since entries go when their process's exit record comes.
const PROC_CACHE: usize = 65_536;

/// What the kernel told us about a process, so records need no racy /proc
/// reads.
#[derive(Default, Clone)]
struct ProcInfo {
    ppid: Option<u32>,
    exe: Option<String>,
    /// From its exec or fork record (decision records carry none).
    comm: Option<String>,
}

/// pid -> what its exec/fork records said. An entry goes with its exit
/// record; the tids its fork records named (threads get fork records too,
/// but only a whole process gets an exit record) go with their process's
/// exit unless they still run (a child process, whose own exit comes). What
/// no exit record removes (a lost record, threads of a process that lives
/// on) ages out oldest first beyond [`PROC_CACHE`].
#[derive(Default)]
struct ProcCache {
    /// pid -> (info, insertion number).
    map: HashMap<u32, (ProcInfo, u64)>,
    /// (pid, insertion number), oldest first; numbers no longer in `map`
    /// are stale and skipped.
    order: VecDeque<(u32, u64)>,
    inserted: u64,
    /// pid -> the tids its fork records named, while it lives.
    forked: HashMap<u32, Vec<u32>>,
    cap: usize,
}

impl ProcCache {
    fn with_capacity(cap: usize) -> Self {
        Self {
            cap,
            ..Self::default()
        }
    }

    fn entry(&mut self, pid: u32) -> &mut ProcInfo {
        if !self.map.contains_key(&pid) {
            while self.map.len() >= self.cap.max(1) {
                let Some((old, n)) = self.order.pop_front() else {
                    break;
                };
                if self.map.get(&old).is_some_and(|(_, m)| *m == n) {
                    self.map.remove(&old);
                    self.forked.remove(&old);
                }
            }
            // Stale numbers of removed pids must not pile up either.
            if self.order.len() >= self.cap.max(1).saturating_mul(2) {
                let map = &self.map;
                self.order
                    .retain(|(p, n)| map.get(p).is_some_and(|(_, m)| m == n));
            }
            self.inserted += 1;
            self.order.push_back((pid, self.inserted));
            self.map.insert(pid, (ProcInfo::default(), self.inserted));
        }
        &mut self.map.entry(pid).or_default().0
    }

    fn get(&self, pid: u32) -> Option<&ProcInfo> {
        self.map.get(&pid).map(|(info, _)| info)
    }

    /// A fork record of `parent` named `child` (a process or a thread).
    fn forked(&mut self, parent: u32, child: u32) {
        if child == parent {
            return;
        }
        // The parent gets an entry, so its list ages out with it.
        self.entry(parent);
        let map = &self.map;
        let tids = self.forked.entry(parent).or_default();
        // A long-lived parent whose threads come and go: keep only the
        // tids still remembered as its own.
        if tids.len() >= 64 && tids.len().is_power_of_two() {
            tids.retain(|t| map.get(t).is_some_and(|(i, _)| i.ppid == Some(parent)));
        }
        tids.push(child);
    }

    /// The exit record of process `pid` was written: forget it, and the
    /// tids it forked that no longer run (`alive` asks the system).
    fn exited(&mut self, pid: u32, alive: impl Fn(u32) -> bool) {
        let ppid = self.map.remove(&pid).and_then(|(info, _)| info.ppid);
        if let Some(siblings) = ppid.and_then(|pp| self.forked.get_mut(&pp)) {
            siblings.retain(|&t| t != pid);
        }
        for tid in self.forked.remove(&pid).unwrap_or_default() {
            let ours = self.get(tid).is_some_and(|i| i.ppid == Some(pid));
            if ours && !alive(tid) {
                self.map.remove(&tid);
                self.forked.remove(&tid);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn address(ev: &Event) -> IpAddr {
    let v6 = Ipv6Addr::from(ev.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) if ev.family == AF_INET || v6.to_ipv4_mapped().is_some() => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    }
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        0 => "ip".into(),
        other => other.to_string(),
    }
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Converts kernel monotonic ns into wall-clock RFC 3339 with nanoseconds.
pub(super) fn wall_clock(mono_ns: u64) -> String {
    let now_mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
        .unwrap_or(mono_ns as i128);
    let now_wall = time::OffsetDateTime::now_utc();
    let at = if mono_ns == 0 {
        now_wall
    } else {
        now_wall - time::Duration::nanoseconds((now_mono - mono_ns as i128) as i64)
    };
    format_ts(at)
}

pub struct Pipeline {
    state: Arc<State>,
    ring: AsyncFd<RingBuf<MapData>>,
    rx: mpsc::UnboundedReceiver<PipelineMsg>,
    writer: AuditWriter,
    procs: ProcCache,
    lost_seen: [u64; kind::COUNT as usize],
    /// Kernel timestamps (monotonic ns) of records appended since the last
    /// flush, for the delivery-lag histogram.
    delivered: Vec<u64>,
    /// Records appended since the last flush, and the time spent on them.
    batch_records: u64,
    batch_time: Duration,
    /// Per-record lookups cached between housekeeping ticks (identities,
    /// tool names and metric children only change with policy, launches
    /// and retirements; a second of staleness only affects enrichment).
    cache: Cache,
    /// Waiting for the next drain of the ring (see `PipelineMsg::Sync`).
    syncs: Vec<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Default)]
struct Cache {
    identities: HashMap<u32, Arc<super::subjects::Identity>>,
    tools: HashMap<u32, Option<String>>,
    decisions: HashMap<(u32, u32, u8, u8), prometheus::IntCounter>,
    events: HashMap<u8, prometheus::IntCounter>,
    /// Unix path id -> path as audit records show it (ids are never reused).
    unix_paths: HashMap<u32, String>,
}

impl Pipeline {
    pub fn new(
        state: Arc<State>,
        ring: RingBuf<MapData>,
        rx: mpsc::UnboundedReceiver<PipelineMsg>,
        writer: AuditWriter,
    ) -> std::io::Result<Self> {
        Ok(Self {
            state,
            // SAFETY: the ring buffer owns its map fd, which stays open
            // until the AsyncFd (and the RingBuf inside it) is dropped.
            ring: unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?,
            rx,
            writer,
            procs: ProcCache::with_capacity(PROC_CACHE),
            lost_seen: [0; kind::COUNT as usize],
            delivered: Vec::new(),
            batch_records: 0,
            batch_time: Duration::ZERO,
            cache: Cache::default(),
            syncs: Vec::new(),
        })
    }

    /// Runs until `shutdown` flips, then drains what is left and returns.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(DRAIN_INTERVAL);
        let mut ticks = 0u32;
        let flows = self.state.flows.as_ref().map(|f| f.interval);
        let mut flow_tick = tokio::time::interval(flows.unwrap_or(Duration::from_secs(3600)));
        loop {
            tokio::select! {
                ready = self.ring.readable_mut() => {
                    match ready {
                        Ok(mut guard) => {
                            guard.clear_ready();
                        }
                        Err(e) => tracing::error!("ring buffer poll: {e}"),
                    }
                    self.drain_ring();
                }
                _ = tick.tick() => {
                    self.drain_ring();
                    ticks += 1;
                    if ticks.is_multiple_of(HOUSEKEEPING_EVERY) {
                        self.account_lost();
                        self.account_export_losses(crate::export::GAP_EVERY);
                        self.cache = Cache::default();
                        self.state.expire_grants();
                        self.state.expire_approvals();
                        let retired = self.state.retire_idle_subjects(self.state.idle_subject_age);
                        if retired > 0 {
                            tracing::debug!(retired, "retired idle task and sub-agent subjects");
                        }
                        let swept = self.state.sweep_stale();
                        if swept > 0 {
                            tracing::debug!(swept, "removed entries of exited processes");
                        }
                        let adopted = self.state.adopt_cgroups();
                        if adopted > 0 {
                            tracing::info!(adopted, "cgroups adopted by cgroup_glob");
                        }
                        // Expiries, retirements, new approval requests.
                        self.state.save_registry();
                    }
                }
                Some(msg) = self.rx.recv() => {
                    self.message(msg);
                    if !self.syncs.is_empty() {
                        self.drain_ring();
                    }
                }
                _ = flow_tick.tick(), if flows.is_some() => self.write_flows(false),
                _ = shutdown.changed() => break,
            }
            self.flush();
        }
        // Flow mode off and every flow written first: calls made meanwhile
        // went to the ring, drained next.
        self.write_flows(true);
        self.drain_ring();
        self.account_lost();
        // Losses so far, whatever the interval: the chains close now.
        self.account_export_losses(Duration::ZERO);
        while let Ok(msg) = self.rx.try_recv() {
            self.message(msg);
        }
        for (log, rec) in self.state.take_batched() {
            self.write(&log, rec);
        }
        let failures = self.writer.close();
        for f in &failures {
            tracing::error!(
                "audit sync at shutdown of {}: {}; {} records still unwritten",
                f.log,
                f.error,
                self.writer.buffered_records()
            );
        }
        self.account_failures(&failures);
    }

    /// Writes what was appended (retrying what earlier failed), fsyncs when
    /// the interval has passed, and records write and delivery latency.
    fn flush(&mut self) {
        let started = std::time::Instant::now();
        let failures = if self.writer.sync_due() {
            self.writer.sync()
        } else {
            self.writer.flush()
        };
        let metrics = &self.state.metrics;
        if failures.is_empty() && self.batch_records > 0 {
            let per_record =
                (self.batch_time + started.elapsed()).as_secs_f64() / self.batch_records as f64;
            metrics.audit_write_seconds.observe(per_record);
            let now = monotonic_ns();
            for ts in self.delivered.drain(..) {
                metrics
                    .event_delivery_seconds
                    .observe(now.saturating_sub(ts) as f64 / 1e9);
            }
            self.batch_records = 0;
            self.batch_time = Duration::ZERO;
        }
        self.account_failures(&failures);
    }

    fn account_failures(&mut self, failures: &[crate::audit::writer::FlushFailure]) {
        let metrics = &self.state.metrics;
        for f in failures {
            metrics
                .audit_write_errors
                .with_label_values(&[&f.log])
                .inc();
        }
        metrics
            .audit_buffered_records
            .set(self.writer.buffered_records() as i64);
        // While writing fails, keep the lag samples bounded.
        if self.delivered.len() > 100_000 {
            self.delivered.clear();
        }
    }

    fn message(&mut self, msg: PipelineMsg) {
        match msg {
            PipelineMsg::Audit(log, rec) => self.write(&log, *rec),
            PipelineMsg::Launched { pid, ppid } => self.procs.entry(pid).ppid = ppid,
            PipelineMsg::Sync(tx) => self.syncs.push(tx),
        }
    }

    fn drain_ring(&mut self) {
        // Messages sent before these kernel records (a launch registered
        // before its exec) are applied first.
        while let Ok(msg) = self.rx.try_recv() {
            self.message(msg);
        }
        // In bounded batches, each flushed before the next is taken: a
        // deep ring (a flood, a large --ring-bytes) must not pile up more
        // records in memory than the writer's buffer is meant to hold.
        let mut batch: Vec<Vec<u8>> = Vec::with_capacity(DRAIN_BATCH);
        loop {
            {
                let ring = self.ring.get_mut();
                while batch.len() < DRAIN_BATCH {
                    let Some(item) = ring.next() else { break };
                    batch.push(item.to_vec());
                }
            }
            if batch.is_empty() {
                break;
            }
            let full = batch.len() == DRAIN_BATCH;
            for bytes in batch.drain(..) {
                self.handle(&bytes);
            }
            if !full {
                break;
            }
            self.flush();
        }
        // The proxy's records after the kernel's: a query's redirected
        // send is in the ring before the proxy answered it.
        let batched = self.state.take_batched();
        if !batched.is_empty() {
            for (log, rec) in batched {
                self.write(&log, rec);
            }
            self.flush();
        }
        // Whoever asked for this drain may look now.
        for tx in self.syncs.drain(..) {
            let _ = tx.send(());
        }
    }

    /// Writes the flows of the interval that just ended (`last`: every
    /// flow, flow mode off; at shutdown).
    fn write_flows(&mut self, last: bool) {
        let state = self.state.clone();
        let Some(flows) = state.flows.as_ref() else {
            return;
        };
        // A grace period is a few ms of waiting in the kernel.
        let collected = tokio::task::block_in_place(|| flows.collect(last));
        for flow in &collected {
            let ev = super::flows::event(flow);
            // SAFETY: Event is #[repr(C)] plain data without implicit
            // padding; the slice lives no longer than `ev`.
            let bytes = unsafe {
                std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<Event>())
            };
            self.handle_calls(bytes, Some(flow));
            flows.written(flow.calls);
        }
    }

    fn handle(&mut self, bytes: &[u8]) {
        self.handle_calls(bytes, None);
    }

    /// One ring record, or (`flow`) the record of a flow of allowed calls.
    fn handle_calls(&mut self, bytes: &[u8], flow: Option<&crate::kernel::flows::Flow>) {
        // A full event, or a decision record without the comm.
        let Some(ev) = Event::from_record(bytes) else {
            tracing::warn!(len = bytes.len(), "short record from the kernel");
            return;
        };
        let kind_name = kind::name(ev.kind);
        let metrics = &self.state.metrics;
        self.cache
            .events
            .entry(ev.kind)
            .or_insert_with(|| metrics.events.with_label_values(&[kind_name]))
            .inc_by(flow.map_or(1, |f| f.calls));

        match ev.kind {
            kind::FORK => {
                self.procs.forked(ev.pid, ev.aux);
                let child = self.procs.entry(ev.aux);
                child.ppid = Some(ev.pid);
                // The fork record is the parent's: the child starts with its comm.
                child.comm = Some(c_str(&ev.comm));
                let parent_exe = self.procs.get(ev.pid).and_then(|p| p.exe.clone());
                if let Some(exe) = parent_exe {
                    self.procs.entry(ev.aux).exe = Some(exe);
                }
            }
            kind::EXEC if bytes.len() >= size_of::<ExecEvent>() => {
                // SAFETY: length checked; ExecEvent is plain data.
                let exec: ExecEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                let path = c_str(&exec.path[..EXEC_PATH_LEN]);
                let p = self.procs.entry(ev.pid);
                p.exe = Some(path);
                p.comm = Some(c_str(&ev.comm));
            }
            _ => {}
        }

        let ident = match self.cache.identities.get(&ev.subject) {
            Some(i) => Some(i.clone()),
            None => {
                let i = self.state.identity(ev.subject);
                if let Some(known) = &i {
                    self.cache.identities.insert(ev.subject, known.clone());
                }
                i
            }
        };
        let ident = ident.unwrap_or_else(|| {
            // Never dropped: recorded in the node log under a placeholder.
            tracing::warn!(
                subject = ev.subject,
                kind = kind_name,
                "record for an unknown subject"
            );
            Arc::new(super::subjects::Identity::unknown(ev.subject))
        });
        let log = if ident.tenant.is_empty() {
            NODE_LOG.to_string()
        } else {
            ident.tenant.clone()
        };
        let mut rec = AuditRecord::new(kind_name);
        rec.ts = wall_clock(ev.ts_ns);
        if let Some(f) = flow {
            rec.calls = Some(f.calls);
            rec.first_ts = Some(rec.ts.clone());
            rec.last_ts = Some(wall_clock(f.last_ns));
        }
        rec.tenant = Some(ident.tenant.clone());
        rec.agent = Some(ident.agent.clone());
        rec.subject = Some(ident.chain.clone());
        rec.task = ident.task.as_ref().map(|t| t.text.clone());
        rec.task_id = ident.task.as_ref().map(|t| t.id.clone());
        rec.on_behalf_of = ident
            .principal
            .as_ref()
            .and_then(|p| p.on_behalf_of.clone());
        rec.jti = ident.principal.as_ref().map(|p| p.jti.clone());
        rec.pid = Some(ev.pid);
        if ev.tid != ev.pid {
            rec.tid = Some(ev.tid);
        }
        let info = self.procs.get(ev.pid).cloned().unwrap_or_default();
        rec.ppid = info.ppid.or_else(|| ppid_of(ev.pid));
        rec.uid = Some(ev.uid);
        rec.comm = if ev.comm[0] != 0 {
            Some(c_str(&ev.comm))
        } else {
            // A decision record: the comm its exec/fork record gave, else
            // the process's own while it lives.
            info.comm.clone().or_else(|| {
                std::fs::read_to_string(format!("/proc/{}/comm", ev.pid))
                    .ok()
                    .map(|c| c.trim_end().to_string())
            })
        };
        rec.exe = info.exe;
        rec.cgroup = Some(ev.cgroup_id);
        match ev.kind {
            kind::CONNECT | kind::SENDMSG if ev.family == AF_UNIX => {
                // The path the caller named, as the kernel compared it: in
                // the record, or (a path of the policy) known by its id.
                let path = if bytes.len() >= size_of::<UnixEvent>() {
                    // SAFETY: length checked; UnixEvent is plain data.
                    let u: UnixEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                    let n = (ev.aux as usize).min(u.path.len());
                    crate::policy::unix_display(&u.path[..n])
                } else {
                    let id = agent_guard_common::unix::path_id(&ev.addr);
                    let state = &self.state;
                    self.cache
                        .unix_paths
                        .entry(id)
                        .or_insert_with(|| {
                            state.unix_path(id).map_or_else(
                                || format!("unix path #{id} (unknown to this daemon)"),
                                |p| crate::policy::unix_display(&p),
                            )
                        })
                        .clone()
                };
                rec.dst = Some(path);
                rec.proto = Some("unix".to_string());
                self.decision(&mut rec, &ev, &ident);
            }
            kind::CONNECT | kind::SENDMSG => {
                rec.dst = Some(address(&ev).to_string());
                rec.port = Some(ev.port);
                rec.proto = Some(proto_name(ev.proto));
                self.decision(&mut rec, &ev, &ident);
                // whois answers for TCP connections only (sock_diag finds
                // them by 4-tuple): other sockets would only fill the table.
                if ev.cookie != 0
                    && ev.verdict == verdict::ALLOW
                    && ev.kind == kind::CONNECT
                    && ev.proto == IPPROTO_TCP
                {
                    self.state
                        .sockets
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .record(
                            ev.cookie,
                            super::whois::SocketOwner {
                                subject_id: ev.subject,
                                pid: ev.pid,
                                tool_id: ev.tool_id,
                                grant: ev.grant_id,
                                at_ns: ev.ts_ns,
                            },
                        );
                }
            }
            kind::SOCKET => {
                rec.proto = Some(proto_name(ev.proto));
                rec.detail = Some(format!("socket type {} family {}", ev.aux, ev.family));
                self.decision(&mut rec, &ev, &ident);
            }
            kind::FORK => rec.child = Some(ev.aux),
            _ => {}
        }
        if ev.ts_ns != 0 && flow.is_none() {
            self.delivered.push(ev.ts_ns);
        }
        self.write(&log, rec);
        if ev.kind == kind::EXIT {
            // No record of this process follows its exit record.
            self.procs
                .exited(ev.pid, |tid| Path::new(&format!("/proc/{tid}")).exists());
        }
    }

    fn decision(&mut self, rec: &mut AuditRecord, ev: &Event, ident: &super::subjects::Identity) {
        let v = verdict::name(ev.verdict);
        let r = reason::name(ev.reason);
        let state = &self.state;
        let tool = if ev.tool_id != 0 {
            self.cache
                .tools
                .entry(ev.tool_id)
                .or_insert_with(|| state.tool_name(ev.tool_id))
                .clone()
        } else {
            None
        };
        rec.verdict = Some(v.to_string());
        rec.reason = Some(r.to_string());
        if ev.grant_id != 0 {
            rec.grant = Some(ev.grant_id.to_string());
        }
        // Calling outside the declared tools is divergence for a scoped
        // process (task or sub-agent); the state decides and may act.
        let scoped = ident.requested_tools.is_some() || ident.task.is_some();
        if scoped
            && ev.verdict != verdict::ALLOW
            && ev.reason == reason::NO_CAPABILITY
            && ev.kind != kind::SOCKET
            && self.state.divergence(ev.subject)
        {
            rec.divergence = Some(true);
        }
        let metrics = &self.state.metrics;
        self.cache
            .decisions
            .entry((ev.subject, ev.tool_id, ev.verdict, ev.reason))
            .or_insert_with(|| {
                metrics.decisions.with_label_values(&[
                    &ident.tenant,
                    &ident.agent,
                    tool.as_deref().unwrap_or("none"),
                    v,
                    r,
                ])
            })
            .inc_by(rec.calls.unwrap_or(1));
        // A refused call to a two-person tool opens (or counts on) an
        // approval request; its id goes on the record.
        if ev.verdict == verdict::DENY
            && ev.reason == reason::APPROVAL_REQUIRED
            && let Some(t) = tool.as_deref()
        {
            let endpoint = match (&rec.dst, rec.port) {
                (Some(d), Some(p)) => format!("{d}:{p}"),
                (Some(d), None) => d.clone(),
                _ => "?".into(),
            };
            rec.approval = self
                .state
                .approval_needed(&super::approvals::RefusedCall {
                    ident,
                    tool: t,
                    endpoint,
                    pid: ev.pid,
                    uid: Some(ev.uid),
                })
                .map(|id| id.to_string());
        }
        rec.tool = tool;
    }

    fn write(&mut self, log: &str, mut rec: AuditRecord) {
        if rec.ts.is_empty() {
            rec.ts = format_ts(time::OffsetDateTime::now_utc());
        }
        let started = std::time::Instant::now();
        let appended = self.writer.append(log, rec);
        self.batch_time += started.elapsed();
        self.batch_records += 1;
        match appended {
            Ok(Appended::Queued(_)) => self
                .state
                .metrics
                .audit_records
                .with_label_values(&[log])
                .inc(),
            Ok(Appended::Dropped) => self
                .state
                .metrics
                .audit_dropped
                .with_label_values(&[log])
                .inc(),
            Err(e) => {
                self.state
                    .metrics
                    .audit_write_errors
                    .with_label_values(&[log])
                    .inc();
                tracing::error!("audit write to {log}: {e}");
            }
        }
    }

    /// Notes records an exporter lost in the chains they belong to, as
    /// `gap` records (`lost.export`, `exporter`); at most one per chain and
    /// exporter per `every` after the first.
    fn account_export_losses(&mut self, every: Duration) {
        let state = self.state.clone();
        for stats in &state.exports {
            for (log, n) in stats.gaps_due(every) {
                self.write(&log, crate::export::gap_record(stats, n));
            }
        }
    }

    /// Turns growth of the kernel's lost counters into `gap` records in
    /// every tenant's log (the kernel cannot say whose events were lost).
    fn account_lost(&mut self) {
        let lost = self.state.kernel().lost();
        let mut gap = BTreeMap::new();
        for (k, (now, seen)) in lost.iter().zip(self.lost_seen).enumerate().skip(1) {
            let delta = now.saturating_sub(seen);
            if delta > 0 {
                let name = kind::name(k as u8);
                self.state
                    .metrics
                    .events_lost
                    .with_label_values(&[name])
                    .inc_by(delta);
                gap.insert(name.to_string(), delta);
            }
        }
        self.lost_seen = lost;
        if gap.is_empty() {
            return;
        }
        tracing::warn!(?gap, "the kernel dropped events: ring buffer full");
        let mut logs: Vec<String> = self.state.tenants();
        logs.push(NODE_LOG.to_string());
        for log in logs {
            let mut rec = AuditRecord::new("gap");
            rec.lost = Some(gap.clone());
            rec.detail = Some("ring buffer full: the kernel could not deliver these events".into());
            self.write(&log, rec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ProcCache;
    use agent_guard_common::event::{DECISION_LEN, Event};

    #[test]
    fn decision_records_read_as_events_without_a_comm() {
        let mut full = Event::zeroed();
        full.pid = 42;
        full.port = 443;
        full.addr[15] = 7;
        full.comm = *b"agent\0\0\0\0\0\0\0\0\0\0\0";
        // SAFETY: Event is #[repr(C)] plain data without implicit padding.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const full).cast::<u8>(), size_of::<Event>())
        };
        let whole = Event::from_record(bytes).expect("a full event");
        assert_eq!((whole.pid, whole.port, whole.comm), (42, 443, full.comm));
        let slim = Event::from_record(&bytes[..DECISION_LEN]).expect("a decision record");
        assert_eq!((slim.pid, slim.port, slim.addr), (42, 443, full.addr));
        assert_eq!(slim.comm, [0; 16], "the missing comm reads as zeros");
        assert!(Event::from_record(&bytes[..DECISION_LEN - 1]).is_none());
    }

    #[test]
    fn exited_process_is_forgotten_with_its_dead_threads() {
        let mut procs = ProcCache::with_capacity(1024);
        procs.entry(100).exe = Some("/usr/bin/agent".into());
        // Fork records: a thread (tid 101) and a child process (102).
        for child in [101, 102] {
            procs.forked(100, child);
            procs.entry(child).ppid = Some(100);
        }
        // The child process still runs when its parent exits.
        procs.exited(100, |tid| tid == 102);
        assert!(procs.get(100).is_none());
        assert!(procs.get(101).is_none(), "a dead thread's entry stays");
        assert_eq!(procs.get(102).and_then(|i| i.ppid), Some(100));
        procs.exited(102, |_| false);
        assert_eq!(procs.len(), 0);
        assert!(procs.forked.is_empty() && procs.map.is_empty());
    }

    #[test]
    fn churn_of_short_lived_processes_leaves_nothing_behind() {
        let mut procs = ProcCache::with_capacity(1024);
        procs.entry(1).exe = Some("/usr/bin/launcher".into());
        for pid in 2..50_000u32 {
            procs.forked(1, pid);
            let p = procs.entry(pid);
            p.ppid = Some(1);
            p.exe = Some("/usr/bin/probe".into());
            procs.exited(pid, |_| false);
        }
        assert_eq!(procs.len(), 1);
        assert!(procs.forked.get(&1).is_none_or(Vec::is_empty));
        assert!(procs.order.len() <= 2 * 1024);
    }

    #[test]
    fn cache_stays_bounded_without_exit_records() {
        let mut procs = ProcCache::with_capacity(100);
        for pid in 0..10_000u32 {
            procs.entry(pid).comm = Some("worker".into());
        }
        assert_eq!(procs.len(), 100);
        // The newest are kept.
        assert!(procs.get(9_999).is_some() && procs.get(9_899).is_none());
        // A pid removed and seen again is not evicted by its old place.
        procs.exited(9_950, |_| false);
        procs.entry(9_950).comm = Some("again".into());
        procs.entry(20_000);
        assert!(procs.get(9_950).is_some());
    }

    #[test]
    fn long_lived_parent_keeps_no_list_of_forgotten_threads() {
        let mut procs = ProcCache::with_capacity(256);
        procs.entry(1);
        for tid in 2..100_000u32 {
            procs.forked(1, tid);
            procs.entry(tid).ppid = Some(1);
        }
        assert!(procs.len() <= 256);
        assert!(procs.forked[&1].len() <= 2 * 256);
    }
}
