//! A sort of fixed-size entries that spills to disk, so `audit replay` can
//! put ten million records in order without holding them: only
//! [`CHUNK_ENTRIES`] entries are ever in memory, the rest wait as sorted
//! chunks in one file (unlinked at once, so nothing is left behind) and
//! are merged.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    fs::File,
    io::{BufWriter, Write},
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
};

/// Entries sorted in memory before a chunk is written out: 2.5 MiB.
pub const CHUNK_ENTRIES: usize = 1 << 16;
/// Read buffer per chunk while merging, and for all chunks together.
const MERGE_BUFFER: usize = 64 * 1024;
const MERGE_MEMORY: usize = 16 << 20;

/// Where a record's line starts: the file's index in the trail and the
/// byte offset in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Loc {
    pub file: u32,
    pub offset: u64,
}

/// A sort key and the record it stands for. Ordered by key, then
/// location, so equal keys keep trail order (a stable sort).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub key: [u64; 3],
    pub loc: Loc,
}

const ENTRY_BYTES: usize = 3 * 8 + 4 + 8;

impl Entry {
    fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        for (i, k) in self.key.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&k.to_le_bytes());
        }
        b[24..28].copy_from_slice(&self.loc.file.to_le_bytes());
        b[28..36].copy_from_slice(&self.loc.offset.to_le_bytes());
        b
    }

    fn decode(b: &[u8; ENTRY_BYTES]) -> Self {
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let mut file = [0u8; 4];
        file.copy_from_slice(&b[24..28]);
        Entry {
            key: [u64_at(0), u64_at(8), u64_at(16)],
            loc: Loc {
                file: u32::from_le_bytes(file),
                offset: u64_at(28),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "sorting the replay in {}: {source} (set TMPDIR to a directory with free space: about {ENTRY_BYTES} bytes per record)",
    dir.display()
)]
pub struct SpillError {
    pub dir: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Collects entries; [`ExternalSort::finish`] gives them back in order.
pub struct ExternalSort {
    buf: Vec<Entry>,
    /// Sorted chunks, one after another in one file: (start, bytes).
    file: Option<File>,
    chunks: Vec<(u64, u64)>,
    written: u64,
    chunk_entries: usize,
    dir: PathBuf,
}

impl Default for ExternalSort {
    fn default() -> Self {
        Self::with_chunk(CHUNK_ENTRIES)
    }
}

impl ExternalSort {
    /// Spills every `chunk_entries` entries (tests use small chunks).
    pub fn with_chunk(chunk_entries: usize) -> Self {
        Self {
            buf: Vec::new(),
            file: None,
            chunks: Vec::new(),
            written: 0,
            chunk_entries: chunk_entries.max(1),
            dir: std::env::temp_dir(),
        }
    }

    pub fn push(&mut self, e: Entry) -> Result<(), SpillError> {
        if self.buf.len() >= self.chunk_entries {
            self.spill()?;
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(self.chunk_entries.min(4096));
        }
        self.buf.push(e);
        Ok(())
    }

    fn err(&self, source: std::io::Error) -> SpillError {
        SpillError {
            dir: self.dir.clone(),
            source,
        }
    }

    fn spill(&mut self) -> Result<(), SpillError> {
        self.buf.sort_unstable();
        if self.file.is_none() {
            self.file = Some(anonymous_file(&self.dir).map_err(|e| self.err(e))?);
        }
        let Some(file) = self.file.as_ref() else {
            return Ok(());
        };
        // Appends: merging reads with pread, which leaves the file
        // position at the end.
        let mut w = BufWriter::with_capacity(MERGE_BUFFER, file);
        let mut res = Ok(());
        for e in &self.buf {
            res = w.write_all(&e.encode());
            if res.is_err() {
                break;
            }
        }
        res.and_then(|()| w.flush()).map_err(|e| self.err(e))?;
        drop(w);
        let bytes = (self.buf.len() * ENTRY_BYTES) as u64;
        self.chunks.push((self.written, bytes));
        self.written += bytes;
        self.buf.clear();
        Ok(())
    }

    /// Sorts what is left; the result can be walked as often as needed.
    pub fn finish(mut self) -> Result<Sorted, SpillError> {
        if !self.chunks.is_empty() && !self.buf.is_empty() {
            self.spill()?;
        }
        self.buf.sort_unstable();
        self.buf.shrink_to_fit();
        Ok(Sorted {
            memory: self.buf,
            file: self.file,
            chunks: self.chunks,
            dir: self.dir,
        })
    }
}

/// An unnamed file in `dir`: created, then unlinked while open.
fn anonymous_file(dir: &std::path::Path) -> std::io::Result<File> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            ".agent-guard-replay-{}-{n}.sort",
            std::process::id()
        ));
        match File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => {
                std::fs::remove_file(&path)?;
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Entries in order: in memory, or as sorted chunks to merge.
pub struct Sorted {
    memory: Vec<Entry>,
    file: Option<File>,
    chunks: Vec<(u64, u64)>,
    dir: PathBuf,
}

/// Reads one chunk through its own buffer (pread: chunks share a file).
struct ChunkReader<'f> {
    file: &'f File,
    next: u64,
    end: u64,
    buf: Vec<u8>,
    at: usize,
}

impl ChunkReader<'_> {
    fn next(&mut self) -> std::io::Result<Option<Entry>> {
        if self.at + ENTRY_BYTES > self.buf.len() {
            let left = self.end - self.next;
            if left == 0 {
                return Ok(None);
            }
            let want = (self.buf.capacity() as u64).min(left) as usize;
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, self.next)?;
            self.next += want as u64;
            self.at = 0;
        }
        let mut b = [0u8; ENTRY_BYTES];
        b.copy_from_slice(&self.buf[self.at..self.at + ENTRY_BYTES]);
        self.at += ENTRY_BYTES;
        Ok(Some(Entry::decode(&b)))
    }
}

impl Sorted {
    /// Visits every entry in order.
    pub fn for_each<E: From<SpillError>>(
        &self,
        mut f: impl FnMut(Entry) -> Result<(), E>,
    ) -> Result<(), E> {
        let Some(file) = self.file.as_ref().filter(|_| !self.chunks.is_empty()) else {
            for e in &self.memory {
                f(*e)?;
            }
            return Ok(());
        };
        let err = |source| SpillError {
            dir: self.dir.clone(),
            source,
        };
        // Buffers shrink as chunks grow in number: MERGE_MEMORY in all.
        let per_chunk = (MERGE_MEMORY / self.chunks.len()).clamp(ENTRY_BYTES, MERGE_BUFFER);
        let per_chunk = per_chunk / ENTRY_BYTES * ENTRY_BYTES;
        let mut readers = Vec::with_capacity(self.chunks.len());
        let mut heap = BinaryHeap::with_capacity(self.chunks.len());
        for (i, &(start, bytes)) in self.chunks.iter().enumerate() {
            let mut r = ChunkReader {
                file,
                next: start,
                end: start + bytes,
                buf: Vec::with_capacity(per_chunk),
                at: 0,
            };
            if let Some(e) = r.next().map_err(err)? {
                heap.push(Reverse((e, i)));
            }
            readers.push(r);
        }
        while let Some(Reverse((e, i))) = heap.pop() {
            f(e)?;
            if let Some(next) = readers[i].next().map_err(err)? {
                heap.push(Reverse((next, i)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u64) -> Vec<Entry> {
        // A scrambled order with many equal keys.
        (0..n)
            .map(|i| Entry {
                key: [(i * 7919) % 13, 0, i % 3],
                loc: Loc {
                    file: (i % 5) as u32,
                    offset: i,
                },
            })
            .collect()
    }

    #[test]
    fn spilled_chunks_merge_into_the_same_order_as_an_in_memory_sort() {
        let input = entries(10_000);
        let mut want = input.clone();
        want.sort();
        for chunk in [1, 7, 1000, 100_000] {
            let mut s = ExternalSort::with_chunk(chunk);
            for e in &input {
                s.push(*e).expect("push");
            }
            let sorted = s.finish().expect("finish");
            for _ in 0..2 {
                let mut got = Vec::new();
                sorted
                    .for_each(|e| {
                        got.push(e);
                        Ok::<_, SpillError>(())
                    })
                    .expect("walk");
                assert_eq!(got, want, "chunk {chunk}");
            }
        }
    }

    #[test]
    fn entries_round_trip_through_their_bytes() {
        let e = Entry {
            key: [u64::MAX, 1, 2],
            loc: Loc {
                file: 7,
                offset: 1 << 40,
            },
        };
        assert_eq!(Entry::decode(&e.encode()), e);
    }
}
