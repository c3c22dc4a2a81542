//! `--export ocsf-file=PATH`: each audit record as one OCSF 1.3 event, one
//! JSON object per line, appended to PATH (for a SIEM's file shipper).
//!
//! | audit record | OCSF class | activity |
//! |---|---|---|
//! | `connect` | Network Activity (4001) | Open (1); Refuse (5) when denied |
//! | `sendmsg` | Network Activity (4001) | Traffic (6); Refuse (5) when denied |
//! | `exec`, `fork`, `control` with `op = run` (a launch) | Process Activity (1007) | Launch (1) |
//! | `exit` | Process Activity (1007) | Terminate (2) |
//! | anything else (`gap`, `grant`, `policy`, ...) | Base Event (0) | Other (99) |
//!
//! The README's "Exports" section has the field mapping. Every event
//! carries the audit line itself in `raw_data` and the chain position in
//! `metadata.log_name` / `metadata.sequence`, so the chain can be checked
//! from the SIEM's copy.
//!
//! A file moved away or deleted (log rotation) is noticed before the next
//! write and PATH is created again.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt as _;

use super::{ExportError, Exported};
use crate::audit::AuditRecord;

/// The OCSF schema version the events follow.
pub const OCSF_VERSION: &str = "1.3.0";

pub const NETWORK_ACTIVITY: u32 = 4001;
pub const PROCESS_ACTIVITY: u32 = 1007;
pub const BASE_EVENT: u32 = 0;

/// The OCSF event of one audit record of chain `log`.
pub fn event(log: &str, line: &str, r: &AuditRecord, host: &str) -> Value {
    let verdict = r.verdict.as_deref();
    let denied = verdict == Some("deny");
    let (class_uid, class_name, category_uid, category_name, activity_id, activity_name) =
        match (r.kind.as_str(), r.op.as_deref()) {
            ("connect", _) if denied => (
                NETWORK_ACTIVITY,
                "Network Activity",
                4,
                "Network Activity",
                5,
                "Refuse",
            ),
            ("connect", _) => (
                NETWORK_ACTIVITY,
                "Network Activity",
                4,
                "Network Activity",
                1,
                "Open",
            ),
            ("sendmsg", _) if denied => (
                NETWORK_ACTIVITY,
                "Network Activity",
                4,
                "Network Activity",
                5,
                "Refuse",
            ),
            ("sendmsg", _) => (
                NETWORK_ACTIVITY,
                "Network Activity",
                4,
                "Network Activity",
                6,
                "Traffic",
            ),
            ("exec" | "fork", _) | ("control", Some("run")) => (
                PROCESS_ACTIVITY,
                "Process Activity",
                1,
                "System Activity",
                1,
                "Launch",
            ),
            ("exit", _) => (
                PROCESS_ACTIVITY,
                "Process Activity",
                1,
                "System Activity",
                2,
                "Terminate",
            ),
            _ => (BASE_EVENT, "Base Event", 0, "Uncategorized", 99, "Other"),
        };
    let (severity_id, severity) = match (r.kind.as_str(), verdict) {
        (_, Some("deny")) | ("gap", _) => (3, "Medium"),
        (_, Some("would_deny")) => (2, "Low"),
        _ => (1, "Informational"),
    };
    let mut e = Map::new();
    e.insert("class_uid".into(), json!(class_uid));
    e.insert("class_name".into(), json!(class_name));
    e.insert("category_uid".into(), json!(category_uid));
    e.insert("category_name".into(), json!(category_name));
    e.insert("activity_id".into(), json!(activity_id));
    e.insert("activity_name".into(), json!(activity_name));
    e.insert(
        "type_uid".into(),
        json!(u64::from(class_uid) * 100 + activity_id),
    );
    e.insert(
        "type_name".into(),
        json!(format!("{class_name}: {activity_name}")),
    );
    e.insert(
        "time".into(),
        json!(super::unix_nanos(&r.ts).map_or(0, |n| (n / 1_000_000) as i64)),
    );
    e.insert("severity_id".into(), json!(severity_id));
    e.insert("severity".into(), json!(severity));
    let mut metadata = json!({
        "version": OCSF_VERSION,
        "product": { "name": "agent-guard", "vendor_name": "agent-guard", "version": env!("CARGO_PKG_VERSION") },
        "log_name": log,
        "sequence": r.seq,
        "uid": format!("{log}:{}", r.seq),
        "original_time": r.ts,
        "event_code": r.kind,
    });
    if let Some(t) = &r.tenant {
        metadata["tenant_uid"] = json!(t);
    }
    if verdict.is_some() {
        metadata["profiles"] = json!(["security_control"]);
    }
    e.insert("metadata".into(), metadata);
    e.insert(
        "device".into(),
        json!({ "hostname": host, "type_id": 1, "type": "Server",
                "os": { "name": "Linux", "type_id": 100, "type": "Linux" } }),
    );
    // Allowed, denied, or (monitor mode) allowed but flagged.
    if let Some(v) = verdict {
        let (action_id, action, disposition_id, disposition, status_id, status) = match v {
            "deny" => (2, "Denied", 2, "Blocked", 2, "Failure"),
            "would_deny" => (1, "Allowed", 15, "Detected", 1, "Success"),
            _ => (1, "Allowed", 1, "Allowed", 1, "Success"),
        };
        e.insert("action_id".into(), json!(action_id));
        e.insert("action".into(), json!(action));
        e.insert("disposition_id".into(), json!(disposition_id));
        e.insert("disposition".into(), json!(disposition));
        e.insert("status_id".into(), json!(status_id));
        e.insert("status".into(), json!(status));
        if let Some(reason) = &r.reason {
            e.insert("status_detail".into(), json!(reason));
        }
    }
    let this_process = process(r.pid, r.tid, &r.comm, &r.exe, r.ppid, r.uid);
    let mut actor = Map::new();
    if let Some(user) = agent_user(r) {
        actor.insert("user".into(), user);
    }
    match class_uid {
        NETWORK_ACTIVITY => {
            actor.insert("process".into(), this_process);
            let dst = match (r.dst.as_deref(), r.proto.as_deref()) {
                (Some(path), Some("unix")) => json!({ "name": path }),
                (Some(ip), _) => json!({ "ip": ip, "port": r.port }),
                (None, _) => json!({}),
            };
            e.insert("dst_endpoint".into(), dst);
            let mut conn = json!({ "direction_id": 2, "direction": "Outbound" });
            if let Some(p) = &r.proto {
                conn["protocol_name"] = json!(p);
                match p.as_str() {
                    "tcp" => conn["protocol_num"] = json!(6),
                    "udp" => conn["protocol_num"] = json!(17),
                    _ => {}
                }
            }
            e.insert("connection_info".into(), conn);
            if let Some(tool) = &r.tool {
                let mut rule = json!({ "name": tool, "type": "tool" });
                if let Some(g) = &r.grant {
                    rule["uid"] = json!(g);
                }
                e.insert("firewall_rule".into(), rule);
            }
        }
        PROCESS_ACTIVITY => match r.kind.as_str() {
            // The parent made the child: the actor is the parent.
            "fork" => {
                let mut child = process(r.child, None, &None, &r.exe, r.pid, r.uid);
                child["parent_process"] = this_process.clone();
                e.insert("process".into(), child);
                actor.insert("process".into(), this_process);
            }
            // The launcher (`agent-guard run`) asked the daemon.
            "control" => {
                actor.insert("process".into(), this_process.clone());
                e.insert("process".into(), this_process);
            }
            // exec: the new image, started by its parent; exit: itself.
            _ => {
                if r.kind == "exec"
                    && let Some(pp) = r.ppid
                {
                    actor.insert("process".into(), json!({ "pid": pp }));
                } else {
                    actor.insert("process".into(), this_process.clone());
                }
                e.insert("process".into(), this_process);
            }
        },
        _ => {
            if r.pid.is_some() {
                actor.insert("process".into(), this_process);
            }
        }
    }
    if !actor.is_empty() {
        e.insert("actor".into(), Value::Object(actor));
    }
    e.insert("message".into(), json!(message(r)));
    e.insert("raw_data".into(), json!(line));
    e.insert("unmapped".into(), unmapped(r));
    Value::Object(e)
}

/// OCSF Process object (fields left out when unknown).
fn process(
    pid: Option<u32>,
    tid: Option<u32>,
    comm: &Option<String>,
    exe: &Option<String>,
    ppid: Option<u32>,
    uid: Option<u32>,
) -> Value {
    let mut p = Map::new();
    if let Some(pid) = pid {
        p.insert("pid".into(), json!(pid));
    }
    if let Some(tid) = tid {
        p.insert("tid".into(), json!(tid));
    }
    if let Some(c) = comm {
        p.insert("name".into(), json!(c));
    }
    if let Some(exe) = exe {
        let name = Path::new(exe)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        p.insert(
            "file".into(),
            json!({ "path": exe, "name": name, "type_id": 1, "type": "Regular File" }),
        );
    }
    if let Some(pp) = ppid {
        p.insert("parent_process".into(), json!({ "pid": pp }));
    }
    if let Some(uid) = uid {
        p.insert("user".into(), json!({ "uid": uid.to_string() }));
    }
    Value::Object(p)
}

/// The agent identity as an OCSF User: the agent's name, its delegation
/// chain as uid, its tenant as the organization.
fn agent_user(r: &AuditRecord) -> Option<Value> {
    let tenant = r.tenant.as_deref().filter(|t| !t.is_empty())?;
    let mut u = json!({
        "type_id": 99,
        "type": "AI agent",
        "org": { "name": tenant, "uid": tenant },
    });
    if let Some(a) = r.agent.as_deref().filter(|a| !a.is_empty()) {
        u["name"] = json!(a);
    }
    if let Some(s) = &r.subject {
        u["uid"] = json!(s);
    }
    Some(u)
}

fn message(r: &AuditRecord) -> String {
    let who = r.subject.clone().unwrap_or_else(|| "agent-guard".into());
    match (r.kind.as_str(), r.verdict.as_deref()) {
        ("connect" | "sendmsg", Some(v)) => format!(
            "{who} {} {} {}:{} ({})",
            r.kind,
            v,
            r.dst.as_deref().unwrap_or("?"),
            r.port.map_or("-".into(), |p| p.to_string()),
            r.reason.as_deref().unwrap_or("-")
        ),
        _ => match &r.detail {
            Some(d) => format!("{}: {d}", r.kind),
            None => format!("{who} {}", r.kind),
        },
    }
}

/// agent-guard fields with no OCSF attribute of their own.
fn unmapped(r: &AuditRecord) -> Value {
    let mut u = Map::new();
    let mut put = |k: &str, v: Value| {
        if !v.is_null() {
            u.insert(k.into(), v);
        }
    };
    put("hash", json!(r.hash));
    put("prev", json!(r.prev));
    put("subject", json!(r.subject));
    put("reason", json!(r.reason));
    put("tool", json!(r.tool));
    put("grant", json!(r.grant));
    put("task", json!(r.task));
    put("task_id", json!(r.task_id));
    put("on_behalf_of", json!(r.on_behalf_of));
    put("jti", json!(r.jti));
    put("op", json!(r.op));
    put("approval", json!(r.approval));
    put("approver", json!(r.approver));
    put("divergence", json!(r.divergence));
    put("child", json!(r.child));
    put("cgroup", json!(r.cgroup));
    put("lost", json!(r.lost));
    put("torn_bytes", json!(r.torn_bytes));
    put("exporter", json!(r.exporter));
    put("detail", json!(r.detail));
    put("policy_hash", json!(r.policy_hash));
    Value::Object(u)
}

/// Appends events to the file.
pub struct FileSink {
    path: PathBuf,
    file: tokio::fs::File,
    host: String,
    /// A batch whose write stopped part way, and how much of it is in the
    /// file: its retry goes on from there instead of writing lines twice.
    partial: Option<(Vec<u8>, usize)>,
}

impl FileSink {
    pub fn open(path: &Path, host: &str) -> Result<Self, ExportError> {
        Ok(Self {
            path: path.to_path_buf(),
            file: tokio::fs::File::from_std(open(path)?),
            host: host.to_string(),
            partial: None,
        })
    }

    pub async fn send(&mut self, batch: &[Exported<'_>]) -> Result<(), ExportError> {
        let err = |source| ExportError::File {
            path: self.path.clone(),
            source,
        };
        let mut buf = Vec::with_capacity(batch.len() * 1024);
        for e in batch {
            // A map of strings and numbers serializes.
            let _ = serde_json::to_writer(&mut buf, &event(e.log, e.line, &e.record, &self.host));
            buf.push(b'\n');
        }
        let mut done = match self.partial.take() {
            Some((prev, done)) if prev == buf => done,
            _ => 0,
        };
        // Rotated away or deleted: start PATH again.
        let on_disk = tokio::fs::metadata(&self.path).await.ok();
        let open_now = self.file.metadata().await.map_err(err)?;
        if on_disk.is_none_or(|m| (m.dev(), m.ino()) != (open_now.dev(), open_now.ino())) {
            self.file = tokio::fs::File::from_std(open(&self.path)?);
            done = 0;
        }
        while done < buf.len() {
            match self.file.write(&buf[done..]).await {
                Ok(0) => {
                    self.partial = Some((buf, done));
                    return Err(err(std::io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => done += n,
                Err(e) => {
                    self.partial = Some((buf, done));
                    return Err(err(e));
                }
            }
        }
        self.file.flush().await.map_err(err)
    }
}

fn open(path: &Path) -> Result<std::fs::File, ExportError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|source| ExportError::File {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(verdict: &str) -> AuditRecord {
        let mut r = AuditRecord::new("connect");
        r.seq = 3;
        r.ts = "2026-12-04T18:06:17.123456789Z".into();
        r.tenant = Some("acme".into());
        r.agent = Some("researcher".into());
        r.subject = Some("acme/researcher".into());
        r.pid = Some(42);
        r.ppid = Some(41);
        r.uid = Some(1000);
        r.comm = Some("curl".into());
        r.exe = Some("/usr/bin/curl".into());
        r.dst = Some("127.0.0.1".into());
        r.port = Some(18081);
        r.proto = Some("tcp".into());
        r.verdict = Some(verdict.into());
        r.reason = Some(
            if verdict == "allow" {
                "granted"
            } else {
                "no_capability"
            }
            .into(),
        );
        if verdict == "allow" {
            r.tool = Some("search".into());
            r.grant = Some("7".into());
        }
        r.hash = "cd".repeat(32);
        r
    }

    #[test]
    fn connects_map_to_network_activity_with_endpoint_actor_and_tenant() {
        let e = event("acme", "{line}", &connect("allow"), "node1");
        assert_eq!(e["class_uid"], 4001);
        assert_eq!(e["category_uid"], 4);
        assert_eq!(e["activity_id"], 1);
        assert_eq!(e["type_uid"], 400101);
        assert_eq!(e["time"], 1_796_407_577_123i64);
        assert_eq!(e["action_id"], 1);
        assert_eq!(e["disposition_id"], 1);
        assert_eq!(e["severity_id"], 1);
        assert_eq!(
            e["dst_endpoint"],
            json!({ "ip": "127.0.0.1", "port": 18081 })
        );
        assert_eq!(e["connection_info"]["protocol_num"], 6);
        assert_eq!(e["connection_info"]["direction_id"], 2);
        assert_eq!(e["actor"]["process"]["pid"], 42);
        assert_eq!(e["actor"]["process"]["file"]["name"], "curl");
        assert_eq!(e["actor"]["process"]["parent_process"]["pid"], 41);
        assert_eq!(e["actor"]["process"]["user"]["uid"], "1000");
        assert_eq!(e["actor"]["user"]["name"], "researcher");
        assert_eq!(e["actor"]["user"]["uid"], "acme/researcher");
        assert_eq!(e["actor"]["user"]["org"]["name"], "acme");
        assert_eq!(e["metadata"]["tenant_uid"], "acme");
        assert_eq!(e["metadata"]["sequence"], 3);
        assert_eq!(e["metadata"]["log_name"], "acme");
        assert_eq!(e["metadata"]["version"], OCSF_VERSION);
        assert_eq!(
            e["firewall_rule"],
            json!({ "name": "search", "type": "tool", "uid": "7" })
        );
        assert_eq!(e["raw_data"], "{line}");
        assert_eq!(e["unmapped"]["hash"], "cd".repeat(32));

        let d = event("acme", "{}", &connect("deny"), "node1");
        assert_eq!(d["activity_id"], 5);
        assert_eq!(d["type_uid"], 400105);
        assert_eq!(d["action_id"], 2);
        assert_eq!(d["disposition_id"], 2);
        assert_eq!(d["status_id"], 2);
        assert_eq!(d["status_detail"], "no_capability");
        assert_eq!(d["severity_id"], 3);
        assert!(d.get("firewall_rule").is_none());

        let w = event("acme", "{}", &connect("would_deny"), "node1");
        assert_eq!(
            (w["activity_id"].as_u64(), w["action_id"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(w["disposition_id"], 15);

        let mut udp = connect("allow");
        udp.kind = "sendmsg".into();
        udp.proto = Some("udp".into());
        let u = event("acme", "{}", &udp, "n");
        assert_eq!(
            (u["class_uid"].as_u64(), u["activity_id"].as_u64()),
            (Some(4001), Some(6))
        );
        assert_eq!(u["connection_info"]["protocol_num"], 17);
    }

    #[test]
    fn process_records_map_to_process_activity_and_the_rest_to_base_events() {
        let mut exec = connect("allow");
        exec.kind = "exec".into();
        (
            exec.dst,
            exec.port,
            exec.proto,
            exec.verdict,
            exec.reason,
            exec.tool,
            exec.grant,
        ) = (None, None, None, None, None, None, None);
        let e = event("acme", "{}", &exec, "n");
        assert_eq!(
            (e["class_uid"].as_u64(), e["activity_id"].as_u64()),
            (Some(1007), Some(1))
        );
        assert_eq!(e["type_uid"], 100701);
        assert_eq!(e["process"]["pid"], 42);
        assert_eq!(e["process"]["file"]["path"], "/usr/bin/curl");
        assert_eq!(e["actor"]["process"]["pid"], 41, "the parent launched it");
        assert_eq!(e["actor"]["user"]["org"]["uid"], "acme");
        assert!(e.get("action_id").is_none());

        let mut exit = exec.clone();
        exit.kind = "exit".into();
        let x = event("acme", "{}", &exit, "n");
        assert_eq!(
            (x["class_uid"].as_u64(), x["activity_id"].as_u64()),
            (Some(1007), Some(2))
        );

        let mut fork = exec.clone();
        fork.kind = "fork".into();
        fork.child = Some(43);
        let f = event("acme", "{}", &fork, "n");
        assert_eq!(f["process"]["pid"], 43);
        assert_eq!(f["process"]["parent_process"]["pid"], 42);

        let mut run = AuditRecord::new("control");
        run.op = Some("run".into());
        run.verdict = Some("deny".into());
        run.reason = Some("not_permitted".into());
        run.pid = Some(9);
        let c = event("_node", "{}", &run, "n");
        assert_eq!(
            (c["class_uid"].as_u64(), c["activity_id"].as_u64()),
            (Some(1007), Some(1))
        );
        assert_eq!(c["status_id"], 2);
        assert!(
            c["actor"].get("user").is_none(),
            "no tenant, no agent identity"
        );

        let mut gap = AuditRecord::new("gap");
        gap.lost = Some([("export".to_string(), 4)].into());
        gap.exporter = Some("otlp=http://x/v1/logs".into());
        let g = event("acme", "{}", &gap, "n");
        assert_eq!(
            (g["class_uid"].as_u64(), g["type_uid"].as_u64()),
            (Some(0), Some(99))
        );
        assert_eq!(g["unmapped"]["lost"]["export"], 4);
        assert_eq!(g["unmapped"]["exporter"], "otlp=http://x/v1/logs");
        assert_eq!(g["severity_id"], 3);
    }

    #[tokio::test]
    async fn file_sink_appends_lines_and_starts_the_file_again_after_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ocsf.jsonl");
        let mut sink = FileSink::open(&path, "n").expect("open");
        let rec = connect("deny");
        let batch = [Exported {
            log: "acme",
            line: "{}",
            record: rec.clone(),
        }];
        sink.send(&batch).await.expect("send");
        sink.send(&batch).await.expect("send");
        assert_eq!(
            std::fs::read_to_string(&path)
                .expect("read")
                .lines()
                .count(),
            2
        );
        std::fs::rename(&path, dir.path().join("ocsf.jsonl.1")).expect("rotate");
        sink.send(&batch).await.expect("send");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 1);
        let v: Value = serde_json::from_str(text.trim()).expect("json");
        assert_eq!(v["class_uid"], 4001);
    }
}
