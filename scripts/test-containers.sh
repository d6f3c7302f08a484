#!/usr/bin/env bash
# WORK IN PROGRESS (issue 18; not yet run by scripts/test.sh).
#
# Runs the shipped containers for real: a Docker engine (a private dockerd
# when none answers), local stand-ins for the base images this machine
# cannot pull, the project's images built from the shipped Dockerfile, and
# docker-compose up with the shipped compose file.
#
# Done so far: steps 1–3 (engine, stand-ins, image build) and the smoke
# test of step 4. On this machine (2026-12-04) a cold run took 7 min 18 s:
# the stand-ins about 2 minutes, the project's images about 5 (a release
# build inside the build stand-in); the four services were healthy 11 s
# after `up`, an event posted on :8080 reached the mock's /ok, and the
# status page answered. With the Debian stand-in for distroless, each
# image is ~300 MB (the real distroless base is far smaller). Still to do: --scale router=3 with one killed, down/up
# keeping the volume, the cluster compose file, image sizes and start times
# in the README, and running this from scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d /tmp/evd-containers.XXXXXX)
docker_cli=/usr/bin/docker # Debian's 20.10 CLI: it builds with BuildKit.
# docker-compose runs `docker` for builds: Debian's, not a newer client
# without buildx that may come first on the PATH.
export PATH=/usr/bin:$PATH
daemon_pid=""

cleanup() {
  set +e
  if [ -n "${DOCKER_HOST:-}" ]; then
    docker-compose -p evd-test down --volumes --remove-orphans >/dev/null 2>&1
  fi
  if [ -n "$daemon_pid" ]; then
    kill "$daemon_pid" 2>/dev/null
    wait "$daemon_pid" 2>/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT

install_if_missing() {
  local command=$1 package=$2
  if ! command -v "$command" >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq "$package" >/dev/null
  fi
}

# 1. A Docker engine: the one that answers, else a private one under $work.
install_if_missing dockerd docker.io
install_if_missing docker-compose docker-compose
install_if_missing debootstrap debootstrap
if ! "$docker_cli" info >/dev/null 2>&1; then
  mkdir -p "$work/docker"
  export DOCKER_HOST="unix://$work/docker/docker.sock"
  dockerd --data-root "$work/docker/data" --exec-root "$work/docker/exec" \
    -H "$DOCKER_HOST" --pidfile "$work/docker/pid" >"$work/docker/log" 2>&1 &
  daemon_pid=$!
  for _ in $(seq 100); do "$docker_cli" info >/dev/null 2>&1 && break; sleep 0.2; done
  echo "Started a private Docker engine (data under $work/docker)."
else
  export DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}
fi
docker() { "$docker_cli" "$@"; }

# 2. Stand-ins for the base images that cannot be pulled here, under the
#    same names, from a Debian bookworm root file system.
standin() {
  local image=$1 dir=$2
  if docker image inspect "$image" >/dev/null 2>&1; then
    return
  fi
  if ! docker pull -q "$image" >/dev/null 2>&1; then
    echo "STAND-IN: $image cannot be pulled; building it from Debian bookworm ($dir)."
    docker build -q -t "$image" "$dir" >/dev/null
  fi
}
if ! docker image inspect standin/debian:bookworm >/dev/null 2>&1; then
  debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log"
  tar -C "$work/rootfs" -c . | docker import - standin/debian:bookworm >/dev/null
fi
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
cp /usr/local/share/ca-certificates/*.crt "$work/rust/ca/" 2>/dev/null || true
cp -a "$(rustc --print sysroot)" "$work/rust/toolchain"
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
# The names the shipped files use.
build_image=$(awk '/^FROM rust:/ {print $2; exit}' Dockerfile)
runtime_image=$(awk '/^FROM .* AS runtime/ {print $2; exit}' Dockerfile)
redis_image=$(awk '/image: redis:/ {print $2; exit}' docker-compose.yml)
# The build stand-in carries this machine's toolchain: it must be the
# version the Dockerfile names.
toolchain=$(rustc --version | cut -d' ' -f2)
case "$toolchain" in
  "${build_image#rust:}"*) ;;
  *) case "${build_image#rust:}" in "${toolchain%.*}"-*) ;; *)
       echo "The Dockerfile names $build_image; this machine's toolchain is $toolchain." >&2; exit 1 ;;
     esac ;;
esac
standin "$redis_image" "$work/redis"
standin "$runtime_image" "$work/runtime"
standin "$build_image" "$work/rust"

# 3. The project's images, from the shipped Dockerfile and compose file.
DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1 docker-compose -p evd-test build

# 4. Up, healthy, and an event through the published gateway port.
docker-compose -p evd-test up -d
for _ in $(seq 120); do
  unhealthy=$(docker ps --filter "label=com.docker.compose.project=evd-test" \
    --format '{{.Names}} {{.Status}}' | grep -vc '(healthy)' || true)
  [ "$unhealthy" = 0 ] && break
  sleep 1
done
docker ps --filter "label=com.docker.compose.project=evd-test" --format '{{.Names}}: {{.Status}}'
curl -fsS -XPOST localhost:8080/v1/events -H 'content-type: application/json' \
  -H 'authorization: Bearer evd_demo-key-for-local-use-only' \
  -d '{"userId": "alice", "payload": {"n": 1}}'
echo
for _ in $(seq 100); do
  curl -fsS 'localhost:9000/received?path=/ok' | grep -q '"delivered":1' && break
  sleep 0.2
done
curl -fsS 'localhost:9000/received?path=/ok'
echo
# The router's admin port is one of a published range: ask which.
admin_port=$(docker port evd-test_router_1 9100 | head -1 | cut -d: -f2)
curl -fsS -o /dev/null -u "x:evd_admin_demo-token-for-local-use-only" "localhost:$admin_port/"
echo "Containers: healthy; an event reached the healthy mock destination; the status page answers."
