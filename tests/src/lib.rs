//! Test harness: a real Redis per test, the mock destinations, the gateway
//! and the router, each started in-process on port 0 (or the router as a
//! child process when a test kills it).
#![forbid(unsafe_code)]

mod admin;
mod hostile;
mod load;
mod otlp;
mod redis_cluster;
mod redis_server;
mod router_process;
mod test_redis;

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use admin::Metrics;
pub use hostile::{spawn_hostile_server, Misbehaviour};
pub use load::{Accepted, HastyLoad, Load, Verdict};
use mock_destinations::{PathSummary, Recorder};
pub use otlp::{OtlpReceiver, ReceivedSpan};
use protocol::Keys;
pub use redis_cluster::{ClusterNode, RedisCluster};
pub use redis_server::RedisServer;
pub use router_process::RouterProcess;
use serde_json::Value;
pub use test_redis::TestRedis;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

/// Polls `condition` every 25 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        holds_within(timeout, condition).await,
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// Polls `condition` every 25 ms until it holds (true) or `timeout` passes
/// (false).
pub async fn holds_within<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    true
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

/// One destination of a test: its name, the mock path it posts to, and
/// the router's settings for it.
#[derive(Debug, Clone)]
pub struct TestDestination {
    pub path: String,
    /// The router's settings; its `url` is made from `path` when the
    /// system starts (the mock's address is not known before).
    pub settings: router::config::DestinationConfig,
}

impl TestDestination {
    /// A destination with fast retries (10 ms doubling, 5 attempts), a 2 s
    /// attempt timeout, and the circuit breaker at its defaults, as users
    /// get it. A test that needs it off says why ([`Self::without_breaker`]).
    pub fn new(name: &str, path: &str) -> Self {
        Self {
            path: path.into(),
            settings: router::config::DestinationConfig {
                name: name.into(),
                url: String::new(),
                timeout_ms: 2000,
                max_concurrency: 64,
                headers: Default::default(),
                max_age_ms: None,
                retry: router::config::RetryConfig {
                    initial_delay_ms: 10,
                    max_delay_ms: 1000,
                    max_attempts: Some(5),
                    ..Default::default()
                },
                signing_secrets: Vec::new(),
                event_types: Vec::new(),
                breaker: Default::default(),
                rate_limit_per_sec: None,
            },
        }
    }

    pub fn event_types(mut self, event_types: &[&str]) -> Self {
        self.settings.event_types = event_types.iter().map(|t| t.to_string()).collect();
        self
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn signed_with(mut self, secrets: &[&str]) -> Self {
        self.settings.signing_secrets = secrets
            .iter()
            .map(|secret| secret.to_string().try_into().expect("a valid test secret"))
            .collect();
        self
    }

    pub fn max_age_ms(mut self, max_age_ms: u64) -> Self {
        self.settings.max_age_ms = Some(max_age_ms);
        self
    }

    pub fn retry(mut self, initial_delay_ms: u64, max_delay_ms: u64, max_attempts: u32) -> Self {
        self.settings.retry = router::config::RetryConfig {
            initial_delay_ms,
            max_delay_ms,
            max_attempts: Some(max_attempts),
            ..Default::default()
        };
        self
    }

    /// Retries with no attempt limit, until `max_elapsed_ms` after the first attempt.
    pub fn retry_for(
        mut self,
        initial_delay_ms: u64,
        max_delay_ms: u64,
        max_elapsed_ms: u64,
    ) -> Self {
        self.settings.retry = router::config::RetryConfig {
            initial_delay_ms,
            max_delay_ms,
            max_attempts: None,
            max_elapsed_ms,
        };
        self
    }

    /// The retry policy a destination gets when its config names none
    /// (100 ms doubling to 5 min, for up to 24 h).
    pub fn default_retry(mut self) -> Self {
        self.settings.retry = Default::default();
        self
    }

    pub fn breaker(mut self, breaker: router::config::BreakerConfig) -> Self {
        self.settings.breaker = breaker;
        self
    }

    /// Turns the circuit breaker off: for a test that counts every attempt
    /// against a destination failing them all (with the breaker, its circuit
    /// would open and its events would wait instead).
    pub fn without_breaker(mut self) -> Self {
        self.settings.breaker.enabled = false;
        self
    }

    pub fn rate_limit_per_sec(mut self, rate: u32) -> Self {
        self.settings.rate_limit_per_sec = Some(rate);
        self
    }

    pub fn timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.settings.timeout_ms = timeout_ms;
        self
    }

    pub fn max_concurrency(mut self, max_concurrency: usize) -> Self {
        self.settings.max_concurrency = max_concurrency;
        self
    }
}

/// A second in-process router ([`TestSystem::start_extra_router`]).
pub struct ExtraRouter {
    pub stop: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub admin_url: String,
}

impl ExtraRouter {
    /// Stops it gracefully and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        self.handle
            .await
            .expect("router task")
            .expect("router stops cleanly");
    }
}

/// Redis, mock destinations, gateway and (optionally) an in-process router.
pub struct TestSystem {
    pub redis: TestRedis,
    pub recorder: Arc<Recorder>,
    pub mock_url: String,
    pub gateway_url: String,
    pub destinations: Vec<TestDestination>,
    pub http: reqwest::Client,
    pub keys: Keys,
    /// The in-process router's admin address, once started.
    pub admin_url: Option<String>,
    /// `reader.own_connections` of the routers started from now on: the
    /// default unless `EVD_TEST_READERS=shared` (0: every reader shares its
    /// shard's wake-up) or a test sets it.
    pub own_connections: Option<usize>,
    shutdown: CancellationToken,
    router: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
}

impl TestSystem {
    /// Starts everything, the router in-process.
    pub async fn start(destinations: Vec<TestDestination>) -> Self {
        let mut system = Self::start_without_router(destinations).await;
        system.start_router();
        system
    }

    /// Starts Redis (a cluster with `EVD_TEST_REDIS=cluster`), the mock
    /// destinations and the gateway; no router.
    pub async fn start_without_router(destinations: Vec<TestDestination>) -> Self {
        Self::start_custom(TestRedis::start().await, destinations, |_| {}).await
    }

    /// Starts the mock destinations and the gateway (configured by
    /// `configure_gateway`) on `redis`; no router.
    pub async fn start_custom(
        redis: impl Into<TestRedis>,
        destinations: Vec<TestDestination>,
        configure_gateway: impl FnOnce(&mut gateway::Config),
    ) -> Self {
        init_tracing();
        let redis = redis.into();
        let shutdown = CancellationToken::new();

        let recorder = Arc::new(Recorder::default());
        let mock_listener = TcpListener::bind("127.0.0.1:0").expect("bind mock");
        let mock_url = format!("http://{}", mock_listener.local_addr().expect("addr"));
        tokio::spawn(mock_destinations::run(
            mock_listener,
            recorder.clone(),
            shutdown.clone(),
        ));

        let mut gateway_config = gateway_config(&redis);
        configure_gateway(&mut gateway_config);
        let gateway_listener = TcpListener::bind("127.0.0.1:0").expect("bind gateway");
        let gateway_url = format!("http://{}", gateway_listener.local_addr().expect("addr"));
        let keys = Keys::new(gateway_config.redis.key_prefix.clone());
        tokio::spawn(gateway::run(
            gateway_config,
            gateway_listener,
            shutdown.clone(),
        ));

        let system = Self {
            redis,
            recorder,
            mock_url,
            gateway_url,
            destinations,
            http: authorized_client(),
            keys,
            admin_url: None,
            own_connections: match std::env::var("EVD_TEST_READERS").as_deref() {
                Ok("shared") => Some(0),
                _ => None,
            },
            shutdown,
            router: None,
        };
        let ready = format!("{}/readyz", system.gateway_url);
        let http = system.http.clone();
        wait_for("the gateway to be ready", Duration::from_secs(10), || {
            let (http, ready) = (http.clone(), ready.clone());
            async move {
                http.get(&ready)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        system
    }

    /// The router config for this system's destinations.
    pub fn router_config(&self) -> router::Config {
        let mut config = router::Config::defaults();
        self.redis.configure(&mut config.redis);
        config.redis.shards = SHARDS;
        config.consumer_name = "test-router".into();
        config.reader.block_ms = 200;
        if let Some(own_connections) = self.own_connections {
            config.reader.own_connections = own_connections;
        }
        config.shutdown_grace_ms = 2000;
        // Short leases so failover tests are quick; they still cover the
        // 2 s attempt timeout and a read (block + Redis timeout).
        config.lease.ttl_ms = 3000;
        config.lease.renew_interval_ms = 200;
        config.lease.safety_margin_ms = 200;
        config.redis.timeout_ms = 1000;
        config.retention.trim_interval_ms = 100;
        config.admin.overview_interval_ms = 100;
        config.admin.token_sha256 = Some(protocol::secret::TokenDigest::of(ADMIN_TOKEN));
        // The mock destinations and hostile servers listen on loopback.
        config.outbound.allowed_networks = vec!["127.0.0.0/8".into()];
        config.destinations = self
            .destinations
            .iter()
            .map(|d| router::config::DestinationConfig {
                // A full URL (a hostile server, a closed port) or a mock path.
                url: if d.path.starts_with("http") {
                    d.path.clone()
                } else {
                    format!("{}{}", self.mock_url, d.path)
                },
                ..d.settings.clone()
            })
            .collect();
        config
    }

    /// The same config as TOML, for a router run as a child process (which
    /// binds an admin port of its own).
    pub fn router_config_toml(&self) -> String {
        let mut config = self.router_config();
        config.admin.listen = "127.0.0.1:0".into();
        toml::to_string(&config).expect("the router config serializes")
    }

    pub fn start_router(&mut self) {
        self.start_router_with(|_| {});
    }

    /// Starts another in-process router beside the system's own, as
    /// `consumer_name`, with its config adjusted by `configure`.
    pub fn start_extra_router(
        &self,
        consumer_name: &str,
        configure: impl FnOnce(&mut router::Config),
    ) -> ExtraRouter {
        let mut config = self.router_config();
        config.consumer_name = consumer_name.into();
        configure(&mut config);
        let stop = self.shutdown.child_token();
        let admin = TcpListener::bind("127.0.0.1:0").expect("bind router admin");
        let admin_url = format!("http://{}", admin.local_addr().expect("addr"));
        let handle = tokio::spawn(router::run(config, admin, stop.clone()));
        ExtraRouter {
            stop,
            handle,
            admin_url,
        }
    }

    /// Starts the in-process router with its config adjusted by `configure`.
    pub fn start_router_with(&mut self, configure: impl FnOnce(&mut router::Config)) {
        let mut config = self.router_config();
        configure(&mut config);
        let token = self.shutdown.child_token();
        let admin = TcpListener::bind("127.0.0.1:0").expect("bind router admin");
        self.admin_url = Some(format!("http://{}", admin.local_addr().expect("addr")));
        let handle = tokio::spawn(router::run(config, admin, token.clone()));
        self.router = Some((token, handle));
    }

    /// Stops the in-process router gracefully and waits for it.
    pub async fn stop_router(&mut self) {
        if let Some((token, handle)) = self.router.take() {
            token.cancel();
            handle
                .await
                .expect("router task")
                .expect("router stops cleanly");
        }
    }

    pub fn path_of(&self, destination: &str) -> &str {
        &self
            .destinations
            .iter()
            .find(|d| d.name() == destination)
            .expect("known destination")
            .path
    }

    /// What the mock path of `destination` received.
    pub fn received(&self, destination: &str) -> PathSummary {
        self.recorder.summary(self.path_of(destination))
    }

    /// POSTs a JSON body to a gateway path.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.gateway_url))
            .json(body)
            .send()
            .await
            .expect("gateway answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// POSTs one event and returns its id, insisting on 202.
    pub async fn send(&self, user: &str, payload: Value) -> String {
        post_event(&self.http, &self.gateway_url, user, payload).await
    }

    /// Sends one event of `event_type` for `user`; returns its id.
    pub async fn send_typed(&self, user: &str, event_type: &str) -> String {
        let payload = serde_json::json!({ "type": event_type });
        post_typed_event(
            &self.http,
            &self.gateway_url,
            user,
            Some(event_type),
            payload,
        )
        .await
    }

    /// Sends `per_user` events (`{"seq": n}`) for each of `users` (`user-N`),
    /// one after another; returns each user's event ids in the order they
    /// were accepted.
    pub async fn send_numbered(
        &self,
        users: usize,
        per_user: usize,
    ) -> std::collections::HashMap<String, Vec<String>> {
        let mut accepted: std::collections::HashMap<String, Vec<String>> = Default::default();
        for seq in 0..per_user {
            for user in 0..users {
                let user = format!("user-{user}");
                let id = self.send(&user, serde_json::json!({ "seq": seq })).await;
                accepted.entry(user).or_default().push(id);
            }
        }
        accepted
    }

    /// Per user, the event ids `destination` answered 2xx to, in arrival order.
    pub fn delivered_per_user(
        &self,
        destination: &str,
    ) -> std::collections::HashMap<String, Vec<String>> {
        let mut delivered: std::collections::HashMap<String, Vec<String>> = Default::default();
        for event in self.received(destination).events {
            if (200..300).contains(&event.status) {
                delivered.entry(event.user).or_default().push(event.id);
            }
        }
        delivered
    }

    /// Spawns one task per user posting `per_user` events (`{"seq": n}`) one
    /// after another, each insisting on 202; users post concurrently.
    pub fn spawn_posters(&self, users: usize, per_user: usize) -> tokio::task::JoinSet<()> {
        let mut posters = tokio::task::JoinSet::new();
        for user in 0..users {
            let (http, url) = (self.http.clone(), format!("{}/v1/events", self.gateway_url));
            posters.spawn(async move {
                for seq in 0..per_user {
                    let body = serde_json::json!({ "userId": format!("user-{user}"), "payload": { "seq": seq } });
                    let response = http.post(&url).json(&body).send().await.expect("gateway answers");
                    assert_eq!(response.status(), 202, "event {seq} of user {user} rejected");
                }
            });
        }
        posters
    }

    /// Posts as [`Self::spawn_posters`] does and waits; returns how many were accepted.
    pub async fn post_concurrently(&self, users: usize, per_user: usize) -> usize {
        let mut posters = self.spawn_posters(users, per_user);
        while let Some(result) = posters.join_next().await {
            result.expect("every event accepted");
        }
        users * per_user
    }

    /// Waits until the router has registered `destination`, after which the
    /// gateway accepts events naming it (it re-reads the names on a miss).
    pub async fn wait_destinations_registered(&self, destination: &str) {
        let what = format!("destination {destination} registered");
        wait_for(&what, Duration::from_secs(10), || async {
            let mut con = self.redis.connection().await;
            redis::cmd("HEXISTS")
                .arg(self.keys.catalog())
                .arg(destination)
                .query_async::<bool>(&mut con)
                .await
                .unwrap_or(false)
        })
        .await;
    }

    /// Waits until `destination` has received `count` distinct events with 2xx.
    pub async fn wait_delivered(&self, destination: &str, count: usize, timeout: Duration) {
        let path = self.path_of(destination).to_owned();
        let delivered = holds_within(timeout, || async {
            self.recorder.delivered_count(&path) >= count
        })
        .await;
        if !delivered {
            // What the router holds, parks and has in flight says where
            // delivery stopped.
            let view = self.try_destination_view(destination).await;
            panic!(
                "timed out after {timeout:?} waiting for {count} events delivered to \
                 {destination} ({} were); the router's view of it: {view:?}",
                self.recorder.delivered_count(&path)
            );
        }
    }

    /// How many times Redis ran `command` (lower case, e.g. `xack`), summed
    /// over every master (`INFO commandstats`).
    pub async fn command_calls(&self, command: &str) -> u64 {
        let infos = self
            .redis
            .connection()
            .await
            .info_of_every_master("commandstats")
            .await
            .expect("INFO commandstats");
        let field = format!("cmdstat_{command}");
        infos
            .iter()
            .filter_map(|info| protocol::meta::info_field(info, &field))
            .map(|stats| {
                // calls=12,usec=34,…
                stats
                    .split(',')
                    .find_map(|pair| pair.strip_prefix("calls="))
                    .and_then(|calls| calls.parse::<u64>().ok())
                    .expect("commandstats has calls=")
            })
            .sum()
    }

    /// Entries pending (read, not acknowledged) for `destination` over all shards.
    pub async fn pending(&self, destination: &str) -> u64 {
        let counts = self
            .per_shard(|mut con, shard| async move {
                let stream = self.group_stream(&mut con, shard, destination).await;
                // The summary form: [count, smallest id, largest id, consumers].
                let (count, _, _, _): (u64, redis::Value, redis::Value, redis::Value) =
                    redis::cmd("XPENDING")
                        .arg(stream)
                        .arg(destination)
                        .query_async(&mut con)
                        .await
                        .unwrap_or_else(|e| {
                            panic!("XPENDING of {destination} on shard {shard}: {e}")
                        });
                count
            })
            .await;
        counts.iter().sum()
    }

    /// Dead-letter entries of `destination` over all shards, as field maps.
    pub async fn dead_letters(
        &self,
        destination: &str,
    ) -> Vec<std::collections::HashMap<String, String>> {
        let per_shard = self
            .per_shard(|mut con, shard| async move {
                let entries: Vec<(String, std::collections::HashMap<String, String>)> =
                    redis::cmd("XRANGE")
                        .arg(self.keys.dead_letters(shard, destination))
                        .arg("-")
                        .arg("+")
                        .query_async(&mut con)
                        .await
                        .expect("XRANGE works");
                entries.into_iter().map(|(_, fields)| fields)
            })
            .await;
        per_shard.into_iter().flatten().collect()
    }

    /// The stream `destination`'s group on `shard` reads: its reference
    /// stream when it has one (a destination with `event_types`, routed),
    /// else the shard stream.
    pub async fn group_stream(
        &self,
        con: &mut protocol::RedisConnection,
        shard: u16,
        destination: &str,
    ) -> String {
        let refs = self.keys.refs(shard, destination);
        let routed: bool = redis::cmd("EXISTS")
            .arg(&refs)
            .query_async(con)
            .await
            .unwrap_or_else(|e| panic!("EXISTS {refs}: {e}"));
        if routed {
            refs
        } else {
            self.keys.events(shard)
        }
    }

    /// [`Self::group_stream`] of `destination` on `shard`, on a connection of its own.
    pub async fn group_stream_of(&self, destination: &str, shard: u16) -> String {
        let mut con = self.redis.connection().await;
        self.group_stream(&mut con, shard, destination).await
    }

    /// Entries in each shard stream.
    pub async fn shard_lengths(&self) -> Vec<u64> {
        self.per_shard(|mut con, shard| async move {
            let length: u64 = redis::cmd("XLEN")
                .arg(self.keys.events(shard))
                .query_async(&mut con)
                .await
                .expect("XLEN works");
            length
        })
        .await
    }

    /// Entries ever added to the shard streams (`XINFO STREAM`
    /// `entries-added`), however many were trimmed since.
    pub async fn entries_added(&self) -> u64 {
        let added = self
            .per_shard(|mut con, shard| async move {
                let stream = self.keys.events(shard);
                let exists: bool = redis::cmd("EXISTS")
                    .arg(&stream)
                    .query_async(&mut con)
                    .await
                    .unwrap_or_else(|e| panic!("EXISTS {stream}: {e}"));
                if !exists {
                    // No stream yet: nothing added.
                    return 0;
                }
                let info: std::collections::HashMap<String, redis::Value> = redis::cmd("XINFO")
                    .arg("STREAM")
                    .arg(&stream)
                    .query_async(&mut con)
                    .await
                    .unwrap_or_else(|e| panic!("XINFO STREAM {stream}: {e}"));
                let added = info.get("entries-added").unwrap_or_else(|| {
                    panic!("XINFO STREAM {stream} has no entries-added (Redis 7 needed)")
                });
                redis::from_redis_value::<u64>(added.clone())
                    .unwrap_or_else(|e| panic!("entries-added of {stream}: {e}"))
            })
            .await;
        added.iter().sum()
    }

    /// The `n` of each of `user`'s `{"n": …}` events in its shard stream,
    /// in stream order.
    pub async fn numbers_in_stream_of(&self, user: &str) -> Vec<u64> {
        let stream = self.keys.events(protocol::shard_for(user, SHARDS));
        let entries: Vec<(String, std::collections::HashMap<String, String>)> =
            redis::cmd("XRANGE")
                .arg(&stream)
                .arg("-")
                .arg("+")
                .query_async(&mut self.redis.connection().await)
                .await
                .expect("XRANGE works");
        entries
            .into_iter()
            .filter(|(_, fields)| fields.get("user").map(String::as_str) == Some(user))
            .filter_map(|(_, fields)| {
                let payload: Value = serde_json::from_str(fields.get("payload")?).ok()?;
                payload["n"].as_u64()
            })
            .collect()
    }

    /// After Redis comes back from a pause during which `sent` events
    /// `{"n": 0..sent}` of `user` were answered 503: every one of those
    /// writes, queued on its connection, lands, in the order sent, and the
    /// shard's doubt clears.
    pub async fn assert_timed_out_writes_landed_in_order(&self, user: &str, sent: usize) {
        wait_for(
            "every write that timed out lands",
            Duration::from_secs(30),
            || async { self.numbers_in_stream_of(user).await.len() >= sent },
        )
        .await;
        assert_eq!(
            self.numbers_in_stream_of(user).await,
            (0..sent as u64).collect::<Vec<_>>(),
            "in the order sent"
        );
        wait_for(
            "the shard's doubt to clear",
            Duration::from_secs(30),
            || async {
                self.gateway_metrics()
                    .await
                    .value("gateway_shards_in_doubt", &[])
                    == 0.0
            },
        )
        .await;
    }

    /// After Redis (or a master) comes back from a pause during `load`:
    /// once 200 more events are stored, stops it and asserts that the pause
    /// was felt (some 503s) and that no user's event is stored behind a
    /// later one of theirs.
    pub async fn assert_hasty_users_kept_their_order(&self, load: HastyLoad) {
        let stored_at_resume = self.stream_lengths().await;
        wait_for("events accepted again", Duration::from_secs(30), || async {
            self.stream_lengths().await > stored_at_resume + 200
        })
        .await;
        let (answers, users) = load.stop().await;
        let behind = self.stored_out_of_user_order(&users).await;
        eprintln!("answers by status: {answers:?}; stored behind a later event: {behind}");
        assert!(
            answers.get(&503).is_some_and(|&n| n > 0),
            "the pause was felt: {answers:?}"
        );
        assert_eq!(behind, 0, "events stored out of per-user order");
    }

    /// Once no shard is in doubt (every write that timed out has landed or
    /// never will): how many of `users`' `{"n": …}` events are stored
    /// after a later one of theirs.
    pub async fn stored_out_of_user_order(&self, users: &[String]) -> usize {
        wait_for("no shard in doubt", Duration::from_secs(30), || async {
            self.gateway_metrics()
                .await
                .value("gateway_shards_in_doubt", &[])
                == 0.0
        })
        .await;
        let mut behind = 0;
        for user in users {
            let numbers = self.numbers_in_stream_of(user).await;
            let late = numbers.windows(2).filter(|w| w[0] >= w[1]).count();
            if late > 0 {
                eprintln!("{user}'s events stored in this order: {numbers:?}");
            }
            behind += late;
        }
        behind
    }

    /// POSTs `body` to `/v1/events` with a new client, so over a new HTTP
    /// connection (which the gateway hands to its workers in turn).
    pub async fn post_on_a_new_connection(&self, body: &Value) -> u16 {
        authorized_client()
            .post(format!("{}/v1/events", self.gateway_url))
            .json(body)
            .send()
            .await
            .expect("the gateway answers")
            .status()
            .as_u16()
    }

    /// Total entries in all shard streams.
    pub async fn stream_lengths(&self) -> u64 {
        self.shard_lengths().await.iter().sum()
    }

    /// The longest shard stream.
    pub async fn longest_stream(&self) -> u64 {
        self.shard_lengths().await.into_iter().max().unwrap_or(0)
    }
}

impl TestSystem {
    /// Writes the child-process router config to `dir/router.toml`.
    pub fn write_router_config(&self, dir: &std::path::Path) -> PathBuf {
        let path = dir.join("router.toml");
        std::fs::write(&path, self.router_config_toml()).expect("write router config");
        path
    }

    /// The holder of every lease (`None` = free): each (shard, destination)
    /// and each shard's routing stage while a destination is routed.
    pub async fn lease_holders(&self) -> Vec<Option<String>> {
        let mut holders = Vec::new();
        for destination in &self.destinations {
            holders.extend(self.lease_holders_of(destination.name()).await);
        }
        // Destinations with `event_types` read references: each shard's
        // routing stage holds a lease too.
        if self
            .destinations
            .iter()
            .any(|d| !d.settings.event_types.is_empty())
        {
            holders.extend(self.lease_holders_of(protocol::keys::ROUTING_GROUP).await);
        }
        holders
    }

    /// The holder of `destination`'s lease on every shard (`None` = free).
    pub async fn lease_holders_of(&self, destination: &str) -> Vec<Option<String>> {
        self.per_shard(|mut con, shard| async move {
            let lease = self.keys.lease(shard, destination);
            let holder: Option<String> = redis::cmd("GET")
                .arg(&lease)
                .query_async(&mut con)
                .await
                .unwrap_or_else(|e| panic!("GET {lease}: {e}"));
            holder
        })
        .await
    }

    /// On how many shards `destination` has a consumer group.
    pub async fn groups_of(&self, destination: &str) -> usize {
        let per_shard = self
            .per_shard(|mut con, shard| async move {
                let stream = self.group_stream(&mut con, shard, destination).await;
                let groups: redis::RedisResult<Vec<std::collections::HashMap<String, redis::Value>>> =
                    redis::cmd("XINFO").arg("GROUPS").arg(&stream).query_async(&mut con).await;
                let groups = match groups {
                    Ok(groups) => groups,
                    // XINFO GROUPS of a missing stream is a plain ERR.
                    Err(e) if e.code() == Some("ERR") => Vec::new(),
                    Err(e) => panic!("XINFO GROUPS {stream}: {e}"),
                };
                groups.iter().any(|group| {
                    matches!(group.get("name"), Some(redis::Value::BulkString(name)) if name == destination.as_bytes())
                })
            })
            .await;
        per_shard.into_iter().filter(|has| *has).count()
    }

    /// How many leases instances of `consumer_name` hold.
    pub async fn leases_held_by(&self, consumer_name: &str) -> usize {
        let prefix = format!("{consumer_name}#");
        self.lease_holders()
            .await
            .iter()
            .filter(|h| h.as_deref().is_some_and(|h| h.starts_with(&prefix)))
            .count()
    }

    /// Consumer names in `destination`'s group on every shard, deduplicated
    /// (none where the group does not exist).
    pub async fn consumers(&self, destination: &str) -> Vec<String> {
        let per_shard = self
            .per_shard(|mut con, shard| async move {
                let consumers: redis::RedisResult<
                    Vec<std::collections::HashMap<String, redis::Value>>,
                > = redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(self.group_stream(&mut con, shard, destination).await)
                    .arg(destination)
                    .query_async(&mut con)
                    .await;
                match consumers {
                    Ok(consumers) => consumers,
                    // No group (deleted, or never made): no consumers.
                    Err(e) if e.code() == Some("NOGROUP") => Vec::new(),
                    Err(e) => panic!("XINFO CONSUMERS of {destination} on shard {shard}: {e}"),
                }
            })
            .await;
        let mut names = std::collections::BTreeSet::new();
        for consumer in per_shard.iter().flatten() {
            if let Some(redis::Value::BulkString(name)) = consumer.get("name") {
                names.insert(String::from_utf8_lossy(&name[..]).into_owned());
            }
        }
        names.into_iter().collect()
    }

    /// `query(connection, shard)` on every shard in turn; the results in
    /// shard order.
    async fn per_shard<T, Fut>(
        &self,
        query: impl Fn(protocol::RedisConnection, u16) -> Fut,
    ) -> Vec<T>
    where
        Fut: std::future::Future<Output = T>,
    {
        let con = self.redis.connection().await;
        let mut results = Vec::with_capacity(usize::from(SHARDS));
        for shard in 0..SHARDS {
            results.push(query(con.clone(), shard).await);
        }
        results
    }
}

impl Drop for TestSystem {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
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
