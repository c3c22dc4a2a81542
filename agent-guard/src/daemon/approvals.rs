//! Two-person approval for tools with `approval = "two-person"`.
//!
//! The kernel refuses a call to such a tool (reason `approval_required`)
//! unless a live grant covers it. The refusal also opens a request here (one
//! per subject and tool while it is pending; later calls are counted on
//! it). Approvers listed in the policy (`[[approver]]`, by uid) decide with
//! `agent-guard approve ID` / `deny ID`: two distinct approvers make a
//! grant of the tool's `approval_ttl` (and `approval_uses`) for the
//! requesting subject (the agent, or its task scope or sub-agent), which the
//! kernel enforces like any grant; one denial ends the request, and the
//! same subject's calls to that tool open no new request for
//! `--approval-timeout` (they are refused, recorded under the denied id). The
//! requesting uid can never approve its own request, and a tagged process
//! can never reach these verbs. Requests expire after `--approval-timeout`.
//! Every step is an `approval` audit record with the approver.

use std::time::Duration;

use serde::Serialize;

use super::{
    grants::NewGrant,
    state::{State, mono_now_ns},
    subjects::Identity,
};
use crate::{audit::AuditRecord, audit::format_ts, daemon::launch::Caller};

/// Default life of a request nobody decided.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Approvals a request needs.
pub const QUORUM: usize = 2;

/// One request waiting for a decision.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ApprovalRequest {
    pub id: u32,
    pub tenant: String,
    pub agent: String,
    pub subject: String,
    pub subject_id: u32,
    pub task: Option<String>,
    pub task_id: Option<String>,
    pub tool: String,
    /// The call that opened it: `dst:port`.
    pub endpoint: String,
    pub pid: u32,
    /// The requesting process's uid: never an approver of this request.
    pub uid: Option<u32>,
    pub on_behalf_of: Option<String>,
    pub created: String,
    /// Monotonic deadline (the kernel's clock).
    pub expires_at_ns: u64,
    pub expires_in_seconds: f64,
    /// (approver name, uid) in the order they approved.
    pub approvals: Vec<(String, u32)>,
    /// Refused calls while it waited (the first one included).
    pub calls: u64,
}

/// What opened a request: one refused call.
pub struct RefusedCall<'a> {
    pub ident: &'a Identity,
    pub tool: &'a str,
    pub endpoint: String,
    pub pid: u32,
    pub uid: Option<u32>,
}

impl State {
    fn approval_record(&self, req: &ApprovalRequest, step: &str, by: Option<(&str, u32)>) {
        let mut rec = AuditRecord::new("approval");
        rec.op = Some(step.to_string());
        rec.tenant = Some(req.tenant.clone());
        rec.agent = Some(req.agent.clone());
        rec.subject = Some(req.subject.clone());
        rec.task = req.task.clone();
        rec.task_id = req.task_id.clone();
        rec.tool = Some(req.tool.clone());
        rec.on_behalf_of = req.on_behalf_of.clone();
        rec.pid = Some(req.pid);
        rec.dst = Some(req.endpoint.clone());
        rec.approval = Some(req.id.to_string());
        if let Some((name, uid)) = by {
            rec.approver = Some(name.to_string());
            rec.uid = Some(uid);
        }
        self.metrics
            .approvals
            .with_label_values(&[&req.tenant, step])
            .inc();
        self.audit(&req.tenant, rec);
    }

    /// A call was refused with `approval_required`: opens a request, or
    /// counts the call on the pending one. Returns the request id.
    pub fn approval_needed(&self, call: &RefusedCall<'_>) -> Option<u32> {
        let mut reg = self.registry();
        let ident = call.ident;
        if let Some(r) = reg
            .approvals
            .values_mut()
            .find(|r| r.subject_id == ident.subject_id && r.tool == call.tool)
        {
            r.calls += 1;
            return Some(r.id);
        }
        // A refusal read after the quorum's grant was made (the pipeline
        // runs behind the kernel) asks for nothing new.
        if reg
            .grants
            .values()
            .any(|g| g.tool == call.tool && reg.grant_reaches(g, ident.subject_id))
        {
            return reg
                .approved
                .get(&(ident.subject_id, call.tool.to_string()))
                .copied();
        }
        let now = mono_now_ns();
        let key = (ident.subject_id, call.tool.to_string());
        match reg.denied.get(&key) {
            Some((denied, until)) if now < *until => return Some(*denied),
            Some(_) => {
                reg.denied.remove(&key);
            }
            None => {}
        }
        let id = reg.next_approval;
        reg.next_approval += 1;
        let timeout = self.approval_timeout;
        let req = ApprovalRequest {
            id,
            tenant: ident.tenant.clone(),
            agent: ident.agent.clone(),
            subject: ident.chain.clone(),
            subject_id: ident.subject_id,
            task: ident.task.as_ref().map(|t| t.text.clone()),
            task_id: ident.task.as_ref().map(|t| t.id.clone()),
            tool: call.tool.to_string(),
            endpoint: call.endpoint.clone(),
            pid: call.pid,
            uid: call.uid,
            on_behalf_of: ident
                .principal
                .as_ref()
                .and_then(|p| p.on_behalf_of.clone()),
            created: format_ts(time::OffsetDateTime::now_utc()),
            expires_at_ns: now
                .saturating_add(u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX)),
            expires_in_seconds: timeout.as_secs_f64(),
            approvals: Vec::new(),
            calls: 1,
        };
        reg.approvals.insert(id, req.clone());
        drop(reg);
        tracing::info!(id, subject = %req.subject, tool = %req.tool, "approval requested");
        self.approval_record(&req, "request", None);
        if let Some(hook) = &self.approval_webhook {
            hook.notify(&req);
        }
        Some(id)
    }

    /// Is `uid` an approver in the current policy?
    pub fn is_approver(&self, uid: u32) -> bool {
        self.registry()
            .loaded
            .as_ref()
            .is_some_and(|l| l.policy.approvers.iter().any(|a| a.uid == uid))
    }

    /// Pending requests, oldest first, with their time left.
    pub fn approvals(&self) -> Vec<ApprovalRequest> {
        let now = mono_now_ns();
        self.registry()
            .approvals
            .values()
            .map(|r| ApprovalRequest {
                expires_in_seconds: r.expires_at_ns.saturating_sub(now) as f64 / 1e9,
                ..r.clone()
            })
            .collect()
    }

    /// The approver `caller` is, for a decision on `req`; or why not.
    fn approver_for(&self, caller: &Caller, req: &ApprovalRequest) -> Result<String, String> {
        let reg = self.registry();
        let approver = reg
            .loaded
            .as_ref()
            .and_then(|l| {
                l.policy
                    .approvers
                    .iter()
                    .find(|a| a.uid == caller.uid)
                    .cloned()
            })
            .ok_or_else(|| {
                format!(
                    "refused: uid {} is not an approver in the policy ([[approver]] tables)",
                    caller.uid
                )
            })?;
        if !approver.may_decide(&req.tenant) {
            return Err(format!(
                "refused: approver {:?} may not decide requests of tenant {:?}",
                approver.name, req.tenant
            ));
        }
        if req.uid == Some(caller.uid) {
            return Err(format!(
                "refused: approver {:?} runs as uid {}, the uid of the requesting process; nobody approves their own request",
                approver.name, caller.uid
            ));
        }
        Ok(approver.name)
    }

    /// One approval of request `id`; at the quorum the grant is made.
    pub fn approve(&self, caller: &Caller, id: u32) -> Result<serde_json::Value, String> {
        let req = self.pending(id)?;
        let name = self.approver_for(caller, &req)?;
        let req = {
            let mut reg = self.registry();
            let Some(r) = reg.approvals.get_mut(&id) else {
                return Err(format!("no pending approval request {id}"));
            };
            if let Some((first, _)) = r.approvals.iter().find(|(_, u)| *u == caller.uid) {
                return Err(format!(
                    "approver {first:?} already approved request {id}; it needs {QUORUM} distinct approvers"
                ));
            }
            r.approvals.push((name.clone(), caller.uid));
            r.clone()
        };
        self.approval_record(&req, "approve", Some((&name, caller.uid)));
        if req.approvals.len() < QUORUM {
            return Ok(serde_json::json!({
                "request": id, "approvals": req.approvals.len(), "needed": QUORUM,
            }));
        }
        // Quorum: the request ends here, whatever the grant does.
        {
            let mut reg = self.registry();
            reg.approvals.remove(&id);
            reg.approved.insert((req.subject_id, req.tool.clone()), id);
        }
        let (ttl, uses) = {
            let reg = self.registry();
            let tool = reg.loaded.as_ref().and_then(|l| l.policy.tool(&req.tool));
            (
                tool.map_or(crate::policy::DEFAULT_APPROVAL_TTL, |t| t.approval_ttl),
                tool.and_then(|t| t.approval_uses),
            )
        };
        let approvers: Vec<String> = req.approvals.iter().map(|(n, _)| n.clone()).collect();
        let g = self
            .issue_grant(&NewGrant {
                tenant: req.tenant.clone(),
                agent: req.agent.clone(),
                tool: req.tool.clone(),
                subject_id: req.subject_id,
                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                uses,
                pid: None,
                why: Some(format!(
                    "approval request {id} approved by {}",
                    approvers.join(" and ")
                )),
                restore: None,
            })
            .map_err(|e| format!("request {id} approved, but the grant failed: {e}"))?;
        let mut granted = req.clone();
        granted.approvals.clear();
        self.approval_record(&granted, "granted", None);
        Ok(serde_json::json!({
            "request": id, "approvals": QUORUM, "grant": g.id,
            "expires_in_seconds": ttl.as_secs_f64(), "uses": uses,
        }))
    }

    /// Denies request `id`: it ends, nothing is granted.
    pub fn deny_approval(&self, caller: &Caller, id: u32) -> Result<serde_json::Value, String> {
        let req = self.pending(id)?;
        let name = self.approver_for(caller, &req)?;
        let req = {
            let mut reg = self.registry();
            let Some(req) = reg.approvals.remove(&id) else {
                return Err(format!("no pending approval request {id}"));
            };
            // The same subject asking for the same tool is not asked
            // again for as long as a request would have waited.
            let until = mono_now_ns().saturating_add(
                u64::try_from(self.approval_timeout.as_nanos()).unwrap_or(u64::MAX),
            );
            reg.denied
                .insert((req.subject_id, req.tool.clone()), (id, until));
            req
        };
        self.approval_record(&req, "deny", Some((&name, caller.uid)));
        Ok(serde_json::json!({ "request": id, "denied_by": name }))
    }

    fn pending(&self, id: u32) -> Result<ApprovalRequest, String> {
        self.registry().approvals.get(&id).cloned().ok_or_else(|| {
            format!("no pending approval request {id} (see `agent-guard approvals list`)")
        })
    }

    /// Ends requests nobody decided in time.
    pub fn expire_approvals(&self) {
        let now = mono_now_ns();
        let expired: Vec<ApprovalRequest> = {
            let mut reg = self.registry();
            let ids: Vec<u32> = reg
                .approvals
                .values()
                .filter(|r| now >= r.expires_at_ns)
                .map(|r| r.id)
                .collect();
            ids.iter()
                .filter_map(|id| reg.approvals.remove(id))
                .collect()
        };
        for r in expired {
            self.approval_record(&r, "expire", None);
        }
    }
}
