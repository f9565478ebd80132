//! Draining on `SIGTERM`: the requests in flight finish, then the process exits — at once when
//! none is left, not after a fixed wait. Requests still running at the deadline (a long stream)
//! are ended by shutting their client connections down: each exchange then ends as a client
//! that went away does, settling its hold from what was seen and releasing its lease, before
//! the runtimes stop (which would drop it with its hold still active).
//!
//! Owns: `Drain` (in-flight count, open client connections, the draining flag), `Counted` and
//! `ClientConn` guards. Imports: std, tokio (sleep), nix (shutdown(2)), tracing.

use std::collections::HashSet;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long, within the drain's deadline, ended connections get to settle before the runtimes
/// stop.
pub const SETTLE_AFTER_CUT: Duration = Duration::from_secs(2);
/// How often the drain looks at the in-flight count.
const POLL: Duration = Duration::from_millis(20);

#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    /// File descriptors of open client connections (HTTP/1 and h2c). A connection removes its
    /// own before its socket closes, under this lock, so every fd here is open while it is held.
    clients: parking_lot::Mutex<HashSet<RawFd>>,
}

/// One request in flight, counted while it lives (owned: pingora's h2c context keeps it too).
pub struct Counted(Arc<Drain>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One open client connection, known to the drain while it lives. Drop it before the socket.
pub struct ClientConn<'a>(&'a Drain, RawFd);

impl Drop for ClientConn<'_> {
    fn drop(&mut self) {
        self.0.clients.lock().remove(&self.1);
    }
}

impl Drain {
    pub fn counted(self: &Arc<Self>) -> Counted {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Counted(self.clone())
    }

    pub fn client(&self, fd: RawFd) -> ClientConn<'_> {
        self.clients.lock().insert(fd);
        ClientConn(self, fd)
    }

    /// True once draining began: connections close after their current request.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Waits for the requests in flight to finish, at most `deadline` less
    /// [`SETTLE_AFTER_CUT`]; then ends those left by shutting their client connections down and
    /// gives them the rest to settle. Returns how many were cut.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        self.wait_idle(deadline.saturating_sub(SETTLE_AFTER_CUT)).await;
        let left = self.in_flight();
        if left == 0 {
            return 0;
        }
        tracing::warn!(
            in_flight = left,
            "drain deadline passed: ending the requests still in flight (settled from what was seen)"
        );
        {
            let clients = self.clients.lock();
            for &fd in clients.iter() {
                let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
            }
        }
        self.wait_idle(SETTLE_AFTER_CUT).await;
        left
    }

    /// Until no request is in flight, at most `at_most`.
    async fn wait_idle(&self, at_most: Duration) {
        let until = tokio::time::Instant::now() + at_most;
        while self.in_flight() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(POLL).await;
        }
    }
}
