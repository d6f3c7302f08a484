//! The idioms every service loop shares: ticking until shutdown, serving
//! HTTP until shutdown, and the `/metrics` endpoint.

use std::time::Duration;

use actix_web::dev::Server;
use actix_web::HttpResponse;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// A periodic task's clock: the first tick at once, then every `every`;
/// a tick that comes late (the work took longer) delays the next ones
/// instead of bunching them up.
pub struct Ticks {
    interval: Interval,
}

impl Ticks {
    pub fn new(every: Duration) -> Self {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self { interval }
    }

    /// Waits for the next tick; false once `shutdown` is cancelled.
    pub async fn next(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = shutdown.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}

/// What happens to requests in flight when shutdown begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnShutdown {
    /// Stop accepting, let requests in flight finish (up to the server's
    /// shutdown timeout).
    Finish,
    /// Stop at once.
    Drop,
}

/// Runs `server` (built with `disable_signals`, since the process has its
/// own shutdown token) until it fails or `shutdown` is cancelled.
pub async fn serve_until(
    server: Server,
    shutdown: CancellationToken,
    on_shutdown: OnShutdown,
) -> std::io::Result<()> {
    let handle = server.handle();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        if on_shutdown == OnShutdown::Finish {
            tracing::info!("Shutting down: finishing requests in flight.");
        }
        handle.stop(on_shutdown == OnShutdown::Finish).await;
    });
    server.await
}

/// `GET /metrics`: the process's metrics in the Prometheus text format.
pub async fn metrics_endpoint() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::metrics().render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ticks_come_at_once_then_every_interval_until_shutdown() {
        let shutdown = CancellationToken::new();
        let mut ticks = Ticks::new(Duration::from_secs(10));
        let started = tokio::time::Instant::now();
        assert!(ticks.next(&shutdown).await);
        assert_eq!(started.elapsed(), Duration::ZERO, "the first at once");
        assert!(ticks.next(&shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(ticks.next(&shutdown).await, "a late tick comes at once");
        assert!(ticks.next(&shutdown).await);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(45),
            "and delays the next, not bunching them"
        );
        shutdown.cancel();
        assert!(!ticks.next(&shutdown).await);
    }
}
