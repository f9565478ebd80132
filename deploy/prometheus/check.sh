#!/usr/bin/env bash
# Checks the Prometheus rules of preauth-sidecar:
#   1. promtool check rules deploy/prometheus/alerts.yml        (syntax, PromQL, templates)
#   2. promtool test rules  deploy/prometheus/alerts_test.yml   (unit tests)
#   3. every alert has summary/description/runbook_url, its runbook_url anchor exists as a
#      heading in deploy/RUNBOOK.md, and alerts_test.yml has a firing AND a silent case for it;
#   4. every metric used by the rules and the Grafana dashboard is exported by
#      src/telemetry/mod.rs; the dashboard is valid JSON; every PromQL query of the dashboard
#      and of the runbook parses.
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

# Every metric the rules and the dashboard use must be one the sidecar exports
# (src/telemetry/mod.rs; CONTRACT §9), so a rename cannot silently blind an alert.
TELEMETRY=src/telemetry/mod.rs
DASHBOARD=deploy/grafana/preauth-sidecar.json
if [ -f "$TELEMETRY" ]; then
    exported=$(grep -o '"\(valdrics_ops\|preauth\)_[a-z0-9_]*"' "$TELEMETRY" | tr -d '"' | sort -u)
    used=$(cat "$RULES" "$DASHBOARD" 2>/dev/null | grep -o '\b\(valdrics_ops\|preauth\)_[a-z0-9_]*' | sort -u)
    while IFS= read -r m; do
        [ -n "$m" ] || continue
        base=$(sed 's/_\(bucket\|sum\|count\)$//' <<<"$m")
        if ! grep -qx -- "$m" <<<"$exported" && ! grep -qx -- "$base" <<<"$exported"; then
            log "metric $m is used in $RULES or $DASHBOARD but not exported by $TELEMETRY"; fail=1
        fi
    done <<<"$used"
else
    log "note: $TELEMETRY not found, metric-name cross-check skipped"
fi

# The Grafana dashboard is valid JSON, and every PromQL query of the dashboard (template
# variables replaced by plain values) and of the runbook's ```promql blocks parses: each is
# checked by promtool as a recording rule.
if command -v python3 >/dev/null 2>&1; then
    tmp_rules=$(mktemp --suffix=.yml)
    if python3 - "$DASHBOARD" "$RUNBOOK" >"$tmp_rules" <<'PY'
import json, os, re, sys, textwrap
dashboard, runbook = sys.argv[1], sys.argv[2]
exprs = []  # (origin, expr)
if os.path.exists(dashboard):
    try:
        d = json.load(open(dashboard, encoding="utf-8"))
    except ValueError as e:
        sys.stderr.write(f"[prometheus-check] {dashboard} is not valid JSON: {e}\n")
        sys.exit(1)
    def walk(o):
        if isinstance(o, dict):
            if isinstance(o.get("expr"), str):
                exprs.append(("dashboard", o["expr"]))
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(d)
    for t in d.get("templating", {}).get("list", []):
        q = t.get("query")
        if isinstance(q, dict) and q.get("query", "").startswith("label_values("):
            exprs.append(("dashboard variable", q["query"][len("label_values("):].rsplit(",", 1)[0]))
if os.path.exists(runbook):
    for block in re.findall(r"```promql\n(.*?)```", open(runbook, encoding="utf-8").read(), re.S):
        cur = None
        for line in textwrap.dedent(block).splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and cur is not None:
                cur += "\n" + line            # continuation of a multi-line expression
            else:
                if cur:
                    exprs.append(("runbook", cur))
                cur = line
        if cur:
            exprs.append(("runbook", cur))
sub = {"$__rate_interval": "5m", "$__range": "6h", "$__interval": "1m",
       "$job": ".*", "$instance": ".*", "$source": ".*"}
print("groups:\n  - name: dashboard-and-runbook-queries\n    rules:")
for i, (origin, e) in enumerate(exprs):
    for k, v in sub.items():
        e = e.replace(k, v)
    print(f"      - record: {origin.split()[0]}:query_{i}")
    print("        expr: " + json.dumps(e))
PY
    then
        if promtool check rules "$tmp_rules" >"$tmp_rules.out" 2>&1; then
            log "dashboard JSON valid; $(grep -c 'record: dashboard' "$tmp_rules") dashboard and $(grep -c 'record: runbook' "$tmp_rules") runbook PromQL queries parse"
        else
            cat "$tmp_rules.out" >&2
            log "dashboard or runbook PromQL does not parse (query_N = Nth query, see above)"; fail=1
        fi
    else
        fail=1
    fi
    rm -f "$tmp_rules" "$tmp_rules.out"
else
    log "note: python3 not found, dashboard and runbook query check skipped"
fi

if [ "$fail" -ne 0 ]; then
    log "FAILED"
    exit 1
fi
n_alerts=$(wc -l <<<"$alerts" | tr -d ' ')
n_groups=$(grep -c '^[[:space:]]*- name:' "$TESTS" || true)
n_firing=$(grep -c ' firing$' <<<"$cases" || true)
n_silent=$(grep -c ' silent$' <<<"$cases" || true)
log "OK: $n_alerts alerts; $n_groups test groups; $n_firing firing and $n_silent silent assertions; runbook anchors resolve"
