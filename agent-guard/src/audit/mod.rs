//! The per-tenant, hash-chained audit trail.
//!
//! One JSONL file per tenant under `<audit-dir>/<tenant>/audit.jsonl`.
//! Records that belong to no tenant (daemon start/stop, policy loads) go to
//! `<audit-dir>/_node/`; tenant names cannot start with `_`.

pub mod record;
pub mod writer;

pub use record::AuditRecord;
pub use writer::AuditWriter;

/// Directory of records that belong to the node, not a tenant.
pub const NODE_LOG: &str = "_node";
/// File name of a tenant's log.
pub const LOG_FILE: &str = "audit.jsonl";
