//! When to try again: doubling delays, capped, honouring Retry-After, until
//! an attempt limit (if set) or the retry horizon (`max_elapsed_ms`).

use std::time::Duration;

use crate::config::RetryConfig;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    initial: Duration,
    max_delay: Duration,
    max_attempts: Option<u32>,
    max_elapsed: Duration,
}

impl From<RetryConfig> for RetryPolicy {
    fn from(config: RetryConfig) -> Self {
        Self {
            initial: Duration::from_millis(config.initial_delay_ms),
            max_delay: Duration::from_millis(config.max_delay_ms),
            max_attempts: config.max_attempts,
            max_elapsed: Duration::from_millis(config.max_elapsed_ms),
        }
    }
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again after this long.
    RetryAfter(Duration),
    /// Give up: the attempt limit or the retry horizon is reached.
    GiveUp,
}

impl RetryPolicy {
    /// The longest delay, also the cap on a Retry-After.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// What follows failed `attempt` (1-based), `elapsed` after the first
    /// attempt: a doubling delay (`initial × 2^(attempt-1)`, at least what
    /// the destination asked for with Retry-After, at most the maximum
    /// delay, and no later than the horizon, so the last attempt is made
    /// there), or giving up once either limit is reached.
    pub fn after_failure(
        &self,
        attempt: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
    ) -> RetryDecision {
        let attempts_left = self.max_attempts.is_none_or(|max| attempt < max);
        let Some(time_left) = self
            .max_elapsed
            .checked_sub(elapsed)
            .filter(|left| !left.is_zero())
        else {
            return RetryDecision::GiveUp;
        };
        if !attempts_left {
            return RetryDecision::GiveUp;
        }
        let doublings = attempt.saturating_sub(1).min(31);
        let backoff = self.initial.saturating_mul(1 << doublings);
        let delay = backoff
            .max(retry_after.unwrap_or_default())
            .min(self.max_delay)
            .min(time_left);
        RetryDecision::RetryAfter(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryConfig {
            initial_delay_ms: 100,
            max_delay_ms: 30_000,
            max_attempts: Some(8),
            max_elapsed_ms: 3_600_000,
        }
        .into()
    }

    fn delay(policy: RetryPolicy, attempt: u32, retry_after: Option<Duration>) -> Duration {
        match policy.after_failure(attempt, Duration::ZERO, retry_after) {
            RetryDecision::RetryAfter(delay) => delay,
            RetryDecision::GiveUp => panic!("attempt {attempt} gives up"),
        }
    }

    #[test]
    fn delays_double_until_the_cap() {
        let unlimited = RetryPolicy {
            max_attempts: None,
            ..policy()
        };
        let delays: Vec<u128> = (1..=12)
            .map(|a| delay(unlimited, a, None).as_millis())
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]
        );
        assert_eq!(
            delay(unlimited, u32::MAX - 1, None),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn retry_after_is_honoured_but_clamped() {
        assert_eq!(
            delay(policy(), 1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            delay(policy(), 1, Some(Duration::from_secs(3600))),
            Duration::from_secs(30)
        );
        // A Retry-After shorter than the backoff does not shorten it.
        assert_eq!(
            delay(policy(), 4, Some(Duration::ZERO)),
            Duration::from_millis(800)
        );
    }

    #[test]
    fn attempts_stop_at_the_maximum() {
        assert_eq!(
            policy().after_failure(7, Duration::ZERO, None),
            RetryDecision::RetryAfter(Duration::from_millis(6400))
        );
        assert_eq!(
            policy().after_failure(8, Duration::ZERO, None),
            RetryDecision::GiveUp
        );
    }

    #[test]
    fn the_horizon_ends_retries_and_the_last_attempt_lands_on_it() {
        let hour = Duration::from_secs(3600);
        let unlimited = RetryPolicy {
            max_attempts: None,
            ..policy()
        };
        // 10 s before the horizon, a 30 s delay is cut to 10 s …
        assert_eq!(
            unlimited.after_failure(20, hour - Duration::from_secs(10), None),
            RetryDecision::RetryAfter(Duration::from_secs(10))
        );
        // … and the attempt made there is the last.
        assert_eq!(
            unlimited.after_failure(21, hour, None),
            RetryDecision::GiveUp
        );
        assert_eq!(
            unlimited.after_failure(21, hour + Duration::from_secs(1), None),
            RetryDecision::GiveUp
        );
    }
}
