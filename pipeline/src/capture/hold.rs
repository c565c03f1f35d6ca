//! Stopped tables: one table whose change capture cannot read never stops the others.
//!
//! ```text
//!  change with a value that does not parse ─▶ table stopped (state, ERROR, metric)
//!       │                                       │ its later changes, as sent, in WAL order
//!       ▼                                       ▼
//!  <prefix>._held_changes (origin, keyed by table, retention -1)      other tables flow on,
//!       │                                                            the slot advances
//!  ferry resume-table T ─▶ WAL message ─▶ capture, at that point in the stream:
//!       held changes decoded again and sent in order; a keyed row still unreadable is
//!       re-read from the table instead; then T's changes flow again and its snapshot goes on.
//! ```
//!
//! A held change is stored as the stream sent it ([`RawChange`]: every value's text, the
//! change's commit LSN and place in its transaction) with the fingerprint of its schema
//! version and, for the change that stopped the table, the reason. A table without a key
//! whose held change still cannot be read stays stopped at that change.

use std::collections::HashMap;
use std::sync::Arc;

use ferry_connectors::kafka::{Cluster, Span, TopicPartition};
use ferry_connectors::postgres::changes::RawChange;
use ferry_schemas::EncodedSchema;
use serde::{Deserialize, Serialize};

use crate::error::CaptureError;
use crate::topics::capture_held_topic;

/// One record of the held topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldChange {
    /// `schema.table` (also the record's key).
    pub table: String,
    /// Fingerprint of the value schema the change was streamed under (in the schema topic).
    pub value_fingerprint: String,
    /// Why it could not be read (`None`: its table was already stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The change as the stream sent it.
    pub change: RawChange,
}

/// Held changes read per page on resume.
pub const PAGE: usize = 5_000;

/// Held records of `table` from offset `from` on, at most [`PAGE`]: (offset, change or why the
/// record does not parse), and whether the topic's end was reached.
pub async fn page(
    cluster: &Cluster,
    prefix: &str,
    table: &str,
    from: i64,
) -> Result<(Vec<(i64, Result<HeldChange, String>)>, bool), CaptureError> {
    let tp = TopicPartition::new(capture_held_topic(prefix), 0);
    let key = table.as_bytes().to_vec();
    let (records, _) = cluster
        .fold_partition(&tp, Span::from(from), Vec::new(), move |acc, r| {
            if r.key.as_deref() == Some(key.as_slice()) {
                let parsed = match &r.value {
                    Some(v) => serde_json::from_slice::<HeldChange>(v).map_err(|e| e.to_string()),
                    None => Err("empty record".into()),
                };
                acc.push((r.offset, parsed));
            }
            acc.len() < PAGE
        })
        .await?;
    let end = records.len() < PAGE;
    Ok((records, end))
}

/// Schema versions by value fingerprint: every version this run registered, and on a miss
/// the schema topic (a held change can predate the run).
#[derive(Default)]
pub struct Versions {
    known: HashMap<String, Arc<EncodedSchema>>,
}

impl Versions {
    /// Remembers a version.
    pub fn add(&mut self, schema: &Arc<EncodedSchema>) {
        self.known
            .entry(schema.value_fp.to_string())
            .or_insert_with(|| schema.clone());
    }

    /// The version with this fingerprint; `None` when no one ever published it.
    pub async fn get(
        &mut self,
        cluster: &Cluster,
        prefix: &str,
        fingerprint: &str,
    ) -> Result<Option<Arc<EncodedSchema>>, CaptureError> {
        if let Some(s) = self.known.get(fingerprint) {
            return Ok(Some(s.clone()));
        }
        let tp = TopicPartition::new(crate::topics::schema_topic(prefix), 0);
        let want = fingerprint.as_bytes().to_vec();
        let (found, _) = cluster
            .fold_partition(&tp, Span::ALL, None, move |acc: &mut Option<Vec<u8>>, r| {
                if r.key.as_deref() == Some(want.as_slice()) && r.value.is_some() {
                    *acc = r.value;
                }
                true
            })
            .await?;
        let Some(json) = found else {
            return Ok(None);
        };
        let json = String::from_utf8_lossy(&json);
        let schema = EncodedSchema::from_json(&json).map_err(|source| CaptureError::Encode {
            lsn: ferry_schemas::Lsn::ZERO,
            source,
        })?;
        let schema = Arc::new(schema);
        self.add(&schema);
        Ok(Some(schema))
    }
}

/// Epoch milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
