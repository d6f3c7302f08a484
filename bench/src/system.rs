//! The processes under test: redis-server with the shipped config, the
//! gateway, the router and the no-op server, each a child process so its
//! memory can be read from `/proc`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Process {
    name: String,
    child: Child,
}

impl Process {
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log).context("cannot create a log file")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    /// The most memory the process has had resident (`VmHWM`), in bytes.
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .with_context(|| format!("cannot read the status of {}", self.name))?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmHWM for {}", self.name))?;
        Ok(kib * 1024)
    }

    /// CPU time the process has used so far, user and system, all threads.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .with_context(|| format!("cannot read the stat of {}", self.name))?;
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th fields of the whole line.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |index: usize| -> anyhow::Result<u64> {
            Ok(fields
                .get(index)
                .with_context(|| format!("short stat line for {}", self.name))?
                .parse()?)
        };
        Ok(Duration::from_secs_f64(
            (ticks(11)? + ticks(12)?) as f64 / clock_ticks_per_sec(),
        ))
    }

    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("{} exited: {status}", self.name),
            None => Ok(()),
        }
    }

    /// SIGTERM, and up to 30 s for a clean exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("{} did not exit within 30 s of SIGTERM", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel's clock tick rate for `/proc/…/stat` times (`getconf CLK_TCK`).
fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `ready` every 20 ms for up to `within`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut ready: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !ready().await {
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The binaries and files a run uses.
pub struct Binaries {
    pub gateway: PathBuf,
    pub router: PathBuf,
    pub redis_server: String,
    pub redis_config: PathBuf,
    /// This benchmark's own executable, which also serves the no-op handler.
    pub bench: PathBuf,
}

pub struct Redis {
    pub process: Process,
    pub url: String,
    pub client: redis::Client,
}

impl Redis {
    /// redis-server with the shipped config, its data in `dir`.
    pub async fn start(binaries: &Binaries, dir: &Path) -> anyhow::Result<Self> {
        let port = free_port()?;
        // The shipped config names `./data`, relative to where Redis starts.
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let mut command = Command::new(&binaries.redis_server);
        command.current_dir(dir).arg(&binaries.redis_config).args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ]);
        let process = Process::spawn("redis-server", command, &dir.join("redis.log"))?;
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str())?;
        wait_until("redis-server to answer", Duration::from_secs(10), || {
            let client = client.clone();
            async move {
                match client.get_multiplexed_async_connection().await {
                    Ok(mut con) => redis::cmd("PING")
                        .query_async::<String>(&mut con)
                        .await
                        .is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await?;
        Ok(Self {
            process,
            url,
            client,
        })
    }

    /// A connection for the benchmark's own checks; an XRANGE of 10,000
    /// entries can take longer than the client's default 500 ms on a busy
    /// machine, so it waits up to 30 s.
    pub async fn connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    pub async fn set_fsync(&self, policy: &str) -> anyhow::Result<()> {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendfsync")
            .arg(policy)
            .query_async(&mut self.connection().await?)
            .await?;
        Ok(())
    }

    /// Empties Redis between phases (streams, groups, leases, metadata)
    /// and lets the disk settle: the append-only file is rewritten to its
    /// now tiny size and everything written so far is flushed, so that a
    /// phase's fsyncs do not queue behind the previous phase's writeback.
    pub async fn reset(&self) -> anyhow::Result<()> {
        let con = self.connection().await?;
        // A rewrite the last phase's writes started would refuse the one
        // asked for here.
        wait_for_aof_rewrite(&con).await?;
        let () = redis::cmd("FLUSHALL").query_async(&mut con.clone()).await?;
        let _: String = redis::cmd("BGREWRITEAOF")
            .query_async(&mut con.clone())
            .await?;
        wait_for_aof_rewrite(&con).await?;
        let synced = tokio::process::Command::new("sync").status().await?;
        anyhow::ensure!(synced.success(), "sync failed");
        Ok(())
    }

    /// Prints what Redis's latency monitor saw since the last call (events
    /// over 10 ms: fsyncs, AOF writes, forks, slow commands), then resets it.
    pub async fn report_latency_spikes(&self) -> anyhow::Result<()> {
        let mut con = self.connection().await?;
        let latest: Vec<(String, u64, u64, u64)> = redis::cmd("LATENCY")
            .arg("LATEST")
            .query_async(&mut con)
            .await?;
        for (event, _, last_ms, max_ms) in latest {
            eprintln!("  Redis latency spike: {event}, latest {last_ms} ms, max {max_ms} ms");
        }
        let _: u64 = redis::cmd("LATENCY")
            .arg("RESET")
            .query_async(&mut con)
            .await?;
        Ok(())
    }

    /// Clients connected to Redis now (`INFO clients`), this query's own
    /// connection included.
    pub async fn connected_clients(&self) -> anyhow::Result<u64> {
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query_async(&mut self.connection().await?)
            .await?;
        protocol::info_field(&info, "connected_clients")
            .and_then(|count| count.parse().ok())
            .context("INFO clients has no connected_clients")
    }

    pub async fn version(&self) -> anyhow::Result<String> {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.connection().await?)
            .await?;
        Ok(protocol::info_field(&info, "redis_version")
            .unwrap_or("unknown")
            .to_owned())
    }
}

/// The API key the benchmark's gateway accepts: authentication stays on, as
/// in production, so its cost is part of what is measured.
pub const API_KEY: &str = "evd_bench-key";

/// Starts the gateway against `redis` and waits until it is ready.
pub async fn start_gateway(
    binaries: &Binaries,
    redis: &Redis,
    http: &reqwest::Client,
    dir: &Path,
) -> anyhow::Result<(Process, String)> {
    start_gateway_with(binaries, redis, http, dir, &[]).await
}

/// As [`start_gateway`], with more environment variables.
pub async fn start_gateway_with(
    binaries: &Binaries,
    redis: &Redis,
    http: &reqwest::Client,
    dir: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<(Process, String)> {
    let port = free_port()?;
    let mut command = Command::new(&binaries.gateway);
    command
        .envs(env.iter().copied())
        .env("GATEWAY_REDIS__URL", &redis.url)
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "GATEWAY_AUTH__KEYS",
            format!(
                r#"[{{name = "bench", sha256 = "{}"}}]"#,
                protocol::secret::TokenDigest::of(API_KEY).to_hex()
            ),
        );
    let process = Process::spawn("gateway", command, &dir.join("gateway.log"))?;
    let url = format!("http://127.0.0.1:{port}");
    wait_until_ready(http, &format!("{url}/readyz")).await?;
    Ok((process, url))
}

/// Starts this executable's no-op server with the gateway's worker count.
pub async fn start_noop(
    binaries: &Binaries,
    http: &reqwest::Client,
    dir: &Path,
) -> anyhow::Result<(Process, String)> {
    let port = free_port()?;
    let mut command = Command::new(&binaries.bench);
    command.args(["noop", "--listen", &format!("127.0.0.1:{port}")]);
    let process = Process::spawn("no-op server", command, &dir.join("noop.log"))?;
    let url = format!("http://127.0.0.1:{port}");
    wait_until_ready(http, &format!("{url}/readyz")).await?;
    Ok((process, url))
}

async fn wait_until_ready(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    wait_until(url, Duration::from_secs(30), || async {
        http.get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await
}

/// A destination of the router under test.
pub struct Route {
    pub name: String,
    pub url: String,
    /// It takes only events of this type; every event when `None`.
    pub event_type: Option<String>,
}

/// Starts the router delivering to `destinations`.
pub fn start_router(
    binaries: &Binaries,
    redis: &Redis,
    destinations: &[Route],
    dir: &Path,
    label: &str,
) -> anyhow::Result<Process> {
    start_router_with(binaries, redis, destinations, dir, label, &[])
}

/// As [`start_router`], with more environment variables.
pub fn start_router_with(
    binaries: &Binaries,
    redis: &Redis,
    destinations: &[Route],
    dir: &Path,
    label: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<Process> {
    // The admin listener is not used here, but stays locked as in production.
    let admin_token = protocol::secret::generate_token("evd_admin_");
    let mut config = format!(
        "[redis]\nurl = \"{}\"\n[admin]\ntoken_sha256 = \"{}\"\n\
         [outbound]\nallowed_networks = [\"127.0.0.0/8\"]\n",
        redis.url,
        protocol::secret::TokenDigest::of(&admin_token).to_hex()
    );
    for Route {
        name,
        url,
        event_type,
    } in destinations
    {
        config.push_str(&format!(
            "\n[[destinations]]\nname = \"{name}\"\nurl = \"{url}\"\n"
        ));
        if let Some(event_type) = event_type {
            config.push_str(&format!("event_types = [\"{event_type}\"]\n"));
        }
    }
    let config_path = dir.join(format!("router-{label}.toml"));
    std::fs::write(&config_path, config)?;
    let mut command = Command::new(&binaries.router);
    command
        .arg("--config")
        .arg(&config_path)
        .env("ROUTER_CONSUMER_NAME", format!("bench-{label}"))
        .env("ROUTER_ADMIN__LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied());
    Process::spawn("router", command, &dir.join(format!("router-{label}.log")))
}

/// Facts about the machine for the report header.
#[derive(Debug)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub commit: String,
}

pub fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default();
    Machine { cpu, cores, commit }
}

/// Waits until no AOF rewrite runs or is scheduled.
async fn wait_for_aof_rewrite(con: &redis::aio::MultiplexedConnection) -> anyhow::Result<()> {
    wait_until("the AOF rewrite", Duration::from_secs(60), || {
        let mut con = con.clone();
        async move {
            let info: Result<String, _> = redis::cmd("INFO")
                .arg("persistence")
                .query_async(&mut con)
                .await;
            info.is_ok_and(|info| {
                protocol::info_field(&info, "aof_rewrite_in_progress") == Some("0")
                    && protocol::info_field(&info, "aof_rewrite_scheduled") == Some("0")
            })
        }
    })
    .await
}
