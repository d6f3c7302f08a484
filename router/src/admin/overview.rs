//! The state of every destination: what Redis says (lag, pending, dead
//! letters, lease owners, paused) and what this router counted. It is
//! measured when asked for (the admin API, the console, `/metrics`), at
//! most once per interval: asking Redis costs commands per (shard,
//! destination) pair, which with hundreds of destinations and several
//! routers is no small load when nobody looks. The admin API and the
//! console show the same snapshot; the Prometheus gauges are set from it
//! before a scrape is answered. Each interval also checks every worker for
//! a stall. (Following the catalog and the paused set is
//! [`crate::control::follower`]'s, in a task of its own.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::Keys;
use protocol::RedisConnection;
use redis::{FromRedisValue, Value};
use serde::Serialize;
use telemetry::lifecycle::Ticks;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::control::registry::{Known, Registry};
use crate::destination::breaker::{BreakerState, BreakerView};
use crate::destination::delivery::Destination;
use crate::destination::progress::{Change, WorkerState, WorkerView};
use crate::destination::stats::Counts;

/// Everything the admin API says about one destination.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct DestinationView {
    pub name: String,
    pub url: String,
    /// Event types it subscribes to; empty: all.
    pub event_types: Vec<String>,
    /// The catalog revision of its definition's last change.
    pub revision: u64,
    /// Unix ms of its creation.
    pub created_at_ms: u64,
    pub paused: bool,
    /// Its circuit breaker on this router.
    pub breaker: BreakerView,
    /// Entries no router has read for this destination yet, over all
    /// shards (`XINFO GROUPS` lag); `None` when Redis cannot tell.
    pub lag: Option<u64>,
    /// Entries read but not yet finished (delivered or dead-lettered).
    pub pending: u64,
    /// Entries in the destination's dead-letter streams.
    pub dead_letters: u64,
    /// Unix ms at which the oldest event read but not finished was accepted
    /// (over the shards measured); `None` when nothing is pending.
    pub oldest_pending_ms: Option<u64>,
    /// This router's counters since it started.
    #[serde(flatten)]
    pub counts: Counts,
    /// Deliveries per second by this router over the last interval.
    pub delivery_rate: f64,
    /// Per shard, the router instance holding the lease (None: nobody).
    pub owners: Vec<Option<String>>,
    /// This router's workers of the destination, by shard: what each
    /// waits on, and whether it is stalled.
    pub workers: Vec<WorkerView>,
}

/// One measurement of every configured destination.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Overview {
    /// Increases with every measurement; a page and an API answer showing
    /// the same sequence show the same numbers.
    pub sequence: u64,
    /// Unix milliseconds of the measurement.
    pub measured_at_ms: u64,
    /// The router instance that measured (its counters are its own).
    pub instance: String,
    pub shards: u16,
    /// The catalog revision this router follows.
    pub revision: u64,
    /// Shards whose Redis did not answer this measurement (a master down
    /// or paused): their lag, pending entries, dead letters and lease
    /// owners are missing from it (each lag is null, each owner null).
    pub unmeasured_shards: Vec<u16>,
    pub destinations: Vec<DestinationView>,
}

/// The latest overview, shared with the admin API.
pub type SharedOverview = Arc<Overviews>;

/// The latest measurement, and when it was taken (`None`: never).
struct Measured {
    at: Option<Instant>,
    overview: Overview,
}

/// The overview, measured on request by [`run`]: a request finds the
/// latest if it is younger than the interval, or asks for a new one and
/// waits for it (at most `patience`, then takes the latest it has).
pub struct Overviews {
    latest: watch::Sender<Measured>,
    /// A request wants a measurement (a permit is kept until [`run`] looks).
    wanted: Notify,
    every: Duration,
    patience: Duration,
}

impl Overviews {
    /// `empty` is shown until the first measurement; `patience` bounds a
    /// request's wait for one (a measurement's Redis commands each have
    /// their own timeout, so it ends in about one).
    pub fn new(empty: Overview, every: Duration, patience: Duration) -> Self {
        Self {
            latest: watch::Sender::new(Measured {
                at: None,
                overview: empty,
            }),
            wanted: Notify::new(),
            every,
            patience,
        }
    }

    fn recent(&self, measured: &Measured) -> bool {
        measured.at.is_some_and(|at| at.elapsed() < self.every)
    }

    /// A measurement at most one interval old, or the latest there is if
    /// none came within `patience`.
    pub async fn fresh(&self) -> Overview {
        // Subscribed before looking: a measurement published after the
        // look wakes the wait below.
        let mut updates = self.latest.subscribe();
        {
            let latest = updates.borrow_and_update();
            if self.recent(&latest) {
                return latest.overview.clone();
            }
        }
        self.wanted.notify_one();
        let _ = tokio::time::timeout(self.patience, updates.changed()).await;
        let latest = updates.borrow();
        latest.overview.clone()
    }
}

/// Measures destinations on request, remembering what it needs for rates.
pub struct Observer {
    con: RedisConnection,
    keys: Keys,
    shards: u16,
    instance: String,
    registry: Arc<Registry>,
    /// When the last measurement was taken and each destination's
    /// delivered count then, for rates.
    previous: Option<(Instant, HashMap<String, u64>)>,
    sequence: u64,
    /// How long a worker may make no progress before it is stalled.
    stall_after: Duration,
}

impl Observer {
    pub fn new(
        con: RedisConnection,
        keys: Keys,
        shards: u16,
        instance: String,
        registry: Arc<Registry>,
        stall_after: Duration,
    ) -> Self {
        Self {
            stall_after,
            con,
            keys,
            shards,
            instance,
            registry,
            previous: None,
            sequence: 0,
        }
    }

    /// Takes a new measurement.
    pub async fn measure(&mut self) -> redis::RedisResult<Overview> {
        let revision = self.registry.revision();
        let known = self.registry.known();
        let routed: Vec<bool> = known.iter().map(|k| k.definition.routed).collect();
        let mut views: Vec<DestinationView> =
            known.into_iter().map(|known| self.view_of(known)).collect();
        // Shards are asked at once, so one whose Redis does not answer
        // costs the measurement one timeout, and leaves only its own
        // figures out; the measurement fails only when no shard answers.
        let names: Vec<&str> = views.iter().map(|view| view.name.as_str()).collect();
        let routed_names: Vec<&str> = names
            .iter()
            .zip(&routed)
            .filter(|(_, routed)| **routed)
            .map(|(name, _)| *name)
            .collect();
        let asked = (0..self.shards).map(|shard| self.ask_shard(shard, &names, &routed_names));
        let answers = futures_util::future::join_all(asked).await;
        let mut unmeasured_shards = Vec::new();
        let mut first_error = None;
        for (shard, answer) in (0..self.shards).zip(answers) {
            match answer {
                Ok(figures) => figures.add_to(&mut views),
                Err(error) => {
                    for view in &mut views {
                        view.lag = None;
                        view.owners.push(None);
                    }
                    unmeasured_shards.push(shard);
                    first_error.get_or_insert(error);
                }
            }
        }
        if let Some(error) = first_error {
            if unmeasured_shards.len() == usize::from(self.shards) {
                return Err(error);
            }
            tracing::debug!(?unmeasured_shards, %error, "Some shards could not be measured.");
        }
        self.set_rates(&mut views);
        self.sequence += 1;
        Ok(Overview {
            sequence: self.sequence,
            measured_at_ms: protocol::unix_millis(),
            instance: self.instance.clone(),
            shards: self.shards,
            revision,
            unmeasured_shards,
            destinations: views,
        })
    }

    /// What this router knows of a destination, before Redis is asked.
    fn view_of(&self, known: Known) -> DestinationView {
        let Known {
            destination: d,
            definition,
        } = known;
        DestinationView {
            name: d.name.clone(),
            url: definition.settings.url.clone(),
            event_types: definition.settings.event_types.clone(),
            revision: definition.revision,
            created_at_ms: definition.created_at_ms,
            paused: d.is_paused(),
            breaker: d.breaker.view(),
            lag: Some(0),
            pending: 0,
            dead_letters: 0,
            oldest_pending_ms: None,
            counts: d.stats.counts(),
            delivery_rate: 0.0,
            owners: Vec::with_capacity(usize::from(self.shards)),
            workers: workers_of(&d, self.stall_after),
        }
    }

    /// Shard `shard`'s groups, dead letters and lease owners of the
    /// destinations `names` (those in `routed` read references).
    async fn ask_shard(
        &self,
        shard: u16,
        names: &[&str],
        routed: &[&str],
    ) -> redis::RedisResult<ShardFigures> {
        let mut con = self.con.clone();
        let mut groups = self.groups(&mut con, shard).await?;
        let routing_lag = groups
            .get(protocol::keys::ROUTING_GROUP)
            .map(|group| group.lag);
        for (name, group) in self.reference_groups(&mut con, shard, routed).await? {
            // What the routing stage has not read may be for it too.
            let lag = group.lag.zip(routing_lag.flatten()).map(|(a, b)| a + b);
            groups.insert(name, GroupInfo { lag, ..group });
        }
        let mut pipe = redis::pipe();
        for name in names {
            pipe.cmd("XLEN")
                .arg(self.keys.dead_letters(shard, name))
                .cmd("GET")
                .arg(self.keys.lease(shard, name));
            // The oldest pending entry (its id is its event's acceptance).
            let pending = groups.get(*name).is_some_and(|group| group.pending > 0);
            let stream = match routed.contains(name) {
                true => self.keys.refs(shard, name),
                false => self.keys.events(shard),
            };
            match pending {
                true => pipe.cmd("XPENDING").arg(stream).arg(*name),
                false => pipe.cmd("ECHO").arg(""),
            };
        }
        let replies: Vec<Value> = pipe.query_async(&mut con).await?;
        let per_destination = names
            .iter()
            .zip(replies.chunks_exact(3))
            .map(|(name, replies)| DestinationFigures {
                group: groups.get(*name).copied(),
                dead_letters: u64::from_redis_value(replies[0].clone()).unwrap_or(0),
                owner: Option::<String>::from_redis_value(replies[1].clone()).unwrap_or(None),
                oldest_pending_ms: oldest_pending_ms(&replies[2]),
            })
            .collect();
        Ok(ShardFigures { per_destination })
    }

    /// Each view's deliveries per second since the last measurement.
    fn set_rates(&mut self, views: &mut [DestinationView]) {
        let now = Instant::now();
        if let Some((then, delivered)) = &self.previous {
            let seconds = now.duration_since(*then).as_secs_f64();
            for view in views.iter_mut() {
                let Some(before) = delivered.get(&view.name) else {
                    continue;
                };
                if seconds > 0.0 {
                    view.delivery_rate =
                        view.counts.delivered.saturating_sub(*before) as f64 / seconds;
                }
            }
        }
        let delivered = views
            .iter()
            .map(|v| (v.name.clone(), v.counts.delivered))
            .collect();
        self.previous = Some((now, delivered));
    }

    /// Warns about workers that became stalled (naming their waits) and
    /// notes those that recovered; sets `router_stalled_workers`. Local:
    /// it works while Redis does not answer.
    pub fn check_stalls(&self) {
        let now = Instant::now();
        for destination in self.registry.destinations() {
            let mut stalled = 0usize;
            for worker in destination.workers.running() {
                let change = worker.check(now, self.stall_after);
                if change.is_stalled() {
                    stalled += 1;
                }
                match change {
                    Change::Stalled(stall) => {
                        let waiting_on: Vec<&str> =
                            stall.waiting_on.iter().map(|w| w.describe()).collect();
                        tracing::warn!(
                            destination = %destination.name,
                            shard = worker.shard(),
                            no_progress_for_ms = u64::try_from(stall.for_.as_millis()).unwrap_or(u64::MAX),
                            waiting_on = %waiting_on.join("; "),
                            "Delivery worker stalled: it has work but made no progress."
                        );
                    }
                    Change::Recovered => tracing::info!(
                        destination = %destination.name,
                        shard = worker.shard(),
                        "Delivery worker no longer stalled."
                    ),
                    Change::Fine | Change::StillStalled => {}
                }
            }
            metrics::gauge!("router_stalled_workers", "destination" => destination.name.clone())
                .set(stalled as f64);
        }
    }

    /// Brings the workers of a snapshot up to date (when Redis cannot be
    /// measured, what the workers wait on is still known here).
    fn refresh_workers(&self, overview: &mut Overview) {
        for view in &mut overview.destinations {
            if let Some(known) = self.registry.get(&view.name) {
                view.workers = workers_of(&known.destination, self.stall_after);
            }
        }
    }

    /// Pending and lag of the routed destinations `names` on `shard`, in
    /// their reference streams' groups (none for a group that is missing).
    async fn reference_groups(
        &self,
        con: &mut RedisConnection,
        shard: u16,
        names: &[&str],
    ) -> redis::RedisResult<Vec<(String, GroupInfo)>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut script = redis::cmd("EVAL");
        script.arg(REFERENCE_GROUPS).arg(names.len());
        for name in names {
            script.arg(self.keys.refs(shard, name));
        }
        let replies: Vec<(i64, i64)> = script.arg(names).query_async(con).await?;
        Ok(names
            .iter()
            .zip(replies)
            .filter(|(_, (pending, _))| *pending >= 0)
            .map(|(name, (pending, lag))| {
                let info = GroupInfo {
                    pending: pending.unsigned_abs(),
                    lag: u64::try_from(lag).ok(),
                };
                ((*name).to_owned(), info)
            })
            .collect())
    }

    /// Pending and lag of every group on one shard stream.
    async fn groups(
        &self,
        con: &mut RedisConnection,
        shard: u16,
    ) -> redis::RedisResult<HashMap<String, GroupInfo>> {
        let reply: Result<Vec<HashMap<String, Value>>, _> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(self.keys.events(shard))
            .query_async(con)
            .await;
        let groups = match reply {
            Ok(groups) => groups,
            // The stream does not exist (yet): no groups.
            Err(error) if error.code() == Some("ERR") => return Ok(HashMap::new()),
            Err(error) => return Err(error),
        };
        Ok(groups
            .into_iter()
            .filter_map(|group| {
                let field = |name: &str| group.get(name).cloned().unwrap_or(Value::Nil);
                let name = String::from_redis_value(field("name")).ok()?;
                let info = GroupInfo {
                    pending: u64::from_redis_value(field("pending")).unwrap_or(0),
                    lag: Option::<u64>::from_redis_value(field("lag")).unwrap_or(None),
                };
                Some((name, info))
            })
            .collect())
    }
}

fn workers_of(destination: &Destination, stall_after: Duration) -> Vec<WorkerView> {
    let now = Instant::now();
    destination
        .workers
        .running()
        .iter()
        .map(|worker| worker.view(now, stall_after))
        .collect()
}

impl DestinationView {
    /// How many of this router's workers of the destination are stalled.
    pub fn stalled_workers(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.state == WorkerState::Stalled)
            .count()
    }
}

/// KEYS: reference streams. ARGV: the destination reading each. Per
/// destination `{pending, lag}`: lag -1 when Redis cannot tell, pending -1
/// when the group is missing.
const REFERENCE_GROUPS: &str = r"
local replies = {}
for i, refs in ipairs(KEYS) do
  local reply = {-1, -1}
  if redis.call('EXISTS', refs) == 1 then
    for _, group in ipairs(redis.call('XINFO', 'GROUPS', refs)) do
      local info = {}
      for j = 1, #group, 2 do info[group[j]] = group[j + 1] end
      if info['name'] == ARGV[i] then
        reply = {info['pending'], info['lag'] or -1}
      end
    end
  end
  replies[i] = reply
end
return replies
";

#[derive(Debug, Clone, Copy)]
struct GroupInfo {
    pending: u64,
    lag: Option<u64>,
}

/// What one shard said of each destination, in the views' order.
struct ShardFigures {
    per_destination: Vec<DestinationFigures>,
}

struct DestinationFigures {
    /// `None`: no group (deleted a moment ago, or by hand).
    group: Option<GroupInfo>,
    dead_letters: u64,
    owner: Option<String>,
    /// Unix ms of the oldest pending entry's acceptance.
    oldest_pending_ms: Option<u64>,
}

/// The time in the smallest id of an `XPENDING` summary.
fn oldest_pending_ms(summary: &Value) -> Option<u64> {
    let (_, smallest, _, _) =
        <(u64, Option<String>, Option<String>, Value)>::from_redis_value(summary.clone()).ok()?;
    smallest?.split_once('-')?.0.parse().ok()
}

impl ShardFigures {
    /// Adds the shard's figures to each view.
    fn add_to(self, views: &mut [DestinationView]) {
        for (view, figures) in views.iter_mut().zip(self.per_destination) {
            view.dead_letters += figures.dead_letters;
            view.owners.push(figures.owner);
            view.oldest_pending_ms = match (view.oldest_pending_ms, figures.oldest_pending_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match figures.group {
                Some(group) => {
                    view.pending += group.pending;
                    view.lag = view.lag.zip(group.lag).map(|(a, b)| a + b);
                }
                None => view.lag = None,
            }
        }
    }
}

/// Sets the Redis-derived gauges from a measurement.
fn export(overview: &Overview) {
    for view in &overview.destinations {
        let name = view.name.clone();
        if let Some(lag) = view.lag {
            metrics::gauge!("router_lag", "destination" => name.clone()).set(lag as f64);
        }
        metrics::gauge!("router_pending", "destination" => name.clone()).set(view.pending as f64);
        metrics::gauge!("router_dead_letters", "destination" => name.clone())
            .set(view.dead_letters as f64);
        metrics::gauge!("router_breaker_open", "destination" => name.clone()).set(
            match view.breaker.state {
                BreakerState::Closed => 0.0,
                BreakerState::HalfOpen => 0.5,
                BreakerState::Open => 1.0,
            },
        );
        metrics::gauge!("router_paused", "destination" => name.clone()).set(if view.paused {
            1.0
        } else {
            0.0
        });
        for (shard, owner) in view.owners.iter().enumerate() {
            let owned = owner.as_deref() == Some(overview.instance.as_str());
            metrics::gauge!(
                "router_lease_owned",
                "destination" => name.clone(),
                "shard" => shard.to_string()
            )
            .set(if owned { 1.0 } else { 0.0 });
        }
    }
}

/// Checks every worker for a stall every `every`, and measures whenever
/// a request asks for it (at most once per interval), until `shutdown`.
pub async fn run(
    mut observer: Observer,
    overviews: SharedOverview,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = Ticks::new(every);
    loop {
        tokio::select! {
            ticked = ticks.next(&shutdown) => match ticked {
                true => observer.check_stalls(),
                false => return,
            },
            () = overviews.wanted.notified() => {
                // Asked again by a request that came during the last one.
                if overviews.recent(&overviews.latest.borrow()) {
                    continue;
                }
                measure(&mut observer, &overviews).await;
            }
        }
    }
}

/// Takes and publishes one measurement; when Redis does not answer, the
/// latest one is published again with its workers' states brought up to
/// date (and asked for again by the next request). The stall check runs
/// first, so `router_stalled_workers` agrees with the workers it shows.
async fn measure(observer: &mut Observer, overviews: &Overviews) {
    observer.check_stalls();
    match observer.measure().await {
        Ok(overview) => {
            export(&overview);
            overviews.latest.send_replace(Measured {
                at: Some(Instant::now()),
                overview,
            });
        }
        Err(error) => {
            tracing::debug!(%error, "Cannot measure destinations; will retry.");
            overviews
                .latest
                .send_modify(|latest| observer.refresh_workers(&mut latest.overview));
        }
    }
}
