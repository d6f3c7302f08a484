//! Exclusive ownership of (shard, destination) pairs.
//!
//! Only one router may deliver a shard to a destination at a time: two would
//! each take entries of the same user and deliver them concurrently,
//! breaking per-user order. Each pair has a lease: a Redis key holding the
//! owner's instance id, set with `SET NX PX` and renewed while the owner
//! lives. A crashed owner's lease expires; a stopping owner deletes it.
//!
//! The owner never relies on a lease it cannot prove it still holds: after
//! each renewal it knows the lease lasts at least until
//! `sent_at + ttl` (Redis received the renewal after we sent it), and it uses
//! the lease only until `sent_at + ttl - safety_margin`. An attempt or read
//! starts only if it ends before then ([`LeaseGuard::hold_for`]), so it is
//! over before any other router can acquire the lease.
//!
//! Live routers announce themselves in a sorted set scored by when their
//! heartbeat expires; [`assign`] splits the pairs evenly among them.

use std::time::{Duration, Instant};

use protocol::Keys;
use protocol::RedisConnection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Refreshes this instance's heartbeat, drops expired ones (by Redis's
/// clock, so routers' clocks need not agree) and lists the live instances.
/// KEYS: membership set. ARGV: instance id, ttl ms.
const HEARTBEAT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

/// Extends each lease we still hold. KEYS: leases, all of one shard (their
/// keys share its hash tag). ARGV: instance id, ttl ms. Returns 1 or 0 per
/// lease.
const RENEW: &str = r"
local renewed = {}
for i, key in ipairs(KEYS) do
  renewed[i] = 0
  if redis.call('GET', key) == ARGV[1] then
    renewed[i] = redis.call('PEXPIRE', key, ARGV[2])
  end
end
return renewed
";

/// Deletes the lease if we still hold it. KEYS: lease. ARGV: instance id.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// One (shard, destination) pair, the unit of ownership.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId {
    pub shard: u16,
    pub destination: String,
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shard {} → {}", self.shard, self.destination)
    }
}

/// The pairs `me` should own when `members` (sorted) are alive. Each
/// destination's shards are dealt round-robin, starting one member further
/// for each next destination, so every router gets an even share of every
/// destination (its slow destinations included) and of the pairs overall.
/// `pairs` must be sorted, as every router sorts them alike.
pub fn assign(pairs: &[LeaseId], members: &[String], me: &str) -> Vec<LeaseId> {
    let Some(position) = members.iter().position(|m| m == me) else {
        return Vec::new();
    };
    let mut destinations: Vec<&str> = pairs.iter().map(|p| p.destination.as_str()).collect();
    destinations.sort_unstable();
    destinations.dedup();
    let mut dealt = vec![0usize; destinations.len()];
    let mut mine = Vec::new();
    for pair in pairs {
        let index = destinations
            .binary_search(&pair.destination.as_str())
            .unwrap_or_default();
        let turn = dealt[index] + index;
        dealt[index] += 1;
        if turn % members.len() == position {
            mine.push(pair.clone());
        }
    }
    mine
}

/// Lease and membership commands of one router instance.
pub struct LeaseStore {
    con: RedisConnection,
    keys: Keys,
    instance: String,
    ttl_ms: u64,
}

impl LeaseStore {
    pub fn new(con: RedisConnection, keys: Keys, instance: String, ttl: Duration) -> Self {
        Self {
            con,
            keys,
            instance,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Announces this instance for another ttl; returns the live instances, sorted.
    pub async fn heartbeat(&self) -> redis::RedisResult<Vec<String>> {
        let mut members: Vec<String> = redis::cmd("EVAL")
            .arg(HEARTBEAT)
            .arg(1)
            .arg(self.keys.routers())
            .arg(&self.instance)
            .arg(self.ttl_ms)
            .query_async(&mut self.con.clone())
            .await?;
        members.sort();
        Ok(members)
    }

    /// Withdraws this instance, so the others rebalance without waiting for
    /// its heartbeat to expire.
    pub async fn leave(&self) -> redis::RedisResult<()> {
        redis::cmd("ZREM")
            .arg(self.keys.routers())
            .arg(&self.instance)
            .query_async(&mut self.con.clone())
            .await
    }

    /// Takes the lease if nobody holds it.
    pub async fn try_acquire(&self, lease: &LeaseId) -> redis::RedisResult<bool> {
        let reply: Option<String> = redis::cmd("SET")
            .arg(self.key(lease))
            .arg(&self.instance)
            .arg("NX")
            .arg("PX")
            .arg(self.ttl_ms)
            .query_async(&mut self.con.clone())
            .await?;
        Ok(reply.is_some())
    }

    /// Extends each of `leases`, all of one shard, that we still hold, in
    /// one script (one per pair cost a router with 64 destinations on 16
    /// shards 1,024 scripts a second): whether we do, per lease.
    pub async fn renew(&self, leases: &[LeaseId]) -> redis::RedisResult<Vec<bool>> {
        let mut script = redis::cmd("EVAL");
        script.arg(RENEW).arg(leases.len());
        for lease in leases {
            script.arg(self.key(lease));
        }
        let extended: Vec<i64> = script
            .arg(&self.instance)
            .arg(self.ttl_ms)
            .query_async(&mut self.con.clone())
            .await?;
        if extended.len() != leases.len() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "the renewal script answered for another number of leases",
            )));
        }
        Ok(extended.into_iter().map(|renewed| renewed == 1).collect())
    }

    /// Gives the lease up so another router can take it at once.
    pub async fn release(&self, lease: &LeaseId) -> redis::RedisResult<()> {
        let _: i64 = redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(self.key(lease))
            .arg(&self.instance)
            .query_async(&mut self.con.clone())
            .await?;
        Ok(())
    }

    fn key(&self, lease: &LeaseId) -> String {
        self.keys.lease(lease.shard, &lease.destination)
    }
}

/// The owner side of a lease: until when it may be used.
pub struct LeaseValidity {
    valid_until: watch::Sender<Instant>,
    safe_span: Duration,
}

impl LeaseValidity {
    /// A lease acquired or renewed by a command sent at `sent_at`.
    pub fn new(sent_at: Instant, ttl: Duration, safety_margin: Duration) -> Self {
        let safe_span = ttl.saturating_sub(safety_margin);
        let (valid_until, _) = watch::channel(sent_at + safe_span);
        Self {
            valid_until,
            safe_span,
        }
    }

    /// Records a successful renewal sent at `sent_at`.
    pub fn renewed(&self, sent_at: Instant) {
        self.valid_until.send_replace(sent_at + self.safe_span);
    }

    pub fn has_lapsed(&self) -> bool {
        Instant::now() >= *self.valid_until.borrow()
    }

    pub fn guard(&self) -> LeaseGuard {
        LeaseGuard {
            valid_until: self.valid_until.subscribe(),
        }
    }
}

/// The user side of a lease: workers ask it before each attempt and read.
#[derive(Clone)]
pub struct LeaseGuard {
    valid_until: watch::Receiver<Instant>,
}

impl LeaseGuard {
    /// Waits until the lease is sure to last `needed` more; false if `stop`
    /// is cancelled first (the lease was lost or is being given up).
    pub async fn hold_for(&mut self, needed: Duration, stop: &CancellationToken) -> bool {
        loop {
            if Instant::now() + needed <= *self.valid_until.borrow_and_update() {
                return true;
            }
            tokio::select! {
                () = stop.cancelled() => return false,
                changed = self.valid_until.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(shards: u16, destinations: &[&str]) -> Vec<LeaseId> {
        let mut pairs: Vec<LeaseId> = (0..shards)
            .flat_map(|shard| {
                destinations.iter().map(move |d| LeaseId {
                    shard,
                    destination: (*d).to_owned(),
                })
            })
            .collect();
        pairs.sort();
        pairs
    }

    #[test]
    fn assignment_is_even_complete_and_spreads_each_destination() {
        let all = pairs(8, &["a", "b", "c"]);
        let members: Vec<String> = vec!["r1".into(), "r2".into(), "r3".into()];
        let mut seen = Vec::new();
        for member in &members {
            let mine = assign(&all, &members, member);
            assert_eq!(mine.len(), 8, "{member} gets an even share");
            for destination in ["a", "b", "c"] {
                let count = mine.iter().filter(|p| p.destination == destination).count();
                assert!(
                    count >= 2,
                    "{member} delivers {destination} on {count} shards"
                );
            }
            seen.extend(mine);
        }
        seen.sort();
        assert_eq!(seen, all, "every pair has exactly one owner");
        assert!(assign(&all, &members, "not-a-member").is_empty());
    }

    #[tokio::test]
    async fn guard_refuses_work_that_would_outlast_the_lease() {
        let ttl = Duration::from_millis(1000);
        let validity = LeaseValidity::new(Instant::now(), ttl, Duration::from_millis(100));
        let mut guard = validity.guard();
        let stop = CancellationToken::new();
        assert!(guard.hold_for(Duration::from_millis(500), &stop).await);
        let waiting = tokio::spawn({
            let (mut guard, stop) = (guard.clone(), stop.clone());
            async move { guard.hold_for(Duration::from_millis(2000), &stop).await }
        });
        validity.renewed(Instant::now() + Duration::from_millis(2000));
        assert!(waiting.await.expect("joins"), "a renewal lets it proceed");
        let waiting = tokio::spawn({
            let (mut guard, stop) = (guard.clone(), stop.clone());
            async move { guard.hold_for(Duration::from_secs(60), &stop).await }
        });
        stop.cancel();
        assert!(!waiting.await.expect("joins"), "cancelled while waiting");
        assert!(!validity.has_lapsed());
    }
}
