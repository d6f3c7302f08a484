//! One accepted event as stored in a shard stream, and its public id.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

/// Field names of a stream entry. Short, because they are stored per event.
pub mod field {
    pub const USER: &str = "user";
    /// The payload exactly as the client sent it (raw JSON text).
    pub const PAYLOAD: &str = "payload";
    /// Unix milliseconds at which the gateway accepted the event.
    pub const RECEIVED_AT: &str = "received_at";
    pub const MESSAGE_ID: &str = "message_id";
    /// JSON array of destination names; absent means every destination.
    pub const DESTINATIONS: &str = "destinations";
    /// The event's type (`order.created`), which destinations subscribe to.
    pub const EVENT_TYPE: &str = "event_type";
    /// The name of the API key the event was sent with (absent when the
    /// gateway runs without authentication).
    pub const SOURCE: &str = "source";
    /// A replayed dead letter: its id in the shard's dead-letter stream of
    /// the one destination it is replayed to.
    pub const REPLAY_OF: &str = "replay_of";
    /// A replayed dead letter: the event id it was first delivered under.
    pub const REPLAY_EVENT_ID: &str = "replay_event_id";
    /// A replayed dead letter: Unix milliseconds of the replay.
    pub const REPLAYED_AT: &str = "replayed_at";
    /// W3C `traceparent` of the span that accepted the event (or of the
    /// client's, passed through), which the router's spans continue.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C `tracestate` that goes with it, when there is one.
    pub const TRACESTATE: &str = "tracestate";
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("stream entry has no `{0}` field")]
    MissingField(&'static str),
    #[error("stream entry field `{field}` is malformed: {reason}")]
    Malformed { field: &'static str, reason: String },
}

/// An accepted event as the gateway writes it and the router reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventEntry {
    pub user_id: String,
    /// Raw JSON text, forwarded byte for byte.
    pub payload: String,
    pub received_at_ms: u64,
    pub message_id: Option<String>,
    /// Deliver only to these destinations; `None` means all.
    pub destinations: Option<Vec<String>>,
    /// The event's type, matched against destinations' `event_types`.
    pub event_type: Option<String>,
    /// The name of the API key that sent it.
    pub source: Option<String>,
    /// Set when this entry replays a dead letter (written by the router's
    /// admin API, never by the gateway).
    pub replay: Option<Replay>,
    /// The trace the event belongs to, when it was traced.
    pub trace: Option<TraceContext>,
}

/// W3C trace context stored with an event: the spans the router makes for
/// it join this trace (docs/decisions/0005-trace-context.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The `traceparent` header value.
    pub parent: String,
    /// The `tracestate` header value, when not empty.
    pub state: Option<String>,
}

/// Where a replayed event came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The dead letter's id in its dead-letter stream; removed once the
    /// replay reaches a terminal outcome.
    pub dead_letter_id: String,
    /// The id the event was first delivered under. A replay keeps it, so a
    /// destination that deduplicates by `webhook-id` can.
    pub event_id: String,
    /// When the replay was requested (Unix ms); an event's age for
    /// `max_age_ms` counts from here.
    pub replayed_at_ms: u64,
}

impl EventEntry {
    /// Field/value pairs for XADD, in a fixed order. Borrows the text
    /// fields: the payload may be large and is copied only into the command.
    pub fn to_fields(&self) -> Vec<(&'static str, Cow<'_, str>)> {
        let mut fields = vec![
            (field::USER, Cow::Borrowed(self.user_id.as_str())),
            (field::PAYLOAD, Cow::Borrowed(self.payload.as_str())),
            (
                field::RECEIVED_AT,
                Cow::Owned(self.received_at_ms.to_string()),
            ),
        ];
        if let Some(message_id) = &self.message_id {
            fields.push((field::MESSAGE_ID, Cow::Borrowed(message_id.as_str())));
        }
        if let Some(destinations) = &self.destinations {
            let list = serde_json::to_string(destinations).expect("a list of strings serializes");
            fields.push((field::DESTINATIONS, Cow::Owned(list)));
        }
        if let Some(event_type) = &self.event_type {
            fields.push((field::EVENT_TYPE, Cow::Borrowed(event_type.as_str())));
        }
        if let Some(source) = &self.source {
            fields.push((field::SOURCE, Cow::Borrowed(source.as_str())));
        }
        if let Some(replay) = &self.replay {
            fields.push((
                field::REPLAY_OF,
                Cow::Borrowed(replay.dead_letter_id.as_str()),
            ));
            fields.push((
                field::REPLAY_EVENT_ID,
                Cow::Borrowed(replay.event_id.as_str()),
            ));
            fields.push((
                field::REPLAYED_AT,
                Cow::Owned(replay.replayed_at_ms.to_string()),
            ));
        }
        if let Some(trace) = &self.trace {
            fields.push((field::TRACEPARENT, Cow::Borrowed(trace.parent.as_str())));
            if let Some(state) = &trace.state {
                fields.push((field::TRACESTATE, Cow::Borrowed(state.as_str())));
            }
        }
        fields
    }

    /// Rebuilds an entry from the field/value pairs of a stream entry.
    /// Unknown fields are ignored so newer gateways can add fields. Owned
    /// values (`String`) are moved into the entry, so a large payload is
    /// not copied while it is read; borrowed ones (`&str`) are copied.
    pub fn from_fields<N, V>(pairs: impl IntoIterator<Item = (N, V)>) -> Result<Self, EntryError>
    where
        N: AsRef<str>,
        V: AsRef<str> + Into<String>,
    {
        let (mut user, mut payload, mut received_at, mut message_id, mut destinations) =
            (None, None, None, None, None);
        let (mut source, mut event_type) = (None, None);
        let (mut replay_of, mut replay_event_id, mut replayed_at) = (None, None, None);
        let (mut traceparent, mut tracestate) = (None, None);
        for (name, value) in pairs {
            match name.as_ref() {
                field::USER => user = Some(value),
                field::PAYLOAD => payload = Some(value),
                field::RECEIVED_AT => received_at = Some(value),
                field::MESSAGE_ID => message_id = Some(value),
                field::DESTINATIONS => destinations = Some(value),
                field::SOURCE => source = Some(value),
                field::EVENT_TYPE => event_type = Some(value),
                field::REPLAY_OF => replay_of = Some(value),
                field::REPLAY_EVENT_ID => replay_event_id = Some(value),
                field::REPLAYED_AT => replayed_at = Some(value),
                field::TRACEPARENT => traceparent = Some(value),
                field::TRACESTATE => tracestate = Some(value),
                _ => {}
            }
        }
        let received_at = received_at.ok_or(EntryError::MissingField(field::RECEIVED_AT))?;
        let replay = match (replay_of, replay_event_id, replayed_at) {
            (None, None, None) => None,
            (Some(of), Some(event_id), Some(at)) => Some(Replay {
                dead_letter_id: of.into(),
                event_id: event_id.into(),
                replayed_at_ms: parse_ms(field::REPLAYED_AT, at.as_ref())?,
            }),
            _ => {
                return Err(EntryError::Malformed {
                    field: field::REPLAY_OF,
                    reason: "replay fields must come together".into(),
                })
            }
        };
        Ok(Self {
            user_id: user.ok_or(EntryError::MissingField(field::USER))?.into(),
            payload: payload
                .ok_or(EntryError::MissingField(field::PAYLOAD))?
                .into(),
            received_at_ms: parse_ms(field::RECEIVED_AT, received_at.as_ref())?,
            message_id: message_id.map(Into::into),
            destinations: destinations
                .map(|list| {
                    serde_json::from_str(list.as_ref()).map_err(|e| EntryError::Malformed {
                        field: field::DESTINATIONS,
                        reason: e.to_string(),
                    })
                })
                .transpose()?,
            event_type: event_type.map(Into::into),
            source: source.map(Into::into),
            replay,
            trace: traceparent.map(|parent| TraceContext {
                parent: parent.into(),
                state: tracestate.map(Into::into),
            }),
        })
    }

    /// Whether this event is meant for `destination`.
    pub fn is_for(&self, destination: &str) -> bool {
        self.destinations
            .as_ref()
            .is_none_or(|names| names.iter().any(|name| name == destination))
    }
}

/// Milliseconds since the Unix epoch: the clock of `received_at` and of
/// every other timestamp the services record.
pub fn unix_millis() -> u64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

fn parse_ms(name: &'static str, value: &str) -> Result<u64, EntryError> {
    value
        .parse()
        .map_err(|e: std::num::ParseIntError| EntryError::Malformed {
            field: name,
            reason: e.to_string(),
        })
}

/// A Redis stream entry id, `<ms>-<seq>`; ordered as Redis orders them.
/// The default, `0-0`, is below every entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl FromStr for StreamId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s
            .split_once('-')
            .ok_or_else(|| format!("`{s}` is not a stream id"))?;
        Ok(Self {
            ms: ms
                .parse()
                .map_err(|_| format!("`{s}` is not a stream id"))?,
            seq: seq
                .parse()
                .map_err(|_| format!("`{s}` is not a stream id"))?,
        })
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl redis::ToRedisArgs for StreamId {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        out.write_arg_fmt(self);
    }
}

/// The public id of an event: `<shard>-<ms>-<seq>`, its shard and its id in
/// that shard's stream. Unique across shards; within one user (one shard)
/// ids order events as the gateway accepted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub shard: u16,
    pub stream_id: StreamId,
}

impl FromStr for EventId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (shard, stream_id) = s
            .split_once('-')
            .ok_or_else(|| format!("`{s}` is not an event id"))?;
        Ok(Self {
            shard: shard
                .parse()
                .map_err(|_| format!("`{s}` is not an event id"))?,
            stream_id: stream_id.parse()?,
        })
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.shard, self.stream_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EventEntry {
        EventEntry {
            user_id: "u1".into(),
            payload: r#"{"a": [1, 2.50]}"#.into(),
            received_at_ms: 1_700_000_000_123,
            message_id: Some("m-1".into()),
            destinations: Some(vec!["crm".into(), "warehouse".into()]),
            event_type: Some("order.created".into()),
            source: Some("web-app".into()),
            replay: Some(Replay {
                dead_letter_id: "9-1".into(),
                event_id: "3-5-0".into(),
                replayed_at_ms: 1_700_000_000_999,
            }),
            trace: Some(TraceContext {
                parent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                state: Some("vendor=1".into()),
            }),
        }
    }

    #[test]
    fn entry_round_trips_through_fields() {
        let entry = sample();
        let fields = entry.to_fields();
        let parsed = EventEntry::from_fields(fields.iter().map(|(k, v)| (*k, v.as_ref())));
        assert_eq!(parsed, Ok(entry));
    }

    #[test]
    fn payload_text_is_kept_byte_for_byte() {
        let entry = sample();
        let fields = entry.to_fields();
        assert!(fields.contains(&("payload", Cow::Borrowed(r#"{"a": [1, 2.50]}"#))));
    }

    #[test]
    fn missing_user_is_reported() {
        let parsed = EventEntry::from_fields([("payload", "1"), ("received_at", "5")]);
        assert_eq!(parsed, Err(EntryError::MissingField("user")));
    }

    #[test]
    fn destination_filter_selects_destinations() {
        let mut entry = sample();
        assert!(entry.is_for("crm"));
        assert!(!entry.is_for("billing"));
        entry.destinations = None;
        assert!(entry.is_for("billing"));
    }

    #[test]
    fn event_ids_round_trip_and_order_like_the_stream() {
        let id: EventId = "7-1700000000000-3".parse().expect("valid id");
        assert_eq!(id.shard, 7);
        assert_eq!(id.to_string(), "7-1700000000000-3");
        let later: EventId = "7-1700000000000-12".parse().expect("valid id");
        assert!(id < later, "sequence numbers compare numerically");
        assert!("7-abc".parse::<EventId>().is_err());
    }
}
