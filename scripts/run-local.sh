#!/usr/bin/env bash
# Runs the whole system on this machine: redis-server with config/redis.conf
# (data in ./data), the mock destinations, the router (wired to a healthy, a
# flaky, a slow and a down destination) and the gateway. Ctrl-C stops all.
#
#   REDIS_PORT (6379)  GATEWAY_PORT (8080)  MOCK_PORT (9000)  ADMIN_PORT (9100)
#   PROFILE (release; `dev` builds faster, runs slower)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-tools.sh
ensure_redis_server

REDIS_PORT=${REDIS_PORT:-6379}
GATEWAY_PORT=${GATEWAY_PORT:-8080}
MOCK_PORT=${MOCK_PORT:-9000}
ADMIN_PORT=${ADMIN_PORT:-9100}
PROFILE=${PROFILE:-release}

for port in "$REDIS_PORT" "$GATEWAY_PORT" "$MOCK_PORT" "$ADMIN_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "Port $port is already in use; stop what runs there or set REDIS_PORT / GATEWAY_PORT / MOCK_PORT / ADMIN_PORT." >&2
    exit 1
  fi
done

echo "Building ($PROFILE)..."
cargo build --profile "$PROFILE" --bins --locked
if [ "$PROFILE" = dev ]; then bin=target/debug; else bin="target/$PROFILE"; fi

pids=()
cleanup() {
  trap - EXIT INT TERM
  echo "Stopping..."
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

mkdir -p data
redis-server config/redis.conf --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$PWD/data" --daemonize no &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

redis_url="redis://127.0.0.1:$REDIS_PORT"
mock="http://127.0.0.1:$MOCK_PORT"
# The demo signing secret of config/router.demo.toml: the mocks answer 401 to
# a delivery without its valid signature.
"$bin/mock-destinations" --listen "127.0.0.1:$MOCK_PORT" --signing-secret "whsec_ZGVtby1zaWduaW5nLXNlY3JldC1mb3ItbG9jYWwtdXNlLW9ubHk=" &
pids+=($!)
# The demo router config, its destinations pointed at MOCK_PORT.
router_config=$(mktemp)
sed "s#http://mock-destinations:9000#$mock#" config/router.demo.toml > "$router_config"
ROUTER_REDIS__URL="$redis_url" ROUTER_ADMIN__LISTEN="127.0.0.1:$ADMIN_PORT" "$bin/router" --config "$router_config" &
pids+=($!)
# GATEWAY_PORT is this script's setting, not the gateway's (whose GATEWAY_*
# variables are config keys): keep it out of the gateway's environment.
env -u GATEWAY_PORT GATEWAY_REDIS__URL="$redis_url" GATEWAY_LISTEN="127.0.0.1:$GATEWAY_PORT" \
  "$bin/gateway" --config config/gateway.demo.toml &
pids+=($!)

gateway="http://127.0.0.1:$GATEWAY_PORT"
# The demo API key of config/gateway.demo.toml and admin token of
# config/router.demo.toml (local use only).
key="evd_demo-key-for-local-use-only"
admin_token="evd_admin_demo-token-for-local-use-only"
for _ in $(seq 100); do curl -sf "$gateway/readyz" >/dev/null 2>&1 && break; sleep 0.1; done

cat <<EOT

  Event delivery is running.
    gateway            $gateway
    mock destinations  $mock      (healthy: /ok, flaky: /flaky/2, slow: /slow/2000, down: /fail)
    console            http://127.0.0.1:$ADMIN_PORT/   (admin API under /admin, metrics at /metrics)
                       sign in with any user name and the admin token $admin_token
    API key            $key
    redis              $redis_url   (data in ./data)

  Send an event:
    curl -s -XPOST $gateway/v1/events -H 'content-type: application/json' \\
      -H 'authorization: Bearer $key' -d '{"userId": "alice", "payload": {"order": 1}}'

  Send a batch, or an event for one destination only:
    curl -s -XPOST $gateway/v1/batch -H 'content-type: application/json' \\
      -H 'authorization: Bearer $key' -d '{"events": [{"userId": "bob", "payload": 1}, {"userId": "bob", "payload": 2}]}'
    curl -s -XPOST $gateway/v1/events -H 'content-type: application/json' \\
      -H 'authorization: Bearer $key' -d '{"userId": "carol", "payload": {}, "destinations": ["healthy"]}'

  Watch them land (per-user order violations and duplicates are counted):
    curl -s '$mock/received?path=/ok'
    curl -s '$mock/received'

  Dead letters of the always-failing destination, and replaying them:
    curl -s -H 'authorization: Bearer $admin_token' 'http://127.0.0.1:$ADMIN_PORT/admin/destinations/down/dead-letters?limit=5'
    curl -s -XPOST -H 'authorization: Bearer $admin_token' http://127.0.0.1:$ADMIN_PORT/admin/destinations/down/dead-letters/replay

  Pause and resume a destination (its events wait in Redis meanwhile):
    curl -s -XPOST -H 'authorization: Bearer $admin_token' http://127.0.0.1:$ADMIN_PORT/admin/destinations/slow/pause
    curl -s -XPOST -H 'authorization: Bearer $admin_token' http://127.0.0.1:$ADMIN_PORT/admin/destinations/slow/resume

  Ctrl-C stops everything.
EOT
wait -n "${pids[@]}"
