//! The shipper's counters, the log lines that go with them, and the metrics they are exposed
//! as.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use ferry_connectors::kafka::TopicPartition;

use crate::batch::egress::Egress;
use crate::config::Config;
use crate::runtime::telemetry::{Exposition, Family};

/// Live counters of a shipper, per table.
#[derive(Debug, Default)]
pub struct ShipStats {
    /// Per `schema.table`.
    pub tables: Mutex<BTreeMap<String, Egress>>,
    /// Partitions stopped by bad data.
    pub stopped_partitions: Mutex<Vec<String>>,
    /// Bytes the destination producer wrote to the brokers' sockets (librdkafka statistics).
    pub wire_tx_bytes: AtomicU64,
    /// When the first origin record arrived (start-up and group join end there).
    pub first_record_at: OnceLock<Instant>,
    /// Live shipping is paused by an operator.
    pub paused: AtomicBool,
    /// Changes capture sent again that were shipped before: left out.
    pub repeats_total: AtomicU64,
    /// Origin offsets deleted by retention before they were shipped (their partitions stop).
    pub lost_offsets: AtomicU64,
    /// Partitions whose origin topic was deleted and created again (they stop until accepted).
    pub recreated_partitions: AtomicU64,
}

/// `ferry_ship_batches_total`.
pub const BATCHES: Family = Family::counter("ferry_ship_batches_total", "batches shipped");
/// `ferry_ship_events_in_total`.
pub const EVENTS_IN: Family = Family::counter("ferry_ship_events_in_total", "changes consumed");
/// `ferry_ship_events_out_total`.
pub const EVENTS_OUT: Family = Family::counter(
    "ferry_ship_events_out_total",
    "rows shipped after compaction",
);
/// `ferry_ship_raw_bytes_total`.
pub const RAW_BYTES: Family = Family::counter(
    "ferry_ship_raw_bytes_total",
    "bytes of origin records consumed",
);
/// `ferry_ship_shipped_bytes_total`.
pub const SHIPPED_BYTES: Family = Family::counter(
    "ferry_ship_shipped_bytes_total",
    "bytes produced to the destination",
);
/// `ferry_ship_egress_cost_dollars_total`.
pub const COST: Family = Family::counter(
    "ferry_ship_egress_cost_dollars_total",
    "egress cost at ship.prices_per_gb",
);
/// `ferry_ship_wire_bytes_total`.
pub const WIRE_BYTES: Family = Family::counter(
    "ferry_ship_wire_bytes_total",
    "bytes the destination producer wrote to the brokers' sockets",
);
/// `ferry_ship_stopped_partitions`.
pub const STOPPED: Family = Family::gauge(
    "ferry_ship_stopped_partitions",
    "partitions stopped by bad data",
);
/// `ferry_ship_paused`.
pub const PAUSED: Family = Family::gauge(
    "ferry_ship_paused",
    "1 while an operator has paused live shipping",
);

/// `ferry_ship_repeats_total`.
pub const REPEATS: Family = Family::counter(
    "ferry_ship_repeats_total",
    "changes capture sent again (after its restart) that were shipped before: left out",
);

/// `ferry_ship_lost_offsets`.
pub const LOST: Family = Family::gauge(
    "ferry_ship_lost_offsets",
    "origin offsets deleted by retention before they were shipped (their partitions stopped)",
);

/// `ferry_ship_recreated_partitions`.
pub const RECREATED: Family = Family::gauge(
    "ferry_ship_recreated_partitions",
    "partitions whose origin topic was deleted and created again since it was shipped from \
     (stopped until `ferry accept-gap`)",
);

/// A per-table series and how to read it from a table's figures.
type Series = (Family, fn(&Egress) -> u64);

impl ShipStats {
    /// Sum over all tables.
    pub fn total(&self) -> Egress {
        let t = self.tables.lock().map(|t| t.clone()).unwrap_or_default();
        t.values().fold(Egress::default(), |mut acc, e| {
            acc.batches += e.batches;
            acc.events_in += e.events_in;
            acc.events_out += e.events_out;
            acc.raw_bytes += e.raw_bytes;
            acc.shipped_bytes += e.shipped_bytes;
            acc
        })
    }

    /// An origin partition stopped on bad data (the others go on).
    pub fn partition_stopped(&self, tp: &TopicPartition, err: &dyn std::fmt::Display) {
        tracing::error!(topic = tp.topic, partition = tp.partition, error = %err,
            "partition stopped: fix the data or the limit, then restart");
        if let Ok(mut s) = self.stopped_partitions.lock() {
            s.push(err.to_string());
        }
    }

    /// A partition met offsets deleted before they were shipped (it stops: see
    /// [`ShipStats::partition_stopped`]).
    pub fn gap(&self, offsets: i64) {
        self.lost_offsets
            .fetch_add(offsets.max(0) as u64, Ordering::Relaxed);
    }

    /// A partition's origin topic was deleted and created again (it stops: see
    /// [`ShipStats::partition_stopped`]).
    pub fn recreated(&self) {
        self.recreated_partitions.fetch_add(1, Ordering::Relaxed);
    }

    /// Live shipping was paused or resumed by an operator.
    pub fn set_paused(&self, group: &str, paused: bool, partitions: usize) {
        self.paused.store(paused, Ordering::Relaxed);
        tracing::warn!(
            group,
            paused,
            partitions,
            "live shipping {}",
            if paused { "paused" } else { "resumed" }
        );
    }

    /// Renders the counters per table and region pair, with the egress cost.
    pub fn render(&self, cfg: &Config, out: &mut Exposition) {
        let pair = format!("{}->{}", cfg.origin.region, cfg.destination.region);
        let tables = self.tables.lock().map(|t| t.clone()).unwrap_or_default();
        let series: [Series; 5] = [
            (BATCHES, |e| e.batches),
            (EVENTS_IN, |e| e.events_in),
            (EVENTS_OUT, |e| e.events_out),
            (RAW_BYTES, |e| e.raw_bytes),
            (SHIPPED_BYTES, |e| e.shipped_bytes),
        ];
        for (family, get) in series {
            out.family(family);
            for (table, e) in &tables {
                out.sample(family, &[("regions", &pair), ("table", table)], get(e));
            }
        }
        if let Some(price) = cfg.ship.prices_per_gb.get(&pair) {
            out.family(COST);
            for (table, e) in &tables {
                let dollars = price * e.shipped_bytes as f64 / 1e9;
                out.sample(COST, &[("regions", &pair), ("table", table)], dollars);
            }
        }
        out.single(
            WIRE_BYTES,
            &[("regions", &pair)],
            self.wire_tx_bytes.load(Ordering::Relaxed),
        );
        let stopped = self.stopped_partitions.lock().map(|s| s.len()).unwrap_or(0);
        out.single(STOPPED, &[], stopped);
        out.single(PAUSED, &[], u8::from(self.paused.load(Ordering::Relaxed)));
        out.single(REPEATS, &[], self.repeats_total.load(Ordering::Relaxed));
        out.single(LOST, &[], self.lost_offsets.load(Ordering::Relaxed));
        out.single(
            RECREATED,
            &[],
            self.recreated_partitions.load(Ordering::Relaxed),
        );
    }
}
