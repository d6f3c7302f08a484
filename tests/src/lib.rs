//! Test harness: a real Redis per test, the mock destinations, the gateway
//! and the router, each started in-process on port 0 (or the router as a
//! child process when a test kills it).
//!
//! - `system`: the system under test ([`TestSystem`]) and extra routers;
//! - `destination`: a test's destinations ([`TestDestination`]);
//! - `inspect`: what Redis holds, read for assertions (each read fails
//!   loudly on a reply it cannot read);
//! - `wait`: [`wait_for`] and [`holds_within`], the only way tests wait;
//! - `test_redis`, `redis_server`, `redis_cluster`: the Redis a test runs
//!   on (one server, or a local cluster with `EVD_TEST_REDIS=cluster`);
//! - `load`, `hostile`, `router_process`, `admin`, `otlp`: load generators,
//!   misbehaving peers, a router as a child process, admin API and metrics
//!   helpers, and an OTLP receiver.
#![forbid(unsafe_code)]

mod admin;
mod destination;
mod hostile;
mod inspect;
mod load;
mod otlp;
mod redis_cluster;
mod redis_server;
mod router_process;
mod system;
mod test_redis;
mod wait;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use admin::Metrics;
pub use destination::{fault_destinations, TestDestination};
pub use hostile::{spawn_hostile_server, Misbehaviour};
pub use load::{Accepted, HastyLoad, Load, Verdict};
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use redis_cluster::{ClusterNode, RedisCluster};
pub use redis_server::RedisServer;
pub use router_process::RouterProcess;
use serde_json::Value;
pub use system::{ExtraRouter, TestSystem};
pub use test_redis::{TestRedis, TimedOutWrites, TIMED_OUT_WRITES};
pub use wait::{holds_within, wait_for};

pub const SHARDS: u16 = 8;

/// The API key the suite's gateways accept (named [`API_KEY_NAME`]).
pub const API_KEY: &str = "evd_test-suite-key";
pub const API_KEY_NAME: &str = "test-suite";

/// The admin token of the suite's routers.
pub const ADMIN_TOKEN: &str = "evd_admin_test-suite-token";

/// The gateway's defaults, accepting [`API_KEY`], on `redis`.
pub fn gateway_config(redis: &TestRedis) -> gateway::Config {
    let mut config = gateway::Config::defaults();
    redis.configure(&mut config.redis);
    config.redis.shards = SHARDS;
    config.workers = 2;
    config.auth.keys = vec![gateway::config::KeyConfig {
        name: API_KEY_NAME.into(),
        sha256: protocol::secret::TokenDigest::of(API_KEY),
        events_per_sec: None,
    }];
    config
}

/// An HTTP client that sends [`API_KEY`] with every request.
pub fn authorized_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {API_KEY}").parse().expect("a valid header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        // The gateway (actix-web) closes a connection idle for 5 s; a
        // client that reuses one as it closes loses that request (a broken
        // pipe mid-body). So, as docs/api.md ("Retrying") advises clients,
        // idle connections are given up sooner.
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .expect("a client builds")
}

/// Logs warnings of the services a test runs in-process to the test's
/// output, which the test runner shows only when the test fails (so a
/// failure explains itself); `RUST_LOG` chooses more or less.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Two user ids that hash to the same shard.
pub fn users_in_one_shard() -> (String, String) {
    let first = "user-a".to_owned();
    let shard = protocol::shard_for(&first, SHARDS);
    let second = (0..)
        .map(|i| format!("user-b{i}"))
        .find(|u| protocol::shard_for(u, SHARDS) == shard)
        .expect("some user shares the shard");
    (first, second)
}

/// The event ids of a `/v1/batch` answer, in order.
pub fn batch_ids(answer: &Value) -> Vec<String> {
    answer["ids"]
        .as_array()
        .expect("ids in the batch answer")
        .iter()
        .map(|id| id.as_str().expect("an id").to_owned())
        .collect()
}

/// POSTs one event with `http` to the gateway at `gateway_url`, insisting
/// on 202; returns its id. For tasks that cannot borrow a [`TestSystem`].
pub async fn post_event(
    http: &reqwest::Client,
    gateway_url: &str,
    user: &str,
    payload: Value,
) -> String {
    post_typed_event(http, gateway_url, user, None, payload).await
}

/// Posts one event of `user` with `event_type` (none: untyped); returns its id.
pub async fn post_typed_event(
    http: &reqwest::Client,
    gateway_url: &str,
    user: &str,
    event_type: Option<&str>,
    payload: Value,
) -> String {
    let mut body = serde_json::json!({ "userId": user, "payload": payload });
    if let Some(event_type) = event_type {
        body["eventType"] = event_type.into();
    }
    let response = http
        .post(format!("{gateway_url}/v1/events"))
        .json(&body)
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(response.status(), 202, "an event of {user} rejected");
    let answer: Value = response.json().await.expect("JSON answer");
    answer["id"]
        .as_str()
        .expect("id in the 202 answer")
        .to_owned()
}

/// Posts one event of `user` with `message_id` until the gateway accepts it,
/// as its clients are asked to: a 503 (Redis slow to answer) or a lost
/// connection leaves the outcome unknown, and the same `messageId` keeps a
/// retry from storing it twice. Returns its id (the stored one's, if an
/// earlier try was stored). Panics on any other answer, or after 60 s.
pub async fn post_event_until_accepted(
    http: &reqwest::Client,
    gateway_url: &str,
    user: &str,
    message_id: &str,
    payload: Value,
) -> String {
    let body = serde_json::json!({ "userId": user, "messageId": message_id, "payload": payload });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let outcome = http
            .post(format!("{gateway_url}/v1/events"))
            .json(&body)
            .send()
            .await;
        match outcome {
            Ok(response) if response.status() == 202 => {
                let answer: Value = response.json().await.expect("JSON answer");
                return answer["id"]
                    .as_str()
                    .expect("id in the 202 answer")
                    .to_owned();
            }
            Ok(response) if response.status() != 503 => {
                panic!("an event of {user} rejected: {}", response.status())
            }
            outcome if Instant::now() >= deadline => {
                panic!("an event of {user} not accepted within 60 s; last: {outcome:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A loopback address with a port that was free a moment ago, for a child
/// process to listen on.
pub fn free_local_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

/// The workspace's root directory.
pub fn workspace_root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
}

/// The Python that has the suite's tools (`tests/python/requirements.txt`):
/// `target/python-venv`, which `scripts/test.sh` installs, or `EVD_PYTHON`.
pub fn test_python() -> PathBuf {
    let python = std::env::var_os("EVD_PYTHON").map_or_else(
        || workspace_root().join("target/python-venv/bin/python"),
        PathBuf::from,
    );
    assert!(
        python.exists(),
        "{} not found: run scripts/test.sh, which installs the Python test tools, \
         or set EVD_PYTHON to a Python that has tests/python/requirements.txt",
        python.display()
    );
    python
}

/// A built binary of this workspace (`cargo build` puts it beside the test's deps dir).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`, as scripts/test.sh does)",
        path.display()
    );
    path
}
