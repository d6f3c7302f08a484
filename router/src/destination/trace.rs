//! Traces of delivery: a span per attempt, per dead-lettering and per
//! replay, each in the trace of the event's ingest
//! (docs/decisions/0005-trace-context.md).
//!
//! With export off nothing here makes a span, and a delivery request still
//! carries the event's stored `traceparent`, so a destination that traces
//! continues the client's trace.

use std::time::Duration;

use protocol::{EventEntry, TraceContext};
use telemetry::traces;
use tracing::Span;

use crate::destination::outcome::Fate;

/// The span of one attempt (disabled when not exported) and the context
/// its request carries.
pub(crate) struct AttemptTrace {
    span: Span,
    /// The attempt span's context; `None` while no span is made, when the
    /// request carries the event's own.
    own: Option<TraceContext>,
}

/// The trace id of the event's stored context, for log lines and the
/// delivery log.
pub(crate) fn trace_id(event: &EventEntry) -> Option<&str> {
    event
        .trace
        .as_ref()
        .and_then(|trace| traces::trace_id(&trace.parent))
}

/// Whether spans under this event's trace are exported.
fn exported(event: &EventEntry) -> bool {
    traces::active()
        .is_some_and(|active| active.exports_under(event.trace.as_ref().map(|t| t.parent.as_str())))
}

/// Makes `span` a child of the event's trace and returns its context.
fn join(span: &Span, event: &EventEntry) -> Option<TraceContext> {
    if let Some(trace) = &event.trace {
        traces::set_parent(span, &trace.parent, trace.state.as_deref());
    }
    traces::context_of(span).map(|(parent, state)| TraceContext { parent, state })
}

/// What an attempt came to, for its span.
pub(crate) struct Outcome<'a> {
    pub fate: Fate,
    pub status: Option<u16>,
    pub latency: Duration,
    pub error: Option<&'a str>,
    /// The delay chosen before the next attempt.
    pub retry_delay: Option<Duration>,
}

impl AttemptTrace {
    /// Starts the span of attempt number `attempt` of `event_id` at
    /// `destination`; call just before the request goes out.
    pub fn start(
        event: &EventEntry,
        event_id: &str,
        destination: &str,
        shard: u16,
        attempt: u32,
    ) -> Self {
        if !exported(event) {
            return Self {
                span: Span::none(),
                own: None,
            };
        }
        let span = tracing::info_span!(
            target: traces::TARGET,
            "attempt",
            otel.name = %format_args!("POST {destination}"),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
            http.request.method = "POST",
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            messaging.system = "redis",
            messaging.operation.type = "process",
            messaging.destination.name = destination,
            messaging.message.id = event_id,
            destination = destination,
            shard = shard,
            attempt = attempt,
            outcome = tracing::field::Empty,
            latency_ms = tracing::field::Empty,
            retry_delay_ms = tracing::field::Empty,
        );
        let own = join(&span, event);
        Self { span, own }
    }

    /// The context the request carries: the attempt span's, or the event's.
    pub fn header<'a>(&'a self, event: &'a EventEntry) -> Option<&'a TraceContext> {
        self.own.as_ref().or(event.trace.as_ref())
    }

    /// Records the outcome and ends the span.
    pub fn finish(self, outcome: &Outcome<'_>) {
        let span = &self.span;
        if span.is_disabled() {
            return;
        }
        span.record("outcome", outcome.fate.as_str());
        span.record("latency_ms", outcome.latency.as_millis() as u64);
        if let Some(status) = outcome.status {
            span.record("http.response.status_code", status);
        }
        if let Some(delay) = outcome.retry_delay {
            span.record("retry_delay_ms", delay.as_millis() as u64);
        }
        if let Some(error) = outcome.error {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_message", error);
            let kind = outcome
                .status
                .map_or_else(|| "request".to_owned(), |status| status.to_string());
            span.record("error.type", kind.as_str());
        }
    }
}

/// A span for dead-lettering `event_id` at `destination`, ended when the
/// returned span drops.
pub(crate) fn dead_letter(
    event: &EventEntry,
    event_id: &str,
    destination: &str,
    attempts: u32,
    reason: &str,
) -> Span {
    if !exported(event) {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: traces::TARGET,
        "dead letter",
        otel.name = %format_args!("dead-letter {destination}"),
        otel.status_code = "ERROR",
        otel.status_message = reason,
        messaging.message.id = event_id,
        destination = destination,
        attempts = attempts,
    );
    join(&span, event);
    span
}

/// Starts the span of replaying a dead letter to `destination`, and makes
/// the replayed event carry its context, so the replay's attempts are its
/// children in the event's trace. The span ends when dropped.
pub(crate) fn replay(event: &mut EventEntry, event_id: &str, destination: &str) -> Span {
    if !exported(event) {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: traces::TARGET,
        "replay",
        otel.name = %format_args!("replay {destination}"),
        otel.kind = "producer",
        messaging.message.id = event_id,
        destination = destination,
    );
    if let Some(context) = join(&span, event) {
        event.trace = Some(context);
    }
    span
}
