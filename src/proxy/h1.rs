//! The lean HTTP/1 driver: the proxy listener's application. HTTP/1.x requests are driven here,
//! one straight-line task per request, through the same phases as pingora's proxy (`inspect`,
//! `replaced_upstream` + `own_upstream_headers`, `on_upstream_response`, `response_headers`,
//! `on_response_chunk`, `fail`, `finish` on `PreauthProxy`); HTTP/2 (h2c) sessions go to
//! pingora's `HttpProxy` unchanged.
//!
//! Why: pingora's `proxy_1to1` costs 2.4–2.9× nginx's CPU per hop on its own
//! (`shared/reference/pingora_cost.md`): two tasks joined by channels, the upstream header and body
//! sent in two writes (the gateway wakes twice), `getpeername` and an idle-watch task on every
//! pooled connection. Here the request (header and body, the body complete and decided first) goes
//! out in one write, the answer streams back in the same task, and idle upstream connections wait
//! in a plain LIFO pool.
//!
//! Differences from pingora's path, on purpose: every body is read and decided *before* the
//! gateway is contacted (also chunked and large ones; pingora's path had to send those headers
//! first), and is forwarded with `content-length`.
//!
//! Owns: `LeanH1`, `UpstreamPool`. Imports: the proxy phases, pingora's protocol types.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora::protocols::http::v2::server::H2Options;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::AsyncWriteExt;

use super::respond::{render, Refusal};
use super::{PreauthProxy, RequestCtx};

/// Upstream body bytes already available that are joined into one client write, at most.
const COALESCE_MAX: usize = 64 * 1024;
/// Idle upstream connections kept for reuse.
const POOL_SIZE: usize = 256;
/// An idle upstream connection older than this is closed instead of reused: below the 5 s
/// keep-alive of common servers (Node.js), so a reused connection is rarely one the gateway is
/// closing. Under load connections come back within milliseconds.
const POOL_IDLE: Duration = Duration::from_secs(4);

/// Idle connections to the one upstream, most recently used first out.
pub struct UpstreamPool {
    idle: parking_lot::Mutex<Vec<(Stream, Instant)>>,
}

impl UpstreamPool {
    fn new() -> UpstreamPool {
        UpstreamPool { idle: parking_lot::Mutex::new(Vec::with_capacity(POOL_SIZE)) }
    }

    /// The most recently used connection if it has been idle for less than `POOL_IDLE`; when it
    /// has not, every connection is older still and all are dropped (closed).
    fn take(&self) -> Option<Stream> {
        let mut idle = self.idle.lock();
        match idle.pop() {
            Some((stream, since)) if since.elapsed() < POOL_IDLE => Some(stream),
            _ => {
                idle.clear();
                None
            }
        }
    }

    fn put(&self, stream: Stream) {
        let mut idle = self.idle.lock();
        if idle.len() < POOL_SIZE {
            idle.push((stream, Instant::now()));
        }
    }
}

/// The proxy listener's application (see the module doc).
pub struct LeanH1 {
    proxy: Arc<HttpProxy<PreauthProxy>>,
    core: PreauthProxy,
    peer: HttpPeer,
    connector: TransportConnector,
    pool: UpstreamPool,
}

impl LeanH1 {
    /// `proxy` serves HTTP/2; it must wrap the same `PreauthProxy` as `core`.
    pub fn new(proxy: HttpProxy<PreauthProxy>, core: PreauthProxy) -> LeanH1 {
        let peer = core.peer();
        LeanH1 {
            proxy: Arc::new(proxy),
            core,
            peer,
            connector: TransportConnector::new(None),
            pool: UpstreamPool::new(),
        }
    }

    /// One request on an HTTP/1 connection; `Some` = the connection may carry the next one.
    async fn serve(&self, mut session: ServerSession, shutdown: &ShutdownWatch) -> Option<ReusedHttpStream> {
        if *shutdown.borrow() {
            return None;
        }
        let mut watch = shutdown.clone();
        let read = tokio::select! {
            biased;
            r = Box::pin(session.read_request()) => r,
            _ = watch.changed() => return None,
        };
        match read {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                if matches!(e.etype(), InvalidHTTPHeader) {
                    let _ = self.core.respond_malformed(&mut session).await;
                }
                session.shutdown().await;
                return None;
            }
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        let mut ctx = RequestCtx::new();
        match self.exchange(&mut session, &mut ctx).await {
            Ok(()) => {
                self.core.finish(None, &mut ctx).await;
                let settings = HttpPersistentSettings::for_session(&session);
                let reusable = Box::pin(session.finish()).await.ok().flatten()?;
                Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
            }
            Err(e) => {
                let refusal = ctx.pending_refusal.is_some() || matches!(e.etype(), HTTPStatus(_));
                let status = self.core.fail(&mut session, &e, &mut ctx).await;
                if !refusal && !matches!(e.esource(), ErrorSource::Downstream) {
                    tracing::warn!(error = %e, status, request_id = %ctx.request_id, "request failed");
                }
                self.core.finish(Some(&e), &mut ctx).await;
                session.shutdown().await;
                None
            }
        }
    }

    /// Inspect, decide, forward, stream the answer back. `Ok` = a complete answer was written.
    async fn exchange(&self, session: &mut ServerSession, ctx: &mut RequestCtx) -> Result<()> {
        if self.core.inspect(session, ctx).await? {
            return Ok(());
        }
        let Some(body) = self.request_body(session, ctx).await? else {
            return Ok(()); // refused after reading the body; the answer is written
        };
        let wire = self.upstream_request(session.req_header(), ctx, &body);
        let mut upstream = self.send(&wire, session).await?;
        let resp = {
            let from = upstream.resp_header().ok_or_else(|| Error::explain(InvalidHTTPHeader, "no response header"))?;
            self.core.on_upstream_response(from, ctx);
            self.downstream_header(from, ctx)?
        };
        session.write_response_header(resp).await.map_err(|e| e.into_down())?;

        let ServerSession::H1(down) = session else {
            return Error::e_explain(InternalError, "lean driver on a non-HTTP/1 session");
        };
        // What arrived together leaves together: chunks already read are joined into one
        // downstream write (one flush, up to COALESCE_MAX), the next write waits for the next
        // upstream read.
        let mut out = Vec::new();
        let mut done = false;
        while !done {
            let chunk = tokio::select! {
                biased;
                c = upstream.read_body_ref() => c.map_err(|e| e.into_up())?,
                r = down.read_body_or_idle(true) => {
                    // The client went away (or broke protocol) while the answer was streaming.
                    return Err(r.err().unwrap_or_else(|| Error::explain(ConnectionClosed, "client gone")).into_down());
                }
            };
            let Some(chunk) = chunk else { break };
            self.core.on_response_chunk(chunk, ctx)?;
            out.clear();
            out.extend_from_slice(chunk);
            done = upstream.is_body_done();
            while !done && out.len() < COALESCE_MAX {
                let Some(next) = ready_now(upstream.read_body_ref()) else { break };
                match next.map_err(|e| e.into_up())? {
                    Some(c) => {
                        self.core.on_response_chunk(c, ctx)?;
                        out.extend_from_slice(c);
                    }
                    None => done = true,
                }
            }
            down.write_body(&out).await.map_err(|e| e.into_down())?;
        }
        down.finish_body().await.map_err(|e| e.into_down())?;
        upstream.respect_keepalive();
        if let Some(stream) = upstream.reuse().await {
            self.pool.put(stream);
        }
        Ok(())
    }

    /// The forwarded request, header and body, as it goes on the wire: the caller's request line
    /// and headers less `replaced_upstream` and hop-by-hop ones, then `own_upstream_headers` and
    /// `content-length` (the body is complete by now).
    fn upstream_request(&self, req: &RequestHeader, ctx: &RequestCtx, body: &[u8]) -> Vec<u8> {
        let mut wire = Vec::with_capacity(512 + body.len());
        wire.extend_from_slice(req.method.as_str().as_bytes());
        wire.push(b' ');
        wire.extend_from_slice(req.raw_path());
        wire.extend_from_slice(b" HTTP/1.1\r\n");
        let mut caller_sent_api_key = false;
        let mut had_length = false;
        for (name, value) in req.headers.iter() {
            let name = name.as_str();
            match name {
                "content-length" => had_length = true,
                "x-api-key" => caller_sent_api_key = true,
                _ => {}
            }
            if HOP_BY_HOP.contains(&name) || self.core.replaced_upstream(name) {
                continue;
            }
            header_line(&mut wire, name, value.as_bytes());
        }
        self.core.own_upstream_headers(ctx, caller_sent_api_key, |name, value| {
            header_line(&mut wire, name, value.as_bytes())
        });
        if had_length || !body.is_empty() {
            let mut n = itoa::Buffer::new();
            header_line(&mut wire, "content-length", n.format(body.len()).as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        wire.extend_from_slice(body);
        wire
    }

    /// The answer's header for the client: the gateway's status and headers (less the
    /// connection-level ones; pingora writes `connection` and `date`) plus `response_headers`.
    /// Built fresh without pingora's header-case map: each insert there is two map inserts and a
    /// name parse, and the client needs no particular case.
    fn downstream_header(&self, from: &ResponseHeader, ctx: &RequestCtx) -> Result<Box<ResponseHeader>> {
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = from.status;
        parts.version = from.version;
        parts.headers.reserve(from.headers.len() + 4);
        for (name, value) in from.headers.iter() {
            if !matches!(name.as_str(), "connection" | "keep-alive" | "date") {
                parts.headers.append(name.clone(), value.clone());
            }
        }
        let mut bad = false;
        self.core.response_headers(ctx, |name, value| match HeaderValue::from_str(value) {
            Ok(v) => {
                parts.headers.insert(HeaderName::from_static(name), v);
            }
            Err(_) => bad = true,
        });
        if bad {
            return Error::e_explain(InvalidHTTPHeader, "response header value");
        }
        let mut resp = ResponseHeader::from(parts);
        if let Some(reason) = from.get_reason_phrase() {
            resp.set_reason_phrase(Some(reason))?;
        }
        Ok(Box::new(resp))
    }

    /// The request body to forward, complete and decided. `None` = refused (answer written).
    async fn request_body(&self, session: &mut ServerSession, ctx: &mut RequestCtx) -> Result<Option<Bytes>> {
        if ctx.route.is_some() && !ctx.deferred {
            // Read and decided in `inspect` (pingora's retry buffer holds it).
            return Ok(Some(ctx.new_body.take().or_else(|| session.get_retry_buffer()).unwrap_or_default()));
        }
        let limit = self.core.state.config.max_body_bytes;
        let mut held = bytes::BytesMut::new();
        super::continue_if_expected(session).await?;
        while let Some(chunk) = session.read_request_body().await.map_err(|e| e.into_down())? {
            if held.len() as u64 + chunk.len() as u64 > limit {
                let r = render(&Refusal::TooLarge { limit }, &ctx.request_id);
                self.core.respond(session, ctx, &r).await?;
                return Ok(None);
            }
            held.extend_from_slice(&chunk);
        }
        let full = held.freeze();
        if ctx.route.is_none() {
            return Ok(Some(full)); // passthrough: forwarded as sent
        }
        match Box::pin(self.core.decide_body(ctx, &full)).await {
            Ok(()) => Ok(Some(ctx.new_body.take().unwrap_or(full))),
            Err(refusal) => {
                self.core.respond(session, ctx, &render(&refusal, &ctx.request_id)).await?;
                Ok(None)
            }
        }
    }

    /// Sends the request on a pooled connection (once more on a fresh one when a pooled
    /// connection turns out closed) and reads the answer's header, watching the client meanwhile.
    async fn send(&self, wire: &[u8], session: &mut ServerSession) -> Result<UpstreamSession> {
        let mut reused = self.pool.take();
        loop {
            let was_reused = reused.is_some();
            let stream = match reused.take() {
                Some(s) => s,
                // Boxed: the connect future is several KiB and would otherwise make every
                // request's future (moved on each request) that much larger.
                None => Box::pin(self.connector.new_stream(&self.peer)).await.map_err(|e| e.into_up())?,
            };
            let attempt = async {
                let mut upstream = self.write_request(stream, wire).await?;
                loop {
                    Box::pin(upstream.read_response()).await?;
                    match upstream.resp_header().map(|h| h.status.as_u16()) {
                        Some(100..=199) => continue, // informational: the real answer follows
                        _ => return Ok::<_, Box<Error>>(upstream),
                    }
                }
            };
            let outcome = tokio::select! {
                biased;
                r = attempt => r,
                r = session.read_body_or_idle(true) => {
                    return Err(r.err().unwrap_or_else(|| Error::explain(ConnectionClosed, "client gone")).into_down());
                }
            };
            match outcome {
                Ok(upstream) => return Ok(upstream),
                Err(e) if was_reused && stale_connection(&e) => continue,
                Err(e) => return Err(e.into_up()),
            }
        }
    }

    /// Header and body in one write, then a client session to read the answer.
    async fn write_request(&self, mut stream: Stream, wire: &[u8]) -> Result<UpstreamSession> {
        let timeout = self.peer.options.write_timeout.unwrap_or(Duration::from_secs(60));
        let write = async {
            stream.write_all(wire).await?;
            stream.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::because(WriteError, "writing the request upstream", e)),
            Err(_) => return Error::e_explain(WriteTimedout, "writing the request upstream"),
        }
        let mut upstream = UpstreamSession::new_with_options(stream, &self.peer);
        upstream.read_timeout = self.peer.options.read_timeout;
        upstream.write_timeout = self.peer.options.write_timeout;
        Ok(upstream)
    }
}

/// Headers that describe one connection or this hop's framing, never forwarded: the body goes
/// out complete with its own `content-length`.
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "upgrade", "transfer-encoding", "expect", "content-length"];

fn header_line(wire: &mut Vec<u8>, name: &str, value: &[u8]) {
    wire.extend_from_slice(name.as_bytes());
    wire.extend_from_slice(b": ");
    wire.extend_from_slice(value);
    wire.extend_from_slice(b"\r\n");
}

/// Polls `f` once: its output if it is ready without waiting.
fn ready_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// An error that a gateway closing an idle keep-alive connection produces before any byte of
/// the answer: worth one more try on a new connection.
fn stale_connection(e: &Error) -> bool {
    matches!(e.etype(), ConnectionClosed | ReadError | WriteError | ConnectError)
}

#[async_trait]
impl HttpServerApp for LeanH1 {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if matches!(session, ServerSession::H1(_)) {
            self.serve(session, shutdown).await
        } else {
            self.proxy.process_new_http(session, shutdown).await
        }
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.proxy.h2_options.clone()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.proxy.server_options.as_ref()
    }

    async fn http_cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}
