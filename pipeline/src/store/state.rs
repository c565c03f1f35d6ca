//! Capture state: which tables' snapshots are complete, how far an unfinished one got, the
//! backfill jobs, and the tables capture stopped.
//!
//! Stored as JSON in the origin cluster's compacted `<prefix>._state` topic, keyed
//! `capture/<slot>`, written only after every record it vouches for has been acknowledged.
//! The slot's confirmed flush LSN is the stream's checkpoint; this is the snapshot's.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_connectors::kafka::{Cluster, Span, TopicPartition};
use rdkafka::producer::FutureRecord;
use serde::{Deserialize, Serialize};

use super::StoreError;

/// How far a table's snapshot got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableProgress {
    /// Every row was emitted and acknowledged.
    Done,
    /// Written by Ferry before keys were ordered as declared: rows up to and including this
    /// key (text form of each key column, in column order) were emitted and acknowledged, in
    /// that order.
    After(Vec<String>),
    /// Rows up to and including `key` (the text of each column in `order`) were emitted and
    /// acknowledged, in the order of the columns `order` (the key as declared when the read
    /// began; empty for a table without a key, whose `key` is a `ctid`).
    Past {
        /// The key columns, in the order the rows were read.
        order: Vec<String>,
        /// The last row's value of each, as text.
        key: Vec<String>,
    },
}

impl TableProgress {
    /// Where a read of `table` in progress goes on: the key columns to order by (indexes into
    /// `table.columns`) and the last key read, as text in that order. `None`: from the start,
    /// in declared key order (no progress, or the key columns changed since, which only reads
    /// rows again).
    pub fn resume_in(
        progress: Option<&TableProgress>,
        table: &ferry_schemas::TableSchema,
    ) -> Option<(Vec<usize>, Vec<String>)> {
        let keys = table.key_indexes();
        let (order, key) = match progress? {
            TableProgress::Done => return None,
            TableProgress::After(key) => {
                let mut order = keys.clone();
                order.sort_unstable();
                (order, key.clone())
            }
            TableProgress::Past { order, key } => {
                let order = order
                    .iter()
                    .map(|name| table.columns.iter().position(|c| c.name == *name))
                    .collect::<Option<Vec<usize>>>()?;
                (order, key.clone())
            }
        };
        let mut same = order.clone();
        same.sort_unstable();
        let mut current = keys;
        current.sort_unstable();
        let fits = if current.is_empty() {
            order.is_empty() && key.len() == 1
        } else {
            same == current && key.len() == order.len()
        };
        fits.then_some((order, key))
    }
}

/// State of one capture pipeline (one slot).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CaptureState {
    /// Per table (`schema.table`), the snapshot progress.
    pub tables: BTreeMap<String, TableProgress>,
    /// Backfill jobs by name.
    #[serde(default)]
    pub backfills: BTreeMap<String, Backfill>,
    /// Tables capture stopped (a value it cannot read), by `schema.table`: their changes go to
    /// the held topic until an operator resumes them.
    #[serde(default)]
    pub stopped: BTreeMap<String, Stopped>,
}

/// A table capture stopped, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopped {
    /// The first held change: (commit LSN, sequence number in its transaction). Held records
    /// before it belong to an earlier stop.
    pub since: (u64, u64),
    /// What could not be read, naming the column, key and LSN.
    pub reason: String,
    /// An offset of the held topic at or before this stop's first record, where a resume
    /// starts reading (0 in states written before it was recorded: read from the start).
    #[serde(default)]
    pub held_from: i64,
    /// When, epoch milliseconds.
    pub at_ms: i64,
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
    /// Where the sample stands (`None`: not reached).
    #[serde(default)]
    pub sample_state: Option<SampleState>,
}

/// Where a staged backfill's sample stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleState {
    /// Emitted; the job holds until it verifies at the destination.
    Held,
    /// Verified: the job goes on.
    Passed,
    /// Did not verify: the job is stopped.
    Failed,
}

impl SampleState {
    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            SampleState::Held => "held",
            SampleState::Passed => "passed",
            SampleState::Failed => "failed",
        }
    }
}

/// Where a job stands, as `ferry jobs` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Working.
    #[default]
    Running,
    /// Waiting for a job it comes after, or for a lower tier.
    Waiting,
    /// Paused by an operator.
    Paused,
    /// Holding at its sample until it verifies.
    Sampled,
    /// Cancelled by an operator (or its sample failed).
    Cancelled,
    /// Finished.
    Done,
    /// A table stopped by capture or held by apply, waiting for `ferry resume-table`.
    Stopped,
}

impl JobState {
    /// As shown.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Waiting => "waiting",
            JobState::Paused => "paused",
            JobState::Sampled => "sampled",
            JobState::Cancelled => "cancelled",
            JobState::Done => "done",
            JobState::Stopped => "stopped",
        }
    }

    /// Whether the job will do nothing more.
    pub fn finished(self) -> bool {
        matches!(self, JobState::Done | JobState::Cancelled)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
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

    /// Done, cancelled, paused, sampled (held for verification) or running.
    pub fn status(&self) -> JobState {
        if self.progress == Some(TableProgress::Done) {
            JobState::Done
        } else if self.cancelled {
            JobState::Cancelled
        } else if self.paused {
            JobState::Paused
        } else if self.held() {
            JobState::Sampled
        } else {
            JobState::Running
        }
    }

    /// Whether this job holds for its sample to be verified.
    pub fn held(&self) -> bool {
        self.sample_state == Some(SampleState::Held)
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
            return Some(b.status().to_string());
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

/// Reads the newest state for `slot`; a missing record means "nothing done yet".
pub async fn load(cluster: &Cluster, topic: &str, slot: &str) -> Result<CaptureState, StoreError> {
    Ok(load_value(cluster, topic, &format!("capture/{slot}"))
        .await?
        .unwrap_or_default())
}

/// Reads the newest JSON value stored under `key` in a state topic.
pub async fn load_value<T: serde::de::DeserializeOwned>(
    cluster: &Cluster,
    topic: &str,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let wanted = key.to_string();
    let mut found = load_all::<T>(cluster, topic, move |k| k == wanted).await?;
    Ok(found.remove(key))
}

/// Reads the newest JSON value of every key `wanted` accepts (a deleted key is absent); a
/// topic that does not exist holds nothing.
pub async fn load_all<T: serde::de::DeserializeOwned>(
    cluster: &Cluster,
    topic: &str,
    wanted: impl Fn(&str) -> bool + Send + 'static,
) -> Result<BTreeMap<String, T>, StoreError> {
    let tp = TopicPartition::new(topic, 0);
    let newest = BTreeMap::<String, (i64, Vec<u8>)>::new();
    let (raw, _) = cluster
        .fold_partition(&tp, Span::ALL, newest, move |newest, r| {
            let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            if wanted(&key) {
                match r.value {
                    None => newest.remove(&key),
                    Some(v) => newest.insert(key, (r.offset, v)),
                };
            }
            true
        })
        .await?;
    raw.into_iter()
        .map(|(k, (offset, body))| {
            serde_json::from_slice(&body)
                .map(|v| (k, v))
                .map_err(|e| StoreError::Corrupt {
                    topic: topic.into(),
                    offset,
                    reason: e.to_string(),
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
) -> Result<(), StoreError> {
    save_value(producer, topic, &format!("capture/{slot}"), state).await
}

/// Writes a JSON value under `key` in a state topic and waits for the broker.
pub async fn save_value<T: Serialize>(
    producer: &ferry_connectors::kafka::Producer,
    topic: &str,
    key: &str,
    state: &T,
) -> Result<(), StoreError> {
    let body = serde_json::to_vec(state)
        .map_err(|e| StoreError::Refused(format!("{topic}: {key}: {e}")))?;
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(&body),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(source, _)| StoreError::Write {
            topic: topic.into(),
            key: key.into(),
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(keys: &[(&str, u16)], others: &[&str]) -> ferry_schemas::TableSchema {
        let col = |name: &str, key: Option<u16>| ferry_schemas::Column {
            name: name.into(),
            pg_type: "int4".into(),
            type_oid: 23,
            type_mod: -1,
            missing: None,
            attnum: None,
            ty: ferry_schemas::ColumnType::Int4,
            key: key.is_some(),
            key_order: key.unwrap_or(0),
        };
        ferry_schemas::TableSchema {
            database: "db".into(),
            id: ferry_schemas::TableId::new("s", "t"),
            columns: keys
                .iter()
                .map(|(n, k)| col(n, Some(*k)))
                .chain(others.iter().map(|n| col(n, None)))
                .collect(),
        }
    }

    #[test]
    fn a_read_goes_on_in_the_order_it_began_in() {
        // Columns a, b; the key declared (b, a).
        let t = table(&[("a", 1), ("b", 0)], &["v"]);
        assert_eq!(t.key_indexes(), [1, 0]);
        let resume = |p: TableProgress| TableProgress::resume_in(Some(&p), &t);
        let past = |order: &[&str], key: &[&str]| TableProgress::Past {
            order: order.iter().map(|s| s.to_string()).collect(),
            key: key.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            resume(past(&["b", "a"], &["2", "1"])),
            Some((vec![1, 0], vec!["2".into(), "1".into()]))
        );
        // Progress an older Ferry wrote is in column order, and stays so.
        assert_eq!(
            resume(TableProgress::After(vec!["1".into(), "2".into()])),
            Some((vec![0, 1], vec!["1".into(), "2".into()]))
        );
        // The key changed since: from the start.
        assert_eq!(resume(past(&["b", "v"], &["2", "1"])), None);
        assert_eq!(resume(past(&["b"], &["2"])), None);
        assert_eq!(resume(past(&["gone", "a"], &["2", "1"])), None);
        assert_eq!(resume(TableProgress::Done), None);
        assert_eq!(TableProgress::resume_in(None, &t), None);
        let keyless = table(&[], &["v"]);
        assert_eq!(
            TableProgress::resume_in(Some(&past(&[], &["(0,3)"])), &keyless),
            Some((vec![], vec!["(0,3)".into()]))
        );
        let json = serde_json::to_string(&past(&["b", "a"], &["2", "1"])).expect("json");
        assert_eq!(json, r#"{"past":{"order":["b","a"],"key":["2","1"]}}"#);
    }

    #[test]
    fn a_stop_saved_before_held_offsets_were_recorded_reads_from_the_start() {
        let old = r#"{"since": [5, 1], "reason": "r", "at_ms": 7}"#;
        let s: Stopped = serde_json::from_str(old).expect("parses");
        assert_eq!(s.held_from, 0);
        assert_eq!(s.since, (5, 1));
    }
}
