//! One connection type for a single Redis server and for a Redis Cluster.
//!
//! The services issue the same commands either way: every key of a shard
//! carries the shard's hash tag, so each command, script and MULTI touches
//! one cluster slot, and the cluster client sends it to the master owning
//! that slot (following `MOVED`/`ASK` after a failover or resharding).
//! Two things differ, and this module hides them:
//! - commands on keys of *different* shards cannot share a pipeline on a
//!   cluster; [`query_each`] sends them as separate commands instead;
//! - `INFO` answers per node on a cluster; [`RedisConnection::info_of_every_master`]
//!   returns one reply per master, [`RedisConnection::info_of_master_of`]
//!   the reply of the master serving one key.
//!
//! A cluster connection repairs itself in the background after a node is
//! lost, but redis-rs 1.x does not always manage it (redis-rs issue 2277:
//! retries exhausted against stale node connections). A long-lived
//! connection that could never recover would stall everything that shares
//! it (lease renewals, acknowledgements), so [`HealingCluster`] replaces a
//! connection that has answered nothing but connection errors for
//! 5 s with a new one from the same client.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use crate::slot_owner::SlotOwner;

/// How long a cluster connection may fail every command with a connection
/// error before it is rebuilt: longer than a failover takes (a replica is
/// promoted within about two node timeouts), so a healthy client gets the
/// chance to repair itself first.
const REBUILD_AFTER: Duration = Duration::from_secs(5);

/// A reconnecting connection to a single server or a cluster. Cheap to
/// clone: clones share the underlying multiplexed connections.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(HealingCluster),
    /// The one cluster master serving a key's slot (blocking reads).
    SlotOwner(SlotOwner),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(con) => con.req_packed_command(cmd),
            RedisConnection::SlotOwner(owner) => owner.req_packed_command(cmd),
            RedisConnection::Cluster(cluster) => Box::pin(async move {
                let result = cluster.current().req_packed_command(cmd).await;
                cluster.observe(result.as_ref().err());
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(con) => con.req_packed_commands(pipeline, offset, count),
            RedisConnection::SlotOwner(owner) => owner.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(cluster) => Box::pin(async move {
                let result = cluster
                    .current()
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                cluster.observe(result.as_ref().err());
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(con) => con.get_db(),
            RedisConnection::Cluster(_) | RedisConnection::SlotOwner(_) => 0,
        }
    }
}

/// A cluster connection that is rebuilt from its client once it has
/// failed every command with a connection error for 5 s (`REBUILD_AFTER`).
/// Clones share the connection and its health.
#[derive(Clone)]
pub struct HealingCluster {
    inner: Arc<Healing>,
}

struct Healing {
    client: ClusterClient,
    state: Mutex<Health>,
}

struct Health {
    connection: ClusterConnection,
    /// Since when every command failed with a connection error.
    failing_since: Option<Instant>,
    rebuilding: bool,
}

impl HealingCluster {
    /// Connects with `client`, which keeps the settings for rebuilding.
    pub async fn connect(client: ClusterClient) -> RedisResult<Self> {
        let connection = client.get_async_connection().await?;
        Ok(Self {
            inner: Arc::new(Healing {
                client,
                state: Mutex::new(Health {
                    connection,
                    failing_since: None,
                    rebuilding: false,
                }),
            }),
        })
    }

    fn current(&self) -> ClusterConnection {
        self.lock().connection.clone()
    }

    /// Records a command's outcome; starts a rebuild in the background when
    /// the connection has been failing for too long. An error reply from a
    /// server (a wrong type, a missing group) is an answer, and healthy.
    fn observe(&self, error: Option<&RedisError>) {
        let unreachable = error.is_some_and(|e| {
            e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
        });
        let mut health = self.lock();
        if !unreachable {
            health.failing_since = None;
            return;
        }
        let since = *health.failing_since.get_or_insert_with(Instant::now);
        if health.rebuilding || since.elapsed() < REBUILD_AFTER {
            return;
        }
        health.rebuilding = true;
        drop(health);
        tracing::warn!(
            failing_for_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
            "Redis Cluster connection has failed every command; building a new one."
        );
        let this = self.clone();
        tokio::spawn(async move {
            let rebuilt = this.inner.client.get_async_connection().await;
            let mut health = this.lock();
            health.rebuilding = false;
            match rebuilt {
                Ok(connection) => {
                    health.connection = connection;
                    health.failing_since = None;
                }
                Err(error) => {
                    tracing::warn!(%error, "Cannot build a new Redis Cluster connection yet.");
                }
            }
        });
    }

    fn lock(&self) -> MutexGuard<'_, Health> {
        // Plain assignments only: consistent after a panic elsewhere.
        crate::sync::lock(&self.inner.state)
    }
}

impl RedisConnection {
    /// Whether this connects to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(
            self,
            RedisConnection::Cluster(_) | RedisConnection::SlotOwner(_)
        )
    }

    /// `INFO section` of the server, or of the cluster master serving
    /// `key`'s slot: one master not answering fails only the keys it serves.
    pub async fn info_of_master_of(&mut self, key: &str, section: &str) -> RedisResult<String> {
        let mut command = redis::cmd("INFO");
        command.arg(section);
        let reply = match self {
            RedisConnection::Cluster(cluster) => {
                let master = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(master));
                let result = cluster.current().route_command(command, routing).await;
                cluster.observe(result.as_ref().err());
                result?
            }
            RedisConnection::Single(_) | RedisConnection::SlotOwner(_) => {
                command.query_async(self).await?
            }
        };
        Ok(String::from_redis_value(reply)?)
    }

    /// `INFO section` of the server, or of every master of a cluster.
    pub async fn info_of_every_master(&mut self, section: &str) -> RedisResult<Vec<String>> {
        let reply: Value = redis::cmd("INFO").arg(section).query_async(self).await?;
        let replies = match reply {
            // A cluster client asks every master and maps address → reply.
            Value::Map(per_node) => per_node.into_iter().map(|(_, info)| info).collect(),
            single => vec![single],
        };
        Ok(replies
            .into_iter()
            .map(String::from_redis_value)
            .collect::<Result<_, _>>()?)
    }
}

/// Runs `commands`, which may touch keys of different shards, and returns
/// each one's own result, in order: one failing (its master down or
/// paused) fails only itself. They are sent concurrently as separate
/// commands: a cluster routes each to the master of its key's slot, and a
/// single server gets them pipelined on the multiplexed connection anyway.
pub async fn query_each<T: FromRedisValue>(
    con: &RedisConnection,
    commands: Vec<Cmd>,
) -> Vec<RedisResult<T>> {
    futures_util::future::join_all(commands.into_iter().map(|command| {
        let mut con = con.clone();
        async move { command.query_async(&mut con).await }
    }))
    .await
}
