//! agent-guard: kernel-enforced egress fence and audit trail for AI agent
//! processes. The binary (`main.rs`) is a thin shell over these modules.

pub mod audit;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod export;
pub mod identity;
pub mod kernel;
pub mod metrics;
pub mod policy;
