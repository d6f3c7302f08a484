//! Acceptance tests of delivery: order, retries, dead letters, isolation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e_tests::{users_in_one_shard, TestDestination, TestSystem};
use serde_json::json;

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("fits")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_every_destination_once_in_per_user_order() {
    let destinations = ["crm", "warehouse", "analytics"]
        .map(|name| TestDestination::new(name, &format!("/ok/{name}")));
    let system = TestSystem::start(destinations.to_vec()).await;

    let total = system.post_concurrently(200, 50).await;
    assert_eq!(total, 10_000);

    for name in ["crm", "warehouse", "analytics"] {
        system
            .wait_delivered(name, total, Duration::from_secs(180))
            .await;
        let received = system.received(name);
        assert_eq!(received.unique, total, "{name}: every event");
        // Exactly once, but for an attempt the router saw fail (a timeout
        // on a loaded machine) after the destination had taken it: each
        // duplicate needs a retried attempt.
        let retried = system.destination_view(name).await["retried"]
            .as_u64()
            .expect("retried in the destination view");
        let duplicates = received.delivered - total;
        assert!(
            duplicates as u64 <= retried,
            "{name}: {duplicates} duplicates with {retried} retried attempts"
        );
        assert_eq!(received.order_violations, 0, "{name}: per-user order");
        let users: std::collections::HashSet<&str> =
            received.events.iter().map(|e| e.user.as_str()).collect();
        assert_eq!(users.len(), 200, "{name}: every user");
    }
    // One router delivering steadily keeps every lease it took (its
    // renewals, one script per shard, are each answered for every lease).
    let refused = system
        .router_metrics()
        .await
        .value("router_leases_lost_total", &[("reason", "refused")]);
    assert_eq!(refused, 0.0, "leases whose renewal was refused");
    for name in ["crm", "warehouse", "analytics"] {
        e2e_tests::wait_for(
            "pending lists to empty",
            Duration::from_secs(10),
            || async { system.pending(name).await == 0 },
        )
        .await;
    }
    // Outcomes that finish while an acknowledgement is being written go
    // together in the next one (router/src/worker/acks.rs).
    let xacks = system.command_calls("xack").await;
    let deliveries = u64::try_from(3 * total).expect("fits");
    eprintln!("{xacks} XACK commands for {deliveries} deliveries");
    assert!(
        xacks < deliveries,
        "{xacks} XACK commands for {deliveries} deliveries: acknowledgements are not grouped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_attempts_are_retried_with_doubling_delays_in_order() {
    let flaky = TestDestination::new("flaky", "/flaky/3").retry(100, 5000, 8);
    let system = TestSystem::start(vec![flaky]).await;

    let total = system.post_concurrently(10, 4).await;
    system
        .wait_delivered("flaky", total, Duration::from_secs(60))
        .await;

    let received = system.received("flaky");
    assert_eq!(received.unique, total);
    assert_eq!(received.order_violations, 0);
    assert_eq!(
        received.requests,
        total * 4,
        "3 failures and 1 success per event"
    );

    let first_id = received.events[0].id.clone();
    let times: Vec<u64> = received
        .events
        .iter()
        .filter(|e| e.id == first_id)
        .map(|e| e.at_ms)
        .collect();
    assert_eq!(times.len(), 4);
    // Lower bounds only: a busy machine can stretch a delay, never shorten
    // it (`retry.rs`'s unit tests pin the exact schedule).
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (retry, gap) in gaps.iter().enumerate() {
        let at_least = 95 << retry;
        assert!(
            *gap >= at_least,
            "delay {retry} should be at least {at_least} ms (doubling from 100 ms): {gaps:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_failing_destination_dead_letters_everything_and_others_get_all() {
    let system = TestSystem::start(vec![
        // Without the breaker: this counts every attempt of a destination
        // failing them all (its circuit would open and hold the events).
        TestDestination::new("broken", "/fail")
            .retry(5, 50, 3)
            .without_breaker(),
        TestDestination::new("healthy", "/ok"),
    ])
    .await;

    let total = system.post_concurrently(20, 5).await;
    system
        .wait_delivered("healthy", total, Duration::from_secs(60))
        .await;
    e2e_tests::wait_for(
        "every event dead-lettered",
        Duration::from_secs(60),
        || async { system.dead_letters("broken").await.len() == total },
    )
    .await;

    let letters = system.dead_letters("broken").await;
    for letter in &letters {
        assert_eq!(letter["attempts"], "3");
        assert_eq!(letter["last_status"], "500");
        assert!(letter["last_error"].contains("500"), "{letter:?}");
        assert_eq!(letter["destination"], "broken");
        assert!(
            letter["payload"].contains("seq"),
            "the event itself is kept: {letter:?}"
        );
    }
    assert_eq!(system.received("broken").requests, total * 3);
    assert_eq!(system.received("healthy").order_violations, 0);
    e2e_tests::wait_for("nothing pending", Duration::from_secs(10), || async {
        system.pending("broken").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_rejection_is_dead_lettered_after_one_attempt() {
    let system = TestSystem::start(vec![TestDestination::new("strict", "/bad-request")]).await;

    let total = system.post_concurrently(5, 4).await;
    e2e_tests::wait_for(
        "every event dead-lettered",
        Duration::from_secs(30),
        || async { system.dead_letters("strict").await.len() == total },
    )
    .await;

    assert!(system
        .dead_letters("strict")
        .await
        .iter()
        .all(|l| l["attempts"] == "1" && l["last_status"] == "400"));
    assert_eq!(
        system.received("strict").requests,
        total,
        "no retries of a 400"
    );
}

/// Sends 200 events of 20 users one after another; the median time the
/// gateway took to answer, and once all reached `fast`, the median
/// end-to-end latency there (both in ms).
async fn ingest_and_delivery_medians(system: &TestSystem) -> (f64, f64) {
    let mut ingest_ms = Vec::new();
    for i in 0..200 {
        let started = std::time::Instant::now();
        system
            .send(&format!("user-{}", i % 20), json!({ "seq": i }))
            .await;
        ingest_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    system
        .wait_delivered("fast", 200, Duration::from_secs(30))
        .await;
    let mut latencies: Vec<f64> = system
        .received("fast")
        .events
        .iter()
        .filter_map(|e| e.latency_ms)
        .map(|ms| ms as f64)
        .collect();
    latencies.sort_by(f64::total_cmp);
    ingest_ms.sort_by(f64::total_cmp);
    (
        ingest_ms[ingest_ms.len() / 2],
        latencies[latencies.len() / 2],
    )
}

/// Compared with the same load on a system without the slow destination,
/// measured in the same test: within 3 × that baseline plus 20 ms (a
/// stalled destination holding others up would add seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_destination_does_not_delay_other_destinations_or_ingestion() {
    let baseline = TestSystem::start(vec![TestDestination::new("fast", "/ok")]).await;
    let (ingest_alone, delivery_alone) = ingest_and_delivery_medians(&baseline).await;
    drop(baseline);

    let system = TestSystem::start(vec![
        TestDestination::new("slow", "/slow/5000")
            .timeout_ms(10_000)
            .max_concurrency(4),
        TestDestination::new("fast", "/ok"),
    ])
    .await;
    let (ingest, delivery) = ingest_and_delivery_medians(&system).await;
    eprintln!(
        "medians: ingest {ingest:.1} ms (alone {ingest_alone:.1}), fast delivery {delivery:.1} ms \
         (alone {delivery_alone:.1})"
    );
    assert!(
        delivery <= 3.0 * delivery_alone + 20.0,
        "fast destination median end-to-end latency {delivery} ms, {delivery_alone} ms without the slow one"
    );
    assert!(
        ingest <= 3.0 * ingest_alone + 20.0,
        "ingest median {ingest} ms while a destination stalls, {ingest_alone} ms without it"
    );
    assert!(
        system.received("slow").unique < 200,
        "the slow destination is indeed behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_in_retry_holds_back_only_that_user() {
    let system = TestSystem::start(vec![
        TestDestination::new("scripted", "/scripted").retry(100, 1000, 10)
    ])
    .await;
    let (stuck, flowing) = users_in_one_shard();

    let fail_until = now_ms() + 2000;
    system
        .send(&stuck, json!({ "failUntil": fail_until }))
        .await;
    system
        .send(&stuck, json!({ "after": "the failing one" }))
        .await;
    for seq in 0..10 {
        system.send(&flowing, json!({ "seq": seq })).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    system
        .wait_delivered("scripted", 12, Duration::from_secs(20))
        .await;

    let received = system.received("scripted");
    assert_eq!(received.order_violations, 0);
    let first_stuck_success = received
        .events
        .iter()
        .find(|e| e.user == stuck && e.status == 200)
        .expect("stuck user delivered eventually")
        .at_ms;
    assert!(first_stuck_success >= fail_until);
    let flowing_during_failure = received
        .events
        .iter()
        .filter(|e| e.user == flowing && e.at_ms < fail_until)
        .count();
    assert_eq!(
        flowing_during_failure, 10,
        "the other user's events flowed while the first was failing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_message_id_is_accepted_once_and_delivered_once() {
    let system = TestSystem::start(vec![TestDestination::new("crm", "/ok")]).await;
    let event = json!({ "userId": "u1", "messageId": "order-42", "payload": { "total": 10 } });

    let (first_status, first) = system.post("/v1/events", &event).await;
    let (second_status, second) = system.post("/v1/events", &event).await;
    assert_eq!((first_status, second_status), (202, 202));
    assert_eq!(first["id"], second["id"]);
    assert_eq!(second["duplicate"], true);

    // The Idempotency-Key header works the same way.
    let keyed = |key: &str| {
        system
            .http
            .post(format!("{}/v1/events", system.gateway_url))
            .header("idempotency-key", key)
            .json(&json!({ "userId": "u1", "payload": 1 }))
            .send()
    };
    let a: serde_json::Value = keyed("k-1")
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    let b: serde_json::Value = keyed("k-1")
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    assert_eq!(a["id"], b["id"]);

    // A later event of the same user arrives after any duplicate would have.
    let sentinel = system.send("u1", json!("sentinel")).await;
    e2e_tests::wait_for("the sentinel", Duration::from_secs(10), || async {
        system
            .received("crm")
            .events
            .iter()
            .any(|e| e.id == sentinel)
    })
    .await;
    let received = system.received("crm");
    assert_eq!(
        received.delivered, 3,
        "order-42, k-1 and the sentinel, once each"
    );
    // Stored once each (the trimmer may already have removed them).
    assert_eq!(system.entries_added().await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_filtered_to_one_destination_skip_the_others() {
    let system = TestSystem::start(vec![
        TestDestination::new("crm", "/ok/crm"),
        TestDestination::new("billing", "/ok/billing"),
    ])
    .await;
    system.wait_destinations_registered("billing").await;
    let (status, _) = system
        .post(
            "/v1/events",
            &json!({ "userId": "u", "payload": 0, "destinations": ["billing"] }),
        )
        .await;
    assert_eq!(status, 202);
    system.send("u", json!("for everyone")).await;

    system
        .wait_delivered("crm", 1, Duration::from_secs(10))
        .await;
    system
        .wait_delivered("billing", 2, Duration::from_secs(10))
        .await;
    e2e_tests::wait_for(
        "filtered entry acknowledged",
        Duration::from_secs(10),
        || async { system.pending("crm").await == 0 },
    )
    .await;
    assert_eq!(
        system.received("crm").unique,
        1,
        "crm got only the unfiltered event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_accepted_before_the_router_first_starts_are_delivered() {
    let mut system =
        TestSystem::start_without_router(vec![TestDestination::new("crm", "/ok")]).await;
    for seq in 0..20 {
        system.send("early-user", json!({ "seq": seq })).await;
    }
    system.start_router();
    system
        .wait_delivered("crm", 20, Duration::from_secs(20))
        .await;
    assert_eq!(system.received("crm").order_violations, 0);
    system.stop_router().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_consumer_group_is_recreated_and_delivery_continues() {
    let system = TestSystem::start(vec![TestDestination::new("crm", "/ok")]).await;
    system.send("u", json!(0)).await;
    system
        .wait_delivered("crm", 1, Duration::from_secs(10))
        .await;

    // As after a Redis restart without data, or a mistaken XGROUP DESTROY.
    let mut con = system.redis.connection().await;
    for shard in 0..e2e_tests::SHARDS {
        let _: i64 = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(system.keys.events(shard))
            .arg("crm")
            .query_async(&mut con)
            .await
            .expect("XGROUP DESTROY works");
    }
    for seq in 1..=5 {
        system.send("u", json!(seq)).await;
    }
    system
        .wait_delivered("crm", 6, Duration::from_secs(20))
        .await;
    assert_eq!(system.received("crm").order_violations, 0);
}
