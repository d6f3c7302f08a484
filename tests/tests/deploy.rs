//! What the container images rely on: each binary's `health` subcommand,
//! which the Dockerfile's and compose file's health checks run (the
//! runtime image has no shell or curl).

use std::process::Command;

use e2e_tests::{workspace_binary, TestDestination, TestSystem};

/// Runs `binary args…` with `env`; returns whether it exited 0, and stderr.
fn run(binary: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new(workspace_binary(binary))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn host_port(url: &str) -> &str {
    url.trim_start_matches("http://")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_subcommands_pass_on_running_services_and_fail_on_a_dead_port() {
    let mut system = TestSystem::start(vec![TestDestination::new("fast", "/ok/fast")]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let router_config = system.write_router_config(dir.path());
    let router_config = router_config.to_str().expect("utf-8 path");
    let admin = system.admin_url.clone().expect("the router runs");
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").to_string()
    };
    // The gateway's config needs a key or auth off to load; health only
    // reads its listen address.
    let gateway_env = |listen| {
        [
            ("GATEWAY_LISTEN", listen),
            ("GATEWAY_AUTH__REQUIRED", "false"),
        ]
    };
    let gateway = host_port(&system.gateway_url).to_owned();

    let (ok, stderr) = run("gateway", &["health"], &gateway_env(&gateway));
    assert!(ok, "gateway health on a ready gateway: {stderr}");
    let (ok, stderr) = run("gateway", &["health"], &gateway_env(&dead));
    assert!(!ok && stderr.contains("cannot reach"), "{stderr}");

    let router_args = ["--config", router_config, "health"];
    let (ok, stderr) = run(
        "router",
        &router_args,
        &[("ROUTER_ADMIN__LISTEN", host_port(&admin))],
    );
    assert!(ok, "router health on a running router: {stderr}");
    let (ok, _) = run("router", &router_args, &[("ROUTER_ADMIN__LISTEN", &dead)]);
    assert!(!ok, "router health on a dead port fails");

    let mock = host_port(&system.mock_url);
    let (ok, stderr) = run("mock-destinations", &["--listen", mock, "health"], &[]);
    assert!(ok, "mock-destinations health: {stderr}");
    let (ok, _) = run("mock-destinations", &["--listen", &dead, "health"], &[]);
    assert!(!ok, "mock-destinations health on a dead port fails");

    // Not ready: Redis gone, so /readyz answers 503 and the check fails.
    system.stop_router().await;
    system.redis.server().stop().await;
    let (ok, stderr) = run("gateway", &["health"], &gateway_env(&gateway));
    assert!(
        !ok && stderr.contains("503"),
        "gateway health without Redis: {stderr}"
    );
}
