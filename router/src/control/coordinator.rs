//! Which (shard, destination) pairs this router delivers, over time.
//!
//! Every `lease.renew_interval_ms` the coordinator:
//! 1. sends a renewal for the leases it holds, one script per shard; a
//!    lease it can no longer prove it holds (renewal refused, or Redis
//!    unreachable until the lease lapsed) is lost: its worker is stopped
//!    at once;
//! 2. releases the leases of workers it stopped for a hand-over, once they
//!    have finished their attempts in flight;
//! 3. sends its heartbeat. When the membership comes back (or the
//!    heartbeat fails: then by the last one read, as the heartbeat lives on
//!    one master), it computes its share of the pairs among the live
//!    routers ([`assign`]) from the destinations defined now, stops workers
//!    outside its share (a deleted destination's among them), and sends an
//!    acquisition for each pair inside it.
//!
//! Nothing waits for a reply: each is acted on when it comes, and a lease
//! with a command unanswered gets no other meanwhile. So one master in
//! trouble, whose replies come only at the timeout, fails and delays only
//! its own shards' leases; the others are renewed every interval (a tick
//! that waited for every reply renewed them only once per timeout, too
//! rarely to cover an attempt, and their deliveries slowed to a quarter
//! during a failover).
//!
//! A pair's worker is started only when the previous worker of that pair
//! in this process has finished, so one process never runs two at once.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use telemetry::lifecycle::Ticks;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::LeaseConfig;
use crate::control::lease::{assign, LeaseGuard, LeaseId, LeaseStore, LeaseValidity};

/// The pairs to deliver, and how to start the delivery worker of one.
pub trait StartWorker {
    /// Every (shard, destination) pair of the destinations defined now, sorted.
    fn pairs(&self) -> Vec<LeaseId>;
    /// Which creation of `destination` is current; a worker started for
    /// another one is replaced.
    fn generation(&self, destination: &str) -> Option<u64>;
    /// Starts the worker of `lease`; it runs until `stop` is cancelled.
    fn start(&self, lease: &LeaseId, guard: LeaseGuard, stop: CancellationToken) -> JoinHandle<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Delivering.
    Active,
    /// Stopped for a hand-over; the lease is released when the worker ends.
    HandingOver,
    /// The lease is lost; the worker is stopping and nothing is released.
    Lost,
}

struct HeldLease {
    /// The destination's generation the worker delivers.
    generation: Option<u64>,
    validity: LeaseValidity,
    stop: CancellationToken,
    worker: JoinHandle<()>,
    state: State,
}

/// A lease command the coordinator sends without waiting for its reply.
#[derive(Debug, Clone, Copy)]
enum Command {
    Acquire,
    Release,
}

/// Why a held lease is given up.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// Redis refused its renewal: it expired there, or another router holds it.
    Refused,
    /// No renewal was answered in time to prove it is still ours.
    Lapsed,
}

impl Loss {
    /// What the warning says.
    fn reason(self) -> &'static str {
        match self {
            Loss::Refused => "renewal refused: another router holds it or it expired",
            Loss::Lapsed => "not renewed in time (Redis unreachable?)",
        }
    }

    /// The `reason` label of `router_leases_lost_total`.
    fn label(self) -> &'static str {
        match self {
            Loss::Refused => "refused",
            Loss::Lapsed => "lapsed",
        }
    }
}

/// A Redis reply the coordinator acts on when it comes.
enum Answer {
    /// One shard's leases, in one script.
    Renewed {
        leases: Vec<LeaseId>,
        sent_at: Instant,
        result: redis::RedisResult<Vec<bool>>,
    },
    Acquired {
        lease: LeaseId,
        sent_at: Instant,
        result: redis::RedisResult<bool>,
    },
    Released {
        lease: LeaseId,
        result: redis::RedisResult<()>,
    },
    Members(redis::RedisResult<Vec<String>>),
}

type Awaited = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// Most leases one renewal script carries (a shard's leases go in as few as
/// that allows).
const RENEWALS_AT_ONCE: usize = 256;

pub struct Coordinator<W> {
    leases: Arc<LeaseStore>,
    settings: LeaseConfig,
    held: BTreeMap<LeaseId, HeldLease>,
    workers: W,
    /// The live routers as last read.
    members: Vec<String>,
    /// Commands sent and not answered yet. Nothing waits for them: a master
    /// that answers late (paused, failing over) delays only its own leases,
    /// and the next tick goes on for everyone else.
    awaited: FuturesUnordered<Awaited>,
    /// Leases with a command in `awaited`: each gets its next only after.
    busy: HashSet<LeaseId>,
    /// Whether a heartbeat is in `awaited`.
    heartbeat_sent: bool,
    /// Leases whose renewal failed since the last tick, and the first error
    /// (logged once per tick).
    renewal_errors: (usize, Option<redis::RedisError>),
    /// Acquisitions that failed since the last tick (logged once per tick).
    acquisition_errors: Vec<(LeaseId, redis::RedisError)>,
    /// Leases gained, released or being handed over since the last tick
    /// (logged as one line per tick).
    changes: Changes,
}

/// Lease changes since they were last logged: one line says them all
/// (each pair's own line is at debug).
#[derive(Default)]
struct Changes {
    gained: Vec<LeaseId>,
    released: Vec<LeaseId>,
    handing_over: Vec<LeaseId>,
}

impl Changes {
    /// Logs the changes, if any, with how many leases remain held.
    fn report(&mut self, held: usize, instance: &str) {
        if self.gained.is_empty() && self.released.is_empty() && self.handing_over.is_empty() {
            return;
        }
        tracing::info!(
            gained = %summary(&self.gained),
            released = %summary(&self.released),
            handing_over = %summary(&self.handing_over),
            held,
            instance,
            "Leases changed."
        );
        *self = Self::default();
    }
}

/// `crm: shards 0-3, 7; billing: shard 2`, or `none`.
fn summary(leases: &[LeaseId]) -> String {
    if leases.is_empty() {
        return "none".to_owned();
    }
    let mut by_destination: BTreeMap<&str, Vec<u16>> = BTreeMap::new();
    for lease in leases {
        by_destination
            .entry(&lease.destination)
            .or_default()
            .push(lease.shard);
    }
    let mut parts = Vec::with_capacity(by_destination.len());
    for (destination, mut shards) in by_destination {
        shards.sort_unstable();
        shards.dedup();
        let mut ranges: Vec<String> = Vec::new();
        let mut start = 0;
        while start < shards.len() {
            let mut end = start;
            while end + 1 < shards.len() && shards[end + 1] == shards[end] + 1 {
                end += 1;
            }
            ranges.push(if end == start {
                shards[start].to_string()
            } else {
                format!("{}-{}", shards[start], shards[end])
            });
            start = end + 1;
        }
        let noun = if shards.len() == 1 { "shard" } else { "shards" };
        parts.push(format!("{destination}: {noun} {}", ranges.join(", ")));
    }
    parts.join("; ")
}

impl<W: StartWorker> Coordinator<W> {
    pub fn new(leases: LeaseStore, settings: LeaseConfig, workers: W) -> Self {
        Self {
            leases: Arc::new(leases),
            settings,
            held: BTreeMap::new(),
            workers,
            members: Vec::new(),
            awaited: FuturesUnordered::new(),
            busy: HashSet::new(),
            heartbeat_sent: false,
            renewal_errors: (0, None),
            acquisition_errors: Vec::new(),
            changes: Changes::default(),
        }
    }

    /// Runs until `shutdown`, then stops every worker, waits for them, and
    /// releases the leases so other routers take over at once.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut ticks = Ticks::new(self.settings.renew_interval());
        loop {
            tokio::select! {
                more = ticks.next(&shutdown) => {
                    if !more {
                        break;
                    }
                    self.tick();
                }
                Some(answer) = self.awaited.next() => {
                    self.answered(answer);
                    // Everything sent is answered: say what changed now
                    // rather than at the next tick.
                    if self.awaited.is_empty() {
                        self.changes.report(self.held.len(), self.leases.instance());
                    }
                }
            }
        }
        self.stop_all().await;
    }

    /// Sends this tick's renewals and heartbeat, stops the workers of
    /// lapsed leases and releases those handed over. Waits for nothing.
    fn tick(&mut self) {
        self.report_errors();
        self.changes.report(self.held.len(), self.leases.instance());
        let mut renewing: BTreeMap<u16, Vec<LeaseId>> = BTreeMap::new();
        for (lease, held) in &self.held {
            if held.state != State::Lost && !self.busy.contains(lease) {
                renewing.entry(lease.shard).or_default().push(lease.clone());
            }
        }
        for leases in renewing.into_values() {
            for batch in leases.chunks(RENEWALS_AT_ONCE) {
                self.send_renewal(batch.to_vec());
            }
        }
        let lapsed: Vec<LeaseId> = self
            .held
            .iter()
            .filter(|(_, held)| held.state != State::Lost && held.validity.has_lapsed())
            .map(|(lease, _)| lease.clone())
            .collect();
        for lease in lapsed {
            self.lose(&lease, Loss::Lapsed);
        }
        self.reap();
        if !self.heartbeat_sent {
            self.heartbeat_sent = true;
            let store = self.leases.clone();
            self.awaited.push(Box::pin(
                async move { Answer::Members(store.heartbeat().await) },
            ));
        }
    }

    /// Sends `command` for `lease`, which gets no other until it is
    /// answered. A renewal's or acquisition's time is taken just before it
    /// goes out: Redis receives it later, so the lease lasts at least `ttl`
    /// from then.
    fn send(&mut self, lease: LeaseId, command: Command) {
        self.busy.insert(lease.clone());
        let store = self.leases.clone();
        self.awaited.push(Box::pin(async move {
            let sent_at = Instant::now();
            match command {
                Command::Acquire => Answer::Acquired {
                    result: store.try_acquire(&lease).await,
                    lease,
                    sent_at,
                },
                Command::Release => Answer::Released {
                    result: store.release(&lease).await,
                    lease,
                },
            }
        }));
    }

    /// Sends one renewal script for `leases`, all of one shard; they get no
    /// other command until it is answered.
    fn send_renewal(&mut self, leases: Vec<LeaseId>) {
        self.busy.extend(leases.iter().cloned());
        let store = self.leases.clone();
        self.awaited.push(Box::pin(async move {
            let sent_at = Instant::now();
            Answer::Renewed {
                result: store.renew(&leases).await,
                leases,
                sent_at,
            }
        }));
    }

    fn answered(&mut self, answer: Answer) {
        match answer {
            Answer::Renewed {
                leases,
                sent_at,
                result,
            } => self.renewed(leases, sent_at, result),
            Answer::Acquired {
                lease,
                sent_at,
                result,
            } => {
                self.busy.remove(&lease);
                match result {
                    Ok(true) => self.gained(lease, sent_at),
                    // Still held by its previous owner, which hands it over or lets it expire.
                    Ok(false) => {}
                    Err(error) => self.acquisition_errors.push((lease, error)),
                }
            }
            Answer::Released { lease, result } => {
                self.busy.remove(&lease);
                match result {
                    Ok(()) => {
                        tracing::debug!(%lease, "Lease released.");
                        self.changes.released.push(lease);
                    }
                    // It expires by itself; the next owner waits for that.
                    Err(error) => tracing::warn!(%lease, %error, "Cannot release lease."),
                }
            }
            Answer::Members(result) => {
                self.heartbeat_sent = false;
                self.rebalance(result);
            }
        }
    }

    /// Acts on the answer to one shard's renewals.
    fn renewed(
        &mut self,
        leases: Vec<LeaseId>,
        sent_at: Instant,
        result: redis::RedisResult<Vec<bool>>,
    ) {
        for lease in &leases {
            self.busy.remove(lease);
        }
        let renewed = match result {
            Ok(renewed) => renewed,
            // Each keeps its validity until it lapses.
            Err(error) => {
                self.renewal_errors.0 += leases.len();
                self.renewal_errors.1.get_or_insert(error);
                return;
            }
        };
        for (lease, renewed) in leases.iter().zip(renewed) {
            if !renewed {
                self.lose(lease, Loss::Refused);
            } else if let Some(held) = self.held.get(lease) {
                held.validity.renewed(sent_at);
            }
        }
    }

    /// Logs the failures answered since the last tick, once each kind.
    fn report_errors(&mut self) {
        if let (leases, Some(error)) = &self.renewal_errors {
            // Each keeps its validity until it lapses; the others renewed.
            tracing::warn!(leases, %error, "Cannot renew some leases; will retry.");
        }
        if let Some((lease, error)) = self.acquisition_errors.first() {
            tracing::warn!(%lease, leases = self.acquisition_errors.len(), %error, "Cannot acquire some leases; will retry.");
        }
        self.renewal_errors = (0, None);
        self.acquisition_errors.clear();
    }

    fn lose(&mut self, lease: &LeaseId, loss: Loss) {
        if let Some(held) = self.held.get_mut(lease) {
            let reason = loss.reason();
            tracing::warn!(%lease, reason, "Lease lost; stopping delivery of this pair.");
            metrics::counter!("router_leases_lost_total", "reason" => loss.label()).increment(1);
            held.stop.cancel();
            held.state = State::Lost;
        }
    }

    /// Forgets pairs whose workers have ended, releasing handed-over leases.
    fn reap(&mut self) {
        let ended: Vec<LeaseId> = self
            .held
            .iter()
            .filter(|(_, held)| held.worker.is_finished())
            .map(|(lease, _)| lease.clone())
            .collect();
        for lease in ended {
            let Some(held) = self.held.remove(&lease) else {
                continue;
            };
            if held.state != State::Lost {
                // A renewal still awaited answers for a lease no longer held.
                self.send(lease, Command::Release);
            }
        }
    }

    /// Deals the pairs by the membership just read (or, while the
    /// heartbeat's master is unreachable, by the last one read), hands over
    /// those outside this router's share and sends acquisitions for those
    /// inside it.
    fn rebalance(&mut self, heartbeat: redis::RedisResult<Vec<String>>) {
        let members = match heartbeat {
            Ok(members) => {
                self.members.clone_from(&members);
                members
            }
            // The membership lives on one master: while it is unreachable,
            // the last one read still splits the pairs, so the pairs of the
            // healthy masters are still acquired (a lease, not the split,
            // keeps each pair to one owner).
            Err(error) if !self.members.is_empty() => {
                tracing::warn!(%error, "Cannot refresh router membership; dealing by the last one read.");
                self.members.clone()
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot refresh router membership; will retry.");
                return;
            }
        };
        // A pair of a deleted destination is outside every share: its
        // worker is stopped and its lease released like a hand-over.
        let share = assign(&self.workers.pairs(), &members, self.leases.instance());
        for (lease, held) in &mut self.held {
            if held.state != State::Active {
                continue;
            }
            if share.binary_search(lease).is_err() {
                tracing::debug!(%lease, routers = members.len(), "Handing lease over to another router.");
                self.changes.handing_over.push(lease.clone());
            } else if held.generation != self.workers.generation(&lease.destination) {
                // Deleted and created again: the old worker's state is of its old groups.
                tracing::info!(%lease, "Destination created anew; restarting its worker.");
            } else {
                continue;
            }
            held.stop.cancel();
            held.state = State::HandingOver;
        }
        // Each on its own: one unreachable master neither fails nor delays
        // the pairs of the others.
        let wanted: Vec<LeaseId> = share
            .into_iter()
            .filter(|lease| !self.held.contains_key(lease) && !self.busy.contains(lease))
            .collect();
        for lease in wanted {
            self.send(lease, Command::Acquire);
        }
    }

    /// Starts the worker of a lease just acquired by a command sent at `sent_at`.
    fn gained(&mut self, lease: LeaseId, sent_at: Instant) {
        let validity =
            LeaseValidity::new(sent_at, self.settings.ttl(), self.settings.safety_margin());
        let stop = CancellationToken::new();
        let generation = self.workers.generation(&lease.destination);
        let worker = self.workers.start(&lease, validity.guard(), stop.clone());
        tracing::debug!(%lease, instance = self.leases.instance(), "Lease gained.");
        self.changes.gained.push(lease.clone());
        self.held.insert(
            lease,
            HeldLease {
                generation,
                validity,
                stop,
                worker,
                state: State::Active,
            },
        );
    }

    async fn stop_all(mut self) {
        for held in self.held.values() {
            held.stop.cancel();
        }
        // An acquisition that succeeded is released below like the others.
        while let Some(answer) = self.awaited.next().await {
            match answer {
                Answer::Acquired {
                    lease,
                    sent_at,
                    result: Ok(true),
                } => {
                    self.gained(lease.clone(), sent_at);
                    if let Some(held) = self.held.get(&lease) {
                        held.stop.cancel();
                    }
                }
                answer @ Answer::Released { .. } => self.answered(answer),
                _ => {}
            }
        }
        for (lease, held) in std::mem::take(&mut self.held) {
            let _ = held.worker.await;
            if held.state != State::Lost {
                let result = self.leases.release(&lease).await;
                self.answered(Answer::Released { lease, result });
            }
        }
        self.changes.report(0, self.leases.instance());
        if let Err(error) = self.leases.leave().await {
            tracing::warn!(%error, "Cannot withdraw from router membership; it expires by itself.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(destination: &str, shard: u16) -> LeaseId {
        LeaseId {
            shard,
            destination: destination.to_owned(),
        }
    }

    #[test]
    fn a_summary_names_each_destinations_shards_as_ranges() {
        let leases = [
            lease("crm", 3),
            lease("billing", 2),
            lease("crm", 0),
            lease("crm", 1),
            lease("crm", 2),
            lease("crm", 7),
        ];
        assert_eq!(summary(&leases), "billing: shard 2; crm: shards 0-3, 7");
        assert_eq!(summary(&[]), "none");
    }
}
