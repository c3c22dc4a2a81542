//! Lowering of a validated [`Policy`] to the flat tables the kernel-map writer
//! loads.

use std::collections::HashSet;

use super::{DEFAULT_MAX_DELEGATION_DEPTH, Endpoint, Hardening, Mode, Policy, PolicyError};

/// Policy flattened to numeric ids. Ids are 1-based positions in declaration
/// order (0 means "none" in the maps), so they are stable as long as the file
/// only appends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// `tenants[i]` has tenant id `i + 1`.
    pub tenants: Vec<String>,
    /// `tools[i]` has tool id `i + 1`.
    pub tools: Vec<String>,
    /// In declaration order; `CompiledRule::agent_index` indexes this.
    pub agents: Vec<CompiledAgent>,
    pub rules: Vec<CompiledRule>,
    /// `tool_endpoints[i]`: the kernel keys of tool id `i + 1`, for
    /// capability sets built at run time (grants, tasks, sub-agents).
    pub tool_endpoints: Vec<Vec<ToolEndpoint>>,
    /// `tool_hosts[i]`: names of tool id `i + 1` that the daemon resolves
    /// and installs as address entries.
    pub tool_hosts: Vec<Vec<HostEndpoint>>,
    /// `tool_unix[i]`: Unix socket addresses of tool id `i + 1`, as the
    /// kernel compares them (a path's bytes, or `\0name` for an abstract
    /// socket).
    pub tool_unix: Vec<Vec<Vec<u8>>>,
    /// `tool_limits[i]`: rate limit of tool id `i + 1` as (calls, per).
    pub tool_limits: Vec<Option<(u32, std::time::Duration)>>,
}

/// A named endpoint: resolved by the daemon, kept fresh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostEndpoint {
    pub name: String,
    pub port: u16,
    pub proto: u8,
}

/// One endpoint of a tool in kernel form (see [`CompiledRule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ToolEndpoint {
    pub proto: u8,
    pub port: u16,
    pub addr: [u8; 16],
    pub prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledAgent {
    pub tenant_id: u32,
    pub tenant: String,
    pub name: String,
    /// Already resolved against `default_mode`.
    pub mode: Mode,
    pub hardening: Hardening,
    /// Defaults to [`DEFAULT_MAX_DELEGATION_DEPTH`].
    pub max_delegation_depth: u8,
    /// Tool ids in the order listed, without repeats.
    pub tool_ids: Vec<u32>,
}

/// One allowed (agent, destination) pair. Addresses are always in 128-bit form
/// so the kernel needs a single LPM trie: IPv4 is v4-mapped (`::ffff:a.b.c.d`)
/// and its prefix length is shifted by 96.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledRule {
    pub agent_index: usize,
    pub tool_id: u32,
    /// IP protocol number: 6 tcp, 17 udp.
    pub proto: u8,
    pub port: u16,
    pub addr: [u8; 16],
    pub prefix_len: u8,
}

impl CompiledPolicy {
    pub fn tenant_id(&self, name: &str) -> Option<u32> {
        position_id(&self.tenants, name)
    }

    pub fn tool_id(&self, name: &str) -> Option<u32> {
        position_id(&self.tools, name)
    }

    /// Name for a tool id (for audit and metrics), `None` for 0 or unknown.
    pub fn tool_name(&self, id: u32) -> Option<&str> {
        let idx = usize::try_from(id).ok()?.checked_sub(1)?;
        self.tools.get(idx).map(String::as_str)
    }

    pub fn agent_index(&self, tenant: &str, name: &str) -> Option<usize> {
        self.agents
            .iter()
            .position(|a| a.tenant == tenant && a.name == name)
    }
}

fn position_id(names: &[String], name: &str) -> Option<u32> {
    let idx = names.iter().position(|n| n == name)?;
    u32::try_from(idx + 1).ok()
}

impl Policy {
    /// Compiles to map entries. `host` endpoints become names for the
    /// daemon to resolve (`tool_hosts`); `unix` endpoints become socket
    /// addresses the daemon gives path ids (`tool_unix`).
    ///
    /// Rules are de-duplicated per agent: when the same tool is listed twice,
    /// or two tools share an identical endpoint (same proto, port, network),
    /// only the first rule is kept, so the first listed tool wins attribution.
    pub fn compile(&self) -> Result<CompiledPolicy, PolicyError> {
        let tenants: Vec<String> = self.tenants.iter().map(|t| t.name.clone()).collect();
        let tools: Vec<String> = self.tools.iter().map(|t| t.name.clone()).collect();
        let mut agents = Vec::with_capacity(self.agents.len());
        let mut rules = Vec::new();
        let mut seen_rules: HashSet<(usize, u8, u16, [u8; 16], u8)> = HashSet::new();

        for (agent_index, agent) in self.agents.iter().enumerate() {
            // Validation guarantees both lookups succeed; 0 ("none") would
            // only ever grant nothing.
            let tenant_id = position_id(&tenants, &agent.tenant).unwrap_or(0);
            let mut tool_ids = Vec::with_capacity(agent.tools.len());
            for name in &agent.tools {
                let Some(id) = position_id(&tools, name) else {
                    continue;
                };
                if tool_ids.contains(&id) {
                    continue;
                }
                tool_ids.push(id);
                let Some(tool) = self.tool(name) else {
                    continue;
                };
                for ep in &tool.endpoints {
                    let Endpoint::Cidr { net, port, proto } = ep else {
                        continue;
                    };
                    let (addr, prefix_len) = kernel_net(net);
                    let proto = proto.as_ipproto();
                    if seen_rules.insert((agent_index, proto, *port, addr, prefix_len)) {
                        rules.push(CompiledRule {
                            agent_index,
                            tool_id: id,
                            proto,
                            port: *port,
                            addr,
                            prefix_len,
                        });
                    }
                }
            }
            agents.push(CompiledAgent {
                tenant_id,
                tenant: agent.tenant.clone(),
                name: agent.name.clone(),
                mode: agent.effective_mode(self),
                hardening: agent.hardening,
                max_delegation_depth: agent
                    .max_delegation_depth
                    .unwrap_or(DEFAULT_MAX_DELEGATION_DEPTH),
                tool_ids,
            });
        }

        let tool_endpoints = self
            .tools
            .iter()
            .map(|tool| {
                let mut eps: Vec<ToolEndpoint> = Vec::new();
                for ep in &tool.endpoints {
                    if let Endpoint::Cidr { net, port, proto } = ep {
                        let (addr, prefix_len) = kernel_net(net);
                        let e = ToolEndpoint {
                            proto: proto.as_ipproto(),
                            port: *port,
                            addr,
                            prefix_len,
                        };
                        if !eps.contains(&e) {
                            eps.push(e);
                        }
                    }
                }
                eps
            })
            .collect();
        let tool_hosts = self
            .tools
            .iter()
            .map(|tool| {
                let mut hosts: Vec<HostEndpoint> = Vec::new();
                for ep in &tool.endpoints {
                    if let Endpoint::Host { name, port, proto } = ep {
                        let h = HostEndpoint {
                            name: name.clone(),
                            port: *port,
                            proto: proto.as_ipproto(),
                        };
                        if !hosts.contains(&h) {
                            hosts.push(h);
                        }
                    }
                }
                hosts
            })
            .collect();
        let tool_unix = self
            .tools
            .iter()
            .map(|tool| {
                let mut paths: Vec<Vec<u8>> = Vec::new();
                for ep in &tool.endpoints {
                    if let Endpoint::Unix { path } = ep {
                        let k = unix_key(path);
                        if !paths.contains(&k) {
                            paths.push(k);
                        }
                    }
                }
                paths
            })
            .collect();
        let tool_limits = self
            .tools
            .iter()
            .map(|t| t.rate_limit.as_ref().map(|r| (r.calls, r.per)))
            .collect();
        Ok(CompiledPolicy {
            tenants,
            tools,
            agents,
            rules,
            tool_endpoints,
            tool_hosts,
            tool_unix,
            tool_limits,
        })
    }
}

/// A Unix socket address as the kernel hook compares it: `@name` (an
/// abstract socket) becomes `\0name`, a path its bytes.
pub fn unix_key(path: &str) -> Vec<u8> {
    match path.strip_prefix('@') {
        Some(name) => {
            let mut k = vec![0u8];
            k.extend_from_slice(name.as_bytes());
            k
        }
        None => path.as_bytes().to_vec(),
    }
}

/// How a Unix socket address prints in audit records and status:
/// `@name` for an abstract socket (NULs inside shown as `@`), else the path.
pub fn unix_display(key: &[u8]) -> String {
    match key.split_first() {
        Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest).replace('\0', "@")),
        _ => String::from_utf8_lossy(key).into_owned(),
    }
}

/// A network as the kernel keys it: 128-bit address, IPv4 v4-mapped with
/// its prefix shifted by 96.
fn kernel_net(net: &ipnet::IpNet) -> ([u8; 16], u8) {
    match net {
        ipnet::IpNet::V4(n) => (n.network().to_ipv6_mapped().octets(), 96 + n.prefix_len()),
        ipnet::IpNet::V6(n) => (n.network().octets(), n.prefix_len()),
    }
}
