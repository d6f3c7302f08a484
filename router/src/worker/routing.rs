//! The routing stage (decision 0004): per shard, one task reads the shard
//! stream once, in its own consumer group ([`GROUP`]), and adds to the
//! reference stream of each filtered destination (one with `event_types`
//! at its creation, [`crate::control::catalog::Definition::routed`]) a reference to
//! every entry that destination takes: an entry with the event's own id
//! and no payload. Each filtered destination reads its reference stream in
//! a consumer group of its own ([`crate::worker::consumer`] answers each reference
//! with its event), so an event costs a destination that does not want it
//! nothing but one rule check here.
//!
//! - **Order and idempotence.** The stage is the only writer of a reference
//!   stream and adds in id order, and Redis refuses an id not above a
//!   stream's last: routing an entry twice (after a failure, or by the next
//!   owner of the lease) adds nothing. A batch's references, its
//!   acknowledgements and its wake-up signal are one script.
//! - **One owner.** The stage holds the lease of the pair (shard, [`GROUP`]),
//!   dealt like any (shard, destination) pair; every read and every routing
//!   starts only if it ends within the lease.
//! - **Creation cut.** A destination's creation records its cut and a
//!   routing mark at it ([`crate::control::catalog`]). While it has a mark, the
//!   stage routes it only by catching it up, before each batch: it reads
//!   the entries between the mark and its own position again, adds the
//!   destination's references and moves the mark, in one script per chunk,
//!   and drops the mark once caught up; from then on the destination is
//!   routed with every batch. Trimming
//!   keeps everything above a mark ([`crate::control::retention`]).
//! - **Changes.** The rule (event types, per-event `destinations`, cut) is
//!   the destination's as this router knows it when the batch is routed:
//!   a PATCH of `event_types` applies from the next batch routed after the
//!   router has read it. A deleted destination's mark and reference stream
//!   are removed first, and the script adds nothing to a stream that is
//!   gone.

use std::collections::HashMap;
use std::sync::Arc;

use protocol::{Backoff, Keys, RedisConnection, StreamId};
use tokio_util::sync::CancellationToken;

use crate::control::lease::LeaseGuard;
use crate::control::registry::Registry;
use crate::worker::consumer::{ConsumerError, Entry, EntryContent, GroupConsumer, ReadFrom};
use crate::worker::pair::WorkerSettings;
use crate::worker::wakeup::Wakeup;

/// The routing stage's consumer group on every shard stream, and the
/// destination part of its lease.
pub const GROUP: &str = protocol::keys::ROUTING_GROUP;

/// Entries read and routed at a time (and per catch-up chunk).
const BATCH: usize = 500;

/// Signal entries kept (approximately): readers need only the newest.
const SIGNAL_CAP: u32 = 100;

/// Routes one batch. KEYS: shard stream, routing marks, routing signal,
/// then one reference stream per destination in ARGV. ARGV: the routing
/// group, the signal stream's cap, the number of entries to acknowledge,
/// their ids, then per
/// destination: its name, how many ids, the ids. A destination with a mark
/// (being caught up) or whose reference stream is gone (deleted) gets
/// nothing. One signal entry names the destinations that got references,
/// so only their readers wake (it is written, naming none, after a batch
/// that added nothing too), its field `protocol::keys::ROUTING_SIGNAL_FIELD`.
/// Returns how many references were added.
const ROUTE: &str = r"
local acks = tonumber(ARGV[3])
local i = 4 + acks
local key = 4
local added = 0
local named = {}
while i <= #ARGV do
  local name, count = ARGV[i], tonumber(ARGV[i + 1])
  local refs = KEYS[key]
  key = key + 1
  -- A destination with a mark is routed by its catch-up only, in order.
  if redis.call('EXISTS', refs) == 1 and redis.call('HEXISTS', KEYS[2], name) == 0 then
    local before = added
    for j = i + 2, i + 1 + count do
      -- Refused when not above the stream's last: routed before.
      local reply = redis.pcall('XADD', refs, ARGV[j], 'r', '1')
      if type(reply) ~= 'table' or not reply.err then added = added + 1 end
    end
    if added > before then table.insert(named, name) end
  end
  i = i + 2 + count
end
if acks > 0 then redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 4, 3 + acks)) end
-- Written after every batch, naming no one when nothing was added: the
-- shard's announcer, blocked on the signal alone, then looks again at
-- whether the stage waits for the shard stream.
if acks > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'd', table.concat(named, ','))
end
return added
";

/// Catches one destination up. KEYS: routing marks, its reference stream,
/// the routing signal. ARGV: its name, the new mark (empty: caught up,
/// drop the mark), the signal stream's cap, the ids to reference. Nothing
/// if it has no mark any more (deleted) or its stream is gone. Returns how
/// many references were added.
const CATCH_UP: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
local added = 0
for j = 4, #ARGV do
  local reply = redis.pcall('XADD', KEYS[2], ARGV[j], 'r', '1')
  if type(reply) ~= 'table' or not reply.err then added = added + 1 end
end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if added > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[1])
end
return added
";

/// Drops the marks of destinations with nothing to catch up, each only if
/// it is still the one read (a destination deleted and created again
/// meanwhile has a newer mark, caught up next time). KEYS: routing marks.
/// ARGV: name, mark, name, mark, ….
const DROP_MARKS: &str = r"
local dropped = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    dropped = dropped + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return dropped
";

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A filtered destination as one batch is routed.
struct Route {
    name: String,
    refs: String,
    /// Entries at or below it are before its creation.
    cut: StreamId,
    destination: Arc<crate::destination::delivery::Destination>,
}

/// The routing stage of one shard.
pub struct Stage {
    pub consumer: GroupConsumer,
    pub commands: RedisConnection,
    pub keys: Keys,
    pub registry: Arc<Registry>,
    pub wakeup: Wakeup,
}

impl Stage {
    fn shard(&self) -> u16 {
        self.consumer.shard()
    }

    /// The filtered destinations this router knows, with their cuts here.
    fn routes(&self) -> Vec<Route> {
        let shard = self.shard();
        self.registry
            .known()
            .into_iter()
            .filter(|known| known.definition.routed)
            .map(|known| Route {
                name: known.destination.name.clone(),
                refs: self.keys.refs(shard, &known.destination.name),
                cut: known
                    .definition
                    .cuts
                    .get(usize::from(shard))
                    .and_then(|cut| cut.parse().ok())
                    .unwrap_or_default(),
                destination: known.destination,
            })
            .collect()
    }

    /// Takes over what an earlier owner left pending, creating the group
    /// at the start of the stream if it is missing (lost with Redis's data,
    /// or by hand: everything retained is routed again, and what was routed
    /// before is refused); returns the stage's position (the last entry it
    /// has read).
    async fn prepare(&self) -> Result<StreamId, RoutingError> {
        let events = self.keys.events(self.shard());
        let position =
            crate::control::catalog::ensure_group(&mut self.commands.clone(), &events, GROUP, "0")
                .await?;
        self.consumer.claim_pending_of_others().await?;
        self.consumer.remove_idle_consumers().await?;
        Ok(position.parse().unwrap_or_default())
    }

    /// Catches up every destination with a mark below `position`, and drops
    /// the marks at or above it (those destinations are routed with the
    /// batches from now on; their cut keeps out what came before it).
    async fn catch_up(
        &self,
        routes: &[Route],
        position: StreamId,
        lease: &mut LeaseGuard,
        settings: &WorkerSettings,
        shutdown: &CancellationToken,
    ) -> Result<bool, RoutingError> {
        let marks: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.routing_marks(self.shard()))
            .query_async(&mut self.commands.clone())
            .await?;
        // Destinations created at or after the stage's position (all of a
        // router's at its first start) have nothing to catch up: one
        // script drops all their marks.
        let (level, behind): (Vec<&Route>, Vec<&Route>) = routes
            .iter()
            .filter(|route| marks.contains_key(&route.name))
            .partition(|route| {
                marks[&route.name].parse::<StreamId>().unwrap_or_default() >= position
            });
        if !level.is_empty() {
            if !lease.hold_for(settings.read_span, shutdown).await {
                return Ok(false);
            }
            let mut script = redis::cmd("EVAL");
            script
                .arg(DROP_MARKS)
                .arg(1)
                .arg(self.keys.routing_marks(self.shard()));
            for route in &level {
                script.arg(&route.name).arg(&marks[&route.name]);
            }
            let _dropped: u64 = script.query_async(&mut self.commands.clone()).await?;
        }
        for route in behind {
            let mut mark: StreamId = marks[&route.name].parse().unwrap_or_default();
            loop {
                if !lease.hold_for(settings.read_span, shutdown).await {
                    return Ok(false);
                }
                let entries = if mark < position {
                    self.consumer.range(mark, position, BATCH).await?
                } else {
                    Vec::new()
                };
                let last = entries.last().map(|entry| entry.id);
                // Caught up unless a full chunk ended below the position.
                let next_mark = last.filter(|last| entries.len() == BATCH && *last < position);
                let ids = Matcher::new(std::slice::from_ref(route))
                    .take(&entries)
                    .pop()
                    .unwrap_or_default();
                let mut script = redis::cmd("EVAL");
                script
                    .arg(CATCH_UP)
                    .arg(3)
                    .arg(self.keys.routing_marks(self.shard()))
                    .arg(&route.refs)
                    .arg(self.keys.routing_signal(self.shard()))
                    .arg(&route.name);
                script
                    .arg(next_mark.map(|mark| mark.to_string()).unwrap_or_default())
                    .arg(SIGNAL_CAP)
                    .arg(&ids);
                let added: u64 = script.query_async(&mut self.commands.clone()).await?;
                let Some(next_mark) = next_mark else {
                    tracing::info!(
                        destination = %route.name,
                        shard = self.shard(),
                        added,
                        "Filtered destination caught up with the routing stage; routed with every batch from now on."
                    );
                    break;
                };
                mark = next_mark;
            }
        }
        Ok(true)
    }

    /// Routes `entries` (read in id order) and acknowledges them, in one
    /// script.
    async fn route(&self, routes: &[Route], entries: &[Entry]) -> Result<(), RoutingError> {
        let mut script = redis::cmd("EVAL");
        script
            .arg(ROUTE)
            .arg(3 + routes.len())
            .arg(self.keys.events(self.shard()))
            .arg(self.keys.routing_marks(self.shard()))
            .arg(self.keys.routing_signal(self.shard()));
        for route in routes {
            script.arg(&route.refs);
        }
        script.arg(GROUP).arg(SIGNAL_CAP).arg(entries.len());
        for entry in entries {
            script.arg(entry.id);
        }
        let taken = Matcher::new(routes).take(entries);
        let mut not_taken = Vec::with_capacity(routes.len());
        for (route, ids) in routes.iter().zip(&taken) {
            let after_cut = entries.len() - entries.partition_point(|entry| entry.id <= route.cut);
            not_taken.push(after_cut - ids.len());
            script.arg(&route.name).arg(ids.len()).arg(ids);
        }
        let _added: u64 = script.query_async(&mut self.commands.clone()).await?;
        for (route, count) in routes.iter().zip(not_taken) {
            if count > 0 {
                route.destination.stats.filtered_many(count as u64);
            }
        }
        Ok(())
    }
}

/// The routes' rules as one batch is routed, indexed by event type: an
/// entry is checked against the routes that may take it, not against every
/// filtered destination (64 destinations, each taking one type, cost the
/// stage 64 rule checks an event otherwise).
struct Matcher<'a> {
    routes: &'a [Route],
    /// Exact event type → the routes taking it.
    exact: HashMap<String, Vec<usize>>,
    /// Type prefixes (`order.*` → `order.`) and the route taking each.
    prefixes: Vec<(String, usize)>,
    /// Routes without `event_types`: every event, typed or not.
    everything: Vec<usize>,
}

impl<'a> Matcher<'a> {
    fn new(routes: &'a [Route]) -> Self {
        let mut matcher = Self {
            routes,
            exact: HashMap::new(),
            prefixes: Vec::new(),
            everything: Vec::new(),
        };
        for (index, route) in routes.iter().enumerate() {
            let endpoint = route.destination.endpoint();
            if endpoint.event_types().is_empty() {
                matcher.everything.push(index);
            }
            for wanted in endpoint.event_types() {
                match wanted.strip_suffix('*') {
                    Some(prefix) => matcher.prefixes.push((prefix.to_owned(), index)),
                    None => matcher.exact.entry(wanted.clone()).or_default().push(index),
                }
            }
        }
        matcher
    }

    /// Per route, in order, the ids of `entries` it takes: events after its
    /// cut, of a type it subscribes to, addressed to it or to everyone.
    fn take(&self, entries: &[Entry]) -> Vec<Vec<StreamId>> {
        let mut taken = vec![Vec::new(); self.routes.len()];
        for entry in entries {
            let EntryContent::Event(event) = &entry.content else {
                continue;
            };
            let typed = event.event_type.as_deref().map(|event_type| {
                let exact = self.exact.get(event_type).into_iter().flatten().copied();
                let prefixed = self
                    .prefixes
                    .iter()
                    .filter(move |(prefix, _)| event_type.starts_with(prefix.as_str()))
                    .map(|(_, index)| *index);
                exact.chain(prefixed)
            });
            let candidates = self
                .everything
                .iter()
                .copied()
                .chain(typed.into_iter().flatten());
            for index in candidates {
                let route = &self.routes[index];
                let ids = &mut taken[index];
                // A route with two patterns matching one type takes it once.
                if entry.id > route.cut
                    && ids.last() != Some(&entry.id)
                    && event.is_for(&route.name)
                {
                    ids.push(entry.id);
                }
            }
        }
        taken
    }
}

/// Routes shard `stage.consumer.shard()` until `shutdown` (the router
/// stopping, or the lease lost or handed over).
pub async fn run(
    mut stage: Stage,
    settings: WorkerSettings,
    mut lease: LeaseGuard,
    shutdown: CancellationToken,
) {
    let shard = stage.shard();
    let mut position: Option<StreamId> = None;
    let mut from = ReadFrom::Pending(StreamId::default());
    let mut failures = 0u32;
    loop {
        let step = stage.step(&mut position, &from, &mut lease, &settings, &shutdown);
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            result = step => result,
        };
        match result {
            Ok(None) => return,
            Ok(Some((count, last))) => {
                failures = 0;
                if let Some(last) = last {
                    position = position.max(Some(last));
                }
                match (&mut from, last) {
                    (ReadFrom::Pending(after), Some(last)) => *after = last,
                    (ReadFrom::Pending(_), None) => from = ReadFrom::New,
                    (ReadFrom::New, _) => {
                        if count < BATCH && !stage.wakeup.wait(settings.block, &shutdown).await {
                            return;
                        }
                    }
                }
            }
            // Not `run_with_retries`: the step after a failure starts again
            // from the pending list, a different step.
            Err(error) => {
                failures += 1;
                tracing::warn!(shard, %error, "Routing failed; retrying.");
                if !Backoff::COMMANDS.wait(failures, &shutdown).await {
                    return;
                }
                // A reply lost in the failure may have left entries pending
                // on us; route the pending list again before anything newer.
                from = ReadFrom::Pending(StreamId::default());
                position = None;
            }
        }
    }
}

impl Stage {
    /// One step, while the lease surely outlasts it: prepares the group
    /// (once, or after a failure), catches up destinations created since,
    /// then reads a batch from `from` and routes it. The batch's size and
    /// last id; `None` when the lease is going.
    async fn step(
        &mut self,
        position: &mut Option<StreamId>,
        from: &ReadFrom,
        lease: &mut LeaseGuard,
        settings: &WorkerSettings,
        shutdown: &CancellationToken,
    ) -> Result<Option<(usize, Option<StreamId>)>, RoutingError> {
        if !lease.hold_for(settings.read_span, shutdown).await {
            return Ok(None);
        }
        let at = match *position {
            Some(at) => at,
            None => self.prepare().await?,
        };
        *position = Some(at);
        let routes = self.routes();
        if !self
            .catch_up(&routes, at, lease, settings, shutdown)
            .await?
        {
            return Ok(None);
        }
        if !lease.hold_for(settings.read_span, shutdown).await {
            return Ok(None);
        }
        let reading_new = *from == ReadFrom::New;
        if reading_new {
            self.wakeup.mark_seen();
        }
        let entries = self.consumer.read(from, BATCH, None).await?;
        if !entries.is_empty() {
            if !lease.hold_for(settings.read_span, shutdown).await {
                return Ok(None);
            }
            if reading_new && entries.len() < BATCH {
                // Caught up: the stage waits once this batch is routed.
                // The batch's signal wakes an announcer blocked on the
                // signal alone, which then watches the shard stream
                // for the stage too.
                self.wakeup.expect_to_wait();
            }
            self.route(&routes, &entries).await?;
        }
        Ok(Some((entries.len(), entries.last().map(|e| e.id))))
    }
}

#[cfg(test)]
mod tests {
    use protocol::EventEntry;

    use super::*;
    use crate::destination::delivery::Destination;
    use crate::outbound::Policy;

    #[test]
    fn the_route_script_writes_the_signal_field_the_wakeups_read() {
        let field = format!("'*', '{}',", protocol::keys::ROUTING_SIGNAL_FIELD);
        assert!(ROUTE.contains(&field), "ROUTE must write {field}");
    }

    fn route(name: &str, event_types: &[&str], cut: u64) -> Route {
        let config = crate::config::Config::defaults();
        let policy = Policy::new(&config.outbound).expect("default policy");
        let mut settings = config.destinations[0].clone();
        settings.name = name.to_owned();
        settings.event_types = event_types.iter().map(|t| (*t).to_owned()).collect();
        let destination = Destination::new(&settings, &policy, 1).expect("client builds");
        Route {
            name: name.to_owned(),
            refs: format!("refs:{name}"),
            cut: StreamId { ms: cut, seq: 0 },
            destination: Arc::new(destination),
        }
    }

    fn entry(ms: u64, event_type: Option<&str>, destinations: Option<&[&str]>) -> Entry {
        Entry {
            id: StreamId { ms, seq: 0 },
            bytes: 0,
            content: EntryContent::Event(EventEntry {
                user_id: "u".to_owned(),
                payload: "{}".to_owned(),
                received_at_ms: 0,
                message_id: None,
                destinations: destinations.map(|d| d.iter().map(|n| (*n).to_owned()).collect()),
                event_type: event_type.map(str::to_owned),
                source: None,
                replay: None,
                trace: None,
            }),
        }
    }

    /// The index takes exactly what each destination's own rule and cut
    /// take, once each, in order.
    #[test]
    fn the_index_takes_what_each_destinations_rule_takes() {
        let routes = vec![
            route("orders", &["order.*"], 0),
            route("both", &["order.created", "order.*"], 0),
            route("all", &[], 0),
            route("signups", &["user.created"], 3),
            route("any-typed", &["*"], 0),
        ];
        let mut entries = Vec::new();
        for (ms, event_type, destinations) in [
            (1, Some("order.created"), None),
            (2, Some("user.created"), None),
            (3, Some("user.created"), None),
            (4, Some("user.created"), Some(&["orders"][..])),
            (5, None, None),
            (6, Some("order.paid"), Some(&["both", "signups"][..])),
            (7, Some("user.created"), Some(&["signups"][..])),
            (8, Some("ordered"), None),
        ] {
            entries.push(entry(ms, event_type, destinations));
        }
        entries.push(Entry {
            id: StreamId { ms: 9, seq: 0 },
            bytes: 0,
            content: EntryContent::Deleted,
        });
        let taken = Matcher::new(&routes).take(&entries);
        for (route, ids) in routes.iter().zip(&taken) {
            let expected: Vec<StreamId> = entries
                .iter()
                .filter(|entry| {
                    entry.id > route.cut
                        && matches!(&entry.content, EntryContent::Event(event)
                            if route.destination.endpoint().wants(event))
                })
                .map(|entry| entry.id)
                .collect();
            assert_eq!(ids, &expected, "{}", route.name);
        }
        let ms = |index: usize| taken[index].iter().map(|id| id.ms).collect::<Vec<_>>();
        assert_eq!(ms(1), [1, 6], "both: once each");
        assert_eq!(ms(3), [7], "signups: after its cut, addressed to it");
        assert_eq!(ms(4), [1, 2, 3, 8], "any-typed: typed, for everyone");
    }
}
