#!/usr/bin/env bash
# Runs every check and test of preauth-sidecar: formatting, clippy (warnings are errors), unit
# tests, integration tests through the real proxy, compiles the benchmarks, and drives the built
# binary with the official OpenAI Python SDK (tests/sdk; the SDK is installed into a virtualenv).
# Usage: ./scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== deploy checks (promtool rules and unit tests, dashboard, runbook, Kubernetes manifests)"
cargo build --locked --bin preauth-sidecar
deploy/prometheus/check.sh
deploy/kubernetes/check.sh
echo "== cargo test"
cargo test --locked --all-targets 2>&1 | tee /tmp/preauth-test.log
echo "== OpenAI SDK (Python) against the built binary"
tests/sdk/run.sh 2>&1 | tee /tmp/preauth-sdk.log
echo "== summary"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' /tmp/preauth-test.log
echo "openai sdk: $(grep -c '^PASS ' /tmp/preauth-sdk.log) checks passed, $(grep -c '^FAIL ' /tmp/preauth-sdk.log || true) failed"
