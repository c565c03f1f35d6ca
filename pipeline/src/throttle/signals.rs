//! Readings of the throttle's signals, each taken on a thread of its own with its own runtime.
//!
//! A latency measured from inside the capture process's runtime is that runtime's scheduling
//! as much as the database's: on a loaded 2-core host, waking a task took 70–130 ms while the
//! database answered in 1 ms. So the canary runs on a dedicated thread that does nothing else,
//! and the Kafka readings (blocking calls) on another.
//!
//! ```text
//!  ferry-canary   canary query 20×/s → per-second hdrhistograms → p99 over the window
//!                 slot's retained WAL, once a second
//!  ferry-signals  shipper group's lag (committed vs end offsets), once a second
//!                 a probe record to the destination, acknowledgement time, once a second
//! ```
//!
//! A signal that cannot be read is `None` and never counts as healthy or unhealthy by itself;
//! a canary query that fails counts with the time it took to fail.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_connectors::kafka::{Cluster, TopicSpec};
use ferry_connectors::postgres::{catalog, PgConfig};
use hdrhistogram::Histogram;

/// What to measure; each part is optional.
#[derive(Clone, Debug, Default)]
pub struct Probes {
    /// The canary query and the database it runs on.
    pub canary: Option<(PgConfig, String)>,
    /// The replication slot whose retained WAL is read (on the canary's database).
    pub slot: Option<String>,
    /// The live lane: the origin cluster, topic prefix and shipper group whose lag is read.
    pub live_lag: Option<(Cluster, String, String)>,
    /// The destination cluster and the topic probe records go to.
    pub produce: Option<(Cluster, String)>,
    /// The canary's sliding window.
    pub window: Duration,
}

impl Probes {
    /// The lane signals every throttled job reads: the live shipper group's lag and the
    /// destination's acknowledgement time, each unless its budget is 0 (off).
    pub fn lanes(cfg: &crate::config::Config) -> Probes {
        let b = &cfg.backfill;
        let prefix = &cfg.capture.topic_prefix;
        Probes {
            live_lag: (b.live_lag_budget > 0).then(|| {
                (
                    Cluster::new("origin", cfg.origin.kafka.clone()),
                    prefix.clone(),
                    cfg.ship.group_id.clone(),
                )
            }),
            produce: (b.produce_latency_budget_ms > 0.0).then(|| {
                (
                    Cluster::new("destination", cfg.destination.kafka.clone()),
                    format!("{prefix}._probe"),
                )
            }),
            ..Probes::default()
        }
    }
}

/// The newest readings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Readings {
    /// Canary p99 over the window, ms.
    pub canary_p99_ms: Option<f64>,
    /// Canary samples in the window.
    pub canary_samples: u64,
    /// WAL the slot retains, bytes.
    pub retained_wal_bytes: Option<u64>,
    /// Live changes in the origin topics not yet shipped.
    pub live_lag_events: Option<u64>,
    /// Time the destination took to acknowledge the last probe, ms.
    pub produce_latency_ms: Option<f64>,
}

/// Runs the probes until dropped.
pub struct Sampler {
    readings: Arc<Mutex<Readings>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

const CANARY_EVERY: Duration = Duration::from_millis(50);

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::error!(error = %e, "cannot start a signal thread's runtime; the throttle runs without it");
            None
        }
    }
}

impl Sampler {
    /// Starts the threads.
    pub fn start(probes: Probes) -> Sampler {
        let readings = Arc::new(Mutex::new(Readings::default()));
        let stop = Arc::new(AtomicBool::new(false));
        if let Some((pg, sql)) = probes.canary.clone() {
            let (r, s, slot, window) = (
                readings.clone(),
                stop.clone(),
                probes.slot.clone(),
                probes.window,
            );
            let _ = std::thread::Builder::new()
                .name("ferry-canary".into())
                .spawn(move || {
                    if let Some(rt) = runtime() {
                        rt.block_on(canary(pg, sql, slot, window, r, s));
                    }
                });
        }
        if probes.live_lag.is_some() || probes.produce.is_some() {
            let (r, s) = (readings.clone(), stop.clone());
            let _ = std::thread::Builder::new()
                .name("ferry-signals".into())
                .spawn(move || {
                    if let Some(rt) = runtime() {
                        rt.block_on(kafka_signals(probes.live_lag, probes.produce, r, s));
                    }
                });
        }
        Sampler { readings, stop }
    }

    /// The newest readings.
    pub fn read(&self) -> Readings {
        self.readings.lock().map(|r| *r).unwrap_or_default()
    }
}

/// p99 in ms over a ring of per-second histograms (microseconds).
fn p99(ring: &VecDeque<Histogram<u64>>) -> Option<(f64, u64)> {
    let mut all = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2).ok()?;
    for h in ring {
        all.add(h).ok()?;
    }
    (!all.is_empty()).then(|| (all.value_at_quantile(0.99) as f64 / 1000.0, all.len()))
}

async fn canary(
    pg: PgConfig,
    sql: String,
    slot: Option<String>,
    window: Duration,
    readings: Arc<Mutex<Readings>>,
    stop: Arc<AtomicBool>,
) {
    let Ok(fresh) = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2) else {
        return;
    };
    let seconds = window.as_secs().max(1) as usize;
    let mut ring: VecDeque<Histogram<u64>> = VecDeque::from([fresh.clone()]);
    let mut second = Instant::now();
    let mut session = None;
    let mut tick = tokio::time::interval(CANARY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        if session
            .as_ref()
            .is_none_or(|s: &ferry_connectors::postgres::Session| s.is_closed())
        {
            match pg.connect().await {
                Ok(s) => session = Some(s),
                Err(e) => {
                    tracing::warn!(target = pg.display(), error = %e, "canary cannot connect");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let Some(s) = session.as_ref() else { continue };
        let t0 = Instant::now();
        if let Err(e) = s.simple_query(&sql).await {
            tracing::warn!(error = %e, "canary query failed");
        }
        let us = t0.elapsed().as_micros().clamp(1, 600_000_000) as u64;
        if let Some(h) = ring.back_mut() {
            let _ = h.record(us);
        }
        if second.elapsed() >= Duration::from_secs(1) {
            second = Instant::now();
            let retained = match &slot {
                Some(name) => catalog::slot(s, name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|x| x.retained_bytes)
                    .map(|b| b.max(0) as u64),
                None => None,
            };
            let p = p99(&ring);
            if let Some(h) = ring.back() {
                tracing::debug!(
                    n = h.len(),
                    p50_ms = h.value_at_quantile(0.5) as f64 / 1000.0,
                    p90_ms = h.value_at_quantile(0.9) as f64 / 1000.0,
                    p99_ms = h.value_at_quantile(0.99) as f64 / 1000.0,
                    max_ms = h.max() as f64 / 1000.0,
                    "canary second"
                );
            }
            if let Ok(mut r) = readings.lock() {
                r.canary_p99_ms = p.map(|x| x.0);
                r.canary_samples = p.map_or(0, |x| x.1);
                r.retained_wal_bytes = retained;
            }
            ring.push_back(fresh.clone());
            while ring.len() > seconds {
                ring.pop_front();
            }
        }
    }
}

async fn kafka_signals(
    live_lag: Option<(Cluster, String, String)>,
    produce: Option<(Cluster, String)>,
    readings: Arc<Mutex<Readings>>,
    stop: Arc<AtomicBool>,
) {
    let lag_reader = live_lag.as_ref().and_then(|(origin, _, group)| {
        ferry_connectors::kafka::LagReader::new(origin, group)
            .map_err(|e| tracing::warn!(error = %e, "live lag cannot be read"))
            .ok()
    });
    let mut probe = None;
    if let Some((dest, topic)) = &produce {
        let spec = TopicSpec {
            name: topic.clone(),
            partitions: 1,
            config: crate::topics::compacted_settings(),
        };
        match dest.ensure_topics(&[spec]).await {
            Ok(()) => match dest.producer(0) {
                Ok(p) => probe = Some((p, topic.clone())),
                Err(e) => tracing::warn!(error = %e, "produce latency cannot be read"),
            },
            Err(e) => tracing::warn!(error = %e, "produce latency cannot be read"),
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let lag = match (&lag_reader, &live_lag) {
            (Some(reader), Some((_, prefix, _))) => {
                match reader.read(|t| crate::topics::is_table_topic(prefix, t)) {
                    Ok(rows) => Some(
                        rows.iter()
                            .filter(|l| l.claimed)
                            .map(|l| l.lag() as u64)
                            .sum::<u64>(),
                    ),
                    Err(e) => {
                        tracing::debug!(error = %e, "reading live lag");
                        None
                    }
                }
            }
            _ => None,
        };
        let produce_ms = match &probe {
            Some((producer, topic)) => {
                let t0 = Instant::now();
                let body = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
                    .to_string();
                let sent = producer
                    .send(
                        rdkafka::producer::FutureRecord::to(topic)
                            .key("throttle-probe")
                            .payload(&body),
                        Duration::from_secs(10),
                    )
                    .await;
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                Some(if sent.is_ok() { ms } else { ms.max(10_000.0) })
            }
            None => None,
        };
        if let Ok(mut r) = readings.lock() {
            r.live_lag_events = lag;
            r.produce_latency_ms = produce_ms;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_spans_the_window() {
        let mut ring = VecDeque::new();
        for s in 0..5u64 {
            let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2).expect("hist");
            for i in 0..100u64 {
                // One slow sample per second: 1% of the window.
                h.record(if i == 0 { 50_000 } else { 1_000 + s })
                    .expect("record");
            }
            ring.push_back(h);
        }
        let (p, n) = p99(&ring).expect("p99");
        assert_eq!(n, 500);
        assert!((0.99..=1.02).contains(&p), "{p}");
        ring.back_mut()
            .expect("last")
            .record_n(80_000, 20)
            .expect("record");
        let (p, _) = p99(&ring).expect("p99");
        assert!(p >= 49.0, "{p}");
    }
}
