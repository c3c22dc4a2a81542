//! Appends records to per-tenant chains, assigning `seq`, `prev`, `hash`.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{BufWriter, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::{
    LOG_FILE,
    record::{AuditRecord, GENESIS},
};

#[derive(Debug, Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where one tenant's chain stands.
struct Chain {
    out: BufWriter<File>,
    path: PathBuf,
    next_seq: u64,
    prev: String,
}

/// Owns every tenant's open log. Used by one task only.
pub struct AuditWriter {
    dir: PathBuf,
    chains: HashMap<String, Chain>,
}

impl AuditWriter {
    pub fn new(dir: &Path) -> Result<Self, AuditError> {
        fs::create_dir_all(dir).map_err(|source| AuditError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            chains: HashMap::new(),
        })
    }

    /// Appends `record` to `log` (a tenant name or `_node`), filling in
    /// `seq`, `prev` and `hash`. Returns the record as written.
    pub fn append(
        &mut self,
        log: &str,
        mut record: AuditRecord,
    ) -> Result<AuditRecord, AuditError> {
        let chain = self.chain(log)?;
        record.seq = chain.next_seq;
        record.prev = chain.prev.clone();
        record.hash = record.compute_hash();
        let mut line = serde_json::to_vec(&record).unwrap_or_default();
        line.push(b'\n');
        chain
            .out
            .write_all(&line)
            .map_err(|source| AuditError::Io {
                path: chain.path.clone(),
                source,
            })?;
        chain.next_seq += 1;
        chain.prev = record.hash.clone();
        Ok(record)
    }

    /// Flushes buffered lines of every chain to the kernel.
    pub fn flush(&mut self) -> Result<(), AuditError> {
        for chain in self.chains.values_mut() {
            chain.out.flush().map_err(|source| AuditError::Io {
                path: chain.path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Flushes and fsyncs every chain.
    pub fn sync(&mut self) -> Result<(), AuditError> {
        self.flush()?;
        for chain in self.chains.values_mut() {
            chain
                .out
                .get_ref()
                .sync_data()
                .map_err(|source| AuditError::Io {
                    path: chain.path.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    fn chain(&mut self, log: &str) -> Result<&mut Chain, AuditError> {
        if !self.chains.contains_key(log) {
            let dir = self.dir.join(log);
            fs::create_dir_all(&dir).map_err(|source| AuditError::Io {
                path: dir.clone(),
                source,
            })?;
            let path = dir.join(LOG_FILE);
            let io = |source| AuditError::Io {
                path: path.clone(),
                source,
            };
            let mut file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&path)
                .map_err(io)?;
            let (next_seq, prev) = resume_point(&mut file).map_err(io)?;
            self.chains.insert(
                log.to_string(),
                Chain {
                    out: BufWriter::new(file),
                    path,
                    next_seq,
                    prev,
                },
            );
        }
        // Inserted just above when absent.
        Ok(self.chains.get_mut(log).expect("chain present"))
    }
}

/// Continues an existing chain after a restart: the next seq and the last
/// hash come from the last complete line.
fn resume_point(file: &mut File) -> std::io::Result<(u64, String)> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok((0, GENESIS.to_string()));
    }
    let start = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let text = String::from_utf8_lossy(&tail);
    if !text.ends_with('\n') {
        tracing::warn!("audit log ends in a torn line; it will be reported by `audit verify`");
    }
    let last = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<AuditRecord>(l).ok())
        .next();
    Ok(match last {
        Some(r) => (r.seq + 1, r.hash),
        None => (0, GENESIS.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_continues_across_writer_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = AuditWriter::new(dir.path()).expect("writer");
        let a = w
            .append("acme", AuditRecord::new("connect"))
            .expect("append");
        let b = w
            .append("acme", AuditRecord::new("connect"))
            .expect("append");
        w.flush().expect("flush");
        assert_eq!((a.seq, b.seq), (0, 1));
        assert_eq!(b.prev, a.hash);
        drop(w);
        let mut w = AuditWriter::new(dir.path()).expect("writer");
        let c = w.append("acme", AuditRecord::new("exit")).expect("append");
        assert_eq!(c.seq, 2);
        assert_eq!(c.prev, b.hash);
        // Tenants never share a chain.
        let other = w
            .append("globex", AuditRecord::new("connect"))
            .expect("append");
        assert_eq!(other.seq, 0);
        assert_eq!(other.prev, GENESIS);
    }
}
