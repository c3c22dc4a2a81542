//! `--export otlp=http://HOST:4318`: OpenTelemetry logs over OTLP/HTTP
//! (protobuf, `POST /v1/logs`), one log record per audit record.
//!
//! Each log record's body is the audit line exactly as the chain holds it
//! (so a receiver can re-check `hash`), its attributes the record's fields:
//! `agent_guard.<field>` for every field, and the OpenTelemetry semantic
//! conventions where one fits (`process.pid`, `destination.address`, ...).
//! Sent with the same hyper HTTP/1 client as the approval webhook, over one
//! kept-alive connection.

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Uri, body::Bytes, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::logs::v1::ExportLogsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber},
    resource::v1::Resource,
};
use prost::Message as _;

use super::{ExportError, Exported};
use crate::audit::AuditRecord;

/// The OTLP/HTTP path for logs, added when the URL names no path.
pub const LOGS_PATH: &str = "/v1/logs";

/// Where the collector listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port` to connect to.
    addr: String,
    /// `Host` header.
    authority: String,
    path: String,
}

impl Endpoint {
    /// `http://HOST[:PORT][/PATH]`; without a path, [`LOGS_PATH`] (as
    /// OTLP exporters do with a base endpoint).
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "{other}:// is not supported; use http:// (put a local collector or relay in front of a TLS endpoint)"
                ));
            }
            None => return Err("give a URL with http://, e.g. http://127.0.0.1:4318".into()),
        }
        let authority = uri
            .authority()
            .filter(|a| !a.host().is_empty())
            .ok_or("no host in the URL")?;
        let addr = match authority.port_u16() {
            Some(_) => authority.to_string(),
            None => format!("{}:80", authority.as_str()),
        };
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") | Some("/") => LOGS_PATH.to_string(),
            Some(p) => p.to_string(),
        };
        Ok(Self {
            addr,
            authority: authority.to_string(),
            path,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}{}", self.authority, self.path)
    }
}

pub struct Client {
    endpoint: Endpoint,
    resource: Resource,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    pub fn new(endpoint: Endpoint, host: &str) -> Self {
        Self {
            endpoint,
            resource: Resource {
                attributes: vec![
                    kv("service.name", "agent-guard"),
                    kv("service.version", env!("CARGO_PKG_VERSION")),
                    kv("host.name", host),
                ],
                ..Default::default()
            },
            conn: None,
        }
    }

    pub async fn send(&mut self, batch: &[Exported<'_>]) -> Result<(), ExportError> {
        let body = request(&self.resource, batch).encode_to_vec();
        let usable = match self.conn.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            self.conn = Some(connect(&self.endpoint.addr).await?);
        }
        let Some(sender) = self.conn.as_mut() else {
            unreachable!("connected above");
        };
        let req = Request::post(self.endpoint.path.as_str())
            .header(hyper::header::HOST, &self.endpoint.authority)
            .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ExportError::Http(e.to_string()))?;
        let result = sender.send_request(req).await;
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                self.conn = None;
                return Err(ExportError::Http(e.to_string()));
            }
        };
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if (200..300).contains(&status) {
            return Ok(());
        }
        Err(ExportError::Status {
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        })
    }
}

async fn connect(addr: &str) -> Result<SendRequest<Full<Bytes>>, ExportError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ExportError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ExportError::Http(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One OTLP export request for a batch.
pub fn request(resource: &Resource, batch: &[Exported<'_>]) -> ExportLogsServiceRequest {
    let observed = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u64;
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource.clone()),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "agent-guard".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                log_records: batch
                    .iter()
                    .map(|e| log_record(e.log, e.line, &e.record, observed))
                    .collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn attribute(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn kv(key: &str, value: impl Into<String>) -> KeyValue {
    attribute(key, Value::StringValue(value.into()))
}

fn kv_int(key: &str, value: i64) -> KeyValue {
    attribute(key, Value::IntValue(value))
}

/// Severity of a record: a refusal (or a would-be refusal in monitor
/// mode) is a warning, lost records an error, the rest information.
pub fn severity(r: &AuditRecord) -> SeverityNumber {
    match (r.kind.as_str(), r.verdict.as_deref()) {
        ("gap", _) => SeverityNumber::Error,
        (_, Some("deny" | "would_deny")) => SeverityNumber::Warn,
        _ => SeverityNumber::Info,
    }
}

/// The OTLP log record of one audit record of chain `log`.
pub fn log_record(log: &str, line: &str, r: &AuditRecord, observed: u64) -> LogRecord {
    let mut a = Vec::with_capacity(24);
    let s = |a: &mut Vec<KeyValue>, key: &str, v: &Option<String>| {
        if let Some(v) = v {
            a.push(kv(key, v.clone()));
        }
    };
    let i = |a: &mut Vec<KeyValue>, key: &str, v: Option<u64>| {
        if let Some(v) = v {
            a.push(kv_int(key, v as i64));
        }
    };
    a.push(kv("agent_guard.log", log));
    i(&mut a, "agent_guard.seq", Some(r.seq));
    a.push(kv("agent_guard.kind", r.kind.clone()));
    a.push(kv("agent_guard.hash", r.hash.clone()));
    s(&mut a, "agent_guard.tenant", &r.tenant);
    s(&mut a, "agent_guard.agent", &r.agent);
    s(&mut a, "agent_guard.subject", &r.subject);
    s(&mut a, "agent_guard.verdict", &r.verdict);
    s(&mut a, "agent_guard.reason", &r.reason);
    s(&mut a, "agent_guard.tool", &r.tool);
    s(&mut a, "agent_guard.grant", &r.grant);
    s(&mut a, "agent_guard.task", &r.task);
    s(&mut a, "agent_guard.task_id", &r.task_id);
    s(&mut a, "agent_guard.on_behalf_of", &r.on_behalf_of);
    s(&mut a, "agent_guard.jti", &r.jti);
    s(&mut a, "agent_guard.op", &r.op);
    s(&mut a, "agent_guard.approval", &r.approval);
    s(&mut a, "agent_guard.approver", &r.approver);
    s(&mut a, "agent_guard.exporter", &r.exporter);
    s(&mut a, "agent_guard.detail", &r.detail);
    s(&mut a, "agent_guard.policy_hash", &r.policy_hash);
    i(&mut a, "agent_guard.cgroup", r.cgroup);
    i(&mut a, "agent_guard.child", r.child.map(u64::from));
    if let Some(d) = r.divergence {
        a.push(attribute("agent_guard.divergence", Value::BoolValue(d)));
    }
    for (kind, n) in r.lost.iter().flatten() {
        a.push(kv_int(&format!("agent_guard.lost.{kind}"), *n as i64));
    }
    // OpenTelemetry semantic conventions.
    i(&mut a, "process.pid", r.pid.map(u64::from));
    i(&mut a, "process.parent_pid", r.ppid.map(u64::from));
    i(&mut a, "thread.id", r.tid.map(u64::from));
    i(&mut a, "process.user.id", r.uid.map(u64::from));
    s(&mut a, "process.executable.name", &r.comm);
    s(&mut a, "process.executable.path", &r.exe);
    s(&mut a, "destination.address", &r.dst);
    i(&mut a, "destination.port", r.port.map(u64::from));
    s(&mut a, "network.transport", &r.proto);
    let sev = severity(r);
    LogRecord {
        time_unix_nano: super::unix_nanos(&r.ts).map_or(0, |n| n.max(0) as u64),
        observed_time_unix_nano: observed,
        severity_number: sev as i32,
        severity_text: match sev {
            SeverityNumber::Error => "ERROR",
            SeverityNumber::Warn => "WARN",
            _ => "INFO",
        }
        .into(),
        body: Some(AnyValue {
            value: Some(Value::StringValue(line.to_string())),
        }),
        attributes: a,
        event_name: format!("agent_guard.{}", r.kind),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr<'a>(rec: &'a LogRecord, key: &str) -> Option<&'a Value> {
        rec.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    #[test]
    fn a_denied_connect_becomes_a_warning_with_its_identity_and_destination() {
        let mut r = AuditRecord::new("connect");
        r.seq = 7;
        r.ts = "2026-12-04T18:06:17.123456789Z".into();
        r.tenant = Some("acme".into());
        r.agent = Some("researcher".into());
        r.dst = Some("127.0.0.1".into());
        r.port = Some(9);
        r.proto = Some("tcp".into());
        r.verdict = Some("deny".into());
        r.reason = Some("no_capability".into());
        r.pid = Some(42);
        r.hash = "ab".repeat(32);
        let line = "{\"seq\":7}";
        let rec = log_record("acme", line, &r, 5);
        assert_eq!(rec.time_unix_nano, 1_796_407_577_123_456_789);
        assert_eq!(rec.observed_time_unix_nano, 5);
        assert_eq!(rec.severity_number, SeverityNumber::Warn as i32);
        assert_eq!(rec.event_name, "agent_guard.connect");
        assert_eq!(
            rec.body.and_then(|b| b.value),
            Some(Value::StringValue(line.into()))
        );
        let rec = log_record("acme", line, &r, 5);
        assert_eq!(
            attr(&rec, "agent_guard.tenant"),
            Some(&Value::StringValue("acme".into()))
        );
        assert_eq!(
            attr(&rec, "agent_guard.agent"),
            Some(&Value::StringValue("researcher".into()))
        );
        assert_eq!(attr(&rec, "agent_guard.seq"), Some(&Value::IntValue(7)));
        assert_eq!(attr(&rec, "destination.port"), Some(&Value::IntValue(9)));
        assert_eq!(attr(&rec, "process.pid"), Some(&Value::IntValue(42)));
        assert_eq!(attr(&rec, "agent_guard.tool"), None);
        // The request round-trips through protobuf.
        let batch = [Exported {
            log: "acme",
            line,
            record: r,
        }];
        let req = request(
            &Client::new(Endpoint::parse("http://h:1").expect("url"), "n").resource,
            &batch,
        );
        let back =
            ExportLogsServiceRequest::decode(req.encode_to_vec().as_slice()).expect("decode");
        assert_eq!(back.resource_logs[0].scope_logs[0].log_records.len(), 1);
    }

    #[test]
    fn endpoint_gets_the_logs_path_only_when_it_names_none() {
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:4318").expect("url").url(),
            "http://127.0.0.1:4318/v1/logs"
        );
        assert_eq!(
            Endpoint::parse("http://c/otlp/v1/logs").expect("url").addr,
            "c:80"
        );
        assert!(Endpoint::parse("https://c:4318").is_err());
        assert!(Endpoint::parse("127.0.0.1:4318").is_err());
    }
}
