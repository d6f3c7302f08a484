//! Webhook receivers that misbehave on purpose, for demos and tests. Every
//! request is recorded; `GET /received?path=/ok` reports what a path got,
//! with per-user order violations and duplicates.
//!
//! | path | answers |
//! |---|---|
//! | `/ok` | 200 |
//! | `/fail` | 500 |
//! | `/flaky/{n}` | 503 to the first `n` attempts of each event, then 200 |
//! | `/random/{percent}` | 500 with that probability, else 200 |
//! | `/slow/{ms}` | 200 after `ms` milliseconds |
//! | `/hang` | nothing for an hour (past any sane timeout) |
//! | `/rate-limit/{per_second}` | 429 + `Retry-After: 1` above that rate, else 200 |
//! | `/bad-request` | 400 |
//! | `/scripted` | 503 while the payload's `failUntil` (unix ms) is in the future, or while fewer than its `failAttempts` attempts of the event arrived before, else 200 |
//! | `/outage` | 503 while an outage is declared for the path, else 200 |
//! | `/throttle/{seconds}` | 429 + `Retry-After: {seconds}` while an outage is declared for the path, else 200 |
//! | `/stall` | no answer while an outage is declared for the path, then 200 |
//! | `/huge/{bytes}` | 500 with a body of that many bytes |
//! | `/markup` | 500 with a body of HTML that runs script if a page fails to escape it ([`MARKUP`]) |
//! | `/capture` | 200, and keeps the whole request (`GET /captured`) |
//!
//! With signing secrets configured (`--signing-secret`), every request must
//! also carry a valid Standard Webhooks signature by one of them, made
//! within the last 5 minutes; otherwise it is answered 401, whatever the path.
//!
//! `GET /healthz` answers 200 (the container health check).
//!
//! `PUT /outages?path=/outage/crm` declares an outage of that path (or of a
//! `/stall/…` or `/throttle/…` path) and
//! `DELETE /outages?path=/outage/crm` ends it, so a demo or test can take a
//! destination down and bring it back while the router keeps running.
//!
//! Any path may end in one more segment as a label, e.g. `/ok/crm` and
//! `/ok/billing`, to tell apart destinations that behave alike; each path
//! is recorded on its own.
#![forbid(unsafe_code)]

pub mod recorder;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde::Deserialize;
use serde_json::{json, Value};
use telemetry::lifecycle::{serve_until, OnShutdown};
use tokio_util::sync::CancellationToken;

pub use recorder::{Captured, PathSummary, Received, Recorder};

/// Serves the mock paths on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    recorder: Arc<Recorder>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let recorder = web::Data::from(recorder);
    tracing::info!(address = %listener.local_addr()?, "Mock destinations listening.");
    let server = HttpServer::new(move || {
        App::new()
            .app_data(recorder.clone())
            .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
            .route("/healthz", web::get().to(HttpResponse::Ok))
            .route("/received", web::get().to(received))
            .route("/received", web::delete().to(clear))
            .route("/captured", web::get().to(captured))
            .route("/outages", web::put().to(declare_outage))
            .route("/outages", web::delete().to(end_outage))
            .default_service(web::post().to(webhook))
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)?
    .run();
    serve_until(server, shutdown, OnShutdown::Drop).await
}

async fn webhook(
    request: HttpRequest,
    body: web::Bytes,
    recorder: web::Data<Recorder>,
) -> HttpResponse {
    let path = request.path().to_owned();
    let now = protocol::unix_millis();
    let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let id = header("webhook-id")
        .or_else(|| event["id"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let prior_attempts = recorder.attempts(&path, &id);
    let attempt = header("webhook-attempt")
        .and_then(|a| a.parse().ok())
        .unwrap_or(u32::try_from(prior_attempts + 1).unwrap_or(u32::MAX));
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let number = |index: usize| segments.get(index).and_then(|s| s.parse::<u64>().ok());

    let signature_problem = recorder.signature_problem(
        header("webhook-id").as_deref(),
        header("webhook-timestamp").as_deref(),
        header("webhook-signature").as_deref(),
        &body,
        now / 1000,
    );
    let mut retry_after = None;
    let mut error_body = None;
    let status = match segments.as_slice() {
        _ if signature_problem.is_some() => StatusCode::UNAUTHORIZED,
        ["ok", ..] => StatusCode::OK,
        ["capture", ..] => {
            recorder.capture(Captured {
                path: path.clone(),
                headers: request
                    .headers()
                    .iter()
                    .filter(|(name, _)| name.as_str().starts_with("webhook-"))
                    .filter_map(|(name, value)| {
                        Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
                    })
                    .collect(),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            StatusCode::OK
        }
        ["fail", ..] => StatusCode::INTERNAL_SERVER_ERROR,
        ["bad-request", ..] => StatusCode::BAD_REQUEST,
        ["flaky", _, ..] => match number(1) {
            Some(n) if (prior_attempts as u64) < n => StatusCode::SERVICE_UNAVAILABLE,
            Some(_) => StatusCode::OK,
            None => StatusCode::NOT_FOUND,
        },
        ["random", _, ..] => match number(1) {
            Some(percent) if fastrand::u64(0..100) < percent => StatusCode::INTERNAL_SERVER_ERROR,
            Some(_) => StatusCode::OK,
            None => StatusCode::NOT_FOUND,
        },
        ["slow", _, ..] => match number(1) {
            Some(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                StatusCode::OK
            }
            None => StatusCode::NOT_FOUND,
        },
        ["hang", ..] => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK
        }
        ["rate-limit", _, ..] => match number(1) {
            Some(limit) if recorder.requests_in_last_second(&path, now) as u64 >= limit => {
                retry_after = Some(1);
                StatusCode::TOO_MANY_REQUESTS
            }
            Some(_) => StatusCode::OK,
            None => StatusCode::NOT_FOUND,
        },
        ["scripted", ..] => {
            let script = &event["payload"];
            let failing_until = script["failUntil"]
                .as_u64()
                .is_some_and(|until| now < until);
            let failing_attempts = script["failAttempts"]
                .as_u64()
                .is_some_and(|n| (prior_attempts as u64) < n);
            if failing_until || failing_attempts {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            }
        }
        ["stall", ..] => {
            while recorder.in_outage(&path) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            StatusCode::OK
        }
        ["outage", ..] if recorder.in_outage(&path) => StatusCode::SERVICE_UNAVAILABLE,
        ["outage", ..] => StatusCode::OK,
        ["throttle", _, ..] => match number(1) {
            Some(seconds) if recorder.in_outage(&path) => {
                retry_after = Some(seconds);
                StatusCode::TOO_MANY_REQUESTS
            }
            Some(_) => StatusCode::OK,
            None => StatusCode::NOT_FOUND,
        },
        ["markup", ..] => {
            error_body = Some(MARKUP.as_bytes().to_vec());
            StatusCode::INTERNAL_SERVER_ERROR
        }
        ["huge", _, ..] => match number(1).and_then(|n| usize::try_from(n).ok()) {
            Some(bytes) => {
                error_body = Some(vec![b'x'; bytes]);
                StatusCode::INTERNAL_SERVER_ERROR
            }
            None => StatusCode::NOT_FOUND,
        },
        _ => StatusCode::NOT_FOUND,
    };
    let user = event["userId"].as_str().unwrap_or_default().to_owned();
    let latency_ms = event["receivedAt"]
        .as_str()
        .and_then(|at| humantime::parse_rfc3339(at).ok())
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map(|at| now.saturating_sub(u64::try_from(at.as_millis()).unwrap_or(u64::MAX)));
    tracing::info!(path = %path, event_id = %id, user = %user, attempt, status = status.as_u16(), signature_problem, "Webhook received.");
    recorder.record(
        &path,
        Received {
            id,
            user,
            attempt,
            status: status.as_u16(),
            at_ms: protocol::unix_millis(),
            latency_ms,
            traceparent: header("traceparent"),
        },
    );
    let mut response = HttpResponse::build(status);
    if let Some(seconds) = retry_after {
        response.insert_header(("retry-after", seconds.to_string()));
    }
    match (error_body, signature_problem) {
        (Some(body), _) => response.body(body),
        (None, Some(problem)) => response.json(json!({ "error": problem })),
        (None, None) => response.json(json!({ "status": status.as_u16() })),
    }
}

/// `/markup`'s error body: script that sets `window.__xss` wherever a page
/// shows it unescaped.
pub const MARKUP: &str = r#"<script>window.__xss=1</script>"><img src=x onerror="window.__xss=2">"#;

async fn captured(recorder: web::Data<Recorder>) -> HttpResponse {
    HttpResponse::Ok().json(recorder.captured())
}

#[derive(Deserialize)]
struct ReceivedQuery {
    path: Option<String>,
}

async fn received(query: web::Query<ReceivedQuery>, recorder: web::Data<Recorder>) -> HttpResponse {
    match &query.path {
        Some(path) => HttpResponse::Ok().json(recorder.summary(path)),
        None => {
            // Every path, without the per-request lists.
            let summaries: Vec<PathSummary> = recorder
                .paths()
                .iter()
                .map(|path| PathSummary {
                    events: Vec::new(),
                    ..recorder.summary(path)
                })
                .collect();
            HttpResponse::Ok().json(summaries)
        }
    }
}

#[derive(Deserialize)]
struct OutageQuery {
    path: String,
}

async fn declare_outage(
    query: web::Query<OutageQuery>,
    recorder: web::Data<Recorder>,
) -> HttpResponse {
    recorder.set_outage(&query.path, true);
    HttpResponse::NoContent().finish()
}

async fn end_outage(query: web::Query<OutageQuery>, recorder: web::Data<Recorder>) -> HttpResponse {
    recorder.set_outage(&query.path, false);
    HttpResponse::NoContent().finish()
}

async fn clear(recorder: web::Data<Recorder>) -> HttpResponse {
    recorder.clear();
    HttpResponse::NoContent().finish()
}
