//! Delivery policies under outages: the retry horizon, the circuit breaker,
//! per-destination rate limits and 429 pauses.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e_tests::{wait_for, TestDestination, TestSystem};
use protocol::EventId;
use reqwest::Method;
use router::config::BreakerConfig;
use serde_json::json;

/// A breaker that decides quickly enough for a test.
fn quick_breaker() -> BreakerConfig {
    BreakerConfig {
        enabled: true,
        window_ms: 2_000,
        min_attempts: 20,
        failure_percent: 90,
        probe_interval_ms: 1_000,
    }
}

async fn breaker_state(system: &TestSystem, destination: &str) -> String {
    let view = system.destination_view(destination).await;
    view["breaker"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_ends_in_delivery_with_probes_only_while_the_circuit_is_open() {
    let system = TestSystem::start(vec![
        TestDestination::new("outage", "/outage/crm")
            .retry_for(10, 1_000, 60_000)
            .max_concurrency(8)
            .breaker(quick_breaker()),
        TestDestination::new("healthy", "/ok/healthy"),
    ])
    .await;
    system.recorder.set_outage("/outage/crm", true);
    let outage_started = protocol::unix_millis();
    let total = system.post_concurrently(100, 10).await;
    wait_for("the circuit to open", Duration::from_secs(20), || async {
        breaker_state(&system, "outage").await == "open"
    })
    .await;
    let opened_at_ms = protocol::unix_millis();
    // The other destination is not held up by this one's open circuit.
    system
        .wait_delivered("healthy", total, Duration::from_secs(30))
        .await;
    assert_ne!(breaker_state(&system, "outage").await, "closed");

    // Some seconds of outage with the circuit open: probes only.
    wait_for("8 s of open circuit", Duration::from_secs(20), || async {
        protocol::unix_millis() >= opened_at_ms + 8_000
    })
    .await;
    let while_open = system
        .recorder
        .summary("/outage/crm")
        .events
        .iter()
        .filter(|event| event.at_ms > opened_at_ms + 500)
        .count();
    // One probe a second, each possibly racing with another attempt's
    // verdict: far from the thousands 1,000 retrying events would send.
    assert!(
        while_open <= 16,
        "{while_open} attempts while the circuit was open"
    );
    let before_open = system
        .recorder
        .summary("/outage/crm")
        .events
        .iter()
        .filter(|event| event.at_ms >= outage_started && event.at_ms <= opened_at_ms)
        .count();

    system.recorder.set_outage("/outage/crm", false);
    system
        .wait_delivered("outage", total, Duration::from_secs(60))
        .await;
    let received = system.recorder.summary("/outage/crm");
    assert_eq!(received.order_violations, 0, "per-user order");
    assert!(
        system.dead_letters("outage").await.is_empty(),
        "nothing dead-lettered"
    );
    wait_for("the circuit to close", Duration::from_secs(10), || async {
        breaker_state(&system, "outage").await == "closed"
    })
    .await;
    eprintln!(
        "outage: {before_open} attempts until the circuit opened, {while_open} while open, \
         {} requests in all for {total} events",
        received.requests
    );
}

/// A destination that refuses each event's first attempt and accepts its
/// retry, under the default breaker and retry policy. A burst of first
/// attempts opens the circuit (here for certain: the router starts on the
/// burst); its probe must go to an event already attempted, whose retry
/// succeeds, or the circuit never closes (issue 33: 0 of 4,000 delivered,
/// for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_accepts_retries_is_never_wedged_by_its_circuit() {
    let mut system =
        TestSystem::start_without_router(vec![
            TestDestination::new("first-refused", "/flaky/1").default_retry()
        ])
        .await;
    let total = system.post_concurrently(200, 20).await;
    let load_ended = std::time::Instant::now();
    system.start_router();
    wait_for("the circuit to open", Duration::from_secs(20), || async {
        breaker_state(&system, "first-refused").await != "closed"
    })
    .await;
    system
        .wait_delivered("first-refused", total, Duration::from_secs(30))
        .await;
    let received = system.recorder.summary("/flaky/1");
    eprintln!(
        "first attempt refused: {total} events delivered {:.1} s after the load ended, \
         {} requests",
        load_ended.elapsed().as_secs_f64(),
        received.requests,
    );
    assert_eq!(received.order_violations, 0, "per-user order");
    assert!(system.dead_letters("first-refused").await.is_empty());
}

/// Events waiting behind an open circuit, or for a paused destination,
/// still expire at the destination's `max_age_ms`, each user's in order
/// (issue 32: behind an open circuit, 192 of 200 events were still pending
/// 15 s after a 3 s age limit; a paused destination's never expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_waiting_behind_an_open_circuit_or_a_pause_expire_at_their_age() {
    let max_age_ms = 3_000;
    let system = TestSystem::start(vec![
        TestDestination::new("down", "/outage/down")
            .retry_for(10, 1_000, 3_600_000)
            .breaker(quick_breaker())
            .max_age_ms(max_age_ms),
        TestDestination::new("paused", "/ok/paused").max_age_ms(max_age_ms),
    ])
    .await;
    system.recorder.set_outage("/outage/down", true);
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/paused/pause", None)
        .await;
    assert_eq!(status, 200);
    let total = system.post_concurrently(20, 10).await;
    let posted = Instant::now();
    wait_for("the circuit to open", Duration::from_secs(10), || async {
        breaker_state(&system, "down").await != "closed"
    })
    .await;
    for destination in ["down", "paused"] {
        // The age limit, plus room for a slow machine: without it applying
        // at the gates, a few events a second expire (one per probe) or none.
        wait_for(
            &format!("every event of {destination} to expire into its dead letters"),
            Duration::from_millis(max_age_ms) + Duration::from_secs(7),
            || async { system.dead_letters(destination).await.len() == total },
        )
        .await;
        eprintln!(
            "{destination}: all {total} events dead-lettered {} ms after the last was posted (max_age_ms {max_age_ms})",
            posted.elapsed().as_millis()
        );
        let mut newest_per_user: BTreeMap<String, EventId> = BTreeMap::new();
        for letter in system.dead_letters(destination).await {
            assert!(letter["last_error"].starts_with("expired"), "{letter:?}");
            let id: EventId = letter["event_id"].parse().expect("an event id");
            let newest = newest_per_user.entry(letter["user"].clone()).or_insert(id);
            assert!(
                *newest <= id,
                "{destination}: {id} dead-lettered after {newest}"
            );
            *newest = id;
        }
        assert_eq!(system.pending(destination).await, 0);
    }
    assert_eq!(
        system.received("paused").requests,
        0,
        "nothing sent while paused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_failing_past_the_horizon_is_dead_lettered_with_its_attempts() {
    // Without the breaker: this counts every attempt of a destination
    // failing them all, which an open circuit would hold.
    let system = TestSystem::start(vec![TestDestination::new("down", "/fail")
        .retry_for(100, 400, 2_000)
        .without_breaker()])
    .await;
    system.send("u", json!(1)).await;
    wait_for("a dead letter", Duration::from_secs(20), || async {
        system.dead_letters("down").await.len() == 1
    })
    .await;
    let letter = &system.dead_letters("down").await[0];
    let attempts: u32 = letter["attempts"].parse().expect("attempts");
    let received = system.recorder.summary("/fail");
    assert_eq!(usize::try_from(attempts).ok(), Some(received.requests));
    // 100, 200, 400, 400 … ms apart: the last attempt lands on the 2 s horizon.
    let first = received.events.first().expect("attempts").at_ms;
    let last = received.events.last().expect("attempts").at_ms;
    assert!(attempts >= 5, "{attempts} attempts");
    assert!(
        last - first >= 1_900,
        "attempts spanned {} ms",
        last - first
    );
    assert!(last - first < 3_000, "attempts spanned {} ms", last - first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_together_keep_to_the_destinations_rate_limit() {
    let system = TestSystem::start(vec![
        TestDestination::new("limited", "/ok/limited").rate_limit_per_sec(200)
    ])
    .await;
    let second = system.start_extra_router("router-b", |_| {});
    wait_for("both routers deliver", Duration::from_secs(20), || async {
        system.leases_held_by("test-router").await > 0
            && system.leases_held_by("router-b").await > 0
    })
    .await;
    let total = system.post_concurrently(100, 20).await;
    system
        .wait_delivered("limited", total, Duration::from_secs(60))
        .await;
    let mut arrivals: Vec<u64> = system
        .recorder
        .summary("/ok/limited")
        .events
        .iter()
        .map(|event| event.at_ms)
        .collect();
    arrivals.sort_unstable();
    // Every 5 s window holds at most 200 × 5 requests, +10 %.
    let mut busiest = 0;
    for (i, start) in arrivals.iter().enumerate() {
        let in_window = arrivals[i..]
            .iter()
            .take_while(|at| **at < start + 5_000)
            .count();
        busiest = busiest.max(in_window);
    }
    let seconds = (arrivals[arrivals.len() - 1] - arrivals[0]) as f64 / 1000.0;
    eprintln!(
        "rate limit 200/s: busiest 5 s window {busiest} requests, {total} in {seconds:.1} s ({:.0}/s)",
        total as f64 / seconds
    );
    assert!(busiest <= 1_100, "busiest 5 s window: {busiest} requests");
    // And it is a limit, not a crawl: the routers kept close to it.
    assert!(
        total as f64 / seconds >= 150.0,
        "{total} requests in {seconds:.1} s"
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_pauses_the_whole_destination() {
    // Delays may reach 5 s, so a Retry-After of 2 s is not clamped.
    let system = TestSystem::start(vec![
        TestDestination::new("throttled", "/throttle/2").retry(10, 5_000, 5)
    ])
    .await;
    system.recorder.set_outage("/throttle/2", true);
    system.send("first-user", json!(1)).await;
    wait_for("the 429", Duration::from_secs(10), || async {
        system.recorder.summary("/throttle/2").requests == 1
    })
    .await;
    let refused_at = system.recorder.summary("/throttle/2").events[0].at_ms;
    system.recorder.set_outage("/throttle/2", false);
    // Other users' events wait out the same 2 s.
    system.send_numbered(5, 2).await;
    system
        .wait_delivered("throttled", 11, Duration::from_secs(20))
        .await;
    let received = system.recorder.summary("/throttle/2");
    let earliest_after = received.events[1..]
        .iter()
        .map(|event| event.at_ms)
        .min()
        .expect("later attempts");
    assert!(
        earliest_after >= refused_at + 1_900,
        "an attempt went {} ms after the 429 asked for 2 s",
        earliest_after - refused_at
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_log_shows_each_attempt_and_forgets_after_its_retention() {
    let mut system = TestSystem::start_without_router(vec![
        TestDestination::new("flaky", "/flaky/2"),
        TestDestination::new("orders", "/ok/orders").event_types(&["order.*"]),
    ])
    .await;
    system.start_router_with(|config| config.delivery_log.retention_hours = 3.0 / 3600.0);
    let first = system.send("alice", json!({ "n": 1 })).await;
    let second = system.send("alice", json!({ "n": 2 })).await;
    system
        .wait_delivered("flaky", 2, Duration::from_secs(20))
        .await;
    // Done everywhere, the events leave their stream: what follows comes
    // from the log alone.
    wait_for("the stream trimmed", Duration::from_secs(10), || async {
        system.stream_lengths().await == 0
    })
    .await;
    let path = format!("/admin/events/{first}");
    let log = system.admin_get(&path).await;
    let at = |name: &str| -> serde_json::Value {
        log["destinations"]
            .as_array()
            .and_then(|all| all.iter().find(|d| d["destination"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {log}"))
    };
    let flaky = at("flaky");
    assert_eq!(flaky["state"], "delivered", "{log}");
    let attempts = flaky["attempts"].as_array().expect("attempts");
    let summary: Vec<(u64, u64, &str)> = attempts
        .iter()
        .map(|a| {
            (
                a["attempt"].as_u64().unwrap_or(0),
                a["status"].as_u64().unwrap_or(0),
                a["outcome"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [(1, 503, "retry"), (2, 503, "retry"), (3, 200, "delivered")],
        "{log}"
    );
    assert!(attempts[0]["error"]
        .as_str()
        .is_some_and(|e| e.contains("503")));
    assert_eq!(at("orders")["state"], "filtered", "no eventType: {log}");
    assert_eq!(log["user_id"], "alice");

    // A user's recent events, newest first.
    let listed = system.admin_get("/admin/users/alice/events?limit=10").await;
    let ids: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    assert_eq!(ids, [second.as_str(), first.as_str()], "{listed}");

    // Past its retention (3 s here) the log is trimmed; the delivered event
    // left its stream long before.
    wait_for(
        "the log to forget the event",
        Duration::from_secs(20),
        || async { system.admin_call(reqwest::Method::GET, &path, None).await.0 == 404 },
    )
    .await;
}
