//! Seeded chaos on a Redis Cluster (issue 27): a cluster with two replicas
//! per master (the gateway waiting for both), two routers run as child
//! processes, the gateway, two destinations and users posting throughout.
//! Faults come one at a time, each bounded, in an order and on targets the
//! seed chooses:
//!
//! - a master SIGSTOPped past the node timeout (its replica may take over);
//! - a master SIGKILLed, its replica promoted, then restarted as a replica;
//! - a router SIGKILLed and restarted;
//! - a router SIGSTOPped past its lease;
//! - destination `x` down (503 to everything);
//! - destination `y` hanging past its attempt timeout.
//!
//! After each fault the system must recover: the two routers hold every
//! lease between them and both destinations deliver again. Once the load
//! stops, every accepted event must reach both destinations within
//! [`DRAIN_BOUND`], in per-user order, and the shard streams must hold
//! every user's events in the order sent (a consumer group that never
//! reads keeps the trimmer from removing any).
//!
//! Faults come in rounds, each kind once per round in the seed's order,
//! until `EVD_CHAOS_SECONDS` (default 60: two rounds, about 2 minutes in
//! all) have passed. `EVD_CHAOS_SEED` picks the seed (default 1).
//! `scripts/soak.sh` runs it with any seed for longer; results in
//! docs/guarantees.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e_tests::{
    holds_within, wait_for, Accepted, Load, RedisCluster, RouterProcess, TestDestination,
    TestSystem, SHARDS,
};
use protocol::EventId;

/// Users posting throughout, one event every [`PACE`] each at most.
const USERS: usize = 20;
const PACE: Duration = Duration::from_millis(20);
/// From the load's end until every accepted event must have arrived.
const DRAIN_BOUND: Duration = Duration::from_secs(120);
/// How long the system may take to recover from one fault.
const RECOVERY_BOUND: Duration = Duration::from_secs(60);
/// The routers' lease (`TestSystem::router_config`): a router paused
/// longer than this loses its leases.
const LEASE_TTL: Duration = Duration::from_millis(3000);
const ROUTERS: [&str; 2] = ["chaos-a", "chaos-b"];
/// A consumer group no destination owns and nothing reads, created before
/// the first event: the trimmer keeps everything above it.
const KEEP_GROUP: &str = "chaos-keeps-every-entry";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    PauseMaster,
    KillMaster,
    KillRouter,
    PauseRouter,
    DestinationDown,
    DestinationHangs,
}

const FAULTS: [Fault; 6] = [
    Fault::PauseMaster,
    Fault::KillMaster,
    Fault::KillRouter,
    Fault::PauseRouter,
    Fault::DestinationDown,
    Fault::DestinationHangs,
];

fn destinations() -> Vec<TestDestination> {
    // Retries without an attempt limit (for an hour), so that no outage
    // here ends in dead letters; the breaker at its defaults.
    vec![
        TestDestination::new("x", "/outage/x").retry_for(10, 1000, 3_600_000),
        TestDestination::new("y", "/stall/y")
            .timeout_ms(1000)
            .retry_for(10, 1000, 3_600_000),
    ]
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |value| {
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, not {value:?}"))
    })
}

/// The two routers, each a child process that a fault may kill or pause.
struct Routers {
    config: PathBuf,
    dir: PathBuf,
    running: [Option<RouterProcess>; 2],
    starts: usize,
}

impl Routers {
    fn start(config: &Path, dir: &Path) -> Self {
        let mut routers = Self {
            config: config.to_owned(),
            dir: dir.to_owned(),
            running: [None, None],
            starts: 0,
        };
        for index in 0..ROUTERS.len() {
            routers.start_one(index);
        }
        routers
    }

    fn start_one(&mut self, index: usize) {
        self.starts += 1;
        let name = ROUTERS[index];
        let log = self.dir.join(format!("{name}-{}.log", self.starts));
        self.running[index] = Some(RouterProcess::start(&self.config, name, &log));
    }

    fn get(&self, index: usize) -> &RouterProcess {
        self.running[index].as_ref().expect("the router runs")
    }

    fn kill(&mut self, index: usize) {
        self.running[index].take().expect("the router runs").kill();
    }
}

/// One fault as it happened.
struct Injected {
    fault: Fault,
    target: String,
    held: Duration,
    recovered_in: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_a_cluster_loses_and_reorders_nothing() {
    let seed = env_u64("EVD_CHAOS_SEED", 1);
    let seconds = env_u64("EVD_CHAOS_SECONDS", 60);
    eprintln!("chaos seed {seed} (EVD_CHAOS_SEED), faults for at least {seconds} s");
    let mut rng = fastrand::Rng::with_seed(seed);

    let cluster = RedisCluster::start_with_replicas(2).await;
    let mut system = TestSystem::start_custom(cluster, destinations(), |gateway| {
        // An event is acknowledged once every replica of its master has
        // it. With one of two, a master paused past the node timeout loses
        // writes it takes in the moment after it resumes, before it learns
        // that its replica took over: the other replica still follows it
        // and confirms them (seen in 3 of 4 runs; docs/guarantees.md).
        gateway.replication.min_replicas = 2;
        gateway.replication.timeout_ms = 500;
    })
    .await;
    keep_every_entry(&system).await;
    // Odd seeds (CI's 1) give every reader the shard's shared wake-up, even
    // ones a blocking read of its own (decision 0004): both ways of reading
    // go through the faults.
    let shared = seed % 2 == 1;
    if shared {
        system.own_connections = Some(0);
    }
    eprintln!(
        "readers: {}",
        if shared {
            "shared wake-up per shard"
        } else {
            "a blocking read of their own"
        }
    );
    // The routers' logs outlive the test where EVD_CHAOS_LOGS points.
    let dir = tempfile::tempdir().expect("temp dir");
    let logs =
        std::env::var_os("EVD_CHAOS_LOGS").map_or_else(|| dir.path().to_owned(), PathBuf::from);
    std::fs::create_dir_all(&logs).expect("the log directory");
    let config = system.write_router_config(dir.path());
    let mut routers = Routers::start(&config, &logs);
    wait_leases_held(&system).await;

    let load = Load::until_stopped(&system, USERS, PACE);
    let started = Instant::now();
    let mut injected = Vec::new();
    let mut order = FAULTS;
    loop {
        rng.shuffle(&mut order);
        for fault in order {
            let hold = Duration::from_millis(rng.u64(2000..=5000));
            eprintln!(
                "{:>6.1} s  {fault:?} begins",
                started.elapsed().as_secs_f64()
            );
            let target = inject(fault, hold, &mut rng, &mut system, &mut routers).await;
            let healed = Instant::now();
            wait_recovered(&system).await;
            let recovered_in = healed.elapsed();
            let cluster = system.redis.cluster().expect("a cluster");
            eprintln!(
                "{:>6.1} s  {fault:?} on {target}, held {} ms, recovered in {} ms; \
                 replicas per master: {:?}",
                started.elapsed().as_secs_f64(),
                hold.as_millis(),
                recovered_in.as_millis(),
                cluster.replicas_per_master().await
            );
            injected.push(Injected {
                fault,
                target,
                held: hold,
                recovered_in,
            });
            // A quiet moment between faults.
            tokio::time::sleep(Duration::from_millis(rng.u64(500..=2000))).await;
        }
        if started.elapsed() >= Duration::from_secs(seconds) {
            break;
        }
    }
    let accepted = load.stop().await;
    let stopped = Instant::now();
    let all_arrived = || async {
        ["x", "y"].iter().all(|destination| {
            let ids = accepted.iter().map(|a| a.id.as_str());
            system.recorder.missing(system.path_of(destination), ids) == 0
        })
    };
    if !holds_within(DRAIN_BOUND, all_arrived).await {
        describe_missing(&system, &accepted, started).await;
    }
    system.assert_all_delivered(&accepted, Duration::ZERO).await;
    let drained_in = stopped.elapsed();
    let users: Vec<String> = (0..USERS).map(|user| format!("user-{user}")).collect();
    let behind = system.stored_out_of_user_order(&users).await;
    let slowest = injected
        .iter()
        .max_by_key(|i| i.recovered_in)
        .expect("some fault");
    eprintln!(
        "seed {seed}: {} faults in {:.0} s, {} events accepted, all delivered to both \
         destinations {} ms after the load stopped; slowest recovery {} ms ({:?} on {}, \
         held {} ms); stored out of user order: {behind}",
        injected.len(),
        started.elapsed().as_secs_f64(),
        accepted.len(),
        drained_in.as_millis(),
        slowest.recovered_in.as_millis(),
        slowest.fault,
        slowest.target,
        slowest.held.as_millis(),
    );
    assert_eq!(behind, 0, "events stored out of per-user order");
    drop(routers);
}

/// Creates [`KEEP_GROUP`] on every shard stream, at its start.
async fn keep_every_entry(system: &TestSystem) {
    let mut con = system.redis.connection().await;
    for shard in 0..SHARDS {
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(system.keys.events(shard))
            .arg(KEEP_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<()>(&mut con)
            .await
            .expect("XGROUP CREATE");
    }
}

/// Applies `fault` for `hold`, then ends it; returns what it hit.
async fn inject(
    fault: Fault,
    hold: Duration,
    rng: &mut fastrand::Rng,
    system: &mut TestSystem,
    routers: &mut Routers,
) -> String {
    let stream = system.keys.events(rng.u16(0..SHARDS));
    let router = rng.usize(0..ROUTERS.len());
    match fault {
        Fault::PauseMaster => {
            let cluster = system.redis.cluster().expect("a cluster");
            let port = cluster.pause_master_of(&stream).await;
            // Past the node timeout (1 s): its replicas may take over.
            tokio::time::sleep(hold).await;
            cluster.resume(port);
            cluster.wait_healthy(RECOVERY_BOUND).await;
            cluster.wait_replicas_synced(RECOVERY_BOUND).await;
            format!("the master on port {port} (serving {stream})")
        }
        Fault::KillMaster => {
            let cluster = system.redis.cluster_mut().expect("a cluster");
            let port = cluster.kill_master_of(&stream).await;
            cluster.wait_failover(&stream, port, RECOVERY_BOUND).await;
            tokio::time::sleep(hold).await;
            cluster.restart(port, RECOVERY_BOUND).await;
            format!("the master on port {port} (serving {stream})")
        }
        Fault::KillRouter => {
            routers.kill(router);
            tokio::time::sleep(hold).await;
            routers.start_one(router);
            ROUTERS[router].to_owned()
        }
        Fault::PauseRouter => {
            routers.get(router).pause();
            tokio::time::sleep(LEASE_TTL + hold).await;
            routers.get(router).resume();
            ROUTERS[router].to_owned()
        }
        Fault::DestinationDown | Fault::DestinationHangs => {
            // `x` answers 503 during its outage; `y` holds each request.
            let destination = if fault == Fault::DestinationDown {
                "x"
            } else {
                "y"
            };
            let path = system.path_of(destination).to_owned();
            system.recorder.set_outage(&path, true);
            tokio::time::sleep(hold).await;
            system.recorder.set_outage(&path, false);
            path
        }
    }
}

/// Waits until the two routers hold every lease between them and both
/// destinations are delivering again.
async fn wait_recovered(system: &TestSystem) {
    wait_leases_held(system).await;
    for destination in ["x", "y"] {
        let path = system.path_of(destination).to_owned();
        let before = system.recorder.delivered_count(&path);
        wait_for(
            &format!("{destination} to deliver again"),
            RECOVERY_BOUND,
            || async { system.recorder.delivered_count(&path) >= before + 20 },
        )
        .await;
    }
}

async fn wait_leases_held(system: &TestSystem) {
    let pairs = usize::from(SHARDS) * system.destinations.len();
    wait_for(
        "the routers to hold every lease between them",
        RECOVERY_BOUND,
        || async {
            let mut held = 0;
            for name in ROUTERS {
                held += system.leases_held_by(name).await;
            }
            held == pairs
        },
    )
    .await;
}

/// The accepted events each destination has not received, by destination
/// and shard.
fn missing(system: &TestSystem, accepted: &[Accepted]) -> BTreeMap<(String, u16), usize> {
    let mut missing = BTreeMap::new();
    for destination in ["x", "y"] {
        let path = system.path_of(destination);
        for event in accepted {
            if system
                .recorder
                .missing(path, std::iter::once(event.id.as_str()))
                > 0
            {
                let shard = event.id.parse::<EventId>().expect("an event id").shard;
                *missing.entry((destination.to_owned(), shard)).or_default() += 1;
            }
        }
    }
    missing
}

/// Prints, for each (destination, shard) still missing events, what its
/// consumer group says: what a stuck pair is stuck on.
async fn describe_missing(system: &TestSystem, accepted: &[Accepted], started: Instant) {
    for destination in ["x", "y"] {
        let path = system.path_of(destination);
        let lost: Vec<String> = accepted
            .iter()
            .filter(|a| {
                system
                    .recorder
                    .missing(path, std::iter::once(a.id.as_str()))
                    > 0
            })
            .take(20)
            .map(|a| {
                format!(
                    "{} (sent at {:.2} s, answered at {:.2} s)",
                    a.id,
                    a.sent_at.duration_since(started).as_secs_f64(),
                    a.answered_at.duration_since(started).as_secs_f64()
                )
            })
            .collect();
        eprintln!("{destination} misses: {lost:?}");
    }
    let mut con = system.redis.connection().await;
    for ((destination, shard), count) in missing(system, accepted) {
        let groups: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(system.keys.events(shard))
            .query_async(&mut con)
            .await
            .expect("XINFO GROUPS");
        let consumers: redis::Value = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(system.keys.events(shard))
            .arg(&destination)
            .query_async(&mut con)
            .await
            .expect("XINFO CONSUMERS");
        eprintln!(
            "{destination} misses {count} events of shard {shard}; groups: {groups:?}; \
             consumers of {destination}: {consumers:?}"
        );
    }
}
