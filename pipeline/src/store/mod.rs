//! Durable state Ferry keeps in compacted topics of the origin cluster, and the pause gate.
//!
//! - [`state`]: capture state (snapshot and backfill progress) keyed by slot, and job
//!   checkpoints keyed by job, in `<prefix>._state`. Saved only after the work it describes is
//!   acknowledged downstream, so a position read back never runs ahead of the data.
//! - [`control`]: operator pause/resume/cancel requests in `<prefix>._control`, followed by the
//!   running stages as a [`control::Gate`].

pub mod control;
pub mod state;

pub use crate::error::StoreError;
