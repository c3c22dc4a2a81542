//! `agent-guard audit verify|replay`: check and read the audit trail.

use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anstyle::{AnsiColor, Style};
use anyhow::{Context, bail};

use crate::{
    audit::{
        AuditRecord, AuditWriter, WriterConfig,
        checkpoint::Signer,
        format_ts,
        replay::{self, Filter, WhatIf},
        verify::{self, KeySource},
    },
    policy::Policy,
};

const DEFAULT_AUDIT_DIR: &str = "/var/lib/agent-guard/audit";

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check every tenant's hash chain and the signed checkpoints; exits 0
    /// only when all are intact, 1 otherwise, naming the first bad record.
    #[command(
        after_help = "Examples:\n  agent-guard audit verify --audit-dir /var/lib/agent-guard/audit\n  agent-guard audit verify --audit-dir /mnt/evidence/audit --public-key /secure/node.pub"
    )]
    Verify {
        /// Audit trail directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_AUDIT_DIR)]
        audit_dir: PathBuf,
        /// Public key(s) that signed the checkpoints (one hex key per line).
        /// Default: <audit-dir>/node.pub; keep a copy off the node.
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
    },
    /// Show recorded calls as a timeline, a process tree, JSON, or re-judged
    /// under another policy.
    #[command(
        after_help = "Examples:\n  agent-guard audit replay --tenant acme --agent researcher --since 1h\n  agent-guard audit replay --tenant acme --verdict deny --json\n  agent-guard audit replay --tenant acme --tree\n  agent-guard audit replay --tenant acme --what-if new-policy.toml"
    )]
    Replay(Box<ReplayArgs>),
    /// Write synthetic records (benchmarks and tests).
    #[command(hide = true)]
    Generate {
        #[arg(long, value_name = "DIR")]
        audit_dir: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        #[arg(long, default_value_t = 1)]
        tenants: u32,
        /// State dir for the signing key (default: <audit-dir>/../state).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 64 * 1024 * 1024)]
        max_file_bytes: u64,
    },
}

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// Audit trail directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_AUDIT_DIR)]
    audit_dir: PathBuf,
    /// Only this tenant (default: every tenant; `_node` for node records).
    #[arg(long, value_name = "T")]
    tenant: Option<String>,
    /// Only this agent and its sub-agents.
    #[arg(long, value_name = "A")]
    agent: Option<String>,
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    /// From this time: RFC 3339 (`2026-11-23T10:00:00Z`) or an age (`10m`,
    /// `2h`: that long ago).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Up to this time (same forms as --since).
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// `allow`, `deny` or `would_deny`.
    #[arg(long, value_name = "V", value_parser = ["allow", "deny", "would_deny"])]
    verdict: Option<String>,
    #[arg(long, value_name = "T")]
    tool: Option<String>,
    /// One JSON record per line.
    #[arg(long, conflicts_with = "tree")]
    json: bool,
    /// Process / delegation tree: subject chain, then each pid's calls.
    #[arg(long)]
    tree: bool,
    /// Show times in UTC (default: local time).
    #[arg(long)]
    utc: bool,
    /// Re-judge every recorded connect/sendmsg under this policy and list
    /// the calls whose verdict would change.
    #[arg(long, value_name = "POLICY_FILE")]
    what_if: Option<PathBuf>,
}

pub fn main(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Verify {
            audit_dir,
            public_key,
        } => verify_cmd(&audit_dir, public_key.as_deref()),
        Command::Replay(args) => replay_cmd(*args),
        Command::Generate {
            audit_dir,
            records,
            tenants,
            state_dir,
            max_file_bytes,
        } => generate(&audit_dir, records, tenants, state_dir, max_file_bytes),
    }
}

fn verify_cmd(
    audit_dir: &std::path::Path,
    public_key: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    if !audit_dir.is_dir() {
        bail!("{}: no such audit directory", audit_dir.display());
    }
    let started = Instant::now();
    let keys = match public_key {
        Some(p) => KeySource::File(p),
        None => KeySource::AuditDir,
    };
    let reports = verify::verify_dir(audit_dir, keys)
        .with_context(|| format!("reading {}", audit_dir.display()))?;
    let mut out = std::io::stdout().lock();
    let mut total = 0u64;
    let mut bad = 0usize;
    for r in &reports {
        total += r.records;
        let range = match (r.first_seq, r.last_seq) {
            (Some(a), Some(b)) => format!("seq {a}..={b}"),
            _ => "empty".into(),
        };
        let cp = r
            .last_checkpoint
            .as_ref()
            .map_or("none".into(), |c| format!("seq {} at {}", c.seq, c.ts));
        let status = if r.intact() { "ok" } else { "FAILED" };
        writeln!(
            out,
            "{}: {status}: {} records ({range}) in {} file(s); last checkpoint {cp}",
            r.chain, r.records, r.files
        )?;
        for p in &r.problems {
            writeln!(out, "  {p}")?;
        }
        for n in &r.notes {
            writeln!(out, "  note: {n}")?;
        }
        if !r.intact() {
            bad += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if bad == 0 {
        writeln!(
            out,
            "intact: {} chain(s), {total} records verified in {secs:.2} s",
            reports.len()
        )?;
        Ok(ExitCode::SUCCESS)
    } else {
        writeln!(
            out,
            "NOT INTACT: {bad} of {} chain(s) have problems ({total} records read in {secs:.2} s)",
            reports.len()
        )?;
        Ok(ExitCode::from(super::EXIT_FAILURE))
    }
}

/// RFC 3339, or an age like `10m` meaning that long before now; returned in
/// the records' own `ts` form so filters compare strings.
fn parse_time(s: &str) -> anyhow::Result<String> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(format_ts(t));
    }
    let age = humantime::parse_duration(s).with_context(|| {
        format!("{s:?} is neither an RFC 3339 time (2026-11-23T10:00:00Z) nor an age (10m, 2h)")
    })?;
    let age = time::Duration::try_from(age).context("age too large")?;
    Ok(format_ts(time::OffsetDateTime::now_utc() - age))
}

fn replay_cmd(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let filter = Filter {
        tenant: args.tenant.clone(),
        agent: args.agent.clone(),
        pid: args.pid,
        since: args.since.as_deref().map(parse_time).transpose()?,
        until: args.until.as_deref().map(parse_time).transpose()?,
        verdict: args.verdict.clone(),
        tool: args.tool.clone(),
    };
    // Read the policy before the (possibly large) trail, to fail fast.
    let what_if = match &args.what_if {
        Some(p) => Some(WhatIf::new(Policy::from_file(p)?.compile()?)),
        None => None,
    };
    let (records, stats) = replay::read(&args.audit_dir, &filter)?;
    if stats.unreadable > 0 {
        eprintln!(
            "agent-guard: {} line(s) are not records (torn or altered); run `agent-guard audit verify`",
            stats.unreadable
        );
    }
    let stdout = std::io::stdout();
    let colour = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let clock = Clock { utc: args.utc };
    if let Some(w) = what_if {
        let (changes, sum) = w.run(&records);
        let rows: Vec<Row> = changes
            .iter()
            .map(|c| {
                let mut row = Row::of(c.record, &clock);
                row.verdict = format!(
                    "{} -> {}",
                    c.record.verdict.as_deref().unwrap_or("?"),
                    c.now.verdict
                );
                row.reason = c.now.reason.to_string();
                row.tool = c.now.tool.clone().unwrap_or_else(|| row.tool.clone());
                row.colour_key = c.now.verdict;
                row
            })
            .collect();
        if args.json {
            for c in &changes {
                let mut v = serde_json::to_value(c.record)?;
                v["what_if"] = serde_json::json!({
                    "verdict": c.now.verdict, "reason": c.now.reason, "tool": c.now.tool,
                });
                writeln!(out, "{v}")?;
            }
        } else {
            print_rows(&mut out, &rows, colour)?;
        }
        let policy = args
            .what_if
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let msg = format!(
            "what-if {policy}: {} calls re-judged; {} would change: {} allowed -> denied, {} denied -> allowed, {} other (monitor/enforce)",
            sum.judged,
            changes.len(),
            sum.allow_to_deny,
            sum.deny_to_allow,
            sum.other_changes
        );
        let grants = (sum.granted > 0).then(|| {
            format!(
                "{} of them were decided by a just-in-time grant; they are judged by the base policy only",
                sum.granted
            )
        });
        // The summary goes to stderr with --json so stdout stays JSON lines.
        if args.json {
            eprintln!("{msg}");
            if let Some(g) = grants {
                eprintln!("{g}");
            }
        } else {
            writeln!(out, "{msg}")?;
            if let Some(g) = grants {
                writeln!(out, "{g}")?;
            }
        }
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.json {
        for r in &records {
            serde_json::to_writer(&mut out, r)?;
            out.write_all(b"\n")?;
        }
    } else if args.tree {
        print_tree(&mut out, &records, &clock, colour)?;
    } else {
        let rows: Vec<Row> = records.iter().map(|r| Row::of(r, &clock)).collect();
        print_rows(&mut out, &rows, colour)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Formats record times in UTC or the local zone.
struct Clock {
    utc: bool,
}

impl Clock {
    fn show(&self, ts: &str) -> String {
        let Ok(t) = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        else {
            return ts.to_string();
        };
        let t = if self.utc {
            t
        } else {
            t.to_offset(local_offset(t.unix_timestamp()))
        };
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6][offset_hour sign:mandatory]:[offset_minute]"
        );
        t.format(&fmt).unwrap_or_else(|_| ts.to_string())
    }
}

/// The local zone's offset at `unix` seconds (libc `localtime_r`, which
/// reads TZ and /etc/localtime).
fn local_offset(unix: i64) -> time::UtcOffset {
    let t = unix as libc::time_t;
    // SAFETY: `localtime_r` only writes the `tm` we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return time::UtcOffset::UTC;
    }
    time::UtcOffset::from_whole_seconds(tm.tm_gmtoff as i32).unwrap_or(time::UtcOffset::UTC)
}

/// One timeline line.
struct Row {
    time: String,
    subject: String,
    pid: String,
    kind: String,
    verdict: String,
    reason: String,
    dst: String,
    tool: String,
    grant: String,
    colour_key: &'static str,
}

impl Row {
    fn of(r: &AuditRecord, clock: &Clock) -> Row {
        let (dst, reason) = if r.kind == "gap" {
            (
                replay::lost_summary(r),
                r.detail.clone().unwrap_or_default(),
            )
        } else if r.dst.is_some() || r.proto.is_some() {
            let reason = r.reason.clone().unwrap_or_default();
            // A flow record (`daemon --flow-records`) stands for N calls.
            let reason = match r.calls {
                Some(n) => format!("{reason} ×{n}"),
                None => reason,
            };
            (replay::destination(r), reason)
        } else {
            (
                r.exe.clone().or(r.detail.clone()).unwrap_or_default(),
                r.reason.clone().unwrap_or_default(),
            )
        };
        Row {
            time: clock.show(&r.ts),
            subject: r.subject.clone().or(r.tenant.clone()).unwrap_or_default(),
            pid: r.pid.map(|p| p.to_string()).unwrap_or_default(),
            kind: r.kind.clone(),
            verdict: r.verdict.clone().unwrap_or_default(),
            reason,
            dst,
            tool: r.tool.clone().unwrap_or_default(),
            grant: r.grant.clone().unwrap_or_default(),
            colour_key: match (r.kind.as_str(), r.verdict.as_deref()) {
                ("gap", _) => "gap",
                (_, Some("deny")) => "deny",
                (_, Some("would_deny")) => "would_deny",
                (_, Some("allow")) => "allow",
                _ => "",
            },
        }
    }
}

fn style(key: &str) -> Style {
    match key {
        "deny" => Style::new().fg_color(Some(AnsiColor::Red.into())).bold(),
        "would_deny" => Style::new().fg_color(Some(AnsiColor::Yellow.into())),
        "allow" => Style::new().fg_color(Some(AnsiColor::Green.into())),
        "gap" => Style::new()
            .fg_color(Some(AnsiColor::Magenta.into()))
            .bold(),
        _ => Style::new(),
    }
}

fn print_rows(out: &mut impl Write, rows: &[Row], colour: bool) -> std::io::Result<()> {
    const HEAD: [&str; 9] = [
        "TIME",
        "SUBJECT",
        "PID",
        "KIND",
        "VERDICT",
        "REASON",
        "DESTINATION",
        "TOOL",
        "GRANT",
    ];
    let cells = |r: &Row| -> [String; 9] {
        [
            r.time.clone(),
            r.subject.clone(),
            r.pid.clone(),
            r.kind.clone(),
            r.verdict.clone(),
            r.reason.clone(),
            r.dst.clone(),
            r.tool.clone(),
            r.grant.clone(),
        ]
    };
    let mut width = HEAD.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(cells(r)) {
            *w = (*w).max(c.chars().count().min(60));
        }
    }
    let line = |out: &mut dyn Write, cells: [String; 9], st: Style| -> std::io::Result<()> {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        let s = s.trim_end();
        if colour && st != Style::new() {
            writeln!(out, "{st}{s}{st:#}")
        } else {
            writeln!(out, "{s}")
        }
    };
    line(out, HEAD.map(str::to_string), Style::new().bold())?;
    for r in rows {
        line(out, cells(r), style(r.colour_key))?;
    }
    Ok(())
}

fn print_tree(
    out: &mut impl Write,
    records: &[AuditRecord],
    clock: &Clock,
    colour: bool,
) -> std::io::Result<()> {
    let paint = |key: &str, s: String| {
        if colour {
            let st = style(key);
            format!("{st}{s}{st:#}")
        } else {
            s
        }
    };
    let t = replay::tree(records);
    for (tenant, node) in &t.tenants {
        writeln!(out, "{tenant}")?;
        for g in &node.gaps {
            writeln!(
                out,
                "  {}",
                paint(
                    "gap",
                    format!(
                        "! gap {}: {} ({})",
                        clock.show(&g.ts),
                        replay::lost_summary(g),
                        g.detail.as_deref().unwrap_or("")
                    )
                )
            )?;
        }
        for (subject, procs) in &node.subjects {
            let depth = subject.matches('/').count();
            let indent = "  ".repeat(depth);
            writeln!(out, "{indent}{subject}")?;
            for p in procs {
                writeln!(
                    out,
                    "{indent}  pid {} ({}{}){}",
                    p.pid,
                    p.comm.unwrap_or("?"),
                    p.exe.map(|e| format!(" {e}")).unwrap_or_default(),
                    p.ppid.map(|pp| format!(" ppid {pp}")).unwrap_or_default()
                )?;
                for r in &p.records {
                    let what = match r.kind.as_str() {
                        "connect" | "sendmsg" | "socket" => {
                            let v = r.verdict.as_deref().unwrap_or("?");
                            let mut s = format!(
                                "{} {} {:<10} {}",
                                clock.show(&r.ts),
                                r.kind,
                                v,
                                replay::destination(r)
                            );
                            if let Some(t) = &r.tool {
                                s.push_str(&format!(" tool={t}"));
                            }
                            if let Some(g) = &r.grant {
                                s.push_str(&format!(" grant={g}"));
                            }
                            if let Some(why) = &r.reason {
                                s.push_str(&format!(" ({why})"));
                            }
                            if let Some(n) = r.calls {
                                s.push_str(&format!(" ×{n} calls"));
                            }
                            paint(v, s)
                        }
                        "fork" => format!(
                            "{} fork -> pid {}",
                            clock.show(&r.ts),
                            r.child.map(|c| c.to_string()).unwrap_or_default()
                        ),
                        "exec" => format!(
                            "{} exec {}",
                            clock.show(&r.ts),
                            r.exe.as_deref().unwrap_or("?")
                        ),
                        other => format!("{} {other}", clock.show(&r.ts)),
                    };
                    writeln!(out, "{indent}    {what}")?;
                }
            }
        }
    }
    Ok(())
}

/// Synthetic, realistic records for benchmarks: connects (allowed and
/// denied), with exec/exit framing, spread over tenants.
fn generate(
    audit_dir: &std::path::Path,
    records: u64,
    tenants: u32,
    state_dir: Option<PathBuf>,
    max_file_bytes: u64,
) -> anyhow::Result<ExitCode> {
    let state_dir = state_dir.unwrap_or_else(|| audit_dir.with_extension("state"));
    let cfg = WriterConfig {
        max_file_bytes,
        signer: Some(Signer::load_or_create(&state_dir)?),
        fsync_interval: Duration::from_secs(3600),
        ..WriterConfig::default()
    };
    let mut w = AuditWriter::with_config(audit_dir, cfg)?;
    let started = Instant::now();
    let base = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    for i in 0..records {
        let tenant = format!("tenant{}", i % u64::from(tenants.max(1)));
        let mut r = AuditRecord::new(if i % 50 == 0 { "exec" } else { "connect" });
        r.ts = format_ts(base + time::Duration::microseconds(i as i64));
        r.tenant = Some(tenant.clone());
        r.agent = Some("researcher".into());
        r.subject = Some(format!("{tenant}/researcher"));
        r.pid = Some(10_000 + (i / 50) as u32);
        r.ppid = Some(9_999);
        r.uid = Some(1000);
        r.comm = Some("python3".into());
        r.exe = Some("/usr/bin/python3".into());
        r.cgroup = Some(4242);
        if r.kind == "connect" {
            let denied = i % 7 == 0;
            r.dst = Some("127.0.0.1".into());
            r.port = Some(if denied { 18082 } else { 18081 });
            r.proto = Some("tcp".into());
            r.verdict = Some(if denied { "deny" } else { "allow" }.into());
            r.reason = Some(if denied { "no_capability" } else { "granted" }.into());
            r.tool = (!denied).then(|| "search".to_string());
        }
        w.append(&tenant, r)?;
        if i % 1024 == 0
            && let Some(f) = w.flush().into_iter().next()
        {
            return Err(f.error.into());
        }
    }
    if let Some(f) = w.close().into_iter().next() {
        return Err(f.error.into());
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "wrote {records} records in {secs:.2} s ({:.0} records/s) to {}",
        records as f64 / secs,
        audit_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
