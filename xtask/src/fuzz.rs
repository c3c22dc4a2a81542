//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` for a while
//! each and prints what they did.
//!
//! The fuzz crate is its own workspace (nightly, sanitizers), so it never
//! takes part in the root workspace's builds. cargo-fuzz is installed when
//! missing. Each target runs with its committed seeds in
//! `fuzz/corpus/<target>/` (libFuzzer adds what it finds there; only the
//! `seed-*` files are tracked); its output goes to
//! `target/fuzz/<target>.log`, crash inputs to `fuzz/artifacts/<target>/`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{
    Workspace, cargo_home, cargo_program, describe, find_in_path, is_executable, run_cmd,
    scrub_build_env,
};

/// The `[[bin]]` targets of `fuzz/Cargo.toml`, in the order they run.
pub(crate) const TARGETS: &[&str] = &[
    "policy",
    "control_request",
    "dns_message",
    "audit_record",
    "token",
];

pub(crate) const FUZZ_DIR: &str = "fuzz";
const CARGO_FUZZ_CMD: &str = "cargo install cargo-fuzz --locked";

#[derive(clap::Args, Debug, PartialEq, Eq)]
pub struct FuzzArgs {
    /// Seconds to fuzz each target (libFuzzer -max_total_time).
    #[arg(long, value_name = "N", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) seconds: u64,
    /// Targets to run, in this order [default: all of them].
    #[arg(value_name = "TARGET", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub(crate) targets: Vec<String>,
}

impl FuzzArgs {
    /// The targets to run: the ones named (duplicates dropped), else all.
    pub(crate) fn selected(&self) -> Vec<&str> {
        if self.targets.is_empty() {
            return TARGETS.to_vec();
        }
        let mut out: Vec<&str> = Vec::new();
        for t in &self.targets {
            if !out.contains(&t.as_str()) {
                out.push(t);
            }
        }
        out
    }
}

/// How one target's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    /// libFuzzer saved an input: `kind` is `crash`, `timeout`, `oom`,
    /// `leak`, ... (the artifact's name prefix).
    Found {
        kind: String,
        artifact: String,
    },
    /// It stopped without saying why (build failure, bad option, ...).
    Failed(String),
}

/// What a libFuzzer log says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct LogSummary {
    pub(crate) runs: Option<u64>,
    pub(crate) exec_per_sec: Option<u64>,
    pub(crate) new_units: Option<u64>,
    pub(crate) artifact: Option<String>,
}

/// Reads the numbers and the artifact path out of libFuzzer's output
/// (`-print_final_stats=1`; status lines `#N ... exec/s: E` as fallback).
pub(crate) fn parse_log(log: &str) -> LogSummary {
    let mut s = LogSummary::default();
    let number = |v: &str| v.trim().parse::<u64>().ok();
    for line in log.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            s.runs = number(v);
        } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
            s.exec_per_sec = number(v);
        } else if let Some(v) = line.strip_prefix("stat::new_units_added:") {
            s.new_units = number(v);
        } else if let Some((_, path)) = line.split_once("Test unit written to ") {
            s.artifact = Some(path.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("Done ")
            && let Some((runs, _)) = rest.split_once(" runs in ")
        {
            s.runs = number(runs).or(s.runs);
        } else if let Some(rest) = line.strip_prefix('#') {
            // `#123	NEW    cov: ... exec/s: 456 rss: ...`: progress so far,
            // overridden by the final stats when they come.
            let mut words = rest.split_whitespace();
            if let Some(n) = words.next().and_then(number) {
                s.runs = Some(s.runs.map_or(n, |r| r.max(n)));
            }
            if let Some(e) = rest
                .split_once("exec/s:")
                .and_then(|(_, e)| e.split_whitespace().next())
                .and_then(number)
            {
                s.exec_per_sec = Some(e);
            }
        }
    }
    s
}

/// The lines of a failed run's log worth printing: the panic or sanitizer
/// report's first lines and where the input went, else the log's end.
pub(crate) fn crash_excerpt(log: &str) -> Vec<&str> {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.iter().position(|l| {
        l.contains("panicked at")
            || l.contains("ERROR: AddressSanitizer")
            || l.contains("ERROR: LeakSanitizer")
            || l.contains("ERROR: libFuzzer")
    });
    let Some(start) = start else {
        return lines[lines.len().saturating_sub(40)..].to_vec();
    };
    let mut out: Vec<&str> = lines[start..].iter().take(4).copied().collect();
    if let Some(written) = lines.iter().find(|l| l.contains("Test unit written to ")) {
        out.push("...");
        out.push(written);
    }
    out
}

/// The kind of input libFuzzer saved, from the artifact's file name.
fn artifact_kind(artifact: &str) -> String {
    let name = Path::new(artifact)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(artifact);
    match name.rsplit_once('-') {
        Some((kind, _)) if !kind.is_empty() => kind.to_string(),
        _ => "crash".to_string(),
    }
}

fn cargo_fuzz_path() -> Option<PathBuf> {
    find_in_path("cargo-fuzz").or_else(|| {
        cargo_home()
            .map(|h| h.join("bin/cargo-fuzz"))
            .filter(|p| is_executable(p))
    })
}

/// Installs cargo-fuzz unless it is there already.
fn ensure_cargo_fuzz() -> Result<()> {
    if cargo_fuzz_path().is_some() {
        return Ok(());
    }
    eprintln!("xtask fuzz: cargo-fuzz is missing; installing it ({CARGO_FUZZ_CMD})");
    let mut cmd = Command::new(cargo_program());
    cmd.args(["install", "cargo-fuzz", "--locked"]);
    scrub_build_env(&mut cmd);
    run_cmd(&mut cmd).context("installing cargo-fuzz failed")?;
    if cargo_fuzz_path().is_none() {
        bail!("cargo-fuzz was installed but is neither on PATH nor in $CARGO_HOME/bin");
    }
    Ok(())
}

/// `cargo +nightly fuzz ...` in the workspace root, with `$CARGO_HOME/bin`
/// on PATH so cargo finds the subcommand even under sudo.
fn cargo_fuzz(ws: &Workspace) -> Command {
    let mut cmd = Command::new(cargo_program());
    scrub_build_env(&mut cmd);
    cmd.current_dir(&ws.root).args(["+nightly", "fuzz"]);
    if let Some(dir) = cargo_fuzz_path().and_then(|p| p.parent().map(Path::to_path_buf))
        && let Some(path) = crate::path_with(&[dir])
    {
        cmd.env("PATH", path);
    }
    cmd
}

struct Row {
    target: String,
    summary: LogSummary,
    outcome: Outcome,
}

fn run_target(ws: &Workspace, target: &str, seconds: u64, log_dir: &Path) -> Result<Row> {
    let corpus = ws.root.join(FUZZ_DIR).join("corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let log_path = log_dir.join(format!("{target}.log"));
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = cargo_fuzz(ws);
    cmd.args(["run", target])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log file handle")?)
        .stderr(log);
    let what = describe(&cmd);
    eprintln!(
        "xtask fuzz: {target}: {seconds} s (log: {})",
        log_path.display()
    );
    eprintln!("xtask: running {what}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{what}`"))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let summary = parse_log(&text);
    let outcome = match (&summary.artifact, status.success()) {
        (Some(artifact), _) => Outcome::Found {
            kind: artifact_kind(artifact),
            artifact: artifact.clone(),
        },
        (None, true) => Outcome::Ok,
        (None, false) => Outcome::Failed(status.to_string()),
    };
    if outcome != Outcome::Ok {
        eprintln!("xtask fuzz: {target}: from {}:", log_path.display());
        for l in crash_excerpt(&text) {
            eprintln!("    {l}");
        }
    }
    Ok(Row {
        target: target.to_string(),
        summary,
        outcome,
    })
}

fn render_table(rows: &[Row], seconds: u64) -> String {
    let mut out = format!(
        "{:<16} {:>7} {:>12} {:>9} {:>6}  result\n",
        "target", "seconds", "runs", "exec/s", "new"
    );
    let num = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
    for r in rows {
        let result = match &r.outcome {
            Outcome::Ok => "ok".to_string(),
            Outcome::Found { kind, artifact } => format!("{} {artifact}", kind.to_uppercase()),
            Outcome::Failed(why) => format!("FAILED ({why})"),
        };
        out.push_str(&format!(
            "{:<16} {:>7} {:>12} {:>9} {:>6}  {result}\n",
            r.target,
            seconds,
            num(r.summary.runs),
            num(r.summary.exec_per_sec),
            num(r.summary.new_units),
        ));
    }
    out
}

pub fn fuzz(ws: &Workspace, args: &FuzzArgs) -> Result<()> {
    let targets = args.selected();
    ensure_cargo_fuzz()?;
    // One build for every target, so the timed runs only fuzz.
    let mut build = cargo_fuzz(ws);
    build.arg("build");
    if let [only] = targets.as_slice() {
        build.arg(only);
    }
    run_cmd(&mut build).context("building the fuzz targets failed")?;

    let log_dir = ws.target.join("fuzz");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let mut rows = Vec::new();
    for target in &targets {
        rows.push(run_target(ws, target, args.seconds, &log_dir)?);
    }
    eprintln!();
    eprint!("{}", render_table(&rows, args.seconds));

    let bad: Vec<&Row> = rows.iter().filter(|r| r.outcome != Outcome::Ok).collect();
    if bad.is_empty() {
        return Ok(());
    }
    let mut msg = String::from("fuzzing found problems:");
    for r in bad {
        match &r.outcome {
            Outcome::Found { kind, artifact } => msg.push_str(&format!(
                "\n  {}: {kind}, input saved as {artifact}\n    reproduce: cargo +nightly fuzz run {} {artifact}",
                r.target, r.target
            )),
            Outcome::Failed(why) => msg.push_str(&format!(
                "\n  {}: cargo fuzz run failed ({why}); see {}",
                r.target,
                log_dir.join(format!("{}.log", r.target)).display()
            )),
            Outcome::Ok => {}
        }
    }
    bail!(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_the_fuzz_crates_bins() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/Cargo.toml");
        let text = std::fs::read_to_string(&manifest).expect("fuzz/Cargo.toml");
        let mut bins = Vec::new();
        let mut in_bin = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if in_bin && let Some(v) = line.strip_prefix("name = ") {
                bins.push(v.trim_matches('"').to_string());
            }
        }
        assert_eq!(
            bins, TARGETS,
            "TARGETS must list fuzz/Cargo.toml's [[bin]]s"
        );
        for t in TARGETS {
            let seeds = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/corpus")
                .join(t);
            let has_seed = std::fs::read_dir(&seeds)
                .map(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("seed-"))
                })
                .unwrap_or(false);
            assert!(has_seed, "{} has no seed-* file", seeds.display());
        }
    }

    #[test]
    fn log_of_a_clean_run() {
        let log = "\
INFO: Seed: 1234
#2\tINITED cov: 500 ft: 600 corp: 3/200b exec/s: 0 rss: 40Mb
#1024\tpulse  cov: 700 ft: 900 corp: 20/1kb lim: 4 exec/s: 512 rss: 45Mb
#20000\tNEW    cov: 701 ft: 905 corp: 21/1kb lim: 8 exec/s: 2000 rss: 46Mb
Done 25310 runs in 11 second(s)
stat::number_of_executed_units: 25310
stat::average_exec_per_sec:     2300
stat::new_units_added:          18
stat::slowest_unit_time_sec:    0
stat::peak_rss_mb:              47
";
        assert_eq!(
            parse_log(log),
            LogSummary {
                runs: Some(25310),
                exec_per_sec: Some(2300),
                new_units: Some(18),
                artifact: None,
            }
        );
    }

    #[test]
    fn log_of_a_crash() {
        let log = "\
#4096\tpulse  cov: 700 ft: 900 corp: 20/1kb lim: 4 exec/s: 2048 rss: 45Mb
thread '<unnamed>' panicked at agent-guard/src/audit/verify.rs:10:5:
byte index 12 is not a char boundary
==1234== ERROR: libFuzzer: deadly signal
MS: 1 ChangeByte-; base unit: 0123
artifact_prefix='/w/fuzz/artifacts/audit_record/'; Test unit written to /w/fuzz/artifacts/audit_record/crash-5f1e
Base64: AQID
stat::number_of_executed_units: 5000
stat::average_exec_per_sec:     2500
";
        let s = parse_log(log);
        assert_eq!(s.runs, Some(5000));
        assert_eq!(s.exec_per_sec, Some(2500));
        let artifact = s.artifact.expect("artifact");
        assert_eq!(artifact, "/w/fuzz/artifacts/audit_record/crash-5f1e");
        assert_eq!(artifact_kind(&artifact), "crash");
        assert_eq!(
            artifact_kind("fuzz/artifacts/x/slow-unit-ab12"),
            "slow-unit"
        );
        assert_eq!(artifact_kind("timeout-ab12"), "timeout");
    }

    #[test]
    fn excerpt_shows_the_panic_and_the_artifact() {
        let log = "\
#4096\tpulse  cov: 700
thread '<unnamed>' panicked at agent-guard/src/audit/verify.rs:10:5:
byte index 12 is not a char boundary
stack backtrace:
   0: one
   1: two
   2: three
==1234== ERROR: libFuzzer: deadly signal
artifact_prefix='/a/'; Test unit written to /a/crash-1
";
        assert_eq!(
            crash_excerpt(log),
            [
                "thread '<unnamed>' panicked at agent-guard/src/audit/verify.rs:10:5:",
                "byte index 12 is not a char boundary",
                "stack backtrace:",
                "   0: one",
                "...",
                "artifact_prefix='/a/'; Test unit written to /a/crash-1",
            ]
        );
        let plain: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let tail = crash_excerpt(&plain);
        assert_eq!((tail.len(), tail[0]), (40, "line 60"));
    }

    #[test]
    fn log_without_final_stats_falls_back_to_status_lines() {
        let log = "#8192\tpulse  cov: 1 ft: 1 corp: 1/1b exec/s: 4096 rss: 30Mb\n";
        let s = parse_log(log);
        assert_eq!((s.runs, s.exec_per_sec), (Some(8192), Some(4096)));
    }

    #[test]
    fn table_names_the_crash_file() {
        let rows = [
            Row {
                target: "policy".into(),
                summary: LogSummary {
                    runs: Some(10),
                    exec_per_sec: Some(1),
                    new_units: Some(0),
                    artifact: None,
                },
                outcome: Outcome::Ok,
            },
            Row {
                target: "token".into(),
                summary: LogSummary::default(),
                outcome: Outcome::Found {
                    kind: "crash".into(),
                    artifact: "fuzz/artifacts/token/crash-1".into(),
                },
            },
        ];
        let table = render_table(&rows, 10);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("policy") && lines[1].ends_with("  ok"));
        assert!(lines[2].ends_with("CRASH fuzz/artifacts/token/crash-1"));
    }
}
