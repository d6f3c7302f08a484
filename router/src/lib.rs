//! The router: delivers every event of every shard stream to every
//! configured destination, retrying failures with doubling delays and
//! dead-lettering what cannot be delivered, per user in order.
//!
//! # Layout
//! Folders by role, each with a Layout list of its own. A module imports
//! only from its own folder or from those listed above it (a test checks
//! both levels), from the settings up to the admin listener:
//! - [`outbound`]: where deliveries may connect (the SSRF guard).
//! - [`config`]: settings and their defaults.
//! - [`destination`]: a destination at runtime: one HTTP attempt, retry, breaker, throttle, stats, traces.
//! - [`control`]: the catalog and the router following it, leases, the registry, the coordinator and trimming.
//! - [`worker`]: the routing stage and the per (shard, destination) reader, dispatcher and jobs.
//! - [`admin`]: what the admin listener shows and changes: the API, `/metrics`, the overview, the history.
//! - [`console`]: the console's pages and forms, over the admin API's operations.
//! - [`listener`]: the admin listener: console, API and metrics behind the admin token.
#![forbid(unsafe_code)]

pub(crate) mod admin;
pub mod config;
pub(crate) mod console;
pub(crate) mod control;
pub(crate) mod destination;
pub(crate) mod listener;
pub(crate) mod outbound;
pub(crate) mod worker;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use protocol::RedisConnection;
use protocol::{run_with_retries, Backoff, Keys, RedisConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use admin::destinations::DestinationDoc;
use admin::overview::{Observer, Overview, Overviews, SharedOverview};
use admin::routes::AdminState;
pub use config::Config;
use control::catalog::{Applied, Catalog, CatalogError};
use control::coordinator::{Coordinator, StartWorker};
use control::follower::Follower;
use control::lease::{LeaseGuard, LeaseId, LeaseStore};
use control::registry::Registry;
use control::retention::{RoutedHere, Trimming};
use worker::consumer::{Connections, GroupConsumer};
use worker::pair::WorkerSettings;
use worker::wakeup::{OwnReaders, Wakeups, Watched};

/// Delivers until `shutdown` is cancelled, then stops reading, lets
/// in-flight attempts finish within the grace period, releases its leases
/// and returns. The console, admin API and metrics are served on
/// `admin_listener`.
pub async fn run(
    config: Config,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Installed before the first delivery so no count is lost.
    telemetry::metrics();
    match Router::build(config, &shutdown).await {
        Ok(router) => {
            router.run(admin_listener, shutdown).await;
            Ok(())
        }
        // Shutdown came while it was still waiting for Redis.
        Err(NotStarted::Stopped) => Ok(()),
        Err(NotStarted::Failed(error)) => Err(error),
    }
}

/// Why a router did not start.
enum NotStarted {
    /// Shutdown came first.
    Stopped,
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for NotStarted {
    fn from(error: anyhow::Error) -> Self {
        NotStarted::Failed(error)
    }
}

/// `Stopped` for what a retry loop gave up on at shutdown.
fn unless_stopped<T>(done: Option<T>) -> Result<T, NotStarted> {
    done.ok_or(NotStarted::Stopped)
}

/// A router connected to a prepared Redis, following the catalog, ready to
/// take its share of the leases.
struct Router {
    config: Config,
    keys: Keys,
    /// Names its consumers in every group.
    consumer_name: String,
    /// This run of it: its leases' holder.
    instance: String,
    command_connections: Vec<RedisConnection>,
    /// Its own connection, so a large replay does not delay acknowledgements.
    admin_connection: RedisConnection,
    policy: outbound::Policy,
    catalog: Catalog,
    registry: Arc<Registry>,
    /// The shards whose routing stage runs here, which this router trims.
    routed_here: RoutedHere,
}

impl Router {
    /// Connects (waiting for Redis while it is unreachable), checks and
    /// prepares Redis, applies the configured destinations and reads the
    /// catalog.
    async fn build(config: Config, shutdown: &CancellationToken) -> Result<Self, NotStarted> {
        let keys = Keys::new(config.redis.key_prefix.clone());
        let commands =
            unless_stopped(connect(&config.redis, shutdown, Connection::Commands).await?)?;
        let prepare = || {
            let mut con = commands.clone();
            let (keys, config) = (&keys, &config);
            async move { prepare_redis(&mut con, keys, config).await }
        };
        let prepared = run_with_retries(
            "Redis not ready for start-up",
            Backoff::STARTUP,
            shutdown,
            protocol::MetaError::is_transient,
            prepare,
        )
        .await
        .context("refusing to start")?;
        unless_stopped(prepared)?;
        let mut command_connections = vec![commands];
        while command_connections.len() < config.redis.connections {
            let made = connect(&config.redis, shutdown, Connection::Commands).await?;
            command_connections.push(unless_stopped(made)?);
        }
        let admin_connection =
            unless_stopped(connect(&config.redis, shutdown, Connection::Commands).await?)?;
        let policy = outbound::Policy::new(&config.outbound).map_err(anyhow::Error::msg)?;
        let catalog = Catalog::new(admin_connection.clone(), keys.clone(), config.redis.shards);
        let registry = Arc::new(Registry::new(
            policy.clone(),
            config.redis.shards,
            config.lease.assured_ms(),
        ));
        load_destinations(&config, &catalog, &registry, shutdown).await?;
        let consumer_name = config.consumer_name();
        let instance = format!("{consumer_name}#{:08x}", fastrand::u32(..));
        let routed_here = RoutedHere::new(config.redis.shards);
        Ok(Self {
            config,
            keys,
            consumer_name,
            instance,
            command_connections,
            admin_connection,
            policy,
            catalog,
            registry,
            routed_here,
        })
    }

    /// Runs the background tasks and the coordinator until shutdown.
    async fn run(self, admin_listener: TcpListener, shutdown: CancellationToken) {
        let background = self.spawn_background(admin_listener, &shutdown).await;
        tracing::info!(
            destinations = self.registry.names().len(),
            shards = self.config.redis.shards,
            consumer = %self.consumer_name,
            instance = %self.instance,
            "Router started; acquiring its share of the (shard, destination) leases."
        );
        let leases = LeaseStore::new(
            self.command_connections[0].clone(),
            self.keys.clone(),
            self.instance.clone(),
            self.config.lease.ttl(),
        );
        Coordinator::new(leases, self.config.lease, self.workers(&shutdown))
            .run(shutdown.clone())
            .await;
        // The last attempts' minutes, now that no more come.
        admin::history::flush(&self.history_store(), &self.registry).await;
        for task in background.tasks {
            let _ = task.await;
        }
        if let Ok(Err(error)) = background.admin_server.await {
            tracing::warn!(%error, "Admin server failed.");
        }
        tracing::info!("Router stopped; leases released.");
    }

    fn workers(&self, shutdown: &CancellationToken) -> WorkerStarter {
        let config = &self.config;
        let block = Duration::from_millis(config.reader.block_ms);
        WorkerStarter {
            routed_here: self.routed_here.clone(),
            reads: ReadConnections::new(&config.redis, self.keys.clone()),
            wakeups: Wakeups::new(
                config.redis.clone(),
                self.keys.clone(),
                block,
                shutdown.clone(),
            ),
            own_readers: OwnReaders::new(config.reader.own_connections),
            redis: config.redis.clone(),
            keys: self.keys.clone(),
            consumer_name: self.consumer_name.clone(),
            registry: self.registry.clone(),
            catalog: self.catalog.clone(),
            delivery_log: config.delivery_log,
            command_connections: self.command_connections.clone(),
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
        }
    }

    /// Follows the catalog and pauses, measures the overview, serves the
    /// admin listener and trims, each a task of its own.
    async fn spawn_background(
        &self,
        admin_listener: TcpListener,
        shutdown: &CancellationToken,
    ) -> Background {
        let config = &self.config;
        let mut follower = Follower::new(
            self.admin_connection.clone(),
            self.keys.clone(),
            self.registry.clone(),
            self.catalog.clone(),
        );
        // Before any worker starts, so a paused destination sends nothing.
        if let Err(error) = follower.apply_paused().await {
            tracing::warn!(%error, "Cannot read paused destinations yet; will retry.");
        }
        let following =
            tokio::spawn(follower.run(config.admin.overview_interval(), shutdown.clone()));
        let overview = self.observer();
        let observing = tokio::spawn(admin::overview::run(
            overview.0,
            overview.1.clone(),
            config.admin.overview_interval(),
            shutdown.clone(),
        ));
        let history = tokio::spawn(admin::history::run(
            self.history_store(),
            self.registry.clone(),
            shutdown.clone(),
        ));
        let admin_state = AdminState {
            history: self.history_store(),
            keys: self.keys.clone(),
            shards: config.redis.shards,
            con: self.admin_connection.clone(),
            registry: self.registry.clone(),
            catalog: self.catalog.clone(),
            policy: self.policy.clone(),
            lease: config.lease,
            log_scan_limit: config.delivery_log.cap_per_shard(config.redis.shards),
            overview: overview.1,
            access: admin::routes::Access::new(&config.admin),
        };
        if !config.admin.require_token {
            tracing::warn!(
                "ADMIN AUTHENTICATION IS OFF (admin.require_token = false): anyone who can reach \
                 the admin listener can replay, delete and pause. Use this for local demos only."
            );
        }
        let admin_server = tokio::spawn(listener::serve(
            admin_state,
            admin_listener,
            shutdown.clone(),
        ));
        let trimmer = tokio::spawn(control::retention::run(
            self.command_connections[self.command_connections.len() - 1].clone(),
            self.keys.clone(),
            self.registry.clone(),
            Trimming {
                shards: config.redis.shards,
                routed_here: self.routed_here.clone(),
                log_retention: config
                    .delivery_log
                    .enabled
                    .then(|| config.delivery_log.retention()),
                every: Duration::from_millis(config.retention.trim_interval_ms),
            },
            shutdown.clone(),
        ));
        Background {
            tasks: vec![trimmer, observing, following, history],
            admin_server,
        }
    }

    fn history_store(&self) -> admin::history::HistoryStore {
        admin::history::HistoryStore {
            con: self.admin_connection.clone(),
            keys: self.keys.clone(),
        }
    }

    /// The overview's observer, and the overview it measures on request
    /// (empty until the first request).
    fn observer(&self) -> (Observer, SharedOverview) {
        let observer = Observer::new(
            self.admin_connection.clone(),
            self.keys.clone(),
            self.config.redis.shards,
            self.instance.clone(),
            self.registry.clone(),
            self.config.admin.stall_after(),
        );
        let empty = Overview {
            sequence: 0,
            measured_at_ms: 0,
            instance: self.instance.clone(),
            shards: self.config.redis.shards,
            revision: self.registry.revision(),
            unmeasured_shards: Vec::new(),
            destinations: Vec::new(),
        };
        // A measurement's commands each end within the command timeout; a
        // shard's three round trips follow one another.
        let patience = 3 * Duration::from_millis(self.config.redis.timeout_ms);
        let overviews = Overviews::new(empty, self.config.admin.overview_interval(), patience);
        (observer, Arc::new(overviews))
    }
}

/// The router's tasks beside its workers, awaited at shutdown.
struct Background {
    tasks: Vec<JoinHandle<()>>,
    admin_server: JoinHandle<std::io::Result<()>>,
}

/// Applies the configured destinations to the catalog, then reads it into
/// the registry, waiting while Redis cannot answer.
async fn load_destinations(
    config: &Config,
    catalog: &Catalog,
    registry: &Registry,
    shutdown: &CancellationToken,
) -> Result<(), NotStarted> {
    let seed = || async {
        catalog
            .apply(&config.destinations, config.unlisted_destinations)
            .await
    };
    let applied = run_with_retries(
        "Cannot apply the configured destinations yet",
        Backoff::STARTUP,
        shutdown,
        CatalogError::is_transient,
        seed,
    )
    .await
    .context("cannot apply the configured destinations")?;
    log_applied(&unless_stopped(applied)?);
    let follow = || registry.follow(catalog);
    let followed = run_with_retries(
        "Cannot read the destinations yet",
        Backoff::STARTUP,
        shutdown,
        CatalogError::is_transient,
        follow,
    )
    .await
    .context("cannot read the destinations")?;
    unless_stopped(followed)?;
    Ok(())
}

/// Everything a (shard, destination) worker needs.
struct WorkerStarter {
    reads: Arc<ReadConnections>,
    /// Where a routing stage counts itself while it runs.
    routed_here: RoutedHere,
    wakeups: Wakeups,
    own_readers: OwnReaders,
    redis: RedisConfig,
    keys: Keys,
    consumer_name: String,
    registry: Arc<Registry>,
    catalog: Catalog,
    delivery_log: config::DeliveryLogConfig,
    command_connections: Vec<RedisConnection>,
    settings: WorkerSettings,
}

impl StartWorker for WorkerStarter {
    fn pairs(&self) -> Vec<LeaseId> {
        self.registry.pairs()
    }

    fn generation(&self, destination: &str) -> Option<u64> {
        self.registry.generation(destination)
    }

    fn start(&self, lease: &LeaseId, guard: LeaseGuard, stop: CancellationToken) -> JoinHandle<()> {
        if lease.destination == worker::routing::GROUP {
            return self.start_routing(lease.shard, guard, stop);
        }
        let redis = self.redis.clone();
        let keys = self.keys.clone();
        let consumer_name = self.consumer_name.clone();
        let Some(known) = self.registry.get(&lease.destination) else {
            // Deleted since the pairs were read: nothing to deliver.
            return tokio::spawn(async {});
        };
        let destination = known.destination;
        let routed = known.definition.routed;
        let commands = self.commands(lease.shard);
        let settings = self.settings;
        let catalog = self.catalog.clone();
        let delivery_log = self.delivery_log;
        let shard = lease.shard;
        let shared_reads = self.reads.clone();
        // A reader of references never blocks (its read is a script): it
        // waits for the routing stage's signal.
        let own = (!routed)
            .then(|| self.own_readers.claim(self.registry.pair_count()))
            .flatten();
        let wakeup = match (routed, &own) {
            (true, _) => Some(self.wakeups.of(shard, Watched::Routed(&destination.name))),
            (false, None) => Some(self.wakeups.of(shard, Watched::Events)),
            (false, Some(_)) => None,
        };
        tokio::spawn(async move {
            let reads = match &own {
                Some(_) => {
                    let stream = keys.events(shard);
                    let purpose = Connection::Reads {
                        stream: &stream,
                        span: settings.read_span,
                    };
                    connect(&redis, &stop, purpose).await.ok().flatten()
                }
                None => shared_reads.get(shard, &stop).await,
            };
            let Some(reads) = reads else {
                return;
            };
            let log = delivery_log.enabled.then(|| {
                worker::delivery_log::LogStream::new(
                    keys.delivery_log(shard, &destination.name),
                    delivery_log.cap_per_shard(redis.shards),
                )
            });
            let consumer = GroupConsumer::new(
                &keys,
                shard,
                (&destination.name, routed),
                &consumer_name,
                Connections { reads, commands },
                catalog,
                log,
            );
            worker::pair::run(consumer, destination, wakeup, settings, guard, stop).await;
            // The connection of its own is given back with the worker.
            drop(own);
        })
    }
}

impl WorkerStarter {
    /// The command connection of `shard`'s workers.
    fn commands(&self, shard: u16) -> RedisConnection {
        self.command_connections[usize::from(shard) % self.command_connections.len()].clone()
    }

    /// Starts `shard`'s routing stage ([`routing`]).
    fn start_routing(
        &self,
        shard: u16,
        guard: LeaseGuard,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let commands = self.commands(shard);
        let keys = self.keys.clone();
        let consumer_name = self.consumer_name.clone();
        let catalog = self.catalog.clone();
        let registry = self.registry.clone();
        let shared_reads = self.reads.clone();
        let settings = self.settings;
        let wakeup = self.wakeups.of(shard, Watched::Events);
        // This router trims the shard while it holds its routing lease;
        // the count goes with the task, however it ends.
        let trims_here = self.routed_here.hold(shard);
        tokio::spawn(async move {
            let _trims_here = trims_here;
            let Some(reads) = shared_reads.get(shard, &stop).await else {
                return;
            };
            let consumer = GroupConsumer::new(
                &keys,
                shard,
                (worker::routing::GROUP, false),
                &consumer_name,
                Connections {
                    reads,
                    commands: commands.clone(),
                },
                catalog,
                None,
            );
            let stage = worker::routing::Stage {
                consumer,
                commands,
                keys,
                registry,
                wakeup,
            };
            worker::routing::run(stage, settings, guard, stop).await;
        })
    }
}

/// Checks Redis and the recorded shard count.
async fn prepare_redis(
    con: &mut RedisConnection,
    keys: &Keys,
    config: &Config,
) -> Result<(), protocol::MetaError> {
    protocol::ensure_shard_count(con, keys, config.redis.shards).await?;
    protocol::check_persistence(con, config.redis.allow_unsafe_persistence).await
}

fn log_applied(applied: &Applied) {
    if applied.created.is_empty() && applied.updated.is_empty() && applied.deleted.is_empty() {
        return;
    }
    tracing::info!(
        created = ?applied.created,
        updated = ?applied.updated,
        deleted = ?applied.deleted,
        "Configured destinations applied."
    );
}

/// The catalog of the deployment `config` names, for the `destinations`
/// commands.
pub async fn catalog(config: &Config) -> anyhow::Result<Catalog> {
    let keys = Keys::new(config.redis.key_prefix.clone());
    let con = config
        .redis
        .connect(config.redis.timeout())
        .await
        .context("cannot connect to Redis")?;
    Ok(Catalog::new(con, keys, config.redis.shards))
}

/// What a connection is for.
#[derive(Debug, Clone, Copy)]
enum Connection<'a> {
    /// Ordinary commands, answered within `redis.timeout_ms`.
    Commands,
    /// Group reads of `stream`, which the client never sends twice, whose
    /// replies may take `span`.
    Reads { stream: &'a str, span: Duration },
}

/// The connections for group reads ([`consumer::Connections::reads`]): on
/// a cluster one per shard, to the master of its slot; on a single Redis
/// one for every shard. Each is made when a worker first needs it, so a
/// shard whose node is down holds up no other.
struct ReadConnections {
    redis: RedisConfig,
    keys: Keys,
    cells: Vec<tokio::sync::OnceCell<RedisConnection>>,
}

impl ReadConnections {
    fn new(redis: &RedisConfig, keys: Keys) -> Arc<Self> {
        let count = if redis.is_cluster() { redis.shards } else { 1 };
        Arc::new(Self {
            redis: redis.clone(),
            keys,
            cells: (0..count).map(|_| tokio::sync::OnceCell::new()).collect(),
        })
    }

    /// The connection for `shard`'s reads; `None` if `stop` came first.
    async fn get(&self, shard: u16, stop: &CancellationToken) -> Option<RedisConnection> {
        let cell = &self.cells[usize::from(shard) % self.cells.len()];
        let stream = self.keys.events(shard);
        let made = cell
            .get_or_try_init(|| async {
                let purpose = Connection::Reads {
                    stream: &stream,
                    span: self.redis.timeout(),
                };
                match connect(&self.redis, stop, purpose).await {
                    Ok(Some(connection)) => Ok(connection),
                    // Stopped: whoever asks next makes it.
                    _ => Err(()),
                }
            })
            .await;
        made.ok().cloned()
    }
}

/// Connects, waiting for Redis while it is unreachable (it may still be
/// starting); `None` if shutdown came first.
async fn connect(
    redis: &RedisConfig,
    shutdown: &CancellationToken,
    purpose: Connection<'_>,
) -> anyhow::Result<Option<RedisConnection>> {
    let what = format!("Redis unreachable at {}", redis.redacted_url());
    let connect = || async move {
        match purpose {
            Connection::Commands => redis.connect(redis.timeout()).await,
            Connection::Reads { stream, span } => {
                redis.connect_for_blocking_reads(stream, span).await
            }
        }
    };
    Ok(run_with_retries(&what, Backoff::STARTUP, shutdown, |_| true, connect).await?)
}

#[cfg(test)]
mod layout_tests {
    use protocol::layout::{problems_of_crate, Layering};

    /// Its Layout list names every module, in layers, and no function is
    /// longer than `protocol::layout::LONGEST_FUNCTION` lines.
    #[test]
    fn the_crate_keeps_its_layout() {
        assert_eq!(
            problems_of_crate(env!("CARGO_MANIFEST_DIR"), Layering::Checked),
            Vec::<String>::new()
        );
    }
}
