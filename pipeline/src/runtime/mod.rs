//! How the stages run: the one retry policy every long-running loop goes through
//! ([`retry`]), and the failpoints the crash tests abort at ([`failpoint`]).

pub mod failpoint;
pub mod retry;
