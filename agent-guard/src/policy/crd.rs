//! The `AgentGuardPolicy` CustomResourceDefinition: a policy file as a
//! Kubernetes object. Its `spec` is the policy file's schema, derived from
//! the serde types that parse the file (`raw.rs`), so the two cannot
//! drift; `agent-guard generate crd` writes it, and a test holds the
//! committed copy (deploy/kubernetes/crd/agentguardpolicy.yaml) to it.
//!
//! The spec keeps the file's key names (`default_mode`, `tenant`, `tool`,
//! `agent`, `approver`) rather than Kubernetes' camelCase: a policy moves
//! between the file and the object by changing the syntax only.
//! [`spec_to_toml`] goes the other way, so an object is checked by the
//! same validator as a file.

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value};

use super::raw::RawPolicy;

pub const GROUP: &str = "agent-guard.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "AgentGuardPolicy";
pub const PLURAL: &str = "agentguardpolicies";
pub const SINGULAR: &str = "agentguardpolicy";
/// `GROUP/VERSION`, the objects' `apiVersion`.
pub const API_VERSION: &str = "agent-guard.io/v1alpha1";

/// Where the generated CRD is committed (relative to the repository root).
pub const CRD_PATH: &str = "deploy/kubernetes/crd/agentguardpolicy.yaml";

#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The derived schema uses something a Kubernetes structural schema
    /// does not allow (a bug here, caught by the tests).
    #[error("the AgentGuardPolicy schema is not structural at {path}: {what}")]
    NotStructural { path: String, what: String },
    #[error("spec{path}: {what}")]
    Spec { path: String, what: String },
}

/// The OpenAPI v3 schema of `spec`, made structural the way the API server
/// wants it (apiextensions.k8s.io/v1): every subschema inline (no `$ref`),
/// one `type` per node with `nullable` for optional fields, no
/// `additionalProperties` beside `properties` (unknown fields are pruned,
/// and refused by kubectl's strict field validation), no defaults (the
/// stored object stays as written; the daemon applies the file's defaults).
pub fn spec_schema() -> Result<Value, CrdError> {
    let generator = SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .into_generator();
    let mut schema = generator.into_root_schema_for::<RawPolicy>().to_value();
    if let Some(o) = schema.as_object_mut() {
        o.remove("components");
        o.remove("title");
        o.insert(
            "description".into(),
            "The policy, with the keys and values of the policy file (TOML) as documented in INTERFACE.md, \"Policy file (TOML)\".".into(),
        );
    }
    structural(&mut schema, "spec")?;
    Ok(schema)
}

/// Rewrites one schema node (and its children) in place.
fn structural(v: &mut Value, path: &str) -> Result<(), CrdError> {
    let Some(o) = v.as_object_mut() else {
        return Err(CrdError::NotStructural {
            path: path.into(),
            what: format!("a schema that is not an object: {v}"),
        });
    };
    for key in [
        "$ref",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "$defs",
        "definitions",
    ] {
        if o.contains_key(key) {
            return Err(CrdError::NotStructural {
                path: path.into(),
                what: format!("uses {key}"),
            });
        }
    }
    if o.get("additionalProperties") == Some(&Value::Bool(false)) {
        o.remove("additionalProperties");
    }
    o.remove("default");
    // draft-style `type: [T, "null"]`, should a setting produce it.
    if let Some(Value::Array(types)) = o.get("type").cloned() {
        let real: Vec<&Value> = types
            .iter()
            .filter(|t| t.as_str() != Some("null"))
            .collect();
        if real.len() != 1 {
            return Err(CrdError::NotStructural {
                path: path.into(),
                what: format!("several types {types:?}"),
            });
        }
        let t = real[0].clone();
        if real.len() < types.len() {
            o.insert("nullable".into(), true.into());
        }
        o.insert("type".into(), t);
    }
    if !o.contains_key("type") {
        return Err(CrdError::NotStructural {
            path: path.into(),
            what: "no type".into(),
        });
    }
    if let Some(Value::Object(props)) = o.get_mut("properties") {
        for (k, p) in props.iter_mut() {
            structural(p, &format!("{path}.{k}"))?;
        }
    }
    if let Some(items) = o.get_mut("items") {
        structural(items, &format!("{path}[]"))?;
    }
    Ok(())
}

/// The whole CustomResourceDefinition object.
pub fn crd() -> Result<Value, CrdError> {
    let spec = spec_schema()?;
    Ok(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{PLURAL}.{GROUP}"),
            "labels": {
                "app.kubernetes.io/name": "agent-guard",
                "app.kubernetes.io/part-of": "agent-guard",
            },
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": format!("{KIND}List"),
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": ["agp"],
            },
            // A policy is for nodes, not for a namespace.
            "scope": "Cluster",
            "versions": [{
                "name": VERSION,
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "An agent-guard policy: what each agent (tenant, agent) may reach. Daemons started with --policy-source kubernetes apply the object named by their --policy-object.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                    },
                }},
                "additionalPrinterColumns": [
                    {"name": "Default-Mode", "type": "string", "jsonPath": ".spec.default_mode"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
            }],
        },
    }))
}

/// The committed file's text: a header and the CRD as YAML.
pub fn crd_yaml() -> Result<String, CrdError> {
    let mut out = String::from(
        "# Generated by `agent-guard generate crd` from the policy file's types\n\
         # (agent-guard/src/policy/raw.rs); do not edit. A unit test keeps this\n\
         # file equal to what the code generates.\n",
    );
    yaml(&crd()?, 0, &mut out);
    Ok(out)
}

/// A JSON value as block-style YAML: keys sorted (stable whatever the
/// map's order), strings double-quoted (JSON's escapes are YAML's).
fn yaml(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for k in keys {
                let val = &m[k];
                out.push_str(&format!("{pad}{}:", yaml_key(k)));
                if is_block(val) {
                    out.push('\n');
                    yaml(val, indent + 2, out);
                } else {
                    out.push_str(&format!(" {}\n", scalar(val)));
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for item in a {
                if is_block(item) {
                    let mut inner = String::new();
                    yaml(item, indent + 2, &mut inner);
                    // The first line's indentation becomes the "- ".
                    out.push_str(&pad);
                    out.push_str("- ");
                    out.push_str(&inner[indent + 2..]);
                } else {
                    out.push_str(&format!("{pad}- {}\n", scalar(item)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

fn is_block(v: &Value) -> bool {
    match v {
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        // serde_json's quoting is valid YAML double-quoted style.
        other => other.to_string(),
    }
}

fn yaml_key(k: &str) -> String {
    let plain = k
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        && !matches!(
            k.to_ascii_lowercase().as_str(),
            "y" | "n" | "yes" | "no" | "on" | "off" | "true" | "false" | "null"
        );
    if plain {
        k.to_string()
    } else {
        Value::String(k.to_string()).to_string()
    }
}

/// An object's `spec` as policy-file text, for [`super::Policy::from_str`]:
/// one validator for files and objects. `null` means absent (TOML has no
/// null); only what TOML cannot hold is refused here.
pub fn spec_to_toml(spec: &Value) -> Result<String, CrdError> {
    let Value::Object(m) = spec else {
        return Err(CrdError::Spec {
            path: String::new(),
            what: "is not an object".into(),
        });
    };
    let table = table(m, "")?;
    toml::to_string(&table).map_err(|e| CrdError::Spec {
        path: String::new(),
        what: format!("cannot be written as TOML: {e}"),
    })
}

fn table(m: &Map<String, Value>, path: &str) -> Result<toml::Table, CrdError> {
    let mut t = toml::Table::new();
    for (k, v) in m {
        if v.is_null() {
            continue;
        }
        t.insert(k.clone(), toml_value(v, &format!("{path}.{k}"))?);
    }
    Ok(t)
}

fn toml_value(v: &Value, path: &str) -> Result<toml::Value, CrdError> {
    let err = |what: &str| CrdError::Spec {
        path: path.to_string(),
        what: what.to_string(),
    };
    Ok(match v {
        Value::Null => return Err(err("null in a list")),
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => toml::Value::Integer(i),
            (None, _) if n.is_u64() => return Err(err(&format!("{n} is out of range"))),
            (None, Some(f)) => toml::Value::Float(f),
            (None, None) => return Err(err(&format!("{n} is not a number TOML can hold"))),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(a) => toml::Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| toml_value(x, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => toml::Value::Table(table(m, path)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    #[test]
    fn committed_crd_is_what_the_code_generates() {
        let committed = include_str!("../../../deploy/kubernetes/crd/agentguardpolicy.yaml");
        let generated = crd_yaml().unwrap();
        assert!(
            committed == generated,
            "{CRD_PATH} is stale: run `cargo run -p agent-guard -- generate crd --out {CRD_PATH}` and commit it"
        );
    }

    #[test]
    fn spec_schema_is_structural_and_lists_every_policy_key() {
        let s = spec_schema().unwrap();
        let text = s.to_string();
        for banned in [
            "$ref",
            "anyOf",
            "oneOf",
            "allOf",
            "$schema",
            "additionalProperties",
        ] {
            assert!(!text.contains(banned), "{banned} in {text}");
        }
        let props = s["properties"].as_object().unwrap();
        let keys: Vec<&str> = props.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["agent", "approver", "default_mode", "tenant", "tool"]
        );
        let agent = &props["agent"]["items"]["properties"];
        for k in [
            "tenant",
            "name",
            "tools",
            "mode",
            "max_delegation_depth",
            "cgroup_glob",
        ] {
            assert!(agent.get(k).is_some(), "agent.{k} missing");
        }
        assert_eq!(
            props["tool"]["items"]["properties"]["endpoints"]["items"]["properties"]["port"]["type"],
            "integer"
        );
        assert_eq!(props["default_mode"]["nullable"], true);
        // Required exactly where the file requires a key.
        assert_eq!(
            props["agent"]["items"]["required"],
            serde_json::json!(["tenant", "name", "tools"])
        );
    }

    #[test]
    fn spec_round_trips_to_the_same_policy_as_the_file() {
        let file = r#"
default_mode = "monitor"
[[tenant]]
name = "acme"
[[tool]]
name = "search"
endpoints = [{ cidr = "127.0.0.1/32", port = 18081 }, { host = "search.example", port = 443, proto = "tcp" }]
rate_limit = { calls = 100, per = "1s" }
[[agent]]
tenant = "acme"
name = "researcher"
tools = ["search"]
max_delegation_depth = 1
"#;
        let spec = serde_json::json!({
            "default_mode": "monitor",
            "tenant": [{"name": "acme"}],
            "tool": [{"name": "search", "approval": null,
                      "endpoints": [{"cidr": "127.0.0.1/32", "port": 18081},
                                    {"host": "search.example", "port": 443, "proto": "tcp"}],
                      "rate_limit": {"calls": 100, "per": "1s"}}],
            "agent": [{"tenant": "acme", "name": "researcher", "tools": ["search"], "max_delegation_depth": 1}],
        });
        let from_file = Policy::from_str(file, "f").unwrap();
        let from_spec = Policy::from_str(&spec_to_toml(&spec).unwrap(), "f").unwrap();
        assert_eq!(from_file.tenants, from_spec.tenants);
        assert_eq!(from_file.agents, from_spec.agents);
        assert_eq!(from_file.default_mode, from_spec.default_mode);
        assert_eq!(from_file.tools.len(), from_spec.tools.len());
        assert_eq!(from_file.tools[0].endpoints, from_spec.tools[0].endpoints);
        assert_eq!(from_file.tools[0].rate_limit, from_spec.tools[0].rate_limit);
    }

    #[test]
    fn what_toml_cannot_hold_is_refused_with_its_path() {
        let e = spec_to_toml(&serde_json::json!({"tenant": [null]})).unwrap_err();
        assert_eq!(e.to_string(), "spec.tenant[0]: null in a list");
        let e = spec_to_toml(&serde_json::json!({"agent": [{"max_delegation_depth": u64::MAX}]}))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("spec.agent[0].max_delegation_depth:"),
            "{e}"
        );
        assert!(spec_to_toml(&serde_json::json!("x")).is_err());
    }

    #[test]
    fn unknown_spec_keys_are_refused_like_in_a_file() {
        let spec = serde_json::json!({"tenant": [{"name": "acme", "colour": "red"}]});
        let e = Policy::from_str(&spec_to_toml(&spec).unwrap(), "o").unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn yaml_is_block_style_with_quoted_strings() {
        let mut out = String::new();
        yaml(
            &serde_json::json!({"b": [{"x": 1, "z": "on"}, "s"], "a": {}, "no": true, "e": []}),
            0,
            &mut out,
        );
        assert_eq!(
            out,
            "a: {}\nb:\n  - x: 1\n    z: \"on\"\n  - \"s\"\ne: []\n\"no\": true\n"
        );
    }
}
