//! Keeps this router in step with what any router or operator changed in
//! Redis: the catalog (a destination created, changed or deleted) and the
//! paused set, each interval, so a change reaches every router within one.
//! It runs as a task of its own, so nothing else (measuring the overview,
//! serving the admin API) can stop the router following the catalog.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use protocol::Keys;
use protocol::RedisConnection;
use telemetry::lifecycle::Ticks;
use tokio_util::sync::CancellationToken;

use crate::control::catalog::Catalog;
use crate::control::registry::Registry;

/// Applies the catalog and the paused set to this router's registry.
pub struct Follower {
    con: RedisConnection,
    keys: Keys,
    registry: Arc<Registry>,
    catalog: Catalog,
}

impl Follower {
    pub fn new(
        con: RedisConnection,
        keys: Keys,
        registry: Arc<Registry>,
        catalog: Catalog,
    ) -> Self {
        Self {
            con,
            keys,
            registry,
            catalog,
        }
    }

    /// Reads which destinations are paused and applies it to this router.
    pub async fn apply_paused(&mut self) -> redis::RedisResult<()> {
        let destinations = self.registry.destinations();
        let tokens: Vec<u64> = destinations.iter().map(|d| d.pause_token()).collect();
        let paused: HashSet<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.paused())
            .query_async(&mut self.con)
            .await?;
        for (destination, token) in destinations.iter().zip(tokens) {
            destination.apply_paused(paused.contains(&destination.name), token);
        }
        Ok(())
    }

    /// Every `every` until `shutdown`: the catalog first (so a destination
    /// just created gets its pause too), then the paused set.
    pub async fn run(mut self, every: Duration, shutdown: CancellationToken) {
        let mut ticks = Ticks::new(every);
        while ticks.next(&shutdown).await {
            if let Err(error) = self.registry.follow(&self.catalog).await {
                tracing::warn!(%error, "Cannot read the destinations' definitions; will retry.");
            }
            if let Err(error) = self.apply_paused().await {
                tracing::debug!(%error, "Cannot read paused destinations; will retry.");
            }
        }
    }
}
