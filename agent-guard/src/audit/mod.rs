//! The per-tenant, hash-chained audit trail.
//!
//! One chain per tenant under `<audit-dir>/<tenant>/`: the current file
//! `audit.jsonl` and, after size-based rotation, `audit-000001.jsonl`,
//! `audit-000002.jsonl`, ... (oldest first); the chain runs on across files.
//! Records that belong to no tenant (daemon start/stop, policy loads) go to
//! `<audit-dir>/_node/`; tenant names cannot start with `_`. Each chain
//! directory also holds `checkpoints.jsonl`, the node's Ed25519-signed
//! statements of (chain, seq, hash), so a truncated tail or a deleted file is
//! detected by [`verify`].

pub mod checkpoint;
mod external_sort;
pub mod progress;
pub mod record;
pub mod replay;
pub mod verify;
pub mod writer;

use std::path::{Path, PathBuf};

pub use record::{AuditRecord, format_ts};
pub use writer::{AuditWriter, WriterConfig};

/// Directory of records that belong to the node, not a tenant.
pub const NODE_LOG: &str = "_node";
/// File name of a chain's current (newest) file.
pub const LOG_FILE: &str = "audit.jsonl";

/// Name of the `n`th rotated file of a chain.
pub fn rotated_name(n: u64) -> String {
    format!("audit-{n:06}.jsonl")
}

/// Number of a rotated file name (`audit-000042.jsonl` -> 42).
pub fn rotated_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A chain's files in chain order: rotated files by number, then the
/// current file if it exists.
pub fn chain_files(dir: &Path) -> std::io::Result<Vec<(Option<u64>, PathBuf)>> {
    let mut rotated = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(n) = entry.file_name().to_str().and_then(rotated_number) {
            rotated.push((Some(n), entry.path()));
        }
    }
    rotated.sort_by_key(|(n, _)| *n);
    let current = dir.join(LOG_FILE);
    if current.exists() {
        rotated.push((None, current));
    }
    Ok(rotated)
}

/// The chain directories (tenants and `_node`) under an audit dir, sorted.
pub fn chain_dirs(audit_dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(audit_dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        out.push((name, entry.path()));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_round_trip_and_sort_numerically() {
        assert_eq!(rotated_name(7), "audit-000007.jsonl");
        assert_eq!(rotated_number("audit-000007.jsonl"), Some(7));
        assert_eq!(rotated_number("audit-1234567.jsonl"), Some(1_234_567));
        assert_eq!(rotated_number("audit.jsonl"), None);
        assert_eq!(rotated_number("audit-x.jsonl"), None);
        let dir = tempfile::tempdir().expect("tempdir");
        for n in [10, 2, 1] {
            std::fs::write(dir.path().join(rotated_name(n)), "").expect("write");
        }
        std::fs::write(dir.path().join(LOG_FILE), "").expect("write");
        let files: Vec<_> = chain_files(dir.path())
            .expect("list")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(files, vec![Some(1), Some(2), Some(10), None]);
    }
}
