//! Waiting out a Redis failure: the pause between tries, and a loop that
//! retries a call while its error is one that waiting can fix.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Pauses between tries of a failing Redis call: doubling from `first`,
/// at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// A running service's commands (reads, acknowledgements, fetches):
    /// from 100 ms up to 5 s.
    pub const COMMANDS: Backoff = Backoff {
        first: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };

    /// Start-up, while Redis may itself still be starting: every second.
    pub const STARTUP: Backoff = Backoff {
        first: Duration::from_secs(1),
        max: Duration::from_secs(1),
    };

    /// The pause after `failures` (from 1) failures in a row.
    pub fn delay(self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        self.first.saturating_mul(1 << doublings).min(self.max)
    }

    /// Sleeps the pause after `failures`; false when `shutdown` came first.
    pub async fn wait(self, failures: u32, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(self.delay(failures)) => true,
        }
    }
}

/// Runs `call` until it succeeds (`Ok(Some)`), fails with an error that
/// `should_retry` refuses (that error), or `shutdown` comes (`Ok(None)`).
/// Each failure that is retried is logged as "`what`; retrying.", so
/// `what` says what the failure means ("Redis unreachable at …").
pub async fn run_with_retries<T, E, F, Fut>(
    what: &str,
    backoff: Backoff,
    shutdown: &CancellationToken,
    should_retry: impl Fn(&E) -> bool,
    mut call: F,
) -> Result<Option<T>, E>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut failures = 0;
    loop {
        match call().await {
            Ok(value) => return Ok(Some(value)),
            Err(error) if should_retry(&error) => {
                failures += 1;
                tracing::warn!(%error, failures, "{what}; retrying.");
                if !backoff.wait(failures, shutdown).await {
                    return Ok(None);
                }
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_the_first_up_to_the_most() {
        let delays: Vec<u128> = (1..=8)
            .map(|failures| Backoff::COMMANDS.delay(failures).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(Backoff::STARTUP.delay(1), Duration::from_secs(1));
        assert_eq!(Backoff::STARTUP.delay(u32::MAX), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_what_waiting_can_fix_and_returns_the_rest() {
        let shutdown = CancellationToken::new();
        let mut calls = 0;
        let started = tokio::time::Instant::now();
        let result: Result<Option<u32>, String> = run_with_retries(
            "test",
            Backoff::COMMANDS,
            &shutdown,
            |e: &String| e == "busy",
            || {
                calls += 1;
                let answer = if calls < 3 {
                    Err("busy".to_owned())
                } else {
                    Ok(calls)
                };
                async move { answer }
            },
        )
        .await;
        assert_eq!(result, Ok(Some(3)));
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(300),
            "100 + 200 ms"
        );

        let refused: Result<Option<u32>, String> = run_with_retries(
            "test",
            Backoff::COMMANDS,
            &shutdown,
            |e: &String| e == "busy",
            || async { Err("conflict".to_owned()) },
        )
        .await;
        assert_eq!(refused, Err("conflict".to_owned()));

        shutdown.cancel();
        let stopped: Result<Option<u32>, String> = run_with_retries(
            "test",
            Backoff::COMMANDS,
            &shutdown,
            |_| true,
            || async { Err("busy".to_owned()) },
        )
        .await;
        assert_eq!(stopped, Ok(None));
    }
}
