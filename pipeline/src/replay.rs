//! `ferry replay`: re-ships a historical origin range to the destination, at a throttled rate,
//! resumable, with the same batch ids as before wherever the range was shipped already.
//!
//! ```text
//!  plan (per partition): manifests already in the destination → reuse their ranges (same ids);
//!                        gaps → cut at ship.max_events
//!  run:  pacer (rate cap) → read origin range → compact/encode/manifest → produce → checkpoint
//! ```
//!
//! Progress: a partition's checkpoint (`job/<name>` in `<prefix>._state`) moves past a range
//! only after the destination acknowledged its batch, so a replay killed at any point resumes
//! where it stopped; at worst the last range is shipped twice under the same id, which the
//! destination's dedupe ignores. A replay of already-applied data is a no-op at the
//! destination for the same reason.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_connectors::kafka::Cluster;
use ferry_schemas::manifest;
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::Config;
use crate::ship::{batch_partition, RangeShipper, ShipError};
use crate::throttle::Pacer;
use crate::{inspect, sink, state};

/// Where a replay starts or ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// An origin offset.
    Offset(i64),
    /// A time, in milliseconds since the Unix epoch (resolved with offsets-for-times).
    TimeMs(i64),
}

/// What to replay.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Origin topic.
    pub topic: String,
    /// One partition, or all.
    pub partition: Option<i32>,
    /// Start (inclusive).
    pub from: Bound,
    /// End (exclusive); `None` means the current end of each partition.
    pub to: Option<Bound>,
    /// Job name (checkpoints are kept under it).
    pub job: String,
    /// Rate cap, changes per second.
    pub max_events_per_sec: f64,
}

/// Per-partition progress of a replay job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Next origin offset to replay, per partition.
    pub next: BTreeMap<i32, i64>,
    /// Where each partition's replay ends (exclusive).
    pub end: BTreeMap<i32, i64>,
}

/// What a replay did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Batches produced.
    pub batches: u64,
    /// Of which under an id the destination had seen before.
    pub reused_ids: u64,
    /// Changes read.
    pub events: u64,
}

fn other(e: impl std::fmt::Display) -> ShipError {
    ShipError::Other(e.to_string())
}

fn resolve(origin: &Cluster, topic: &str, p: i32, b: Bound) -> Result<i64, ShipError> {
    let reader = origin.reader()?;
    let (low, high) = reader
        .fetch_watermarks(topic, p, Duration::from_secs(10))
        .map_err(other)?;
    Ok(match b {
        Bound::Offset(o) => o.clamp(low, high),
        Bound::TimeMs(ms) => {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, p, Offset::Offset(ms))
                .map_err(other)?;
            let found = reader
                .offsets_for_times(tpl, Duration::from_secs(10))
                .map_err(other)?;
            match found.elements().first().map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o.clamp(low, high),
                _ => high,
            }
        }
    })
}

/// Ranges already shipped for `topic[p]`, from the manifests in the destination.
fn shipped_ranges(cfg: &Config, topic: &str, p: i32) -> Result<Vec<(i64, i64)>, ShipError> {
    let dest = Cluster::new("destination", cfg.destination.kafka.clone());
    let d = batch_partition(topic, p, cfg.ship.batch_partitions);
    let mut out: Vec<(i64, i64)> = inspect::read_all(&dest, &cfg.batch_topic(), usize::MAX)
        .map_err(other)?
        .into_iter()
        .filter(|(part, _, _, _)| *part == d)
        .filter_map(|(_, _, _, v)| manifest::unframe(&v?).ok().map(|(m, _)| m))
        .filter(|m| m.kind == "changes" && m.origin_topic == topic && m.origin_partition == p)
        .map(|m| (m.first_offset, m.last_offset))
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// The ranges to ship for `[from, to)`: existing batch ranges where they start at the cursor,
/// fresh ranges of at most `max` changes elsewhere.
pub fn plan(from: i64, to: i64, shipped: &[(i64, i64)], max: i64) -> Vec<((i64, i64), bool)> {
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        if let Some(&(a, b)) = shipped.iter().find(|(a, b)| *a == at && *b < to) {
            out.push(((a, b), true));
            at = b + 1;
            continue;
        }
        let next_start = shipped
            .iter()
            .map(|(a, _)| *a)
            .filter(|a| *a > at)
            .min()
            .unwrap_or(i64::MAX);
        let last = (at + max - 1).min(to - 1).min(next_start - 1);
        out.push(((at, last), false));
        at = last + 1;
    }
    out
}

/// Runs a replay job to its end (or until `stop`), printing progress through `progress`.
pub async fn run(
    cfg: &Config,
    spec: &Spec,
    stop: watch::Receiver<bool>,
    mut progress: impl FnMut(&str),
) -> Result<Report, ShipError> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let state_topic = sink::state_topic(&cfg.capture.topic_prefix);
    let key = format!("job/{}", spec.job);
    let saver = origin.producer(5)?;
    let partitions: Vec<i32> = match spec.partition {
        Some(p) => vec![p],
        None => (0..origin
            .partition_count(&spec.topic, Duration::from_secs(10))?
            .max(0))
            .collect(),
    };
    if partitions.is_empty() {
        return Err(ShipError::Other(format!(
            "topic {} does not exist in the origin",
            spec.topic
        )));
    }
    let (o, t, k) = (origin.clone(), state_topic.clone(), key.clone());
    let mut cp: Checkpoint = tokio::task::spawn_blocking(move || state::load_value(&o, &t, &k))
        .await
        .map_err(other)?
        .map_err(other)?
        .unwrap_or_default();
    for &p in &partitions {
        if cp.next.contains_key(&p) {
            continue; // resuming
        }
        let (o, t) = (origin.clone(), spec.topic.clone());
        let (from, to) = (spec.from, spec.to);
        let (start, end) = tokio::task::spawn_blocking(move || -> Result<(i64, i64), ShipError> {
            let start = resolve(&o, &t, p, from)?;
            let end = match to {
                Some(b) => resolve(&o, &t, p, b)?,
                None => resolve(&o, &t, p, Bound::Offset(i64::MAX))?,
            };
            Ok((start, end))
        })
        .await
        .map_err(other)??;
        cp.next.insert(p, start);
        cp.end.insert(p, end);
    }
    let total: i64 = partitions
        .iter()
        .map(|p| cp.end[p] - cp.next[p])
        .sum::<i64>()
        .max(1);
    let mut shipper = RangeShipper::new(cfg)?;
    let mut pacer = Pacer::default();
    let mut report = Report::default();
    let started = Instant::now();
    for &p in &partitions {
        let (cfg2, topic) = (cfg.clone(), spec.topic.clone());
        let shipped = tokio::task::spawn_blocking(move || shipped_ranges(&cfg2, &topic, p))
            .await
            .map_err(other)??;
        let steps = plan(
            cp.next[&p],
            cp.end[&p],
            &shipped,
            cfg.ship.max_events as i64,
        );
        for ((first, last), reused) in steps {
            if *stop.borrow() {
                progress("stopped; run the same command again to resume");
                return Ok(report);
            }
            pacer
                .acquire((last - first + 1) as f64, spec.max_events_per_sec)
                .await;
            let (events, _) = shipper.ship_range(&spec.topic, p, first, last).await?;
            crate::ship::failpoint("replay.before_checkpoint");
            cp.next.insert(p, last + 1);
            state::save_value(&saver, &state_topic, &key, &cp)
                .await
                .map_err(other)?;
            report.batches += 1;
            report.reused_ids += u64::from(reused);
            report.events += events;
            let done = report.events as f64;
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            let remaining: i64 = partitions.iter().map(|q| cp.end[q] - cp.next[q]).sum();
            progress(&format!(
                "[{:>5.1}%] partition {p} offsets {first}-{last} shipped ({} id) · {:.0} changes/s · ETA {:.0} s",
                100.0 * (1.0 - remaining as f64 / total as f64),
                if reused { "same" } else { "new" },
                done / secs,
                remaining as f64 / (done / secs).max(1.0)
            ));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_reuse_existing_ranges_and_fill_gaps() {
        let shipped = [(0, 99), (100, 149), (300, 399)];
        assert_eq!(
            plan(0, 420, &shipped, 120),
            vec![
                ((0, 99), true),
                ((100, 149), true),
                ((150, 269), false),
                ((270, 299), false),
                ((300, 399), true),
                ((400, 419), false),
            ]
        );
        // Starting inside a shipped range cuts a fresh one up to the next.
        assert_eq!(plan(120, 160, &shipped, 1000), vec![((120, 159), false)]);
        assert!(plan(5, 5, &shipped, 10).is_empty());
    }
}
