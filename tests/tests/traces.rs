//! OpenTelemetry traces, received by a real OTLP receiver: a client's
//! trace runs through ingest, the Redis write and every delivery attempt,
//! and on to the destination; an exporter that is down or hangs never
//! holds up ingest or delivery.
//!
//! Trace export is process-wide (one tracer provider, one subscriber), so
//! each test here needs a process of its own: the suite runs under
//! cargo-nextest, which gives it one.

use std::time::Duration;

use e2e_tests::{post_event, OtlpReceiver, ReceivedSpan, TestDestination, TestSystem};
use serde_json::json;
use telemetry::traces::{Protocol, TracesConfig};
use telemetry::{LogFormat, Telemetry};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// The reference defaults, exporting to `endpoint` with quick batches.
fn exporting_to(endpoint: &str, protocol: Protocol) -> TracesConfig {
    let mut config: TracesConfig = toml::from_str::<toml::Table>(telemetry::traces::DEFAULTS)
        .expect("the defaults parse")["traces"]
        .clone()
        .try_into()
        .expect("the defaults are a traces config");
    config.endpoint = endpoint.to_owned();
    config.protocol = protocol;
    config.flush_interval_ms = 100;
    config
}

fn start_export(config: &TracesConfig) -> Telemetry {
    telemetry::init(LogFormat::Text, config, "event-delivery").expect("trace export starts")
}

async fn a_clients_trace_runs_through_ingest_and_every_attempt(protocol: Protocol) {
    let receiver = OtlpReceiver::start(protocol);
    let _telemetry = start_export(&exporting_to(&receiver.endpoint, protocol));
    // The first attempt of each event gets 503, the second 200.
    let system = TestSystem::start(vec![
        TestDestination::new("flaky", "/flaky/1").retry(50, 200, 5)
    ])
    .await;
    let answer = post_traced(
        &system,
        "/v1/events",
        json!({"userId": "u1", "payload": {"n": 1}}),
    )
    .await;
    let event_id = answer["id"].as_str().expect("an id").to_owned();
    system
        .wait_delivered("flaky", 1, Duration::from_secs(20))
        .await;

    // Two attempts, then a delivery: four spans of ours in the client's trace.
    let spans = wait_for_spans(&receiver, Duration::from_secs(20), |spans| {
        spans.iter().filter(|s| s.trace_id == CLIENT_TRACE).count() >= 4
    })
    .await;
    let in_trace: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == CLIENT_TRACE)
        .collect();
    let named = |name: &str| -> Vec<&ReceivedSpan> {
        in_trace
            .iter()
            .copied()
            .filter(|s| s.name == name)
            .collect()
    };
    let ingest = named("POST /v1/events");
    assert_eq!(ingest.len(), 1, "one ingest span in {in_trace:#?}");
    let ingest = ingest[0];
    assert_eq!(
        ingest.parent_span_id, CLIENT_SPAN,
        "the client's span is its parent"
    );
    assert_eq!(ingest.service, "event-delivery");
    assert_eq!(ingest.attribute("events"), Some("1"));
    assert_eq!(ingest.attribute("outcome"), Some("accepted"));
    assert_eq!(ingest.attribute("http.response.status_code"), Some("202"));
    assert!(ingest.attribute("shard").is_some(), "{ingest:?}");
    let write = named("XADD");
    assert_eq!(write.len(), 1, "one Redis write in {in_trace:#?}");
    assert_eq!(write[0].parent_span_id, ingest.span_id);
    assert_eq!(write[0].attribute("db.system.name"), Some("redis"));

    let mut attempts = named("POST flaky");
    attempts.sort_by_key(|s| s.attribute("attempt").map(str::to_owned));
    assert_eq!(attempts.len(), 2, "two attempts in {in_trace:#?}");
    for (number, (attempt, outcome, status)) in [(1, "retry", "503"), (2, "delivered", "200")]
        .into_iter()
        .enumerate()
    {
        let span = attempts[number];
        assert_eq!(span.parent_span_id, ingest.span_id, "{span:?}");
        assert_eq!(
            span.attribute("attempt"),
            Some(attempt.to_string().as_str())
        );
        assert_eq!(span.attribute("outcome"), Some(outcome));
        assert_eq!(span.attribute("http.response.status_code"), Some(status));
        assert_eq!(span.attribute("destination"), Some("flaky"));
        assert_eq!(
            span.attribute("messaging.message.id"),
            Some(event_id.as_str())
        );
        assert!(span.attribute("latency_ms").is_some(), "{span:?}");
    }
    assert!(
        attempts[0].attribute("retry_delay_ms").is_some(),
        "the failed attempt names its retry delay: {:?}",
        attempts[0]
    );

    // Each request carried its own attempt span's context, in the client's trace.
    let received = system.received("flaky");
    let mut carried: Vec<(u32, String)> = received
        .events
        .iter()
        .map(|r| (r.attempt, r.traceparent.clone().expect("a traceparent")))
        .collect();
    carried.sort();
    assert_eq!(carried.len(), 2);
    for ((_, traceparent), span) in carried.iter().zip(&attempts) {
        assert_eq!(
            traceparent,
            &format!("00-{CLIENT_TRACE}-{}-01", span.span_id),
            "the destination can continue the attempt's span"
        );
    }

    // The event view names the trace.
    let view = system.admin_get(&format!("/admin/events/{event_id}")).await;
    assert_eq!(view["trace_id"], CLIENT_TRACE, "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_carries_a_clients_trace_through_ingest_and_every_attempt_over_http() {
    a_clients_trace_runs_through_ingest_and_every_attempt(Protocol::HttpProtobuf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_carries_a_clients_trace_through_ingest_and_every_attempt_over_grpc() {
    a_clients_trace_runs_through_ingest_and_every_attempt(Protocol::Grpc).await;
}

/// An exporter whose endpoint refuses connections: every event is still
/// accepted and delivered, and the spans it could not send are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_exporter_that_is_dead_holds_up_nothing_and_its_drops_are_counted() {
    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", listener.local_addr().expect("address"))
        // Dropped here: the port refuses connections.
    };
    let config = exporting_to(&refused, Protocol::HttpProtobuf);
    goes_on_and_counts_the_drops(&config, 50, "export_failed").await;
}

/// An exporter that accepts connections and never answers: ingest and
/// delivery go on while its queue overflows, and the overflow is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_exporter_that_hangs_holds_up_nothing_and_a_full_queue_drops() {
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", hanging.local_addr().expect("address"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hanging.accept().await {
            // Read nothing, answer nothing.
            held.push(socket);
        }
    });
    let mut config = exporting_to(&endpoint, Protocol::HttpProtobuf);
    config.queue_size = 16;
    config.batch_size = 8;
    // Far longer than the test: the one export stays stuck.
    config.export_timeout_ms = 60_000;
    goes_on_and_counts_the_drops(&config, 100, "queue_full").await;
}

/// With export as `config` says, `events` events from as many users are
/// accepted and delivered, and spans are counted as dropped for `reason`.
async fn goes_on_and_counts_the_drops(config: &TracesConfig, events: usize, reason: &str) {
    let _telemetry = start_export(config);
    let system = TestSystem::start(vec![TestDestination::new("crm", "/ok")]).await;
    let in_time = watchdog(Duration::from_secs(60), "ingesting and delivering");
    for n in 0..events {
        post_event(
            &system.http,
            &system.gateway_url,
            &format!("u{n}"),
            json!({"n": n}),
        )
        .await;
    }
    system
        .wait_delivered("crm", events, Duration::from_secs(20))
        .await;
    drop(in_time);
    let dropped = wait_for_metric(&system, reason).await;
    assert!(dropped > 0.0);
}

/// A batch's `traceparent` applies to every event of the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_applies_a_batchs_traceparent_to_every_event() {
    let receiver = OtlpReceiver::start(Protocol::HttpProtobuf);
    let _telemetry = start_export(&exporting_to(&receiver.endpoint, Protocol::HttpProtobuf));
    let system = TestSystem::start(vec![TestDestination::new("crm", "/ok")]).await;
    post_traced(
        &system,
        "/v1/batch",
        json!({"events": [
            {"userId": "a", "payload": {"n": 1}},
            {"userId": "b", "payload": {"n": 2}},
            {"userId": "c", "payload": {"n": 3}},
        ]}),
    )
    .await;
    system
        .wait_delivered("crm", 3, Duration::from_secs(20))
        .await;
    let spans = wait_for_spans(&receiver, Duration::from_secs(20), |spans| {
        spans.iter().filter(|s| s.name == "POST crm").count() >= 3
    })
    .await;
    let ingest = spans
        .iter()
        .find(|s| s.name == "POST /v1/batch")
        .expect("the batch's ingest span");
    assert_eq!(ingest.trace_id, CLIENT_TRACE);
    assert_eq!(ingest.attribute("events"), Some("3"));
    for attempt in spans.iter().filter(|s| s.name == "POST crm") {
        assert_eq!(attempt.trace_id, CLIENT_TRACE, "{attempt:?}");
        assert_eq!(attempt.parent_span_id, ingest.span_id, "{attempt:?}");
    }
}

/// Sampling follows the parent: a client's sampled trace is exported
/// whatever the ratio; a root trace the ratio (here 0) leaves out is
/// exported by no service, yet the destination still gets its context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_sampling_follows_the_parent_and_the_ratio() {
    let receiver = OtlpReceiver::start(Protocol::HttpProtobuf);
    let mut config = exporting_to(&receiver.endpoint, Protocol::HttpProtobuf);
    config.sampler = "parentbased_traceidratio".into();
    config.sampler_arg = 0.0;
    let _telemetry = start_export(&config);
    let system = TestSystem::start(vec![TestDestination::new("crm", "/ok")]).await;
    let unsampled = post_event(&system.http, &system.gateway_url, "root", json!({})).await;
    post_traced(
        &system,
        "/v1/events",
        json!({"userId": "child", "payload": {}}),
    )
    .await;
    system
        .wait_delivered("crm", 2, Duration::from_secs(20))
        .await;
    let spans = wait_for_spans(&receiver, Duration::from_secs(20), |spans| {
        spans.iter().any(|s| s.name == "POST crm")
    })
    .await;
    assert!(
        spans.iter().all(|s| s.trace_id == CLIENT_TRACE),
        "only the client's sampled trace is exported: {spans:#?}"
    );
    let received = system.received("crm");
    let root = received
        .events
        .iter()
        .find(|r| r.id == unsampled)
        .expect("the root event arrived");
    let traceparent = root.traceparent.as_deref().expect("a traceparent");
    assert!(
        traceparent.ends_with("-00") && !traceparent.contains(CLIENT_TRACE),
        "the unsampled trace's own context, flagged not sampled: {traceparent}"
    );
}

/// Dead-lettering and replay are spans of the event's trace; the replay's
/// attempt is the replay span's child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_follows_a_dead_letter_and_its_replay_in_the_events_trace() {
    let receiver = OtlpReceiver::start(Protocol::HttpProtobuf);
    let _telemetry = start_export(&exporting_to(&receiver.endpoint, Protocol::HttpProtobuf));
    let system = TestSystem::start(vec![
        TestDestination::new("crm", "/outage/crm").retry(20, 20, 1)
    ])
    .await;
    system.recorder.set_outage("/outage/crm", true);
    post_traced(
        &system,
        "/v1/events",
        json!({"userId": "u1", "payload": {}}),
    )
    .await;
    let spans = wait_for_spans(&receiver, Duration::from_secs(20), |spans| {
        spans.iter().any(|s| s.name == "dead-letter crm")
    })
    .await;
    let ingest = spans
        .iter()
        .find(|s| s.name == "POST /v1/events")
        .expect("the ingest span");
    let dead = spans
        .iter()
        .find(|s| s.name == "dead-letter crm")
        .expect("the dead-letter span");
    assert_eq!(dead.trace_id, CLIENT_TRACE);
    assert_eq!(dead.parent_span_id, ingest.span_id);
    system.recorder.set_outage("/outage/crm", false);
    let (status, report) = system
        .admin_call(
            reqwest::Method::POST,
            "/admin/destinations/crm/dead-letters/replay",
            None,
        )
        .await;
    assert_eq!(
        (status, report["replayed"].clone()),
        (200, json!(1)),
        "{report}"
    );
    system
        .wait_delivered("crm", 1, Duration::from_secs(20))
        .await;
    let spans = wait_for_spans(&receiver, Duration::from_secs(20), |spans| {
        spans
            .iter()
            .any(|s| s.name == "POST crm" && s.attribute("outcome") == Some("delivered"))
    })
    .await;
    let replay = spans
        .iter()
        .find(|s| s.name == "replay crm")
        .expect("the replay span");
    assert_eq!(replay.trace_id, CLIENT_TRACE);
    assert_eq!(replay.parent_span_id, ingest.span_id);
    let delivered = spans
        .iter()
        .find(|s| s.name == "POST crm" && s.attribute("outcome") == Some("delivered"))
        .expect("the replay's attempt");
    assert_eq!(delivered.trace_id, CLIENT_TRACE);
    assert_eq!(delivered.parent_span_id, replay.span_id);
}

/// Aborts the test's process, failing it, unless dropped within `limit`:
/// a span export that waits could stop the test's own runtime, whose
/// timers would then never fire.
struct Watchdog(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

fn watchdog(limit: Duration, what: &'static str) -> Watchdog {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
            eprintln!("{what} took longer than {limit:?}: something waits for the exporter");
            std::process::abort();
        }
    });
    Watchdog(done)
}

/// Posts `body` to the gateway's `path` with the client's trace context;
/// returns the 202's body.
async fn post_traced(
    system: &TestSystem,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let answer = system
        .http
        .post(format!("{}{path}", system.gateway_url))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .header("tracestate", "client=1")
        .json(&body)
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(answer.status(), 202);
    answer.json().await.expect("JSON")
}

async fn wait_for_spans(
    receiver: &OtlpReceiver,
    timeout: Duration,
    enough: impl Fn(&[ReceivedSpan]) -> bool,
) -> Vec<ReceivedSpan> {
    e2e_tests::wait_for("the spans to arrive", timeout, || {
        let spans = receiver.spans();
        let done = enough(&spans);
        async move { done }
    })
    .await;
    receiver.spans()
}

/// `telemetry_spans_dropped_total{reason}` once it is above 0.
async fn wait_for_metric(system: &TestSystem, reason: &str) -> f64 {
    e2e_tests::wait_for(
        "dropped spans to be counted",
        Duration::from_secs(20),
        || async {
            system
                .router_metrics()
                .await
                .value("telemetry_spans_dropped_total", &[("reason", reason)])
                > 0.0
        },
    )
    .await;
    system
        .router_metrics()
        .await
        .value("telemetry_spans_dropped_total", &[("reason", reason)])
}
