//! The one retry policy: a stage's loop runs until it succeeds, fails for good, or is told to
//! stop; a failure that a retry could help is logged and retried after a jittered exponential
//! back-off.
//!
//! Back-off: 250 ms doubling per attempt, capped by `capture.max_backoff_ms`, with the upper
//! half jittered so restarted peers do not retry in step; the attempt count resets once a run
//! lasted a minute, so a pipeline that recovered starts again from short delays.

use std::time::{Duration, Instant};

use tokio::sync::watch;

/// An error that knows whether a retry could help.
pub trait Retryable: std::fmt::Display {
    /// Whether running again could succeed (a broker away, a connection lost) rather than fail
    /// the same way (bad data, bad configuration).
    fn is_retryable(&self) -> bool;
}

impl Retryable for crate::error::CaptureError {
    fn is_retryable(&self) -> bool {
        crate::error::CaptureError::is_retryable(self)
    }
}

/// A run that lasted this long counts as recovered: the next failure starts the back-off over.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// The first delay before jitter.
const FIRST_DELAY_MS: u64 = 250;

/// Jittered exponential back-off.
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    cap_ms: u64,
}

impl Backoff {
    /// Back-off capped at `cap_ms` (at least 100 ms).
    pub fn new(cap_ms: u64) -> Self {
        Backoff {
            attempt: 0,
            cap_ms: cap_ms.max(100),
        }
    }

    /// The delay before the next attempt, after a run that lasted `ran_for`; and the attempt
    /// number it is for.
    pub fn next(&mut self, ran_for: Duration) -> (Duration, u32) {
        if ran_for > HEALTHY_RUN {
            self.attempt = 0;
        }
        self.attempt += 1;
        let base = (FIRST_DELAY_MS << self.attempt.min(16)).min(self.cap_ms);
        let delay = base / 2 + rand::random_range(0..=base / 2);
        (Duration::from_millis(delay), self.attempt)
    }
}

/// Runs `once` until it succeeds, fails for good, or `stop` turns true (then `Ok`). Before each
/// retry, `on_retry` is called (to count it) and the failure is logged as "`what` interrupted".
pub async fn retrying<E, F, Fut>(
    max_backoff_ms: u64,
    mut stop: watch::Receiver<bool>,
    what: &str,
    mut on_retry: impl FnMut(),
    mut once: F,
) -> Result<(), E>
where
    E: Retryable,
    F: FnMut(watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let mut backoff = Backoff::new(max_backoff_ms);
    loop {
        let started = Instant::now();
        match once(stop.clone()).await {
            Ok(()) => return Ok(()),
            // Asked to stop while the attempt failed for a passing reason: that is a stop.
            Err(e) if e.is_retryable() && *stop.borrow() => {
                tracing::info!(error = %e, "{what} stopped while interrupted");
                return Ok(());
            }
            Err(e) if e.is_retryable() => {
                let (delay, attempt) = backoff.next(started.elapsed());
                on_retry();
                tracing::warn!(error = %e, attempt, delay_ms = delay.as_millis() as u64, "{what} interrupted; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset_after_a_healthy_run() {
        let mut b = Backoff::new(4_000);
        let short = Duration::from_secs(1);
        let mut last_base = 0;
        for n in 1..=10u32 {
            let (d, attempt) = b.next(short);
            assert_eq!(attempt, n);
            let base = (FIRST_DELAY_MS << n).min(4_000);
            let ms = d.as_millis() as u64;
            assert!(
                ms >= base / 2 && ms <= base,
                "attempt {n}: {ms} ms for base {base}"
            );
            assert!(base >= last_base);
            last_base = base;
        }
        let (d, attempt) = b.next(Duration::from_secs(61));
        assert_eq!(attempt, 1);
        assert!(d.as_millis() as u64 <= FIRST_DELAY_MS * 2);
    }

    #[derive(Debug)]
    struct E(bool);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "e({})", self.0)
        }
    }
    impl Retryable for E {
        fn is_retryable(&self) -> bool {
            self.0
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_failures_and_returns_permanent_ones() {
        let (_tx, rx) = watch::channel(false);
        let mut calls = 0;
        let mut retries = 0;
        let r = retrying(
            100,
            rx.clone(),
            "test",
            || retries += 1,
            |_| {
                calls += 1;
                let n = calls;
                async move {
                    match n {
                        1 | 2 => Err(E(true)),
                        _ => Err(E(false)),
                    }
                }
            },
        )
        .await;
        assert!(matches!(r, Err(E(false))));
        assert_eq!((calls, retries), (3, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_during_the_back_off_ends_quietly() {
        let (tx, rx) = watch::channel(false);
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = tx.send(true);
        });
        let r: Result<(), E> =
            retrying(60_000, rx, "test", || {}, |_| async { Err(E(true)) }).await;
        assert!(r.is_ok());
        stopper.await.expect("stopper");
    }
}
