#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/kubernetes/ (exit non-zero on failure):
#   1. validate.py: every document parses and has apiVersion/kind/metadata.name; ports, probes,
#      env, secrets, volumes, selectors, security context and the shutdown timing
#      (preStop + GRACE_PERIOD_SECONDS from src/server.rs <= terminationGracePeriodSeconds)
#      are consistent. Needs python3 + PyYAML (installed from PyPI when missing).
#   2. if kubectl exists: `kubectl kustomize` renders the kustomization (offline) and the result
#      is parsed again;
#   3. if kubectl has a reachable cluster (a current context): `kubectl apply --dry-run=client`
#      on every manifest (the ServiceMonitor only when its CRD is installed);
#   4. if a built binary exists (target/{release,debug}/preauth-sidecar or on PATH):
#      `preauth-sidecar check-config` with the ConfigMap + example Secret environment.
# Usage: deploy/kubernetes/check.sh   (from anywhere)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
DIR=deploy/kubernetes
log() { printf '[kubernetes-check] %s\n' "$*" >&2; }

command -v python3 >/dev/null 2>&1 || { log "python3 is required"; exit 1; }
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
    log "installing PyYAML from PyPI..."
    python3 -m pip install --quiet --disable-pip-version-check pyyaml \
        || python3 -m pip install --quiet --disable-pip-version-check --user pyyaml \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages pyyaml \
        || { log "could not install PyYAML (python3 -m pip install pyyaml)"; exit 1; }
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

rendered_args=()
if command -v kubectl >/dev/null 2>&1; then
    log "kubectl kustomize $DIR (offline render)"
    kubectl kustomize "$DIR" >"$tmp/rendered.yaml"
    rendered_args=(--rendered "$tmp/rendered.yaml")
else
    log "kubectl not installed: skipping the kustomize render and the client dry-run"
fi

log "validate.py $DIR"
python3 "$DIR/validate.py" "$DIR" ${rendered_args[@]+"${rendered_args[@]}"}

if command -v kubectl >/dev/null 2>&1; then
    # Only with an explicitly configured cluster: without one kubectl falls back to
    # http://localhost:8080, which may well be a running sidecar's proxy port.
    if [ -n "$(kubectl config current-context 2>/dev/null || true)" ] \
        && kubectl version --request-timeout=5s >/dev/null 2>&1; then
        has_sm_crd=0
        kubectl api-resources --api-group=monitoring.coreos.com -o name 2>/dev/null \
            | grep -q '^servicemonitors' && has_sm_crd=1
        for f in "$DIR"/*.yaml; do
            case "$(basename "$f")" in
                kustomization.yaml) continue ;;
                servicemonitor.yaml) [ "$has_sm_crd" = 1 ] || { log "no ServiceMonitor CRD: skipping $f"; continue; } ;;
            esac
            log "kubectl apply --dry-run=client -f $f"
            kubectl apply --dry-run=client -f "$f" >/dev/null
        done
        log "kubectl apply --dry-run=client: OK"
    else
        log "kubectl has no reachable cluster: client dry-run skipped (validate.py is the schema check)"
    fi
fi

bin=""
for b in target/release/preauth-sidecar target/debug/preauth-sidecar; do
    [ -x "$b" ] && { bin="$b"; break; }
done
[ -z "$bin" ] && command -v preauth-sidecar >/dev/null 2>&1 && bin="$(command -v preauth-sidecar)"
if [ -n "$bin" ]; then
    log "$bin check-config with the ConfigMap + secret.example.yaml environment"
    python3 - "$DIR" "$tmp" "$bin" <<'PY'
import os, subprocess, sys, yaml
d, tmp, binary = sys.argv[1], sys.argv[2], sys.argv[3]
env = {}
for doc in yaml.safe_load_all(open(os.path.join(d, "configmap.yaml"))):
    if doc and doc.get("kind") == "ConfigMap":
        data = doc.get("data") or {}
        if doc["metadata"]["name"] == "preauth-sidecar-files":
            os.makedirs(os.path.join(tmp, "etc"), exist_ok=True)
            for k, v in data.items():
                open(os.path.join(tmp, "etc", k), "w").write(v)
        else:
            env.update(data)
env.update(yaml.safe_load(open(os.path.join(d, "secret.example.yaml")))["stringData"])
# Paths inside the pod -> this machine.
for k, v in list(env.items()):
    if isinstance(v, str) and v.startswith("/etc/preauth/"):
        env[k] = os.path.join(tmp, "etc", v[len("/etc/preauth/"):])
env["PREAUTH_DATA_DIR"] = os.path.join(tmp, "data")
env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
r = subprocess.run([binary, "check-config"], env=env, capture_output=True, text=True)
open(os.path.join(tmp, "check-config.out"), "w").write(r.stdout + r.stderr)
if r.returncode != 0:
    sys.stderr.write(r.stdout + r.stderr)
    sys.stderr.write(f"[kubernetes-check] FAILED: preauth-sidecar check-config exit {r.returncode} on the ConfigMap environment\n")
    sys.exit(1)
PY
    log "check-config: OK ($(wc -l <"$tmp/check-config.out" | tr -d ' ') settings)"
else
    log "no preauth-sidecar binary built: check-config step skipped"
fi
log "OK"
