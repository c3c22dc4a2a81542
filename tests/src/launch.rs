//! `agent-guard run` command lines: a tagged launch with its scope flags
//! ([`Launch`]), and the argv of a sub-agent started from inside one
//! ([`Daemon::sub_agent_cmd`]).

use std::{
    ffi::OsStr,
    process::{Child, Command, Output, Stdio},
};

use crate::{Daemon, agent_guard_bin, probe_bin};

/// `agent-guard run --tenant T --agent A [--task ..] [--tools ..] [--ttl ..]
/// -- CMD...` against one daemon; made by [`Daemon::launch`].
#[derive(Clone)]
pub struct Launch<'d> {
    daemon: &'d Daemon,
    /// `--tenant T --agent A` and the scope flags after them.
    pub(crate) flags: Vec<String>,
}

impl Daemon {
    /// A launch as `tenant`/`agent`, to narrow with [`Launch::task`],
    /// [`Launch::tools`] and [`Launch::ttl`] before running it.
    pub fn launch(&self, tenant: &str, agent: &str) -> Launch<'_> {
        Launch {
            daemon: self,
            flags: ["--tenant", tenant, "--agent", agent]
                .map(String::from)
                .to_vec(),
        }
    }

    /// The argv of `agent-guard run --socket S SUB_ARGS -- probe
    /// PROBE_ARGS`: a sub-agent, for a tagged process to start (or, joined
    /// with spaces, for a shell script to run).
    pub fn sub_agent_cmd(&self, sub_args: &[&str], probe_args: &[&str]) -> Vec<String> {
        let mut cmd = vec![
            utf8(&agent_guard_bin()),
            "run".into(),
            "--socket".into(),
            utf8(&self.socket),
        ];
        cmd.extend(sub_args.iter().map(|s| s.to_string()));
        cmd.push("--".into());
        cmd.push(utf8(&probe_bin()));
        cmd.extend(probe_args.iter().map(|s| s.to_string()));
        cmd
    }
}

fn utf8(p: &std::path::Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

impl Launch<'_> {
    fn flag(mut self, name: &str, value: &str) -> Self {
        self.flags.extend([name.to_string(), value.to_string()]);
        self
    }

    /// `--task NAME`: a task scope.
    pub fn task(self, name: &str) -> Self {
        self.flag("--task", name)
    }

    /// `--tools A,B`: narrow to these tools (`""` for none).
    pub fn tools(self, tools: &str) -> Self {
        self.flag("--tools", tools)
    }

    /// `--ttl DURATION` of the task scope.
    pub fn ttl(self, ttl: &str) -> Self {
        self.flag("--ttl", ttl)
    }

    /// Runs `cmd` to completion (socket in `AGENT_GUARD_SOCKET`, stdin
    /// closed, like [`Daemon::cli`]).
    pub fn output<S: AsRef<OsStr>>(&self, cmd: &[S]) -> Output {
        Command::new(agent_guard_bin())
            .arg("run")
            .args(&self.flags)
            .arg("--")
            .args(cmd)
            .env("AGENT_GUARD_SOCKET", &self.daemon.socket)
            .stdin(Stdio::null())
            .output()
            .expect("run agent-guard")
    }

    /// Runs the probe with `args` to completion.
    pub fn probe(&self, args: &[&str]) -> Output {
        self.output(&probe_cmd(args))
    }

    /// `agent-guard run FLAGS --socket S -- CMD...` as a [`Command`] to
    /// adjust (stdio, directory) before it runs.
    pub fn command<S: AsRef<OsStr>>(&self, cmd: &[S]) -> Command {
        let mut c = Command::new(agent_guard_bin());
        c.arg("run")
            .args(&self.flags)
            .arg("--socket")
            .arg(&self.daemon.socket)
            .arg("--")
            .args(cmd);
        c
    }

    /// [`Launch::command`] for the probe with `args`.
    pub fn probe_command(&self, args: &[&str]) -> Command {
        self.command(&probe_cmd(args))
    }

    /// Starts `cmd` without waiting for it (stdout discarded).
    pub fn spawn<S: AsRef<OsStr>>(&self, cmd: &[S]) -> Child {
        self.command(cmd)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn tagged process")
    }

    /// Starts the probe with `args` (typically `after MS ...`) without
    /// waiting for it.
    pub fn spawn_probe(&self, args: &[&str]) -> Child {
        self.spawn(&probe_cmd(args))
    }
}

fn probe_cmd(args: &[&str]) -> Vec<String> {
    let mut cmd = vec![utf8(&probe_bin())];
    cmd.extend(args.iter().map(|s| s.to_string()));
    cmd
}
