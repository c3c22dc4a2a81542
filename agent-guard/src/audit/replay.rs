//! `audit replay`: read chains back as a filtered timeline, a process /
//! delegation tree, or re-judged under another policy (`--what-if`).

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::{BufRead, BufReader},
    net::IpAddr,
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::{AuditRecord, NODE_LOG, chain_dirs, chain_files};
use crate::policy::{CompiledAgent, CompiledPolicy, Mode, ToolEndpoint};

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no audit chain for tenant {0:?} in {1}")]
    NoTenant(String, PathBuf),
}

/// Which records to show. Gap records pass every filter but tenant and
/// time, so a responder sees where events were lost.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tenant: Option<String>,
    /// Matches the agent and its sub-agents (any element of the subject
    /// chain after the tenant).
    pub agent: Option<String>,
    pub pid: Option<u32>,
    /// RFC 3339 UTC with nanoseconds, as records store `ts` (so a string
    /// comparison orders them).
    pub since: Option<String>,
    pub until: Option<String>,
    pub verdict: Option<String>,
    pub tool: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &AuditRecord) -> bool {
        if self
            .since
            .as_ref()
            .is_some_and(|s| r.ts.as_str() < s.as_str())
            || self
                .until
                .as_ref()
                .is_some_and(|u| r.ts.as_str() > u.as_str())
        {
            return false;
        }
        if r.kind == "gap" {
            return true;
        }
        if let Some(a) = &self.agent {
            let in_chain = r
                .subject
                .as_deref()
                .is_some_and(|s| s.split('/').skip(1).any(|part| part == a));
            if !in_chain && r.agent.as_deref() != Some(a) {
                return false;
            }
        }
        if self.pid.is_some() && r.pid != self.pid {
            return false;
        }
        if self.verdict.is_some() && r.verdict != self.verdict {
            return false;
        }
        if self.tool.is_some() && r.tool != self.tool {
            return false;
        }
        true
    }
}

/// What reading produced besides records.
#[derive(Debug, Default)]
pub struct ReadStats {
    pub scanned: u64,
    /// Lines that are not records (torn lines); `audit verify` explains them.
    pub unreadable: u64,
}

/// Reads matching records of the selected chains (every tenant, or
/// `filter.tenant`; `_node` only when asked for by name), each chain in
/// order, the chains merged by time.
pub fn read(
    audit_dir: &Path,
    filter: &Filter,
) -> Result<(Vec<AuditRecord>, ReadStats), ReplayError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReplayError::Io { path, source }
    };
    let dirs = chain_dirs(audit_dir).map_err(io(audit_dir))?;
    let selected: Vec<_> = dirs
        .into_iter()
        .filter(|(name, _)| match &filter.tenant {
            Some(t) => name == t,
            None => name != NODE_LOG,
        })
        .collect();
    if let Some(t) = &filter.tenant
        && selected.is_empty()
    {
        return Err(ReplayError::NoTenant(t.clone(), audit_dir.to_path_buf()));
    }
    let mut out = Vec::new();
    let mut stats = ReadStats::default();
    let mut buf = Vec::with_capacity(4096);
    for (_, dir) in &selected {
        for (_, path) in chain_files(dir).map_err(io(dir))? {
            let f = File::open(&path).map_err(io(&path))?;
            let mut reader = BufReader::with_capacity(1 << 20, f);
            loop {
                buf.clear();
                if reader.read_until(b'\n', &mut buf).map_err(io(&path))? == 0 {
                    break;
                }
                stats.scanned += 1;
                match serde_json::from_slice::<AuditRecord>(buf.trim_ascii_end()) {
                    Ok(r) if filter.matches(&r) => out.push(r),
                    Ok(_) => {}
                    Err(_) => stats.unreadable += 1,
                }
            }
        }
    }
    if selected.len() > 1 {
        out.sort_by(|a, b| a.ts.cmp(&b.ts));
    }
    Ok((out, stats))
}

/// `dst:port/proto`, with brackets around IPv6 addresses; `unix:PATH` for
/// a Unix socket, `dns:NAME` for a per-agent DNS query.
pub fn destination(r: &AuditRecord) -> String {
    if let Some(p @ ("unix" | "dns")) = r.proto.as_deref() {
        return format!("{p}:{}", r.dst.as_deref().unwrap_or("?"));
    }
    match (&r.dst, r.port) {
        (Some(d), Some(p)) if d.contains(':') => {
            format!("[{d}]:{p}/{}", r.proto.as_deref().unwrap_or("?"))
        }
        (Some(d), Some(p)) => format!("{d}:{p}/{}", r.proto.as_deref().unwrap_or("?")),
        _ => r.proto.clone().unwrap_or_default(),
    }
}

/// Short description of a gap record's losses.
pub fn lost_summary(r: &AuditRecord) -> String {
    let lost = r
        .lost
        .as_ref()
        .map(|l| {
            l.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    format!("lost {lost}")
}

/// A process node of the tree.
#[derive(Debug, Default)]
pub struct ProcNode<'a> {
    pub pid: u32,
    pub ppid: Option<u32>,
    pub comm: Option<&'a str>,
    pub exe: Option<&'a str>,
    pub records: Vec<&'a AuditRecord>,
}

/// Records grouped as tenant -> subject chain -> pid, each in order; gap
/// records per tenant.
#[derive(Debug, Default)]
pub struct Tree<'a> {
    pub tenants: BTreeMap<&'a str, TenantNode<'a>>,
}

#[derive(Debug, Default)]
pub struct TenantNode<'a> {
    pub gaps: Vec<&'a AuditRecord>,
    /// Subject chains sorted, so a sub-agent follows its parent.
    pub subjects: BTreeMap<&'a str, Vec<ProcNode<'a>>>,
}

pub fn tree(records: &[AuditRecord]) -> Tree<'_> {
    let mut t = Tree::default();
    let mut index: HashMap<(&str, &str, u32), usize> = HashMap::new();
    for r in records {
        let tenant = r.tenant.as_deref().unwrap_or("?");
        let node = t.tenants.entry(tenant).or_default();
        if r.kind == "gap" {
            node.gaps.push(r);
            continue;
        }
        let (Some(subject), Some(pid)) = (r.subject.as_deref(), r.pid) else {
            continue;
        };
        let procs = node.subjects.entry(subject).or_default();
        let i = *index.entry((tenant, subject, pid)).or_insert_with(|| {
            procs.push(ProcNode {
                pid,
                ..ProcNode::default()
            });
            procs.len() - 1
        });
        let p = &mut procs[i];
        p.ppid = p.ppid.or(r.ppid);
        if r.kind == "exec" || p.comm.is_none() {
            p.comm = r.comm.as_deref().or(p.comm);
        }
        if r.kind == "exec" || p.exe.is_none() {
            p.exe = r.exe.as_deref().or(p.exe);
        }
        p.records.push(r);
    }
    t
}

/// How a recorded call fares under another policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    /// `allow`, `deny` or `would_deny`.
    pub verdict: &'static str,
    pub tool: Option<String>,
    pub reason: &'static str,
}

/// One call whose verdict would change.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    pub record: &'a AuditRecord,
    pub now: Judgement,
}

#[derive(Debug, Default)]
pub struct WhatIfSummary {
    pub judged: u64,
    pub allow_to_deny: u64,
    pub deny_to_allow: u64,
    pub other_changes: u64,
    /// Calls whose recorded verdict came from a grant: judged by the base
    /// policy only.
    pub granted: u64,
}

/// Re-judges connect/sendmsg records under a compiled policy, the way the
/// kernel does: the (tenant, root agent) capability set, longest matching
/// prefix, IPv4 as v4-mapped IPv6.
pub struct WhatIf {
    policy: CompiledPolicy,
}

impl WhatIf {
    pub fn new(policy: CompiledPolicy) -> Self {
        Self { policy }
    }

    pub fn judge(&self, r: &AuditRecord) -> Option<Judgement> {
        if r.kind != "connect" && r.kind != "sendmsg" {
            return None;
        }
        // Not a policy decision: the control socket and the per-agent DNS
        // proxy are always reachable.
        if matches!(r.reason.as_deref(), Some("control_socket" | "dns_proxied")) {
            return None;
        }
        let tenant = r.tenant.as_deref()?;
        let root = r
            .subject
            .as_deref()
            .and_then(|s| s.split('/').nth(1))
            .or(r.agent.as_deref())?;
        if r.proto.as_deref() == Some("unix") {
            return self.judge_unix(tenant, root, r.dst.as_deref()?);
        }
        let addr: IpAddr = r.dst.as_deref()?.parse().ok()?;
        let port = r.port?;
        let proto = match r.proto.as_deref()? {
            "tcp" => 6,
            "udp" => 17,
            other => other.parse().ok()?,
        };
        let key = match addr {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let agent = match self.agent(tenant, root) {
            Ok(a) => a,
            Err(j) => return Some(j),
        };
        let mut best: Option<(u8, u32)> = None;
        for &tool_id in &agent.tool_ids {
            let Some(eps) = usize::try_from(tool_id)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| self.policy.tool_endpoints.get(i))
            else {
                continue;
            };
            for ep in eps {
                if ep.proto == proto
                    && ep.port == port
                    && prefix_match(ep, &key)
                    && best.is_none_or(|(len, _)| ep.prefix_len > len)
                {
                    best = Some((ep.prefix_len, tool_id));
                }
            }
        }
        Some(match best {
            Some((_, tool_id)) => self.covered(tool_id),
            None => uncovered(agent),
        })
    }

    /// The policy's root agent of a record, or the verdict for one the
    /// policy no longer has.
    fn agent(&self, tenant: &str, root: &str) -> Result<&CompiledAgent, Judgement> {
        self.policy
            .agent_index(tenant, root)
            .map(|i| &self.policy.agents[i])
            .ok_or(Judgement {
                verdict: "deny",
                tool: None,
                reason: "unknown_subject",
            })
    }

    fn covered(&self, tool_id: u32) -> Judgement {
        Judgement {
            verdict: "allow",
            tool: self.policy.tool_name(tool_id).map(str::to_string),
            reason: "granted",
        }
    }

    /// A Unix socket call: the exact address against the agent's tools'
    /// `unix` endpoints. (The control socket, always reachable, is judged
    /// as the policy sees it: not covered by a tool.)
    fn judge_unix(&self, tenant: &str, root: &str, dst: &str) -> Option<Judgement> {
        let agent = match self.agent(tenant, root) {
            Ok(a) => a,
            Err(j) => return Some(j),
        };
        let key = crate::policy::unix_key(dst);
        let tool = agent.tool_ids.iter().copied().find(|&id| {
            usize::try_from(id)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| self.policy.tool_unix.get(i))
                .is_some_and(|paths| paths.contains(&key))
        });
        Some(match tool {
            Some(id) => self.covered(id),
            None => uncovered(agent),
        })
    }

    /// Judges every record; returns the changed calls and a summary.
    pub fn run<'a>(&self, records: &'a [AuditRecord]) -> (Vec<Change<'a>>, WhatIfSummary) {
        let mut changes = Vec::new();
        let mut sum = WhatIfSummary::default();
        for r in records {
            let Some(now) = self.judge(r) else {
                continue;
            };
            sum.judged += 1;
            if r.grant.is_some() {
                sum.granted += 1;
            }
            let was = r.verdict.as_deref().unwrap_or("");
            if was == now.verdict {
                continue;
            }
            // `would_deny` let the call through.
            let was_allowed = was != "deny";
            let now_allowed = now.verdict != "deny";
            match (was_allowed, now_allowed) {
                (true, false) => sum.allow_to_deny += 1,
                (false, true) => sum.deny_to_allow += 1,
                _ => sum.other_changes += 1,
            }
            changes.push(Change { record: r, now });
        }
        (changes, sum)
    }
}

/// No tool covers the call: refused, or reported under monitor mode.
fn uncovered(agent: &CompiledAgent) -> Judgement {
    Judgement {
        verdict: match agent.mode {
            Mode::Enforce => "deny",
            Mode::Monitor => "would_deny",
        },
        tool: None,
        reason: "no_capability",
    }
}

fn prefix_match(ep: &ToolEndpoint, key: &[u8; 16]) -> bool {
    let bits = u128::from_be_bytes(*key);
    let net = u128::from_be_bytes(ep.addr);
    let len = u32::from(ep.prefix_len.min(128));
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    bits & mask == net & mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn call(agent_chain: &str, dst: &str, port: u16, verdict: &str) -> AuditRecord {
        let mut r = AuditRecord::new("connect");
        r.ts = "2026-01-01T00:00:00.000000000Z".into();
        r.tenant = Some("acme".into());
        r.agent = agent_chain.rsplit('/').next().map(str::to_string);
        r.subject = Some(format!("acme/{agent_chain}"));
        r.pid = Some(7);
        r.dst = Some(dst.into());
        r.port = Some(port);
        r.proto = Some("tcp".into());
        r.verdict = Some(verdict.into());
        r
    }

    const POLICY: &str = r#"
default_mode = "enforce"
[[tenant]]
name = "acme"
[[tool]]
name = "search"
endpoints = [{ cidr = "127.0.0.0/8", port = 80 }]
[[tool]]
name = "search-local"
endpoints = [{ cidr = "127.0.0.1/32", port = 80 }]
[[agent]]
tenant = "acme"
name = "researcher"
tools = ["search", "search-local"]
"#;

    #[test]
    fn destinations_print_by_kind() {
        let mut r = call("researcher", "::1", 443, "allow");
        assert_eq!(destination(&r), "[::1]:443/tcp");
        r.dst = Some("/run/proxy.sock".into());
        r.port = None;
        r.proto = Some("unix".into());
        assert_eq!(destination(&r), "unix:/run/proxy.sock");
        r.dst = Some("api.example".into());
        r.proto = Some("dns".into());
        assert_eq!(destination(&r), "dns:api.example");
    }

    #[test]
    fn what_if_judges_unix_socket_calls_by_exact_path() {
        let policy = format!(
            "{POLICY}[[tool]]\nname = \"proxy\"\nendpoints = [{{ unix = \"/run/proxy.sock\" }}, {{ unix = \"@px\" }}]\n"
        )
        .replace(r#"tools = ["search", "search-local"]"#, r#"tools = ["search", "proxy"]"#);
        let w = WhatIf::new(
            Policy::from_str(&policy, "p.toml")
                .expect("policy")
                .compile()
                .expect("compile"),
        );
        let unix = |dst: &str| {
            let mut r = call("researcher", dst, 0, "deny");
            r.port = None;
            r.proto = Some("unix".into());
            r
        };
        let j = w.judge(&unix("/run/proxy.sock")).expect("judged");
        assert_eq!((j.verdict, j.tool.as_deref()), ("allow", Some("proxy")));
        assert_eq!(w.judge(&unix("@px")).expect("judged").verdict, "allow");
        let j = w.judge(&unix("/run//proxy.sock")).expect("judged");
        assert_eq!((j.verdict, j.reason), ("deny", "no_capability"));
    }

    #[test]
    fn what_if_matches_like_the_kernel() {
        let w = WhatIf::new(
            Policy::from_str(POLICY, "p.toml")
                .expect("policy")
                .compile()
                .expect("compile"),
        );
        let j = w
            .judge(&call("researcher", "127.0.0.1", 80, "deny"))
            .expect("judged");
        assert_eq!(j.verdict, "allow");
        assert_eq!(
            j.tool.as_deref(),
            Some("search-local"),
            "longest prefix wins"
        );
        let j = w
            .judge(&call(
                "researcher/summarizer",
                "::ffff:127.0.0.9",
                80,
                "deny",
            ))
            .expect("judged");
        assert_eq!(
            (j.verdict, j.tool.as_deref()),
            ("allow", Some("search")),
            "v4-mapped, root agent"
        );
        let j = w
            .judge(&call("researcher", "127.0.0.1", 81, "allow"))
            .expect("judged");
        assert_eq!(j.verdict, "deny");
        let j = w
            .judge(&call("writer", "127.0.0.1", 80, "allow"))
            .expect("judged");
        assert_eq!(j.reason, "unknown_subject");

        let recs = vec![
            call("researcher", "127.0.0.1", 80, "allow"),
            call("researcher", "127.0.0.1", 81, "allow"),
            call("researcher", "127.0.0.1", 80, "deny"),
        ];
        let (changes, sum) = w.run(&recs);
        assert_eq!(changes.len(), 2);
        assert_eq!(
            (sum.judged, sum.allow_to_deny, sum.deny_to_allow),
            (3, 1, 1)
        );
    }

    #[test]
    fn filters_select_agent_subtree_pid_verdict_and_time() {
        let mut a = call("researcher", "127.0.0.1", 80, "allow");
        let mut b = call("researcher/summarizer", "127.0.0.1", 81, "deny");
        b.pid = Some(8);
        b.ts = "2026-01-01T00:00:10.000000000Z".into();
        let c = call("writer", "127.0.0.1", 80, "allow");
        let mut gap = AuditRecord::new("gap");
        gap.ts = a.ts.clone();
        a.tool = Some("search".into());
        let f = Filter {
            agent: Some("researcher".into()),
            ..Filter::default()
        };
        assert!(f.matches(&a) && f.matches(&b) && !f.matches(&c) && f.matches(&gap));
        let f = Filter {
            agent: Some("summarizer".into()),
            ..Filter::default()
        };
        assert!(!f.matches(&a) && f.matches(&b));
        let f = Filter {
            pid: Some(8),
            verdict: Some("deny".into()),
            ..Filter::default()
        };
        assert!(!f.matches(&a) && f.matches(&b));
        let f = Filter {
            since: Some("2026-01-01T00:00:05.000000000Z".into()),
            ..Filter::default()
        };
        assert!(!f.matches(&a) && f.matches(&b) && !f.matches(&gap));
        let f = Filter {
            tool: Some("search".into()),
            ..Filter::default()
        };
        assert!(f.matches(&a) && !f.matches(&b));

        let recs = vec![a, b, c, gap];
        let t = tree(&recs);
        let acme = &t.tenants["acme"];
        assert_eq!(
            acme.subjects.keys().copied().collect::<Vec<_>>(),
            vec![
                "acme/researcher",
                "acme/researcher/summarizer",
                "acme/writer"
            ]
        );
        assert_eq!(t.tenants["?"].gaps.len(), 1);
    }
}
