//! Reading the delivery log ([`crate::worker::delivery_log`] writes it):
//! an event's attempts at each destination, or a user's recent events.
//! Reading an event's log scans its destinations' log streams from the
//! event's time on; the state comes from the last record, or, when the
//! event has none yet, from the consumer group (pending, or not read yet)
//! and the event itself (filtered out).

use std::collections::BTreeMap;

use protocol::{EventEntry, EventId, Keys, RedisConnection, StreamId};
use redis::Value;
use serde::Serialize;

use crate::destination::delivery::Endpoint;
use crate::worker::delivery_log::Logged;

/// Log entries read per round trip while scanning.
const SCAN_PAGE: usize = 500;

/// One attempt as the admin API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Attempt {
    /// Unix ms when it was recorded (its end).
    pub at_ms: u64,
    pub attempt: u32,
    pub status: Option<u16>,
    pub latency_ms: u64,
    pub outcome: Logged,
    pub error: Option<String>,
}

/// One attempt of some event, for a destination's latest attempts.
#[derive(Debug, Clone)]
pub struct RecentAttempt {
    pub event_id: String,
    pub user_id: String,
    pub attempt: Attempt,
}

/// The value of `name` among a stream entry's fields.
fn field_of<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A log record's attempt (`field` reads the record); `None` if it is not one.
fn attempt_of<'a>(log_id: &str, field: impl Fn(&str) -> Option<&'a str>) -> Option<Attempt> {
    let number = |name: &str| field(name).and_then(|v| v.parse::<u64>().ok());
    Some(Attempt {
        at_ms: log_id
            .split('-')
            .next()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0),
        attempt: number("attempt")
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        status: number("status").and_then(|n| u16::try_from(n).ok()),
        latency_ms: number("latency_ms").unwrap_or(0),
        outcome: field("outcome").and_then(Logged::parse)?,
        error: field("error").map(str::to_owned),
    })
}

/// Where an event stands at one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventState {
    /// In the stream, not yet read for this destination.
    Queued,
    /// Read and waiting its turn (behind its user's earlier events, or
    /// parked), or being attempted.
    Pending,
    /// Its last attempt failed; it will be tried again.
    InBackoff,
    Delivered,
    DeadLettered,
    /// Not for this destination (another event type, or addressed elsewhere).
    Filtered,
    /// Accepted before the destination was created.
    BeforeCreation,
    /// Nothing known any more: the event and its log are past retention.
    Unknown,
}

/// One event at one destination.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DestinationLog {
    pub destination: String,
    pub state: EventState,
    pub attempts: Vec<Attempt>,
}

/// What the log knows of one event.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EventLog {
    pub event_id: String,
    /// From the event while it is still in its stream, else from the log.
    pub user_id: Option<String>,
    pub event_type: Option<String>,
    pub received_at_ms: Option<u64>,
    /// The OpenTelemetry trace the event belongs to, when it was traced:
    /// look it up in Jaeger, Tempo or any trace store.
    pub trace_id: Option<String>,
    pub destinations: Vec<DestinationLog>,
}

/// What the log holds of one event at one destination.
#[derive(Default)]
struct Recorded {
    attempts: Vec<Attempt>,
    user: Option<String>,
    /// The event's type as recorded (`Some(None)`: it had none); `None`
    /// when no record says (records written before types were recorded).
    event_type: Option<Option<String>>,
    trace_id: Option<String>,
}

/// A destination as the reader needs it.
pub struct Subject<'a> {
    pub name: &'a str,
    /// Its settings now: which events it wants (filter, event types).
    pub endpoint: &'a Endpoint,
    /// Per shard, the stream id after which its events begin.
    pub cuts: &'a [String],
    /// Whether its group reads references ([`crate::worker::routing`]).
    pub routed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("`{0}` is not an event id (expected <shard>-<ms>-<seq>)")]
    BadId(String),
    #[error("shard {shard} does not exist (there are {shards})")]
    NoSuchShard { shard: u16, shards: u16 },
    #[error("no event `{0}` is known: not in its stream, and no delivery log of it")]
    Unknown(String),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Reads the log of events and users.
pub struct LogReader {
    pub con: RedisConnection,
    pub keys: Keys,
    pub shards: u16,
    /// How many entries of one log stream a lookup reads at most.
    pub scan_limit: usize,
}

impl LogReader {
    /// What happened to `event_id` at each of `subjects`.
    pub async fn event(
        &self,
        event_id: &str,
        subjects: &[Subject<'_>],
    ) -> Result<EventLog, LogError> {
        let id = self.parse_id(event_id)?;
        let mut con = self.con.clone();
        let entry = self.entry(&mut con, id).await?;
        let mut log = EventLog {
            event_id: event_id.to_owned(),
            user_id: entry.as_ref().map(|e| e.user_id.clone()),
            event_type: entry.as_ref().and_then(|e| e.event_type.clone()),
            received_at_ms: entry.as_ref().map(|e| e.received_at_ms),
            trace_id: entry
                .as_ref()
                .and_then(crate::destination::trace::trace_id)
                .map(str::to_owned),
            destinations: Vec::with_capacity(subjects.len()),
        };
        let mut known = entry.is_some();
        // The event's type: from the event while it is in its stream, else
        // from any destination's records (`None`: not known).
        let mut event_type = entry.as_ref().map(|entry| entry.event_type.clone());
        let mut logs = Vec::with_capacity(subjects.len());
        for subject in subjects {
            let found = self.attempts(&mut con, id, subject.name).await?;
            if log.user_id.is_none() {
                log.user_id.clone_from(&found.user);
            }
            if event_type.is_none() {
                event_type.clone_from(&found.event_type);
            }
            if log.trace_id.is_none() {
                log.trace_id.clone_from(&found.trace_id);
            }
            known |= !found.attempts.is_empty();
            logs.push(found.attempts);
        }
        for (subject, mut attempts) in subjects.iter().zip(logs) {
            let state = match attempts.last().map(|a| a.outcome) {
                Some(Logged::Delivered) => EventState::Delivered,
                Some(Logged::DeadLettered) => EventState::DeadLettered,
                Some(Logged::Retry) => EventState::InBackoff,
                Some(Logged::Filtered) => EventState::Filtered,
                None => {
                    let event_type = event_type.as_ref().map(Option::as_deref);
                    self.unattempted(&mut con, id, subject, entry.as_ref(), event_type)
                        .await?
                }
            };
            // A filtered event's record says so; it was never attempted.
            attempts.retain(|attempt| attempt.outcome != Logged::Filtered);
            log.destinations.push(DestinationLog {
                destination: subject.name.to_owned(),
                state,
                attempts,
            });
        }
        if log.event_type.is_none() {
            log.event_type = event_type.flatten();
        }
        if !known {
            return Err(LogError::Unknown(event_id.to_owned()));
        }
        Ok(log)
    }

    /// The ids of `user`'s most recent events (at most `limit`), newest
    /// first: those still in the shard stream and those in the log.
    pub async fn user_events(
        &self,
        user: &str,
        destinations: &[&str],
        limit: usize,
    ) -> Result<Vec<String>, LogError> {
        let shard = protocol::shard_for(user, self.shards);
        let mut con = self.con.clone();
        let mut ids: BTreeMap<StreamId, String> = BTreeMap::new();
        let mut sources = vec![self.keys.events(shard)];
        sources.extend(
            destinations
                .iter()
                .map(|d| self.keys.delivery_log(shard, d)),
        );
        for (index, key) in sources.iter().enumerate() {
            let mut end = "+".to_owned();
            let mut read = 0;
            while read < self.scan_limit {
                let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
                    .arg(key)
                    .arg(&end)
                    .arg("-")
                    .arg("COUNT")
                    .arg(SCAN_PAGE)
                    .query_async(&mut con)
                    .await?;
                let Some((last, _)) = page.last() else { break };
                end = format!("({last}");
                read += page.len();
                for (stream_id, fields) in &page {
                    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
                    let (owner, event) = if index == 0 {
                        (
                            field(protocol::entry::field::USER),
                            Some(format!("{shard}-{stream_id}")),
                        )
                    } else {
                        (field("user"), field("event").cloned())
                    };
                    if owner.is_some_and(|owner| owner == user) {
                        if let Some(Ok(id)) = event.as_deref().map(str::parse::<EventId>) {
                            ids.insert(id.stream_id, id.to_string());
                        }
                    }
                }
                if page.len() < SCAN_PAGE {
                    break;
                }
            }
        }
        Ok(ids.into_values().rev().take(limit).collect())
    }

    /// The payload of `event_id` while it is still in its stream.
    pub async fn payload(&self, event_id: &str) -> Result<Option<String>, LogError> {
        let id = self.parse_id(event_id)?;
        let mut con = self.con.clone();
        Ok(self.entry(&mut con, id).await?.map(|entry| entry.payload))
    }

    /// The latest `limit` attempts at `destination` over every shard,
    /// newest first. Shards are asked at once; one whose Redis does not
    /// answer leaves only its own attempts out (an error only when none
    /// answers).
    pub async fn recent(
        &self,
        destination: &str,
        limit: usize,
    ) -> Result<Vec<RecentAttempt>, LogError> {
        let asked = (0..self.shards).map(|shard| {
            let mut con = self.con.clone();
            let key = self.keys.delivery_log(shard, destination);
            async move {
                redis::cmd("XREVRANGE")
                    .arg(key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(limit)
                    .query_async::<Vec<(String, Vec<(String, String)>)>>(&mut con)
                    .await
            }
        });
        let mut recent = Vec::new();
        let mut first_error = None;
        for answer in futures_util::future::join_all(asked).await {
            let page = match answer {
                Ok(page) => page,
                Err(error) => {
                    first_error.get_or_insert(error);
                    continue;
                }
            };
            for (log_id, fields) in &page {
                let field = |name: &str| field_of(fields, name);
                let Some(attempt) = attempt_of(log_id, field) else {
                    continue;
                };
                if attempt.outcome == Logged::Filtered {
                    continue;
                }
                recent.push(RecentAttempt {
                    event_id: field("event").unwrap_or_default().to_owned(),
                    user_id: field("user").unwrap_or_default().to_owned(),
                    attempt,
                });
            }
        }
        match first_error {
            Some(error) if recent.is_empty() => return Err(error.into()),
            Some(error) => tracing::debug!(%error, "Some shards' attempts could not be read."),
            None => {}
        }
        recent.sort_by_key(|recent| std::cmp::Reverse(recent.attempt.at_ms));
        recent.truncate(limit);
        Ok(recent)
    }

    /// `event_id` as an id of one of this deployment's shards.
    fn parse_id(&self, event_id: &str) -> Result<EventId, LogError> {
        let id: EventId = event_id
            .parse()
            .map_err(|_| LogError::BadId(event_id.to_owned()))?;
        if id.shard >= self.shards {
            return Err(LogError::NoSuchShard {
                shard: id.shard,
                shards: self.shards,
            });
        }
        Ok(id)
    }

    async fn entry(
        &self,
        con: &mut RedisConnection,
        id: EventId,
    ) -> Result<Option<EventEntry>, LogError> {
        let found: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(self.keys.events(id.shard))
            .arg(id.stream_id)
            .arg(id.stream_id)
            .query_async(con)
            .await?;
        Ok(found.first().and_then(|(_, fields)| {
            EventEntry::from_fields(fields.iter().map(|(k, v)| (k.as_str(), v.as_str()))).ok()
        }))
    }

    /// The recorded attempts of `id` at `destination`, oldest first, with
    /// the user and event type they name.
    async fn attempts(
        &self,
        con: &mut RedisConnection,
        id: EventId,
        destination: &str,
    ) -> Result<Recorded, LogError> {
        let key = self.keys.delivery_log(id.shard, destination);
        let wanted = id.to_string();
        // Records are written after the event was accepted: start there.
        let mut start = format!("{}-0", id.stream_id.ms);
        let mut recorded = Recorded::default();
        let mut read = 0;
        while read < self.scan_limit {
            let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(&key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(SCAN_PAGE)
                .query_async(con)
                .await?;
            read += page.len();
            for (log_id, fields) in &page {
                let field = |name: &str| field_of(fields, name);
                if field("event") != Some(wanted.as_str()) {
                    continue;
                }
                let Some(attempt) = attempt_of(log_id, field) else {
                    continue;
                };
                recorded.user = field("user").map(str::to_owned);
                if let Some(trace_id) = field("trace") {
                    recorded.trace_id = Some(trace_id.to_owned());
                }
                if let Some(event_type) = field("type") {
                    recorded.event_type =
                        Some((!event_type.is_empty()).then(|| event_type.to_owned()));
                }
                let outcome = attempt.outcome;
                recorded.attempts.push(attempt);
                if outcome != Logged::Retry {
                    return Ok(recorded);
                }
            }
            match page.last() {
                Some((last, _)) if page.len() == SCAN_PAGE => start = format!("({last}"),
                _ => break,
            }
        }
        Ok(recorded)
    }

    /// The state of an event with no recorded attempt at `subject`;
    /// `event_type` is the event's when known (from its records, once the
    /// event itself is gone).
    async fn unattempted(
        &self,
        con: &mut RedisConnection,
        id: EventId,
        subject: &Subject<'_>,
        entry: Option<&EventEntry>,
        event_type: Option<Option<&str>>,
    ) -> Result<EventState, LogError> {
        let cut = subject
            .cuts
            .get(usize::from(id.shard))
            .and_then(|cut| cut.parse::<StreamId>().ok());
        if cut.is_some_and(|cut| id.stream_id <= cut) {
            return Ok(EventState::BeforeCreation);
        }
        let Some(entry) = entry else {
            // Gone from its stream: a routed destination records nothing for
            // what it does not take, so its type says why it did not get it.
            return Ok(match event_type {
                Some(event_type)
                    if subject.routed && !subject.endpoint.subscribes_to(event_type) =>
                {
                    EventState::Filtered
                }
                _ => EventState::Unknown,
            });
        };
        // A routed destination's rule is checked by the routing stage,
        // which records nothing for the events it does not route.
        if !subject.endpoint.wants(entry) {
            return Ok(EventState::Filtered);
        }
        let stream = if subject.routed {
            self.keys.refs(id.shard, subject.name)
        } else {
            self.keys.events(id.shard)
        };
        let pending: Value = redis::cmd("XPENDING")
            .arg(&stream)
            .arg(subject.name)
            .arg(id.stream_id)
            .arg(id.stream_id)
            .arg(1)
            .query_async(con)
            .await?;
        if matches!(&pending, Value::Array(items) if !items.is_empty()) {
            return Ok(EventState::Pending);
        }
        // Neither pending nor logged: not read yet, or acknowledged while
        // the log was off (or its record was trimmed).
        let groups: Vec<BTreeMap<String, Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .query_async(con)
            .await?;
        let last_delivered = groups.iter().find_map(|group| {
            let name = redis::from_redis_value::<String>(group.get("name")?.clone()).ok()?;
            let id =
                redis::from_redis_value::<String>(group.get("last-delivered-id")?.clone()).ok()?;
            (name == subject.name)
                .then(|| id.parse::<StreamId>().ok())
                .flatten()
        });
        Ok(match last_delivered {
            Some(last) if id.stream_id <= last => EventState::Unknown,
            _ => EventState::Queued,
        })
    }
}
