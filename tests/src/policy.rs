//! A typed builder for the policy TOML the tests hand to [`Daemon::start`]
//! (as `&policy.build()`).
//!
//! ```
//! use agent_guard_tests::{Agent, Endpoint, Policy};
//! let p = Policy::new()
//!     .mode("enforce")
//!     .tenant("acme")
//!     .tool("search", [Endpoint::tcp("127.0.0.1/32", 8080)])
//!     .agent("acme", "researcher", &["search"])
//!     .with_agent(Agent::new("acme", "lab", &["search"]).hardening("off"));
//! assert!(p.build().contains("hardening = \"off\""));
//! ```
//!
//! Entries are written in the order they were added. Only what a test sets
//! is written (no `default_mode` unless [`Policy::mode`] was called), so a
//! built policy means exactly what the equivalent hand-written one did.
//! Broken or unusual input belongs in [`Policy::raw`] or a plain string.
//!
//! [`Daemon::start`]: crate::Daemon::start

use std::fmt;

/// A TOML basic string, quoted.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn quote_list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", items.join(", "))
}

/// One endpoint of a tool, as its inline table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint(String);

impl Endpoint {
    /// `{ cidr = CIDR, port = PORT }` (tcp, the default protocol).
    pub fn tcp(cidr: impl AsRef<str>, port: u16) -> Endpoint {
        Endpoint(format!(
            "{{ cidr = {}, port = {port} }}",
            quote(cidr.as_ref())
        ))
    }

    /// `{ cidr = CIDR, port = PORT, proto = "udp" }`.
    pub fn udp(cidr: impl AsRef<str>, port: u16) -> Endpoint {
        Endpoint(format!(
            "{{ cidr = {}, port = {port}, proto = \"udp\" }}",
            quote(cidr.as_ref())
        ))
    }

    /// `{ unix = PATH }`: a socket path, or an abstract name (`@name`).
    pub fn unix(path: impl AsRef<str>) -> Endpoint {
        Endpoint(format!("{{ unix = {} }}", quote(path.as_ref())))
    }

    /// `{ host = NAME, port = PORT }`: a tool named by DNS.
    pub fn host(name: impl AsRef<str>, port: u16) -> Endpoint {
        Endpoint(format!(
            "{{ host = {}, port = {port} }}",
            quote(name.as_ref())
        ))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A `[[tool]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    rate_limit: Option<(u32, String)>,
    approval: Option<String>,
}

impl Tool {
    pub fn new(name: &str, endpoints: impl IntoIterator<Item = Endpoint>) -> Tool {
        Tool {
            name: name.to_string(),
            endpoints: endpoints.into_iter().collect(),
            rate_limit: None,
            approval: None,
        }
    }

    /// `rate_limit = { calls = CALLS, per = PER }`.
    pub fn rate_limit(mut self, calls: u32, per: &str) -> Tool {
        self.rate_limit = Some((calls, per.to_string()));
        self
    }

    /// `approval = KIND` (e.g. `"two-person"`).
    pub fn approval(mut self, kind: &str) -> Tool {
        self.approval = Some(kind.to_string());
        self
    }

    /// The tool without `endpoint` (for a narrowed reload).
    pub fn without_endpoint(mut self, endpoint: &Endpoint) -> Tool {
        let before = self.endpoints.len();
        self.endpoints.retain(|e| e != endpoint);
        assert_ne!(
            before,
            self.endpoints.len(),
            "tool {} has no endpoint {endpoint}",
            self.name
        );
        self
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "[[tool]]\nname = {}", quote(&self.name))?;
        match self.endpoints.as_slice() {
            [one] => writeln!(f, "endpoints = [{one}]")?,
            many => {
                writeln!(f, "endpoints = [")?;
                for e in many {
                    writeln!(f, "  {e},")?;
                }
                writeln!(f, "]")?;
            }
        }
        if let Some((calls, per)) = &self.rate_limit {
            writeln!(
                f,
                "rate_limit = {{ calls = {calls}, per = {} }}",
                quote(per)
            )?;
        }
        if let Some(a) = &self.approval {
            writeln!(f, "approval = {}", quote(a))?;
        }
        Ok(())
    }
}

/// An `[[agent]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub tenant: String,
    pub name: String,
    pub tools: Vec<String>,
    mode: Option<String>,
    max_delegation_depth: Option<u32>,
    hardening: Option<String>,
    on_divergence: Option<(u32, String)>,
}

impl Agent {
    pub fn new(tenant: &str, name: &str, tools: &[&str]) -> Agent {
        Agent {
            tenant: tenant.to_string(),
            name: name.to_string(),
            tools: tools.iter().map(|t| t.to_string()).collect(),
            mode: None,
            max_delegation_depth: None,
            hardening: None,
            on_divergence: None,
        }
    }

    /// Replaces the agent's tools.
    pub fn tools(mut self, tools: &[&str]) -> Agent {
        self.tools = tools.iter().map(|t| t.to_string()).collect();
        self
    }

    /// `mode = MODE` (`"enforce"` or `"monitor"`).
    pub fn mode(mut self, mode: &str) -> Agent {
        self.mode = Some(mode.to_string());
        self
    }

    /// `max_delegation_depth = DEPTH`.
    pub fn max_delegation_depth(mut self, depth: u32) -> Agent {
        self.max_delegation_depth = Some(depth);
        self
    }

    /// `hardening = LEVEL` (`"off"` tests the kernel hooks alone).
    pub fn hardening(mut self, level: &str) -> Agent {
        self.hardening = Some(level.to_string());
        self
    }

    /// `on_divergence = { after = AFTER, action = ACTION }`.
    pub fn on_divergence(mut self, after: u32, action: &str) -> Agent {
        self.on_divergence = Some((after, action.to_string()));
        self
    }
}

impl fmt::Display for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "[[agent]]\ntenant = {}\nname = {}\ntools = {}",
            quote(&self.tenant),
            quote(&self.name),
            quote_list(&self.tools)
        )?;
        if let Some(m) = &self.mode {
            writeln!(f, "mode = {}", quote(m))?;
        }
        if let Some(d) = self.max_delegation_depth {
            writeln!(f, "max_delegation_depth = {d}")?;
        }
        if let Some(h) = &self.hardening {
            writeln!(f, "hardening = {}", quote(h))?;
        }
        if let Some((after, action)) = &self.on_divergence {
            writeln!(
                f,
                "on_divergence = {{ after = {after}, action = {} }}",
                quote(action)
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Tenant(String),
    Tool(Tool),
    Agent(Agent),
    Raw(String),
}

/// A policy file under construction; [`Policy::build`] (or `Display`)
/// gives its TOML text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    default_mode: Option<String>,
    entries: Vec<Entry>,
}

impl Policy {
    pub fn new() -> Policy {
        Policy::default()
    }

    /// `default_mode = MODE` (not written unless set).
    pub fn mode(mut self, mode: &str) -> Policy {
        self.default_mode = Some(mode.to_string());
        self
    }

    /// A `[[tenant]]`.
    pub fn tenant(mut self, name: &str) -> Policy {
        self.entries.push(Entry::Tenant(name.to_string()));
        self
    }

    /// A `[[tool]]` with only a name and endpoints.
    pub fn tool(self, name: &str, endpoints: impl IntoIterator<Item = Endpoint>) -> Policy {
        self.with_tool(Tool::new(name, endpoints))
    }

    /// A `[[tool]]` with extras (rate limit, approval).
    pub fn with_tool(mut self, tool: Tool) -> Policy {
        self.entries.push(Entry::Tool(tool));
        self
    }

    /// An `[[agent]]` with only its tools.
    pub fn agent(self, tenant: &str, name: &str, tools: &[&str]) -> Policy {
        self.with_agent(Agent::new(tenant, name, tools))
    }

    /// An `[[agent]]` with extras (mode, hardening, delegation depth,
    /// divergence action).
    pub fn with_agent(mut self, agent: Agent) -> Policy {
        self.entries.push(Entry::Agent(agent));
        self
    }

    /// TOML text written as is, in its place among the entries: the escape
    /// hatch for what the builder does not cover.
    pub fn raw(mut self, toml: &str) -> Policy {
        self.entries.push(Entry::Raw(toml.to_string()));
        self
    }

    /// The same policy with tool `name` changed by `f` (it must exist).
    pub fn edit_tool(mut self, name: &str, f: impl FnOnce(Tool) -> Tool) -> Policy {
        let i = self
            .entries
            .iter()
            .position(|e| matches!(e, Entry::Tool(t) if t.name == name))
            .unwrap_or_else(|| panic!("policy has no tool {name:?}"));
        let Entry::Tool(t) = self.entries.remove(i) else {
            unreachable!()
        };
        self.entries.insert(i, Entry::Tool(f(t)));
        self
    }

    /// The same policy with agent `tenant/name` changed by `f` (it must
    /// exist).
    pub fn edit_agent(
        mut self,
        tenant: &str,
        name: &str,
        f: impl FnOnce(Agent) -> Agent,
    ) -> Policy {
        let i = self
            .entries
            .iter()
            .position(|e| matches!(e, Entry::Agent(a) if a.tenant == tenant && a.name == name))
            .unwrap_or_else(|| panic!("policy has no agent {tenant}/{name}"));
        let Entry::Agent(a) = self.entries.remove(i) else {
            unreachable!()
        };
        self.entries.insert(i, Entry::Agent(f(a)));
        self
    }

    /// The TOML text.
    pub fn build(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(m) = &self.default_mode {
            writeln!(f, "default_mode = {}", quote(m))?;
        }
        for e in &self.entries {
            writeln!(f)?;
            match e {
                Entry::Tenant(name) => writeln!(f, "[[tenant]]\nname = {}", quote(name))?,
                Entry::Tool(t) => write!(f, "{t}")?,
                Entry::Agent(a) => write!(f, "{a}")?,
                Entry::Raw(text) => {
                    f.write_str(text)?;
                    if !text.ends_with('\n') {
                        writeln!(f)?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_written_in_order() {
        let p = Policy::new()
            .mode("enforce")
            .tenant("acme")
            .tool("search", [Endpoint::tcp("127.0.0.1/32", 80)])
            .with_tool(
                Tool::new(
                    "mixed",
                    [
                        Endpoint::udp("127.0.0.0/8", 53),
                        Endpoint::unix("/run/x.sock"),
                        Endpoint::host("api.example", 443),
                    ],
                )
                .rate_limit(5, "1h")
                .approval("two-person"),
            )
            .agent("acme", "bot", &[])
            .with_agent(
                Agent::new("acme", "researcher", &["search", "mixed"])
                    .mode("monitor")
                    .max_delegation_depth(1)
                    .hardening("off")
                    .on_divergence(2, "revoke"),
            );
        assert_eq!(
            p.build(),
            r#"default_mode = "enforce"

[[tenant]]
name = "acme"

[[tool]]
name = "search"
endpoints = [{ cidr = "127.0.0.1/32", port = 80 }]

[[tool]]
name = "mixed"
endpoints = [
  { cidr = "127.0.0.0/8", port = 53, proto = "udp" },
  { unix = "/run/x.sock" },
  { host = "api.example", port = 443 },
]
rate_limit = { calls = 5, per = "1h" }
approval = "two-person"

[[agent]]
tenant = "acme"
name = "bot"
tools = []

[[agent]]
tenant = "acme"
name = "researcher"
tools = ["search", "mixed"]
mode = "monitor"
max_delegation_depth = 1
hardening = "off"
on_divergence = { after = 2, action = "revoke" }
"#
        );
        assert_eq!(p.to_string(), p.build());
    }

    #[test]
    fn nothing_unset_is_written_and_strings_are_escaped() {
        let p = Policy::new()
            .tenant("acme")
            .tool("odd", [Endpoint::unix(r#"/tmp/a "b"\c.sock"#)]);
        let text = p.build();
        assert!(!text.contains("default_mode"), "{text}");
        assert!(!text.contains("proto"), "{text}");
        assert!(
            text.contains(r#"endpoints = [{ unix = "/tmp/a \"b\"\\c.sock" }]"#),
            "{text}"
        );
    }

    #[test]
    fn edits_change_one_entry_in_place() {
        let base = Policy::new()
            .tenant("acme")
            .tool(
                "search",
                [
                    Endpoint::tcp("127.0.0.1/32", 1),
                    Endpoint::tcp("::1/128", 1),
                ],
            )
            .tool("payments", [Endpoint::tcp("127.0.0.1/32", 2)])
            .agent("acme", "researcher", &["search"])
            .agent("acme", "writer", &["search"]);
        let edited = base
            .clone()
            .edit_tool("search", |t| {
                t.without_endpoint(&Endpoint::tcp("::1/128", 1))
                    .rate_limit(3, "1m")
            })
            .edit_agent("acme", "writer", |a| a.tools(&["search", "payments"]));
        let text = edited.build();
        assert!(
            text.contains(
                "name = \"search\"\nendpoints = [{ cidr = \"127.0.0.1/32\", port = 1 }]\n\
                 rate_limit = { calls = 3, per = \"1m\" }\n\n[[tool]]\nname = \"payments\""
            ),
            "{text}"
        );
        assert!(
            text.ends_with(
                "name = \"researcher\"\ntools = [\"search\"]\n\n[[agent]]\ntenant = \"acme\"\n\
                 name = \"writer\"\ntools = [\"search\", \"payments\"]\n"
            ),
            "{text}"
        );
        assert!(
            base.build().contains("::1/128"),
            "the original is untouched"
        );
    }

    #[test]
    fn raw_text_stands_in_its_place() {
        let p = Policy::new()
            .tenant("acme")
            .raw("[[bogus]]\nx = 1")
            .agent("acme", "a", &[]);
        assert_eq!(
            p.build(),
            "\n[[tenant]]\nname = \"acme\"\n\n[[bogus]]\nx = 1\n\n[[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = []\n"
        );
    }

    #[test]
    #[should_panic(expected = "no agent acme/ghost")]
    fn editing_a_missing_agent_fails_the_test() {
        let _ = Policy::new().edit_agent("acme", "ghost", |a| a);
    }
}
