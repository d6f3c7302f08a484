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
