//! Real-kernel tests of `daemon --export`: a tagged agent's allowed and
//! denied connects reach a loopback OpenTelemetry (OTLP/HTTP) receiver, an
//! OCSF file and syslog receivers, record for record and in chain order;
//! an exporter whose receiver is down costs neither enforcement nor the
//! audit trail, and its losses are counted and noted in the chain.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::net::UnixDatagram,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_guard_tests::{
    Daemon, Endpoint, Listener, Policy, agent_guard_bin, dump, kernel_test, parse_metrics, probe,
};
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Bytes};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse},
    common::v1::any_value::Value as Any,
    logs::v1::LogRecord,
};
use prost::Message as _;
use serde_json::Value;

fn policy(search: u16) -> String {
    Policy::new()
        .mode("enforce")
        .tenant("acme")
        .tool("search", [Endpoint::tcp("127.0.0.1/32", search)])
        .agent("acme", "researcher", &["search"])
        .build()
}

/// Three allowed and three denied connects of acme/researcher.
fn calls(d: &Daemon, search: &Listener) {
    let port = search.port.to_string();
    assert_eq!(
        d.probe(
            "acme",
            "researcher",
            &["repeat", "3", "tcp", "127.0.0.1", &port]
        ),
        probe::OK
    );
    assert_eq!(
        d.probe(
            "acme",
            "researcher",
            &["repeat", "3", "tcp", "127.0.0.1", "1"]
        ),
        probe::EPERM
    );
    d.wait_audit("acme", "three denied connects", |r| {
        r.iter().filter(|r| r["verdict"] == "deny").count() >= 3
    });
}

/// Every record of a chain, parsed (the current file: these runs are short).
fn chain(d: &Daemon, log: &str) -> Vec<Value> {
    d.audit(log)
}

fn wait_until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {secs} s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// A minimal OTLP/HTTP logs receiver: hyper on 127.0.0.1:0, protobuf bodies
// decoded with the opentelemetry-proto types.

struct OtlpReceiver {
    addr: SocketAddr,
    records: Arc<Mutex<Vec<LogRecord>>>,
    /// Requests that were not `POST /v1/logs` with a protobuf body.
    bad: Arc<Mutex<Vec<String>>>,
    _rt: tokio::runtime::Runtime,
}

impl OtlpReceiver {
    fn start() -> OtlpReceiver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let records = Arc::new(Mutex::new(Vec::new()));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let (r, b) = (records.clone(), bad.clone());
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, b) = (r.clone(), b.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (r, b) = (r.clone(), b.clone());
                            async move {
                                let ok_head = req.method() == hyper::Method::POST
                                    && req.uri().path() == "/v1/logs"
                                    && req.headers().get(hyper::header::CONTENT_TYPE)
                                        == Some(&hyper::header::HeaderValue::from_static(
                                            "application/x-protobuf",
                                        ));
                                let head =
                                    format!("{} {} {:?}", req.method(), req.uri(), req.headers());
                                let body = req.into_body().collect().await?.to_bytes();
                                match ExportLogsServiceRequest::decode(body) {
                                    Ok(msg) if ok_head => {
                                        let mut got = r.lock().unwrap_or_else(|p| p.into_inner());
                                        for rl in msg.resource_logs {
                                            for sl in rl.scope_logs {
                                                got.extend(sl.log_records);
                                            }
                                        }
                                    }
                                    other => b
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .push(format!("{head}: {:?}", other.err())),
                                }
                                let resp = ExportLogsServiceResponse::default().encode_to_vec();
                                Ok::<_, hyper::Error>(
                                    Response::builder()
                                        .header(
                                            hyper::header::CONTENT_TYPE,
                                            "application/x-protobuf",
                                        )
                                        .body(Full::new(Bytes::from(resp)))
                                        .expect("response"),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        OtlpReceiver {
            addr,
            records,
            bad,
            _rt: rt,
        }
    }

    fn records(&self) -> Vec<LogRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn attr(r: &LogRecord, key: &str) -> Option<Any> {
    r.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

fn attr_str(r: &LogRecord, key: &str) -> Option<String> {
    match attr(r, key)? {
        Any::StringValue(s) => Some(s),
        _ => None,
    }
}

fn attr_int(r: &LogRecord, key: &str) -> Option<i64> {
    match attr(r, key)? {
        Any::IntValue(i) => Some(i),
        _ => None,
    }
}

fn body(r: &LogRecord) -> String {
    match r.body.clone().and_then(|b| b.value) {
        Some(Any::StringValue(s)) => s,
        other => panic!("log record body is not a string: {other:?}"),
    }
}

#[test]
fn otlp_receiver_gets_every_record_of_a_run_in_chain_order_with_identity() {
    if !kernel_test("otlp_receiver_gets_every_record_of_a_run_in_chain_order_with_identity") {
        return;
    }
    let rx = OtlpReceiver::start();
    let search = Listener::tcp("127.0.0.1");
    let target = format!("otlp=http://{}", rx.addr);
    let mut d = Daemon::start_with(&policy(search.port), &["--export", &target]);
    calls(&d, &search);
    let status = d.status();
    let e = &status["exports"][0];
    assert_eq!(
        e["target"],
        format!("otlp=http://{}/v1/logs", rx.addr),
        "{status:#}"
    );
    // A clean stop writes the last records (daemon stop, checkpoints) and
    // gives the exporter time to deliver them.
    d.stop();
    let chains: BTreeMap<String, Vec<Value>> = ["acme", "_node"]
        .iter()
        .map(|l| (l.to_string(), chain(&d, l)))
        .collect();
    let got = rx.records();
    assert!(rx.bad.lock().expect("bad").is_empty(), "{:?}", rx.bad);
    for (log, recs) in &chains {
        let exported: Vec<&LogRecord> = got
            .iter()
            .filter(|r| attr_str(r, "agent_guard.log").as_deref() == Some(log.as_str()))
            .collect();
        let seqs: Vec<i64> = exported
            .iter()
            .map(|r| attr_int(r, "agent_guard.seq").expect("seq attribute"))
            .collect();
        let want: Vec<i64> = recs
            .iter()
            .map(|r| r["seq"].as_i64().expect("seq"))
            .collect();
        assert_eq!(
            seqs, want,
            "{log}: one log record per audit record, in chain order"
        );
        for (x, r) in exported.iter().zip(recs) {
            assert_eq!(
                attr_str(x, "agent_guard.hash").as_deref(),
                r["hash"].as_str()
            );
            let line: Value = serde_json::from_str(&body(x)).expect("body is the audit line");
            assert_eq!(&line, r, "the body is the record as the chain holds it");
            assert_eq!(
                x.event_name,
                format!("agent_guard.{}", r["kind"].as_str().unwrap_or(""))
            );
        }
    }
    let connects: Vec<&LogRecord> = got
        .iter()
        .filter(|r| attr_str(r, "agent_guard.kind").as_deref() == Some("connect"))
        .collect();
    assert_eq!(connects.len(), 6, "{connects:#?}");
    for c in &connects {
        assert_eq!(attr_str(c, "agent_guard.tenant").as_deref(), Some("acme"));
        assert_eq!(
            attr_str(c, "agent_guard.agent").as_deref(),
            Some("researcher")
        );
        assert_eq!(
            attr_str(c, "agent_guard.subject").as_deref(),
            Some("acme/researcher")
        );
        assert_eq!(
            attr_str(c, "destination.address").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(attr_str(c, "network.transport").as_deref(), Some("tcp"));
        assert!(attr_int(c, "process.pid").is_some());
        assert!(c.time_unix_nano > 0);
        match attr_str(c, "agent_guard.verdict").as_deref() {
            Some("allow") => {
                assert_eq!(
                    attr_int(c, "destination.port"),
                    Some(i64::from(search.port))
                );
                assert_eq!(attr_str(c, "agent_guard.tool").as_deref(), Some("search"));
                assert_eq!(c.severity_text, "INFO");
            }
            Some("deny") => {
                assert_eq!(attr_int(c, "destination.port"), Some(1));
                assert_eq!(
                    attr_str(c, "agent_guard.reason").as_deref(),
                    Some("no_capability")
                );
                assert_eq!(c.severity_text, "WARN");
            }
            other => panic!("verdict {other:?}"),
        }
    }
}

#[test]
fn ocsf_file_lines_parse_as_network_and_process_activity_with_endpoint_and_tenant() {
    if !kernel_test(
        "ocsf_file_lines_parse_as_network_and_process_activity_with_endpoint_and_tenant",
    ) {
        return;
    }
    let search = Listener::tcp("127.0.0.1");
    let out = tempfile::tempdir().expect("tempdir");
    let path = out.path().join("ocsf.jsonl");
    let target = format!("ocsf-file={}", path.display());
    let mut d = Daemon::start_with(&policy(search.port), &["--export", &target]);
    calls(&d, &search);
    d.stop();
    let text = std::fs::read_to_string(&path).expect("the OCSF file");
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let acme: Vec<&Value> = events
        .iter()
        .filter(|e| e["metadata"]["log_name"] == "acme")
        .collect();
    let recs = chain(&d, "acme");
    assert_eq!(
        acme.iter()
            .map(|e| e["metadata"]["sequence"].clone())
            .collect::<Vec<_>>(),
        recs.iter().map(|r| r["seq"].clone()).collect::<Vec<_>>(),
        "one event per audit record, in order"
    );
    for e in &events {
        for k in [
            "class_uid",
            "category_uid",
            "activity_id",
            "type_uid",
            "time",
            "severity_id",
        ] {
            assert!(e[k].is_u64() || e[k].is_i64(), "{k} missing in {e}");
        }
        assert_eq!(e["metadata"]["product"]["name"], "agent-guard");
        assert_eq!(
            e["type_uid"].as_u64(),
            Some(
                e["class_uid"].as_u64().unwrap_or(0) * 100 + e["activity_id"].as_u64().unwrap_or(0)
            )
        );
    }
    let connects: Vec<&&Value> = acme
        .iter()
        .filter(|e| e["metadata"]["event_code"] == "connect")
        .collect();
    assert_eq!(connects.len(), 6, "{}", dump(&events));
    for c in &connects {
        assert_eq!(c["class_uid"], 4001);
        assert_eq!(c["metadata"]["tenant_uid"], "acme");
        assert_eq!(c["actor"]["user"]["org"]["name"], "acme");
        assert_eq!(c["actor"]["user"]["name"], "researcher");
        assert!(c["actor"]["process"]["pid"].is_u64(), "{c}");
        assert_eq!(c["dst_endpoint"]["ip"], "127.0.0.1");
        assert_eq!(c["connection_info"]["protocol_name"], "tcp");
        let raw: Value =
            serde_json::from_str(c["raw_data"].as_str().expect("raw_data")).expect("json");
        assert_eq!(raw["kind"], "connect");
        if c["dst_endpoint"]["port"] == 1 {
            assert_eq!(
                (
                    c["activity_id"].as_u64(),
                    c["action_id"].as_u64(),
                    c["disposition_id"].as_u64()
                ),
                (Some(5), Some(2), Some(2)),
                "denied: Refuse, Denied, Blocked: {c}"
            );
            assert_eq!(c["status_detail"], "no_capability");
        } else {
            assert_eq!(c["dst_endpoint"]["port"], search.port);
            assert_eq!(
                (c["activity_id"].as_u64(), c["action_id"].as_u64()),
                (Some(1), Some(1)),
                "allowed: Open, Allowed: {c}"
            );
            assert_eq!(c["firewall_rule"]["name"], "search");
        }
    }
    let execs: Vec<&&Value> = acme
        .iter()
        .filter(|e| e["metadata"]["event_code"] == "exec")
        .collect();
    assert!(!execs.is_empty(), "the probes' execs");
    for x in execs {
        assert_eq!(
            (x["class_uid"].as_u64(), x["activity_id"].as_u64()),
            (Some(1007), Some(1))
        );
        assert!(
            x["process"]["file"]["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("agent-guard-probe")),
            "{x}"
        );
    }
}

/// One RFC 5424 message split into its header fields, structured data and
/// message: panics when the framing is off.
fn rfc5424(msg: &str) -> (u32, Vec<String>, String, Value) {
    let rest = msg
        .strip_prefix('<')
        .unwrap_or_else(|| panic!("no PRI: {msg}"));
    let (pri, rest) = rest.split_once('>').expect("PRI");
    let pri: u32 = pri.parse().expect("PRI number");
    let mut fields = Vec::new();
    let mut rest = rest;
    for _ in 0..6 {
        let (f, r) = rest
            .split_once(' ')
            .unwrap_or_else(|| panic!("header: {msg}"));
        fields.push(f.to_string());
        rest = r;
    }
    assert_eq!(fields[0], "1", "VERSION");
    assert!(rest.starts_with('['), "structured data: {msg}");
    let (sd, m) = rest
        .split_once("] \u{feff}")
        .unwrap_or_else(|| panic!("SD then BOM and MSG: {msg}"));
    let json =
        serde_json::from_str(m).unwrap_or_else(|e| panic!("MSG is the audit line ({e}): {m}"));
    (pri, fields, format!("{sd}]"), json)
}

#[test]
fn syslog_reaches_udp_and_unix_datagram_receivers_as_rfc5424() {
    if !kernel_test("syslog_reaches_udp_and_unix_datagram_receivers_as_rfc5424") {
        return;
    }
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    udp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("log.sock");
    let unix = UnixDatagram::bind(&sock).expect("unix dgram");
    unix.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let search = Listener::tcp("127.0.0.1");
    let to_udp = format!("syslog=udp://{}", udp.local_addr().expect("addr"));
    let to_unix = format!("syslog=unix:{}", sock.display());
    let d = Daemon::start_with(
        &policy(search.port),
        &["--export", &to_udp, "--export", &to_unix],
    );
    calls(&d, &search);
    let recs = chain(&d, "acme");
    let denied = recs
        .iter()
        .find(|r| r["verdict"] == "deny")
        .expect("a denied connect");
    check_denied_message("udp", |b| udp.recv(b), &d, denied);
    check_denied_message("unix", |b| unix.recv(b), &d, denied);
}

/// Reads messages until the one of `denied` and checks it.
fn check_denied_message(
    name: &str,
    mut recv: impl FnMut(&mut [u8]) -> std::io::Result<usize>,
    d: &Daemon,
    denied: &Value,
) {
    let mut buf = vec![0u8; 65536];
    let mut seen = Vec::new();
    let (pri, fields, sd, line) = loop {
        let n = recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "{name}: no message for the denied connect ({e}); got:\n{}",
                seen.join("\n")
            )
        });
        let msg = String::from_utf8(buf[..n].to_vec()).expect("UTF-8");
        let (pri, fields, sd, line) = rfc5424(&msg);
        assert_eq!(fields[3], "agent-guard", "APP-NAME: {msg}");
        assert_eq!(fields[4], d.pid().to_string(), "PROCID: {msg}");
        assert_eq!(
            fields[5],
            line["kind"].as_str().unwrap_or("?"),
            "MSGID: {msg}"
        );
        assert!(sd.starts_with("[agentguard@32473 log=\""), "{msg}");
        if line["seq"] == denied["seq"] && line["tenant"] == "acme" {
            break (pri, fields, sd, line);
        }
        seen.push(msg);
    };
    assert_eq!(&line, denied, "{name}: MSG is the chain's line");
    assert_eq!(pri, 10 * 8 + 4, "{name}: authpriv.warning for a refusal");
    assert!(
        fields[1].ends_with('Z') && fields[1].split('.').nth(1).is_some_and(|f| f.len() <= 7),
        "{name}: TIMESTAMP with at most 6 fraction digits: {}",
        fields[1]
    );
    for p in [
        "tenant=\"acme\"",
        "agent=\"researcher\"",
        "verdict=\"deny\"",
        "port=\"1\"",
    ] {
        assert!(sd.contains(p), "{name}: {p} in {sd}");
    }
}

#[test]
fn an_exporter_whose_receiver_is_down_costs_neither_enforcement_nor_the_chain() {
    if !kernel_test("an_exporter_whose_receiver_is_down_costs_neither_enforcement_nor_the_chain") {
        return;
    }
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let search = Listener::tcp("127.0.0.1");
    let target = format!("otlp=http://{closed}");
    let name = format!("otlp=http://{closed}/v1/logs");
    let mut d = Daemon::start_with(&policy(search.port), &["--export", &target]);
    // Enforcement and auditing go on.
    calls(&d, &search);
    let status = wait_until("the exporter to drop and say why", 30, || {
        let s = d.status();
        (s["exports"][0]["dropped"].as_u64() > Some(0)).then_some(s)
    });
    let e = &status["exports"][0];
    assert_eq!(e["target"], name.as_str());
    assert_eq!(e["sent"], 0);
    assert!(e["queue"].is_u64(), "{e}");
    assert!(
        e["last_error"]
            .as_str()
            .is_some_and(|m| m.contains("connecting to")),
        "{e}"
    );
    // The exporter backs off (up to 5 s between tries, 4 tries a batch)
    // before it drops a batch of acme's records.
    let gap = wait_until("a gap record of kind export in acme's chain", 60, || {
        d.audit("acme")
            .into_iter()
            .find(|r| r["kind"] == "gap" && r["lost"]["export"].as_u64() > Some(0))
    });
    assert_eq!(gap["exporter"], name.as_str(), "{gap}");
    let samples = parse_metrics(&d.metrics());
    let value = |metric: &str| {
        samples
            .iter()
            .find(|s| s.name == metric && s.labels.get("exporter") == Some(&name))
            .map(|s| s.value)
    };
    assert!(value("agent_guard_export_dropped_total") >= Some(1.0));
    assert_eq!(value("agent_guard_export_sent_total"), Some(0.0));
    assert!(value("agent_guard_export_queue").is_some());
    // Still enforcing after all that.
    assert_eq!(
        d.probe("acme", "researcher", &["tcp", "127.0.0.1", "1"]),
        probe::EPERM
    );
    d.stop();
    let out = Command::new(agent_guard_bin())
        .args(["audit", "verify", "--audit-dir"])
        .arg(&d.audit_dir)
        .output()
        .expect("verify");
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_export_values_are_refused_before_the_daemon_starts() {
    if !kernel_test("bad_export_values_are_refused_before_the_daemon_starts") {
        return;
    }
    for (value, says) in [
        ("kafka=broker:9092", "unknown export kind"),
        ("otlp", "otlp=http://127.0.0.1:4318"),
        ("otlp=https://collector:4318", "http://"),
        ("ocsf-file", "a file path"),
        ("ocsf-file=relative.jsonl", "absolute"),
        ("syslog=tcp://127.0.0.1:514", "udp://IP:PORT"),
    ] {
        let out = Command::new(agent_guard_bin())
            .args(["daemon", "--export", value])
            .output()
            .expect("agent-guard");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: a usage error: {err}");
        assert!(
            err.contains("--export") && err.contains(says),
            "{value}: {err}"
        );
    }
    let help = Command::new(agent_guard_bin())
        .args(["daemon", "--help"])
        .output()
        .expect("help");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--export otlp=http://127.0.0.1:4318"),
        "{text}"
    );
}
