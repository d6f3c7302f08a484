//! The system under test: Redis, the mock destinations, the gateway and
//! routers, started in-process on port 0.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mock_destinations::{PathSummary, Recorder};
use protocol::Keys;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    authorized_client, gateway_config, holds_within, init_tracing, post_event, post_typed_event,
    wait_for, TestDestination, TestRedis, ADMIN_TOKEN, SHARDS,
};

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
}

impl TestSystem {
    /// Writes the child-process router config to `dir/router.toml`.
    pub fn write_router_config(&self, dir: &std::path::Path) -> PathBuf {
        let path = dir.join("router.toml");
        std::fs::write(&path, self.router_config_toml()).expect("write router config");
        path
    }
}

impl Drop for TestSystem {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
