//! The Redis Streams side of delivery: one destination's consumer group on
//! one shard stream.
//!
//! # Redis Streams in brief
//! Each destination is a consumer group on every shard stream. XREADGROUP
//! with `>` hands out entries the group has not seen and records each in the
//! group's pending entries list (PEL) under our consumer name; reading with an
//! id instead of `>` re-reads our own PEL from after that id. An entry leaves
//! the PEL only when acknowledged (XACK), which we do only after a terminal
//! outcome, so anything unfinished at a crash is still pending at restart
//! and is read again from the PEL, in id order, before new entries.

use std::time::Duration;

use protocol::RedisConnection;
use protocol::{EventEntry, Keys, Replay, StreamId};
use redis::Value;

use crate::control::catalog::{Catalog, CatalogError};
use crate::worker::acks::{AckError, AckWriter};
use crate::worker::delivery_log::{LogStream, Record};

/// Where the next read starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFrom {
    /// Our own pending entries with ids above this one (`0-0` = all).
    Pending(StreamId),
    /// Entries never handed to this group (`>`).
    New,
}

/// One stream entry as read.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: StreamId,
    /// Bytes of its field names and values as read: what holding it costs.
    pub bytes: usize,
    pub content: EntryContent,
}

/// Nearly every entry is an event: boxing it would add an allocation per
/// event to save a few hundred bytes on the rare others.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum EntryContent {
    Event(EventEntry),
    /// Still pending but deleted from the stream (e.g. by XDEL): nothing to deliver.
    Deleted,
    /// Not an entry this protocol can read.
    Malformed(String),
}

/// The terminal record of an event a destination gave up on.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    pub event_id: &'a str,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A reply (of XREADGROUP, XRANGE or XINFO CONSUMERS) not shaped as
    /// the command's documentation says.
    #[error("unexpected reply: {0}")]
    Reply(String),
    #[error(transparent)]
    Ack(#[from] AckError),
}

impl ConsumerError {
    /// The group is gone, e.g. Redis restarted empty or it was deleted.
    pub fn is_missing_group(&self) -> bool {
        matches!(self, ConsumerError::Redis(e) if e.code() == Some("NOGROUP"))
    }
}

/// KEYS: the shard stream. ARGV: the group. The id of the first entry
/// after the group's last-delivered id, or false (none, or no such group).
const OLDEST_UNREAD: &str = r"
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  if info['name'] == ARGV[1] then
    local next = redis.call('XRANGE', KEYS[1], '(' .. info['last-delivered-id'], '+', 'COUNT', 1)[1]
    return next and next[1] or false
  end
end
return false
";

/// KEYS: the shard stream. ARGV: the group, our consumer name. Deletes
/// the group's other consumers that have nothing pending; returns their names.
const REMOVE_IDLE_CONSUMERS: &str = r"
local removed = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['name'] ~= ARGV[2] and info['pending'] == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(removed, info['name'])
  end
end
return removed
";

/// KEYS: a reference stream, its shard stream. ARGV: the group, our
/// consumer, the count, where to read from (`>` or an id). XREADGROUP of
/// the references, each answered with the shard stream's entry of the same
/// id (nil when it is gone), shaped as XREADGROUP's reply. Never blocks
/// (scripts cannot).
const READ_REFS: &str = r"
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], ARGV[4])
if not reply then return false end
local entries = {}
for _, ref in ipairs(reply[1][2]) do
  local found = redis.call('XRANGE', KEYS[2], ref[1], ref[1])[1]
  table.insert(entries, {ref[1], found and found[2] or false})
end
return {{KEYS[1], entries}}
";

/// One destination's consumer group on one shard: on the shard stream, or,
/// for a destination with `event_types` ([`crate::worker::routing`]), on its
/// reference stream, whose entries carry the ids of the shard stream's.
pub struct GroupConsumer {
    shard: u16,
    /// The stream the group is on: the shard stream or the reference stream.
    stream: String,
    /// The shard stream, where the events are (for a routed destination,
    /// not the stream its group reads).
    events: String,
    /// Whether the group reads references.
    routed: bool,
    dead_letters: String,
    /// Dead letters of this destination and shard being replayed.
    replaying: String,
    group: String,
    consumer: String,
    /// Group reads; never retried by the client (see [`Connections::reads`]).
    reads: RedisConnection,
    /// Dead-letter writes, claims and fetches.
    commands: RedisConnection,
    /// Acknowledgements, in batches (on the `commands` connection).
    acks: AckWriter,
    /// Where the group starts, should it have to be created again.
    catalog: Catalog,
    /// Where attempts are recorded; `None` with the delivery log off.
    log: Option<LogStream>,
}

/// The two connections a consumer uses.
pub struct Connections {
    /// For group reads: the reader's own, when it blocks in its reads, or
    /// one shared by the shard's readers, which never block (new entries
    /// are announced by [`crate::worker::wakeup`]). A client that sent a read again
    /// after losing its reply would skip the entries the lost reply moved
    /// into our pending list, so this connection never retries by itself:
    /// one to the shard's master on a cluster, a plain one on a single Redis.
    pub reads: RedisConnection,
    /// Shared, for acknowledgements and dead letters.
    pub commands: RedisConnection,
}

impl GroupConsumer {
    pub fn new(
        keys: &Keys,
        shard: u16,
        (destination, routed): (&str, bool),
        consumer: &str,
        Connections { reads, commands }: Connections,
        catalog: Catalog,
        log: Option<LogStream>,
    ) -> Self {
        let events = keys.events(shard);
        let stream = if routed {
            keys.refs(shard, destination)
        } else {
            events.clone()
        };
        Self {
            events,
            routed,
            acks: AckWriter::start(commands.clone(), stream.clone(), destination.to_owned()),
            catalog,
            log,
            shard,
            stream,
            dead_letters: keys.dead_letters(shard, destination),
            replaying: keys.replaying(shard, destination),
            group: destination.to_owned(),
            consumer: consumer.to_owned(),
            reads,
            commands,
        }
    }

    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// Creates the group again after it went missing, at the cut recorded
    /// at the destination's creation ([`Catalog::restore_group`]).
    pub async fn restore_group(&self) -> Result<String, CatalogError> {
        self.catalog.restore_group(&self.group, self.shard).await
    }

    /// Moves entries pending on other consumers of the group (e.g. a router
    /// that ran under another name) to us, so they are delivered in id order
    /// with our own. Returns how many are pending on us now (ours counted).
    pub async fn claim_pending_of_others(&self) -> Result<usize, ConsumerError> {
        let mut cursor = "0-0".to_owned();
        let mut claimed = 0;
        loop {
            let (next, ids, _deleted): (String, Vec<String>, Value) = redis::cmd("XAUTOCLAIM")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(0)
                .arg(&cursor)
                .arg("COUNT")
                .arg(1000)
                .arg("JUSTID")
                .query_async(&mut self.commands.clone())
                .await?;
            claimed += ids.len();
            if next == "0-0" {
                return Ok(claimed);
            }
            cursor = next;
        }
    }

    /// Removes the group's other consumers that hold nothing pending: names
    /// of earlier owners, which would otherwise accumulate with every
    /// restart. Only the lease holder calls this, after claiming their
    /// entries. The check and the removal are one script: a router paused
    /// between deciding and deleting once deleted, on resuming, the consumer
    /// of the router that had taken the pair over meanwhile, and with it
    /// every entry pending on it (the chaos test, seed 1). Now a consumer
    /// with anything pending is never deleted, whoever asks and however late.
    pub async fn remove_idle_consumers(&self) -> Result<Vec<String>, ConsumerError> {
        Ok(redis::cmd("EVAL")
            .arg(REMOVE_IDLE_CONSUMERS)
            .arg(1)
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .query_async(&mut self.commands.clone())
            .await?)
    }

    /// Reads up to `count` entries. With `block`, a read of new entries
    /// waits that long for some (only on a connection of its own); without,
    /// it returns none when nothing is new ([`crate::worker::wakeup`] says when to
    /// look again). A reader of references never blocks: its read is a
    /// script, which cannot.
    pub async fn read(
        &self,
        from: &ReadFrom,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Entry>, ConsumerError> {
        if self.routed {
            let from = match from {
                ReadFrom::New => ">".to_owned(),
                ReadFrom::Pending(after) => after.to_string(),
            };
            let reply: Value = redis::cmd("EVAL")
                .arg(READ_REFS)
                .arg(2)
                .arg(&self.stream)
                .arg(&self.events)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(count)
                .arg(from)
                .query_async(&mut self.reads.clone())
                .await?;
            return parse_read_reply(reply);
        }
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        match (from, block) {
            (ReadFrom::New, Some(block)) => {
                command
                    .arg("BLOCK")
                    .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX))
                    .arg("STREAMS")
                    .arg(&self.stream)
                    .arg(">");
            }
            (ReadFrom::New, None) => {
                command.arg("STREAMS").arg(&self.stream).arg(">");
            }
            (ReadFrom::Pending(after), _) => {
                command.arg("STREAMS").arg(&self.stream).arg(after);
            }
        }
        let reply: Value = command.query_async(&mut self.reads.clone()).await?;
        parse_read_reply(reply)
    }

    /// Reads one entry again by id (a parked entry whose turn came). An
    /// entry deleted from the stream meanwhile comes back as
    /// [`EntryContent::Deleted`], as XREADGROUP reports it.
    pub async fn fetch(&self, id: StreamId) -> Result<Entry, ConsumerError> {
        let reply: Vec<Value> = redis::cmd("XRANGE")
            .arg(&self.events)
            .arg(id)
            .arg(id)
            .query_async(&mut self.commands.clone())
            .await?;
        match reply.into_iter().next() {
            Some(item) => parse_entry(item),
            None => Ok(Entry {
                id,
                bytes: 0,
                content: EntryContent::Deleted,
            }),
        }
    }

    /// Up to `count` entries of the shard stream after `after`, up to and
    /// including `up_to` (not through the group: the routing stage's
    /// catch-up reads what it has read before).
    pub async fn range(
        &self,
        after: StreamId,
        up_to: StreamId,
        count: usize,
    ) -> Result<Vec<Entry>, ConsumerError> {
        let reply: Vec<Value> = redis::cmd("XRANGE")
            .arg(&self.events)
            .arg(format!("({after}"))
            .arg(up_to)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.commands.clone())
            .await?;
        reply.into_iter().map(parse_entry).collect()
    }

    /// The id of the oldest entry the group has not read yet, if any.
    pub async fn oldest_unread(&self) -> Result<Option<StreamId>, ConsumerError> {
        let id: Option<String> = redis::cmd("EVAL")
            .arg(OLDEST_UNREAD)
            .arg(1)
            .arg(&self.stream)
            .arg(&self.group)
            .query_async(&mut self.commands.clone())
            .await?;
        id.map(|id| {
            id.parse()
                .map_err(|reason: String| ConsumerError::Reply(format!("stream id {id}: {reason}")))
        })
        .transpose()
    }

    /// Acknowledges an entry this destination is done with without
    /// delivering it (not addressed to it, or deleted).
    pub async fn ack(&self, id: StreamId) -> Result<(), ConsumerError> {
        Ok(self.acks.ack(id, None).await?)
    }

    /// Acknowledges a delivered entry, recording the attempt in the same
    /// round trip. A delivered replay also removes its dead letter, in the
    /// same MULTI (one hash tag, so valid on a cluster).
    pub async fn delivered(&self, entry: &Entry, record: &Record<'_>) -> Result<(), ConsumerError> {
        let Some(replay) = replay_of(entry) else {
            // The log record needs no MULTI (it is not part of the outcome).
            let record = self.log.as_ref().map(|log| log.xadd(record));
            return Ok(self.acks.ack(entry.id, record).await?);
        };
        // Removing a replayed dead letter is part of the outcome: one MULTI.
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(entry.id);
        self.finish_replay(&mut pipe, replay);
        if let Some(log) = &self.log {
            log.append(&mut pipe, record);
        }
        let _: Value = pipe.query_async(&mut self.commands.clone()).await?;
        Ok(())
    }

    /// Acknowledges an entry not meant for this destination, recording that
    /// in the same round trip.
    pub async fn filtered(
        &self,
        id: StreamId,
        record: Option<&Record<'_>>,
    ) -> Result<(), ConsumerError> {
        let record = self
            .log
            .as_ref()
            .zip(record)
            .map(|(log, record)| log.xadd(record));
        Ok(self.acks.ack(id, record).await?)
    }

    /// Records a failed attempt that will be retried. The log is a record,
    /// not a guarantee: a failure to write it is logged and otherwise ignored.
    pub async fn record_retry(&self, record: &Record<'_>) {
        let Some(log) = &self.log else {
            return;
        };
        let mut pipe = redis::pipe();
        log.append(&mut pipe, record);
        if let Err(error) = pipe.query_async::<Value>(&mut self.commands.clone()).await {
            tracing::debug!(%error, "Cannot record an attempt in the delivery log.");
        }
    }

    /// Removes the dead letter a replay came from, and its replay mark.
    fn finish_replay(&self, pipe: &mut redis::Pipeline, replay: &Replay) {
        pipe.cmd("XDEL")
            .arg(&self.dead_letters)
            .arg(&replay.dead_letter_id)
            .cmd("SREM")
            .arg(&self.replaying)
            .arg(&replay.dead_letter_id);
    }

    /// Records the dead letter and acknowledges the entry in one MULTI: both
    /// keys share the shard's hash tag, so this is atomic on a cluster too.
    /// A replay that failed again replaces its earlier dead letter.
    pub async fn dead_letter(
        &self,
        entry: &Entry,
        letter: &DeadLetter<'_>,
        record: Option<&Record<'_>>,
    ) -> Result<(), ConsumerError> {
        let failed_at = protocol::unix_millis();
        let mut pipe = redis::pipe();
        let xadd = pipe.atomic().cmd("XADD").arg(&self.dead_letters).arg("*");
        xadd.arg("event_id")
            .arg(letter.event_id)
            .arg("stream_id")
            .arg(entry.id)
            .arg("destination")
            .arg(&self.group)
            .arg("attempts")
            .arg(letter.attempts)
            .arg("last_status")
            .arg(
                letter
                    .last_status
                    .map_or_else(String::new, |s| s.to_string()),
            )
            .arg("last_error")
            .arg(letter.last_error)
            .arg("failed_at")
            .arg(failed_at.to_string());
        if let EntryContent::Event(event) = &entry.content {
            for (field, value) in event.to_fields() {
                xadd.arg(field).arg(value);
            }
        }
        pipe.cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(entry.id);
        if let Some(replay) = replay_of(entry) {
            self.finish_replay(&mut pipe, replay);
        }
        if let (Some(log), Some(record)) = (&self.log, record) {
            log.append(&mut pipe, record);
        }
        let _: Value = pipe.query_async(&mut self.commands.clone()).await?;
        Ok(())
    }
}

fn replay_of(entry: &Entry) -> Option<&Replay> {
    match &entry.content {
        EntryContent::Event(event) => event.replay.as_ref(),
        EntryContent::Deleted | EntryContent::Malformed(_) => None,
    }
}

/// Reads `[[stream, [[id, [field, value, …] | nil], …]], …]` (or nil when a
/// blocking read timed out).
fn parse_read_reply(reply: Value) -> Result<Vec<Entry>, ConsumerError> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams,
        other => return Err(ConsumerError::Reply(format!("{other:?}"))),
    };
    let mut entries = Vec::new();
    for stream in streams {
        let Value::Array(mut parts) = stream else {
            return Err(ConsumerError::Reply("stream is not an array".into()));
        };
        let Some(Value::Array(items)) = parts.pop() else {
            return Err(ConsumerError::Reply("stream has no entries array".into()));
        };
        for item in items {
            entries.push(parse_entry(item)?);
        }
    }
    Ok(entries)
}

fn parse_entry(item: Value) -> Result<Entry, ConsumerError> {
    let Value::Array(mut parts) = item else {
        return Err(ConsumerError::Reply("entry is not an array".into()));
    };
    if parts.len() != 2 {
        return Err(ConsumerError::Reply("entry is not [id, fields]".into()));
    }
    let fields = parts.pop().unwrap_or(Value::Nil);
    let id = text(parts.pop().unwrap_or(Value::Nil))
        .and_then(|id| id.parse::<StreamId>().ok())
        .ok_or_else(|| ConsumerError::Reply("entry id is not a stream id".into()))?;
    let mut bytes = 0;
    let content = match fields {
        Value::Nil => EntryContent::Deleted,
        Value::Array(values) => {
            let texts: Option<Vec<String>> = values.into_iter().map(text).collect();
            match texts {
                None => EntryContent::Malformed("a field is not UTF-8 text".into()),
                Some(texts) => {
                    bytes = texts.iter().map(String::len).sum();
                    // Moved, not copied: the payload may be a megabyte.
                    let mut texts = texts.into_iter();
                    let pairs = std::iter::from_fn(|| Some((texts.next()?, texts.next()?)));
                    match EventEntry::from_fields(pairs) {
                        Ok(event) => EntryContent::Event(event),
                        Err(error) => EntryContent::Malformed(error.to_string()),
                    }
                }
            }
        }
        other => EntryContent::Malformed(format!("fields are {other:?}")),
    };
    Ok(Entry { id, bytes, content })
}

fn text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn parses_events_deleted_entries_and_timeouts() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("evd:{s:1}:events"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("5-0"),
                    Value::Array(vec![
                        bulk("user"),
                        bulk("u1"),
                        bulk("payload"),
                        bulk("{}"),
                        bulk("received_at"),
                        bulk("9"),
                    ]),
                ]),
                Value::Array(vec![bulk("6-0"), Value::Nil]),
                Value::Array(vec![
                    bulk("7-0"),
                    Value::Array(vec![bulk("user"), bulk("u1")]),
                ]),
            ]),
        ])]);
        let entries = parse_read_reply(reply).expect("parses");
        assert_eq!(entries.len(), 3);
        assert!(
            matches!(&entries[0].content, EntryContent::Event(e) if e.user_id == "u1" && e.received_at_ms == 9)
        );
        assert!(matches!(entries[1].content, EntryContent::Deleted));
        assert!(matches!(entries[2].content, EntryContent::Malformed(_)));
        assert!(parse_read_reply(Value::Nil).expect("parses").is_empty());
    }
}
