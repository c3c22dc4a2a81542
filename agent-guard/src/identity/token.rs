//! Signed launch tokens: how an orchestrator that is not root on the node
//! launches agents (`agent-guard run --token FILE`).
//!
//! A token is a compact JWS (RFC 7515): `BASE64URL(header) "."
//! BASE64URL(claims) "." BASE64URL(signature)`, header exactly
//! `{"alg":"EdDSA"}` (optionally `typ` and `kid`), signed with Ed25519
//! (RFC 8037). The policy names, per tenant, the public keys whose tokens
//! may launch agents of that tenant:
//!
//! ```toml
//! [[tenant]]
//! name = "acme"
//! token_keys = ["ed25519:<64 hex digits>"]
//! ```
//!
//! Nothing in a token is trusted before its signature verifies against a
//! key of the tenant the token names, so a key of tenant A can never launch
//! as tenant B. Checks, each with its own [`TokenError`] and audit reason:
//! shape and size, `alg`, signature, tenant, `exp`/`nbf` (with a clock
//! skew), `aud` (this node's id or `*`); the daemon then checks the agent,
//! its tools, and that the `jti` was never used before (replay guard).

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8192;
/// Longest `jti`, `on_behalf_of` and `task`.
const MAX_FIELD: usize = 256;
/// Prefix of a public key in the policy and in `token keygen`'s output.
pub const KEY_PREFIX: &str = "ed25519:";

/// The claims of a launch token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub tenant: String,
    pub agent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// A subset of the agent's policy tools; absent = all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<String>>,
    /// Seconds the launched process tree keeps its capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, seconds since the epoch (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Unique token id: accepted once.
    pub jti: String,
    /// The human or upstream principal the agent acts for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
    /// The node id this token is for, or `*`.
    pub aud: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
}

/// Why a token was refused. [`TokenError::reason`] is the audit reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token algorithm {0:?} is not accepted (only EdDSA)")]
    BadAlgorithm(String),
    #[error("token signature does not verify against any key of tenant {0:?}")]
    BadSignature(String),
    #[error(
        "token for tenant {claimed:?} is signed by a key of tenant {signer:?}; a tenant's key launches only that tenant's agents"
    )]
    WrongTenant { claimed: String, signer: String },
    #[error("tenant {0:?} has no token_keys in the policy; tokens cannot launch its agents")]
    NoKeys(String),
    #[error("token expired {0} s ago")]
    Expired(u64),
    #[error("token is not valid for another {0} s (nbf)")]
    NotYetValid(u64),
    #[error("token is for node {aud:?}, this node is {node:?}")]
    WrongAudience { aud: String, node: String },
    #[error("token {0:?} was already used (jti is accepted once)")]
    Replayed(String),
    #[error("token asks for tools outside agent {agent}'s policy: {tools}")]
    ToolsOutsidePolicy { agent: String, tools: String },
    #[error("token names agent {0}, which the current policy does not have")]
    UnknownAgent(String),
}

impl TokenError {
    /// The `reason` of the audit record.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "token_malformed",
            Self::BadAlgorithm(_) => "token_bad_algorithm",
            Self::BadSignature(_) => "token_bad_signature",
            Self::WrongTenant { .. } => "token_wrong_tenant",
            Self::NoKeys(_) => "token_no_keys",
            Self::Expired(_) => "token_expired",
            Self::NotYetValid(_) => "token_not_yet_valid",
            Self::WrongAudience { .. } => "token_wrong_audience",
            Self::Replayed(_) => "token_replayed",
            Self::ToolsOutsidePolicy { .. } => "token_tools_outside_policy",
            Self::UnknownAgent(_) => "token_unknown_agent",
        }
    }
}

/// Parses `ed25519:<64 hex>` (the policy's `token_keys` form).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let hex_part = text
        .strip_prefix(KEY_PREFIX)
        .ok_or_else(|| format!("key {text:?} does not start with {KEY_PREFIX:?}"))?;
    let bytes: [u8; 32] = hex::decode(hex_part)
        .map_err(|e| format!("key {text:?}: {e}"))?
        .try_into()
        .map_err(|_| format!("key {text:?}: an Ed25519 public key is 32 bytes (64 hex digits)"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("key {text:?}: {e}"))
}

/// `ed25519:<64 hex>` for a public key.
pub fn format_public_key(key: &VerifyingKey) -> String {
    format!("{KEY_PREFIX}{}", hex::encode(key.to_bytes()))
}

/// Parses a signing key file: 64 hex digits (the seed), as `token keygen`
/// writes it.
pub fn parse_signing_key(text: &str) -> Result<SigningKey, String> {
    let seed: [u8; 32] = hex::decode(text.trim())
        .map_err(|e| format!("not hex: {e}"))?
        .try_into()
        .map_err(|_| "an Ed25519 signing key is 32 bytes (64 hex digits)".to_string())?;
    Ok(SigningKey::from_bytes(&seed))
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// Signs `claims` into a compact token.
pub fn issue(key: &SigningKey, claims: &Claims) -> String {
    let header = Header {
        alg: "EdDSA".into(),
        typ: Some("JWT".into()),
        kid: None,
    };
    // Serializing plain structs of strings and integers cannot fail.
    let h = b64().encode(serde_json::to_vec(&header).unwrap_or_default());
    let c = b64().encode(serde_json::to_vec(claims).unwrap_or_default());
    let signing_input = format!("{h}.{c}");
    let sig = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", b64().encode(sig.to_bytes()))
}

/// The keys trusted for each tenant, as the policy lists them.
pub trait KeyRing {
    /// Keys of `tenant`, empty when it has none or is unknown.
    fn keys_of(&self, tenant: &str) -> Vec<VerifyingKey>;
    /// The tenant one of whose keys is `key`, if any.
    fn tenant_of(&self, key: &VerifyingKey) -> Option<String>;
    /// Every key of every tenant (to tell a wrong tenant from a forgery).
    fn all_keys(&self) -> Vec<VerifyingKey>;
}

/// A fixed list of (tenant, key) pairs, as a policy's `token_keys` would
/// list them: for tests, fuzzing and tools that check tokens offline.
#[derive(Debug, Clone, Default)]
pub struct StaticKeyRing(pub Vec<(String, VerifyingKey)>);

impl KeyRing for StaticKeyRing {
    fn keys_of(&self, tenant: &str) -> Vec<VerifyingKey> {
        self.0
            .iter()
            .filter(|(t, _)| t == tenant)
            .map(|(_, k)| *k)
            .collect()
    }
    fn tenant_of(&self, key: &VerifyingKey) -> Option<String> {
        self.0
            .iter()
            .find(|(_, k)| k == key)
            .map(|(t, _)| t.clone())
    }
    fn all_keys(&self) -> Vec<VerifyingKey> {
        self.0.iter().map(|(_, k)| *k).collect()
    }
}

/// When and where the token is checked.
#[derive(Debug, Clone)]
pub struct Checks<'a> {
    /// Seconds since the epoch.
    pub now: u64,
    /// Allowed clock difference for `exp` and `nbf`, seconds.
    pub skew: u64,
    /// This node's id (`aud` must equal it or be `*`).
    pub node_id: &'a str,
}

/// Verifies `token` (shape, alg, signature against the named tenant's keys,
/// time, audience). Agent, tools and replay are the daemon's to check.
pub fn verify(token: &str, keys: &dyn KeyRing, checks: &Checks<'_>) -> Result<Claims, TokenError> {
    let token = token.trim();
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed(format!(
            "{} bytes, more than {MAX_TOKEN_BYTES}",
            token.len()
        )));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "expected three base64url parts separated by '.' (compact JWS)".into(),
        ));
    };
    let decode = |what: &str, part: &str| {
        b64()
            .decode(part)
            .map_err(|e| TokenError::Malformed(format!("{what}: not base64url: {e}")))
    };
    let header: Header = serde_json::from_slice(&decode("header", h)?)
        .map_err(|e| TokenError::Malformed(format!("header: {e}")))?;
    if header.alg != "EdDSA" {
        return Err(TokenError::BadAlgorithm(header.alg));
    }
    let claims: Claims = serde_json::from_slice(&decode("claims", c)?)
        .map_err(|e| TokenError::Malformed(format!("claims: {e}")))?;
    let sig_bytes: [u8; 64] = decode("signature", s)?
        .try_into()
        .map_err(|_| TokenError::Malformed("signature: an Ed25519 signature is 64 bytes".into()))?;
    let sig = Signature::from_bytes(&sig_bytes);
    let signing_input = &token[..h.len() + 1 + c.len()];

    let own = keys.keys_of(&claims.tenant);
    let verifies = |k: &VerifyingKey| k.verify(signing_input.as_bytes(), &sig).is_ok();
    if !own.iter().any(verifies) {
        if let Some(signer) = keys
            .all_keys()
            .iter()
            .find(|k| verifies(k))
            .and_then(|k| keys.tenant_of(k))
        {
            return Err(TokenError::WrongTenant {
                claimed: claims.tenant,
                signer,
            });
        }
        if own.is_empty() {
            return Err(TokenError::NoKeys(claims.tenant));
        }
        return Err(TokenError::BadSignature(claims.tenant));
    }
    // Signed: the claims are the issuer's words from here on.
    for (name, value) in [
        ("jti", Some(&claims.jti)),
        ("on_behalf_of", claims.on_behalf_of.as_ref()),
        ("task", claims.task.as_ref()),
    ] {
        if let Some(v) = value
            && (v.len() > MAX_FIELD || v.chars().any(char::is_control))
        {
            return Err(TokenError::Malformed(format!(
                "{name} is longer than {MAX_FIELD} bytes or has control characters"
            )));
        }
    }
    if claims.jti.is_empty() {
        return Err(TokenError::Malformed("jti is empty".into()));
    }
    if checks.now > claims.exp.saturating_add(checks.skew) {
        return Err(TokenError::Expired(checks.now - claims.exp));
    }
    if let Some(nbf) = claims.nbf
        && checks.now.saturating_add(checks.skew) < nbf
    {
        return Err(TokenError::NotYetValid(nbf - checks.now));
    }
    if claims.aud != "*" && claims.aud != checks.node_id {
        return Err(TokenError::WrongAudience {
            aud: claims.aud,
            node: checks.node_id.to_string(),
        });
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn claims() -> Claims {
        Claims {
            tenant: "acme".into(),
            agent: "researcher".into(),
            task: None,
            tools: Some(vec!["search".into()]),
            ttl: None,
            exp: 2_000,
            nbf: Some(900),
            iat: Some(900),
            jti: "j1".into(),
            on_behalf_of: Some("alice@example.com".into()),
            aud: "node-1".into(),
        }
    }

    fn ring() -> StaticKeyRing {
        StaticKeyRing(vec![
            ("acme".into(), key(1).verifying_key()),
            ("acme".into(), key(2).verifying_key()),
            ("globex".into(), key(3).verifying_key()),
        ])
    }

    const AT: Checks<'static> = Checks {
        now: 1_000,
        skew: 30,
        node_id: "node-1",
    };

    #[test]
    fn a_token_signed_by_any_key_of_its_tenant_verifies() {
        for seed in [1, 2] {
            let t = issue(&key(seed), &claims());
            assert_eq!(verify(&t, &ring(), &AT), Ok(claims()));
        }
    }

    #[test]
    fn each_refusal_has_its_own_reason() {
        let r = ring();
        let reason =
            |t: &str, at: &Checks<'_>| verify(t, &r, at).map(|_| ()).map_err(|e| e.reason());
        let mut other = claims();
        other.tenant = "globex".into();
        assert_eq!(
            reason(&issue(&key(1), &other), &AT),
            Err("token_wrong_tenant")
        );
        assert_eq!(
            reason(&issue(&key(9), &claims()), &AT),
            Err("token_bad_signature")
        );
        let mut none = claims();
        none.tenant = "initech".into();
        assert_eq!(reason(&issue(&key(9), &none), &AT), Err("token_no_keys"));
        let late = Checks { now: 2_031, ..AT };
        assert_eq!(
            reason(&issue(&key(1), &claims()), &late),
            Err("token_expired")
        );
        let within_skew = Checks { now: 2_029, ..AT };
        assert_eq!(reason(&issue(&key(1), &claims()), &within_skew), Ok(()));
        let early = Checks { now: 860, ..AT };
        assert_eq!(
            reason(&issue(&key(1), &claims()), &early),
            Err("token_not_yet_valid")
        );
        let elsewhere = Checks {
            node_id: "node-2",
            ..AT
        };
        assert_eq!(
            reason(&issue(&key(1), &claims()), &elsewhere),
            Err("token_wrong_audience")
        );
        let mut any = claims();
        any.aud = "*".into();
        assert_eq!(reason(&issue(&key(1), &any), &elsewhere), Ok(()));
    }

    #[test]
    fn tampered_and_hostile_tokens_are_refused_without_panic() {
        let r = ring();
        let good = issue(&key(1), &claims());
        let (signed, _) = good.rsplit_once('.').expect("three parts");
        // Claims changed after signing.
        let mut c = claims();
        c.agent = "admin".into();
        let forged_claims = b64().encode(serde_json::to_vec(&c).expect("json"));
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!("{}.{forged_claims}.{}", parts[0], parts[2]);
        assert_eq!(
            verify(&forged, &r, &AT).map_err(|e| e.reason()),
            Err("token_bad_signature")
        );
        // alg none, and an unsigned token.
        let none = b64().encode(br#"{"alg":"none"}"#);
        let t = format!("{none}.{}.", parts[1]);
        assert_eq!(
            verify(&t, &r, &AT).map_err(|e| e.reason()),
            Err("token_bad_algorithm")
        );
        let hs = b64().encode(br#"{"alg":"HS256"}"#);
        let t = format!("{hs}.{}.{}", parts[1], parts[2]);
        assert_eq!(
            verify(&t, &r, &AT).map_err(|e| e.reason()),
            Err("token_bad_algorithm")
        );
        for bad in [
            String::new(),
            "a.b".into(),
            "a.b.c.d".into(),
            signed.to_string(),
            format!("{signed}.!!!"),
            format!("{signed}.{}", b64().encode([0u8; 10])),
            "é.é.é".into(),
            "x".repeat(MAX_TOKEN_BYTES + 1),
            format!("{}.{}.{}", b64().encode(b"{"), parts[1], parts[2]),
            format!("{}.{}.{}", parts[0], b64().encode(b"[1,2]"), parts[2]),
        ] {
            let r = verify(&bad, &r, &AT);
            assert_eq!(
                r.map_err(|e| e.reason()),
                Err("token_malformed"),
                "{bad:.60}"
            );
        }
    }

    #[test]
    fn public_keys_round_trip_and_bad_ones_are_named() {
        let k = key(4).verifying_key();
        assert_eq!(parse_public_key(&format_public_key(&k)), Ok(k));
        assert!(parse_public_key("ed25519:abcd").is_err_and(|e| e.contains("32 bytes")));
        assert!(parse_public_key("rsa:00").is_err_and(|e| e.contains("ed25519:")));
        assert!(parse_signing_key("zz").is_err());
    }
}
