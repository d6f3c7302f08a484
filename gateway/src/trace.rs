//! Traces of ingest: a request's span, its Redis write's span, and the
//! trace context stored with its events (docs/decisions/0005-trace-context.md).
//!
//! With export off nothing here makes a span; a client's valid
//! `traceparent` is still stored, so the router (if it exports) and the
//! destination continue the client's trace.

use std::future::Future;

use actix_web::HttpRequest;
use protocol::TraceContext;
use telemetry::traces;
use tracing::{Instrument, Span};

/// One request's trace: its span (disabled when not exported) and the
/// context its events carry.
pub struct IngestTrace {
    span: Span,
    pub context: Option<TraceContext>,
    /// Whether the span will be exported: a span the sampler left out
    /// gets no child and no attributes, which cost as much as it does.
    sampled: bool,
}

impl IngestTrace {
    /// The span of an ingest request on `route`, a child of the client's
    /// trace context when the request carries a valid one.
    pub fn start(request: &HttpRequest, route: &'static str) -> Self {
        let client = client_context(request);
        let exported = traces::active()
            .is_some_and(|active| active.exports_under(client.as_ref().map(|c| c.parent.as_str())));
        if !exported {
            return Self {
                span: Span::none(),
                context: client,
                sampled: false,
            };
        }
        let span = tracing::info_span!(
            target: traces::TARGET,
            "ingest",
            otel.name = %format_args!("POST {route}"),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = "POST",
            http.route = route,
            http.response.status_code = tracing::field::Empty,
            events = tracing::field::Empty,
            shard = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        if let Some(client) = &client {
            traces::set_parent(&span, &client.parent, client.state.as_deref());
        }
        let context = traces::context_of(&span)
            .map(|(parent, state)| TraceContext { parent, state })
            .or(client);
        let sampled = context
            .as_ref()
            .is_some_and(|context| traces::sampled(&context.parent));
        Self {
            span,
            context,
            sampled,
        }
    }

    /// The span to run the request in: none when it is not exported.
    pub fn current(&self) -> Span {
        if self.sampled {
            self.span.clone()
        } else {
            Span::none()
        }
    }

    /// Records what the request stored, or why it stored nothing.
    pub fn finish(&self, status: u16, outcome: &str) {
        if !self.sampled {
            return;
        }
        self.span.record("http.response.status_code", status);
        self.span.record("outcome", outcome);
        if status >= 500 {
            self.span.record("otel.status_code", "ERROR");
        }
    }

    /// Records the events a request carries and the shards they go to.
    pub fn events(&self, count: usize, shards: impl Iterator<Item = u16>) {
        if !self.sampled {
            return;
        }
        let mut shards: Vec<u16> = shards.collect();
        shards.sort_unstable();
        shards.dedup();
        let shards: Vec<String> = shards.iter().map(u16::to_string).collect();
        self.span.record("events", count);
        self.span.record("shard", shards.join(",").as_str());
    }
}

/// Runs the Redis write of a traced request under a span of its own.
pub async fn redis_write<F: Future>(trace: &IngestTrace, write: F) -> F::Output {
    if !trace.sampled {
        return write.await;
    }
    let span = tracing::info_span!(
        target: traces::TARGET,
        parent: &trace.span,
        "redis write",
        otel.name = "XADD",
        otel.kind = "client",
        db.system.name = "redis",
        db.operation.name = "XADD",
    );
    write.instrument(span).await
}

/// The client's `traceparent` and `tracestate`, when the former is valid.
fn client_context(request: &HttpRequest) -> Option<TraceContext> {
    let headers = request.headers();
    let parent = headers.get("traceparent")?.to_str().ok()?.trim();
    if !traces::is_valid_traceparent(parent) {
        return None;
    }
    let state = headers
        .get("tracestate")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|state| !state.is_empty() && state.len() <= 512);
    Some(TraceContext {
        parent: parent.to_owned(),
        state: state.map(str::to_owned),
    })
}
