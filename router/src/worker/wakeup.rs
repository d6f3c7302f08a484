//! How a reader learns of new entries (decision 0004). While a router's
//! destinations × shards are few ([`OwnReaders`], `reader.own_connections`),
//! each reader blocks in its own XREADGROUP on a connection of its own: an
//! entry is read in the Redis event-loop turn that stored it. Beyond that,
//! readers read their consumer groups without `BLOCK` and, when nothing is
//! new, wait for one blocking read per shard stream that announces new
//! entries to every reader of that shard; so a router's Redis connections
//! do not grow with its destinations, at the cost of one more Redis turn
//! between an entry and its read.
//!
//! Per shard, one task and one connection announce two things
//! ([`Watched`]): new entries of the shard stream, and references the
//! routing stage added for one of the shard's filtered destinations (whose
//! readers never block: their read is a script), told by the routing
//! signal stream, whose entries name the destinations of each routed batch,
//! so only their readers wake. For what some worker waits for, the task
//! learns where the shard stream ends (`XREVRANGE + - COUNT 1`) and what
//! signals came since its last look, and else blocks in one `XREAD` after
//! those ends, bumping on its reply the watch channel of what came, at once
//! (the extra round trip is taken before the next wait, not between an
//! entry and its announcement). A worker marks its channel seen *before*
//! its read, so an entry added between the read and the wait still wakes
//! it. The task looks only at what some worker waits for: under load
//! nobody is caught up, and it costs Redis nothing.
//! While the task cannot read (Redis down, the shard's node paused), workers
//! wake after their own `reader.block_ms` and read anyway: an announcement
//! only saves waiting, it never carries an entry. While it watches, a
//! caught-up worker reads anyway only every [`WATCHED_WAIT_FACTOR`] ×
//! `reader.block_ms`, a safety net: 1,024 readers (64 destinations on 16
//! shards) each read once a second while nothing happened (with lease
//! renewals per shard, an idle router of 64 destinations went from 210–240
//! to 120 ms of CPU per 4 s; docs/benchmarks.md). The task's first failure
//! wakes every worker, so none sleeps the long wait through an outage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use protocol::{run_with_retries, Backoff, Keys, RedisConfig, RedisConnection, StreamId};
use redis::streams::StreamReadReply;
use redis::Value;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// Which readers get a connection of their own: while the router's
/// (shard, destination) pairs are at most `limit`, and no more than `limit`
/// at a time, so that a router that grew past it holds no more than
/// `limit` such connections while its older readers run on.
pub struct OwnReaders {
    limit: usize,
    alive: Arc<AtomicUsize>,
}

/// One reader's connection of its own, counted until dropped.
pub struct OwnReader(Arc<AtomicUsize>);

impl OwnReaders {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            alive: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A claim for one more reader of its own, if `pairs` and the readers
    /// already holding one are within the limit.
    pub fn claim(&self, pairs: usize) -> Option<OwnReader> {
        if pairs > self.limit {
            return None;
        }
        self.alive
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |alive| {
                (alive < self.limit).then_some(alive + 1)
            })
            .ok()
            .map(|_| OwnReader(self.alive.clone()))
    }
}

impl Drop for OwnReader {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a reader waits for on its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watched<'a> {
    /// New entries of the shard stream (a group on it).
    Events,
    /// References the routing stage added for this filtered destination
    /// ([`crate::worker::routing`]), named by the routing signal stream.
    Routed(&'a str),
}

/// How many times `reader.block_ms` a caught-up reader waits for an
/// announcement while its shard's announcer is watching.
pub const WATCHED_WAIT_FACTOR: u32 = 10;

/// A watch channel, and whether a reader waits on it: the announcer looks
/// only at what someone waits for.
#[derive(Clone)]
struct Watcher {
    sender: Arc<watch::Sender<u64>>,
    wanted: Arc<AtomicBool>,
}

impl Watcher {
    fn new() -> Self {
        Self {
            sender: Arc::new(watch::channel(0u64).0),
            wanted: Arc::new(AtomicBool::new(false)),
        }
    }

    fn is_wanted(&self) -> bool {
        self.wanted.load(Ordering::SeqCst)
    }

    /// Wakes its readers. The wish is cleared before the bump: a reader
    /// that wishes again after it has seen the bump (it marked it seen
    /// before its next read) is not forgotten.
    fn bump(&self) {
        self.wanted.store(false, Ordering::SeqCst);
        self.sender
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    fn wakeup(&self, demand: &Arc<Notify>, watching: &Arc<AtomicBool>) -> Wakeup {
        Wakeup {
            announcements: self.sender.subscribe(),
            wanted: self.wanted.clone(),
            demand: demand.clone(),
            watching: watching.clone(),
        }
    }
}

/// The routed destinations' watchers of one shard, by name.
type RoutedWatchers = Arc<Mutex<HashMap<String, Watcher>>>;

/// One shard's announcer, as its readers reach it.
struct Shard {
    events: Watcher,
    routed: RoutedWatchers,
    demand: Arc<Notify>,
    /// Whether the announcer's last look succeeded.
    watching: Arc<AtomicBool>,
}

/// The announcements of every shard, each started when a reader first
/// needs it: one task and one connection per shard, whatever it watches.
pub struct Wakeups {
    redis: RedisConfig,
    keys: Keys,
    block: Duration,
    shutdown: CancellationToken,
    shards: Vec<OnceLock<Shard>>,
}

impl Wakeups {
    /// Announcements of the shards, each read over a connection of its own
    /// made from `redis`, blocking up to `block` at a time, until `shutdown`.
    pub fn new(
        redis: RedisConfig,
        keys: Keys,
        block: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let shards = (0..redis.shards).map(|_| OnceLock::new()).collect();
        Self {
            redis,
            keys,
            block,
            shutdown,
            shards,
        }
    }

    /// Announcements of what `watched` on `shard`. The first call for a
    /// shard starts its announcer (within a Tokio runtime).
    pub fn of(&self, shard: u16, watched: Watched<'_>) -> Wakeup {
        let state = self.shards[usize::from(shard)].get_or_init(|| {
            let state = Shard {
                events: Watcher::new(),
                routed: Arc::default(),
                demand: Arc::new(Notify::new()),
                watching: Arc::new(AtomicBool::new(false)),
            };
            let announcer = Announcer {
                events_stream: self.keys.events(shard),
                signal_stream: self.keys.routing_signal(shard),
                events: state.events.clone(),
                routed: state.routed.clone(),
                watching: state.watching.clone(),
                last_event: None,
                last_signal: None,
            };
            tokio::spawn(announce(
                announcer,
                self.redis.clone(),
                self.block,
                state.demand.clone(),
                self.shutdown.clone(),
            ));
            state
        });
        match watched {
            Watched::Events => state.events.wakeup(&state.demand, &state.watching),
            Watched::Routed(destination) => lock(&state.routed)
                .entry(destination.to_owned())
                .or_insert_with(Watcher::new)
                .wakeup(&state.demand, &state.watching),
        }
    }
}

fn lock(routed: &RoutedWatchers) -> std::sync::MutexGuard<'_, HashMap<String, Watcher>> {
    protocol::sync::lock(routed)
}

/// One worker's view of its shard's announcements of one kind.
pub struct Wakeup {
    announcements: watch::Receiver<u64>,
    /// Set while a reader of this kind waits: the announcer watches only
    /// what someone waits for.
    wanted: Arc<AtomicBool>,
    /// Tells the announcer someone waits (a permit is kept until it looks).
    demand: Arc<Notify>,
    /// Whether the announcer is watching (else the wait is `at_most`).
    watching: Arc<AtomicBool>,
}

impl Wakeup {
    /// Marks every announcement so far as seen; call it before a read, so
    /// that [`Self::wait`] after an empty read returns on anything newer.
    pub fn mark_seen(&mut self) {
        self.announcements.borrow_and_update();
    }

    /// Says ahead of [`Self::wait`] that this reader will wait: an
    /// announcer blocked on other streams looks at this one too once it
    /// next wakes, rather than only after its block time.
    pub fn expect_to_wait(&self) {
        self.wanted.store(true, Ordering::SeqCst);
    }

    /// Waits for an announcement since [`Self::mark_seen`], at most
    /// `at_most` (× [`WATCHED_WAIT_FACTOR`] while the announcer watches),
    /// or until `shutdown`; false at shutdown.
    pub async fn wait(&mut self, at_most: Duration, shutdown: &CancellationToken) -> bool {
        let at_most = if self.watching.load(Ordering::SeqCst) {
            at_most.saturating_mul(WATCHED_WAIT_FACTOR)
        } else {
            at_most
        };
        self.wanted.store(true, Ordering::SeqCst);
        self.demand.notify_one();
        let announced = async {
            // A closed channel (the announcer ended) leaves the timeout.
            if self.announcements.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = announced => true,
            () = tokio::time::sleep(at_most) => true,
        }
    }
}

/// Signal entries read at once: each names the destinations of one batch.
const SIGNALS_AT_ONCE: usize = 100;

/// The announcer's side of one shard.
struct Announcer {
    events_stream: String,
    signal_stream: String,
    events: Watcher,
    routed: RoutedWatchers,
    /// Set after a look that succeeded, cleared at a failure.
    watching: Arc<AtomicBool>,
    /// The last shard entry announced or looked at.
    last_event: Option<StreamId>,
    /// The last signal entry announced or looked at.
    last_signal: Option<StreamId>,
}

impl Announcer {
    fn routed_wanted(&self) -> bool {
        lock(&self.routed).values().any(Watcher::is_wanted)
    }

    /// Wakes the readers of the destinations a signal entry names.
    fn announce_signal(&mut self, entry: &redis::streams::StreamId) {
        self.last_signal = entry.id.parse().ok().or(self.last_signal);
        let names: String = entry
            .get(protocol::keys::ROUTING_SIGNAL_FIELD)
            .unwrap_or_default();
        let routed = lock(&self.routed);
        for name in names.split(',') {
            if let Some(watcher) = routed.get(name) {
                watcher.bump();
            }
        }
    }

    /// Wakes every reader (the announcer could not look: they read anyway).
    fn wake_all(&mut self) {
        self.last_event = None;
        self.last_signal = None;
        self.events.bump();
        for watcher in lock(&self.routed).values() {
            watcher.bump();
        }
    }

    /// One look: whatever was added since the last look is announced at
    /// once (a worker that has just read may have missed it); else one
    /// `XREAD` blocks after the ends of the shard stream and, while the
    /// shard has readers of references, the signal stream, and its reply is
    /// announced without another round trip. The shard stream is always
    /// watched, wanted or not: a reader may start waiting while the read
    /// blocks, which would not see its wish, and every new entry is
    /// announced (an end is never moved silently), so that reader, having
    /// marked the channel seen before its read, still wakes.
    async fn look(
        &mut self,
        connection: &mut RedisConnection,
        block: Duration,
    ) -> redis::RedisResult<()> {
        let mut announced = false;
        let tail = last_id(connection, &self.events_stream).await?;
        if self.last_event.is_some_and(|seen| seen != tail) {
            self.events.bump();
            announced = true;
        }
        self.last_event = Some(tail);
        let routed = !lock(&self.routed).is_empty();
        match self.last_signal {
            None if routed => {
                self.last_signal = Some(last_id(connection, &self.signal_stream).await?);
            }
            Some(seen) if self.routed_wanted() => {
                let newer: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                    .arg(&self.signal_stream)
                    .arg(format!("({seen}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(SIGNALS_AT_ONCE)
                    .query_async(connection)
                    .await?;
                for entry in &newer.ids {
                    self.announce_signal(entry);
                    announced = true;
                }
            }
            _ => {}
        }
        if announced {
            return Ok(());
        }
        let mut streams = vec![(&self.events_stream, tail)];
        if let (true, Some(seen)) = (routed, self.last_signal) {
            streams.push((&self.signal_stream, seen));
        }
        let mut command = redis::cmd("XREAD");
        command
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX))
            .arg("STREAMS");
        for (stream, _) in &streams {
            command.arg(*stream);
        }
        for (_, after) in &streams {
            command.arg(*after);
        }
        let reply: Option<StreamReadReply> = command.query_async(connection).await?;
        for key in reply.map(|reply| reply.keys).unwrap_or_default() {
            let Some(entry) = key.ids.first() else {
                continue;
            };
            if key.key == self.events_stream {
                self.last_event = entry.id.parse().ok().or(self.last_event);
                self.events.bump();
            } else {
                self.announce_signal(entry);
            }
        }
        Ok(())
    }
}

/// Announces new entries of one shard's streams until `shutdown`, read
/// over a connection of its own made from `redis`, blocking up to `block`
/// at a time. It looks only while a reader waits (`demand`), and only at
/// the streams someone waits for: a busy stream that nobody waits on would
/// otherwise answer every look at once.
async fn announce(
    mut announcer: Announcer,
    redis: RedisConfig,
    block: Duration,
    demand: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let shard_stream = announcer.events_stream.clone();
    // Its own connection: a blocked XREAD holds up whatever else shares it.
    // Made here, so a shard whose node is down delays no other shard.
    let what = format!("Redis unreachable at {}", redis.redacted_url());
    let connect = || redis.connect_for_blocking_reads(&shard_stream, block + redis.timeout());
    let Ok(Some(mut connection)) =
        run_with_retries(&what, Backoff::STARTUP, &shutdown, |_| true, connect).await
    else {
        return;
    };
    let mut failures = 0u32;
    loop {
        if !announcer.events.is_wanted() && !announcer.routed_wanted() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = demand.notified() => {}
            }
            continue;
        }
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            result = announcer.look(&mut connection, block) => result,
        };
        match result {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(stream = %shard_stream, "Watching the shard for new entries again.");
                }
                failures = 0;
                announcer.watching.store(true, Ordering::SeqCst);
            }
            Err(error) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(stream = %shard_stream, %error, "Cannot watch the shard for new entries; workers poll it meanwhile.");
                    // Workers in a long wait read now, and wait `block`
                    // at a time from then on.
                    announcer.watching.store(false, Ordering::SeqCst);
                    announcer.wake_all();
                }
                if !Backoff::COMMANDS.wait(failures, &shutdown).await {
                    return;
                }
                // Where the streams end is learnt again: they may have been
                // recreated. Whatever was added meanwhile, workers read
                // once they wake.
                announcer.wake_all();
            }
        }
    }
}

/// The id of the stream's last entry (`0-0` when empty or missing).
async fn last_id(connection: &mut RedisConnection, stream: &str) -> redis::RedisResult<StreamId> {
    let reply: Vec<(String, Value)> = redis::cmd("XREVRANGE")
        .arg(stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(connection)
        .await?;
    Ok(reply
        .first()
        .and_then(|(id, _)| id.parse().ok())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_readers_are_given_only_within_the_limit_and_returned_on_drop() {
        let own = OwnReaders::new(2);
        assert!(
            own.claim(3).is_none(),
            "more pairs than the limit: all share"
        );
        let first = own.claim(2).expect("within the limit");
        let second = own.claim(2).expect("within the limit");
        assert!(own.claim(2).is_none(), "two alive already");
        drop(first);
        assert!(own.claim(2).is_some(), "given back on drop");
        drop(second);
        assert!(OwnReaders::new(0).claim(0).is_none(), "0: always share");
    }

    fn wakeup() -> (watch::Sender<u64>, Arc<Notify>, Wakeup) {
        let (sender, announcements) = watch::channel(0);
        let demand = Arc::new(Notify::new());
        let wakeup = Wakeup {
            announcements,
            wanted: Arc::new(AtomicBool::new(false)),
            demand: demand.clone(),
            watching: Arc::new(AtomicBool::new(false)),
        };
        (sender, demand, wakeup)
    }

    #[tokio::test(start_paused = true)]
    async fn an_announcement_between_the_read_and_the_wait_is_not_lost() {
        let (sender, _demand, mut wakeup) = wakeup();
        let shutdown = CancellationToken::new();
        wakeup.mark_seen();
        // Announced while the reader was reading: the wait returns at once.
        sender.send_modify(|count| *count += 1);
        let started = tokio::time::Instant::now();
        assert!(wakeup.wait(Duration::from_secs(10), &shutdown).await);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn with_nothing_announced_a_reader_waits_its_block_and_asks_for_the_next() {
        let (_sender, demand, mut wakeup) = wakeup();
        let shutdown = CancellationToken::new();
        wakeup.mark_seen();
        let started = tokio::time::Instant::now();
        assert!(wakeup.wait(Duration::from_secs(10), &shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // The announcer, waiting for demand, finds the permit.
        tokio::time::timeout(Duration::from_millis(1), demand.notified())
            .await
            .expect("the wait asked the announcer to look again");
        shutdown.cancel();
        assert!(!wakeup.wait(Duration::from_secs(10), &shutdown).await);
    }

    #[tokio::test(start_paused = true)]
    async fn while_the_announcer_watches_a_reader_waits_longer_before_reading_anyway() {
        let (sender, _demand, mut wakeup) = wakeup();
        let shutdown = CancellationToken::new();
        wakeup.watching.store(true, Ordering::SeqCst);
        wakeup.mark_seen();
        let started = tokio::time::Instant::now();
        assert!(wakeup.wait(Duration::from_secs(1), &shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // An announcement (as the announcer's first failure makes) still
        // ends the long wait at once.
        wakeup.mark_seen();
        let started = tokio::time::Instant::now();
        let waiting = wakeup.wait(Duration::from_secs(1), &shutdown);
        sender.send_modify(|count| *count += 1);
        assert!(waiting.await);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_announcer_leaves_the_block_time() {
        let (sender, _demand, mut wakeup) = wakeup();
        drop(sender);
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        assert!(wakeup.wait(Duration::from_secs(3), &shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
