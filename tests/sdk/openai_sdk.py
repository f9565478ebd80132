"""The official OpenAI Python SDK against the real sidecar binary (tests/sdk/run.sh starts it).

Black-box: the SDK's own request building, streaming parser, error classes and retry hints meet
what the sidecar answers. The binary runs `demo` (its built-in fake OpenAI-compatible upstream,
embedded state in a temporary directory) on ephemeral 127.0.0.1 ports.

Usage: python3 openai_sdk.py /path/to/preauth-sidecar
Exit status 0 when every check passed; each check prints one PASS/FAIL line.
"""

import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai
try:  # the HTTP client the SDK is built on: httpx2 from openai 3, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx
from openai import AsyncOpenAI, OpenAI

SECRET = "sdk-test-jwt-secret-0123456789abcdef0123456789"
APPROVAL_SECRET = "sdk-test-approval-secret-0123456789abcdef01"
ADMIN_KEY = "sdk-test-admin-key"
CHAT = [{"role": "user", "content": "hello"}]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=")


def tenant_jwt(tenant, tier):
    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"sub": f"user-of-{tenant}", "aud": "authenticated", "tenant_id": tenant, "tier": tier,
              "iat": now, "exp": now + 3600}
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(SECRET.encode(), head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


class Sidecar:
    def __init__(self, binary):
        self.data = tempfile.mkdtemp(prefix="preauth-sdk-")
        self.log = open(os.path.join(self.data, "sidecar.log"), "w")
        for _ in range(5):
            self.port, self.admin = free_port(), free_port()
            env = dict(os.environ)
            env.update({
                "PREAUTH_LISTEN_ADDR": f"127.0.0.1:{self.port}",
                "PREAUTH_ADMIN_ADDR": f"127.0.0.1:{self.admin}",
                "PREAUTH_DATA_DIR": os.path.join(self.data, "state"),
                "SUPABASE_JWT_SECRET": SECRET,
                "ENFORCEMENT_APPROVAL_TOKEN_SECRET": APPROVAL_SECRET,
                "ADMIN_API_KEY": ADMIN_KEY,
                "LLM_FAIR_USE_GUARDS_ENABLED": "true",
                "LLM_FAIR_USE_PER_MINUTE_CAP": "5",
                "PREAUTH_REQUIRE_APPROVAL_ABOVE_USD": "0.10",
                "LLM_FAIR_USE_ENTERPRISE_DAILY_SOFT_CAP": "1",
                "RUST_LOG": "warn",
            })
            self.proc = subprocess.Popen([binary, "demo"], env=env, stdout=self.log, stderr=subprocess.STDOUT)
            if self.wait_ready():
                return
            self.proc.kill()
            self.proc.wait()
        raise SystemExit("the sidecar did not become ready; log: " + os.path.join(self.data, "sidecar.log"))

    def wait_ready(self):
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return False  # e.g. a port taken meanwhile: try fresh ones
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return True
            except OSError:
                time.sleep(0.1)
        return False

    def client(self, tenant, tier="pro", cls=OpenAI):
        # max_retries=0: every answer is seen as the sidecar gave it.
        return cls(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=tenant_jwt(tenant, tier), max_retries=0)

    def retrying_client(self, tenant, tier="pro"):
        """A client with the SDK's default retries (2), and the list of HTTP requests it sent."""
        sent = []
        http = httpx.Client(event_hooks={"request": [lambda req: sent.append(req.url.path)]})
        return OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=tenant_jwt(tenant, tier),
                      http_client=http), sent

    def approve(self, approval_id):
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin}/api/v1/enforcement/approvals/{approval_id}/approve",
            data=b"{}", method="POST",
            headers={"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


FAILED = []


def check(name, cond, detail=""):
    print(f"{'PASS' if cond else 'FAIL'} {name}" + (f" — {detail}" if detail else ""), flush=True)
    if not cond:
        FAILED.append(name)


def expect_error(name, cls, call, status, code):
    try:
        call()
    except cls as e:
        check(name, e.status_code == status and e.code == code and e.request_id is not None,
              f"{e.status_code} {e.code} request_id={e.request_id}")
        return e
    except openai.APIStatusError as e:
        check(name, False, f"raised {type(e).__name__} {e.status_code} {e.code}")
        return e
    check(name, False, "no error raised")
    return None


def run(s):
    acme = s.client("acme")
    raw = acme.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT, max_tokens=20)
    comp = raw.parse()
    check("chat completion", comp.choices[0].message.content and comp.usage.total_tokens > 0
          and raw.headers.get("x-preauth-decision") == "ALLOW" and raw.headers.get("x-preauth-reservation-id"),
          f"decision={raw.headers.get('x-preauth-decision')}")

    chunks = list(acme.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True))
    usage = [c.usage for c in chunks if c.usage]
    check("streamed chat completion reports usage (include_usage injected)",
          len(chunks) > 1 and len(usage) == 1 and usage[0].completion_tokens > 0, f"{len(chunks)} chunks")

    resp = acme.responses.create(model="gpt-4o-mini", input="hello", max_output_tokens=30)
    check("responses", resp.usage is not None and resp.usage.output_tokens > 0)

    emb = acme.embeddings.create(model="text-embedding-3-small", input="hello")
    check("embeddings", len(emb.data) == 1 and emb.usage.prompt_tokens > 0)

    # Errors reach the SDK as its own classes, with the sidecar's code and request id.
    anon = OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="not-a-jwt", max_retries=0)
    expect_error("401 → AuthenticationError", openai.AuthenticationError,
                 lambda: anon.chat.completions.create(model="gpt-4o-mini", messages=CHAT), 401, "unauthenticated")
    globex = s.client("globex")
    expect_error("400 → BadRequestError", openai.BadRequestError,
                 lambda: globex.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens="lots"),
                 400, "invalid_request")

    # Above the approval threshold: 403 with an approval id; the operator approves; the retry
    # with the token goes through once, and a replay is refused.
    big = {"model": "gpt-4o", "messages": CHAT, "max_tokens": 60000}
    e = expect_error("403 approval_required → PermissionDeniedError", openai.PermissionDeniedError,
                     lambda: globex.chat.completions.create(**big), 403, "approval_required")
    details = (e.body or {}).get("details", {}) if e is not None and isinstance(e.body, dict) else {}
    check("approval_required details", details.get("approval_id") and len(details.get("request_fingerprint", "")) == 64,
          json.dumps(details)[:200])
    if details.get("approval_id"):
        token = s.approve(details["approval_id"])["approval_token"]
        ok = globex.chat.completions.with_raw_response.create(**big, extra_headers={"x-approval-token": token})
        check("approved retry with x-approval-token", ok.status_code == 200
              and ok.headers.get("x-preauth-decision") == "ALLOW")
        expect_error("replayed approval token → 409", openai.ConflictError,
                     lambda: globex.chat.completions.create(**big, extra_headers={"x-approval-token": token}),
                     409, "approval_token_replayed")
        # With the SDK's default retries, `x-should-retry: false` keeps it from sending the
        # replay again (the SDK retries 409 on its own rule otherwise).
        retrying, sent = s.retrying_client("globex")
        expect_error("replay with SDK default retries → 409 at once", openai.ConflictError,
                     lambda: retrying.chat.completions.create(**big, extra_headers={"x-approval-token": token}),
                     409, "approval_token_replayed")
        check("the SDK did not retry the 409", len(sent) == 1, f"{len(sent)} request(s) sent")

    # Per-minute cap 5: the SDK sees a RateLimitError with Retry-After and the retry hint.
    initech = s.client("initech")
    limited = None
    for _ in range(6):
        try:
            initech.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=5)
        except openai.RateLimitError as err:
            limited = err
            break
    check("6th call in a minute → RateLimitError", limited is not None and limited.code == "llm_fair_use_exceeded"
          and limited.response.headers.get("retry-after") is not None,
          f"retry-after={limited.response.headers.get('retry-after') if limited else None}")

    # Enterprise soft daily cap 1: the second call is a 429 whose Retry-After runs to UTC
    # midnight; past 60 s it says `x-should-retry: false`, so the SDK's default retries do not
    # sleep through it.
    hooli, sent = s.retrying_client("hooli", "enterprise")
    hooli.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=5)
    sent.clear()
    try:
        hooli.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=5)
        check("soft daily cap → 429 without SDK retries", False, "no error raised")
    except openai.RateLimitError as err:
        retry_after = int(err.response.headers.get("retry-after", "0"))
        hint = err.response.headers.get("x-should-retry")
        if retry_after > 60:
            check("soft daily cap → 429 without SDK retries", hint == "false" and len(sent) == 1,
                  f"retry-after={retry_after} x-should-retry={hint} {len(sent)} request(s) sent")
        else:
            print(f"SKIP soft daily cap retry hint — within {retry_after} s of UTC midnight")

    # Free tier: one request a day, then 402.
    tiny = s.client("tiny-co", "free")
    tiny.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=5)
    expect_error("free tier daily quota → 402", openai.APIStatusError,
                 lambda: tiny.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=5),
                 402, "budget_exceeded")

    # The async client streams through too.
    import asyncio

    async def stream_async():
        a = s.client("umbrella", "enterprise", cls=AsyncOpenAI)
        stream = await a.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True})
        n = [c async for c in stream]
        await a.close()
        return n

    got = asyncio.run(stream_async())
    check("async streamed chat completion", len(got) > 1 and got[-1].usage is not None)


def main():
    s = Sidecar(sys.argv[1])
    try:
        run(s)
    finally:
        s.stop()
    if FAILED:
        print(f"{len(FAILED)} SDK check(s) failed; sidecar log kept in {s.data}", file=sys.stderr)
        sys.exit(1)
    shutil.rmtree(s.data, ignore_errors=True)
    print("openai sdk: all checks passed")


if __name__ == "__main__":
    main()
