//! The daemon end of the control socket.

use std::{path::Path, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
};

use super::{MAX_REQUEST_BYTES, Request, Response};
use crate::{
    audit::NODE_LOG,
    daemon::{
        grants::GrantRequest,
        launch::Caller,
        state::PipelineMsg,
        state::{State, mono_now_ns},
        subjects::{Identity, LaunchRequest},
    },
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

/// Lets group `gid` connect to the socket at `path` (root:gid 0660), for
/// `--control-group`.
pub fn open_to_group(path: &Path, gid: u32) -> Result<(), ServerError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| ServerError::Io {
        path: path.display().to_string(),
        source,
    };
    std::os::unix::fs::chown(path, Some(0), Some(gid)).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)
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
            // pidfd_send_signal with signal 0 only checks the process:
            // ESRCH when it has exited. EPERM (a caller of another uid and
            // no CAP_KILL) still means it exists.
            Some(fd) => {
                // SAFETY: plain syscall on a pidfd we own.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        0,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
            }
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
                        let caller = Caller {
                            pid: p.pid,
                            uid: peer_cred.uid(),
                            gid: peer_cred.gid(),
                        };
                        if matches!(req, Request::Whois { .. }) {
                            // The records of connects that already happened
                            // first (bounded: an answer without them says
                            // "not tagged", never a wrong identity).
                            let (tx, rx) = tokio::sync::oneshot::channel();
                            if state.audit_tx.send(PipelineMsg::Sync(tx)).is_ok() {
                                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), rx)
                                    .await;
                            }
                        }
                        let r = dispatch(state, &caller, req, tagged);
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

/// Is the process `pid` (effective ids as SO_PEERCRED reported `gid`) a
/// member of group `gid`: primary or supplementary?
fn in_group(pid: u32, peer_gid: u32, gid: u32) -> bool {
    if peer_gid == gid {
        return true;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
}

/// The verb of a request, as control records name it.
fn op_name(req: &Request) -> &'static str {
    match req {
        Request::Register { .. } => "run",
        Request::Grant { .. } => "grant",
        Request::Revoke { .. } => "revoke",
        Request::Suspend { .. } => "suspend",
        Request::Resume { .. } => "resume",
        Request::Status => "status",
        Request::PolicyApply { .. } => "reload",
        Request::ApprovalsList => "approvals_list",
        Request::Approve { .. } => "approve",
        Request::Deny { .. } => "deny",
        Request::Whois { .. } => "whois",
    }
}

/// The tenant chain a control record of `req` belongs in (`None`: the
/// node log).
fn record_tenant(state: &State, req: &Request, tagged: Option<&Identity>) -> Option<String> {
    let named = match req {
        Request::Register { tenant, .. } => tenant.clone().or(tagged.map(|i| i.tenant.clone())),
        Request::Grant { tenant, .. }
        | Request::Suspend { tenant, .. }
        | Request::Resume { tenant, .. } => Some(tenant.clone()),
        Request::Revoke { grant } => state.registry().grants.get(grant).map(|g| g.tenant.clone()),
        Request::Approve { id } | Request::Deny { id } => {
            state.registry().approvals.get(id).map(|a| a.tenant.clone())
        }
        Request::Status
        | Request::PolicyApply { .. }
        | Request::ApprovalsList
        | Request::Whois { .. } => None,
    };
    let reg = state.registry();
    named.filter(|t| {
        reg.loaded
            .as_ref()
            .is_some_and(|l| l.policy.tenant(t).is_some())
    })
}

fn dispatch(
    state: &State,
    caller: &Caller,
    req: Request,
    tagged: Option<Arc<Identity>>,
) -> Response {
    // Token launches answer for themselves (and write their own record).
    if let Request::Register {
        token: Some(token),
        tenant,
        agent,
        task,
        tools,
        ttl_ms,
    } = &req
    {
        let refusal = if let Some(ident) = &tagged {
            Some(format!(
                "refused: the caller is a tagged process ({}); a tagged process cannot launch with a token",
                ident.chain
            ))
        } else if task.is_some() || tools.is_some() || ttl_ms.is_some() {
            Some("refused: a token launch takes task, tools and ttl from the token only; leave out --task, --tools and --ttl".to_string())
        } else if caller.uid != 0
            && !state
                .control
                .control_gid
                .is_some_and(|g| in_group(caller.pid, caller.gid, g))
        {
            Some(match state.control.control_gid {
                Some(g) => format!(
                    "refused: uid {} is neither root nor in the control group (gid {g})",
                    caller.uid
                ),
                None => format!(
                    "refused: uid {} is not root, and the daemon has no --control-group",
                    caller.uid
                ),
            })
        } else {
            None
        };
        if let Some(why) = refusal {
            let mut rec = state.control_record(caller, "run");
            rec.verdict = Some("deny".into());
            rec.reason = Some("not_permitted".into());
            rec.detail = Some(why.clone());
            let log = tagged
                .as_ref()
                .map_or(NODE_LOG.to_string(), |i| i.tenant.clone());
            state.audit(&log, rec);
            return Response::err(why);
        }
        let launched = state.launch_with_token(
            caller,
            token,
            tenant.as_deref(),
            Some(agent.as_str()).filter(|a| !a.is_empty()),
        );
        state.save_registry();
        return match launched {
            Ok(reg) => Response::ok(serde_json::to_value(reg).unwrap_or_default()),
            Err(e) => Response::err(e),
        };
    }
    let op = op_name(&req);
    let log = record_tenant(state, &req, tagged.as_deref());
    let result = run_verb(state, caller, req, tagged.clone());
    // On disk before the reply: a crash after it must not lose what the
    // command made (persist.rs). Unchanged snapshots are not rewritten.
    if !matches!(op, "status" | "approvals_list" | "whois") {
        state.save_registry();
    }
    // Every verb but the read-only ones is on the record, with who asked.
    if op != "status" && op != "approvals_list" {
        let mut rec = state.control_record(caller, op);
        rec.tenant = log.clone();
        match &result {
            Ok(_) => rec.verdict = Some("allow".into()),
            Err(e) => {
                rec.verdict = Some("deny".into());
                rec.reason = Some(
                    if e.starts_with("refused: the caller is a tagged")
                        || e.starts_with("refused: the control socket")
                    {
                        "not_permitted".into()
                    } else {
                        "failed".into()
                    },
                );
                rec.detail = Some(e.clone());
            }
        }
        if let Some(i) = &tagged {
            rec.subject = Some(i.chain.clone());
        }
        state.audit(log.as_deref().unwrap_or(NODE_LOG), rec);
    }
    match result {
        Ok(data) => Response::ok(data),
        Err(e) => Response::err(e),
    }
}

fn run_verb(
    state: &State,
    caller: &Caller,
    req: Request,
    tagged: Option<Arc<Identity>>,
) -> Result<serde_json::Value, String> {
    let pid = caller.pid;
    // A tagged process may only register itself under its own identity;
    // every other verb could widen its rights or read other tenants' state.
    if let Some(ident) = &tagged
        && !matches!(req, Request::Register { .. })
    {
        tracing::warn!(pid, subject = %ident.chain, "tagged process tried a control request");
        return Err(format!(
            "refused: the caller is a tagged process ({}); tagged processes may only use `agent-guard run`",
            ident.chain
        ));
    }
    use serde_json::json;
    // Approvers decide as themselves (checked against the policy), root
    // or not; every other verb is root's.
    match req {
        Request::Approve { id } => return state.approve(caller, id),
        Request::Deny { id } => return state.deny_approval(caller, id),
        Request::ApprovalsList if caller.uid == 0 || state.is_approver(caller.uid) => {
            return Ok(json!({ "approvals": state.approvals() }));
        }
        Request::Whois { peer, local }
            if caller.uid == 0
                || state
                    .control
                    .control_gid
                    .is_some_and(|g| in_group(caller.pid, caller.gid, g)) =>
        {
            let parse = |what: &str, s: &str| {
                s.parse::<std::net::SocketAddr>()
                    .map_err(|e| format!("--{what} {s:?}: {e} (write IP:PORT, [IPv6]:PORT)"))
            };
            return state.whois(parse("peer", &peer)?, parse("local", &local)?);
        }
        _ => {}
    }
    if caller.uid != 0 {
        return Err("refused: the control socket is for root only (an orchestrator in --control-group may launch with `run --token`; approvers may list, approve and deny)".into());
    }
    match req {
        Request::Register {
            tenant,
            agent,
            task,
            tools,
            ttl_ms,
            token: _,
        } => state
            .register(
                pid,
                &LaunchRequest {
                    tenant,
                    agent,
                    task,
                    tools,
                    ttl_ms,
                    principal: None,
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
        Request::ApprovalsList | Request::Approve { .. } | Request::Deny { .. } => {
            Err("refused: not an approver".into())
        }
        Request::Whois { .. } => Err("refused: whois is for root and the control group".into()),
    }
}
