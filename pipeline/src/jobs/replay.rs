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

use ferry_connectors::kafka::{Cluster, Span, TopicPartition};
use ferry_schemas::manifest;
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::Config;
use crate::ship::{batch_partition, RangeShipper, ShipError};
use crate::store::state::{self, JobState};
use crate::throttle::Pacer;

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
    /// Rate cap, changes per second (the throttle's ceiling).
    pub max_events_per_sec: f64,
    /// Egress cap, bytes per second.
    pub max_bytes_per_sec: Option<f64>,
}

/// Per-partition progress of a replay job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Next origin offset to replay, per partition.
    pub next: BTreeMap<i32, i64>,
    /// Where each partition's replay ends (exclusive).
    pub end: BTreeMap<i32, i64>,
    /// The origin topic.
    #[serde(default)]
    pub topic: String,
    /// Offsets in the whole range, and done so far.
    #[serde(default)]
    pub total: i64,
    /// Running, paused, cancelled or done when last saved.
    #[serde(default)]
    pub status: JobState,
    /// The throttle's rate (changes/s) and the signal limiting it when last saved.
    #[serde(default)]
    pub rate: f64,
    /// See `rate`.
    #[serde(default)]
    pub limit: String,
}

impl Checkpoint {
    /// Offsets left to replay.
    pub fn remaining(&self) -> i64 {
        self.end
            .iter()
            .map(|(p, e)| e - self.next.get(p).copied().unwrap_or(*e))
            .sum()
    }
}

/// Where a running replay stands, for progress displays.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Offsets done and in all.
    pub done: i64,
    /// See `done`.
    pub total: i64,
    /// Changes per second so far.
    pub rate: f64,
    /// The throttle's rate now and what limits it.
    pub throttle: (f64, String),
    /// What just happened, in words.
    pub line: String,
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
    ShipError::Unexpected(e.to_string())
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
/// Only the ranges of the topic's incarnation the live lane ships from count: an older one's
/// offsets name other records.
async fn shipped_ranges(
    cfg: &Config,
    shipper: &RangeShipper<'_>,
    topic: &str,
    p: i32,
) -> Result<Vec<(i64, i64)>, ShipError> {
    let dest = Cluster::new("destination", cfg.destination.kafka.clone());
    let origin = TopicPartition::new(topic, p);
    let incarnation = shipper.incarnation(&origin).await?;
    let batches = TopicPartition::new(
        cfg.batch_topic(),
        batch_partition(topic, p, shipper.batch_partitions()),
    );
    // One record at a time: the partition holds every batch shipped within its retention.
    let (mut out, _) = dest
        .fold_partition(&batches, Span::ALL, Vec::new(), move |out, r| {
            if let Some(Ok((m, _))) = r.value.as_deref().map(manifest::unframe) {
                if m.covers_changes_of(&origin.topic, origin.partition)
                    && crate::ship::incarnation_of(&m.batch_id) == incarnation
                {
                    out.push((m.first_offset, m.last_offset));
                }
            }
            true
        })
        .await?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// The ranges to ship for `[from, to)`: existing batch ranges where they start at the cursor,
/// fresh ranges of at most `max` changes elsewhere. Shipped ranges are never cut: `from` and
/// `to` inside one widen to take it whole (the same id, so the destination skips it rather than
/// taking part of it again under a new one).
pub fn plan(from: i64, to: i64, shipped: &[(i64, i64)], max: i64) -> Vec<((i64, i64), bool)> {
    if from >= to {
        return Vec::new();
    }
    let inside = |o: i64| shipped.iter().find(|(a, b)| *a < o && o <= *b).copied();
    let from = inside(from).map_or(from, |(a, _)| a);
    let to = inside(to).map_or(to, |(_, b)| b + 1);
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

/// The replay lane's throttle: AIMD on the live lane's lag (replay yields at half the lag a
/// backfill tolerates) and the destination's acknowledgement time, under the job's cap.
fn throttle(
    cfg: &Config,
    spec: &Spec,
) -> (crate::throttle::Aimd, crate::throttle::signals::Sampler) {
    let b = &cfg.backfill;
    let ceiling = spec.max_events_per_sec.max(1.0);
    let aimd = crate::throttle::Aimd::new(crate::throttle::Settings {
        canary_baseline_ms: f64::INFINITY,
        canary_tolerance: 1.0,
        canary_slack_ms: 0.0,
        live_harm_budget: f64::INFINITY,
        wal_budget_bytes: u64::MAX,
        live_lag_budget: if b.live_lag_budget == 0 {
            u64::MAX
        } else {
            (b.live_lag_budget / 2).max(1)
        },
        produce_latency_budget_ms: if b.produce_latency_budget_ms > 0.0 {
            b.produce_latency_budget_ms
        } else {
            f64::INFINITY
        },
        floor: b.min_rows_per_sec.min(ceiling),
        ceiling,
        increase: b.increase_rows_per_sec,
        decrease: b.decrease,
        max_events_per_sec: Some(ceiling),
        max_bytes_per_sec: spec.max_bytes_per_sec,
        bytes_per_event: 0.0,
    });
    let sampler =
        crate::throttle::signals::Sampler::start(crate::throttle::signals::Probes::lanes(cfg));
    (aimd, sampler)
}

/// Runs a replay job to its end (or until `stop` or a cancel), reporting through `progress`.
/// A pause (`ferry pause <job>`) holds it between ranges, consuming nothing, across restarts.
pub async fn run(
    cfg: &Config,
    spec: &Spec,
    stop: watch::Receiver<bool>,
    mut progress: impl FnMut(&Progress),
) -> Result<Report, ShipError> {
    let origin = Cluster::new("origin", cfg.origin.kafka.clone());
    let state_topic = crate::topics::state_topic(&cfg.capture.topic_prefix);
    let key = crate::store::control::job_key(&spec.job);
    let saver = origin.producer(5)?;
    let partitions: Vec<i32> = match spec.partition {
        Some(p) => vec![p],
        None => (0..origin
            .partition_count(&spec.topic, Duration::from_secs(10))?
            .max(0))
            .collect(),
    };
    if partitions.is_empty() {
        return Err(ShipError::Permanent(format!(
            "topic {} does not exist in the origin",
            spec.topic
        )));
    }
    let mut cp: Checkpoint = state::load_value(&origin, &state_topic, &key)
        .await?
        .unwrap_or_default();
    let mut shipper = RangeShipper::new(cfg)?;
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
        // What the live lane has not shipped yet is its to ship: a replay ahead of it would put
        // newer changes in front of older ones in the replicated topics, and cut ranges the live
        // lane cuts too.
        let live = shipper
            .live_end(&TopicPartition::new(&spec.topic, p))
            .await?;
        let end = if end > live {
            tracing::info!(
                topic = spec.topic,
                partition = p,
                to = end,
                live,
                "the replay ends where live shipping is: the rest is the live lane's to ship"
            );
            live.max(start)
        } else {
            end
        };
        cp.next.insert(p, start);
        cp.end.insert(p, end);
    }
    cp.topic = spec.topic.clone();
    if cp.total == 0 {
        cp.total = cp.remaining();
    }
    cp.status = JobState::Running;
    // Registered before anything is shipped, so `ferry jobs` and `ferry pause` know the job.
    state::save_value(&saver, &state_topic, &key, &cp)
        .await
        .map_err(other)?;
    let mut gate = crate::store::control::follow(cfg, key.clone())
        .await
        .map_err(|e| ShipError::Unavailable(e.to_string()))?;
    let total = cp.total.max(1);
    let (mut aimd, sampler) = throttle(cfg, spec);
    let mut last_tick = Instant::now();
    let mut pacer = Pacer::default();
    let mut report = Report::default();
    let started = Instant::now();
    let mut shipped_bytes = 0u64;
    for &p in &partitions {
        let shipped = shipped_ranges(cfg, &shipper, &spec.topic, p).await?;
        let steps = plan(
            cp.next[&p],
            cp.end[&p],
            &shipped,
            cfg.ship.max_events as i64,
        );
        for ((first, last), reused) in steps {
            // The operator's switch: a pause holds here (nothing read), a cancel ends the job.
            loop {
                let g = *gate.borrow_and_update();
                match g {
                    crate::store::control::Gate::Open => break,
                    crate::store::control::Gate::Cancelled => {
                        cp.status = JobState::Cancelled;
                        state::save_value(&saver, &state_topic, &key, &cp)
                            .await
                            .map_err(other)?;
                        progress(&Progress {
                            line: "cancelled".into(),
                            ..Progress::default()
                        });
                        return Ok(report);
                    }
                    crate::store::control::Gate::Paused => {
                        if cp.status != JobState::Paused {
                            cp.status = JobState::Paused;
                            state::save_value(&saver, &state_topic, &key, &cp)
                                .await
                                .map_err(other)?;
                            progress(&Progress {
                                line: format!("paused (`ferry resume {}` resumes)", spec.job),
                                ..Progress::default()
                            });
                        }
                        let mut s = stop.clone();
                        tokio::select! {
                            _ = gate.changed() => {}
                            _ = s.changed() => {}
                        }
                        if *stop.borrow() {
                            return Ok(report);
                        }
                    }
                }
            }
            if cp.status != JobState::Running {
                cp.status = JobState::Running;
            }
            if *stop.borrow() {
                progress(&Progress {
                    line: "stopped; run the same command again to resume".into(),
                    ..Progress::default()
                });
                return Ok(report);
            }
            if last_tick.elapsed() >= Duration::from_secs(1) {
                last_tick = Instant::now();
                if report.events > 0 {
                    aimd.set_bytes_per_event(shipped_bytes as f64 / report.events as f64);
                }
                let r = sampler.read();
                aimd.step(&crate::throttle::Signals {
                    canary_p99_ms: 0.0,
                    retained_wal_bytes: 0,
                    live_lag_events: r.live_lag_events.unwrap_or(0),
                    produce_latency_ms: r.produce_latency_ms.unwrap_or(0.0),
                    ..crate::throttle::Signals::default()
                });
            }
            pacer.acquire((last - first + 1) as f64, aimd.rate()).await;
            let (events, _, bytes) = shipper.ship_range(&spec.topic, p, first, last).await?;
            shipped_bytes += bytes;
            crate::runtime::failpoint::hit(crate::runtime::failpoint::REPLAY_BEFORE_CHECKPOINT);
            cp.next.insert(p, last + 1);
            cp.rate = aimd.rate().round();
            cp.limit = aimd.limit().to_string();
            let remaining = cp.remaining();
            if remaining == 0 {
                cp.status = JobState::Done;
            }
            state::save_value(&saver, &state_topic, &key, &cp)
                .await
                .map_err(other)?;
            report.batches += 1;
            report.reused_ids += u64::from(reused);
            report.events += events;
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            progress(&Progress {
                done: total - remaining,
                total,
                rate: report.events as f64 / secs,
                throttle: (aimd.rate(), aimd.limit().to_string()),
                line: format!(
                    "partition {p} offsets {first}-{last} shipped ({} id)",
                    if reused { "same" } else { "new" }
                ),
            });
        }
    }
    if cp.status != JobState::Done {
        cp.status = JobState::Done;
        state::save_value(&saver, &state_topic, &key, &cp)
            .await
            .map_err(other)?;
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
        // Starting or ending inside a shipped range takes it whole.
        assert_eq!(
            plan(120, 160, &shipped, 1000),
            vec![((100, 149), true), ((150, 159), false)]
        );
        assert_eq!(
            plan(160, 350, &shipped, 1000),
            vec![((160, 299), false), ((300, 399), true)]
        );
        assert_eq!(plan(5, 6, &shipped, 10), vec![((0, 99), true)]);
        assert!(plan(5, 5, &shipped, 10).is_empty());
        assert!(plan(0, 0, &shipped, 10).is_empty());
    }
}
