#!/usr/bin/env python3
"""Load benchmark driver for preauth-sidecar (started by benches/load/run.sh; stdlib only).

Subcommands
  run       the whole benchmark: start mock, nginx, sidecar (embedded) and sidecar (Redis), measure
            interleaved rounds with wrk, a fixed-rate open-loop run and a 100k-tenant memory run,
            print markdown tables and write them to benches/load/results/<timestamp>.md.
  openloop  fixed-rate open-loop HTTP/1.1 load generator (latency from the *scheduled* start, so
            no coordinated omission); prints one JSON line. `run` uses the Rust generator
            target/release/examples/openloop (examples/openloop.rs: same arguments, same output,
            precise timerfd schedule) when it is built; this Python one is the fallback.
  tenants   closed-loop generator sending exactly one request for each of N distinct tenants
            (a JWT minted per tenant, or x-tenant-id); prints one JSON line.

Everything talks to 127.0.0.1 only. Every process it starts is recorded in <workdir>/pids and
stopped by PID at the end (SIGINT, then SIGKILL).
"""

import argparse
import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import http.client
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
CLK_TCK = os.sysconf("SC_CLK_TCK")

JWT_SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
APPROVAL_SECRET = "bench-approval-secret-0123456789abcdef012345"
ADMIN_KEY = "bench-admin-key"
BENCH_TENANT = "bench-tenant"
CHAT_PATH = "/v1/chat/completions"
MESSAGES = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say hello to the load benchmark in five words."}]


def body_for(mode, include_usage=True):
    b = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 16}
    if mode == "sse":
        b["stream"] = True
        if include_usage:
            b["stream_options"] = {"include_usage": True}
    return json.dumps(b, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# JWT (HS256) as the sidecar's identity step expects it (src/demo/mod.rs mint_tenant_jwt)
# ---------------------------------------------------------------------------------------------

def _b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=")


_JWT_HEAD = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())


def mint_jwt(tenant, tier="enterprise", ttl=6 * 3600, secret=JWT_SECRET, now=None):
    now = int(now if now is not None else time.time())
    claims = {"sub": f"user-of-{tenant}", "aud": "authenticated", "role": "authenticated",
              "tenant_id": tenant, "tier": tier, "iat": now, "exp": now + ttl}
    signing = _JWT_HEAD + b"." + _b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = _b64(hmac.new(secret.encode(), signing, hashlib.sha256).digest())
    return (signing + b"." + sig).decode()


# ---------------------------------------------------------------------------------------------
# Minimal asyncio HTTP/1.1 client pieces (keep-alive, content-length or chunked responses)
# ---------------------------------------------------------------------------------------------

def build_request(host, port, path, body, headers):
    b = body.encode() if isinstance(body, str) else body
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(b)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + b


async def read_response(reader):
    """Returns (status, keep_alive). Reads and discards the body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    cl = None
    chunked = False
    close = False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            cl = int(v.strip())
        elif k == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
        elif k == b"connection" and b"close" in v.lower():
            close = True
    if chunked:
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            await reader.readexactly(size + 2)
    elif cl:
        await reader.readexactly(cl)
    return status, not close


async def _connect(host, port):
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


def pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


# ---------------------------------------------------------------------------------------------
# openloop: fixed request rate, latency from scheduled start time
# ---------------------------------------------------------------------------------------------

async def openloop_main(a):
    headers = [("Authorization", f"Bearer {a.token}")] + [tuple(h.split(": ", 1)) for h in a.header]
    req = build_request(a.host, a.port, a.path, a.body, headers)
    q = asyncio.Queue()
    lat, svc, lags = [], [], []
    stats = {"non2xx": 0, "errors": 0, "completed": 0, "reconnects": 0}
    record_from = [None]

    async def worker():
        reader, writer = await _connect(a.host, a.port)
        ready.append(1)
        while True:
            due = await q.get()
            if due is None:
                break
            t_send = time.perf_counter()
            try:
                writer.write(req)
                status, keep = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                stats["errors"] += 1
                keep = False
                status = 0
            t_end = time.perf_counter()
            if due >= record_from[0]:
                stats["completed"] += 1
                lat.append(t_end - due)
                svc.append(t_end - t_send)
                lags.append(t_send - due)
                if not 200 <= status < 300:
                    stats["non2xx"] += 1
            if not keep:
                writer.close()
                stats["reconnects"] += 1
                reader, writer = await _connect(a.host, a.port)
        writer.close()

    ready = []
    workers = [asyncio.ensure_future(worker()) for _ in range(a.connections)]
    while len(ready) < a.connections:
        await asyncio.sleep(0.01)
        for w in workers:
            if w.done() and w.exception():
                raise w.exception()
    n_warm = int(a.rate * a.warmup)
    n = n_warm + int(a.rate * a.duration)
    t0 = time.perf_counter() + 0.02
    record_from[0] = t0 + n_warm / a.rate
    interval = 1.0 / a.rate
    cpu0 = os.times()
    loop = asyncio.get_running_loop()

    # The schedule is kept by a thread sleeping with clock_nanosleep (sub-ms precision) rather
    # than by the event loop (epoll timeouts round up to 1 ms). It enqueues each request at its
    # scheduled time; a request waiting for a free connection keeps its scheduled start.
    def dispatcher():
        for i in range(n):
            due = t0 + i * interval
            d = due - time.perf_counter()
            if d > 0:
                time.sleep(d)
            loop.call_soon_threadsafe(q.put_nowait, due)
        for _ in workers:
            loop.call_soon_threadsafe(q.put_nowait, None)

    sys.setswitchinterval(0.0005)
    th = threading.Thread(target=dispatcher, daemon=True)
    th.start()
    await asyncio.gather(*workers)
    t_end = time.perf_counter()
    cpu1 = os.times()
    lat.sort()
    svc.sort()
    lags.sort()
    us = 1e6
    out = {
        "rate": a.rate, "duration": a.duration, "scheduled": n - n_warm, **stats,
        "achieved_rps": stats["completed"] / max(1e-9, t_end - record_from[0]),
        "p50_us": pct(lat, 50) * us, "p90_us": pct(lat, 90) * us, "p99_us": pct(lat, 99) * us,
        "p999_us": pct(lat, 99.9) * us, "max_us": (lat[-1] if lat else 0) * us,
        "svc_p50_us": pct(svc, 50) * us, "svc_p99_us": pct(svc, 99) * us,
        "lag_p99_us": pct(lags, 99) * us, "lag_max_us": (lags[-1] if lags else 0) * us,
        "loadgen_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
    }
    print("BENCH_JSON " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------
# tenants: one request for each of N distinct tenants, closed loop over C connections
# ---------------------------------------------------------------------------------------------

async def tenants_main(a):
    body = body_for("json")
    t_build = time.perf_counter()
    now = int(time.time())
    reqs = []
    for i in range(a.count):
        tenant = f"t{i:07d}"
        if a.identity == "jwt":
            h = [("Authorization", f"Bearer {mint_jwt(tenant, 'enterprise', now=now)}")]
        else:
            h = [("x-tenant-id", tenant), ("x-tenant-tier", "enterprise"), ("x-user-id", f"u-{tenant}")]
        reqs.append(build_request(a.host, a.port, CHAT_PATH, body, h))
    build_s = time.perf_counter() - t_build
    idx = [0]
    stats = {"ok": 0, "non2xx": 0, "errors": 0, "statuses": {}}

    async def worker():
        reader, writer = await _connect(a.host, a.port)
        while idx[0] < len(reqs):
            i = idx[0]
            idx[0] += 1
            try:
                writer.write(reqs[i])
                status, keep = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                stats["errors"] += 1
                status, keep = 0, False
            if 200 <= status < 300:
                stats["ok"] += 1
            else:
                stats["non2xx"] += 1
                stats["statuses"][str(status)] = stats["statuses"].get(str(status), 0) + 1
            if not keep:
                writer.close()
                reader, writer = await _connect(a.host, a.port)
        writer.close()

    cpu0 = os.times()
    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(a.connections)])
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    out = {"count": a.count, "identity": a.identity, "elapsed_s": elapsed, "rps": a.count / elapsed,
           "build_s": build_s, "loadgen_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), **stats}
    print("BENCH_JSON " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------
# /proc helpers
# ---------------------------------------------------------------------------------------------

def proc_cpu_split(pid):
    """(utime, stime) of a process in clock ticks, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        fields = s[s.rindex(")") + 2:].split()
        return int(fields[11]), int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def proc_cpu_ticks(pid):
    split = proc_cpu_split(pid)
    return None if split is None else split[0] + split[1]


def proc_status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def sys_cpu():
    """{'user','system','softirq','irq','steal','idle'} jiffies summed over all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    return {"user": user + nice, "system": system, "irq": irq, "softirq": softirq, "steal": steal,
            "idle": idle + iowait}


def all_proc_ticks():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            t = proc_cpu_ticks(d)
            if t is not None:
                try:
                    with open(f"/proc/{d}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                out[int(d)] = (comm, t)
    return out


def http_get(port, path, headers=None, timeout=2.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=20.0, proc=None):
    t = time.time()
    while time.time() - t < timeout:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def med_range(vals, fmt="{:.0f}"):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    m = statistics.median(vals)
    if len(vals) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"


def fmt_auto(v):
    return "{:.2f}".format(v) if abs(v) < 10 else "{:.0f}".format(v)


class Fail(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# run: the orchestrator
# ---------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, a):
        self.a = a
        self.work = a.workdir
        os.makedirs(self.work, exist_ok=True)
        self.pidfile = os.path.join(self.work, "pids")
        self.procs = []  # (name, Popen)
        self.env = dict(os.environ)
        e = lambda k, d: os.environ.get(k, d)
        self.rounds = int(e("ROUNDS", "3"))
        self.duration = int(e("DURATION", "10"))
        self.conns = int(e("CONNECTIONS", "32"))
        self.sut_cpus = e("SUT_CPUS", "0")
        self.lg_cpus = e("LOADGEN_CPUS", "1")
        # Higher priority for everything the benchmark starts (SUT and load generators), so that
        # other work on this shared machine preempts it less; needs root (else 0).
        self.nice = int(e("BENCH_NICE", "-10")) if os.geteuid() == 0 else 0
        self.warmup = int(e("WARMUP", "2"))
        self.targets = e("TARGETS", "direct nginx embedded redis").split()
        self.modes = e("MODES", "json sse").split()
        self.fixed_rate = int(e("FIXED_RATE", "1000"))
        self.fixed_duration = int(e("FIXED_DURATION", "10"))
        self.fixed_modes = e("FIXED_MODES", "json sse").split()
        self.fixed_rounds = int(e("FIXED_ROUNDS", str(self.rounds)))
        self.fixed_conns = int(e("FIXED_CONNECTIONS", "16"))
        self.tenants = int(e("TENANTS", "100000"))
        self.tenants_identity = e("TENANTS_IDENTITY", "jwt")
        self.tenants_conns = int(e("TENANTS_CONNECTIONS", "32"))
        self.tenants_reclaim_wait = int(e("TENANTS_RECLAIM_WAIT", "0"))
        self.include_usage = e("SSE_INCLUDE_USAGE", "1") == "1"
        # Saturation runs queue ~32 requests on one pinned proxy thread: a store round trip then
        # waits behind the queue and the production defaults (20 ms / 50 ms) fail closed with 503.
        self.store_timeout = e("STORE_TIMEOUT_MS", "1000")
        self.gate_timeout = e("GATE_TIMEOUT_MS", "2000")
        self.redis_url = e("REDIS_URL", "redis://127.0.0.1:6379")
        self.redis_prefix = f"preauthbench-{int(time.time())}-{os.getpid()}:"
        self.sidecar_bin = e("SIDECAR_BIN", os.path.join(REPO, "target/release/preauth-sidecar"))
        self.mock_bin = e("MOCK_BIN", os.path.join(REPO, "target/release/examples/fake_upstream"))
        # Fixed-rate generator: the Rust one when built (run.sh builds it), else the Python one below.
        self.openloop_bin = e("OPENLOOP_BIN", os.path.join(REPO, "target/release/examples/openloop"))
        self.openloop_gen = "rust" if os.path.isfile(self.openloop_bin) and os.access(self.openloop_bin, os.X_OK) \
            else "python"
        # ... and it runs SCHED_FIFO (chrt -f 1) when allowed: under CPU contention from other work
        # on this machine, CFS wake-up delays put 2-5 ms into its p99 send lag; with FIFO it stays
        # ~0.1 ms. It uses ~10% of one CPU, and RT throttling bounds it anyway.
        self.loadgen_rt = e("LOADGEN_RT", "1") == "1" and shutil.which("chrt") is not None and \
            subprocess.run(["chrt", "-f", "1", "true"], capture_output=True).returncode == 0
        self.profile = e("PROFILE", "0") == "1"
        self.results_dir = e("RESULTS_DIR", os.path.join(HERE, "results"))
        self.token = mint_jwt(BENCH_TENANT, "enterprise", ttl=24 * 3600)
        self.ports = {}
        self.pids = {}
        self.redis_pid = None
        self.out = []  # markdown lines

    # -- processes ---------------------------------------------------------------------------
    def log(self, msg):
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def spawn(self, name, argv, env=None, cpus=None):
        logf = open(os.path.join(self.work, f"{name}.log"), "ab")
        cmd = self.pin(cpus) + argv
        p = subprocess.Popen(cmd, env=env or self.env, stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, p))
        with open(self.pidfile, "a") as f:
            f.write(f"{p.pid}\n")
        return p

    def pin(self, cpus):
        return (["nice", "-n", str(self.nice)] if self.nice else []) + (["taskset", "-c", cpus] if cpus else [])

    def stop_all(self):
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGINT if name != "nginx" else signal.SIGQUIT)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 8
        for name, p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def stop_one(self, name):
        for n, p in self.procs:
            if n == name and p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(timeout=8)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def log_tail(self, name, n=30):
        try:
            with open(os.path.join(self.work, f"{name}.log"), "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""

    # -- SUT ---------------------------------------------------------------------------------
    def start_mock(self):
        port = free_port()
        p = self.spawn("mock", [self.mock_bin, f"127.0.0.1:{port}"], cpus=self.sut_cpus)
        if not wait_port(port, proc=p):
            raise Fail("mock upstream did not start:\n" + self.log_tail("mock"))
        self.ports["direct"] = port
        self.pids["direct"] = p.pid
        self.pids["mock"] = p.pid

    def start_nginx(self):
        prefix = os.path.join(self.work, "nginx")
        os.makedirs(prefix, exist_ok=True)
        port = free_port()
        with open(os.path.join(HERE, "nginx.conf.tmpl")) as f:
            conf = f.read()
        conf = conf.replace("@PREFIX@", prefix).replace("@MOCK_PORT@", str(self.ports["direct"])) \
                   .replace("@NGINX_PORT@", str(port))
        cpath = os.path.join(prefix, "nginx.conf")
        with open(cpath, "w") as f:
            f.write(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        p = self.spawn("nginx", [nginx, "-p", prefix, "-c", cpath, "-e", os.path.join(prefix, "error.log")],
                       cpus=self.sut_cpus)
        if not wait_port(port, proc=p):
            raise Fail("nginx did not start:\n" + self.log_tail("nginx") + "\n" +
                       open(os.path.join(prefix, "error.log")).read()[-2000:])
        for _ in range(50):
            kids = proc_children(p.pid)
            if kids:
                break
            time.sleep(0.05)
        if len(kids) != 1:
            raise Fail(f"nginx: expected one worker, found {kids}")
        self.ports["nginx"] = port
        self.pids["nginx"] = kids[0]
        self.pids["nginx-master"] = p.pid

    def write_tenants_file(self):
        path = os.path.join(self.work, "tenants.toml")
        with open(path, "w") as f:
            f.write(f"""# benches/load: one tenant that nothing denies, every gate still evaluated
[tenants."{BENCH_TENANT}"]
tier = "enterprise"
monthly_budget_usd = "100000000.00"
daily_request_quota = 0
fair_use_per_minute_cap = 1000000000
concurrency_cap = 100000
tokens_per_minute = 1000000000000
""")
        return path

    def sidecar_env(self, name, listen, admin, redis=False, extra=None):
        data = os.path.join(self.work, f"data-{name}")
        os.makedirs(data, exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if not (k.startswith("PREAUTH_") or k.startswith("LLM_") or k.startswith("ENFORCEMENT_")
                       or k in ("SUPABASE_JWT_SECRET", "ADMIN_API_KEY", "RUST_LOG"))}
        env.update({
            "PREAUTH_LISTEN_ADDR": f"127.0.0.1:{listen}",
            "PREAUTH_ADMIN_ADDR": f"127.0.0.1:{admin}",
            "PREAUTH_UPSTREAM_URL": f"http://127.0.0.1:{self.ports['direct']}",
            "PREAUTH_THREADS": "1",
            "RUST_LOG": "warn",
            "PREAUTH_LOG_FORMAT": "json",
            "PREAUTH_DATA_DIR": data,
            "PREAUTH_INSTANCE_ID": f"bench-{name}",
            "PREAUTH_IDENTITY": "jwt",
            "SUPABASE_JWT_SECRET": JWT_SECRET,
            "PREAUTH_JWT_AUDIENCE": "authenticated",
            "PREAUTH_TENANTS_FILE": self.tenants_file,
            "LLM_GLOBAL_ABUSE_GUARDS_ENABLED": "true",
            "LLM_GLOBAL_ABUSE_KILL_SWITCH": "false",
            "LLM_FAIR_USE_GUARDS_ENABLED": "true",
            "LLM_FAIR_USE_ENTERPRISE_DAILY_SOFT_CAP": "0",
            "PREAUTH_TENANT_TOKENS_PER_MINUTE": "1000000000000",
            "PREAUTH_ENFORCEMENT_MODE": "hard",
            "PREAUTH_REQUIRE_APPROVAL_ABOVE_USD": "1.00",
            "PREAUTH_HARD_DENY_ABOVE_USD": "50.00",
            "ENFORCEMENT_APPROVAL_TOKEN_SECRET": APPROVAL_SECRET,
            "ADMIN_API_KEY": ADMIN_KEY,
            "PREAUTH_STORE_TIMEOUT_MS": self.store_timeout,
            "PREAUTH_GATE_TIMEOUT_MS": self.gate_timeout,
        })
        if redis:
            env["PREAUTH_REDIS_URL"] = self.redis_url
            env["PREAUTH_REDIS_KEY_PREFIX"] = self.redis_prefix
        env.update(extra or {})
        return env

    def start_sidecar(self, name, redis=False, extra=None):
        listen, admin = free_port(), free_port()
        env = self.sidecar_env(name, listen, admin, redis, extra)
        with open(os.path.join(self.work, f"{name}.env"), "w") as f:
            for k in sorted(env):
                if k.startswith(("PREAUTH_", "LLM_", "ENFORCEMENT_", "SUPABASE_", "ADMIN_", "RUST_LOG")):
                    f.write(f"{k}={env[k]}\n")
        p = self.spawn(name, [self.sidecar_bin, "run"], env=env, cpus=self.sut_cpus)
        t = time.time()
        while time.time() - t < 60:
            if p.poll() is not None:
                raise Fail(f"sidecar {name} exited with {p.returncode}:\n" + self.log_tail(name))
            try:
                st, _ = http_get(admin, "/readyz", timeout=0.5)
                if st == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise Fail(f"sidecar {name} not ready after 60 s:\n" + self.log_tail(name))
        self.ports[name] = listen
        self.ports[name + "-admin"] = admin
        self.pids[name] = p.pid
        return p

    def find_redis_pid(self):
        try:
            out = subprocess.run(["redis-cli", "-u", self.redis_url, "info", "server"], capture_output=True,
                                 text=True, timeout=5).stdout
            for line in out.splitlines():
                if line.startswith("process_id:"):
                    pid = int(line.split(":")[1])
                    if proc_cpu_ticks(pid) is not None:
                        return pid
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        return None

    def redis_cleanup(self):
        try:
            keys = subprocess.run(["redis-cli", "-u", self.redis_url, "--scan", "--pattern", self.redis_prefix + "*"],
                                  capture_output=True, text=True, timeout=60).stdout.split()
            for i in range(0, len(keys), 500):
                subprocess.run(["redis-cli", "-u", self.redis_url, "unlink", *keys[i:i + 500]],
                               capture_output=True, timeout=30)
            return len(keys)
        except (OSError, subprocess.SubprocessError):
            return None

    # -- checks ------------------------------------------------------------------------------
    def sanity(self, target, mode):
        port = self.ports[target]
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("POST", CHAT_PATH, body=body_for(mode, self.include_usage),
                  headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
                           "x-mock-chunks": "5"})
        r = c.getresponse()
        body = r.read()
        c.close()
        if r.status != 200:
            raise Fail(f"sanity {target}/{mode}: HTTP {r.status}: {body[:400]!r} {r.getheaders()}")
        if target in ("embedded", "redis") and r.getheader("x-preauth-decision") != "ALLOW":
            raise Fail(f"sanity {target}/{mode}: no x-preauth-decision: ALLOW ({r.getheaders()})")
        if mode == "sse":
            if b"data: [DONE]" not in body or b'"usage":{' not in body:
                raise Fail(f"sanity {target}/{mode}: SSE without [DONE]/usage: {body[-300:]!r}")
        return len(body)

    # -- measurement -------------------------------------------------------------------------
    def known_pids(self):
        ps = {k: v for k, v in self.pids.items() if k != "direct"}
        if self.redis_pid:
            ps["redis-server"] = self.redis_pid
        return ps

    def snapshot(self):
        split = {k: proc_cpu_split(v) for k, v in self.known_pids().items()}
        return {"sys": sys_cpu(), "pids": {k: None if v is None else v[0] + v[1] for k, v in split.items()},
                "split": split, "t": time.time()}

    def delta(self, s0, s1, loadgen_cpu_s):
        d = {k: (s1["pids"][k] - s0["pids"][k]) / CLK_TCK for k in s0["pids"]
             if s0["pids"][k] is not None and s1["pids"].get(k) is not None}
        sysd = {k: (s1["sys"][k] - s0["sys"][k]) / CLK_TCK for k in s0["sys"]}
        ours = sum(d.values()) + loadgen_cpu_s
        # /proc/stat is sampled by the 250 Hz tick, per-process times are exact: at low load the
        # difference can go slightly negative; clamp.
        other = max(0.0, sysd["user"] + sysd["system"] - ours)
        return d, sysd, other

    def wrk(self, target, mode, duration, extra_env=None):
        port = self.ports[target]
        env = dict(self.env)
        env.update({"BENCH_BODY": body_for(mode, self.include_usage), "BENCH_TOKEN": self.token,
                    "BENCH_PATH": CHAT_PATH, "BENCH_EXTRA_HEADER": "x-mock-chunks: 5"})
        env.update(extra_env or {})
        cmd = self.pin(self.lg_cpus) + ["wrk", "-t1", f"-c{self.conns}", f"-d{duration}s", "--latency",
               "-s", os.path.join(HERE, "post.lua"), f"http://127.0.0.1:{port}{CHAT_PATH}"]
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 60)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        lg_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        js = [l for l in p.stdout.splitlines() if l.startswith("BENCH_JSON ")]
        if p.returncode != 0 or not js:
            raise Fail(f"wrk {target}/{mode} failed (rc {p.returncode}):\n{p.stdout}\n{p.stderr}")
        return json.loads(js[-1][len("BENCH_JSON "):]), lg_cpu, p.stdout

    def proxy_pid(self, target):
        return self.pids["mock" if target == "direct" else target]

    def measure(self, target, mode, rnd):
        s0 = self.snapshot()
        w, lg_cpu, raw = self.wrk(target, mode, self.duration)
        s1 = self.snapshot()
        rss = proc_status_kb(self.proxy_pid(target), "VmRSS")
        d, sysd, other = self.delta(s0, s1, lg_cpu)
        reqs = w["requests"]
        key = "mock" if target == "direct" else target
        u0, u1 = s0["split"].get(key), s1["split"].get(key)
        user_us, kernel_us = ((b - a) / CLK_TCK * 1e6 / max(1, reqs) for a, b in zip(u0, u1)) if u0 and u1 else (0.0, 0.0)
        errs = w["status"] + w["connect"] + w["read"] + w["write"] + w["timeout"]
        res = {
            "target": target, "mode": mode, "round": rnd, "requests": reqs,
            "rps": reqs / (w["duration_us"] / 1e6), "p50_ms": w["p50_us"] / 1000, "p99_ms": w["p99_us"] / 1000,
            "cpu_us": d.get(key, 0) * 1e6 / max(1, reqs), "user_us": user_us, "kernel_us": kernel_us,
            "rss_mb": (rss or 0) / 1024,
            "mock_us": d.get("mock", 0) * 1e6 / max(1, reqs),
            "redis_us": d.get("redis-server", 0) * 1e6 / max(1, reqs) if target == "redis" else None,
            "loadgen_cpu_s": lg_cpu, "other_cpu_s": other, "softirq_s": sysd["softirq"], "steal_s": sysd["steal"],
            "errors": errs, "wrk": w,
        }
        with open(os.path.join(self.work, "runs.jsonl"), "a") as f:
            f.write(json.dumps(res) + "\n")
        self.log(f"r{rnd} {mode:4s} {target:8s} {res['rps']:8.0f} req/s  p50 {res['p50_ms']:.2f} ms  "
                 f"p99 {res['p99_ms']:.2f} ms  cpu {res['cpu_us']:.1f} µs/req  rss {res['rss_mb']:.1f} MB  "
                 f"mock {res['mock_us']:.1f} µs/req  other {other:.2f} s  steal {sysd['steal']:.2f} s")
        if errs:
            raise Fail(f"{target}/{mode} round {rnd}: {w['status']} non-2xx responses and "
                       f"{errs - w['status']} socket errors (connect/read/write/timeout) — must be 0:\n{raw}\n"
                       + (self.log_tail(target) if target in ("embedded", "redis") else ""))
        return res

    def openloop(self, target, mode):
        port = self.ports[target]
        gen = [self.openloop_bin] if self.openloop_gen == "rust" else \
            [sys.executable, os.path.abspath(__file__), "openloop"]
        rt = ["chrt", "-f", "1"] if self.loadgen_rt else []
        cmd = self.pin(self.lg_cpus) + rt + gen + [
               "--port", str(port), "--rate", str(self.fixed_rate), "--duration", str(self.fixed_duration),
               "--connections", str(self.fixed_conns), "--token", self.token,
               "--body", body_for(mode, self.include_usage), "--header", "x-mock-chunks: 5"]
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        s0 = self.snapshot()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.fixed_duration + 120)
        s1 = self.snapshot()
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        js = [l for l in p.stdout.splitlines() if l.startswith("BENCH_JSON ")]
        if p.returncode != 0 or not js:
            raise Fail(f"openloop {target}/{mode} failed:\n{p.stdout}\n{p.stderr}")
        o = json.loads(js[-1][len("BENCH_JSON "):])
        lg = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        d, sysd, other = self.delta(s0, s1, lg)
        key = "mock" if target == "direct" else target
        o["cpu_us"] = d.get(key, 0) * 1e6 / max(1, o["completed"])
        o["other_cpu_s"] = other
        o["target"], o["mode"] = target, mode
        o["generator"] = self.openloop_gen
        o["loadgen_sched"] = "fifo" if self.loadgen_rt else "other"
        with open(os.path.join(self.work, "fixed.jsonl"), "a") as f:
            f.write(json.dumps(o) + "\n")
        self.log(f"fixed {mode:4s} {target:8s} {o['achieved_rps']:7.0f} req/s  p50 {o['p50_us']/1000:.3f} ms  "
                 f"p99 {o['p99_us']/1000:.3f} ms  p99.9 {o['p999_us']/1000:.3f} ms  cpu {o['cpu_us']:.1f} µs/req  "
                 f"lag p99 {o['lag_p99_us']:.0f} µs  other {other:.2f} s")
        if o["non2xx"] or o["errors"]:
            raise Fail(f"openloop {target}/{mode}: {o['non2xx']} non-2xx, {o['errors']} errors — must be 0")
        return o

    # -- 100k tenants ------------------------------------------------------------------------
    def tenants_run(self):
        name = "tenants"
        extra = {"LLM_GLOBAL_ABUSE_PER_MINUTE_CAP": "100000", "LLM_GLOBAL_ABUSE_UNIQUE_TENANTS_THRESHOLD": "10000",
                 "PREAUTH_IDENTITY": self.tenants_identity}
        p = self.start_sidecar(name, extra=extra)
        pid = p.pid
        time.sleep(1.0)
        rss0 = proc_status_kb(pid, "VmRSS")
        c0 = proc_cpu_ticks(pid)
        cmd = self.pin(self.lg_cpus) + [sys.executable, os.path.abspath(__file__), "tenants",
               "--port", str(self.ports[name]), "--count", str(self.tenants), "--identity", self.tenants_identity,
               "--connections", str(self.tenants_conns)]
        self.log(f"100k-tenant run: {self.tenants} tenants, identity {self.tenants_identity}, "
                 f"{self.tenants_conns} connections")
        pr = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        js = [l for l in pr.stdout.splitlines() if l.startswith("BENCH_JSON ")]
        if pr.returncode != 0 or not js:
            raise Fail(f"tenants loadgen failed:\n{pr.stdout}\n{pr.stderr}")
        o = json.loads(js[-1][len("BENCH_JSON "):])
        c1 = proc_cpu_ticks(pid)
        time.sleep(2.5)  # the housekeeper sweeps (and updates preauth_tenants_tracked) every second
        o["rss_idle_mb"] = (rss0 or 0) / 1024
        o["rss_mb"] = (proc_status_kb(pid, "VmRSS") or 0) / 1024
        o["hwm_mb"] = (proc_status_kb(pid, "VmHWM") or 0) / 1024
        o["cpu_us"] = (c1 - c0) / CLK_TCK * 1e6 / max(1, o["count"])
        o["tracked"] = self.metric(name, "preauth_tenants_tracked")
        if self.tenants_reclaim_wait > 0:
            self.log(f"waiting {self.tenants_reclaim_wait} s for per-tenant state to expire")
            time.sleep(self.tenants_reclaim_wait)
            o["rss_after_wait_mb"] = (proc_status_kb(pid, "VmRSS") or 0) / 1024
            o["tracked_after_wait"] = self.metric(name, "preauth_tenants_tracked")
        self.log(f"100k tenants: {o}")
        self.stop_one(name)
        if o["non2xx"] or o["errors"]:
            raise Fail(f"100k-tenant run: {o['non2xx']} non-2xx {o['statuses']}, {o['errors']} errors — must be 0:\n"
                       + self.log_tail(name))
        return o

    def metric(self, name, metric):
        try:
            st, body = http_get(self.ports[name + "-admin"], "/metrics")
            total = 0.0
            found = False
            for line in body.decode().splitlines():
                if line.startswith(metric) and not line.startswith("#"):
                    total += float(line.rsplit(" ", 1)[1])
                    found = True
            return total if found else None
        except (OSError, ValueError):
            return None

    def tenant_view(self, name):
        try:
            st, body = http_get(self.ports[name + "-admin"], f"/api/v1/enforcement/tenants/{BENCH_TENANT}",
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            return json.loads(body) if st == 200 else {"status": st}
        except (OSError, ValueError) as e:
            return {"error": str(e)}

    SYSCALLS = ["sendto", "writev", "write", "recvfrom", "read", "getrandom", "getpeername", "getsockopt",
                "epoll_wait", "fdatasync", "futex"]

    def perf_profile(self):
        if not shutil.which("perf"):
            self.log("PROFILE=1 but perf is not installed; skipped")
            return None
        pid = self.pids["embedded"]
        data = os.path.join(self.work, "perf.data")
        perf = subprocess.Popen(["perf", "record", "-F", "1999", "-g", "-p", str(pid), "-o", data, "--",
                                 "sleep", str(self.duration)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(("perf", perf))
        w, _, _ = self.wrk("embedded", "json", self.duration)
        perf.wait()
        rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "sym", "--stdio",
                              "--percent-limit", "0.5", "-g", "none"], capture_output=True, text=True)
        lines = [l for l in rep.stdout.splitlines() if l.strip() and not l.startswith("#")][:15]
        # System calls and context switches per request (perf tracepoints), sidecar vs nginx.
        per_req = {}
        for t in ("nginx", "embedded"):
            if t not in self.pids:
                continue
            events = ",".join(f"syscalls:sys_enter_{c}" for c in self.SYSCALLS) + ",context-switches"
            st = subprocess.Popen(["perf", "stat", "-x", ",", "-e", events, "-p", str(self.pids[t]), "--",
                                   "sleep", str(max(1, self.duration - 1))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            self.procs.append(("perf-stat", st))
            ww, _, _ = self.wrk(t, "json", self.duration)
            err = st.communicate()[1]
            reqs = ww["requests"] * max(1, self.duration - 1) / self.duration  # approx. requests in the window
            counts = {}
            for l in err.splitlines():
                f = l.split(",")
                if len(f) > 2 and f[0].strip().isdigit():
                    counts[f[2].replace("syscalls:sys_enter_", "")] = int(f[0]) / max(1, reqs)
            per_req[t] = counts
        return lines, w, per_req

    # -- report ------------------------------------------------------------------------------
    def md(self, line=""):
        self.out.append(line)

    def report_mode(self, mode, runs):
        by = {}
        for r in runs:
            if r["mode"] == mode:
                by.setdefault(r["target"], []).append(r)
        nginx = {r["round"]: r for r in by.get("nginx", [])}
        self.md(f"### {mode.upper()} ({'chat completion' if mode == 'json' else 'chat completion, SSE, 5 chunks'})")
        self.md()
        self.md("| target | req/s | p50 ms | p99 ms | CPU µs/req | user / kernel µs | RSS MB | CPU × nginx "
                "| req/s × nginx | mock µs/req | other CPU s |")
        self.md("|---|---|---|---|---|---|---|---|---|---|---|")
        for t in self.targets:
            rs = by.get(t, [])
            if not rs:
                continue
            cpu_ratio = [r["cpu_us"] / nginx[r["round"]]["cpu_us"] for r in rs
                         if r["round"] in nginx and nginx[r["round"]]["cpu_us"] > 0]
            rps_ratio = [r["rps"] / nginx[r["round"]]["rps"] for r in rs if r["round"] in nginx]
            label = {"direct": "direct (mock)", "nginx": "nginx", "embedded": "sidecar embedded",
                     "redis": "sidecar Redis"}[t]
            self.md(f"| {label} | {med_range([r['rps'] for r in rs])} | {med_range([r['p50_ms'] for r in rs], '{:.2f}')}"
                    f" | {med_range([r['p99_ms'] for r in rs], '{:.2f}')} | {med_range([r['cpu_us'] for r in rs], '{:.1f}')}"
                    f" | {statistics.median([r['user_us'] for r in rs]):.1f} / {statistics.median([r['kernel_us'] for r in rs]):.1f}"
                    f" | {med_range([r['rss_mb'] for r in rs], '{:.1f}')}"
                    f" | {'–' if t == 'direct' else med_range(cpu_ratio, '{:.2f}')}"
                    f" | {med_range(rps_ratio, '{:.2f}')}"
                    f" | {med_range([r['mock_us'] for r in rs], '{:.1f}')}"
                    f" | {max(r['other_cpu_s'] for r in rs):.2f} |")
        rr = by.get("redis", [])
        if rr and any(r["redis_us"] for r in rr):
            self.md()
            self.md(f"redis-server (unpinned, not counted above) CPU µs/req on the Redis row: "
                    f"{med_range([r['redis_us'] for r in rr], '{:.1f}')}")
        self.md()

    GENERATORS = {"rust": "Rust generator `examples/openloop` (one thread, timerfd schedule)",
                  "python": "Python asyncio generator (fallback: examples/openloop not built)"}

    def report_fixed(self, fixed):
        gens = sorted(set(o.get("generator", "python") for o in fixed))
        fifo = any(o.get("loadgen_sched") == "fifo" for o in fixed)
        self.md(f"### Fixed rate: {self.fixed_rate} req/s for {self.fixed_duration} s, open loop "
                f"(latency from the scheduled start; {self.fixed_conns} keep-alive connections; "
                f"{'/'.join('Rust' if g == 'rust' else 'Python' for g in gens)} generator)")
        self.md()
        self.md("Load generator: " + "; ".join(self.GENERATORS[g] for g in gens) + ", pinned to CPU "
                f"{self.lg_cpus}{', SCHED_FIFO priority 1' if fifo else ', normal (CFS) scheduling'}. "
                "*loadgen lag p99* = actual send − scheduled start (its own scheduling delay "
                "plus waiting for a free connection); it is part of every latency column except *from send*.")
        self.md()
        self.md("| mode | target | achieved req/s | p50 ms | p99 ms | p99.9 ms | added p99 vs direct ms | goal "
                "| p99 from send ms | proxy CPU µs/req | loadgen lag p99 µs |")
        self.md("|---|---|---|---|---|---|---|---|---|---|---|")
        goals = {"embedded": 0.5, "redis": 1.0}
        for mode in self.fixed_modes:
            by = {}
            for o in fixed:
                if o["mode"] == mode:
                    by.setdefault(o["target"], []).append(o)
            direct = by.get("direct", [])
            for t in self.targets:
                rs = by.get(t, [])
                if not rs:
                    continue
                added = [(r["p99_us"] - d["p99_us"]) / 1000 for r, d in zip(rs, direct)] if t != "direct" else []
                goal = ""
                if t in goals and added:
                    m = statistics.median(added)
                    goal = f"≤ {goals[t]} ms: {'met' if m <= goals[t] else 'NOT met'}"
                self.md(f"| {mode} | {t} | {med_range([r['achieved_rps'] for r in rs])}"
                        f" | {med_range([r['p50_us'] / 1000 for r in rs], '{:.3f}')}"
                        f" | {med_range([r['p99_us'] / 1000 for r in rs], '{:.3f}')}"
                        f" | {med_range([r['p999_us'] / 1000 for r in rs], '{:.3f}')}"
                        f" | {med_range(added, '{:+.3f}') if added else '–'} | {goal}"
                        f" | {med_range([r['svc_p99_us'] / 1000 for r in rs], '{:.3f}')}"
                        f" | {med_range([r['cpu_us'] for r in rs], '{:.1f}')}"
                        f" | {med_range([r['lag_p99_us'] for r in rs])} |")
        self.md()

    def report_tenants(self, o):
        self.md(f"### {o['count']:,} distinct tenants (sidecar embedded, identity `{o['identity']}`, "
                "everything on, one request each)")
        self.md()
        self.md("| tenants | elapsed s | req/s | non-2xx | RSS idle MB | RSS after MB | VmHWM MB | goal ≤ 64 MB "
                "| CPU µs/req | preauth_tenants_tracked |")
        self.md("|---|---|---|---|---|---|---|---|---|---|")
        ok = "met" if o["rss_mb"] <= 64 else "NOT met"
        within = "" if o["elapsed_s"] <= 60 else " (over 60 s!)"
        tr = o.get("tracked")
        self.md(f"| {o['count']:,} | {o['elapsed_s']:.1f}{within} | {o['rps']:.0f} | {o['non2xx']} "
                f"| {o['rss_idle_mb']:.1f} | {o['rss_mb']:.1f} | {o['hwm_mb']:.1f} | {ok} | {o['cpu_us']:.1f} "
                f"| {'–' if tr is None else int(tr)} |")
        if "rss_after_wait_mb" in o:
            tw = o.get("tracked_after_wait")
            self.md()
            self.md(f"After {self.tenants_reclaim_wait} s idle: RSS {o['rss_after_wait_mb']:.1f} MB, "
                    f"preauth_tenants_tracked {'–' if tw is None else int(tw)}.")
        self.md()

    # -- main --------------------------------------------------------------------------------
    def run(self):
        t_start = time.time()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        procs0 = all_proc_ticks()
        load0 = open("/proc/loadavg").read().split()[:3]
        self.tenants_file = self.write_tenants_file()
        # Private copies: other work may rebuild target/release while this runs.
        self.bin_info = {}
        for attr in ("sidecar_bin", "mock_bin") + (("openloop_bin",) if self.openloop_gen == "rust" else ()):
            src = getattr(self, attr)
            dst = os.path.join(self.work, os.path.basename(src))
            shutil.copy2(src, dst)
            with open(dst, "rb") as f:
                self.bin_info[attr] = (hashlib.sha256(f.read()).hexdigest()[:12],
                                       time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(src))))
            setattr(self, attr, dst)
        runs, fixed, tenants = [], [], None
        try:
            self.log(f"workdir {self.work}; SUT on CPU {self.sut_cpus}, load generator on CPU {self.lg_cpus}")
            if self.fixed_rounds > 0:
                self.log("fixed-rate generator: " + (f"Rust ({self.openloop_bin})" if self.openloop_gen == "rust" else
                         f"Python asyncio fallback ({self.openloop_bin} not found)") +
                         (", SCHED_FIFO 1" if self.loadgen_rt else ", normal scheduling (LOADGEN_RT=0 or chrt not allowed)"))
            self.start_mock()
            if "nginx" in self.targets:
                self.start_nginx()
            if "embedded" in self.targets:
                self.start_sidecar("embedded")
            if "redis" in self.targets:
                self.start_sidecar("redis", redis=True)
                self.redis_pid = self.find_redis_pid()
            self.log("ports " + ", ".join(f"{k}={v}" for k, v in self.ports.items()) + "; pids " +
                     ", ".join(f"{k}={v}" for k, v in self.known_pids().items()))
            for t in self.targets:
                for m in self.modes:
                    self.sanity(t, m)
            self.log("sanity: every target answers 200 in every mode (sidecars: x-preauth-decision ALLOW)")
            if self.warmup > 0:
                for m in self.modes:
                    for t in self.targets:
                        self.wrk(t, m, self.warmup)
                self.log(f"warm-up done ({self.warmup} s per target and mode)")
            for rnd in range(1, self.rounds + 1):
                order = self.targets[(rnd - 1) % len(self.targets):] + self.targets[:(rnd - 1) % len(self.targets)]
                for m in self.modes:
                    for t in order:
                        runs.append(self.measure(t, m, rnd))
            for rnd in range(1, self.fixed_rounds + 1):
                for m in self.fixed_modes:
                    for t in self.targets:
                        fixed.append(self.openloop(t, m))
            prof = self.perf_profile() if self.profile and "embedded" in self.targets else None
            views = {n: self.tenant_view(n) for n in ("embedded", "redis") if n in self.targets}
            metrics = {n: {m: self.metric(n, m) for m in ("preauth_tenants_tracked",)} for n in views}
            for n in ("embedded", "redis", "nginx"):
                self.stop_one(n)
            if self.tenants > 0:
                tenants = self.tenants_run()
        finally:
            self.stop_all()
            if "redis" in self.targets:
                n = self.redis_cleanup()
                self.log(f"deleted {n} Redis keys under {self.redis_prefix}")
        procs1 = all_proc_ticks()

        # ---- report ----
        mine = set(p for p in self.known_pids().values()) | {os.getpid()}
        others = []
        for pid, (comm, t1) in procs1.items():
            if pid in mine:
                continue
            t0 = procs0.get(pid, (comm, 0))[1]
            if t1 - t0 > 0:
                others.append(((t1 - t0) / CLK_TCK, comm, pid))
        others.sort(reverse=True)
        wall = time.time() - t_start
        git = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = len(subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"],
                                   capture_output=True, text=True).stdout.splitlines())
        nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1] \
            if shutil.which("nginx") else "?"
        cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        self.md(f"# preauth-sidecar load benchmark — {stamp}")
        self.md()
        self.md(f"Command: `ROUNDS={self.rounds} DURATION={self.duration} benches/load/run.sh` · commit {git}"
                f"{f' + {dirty} uncommitted file(s) in src/Cargo' if dirty else ''} · sidecar binary built {self.bin_info['sidecar_bin'][1]} "
                f"(sha256 {self.bin_info['sidecar_bin'][0]}) · "
                f"nginx {nginx_v} · {os.cpu_count()} CPUs ({cpu_model}) · kernel {os.uname().release}")
        self.md()
        self.md(f"Setup: SUT (proxy + mock) pinned to CPU {self.sut_cpus}, load generator to CPU {self.lg_cpus}; "
                f"wrk -t1 -c{self.conns}, {self.duration} s per run, {self.rounds} rounds interleaved (target order "
                f"rotated each round), {self.warmup} s warm-up per target, everything started with nice -n {self.nice}. Sidecars: PREAUTH_THREADS=1, RUST_LOG=warn, "
                f"identity JWT HS256, global abuse guard + fair use (per-minute, concurrency, token rate) on with "
                f"caps nothing reaches, budget reservation + settlement + outbox on, hard mode, "
                f"PREAUTH_STORE_TIMEOUT_MS={self.store_timeout} PREAUTH_GATE_TIMEOUT_MS={self.gate_timeout} "
                f"(defaults 20/50 fail closed under saturation queueing). Redis row: "
                f"{self.redis_url} (prefix deleted afterwards). SSE body "
                f"{'carries' if self.include_usage else 'does not carry'} `stream_options.include_usage=true` for every "
                f"target{' (identical upstream traffic)' if self.include_usage else ' (the sidecar splices it in)'}.")
        self.md()
        self.md("Cells: median over rounds (min–max). CPU µs/req = utime+stime delta of the proxy process from "
                "/proc/PID/stat (10 ms ticks) ÷ requests; for *direct* it is the mock's; *user / kernel* splits it (medians). "
                "RSS = VmRSS at the end of the "
                "run. × nginx = per-round ratio to nginx in the same round. *other CPU s* = max over rounds of CPU "
                "used by processes outside the benchmark during the run (noise); non-2xx = 0 in every run.")
        self.md()
        for m in self.modes:
            self.report_mode(m, runs)
        if fixed:
            self.report_fixed(fixed)
        if tenants:
            self.report_tenants(tenants)
        if prof:
            lines, w, per_req = prof
            self.md(f"### perf: sidecar embedded, JSON, {self.duration} s under wrk (top self-cost symbols)")
            self.md()
            self.md("```")
            for l in lines:
                self.md(l.rstrip())
            self.md("```")
            self.md()
            if per_req:
                names = [c for c in self.SYSCALLS + ["context-switches"]
                         if any(v.get(c, 0) >= 0.005 for v in per_req.values())]
                self.md("System calls and context switches per request (perf tracepoints, JSON, under wrk):")
                self.md()
                self.md("| process | " + " | ".join(names) + " | total syscalls |")
                self.md("|---|" + "---|" * (len(names) + 1))
                for t, v in per_req.items():
                    tot = sum(x for k, x in v.items() if k != "context-switches")
                    self.md(f"| {t} | " + " | ".join(f"{v.get(c, 0):.2f}" for c in names) + f" | {tot:.2f} |")
                self.md()
        self.md("### Noise and checks")
        self.md()
        steal = sum(r["steal_s"] for r in runs)
        other = [r["other_cpu_s"] for r in runs]
        noisy = sum(1 for x in other if x > 1.0)
        self.md(f"- Load average at start {' '.join(load0)}; wall time {wall / 60:.1f} min; steal over all runs "
                f"{steal:.2f} s; runs with > 1 s CPU outside the benchmark: {noisy}/{len(runs)}"
                f"{' (max ' + format(max(other), '.2f') + ' s)' if other else ''}.")
        if others:
            self.md("- Busiest processes outside the benchmark over the whole run: " +
                    ", ".join(f"{c} ({p}) {s:.1f} s" for s, c, p in others[:6]) + ".")
        for n, v in views.items():
            self.md(f"- Tenant `{BENCH_TENANT}` on sidecar {n} at the end (admin API): "
                    + ", ".join(f"{k}={v[k]}" for k in ("spent_usd", "reserved_usd", "daily_requests",
                                                         "active_reservations") if k in v)
                    + (f" {v}" if not any(k in v for k in ("spent_usd",)) else ""))
        self.md()
        text = "\n".join(self.out) + "\n"
        os.makedirs(self.results_dir, exist_ok=True)
        path = os.path.join(self.results_dir, f"{stamp}.md")
        with open(path, "w") as f:
            f.write(text)
        print()
        print(text)
        print(f"written to {os.path.relpath(path, REPO)}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--workdir", required=True)
    o = sub.add_parser("openloop")
    o.add_argument("--host", default="127.0.0.1")
    o.add_argument("--port", type=int, required=True)
    o.add_argument("--path", default=CHAT_PATH)
    o.add_argument("--rate", type=float, default=1000)
    o.add_argument("--duration", type=float, default=10)
    o.add_argument("--warmup", type=float, default=1)
    o.add_argument("--connections", type=int, default=16)
    o.add_argument("--token", default="none")
    o.add_argument("--body", default=body_for("json"))
    o.add_argument("--header", action="append", default=[])
    t = sub.add_parser("tenants")
    t.add_argument("--host", default="127.0.0.1")
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--count", type=int, default=100000)
    t.add_argument("--identity", choices=["jwt", "header"], default="jwt")
    t.add_argument("--connections", type=int, default=32)
    j = sub.add_parser("jwt")
    j.add_argument("tenant")
    a = ap.parse_args()
    if a.cmd == "openloop":
        asyncio.run(openloop_main(a))
    elif a.cmd == "tenants":
        asyncio.run(tenants_main(a))
    elif a.cmd == "jwt":
        print(mint_jwt(a.tenant))
    else:
        b = Bench(a)

        def on_signal(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_signal)
        try:
            b.run()
        except Fail as e:
            print(f"\nBENCHMARK FAILED: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)


if __name__ == "__main__":
    main()
