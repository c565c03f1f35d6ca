//! The applier's counters, the log lines that go with them, and the metrics they are exposed
//! as.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::runtime::telemetry::{Exposition, Family};

/// Live counters of an applier.
#[derive(Debug, Default)]
pub struct ApplyStats {
    /// Batches applied.
    pub batches_applied_total: AtomicU64,
    /// Batches skipped because they were applied before.
    pub batches_duplicate_total: AtomicU64,
    /// Batches that failed verification.
    pub batches_quarantined_total: AtomicU64,
    /// Rows written (inserted or updated) in the destination database.
    pub rows_written_total: AtomicU64,
    /// Rows deleted.
    pub rows_deleted_total: AtomicU64,
    /// Changes ignored because the destination already held a newer position.
    pub rows_stale_total: AtomicU64,
    /// Rows of live batches left out because an earlier live batch covered their origin
    /// offsets (a stalled shipper's late batch overlapping its successor's).
    pub rows_trimmed_total: AtomicU64,
    /// Partitions stopped on a corrupt batch.
    pub stopped: Mutex<Vec<String>>,
    /// Batch-topic offsets deleted by retention before they were applied.
    pub lost_batches: AtomicU64,
    /// Tables held because the destination refused one of their batches.
    pub held: Mutex<std::collections::BTreeSet<String>>,
}

/// `ferry_apply_lost_batches`.
pub const LOST: Family = Family::gauge(
    "ferry_apply_lost_batches",
    "batch-topic offsets deleted by retention before they were applied (their partitions stopped)",
);

/// `ferry_apply_batches_applied_total`.
pub const APPLIED: Family = Family::counter("ferry_apply_batches_applied_total", "batches applied");
/// `ferry_apply_batches_duplicate_total`.
pub const DUPLICATE: Family = Family::counter(
    "ferry_apply_batches_duplicate_total",
    "batches skipped because they were applied before",
);
/// `ferry_apply_batches_quarantined_total`.
pub const QUARANTINED: Family = Family::counter(
    "ferry_apply_batches_quarantined_total",
    "batches that failed verification",
);
/// `ferry_apply_rows_written_total`.
pub const ROWS_WRITTEN: Family = Family::counter(
    "ferry_apply_rows_written_total",
    "rows inserted or updated in the destination database",
);
/// `ferry_apply_rows_deleted_total`.
pub const ROWS_DELETED: Family = Family::counter(
    "ferry_apply_rows_deleted_total",
    "rows deleted in the destination database",
);
/// `ferry_apply_rows_stale_total`.
pub const ROWS_STALE: Family = Family::counter(
    "ferry_apply_rows_stale_total",
    "changes ignored because the destination held a newer position",
);
/// `ferry_apply_rows_trimmed_total`.
pub const ROWS_TRIMMED: Family = Family::counter(
    "ferry_apply_rows_trimmed_total",
    "rows of live batches left out because an applied live batch covered their origin offsets",
);
/// `ferry_apply_tables_held`.
pub const HELD: Family = Family::gauge(
    "ferry_apply_tables_held",
    "tables whose batches wait in the held topic (ferry resume-table)",
);
/// `ferry_apply_stopped_partitions`.
pub const STOPPED: Family = Family::gauge(
    "ferry_apply_stopped_partitions",
    "partitions stopped on a corrupt batch",
);

impl ApplyStats {
    /// A batch was applied.
    pub fn applied(&self, batch: &str, rows: i64) {
        self.batches_applied_total.fetch_add(1, Ordering::Relaxed);
        tracing::info!(batch, rows, "batch applied");
    }

    /// A batch was found applied before and skipped.
    pub fn duplicate(&self, batch: &str) {
        self.batches_duplicate_total.fetch_add(1, Ordering::Relaxed);
        tracing::info!(batch, "batch applied before; skipped");
    }

    /// A batch failed verification and went to the quarantine topic.
    pub fn quarantined(&self, topic: &str, partition: i32, offset: i64, reason: &str) {
        self.batches_quarantined_total
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            topic,
            partition,
            offset,
            reason,
            "corrupt batch quarantined; nothing of it was applied"
        );
    }

    /// A partition stopped at a corrupt batch (`apply.on_corrupt = stop`).
    pub fn partition_stopped(&self, topic: &str, partition: i32, offset: i64, reason: &str) {
        if let Ok(mut s) = self.stopped.lock() {
            s.push(format!("{topic}[{partition}] at offset {offset}: {reason}"));
        }
        tracing::error!(
            partition,
            offset,
            "partition stopped (apply.on_corrupt = stop): inspect the quarantine topic, re-ship \
             the range (ferry reship), then restart"
        );
    }

    /// A batch names a schema the destination schema topic lacks: its partition stops there
    /// (nothing quarantined).
    pub fn schema_missing(&self, topic: &str, partition: i32, offset: i64, batch: &str, fp: &str) {
        let reason = format!(
            "batch {batch} names schema {fp}, which the destination schema topic lacks (deleted, \
             or compacted away?); the batch is not quarantined and nothing after it is applied. \
             Restore the schema (restarting `ferry ship` publishes each schema it ships again), \
             then restart `ferry apply`"
        );
        if let Ok(mut s) = self.stopped.lock() {
            s.push(format!("{topic}[{partition}] at offset {offset}: {reason}"));
        }
        tracing::error!(
            topic,
            partition,
            offset,
            batch,
            schema = fp,
            "partition stopped: {reason}"
        );
    }

    /// Batches of a partition were deleted (retention) before they were applied: it stops.
    pub fn batches_lost(&self, topic: &str, partition: i32, (first, last): (i64, i64)) {
        self.lost_batches
            .fetch_add((last - first + 1).max(0) as u64, Ordering::Relaxed);
        if let Ok(mut s) = self.stopped.lock() {
            s.push(format!(
                "{topic}[{partition}] offsets {first}-{last}: deleted by retention before they \
                 were applied"
            ));
        }
        tracing::error!(
            topic,
            partition,
            first,
            last,
            "batches were deleted from the batch topic (its retention) before they were \
             applied; this partition stops and applies nothing after them. The destination \
             lacks their changes: `ferry verify --table <t> --repair` (or `ferry backfill`) each \
             table, stop `ferry apply`, run `ferry accept-gap --batches --accept`, then start it"
        );
    }

    /// A table is held: the destination refused one of its batches.
    pub fn table_held(&self, table: &str, batch: &str, reason: &str) {
        if let Ok(mut h) = self.held.lock() {
            h.insert(table.to_string());
        }
        tracing::error!(
            table,
            batch,
            reason,
            "table held: the destination refused this batch; it and the table's later batches \
             wait in the held topic, other tables go on (fix the cause, then `ferry resume-table \
             {table}`)"
        );
    }

    /// A held table was resumed: its held batches are applied.
    pub fn table_resumed(&self, table: &str, batches: usize) {
        if let Ok(mut h) = self.held.lock() {
            h.remove(table);
        }
        tracing::info!(table, batches, "held table resumed");
    }

    /// Renders the counters.
    pub fn render(&self, out: &mut Exposition) {
        for (family, counter) in [
            (APPLIED, &self.batches_applied_total),
            (DUPLICATE, &self.batches_duplicate_total),
            (QUARANTINED, &self.batches_quarantined_total),
            (ROWS_WRITTEN, &self.rows_written_total),
            (ROWS_DELETED, &self.rows_deleted_total),
            (ROWS_STALE, &self.rows_stale_total),
            (ROWS_TRIMMED, &self.rows_trimmed_total),
        ] {
            out.single(family, &[], counter.load(Ordering::Relaxed));
        }
        let stopped = self.stopped.lock().map(|s| s.len()).unwrap_or(0);
        out.single(STOPPED, &[], stopped);
        out.single(LOST, &[], self.lost_batches.load(Ordering::Relaxed));
        let held = self.held.lock().map(|h| h.len()).unwrap_or(0);
        out.single(HELD, &[], held);
    }
}
