//! Egress accounting: what shipping a batch consumed at the origin and put on the wire, summed
//! per table from manifests (the shipper's live counters, `ferry status`, `/metrics`).

use ferry_schemas::manifest::Manifest;

/// Egress figures of one table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Egress {
    /// Batches shipped.
    pub batches: u64,
    /// Changes consumed.
    pub events_in: u64,
    /// Rows shipped after compaction.
    pub events_out: u64,
    /// Bytes of origin records consumed.
    pub raw_bytes: u64,
    /// Bytes produced to the destination (framed batches and their keys).
    pub shipped_bytes: u64,
}

impl Egress {
    /// Adds one batch's figures.
    pub fn add(&mut self, m: &Manifest, shipped: u64) {
        self.batches += 1;
        self.events_in += m.events_in as u64;
        self.events_out += m.events_out as u64;
        self.raw_bytes += m.raw_bytes as u64;
        self.shipped_bytes += shipped;
    }
}
