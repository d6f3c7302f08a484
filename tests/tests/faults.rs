//! Fault injection with real processes: routers and redis-server are
//! killed, paused and restarted while users send numbered events. Each test
//! checks, per destination, that every event the gateway answered 202 for
//! was delivered (missing = 0) in per-user order, and prints duplicates
//! (allowed: delivery is at-least-once).

use std::time::{Duration, Instant};

use e2e_tests::{
    fault_destinations, spawn_hostile_server, wait_for, Load, Misbehaviour, RedisServer,
    RouterProcess, TestDestination, TestSystem, SHARDS,
};

/// Every leased pair of [`fault_destinations`]: each (shard, destination)
/// and each shard's routing stage.
const PAIRS: usize = SHARDS as usize * 5;

/// `FAULT_USERS` × `FAULT_EVENTS_PER_USER` (default 40 × 50) and
/// `FAULT_ROUTER_KILLS` (default 3) scale the router-kill test up for the
/// long run reported in docs/guarantees.md.
fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn wait_fast_delivered(system: &TestSystem, count: usize) {
    system
        .wait_delivered("fast", count, Duration::from_secs(600))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_three_times_loses_nothing_and_keeps_order() {
    let system = TestSystem::start_without_router(fault_destinations()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = system.write_router_config(dir.path());
    let (users, per_user) = (
        env_or("FAULT_USERS", 40),
        env_or("FAULT_EVENTS_PER_USER", 50),
    );
    let kills = env_or("FAULT_ROUTER_KILLS", 3);
    let total = users * per_user;
    let started = Instant::now();

    let load = Load::start(&system, users, per_user);
    let mut router = RouterProcess::start(&config, "router", &dir.path().join("router-0.log"));
    for kill in 1..=kills {
        wait_fast_delivered(&system, total * kill / (kills + 2)).await;
        router.kill();
        eprintln!(
            "SIGKILL {kill} after {} events delivered to fast",
            system.received("fast").unique
        );
        let log = dir.path().join(format!("router-{kill}.log"));
        router = RouterProcess::start(&config, "router", &log);
    }
    let accepted = load.finish().await;
    assert_eq!(accepted.len(), total);
    system
        .assert_all_delivered(&accepted, Duration::from_secs(600))
        .await;
    eprintln!(
        "{total} events, {kills} router kills, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(router);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_router_takes_over_within_the_lease_time_when_one_is_killed() {
    let system = TestSystem::start_without_router(fault_destinations()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = system.write_router_config(dir.path());
    let ttl = Duration::from_millis(system.router_config().lease.ttl_ms);

    let a = RouterProcess::start(&config, "router-a", &dir.path().join("a.log"));
    let b = RouterProcess::start(&config, "router-b", &dir.path().join("b.log"));
    wait_for(
        "both routers to hold an even share",
        Duration::from_secs(20),
        || async {
            let (held_a, held_b) = (
                system.leases_held_by("router-a").await,
                system.leases_held_by("router-b").await,
            );
            held_a + held_b == PAIRS && held_a.abs_diff(held_b) <= 1
        },
    )
    .await;

    let (users, per_user) = (40, 50);
    let load = Load::start(&system, users, per_user);
    wait_fast_delivered(&system, users * per_user / 3).await;
    a.kill();
    let killed_at = Instant::now();
    // Expiry of A's leases and heartbeat, plus one renewal round of B.
    wait_for(
        "router B to hold every lease",
        ttl + Duration::from_secs(1),
        || async { system.leases_held_by("router-b").await == PAIRS },
    )
    .await;
    eprintln!(
        "router B held every lease {} ms after router A was killed (lease ttl {} ms)",
        killed_at.elapsed().as_millis(),
        ttl.as_millis()
    );

    let accepted = load.finish().await;
    system
        .assert_all_delivered(&accepted, Duration::from_secs(120))
        .await;
    for destination in ["fast", "slow", "flaky", "typed"] {
        assert_eq!(
            system.consumers(destination).await,
            ["router-b"],
            "{destination}: the dead router's consumers were claimed and removed"
        );
    }
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_hands_leases_over_without_waiting_for_expiry() {
    let system = TestSystem::start_without_router(fault_destinations()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = system.write_router_config(dir.path());
    // Long leases: a takeover in less than this proves A released them.
    let ttl_ms = 10_000;
    let env = [("ROUTER_LEASE__TTL_MS", "10000")];
    let a = RouterProcess::start_with_env(&config, "router-a", &dir.path().join("a.log"), &env);
    wait_for(
        "router A to hold every lease",
        Duration::from_secs(20),
        || async { system.leases_held_by("router-a").await == PAIRS },
    )
    .await;

    let (users, per_user) = (40, 50);
    let load = Load::start(&system, users, per_user);
    wait_fast_delivered(&system, users * per_user / 4).await;
    let b = RouterProcess::start_with_env(&config, "router-b", &dir.path().join("b.log"), &env);
    wait_for(
        "A to hand half the leases to B",
        Duration::from_secs(20),
        || async { system.leases_held_by("router-b").await >= PAIRS / 2 },
    )
    .await;

    let status = a.terminate(Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "router A exits cleanly on SIGTERM: {status}"
    );
    let exited_at = Instant::now();
    wait_for(
        "router B to hold every lease",
        Duration::from_secs(3),
        || async { system.leases_held_by("router-b").await == PAIRS },
    )
    .await;
    eprintln!(
        "router B held every lease {} ms after router A exited (lease ttl {ttl_ms} ms)",
        exited_at.elapsed().as_millis()
    );

    let accepted = load.finish().await;
    system
        .assert_all_delivered(&accepted, Duration::from_secs(120))
        .await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_destinations_are_retried_then_dead_lettered_and_others_unaffected() {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    // Without the breaker: each failure is to reach its dead letter, which
    // an open circuit would hold back.
    let hostile = |name: &str, url: String| {
        TestDestination::new(name, &url)
            .retry(20, 100, 3)
            .timeout_ms(500)
            .without_breaker()
    };
    let destinations = vec![
        TestDestination::new("healthy", "/ok/healthy"),
        hostile("refused", format!("http://127.0.0.1:{closed_port}/hook")),
        hostile(
            "reset",
            spawn_hostile_server(Misbehaviour::ResetMidResponse).await,
        ),
        hostile("garbage", spawn_hostile_server(Misbehaviour::Garbage).await),
        hostile("hang", "/hang".into()),
        hostile("huge", "/huge/20000000".into()),
    ];
    let system = TestSystem::start(destinations).await;
    let (users, per_user) = (10, 5);
    let total = system.post_concurrently(users, per_user).await;

    system
        .wait_delivered("healthy", total, Duration::from_secs(30))
        .await;
    let hang_dead = system.dead_letters("hang").await.len();
    assert!(
        hang_dead < total,
        "healthy finished while the hanging destination was still retrying ({hang_dead} dead)"
    );
    for name in ["refused", "reset", "garbage", "hang", "huge"] {
        let what = format!("every event dead-lettered for {name}");
        wait_for(&what, Duration::from_secs(120), || async {
            system.dead_letters(name).await.len() >= total
        })
        .await;
        let letters = system.dead_letters(name).await;
        assert_eq!(
            letters.len(),
            total,
            "{name}: each event dead-lettered once"
        );
        for letter in &letters {
            assert_eq!(letter["attempts"], "3", "{name}: retried as configured");
            assert!(
                !letter["last_error"].is_empty(),
                "{name}: the error is kept"
            );
        }
        eprintln!("{name}: {}", letters[0]["last_error"]);
        assert_eq!(system.pending(name).await, 0);
    }
    // A huge answer is read only up to its limit, and its status is kept.
    // (Some attempts may time out instead on a loaded machine; not all.)
    let huge = system.dead_letters("huge").await;
    assert!(
        huge.iter().any(|letter| letter["last_status"] == "500"),
        "huge: a 500 with a 20 MB body is recorded as a 500: {:?}",
        huge.iter().map(|l| &l["last_status"]).collect::<Vec<_>>()
    );
    assert_eq!(system.received("healthy").order_violations, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_cap_answers_503_while_a_destination_is_down_then_everything_drains() {
    let cap = 40;
    let destinations = vec![
        TestDestination::new("fast", "/ok/fast"),
        TestDestination::new("down", "/outage/down").retry(20, 200, 100_000),
    ];
    let mut system = TestSystem::start_custom(RedisServer::start().await, destinations, |g| {
        g.backlog.max_events_per_shard = cap;
        g.backlog.check_interval_ms = 20;
    })
    .await;
    system.recorder.set_outage("/outage/down", true);
    system.start_router();

    let (users, per_user) = (20, 50);
    let load = Load::start(&system, users, per_user);
    wait_for(
        "the backlog cap to refuse events",
        Duration::from_secs(60),
        || async { load.unavailable_count() >= 100 },
    )
    .await;
    let longest = system.longest_stream().await;
    let accepted_while_capped = load.accepted_count();
    eprintln!(
        "capped: longest shard stream {longest} (cap {cap}), {accepted_while_capped} accepted, {} refused",
        load.unavailable_count()
    );
    // The gateway re-measures every 20 ms, so a stream passes its cap by
    // what arrives in one interval, more when a loaded machine stretches
    // the interval; without the cap a shard would hold its share of the
    // 1,000 events.
    assert!(
        longest <= 2 * cap,
        "a shard stream holds {longest}, cap {cap}"
    );
    assert!(
        accepted_while_capped < users * per_user,
        "the cap held events back"
    );

    system.recorder.set_outage("/outage/down", false);
    let accepted = load.finish().await;
    system
        .assert_all_delivered(&accepted, Duration::from_secs(120))
        .await;
    wait_for("streams trimmed empty", Duration::from_secs(10), || async {
        system.stream_lengths().await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_never_removes_what_the_slower_group_has_not_acknowledged() {
    let destinations = vec![
        TestDestination::new("fast", "/ok/fast"),
        TestDestination::new("slow", "/slow/20/slow").max_concurrency(2),
    ];
    let mut system = TestSystem::start_without_router(destinations).await;
    // A small window keeps most of the slow group's backlog unread in the
    // stream rather than in the router's memory, where trimming would bite.
    system.start_router_with(|config| config.reader.window = 5);
    let (users, per_user) = (20, 30);
    let load = Load::start(&system, users, per_user);
    wait_for(
        "trimming while the slow group lags",
        Duration::from_secs(60),
        || async {
            let accepted = load.accepted_count() as u64;
            let slow = system.received("slow").unique as u64;
            let length = system.stream_lengths().await;
            slow < accepted && 0 < length && length < accepted
        },
    )
    .await;

    let accepted = load.finish().await;
    system
        .assert_all_delivered(&accepted, Duration::from_secs(120))
        .await;
    wait_for("streams trimmed empty", Duration::from_secs(10), || async {
        system.stream_lengths().await == 0
    })
    .await;
}

/// A destination defined through a router with a longer lease times its
/// attempts longer than another router's lease is sure to last. An attempt
/// starts only when the lease covers its timeout, so on that router it used
/// to wait for good, holding its concurrency slot and its bytes (issue 27,
/// wait 3); its attempts now time out within that router's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_longer_than_this_routers_lease_still_goes_out() {
    let mut system = TestSystem::start(vec![TestDestination::new("crm", "/ok/crm")]).await;
    system.wait_destinations_registered("crm").await;
    system.stop_router().await;
    // A lease of 2 s covers attempts of 1.4 s (less margin and two
    // renewals); crm's definition, made above, says 2 s.
    let short = system.start_extra_router("short-lease", |config| {
        config.lease.ttl_ms = 2_000;
        config.destinations.clear();
    });
    system.send_numbered(10, 3).await;
    system
        .wait_delivered("crm", 30, Duration::from_secs(20))
        .await;
    assert_eq!(system.received("crm").order_violations, 0);
    short.stop().await;
}

/// A delivery-log record Redis refuses must not cost the delivery: the
/// XACK and the records share one round trip, and a refused record used to
/// fail the whole write, so the job retried its acknowledgement for good and
/// the user's next event never started (issue 27, wait 4). Here every log
/// key of the destination is a string, so each record's XADD is refused
/// (WRONGTYPE) as `maxmemory` would refuse it, while the XACK applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_delivery_log_record_never_holds_up_an_acknowledgement() {
    let mut system =
        TestSystem::start_without_router(vec![TestDestination::new("crm", "/ok/crm")]).await;
    {
        let mut con = system.redis.connection().await;
        for shard in 0..e2e_tests::SHARDS {
            let key = system.keys.delivery_log(shard, "crm");
            redis::cmd("SET")
                .arg(&key)
                .arg("not a stream")
                .query_async::<()>(&mut con)
                .await
                .expect("SET");
        }
    }
    system.start_router();
    let accepted = system.send_numbered(4, 5).await;
    system
        .wait_delivered("crm", 20, Duration::from_secs(20))
        .await;
    wait_for("nothing pending", Duration::from_secs(10), || async {
        system.pending("crm").await == 0
    })
    .await;
    assert_eq!(system.received("crm").order_violations, 0);
    assert_eq!(system.received("crm").duplicates, 0, "{accepted:?}");
}
