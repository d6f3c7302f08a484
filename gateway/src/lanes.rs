//! Which Redis connection carries a shard's writes.
//!
//! Each actix worker thread writes over connections of its own, made on
//! that thread, so a request does not hand its command to another thread
//! and wait to be woken back: that hand-off cost about a fifth of the
//! gateway's CPU per event (docs/benchmarks.md). Until a worker's own
//! connections are made, and for every other command, the shared ones
//! made at start-up serve.
//!
//! Which of its own. A write takes the first connection whose unanswered
//! writes leave room for it within [`LANE_BYTES`], about what Redis reads
//! from one client per turn of its event loop; when none has room, the least
//! loaded. So light load rides one connection (one read, one reply write
//! per turn for Redis, fewer wake-ups for the worker), and heavy load, such
//! as batches, spreads over all of them, each read taking its full share.
//!
//! Order. A user's next event is sent after the previous one was answered,
//! and may reach another worker. A 202 means Redis has the write, so any
//! connection may carry the next one. But a write whose outcome is unknown
//! (it timed out, or its connection failed) may still be queued on its
//! connection and land later, after writes sent since over other
//! connections. So a failed write puts its shard *in doubt* on its
//! connection before the client is answered: until that connection has
//! answered a command sent after the failure, every write of the shard, from
//! every worker, goes over it, behind the stale write, as if the shard had
//! one connection. Writes of one shard in flight on several connections at
//! once may all fail (Redis paused under load): then no connection is
//! behind all the stale writes, and the shard's writes are refused (503,
//! nothing sent) until all but one of those connections have drained.
//! (`tests/tests/faults.rs` and `cluster.rs` check this with Redis, or one
//! master, paused.)

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use protocol::sync::lock;
use protocol::{run_with_retries, Backoff, Keys, RedisConfig, RedisConnection};
use tokio_util::sync::CancellationToken;

/// After a failure to make a worker's connections, the next try waits this
/// long (meanwhile the shared ones serve).
const RETRY_CONNECTING_AFTER: Duration = Duration::from_secs(1);

/// Bytes of unanswered writes one of a worker's connections carries before
/// the next write takes another: Redis reads at most 16 KiB from a client
/// per turn of its event loop, and one turn's commands share one fsync.
const LANE_BYTES: usize = 16 * 1024;

/// The connections of all workers, and the shards in doubt.
pub struct Lanes {
    redis: RedisConfig,
    /// Named by their index.
    shared: Vec<RedisConnection>,
    /// Names each worker connection, after the shared ones.
    connections_made: AtomicUsize,
    /// Per shard: each connection holding a write of the shard whose
    /// outcome is unknown, at most once.
    doubts: Vec<Mutex<Vec<Doubt>>>,
    /// Numbers the doubts, so a drained one clears only itself.
    doubts_raised: AtomicU64,
    keys: Keys,
}

struct Doubt {
    lane: LaneId,
    connection: RedisConnection,
    number: u64,
}

/// Names one of the gateway's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneId(usize);

/// Writes of this shard have an unknown outcome on several connections,
/// so none may carry the next one yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InDoubtOnSeveral;

impl Lanes {
    /// `shared` serve every command until workers have their own.
    pub fn new(redis: RedisConfig, shared: Vec<RedisConnection>, keys: &Keys) -> Arc<Self> {
        let shards = redis.shards;
        Arc::new(Self {
            redis,
            connections_made: AtomicUsize::new(shared.len()),
            shared,
            doubts: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
            doubts_raised: AtomicU64::new(0),
            keys: keys.clone(),
        })
    }

    /// A shared connection, for commands other than writes of events.
    pub fn shared(&self, shard: u16) -> RedisConnection {
        self.shared_lane(shard).1
    }

    fn shared_lane(&self, shard: u16) -> (LaneId, RedisConnection) {
        let index = usize::from(shard) % self.shared.len();
        (LaneId(index), self.shared[index].clone())
    }

    /// The lanes of one worker thread; call on that thread.
    pub fn for_worker(self: &Arc<Self>) -> WorkerLanes {
        WorkerLanes {
            lanes: self.clone(),
            own: Arc::new(OnceLock::new()),
            tried_at: Mutex::new(None),
        }
    }

    /// The connection a write of `shard` must take while it is in doubt
    /// (`Ok(None)`: it is not).
    fn doubt(&self, shard: u16) -> Result<Option<Taken<'_>>, InDoubtOnSeveral> {
        let doubts = lock(&self.doubts[usize::from(shard)]);
        match doubts.as_slice() {
            [] => Ok(None),
            [doubt] => Ok(Some(Taken::untracked(doubt.lane, doubt.connection.clone()))),
            _ => Err(InDoubtOnSeveral),
        }
    }

    /// Records that a write of `shard` over `taken` failed with an unknown
    /// outcome: the shard's writes take that connection until it has
    /// answered a command sent after now. Call before answering the client.
    pub fn write_failed(self: &Arc<Self>, shard: u16, taken: &Taken<'_>) {
        let number = self.doubts_raised.fetch_add(1, Ordering::Relaxed);
        {
            let mut doubts = lock(&self.doubts[usize::from(shard)]);
            if doubts.is_empty() {
                metrics::gauge!("gateway_shards_in_doubt").increment(1.0);
            }
            match doubts.iter_mut().find(|doubt| doubt.lane == taken.lane) {
                Some(doubt) => doubt.number = number,
                None => doubts.push(Doubt {
                    lane: taken.lane,
                    connection: taken.connection.clone(),
                    number,
                }),
            }
        }
        tokio::spawn(self.clone().clear_when_drained(
            shard,
            taken.lane,
            taken.connection.clone(),
            number,
        ));
    }

    /// Waits until `connection` answers a command sent after the failure
    /// (so everything sent before it has been executed), then ends doubt
    /// `number` unless a newer one on `lane` replaced it.
    async fn clear_when_drained(
        self: Arc<Self>,
        shard: u16,
        lane: LaneId,
        connection: RedisConnection,
        number: u64,
    ) {
        // Tries until the connection answers; the task ends with the
        // worker's runtime at shutdown.
        let never = CancellationToken::new();
        let timeout = self.redis.timeout();
        let probe = || {
            let mut probe = redis::cmd("EXISTS");
            // Names the stream, so a cluster sends it to the stream's master.
            probe.arg(self.keys.events(shard));
            // A clone shares the connection: the probe goes behind the failed write.
            let mut connection = connection.clone();
            async move {
                match tokio::time::timeout(timeout, probe.query_async::<u64>(&mut connection)).await
                {
                    Ok(answer) => answer.map(drop).map_err(|error| error.to_string()),
                    Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
                }
            }
        };
        let what =
            format!("Shard {shard} stays in doubt until the connection a write failed on answers");
        let _ = run_with_retries(&what, Backoff::COMMANDS, &never, |_| true, probe).await;
        let mut doubts = lock(&self.doubts[usize::from(shard)]);
        let before = doubts.len();
        doubts.retain(|doubt| (doubt.lane, doubt.number) != (lane, number));
        if doubts.is_empty() && before > 0 {
            metrics::gauge!("gateway_shards_in_doubt").decrement(1.0);
        }
    }
}

/// One actix worker's connections: made on first use, by a task on the
/// worker's thread, so their I/O runs there too.
pub struct WorkerLanes {
    lanes: Arc<Lanes>,
    own: Arc<OnceLock<Vec<Lane>>>,
    /// When making them was last started; `None` before the first write.
    tried_at: Mutex<Option<Instant>>,
}

/// One of a worker's own connections.
struct Lane {
    id: LaneId,
    connection: RedisConnection,
    /// Bytes of the writes sent over it and not yet answered.
    in_flight: AtomicUsize,
}

impl Lane {
    fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// The connection a write goes over; its bytes count as in flight on it
/// until this is dropped.
pub struct Taken<'a> {
    pub connection: RedisConnection,
    lane: LaneId,
    held: Option<(&'a AtomicUsize, usize)>,
}

impl Taken<'_> {
    fn untracked(lane: LaneId, connection: RedisConnection) -> Self {
        Self {
            connection,
            lane,
            held: None,
        }
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some((in_flight, bytes)) = &self.held {
            in_flight.fetch_sub(*bytes, Ordering::Relaxed);
        }
    }
}

impl WorkerLanes {
    /// The connection for a write of `bytes` to `shard`: the one in doubt
    /// if there is one, else one of this worker's own (see the module
    /// comment), else a shared one. An error while the shard is in doubt
    /// on several connections.
    pub fn for_write(&self, shard: u16, bytes: usize) -> Result<Taken<'_>, InDoubtOnSeveral> {
        if let Some(taken) = self.lanes.doubt(shard)? {
            return Ok(taken);
        }
        let Some(own) = self.own.get() else {
            self.start_connecting();
            let (index, connection) = self.lanes.shared_lane(shard);
            return Ok(Taken::untracked(index, connection));
        };
        let lane = &own[pick_lane(own.iter().map(Lane::load), bytes)];
        lane.in_flight.fetch_add(bytes, Ordering::Relaxed);
        Ok(Taken {
            connection: lane.connection.clone(),
            lane: lane.id,
            held: Some((&lane.in_flight, bytes)),
        })
    }

    fn start_connecting(&self) {
        let mut tried_at = lock(&self.tried_at);
        if tried_at.is_some_and(|at| at.elapsed() < RETRY_CONNECTING_AFTER) {
            return;
        }
        *tried_at = Some(Instant::now());
        let (own, lanes) = (self.own.clone(), self.lanes.clone());
        // On an actix worker this runs on the worker's own thread.
        tokio::spawn(async move {
            let redis = &lanes.redis;
            let mut connections = Vec::with_capacity(redis.connections);
            for _ in 0..redis.connections {
                match redis.connect(redis.timeout()).await {
                    Ok(connection) => connections.push(Lane {
                        id: LaneId(lanes.connections_made.fetch_add(1, Ordering::Relaxed)),
                        connection,
                        in_flight: AtomicUsize::new(0),
                    }),
                    Err(error) => {
                        tracing::debug!(%error, "Cannot make a worker's own Redis connections yet.");
                        return;
                    }
                }
            }
            let _ = own.set(connections);
        });
    }
}

/// The index of the lane a write of `bytes` takes, given the unanswered
/// bytes of each: the first with room for it, else the least loaded.
fn pick_lane(loads: impl Iterator<Item = usize> + Clone, bytes: usize) -> usize {
    let lanes = loads.enumerate();
    if let Some((index, _)) = lanes.clone().find(|&(_, load)| load + bytes <= LANE_BYTES) {
        return index;
    }
    lanes
        .min_by_key(|&(_, load)| load)
        .map_or(0, |(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(loads: &[usize], bytes: usize) -> usize {
        pick_lane(loads.iter().copied(), bytes)
    }

    #[test]
    fn writes_ride_the_first_lane_while_it_has_room() {
        assert_eq!(pick(&[0, 0, 0, 0], 300), 0);
        assert_eq!(pick(&[LANE_BYTES - 300, 0, 0, 0], 300), 0);
    }

    #[test]
    fn a_write_without_room_spills_to_the_next_lane_with_room() {
        assert_eq!(pick(&[LANE_BYTES - 299, 0, 0, 0], 300), 1);
        assert_eq!(pick(&[LANE_BYTES, LANE_BYTES, 100, 0], 3_000), 2);
    }

    #[test]
    fn when_no_lane_has_room_the_least_loaded_takes_it() {
        assert_eq!(
            pick(
                &[LANE_BYTES, 2 * LANE_BYTES, LANE_BYTES / 2, LANE_BYTES],
                10_000
            ),
            2
        );
        // An event larger than a lane's share goes to an idle lane.
        assert_eq!(pick(&[500, 0, 700, 0], 1 << 20), 1);
    }
}
