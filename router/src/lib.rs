//! The router: delivers every event of every shard stream to every
//! configured destination, retrying failures with doubling delays and
//! dead-lettering what cannot be delivered, per user in order.
//!
//! # Layout
//! - [`config`]: settings and their defaults.
//! - [`consumer`]: one destination's consumer group on one shard (XREADGROUP, XACK, dead letters).
//! - [`delivery`]: one HTTP attempt and what its answer means.
//! - [`retry`]: the backoff policy.
//! - [`worker`]: the per (shard, destination) loop: window, per-user order, shutdown.
#![forbid(unsafe_code)]

pub mod config;
pub mod consumer;
pub mod delivery;
pub mod retry;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use protocol::Keys;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
use consumer::GroupConsumer;
use delivery::Destination;
use worker::WorkerSettings;

/// Delivers until `shutdown` is cancelled, then stops reading, lets
/// in-flight attempts finish within the grace period and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let keys = Keys::new(config.redis.key_prefix.clone());
    let Some(mut commands) = connect(&config, &shutdown, Some(config.redis.timeout())).await?
    else {
        return Ok(());
    };
    protocol::ensure_shard_count(&mut commands, &keys, config.redis.shards)
        .await
        .context("refusing to start")?;
    register_destinations(&mut commands, &keys, &config).await?;
    let mut command_connections = vec![commands];
    while command_connections.len() < config.redis.connections {
        let Some(connection) = connect(&config, &shutdown, Some(config.redis.timeout())).await?
        else {
            return Ok(());
        };
        command_connections.push(connection);
    }

    let destinations = config
        .destinations
        .iter()
        .map(|d| Destination::new(d).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()
        .context("cannot build HTTP clients")?;
    let block = Duration::from_millis(config.reader.block_ms);
    // A blocking read's reply may take the whole block time, plus the usual margin.
    let blocking_timeout = block + config.redis.timeout();
    let tracker = TaskTracker::new();
    let mut workers = 0;
    for destination in &destinations {
        for shard in 0..config.redis.shards {
            let Some(blocking) = connect(&config, &shutdown, Some(blocking_timeout)).await? else {
                return Ok(());
            };
            let commands =
                command_connections[usize::from(shard) % command_connections.len()].clone();
            let consumer = GroupConsumer::new(
                &keys,
                shard,
                &destination.name,
                &config.consumer_name,
                blocking,
                commands,
            );
            let settings = WorkerSettings {
                batch_size: config.reader.batch_size,
                block,
                window: config.reader.window,
                shutdown_grace: config.shutdown_grace(),
            };
            tracker.spawn(worker::run(
                consumer,
                destination.clone(),
                settings,
                shutdown.clone(),
            ));
            workers += 1;
        }
    }
    tracing::info!(
        workers,
        destinations = destinations.len(),
        shards = config.redis.shards,
        consumer = %config.consumer_name,
        "Router delivering."
    );
    tracker.close();
    shutdown.cancelled().await;
    tracing::info!("Router shutting down: finishing in-flight attempts.");
    tracker.wait().await;
    Ok(())
}

/// Publishes the configured destination names, which the gateway checks
/// per-event destination filters against.
async fn register_destinations(
    con: &mut ConnectionManager,
    keys: &Keys,
    config: &Config,
) -> anyhow::Result<()> {
    let mut pipe = redis::pipe();
    pipe.atomic().del(keys.destinations());
    for destination in &config.destinations {
        pipe.sadd(keys.destinations(), &destination.name);
    }
    let _: redis::Value = pipe
        .query_async(con)
        .await
        .context("cannot register destinations")?;
    Ok(())
}

/// Connects, waiting for Redis while it is unreachable (it may still be
/// starting); `None` if shutdown came first.
async fn connect(
    config: &Config,
    shutdown: &CancellationToken,
    response_timeout: Option<Duration>,
) -> anyhow::Result<Option<ConnectionManager>> {
    loop {
        match config.redis.connect(response_timeout).await {
            Ok(connection) => return Ok(Some(connection)),
            Err(error) => {
                tracing::warn!(%error, url = %config.redis.url, "Redis unreachable; retrying.")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
