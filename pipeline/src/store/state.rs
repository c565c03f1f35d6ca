//! Capture state: which tables' snapshots are complete, and how far an unfinished one got.
//!
//! Stored as JSON in the origin cluster's compacted `<prefix>._state` topic, keyed
//! `capture/<slot>`, written only after every record it vouches for has been acknowledged.
//! The slot's confirmed flush LSN is the stream's checkpoint; this is the snapshot's.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_connectors::kafka::Cluster;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError as RdError;
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::error::CaptureError;

/// How far a table's snapshot got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableProgress {
    /// Every row was emitted and acknowledged.
    Done,
    /// Rows up to and including this key (text form of each key column) were emitted and
    /// acknowledged.
    After(Vec<String>),
}

/// State of one capture pipeline (one slot).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CaptureState {
    /// Per table (`schema.table`), the snapshot progress.
    pub tables: BTreeMap<String, TableProgress>,
    /// Backfill jobs by name.
    #[serde(default)]
    pub backfills: BTreeMap<String, Backfill>,
}

/// An online backfill of a table (`ferry backfill`), read in key-ordered chunks like a
/// snapshot while live capture continues.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backfill {
    /// `schema.table`.
    pub table: String,
    /// Optional SQL predicate restricting the rows.
    pub predicate: Option<String>,
    /// Rows per chunk.
    pub chunk_rows: usize,
    /// How far it got (`None`: not started).
    pub progress: Option<TableProgress>,
    /// Rows emitted so far.
    pub rows: u64,
    /// Rows matching when the job was requested (for progress and ETA).
    pub total: u64,
    /// Paused by an operator (survives restarts).
    #[serde(default)]
    pub paused: bool,
    /// Cancelled by an operator: no more chunks are read.
    #[serde(default)]
    pub cancelled: bool,
    /// The throttle's rate when the last chunk finished, rows per second.
    #[serde(default)]
    pub rate: f64,
    /// The signal limiting the rate then.
    #[serde(default)]
    pub limit: String,
    /// Tier in a plan: a job starts only when no job of a lower tier is unfinished.
    #[serde(default)]
    pub tier: u32,
    /// Jobs that must be done before this one starts.
    #[serde(default)]
    pub after: Vec<String>,
    /// Staged progression: hold after this many rows until the sample verifies at the
    /// destination (`ferry backfill --sample`).
    #[serde(default)]
    pub sample: Option<u64>,
    /// Where the sample stands: `held` (waiting for verification), `passed` or `failed`.
    #[serde(default)]
    pub sample_state: Option<String>,
}

impl Backfill {
    /// A job as requested, nothing done yet.
    pub fn new(table: String, predicate: Option<String>, chunk_rows: usize, total: u64) -> Self {
        Backfill {
            table,
            predicate,
            chunk_rows: chunk_rows.max(1),
            progress: None,
            rows: 0,
            total,
            paused: false,
            cancelled: false,
            rate: 0.0,
            limit: String::new(),
            tier: 0,
            after: Vec::new(),
            sample: None,
            sample_state: None,
        }
    }

    /// `done`, `cancelled`, `paused`, `sampled` (held for verification) or `running`.
    pub fn status(&self) -> &'static str {
        if self.progress == Some(TableProgress::Done) {
            "done"
        } else if self.cancelled {
            "cancelled"
        } else if self.paused {
            "paused"
        } else if self.sample_state.as_deref() == Some("held") {
            "sampled"
        } else {
            "running"
        }
    }

    /// Whether this job holds for its sample to be verified.
    pub fn held(&self) -> bool {
        self.sample_state.as_deref() == Some("held")
    }
}

impl CaptureState {
    /// Why `job` may not read now (`None`: it may): an operator's pause or cancel, its sample
    /// awaiting verification, a job it comes after, or an unfinished job of a lower tier.
    pub fn backfill_wait(&self, job: &str) -> Option<String> {
        let b = self.backfills.get(job)?;
        if b.progress == Some(TableProgress::Done) {
            return Some("done".into());
        }
        if b.cancelled || b.paused {
            return Some(b.status().into());
        }
        if b.held() {
            return Some("sample awaiting verification".into());
        }
        for dep in &b.after {
            match self.backfills.get(dep) {
                Some(d) if d.progress == Some(TableProgress::Done) => {}
                Some(d) if d.cancelled => return Some(format!("after {dep}, which was cancelled")),
                Some(_) => return Some(format!("after {dep}")),
                None => return Some(format!("after {dep}, not requested yet")),
            }
        }
        let lower = self.backfills.iter().find(|(name, o)| {
            o.tier < b.tier
                && o.progress != Some(TableProgress::Done)
                && !o.cancelled
                && name.as_str() != job
        });
        lower.map(|(name, o)| format!("tier {} waits for {name} (tier {})", b.tier, o.tier))
    }
}

/// Whether a client error means the topic does not exist (yet): nothing was stored there.
pub fn missing_topic(e: &RdError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition)
    )
}

/// Reading the state topic failed at the broker: retried.
fn state_err(topic: &str, reason: impl Into<String>) -> CaptureError {
    CaptureError::State {
        topic: topic.into(),
        reason: reason.into(),
        transient: true,
    }
}

/// Reads the newest state for `slot`; a missing record means "nothing done yet".
pub fn load(cluster: &Cluster, topic: &str, slot: &str) -> Result<CaptureState, CaptureError> {
    Ok(load_value(cluster, topic, &format!("capture/{slot}"))?.unwrap_or_default())
}

/// Reads the newest JSON value stored under `key` in a state topic.
pub fn load_value<T: serde::de::DeserializeOwned>(
    cluster: &Cluster,
    topic: &str,
    key: &str,
) -> Result<Option<T>, CaptureError> {
    let mut found = load_all::<T>(cluster, topic, |k| k == key)?;
    Ok(found.remove(key))
}

/// Reads the newest JSON value of every key `wanted` accepts (a deleted key is absent).
pub fn load_all<T: serde::de::DeserializeOwned>(
    cluster: &Cluster,
    topic: &str,
    wanted: impl Fn(&str) -> bool,
) -> Result<BTreeMap<String, T>, CaptureError> {
    let consumer = cluster.reader()?;
    let (low, high) = match consumer.fetch_watermarks(topic, 0, Duration::from_secs(10)) {
        Ok(w) => w,
        Err(e) if missing_topic(&e) => return Ok(BTreeMap::new()),
        Err(e) => return Err(state_err(topic, format!("reading watermarks: {e}"))),
    };
    let mut raw: BTreeMap<String, (i64, Vec<u8>)> = BTreeMap::new();
    if high <= low {
        return Ok(BTreeMap::new());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|e| state_err(topic, e.to_string()))?;
    consumer
        .assign(&tpl)
        .map_err(|e| state_err(topic, e.to_string()))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if std::time::Instant::now() > deadline {
            return Err(state_err(
                topic,
                format!("timed out reading to offset {high}"),
            ));
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(RdError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(state_err(topic, e.to_string())),
            Some(Ok(m)) => {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default());
                if wanted(&key) {
                    match m.payload() {
                        None => raw.remove(key.as_ref()),
                        Some(p) => raw.insert(key.into_owned(), (m.offset(), p.to_vec())),
                    };
                }
                if m.offset() + 1 >= high {
                    break;
                }
            }
        }
    }
    raw.into_iter()
        .map(|(k, (offset, body))| {
            serde_json::from_slice(&body)
                .map(|v| (k, v))
                .map_err(|e| CaptureError::State {
                    topic: topic.into(),
                    reason: format!("record at offset {offset}: {e}"),
                    transient: false,
                })
        })
        .collect()
}

/// Writes the state for `slot` and waits for the broker's acknowledgement.
pub async fn save(
    producer: &ferry_connectors::kafka::Producer,
    topic: &str,
    slot: &str,
    state: &CaptureState,
) -> Result<(), CaptureError> {
    save_value(producer, topic, &format!("capture/{slot}"), state).await
}

/// Writes a JSON value under `key` in a state topic and waits for the broker.
pub async fn save_value<T: Serialize>(
    producer: &ferry_connectors::kafka::Producer,
    topic: &str,
    key: &str,
    state: &T,
) -> Result<(), CaptureError> {
    let body = serde_json::to_vec(state).map_err(|e| state_err(topic, e.to_string()))?;
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(&body),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| {
            crate::error::undelivered(topic.into(), "state".into(), &e, key.len() + body.len())
        })?;
    Ok(())
}
