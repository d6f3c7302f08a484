//! Hostile and unauthenticated callers: API keys, rate limits, webhook
//! signatures, the admin token.

use std::time::Duration;

use e2e_tests::{
    free_local_address, test_python, wait_for, workspace_root, RedisServer, RouterProcess,
    TestDestination, TestSystem, ADMIN_TOKEN, API_KEY, API_KEY_NAME,
};
use redis::AsyncCommands;
use serde_json::{json, Value};

async fn post_with(
    system: &TestSystem,
    authorization: Option<&str>,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/events", system.gateway_url))
        .json(body);
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    let response = request.send().await.expect("gateway answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

/// The `source` field of every stored event, over all shards.
async fn stored_sources(system: &TestSystem) -> Vec<Option<String>> {
    let mut con = system.redis.connection().await;
    let mut sources = Vec::new();
    for shard in 0..e2e_tests::SHARDS {
        let entries: redis::streams::StreamRangeReply = con
            .xrange_all(system.keys.events(shard))
            .await
            .expect("XRANGE");
        for entry in entries.ids {
            sources.push(entry.get::<String>(protocol::entry::field::SOURCE));
        }
    }
    sources
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_needs_a_valid_api_key_and_records_its_name() {
    let system = TestSystem::start_without_router(vec![TestDestination::new("crm", "/ok")]).await;
    let event = json!({ "userId": "u", "payload": 1 });
    let wrong = format!("Bearer {API_KEY}x");
    for (authorization, message) in [
        (None, "missing API key"),
        (Some("Bearer evd_not-a-key"), "invalid API key"),
        (Some(wrong.as_str()), "invalid API key"),
        (Some(API_KEY), "malformed Authorization header"),
        (Some("Basic dXNlcjpwYXNz"), "malformed Authorization header"),
    ] {
        let (status, headers, body) = post_with(&system, authorization, &event).await;
        assert_eq!(status, 401, "{authorization:?}: {body}");
        assert_eq!(headers["www-authenticate"], "Bearer");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(message),
            "{authorization:?}: expected `{message}` in `{error}`"
        );
    }
    // The batch route is guarded too.
    let response = reqwest::Client::new()
        .post(format!("{}/v1/batch", system.gateway_url))
        .json(&json!({ "events": [event] }))
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(response.status(), 401);
    assert_eq!(
        system.entries_added().await,
        0,
        "refused requests stored nothing"
    );

    let (status, _, body) = post_with(&system, Some(&format!("Bearer {API_KEY}")), &event).await;
    assert_eq!(status, 202, "{body}");
    let (status, _, body) = post_with(&system, Some(&format!("bearer  {API_KEY} ")), &event).await;
    assert_eq!(status, 202, "the scheme is case-insensitive: {body}");
    assert_eq!(
        stored_sources(&system).await,
        vec![Some(API_KEY_NAME.to_owned()); 2],
        "each event records the key's name"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_limit_gets_429_with_retry_after() {
    let redis = RedisServer::start().await;
    let system = TestSystem::start_custom(redis, vec![], |config| {
        config.auth.keys[0].events_per_sec = Some(5);
    })
    .await;
    let mut accepted = 0;
    let mut limited = None;
    for seq in 0..20 {
        let (status, body) = system
            .post("/v1/events", &json!({ "userId": "u", "payload": seq }))
            .await;
        match status {
            202 => accepted += 1,
            429 => {
                limited = Some(body);
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    // One second's worth at once (one more if the test ran slowly enough for
    // the bucket to refill a token meanwhile).
    assert!((5..=6).contains(&accepted), "{accepted} admitted");
    let body = limited.expect("the sixth event is limited");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("`{API_KEY_NAME}` is over its rate limit")),
        "{error}"
    );

    let response = system
        .http
        .post(format!("{}/v1/batch", system.gateway_url))
        .json(&json!({ "events": [{ "userId": "u", "payload": 1 }] }))
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(
        response.status(),
        429,
        "batches count against the same limit"
    );
    assert_eq!(response.headers()["retry-after"], "1");

    // The allowance comes back with time.
    wait_for(
        "the limit to admit again",
        Duration::from_secs(5),
        || async {
            system
                .post("/v1/events", &json!({ "userId": "u", "payload": "later" }))
                .await
                .0
                == 202
        },
    )
    .await;
    assert_eq!(
        system.stream_lengths().await,
        6,
        "limited requests stored nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_off_anyone_may_post_and_no_source_is_recorded() {
    let redis = RedisServer::start().await;
    let system = TestSystem::start_custom(redis, vec![], |config| {
        config.auth.required = false;
        config.auth.keys.clear();
    })
    .await;
    let (status, _, body) = post_with(&system, None, &json!({ "userId": "u", "payload": 1 })).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(stored_sources(&system).await, vec![None]);
    // A key that is sent must still be valid.
    let (status, _, _) = post_with(
        &system,
        Some("Bearer nope"),
        &json!({ "userId": "u", "payload": 1 }),
    )
    .await;
    assert_eq!(status, 401);
}

const OLD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NEW_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

fn secret(text: &str) -> protocol::webhook::SigningSecret {
    text.to_owned().try_into().expect("a valid secret")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_and_an_independent_verifier_agrees() {
    // Mid-rotation: the router signs with the new and the old secret; the
    // receiver still knows only the old one.
    let mut system =
        TestSystem::start_without_router(vec![TestDestination::new("signed", "/capture/signed")
            .signed_with(&[NEW_SECRET, OLD_SECRET])])
        .await;
    system.recorder.require_signatures(vec![secret(OLD_SECRET)]);
    system.start_router();
    for seq in 0..20 {
        system
            .send(&format!("user-{}", seq % 3), json!({ "seq": seq }))
            .await;
    }
    system
        .wait_delivered("signed", 20, Duration::from_secs(30))
        .await;
    let summary = system.received("signed");
    assert_eq!(
        summary.requests, 20,
        "every signature verified at the receiver"
    );

    let captured = system.recorder.captured();
    assert_eq!(captured.len(), 20);
    for request in &captured {
        let signatures: Vec<&str> = request.headers["webhook-signature"].split(' ').collect();
        assert_eq!(signatures.len(), 2, "one signature per secret");
        assert!(signatures.iter().all(|s| s.starts_with("v1,")));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("captured.json");
    std::fs::write(&file, serde_json::to_vec(&captured).expect("json")).expect("write");
    let unrelated = protocol::webhook::SigningSecret::generate();
    let output = std::process::Command::new(test_python())
        .arg(workspace_root().join("tests/python/verify_signatures.py"))
        .arg(&file)
        .args([OLD_SECRET, NEW_SECRET, unrelated.as_str()])
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "verifier failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    let expected =
        |verified: usize| json!({ "requests": 20, "verified": verified, "tampered_rejected": 20 });
    assert_eq!(
        report,
        json!([expected(20), expected(20), expected(0)]),
        "standardwebhooks verifies both signatures, refuses tampered requests and other secrets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_refuses_a_wrong_signature_with_401_and_the_event_is_dead_lettered() {
    let mut system =
        TestSystem::start_without_router(vec![
            TestDestination::new("wrong-secret", "/ok/wrong").signed_with(&[NEW_SECRET])
        ])
        .await;
    system.recorder.require_signatures(vec![secret(OLD_SECRET)]);
    system.start_router();
    system.send("u", json!(1)).await;
    wait_for("the dead letter", Duration::from_secs(30), || async {
        !system.dead_letters("wrong-secret").await.is_empty()
    })
    .await;
    let letter = &system.dead_letters("wrong-secret").await[0];
    assert_eq!(letter["last_status"], "401", "{letter:?}");
    assert!(
        letter["last_error"].contains("no valid signature"),
        "{letter:?}"
    );
    assert_eq!(system.received("wrong-secret").delivered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_needs_its_own_token() {
    let system = TestSystem::start(vec![TestDestination::new("crm", "/ok")]).await;
    let admin = system.admin_url.clone().expect("router started");
    let http = reqwest::Client::new();
    let basic = |password: &str| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("operator:{password}"))
        )
    };
    for path in ["/", "/metrics", "/admin/destinations"] {
        for authorization in [
            None,
            Some(format!("Bearer {API_KEY}")),
            Some(format!("Bearer {ADMIN_TOKEN}x")),
            Some(basic("wrong")),
        ] {
            let mut request = http.get(format!("{admin}{path}"));
            if let Some(authorization) = &authorization {
                request = request.header("authorization", authorization);
            }
            let response = request.send().await.expect("admin answers");
            assert_eq!(response.status(), 401, "{path} with {authorization:?}");
            assert!(response.headers()["www-authenticate"]
                .to_str()
                .expect("ascii")
                .starts_with("Basic "));
        }
        for authorization in [format!("Bearer {ADMIN_TOKEN}"), basic(ADMIN_TOKEN)] {
            let response = http
                .get(format!("{admin}{path}"))
                .header("authorization", &authorization)
                .send()
                .await
                .expect("admin answers");
            assert_eq!(response.status(), 200, "{path} with {authorization}");
        }
    }
    // A refused request changes nothing.
    let response = http
        .post(format!("{admin}/admin/destinations/crm/pause"))
        .send()
        .await
        .expect("admin answers");
    assert_eq!(response.status(), 401);
    // Nor does one another site's page makes the browser send with its
    // stored credentials (CSRF), whichever header gives it away.
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        for path in ["/destinations/crm/replay", "/admin/destinations/crm/pause"] {
            let response = http
                .post(format!("{admin}{path}"))
                .header("authorization", basic(ADMIN_TOKEN))
                .header(name, value)
                .send()
                .await
                .expect("admin answers");
            assert_eq!(response.status(), 403, "{path} with {name}: {value}");
        }
    }
    assert_eq!(system.destination_view("crm").await["paused"], false);
    let same_origin = admin.clone();
    let response = http
        .post(format!("{admin}/admin/destinations/crm/pause"))
        .header("authorization", basic(ADMIN_TOKEN))
        .header("origin", same_origin)
        .send()
        .await
        .expect("admin answers");
    assert_eq!(response.status(), 200, "the console's own origin may");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_addresses_are_refused_at_connect_time_unless_allow_listed() {
    let mut system = TestSystem::start_without_router(vec![]).await;
    // A host name, so only the connect-time check can see where it leads.
    let by_name = system.mock_url.replace("127.0.0.1", "localhost") + "/ok/internal";
    system.destinations = vec![TestDestination::new("internal", &by_name)];
    system.start_router_with(|config| config.outbound.allowed_networks.clear());
    for seq in 0..3 {
        system.send("u", json!(seq)).await;
    }
    wait_for(
        "the refused events to be dead-lettered",
        Duration::from_secs(30),
        || async { system.dead_letters("internal").await.len() == 3 },
    )
    .await;
    for letter in system.dead_letters("internal").await {
        assert_eq!(
            letter["attempts"], "1",
            "a refusal is not retried: {letter:?}"
        );
        let error = &letter["last_error"];
        assert!(
            error.contains("refused to connect to localhost at") && error.contains("loopback"),
            "{error}"
        );
    }
    assert_eq!(
        system.received("internal").requests,
        0,
        "nothing reached the address"
    );

    // Allow-listed, the same dead letters replay and arrive.
    system.stop_router().await;
    system.start_router();
    let (status, body) = system
        .admin_call(
            reqwest::Method::POST,
            "/admin/destinations/internal/dead-letters/replay",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_for(
        "the replayed events to arrive",
        Duration::from_secs(30),
        || async { system.recorder.delivered_count("/ok/internal") == 3 },
    )
    .await;

    // An IP literal in such a range is refused before the router starts.
    let mut config = system.router_config();
    config.destinations[0].url = "http://169.254.169.254/latest/meta-data".into();
    config.outbound.allowed_networks.clear();
    let refusal = config.validate().expect_err("metadata address");
    assert!(
        refusal.contains("destination `internal`: url: refused to connect to 169.254.169.254"),
        "{refusal}"
    );
}

/// A proxy named in the environment would resolve destinations itself, past
/// the outbound policy's address checks. The router ignores it: with every
/// proxy variable pointing at a port where nothing listens, events are
/// still delivered, straight to the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_ignores_proxies_named_in_its_environment() {
    let mut system =
        TestSystem::start_without_router(vec![TestDestination::new("crm", "/ok/crm")]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = system.write_router_config(dir.path());
    let admin = free_local_address();
    system.admin_url = Some(format!("http://{admin}"));
    let nowhere = format!("http://{}", free_local_address());
    let mut env = vec![("ROUTER_ADMIN__LISTEN", admin.as_str())];
    for variable in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        env.push((variable, nowhere.as_str()));
    }
    let _router =
        RouterProcess::start_with_env(&config, "router", &dir.path().join("router.log"), &env);
    let (status, _, body) = post_with(
        &system,
        Some(&format!("Bearer {API_KEY}")),
        &json!({ "userId": "u1", "payload": { "n": 1 } }),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    system
        .wait_delivered("crm", 1, Duration::from_secs(30))
        .await;
}
