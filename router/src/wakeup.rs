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
//! routing stage added for the shard's filtered destinations (whose
//! readers never block: their read is a script), told by the routing
//! signal stream. For each that some worker waits for, the task learns
//! where its stream ends (`XREVRANGE + - COUNT 1`), blocks in one `XREAD`
//! after those ends, and on its reply bumps a counter on that kind's watch
//! channel at once (the extra round trip is taken before the next wait, not
//! between an entry and its announcement). A worker marks the counter seen
//! *before* its read, so an entry added between the read and the wait still
//! wakes it. The task looks only at what some worker waits for: under load
//! nobody is caught up, and it costs Redis nothing.
//! While the task cannot read (Redis down, the shard's node paused), workers
//! wake after their own `reader.block_ms` and read anyway: an announcement
//! only saves waiting, it never carries an entry.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
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
pub enum Watched {
    /// New entries of the shard stream (a group on it).
    Events,
    /// References routed to the shard's filtered destinations
    /// ([`crate::routing`]), announced by the routing signal stream.
    Routed,
}

impl Watched {
    const ALL: [Watched; 2] = [Watched::Events, Watched::Routed];

    fn index(self) -> usize {
        match self {
            Watched::Events => 0,
            Watched::Routed => 1,
        }
    }

    fn stream(self, keys: &Keys, shard: u16) -> String {
        match self {
            Watched::Events => keys.events(shard),
            Watched::Routed => keys.routing_signal(shard),
        }
    }
}

/// One shard's announcer, as its readers hold it.
#[derive(Clone)]
struct Shard {
    announcements: [watch::Receiver<u64>; 2],
    wanted: [Arc<AtomicBool>; 2],
    demand: Arc<Notify>,
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
    pub fn of(&self, shard: u16, watched: Watched) -> Wakeup {
        let shard_state = self.shards[usize::from(shard)]
            .get_or_init(|| {
                let demand = Arc::new(Notify::new());
                let mut receivers = Vec::new();
                let mut channels = Vec::new();
                for watched in Watched::ALL {
                    let (sender, receiver) = watch::channel(0u64);
                    let wanted = Arc::new(AtomicBool::new(false));
                    receivers.push(receiver);
                    channels.push(Channel {
                        stream: watched.stream(&self.keys, shard),
                        sender,
                        wanted,
                        last: None,
                    });
                }
                let state = Shard {
                    announcements: [receivers[0].clone(), receivers[1].clone()],
                    wanted: [channels[0].wanted.clone(), channels[1].wanted.clone()],
                    demand: demand.clone(),
                };
                tokio::spawn(announce(
                    channels,
                    self.redis.clone(),
                    self.block,
                    demand,
                    self.shutdown.clone(),
                ));
                state
            })
            .clone();
        let index = watched.index();
        Wakeup {
            announcements: shard_state.announcements[index].clone(),
            wanted: shard_state.wanted[index].clone(),
            demand: shard_state.demand,
        }
    }
}

/// One worker's view of its shard's announcements of one kind.
pub struct Wakeup {
    announcements: watch::Receiver<u64>,
    /// Set while a reader of this kind waits: the announcer watches only
    /// what someone waits for.
    wanted: Arc<AtomicBool>,
    /// Tells the announcer someone waits (a permit is kept until it looks).
    demand: Arc<Notify>,
}

impl Wakeup {
    /// Marks every announcement so far as seen; call it before a read, so
    /// that [`Self::wait`] after an empty read returns on anything newer.
    pub fn mark_seen(&mut self) {
        self.announcements.borrow_and_update();
    }

    /// Waits for an announcement since [`Self::mark_seen`], at most
    /// `at_most`, or until `shutdown`; false at shutdown.
    pub async fn wait(&mut self, at_most: Duration, shutdown: &CancellationToken) -> bool {
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

/// The announcer's side of one watched stream.
struct Channel {
    stream: String,
    sender: watch::Sender<u64>,
    /// Whether a reader waits for it.
    wanted: Arc<AtomicBool>,
    /// The last entry announced or looked at.
    last: Option<StreamId>,
}

impl Channel {
    /// Announces what came after `last`, now `seen`. The wish is cleared
    /// before the bump: a reader that wishes again after it has seen the
    /// bump (it marked it seen before its next read) is not forgotten.
    fn announce(&mut self, seen: StreamId) {
        self.last = Some(seen);
        self.bump();
    }

    fn bump(&self) {
        self.wanted.store(false, Ordering::SeqCst);
        self.sender
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    fn is_wanted(&self) -> bool {
        self.wanted.load(Ordering::SeqCst)
    }
}

/// Announces new entries of the `channels`' streams (one shard's, so one
/// connection and one `XREAD` serve them all) until `shutdown`, read over
/// a connection of its own made from `redis`, blocking up to `block` at a
/// time. It looks only while a reader waits (`demand`), and only at the
/// streams someone waits for: a busy stream that nobody waits on would
/// otherwise answer every look at once.
async fn announce(
    mut channels: Vec<Channel>,
    redis: RedisConfig,
    block: Duration,
    demand: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let Some(first) = channels.first() else {
        return;
    };
    let shard_stream = first.stream.clone();
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
        if !channels.iter().any(Channel::is_wanted) {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = demand.notified() => {}
            }
            continue;
        }
        let step = look(&mut connection, &mut channels, block);
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            result = step => result,
        };
        match result {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(stream = %shard_stream, "Watching the shard for new entries again.");
                }
                failures = 0;
            }
            Err(error) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(stream = %shard_stream, %error, "Cannot watch the shard for new entries; workers poll it meanwhile.");
                }
                // Where the streams end is learnt again: they may have been
                // recreated. Whatever was added meanwhile, workers read
                // once they wake.
                for channel in &mut channels {
                    channel.last = None;
                }
                if !Backoff::COMMANDS.wait(failures, &shutdown).await {
                    return;
                }
                for channel in &channels {
                    channel.bump();
                }
            }
        }
    }
}

/// One look at the wanted streams: entries added since the last look are
/// announced at once (a worker that has just read may have missed them);
/// else it blocks in `XREAD` after their ends, announcing on the reply
/// without another round trip.
async fn look(
    connection: &mut RedisConnection,
    channels: &mut [Channel],
    block: Duration,
) -> redis::RedisResult<()> {
    let mut announced = false;
    for channel in channels.iter_mut().filter(|c| c.is_wanted()) {
        let tail = last_id(connection, &channel.stream).await?;
        match channel.last {
            Some(seen) if seen != tail => {
                channel.announce(tail);
                announced = true;
            }
            _ => channel.last = Some(tail),
        }
    }
    if announced {
        return Ok(());
    }
    let watched: Vec<usize> = (0..channels.len())
        .filter(|&i| channels[i].is_wanted())
        .collect();
    if watched.is_empty() {
        return Ok(());
    }
    let mut command = redis::cmd("XREAD");
    command
        .arg("COUNT")
        .arg(1)
        .arg("BLOCK")
        .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX))
        .arg("STREAMS");
    for &i in &watched {
        command.arg(&channels[i].stream);
    }
    for &i in &watched {
        command.arg(channels[i].last.unwrap_or_default());
    }
    let reply: Option<StreamReadReply> = command.query_async(connection).await?;
    for key in reply.map(|reply| reply.keys).unwrap_or_default() {
        let Some(channel) = channels.iter_mut().find(|c| c.stream == key.key) else {
            continue;
        };
        let first = key.ids.first().and_then(|entry| entry.id.parse().ok());
        channel.announce(first.unwrap_or_else(|| channel.last.unwrap_or_default()));
    }
    Ok(())
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
    async fn an_ended_announcer_leaves_the_block_time() {
        let (sender, _demand, mut wakeup) = wakeup();
        drop(sender);
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        assert!(wakeup.wait(Duration::from_secs(3), &shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
