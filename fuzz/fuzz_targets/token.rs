//! Launch token verification: `agent_guard::identity::token::verify` with a
//! key ring of two tenants. A token it accepts must be one a key of the
//! tenant it names really signed, unexpired, for this node.
//!
//! Input: byte 0 flags, bytes 1..3 clock skew (u16 LE), bytes 3..11 "now"
//! (u64 LE seconds), then the token text.
//! - flags & 3: re-sign the token's `header.claims` before verifying, so
//!   the checks after the signature are reached: 0 no, 1 with a key of
//!   `acme`, 2 with the key of `globex`, 3 with a key no tenant has;
//! - flags & 4: this node is `node-2` (else `node-1`).
#![no_main]

use agent_guard::identity::token::{self, Checks, KeyRing as _, StaticKeyRing};
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _};
use libfuzzer_sys::fuzz_target;

/// The seeds of the ring's keys: `01…01` and `02…02` are acme's,
/// `03…03` globex's; `09…09` is nobody's.
fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn ring() -> StaticKeyRing {
    StaticKeyRing(vec![
        ("acme".into(), key(1).verifying_key()),
        ("acme".into(), key(2).verifying_key()),
        ("globex".into(), key(3).verifying_key()),
    ])
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// `AGENT_GUARD_FUZZ_VERBOSE=1`: print what each input led to (for seeds
/// and crash reproducers; slows fuzzing down).
fn verbose() -> bool {
    static VERBOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("AGENT_GUARD_FUZZ_VERBOSE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_at_checked(11) else {
        return;
    };
    let flags = head[0];
    let skew = u64::from(u16::from_le_bytes([head[1], head[2]]));
    let now = u64::from_le_bytes(head[3..11].try_into().expect("8 bytes"));
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let node_id = if flags & 4 != 0 { "node-2" } else { "node-1" };
    let signer = match flags & 3 {
        1 => Some(key(1)),
        2 => Some(key(3)),
        3 => Some(key(9)),
        _ => None,
    };
    let token = match (&signer, text.trim().rsplit_once('.')) {
        (Some(k), Some((signing_input, _))) => {
            let sig = k.sign(signing_input.as_bytes());
            format!("{signing_input}.{}", b64().encode(sig.to_bytes()))
        }
        _ => text.to_string(),
    };
    let ring = ring();
    let checks = Checks { now, skew, node_id };
    let verdict = token::verify(&token, &ring, &checks);
    if verbose() {
        eprintln!("token: now {now} skew {skew} node {node_id}: {verdict:?}");
    }
    match verdict {
        Ok(claims) => {
            // Accepted: a key of the named tenant signed exactly the
            // token's first two parts.
            let token = token.trim();
            let (signing_input, sig) = token.rsplit_once('.').expect("three parts");
            let sig = b64().decode(sig).expect("base64url signature");
            let sig = Signature::from_slice(&sig).expect("64 bytes");
            assert!(
                ring.keys_of(&claims.tenant)
                    .iter()
                    .any(|k| k.verify(signing_input.as_bytes(), &sig).is_ok()),
                "accepted a token no key of tenant {:?} signed",
                claims.tenant
            );
            assert!(!claims.jti.is_empty(), "accepted an empty jti");
            assert!(
                now <= claims.exp.saturating_add(skew),
                "accepted an expired token"
            );
            if let Some(nbf) = claims.nbf {
                assert!(
                    now.saturating_add(skew) >= nbf,
                    "accepted a token before nbf"
                );
            }
            assert!(
                claims.aud == "*" || claims.aud == node_id,
                "accepted a token for another node"
            );
        }
        Err(e) => {
            let _ = e.reason();
            let _ = e.to_string();
        }
    }
});
