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

/// Sends one request and returns the `data` of a successful reply.
pub fn call(socket: &Path, request: &Request) -> Result<serde_json::Value, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    // Absolute, as the daemon registered it: from inside a tagged process
    // the kernel lets only the control socket's exact path through.
    let absolute = std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf());
    let mut stream = UnixStream::connect(&absolute).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
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
