//! Blocking client used by the CLI (`run` must not start a runtime before
//! exec, and one request needs no async).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use thiserror::Error;

use super::{Request, Response};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agent-guard daemon at {path}: {source}\n  is it running? start it with `agent-guard daemon` (or `cargo xtask run`), or pass --socket PATH"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon at {path} sent a reply that is not valid JSON: {source}")]
    BadReply {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Refused(String),
}

/// Connects to the daemon: through the abstract name of `socket` first (the
/// only way in from a tagged process; see [`super::abstract_name`]), else
/// the path (a daemon in another network namespace, or an older one).
fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    use std::os::linux::net::SocketAddrExt;
    let absolute = std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf());
    let name = super::abstract_name(&absolute);
    if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(&name[1..])
        && let Ok(stream) = UnixStream::connect_addr(&addr)
    {
        // Anyone can bind an abstract name; only root's is the daemon.
        let uid = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            .map(|c| c.uid())
            .map_err(|e| ClientError::Connect {
                path: socket.to_path_buf(),
                source: e.into(),
            })?;
        if uid != 0 {
            return Err(ClientError::Refused(format!(
                "the control socket's abstract name @{} is held by a process of uid {uid}, not the root daemon; refusing to talk to it",
                String::from_utf8_lossy(&name[1..])
            )));
        }
        return Ok(stream);
    }
    UnixStream::connect(&absolute).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })
}

/// Sends one request and returns the `data` of a successful reply.
pub fn call(socket: &Path, request: &Request) -> Result<serde_json::Value, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = connect(socket)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(request).unwrap_or_default();
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    let reply: Response = serde_json::from_str(&reply).map_err(|source| ClientError::BadReply {
        path: socket.to_path_buf(),
        source,
    })?;
    if reply.ok {
        Ok(reply.data)
    } else {
        Err(ClientError::Refused(
            reply.error.unwrap_or_else(|| "request refused".into()),
        ))
    }
}
