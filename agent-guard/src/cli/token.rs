//! `agent-guard token`: make keys and launch tokens for tests and small
//! setups. (A real orchestrator signs tokens with its own Ed25519 key in
//! its own code; the format is in `identity::token`.)

use std::{
    io::Write as _, os::unix::fs::OpenOptionsExt as _, path::PathBuf, process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::identity::token::{self, Claims};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Make an Ed25519 key pair: the signing key goes to FILE (0600), the
    /// public key (`ed25519:...`, for the policy's `token_keys`) to stdout.
    #[command(after_help = "Example:
  agent-guard token keygen --out /etc/orchestrator/issuer.key
  # then in the policy:  [[tenant]] name = \"acme\"  token_keys = [\"ed25519:<printed key>\"]")]
    Keygen {
        /// Where to write the signing key (refuses to overwrite).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Sign a launch token for `agent-guard run --token` and print it.
    #[command(after_help = "Example:
  agent-guard token issue --key issuer.key --tenant acme --agent researcher \\
      --tools search --ttl 15m --valid-for 5m --on-behalf-of alice@example.com > launch.jwt
  agent-guard run --token launch.jwt -- python3 agent.py")]
    Issue(Box<IssueArgs>),
}

#[derive(clap::Args)]
pub struct IssueArgs {
    /// Signing key file (64 hex digits, as `token keygen` writes it).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    agent: String,
    /// Task text recorded in every audit record of the tree.
    #[arg(long, value_name = "TEXT")]
    task: Option<String>,
    /// Only these tools (comma-separated; a subset of the agent's policy
    /// tools). Default: all of the agent's tools.
    #[arg(long, value_name = "TOOL,...", value_delimiter = ',')]
    tools: Option<Vec<String>>,
    /// The launched tree loses every capability after this long.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// How long the token can be used (from now).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    valid_for: Duration,
    /// Not usable before this long from now.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    not_before: Option<Duration>,
    /// Token id, accepted once (default: random).
    #[arg(long)]
    jti: Option<String>,
    /// The human or upstream principal the agent acts for.
    #[arg(long, value_name = "PRINCIPAL")]
    on_behalf_of: Option<String>,
    /// Node id the token is for (the daemon's --node-id), or `*`.
    #[arg(long, value_name = "NODE", default_value = "*")]
    aud: String,
}

pub fn main(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Keygen { out } => {
            let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("creating {} (it must not exist yet)", out.display()))?;
            writeln!(f, "{}", hex::encode(key.to_bytes()))
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", token::format_public_key(&key.verifying_key()));
        }
        Command::Issue(a) => {
            let text = std::fs::read_to_string(&a.key)
                .with_context(|| format!("reading signing key {}", a.key.display()))?;
            let key = token::parse_signing_key(&text)
                .map_err(|e| anyhow::anyhow!("signing key {}: {e}", a.key.display()))?;
            if a.valid_for.is_zero() {
                bail!("--valid-for must be longer than zero");
            }
            let now = crate::daemon::launch::unix_now();
            let claims = Claims {
                tenant: a.tenant,
                agent: a.agent,
                task: a.task,
                tools: a
                    .tools
                    .map(|v| v.into_iter().filter(|t| !t.is_empty()).collect()),
                ttl: a.ttl.map(|d| d.as_secs().max(1)),
                exp: now.saturating_add(a.valid_for.as_secs().max(1)),
                nbf: Some(now.saturating_add(a.not_before.map_or(0, |d| d.as_secs()))),
                iat: Some(now),
                jti: a.jti.unwrap_or_else(|| {
                    let bytes: [u8; 16] = rand::random();
                    hex::encode(bytes)
                }),
                on_behalf_of: a.on_behalf_of,
                aud: a.aud,
            };
            println!("{}", token::issue(&key, &claims));
        }
    }
    Ok(ExitCode::SUCCESS)
}
