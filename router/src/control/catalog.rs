//! The destinations' definitions in Redis: the one definition every router
//! follows.
//!
//! The catalog is a hash (name → [`Definition`] as JSON) beside a revision
//! counter that every change raises, in one script, so a router notices a
//! change by reading one number. Both keys share a hash tag, so the scripts
//! stay in one Redis Cluster slot.
//!
//! Creating a destination records its **cut** on every shard: the last
//! stream id before the first event it receives. Its consumer group is
//! created at that id in one script per shard, so the cut is one atomic
//! point. A definition without cuts is still being created, and no router
//! delivers it.

use std::collections::BTreeMap;

use protocol::{Keys, RedisConnection};
use serde::{Deserialize, Serialize};

use crate::config::{DestinationConfig, Unlisted};

/// Adds a definition unless its name exists. KEYS: catalog, revision.
/// ARGV: name, the definition as a JSON object without its revision.
/// Returns the new revision, or 0 if the name exists.
const CREATE: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
local revision = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], '{"revision":' .. revision .. ',' .. string.sub(ARGV[2], 2))
return revision
"#;

/// Replaces a definition if it is still at the expected revision. KEYS:
/// catalog, revision. ARGV: name, expected revision, the definition as a
/// JSON object without its revision. Returns the new revision, 0 if it
/// changed meanwhile, -1 if it is gone.
const REPLACE: &str = r#"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return -1 end
if cjson.decode(current)['revision'] ~= tonumber(ARGV[2]) then return 0 end
local revision = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], '{"revision":' .. revision .. ',' .. string.sub(ARGV[3], 2))
return revision
"#;

/// Removes a definition. KEYS: catalog, revision. ARGV: name. Returns 1 if
/// it existed.
const DELETE: &str = r"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('INCR', KEYS[2])
return 1
";

/// Creates a consumer group and returns where it starts: the cut. An
/// existing group is kept where it is (nothing it still owes is skipped).
/// KEYS: shard stream. ARGV: group, start id (`$`, `0` or an id).
const CUT: &str = r"
local created = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2], 'MKSTREAM')
if type(created) == 'table' and created.err and not string.find(created.err, 'BUSYGROUP', 1, true) then
  return redis.error_reply(created.err)
end
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  if info['name'] == ARGV[1] then return info['last-delivered-id'] end
end
return redis.error_reply('ERR the group vanished while it was created')
";

/// Sets up a filtered destination's delivery on one shard and returns its
/// cut: the routing stage's group on the shard stream (created at the
/// start if missing; an existing one stays where it is), the destination's
/// group on its reference stream, and its routing mark at the cut, so the
/// routing stage adds references from there on (catching up on what it
/// has already passed), and its name in the shard's routed set (what
/// trimming walks). KEYS: shard stream, reference stream, routing marks,
/// routed set. ARGV: the destination, start id (`$`, `0` or an id), the
/// routing stage's group.
const ROUTED_CUT: &str = r"
local created = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[3], ARGV[2], 'MKSTREAM')
if type(created) == 'table' and created.err and not string.find(created.err, 'BUSYGROUP', 1, true) then
  return redis.error_reply(created.err)
end
local cut = ARGV[2]
if cut == '$' then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then cut = info[i + 1] end
  end
elseif cut == '0' then
  cut = '0-0'
end
created = redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[1], '0', 'MKSTREAM')
if type(created) == 'table' and created.err and not string.find(created.err, 'BUSYGROUP', 1, true) then
  return redis.error_reply(created.err)
end
redis.call('HSET', KEYS[3], ARGV[1], cut)
redis.call('SADD', KEYS[4], ARGV[1])
return cut
";

/// A destination as the catalog holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Definition {
    /// The catalog revision of its last change; written by the scripts.
    #[serde(default, skip_serializing)]
    pub revision: u64,
    /// Unix ms of its creation.
    pub created_at_ms: u64,
    /// Per shard, the stream id after which its events begin; empty while
    /// it is being created.
    #[serde(default)]
    pub cuts: Vec<String>,
    /// While it is being created: the id its groups start at (`$`, `0` or
    /// an id), so any router can complete an interrupted creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_id: Option<String>,
    /// Whether it reads references written by the routing stage
    /// ([`crate::worker::routing`]) instead of a group on the shard streams:
    /// decided at its creation, by whether it had `event_types` then
    /// (decision 0004). A later change of its `event_types` changes what
    /// it gets, not how it reads.
    #[serde(default)]
    pub routed: bool,
    pub settings: DestinationConfig,
}

impl Definition {
    /// Whether its consumer groups exist on every shard, so routers deliver it.
    pub fn is_ready(&self) -> bool {
        !self.cuts.is_empty()
    }

    fn to_json(&self) -> String {
        // Secrets in clear: the routers sign with them.
        serde_json::to_string(self).expect("a definition serializes")
    }
}

/// Where a new destination's delivery starts on every shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At the first event still in the streams: a deployment's first start.
    Beginning,
    /// After the last event accepted before the creation.
    Now,
    /// At the first retained event accepted at or after this Unix ms.
    Since(u64),
}

impl Start {
    fn group_id(self) -> String {
        match self {
            Start::Beginning | Start::Since(0) => "0".into(),
            Start::Now => "$".into(),
            // The last possible id of the millisecond before.
            Start::Since(ms) => format!("{}-{}", ms - 1, u64::MAX),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("destination `{0}` exists")]
    Exists(String),
    #[error("no destination named `{0}`")]
    Unknown(String),
    #[error("destination `{0}` is still being created; try again shortly, or delete it if its creation was interrupted")]
    Creating(String),
    #[error("destination `{0}` was deleted while it was being created")]
    DeletedWhileCreating(String),
    #[error("destination `{0}` changed too often while being updated; try again")]
    Contended(String),
    #[error("a stored definition is unreadable: {0}")]
    Corrupt(String),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Deleted, but some shards' Redis did not answer: their groups may
    /// remain, holding back those shards' trimming until a delete again.
    #[error("destination `{name}` is deleted, but the Redis of shards {shards:?} did not answer: its consumer groups there may remain and hold back their trimming; delete it again once they answer")]
    GroupsLeft { name: String, shards: Vec<u16> },
}

impl CatalogError {
    /// Whether trying again later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CatalogError::Redis(_)
                | CatalogError::Creating(_)
                | CatalogError::Contended(_)
                | CatalogError::GroupsLeft { .. }
        )
    }
}

/// What [`Catalog::apply`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
    pub deleted: Vec<String>,
}

/// Reads and changes the catalog.
#[derive(Clone)]
pub struct Catalog {
    con: RedisConnection,
    keys: Keys,
    shards: u16,
}

impl Catalog {
    pub fn new(con: RedisConnection, keys: Keys, shards: u16) -> Self {
        Self { con, keys, shards }
    }

    /// An EVAL of one of the catalog's scripts, its two keys given.
    fn script(&self, script: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script)
            .arg(2)
            .arg(self.keys.catalog())
            .arg(self.keys.catalog_revision());
        cmd
    }

    /// The current revision; 0 before the first destination was ever defined.
    pub async fn revision(&self) -> Result<u64, CatalogError> {
        let revision: Option<u64> = redis::cmd("GET")
            .arg(self.keys.catalog_revision())
            .query_async(&mut self.con.clone())
            .await?;
        Ok(revision.unwrap_or(0))
    }

    /// Every definition, by name, with the revision read before them (a
    /// change landing in between is seen again at the next read).
    pub async fn load(&self) -> Result<(u64, BTreeMap<String, Definition>), CatalogError> {
        let revision = self.revision().await?;
        let stored: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.catalog())
            .query_async(&mut self.con.clone())
            .await?;
        let mut definitions = BTreeMap::new();
        for (name, json) in stored {
            let definition: Definition = serde_json::from_str(&json)
                .map_err(|e| CatalogError::Corrupt(format!("`{name}`: {e}")))?;
            definitions.insert(name, definition);
        }
        Ok((revision, definitions))
    }

    pub async fn get(&self, name: &str) -> Result<Definition, CatalogError> {
        let json: Option<String> = redis::cmd("HGET")
            .arg(self.keys.catalog())
            .arg(name)
            .query_async(&mut self.con.clone())
            .await?;
        let json = json.ok_or_else(|| CatalogError::Unknown(name.to_owned()))?;
        serde_json::from_str(&json).map_err(|e| CatalogError::Corrupt(format!("`{name}`: {e}")))
    }

    /// Creates a destination (its settings already checked): reserves the
    /// name, creates its consumer group on every shard at `start`, and
    /// records the cuts, after which routers deliver it.
    pub async fn create(
        &self,
        settings: DestinationConfig,
        start: Start,
    ) -> Result<Definition, CatalogError> {
        let name = settings.name.clone();
        let mut definition = Definition {
            revision: 0,
            created_at_ms: protocol::unix_millis(),
            cuts: Vec::new(),
            start_id: Some(start.group_id()),
            routed: !settings.event_types.is_empty(),
            settings,
        };
        let revision: u64 = self
            .script(CREATE)
            .arg(&name)
            .arg(definition.to_json())
            .query_async(&mut self.con.clone())
            .await?;
        if revision == 0 {
            return Err(match self.get(&name).await {
                Ok(existing) if !existing.is_ready() => CatalogError::Creating(name),
                _ => CatalogError::Exists(name),
            });
        }
        definition.revision = revision;
        self.complete(definition).await
    }

    /// Completes a creation: each shard's group at the definition's start
    /// (kept where it is if it exists), then the cuts recorded, after which
    /// routers deliver it. Safe to run twice: the second finds the groups.
    async fn complete(&self, mut definition: Definition) -> Result<Definition, CatalogError> {
        let name = definition.settings.name.clone();
        let start = definition.start_id.take().unwrap_or_else(|| "$".into());
        let mut cuts = Vec::with_capacity(usize::from(self.shards));
        for shard in 0..self.shards {
            let cut = self.cut(&definition, shard, &start).await?;
            cuts.push(cut);
        }
        definition.cuts = cuts;
        match self.replace(&definition).await? {
            Some(revision) => {
                definition.revision = revision;
                tracing::info!(destination = %name, revision, %start, "Destination created.");
                Ok(definition)
            }
            None => {
                // Deleted meanwhile: its groups must not outlive it.
                let destroyed = destroy_groups(&self.con, &self.keys, self.shards, &name).await;
                if !destroyed.failed.is_empty() {
                    return Err(CatalogError::GroupsLeft {
                        name,
                        shards: destroyed.failed,
                    });
                }
                Err(CatalogError::DeletedWhileCreating(name))
            }
        }
    }

    /// Creates `name`'s consumer group on `shard` again after it went
    /// missing (deleted by hand, or Redis lost it), at the cut recorded at
    /// the destination's creation: the events of its lifetime still
    /// retained are delivered again (at least once; nothing is skipped).
    /// Refused for a destination deleted or still being created, so a
    /// worker that has not yet stopped cannot bring a deleted group back.
    pub async fn restore_group(&self, name: &str, shard: u16) -> Result<String, CatalogError> {
        let definition = self.get(name).await?;
        let cut = definition
            .cuts
            .get(usize::from(shard))
            .ok_or_else(|| CatalogError::Creating(name.to_owned()))?;
        self.cut(&definition, shard, cut).await
    }

    /// Creates `definition`'s group on `shard` at `start` (kept where it is
    /// if it exists) and returns where it starts: on the shard stream, or,
    /// for a routed destination, on its reference stream with its routing
    /// mark at the cut.
    async fn cut(
        &self,
        definition: &Definition,
        shard: u16,
        start: &str,
    ) -> Result<String, CatalogError> {
        let name = &definition.settings.name;
        let mut con = self.con.clone();
        if !definition.routed {
            return Ok(ensure_group(&mut con, &self.keys.events(shard), name, start).await?);
        }
        Ok(redis::cmd("EVAL")
            .arg(ROUTED_CUT)
            .arg(4)
            .arg(self.keys.events(shard))
            .arg(self.keys.refs(shard, name))
            .arg(self.keys.routing_marks(shard))
            .arg(self.keys.routed(shard))
            .arg(name)
            .arg(start)
            .arg(protocol::keys::ROUTING_GROUP)
            .query_async(&mut con)
            .await?)
    }

    /// Changes a ready destination's settings with `change`, retrying when
    /// another change lands in between.
    pub async fn update(
        &self,
        name: &str,
        mut change: impl FnMut(&mut DestinationConfig) -> Result<(), CatalogError>,
    ) -> Result<Definition, CatalogError> {
        for _ in 0..10 {
            let mut definition = self.get(name).await?;
            if !definition.is_ready() {
                return Err(CatalogError::Creating(name.to_owned()));
            }
            change(&mut definition.settings)?;
            if let Some(revision) = self.replace(&definition).await? {
                definition.revision = revision;
                tracing::info!(destination = %name, revision, "Destination updated.");
                return Ok(definition);
            }
        }
        Err(CatalogError::Contended(name.to_owned()))
    }

    /// Writes `definition` if it is still at its revision: the new
    /// revision, or `None` if it is gone. Another change in between is
    /// [`CatalogError::Contended`] for a caller that cannot retry.
    async fn replace(&self, definition: &Definition) -> Result<Option<u64>, CatalogError> {
        let name = &definition.settings.name;
        let revision: i64 = self
            .script(REPLACE)
            .arg(name)
            .arg(definition.revision)
            .arg(definition.to_json())
            .query_async(&mut self.con.clone())
            .await?;
        match revision {
            -1 => Ok(None),
            0 => Err(CatalogError::Contended(name.clone())),
            revision => Ok(Some(revision.unsigned_abs())),
        }
    }

    /// Deletes a destination: its definition, then its consumer groups (so
    /// they stop holding back trimming). Its dead letters are kept; its
    /// leases are released by the routers holding them as they stop. Also
    /// deletes the groups of a name with no definition (left by an earlier
    /// version, or by hand).
    pub async fn delete(&self, name: &str) -> Result<(), CatalogError> {
        let existed: i64 = self
            .script(DELETE)
            .arg(name)
            .query_async(&mut self.con.clone())
            .await?;
        let destroyed = destroy_groups(&self.con, &self.keys, self.shards, name).await;
        // A destination created again under this name starts unpaused.
        let _: i64 = redis::cmd("SREM")
            .arg(self.keys.paused())
            .arg(name)
            .query_async(&mut self.con.clone())
            .await?;
        if !destroyed.failed.is_empty() {
            return Err(CatalogError::GroupsLeft {
                name: name.to_owned(),
                shards: destroyed.failed,
            });
        }
        if existed == 0 && destroyed.removed == 0 {
            return Err(CatalogError::Unknown(name.to_owned()));
        }
        tracing::info!(destination = %name, "Destination deleted.");
        Ok(())
    }

    /// Makes the catalog hold `wanted` (a config file's list, checked):
    /// creates the missing, updates the different, and with
    /// [`Unlisted::Remove`] deletes the others. On a deployment's first
    /// definition ever, the new ones start at the beginning of the streams,
    /// so events accepted before any router ran are delivered.
    pub async fn apply(
        &self,
        wanted: &[DestinationConfig],
        unlisted: Unlisted,
    ) -> Result<Applied, CatalogError> {
        let (revision, current) = self.load().await?;
        let start = if revision == 0 {
            Start::Beginning
        } else {
            Start::Now
        };
        let mut applied = Applied::default();
        for settings in wanted {
            let name = settings.name.clone();
            let same = |stored: &DestinationConfig| same_settings(stored, settings);
            let mut stored = current.get(&name).cloned();
            if let Some(interrupted) = stored.take_if(|stored| !stored.is_ready()) {
                // A creation cut short (its router died): finish it.
                match self.complete(interrupted).await {
                    Ok(completed) => stored = Some(completed),
                    // Another router finished it first.
                    Err(CatalogError::Contended(_)) => stored = Some(self.get(&name).await?),
                    Err(error) => return Err(error),
                }
            }
            match &stored {
                Some(stored) if same(&stored.settings) => applied.unchanged.push(name),
                Some(_) => {
                    self.update(&name, |stored| {
                        *stored = settings.clone();
                        Ok(())
                    })
                    .await?;
                    applied.updated.push(name);
                }
                None => match self.create(settings.clone(), start).await {
                    Ok(_) => applied.created.push(name),
                    // Another router applying the same file got there first.
                    Err(CatalogError::Exists(_)) => applied.unchanged.push(name),
                    Err(error) => return Err(error),
                },
            }
        }
        if unlisted == Unlisted::Remove {
            for name in current.keys() {
                if !wanted.iter().any(|d| &d.name == name) {
                    self.delete(name).await?;
                    applied.deleted.push(name.clone());
                }
            }
        }
        Ok(applied)
    }
}

/// Whether two settings are the same (secrets compared in clear).
fn same_settings(a: &DestinationConfig, b: &DestinationConfig) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// Creates `group` on `stream` at `start` (`$`, `0` or an id), creating the
/// stream if missing, and returns where the group stands: where it was
/// created, or where it already was (nothing it still owes is skipped).
pub async fn ensure_group(
    con: &mut RedisConnection,
    stream: &str,
    group: &str,
    start: &str,
) -> redis::RedisResult<String> {
    redis::cmd("EVAL")
        .arg(CUT)
        .arg(1)
        .arg(stream)
        .arg(group)
        .arg(start)
        .query_async(con)
        .await
}

/// What deleting a destination's groups did.
#[derive(Debug, Default)]
struct Destroyed {
    /// Groups and reference streams deleted.
    removed: u16,
    /// Shards whose Redis did not answer: their group may remain.
    failed: Vec<u16>,
}

/// Deletes `destination`'s consumer group on every shard, so a deleted
/// destination stops holding back trimming. Its dead-letter streams are
/// kept. Its leases are not deleted: a router still delivering the pair
/// releases its lease as it stops, and until then no other router may take
/// it (were the destination created again at once, two would deliver).
/// Shards are done at once and apart: one whose Redis does not answer (a
/// paused cluster master) keeps its group, the others are freed.
async fn destroy_groups(
    con: &RedisConnection,
    keys: &Keys,
    shards: u16,
    destination: &str,
) -> Destroyed {
    let each = (0..shards).map(|shard| async move {
        let removed = destroy_group(&mut con.clone(), keys, shard, destination).await;
        (shard, removed)
    });
    let mut destroyed = Destroyed::default();
    for (shard, removed) in futures_util::future::join_all(each).await {
        match removed {
            Ok(removed) => destroyed.removed += removed,
            Err(error) => {
                tracing::warn!(destination, shard, %error, "Cannot delete the consumer group on this shard.");
                destroyed.failed.push(shard);
            }
        }
    }
    if destroyed.removed > 0 {
        tracing::info!(
            destination,
            removed = destroyed.removed,
            "Consumer groups deleted."
        );
    }
    destroyed
}

/// Deletes `destination`'s group (and reference stream) on one shard;
/// returns how many of the two there were.
async fn destroy_group(
    con: &mut RedisConnection,
    keys: &Keys,
    shard: u16,
    destination: &str,
) -> redis::RedisResult<u16> {
    let mut removed = 0;
    // A routed destination's mark first, so the routing stage adds no
    // reference after its stream is gone ([`crate::worker::routing`]).
    let _: i64 = redis::cmd("HDEL")
        .arg(keys.routing_marks(shard))
        .arg(destination)
        .query_async(con)
        .await?;
    // Then from the routed set, so trimming stops walking a stream about
    // to go (a walk finding no stream would hold trimming back).
    let _: i64 = redis::cmd("SREM")
        .arg(keys.routed(shard))
        .arg(destination)
        .query_async(con)
        .await?;
    let refs: i64 = redis::cmd("DEL")
        .arg(keys.refs(shard, destination))
        .query_async(con)
        .await?;
    if refs > 0 {
        removed += 1;
    }
    let stream = keys.events(shard);
    // XGROUP DESTROY refuses a missing stream with a plain `ERR`, which
    // only its text tells apart; asking first needs no text.
    let exists: bool = redis::cmd("EXISTS").arg(&stream).query_async(con).await?;
    if exists {
        let destroyed: i64 = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(&stream)
            .arg(destination)
            .query_async(con)
            .await?;
        if destroyed > 0 {
            removed += 1;
        }
    }
    // Its delivery log goes with it (its dead letters stay).
    let _: i64 = redis::cmd("DEL")
        .arg(keys.delivery_log(shard, destination))
        .query_async(con)
        .await?;
    Ok(removed)
}
