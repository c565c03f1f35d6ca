//! The pause gate: operator control of the live pipeline and of replay jobs (pause, resume,
//! cancel), kept in the origin cluster.
//!
//! A request is a record in the origin cluster's compacted `<prefix>._control` topic, keyed
//! `live/<ship group>` or `job/<name>`, whose value is the newest action. Because it is kept in
//! the cluster, a pause survives restarts and reaches a process that is not running when it is
//! made. A running stage [`follow`]s its key as a [`Gate`]. Backfill jobs are controlled through
//! the origin's WAL instead (`jobs::backfill::control_job`), so that a pause takes effect at a
//! definite point of the change stream; `jobs::control::request` picks the channel.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_connectors::kafka::{Cluster, TopicSpec};
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError as RdError;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::Config;
use crate::error::CaptureError;

/// The name under which the live pipeline (capture → ship → apply) is paused and resumed.
pub const LIVE: &str = "live";

/// The control key of the live pipeline (one per shipper group).
pub fn live_key(cfg: &Config) -> String {
    format!("live/{}", cfg.ship.group_id)
}

/// The control key of a replay job.
pub fn job_key(job: &str) -> String {
    format!("job/{job}")
}

/// One request, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// `pause`, `resume` or `cancel`.
    pub action: String,
    /// When it was made, epoch milliseconds.
    pub at_ms: i64,
}

/// The state a control key puts its target in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Run.
    Open,
    /// Hold: consume nothing, ship nothing, keep every checkpoint.
    Paused,
    /// Stop for good.
    Cancelled,
}

impl Gate {
    fn of(action: Option<&String>) -> Gate {
        match action.map(String::as_str) {
            Some("pause") => Gate::Paused,
            Some("cancel") => Gate::Cancelled,
            _ => Gate::Open,
        }
    }
}

/// Reading or writing the control topic failed at the broker: retried.
fn err(topic: &str, reason: impl std::fmt::Display) -> CaptureError {
    CaptureError::State {
        topic: topic.into(),
        reason: reason.to_string(),
        transient: true,
    }
}

async fn ensure(origin: &Cluster, topic: &str) -> Result<(), CaptureError> {
    origin
        .ensure_topics(&[TopicSpec {
            name: topic.to_string(),
            partitions: 1,
            config: vec![("cleanup.policy".into(), "compact".into())],
        }])
        .await
        .map_err(|e| err(topic, e))
}

/// Writes `action` for `key` and waits for the broker's acknowledgement.
pub async fn send(cfg: &Config, key: &str, action: &str) -> Result<(), CaptureError> {
    if !matches!(action, "pause" | "resume" | "cancel") {
        return Err(CaptureError::Setup(format!(
            "unknown action {action:?} for {key} (pause, resume or cancel)"
        )));
    }
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let topic = crate::topics::control_topic(&cfg.capture.topic_prefix);
    ensure(&origin, &topic).await?;
    let producer = origin.producer(0)?;
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    crate::store::state::save_value(
        &producer,
        &topic,
        key,
        &Request {
            action: action.into(),
            at_ms,
        },
    )
    .await
}

/// Reads the whole control topic: the newest action per key.
pub fn load(origin: &Cluster, topic: &str) -> Result<BTreeMap<String, String>, CaptureError> {
    let reader = origin.reader()?;
    let mut map = BTreeMap::new();
    read_into(&reader, topic, &mut map, true)?;
    Ok(map)
}

/// Reads from the reader's position; with `to_end`, until the high watermark seen now
/// (assigning the partition from the beginning first).
fn read_into(
    reader: &ferry_connectors::kafka::Reader,
    topic: &str,
    map: &mut BTreeMap<String, String>,
    to_end: bool,
) -> Result<bool, CaptureError> {
    let mut changed = false;
    let mut high = 0;
    if to_end {
        let (low, h) = match reader.fetch_watermarks(topic, 0, Duration::from_secs(10)) {
            Ok(w) => w,
            // No topic: nothing was ever requested.
            Err(e) if crate::store::state::missing_topic(&e) => return Ok(false),
            Err(e) => return Err(err(topic, format!("reading watermarks: {e}"))),
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .map_err(|e| err(topic, e))?;
        reader.assign(&tpl).map_err(|e| err(topic, e))?;
        if high_reached(low, h, -1) {
            return Ok(false);
        }
        high = h;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let wait = if to_end { 500 } else { 0 };
        match reader.poll(Duration::from_millis(wait)) {
            None if !to_end => return Ok(changed),
            None => {}
            Some(Err(RdError::PartitionEOF(_))) if to_end => return Ok(changed),
            Some(Err(RdError::PartitionEOF(_))) => {}
            Some(Err(e)) => return Err(err(topic, e)),
            Some(Ok(m)) => {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                match m
                    .payload()
                    .map(serde_json::from_slice::<Request>)
                    .transpose()
                {
                    Ok(Some(r)) => {
                        changed |= map.insert(key, r.action.clone()).as_ref() != Some(&r.action);
                    }
                    Ok(None) => changed |= map.remove(&key).is_some(),
                    Err(e) => {
                        tracing::warn!(topic, offset = m.offset(), error = %e, "unreadable control record; ignored")
                    }
                }
                if to_end && high_reached(0, high, m.offset()) {
                    return Ok(changed);
                }
            }
        }
        if to_end && std::time::Instant::now() > deadline {
            return Err(err(topic, format!("timed out reading to offset {high}")));
        }
    }
}

fn high_reached(low: i64, high: i64, offset: i64) -> bool {
    high <= low || offset + 1 >= high
}

/// Follows the control key `key`: the receiver holds its gate now and changes when an operator
/// acts. The first value is read before this returns, so a pause made while the process was
/// down holds from its first record on.
pub async fn follow(cfg: &Config, key: String) -> Result<watch::Receiver<Gate>, CaptureError> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let topic = crate::topics::control_topic(&cfg.capture.topic_prefix);
    ensure(&origin, &topic).await?;
    let (o, t) = (origin.clone(), topic.clone());
    let (reader, map) = tokio::task::spawn_blocking(move || {
        let reader = o.reader()?;
        let mut map = BTreeMap::new();
        read_into(&reader, &t, &mut map, true)?;
        Ok::<_, CaptureError>((reader, map))
    })
    .await
    .map_err(|e| err(&topic, e))??;
    let (tx, rx) = watch::channel(Gate::of(map.get(&key)));
    std::thread::Builder::new()
        .name("ferry-control".into())
        .spawn(move || {
            let mut map = map;
            while !tx.is_closed() {
                match read_into(&reader, &topic, &mut map, false) {
                    Ok(true) => {
                        let gate = Gate::of(map.get(&key));
                        tx.send_if_modified(|g| std::mem::replace(g, gate) != gate);
                    }
                    Ok(false) => std::thread::sleep(Duration::from_millis(250)),
                    Err(e) => {
                        tracing::warn!(topic, error = %e, "reading the control topic");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        })
        .map_err(|e| err("control", e))?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_follow_the_newest_action() {
        assert_eq!(Gate::of(None), Gate::Open);
        assert_eq!(Gate::of(Some(&"pause".to_string())), Gate::Paused);
        assert_eq!(Gate::of(Some(&"resume".to_string())), Gate::Open);
        assert_eq!(Gate::of(Some(&"cancel".to_string())), Gate::Cancelled);
    }
}
