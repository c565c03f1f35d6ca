//! Capture's counters and the metrics they are exposed as.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::runtime::telemetry::{Exposition, Family};

/// Live counters, readable while capture runs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Change events emitted (stream and snapshot).
    pub events_total: AtomicU64,
    /// Bytes of encoded keys and values produced.
    pub encoded_bytes_total: AtomicU64,
    /// Snapshot rows emitted.
    pub snapshot_rows_total: AtomicU64,
    /// Transactions seen.
    pub transactions_total: AtomicU64,
    /// Retries after transient failures.
    pub retries_total: AtomicU64,
    /// The last LSN confirmed to Postgres.
    pub confirmed_lsn: AtomicU64,
    /// Tables whose snapshot is complete.
    pub snapshots_done_total: AtomicU64,
    /// Tables stopped (a change capture cannot read): their changes are held.
    pub tables_stopped: AtomicU64,
    /// Changes written to the held topic.
    pub held_changes_total: AtomicU64,
}

/// `ferry_capture_events_total`.
pub const EVENTS: Family = Family::counter("ferry_capture_events_total", "change events emitted");
/// `ferry_capture_snapshot_rows_total`.
pub const SNAPSHOT_ROWS: Family =
    Family::counter("ferry_capture_snapshot_rows_total", "snapshot rows emitted");
/// `ferry_capture_transactions_total`.
pub const TRANSACTIONS: Family = Family::counter(
    "ferry_capture_transactions_total",
    "source transactions seen",
);
/// `ferry_capture_encoded_bytes_total`.
pub const ENCODED_BYTES: Family = Family::counter(
    "ferry_capture_encoded_bytes_total",
    "bytes of encoded keys and values",
);
/// `ferry_capture_retries_total`.
pub const RETRIES: Family = Family::counter(
    "ferry_capture_retries_total",
    "retries after transient failures",
);
/// `ferry_capture_confirmed_lsn`.
pub const CONFIRMED_LSN: Family = Family::gauge(
    "ferry_capture_confirmed_lsn",
    "position confirmed to Postgres",
);
/// `ferry_capture_snapshots_done`.
pub const SNAPSHOTS_DONE: Family = Family::gauge(
    "ferry_capture_snapshots_done",
    "tables whose initial snapshot is complete",
);

/// `ferry_capture_tables_stopped`.
pub const TABLES_STOPPED: Family = Family::gauge(
    "ferry_capture_tables_stopped",
    "tables capture stopped (a change it cannot read); their changes are held",
);
/// `ferry_capture_held_changes_total`.
pub const HELD_CHANGES: Family = Family::counter(
    "ferry_capture_held_changes_total",
    "changes of stopped tables written to the held topic",
);

impl Stats {
    /// Renders the counters, labelled with the slot.
    pub fn render(&self, slot: &str, out: &mut Exposition) {
        let labels = [("slot", slot)];
        for (family, counter) in [
            (EVENTS, &self.events_total),
            (SNAPSHOT_ROWS, &self.snapshot_rows_total),
            (TRANSACTIONS, &self.transactions_total),
            (ENCODED_BYTES, &self.encoded_bytes_total),
            (RETRIES, &self.retries_total),
            (CONFIRMED_LSN, &self.confirmed_lsn),
            (SNAPSHOTS_DONE, &self.snapshots_done_total),
            (TABLES_STOPPED, &self.tables_stopped),
            (HELD_CHANGES, &self.held_changes_total),
        ] {
            out.single(family, &labels, counter.load(Ordering::Relaxed));
        }
    }
}
