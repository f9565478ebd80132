//! The relay: a pingora `BackgroundService` moving events from the [`Outbox`] to the ledger
//! [`Sink`], at-least-once.
//!
//! Loop: read up to [`RelayConfig::batch_max`] (500) events from the cursor → deliver →
//! acknowledge (cursor advances, delivered segments go). A batch that was not full is followed by
//! a short [`RelayConfig::linger`] (20 ms) so that a busy proxy hands over events in batches; a
//! full batch is followed at once (backlog). When the outbox is empty it waits for the next append
//! (or [`RelayConfig::idle_poll`]).
//! - `Retryable`: exponential backoff with jitter, 100 ms doubling to a 30 s cap (each wait is
//!   drawn from [d/2, d]); the same batch is retried until the sink is back, then the backlog
//!   drains at full speed. Logged as a warning on the first failure and then at most once a
//!   minute.
//! - `Rejected`: the batch is written to `outbox/parked/` with the reason, logged as an error
//!   (`outbox_events_total{state="parked"}` counts it) and the relay moves on.
//! - Shutdown: stops waiting, then keeps delivering for at most [`RelayConfig::drain_timeout`]
//!   while the sink accepts; whatever is left is replayed by the next start.
//!
//! Metrics are exported by [`crate::ledger::outbox::OutboxSyncer`] from the outbox's own
//! counters, so the relay is testable without a server: drive [`Relay::run`] with a
//! `tokio::sync::watch` channel, or [`Relay::step`] directly.
//!
//! Owns: `Relay`, `Backoff`. Imports: outbox, sink, pingora (background service).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::ledger::event::EventLine;
use crate::ledger::outbox::{Outbox, Position};
use crate::ledger::sink::{Sink, SinkError, MAX_RETRY_AFTER};

/// While deliveries keep failing, the warning is repeated at most this often (the backoff reaches
/// 30 s, and every 10th failure was ≈ 5 minutes apart).
const WARN_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub batch_max: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Longest wait for new events when the outbox is empty (appends wake the relay earlier).
    pub idle_poll: Duration,
    /// After delivering a batch that was not full, wait this long before reading again, so that
    /// under load events travel in batches instead of one read/deliver/ack cycle (two blocking
    /// file jobs and a sink call) per request. Adds at most this much to delivery latency.
    pub linger: Duration,
    /// After shutdown begins, how long to keep delivering.
    pub drain_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_max: 500,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            idle_poll: Duration::from_millis(500),
            linger: Duration::from_millis(20),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Exponential backoff with jitter: the n-th consecutive failure waits a random duration in
/// [d/2, d] with d = min(min·2ⁿ, max).
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, failures: 0 }
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The next wait; counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.min.saturating_mul(1u32 << self.failures.min(20));
        self.failures = self.failures.saturating_add(1);
        let d = exp.min(self.max);
        let half = d / 2;
        let jitter = (uuid::Uuid::new_v4().as_u128() as u64) % (half.as_micros() as u64 + 1);
        half + Duration::from_micros(jitter)
    }
}

/// What one [`Relay::step`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to deliver.
    Idle,
    Delivered(usize),
    Parked(usize),
    /// Not delivered; retry later, no sooner than the duration (the receiver's `Retry-After`;
    /// zero: the backoff alone).
    Failed(String, Duration),
}

pub struct Relay {
    outbox: Arc<Outbox>,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
}

impl Relay {
    pub fn new(outbox: Arc<Outbox>, sink: Arc<dyn Sink>) -> Relay {
        Relay::with_config(outbox, sink, RelayConfig::default())
    }

    pub fn with_config(outbox: Arc<Outbox>, sink: Arc<dyn Sink>, config: RelayConfig) -> Relay {
        Relay { outbox, sink, config }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Outbox) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let outbox = self.outbox.clone();
        tokio::task::spawn_blocking(move || f(&outbox)).await.map_err(std::io::Error::other)?
    }

    /// One batch: read, deliver, acknowledge (or park).
    pub async fn step(&self) -> Step {
        let max = self.config.batch_max;
        let batch = match self.blocking(move |o| o.read_batch(max)).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "relay: cannot read the outbox");
                return Step::Failed(format!("outbox read: {e}"), Duration::ZERO);
            }
        };
        let Some(&(last, _)) = batch.last() else { return Step::Idle };
        let events: Vec<EventLine> = batch.into_iter().map(|(_, e)| e).collect();
        let n = events.len();
        match self.sink.deliver(&events).await {
            Ok(()) => {
                if let Err(e) = self.blocking(move |o| o.ack(last)).await {
                    // Delivered; the cursor on disk lags (those events may be delivered again).
                    tracing::error!(error = %e, "relay: cannot persist the outbox cursor");
                }
                Step::Delivered(n)
            }
            Err(SinkError::Retryable(msg)) => Step::Failed(msg, Duration::ZERO),
            Err(SinkError::RetryAfter(msg, after)) => Step::Failed(msg, after.min(MAX_RETRY_AFTER)),
            Err(SinkError::Rejected(msg)) => self.park(last, events, msg).await,
            Err(SinkError::PartlyRejected { reason, rejected }) => {
                let refused: Vec<EventLine> = rejected.iter().filter_map(|&i| events.get(i).cloned()).collect();
                match self.park(last, refused, reason).await {
                    // The rest of the batch was delivered (the cursor moved past all of it).
                    Step::Parked(_) => Step::Delivered(n),
                    other => other,
                }
            }
        }
    }

    async fn park(&self, last: Position, events: Vec<EventLine>, reason: String) -> Step {
        let n = events.len();
        let (first, last_id) = (events.first().map(|e| e.event_id.clone()), events.last().map(|e| e.event_id.clone()));
        let why = reason.clone();
        match self.blocking(move |o| o.park(last, &events, &why)).await {
            Ok(path) => {
                tracing::error!(
                    events = n,
                    first_event_id = first.as_deref().unwrap_or(""),
                    last_event_id = last_id.as_deref().unwrap_or(""),
                    parked = %path.display(),
                    reason = %reason,
                    "ledger sink rejected a batch; parked it (not retried; move it back to replay)"
                );
                Step::Parked(n)
            }
            Err(e) => {
                tracing::error!(error = %e, reason = %reason, "relay: cannot park a rejected batch; retrying it");
                Step::Failed(format!("park: {e}"), Duration::ZERO)
            }
        }
    }

    /// Runs until `shutdown` turns true (or its sender is dropped), then drains.
    pub async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max);
        let mut warned = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let wait = match self.step().await {
                Step::Delivered(n) | Step::Parked(n) => {
                    if backoff.failures() > 0 {
                        tracing::info!(
                            failures = backoff.failures(),
                            "ledger sink reachable again; draining the outbox"
                        );
                    }
                    backoff.reset();
                    warned = None;
                    if n >= self.config.batch_max || self.config.linger.is_zero() {
                        continue; // a backlog: drain at full speed
                    }
                    Some(self.config.linger)
                }
                Step::Idle => None,
                Step::Failed(msg, after) => Some(self.wait_after_failure(&mut backoff, &mut warned, &msg, after)),
            };
            tokio::select! {
                r = shutdown.changed() => if r.is_err() { break },
                _ = async {
                    match wait {
                        Some(d) => tokio::time::sleep(d).await,
                        None => { let _ = tokio::time::timeout(self.config.idle_poll, self.outbox.appended()).await; }
                    }
                } => {}
            }
        }
        self.drain().await;
    }

    /// The wait before the next attempt after a failed one (`at_least`: the receiver's
    /// `Retry-After`); logs the failure on the first and then at most once a minute (`warned`:
    /// when it last did).
    fn wait_after_failure(
        &self,
        backoff: &mut Backoff,
        warned: &mut Option<tokio::time::Instant>,
        msg: &str,
        at_least: Duration,
    ) -> Duration {
        let d = backoff.next_delay().max(at_least);
        let now = tokio::time::Instant::now();
        if backoff.failures() == 1 || warned.is_none_or(|t| now - t >= WARN_EVERY) {
            *warned = Some(now);
            tracing::warn!(
                error = %msg,
                failures = backoff.failures(),
                retry_in_ms = d.as_millis() as u64,
                depth = self.outbox.depth(),
                "ledger delivery failed; retrying with backoff"
            );
        }
        d
    }

    /// Delivers what it can within `drain_timeout`; stops at the first failure.
    pub async fn drain(&self) {
        let deadline = tokio::time::Instant::now() + self.config.drain_timeout;
        let mut delivered = 0usize;
        while let Ok(Step::Delivered(n) | Step::Parked(n)) = tokio::time::timeout_at(deadline, self.step()).await {
            delivered += n;
        }
        let left = self.outbox.depth();
        if left > 0 {
            tracing::info!(delivered, left, "relay stopped; undelivered events stay in the outbox for the next start");
        }
    }
}

#[async_trait]
impl BackgroundService for Relay {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.run(shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let d0 = b.next_delay();
        assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100), "{d0:?}");
        let d1 = b.next_delay();
        assert!(d1 >= Duration::from_millis(100) && d1 <= Duration::from_millis(200), "{d1:?}");
        for _ in 0..30 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(30));
        }
        let d = b.next_delay();
        assert!(d >= Duration::from_secs(15), "{d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
