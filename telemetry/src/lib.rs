//! Process set-up shared by the binaries: the log format, the process's
//! Prometheus recorder (one place owns it, so a gateway and a router started
//! in one process, as the tests do, share it) and the shutdown signal.
//!
//! # Layout
//! - [`lifecycle`]: the loops every service runs until shutdown (ticking, serving HTTP).
//! - [`health`]: the container health check ([`health::probe`]).
//! - [`log_limit`]: a log line that would repeat per request, once per interval.
//! - [`traces`]: OpenTelemetry trace export and W3C trace context.
#![forbid(unsafe_code)]

pub mod health;
pub mod lifecycle;
pub mod log_limit;
pub mod traces;

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; colour only on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global log subscriber: `RUST_LOG` filters (default `info`).
/// For a process that exports no traces.
pub fn init_logging(format: LogFormat) {
    install(format, None);
}

/// What [`init`] started; keep it until the process ends. Dropping it
/// exports the spans still queued (for at most a few seconds).
#[must_use = "dropping it stops trace export"]
pub struct Telemetry {
    _traces: Option<traces::Exporting>,
}

/// Installs the global log subscriber and, when `traces` names an
/// endpoint, trace export with `default_service` as `service.name`.
pub fn init(
    format: LogFormat,
    traces: &traces::TracesConfig,
    default_service: &str,
) -> Result<Telemetry, String> {
    let started = traces::start(traces, default_service)?;
    let (exporting, tracer) = match started {
        Some((exporting, tracer)) => (Some(exporting), Some(tracer)),
        None => (None, None),
    };
    install(format, tracer);
    if let Some(active) = traces::active() {
        tracing::info!(endpoint = %active.url, protocol = ?active.protocol, sampler = %active.sampler, "Exporting traces.");
    }
    Ok(Telemetry { _traces: exporting })
}

/// The log layer under `RUST_LOG`, and the OpenTelemetry layer, which sees
/// only spans of the target [`traces::TARGET`], beside it.
fn install(format: LogFormat, tracer: Option<opentelemetry_sdk::trace::Tracer>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // Exported spans are not log lines.
        .add_directive(
            format!("{}=off", traces::TARGET)
                .parse()
                .expect("a valid directive"),
        );
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            // Colour codes only for a terminal, not in log files.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            // A delivery's event id, user, destination and shard are fields
            // of its span (`"span": {...}`), not repeated on every line.
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    };
    let spans = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            // Attributes nobody reads in a delivery trace, each a cost per
            // span: source location, thread, target, busy and idle time;
            // and no OpenTelemetry context switch per poll (parents are
            // set explicitly).
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(traces::TARGET, tracing::Level::INFO),
            )
    });
    tracing_subscriber::registry().with(logs).with(spans).init();
}

/// A token cancelled on SIGTERM or Ctrl-C: the start of a graceful stop.
pub fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let cancel = shutdown.clone();
    tokio::spawn(async move {
        let mut terminate =
            signal(SignalKind::terminate()).expect("installing a SIGTERM handler succeeds on Unix");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        cancel.cancel();
    });
    shutdown
}

/// Latency buckets in seconds, from 1 ms (a local Redis write) to a minute
/// (a slow destination's timeout plus backoff).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// The router's accepted → delivered latency. It includes retries, so it
/// reaches hours. (A full-name match takes precedence over suffixes.)
pub const END_TO_END_METRIC: &str = "router_end_to_end_seconds";
const END_TO_END_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 21600.0, 86400.0,
];
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// The process's Prometheus recorder, installed on first use. Histograms
/// named `…_seconds` or `…_size` get buckets (real Prometheus histograms,
/// which aggregate across instances, unlike summaries).
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(END_TO_END_METRIC.into()), END_TO_END_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("seconds".into()), LATENCY_BUCKETS)
            })
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("size".into()), SIZE_BUCKETS))
            .expect("the bucket lists are non-empty")
            .install_recorder()
            .expect("no other metrics recorder is installed in this process");
        // Histogram samples are folded in by upkeep; rendering does it too,
        // but an unscraped process would otherwise keep them all in memory.
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            })
            .expect("spawning the metrics upkeep thread succeeds");
        handle
    })
}

#[cfg(test)]
mod layout_tests {
    use protocol::layout::{problems_of_crate, Layering};

    /// Its Layout list names every module, and no function is
    /// longer than `protocol::layout::LONGEST_FUNCTION` lines.
    #[test]
    fn the_crate_keeps_its_layout() {
        assert_eq!(
            problems_of_crate(env!("CARGO_MANIFEST_DIR"), Layering::Unchecked),
            Vec::<String>::new()
        );
    }
}
