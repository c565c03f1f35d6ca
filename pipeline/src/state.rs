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
}

impl Backfill {
    /// `running`, `paused`, `cancelled` or `done`.
    pub fn status(&self) -> &'static str {
        if self.progress == Some(TableProgress::Done) {
            "done"
        } else if self.cancelled {
            "cancelled"
        } else if self.paused {
            "paused"
        } else {
            "running"
        }
    }
}

fn state_err(topic: &str, reason: impl Into<String>) -> CaptureError {
    CaptureError::State {
        topic: topic.into(),
        reason: reason.into(),
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
    let consumer = cluster.reader()?;
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .map_err(|e| state_err(topic, format!("reading watermarks: {e}")))?;
    if high <= low {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|e| state_err(topic, e.to_string()))?;
    consumer
        .assign(&tpl)
        .map_err(|e| state_err(topic, e.to_string()))?;
    let mut state = None;
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
                if m.key() == Some(key.as_bytes()) {
                    state = match m.payload() {
                        None => None,
                        Some(p) => Some(serde_json::from_slice(p).map_err(|e| {
                            state_err(topic, format!("record at offset {}: {e}", m.offset()))
                        })?),
                    };
                }
                if m.offset() + 1 >= high {
                    break;
                }
            }
        }
    }
    Ok(state)
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
        .map_err(|(e, _)| CaptureError::Delivery {
            topic: topic.into(),
            lsn: "state".into(),
            reason: e.to_string(),
        })?;
    Ok(())
}
