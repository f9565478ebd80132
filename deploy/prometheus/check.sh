#!/usr/bin/env bash
# Checks the Prometheus rules of preauth-sidecar:
#   1. promtool check rules deploy/prometheus/alerts.yml        (syntax, PromQL, templates)
#   2. promtool test rules  deploy/prometheus/alerts_test.yml   (unit tests)
#   3. every alert has summary/description/runbook_url, its runbook_url anchor exists as a
#      heading in deploy/RUNBOOK.md, and alerts_test.yml has a firing AND a silent case for it.
# Installs promtool (Debian package `prometheus`) when it is missing. Exit non-zero on failure.
# Usage: deploy/prometheus/check.sh   (from anywhere; it works from the repository root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
RULES=deploy/prometheus/alerts.yml
TESTS=deploy/prometheus/alerts_test.yml
RUNBOOK=deploy/RUNBOOK.md

log() { printf '[prometheus-check] %s\n' "$*" >&2; }

if ! command -v promtool >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        log "promtool is not installed and apt-get is not available on this machine."
        log "Install promtool yourself (Debian/Ubuntu package 'prometheus', or the 'promtool' binary"
        log "from https://prometheus.io/download/) and run this script again."
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
            log "promtool is missing and installing it needs root (apt-get install prometheus); no sudo here."
            exit 1
        fi
    fi
    log "installing promtool (apt package 'prometheus')..."
    $SUDO apt-get update -qq
    # policy-rc.d may refuse to start the prometheus service in containers; that is fine, we only need promtool.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    command -v promtool >/dev/null 2>&1 || { log "apt-get install prometheus did not provide promtool"; exit 1; }
fi
log "$(promtool --version 2>&1 | head -n1)"

log "promtool check rules $RULES"
promtool check rules "$RULES"

log "promtool test rules $TESTS"
promtool test rules "$TESTS"

# ---- structural checks promtool does not make --------------------------------------------------
fail=0
alerts=$(sed -n 's/^[[:space:]]*- alert:[[:space:]]*\([A-Za-z0-9_]*\).*/\1/p' "$RULES")
[ -n "$alerts" ] || { log "no alerts found in $RULES"; exit 1; }

# GitHub heading slugs of the runbook: lower case, punctuation removed, spaces -> '-'.
slugs=$(sed -n 's/^#\{1,6\}[[:space:]]\{1,\}//p' "$RUNBOOK" 2>/dev/null \
        | tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9 _-]//g; s/ /-/g' || true)
[ -f "$RUNBOOK" ] || { log "missing $RUNBOOK"; fail=1; }

# Per-alert annotations (an alert block runs until the next '- alert:' / '- record:' / group).
while IFS= read -r alert; do
    block=$(awk -v a="$alert" '
        $0 ~ "^[[:space:]]*- alert:[[:space:]]*"a"[[:space:]]*$" {on=1; print; next}
        on && ($0 ~ /^[[:space:]]*- (alert|record):/ || $0 ~ /^[[:space:]]*- name:/) {exit}
        on {print}' "$RULES")
    for key in summary description runbook_url; do
        if ! grep -q "^[[:space:]]*$key:" <<<"$block"; then
            log "alert $alert: missing annotation '$key'"; fail=1
        fi
    done
    anchor=$(sed -n 's/.*runbook_url:.*RUNBOOK\.md#\([A-Za-z0-9_-]*\).*/\1/p' <<<"$block" | head -n1)
    if [ -z "$anchor" ]; then
        log "alert $alert: runbook_url does not point to a section of deploy/RUNBOOK.md"; fail=1
    elif ! grep -qx -- "$anchor" <<<"$slugs"; then
        log "alert $alert: runbook anchor #$anchor has no matching heading in $RUNBOOK"; fail=1
    fi
done <<<"$alerts"

# Firing and silent test cases per alert.
cases=$(awk '
    /^[[:space:]]*alertname:/ { sub(/^[[:space:]]*alertname:[[:space:]]*/, ""); name=$0; next }
    /^[[:space:]]*exp_alerts:/ && name != "" {
        if ($0 ~ /exp_alerts:[[:space:]]*\[\]/) print name, "silent"; else print name, "firing"
        name="" }' "$TESTS")
while IFS= read -r alert; do
    for kind in firing silent; do
        if ! grep -qx "$alert $kind" <<<"$cases"; then
            log "alert $alert: no $kind case in $TESTS"; fail=1
        fi
    done
done <<<"$alerts"

if [ "$fail" -ne 0 ]; then
    log "FAILED"
    exit 1
fi
n_alerts=$(wc -l <<<"$alerts" | tr -d ' ')
n_groups=$(grep -c '^[[:space:]]*- name:' "$TESTS" || true)
n_firing=$(grep -c ' firing$' <<<"$cases" || true)
n_silent=$(grep -c ' silent$' <<<"$cases" || true)
log "OK: $n_alerts alerts; $n_groups test groups; $n_firing firing and $n_silent silent assertions; runbook anchors resolve"
