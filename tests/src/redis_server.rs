//! A real Redis per test: a `redis-server` child process on a free port
//! with its data in a temp dir, killed on drop. With the `testcontainers`
//! feature, a pinned Redis 7 container instead.

/// Sends `signal` (`-STOP`, `-CONT`) to a `redis-server` child.
pub(crate) fn send_signal(child: &std::process::Child, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(signal)
        .arg(child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} failed");
}

/// Connection URL and lifetime of one test's Redis.
pub struct RedisServer {
    url: String,
    inner: Inner,
}

impl RedisServer {
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A connection for the test's own checks. Its replies may take long on
    /// a loaded machine (a big XRANGE while the suite runs in parallel), so
    /// it waits up to 30 s instead of the client's default 500 ms.
    pub async fn connection(&self) -> protocol::RedisConnection {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(30)));
        let client = redis::Client::open(self.url.as_str()).expect("valid redis url");
        protocol::RedisConnection::Single(
            redis::aio::ConnectionManager::new_with_config(client, config)
                .await
                .expect("test redis accepts connections"),
        )
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
        port: u16,
        extra_args: Vec<String>,
        dir: tempfile::TempDir,
    }

    impl RedisServer {
        /// Starts `redis-server` (or `$REDIS_SERVER`) with AOF on and
        /// `noeviction`, as the shipped config has it.
        pub async fn start() -> Self {
            Self::start_with(&[]).await
        }

        /// Starts it with `extra_args` after the defaults (later settings win),
        /// e.g. `["--appendfsync", "always"]`.
        pub async fn start_with(extra_args: &[&str]) -> Self {
            let extra_args: Vec<String> = extra_args.iter().map(|a| (*a).to_owned()).collect();
            for _ in 0..5 {
                let port = TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port")
                    .port();
                let dir = tempfile::tempdir().expect("a temp dir");
                let mut server = RedisServer {
                    url: format!("redis://127.0.0.1:{port}"),
                    inner: Inner {
                        child: None,
                        port,
                        extra_args: extra_args.clone(),
                        dir,
                    },
                };
                server.spawn();
                if server.wait_ready(Duration::from_secs(5)).await {
                    return server;
                }
            }
            panic!("redis-server did not start on any of 5 free ports");
        }

        fn spawn(&mut self) {
            let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
            let inner = &mut self.inner;
            let child = Command::new(&binary)
                .args([
                    "--port",
                    &inner.port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                ])
                .args(["--appendonly", "yes", "--appendfsync", "everysec"])
                .args(["--maxmemory-policy", "noeviction"])
                .args(&inner.extra_args)
                .arg("--dir")
                .arg(inner.dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run {binary} (install redis-server or set REDIS_SERVER): {e}")
                });
            inner.child = Some(child);
        }

        /// Starts Redis again on the same port and data directory, so it
        /// loads its append-only file, and waits until it answers.
        pub async fn restart(&mut self) {
            self.stop().await;
            for _ in 0..50 {
                self.spawn();
                if self.wait_ready(Duration::from_secs(10)).await {
                    return;
                }
                // The port may not be free yet; try again.
                self.stop().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("redis-server did not restart on port {}", self.inner.port);
        }

        /// SIGSTOP: Redis stops answering but keeps its connections, as in
        /// a long stall.
        pub async fn pause(&self) {
            self.signal("-STOP");
        }

        /// SIGCONT after [`Self::pause`].
        pub async fn resume(&self) {
            self.signal("-CONT");
        }

        fn signal(&self, signal: &str) {
            let child = self.inner.child.as_ref().expect("redis is running");
            super::send_signal(child, signal);
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

        /// SIGKILLs Redis, as a crash would.
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
            Self::start_with(&[]).await
        }

        pub async fn start_with(extra_args: &[&str]) -> Self {
            let mut command = vec![
                "redis-server".to_owned(),
                "--appendonly".into(),
                "yes".into(),
                "--maxmemory-policy".into(),
                "noeviction".into(),
            ];
            command.extend(extra_args.iter().map(|a| (*a).to_owned()));
            let container = GenericImage::new("redis", IMAGE_TAG)
                .with_exposed_port(6379.tcp())
                .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
                .with_cmd(command)
                .start()
                .await
                .expect("docker can start the redis container");
            let mut server = RedisServer {
                url: String::new(),
                inner: Inner {
                    container: Some(container),
                },
            };
            server.read_url().await;
            server
        }

        async fn read_url(&mut self) {
            let container = self.inner.container.as_ref().expect("running");
            let port = container
                .get_host_port_ipv4(6379)
                .await
                .expect("mapped port");
            self.url = format!("redis://127.0.0.1:{port}");
        }

        fn container(&self) -> &ContainerAsync<GenericImage> {
            self.inner
                .container
                .as_ref()
                .expect("redis container exists")
        }

        pub async fn stop(&mut self) {
            let _ = self.container().stop_with_timeout(Some(0)).await;
        }

        pub async fn restart(&mut self) {
            self.stop().await;
            self.container().start().await.expect("container restarts");
            self.read_url().await;
        }

        pub async fn pause(&self) {
            self.container().pause().await.expect("container pauses");
        }

        pub async fn resume(&self) {
            self.container().unpause().await.expect("container resumes");
        }
    }
}

use imp::Inner;
