//! `--approval-webhook URL`: each new two-person approval request is POSTed
//! as JSON to URL (plain `http://`, e.g. a local relay to chat or paging).
//!
//! Never in the way of the kernel path: each notice is sent by a task of
//! its own with a timeout, at most [`MAX_IN_FLIGHT`] at once (beyond that a
//! notice is dropped and logged), and a failure is logged, never retried
//! into a backlog. The request is in `approvals list` and the audit trail
//! either way.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Uri, body::Bytes};
use hyper_util::rt::TokioIo;

use super::approvals::ApprovalRequest;

/// Notices being sent at once, at most.
pub const MAX_IN_FLIGHT: usize = 64;

#[derive(Debug, Clone)]
pub struct Webhook {
    uri: Uri,
    authority: String,
    timeout: Duration,
    in_flight: Arc<AtomicUsize>,
}

impl Webhook {
    /// Checks `url`: `http://HOST[:PORT]/PATH`.
    pub fn parse(url: &str, timeout: Duration) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("--approval-webhook {url:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "--approval-webhook {url:?}: only http:// is supported (put a local relay in front of an https endpoint)"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("--approval-webhook {url:?}: no host"))?
            .to_string();
        Ok(Self {
            uri,
            authority,
            timeout,
            in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Sends `req` in the background.
    pub fn notify(&self, req: &ApprovalRequest) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(id = req.id, "approval webhook: no runtime; notice not sent");
            return;
        };
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                id = req.id,
                "approval webhook: {MAX_IN_FLIGHT} notices in flight; this one is dropped"
            );
            return;
        }
        let body = serde_json::json!({ "event": "approval_request", "request": req }).to_string();
        let this = self.clone();
        let id = req.id;
        handle.spawn(async move {
            match tokio::time::timeout(this.timeout, this.post(body)).await {
                Ok(Ok(status)) if (200..300).contains(&status) => {
                    tracing::debug!(id, status, "approval webhook notified");
                }
                Ok(Ok(status)) => {
                    tracing::warn!(id, status, "approval webhook answered with an error")
                }
                Ok(Err(e)) => tracing::warn!(id, "approval webhook: {e}"),
                Err(_) => tracing::warn!(id, timeout = ?this.timeout, "approval webhook timed out"),
            }
            this.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }

    async fn post(&self, body: String) -> Result<u16, String> {
        let addr = if self.uri.port().is_some() {
            self.authority.clone()
        } else {
            format!("{}:80", self.authority)
        };
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = self
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let request = Request::post(path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let _ = response.into_body().collect().await;
        Ok(status)
    }
}
