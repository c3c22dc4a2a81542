//! Tables of probe calls and the exit status each must give
//! ([`Launch::expect_probes`]), and control commands that must succeed
//! ([`Daemon::cli_ok`]).

use std::process::Output;

use crate::{Daemon, Launch, probe};

/// One row of a probe table: the probe's arguments and the exit status
/// (a [`probe`] constant) the call must give.
pub type ProbeRow<'a> = (&'a [&'a str], i32);

impl Launch<'_> {
    /// Runs the probe under this launch once per row, in the rows' order,
    /// and asserts each exit status. A mismatch names the row, the launch
    /// flags, the arguments, what the call gave and what was wanted, with
    /// the probe's output; every call is also logged to stderr (libtest
    /// shows it when the test fails).
    pub fn expect_probes(&self, rows: &[ProbeRow<'_>]) {
        let who = self.flags.join(" ");
        for (i, &(args, want)) in rows.iter().enumerate() {
            let out = self.probe(args);
            let got = out.status.code().unwrap_or(-1);
            let output = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("{who} {args:?} -> {got}\n{output}");
            assert!(
                got == want,
                "probe row {} of {}: {who} {args:?} exited {}, want {}\n{output}",
                i + 1,
                rows.len(),
                probe::name(got),
                probe::name(want),
            );
        }
    }

    /// [`Launch::expect_probes`] with one row.
    pub fn expect_probe(&self, args: &[&str], want: i32) {
        self.expect_probes(&[(args, want)]);
    }
}

impl Daemon {
    /// [`Launch::expect_probes`] as `tenant`/`agent`.
    pub fn expect_probes(&self, tenant: &str, agent: &str, rows: &[ProbeRow<'_>]) {
        self.launch(tenant, agent).expect_probes(rows);
    }

    /// [`Daemon::cli`] that must succeed; a failure names the command and
    /// shows its stderr.
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "agent-guard {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}
