//! What AgentGuardPolicy watch events mean for the policy in force.
//!
//! [`PolicyFeed::handle`] takes one [`WatchEvent`] and answers with an
//! [`Outcome`]; when the followed object has a new spec it checks it with
//! the policy file's own validator (the spec written as TOML, see
//! `policy::crd::spec_to_toml`) and, if good, hands the text to the reload
//! function it is given: in the daemon that is `State::reload_from_text`,
//! the same atomic reload a changed policy file gets. A refused object
//! leaves the policy in force alone.
//!
//! - Applied (ADDED/MODIFIED): a new spec is checked and reloaded, or
//!   refused; the same spec again (a label edit, a relist) is `Unchanged`,
//!   and a refused spec seen again is not refused a second time.
//! - Deleted, or missing from a relist: the policy in force stays (deleting
//!   the object must never loosen the fence); `Gone` says so once.
//! - Restarted (the list after a (re)connect): the followed object is
//!   looked up in it and treated as Applied, or as Gone when absent.
//! - Other objects' events are `Ignored` (see the module docs of
//!   `daemon::kubernetes` for why objects are not merged).

use serde_json::Value;

use crate::policy::{
    Policy, PolicyError,
    crd::{self, spec_to_toml},
};

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("not a watch event ({0})")]
    NotAnEvent(String),
    /// A watch `ERROR` event: the API server ended the watch (e.g. 410
    /// Expired); the watcher relists.
    #[error("the watch ended with an error: {0}")]
    Watch(String),
    #[error("not an {kind} object ({0})", kind = crd::KIND)]
    NotAPolicy(String),
}

/// One AgentGuardPolicy as the API server sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyObject {
    pub name: String,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub spec: Option<Value>,
}

impl PolicyObject {
    /// From the object's JSON (as in a watch event or a list's `items`).
    pub fn from_json(v: &Value) -> Result<PolicyObject, FeedError> {
        if let Some(kind) = v.get("kind").and_then(Value::as_str)
            && kind != crd::KIND
        {
            return Err(FeedError::NotAPolicy(format!("kind {kind}")));
        }
        if let Some(api) = v.get("apiVersion").and_then(Value::as_str)
            && api.split('/').next() != Some(crd::GROUP)
        {
            return Err(FeedError::NotAPolicy(format!("apiVersion {api}")));
        }
        let md = v.get("metadata");
        let text = |k: &str| {
            md.and_then(|m| m.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let name = text("name").ok_or_else(|| FeedError::NotAPolicy("no metadata.name".into()))?;
        Ok(PolicyObject {
            name,
            uid: text("uid"),
            resource_version: text("resourceVersion"),
            spec: v.get("spec").filter(|s| !s.is_null()).cloned(),
        })
    }

    /// `AgentGuardPolicy/NAME@RESOURCEVERSION`: the origin in messages.
    pub fn origin(&self) -> String {
        format!(
            "{}/{}@{}",
            crd::KIND,
            self.name,
            self.resource_version.as_deref().unwrap_or("?")
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    Applied(PolicyObject),
    Deleted(PolicyObject),
    /// The complete list after a (re)connect: any object not in it is gone.
    Restarted(Vec<PolicyObject>),
}

impl WatchEvent {
    /// One event of a watch stream, `{"type": T, "object": O}` as the API
    /// server writes it; `None` for a BOOKMARK (progress only).
    pub fn from_watch_json(v: &Value) -> Result<Option<WatchEvent>, FeedError> {
        let ty = v
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| FeedError::NotAnEvent("no type".into()))?;
        let object = v
            .get("object")
            .ok_or_else(|| FeedError::NotAnEvent("no object".into()))?;
        match ty {
            "ADDED" | "MODIFIED" => Ok(Some(WatchEvent::Applied(PolicyObject::from_json(object)?))),
            "DELETED" => Ok(Some(WatchEvent::Deleted(PolicyObject::from_json(object)?))),
            "BOOKMARK" => Ok(None),
            "ERROR" => Err(FeedError::Watch(format!(
                "{} {}: {}",
                object.get("code").map_or("?".into(), Value::to_string),
                object.get("reason").and_then(Value::as_str).unwrap_or("?"),
                object.get("message").and_then(Value::as_str).unwrap_or("?"),
            ))),
            other => Err(FeedError::NotAnEvent(format!("type {other}"))),
        }
    }

    /// A list response (`AgentGuardPolicyList`): what a (re)list sees.
    pub fn from_list_json(v: &Value) -> Result<WatchEvent, FeedError> {
        let items = v
            .get("items")
            .and_then(Value::as_array)
            .ok_or_else(|| FeedError::NotAnEvent("a list without items".into()))?;
        Ok(WatchEvent::Restarted(
            items
                .iter()
                .map(PolicyObject::from_json)
                .collect::<Result<_, _>>()?,
        ))
    }
}

/// What one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The object's spec is now the policy in force.
    Reloaded { origin: String, generation: u32 },
    /// The object was refused; the policy in force stays. `audited`: the
    /// reload refused it and already wrote the audit record and counted it
    /// (`State::reload_from_text`); otherwise the check before the reload
    /// did, and the caller must.
    Refused {
        origin: String,
        reason: String,
        audited: bool,
    },
    /// The spec in force again (a metadata-only change, a relist).
    Unchanged { origin: String },
    /// The spec refused last time again: nothing new to say.
    StillRefused { origin: String },
    /// The followed object was deleted (or is missing after a relist); the
    /// policy in force stays. `from_object`: that policy came from it
    /// (otherwise the daemon's start-up policy is still in force).
    Gone { name: String, from_object: bool },
    /// Another AgentGuardPolicy than the followed one.
    Ignored { name: String },
    /// Nothing changed (a relist without the object, which was not there
    /// before either).
    Nothing,
}

/// The followed object's state, between events.
#[derive(Debug)]
pub struct PolicyFeed {
    object: String,
    /// The policy text (the spec as TOML) in force, when it came from the
    /// object.
    in_force: Option<String>,
    /// The text last refused, so a relist does not refuse it again.
    refused: Option<String>,
    /// Whether the object existed at the last event.
    present: bool,
}

/// Applies policy text; `Ok(generation)`. In the daemon:
/// `State::reload_from_text`.
pub type Reload<'a> = dyn FnMut(&str, &str) -> Result<u32, String> + 'a;

impl PolicyFeed {
    pub fn new(object: impl Into<String>) -> PolicyFeed {
        PolicyFeed {
            object: object.into(),
            in_force: None,
            refused: None,
            present: false,
        }
    }

    /// The name of the followed object.
    pub fn object(&self) -> &str {
        &self.object
    }

    /// The policy text in force, when it came from the object.
    pub fn in_force(&self) -> Option<&str> {
        self.in_force.as_deref()
    }

    pub fn handle(&mut self, event: WatchEvent, reload: &mut Reload<'_>) -> Outcome {
        match event {
            WatchEvent::Applied(o) if o.name == self.object => self.applied(o, reload),
            WatchEvent::Deleted(o) if o.name == self.object => self.gone(),
            WatchEvent::Applied(o) | WatchEvent::Deleted(o) => Outcome::Ignored { name: o.name },
            WatchEvent::Restarted(list) => match list.into_iter().find(|o| o.name == self.object) {
                Some(o) => self.applied(o, reload),
                None if self.present => self.gone(),
                None => Outcome::Nothing,
            },
        }
    }

    fn gone(&mut self) -> Outcome {
        self.present = false;
        self.refused = None;
        Outcome::Gone {
            name: self.object.clone(),
            from_object: self.in_force.is_some(),
        }
    }

    fn applied(&mut self, o: PolicyObject, reload: &mut Reload<'_>) -> Outcome {
        self.present = true;
        let origin = o.origin();
        let text = match o.spec.as_ref().map(spec_to_toml) {
            Some(Ok(text)) => text,
            Some(Err(e)) => return self.refuse(origin, e.to_string(), String::new(), false),
            None => {
                return self.refuse(
                    origin,
                    "the object has no spec".into(),
                    String::new(),
                    false,
                );
            }
        };
        if self.in_force.as_deref() == Some(text.as_str()) {
            self.refused = None;
            return Outcome::Unchanged { origin };
        }
        if self.refused.as_deref() == Some(text.as_str()) {
            return Outcome::StillRefused { origin };
        }
        // The file's validator, before anything is touched; its message
        // points into the TOML text, so quote that line.
        if let Err(e) = Policy::from_str(&text, &origin) {
            let reason = explain(&e, &text);
            return self.refuse(origin, reason, text, false);
        }
        match reload(&text, &origin) {
            Ok(generation) => {
                self.in_force = Some(text);
                self.refused = None;
                Outcome::Reloaded { origin, generation }
            }
            Err(reason) => self.refuse(origin, reason, text, true),
        }
    }

    fn refuse(&mut self, origin: String, reason: String, text: String, audited: bool) -> Outcome {
        self.refused = Some(text);
        Outcome::Refused {
            origin,
            reason,
            audited,
        }
    }
}

/// A validator error about the spec-as-TOML, with the line it means.
fn explain(e: &PolicyError, text: &str) -> String {
    match e {
        PolicyError::Invalid { reason, line, .. } => match text.lines().nth(line.saturating_sub(1))
        {
            Some(l) => format!(
                "{reason} (in the spec as TOML, line {line}: `{}`)",
                l.trim()
            ),
            None => reason.clone(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    //! The apply path against watch events in the API server's wire shape
    //! (fixtures/), with the policy's real parser and compiler as the
    //! reload (the daemon adds only the kernel map writes).

    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/src/daemon/kubernetes/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn event(name: &str) -> WatchEvent {
        let v = fixture(name);
        if v.get("items").is_some() {
            WatchEvent::from_list_json(&v).unwrap()
        } else {
            WatchEvent::from_watch_json(&v).unwrap().unwrap()
        }
    }

    /// Parse and compile for real; the policies applied so far, in order.
    #[derive(Default)]
    struct Daemon {
        applied: Vec<Policy>,
    }

    impl Daemon {
        fn feed(&mut self, feed: &mut PolicyFeed, name: &str) -> Outcome {
            let mut reload = |text: &str, origin: &str| -> Result<u32, String> {
                let p = Policy::from_str(text, origin).map_err(|e| e.to_string())?;
                p.compile().map_err(|e| e.to_string())?;
                self.applied.push(p);
                Ok(self.applied.len() as u32)
            };
            feed.handle(event(name), &mut reload)
        }

        fn in_force(&self) -> &Policy {
            self.applied.last().expect("a policy was applied")
        }
    }

    #[test]
    fn good_object_is_applied_as_a_reload() {
        let (mut d, mut f) = (Daemon::default(), PolicyFeed::new("default"));
        assert_eq!(
            d.feed(&mut f, "added-good.json"),
            Outcome::Reloaded {
                origin: "AgentGuardPolicy/default@48211".into(),
                generation: 1
            }
        );
        let p = d.in_force();
        assert_eq!(p.default_mode, crate::policy::Mode::Enforce);
        assert_eq!(p.agent("acme", "researcher").unwrap().tools, ["search"]);
        assert_eq!(p.origin, "AgentGuardPolicy/default@48211");
    }

    #[test]
    fn bad_object_is_refused_and_the_old_policy_kept() {
        let (mut d, mut f) = (Daemon::default(), PolicyFeed::new("default"));
        d.feed(&mut f, "added-good.json");
        let before = f.in_force().unwrap().to_string();
        match d.feed(&mut f, "modified-bad-port.json") {
            Outcome::Refused {
                origin,
                reason,
                audited,
            } => {
                assert_eq!(origin, "AgentGuardPolicy/default@48230");
                assert!(reason.starts_with("port 0 is not allowed"), "{reason}");
                assert!(reason.contains("port = 0"), "quotes the line: {reason}");
                assert!(!audited, "refused before the reload: the caller audits");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(d.applied.len(), 1, "nothing reloaded");
        assert_eq!(f.in_force(), Some(before.as_str()));
        // A dangling tool name: refused by the same validator as a file.
        match d.feed(&mut f, "modified-unknown-tool.json") {
            Outcome::Refused { reason, .. } => {
                assert!(reason.contains("tool \"mail\" is not defined"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // Fixed: applied.
        assert!(matches!(
            d.feed(&mut f, "modified-good.json"),
            Outcome::Reloaded { generation: 2, .. }
        ));
        assert_eq!(d.in_force().default_mode, crate::policy::Mode::Monitor);
    }

    #[test]
    fn refusal_by_the_reload_itself_is_reported_as_audited() {
        let mut f = PolicyFeed::new("default");
        let mut reload =
            |_: &str, _: &str| -> Result<u32, String> { Err("map GRANTS is full".into()) };
        match f.handle(event("added-good.json"), &mut reload) {
            Outcome::Refused {
                reason, audited, ..
            } => {
                assert_eq!(reason, "map GRANTS is full");
                assert!(audited);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(f.in_force(), None);
    }

    #[test]
    fn same_spec_again_is_not_reloaded_and_a_refusal_is_not_repeated() {
        let (mut d, mut f) = (Daemon::default(), PolicyFeed::new("default"));
        d.feed(&mut f, "modified-good.json");
        assert!(matches!(
            d.feed(&mut f, "modified-labels-only.json"),
            Outcome::Unchanged { .. }
        ));
        assert!(matches!(
            d.feed(&mut f, "modified-bad-port.json"),
            Outcome::Refused { .. }
        ));
        // A relist that still has the bad object: nothing new.
        assert!(matches!(
            d.feed(&mut f, "list-with-bad.json"),
            Outcome::StillRefused { .. }
        ));
        assert_eq!(d.applied.len(), 1);
    }

    #[test]
    fn delete_keeps_the_policy_in_force() {
        let (mut d, mut f) = (Daemon::default(), PolicyFeed::new("default"));
        d.feed(&mut f, "modified-good.json");
        assert_eq!(
            d.feed(&mut f, "deleted.json"),
            Outcome::Gone {
                name: "default".into(),
                from_object: true
            }
        );
        assert_eq!(d.applied.len(), 1);
        assert!(
            f.in_force().is_some(),
            "deleting the object never loosens the fence"
        );
        // Re-created with the same spec: nothing to reload.
        assert!(matches!(
            d.feed(&mut f, "list-with-good.json"),
            Outcome::Unchanged { .. }
        ));
    }

    #[test]
    fn restart_relist_applies_what_changed_while_disconnected() {
        let (mut d, mut f) = (Daemon::default(), PolicyFeed::new("default"));
        d.feed(&mut f, "added-good.json");
        // The watch expired (410); the watcher relists.
        let e = WatchEvent::from_watch_json(&fixture("error-expired.json")).unwrap_err();
        assert!(e.to_string().contains("410 Expired"), "{e}");
        assert!(matches!(
            d.feed(&mut f, "list-with-good.json"),
            Outcome::Reloaded { origin, .. } if origin == "AgentGuardPolicy/default@48240"
        ));
        // Relist again, unchanged; then the object is gone from the list.
        assert!(matches!(
            d.feed(&mut f, "list-with-good.json"),
            Outcome::Unchanged { .. }
        ));
        assert!(matches!(
            d.feed(&mut f, "list-empty.json"),
            Outcome::Gone {
                from_object: true,
                ..
            }
        ));
        assert_eq!(d.feed(&mut f, "list-empty.json"), Outcome::Nothing);
        assert_eq!(d.applied.len(), 2);
    }

    #[test]
    fn bad_object_at_start_leaves_the_start_up_policy() {
        let (mut d, mut f) = (Daemon::default(), PolicyFeed::new("default"));
        assert!(matches!(
            d.feed(&mut f, "list-with-bad.json"),
            Outcome::Refused { .. }
        ));
        assert!(d.applied.is_empty());
        assert_eq!(
            d.feed(&mut f, "deleted.json"),
            Outcome::Gone {
                name: "default".into(),
                from_object: false
            }
        );
    }

    #[test]
    fn other_objects_are_ignored_and_bookmarks_are_no_events() {
        let (mut d, mut f) = (Daemon::default(), PolicyFeed::new("default"));
        assert_eq!(
            d.feed(&mut f, "added-other-object.json"),
            Outcome::Ignored {
                name: "staging".into()
            }
        );
        assert!(d.applied.is_empty());
        assert_eq!(
            WatchEvent::from_watch_json(&fixture("bookmark.json")).unwrap(),
            None
        );
        // The same object followed under its own name is applied.
        let mut f = PolicyFeed::new("staging");
        assert!(matches!(
            d.feed(&mut f, "added-other-object.json"),
            Outcome::Reloaded { .. }
        ));
    }

    #[test]
    fn malformed_events_are_errors_not_policies() {
        let v = serde_json::json!({"type": "ADDED", "object": {"kind": "ConfigMap", "metadata": {"name": "x"}}});
        assert!(matches!(
            WatchEvent::from_watch_json(&v),
            Err(FeedError::NotAPolicy(_))
        ));
        let v = serde_json::json!({"type": "ADDED", "object": {"kind": "AgentGuardPolicy", "metadata": {}}});
        assert!(WatchEvent::from_watch_json(&v).is_err());
        assert!(WatchEvent::from_watch_json(&serde_json::json!({"object": {}})).is_err());
        let v = serde_json::json!({"type": "ADDED", "object": {"kind": "AgentGuardPolicy", "metadata": {"name": "default"}}});
        let mut f = PolicyFeed::new("default");
        let mut reload = |_: &str, _: &str| -> Result<u32, String> { panic!("no reload") };
        let ev = WatchEvent::from_watch_json(&v).unwrap().unwrap();
        assert!(matches!(
            f.handle(ev, &mut reload),
            Outcome::Refused { reason, .. } if reason == "the object has no spec"
        ));
    }
}
