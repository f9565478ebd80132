//! A circuit breaker in front of the shared store: after `failure_threshold` consecutive failures
//! that span at least `min_outage` (no call succeeded for that long), it opens for `cool_down`,
//! during which every call fails at once (no network, no timeout); then it lets exactly one probe
//! through (half-open) and closes on its success or re-opens on its failure. A dead Redis thus
//! costs microseconds per request instead of a store timeout.
//!
//! `min_outage` keeps a stall from reading as an outage: Redis that stops answering for a few
//! tens of milliseconds (starved of CPU, a slow command, a burst queued ahead) fails the calls
//! sent meanwhile all together, and without it five of those opened the breaker and refused
//! every request for the whole `cool_down` (measured: 256 concurrent clients on one replica,
//! over half of all requests refused by the open breaker). Now the stalled calls take the
//! failsafe path each and the requests after the stall are served.
//!
//! Calls take a [`Permit`] and report on it; a permit dropped without a report (the caller's
//! future was cancelled, e.g. by the gate timeout) counts as a failure, so a lost probe can never
//! leave the breaker stuck half-open.
//!
//! Owns: `Breaker`, `BreakerConfig`, `Permit`. Imports: parking_lot, std.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Tuning of the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker. Default 5.
    pub failure_threshold: u32,
    /// How long it stays open before a probe is let through. Default 1 s.
    pub cool_down: Duration,
    /// How long the failures must have lasted (from the first of the streak) to open it.
    /// Default 250 ms.
    pub min_outage: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            cool_down: Duration::from_secs(1),
            min_outage: Duration::from_millis(250),
        }
    }
}

/// Where the breaker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Failing fast until the cool-down ends.
    Open,
    /// The cool-down ended: one probe may go (or is out).
    HalfOpen,
}

#[derive(Debug)]
struct Inner {
    consecutive_failures: u32,
    /// When the current streak of failures began (`None`: the last call succeeded).
    failing_since: Option<Instant>,
    /// Set while open: when the next probe may go.
    open_until: Option<Instant>,
    probe_out: bool,
}

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
    /// How many times it opened (a fresh connection is made once per opening).
    openings: AtomicU64,
}

/// Leave to make one call; report with [`Permit::success`] or [`Permit::failure`].
#[must_use]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: bool,
}

impl Permit<'_> {
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.on_success();
    }

    pub fn failure(mut self) {
        self.reported = true;
        self.breaker.on_failure(self.probe);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.breaker.on_failure(self.probe);
        }
    }
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Breaker {
        Breaker {
            cfg: BreakerConfig { failure_threshold: cfg.failure_threshold.max(1), ..cfg },
            inner: Mutex::new(Inner {
                consecutive_failures: 0,
                failing_since: None,
                open_until: None,
                probe_out: false,
            }),
            openings: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> BreakerConfig {
        self.cfg
    }

    /// A permit, or `None` while open (or while half-open with the probe already out).
    pub fn try_acquire(&self) -> Option<Permit<'_>> {
        let mut g = self.inner.lock();
        let probe = match g.open_until {
            None => false,
            Some(until) => {
                if g.probe_out || Instant::now() < until {
                    return None;
                }
                g.probe_out = true;
                true
            }
        };
        Some(Permit { breaker: self, probe, reported: false })
    }

    pub fn state(&self) -> BreakerState {
        let g = self.inner.lock();
        match g.open_until {
            None => BreakerState::Closed,
            Some(until) if !g.probe_out && Instant::now() < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.inner.lock().open_until.is_none()
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.inner.lock().consecutive_failures
    }

    /// How many times the breaker opened since it was made.
    pub fn openings(&self) -> u64 {
        self.openings.load(Ordering::Relaxed)
    }

    fn on_success(&self) {
        let mut g = self.inner.lock();
        if g.open_until.is_some() {
            tracing::info!("state store reachable again: circuit closed");
        }
        g.consecutive_failures = 0;
        g.failing_since = None;
        g.open_until = None;
        g.probe_out = false;
    }

    /// Opens it now (Redis unreachable at start-up): calls fail fast until a probe succeeds.
    pub fn force_open(&self) {
        let mut g = self.inner.lock();
        if g.open_until.is_none() {
            g.open_until = Some(Instant::now() + self.cfg.cool_down);
            self.openings.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_failure(&self, probe: bool) {
        let mut g = self.inner.lock();
        let now = Instant::now();
        g.consecutive_failures = g.consecutive_failures.saturating_add(1);
        let since = *g.failing_since.get_or_insert(now);
        if probe {
            g.probe_out = false;
            g.open_until = Some(now + self.cfg.cool_down);
        } else if g.open_until.is_none()
            && g.consecutive_failures >= self.cfg.failure_threshold
            && now.duration_since(since) >= self.cfg.min_outage
        {
            g.open_until = Some(now + self.cfg.cool_down);
            self.openings.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                failures = g.consecutive_failures,
                cool_down_ms = self.cfg.cool_down.as_millis() as u64,
                "state store failing: circuit open"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Breaker {
        Breaker::new(BreakerConfig {
            failure_threshold: 3,
            cool_down: Duration::from_millis(30),
            min_outage: Duration::ZERO,
        })
    }

    #[test]
    fn a_stall_shorter_than_min_outage_does_not_open_it() {
        let b = Breaker::new(BreakerConfig {
            failure_threshold: 3,
            cool_down: Duration::from_secs(5),
            min_outage: Duration::from_millis(60),
        });
        // A stall: many calls fail together, then Redis answers again.
        for _ in 0..20 {
            b.try_acquire().unwrap().failure();
        }
        assert!(b.is_closed(), "failing for less than min_outage is a stall");
        b.try_acquire().unwrap().success();
        std::thread::sleep(Duration::from_millis(70));
        // The streak restarted at the success: a new one must last min_outage again.
        b.try_acquire().unwrap().failure();
        assert!(b.is_closed());
        std::thread::sleep(Duration::from_millis(70));
        b.try_acquire().unwrap().failure();
        assert!(b.is_closed(), "below the threshold count");
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open, "threshold reached, failing for longer than min_outage");
        assert_eq!(b.openings(), 1);
    }

    #[test]
    fn force_open_fails_fast_until_a_probe_succeeds() {
        let b = quick();
        b.force_open();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_none());
        std::thread::sleep(Duration::from_millis(40));
        b.try_acquire().expect("probe").success();
        assert!(b.is_closed());
    }

    #[test]
    fn opens_after_threshold_and_fails_fast() {
        let b = quick();
        for _ in 0..2 {
            b.try_acquire().unwrap().failure();
        }
        assert!(b.is_closed());
        b.try_acquire().unwrap().success();
        assert_eq!(b.consecutive_failures(), 0, "a success resets the count");
        for _ in 0..3 {
            b.try_acquire().unwrap().failure();
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_none());
        assert_eq!(b.openings(), 1);
    }

    #[test]
    fn half_open_lets_one_probe_and_closes_on_success() {
        let b = quick();
        for _ in 0..3 {
            b.try_acquire().unwrap().failure();
        }
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.try_acquire().expect("probe");
        assert!(b.try_acquire().is_none(), "only one probe at a time");
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.try_acquire().is_some());
    }

    #[test]
    fn failed_or_abandoned_probe_reopens() {
        let b = quick();
        for _ in 0..3 {
            b.try_acquire().unwrap().failure();
        }
        std::thread::sleep(Duration::from_millis(40));
        drop(b.try_acquire().expect("probe")); // cancelled caller
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_none());
        std::thread::sleep(Duration::from_millis(40));
        b.try_acquire().expect("next probe").failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.openings(), 1, "re-opening from half-open is the same episode");
    }
}
