//! Serde shapes of the policy file exactly as written. Every scalar a user can
//! get wrong is kept as a loosely typed `Spanned` value so that validation (in
//! `mod.rs`) can point at its line and explain the problem in our own words
//! instead of serde's.
//!
//! The same types give the `AgentGuardPolicy` CRD its `spec` schema
//! (`JsonSchema`, see `crd.rs`): a `Spanned<T>` is described as `T`, and the
//! doc comments on fields become the schema's descriptions (`kubectl
//! explain`). The derive adds no serde behaviour.

use schemars::JsonSchema;
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    /// Mode of agents that do not set one: "enforce" (refuse what no capability covers; the default) or "monitor" (allow, record would_deny).
    #[schemars(with = "Option<String>")]
    pub default_mode: Option<Spanned<String>>,
    /// Tenants: the top of every identity and one audit chain each.
    #[serde(default)]
    pub tenant: Vec<RawTenant>,
    /// Tools: named sets of endpoints agents may be given.
    #[serde(default)]
    pub tool: Vec<RawTool>,
    /// Agents: (tenant, name) with their base tool set.
    #[serde(default)]
    pub agent: Vec<RawAgent>,
    /// People who may decide two-person approval requests.
    #[serde(default)]
    pub approver: Vec<RawApprover>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApprover {
    /// Who this is (a name for the audit trail).
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// The uid that runs `agent-guard approve`.
    #[schemars(with = "i64")]
    pub uid: Spanned<i64>,
    /// Tenants whose requests this approver may decide; absent = all.
    #[schemars(with = "Option<Vec<String>>")]
    pub tenants: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    /// Tenant name: [a-z0-9][a-z0-9._-]{0,62}.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Public keys (`ed25519:<64 hex>`) whose launch tokens may start this tenant's agents.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub token_keys: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTool {
    /// Tool name: [a-z0-9][a-z0-9._-]{0,62}.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Where the tool is: each entry has one of cidr, host or unix.
    #[schemars(with = "Vec<RawEndpoint>")]
    pub endpoints: Vec<Spanned<RawEndpoint>>,
    /// Calls allowed per agent and period.
    #[schemars(with = "Option<RawRateLimit>")]
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    /// "two-person": every use needs a second person's approval.
    #[schemars(with = "Option<String>")]
    pub approval: Option<Spanned<String>>,
    /// Life of the grant an approval makes, e.g. "10m" (default 10m).
    #[schemars(with = "Option<String>")]
    pub approval_ttl: Option<Spanned<String>>,
    /// Uses of the grant an approval makes (default: no count).
    #[schemars(with = "Option<i64>")]
    pub approval_uses: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoint {
    /// Addresses, e.g. "10.0.0.0/8" or "::1/128".
    #[schemars(with = "Option<String>")]
    pub cidr: Option<Spanned<String>>,
    /// A DNS name, resolved by the daemon and kept fresh.
    #[schemars(with = "Option<String>")]
    pub host: Option<Spanned<String>>,
    /// A Unix socket: an absolute path, or @name for an abstract one.
    #[schemars(with = "Option<String>")]
    pub unix: Option<Spanned<String>>,
    /// Port 1-65535 (cidr and host endpoints).
    #[schemars(with = "Option<i64>")]
    pub port: Option<Spanned<i64>>,
    /// "tcp" (default) or "udp".
    #[schemars(with = "Option<String>")]
    pub proto: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    /// Calls allowed per period (at least 1).
    #[schemars(with = "i64")]
    pub calls: Spanned<i64>,
    /// The period, e.g. "1s" or "500ms".
    #[schemars(with = "String")]
    pub per: Spanned<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    /// The declared tenant this agent belongs to.
    #[schemars(with = "String")]
    pub tenant: Spanned<String>,
    /// Agent name: [a-z0-9][a-z0-9._-]{0,62}.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Names of the tools the agent may always reach (its base capability set).
    #[schemars(with = "Vec<String>")]
    pub tools: Vec<Spanned<String>>,
    /// "enforce" or "monitor"; default: default_mode.
    #[schemars(with = "Option<String>")]
    pub mode: Option<Spanned<String>>,
    /// How deep sub-agents may nest (0-8, default 2).
    #[schemars(with = "Option<i64>")]
    pub max_delegation_depth: Option<Spanned<i64>>,
    /// "strict" (default: seccomp and no-new-privs for the agent process) or "off".
    #[schemars(with = "Option<String>")]
    pub hardening: Option<Spanned<String>>,
    /// What to do when a task keeps calling outside its declared tools.
    #[schemars(with = "Option<RawOnDivergence>")]
    pub on_divergence: Option<Spanned<RawOnDivergence>>,
    /// Processes in cgroups matching this pattern (under the cgroup2 mount, * within one component) are this agent.
    #[schemars(with = "Option<String>")]
    pub cgroup_glob: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOnDivergence {
    /// Act on the N-th divergent call (at least 1).
    #[schemars(with = "i64")]
    pub after: Spanned<i64>,
    /// "revoke" (the task's capabilities) or "suspend" (the whole agent).
    #[schemars(with = "String")]
    pub action: Spanned<String>,
}
