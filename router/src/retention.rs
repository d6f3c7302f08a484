//! Trimming shard streams as destinations acknowledge.
//!
//! An entry may leave a stream only once every destination is done with
//! it. Per consumer group, the oldest entry it may still need is its oldest
//! pending entry, or, with nothing pending, the one after its last-delivered
//! id. The stream is trimmed (`XTRIM MINID`) below the minimum of those over
//! all groups, computed and applied in one script so no group can move in
//! between. Groups of no defined destination still count (reported when
//! they stay: see `router destinations delete`), and while a defined
//! destination has no group nothing is trimmed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::Keys;
use protocol::RedisConnection;
use telemetry::lifecycle::Ticks;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// How long a group of no known destination may exist before it is
/// reported: a destination being created, or created on another router a
/// moment ago, has one too.
const ORPHAN_AFTER: Duration = Duration::from_secs(30);

/// KEYS: the shard stream. ARGV: the defined destinations (group names).
/// Returns `{trimmed, unknown groups}`; trimmed is -1 when a defined
/// destination's group is missing.
const TRIM: &str = r"
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local configured = {}
for i = 1, #ARGV do configured[ARGV[i]] = false end
local unknown = {}
local floor_ms, floor_seq
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  local name = info['name']
  if configured[name] == nil then table.insert(unknown, name) else configured[name] = true end
  local ms, seq
  if info['pending'] > 0 then
    ms, seq = parse(redis.call('XPENDING', KEYS[1], name)[2])
  else
    ms, seq = parse(info['last-delivered-id'])
    seq = seq + 1
  end
  if floor_ms == nil or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor_ms, floor_seq = ms, seq
  end
end
for _, present in pairs(configured) do
  if not present then return {-1, unknown} end
end
if floor_ms == nil then return {0, unknown} end
local trimmed = redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', floor_ms, floor_seq))
return {trimmed, unknown}
";

/// What one trim of one shard did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trimmed {
    /// Entries removed; `None` when a defined destination has no group.
    pub removed: Option<u64>,
    /// Groups on the stream that no defined destination owns.
    pub unknown_groups: Vec<String>,
}

/// Trims the stream of `shard` as far as every group allows.
pub async fn trim(
    con: &mut RedisConnection,
    keys: &Keys,
    shard: u16,
    destinations: &[String],
) -> redis::RedisResult<Trimmed> {
    let (removed, unknown_groups): (i64, Vec<String>) = redis::cmd("EVAL")
        .arg(TRIM)
        .arg(1)
        .arg(keys.events(shard))
        .arg(destinations)
        .query_async(con)
        .await?;
    Ok(Trimmed {
        removed: u64::try_from(removed).ok(),
        unknown_groups,
    })
}

/// Trims the delivery log streams of `destinations` on `shard` to records
/// younger than `retention` (by Redis stream id, which is Redis's clock).
async fn trim_logs(
    con: &mut RedisConnection,
    keys: &Keys,
    shard: u16,
    destinations: &[String],
    retention: Duration,
) -> redis::RedisResult<()> {
    let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    let oldest_kept = protocol::unix_millis().saturating_sub(retention_ms);
    // One shard's keys share a hash tag: one pipeline, even on a cluster.
    let mut pipe = redis::pipe();
    for destination in destinations {
        pipe.cmd("XTRIM")
            .arg(keys.delivery_log(shard, destination))
            .arg("MINID")
            .arg(oldest_kept)
            .ignore();
    }
    pipe.query_async::<()>(con).await
}

/// Trims every shard every `every` until `shutdown`, keeping what the
/// destinations defined now still need, and the delivery log to
/// `log_retention` (when it is on). Each router does this for all shards;
/// the script is safe to run concurrently.
pub async fn run(
    mut con: RedisConnection,
    keys: Keys,
    shards: u16,
    registry: Arc<Registry>,
    log_retention: Option<Duration>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let mut reported = HashSet::new();
    let mut ticks = Ticks::new(every);
    while ticks.next(&shutdown).await {
        let destinations = registry.names();
        for shard in 0..shards {
            if let Some(retention) = log_retention {
                if let Err(error) =
                    trim_logs(&mut con, &keys, shard, &destinations, retention).await
                {
                    tracing::debug!(shard, %error, "Cannot trim the delivery log; will retry.");
                }
            }
            match trim(&mut con, &keys, shard, &destinations).await {
                Ok(trimmed) => {
                    if let Some(removed @ 1..) = trimmed.removed {
                        metrics::counter!("router_trimmed_entries_total").increment(removed);
                        tracing::debug!(shard, removed, "Trimmed acknowledged entries.");
                    }
                    for group in trimmed.unknown_groups {
                        let since = *first_seen.entry(group.clone()).or_insert_with(Instant::now);
                        if since.elapsed() >= ORPHAN_AFTER && reported.insert(group.clone()) {
                            tracing::warn!(
                                group = %group,
                                shard,
                                "Consumer group of no defined destination: it keeps \
                                 undelivered entries from being trimmed. Delete it with \
                                 `router destinations delete {group}`."
                            );
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(shard, %error, "Cannot trim; will retry.");
                    break;
                }
            }
        }
    }
}
