//! Ferry's vocabulary: what a change is, where it came from, and how it is written down.
//!
//! Glossary:
//! - **change event** ([`event::ChangeEvent`]): one row-level change (`op` c/u/d/r/t) with its
//!   before and after images, its primary key and its [`event::Source`].
//! - **table schema** ([`table::TableSchema`]): one *version* of a table's columns as the source
//!   database described it; a new version appears whenever a column is added, dropped or
//!   changes type.
//! - **LSN** ([`position::Lsn`]): a PostgreSQL write-ahead-log position; the source position
//!   that capture checkpoints.
//! - **single-object encoding** ([`avro`]): the Avro specification's framing of one datum —
//!   marker `C3 01`, the writer schema's 8-byte CRC-64-AVRO fingerprint, then the binary body —
//!   so any Avro library that can look the fingerprint up decodes a record without Ferry.
//! - **Parsing Canonical Form** ([`pcf`]): the specification's normal form of a schema, whose
//!   CRC-64-AVRO is the fingerprint; computed here, not by the `apache-avro` crate.
//!
//! This crate does no I/O.

pub mod avro;
pub mod event;
pub mod manifest;
pub mod pcf;
pub mod position;
pub mod table;

pub use avro::{AvroError, EncodedSchema, Fingerprint, Header};
pub use event::{ChangeEvent, Datum, Op, Source};
pub use position::Lsn;
pub use table::{Column, ColumnType, NotATable, TableId, TableSchema};
