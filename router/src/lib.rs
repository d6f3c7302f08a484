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
//! - [`outbound`]: where deliveries may connect (the SSRF guard).
//! - [`retry`]: the backoff policy.
//! - [`worker`]: the per (shard, destination) loop: reader, dispatcher, lease checks.
//! - [`budget`]: how many entries and bytes a worker holds in memory.
//! - [`parking`]: per-user queues; entries of blocked or hot users parked as ids.
//! - [`job`]: one entry to its terminal outcome (fetch, prepare, attempt, record).
//! - [`stats`]: this router's counters per destination (metrics and admin API).
//! - [`overview`]: measures every destination (lag, pending, dead letters, owners) and applies pauses.
//! - [`dead_letters`]: listing, replaying and deleting dead letters.
//! - [`admin`]: the admin listener: API, [`status_page`] and `/metrics`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod budget;
pub mod config;
pub mod consumer;
pub mod coordinator;
pub mod dead_letters;
pub mod delivery;
pub mod job;
pub mod lease;
pub mod outbound;
pub mod overview;
pub mod parking;
pub mod retention;
pub mod retry;
pub mod stats;
pub mod status_page;
pub mod worker;

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use protocol::RedisConnection;
use protocol::{run_with_retries, Backoff, Keys, RedisConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use admin::AdminState;
pub use config::Config;
use consumer::GroupConsumer;
use coordinator::{Coordinator, StartWorker};
use delivery::Destination;
use lease::{LeaseGuard, LeaseId, LeaseStore};
use overview::{Observer, Overview, SharedOverview};
use worker::WorkerSettings;

/// Delivers until `shutdown` is cancelled, then stops reading, lets
/// in-flight attempts finish within the grace period, releases its leases
/// and returns. The status page, admin API and metrics are served on
/// `admin_listener`.
pub async fn run(
    config: Config,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Installed before the first delivery so no count is lost.
    telemetry::metrics();
    let keys = Keys::new(config.redis.key_prefix.clone());
    let Some(commands) = connect(&config.redis, &shutdown, Connection::Commands).await? else {
        return Ok(());
    };
    let prepare = || {
        let mut con = commands.clone();
        let (keys, config) = (&keys, &config);
        async move { prepare_redis(&mut con, keys, config).await }
    };
    let prepared = run_with_retries(
        "Redis not ready for start-up",
        Backoff::STARTUP,
        &shutdown,
        protocol::MetaError::is_transient,
        prepare,
    )
    .await
    .context("refusing to start")?;
    if prepared.is_none() {
        return Ok(());
    }
    let mut command_connections = vec![commands];
    while command_connections.len() < config.redis.connections {
        let Some(connection) = connect(&config.redis, &shutdown, Connection::Commands).await?
        else {
            return Ok(());
        };
        command_connections.push(connection);
    }

    // Its own connection, so a large replay does not delay acknowledgements.
    let Some(admin_connection) = connect(&config.redis, &shutdown, Connection::Commands).await?
    else {
        return Ok(());
    };

    let policy = outbound::Policy::new(&config.outbound).map_err(anyhow::Error::msg)?;
    let configured: Vec<Arc<Destination>> = config
        .destinations
        .iter()
        .map(|d| Destination::new(d, &policy).map(Arc::new))
        .collect::<Result<_, _>>()
        .context("cannot build HTTP clients")?;
    let destinations: HashMap<String, Arc<Destination>> = configured
        .iter()
        .map(|d| (d.name.clone(), d.clone()))
        .collect();
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
            max_bytes: config.reader.max_bytes_per_worker(config.redis.shards),
            max_queued_per_user: config.reader.max_queued_per_user,
            shutdown_grace: config.shutdown_grace(),
        },
    };
    let leases = LeaseStore::new(
        command_connections[0].clone(),
        keys.clone(),
        instance.clone(),
        config.lease.ttl(),
    );
    let mut observer = Observer::new(
        admin_connection.clone(),
        keys.clone(),
        config.redis.shards,
        instance.clone(),
        configured.clone(),
    );
    // Before any worker starts, so a paused destination sends nothing.
    if let Err(error) = observer.apply_paused().await {
        tracing::warn!(%error, "Cannot read paused destinations yet; will retry.");
    }
    let first = observer.measure().await.unwrap_or_else(|_| Overview {
        sequence: 0,
        measured_at_ms: 0,
        instance: instance.clone(),
        shards: config.redis.shards,
        destinations: Vec::new(),
    });
    let overview: SharedOverview = Arc::new(Mutex::new(first));
    let observing = tokio::spawn(overview::run(
        observer,
        overview.clone(),
        config.admin.overview_interval(),
        shutdown.clone(),
    ));
    let admin_state = AdminState {
        keys: keys.clone(),
        shards: config.redis.shards,
        con: admin_connection,
        destinations: configured,
        overview,
        access: admin::Access::new(&config.admin),
    };
    if !config.admin.require_token {
        tracing::warn!(
            "ADMIN AUTHENTICATION IS OFF (admin.require_token = false): anyone who can reach \
             the admin listener can replay, delete and pause. Use this for local demos only."
        );
    }
    let admin_server = tokio::spawn(admin::serve(admin_state, admin_listener, shutdown.clone()));

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
    let _ = observing.await;
    if let Ok(Err(error)) = admin_server.await {
        tracing::warn!(%error, "Admin server failed.");
    }
    tracing::info!("Router stopped; leases released.");
    Ok(())
}

/// Everything a (shard, destination) worker needs.
struct Workers {
    redis: RedisConfig,
    keys: Keys,
    consumer_name: String,
    destinations: HashMap<String, Arc<Destination>>,
    command_connections: Vec<RedisConnection>,
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
            let purpose = Connection::BlockingReads(settings.read_span);
            let Ok(Some(blocking)) = connect(&redis, &stop, purpose).await else {
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

/// Checks Redis and the recorded shard count, publishes the destination
/// names, and creates every configured destination's group on every shard
/// (at the start of the stream) unless it exists. Groups are created before
/// any trimming: a destination without its group would miss whatever is
/// trimmed before the group exists.
async fn prepare_redis(
    con: &mut RedisConnection,
    keys: &Keys,
    config: &Config,
) -> Result<(), protocol::MetaError> {
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
        .connect(config.redis.timeout())
        .await
        .context("cannot connect to Redis")?;
    consumer::destroy_groups(&mut con, &keys, config.redis.shards, name)
        .await
        .context("cannot delete the consumer groups")
}

/// Publishes the configured destination names, which the gateway checks
/// per-event destination filters against.
async fn register_destinations(
    con: &mut RedisConnection,
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

/// What a connection is for.
#[derive(Debug, Clone, Copy)]
enum Connection {
    /// Ordinary commands, answered within `redis.timeout_ms`.
    Commands,
    /// One worker's blocking reads, whose replies may take this long.
    BlockingReads(Duration),
}

/// Connects, waiting for Redis while it is unreachable (it may still be
/// starting); `None` if shutdown came first.
async fn connect(
    redis: &RedisConfig,
    shutdown: &CancellationToken,
    purpose: Connection,
) -> anyhow::Result<Option<RedisConnection>> {
    let what = format!("Redis unreachable at {}", redis.redacted_url());
    let connect = || async move {
        match purpose {
            Connection::Commands => redis.connect(redis.timeout()).await,
            Connection::BlockingReads(span) => redis.connect_for_blocking_reads(span).await,
        }
    };
    Ok(run_with_retries(&what, Backoff::STARTUP, shutdown, |_| true, connect).await?)
}
