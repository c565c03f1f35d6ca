//! Ferry's runtime: the three stages that move changes from a source database to a destination
//! region, the jobs an operator runs beside them, and the `ferry` command line.
//!
//! ```text
//!  origin region                                              destination region
//!  Postgres ──WAL──▶ capture ──▶ origin Kafka ──▶ ship ──▶ destination Kafka ──▶ apply ──▶ database
//!     ▲      slot    (change     (topic per      (compact,   (batch topic)       (verify,    + replicated
//!     │              events)     table)          encode)                          expand)     topics
//!     └── confirmed LSN          └── ship group offsets      └── apply group offsets
//! ```
//!
//! Every arrow moves a position only after the next system acknowledged the data: capture
//! confirms an LSN once the origin broker has every record before it, ship commits an origin
//! offset once the batch holding it is in the destination, apply commits a batch offset once the
//! batch is applied (idempotently, by batch id). Each stage's module says exactly when.
//!
//! # Glossary
//! - **change event**: one row change (insert, update, delete, truncate, snapshot read) with its
//!   source position, Avro-encoded, keyed by primary key, in the table's origin topic.
//! - **confirmed LSN**: the position capture reports to Postgres; everything before it is safely
//!   in the origin cluster.
//! - **watermark snapshot**: existing rows read in key-ordered chunks, fenced by messages in the
//!   WAL so they interleave correctly with live changes ([`capture::snapshot`], [`wal`]).
//! - **batch**: a micro-batch of one origin partition's changes, compacted to the net change
//!   per key, columnar + zstd, with a checksummed manifest; named by its origin range
//!   ([`batch`]).
//! - **live lane / backfill / replay**: live changes always go first; a backfill (re-reading a
//!   table) and a replay (re-shipping an origin range) are throttled from the origin's health
//!   ([`throttle`], [`jobs`]).
//! - **gate**: the pause switch an operator sets in the control topic ([`store::control`]).
//!
//! # Layout
//! Lowest first; a module uses only modules above it in this list ([`layers`] checks it).
//! - vocabulary: [`error`], [`topics`] (every topic name), [`config`], [`wal`] (every message
//!   Ferry writes into the WAL), [`record`] (a change as table-topic records);
//! - plumbing the stages share: [`runtime`] (the retry policy, failpoints, the metrics text), [`inspect`]
//!   (reading topics), [`batch`] (the shipped-batch format), [`store`] (state and the pause
//!   gate in compacted topics), [`throttle`] (the controller and its signals);
//! - the stages, each a loop struct with one handler per event, its errors, counters and
//!   metrics: [`capture`] (with its sink and snapshots), [`ship`] (with compaction and SQL
//!   transforms), [`apply`];
//! - operator work: [`verify`] (comparing origin and destination), [`jobs`] (backfill, replay,
//!   control routing, `ferry jobs`);
//! - [`cli`]: what an operator types and reads: every command ([`cli::command`]), `check`,
//!   `status`, the job table, `/metrics`.

pub mod apply;
pub mod batch;
pub mod capture;
pub mod cli;
pub mod config;
pub mod error;
pub mod inspect;
pub mod jobs;
pub mod layers;
pub mod record;
pub mod runtime;
pub mod ship;
pub mod store;
pub mod throttle;
pub mod topics;
pub mod verify;
pub mod wal;
