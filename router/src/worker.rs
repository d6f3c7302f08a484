//! The delivery loop of one destination on one shard.
//!
//! A reader task fetches entries into a bounded window; the dispatcher runs
//! one job per user at a time (a user's next event waits until the previous
//! one reached a terminal outcome) and jobs of different users concurrently.
//! A user in backoff therefore holds back only their own later events.
//!
//! A job ends in one of:
//! - delivered → XACK;
//! - dead (permanent answer or attempts exhausted) → dead-letter + XACK in one MULTI;
//! - not for this destination, or deleted from the stream → XACK;
//! - expired (older than the destination's `max_age_ms`) → dead-letter + XACK;
//! - abandoned at shutdown or when the lease goes → nothing: it stays
//!   pending and is redelivered by the next owner.
//!
//! Every read and every attempt starts only if it ends while this router
//! still surely holds the (shard, destination) lease; see [`crate::lease`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::{Id as TaskId, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::consumer::{ConsumerError, DeadLetter, Entry, EntryContent, GroupConsumer, ReadFrom};
use crate::delivery::{request_body, AttemptOutcome, Destination};
use crate::lease::LeaseGuard;
use crate::stats::AttemptResult;

/// Longest pause between retries of a failing Redis command.
const MAX_REDIS_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct WorkerSettings {
    pub batch_size: usize,
    pub block: Duration,
    /// Longest a read can take: the block time plus the reply timeout.
    pub read_span: Duration,
    pub window: usize,
    pub shutdown_grace: Duration,
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
    let window = Arc::new(Semaphore::new(settings.window));
    let (batches, mut incoming) = mpsc::channel(2);
    let reader = tokio::spawn(read_loop(
        consumer.clone(),
        destination.clone(),
        batches,
        window.clone(),
        settings,
        lease.clone(),
        shutdown.clone(),
    ));

    let mut dispatcher = Dispatcher {
        consumer,
        destination,
        window,
        lease,
        shutdown: shutdown.clone(),
        queued: HashMap::new(),
        in_window: HashSet::new(),
        jobs: JoinSet::new(),
        job_keys: HashMap::new(),
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(finished) = dispatcher.jobs.join_next_with_id() => dispatcher.finished(finished),
            batch = incoming.recv() => match batch {
                Some(entries) => dispatcher.accept(entries),
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
            destination = %dispatcher.destination.name,
            shard = dispatcher.consumer.shard(),
            "Attempts still in flight after the shutdown grace period; they stay pending."
        );
        dispatcher.jobs.abort_all();
    }
}

struct Dispatcher {
    consumer: Arc<GroupConsumer>,
    destination: Arc<Destination>,
    window: Arc<Semaphore>,
    lease: LeaseGuard,
    shutdown: CancellationToken,
    /// Per ordering key (user): entries waiting behind the one in flight.
    /// A key is present exactly while one of its entries is in flight.
    queued: HashMap<String, VecDeque<Entry>>,
    /// Stream ids held in the window, to drop the second copy when the
    /// reader re-scans the pending list after a Redis error.
    in_window: HashSet<String>,
    jobs: JoinSet<()>,
    job_keys: HashMap<TaskId, (String, String)>,
}

/// Events of one user are delivered one at a time in stream order; entries
/// that are not events get their own key so they wait for nothing.
fn ordering_key(entry: &Entry) -> &str {
    match &entry.content {
        EntryContent::Event(event) => &event.user_id,
        EntryContent::Deleted | EntryContent::Malformed(_) => &entry.stream_id,
    }
}

impl Dispatcher {
    fn accept(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if !self.in_window.insert(entry.stream_id.clone()) {
                self.window.add_permits(1);
                continue;
            }
            match self.queued.get_mut(ordering_key(&entry)) {
                Some(waiting) => waiting.push_back(entry),
                None => {
                    self.queued
                        .insert(ordering_key(&entry).to_owned(), VecDeque::new());
                    self.start(entry);
                }
            }
        }
    }

    fn start(&mut self, entry: Entry) {
        let key = (ordering_key(&entry).to_owned(), entry.stream_id.clone());
        let handle = self.jobs.spawn(process(
            self.consumer.clone(),
            self.destination.clone(),
            entry,
            self.lease.clone(),
            self.shutdown.clone(),
        ));
        self.job_keys.insert(handle.id(), key);
    }

    fn finished(&mut self, result: Result<(TaskId, ()), tokio::task::JoinError>) {
        let task = match &result {
            Ok((task, ())) => *task,
            Err(error) => {
                if error.is_panic() {
                    tracing::error!(destination = %self.destination.name, %error, "Delivery job panicked; its entry stays pending.");
                }
                error.id()
            }
        };
        let Some((key, stream_id)) = self.job_keys.remove(&task) else {
            return;
        };
        self.in_window.remove(&stream_id);
        self.window.add_permits(1);
        if self.shutdown.is_cancelled() {
            return;
        }
        let next = self.queued.get_mut(&key).and_then(VecDeque::pop_front);
        match next {
            Some(entry) => self.start(entry),
            None => {
                self.queued.remove(&key);
            }
        }
    }
}

/// Fetches entries while the window has room: first everything pending on
/// us (in id order), then new entries.
async fn read_loop(
    consumer: Arc<GroupConsumer>,
    destination: Arc<Destination>,
    batches: mpsc::Sender<Vec<Entry>>,
    window: Arc<Semaphore>,
    settings: WorkerSettings,
    mut lease: LeaseGuard,
    shutdown: CancellationToken,
) {
    let mut from = ReadFrom::Pending("0".into());
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
                    if !pause(&shutdown, failures).await {
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
        let capacity = tokio::select! {
            () = shutdown.cancelled() => return,
            permit = window.acquire() => permit.expect("the window semaphore is never closed"),
        };
        capacity.forget();
        let mut taken = 1;
        while taken < settings.batch_size {
            match window.try_acquire() {
                Ok(permit) => permit.forget(),
                Err(_) => break,
            }
            taken += 1;
        }
        // A read by a router whose lease has expired would take entries
        // away from the new owner, so a read starts only if it ends in time.
        if !lease.hold_for(settings.read_span, &shutdown).await {
            return;
        }
        // A read abandoned here may leave entries pending on us unseen; the
        // next owner of this shard claims and reads them first.
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            result = consumer.read(&from, taken, settings.block) => result,
        };
        match result {
            Ok(entries) => {
                failures = 0;
                window.add_permits(taken - entries.len());
                if let ReadFrom::Pending(after) = &mut from {
                    match entries.last() {
                        Some(last) => after.clone_from(&last.stream_id),
                        None => from = ReadFrom::New,
                    }
                }
                if !entries.is_empty() && batches.send(entries).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                window.add_permits(taken);
                failures += 1;
                if error.is_missing_group() {
                    tracing::warn!(
                        shard = consumer.shard(),
                        "Consumer group missing; recreating it."
                    );
                    prepared = false;
                } else {
                    tracing::warn!(shard = consumer.shard(), %error, "Reading the stream failed; retrying.");
                    if !pause(&shutdown, failures).await {
                        return;
                    }
                }
                // A reply lost in the failure may have left entries pending on
                // us; re-read the pending list before anything newer.
                from = ReadFrom::Pending("0".into());
            }
        }
    }
}

/// Takes over what earlier owners left: their pending entries become ours
/// (read first, in id order), and their consumers, now empty, are removed.
async fn prepare(consumer: &GroupConsumer) -> Result<(), ConsumerError> {
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

/// Sleeps a doubling delay; false when shutdown came first.
async fn pause(shutdown: &CancellationToken, failures: u32) -> bool {
    let delay = Duration::from_millis(100)
        .saturating_mul(1 << failures.min(10))
        .min(MAX_REDIS_BACKOFF);
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// Takes one entry to a terminal outcome and records it, or abandons it at
/// shutdown or when the lease goes.
async fn process(
    consumer: Arc<GroupConsumer>,
    destination: Arc<Destination>,
    entry: Entry,
    mut lease: LeaseGuard,
    shutdown: CancellationToken,
) {
    let shard = consumer.shard();
    let stats = &destination.stats;
    let prepared = match &entry.content {
        EntryContent::Event(event) if event.is_for(&destination.name) => {
            // A replay keeps the id the event was first delivered under.
            let event_id = match &event.replay {
                Some(replay) => replay.event_id.clone(),
                None => format!("{shard}-{}", entry.stream_id),
            };
            match request_body(
                &event_id,
                &event.user_id,
                &event.payload,
                event.received_at_ms,
            ) {
                Ok(body) => Ok((event, event_id, body)),
                Err(reason) => Err((event_id, reason)),
            }
        }
        EntryContent::Event(_) => {
            record(&shutdown, || consumer.ack(&entry.stream_id)).await;
            stats.filtered();
            return;
        }
        EntryContent::Deleted => {
            record(&shutdown, || consumer.ack(&entry.stream_id)).await;
            return;
        }
        EntryContent::Malformed(reason) => Err((
            format!("{shard}-{}", entry.stream_id),
            format!("malformed stream entry: {reason}"),
        )),
    };
    let (event, event_id, body) = match prepared {
        Ok(prepared) => prepared,
        Err((event_id, reason)) => {
            tracing::error!(%event_id, destination = %destination.name, %reason, outcome = "dead", "Dead-lettering an entry that cannot be delivered.");
            let letter = DeadLetter {
                event_id: &event_id,
                attempts: 0,
                last_status: None,
                last_error: &reason,
            };
            record(&shutdown, || consumer.dead_letter(&entry, &letter)).await;
            stats.dead_lettered();
            return;
        }
    };
    // A replay's age (for `max_age_ms` and end-to-end latency) starts at
    // the replay.
    let age_from_ms = event
        .replay
        .as_ref()
        .map_or(event.received_at_ms, |replay| replay.replayed_at_ms);
    let user = event.user_id.as_str();
    let name = destination.name.as_str();
    let mut attempt = 1;
    loop {
        if let Some(age) = expired(age_from_ms, destination.max_age) {
            let error = format!(
                "expired: undelivered {}s after it was accepted (max_age_ms)",
                age.as_secs()
            );
            tracing::warn!(%event_id, user, destination = name, shard, attempt, %error, outcome = "expired", "Dead-lettering an expired event.");
            let letter = DeadLetter {
                event_id: &event_id,
                attempts: attempt - 1,
                last_status: None,
                last_error: &error,
            };
            record(&shutdown, || consumer.dead_letter(&entry, &letter)).await;
            stats.dead_lettered();
            return;
        }
        // A paused destination starts no attempt; the entry stays pending.
        if !destination.wait_until_resumed(&shutdown).await {
            return;
        }
        let slot = destination.slot().await;
        // The attempt must be over before the lease could pass to another
        // router, or the next owner could deliver this user's next event first.
        if !lease.hold_for(destination.timeout, &shutdown).await {
            return;
        }
        let in_flight = stats.attempt_in_flight();
        let (outcome, latency) = destination.attempt(&slot, &event_id, &body, attempt).await;
        drop(in_flight);
        drop(slot);
        let latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        let (status, error) = match &outcome {
            AttemptOutcome::Delivered { status } => {
                tracing::info!(%event_id, user, destination = name, shard, attempt, status, latency_ms, outcome = "delivered", "Delivery attempt.");
                stats.attempted(AttemptResult::Delivered, latency);
                record(&shutdown, || consumer.delivered(&entry)).await;
                // From acceptance, or for a replay from the replay.
                stats.delivered(age_since(age_from_ms));
                return;
            }
            AttemptOutcome::Retry { status, error, .. }
            | AttemptOutcome::Dead { status, error } => (*status, error),
        };
        stats.failed(error, status);
        let retry_after = match &outcome {
            AttemptOutcome::Retry { retry_after, .. }
                if destination.retry.allows_another(attempt) =>
            {
                Some(*retry_after)
            }
            _ => None,
        };
        let Some(retry_after) = retry_after else {
            tracing::warn!(%event_id, user, destination = name, shard, attempt, status, latency_ms, %error, outcome = "dead", "Delivery attempt.");
            stats.attempted(AttemptResult::Dead, latency);
            let letter = DeadLetter {
                event_id: &event_id,
                attempts: attempt,
                last_status: status,
                last_error: error,
            };
            record(&shutdown, || consumer.dead_letter(&entry, &letter)).await;
            stats.dead_lettered();
            return;
        };
        stats.attempted(AttemptResult::Retry, latency);
        let delay = destination.retry.delay_after(attempt, retry_after);
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        tracing::info!(%event_id, user, destination = name, shard, attempt, status, latency_ms, %error, delay_ms, outcome = "retry", "Delivery attempt.");
        let _in_backoff = stats.user_in_backoff();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        attempt += 1;
    }
}

fn age_since(unix_ms: u64) -> Duration {
    Duration::from_millis(protocol::unix_millis().saturating_sub(unix_ms))
}

/// How old the event is, if older than `max_age`.
fn expired(since_ms: u64, max_age: Option<Duration>) -> Option<Duration> {
    let age = age_since(since_ms);
    max_age.filter(|max| age > *max).map(|_| age)
}

/// Runs a terminal Redis write until it succeeds. Before the user's next
/// event may go out, this one must be recorded; otherwise a restart would
/// redeliver it after its successor. Bounded at shutdown by the grace period.
async fn record<F, Fut>(shutdown: &CancellationToken, mut write: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), ConsumerError>>,
{
    let mut failures = 0;
    while let Err(error) = write().await {
        failures += 1;
        tracing::warn!(%error, failures, "Recording a terminal outcome failed; retrying.");
        let delay = Duration::from_millis(50)
            .saturating_mul(1 << failures.min(10))
            .min(MAX_REDIS_BACKOFF);
        if shutdown.is_cancelled() && failures > 3 {
            return;
        }
        tokio::time::sleep(delay).await;
    }
}
