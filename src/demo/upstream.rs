//! Built-in fake OpenAI-/Anthropic-compatible LLM gateway ("mock upstream").
//!
//! Used as the upstream behind the sidecar by `preauth-sidecar demo`, as the mock
//! gateway of the integration tests and by the load benchmark. It is a tiny
//! HTTP/1.1 server written directly on tokio (no hyper), cheap per request.
//!
//! # HTTP handling
//!
//! * HTTP/1.1 with keep-alive; `connection: close` (and HTTP/1.0 without
//!   `connection: keep-alive`) is honoured. Pipelined requests are tolerated
//!   (handled one after another), not required.
//! * Request bodies framed by `content-length` or `transfer-encoding: chunked`
//!   (chunks decoded, extensions and trailers ignored); the recorded body is
//!   byte-exact. `expect: 100-continue` is answered with `100 Continue`.
//! * Header names are matched case-insensitively (recorded lower-cased).
//! * Limits: request head 64 KiB (`431`), body 64 MiB (`413`); malformed
//!   requests get `400`. These error responses close the connection.
//!
//! # Routes
//!
//! | method | path                   | response                                          |
//! |--------|------------------------|---------------------------------------------------|
//! | POST   | `/v1/chat/completions` | `chat.completion` / `chat.completion.chunk` SSE    |
//! | POST   | `/v1/completions`      | `text_completion` (JSON or SSE)                    |
//! | POST   | `/v1/responses`        | Responses API `response` object / typed SSE events |
//! | POST   | `/v1/embeddings`       | `list` of `embedding` (floats, or base64 if asked) |
//! | POST   | `/v1/messages`         | Anthropic `message` / Anthropic SSE events         |
//! | GET    | `/v1/models[/{id}]`    | small model list / one model                       |
//! | GET    | `/healthz`, `/health`  | `200 ok` (text)                                    |
//!
//! Anything else: `404` (unknown path) or `405` (known path, wrong method) with
//! an OpenAI-style error JSON. The query string is ignored for routing (but
//! recorded as part of [`RecordedRequest::path`]). A body that is not valid
//! JSON is treated as `{}` (the mock is lenient). `model` is echoed from the
//! request (default `mock-model`).
//!
//! The generated text is deterministic: `N` pieces (`x-mock-chunks`, default 5)
//! taken cyclically from `"Hello", " from", " the", " mock", " upstream", "!", ...`;
//! a non-streaming response contains the concatenation of the same `N` pieces.
//!
//! # Usage accounting
//!
//! * prompt tokens = `x-mock-prompt-tokens`, else `max(1, body_len / 4)`;
//! * completion tokens = `x-mock-completion-tokens`, else
//!   `min(max_completion_tokens | max_tokens | max_output_tokens, 16)` (first
//!   present, in that order), else 16 (embeddings: 0);
//! * `x-mock-cached-tokens` (default 0) → OpenAI
//!   `prompt_tokens_details.cached_tokens`, Responses
//!   `input_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens`;
//! * `x-mock-reasoning-tokens` (default 0) → OpenAI
//!   `completion_tokens_details.reasoning_tokens`, Responses
//!   `output_tokens_details.reasoning_tokens` (a subset of completion tokens,
//!   as in the real APIs).
//! * Anthropic follows Anthropic semantics: `input_tokens` excludes cache reads,
//!   i.e. `input_tokens = prompt - cached` (saturating) and
//!   `cache_read_input_tokens = cached`, so that the *total* prompt is the same
//!   number on every provider.
//!
//! # Streaming (`"stream": true` in the JSON body)
//!
//! `200`, `content-type: text/event-stream`, `cache-control: no-cache`,
//! `transfer-encoding: chunked`; every SSE event is one HTTP chunk written with
//! its own write (`TCP_NODELAY` is set). The last event and the chunked
//! terminator share the final write.
//!
//! * chat: `N` content chunks (the first also carries `role: assistant`), a
//!   chunk with `finish_reason: "stop"`, then — only if
//!   `stream_options.include_usage == true` — a chunk with `choices: []` and
//!   `usage` (all other chunks then carry `"usage": null`), then `data: [DONE]`.
//! * completions: same with `text`.
//! * responses: `response.created`, `response.in_progress`,
//!   `response.output_item.added`, `response.content_part.added`, `N` ×
//!   `response.output_text.delta`, `response.output_text.done`,
//!   `response.content_part.done`, `response.output_item.done`,
//!   `response.completed` (full response incl. `usage`); each with `event:`.
//! * messages (Anthropic): `message_start` (`usage.input_tokens`),
//!   `content_block_start`, `N` × `content_block_delta`, `content_block_stop`,
//!   `message_delta` (`usage.output_tokens`), `message_stop`; each with `event:`.
//!
//! # Control headers
//!
//! * `x-mock-delay-ms: D` — sleep `D` ms before *each* SSE event (headers are
//!   sent immediately), or before a JSON / error response.
//! * `x-mock-status: S` (400..=599) — after the delay, respond `S` with
//!   `{"error":{"message":"mock upstream error","type":"mock_error","code":"mock_status"}}`.
//! * `x-mock-cut-after: N` — streaming only: after `N` content events
//!   (`min(N, chunks)`), close the connection (FIN) without finish/usage
//!   events, `[DONE]` or the chunked terminator.
//! * `x-mock-chunks: N` — number of content events / text pieces (default 5,
//!   max 10000).
//! * `x-mock-prompt-tokens`, `x-mock-completion-tokens`, `x-mock-cached-tokens`,
//!   `x-mock-reasoning-tokens` — see above.
//!
//! Every response to a parsed request carries `x-mock-saw-request-id` (the
//! received `x-preauth-request-id`, only if present) and
//! `x-mock-saw-authorization` (the received `authorization` value, or `none`).
//!
//! # Observability
//!
//! Each request is recorded (method, target, headers, body) as soon as its body
//! has been read, *before* any response byte or delay
//! ([`FakeUpstream::requests`]; disable with [`FakeUpstream::set_recording`] for
//! load tests). [`FakeUpstream::client_disconnects`] counts responses abandoned
//! by the client: a write error while streaming, or EOF/reset seen while the
//! mock was pausing (`x-mock-delay-ms`) inside a response.
//!
//! Dropping the [`FakeUpstream`] handle shuts the server down (same as
//! [`FakeUpstream::shutdown`]): keep it alive for as long as it must serve.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Bodies up to this size are copied out of the connection buffer (exact-size
/// allocation); bigger ones are split off without copying.
const COPY_BODY_MAX: usize = 64 * 1024;
const READ_CHUNK: usize = 8 * 1024;
const DEFAULT_CHUNKS: u64 = 5;
const MAX_CHUNKS: u64 = 10_000;
const DEFAULT_COMPLETION_TOKENS: u64 = 16;
const DEFAULT_MODEL: &str = "mock-model";
const WORDS: [&str; 12] =
    ["Hello", " from", " the", " mock", " upstream", "!", " This", " is", " a", " deterministic", " reply", "."];
const MODELS: [&str; 5] = ["mock-model", "gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "claude-3-5-sonnet-latest"];

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One request as received by the fake upstream.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Request method as sent (e.g. `POST`).
    pub method: String,
    /// The request target as sent (path plus query string, if any).
    pub path: String,
    /// Header names lower-cased, values as received (trimmed), in order.
    pub headers: Vec<(String, String)>,
    /// Decoded body (chunked framing removed), byte-exact.
    pub body: Bytes,
}

impl RecordedRequest {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    recording: AtomicBool,
    total_requests: AtomicU64,
    disconnects: AtomicU64,
    open_connections: AtomicU64,
    shutdown: watch::Sender<bool>,
}

/// Handle to a running fake upstream. Dropping it shuts the server down.
#[must_use = "dropping the FakeUpstream handle shuts the server down"]
pub struct FakeUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl std::fmt::Debug for FakeUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeUpstream").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl FakeUpstream {
    /// Binds `addr` (e.g. `"127.0.0.1:0"`) and serves on the current tokio
    /// runtime (`tokio::spawn`). Must be called from within a runtime.
    pub async fn start(addr: &str) -> io::Result<FakeUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            recording: AtomicBool::new(true),
            total_requests: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
            shutdown,
        });
        tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FakeUpstream { shared, addr })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>` — handy as an upstream base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received (completed requests only), in order of arrival.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().clone()
    }

    /// The most recent recorded request, if any.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.requests.lock().last().cloned()
    }

    /// Forget all recorded requests.
    pub fn clear(&self) {
        self.shared.requests.lock().clear();
    }

    /// Enable/disable recording of requests (on by default). Turn it off for
    /// load tests so memory does not grow with every request.
    pub fn set_recording(&self, on: bool) {
        self.shared.recording.store(on, Ordering::Relaxed);
    }

    /// Number of complete requests received, counted even when recording is off.
    pub fn request_count(&self) -> u64 {
        self.shared.total_requests.load(Ordering::Relaxed)
    }

    /// Number of responses abandoned by the client (see module docs).
    pub fn client_disconnects(&self) -> u64 {
        self.shared.disconnects.load(Ordering::Relaxed)
    }

    /// Number of client connections currently open.
    pub fn open_connections(&self) -> u64 {
        self.shared.open_connections.load(Ordering::Relaxed)
    }

    /// Stop accepting and close every connection (also done on drop).
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a [`FakeUpstream`] on its own std thread with a 1-worker tokio
/// runtime (works from a non-async `main`). Returns once the socket is bound.
/// The thread exits after [`FakeUpstream::shutdown`] (or dropping the handle).
pub fn spawn_on_thread(addr: &str) -> io::Result<(FakeUpstream, std::thread::JoinHandle<()>)> {
    let addr = addr.to_owned();
    let (tx, rx) = std::sync::mpsc::channel::<io::Result<FakeUpstream>>();
    let handle = std::thread::Builder::new().name("fake-upstream".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-upstream-rt")
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        rt.block_on(async move {
            match FakeUpstream::start(&addr).await {
                Ok(up) => {
                    let mut stop = up.shared.shutdown.subscribe();
                    if tx.send(Ok(up)).is_ok() {
                        stopped(&mut stop).await;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        // Dropping the runtime cancels all connection tasks.
        drop(rt);
    })?;
    let up = rx.recv().map_err(|_| io::Error::other("fake upstream thread exited before binding"))??;
    Ok((up, handle))
}

/// Resolves once shutdown has been requested (drops the watch guard at once,
/// keeping callers `Send`).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut stop = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let mut stop = shared.shutdown.subscribe();
                    tokio::spawn(async move {
                        shared.open_connections.fetch_add(1, Ordering::Relaxed);
                        tokio::select! {
                            _ = stopped(&mut stop) => {}
                            _ = serve_connection(stream, &shared) => {}
                        }
                        shared.open_connections.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                // e.g. EMFILE: back off a little instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
        }
    }
}

// ---------------------------------------------------------------------------
// Connection / HTTP layer
// ---------------------------------------------------------------------------

enum ReqError {
    /// Connection-level failure or premature EOF: just close.
    Io,
    /// Protocol error: answer with this status and close.
    Http(u16, &'static str),
}

impl From<io::Error> for ReqError {
    fn from(_: io::Error) -> Self {
        ReqError::Io
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    Chat,
    Completions,
    Responses,
    Embeddings,
    Messages,
    Models,
    Model,
    Health,
    NotFound,
    MethodNotAllowed,
}

fn route(method: &str, target: &str) -> Route {
    let mut path = target.split(['?', '#']).next().unwrap_or("");
    // absolute-form (`POST http://host/v1/...`), as sent to proxies.
    if let Some(rest) = path.strip_prefix("http://").or_else(|| path.strip_prefix("https://")) {
        path = rest.find('/').map_or("/", |i| &rest[i..]);
    }
    let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
    let want = |m: &str, r: Route| {
        if method == m {
            r
        } else {
            Route::MethodNotAllowed
        }
    };
    match path {
        "/v1/chat/completions" => want("POST", Route::Chat),
        "/v1/completions" => want("POST", Route::Completions),
        "/v1/responses" => want("POST", Route::Responses),
        "/v1/embeddings" => want("POST", Route::Embeddings),
        "/v1/messages" => want("POST", Route::Messages),
        "/v1/models" => want("GET", Route::Models),
        "/healthz" | "/health" => want("GET", Route::Health),
        p if p.starts_with("/v1/models/") && p.len() > "/v1/models/".len() => want("GET", Route::Model),
        _ => Route::NotFound,
    }
}

/// Everything the response side needs from the request headers.
#[derive(Default, Debug)]
struct Ctl {
    http10: bool,
    keep_alive: bool,
    request_id: Option<String>,
    authorization: Option<String>,
    delay_ms: u64,
    status: Option<u16>,
    cut_after: Option<u64>,
    chunks: Option<u64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    cached_tokens: u64,
    reasoning_tokens: u64,
}

struct Request {
    rec: RecordedRequest,
    route: Route,
    ctl: Ctl,
}

struct Conn<'a> {
    stream: TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
    scratch: Vec<u8>,
    shared: &'a Shared,
}

async fn serve_connection(stream: TcpStream, shared: &Shared) {
    let mut conn = Conn {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK),
        out: Vec::with_capacity(4096),
        scratch: Vec::with_capacity(4096),
        shared,
    };
    loop {
        let req = match conn.read_request().await {
            Ok(Some(req)) => req,
            Ok(None) | Err(ReqError::Io) => return,
            Err(ReqError::Http(status, msg)) => {
                let body = error_json(msg, "invalid_request_error", None);
                conn.send_json(status, &body, None, false).await;
                conn.linger_close().await;
                return;
            }
        };
        if !conn.handle(req).await {
            return;
        }
        // Don't keep a huge buffer around after a large request body.
        if conn.buf.capacity() > 1024 * 1024 && conn.buf.len() < READ_CHUNK {
            let mut fresh = BytesMut::with_capacity(READ_CHUNK);
            fresh.extend_from_slice(&conn.buf);
            conn.buf = fresh;
        }
    }
}

fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.windows(4).position(|w| w == b"\r\n\r\n").map(|p| from + p + 4)
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

fn has_token(value: &str, token: &str) -> bool {
    value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn parse_num(v: &str) -> Option<u64> {
    v.trim().parse().ok()
}

impl Conn<'_> {
    /// Reads more bytes into the connection buffer; `Ok(0)` on EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            self.buf.reserve(READ_CHUNK);
        }
        self.stream.read_buf(&mut self.buf).await
    }

    async fn read_request(&mut self) -> Result<Option<Request>, ReqError> {
        // --- head ---
        let mut scanned = 0;
        let head_len = loop {
            // Tolerate stray CRLFs between requests (RFC 9112 §2.2).
            if self.buf.starts_with(b"\r\n") {
                while self.buf.starts_with(b"\r\n") {
                    self.buf.advance(2);
                }
                scanned = 0;
            }
            if let Some(end) = find_head_end(&self.buf, scanned) {
                break end;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(ReqError::Http(431, "request header fields too large"));
            }
            scanned = self.buf.len().saturating_sub(3);
            if self.fill().await? == 0 {
                // Clean EOF between requests, or a truncated head: close either way.
                return if self.buf.is_empty() { Ok(None) } else { Err(ReqError::Io) };
            }
        };
        if head_len > MAX_HEAD {
            return Err(ReqError::Http(431, "request header fields too large"));
        }
        let (method, path, http10, headers) = parse_head(&self.buf[..head_len - 4])?;
        self.buf.advance(head_len);

        // --- framing + control headers ---
        let mut ctl = Ctl { http10, keep_alive: !http10, ..Ctl::default() };
        let mut content_length: Option<u64> = None;
        let mut transfer_encoding: Option<&str> = None;
        let mut expect_continue = false;
        for (name, value) in &headers {
            match name.as_str() {
                "content-length" => {
                    for part in value.split(',') {
                        let n = part
                            .trim()
                            .parse::<u64>()
                            .ok()
                            .filter(|_| part.trim().bytes().all(|b| b.is_ascii_digit()))
                            .ok_or(ReqError::Http(400, "invalid content-length"))?;
                        if content_length.is_some_and(|c| c != n) {
                            return Err(ReqError::Http(400, "conflicting content-length"));
                        }
                        content_length = Some(n);
                    }
                }
                "transfer-encoding" => transfer_encoding = Some(value.as_str()),
                "connection" => {
                    if has_token(value, "close") {
                        ctl.keep_alive = false;
                    } else if has_token(value, "keep-alive") {
                        ctl.keep_alive = true;
                    }
                }
                "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
                "authorization" if ctl.authorization.is_none() => ctl.authorization = Some(value.clone()),
                "x-preauth-request-id" if ctl.request_id.is_none() => ctl.request_id = Some(value.clone()),
                "x-mock-delay-ms" => ctl.delay_ms = parse_num(value).unwrap_or(0),
                "x-mock-status" => ctl.status = parse_num(value).filter(|s| (400..=599).contains(s)).map(|s| s as u16),
                "x-mock-cut-after" => ctl.cut_after = parse_num(value),
                "x-mock-chunks" => ctl.chunks = parse_num(value).map(|n| n.min(MAX_CHUNKS)),
                "x-mock-prompt-tokens" => ctl.prompt_tokens = parse_num(value),
                "x-mock-completion-tokens" => ctl.completion_tokens = parse_num(value),
                "x-mock-cached-tokens" => ctl.cached_tokens = parse_num(value).unwrap_or(0),
                "x-mock-reasoning-tokens" => ctl.reasoning_tokens = parse_num(value).unwrap_or(0),
                _ => {}
            }
        }
        let chunked = match transfer_encoding {
            None => false,
            Some(te) => {
                let last = te.rsplit(',').next().unwrap_or("").trim();
                if !last.eq_ignore_ascii_case("chunked") || http10 {
                    return Err(ReqError::Http(400, "unsupported transfer-encoding"));
                }
                // RFC 9112 §6.3: a message with both must be closed afterwards.
                if content_length.is_some() {
                    ctl.keep_alive = false;
                }
                true
            }
        };
        let content_length = if chunked {
            None
        } else {
            let n = content_length.unwrap_or(0);
            if n > MAX_BODY as u64 {
                return Err(ReqError::Http(413, "request body too large"));
            }
            Some(n as usize)
        };

        // --- body ---
        let wants_body = chunked || content_length.unwrap_or(0) > 0;
        if expect_continue && !http10 && wants_body && self.buf.is_empty() {
            self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let body = match content_length {
            Some(n) => self.read_sized_body(n).await?,
            None => self.read_chunked_body().await?,
        };

        let route = route(&method, &path);
        Ok(Some(Request { rec: RecordedRequest { method, path, headers, body }, route, ctl }))
    }

    async fn read_sized_body(&mut self, n: usize) -> Result<Bytes, ReqError> {
        if n == 0 {
            return Ok(Bytes::new());
        }
        if self.buf.len() < n {
            self.buf.reserve(n - self.buf.len());
        }
        while self.buf.len() < n {
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ReqError::Io);
            }
        }
        Ok(if n <= COPY_BODY_MAX {
            let body = Bytes::copy_from_slice(&self.buf[..n]);
            self.buf.advance(n);
            body
        } else {
            self.buf.split_to(n).freeze()
        })
    }

    /// Returns the length of the next line (without CRLF), reading as needed.
    async fn next_line(&mut self, limit: usize) -> Result<usize, ReqError> {
        let mut scanned = 0;
        loop {
            if let Some(p) = find_crlf(&self.buf[scanned..]) {
                return Ok(scanned + p);
            }
            if self.buf.len() > limit {
                return Err(ReqError::Http(400, "malformed chunked body"));
            }
            scanned = self.buf.len().saturating_sub(1);
            if self.fill().await? == 0 {
                return Err(ReqError::Io);
            }
        }
    }

    async fn read_chunked_body(&mut self) -> Result<Bytes, ReqError> {
        let mut body = BytesMut::new();
        loop {
            let len = self.next_line(4096).await?;
            let line = &self.buf[..len];
            let size_part = line.split(|&b| b == b';').next().unwrap_or(b"");
            let size_part = size_part.trim_ascii();
            if size_part.is_empty() || size_part.len() > 16 {
                return Err(ReqError::Http(400, "invalid chunk size"));
            }
            let mut size: usize = 0;
            for &b in size_part {
                let d = (b as char).to_digit(16).ok_or(ReqError::Http(400, "invalid chunk size"))?;
                size = size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(d as usize))
                    .ok_or(ReqError::Http(413, "request body too large"))?;
            }
            self.buf.advance(len + 2);
            if size == 0 {
                // Trailer section: skip fields until the empty line.
                let mut trailer_bytes = 0;
                loop {
                    let len = self.next_line(MAX_HEAD).await?;
                    self.buf.advance(len + 2);
                    if len == 0 {
                        break;
                    }
                    trailer_bytes += len + 2;
                    if trailer_bytes > MAX_HEAD {
                        return Err(ReqError::Http(431, "trailer section too large"));
                    }
                }
                return Ok(body.freeze());
            }
            if body.len() + size > MAX_BODY {
                return Err(ReqError::Http(413, "request body too large"));
            }
            body.reserve(size);
            let mut remaining = size;
            while remaining > 0 {
                if self.buf.is_empty() && self.fill().await? == 0 {
                    return Err(ReqError::Io);
                }
                let take = remaining.min(self.buf.len());
                body.extend_from_slice(&self.buf[..take]);
                self.buf.advance(take);
                remaining -= take;
            }
            if self.next_line(2).await? != 0 {
                return Err(ReqError::Http(400, "missing CRLF after chunk data"));
            }
            self.buf.advance(2);
        }
    }

    /// After an error response: half-close and drain briefly so the client
    /// reads the response instead of getting a reset.
    async fn linger_close(&mut self) {
        let _ = self.stream.shutdown().await;
        let deadline = Instant::now() + Duration::from_millis(250);
        let mut drained = 0usize;
        let mut sink = [0u8; 4096];
        while drained < 1024 * 1024 {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => drained += n,
                _ => break,
            }
        }
    }

    /// Sleeps `ms` while watching the socket: returns `false` (and counts a
    /// client disconnect) if the client closes or resets the connection.
    /// Pipelined bytes read meanwhile stay in the buffer.
    async fn pause(&mut self, ms: u64) -> bool {
        if ms == 0 {
            return true;
        }
        let sleep = tokio::time::sleep(Duration::from_millis(ms));
        tokio::pin!(sleep);
        loop {
            if self.buf.len() >= MAX_HEAD {
                sleep.as_mut().await;
                return true;
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                _ = sleep.as_mut() => return true,
                r = self.stream.read_buf(&mut self.buf) => match r {
                    Ok(n) if n > 0 => continue,
                    _ => {
                        self.shared.disconnects.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                },
            }
        }
    }

    /// Writes a complete JSON response; returns whether to keep the connection.
    async fn send_json(&mut self, status: u16, body: &Value, ctl: Option<&Ctl>, keep_alive: bool) -> bool {
        self.scratch.clear();
        serde_json::to_writer(&mut self.scratch, body).expect("serializing a Value cannot fail");
        self.send_raw(status, "application/json", ctl, keep_alive).await
    }

    /// Writes `self.scratch` as the body of a complete response.
    async fn send_raw(&mut self, status: u16, content_type: &str, ctl: Option<&Ctl>, keep_alive: bool) -> bool {
        self.out.clear();
        write_head(&mut self.out, status, content_type, Some(self.scratch.len()), ctl, keep_alive);
        self.out.extend_from_slice(&self.scratch);
        self.stream.write_all(&self.out).await.is_ok() && keep_alive
    }

    async fn handle(&mut self, req: Request) -> bool {
        let Request { rec, route, ctl } = req;
        let shared = self.shared;
        shared.total_requests.fetch_add(1, Ordering::Relaxed);
        let body = rec.body.clone();
        let method = if route == Route::NotFound || route == Route::MethodNotAllowed {
            Some((rec.method.clone(), rec.path.clone()))
        } else {
            None
        };
        let model_id = if route == Route::Model {
            rec.path.split(['?', '#']).next().unwrap_or("").trim_end_matches('/').rsplit('/').next().map(str::to_owned)
        } else {
            None
        };
        if shared.recording.load(Ordering::Relaxed) {
            shared.requests.lock().push(rec);
        }
        let keep_alive = ctl.keep_alive;

        let is_stream_route = matches!(route, Route::Chat | Route::Completions | Route::Responses | Route::Messages);
        let json_body: Value = if is_stream_route || route == Route::Embeddings {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        let streaming =
            is_stream_route && json_body.get("stream").and_then(Value::as_bool) == Some(true) && ctl.status.is_none();

        if !streaming && !self.pause(ctl.delay_ms).await {
            return false;
        }
        if let Some(status) = ctl.status {
            let err = json!({"error": {
                "message": "mock upstream error",
                "type": "mock_error",
                "code": "mock_status",
            }});
            return self.send_json(status, &err, Some(&ctl), keep_alive).await;
        }

        match route {
            Route::NotFound | Route::MethodNotAllowed => {
                let (m, p) = method.unwrap_or_default();
                let (status, code) =
                    if route == Route::NotFound { (404, "unknown_url") } else { (405, "method_not_allowed") };
                let err = error_json(
                    &format!("Unknown request URL: {m} {p}. Please check the URL and method."),
                    "invalid_request_error",
                    Some(code),
                );
                self.send_json(status, &err, Some(&ctl), keep_alive).await
            }
            Route::Health => {
                self.scratch.clear();
                self.scratch.extend_from_slice(b"ok\n");
                self.send_raw(200, "text/plain; charset=utf-8", Some(&ctl), keep_alive).await
            }
            Route::Models => {
                let data: Vec<Value> = MODELS.iter().map(|m| model_json(m)).collect();
                let v = json!({"object": "list", "data": data});
                self.send_json(200, &v, Some(&ctl), keep_alive).await
            }
            Route::Model => {
                let id = model_id.unwrap_or_default();
                let v = model_json(&id);
                self.send_json(200, &v, Some(&ctl), keep_alive).await
            }
            Route::Chat | Route::Completions | Route::Responses | Route::Messages | Route::Embeddings => {
                let g = Gen::new(&ctl, &json_body, body.len(), route);
                if streaming {
                    let events = match route {
                        Route::Chat => g.chat_stream(&json_body),
                        Route::Completions => g.completions_stream(&json_body),
                        Route::Responses => g.responses_stream(),
                        _ => g.messages_stream(),
                    };
                    self.run_stream(&ctl, keep_alive, &events).await
                } else {
                    let v = match route {
                        Route::Chat => g.chat(),
                        Route::Completions => g.completions(),
                        Route::Responses => g.responses(),
                        Route::Messages => g.messages(),
                        _ => g.embeddings(&json_body),
                    };
                    self.send_json(200, &v, Some(&ctl), keep_alive).await
                }
            }
        }
    }

    async fn run_stream(&mut self, ctl: &Ctl, keep_alive: bool, events: &[Event]) -> bool {
        // HTTP/1.0 has no chunked encoding: delimit the body by closing.
        let chunked = !ctl.http10;
        let keep_alive = keep_alive && chunked;
        self.out.clear();
        write_stream_head(&mut self.out, ctl, keep_alive, chunked);
        if self.stream.write_all(&self.out).await.is_err() {
            self.shared.disconnects.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let total_content = events.iter().filter(|e| e.content).count() as u64;
        let cut_at = ctl.cut_after.map(|c| c.min(total_content));
        let mut content_seen = 0u64;
        for (i, ev) in events.iter().enumerate() {
            if cut_at == Some(content_seen) && (ev.content || content_seen == total_content) {
                let _ = self.stream.shutdown().await;
                return false;
            }
            if !self.pause(ctl.delay_ms).await {
                return false;
            }
            self.out.clear();
            if chunked {
                let _ = write!(Out(&mut self.out), "{:x}\r\n", ev.frame.len());
                self.out.extend_from_slice(&ev.frame);
                self.out.extend_from_slice(b"\r\n");
                if i + 1 == events.len() {
                    self.out.extend_from_slice(b"0\r\n\r\n");
                }
            } else {
                self.out.extend_from_slice(&ev.frame);
            }
            if self.stream.write_all(&self.out).await.is_err() {
                self.shared.disconnects.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            if ev.content {
                content_seen += 1;
            }
        }
        if events.is_empty() && chunked && self.stream.write_all(b"0\r\n\r\n").await.is_err() {
            return false;
        }
        keep_alive
    }
}

/// `fmt::Write` adapter over a byte vector (avoids `io::Write` error plumbing).
struct Out<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Out<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

type Head = (String, String, bool, Vec<(String, String)>);

/// Parses the request line and header fields (`head` excludes the final CRLFCRLF).
fn parse_head(head: &[u8]) -> Result<Head, ReqError> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(ReqError::Http(400, "malformed request line")),
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(ReqError::Http(505, "HTTP version not supported")),
    };
    if !method.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ReqError::Http(400, "malformed request line"));
    }
    let mut headers = Vec::with_capacity(16);
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(ReqError::Http(400, "obsolete header line folding"));
        }
        let (name, value) = line.split_once(':').ok_or(ReqError::Http(400, "malformed header field"))?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ReqError::Http(400, "malformed header field"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim_matches([' ', '\t']).to_owned()));
    }
    Ok((method.to_owned(), target.to_owned(), http10, headers))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        529 => "Overloaded",
        _ => "Unknown",
    }
}

fn write_common(out: &mut Vec<u8>, status: u16, content_type: &str, ctl: Option<&Ctl>) {
    let mut w = Out(out);
    let _ = write!(w, "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\n", reason(status));
    if let Some(ctl) = ctl {
        if let Some(id) = &ctl.request_id {
            let _ = write!(w, "x-mock-saw-request-id: {id}\r\n");
        }
        let auth = ctl.authorization.as_deref().unwrap_or("none");
        let _ = write!(w, "x-mock-saw-authorization: {auth}\r\n");
    }
}

fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    content_length: Option<usize>,
    ctl: Option<&Ctl>,
    keep_alive: bool,
) {
    write_common(out, status, content_type, ctl);
    if let Some(n) = content_length {
        let _ = write!(Out(out), "content-length: {n}\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn write_stream_head(out: &mut Vec<u8>, ctl: &Ctl, keep_alive: bool, chunked: bool) {
    write_common(out, 200, "text/event-stream", Some(ctl));
    out.extend_from_slice(b"cache-control: no-cache\r\n");
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn error_json(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

fn model_json(id: &str) -> Value {
    let owner = if id.starts_with("claude") {
        "anthropic"
    } else if id.starts_with("mock") {
        "preauth-sidecar"
    } else {
        "openai"
    };
    json!({"id": id, "object": "model", "created": 1_700_000_000u64, "owned_by": owner})
}

// ---------------------------------------------------------------------------
// Response generation
// ---------------------------------------------------------------------------

struct Event {
    /// Complete SSE frame (`event: ..\n` + `data: ..\n\n`).
    frame: Vec<u8>,
    /// Counts as a content event for `x-mock-cut-after`.
    content: bool,
}

fn sse(name: Option<&str>, data: &Value, content: bool) -> Event {
    let mut frame = Vec::with_capacity(256);
    if let Some(name) = name {
        frame.extend_from_slice(b"event: ");
        frame.extend_from_slice(name.as_bytes());
        frame.push(b'\n');
    }
    frame.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut frame, data).expect("serializing a Value cannot fail");
    frame.extend_from_slice(b"\n\n");
    Event { frame, content }
}

fn sse_done() -> Event {
    Event { frame: b"data: [DONE]\n\n".to_vec(), content: false }
}

/// Per-request generated values shared by all response shapes.
struct Gen {
    model: String,
    created: u64,
    id_seq: u64,
    chunks: u64,
    prompt: u64,
    completion: u64,
    cached: u64,
    reasoning: u64,
    include_usage: bool,
}

impl Gen {
    fn new(ctl: &Ctl, body: &Value, body_len: usize, route: Route) -> Gen {
        let model = body.get("model").and_then(Value::as_str).unwrap_or(DEFAULT_MODEL).to_owned();
        let limit = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| body.get(*k).and_then(Value::as_u64));
        let completion = if route == Route::Embeddings {
            0
        } else {
            ctl.completion_tokens
                .unwrap_or_else(|| limit.unwrap_or(DEFAULT_COMPLETION_TOKENS).min(DEFAULT_COMPLETION_TOKENS))
        };
        Gen {
            model,
            created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            id_seq: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            chunks: ctl.chunks.unwrap_or(DEFAULT_CHUNKS),
            prompt: ctl.prompt_tokens.unwrap_or((body_len as u64 / 4).max(1)),
            completion,
            cached: ctl.cached_tokens,
            reasoning: ctl.reasoning_tokens,
            include_usage: body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true),
        }
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}{:024x}", self.id_seq)
    }

    fn piece(i: u64) -> &'static str {
        WORDS[(i % WORDS.len() as u64) as usize]
    }

    fn text(&self) -> String {
        (0..self.chunks).map(Self::piece).collect()
    }

    fn openai_usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        })
    }

    fn responses_usage(&self) -> Value {
        json!({
            "input_tokens": self.prompt,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.completion,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.prompt + self.completion,
        })
    }

    fn anthropic_usage(&self, output_tokens: u64) -> Value {
        json!({
            "input_tokens": self.prompt.saturating_sub(self.cached),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cached,
            "output_tokens": output_tokens,
        })
    }

    // --- chat.completions ---

    fn chat(&self) -> Value {
        json!({
            "id": self.id("chatcmpl-mock"),
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": self.text(),
                    "refusal": null,
                    "annotations": [],
                },
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": self.openai_usage(),
            "service_tier": "default",
            "system_fingerprint": "fp_mock",
        })
    }

    fn chat_chunk(&self, id: &str, choices: Value, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        v
    }

    fn chat_stream(&self, _body: &Value) -> Vec<Event> {
        let id = self.id("chatcmpl-mock");
        let mut events = Vec::with_capacity(self.chunks as usize + 3);
        for i in 0..self.chunks {
            let delta = if i == 0 {
                json!({"role": "assistant", "content": Self::piece(i)})
            } else {
                json!({"content": Self::piece(i)})
            };
            let choices = json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]);
            events.push(sse(None, &self.chat_chunk(&id, choices, None), true));
        }
        let choices = json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]);
        events.push(sse(None, &self.chat_chunk(&id, choices, None), false));
        if self.include_usage {
            let v = self.chat_chunk(&id, json!([]), Some(self.openai_usage()));
            events.push(sse(None, &v, false));
        }
        events.push(sse_done());
        events
    }

    // --- completions (legacy) ---

    fn completions(&self) -> Value {
        json!({
            "id": self.id("cmpl-mock"),
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"text": self.text(), "index": 0, "logprobs": null, "finish_reason": "stop"}],
            "usage": self.openai_usage(),
            "system_fingerprint": "fp_mock",
        })
    }

    fn completions_stream(&self, _body: &Value) -> Vec<Event> {
        let id = self.id("cmpl-mock");
        let chunk = |text: &str, finish: Value, choices_empty: bool, usage: Option<Value>| {
            let choices = if choices_empty {
                json!([])
            } else {
                json!([{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}])
            };
            let mut v = json!({
                "id": id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": "fp_mock",
                "choices": choices,
            });
            if self.include_usage {
                v["usage"] = usage.unwrap_or(Value::Null);
            }
            v
        };
        let mut events = Vec::with_capacity(self.chunks as usize + 3);
        for i in 0..self.chunks {
            events.push(sse(None, &chunk(Self::piece(i), Value::Null, false, None), true));
        }
        events.push(sse(None, &chunk("", json!("stop"), false, None), false));
        if self.include_usage {
            let v = chunk("", Value::Null, true, Some(self.openai_usage()));
            events.push(sse(None, &v, false));
        }
        events.push(sse_done());
        events
    }

    // --- responses ---

    fn response_object(&self, done: bool) -> Value {
        let output = if done { json!([self.response_message(true)]) } else { json!([]) };
        json!({
            "id": self.id("resp_mock"),
            "object": "response",
            "created_at": self.created,
            "status": if done { "completed" } else { "in_progress" },
            "error": null,
            "incomplete_details": null,
            "instructions": null,
            "max_output_tokens": null,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "store": false,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": if done { self.responses_usage() } else { Value::Null },
            "user": null,
            "metadata": {},
        })
    }

    fn response_message(&self, done: bool) -> Value {
        let content =
            if done { json!([{"type": "output_text", "text": self.text(), "annotations": []}]) } else { json!([]) };
        json!({
            "id": self.id("msg_mock"),
            "type": "message",
            "status": if done { "completed" } else { "in_progress" },
            "role": "assistant",
            "content": content,
        })
    }

    fn responses(&self) -> Value {
        let mut v = self.response_object(true);
        v["output_text"] = Value::String(self.text());
        v
    }

    fn responses_stream(&self) -> Vec<Event> {
        let item_id = self.id("msg_mock");
        let mut seq = 0u64;
        let mut events = Vec::with_capacity(self.chunks as usize + 8);
        let mut push = |events: &mut Vec<Event>, name: &str, mut data: Value, content: bool| {
            data["type"] = Value::String(name.to_owned());
            data["sequence_number"] = json!(seq);
            seq += 1;
            events.push(sse(Some(name), &data, content));
        };
        let text = self.text();
        push(&mut events, "response.created", json!({"response": self.response_object(false)}), false);
        push(&mut events, "response.in_progress", json!({"response": self.response_object(false)}), false);
        push(
            &mut events,
            "response.output_item.added",
            json!({"output_index": 0, "item": self.response_message(false)}),
            false,
        );
        push(
            &mut events,
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                   "part": {"type": "output_text", "text": "", "annotations": []}}),
            false,
        );
        for i in 0..self.chunks {
            push(
                &mut events,
                "response.output_text.delta",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                       "delta": Self::piece(i), "logprobs": []}),
                true,
            );
        }
        push(
            &mut events,
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                   "text": text, "logprobs": []}),
            false,
        );
        push(
            &mut events,
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                   "part": {"type": "output_text", "text": text, "annotations": []}}),
            false,
        );
        push(
            &mut events,
            "response.output_item.done",
            json!({"output_index": 0, "item": self.response_message(true)}),
            false,
        );
        push(&mut events, "response.completed", json!({"response": self.response_object(true)}), false);
        events
    }

    // --- anthropic messages ---

    fn messages(&self) -> Value {
        json!({
            "id": self.id("msg_mock"),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": self.text()}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": self.anthropic_usage(self.completion),
        })
    }

    fn messages_stream(&self) -> Vec<Event> {
        let mut events = Vec::with_capacity(self.chunks as usize + 5);
        let start = json!({
            "type": "message_start",
            "message": {
                "id": self.id("msg_mock"),
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": self.anthropic_usage(1),
            },
        });
        events.push(sse(Some("message_start"), &start, false));
        events.push(sse(
            Some("content_block_start"),
            &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
            false,
        ));
        for i in 0..self.chunks {
            events.push(sse(
                Some("content_block_delta"),
                &json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": Self::piece(i)}}),
                true,
            ));
        }
        events.push(sse(Some("content_block_stop"), &json!({"type": "content_block_stop", "index": 0}), false));
        events.push(sse(
            Some("message_delta"),
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                    "usage": {"output_tokens": self.completion}}),
            false,
        ));
        events.push(sse(Some("message_stop"), &json!({"type": "message_stop"}), false));
        events
    }

    // --- embeddings ---

    fn embeddings(&self, body: &Value) -> Value {
        let inputs = match body.get("input") {
            Some(Value::Array(items)) if items.iter().all(Value::is_number) => 1,
            Some(Value::Array(items)) => items.len().max(1),
            _ => 1,
        };
        let dims = body.get("dimensions").and_then(Value::as_u64).unwrap_or(8).clamp(1, 4096) as usize;
        let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
        let data: Vec<Value> = (0..inputs)
            .map(|i| {
                let vector = (0..dims).map(|j| ((i * 31 + j * 17) % 100) as f32 / 100.0 - 0.5);
                let embedding = if base64 {
                    let raw: Vec<u8> = vector.flat_map(f32::to_le_bytes).collect();
                    Value::String(base64_encode(&raw))
                } else {
                    Value::Array(vector.map(|x| json!(x)).collect())
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        json!({
            "object": "list",
            "data": data,
            "model": self.model,
            "usage": {"prompt_tokens": self.prompt, "total_tokens": self.prompt},
        })
    }
}

fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (k, shift) in [18u32, 12, 6, 0].iter().enumerate() {
            if k <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant as StdInstant;

    /// A parsed HTTP response as seen by a raw client.
    #[derive(Debug, Default)]
    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        /// Arrival time of each body chunk (chunked responses only).
        chunk_times: Vec<StdInstant>,
        /// Body fully framed (terminal chunk / content-length reached).
        complete: bool,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).expect("json body")
        }
        /// SSE events as (event name, data).
        fn events(&self) -> Vec<(Option<String>, String)> {
            let text = std::str::from_utf8(&self.body).unwrap();
            text.split("\n\n")
                .filter(|b| !b.is_empty())
                .map(|block| {
                    let mut name = None;
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(n) = line.strip_prefix("event: ") {
                            name = Some(n.to_owned());
                        } else if let Some(d) = line.strip_prefix("data: ") {
                            data.push_str(d);
                        }
                    }
                    (name, data)
                })
                .collect()
        }
    }

    async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
        let mut tmp = [0u8; 16384];
        match s.read(&mut tmp).await {
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                n
            }
            Err(_) => 0,
        }
    }

    async fn line(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
        loop {
            if let Some(p) = find_crlf(buf) {
                let l = String::from_utf8(buf[..p].to_vec()).unwrap();
                buf.drain(..p + 2);
                return Some(l);
            }
            if fill(s, buf).await == 0 {
                return None;
            }
        }
    }

    /// Reads one response (skipping 1xx); `buf` keeps leftover bytes.
    async fn read_resp(s: &mut TcpStream, buf: &mut Vec<u8>) -> Resp {
        let mut r = Resp::default();
        loop {
            let end = loop {
                if let Some(e) = find_head_end(buf, 0) {
                    break e;
                }
                assert!(fill(s, buf).await > 0, "EOF before response head");
            };
            let head = String::from_utf8(buf[..end - 4].to_vec()).unwrap();
            buf.drain(..end);
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap();
            r.status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
            r.headers = lines
                .map(|l| {
                    let (k, v) = l.split_once(':').unwrap();
                    (k.to_ascii_lowercase(), v.trim().to_owned())
                })
                .collect();
            if r.status >= 200 {
                break;
            }
        }
        if r.header("transfer-encoding") == Some("chunked") {
            loop {
                let Some(size_line) = line(s, buf).await else {
                    return r;
                };
                let size = usize::from_str_radix(size_line.trim(), 16).unwrap();
                if size == 0 {
                    if line(s, buf).await.is_some() {
                        r.complete = true;
                    }
                    return r;
                }
                while buf.len() < size + 2 {
                    if fill(s, buf).await == 0 {
                        return r;
                    }
                }
                r.body.extend_from_slice(&buf[..size]);
                assert_eq!(&buf[size..size + 2], b"\r\n");
                buf.drain(..size + 2);
                r.chunk_times.push(StdInstant::now());
            }
        } else if let Some(n) = r.header("content-length") {
            let n: usize = n.parse().unwrap();
            while buf.len() < n {
                if fill(s, buf).await == 0 {
                    return r;
                }
            }
            r.body = buf.drain(..n).collect();
            r.complete = true;
        } else {
            while fill(s, buf).await > 0 {}
            r.body = std::mem::take(buf);
            r.complete = true;
        }
        r
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut req = req.into_bytes();
        req.extend_from_slice(body);
        req
    }

    async fn one_shot(up: &FakeUpstream, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        s.write_all(&request(method, path, headers, body.as_bytes())).await.unwrap();
        read_resp(&mut s, &mut Vec::new()).await
    }

    async fn server() -> FakeUpstream {
        FakeUpstream::start("127.0.0.1:0").await.unwrap()
    }

    #[tokio::test]
    async fn chat_json_shape_and_usage() {
        let up = server().await;
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":7}"#;
        let r = one_shot(
            &up,
            "POST",
            "/v1/chat/completions",
            &[
                ("Authorization", "Bearer sk-test"),
                ("X-Preauth-Request-Id", "req-42"),
                ("Content-Type", "application/json"),
                ("x-mock-cached-tokens", "3"),
                ("X-Mock-Reasoning-Tokens", "2"),
            ],
            body,
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(r.complete);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-mock-saw-request-id"), Some("req-42"));
        assert_eq!(r.header("x-mock-saw-authorization"), Some("Bearer sk-test"));
        let v = r.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "gpt-4o-mini");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello from the mock upstream");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let prompt = (body.len() / 4) as u64;
        assert_eq!(v["usage"]["prompt_tokens"], prompt);
        assert_eq!(v["usage"]["completion_tokens"], 7);
        assert_eq!(v["usage"]["total_tokens"], prompt + 7);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
        assert_eq!(v["usage"]["completion_tokens_details"]["reasoning_tokens"], 2);

        // Overrides + no credentials.
        let r = one_shot(
            &up,
            "POST",
            "/v1/chat/completions",
            &[("x-mock-prompt-tokens", "1000"), ("x-mock-completion-tokens", "50")],
            r#"{"model":"m"}"#,
        )
        .await;
        let v = r.json();
        assert_eq!(r.header("x-mock-saw-authorization"), Some("none"));
        assert_eq!(r.header("x-mock-saw-request-id"), None);
        assert_eq!(v["usage"]["prompt_tokens"], 1000);
        assert_eq!(v["usage"]["completion_tokens"], 50);
        assert_eq!(v["usage"]["total_tokens"], 1050);

        let reqs = up.requests();
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].method, "POST");
        assert_eq!(reqs[0].path, "/v1/chat/completions");
        assert_eq!(reqs[0].header("AUTHORIZATION"), Some("Bearer sk-test"));
        assert_eq!(reqs[0].header("x-preauth-request-id"), Some("req-42"));
        assert_eq!(&reqs[0].body[..], body.as_bytes());
        assert_eq!(reqs[0].json().unwrap()["max_tokens"], 7);
        up.clear();
        assert!(up.requests().is_empty());
        assert_eq!(up.request_count(), 2);
    }

    #[test]
    fn route_table() {
        assert_eq!(route("POST", "/v1/chat/completions"), Route::Chat);
        assert_eq!(route("POST", "/v1/chat/completions/?x=1"), Route::Chat);
        assert_eq!(route("POST", "http://gw:8080/v1/messages"), Route::Messages);
        assert_eq!(route("GET", "/v1/models/gpt-4o"), Route::Model);
        assert_eq!(route("GET", "/v1/responses"), Route::MethodNotAllowed);
        assert_eq!(route("POST", "/v2/chat/completions"), Route::NotFound);
        assert_eq!(route("GET", "http://gw"), Route::NotFound);
    }

    #[tokio::test]
    async fn other_json_routes() {
        let up = server().await;
        let r = one_shot(&up, "POST", "/v1/completions", &[], r#"{"model":"davinci","prompt":"x"}"#).await;
        let v = r.json();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], "davinci");
        assert_eq!(v["choices"][0]["text"], "Hello from the mock upstream");
        assert_eq!(v["usage"]["completion_tokens"], 16);

        let r = one_shot(
            &up,
            "POST",
            "/v1/responses",
            &[("x-mock-cached-tokens", "4")],
            r#"{"model":"gpt-4o","input":"x","max_output_tokens":9}"#,
        )
        .await;
        let v = r.json();
        assert_eq!(v["object"], "response");
        assert_eq!(v["status"], "completed");
        assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
        assert_eq!(v["usage"]["output_tokens"], 9);
        assert_eq!(v["usage"]["input_tokens_details"]["cached_tokens"], 4);

        let r = one_shot(
            &up,
            "POST",
            "/v1/messages",
            &[("x-mock-prompt-tokens", "100"), ("x-mock-cached-tokens", "30")],
            r#"{"model":"claude-3-5-sonnet-latest","max_tokens":1024}"#,
        )
        .await;
        let v = r.json();
        assert_eq!(v["type"], "message");
        assert_eq!(v["content"][0]["type"], "text");
        assert_eq!(v["usage"]["input_tokens"], 70);
        assert_eq!(v["usage"]["cache_read_input_tokens"], 30);
        assert_eq!(v["usage"]["output_tokens"], 16);

        let r = one_shot(
            &up,
            "POST",
            "/v1/embeddings",
            &[],
            r#"{"model":"text-embedding-3-small","input":["a","b"],"dimensions":4}"#,
        )
        .await;
        let v = r.json();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        assert_eq!(v["data"][1]["embedding"].as_array().unwrap().len(), 4);
        let r =
            one_shot(&up, "POST", "/v1/embeddings", &[], r#"{"input":"a","encoding_format":"base64","dimensions":3}"#)
                .await;
        // 3 f32 = 12 bytes = 16 base64 chars.
        assert_eq!(r.json()["data"][0]["embedding"].as_str().unwrap().len(), 16);
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_encode(b"abcd"), "YWJjZA==");

        let r = one_shot(&up, "GET", "/v1/models", &[], "").await;
        assert_eq!(r.json()["object"], "list");
        assert!(r.json()["data"].as_array().unwrap().len() >= 3);

        let r = one_shot(&up, "POST", "/v1/nope", &[("authorization", "Bearer x")], "{}").await;
        assert_eq!(r.status, 404);
        assert_eq!(r.header("x-mock-saw-authorization"), Some("Bearer x"));
        assert!(r.json()["error"]["message"].is_string());
        let r = one_shot(&up, "GET", "/v1/chat/completions", &[], "").await;
        assert_eq!(r.status, 405);
    }

    #[tokio::test]
    async fn chat_sse_with_usage_and_done() {
        let up = server().await;
        let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
        let r = one_shot(
            &up,
            "POST",
            "/v1/chat/completions",
            &[("x-mock-chunks", "3"), ("x-mock-completion-tokens", "3")],
            body,
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(r.complete);
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        assert_eq!(r.header("cache-control"), Some("no-cache"));
        let evs = r.events();
        // 3 content + finish + usage + [DONE]
        assert_eq!(evs.len(), 6, "{evs:?}");
        assert_eq!(r.chunk_times.len(), 6, "one HTTP chunk per event");
        let chunks: Vec<Value> = evs[..5].iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
        assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String =
            chunks[..3].iter().map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap().to_owned()).collect();
        assert_eq!(text, "Hello from the");
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
        assert!(chunks[3]["usage"].is_null());
        assert_eq!(chunks[4]["choices"], json!([]));
        assert_eq!(chunks[4]["usage"]["completion_tokens"], 3);
        assert_eq!(chunks[4]["usage"]["prompt_tokens"], (body.len() / 4) as u64);
        assert_eq!(evs[5].1, "[DONE]");

        // Without include_usage: no usage chunk, no usage fields.
        let body = r#"{"model":"m","stream":true}"#;
        let r = one_shot(&up, "POST", "/v1/chat/completions", &[], body).await;
        let evs = r.events();
        assert_eq!(evs.len(), 5 + 2);
        assert!(evs.iter().all(|(_, d)| !d.contains("usage")));
        assert_eq!(evs.last().unwrap().1, "[DONE]");

        // Completions stream uses `text`.
        let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
        let r = one_shot(&up, "POST", "/v1/completions", &[("x-mock-chunks", "2")], body).await;
        let evs = r.events();
        assert_eq!(evs.len(), 2 + 3);
        let c0: Value = serde_json::from_str(&evs[0].1).unwrap();
        assert_eq!(c0["choices"][0]["text"], "Hello");
        let u: Value = serde_json::from_str(&evs[3].1).unwrap();
        assert_eq!(u["usage"]["completion_tokens"], 16);
    }

    #[tokio::test]
    async fn responses_sse_sequence() {
        let up = server().await;
        let r = one_shot(
            &up,
            "POST",
            "/v1/responses",
            &[("x-mock-chunks", "2"), ("x-mock-reasoning-tokens", "5")],
            r#"{"model":"gpt-4o","stream":true,"input":"x"}"#,
        )
        .await;
        assert!(r.complete);
        let evs = r.events();
        let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, (n, d)) in evs.iter().enumerate() {
            let v: Value = serde_json::from_str(d).unwrap();
            assert_eq!(v["type"].as_str(), n.as_deref());
            assert_eq!(v["sequence_number"], i);
        }
        let done: Value = serde_json::from_str(&evs[9].1).unwrap();
        assert_eq!(done["response"]["status"], "completed");
        assert_eq!(done["response"]["model"], "gpt-4o");
        assert_eq!(done["response"]["usage"]["output_tokens_details"]["reasoning_tokens"], 5);
        assert_eq!(done["response"]["usage"]["output_tokens"], 16);
    }

    #[tokio::test]
    async fn anthropic_sse_sequence() {
        let up = server().await;
        let r = one_shot(
            &up,
            "POST",
            "/v1/messages",
            &[("x-mock-chunks", "3"), ("x-mock-prompt-tokens", "40"), ("x-mock-completion-tokens", "12")],
            r#"{"model":"claude-3-5-sonnet-latest","stream":true,"max_tokens":100}"#,
        )
        .await;
        assert!(r.complete);
        let evs = r.events();
        let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let vals: Vec<Value> = evs.iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
        for (v, n) in vals.iter().zip(&names) {
            assert_eq!(v["type"].as_str(), Some(*n));
        }
        assert_eq!(vals[0]["message"]["usage"]["input_tokens"], 40);
        assert_eq!(vals[0]["message"]["model"], "claude-3-5-sonnet-latest");
        assert_eq!(vals[2]["delta"]["type"], "text_delta");
        assert_eq!(vals[6]["usage"]["output_tokens"], 12);
        assert_eq!(vals[6]["delta"]["stop_reason"], "end_turn");
    }

    #[tokio::test]
    async fn chunked_request_body_is_byte_exact() {
        let up = server().await;
        // 200 KiB of pseudo-random bytes (not valid UTF-8 / JSON on purpose).
        let mut x: u32 = 0x1234_5678;
        let body: Vec<u8> = (0..200 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nx-preauth-request-id: big\r\n\r\n").await.unwrap();
        let sizes = [1usize, 4095, 16384, 7, 65536, 3];
        let (mut off, mut k) = (0, 0);
        while off < body.len() {
            let n = sizes[k % sizes.len()].min(body.len() - off);
            let ext = if k % 2 == 0 { ";ext=1" } else { "" };
            let mut piece = format!("{n:X}{ext}\r\n").into_bytes();
            piece.extend_from_slice(&body[off..off + n]);
            piece.extend_from_slice(b"\r\n");
            s.write_all(&piece).await.unwrap();
            off += n;
            k += 1;
        }
        s.write_all(b"0\r\nx-trailer: yes\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        let r = read_resp(&mut s, &mut buf).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-mock-saw-request-id"), Some("big"));
        assert_eq!(r.json()["usage"]["prompt_tokens"], (body.len() / 4) as u64);
        // Same connection still usable after a chunked body.
        s.write_all(&request("GET", "/v1/models", &[], b"")).await.unwrap();
        assert_eq!(read_resp(&mut s, &mut buf).await.status, 200);
        let reqs = up.requests();
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].body.len(), body.len());
        assert!(reqs[0].body[..] == body[..], "body differs");
        assert_eq!(reqs[0].header("transfer-encoding"), Some("chunked"));

        // Same with content-length and expect: 100-continue.
        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        let head = format!(
            "POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        while find_head_end(&buf, 0).is_none() {
            assert!(fill(&mut s, &mut buf).await > 0);
        }
        assert!(buf.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"));
        buf.clear();
        s.write_all(&body).await.unwrap();
        assert_eq!(read_resp(&mut s, &mut buf).await.status, 200);
        assert!(up.last_request().unwrap().body[..] == body[..]);
    }

    #[tokio::test]
    async fn keep_alive_and_connection_close() {
        let up = server().await;
        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        let mut buf = Vec::new();
        s.write_all(&request("POST", "/v1/chat/completions", &[("x-preauth-request-id", "a")], br#"{"model":"one"}"#))
            .await
            .unwrap();
        let r1 = read_resp(&mut s, &mut buf).await;
        assert_eq!(r1.json()["model"], "one");
        assert_eq!(r1.header("connection"), None);
        // A streamed response keeps the connection usable too.
        s.write_all(&request("POST", "/v1/chat/completions", &[], br#"{"model":"two","stream":true}"#)).await.unwrap();
        let r2 = read_resp(&mut s, &mut buf).await;
        assert!(r2.complete);
        s.write_all(&request(
            "POST",
            "/v1/chat/completions",
            &[("Connection", "close"), ("x-preauth-request-id", "b")],
            br#"{"model":"three"}"#,
        ))
        .await
        .unwrap();
        let r3 = read_resp(&mut s, &mut buf).await;
        assert_eq!(r3.json()["model"], "three");
        assert_eq!(r3.header("connection"), Some("close"));
        assert_eq!(r3.header("x-mock-saw-request-id"), Some("b"));
        // Server closes after `connection: close`.
        let n = tokio::time::timeout(Duration::from_secs(2), fill(&mut s, &mut buf)).await.unwrap();
        assert_eq!(n, 0);
        assert_eq!(up.requests().len(), 3);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(up.open_connections(), 0);
    }

    #[tokio::test]
    async fn mock_status_error() {
        let up = server().await;
        let r = one_shot(
            &up,
            "POST",
            "/v1/chat/completions",
            &[("x-mock-status", "503"), ("authorization", "Bearer k")],
            r#"{"model":"m","stream":true}"#,
        )
        .await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-mock-saw-authorization"), Some("Bearer k"));
        assert_eq!(
            r.json(),
            json!({"error":{"message":"mock upstream error","type":"mock_error","code":"mock_status"}})
        );
        let r = one_shot(&up, "POST", "/v1/messages", &[("x-mock-status", "429")], "{}").await;
        assert_eq!(r.status, 429);
    }

    #[tokio::test]
    async fn cut_after_closes_early() {
        let up = server().await;
        let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
        let r =
            one_shot(&up, "POST", "/v1/chat/completions", &[("x-mock-chunks", "5"), ("x-mock-cut-after", "2")], body)
                .await;
        assert_eq!(r.status, 200);
        assert!(!r.complete, "no chunked terminator after a cut");
        let evs = r.events();
        assert_eq!(evs.len(), 2);
        assert!(evs.iter().all(|(_, d)| d != "[DONE]" && !d.contains("\"usage\":{")));
        // Cut after more than available: all content, but no finish/usage/DONE.
        let r = one_shot(&up, "POST", "/v1/messages", &[("x-mock-chunks", "2"), ("x-mock-cut-after", "9")], body).await;
        assert!(!r.complete);
        let names: Vec<String> = r.events().into_iter().map(|(n, _)| n.unwrap()).collect();
        assert_eq!(names, ["message_start", "content_block_start", "content_block_delta", "content_block_delta"]);
        assert_eq!(up.client_disconnects(), 0);
    }

    #[tokio::test]
    async fn delay_spacing_is_observable() {
        let up = server().await;
        let delay = 80u64;
        let t0 = StdInstant::now();
        let r = one_shot(
            &up,
            "POST",
            "/v1/chat/completions",
            &[("x-mock-chunks", "3"), ("x-mock-delay-ms", "80")],
            r#"{"model":"m","stream":true}"#,
        )
        .await;
        assert!(r.complete);
        let events = r.events().len();
        assert_eq!(events, 5);
        // The server sleeps before each event: lower bounds hold regardless of load.
        let total = r.chunk_times.last().unwrap().duration_since(t0);
        assert!(total >= Duration::from_millis(delay * events as u64), "{total:?}");
        assert!(r.chunk_times[0].duration_since(t0) >= Duration::from_millis(delay));
        let spaced =
            r.chunk_times.windows(2).filter(|w| w[1].duration_since(w[0]) >= Duration::from_millis(delay / 2)).count();
        assert!(spaced >= 2, "events should arrive spread out, got {spaced} spaced gaps");

        // JSON responses are delayed as a whole, but the request is recorded first.
        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        s.write_all(&request("POST", "/v1/chat/completions", &[("x-mock-delay-ms", "300")], br#"{"model":"slow"}"#))
            .await
            .unwrap();
        let t1 = StdInstant::now();
        let mut seen = false;
        while t1.elapsed() < Duration::from_millis(250) {
            if up.requests().iter().any(|r| r.body.as_ref() == br#"{"model":"slow"}"#) {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(seen, "request must be recorded before the delayed response");
        let r = read_resp(&mut s, &mut Vec::new()).await;
        assert!(t1.elapsed() >= Duration::from_millis(300));
        assert_eq!(r.json()["model"], "slow");
    }

    #[tokio::test]
    async fn client_disconnect_mid_stream_is_counted() {
        let up = server().await;
        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        s.write_all(&request(
            "POST",
            "/v1/chat/completions",
            &[("x-mock-chunks", "50"), ("x-mock-delay-ms", "30")],
            br#"{"model":"m","stream":true}"#,
        ))
        .await
        .unwrap();
        let mut buf = Vec::new();
        while !buf.windows(6).any(|w| w == b"data: ") {
            assert!(fill(&mut s, &mut buf).await > 0);
        }
        drop(s);
        let t = StdInstant::now();
        while up.client_disconnects() == 0 && t.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(up.client_disconnects(), 1);
    }

    #[tokio::test]
    async fn limits_and_malformed() {
        let up = server().await;
        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n").await.unwrap();
        assert_eq!(read_resp(&mut s, &mut Vec::new()).await.status, 413);

        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        let big = format!("GET /v1/models HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(70 * 1024));
        let _ = s.write_all(big.as_bytes()).await;
        assert_eq!(read_resp(&mut s, &mut Vec::new()).await.status, 431);

        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").await.unwrap();
        assert_eq!(read_resp(&mut s, &mut Vec::new()).await.status, 400);

        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        s.write_all(b"garbage\r\n\r\n").await.unwrap();
        assert_eq!(read_resp(&mut s, &mut Vec::new()).await.status, 400);
        assert!(up.requests().is_empty());
    }

    #[tokio::test]
    async fn shutdown_stops_accepting() {
        let up = server().await;
        let addr = up.addr();
        assert_eq!(one_shot(&up, "GET", "/healthz", &[], "").await.status, 200);
        let mut idle = TcpStream::connect(addr).await.unwrap();
        up.shutdown();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err());
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(1), idle.read(&mut b)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)));
    }

    #[test]
    fn spawn_on_thread_from_sync_code() {
        use std::io::{Read, Write};
        let (up, handle) = spawn_on_thread("127.0.0.1:0").unwrap();
        let mut s = std::net::TcpStream::connect(up.addr()).unwrap();
        s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("\"object\":\"list\""));
        assert_eq!(up.requests().len(), 1);
        drop(up);
        handle.join().unwrap();
    }
}
