# Sourced by the other scripts: makes sure redis-server is installed.
ensure_redis_server() {
  if command -v redis-server >/dev/null 2>&1; then
    return
  fi
  if command -v apt-get >/dev/null 2>&1; then
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "redis-server is missing; installing it with apt-get." >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing and apt-get is not available." >&2
    echo "Install Redis 7 (e.g. 'brew install redis' or your distribution's package) and run this again." >&2
    exit 1
  fi
}
