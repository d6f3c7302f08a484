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
        let replies: Vec<Value> = protocol::query_each(&self.con, ranges).await?;
        let mut entries = Vec::new();
        for (shard, reply) in (0..self.shards).zip(replies) {
            entries.extend(parse_entries(shard, reply)?);
        }
        entries.sort_by_key(|entry| (entry.id, entry.shard));
        let more = entries.len() > limit;
        entries.truncate(limit);
        let replaying = self.replaying_marks(&entries).await?;
        let next_cursor = more
            .then(|| entries.last().map(RawEntry::public_id))
            .flatten();
        let dead_letters = entries
            .iter()
            .zip(replaying)
            .map(|(entry, replaying)| view(entry, replaying))
            .collect();
        Ok(Page {
            dead_letters,
            next_cursor,
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

    /// Deletes every dead letter of the destination; returns how many.
    pub async fn purge(&self) -> Result<u64, DeadLetterError> {
        let mut purged = 0;
        for shard in 0..self.shards {
            let (count, _, _): (u64, Value, Value) = redis::pipe()
                .atomic()
                .cmd("XLEN")
                .arg(self.keys.dead_letters(shard, &self.destination))
                .cmd("DEL")
                .arg(self.keys.dead_letters(shard, &self.destination))
                .cmd("DEL")
                .arg(self.keys.replaying(shard, &self.destination))
                .query_async(&mut self.con.clone())
                .await?;
            purged += count;
        }
        Ok(purged)
    }

    /// Replays the selected dead letters to this destination only.
    pub async fn replay(&self, selection: &Selection) -> Result<ReplayReport, DeadLetterError> {
        let mut report = ReplayReport::default();
        match (&selection.ids, selection.from_ms, selection.to_ms) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(DeadLetterError::BadSelection(
                    "give either `ids` or a time range (`from_ms`, `to_ms`), not both".into(),
                ))
            }
            (Some(ids), None, None) => {
                let mut by_shard: BTreeMap<u16, Vec<StreamId>> = BTreeMap::new();
                for id in ids {
                    let id = self.parse_id(id)?;
                    by_shard.entry(id.shard).or_default().push(id.stream_id);
                }
                for (shard, mut ids) in by_shard {
                    ids.sort_unstable();
                    ids.dedup();
                    let mut pipe = redis::pipe();
                    for id in &ids {
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
                    self.append_replays(shard, &found, &mut report).await?;
                }
            }
            (None, from_ms, to_ms) => {
                if let (Some(from), Some(to)) = (from_ms, to_ms) {
                    if from > to {
                        return Err(DeadLetterError::BadSelection(
                            "`from_ms` is after `to_ms`".into(),
                        ));
                    }
                }
                let end = to_ms.map_or_else(|| "+".to_owned(), |to| to.to_string());
                for shard in 0..self.shards {
                    let mut start = from_ms.map_or_else(|| "-".to_owned(), |from| from.to_string());
                    loop {
                        let reply: Value = redis::cmd("XRANGE")
                            .arg(self.keys.dead_letters(shard, &self.destination))
                            .arg(&start)
                            .arg(&end)
                            .arg("COUNT")
                            .arg(REPLAY_PAGE)
                            .query_async(&mut self.con.clone())
                            .await?;
                        let page = parse_entries(shard, reply)?;
                        self.append_replays(shard, &page, &mut report).await?;
                        match page.last() {
                            Some(last) if page.len() == REPLAY_PAGE => {
                                start = format!("({}", last.id)
                            }
                            _ => break,
                        }
                    }
                }
            }
        }
        if report.replayed > 0 {
            tracing::info!(destination = %self.destination, ?report, "Replaying dead letters.");
        }
        Ok(report)
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

    async fn replaying_marks(&self, entries: &[RawEntry]) -> Result<Vec<bool>, DeadLetterError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
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
        Ok(protocol::query_each(&self.con, checks).await?)
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
