#!/usr/bin/env bash
# Runs the demo: a built-in fake OpenAI-compatible upstream plus the sidecar in front of it,
# embedded state, nothing else to start. Prints tenant JWTs and curl / OpenAI-SDK examples.
# Usage: ./scripts/demo.sh   (Ctrl-C stops it)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec cargo run --quiet --bin preauth-sidecar -- demo
