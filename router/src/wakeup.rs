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
//! Per shard, a task learns where the stream ends (`XREVRANGE + - COUNT 1`),
//! blocks in `XREAD` after that, and on its reply bumps a counter on a watch
//! channel at once (the extra round trip is taken before the next wait, not
//! between an entry and its announcement). A worker marks the counter seen *before* its
//! read, so an entry added between the read and the wait still wakes it.
//! After an announcement the task reads again only once some worker waits:
//! under load nobody is caught up, and the task costs Redis nothing.
//! While the task cannot read (Redis down, the shard's node paused), workers
//! wake after their own `reader.block_ms` and read anyway: an announcement
//! only saves waiting, it never carries an entry.

use std::sync::atomic::{AtomicUsize, Ordering};
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

/// The announcements of every shard stream, each started when a reader
/// first needs it.
pub struct Wakeups {
    redis: RedisConfig,
    keys: Keys,
    block: Duration,
    shutdown: CancellationToken,
    shards: Vec<OnceLock<(watch::Receiver<u64>, Arc<Notify>)>>,
}

impl Wakeups {
    /// Announcements of the shard streams, each read over a connection of
    /// its own made from `redis`, blocking up to `block` at a time, until
    /// `shutdown`.
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

    /// Announcements of new entries on `shard`'s stream. The first call
    /// for a shard starts its announcer (within a Tokio runtime).
    pub fn of(&self, shard: u16) -> Wakeup {
        let (announcements, demand) = self.shards[usize::from(shard)]
            .get_or_init(|| {
                let (sender, receiver) = watch::channel(0u64);
                let demand = Arc::new(Notify::new());
                tokio::spawn(announce(
                    self.keys.events(shard),
                    self.redis.clone(),
                    self.block,
                    Announced {
                        sender,
                        demand: demand.clone(),
                    },
                    self.shutdown.clone(),
                ));
                (receiver, demand)
            })
            .clone();
        Wakeup {
            announcements,
            demand,
        }
    }
}

/// One worker's view of its shard's announcements.
pub struct Wakeup {
    announcements: watch::Receiver<u64>,
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

/// The announcer's side of a shard's channel.
struct Announced {
    sender: watch::Sender<u64>,
    /// Notified when a worker waits.
    demand: Arc<Notify>,
}

impl Announced {
    fn bump(&self) {
        self.sender
            .send_modify(|count| *count = count.wrapping_add(1));
    }
}

/// Announces new entries of `stream` until `shutdown`, read over a
/// connection of its own made from `redis`, blocking up to `block` at a time.
async fn announce(
    stream: String,
    redis: RedisConfig,
    block: Duration,
    announced: Announced,
    shutdown: CancellationToken,
) {
    // Its own connection: a blocked XREAD holds up whatever else shares it.
    // Made here, so a shard whose node is down delays no other shard.
    let what = format!("Redis unreachable at {}", redis.redacted_url());
    let connect = || redis.connect_for_blocking_reads(&stream, block + redis.timeout());
    let Ok(Some(mut connection)) =
        run_with_retries(&what, Backoff::STARTUP, &shutdown, |_| true, connect).await
    else {
        return;
    };
    let mut last: Option<StreamId> = None;
    let mut failures = 0u32;
    loop {
        let step = async {
            // Where the stream ends now. Entries added since the last look
            // are announced at once: a worker that has just read may have
            // missed them.
            let tail = last_id(&mut connection, &stream).await?;
            if last.is_some_and(|seen| seen != tail) {
                return Ok((true, tail));
            }
            // Announced on the reply, without another round trip; the next
            // look finds where the stream ends by then.
            let first_new = wait_after(&mut connection, &stream, tail, block).await?;
            Ok::<_, redis::RedisError>((first_new.is_some(), first_new.unwrap_or(tail)))
        };
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            result = step => result,
        };
        match result {
            Ok((new, tail)) => {
                if failures > 0 {
                    tracing::info!(%stream, "Watching the shard stream for new entries again.");
                }
                failures = 0;
                last = Some(tail);
                if new {
                    announced.bump();
                    // Until a worker has caught up, nobody needs the next.
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = announced.demand.notified() => {}
                    }
                }
            }
            Err(error) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(%stream, %error, "Cannot watch the shard stream for new entries; workers poll it meanwhile.");
                }
                // Where the stream ends is learnt again: it may have been
                // recreated. Whatever was added meanwhile, workers read
                // once they wake.
                last = None;
                if !Backoff::COMMANDS.wait(failures, &shutdown).await {
                    return;
                }
                announced.bump();
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

/// Blocks up to `block` for an entry after `after`; the first that came.
async fn wait_after(
    connection: &mut RedisConnection,
    stream: &str,
    after: StreamId,
    block: Duration,
) -> redis::RedisResult<Option<StreamId>> {
    let reply: Option<StreamReadReply> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(1)
        .arg("BLOCK")
        .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX))
        .arg("STREAMS")
        .arg(stream)
        .arg(after)
        .query_async(connection)
        .await?;
    let first = reply
        .and_then(|reply| reply.keys.into_iter().next())
        .and_then(|key| key.ids.into_iter().next());
    Ok(match first {
        Some(entry) => Some(entry.id.parse().unwrap_or(after)),
        None => None,
    })
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
