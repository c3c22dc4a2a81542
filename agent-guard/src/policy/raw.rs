//! Serde shapes of the policy file exactly as written. Every scalar a user can
//! get wrong is kept as a loosely typed `Spanned` value so that validation (in
//! `mod.rs`) can point at its line and explain the problem in our own words
//! instead of serde's.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub default_mode: Option<Spanned<String>>,
    #[serde(default)]
    pub tenant: Vec<RawTenant>,
    #[serde(default)]
    pub tool: Vec<RawTool>,
    #[serde(default)]
    pub agent: Vec<RawAgent>,
    #[serde(default)]
    pub approver: Vec<RawApprover>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApprover {
    pub name: Spanned<String>,
    pub uid: Spanned<i64>,
    /// Tenants whose requests this approver may decide; absent = all.
    pub tenants: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    pub name: Spanned<String>,
    #[serde(default)]
    pub token_keys: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTool {
    pub name: Spanned<String>,
    pub endpoints: Vec<Spanned<RawEndpoint>>,
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    pub approval: Option<Spanned<String>>,
    pub approval_ttl: Option<Spanned<String>>,
    pub approval_uses: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoint {
    pub cidr: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub unix: Option<Spanned<String>>,
    pub port: Option<Spanned<i64>>,
    pub proto: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub calls: Spanned<i64>,
    pub per: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub tenant: Spanned<String>,
    pub name: Spanned<String>,
    pub tools: Vec<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    pub max_delegation_depth: Option<Spanned<i64>>,
    pub hardening: Option<Spanned<String>>,
    pub on_divergence: Option<Spanned<RawOnDivergence>>,
    pub cgroup_glob: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOnDivergence {
    pub after: Spanned<i64>,
    pub action: Spanned<String>,
}
