#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs redis-server,
# openssl, Chromium, the Python test tools, and nightly Rust with cargo-fuzz
# when missing, builds the binaries the crash tests
# start, compiles the testcontainers variant of the harness, and runs every
# test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-tools.sh
ensure_redis_server
ensure_openssl
ensure_python_tools

# The crash-recovery tests run the router as a child process.
cargo build --workspace --bins --locked
# CI compiles (but cannot run: no Docker engine) the testcontainers harness.
cargo check -p e2e-tests --features testcontainers --tests --locked

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

# The request-parsing fuzz target, briefly, without growing the kept corpus
# (scripts/fuzz.sh documents the longer run).
FUZZ_SCRATCH=1 scripts/fuzz.sh "${FUZZ_SECONDS:-60}"
