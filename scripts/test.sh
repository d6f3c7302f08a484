#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs redis-server,
# openssl, rustfmt and clippy, Chromium, the Python test tools, docker-compose, and nightly Rust
# with cargo-fuzz when missing, checks the container files, builds the
# binaries the crash tests start, compiles the testcontainers variant of the
# harness, runs every test, then the end-to-end suite again on a Redis
# Cluster, then the fuzz target briefly, then the shipped containers for
# real (scripts/test-containers.sh; EVD_SKIP_CONTAINER_TESTS=1 skips them,
# loudly, on a machine without Docker).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-tools.sh
ensure_redis_server
ensure_openssl
ensure_python_tools
ensure_node_tools
ensure_rust_lints

# A clean clone gains nothing from incremental compilation, and full debug info
# triples the size of target/: on CI keep both off so the build fits a small disk.
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0 CARGO_PROFILE_DEV_DEBUG=line-tables-only
  df -h . | sed 's/^/disk: /'
fi

scripts/check-containers.sh

# Formatting and lints first: a warning fails the run.
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# The crash-recovery tests run the router as a child process.
cargo build --workspace --bins --locked
# Every test of the testcontainers harness compiles (scripts/test-containers.sh
# runs its delivery suite).
cargo check -p e2e-tests --features testcontainers --tests --locked

# The end-to-end tests that run on whatever Redis the harness starts, run a
# second time on a local Redis Cluster (3 masters + 3 replicas), there with
# every reader sharing its shard's wake-up (reader.own_connections = 0; the
# first run gives most test routers, with few destinations, readers of their
# own, as users get by default). A test belongs to the cluster suite by its
# file: tests that stop or pause their one Redis server live in
# tests/single_redis.rs, which is not in the list.
cluster_suite=(-p e2e-tests --test delivery --test admin --test faults --test ingest --test destinations --test policies)
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  EVD_TEST_REDIS=cluster EVD_TEST_READERS=shared cargo nextest run "${cluster_suite[@]}" --locked --no-fail-fast
else
  # Trace export is process-wide: each test of tests/traces.rs (otlp_*) needs a
  # process of its own, as nextest gives every test.
  cargo test --workspace --locked --no-fail-fast -- --skip otlp_
  for t in $(cargo test -p e2e-tests --test traces --locked -- --list 2>/dev/null | sed -n 's/: test$//p'); do
    cargo test -p e2e-tests --test traces --locked -- --exact "$t"
  done
  EVD_TEST_REDIS=cluster EVD_TEST_READERS=shared cargo test "${cluster_suite[@]}" --locked --no-fail-fast
fi

# The request-parsing fuzz target, briefly, without growing the kept corpus
# (scripts/fuzz.sh documents the longer run).
FUZZ_SCRATCH=1 scripts/fuzz.sh "${FUZZ_SECONDS:-60}"

# The Dockerfile and both compose files, run on a Docker engine (a private
# one when none answers): about 7 minutes cold, 2 with the image cache.
scripts/test-containers.sh
