//! Which (shard, destination) pairs this router delivers, over time.
//!
//! Every `lease.renew_interval_ms` the coordinator:
//! 1. renews the leases it holds, each on its own (one master in trouble
//!    fails only its own shards' renewals); one it can no longer prove it
//!    holds (renewal refused, or Redis unreachable until the lease lapsed)
//!    is lost: its worker is stopped at once;
//! 2. releases the leases of workers it stopped for a hand-over, once they
//!    have finished their attempts in flight;
//! 3. refreshes its heartbeat, computes its share of the pairs among the
//!    live routers ([`assign`]) from the destinations defined now (by the
//!    last membership read while the heartbeat's master is unreachable),
//!    stops workers outside its share (a deleted destination's among them),
//!    and tries to acquire the leases of pairs inside it, all at once, each
//!    on its own.
//!
//! A pair's worker is started only when the previous worker of that pair
//! in this process has finished, so one process never runs two at once.

use std::collections::BTreeMap;
use std::time::Instant;

use telemetry::lifecycle::Ticks;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::LeaseConfig;
use crate::lease::{assign, LeaseGuard, LeaseId, LeaseStore, LeaseValidity};

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

struct Held {
    /// The destination's generation the worker delivers.
    generation: Option<u64>,
    validity: LeaseValidity,
    stop: CancellationToken,
    worker: JoinHandle<()>,
    state: State,
}

pub struct Coordinator<W> {
    leases: LeaseStore,
    settings: LeaseConfig,
    held: BTreeMap<LeaseId, Held>,
    workers: W,
    /// The live routers as last read.
    members: Vec<String>,
}

impl<W: StartWorker> Coordinator<W> {
    pub fn new(leases: LeaseStore, settings: LeaseConfig, workers: W) -> Self {
        Self {
            leases,
            settings,
            held: BTreeMap::new(),
            workers,
            members: Vec::new(),
        }
    }

    /// Runs until `shutdown`, then stops every worker, waits for them, and
    /// releases the leases so other routers take over at once.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut ticks = Ticks::new(self.settings.renew_interval());
        while ticks.next(&shutdown).await {
            self.renew().await;
            self.reap().await;
            self.rebalance().await;
        }
        self.stop_all().await;
    }

    async fn renew(&mut self) {
        let sent_at = Instant::now();
        let renewing: Vec<&LeaseId> = self
            .held
            .iter()
            .filter(|(_, held)| held.state != State::Lost)
            .map(|(lease, _)| lease)
            .collect();
        let results = self.leases.renew(&renewing).await;
        let mut refused = Vec::new();
        let mut unknown = Vec::new();
        for (lease, result) in renewing.into_iter().zip(results) {
            match result {
                Ok(true) => {
                    if let Some(held) = self.held.get(lease) {
                        held.validity.renewed(sent_at);
                    }
                }
                Ok(false) => refused.push(lease.clone()),
                Err(error) => unknown.push((lease.clone(), error)),
            }
        }
        if let Some((_, error)) = unknown.first() {
            // Each keeps its validity until it lapses; the others renewed.
            tracing::warn!(leases = unknown.len(), %error, "Cannot renew some leases; will retry.");
        }
        for lease in refused {
            self.lose(
                &lease,
                "renewal refused: another router holds it or it expired",
            );
        }
        let lapsed: Vec<LeaseId> = self
            .held
            .iter()
            .filter(|(_, held)| held.state != State::Lost && held.validity.has_lapsed())
            .map(|(lease, _)| lease.clone())
            .collect();
        for lease in lapsed {
            self.lose(&lease, "not renewed in time (Redis unreachable?)");
        }
    }

    fn lose(&mut self, lease: &LeaseId, reason: &str) {
        if let Some(held) = self.held.get_mut(lease) {
            tracing::warn!(%lease, reason, "Lease lost; stopping delivery of this pair.");
            held.stop.cancel();
            held.state = State::Lost;
        }
    }

    /// Forgets pairs whose workers have ended, releasing handed-over leases.
    async fn reap(&mut self) {
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
                self.release(&lease).await;
            }
        }
    }

    async fn release(&self, lease: &LeaseId) {
        match self.leases.release(lease).await {
            Ok(()) => tracing::info!(%lease, "Lease released."),
            // It expires by itself; the next owner waits for that.
            Err(error) => tracing::warn!(%lease, %error, "Cannot release lease."),
        }
    }

    async fn rebalance(&mut self) {
        let members = match self.leases.heartbeat().await {
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
                tracing::info!(%lease, routers = members.len(), "Handing lease over to another router.");
            } else if held.generation != self.workers.generation(&lease.destination) {
                // Deleted and created again: the old worker's state is of its old groups.
                tracing::info!(%lease, "Destination created anew; restarting its worker.");
            } else {
                continue;
            }
            held.stop.cancel();
            held.state = State::HandingOver;
        }
        let wanted: Vec<LeaseId> = share
            .into_iter()
            .filter(|lease| !self.held.contains_key(lease))
            .collect();
        // All at once, each on its own: one unreachable master neither
        // fails nor delays the pairs of the others.
        let sent_at = Instant::now();
        let results = futures_util::future::join_all(
            wanted.iter().map(|lease| self.leases.try_acquire(lease)),
        )
        .await;
        let mut failed = Vec::new();
        for (lease, result) in wanted.into_iter().zip(results) {
            match result {
                Ok(true) => self.gained(lease, sent_at),
                // Still held by its previous owner, which hands it over or lets it expire.
                Ok(false) => {}
                Err(error) => failed.push((lease, error)),
            }
        }
        if let Some((lease, error)) = failed.first() {
            tracing::warn!(%lease, leases = failed.len(), %error, "Cannot acquire some leases; will retry.");
        }
    }

    /// Starts the worker of a lease just acquired by a command sent at `sent_at`.
    fn gained(&mut self, lease: LeaseId, sent_at: Instant) {
        let validity =
            LeaseValidity::new(sent_at, self.settings.ttl(), self.settings.safety_margin());
        let stop = CancellationToken::new();
        let generation = self.workers.generation(&lease.destination);
        let worker = self.workers.start(&lease, validity.guard(), stop.clone());
        tracing::info!(%lease, instance = self.leases.instance(), "Lease gained.");
        self.held.insert(
            lease,
            Held {
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
        for (lease, held) in std::mem::take(&mut self.held) {
            let _ = held.worker.await;
            if held.state != State::Lost {
                self.release(&lease).await;
            }
        }
        if let Err(error) = self.leases.leave().await {
            tracing::warn!(%error, "Cannot withdraw from router membership; it expires by itself.");
        }
    }
}
