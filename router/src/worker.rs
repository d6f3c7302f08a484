//! The delivery loop of one destination on one shard.
//!
//! A reader task fetches entries within the worker's memory budget (entries
//! and bytes, [`crate::budget`]); the dispatcher admits them into per-user
//! queues ([`crate::parking`]) and runs one job ([`crate::job`]) per user at
//! a time: a user's next event starts only after the previous one's
//! terminal outcome is recorded. Jobs of different users run concurrently.
//! A user whose head is in backoff, or who has more queued than its
//! allowance, has its further entries parked (ids only), so reading goes on
//! for everyone else.
//!
//! Every read and every attempt starts only if it ends while this router
//! still surely holds the (shard, destination) lease; see [`crate::lease`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use protocol::StreamId;
use tokio::sync::mpsc;
use tokio::task::{Id as TaskId, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::budget::{Amount, Budget};
use crate::consumer::{redis_backoff, EntryContent, GroupConsumer, ReadFrom};
use crate::delivery::Destination;
use crate::job::{self, Blocked, Held, JobContext, JobEnd, Source};
use crate::lease::LeaseGuard;
use crate::parking::{Admission, Next, ParkedCount, UserQueues};

#[derive(Debug, Clone, Copy)]
pub struct WorkerSettings {
    pub batch_size: usize,
    pub block: Duration,
    /// Longest a read can take: the block time plus the reply timeout.
    pub read_span: Duration,
    /// Most entries held in memory.
    pub window: usize,
    /// Most bytes of entries held in memory.
    pub max_bytes: usize,
    /// Most entries of one user queued behind its head.
    pub max_queued_per_user: usize,
    pub shutdown_grace: Duration,
}

/// What the reader hands the dispatcher.
enum Read {
    /// Entries in stream order.
    Entries(Vec<Held>),
    /// The consumer group was missing and is created anew at the start of
    /// the stream, which the new group hands out again from its first entry.
    GroupRecreated,
}

/// Delivers shard `consumer.shard()` to `destination` until `shutdown`
/// (the router stopping, or the lease lost or handed over).
pub async fn run(
    consumer: GroupConsumer,
    destination: Arc<Destination>,
    settings: WorkerSettings,
    lease: LeaseGuard,
    shutdown: CancellationToken,
) {
    let consumer = Arc::new(consumer);
    let budget = Budget::new(Amount {
        entries: settings.window,
        bytes: settings.max_bytes,
    });
    let (batches, mut incoming) = mpsc::channel(2);
    let reader = tokio::spawn(read_loop(
        consumer.clone(),
        destination.clone(),
        batches,
        budget.clone(),
        settings,
        lease.clone(),
        shutdown.clone(),
    ));
    let (blocked, mut blocked_users) = mpsc::unbounded_channel();
    let context = Arc::new(JobContext {
        consumer,
        destination,
        budget,
        shutdown: shutdown.clone(),
        blocked,
    });
    let mut dispatcher = Dispatcher {
        context,
        lease,
        queues: UserQueues::new(settings.max_queued_per_user),
        admitted_up_to: None,
        jobs: JoinSet::new(),
        job_users: HashMap::new(),
        published: ParkedCount::default(),
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(finished) = dispatcher.jobs.join_next_with_id() => dispatcher.finished(finished),
            Some(blocked) = blocked_users.recv() => dispatcher.blocked(blocked),
            read = incoming.recv() => match read {
                Some(Read::Entries(entries)) => dispatcher.accept(entries),
                // Entries admitted before count as new again (delivered
                // twice rather than left pending in the new group forever).
                Some(Read::GroupRecreated) => dispatcher.admitted_up_to = None,
                None => break,
            },
        }
    }
    // Stop reading; let attempts in flight finish within the grace period.
    // Jobs in backoff stop at once (their entries stay pending).
    let _ = reader.await;
    let drained = tokio::time::timeout(settings.shutdown_grace, async {
        while let Some(finished) = dispatcher.jobs.join_next_with_id().await {
            dispatcher.finished(finished);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            destination = %dispatcher.context.destination.name,
            shard = dispatcher.context.consumer.shard(),
            "Attempts still in flight after the shutdown grace period; they stay pending."
        );
        dispatcher.jobs.abort_all();
    }
}

struct Dispatcher {
    context: Arc<JobContext>,
    lease: LeaseGuard,
    queues: UserQueues<Held>,
    /// The highest stream id admitted. Entries arrive in id order, so one
    /// at or below it is a second copy (the reader re-scans the pending
    /// list after a Redis error) and is dropped.
    admitted_up_to: Option<StreamId>,
    jobs: JoinSet<JobEnd>,
    /// The user of each running job; `None` for entries outside per-user
    /// order (not for this destination, deleted, malformed).
    job_users: HashMap<TaskId, Option<String>>,
    /// The parked counts last added to the destination's stats.
    published: ParkedCount,
}

impl Dispatcher {
    fn accept(&mut self, entries: Vec<Held>) {
        for held in entries {
            let id = held.entry.id;
            if self.admitted_up_to.is_some_and(|up_to| id <= up_to) {
                continue;
            }
            self.admitted_up_to = Some(id);
            // Only events sent to this destination wait for each other;
            // anything else is settled at once.
            let user = match &held.entry.content {
                EntryContent::Event(event) if event.is_for(&self.context.destination.name) => {
                    event.user_id.clone()
                }
                _ => {
                    self.start(None, Source::Held(held));
                    continue;
                }
            };
            match self.queues.admit(&user, id, held) {
                Admission::Start(held) => self.start(Some(user), Source::Held(held)),
                Admission::Queued => {}
                // Dropping it gives back its budget; its id is kept.
                Admission::Parked(held) => drop(held),
            }
        }
        self.publish_parked();
    }

    fn start(&mut self, user: Option<String>, source: Source) {
        let handle = self
            .jobs
            .spawn(job::run(self.context.clone(), self.lease.clone(), source));
        self.job_users.insert(handle.id(), user);
    }

    fn blocked(&mut self, blocked: Blocked) {
        // Dropping the evicted entries gives back their budget.
        drop(self.queues.blocked(&blocked.user, blocked.head));
        self.publish_parked();
    }

    fn finished(&mut self, result: Result<(TaskId, JobEnd), tokio::task::JoinError>) {
        let (task, end) = match &result {
            Ok((task, end)) => (*task, Some(*end)),
            Err(error) => {
                if error.is_panic() {
                    tracing::error!(destination = %self.context.destination.name, %error, "Delivery job panicked; its entry stays pending.");
                }
                (error.id(), None)
            }
        };
        let Some(user) = self.job_users.remove(&task) else {
            return;
        };
        // An abandoned entry stays pending, so nothing after it may start
        // (jobs abandon only at shutdown or when the lease goes).
        if end == Some(JobEnd::Abandoned) || self.context.shutdown.is_cancelled() {
            return;
        }
        let Some(user) = user else {
            return;
        };
        match self.queues.finished(&user) {
            Next::Start(held) => self.start(Some(user), Source::Held(held)),
            Next::Fetch(id) => self.start(Some(user), Source::Parked(id)),
            Next::Idle => {}
        }
        self.publish_parked();
    }

    fn publish_parked(&mut self) {
        let now = self.queues.parked();
        if now != self.published {
            self.context
                .destination
                .stats
                .parked_changed(self.published, now);
            self.published = now;
        }
    }
}

impl Drop for Dispatcher {
    /// What this worker parked is no longer its to count (the next owner
    /// counts it again when it re-reads the pending list).
    fn drop(&mut self) {
        self.context
            .destination
            .stats
            .parked_changed(self.published, ParkedCount::default());
    }
}

/// Fetches entries while the budget has room: first everything pending on
/// us (in id order), then new entries.
async fn read_loop(
    consumer: Arc<GroupConsumer>,
    destination: Arc<Destination>,
    batches: mpsc::Sender<Read>,
    budget: Arc<Budget>,
    settings: WorkerSettings,
    mut lease: LeaseGuard,
    shutdown: CancellationToken,
) {
    let mut from = ReadFrom::Pending(StreamId::default());
    let mut failures = 0u32;
    let mut prepared = false;
    loop {
        if !prepared {
            // Claiming entries is an owner's act, like reading.
            if !lease.hold_for(settings.read_span, &shutdown).await {
                return;
            }
            match prepare(&consumer).await {
                Ok(()) => prepared = true,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(shard = consumer.shard(), %error, "Cannot prepare consumer group; retrying.");
                    if !redis_backoff(&shutdown, failures).await {
                        return;
                    }
                    continue;
                }
            }
        }
        // Paused: read nothing more, so the group's lag shows the backlog.
        if !destination.wait_until_resumed(&shutdown).await {
            return;
        }
        let mut reservation = tokio::select! {
            () = shutdown.cancelled() => return,
            reservation = budget.reserve_for_read(settings.batch_size) => reservation,
        };
        // A read by a router whose lease has expired would take entries
        // away from the new owner, so a read starts only if it ends in time.
        if !lease.hold_for(settings.read_span, &shutdown).await {
            return;
        }
        // A read abandoned here may leave entries pending on us unseen; the
        // next owner of this shard claims and reads them first.
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            result = consumer.read(&from, reservation.entries(), settings.block) => result,
        };
        match result {
            Ok(entries) => {
                failures = 0;
                if let ReadFrom::Pending(after) = &mut from {
                    match entries.last() {
                        Some(last) => *after = last.id,
                        None => from = ReadFrom::New,
                    }
                }
                if let Some(largest) = entries.iter().map(|entry| entry.bytes).max() {
                    budget.observe(largest);
                }
                let held: Vec<Held> = entries
                    .into_iter()
                    .map(|entry| Held {
                        charge: reservation.take(entry.bytes),
                        entry,
                    })
                    .collect();
                // Room reserved but not filled goes back now.
                drop(reservation);
                if !held.is_empty() && !hand_over(&batches, Read::Entries(held), &shutdown).await {
                    return;
                }
            }
            Err(error) => {
                drop(reservation);
                failures += 1;
                if error.is_missing_group() {
                    tracing::warn!(
                        shard = consumer.shard(),
                        "Consumer group missing; recreating it."
                    );
                    prepared = false;
                    if !hand_over(&batches, Read::GroupRecreated, &shutdown).await {
                        return;
                    }
                } else {
                    tracing::warn!(shard = consumer.shard(), %error, "Reading the stream failed; retrying.");
                    if !redis_backoff(&shutdown, failures).await {
                        return;
                    }
                }
                // A reply lost in the failure may have left entries pending on
                // us; re-read the pending list before anything newer.
                from = ReadFrom::Pending(StreamId::default());
            }
        }
    }
}

/// Passes a read to the dispatcher; false once the worker stops (the
/// dispatcher no longer takes reads then, so waiting for room could last
/// forever and keep the worker from ending).
async fn hand_over(batches: &mpsc::Sender<Read>, read: Read, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        sent = batches.send(read) => sent.is_ok(),
    }
}

/// Takes over what earlier owners left: their pending entries become ours
/// (read first, in id order), and their consumers, now empty, are removed.
async fn prepare(consumer: &GroupConsumer) -> Result<(), crate::consumer::ConsumerError> {
    consumer.ensure_group().await?;
    let claimed = consumer.claim_pending_of_others().await?;
    let removed = consumer.remove_idle_consumers().await?;
    if claimed > 0 || !removed.is_empty() {
        tracing::info!(
            shard = consumer.shard(),
            claimed,
            removed_consumers = ?removed,
            "Took over entries pending on earlier owners."
        );
    }
    Ok(())
}
