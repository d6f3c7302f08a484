#!/usr/bin/env bash
# The chaos test (tests/tests/chaos.rs) for longer, by hand:
#
#   scripts/soak.sh [seed] [seconds]      # defaults: a random seed, 600 s
#
# A Redis Cluster with two replicas per master, two routers, the gateway and
# two destinations under load, with masters paused and killed, routers
# killed and paused, a destination down and one hanging, one fault at a
# time in an order the seed picks, until the time is up. Then every accepted
# event must reach both destinations in per-user order within 120 s, and the
# shard streams must hold each user's events in the order sent. Prints each
# fault and the summary; the whole log goes to target/soak/seed-<seed>.log,
# the routers' logs to target/soak/seed-<seed>-routers/.
# A failing seed replays the same faults in the same order.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-tools.sh
ensure_redis_server

seed="${1:-$((RANDOM * 32768 + RANDOM))}"
seconds="${2:-600}"
mkdir -p target/soak
log="target/soak/seed-$seed.log"
rm -rf "target/soak/seed-$seed-routers"
cargo build --workspace --bins --locked --quiet
echo "soak: seed $seed for $seconds s (log: $log)"
status=0
EVD_CHAOS_SEED="$seed" EVD_CHAOS_SECONDS="$seconds" EVD_CHAOS_LOGS="$PWD/target/soak/seed-$seed-routers" \
  cargo test -p e2e-tests --locked --quiet --test chaos -- --nocapture >"$log" 2>&1 || status=$?
grep -E '^ +[0-9.]+ s |^seed |^[xy]: |panicked|^test result' "$log" | cut -c1-400 || true
exit "$status"
