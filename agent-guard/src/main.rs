//! agent-guard: kernel-enforced egress fence and audit trail for AI agent
//! processes. This file only parses the command line and dispatches.

use std::process::ExitCode;

use agent_guard::cli;
use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agent-guard: error: {}", cli::error_chain(&e));
            ExitCode::from(cli::EXIT_FAILURE)
        }
    }
}
