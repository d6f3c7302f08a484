//! Writing events to the shard streams.
//!
//! Requests share a few multiplexed connections, so concurrent XADDs are
//! pipelined and, under `appendfsync always`, fsynced together. Every write
//! is bounded by `redis.timeout_ms`: past it the caller answers 503.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use protocol::{shard_for, EventId, Keys, MetaError, RedisConfig, StreamId};
use redis::aio::ConnectionManager;
use redis::FromRedisValue;

use crate::event::NewEvent;

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

pub struct EventStore {
    connections: Vec<ConnectionManager>,
    keys: Keys,
    shards: u16,
    idempotency_ttl_ms: u64,
    timeout: Duration,
    destinations: Mutex<CachedNames>,
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
    ) -> Result<Self, ConnectError> {
        let mut connections = Vec::with_capacity(config.connections);
        for _ in 0..config.connections {
            connections.push(config.connect(Some(config.timeout())).await?);
        }
        let keys = Keys::new(config.key_prefix.clone());
        protocol::ensure_shard_count(&mut connections[0], &keys, config.shards).await?;
        Ok(Self {
            connections,
            keys,
            shards: config.shards,
            idempotency_ttl_ms: u64::try_from(idempotency_ttl.as_millis()).unwrap_or(u64::MAX),
            timeout: config.timeout(),
            destinations: Mutex::new(CachedNames::default()),
        })
    }

    /// Every command of a shard goes over the same connection, so commands
    /// for one user reach Redis in the order they were issued.
    fn connection_for(&self, shard: u16) -> ConnectionManager {
        self.connections[usize::from(shard) % self.connections.len()].clone()
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

    /// Writes `event` to its user's shard stream; returns once Redis has
    /// acknowledged the write.
    pub async fn append(&self, event: &NewEvent) -> Result<Appended, StoreError> {
        let mut appended = self.append_all(std::slice::from_ref(event)).await?;
        appended
            .pop()
            .ok_or_else(|| StoreError::Reply("no reply for the event".into()))
    }

    /// Writes `events`, each user's in the given order; returns their ids in
    /// the same order once Redis has acknowledged every write. Each shard's
    /// events go as one pipeline; shards are written concurrently. On error
    /// some events may be stored: clients retry, and idempotency keys make
    /// that retry safe.
    pub async fn append_all(&self, events: &[NewEvent]) -> Result<Vec<Appended>, StoreError> {
        let mut by_shard: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (index, event) in events.iter().enumerate() {
            by_shard
                .entry(shard_for(&event.entry.user_id, self.shards))
                .or_default()
                .push(index);
        }
        let writes = by_shard.into_iter().map(|(shard, indices)| {
            let mut pipeline = redis::pipe();
            for &index in &indices {
                pipeline.add_command(self.append_command(shard, &events[index]));
            }
            let mut con = self.connection_for(shard);
            async move {
                let replies: Vec<redis::Value> = pipeline.query_async(&mut con).await?;
                if replies.len() != indices.len() {
                    return Err(StoreError::Reply(format!(
                        "{} replies for {} commands",
                        replies.len(),
                        indices.len()
                    )));
                }
                indices
                    .into_iter()
                    .zip(replies)
                    .map(|(index, reply)| Ok((index, parse_append_reply(shard, reply)?)))
                    .collect::<Result<Vec<_>, StoreError>>()
            }
        });
        let per_shard = self.bounded(async { try_join_all(writes).await }).await?;
        let mut appended = vec![None; events.len()];
        for (index, result) in per_shard.into_iter().flatten() {
            appended[index] = Some(result);
        }
        appended
            .into_iter()
            .map(|a| a.ok_or_else(|| StoreError::Reply("an event got no reply".into())))
            .collect()
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
        let key = self.keys.destinations();
        let names: HashSet<String> = self
            .bounded(async {
                Ok(redis::cmd("SMEMBERS")
                    .arg(&key)
                    .query_async(&mut con)
                    .await?)
            })
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

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Meta(#[from] MetaError),
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
