//! The shipper: origin topics → compacted, compressed micro-batches → destination batch topic.
//!
//! ```text
//!  origin table topics ──StreamConsumer (group)──▶ per-partition buffers ──cut──▶ decode
//!        ▲                                                                         │
//!        │ commit offset (last+1)                                                  ▼
//!        └──────────── after ack ◀── destination producer ◀── frame ◀── encode ◀── compact
//! ```
//!
//! Progress: an origin partition's consumer offset is committed only after the destination
//! broker acknowledged the batch that covers it (idempotent producer, `acks=all`), and it never
//! moves backwards. A crash between produce and commit leaves a batch the commit does not know
//! about, so before using a partition (at start-up and after every rebalance) the shipper reads
//! the newest manifests for it from the destination batch topic and resumes after the last
//! shipped offset: no range is shipped twice and none is skipped. Batch ids are the origin range
//! itself, so even a re-shipped range (a replay) carries the same id and the destination's
//! dedupe makes it a no-op.
//!
//! Repeats: capture restarts from its slot's confirmed position, so after a crash it sends
//! changes again that are in the topic already. Each partition's stream changes are in
//! `(lsn, seq)` order, so the live lane leaves out any stream change at or below the newest
//! position it shipped ([`POSITION_HEADER`] carries that position across restarts). Compaction
//! would otherwise fold the first copy of a version into a newer one, and the repeat behind a
//! batch cut would bring the older version back.

pub mod compact;
pub mod stats;
pub mod transform;

pub use stats::ShipStats;

use std::collections::{HashMap, HashSet};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_connectors::kafka::{Cluster, KafkaError, Span, TopicPartition, TopicSpec};
use ferry_connectors::registry::{subject, SchemaRegistry};
use ferry_schemas::manifest::{self, Manifest, ManifestKind};
use ferry_schemas::{EncodedSchema, Header, TableId};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError as RdError;
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::batch::payload;
use crate::batch::Entry;
use crate::config::{parse_table, Config};
use crate::inspect;

/// Why shipping stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// A Kafka operation failed.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// A client call failed.
    #[error("kafka {cluster}: {action}: {source}")]
    Client {
        /// Which cluster.
        cluster: &'static str,
        /// What was being done.
        action: String,
        /// The client's error.
        source: RdError,
    },
    /// Data that cannot be shipped (permanent for that partition).
    #[error("{topic}[{partition}] offset {offset}: {reason}")]
    Data {
        /// Origin topic.
        topic: String,
        /// Origin partition.
        partition: i32,
        /// Origin offset.
        offset: i64,
        /// What is wrong.
        reason: String,
    },
    /// A service Ferry depends on is unreachable for now (retried).
    #[error("{0}")]
    Unavailable(String),
    /// A schema registry refused or did not answer.
    #[error(transparent)]
    Registry(#[from] ferry_connectors::registry::RegistryError),
    /// The control or state store could not be read or written.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A failure retrying cannot help: a setup problem (no registry for Confluent records, a
    /// destination table without a key), a request the database refuses, a bad argument.
    #[error("{0}")]
    Permanent(String),
    /// Anything else. Retried: an unknown failure is transient until known otherwise.
    #[error("{0}")]
    Unexpected(String),
}

impl ShipError {
    /// Whether a retry could help: data and setup errors are permanent; connections, brokers
    /// and anything unknown are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            ShipError::Kafka(e) => e.is_retryable(),
            ShipError::Client { .. } => true,
            ShipError::Data { .. } => false,
            ShipError::Unavailable(_) => true,
            ShipError::Registry(e) => e.is_retryable(),
            ShipError::Store(e) => e.is_retryable(),
            ShipError::Permanent(_) => false,
            ShipError::Unexpected(_) => true,
        }
    }
}

impl crate::runtime::retry::Retryable for ShipError {
    fn is_retryable(&self) -> bool {
        ShipError::is_retryable(self)
    }
}

pub(crate) fn client(
    cluster: &'static str,
    action: impl Into<String>,
) -> impl FnOnce(RdError) -> ShipError {
    let action = action.into();
    move |source| ShipError::Client {
        cluster,
        action,
        source,
    }
}

/// Rebalances, reported by the consumer context to the loop.
enum Assignment {
    Assigned(Vec<TopicPartition>),
    Revoked(Vec<TopicPartition>),
}

struct ShipContext {
    tx: Mutex<std_mpsc::Sender<Assignment>>,
}

fn partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

impl ClientContext for ShipContext {}

impl ConsumerContext for ShipContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let (Rebalance::Revoke(tpl), Ok(tx)) = (rebalance, self.tx.lock()) {
            let _ = tx.send(Assignment::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let (Rebalance::Assign(tpl), Ok(tx)) = (rebalance, self.tx.lock()) {
            let _ = tx.send(Assignment::Assigned(partitions(tpl)));
        }
    }
}

/// Schemas from a cluster's schema topic, by value fingerprint, and (for records in the
/// Confluent wire format) from its schema registry, by id.
pub struct Registry {
    cluster: Cluster,
    prefix: String,
    schemas: HashMap<String, Arc<EncodedSchema>>,
    ids: Option<SchemaRegistry>,
    by_id: HashMap<u32, Arc<EncodedSchema>>,
}

impl Registry {
    /// An empty registry; [`Registry::get`] loads on demand.
    pub fn new(cluster: Cluster, prefix: &str) -> Self {
        Registry {
            cluster,
            prefix: prefix.to_string(),
            schemas: HashMap::new(),
            ids: None,
            by_id: HashMap::new(),
        }
    }

    /// Also resolves Confluent schema ids through `registry` (the same cluster's).
    pub fn with_ids(mut self, registry: Option<SchemaRegistry>) -> Self {
        self.ids = registry;
        self
    }

    /// The value schema a record's header names (blocking I/O on a miss).
    pub fn for_header(&mut self, header: Header) -> Result<Option<Arc<EncodedSchema>>, ShipError> {
        match header {
            Header::SingleObject(fp) => self.get(&fp.to_string()),
            Header::Confluent(id) => {
                if let Some(s) = self.by_id.get(&id) {
                    return Ok(Some(s.clone()));
                }
                let Some(registry) = &self.ids else {
                    return Err(ShipError::Permanent(format!(
                        "a record names schema id {id} (Confluent wire format) but no schema \
                         registry is configured for this cluster (origin.registry)"
                    )));
                };
                let json = registry.schema_blocking(id)?;
                let schema = EncodedSchema::from_json(&json).map_err(|e| {
                    ShipError::Unexpected(format!("schema id {id} in {}: {e}", registry.url()))
                })?;
                let schema = Arc::new(schema);
                self.by_id.insert(id, schema.clone());
                Ok(Some(schema))
            }
        }
    }

    fn reload(&mut self) -> Result<(), ShipError> {
        let all = inspect::load_schemas(&self.cluster, &self.prefix)
            // A broker failing over (NotLeaderForPartition while leadership moves after a
            // restart) or out of reach: retried, like any other broker trouble.
            .map_err(|e| ShipError::Unavailable(format!("reading the schema topic: {e}")))?;
        for (fp, json) in all {
            if self.schemas.contains_key(&fp) {
                continue;
            }
            // Key schemas are not envelopes; only value schemas are needed here.
            if let Ok(s) = EncodedSchema::from_json(&json) {
                self.schemas.insert(fp, Arc::new(s));
            }
        }
        Ok(())
    }

    /// The schema with this fingerprint, re-reading the schema topic once when unknown.
    pub fn get(&mut self, fp: &str) -> Result<Option<Arc<EncodedSchema>>, ShipError> {
        if !self.schemas.contains_key(fp) {
            self.reload()?;
        }
        Ok(self.schemas.get(fp).cloned())
    }

    /// The schema with this fingerprint if already loaded.
    pub fn cached(&self, fp: &str) -> Option<Arc<EncodedSchema>> {
        self.schemas.get(fp).cloned()
    }
}

/// The destination partition that holds an origin partition's batches.
pub fn batch_partition(topic: &str, partition: i32, partitions: i32) -> i32 {
    (crc32fast::hash(format!("{topic}/{partition}").as_bytes()) % partitions.max(1) as u32) as i32
}

/// What the live lane shipped of an origin partition, from the destination batch topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShippedEnd {
    /// Newest shipped offset + 1.
    pub next: i64,
    /// The newest stream position shipped up to there (batches from before the
    /// [`POSITION_HEADER`] have none).
    pub position: Option<StreamPosition>,
    /// The incarnation of the origin topic it was shipped from ([`INCARNATION_HEADER`]).
    pub incarnation: u32,
    /// The fingerprint of the last origin record shipped ([`ANCHOR_HEADER`]; none from before
    /// the header, or after an accepted recreation, when nothing of the new topic is shipped).
    pub anchor: Option<u64>,
}

/// The batch-record header that names the origin topic's incarnation a live batch was cut from
/// (absent: the first, 0). It goes up by one each time an operator accepts that the topic was
/// deleted and created again.
pub const INCARNATION_HEADER: &str = "ferry.incarnation";

/// The batch-record header that holds the fingerprint of the last origin record of the range
/// ([`anchor`], 16 hex digits): a resumed shipper reads that record again, and a different one
/// (or none, the topic being shorter) means the topic was deleted and created again.
pub const ANCHOR_HEADER: &str = "ferry.anchor";

/// The fingerprint of an origin record: its key and value (not its timestamp: a record written
/// again byte for byte at the same offset is the same change).
pub fn anchor(key: Option<&[u8]>, value: &[u8]) -> u64 {
    let mut h = crc32fast::Hasher::new();
    match key {
        Some(k) => {
            h.update(&(k.len() as u64).to_le_bytes());
            h.update(k);
        }
        None => h.update(&u64::MAX.to_le_bytes()),
    }
    h.update(value);
    (u64::from(h.finalize()) << 32) | u64::from(crc32fast::hash(value))
}

fn parse_anchor(b: &[u8]) -> Option<u64> {
    u64::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok()
}

/// The incarnation a batch id names (0 for ids that are not batch ids).
pub fn incarnation_of(batch_id: &str) -> u32 {
    batch_id
        .parse::<manifest::BatchId>()
        .map_or(0, |id| id.incarnation)
}

/// Why a partition's origin topic is not the one the live lane shipped from, if it is not: it
/// is shorter than what was shipped, or its record at the last shipped offset is another one.
/// `None` when it is the same (or cannot be told: that record is gone to retention, and the
/// retention check then stops the partition if anything is missing).
pub async fn recreated(
    origin: &Cluster,
    tp: &TopicPartition,
    e: &ShippedEnd,
) -> Result<Option<String>, ShipError> {
    let (low, high) = origin.watermarks(tp)?.unwrap_or_default();
    let last = e.next - 1;
    if high < e.next {
        return Ok(Some(format!(
            "it ends at offset {high} but offsets up to {last} were shipped from it"
        )));
    }
    let Some(want) = e.anchor else {
        return Ok(None);
    };
    if last < low {
        return Ok(None);
    }
    let (found, _) = origin
        .fold_partition(tp, Span::between(last, last + 1), None, |found, r| {
            *found = Some(anchor(
                r.key.as_deref(),
                r.value.as_deref().unwrap_or_default(),
            ));
            false
        })
        .await?;
    Ok(match found {
        Some(a) if a == want => None,
        Some(_) => Some(format!(
            "its record at offset {last} is not the one shipped from there"
        )),
        // Deleted between the two reads: retention, not a new topic.
        None => None,
    })
}

/// What the live lane shipped of an origin partition; `None` when nothing was shipped. Reads
/// backwards from the end in growing windows.
pub async fn shipped_end(
    dest: &Cluster,
    batch_topic: &str,
    batch_partitions: i32,
    origin: &TopicPartition,
) -> Result<Option<ShippedEnd>, ShipError> {
    let batches = TopicPartition::new(
        batch_topic,
        batch_partition(&origin.topic, origin.partition, batch_partitions),
    );
    let Some((low, high)) = dest.watermarks(&batches)? else {
        return Ok(None);
    };
    let mut window = 256i64;
    let mut end = high;
    while end > low {
        let start = (end - window).max(low);
        let (o, b) = (origin.clone(), batches.clone());
        let (best, _) = dest
            .fold_partition(&batches, Span::between(start, end), None, move |best, r| {
                // Only the live lane's batches are its progress: a replay or reship of a later
                // range must never make it skip what lies between.
                let live = Lane::of(&r) == Lane::Live;
                match r.value.as_deref().map(manifest::unframe) {
                    Some(Ok((m, _))) if live && m.covers_changes_of(&o.topic, o.partition) => {
                        let incarnation = incarnation_of(&m.batch_id);
                        // An accepted recreation starts the new topic at its first offset,
                        // nothing of it shipped yet.
                        let next = if r.header(GAP_HEADER) == Some(RECREATED.as_bytes()) {
                            m.first_offset
                        } else {
                            m.last_offset + 1
                        };
                        if best.is_none_or(|b: ShippedEnd| (b.incarnation, b.next) < (incarnation, next)) {
                            *best = Some(ShippedEnd {
                                next,
                                position: r.header(POSITION_HEADER).and_then(parse_position),
                                incarnation,
                                anchor: r.header(ANCHOR_HEADER).and_then(parse_anchor),
                            });
                        }
                    }
                    Some(Ok(_)) | None => {}
                    Some(Err(e)) => tracing::warn!(
                        batches = %b, offset = r.offset, error = %e,
                        "unreadable record in the batch topic; ignored when looking for shipped ranges"
                    ),
                }
                true
            })
            .await?;
        if best.is_some() {
            return Ok(best);
        }
        end = start;
        window *= 4;
    }
    Ok(None)
}

struct Record {
    offset: i64,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
}

#[derive(Default)]
struct Buffer {
    records: Vec<Record>,
    bytes: usize,
    opened: Option<Instant>,
    /// Whether what was shipped before is known (read from the batch topic once per buffer).
    recovered: bool,
    /// The offset the next record must have (`None`: whatever comes first).
    expect: Option<i64>,
    /// Where this buffer last sought back to, to fill a gap (sought once per gap).
    sought: Option<i64>,
    /// The newest stream position shipped of the partition: stream changes at or below it are
    /// repeats, left out.
    position: Option<StreamPosition>,
    /// The origin topic's incarnation the live lane ships from.
    incarnation: u32,
    /// A record at `expect` was read: the consumer's position going back after that means the
    /// topic may have been deleted and created again under the running shipper.
    caught_up: bool,
    stopped: bool,
}

/// The origin range a batch covers and what was consumed for it.
struct Covered<'a> {
    topic: &'a str,
    incarnation: u32,
    partition: i32,
    first: i64,
    last: i64,
    table: &'a str,
    events_in: usize,
    lsns: (i64, i64),
    raw_bytes: usize,
}

/// Everything one batch needs to be shipped.
struct Shipper<'a> {
    cfg: &'a Config,
    producer: ferry_connectors::kafka::Producer,
    wire: ferry_connectors::kafka::WireContext,
    registry: Registry,
    batch_topic: String,
    /// The batch topic's real partition count (the configured one until it exists).
    batch_partitions: i32,
    stats: Arc<ShipStats>,
    uncompacted: HashSet<String>,
    /// Fingerprints already published to the destination's schema topic.
    published: HashSet<[u8; 8]>,
    /// The destination's schema registry (Confluent format): every schema a batch uses is
    /// registered there before the batch is produced.
    dest_registry: Option<SchemaRegistry>,
    /// Which lane ships: the record header [`LANE_HEADER`] says so.
    lane: Lane,
}

/// A change's place in the origin's change stream: (commit LSN, sequence in its transaction).
/// Capture writes each partition's stream changes in this order, so a stream change at or
/// below one already read from its partition is a repeat: capture sends changes again when it
/// restarts from its slot's confirmed position after a crash.
pub type StreamPosition = (u64, u64);

/// The batch-record header that holds the newest stream position its lane had shipped of the
/// origin partition once the batch was produced (`<LSN>:<seq>`, e.g. `0/16B3748:4`).
pub const POSITION_HEADER: &str = "ferry.stream_position";

fn position_text((lsn, seq): StreamPosition) -> String {
    format!("{}:{seq}", ferry_schemas::Lsn(lsn))
}

fn parse_position(b: &[u8]) -> Option<StreamPosition> {
    let (lsn, seq) = std::str::from_utf8(b).ok()?.split_once(':')?;
    Some((lsn.parse::<ferry_schemas::Lsn>().ok()?.0, seq.parse().ok()?))
}

/// Leaves out the stream changes at or below the newest stream position shipped (`floor`, then
/// each kept change's own): repeats capture sent again. Snapshot rows always stay (they are
/// positioned at their chunk's watermark, not in the stream's order). Returns the newest
/// position kept and how many were left out.
fn drop_repeats(
    entries: &mut Vec<Entry>,
    floor: Option<StreamPosition>,
) -> (Option<StreamPosition>, usize) {
    let mut high = floor;
    let before = entries.len();
    entries.retain(|e| {
        let s = &e.event.source;
        if s.snapshot {
            return true;
        }
        let p = (s.lsn, s.seq);
        if high.is_some_and(|h| p <= h) {
            return false;
        }
        high = Some(p);
        true
    });
    (high, before - entries.len())
}

/// The batch-record header that names the lane a batch was shipped by.
pub const LANE_HEADER: &str = "ferry.lane";

/// Who shipped a batch: the live shipper, whose batches are its progress, or a range shipper
/// (replay, reship), whose batches never move the live lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// `ferry ship`.
    Live,
    /// `ferry replay`, `ferry reship`.
    Range,
}

impl Lane {
    fn name(self) -> &'static str {
        match self {
            Lane::Live => "live",
            Lane::Range => "range",
        }
    }

    /// The lane of a batch record (batches from before the header are the live lane's).
    pub fn of(r: &ferry_connectors::kafka::ReadRecord) -> Lane {
        Lane::named(r.header(LANE_HEADER))
    }

    /// The lane a [`LANE_HEADER`] value names (none: the live lane's, from before the header).
    pub fn named(header: Option<&[u8]>) -> Lane {
        match header {
            Some(b"range") => Lane::Range,
            _ => Lane::Live,
        }
    }
}

impl<'a> Shipper<'a> {
    /// A shipper of `lane` with its own destination producer.
    fn new(cfg: &'a Config, lane: Lane, stats: Arc<ShipStats>) -> Result<Shipper<'a>, ShipError> {
        let origin = Cluster::new("origin", cfg.origin.kafka.clone());
        let dest = Cluster::new("destination", cfg.destination.kafka.clone());
        let (producer, wire) = dest.producer_metered(5, "none")?;
        let batch_partitions = tokio::task::block_in_place(|| batch_partitions(cfg, &dest))?;
        Ok(Shipper {
            cfg,
            producer,
            wire,
            registry: Registry::new(origin, &cfg.capture.topic_prefix)
                .with_ids(cfg.origin_registry()?),
            batch_topic: cfg.batch_topic(),
            batch_partitions,
            stats,
            uncompacted: cfg.ship.uncompacted_tables.iter().cloned().collect(),
            published: HashSet::new(),
            dest_registry: cfg.destination_registry()?,
            lane,
        })
    }

    /// Ships an origin range that is gone from its topic as an empty batch (no rows, the
    /// header [`GAP_HEADER`]), after an operator accepted the loss: the lane then goes on
    /// after it, and apply records it like any batch.
    async fn ship_gap(
        &mut self,
        gap: &Gap,
        table: &str,
        position: Option<StreamPosition>,
    ) -> Result<(), ShipError> {
        let encoded = payload::encode(&[], self.cfg.ship.zstd_level)
            .map_err(|e| ShipError::Unexpected(e.to_string()))?;
        let incarnation = match gap.kind {
            GapKind::Retention => gap.incarnation,
            GapKind::Recreated => gap.incarnation + 1,
        };
        let range = Covered {
            topic: &gap.topic,
            incarnation,
            partition: gap.partition,
            first: gap.first,
            last: gap.last,
            table,
            events_in: 0,
            lsns: (0, 0),
            raw_bytes: 0,
        };
        let m = self.manifest(
            &range,
            ManifestKind::Changes,
            0,
            vec![],
            &encoded.bytes,
            encoded.uncompressed,
        );
        let d = batch_partition(&gap.topic, gap.partition, self.batch_partitions);
        let batch_topic = self.batch_topic.clone();
        let mut headers = self.headers(position, incarnation, None);
        headers.push((GAP_HEADER, gap.kind.name().into()));
        self.produce(&batch_topic, Some(d), &m, &encoded.bytes, &headers)
            .await?;
        match gap.kind {
            GapKind::Retention => tracing::warn!(
                batch = m.batch_id,
                table,
                "an origin range lost to retention is shipped as an empty batch, as accepted"
            ),
            GapKind::Recreated => tracing::warn!(
                batch = m.batch_id,
                table,
                incarnation,
                from = gap.first,
                "the origin topic's recreation is accepted: its new records are shipped from \
                 this offset on, as incarnation {incarnation}"
            ),
        }
        Ok(())
    }

    /// The headers of a batch record: its lane, the stream position shipped up to it, the
    /// origin topic's incarnation (after the first) and the last origin record's fingerprint.
    fn headers(
        &self,
        position: Option<StreamPosition>,
        incarnation: u32,
        anchor: Option<u64>,
    ) -> Vec<(&'static str, String)> {
        let mut h = vec![(LANE_HEADER, self.lane.name().to_string())];
        if let Some(p) = position {
            h.push((POSITION_HEADER, position_text(p)));
        }
        if incarnation > 0 {
            h.push((INCARNATION_HEADER, incarnation.to_string()));
        }
        if let Some(a) = anchor {
            h.push((ANCHOR_HEADER, format!("{a:016x}")));
        }
        h
    }

    /// Ships one partition's buffer, leaving out the stream changes at or below `floor` (and
    /// repeats among the records); returns the offset to commit and the newest stream position
    /// shipped.
    async fn ship(
        &mut self,
        (topic, incarnation): (&str, u32),
        partition: i32,
        records: Vec<Record>,
        floor: Option<StreamPosition>,
    ) -> Result<(i64, Option<StreamPosition>), ShipError> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Err(ShipError::Unexpected("empty batch".into()));
        };
        let (first_offset, last_offset) = (first.offset, last.offset);
        let last_anchor = anchor(last.key.as_deref(), &last.value);
        let data_err = |offset: i64, reason: String| ShipError::Data {
            topic: topic.to_string(),
            partition,
            offset,
            reason,
        };
        let mut entries = Vec::with_capacity(records.len());
        let mut raw_bytes = 0usize;
        let mut table = String::new();
        for r in records {
            raw_bytes += r.value.len() + r.key.as_ref().map_or(0, Vec::len);
            let (header, _) =
                Header::parse(&r.value).map_err(|e| data_err(r.offset, e.to_string()))?;
            let schema = self.registry.for_header(header)?.ok_or_else(|| {
                data_err(
                    r.offset,
                    format!("schema ({header}) is not in the schema topic"),
                )
            })?;
            let event = schema
                .decode_value(&r.value)
                .map_err(|e| data_err(r.offset, e.to_string()))?;
            table = schema.table().id.to_string();
            entries.push(Entry {
                offset: r.offset,
                key: r.key,
                schema,
                event,
            });
        }
        let events_in = entries.len();
        let (min_lsn, max_lsn) = entries.iter().fold((i64::MAX, i64::MIN), |(lo, hi), e| {
            let l = e.event.source.lsn as i64;
            (lo.min(l), hi.max(l))
        });
        let (position, repeats) = drop_repeats(&mut entries, floor);
        if repeats > 0 {
            self.stats
                .repeats_total
                .fetch_add(repeats as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let transforms: Vec<_> = self
            .cfg
            .ship
            .transforms
            .iter()
            .filter(|t| parse_table(&t.table).map(|id| id.to_string()) == Some(table.clone()))
            .cloned()
            .collect();
        let replace_rows = transforms.iter().any(|t| t.replace_rows);
        let range = Covered {
            topic,
            incarnation,
            partition,
            first: first_offset,
            last: last_offset,
            table: &table,
            events_in,
            lsns: (min_lsn, max_lsn),
            raw_bytes,
        };
        for t in &transforms {
            let out = transform::run(t, &entries)
                .await
                .map_err(|e| data_err(first_offset, format!("transform {}: {e}", t.name)))?;
            let agg_topic = crate::topics::aggregate_topic(&self.cfg.capture.topic_prefix, &t.name);
            let bytes = zstd::bulk::compress(&out, self.cfg.ship.zstd_level)
                .map_err(|e| ShipError::Unexpected(e.to_string()))?;
            let m = self.manifest(
                &range,
                ManifestKind::Aggregate(t.name.clone()),
                0,
                vec![],
                &bytes,
                out.len(),
            );
            let headers = self.headers(position, incarnation, Some(last_anchor));
            self.produce(&agg_topic, None, &m, &bytes, &headers).await?;
        }
        let enabled = self.cfg.ship.compaction && !self.uncompacted.contains(&table);
        let runs = if replace_rows {
            Vec::new()
        } else {
            compact::compact(entries, enabled)
                .await
                .map_err(|e| ShipError::Unexpected(e.to_string()))?
        };
        crate::runtime::failpoint::hit(crate::runtime::failpoint::SHIP_AFTER_COMPACTION);
        // The destination decodes with the writer schemas, so they travel first.
        for run in &runs {
            self.publish_schema(&run.schema).await?;
        }
        let encoded = payload::encode(&runs, self.cfg.ship.zstd_level)
            .map_err(|e| data_err(first_offset, e.to_string()))?;
        let m = self.manifest(
            &range,
            ManifestKind::Changes,
            encoded.rows,
            encoded.fingerprints.clone(),
            &encoded.bytes,
            encoded.uncompressed,
        );
        let d = batch_partition(topic, partition, self.batch_partitions);
        let batch_topic = self.batch_topic.clone();
        let shipped = self
            .produce(
                &batch_topic,
                Some(d),
                &m,
                &encoded.bytes,
                &self.headers(position, incarnation, Some(last_anchor)),
            )
            .await?;
        crate::runtime::failpoint::hit(crate::runtime::failpoint::SHIP_AFTER_PRODUCE);
        if let Ok(mut t) = self.stats.tables.lock() {
            t.entry(table.clone()).or_default().add(&m, shipped as u64);
        }
        self.stats
            .wire_tx_bytes
            .store(self.wire.tx_bytes(), std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            batch = m.batch_id,
            table,
            events_in,
            repeats,
            events_out = encoded.rows,
            raw_bytes,
            shipped_bytes = shipped,
            ratio = format!("{:.1}", raw_bytes as f64 / shipped.max(1) as f64),
            "batch shipped"
        );
        Ok((last_offset + 1, position))
    }

    fn manifest(
        &self,
        c: &Covered<'_>,
        kind: ManifestKind,
        events_out: usize,
        fingerprints: Vec<String>,
        payload: &[u8],
        uncompressed: usize,
    ) -> Manifest {
        let (topic, partition, first, last, table) =
            (c.topic, c.partition, c.first, c.last, c.table);
        let (events_in, lsns, raw_bytes) = (c.events_in, c.lsns, c.raw_bytes);
        let cluster = "origin";
        let id = manifest::BatchId {
            cluster: cluster.into(),
            topic: topic.into(),
            incarnation: c.incarnation,
            partition,
            first,
            last,
        }
        .to_string();
        Manifest {
            batch_id: if kind == ManifestKind::Changes {
                id
            } else {
                format!("{id}/{kind}")
            },
            kind: kind.to_string(),
            origin_cluster: cluster.into(),
            origin_topic: topic.into(),
            origin_partition: partition,
            first_offset: first,
            last_offset: last,
            source_region: self.cfg.origin.region.clone(),
            destination_region: self.cfg.destination.region.clone(),
            table: table.into(),
            events_in: events_in as i64,
            events_out: events_out as i64,
            min_lsn: lsns.0,
            max_lsn: lsns.1,
            schema_fingerprints: fingerprints,
            codec: payload::CODEC.into(),
            zstd_level: self.cfg.ship.zstd_level,
            raw_bytes: raw_bytes as i64,
            payload_bytes: payload.len() as i64,
            uncompressed_bytes: uncompressed as i64,
            crc32: i64::from(crc32fast::hash(payload)),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            created_at_us: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64),
        }
    }

    /// Publishes a schema version (value and key) to the destination's schema topic once, and
    /// registers it in the destination's schema registry (Confluent format) under the
    /// replicated topic's subjects.
    async fn publish_schema(&mut self, schema: &EncodedSchema) -> Result<(), ShipError> {
        if let Some(registry) = &self.dest_registry {
            if !self.published.contains(&schema.value_fp.0) {
                let topic =
                    crate::topics::table_topic(&self.cfg.capture.topic_prefix, &schema.table().id);
                if schema.has_key() {
                    registry
                        .register(&subject(&topic, true), &schema.key_json)
                        .await?;
                }
                registry
                    .register(&subject(&topic, false), &schema.value_json)
                    .await?;
            }
        }
        let topic = crate::topics::schema_topic(&self.cfg.capture.topic_prefix);
        for (fp, json) in [
            (schema.value_fp, &schema.value_json),
            (schema.key_fp, &schema.key_json),
        ] {
            if self.published.contains(&fp.0) {
                continue;
            }
            let key = fp.to_string();
            self.producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(json.as_bytes()),
                    Duration::from_secs(60),
                )
                .await
                .map_err(|(e, _)| client("destination", format!("publishing schema {key}"))(e))?;
            self.published.insert(fp.0);
        }
        Ok(())
    }

    /// Frames and produces a batch, waiting for the broker; returns the bytes produced.
    async fn produce(
        &self,
        topic: &str,
        partition: Option<i32>,
        m: &Manifest,
        payload: &[u8],
        headers: &[(&str, String)],
    ) -> Result<usize, ShipError> {
        let value =
            manifest::frame(m, payload).map_err(|e| ShipError::Unexpected(e.to_string()))?;
        let headers =
            headers
                .iter()
                .fold(rdkafka::message::OwnedHeaders::new(), |h, (key, value)| {
                    h.insert(rdkafka::message::Header {
                        key,
                        value: Some(value.as_str()),
                    })
                });
        let mut record = FutureRecord::to(topic)
            .key(&m.batch_id)
            .payload(&value)
            .headers(headers);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        let failed = |e| client("destination", format!("producing batch {}", m.batch_id))(e);
        let delivery = ferry_connectors::kafka::enqueue(&self.producer, record)
            .await
            .map_err(failed)?;
        // The record sits in the producer's queue (perhaps on the wire), not yet acknowledged.
        crate::runtime::failpoint::hit(crate::runtime::failpoint::SHIP_MID_PRODUCE);
        match tokio::time::timeout(Duration::from_secs(60), delivery).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err((e, _)))) => return Err(failed(e)),
            Ok(Err(_)) => return Err(failed(RdError::Canceled)),
            Err(_) => {
                return Err(failed(RdError::MessageProduction(
                    RDKafkaErrorCode::MessageTimedOut,
                )))
            }
        }
        Ok(value.len() + m.batch_id.len())
    }
}

/// Every origin table topic's shipping position for the shipper group `group`.
pub async fn lag(
    origin: &Cluster,
    prefix: &str,
    group: &str,
) -> Result<Vec<ferry_connectors::kafka::TopicLag>, ferry_connectors::kafka::KafkaError> {
    let prefix = prefix.to_string();
    origin
        .group_lag(group, move |t| crate::topics::is_table_topic(&prefix, t))
        .await
}

/// Runs the shipper until `stop` turns true, retrying transient failures.
pub async fn run(
    cfg: &Config,
    stop: watch::Receiver<bool>,
    stats: Arc<ShipStats>,
) -> Result<(), ShipError> {
    crate::runtime::retry::retrying(
        cfg.capture.max_backoff_ms,
        stop,
        "shipping",
        || {},
        |mut stop| {
            let stats = stats.clone();
            async move { run_once(cfg, &mut stop, &stats).await }
        },
    )
    .await
}

async fn run_once(
    cfg: &Config,
    stop: &mut watch::Receiver<bool>,
    stats: &Arc<ShipStats>,
) -> Result<(), ShipError> {
    LiveShipper::start(cfg, stop, stats).await?.run().await
}

/// What woke the live shipper.
enum Event {
    /// The operator asked to stop.
    Stop,
    /// The live pipeline's gate changed (pause or resume).
    Gate(crate::store::control::Gate),
    /// Time to look for buffers that lingered long enough.
    Tick,
    /// A record from an origin table topic.
    Record(Incoming),
}

/// An origin record, copied out of the consumer.
struct Incoming {
    tp: TopicPartition,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
}

/// One run of the live lane: a consumer in the shipper group, a buffer per assigned origin
/// partition, and the [`Shipper`] that turns a buffer into a batch. See the module docs for
/// the progress rule.
struct LiveShipper<'a> {
    cfg: &'a Config,
    stats: &'a Arc<ShipStats>,
    stop: &'a mut watch::Receiver<bool>,
    origin: Cluster,
    dest: Cluster,
    consumer: StreamConsumer<ShipContext>,
    /// Rebalances reported by the consumer's context.
    rebalances: std_mpsc::Receiver<Assignment>,
    /// The live pipeline's pause switch.
    live: watch::Receiver<crate::store::control::Gate>,
    /// While paused, every assigned partition is paused (no fetches) and nothing is shipped;
    /// buffered records wait, and every offset stays put.
    paused: bool,
    shipper: Shipper<'a>,
    buffers: HashMap<TopicPartition, Buffer>,
    /// Buffers to ship once the current event is handled.
    due: Vec<TopicPartition>,
    tick: tokio::time::Interval,
}

impl<'a> LiveShipper<'a> {
    /// Creates the destination topics, joins the shipper group and reads the live gate.
    async fn start(
        cfg: &'a Config,
        stop: &'a mut watch::Receiver<bool>,
        stats: &'a Arc<ShipStats>,
    ) -> Result<LiveShipper<'a>, ShipError> {
        let origin = Cluster::new("origin", cfg.origin.kafka.clone());
        let dest = Cluster::new("destination", cfg.destination.kafka.clone());
        let batch_topic = cfg.batch_topic();
        let mut topics = vec![
            TopicSpec {
                name: batch_topic.clone(),
                partitions: cfg.ship.batch_partitions,
                config: crate::topics::change_settings(cfg.topics.retention_ms),
            },
            TopicSpec {
                name: crate::topics::schema_topic(&cfg.capture.topic_prefix),
                partitions: 1,
                config: crate::topics::compacted_settings(),
            },
        ];
        for t in &cfg.ship.transforms {
            topics.push(TopicSpec {
                name: crate::topics::aggregate_topic(&cfg.capture.topic_prefix, &t.name),
                partitions: 1,
                config: crate::topics::change_settings(cfg.topics.retention_ms),
            });
        }
        dest.ensure_topics(&topics).await?;

        let (tx, rebalances) = std_mpsc::channel();
        let mut cc = origin.client_config();
        cc.set("group.id", &cfg.ship.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("topic.metadata.refresh.interval.ms", "5000")
            .set(
                "session.timeout.ms",
                cfg.ship.session_timeout_ms.to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (cfg.ship.session_timeout_ms / 5).max(100).to_string(),
            );
        if !cfg.ship.instance_id.is_empty() {
            cc.set("group.instance.id", &cfg.ship.instance_id);
        }
        cc.set("fetch.max.bytes", "52428800")
            .set("max.partition.fetch.bytes", "8388608");
        let consumer: StreamConsumer<ShipContext> = cc
            .create_with_context(ShipContext { tx: Mutex::new(tx) })
            .map_err(client("origin", "creating the consumer"))?;
        let pattern = crate::topics::table_topic_regex(&cfg.capture.topic_prefix);
        consumer
            .subscribe(&[&pattern])
            .map_err(client("origin", format!("subscribing to {pattern}")))?;
        tracing::info!(group = cfg.ship.group_id, pattern, batch_topic, "shipping");
        let mut live =
            crate::store::control::follow(cfg, crate::store::control::live_key(cfg)).await?;
        let paused = *live.borrow_and_update() == crate::store::control::Gate::Paused;
        stats
            .paused
            .store(paused, std::sync::atomic::Ordering::Relaxed);
        if paused {
            tracing::warn!(
                group = cfg.ship.group_id,
                "live shipping is paused (`ferry resume live` resumes it)"
            );
        }
        let shipper = Shipper::new(cfg, Lane::Live, stats.clone())?;
        Ok(LiveShipper {
            cfg,
            stats,
            stop,
            origin,
            dest,
            consumer,
            rebalances,
            live,
            paused,
            shipper,
            buffers: HashMap::new(),
            due: Vec::new(),
            tick: tokio::time::interval(Duration::from_millis(100)),
        })
    }

    /// The loop: apply rebalances, handle whatever comes first, then ship the buffers that
    /// became due (unless paused).
    async fn run(mut self) -> Result<(), ShipError> {
        loop {
            self.on_rebalances()?;
            match self.next_event().await? {
                Event::Stop => break,
                Event::Gate(gate) => self.on_gate(gate)?,
                Event::Tick => self.on_tick(),
                Event::Record(r) => self.on_record(r).await?,
            }
            if !self.paused {
                for tp in std::mem::take(&mut self.due) {
                    self.flush(&tp).await?;
                }
            }
        }
        self.finish().await
    }

    async fn next_event(&mut self) -> Result<Event, ShipError> {
        tokio::select! {
            _ = self.stop.changed() => Ok(Event::Stop),
            Ok(()) = self.live.changed() => Ok(Event::Gate(*self.live.borrow_and_update())),
            _ = self.tick.tick() => Ok(Event::Tick),
            m = self.consumer.recv() => {
                let m = m.map_err(client("origin", "consuming"))?;
                Ok(Event::Record(Incoming {
                    tp: TopicPartition::new(m.topic(), m.partition()),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                }))
            }
        }
    }

    /// Applies the rebalances the consumer reported: a revoked or newly assigned partition
    /// starts from a fresh buffer (its unshipped records are re-read from the committed
    /// offset).
    fn on_rebalances(&mut self) -> Result<(), ShipError> {
        let group = &self.cfg.ship.group_id;
        while let Ok(a) = self.rebalances.try_recv() {
            match a {
                Assignment::Revoked(ps) => {
                    tracing::info!(group, partitions = ps.len(), "partitions revoked");
                    for p in ps {
                        self.buffers.remove(&p);
                    }
                }
                Assignment::Assigned(ps) => {
                    tracing::info!(group, partitions = ps.len(), "partitions assigned");
                    let mut tpl = TopicPartitionList::new();
                    for p in ps {
                        tpl.add_partition(&p.topic, p.partition);
                        self.buffers.remove(&p);
                    }
                    if self.paused {
                        self.consumer
                            .pause(&tpl)
                            .map_err(client("origin", "pausing partitions"))?;
                    }
                }
            }
        }
        Ok(())
    }

    fn on_gate(&mut self, gate: crate::store::control::Gate) -> Result<(), ShipError> {
        let now = gate == crate::store::control::Gate::Paused;
        if now == self.paused {
            return Ok(());
        }
        self.paused = now;
        let assigned = self
            .consumer
            .assignment()
            .map_err(client("origin", "reading the assignment"))?;
        if now {
            self.consumer
                .pause(&assigned)
                .map_err(client("origin", "pausing partitions"))?;
        } else {
            self.consumer
                .resume(&assigned)
                .map_err(client("origin", "resuming partitions"))?;
        }
        self.stats
            .set_paused(&self.cfg.ship.group_id, now, assigned.count());
        Ok(())
    }

    fn on_tick(&mut self) {
        let linger = Duration::from_millis(self.cfg.ship.linger_ms);
        for (tp, b) in &self.buffers {
            if !b.records.is_empty() && b.opened.is_some_and(|o| o.elapsed() >= linger) {
                self.due.push(tp.clone());
            }
        }
    }

    /// Buffers a record, once it is known to follow on from what was shipped: the first record
    /// of a partition learns the shipped end from the batch topic; an earlier offset was
    /// shipped already, a later one means records are missing before it.
    async fn on_record(&mut self, r: Incoming) -> Result<(), ShipError> {
        // The rebalance that handed us this record's partition ran inside this very poll:
        // apply it before buffering, or the record would go with the buffer that the
        // assignment resets.
        self.on_rebalances()?;
        let _ = self.stats.first_record_at.set(Instant::now());
        let Incoming {
            tp,
            offset,
            key,
            value,
        } = r;
        if self.buffers.get(&tp).is_some_and(|b| b.stopped) {
            return Ok(());
        }
        if !self.buffers.get(&tp).is_some_and(|b| b.recovered) {
            self.recover(&tp, offset).await?;
        }
        let buf = self.buffers.entry(tp.clone()).or_default();
        if buf.stopped {
            return Ok(());
        }
        if let Some(want) = buf.expect {
            if offset < want {
                if std::mem::take(&mut buf.caught_up) {
                    if let Some(e) = self.shipped_end(&tp).await? {
                        self.stop_if_recreated(&tp, &e).await?;
                    }
                }
                return Ok(());
            }
            if offset > want {
                // Records were dropped on the way here (a buffer reset under a rebalance):
                // read them again. Still a gap after that, and they are gone from the origin
                // topic.
                if buf.sought != Some(want) {
                    tracing::info!(
                        topic = tp.topic,
                        partition = tp.partition,
                        from = want,
                        got = offset,
                        "records missing before this one; reading them again"
                    );
                    self.consumer
                        .seek(
                            &tp.topic,
                            tp.partition,
                            Offset::Offset(want),
                            Duration::from_secs(10),
                        )
                        .map_err(client("origin", format!("seeking {tp} to {want}")))?;
                    buf.sought = Some(want);
                    return Ok(());
                }
                // Gone from the origin topic before they were shipped: never skipped.
                let err = ShipError::Data {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    offset: want,
                    reason: gap_reason(want, offset - 1),
                };
                self.stats.gap(offset - want);
                self.stop_partition(&tp, &err);
                return Ok(());
            }
        }
        buf.expect = Some(offset + 1);
        buf.caught_up = true;
        let size = value.len() + key.as_ref().map_or(0, Vec::len);
        let max = self.cfg.ship.max_record_bytes;
        if size > max {
            let err = ShipError::Data {
                topic: tp.topic.clone(),
                partition: tp.partition,
                offset,
                reason: format!("record of {size} bytes exceeds ship.max_record_bytes ({max})"),
            };
            self.stop_partition(&tp, &err);
            return Ok(());
        }
        if buf.records.is_empty() {
            buf.opened = Some(Instant::now());
        }
        buf.records.push(Record { offset, key, value });
        buf.bytes += size;
        if buf.records.len() >= self.cfg.ship.max_events || buf.bytes >= self.cfg.ship.max_bytes {
            self.due.push(tp);
        }
        let total: usize = self.buffers.values().map(|b| b.bytes).sum();
        if total > self.cfg.ship.max_buffered_bytes {
            if let Some((tp, _)) = self.buffers.iter().max_by_key(|(_, b)| b.bytes) {
                self.due.push(tp.clone());
            }
        }
        Ok(())
    }

    /// Learns what was shipped of `tp` before (from the batch topic) and skips past it.
    async fn recover(&mut self, tp: &TopicPartition, first_seen: i64) -> Result<(), ShipError> {
        let end = self.shipped_end(tp).await?;
        // Offsets start over in a topic deleted and created again: shipping on from the old end
        // would skip the new records, so the partition stops until an operator accepts.
        if let Some(e) = &end {
            if self.stop_if_recreated(tp, e).await? {
                return Ok(());
            }
        }
        if let Some(e) = end.map(|e| e.next).filter(|e| *e > first_seen) {
            tracing::info!(
                topic = tp.topic,
                partition = tp.partition,
                resume = e,
                "skipping a range already shipped"
            );
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(e))
                .map_err(client("origin", "commit"))?;
            self.consumer
                .commit(&tpl, CommitMode::Sync)
                .map_err(client("origin", "committing"))?;
        }
        // Nothing shipped to this batch topic: the group's offset (or the topic's start) is
        // where shipping goes on, so a start deleted meanwhile is a gap too, not a skip.
        let expect = match end {
            Some(e) => e.next,
            None => {
                let (origin, group, tp) = (
                    self.origin.clone(),
                    self.cfg.ship.group_id.clone(),
                    tp.clone(),
                );
                tokio::task::spawn_blocking(move || origin.committed_offset(&group, &tp))
                    .await
                    .map_err(|e| ShipError::Unexpected(e.to_string()))??
                    .unwrap_or(0)
            }
        };
        let buf = self.buffers.entry(tp.clone()).or_default();
        buf.recovered = true;
        buf.expect = Some(expect);
        buf.position = end.and_then(|e| e.position);
        buf.incarnation = end.map_or(0, |e| e.incarnation);
        Ok(())
    }

    /// What the live lane shipped of `tp`, from the batch topic.
    /// (The future holds no reference to `self`, which is not `Sync`.)
    fn shipped_end(
        &self,
        tp: &TopicPartition,
    ) -> impl std::future::Future<Output = Result<Option<ShippedEnd>, ShipError>> + Send + 'static
    {
        let (dest, topic, partitions, tp) = (
            self.dest.clone(),
            self.shipper.batch_topic.clone(),
            self.shipper.batch_partitions,
            tp.clone(),
        );
        async move { shipped_end(&dest, &topic, partitions, &tp).await }
    }

    /// Stops `tp` if its origin topic is not the one the live lane shipped `e` from (deleted and
    /// created again): true when it stopped.
    async fn stop_if_recreated(
        &mut self,
        tp: &TopicPartition,
        e: &ShippedEnd,
    ) -> Result<bool, ShipError> {
        let Some(why) = recreated(&self.origin, tp, e).await? else {
            return Ok(false);
        };
        let err = ShipError::Data {
            topic: tp.topic.clone(),
            partition: tp.partition,
            offset: e.next - 1,
            reason: recreated_reason(&why),
        };
        self.stats.recreated();
        self.buffers.entry(tp.clone()).or_default().recovered = true;
        self.stop_partition(tp, &err);
        Ok(true)
    }

    /// Stops one partition on bad data: the rest go on.
    fn stop_partition(&mut self, tp: &TopicPartition, err: &ShipError) {
        self.stats.partition_stopped(tp, err);
        let buf = self.buffers.entry(tp.clone()).or_default();
        buf.stopped = true;
        buf.records.clear();
        buf.bytes = 0;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.topic, tp.partition);
        let _ = self.consumer.pause(&tpl);
    }

    /// Ships a partition's buffer as one batch, then commits the offset after it.
    async fn flush(&mut self, tp: &TopicPartition) -> Result<(), ShipError> {
        let Some(buf) = self.buffers.get_mut(tp) else {
            return Ok(());
        };
        if buf.records.is_empty() || buf.stopped {
            return Ok(());
        }
        let records = std::mem::take(&mut buf.records);
        buf.bytes = 0;
        buf.opened = None;
        let (floor, incarnation) = (buf.position, buf.incarnation);
        // The fence: committing where the batch starts (what is committed already) succeeds
        // only for the group's current owner of the partition. A shipper stalled past its
        // session (a pause, a cut link) learns here that it lost the partition, before it
        // produces a batch its successor is cutting too.
        let first = records.first().map_or(0, |r| r.offset);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(first))
            .map_err(client("origin", "commit"))?;
        let asked = Instant::now();
        let committed = self.consumer.commit(&tpl, CommitMode::Sync);
        // A commit that had to wait for the group (a member rejoining after its session ran
        // out) succeeds under the new generation, which proves nothing about this buffer; nor
        // does one a rebalance overtook.
        let waited = asked.elapsed();
        self.on_rebalances()?;
        let refused = match committed {
            Err(e) => Some(e.to_string()),
            Ok(()) if waited > Duration::from_millis(self.cfg.ship.session_timeout_ms / 3) => {
                Some(format!("the commit waited {waited:?} for the group"))
            }
            Ok(()) if !self.buffers.contains_key(tp) => {
                Some("a rebalance moved the partition meanwhile".into())
            }
            Ok(()) => None,
        };
        if let Some(e) = refused {
            // Not shipped: read again from `first` (a partition still ours after a passing
            // error, or a rebalance in progress, goes on from there; one lost is revoked).
            self.buffers.remove(tp);
            let _ = self.consumer.seek(
                &tp.topic,
                tp.partition,
                Offset::Offset(first),
                Duration::from_secs(10),
            );
            tracing::warn!(
                topic = tp.topic,
                partition = tp.partition,
                error = %e,
                "ownership of the partition not confirmed (stalled past the session, or a \
                 rebalance under way); its buffer is dropped unshipped and read again"
            );
            return Ok(());
        }
        match self
            .shipper
            .ship((&tp.topic, incarnation), tp.partition, records, floor)
            .await
        {
            Ok((next, position)) => {
                if let Some(b) = self.buffers.get_mut(tp) {
                    b.position = position;
                }
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next))
                    .map_err(client("origin", "commit"))?;
                self.consumer
                    .commit(&tpl, CommitMode::Sync)
                    .map_err(client("origin", format!("committing {tp} at {next}")))?;
                // The buffer's `expect` is `next` already: every buffered record moved it
                // past itself.
                Ok(())
            }
            Err(e @ ShipError::Data { .. }) => {
                self.stop_partition(tp, &e);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Clean stop: ship what is buffered.
    async fn finish(mut self) -> Result<(), ShipError> {
        let pending: Vec<_> = self
            .buffers
            .iter()
            .filter(|(_, b)| !b.records.is_empty())
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in pending {
            self.flush(&tp).await?;
        }
        let t = self.stats.total();
        tracing::info!(
            batches = t.batches,
            events_in = t.events_in,
            events_out = t.events_out,
            raw_bytes = t.raw_bytes,
            shipped_bytes = t.shipped_bytes,
            "shipper stopped"
        );
        Ok(())
    }
}

/// Where an origin partition's live shipping stopped because records are missing: a range
/// deleted from its topic (retention) before it was shipped, or the topic deleted and created
/// again (its offsets started over).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    /// The origin table topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Which.
    pub kind: GapKind,
    /// The incarnation of the topic the live lane shipped from.
    pub incarnation: u32,
    /// First offset lost (recreated: the new topic's first offset, where shipping goes on).
    pub first: i64,
    /// Last offset lost (recreated: `first`).
    pub last: i64,
    /// What was seen (recreated: how the topic differs from the one shipped from).
    pub detail: String,
}

/// What a [`Gap`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GapKind {
    /// Offsets deleted by the topic's retention before they were shipped.
    Retention,
    /// The topic was deleted and created again after offsets were shipped from it.
    Recreated,
}

impl GapKind {
    /// Its name in the [`GAP_HEADER`].
    pub fn name(self) -> &'static str {
        match self {
            GapKind::Retention => "retention",
            GapKind::Recreated => RECREATED,
        }
    }
}

/// The batch-record header of an empty batch an operator's acceptance shipped for a gap:
/// `retention` (it stands for the range lost), or [`RECREATED`] (it starts the new
/// incarnation of the topic at its first offset).
pub const GAP_HEADER: &str = "ferry.gap";

/// The [`GAP_HEADER`] value of an accepted recreation.
pub const RECREATED: &str = "recreated";

/// What the shipper says when a partition's topic was recreated: what it saw, and the way out.
fn recreated_reason(why: &str) -> String {
    format!(
        "the origin topic was deleted and created again since it was shipped from ({why}); \
         nothing of the new topic is shipped. Whatever the old topic held that was not shipped \
         is gone from Kafka. Recover: `ferry backfill --table <schema.table>` if anything may be \
         missing, then `ferry accept-gap <schema.table> --accept` (ships the new topic from its \
         first offset), then restart `ferry ship`"
    )
}

/// What the shipper says when a partition stops at a gap: the range, and the way out.
fn gap_reason(first: i64, last: i64) -> String {
    format!(
        "offsets {first}-{last} are gone from the origin topic (deleted by its retention) before \
         they were shipped; nothing after them is shipped. Recover: `ferry backfill --table \
         <schema.table>` (rows deleted in the lost range stay in the destination: `ferry verify \
         --repair` finds them), then `ferry accept-gap <schema.table> --accept`, then restart `ferry ship`"
    )
}

/// Where the live lane goes on in `tp`: after its last batch, else the shipper group's
/// committed offset, else the topic's first offset 0; with the stream position shipped.
async fn live_next(
    cfg: &Config,
    dest: &Cluster,
    batch_partitions: i32,
    tp: &TopicPartition,
) -> Result<ShippedEnd, ShipError> {
    if let Some(e) = shipped_end(dest, &cfg.batch_topic(), batch_partitions, tp).await? {
        return Ok(e);
    }
    Ok(ShippedEnd {
        next: group_start(cfg, tp).await?,
        position: None,
        incarnation: 0,
        anchor: None,
    })
}

/// Where the live lane starts in `tp` while it has no batch in the destination: the shipper
/// group's committed offset, else 0.
async fn group_start(cfg: &Config, tp: &TopicPartition) -> Result<i64, ShipError> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let (group, tp) = (cfg.ship.group_id.clone(), tp.clone());
    let committed = tokio::task::spawn_blocking(move || origin.committed_offset(&group, &tp))
        .await
        .map_err(|e| ShipError::Unexpected(e.to_string()))??;
    Ok(committed.unwrap_or(0))
}

/// The batch topic's real partition count, which decides where each origin partition's
/// batches go; the configured one until the topic exists. Blocking.
fn batch_partitions(cfg: &Config, dest: &Cluster) -> Result<i32, ShipError> {
    let real = dest.partition_count(&cfg.batch_topic(), Duration::from_secs(15))?;
    if real > 0 && real != cfg.ship.batch_partitions {
        tracing::warn!(
            batch_topic = cfg.batch_topic(),
            partitions = real,
            configured = cfg.ship.batch_partitions,
            "the batch topic has another partition count than ship.batch_partitions; its real \
             count is used"
        );
    }
    Ok(if real > 0 {
        real
    } else {
        cfg.ship.batch_partitions
    })
}

/// The ranges of `table`'s origin topic that retention deleted before the live lane shipped
/// them. With `accept`, each is shipped as an empty batch (after the operator backfilled the
/// table), so the shipper goes on after it at its next start.
pub async fn gaps(cfg: &Config, table: &TableId, accept: bool) -> Result<Vec<Gap>, ShipError> {
    let topic = crate::topics::table_topic(&cfg.capture.topic_prefix, table);
    topic_gaps(cfg, &topic, Some(table), accept).await
}

/// [`gaps`] of an origin table topic; `table` names the batches' table when accepting.
pub async fn topic_gaps(
    cfg: &Config,
    topic: &str,
    table: Option<&TableId>,
    accept: bool,
) -> Result<Vec<Gap>, ShipError> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let dest = Cluster::new("destination", cfg.destination.kafka.clone());
    let topic = topic.to_string();
    let partitions = {
        let (o, t) = (origin.clone(), topic.clone());
        tokio::task::spawn_blocking(move || o.partition_count(&t, Duration::from_secs(15)))
            .await
            .map_err(|e| ShipError::Unexpected(e.to_string()))??
    };
    if partitions == 0 {
        return Err(ShipError::Permanent(format!(
            "the origin topic {topic} does not exist"
        )));
    }
    let mut shipper = if accept {
        Some(Shipper::new(
            cfg,
            Lane::Live,
            Arc::new(ShipStats::default()),
        )?)
    } else {
        None
    };
    let batch_partitions = {
        let (cfg, dest) = (cfg.clone(), dest.clone());
        tokio::task::spawn_blocking(move || batch_partitions(&cfg, &dest))
            .await
            .map_err(|e| ShipError::Unexpected(e.to_string()))??
    };
    let mut out = Vec::new();
    for partition in 0..partitions {
        let tp = TopicPartition::new(&topic, partition);
        let e = live_next(cfg, &dest, batch_partitions, &tp).await?;
        let (low, _) = origin.watermarks(&tp)?.unwrap_or_default();
        let gap = if let Some(detail) = recreated(&origin, &tp, &e).await? {
            Gap {
                topic: topic.clone(),
                partition,
                kind: GapKind::Recreated,
                incarnation: e.incarnation,
                first: low,
                last: low,
                detail,
            }
        } else if low > e.next {
            Gap {
                topic: topic.clone(),
                partition,
                kind: GapKind::Retention,
                incarnation: e.incarnation,
                first: e.next,
                last: low - 1,
                detail: String::new(),
            }
        } else {
            continue;
        };
        if let Some(s) = &mut shipper {
            let table = table.map(ToString::to_string).unwrap_or_default();
            s.ship_gap(&gap, &table, e.position).await?;
        }
        out.push(gap);
    }
    Ok(out)
}

/// Reads origin records `first..=last` of one partition.
async fn read_range(
    origin: &Cluster,
    tp: &TopicPartition,
    first: i64,
    last: i64,
) -> Result<Vec<Record>, ShipError> {
    let (low, high) = origin.watermarks(tp)?.unwrap_or_default();
    if first < low || last >= high || first > last {
        return Err(ShipError::Permanent(format!(
            "{tp} holds offsets {low}..{high}; the range {first}-{last} is no longer (or not yet) there"
        )));
    }
    let (records, _) = origin
        .fold_partition(tp, Span::between(first, last + 1), Vec::new(), |out, r| {
            out.push(Record {
                offset: r.offset,
                key: r.key,
                value: r.value.unwrap_or_default(),
            });
            true
        })
        .await?;
    Ok(records)
}

/// Ships chosen origin ranges (reship and replay): same compaction, encoding, manifest and
/// id as live shipping, so a range shipped again carries the id it had.
pub struct RangeShipper<'a> {
    shipper: Shipper<'a>,
    origin: Cluster,
    dest: Cluster,
}

impl<'a> RangeShipper<'a> {
    /// A shipper with its own destination producer.
    pub fn new(cfg: &'a Config) -> Result<RangeShipper<'a>, ShipError> {
        Ok(RangeShipper {
            shipper: Shipper::new(cfg, Lane::Range, Arc::new(ShipStats::default()))?,
            origin: Cluster::new("origin", cfg.origin.kafka.clone()),
            dest: Cluster::new("destination", cfg.destination.kafka.clone()),
        })
    }

    /// The batch topic's partition count it ships by.
    pub fn batch_partitions(&self) -> i32 {
        self.shipper.batch_partitions
    }

    /// The incarnation of `tp`'s topic the live lane ships from, so a range shipped again
    /// carries the id the live lane gave it.
    pub async fn incarnation(&self, tp: &TopicPartition) -> Result<u32, ShipError> {
        Ok(self.live(tp).await?.map_or(0, |e| e.incarnation))
    }

    /// Where the live lane goes on in `tp` (see `live_next`): a replay or reship never ships
    /// past it, the rest being the live lane's to ship.
    pub async fn live_end(&self, tp: &TopicPartition) -> Result<i64, ShipError> {
        match self.live(tp).await? {
            Some(e) => Ok(e.next),
            None => group_start(self.shipper.cfg, tp).await,
        }
    }

    /// What the live lane shipped of `tp`.
    async fn live(&self, tp: &TopicPartition) -> Result<Option<ShippedEnd>, ShipError> {
        shipped_end(
            &self.dest,
            &self.shipper.batch_topic,
            self.shipper.batch_partitions,
            tp,
        )
        .await
    }

    /// Ships `first..=last` of an origin partition as one batch; returns (events in, rows out).
    pub async fn ship_range(
        &mut self,
        topic: &str,
        partition: i32,
        first: i64,
        last: i64,
    ) -> Result<(u64, u64, u64), ShipError> {
        let tp = TopicPartition::new(topic, partition);
        let incarnation = self.incarnation(&tp).await?;
        let records = read_range(&self.origin, &tp, first, last).await?;
        let before = self.shipper.stats.total();
        self.shipper
            .ship((topic, incarnation), partition, records, None)
            .await?;
        let after = self.shipper.stats.total();
        Ok((
            after.events_in - before.events_in,
            after.events_out - before.events_out,
            after.shipped_bytes - before.shipped_bytes,
        ))
    }
}

/// Parses a batch id `origin/<topic>[@<incarnation>]/<partition>/<first>-<last>`.
pub fn parse_batch_id(batch_id: &str) -> Result<manifest::BatchId, ShipError> {
    batch_id
        .parse()
        .map_err(|e: manifest::NotABatchId| ShipError::Permanent(e.to_string()))
}

/// Re-ships exactly the origin range of a batch (`ferry reship --batch <id>`), under the same
/// id: the destination applies it if the earlier copy never was (say it was quarantined) and
/// skips it otherwise. Returns (events in, rows out).
pub async fn reship(cfg: &Config, batch_id: &str) -> Result<(u64, u64), ShipError> {
    let id = parse_batch_id(batch_id)?;
    let mut shipper = RangeShipper::new(cfg)?;
    let tp = TopicPartition::new(&id.topic, id.partition);
    let end = shipper.live(&tp).await?;
    let now = end.map_or(0, |e| e.incarnation);
    let gone = match &end {
        Some(e) => recreated(&shipper.origin, &tp, e).await?,
        None => None,
    };
    if now != id.incarnation || gone.is_some() {
        return Err(ShipError::Permanent(format!(
            "batch {batch_id} was cut from incarnation {} of {}, which was deleted and created \
             again since ({}): its records are gone from Kafka; `ferry backfill` the table \
             instead",
            id.incarnation,
            id.topic,
            gone.unwrap_or_else(|| format!("the live lane ships incarnation {now}"))
        )));
    }
    let live = match &end {
        Some(e) => e.next,
        None => group_start(cfg, &tp).await?,
    };
    if id.last >= live {
        return Err(ShipError::Permanent(format!(
            "batch {batch_id} covers offsets the live lane has not shipped yet (it ships {} from \
             offset {live} on): it ships them itself",
            id.topic
        )));
    }
    let (events_in, events_out, _) = shipper
        .ship_range(&id.topic, id.partition, id.first, id.last)
        .await?;
    Ok((events_in, events_out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_schemas::Op;

    /// Capture's repeats (a stream change at or below one read before) are left out, in a
    /// batch and behind the floor a resumed shipper starts from; snapshot rows always stay and
    /// do not move the floor.
    #[test]
    fn repeats_are_left_out_and_snapshot_rows_stay() {
        let spec = [
            (Op::Create, 1, "a"),
            (Op::Update, 1, "b"),
            (Op::Read, 2, "s"),
            (Op::Update, 1, "c"),
            (Op::Update, 1, "b"),
            (Op::Read, 3, "t"),
        ];
        let kept = |floor, repeat_of: &[(usize, usize)]| {
            let mut e = compact::tests::entries(&spec);
            for &(at, of) in repeat_of {
                e[at].event.source = e[of].event.source.clone();
            }
            // The second snapshot row sits at an older watermark than the stream around it.
            e[5].event.source.lsn = 90;
            let (high, dropped) = drop_repeats(&mut e, floor);
            let offsets: Vec<i64> = e.iter().map(|e| e.offset).collect();
            (offsets, high, dropped)
        };
        // LSNs follow the list: 100, 101, 102, 103, 104, 90.
        assert_eq!(kept(None, &[]), (vec![0, 1, 2, 3, 4, 5], Some((104, 0)), 0));
        // The 5th is the 2nd sent again.
        assert_eq!(
            kept(None, &[(4, 1)]),
            (vec![0, 1, 2, 3, 5], Some((103, 0)), 1)
        );
        // A resumed shipper shipped up to 101 before.
        assert_eq!(
            kept(Some((101, 0)), &[]),
            (vec![2, 3, 4, 5], Some((104, 0)), 2)
        );
        // The same transaction, later sequence numbers: not repeats.
        assert_eq!(
            kept(Some((100, 7)), &[]),
            (vec![1, 2, 3, 4, 5], Some((104, 0)), 1)
        );
        // Everything shipped already.
        assert_eq!(kept(Some((200, 0)), &[]), (vec![2, 5], Some((200, 0)), 4));
    }

    #[test]
    fn stream_positions_read_back_as_written() {
        for p in [(0, 0), (0x16_B374_D848, 4), (u64::MAX, u64::MAX)] {
            assert_eq!(parse_position(position_text(p).as_bytes()), Some(p));
        }
        assert_eq!(position_text((0x16_B374_D848, 4)), "16/B374D848:4");
        for bad in [
            "",
            "16/B374D848",
            "16/B374D848:",
            "x:1",
            "1/1:-1",
            "1/1:2:3",
        ] {
            assert_eq!(parse_position(bad.as_bytes()), None, "{bad:?}");
        }
    }

    /// A resumed shipper finds what it shipped by reading the batch partition this computes,
    /// so the mapping must never change between versions: pinned values (CRC-32 of
    /// `<topic>/<partition>`, as Python's `zlib.crc32` computes it too).
    #[test]
    fn batch_partitions_are_stable_across_versions() {
        for (topic, partition, partitions, expected) in [
            ("ferry.public.items", 0, 3, 0),
            ("ferry.public.items", 0, 4, 3),
            ("ferry.public.items", 1, 4, 1),
            ("ferry.public.items", 2, 4, 3),
            ("ferry.public.orders", 0, 8, 6),
            ("ferry.public.orders", 5, 8, 1),
            ("it.x.public.t", 7, 12, 10),
            ("it.x.public.t", 0, 1, 0),
            ("it.x.public.t", 0, 0, 0),
        ] {
            assert_eq!(
                batch_partition(topic, partition, partitions),
                expected,
                "{topic}/{partition} of {partitions}"
            );
        }
    }

    #[test]
    fn batch_ids_from_the_command_line_are_checked() {
        assert_eq!(
            parse_batch_id("origin/ferry.public.t/2/10-20")
                .map(|id| (id.topic, id.partition, id.first, id.last))
                .expect("id"),
            ("ferry.public.t".to_string(), 2, 10, 20)
        );
        let e = parse_batch_id("ferry.public.t/2/10-20").expect_err("not an id");
        assert!(
            !e.is_retryable() && e.to_string().contains("not a batch id"),
            "{e}"
        );
    }
}
