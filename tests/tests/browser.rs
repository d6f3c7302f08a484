//! The status page in a real browser: headless Chromium, driven by
//! `tests/python/status_page.py` (Playwright), while events flow. The
//! screenshot it takes is the one docs/operations.md shows.
//!
//! Needs `chromium` (at `/usr/bin/chromium`, or set `EVD_CHROMIUM`) and
//! the suite's Python tools (see [`e2e_tests::test_python`]).

use std::process::Command;
use std::time::Duration;

use e2e_tests::{test_python, wait_for, workspace_root, TestDestination, TestSystem, ADMIN_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};

const PATIENCE: Duration = Duration::from_secs(60);

/// Posts events of a few users, one at a time each, until `stop`; returns
/// how many were accepted.
async fn post_until(
    http: reqwest::Client,
    url: String,
    stop: tokio_util::sync::CancellationToken,
) -> usize {
    let mut accepted = 0;
    while !stop.is_cancelled() {
        let user = format!("live-{}", accepted % 4);
        let response = http
            .post(&url)
            .json(&json!({ "userId": user, "payload": { "n": accepted } }))
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(response.status(), 202);
        accepted += 1;
    }
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_a_browser_matches_the_admin_api_and_replays_dead_letters() {
    let python = test_python();
    let chromium = std::env::var("EVD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let system = TestSystem::start(vec![
        TestDestination::new("crm", "/ok/crm"),
        TestDestination::new("billing", "/outage/billing").retry(10, 20, 2),
        TestDestination::new("analytics", "/slow/50/analytics"),
        TestDestination::new("warehouse", "/ok/warehouse"),
    ])
    .await;
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/warehouse/pause", None)
        .await;
    assert_eq!(status, 200);

    // Billing is down while these arrive: each ends as a dead letter.
    system.recorder.set_outage("/outage/billing", true);
    let accepted = system.send_numbered(3, 8).await;
    wait_for("24 dead letters for billing", PATIENCE, || async {
        let view = system.destination_view("billing").await;
        view["dead_letters"] == 24 && view["pending"] == 0
    })
    .await;
    system.recorder.set_outage("/outage/billing", false);

    // Events keep flowing while the browser looks.
    let stop = tokio_util::sync::CancellationToken::new();
    let flow = tokio::spawn(post_until(
        system.http.clone(),
        format!("{}/v1/events", system.gateway_url),
        stop.clone(),
    ));
    let screenshot = workspace_root().join("docs/status-page.png");
    let output = Command::new(&python)
        .arg(workspace_root().join("tests/python/status_page.py"))
        .args(["--admin-url", system.admin_url.as_deref().expect("router")])
        .args(["--admin-token", ADMIN_TOKEN])
        .args(["--replay", "billing", "--chromium", &chromium])
        .arg("--screenshot")
        .arg(&screenshot)
        .output()
        .expect("the browser script runs");
    assert!(
        output.status.success(),
        "browser check failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).expect("JSON result");
    assert_eq!(result["replayed"], 24);
    assert!(std::fs::metadata(&screenshot).expect("screenshot").len() > 10_000);

    // The click replayed them: delivered in each user's order, then gone.
    wait_for("billing's dead letters replayed", PATIENCE, || async {
        system.destination_view("billing").await["dead_letters"] == 0
    })
    .await;
    stop.cancel();
    let flowed = flow.await.expect("poster");
    assert!(flowed > 0, "events flowed during the browser check");
    let mut delivered = system.delivered_per_user("billing");
    delivered.retain(|user, _| !user.starts_with("live-"));
    assert_eq!(delivered, accepted);
}
