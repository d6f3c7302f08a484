//! The bounded export queue: a span processor whose `on_end` never waits.
//!
//! Finished spans go into a bounded channel. One thread of its own, with a
//! small runtime of its own, sends them in batches. A full queue or a
//! failed or slow export drops spans, counts them in
//! `telemetry_spans_dropped_total{reason}` and logs a warning at most once
//! per [`WARN_INTERVAL`]: ingest and delivery never wait for the exporter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;

use super::config::Export;

/// At most one warning per reason per interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Why spans were dropped (the metric's `reason` label).
#[derive(Debug, Clone, Copy)]
enum Dropped {
    QueueFull,
    ExportFailed,
}

impl Dropped {
    fn label(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::ExportFailed => "export_failed",
        }
    }
}

enum Message {
    Span(Box<SpanData>),
    /// Export what is queued, then answer.
    Flush(mpsc::Sender<()>),
    /// Export what is queued, answer, and stop.
    Stop(mpsc::Sender<()>),
}

/// Counts dropped spans. The warning about them is logged by the export
/// thread, never from `on_end`, which runs inside the tracing layer.
#[derive(Debug, Default)]
struct Drops {
    /// Dropped for a full queue since the last warning.
    queue_full: AtomicU64,
}

impl Drops {
    fn count(reason: Dropped, spans: usize) {
        metrics::counter!("telemetry_spans_dropped_total", "reason" => reason.label())
            .increment(spans as u64);
    }
}

/// Logs a warning at most once per [`WARN_INTERVAL`].
struct Warning {
    last: Option<Instant>,
}

impl Warning {
    fn log(&mut self, reason: Dropped, spans: u64, detail: &dyn std::fmt::Display) {
        if self.last.is_some_and(|last| last.elapsed() < WARN_INTERVAL) {
            return;
        }
        self.last = Some(Instant::now());
        tracing::warn!(
            spans,
            reason = reason.label(),
            %detail,
            "Dropping trace spans (telemetry_spans_dropped_total counts them; this warning \
             repeats at most every {}s).",
            WARN_INTERVAL.as_secs()
        );
    }
}

/// The span processor; see the module documentation.
#[derive(Debug)]
pub(crate) struct BoundedExport {
    queue: SyncSender<Message>,
    drops: Arc<Drops>,
    timeout: Duration,
}

impl BoundedExport {
    /// Starts the export thread. `build` makes the exporter inside the
    /// thread's runtime (the gRPC one needs a runtime to exist).
    pub(crate) fn start<E, B>(
        settings: &Export,
        resource: Resource,
        build: B,
    ) -> Result<Self, String>
    where
        E: SpanExporter + 'static,
        B: FnOnce() -> Result<E, String> + Send + 'static,
    {
        let (queue, spans) = mpsc::sync_channel(settings.queue_size);
        let drops = Arc::new(Drops::default());
        let (built, ready) = mpsc::channel();
        let worker = Worker {
            spans,
            drops: drops.clone(),
            batch_size: settings.batch_size,
            flush_interval: settings.flush_interval,
            timeout: settings.timeout,
            warning: Warning { last: None },
        };
        std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = built.send(Err(format!("cannot start its runtime: {error}")));
                        return;
                    }
                };
                let exporter = match runtime.block_on(async { build() }) {
                    Ok(mut exporter) => {
                        exporter.set_resource(&resource);
                        exporter
                    }
                    Err(error) => {
                        let _ = built.send(Err(error));
                        return;
                    }
                };
                let _ = built.send(Ok(()));
                worker.run(&runtime, exporter);
            })
            .map_err(|error| format!("cannot start the export thread: {error}"))?;
        ready
            .recv()
            .map_err(|_| "the export thread stopped while starting".to_owned())??;
        Ok(Self {
            queue,
            drops,
            timeout: settings.timeout,
        })
    }

    /// Sends `message` and waits (at most `within`, in all) for the
    /// thread's answer. A full queue is waited on, never blocked on: the
    /// thread may be stuck in a slow export.
    fn ask(
        &self,
        message: impl FnOnce(mpsc::Sender<()>) -> Message,
        within: Duration,
    ) -> OTelSdkResult {
        let deadline = Instant::now() + within;
        let (answer, answered) = mpsc::channel();
        let mut message = message(answer);
        loop {
            match self.queue.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(again)) if Instant::now() < deadline => {
                    message = again;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(TrySendError::Full(_)) => return Err(OTelSdkError::Timeout(within)),
                Err(TrySendError::Disconnected(_)) => return Err(OTelSdkError::AlreadyShutdown),
            }
        }
        answered
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| OTelSdkError::Timeout(within))
    }
}

impl SpanProcessor for BoundedExport {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.queue.try_send(Message::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                Drops::count(Dropped::QueueFull, 1);
                self.drops.queue_full.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => Drops::count(Dropped::ExportFailed, 1),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Message::Flush, self.timeout * 2)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.ask(Message::Stop, timeout)
    }
}

struct Worker {
    spans: Receiver<Message>,
    drops: Arc<Drops>,
    batch_size: usize,
    flush_interval: Duration,
    timeout: Duration,
    warning: Warning,
}

impl Worker {
    /// Batches spans until `batch_size` or `flush_interval`, exports each
    /// batch within `timeout`, until stopped or every sender is gone.
    fn run<E: SpanExporter>(mut self, runtime: &tokio::runtime::Runtime, exporter: E) {
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut due = Instant::now() + self.flush_interval;
        loop {
            let wait = due.saturating_duration_since(Instant::now());
            let stop = match self.spans.recv_timeout(wait) {
                Ok(Message::Span(span)) => {
                    batch.push(*span);
                    if batch.len() >= self.batch_size {
                        self.export(runtime, &exporter, &mut batch);
                    }
                    None
                }
                Ok(Message::Flush(answer)) => {
                    let stop = self.drain(runtime, &exporter, &mut batch);
                    let _ = answer.send(());
                    stop
                }
                Ok(Message::Stop(answer)) => {
                    // Whatever a second stop asked, this answers too.
                    let _ = self.drain(runtime, &exporter, &mut batch);
                    Some(answer)
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.export(runtime, &exporter, &mut batch);
                    due = Instant::now() + self.flush_interval;
                    None
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.export(runtime, &exporter, &mut batch);
                    return;
                }
            };
            let full = self.drops.queue_full.swap(0, Ordering::Relaxed);
            if full > 0 {
                self.warning
                    .log(Dropped::QueueFull, full, &"the export queue is full");
            }
            if let Some(answer) = stop {
                let _ = exporter.shutdown_with_timeout(self.timeout);
                let _ = answer.send(());
                return;
            }
        }
    }

    /// Exports everything queued so far; returns a stop request met on the way.
    fn drain<E: SpanExporter>(
        &mut self,
        runtime: &tokio::runtime::Runtime,
        exporter: &E,
        batch: &mut Vec<SpanData>,
    ) -> Option<mpsc::Sender<()>> {
        let mut stop = None;
        while let Ok(message) = self.spans.try_recv() {
            match message {
                Message::Span(span) => batch.push(*span),
                Message::Flush(answer) => {
                    let _ = answer.send(());
                }
                Message::Stop(answer) => stop = Some(answer),
            }
            if batch.len() >= self.batch_size {
                self.export(runtime, exporter, batch);
            }
        }
        self.export(runtime, exporter, batch);
        stop
    }

    fn export<E: SpanExporter>(
        &mut self,
        runtime: &tokio::runtime::Runtime,
        exporter: &E,
        batch: &mut Vec<SpanData>,
    ) {
        if batch.is_empty() {
            return;
        }
        let spans = batch.len();
        let sent = std::mem::replace(batch, Vec::with_capacity(self.batch_size));
        let timeout = self.timeout;
        let result =
            runtime.block_on(async { tokio::time::timeout(timeout, exporter.export(sent)).await });
        let error = match result {
            Ok(Ok(())) => {
                metrics::counter!("telemetry_spans_exported_total").increment(spans as u64);
                return;
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("the export took longer than {:?}", self.timeout),
        };
        Drops::count(Dropped::ExportFailed, spans);
        self.warning
            .log(Dropped::ExportFailed, spans as u64, &error);
    }
}
