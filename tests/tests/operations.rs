//! Safety rails an operator relies on: refusing an unsafe Redis, expiring
//! events a destination never took,
//! and 503 (not 500, not loss) when Redis runs out of memory.

use std::net::TcpListener;
use std::time::Duration;

use e2e_tests::{wait_for, RedisServer, TestDestination, TestSystem};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_refuse_a_redis_that_can_lose_events_unless_overridden() {
    let redis =
        RedisServer::start_with(&["--appendonly", "no", "--maxmemory-policy", "allkeys-lru"]).await;
    let mut gateway_config = gateway::Config::defaults();
    gateway_config.redis.url = redis.url().into();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let error = gateway::run(gateway_config.clone(), listener, CancellationToken::new())
        .await
        .expect_err("the gateway refuses to start");
    let message = format!("{error:#}");
    assert!(message.contains("appendonly"), "{message}");
    assert!(message.contains("allkeys-lru"), "{message}");
    assert!(message.contains("allow_unsafe_persistence"), "{message}");

    let mut router_config = router::Config::defaults();
    router_config.redis.url = redis.url().into();
    let error = router::run(
        router_config.clone(),
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        CancellationToken::new(),
    )
    .await
    .expect_err("the router refuses to start");
    assert!(format!("{error:#}").contains("appendonly"), "{error:#}");

    // Overridden: both start (and stop when asked).
    gateway_config.redis.allow_unsafe_persistence = true;
    router_config.redis.allow_unsafe_persistence = true;
    let shutdown = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let ready = format!("http://{}/readyz", listener.local_addr().expect("addr"));
    let gateway = tokio::spawn(gateway::run(gateway_config, listener, shutdown.clone()));
    let router = tokio::spawn(router::run(
        router_config,
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        shutdown.clone(),
    ));
    let http = reqwest::Client::new();
    wait_for(
        "the overridden gateway to be ready",
        Duration::from_secs(10),
        || async {
            http.get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .await;
    shutdown.cancel();
    gateway.await.expect("joins").expect("gateway ran");
    router.await.expect("joins").expect("router ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_older_than_the_destinations_max_age_are_dead_lettered_not_lost() {
    let system = TestSystem::start(vec![
        TestDestination::new("healthy", "/ok"),
        // Would retry for a very long time; the age limit ends it.
        TestDestination::new("down", "/fail")
            .retry(20, 100, 1_000_000)
            .max_age_ms(500),
    ])
    .await;
    let total = system.post_concurrently(5, 4).await;
    system
        .wait_delivered("healthy", total, Duration::from_secs(30))
        .await;
    wait_for(
        "every event expired into the dead letters",
        Duration::from_secs(30),
        || async { system.dead_letters("down").await.len() == total },
    )
    .await;
    let letters = system.dead_letters("down").await;
    for letter in &letters {
        assert!(letter["last_error"].starts_with("expired"), "{letter:?}");
        assert!(
            !letter["payload"].is_empty(),
            "the event is kept for replay"
        );
    }
    // A user's first event was attempted until it expired; the ones queued
    // behind it may have expired before their first attempt.
    assert!(letters.iter().any(|l| l["attempts"] != "0"));
    assert_eq!(system.pending("down").await, 0);
}

/// On a single Redis the gateway's memory cap is the server's: past
/// `backlog.max_memory_percent` of `maxmemory`, every shard's events are
/// refused with a 503 naming the cap, before Redis itself runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_memory_cap_every_shard_answers_503_before_redis_runs_out() {
    let redis = RedisServer::start_with(&["--maxmemory", "8mb"]).await;
    let system = TestSystem::start_custom(redis, vec![TestDestination::new("crm", "/ok")], |g| {
        g.backlog.max_memory_percent = 50;
        g.backlog.check_interval_ms = 20;
    })
    .await;
    let payload = "x".repeat(64 * 1024);
    let post = |user: String, seq: usize| {
        let body =
            serde_json::json!({ "userId": user, "payload": { "seq": seq, "fill": payload } });
        let system = &system;
        async move { system.post("/v1/events", &body).await }
    };
    let mut accepted = 0;
    let mut refusal = None;
    for seq in 0..200 {
        match post(format!("user-{}", seq % 7), seq).await {
            (202, _) => accepted += 1,
            (503, body) => {
                refusal = Some(body);
                break;
            }
            (other, body) => panic!("unexpected {other}: {body}"),
        }
    }
    let refusal = refusal.expect("the cap refused within 200 × 64 KiB");
    eprintln!("{accepted} accepted, then 503: {refusal}");
    assert!(
        refusal.to_string().contains("above 50% of maxmemory"),
        "the gateway's cap refused, not Redis: {refusal}"
    );
    // Other users are refused too, whatever their shard: the memory is
    // the one server's.
    for user in 0..8 {
        let (status, body) = post(format!("other-{user}"), 0).await;
        assert_eq!(status, 503, "other-{user} accepted past the cap: {body}");
    }
    assert_eq!(
        system.stream_lengths().await,
        accepted,
        "every 202 is stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_answers_503_and_keeps_what_it_accepted() {
    let redis = RedisServer::start_with(&["--maxmemory", "4mb"]).await;
    // The gateway's own memory cap is lifted so Redis itself refuses (OOM).
    let system = TestSystem::start_custom(redis, vec![TestDestination::new("crm", "/ok")], |g| {
        g.backlog.max_memory_percent = 100;
    })
    .await;
    let payload = "x".repeat(64 * 1024);
    let mut accepted = 0;
    let mut refusal = None;
    for seq in 0..200 {
        let (status, body) = system
            .post(
                "/v1/events",
                &serde_json::json!({ "userId": format!("user-{}", seq % 7), "payload": { "seq": seq, "fill": payload } }),
            )
            .await;
        match status {
            202 => accepted += 1,
            503 => {
                refusal = Some(body);
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let refusal = refusal.expect("Redis ran out of memory within 200 × 64 KiB");
    eprintln!("{accepted} accepted, then 503: {refusal}");
    assert!(accepted > 0);
    assert_eq!(
        system.stream_lengths().await,
        accepted,
        "every 202 is stored"
    );
}
