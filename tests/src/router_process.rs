//! The router as a child process, for tests that kill it.

use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::workspace_binary;

/// A router child process; killed on drop.
pub struct RouterProcess {
    child: Child,
    pub consumer_name: String,
}

impl RouterProcess {
    /// Starts `router --config config` as `consumer_name`, its log in `log`.
    pub fn start(config: &Path, consumer_name: &str, log: &Path) -> Self {
        Self::start_with_env(config, consumer_name, log, &[])
    }

    /// As [`Self::start`], with extra `ROUTER_…` settings in the environment.
    pub fn start_with_env(
        config: &Path,
        consumer_name: &str,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let log = std::fs::File::create(log).expect("log file");
        let errors = log.try_clone().expect("log file handle");
        let child = Command::new(workspace_binary("router"))
            .arg("--config")
            .arg(config)
            .env("ROUTER_CONSUMER_NAME", consumer_name)
            .envs(env.iter().copied())
            .stdout(log)
            .stderr(errors)
            .spawn()
            .expect("router starts");
        Self {
            child,
            consumer_name: consumer_name.to_owned(),
        }
    }

    /// CPU time (user + system) the router has used so far, from /proc.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("the router's /proc entry");
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th fields of the line.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<u64> = after_name
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|f| f.parse().ok())
            .collect();
        let ticks: u64 = fields.iter().sum();
        Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second())
    }

    /// The most memory the router has had resident so far (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the router's /proc entry");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kib * 1024
    }

    /// SIGSTOP: the router keeps its connections and does nothing, as in
    /// a long GC-like stall or a VM paused; [`Self::resume`] ends it.
    pub fn pause(&self) {
        crate::redis_server::send_signal(&self.child, "-STOP");
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) {
        crate::redis_server::send_signal(&self.child, "-CONT");
    }

    /// SIGKILL: no shutdown code runs, as in a crash or an OOM kill.
    pub fn kill(mut self) {
        self.child.kill().expect("kill router");
        self.child.wait().expect("reap router");
    }

    /// SIGTERM, then waits up to `within` for a clean exit.
    pub async fn terminate(mut self, within: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGTERM delivered");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("router status") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "router did not exit within {within:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
