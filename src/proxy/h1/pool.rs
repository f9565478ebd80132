//! Idle connections to the gateway, most recently used first out, each with the buffers it
//! keeps between requests. Connections idle for [`POOL_IDLE`] are closed by a sweep every
//! second, also while no request comes (a gateway that closed them would otherwise leave them
//! in CLOSE_WAIT until the next request).
//!
//! Owns: `Upstream`, `UpIo`, `UpstreamPool`. Imports: pingora's stream, tokio's TCP stream and
//! I/O traits, the wire format.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
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
/// A pooled connection idle longer than this is also checked with a non-blocking read before
/// reuse: gateways close idle keep-alive connections after seconds, and a request written on a
/// closed one cannot be retried safely. Every reused connection gets the check that costs no
/// system call (has the runtime seen the gateway's FIN?); under load connections come back
/// within milliseconds and skip the read.
const CHECK_IDLE_AFTER: Duration = Duration::from_millis(100);
/// How often idle connections past [`POOL_IDLE`] are closed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
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

impl UpIo {
    /// Whether this idle connection still looks usable: the runtime has not seen the gateway
    /// close it and, with `probe`, a non-blocking read finds neither a close nor bytes (an idle
    /// connection carries none; any would be out of protocol). Never waits.
    pub fn is_open(&mut self, probe: bool) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        match self {
            UpIo::Tcp(s) => {
                // The readiness the runtime recorded (no system call): FIN or RST seen?
                let ready = std::pin::pin!(s.ready(tokio::io::Interest::READABLE));
                match ready.poll(&mut cx) {
                    Poll::Ready(Ok(r)) if r.is_read_closed() || r.is_error() => false,
                    Poll::Ready(Err(_)) => false,
                    Poll::Pending => true, // nothing has arrived since the last read
                    Poll::Ready(Ok(_)) if !probe => true,
                    Poll::Ready(Ok(_)) => {
                        matches!(s.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
                    }
                }
            }
            UpIo::Tls(s) if probe => {
                let mut buf = ReadBuf::new(&mut byte);
                // Pending: no application data and no close (TLS records such as session
                // tickets are consumed on the way).
                Pin::new(s).poll_read(&mut cx, &mut buf).is_pending()
            }
            UpIo::Tls(_) => true,
        }
    }
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
    /// A pool, swept every [`SWEEP_EVERY`] by a thread of its own while the pool lives.
    pub fn new() -> Arc<UpstreamPool> {
        let pool = Arc::new(UpstreamPool { idle: parking_lot::Mutex::new(Vec::with_capacity(POOL_SIZE)) });
        let weak = Arc::downgrade(&pool);
        let _ = std::thread::Builder::new().name("upstream-pool".into()).spawn(move || loop {
            std::thread::sleep(SWEEP_EVERY);
            match weak.upgrade() {
                Some(pool) => pool.sweep(),
                None => return,
            }
        });
        pool
    }

    /// Closes the connections idle for [`POOL_IDLE`] or longer (the oldest come first).
    pub fn sweep(&self) {
        let expired: Vec<(Upstream, Instant)> = {
            let mut idle = self.idle.lock();
            let fresh = idle.iter().position(|(_, since)| since.elapsed() < POOL_IDLE).unwrap_or(idle.len());
            idle.drain(..fresh).collect()
        };
        drop(expired); // closed outside the lock
    }

    /// The most recently used connection if it has been idle for less than `POOL_IDLE` and is
    /// still open; when it has been idle longer, every connection is older still and all are
    /// dropped (closed).
    pub fn take(&self) -> Option<Upstream> {
        loop {
            let (mut up, idle_for) = {
                let mut idle = self.idle.lock();
                match idle.pop().map(|(up, since)| (up, since.elapsed())) {
                    Some((up, idle_for)) if idle_for < POOL_IDLE => (up, idle_for),
                    _ => {
                        idle.clear();
                        return None;
                    }
                }
            };
            if up.io.is_open(idle_for >= CHECK_IDLE_AFTER) {
                return Some(up);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_sweep_closes_connections_idle_too_long_and_keeps_the_others() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = UpstreamPool::new();
        let mut far_ends = Vec::new();
        for idle_for in [POOL_IDLE + Duration::from_secs(1), Duration::ZERO] {
            let near = TcpStream::connect(addr).await.unwrap();
            far_ends.push(listener.accept().await.unwrap().0);
            pool.idle.lock().push((Upstream::new(UpIo::Tcp(near)), Instant::now() - idle_for));
        }
        pool.sweep();
        assert_eq!(pool.idle.lock().len(), 1, "the fresh connection stays");
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), far_ends[0].read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(closed, 0, "the old connection was closed");
        assert!(pool.take().is_some());
    }
}
