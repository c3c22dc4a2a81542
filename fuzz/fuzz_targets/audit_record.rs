//! Audit records and the chain verifier (`agent-guard audit verify`).
//!
//! Every line is parsed as an `AuditRecord` (a parsed record must encode
//! and parse back to itself), then the lines are written as one tenant's
//! chain directory and verified with `verify_chain` / `verify_dir`. Neither
//! may panic, whatever the files hold.
//!
//! Input: byte 0 flags, then text; NUL bytes split it into files:
//! `audit.jsonl` NUL `checkpoints.jsonl` NUL `audit-000001.jsonl` NUL
//! `audit-000002.jsonl` (missing parts: no file).
//! - flags & 1: re-link the chain first: every line that parses as a record
//!   gets `prev` = the hash before it and its own `hash`, as the writer
//!   would (so the fuzzer gets past the SHA-256 checks);
//! - flags & 2: re-sign every checkpoint line with the trusted key;
//! - flags & 4: with 2, a checkpoint's `hash` is set to what the chain
//!   has at its seq (`hash`; an anchor's: `prev`);
//! - flags & 8: no trusted key (checkpoints cannot be checked);
//! - flags & 16: `verify_dir` over the audit dir (keys from its `node.pub`)
//!   instead of `verify_chain`.
#![no_main]

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use agent_guard::audit::{
    AuditRecord, LOG_FILE,
    checkpoint::{
        ANCHOR, CHECKPOINT_FILE, Checkpoint, KEY_FILE, PUBLIC_KEY_FILE, Signer, TrustedKeys,
    },
    record::GENESIS,
    rotated_name,
    verify::{self, KeySource},
};
use libfuzzer_sys::fuzz_target;

const CHAIN: &str = "acme";
const PREFIX: &str = "agent-guard-fuzz-audit-";

struct Env {
    audit_dir: PathBuf,
    chain_dir: PathBuf,
    signer: Signer,
    trusted: TrustedKeys,
}

/// A scratch directory per process (in /dev/shm when there is one, files
/// are rewritten on every input), with a fixed signing key.
fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        remove_stale(&base);
        let root = base.join(format!("{PREFIX}{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let state = root.join("state");
        let audit_dir = root.join("audit");
        let chain_dir = audit_dir.join(CHAIN);
        fs::create_dir_all(&state).expect("create state dir");
        fs::create_dir_all(&chain_dir).expect("create chain dir");
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(state.join(KEY_FILE))
                .expect("write signing key");
            writeln!(f, "{}", "07".repeat(32)).expect("write signing key");
        }
        let signer = Signer::load_or_create(&state).expect("signing key");
        signer.publish(&audit_dir).expect("publish node.pub");
        let trusted = TrustedKeys::load(&audit_dir.join(PUBLIC_KEY_FILE)).expect("node.pub");
        Env {
            audit_dir,
            chain_dir,
            signer,
            trusted,
        }
    })
}

/// Scratch directories of fuzzing processes that are gone.
fn remove_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn check_record_round_trip(line: &str) {
    if let Ok(record) = serde_json::from_str::<AuditRecord>(line) {
        let _ = record.compute_hash();
        let text = serde_json::to_string(&record).expect("a parsed record encodes");
        let again: AuditRecord = serde_json::from_str(&text).expect("an encoded record parses");
        assert_eq!(record, again, "record changed in a round trip");
    }
}

/// Rewrites record lines so that they form a hash chain, in chain order.
/// Returns seq → (prev, hash) of the rewritten records.
fn relink(files: &mut [Option<String>]) -> HashMap<u64, (String, String)> {
    let mut at_seq = HashMap::new();
    let mut prev = GENESIS.to_string();
    for text in files.iter_mut().flatten() {
        let mut out = String::with_capacity(text.len());
        for piece in text.split_inclusive('\n') {
            let (line, end) = match piece.strip_suffix('\n') {
                Some(l) => (l, "\n"),
                None => (piece, ""),
            };
            match serde_json::from_str::<AuditRecord>(line) {
                Ok(mut r) => {
                    r.prev = prev.clone();
                    r.hash = r.compute_hash();
                    prev = r.hash.clone();
                    at_seq.insert(r.seq, (r.prev.clone(), r.hash.clone()));
                    out.push_str(&serde_json::to_string(&r).expect("encode record"));
                }
                Err(_) => out.push_str(line),
            }
            out.push_str(end);
        }
        *text = out;
    }
    at_seq
}

fn resign(env: &Env, text: &str, chain: &HashMap<u64, (String, String)>, follow: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for piece in text.split_inclusive('\n') {
        let (line, end) = match piece.strip_suffix('\n') {
            Some(l) => (l, "\n"),
            None => (piece, ""),
        };
        match serde_json::from_str::<Checkpoint>(line) {
            Ok(cp) => {
                let hash = match chain.get(&cp.seq) {
                    Some((prev, hash)) if follow => {
                        if cp.kind == ANCHOR {
                            prev.clone()
                        } else {
                            hash.clone()
                        }
                    }
                    _ => cp.hash.clone(),
                };
                let signed = env
                    .signer
                    .sign(&cp.kind, &cp.chain, cp.seq, &hash, cp.ts.clone());
                out.push_str(&serde_json::to_string(&signed).expect("encode checkpoint"));
            }
            Err(_) => out.push_str(line),
        }
        out.push_str(end);
    }
    out
}

fn write_or_remove(path: &Path, text: Option<&String>) {
    match text {
        Some(t) => fs::write(path, t).expect("write scratch file"),
        None => match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("{}: {e}", path.display()),
        },
    }
}

/// `AGENT_GUARD_FUZZ_VERBOSE=1`: print what each input led to (for seeds
/// and crash reproducers; slows fuzzing down).
fn verbose() -> bool {
    static VERBOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("AGENT_GUARD_FUZZ_VERBOSE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let mut parts = text.split('\0').map(str::to_string);
    let current = parts.next();
    let checkpoints = parts.next();
    // Chain order: the rotated files, then the current one.
    let mut files = [parts.next(), parts.next(), current];

    for line in files.iter().flatten().flat_map(|t| t.lines()) {
        check_record_round_trip(line);
    }

    let env = env();
    let chain = if flags & 1 != 0 {
        relink(&mut files)
    } else {
        HashMap::new()
    };
    let checkpoints = match checkpoints {
        Some(c) if flags & 2 != 0 => Some(resign(env, &c, &chain, flags & 4 != 0)),
        other => other,
    };

    let dir = &env.chain_dir;
    write_or_remove(&dir.join(rotated_name(1)), files[0].as_ref());
    write_or_remove(&dir.join(rotated_name(2)), files[1].as_ref());
    write_or_remove(&dir.join(LOG_FILE), files[2].as_ref());
    write_or_remove(&dir.join(CHECKPOINT_FILE), checkpoints.as_ref());

    let reports = if flags & 16 != 0 {
        let keys = if flags & 8 != 0 {
            KeySource::File(Path::new("/nonexistent/node.pub"))
        } else {
            KeySource::AuditDir
        };
        verify::verify_dir(&env.audit_dir, keys).expect("list the audit dir")
    } else {
        let trusted = if flags & 8 != 0 {
            Err("no trusted keys".to_string())
        } else {
            Ok(&env.trusted)
        };
        vec![verify::verify_chain(CHAIN, dir, trusted)]
    };
    for report in &reports {
        if verbose() {
            eprintln!(
                "audit: {} records, seqs {:?}..{:?}, problems {:?}, notes {:?}",
                report.records,
                report.first_seq,
                report.last_seq,
                report
                    .problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
                report.notes
            );
        }
        assert_eq!(report.chain, CHAIN);
        for p in &report.problems {
            let _ = p.to_string();
        }
    }
});
