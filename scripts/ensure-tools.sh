# Sourced by the other scripts: installs what the system and its tests need
# when it is missing.

# Installs Debian packages with apt-get, or explains what to install.
apt_install() {
  local what=$1
  shift
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$what is missing and apt-get is not available; install it with your package manager and run this again." >&2
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "$what is missing; installing it with apt-get." >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

ensure_redis_server() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server redis-server
  # redis-cli forms the test clusters (Debian ships it in redis-tools).
  command -v redis-cli >/dev/null 2>&1 || apt_install redis-cli redis-tools
}

# Validates the compose files without a Docker engine (Debian's v1 client).
ensure_docker_compose() {
  command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose docker-compose
}

# rustfmt and clippy, which the test command runs first; rustup adds them
# when the toolchain came without them.
ensure_rust_lints() {
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    echo "rustfmt or clippy is missing; adding them with rustup." >&2
    rustup component add rustfmt clippy
  fi
}

# The Redis TLS test makes its throwaway CA and certificate with openssl.
ensure_openssl() {
  command -v openssl >/dev/null 2>&1 || apt_install openssl openssl
}

# Python tools of the test suite (tests/python/requirements.txt:
# standardwebhooks, schemathesis, hadolint) in target/python-venv, reinstalled when the
# requirements change.
PYTHON_VENV=target/python-venv
# The console's browser test (tests/browser, npm playwright-core) drives
# Debian's Chromium with Node; `npm ci` installs its locked packages into
# tests/browser/node_modules when the lock file changes.
ensure_node_tools() {
  command -v chromium >/dev/null 2>&1 || apt_install chromium chromium
  command -v node >/dev/null 2>&1 || apt_install nodejs nodejs
  command -v npm >/dev/null 2>&1 || apt_install npm npm
  local lock=tests/browser/package-lock.json
  if ! cmp -s "$lock" tests/browser/node_modules/.installed-lock.json; then
    echo "Installing the browser test's packages into tests/browser/node_modules." >&2
    (cd tests/browser && npm ci --no-audit --no-fund --silent)
    cp "$lock" tests/browser/node_modules/.installed-lock.json
  fi
}

ensure_python_tools() {
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install "python3-venv" python3-venv
  fi
  local requirements=tests/python/requirements.txt
  if ! cmp -s "$requirements" "$PYTHON_VENV/installed-requirements.txt"; then
    echo "Installing the Python test tools into $PYTHON_VENV." >&2
    python3 -m venv "$PYTHON_VENV"
    "$PYTHON_VENV/bin/pip" install -q -r "$requirements"
    cp "$requirements" "$PYTHON_VENV/installed-requirements.txt"
  fi
}
