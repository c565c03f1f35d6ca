//! How the stages run: the one retry policy every long-running loop goes through
//! ([`retry`]), the failpoints the crash tests abort at ([`failpoint`]), and the metrics text
//! every stage renders its counters into ([`telemetry`]).

pub mod failpoint;
pub mod retry;
pub mod telemetry;
