//! When to try again: doubling delays, capped, honouring Retry-After.

use std::time::Duration;

use crate::config::RetryConfig;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    initial: Duration,
    max_delay: Duration,
    max_attempts: u32,
}

impl From<RetryConfig> for RetryPolicy {
    fn from(config: RetryConfig) -> Self {
        Self {
            initial: Duration::from_millis(config.initial_delay_ms),
            max_delay: Duration::from_millis(config.max_delay_ms),
            max_attempts: config.max_attempts,
        }
    }
}

impl RetryPolicy {
    /// Whether a failed `attempt` (1-based) may be followed by another.
    pub fn allows_another(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The wait after failed `attempt` (1-based): `initial × 2^(attempt-1)`,
    /// at least what the destination asked for with Retry-After, and never
    /// more than the maximum delay.
    pub fn delay_after(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        let backoff = self.initial.saturating_mul(1 << doublings);
        backoff
            .max(retry_after.unwrap_or_default())
            .min(self.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryConfig {
            initial_delay_ms: 100,
            max_delay_ms: 30_000,
            max_attempts: 8,
        }
        .into()
    }

    #[test]
    fn delays_double_until_the_cap() {
        let delays: Vec<u128> = (1..=12)
            .map(|a| policy().delay_after(a, None).as_millis())
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]
        );
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        assert_eq!(
            policy().delay_after(u32::MAX, None),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn retry_after_is_honoured_but_clamped() {
        assert_eq!(
            policy().delay_after(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            policy().delay_after(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(30)
        );
        // A Retry-After shorter than the backoff does not shorten it.
        assert_eq!(
            policy().delay_after(4, Some(Duration::ZERO)),
            Duration::from_millis(800)
        );
    }

    #[test]
    fn attempts_stop_at_the_maximum() {
        assert!(policy().allows_another(7));
        assert!(!policy().allows_another(8));
    }
}
