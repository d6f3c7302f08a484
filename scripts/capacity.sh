#!/usr/bin/env bash
# Measures drain capacity on a local Redis Cluster (3 masters + 3 replicas)
# with 1 and with 3 routers, and the CPU a router and a Redis master spend
# per delivered event (release build; the figures behind docs/scaling.md's
# capacity plan). CAPACITY_EVENTS_PER_USER (default 100) × 1000 users per round.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-tools.sh
ensure_redis_server

cargo build --release --locked --bins
cargo nextest run --release --locked -p e2e-tests --test capacity --run-ignored only \
  --no-capture 2>&1 | grep -E '^CAPACITY|PASS|FAIL|panicked'
