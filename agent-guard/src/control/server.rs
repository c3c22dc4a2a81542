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

/// Binds the abstract name of the control socket at `path` (see
/// [`super::abstract_name`]). Taken already means another daemon (or a
/// squatter) holds it: refuse to start rather than leave agents talking to
/// it.
pub fn bind_abstract(path: &Path) -> Result<UnixListener, ServerError> {
    use std::os::linux::net::SocketAddrExt;
    let name = super::abstract_name(path);
    let shown = format!("@{}", String::from_utf8_lossy(&name[1..]));
    let io = |source| ServerError::Io {
        path: shown.clone(),
        source,
    };
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name[1..]).map_err(io)?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            ServerError::InUse(shown.clone())
        } else {
            io(e)
        }
    })?;
    listener.set_nonblocking(true).map_err(io)?;
    UnixListener::from_std(listener).map_err(io)
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

/// The process that connected, held by a pidfd (SO_PEERPIDFD, Linux 6.5+)
/// so it cannot be confused with a later process that reuses its pid.
struct Peer {
    pid: u32,
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl Peer {
    fn of(stream: &UnixStream, pid: u32) -> Peer {
        use std::os::fd::{AsRawFd, FromRawFd};
        const SO_PEERPIDFD: libc::c_int = 77;
        let mut fd: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `fd`.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERPIDFD,
                (&raw mut fd).cast(),
                &mut len,
            )
        };
        // SAFETY: on success the kernel handed us a new pidfd we now own.
        let pidfd = (rc == 0 && fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        Peer { pid, pidfd }
    }

    /// Is the connecting process still running? A tagged agent could
    /// otherwise connect from a child, let the child exit, and send verbs
    /// on the inherited connection while the daemon sees no tagged peer.
    fn alive(&self) -> bool {
        use std::os::fd::AsRawFd;
        match &self.pidfd {
            // pidfd_send_signal with signal 0 only checks the process.
            // SAFETY: plain syscall on a pidfd we own.
            Some(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    0,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                ) == 0
            },
            None => std::path::Path::new(&format!("/proc/{}", self.pid)).exists(),
        }
    }
}

async fn handle(stream: UnixStream, state: &State) -> std::io::Result<()> {
    let peer_cred = stream.peer_cred()?;
    let peer = peer_cred
        .pid()
        .and_then(|p| u32::try_from(p).ok())
        .map(|pid| Peer::of(&stream, pid));
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
            Ok(req) => match &peer {
                None => Response::err("cannot identify the calling process (no SO_PEERCRED pid)"),
                Some(p) => {
                    // Look the caller up first, then prove with the pidfd
                    // that the pid still named the connecting process: a
                    // child that writes a request and exits at once would
                    // otherwise be looked up as untagged.
                    let tagged = state.process_identity(p.pid);
                    if p.alive() {
                        let r = dispatch(state, p.pid, peer_cred.uid(), req, tagged);
                        // A subject made by this request (launch, sub-agent,
                        // process grant) gets its DNS proxy address before
                        // the reply lets its launcher exec.
                        state.sync_dns_proxy();
                        r
                    } else {
                        Response::err("refused: the process that opened this connection has exited")
                    }
                }
            },
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

fn dispatch(
    state: &State,
    pid: u32,
    uid: u32,
    req: Request,
    tagged: Option<std::sync::Arc<crate::daemon::subjects::Identity>>,
) -> Response {
    // A tagged process may only register itself under its own identity;
    // every other verb could widen its rights or read other tenants' state.
    if let Some(ident) = &tagged
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
                tagged.as_ref().map(|i| i.subject_id),
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
