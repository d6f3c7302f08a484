//! Start-up checks shared by the gateway and the router.

use redis::aio::ConnectionLike;

use crate::{Keys, RedisConnection};

/// Why a service could not start: Redis did not answer (worth waiting
/// for), or it holds or is configured with something the service refuses.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error(
        "this deployment was started with {recorded} shards (recorded in Redis key `{key}`), \
         but this process is configured with {configured}; changing the shard count would move \
         users between shards and break per-user order, so refusing to start. \
         Set the shard count back to {recorded}"
    )]
    ShardCountMismatch {
        key: String,
        recorded: u16,
        configured: u16,
    },
    #[error("Redis key `{key}` holds `{value}`, not a shard count")]
    Corrupt { key: String, value: String },
    #[error(
        "Redis is not configured to keep accepted events safe: {}. Fix the Redis \
         configuration (see config/redis.conf), or set redis.allow_unsafe_persistence = true \
         to start anyway",
        problems.join("; ")
    )]
    UnsafePersistence { problems: Vec<String> },
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

impl MetaError {
    /// Redis could not answer, which waiting can fix; the other errors are
    /// configuration conflicts, which it cannot.
    pub fn is_transient(&self) -> bool {
        matches!(self, MetaError::Redis(_))
    }
}

/// Records `configured` as the shard count if none is recorded yet, and
/// refuses a count that differs from the recorded one.
pub async fn ensure_shard_count<C: ConnectionLike + Send>(
    con: &mut C,
    keys: &Keys,
    configured: u16,
) -> Result<(), MetaError> {
    let key = keys.shard_count();
    let _: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(configured)
        .arg("NX")
        .query_async(con)
        .await?;
    let value: String = redis::cmd("GET").arg(&key).query_async(con).await?;
    let recorded: u16 = value.parse().map_err(|_| MetaError::Corrupt {
        key: key.clone(),
        value: value.clone(),
    })?;
    if recorded == configured {
        Ok(())
    } else {
        Err(MetaError::ShardCountMismatch {
            key,
            recorded,
            configured,
        })
    }
}

/// The value of `name` in an `INFO` reply (`name:value` lines).
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// How Redis persists and evicts, as read from `INFO`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Persistence {
    aof_enabled: bool,
    maxmemory_policy: String,
}

impl Persistence {
    /// Reads the fields of `INFO persistence` and `INFO memory` we rely on.
    fn from_info(info: &str) -> Self {
        Self {
            aof_enabled: info_field(info, "aof_enabled") == Some("1"),
            maxmemory_policy: info_field(info, "maxmemory_policy")
                .unwrap_or_default()
                .to_owned(),
        }
    }

    /// Each way this configuration can lose accepted events.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.aof_enabled {
            problems.push(
                "the append-only file is off (`appendonly no`), so a restart loses every event \
                 written since the last snapshot"
                    .to_owned(),
            );
        }
        if self.maxmemory_policy != "noeviction" {
            problems.push(format!(
                "`maxmemory-policy {}` evicts keys when memory is full, deleting undelivered \
                 events; it must be `noeviction`",
                self.maxmemory_policy
            ));
        }
        problems
    }
}

/// Refuses a Redis that could silently lose accepted events (AOF off or an
/// evicting policy; on a cluster, on any master), unless `allow_unsafe` is
/// set, which logs a warning instead.
pub async fn check_persistence(
    con: &mut RedisConnection,
    allow_unsafe: bool,
) -> Result<(), MetaError> {
    let persistence = con.info_of_every_master("persistence").await?;
    let memory = con.info_of_every_master("memory").await?;
    let mut problems: Vec<String> = Vec::new();
    for (persistence, memory) in persistence.iter().zip(&memory) {
        for problem in Persistence::from_info(&format!("{persistence}\n{memory}")).problems() {
            if !problems.contains(&problem) {
                problems.push(problem);
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    if allow_unsafe {
        tracing::warn!(
            problems = %problems.join("; "),
            "Redis can lose accepted events; starting anyway because redis.allow_unsafe_persistence is set."
        );
        return Ok(());
    }
    Err(MetaError::UnsafePersistence { problems })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_aof_and_eviction_policy_from_info() {
        let safe = Persistence::from_info(
            "# Persistence\r\nloading:0\r\naof_enabled:1\r\n# Memory\r\nmaxmemory_policy:noeviction\r\n",
        );
        assert!(safe.problems().is_empty());
        let unsafe_ = Persistence::from_info("aof_enabled:0\r\nmaxmemory_policy:allkeys-lru\r\n");
        let problems = unsafe_.problems();
        assert_eq!(problems.len(), 2);
        assert!(problems[0].contains("appendonly"));
        assert!(problems[1].contains("allkeys-lru"));
    }
}
