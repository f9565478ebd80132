//! The request path: forwarding, headers, bodies, streaming, errors.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use preauth_sidecar::demo::upstream::FakeUpstream;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn allows_json_and_forwards_with_request_id() {
    let s = start(&[]).await;
    let r = post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await;
    assert_eq!(r.status(), 200);
    let rid = r.headers()["x-preauth-request-id"].to_str().unwrap().to_string();
    assert_eq!(r.headers()["x-preauth-decision"], "ALLOW");
    let v = json_of(r).await;
    assert_eq!(v["object"], "chat.completion");
    let seen = s.upstream.last_request().unwrap();
    assert_eq!(seen.header("x-preauth-request-id"), Some(rid.as_str()), "request id forwarded upstream");
    assert_eq!(seen.header("authorization"), None, "caller JWT never forwarded in jwt mode");
    assert_eq!(seen.header("accept-encoding"), Some("identity"), "plain bytes asked for: usage is read from them");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_api_key_replaces_credentials() {
    let s = start(&[("PREAUTH_UPSTREAM_API_KEY", "sk-gateway-key")]).await;
    let r = client()
        .post(s.url("/v1/messages"))
        .bearer_auth(token("acme", "pro"))
        .header("x-api-key", "caller-key")
        .json(&json!({"model": "claude-3-5-haiku", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = s.upstream.last_request().unwrap();
    assert_eq!(seen.header("authorization"), Some("Bearer sk-gateway-key"));
    assert_eq!(seen.header("x-api-key"), Some("sk-gateway-key"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_arrive_byte_exact() {
    let s = start(&[]).await;
    let filler = "x".repeat(200 * 1024);
    // Key order and spacing a serializer would not reproduce: the upstream must see these bytes.
    let raw = format!(
        "{{ \"messages\" : [{{\"role\":\"user\",\"content\":\"{filler}\"}}],\n \"model\":\"gpt-4o-mini\", \"max_tokens\": 5 }}"
    );
    for chunked in [false, true] {
        let req = client().post(s.url("/v1/chat/completions")).bearer_auth(token("acme", "pro"));
        let req = if chunked {
            let parts: Vec<Result<Vec<u8>, std::io::Error>> =
                raw.as_bytes().chunks(7000).map(|c| Ok(c.to_vec())).collect();
            req.body(reqwest::Body::wrap_stream(futures_util::stream::iter(parts)))
        } else {
            req.body(raw.clone())
        };
        let r = req.header("content-type", "application/json").send().await.unwrap();
        assert_eq!(r.status(), 200, "chunked={chunked}");
        let seen = s.upstream.last_request().unwrap();
        assert_eq!(seen.body.len(), raw.len(), "chunked={chunked}");
        assert!(seen.body == raw.as_bytes(), "body forwarded byte-exact (chunked={chunked})");
    }
    // Small bodies too, including the exact 64 KiB boundary of the buffered path.
    for n in [10usize, 64 * 1024 - 80, 64 * 1024 + 1] {
        let raw = format!(
            "{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
            "y".repeat(n)
        );
        let r = client()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(token("acme", "pro"))
            .header("content-type", "application/json")
            .body(raw.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "n={n}");
        assert!(s.upstream.last_request().unwrap().body == raw.as_bytes(), "n={n}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_denied_body_never_reaches_the_upstream() {
    let s = start(&[("LLM_GLOBAL_ABUSE_KILL_SWITCH", "true")]).await;
    let big = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "z".repeat(150_000)}]});
    let r = post(&s, "/v1/chat/completions", "acme", "pro", &big).await;
    assert_error(r, 429, "llm_fair_use_exceeded").await;
    assert!(s.upstream.requests().is_empty(), "no complete request reached the upstream");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_is_streamed_as_emitted_with_usage_injected() {
    let s = start(&[]).await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let r = post_with(&s, "/v1/chat/completions", "acme", "pro", &body, &[("x-mock-delay-ms", "150")]).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let start = Instant::now();
    let mut stream = r.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        let events = String::from_utf8_lossy(&chunk).matches("data:").count();
        for _ in 0..events {
            arrivals.push(start.elapsed());
        }
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("\"usage\":{"), "include_usage was injected, usage chunk arrived");
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let seen = s.upstream.last_request().unwrap().json().unwrap();
    assert_eq!(seen["stream_options"]["include_usage"], true);
    // Events were emitted 150 ms apart; they must arrive spread out, not batched.
    assert!(arrivals.len() >= 7, "{arrivals:?}");
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(spread >= Duration::from_millis(700), "events arrived batched: {arrivals:?}");
    let gaps_ok = arrivals.windows(2).filter(|w| w[1] - w[0] >= Duration::from_millis(100)).count();
    assert!(gaps_ok >= 5, "per-event spacing preserved: {arrivals:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_downstream_works() {
    let s = start(&[]).await;
    let c = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let r = c
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .json(&chat("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-preauth-decision"], "ALLOW");
    let big = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "q".repeat(100_000)}]});
    let r = c.post(s.url("/v1/chat/completions")).bearer_auth(token("acme", "pro")).json(&big).send().await.unwrap();
    assert_eq!(r.status(), 200, "large body over h2c");
    s.stop().await;
}

/// Also: a body refused before the policy steps (400, 413: CONTRACT §3 step 2) is a decision and
/// has its `decision` event (§7), the refusal's code as its reason and, when the body was read,
/// its fingerprint; an unauthenticated request (no tenant) has none (before, none of them did).
#[tokio::test(flavor = "multi_thread")]
async fn request_errors_have_codes_statuses_and_json() {
    let s = start(&[("PREAUTH_MAX_BODY_BYTES", "300000")]).await;
    let c = client();
    let id = |v: &serde_json::Value| v["error"]["id"].as_str().unwrap().to_string();
    // 401: missing, malformed, wrong key, expired.
    let r = c.post(s.url("/v1/chat/completions")).json(&chat("m")).send().await.unwrap();
    let anonymous = id(&assert_error(r, 401, "unauthenticated").await);
    let r = c.post(s.url("/v1/chat/completions")).bearer_auth("not.a.jwt").json(&chat("m")).send().await.unwrap();
    assert_error(r, 401, "unauthenticated").await;
    let wrong =
        preauth_sidecar::demo::mint_tenant_jwt("another-secret-0123456789abcdef0123", "acme", "pro", 2_000_000_000, 60);
    let r = c.post(s.url("/v1/chat/completions")).bearer_auth(wrong).json(&chat("m")).send().await.unwrap();
    assert_error(r, 401, "unauthenticated").await;
    let expired = preauth_sidecar::demo::mint_tenant_jwt(JWT_SECRET, "acme", "pro", 1_000_000, 60);
    let r = c.post(s.url("/v1/chat/completions")).bearer_auth(expired).json(&chat("m")).send().await.unwrap();
    let v = assert_error(r, 401, "unauthenticated").await;
    assert_eq!(v["error"]["details"]["reason"], "token_expired");
    let d = &v["error"]["details"];
    assert_eq!((&d["decision"], &d["mode"], &d["policy_version"]), (&json!("DENY"), &json!("hard"), &json!(1)), "{v}");
    // 404: not an inspected route (and no token needed to learn that).
    let r = c.get(s.url("/admin/secret")).send().await.unwrap();
    assert_error(r, 404, "route_not_found").await;
    let r = c.get(s.url("/v1/chat/completions")).bearer_auth(token("acme", "pro")).send().await.unwrap();
    assert_error(r, 404, "route_not_found").await;
    // 400: not JSON, missing fields.
    let r = c
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    let not_json = id(&assert_error(r, 400, "invalid_request").await);
    let r = post(&s, "/v1/messages", "acme", "pro", &json!({"model": "claude-3-5-haiku", "messages": []})).await;
    let v = assert_error(r, 400, "invalid_request").await;
    assert!(v["error"]["message"].as_str().unwrap().contains("max_tokens"));
    // 413: declared and streamed (chunked) bodies over the limit.
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "a".repeat(400_000)}]});
    let r = post(&s, "/v1/chat/completions", "acme", "pro", &big).await;
    let declared = id(&assert_error(r, 413, "request_too_large").await);
    let bytes = serde_json::to_vec(&big).unwrap();
    let parts: Vec<Result<Vec<u8>, std::io::Error>> = bytes.chunks(50_000).map(|c| Ok(c.to_vec())).collect();
    let r = c
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(parts)))
        .send()
        .await
        .unwrap();
    let streamed = id(&assert_error(r, 413, "request_too_large").await);
    let events = s.admin_get("/api/v1/enforcement/ledger?event_type=decision&limit=1000").await;
    let events = events["items"].as_array().unwrap();
    let of = |rid: &str| events.iter().filter(|e| e["request_id"] == rid).cloned().collect::<Vec<_>>();
    let fp = preauth_sidecar::proxy::fingerprint("acme", "POST", "/v1/chat/completions", b"{nope");
    for (rid, code, fingerprint) in [
        (&not_json, "invalid_request", json!(fp)),
        (&declared, "request_too_large", json!(null)),
        (&streamed, "request_too_large", json!(null)),
    ] {
        let e = of(rid);
        assert_eq!(e.len(), 1, "one decision event for {code} {rid}: {events:?}");
        let e = &e[0];
        assert_eq!((&e["decision"], &e["reasons"], &e["tenant_id"]), (&json!("DENY"), &json!([code]), &json!("acme")));
        assert_eq!((&e["tenant_tier"], &e["mode"], &e["source"]), (&json!("pro"), &json!("hard"), &json!("default")));
        assert_eq!((&e["reserved_usd"], &e["request_fingerprint"]), (&json!("0.000000"), &fingerprint), "{e}");
    }
    assert!(of(&anonymous).is_empty(), "no tenant, no event");
    // GET /v1/models passes through after identity.
    let r = c.get(s.url("/v1/models")).bearer_auth(token("acme", "pro")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(s.url("/v1/models")).send().await.unwrap();
    assert_error(r, 401, "unauthenticated").await;
    // Only the list and one model: a path behind /v1/models/ that a gateway normalising dot
    // segments or decoding %2F would read as another route is not forwarded (raw: a client
    // library would resolve the dot segments itself).
    let bearer = token("acme", "pro");
    for path in ["/v1/models/gpt-4o-mini", "/v1/models/../../admin/keys", "/v1/models/..%2F..%2Fkey%2Flist"] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
        let head =
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\nConnection: close\r\n\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        let status = String::from_utf8_lossy(&answer[..12]).to_string();
        let want = if path.ends_with("gpt-4o-mini") { "HTTP/1.1 200" } else { "HTTP/1.1 404" };
        assert_eq!(status, want, "{path}");
    }
    assert!(s.upstream.requests().iter().all(|r| !r.path.contains("..")), "nothing odd reached the gateway");
    s.stop().await;
}

/// Request smuggling attempts: a request hidden in a GET /v1/models body, or behind a chunk size
/// the sidecar might read as the last chunk where a proxy in front reads a longer one. Each is
/// refused (400, connection closed) and the hidden request never reaches the gateway.
#[tokio::test(flavor = "multi_thread")]
async fn hidden_requests_are_refused_not_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start(&[]).await;
    let (acme, mallory) = (token("acme", "pro"), token("mallory", "pro"));
    let hidden = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mallory}\r\n\
         Content-Type: application/json\r\nContent-Length: 66\r\n\r\n\
         {{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"x\"}}]}}"
    );
    assert_eq!(hidden.split("\r\n\r\n").nth(1).unwrap().len(), 66);
    let get_with_length = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {acme}\r\nContent-Length: {}\r\n\r\n{hidden}",
        hidden.len()
    );
    let get_chunked = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {acme}\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{hidden}\r\n0\r\n\r\n",
        hidden.len()
    );
    let chunk_junk = |size: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {acme}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{size}\r\n\r\n{hidden}\r\n0\r\n\r\n"
        )
    };
    for attempt in [get_with_length, get_chunked, chunk_junk("0x1ce"), chunk_junk("0 junk"), chunk_junk("0_1")] {
        let mut conn = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
        conn.write_all(attempt.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await.unwrap().unwrap();
        let answer = String::from_utf8_lossy(&answer).to_string();
        assert!(answer.starts_with("HTTP/1.1 400"), "{attempt:?} → {answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "one answer, then the connection closes: {answer}");
    }
    let reached: Vec<_> = s.upstream.requests().iter().map(|r| r.path.clone()).collect();
    assert!(reached.is_empty(), "nothing reached the gateway: {reached:?}");
    assert_eq!(tenant_view(&s, "mallory").await["daily_requests"], 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_errors_pass_through_and_unreachable_is_502() {
    let s = start(&[]).await;
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .header("x-mock-status", "503")
        .json(&chat("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "upstream status passes through unchanged");
    assert!(r.headers().get("x-preauth-error").is_none(), "not a sidecar-made error");
    assert_eq!(json_of(r).await["error"]["code"], "mock_status");
    s.stop().await;

    let dead = format!("http://127.0.0.1:{}", free_port());
    let s = start(&[("PREAUTH_UPSTREAM_URL", &dead)]).await;
    let r = post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await;
    // Admitted, then failed by the gateway: the decision stays ALLOW (as in the ledger), and the
    // answer names the hold it had (released, as the ledger says).
    assert_eq!(r.headers()["x-preauth-decision"], "ALLOW");
    let rid = r.headers()["x-preauth-reservation-id"].to_str().unwrap().to_string();
    assert_error(r, 502, "upstream_unavailable").await;
    let released = format!("/api/v1/enforcement/ledger?reservation_id={rid}&event_type=reservation_released");
    wait_for("the hold named is the one released", || async {
        s.admin_get(&released).await["items"].as_array().map(Vec::len) == Some(1)
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !metrics(&s).await.contains("preauth_upstream_responses_total{status_class=\"error\"} 1") {
        assert!(Instant::now() < deadline, "{}", metrics(&s).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.stop().await;
}

/// Reads one request off a raw upstream socket (its head, then `content-length` bytes of body),
/// taking it off the front of `buf` and keeping what follows; false when the connection closes
/// first.
async fn read_request(sock: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                buf.drain(..end + 4 + len);
                return true;
            }
        }
        let n = sock.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return false;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A bare HTTP/1.1 upstream on a raw socket: counts the connections it accepts and answers one
/// request per connection with a keep-alive-looking JSON answer, then closes the connection —
/// what a gateway does to a keep-alive connection it has just timed out.
struct ClosingUpstream {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ClosingUpstream {
    async fn start() -> ClosingUpstream {
        Self::start_framed(true).await
    }

    /// `with_length: false` answers without `content-length`: the body ends when the connection does.
    async fn start_framed(with_length: bool) -> ClosingUpstream {
        use std::sync::atomic::Ordering;
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if !read_request(&mut sock, &mut Vec::new()).await {
                        return;
                    }
                    let body = r#"{"id":"x","object":"chat.completion","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
                    let resp = if with_length {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: keep-alive\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{body}")
                    };
                    let _ = sock.write_all(resp.as_bytes()).await;
                    // Closed without saying so: the sidecar finds out when it reuses the connection.
                });
            }
        });
        ClosingUpstream { addr, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A sidecar in front of this upstream, with `env` on top.
    async fn sidecar(&self, env: &[(&str, &str)]) -> Sidecar {
        let url = format!("http://{}", self.addr);
        let mut all = vec![("PREAUTH_UPSTREAM_URL", url.as_str())];
        all.extend_from_slice(env);
        start(&all).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pooled_connection_closed_by_the_gateway_is_retried_on_a_new_one() {
    let up = ClosingUpstream::start().await;
    let s = up.sidecar(&[]).await;
    for i in 0..4 {
        let r = post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(json_of(r).await["usage"]["total_tokens"], 5, "request {i}");
        // Let the gateway's close arrive before the connection is taken from the pool again.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.accepted(), 4, "one connection per request: each pooled one was found closed");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_bodies_never_open_an_upstream_connection() {
    let up = ClosingUpstream::start().await;
    let s = up.sidecar(&[("LLM_GLOBAL_ABUSE_KILL_SWITCH", "true")]).await;
    let big = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "z".repeat(150_000)}]});
    let bytes = serde_json::to_vec(&big).unwrap();
    for chunked in [false, true] {
        let req = client().post(s.url("/v1/chat/completions")).bearer_auth(token("acme", "pro"));
        let req = if chunked {
            let parts: Vec<Result<Vec<u8>, std::io::Error>> = bytes.chunks(9000).map(|c| Ok(c.to_vec())).collect();
            req.body(reqwest::Body::wrap_stream(futures_util::stream::iter(parts)))
        } else {
            req.body(bytes.clone())
        };
        let r = req.header("content-type", "application/json").send().await.unwrap();
        assert_error(r, 429, "llm_fair_use_exceeded").await;
    }
    assert_eq!(up.accepted(), 0, "a refused request's headers never reach the gateway either");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn close_delimited_answer_reaches_the_client_whole_and_is_settled() {
    let up = ClosingUpstream::start_framed(false).await;
    let s = up.sidecar(&[]).await;
    for i in 0..2 {
        let r = post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(json_of(r).await["usage"]["total_tokens"], 5, "request {i}: the whole body arrived");
    }
    // Counted when the exchange ends, just after the client has the last byte.
    let counted = "preauth_upstream_responses_total{status_class=\"2xx\"} 2";
    wait_for("both answers counted as 2xx", || async { metrics(&s).await.contains(counted) }).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_is_answered_before_the_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start(&[]).await;
    let body = serde_json::to_vec(&chat("gpt-4o-mini")).unwrap();
    let mut sock = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        token("acme", "pro"),
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    // The interim answer comes before any body byte is sent (a client would otherwise wait ~1 s).
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
            .await
            .expect("100 Continue in time")
            .unwrap();
        assert!(n > 0, "connection closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 100 Continue"), "{}", String::from_utf8_lossy(&got));
    sock.write_all(&body).await.unwrap();
    let mut rest = Vec::new();
    while !String::from_utf8_lossy(&rest).contains("chat.completion") {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "connection closed early");
        rest.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    assert!(s.upstream.last_request().unwrap().header("expect").is_none(), "expect is this hop's business");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_request_head_gets_the_json_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start(&[]).await;
    let mut sock = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    sock.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nbad header line\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut got))
        .await
        .expect("answer, then close")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.to_ascii_lowercase().contains("x-preauth-error: invalid_request"), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON error body");
    assert_eq!(v["error"]["code"], "invalid_request", "{v}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn long_streams_arrive_whole_and_in_order() {
    // Many SSE events at once: the sidecar joins what has arrived into bounded writes; the client
    // must still see every event, in order, and the usage at the end.
    let s = start(&[]).await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let direct = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.upstream.base_url()))
        .header("x-mock-chunks", "5000")
        .json(&json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let r = post_with(&s, "/v1/chat/completions", "acme", "pro", &body, &[("x-mock-chunks", "5000")]).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let events = |t: &str| t.matches("data: ").count();
    assert_eq!(events(&text), events(&direct), "every event arrives");
    assert!(events(&text) > 1000, "a long stream ({} events)", events(&text));
    assert!(text.trim_end().ends_with("data: [DONE]"), "in order, to the end");
    s.stop().await;
}

/// A raw upstream that answers the first request on each connection (keep-alive), then reads
/// the next one and closes without a word: a gateway that took a request and died. Counts the
/// requests it received.
async fn upstream_dying_on_the_second_request() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>)
{
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for answered in 0.. {
                    if !read_request(&mut sock, &mut buf).await {
                        return;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    if answered == 1 {
                        return; // took the request, then went away
                    }
                    let body = r#"{"id":"x","object":"chat.completion","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                }
            });
        }
    });
    (addr, received)
}

/// An LLM call the gateway may have received is never sent to it twice: a POST written on a
/// reused connection that then closes without an answer gets 502 (nothing charged); an
/// idempotent GET in the same spot is retried once on a new connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_post_the_gateway_may_have_received_is_not_sent_again() {
    use std::sync::atomic::Ordering;
    let (addr, received) = upstream_dying_on_the_second_request().await;
    let url = format!("http://{addr}");
    // One worker thread: gateway connections are pooled per thread, and the second request must
    // find the first one's connection (on another thread it opens a fresh one, which answers).
    // Through the binary: in-process servers keep to more threads (`server::work_stealing`).
    let unused = FakeUpstream::start("127.0.0.1:0").await.unwrap();
    let b = Binary::start(&unused, &temp_dir(), &[("PREAUTH_UPSTREAM_URL", url.as_str()), ("PREAUTH_THREADS", "1")]);
    let r = b.call("acme", &chat("gpt-4o-mini"), &[]).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let r = b.call("acme", &chat("gpt-4o-mini"), &[]).await;
    assert_error(r, 502, "upstream_unavailable").await;
    assert_eq!(received.load(Ordering::SeqCst), 2, "the second POST reached the gateway once, not twice");

    // GET /v1/models: one answered request opens a connection, the next dies on it and is
    // retried on a new one, which answers.
    let models = || client().get(b.url("/v1/models")).bearer_auth(token("acme", "pro")).send();
    assert_eq!(models().await.unwrap().status(), 200);
    let before = received.load(Ordering::SeqCst);
    assert_eq!(models().await.unwrap().status(), 200, "an idempotent request is retried");
    assert_eq!(received.load(Ordering::SeqCst), before + 2);
}

/// Headers the gateway's `Connection` header names are hop-by-hop: not passed to the client.
#[tokio::test(flavor = "multi_thread")]
async fn headers_named_by_the_gateways_connection_header_are_not_forwarded() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                if !read_request(&mut sock, &mut Vec::new()).await {
                    return;
                }
                let body = r#"{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nConnection: X-Secret, keep-alive\r\nx-secret: s\r\nx-kept: k\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    let url = format!("http://{addr}");
    let s = start(&[("PREAUTH_UPSTREAM_URL", url.as_str())]).await;
    let r = post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get("x-kept").map(|v| v.to_str().unwrap()), Some("k"));
    assert!(r.headers().get("x-secret").is_none(), "{:?}", r.headers());
    s.stop().await;
}

/// Header identity: a request naming its tenant twice (a front proxy that appends its own
/// `x-tenant-id` instead of replacing the client's) is refused, not charged to the first one;
/// a single one identifies the caller.
#[tokio::test(flavor = "multi_thread")]
async fn header_identity_refuses_a_repeated_tenant_header() {
    let s = start(&[("PREAUTH_IDENTITY", "header")]).await;
    let send = |tenants: &'static [&'static str]| {
        let mut r = client().post(s.url("/v1/chat/completions")).json(&chat("gpt-4o-mini"));
        for t in tenants {
            r = r.header("x-tenant-id", *t);
        }
        r.send()
    };
    let r = send(&["victim"]).await.unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let v = assert_error(send(&["big", "victim"]).await.unwrap(), 401, "unauthenticated").await;
    assert_eq!(v["error"]["details"]["reason"], "duplicate_identity_header", "{v}");
    let h2c = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let r = h2c
        .post(s.url("/v1/chat/completions"))
        .header("x-tenant-id", "big")
        .header("x-tenant-id", "victim")
        .json(&chat("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "unauthenticated").await;
    assert_eq!(s.upstream.requests().len(), 1, "only the unambiguous request reached the gateway");
    s.stop().await;
}
