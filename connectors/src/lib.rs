//! The systems Ferry talks to.
//!
//! Glossary:
//! - **publication / slot**: the Postgres objects logical replication reads through; the slot's
//!   confirmed flush LSN is capture's checkpoint.
//! - **pgoutput**: Postgres' built-in logical decoding output; [`postgres::pgoutput`] decodes it.
//! - **relation**: a table as the replication stream describes it; each new shape becomes a new
//!   table schema version.
//! - **origin / destination cluster**: the Kafka clusters in the two regions ([`kafka`]).
//! - **schema registry**: a Confluent-compatible registry beside each cluster ([`registry`]);
//!   the Confluent wire format names a record's schema by that registry's id.

pub mod kafka;
pub mod postgres;
pub mod registry;
pub mod secret;

pub use secret::Secret;
