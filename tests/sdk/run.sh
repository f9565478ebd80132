#!/usr/bin/env bash
# Runs tests/sdk/openai_sdk.py: the official OpenAI Python SDK against the built sidecar binary.
# Installs the SDK into a virtualenv under the cargo target directory (kept between runs).
# Usage: tests/sdk/run.sh [path/to/preauth-sidecar]   (default: the debug build)
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-target}"
bin="${1:-$target/debug/preauth-sidecar}"
venv="$target/sdk-venv"
# The SDK's major version the checks were written against; pinned so a new major cannot change
# the checks' meaning unnoticed.
sdk="openai>=1.40,<4"
if ! "$venv/bin/python" -c 'import openai' >/dev/null 2>&1; then
  python3 -m venv "$venv" 2>/dev/null || {
    echo "sdk: python3 -m venv failed; installing python3-venv (apt)" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  }
  for attempt in 1 2 3; do
    "$venv/bin/pip" install -q --disable-pip-version-check "$sdk" && break
    [ "$attempt" = 3 ] && { echo "sdk: could not install $sdk from PyPI" >&2; exit 1; }
    sleep 5
  done
fi
"$venv/bin/python" -c 'import openai; print("sdk: openai", openai.__version__)'
exec "$venv/bin/python" tests/sdk/openai_sdk.py "$bin"
