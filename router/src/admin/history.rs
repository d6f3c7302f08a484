//! The delivery history the console charts, kept in Redis so that it spans
//! every router and outlives restarts (docs/decisions/0006-console-history.md).
//! Each router adds the minutes it tallied ([`crate::destination::history`])
//! every few seconds into one hash per (destination, hour); a key expires a
//! day after its hour. Minutes that cannot be stored are put back and go
//! with the next flush, so a Redis outage delays the history but loses none
//! of it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use protocol::{Keys, RedisConnection};
use telemetry::lifecycle::Ticks;
use tokio_util::sync::CancellationToken;

use crate::control::registry::Registry;
use crate::destination::history::{minute_of, Minute, Minutes, Tally};

/// How long a minute is kept: a day.
const RETENTION_HOURS: u64 = 24;

/// How often a router adds its minutes.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// The history in Redis.
#[derive(Clone)]
pub struct HistoryStore {
    pub con: RedisConnection,
    pub keys: Keys,
}

fn hour_of(minute: Minute) -> u64 {
    minute / 60
}

impl HistoryStore {
    /// Adds `minutes` of `destination`: per hour, one transaction on one key.
    pub async fn add(&self, destination: &str, minutes: &Minutes) -> redis::RedisResult<()> {
        let mut by_hour: BTreeMap<u64, Vec<(String, u64)>> = BTreeMap::new();
        for (minute, tally) in minutes {
            by_hour
                .entry(hour_of(*minute))
                .or_default()
                .extend(tally.fields(*minute));
        }
        let mut con = self.con.clone();
        for (hour, fields) in by_hour.into_iter().filter(|(_, f)| !f.is_empty()) {
            let key = self.keys.history(destination, hour);
            let mut pipe = redis::pipe();
            pipe.atomic();
            for (field, count) in fields {
                pipe.hincr(&key, field, count).ignore();
            }
            let expires_at = (hour + 1 + RETENTION_HOURS) * 3600;
            pipe.cmd("EXPIREAT").arg(&key).arg(expires_at).ignore();
            pipe.query_async::<()>(&mut con).await?;
        }
        Ok(())
    }

    /// The last `span` minutes of `destination` up to `now_ms`, every router's
    /// counts added; minutes without any are absent.
    pub async fn read(
        &self,
        destination: &str,
        now_ms: u64,
        span: u64,
    ) -> redis::RedisResult<Minutes> {
        let last = minute_of(now_ms);
        let first = last.saturating_sub(span.saturating_sub(1));
        let mut con = self.con.clone();
        let mut minutes = Minutes::new();
        for hour in hour_of(first)..=hour_of(last) {
            let fields: Vec<(String, u64)> = redis::cmd("HGETALL")
                .arg(self.keys.history(destination, hour))
                .query_async(&mut con)
                .await?;
            for (field, count) in fields {
                Tally::add_field(&mut minutes, &field, count);
            }
        }
        minutes.retain(|minute, _| (first..=last).contains(minute));
        Ok(minutes)
    }

    /// Deletes `destination`'s history (it was deleted; a destination
    /// created later under its name starts without it).
    pub async fn forget(&self, destination: &str, now_ms: u64) -> redis::RedisResult<()> {
        let now = hour_of(minute_of(now_ms));
        let mut con = self.con.clone();
        for hour in now.saturating_sub(RETENTION_HOURS)..=now {
            let _: i64 = redis::cmd("DEL")
                .arg(self.keys.history(destination, hour))
                .query_async(&mut con)
                .await?;
        }
        Ok(())
    }
}

/// Adds every destination's new minutes; those that cannot be stored go
/// back to be tried with the next flush. Destinations fail independently.
pub async fn flush(store: &HistoryStore, registry: &Registry) {
    let known = registry.known();
    let flushes = known.iter().map(|known| async move {
        let stats = &known.destination.stats;
        let minutes = stats.take_history();
        if minutes.is_empty() {
            return;
        }
        if let Err(error) = store.add(&known.destination.name, &minutes).await {
            tracing::debug!(%error, destination = %known.destination.name, "History not stored yet; kept for the next flush.");
            stats.return_history(minutes);
        }
    });
    join_all(flushes).await;
}

/// Flushes every [`FLUSH_EVERY`] until `shutdown` (the router flushes once
/// more after its last attempt).
pub async fn run(store: HistoryStore, registry: Arc<Registry>, shutdown: CancellationToken) {
    let mut ticks = Ticks::new(FLUSH_EVERY);
    while ticks.next(&shutdown).await {
        flush(&store, &registry).await;
    }
}
