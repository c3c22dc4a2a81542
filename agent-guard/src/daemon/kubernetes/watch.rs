//! The kube-rs side of `--policy-source kubernetes` (feature `kubernetes`):
//! watch the followed AgentGuardPolicy, hand each event to the
//! [`PolicyFeed`], reload through `State::reload_from_text`, and report
//! what happened: a log line and an audit record always, and a Kubernetes
//! Event (reason `PolicyRefused`, reported by this node) for a refused
//! object.
//!
//! Without a client (no in-cluster credentials, API server unreachable)
//! the policy the daemon started with stays in force; it says so and
//! tries again.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Client,
    core::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use tokio::sync::watch;

use super::feed::{Outcome, PolicyFeed, PolicyObject, WatchEvent};
use crate::{
    audit::{AuditRecord, NODE_LOG},
    daemon::state::State,
    policy::crd,
};

/// How long to wait before trying again to make a client.
const CLIENT_RETRY: Duration = Duration::from_secs(30);
/// Kubernetes caps an Event's note at 1 kB.
const NOTE_MAX: usize = 1000;

fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(crd::GROUP, crd::VERSION, crd::KIND),
        crd::PLURAL,
    )
}

/// Turns the watcher's events into [`WatchEvent`]s: the objects of a
/// (re)list are collected until it is complete.
#[derive(Default)]
pub struct Relist {
    listing: Option<Vec<PolicyObject>>,
}

impl Relist {
    /// `Ok(None)` while a relist is in progress.
    pub fn next(
        &mut self,
        ev: watcher::Event<DynamicObject>,
    ) -> Result<Option<WatchEvent>, super::feed::FeedError> {
        let object = |o: &DynamicObject| {
            let v = serde_json::to_value(o).map_err(|e| {
                super::feed::FeedError::NotAPolicy(format!("cannot read the object: {e}"))
            })?;
            PolicyObject::from_json(&v)
        };
        Ok(match ev {
            watcher::Event::Apply(o) => Some(WatchEvent::Applied(object(&o)?)),
            watcher::Event::Delete(o) => Some(WatchEvent::Deleted(object(&o)?)),
            watcher::Event::Init => {
                self.listing = Some(Vec::new());
                None
            }
            watcher::Event::InitApply(o) => {
                let o = object(&o)?;
                self.listing.get_or_insert_with(Vec::new).push(o);
                None
            }
            watcher::Event::InitDone => Some(WatchEvent::Restarted(
                self.listing.take().unwrap_or_default(),
            )),
        })
    }
}

/// Follows the AgentGuardPolicy `object` until `shutdown`.
pub async fn run(
    state: Arc<State>,
    object: String,
    node_id: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let client = loop {
        match Client::try_default().await {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(
                    "--policy-source kubernetes: no Kubernetes client ({e}); the policy the daemon started with stays in force; trying again in {}s",
                    CLIENT_RETRY.as_secs()
                );
                let mut rec = AuditRecord::new("policy");
                rec.detail = Some(format!(
                    "no Kubernetes client for {}/{object}: {e}; the current policy stays in force",
                    crd::KIND
                ));
                state.audit(NODE_LOG, rec);
                tokio::select! {
                    _ = tokio::time::sleep(CLIENT_RETRY) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    };
    let ar = api_resource();
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "agent-guard".into(),
            instance: Some(node_id),
        },
    );
    // Only the followed object is sent; others would be ignored anyway.
    let config = watcher::Config::default().fields(&format!("metadata.name={object}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let mut feed = PolicyFeed::new(object.clone());
    let mut relist = Relist::default();
    let mut reference: Option<ObjectReference> = None;
    tracing::info!(
        "--policy-source kubernetes: following {}/{object}",
        crd::KIND
    );
    loop {
        let ev = tokio::select! {
            ev = events.next() => ev,
            _ = shutdown.changed() => return,
        };
        let ev = match ev {
            Some(Ok(ev)) => ev,
            // The backoff retries; the policy in force stays meanwhile.
            Some(Err(e)) => {
                tracing::warn!("watching {}/{object}: {e}", crd::KIND);
                continue;
            }
            None => return,
        };
        // What a PolicyRefused Event is about; a relist's verdict comes
        // at InitDone, after the (only, by the field selector) object.
        if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o) =
            &ev
        {
            reference = Some(kube::Resource::object_ref(o, &ar));
        }
        let ev = match relist.next(ev) {
            Ok(Some(ev)) => ev,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("watching {}/{object}: {e}", crd::KIND);
                continue;
            }
        };
        let mut reload = |text: &str, origin: &str| state.reload_from_text(text, origin);
        let outcome = feed.handle(ev, &mut reload);
        report(&state, &outcome);
        if let (Outcome::Refused { reason, .. }, Some(r)) = (&outcome, &reference) {
            refused_event(&recorder, r, reason).await;
        }
    }
}

/// Log and audit one outcome. A refusal the reload made is already audited
/// and counted there (`State::reload_from_text`).
pub fn report(state: &State, outcome: &Outcome) {
    match outcome {
        Outcome::Reloaded { origin, generation } => {
            tracing::info!(generation, "policy reloaded from {origin}");
        }
        Outcome::Refused {
            origin,
            reason,
            audited,
        } => {
            tracing::error!("{origin} refused, the current policy stays in force: {reason}");
            if !audited {
                state
                    .metrics
                    .policy_reloads
                    .with_label_values(&["error"])
                    .inc();
                let mut rec = AuditRecord::new("policy");
                rec.detail = Some(format!("refused, current policy kept: {origin}: {reason}"));
                state.audit(NODE_LOG, rec);
            }
        }
        Outcome::Gone { name, from_object } => {
            let what = if *from_object {
                "the policy it set stays in force"
            } else {
                "the policy the daemon started with stays in force"
            };
            tracing::warn!(
                "{}/{name} was deleted; {what} until the object is created again (deleting it never loosens the fence)",
                crd::KIND
            );
            let mut rec = AuditRecord::new("policy");
            rec.detail = Some(format!("{}/{name} deleted; {what}", crd::KIND));
            state.audit(NODE_LOG, rec);
        }
        Outcome::Unchanged { origin } => tracing::debug!("{origin}: spec unchanged"),
        Outcome::StillRefused { origin } => {
            tracing::debug!("{origin}: the spec refused before, unchanged")
        }
        Outcome::Ignored { name } => tracing::debug!("{}/{name}: not followed", crd::KIND),
        Outcome::Nothing => {}
    }
}

async fn refused_event(recorder: &Recorder, reference: &ObjectReference, reason: &str) {
    let mut note = format!("refused, this node keeps its current policy: {reason}");
    if note.len() > NOTE_MAX {
        let mut end = NOTE_MAX - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    let event = Event {
        type_: EventType::Warning,
        reason: "PolicyRefused".into(),
        note: Some(note),
        action: "Reload".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, reference).await {
        tracing::warn!(
            "could not write the PolicyRefused Event (RBAC: create and patch on events.k8s.io events): {e}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str, rv: &str) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": crd::API_VERSION,
            "kind": crd::KIND,
            "metadata": {"name": name, "resourceVersion": rv, "uid": "u1"},
            "spec": {"tenant": [{"name": "acme"}]},
        }))
        .unwrap()
    }

    #[test]
    fn watcher_events_become_feed_events_and_relists_are_collected() {
        let mut r = Relist::default();
        match r
            .next(watcher::Event::Apply(object("default", "7")))
            .unwrap()
        {
            Some(WatchEvent::Applied(o)) => {
                assert_eq!(o.name, "default");
                assert_eq!(o.resource_version.as_deref(), Some("7"));
                assert_eq!(o.spec.unwrap()["tenant"][0]["name"], "acme");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.next(watcher::Event::Init).unwrap(), None);
        assert_eq!(
            r.next(watcher::Event::InitApply(object("default", "8")))
                .unwrap(),
            None
        );
        match r.next(watcher::Event::InitDone).unwrap() {
            Some(WatchEvent::Restarted(list)) => {
                assert_eq!(list.len(), 1);
                assert_eq!(list[0].resource_version.as_deref(), Some("8"));
            }
            other => panic!("{other:?}"),
        }
        // An empty relist: the object is gone.
        r.next(watcher::Event::Init).unwrap();
        assert_eq!(
            r.next(watcher::Event::InitDone).unwrap(),
            Some(WatchEvent::Restarted(vec![]))
        );
        assert!(matches!(
            r.next(watcher::Event::Delete(object("default", "9")))
                .unwrap(),
            Some(WatchEvent::Deleted(_))
        ));
    }

    #[test]
    fn the_api_resource_is_the_crds() {
        let ar = api_resource();
        assert_eq!(ar.api_version, crd::API_VERSION);
        assert_eq!(ar.plural, crd::PLURAL);
        assert_eq!(ar.kind, crd::KIND);
    }
}
