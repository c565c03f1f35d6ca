//! What an operator types and reads: `ferry check`, `ferry status`, `ferry jobs`, and the HTTP
//! endpoint (`/metrics`, the job API). Nothing in the library depends on this module.

pub mod check;
pub mod command;
pub mod jobs;
pub mod metrics;
pub mod status;
