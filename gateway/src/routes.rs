//! HTTP handlers.

use std::time::Instant;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use metrics::{Counter, Histogram};
use serde_json::json;
use tracing::Instrument;

use crate::api::{Accepted, BatchAccepted};
use crate::auth::{ApiKey, Authenticator};
use crate::error::ApiError;
use crate::event::{self, NewEvent};
use crate::lanes::WorkerLanes;
use crate::store::{Appended, EventStore};
use crate::trace::{self, IngestTrace};

pub struct AppState {
    pub store: std::sync::Arc<EventStore>,
    pub auth: Authenticator,
    pub max_body_bytes: usize,
    pub max_batch_events: usize,
    pub max_json_depth: usize,
    pub retry_after_secs: u64,
    pub metrics: IngestMetrics,
}

impl AppState {
    /// The API key the request carries (`None` when authentication is off
    /// and none was sent).
    fn authenticate(&self, request: &HttpRequest) -> Result<Option<&ApiKey>, ApiError> {
        self.auth.authenticate(
            request
                .headers()
                .get(header::AUTHORIZATION)
                .map(|value| value.as_bytes()),
        )
    }

    fn unavailable(&self, cause: crate::store::StoreError) -> ApiError {
        ApiError::Unavailable {
            cause,
            retry_after_secs: self.retry_after_secs,
        }
    }

    /// Stores the request's trace context with each of its events, and
    /// names them on its span.
    fn traced(&self, trace: &IngestTrace, events: &mut [NewEvent]) {
        trace.events(
            events.len(),
            events
                .iter()
                .map(|e| protocol::shard_for(&e.entry.user_id, self.store.shards())),
        );
        if let Some(context) = &trace.context {
            for event in events {
                event.entry.trace = Some(context.clone());
            }
        }
    }

    /// Rejects events naming destinations the router does not serve.
    async fn check_destinations(&self, events: &[NewEvent]) -> Result<(), ApiError> {
        let mut wanted: Vec<String> = events
            .iter()
            .filter_map(|event| event.entry.destinations.as_ref())
            .flatten()
            .cloned()
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        wanted.sort_unstable();
        wanted.dedup();
        let unknown = self
            .store
            .unknown_destinations(&wanted)
            .await
            .map_err(|e| self.unavailable(e))?;
        match unknown.as_slice() {
            [] => Ok(()),
            names => Err(ApiError::Invalid(format!(
                "unknown destination {}",
                names
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

/// Each path is a resource, so another method gets 405 (not 404).
pub fn configure(config: &mut web::ServiceConfig) {
    config
        .service(web::resource("/v1/events").route(web::post().to(post_event)))
        .service(web::resource("/v1/batch").route(web::post().to(post_batch)))
        .service(web::resource("/healthz").route(web::get().to(healthz)))
        .service(web::resource("/readyz").route(web::get().to(readyz)))
        .service(
            web::resource("/metrics").route(web::get().to(telemetry::lifecycle::metrics_endpoint)),
        );
}

/// Charges `events` to the key's rate limit and records its name on them.
fn attribute(key: Option<&ApiKey>, events: &mut [NewEvent]) -> Result<(), ApiError> {
    if let Some(key) = key {
        key.admit(events.len())?;
        for event in events {
            event.entry.source = Some(key.name.clone());
        }
    }
    Ok(())
}

/// Metric handles registered once, so an accepted request does no label
/// lookups (refusals, rarer and with many reasons, look theirs up).
pub struct IngestMetrics {
    events: RouteMetrics,
    batch: RouteMetrics,
    accepted_events: Counter,
    duplicate_events: Counter,
    batch_size: Histogram,
}

struct RouteMetrics {
    route: &'static str,
    duration: Histogram,
    accepted: Counter,
}

impl RouteMetrics {
    fn new(route: &'static str) -> Self {
        Self {
            route,
            duration: metrics::histogram!("gateway_request_duration_seconds", "route" => route),
            accepted: metrics::counter!("gateway_requests_total", "route" => route, "outcome" => "accepted"),
        }
    }
}

impl IngestMetrics {
    /// Call after the metrics recorder is installed.
    pub fn register() -> Self {
        Self {
            events: RouteMetrics::new("/v1/events"),
            batch: RouteMetrics::new("/v1/batch"),
            accepted_events: metrics::counter!("gateway_events_total", "outcome" => "accepted"),
            duplicate_events: metrics::counter!("gateway_events_total", "outcome" => "duplicate"),
            batch_size: metrics::histogram!("gateway_batch_size"),
        }
    }

    /// Runs one ingest, records its outcome and latency under `route`, and
    /// answers with its response.
    async fn observed(
        &self,
        route: &RouteMetrics,
        trace: &IngestTrace,
        ingest: impl std::future::Future<Output = Result<Ingested, ApiError>>,
    ) -> Result<HttpResponse, ApiError> {
        let started = Instant::now();
        let result = ingest.instrument(trace.current()).await;
        route.duration.record(started.elapsed().as_secs_f64());
        match &result {
            Ok(ingested) => trace.finish(ingested.response.status().as_u16(), "accepted"),
            Err(error) => trace.finish(error.status_code().as_u16(), error.reason()),
        }
        match &result {
            Ok(ingested) => {
                route.accepted.increment(1);
                self.accepted_events.increment(ingested.new);
                self.duplicate_events.increment(ingested.duplicates);
            }
            Err(error) => {
                let outcome = match error {
                    ApiError::Unavailable { .. } => "unavailable",
                    _ => "rejected",
                };
                metrics::counter!(
                    "gateway_requests_total",
                    "route" => route.route,
                    "outcome" => outcome,
                    "reason" => error.reason()
                )
                .increment(1);
            }
        }
        result.map(|ingested| ingested.response)
    }
}

/// What an accepted request stored.
struct Ingested {
    response: HttpResponse,
    new: u64,
    duplicates: u64,
}

impl Ingested {
    fn new(response: HttpResponse, appended: &[Appended]) -> Self {
        let duplicates = appended
            .iter()
            .filter(|a| matches!(a, Appended::Duplicate(_)))
            .count() as u64;
        Self {
            response,
            new: appended.len() as u64 - duplicates,
            duplicates,
        }
    }
}

/// Checks the content type, then reads the body up to the size limit and
/// checks its nesting depth.
async fn read_json_body(
    state: &AppState,
    request: &HttpRequest,
    payload: web::Payload,
) -> Result<web::Bytes, ApiError> {
    let limit = state.max_body_bytes;
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence != "application/json" && !essence.ends_with("+json") {
        return Err(ApiError::UnsupportedMediaType);
    }
    match payload.to_bytes_limited(limit).await {
        Err(_) => Err(ApiError::TooLarge { limit }),
        Ok(Err(error)) => Err(ApiError::Invalid(format!(
            "could not read request body: {error}"
        ))),
        Ok(Ok(body)) => {
            event::check_depth(&body, state.max_json_depth)?;
            Ok(body)
        }
    }
}

/// What both ingest routes do before writing: authenticate, read the body,
/// `parse` it, stamp the events with the key's name and the trace context,
/// and check the destinations they name. Nothing is written before this
/// has passed.
async fn accept<E>(
    state: &AppState,
    request: &HttpRequest,
    payload: web::Payload,
    trace: &IngestTrace,
    parse: impl FnOnce(&[u8]) -> Result<E, ApiError>,
) -> Result<E, ApiError>
where
    E: AsRef<[NewEvent]> + AsMut<[NewEvent]>,
{
    let key = state.authenticate(request)?;
    let body = read_json_body(state, request, payload).await?;
    let mut events = parse(&body)?;
    attribute(key, events.as_mut())?;
    state.traced(trace, events.as_mut());
    state.check_destinations(events.as_ref()).await?;
    Ok(events)
}

#[utoipa::path(
    post,
    path = "/v1/events",
    request_body(content = crate::api::EventDoc, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Overrides messageId as the key a repeat is recognised by (1-128 bytes)"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context: the event's spans join this trace (an invalid one is ignored)"),
        ("tracestate" = Option<String>, Header, description = "W3C trace state that goes with traceparent"),
    ),
    responses(
        (status = 202, description = "Stored; delivery follows", body = crate::api::Accepted),
        (status = 400, description = "Invalid event or limit exceeded (the message names it)", body = crate::error::ErrorBody),
        crate::api::IngestRefusal,
    ),
    security(("api_key" = []))
)]
pub(crate) async fn post_event(
    state: web::Data<AppState>,
    lanes: web::Data<WorkerLanes>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let metrics = &state.metrics;
    let trace = IngestTrace::start(&request, metrics.events.route);
    metrics
        .observed(
            &metrics.events,
            &trace,
            ingest_event(&state, &lanes, &request, payload, &trace),
        )
        .await
}

async fn ingest_event(
    state: &AppState,
    lanes: &WorkerLanes,
    request: &HttpRequest,
    payload: web::Payload,
    trace: &IngestTrace,
) -> Result<Ingested, ApiError> {
    let parse = |body: &[u8]| {
        let idempotency_key = match request.headers().get("idempotency-key") {
            None => None,
            Some(value) => Some(value.to_str().map_err(|_| {
                ApiError::Invalid("Idempotency-Key header must be visible ASCII".into())
            })?),
        };
        Ok([event::parse_event(body, idempotency_key)?])
    };
    let [event] = accept(state, request, payload, trace, parse).await?;
    let appended = trace::redis_write(trace, state.store.append(&event, lanes))
        .await
        .map_err(|e| state.unavailable(e))?;
    let response = HttpResponse::Accepted().json(Accepted {
        id: appended.id().to_string(),
        duplicate: matches!(appended, Appended::Duplicate(_)).then_some(true),
    });
    Ok(Ingested::new(response, std::slice::from_ref(&appended)))
}

#[utoipa::path(
    post,
    path = "/v1/batch",
    request_body(content = crate::api::BatchDoc, content_type = "application/json"),
    params(
        ("traceparent" = Option<String>, Header, description = "W3C trace context, applied to every event of the batch (an invalid one is ignored)"),
        ("tracestate" = Option<String>, Header, description = "W3C trace state that goes with traceparent"),
    ),
    responses(
        (status = 202, description = "All stored, in order; delivery follows", body = crate::api::BatchAccepted),
        (status = 400, description = "An invalid event (named by index) or limit exceeded; nothing stored", body = crate::error::ErrorBody),
        crate::api::IngestRefusal,
    ),
    security(("api_key" = []))
)]
pub(crate) async fn post_batch(
    state: web::Data<AppState>,
    lanes: web::Data<WorkerLanes>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let metrics = &state.metrics;
    let trace = IngestTrace::start(&request, metrics.batch.route);
    metrics
        .observed(
            &metrics.batch,
            &trace,
            ingest_batch(&state, &lanes, &request, payload, &trace),
        )
        .await
}

async fn ingest_batch(
    state: &AppState,
    lanes: &WorkerLanes,
    request: &HttpRequest,
    payload: web::Payload,
    trace: &IngestTrace,
) -> Result<Ingested, ApiError> {
    let parse = |body: &[u8]| Ok(event::parse_batch(body, state.max_batch_events)?);
    let events = accept(state, request, payload, trace, parse).await?;
    state.metrics.batch_size.record(events.len() as f64);
    let appended = trace::redis_write(trace, state.store.append_all(&events, lanes))
        .await
        .map_err(|e| state.unavailable(e))?;
    let response = HttpResponse::Accepted().json(BatchAccepted {
        ids: appended.iter().map(|a| a.id().to_string()).collect(),
    });
    Ok(Ingested::new(response, &appended))
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process is up", body = crate::api::Status)))]
pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "alive" }))
}

#[utoipa::path(
    get,
    path = "/readyz",
    responses(
        (status = 200, description = "Redis answers: events can be accepted", body = crate::api::Status),
        (status = 503, description = "Redis does not answer", body = crate::api::Status),
    )
)]
pub(crate) async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.store.ping().await {
        Ok(()) => HttpResponse::Ok().json(json!({ "status": "ready" })),
        Err(error) => HttpResponse::ServiceUnavailable()
            .insert_header((header::RETRY_AFTER, state.retry_after_secs.to_string()))
            .json(json!({ "status": "unavailable", "error": error.to_string() })),
    }
}
