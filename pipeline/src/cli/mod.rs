//! What an operator types and reads: `ferry check`, `ferry status`, and the HTTP endpoint
//! (`/metrics`, the job API). Nothing in the library depends on this module.

pub mod check;
pub mod metrics;
pub mod status;
