#!/usr/bin/env bash
# Install gatewayd into ./.venv on a fresh Debian machine and run `gatewayd demo`:
# the daemon with etc/demo.yaml plus every plugin's simulator, events printed as they arrive.
# Extra arguments go to `gatewayd demo` (for example --duration 20).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
if [ ${#missing[@]} -gt 0 ]; then
  echo "scripts/demo.sh: installing ${missing[*]} with apt-get" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/gatewayd demo "$@"
