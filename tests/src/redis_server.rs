//! A real Redis per test: a `redis-server` child process on a free port
//! with its data in a temp dir, killed on drop. With the `testcontainers`
//! feature, a pinned Redis 7 container instead.

/// Connection URL and lifetime of one test's Redis.
pub struct RedisServer {
    url: String,
    inner: Inner,
}

impl RedisServer {
    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .expect("valid redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("test redis accepts connections")
    }
}

#[cfg(not(feature = "testcontainers"))]
mod imp {
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::RedisServer;

    pub struct Inner {
        child: Option<Child>,
        _dir: tempfile::TempDir,
    }

    impl RedisServer {
        /// Starts `redis-server` (or `$REDIS_SERVER`) with AOF on and
        /// `noeviction`, as the shipped config has it.
        pub async fn start() -> Self {
            let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
            for _ in 0..5 {
                let port = TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port")
                    .port();
                let dir = tempfile::tempdir().expect("a temp dir");
                let child = Command::new(&binary)
                    .args([
                        "--port",
                        &port.to_string(),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                    ])
                    .args(["--appendonly", "yes", "--appendfsync", "everysec"])
                    .args(["--maxmemory-policy", "noeviction"])
                    .arg("--dir")
                    .arg(dir.path())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| {
                        panic!(
                            "cannot run {binary} (install redis-server or set REDIS_SERVER): {e}"
                        )
                    });
                let server = RedisServer {
                    url: format!("redis://127.0.0.1:{port}"),
                    inner: Inner {
                        child: Some(child),
                        _dir: dir,
                    },
                };
                if server.wait_ready(Duration::from_secs(5)).await {
                    return server;
                }
            }
            panic!("redis-server did not start on any of 5 free ports");
        }

        async fn wait_ready(&self, within: Duration) -> bool {
            let deadline = Instant::now() + within;
            let client = redis::Client::open(self.url()).expect("valid url");
            while Instant::now() < deadline {
                if let Ok(mut con) = client.get_multiplexed_async_connection().await {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut con)
                        .await
                        .is_ok()
                    {
                        return true;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        }

        /// Kills Redis, as an outage would.
        pub async fn stop(&mut self) {
            if let Some(mut child) = self.inner.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    impl Drop for Inner {
        fn drop(&mut self) {
            if let Some(child) = &mut self.child {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[cfg(feature = "testcontainers")]
mod imp {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{ContainerAsync, GenericImage, ImageExt};

    use super::RedisServer;

    /// Pinned: the redis module's default image is 5.0, which lacks XAUTOCLAIM.
    const IMAGE_TAG: &str = "7.2.5";

    pub struct Inner {
        container: Option<ContainerAsync<GenericImage>>,
    }

    impl RedisServer {
        pub async fn start() -> Self {
            let container = GenericImage::new("redis", IMAGE_TAG)
                .with_exposed_port(6379.tcp())
                .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
                .with_cmd([
                    "redis-server",
                    "--appendonly",
                    "yes",
                    "--maxmemory-policy",
                    "noeviction",
                ])
                .start()
                .await
                .expect("docker can start the redis container");
            let port = container
                .get_host_port_ipv4(6379)
                .await
                .expect("mapped port");
            RedisServer {
                url: format!("redis://127.0.0.1:{port}"),
                inner: Inner {
                    container: Some(container),
                },
            }
        }

        pub async fn stop(&mut self) {
            if let Some(container) = self.inner.container.take() {
                let _ = container.stop().await;
            }
        }
    }
}

use imp::Inner;
