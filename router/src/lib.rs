//! The router: delivers every event of every shard stream to every
//! configured destination, retrying failures with doubling delays and
//! dead-lettering what cannot be delivered, per user in order.
//!
//! # Layout
//! - [`config`]: settings and their defaults.
//! - [`consumer`]: one destination's consumer group on one shard (XREADGROUP, XACK, dead letters).
//! - [`lease`]: exclusive (shard, destination) ownership and how it is split among routers.
//! - [`coordinator`]: acquires, renews, hands over and releases leases; starts and stops workers.
//! - [`retention`]: trims shard streams below what every destination still needs.
//! - [`delivery`]: one HTTP attempt and what its answer means.
//! - [`retry`]: the backoff policy.
//! - [`worker`]: the per (shard, destination) loop: window, per-user order, lease checks.
#![forbid(unsafe_code)]

pub mod config;
pub mod consumer;
pub mod coordinator;
pub mod delivery;
pub mod lease;
pub mod retention;
pub mod retry;
pub mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use protocol::{Keys, RedisConfig};
use redis::aio::ConnectionManager;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use consumer::GroupConsumer;
use coordinator::{Coordinator, StartWorker};
use delivery::Destination;
use lease::{LeaseGuard, LeaseId, LeaseStore};
use worker::WorkerSettings;

/// Delivers until `shutdown` is cancelled, then stops reading, lets
/// in-flight attempts finish within the grace period, releases its leases
/// and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let keys = Keys::new(config.redis.key_prefix.clone());
    let Some(mut commands) =
        connect(&config.redis, &shutdown, Some(config.redis.timeout())).await?
    else {
        return Ok(());
    };
    loop {
        match prepare_redis(&mut commands, &keys, &config).await {
            Ok(()) => break,
            Err(error) if error.is_transient() => {
                tracing::warn!(%error, "Redis not ready for start-up; retrying.");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err(error) => return Err(error).context("refusing to start"),
        }
    }
    let mut command_connections = vec![commands];
    while command_connections.len() < config.redis.connections {
        let Some(connection) =
            connect(&config.redis, &shutdown, Some(config.redis.timeout())).await?
        else {
            return Ok(());
        };
        command_connections.push(connection);
    }

    let destinations = config
        .destinations
        .iter()
        .map(|d| Destination::new(d).map(|d| (d.name.clone(), Arc::new(d))))
        .collect::<Result<HashMap<_, _>, _>>()
        .context("cannot build HTTP clients")?;
    let block = Duration::from_millis(config.reader.block_ms);
    let consumer_name = config.consumer_name();
    let instance = format!("{consumer_name}#{:08x}", fastrand::u32(..));
    let pairs: Vec<LeaseId> = (0..config.redis.shards)
        .flat_map(|shard| {
            config.destinations.iter().map(move |d| LeaseId {
                shard,
                destination: d.name.clone(),
            })
        })
        .collect();
    let pair_count = pairs.len();
    let workers = Workers {
        redis: config.redis.clone(),
        keys: keys.clone(),
        consumer_name: consumer_name.clone(),
        destinations,
        command_connections: command_connections.clone(),
        settings: WorkerSettings {
            batch_size: config.reader.batch_size,
            block,
            // A blocking read's reply may take the whole block time, plus the usual margin.
            read_span: block + config.redis.timeout(),
            window: config.reader.window,
            shutdown_grace: config.shutdown_grace(),
        },
    };
    let leases = LeaseStore::new(
        command_connections[0].clone(),
        keys.clone(),
        instance.clone(),
        config.lease.ttl(),
    );
    let trimmer = tokio::spawn(retention::run(
        command_connections[command_connections.len() - 1].clone(),
        keys,
        config.redis.shards,
        config.destinations.iter().map(|d| d.name.clone()).collect(),
        Duration::from_millis(config.retention.trim_interval_ms),
        shutdown.clone(),
    ));
    tracing::info!(
        pairs = pair_count,
        destinations = config.destinations.len(),
        shards = config.redis.shards,
        consumer = %consumer_name,
        %instance,
        "Router started; acquiring its share of the (shard, destination) leases."
    );
    Coordinator::new(leases, config.lease, pairs, workers)
        .run(shutdown.clone())
        .await;
    let _ = trimmer.await;
    tracing::info!("Router stopped; leases released.");
    Ok(())
}

/// Everything a (shard, destination) worker needs.
struct Workers {
    redis: RedisConfig,
    keys: Keys,
    consumer_name: String,
    destinations: HashMap<String, Arc<Destination>>,
    command_connections: Vec<ConnectionManager>,
    settings: WorkerSettings,
}

impl StartWorker for Workers {
    fn start(&self, lease: &LeaseId, guard: LeaseGuard, stop: CancellationToken) -> JoinHandle<()> {
        let redis = self.redis.clone();
        let keys = self.keys.clone();
        let consumer_name = self.consumer_name.clone();
        let destination = self.destinations[&lease.destination].clone();
        let commands = self.command_connections
            [usize::from(lease.shard) % self.command_connections.len()]
        .clone();
        let settings = self.settings;
        let shard = lease.shard;
        tokio::spawn(async move {
            let blocking_timeout = Some(settings.read_span);
            let Ok(Some(blocking)) = connect(&redis, &stop, blocking_timeout).await else {
                return;
            };
            let consumer = GroupConsumer::new(
                &keys,
                shard,
                &destination.name,
                &consumer_name,
                blocking,
                commands,
            );
            worker::run(consumer, destination, settings, guard, stop).await;
        })
    }
}

#[derive(Debug, thiserror::Error)]
enum StartupError {
    #[error(transparent)]
    Meta(#[from] protocol::MetaError),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl StartupError {
    /// Redis is unreachable or failing, as opposed to a configuration
    /// conflict that waiting cannot fix.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            StartupError::Redis(_) | StartupError::Meta(protocol::MetaError::Redis(_))
        )
    }
}

/// Checks Redis and the recorded shard count, publishes the destination
/// names, and creates every configured destination's group on every shard
/// (at the start of the stream) unless it exists. Groups are created before
/// any trimming: a destination without its group would miss whatever is
/// trimmed before the group exists.
async fn prepare_redis(
    con: &mut ConnectionManager,
    keys: &Keys,
    config: &Config,
) -> Result<(), StartupError> {
    protocol::ensure_shard_count(con, keys, config.redis.shards).await?;
    protocol::check_persistence(con, config.redis.allow_unsafe_persistence).await?;
    register_destinations(con, keys, config).await?;
    for shard in 0..config.redis.shards {
        for destination in &config.destinations {
            consumer::create_group(con, &keys.events(shard), &destination.name).await?;
        }
    }
    Ok(())
}

/// Deletes the consumer groups (and leases) of a destination that is no
/// longer configured, on every shard, so they stop holding back trimming.
/// Its dead-letter streams are kept. Returns on how many shards a group was
/// deleted.
pub async fn remove_destination(config: &Config, name: &str) -> anyhow::Result<u16> {
    if config.destinations.iter().any(|d| d.name == name) {
        anyhow::bail!(
            "destination `{name}` is still configured; remove it from the config and restart \
             the routers first"
        );
    }
    let keys = Keys::new(config.redis.key_prefix.clone());
    let mut con = config
        .redis
        .connect(Some(config.redis.timeout()))
        .await
        .context("cannot connect to Redis")?;
    let mut removed = 0;
    for shard in 0..config.redis.shards {
        let destroyed: i64 = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(keys.events(shard))
            .arg(name)
            .query_async(&mut con)
            .await
            .or_else(|e| {
                // No stream on this shard yet: nothing to delete.
                if e.to_string().contains("requires the key to exist") {
                    Ok(0)
                } else {
                    Err(e)
                }
            })
            .with_context(|| format!("cannot delete the group on shard {shard}"))?;
        let _: i64 = redis::cmd("DEL")
            .arg(keys.lease(shard, name))
            .query_async(&mut con)
            .await?;
        if destroyed > 0 {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Publishes the configured destination names, which the gateway checks
/// per-event destination filters against.
async fn register_destinations(
    con: &mut ConnectionManager,
    keys: &Keys,
    config: &Config,
) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    pipe.atomic().del(keys.destinations());
    for destination in &config.destinations {
        pipe.sadd(keys.destinations(), &destination.name);
    }
    let _: redis::Value = pipe.query_async(con).await?;
    Ok(())
}

/// Connects, waiting for Redis while it is unreachable (it may still be
/// starting); `None` if shutdown came first.
async fn connect(
    redis: &RedisConfig,
    shutdown: &CancellationToken,
    response_timeout: Option<Duration>,
) -> anyhow::Result<Option<ConnectionManager>> {
    loop {
        match redis.connect(response_timeout).await {
            Ok(connection) => return Ok(Some(connection)),
            Err(error) => {
                tracing::warn!(%error, url = %redis.url, "Redis unreachable; retrying.")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
