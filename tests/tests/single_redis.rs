//! Tests that stop, pause or refuse their one Redis server (each starts
//! a `RedisServer` of its own, whatever `EVD_TEST_REDIS` says). They run on
//! a single server only: scripts/test.sh runs the cluster suite without
//! this file (the cluster's own faults are in `cluster.rs`).

use std::time::{Duration, Instant};

use e2e_tests::{
    fault_destinations, wait_for, HastyLoad, Load, RedisServer, TestDestination, TestRedis,
    TestSystem, TimedOutWrites, TIMED_OUT_WRITES,
};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_from_its_aof_delivers_every_accepted_event() {
    let redis = RedisServer::start_with(&["--appendfsync", "always"]).await;
    let mut system = TestSystem::start_custom(redis, fault_destinations(), |_| {}).await;
    system.start_router();

    // A load that runs until stopped: a fixed number of events could all be
    // accepted before Redis goes down, leaving no request to see the outage.
    let load = Load::until_stopped(&system, 40, Duration::from_millis(10));
    system
        .wait_delivered("fast", 500, Duration::from_secs(600))
        .await;
    system.redis.server().stop().await;
    let refused_before = load.unavailable_count();
    wait_for(
        "the gateway to answer 503",
        Duration::from_secs(10),
        || async { load.unavailable_count() > refused_before },
    )
    .await;
    system.redis.server().restart().await;
    let restarted_at = Instant::now();
    let accepted_before = load.accepted_count();
    wait_for(
        "202s to resume after Redis is back",
        Duration::from_secs(2),
        || async { load.accepted_count() > accepted_before },
    )
    .await;
    eprintln!(
        "202s resumed {} ms after Redis restarted",
        restarted_at.elapsed().as_millis()
    );
    let accepted_after_restart = load.accepted_count();
    wait_for(
        "more events to be accepted after the restart",
        Duration::from_secs(30),
        || async { load.accepted_count() >= accepted_after_restart + 500 },
    )
    .await;

    let accepted = load.stop().await;
    system
        .assert_all_delivered(&accepted, Duration::from_secs(120))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_gets_503s_within_the_bound_and_no_202_then_recovers() {
    // One server to pause (cluster failover has its own test).
    let redis = RedisServer::start().await;
    let mut system = TestSystem::start_custom(redis, fault_destinations(), |_| {}).await;
    system.start_router();
    let bound = Duration::from_millis(gateway::Config::defaults().redis.timeout_ms);

    let (users, per_user) = (40, 50);
    let load = Load::start(&system, users, per_user);
    system
        .wait_delivered("fast", users * per_user / 4, Duration::from_secs(600))
        .await;
    system.redis.server().pause().await;
    let paused_at = Instant::now();
    let mut probes = 0;
    while paused_at.elapsed() < Duration::from_secs(5) {
        let sent = Instant::now();
        let (status, body) = system
            .post(
                "/v1/events",
                &serde_json::json!({ "userId": "probe", "messageId": format!("probe-{probes}"), "payload": {} }),
            )
            .await;
        let took = sent.elapsed();
        assert_eq!(status, 503, "no 202 while Redis is paused: {body}");
        assert!(
            took <= bound + Duration::from_millis(500),
            "503 took {took:?}, bound {bound:?}"
        );
        probes += 1;
    }
    // Taken before SIGCONT: Redis may answer, and the load record a 202,
    // before `kill` has exited and `resume` returned.
    let resumed_at = Instant::now();
    system.redis.server().resume().await;
    eprintln!("{probes} probes during the 5 s pause: all 503 within {bound:?}");

    let accepted = load.finish().await;
    let accepted_during_pause = accepted
        .iter()
        .filter(|a| {
            a.sent_at > paused_at + Duration::from_millis(100) && a.answered_at < resumed_at
        })
        .count();
    assert_eq!(
        accepted_during_pause, 0,
        "no 202 for a request sent during the pause"
    );
    system
        .assert_all_delivered(&accepted, Duration::from_secs(120))
        .await;
}

/// A write that timed out may still be queued on its Redis connection, and
/// lands when Redis answers again. The user's next events, each sent after
/// the previous one's 503 on a new HTTP connection (so on either gateway
/// worker), must land after it, in the order they were sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_writes_that_timed_out_land_in_the_order_they_were_sent() {
    let redis = RedisServer::start().await;
    let mut system = TestSystem::start_custom(redis, fault_destinations(), |_| {}).await;
    let user = "patient";
    let sent = 6;
    // Every worker has written before.
    for n in 0..4 {
        let body = serde_json::json!({ "userId": "warm", "payload": { "n": n } });
        assert_eq!(system.post_on_a_new_connection(&body).await, 202);
    }
    system.redis.server().pause().await;
    for n in 0..sent {
        let body = serde_json::json!({ "userId": user, "payload": { "n": n } });
        assert_eq!(
            system.post_on_a_new_connection(&body).await,
            503,
            "Redis is paused"
        );
    }
    let in_doubt = system.gateway_metrics().await;
    assert_eq!(in_doubt.value("gateway_shards_in_doubt", &[]), 1.0);
    system.redis.server().resume().await;
    system
        .assert_timed_out_writes_landed_in_order(user, sent)
        .await;
}

/// Whether the admin API shows a worker of `destination` as stalled and
/// waiting on `wait`.
async fn shows_stalled(system: &TestSystem, destination: &str, wait: &str) -> bool {
    let view = system.destination_view(destination).await;
    view["workers"].as_array().is_some_and(|workers| {
        workers
            .iter()
            .any(|w| w["state"] == "stalled" && w["waiting_on"].to_string().contains(wait))
    })
}

/// A worker that cannot record outcomes (Redis refuses XACK: an ACL
/// changed under the router) keeps its lease, since renewals still work,
/// yet delivers nothing more. It shows as stalled in the admin API and in
/// `router_stalled_workers`, naming what it waits on, and recovers once
/// Redis takes acknowledgements again (issue 27: a stall explains itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refusing_acknowledgements_shows_the_worker_stalled_naming_its_wait() {
    let redis = RedisServer::start().await;
    let mut system = TestSystem::start_custom(
        redis,
        vec![TestDestination::new("fast", "/ok/fast")],
        |_| {},
    )
    .await;
    system.start_router_with(|config| config.admin.stall_after_ms = 1000);
    system.wait_destinations_registered("fast").await;
    let acl = |change: &'static str| {
        let redis = &system.redis;
        async move {
            let mut con = redis.connection().await;
            redis::cmd("ACL")
                .arg("SETUSER")
                .arg("default")
                .arg(change)
                .query_async::<()>(&mut con)
                .await
                .expect("ACL SETUSER");
        }
    };
    system.send("first", serde_json::json!(1)).await;
    system
        .wait_delivered("fast", 1, Duration::from_secs(30))
        .await;
    assert!(!shows_stalled(&system, "fast", "").await);

    acl("-xack").await;
    system.send("stuck", serde_json::json!(2)).await;
    wait_for(
        "the worker to show as stalled, waiting to record an outcome",
        Duration::from_secs(30),
        || shows_stalled(&system, "fast", "recording an outcome in Redis"),
    )
    .await;
    let metrics = system.router_metrics().await;
    assert_eq!(
        metrics.value("router_stalled_workers", &[("destination", "fast")]),
        1.0
    );

    acl("+xack").await;
    wait_for(
        "the stall to end once Redis takes acknowledgements",
        Duration::from_secs(30),
        || async {
            !shows_stalled(&system, "fast", "").await
                && system
                    .router_metrics()
                    .await
                    .value("router_stalled_workers", &[("destination", "fast")])
                    == 0.0
                && system.destination_view("fast").await["pending"] == 0
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_gets_a_quick_503_with_retry_after_never_a_202() {
    let redis = RedisServer::start().await;
    let mut system = TestSystem::start_custom(redis, vec![], |_| {}).await;
    system.send("u", json!(1)).await;
    system.redis.server().stop().await;

    for _ in 0..3 {
        let started = Instant::now();
        let response = system
            .http
            .post(format!("{}/v1/events", system.gateway_url))
            .json(&json!({ "userId": "u", "payload": 2 }))
            .send()
            .await
            .expect("gateway answers");
        assert!(
            started.elapsed() <= Duration::from_secs(2),
            "answered in {:?}",
            started.elapsed()
        );
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"));
        let body: Value = response.json().await.expect("json error body");
        assert!(body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("unavailable"));
    }
    let ready = system
        .http
        .get(format!("{}/readyz", system.gateway_url))
        .send()
        .await
        .expect("answers");
    assert_eq!(ready.status(), 503);
    let alive = system
        .http
        .get(format!("{}/healthz", system.gateway_url))
        .send()
        .await
        .expect("answers");
    assert_eq!(alive.status(), 200);
}

/// Users keep posting numbered events, moving on after a 503, while Redis
/// is paused: writes of one shard in flight on several connections all time
/// out, and none may land behind a user's later events (the gateway refuses
/// a shard's writes while it is in doubt on more than one connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_refused_while_redis_is_paused_never_land_behind_later_ones() {
    let redis = RedisServer::start().await;
    let mut system = TestSystem::start_custom(redis, fault_destinations(), |_| {}).await;
    let load = HastyLoad::start(&system, 24);
    wait_for("some events accepted", Duration::from_secs(10), || async {
        system.stream_lengths().await >= 100
    })
    .await;
    system.redis.server().pause().await;
    let paused_at = Instant::now();
    while paused_at.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    system.redis.server().resume().await;
    system.assert_hasty_users_kept_their_order(load).await;
}

/// A write whose reply did not come in time is stored at most once on a
/// single server too (its connection never resends a command).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_timed_out_on_a_paused_redis_is_stored_at_most_once() {
    let redis: TestRedis = RedisServer::start().await.into();
    let writes = TimedOutWrites::connect(&redis, "timed-out-writes").await;
    let mut redis = redis;
    redis.server().pause().await;
    writes.send().await;
    redis.server().resume().await;
    let stored = writes.stored().await;
    eprintln!("{stored} of {TIMED_OUT_WRITES} timed-out writes stored");
    assert!(
        stored <= TIMED_OUT_WRITES,
        "{stored} stored: some more than once"
    );
}
