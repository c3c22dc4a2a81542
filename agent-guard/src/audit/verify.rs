//! `audit verify`: checks every chain of an audit dir and its signed
//! checkpoints, and names the first bad record of each chain.
//!
//! Streams each file line by line into one reused buffer and hashes the
//! bytes as they are on disk, so a million records take about a second.

use std::{
    collections::HashMap,
    fmt,
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{
    chain_dirs, chain_files,
    checkpoint::{ANCHOR, CHECKPOINT_FILE, Checkpoint, TrustedKeys},
    progress::{Progress, Tally},
    record::GENESIS,
};

/// What is wrong with a record or checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The content does not hash to the stored hash.
    Edited,
    /// A seq is missing from the chain.
    Removed,
    /// Seqs are out of order.
    Reordered,
    /// The chain ends before a signed checkpoint (tail cut or newest file deleted).
    Truncated,
    /// A whole rotated file is missing.
    FileDeleted,
    /// The last line is incomplete (a crash mid-write).
    TornTail,
    /// A line that is not a record.
    NotARecord,
    /// A checkpoint whose signature no trusted key made.
    BadSignature,
    /// A signed checkpoint names a hash the chain does not have there.
    CheckpointMismatch,
    /// Files could not be read, or checkpoints cannot be checked.
    Unreadable,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Edited => "edited",
            Fault::Removed => "removed",
            Fault::Reordered => "reordered",
            Fault::Truncated => "truncated",
            Fault::FileDeleted => "file deleted",
            Fault::TornTail => "torn tail",
            Fault::NotARecord => "not a record",
            Fault::BadSignature => "bad signature",
            Fault::CheckpointMismatch => "checkpoint mismatch",
            Fault::Unreadable => "unreadable",
        }
    }

    /// What to do about it.
    pub fn fix(self) -> &'static str {
        match self {
            Fault::Edited | Fault::CheckpointMismatch => {
                "the chain was changed after it was written: keep this copy as evidence and compare it with a copy kept off the node (a backup, or what --export sent to the SIEM)"
            }
            Fault::Removed | Fault::Reordered => {
                "records were deleted or moved: keep this copy as evidence; the records around the named seq are what a backup or the SIEM's copy must supply"
            }
            Fault::Truncated => {
                "the newest records are gone: restore the chain's tail (or newest file) from a backup; the last checkpoint says how far it went"
            }
            Fault::FileDeleted => {
                "a rotated file (audit-NNNNNN.jsonl) is missing: restore it from a backup into the chain's directory and verify again"
            }
            Fault::TornTail => {
                "a crash cut the last line: start the daemon once (it notes the torn line in a gap record) and verify again"
            }
            Fault::NotARecord => {
                "a line is not a record and no gap record accounts for it: it was inserted or damaged; compare with a backup"
            }
            Fault::BadSignature => {
                "check that --public-key (default <audit-dir>/node.pub) holds this node's key; otherwise the checkpoint was forged"
            }
            Fault::Unreadable => {
                "check that the file exists and is readable (run as root), and pass --public-key FILE if node.pub is kept elsewhere"
            }
        }
    }
}

/// The first bad record (or checkpoint) of a chain.
#[derive(Debug, Clone)]
pub struct Problem {
    pub fault: Fault,
    pub file: PathBuf,
    /// 1-based line in `file`; 0 when the problem is not one line.
    pub line: u64,
    pub seq: Option<u64>,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}: {}", self.fault.as_str(), self.detail)
    }
}

/// What verify found in one chain.
#[derive(Debug, Clone, Default)]
pub struct ChainReport {
    pub chain: String,
    pub records: u64,
    pub files: usize,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub last_checkpoint: Option<Checkpoint>,
    /// First bad record of the chain, then first bad checkpoint.
    pub problems: Vec<Problem>,
    /// Things worth knowing that are not faults.
    pub notes: Vec<String>,
}

impl ChainReport {
    pub fn intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Where to find the keys that checkpoints must verify against.
pub enum KeySource<'a> {
    /// `<audit-dir>/node.pub`.
    AuditDir,
    File(&'a Path),
}

/// Verifies every chain under `audit_dir`, in parallel.
pub fn verify_dir(audit_dir: &Path, keys: KeySource<'_>) -> std::io::Result<Vec<ChainReport>> {
    verify_dir_with_progress(audit_dir, keys, &Progress::default())
}

/// [`verify_dir`], counting bytes and records read into `progress`.
pub fn verify_dir_with_progress(
    audit_dir: &Path,
    keys: KeySource<'_>,
    progress: &Progress,
) -> std::io::Result<Vec<ChainReport>> {
    let key_path = match keys {
        KeySource::AuditDir => audit_dir.join(super::checkpoint::PUBLIC_KEY_FILE),
        KeySource::File(p) => p.to_path_buf(),
    };
    let trusted = TrustedKeys::load(&key_path);
    let dirs = chain_dirs(audit_dir)?;
    let bytes = dirs
        .iter()
        .filter_map(|(_, dir)| chain_files(dir).ok())
        .flatten()
        .filter_map(|(_, path)| std::fs::metadata(path).ok())
        .map(|m| m.len())
        .sum();
    progress.set_total(bytes, 1);
    progress.next_pass();
    let reports = std::thread::scope(|s| {
        let handles: Vec<_> = dirs
            .iter()
            .map(|(name, dir)| {
                let trusted = trusted.as_ref().map_err(|e| e.to_string());
                s.spawn(move || verify_chain_counted(name, dir, trusted, progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect::<Vec<_>>()
    });
    Ok(reports)
}

/// The fields verify reads; the rest of the line is covered by the hash.
#[derive(Deserialize)]
struct Link<'a> {
    seq: u64,
    kind: &'a str,
    prev: &'a str,
    hash: &'a str,
    #[serde(default)]
    torn_bytes: Option<u64>,
}

/// `,"hash":"<64 hex>"}`: how every record line ends.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// Hash of a line as the writer computed it: over `prev`, a newline and the
/// line without its `hash` member. `None` when the line is not in the
/// writer's form.
fn line_hash(line: &[u8], prev: &str) -> Option<[u8; 32]> {
    let cut = line.len().checked_sub(HASH_SUFFIX_LEN)?;
    if !line[cut..].starts_with(b",\"hash\":\"") || !line.ends_with(b"\"}") {
        return None;
    }
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(&line[..cut]);
    h.update(b"}");
    Some(h.finalize().into())
}

fn hex_eq(bytes: &[u8; 32], hex_str: &str) -> bool {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_str, &mut out).is_ok() && &out == bytes
}

struct Checkpoints {
    /// Valid periodic checkpoints by seq.
    by_seq: HashMap<u64, Checkpoint>,
    /// Highest valid anchor: the chain may start there.
    anchor: Option<Checkpoint>,
    last: Option<Checkpoint>,
    max_seq: Option<u64>,
    problem: Option<Problem>,
    count: usize,
}

fn load_checkpoints(chain: &str, dir: &Path, trusted: Result<&TrustedKeys, String>) -> Checkpoints {
    let mut cps = Checkpoints {
        by_seq: HashMap::new(),
        anchor: None,
        last: None,
        max_seq: None,
        problem: None,
        count: 0,
    };
    let path = dir.join(CHECKPOINT_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return cps;
    };
    let problem = |line: u64, seq: Option<u64>, fault: Fault, detail: String| Problem {
        fault,
        file: path.clone(),
        line,
        seq,
        detail,
    };
    for (i, line) in text.lines().enumerate() {
        let n = i as u64 + 1;
        cps.count += 1;
        let cp: Checkpoint = match serde_json::from_str(line) {
            Ok(cp) => cp,
            Err(e) => {
                cps.problem.get_or_insert(problem(
                    n,
                    None,
                    Fault::NotARecord,
                    format!("not a checkpoint: {e}"),
                ));
                continue;
            }
        };
        let trusted = match &trusted {
            Ok(t) => t,
            Err(e) => {
                cps.problem.get_or_insert(problem(
                    n,
                    Some(cp.seq),
                    Fault::Unreadable,
                    format!("cannot check checkpoint signatures: {e} (pass --public-key FILE)"),
                ));
                continue;
            }
        };
        if cp.chain != chain || !trusted.verifies(&cp) {
            let why = if cp.chain != chain {
                format!("signed for chain {:?}, found in {chain:?}", cp.chain)
            } else {
                "the signature does not verify with any trusted public key (forged or altered checkpoint)".to_string()
            };
            cps.problem
                .get_or_insert(problem(n, Some(cp.seq), Fault::BadSignature, why));
            continue;
        }
        if cp.kind == ANCHOR {
            if cps.anchor.as_ref().is_none_or(|a| cp.seq >= a.seq) {
                cps.anchor = Some(cp);
            }
            continue;
        }
        cps.max_seq = Some(cps.max_seq.map_or(cp.seq, |m| m.max(cp.seq)));
        cps.last = Some(cp.clone());
        cps.by_seq.insert(cp.seq, cp);
    }
    cps
}

/// Verifies one chain directory.
pub fn verify_chain(chain: &str, dir: &Path, trusted: Result<&TrustedKeys, String>) -> ChainReport {
    verify_chain_counted(chain, dir, trusted, &Progress::default())
}

fn verify_chain_counted(
    chain: &str,
    dir: &Path,
    trusted: Result<&TrustedKeys, String>,
    progress: &Progress,
) -> ChainReport {
    let mut report = ChainReport {
        chain: chain.to_string(),
        ..ChainReport::default()
    };
    let cps = load_checkpoints(chain, dir, trusted);
    report.last_checkpoint = cps.last.clone();
    let files = match chain_files(dir) {
        Ok(f) => f,
        Err(e) => {
            report.problems.push(Problem {
                fault: Fault::Unreadable,
                file: dir.to_path_buf(),
                line: 0,
                seq: None,
                detail: e.to_string(),
            });
            return report;
        }
    };
    report.files = files.len();
    let first_problem = walk(&files, &cps, &mut report, &mut Tally::new(progress));
    if let Some(p) = first_problem {
        report.problems.push(p);
    } else {
        // The chain must still reach every signed point.
        if let Some(max) = cps.max_seq
            && report.last_seq.is_none_or(|last| last < max)
        {
            let end = report
                .last_seq
                .map_or("has no records".to_string(), |s| format!("ends at seq {s}"));
            let file = files
                .last()
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| dir.join(super::LOG_FILE));
            report.problems.push(Problem {
                fault: Fault::Truncated,
                file,
                line: 0,
                seq: report.last_seq.map(|s| s + 1),
                detail: format!(
                    "chain {end} but checkpoint signed seq {max} (tail cut off or newest file deleted)"
                ),
            });
        }
        if let (Some(last), Some(max)) = (report.last_seq, cps.max_seq)
            && last > max
        {
            report.notes.push(format!(
                "{} records after the last checkpoint (seq {max}) are not yet signed",
                last - max
            ));
        }
        if cps.count == 0 && report.records > 0 {
            report
                .notes
                .push("no signed checkpoints: a cut-off tail would not be detected".into());
        }
    }
    if let Some(p) = cps.problem {
        report.problems.push(p);
    }
    report
}

/// Streams the chain's files; returns its first bad record.
fn walk(
    files: &[(Option<u64>, PathBuf)],
    cps: &Checkpoints,
    report: &mut ChainReport,
    tally: &mut Tally<'_>,
) -> Option<Problem> {
    let mut expect_seq: Option<u64> = None;
    let mut prev_hash = String::new();
    let mut buf = Vec::with_capacity(4096);
    // A torn line seen just before: (file, line, bytes).
    let mut torn: Option<(PathBuf, u64, u64)> = None;
    let last_file = files.len().saturating_sub(1);
    for (fi, (number, path)) in files.iter().enumerate() {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                return Some(Problem {
                    fault: Fault::Unreadable,
                    file: path.clone(),
                    line: 0,
                    seq: None,
                    detail: e.to_string(),
                });
            }
        };
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut line_no = 0u64;
        let mut at_file_start = true;
        loop {
            buf.clear();
            let n = match reader.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    return Some(Problem {
                        fault: Fault::Unreadable,
                        file: path.clone(),
                        line: line_no + 1,
                        seq: expect_seq,
                        detail: e.to_string(),
                    });
                }
            };
            line_no += 1;
            tally.line(n);
            let terminated = buf.last() == Some(&b'\n');
            let line = if terminated { &buf[..n - 1] } else { &buf[..] };
            let bad = |fault, seq, detail: String| {
                Some(Problem {
                    fault,
                    file: path.clone(),
                    line: line_no,
                    seq,
                    detail,
                })
            };
            let link: Link<'_> = match serde_json::from_slice(line) {
                Ok(l) => l,
                Err(e) => {
                    if !terminated && fi == last_file {
                        return bad(
                            Fault::TornTail,
                            expect_seq,
                            format!(
                                "the last line ({} bytes) is incomplete, as a crash mid-write leaves it; records up to seq {} are intact",
                                line.len(),
                                expect_seq
                                    .map_or("none".into(), |s| s.saturating_sub(1).to_string())
                            ),
                        );
                    }
                    if torn.is_some() {
                        return bad(Fault::NotARecord, expect_seq, format!("not a record: {e}"));
                    }
                    // Acceptable only if the next record acknowledges it.
                    torn = Some((path.clone(), line_no, line.len() as u64));
                    continue;
                }
            };
            if let Some((tfile, tline, tbytes)) = torn.take()
                && !(link.kind == "gap" && link.torn_bytes == Some(tbytes))
            {
                return Some(Problem {
                    fault: Fault::NotARecord,
                    file: tfile,
                    line: tline,
                    seq: expect_seq,
                    detail: format!(
                        "a {tbytes}-byte line that is not a record, and no gap record notes it as a torn line"
                    ),
                });
            }
            let Some(hash) = line_hash(line, link.prev) else {
                return bad(
                    Fault::Edited,
                    Some(link.seq),
                    "the line is not in canonical form (it was rewritten)".into(),
                );
            };
            if !hex_eq(&hash, link.hash) {
                return bad(
                    Fault::Edited,
                    Some(link.seq),
                    "the record's content does not match its hash (a field was changed)".into(),
                );
            }
            match expect_seq {
                None => {
                    // The chain's start: seq 0, or a signed retention anchor.
                    let ok = if link.seq == 0 {
                        link.prev == GENESIS
                    } else {
                        cps.anchor
                            .as_ref()
                            .is_some_and(|a| a.seq == link.seq && a.hash == link.prev)
                    };
                    if !ok {
                        let (fault, why) = if number.is_some() || fi > 0 || link.seq > 0 {
                            (
                                Fault::FileDeleted,
                                format!(
                                    "the chain starts at seq {} but no signed retention anchor says it may (earlier records or files deleted)",
                                    link.seq
                                ),
                            )
                        } else {
                            (
                                Fault::Edited,
                                "seq 0 does not start from the genesis hash".into(),
                            )
                        };
                        return bad(fault, Some(link.seq), why);
                    }
                    report.first_seq = Some(link.seq);
                }
                Some(want) if link.seq != want => {
                    if link.seq < want {
                        return bad(
                            Fault::Reordered,
                            Some(link.seq),
                            format!(
                                "seq {} comes after seq {} (lines reordered or duplicated)",
                                link.seq,
                                want - 1
                            ),
                        );
                    }
                    if at_file_start && fi > 0 {
                        return bad(
                            Fault::FileDeleted,
                            Some(link.seq),
                            format!(
                                "file starts at seq {} but the previous file ends at seq {} (a rotated file was deleted)",
                                link.seq,
                                want - 1
                            ),
                        );
                    }
                    // Swapped lines: the missing seq follows right after.
                    let mut next = Vec::new();
                    let swapped = reader.read_until(b'\n', &mut next).is_ok()
                        && serde_json::from_slice::<Link<'_>>(next.trim_ascii_end())
                            .is_ok_and(|l| l.seq == want);
                    return if swapped {
                        bad(
                            Fault::Reordered,
                            Some(link.seq),
                            format!(
                                "expected seq {want}, found seq {} (lines swapped)",
                                link.seq
                            ),
                        )
                    } else {
                        bad(
                            Fault::Removed,
                            Some(want),
                            format!(
                                "expected seq {want}, found seq {}: {} record(s) removed",
                                link.seq,
                                link.seq - want
                            ),
                        )
                    };
                }
                Some(_) if link.prev != prev_hash => {
                    return bad(
                        Fault::Edited,
                        Some(link.seq),
                        "prev does not match the previous record's hash (a record before it was replaced)".into(),
                    );
                }
                Some(_) => {}
            }
            if let Some(cp) = cps.by_seq.get(&link.seq)
                && cp.hash != link.hash
            {
                return bad(
                    Fault::CheckpointMismatch,
                    Some(link.seq),
                    format!(
                        "checkpoint signed seq {} with hash {}…, the record has {}… (the chain was rewritten)",
                        cp.seq,
                        cp.hash.chars().take(12).collect::<String>(),
                        link.hash.chars().take(12).collect::<String>()
                    ),
                );
            }
            at_file_start = false;
            report.records += 1;
            report.last_seq = Some(link.seq);
            // Saturating: a (forged) chain at u64::MAX overflowed here
            // (found by fuzzing); the hash chain still binds what follows.
            expect_seq = Some(link.seq.saturating_add(1));
            prev_hash.clear();
            prev_hash.push_str(link.hash);
        }
    }
    if let Some((tfile, tline, tbytes)) = torn {
        return Some(Problem {
            fault: Fault::TornTail,
            file: tfile,
            line: tline,
            seq: expect_seq,
            detail: format!("a {tbytes}-byte incomplete line"),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{
        AuditRecord, AuditWriter, LOG_FILE, WriterConfig,
        checkpoint::{PUBLIC_KEY_FILE, Signer},
    };

    /// A chain of `n` records with checkpoints; returns (audit dir, state dir).
    fn chain(n: usize, cfg: WriterConfig) -> (tempfile::TempDir, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        let cfg = WriterConfig {
            signer: Some(Signer::load_or_create(state.path()).expect("key")),
            ..cfg
        };
        let mut w = AuditWriter::with_config(dir.path(), cfg).expect("writer");
        for i in 0..n {
            let mut r = AuditRecord::new("connect");
            r.pid = Some(i as u32);
            w.append("acme", r).expect("append");
        }
        assert!(w.close().is_empty());
        (dir, state)
    }

    fn verify(dir: &Path) -> ChainReport {
        let mut r = verify_dir(dir, KeySource::AuditDir).expect("verify");
        r.retain(|c| c.chain == "acme");
        r.pop().expect("acme chain")
    }

    fn edit_lines(dir: &Path, f: impl FnOnce(&mut Vec<String>)) {
        let path = dir.join("acme").join(LOG_FILE);
        let mut lines: Vec<String> = std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .map(str::to_string)
            .collect();
        f(&mut lines);
        std::fs::write(&path, lines.join("\n") + "\n").expect("write");
    }

    fn fault(r: &ChainReport) -> Fault {
        r.problems.first().map(|p| p.fault).expect("a problem")
    }

    #[test]
    fn intact_chain_verifies() {
        let (dir, _s) = chain(10, WriterConfig::default());
        let r = verify(dir.path());
        assert!(r.intact(), "{:?}", r.problems);
        assert_eq!((r.records, r.last_seq), (10, Some(9)));
        assert_eq!(r.last_checkpoint.map(|c| c.seq), Some(9));
    }

    #[test]
    fn progress_counts_every_line_and_byte_read() {
        let (dir, _s) = chain(10, WriterConfig::default());
        let progress = Progress::default();
        let reports =
            verify_dir_with_progress(dir.path(), KeySource::AuditDir, &progress).expect("verify");
        assert!(reports.iter().all(ChainReport::intact));
        let len = std::fs::metadata(dir.path().join("acme").join(LOG_FILE))
            .expect("stat")
            .len();
        let s = progress.snapshot();
        assert_eq!((s.records, s.bytes, s.total_bytes), (10, len, len));
        assert_eq!((s.pass, s.passes), (1, 1));
    }

    #[test]
    fn each_kind_of_alteration_is_named() {
        let (dir, _s) = chain(10, WriterConfig::default());
        edit_lines(dir.path(), |l| {
            l[3] = l[3].replace("\"pid\":3", "\"pid\":4")
        });
        let r = verify(dir.path());
        assert_eq!((fault(&r), r.problems[0].line), (Fault::Edited, 4));

        let (dir, _s) = chain(10, WriterConfig::default());
        edit_lines(dir.path(), |l| {
            l.remove(5);
        });
        let r = verify(dir.path());
        assert_eq!((fault(&r), r.problems[0].seq), (Fault::Removed, Some(5)));

        let (dir, _s) = chain(10, WriterConfig::default());
        edit_lines(dir.path(), |l| l.swap(2, 3));
        assert_eq!(fault(&verify(dir.path())), Fault::Reordered);

        let (dir, _s) = chain(10, WriterConfig::default());
        edit_lines(dir.path(), |l| l.truncate(7));
        let r = verify(dir.path());
        assert_eq!(fault(&r), Fault::Truncated);
        assert!(
            r.problems[0]
                .detail
                .contains("ends at seq 6 but checkpoint signed seq 9")
        );

        let (dir, _s) = chain(10, WriterConfig::default());
        let path = dir.path().join("acme").join(LOG_FILE);
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, &text[..text.len() - 20]).expect("tear");
        assert_eq!(fault(&verify(dir.path())), Fault::TornTail);
    }

    #[test]
    fn forged_checkpoint_and_deleted_rotated_file_are_named() {
        let (dir, _s) = chain(10, WriterConfig::default());
        let cps = dir.path().join("acme").join(CHECKPOINT_FILE);
        let text = std::fs::read_to_string(&cps).expect("read");
        std::fs::write(&cps, text.replace("\"seq\":9", "\"seq\":12")).expect("forge");
        let r = verify(dir.path());
        assert_eq!(fault(&r), Fault::BadSignature, "{:?}", r.problems);

        let (dir, _s) = chain(
            200,
            WriterConfig {
                max_file_bytes: 4096,
                ..WriterConfig::default()
            },
        );
        assert!(verify(dir.path()).intact());
        std::fs::remove_file(dir.path().join("acme").join(super::super::rotated_name(2)))
            .expect("delete");
        assert_eq!(fault(&verify(dir.path())), Fault::FileDeleted);

        // Without node.pub checkpoints cannot be trusted.
        std::fs::remove_file(dir.path().join(PUBLIC_KEY_FILE)).expect("rm");
        let r = verify(dir.path());
        assert!(r.problems.iter().any(|p| p.fault == Fault::Unreadable));
    }

    #[test]
    fn retention_anchor_lets_the_chain_start_late() {
        let (dir, _s) = chain(
            300,
            WriterConfig {
                max_file_bytes: 4096,
                retain_files: 2,
                ..WriterConfig::default()
            },
        );
        let r = verify(dir.path());
        assert!(r.intact(), "{:?}", r.problems);
        assert!(r.first_seq.is_some_and(|s| s > 0));
    }

    #[test]
    fn torn_tail_repaired_by_a_restart_verifies() {
        let (dir, state) = chain(5, WriterConfig::default());
        let signer = || Signer::load_or_create(state.path()).expect("key");
        // Records after the last checkpoint, then a crash mid-line.
        let cfg = WriterConfig {
            signer: Some(signer()),
            ..WriterConfig::default()
        };
        let mut w = AuditWriter::with_config(dir.path(), cfg).expect("writer");
        for _ in 0..3 {
            w.append("acme", AuditRecord::new("connect"))
                .expect("append");
        }
        assert!(w.flush().is_empty());
        drop(w);
        let path = dir.path().join("acme").join(LOG_FILE);
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, &text[..text.len() - 30]).expect("tear");
        assert_eq!(fault(&verify(dir.path())), Fault::TornTail);

        let cfg = WriterConfig {
            signer: Some(signer()),
            ..WriterConfig::default()
        };
        let mut w = AuditWriter::with_config(dir.path(), cfg).expect("writer");
        w.append("acme", AuditRecord::new("exit")).expect("append");
        assert!(w.close().is_empty());
        let r = verify(dir.path());
        assert!(r.intact(), "{:?}", r.problems);
        assert_eq!(r.last_seq, Some(8), "seq 7 torn, gap is 7, exit is 8");

        // Tearing a record a checkpoint already signed is not a crash.
        let (dir, state) = chain(5, WriterConfig::default());
        let path = dir.path().join("acme").join(LOG_FILE);
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, &text[..text.len() - 30]).expect("tear");
        let cfg = WriterConfig {
            signer: Some(Signer::load_or_create(state.path()).expect("key")),
            ..WriterConfig::default()
        };
        let mut w = AuditWriter::with_config(dir.path(), cfg).expect("writer");
        w.append("acme", AuditRecord::new("exit")).expect("append");
        assert!(w.close().is_empty());
        assert_eq!(fault(&verify(dir.path())), Fault::CheckpointMismatch);
    }
}
