//! Appends records to per-tenant chains, assigning `seq`, `prev`, `hash`;
//! rotates files by size, applies retention, fsyncs on an interval and
//! signs checkpoints.
//!
//! Records are serialized into a per-chain buffer first and written by
//! [`AuditWriter::flush`] (or as soon as the buffer holds
//! [`WRITE_THROUGH_BYTES`], so a burst is not held in memory). When writing fails (disk full, read-only, ...)
//! the bytes stay in that buffer and are retried on the next flush; the
//! buffer is bounded by [`WriterConfig::buffer_records`], and records beyond
//! it are counted and become one `gap` record (`lost.audit = N`) once
//! writing works again. Nothing is dropped silently.
//!
//! A [`Tap`] (the `--export` exporters) gets each chain's lines only after
//! they are in the file, in chain order: what is exported is what the
//! chain holds.

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::{
    LOG_FILE, chain_files,
    checkpoint::{self, ANCHOR, CHECKPOINT, CheckpointError, Signer},
    record::{AuditRecord, GENESIS},
    rotated_name,
};

#[derive(Debug, Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A chain's pending lines are written once they reach this size, even
/// before the next flush: a burst (the pipeline drains up to 8192 ring
/// records between flushes) must not leave a buffer of megabytes behind in
/// the heap.
const WRITE_THROUGH_BYTES: usize = 256 * 1024;

/// How the writer rotates, syncs, signs and buffers.
pub struct WriterConfig {
    /// Rotate the current file before it would grow past this.
    pub max_file_bytes: u64,
    /// Files kept per chain, current one included; 0 keeps all.
    pub retain_files: usize,
    /// How often [`AuditWriter::sync_due`] asks for an fsync.
    pub fsync_interval: Duration,
    /// Sign a checkpoint after this many records of a chain...
    pub checkpoint_every: u64,
    /// ...or after this long with new records.
    pub checkpoint_interval: Duration,
    /// Records kept in memory per chain while writing fails.
    pub buffer_records: usize,
    /// Signs checkpoints and retention anchors; `None` signs nothing.
    pub signer: Option<Signer>,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: 64 * 1024 * 1024,
            retain_files: 0,
            fsync_interval: Duration::from_secs(1),
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
            buffer_records: 100_000,
            signer: None,
        }
    }
}

/// Hears of every line once it is written to its chain's file (on the
/// writer's task: it must not block).
pub trait Tap: Send {
    /// `lines`: one or more whole records of `log`, each ending in `\n`,
    /// exactly as written, in chain order.
    fn written(&mut self, log: &str, lines: Vec<u8>);
}

/// What happened to an appended record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Given this seq; on disk after the next successful flush.
    Queued(u64),
    /// The buffer was full (writing has been failing): counted, and
    /// reported by a `gap` record once writing works again.
    Dropped,
}

/// A chain that could not be written on this flush.
pub struct FlushFailure {
    pub log: String,
    pub error: AuditError,
}

/// Where one chain stands.
struct Chain {
    dir: PathBuf,
    path: PathBuf,
    file: Option<File>,
    /// Bytes of the current file on disk.
    file_bytes: u64,
    /// Serialized lines not yet written.
    pending: Vec<u8>,
    pending_records: usize,
    /// Records refused while the buffer was full, not yet reported.
    dropped: u64,
    next_seq: u64,
    prev: String,
    /// Written since the last fsync.
    unsynced: bool,
    /// Records since the last checkpoint (written or pending).
    since_checkpoint: u64,
    last_checkpoint: Instant,
    next_rotation: u64,
    failing: bool,
    /// A write-through in `append` failed: wait for the next flush, which
    /// retries and reports.
    held: bool,
    /// Written to the file, not yet handed to the tap (only with a tap).
    written: Option<Vec<u8>>,
}

/// Owns every tenant's open log. Used by one task only.
pub struct AuditWriter {
    dir: PathBuf,
    cfg: WriterConfig,
    chains: HashMap<String, Chain>,
    last_sync: Instant,
    tap: Option<Box<dyn Tap>>,
}

impl AuditWriter {
    /// A writer with default settings and no signing key.
    pub fn new(dir: &Path) -> Result<Self, AuditError> {
        Self::with_config(dir, WriterConfig::default())
    }

    pub fn with_config(dir: &Path, cfg: WriterConfig) -> Result<Self, AuditError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        if let Some(signer) = &cfg.signer {
            signer.publish(dir)?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            cfg,
            chains: HashMap::new(),
            last_sync: Instant::now(),
            tap: None,
        })
    }

    /// Hands every line written from now on to `tap` (set it before the
    /// first append).
    pub fn set_tap(&mut self, tap: Box<dyn Tap>) {
        for chain in self.chains.values_mut() {
            chain.written.get_or_insert_with(Vec::new);
        }
        self.tap = Some(tap);
    }

    /// Gives the tap the whole lines written since the last hand-over.
    fn hand_over(&mut self) {
        let Some(tap) = self.tap.as_mut() else {
            return;
        };
        for (log, chain) in self.chains.iter_mut() {
            let Some(written) = chain.written.as_mut() else {
                continue;
            };
            // A short write can leave half a line: it goes with the next.
            let Some(end) = memchr::memrchr(b'\n', written).map(|i| i + 1) else {
                continue;
            };
            let rest = written.split_off(end);
            tap.written(log, std::mem::replace(written, rest));
        }
    }

    /// Appends `record` to `log` (a tenant name or `_node`), filling in
    /// `seq`, `prev` and `hash`.
    pub fn append(&mut self, log: &str, record: AuditRecord) -> Result<Appended, AuditError> {
        self.open_chain(log)?;
        let cfg = &self.cfg;
        let Some(chain) = self.chains.get_mut(log) else {
            unreachable!("opened above");
        };
        if chain.pending_records >= cfg.buffer_records {
            chain.dropped += 1;
            return Ok(Appended::Dropped);
        }
        if chain.file_bytes + chain.pending.len() as u64 > 0
            && chain.file_bytes + chain.pending.len() as u64 + 512 > cfg.max_file_bytes
        {
            match rotate(log, chain, cfg) {
                Ok(notes) => {
                    for note in notes {
                        let mut r = AuditRecord::new("retention");
                        r.ts = record.ts.clone();
                        r.detail = Some(note);
                        push(chain, r);
                    }
                }
                // Keep appending to the old file; retried on the next record.
                Err(e) => tracing::error!("audit rotation of {log}: {e}"),
            }
        }
        let seq = push(chain, record);
        if chain.pending.len() >= WRITE_THROUGH_BYTES && !chain.failing && !chain.held {
            // A failure is retried and reported by the next flush.
            chain.held = write_pending(chain).is_err();
        }
        Ok(Appended::Queued(seq))
    }

    /// Records waiting in memory, over all chains.
    pub fn buffered_records(&self) -> usize {
        self.chains.values().map(|c| c.pending_records).sum()
    }

    /// Writes buffered lines of every chain to the kernel, reports records
    /// dropped while writing failed, and signs count-based checkpoints.
    pub fn flush(&mut self) -> Vec<FlushFailure> {
        let mut failures = Vec::new();
        let cfg = &self.cfg;
        for (log, chain) in self.chains.iter_mut() {
            let result = write_pending(chain).and_then(|()| {
                if chain.dropped > 0 {
                    let mut gap = AuditRecord::new("gap");
                    gap.ts = super::format_ts(time::OffsetDateTime::now_utc());
                    gap.lost = Some(BTreeMap::from([("audit".to_string(), chain.dropped)]));
                    gap.detail = Some(format!(
                        "{} audit records were lost: writing failed and the in-memory buffer ({} records) was full",
                        chain.dropped, cfg.buffer_records
                    ));
                    tracing::error!(log, lost = chain.dropped, "audit records were lost while writing failed");
                    chain.dropped = 0;
                    push(chain, gap);
                    write_pending(chain)?;
                }
                if chain.since_checkpoint >= cfg.checkpoint_every {
                    sign_checkpoint(log, chain, cfg)?;
                }
                Ok(())
            });
            chain.held = false;
            match result {
                Ok(()) => {
                    // What a failure or a burst grew goes back to the heap.
                    if chain.pending.is_empty()
                        && chain.pending.capacity() > 2 * WRITE_THROUGH_BYTES
                    {
                        chain.pending = Vec::new();
                    }
                    if chain.failing {
                        tracing::info!(log, "audit writing works again");
                        chain.failing = false;
                    }
                }
                Err(error) => {
                    if !chain.failing {
                        tracing::error!(
                            log,
                            buffered = chain.pending_records,
                            "AUDIT WRITE FAILING: {error}; records are kept in memory (up to {}) and retried",
                            cfg.buffer_records
                        );
                    }
                    chain.failing = true;
                    failures.push(FlushFailure {
                        log: log.clone(),
                        error,
                    });
                }
            }
        }
        self.hand_over();
        failures
    }

    /// Whether the fsync interval has passed since the last [`sync`](Self::sync).
    pub fn sync_due(&self) -> bool {
        self.last_sync.elapsed() >= self.cfg.fsync_interval
    }

    /// Flushes and fsyncs every chain, and signs checkpoints that are due by
    /// time.
    pub fn sync(&mut self) -> Vec<FlushFailure> {
        self.sync_inner(false)
    }

    /// Flushes, fsyncs and signs a checkpoint for every chain with records
    /// since its last one (daemon shutdown).
    pub fn close(&mut self) -> Vec<FlushFailure> {
        self.sync_inner(true)
    }

    fn sync_inner(&mut self, final_checkpoint: bool) -> Vec<FlushFailure> {
        self.last_sync = Instant::now();
        let mut failures = self.flush();
        let cfg = &self.cfg;
        for (log, chain) in self.chains.iter_mut() {
            if failures.iter().any(|f| &f.log == log) {
                continue;
            }
            let due = chain.since_checkpoint > 0
                && (final_checkpoint || chain.last_checkpoint.elapsed() >= cfg.checkpoint_interval);
            let result = if due {
                sign_checkpoint(log, chain, cfg)
            } else {
                sync_chain(chain)
            };
            if let Err(error) = result {
                failures.push(FlushFailure {
                    log: log.clone(),
                    error,
                });
            }
        }
        self.hand_over();
        failures
    }

    fn open_chain(&mut self, log: &str) -> Result<(), AuditError> {
        if self.chains.contains_key(log) {
            return Ok(());
        }
        let dir = self.dir.join(log);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let files = chain_files(&dir).map_err(io_err(&dir))?;
        let next_rotation = files.iter().filter_map(|(n, _)| *n).max().unwrap_or(0) + 1;
        let path = dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let file_bytes = file.metadata().map_err(io_err(&path))?.len();
        let mut resume = resume_point(&mut file).map_err(io_err(&path))?;
        if resume.last.is_none() && resume.torn == 0 {
            // A fresh current file after rotation: the chain goes on from
            // the newest rotated file.
            if let Some((_, newest)) = files.iter().rev().find(|(n, _)| n.is_some()) {
                let mut f = File::open(newest).map_err(io_err(newest))?;
                resume.last = resume_point(&mut f).map_err(io_err(newest))?.last;
            }
        }
        let (next_seq, prev) = match resume.last {
            Some((seq, hash)) => (seq + 1, hash),
            None => (0, GENESIS.to_string()),
        };
        let mut chain = Chain {
            dir,
            path,
            file: Some(file),
            file_bytes,
            pending: Vec::with_capacity(64 * 1024),
            pending_records: 0,
            dropped: 0,
            next_seq,
            prev,
            unsynced: false,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            next_rotation,
            failing: false,
            held: false,
            written: self.tap.is_some().then(Vec::new),
        };
        if resume.torn > 0 {
            tracing::warn!(
                log,
                bytes = resume.torn,
                "audit log ends in a torn line (a crash mid-write); noting it in a gap record and continuing the chain from seq {}",
                next_seq.saturating_sub(1)
            );
            // End the torn line so the next record starts on its own line.
            chain.pending.push(b'\n');
            let mut gap = AuditRecord::new("gap");
            gap.ts = super::format_ts(time::OffsetDateTime::now_utc());
            gap.lost = Some(BTreeMap::from([("audit".to_string(), 1)]));
            gap.torn_bytes = Some(resume.torn);
            gap.detail = Some(format!(
                "torn tail: the previous line ({} bytes) was cut off by a crash; the chain continues from the last complete record",
                resume.torn
            ));
            push(&mut chain, gap);
        }
        self.chains.insert(log.to_string(), chain);
        Ok(())
    }
}

/// Serializes `record` as the chain's next line into the pending buffer and
/// returns its seq. The hash is computed over exactly the bytes written
/// (the record's JSON without `hash`), and `hash` is spliced in last, which
/// is what [`AuditRecord::compute_hash`] and `verify` recompute.
fn push(chain: &mut Chain, mut record: AuditRecord) -> u64 {
    record.seq = chain.next_seq;
    record.prev = std::mem::take(&mut chain.prev);
    record.hash.clear();
    let start = chain.pending.len();
    // Serializing a struct of strings, integers and maps cannot fail.
    let _ = serde_json::to_writer(&mut chain.pending, &record);
    let mut h = Sha256::new();
    h.update(record.prev.as_bytes());
    h.update(b"\n");
    h.update(&chain.pending[start..]);
    let hash = hex::encode(h.finalize());
    chain.pending.pop(); // the closing brace
    chain.pending.extend_from_slice(b",\"hash\":\"");
    chain.pending.extend_from_slice(hash.as_bytes());
    chain.pending.extend_from_slice(b"\"}\n");
    chain.prev = hash;
    chain.next_seq += 1;
    chain.pending_records += 1;
    chain.since_checkpoint += 1;
    record.seq
}

/// Writes the pending buffer; on failure keeps what was not written.
fn write_pending(chain: &mut Chain) -> Result<(), AuditError> {
    if chain.pending.is_empty() {
        return Ok(());
    }
    if chain.file.is_none() {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&chain.path)
            .map_err(io_err(&chain.path))?;
        chain.file = Some(f);
    }
    let Some(file) = chain.file.as_mut() else {
        unreachable!("opened above");
    };
    let mut written = 0;
    let result = loop {
        if written == chain.pending.len() {
            break Ok(());
        }
        match file.write(&chain.pending[written..]) {
            Ok(0) => break Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    if written > 0 {
        if let Some(w) = chain.written.as_mut() {
            w.extend_from_slice(&chain.pending[..written]);
        }
        let done = memchr::memchr_iter(b'\n', &chain.pending[..written]).count();
        chain.pending_records = chain.pending_records.saturating_sub(done);
        chain.pending.drain(..written);
        chain.file_bytes += written as u64;
        chain.unsynced = true;
    }
    result.map_err(io_err(&chain.path))
}

fn sync_chain(chain: &mut Chain) -> Result<(), AuditError> {
    if !chain.unsynced {
        return Ok(());
    }
    if let Some(f) = &chain.file {
        f.sync_data().map_err(io_err(&chain.path))?;
    }
    chain.unsynced = false;
    Ok(())
}

/// Makes the chain durable up to its last record, then signs that point.
fn sign_checkpoint(log: &str, chain: &mut Chain, cfg: &WriterConfig) -> Result<(), AuditError> {
    write_pending(chain)?;
    sync_chain(chain)?;
    chain.since_checkpoint = 0;
    chain.last_checkpoint = Instant::now();
    let (Some(signer), Some(seq)) = (&cfg.signer, chain.next_seq.checked_sub(1)) else {
        return Ok(());
    };
    let ts = super::format_ts(time::OffsetDateTime::now_utc());
    let cp = signer.sign(CHECKPOINT, log, seq, &chain.prev, ts);
    checkpoint::append(&chain.dir, &cp)?;
    Ok(())
}

/// Moves the current file to the next `audit-NNNNNN.jsonl` and starts a
/// new one; then deletes the oldest files beyond `retain_files`, signing an
/// anchor first so `verify` knows where the chain now starts. Returns notes
/// for `retention` records.
fn rotate(log: &str, chain: &mut Chain, cfg: &WriterConfig) -> Result<Vec<String>, AuditError> {
    write_pending(chain)?;
    chain.unsynced = true;
    sync_chain(chain)?;
    let rotated = chain.dir.join(rotated_name(chain.next_rotation));
    fs::rename(&chain.path, &rotated).map_err(io_err(&rotated))?;
    chain.next_rotation += 1;
    chain.file = Some(
        OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&chain.path)
            .map_err(io_err(&chain.path))?,
    );
    chain.file_bytes = 0;
    if let Ok(d) = File::open(&chain.dir) {
        let _ = d.sync_all();
    }
    tracing::debug!(log, file = %rotated.display(), "audit log rotated");
    let mut notes = Vec::new();
    if cfg.retain_files == 0 {
        return Ok(notes);
    }
    let files = chain_files(&chain.dir).map_err(io_err(&chain.dir))?;
    let excess = files.len().saturating_sub(cfg.retain_files);
    if excess == 0 {
        return Ok(notes);
    }
    // The chain will start at the first record of the first kept file (or,
    // when every rotated file goes, at the next record to be written).
    let (start_seq, start_prev) = match files.get(excess) {
        Some((Some(_), path)) => first_link(path)
            .map_err(io_err(path))?
            .unwrap_or((chain.next_seq, chain.prev.clone())),
        _ => (chain.next_seq, chain.prev.clone()),
    };
    if let Some(signer) = &cfg.signer {
        let ts = super::format_ts(time::OffsetDateTime::now_utc());
        let cp = signer.sign(ANCHOR, log, start_seq, &start_prev, ts);
        checkpoint::append(&chain.dir, &cp)?;
    }
    for (_, path) in files.iter().take(excess) {
        fs::remove_file(path).map_err(io_err(path))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        notes.push(format!(
            "retention: deleted {} (keeping {} files); the chain now starts at seq {start_seq}",
            name.unwrap_or_default(),
            cfg.retain_files
        ));
    }
    Ok(notes)
}

/// Seq and prev of a file's first record.
fn first_link(path: &Path) -> std::io::Result<Option<(u64, String)>> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = f.read(&mut buf)?;
    buf.truncate(n);
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    Ok(serde_json::from_slice::<AuditRecord>(line)
        .ok()
        .map(|r| (r.seq, r.prev)))
}

/// Where a file's chain ends.
struct ResumePoint {
    /// Seq and hash of the last complete record.
    last: Option<(u64, String)>,
    /// Length of an incomplete last line (0 when the file ends cleanly).
    torn: u64,
}

/// Reads the end of a file: the last complete record, and whether a torn
/// (unterminated, unparsable) line follows it.
fn resume_point(file: &mut File) -> std::io::Result<ResumePoint> {
    let len = file.metadata()?.len();
    let mut point = ResumePoint {
        last: None,
        torn: 0,
    };
    if len == 0 {
        return Ok(point);
    }
    let start = len.saturating_sub(256 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let complete_end = match memchr::memrchr(b'\n', &tail) {
        Some(i) => i + 1,
        None => 0,
    };
    let unterminated = &tail[complete_end..];
    if !unterminated.is_empty() {
        match serde_json::from_slice::<AuditRecord>(unterminated) {
            // Complete but for its newline: it counts.
            Ok(r) if r.hash == r.compute_hash() => {
                file.write_all(b"\n")?;
                point.last = Some((r.seq, r.hash));
                return Ok(point);
            }
            _ => point.torn = unterminated.len() as u64,
        }
    }
    point.last = tail[..complete_end]
        .split(|&b| b == b'\n')
        .rev()
        .filter_map(|l| serde_json::from_slice::<AuditRecord>(l).ok())
        .next()
        .map(|r| (r.seq, r.hash));
    Ok(point)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_between_flushes_is_written_through_not_held_in_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = AuditWriter::new(dir.path()).expect("writer");
        for _ in 0..20_000 {
            let mut r = AuditRecord::new("connect");
            r.detail = Some("x".repeat(200));
            w.append("acme", r).expect("append");
        }
        let chain = &w.chains["acme"];
        assert!(
            chain.pending.capacity() <= 2 * WRITE_THROUGH_BYTES,
            "{} bytes held for {} records",
            chain.pending.capacity(),
            chain.pending_records
        );
        assert!(w.buffered_records() < 20_000);
        assert!(w.flush().is_empty());
        assert_eq!(read(&dir.path().join("acme").join(LOG_FILE)).len(), 20_000);
    }

    #[test]
    fn buffer_grown_while_writing_failed_is_released_once_it_works_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = AuditWriter::new(dir.path()).expect("writer");
        w.append("acme", AuditRecord::new("connect"))
            .expect("append");
        assert!(w.flush().is_empty());
        let path = dir.path().join("acme").join(LOG_FILE);
        if let Some(c) = w.chains.get_mut("acme") {
            c.file = Some(File::open(&path).expect("read-only handle"));
        }
        for _ in 0..10_000 {
            let mut r = AuditRecord::new("connect");
            r.detail = Some("x".repeat(200));
            w.append("acme", r).expect("append");
        }
        assert_eq!(w.flush().len(), 1);
        assert_eq!(w.buffered_records(), 10_000, "kept while writing fails");
        if let Some(c) = w.chains.get_mut("acme") {
            c.file = None;
        }
        assert!(w.flush().is_empty());
        assert_eq!(read(&path).len(), 10_001);
        assert!(w.chains["acme"].pending.capacity() <= 2 * WRITE_THROUGH_BYTES);
    }

    fn read(path: &Path) -> Vec<AuditRecord> {
        fs::read_to_string(path)
            .expect("read")
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    #[test]
    fn chain_continues_across_writer_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = AuditWriter::new(dir.path()).expect("writer");
        w.append("acme", AuditRecord::new("connect"))
            .expect("append");
        w.append("acme", AuditRecord::new("connect"))
            .expect("append");
        assert!(w.flush().is_empty());
        let recs = read(&dir.path().join("acme").join(LOG_FILE));
        let (a, b) = (&recs[0], &recs[1]);
        assert_eq!((a.seq, b.seq), (0, 1));
        assert_eq!(b.prev, a.hash);
        assert_eq!(a.hash, a.compute_hash(), "spliced hash = canonical hash");
        drop(w);
        let mut w = AuditWriter::new(dir.path()).expect("writer");
        w.append("acme", AuditRecord::new("exit")).expect("append");
        // Tenants never share a chain.
        w.append("globex", AuditRecord::new("connect"))
            .expect("append");
        assert!(w.flush().is_empty());
        let recs = read(&dir.path().join("acme").join(LOG_FILE));
        assert_eq!(recs[2].seq, 2);
        assert_eq!(recs[2].prev, recs[1].hash);
        let other = read(&dir.path().join("globex").join(LOG_FILE));
        assert_eq!(other[0].seq, 0);
        assert_eq!(other[0].prev, GENESIS);
    }

    #[test]
    fn torn_tail_is_noted_in_a_gap_record_and_not_chained_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = AuditWriter::new(dir.path()).expect("writer");
        w.append("acme", AuditRecord::new("connect"))
            .expect("append");
        assert!(w.flush().is_empty());
        drop(w);
        let path = dir.path().join("acme").join(LOG_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(br#"{"seq":1,"ts":"2026-"#).expect("tear");
        let mut w = AuditWriter::new(dir.path()).expect("writer");
        w.append("acme", AuditRecord::new("exit")).expect("append");
        assert!(w.flush().is_empty());
        let recs = read(&path);
        assert_eq!(recs.len(), 3, "{recs:?}");
        assert_eq!(recs[1].kind, "gap");
        assert_eq!(recs[1].torn_bytes, Some(20));
        assert_eq!(recs[1].seq, 1);
        assert_eq!(recs[1].prev, recs[0].hash);
        assert_eq!(recs[2].prev, recs[1].hash);
    }

    #[test]
    fn rotation_keeps_the_chain_and_retention_signs_an_anchor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        let cfg = WriterConfig {
            max_file_bytes: 2048,
            retain_files: 3,
            signer: Some(Signer::load_or_create(state.path()).expect("key")),
            ..WriterConfig::default()
        };
        let mut w = AuditWriter::with_config(dir.path(), cfg).expect("writer");
        for _ in 0..100 {
            let mut r = AuditRecord::new("connect");
            r.detail = Some("x".repeat(100));
            w.append("acme", r).expect("append");
            assert!(w.flush().is_empty());
        }
        assert!(w.close().is_empty());
        let chain_dir = dir.path().join("acme");
        let files = chain_files(&chain_dir).expect("list");
        assert_eq!(files.len(), 3, "{files:?}");
        let mut last: Option<AuditRecord> = None;
        for (_, f) in &files {
            for r in read(f) {
                if let Some(p) = &last {
                    assert_eq!(r.seq, p.seq + 1);
                    assert_eq!(r.prev, p.hash);
                }
                last = Some(r);
            }
        }
        let cps = fs::read_to_string(chain_dir.join(checkpoint::CHECKPOINT_FILE)).expect("cps");
        assert!(cps.contains("\"anchor\""));
        assert!(cps.lines().last().expect("one").contains("\"checkpoint\""));
    }

    /// (log, lines) as the tap got them.
    type Handed = Vec<(String, Vec<u8>)>;

    #[derive(Clone, Default)]
    struct Collect(std::sync::Arc<std::sync::Mutex<Handed>>);

    impl Tap for Collect {
        fn written(&mut self, log: &str, lines: Vec<u8>) {
            self.0.lock().expect("lock").push((log.to_string(), lines));
        }
    }

    #[test]
    fn the_tap_gets_exactly_the_written_lines_and_only_once_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = AuditWriter::new(dir.path()).expect("writer");
        let tap = Collect::default();
        w.set_tap(Box::new(tap.clone()));
        w.append("acme", AuditRecord::new("connect"))
            .expect("append");
        w.append("acme", AuditRecord::new("exit")).expect("append");
        assert!(
            tap.0.lock().expect("lock").is_empty(),
            "not before the write"
        );
        assert!(w.flush().is_empty());
        // While writing fails, nothing reaches the tap.
        let path = dir.path().join("acme").join(LOG_FILE);
        if let Some(c) = w.chains.get_mut("acme") {
            c.file = Some(File::open(&path).expect("read-only handle"));
        }
        w.append("acme", AuditRecord::new("connect"))
            .expect("append");
        assert_eq!(w.flush().len(), 1);
        assert_eq!(tap.0.lock().expect("lock").len(), 1);
        if let Some(c) = w.chains.get_mut("acme") {
            c.file = None;
        }
        assert!(w.close().is_empty());
        let got: Vec<u8> = tap
            .0
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|(log, lines)| {
                assert_eq!(log, "acme");
                lines.clone()
            })
            .collect();
        assert_eq!(got, fs::read(&path).expect("read"), "the tap saw the file");
    }

    #[test]
    fn unwritable_log_buffers_then_reports_the_overflow_as_a_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = WriterConfig {
            buffer_records: 3,
            ..WriterConfig::default()
        };
        let mut w = AuditWriter::with_config(dir.path(), cfg).expect("writer");
        w.append("acme", AuditRecord::new("connect"))
            .expect("append");
        // A file handle that cannot be written stands in for a full disk.
        let path = dir.path().join("acme").join(LOG_FILE);
        if let Some(c) = w.chains.get_mut("acme") {
            c.file = Some(File::open(&path).expect("read-only handle"));
        }
        for _ in 0..5 {
            w.append("acme", AuditRecord::new("connect"))
                .expect("append");
        }
        assert_eq!(w.flush().len(), 1);
        assert_eq!(w.buffered_records(), 3);
        if let Some(c) = w.chains.get_mut("acme") {
            c.file = None;
        }
        assert!(w.flush().is_empty());
        let recs = read(&path);
        assert_eq!(recs.len(), 4);
        assert_eq!(recs[3].kind, "gap");
        assert_eq!(recs[3].lost.as_ref().and_then(|l| l.get("audit")), Some(&3));
    }
}
