//! The delivery log: what happened to each event at each destination.
//!
//! Every attempt, and every event a destination filters out, is recorded
//! in the (shard, destination) log stream
//! `evd:{s:N}:log:<destination>`: its event id, user, attempt number,
//! status, latency, outcome and (for a failure) the error. A terminal
//! attempt is written in the same round trip as its acknowledgement, a
//! failed one on its own; a log write that fails costs the log a line,
//! never a delivery. Each stream is capped at
//! `delivery_log.max_entries_per_destination / shards` entries
//! (approximately, `MAXLEN ~`) and trimmed to `delivery_log.retention_hours`
//! by the trimmer.
//!
//! This is the writing half; [`crate::admin::event_log`] reads it back.

use protocol::EventEntry;
use serde::Serialize;

use crate::destination::outcome::Fate;

/// Most characters of an error kept in a record.
const ERROR_CHARS: usize = 300;

/// How an attempt ended, as the log records it: its [`Fate`], or filtered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Logged {
    Delivered,
    /// Failed; it will be tried again.
    Retry,
    /// Failed for good (or its limits ran out): dead-lettered.
    DeadLettered,
    /// Not for this destination; acknowledged without an attempt.
    Filtered,
}

impl From<Fate> for Logged {
    fn from(fate: Fate) -> Self {
        match fate {
            Fate::Delivered => Logged::Delivered,
            Fate::Retry => Logged::Retry,
            Fate::Dead => Logged::DeadLettered,
        }
    }
}

impl Logged {
    fn as_str(self) -> &'static str {
        match self {
            Logged::Delivered => "delivered",
            Logged::Retry => "retry",
            Logged::DeadLettered => "dead_lettered",
            Logged::Filtered => "filtered",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "delivered" => Some(Logged::Delivered),
            "retry" => Some(Logged::Retry),
            "dead_lettered" => Some(Logged::DeadLettered),
            "filtered" => Some(Logged::Filtered),
            _ => None,
        }
    }
}

/// One attempt to record.
pub struct Record<'a> {
    pub event_id: &'a str,
    pub user: &'a str,
    /// The event's type: the per-event view tells from it why a filtered
    /// destination did not get the event once the event itself is trimmed.
    pub event_type: Option<&'a str>,
    /// The trace the event belongs to, so the per-event view names it
    /// after the event is trimmed.
    pub trace_id: Option<&'a str>,
    pub attempt: u32,
    pub status: Option<u16>,
    pub latency_ms: u64,
    pub outcome: Logged,
    pub error: Option<&'a str>,
}

impl<'a> Record<'a> {
    /// A record of attempt `attempt` of `event`, without status, latency
    /// or error.
    pub fn of(event_id: &'a str, event: &'a EventEntry, attempt: u32, outcome: Logged) -> Self {
        Self {
            event_id,
            user: &event.user_id,
            event_type: event.event_type.as_deref(),
            trace_id: crate::destination::trace::trace_id(event),
            attempt,
            status: None,
            latency_ms: 0,
            outcome,
            error: None,
        }
    }
}

/// Where one (shard, destination)'s records go; `None` when the log is off.
#[derive(Debug, Clone)]
pub struct LogStream {
    key: String,
    cap: usize,
}

impl LogStream {
    pub fn new(key: String, cap: usize) -> Self {
        Self { key, cap }
    }

    /// Adds the XADD of `record` to `pipe`.
    pub fn append(&self, pipe: &mut redis::Pipeline, record: &Record<'_>) {
        pipe.add_command(self.xadd(record)).ignore();
    }

    /// The XADD of `record`.
    pub fn xadd(&self, record: &Record<'_>) -> redis::Cmd {
        // Sized once (a command grown argument by argument reallocated four
        // times per delivery): 22 arguments at most; the names, numbers and
        // outcome fit in 128 bytes.
        let bytes = self.key.len()
            + record.event_id.len()
            + record.user.len()
            + record.event_type.map_or(0, str::len)
            + record.trace_id.map_or(0, str::len)
            + record
                .error
                .map_or(0, |error| error.len().min(4 * ERROR_CHARS))
            + 128;
        let mut xadd = redis::Cmd::with_capacity(24, bytes);
        xadd.arg("XADD")
            .arg(&self.key)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.cap)
            .arg("*")
            .arg("event")
            .arg(record.event_id)
            .arg("user")
            .arg(record.user)
            // Written even when empty: an event without a type.
            .arg("type")
            .arg(record.event_type.unwrap_or(""))
            .arg("attempt")
            .arg(record.attempt)
            .arg("latency_ms")
            .arg(record.latency_ms)
            .arg("outcome")
            .arg(record.outcome.as_str());
        if let Some(status) = record.status {
            xadd.arg("status").arg(status);
        }
        if let Some(trace_id) = record.trace_id {
            xadd.arg("trace").arg(trace_id);
        }
        if let Some(error) = record.error {
            let error: String = error.chars().take(ERROR_CHARS).collect();
            xadd.arg("error").arg(error);
        }
        xadd
    }
}
