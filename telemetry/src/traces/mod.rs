//! OpenTelemetry traces: the OTLP export of the spans the services make,
//! and W3C trace context in and out (`traceparent`, `tracestate`).
//!
//! Exported spans are `tracing` spans with the target [`TARGET`]; only
//! they reach the OpenTelemetry layer, and they are made only while export
//! is on ([`active`]), so a service with export off pays nothing for them.
//! Log lines keep their own filter (`RUST_LOG`).

mod config;
mod export;
mod http;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use config::{Protocol, TracesConfig};

/// The commented `[traces]` defaults, appended to each service's own.
pub const DEFAULTS: &str = include_str!("../../config/traces.default.toml");

/// The target of every exported span: `info_span!(target: "otel", …)`.
pub const TARGET: &str = "otel";

/// Export is on in this process.
#[derive(Debug)]
pub struct Active {
    /// The sampler follows a parent's decision: under a sampled-out parent
    /// no span would be exported, so none need be made.
    follows_parent: bool,
    /// Where spans go, for the start-up log line.
    pub url: String,
    pub protocol: Protocol,
    pub sampler: String,
}

static ACTIVE: OnceLock<Active> = OnceLock::new();

/// Whether this process exports spans, and how it samples.
pub fn active() -> Option<&'static Active> {
    ACTIVE.get()
}

impl Active {
    /// Whether spans under a parent with this `traceparent` (or none) can
    /// be exported, so are worth making.
    pub fn exports_under(&self, traceparent: Option<&str>) -> bool {
        !self.follows_parent || traceparent.is_none_or(sampled)
    }
}

/// The provider and its export thread; dropping it exports what is queued
/// (for at most a few seconds).
pub(crate) struct Exporting {
    provider: SdkTracerProvider,
}

impl Drop for Exporting {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown_with_timeout(Duration::from_secs(5)) {
            tracing::warn!(%error, "Exporting the last trace spans failed.");
        }
    }
}

/// Starts export as `config` says, or returns `None` when it is off.
pub(crate) fn start(
    config: &TracesConfig,
    default_service: &str,
) -> Result<Option<(Exporting, opentelemetry_sdk::trace::Tracer)>, String> {
    config.validate()?;
    if !config.enabled() {
        return Ok(None);
    }
    let (sampler, follows_parent) = config.sampler()?;
    let settings = config.export();
    let service = if config.service_name.is_empty() {
        default_service.to_owned()
    } else {
        config.service_name.clone()
    };
    let resource = Resource::builder_empty()
        .with_attributes(config.attributes()?)
        .with_service_name(service.clone())
        .build();
    // The exporter is given the resource where it is built.
    let processor = match settings.protocol {
        Protocol::HttpProtobuf => {
            let (url, timeout) = (settings.url.clone(), settings.timeout);
            export::BoundedExport::start(&settings, resource.clone(), move || {
                let client = reqwest::Client::builder()
                    .timeout(timeout)
                    .build()
                    .map_err(|error| format!("cannot build the OTLP/HTTP client: {error}"))?;
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(http::Client(client))
                    .with_endpoint(url)
                    .with_timeout(timeout)
                    .build()
                    .map_err(|error| format!("cannot build the OTLP/HTTP exporter: {error}"))
            })?
        }
        Protocol::Grpc => {
            let (url, timeout) = (settings.url.clone(), settings.timeout);
            export::BoundedExport::start(&settings, resource.clone(), move || {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(url)
                    .with_timeout(timeout)
                    .build()
                    .map_err(|error| format!("cannot build the OTLP/gRPC exporter: {error}"))
            })?
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(service);
    let active = Active {
        follows_parent,
        url: settings.url.clone(),
        protocol: settings.protocol,
        sampler: format!("{} ({})", config.sampler, config.sampler_arg),
    };
    ACTIVE
        .set(active)
        .map_err(|_| "trace export is already started in this process".to_owned())?;
    Ok(Some((Exporting { provider }, tracer)))
}

/// Whether a valid `traceparent`'s flags say sampled.
pub fn sampled(traceparent: &str) -> bool {
    traceparent
        .get(53..55)
        .and_then(|flags| u8::from_str_radix(flags, 16).ok())
        .is_some_and(|flags| flags & 1 == 1)
}

/// The W3C trace context a `traceparent` (and `tracestate`) name, as a
/// parent; an invalid header gives an empty context (a new trace).
pub fn parent(traceparent: &str, tracestate: Option<&str>) -> opentelemetry::Context {
    let mut headers = HashMap::with_capacity(2);
    headers.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = tracestate {
        headers.insert("tracestate".to_owned(), state.to_owned());
    }
    TraceContextPropagator::new().extract(&headers)
}

/// A span's W3C trace context, as `(traceparent, tracestate)`; `None`
/// when the span is not exported (export off, or filtered out).
pub fn context_of(span: &tracing::Span) -> Option<(String, Option<String>)> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut headers = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&context, &mut headers);
    let traceparent = headers.remove("traceparent")?;
    let tracestate = headers.remove("tracestate").filter(|s| !s.is_empty());
    Some((traceparent, tracestate))
}

/// Makes `span` a child of the context a `traceparent` names. Call before
/// the span is first entered.
pub fn set_parent(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>) {
    // Fails only for a span that is disabled or already started.
    let _ = span.set_parent(parent(traceparent, tracestate));
}

/// The trace id a valid `traceparent` carries (32 hex digits).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let id = traceparent.get(3..35)?;
    (traceparent.len() >= 55
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && id.bytes().any(|b| b != b'0'))
    .then_some(id)
}

/// Checks a client's `traceparent` (version 00 layout: version, trace id,
/// parent id and flags in lower-case hex). Anything else is ignored, as
/// the W3C recommendation says, and starts a new trace.
pub fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    matches!(parts.as_slice(), [version, trace, span, flags]
        if hex(version, 2) && *version != "ff"
            && hex(trace, 32) && trace.bytes().any(|b| b != b'0')
            && hex(span, 16) && span.bytes().any(|b| b != b'0')
            && hex(flags, 2))
        // Version 00 has exactly these four parts; later versions may add more.
        || (parts.len() > 4 && parts[0] != "00" && is_valid_traceparent(&parts[..4].join("-")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_the_trace_id_and_the_sampled_flag() {
        assert_eq!(trace_id(SAMPLED), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(sampled(SAMPLED));
        assert!(!sampled(&SAMPLED.replace("-01", "-00")));
        assert_eq!(trace_id("00-short"), None);
    }

    #[test]
    fn checks_a_clients_traceparent() {
        assert!(is_valid_traceparent(SAMPLED));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad}");
        }
        assert!(is_valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
        ));
    }

    #[test]
    fn a_parent_keeps_the_trace_id() {
        let context = parent(SAMPLED, Some("vendor=1"));
        let span = context.span();
        let span_context = span.span_context();
        assert_eq!(
            span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(span_context.is_sampled());
        assert_eq!(span_context.trace_state().header(), "vendor=1");
    }
}
