//! The benchmark itself keeps working: `bench --quick` runs every phase
//! against the debug binaries and must find every event delivered in order.

use std::process::Command;

use e2e_tests::workspace_binary;

#[test]
fn quick_benchmark_runs_every_phase_and_checks_order() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let report = dir.path().join("benchmarks.md");
    std::fs::write(&report, "# Kept\n").expect("seed the report");
    let bench = workspace_binary("bench");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let output = Command::new(&bench)
        .arg("--quick")
        .arg("--redis-config")
        .arg(repo.join("config/redis.conf"))
        .arg("--work-dir")
        .arg(dir.path().join("run"))
        .arg("--report")
        .arg(&report)
        .output()
        .expect("bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench --quick failed:\n{stderr}");

    let written = std::fs::read_to_string(&report).expect("report written");
    assert!(
        written.starts_with("# Kept\n"),
        "text around the section is kept"
    );
    for expected in ["## Latest run", "### Targets", "### Drain", "all, in order"] {
        assert!(
            written.contains(expected),
            "report lacks {expected:?}:\n{written}"
        );
    }
    assert!(
        !written.contains(" missing, "),
        "every check passed, so no verdict is spelled out:\n{written}"
    );
    let plot = std::fs::read_to_string(dir.path().join("latency-vs-load.svg")).expect("plot");
    assert_eq!(plot.matches("<polyline").count(), 2, "a p50 and a p99 line");
}
