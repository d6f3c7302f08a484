#!/usr/bin/env bash
# Checks the container files as far as possible without a Docker engine:
# every compose file must pass `docker-compose config -q`, and every
# Dockerfile hadolint with no finding (each accepted one is justified by an
# inline `# hadolint ignore=` comment).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-tools.sh
ensure_docker_compose
ensure_python_tools

for compose in docker-compose*.yml; do
  docker-compose -f "$compose" config -q
  echo "$compose: valid"
done
for dockerfile in Dockerfile*; do
  "$PYTHON_VENV/bin/hadolint" --failure-threshold info "$dockerfile"
  echo "$dockerfile: no hadolint findings"
done
