//! `agent-guard daemon --policy-source kubernetes`: the policy comes from an
//! `AgentGuardPolicy` object (CRD: `policy::crd`) instead of a file.
//!
//! Two halves, so the part that decides can be tested without an API
//! server:
//! - [`feed`]: what a watch event means for the policy in force. Pure: it
//!   takes events (an object applied, deleted, or the whole list after a
//!   (re)connect) and answers with the policy text to reload or a refusal.
//!   The reload itself is the daemon's ordinary one
//!   (`State::reload_from_text`, the file watcher's), passed in.
//! - `watch` (feature `kubernetes`): the kube-rs watcher that feeds it, and
//!   the Events it writes back.
//!
//! One object per daemon: each daemon follows the object named by
//! `--policy-object` (default `default`); other AgentGuardPolicy objects
//! are not merged in. A policy is one consistent whole (agents name tools,
//! approvers name tenants, names must be unique), so a merge would make one
//! object's validity depend on another's, and a deletion could leave the
//! rest invalid with nothing to refuse. One object is applied atomically by
//! the API server, just like one file; node pools that need different
//! policies run DaemonSets with different `--policy-object` names.

pub mod feed;
#[cfg(feature = "kubernetes")]
pub mod watch;

/// The object a daemon follows when `--policy-object` is not given.
pub const DEFAULT_POLICY_OBJECT: &str = "default";

/// Where the daemon's policy comes from (`--policy-source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// `--policy` (or the default path, or the embedded policy), reloaded
    /// when the file changes and on SIGHUP.
    File,
    /// The AgentGuardPolicy named `object`; the file policy is only what
    /// the daemon starts with, until the object is seen.
    Kubernetes { object: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "--policy-source kubernetes: this agent-guard was built without Kubernetes support (build it with `--features kubernetes`)"
    )]
    NotBuiltIn,
    #[error("--policy-source: unknown source {0:?} (expected file or kubernetes)")]
    Unknown(String),
    #[error("--policy-object {0:?} is not a Kubernetes object name: {1}")]
    BadName(String, String),
}

impl PolicySource {
    /// From `--policy-source` and `--policy-object`.
    pub fn from_args(source: &str, object: Option<&str>) -> Result<PolicySource, SourceError> {
        match source {
            "file" => Ok(PolicySource::File),
            "kubernetes" if cfg!(feature = "kubernetes") => {
                let object = object.unwrap_or(DEFAULT_POLICY_OBJECT).to_string();
                check_object_name(&object)
                    .map_err(|why| SourceError::BadName(object.clone(), why))?;
                Ok(PolicySource::Kubernetes { object })
            }
            "kubernetes" => Err(SourceError::NotBuiltIn),
            other => Err(SourceError::Unknown(other.to_string())),
        }
    }

    pub fn is_file(&self) -> bool {
        matches!(self, PolicySource::File)
    }
}

/// A DNS subdomain name (RFC 1123), as Kubernetes wants for object names.
fn check_object_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1-253 characters".into());
    }
    let ok_label = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !name.split('.').all(ok_label) {
        return Err("use lowercase letters, digits, '-' and '.'".into());
    }
    Ok(())
}

/// Starts following the AgentGuardPolicy when that is the source.
pub fn spawn(
    source: &PolicySource,
    state: std::sync::Arc<super::state::State>,
    node_id: &str,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    match source {
        PolicySource::File => None,
        #[cfg(feature = "kubernetes")]
        PolicySource::Kubernetes { object } => Some(tokio::spawn(watch::run(
            state,
            object.clone(),
            node_id.to_string(),
            shutdown,
        ))),
        #[cfg(not(feature = "kubernetes"))]
        PolicySource::Kubernetes { .. } => {
            // from_args refuses it in such a build.
            let _ = (state, node_id, shutdown);
            tracing::error!("{}", SourceError::NotBuiltIn);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_source_flags() {
        assert_eq!(
            PolicySource::from_args("file", None).unwrap(),
            PolicySource::File
        );
        assert!(matches!(
            PolicySource::from_args("etcd", None),
            Err(SourceError::Unknown(_))
        ));
        let k = PolicySource::from_args("kubernetes", None);
        if cfg!(feature = "kubernetes") {
            assert_eq!(
                k.unwrap(),
                PolicySource::Kubernetes {
                    object: "default".into()
                }
            );
            assert!(matches!(
                PolicySource::from_args("kubernetes", Some("Pool_A")),
                Err(SourceError::BadName(..))
            ));
            assert!(PolicySource::from_args("kubernetes", Some("pool-a.gpu")).is_ok());
        } else {
            assert!(matches!(k, Err(SourceError::NotBuiltIn)), "{k:?}");
        }
    }
}
