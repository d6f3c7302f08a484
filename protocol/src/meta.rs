//! Start-up checks shared by the gateway and the router.

use redis::aio::ConnectionLike;

use crate::Keys;

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
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
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
