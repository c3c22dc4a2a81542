//! `agent-guard audit verify|replay`: check and read the audit trail.

use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anstyle::{AnsiColor, Style};
use anyhow::{Context, bail};

use crate::{
    audit::{
        AuditRecord, AuditWriter, WriterConfig,
        checkpoint::Signer,
        format_ts,
        progress::Progress,
        replay::{self, Filter, Ordered, ReadStats, Trail, TreeItem, WhatIf, WhatIfSummary},
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
        /// No progress line on stderr (there is none unless stderr is a
        /// terminal).
        #[arg(long, short)]
        quiet: bool,
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
    /// No progress line on stderr (there is none unless stderr is a
    /// terminal).
    #[arg(long, short)]
    quiet: bool,
}

pub fn main(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Verify {
            audit_dir,
            public_key,
            quiet,
        } => verify_cmd(&audit_dir, public_key.as_deref(), quiet),
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
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    if !audit_dir.is_dir() {
        bail!(
            "{}: no such audit directory (pass --audit-dir DIR, the daemon's --audit-dir; default {DEFAULT_AUDIT_DIR})",
            audit_dir.display()
        );
    }
    let started = Instant::now();
    let keys = match public_key {
        Some(p) => KeySource::File(p),
        None => KeySource::AuditDir,
    };
    let progress = Arc::new(Progress::default());
    let shown = ShowProgress::start(&progress, "verify", quiet);
    let reports = verify::verify_dir_with_progress(audit_dir, keys, &progress)
        .with_context(|| format!("reading {}", audit_dir.display()))?;
    shown.stop();
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
        let mut faults: Vec<verify::Fault> = Vec::new();
        for p in reports.iter().flat_map(|r| &r.problems) {
            if !faults.contains(&p.fault) {
                faults.push(p.fault);
            }
        }
        for f in faults {
            writeln!(out, "what to do ({}): {}", f.as_str(), f.fix())?;
        }
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
    let trail = Trail::open(&args.audit_dir, filter.tenant.as_deref())?;
    let stdout = std::io::stdout();
    let on_terminal = stdout.is_terminal();
    let colour = on_terminal && std::env::var_os("NO_COLOR").is_none();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let clock = Clock { utc: args.utc };
    let progress = Arc::new(Progress::default());
    let mut stats = ReadStats::default();
    let shown = ShowProgress::start(&progress, "replay", args.quiet);
    // Output on the same terminal as the progress line: the line goes
    // when output starts.
    let output_starts = || {
        if on_terminal {
            shown.stop();
        }
    };
    let w = |e: std::io::Error| replay::ReplayError::Output(e);
    if let Some(judge) = &what_if {
        let mut sum = WhatIfSummary::default();
        if args.json {
            output_starts();
            replay::stream(&trail, &filter, &progress, &mut stats, |r| {
                let Some(now) = judge.judge(r) else {
                    return Ok(());
                };
                if sum.add(r, &now) {
                    let mut v = serde_json::to_value(r).map_err(|e| w(e.into()))?;
                    v["what_if"] = serde_json::json!({
                        "verdict": now.verdict, "reason": now.reason, "tool": now.tool,
                    });
                    writeln!(out, "{v}").map_err(w)?;
                }
                Ok(())
            })?;
        } else {
            let changed_row = |r: &AuditRecord| {
                let now = judge.judge(r)?;
                (r.verdict.as_deref().unwrap_or("") != now.verdict).then(|| {
                    let mut row = Row::of(r, &clock);
                    row.verdict =
                        format!("{} -> {}", r.verdict.as_deref().unwrap_or("?"), now.verdict);
                    row.reason = now.reason.to_string();
                    row.tool = now.tool.clone().unwrap_or_else(|| row.tool.clone());
                    row.colour_key = now.verdict;
                    row
                })
            };
            let mut table = Table::default();
            progress.set_total(trail.bytes(), 2);
            let ordered = Ordered::build(&trail, &filter, &progress, &mut stats, |r, _| {
                if let Some(now) = judge.judge(r) {
                    sum.add(r, &now);
                }
                if let Some(row) = changed_row(r) {
                    table.fit(&row);
                }
                Ok(())
            })?;
            output_starts();
            table.head(&mut out, colour).map_err(w)?;
            ordered.each(&progress, |r, _| {
                if let Some(row) = changed_row(r) {
                    table.line(&mut out, &row, colour).map_err(w)?;
                }
                Ok(())
            })?;
        }
        shown.stop();
        let policy = args
            .what_if
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let msg = format!(
            "what-if {policy}: {} calls re-judged; {} would change: {} allowed -> denied, {} denied -> allowed, {} other (monitor/enforce)",
            sum.judged, sum.changed, sum.allow_to_deny, sum.deny_to_allow, sum.other_changes
        );
        let grants = (sum.granted > 0).then(|| {
            format!(
                "{} of them were decided by a just-in-time grant; they are judged by the base policy only",
                sum.granted
            )
        });
        // The summary goes to stderr with --json so stdout stays JSON lines.
        if args.json {
            out.flush()?;
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
    } else if args.json {
        output_starts();
        replay::stream(&trail, &filter, &progress, &mut stats, |r| {
            serde_json::to_writer(&mut out, r).map_err(|e| w(e.into()))?;
            out.write_all(b"\n").map_err(w)
        })?;
    } else if args.tree {
        // The tree prints only in its last pass.
        print_tree(
            &mut out,
            &trail,
            &filter,
            &progress,
            &mut stats,
            &clock,
            colour,
            &output_starts,
        )?;
    } else {
        let mut table = Table::default();
        progress.set_total(trail.bytes(), 2);
        let ordered = Ordered::build(&trail, &filter, &progress, &mut stats, |r, _| {
            table.fit(&Row::of(r, &clock));
            Ok(())
        })?;
        output_starts();
        table.head(&mut out, colour).map_err(w)?;
        ordered.each(&progress, |r, _| {
            table.line(&mut out, &Row::of(r, &clock), colour).map_err(w)
        })?;
    }
    shown.stop();
    out.flush()?;
    if stats.unreadable > 0 {
        let at = stats
            .first_unreadable
            .as_ref()
            .map(|(f, l)| format!(", the first at {}:{l}", f.display()))
            .unwrap_or_default();
        eprintln!(
            "agent-guard: {} line(s) are not records (torn or altered){at}; run `agent-guard audit verify --audit-dir {}` to see why",
            stats.unreadable,
            args.audit_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A single updating progress line on stderr, when stderr is a terminal
/// and not `--quiet`: the pass, bytes read of the trail, records/s.
struct ShowProgress {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Nothing is drawn for reads shorter than this.
const PROGRESS_AFTER: Duration = Duration::from_millis(500);
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

impl ShowProgress {
    fn start(progress: &Arc<Progress>, what: &'static str, quiet: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let (progress, stop) = (progress.clone(), stop.clone());
            std::thread::spawn(move || draw_progress(&progress, what, &stop))
        });
        Self {
            stop,
            thread: Mutex::new(thread),
        }
    }

    /// Clears the line and draws no more (before output to the terminal,
    /// and at the end).
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for ShowProgress {
    fn drop(&mut self) {
        self.stop();
    }
}

fn draw_progress(progress: &Progress, what: &str, stop: &AtomicBool) {
    let started = Instant::now();
    let mut drawn = false;
    let mut err = std::io::stderr();
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(PROGRESS_EVERY);
        if stop.load(Ordering::Relaxed) || started.elapsed() < PROGRESS_AFTER {
            continue;
        }
        let s = progress.snapshot();
        let secs = s.in_pass.as_secs_f64().max(1e-3);
        let of_passes = if s.passes > 1 {
            format!(" pass {}/{}:", s.pass, s.passes)
        } else {
            String::new()
        };
        let pct = if s.total_bytes > 0 {
            format!(" ({:.0}%)", 100.0 * s.bytes as f64 / s.total_bytes as f64)
        } else {
            String::new()
        };
        let _ = write!(
            err,
            "\r\x1b[2K{what}:{of_passes} {} of {}{pct}, {} records, {:.0} records/s",
            human_bytes(s.bytes),
            human_bytes(s.total_bytes),
            s.records,
            s.records as f64 / secs
        );
        let _ = err.flush();
        drawn = true;
    }
    if drawn {
        let _ = write!(err, "\r\x1b[2K");
        let _ = err.flush();
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
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
            // A damaged `ts` near year 9999 has no local form (to_offset
            // would panic): show it as recorded.
            match t.checked_to_offset(local_offset(t.unix_timestamp())) {
                Some(t) => t,
                None => return ts.to_string(),
            }
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

/// The timeline's columns, sized over every row in a first pass and
/// printed in a second, so no row is held.
struct Table {
    width: [usize; 9],
}

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

impl Default for Table {
    fn default() -> Self {
        Self {
            width: HEAD.map(str::len),
        }
    }
}

impl Table {
    fn cells(r: &Row) -> [&str; 9] {
        [
            &r.time, &r.subject, &r.pid, &r.kind, &r.verdict, &r.reason, &r.dst, &r.tool, &r.grant,
        ]
    }

    fn fit(&mut self, r: &Row) {
        for (w, c) in self.width.iter_mut().zip(Self::cells(r)) {
            *w = (*w).max(c.chars().count().min(60));
        }
    }

    fn head(&self, out: &mut impl Write, colour: bool) -> std::io::Result<()> {
        self.print(out, HEAD, Style::new().bold(), colour)
    }

    fn line(&self, out: &mut impl Write, r: &Row, colour: bool) -> std::io::Result<()> {
        self.print(out, Self::cells(r), style(r.colour_key), colour)
    }

    fn print(
        &self,
        out: &mut impl Write,
        cells: [&str; 9],
        st: Style,
        colour: bool,
    ) -> std::io::Result<()> {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(self.width).enumerate() {
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
    }
}

#[allow(clippy::too_many_arguments)]
fn print_tree(
    out: &mut impl Write,
    trail: &Trail,
    filter: &Filter,
    progress: &Progress,
    stats: &mut ReadStats,
    clock: &Clock,
    colour: bool,
    output_starts: &dyn Fn(),
) -> Result<(), replay::ReplayError> {
    let paint = |key: &str, s: String| {
        if colour {
            let st = style(key);
            format!("{st}{s}{st:#}")
        } else {
            s
        }
    };
    let mut started = false;
    let mut indent = String::new();
    replay::tree(trail, filter, progress, stats, |item| {
        if !started {
            started = true;
            output_starts();
        }
        let w = replay::ReplayError::Output;
        match item {
            TreeItem::Tenant(tenant) => writeln!(out, "{tenant}").map_err(w),
            TreeItem::Gap(g) => writeln!(
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
            )
            .map_err(w),
            TreeItem::Subject(subject) => {
                indent = "  ".repeat(subject.matches('/').count());
                writeln!(out, "{indent}{subject}").map_err(w)
            }
            TreeItem::Process(p, names) => writeln!(
                out,
                "{indent}  pid {} ({}{}){}",
                p.pid,
                p.comm(names).unwrap_or("?"),
                p.exe(names).map(|e| format!(" {e}")).unwrap_or_default(),
                p.ppid.map(|pp| format!(" ppid {pp}")).unwrap_or_default()
            )
            .map_err(w),
            TreeItem::Record(r) => {
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
                writeln!(out, "{indent}    {what}").map_err(w)
            }
        }
    })
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
