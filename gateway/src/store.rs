//! Writing events to the shard streams.
//!
//! Each worker's requests share a few multiplexed connections (see
//! [`crate::lanes`] for which one a write takes), so concurrent XADDs are
//! pipelined and, under `appendfsync always`, fsynced together. Every write
//! is bounded by `redis.timeout_ms`: past it the caller answers 503.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use protocol::RedisConnection;
use protocol::{shard_for, EventId, Keys, MetaError, RedisConfig, StreamId};
use redis::FromRedisValue;

use crate::config::{BacklogConfig, ReplicationConfig};
use crate::event::NewEvent;
use crate::lanes::{InDoubtOnSeveral, Lanes, Taken, WorkerLanes};

/// Adds an event unless its idempotency key was seen, atomically. Both keys
/// carry the shard's hash tag, so this works on Redis Cluster too.
/// KEYS: stream, idempotency key. ARGV: ttl ms, then XADD field/value pairs.
const APPEND_ONCE: &str = r"
local first = redis.call('GET', KEYS[2])
if first then return {0, first} end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
redis.call('SET', KEYS[2], id, 'PX', ARGV[1])
return {1, id}
";

/// How long the cached destination names are trusted.
const DESTINATIONS_FRESH_FOR: Duration = Duration::from_secs(5);
/// Unknown names re-read the list at most this often, so bad requests
/// cannot hammer Redis.
const DESTINATIONS_MIN_REFRESH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis command failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from Redis: {0}")]
    Reply(String),
    /// The backlog cap: destinations are too far behind to accept more now.
    #[error("{0}")]
    BacklogFull(String),
    /// Stored on the master, but not confirmed on enough replicas in time.
    #[error(
        "the event reached {confirmed} of the {wanted} Redis replicas required in time; \
         retry later (with the same messageId a retry is not stored twice)"
    )]
    NotReplicated { wanted: u32, confirmed: u32 },
    /// Earlier writes of the shard have an unknown outcome on several
    /// connections (see [`crate::lanes`]); nothing was written.
    #[error("writes of shard {0} are in doubt on several Redis connections")]
    InDoubt(u16),
}

/// How many replicas must confirm each write before the client gets 202.
#[derive(Debug, Clone, Copy)]
pub struct Replication {
    pub min_replicas: u32,
    pub timeout: Duration,
}

impl From<&ReplicationConfig> for Replication {
    fn from(config: &ReplicationConfig) -> Self {
        Self {
            min_replicas: config.min_replicas,
            timeout: Duration::from_millis(config.timeout_ms),
        }
    }
}

/// Whether an append stored a new event or found an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    New(EventId),
    /// The idempotency key was seen within the window; nothing was written.
    Duplicate(EventId),
}

impl Appended {
    pub fn id(self) -> EventId {
        match self {
            Appended::New(id) | Appended::Duplicate(id) => id,
        }
    }
}

/// When the gateway stops accepting because destinations fall behind.
#[derive(Debug, Clone, Copy)]
pub struct BacklogLimits {
    /// Entries one shard stream may hold.
    pub max_events_per_shard: u64,
    /// Percent of Redis `maxmemory` in use past which writes are refused
    /// (ignored when Redis has no `maxmemory`).
    pub max_memory_percent: u8,
}

impl From<&BacklogConfig> for BacklogLimits {
    fn from(config: &BacklogConfig) -> Self {
        Self {
            max_events_per_shard: config.max_events_per_shard,
            max_memory_percent: config.max_memory_percent,
        }
    }
}

/// The last measured backlog: which shards are at their cap, and whose
/// Redis memory is (each shard's master's, on a cluster). Refreshed by
/// [`EventStore::refresh_backlog`].
struct Backlog {
    limits: BacklogLimits,
    shards: Vec<ShardBacklog>,
}

/// What the cap last measured of one shard; kept while its Redis does not
/// answer.
#[derive(Default)]
struct ShardBacklog {
    /// Its stream holds `max_events_per_shard` entries or more.
    stream_full: AtomicBool,
    /// Its Redis (on a cluster, its master) uses `max_memory_percent` of
    /// `maxmemory` or more.
    memory_full: AtomicBool,
}

/// One shard's measurement.
struct Measured {
    length: u64,
    /// Whether its master's memory is past the cap, when memory is measured
    /// per shard (a cluster); `None` on a single Redis, measured once.
    memory_full: Option<bool>,
}

pub struct EventStore {
    lanes: Arc<Lanes>,
    backlog: Backlog,
    replication: Replication,
    keys: Keys,
    shards: u16,
    idempotency_ttl_ms: u64,
    timeout: Duration,
    destinations: Mutex<CachedNames>,
}

/// One shard's part of an append: its events' indices in the request, the
/// pipeline writing them, and the connection carrying it.
struct ShardWrite<'a> {
    shard: u16,
    indices: Vec<usize>,
    pipeline: redis::Pipeline,
    taken: Taken<'a>,
}

impl ShardWrite<'_> {
    /// Sends the shard's pipeline; each event's index with its reply.
    async fn send(&self, replication: Replication) -> Result<Vec<(usize, Appended)>, StoreError> {
        let mut con = self.taken.connection.clone();
        let mut replies: Vec<redis::Value> = self.pipeline.query_async(&mut con).await?;
        if replication.min_replicas > 0 {
            let confirmed = replies
                .pop()
                .map(u32::from_redis_value)
                .transpose()
                .map_err(|e| StoreError::Reply(format!("WAIT: {e}")))?
                .unwrap_or(0);
            if confirmed < replication.min_replicas {
                return Err(StoreError::NotReplicated {
                    wanted: replication.min_replicas,
                    confirmed,
                });
            }
        }
        if replies.len() != self.indices.len() {
            return Err(StoreError::Reply(format!(
                "{} replies for {} commands",
                replies.len(),
                self.indices.len()
            )));
        }
        self.indices
            .iter()
            .zip(replies)
            .map(|(&index, reply)| Ok((index, parse_append_reply(self.shard, reply)?)))
            .collect()
    }
}

/// Puts the shards' replies back in the events' order.
fn reassemble(
    per_shard: Vec<Vec<(usize, Appended)>>,
    events: usize,
) -> Result<Vec<Appended>, StoreError> {
    let mut appended = vec![None; events];
    for (index, result) in per_shard.into_iter().flatten() {
        appended[index] = Some(result);
    }
    appended
        .into_iter()
        .map(|a| a.ok_or_else(|| StoreError::Reply("an event got no reply".into())))
        .collect()
}

#[derive(Default)]
struct CachedNames {
    names: HashSet<String>,
    fetched_at: Option<Instant>,
}

impl EventStore {
    /// Connects and checks the recorded shard count.
    pub async fn connect(
        config: &RedisConfig,
        idempotency_ttl: Duration,
        limits: BacklogLimits,
        replication: Replication,
    ) -> Result<Self, MetaError> {
        let mut connections = Vec::with_capacity(config.connections);
        for _ in 0..config.connections {
            connections.push(config.connect(config.timeout()).await?);
        }
        let keys = Keys::new(config.key_prefix.clone());
        protocol::ensure_shard_count(&mut connections[0], &keys, config.shards).await?;
        protocol::check_persistence(&mut connections[0], config.allow_unsafe_persistence).await?;
        Ok(Self {
            lanes: Lanes::new(config.clone(), connections, &keys),
            backlog: Backlog {
                limits,
                shards: (0..config.shards)
                    .map(|_| ShardBacklog::default())
                    .collect(),
            },
            replication,
            keys,
            shards: config.shards,
            idempotency_ttl_ms: u64::try_from(idempotency_ttl.as_millis()).unwrap_or(u64::MAX),
            timeout: config.timeout(),
            destinations: Mutex::new(CachedNames::default()),
        })
    }

    /// The write lanes of one worker thread; call on that thread.
    pub fn worker_lanes(&self) -> WorkerLanes {
        self.lanes.for_worker()
    }

    /// A shared connection for commands other than writes of events.
    fn connection_for(&self, shard: u16) -> RedisConnection {
        self.lanes.shared(shard)
    }

    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
    }

    /// The command that stores `event`: a plain XADD, or with an
    /// idempotency key the script that XADDs only the first time. EVAL rather
    /// than EVALSHA: there is no NOSCRIPT retry that could reorder commands.
    fn append_command(&self, shard: u16, event: &NewEvent) -> redis::Cmd {
        let stream = self.keys.events(shard);
        let mut command = match &event.idempotency_key {
            None => {
                let mut xadd = redis::cmd("XADD");
                xadd.arg(stream).arg("*");
                xadd
            }
            Some(key) => {
                let mut eval = redis::cmd("EVAL");
                eval.arg(APPEND_ONCE)
                    .arg(2)
                    .arg(stream)
                    .arg(self.keys.idempotency(shard, &event.entry.user_id, key))
                    .arg(self.idempotency_ttl_ms);
                eval
            }
        };
        for (field, value) in event.entry.to_fields() {
            command.arg(field).arg(value);
        }
        command
    }

    /// How many shard streams events are spread over.
    pub fn shards(&self) -> u16 {
        self.shards
    }

    /// Writes `event` to its user's shard stream; returns once Redis has
    /// acknowledged the write.
    pub async fn append(
        &self,
        event: &NewEvent,
        lanes: &WorkerLanes,
    ) -> Result<Appended, StoreError> {
        let mut appended = self.append_all(std::slice::from_ref(event), lanes).await?;
        appended
            .pop()
            .ok_or_else(|| StoreError::Reply("no reply for the event".into()))
    }

    /// Writes `events`, each user's in the given order; returns their ids in
    /// the same order once Redis has acknowledged every write (and, with
    /// `min_replicas`, once that many replicas confirmed it: a `WAIT` ends
    /// the shard's pipeline, on the same connection to the same master).
    /// Each shard's events go as one pipeline; shards are written
    /// concurrently. On error some events may be stored: clients retry, and
    /// idempotency keys make that retry safe; every shard written is then
    /// in doubt (see [`crate::lanes`]) before this returns.
    pub async fn append_all(
        &self,
        events: &[NewEvent],
        lanes: &WorkerLanes,
    ) -> Result<Vec<Appended>, StoreError> {
        let shard_writes = self.plan(events, lanes)?;
        let writes = shard_writes
            .iter()
            .map(|write| write.send(self.replication));
        // One shard's failure fails the request, so the others' writes are
        // dropped with it; every shard written is put in doubt below.
        let per_shard = match self.bounded(async { try_join_all(writes).await }).await {
            Ok(per_shard) => per_shard,
            Err(error) => {
                for write in &shard_writes {
                    self.lanes.write_failed(write.shard, &write.taken);
                }
                return Err(error);
            }
        };
        reassemble(per_shard, events.len())
    }

    /// Groups `events` by shard (each user's in the given order), checks
    /// the backlog cap, and builds each shard's pipeline on the connection
    /// its lane gives it.
    fn plan<'l>(
        &self,
        events: &[NewEvent],
        lanes: &'l WorkerLanes,
    ) -> Result<Vec<ShardWrite<'l>>, StoreError> {
        let mut by_shard: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (index, event) in events.iter().enumerate() {
            by_shard
                .entry(shard_for(&event.entry.user_id, self.shards))
                .or_default()
                .push(index);
        }
        self.check_backlog(by_shard.keys().copied())?;
        let replication = self.replication;
        by_shard
            .into_iter()
            .map(|(shard, indices)| {
                let mut pipeline = redis::pipe();
                let mut bytes = 0;
                for &index in &indices {
                    let command = self.append_command(shard, &events[index]);
                    bytes += command_bytes(&command);
                    pipeline.add_command(command);
                }
                if replication.min_replicas > 0 {
                    pipeline
                        .cmd("WAIT")
                        .arg(replication.min_replicas)
                        .arg(u64::try_from(replication.timeout.as_millis()).unwrap_or(u64::MAX));
                }
                let taken = lanes
                    .for_write(shard, bytes)
                    .map_err(|InDoubtOnSeveral| StoreError::InDoubt(shard))?;
                Ok(ShardWrite {
                    shard,
                    indices,
                    pipeline,
                    taken,
                })
            })
            .collect()
    }

    /// Refuses writes to shards at their backlog cap, before anything is
    /// written, so a refused batch stores none of its events.
    fn check_backlog(&self, shards: impl Iterator<Item = u16>) -> Result<(), StoreError> {
        let limits = &self.backlog.limits;
        for shard in shards {
            let backlog = &self.backlog.shards[usize::from(shard)];
            if backlog.memory_full.load(Ordering::Relaxed) {
                return Err(StoreError::BacklogFull(format!(
                    "the Redis memory of shard {shard} is above {}% of maxmemory: \
                     destinations are behind; retry later",
                    limits.max_memory_percent
                )));
            }
            if backlog.stream_full.load(Ordering::Relaxed) {
                return Err(StoreError::BacklogFull(format!(
                    "the backlog of shard {shard} has reached its cap of {} events: \
                     destinations are behind; retry later",
                    limits.max_events_per_shard
                )));
            }
        }
        Ok(())
    }

    /// Measures every shard stream's length and Redis memory and updates
    /// which writes the backlog cap refuses. The gateway runs this every
    /// `backlog.check_interval_ms`, so a stream can pass its cap by at most
    /// what arrives in one interval. Each shard is measured on its own, with
    /// its master's memory on a cluster: a master that does not answer (a
    /// paused one) keeps its shards' last state and every other shard's is
    /// updated, and a full master refuses only its own shards. Fails with
    /// the first error, after updating what answered.
    pub async fn refresh_backlog(&self) -> Result<(), StoreError> {
        let per_master = self.connection_for(0).is_cluster();
        let measured = (0..self.shards).map(|shard| self.measure_shard(shard, per_master));
        let server = async {
            if per_master {
                return Ok(None);
            }
            let mut con = self.connection_for(0);
            let key = self.keys.events(0);
            self.bounded(async { Ok(Some(con.info_of_master_of(&key, "memory").await?)) })
                .await
        };
        let (measured, server) = tokio::join!(futures_util::future::join_all(measured), server);
        let limits = self.backlog.limits;
        let mut first_error = None;
        let server = match server {
            Ok(info) => info.map(|info| self.memory_full(&info)),
            Err(error) => {
                first_error = Some(error);
                None
            }
        };
        for (backlog, measured) in self.backlog.shards.iter().zip(measured) {
            let measured = match measured {
                Ok(measured) => measured,
                Err(error) => {
                    first_error.get_or_insert(error);
                    continue;
                }
            };
            let full = measured.length >= limits.max_events_per_shard;
            backlog.stream_full.store(full, Ordering::Relaxed);
            if let Some(full) = measured.memory_full.or(server) {
                backlog.memory_full.store(full, Ordering::Relaxed);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The length of `shard`'s stream and, with `per_master`, the memory use
    /// of the master serving it.
    async fn measure_shard(&self, shard: u16, per_master: bool) -> Result<Measured, StoreError> {
        let mut con = self.connection_for(shard);
        let stream = self.keys.events(shard);
        self.bounded(async move {
            let length: u64 = redis::cmd("XLEN")
                .arg(&stream)
                .query_async(&mut con)
                .await?;
            let memory_full = match per_master {
                true => Some(self.memory_full(&con.info_of_master_of(&stream, "memory").await?)),
                false => None,
            };
            Ok(Measured {
                length,
                memory_full,
            })
        })
        .await
    }

    /// Whether `INFO memory` shows the cap's share of `maxmemory` in use
    /// (never without a `maxmemory`).
    fn memory_full(&self, info: &str) -> bool {
        let limit = f64::from(self.backlog.limits.max_memory_percent);
        memory_percent(info).is_some_and(|percent| percent >= limit)
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut con = self.connection_for(0);
        self.bounded(async {
            let _: String = redis::cmd("PING").query_async(&mut con).await?;
            Ok(())
        })
        .await
    }

    /// The destination names among `wanted` that the router does not serve.
    pub async fn unknown_destinations(&self, wanted: &[String]) -> Result<Vec<String>, StoreError> {
        let unknown = |cache: &CachedNames| -> Vec<String> {
            wanted
                .iter()
                .filter(|name| !cache.names.contains(*name))
                .cloned()
                .collect()
        };
        {
            let cache = self
                .destinations
                .lock()
                .expect("destination cache lock is never poisoned");
            let age = cache.fetched_at.map(|at| at.elapsed());
            let fresh = age.is_some_and(|age| age <= DESTINATIONS_FRESH_FOR);
            let may_refresh = age.is_none_or(|age| age > DESTINATIONS_MIN_REFRESH);
            let missing = unknown(&cache);
            if fresh && (missing.is_empty() || !may_refresh) {
                return Ok(missing);
            }
        }
        let mut con = self.connection_for(0);
        let key = self.keys.catalog();
        let names: HashSet<String> = self
            .bounded(async { Ok(redis::cmd("HKEYS").arg(&key).query_async(&mut con).await?) })
            .await?;
        let mut cache = self
            .destinations
            .lock()
            .expect("destination cache lock is never poisoned");
        *cache = CachedNames {
            names,
            fetched_at: Some(Instant::now()),
        };
        Ok(unknown(&cache))
    }
}

/// `used_memory` as a percentage of `maxmemory`, from `INFO memory`;
/// `None` when Redis has no memory limit.
fn memory_percent(info: &str) -> Option<f64> {
    let field = |name: &str| -> Option<f64> { protocol::info_field(info, name)?.parse().ok() };
    let max = field("maxmemory").filter(|max| *max > 0.0)?;
    Some(field("used_memory")? * 100.0 / max)
}

/// The bytes of `command`'s arguments: about what it adds to its connection.
fn command_bytes(command: &redis::Cmd) -> usize {
    command
        .args_iter()
        .map(|arg| match arg {
            redis::Arg::Simple(bytes) => bytes.len(),
            // A cursor, or what a later redis-rs adds: a few bytes.
            _ => 0,
        })
        .sum()
}

/// Reads the reply of XADD (the id) or of the append-once script
/// (`[is_new, id]`).
fn parse_append_reply(shard: u16, reply: redis::Value) -> Result<Appended, StoreError> {
    let (is_new, stream_id) = match reply {
        redis::Value::Array(_) => <(bool, String)>::from_redis_value(reply),
        other => String::from_redis_value(other).map(|id| (true, id)),
    }
    .map_err(|e| StoreError::Reply(e.to_string()))?;
    let id = EventId {
        shard,
        stream_id: stream_id.parse::<StreamId>().map_err(StoreError::Reply)?,
    };
    Ok(if is_new {
        Appended::New(id)
    } else {
        Appended::Duplicate(id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_percent_needs_a_limit() {
        let info = "# Memory\r\nused_memory:500\r\nused_memory_human:500B\r\nmaxmemory:1000\r\n";
        assert_eq!(memory_percent(info), Some(50.0));
        assert_eq!(memory_percent("used_memory:500\r\nmaxmemory:0\r\n"), None);
    }
}
