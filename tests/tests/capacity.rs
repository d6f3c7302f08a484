//! Capacity figures for the capacity plan in docs/scaling.md: how fast routers drain a backlog
//! on a Redis Cluster, and the CPU each router and each Redis master spends
//! per delivered event. A measurement, not a speed assertion: it checks only
//! that every event arrived in order, and prints the figures. Ignored in the
//! test suite; `scripts/capacity.sh` runs it on a release build.

use std::time::{Duration, Instant};

use e2e_tests::{wait_for, RedisCluster, RouterProcess, TestDestination, TestSystem};
use serde_json::json;

const USERS: usize = 1000;
const BATCH: usize = 100;

/// Posts `per_user` events for each user through `/v1/batch`, 16 requests
/// at a time; every user's events go in order. Returns the event ids.
async fn fill(system: &TestSystem, round: &str, per_user: usize) -> Vec<String> {
    let events: Vec<serde_json::Value> = (0..per_user)
        .flat_map(|seq| {
            (0..USERS).map(
                move |user| json!({"userId": format!("{round}-{user}"), "payload": {"seq": seq}}),
            )
        })
        .collect();
    let mut ids = Vec::with_capacity(events.len());
    // Batches of one sequence step at a time keep each user's events in order
    // across concurrent requests: step n+1 is posted after step n answered.
    for step in events.chunks(USERS) {
        let requests = step.chunks(BATCH).map(|batch| {
            let body = json!({ "events": batch });
            async move { system.post("/v1/batch", &body).await }
        });
        for (status, body) in futures_util::future::join_all(requests).await {
            assert_eq!(status, 202, "{body}");
            ids.extend(e2e_tests::batch_ids(&body));
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by scripts/capacity.sh on a release build"]
async fn cluster_drain_with_one_and_three_routers() {
    let per_user: usize = std::env::var("CAPACITY_EVENTS_PER_USER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let cluster = RedisCluster::start().await;
    let system = TestSystem::start_custom(
        cluster,
        vec![TestDestination::new("sink", "/ok/sink")],
        |_| {},
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = system.write_router_config(dir.path());
    let path = system.path_of("sink").to_owned();

    for routers in [1usize, 3] {
        let round = format!("r{routers}");
        let ids = fill(&system, &round, per_user).await;
        let cpu_before = system
            .redis
            .cluster()
            .expect("a cluster")
            .master_cpu_times()
            .await;
        let processes: Vec<RouterProcess> = (0..routers)
            .map(|i| {
                let name = format!("{round}-router-{i}");
                RouterProcess::start(&config, &name, &dir.path().join(format!("{name}.log")))
            })
            .collect();
        let started = Instant::now();
        // A cheap count while draining (the recorder is the sink's state too);
        // the full check once at the end.
        let target = system.recorder.delivered_count(&path) + ids.len();
        wait_for("the backlog to drain", Duration::from_secs(900), || async {
            system.recorder.delivered_count(&path) >= target
        })
        .await;
        let seconds = started.elapsed().as_secs_f64();
        assert_eq!(
            system
                .recorder
                .missing(&path, ids.iter().map(String::as_str)),
            0
        );
        let router_cpu: f64 = processes.iter().map(|p| p.cpu_time().as_secs_f64()).sum();
        let cpu_after = system
            .redis
            .cluster()
            .expect("a cluster")
            .master_cpu_times()
            .await;
        let master_cpu: Vec<f64> = cpu_after
            .iter()
            .map(|(port, after)| {
                (after.as_secs_f64() - cpu_before.get(port).map_or(0.0, Duration::as_secs_f64))
                    * 1e6
                    / ids.len() as f64
            })
            .collect();
        let verdict = system.verdict("sink", &[]);
        eprintln!(
            "CAPACITY {routers} router(s): {} events from {USERS} users in {seconds:.1} s = \
             {:.0} events/s; router CPU {:.1} µs/event (all routers, incl. start-up); \
             Redis master CPU per event (µs, each master): {master_cpu:.1?}; \
             order violations {}",
            ids.len(),
            ids.len() as f64 / seconds,
            router_cpu * 1e6 / ids.len() as f64,
            verdict.order_violations,
        );
        assert_eq!(verdict.order_violations, 0);
        // A clean stop hands the leases over at once to the next round.
        for process in processes {
            process.terminate(Duration::from_secs(30)).await;
        }
    }
}
