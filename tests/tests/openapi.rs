//! Each OpenAPI document against its running service (the gateway's
//! `/openapi.json`, the router's `/admin/openapi.json`): schemathesis (PyPI)
//! generates requests from it, valid and invalid, and checks every answer:
//! no 5xx, each status documented, each body matching its schema, requests
//! without the token refused.

use std::process::Command;

use e2e_tests::{test_python, TestDestination, TestSystem, ADMIN_TOKEN, API_KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_mismatch() {
    let system = TestSystem::start(vec![TestDestination::new("crm", "/ok")]).await;
    system.wait_destinations_registered("crm").await;
    // Schema-valid events may name any destination, but the gateway
    // rightly refuses (400) names the router does not serve; the generator
    // cannot know those names, so the positive-data check is off.
    schemathesis(
        &format!("{}/openapi.json", system.gateway_url),
        API_KEY,
        4,
        &["positive_data_acceptance"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_passes_schemathesis_too() {
    let system = TestSystem::start(vec![TestDestination::new("crm", "/ok")]).await;
    system.wait_destinations_registered("crm").await;
    let admin = system
        .admin_url
        .clone()
        .expect("the router's admin listener");
    // Schema-valid requests rightly meet 404 (a generated name that does
    // not exist), 409 (one that does) and 400 (a URL that is not http, a
    // timeout longer than a lease): the positive-data check is off here too.
    // And purging dead letters (DELETE …/dead-letters) empties a list that
    // stays readable, which the use-after-free check takes for a deleted
    // resource still answering.
    schemathesis(
        &format!("{admin}/admin/openapi.json"),
        ADMIN_TOKEN,
        14,
        &["positive_data_acceptance", "use_after_free"],
    );
}

/// Runs schemathesis over the document at `url` with `token` and every
/// check but `excluded`, insisting on a clean report that tested
/// `operations` operations.
fn schemathesis(url: &str, token: &str, operations: usize, excluded: &[&str]) {
    let schemathesis = test_python().with_file_name("schemathesis");
    // It keeps a cache of failures in its working directory: not the repo.
    let scratch = tempfile::tempdir().expect("temp dir");
    let output = Command::new(&schemathesis)
        .current_dir(scratch.path())
        .arg("run")
        .arg(url)
        .args(["--checks", "all"])
        .args(["--exclude-checks", &excluded.join(",")])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--max-examples", "100", "--seed", "20261122"])
        .output()
        .expect("schemathesis runs");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        report.contains(&format!("Tested: {operations}")),
        "every operation was tested:\n{report}"
    );
}
