//! Operations through the router's admin listener and the metrics
//! endpoints, with real traffic: metrics, pause/resume, dead letters.

use std::collections::HashSet;
use std::time::Duration;

use e2e_tests::{holds_within, wait_for, RouterProcess, TestDestination, TestSystem};
use reqwest::Method;
use serde_json::{json, Value};

const PATIENCE: Duration = Duration::from_secs(30);

async fn wait_view(
    system: &TestSystem,
    destination: &str,
    what: &str,
    holds: impl Fn(&Value) -> bool,
) {
    let last = std::cell::RefCell::new(Value::Null);
    let held = holds_within(PATIENCE, || async {
        let view = system.destination_view(destination).await;
        let holds = holds(&view);
        *last.borrow_mut() = view;
        holds
    })
    .await;
    // The last view says which part never came true.
    assert!(
        held,
        "timed out after {PATIENCE:?} waiting for {destination}: {what}; its last view: {}",
        last.borrow()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_events_flow_and_fail() {
    let system = TestSystem::start(vec![
        TestDestination::new("ok", "/ok/metrics"),
        TestDestination::new("down", "/fail").retry(10, 20, 2),
    ])
    .await;
    system.send_numbered(4, 5).await;
    let (status, _) = system.post("/v1/events", &json!({ "payload": {} })).await;
    assert_eq!(status, 400, "an event without userId is rejected");

    system.wait_delivered("ok", 20, PATIENCE).await;
    // Counted after Redis has them: wait for both.
    wait_view(&system, "down", "20 dead letters", |v| {
        v["dead_letters"] == 20 && v["dead_lettered"] == 20
    })
    .await;

    let gateway = system.gateway_metrics().await;
    assert_eq!(
        gateway.value("gateway_events_total", &[("outcome", "accepted")]),
        20.0
    );
    assert_eq!(
        gateway.value(
            "gateway_requests_total",
            &[
                ("route", "/v1/events"),
                ("outcome", "rejected"),
                ("reason", "invalid")
            ]
        ),
        1.0
    );
    assert_eq!(
        gateway.value(
            "gateway_request_duration_seconds_count",
            &[("route", "/v1/events")]
        ),
        21.0
    );

    let router = system.router_metrics().await;
    let ok = [("destination", "ok")];
    let down = [("destination", "down")];
    assert_eq!(
        router.value("router_events_total", &[ok[0], ("outcome", "delivered")]),
        20.0
    );
    assert_eq!(router.value("router_end_to_end_seconds_count", &ok), 20.0);
    assert_eq!(router.value("router_retries_total", &ok), 0.0);
    assert_eq!(
        router.value(
            "router_events_total",
            &[down[0], ("outcome", "dead_lettered")]
        ),
        20.0
    );
    assert_eq!(router.value("router_retries_total", &down), 20.0);
    assert_eq!(
        router.value("router_attempt_duration_seconds_count", &down),
        40.0
    );
    assert_eq!(router.value("router_in_flight", &down), 0.0);
    assert_eq!(router.value("router_users_in_backoff", &down), 0.0);
    assert_eq!(router.value("router_dead_letters", &down), 20.0);
    assert_eq!(router.value("router_pending", &ok), 0.0);
    assert_eq!(router.value("router_lag", &ok), 0.0);
    // One router: it owns every (shard, destination) lease.
    assert_eq!(
        router.value("router_lease_owned", &[]),
        f64::from(e2e_tests::SHARDS) * 2.0
    );

    let view = system.destination_view("down").await;
    assert_eq!(view["dead_lettered"], 20);
    assert_eq!(view["retried"], 20);
    assert_eq!(view["last_error"]["status"], 500);
    let owners = view["owners"].as_array().expect("owners");
    assert_eq!(owners.len(), usize::from(e2e_tests::SHARDS));
    assert!(owners
        .iter()
        .all(|o| o.as_str().is_some_and(|o| o.starts_with("test-router#"))));
}

/// The overview costs Redis nothing while nobody looks: it is measured
/// when the API, the console or a scrape asks, at most once per interval
/// (100 ms here), not every interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_is_measured_when_asked_not_while_nobody_looks() {
    let system =
        TestSystem::start(vec![TestDestination::new("down", "/fail").retry(10, 20, 1)]).await;
    let sequence = |overview: &Value| overview["sequence"].as_u64().expect("a sequence");
    let first = sequence(&system.admin_get("/admin/destinations").await);
    // Ten intervals with nobody asking: a window of absence, not a wait.
    let idle = std::time::Instant::now();
    while idle.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after_idle = system.admin_get("/admin/destinations").await;
    assert_eq!(
        sequence(&after_idle),
        first + 1,
        "one measurement, for this request, after a second nobody asked: {after_idle}"
    );
    // A scrape is answered with gauges measured for it.
    system.send("user-1", json!({})).await;
    wait_for("the scrape to show the dead letter", PATIENCE, || async {
        system
            .router_metrics()
            .await
            .value("router_dead_letters", &[("destination", "down")])
            == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_destination_lags_while_others_deliver_and_catches_up_after_resume() {
    let system = TestSystem::start(vec![
        TestDestination::new("held", "/ok/held"),
        TestDestination::new("live", "/ok/live"),
    ])
    .await;
    let (status, body) = system
        .admin_call(Method::POST, "/admin/destinations/held/pause", None)
        .await;
    assert_eq!((status, body["paused"].clone()), (200, json!(true)));
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/nowhere/pause", None)
        .await;
    assert_eq!(status, 404);

    let accepted = system.send_numbered(10, 5).await;
    system.wait_delivered("live", 50, PATIENCE).await;
    wait_view(&system, "held", "all 50 events waiting", |v| {
        v["paused"] == true
            && v["lag"].as_u64().unwrap_or(0) + v["pending"].as_u64().unwrap_or(0) == 50
    })
    .await;
    assert_eq!(
        system.received("held").requests,
        0,
        "nothing sent while paused"
    );
    let metrics = system.router_metrics().await;
    assert_eq!(
        metrics.value("router_paused", &[("destination", "held")]),
        1.0
    );
    assert!(metrics.value("router_lag", &[("destination", "held")]) > 0.0);

    let (status, body) = system
        .admin_call(Method::POST, "/admin/destinations/held/resume", None)
        .await;
    assert_eq!((status, body["paused"].clone()), (200, json!(false)));
    system.wait_delivered("held", 50, PATIENCE).await;
    wait_view(&system, "held", "no lag and nothing pending", |v| {
        v["lag"] == 0 && v["pending"] == 0 && v["paused"] == false
    })
    .await;
    assert_eq!(
        system.delivered_per_user("held"),
        accepted,
        "per-user order"
    );
    assert_eq!(system.received("held").duplicates, 0);
}

/// A pause is kept in Redis: a router started while it holds sends
/// nothing, and the resume reaches it (the container test's "down with
/// events pending, then up", in-process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_outlives_a_router_restart_and_a_resume_then_delivers_everything() {
    let mut system = TestSystem::start(vec![
        TestDestination::new("held", "/ok/held"),
        TestDestination::new("live", "/ok/live"),
    ])
    .await;
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/held/pause", None)
        .await;
    assert_eq!(status, 200);
    let accepted = system.send_numbered(5, 10).await;
    system.wait_delivered("live", 50, PATIENCE).await;
    system.stop_router().await;
    system.start_router();
    system.wait_delivered("live", 50, PATIENCE).await;
    wait_view(
        &system,
        "held",
        "the restarted router to see the pause",
        |v| v["paused"] == true,
    )
    .await;
    assert_eq!(
        system.received("held").requests,
        0,
        "nothing sent while paused"
    );
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/held/resume", None)
        .await;
    assert_eq!(status, 200);
    system.wait_delivered("held", 50, PATIENCE).await;
    assert_eq!(
        system.delivered_per_user("held"),
        accepted,
        "per-user order"
    );
}

/// Every dead letter of `destination`, paging with `limit`.
async fn list_all(system: &TestSystem, destination: &str, limit: usize) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/admin/destinations/{destination}/dead-letters?limit={limit}");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let page = system.admin_get(&path).await;
        let letters = page["dead_letters"].as_array().expect("array").clone();
        assert!(letters.len() <= limit);
        all.extend(letters);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return all,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_in_user_order_then_removed() {
    let system = TestSystem::start(vec![
        TestDestination::new("crm", "/outage/crm").retry(10, 20, 2),
        TestDestination::new("other", "/ok/other"),
    ])
    .await;
    system.recorder.set_outage("/outage/crm", true);
    let accepted = system.send_numbered(3, 6).await;
    let accepted_ids: HashSet<&String> = accepted.values().flatten().collect();
    wait_view(&system, "crm", "18 dead letters", |v| {
        v["dead_letters"] == 18
    })
    .await;

    let letters = list_all(&system, "crm", 5).await;
    assert_eq!(letters.len(), 18);
    let ids: HashSet<&str> = letters
        .iter()
        .map(|l| l["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), 18, "pages do not overlap");
    let mut failed_at = 0;
    for letter in &letters {
        assert!(accepted_ids.contains(&letter["event_id"].as_str().expect("event id").to_owned()));
        assert!(letter["user_id"]
            .as_str()
            .expect("user")
            .starts_with("user-"));
        assert!(letter["payload"]["seq"].is_u64(), "{letter}");
        assert_eq!(letter["attempts"], 2);
        assert_eq!(letter["last_status"], 503);
        assert!(letter["last_error"]
            .as_str()
            .expect("error")
            .contains("503"));
        assert_eq!(letter["replaying"], false);
        let at = letter["failed_at_ms"].as_u64().expect("failed at");
        assert!(at >= failed_at, "listed oldest failure first");
        failed_at = at;
    }

    // Bad requests name what is wrong and change nothing.
    let replay = "/admin/destinations/crm/dead-letters/replay";
    for body in [
        json!({ "ids": ["1-2-3"], "from_ms": 1 }),
        json!({ "ids": ["nonsense"] }),
        json!({ "all": true }),
    ] {
        let (status, answer) = system.admin_call(Method::POST, replay, Some(&body)).await;
        assert_eq!(status, 400, "{body} → {answer}");
        assert!(answer["error"].is_string());
    }
    let (status, _) = system
        .admin_call(
            Method::POST,
            "/admin/destinations/nowhere/dead-letters/replay",
            None,
        )
        .await;
    assert_eq!(status, 404);

    system.recorder.set_outage("/outage/crm", false);
    // The two oldest first, by id; then everything else.
    let first: Vec<&str> = letters[..2]
        .iter()
        .map(|l| l["id"].as_str().expect("id"))
        .collect();
    let (status, report) = system
        .admin_call(Method::POST, replay, Some(&json!({ "ids": first })))
        .await;
    assert_eq!(
        (status, report["replayed"].clone()),
        (200, json!(2)),
        "{report}"
    );
    system.wait_delivered("crm", 2, PATIENCE).await;
    wait_view(&system, "crm", "16 dead letters left", |v| {
        v["dead_letters"] == 16
    })
    .await;

    let (status, report) = system.admin_call(Method::POST, replay, None).await;
    assert_eq!(
        (status, report["replayed"].clone()),
        (200, json!(16)),
        "{report}"
    );
    let (_, again) = system
        .admin_call(Method::POST, replay, Some(&json!({})))
        .await;
    assert_eq!(
        again["replayed"], 0,
        "a replay under way is not sent twice: {again}"
    );

    system.wait_delivered("crm", 18, PATIENCE).await;
    wait_view(&system, "crm", "no dead letters", |v| {
        v["dead_letters"] == 0 && v["pending"] == 0
    })
    .await;
    assert!(list_all(&system, "crm", 100).await.is_empty());
    // Replays keep the first event id, reach only this destination, and
    // keep each user's order.
    assert_eq!(system.delivered_per_user("crm"), accepted);
    assert_eq!(system.received("crm").duplicates, 0);
    assert_eq!(
        system.received("other").delivered,
        18,
        "the other destination got no replays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_deleted_one_at_a_time_or_all_at_once() {
    let system =
        TestSystem::start(vec![TestDestination::new("down", "/fail").retry(10, 20, 1)]).await;
    system.send_numbered(2, 3).await;
    wait_view(&system, "down", "6 dead letters", |v| {
        v["dead_letters"] == 6
    })
    .await;

    let letters = list_all(&system, "down", 100).await;
    let id = letters[0]["id"].as_str().expect("id");
    let path = format!("/admin/destinations/down/dead-letters/{id}");
    assert_eq!(system.admin_call(Method::DELETE, &path, None).await.0, 204);
    assert_eq!(system.admin_call(Method::DELETE, &path, None).await.0, 404);
    assert_eq!(list_all(&system, "down", 100).await.len(), 5);

    // A time range with nothing in it replays nothing.
    let future = json!({ "from_ms": u64::MAX - 1 });
    let (status, report) = system
        .admin_call(
            Method::POST,
            "/admin/destinations/down/dead-letters/replay",
            Some(&future),
        )
        .await;
    assert_eq!((status, report["replayed"].clone()), (200, json!(0)));

    let (status, purged) = system
        .admin_call(
            Method::DELETE,
            "/admin/destinations/down/dead-letters",
            None,
        )
        .await;
    assert_eq!((status, purged["deleted"].clone()), (200, json!(5)));
    assert!(list_all(&system, "down", 100).await.is_empty());
    wait_view(&system, "down", "no dead letters", |v| {
        v["dead_letters"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_left_out_of_the_config_stays_unless_unlisted_ones_are_removed() {
    let mut system = TestSystem::start(vec![
        TestDestination::new("crm", "/ok/crm"),
        TestDestination::new("old", "/ok/old"),
    ])
    .await;
    system.wait_destinations_registered("old").await;
    let restart = |system: &mut TestSystem, unlisted| {
        system.start_router_with(move |config| {
            config.destinations.retain(|d| d.name == "crm");
            config.unlisted_destinations = unlisted;
        })
    };
    system.stop_router().await;
    restart(&mut system, router::config::Unlisted::Keep);
    wait_admin(&system).await;
    // Kept: still defined, still delivered.
    let (status, view) = system
        .admin_call(Method::GET, "/admin/destinations/old", None)
        .await;
    assert_eq!(status, 200, "{view}");
    system.send("u", json!(1)).await;
    system.wait_delivered("old", 1, PATIENCE).await;

    system.stop_router().await;
    restart(&mut system, router::config::Unlisted::Remove);
    wait_admin(&system).await;
    let (status, _) = system
        .admin_call(Method::GET, "/admin/destinations/old", None)
        .await;
    assert_eq!(status, 404, "removed with its definition");
    assert_eq!(system.groups_of("old").await, 0, "and its groups");
    assert_eq!(
        system.groups_of("crm").await,
        usize::from(e2e_tests::SHARDS)
    );
    let (status, _) = system
        .admin_call(Method::DELETE, "/admin/destinations/old", None)
        .await;
    assert_eq!(status, 404, "nothing left to delete");
}

/// Waits until the (restarted) router's admin API answers.
async fn wait_admin(system: &TestSystem) {
    wait_for("the router's admin API", PATIENCE, || async {
        system
            .admin_call(Method::GET, "/admin/destinations", None)
            .await
            .0
            == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_one_event_per_attempt_with_its_fields() {
    let system =
        TestSystem::start_without_router(vec![TestDestination::new("flaky", "/flaky/1")]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = system.write_router_config(dir.path());
    let log = dir.path().join("router.log");
    // Deliveries that succeed are logged at debug; failures at info and up.
    let _router = RouterProcess::start_with_env(
        &config,
        "router",
        &log,
        &[
            ("ROUTER_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,router=debug"),
        ],
    );
    system.wait_destinations_registered("flaky").await;
    let id = system.send("alice", json!({ "n": 1 })).await;
    system.wait_delivered("flaky", 1, PATIENCE).await;

    let attempts = || -> Vec<Value> {
        std::fs::read_to_string(&log)
            .expect("log")
            .lines()
            .map(|line| {
                serde_json::from_str::<Value>(line)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
            })
            .filter(|line| {
                line["message"] == "Delivery attempt." && line["span"]["event_id"] == id.as_str()
            })
            .collect()
    };
    wait_for("both attempts logged", PATIENCE, || async {
        attempts().len() == 2
    })
    .await;
    let attempts = attempts();
    for (line, (attempt, outcome, status)) in attempts
        .iter()
        .zip([(1, "retry", 503), (2, "delivered", 200)])
    {
        // The delivery's identity is on its span, the attempt on the line.
        assert_eq!(line["span"]["user"], "alice");
        assert_eq!(line["span"]["destination"], "flaky");
        assert!(line["span"]["shard"].is_u64(), "{line}");
        assert_eq!(line["attempt"], attempt);
        assert_eq!(line["outcome"], outcome);
        assert_eq!(line["status"], status);
        assert!(line["latency_ms"].is_u64(), "{line}");
    }
    // Lease changes are logged as one line for all of them.
    wait_for("the lease changes logged", PATIENCE, || async {
        std::fs::read_to_string(&log)
            .expect("log")
            .lines()
            .any(|line| line.contains("\"Leases changed.\"") && line.contains("flaky: shards"))
    })
    .await;
}

/// A destination with `event_types` reads references (decision 0004): its
/// dead letters replay through the routing stage like any event, in each
/// user's order, and leave once delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_destinations_dead_letters_replay_through_the_routing_stage() {
    let system = TestSystem::start(vec![TestDestination::new("typed", "/outage/typed")
        .retry(10, 20, 2)
        .event_types(&["t"])])
    .await;
    system.recorder.set_outage("/outage/typed", true);
    let mut sent = Vec::new();
    for seq in 0..4 {
        for user in 0..3 {
            sent.push(system.send_typed(&format!("user-{user}"), "t").await);
        }
        // Not taken: never a dead letter.
        system.send_typed(&format!("user-{seq}"), "other").await;
    }
    wait_view(&system, "typed", "12 dead letters", |v| {
        v["dead_letters"] == 12
    })
    .await;
    system.recorder.set_outage("/outage/typed", false);
    let (status, report) = system
        .admin_call(
            Method::POST,
            "/admin/destinations/typed/dead-letters/replay",
            None,
        )
        .await;
    assert_eq!(
        (status, report["replayed"].clone()),
        (200, json!(12)),
        "{report}"
    );
    system.wait_delivered("typed", 12, PATIENCE).await;
    wait_view(&system, "typed", "no dead letters", |v| {
        v["dead_letters"] == 0 && v["pending"] == 0
    })
    .await;
    let received = system.received("typed");
    assert_eq!(received.order_violations, 0, "{received:?}");
    let delivered: HashSet<String> = system
        .recorder
        .summary("/outage/typed")
        .events
        .into_iter()
        .filter(|event| event.status == 200)
        .map(|event| event.id)
        .collect();
    assert_eq!(delivered.len(), 12, "each replayed once: {delivered:?}");
}
