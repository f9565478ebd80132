//! Time sources. Production code reads time only through a [`Clock`], so tests can move it.
//!
//! Owns: `Clock`, `SystemClock`, `ManualClock`. Imports: std, `decide::time`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::decide::UnixMillis;

pub trait Clock: Send + Sync {
    /// Wall-clock time, Unix milliseconds (UTC).
    fn now_ms(&self) -> UnixMillis;
    /// Wall-clock time, Unix microseconds (event timestamps).
    fn now_us(&self) -> u64 {
        self.now_ms() * 1000
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> UnixMillis {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
    fn now_us(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start: UnixMillis) -> ManualClock {
        ManualClock(AtomicU64::new(start))
    }
    pub fn set(&self, t: UnixMillis) {
        self.0.store(t, Ordering::SeqCst);
    }
    pub fn advance_ms(&self, d: u64) {
        self.0.fetch_add(d, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> UnixMillis {
        self.0.load(Ordering::SeqCst)
    }
}
