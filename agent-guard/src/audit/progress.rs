//! How far a long read of the trail (`audit verify`, `audit replay`) has
//! got: counters the readers bump and a display reads from another thread.

use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Lines between two updates of the shared counters by one reader.
pub const BATCH: u64 = 4096;

#[derive(Debug)]
pub struct Progress {
    created: Instant,
    /// When the current pass started, in ns after `created`.
    pass_started_ns: AtomicU64,
    /// Bytes of the trail read in this pass.
    bytes: AtomicU64,
    records: AtomicU64,
    /// Bytes one pass reads (the trail's size).
    total_bytes: AtomicU64,
    /// 1-based pass, and how many there are.
    pass: AtomicU32,
    passes: AtomicU32,
}

/// What a display shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub bytes: u64,
    pub records: u64,
    pub total_bytes: u64,
    pub pass: u32,
    pub passes: u32,
    /// Time spent in the current pass.
    pub in_pass: Duration,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            created: Instant::now(),
            pass_started_ns: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            records: AtomicU64::new(0),
            total_bytes: AtomicU64::new(0),
            pass: AtomicU32::new(0),
            passes: AtomicU32::new(0),
        }
    }
}

impl Progress {
    pub fn set_total(&self, bytes: u64, passes: u32) {
        self.total_bytes.store(bytes, Ordering::Relaxed);
        self.passes.store(passes.max(1), Ordering::Relaxed);
    }

    /// Starts the next pass over the trail.
    pub fn next_pass(&self) {
        let now = u64::try_from(self.created.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.pass_started_ns.store(now, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.records.store(0, Ordering::Relaxed);
        self.pass.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, bytes: u64, records: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.records.fetch_add(records, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            bytes: self.bytes.load(Ordering::Relaxed),
            records: self.records.load(Ordering::Relaxed),
            total_bytes: self.total_bytes.load(Ordering::Relaxed),
            pass: self.pass.load(Ordering::Relaxed),
            passes: self.passes.load(Ordering::Relaxed),
            in_pass: self.created.elapsed().saturating_sub(Duration::from_nanos(
                self.pass_started_ns.load(Ordering::Relaxed),
            )),
        }
    }
}

/// Counts one reader's lines locally and hands them on in batches, so the
/// shared counters are not touched per line.
pub struct Tally<'a> {
    progress: &'a Progress,
    bytes: u64,
    records: u64,
}

impl<'a> Tally<'a> {
    pub fn new(progress: &'a Progress) -> Self {
        Self {
            progress,
            bytes: 0,
            records: 0,
        }
    }

    pub fn line(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
        self.records += 1;
        if self.records >= BATCH {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        if self.records > 0 || self.bytes > 0 {
            self.progress.add(self.bytes, self.records);
            self.bytes = 0;
            self.records = 0;
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}
