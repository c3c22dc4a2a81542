//! Everything about names.
//!
//! - [`table`]: the policy's `host` endpoints and their current addresses
//!   (pure data: answers, TTLs, grace periods);
//! - [`resolve`]: the daemon's resolver that keeps that table fresh and
//!   rebuilds the capability image when an answer changes (`--dns-mode
//!   shared`, the default);
//! - [`proxy`]: the per-subject DNS proxy (`--dns-mode per-agent`): a
//!   resolver address per subject, answering only names of its tools;
//! - [`cache`]: the proxy's answer cache (content shared by all subjects,
//!   the decision still made per query and subject);
//! - [`agent`]: the glue between the proxy, the kernel redirect and the
//!   capability image (which answers open what for whom).

pub mod agent;
pub mod cache;
pub mod proxy;
pub mod resolve;
pub mod table;
#[cfg(test)]
mod test_records;
