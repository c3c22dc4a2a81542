//! `whois`: a tool server asks who is on the other end of a connection.
//!
//! The connect program puts each tagged connect's socket cookie on its
//! record; the event pipeline keeps, for allowed connects, cookie -> who
//! (subject, pid, tool, grant) in a bounded table. `whois --peer --local`
//! finds the client's socket by its 4-tuple through sock_diag (the kernel's
//! view, no pid scans), whose answer carries the same cookie. The pipeline
//! first drains the ring buffer, so a connect the server just accepted is
//! known. A socket the table does not have was made by an untagged process
//! (or one whose record was lost, said as such when the kernel counted
//! losses), or lives in another network namespace.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
};

use super::state::State;
use crate::kernel::sockdiag;

/// Sockets remembered at once; the oldest are forgotten first.
pub const CAPACITY: usize = 65_536;

/// Who made one allowed connect. Plain numbers, no heap: the table holds
/// tens of thousands of these on a busy node; names and times are made
/// when whois asks.
#[derive(Debug, Clone, Copy)]
pub struct SocketOwner {
    pub subject_id: u32,
    pub pid: u32,
    /// The tool the connect matched, 0 for none.
    pub tool_id: u32,
    /// The grant that allowed it, 0 for none.
    pub grant: u32,
    /// When the connect was judged (kernel monotonic ns).
    pub at_ns: u64,
}

/// cookie -> owner, bounded, oldest out first.
#[derive(Debug, Default)]
pub struct SocketTable {
    owners: HashMap<u64, SocketOwner>,
    order: VecDeque<u64>,
}

impl SocketTable {
    pub fn record(&mut self, cookie: u64, owner: SocketOwner) {
        if self.owners.insert(cookie, owner).is_none() {
            self.order.push_back(cookie);
        }
        while self.order.len() > CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.owners.remove(&old);
            }
        }
    }

    pub fn get(&self, cookie: u64) -> Option<&SocketOwner> {
        self.owners.get(&cookie)
    }

    pub fn len(&self) -> usize {
        self.owners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }
}

impl State {
    /// Who holds the TCP connection from `peer` to `local` (as the tool
    /// server sees it). Call after the pipeline drained the ring.
    pub fn whois(&self, peer: SocketAddr, local: SocketAddr) -> Result<serde_json::Value, String> {
        use serde_json::json;
        let Some(found) = sockdiag::find_tcp(peer, local)? else {
            return Ok(json!({
                "known": false, "tagged": false, "peer": peer.to_string(), "local": local.to_string(),
                "why": "no TCP socket from peer to local on this host (closed, not TCP, or in another network namespace)",
            }));
        };
        let owner = self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(found.cookie)
            .copied();
        let Some(owner) = owner else {
            return Ok(json!({
                "known": true, "tagged": false, "peer": peer.to_string(), "local": local.to_string(),
                "uid": found.uid, "cookie": found.cookie,
                "why": "the socket was not connected by a tagged process (no kernel record of its connect)",
            }));
        };
        let reg = self.registry();
        let ident = reg.identities.get(&owner.subject_id).cloned();
        let grants: Vec<u32> = reg
            .grants
            .values()
            .filter(|g| reg.grant_reaches(g, owner.subject_id))
            .map(|g| g.id)
            .collect();
        let tool = (owner.tool_id != 0)
            .then(|| reg.ids.tool_names.get(&owner.tool_id).cloned())
            .flatten();
        drop(reg);
        let grant = (owner.grant != 0).then_some(owner.grant);
        let connected_at = super::events::wall_clock(owner.at_ns);
        let exe = std::fs::read_link(format!("/proc/{}/exe", owner.pid))
            .ok()
            .map(|p| p.display().to_string());
        Ok(match ident {
            None => json!({
                "known": true, "tagged": true, "peer": peer.to_string(), "local": local.to_string(),
                "subject_id": owner.subject_id, "pid": owner.pid, "exe": exe,
                "why": "tagged under a subject the daemon no longer knows (quarantined or retired)",
            }),
            Some(i) => json!({
                "known": true, "tagged": true, "peer": peer.to_string(), "local": local.to_string(),
                "tenant": i.tenant, "agent": i.agent, "subject": i.chain, "subject_id": i.subject_id,
                "task": i.task.as_ref().map(|t| t.text.clone()),
                "task_id": i.task.as_ref().map(|t| t.id.clone()),
                "on_behalf_of": i.principal.as_ref().and_then(|p| p.on_behalf_of.clone()),
                "jti": i.principal.as_ref().map(|p| p.jti.clone()),
                "pid": owner.pid, "exe": exe, "uid": found.uid,
                "tool": tool, "grant": grant, "connected_at": connected_at,
                "grants_in_force": grants, "active": i.active,
            }),
        })
    }
}
