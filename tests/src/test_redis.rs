//! The Redis a [`crate::TestSystem`] runs on: one server, or a cluster when
//! `EVD_TEST_REDIS=cluster` (how `scripts/test.sh` runs the end-to-end
//! suite a second time).

use protocol::{RedisConfig, RedisConnection};

use crate::{RedisCluster, RedisServer};

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
