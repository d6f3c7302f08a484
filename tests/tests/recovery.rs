//! A router killed mid-run loses nothing and keeps per-user order.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e_tests::{workspace_binary, TestDestination, TestSystem};

struct RouterProcess(Child);

impl RouterProcess {
    fn start(config: &std::path::Path, log: &std::path::Path) -> Self {
        let log = std::fs::File::create(log).expect("log file");
        let child = Command::new(workspace_binary("router"))
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("router starts");
        Self(child)
    }

    /// SIGKILL: no shutdown code runs, as in a crash or OOM kill.
    fn kill(mut self) {
        self.0.kill().expect("kill router");
        self.0.wait().expect("reap router");
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_mid_run_delivers_everything_in_order_after_restart() {
    let system = TestSystem::start_without_router(vec![
        TestDestination::new("crm", "/slow/2/crm"),
        TestDestination::new("flaky", "/random/30").retry(5, 50, 50),
    ])
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("router.toml");
    std::fs::write(&config, system.router_config_toml()).expect("write config");

    let users = 50;
    let per_user = 40;
    let total = users * per_user;
    let router = RouterProcess::start(&config, &dir.path().join("router-1.log"));
    let mut posters = system.spawn_posters(users, per_user);

    system
        .wait_delivered("crm", total / 4, Duration::from_secs(60))
        .await;
    router.kill();
    let delivered_at_kill = system.received("crm").unique;
    assert!(delivered_at_kill < total, "the kill happened mid-run");

    let router = RouterProcess::start(&config, &dir.path().join("router-2.log"));
    while let Some(result) = posters.join_next().await {
        result.expect("every event accepted");
    }
    for name in ["crm", "flaky"] {
        system
            .wait_delivered(name, total, Duration::from_secs(120))
            .await;
        let received = system.received(name);
        assert_eq!(received.unique, total, "{name}: nothing lost");
        assert_eq!(
            received.order_violations, 0,
            "{name}: per-user order kept across the crash"
        );
        eprintln!(
            "{name}: {} duplicates after one SIGKILL (allowed, at-least-once)",
            received.duplicates
        );
    }
    drop(router);
}
