//! The sidecar's own HTTP/1 driver on the wire, with raw sockets: pipelining, HTTP/1.0 clients,
//! chunked uploads, conflicting framing, absolute-form targets, oversized heads.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

fn chat_body(stream: bool) -> Vec<u8> {
    let mut v = chat("gpt-4o-mini");
    if stream {
        v["stream"] = true.into();
    }
    serde_json::to_vec(&v).unwrap()
}

fn request(target: &str, version: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let head = format!(
        "POST {target} HTTP/{version}\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n",
        token("acme", "pro"),
        body.len()
    );
    [head.as_bytes(), body].concat()
}

/// Everything the sidecar sends until it closes the connection.
async fn read_to_close(sock: &mut TcpStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut got))
        .await
        .expect("the sidecar closes the connection")
        .unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

/// One answer read off a kept-alive connection: (head, body) by its `content-length`.
async fn read_answer(sock: &mut TcpStream, pending: &mut Vec<u8>) -> (String, String) {
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .expect("a content-length answer");
            if pending.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&pending[end + 4..end + 4 + len]).into_owned();
                pending.drain(..end + 4 + len);
                return (head, body);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf)).await.expect("answer").unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(pending));
        pending.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let s = start(&[]).await;
    let mut sock = TcpStream::connect(s.proxy).await.unwrap();
    let body = chat_body(false);
    // Three requests in one write; the second asks for something else so that order shows.
    let models =
        format!("GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\r\n", token("acme", "pro"));
    let all = [
        request("/v1/chat/completions", "1.1", "", &body),
        models.into_bytes(),
        request("/v1/chat/completions", "1.1", "", &body),
    ]
    .concat();
    sock.write_all(&all).await.unwrap();
    let mut pending = Vec::new();
    let (h1, b1) = read_answer(&mut sock, &mut pending).await;
    let (h2, b2) = read_answer(&mut sock, &mut pending).await;
    let (h3, b3) = read_answer(&mut sock, &mut pending).await;
    for h in [&h1, &h2, &h3] {
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    }
    assert!(b1.contains("chat.completion") && b3.contains("chat.completion"), "{b1} / {b3}");
    assert!(b2.contains("\"object\":\"list\""), "the models answer second: {b2}");
    assert_eq!(s.upstream.requests().len(), 3);
    s.stop().await;
}

/// A request refused before its body was read (401, 404) whose body had already arrived whole
/// keeps the connection: the requests pipelined after it are answered, as nginx does.
#[tokio::test(flavor = "multi_thread")]
async fn requests_pipelined_after_an_early_refusal_are_answered() {
    let s = start(&[]).await;
    let body = chat_body(false);
    let anonymous = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    for refused in [[anonymous.as_bytes(), &body].concat(), request("/v1/nope", "1.1", "", &body)] {
        let mut sock = TcpStream::connect(s.proxy).await.unwrap();
        let all = [
            request("/v1/chat/completions", "1.1", "", &body),
            refused,
            request("/v1/chat/completions", "1.1", "", &body),
        ]
        .concat();
        sock.write_all(&all).await.unwrap();
        let mut pending = Vec::new();
        let mut got = Vec::new();
        for _ in 0..3 {
            let (head, _) = read_answer(&mut sock, &mut pending).await;
            got.push(head.lines().next().unwrap().to_string());
        }
        assert!(got[0].starts_with("HTTP/1.1 200") && got[2].starts_with("HTTP/1.1 200"), "{got:?}");
        assert!(got[1].starts_with("HTTP/1.1 401") || got[1].starts_with("HTTP/1.1 404"), "{got:?}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http10_client_gets_a_streamed_answer_unchunked_then_the_close() {
    let s = start(&[]).await;
    let mut sock = TcpStream::connect(s.proxy).await.unwrap();
    sock.write_all(&request("/v1/chat/completions", "1.0", "", &chat_body(true))).await.unwrap();
    let text = read_to_close(&mut sock).await;
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("transfer-encoding"), "no chunked coding for HTTP/1.0: {head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(body.starts_with("data: {"), "data only, no chunk sizes: {body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    // A kept-alive HTTP/1.0 connection (it asked) is told so and stays open for the next request.
    let mut sock = TcpStream::connect(s.proxy).await.unwrap();
    let body = chat_body(false);
    sock.write_all(&request("/v1/chat/completions", "1.0", "connection: keep-alive\r\n", &body)).await.unwrap();
    let mut pending = Vec::new();
    let (head, _) = read_answer(&mut sock, &mut pending).await;
    assert!(head.to_ascii_lowercase().contains("connection: keep-alive"), "{head}");
    sock.write_all(&request("/v1/chat/completions", "1.0", "", &body)).await.unwrap();
    let text = read_to_close(&mut sock).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_upload_is_decided_and_forwarded_with_its_length() {
    let s = start(&[]).await;
    let body = chat_body(false);
    let (a, b) = body.split_at(body.len() / 2);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        token("acme", "pro")
    );
    let chunked = [
        head.as_bytes(),
        format!("{:x};ext=1\r\n", a.len()).as_bytes(),
        a,
        b"\r\n",
        format!("{:x}\r\n", b.len()).as_bytes(),
        b,
        b"\r\n0\r\nx-trailer: 1\r\n\r\n",
    ]
    .concat();
    let mut sock = TcpStream::connect(s.proxy).await.unwrap();
    // In small pieces, as a slow client would send it.
    for piece in chunked.chunks(7) {
        sock.write_all(piece).await.unwrap();
    }
    let text = read_to_close(&mut sock).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let seen = s.upstream.last_request().unwrap();
    assert_eq!(&seen.body[..], &body[..], "byte-exact");
    assert_eq!(seen.header("content-length"), Some(body.len().to_string().as_str()));
    assert_eq!(seen.header("transfer-encoding"), None);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_framing_bytes_count_against_the_body_limit() {
    let s = start(&[("PREAUTH_MAX_BODY_BYTES", "1024")]).await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\n\r\n",
        token("acme", "pro")
    );
    // 40 bytes of data in 160 KB of chunk extensions: buffered whole, such a body would let a
    // client hold thousands of times the body limit in memory.
    let chunk = format!("1;{}\r\na\r\n", "e".repeat(4000));
    let wire = [head.as_bytes(), chunk.repeat(40).as_bytes(), b"0\r\n\r\n"].concat();
    let mut sock = TcpStream::connect(s.proxy).await.unwrap();
    // The sidecar may answer and close before it has read all of it.
    let _ = sock.write_all(&wire).await;
    let text = read_to_close(&mut sock).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("\"code\":\"request_too_large\""), "{text}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_to_head_has_no_body_and_the_connection_stays_in_step() {
    let s = start(&[]).await;
    let mut sock = TcpStream::connect(s.proxy).await.unwrap();
    let wire = format!(
        "HEAD /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
        token("acme", "pro")
    );
    sock.write_all(wire.as_bytes()).await.unwrap();
    let text = read_to_close(&mut sock).await;
    let (first, rest) = text.split_once("\r\n\r\n").unwrap();
    assert!(first.starts_with("HTTP/1.1 404"), "{text}");
    assert!(first.to_ascii_lowercase().contains("content-length:"), "the length a GET would get: {first}");
    assert!(rest.starts_with("HTTP/1.1 200"), "nothing between the HEAD answer and the next: {text}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicting_framing_is_served_by_the_chunked_coding_then_closed() {
    let s = start(&[]).await;
    let body = chat_body(false);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
        token("acme", "pro")
    );
    let wire = [head.as_bytes(), format!("{:x}\r\n", body.len()).as_bytes(), &body, b"\r\n0\r\n\r\n"].concat();
    let mut sock = TcpStream::connect(s.proxy).await.unwrap();
    sock.write_all(&wire).await.unwrap();
    // The connection closes after the answer although the client did not ask: it is not trusted
    // with a second request.
    let text = read_to_close(&mut sock).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
    assert_eq!(&s.upstream.last_request().unwrap().body[..], &body[..]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn absolute_form_targets_and_oversized_heads() {
    let s = start(&[]).await;
    let body = chat_body(false);
    let target = format!("http://{}/v1/chat/completions?trace=1", s.proxy);
    let mut sock = TcpStream::connect(s.proxy).await.unwrap();
    sock.write_all(&request(&target, "1.1", "connection: close\r\n", &body)).await.unwrap();
    let text = read_to_close(&mut sock).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(s.upstream.last_request().unwrap().path, "/v1/chat/completions?trace=1", "forwarded in origin form");

    let mut sock = TcpStream::connect(s.proxy).await.unwrap();
    let huge = format!("GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(70 * 1024));
    // The sidecar may answer and close before it has read all of it.
    let _ = sock.write_all(huge.as_bytes()).await;
    let text = read_to_close(&mut sock).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("\"code\":\"invalid_request\""), "{text}");
    s.stop().await;
}

/// Fields the client's `Connection` header names are this hop's only (RFC 9110 §7.6.1): not
/// forwarded (a client could otherwise smuggle a header the gateway trusts past a front proxy
/// that strips it by name); the others are.
#[tokio::test(flavor = "multi_thread")]
async fn fields_named_by_connection_are_not_forwarded() {
    let s = start(&[]).await;
    let mut sock = TcpStream::connect(s.proxy).await.unwrap();
    let extra = "connection: close, x-drop-me\r\nx-drop-me: 1\r\nx-keep-me: 2\r\n";
    sock.write_all(&request("/v1/chat/completions", "1.1", extra, &chat_body(false))).await.unwrap();
    let answer = read_to_close(&mut sock).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = s.upstream.last_request().expect("forwarded");
    let has = |n: &str| seen.headers.iter().any(|(k, _)| k == n);
    assert!(!has("x-drop-me") && has("x-keep-me"), "{:?}", seen.headers);
    s.stop().await;
}

/// A request refused before its body is read (413 declared too large, 401, 404) is answered and
/// the connection closed *lingering*: what the client still sends is read and dropped, so a
/// client that writes its whole body before reading (Node's fetch, no `Expect: 100-continue`)
/// gets the answer instead of a reset (EPIPE / ECONNRESET, then SDK retries re-uploading it).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_still_sending_a_refused_body_gets_the_answer() {
    let s = start(&[("PREAUTH_MAX_BODY_BYTES", "1048576")]).await;
    let big = vec![b'a'; 4 << 20];
    let small = vec![b'a'; 900 << 10];
    let unauthenticated = |body: &[u8]| {
        let head = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", body.len());
        [head.as_bytes(), body].concat()
    };
    let not_found = |body: &[u8]| {
        let head = format!(
            "POST /v1/files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: {}\r\n\r\n",
            token("acme", "pro"),
            body.len()
        );
        [head.as_bytes(), body].concat()
    };
    for (what, bytes, want) in [
        ("too large", request("/v1/chat/completions", "1.1", "", &big), "413"),
        ("unauthenticated", unauthenticated(&small), "401"),
        ("no such route", not_found(&small), "404"),
    ] {
        let mut sock = TcpStream::connect(s.proxy).await.unwrap();
        // The whole request first, as such clients do; only then the answer.
        sock.write_all(&bytes).await.unwrap_or_else(|e| panic!("{what}: the upload was cut: {e}"));
        let got = read_to_close(&mut sock).await;
        assert!(got.starts_with(&format!("HTTP/1.1 {want} ")), "{what}: {got}");
        assert!(got.contains("\"error\""), "{what}: the error JSON: {got}");
    }
    s.stop().await;
}

/// h2c: the connection preface may arrive in pieces (it is read whole before pingora's h2
/// handshake, which has no deadline of its own); the server's SETTINGS follow.
#[tokio::test(flavor = "multi_thread")]
async fn an_h2c_preface_in_pieces_is_served() {
    let s = start(&[]).await;
    let mut sock = TcpStream::connect(s.proxy).await.unwrap();
    sock.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The rest of the preface, then an empty SETTINGS frame (length 0, type 4, no flags, stream 0).
    sock.write_all(b"\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), sock.read_exact(&mut frame)).await.expect("an answer").unwrap();
    assert_eq!(frame[3], 4, "the server's SETTINGS frame: {frame:?}");
    s.stop().await;
}

/// h2c request heads are limited as HTTP/1 heads are (64 KiB), not by h2's default 16 MiB:
/// a larger one never reaches the gateway.
#[tokio::test(flavor = "multi_thread")]
async fn an_h2c_head_over_64_kib_is_refused() {
    let s = start(&[]).await;
    let h2c = reqwest::Client::builder().http2_prior_knowledge().timeout(Duration::from_secs(10)).build().unwrap();
    let send = |extra: usize| {
        h2c.post(s.url("/v1/chat/completions"))
            .bearer_auth(token("acme", "pro"))
            .header("x-pad", "p".repeat(extra))
            .json(&chat("gpt-4o-mini"))
            .send()
    };
    assert_eq!(send(1000).await.unwrap().status(), 200);
    // Refused by the h2 layer itself (431): no decision made, nothing forwarded. Before, the
    // sidecar decided ALLOW and wrote the head to the gateway (whose own 431 came back).
    let r = send(100 * 1024).await.unwrap();
    assert_eq!(r.status(), 431);
    assert!(r.headers().get("x-preauth-decision").is_none(), "never decided: {:?}", r.headers());
    s.stop().await;
}
