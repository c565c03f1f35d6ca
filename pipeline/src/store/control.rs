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

use ferry_connectors::kafka::{Cluster, Span, TopicPartition, TopicSpec};
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError as RdError;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::StoreError;
use crate::config::Config;
use crate::wal::JobAction;

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
    /// Pause, resume or cancel.
    pub action: JobAction,
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
    fn of(action: Option<&JobAction>) -> Gate {
        match action {
            Some(JobAction::Pause) => Gate::Paused,
            Some(JobAction::Cancel) => Gate::Cancelled,
            _ => Gate::Open,
        }
    }
}

/// The newest action per key.
pub type Actions = BTreeMap<String, JobAction>;

async fn ensure(origin: &Cluster, topic: &str) -> Result<(), StoreError> {
    origin
        .ensure_topics(&[TopicSpec {
            name: topic.to_string(),
            partitions: 1,
            config: crate::topics::compacted_settings(),
        }])
        .await
        .map_err(StoreError::from)
}

/// Writes `action` for `key` and waits for the broker's acknowledgement.
pub async fn send(cfg: &Config, key: &str, action: JobAction) -> Result<(), StoreError> {
    if !JobAction::OPERATOR.contains(&action) {
        return Err(StoreError::Refused(format!(
            "action {action} cannot be given to {key} (pause, resume or cancel)"
        )));
    }
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let topic = crate::topics::control_topic(&cfg.capture.topic_prefix);
    ensure(&origin, &topic).await?;
    let producer = origin.producer(0)?;
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    crate::store::state::save_value(&producer, &topic, key, &Request { action, at_ms }).await
}

/// Applies one control record to `actions`; returns whether it changed them.
fn apply(
    topic: &str,
    actions: &mut Actions,
    offset: i64,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> bool {
    let key = String::from_utf8_lossy(key.unwrap_or_default()).into_owned();
    match value.map(serde_json::from_slice::<Request>).transpose() {
        Ok(Some(r)) => actions.insert(key, r.action) != Some(r.action),
        Ok(None) => actions.remove(&key).is_some(),
        Err(e) => {
            tracing::warn!(topic, offset, error = %e, "unreadable control record; ignored");
            false
        }
    }
}

/// Reads the whole control topic: the newest action per key, and the offset after the last
/// record read.
pub async fn load(origin: &Cluster, topic: &str) -> Result<(Actions, i64), StoreError> {
    let t = topic.to_string();
    let (actions, read) = origin
        .fold_partition(
            &TopicPartition::new(topic, 0),
            Span::ALL,
            Actions::new(),
            move |map, r| {
                apply(&t, map, r.offset, r.key.as_deref(), r.value.as_deref());
                true
            },
        )
        .await?;
    Ok((actions, read.high))
}

/// Follows the control key `key`: the receiver holds its gate now and changes when an operator
/// acts. The first value is read before this returns, so a pause made while the process was
/// down holds from its first record on.
pub async fn follow(cfg: &Config, key: String) -> Result<watch::Receiver<Gate>, StoreError> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let topic = crate::topics::control_topic(&cfg.capture.topic_prefix);
    ensure(&origin, &topic).await?;
    let (mut actions, next) = load(&origin, &topic).await?;
    let reader = origin.reader()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(next))
        .and_then(|()| reader.assign(&tpl))
        .map_err(|e| StoreError::Refused(format!("{topic}: following from offset {next}: {e}")))?;
    let (tx, rx) = watch::channel(Gate::of(actions.get(&key)));
    std::thread::Builder::new()
        .name("ferry-control".into())
        .spawn(move || {
            while !tx.is_closed() {
                match reader.poll(Duration::from_millis(250)) {
                    None | Some(Err(RdError::PartitionEOF(_))) => {}
                    Some(Ok(m)) => {
                        if apply(&topic, &mut actions, m.offset(), m.key(), m.payload()) {
                            let gate = Gate::of(actions.get(&key));
                            tx.send_if_modified(|g| std::mem::replace(g, gate) != gate);
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(topic, error = %e, "reading the control topic");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        })
        .map_err(|e| StoreError::Refused(format!("starting the control follower: {e}")))?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_follow_the_newest_action() {
        assert_eq!(Gate::of(None), Gate::Open);
        assert_eq!(Gate::of(Some(&JobAction::Pause)), Gate::Paused);
        assert_eq!(Gate::of(Some(&JobAction::Resume)), Gate::Open);
        assert_eq!(Gate::of(Some(&JobAction::Cancel)), Gate::Cancelled);
    }
}
