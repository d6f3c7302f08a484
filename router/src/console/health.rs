//! What state a destination is in, as the console names it, from this
//! router's measurement of it and the recent history of every router.

use crate::admin::overview::DestinationView;
use crate::destination::breaker::BreakerState;
use crate::destination::history::{minute_of, Minutes, Tally};
use crate::destination::progress::WorkerState;

/// Minutes the success rate, latency and state look back on.
pub const RECENT_MINUTES: u64 = 5;

/// Minutes the charts span.
pub const CHART_MINUTES: u64 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Delivering (or idle) with at most a few failures.
    Healthy,
    /// Delivering, but with failures (under 95 % success recently), dead
    /// letters, or users parked.
    Degraded,
    /// Most recent attempts fail.
    Failing,
    /// The breaker holds attempts back (open, or probing).
    CircuitOpen,
    Paused,
    /// A worker has work and made no progress for `admin.stall_after_ms`.
    Stalled,
}

impl Health {
    pub fn of(view: &DestinationView, recent: &Tally) -> Self {
        let stalled = view
            .workers
            .iter()
            .any(|worker| worker.state == WorkerState::Stalled);
        let success = recent.success_rate();
        if view.paused {
            Health::Paused
        } else if view.breaker.state != BreakerState::Closed {
            Health::CircuitOpen
        } else if stalled {
            Health::Stalled
        } else if success.is_some_and(|rate| rate < 0.5) {
            Health::Failing
        } else if success.is_some_and(|rate| rate < 0.95)
            || recent.dead_lettered > 0
            || view.counts.parked_users > 0
        {
            Health::Degraded
        } else {
            Health::Healthy
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Failing => "failing",
            Health::CircuitOpen => "circuit open",
            Health::Paused => "paused",
            Health::Stalled => "stalled",
        }
    }

    pub fn class(self) -> &'static str {
        match self {
            Health::CircuitOpen => "circuit-open",
            other => other.label(),
        }
    }
}

/// One tally per minute of the last `span` minutes up to `now_ms`, oldest
/// first (empty minutes as zero tallies).
pub fn per_minute(minutes: &Minutes, now_ms: u64, span: u64) -> Vec<Tally> {
    let last = minute_of(now_ms);
    (last + 1 - span.min(last + 1)..=last)
        .map(|minute| minutes.get(&minute).cloned().unwrap_or_default())
        .collect()
}

/// The last `span` minutes added together.
pub fn total(minutes: &Minutes, now_ms: u64, span: u64) -> Tally {
    let mut sum = Tally::default();
    for tally in per_minute(minutes, now_ms, span) {
        sum.add(&tally);
    }
    sum
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn windows_count_only_their_minutes() {
        let now = 1000 * 60_000 + 5;
        let mut minutes = Minutes::new();
        for minute in [993, 999, 1000] {
            minutes
                .entry(minute)
                .or_default()
                .attempt(true, Duration::from_millis(1));
        }
        assert_eq!(per_minute(&minutes, now, 60).len(), 60);
        assert_eq!(total(&minutes, now, 5).delivered, 2);
        assert_eq!(total(&minutes, now, 60).delivered, 3);
    }
}
