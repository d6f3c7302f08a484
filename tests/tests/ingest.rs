//! Acceptance tests of the gateway's answers: every rejection names its
//! problem and stores nothing; an unavailable Redis gets a quick 503.

use std::time::Duration;

use e2e_tests::{TestDestination, TestSystem};
use serde_json::{json, Value};

async fn raw_post(
    system: &TestSystem,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let response = system
        .http
        .post(format!("{}{path}", system.gateway_url))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("gateway answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_a_status_and_a_message_naming_the_problem_and_store_nothing() {
    let system = TestSystem::start(vec![TestDestination::new("crm", "/ok")]).await;
    let json_type = "application/json";
    let long_user = "u".repeat(257);
    let batch_too_big: Vec<Value> = (0..1001)
        .map(|i| json!({ "userId": "u", "payload": i }))
        .collect();
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/events",
            json_type,
            b"{\"userId\": ".to_vec(),
            400,
            "malformed JSON",
        ),
        (
            "/v1/events",
            json_type,
            br#"{"payload": 1}"#.to_vec(),
            400,
            "userId is required",
        ),
        (
            "/v1/events",
            json_type,
            br#"{"userId": "", "payload": 1}"#.to_vec(),
            400,
            "userId must not be empty",
        ),
        (
            "/v1/events",
            json_type,
            format!(r#"{{"userId": "{long_user}", "payload": 1}}"#).into_bytes(),
            400,
            "userId is longer than 256 bytes",
        ),
        (
            "/v1/events",
            json_type,
            br#"{"userId": "u"}"#.to_vec(),
            400,
            "payload is required",
        ),
        (
            "/v1/events",
            json_type,
            br#"{"userId": "u", "payload": 1, "destinations": ["nowhere"]}"#.to_vec(),
            400,
            "unknown destination `nowhere`",
        ),
        (
            "/v1/events",
            json_type,
            format!(
                r#"{{"userId": "u", "payload": 1, "messageId": "{}"}}"#,
                "m".repeat(129)
            )
            .into_bytes(),
            400,
            "messageId is longer than 128 bytes",
        ),
        (
            "/v1/events",
            "text/plain",
            br#"{"userId": "u", "payload": 1}"#.to_vec(),
            415,
            "content-type must be application/json",
        ),
        (
            "/v1/events",
            json_type,
            format!(
                r#"{{"userId": "u", "payload": "{}"}}"#,
                "x".repeat(1_100_000)
            )
            .into_bytes(),
            413,
            "larger than the limit of 1048576 bytes",
        ),
        (
            "/v1/batch",
            json_type,
            br#"{"events": [{"userId": "a", "payload": 1}, {"userId": "b"}]}"#.to_vec(),
            400,
            "events[1]: payload is required",
        ),
        (
            "/v1/batch",
            json_type,
            serde_json::to_vec(&json!({ "events": batch_too_big })).expect("json"),
            400,
            "the limit is 1000 per batch",
        ),
        (
            "/v1/batch",
            json_type,
            br#"{"events": []}"#.to_vec(),
            400,
            "at least one event",
        ),
        (
            "/v1/events",
            json_type,
            format!(
                r#"{{"userId": "u", "payload": {}1{}}}"#,
                "[".repeat(32),
                "]".repeat(32)
            )
            .into_bytes(),
            400,
            "JSON nests deeper than the limit of 32 levels",
        ),
        (
            "/v1/batch",
            json_type,
            format!(
                r#"{{"events": [{{"userId": "u", "payload": {}1{}}}]}}"#,
                "{\"a\": ".repeat(40),
                "}".repeat(40)
            )
            .into_bytes(),
            400,
            "JSON nests deeper than the limit of 32 levels",
        ),
    ];
    // Once the router has registered its destinations, `nowhere` is the only unknown.
    system.wait_destinations_registered("crm").await;
    let before = system.entries_added().await;

    for (path, content_type, body, status, message) in cases {
        let (got_status, got_body) = raw_post(&system, path, content_type, body).await;
        assert_eq!(got_status, status, "{message}: {got_body}");
        let error = got_body["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "expected `{message}` in `{error}`");
    }
    assert_eq!(
        system.entries_added().await,
        before,
        "rejected requests stored nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_in_order_and_answers_every_id() {
    let system = TestSystem::start(vec![TestDestination::new("crm", "/ok")]).await;
    let events: Vec<Value> = (0..300)
        .map(|i| json!({ "userId": format!("user-{}", i % 7), "payload": { "seq": i } }))
        .collect();

    let (status, body) = system.post("/v1/batch", &json!({ "events": events })).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["ids"].as_array().expect("ids").len(), 300);
    system
        .wait_delivered("crm", 300, Duration::from_secs(20))
        .await;
    assert_eq!(system.received("crm").order_violations, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_shard_count_is_refused_at_startup() {
    let system = TestSystem::start_without_router(vec![TestDestination::new("crm", "/ok")]).await;
    let mut config = system.router_config();
    config.redis.shards = e2e_tests::SHARDS * 2;

    let error = router::run(
        config,
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind"),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect_err("a router with another shard count must not start");
    let message = format!("{error:#}");
    assert!(
        message.contains(&format!("started with {} shards", e2e_tests::SHARDS)),
        "{message}"
    );
}
