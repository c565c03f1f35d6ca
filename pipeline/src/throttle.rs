//! The adaptive throttle for backfill and replay: additive increase while every signal is
//! healthy, multiplicative decrease when any is not, within a floor and a ceiling and under hard
//! caps.
//!
//! Signals, each compared with its budget:
//! 1. the p99 latency of a canary query on the origin, over a sliding window, against a
//!    baseline measured before the job started (times a tolerance);
//! 2. WAL retained by the origin's replication slot;
//! 3. live shipping lag (the live lane always wins);
//! 4. destination produce latency.
//!
//! A decision names the signal that limits the rate, so an operator sees at a glance why a job
//! is slow. The controller is pure: the caller feeds it signals on its own clock (every second
//! in production, simulated time in tests).

use std::fmt;

/// What can hold a job back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Nothing: the rate grows.
    None,
    /// The canary query's p99 latency is over its budget.
    CanaryLatency,
    /// The slot retains more WAL than its budget.
    RetainedWal,
    /// Live shipping is lagging.
    LiveLag,
    /// The destination is slow to acknowledge.
    ProduceLatency,
    /// The rate sits at the ceiling (or a hard cap).
    Ceiling,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::None => "none",
            Limit::CanaryLatency => "canary_latency",
            Limit::RetainedWal => "retained_wal",
            Limit::LiveLag => "live_lag",
            Limit::ProduceLatency => "produce_latency",
            Limit::Ceiling => "ceiling",
        })
    }
}

/// One reading of every signal.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Signals {
    /// Canary p99 over the window, in ms.
    pub canary_p99_ms: f64,
    /// Bytes of WAL the slot retains.
    pub retained_wal_bytes: u64,
    /// Live changes not yet shipped.
    pub live_lag_events: u64,
    /// Destination produce latency (p99), in ms.
    pub produce_latency_ms: f64,
}

/// Budgets and shape of the control loop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Canary p99 measured before the job started, in ms.
    pub canary_baseline_ms: f64,
    /// How far above the baseline the canary may go (1.25 = 25%).
    pub canary_tolerance: f64,
    /// Retained WAL budget, in bytes.
    pub wal_budget_bytes: u64,
    /// Live lag budget, in changes.
    pub live_lag_budget: u64,
    /// Produce latency budget, in ms.
    pub produce_latency_budget_ms: f64,
    /// The lowest rate (rows or events per second) the job is ever cut to.
    pub floor: f64,
    /// The highest rate the controller allows.
    pub ceiling: f64,
    /// Additive increase per healthy tick.
    pub increase: f64,
    /// Multiplicative decrease on an unhealthy tick (0.5 halves the rate).
    pub decrease: f64,
    /// Hard cap on events per second (whatever the signals say).
    pub max_events_per_sec: Option<f64>,
    /// Hard cap on egress bytes per second.
    pub max_bytes_per_sec: Option<f64>,
    /// Average bytes per event, to apply the byte cap.
    pub bytes_per_event: f64,
}

/// The controller.
#[derive(Clone, Debug)]
pub struct Aimd {
    settings: Settings,
    rate: f64,
    limit: Limit,
}

impl Aimd {
    /// A controller starting at the floor.
    pub fn new(settings: Settings) -> Aimd {
        Aimd {
            rate: settings.floor,
            settings,
            limit: Limit::None,
        }
    }

    /// Sets the canary baseline once it has been measured.
    pub fn set_canary_baseline(&mut self, ms: f64) {
        self.settings.canary_baseline_ms = ms;
    }

    /// Sets the average bytes per event the byte cap divides by.
    pub fn set_bytes_per_event(&mut self, bytes: f64) {
        self.settings.bytes_per_event = bytes;
    }

    /// The current rate (per second).
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// What limits the rate now.
    pub fn limit(&self) -> Limit {
        self.limit
    }

    fn cap(&self) -> f64 {
        let s = &self.settings;
        let mut cap = s.ceiling;
        if let Some(e) = s.max_events_per_sec {
            cap = cap.min(e);
        }
        if let (Some(b), true) = (s.max_bytes_per_sec, s.bytes_per_event > 0.0) {
            cap = cap.min(b / s.bytes_per_event);
        }
        cap.max(s.floor)
    }

    /// The first unhealthy signal, in priority order.
    pub fn unhealthy(&self, x: &Signals) -> Limit {
        let s = &self.settings;
        if x.live_lag_events > s.live_lag_budget {
            Limit::LiveLag
        } else if x.canary_p99_ms > s.canary_baseline_ms * s.canary_tolerance {
            Limit::CanaryLatency
        } else if x.retained_wal_bytes > s.wal_budget_bytes {
            Limit::RetainedWal
        } else if x.produce_latency_ms > s.produce_latency_budget_ms {
            Limit::ProduceLatency
        } else {
            Limit::None
        }
    }

    /// One control step: returns the new rate and what limits it.
    pub fn step(&mut self, x: &Signals) -> (f64, Limit) {
        let cap = self.cap();
        let bad = self.unhealthy(x);
        if bad == Limit::None {
            self.rate = (self.rate + self.settings.increase).min(cap);
            self.limit = if self.rate >= cap {
                Limit::Ceiling
            } else {
                Limit::None
            };
        } else {
            self.rate = (self.rate * self.settings.decrease).max(self.settings.floor);
            self.limit = bad;
        }
        (self.rate, self.limit)
    }
}

/// Paces work at a rate that may change: `acquire(n)` waits until `n` more units fit.
#[derive(Debug)]
pub struct Pacer {
    allowance: f64,
    last: tokio::time::Instant,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            allowance: 0.0,
            last: tokio::time::Instant::now(),
        }
    }
}

impl Pacer {
    /// Adds what `rate` earned since the last call (the bucket holds one second, or `n`).
    fn refill(&mut self, n: f64, rate: f64) {
        let now = tokio::time::Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.allowance = (self.allowance + elapsed * rate).min(rate.max(n));
    }

    /// Takes `n` units if they fit at `rate` now, without waiting.
    pub fn try_acquire(&mut self, n: f64, rate: f64) -> bool {
        let rate = rate.max(1e-3);
        self.refill(n, rate);
        if self.allowance >= n {
            self.allowance -= n;
            true
        } else {
            false
        }
    }

    /// Waits until `n` units may go at `rate` per second (a token bucket holding one second).
    pub async fn acquire(&mut self, n: f64, rate: f64) {
        let rate = rate.max(1e-3);
        loop {
            self.refill(n, rate);
            if self.allowance >= n {
                self.allowance -= n;
                return;
            }
            let wait = (n - self.allowance) / rate;
            tokio::time::sleep(std::time::Duration::from_secs_f64(wait)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings() -> Settings {
        Settings {
            canary_baseline_ms: 2.0,
            canary_tolerance: 1.25,
            wal_budget_bytes: 1 << 30,
            live_lag_budget: 10_000,
            produce_latency_budget_ms: 500.0,
            floor: 100.0,
            ceiling: 5_000.0,
            increase: 500.0,
            decrease: 0.5,
            max_events_per_sec: None,
            max_bytes_per_sec: None,
            bytes_per_event: 100.0,
        }
    }

    fn healthy() -> Signals {
        Signals {
            canary_p99_ms: 2.0,
            retained_wal_bytes: 1 << 20,
            live_lag_events: 0,
            produce_latency_ms: 20.0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn grows_additively_to_the_ceiling_and_stays() {
        let mut c = Aimd::new(settings());
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut rates = Vec::new();
        for _ in 0..14 {
            tick.tick().await;
            rates.push(c.step(&healthy()).0);
        }
        assert_eq!(&rates[..3], &[600.0, 1_100.0, 1_600.0]);
        assert_eq!(*rates.last().expect("rates"), 5_000.0);
        assert_eq!(c.limit(), Limit::Ceiling);
    }

    #[tokio::test(start_paused = true)]
    async fn every_signal_cuts_multiplicatively_and_is_named() {
        let cases = [
            (
                Signals {
                    canary_p99_ms: 9.0,
                    ..healthy()
                },
                Limit::CanaryLatency,
            ),
            (
                Signals {
                    retained_wal_bytes: 2 << 30,
                    ..healthy()
                },
                Limit::RetainedWal,
            ),
            (
                Signals {
                    live_lag_events: 50_000,
                    ..healthy()
                },
                Limit::LiveLag,
            ),
            (
                Signals {
                    produce_latency_ms: 900.0,
                    ..healthy()
                },
                Limit::ProduceLatency,
            ),
        ];
        for (signals, limit) in cases {
            let mut c = Aimd::new(settings());
            for _ in 0..8 {
                c.step(&healthy());
            }
            let before = c.rate();
            tokio::time::advance(Duration::from_secs(1)).await;
            let (after, why) = c.step(&signals);
            assert_eq!(after, before * 0.5, "{limit}");
            assert_eq!(why, limit);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn never_below_the_floor_and_recovers() {
        let mut c = Aimd::new(settings());
        let bad = Signals {
            canary_p99_ms: 50.0,
            ..healthy()
        };
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(1)).await;
            c.step(&bad);
        }
        assert_eq!(c.rate(), 100.0, "floor");
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(1)).await;
            c.step(&healthy());
        }
        assert_eq!(c.rate(), 1_600.0, "recovery is additive from the floor");
        assert_eq!(c.limit(), Limit::None);
    }

    #[tokio::test(start_paused = true)]
    async fn hard_caps_bound_the_rate() {
        let mut c = Aimd::new(Settings {
            max_events_per_sec: Some(2_000.0),
            ..settings()
        });
        for _ in 0..20 {
            c.step(&healthy());
        }
        assert_eq!(c.rate(), 2_000.0);
        let mut c = Aimd::new(Settings {
            max_bytes_per_sec: Some(150_000.0),
            ..settings()
        });
        for _ in 0..20 {
            c.step(&healthy());
        }
        assert_eq!(c.rate(), 1_500.0, "150 kB/s at 100 B per event");
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_holds_the_rate_in_simulated_time() {
        let mut p = Pacer::default();
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            p.acquire(100.0, 500.0).await;
        }
        // 1,000 units at 500/s: the first 500 may go at once (one second of allowance builds
        // up only with time, so they wait too), the whole takes about two seconds.
        let took = start.elapsed().as_secs_f64();
        assert!((1.8..=2.1).contains(&took), "{took}");
    }
}
