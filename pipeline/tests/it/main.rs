//! Integration tests against the real local stack (`ops/stack up`): PostgreSQL with
//! `wal_level = logical`, the two Apache Kafka clusters and their schema registries. Every test
//! works in its own database, slot and topic prefix, so tests never share state.

mod apply;
mod capture;
mod check;
mod crash;
mod interop;
mod jobs;
mod schema_change;
mod shapes;
mod ship;
mod snapshot;
mod support;
mod types;
