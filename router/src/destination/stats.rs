//! What each destination has done in this router: counters and gauges kept
//! both as Prometheus metrics and as numbers the admin API can read.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use serde::Serialize;

use crate::destination::history::{self, minute_of, Minutes};
use crate::destination::outcome::Fate;

/// How much is parked ([`crate::worker::parking`]), for the admin API and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParkedCount {
    pub users: usize,
    pub events: usize,
}

/// The latest failed attempt.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct LastError {
    pub message: String,
    pub status: Option<u16>,
    /// Unix milliseconds.
    pub at_ms: u64,
}

/// A point-in-time copy of one destination's counters.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Counts {
    pub delivered: u64,
    pub dead_lettered: u64,
    pub retried: u64,
    pub filtered: u64,
    pub in_flight: i64,
    pub users_in_backoff: i64,
    /// Users with events parked (out of memory, in order, until their turn).
    pub parked_users: i64,
    pub parked_events: i64,
    pub last_error: Option<LastError>,
}

/// One destination's live numbers in this router, over all shards.
pub struct DestinationStats {
    delivered: AtomicU64,
    dead_lettered: AtomicU64,
    retried: AtomicU64,
    filtered: AtomicU64,
    in_flight: AtomicI64,
    users_in_backoff: AtomicI64,
    parked_users: AtomicI64,
    parked_events: AtomicI64,
    last_error: Mutex<Option<LastError>>,
    /// Minutes not yet added to the shared history ([`crate::admin::history`]).
    history: Mutex<Minutes>,
    metrics: Metrics,
}

/// Handles registered once, so the hot path does no label lookups.
struct Metrics {
    delivered: Counter,
    dead_lettered: Counter,
    filtered: Counter,
    retried: Counter,
    attempt_delivered: Histogram,
    attempt_retry: Histogram,
    attempt_dead: Histogram,
    end_to_end: Histogram,
    in_flight: Gauge,
    users_in_backoff: Gauge,
    parked_users: Gauge,
    parked_events: Gauge,
}

impl DestinationStats {
    pub fn new(destination: &str) -> Self {
        let name = destination.to_owned();
        let events = |outcome: &'static str| metrics::counter!("router_events_total", "destination" => name.clone(), "outcome" => outcome);
        let attempts = |outcome: &'static str| metrics::histogram!("router_attempt_duration_seconds", "destination" => name.clone(), "outcome" => outcome);
        let metrics = Metrics {
            delivered: events("delivered"),
            dead_lettered: events("dead_lettered"),
            filtered: events("filtered"),
            retried: metrics::counter!("router_retries_total", "destination" => name.clone()),
            attempt_delivered: attempts("delivered"),
            attempt_retry: attempts("retry"),
            attempt_dead: attempts("dead"),
            end_to_end: metrics::histogram!(telemetry::END_TO_END_METRIC, "destination" => name.clone()),
            in_flight: metrics::gauge!("router_in_flight", "destination" => name.clone()),
            users_in_backoff: metrics::gauge!("router_users_in_backoff", "destination" => name.clone()),
            parked_users: metrics::gauge!("router_parked_users", "destination" => name.clone()),
            parked_events: metrics::gauge!("router_parked_events", "destination" => name),
        };
        Self {
            delivered: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            users_in_backoff: AtomicI64::new(0),
            parked_users: AtomicI64::new(0),
            parked_events: AtomicI64::new(0),
            last_error: Mutex::new(None),
            history: Mutex::new(Minutes::new()),
            metrics,
        }
    }

    /// An event reached the destination; `age` is since it was accepted.
    pub fn delivered(&self, age: Duration) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.metrics.delivered.increment(1);
        self.metrics.end_to_end.record(age.as_secs_f64());
    }

    pub fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        self.metrics.dead_lettered.increment(1);
        self.this_minute(|tally| tally.dead_lettered += 1);
    }

    fn this_minute(&self, change: impl FnOnce(&mut history::Tally)) {
        let minute = minute_of(protocol::unix_millis());
        change(
            protocol::sync::lock(&self.history)
                .entry(minute)
                .or_default(),
        );
    }

    /// The minutes tallied since the last call, to add to the shared history.
    pub fn take_history(&self) -> Minutes {
        std::mem::take(&mut *protocol::sync::lock(&self.history))
    }

    /// Puts back minutes [`Self::take_history`] gave that could not be stored.
    pub fn return_history(&self, minutes: Minutes) {
        history::merge(&mut protocol::sync::lock(&self.history), minutes);
    }

    /// An entry not addressed to this destination was acknowledged unsent.
    pub fn filtered(&self) {
        self.filtered_many(1);
    }

    /// `count` entries were not routed to this destination ([`crate::worker::routing`]).
    pub fn filtered_many(&self, count: u64) {
        self.filtered.fetch_add(count, Ordering::Relaxed);
        self.metrics.filtered.increment(count);
    }

    /// One attempt finished after `latency`.
    pub fn attempted(&self, fate: Fate, latency: Duration) {
        let histogram = match fate {
            Fate::Delivered => &self.metrics.attempt_delivered,
            Fate::Retry => {
                self.retried.fetch_add(1, Ordering::Relaxed);
                self.metrics.retried.increment(1);
                &self.metrics.attempt_retry
            }
            Fate::Dead => &self.metrics.attempt_dead,
        };
        histogram.record(latency.as_secs_f64());
        self.this_minute(|tally| tally.attempt(matches!(fate, Fate::Delivered), latency));
    }

    pub fn failed(&self, message: &str, status: Option<u16>) {
        let error = LastError {
            message: message.to_owned(),
            status,
            at_ms: protocol::unix_millis(),
        };
        *protocol::sync::lock(&self.last_error) = Some(error);
    }

    /// Counts an attempt in flight until the returned guard drops.
    pub fn attempt_in_flight(&self) -> GaugeGuard<'_> {
        GaugeGuard::new(&self.in_flight, &self.metrics.in_flight)
    }

    /// Counts a user waiting out a retry delay until the guard drops.
    pub fn user_in_backoff(&self) -> GaugeGuard<'_> {
        GaugeGuard::new(&self.users_in_backoff, &self.metrics.users_in_backoff)
    }

    /// One worker's parked counts went from `before` to `now`.
    pub fn parked_changed(&self, before: ParkedCount, now: ParkedCount) {
        let delta = |before: usize, now: usize| {
            i64::try_from(now).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(i64::MAX)
        };
        let users = delta(before.users, now.users);
        let events = delta(before.events, now.events);
        self.parked_users.fetch_add(users, Ordering::Relaxed);
        self.parked_events.fetch_add(events, Ordering::Relaxed);
        self.metrics.parked_users.increment(users as f64);
        self.metrics.parked_events.increment(events as f64);
    }

    pub fn counts(&self) -> Counts {
        Counts {
            delivered: self.delivered.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            filtered: self.filtered.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            users_in_backoff: self.users_in_backoff.load(Ordering::Relaxed),
            parked_users: self.parked_users.load(Ordering::Relaxed),
            parked_events: self.parked_events.load(Ordering::Relaxed),
            last_error: protocol::sync::lock(&self.last_error).clone(),
        }
    }
}

/// Holds one unit of a gauge; dropping it (even by cancellation) gives it back.
pub struct GaugeGuard<'a> {
    count: &'a AtomicI64,
    gauge: &'a Gauge,
}

impl<'a> GaugeGuard<'a> {
    fn new(count: &'a AtomicI64, gauge: &'a Gauge) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        gauge.increment(1.0);
        Self { count, gauge }
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.gauge.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_give_back_what_they_hold() {
        let stats = DestinationStats::new("crm");
        {
            let _attempt = stats.attempt_in_flight();
            let _backoff = stats.user_in_backoff();
            let counts = stats.counts();
            assert_eq!((counts.in_flight, counts.users_in_backoff), (1, 1));
        }
        let counts = stats.counts();
        assert_eq!((counts.in_flight, counts.users_in_backoff), (0, 0));
    }

    #[test]
    fn retries_count_and_failures_are_remembered() {
        let stats = DestinationStats::new("crm");
        stats.attempted(Fate::Retry, Duration::from_millis(5));
        stats.failed("HTTP 503", Some(503));
        stats.delivered(Duration::from_millis(20));
        let counts = stats.counts();
        assert_eq!((counts.retried, counts.delivered), (1, 1));
        let error = counts.last_error.expect("a failure was recorded");
        assert_eq!(
            (error.message.as_str(), error.status),
            ("HTTP 503", Some(503))
        );
    }
}
