//! The ingestion gateway: validates POSTed events and appends each to the
//! Redis stream of its user's shard, answering 202 only once Redis has
//! acknowledged the write. It never calls destinations.
//!
//! # Layout
//! Modules import only modules listed above them (a test checks it):
//! - [`config`]: settings and their defaults.
//! - [`event`]: request bodies → validated events.
//! - [`lanes`]: which connection a shard's write takes.
//! - [`store`]: the shard streams (XADD, idempotency script).
//! - [`error`]: every failure and what it answers.
//! - [`auth`]: API keys and their rate limits.
//! - [`api`]: the shapes of bodies and answers.
//! - [`trace`]: an ingest's spans and the trace context its events carry.
//! - [`routes`]: HTTP handlers.
//! - [`openapi`]: the OpenAPI document (`/openapi.json`).
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod event;
pub mod lanes;
pub mod openapi;
pub mod routes;
pub mod store;
pub mod trace;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use anyhow::Context;
use telemetry::lifecycle::{serve_until, OnShutdown, Ticks};
use tokio_util::sync::CancellationToken;

pub use config::Config;
use protocol::MetaError;
use protocol::{run_with_retries, Backoff};
use routes::AppState;
use store::EventStore;

/// How long in-flight requests may take to finish after shutdown begins.
const SHUTDOWN_GRACE_SECS: u64 = 10;

/// Serves the API on `listener` until `shutdown` is cancelled, then stops
/// accepting, lets in-flight requests finish and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Installed before the first request so no count is lost.
    telemetry::metrics();
    let Some(store) = connect(&config, &shutdown).await? else {
        return Ok(());
    };
    let store = Arc::new(store);
    tokio::spawn(watch_backlog(
        store.clone(),
        config.backlog.check_interval(),
        shutdown.clone(),
    ));
    if !config.auth.required {
        tracing::warn!(
            "AUTHENTICATION IS OFF (auth.required = false): anyone who can reach this \
             gateway can post events. Use this for local demos only."
        );
    }
    let state = web::Data::new(AppState {
        store: store.clone(),
        auth: auth::Authenticator::new(&config.auth),
        max_body_bytes: config.max_body_bytes,
        max_batch_events: config.max_batch_events,
        max_json_depth: config.max_json_depth,
        retry_after_secs: config.retry_after_secs,
        metrics: routes::IngestMetrics::register(),
    });
    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    tracing::info!(address = %listener.local_addr()?, workers, "Gateway listening.");
    let server = HttpServer::new(move || {
        // Runs on each worker's thread: the worker's own write connections.
        App::new()
            .app_data(state.clone())
            .app_data(web::Data::new(store.worker_lanes()))
            .configure(routes::configure)
            .service(web::resource("/openapi.json").route(web::get().to(openapi::document)))
    })
    .workers(workers)
    .disable_signals()
    .shutdown_timeout(SHUTDOWN_GRACE_SECS)
    .listen(listener)
    .context("cannot serve on the listener")?
    .run();
    serve_until(server, shutdown, OnShutdown::Finish)
        .await
        .context("gateway server failed")
}

/// Connects to Redis, waiting for it while it is unreachable (it may still
/// be starting), but giving up at once on a configuration conflict.
async fn connect(
    config: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<EventStore>> {
    let what = format!("Redis unreachable at {}", config.redis.redacted_url());
    let connect = || {
        EventStore::connect(
            &config.redis,
            config.idempotency_ttl(),
            (&config.backlog).into(),
            (&config.replication).into(),
        )
    };
    run_with_retries(
        &what,
        Backoff::STARTUP,
        shutdown,
        MetaError::is_transient,
        connect,
    )
    .await
    .context("refusing to start")
}

/// Keeps the backlog measurement fresh until shutdown. While Redis is
/// unreachable the last measurement stands (writes fail with 503 anyway).
async fn watch_backlog(store: Arc<EventStore>, every: Duration, shutdown: CancellationToken) {
    let mut ticks = Ticks::new(every);
    while ticks.next(&shutdown).await {
        if let Err(error) = store.refresh_backlog().await {
            tracing::debug!(%error, "Cannot measure the backlog.");
        }
    }
}

#[cfg(test)]
mod tests {
    use protocol::layout::{problems_of_crate, Layering};

    /// Its Layout list names every module, in layers, and no function is
    /// longer than `protocol::layout::LONGEST_FUNCTION` lines.
    #[test]
    fn the_crate_keeps_its_layout() {
        assert_eq!(
            problems_of_crate(env!("CARGO_MANIFEST_DIR"), Layering::Checked),
            Vec::<String>::new()
        );
    }
}
