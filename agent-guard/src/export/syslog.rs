//! `--export syslog[=DEST]`: each audit record as one RFC 5424 message,
//! one datagram each, to the local syslog socket (`/dev/log`), another
//! Unix datagram socket (`syslog=unix:/PATH`) or UDP (`syslog=udp://IP:PORT`).
//!
//! ```text
//! <84>1 2026-12-04T18:06:17.123456Z node1 agent-guard 4242 connect [agentguard@32473 log="acme" seq="12" tenant="acme" agent="researcher" verdict="deny" ...] BOM{"seq":12,...}
//! ```
//!
//! Facility authpriv (10); severity warning (4) for a refusal, notice (5)
//! for a would-be refusal in monitor mode, error (3) for a gap, else info
//! (6). MSGID is the record's kind, MSG the audit line exactly as the chain
//! holds it (UTF-8, so it starts with a BOM, RFC 5424 section 6.4). The
//! SD-ID's number is 32473, the enterprise number RFC 5612 reserves for
//! documentation, as no number is registered for agent-guard.

use std::{net::SocketAddr, path::PathBuf};

use super::{ExportError, Exported};
use crate::audit::AuditRecord;

/// The SD-ID of the structured data element.
pub const SD_ID: &str = "agentguard@32473";
/// The local syslog socket.
pub const DEV_LOG: &str = "/dev/log";
/// LOG_AUTHPRIV: security-relevant messages.
pub const FACILITY: u8 = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Unix(PathBuf),
    Udp(SocketAddr),
}

impl Destination {
    /// `None` (plain `syslog`): /dev/log; `unix:/PATH`; `udp://IP:PORT`.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        let Some(v) = value else {
            return Ok(Destination::Unix(DEV_LOG.into()));
        };
        if let Some(path) = v.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(
                    "unix: needs an absolute socket path, e.g. syslog=unix:/dev/log".into(),
                );
            }
            return Ok(Destination::Unix(path));
        }
        if let Some(addr) = v.strip_prefix("udp://") {
            let addr = addr.trim_end_matches('/');
            return addr.parse().map(Destination::Udp).map_err(|_| {
                format!("udp:// needs IP:PORT (an address, not a name), e.g. syslog=udp://127.0.0.1:514, got {addr:?}")
            });
        }
        Err("use syslog (the local /dev/log), syslog=unix:/PATH or syslog=udp://IP:PORT".into())
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Unix(p) => write!(f, "unix:{}", p.display()),
            Destination::Udp(a) => write!(f, "udp://{a}"),
        }
    }
}

/// The syslog severity of a record.
pub fn severity(r: &AuditRecord) -> u8 {
    match (r.kind.as_str(), r.verdict.as_deref()) {
        ("gap", _) => 3,
        (_, Some("deny")) => 4,
        (_, Some("would_deny")) => 5,
        _ => 6,
    }
}

/// Printable US-ASCII without spaces, at most `max` characters; "-" when
/// nothing is left (RFC 5424 header fields).
fn header_field(s: &str, max: usize) -> String {
    let out: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if out.is_empty() { "-".into() } else { out }
}

/// A record's `ts` cut to the six fraction digits RFC 5424 allows.
fn timestamp(ts: &str) -> String {
    let Some((secs, frac)) = ts.split_once('.') else {
        return if ts.is_empty() { "-".into() } else { ts.into() };
    };
    let digits: String = frac
        .chars()
        .take_while(char::is_ascii_digit)
        .take(6)
        .collect();
    let zone = frac.trim_start_matches(|c: char| c.is_ascii_digit());
    format!("{secs}.{digits}{zone}")
}

/// An SD-PARAM value: `"`, `\` and `]` escaped.
fn param_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One RFC 5424 message for an audit record of chain `log`.
pub fn format(log: &str, line: &str, r: &AuditRecord, host: &str, procid: u32) -> String {
    let pri = u16::from(FACILITY) * 8 + u16::from(severity(r));
    let mut sd = format!("[{SD_ID}");
    let mut param = |name: &str, v: Option<String>| {
        if let Some(v) = v {
            sd.push_str(&format!(" {name}=\"{}\"", param_value(&v)));
        }
    };
    param("log", Some(log.to_string()));
    param("seq", Some(r.seq.to_string()));
    param("tenant", r.tenant.clone());
    param("agent", r.agent.clone());
    param("subject", r.subject.clone());
    param("verdict", r.verdict.clone());
    param("reason", r.reason.clone());
    param("tool", r.tool.clone());
    param("grant", r.grant.clone());
    param("dst", r.dst.clone());
    param("port", r.port.map(|p| p.to_string()));
    param("proto", r.proto.clone());
    param("pid", r.pid.map(|p| p.to_string()));
    param("exporter", r.exporter.clone());
    for (kind, n) in r.lost.iter().flatten() {
        param(
            &header_field(&format!("lost.{kind}"), 32),
            Some(n.to_string()),
        );
    }
    param("hash", Some(r.hash.clone()).filter(|h| !h.is_empty()));
    sd.push(']');
    format!(
        "<{pri}>1 {} {} agent-guard {procid} {} {sd} \u{feff}{line}",
        timestamp(&r.ts),
        header_field(host, 255),
        header_field(&r.kind, 32),
    )
}

pub struct Sender {
    dest: Destination,
    host: String,
    procid: u32,
    socket: Option<Socket>,
}

enum Socket {
    Unix(tokio::net::UnixDatagram),
    Udp(tokio::net::UdpSocket),
}

impl Sender {
    pub fn new(dest: Destination, host: &str) -> Self {
        Self {
            dest,
            host: host.to_string(),
            procid: std::process::id(),
            socket: None,
        }
    }

    fn error(&self, source: std::io::Error) -> ExportError {
        ExportError::Socket {
            dest: self.dest.to_string(),
            source,
        }
    }

    async fn socket(&mut self) -> Result<&Socket, ExportError> {
        if self.socket.is_none() {
            let s = match &self.dest {
                Destination::Unix(_) => {
                    Socket::Unix(tokio::net::UnixDatagram::unbound().map_err(|e| self.error(e))?)
                }
                Destination::Udp(addr) => {
                    let local: SocketAddr = if addr.is_ipv4() {
                        ([0, 0, 0, 0], 0).into()
                    } else {
                        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                    };
                    let s = tokio::net::UdpSocket::bind(local)
                        .await
                        .map_err(|e| self.error(e))?;
                    // Connected: a closed port shows up as ECONNREFUSED.
                    s.connect(addr).await.map_err(|e| self.error(e))?;
                    Socket::Udp(s)
                }
            };
            self.socket = Some(s);
        }
        self.socket
            .as_ref()
            .ok_or_else(|| self.error(std::io::ErrorKind::NotConnected.into()))
    }

    /// Sends the batch in order; stops at the first failure (a retry sends
    /// the whole batch again: datagrams before it may arrive twice).
    pub async fn send(&mut self, batch: &[Exported<'_>]) -> Result<(), ExportError> {
        let unix_path = match &self.dest {
            Destination::Unix(p) => Some(p.clone()),
            Destination::Udp(_) => None,
        };
        for e in batch {
            let msg = format(e.log, e.line, &e.record, &self.host, self.procid);
            let result = match (self.socket().await?, &unix_path) {
                (Socket::Unix(s), Some(path)) => s.send_to(msg.as_bytes(), path).await,
                (Socket::Udp(s), _) => s.send(msg.as_bytes()).await,
                (Socket::Unix(_), None) => Err(std::io::ErrorKind::InvalidInput.into()),
            };
            if let Err(e) = result {
                self.socket = None;
                return Err(self.error(e));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denied_connect_is_an_rfc5424_warning_with_structured_identity() {
        let mut r = AuditRecord::new("connect");
        r.seq = 12;
        r.ts = "2026-12-04T18:06:17.123456789Z".into();
        r.tenant = Some("acme".into());
        r.agent = Some("res\"ear]cher\\".into());
        r.verdict = Some("deny".into());
        r.dst = Some("127.0.0.1".into());
        r.port = Some(9);
        r.hash = "ab".repeat(32);
        let line = r#"{"seq":12,"kind":"connect"}"#;
        let m = format("acme", line, &r, "node one", 4242);
        let expected_head = "<84>1 2026-12-04T18:06:17.123456Z nodeone agent-guard 4242 connect [agentguard@32473 log=\"acme\" seq=\"12\" tenant=\"acme\" agent=\"res\\\"ear\\]cher\\\\\" verdict=\"deny\" dst=\"127.0.0.1\" port=\"9\" hash=\"";
        assert!(m.starts_with(expected_head), "{m}");
        assert!(m.ends_with(&format!("] \u{feff}{line}")), "{m}");
        // PRI = facility * 8 + severity.
        let mut ok = r.clone();
        ok.verdict = Some("allow".into());
        assert!(format("acme", line, &ok, "h", 1).starts_with("<86>1 "));
        let mut gap = AuditRecord::new("gap");
        gap.lost = Some([("export".to_string(), 5)].into());
        gap.exporter = Some("otlp=http://x:4318/v1/logs".into());
        let g = format("acme", "{}", &gap, "h", 1);
        assert!(g.starts_with("<83>1 - h agent-guard 1 gap [agentguard@32473 log=\"acme\" seq=\"0\" exporter=\"otlp=http://x:4318/v1/logs\" lost.export=\"5\"]"), "{g}");
    }

    #[test]
    fn timestamps_keep_at_most_six_fraction_digits() {
        assert_eq!(
            timestamp("2026-01-02T03:04:05.123456789Z"),
            "2026-01-02T03:04:05.123456Z"
        );
        assert_eq!(
            timestamp("2026-01-02T03:04:05.12Z"),
            "2026-01-02T03:04:05.12Z"
        );
        assert_eq!(timestamp("2026-01-02T03:04:05Z"), "2026-01-02T03:04:05Z");
        assert_eq!(timestamp(""), "-");
    }

    #[tokio::test]
    async fn messages_reach_a_unix_datagram_receiver_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.sock");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        let mut s = Sender::new(Destination::Unix(path.clone()), "h");
        let batch: Vec<Exported> = (0..3)
            .map(|i| {
                let mut r = AuditRecord::new("exec");
                r.seq = i;
                Exported {
                    log: "acme",
                    line: "{}",
                    record: r,
                }
            })
            .collect();
        s.send(&batch).await.expect("send");
        let mut buf = [0u8; 4096];
        for i in 0..3 {
            let n = rx.recv(&mut buf).expect("recv");
            let m = String::from_utf8_lossy(&buf[..n]);
            assert!(m.contains(&format!("seq=\"{i}\"")), "{m}");
        }
        drop(rx);
        std::fs::remove_file(&path).expect("rm");
        let e = s.send(&batch).await.expect_err("no receiver");
        assert!(e.retryable());
    }
}
