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
}

# The status page test drives Debian's Chromium with Playwright (PyPI),
# installed in target/browser-venv; Playwright's own browser download is
# not used.
BROWSER_VENV=target/browser-venv
PLAYWRIGHT_VERSION=1.65.2
ensure_browser() {
  command -v chromium >/dev/null 2>&1 || apt_install chromium chromium
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install "python3-venv" python3-venv
  fi
  if ! "$BROWSER_VENV/bin/python" -c "import playwright" >/dev/null 2>&1; then
    echo "Installing Playwright $PLAYWRIGHT_VERSION into $BROWSER_VENV." >&2
    python3 -m venv "$BROWSER_VENV"
    "$BROWSER_VENV/bin/pip" install -q "playwright==$PLAYWRIGHT_VERSION"
  fi
}
