#!/usr/bin/env bash
# Runs the benchmark on this machine and writes its results into
# docs/benchmarks.md and docs/latency-vs-load.svg: redis-server with
# config/redis.conf, the gateway, the router, a sink and a load generator,
# all started from scratch on loopback (release build). About 5 minutes.
#
#   scripts/bench.sh            the full run
#   scripts/bench.sh --quick    every phase with tiny sizes (a smoke test)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-tools.sh
ensure_redis_server

cargo build --release --locked -p gateway -p router -p bench
exec target/release/bench "$@"
