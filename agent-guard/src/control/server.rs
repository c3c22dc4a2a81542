//! The daemon end of the control socket.

use std::{path::Path, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
};

use super::{MAX_REQUEST_BYTES, Request, Response};
use crate::daemon::{
    grants::GrantRequest,
    state::{State, mono_now_ns},
    subjects::LaunchRequest,
};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another agent-guard daemon is already listening on {0}; use another --socket")]
    InUse(String),
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket (removing a stale file left by a dead daemon, never a
/// live one), readable and writable by root only.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| ServerError::Io {
        path: path.display().to_string(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, &state).await {
                            tracing::debug!("control connection: {e}");
                        }
                    });
                }
                Err(e) => tracing::warn!("control accept: {e}"),
            },
            _ = shutdown.changed() => return,
        }
    }
}

async fn handle(stream: UnixStream, state: &State) -> std::io::Result<()> {
    let peer = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let n = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1))
        .read_line(&mut line)
        .await?;
    let response = if n > MAX_REQUEST_BYTES {
        Response::err(format!("request larger than {MAX_REQUEST_BYTES} bytes"))
    } else {
        match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::err(format!("bad request: {e}")),
            Ok(req) => match peer.pid().and_then(|p| u32::try_from(p).ok()) {
                None => Response::err("cannot identify the calling process (no SO_PEERCRED pid)"),
                Some(pid) => dispatch(state, pid, peer.uid(), req),
            },
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

fn dispatch(state: &State, pid: u32, uid: u32, req: Request) -> Response {
    // A tagged process may only register itself under its own identity;
    // every other verb could widen its rights or read other tenants' state.
    if let Some(ident) = state.process_identity(pid)
        && !matches!(req, Request::Register { .. })
    {
        tracing::warn!(pid, subject = %ident.chain, "tagged process tried a control request");
        return Response::err(format!(
            "refused: the caller is a tagged process ({}); tagged processes may only use `agent-guard run`",
            ident.chain
        ));
    }
    if uid != 0 {
        return Response::err("refused: the control socket is for root only");
    }
    use serde_json::json;
    let result: Result<serde_json::Value, String> = match req {
        Request::Register {
            tenant,
            agent,
            task,
            tools,
            ttl_ms,
        } => state
            .register(
                pid,
                &LaunchRequest {
                    tenant,
                    agent,
                    task,
                    tools,
                    ttl_ms,
                },
            )
            .map(|reg| serde_json::to_value(reg).unwrap_or_default()),
        Request::Status => Ok(state.status()),
        Request::PolicyApply { text, origin } => state
            .reload_from_text(&text, &origin)
            .map(|generation| json!({ "generation": generation })),
        Request::Grant {
            tenant,
            agent,
            tool,
            ttl_ms,
            uses,
            pid,
        } => state
            .grant(&GrantRequest {
                tenant,
                agent,
                tool,
                ttl_ms,
                uses,
                pid,
            })
            .map(|g| g.status(mono_now_ns())),
        Request::Revoke { grant } => state.revoke(grant).map(|g| json!({ "revoked": g.id })),
        Request::Suspend { tenant, agent } => state
            .set_suspended(&tenant, agent.as_deref(), true)
            .map(|n| json!({ "subjects": n })),
        Request::Resume { tenant, agent } => state
            .set_suspended(&tenant, agent.as_deref(), false)
            .map(|n| json!({ "subjects": n })),
    };
    match result {
        Ok(data) => Response::ok(data),
        Err(e) => Response::err(e),
    }
}
