//! The console in a real browser: headless Chromium (Debian's), driven by
//! `tests/browser/console.mjs` (npm `playwright-core`) through the flows an
//! operator uses: events counted, a destination created through the form
//! (after a refused field), an event's attempts, pause and resume, dead
//! letters replayed from the page, deletion; no page wider than 1,280 px
//! with 10 destinations, and markup from users and destinations shown as
//! text. Its screenshots are the ones docs/console.md shows.
//!
//! Needs `chromium` (or `EVD_CHROMIUM`), `node`, and the packages of
//! `tests/browser` (`scripts/test.sh` installs them).

use std::process::Command;
use std::time::Duration;

use e2e_tests::{wait_for, workspace_root, TestDestination, TestSystem, ADMIN_TOKEN};
use serde_json::{json, Value};

const PATIENCE: Duration = Duration::from_secs(60);

/// A user id that runs script wherever a page shows it unescaped.
const MARKUP_USER: &str = r#"<script>window.__xss=4</script>"><img src=x onerror=window.__xss=5>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_browser_creates_pauses_replays_and_deletes() {
    let chromium = std::env::var("EVD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let modules = workspace_root().join("tests/browser/node_modules/playwright-core");
    assert!(
        modules.exists(),
        "{} is missing: run scripts/test.sh, which installs it (npm ci in tests/browser)",
        modules.display()
    );
    let mut destinations = vec![
        TestDestination::new("crm", "/ok/crm"),
        TestDestination::new("billing", "/outage/billing").retry(10, 20, 2),
        TestDestination::new("markup", "/markup").retry(10, 20, 1),
    ];
    // Ten in all: the overview must still fit 1,280 px.
    destinations.extend(
        (1..=7).map(|i| TestDestination::new(&format!("team-{i}"), &format!("/ok/team-{i}"))),
    );
    let system = TestSystem::start(destinations).await;

    // Billing is down while these arrive: each ends as a dead letter.
    system.recorder.set_outage("/outage/billing", true);
    let accepted = system.send_numbered(3, 4).await;
    let response = system
        .http
        .post(format!("{}/v1/events", system.gateway_url))
        .json(&json!({ "userId": MARKUP_USER, "payload": { "note": "<script>window.__xss=3</script>" } }))
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(response.status(), 202);
    let sent = 13;
    wait_for(
        "every event dead-lettered for billing and markup",
        PATIENCE,
        || async {
            let billing = system.destination_view("billing").await;
            let markup = system.destination_view("markup").await;
            billing["dead_letters"] == sent
                && billing["pending"] == 0
                && markup["dead_letters"] == sent
        },
    )
    .await;
    system.recorder.set_outage("/outage/billing", false);

    let output = Command::new("node")
        .arg(workspace_root().join("tests/browser/console.mjs"))
        .args(["--admin-url", system.admin_url.as_deref().expect("router")])
        .args(["--token", ADMIN_TOKEN])
        .args(["--chromium", &chromium])
        .args(["--mock-url", &system.mock_url])
        .args(["--crm-events", &sent.to_string()])
        .args(["--markup-user", MARKUP_USER])
        .arg("--screenshots")
        .arg(workspace_root().join("docs/console"))
        .output()
        .expect("node runs the browser script");
    assert!(
        output.status.success(),
        "browser check failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).expect("JSON result");
    assert_eq!(seen["dead_letters"], sent, "{seen}");
    assert_eq!(seen["flows"].as_array().map(Vec::len), Some(9), "{seen}");

    // The click replayed them: delivered in each user's order.
    let mut delivered = system.delivered_per_user("billing");
    delivered.remove(MARKUP_USER);
    assert_eq!(delivered, accepted);
}

/// The text a console page shows in its `data-field="{field}"` element.
async fn shown_text(
    system: &TestSystem,
    admin_url: &str,
    path: &str,
    field: &str,
) -> Option<String> {
    let page = system
        .http
        .get(format!("{admin_url}{path}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let marker = format!(r#"data-field="{field}">"#);
    let at = page.find(&marker)? + marker.len();
    page[at..].split('<').next().map(str::to_owned)
}

/// The count a console page shows in its `data-field="{field}"` element.
async fn shown(system: &TestSystem, admin_url: &str, path: &str, field: &str) -> Option<u64> {
    shown_text(system, admin_url, path, field)
        .await?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_counts_every_routers_attempts_and_outlives_their_restart() {
    let mut system = TestSystem::start(vec![TestDestination::new("crm", "/ok/crm")]).await;
    let second = system.start_extra_router("router-b", |_| {});
    system
        .wait_leased_by("crm", &["test-router", "router-b"], PATIENCE)
        .await;
    let accepted = system.send_numbered(8, 5).await;
    let sent: usize = accepted.values().map(Vec::len).sum();
    let first_url = system.admin_url.clone().expect("router");
    let page = "/destinations/crm";
    wait_for(
        "the console to count every router's attempts",
        PATIENCE,
        || async { shown(&system, &first_url, page, "attempts").await == Some(sent as u64) },
    )
    .await;
    // Each router delivered only its share: the count spans both.
    let own = |view: Value| view["status"]["delivered"].as_u64().unwrap_or(0);
    let first = own(system.admin_get("/admin/destinations/crm").await);
    assert!(
        0 < first && first < sent as u64,
        "the first router delivered {first} of {sent}"
    );

    second.stop().await;
    system.stop_router().await;
    system.start_router();
    let restarted_url = system.admin_url.clone().expect("router");
    assert_ne!(restarted_url, first_url);
    assert_eq!(
        shown(&system, &restarted_url, page, "attempts").await,
        Some(sent as u64),
        "a restarted router shows the history in Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_pending_event_is_aged_until_it_is_finished() {
    let system = TestSystem::start(vec![TestDestination::new("stuck", "/stall/stuck")]).await;
    system.recorder.set_outage("/stall/stuck", true);
    let before_ms = protocol::unix_millis();
    system.send("u", json!({ "n": 1 })).await;
    system.send("u", json!({ "n": 2 })).await;
    wait_for(
        "the first event pending, its age measured",
        PATIENCE,
        || async {
            let view = system.destination_view("stuck").await;
            view["pending"].as_u64() >= Some(1)
                && view["oldest_pending_ms"]
                    .as_u64()
                    .is_some_and(|at| (before_ms..=protocol::unix_millis()).contains(&at))
        },
    )
    .await;
    let admin_url = system.admin_url.clone().expect("router");
    let age = shown_text(&system, &admin_url, "/destinations/stuck", "oldest")
        .await
        .unwrap_or_default();
    assert!(
        age.starts_with(|c: char| c.is_ascii_digit()),
        "the console shows the age: `{age}`"
    );
    system.recorder.set_outage("/stall/stuck", false);
    wait_for("nothing pending, no age", PATIENCE, || async {
        let view = system.destination_view("stuck").await;
        view["pending"] == 0 && view["oldest_pending_ms"].is_null()
    })
    .await;
}
