//! The adaptive throttle for backfill and replay: additive increase while every signal is
//! healthy, multiplicative decrease when any is not, within a floor and a ceiling and under hard
//! caps.
//!
//! Signals, each compared with its budget:
//! 1. the p99 latency of a canary query on the origin, over a sliding window, against a
//!    baseline measured before the job started (times a tolerance);
//! 2. WAL retained by the origin's replication slot;
//! 3. live shipping lag (the live lane always wins);
//! 4. destination produce latency;
//! 5. live throughput: the live workload's commit rate while the job runs, against its rate
//!    during short quiet periods in which the job pauses ([`LiveProbe`]). This is the signal
//!    that sees a CPU-bound load lose throughput: a canary that sleeps between queries is
//!    woken ahead of busy tasks by the kernel's scheduler and barely slows down (measured on
//!    2 cores: canary p50 0.35 ms with and without a backfill that cost pgbench 35% of its
//!    TPS), so it mostly catches stalls.
//!
//! While live load is measurable the rate only grows after a quiet period found the job
//! harmless (by at most half of itself per period); without live load it grows every
//! healthy second, doubling until the first cut (slow start) and additively after it.
//!
//! A decision names the signal that limits the rate, so an operator sees at a glance why a job
//! is slow. The controller is pure: the caller feeds it signals on its own clock (every second
//! in production, simulated time in tests).

use std::fmt;

pub mod backfill;
pub mod signals;

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
    /// The live workload commits less while the job runs than while it pauses.
    LiveThroughput,
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
            Limit::LiveThroughput => "live_throughput",
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
    /// The share of live commits the job cost, measured by the quiet period that just ended
    /// (`None` between quiet periods).
    pub live_harm: Option<f64>,
    /// Whether live load is being measured: then the rate grows only on a `live_harm` reading.
    pub live_gated: bool,
}

/// Budgets and shape of the control loop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Canary p99 measured before the job started, in ms.
    pub canary_baseline_ms: f64,
    /// How far above the baseline the canary may go (1.25 = 25%).
    pub canary_tolerance: f64,
    /// Rises of the canary smaller than this are never unhealthy, in ms (the canary's own
    /// noise: single slow samples of a few ms).
    pub canary_slack_ms: f64,
    /// The share of live commits a job may cost (0.05 = 5%).
    pub live_harm_budget: f64,
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
    /// Whether anything has cut the rate since the start: until then, without live load, the
    /// rate at least doubles each healthy step (slow start, as in TCP).
    cut: bool,
    /// Quiet-period readings taken at the current rate, not yet conclusive.
    harms: Vec<f64>,
}

impl Aimd {
    /// A controller starting at the floor.
    pub fn new(settings: Settings) -> Aimd {
        Aimd {
            rate: settings.floor,
            settings,
            limit: Limit::None,
            cut: false,
            harms: Vec::new(),
        }
    }

    /// Sets the canary baseline once it has been measured (infinite: not measured).
    pub fn set_canary_baseline(&mut self, ms: f64) {
        self.settings.canary_baseline_ms = ms;
    }

    /// The canary baseline, once measured.
    pub fn canary_baseline(&self) -> Option<f64> {
        Some(self.settings.canary_baseline_ms).filter(|ms| ms.is_finite())
    }

    /// Sets the average bytes per event the byte cap divides by.
    pub fn set_bytes_per_event(&mut self, bytes: f64) {
        self.settings.bytes_per_event = bytes;
    }

    /// Back to the floor (a new job starts slowly).
    pub fn reset(&mut self) {
        self.rate = self.settings.floor;
        self.limit = Limit::None;
        self.cut = false;
        self.harms.clear();
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
        } else if x.canary_p99_ms
            > (s.canary_baseline_ms * s.canary_tolerance)
                .max(s.canary_baseline_ms + s.canary_slack_ms)
        {
            Limit::CanaryLatency
        } else if x.retained_wal_bytes > s.wal_budget_bytes {
            Limit::RetainedWal
        } else if x.produce_latency_ms > s.produce_latency_budget_ms {
            Limit::ProduceLatency
        } else {
            Limit::None
        }
    }

    /// Weighs a quiet period's reading together with the others taken at the same rate. One
    /// reading is noisy (its standard deviation is about `HARM_NOISE`), so the rate is cut
    /// only when the mean is over the budget by more than its standard error, and grows only
    /// when it is under by as much; in between, the next reading decides.
    fn judge(&mut self, harm: f64) -> Judgement {
        self.harms.push(harm);
        let n = self.harms.len() as f64;
        let mean = self.harms.iter().sum::<f64>() / n;
        let se = HARM_NOISE / n.sqrt();
        let budget = self.settings.live_harm_budget;
        if mean - se > budget {
            self.harms.clear();
            Judgement::Harmful
        } else if mean + se < budget {
            self.harms.clear();
            Judgement::Harmless
        } else {
            if self.harms.len() > MAX_HARM_READINGS {
                self.harms.remove(0);
            }
            Judgement::Unsure
        }
    }

    /// One control step: returns the new rate and what limits it.
    pub fn step(&mut self, x: &Signals) -> (f64, Limit) {
        let cap = self.cap();
        let mut bad = self.unhealthy(x);
        let judged = x.live_harm.map(|h| self.judge(h));
        if bad == Limit::None && judged == Some(Judgement::Harmful) {
            bad = Limit::LiveThroughput;
        }
        if bad == Limit::None {
            // Under measurable live load, growth waits for quiet periods to show the job
            // harmless and is at most half the rate, so one step cannot multiply the harm.
            let step = match (x.live_gated, judged) {
                (false, _) if !self.cut => self.settings.increase.max(self.rate),
                (false, _) => self.settings.increase,
                (true, Some(Judgement::Harmless)) => self.settings.increase.min(self.rate * 0.5),
                (true, _) => 0.0,
            };
            if step > 0.0 {
                self.harms.clear();
            }
            self.rate = (self.rate + step).min(cap);
            self.limit = if self.rate >= cap {
                Limit::Ceiling
            } else {
                Limit::None
            };
        } else {
            self.rate = (self.rate * self.settings.decrease).max(self.settings.floor);
            self.limit = bad;
            self.cut = true;
            self.harms.clear();
        }
        (self.rate, self.limit)
    }
}

/// What the quiet-period readings at the current rate say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Judgement {
    Harmful,
    Harmless,
    Unsure,
}

/// Standard deviation of one quiet period's harm reading with no harm done: 0.05 to 0.06 for
/// pgbench (4 clients, 2,000 TPS) on 2 cores, and hardly smaller with windows twice as long,
/// since a live load's own rate wanders by that much from second to second.
const HARM_NOISE: f64 = 0.05;

/// Readings kept at one rate while they are inconclusive.
const MAX_HARM_READINGS: usize = 4;

/// Seconds after the job pauses or resumes before the live rate reflects it (chunk rows still
/// in flight to the broker, the stream catching up).
const SETTLE_SECS: f64 = 0.4;

/// Below this many live commits per second there is no live load worth measuring.
const MIN_LIVE_RATE: f64 = 20.0;

/// A quiet period with fewer live commits than this measures nothing (it reads as harmless).
const MIN_QUIET_COMMITS: usize = 30;

/// Measures what a job costs the live workload: under live load the job pauses for `quiet`
/// seconds every `every` seconds, and the live commit rate during the pause is compared with
/// the rate in the seconds before it. `1 - busy / quiet` is the share of live commits the job
/// cost. Pure: the caller feeds it commit times and the clock, both in seconds.
#[derive(Debug)]
pub struct LiveProbe {
    commits: std::collections::VecDeque<f64>,
    every: f64,
    quiet: f64,
    /// Start of the current quiet period, and the busy rate measured just before it.
    quiet_from: Option<(f64, f64)>,
    /// When the next quiet period may start.
    next: f64,
    /// When the job last resumed.
    busy_from: f64,
}

impl LiveProbe {
    /// A probe that pauses for `quiet` seconds every `every` seconds, starting at `now`.
    pub fn new(every: f64, quiet: f64, now: f64) -> LiveProbe {
        let quiet = quiet.max(SETTLE_SECS + 0.2);
        let every = every.max(quiet + SETTLE_SECS + 0.5);
        LiveProbe {
            commits: std::collections::VecDeque::new(),
            every,
            quiet,
            quiet_from: None,
            next: now + every - quiet,
            busy_from: now,
        }
    }

    /// Starts the cycle over at `now` (a job starts reading): the first quiet period comes
    /// after a full busy stretch.
    pub fn restart(&mut self, now: f64) {
        self.quiet_from = None;
        self.busy_from = now;
        self.next = now + self.every - self.quiet;
    }

    /// Notes a live commit seen at `at`.
    pub fn record(&mut self, at: f64) {
        self.commits.push_back(at);
        let keep = at - 2.0 * self.every - 2.0;
        while self.commits.front().is_some_and(|&t| t < keep) {
            self.commits.pop_front();
        }
    }

    /// Commits in `[from, to)` and their rate; `commits` is in time order.
    fn rate(&self, from: f64, to: f64) -> (usize, f64) {
        let first = self.commits.partition_point(|&t| t < from);
        let n = self
            .commits
            .partition_point(|&t| t < to)
            .saturating_sub(first);
        (n, n as f64 / (to - from).max(1e-3))
    }

    /// Whether live load is measurable: enough commits per second over the last two seconds.
    pub fn loaded(&self, now: f64) -> bool {
        self.rate(now - 2.0, now).1 >= MIN_LIVE_RATE
    }

    /// Whether the job must pause now.
    pub fn is_quiet(&self) -> bool {
        self.quiet_from.is_some()
    }

    /// Advances the cycle at `now`: starts a quiet period when one is due and live load is
    /// measurable; when one ends, returns the share of live commits the job cost (0 when the
    /// quiet period saw too few commits to tell).
    pub fn poll(&mut self, now: f64) -> Option<f64> {
        match self.quiet_from {
            Some((from, busy)) if now >= from + self.quiet => {
                self.restart(now);
                let (n, quiet) = self.rate(from + SETTLE_SECS, now);
                Some(if n < MIN_QUIET_COMMITS || quiet <= 0.0 {
                    0.0
                } else {
                    1.0 - busy / quiet
                })
            }
            Some(_) => None,
            None if now >= self.next && self.loaded(now) => {
                let from = (self.busy_from + SETTLE_SECS).max(now - 2.0).min(now - 0.5);
                self.quiet_from = Some((now, self.rate(from, now).1));
                None
            }
            None => None,
        }
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
            canary_slack_ms: 0.0,
            live_harm_budget: 0.05,
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
            live_harm: None,
            live_gated: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn grows_additively_to_the_ceiling_and_stays() {
        let mut c = Aimd::new(settings());
        // One cut (at the floor) ends the slow start.
        c.step(&Signals {
            canary_p99_ms: 50.0,
            ..healthy()
        });
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
            (
                Signals {
                    live_harm: Some(0.3),
                    ..healthy()
                },
                Limit::LiveThroughput,
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

    #[test]
    fn slow_start_doubles_until_the_first_cut() {
        let mut c = Aimd::new(Settings {
            ceiling: 50_000.0,
            ..settings()
        });
        let rates: Vec<f64> = (0..4).map(|_| c.step(&healthy()).0).collect();
        assert_eq!(
            rates,
            [600.0, 1_200.0, 2_400.0, 4_800.0],
            "at least +500, else ×2"
        );
        c.step(&Signals {
            canary_p99_ms: 50.0,
            ..healthy()
        });
        assert_eq!(c.rate(), 2_400.0);
        assert_eq!(c.step(&healthy()).0, 2_900.0, "additive after a cut");
        c.reset();
        assert_eq!(c.step(&healthy()).0, 600.0, "a new job starts slowly again");
    }

    #[test]
    fn canary_slack_ignores_small_rises() {
        let c = Aimd::new(Settings {
            canary_slack_ms: 5.0,
            ..settings()
        });
        let at = |ms| Signals {
            canary_p99_ms: ms,
            ..healthy()
        };
        assert_eq!(
            c.unhealthy(&at(6.9)),
            Limit::None,
            "2 ms baseline + 5 ms slack"
        );
        assert_eq!(c.unhealthy(&at(7.1)), Limit::CanaryLatency);
    }

    #[test]
    fn under_live_load_growth_waits_for_a_verdict_by_half_at_most() {
        let mut c = Aimd::new(settings());
        let gated = Signals {
            live_gated: true,
            ..healthy()
        };
        let reading = |h| Signals {
            live_harm: Some(h),
            ..gated
        };
        assert_eq!(c.step(&gated).0, 100.0, "no reading, no growth");
        assert_eq!(c.step(&reading(-0.01)).0, 150.0, "clearly harmless: +50%");
        assert_eq!(c.step(&reading(-0.02)).0, 225.0);
        assert_eq!(
            c.step(&reading(0.2)),
            (112.5, Limit::LiveThroughput),
            "clearly harmful: cut"
        );
    }

    #[test]
    fn noisy_harm_readings_are_averaged_before_a_decision() {
        let mut c = Aimd::new(Settings {
            floor: 1_000.0,
            ceiling: 50_000.0,
            ..settings()
        });
        let reading = |h| Signals {
            live_harm: Some(h),
            live_gated: true,
            ..healthy()
        };
        // 2% each time: one reading (±5%) cannot tell it from the 5% budget, three can.
        assert_eq!(c.step(&reading(0.02)), (1_000.0, Limit::None));
        assert_eq!(c.step(&reading(0.02)), (1_000.0, Limit::None));
        assert_eq!(c.step(&reading(0.02)).0, 1_500.0);
        // 8% each time: over the budget, cut once the mean is clearly over it (the third).
        assert_eq!(c.step(&reading(0.08)).0, 1_500.0);
        assert_eq!(c.step(&reading(0.08)).0, 1_500.0);
        assert_eq!(c.step(&reading(0.08)), (1_000.0, Limit::LiveThroughput));
    }

    /// Feeds `rate` live commits per second between `from` and `to` (seconds).
    fn commits(p: &mut LiveProbe, from: f64, to: f64, rate: f64) {
        let n = ((to - from) * rate) as usize;
        for i in 0..n {
            p.record(from + i as f64 / rate);
        }
    }

    #[test]
    fn live_probe_measures_the_share_of_commits_the_job_costs() {
        let mut p = LiveProbe::new(3.0, 1.0, 0.0);
        // Busy: the job costs the load 20% (800 of 1,000 commits/s).
        commits(&mut p, 0.0, 2.0, 800.0);
        assert_eq!(p.poll(1.9), None, "not due yet");
        assert!(!p.is_quiet());
        assert_eq!(p.poll(2.0), None, "quiet starts");
        assert!(p.is_quiet());
        commits(&mut p, 2.0, 3.0, 1_000.0);
        let harm = p.poll(3.0).expect("verdict");
        assert!((0.18..=0.22).contains(&harm), "{harm}");
        assert!(!p.is_quiet());
        // The next period is `every` after the last one started.
        commits(&mut p, 3.0, 5.0, 1_000.0);
        assert_eq!(p.poll(4.9), None);
        assert!(!p.is_quiet());
        assert_eq!(p.poll(5.0), None);
        assert!(p.is_quiet());
        commits(&mut p, 5.0, 6.0, 1_000.0);
        let harm = p.poll(6.0).expect("verdict");
        assert!(harm.abs() < 0.02, "{harm}");
    }

    #[test]
    fn live_probe_stays_out_of_the_way_without_live_load() {
        let mut p = LiveProbe::new(3.0, 1.0, 0.0);
        commits(&mut p, 0.0, 10.0, 5.0);
        for t in 0..100 {
            assert_eq!(p.poll(f64::from(t) * 0.1), None);
            assert!(!p.is_quiet());
        }
        assert!(!p.loaded(10.0));
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
