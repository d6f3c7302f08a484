//! Inspecting, replaying and deleting a destination's dead letters.
//!
//! Each (shard, destination) has a dead-letter stream. A dead letter's
//! public id is `<shard>-<id in that stream>`; lists are ordered by the
//! time of failure (the stream id), then shard.
//!
//! A replay appends the event again to the end of its shard stream,
//! addressed to that one destination and marked with the dead letter it
//! came from. The normal delivery path then takes it: after the events of
//! its user accepted before the replay, before those accepted after, and
//! the replayed events of a user in their original order (a shard's
//! dead letters are replayed in stream order). Its terminal outcome
//! removes the dead letter in the same MULTI as the acknowledgement; a
//! second failure leaves a new dead letter instead. Until then the dead
//! letter is listed as `replaying` and a second replay request skips it.

use std::collections::BTreeMap;

use protocol::RedisConnection;
use protocol::{EventEntry, EventId, Keys, Replay, StreamId};
use redis::Value;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Appends a replay unless the dead letter is gone or already replaying.
/// KEYS: dead-letter stream, replaying set, shard stream.
/// ARGV: dead letter id, then the entry's fields.
/// Returns 1 (appended), 0 (no such dead letter), -1 (already replaying).
const REPLAY: &str = r"
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return -1 end
redis.call('XADD', KEYS[3], '*', unpack(ARGV, 2))
return 1
";

/// Dead letters read per shard and round trip while replaying.
const REPLAY_PAGE: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("`{0}` is not a dead-letter id (expected <shard>-<ms>-<seq>)")]
    BadId(String),
    #[error("shard {shard} does not exist (there are {shards})")]
    NoSuchShard { shard: u16, shards: u16 },
    #[error("{0}")]
    BadSelection(String),
}

/// One dead letter as the admin API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetterView {
    pub id: String,
    pub event_id: Option<String>,
    /// Its delivery log: `/admin/events/{event_id}`.
    pub log: Option<String>,
    pub user_id: Option<String>,
    /// The event's payload as sent (JSON), when the entry had one.
    #[schema(value_type = Option<serde_json::Value>)]
    pub payload: Option<Box<RawValue>>,
    pub received_at_ms: Option<u64>,
    /// The name of the API key that sent the event.
    pub source: Option<String>,
    pub attempts: Option<u32>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// When it was dead-lettered (Redis's clock, as in its stream id).
    pub failed_at_ms: u64,
    /// A replay of it is under way.
    pub replaying: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page {
    pub dead_letters: Vec<DeadLetterView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
    /// Shards whose Redis did not answer (a master down or paused): their
    /// dead letters are missing from this page, and from the pages after
    /// it; list again once they answer.
    pub unavailable_shards: Vec<u16>,
}

/// Which dead letters to replay: all (no field), these ids, or those that
/// failed within `[from_ms, to_ms]` (Unix ms, either bound optional).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    pub ids: Option<Vec<String>>,
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ReplayReport {
    /// Appended for delivery.
    pub replayed: u64,
    /// Skipped: an earlier replay of them is still under way.
    pub already_replaying: u64,
    /// Named ids that are not (or no longer) dead letters.
    pub not_found: u64,
    /// Dead letters without an event to send (unreadable stream entries).
    pub unreplayable: u64,
    /// Shards whose Redis did not answer (a master down or paused): some
    /// of their selected dead letters may not have been replayed. The
    /// other shards' were; replaying again is safe (a dead letter already
    /// replaying is skipped).
    pub failed_shards: Vec<u16>,
}

impl ReplayReport {
    /// Adds one shard's part; `outcome` says whether it got through.
    fn merge(&mut self, shard: u16, part: ReplayReport, outcome: Result<(), DeadLetterError>) {
        if let Err(error) = outcome {
            tracing::warn!(shard, %error, "Could not replay one shard's dead letters.");
            self.failed_shards.push(shard);
        }
        self.replayed += part.replayed;
        self.already_replaying += part.already_replaying;
        self.not_found += part.not_found;
        self.unreplayable += part.unreplayable;
    }
}

/// What a purge deleted.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Purged {
    /// Dead letters deleted.
    pub deleted: u64,
    /// Shards whose Redis did not answer in time (a master down or
    /// paused); the other shards' dead letters were deleted. Theirs may
    /// still be, once it answers (the deletion was sent): purge again.
    pub failed_shards: Vec<u16>,
}

/// One shard's part of a replay.
enum ShardReplay {
    /// These dead letters (sorted, without repeats).
    Ids(Vec<StreamId>),
    /// Those that failed within `[start, end]` (XRANGE bounds).
    Range { start: String, end: String },
}

/// A raw dead-letter stream entry.
struct RawEntry {
    shard: u16,
    id: StreamId,
    fields: Vec<(String, String)>,
}

impl RawEntry {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    fn public_id(&self) -> String {
        EventId {
            shard: self.shard,
            stream_id: self.id,
        }
        .to_string()
    }

    fn event(&self) -> Option<EventEntry> {
        EventEntry::from_fields(self.fields.iter().map(|(k, v)| (k.as_str(), v.as_str()))).ok()
    }
}

/// A destination's dead letters over all shards.
pub struct DeadLetters {
    con: RedisConnection,
    keys: Keys,
    shards: u16,
    destination: String,
}

impl DeadLetters {
    pub fn new(con: RedisConnection, keys: Keys, shards: u16, destination: &str) -> Self {
        Self {
            con,
            keys,
            shards,
            destination: destination.to_owned(),
        }
    }

    /// Up to `limit` dead letters after `cursor`, oldest failure first.
    /// A shard whose Redis does not answer is left out and named.
    pub async fn list(&self, limit: usize, cursor: Option<&str>) -> Result<Page, DeadLetterError> {
        let after = cursor.map(|c| self.parse_id(c)).transpose()?;
        let ranges = (0..self.shards)
            .map(|shard| {
                // Ties on the stream id are broken by shard, as the list is sorted.
                let start = match after {
                    None => "-".to_owned(),
                    Some(after) if shard > after.shard => after.stream_id.to_string(),
                    Some(after) => format!("({}", after.stream_id),
                };
                let mut xrange = redis::cmd("XRANGE");
                xrange
                    .arg(self.keys.dead_letters(shard, &self.destination))
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit + 1);
                xrange
            })
            .collect();
        let replies = protocol::query_each::<Value>(&self.con, ranges).await;
        let mut entries = Vec::new();
        let mut unavailable_shards = Vec::new();
        for (shard, reply) in (0..self.shards).zip(replies) {
            match reply
                .map_err(DeadLetterError::from)
                .and_then(|r| parse_entries(shard, r))
            {
                Ok(found) => entries.extend(found),
                Err(error) => {
                    tracing::debug!(shard, %error, "A shard's dead letters could not be listed.");
                    unavailable_shards.push(shard);
                }
            }
        }
        entries.sort_by_key(|entry| (entry.id, entry.shard));
        let more = entries.len() > limit;
        entries.truncate(limit);
        let next_cursor = more
            .then(|| entries.last().map(RawEntry::public_id))
            .flatten();
        let marks = self.replaying_marks(&entries).await;
        let mut dead_letters = Vec::with_capacity(entries.len());
        for (entry, replaying) in entries.iter().zip(marks) {
            match replaying {
                Ok(replaying) => dead_letters.push(view(entry, replaying)),
                // Its master stopped answering since the listing.
                Err(_) if !unavailable_shards.contains(&entry.shard) => {
                    unavailable_shards.push(entry.shard)
                }
                Err(_) => {}
            }
        }
        unavailable_shards.sort_unstable();
        Ok(Page {
            dead_letters,
            next_cursor,
            unavailable_shards,
        })
    }

    /// Deletes one dead letter; false if there was none with that id.
    pub async fn delete(&self, id: &str) -> Result<bool, DeadLetterError> {
        let id = self.parse_id(id)?;
        let (deleted, _): (u64, u64) = redis::pipe()
            .atomic()
            .cmd("XDEL")
            .arg(self.keys.dead_letters(id.shard, &self.destination))
            .arg(id.stream_id.to_string())
            .cmd("SREM")
            .arg(self.keys.replaying(id.shard, &self.destination))
            .arg(id.stream_id.to_string())
            .query_async(&mut self.con.clone())
            .await?;
        Ok(deleted > 0)
    }

    /// Deletes every dead letter of the destination, each shard on its
    /// own: one whose Redis does not answer is named, the others purged.
    pub async fn purge(&self) -> Purged {
        let purges = (0..self.shards).map(|shard| async move {
            let purged: redis::RedisResult<(u64, Value, Value)> = redis::pipe()
                .atomic()
                .cmd("XLEN")
                .arg(self.keys.dead_letters(shard, &self.destination))
                .cmd("DEL")
                .arg(self.keys.dead_letters(shard, &self.destination))
                .cmd("DEL")
                .arg(self.keys.replaying(shard, &self.destination))
                .query_async(&mut self.con.clone())
                .await;
            (shard, purged)
        });
        let mut report = Purged::default();
        for (shard, purged) in futures_util::future::join_all(purges).await {
            match purged {
                Ok((count, _, _)) => report.deleted += count,
                Err(error) => {
                    tracing::warn!(shard, %error, "Could not purge one shard's dead letters.");
                    report.failed_shards.push(shard);
                }
            }
        }
        report
    }

    /// Replays the selected dead letters to this destination only, each
    /// shard on its own (at once): one whose Redis does not answer is
    /// named in the report, the others replayed.
    pub async fn replay(&self, selection: &Selection) -> Result<ReplayReport, DeadLetterError> {
        let work = self.replay_work(selection)?;
        let replays = work.into_iter().map(|(shard, work)| async move {
            let mut part = ReplayReport::default();
            let outcome = match work {
                ShardReplay::Ids(ids) => self.replay_ids(shard, &ids, &mut part).await,
                ShardReplay::Range { start, end } => {
                    self.replay_range(shard, start, &end, &mut part).await
                }
            };
            (shard, part, outcome)
        });
        let mut report = ReplayReport::default();
        for (shard, part, outcome) in futures_util::future::join_all(replays).await {
            report.merge(shard, part, outcome);
        }
        if report.replayed > 0 || !report.failed_shards.is_empty() {
            tracing::info!(destination = %self.destination, ?report, "Replaying dead letters.");
        }
        Ok(report)
    }

    /// What to replay on each shard, or why the selection is refused.
    fn replay_work(
        &self,
        selection: &Selection,
    ) -> Result<Vec<(u16, ShardReplay)>, DeadLetterError> {
        match (&selection.ids, selection.from_ms, selection.to_ms) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(DeadLetterError::BadSelection(
                "give either `ids` or a time range (`from_ms`, `to_ms`), not both".into(),
            )),
            (Some(ids), None, None) => {
                let mut by_shard: BTreeMap<u16, Vec<StreamId>> = BTreeMap::new();
                for id in ids {
                    let id = self.parse_id(id)?;
                    by_shard.entry(id.shard).or_default().push(id.stream_id);
                }
                Ok(by_shard
                    .into_iter()
                    .map(|(shard, mut ids)| {
                        ids.sort_unstable();
                        ids.dedup();
                        (shard, ShardReplay::Ids(ids))
                    })
                    .collect())
            }
            (None, Some(from), Some(to)) if from > to => Err(DeadLetterError::BadSelection(
                "`from_ms` is after `to_ms`".into(),
            )),
            (None, from_ms, to_ms) => {
                let start = from_ms.map_or_else(|| "-".to_owned(), |from| from.to_string());
                let end = to_ms.map_or_else(|| "+".to_owned(), |to| to.to_string());
                Ok((0..self.shards)
                    .map(|shard| {
                        let (start, end) = (start.clone(), end.clone());
                        (shard, ShardReplay::Range { start, end })
                    })
                    .collect())
            }
        }
    }

    /// Replays the dead letters `ids` (sorted) of one shard.
    async fn replay_ids(
        &self,
        shard: u16,
        ids: &[StreamId],
        report: &mut ReplayReport,
    ) -> Result<(), DeadLetterError> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("XRANGE")
                .arg(self.keys.dead_letters(shard, &self.destination))
                .arg(id.to_string())
                .arg(id.to_string());
        }
        let replies: Vec<Value> = pipe.query_async(&mut self.con.clone()).await?;
        let mut found = Vec::new();
        for reply in replies {
            found.extend(parse_entries(shard, reply)?);
        }
        report.not_found += (ids.len() - found.len()) as u64;
        self.append_replays(shard, &found, report).await
    }

    /// Replays one shard's dead letters that failed within `[start, end]`,
    /// a page at a time, in stream order.
    async fn replay_range(
        &self,
        shard: u16,
        mut start: String,
        end: &str,
        report: &mut ReplayReport,
    ) -> Result<(), DeadLetterError> {
        loop {
            let reply: Value = redis::cmd("XRANGE")
                .arg(self.keys.dead_letters(shard, &self.destination))
                .arg(&start)
                .arg(end)
                .arg("COUNT")
                .arg(REPLAY_PAGE)
                .query_async(&mut self.con.clone())
                .await?;
            let page = parse_entries(shard, reply)?;
            self.append_replays(shard, &page, report).await?;
            match page.last() {
                Some(last) if page.len() == REPLAY_PAGE => start = format!("({}", last.id),
                _ => return Ok(()),
            }
        }
    }

    /// Appends replays of `entries` (one shard's, in id order) in one
    /// pipeline, which keeps their order.
    async fn append_replays(
        &self,
        shard: u16,
        entries: &[RawEntry],
        report: &mut ReplayReport,
    ) -> Result<(), DeadLetterError> {
        let now_ms = protocol::unix_millis();
        let mut pipe = redis::pipe();
        let mut queued = 0;
        // Each replay's span, ended once the replays are appended.
        let mut spans = Vec::new();
        for entry in entries {
            let Some(mut event) = entry.event() else {
                report.unreplayable += 1;
                continue;
            };
            let first_event_id = event
                .replay
                .as_ref()
                .map(|replay| replay.event_id.clone())
                .or_else(|| entry.field("event_id").map(str::to_owned))
                .unwrap_or_else(|| entry.public_id());
            spans.push(crate::destination::trace::replay(
                &mut event,
                &first_event_id,
                &self.destination,
            ));
            event.destinations = Some(vec![self.destination.clone()]);
            event.replay = Some(Replay {
                dead_letter_id: entry.id.to_string(),
                event_id: first_event_id,
                replayed_at_ms: now_ms,
            });
            let script = pipe
                .cmd("EVAL")
                .arg(REPLAY)
                .arg(3)
                .arg(self.keys.dead_letters(shard, &self.destination))
                .arg(self.keys.replaying(shard, &self.destination))
                .arg(self.keys.events(shard))
                .arg(entry.id.to_string());
            for (name, value) in event.to_fields() {
                script.arg(name).arg(value.as_ref());
            }
            queued += 1;
        }
        if queued == 0 {
            return Ok(());
        }
        let outcomes: Vec<i64> = pipe.query_async(&mut self.con.clone()).await?;
        for outcome in outcomes {
            match outcome {
                1 => report.replayed += 1,
                -1 => report.already_replaying += 1,
                _ => report.not_found += 1,
            }
        }
        Ok(())
    }

    /// Whether each entry is being replayed; an entry whose Redis did not
    /// answer gets its own error.
    async fn replaying_marks(&self, entries: &[RawEntry]) -> Vec<redis::RedisResult<bool>> {
        let checks = entries
            .iter()
            .map(|entry| {
                let mut sismember = redis::cmd("SISMEMBER");
                sismember
                    .arg(self.keys.replaying(entry.shard, &self.destination))
                    .arg(entry.id.to_string());
                sismember
            })
            .collect();
        protocol::query_each(&self.con, checks).await
    }

    fn parse_id(&self, id: &str) -> Result<EventId, DeadLetterError> {
        let parsed: EventId = id
            .parse()
            .map_err(|_| DeadLetterError::BadId(id.to_owned()))?;
        if parsed.shard >= self.shards {
            return Err(DeadLetterError::NoSuchShard {
                shard: parsed.shard,
                shards: self.shards,
            });
        }
        Ok(parsed)
    }
}

fn view(entry: &RawEntry, replaying: bool) -> DeadLetterView {
    let number = |name: &str| entry.field(name).and_then(|v| v.parse::<u64>().ok());
    let event = entry.event();
    DeadLetterView {
        id: entry.public_id(),
        event_id: entry.field("event_id").map(str::to_owned),
        log: entry
            .field("event_id")
            .map(|event_id| format!("/admin/events/{event_id}")),
        user_id: event.as_ref().map(|e| e.user_id.clone()),
        payload: event.as_ref().map(|e| {
            RawValue::from_string(e.payload.clone()).unwrap_or_else(|_| {
                // Stored payloads are JSON; if one is not, show it as a string.
                RawValue::from_string(serde_json::Value::from(e.payload.clone()).to_string())
                    .expect("a JSON string is valid JSON")
            })
        }),
        received_at_ms: event.as_ref().map(|e| e.received_at_ms),
        source: event.as_ref().and_then(|e| e.source.clone()),
        attempts: number("attempts").and_then(|n| u32::try_from(n).ok()),
        last_status: number("last_status").and_then(|n| u16::try_from(n).ok()),
        last_error: entry.field("last_error").map(str::to_owned),
        // The stream id's time: what lists sort on and time ranges select.
        failed_at_ms: entry.id.ms,
        replaying,
    }
}

/// Reads an XRANGE reply: `[[id, [field, value, …]], …]`.
fn parse_entries(shard: u16, reply: Value) -> Result<Vec<RawEntry>, DeadLetterError> {
    let bad = |what: &str| {
        DeadLetterError::Redis(redis::RedisError::from((
            redis::ErrorKind::Parse,
            "unexpected XRANGE reply",
            what.to_owned(),
        )))
    };
    let Value::Array(items) = reply else {
        return Err(bad("not an array"));
    };
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        let (id, fields): (String, Vec<String>) =
            redis::FromRedisValue::from_redis_value(item).map_err(|_| bad("entry"))?;
        let id: StreamId = id.parse().map_err(|_| bad("entry id"))?;
        let fields = fields
            .chunks_exact(2)
            .map(|pair| (pair[0].clone(), pair[1].clone()))
            .collect();
        entries.push(RawEntry { shard, id, fields });
    }
    Ok(entries)
}
