#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run lint and the tests.
#   apt-get: mosquitto (MQTT broker for integration tests), socat (serial pty pairs),
#            postgresql (initdb/postgres: each test runs a private server, never a system one),
#            nats-server (a private three-node cluster with MQTT per test, never a system one),
#            chromium (Debian's, headless, for the status page tests; Playwright never downloads one)
#   pip:     the package with its [test] extras (playwright among them), in ./.venv
# Extra arguments go to pytest: scripts/test.sh -k queue -x
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v socat >/dev/null || missing+=(socat)
command -v initdb >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
  || missing+=(postgresql)
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
command -v chromium >/dev/null || missing+=(chromium)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${missing[*]} with apt-get" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest -q "$@"
