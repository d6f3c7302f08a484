#!/usr/bin/env bash
# Runs the shipped containers for real (scripts/test.sh runs this; see
# docs/testing.md#containers):
#  1. a Docker engine: the one that answers, or a private dockerd whose data
#     root is kept in $EVD_DOCKER_CACHE between runs (images and build cache);
#  2. stand-ins, from a debootstrapped Debian bookworm, for the base images
#     that cannot be pulled, under the names the shipped files use;
#  3. the project's images, from the shipped Dockerfile;
#  4. docker-compose.yml: every service healthy, events through the gateway
#     port reach the four demo destinations as the README says, in per-user
#     order, and the console answers;
#  5. three routers split the leases; one killed, the others take its
#     shards and nothing is lost;
#  6. down and up again, keeping the volume: events accepted while a
#     destination was paused are delivered after `up` (the AOF volume);
#  7. docker-compose.cluster.yml: the cluster forms and events flow;
#  8. the delivery tests with the harness's testcontainers variant (Redis in
#     a container on this engine).
# Everything it started (containers, networks, volumes, the private daemon)
# is removed at the end, whether or not a step failed.
#
# EVD_SKIP_CONTAINER_TESTS=1 skips it, loudly, on a machine without Docker.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-tools.sh

if [ "${EVD_SKIP_CONTAINER_TESTS:-}" = 1 ]; then
  echo "################################################################"
  echo "# CONTAINER TESTS SKIPPED (EVD_SKIP_CONTAINER_TESTS=1): the     #"
  echo "# Dockerfile and compose files were NOT run.                   #"
  echo "################################################################"
  exit 0
fi

started=$(date +%s)
work=$(mktemp -d /tmp/evd-containers.XXXXXX)
cache=${EVD_DOCKER_CACHE:-/var/cache/evd-test-containers}
docker_cli=/usr/bin/docker # Debian's 20.10 CLI: it builds with BuildKit.
# docker-compose runs `docker` for builds: Debian's, not a newer client
# without buildx that may come first on the PATH.
export PATH=/usr/bin:$PATH
export DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1
projects=(evd-test evd-test-cluster)
daemon_pid=""
key='evd_demo-key-for-local-use-only'
admin='evd_admin_demo-token-for-local-use-only'

docker() { "$docker_cli" "$@"; }
compose() { docker-compose -p evd-test "$@"; }
cluster_compose() { docker-compose -p evd-test-cluster -f docker-compose.cluster.yml "$@"; }

remove_projects() {
  compose down --volumes --remove-orphans >/dev/null 2>&1 || true
  cluster_compose down --volumes --remove-orphans >/dev/null 2>&1 || true
}

cleanup() {
  local status=$?
  set +e
  if [ "$status" -ne 0 ] && [ -n "${DOCKER_HOST:-}" ]; then
    # The `down` destination's attempts fill the logs; leave them out so
    # the lines that explain a failure are still there.
    echo "FAILED; the last logs of every service (without the down destination's attempts):" >&2
    for project in "${projects[@]}"; do
      docker-compose -p "$project" logs --no-color --tail 2000 2>/dev/null \
        | grep -v -E 'destination[^,]{0,4}down[^a-z_-]' | tail -250 >&2
    done
  fi
  [ -n "${DOCKER_HOST:-}" ] && remove_projects
  if [ -n "$daemon_pid" ]; then
    kill "$daemon_pid" 2>/dev/null
    wait "$daemon_pid" 2>/dev/null
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

fail() {
  echo "CONTAINER TEST FAILED: $*" >&2
  exit 1
}

# Polls `command` every half second until it succeeds, or fails with `what`
# after `seconds`.
wait_for() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$(($(date +%s) + seconds))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "$what (waited ${seconds} s)"
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------
# 1. A Docker engine.
command -v dockerd >/dev/null 2>&1 || apt_install "dockerd" docker.io
command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose docker-compose
command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap debootstrap
command -v jq >/dev/null 2>&1 || apt_install jq jq

# Starts dockerd with its data root in $cache (kept between runs) and the
# rest under $work; fails if it does not answer within a minute.
start_private_daemon() {
  mkdir -p "$cache" "$work/exec"
  # One run at a time per cache; a daemon left by a run that was killed is
  # stopped first (its pid file stays in the cache).
  exec 9>"$cache/lock"
  flock 9
  local stale
  stale=$(cat "$cache/dockerd.pid" 2>/dev/null || true)
  if [ -n "$stale" ] && [ "$(cat "/proc/$stale/comm" 2>/dev/null)" = dockerd ]; then
    kill "$stale"
    while kill -0 "$stale" 2>/dev/null; do sleep 0.5; done
  fi
  export DOCKER_HOST="unix://$work/docker.sock"
  dockerd --data-root "$cache/data" --exec-root "$work/exec" -H "$DOCKER_HOST" \
    --pidfile "$cache/dockerd.pid" >"$work/dockerd.log" 2>&1 9>&- &
  daemon_pid=$!
  for _ in $(seq 120); do
    docker info >/dev/null 2>&1 && return 0
    kill -0 "$daemon_pid" 2>/dev/null || break
    sleep 0.5
  done
  return 1
}

if docker info >/dev/null 2>&1; then
  export DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}
  echo "Using the Docker engine at $DOCKER_HOST."
elif start_private_daemon; then
  echo "Started a private Docker engine (data root $cache/data, kept between runs)."
else
  tail -20 "$work/dockerd.log" >&2 || true
  echo "################################################################" >&2
  echo "# NO DOCKER ENGINE: none answers and dockerd could not start.  #" >&2
  echo "# The container tests cannot run. On a machine without Docker, #" >&2
  echo "# set EVD_SKIP_CONTAINER_TESTS=1 to skip them deliberately.    #" >&2
  echo "################################################################" >&2
  exit 1
fi
# Containers and volumes left by an interrupted run.
remove_projects

# ---------------------------------------------------------------------------
# 2. Stand-ins for base images that cannot be pulled here, under the names
#    the shipped files use. Each is labelled with a digest of what it was
#    built from, and rebuilt only when that changes.
build_image=$(awk '/^FROM rust:/ {print $2; exit}' Dockerfile)
runtime_image=$(awk '/^FROM .* AS runtime/ {print $2; exit}' Dockerfile)
redis_image=$(awk '/image: redis:/ {print $2; exit}' docker-compose.yml)
# The build stand-in carries this machine's toolchain: it must be the
# version the Dockerfile names (rust:1.95-… matches 1.95.x).
toolchain=$(rustc --version | cut -d' ' -f2)
case "${build_image#rust:}" in
  "${toolchain%.*}"-* | "$toolchain"-*) ;;
  *) fail "the Dockerfile names $build_image; this machine's toolchain is $toolchain" ;;
esac

mkdir -p "$work/redis" "$work/runtime" "$work/rust/ca"
cat >"$work/redis/Dockerfile" <<'EOF'
FROM standin/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/*
# The official image is built with protected mode off (it is reached over a
# container network); Debian's is not, so a wrapper adds the flag.
RUN printf '#!/bin/sh\nexec /usr/bin/redis-server "$@" --protected-mode no\n' > /usr/local/bin/redis-server \
    && chmod +x /usr/local/bin/redis-server
CMD ["redis-server"]
EOF
cat >"$work/runtime/Dockerfile" <<'EOF'
FROM standin/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && echo 'nonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin' >> /etc/passwd \
    && echo 'nonroot:x:65532:' >> /etc/group \
    && mkdir -p /home/nonroot && chown 65532:65532 /home/nonroot
USER 65532:65532
EOF
cat >"$work/rust/Dockerfile" <<'EOF'
FROM standin/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# The machine's own trust anchors, so cargo reaches crates.io as the machine does.
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
COPY toolchain /usr/local/rust
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
EOF
cp /usr/local/share/ca-certificates/*.crt "$work/rust/ca/" 2>/dev/null || true
rust_inputs="$(rustc -vV) $(cat "$work/rust/ca/"* 2>/dev/null | sha256sum)"

# standin IMAGE DIR EXTRA_INPUTS [PREPARE]: builds DIR's Dockerfile as IMAGE
# unless IMAGE can be pulled or is already built from the same inputs.
standin() {
  local image=$1 dir=$2 inputs=$3 prepare=${4:-}
  local digest
  digest=$( (cat "$dir/Dockerfile"; echo "$inputs") | sha256sum | cut -c1-16)
  local label="evd.standin.digest"
  if [ "$(docker image inspect -f "{{index .Config.Labels \"$label\"}}" "$image" 2>/dev/null)" = "$digest" ]; then
    echo "STAND-IN: $image (cached): $(head -1 "$dir/what")"
    return
  fi
  if docker image inspect "$image" >/dev/null 2>&1 \
    && [ -z "$(docker image inspect -f "{{index .Config.Labels \"$label\"}}" "$image")" ]; then
    echo "$image: the real image is present; no stand-in needed."
    return
  fi
  if docker pull -q "$image" >/dev/null 2>&1; then
    echo "$image: pulled; no stand-in needed."
    return
  fi
  echo "STAND-IN: $image cannot be pulled; building $(head -1 "$dir/what")"
  [ -z "$prepare" ] || $prepare
  docker build -q --label "$label=$digest" -t "$image" "$dir" >/dev/null
}
echo "a Debian bookworm with Debian's redis-server 7.0 (protected mode off, as in the official image)." >"$work/redis/what"
echo "a Debian bookworm with CA certificates and the nonroot user 65532 (distroless has neither shell nor package manager; this one does)." >"$work/runtime/what"
echo "a Debian bookworm with gcc and this machine's Rust $toolchain toolchain and CA certificates." >"$work/rust/what"
copy_toolchain() { cp -a "$(rustc --print sysroot)" "$work/rust/toolchain"; }

if ! docker image inspect standin/debian:bookworm >/dev/null 2>&1; then
  echo "Making a Debian bookworm root file system with debootstrap."
  debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" \
    || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap"; }
  tar -C "$work/rootfs" -c . | docker import - standin/debian:bookworm >/dev/null
  rm -rf "$work/rootfs"
fi
standin "$redis_image" "$work/redis" ""
standin "$runtime_image" "$work/runtime" ""
standin "$build_image" "$work/rust" "$rust_inputs" copy_toolchain
rm -rf "$work/rust/toolchain"
# The test harness's testcontainers variant pins its own Redis tag.
harness_redis="redis:$(sed -n 's/.*IMAGE_TAG: &str = "\(.*\)";/\1/p' tests/src/redis_server.rs)"
if ! docker image inspect "$harness_redis" >/dev/null 2>&1 && ! docker pull -q "$harness_redis" >/dev/null 2>&1; then
  echo "STAND-IN: $harness_redis (the test harness's) is the $redis_image stand-in, tagged again."
  docker tag "$redis_image" "$harness_redis"
fi

# ---------------------------------------------------------------------------
# 3. The project's images, from the shipped Dockerfile and compose file.
build_started=$(date +%s)
compose build
build_seconds=$(($(date +%s) - build_started))

# ---------------------------------------------------------------------------
# Helpers for the scenarios.

# The services of a project that are running but not yet healthy (a
# one-shot service that exited is not listed).
not_healthy() {
  docker ps --filter "label=com.docker.compose.project=$1" --format '{{.Names}} {{.Status}}' \
    | grep -v '(healthy)' || true
}
all_healthy() {
  local project=$1 expected=$2
  [ "$(docker ps -q --filter "label=com.docker.compose.project=$project" | wc -l)" -eq "$expected" ] \
    && [ -z "$(not_healthy "$project")" ]
}

# post_events TAG USERS PER_USER: posts PER_USER events for each of USERS
# users (user-TAG-1 …), interleaved, and appends their ids to $work/TAG.ids.
post_events() {
  local tag=$1 users=$2 per_user=$3 n u response
  for n in $(seq "$per_user"); do
    for u in $(seq "$users"); do
      response=$(curl -fsS -XPOST localhost:8080/v1/events -H 'content-type: application/json' \
        -H "authorization: Bearer $key" \
        -d "{\"userId\": \"user-$tag-$u\", \"payload\": {\"n\": $n}}") \
        || fail "the gateway refused event $n of user-$tag-$u"
      jq -r .id <<<"$response" >>"$work/$tag.ids"
    done
  done
}

received() { curl -fsS "localhost:9000/received?path=$1"; }

# Whether PATH has delivered (2xx) every id in $work/TAG.ids.
delivered_all() {
  local path=$1 tag=$2
  received "$path" | jq -e --rawfile ids "$work/$tag.ids" '
    ([.events[] | select(.status < 300) | .id] | unique) as $got
    | ($ids | split("\n") | map(select(. != ""))) - $got | length == 0' >/dev/null
}

# Fails unless PATH got no delivery twice and none out of per-user order.
in_order_once() {
  local path=$1 summary
  summary=$(received "$path")
  jq -e '.duplicates == 0 and .order_violations == 0' <<<"$summary" >/dev/null \
    || fail "$path: $(jq -c '{delivered, duplicates, order_violations}' <<<"$summary")"
}

admin_port() { docker port "$1" 9100 | head -1 | cut -d: -f2; }
admin_get() { curl -fsS -H "authorization: Bearer $admin" "localhost:$1$2"; }
admin_post() { curl -fsS -XPOST -H "authorization: Bearer $admin" "localhost:$1$2"; }

# Every dead letter of `down` among the ids of TAG, each after 5 attempts.
dead_lettered_all() {
  local port=$1 tag=$2
  admin_get "$port" '/admin/destinations/down/dead-letters?limit=1000' \
    | jq -e --rawfile ids "$work/$tag.ids" '
      [.dead_letters[] | select(.attempts == 5) | .event_id] as $dead
      | ($ids | split("\n") | map(select(. != ""))) - $dead | length == 0' >/dev/null
}

# The routers holding the leases of `healthy`, one per line, as one router
# reports them.
lease_holders() {
  admin_get "$1" /admin/destinations | jq -r '.destinations[] | select(.name == "healthy") | .owners[]'
}

# ---------------------------------------------------------------------------
# 4. docker-compose.yml: healthy, the four demo destinations, the console.
echo "== docker-compose.yml: up"
up_started=$(date +%s%N)
compose up -d
wait_for "every service of docker-compose.yml to be healthy" 120 all_healthy evd-test 4
healthy_ms=$((($(date +%s%N) - up_started) / 1000000))
docker ps --filter "label=com.docker.compose.project=evd-test" --format '  {{.Names}}: {{.Status}}'
router1=$(admin_port evd-test_router_1)

post_events demo 5 6
wait_for "/ok to get every event" 60 delivered_all /ok demo
wait_for "/flaky/2 to get every event" 60 delivered_all /flaky/2 demo
wait_for "/slow/2000 to get every event (2 s each, per user in turn)" 60 delivered_all /slow/2000 demo
wait_for "down to dead-letter every event after 5 attempts" 60 dead_lettered_all "$router1" demo
for path in /ok /flaky/2 /slow/2000; do in_order_once "$path"; done
flaky_requests=$(received /flaky/2 | jq .requests)
[ "$flaky_requests" -eq 90 ] || fail "/flaky/2 got $flaky_requests requests for 30 events (3 each expected)"
[ "$(received /fail | jq .requests)" -eq 150 ] || fail "/fail did not get exactly 5 attempts per event"
curl -fsS -o /dev/null -u "x:$admin" "localhost:$router1/" || fail "the console does not answer"
if curl -fsS -o /dev/null "localhost:$router1/" 2>/dev/null; then
  fail "the console answers without the token"
fi
echo "   30 events of 5 users: /ok, /flaky/2 (3 requests each) and /slow/2000 got every one in per-user order, once;"
echo "   down dead-lettered every one after 5 attempts; the console answers (and only with the token)."

# ---------------------------------------------------------------------------
# 5. Three routers split the leases; one is killed.
echo "== --scale router=3, then docker kill one router"
compose up -d --scale router=3
wait_for "three healthy routers" 120 all_healthy evd-test 6
routers_holding() { [ "$(lease_holders "$router1" | sort -u | grep -vc null)" -eq "$1" ]; }
wait_for "the three routers to split the leases of healthy" 60 routers_holding 3
echo "   leases of healthy per router: $(lease_holders "$router1" | sort | uniq -c | tr '\n' ' ')"
victim=evd-test_router_3
victim_instance=$(docker inspect -f '{{.Config.Hostname}}' "$victim")
killed_at=$(date +%s)
docker kill "$victim" >/dev/null
post_events scale 10 10
# An instance is named <host name>#<random suffix>; the host name is the
# container's.
survivors_hold_all() { ! lease_holders "$router1" | grep -q -e "^$victim_instance#" -e '^null$'; }
wait_for "the survivors to take the killed router's shards" 60 survivors_hold_all
takeover_seconds=$(($(date +%s) - killed_at))
wait_for "/ok to get every event sent after the kill" 60 delivered_all /ok scale
in_order_once /ok
echo "   the survivors held every shard ${takeover_seconds} s after the kill (lease ttl 20 s);"
echo "   100 events of 10 users sent after it all reached /ok, in per-user order, once."

# ---------------------------------------------------------------------------
# 6. down and up again, keeping the volume.
echo "== down with events pending (healthy paused), then up: the AOF volume"
admin_post "$router1" /admin/destinations/healthy/pause >/dev/null
# Each router reads the paused set once per overview interval, and the one
# asked shows the pause at once: every running router must show it before
# the events are posted, or one still delivering some would hand them to
# the mock whose record `down` discards.
healthy_paused() {
  local router
  for router in $(docker ps --filter "label=com.docker.compose.project=evd-test" \
    --filter "label=com.docker.compose.service=router" --format '{{.Names}}'); do
    admin_get "$(admin_port "$router")" /admin/destinations \
      | jq -e '.destinations[] | select(.name == "healthy") | .paused' >/dev/null || return 1
  done
}
wait_for "healthy to be paused on every router" 10 healthy_paused
before_pause=$(received /ok | jq .delivered)
post_events restart 5 10
compose down
compose up -d
wait_for "every service to be healthy again" 120 all_healthy evd-test 4
router1=$(admin_port evd-test_router_1)
[ "$(received /ok | jq .delivered)" -eq 0 ] || fail "/ok got events while healthy was paused"
admin_post "$router1" /admin/destinations/healthy/resume >/dev/null
wait_for "/ok to get the events accepted before down" 60 delivered_all /ok restart
in_order_once /ok
echo "   50 events accepted while healthy was paused ($before_pause delivered before) were delivered after down and up."
compose down --volumes

# ---------------------------------------------------------------------------
# 7. docker-compose.cluster.yml.
echo "== docker-compose.cluster.yml"
cluster_started=$(date +%s%N)
cluster_compose up -d
wait_for "the cluster's services to be healthy" 180 all_healthy evd-test-cluster 9
cluster_ms=$((($(date +%s%N) - cluster_started) / 1000000))
[ "$(docker inspect -f '{{.State.ExitCode}}' evd-test-cluster_redis-cluster-init_1)" -eq 0 ] \
  || fail "redis-cluster-init failed"
docker exec evd-test-cluster_redis-1_1 redis-cli cluster info | grep -q cluster_state:ok \
  || fail "the cluster did not form"
post_events cluster 10 5
wait_for "/ok to get every event through the cluster" 60 delivered_all /ok cluster
in_order_once /ok
echo "   the cluster formed (3 masters, 3 replicas); 50 events of 10 users reached /ok in per-user order, once."
cluster_compose down --volumes

# ---------------------------------------------------------------------------
# 8. The test harness with Redis in a container (the testcontainers feature)
#    on this engine: the delivery suite.
echo "== the delivery tests with Redis from testcontainers"
cargo build --workspace --bins --locked -q
harness_started=$(date +%s)
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run -p e2e-tests --features testcontainers --test delivery --locked --no-fail-fast
else
  cargo test -p e2e-tests --features testcontainers --test delivery --locked --no-fail-fast
fi
harness_seconds=$(($(date +%s) - harness_started))

# ---------------------------------------------------------------------------
echo "== Summary"
echo "   project images built in ${build_seconds} s; docker-compose.yml healthy ${healthy_ms} ms after up; the cluster file ${cluster_ms} ms;"
echo "   the testcontainers delivery suite built and ran in ${harness_seconds} s."
megabytes() { echo $(($(docker image inspect -f '{{.Size}}' "$1") / 1000000)); }
base_mb=$(megabytes "$runtime_image")
echo "   runtime base $runtime_image: $base_mb MB"
for image in event-delivery-gateway:local event-delivery-router:local event-delivery-mock-destinations:local; do
  mb=$(megabytes "$image")
  echo "   $image: $mb MB, the base + $((mb - base_mb)) MB"
done
# Keeps the cache bounded: old layers of earlier builds go.
docker image prune -f >/dev/null
docker builder prune -f --keep-storage 8GB >/dev/null
echo "Container tests passed in $(($(date +%s) - started)) s."
