#!/usr/bin/env python3
"""Offline validation of deploy/kubernetes/*.yaml (used by check.sh when no cluster is reachable
for `kubectl apply --dry-run=client`, and always as a consistency check on top of it).

Checks
  - every document parses, is a mapping with apiVersion, kind and a DNS-1123 metadata.name;
  - workloads: selector vs template labels, container names/images, ports (1..65535, unique,
    named <= 15 chars), probes (one handler, httpGet path/port, exec command), env entries
    (valid names, exactly one of value/valueFrom, secret/configmap refs that exist), envFrom
    refs, volume mounts vs volumes, cpu/memory requests <= limits;
  - the preauth-sidecar container: proxy 8080 + admin 9090, /readyz readiness and /healthz
    liveness on the admin port, preStop delay, terminationGracePeriodSeconds >= preStop +
    GRACE_PERIOD_SECONDS (read from src/server.rs) + pingora's 5 s stop + margin, the gateway
    outliving the sidecar's drain, non-root / read-only root fs / no privilege escalation /
    drop ALL, secrets from the Secret, PREAUTH_DATA_DIR mounted, admin listener not on loopback;
  - Deployment and StatefulSet pod templates identical (apart from the data volume);
  - Services select a workload and target existing named ports; the client Service does not
    expose the admin port; ServiceMonitor / NetworkPolicy selectors match; the StatefulSet's
    serviceName is a headless Service; kustomization resources exist and never list both
    workloads or the example Secret;
  - the ConfigMap holds no secrets.

Usage: validate.py [DIR] [--rendered FILE]   (exit 1 on any error)
"""
import os
import re
import sys

try:
    import yaml
except ImportError:  # check.sh installs it; say so if run by hand
    sys.stderr.write("PyYAML is required: python3 -m pip install pyyaml\n")
    sys.exit(2)

ERRORS = []
NOTES = []
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
SIDECAR = "preauth-sidecar"
SIDECAR_STOP_TIMEOUT = 5  # graceful_shutdown_timeout_seconds in src/server.rs
MARGIN = 5
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def err(where, msg):
    ERRORS.append(f"{where}: {msg}")


def grace_period_seconds(repo_root):
    path = os.path.join(repo_root, "src", "server.rs")
    try:
        text = open(path, encoding="utf-8").read()
    except OSError:
        NOTES.append("src/server.rs not found; assuming GRACE_PERIOD_SECONDS = 10")
        return 10
    m = re.search(r"GRACE_PERIOD_SECONDS:\s*u64\s*=\s*(\d+)", text)
    if not m:
        NOTES.append("GRACE_PERIOD_SECONDS not found in src/server.rs; assuming 10")
        return 10
    return int(m.group(1))


def quantity(q, kind):
    """cpu -> millicores, memory -> bytes."""
    s = str(q)
    if kind == "cpu":
        return float(s[:-1]) if s.endswith("m") else float(s) * 1000
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for u, f in units.items():
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


def load(path):
    docs = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, d in enumerate(yaml.safe_load_all(f)):
                if d is None:
                    continue
                docs.append((f"{os.path.basename(path)}#{i}", d))
    except yaml.YAMLError as e:
        err(os.path.basename(path), f"YAML parse error: {e}")
    return docs


def check_meta(where, d):
    if not isinstance(d, dict):
        err(where, "document is not a mapping")
        return False
    ok = True
    for k in ("apiVersion", "kind"):
        if not isinstance(d.get(k), str) or not d.get(k):
            err(where, f"missing {k}")
            ok = False
    name = (d.get("metadata") or {}).get("name") if isinstance(d.get("metadata"), dict) else None
    if d.get("kind") == "Kustomization":
        return ok
    if not isinstance(name, str) or not name:
        err(where, "missing metadata.name")
        ok = False
    elif not DNS1123.match(name) or len(name) > 253:
        err(where, f"metadata.name {name!r} is not a DNS-1123 name")
    return ok


def labels_match(selector, labels):
    return bool(selector) and all((labels or {}).get(k) == v for k, v in selector.items())


def probe_ok(where, probe, ports):
    handlers = [h for h in ("httpGet", "tcpSocket", "exec", "grpc") if h in probe]
    if len(handlers) != 1:
        err(where, f"probe must have exactly one handler, has {handlers}")
        return
    h = handlers[0]
    if h in ("httpGet", "tcpSocket"):
        port = probe[h].get("port")
        if isinstance(port, str):
            if port not in ports:
                err(where, f"probe port {port!r} is not a named container port ({sorted(ports)})")
        elif not isinstance(port, int) or not 1 <= port <= 65535:
            err(where, f"probe port {port!r} invalid")
        if h == "httpGet" and not str(probe[h].get("path", "")).startswith("/"):
            err(where, "httpGet.path must start with /")
    if h == "exec":
        cmd = probe["exec"].get("command")
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
            err(where, "exec.command must be a non-empty list of strings")
    for k in ("periodSeconds", "timeoutSeconds", "failureThreshold", "initialDelaySeconds"):
        if k in probe and (not isinstance(probe[k], int) or probe[k] < 0):
            err(where, f"{k} must be a non-negative integer")


def prestop_seconds(where, c):
    pre = ((c.get("lifecycle") or {}).get("preStop")) or {}
    if "sleep" in pre:  # native sleep action (Kubernetes >= 1.30)
        return int(pre["sleep"].get("seconds", 0))
    cmd = (pre.get("exec") or {}).get("command")
    if not cmd:
        return None
    m = re.search(r"\bsleep\D*(\d+)", " ".join(cmd))
    if not m:
        err(where, f"cannot read the preStop delay from {cmd}")
        return None
    return int(m.group(1))


def addr_port(v):
    m = re.search(r":(\d+)(/|$)", v or "")
    return int(m.group(1)) if m else None


def check_workload(where, d, ctx):
    spec = d.get("spec") or {}
    tmpl = spec.get("template") or {}
    pod = tmpl.get("spec") or {}
    sel = (spec.get("selector") or {}).get("matchLabels") or {}
    if not labels_match(sel, (tmpl.get("metadata") or {}).get("labels")):
        err(where, "spec.selector.matchLabels do not match the pod template labels")
    containers = pod.get("containers") or []
    if not containers:
        err(where, "no containers")
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    claims = {(t.get("metadata") or {}).get("name"): t for t in spec.get("volumeClaimTemplates") or []}
    for v in volumes.values():
        if "configMap" in v and v["configMap"].get("name") not in ctx["configmaps"]:
            err(where, f"volume {v['name']}: ConfigMap {v['configMap'].get('name')!r} not defined")
    names = set()
    by_name = {}
    for c in containers:
        cw = f"{where} container {c.get('name')!r}"
        if not c.get("name") or not c.get("image"):
            err(cw, "needs name and image")
        if c.get("name") in names:
            err(cw, "duplicate container name")
        names.add(c.get("name"))
        by_name[c.get("name")] = c
        ports = {}
        seen_numbers = set()
        for p in c.get("ports") or []:
            n, num = p.get("name"), p.get("containerPort")
            if not isinstance(num, int) or not 1 <= num <= 65535:
                err(cw, f"containerPort {num!r} invalid")
            if num in seen_numbers:
                err(cw, f"containerPort {num} listed twice")
            seen_numbers.add(num)
            if n is not None:
                if not PORT_NAME.match(n) or len(n) > 15:
                    err(cw, f"port name {n!r} invalid (lowercase alphanumerics and '-', <= 15 chars)")
                if n in ports:
                    err(cw, f"port name {n!r} duplicated")
                ports[n] = num
        c["_ports"] = ports
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in c:
                probe_ok(f"{cw} {probe}", c[probe], ports)
        for e in c.get("env") or []:
            ew = f"{cw} env {e.get('name')!r}"
            if not isinstance(e.get("name"), str) or not ENV_NAME.match(e["name"]):
                err(ew, "invalid env name")
            if ("value" in e) == ("valueFrom" in e):
                err(ew, "needs exactly one of value / valueFrom")
            if "value" in e and not isinstance(e["value"], str):
                err(ew, "value must be a string (quote numbers and booleans)")
            vf = e.get("valueFrom") or {}
            if "secretKeyRef" in vf:
                ref = vf["secretKeyRef"]
                sec = ctx["secrets"].get(ref.get("name"))
                if sec is None:
                    err(ew, f"Secret {ref.get('name')!r} not defined (secret.example.yaml)")
                elif ref.get("key") not in sec and not ref.get("optional"):
                    err(ew, f"key {ref.get('key')!r} missing from Secret {ref.get('name')!r}")
                elif ref.get("key") not in sec:
                    NOTES.append(f"{ew}: optional key {ref.get('key')!r} not set in secret.example.yaml")
            if "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                cm = ctx["configmaps"].get(ref.get("name"))
                if cm is None or ref.get("key") not in cm:
                    err(ew, f"ConfigMap key {ref.get('name')}/{ref.get('key')} not defined")
        for ef in c.get("envFrom") or []:
            if "configMapRef" in ef and ef["configMapRef"].get("name") not in ctx["configmaps"]:
                err(cw, f"envFrom ConfigMap {ef['configMapRef'].get('name')!r} not defined")
            if "secretRef" in ef and ef["secretRef"].get("name") not in ctx["secrets"]:
                err(cw, f"envFrom Secret {ef['secretRef'].get('name')!r} not defined")
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in volumes and m.get("name") not in claims:
                err(cw, f"volumeMount {m.get('name')!r} has no volume")
            if not str(m.get("mountPath", "")).startswith("/"):
                err(cw, f"volumeMount {m.get('name')!r} mountPath must be absolute")
        res = c.get("resources") or {}
        for kind in ("cpu", "memory"):
            req = (res.get("requests") or {}).get(kind)
            lim = (res.get("limits") or {}).get(kind)
            if req is None or lim is None:
                err(cw, f"resources.requests.{kind} and resources.limits.{kind} are required")
                continue
            try:
                if quantity(req, kind) > quantity(lim, kind):
                    err(cw, f"{kind} request {req} above limit {lim}")
            except ValueError:
                err(cw, f"unparseable {kind} quantity {req!r}/{lim!r}")
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            err(cw, "securityContext.allowPrivilegeEscalation must be false")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            err(cw, "securityContext.capabilities.drop must include ALL")

    sidecar = by_name.get(SIDECAR)
    if sidecar is None:
        err(where, f"no {SIDECAR!r} container")
        return
    sw = f"{where} container {SIDECAR!r}"
    ports = sidecar["_ports"]
    if ports.get("proxy") != 8080 or ports.get("admin") != 9090:
        err(sw, f"expected ports proxy=8080 and admin=9090, got {ports}")
    rp = (sidecar.get("readinessProbe") or {}).get("httpGet") or {}
    lp = (sidecar.get("livenessProbe") or {}).get("httpGet") or {}
    if rp.get("path") != "/readyz" or rp.get("port") not in ("admin", 9090):
        err(sw, "readinessProbe must be httpGet /readyz on the admin port")
    if lp.get("path") != "/healthz" or lp.get("port") not in ("admin", 9090):
        err(sw, "livenessProbe must be httpGet /healthz on the admin port")
    sc = sidecar.get("securityContext") or {}
    if sc.get("runAsNonRoot") is not True or sc.get("runAsUser", 1) == 0:
        err(sw, "must run as non-root (runAsNonRoot: true, runAsUser != 0)")
    if sc.get("readOnlyRootFilesystem") is not True:
        err(sw, "readOnlyRootFilesystem must be true")
    secret_env = {
        e["name"] for e in sidecar.get("env") or [] if "secretKeyRef" in (e.get("valueFrom") or {})
    }
    for need in ("SUPABASE_JWT_SECRET", "ADMIN_API_KEY", "ENFORCEMENT_APPROVAL_TOKEN_SECRET"):
        if need not in secret_env:
            err(sw, f"{need} must come from a Secret (secretKeyRef)")
    plain_env = {e["name"]: e.get("value") for e in sidecar.get("env") or [] if "value" in e}
    for ef in sidecar.get("envFrom") or []:
        if "configMapRef" in ef:
            for k, v in (ctx["configmaps"].get(ef["configMapRef"].get("name")) or {}).items():
                plain_env.setdefault(k, v)
    data_dir = plain_env.get("PREAUTH_DATA_DIR")
    mounts = {m.get("mountPath"): m.get("name") for m in sidecar.get("volumeMounts") or []}
    if not data_dir:
        err(sw, "PREAUTH_DATA_DIR is not set (ConfigMap or env)")
    elif data_dir not in mounts:
        err(sw, f"PREAUTH_DATA_DIR={data_dir} is not a volumeMount (read-only root fs)")
    else:
        vol = mounts[data_dir]
        if d["kind"] == "StatefulSet" and vol not in claims:
            err(sw, f"StatefulSet data volume {vol!r} should be a volumeClaimTemplate")
        if d["kind"] == "Deployment" and vol in volumes and not (
            "emptyDir" in volumes[vol] or "persistentVolumeClaim" in volumes[vol]
        ):
            err(sw, f"data volume {vol!r} must be an emptyDir or a PVC")
    admin = plain_env.get("PREAUTH_ADMIN_ADDR", "127.0.0.1:9090")
    if admin.startswith("127.") or admin.startswith("localhost") or admin.startswith("[::1]"):
        err(sw, f"PREAUTH_ADMIN_ADDR={admin} is loopback: kubelet probes and Prometheus use the pod IP")
    if addr_port(admin) != ports.get("admin"):
        err(sw, f"PREAUTH_ADMIN_ADDR port does not match containerPort admin={ports.get('admin')}")
    if addr_port(plain_env.get("PREAUTH_LISTEN_ADDR", "0.0.0.0:8080")) != ports.get("proxy"):
        err(sw, "PREAUTH_LISTEN_ADDR port does not match containerPort proxy")
    upstream_port = addr_port(plain_env.get("PREAUTH_UPSTREAM_URL", ""))
    gateways = [c for n, c in by_name.items() if n != SIDECAR]
    if gateways and upstream_port not in {p for g in gateways for p in g["_ports"].values()}:
        err(sw, f"PREAUTH_UPSTREAM_URL port {upstream_port} is not a port of the gateway container")

    # Shutdown timing.
    grace = ctx["grace"]
    pre = prestop_seconds(sw, sidecar)
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    if pre is None or pre < 1:
        err(sw, "needs a preStop delay so endpoints drop the pod before the sidecar stops accepting")
    else:
        drain = pre + grace + SIDECAR_STOP_TIMEOUT
        if tgps < drain + MARGIN:
            err(where, f"terminationGracePeriodSeconds={tgps} < preStop {pre} + grace {grace} + "
                       f"stop {SIDECAR_STOP_TIMEOUT} + margin {MARGIN}")
        for g in gateways:
            gpre = prestop_seconds(f"{where} container {g.get('name')!r}", g) or 0
            if gpre < drain:
                err(where, f"gateway {g.get('name')!r} preStop {gpre}s ends before the sidecar has drained "
                           f"({drain}s): in-flight requests would lose their upstream")
            if tgps < gpre + MARGIN:
                err(where, f"terminationGracePeriodSeconds={tgps} leaves the gateway no time after its preStop")
        NOTES.append(f"{where}: preStop {pre}s + grace {grace}s + stop {SIDECAR_STOP_TIMEOUT}s = {drain}s "
                     f"drain; terminationGracePeriodSeconds {tgps}s")
    ctx["templates"][d["kind"]] = (where, tmpl)


def strip_private(o):
    if isinstance(o, dict):
        return {k: strip_private(v) for k, v in o.items() if not k.startswith("_")}
    if isinstance(o, list):
        return [strip_private(v) for v in o]
    return o


def compare_templates(ctx):
    if not all(k in ctx["templates"] for k in WORKLOAD_KINDS):
        return
    (_, a), (_, b) = ctx["templates"]["Deployment"], ctx["templates"]["StatefulSet"]
    a, b = strip_private(a), strip_private(b)
    a_spec = dict(a.get("spec") or {})
    a_spec["volumes"] = [v for v in a_spec.get("volumes") or [] if v.get("name") != "data"]
    a = dict(a, spec=a_spec)
    if a != b:
        err("deployment.yaml vs statefulset.yaml", "pod templates differ (apart from the data volume): keep them in sync")


def main(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    directory = here
    rendered = None
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--rendered":
            rendered = args.pop(0)
        else:
            directory = a
    repo_root = os.path.abspath(os.path.join(directory, "..", ".."))
    ctx = {"configmaps": {}, "secrets": {}, "services": {}, "templates": {}, "grace": grace_period_seconds(repo_root)}

    files = sorted(f for f in os.listdir(directory) if f.endswith((".yaml", ".yml")))
    all_docs = []
    for f in files:
        docs = load(os.path.join(directory, f))
        if not docs:
            err(f, "no YAML documents")
        all_docs.extend((f, w, d) for w, d in docs)
    valid = [(f, w, d) for f, w, d in all_docs if check_meta(w, d)]

    for f, w, d in valid:
        kind, name = d["kind"], (d.get("metadata") or {}).get("name")
        if kind == "ConfigMap":
            data = d.get("data") or {}
            for k, v in data.items():
                if not isinstance(v, str):
                    err(w, f"data.{k} must be a string (quote numbers and booleans)")
                if re.search(r"SECRET|PASSWORD|API_KEY|TOKEN(?!_TTL)", k) and not k.endswith("_FILE"):
                    err(w, f"data.{k} looks like a secret: put it in the Secret")
            ctx["configmaps"][name] = data
        elif kind == "Secret":
            data = dict(d.get("stringData") or {})
            data.update(d.get("data") or {})
            for k, v in data.items():
                if not isinstance(v, str):
                    err(w, f"{k} must be a string")
            ctx["secrets"][name] = data
        elif kind == "Service":
            ctx["services"][name] = (w, d)

    workloads = []
    for f, w, d in valid:
        if d["kind"] in WORKLOAD_KINDS:
            check_workload(w, d, ctx)
            workloads.append((w, d))
    compare_templates(ctx)

    def pods_selected(selector):
        return [
            (w, d) for w, d in workloads
            if labels_match(selector, ((d["spec"].get("template") or {}).get("metadata") or {}).get("labels"))
        ]

    for name, (w, d) in ctx["services"].items():
        spec = d.get("spec") or {}
        sel = spec.get("selector") or {}
        targets = pods_selected(sel)
        if not targets:
            err(w, f"Service selector {sel} matches no workload")
        named = {}
        for _, wd in targets:
            for c in wd["spec"]["template"]["spec"]["containers"]:
                named.update(c.get("_ports") or {})
        for p in spec.get("ports") or []:
            if not isinstance(p.get("port"), int) or not 1 <= p["port"] <= 65535:
                err(w, f"port {p.get('port')!r} invalid")
            tp = p.get("targetPort", p.get("port"))
            if isinstance(tp, str) and targets and tp not in named:
                err(w, f"targetPort {tp!r} is not a named container port")
            if spec.get("clusterIP") != "None" and (tp in ("admin", 9090) or p.get("port") == 9090):
                err(w, "a load-balanced Service must not expose the admin port 9090")

    for f, w, d in valid:
        kind, spec = d["kind"], d.get("spec") or {}
        if kind == "StatefulSet":
            svc = ctx["services"].get(spec.get("serviceName"))
            if svc is None:
                err(w, f"serviceName {spec.get('serviceName')!r} is not a Service in this directory")
            elif (svc[1].get("spec") or {}).get("clusterIP") != "None":
                err(w, f"serviceName {spec.get('serviceName')!r} should be a headless Service")
        if kind == "ServiceMonitor":
            sel = (spec.get("selector") or {}).get("matchLabels") or {}
            svcs = [s for n, (sw, s) in ctx["services"].items()
                    if labels_match(sel, (s.get("metadata") or {}).get("labels"))]
            if not svcs:
                err(w, f"ServiceMonitor selector {sel} matches no Service")
            port_names = {p.get("name") for s in svcs for p in (s.get("spec") or {}).get("ports") or []}
            for ep in spec.get("endpoints") or []:
                if ep.get("port") not in port_names:
                    err(w, f"endpoint port {ep.get('port')!r} not a port of the selected Service(s)")
                if ep.get("path", "/metrics") != "/metrics":
                    err(w, "the sidecar serves metrics on /metrics")
        if kind == "NetworkPolicy":
            if not pods_selected((spec.get("podSelector") or {}).get("matchLabels") or {}):
                err(w, "NetworkPolicy podSelector matches no workload")
        if kind == "Kustomization":
            res = d.get("resources") or []
            for r in res:
                if not os.path.exists(os.path.join(directory, r)):
                    err(w, f"resource {r!r} does not exist")
            if "deployment.yaml" in res and "statefulset.yaml" in res:
                err(w, "list deployment.yaml OR statefulset.yaml, not both (same pods)")
            if any("secret.example" in r for r in res):
                err(w, "secret.example.yaml must not be applied (placeholder secrets)")

    if rendered:
        docs = load(rendered)
        for w, d in docs:
            check_meta(f"rendered {w}", d)
        NOTES.append(f"rendered kustomization: {len(docs)} documents, "
                     + ", ".join(sorted(f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}" for _, d in docs)))

    for n in NOTES:
        print(f"  note: {n}")
    if ERRORS:
        for e in ERRORS:
            print(f"  ERROR {e}")
        print(f"FAILED: {len(ERRORS)} error(s) in {len(files)} files")
        return 1
    kinds = {}
    for _, _, d in valid:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    print(f"OK: {len(files)} files, {len(valid)} documents ("
          + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
