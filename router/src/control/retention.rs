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
//!
//! Which router trims which shard: while some destination is routed, a
//! shard's trim walks every routed destination's reference stream, so only
//! the router running the shard's routing stage trims it ([`RoutedHere`]);
//! every router trimming every shard multiplied that walk by the routers.
//! Without routed destinations there is no routing stage, and every router
//! trims every shard, as the script is cheap then and safe to run at once.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use protocol::Keys;
use protocol::RedisConnection;
use telemetry::lifecycle::Ticks;
use tokio_util::sync::CancellationToken;

use crate::control::registry::{Readers, Registry};

/// How long a group of no known destination may exist before it is
/// reported: a destination being created, or created on another router a
/// moment ago, has one too.
const ORPHAN_AFTER: Duration = Duration::from_secs(30);

/// The delivery logs are trimmed once this share of their retention has
/// passed since the last trim (at most every tick), so they keep at most
/// 1 % more than the retention: with 72 hours, every 43 minutes rather
/// than a command per (shard, destination) every second.
const LOG_TRIM_SHARE: u32 = 100;

/// KEYS: the shard stream, its routing marks, its routing stage's lease,
/// its routed set, then the reference stream of each routed destination
/// this router knows. ARGV: the routing stage's group, the shard's
/// reference key prefix (for the routed set's names this router does not
/// know yet), how many destinations read the shard stream, their names
/// (group names), then the known routed destinations' names. Returns
/// `{trimmed, unknown groups}`; trimmed is -1 when a defined (or recorded
/// routed) destination's group is missing.
const TRIM: &str = r"
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local floor_ms, floor_seq
local function keep(ms, seq)
  if floor_ms == nil or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor_ms, floor_seq = ms, seq
  end
end
-- The oldest entry a group still needs: its oldest pending, or the one
-- after its last-delivered id.
local function needs(stream, info)
  if info['pending'] > 0 then
    return parse(redis.call('XPENDING', stream, info['name'])[2])
  end
  local ms, seq = parse(info['last-delivered-id'])
  return ms, seq + 1
end
local routing = ARGV[1]
local refs_prefix = ARGV[2]
local direct = tonumber(ARGV[3])
local routed = #ARGV - 3 - direct
-- A router that knows no routed destination while the shard's routing
-- stage runs (its lease is held) has not seen the catalog's latest: the
-- router running the stage trims the shard.
if routed == 0 and redis.call('EXISTS', KEYS[3]) == 1 then return {0, {}} end
-- The shard's routed destinations as Redis records them: a router's view
-- of the catalog may miss one created less than an interval ago.
local recorded = redis.call('SMEMBERS', KEYS[4])
local configured = {}
for i = 4, 3 + direct do configured[ARGV[i]] = false end
if routed > 0 then configured[routing] = false end
local unknown = {}
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  local name = info['name']
  if name == routing then
    -- The routing stage's group, with no destination routed, needs nothing.
    if routed > 0 or #recorded > 0 then
      if routed > 0 then configured[name] = true end
      keep(needs(KEYS[1], info))
    end
  else
    if configured[name] == nil then table.insert(unknown, name) else configured[name] = true end
    keep(needs(KEYS[1], info))
  end
end
for _, present in pairs(configured) do
  if not present then return {-1, unknown} end
end
-- An empty shard stream has nothing to trim, and the pass that emptied it
-- emptied the reference streams too (a reference still needed keeps its
-- event): an idle shard costs no walk over its reference streams.
if redis.call('XLEN', KEYS[1]) == 0 then return {0, unknown} end
-- A routed destination needs what its references still point to; its
-- reference stream is trimmed below that. False when it has no group.
local function walk(name, refs)
  if redis.call('EXISTS', refs) == 0 then return false end
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', refs)) do
    local info = {}
    for j = 1, #group, 2 do info[group[j]] = group[j + 1] end
    if info['name'] == name then
      local ms, seq = needs(refs, info)
      redis.call('XTRIM', refs, 'MINID', string.format('%d-%d', ms, seq))
      local next = redis.call('XRANGE', refs, string.format('%d-%d', ms, seq), '+', 'COUNT', 1)[1]
      if next then keep(parse(next[1])) end
      return true
    end
  end
  return false
end
local walked = {}
for i = 1, routed do
  local name = ARGV[3 + direct + i]
  walked[name] = true
  if not walk(name, KEYS[4 + i]) then return {-1, unknown} end
end
-- Those this router has not seen yet (same shard, so the same slot).
for _, name in ipairs(recorded) do
  if not walked[name] and not walk(name, refs_prefix .. name) then return {-1, unknown} end
end
-- A destination the routing stage is catching up needs all after its mark.
local marks = redis.call('HGETALL', KEYS[2])
for i = 2, #marks, 2 do
  local ms, seq = parse(marks[i])
  keep(ms, seq + 1)
end
if floor_ms == nil then return {0, unknown} end
local trimmed = redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', floor_ms, floor_seq))
return {trimmed, unknown}
";

/// The shards whose routing stage runs on this router.
#[derive(Clone)]
pub struct RoutedHere(Arc<Vec<AtomicUsize>>);

/// Counts a shard's routing stage as running here until dropped.
pub struct RoutingHere {
    shards: RoutedHere,
    shard: u16,
}

impl RoutedHere {
    pub fn new(shards: u16) -> Self {
        Self(Arc::new((0..shards).map(|_| AtomicUsize::new(0)).collect()))
    }

    /// Counts `shard`'s routing stage as running here while the guard
    /// lives (a count: a stage stopping may overlap the next one starting).
    pub fn hold(&self, shard: u16) -> RoutingHere {
        self.0[usize::from(shard)].fetch_add(1, Ordering::SeqCst);
        RoutingHere {
            shards: self.clone(),
            shard,
        }
    }

    fn contains(&self, shard: u16) -> bool {
        self.0[usize::from(shard)].load(Ordering::SeqCst) > 0
    }
}

impl Drop for RoutingHere {
    fn drop(&mut self) {
        self.shards.0[usize::from(self.shard)].fetch_sub(1, Ordering::SeqCst);
    }
}

/// What one trim of one shard did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trimmed {
    /// Entries removed; `None` when a defined destination has no group.
    pub removed: Option<u64>,
    /// Groups on the stream that no defined destination owns.
    pub unknown_groups: Vec<String>,
}

/// Trims the stream of `shard` as far as every group allows, and the
/// routed destinations' reference streams as far as their groups allow.
pub async fn trim(
    con: &mut RedisConnection,
    keys: &Keys,
    shard: u16,
    readers: &Readers,
) -> redis::RedisResult<Trimmed> {
    let mut script = redis::cmd("EVAL");
    script
        .arg(TRIM)
        .arg(4 + readers.routed.len())
        .arg(keys.events(shard))
        .arg(keys.routing_marks(shard))
        .arg(keys.lease(shard, protocol::keys::ROUTING_GROUP))
        .arg(keys.routed(shard));
    for name in &readers.routed {
        script.arg(keys.refs(shard, name));
    }
    let (removed, unknown_groups): (i64, Vec<String>) = script
        .arg(protocol::keys::ROUTING_GROUP)
        .arg(keys.refs(shard, ""))
        .arg(readers.direct.len())
        .arg(&readers.direct)
        .arg(&readers.routed)
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
    destinations: impl Iterator<Item = &String>,
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

/// What one shard's tick did: the trim's outcome, and whether its delivery
/// log could be trimmed (logged at debug: the log is a record).
struct ShardTick {
    shard: u16,
    trimmed: redis::RedisResult<Trimmed>,
    log: redis::RedisResult<()>,
}

/// Trims the delivery logs and then the stream of one shard.
async fn trim_shard(
    mut con: RedisConnection,
    keys: &Keys,
    shard: u16,
    readers: &Readers,
    log_retention: Option<Duration>,
) -> ShardTick {
    let log = match log_retention {
        Some(retention) => trim_logs(&mut con, keys, shard, readers.all(), retention).await,
        None => Ok(()),
    };
    let trimmed = trim(&mut con, keys, shard, readers).await;
    ShardTick {
        shard,
        trimmed,
        log,
    }
}

/// Where and how often [`run`] trims.
pub struct Trimming {
    pub shards: u16,
    /// The shards this router trims while some destination is routed.
    pub routed_here: RoutedHere,
    /// How long the delivery logs keep records; `None` with the log off.
    pub log_retention: Option<Duration>,
    pub every: Duration,
}

/// Trims the shards this router trims (see the module) every `every` until
/// `shutdown`, keeping what the destinations defined now still need, and
/// the delivery log to `log_retention` (when it is on; see
/// [`LOG_TRIM_SHARE`]). The script is safe to run concurrently. Shards are
/// trimmed at once and apart: one whose Redis does not answer (a paused
/// cluster master) costs the tick one timeout and leaves only its own
/// stream untrimmed.
pub async fn run(
    con: RedisConnection,
    keys: Keys,
    registry: Arc<Registry>,
    trimming: Trimming,
    shutdown: CancellationToken,
) {
    let Trimming {
        shards,
        routed_here,
        log_retention,
        every,
    } = trimming;
    let mut orphans = Orphans::default();
    let mut logs_trimmed_at: Option<Instant> = None;
    let mut ticks = Ticks::new(every);
    while ticks.next(&shutdown).await {
        let readers = registry.readers();
        let log_retention = log_retention.filter(|retention| {
            logs_trimmed_at.is_none_or(|at| at.elapsed() >= *retention / LOG_TRIM_SHARE)
        });
        if log_retention.is_some() {
            logs_trimmed_at = Some(Instant::now());
        }
        let routed = !readers.routed.is_empty();
        let ticked = (0..shards)
            .filter(|shard| !routed || routed_here.contains(*shard))
            .map(|shard| trim_shard(con.clone(), &keys, shard, &readers, log_retention));
        // The only trimmer of its routing stages' shards: a panic costs one
        // tick, never the trimming for good.
        let ticked = AssertUnwindSafe(futures_util::future::join_all(ticked)).catch_unwind();
        let Ok(ticked) = ticked.await else {
            tracing::error!("Trimming panicked; trying again next interval.");
            continue;
        };
        for tick in ticked {
            let shard = tick.shard;
            if let Err(error) = tick.log {
                tracing::debug!(shard, %error, "Cannot trim the delivery log; will retry.");
            }
            match tick.trimmed {
                Ok(trimmed) => {
                    if let Some(removed @ 1..) = trimmed.removed {
                        metrics::counter!("router_trimmed_entries_total").increment(removed);
                        tracing::debug!(shard, removed, "Trimmed acknowledged entries.");
                    }
                    orphans.report(shard, trimmed.unknown_groups);
                }
                Err(error) => tracing::debug!(shard, %error, "Cannot trim; will retry."),
            }
        }
    }
}

/// Groups of no defined destination, each reported once it has stayed
/// [`ORPHAN_AFTER`].
#[derive(Default)]
struct Orphans {
    first_seen: HashMap<String, Instant>,
    reported: HashSet<String>,
}

impl Orphans {
    fn report(&mut self, shard: u16, groups: Vec<String>) {
        for group in groups {
            let since = *self
                .first_seen
                .entry(group.clone())
                .or_insert_with(Instant::now);
            if since.elapsed() >= ORPHAN_AFTER && self.reported.insert(group.clone()) {
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
}
