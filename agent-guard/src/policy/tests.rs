//! Specification of the policy file, one behaviour per test.

use super::*;

/// INTERFACE.md's example, minus the host endpoint (not yet compilable).
const EXAMPLE: &str = r#"default_mode = "enforce"          # or "monitor"

[[tenant]]
name = "acme"

[[tool]]
name = "search"
endpoints = [
  { cidr = "127.0.0.1/32", port = 18081 },                 # proto defaults to "tcp"
  { cidr = "::1/128", port = 18081, proto = "tcp" },
]
rate_limit = { calls = 100, per = "1s" }                  # optional, per (agent, tool)

[[tool]]
name = "payments"
endpoints = [{ cidr = "127.0.0.1/32", port = 18082 }]
approval = "two-person"                                   # optional: each use needs approval

[[agent]]
tenant = "acme"
name = "researcher"
tools = ["search"]                                        # base capability set
mode = "enforce"                                          # optional, overrides default_mode
max_delegation_depth = 2                                  # optional
"#;

/// Header shared by the bad-input cases: lines 1-6 declare tenant "acme" and
/// tool "search", so a case's own lines start at line 7.
const HEAD: &str = r#"[[tenant]]
name = "acme"

[[tool]]
name = "search"
endpoints = [{ cidr = "10.0.0.0/8", port = 80 }]
"#;

fn parse(text: &str) -> Result<Policy, PolicyError> {
    Policy::from_str(text, "policy.toml")
}

/// Asserts `text` is refused at `line:col` with a reason containing `reason`.
#[track_caller]
fn refused(text: &str, line: usize, col: usize, reason: &str) {
    let msg = match parse(text) {
        Ok(p) => match p.compile() {
            Ok(_) => panic!("accepted, expected error containing {reason:?}:\n{text}"),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    let prefix = format!("policy.toml:{line}:{col}: ");
    assert!(
        msg.starts_with(&prefix),
        "expected prefix {prefix:?}, got {msg:?}"
    );
    assert!(msg.contains(reason), "expected {reason:?} in {msg:?}");
}

fn with_head(rest: &str) -> String {
    format!("{HEAD}{rest}")
}

#[test]
fn interface_example_parses() {
    let p = parse(EXAMPLE).unwrap();
    assert_eq!(p.default_mode, Mode::Enforce);
    assert_eq!(
        p.tenants,
        vec![Tenant {
            name: "acme".into(),
            token_keys: vec![],
        }]
    );
    let search = p.tool("search").unwrap();
    assert_eq!(
        search.endpoints[0],
        Endpoint::Cidr {
            net: "127.0.0.1/32".parse().unwrap(),
            port: 18081,
            proto: Proto::Tcp
        }
    );
    assert_eq!(search.endpoint_locations[1], Location { line: 10, col: 3 });
    assert_eq!(
        search.rate_limit,
        Some(RateLimit {
            calls: 100,
            per: Duration::from_secs(1)
        })
    );
    assert_eq!(
        p.tool("payments").unwrap().approval,
        Some(Approval::TwoPerson)
    );
    let a = p.agent("acme", "researcher").unwrap();
    assert_eq!(a.tools, vec!["search".to_string()]);
    assert_eq!(a.mode, Some(Mode::Enforce));
    assert_eq!(a.max_delegation_depth, Some(2));
    assert_eq!(a.hardening, Hardening::Strict);
    assert!(p.agent("acme", "nobody").is_none());
    assert_eq!(p.source_hash.len(), 16);
    p.compile().unwrap();
}

#[test]
fn default_policy_parses_and_compiles() {
    let p = Policy::default_policy().unwrap();
    assert_eq!(p.default_mode, Mode::Monitor);
    let c = p.compile().unwrap();
    assert_eq!(c.tenants, vec!["acme"]);
    assert_eq!(c.tools, vec!["search", "payments"]);
    assert_eq!(c.agents.len(), 1);
    assert_eq!(c.agents[0].mode, Mode::Monitor);
    assert_eq!(c.agents[0].tool_ids, vec![1]);
    assert_eq!(c.rules.len(), 2);
}

#[test]
fn empty_file_is_an_empty_enforcing_policy() {
    let p = parse("").unwrap();
    assert_eq!(p.default_mode, Mode::Enforce);
    assert!(p.tenants.is_empty() && p.tools.is_empty() && p.agents.is_empty());
}

#[test]
fn effective_mode_falls_back_to_default_mode() {
    let p = parse(&format!(
        "default_mode = \"monitor\"\n{HEAD}[[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = []\n\
         [[agent]]\ntenant = \"acme\"\nname = \"b\"\ntools = []\nmode = \"enforce\"\n"
    ))
    .unwrap();
    assert_eq!(p.agents[0].effective_mode(&p), Mode::Monitor);
    assert_eq!(p.agents[1].effective_mode(&p), Mode::Enforce);
}

#[test]
fn agent_with_no_tools_is_allowed_and_reaches_nothing() {
    let p = parse(&with_head(
        "[[agent]]\ntenant = \"acme\"\nname = \"idle\"\ntools = []\n",
    ))
    .unwrap();
    let c = p.compile().unwrap();
    assert!(c.agents[0].tool_ids.is_empty());
    assert!(c.rules.is_empty());
}

#[test]
fn hardening_off_and_udp_parse() {
    let p = parse(&with_head(
        "[[tool]]\nname = \"dns\"\nendpoints = [{ cidr = \"10.0.0.53/32\", port = 53, proto = \"udp\" }]\n\
         [[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = [\"dns\"]\nhardening = \"off\"\n",
    ))
    .unwrap();
    assert_eq!(p.agents[0].hardening, Hardening::Off);
    let c = p.compile().unwrap();
    assert_eq!(c.rules[0].proto, 17);
    assert_eq!(c.rules[0].tool_id, 2);
    assert_eq!(Proto::Tcp.as_ipproto(), 6);
}

#[test]
fn v4_compiles_to_v4_mapped_with_prefix_plus_96() {
    let p = parse(&with_head(
        "[[tool]]\nname = \"net\"\nendpoints = [{ cidr = \"192.168.1.0/24\", port = 443 }]\n\
         [[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = [\"net\"]\n",
    ))
    .unwrap();
    let c = p.compile().unwrap();
    assert_eq!(
        c.rules,
        vec![CompiledRule {
            agent_index: 0,
            tool_id: 2,
            proto: 6,
            port: 443,
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 0],
            prefix_len: 120,
        }]
    );
    assert_eq!(
        c.agents[0].max_delegation_depth,
        DEFAULT_MAX_DELEGATION_DEPTH
    );
    assert_eq!(c.agents[0].tenant_id, 1);
}

#[test]
fn v6_loopback_compiles_to_prefix_128() {
    let p = parse(&with_head(
        "[[tool]]\nname = \"lo6\"\nendpoints = [{ cidr = \"::1/128\", port = 18081 }]\n\
         [[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = [\"lo6\"]\n",
    ))
    .unwrap();
    let c = p.compile().unwrap();
    let mut one = [0u8; 16];
    one[15] = 1;
    assert_eq!(c.rules[0].addr, one);
    assert_eq!(c.rules[0].prefix_len, 128);
}

#[test]
fn ids_follow_declaration_order() {
    let p = parse(
        "[[tenant]]\nname = \"t1\"\n[[tenant]]\nname = \"t2\"\n\
         [[tool]]\nname = \"x\"\nendpoints = []\n[[tool]]\nname = \"y\"\nendpoints = []\n\
         [[agent]]\ntenant = \"t2\"\nname = \"a\"\ntools = [\"y\", \"x\"]\n",
    )
    .unwrap();
    let c = p.compile().unwrap();
    assert_eq!(c.tenant_id("t2"), Some(2));
    assert_eq!(c.tool_id("y"), Some(2));
    assert_eq!(c.tool_name(1), Some("x"));
    assert_eq!(c.tool_name(0), None);
    assert_eq!(c.agent_index("t2", "a"), Some(0));
    assert_eq!(c.agents[0].tenant_id, 2);
    assert_eq!(c.agents[0].tool_ids, vec![2, 1]);
}

#[test]
fn duplicate_rules_are_deduplicated_first_tool_wins() {
    let p = parse(&with_head(
        "[[tool]]\nname = \"again\"\nendpoints = [{ cidr = \"10.0.0.0/8\", port = 80 }]\n\
         [[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = [\"search\", \"search\", \"again\"]\n",
    ))
    .unwrap();
    let c = p.compile().unwrap();
    assert_eq!(c.agents[0].tool_ids, vec![1, 2]);
    assert_eq!(c.rules.len(), 1);
    assert_eq!(c.rules[0].tool_id, 1);
}

#[test]
fn same_endpoint_for_two_agents_gives_two_rules() {
    let p = parse(&with_head(
        "[[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = [\"search\"]\n\
         [[agent]]\ntenant = \"acme\"\nname = \"b\"\ntools = [\"search\"]\n",
    ))
    .unwrap();
    let c = p.compile().unwrap();
    assert_eq!(c.rules.len(), 2);
    assert_eq!(c.rules[1].agent_index, 1);
}

#[test]
fn from_file_uses_path_as_origin() {
    let dir = std::env::temp_dir().join(format!("policy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "default_mode = \"loud\"\n").unwrap();
    let err = Policy::from_file(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:1:16: ", path.display())),
        "{err}"
    );
    let missing = Policy::from_file(&dir.join("missing.toml")).unwrap_err();
    assert!(matches!(missing, PolicyError::Io { .. }));
    assert!(missing.location().is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn location_counts_lines_and_chars() {
    let text = "ab\nçd\n";
    assert_eq!(Location::from_offset(text, 0), Location { line: 1, col: 1 });
    assert_eq!(Location::from_offset(text, 3), Location { line: 2, col: 1 });
    assert_eq!(Location::from_offset(text, 5), Location { line: 2, col: 2 });
    assert_eq!(Location::from_offset(text, 4), Location { line: 2, col: 1 });
    assert_eq!(
        Location::from_offset(text, 999),
        Location { line: 3, col: 1 }
    );
}

// ---- bad input: each is refused with file:line:col and a reason ----

#[test]
fn toml_syntax_error() {
    refused("[[tenant]]\nname = \"acme\n", 2, 13, "");
    refused("default_mode = \n", 1, 16, "");
}

#[test]
fn unknown_top_level_key() {
    refused(
        "default_mod = \"enforce\"\n",
        1,
        1,
        "unknown field `default_mod`",
    );
}

#[test]
fn unknown_key_in_tenant_tool_endpoint_agent_rate_limit() {
    refused(
        "[[tenant]]\nname = \"acme\"\ncolour = \"red\"\n",
        3,
        1,
        "unknown field `colour`",
    );
    refused(
        &with_head("[[tool]]\nname = \"x\"\nendpoint = []\n"),
        9,
        1,
        "unknown field `endpoint`",
    );
    refused(
        &with_head("[[tool]]\nname = \"x\"\nendpoints = [{ cidr = \"10.0.0.0/8\", prot = 1 }]\n"),
        9,
        "endpoints = [{ cidr = \"10.0.0.0/8\", ".len() + 1,
        "unknown field `prot`",
    );
    refused(
        &with_head(
            "[[tool]]\nname = \"x\"\nendpoints = []\nrate_limit = { calls = 1, every = \"1s\" }\n",
        ),
        10,
        "rate_limit = { calls = 1, ".len() + 1,
        "unknown field `every`",
    );
    refused(
        &with_head("[[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = []\nmodes = \"enforce\"\n"),
        11,
        1,
        "unknown field `modes`",
    );
}

#[test]
fn unknown_tool_referenced_by_agent() {
    refused(
        &with_head("[[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = [\"search\", \"serch\"]\n"),
        10,
        "tools = [\"search\", ".len() + 1,
        "tool \"serch\" is not defined (known tools: search)",
    );
}

#[test]
fn agent_tenant_not_declared() {
    refused(
        &with_head("[[agent]]\ntenant = \"acne\"\nname = \"a\"\ntools = []\n"),
        8,
        10,
        "tenant \"acne\" is not declared (known tenants: acme)",
    );
    refused(
        "[[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = []\n",
        2,
        10,
        "no [[tenant]] is declared",
    );
}

#[test]
fn duplicate_tenant() {
    refused(
        &with_head("[[tenant]]\nname = \"acme\"\n"),
        8,
        8,
        "duplicate tenant \"acme\" (first declared at line 2)",
    );
}

#[test]
fn duplicate_tool() {
    refused(
        &with_head("[[tool]]\nname = \"search\"\nendpoints = []\n"),
        8,
        8,
        "duplicate tool \"search\"",
    );
}

#[test]
fn duplicate_agent() {
    let agent = "[[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = []\n";
    refused(
        &with_head(&format!("{agent}{agent}")),
        13,
        8,
        "duplicate agent acme/a (first declared at line 9)",
    );
}

#[test]
fn same_agent_name_in_two_tenants_is_fine() {
    parse(
        "[[tenant]]\nname = \"t1\"\n[[tenant]]\nname = \"t2\"\n\
         [[agent]]\ntenant = \"t1\"\nname = \"a\"\ntools = []\n\
         [[agent]]\ntenant = \"t2\"\nname = \"a\"\ntools = []\n",
    )
    .unwrap();
}

fn endpoint_case(endpoint: &str) -> String {
    with_head(&format!(
        "[[tool]]\nname = \"x\"\nendpoints = [{endpoint}]\n"
    ))
}

/// Column of `needle` within the endpoint written by `endpoint_case`.
fn col_of(endpoint: &str, needle: &str) -> usize {
    "endpoints = [".len() + endpoint.find(needle).unwrap() + 1
}

#[test]
fn cidr_with_host_bits_suggests_network() {
    let ep = "{ cidr = \"127.0.0.1/8\", port = 80 }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "\"127"),
        "has host bits set; did you mean \"127.0.0.0/8\"?",
    );
}

#[test]
fn cidr_malformed_or_without_prefix() {
    let ep = "{ cidr = \"10.0.0.0/33\", port = 80 }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "\"10"),
        "is not a valid CIDR",
    );
    let ep = "{ cidr = \"10.1.2.3\", port = 80 }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "\"10"),
        "write \"10.1.2.3/32\"",
    );
}

#[test]
fn port_zero() {
    let ep = "{ cidr = \"10.0.0.0/8\", port = 0 }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "0 }"),
        "port 0 is not allowed",
    );
}

#[test]
fn port_out_of_range() {
    let ep = "{ cidr = \"10.0.0.0/8\", port = 65536 }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "65536"),
        "port 65536 is out of range (1-65535)",
    );
    let ep = "{ cidr = \"10.0.0.0/8\", port = -1 }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "-1"),
        "port -1 is out of range",
    );
}

#[test]
fn port_missing() {
    let ep = "{ cidr = \"10.0.0.0/8\" }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "{"),
        "endpoint is missing port",
    );
}

#[test]
fn unknown_proto() {
    let ep = "{ cidr = \"10.0.0.0/8\", port = 80, proto = \"sctp\" }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "\"sctp"),
        "unknown proto \"sctp\"",
    );
}

#[test]
fn unknown_mode() {
    refused(
        "default_mode = \"strict\"\n",
        1,
        16,
        "unknown mode \"strict\"",
    );
    refused(
        &with_head("[[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = []\nmode = \"off\"\n"),
        11,
        8,
        "unknown mode \"off\"",
    );
}

#[test]
fn unknown_hardening_and_approval() {
    refused(
        &with_head("[[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = []\nhardening = \"lax\"\n"),
        11,
        13,
        "unknown hardening \"lax\"",
    );
    refused(
        &with_head("[[tool]]\nname = \"x\"\nendpoints = []\napproval = \"one-person\"\n"),
        10,
        12,
        "unknown approval \"one-person\"",
    );
}

#[test]
fn endpoint_with_no_kind() {
    let ep = "{ port = 80 }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "{"),
        "endpoint needs one of cidr, host or unix",
    );
}

#[test]
fn endpoint_with_two_kinds() {
    let ep = "{ cidr = \"10.0.0.0/8\", host = \"a.example\", port = 80 }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "{"),
        "more than one of cidr, host and unix",
    );
}

#[test]
fn unix_path_not_absolute() {
    let ep = "{ unix = \"run/tool.sock\" }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "\"run"),
        "unix path \"run/tool.sock\" is not absolute",
    );
    let ep = "{ unix = \"/run/tool.sock\", port = 1 }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "1 }"),
        "port is not used with unix endpoints",
    );
}

#[test]
fn bad_host_name() {
    let ep = "{ host = \"bad host\", port = 80 }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "\"bad"),
        "is not a valid DNS name",
    );
    let ep = "{ host = \"10.0.0.1\", port = 80 }";
    refused(
        &endpoint_case(ep),
        9,
        col_of(ep, "\"10"),
        "write cidr = \"10.0.0.1/32\"",
    );
}

#[test]
fn host_endpoint_compiles_to_a_name_the_daemon_resolves() {
    let ep = "{ host = \"search.internal.example\", port = 443 }";
    let p = parse(&endpoint_case(ep)).unwrap();
    assert!(
        matches!(&p.tools[1].endpoints[0], Endpoint::Host { name, port: 443, proto: Proto::Tcp } if name == "search.internal.example")
    );
    let c = p.compile().unwrap();
    assert_eq!(
        c.tool_hosts[1],
        vec![super::HostEndpoint {
            name: "search.internal.example".into(),
            port: 443,
            proto: 6
        }]
    );
    assert!(c.tool_endpoints[1].is_empty(), "no address until resolved");
}

#[test]
fn unix_endpoints_compile_to_kernel_socket_addresses() {
    let ep = "{ unix = \"/run/tool.sock\" }, { unix = \"@agent-proxy\" }";
    let p = parse(&endpoint_case(ep)).unwrap();
    assert_eq!(
        p.tools[1].endpoints[0],
        Endpoint::Unix {
            path: "/run/tool.sock".into()
        }
    );
    let c = p.compile().unwrap();
    assert_eq!(
        c.tool_unix[1],
        vec![b"/run/tool.sock".to_vec(), b"\0agent-proxy".to_vec()]
    );
    assert!(c.tool_endpoints[1].is_empty(), "no IP endpoint");
    assert_eq!(super::unix_display(&c.tool_unix[1][1]), "@agent-proxy");
}

#[test]
fn unix_paths_must_be_spelled_the_one_way_callers_spell_them() {
    for (path, why) in [
        ("/run//tool.sock", "is not normalised"),
        ("/run/./tool.sock", "is not normalised"),
        ("/run/../tool.sock", "is not normalised"),
        ("/run/tool.sock/", "is not normalised"),
        ("@", "names no abstract socket"),
    ] {
        let ep = format!("{{ unix = \"{path}\" }}");
        refused(&endpoint_case(&ep), 9, col_of(&ep, "\""), why);
    }
    let long = format!("/{}", "x".repeat(107));
    let ep = format!("{{ unix = \"{long}\" }}");
    refused(
        &endpoint_case(&ep),
        9,
        col_of(&ep, "\""),
        "is longer than 107 bytes",
    );
    let ok = format!("/{}", "x".repeat(106));
    assert!(parse(&endpoint_case(&format!("{{ unix = \"{ok}\" }}"))).is_ok());
}

#[test]
fn empty_tool_name() {
    refused(
        &with_head("[[tool]]\nname = \"\"\nendpoints = []\n"),
        8,
        8,
        "tool name is empty",
    );
}

#[test]
fn names_must_match_pattern() {
    refused(
        "[[tenant]]\nname = \"Acme\"\n",
        2,
        8,
        "must start with a lowercase letter or digit",
    );
    refused("[[tenant]]\nname = \"ac me\"\n", 2, 8, "contains ' '");
    refused(
        &with_head("[[tool]]\nname = \"-x\"\nendpoints = []\n"),
        8,
        8,
        "must start with a lowercase letter or digit",
    );
    refused(
        &with_head("[[agent]]\ntenant = \"acme\"\nname = \"a/b\"\ntools = []\n"),
        9,
        8,
        "agent name \"a/b\" contains '/'",
    );
    let long = "a".repeat(64);
    refused(
        &format!("[[tenant]]\nname = \"{long}\"\n"),
        2,
        8,
        "longer than 63 characters",
    );
    parse(&format!("[[tenant]]\nname = \"{}\"\n", "a".repeat(63))).unwrap();
    parse("[[tenant]]\nname = \"0a.b_c-d\"\n").unwrap();
}

#[test]
fn tenant_names_starting_with_underscore_are_reserved() {
    refused("[[tenant]]\nname = \"_system\"\n", 2, 8, "reserved");
}

#[test]
fn rate_limit_calls_zero() {
    refused(
        &with_head(
            "[[tool]]\nname = \"x\"\nendpoints = []\nrate_limit = { calls = 0, per = \"1s\" }\n",
        ),
        10,
        24,
        "rate_limit calls must be at least 1",
    );
}

#[test]
fn rate_limit_per_bad_or_zero() {
    refused(
        &with_head(
            "[[tool]]\nname = \"x\"\nendpoints = []\nrate_limit = { calls = 1, per = \"soon\" }\n",
        ),
        10,
        33,
        "rate_limit per \"soon\" is not a duration",
    );
    refused(
        &with_head(
            "[[tool]]\nname = \"x\"\nendpoints = []\nrate_limit = { calls = 1, per = \"0s\" }\n",
        ),
        10,
        33,
        "must be longer than zero",
    );
    let p = parse(&with_head(
        "[[tool]]\nname = \"x\"\nendpoints = []\nrate_limit = { calls = 5, per = \"500ms\" }\n",
    ))
    .unwrap();
    assert_eq!(
        p.tools[1].rate_limit.unwrap().per,
        Duration::from_millis(500)
    );
}

#[test]
fn max_delegation_depth_above_8() {
    refused(
        &with_head(
            "[[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = []\nmax_delegation_depth = 9\n",
        ),
        11,
        24,
        "max_delegation_depth 9 is out of range (0-8)",
    );
    let p = parse(&with_head(
        "[[agent]]\ntenant = \"acme\"\nname = \"a\"\ntools = []\nmax_delegation_depth = 8\n",
    ))
    .unwrap();
    assert_eq!(p.compile().unwrap().agents[0].max_delegation_depth, 8);
}

#[test]
fn wrong_value_type_points_at_value() {
    let ep = "{ cidr = \"10.0.0.0/8\", port = \"80\" }";
    refused(&endpoint_case(ep), 9, col_of(ep, "\"80"), "invalid type");
}

#[test]
fn missing_required_key_is_refused() {
    let msg = parse("[[tenant]]\n").unwrap_err().to_string();
    assert!(msg.starts_with("policy.toml:1:"), "{msg}");
    assert!(msg.contains("missing field `name`"), "{msg}");
}

#[test]
fn token_keys_are_parsed_and_bad_ones_named_with_their_line() {
    let k = |seed: u8| {
        crate::identity::token::format_public_key(
            &ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key(),
        )
    };
    let text = format!(
        "[[tenant]]\nname = \"acme\"\ntoken_keys = [\"{}\", \"{}\"]\n",
        k(1),
        k(2)
    );
    let p = parse(&text).expect("two keys");
    assert_eq!(p.tenants[0].token_keys.len(), 2);
    for (bad, why) in [
        ("\"ed25519:00\"".to_string(), "32 bytes"),
        ("\"rsa:00\"".to_string(), "ed25519:"),
        (format!("\"{}\", \"{}\"", k(1), k(1)), "listed twice"),
    ] {
        let text = format!("[[tenant]]\nname = \"acme\"\ntoken_keys = [{bad}]\n");
        let e = parse(&text).expect_err("bad key").to_string();
        assert!(e.contains(why) && e.contains(":3:"), "{e}");
    }
    let shared = format!(
        "[[tenant]]\nname = \"acme\"\ntoken_keys = [\"{a}\"]\n[[tenant]]\nname = \"globex\"\ntoken_keys = [\"{a}\"]\n",
        a = k(1)
    );
    let e = parse(&shared).expect_err("shared key").to_string();
    assert!(e.contains("already belongs to tenant \"acme\""), "{e}");
}
