//! Idle connections to the gateway, most recently used first out, each with the buffers it
//! keeps between requests.
//!
//! Owns: `Upstream`, `UpIo`, `UpstreamPool`. Imports: pingora's stream, tokio's TCP stream and
//! I/O traits, the wire format.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pingora::protocols::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::wire::ResponseHead;

/// Idle upstream connections kept for reuse.
const POOL_SIZE: usize = 256;
/// An idle upstream connection older than this is closed instead of reused: below the 5 s
/// keep-alive of common servers (Node.js), so a reused connection is rarely one the gateway is
/// closing. Under load connections come back within milliseconds.
const POOL_IDLE: Duration = Duration::from_secs(4);
/// Read buffer of a gateway connection; larger buffers are not kept in the pool.
pub const READ_BUF: usize = 16 * 1024;

/// A connection to the gateway with its read buffer and the last answer's parsed head.
pub struct Upstream {
    pub io: UpIo,
    pub buf: Vec<u8>,
    pub head: ResponseHead,
}

impl Upstream {
    pub fn new(io: UpIo) -> Upstream {
        Upstream { io, buf: Vec::with_capacity(READ_BUF), head: ResponseHead::default() }
    }
}

/// The byte stream of a gateway connection. A plain TCP gateway is read and written directly:
/// pingora's `Stream` adds, on every call, a dynamic dispatch, a buffered-writer layer and time
/// bookkeeping that reads the clock around every read that waits. TLS goes through pingora's
/// stream (its connector does the handshake, SNI and verification).
pub enum UpIo {
    Tcp(TcpStream),
    Tls(Stream),
}

impl AsyncRead for UpIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpIo::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

pub struct UpstreamPool {
    idle: parking_lot::Mutex<Vec<(Upstream, Instant)>>,
}

impl UpstreamPool {
    pub fn new() -> UpstreamPool {
        UpstreamPool { idle: parking_lot::Mutex::new(Vec::with_capacity(POOL_SIZE)) }
    }

    /// The most recently used connection if it has been idle for less than `POOL_IDLE`; when it
    /// has not, every connection is older still and all are dropped (closed).
    pub fn take(&self) -> Option<Upstream> {
        let mut idle = self.idle.lock();
        match idle.pop() {
            Some((up, since)) if since.elapsed() < POOL_IDLE => Some(up),
            _ => {
                idle.clear();
                None
            }
        }
    }

    pub fn put(&self, mut up: Upstream) {
        up.buf.clear();
        if up.buf.capacity() > 4 * READ_BUF {
            up.buf = Vec::with_capacity(READ_BUF);
        }
        let mut idle = self.idle.lock();
        if idle.len() < POOL_SIZE {
            idle.push((up, Instant::now()));
        }
    }
}
