//! Signed checkpoints: the node's Ed25519 statement that chain C reached
//! seq S with hash H.
//!
//! A hash chain alone shows edits, removed and reordered lines, but not a
//! cut-off tail or a deleted file: whoever cuts can stop anywhere. The writer
//! therefore signs (chain, seq, hash) every N records / T seconds and at
//! shutdown into `<chain dir>/checkpoints.jsonl`; `verify` checks that the
//! chain still reaches every signed point. Retention signs an `anchor`
//! (the seq and prev where the chain now legitimately starts) before it
//! deletes the oldest file.
//!
//! The signing key lives in the state dir (`audit-signing.key`, 0600, hex
//! seed); its public half is published as `<audit-dir>/node.pub` (one hex
//! key per line; a new key is appended, old ones kept so older checkpoints
//! still verify). Keep a copy of `node.pub` off the node and pass it with
//! `audit verify --public-key`, since whoever can rewrite the audit dir can
//! rewrite `node.pub` too.

use std::{
    fs::{self, OpenOptions},
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// File of signed checkpoints, one per chain directory.
pub const CHECKPOINT_FILE: &str = "checkpoints.jsonl";
/// The node's signing key, in the state dir.
pub const KEY_FILE: &str = "audit-signing.key";
/// Public keys that verify checkpoints, in the audit dir.
pub const PUBLIC_KEY_FILE: &str = "node.pub";

/// `kind` of a periodic checkpoint.
pub const CHECKPOINT: &str = "checkpoint";
/// `kind` of a retention anchor: the chain legitimately starts at `seq`,
/// whose `prev` is `hash`.
pub const ANCHOR: &str = "anchor";

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a hex Ed25519 key ({why})")]
    BadKey { path: PathBuf, why: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One line of `checkpoints.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub kind: String,
    /// The chain: tenant name or `_node`.
    pub chain: String,
    pub seq: u64,
    pub hash: String,
    pub ts: String,
    /// Hex public key that signed (which of `node.pub`'s keys to use).
    pub key: String,
    /// Hex Ed25519 signature over [`Checkpoint::message`].
    pub sig: String,
}

impl Checkpoint {
    /// The signed bytes: every field but `key` and `sig`, in a fixed,
    /// unambiguous layout.
    pub fn message(&self) -> Vec<u8> {
        format!(
            "agent-guard audit checkpoint v1\n{}\n{}\n{}\n{}\n{}",
            self.kind, self.chain, self.seq, self.hash, self.ts
        )
        .into_bytes()
    }
}

/// The node's signing key.
pub struct Signer {
    key: SigningKey,
}

impl Signer {
    /// Loads the key from `<state_dir>/audit-signing.key`, creating the dir
    /// (0700) and a fresh key (0600) on first start.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, CheckpointError> {
        fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
        let _ = fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700));
        let path = state_dir.join(KEY_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => {
                let meta = fs::metadata(&path).map_err(io_err(&path))?;
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        "audit signing key {} was readable by others; setting mode 0600",
                        path.display()
                    );
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                        .map_err(io_err(&path))?;
                }
                let seed = parse_key32(text.trim()).map_err(|why| CheckpointError::BadKey {
                    path: path.clone(),
                    why,
                })?;
                Ok(Self {
                    key: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::generate(&mut rand::rngs::OsRng);
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_err(&path))?;
                writeln!(f, "{}", hex::encode(key.to_bytes())).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
                tracing::info!(key = %path.display(), "generated the audit signing key");
                Ok(Self { key })
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// Makes sure `<audit_dir>/node.pub` lists this key.
    pub fn publish(&self, audit_dir: &Path) -> Result<(), CheckpointError> {
        let path = audit_dir.join(PUBLIC_KEY_FILE);
        let mine = self.public_hex();
        let existing = fs::read_to_string(&path).unwrap_or_default();
        if existing.lines().any(|l| l.trim() == mine) {
            return Ok(());
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(&path)
            .map_err(io_err(&path))?;
        writeln!(f, "{mine}").map_err(io_err(&path))?;
        f.sync_all().map_err(io_err(&path))
    }

    pub fn sign(&self, kind: &str, chain: &str, seq: u64, hash: &str, ts: String) -> Checkpoint {
        let mut cp = Checkpoint {
            kind: kind.to_string(),
            chain: chain.to_string(),
            seq,
            hash: hash.to_string(),
            ts,
            key: self.public_hex(),
            sig: String::new(),
        };
        cp.sig = hex::encode(self.key.sign(&cp.message()).to_bytes());
        cp
    }
}

fn parse_key32(text: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(text).map_err(|e| e.to_string())?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| format!("{} bytes, not 32", bytes.len()))
}

/// Public keys trusted to have signed checkpoints.
#[derive(Default)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
}

impl TrustedKeys {
    /// Reads one hex key per line (blank lines and `#` comments ignored).
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        let mut keys = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: String| CheckpointError::BadKey {
                path: path.to_path_buf(),
                why,
            };
            let bytes = parse_key32(line).map_err(bad)?;
            keys.push(VerifyingKey::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?);
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether one of the trusted keys signed `cp` (whatever key `cp` names).
    pub fn verifies(&self, cp: &Checkpoint) -> bool {
        let Ok(sig) = hex::decode(&cp.sig) else {
            return false;
        };
        let Ok(sig) = Signature::from_slice(&sig) else {
            return false;
        };
        let msg = cp.message();
        self.keys.iter().any(|k| k.verify(&msg, &sig).is_ok())
    }
}

/// Appends one checkpoint line to a chain dir's file and fsyncs it.
pub fn append(chain_dir: &Path, cp: &Checkpoint) -> Result<(), CheckpointError> {
    let path = chain_dir.join(CHECKPOINT_FILE);
    let mut line = serde_json::to_vec(cp).unwrap_or_default();
    line.push(b'\n');
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_err(&path))?;
    f.write_all(&line).map_err(io_err(&path))?;
    f.sync_data().map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_0600_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Signer::load_or_create(dir.path()).expect("create");
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Signer::load_or_create(dir.path()).expect("reload");
        assert_eq!(a.public_hex(), b.public_hex());
    }

    #[test]
    fn signature_covers_every_signed_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Signer::load_or_create(dir.path()).expect("key");
        s.publish(dir.path()).expect("publish");
        s.publish(dir.path()).expect("publish twice is a no-op");
        let keys = TrustedKeys::load(&dir.path().join(PUBLIC_KEY_FILE)).expect("keys");
        let cp = s.sign(CHECKPOINT, "acme", 41, &"ab".repeat(32), "t".into());
        assert!(keys.verifies(&cp));
        let mut forged = cp.clone();
        forged.seq = 40;
        assert!(!keys.verifies(&forged));
        let mut forged = cp.clone();
        forged.chain = "globex".into();
        assert!(!keys.verifies(&forged));
        let other = tempfile::tempdir().expect("tempdir");
        let stranger = Signer::load_or_create(other.path()).expect("key");
        let cp = stranger.sign(CHECKPOINT, "acme", 41, &"ab".repeat(32), "t".into());
        assert!(!keys.verifies(&cp), "a key not in node.pub is not trusted");
    }
}
