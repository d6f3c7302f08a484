//! The Redis a [`crate::TestSystem`] runs on: one server, or a cluster when
//! `EVD_TEST_REDIS=cluster` (how `scripts/test.sh` runs the end-to-end
//! suite a second time).

use std::sync::Mutex;
use std::time::Duration;

use protocol::{RedisConfig, RedisConnection};
use tokio::task::JoinSet;

use crate::{wait_for, RedisCluster, RedisServer};

pub enum TestRedis {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl From<RedisServer> for TestRedis {
    fn from(server: RedisServer) -> Self {
        TestRedis::Single(server)
    }
}

impl From<RedisCluster> for TestRedis {
    fn from(cluster: RedisCluster) -> Self {
        TestRedis::Cluster(cluster)
    }
}

impl TestRedis {
    /// A single server, or a cluster if `EVD_TEST_REDIS=cluster`.
    pub async fn start() -> Self {
        match std::env::var("EVD_TEST_REDIS").as_deref() {
            Ok("cluster") => RedisCluster::start().await.into(),
            Ok("single") | Err(_) => RedisServer::start().await.into(),
            Ok(other) => panic!("EVD_TEST_REDIS={other}: expected `single` or `cluster`"),
        }
    }

    /// Points a service's `[redis]` section at this Redis.
    pub fn configure(&self, config: &mut RedisConfig) {
        match self {
            TestRedis::Single(server) => {
                config.url = server.url().into();
                config.cluster_nodes.clear();
            }
            TestRedis::Cluster(cluster) => {
                config.cluster_nodes = cluster.seed_urls().into_iter().map(Into::into).collect();
            }
        }
    }

    /// A connection for the test's own checks.
    pub async fn connection(&self) -> RedisConnection {
        match self {
            TestRedis::Single(server) => server.connection().await,
            TestRedis::Cluster(cluster) => cluster.connection().await,
        }
    }

    pub fn cluster(&self) -> Option<&RedisCluster> {
        match self {
            TestRedis::Cluster(cluster) => Some(cluster),
            TestRedis::Single(_) => None,
        }
    }

    pub fn cluster_mut(&mut self) -> Option<&mut RedisCluster> {
        match self {
            TestRedis::Cluster(cluster) => Some(cluster),
            TestRedis::Single(_) => None,
        }
    }

    /// The single server, for tests that stop, pause or restart it.
    pub fn server(&mut self) -> &mut RedisServer {
        match self {
            TestRedis::Single(server) => server,
            TestRedis::Cluster(_) => {
                panic!("this test stops or pauses one Redis server; run it without EVD_TEST_REDIS=cluster")
            }
        }
    }
}

/// Writes to a stalled Redis whose replies never come in time, sent over a
/// connection made as the services make theirs: for checking that a write
/// the client gave up on is stored at most once when Redis answers again.
pub struct TimedOutWrites {
    connection: RedisConnection,
    stream: String,
    timeout: Duration,
}

/// How many writes [`TimedOutWrites::send`] sends.
pub const TIMED_OUT_WRITES: u64 = 2_000;

impl TimedOutWrites {
    /// Connects to `redis` with a 200 ms reply timeout and writes one entry
    /// to `stream` (so the connection to its node is made while it answers).
    pub async fn connect(redis: &TestRedis, stream: &str) -> Self {
        let mut config = crate::gateway_config(redis).redis;
        config.timeout_ms = 200;
        let mut connection = config
            .connect(config.timeout())
            .await
            .expect("connects to the test Redis");
        let _: String = xadd(stream, "warm")
            .query_async(&mut connection)
            .await
            .expect("Redis answers before it is stalled");
        Self {
            connection,
            stream: stream.to_owned(),
            timeout: config.timeout(),
        }
    }

    /// Sends [`TIMED_OUT_WRITES`] writes at once, each given up after the
    /// reply timeout; call while Redis is stalled. Panics if one is answered.
    pub async fn send(&self) {
        let mut writes = JoinSet::new();
        for n in 0..TIMED_OUT_WRITES {
            let (mut connection, write) =
                (self.connection.clone(), xadd(&self.stream, &n.to_string()));
            let timeout = self.timeout;
            writes.spawn(async move {
                tokio::time::timeout(timeout, write.query_async::<String>(&mut connection)).await
            });
            // Spread over 20 ms, so that timeouts fire in many turns.
            if n % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        while let Some(outcome) = writes.join_next().await {
            let answered = matches!(outcome.expect("a write task ends"), Ok(Ok(_)));
            assert!(!answered, "a write to the stalled Redis was answered");
        }
    }

    /// Once Redis answers again: how many of the writes were stored. Asks
    /// over the writes' own connection, so the answer comes after every
    /// write still queued on it was executed.
    pub async fn stored(&self) -> u64 {
        let counted = Mutex::new(None);
        wait_for(
            "the stalled Redis answers again",
            Duration::from_secs(30),
            || async {
                let mut xlen = redis::cmd("XLEN");
                xlen.arg(&self.stream);
                let length = xlen.query_async::<u64>(&mut self.connection.clone()).await;
                *counted.lock().expect("not poisoned") = length.ok();
                counted.lock().expect("not poisoned").is_some()
            },
        )
        .await;
        let length = counted
            .into_inner()
            .expect("not poisoned")
            .expect("counted");
        length - 1
    }
}

fn xadd(stream: &str, n: &str) -> redis::Cmd {
    let mut xadd = redis::cmd("XADD");
    xadd.arg(stream).arg("*").arg("n").arg(n);
    xadd
}
