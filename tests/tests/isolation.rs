//! Acceptance tests of isolation between users under adversarial load:
//! parking (a hot or failing user cannot hold up the users of its shard)
//! and the byte budget (router memory bounded in bytes, not entries).

use std::collections::HashMap;
use std::time::Duration;

use e2e_tests::{
    batch_ids, free_local_address, post_event_until_accepted, post_typed_event, wait_for,
    RouterProcess, TestDestination, TestSystem, SHARDS,
};
use serde_json::{json, Value};

/// `count` users named `<prefix>N` whose events land in `of`'s shard.
fn users_sharing_shard_of(of: &str, count: usize, prefix: &str) -> Vec<String> {
    let shard = protocol::shard_for(of, SHARDS);
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|user| protocol::shard_for(user, SHARDS) == shard)
        .take(count)
        .collect()
}

/// The `eventType` of the events posted here: a destination taking
/// `order.*` reads references (decision 0004).
const ORDER_EVENT: &str = "order.created";

/// Posts `payloads` as `user`'s events, in order, in batches; returns their ids.
async fn post_in_order(system: &TestSystem, user: &str, payloads: Vec<Value>) -> Vec<String> {
    let mut ids = Vec::new();
    for chunk in payloads.chunks(500) {
        let events: Vec<Value> = chunk
            .iter()
            .map(|payload| json!({ "userId": user, "payload": payload, "eventType": ORDER_EVENT }))
            .collect();
        let (status, body) = system.post("/v1/batch", &json!({ "events": events })).await;
        assert_eq!(status, 202, "batch rejected: {body}");
        ids.extend(batch_ids(&body));
    }
    ids
}

/// Posts `per_user` events (`{"seq": n}`) for each user, users at once and
/// each in order; returns each user's ids in acceptance order.
async fn post_users(
    system: &TestSystem,
    users: &[String],
    per_user: usize,
) -> HashMap<String, Vec<String>> {
    let mut posters = tokio::task::JoinSet::new();
    for user in users {
        let (http, url, user) = (
            system.http.clone(),
            system.gateway_url.clone(),
            user.clone(),
        );
        posters.spawn(async move {
            let mut ids = Vec::new();
            for seq in 0..per_user {
                ids.push(
                    post_typed_event(&http, &url, &user, Some(ORDER_EVENT), json!({ "seq": seq }))
                        .await,
                );
            }
            (user, ids)
        });
    }
    let mut accepted = HashMap::new();
    while let Some(result) = posters.join_next().await {
        let (user, ids) = result.expect("every event accepted");
        accepted.insert(user, ids);
    }
    accepted
}

/// Milliseconds from acceptance to arrival of the deliveries to `users`,
/// sorted.
fn latencies(system: &TestSystem, destination: &str, users: &[String]) -> Vec<u64> {
    let mut latencies: Vec<u64> = system
        .received(destination)
        .events
        .iter()
        .filter(|e| (200..300).contains(&e.status) && users.contains(&e.user))
        .map(|e| e.latency_ms.expect("every delivery carries receivedAt"))
        .collect();
    latencies.sort_unstable();
    latencies
}

fn p99(sorted: &[u64]) -> u64 {
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

/// Each user's deliveries are its accepted events, in order; an event
/// delivered again right after itself (at-least-once: an attempt that timed
/// out, or a crash before the ack) counts once.
fn assert_delivered_in_order(
    system: &TestSystem,
    destination: &str,
    accepted: &HashMap<String, Vec<String>>,
) {
    let delivered = system.delivered_per_user(destination);
    for (user, ids) in accepted {
        let mut unique = delivered.get(user).cloned().unwrap_or_default();
        unique.dedup();
        assert_eq!(&unique, ids, "{user}: all, in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_3000_refused_events_delays_no_user_of_its_shard_beyond_2_s() {
    // Three attempts 20 and 40 ms apart, then a dead letter: about 100 ms a
    // refused event, so 3,000 of them take minutes to work through. It
    // takes `order.*` events, so it reads references (decision 0004).
    let crm = TestDestination::new("crm", "/scripted")
        .retry(20, 40, 3)
        .event_types(&["order.*"]);
    let system = TestSystem::start(vec![crm]).await;
    let refused: Vec<Value> = (0..3000)
        .map(|seq| json!({ "seq": seq, "failUntil": u64::MAX }))
        .collect();
    let hot_ids = post_in_order(&system, "hot0", refused).await;

    let others = users_sharing_shard_of("hot0", 100, "user-");
    let accepted = post_users(&system, &others, 10).await;
    system
        .wait_delivered("crm", 1000, Duration::from_secs(30))
        .await;
    let slowest = *latencies(&system, "crm", &others)
        .last()
        .expect("deliveries");
    eprintln!("1,000 events of 100 users behind 3,000 refused ones: slowest {slowest} ms");
    assert!(
        slowest <= 2000,
        "delivered within 2 s of acceptance, slowest {slowest} ms"
    );
    assert_delivered_in_order(&system, "crm", &accepted);
    assert_eq!(system.received("crm").duplicates, 0);

    // Operators see the parked user.
    let view = system.destination_view("crm").await;
    assert_eq!(view["parked_users"], 1, "{view}");
    let parked = view["parked_events"].as_u64().expect("a count");
    assert!(parked > 2500, "the hot user's backlog is parked: {view}");
    let metrics = system.router_metrics().await;
    assert!(metrics.value("router_parked_events", &[("destination", "crm")]) > 2500.0);

    // The hot user's events are dead-lettered in acceptance order, each
    // after its three attempts.
    wait_for("40 dead letters", Duration::from_secs(60), || async {
        system.dead_letters("crm").await.len() >= 40
    })
    .await;
    let letters = system.dead_letters("crm").await;
    let dead_ids: Vec<&str> = letters.iter().map(|l| l["event_id"].as_str()).collect();
    let expected: Vec<&str> = hot_ids[..dead_ids.len()]
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(dead_ids, expected, "dead-lettered in order");
    assert!(
        letters.iter().all(|l| l["attempts"] == "3"),
        "each after 3 attempts"
    );
    assert!(
        !system.delivered_per_user("crm").contains_key("hot0"),
        "nothing of the hot user was answered 2xx"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_user_with_5000_events_to_a_5_ms_destination_leaves_the_others_latency_as_it_was() {
    let crm = TestDestination::new("crm", "/slow/5");
    let system = TestSystem::start(vec![crm]).await;

    // Warm up (leases taken, connections open), then the run without the hot user.
    post_users(&system, &users_sharing_shard_of("hot1", 50, "warm-"), 1).await;
    system
        .wait_delivered("crm", 50, Duration::from_secs(60))
        .await;
    let baseline_users = users_sharing_shard_of("hot1", 50, "quiet-");
    post_users(&system, &baseline_users, 10).await;
    system
        .wait_delivered("crm", 50 + 500, Duration::from_secs(60))
        .await;
    let baseline = p99(&latencies(&system, "crm", &baseline_users));

    let hot: Vec<Value> = (0..5000).map(|seq| json!({ "seq": seq })).collect();
    let hot_ids = post_in_order(&system, "hot1", hot).await;
    // The reader has gone past the hot user's backlog: it waits parked.
    wait_for(
        "the hot user's backlog parked",
        Duration::from_secs(30),
        || async {
            system.destination_view("crm").await["parked_events"]
                .as_u64()
                .is_some_and(|parked| parked > 3000)
        },
    )
    .await;
    let others = users_sharing_shard_of("hot1", 50, "user-");
    let accepted = post_users(&system, &others, 10).await;
    system
        .wait_delivered("crm", 50 + 500 + 500, Duration::from_secs(60))
        .await;
    wait_for(
        "the other users' events",
        Duration::from_secs(60),
        || async { latencies(&system, "crm", &others).len() == 500 },
    )
    .await;
    let beside_hot = p99(&latencies(&system, "crm", &others));
    let hot_delivered = system
        .delivered_per_user("crm")
        .get("hot1")
        .map_or(0, Vec::len);
    eprintln!(
        "p99 of 500 events of 50 users of the shard: {baseline} ms alone, {beside_hot} ms \
         beside a hot user with 5,000 events ({hot_delivered} of them delivered so far)"
    );
    assert!(hot_delivered < 5000, "the hot user is still draining");
    // 2×, or 500 ms more on a 2-core machine that runs other tests at the
    // same time (one CI run: 399 ms against 187 ms). Without parking the
    // others wait behind the hot user's backlog: 5 ms × thousands, seconds.
    assert!(
        beside_hot <= (2 * baseline).max(baseline + 500),
        "p99 {beside_hot} ms beside the hot user, {baseline} ms without"
    );
    assert_delivered_in_order(&system, "crm", &accepted);

    system
        .wait_delivered("crm", 50 + 1000 + 5000, Duration::from_secs(240))
        .await;
    let delivered = system.delivered_per_user("crm");
    assert_eq!(
        delivered.get("hot1"),
        Some(&hot_ids),
        "the hot user: all, once, in order"
    );
    wait_for("nothing parked", Duration::from_secs(10), || async {
        system.destination_view("crm").await["parked_events"] == 0
    })
    .await;
}

/// Starts a router child process whose admin listener `system` talks to.
fn start_router_process(
    system: &mut TestSystem,
    dir: &std::path::Path,
    log: &str,
) -> RouterProcess {
    let config = system.write_router_config(dir);
    let admin = free_local_address();
    system.admin_url = Some(format!("http://{admin}"));
    RouterProcess::start_with_env(
        &config,
        "router",
        &dir.join(log),
        &[("ROUTER_ADMIN__LISTEN", &admin)],
    )
}

/// A number in the admin view of `destination`, `None` while the router
/// does not answer.
async fn count_of(system: &TestSystem, destination: &str, field: &str) -> Option<u64> {
    system.try_destination_view(destination).await?[field].as_u64()
}

/// Posts `count` events of `bytes` each, one per user, and returns the ids
/// per user.
async fn post_large(
    system: &TestSystem,
    count: usize,
    bytes: usize,
) -> HashMap<String, Vec<String>> {
    let filler = "x".repeat(bytes);
    let mut accepted = HashMap::new();
    let mut posting = tokio::task::JoinSet::new();
    for n in 0..count {
        let (http, url, filler) = (
            system.http.clone(),
            system.gateway_url.clone(),
            filler.clone(),
        );
        posting.spawn(async move {
            let user = format!("user-{n}");
            let payload = json!({ "filler": filler });
            // Megabyte writes on a loaded machine may outlast the gateway's
            // Redis timeout: retried as a client would.
            let id =
                post_event_until_accepted(&http, &url, &user, &format!("large-{n}"), payload).await;
            (user, id)
        });
        if posting.len() >= 8 {
            let (user, id) = posting
                .join_next()
                .await
                .expect("a poster")
                .expect("accepted");
            accepted.insert(user, vec![id]);
        }
    }
    while let Some(result) = posting.join_next().await {
        let (user, id) = result.expect("accepted");
        accepted.insert(user, vec![id]);
    }
    accepted
}

/// Large events wait for a destination that does not answer; the router's
/// peak RSS stays within its byte budget (the default 64 MiB) plus 100 MB,
/// and everything is delivered once it answers.
async fn large_events_stay_within_the_byte_budget(count: usize, bytes: usize) {
    let stalled = TestDestination::new("crm", "/stall/crm").retry(10, 500, 1_000_000);
    let mut system = TestSystem::start_without_router(vec![stalled]).await;
    system.recorder.set_outage("/stall/crm", true);
    let accepted = post_large(&system, count, bytes).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let router = start_router_process(&mut system, dir.path(), "router.log");
    // Every worker has read as far as its budget lets it and its attempts
    // hang; once the first of them time out, entries have gone round once.
    wait_for("attempts in flight", Duration::from_secs(60), || async {
        count_of(&system, "crm", "in_flight")
            .await
            .is_some_and(|n| n >= 16)
    })
    .await;
    wait_for("the first timeouts", Duration::from_secs(30), || async {
        count_of(&system, "crm", "retried")
            .await
            .is_some_and(|n| n >= 1)
    })
    .await;
    let peak = router.peak_rss_bytes();
    let budget = router::Config::defaults().reader.max_bytes as u64;
    eprintln!(
        "{count} events of {} KiB pending: router peak RSS {} MiB (budget {} MiB)",
        bytes / 1024,
        peak >> 20,
        budget >> 20
    );
    assert!(
        peak <= budget + 100_000_000,
        "peak RSS {} MiB exceeds the budget plus 100 MB",
        peak >> 20
    );

    system.recorder.set_outage("/stall/crm", false);
    system
        .wait_delivered("crm", count, Duration::from_secs(300))
        .await;
    assert_delivered_in_order(&system, "crm", &accepted);
    drop(router);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_memory_stays_within_the_byte_budget_with_2000_events_of_400_kb_pending() {
    large_events_stay_within_the_byte_budget(2000, 400 * 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_memory_stays_within_the_byte_budget_with_200_events_of_1_mib_pending() {
    // The gateway's body limit is 1 MiB for the whole request.
    large_events_stay_within_the_byte_budget(200, 1024 * 1024 - 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_twice_while_thousands_of_entries_are_parked_loses_and_reorders_nothing() {
    // It takes `order.*` events, so it reads references (decision 0004).
    let crm = TestDestination::new("crm", "/scripted")
        .retry(1, 2, 1000)
        .event_types(&["order.*"]);
    let mut system = TestSystem::start_without_router(vec![crm]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut router = start_router_process(&mut system, dir.path(), "router-0.log");
    system.wait_destinations_registered("crm").await;

    // Each of the hot user's events fails its first 20 attempts.
    let hot: Vec<Value> = (0..1500)
        .map(|seq| json!({ "seq": seq, "failAttempts": 20 }))
        .collect();
    let mut accepted = HashMap::new();
    accepted.insert("hot2".to_owned(), post_in_order(&system, "hot2", hot).await);
    // The other users of the shard, behind the hot user's backlog.
    let others = users_sharing_shard_of("hot2", 20, "user-");
    accepted.extend(post_users(&system, &others, 20).await);

    for kill in 1..=2 {
        wait_for("a thousand parked", Duration::from_secs(60), || async {
            count_of(&system, "crm", "parked_events")
                .await
                .is_some_and(|parked| parked > 1000)
        })
        .await;
        router.kill();
        eprintln!(
            "SIGKILL {kill}: {} events delivered so far",
            system.received("crm").unique
        );
        router = start_router_process(&mut system, dir.path(), &format!("router-{kill}.log"));
    }
    let total = 1500 + 20 * 20;
    system
        .wait_delivered("crm", total, Duration::from_secs(600))
        .await;
    let received = system.received("crm");
    eprintln!(
        "{total} events delivered, {} duplicates after 2 kills",
        received.duplicates
    );
    assert_eq!(received.order_violations, 0);
    assert_delivered_in_order(&system, "crm", &accepted);
    drop(router);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_events_expire_in_order_and_events_for_other_destinations_wait_for_none() {
    // crm refuses everything until it expires (max_age_ms); billing takes all.
    let crm = TestDestination::new("crm", "/scripted/crm")
        .retry(50, 100, 1_000_000)
        .max_age_ms(3000);
    let billing = TestDestination::new("billing", "/ok/billing");
    let system = TestSystem::start(vec![crm, billing]).await;
    system.wait_destinations_registered("billing").await;
    // Every third event is for billing only: crm acknowledges it at once
    // instead of parking it behind the user's refused head.
    let events: Vec<Value> = (0..600)
        .map(|seq| {
            let mut event = json!({
                "userId": "hot3",
                "payload": { "seq": seq, "failUntil": u64::MAX },
            });
            if seq % 3 == 2 {
                event["destinations"] = json!(["billing"]);
            }
            event
        })
        .collect();
    let mut ids = Vec::new();
    for chunk in events.chunks(300) {
        let (status, body) = system.post("/v1/batch", &json!({ "events": chunk })).await;
        assert_eq!(status, 202, "{body}");
        ids.extend(batch_ids(&body));
    }
    let for_crm: Vec<&str> = ids
        .iter()
        .enumerate()
        .filter(|(seq, _)| seq % 3 != 2)
        .map(|(_, id)| id.as_str())
        .collect();

    wait_for("parked events", Duration::from_secs(20), || async {
        count_of(&system, "crm", "parked_events")
            .await
            .is_some_and(|parked| parked > 100)
    })
    .await;
    // Billing's events wait for no crm event: crm has acknowledged them all.
    wait_for(
        "billing's 200 events filtered out",
        Duration::from_secs(20),
        || async { count_of(&system, "crm", "filtered").await == Some(200) },
    )
    .await;
    assert!(
        system.dead_letters("crm").await.is_empty(),
        "filtered out while the user's head still waits for its retries"
    );
    system
        .wait_delivered("billing", 600, Duration::from_secs(30))
        .await;

    wait_for(
        "every crm event dead-lettered",
        Duration::from_secs(60),
        || async { system.dead_letters("crm").await.len() == for_crm.len() },
    )
    .await;
    let letters = system.dead_letters("crm").await;
    let dead: Vec<&str> = letters.iter().map(|l| l["event_id"].as_str()).collect();
    assert_eq!(dead, for_crm, "dead-lettered in acceptance order");
    assert!(letters
        .iter()
        .all(|l| l["last_error"].starts_with("expired")));
    wait_for(
        "nothing parked or pending",
        Duration::from_secs(10),
        || async {
            count_of(&system, "crm", "parked_events").await == Some(0)
                && system.pending("crm").await == 0
        },
    )
    .await;
}
