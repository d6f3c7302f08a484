//! What Redis holds, read for a test's assertions. Each helper fails (panics
//! naming the command) on a reply it cannot read, so a check can never pass
//! on a failed read.

use std::time::Duration;

use serde_json::Value;

use crate::{wait_for, HastyLoad, TestSystem, SHARDS};

impl TestSystem {
    /// How many times Redis ran `command` (lower case, e.g. `xack`), summed
    /// over every master (`INFO commandstats`).
    pub async fn command_calls(&self, command: &str) -> u64 {
        let infos = self
            .redis
            .connection()
            .await
            .info_of_every_master("commandstats")
            .await
            .expect("INFO commandstats");
        let field = format!("cmdstat_{command}");
        infos
            .iter()
            .filter_map(|info| protocol::meta::info_field(info, &field))
            .map(|stats| {
                // calls=12,usec=34,…
                stats
                    .split(',')
                    .find_map(|pair| pair.strip_prefix("calls="))
                    .and_then(|calls| calls.parse::<u64>().ok())
                    .expect("commandstats has calls=")
            })
            .sum()
    }

    /// Entries pending (read, not acknowledged) for `destination` over all shards.
    pub async fn pending(&self, destination: &str) -> u64 {
        let counts = self
            .per_shard(|mut con, shard| async move {
                let stream = self.group_stream(&mut con, shard, destination).await;
                // The summary form: [count, smallest id, largest id, consumers].
                let (count, _, _, _): (u64, redis::Value, redis::Value, redis::Value) =
                    redis::cmd("XPENDING")
                        .arg(stream)
                        .arg(destination)
                        .query_async(&mut con)
                        .await
                        .unwrap_or_else(|e| {
                            panic!("XPENDING of {destination} on shard {shard}: {e}")
                        });
                count
            })
            .await;
        counts.iter().sum()
    }

    /// Dead-letter entries of `destination` over all shards, as field maps.
    pub async fn dead_letters(
        &self,
        destination: &str,
    ) -> Vec<std::collections::HashMap<String, String>> {
        let per_shard = self
            .per_shard(|mut con, shard| async move {
                let entries: Vec<(String, std::collections::HashMap<String, String>)> =
                    redis::cmd("XRANGE")
                        .arg(self.keys.dead_letters(shard, destination))
                        .arg("-")
                        .arg("+")
                        .query_async(&mut con)
                        .await
                        .expect("XRANGE works");
                entries.into_iter().map(|(_, fields)| fields)
            })
            .await;
        per_shard.into_iter().flatten().collect()
    }

    /// The stream `destination`'s group on `shard` reads: its reference
    /// stream when it has one (a destination with `event_types`, routed),
    /// else the shard stream.
    pub async fn group_stream(
        &self,
        con: &mut protocol::RedisConnection,
        shard: u16,
        destination: &str,
    ) -> String {
        let refs = self.keys.refs(shard, destination);
        let routed: bool = redis::cmd("EXISTS")
            .arg(&refs)
            .query_async(con)
            .await
            .unwrap_or_else(|e| panic!("EXISTS {refs}: {e}"));
        if routed {
            refs
        } else {
            self.keys.events(shard)
        }
    }

    /// [`Self::group_stream`] of `destination` on `shard`, on a connection of its own.
    pub async fn group_stream_of(&self, destination: &str, shard: u16) -> String {
        let mut con = self.redis.connection().await;
        self.group_stream(&mut con, shard, destination).await
    }

    /// Entries in each shard stream.
    pub async fn shard_lengths(&self) -> Vec<u64> {
        self.per_shard(|mut con, shard| async move {
            let length: u64 = redis::cmd("XLEN")
                .arg(self.keys.events(shard))
                .query_async(&mut con)
                .await
                .expect("XLEN works");
            length
        })
        .await
    }

    /// Entries ever added to the shard streams (`XINFO STREAM`
    /// `entries-added`), however many were trimmed since.
    pub async fn entries_added(&self) -> u64 {
        let added = self
            .per_shard(|mut con, shard| async move {
                let stream = self.keys.events(shard);
                let exists: bool = redis::cmd("EXISTS")
                    .arg(&stream)
                    .query_async(&mut con)
                    .await
                    .unwrap_or_else(|e| panic!("EXISTS {stream}: {e}"));
                if !exists {
                    // No stream yet: nothing added.
                    return 0;
                }
                let info: std::collections::HashMap<String, redis::Value> = redis::cmd("XINFO")
                    .arg("STREAM")
                    .arg(&stream)
                    .query_async(&mut con)
                    .await
                    .unwrap_or_else(|e| panic!("XINFO STREAM {stream}: {e}"));
                let added = info.get("entries-added").unwrap_or_else(|| {
                    panic!("XINFO STREAM {stream} has no entries-added (Redis 7 needed)")
                });
                redis::from_redis_value::<u64>(added.clone())
                    .unwrap_or_else(|e| panic!("entries-added of {stream}: {e}"))
            })
            .await;
        added.iter().sum()
    }

    /// The `n` of each of `user`'s `{"n": …}` events in its shard stream,
    /// in stream order.
    pub async fn numbers_in_stream_of(&self, user: &str) -> Vec<u64> {
        let stream = self.keys.events(protocol::shard_for(user, SHARDS));
        let entries: Vec<(String, std::collections::HashMap<String, String>)> =
            redis::cmd("XRANGE")
                .arg(&stream)
                .arg("-")
                .arg("+")
                .query_async(&mut self.redis.connection().await)
                .await
                .expect("XRANGE works");
        entries
            .into_iter()
            .filter(|(_, fields)| fields.get("user").map(String::as_str) == Some(user))
            .filter_map(|(_, fields)| {
                let payload: Value = serde_json::from_str(fields.get("payload")?).ok()?;
                payload["n"].as_u64()
            })
            .collect()
    }

    /// After Redis comes back from a pause during which `sent` events
    /// `{"n": 0..sent}` of `user` were answered 503: every one of those
    /// writes, queued on its connection, lands, in the order sent, and the
    /// shard's doubt clears.
    pub async fn assert_timed_out_writes_landed_in_order(&self, user: &str, sent: usize) {
        wait_for(
            "every write that timed out lands",
            Duration::from_secs(30),
            || async { self.numbers_in_stream_of(user).await.len() >= sent },
        )
        .await;
        assert_eq!(
            self.numbers_in_stream_of(user).await,
            (0..sent as u64).collect::<Vec<_>>(),
            "in the order sent"
        );
        wait_for(
            "the shard's doubt to clear",
            Duration::from_secs(30),
            || async {
                self.gateway_metrics()
                    .await
                    .value("gateway_shards_in_doubt", &[])
                    == 0.0
            },
        )
        .await;
    }

    /// After Redis (or a master) comes back from a pause during `load`:
    /// once 200 more events are stored, stops it and asserts that the pause
    /// was felt (some 503s) and that no user's event is stored behind a
    /// later one of theirs.
    pub async fn assert_hasty_users_kept_their_order(&self, load: HastyLoad) {
        let stored_at_resume = self.stream_lengths().await;
        wait_for("events accepted again", Duration::from_secs(30), || async {
            self.stream_lengths().await > stored_at_resume + 200
        })
        .await;
        let (answers, users) = load.stop().await;
        let behind = self.stored_out_of_user_order(&users).await;
        eprintln!("answers by status: {answers:?}; stored behind a later event: {behind}");
        assert!(
            answers.get(&503).is_some_and(|&n| n > 0),
            "the pause was felt: {answers:?}"
        );
        assert_eq!(behind, 0, "events stored out of per-user order");
    }

    /// Once no shard is in doubt (every write that timed out has landed or
    /// never will): how many of `users`' `{"n": …}` events are stored
    /// after a later one of theirs.
    pub async fn stored_out_of_user_order(&self, users: &[String]) -> usize {
        wait_for("no shard in doubt", Duration::from_secs(30), || async {
            self.gateway_metrics()
                .await
                .value("gateway_shards_in_doubt", &[])
                == 0.0
        })
        .await;
        let mut behind = 0;
        for user in users {
            let numbers = self.numbers_in_stream_of(user).await;
            let late = numbers.windows(2).filter(|w| w[0] >= w[1]).count();
            if late > 0 {
                eprintln!("{user}'s events stored in this order: {numbers:?}");
            }
            behind += late;
        }
        behind
    }

    /// Total entries in all shard streams.
    pub async fn stream_lengths(&self) -> u64 {
        self.shard_lengths().await.iter().sum()
    }

    /// The longest shard stream.
    pub async fn longest_stream(&self) -> u64 {
        self.shard_lengths().await.into_iter().max().unwrap_or(0)
    }

    /// The holder of every lease (`None` = free): each (shard, destination)
    /// and each shard's routing stage while a destination is routed.
    pub async fn lease_holders(&self) -> Vec<Option<String>> {
        let mut holders = Vec::new();
        for destination in &self.destinations {
            holders.extend(self.lease_holders_of(destination.name()).await);
        }
        // Destinations with `event_types` read references: each shard's
        // routing stage holds a lease too.
        if self
            .destinations
            .iter()
            .any(|d| !d.settings.event_types.is_empty())
        {
            holders.extend(self.lease_holders_of(protocol::keys::ROUTING_GROUP).await);
        }
        holders
    }

    /// The holder of `destination`'s lease on every shard (`None` = free).
    /// Waits until every shard's lease of `destination` is held, and each
    /// of `routers` (consumer names) holds at least one.
    pub async fn wait_leased_by(&self, destination: &str, routers: &[&str], timeout: Duration) {
        let what = format!("{destination}'s leases held by {routers:?}");
        wait_for(&what, timeout, || async {
            let holders = self.lease_holders_of(destination).await;
            holders.iter().all(Option::is_some)
                && routers.iter().all(|router| {
                    let prefix = format!("{router}#");
                    holders
                        .iter()
                        .flatten()
                        .any(|holder| holder.starts_with(&prefix))
                })
        })
        .await;
    }

    pub async fn lease_holders_of(&self, destination: &str) -> Vec<Option<String>> {
        self.per_shard(|mut con, shard| async move {
            let lease = self.keys.lease(shard, destination);
            let holder: Option<String> = redis::cmd("GET")
                .arg(&lease)
                .query_async(&mut con)
                .await
                .unwrap_or_else(|e| panic!("GET {lease}: {e}"));
            holder
        })
        .await
    }

    /// On how many shards `destination` has a consumer group.
    pub async fn groups_of(&self, destination: &str) -> usize {
        let per_shard = self
            .per_shard(|mut con, shard| async move {
                let stream = self.group_stream(&mut con, shard, destination).await;
                let groups: redis::RedisResult<Vec<std::collections::HashMap<String, redis::Value>>> =
                    redis::cmd("XINFO").arg("GROUPS").arg(&stream).query_async(&mut con).await;
                let groups = match groups {
                    Ok(groups) => groups,
                    // XINFO GROUPS of a missing stream is a plain ERR.
                    Err(e) if e.code() == Some("ERR") => Vec::new(),
                    Err(e) => panic!("XINFO GROUPS {stream}: {e}"),
                };
                groups.iter().any(|group| {
                    matches!(group.get("name"), Some(redis::Value::BulkString(name)) if name == destination.as_bytes())
                })
            })
            .await;
        per_shard.into_iter().filter(|has| *has).count()
    }

    /// How many leases instances of `consumer_name` hold.
    pub async fn leases_held_by(&self, consumer_name: &str) -> usize {
        let prefix = format!("{consumer_name}#");
        self.lease_holders()
            .await
            .iter()
            .filter(|h| h.as_deref().is_some_and(|h| h.starts_with(&prefix)))
            .count()
    }

    /// Consumer names in `destination`'s group on every shard, deduplicated
    /// (none where the group does not exist).
    pub async fn consumers(&self, destination: &str) -> Vec<String> {
        let per_shard = self
            .per_shard(|mut con, shard| async move {
                let consumers: redis::RedisResult<
                    Vec<std::collections::HashMap<String, redis::Value>>,
                > = redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(self.group_stream(&mut con, shard, destination).await)
                    .arg(destination)
                    .query_async(&mut con)
                    .await;
                match consumers {
                    Ok(consumers) => consumers,
                    // No group (deleted, or never made): no consumers.
                    Err(e) if e.code() == Some("NOGROUP") => Vec::new(),
                    Err(e) => panic!("XINFO CONSUMERS of {destination} on shard {shard}: {e}"),
                }
            })
            .await;
        let mut names = std::collections::BTreeSet::new();
        for consumer in per_shard.iter().flatten() {
            if let Some(redis::Value::BulkString(name)) = consumer.get("name") {
                names.insert(String::from_utf8_lossy(&name[..]).into_owned());
            }
        }
        names.into_iter().collect()
    }

    /// `query(connection, shard)` on every shard in turn; the results in
    /// shard order.
    async fn per_shard<T, Fut>(
        &self,
        query: impl Fn(protocol::RedisConnection, u16) -> Fut,
    ) -> Vec<T>
    where
        Fut: std::future::Future<Output = T>,
    {
        let con = self.redis.connection().await;
        let mut results = Vec::with_capacity(usize::from(SHARDS));
        for shard in 0..SHARDS {
            results.push(query(con.clone(), shard).await);
        }
        results
    }
}
