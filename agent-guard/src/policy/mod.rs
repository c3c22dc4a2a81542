//! Policy file: parse, validate and compile the TOML described in
//! INTERFACE.md ("Policy file (TOML)").
//!
//! Parsing is strict on purpose: any unknown key, dangling reference or
//! ambiguous value is refused with `FILE:LINE:COL: REASON`, because a typo in
//! a security policy must never silently widen or narrow what agents can do.

mod compile;
pub mod crd;
mod error;
mod raw;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use compile::{
    CompiledAgent, CompiledPolicy, CompiledRule, HostEndpoint, ToolEndpoint, unix_display, unix_key,
};
pub use error::{Location, PolicyError};

/// The policy used when no policy file exists: monitor mode, so installing the
/// daemon never breaks a running workload.
pub const DEFAULT_POLICY: &str = include_str!("default.toml");

/// Origin name used in messages about [`DEFAULT_POLICY`].
pub const DEFAULT_POLICY_ORIGIN: &str = "<embedded default policy>";

/// Delegation depth used when an agent does not set `max_delegation_depth`.
pub const DEFAULT_MAX_DELEGATION_DEPTH: u8 = 2;
/// Upper bound for `max_delegation_depth`; the kernel walks at most this many
/// parent links.
pub const MAX_DELEGATION_DEPTH: u8 = 8;
/// Upper bound on tenants, tools and agents each, so ids always fit the maps.
pub const MAX_ENTRIES: usize = 65_535;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Refuse calls the policy does not allow.
    Enforce,
    /// Allow everything but record `would_deny`.
    Monitor,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Monitor => "monitor",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hardening {
    /// Seccomp/no-new-privs hardening of the agent process (the default).
    Strict,
    /// No process hardening; only the network fence applies.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IP protocol number as the kernel sees it.
    pub fn as_ipproto(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

/// Default life of the grant an approval makes.
pub const DEFAULT_APPROVAL_TTL: Duration = Duration::from_secs(600);

/// Someone who may approve or deny requests for tools with
/// `approval = "two-person"`: identified by the uid that calls
/// `agent-guard approve` (a uid, never a tagged process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    pub name: String,
    pub uid: u32,
    /// Tenants whose requests this approver may decide; `None` = all.
    pub tenants: Option<Vec<String>>,
}

impl Approver {
    pub fn may_decide(&self, tenant: &str) -> bool {
        self.tenants
            .as_ref()
            .is_none_or(|t| t.iter().any(|x| x == tenant))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    /// Public keys whose signed launch tokens may start this tenant's
    /// agents (`ed25519:<64 hex>`); see `identity::token`.
    pub token_keys: Vec<ed25519_dalek::VerifyingKey>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Cidr {
        net: ipnet::IpNet,
        port: u16,
        proto: Proto,
    },
    /// Parsed but refused by [`Policy::compile`] until DNS support lands.
    Host {
        name: String,
        port: u16,
        proto: Proto,
    },
    /// A Unix socket: an absolute, normalised path, or `@name` for an
    /// abstract socket. Matched byte for byte.
    Unix { path: String },
}

/// Checks a `unix` endpoint: the kernel hook compares the address the
/// caller passes byte for byte, so a path must be spelled the one way
/// callers will spell it.
fn check_unix_path(p: &str) -> Result<(), String> {
    const MAX: usize = agent_guard_common::unix::SUN_PATH_LEN - 1;
    if p.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if let Some(name) = p.strip_prefix('@') {
        if name.is_empty() {
            return Err("names no abstract socket (write @name)".into());
        }
        if name.len() > MAX {
            return Err(format!("is longer than {MAX} bytes"));
        }
        return Ok(());
    }
    if !p.starts_with('/') {
        return Err(
            "is not absolute (write /path/to.sock, or @name for an abstract socket)".into(),
        );
    }
    if p.len() > MAX {
        return Err(format!(
            "is longer than {MAX} bytes (sun_path holds {MAX} and a NUL)"
        ));
    }
    if p.ends_with('/') || p.contains("//") || p.split('/').any(|c| c == "." || c == "..") {
        return Err("is not normalised (no //, /./, /../ or trailing /): agents are matched on the exact bytes they pass".into());
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub calls: u32,
    pub per: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    /// Every use needs approval by a second person.
    TwoPerson,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub rate_limit: Option<RateLimit>,
    pub approval: Option<Approval>,
    /// How long the grant made by an approval lasts (default 10 min).
    pub approval_ttl: Duration,
    /// Uses of that grant (`None`: no count).
    pub approval_uses: Option<u32>,
    /// Where each entry of `endpoints` was written (same index), so that
    /// `compile` can point at an endpoint it refuses.
    pub endpoint_locations: Vec<Location>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub tenant: String,
    pub name: String,
    /// Tool names as written (validated to exist; may repeat or be empty).
    pub tools: Vec<String>,
    pub mode: Option<Mode>,
    pub max_delegation_depth: Option<u8>,
    pub hardening: Hardening,
    /// What to do when a task-scoped process keeps calling outside its
    /// declared tools.
    pub on_divergence: Option<OnDivergence>,
    /// Processes in cgroups matching this pattern (relative to the
    /// cgroup2 mount, `*` within one path component) are this agent:
    /// containers started by a runtime, tagged without `agent-guard run`.
    pub cgroup_glob: Option<String>,
}

/// Checks a `cgroup_glob`: absolute, no empty, `.` or `..` components,
/// each component a valid glob pattern.
fn check_cgroup_glob(p: &str) -> Result<(), String> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err("cgroup_glob must start with / (a path under the cgroup2 mount)".into());
    };
    if rest.is_empty() {
        return Err("cgroup_glob \"/\" would take every process on the node".into());
    }
    for c in rest.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(format!("cgroup_glob {p:?} has an empty, . or .. component"));
        }
        glob::Pattern::new(c).map_err(|e| format!("cgroup_glob component {c:?}: {e}"))?;
    }
    Ok(())
}

/// `on_divergence = { after = N, action = "revoke" | "suspend" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnDivergence {
    /// Act on the N-th divergent call (counted per task-scoped subject).
    pub after: u32,
    pub action: DivergenceAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DivergenceAction {
    /// Take every capability from the diverging task-scoped process tree.
    Revoke,
    /// Suspend the whole agent (every process of it, in every task).
    Suspend,
}

impl Agent {
    /// The agent's own mode, else the policy's `default_mode`.
    pub fn effective_mode(&self, p: &Policy) -> Mode {
        self.mode.unwrap_or(p.default_mode)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `default_mode`; `enforce` when the file does not say (fail closed).
    pub default_mode: Mode,
    pub tenants: Vec<Tenant>,
    pub tools: Vec<Tool>,
    pub agents: Vec<Agent>,
    /// Who may decide two-person approval requests.
    pub approvers: Vec<Approver>,
    /// Fingerprint of the source text (FNV-1a 64, hex) to tell policy
    /// versions apart in logs. Not cryptographic; do not use for integrity.
    pub source_hash: String,
    /// File name used in error messages (the `origin` given when parsing).
    pub origin: String,
}

impl Policy {
    /// Parses and validates `text`; `origin` is the file name used in errors.
    pub fn from_str(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        let raw: raw::RawPolicy = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            PolicyError::at_span(origin, text, span, e.message().trim().to_string())
        })?;
        Validator { origin, text }.policy(raw)
    }

    /// Reads and parses a policy file; the path is used as origin in errors.
    pub fn from_file(path: &Path) -> Result<Policy, PolicyError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            file: origin.clone(),
            source,
        })?;
        Policy::from_str(&text, &origin)
    }

    /// The embedded [`DEFAULT_POLICY`], parsed.
    pub fn default_policy() -> Result<Policy, PolicyError> {
        Policy::from_str(DEFAULT_POLICY, DEFAULT_POLICY_ORIGIN)
    }

    pub fn tool(&self, name: &str) -> Option<&Tool> {
        self.tools.iter().find(|t| t.name == name)
    }

    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.name == name)
    }

    pub fn agent(&self, tenant: &str, name: &str) -> Option<&Agent> {
        self.agents
            .iter()
            .find(|a| a.tenant == tenant && a.name == name)
    }
}

fn fnv1a_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Checks names against `[a-z0-9][a-z0-9._-]{0,62}`: they end up in audit
/// paths (`<audit-dir>/<tenant>/`) and metric labels, so keep them tame.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} name is empty"));
    }
    if kind == "tenant" && name.starts_with('_') {
        return Err(format!(
            "tenant name {name:?} starts with \"_\", which is reserved for the daemon"
        ));
    }
    if name.len() > 63 {
        return Err(format!("{kind} name {name:?} is longer than 63 characters"));
    }
    let mut chars = name.chars();
    if let Some(first) = chars.next()
        && !(first.is_ascii_lowercase() || first.is_ascii_digit())
    {
        return Err(format!(
            "{kind} name {name:?} must start with a lowercase letter or digit"
        ));
    }
    if let Some(bad) = chars
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{kind} name {name:?} contains {bad:?}; allowed are a-z, 0-9, '.', '_' and '-'"
        ));
    }
    Ok(())
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "enforce" => Ok(Mode::Enforce),
        "monitor" => Ok(Mode::Monitor),
        other => Err(format!(
            "unknown mode {other:?} (expected \"enforce\" or \"monitor\")"
        )),
    }
}

/// Turns the raw serde tree into a [`Policy`], refusing the first problem found
/// in source order.
struct Validator<'a> {
    origin: &'a str,
    text: &'a str,
}

impl Validator<'_> {
    fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        reason: impl Into<String>,
    ) -> Result<T, PolicyError> {
        Err(PolicyError::at_span(self.origin, self.text, span, reason))
    }

    fn loc(&self, span: std::ops::Range<usize>) -> Location {
        Location::from_offset(self.text, span.start)
    }

    fn policy(&self, raw: raw::RawPolicy) -> Result<Policy, PolicyError> {
        let default_mode = match &raw.default_mode {
            Some(m) => parse_mode(m.get_ref()).or_else(|e| self.err(m.span(), e))?,
            None => Mode::Enforce,
        };

        let mut tenants = Vec::with_capacity(raw.tenant.len());
        let mut seen_tenants: HashMap<String, Location> = HashMap::new();
        for t in &raw.tenant {
            let name = self.name("tenant", &t.name)?;
            if let Some(first) = seen_tenants.get(&name) {
                return self.err(
                    t.name.span(),
                    format!(
                        "duplicate tenant {name:?} (first declared at line {})",
                        first.line
                    ),
                );
            }
            if seen_tenants.len() >= MAX_ENTRIES {
                return self.err(t.name.span(), format!("more than {MAX_ENTRIES} tenants"));
            }
            seen_tenants.insert(name.clone(), self.loc(t.name.span()));
            let mut token_keys = Vec::with_capacity(t.token_keys.len());
            for k in &t.token_keys {
                let key = crate::identity::token::parse_public_key(k.get_ref())
                    .or_else(|e| self.err(k.span(), format!("token_keys: {e}")))?;
                if token_keys.contains(&key) {
                    return self.err(k.span(), "token_keys: this key is listed twice");
                }
                if let Some(other) = tenants
                    .iter()
                    .find(|o: &&Tenant| o.token_keys.contains(&key))
                {
                    return self.err(
                        k.span(),
                        format!(
                            "token_keys: this key already belongs to tenant {:?}; a key launches one tenant's agents only",
                            other.name
                        ),
                    );
                }
                token_keys.push(key);
            }
            tenants.push(Tenant { name, token_keys });
        }

        let mut tools = Vec::with_capacity(raw.tool.len());
        let mut seen_tools: HashMap<String, Location> = HashMap::new();
        for t in &raw.tool {
            let tool = self.tool(t)?;
            if let Some(first) = seen_tools.get(&tool.name) {
                return self.err(
                    t.name.span(),
                    format!(
                        "duplicate tool {:?} (first declared at line {})",
                        tool.name, first.line
                    ),
                );
            }
            if seen_tools.len() >= MAX_ENTRIES {
                return self.err(t.name.span(), format!("more than {MAX_ENTRIES} tools"));
            }
            seen_tools.insert(tool.name.clone(), self.loc(t.name.span()));
            tools.push(tool);
        }
        let known_tools = if tools.is_empty() {
            "no tools are defined".to_string()
        } else {
            let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
            format!("known tools: {}", names.join(", "))
        };

        let mut agents = Vec::with_capacity(raw.agent.len());
        let mut seen_agents: HashMap<(String, String), Location> = HashMap::new();
        for a in &raw.agent {
            let tenant = a.tenant.get_ref().clone();
            if !seen_tenants.contains_key(&tenant) {
                let known: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
                let hint = if known.is_empty() {
                    "no [[tenant]] is declared".to_string()
                } else {
                    format!("known tenants: {}", known.join(", "))
                };
                return self.err(
                    a.tenant.span(),
                    format!("tenant {tenant:?} is not declared ({hint})"),
                );
            }
            let name = self.name("agent", &a.name)?;
            let key = (tenant.clone(), name.clone());
            if let Some(first) = seen_agents.get(&key) {
                return self.err(
                    a.name.span(),
                    format!(
                        "duplicate agent {tenant}/{name} (first declared at line {})",
                        first.line
                    ),
                );
            }
            if seen_agents.len() >= MAX_ENTRIES {
                return self.err(a.name.span(), format!("more than {MAX_ENTRIES} agents"));
            }
            seen_agents.insert(key, self.loc(a.name.span()));

            let mut agent_tools = Vec::with_capacity(a.tools.len());
            for t in &a.tools {
                if !seen_tools.contains_key(t.get_ref()) {
                    return self.err(
                        t.span(),
                        format!("tool {:?} is not defined ({known_tools})", t.get_ref()),
                    );
                }
                agent_tools.push(t.get_ref().clone());
            }
            let mode = match &a.mode {
                Some(m) => Some(parse_mode(m.get_ref()).or_else(|e| self.err(m.span(), e))?),
                None => None,
            };
            let max_delegation_depth = match &a.max_delegation_depth {
                Some(d) => match u8::try_from(*d.get_ref()) {
                    Ok(v) if v <= MAX_DELEGATION_DEPTH => Some(v),
                    _ => {
                        return self.err(
                            d.span(),
                            format!(
                                "max_delegation_depth {} is out of range (0-{MAX_DELEGATION_DEPTH})",
                                d.get_ref()
                            ),
                        );
                    }
                },
                None => None,
            };
            let hardening = match a
                .hardening
                .as_ref()
                .map(|h| (h.get_ref().as_str(), h.span()))
            {
                None | Some(("strict", _)) => Hardening::Strict,
                Some(("off", _)) => Hardening::Off,
                Some((other, span)) => {
                    return self.err(
                        span,
                        format!("unknown hardening {other:?} (expected \"strict\" or \"off\")"),
                    );
                }
            };
            let on_divergence = match &a.on_divergence {
                None => None,
                Some(d) => {
                    let d = d.get_ref();
                    let after = match u32::try_from(*d.after.get_ref()) {
                        Ok(n) if n >= 1 => n,
                        _ => {
                            return self.err(
                                d.after.span(),
                                format!(
                                    "on_divergence.after must be at least 1, got {}",
                                    d.after.get_ref()
                                ),
                            );
                        }
                    };
                    let action = match d.action.get_ref().as_str() {
                        "revoke" => DivergenceAction::Revoke,
                        "suspend" => DivergenceAction::Suspend,
                        other => {
                            return self.err(
                                d.action.span(),
                                format!("unknown on_divergence action {other:?} (expected \"revoke\" or \"suspend\")"),
                            );
                        }
                    };
                    Some(OnDivergence { after, action })
                }
            };
            let cgroup_glob = match &a.cgroup_glob {
                None => None,
                Some(g) => {
                    check_cgroup_glob(g.get_ref()).or_else(|e| self.err(g.span(), e))?;
                    Some(g.get_ref().clone())
                }
            };
            agents.push(Agent {
                tenant,
                name,
                tools: agent_tools,
                mode,
                max_delegation_depth,
                hardening,
                on_divergence,
                cgroup_glob,
            });
        }

        let mut approvers: Vec<Approver> = Vec::with_capacity(raw.approver.len());
        for a in &raw.approver {
            let name = self.name("approver", &a.name)?;
            let uid = match u32::try_from(*a.uid.get_ref()) {
                Ok(u) => u,
                Err(_) => {
                    return self.err(
                        a.uid.span(),
                        format!("approver uid {} is out of range", a.uid.get_ref()),
                    );
                }
            };
            if let Some(first) = approvers.iter().find(|x| x.name == name || x.uid == uid) {
                return self.err(
                    a.name.span(),
                    format!(
                        "approver {name:?} (uid {uid}) repeats approver {:?} (uid {}): two approvals must come from two people",
                        first.name, first.uid
                    ),
                );
            }
            let tenants = match &a.tenants {
                None => None,
                Some(list) => {
                    let mut out = Vec::with_capacity(list.len());
                    for t in list {
                        if !seen_tenants.contains_key(t.get_ref()) {
                            return self.err(
                                t.span(),
                                format!("tenant {:?} is not declared", t.get_ref()),
                            );
                        }
                        out.push(t.get_ref().clone());
                    }
                    Some(out)
                }
            };
            approvers.push(Approver { name, uid, tenants });
        }

        Ok(Policy {
            default_mode,
            tenants,
            tools,
            agents,
            approvers,
            source_hash: fnv1a_hex(self.text.as_bytes()),
            origin: self.origin.to_string(),
        })
    }

    fn name(&self, kind: &str, name: &Spanned<String>) -> Result<String, PolicyError> {
        match check_name(kind, name.get_ref()) {
            Ok(()) => Ok(name.get_ref().clone()),
            Err(reason) => self.err(name.span(), reason),
        }
    }

    fn tool(&self, t: &raw::RawTool) -> Result<Tool, PolicyError> {
        let name = self.name("tool", &t.name)?;
        let mut endpoints = Vec::with_capacity(t.endpoints.len());
        let mut endpoint_locations = Vec::with_capacity(t.endpoints.len());
        for e in &t.endpoints {
            endpoints.push(self.endpoint(e)?);
            endpoint_locations.push(self.loc(e.span()));
        }
        let rate_limit = match &t.rate_limit {
            Some(r) => Some(self.rate_limit(r.get_ref())?),
            None => None,
        };
        let approval = match &t.approval {
            Some(a) if a.get_ref() == "two-person" => Some(Approval::TwoPerson),
            Some(a) => {
                return self.err(
                    a.span(),
                    format!(
                        "unknown approval {:?} (expected \"two-person\")",
                        a.get_ref()
                    ),
                );
            }
            None => None,
        };
        let approval_ttl = match &t.approval_ttl {
            None => DEFAULT_APPROVAL_TTL,
            Some(s) => match humantime::parse_duration(s.get_ref()) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => return self.err(s.span(), "approval_ttl must be longer than zero"),
                Err(e) => {
                    return self.err(
                        s.span(),
                        format!(
                            "approval_ttl {:?} is not a duration ({e}); write e.g. \"10m\"",
                            s.get_ref()
                        ),
                    );
                }
            },
        };
        let approval_uses = match &t.approval_uses {
            None => None,
            Some(u) => match u32::try_from(*u.get_ref()) {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    return self.err(
                        u.span(),
                        format!(
                            "approval_uses {} is out of range (1-{})",
                            u.get_ref(),
                            u32::MAX
                        ),
                    );
                }
            },
        };
        if approval.is_none()
            && let Some(s) = t
                .approval_ttl
                .as_ref()
                .map(|s| s.span())
                .or(t.approval_uses.as_ref().map(|u| u.span()))
        {
            return self.err(
                s,
                "approval_ttl and approval_uses need approval = \"two-person\"",
            );
        }
        Ok(Tool {
            name,
            endpoints,
            rate_limit,
            approval,
            approval_ttl,
            approval_uses,
            endpoint_locations,
        })
    }

    fn rate_limit(&self, r: &raw::RawRateLimit) -> Result<RateLimit, PolicyError> {
        let calls = match u32::try_from(*r.calls.get_ref()) {
            Ok(0) => return self.err(r.calls.span(), "rate_limit calls must be at least 1"),
            Ok(c) => c,
            Err(_) => {
                return self.err(
                    r.calls.span(),
                    format!(
                        "rate_limit calls {} is out of range (1-{})",
                        r.calls.get_ref(),
                        u32::MAX
                    ),
                );
            }
        };
        let per = match humantime::parse_duration(r.per.get_ref()) {
            Ok(d) if d.is_zero() => {
                return self.err(r.per.span(), "rate_limit per must be longer than zero");
            }
            Ok(d) => d,
            Err(e) => {
                return self.err(
                    r.per.span(),
                    format!(
                        "rate_limit per {:?} is not a duration ({e}); write e.g. \"1s\" or \"500ms\"",
                        r.per.get_ref()
                    ),
                );
            }
        };
        Ok(RateLimit { calls, per })
    }

    fn endpoint(&self, e: &Spanned<raw::RawEndpoint>) -> Result<Endpoint, PolicyError> {
        let r = e.get_ref();
        let kinds = [r.cidr.is_some(), r.host.is_some(), r.unix.is_some()];
        match kinds.iter().filter(|k| **k).count() {
            0 => return self.err(e.span(), "endpoint needs one of cidr, host or unix"),
            1 => {}
            _ => {
                return self.err(
                    e.span(),
                    "endpoint has more than one of cidr, host and unix; use one per endpoint",
                );
            }
        }
        if let Some(path) = &r.unix {
            if let Some(p) = &r.port {
                return self.err(p.span(), "port is not used with unix endpoints");
            }
            if let Some(p) = &r.proto {
                return self.err(p.span(), "proto is not used with unix endpoints");
            }
            let p = path.get_ref();
            if let Err(why) = check_unix_path(p) {
                return self.err(path.span(), format!("unix path {p:?} {why}"));
            }
            return Ok(Endpoint::Unix { path: p.clone() });
        }

        let port = match &r.port {
            None => return self.err(e.span(), "endpoint is missing port"),
            Some(p) => match u16::try_from(*p.get_ref()) {
                Ok(0) => return self.err(p.span(), "port 0 is not allowed (use 1-65535)"),
                Ok(v) => v,
                Err(_) => {
                    return self.err(
                        p.span(),
                        format!("port {} is out of range (1-65535)", p.get_ref()),
                    );
                }
            },
        };
        let proto = match r.proto.as_ref().map(|p| (p.get_ref().as_str(), p.span())) {
            None | Some(("tcp", _)) => Proto::Tcp,
            Some(("udp", _)) => Proto::Udp,
            Some((other, span)) => {
                return self.err(
                    span,
                    format!("unknown proto {other:?} (expected \"tcp\" or \"udp\")"),
                );
            }
        };

        if let Some(c) = &r.cidr {
            let net = self.cidr(c)?;
            return Ok(Endpoint::Cidr { net, port, proto });
        }
        match &r.host {
            Some(h) => {
                let name = h.get_ref();
                if name.parse::<IpAddr>().is_ok() {
                    return self.err(
                        h.span(),
                        format!(
                            "host {name:?} is an address; write cidr = \"{name}/{}\"",
                            if name.contains(':') { 128 } else { 32 }
                        ),
                    );
                }
                let valid = !name.is_empty()
                    && name.len() <= 253
                    && name.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    });
                if !valid {
                    return self.err(h.span(), format!("host {name:?} is not a valid DNS name"));
                }
                Ok(Endpoint::Host {
                    name: name.clone(),
                    port,
                    proto,
                })
            }
            None => self.err(e.span(), "endpoint needs one of cidr, host or unix"),
        }
    }

    fn cidr(&self, c: &Spanned<String>) -> Result<ipnet::IpNet, PolicyError> {
        let s = c.get_ref();
        match s.parse::<ipnet::IpNet>() {
            Ok(net) if net.trunc() != net => self.err(
                c.span(),
                format!(
                    "cidr {s:?} has host bits set; did you mean \"{}\"?",
                    net.trunc()
                ),
            ),
            Ok(net) => Ok(net),
            Err(_) => match s.parse::<IpAddr>() {
                Ok(ip) => self.err(
                    c.span(),
                    format!(
                        "cidr {s:?} has no prefix length; write \"{ip}/{}\" for a single address",
                        if ip.is_ipv4() { 32 } else { 128 }
                    ),
                ),
                Err(_) => self.err(
                    c.span(),
                    format!("cidr {s:?} is not a valid CIDR (e.g. \"10.0.0.0/8\")"),
                ),
            },
        }
    }
}
