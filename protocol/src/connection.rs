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
//!   returns one reply per master.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Value};

/// A reconnecting connection to a single server or a cluster. Cheap to
/// clone: clones share the underlying multiplexed connections.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(con) => con.req_packed_command(cmd),
            RedisConnection::Cluster(con) => con.req_packed_command(cmd),
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
            RedisConnection::Cluster(con) => con.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(con) => con.get_db(),
            RedisConnection::Cluster(con) => con.get_db(),
        }
    }
}

impl RedisConnection {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConnection::Cluster(_))
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
/// their replies in order. They are sent concurrently as separate commands:
/// a cluster routes each to the master of its key's slot, and a single
/// server gets them pipelined on the multiplexed connection anyway.
pub async fn query_each<T: FromRedisValue>(
    con: &RedisConnection,
    commands: Vec<Cmd>,
) -> RedisResult<Vec<T>> {
    futures_util::future::try_join_all(commands.into_iter().map(|command| {
        let mut con = con.clone();
        async move { command.query_async(&mut con).await }
    }))
    .await
}
