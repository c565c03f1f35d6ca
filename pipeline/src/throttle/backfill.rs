//! The throttle adapter for backfill chunks read by capture: feeds the origin's health signals
//! ([`super::signals`]) into the AIMD controller ([`super::Aimd`]) once a second, paces chunk
//! reads with [`super::Pacer`], and runs the live-throughput probe's quiet periods.

use std::time::{Duration, Instant};

use crate::config::Config;

/// Throttles backfill chunks from the origin's health: the canary's p99 against its baseline,
/// the WAL the slot retains, the live lane's lag and the destination's acknowledgement time,
/// fed into the AIMD controller once a second (see `signals` for how they are read).
pub struct BackfillThrottle {
    /// The controller (its rate and limiting signal are reported with each chunk).
    pub aimd: crate::throttle::Aimd,
    pacer: crate::throttle::Pacer,
    last_limit: crate::throttle::Limit,
    probes: crate::throttle::signals::Probes,
    sampler: Option<crate::throttle::signals::Sampler>,
    warmup: u32,
    window: u32,
    max_bytes_per_sec: f64,
    /// The live-throughput probe (`None` when `live_harm_budget` is 0).
    live: Option<crate::throttle::LiveProbe>,
    /// A quiet period's verdict not yet fed to the controller.
    harm: Option<f64>,
    clock: Instant,
    /// When the next once-a-second control step is due.
    next_step: f64,
}

/// How often the throttle looks at the clock (quiet periods, waking a paced chunk); the
/// controller itself steps once a second.
pub const THROTTLE_TICK: Duration = Duration::from_millis(100);

/// The smallest chunk the throttle asks for (each chunk costs a few round trips and a
/// watermark commit).
const MIN_CHUNK_ROWS: usize = 100;

impl BackfillThrottle {
    /// A throttle with `backfill` settings, not measuring yet.
    pub fn new(cfg: &Config) -> Self {
        let b = &cfg.backfill;
        let budget = |v: f64| if v > 0.0 { v } else { f64::INFINITY };
        BackfillThrottle {
            aimd: crate::throttle::Aimd::new(crate::throttle::Settings {
                canary_baseline_ms: f64::INFINITY,
                canary_tolerance: b.canary_tolerance,
                canary_slack_ms: b.canary_slack_ms,
                live_harm_budget: budget(b.live_harm_budget),
                wal_budget_bytes: b.wal_budget_bytes,
                live_lag_budget: if b.live_lag_budget == 0 {
                    u64::MAX
                } else {
                    b.live_lag_budget
                },
                produce_latency_budget_ms: budget(b.produce_latency_budget_ms),
                floor: b.min_rows_per_sec,
                ceiling: b.max_rows_per_sec,
                increase: b.increase_rows_per_sec,
                decrease: b.decrease,
                max_events_per_sec: Some(b.max_rows_per_sec),
                max_bytes_per_sec: (b.max_bytes_per_sec > 0.0).then_some(b.max_bytes_per_sec),
                bytes_per_event: 0.0,
            }),
            pacer: crate::throttle::Pacer::default(),
            last_limit: crate::throttle::Limit::None,
            probes: crate::throttle::signals::Probes {
                canary: Some((cfg.origin.postgres.clone(), b.canary_sql.clone())),
                slot: Some(cfg.capture.slot.clone()),
                window: Duration::from_secs(b.canary_window_secs.max(1)),
                ..crate::throttle::signals::Probes::lanes(cfg)
            },
            sampler: None,
            warmup: 0,
            window: b.canary_window_secs.max(1) as u32,
            max_bytes_per_sec: b.max_bytes_per_sec,
            live: (b.live_harm_budget > 0.0).then(|| {
                crate::throttle::LiveProbe::new(
                    b.live_probe_every_secs,
                    b.live_probe_quiet_secs,
                    0.0,
                )
            }),
            harm: None,
            clock: Instant::now(),
            next_step: 0.0,
        }
    }

    fn now(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }

    /// Whether a backfill chunk may be read: the baseline is known, no quiet period is on and
    /// the pacer has room.
    pub fn allows(&mut self, rows: usize) -> bool {
        self.aimd.canary_baseline().is_some()
            && !self.live.as_ref().is_some_and(|l| l.is_quiet())
            && self.pacer.try_acquire(rows as f64, self.aimd.rate())
    }

    /// The most rows a backfill chunk should read at the current rate: half a second's worth
    /// (at least `MIN_CHUNK_ROWS`), so a slow backfill reads small chunks often rather than a
    /// big one now and then.
    pub fn chunk_rows(&self) -> usize {
        let half_second = (self.aimd.rate() / 2.0).min(usize::MAX as f64 / 2.0) as usize;
        half_second.max(MIN_CHUNK_ROWS)
    }

    /// Notes a live transaction's commit (only while a backfill is being throttled).
    pub fn live_commit(&mut self) {
        if self.sampler.is_some() {
            let now = self.now();
            if let Some(l) = self.live.as_mut() {
                l.record(now);
            }
        }
    }

    /// Called every `THROTTLE_TICK` while a backfill is queued: runs the quiet periods and,
    /// once a second or when a quiet period ends, a control step.
    pub fn tick(&mut self, bytes_per_event: f64) {
        if self.sampler.is_none() {
            self.sampler = Some(crate::throttle::signals::Sampler::start(
                self.probes.clone(),
            ));
            return;
        }
        let now = self.now();
        let mut step = false;
        if self.aimd.canary_baseline().is_some() {
            if let Some(harm) = self.live.as_mut().and_then(|l| l.poll(now)) {
                tracing::debug!(
                    harm = format!("{harm:.3}"),
                    rate = self.aimd.rate().round(),
                    "backfill quiet period measured"
                );
                self.harm = Some(harm);
                step = true;
            }
        }
        if now >= self.next_step {
            self.next_step = now + 1.0;
            step = true;
        }
        if step {
            self.step(bytes_per_event);
        }
    }

    /// One control step: read the signals, decide, log decisions that change the limiting
    /// signal. `bytes_per_event` (from what capture encoded so far) applies the byte cap.
    fn step(&mut self, bytes_per_event: f64) {
        let Some(sampler) = &self.sampler else {
            return;
        };
        let r = sampler.read();
        let Some(p99) = r.canary_p99_ms else {
            return;
        };
        // One window of samples, taken before any backfill chunk is read, sets the baseline;
        // the rate starts at the floor once it is known.
        if self.aimd.canary_baseline().is_none() {
            self.warmup += 1;
            if self.warmup > self.window {
                self.aimd.set_canary_baseline(p99.max(0.2));
                self.aimd.reset();
                let now = self.now();
                if let Some(l) = self.live.as_mut() {
                    l.restart(now);
                }
                tracing::info!(
                    canary_p99_ms = format!("{p99:.2}"),
                    samples = r.canary_samples,
                    "backfill throttle baseline measured"
                );
            }
            return;
        }
        if self.max_bytes_per_sec > 0.0 {
            self.aimd.set_bytes_per_event(bytes_per_event);
        }
        let now = self.now();
        let signals = crate::throttle::Signals {
            canary_p99_ms: p99,
            retained_wal_bytes: r.retained_wal_bytes.unwrap_or(0),
            live_lag_events: r.live_lag_events.unwrap_or(0),
            produce_latency_ms: r.produce_latency_ms.unwrap_or(0.0),
            live_harm: self.harm.take(),
            live_gated: self.live.as_ref().is_some_and(|l| l.loaded(now)),
        };
        let (rate, limit) = self.aimd.step(&signals);
        if limit != self.last_limit {
            tracing::info!(
                rate = rate.round(),
                limit = %limit,
                canary_p99_ms = format!("{p99:.2}"),
                baseline_ms = format!("{:.2}", self.aimd.canary_baseline().unwrap_or(f64::NAN)),
                retained_wal_bytes = signals.retained_wal_bytes,
                live_lag = signals.live_lag_events,
                produce_latency_ms = format!("{:.1}", signals.produce_latency_ms),
                live_harm = signals.live_harm.map(|h| format!("{h:.3}")),
                live_gated = signals.live_gated,
                "backfill throttle"
            );
            self.last_limit = limit;
        }
    }

    /// Stops measuring (no backfill left); the next job starts from the floor.
    pub fn idle(&mut self) {
        self.sampler = None;
        self.aimd.set_canary_baseline(f64::INFINITY);
        self.warmup = 0;
        self.harm = None;
        self.aimd.reset();
    }
}
