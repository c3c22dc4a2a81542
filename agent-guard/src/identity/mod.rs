//! Workload identity: who a process is, and the doors closed before an agent
//! command starts.

pub mod harden;
pub mod token;
