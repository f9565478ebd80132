//! The sidecar's own HTTP/1 driver: the proxy listener's application. Each client connection is
//! one straight-line task that reads a request (`wire` parses it in place, no header map),
//! runs the phases on it (`inspect` decides before the gateway is contacted), writes the
//! forwarded request (head and body) in one write on a pooled gateway connection, and relays
//! the answer as it arrives: head and the body bytes that came with it in one client write,
//! then one write per read from the gateway, usage read on the way (`on_response_chunk`).
//! Connections that start with the HTTP/2 preface go to pingora's `HttpProxy` (h2c, the same
//! phases through `ProxyHttp`).
//!
//! Why not pingora's HTTP/1 session: its generic proxy path costs 2.4–2.9× nginx's CPU per hop
//! (`shared/reference/pingora_cost.md`), and even its session types alone (header maps, case
//! maps, boxed headers, per-request buffers) were a third of the sidecar's instructions.
//!
//! Behaviour worth knowing:
//! - every body is read and decided first (chunked ones too), then forwarded with
//!   `content-length`; `Expect: 100-continue` is answered right before the body is read;
//! - hop-by-hop headers are not forwarded; the gateway's `date` is replaced by the sidecar's;
//! - a close-delimited answer reaches an HTTP/1.1 client chunked (the connection stays); a
//!   chunked one reaches an HTTP/1.0 client de-chunked (then the connection closes);
//! - the client is watched while the gateway works: a client that goes away ends the exchange
//!   and `finish` settles at once; the whole exchange may not outlive
//!   `PREAUTH_UPSTREAM_TIMEOUT_SECONDS`; an idle client connection is closed after 60 s;
//! - a pooled gateway connection idle for a while is checked before it is used (a closed one is
//!   dropped, nothing sent on it); a request whose write fails is retried once on a new
//!   connection; one that was written and got no byte of answer is retried only when its method
//!   is idempotent (`GET` /v1/models) — an LLM POST the gateway may have received is never sent
//!   twice (it answers 502, as nginx does for non-idempotent requests).
//!
//! Owns: `LeanH1` (a pingora `ServerApp`), the client connection. Imports: the proxy phases,
//! `wire`, `pool`, pingora's stream, connector and h2 proxy.

mod pool;
pub mod wire;

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::Method;
use pingora::apps::ServerApp;
use pingora::connectors::TransportConnector;
use pingora::prelude::*;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use self::pool::{UpIo, Upstream, UpstreamPool, READ_BUF};
use self::wire::{Chunked, Framing, Relay, RequestBody, RequestHead, MAX_HEAD_BYTES};
use super::downstream::Downstream;
use super::respond::Refusal;
use super::{PreauthProxy, RequestCtx};

/// An idle client connection (no request started) is closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connecting to the gateway (what the TLS path's peer options say too).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head, and each step of reading a body, must arrive within this.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Client bytes buffered past the current request (pipelining) before the client is no longer
/// read while the gateway answers.
const MAX_PIPELINED: usize = MAX_HEAD_BYTES;
/// The HTTP/2 connection preface (RFC 9113 §3.4): such connections go to pingora.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bodies up to this size go out in the same write as the request head; larger ones in a write
/// of their own (no copy of them after the head).
const INLINE_BODY: usize = 64 * 1024;
/// A read is given at least this much room; less and the buffer grows first.
const READ_SLACK: usize = 1024;

/// Lingering close (as nginx's `lingering_timeout` / `lingering_time`): after an answer sent
/// before the request's body was read, what the client still sends is read and dropped until it
/// closes, pauses this long, or [`LINGER_MAX`] has passed.
const LINGER_IDLE: Duration = Duration::from_secs(5);
const LINGER_MAX: Duration = Duration::from_secs(30);

/// Closes a connection whose client may still be sending (a request answered before its body
/// was read: 401, 404, 413, a malformed head). Closing with unread bytes would make the kernel
/// reset the connection, and a client that writes its whole body before it reads (Node's fetch,
/// any client without `Expect: 100-continue`) would lose the answer already sent. So: stop
/// writing (FIN), then read and drop what arrives until the client closes, pauses
/// [`LINGER_IDLE`], [`LINGER_MAX`] passes, or the server shuts down.
async fn linger(io: &mut Stream, shutdown: &mut ShutdownWatch) {
    if io.shutdown().await.is_err() || *shutdown.borrow() {
        return;
    }
    let end = Instant::now() + LINGER_MAX;
    // Small, as nginx's lingering buffer (many connections may linger at once), and on the heap
    // only while lingering: in the task it would enlarge every connection's future.
    let mut sink = vec![0u8; 4096];
    loop {
        // Checked here, not by the read's timeout: a read that is always ready (a client sending
        // without pause) would never reach its timer.
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let pause = left.min(LINGER_IDLE);
        tokio::select! {
            read = tokio::time::timeout(pause, io.read(&mut sink)) => match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Whether field `name` (lowercase) is among those a `Connection` header value names (hop-by-hop
/// for this hop only, RFC 9110 §7.6.1); `connection` is `""` when it names none.
fn named_by_connection(connection: &str, name: &[u8]) -> bool {
    !connection.is_empty() && connection.split(',').any(|t| t.trim().as_bytes().eq_ignore_ascii_case(name))
}

/// Headers (lowercase) that describe one connection or this hop's framing, never forwarded to the
/// gateway: the body goes out complete with its own `content-length`.
fn request_hop_by_hop(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection"
            | b"keep-alive"
            | b"proxy-connection"
            | b"te"
            | b"upgrade"
            | b"transfer-encoding"
            | b"expect"
            | b"content-length"
    )
}

/// Gateway answer headers (lowercase) not forwarded to the client (the sidecar frames the answer
/// and sets its own `date`).
fn answer_hop_by_hop(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection" | b"keep-alive" | b"proxy-connection" | b"te" | b"upgrade" | b"transfer-encoding" | b"date"
    )
}

/// The proxy listener's application (see the module doc).
pub struct LeanH1 {
    /// Serves h2c connections; wraps the same `PreauthProxy` as `core`.
    h2: Arc<HttpProxy<PreauthProxy>>,
    core: PreauthProxy,
    peer: HttpPeer,
    connector: TransportConnector,
    pool: Arc<UpstreamPool>,
}

impl LeanH1 {
    pub fn new(h2: HttpProxy<PreauthProxy>, core: PreauthProxy) -> LeanH1 {
        let peer = core.peer();
        LeanH1 { h2: Arc::new(h2), core, peer, connector: TransportConnector::new(None), pool: UpstreamPool::new() }
    }

    fn upstream_deadline(&self, ctx: &RequestCtx) -> Instant {
        Instant::from_std(ctx.start) + Duration::from_secs(self.core.state.config.upstream_timeout_seconds)
    }

    /// One client connection, request after request.
    async fn serve(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) {
        let drain = &self.core.state.drain;
        let mut c = Client::new(io);
        // Declared after the client: forgotten by the drain before its socket closes.
        let _known = drain.client(c.io.id());
        let mut shutdown = shutdown.clone();
        let mut first = true;
        loop {
            if *shutdown.borrow() {
                return;
            }
            c.deadline.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
            match c.read_head(&mut shutdown).await {
                Head::Ready => {}
                Head::Closed => return,
                Head::Malformed(why) => {
                    if first && H2_PREFACE.starts_with(&c.buf[..c.buf.len().min(H2_PREFACE.len())]) {
                        // The whole preface first (within the read timeout): pingora's h2
                        // handshake waits for it with no deadline of its own.
                        while c.buf.len() < H2_PREFACE.len() {
                            if c.read_more().await.is_err() {
                                return;
                            }
                        }
                        if !c.buf.starts_with(H2_PREFACE) {
                            return;
                        }
                        return self.hand_to_h2(c, &shutdown).await;
                    }
                    tracing::debug!(why, "malformed request head");
                    let (ctx, r) = self.core.malformed();
                    c.close = true;
                    let _ = self.core.respond(&mut c, &ctx, &r).await;
                    linger(&mut c.io, &mut shutdown).await;
                    return;
                }
            }
            first = false;
            if *shutdown.borrow() || drain.is_draining() {
                c.close = true;
            }
            let in_flight = drain.counted();
            let mut ctx = RequestCtx::new();
            if let Err(e) = self.exchange(&mut c, &mut ctx).await {
                c.close = true;
                // Gone after its request reached the gateway: the call may be billed all the same
                // (`failure_answer` treats a gateway that timed out alike).
                ctx.body_forwarded = c.forwarded;
                ctx.unanswered_after_forward = c.forwarded && matches!(e.esource(), ErrorSource::Downstream);
                let refusal = ctx.pending_refusal.is_some() || matches!(e.etype(), HTTPStatus(_));
                let answer = self.core.failure_answer(&e, &mut ctx, c.answered);
                let status = answer.as_ref().map_or(0, |r| r.status);
                if !refusal && !matches!(e.esource(), ErrorSource::Downstream) {
                    tracing::warn!(error = %e, status, request_id = %ctx.request_id, "request failed");
                }
                if let Some(r) = answer {
                    // Settled and the lease released before the client has the answer (as for
                    // a relayed answer); the answer still names the hold it had.
                    let hold = ctx.reservation_id().map(str::to_owned);
                    self.core.conclude(&mut ctx).await;
                    if let Err(we) = self.core.respond_naming(&mut c, &ctx, &r, hold.as_deref()).await {
                        tracing::debug!(error = %we, "could not write error response; client gone");
                    }
                }
            }
            self.core.finish(&mut ctx).await;
            drop(in_flight);
            if c.close || !c.body_done || !c.head.keep_alive {
                if c.body_done {
                    let _ = c.io.shutdown().await;
                } else {
                    linger(&mut c.io, &mut shutdown).await;
                }
                return;
            }
            c.next_request();
        }
    }

    /// The connection opened with the HTTP/2 preface: pingora's proxy serves it (h2c).
    async fn hand_to_h2(self: &Arc<Self>, c: Client, shutdown: &ShutdownWatch) {
        // What was read goes back in front of the stream for pingora's h2 server to read again.
        let Ok(mut io) = c.io.into_any().downcast::<L4Stream>() else {
            tracing::debug!("h2c preface on a stream that cannot be rewound; closed");
            return;
        };
        io.rewind(&c.buf);
        let _ = ServerApp::process_new(&self.h2, io, shutdown).await;
    }

    /// Inspect and decide, forward, relay the answer. `Ok` = an answer was written in full.
    async fn exchange(&self, c: &mut Client, ctx: &mut RequestCtx) -> Result<()> {
        if self.core.inspect(c, ctx).await? {
            return Ok(());
        }
        let body = match ctx.new_body.take() {
            Some(b) => b,
            None => {
                // Pass-through routes: forwarded as sent.
                let limit = self.core.state.config.max_body_bytes;
                match c.read_body(limit).await? {
                    Some(b) => b,
                    None => {
                        let r = self.core.refusal(&Refusal::TooLarge { limit }, ctx);
                        return self.core.respond(c, ctx, &r).await;
                    }
                }
            }
        };
        let mut wire = std::mem::take(&mut c.wire);
        // A large body goes out as a second write rather than copied after the head: one copy
        // less of it in memory while it is in flight.
        let tail: &[u8] = if body.len() > INLINE_BODY { &body } else { &[] };
        self.upstream_request(c, ctx, &body, tail.is_empty(), &mut wire);
        c.deadline.as_mut().reset(self.upstream_deadline(ctx));
        let sent = self.send(c, &wire, tail, c.head.method.is_idempotent()).await;
        c.wire = wire;
        let up = sent?;
        self.relay(c, ctx, up).await
    }

    /// The forwarded request, head and body, as it goes on the wire: the caller's request line
    /// and headers less `replaced_upstream` and hop-by-hop ones, then `own_upstream_headers` and
    /// `content-length` (the body is complete by now), then the body when `inline`.
    fn upstream_request(&self, c: &Client, ctx: &RequestCtx, body: &[u8], inline: bool, wire: &mut Vec<u8>) {
        wire.clear();
        wire.reserve(512 + if inline { body.len() } else { 0 });
        let head = &c.head;
        wire.extend_from_slice(head.method.as_str().as_bytes());
        wire.push(b' ');
        wire.extend_from_slice(head.target(&c.buf));
        wire.extend_from_slice(b" HTTP/1.1\r\n");
        let mut caller_sent_api_key = false;
        let mut had_length = false;
        let mut lower = [0u8; 64];
        // Fields the client's `Connection` header names are hop-by-hop too (RFC 9110 §7.6.1).
        let named = if head.connection_names_fields { head.fields.get(&c.buf, "connection").unwrap_or("") } else { "" };
        for (name, value) in head.fields.iter(&c.buf) {
            let Some(lname) = lowercase(name, &mut lower) else {
                // Longer than any name the sidecar acts on.
                header_line(wire, name, value);
                continue;
            };
            match lname {
                b"content-length" => had_length = true,
                b"x-api-key" => caller_sent_api_key = true,
                _ => {}
            }
            if request_hop_by_hop(lname) || self.core.replaced_upstream(lname) || named_by_connection(named, lname) {
                continue;
            }
            header_line(wire, name, value);
        }
        self.core.own_upstream_headers(ctx, caller_sent_api_key, |name, value| {
            header_line(wire, name.as_bytes(), value.as_bytes())
        });
        if had_length || !body.is_empty() || head.body == RequestBody::Chunked {
            let mut n = itoa::Buffer::new();
            header_line(wire, b"content-length", n.format(body.len()).as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        if inline {
            wire.extend_from_slice(body);
        }
    }

    /// Sends the request on a pooled connection and reads the answer's head, watching the client
    /// meanwhile. A pooled connection that turns out closed is retried once on a new one when
    /// nothing reached the gateway (the write failed), or when the request is `idempotent`.
    async fn send(&self, c: &mut Client, wire: &[u8], tail: &[u8], idempotent: bool) -> Result<Upstream> {
        let mut reused = self.pool.take();
        loop {
            let was_reused = reused.is_some();
            let mut up = match reused.take() {
                Some(up) => up,
                None => {
                    // Boxed: the connect future is several KiB and would otherwise make every
                    // request's future (moved on each request) that much larger.
                    let io = match c.watch(Box::pin(self.connect())).await? {
                        Ok(io) => io,
                        Err(e) => return Err(e.into_up()),
                    };
                    Upstream::new(io)
                }
            };
            match self.attempt(c, &mut up, wire, tail).await {
                Ok(()) => return Ok(up),
                Err(Attempt::Unsent(_)) if was_reused => continue,
                Err(Attempt::Unanswered(_)) if was_reused && idempotent => continue,
                Err(Attempt::Unsent(e) | Attempt::Unanswered(e) | Attempt::Failed(e)) => return Err(e),
            }
        }
    }

    /// A new gateway connection: plain TCP directly (no delay, connect timeout of the peer), TLS
    /// through pingora's connector.
    async fn connect(&self) -> Result<UpIo> {
        if self.core.upstream_tls {
            return Ok(UpIo::Tls(self.connector.new_stream(&self.peer).await?));
        }
        let addr = self.core.upstream_addr;
        let connect = tokio::net::TcpStream::connect(addr);
        let io = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(Error::because(ConnectError, format!("connecting to the gateway {addr}"), e)),
            Err(_) => return Error::e_explain(ConnectTimedout, format!("connecting to the gateway {addr}")),
        };
        io.set_nodelay(true).or_err(ConnectError, "setting TCP_NODELAY on the gateway connection")?;
        Ok(UpIo::Tcp(io))
    }

    /// One try: the request out, the answer's head in (1xx answers skipped).
    async fn attempt(
        &self,
        c: &mut Client,
        up: &mut Upstream,
        wire: &[u8],
        tail: &[u8],
    ) -> std::result::Result<(), Attempt> {
        let write = async {
            up.io.write_all(wire).await?;
            if !tail.is_empty() {
                up.io.write_all(tail).await?;
            }
            up.io.flush().await
        };
        match c.watch(write).await.map_err(Attempt::Failed)? {
            Ok(()) => c.forwarded = true,
            Err(e) => {
                return Err(Attempt::Unsent(Error::because(WriteError, "writing the request upstream", e).into_up()))
            }
        }
        up.buf.clear();
        let mut got_any = false;
        loop {
            let n = c.read_upstream(up).await.map_err(Attempt::Failed)?;
            match n {
                Ok(0) if !got_any => {
                    return Err(Attempt::Unanswered(
                        Error::explain(ConnectionClosed, "the gateway closed the connection").into_up(),
                    ))
                }
                Ok(0) => {
                    return Err(Attempt::Failed(
                        Error::explain(ConnectionClosed, "the gateway closed the connection mid-answer").into_up(),
                    ))
                }
                Ok(_) => got_any = true,
                Err(e) if !got_any => {
                    return Err(Attempt::Unanswered(Error::because(ReadError, "reading the answer", e).into_up()))
                }
                Err(e) => return Err(Attempt::Failed(Error::because(ReadError, "reading the answer", e).into_up())),
            }
            loop {
                match up.head.parse(&up.buf) {
                    Ok(false) => break, // read more
                    Ok(true) if (100..200).contains(&up.head.status) => {
                        // Informational: the real answer follows.
                        up.buf.drain(..up.head.len);
                    }
                    Ok(true) => return Ok(()),
                    Err(why) => return Err(Attempt::Failed(Error::explain(InvalidHTTPHeader, why).into_up())),
                }
            }
        }
    }

    /// Relays the answer whose head is parsed in `up`: head and the body bytes that came with it
    /// in one client write, then what each read from the gateway brings.
    async fn relay(&self, c: &mut Client, ctx: &mut RequestCtx, mut up: Upstream) -> Result<()> {
        let head = &up.head;
        let content_type = head.fields.get(&up.buf, "content-type");
        self.core.on_upstream_response(head.status, content_type, ctx);
        // A stream whose usage chunk the client did not ask for is changed on the way: its data
        // is framed here (chunked to an HTTP/1.1 client, to the close to an HTTP/1.0 one).
        let stripping = ctx.spend.as_ref().is_some_and(|s| s.strip.is_some());
        let (framing, te_line) = if stripping {
            Framing::data_only(head.body, c.head.http10)
        } else {
            Framing::choose(head.body, c.head.http10)
        };
        let keeps = if stripping { !c.head.http10 } else { framing.keeps_client(head.body) };
        let keep_client = c.head.keep_alive && !c.close && keeps;

        let out = &mut c.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(n.format(head.status).as_bytes());
        out.push(b' ');
        out.extend_from_slice(head.reason(&up.buf));
        out.extend_from_slice(b"\r\n");
        let mut own: [(&'static str, &str); 4] = [("", ""); 4];
        let mut n_own = 0;
        self.core.response_headers(ctx, |name, value| {
            own[n_own] = (name, value);
            n_own += 1;
        });
        let own = &own[..n_own];
        let framed_by_length =
            !stripping && matches!(head.body, wire::ResponseBody::Length(_) | wire::ResponseBody::Empty);
        // Fields the gateway's `Connection` header names are hop-by-hop too (RFC 9110 §7.6.1).
        let named =
            if head.connection_names_fields { head.fields.get(&up.buf, "connection").unwrap_or("") } else { "" };
        let mut lower = [0u8; 64];
        for (name, value) in head.fields.iter(&up.buf) {
            let skip = lowercase(name, &mut lower).is_some_and(|n| {
                answer_hop_by_hop(n)
                    || (!framed_by_length && n == b"content-length")
                    || own.iter().any(|(o, _)| o.as_bytes() == n)
                    || named_by_connection(named, n)
            });
            if !skip {
                header_line(out, name, value);
            }
        }
        for (name, value) in own {
            header_line(out, name.as_bytes(), value.as_bytes());
        }
        if let Some(line) = te_line {
            out.extend_from_slice(line);
        }
        date_line(out);
        if !keep_client {
            out.extend_from_slice(b"connection: close\r\n");
        } else if c.head.http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");

        let mut relay = Relay::new(head.body, framing);
        let head_len = head.len;
        let mut spill = false;
        let (mut scanner, mut strip) = match ctx.spend.as_deref_mut() {
            Some(s) => (s.scanner.as_mut(), s.strip.as_mut()),
            None => (None, None),
        };
        let (mut data, mut kept) = (Vec::new(), Vec::new());
        let mut feed = |relay: &mut Relay, input: &[u8], out: &mut Vec<u8>| -> Result<()> {
            let to = if strip.is_some() { &mut data } else { &mut *out };
            let used = relay
                .feed(input, to, |d| {
                    if let Some(s) = scanner.as_mut() {
                        s.feed(d);
                    }
                })
                .map_err(|why| Error::explain(InvalidHTTPHeader, why).into_up())?;
            spill |= used < input.len();
            if let Some(s) = strip.as_mut() {
                let done = relay.is_done();
                s.feed(&data, done, &mut kept);
                data.clear();
                if te_line.is_some() {
                    wire::push_chunk(out, &kept);
                    if done {
                        out.extend_from_slice(wire::LAST_CHUNK);
                    }
                } else {
                    out.extend_from_slice(&kept);
                }
                kept.clear();
                if done {
                    strip = None;
                }
            }
            Ok(())
        };
        feed(&mut relay, &up.buf[head_len..], &mut c.out)?;
        c.answered = true;
        loop {
            if relay.is_done() {
                // The whole answer is read: settle and release the lease before the client has
                // the last byte (a client that sends its next request right then finds this
                // one's lease free), then write it; `serve` writes the settlement's lines next.
                self.core.conclude(ctx).await;
                c.write_out().await?;
                break;
            }
            if !c.out.is_empty() {
                c.write_out().await?;
            }
            up.buf.clear();
            match c.read_upstream(&mut up).await? {
                Ok(0) => {
                    relay.eof(&mut c.out).map_err(|why| Error::explain(ConnectionClosed, why).into_up())?;
                    // The end of a close-delimited body, for a body changed on the way.
                    feed(&mut relay, &[], &mut c.out)?;
                }
                Ok(_) => feed(&mut relay, &up.buf, &mut c.out)?,
                Err(e) => return Err(Error::because(ReadError, "reading the answer", e).into_up()),
            }
        }
        c.close |= !keep_client;
        if up.head.reusable && !spill {
            self.pool.put(up);
        }
        Ok(())
    }
}

/// How one try on a gateway connection failed.
enum Attempt {
    /// Writing the request failed: the gateway had closed the connection, nothing was taken.
    Unsent(Box<Error>),
    /// Written, then closed or reset before any byte of the answer: the gateway may or may not
    /// have acted on it.
    Unanswered(Box<Error>),
    Failed(Box<Error>),
}

#[async_trait]
impl ServerApp for LeanH1 {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        self.serve(io, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        pingora::apps::HttpServerApp::http_cleanup(&*self.h2).await;
    }
}

/// What waiting for a request head ended with.
enum Head {
    Ready,
    /// Closed, idle too long, or shutting down: nothing to answer.
    Closed,
    Malformed(&'static str),
}

/// One client connection: its buffers and the state of the request in progress.
struct Client {
    io: Stream,
    /// Bytes read and not yet done with: the current request from its head on, then whatever
    /// the client sent after it.
    buf: Vec<u8>,
    head: RequestHead,
    /// Bytes of `buf` that belong to the current request (its head, and its body once read).
    used: usize,
    /// The request's body was read to its end.
    body_done: bool,
    /// `100 Continue` was sent for this request.
    continued: bool,
    /// A final answer head was written for this request.
    answered: bool,
    /// The request was written to the gateway (it may be billed even if the client goes away).
    forwarded: bool,
    /// Close the connection after this request.
    close: bool,
    /// The current client write.
    out: Vec<u8>,
    /// The forwarded request (kept for its capacity).
    wire: Vec<u8>,
    /// The current phase's deadline (idle, head, body, gateway exchange).
    deadline: Pin<Box<Sleep>>,
}

impl Client {
    fn new(io: Stream) -> Client {
        Client {
            io,
            buf: Vec::with_capacity(4096),
            head: RequestHead::default(),
            used: 0,
            body_done: false,
            continued: false,
            answered: false,
            forwarded: false,
            close: false,
            out: Vec::with_capacity(1024),
            wire: Vec::new(),
            deadline: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
        }
    }

    /// Forgets the finished request, keeping what the client sent after it.
    fn next_request(&mut self) {
        self.buf.drain(..self.used);
        if self.buf.capacity() > 64 * 1024 && self.buf.len() < 4096 {
            self.buf.shrink_to(4096);
        }
        self.used = 0;
        self.body_done = false;
        self.continued = false;
        self.answered = false;
        self.forwarded = false;
        if self.out.capacity() > 64 * 1024 {
            self.out = Vec::with_capacity(1024);
        }
        if self.wire.capacity() > 64 * 1024 {
            self.wire = Vec::new();
        }
    }

    /// Reads until a whole request head is in `buf` (within the idle timeout, or until shutdown).
    async fn read_head(&mut self, shutdown: &mut ShutdownWatch) -> Head {
        loop {
            if !self.buf.is_empty() {
                match self.head.parse(&self.buf) {
                    Ok(true) => {
                        self.used = self.head.len;
                        self.body_done = self.head.body == RequestBody::Length(0);
                        return Head::Ready;
                    }
                    Ok(false) => {}
                    Err(why) => return Head::Malformed(why),
                }
            }
            let idle = self.buf.is_empty();
            let read = {
                let (io, buf, deadline) = (&mut self.io, &mut self.buf, &mut self.deadline);
                let mut changed = pin!(shutdown.changed());
                poll_fn(|cx| {
                    if let Poll::Ready(r) = poll_read(io, buf, cx) {
                        return Poll::Ready(Some(r));
                    }
                    if deadline.as_mut().poll(cx).is_ready() || (idle && changed.as_mut().poll(cx).is_ready()) {
                        return Poll::Ready(None);
                    }
                    Poll::Pending
                })
                .await
            };
            match read {
                Some(Ok(n)) if n > 0 => {
                    if idle {
                        self.deadline.as_mut().reset(Instant::now() + READ_TIMEOUT);
                    }
                }
                _ => return Head::Closed,
            }
        }
    }

    /// Reads more of the request body into `buf` (within the read timeout).
    async fn read_more(&mut self) -> Result<()> {
        self.deadline.as_mut().reset(Instant::now() + READ_TIMEOUT);
        let (io, buf, deadline) = (&mut self.io, &mut self.buf, &mut self.deadline);
        let r = poll_fn(|cx| {
            if let Poll::Ready(r) = poll_read(io, buf, cx) {
                return Poll::Ready(Some(r));
            }
            deadline.as_mut().poll(cx).map(|()| None)
        })
        .await;
        match r {
            Some(Ok(0)) => {
                Error::e_explain(ConnectionClosed, "client closed the connection mid-body").map_err(|e| e.into_down())
            }
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(Error::because(ReadError, "reading the request body", e).into_down()),
            None => Error::e_explain(ReadTimedout, "reading the request body").map_err(|e| e.into_down()),
        }
    }

    /// Runs `f` while watching the client and the deadline: `Err` when the client goes away (or
    /// breaks protocol) or the deadline passes first.
    async fn watch<F: Future>(&mut self, f: F) -> Result<F::Output> {
        let mut f = pin!(f);
        let (io, buf, used, deadline) = (&mut self.io, &mut self.buf, self.used, &mut self.deadline);
        poll_fn(|cx| {
            if let Poll::Ready(v) = f.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            if let Poll::Ready(e) = poll_client_gone(io, buf, used, cx) {
                return Poll::Ready(Err(e));
            }
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Error::explain(ReadTimedout, "PREAUTH_UPSTREAM_TIMEOUT_SECONDS exceeded")));
            }
            Poll::Pending
        })
        .await
    }

    /// One read from the gateway into `up.buf`, watching the client and the deadline.
    async fn read_upstream(&mut self, up: &mut Upstream) -> Result<std::io::Result<usize>> {
        let (io, buf) = (&mut up.io, &mut up.buf);
        self.watch(poll_fn(|cx| poll_read(io, buf, cx))).await
    }

    /// Writes `out` to the client (within the deadline) and empties it.
    async fn write_out(&mut self) -> Result<()> {
        let (io, out, deadline) = (&mut self.io, &self.out, &mut self.deadline);
        let write = async {
            io.write_all(out).await?;
            io.flush().await
        };
        let mut write = pin!(write);
        let r = poll_fn(|cx| {
            if let Poll::Ready(r) = write.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            deadline.as_mut().poll(cx).map(|()| None)
        })
        .await;
        self.out.clear();
        match r {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(Error::because(WriteError, "writing to the client", e).into_down()),
            None => Error::e_explain(WriteTimedout, "writing to the client").map_err(|e| e.into_down()),
        }
    }
}

impl Downstream for Client {
    fn method(&self) -> &Method {
        &self.head.method
    }

    fn path(&self) -> &str {
        self.head.path(&self.buf)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.fields.get(&self.buf, name)
    }

    fn header_count(&self, name: &str) -> usize {
        self.head.fields.values(&self.buf, name).count()
    }

    fn forwards_read_body(&self) -> bool {
        true
    }

    async fn read_body(&mut self, limit: u64) -> Result<Option<Bytes>> {
        let start = self.head.len;
        match self.head.body {
            RequestBody::Length(n) => {
                if n > limit {
                    return Ok(None);
                }
                let end = start + n as usize;
                if self.buf.len() < end {
                    // Room for the whole declared body at once (and the read slack), not grown
                    // by halves past it.
                    self.buf.reserve_exact((end + READ_SLACK).saturating_sub(self.buf.len()));
                    self.continue_if_expected().await?;
                    while self.buf.len() < end {
                        self.read_more().await?;
                    }
                }
                self.used = end;
                self.body_done = true;
                Ok(Some(Bytes::copy_from_slice(&self.buf[start..end])))
            }
            RequestBody::Chunked => {
                // Framing bytes (chunk sizes, extensions, trailers) stay in `buf` with the data
                // until the body is decided: bounded too, or tiny chunks with long extensions
                // would buffer thousands of times the body limit.
                let wire_limit = limit.saturating_mul(2).saturating_add(64 * 1024);
                let mut decoder = Chunked::default();
                let mut body = Vec::new();
                let mut at = start;
                loop {
                    let mut over = false;
                    let used = decoder
                        .feed(&self.buf[at..], |d| {
                            if body.len() as u64 + d.len() as u64 > limit {
                                over = true;
                            } else {
                                body.extend_from_slice(d);
                            }
                        })
                        .map_err(|why| Error::explain(HTTPStatus(400), why))?;
                    at += used;
                    self.used = at;
                    if over {
                        return Ok(None);
                    }
                    if decoder.is_done() {
                        self.body_done = true;
                        return Ok(Some(Bytes::from(body)));
                    }
                    if (self.buf.len() - start) as u64 > wire_limit {
                        return Ok(None);
                    }
                    self.continue_if_expected().await?;
                    self.read_more().await?;
                }
            }
        }
    }

    async fn answer(&mut self, status: u16, headers: &[(&'static str, &str)], body: &[u8]) -> Result<()> {
        if !self.body_done {
            // A request refused for who sent it or where (401, 404) whose body has already
            // arrived whole: the body is skipped, and the connection stays for the requests
            // pipelined after it (as nginx answers them). A body still on its way would be taken
            // for the next request, and a 400 or 413 questions the framing itself: the
            // connection closes, lingering.
            if let (RequestBody::Length(n), 401 | 404) = (self.head.body, status) {
                let end = usize::try_from(n).ok().and_then(|n| n.checked_add(self.head.len));
                if let Some(end) = end.filter(|end| *end <= self.buf.len()) {
                    self.used = end;
                    self.body_done = true;
                }
            }
            self.close |= !self.body_done;
        }
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(n.format(status).as_bytes());
        out.push(b' ');
        let reason = http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            header_line(out, name.as_bytes(), value.as_bytes());
        }
        header_line(out, b"content-length", n.format(body.len()).as_bytes());
        date_line(out);
        if self.close || !self.head.keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if self.head.http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if self.head.method != Method::HEAD {
            // An answer to HEAD has no content (RFC 9110 §9.3.2); the client would read it as
            // the start of the next answer.
            out.extend_from_slice(body);
        }
        self.answered = true;
        self.write_out().await
    }
}

impl Client {
    /// Answers `Expect: 100-continue` once, before the body is read, so that clients that wait
    /// for it (curl, SDKs sending large bodies) send the body at once, not after their timeout.
    async fn continue_if_expected(&mut self) -> Result<()> {
        if self.head.expect_continue && !self.continued && !self.answered {
            self.continued = true;
            self.out.clear();
            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            self.write_out().await?;
        }
        Ok(())
    }
}

/// One read into `buf`'s spare room (grown to a useful size first).
fn poll_read<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut Vec<u8>,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_SLACK {
        buf.reserve(READ_BUF.max(buf.len() / 2));
    }
    pin!(io.read_buf(buf)).poll(cx)
}

/// Whether the client went away: reads what it sends meanwhile (pipelined requests stay in
/// `buf`, up to `MAX_PIPELINED`); `Ready` on its close or a read error.
fn poll_client_gone(io: &mut Stream, buf: &mut Vec<u8>, used: usize, cx: &mut Context<'_>) -> Poll<Box<Error>> {
    loop {
        if buf.len() - used > MAX_PIPELINED {
            return Poll::Pending; // stop reading; the other futures wake the task
        }
        match poll_read(io, buf, cx) {
            Poll::Ready(Ok(0)) => {
                return Poll::Ready(Error::explain(ConnectionClosed, "client closed the connection").into_down())
            }
            Poll::Ready(Ok(_)) => continue,
            Poll::Ready(Err(e)) => return Poll::Ready(Error::because(ReadError, "client connection", e).into_down()),
            Poll::Pending => return Poll::Pending,
        }
    }
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `name` in lowercase in `buf` (`None` when longer than `buf`). Bytes, not `str`: a UTF-8
/// check per header line costs more than the lowercasing, and the names compared against are
/// ASCII.
fn lowercase<'b>(name: &[u8], buf: &'b mut [u8; 64]) -> Option<&'b [u8]> {
    let out = buf.get_mut(..name.len())?;
    for (o, b) in out.iter_mut().zip(name) {
        *o = b.to_ascii_lowercase();
    }
    Some(out)
}

/// `date: <IMF-fixdate>\r\n` for now, formatted once per second per thread.
fn date_line(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(sec, text)| {
        if *sec != now {
            *sec = now;
            *text = imf_fixdate(now);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
    });
}

/// RFC 9110 §5.6.7 date, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn imf_fixdate(unix_s: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] =
        [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"];
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    let (y, m, d) = crate::decide::time::civil_from_days(days);
    let mut o = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    o[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    let two = |o: &mut [u8], v: u64| {
        o[0] = b'0' + (v / 10) as u8;
        o[1] = b'0' + (v % 10) as u8;
    };
    two(&mut o[5..7], u64::from(d));
    o[8..11].copy_from_slice(MONTHS[(m - 1) as usize]);
    let y = y.clamp(0, 9999) as u64;
    two(&mut o[12..14], y / 100);
    two(&mut o[14..16], y % 100);
    two(&mut o[17..19], secs / 3600);
    two(&mut o[20..22], secs / 60 % 60);
    two(&mut o[23..25], secs % 60);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(&imf_fixdate(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&imf_fixdate(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&imf_fixdate(1_796_329_966), b"Thu, 03 Dec 2026 20:32:46 GMT");
    }

    #[test]
    fn lowercase_names() {
        let mut b = [0u8; 64];
        assert_eq!(lowercase(b"X-Api-KEY", &mut b), Some(&b"x-api-key"[..]));
        assert_eq!(lowercase(&[b'a'; 65], &mut b), None);
    }
}
