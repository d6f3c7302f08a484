//! How fast attempts may go to one destination from this router: its
//! `rate_limit_per_sec`, and the pauses its 429 answers ask for.
//!
//! **The rate** is shared by the routers in proportion to the shards they
//! deliver: a router holding `k` of the `n` shards' leases sends at most
//! `rate × k / n` attempts per second, spaced evenly (no bursts). The
//! routers' shares add up to the rate whenever the leases are dealt, with
//! no Redis round trip per attempt; during a hand-over the old and new
//! owner of a shard may both count it for up to a lease-renewal interval.
//!
//! **A 429 with `Retry-After`** holds every attempt to the destination on
//! this router for that long (capped by the retry policy's `max_delay_ms`),
//! not only the event that got it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

struct Schedule {
    /// When the next attempt may start (the rate's spacing).
    next_slot: Instant,
    /// No attempt starts before this (a 429's Retry-After).
    held_until: Instant,
}

pub struct Throttle {
    rate_per_sec: Mutex<Option<u32>>,
    shards: usize,
    /// Shards of the destination this router delivers now.
    shards_held: AtomicUsize,
    schedule: Mutex<Schedule>,
}

impl Throttle {
    pub fn new(rate_per_sec: Option<u32>, shards: u16) -> Self {
        let now = Instant::now();
        Self {
            rate_per_sec: Mutex::new(rate_per_sec),
            shards: usize::from(shards.max(1)),
            shards_held: AtomicUsize::new(0),
            schedule: Mutex::new(Schedule {
                next_slot: now,
                held_until: now,
            }),
        }
    }

    pub fn set_rate(&self, rate_per_sec: Option<u32>) {
        *protocol::sync::lock(&self.rate_per_sec) = rate_per_sec;
    }

    /// A worker of the destination started (+1) or ended (-1) here.
    pub fn shard_held(&self) -> ShardHeld<'_> {
        self.shards_held.fetch_add(1, Ordering::SeqCst);
        ShardHeld(self)
    }

    /// Holds every attempt until `duration` from now.
    pub fn hold_for(&self, duration: Duration) {
        let mut schedule = protocol::sync::lock(&self.schedule);
        schedule.held_until = schedule.held_until.max(Instant::now() + duration);
    }

    /// The spacing between this router's attempts, if limited.
    fn spacing(&self) -> Option<Duration> {
        let rate = (*protocol::sync::lock(&self.rate_per_sec))?;
        let held = self.shards_held.load(Ordering::SeqCst).max(1);
        // rate × held / shards attempts per second.
        Some(Duration::from_secs_f64(
            self.shards as f64 / (f64::from(rate) * held as f64),
        ))
    }

    /// Waits for this attempt's turn; false at shutdown (the turn is given
    /// back only by time passing, which is harmless).
    pub async fn wait_turn(&self, shutdown: &CancellationToken) -> bool {
        let start = {
            let mut schedule = protocol::sync::lock(&self.schedule);
            let now = Instant::now();
            let mut start = now.max(schedule.held_until);
            if let Some(spacing) = self.spacing() {
                start = start.max(schedule.next_slot);
                schedule.next_slot = start + spacing;
            }
            start
        };
        if start <= Instant::now() {
            return true;
        }
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep_until(start) => true,
        }
    }
}

/// Counts a shard as held while it lives.
pub struct ShardHeld<'a>(&'a Throttle);

impl Drop for ShardHeld<'_> {
    fn drop(&mut self) {
        self.0.shards_held.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn attempts_are_spaced_by_the_share_of_shards_held() {
        let throttle = Throttle::new(Some(200), 8);
        let shutdown = CancellationToken::new();
        let _four = [(); 4].map(|()| throttle.shard_held());
        // 4 of 8 shards: 100 attempts per second, 10 ms apart.
        let started = Instant::now();
        for _ in 0..101 {
            assert!(throttle.wait_turn(&shutdown).await);
        }
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_stops_every_attempt_for_its_duration() {
        let throttle = Throttle::new(None, 8);
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        assert!(throttle.wait_turn(&shutdown).await);
        assert_eq!(started.elapsed(), Duration::ZERO, "no limit, no wait");
        throttle.hold_for(Duration::from_secs(2));
        assert!(throttle.wait_turn(&shutdown).await);
        assert!(throttle.wait_turn(&shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }
}
