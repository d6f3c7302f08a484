//! A circuit breaker per destination, shared by all of its shards on this
//! router.
//!
//! **Rule.** It opens when, over the last `window_ms` (30 s), at least
//! `min_attempts` (20) attempts ended and at least `failure_percent` (90 %)
//! of them failed in a way that says the destination is down or
//! overloaded: a connection error, a timeout, 408, 429 or 5xx. A permanent
//! refusal (another 4xx) does not count as a failure: the destination is up
//! and answering. The minimum keeps a handful of unlucky attempts from
//! opening it; the high ratio keeps a destination that fails one request in
//! two (a flaky one, whose retries do succeed) delivering at full rate.
//!
//! **Open.** No attempt starts except one probe every `probe_interval_ms`
//! (5 s). Events wait without spending attempts or retry time, so an outage
//! ends in delivery rather than dead letters, and a destination that is
//! already failing gets one request per interval from this router instead
//! of one per user per backoff step.
//!
//! **Half-open.** The probe is in flight. If it succeeds the breaker closes
//! and the waiting events go out in per-user order (each user's next event
//! is the one waiting); if it fails, the breaker opens for another interval.

use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::BreakerConfig;

/// Seconds kept in the failure window's ring of one-second buckets.
const MAX_WINDOW_SECS: usize = 600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// The breaker as the admin API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BreakerView {
    pub state: BreakerState,
    /// Unix ms when it entered that state.
    pub since_ms: u64,
}

/// How an attempt may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The breaker is closed.
    Attempt,
    /// The breaker was open: this attempt is the probe.
    Probe,
}

/// What an attempt told the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered, or refused for good: the destination answers.
    Answered,
    /// Connection error, timeout, 408, 429 or 5xx.
    Failed,
    /// Never finished (shutdown, lease lost): says nothing.
    Unknown,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    second: u64,
    attempts: u32,
    failures: u32,
}

/// The window's counts before one second: summed once in that second, not
/// at every attempt (a sum over the ring per attempt cost 7 % of the
/// router's instructions). Those seconds are over, so their counts stay.
#[derive(Debug, Clone, Copy)]
struct Earlier {
    second: u64,
    attempts: u64,
    failures: u64,
}

struct Inner {
    settings: BreakerConfig,
    state: BreakerState,
    since_ms: u64,
    /// Open: when the next probe may go.
    next_probe: Instant,
    buckets: Vec<Bucket>,
    /// Seconds are counted from here (monotonic).
    epoch: Instant,
    /// `None` once the buckets or the window change.
    earlier: Option<Earlier>,
}

pub struct Breaker {
    inner: Mutex<Inner>,
    /// Bumped at every state change, so waiting attempts look again.
    changes: watch::Sender<u64>,
}

impl Breaker {
    pub fn new(settings: BreakerConfig) -> Self {
        Self {
            inner: Mutex::new(Inner {
                settings,
                state: BreakerState::Closed,
                since_ms: protocol::unix_millis(),
                next_probe: Instant::now(),
                buckets: vec![Bucket::default(); MAX_WINDOW_SECS],
                epoch: Instant::now(),
                earlier: None,
            }),
            changes: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies changed settings; turning it off closes it.
    pub fn configure(&self, settings: BreakerConfig) {
        let mut inner = self.lock();
        inner.settings = settings;
        inner.earlier = None;
        if !settings.enabled && inner.state != BreakerState::Closed {
            self.switch(&mut inner, BreakerState::Closed);
        }
    }

    pub fn view(&self) -> BreakerView {
        let inner = self.lock();
        BreakerView {
            state: inner.state,
            since_ms: inner.since_ms,
        }
    }

    /// Waits until an attempt may go out: at once while closed; while
    /// open, until this caller is the next probe. `None` at shutdown.
    pub async fn admit(&self, shutdown: &CancellationToken) -> Option<Admission> {
        let mut changes = self.changes.subscribe();
        loop {
            let wait = {
                let mut inner = self.lock();
                let now = Instant::now();
                match inner.state {
                    BreakerState::Closed => return Some(Admission::Attempt),
                    BreakerState::Open if now >= inner.next_probe => {
                        self.switch(&mut inner, BreakerState::HalfOpen);
                        return Some(Admission::Probe);
                    }
                    BreakerState::Open => Some(inner.next_probe - now),
                    // The probe is out: wait for its verdict.
                    BreakerState::HalfOpen => None,
                }
            };
            changes.mark_unchanged();
            let sleep = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600)));
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = sleep => {}
                _ = changes.changed() => {}
            }
        }
    }

    /// Records how an admitted attempt ended.
    pub fn record(&self, admission: Admission, verdict: Verdict) {
        let mut inner = self.lock();
        let now = Instant::now();
        match (admission, verdict) {
            (Admission::Probe, Verdict::Answered) => {
                inner.buckets.fill(Bucket::default());
                inner.earlier = None;
                self.switch(&mut inner, BreakerState::Closed);
            }
            (Admission::Probe, Verdict::Failed) => {
                inner.next_probe = now + inner.settings.probe_interval();
                self.switch(&mut inner, BreakerState::Open);
            }
            // A probe that never finished: the next caller probes at once.
            (Admission::Probe, Verdict::Unknown) => {
                inner.next_probe = now;
                self.switch(&mut inner, BreakerState::Open);
            }
            (Admission::Attempt, Verdict::Unknown) => {}
            (Admission::Attempt, verdict) => {
                let second = now.duration_since(inner.epoch).as_secs();
                let slot = usize::try_from(second).unwrap_or(0) % MAX_WINDOW_SECS;
                let bucket = &mut inner.buckets[slot];
                if bucket.second != second {
                    *bucket = Bucket {
                        second,
                        ..Bucket::default()
                    };
                }
                bucket.attempts += 1;
                if verdict == Verdict::Failed {
                    bucket.failures += 1;
                }
                let current = *bucket;
                if inner.state == BreakerState::Closed
                    && inner.settings.enabled
                    && trips(&mut inner, current)
                {
                    inner.next_probe = now + inner.settings.probe_interval();
                    self.switch(&mut inner, BreakerState::Open);
                }
            }
        }
    }

    fn switch(&self, inner: &mut Inner, state: BreakerState) {
        if inner.state == state {
            return;
        }
        inner.state = state;
        inner.since_ms = protocol::unix_millis();
        self.changes.send_modify(|changes| *changes += 1);
    }
}

/// Whether the window ending with `current` (this second's bucket) meets
/// the opening rule.
fn trips(inner: &mut Inner, current: Bucket) -> bool {
    let second = current.second;
    let window = inner.settings.window_secs().min(MAX_WINDOW_SECS as u64);
    let earlier = match inner.earlier {
        Some(earlier) if earlier.second == second => earlier,
        _ => {
            let earlier = inner
                .buckets
                .iter()
                .filter(|bucket| bucket.second + window > second && bucket.second < second)
                .fold(
                    Earlier {
                        second,
                        attempts: 0,
                        failures: 0,
                    },
                    |sum, bucket| Earlier {
                        attempts: sum.attempts + u64::from(bucket.attempts),
                        failures: sum.failures + u64::from(bucket.failures),
                        ..sum
                    },
                );
            inner.earlier = Some(earlier);
            earlier
        }
    };
    let attempts = earlier.attempts + u64::from(current.attempts);
    let failures = earlier.failures + u64::from(current.failures);
    let settings = &inner.settings;
    attempts >= u64::from(settings.min_attempts)
        && failures * 100 >= attempts * u64::from(settings.failure_percent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerConfig {
        BreakerConfig {
            enabled: true,
            window_ms: 30_000,
            min_attempts: 20,
            failure_percent: 90,
            probe_interval_ms: 5_000,
        }
    }

    fn attempts(breaker: &Breaker, failed: u32, answered: u32) {
        for _ in 0..failed {
            breaker.record(Admission::Attempt, Verdict::Failed);
        }
        for _ in 0..answered {
            breaker.record(Admission::Attempt, Verdict::Answered);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_only_on_enough_attempts_that_mostly_failed() {
        let breaker = Breaker::new(settings());
        attempts(&breaker, 19, 0);
        assert_eq!(
            breaker.view().state,
            BreakerState::Closed,
            "19 < 20 attempts"
        );
        let breaker = Breaker::new(settings());
        attempts(&breaker, 0, 3);
        attempts(&breaker, 20, 0);
        // 20 failures of 23: 87 % < 90 %.
        assert_eq!(breaker.view().state, BreakerState::Closed);
        attempts(&breaker, 7, 0);
        // 27 of 30: 90 %.
        assert_eq!(breaker.view().state, BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_older_than_the_window_do_not_count() {
        let breaker = Breaker::new(settings());
        attempts(&breaker, 15, 0);
        tokio::time::advance(Duration::from_secs(31)).await;
        attempts(&breaker, 15, 0);
        assert_eq!(breaker.view().state, BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_of_earlier_seconds_in_the_window_count() {
        let breaker = Breaker::new(settings());
        for _ in 0..4 {
            attempts(&breaker, 4, 0);
            tokio::time::advance(Duration::from_secs(7)).await;
        }
        assert_eq!(breaker.view().state, BreakerState::Closed, "16 < 20");
        // 20 failures over 29 s, the first of them 28 s ago.
        attempts(&breaker, 3, 0);
        assert_eq!(breaker.view().state, BreakerState::Closed, "19 < 20");
        attempts(&breaker, 1, 0);
        assert_eq!(breaker.view().state, BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn while_open_one_probe_per_interval_goes_and_its_success_closes_it() {
        let breaker = Breaker::new(settings());
        let shutdown = CancellationToken::new();
        attempts(&breaker, 20, 0);
        assert_eq!(breaker.view().state, BreakerState::Open);
        let started = tokio::time::Instant::now();
        let probe = breaker.admit(&shutdown).await;
        assert_eq!(probe, Some(Admission::Probe));
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "one probe interval"
        );
        assert_eq!(breaker.view().state, BreakerState::HalfOpen);
        // Others wait for the probe's verdict.
        let waiting = tokio::time::timeout(Duration::from_secs(60), breaker.admit(&shutdown));
        breaker.record(Admission::Probe, Verdict::Failed);
        // The failed probe reopens it; the waiter becomes the next probe 5 s later.
        let started = tokio::time::Instant::now();
        assert_eq!(waiting.await, Ok(Some(Admission::Probe)));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        breaker.record(Admission::Probe, Verdict::Answered);
        assert_eq!(breaker.view().state, BreakerState::Closed);
        assert_eq!(breaker.admit(&shutdown).await, Some(Admission::Attempt));
        // Closing cleared the window: 19 more failures do not reopen it.
        attempts(&breaker, 19, 0);
        assert_eq!(breaker.view().state, BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_breaker_never_opens() {
        let breaker = Breaker::new(BreakerConfig {
            enabled: false,
            ..settings()
        });
        attempts(&breaker, 100, 0);
        assert_eq!(breaker.view().state, BreakerState::Closed);
    }
}
