//! Ferry's runtime: configuration, the capture loop and its sinks, snapshots, state, checks.
//!
//! Glossary:
//! - **capture**: reading a source database's change log and writing change events to the
//!   origin Kafka topics ([`capture`]).
//! - **sink**: where capture writes ([`sink::Sink`]): the origin cluster, or nowhere.
//! - **watermark snapshot**: reading existing rows in key-ordered chunks, fenced by messages in
//!   the change stream so they interleave correctly with live changes ([`snapshot`]).
//! - **confirmed LSN**: the position reported to Postgres; everything before it is safely in
//!   Kafka.

pub mod apply;
pub mod batch;
pub mod capture;
pub mod check;
pub mod compact;
pub mod config;
pub mod error;
pub mod inspect;
pub mod jobs;
pub mod layers;
pub mod metrics;
pub mod runtime;
pub mod ship;
pub mod sink;
pub mod snapshot;
pub mod status;
pub mod store;
pub mod throttle;
pub mod topics;
pub mod transform;
pub mod verify;
pub mod wal;
