//! Launching agents with signed tokens (`agent-guard run --token FILE`),
//! and who may use the control socket.
//!
//! Root may launch any agent of the policy, as before. A caller that is not
//! root but belongs to `--control-group` may launch only with a token
//! signed by a key the policy lists for the token's tenant
//! (`identity::token`). Each token id (`jti`) is accepted once until its
//! `exp`: used ids are written to the state directory (fsynced) before the
//! launch proceeds, so neither a retry nor a daemon restart reopens one. A
//! token launch always gets a scope of its own (a task subject), so the
//! token's `on_behalf_of` and `jti` are on every record of that process
//! tree and of its sub-agents.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ed25519_dalek::VerifyingKey;

use super::{
    state::{State, write_state_file},
    subjects::{LaunchRequest, Principal},
};
use crate::{
    audit::{AuditRecord, NODE_LOG},
    control::Registration,
    identity::token::{self, Checks, Claims, KeyRing, TokenError},
    policy::Tenant,
};

/// File in the state directory that holds the used token ids.
pub const JTI_FILE: &str = "launch-tokens-used.json";
/// Default allowed clock difference for `exp` and `nbf`.
pub const DEFAULT_SKEW: Duration = Duration::from_secs(60);

/// Who may use the control socket besides root, and how tokens are checked.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// This node's id: a token's `aud` must name it (or be `*`).
    pub node_id: String,
    pub token_skew: Duration,
    /// Members of this group may launch with a token (`--control-group`).
    pub control_gid: Option<u32>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            node_id: node_id(),
            token_skew: DEFAULT_SKEW,
            control_gid: None,
        }
    }
}

/// The node id used when `--node-id` is not given: the host name.
pub fn node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Token ids already used: `tenant/jti` -> `exp` (seconds since the epoch).
#[derive(Debug, Default, Clone)]
pub struct UsedJtis {
    used: BTreeMap<String, u64>,
}

impl UsedJtis {
    /// Reads the set an earlier run saved; missing = empty, damaged = an
    /// error naming the file (starting without it would reopen used tokens).
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join(JTI_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
        };
        let used: BTreeMap<String, u64> = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{} is damaged ({e}); it lists the launch tokens already used: fix it, or remove it only if every token it lists has expired",
                path.display()
            )
        })?;
        Ok(Self { used })
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The policy's tenants as a [`KeyRing`].
struct PolicyKeys(Vec<Tenant>);

impl KeyRing for PolicyKeys {
    fn keys_of(&self, tenant: &str) -> Vec<VerifyingKey> {
        self.0
            .iter()
            .filter(|t| t.name == tenant)
            .flat_map(|t| t.token_keys.iter().copied())
            .collect()
    }
    fn tenant_of(&self, key: &VerifyingKey) -> Option<String> {
        self.0
            .iter()
            .find(|t| t.token_keys.contains(key))
            .map(|t| t.name.clone())
    }
    fn all_keys(&self) -> Vec<VerifyingKey> {
        self.0
            .iter()
            .flat_map(|t| t.token_keys.iter().copied())
            .collect()
    }
}

/// The process asking, for the audit trail.
#[derive(Debug, Clone)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    /// Primary gid, as SO_PEERCRED reported it.
    pub gid: u32,
}

impl Caller {
    pub fn exe(&self) -> Option<String> {
        std::fs::read_link(format!("/proc/{}/exe", self.pid))
            .ok()
            .map(|p| p.display().to_string())
    }
}

impl State {
    /// Launches the calling process as the token says, or refuses with a
    /// clear error; either way a `control` record says what happened.
    pub fn launch_with_token(
        &self,
        caller: &Caller,
        text: &str,
        tenant: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Registration, String> {
        let (claims, result) = match self.check_token(text, tenant, agent) {
            Ok(claims) => {
                let r = self.launch_claims(caller.pid, &claims);
                (Some(claims), r)
            }
            Err(e) => (token_claims_unverified(text), Err(e)),
        };
        // Only a tenant the policy has gets the record in its chain; an
        // unverified claim could otherwise name any directory.
        let tenant = claims
            .as_ref()
            .map(|c| c.tenant.clone())
            .filter(|t| self.tenant_known(t));
        let mut rec = self.control_record(caller, "run");
        rec.agent = claims.as_ref().map(|c| c.agent.clone());
        rec.tenant = tenant.clone();
        match &result {
            Ok(reg) => {
                let c = claims.as_ref();
                rec.verdict = Some("allow".into());
                rec.reason = Some("token".into());
                rec.subject = Some(reg.subject.clone());
                rec.jti = c.map(|c| c.jti.clone());
                rec.on_behalf_of = c.and_then(|c| c.on_behalf_of.clone());
                rec.task_id = reg.task_id.clone();
                rec.detail = Some(format!("launched pid {} with a signed token", caller.pid));
            }
            Err(e) => {
                rec.verdict = Some("deny".into());
                rec.reason = Some(e.reason().into());
                rec.detail = Some(e.to_string());
            }
        }
        self.audit(tenant.as_deref().unwrap_or(NODE_LOG), rec);
        result.map_err(|e| format!("refused: {e}"))
    }

    fn tenant_known(&self, tenant: &str) -> bool {
        self.registry()
            .loaded
            .as_ref()
            .is_some_and(|l| l.policy.tenant(tenant).is_some())
    }

    /// Signature, time, audience, agent and tools; not yet the replay guard.
    fn check_token(
        &self,
        text: &str,
        tenant: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Claims, LaunchError> {
        let (tenants, agents) = {
            let reg = self.registry();
            let Some(l) = reg.loaded.as_ref() else {
                return Err(LaunchError::Other("no policy is loaded".into()));
            };
            (l.policy.tenants.clone(), l.policy.agents.clone())
        };
        let checks = Checks {
            now: unix_now(),
            skew: self.control.token_skew.as_secs(),
            node_id: &self.control.node_id,
        };
        let claims = token::verify(text, &PolicyKeys(tenants), &checks)?;
        // `run --tenant T --agent A --token F` (INTERFACE.md): the names
        // given must be the token's; they never override it.
        if tenant.is_some_and(|t| t != claims.tenant) || agent.is_some_and(|a| a != claims.agent) {
            return Err(LaunchError::Other(format!(
                "the token is for {}/{}, but --tenant/--agent say {}/{}",
                claims.tenant,
                claims.agent,
                tenant.unwrap_or(&claims.tenant),
                agent.unwrap_or(&claims.agent)
            )));
        }
        let agent = agents
            .iter()
            .find(|a| a.tenant == claims.tenant && a.name == claims.agent)
            .ok_or_else(|| {
                TokenError::UnknownAgent(format!("{}/{}", claims.tenant, claims.agent))
            })?;
        if let Some(tools) = &claims.tools {
            let outside: Vec<&str> = tools
                .iter()
                .filter(|t| !agent.tools.contains(t))
                .map(String::as_str)
                .collect();
            if !outside.is_empty() {
                return Err(TokenError::ToolsOutsidePolicy {
                    agent: format!("{}/{}", claims.tenant, claims.agent),
                    tools: outside.join(", "),
                }
                .into());
            }
        }
        Ok(claims)
    }

    /// Spends the token's `jti` (on disk first), then launches.
    fn launch_claims(&self, pid: u32, claims: &Claims) -> Result<Registration, LaunchError> {
        {
            let mut used = self.used_jtis.lock().unwrap_or_else(|p| p.into_inner());
            let key = format!("{}/{}", claims.tenant, claims.jti);
            if used.used.contains_key(&key) {
                return Err(TokenError::Replayed(claims.jti.clone()).into());
            }
            let now = unix_now();
            let skew = self.control.token_skew.as_secs();
            let before = used.used.clone();
            used.used.retain(|_, exp| exp.saturating_add(skew) >= now);
            used.used.insert(key, claims.exp);
            if let Err(e) = write_state_file(&self.state_dir, JTI_FILE, &used.used) {
                used.used = before;
                return Err(LaunchError::Other(format!(
                    "could not record the token as used in {}: {e}",
                    self.state_dir.join(JTI_FILE).display()
                )));
            }
        }
        let req = LaunchRequest {
            tenant: Some(claims.tenant.clone()),
            agent: claims.agent.clone(),
            task: claims.task.clone(),
            tools: claims.tools.clone(),
            ttl_ms: claims.ttl.map(|s| s.saturating_mul(1000)),
            principal: Some(Principal {
                on_behalf_of: claims.on_behalf_of.clone(),
                jti: claims.jti.clone(),
            }),
        };
        self.register(pid, &req, None).map_err(LaunchError::Other)
    }

    /// A `control` record of `op` by `caller` (verdict and reason are the
    /// caller's to fill in).
    pub fn control_record(&self, caller: &Caller, op: &str) -> AuditRecord {
        let mut rec = AuditRecord::new("control");
        rec.op = Some(op.to_string());
        rec.pid = Some(caller.pid);
        rec.uid = Some(caller.uid);
        rec.exe = caller.exe();
        rec
    }
}

/// Why a token launch failed: the token, or something after it.
#[derive(Debug)]
enum LaunchError {
    Token(TokenError),
    Other(String),
}

impl From<TokenError> for LaunchError {
    fn from(e: TokenError) -> Self {
        Self::Token(e)
    }
}

impl LaunchError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Token(e) => e.reason(),
            Self::Other(_) => "launch_failed",
        }
    }
}

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token(e) => e.fmt(f),
            Self::Other(e) => f.write_str(e),
        }
    }
}

/// The claims of a token whose signature did not verify, only to name the
/// tenant and agent in the refusal's record (never trusted for anything).
fn token_claims_unverified(text: &str) -> Option<Claims> {
    use base64::Engine as _;
    let part = text.trim().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}
