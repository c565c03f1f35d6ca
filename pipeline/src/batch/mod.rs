//! The shipped-batch format that ship writes and apply and replay read, below every stage.
//!
//! A batch is a manifest ([`ferry_schemas::manifest`]) framed with a payload: compacted change
//! rows as Arrow IPC, zstd-compressed ([`payload`], over [`columnar`]'s Avro ↔ Arrow mapping).
//! [`egress`] sums what batches cost on the wire.

use std::sync::Arc;

use ferry_schemas::{ChangeEvent, EncodedSchema};

pub mod columnar;
pub mod egress;
pub mod payload;

/// One change as consumed from the origin topic.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Origin offset.
    pub offset: i64,
    /// The Kafka key (Avro-encoded primary key), if any.
    pub key: Option<Vec<u8>>,
    /// The schema version the value was written with.
    pub schema: Arc<EncodedSchema>,
    /// The change.
    pub event: ChangeEvent,
}

/// A run of changes of one table version, in order.
#[derive(Clone, Debug)]
pub struct Run {
    /// The table version.
    pub schema: Arc<EncodedSchema>,
    /// Changes with their origin offsets.
    pub events: Vec<(i64, ChangeEvent)>,
}
