//! The delivery loop of one destination on one shard.
//!
//! A reader task ([`crate::worker::reader`]) fetches entries within the
//! worker's memory budget (entries and bytes, [`crate::worker::budget`]); the dispatcher admits them into per-user
//! queues ([`crate::worker::parking`]) and runs one job ([`crate::worker::job`]) per user at
//! a time: a user's next event starts only after the previous one's
//! terminal outcome is recorded. Jobs of different users run concurrently,
//! polled by the dispatcher itself (a task per job cost a spawn, a
//! scheduler hand-off at every wake-up and a map from task to user).
//! A user whose head is in backoff, or who has more queued than its
//! allowance, has its further entries parked (ids only), so reading goes on
//! for everyone else.
//!
//! Every read and every attempt starts only if it ends while this router
//! still surely holds the (shard, destination) lease; see [`crate::control::lease`].

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::future::CatchUnwind;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use protocol::{EventEntry, StreamId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control::lease::LeaseGuard;
use crate::destination::delivery::Destination;
use crate::destination::progress::Progress;
use crate::destination::stats::ParkedCount;
use crate::worker::budget::{Amount, Budget};
use crate::worker::consumer::{EntryContent, GroupConsumer};
use crate::worker::job::{self, Blocked, HeldEntry, JobContext, JobEnd, Source};
use crate::worker::parking::{Admission, Successor, UserQueues};
use crate::worker::reader::{Read, ReadSettings, Reader};
use crate::worker::wakeup::Wakeup;

#[derive(Debug, Clone, Copy)]
pub struct WorkerSettings {
    pub batch_size: usize,
    /// How long a read blocks for new entries; with a shared wake-up, the
    /// longest a caught-up reader waits for it before it reads again anyway.
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

/// Delivers shard `consumer.shard()` to `destination` until `shutdown`
/// (the router stopping, or the lease lost or handed over).
pub async fn run(
    consumer: GroupConsumer,
    destination: Arc<Destination>,
    wakeup: Option<Wakeup>,
    settings: WorkerSettings,
    lease: LeaseGuard,
    shutdown: CancellationToken,
) {
    // The destination's rate limit is shared by the shards delivered here.
    let held = destination.clone();
    let _shard_held = held.throttle.shard_held();
    let progress = Arc::new(Progress::new(consumer.shard(), settings.read_span));
    let _listed = held.workers.register(progress.clone());
    let consumer = Arc::new(consumer);
    let budget = Budget::new(Amount {
        entries: settings.window,
        bytes: settings.max_bytes,
    });
    let (batches, incoming) = mpsc::channel(2);
    let reader = Reader {
        consumer: consumer.clone(),
        destination: destination.clone(),
        progress: progress.clone(),
        wakeup,
        batches,
        budget: budget.clone(),
        settings: ReadSettings {
            batch_size: settings.batch_size,
            block: settings.block,
            read_span: settings.read_span,
        },
        lease: lease.clone(),
        shutdown: shutdown.clone(),
    };
    let reader = tokio::spawn(reader.run());
    let (blocked, blocked_users) = mpsc::unbounded_channel();
    let context = Arc::new(JobContext {
        consumer,
        destination,
        budget,
        shutdown: shutdown.clone(),
        blocked,
        progress,
    });
    let runner = Jobs { context, lease };
    let mut dispatcher = Dispatcher::new(runner, settings.max_queued_per_user, shutdown);
    dispatcher.run(incoming, blocked_users).await;
    // Stop reading; let attempts in flight finish within the grace period.
    // Jobs in backoff stop at once (their entries stay pending).
    let _ = reader.await;
    if !dispatcher.drain(settings.shutdown_grace).await {
        let context = &dispatcher.runner.context;
        tracing::warn!(
            destination = %context.destination.name,
            shard = context.consumer.shard(),
            "Attempts still in flight after the shutdown grace period; they stay pending."
        );
    }
}

/// A job's future, boxed: it holds its entry and its request, and moving
/// that much from future to future cost more than the allocation.
type BoxedJob = Pin<Box<dyn Future<Output = JobEnd> + Send>>;

/// Makes the dispatcher's jobs: [`job::run`] in the router, a stand-in
/// whose delays and outcomes a unit test controls in the tests.
trait JobRunner {
    /// The job that takes `source` to its terminal outcome.
    fn job(&self, source: Source) -> BoxedJob;
    /// The destination whose events wait for each other, per user.
    fn destination(&self) -> &str;
    /// Whether `event` is for the destination (others wait for no user).
    fn wants(&self, event: &EventEntry) -> bool;
    /// Publishes a change of the parked counts.
    fn parked_changed(&self, before: ParkedCount, now: ParkedCount);
}

/// The router's jobs.
struct Jobs {
    context: Arc<JobContext>,
    lease: LeaseGuard,
}

impl JobRunner for Jobs {
    fn job(&self, source: Source) -> BoxedJob {
        Box::pin(job::run(self.context.clone(), self.lease.clone(), source))
    }

    fn destination(&self) -> &str {
        &self.context.destination.name
    }

    fn wants(&self, event: &EventEntry) -> bool {
        self.context.destination.endpoint().wants(event)
    }

    fn parked_changed(&self, before: ParkedCount, now: ParkedCount) {
        self.context.destination.stats.parked_changed(before, now);
    }
}

struct Dispatcher<R: JobRunner> {
    runner: R,
    shutdown: CancellationToken,
    queues: UserQueues<HeldEntry>,
    /// The highest stream id admitted. Entries arrive in id order, so one
    /// at or below it is a second copy (the reader re-scans the pending
    /// list after a Redis error) and is dropped.
    admitted_up_to: Option<StreamId>,
    jobs: FuturesUnordered<Running>,
    /// The parked counts last published.
    published: ParkedCount,
}

impl<R: JobRunner> Dispatcher<R> {
    fn new(runner: R, max_queued_per_user: usize, shutdown: CancellationToken) -> Self {
        Self {
            runner,
            shutdown,
            queues: UserQueues::new(max_queued_per_user),
            admitted_up_to: None,
            jobs: FuturesUnordered::new(),
            published: ParkedCount::default(),
        }
    }

    /// Admits reads and starts each user's next job until shutdown or the
    /// reader ends.
    async fn run(
        &mut self,
        mut incoming: mpsc::Receiver<Read>,
        mut blocked_users: mpsc::UnboundedReceiver<Blocked>,
    ) {
        let shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(finished) = self.jobs.next() => self.finished(finished),
                Some(blocked) = blocked_users.recv() => self.blocked(blocked),
                read = incoming.recv() => match read {
                    Some(Read::Entries(entries)) => self.accept(entries),
                    // Entries admitted before count as new again (delivered
                    // twice rather than left pending in the new group forever).
                    Some(Read::GroupRecreated) => self.admitted_up_to = None,
                    None => break,
                },
            }
        }
    }

    /// Waits up to `grace` for the jobs still running; false if some had to
    /// be stopped.
    async fn drain(&mut self, grace: Duration) -> bool {
        let drained = tokio::time::timeout(grace, async {
            while let Some(finished) = self.jobs.next().await {
                self.finished(finished);
            }
        })
        .await;
        // Dropping a job stops it; its entry stays pending.
        self.jobs.clear();
        drained.is_ok()
    }

    fn accept(&mut self, entries: Vec<HeldEntry>) {
        for held in entries {
            let id = held.entry.id;
            if self.admitted_up_to.is_some_and(|up_to| id <= up_to) {
                continue;
            }
            self.admitted_up_to = Some(id);
            // Only events sent to this destination wait for each other;
            // anything else is settled at once.
            let user = match &held.entry.content {
                EntryContent::Event(event) if self.runner.wants(event) => event.user_id.clone(),
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
        let job = AssertUnwindSafe(self.runner.job(source)).catch_unwind();
        self.jobs.push(Running { user, job });
    }

    fn blocked(&mut self, blocked: Blocked) {
        // Dropping the evicted entries gives back their budget.
        drop(self.queues.blocked(&blocked.user, blocked.head));
        self.publish_parked();
    }

    fn finished(&mut self, Finished { user, end }: Finished) {
        let end = match end {
            Ok(end) => Some(end),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(no message)");
                tracing::error!(destination = %self.runner.destination(), panic = message, "Delivery job panicked; its entry stays pending.");
                None
            }
        };
        // An abandoned entry stays pending, so nothing after it may start
        // (jobs abandon only at shutdown or when the lease goes).
        if end == Some(JobEnd::Abandoned) || self.shutdown.is_cancelled() {
            return;
        }
        let Some(user) = user else {
            return;
        };
        match self.queues.finished(&user) {
            Successor::Start(held) => self.start(Some(user), Source::Held(held)),
            Successor::Fetch(id) => self.start(Some(user), Source::Parked(id)),
            Successor::Idle => {}
        }
        self.publish_parked();
    }

    fn publish_parked(&mut self) {
        let now = self.queues.parked();
        if now != self.published {
            self.runner.parked_changed(self.published, now);
            self.published = now;
        }
    }
}

/// A job the dispatcher polls, with the user whose next event waits for it
/// (`None` for entries outside per-user order: not for this destination,
/// deleted, malformed).
struct Running {
    user: Option<String>,
    /// A panic is caught here, so it ends this job only.
    job: CatchUnwind<AssertUnwindSafe<BoxedJob>>,
}

/// How a job ended: its outcome, or the panic that ended it.
struct Finished {
    user: Option<String>,
    end: Result<JobEnd, Box<dyn std::any::Any + Send>>,
}

impl Future for Running {
    type Output = Finished;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Finished> {
        let end = ready!(self.job.poll_unpin(cx));
        Poll::Ready(Finished {
            user: self.user.take(),
            end,
        })
    }
}

impl<R: JobRunner> Drop for Dispatcher<R> {
    /// What this worker parked is no longer its to count (the next owner
    /// counts it again when it re-reads the pending list).
    fn drop(&mut self) {
        self.runner
            .parked_changed(self.published, ParkedCount::default());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use protocol::EventEntry;
    use tokio::time::Instant;

    use super::*;
    use crate::worker::consumer::Entry;

    /// What a stand-in job did, at what (paused) time since the start.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Did {
        /// Started with the entry in hand, or with its id only (parked).
        Started {
            n: u64,
            parked: bool,
        },
        Delivered(u64),
    }

    /// Jobs that take `ATTEMPT` per attempt; the first `failures` attempts
    /// of entry `failing` fail, each followed by `BACKOFF` (as a job in
    /// backoff does: it reports the block and drops its entry).
    struct StandIn {
        users: HashMap<StreamId, String>,
        failing: u64,
        failures: u32,
        /// The entry whose job panics.
        panicking: Option<u64>,
        blocked: mpsc::UnboundedSender<Blocked>,
        log: Arc<Mutex<Vec<(Duration, Did)>>>,
        parked: Arc<Mutex<ParkedCount>>,
        since: Instant,
    }

    const ATTEMPT: Duration = Duration::from_millis(10);
    const BACKOFF: Duration = Duration::from_secs(1);

    impl JobRunner for StandIn {
        fn job(&self, source: Source) -> BoxedJob {
            let (id, parked, mut held) = match source {
                Source::Held(held) => (held.entry.id, false, Some(held)),
                Source::Parked(id) => (id, true, None),
            };
            let user = self.users[&id].clone();
            let panics = self.panicking == Some(id.ms);
            let failures = if id.ms == self.failing {
                self.failures
            } else {
                0
            };
            let (blocked, log, since) = (self.blocked.clone(), self.log.clone(), self.since);
            let record = move |step| log.lock().expect("log").push((since.elapsed(), step));
            record(Did::Started { n: id.ms, parked });
            Box::pin(async move {
                assert!(!panics, "a bug in a job");
                for _ in 0..failures {
                    tokio::time::sleep(ATTEMPT).await;
                    drop(held.take());
                    blocked
                        .send(Blocked {
                            user: user.clone(),
                            head: id,
                        })
                        .expect("the dispatcher listens while jobs run");
                    tokio::time::sleep(BACKOFF).await;
                }
                tokio::time::sleep(ATTEMPT).await;
                record(Did::Delivered(id.ms));
                drop(held);
                JobEnd::Recorded
            })
        }

        fn destination(&self) -> &str {
            "d"
        }

        fn wants(&self, event: &EventEntry) -> bool {
            event.is_for("d")
        }

        fn parked_changed(&self, before: ParkedCount, now: ParkedCount) {
            let mut parked = self.parked.lock().expect("counts");
            assert_eq!(*parked, before, "changes are published in sequence");
            *parked = now;
        }
    }

    fn id(n: u64) -> StreamId {
        StreamId { ms: n, seq: 0 }
    }

    fn event(user: &str) -> EntryContent {
        EntryContent::Event(EventEntry {
            user_id: user.to_owned(),
            payload: "{}".to_owned(),
            received_at_ms: 0,
            message_id: None,
            destinations: None,
            event_type: None,
            source: None,
            replay: None,
            trace: None,
        })
    }

    /// Entries 1 to `count`, 100 bytes each, entry `n` of `user(n)`, held
    /// within `budget`; and each entry's user.
    async fn held_entries(
        budget: &Arc<Budget>,
        count: u64,
        user: impl Fn(u64) -> String,
    ) -> (HashMap<StreamId, String>, Vec<HeldEntry>) {
        let mut reservation = budget
            .reserve_for_read(usize::try_from(count).expect("small"))
            .await;
        let mut users = HashMap::new();
        let mut entries = Vec::new();
        for n in 1..=count {
            let user = user(n);
            entries.push(HeldEntry {
                charge: reservation.take(100),
                entry: Entry {
                    id: id(n),
                    bytes: 100,
                    content: event(&user),
                },
            });
            users.insert(id(n), user);
        }
        (users, entries)
    }

    /// A dispatcher (10 queued per user) running `runner`'s jobs, handed
    /// `entries` as one read; it runs while the returned sender lives.
    async fn dispatch(
        runner: StandIn,
        blocked_users: mpsc::UnboundedReceiver<Blocked>,
        entries: Vec<HeldEntry>,
        shutdown: CancellationToken,
    ) -> (tokio::task::JoinHandle<()>, mpsc::Sender<Read>) {
        let (reads, incoming) = mpsc::channel(2);
        let dispatcher = tokio::spawn(async move {
            let mut dispatcher = Dispatcher::new(runner, 10, shutdown);
            dispatcher.run(incoming, blocked_users).await;
        });
        reads
            .send(Read::Entries(entries))
            .await
            .expect("the dispatcher reads");
        (dispatcher, reads)
    }

    /// Delivery times of `numbers`, in the order delivered.
    fn delivered(log: &[(Duration, Did)], numbers: &[u64]) -> Vec<(u64, Duration)> {
        log.iter()
            .filter_map(|(at, step)| match step {
                Did::Delivered(n) if numbers.contains(n) => Some((*n, *at)),
                _ => None,
            })
            .collect()
    }

    /// One user ("hot") with 200 events whose first is refused three times,
    /// 100 other users with 2 events each, read in one stream: the others
    /// are delivered while the hot user's head waits out its retry delays,
    /// the hot user's later events leave memory (parked) and come back in
    /// order once its head is delivered.
    #[tokio::test(start_paused = true)]
    async fn a_user_in_backoff_parks_its_entries_and_delays_no_other_user() {
        const HOT: u64 = 200;
        let budget = Budget::new(Amount {
            entries: 1000,
            bytes: 1 << 20,
        });
        let (users, entries) = held_entries(&budget, HOT + 200, |n| {
            if n <= HOT {
                "hot".to_owned()
            } else {
                format!("user-{}", n % 100)
            }
        })
        .await;
        let (blocked, blocked_users) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let parked = Arc::new(Mutex::new(ParkedCount::default()));
        let runner = StandIn {
            users,
            failing: 1,
            failures: 3,
            panicking: None,
            blocked,
            log: log.clone(),
            parked: parked.clone(),
            since: Instant::now(),
        };
        let shutdown = CancellationToken::new();
        let (dispatcher, _reads) = dispatch(runner, blocked_users, entries, shutdown.clone()).await;

        // Within the head's first retry delay.
        tokio::time::sleep(BACKOFF / 2).await;
        let others: Vec<u64> = (HOT + 1..=HOT + 200).collect();
        let early = delivered(&log.lock().expect("log"), &others);
        assert_eq!(early.len(), 200, "every other user's events are delivered");
        assert!(
            early.iter().all(|(_, at)| *at <= 3 * ATTEMPT),
            "two events a user, one after the other: {early:?}"
        );
        assert_eq!(
            *parked.lock().expect("counts"),
            ParkedCount {
                users: 1,
                events: usize::try_from(HOT - 1).expect("small")
            },
            "everything behind the blocked head is parked"
        );
        assert_eq!(
            budget.held(),
            Amount::default(),
            "a blocked user holds nothing in memory"
        );

        // Three retry delays, then 200 events one after the other.
        tokio::time::sleep(3 * BACKOFF + ATTEMPT * u32::try_from(HOT).expect("small")).await;
        let log = log.lock().expect("log").clone();
        let hot: Vec<u64> = (1..=HOT).collect();
        let order: Vec<u64> = delivered(&log, &hot).iter().map(|(n, _)| *n).collect();
        assert_eq!(
            order, hot,
            "the hot user's events arrive once each, in order"
        );
        assert!(
            delivered(&log, &[1])[0].1 >= 3 * BACKOFF,
            "its head waited out three delays"
        );
        let refetched = log
            .iter()
            .filter(|(_, step)| matches!(step, Did::Started { n, parked: true } if *n > 1))
            .count();
        assert_eq!(
            refetched,
            usize::try_from(HOT - 1).expect("small"),
            "each parked event is fetched again when its turn comes"
        );
        assert_eq!(*parked.lock().expect("counts"), ParkedCount::default());
        shutdown.cancel();
        dispatcher.await.expect("the dispatcher ends");
    }

    /// A job that panics ends alone: the dispatcher goes on, and every
    /// other user's events are delivered.
    #[tokio::test(start_paused = true)]
    async fn a_panicking_job_stops_nothing_else() {
        let budget = Budget::new(Amount {
            entries: 100,
            bytes: 1 << 20,
        });
        let (users, entries) = held_entries(&budget, 20, |n| format!("user-{}", n % 5)).await;
        let (blocked, blocked_users) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let runner = StandIn {
            users,
            failing: 0,
            failures: 0,
            panicking: Some(3),
            blocked,
            log: log.clone(),
            parked: Arc::new(Mutex::new(ParkedCount::default())),
            since: Instant::now(),
        };
        let shutdown = CancellationToken::new();
        let (dispatcher, _reads) = dispatch(runner, blocked_users, entries, shutdown.clone()).await;
        tokio::time::sleep(BACKOFF).await;
        let others: Vec<u64> = (1..=20).filter(|n| n % 5 != 3).collect();
        let delivered: Vec<u64> = delivered(&log.lock().expect("log"), &others)
            .iter()
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(delivered.len(), others.len(), "delivered: {delivered:?}");
        assert!(
            !dispatcher.is_finished(),
            "the dispatcher outlives the panic"
        );
        shutdown.cancel();
        dispatcher
            .await
            .expect("the dispatcher ends without panicking");
    }
}
