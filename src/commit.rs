//! Group commit of the embedded logs (the budget journal and the ledger outbox).
//!
//! On the hot path a request stages its lines (its hold or settlement in the budget journal, its
//! decision or settlement event in the outbox) and then awaits [`GroupCommit::commit`] before
//! anything leaves the sidecar (the forwarded request, the refusal, the next request on the
//! connection). `commit` yields once, so that every request the runtime is serving in the same
//! turn stages its lines too, and then the first of them writes everything staged: one `write(2)`
//! per log for the whole group instead of one per line. Durability is unchanged: a line is handed
//! to the kernel before the action it records (a `SIGKILL` loses nothing acknowledged); the
//! periodic fsync (`OutboxSyncer`) still bounds what a power loss can take.
//!
//! A failed write is reported to every commit whose lines may have been in it (conservatively:
//! to any commit that staged since before the failing batch was cut); the proxy then takes the
//! failsafe path as it does for any store failure. While writes fail (a full or read-only data
//! volume) the replica is not ready (`failing`), and the failure is logged once a second.
//!
//! Owns: `GroupCommit`, `Staged`, `StageCounter`. Imports: std, tokio (yield).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A log whose appends can be staged in memory and written later, all at once.
pub trait Staged: Send + Sync {
    /// Writes every line staged so far (one write). On failure those lines are not in the log.
    fn flush_staged(&self) -> io::Result<()>;
}

/// Counts staged lines across the logs of one [`GroupCommit`]. A log increments it after each
/// line it stages (so a count seen by a committer always belongs to a line already staged).
#[derive(Default)]
pub struct StageCounter(AtomicU64);

impl StageCounter {
    pub fn staged(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// The logs written together, and what has been written of them.
pub struct GroupCommit {
    logs: Vec<Arc<dyn Staged>>,
    counter: Arc<StageCounter>,
    /// Staged lines covered by the last batch (written or failed).
    written: parking_lot::Mutex<u64>,
    /// The end of the last batch whose write failed.
    failed_upto: AtomicU64,
    /// When a batch last failed (Unix ms, 0: never), and whether the last batch did.
    failed_at: AtomicU64,
    last_failed: AtomicBool,
    /// Paces the failure's log line (every request of a full disk meets it).
    failure_log: crate::telemetry::EverySecond,
}

/// How long after its last failed write the group commit still counts as failing when nothing
/// has been written since (no traffic reaches a replica that is not ready: this lets it try).
pub const FAILING_FOR_MS: u64 = 5_000;

impl GroupCommit {
    /// Commits over `logs`, which stage through `counter`.
    pub fn new(logs: Vec<Arc<dyn Staged>>, counter: Arc<StageCounter>) -> GroupCommit {
        GroupCommit {
            logs,
            counter,
            written: parking_lot::Mutex::new(0),
            failed_upto: AtomicU64::new(0),
            failed_at: AtomicU64::new(0),
            last_failed: AtomicBool::new(false),
            failure_log: crate::telemetry::EverySecond::default(),
        }
    }

    /// Whether the logs cannot be written: the last batch failed, less than [`FAILING_FOR_MS`]
    /// before `now_ms`, and none was written since (`/readyz` answers 503 meanwhile).
    pub fn failing(&self, now_ms: u64) -> bool {
        self.last_failed.load(Ordering::Relaxed)
            && now_ms < self.failed_at.load(Ordering::Relaxed).saturating_add(FAILING_FOR_MS)
    }

    /// Where the staged lines stand now: take it before staging, pass it to [`Self::commit`].
    pub fn mark(&self) -> u64 {
        self.counter.get()
    }

    /// Returns once every line staged since `mark` was taken is written (in a batch with the
    /// lines of every other request of this runtime turn). `Err`: some of them may be lost.
    pub async fn commit(&self, since: u64) -> io::Result<()> {
        let target = self.counter.get();
        if target == since {
            return Ok(()); // nothing staged (a shared store, or no lines)
        }
        if *self.written.lock() < target {
            // The others served in this turn stage theirs meanwhile.
            tokio::task::yield_now().await;
            self.flush_to(target);
        }
        self.outcome(since)
    }

    /// Writes everything staged now, synchronously (admin calls, workers, shutdown: paths that
    /// do not batch). `Err`: some line staged since `since` may be lost.
    pub fn commit_now(&self, since: u64) -> io::Result<()> {
        self.flush_to(self.counter.get());
        self.outcome(since)
    }

    /// Writes whatever is staged (the periodic backstop and shutdown).
    pub fn flush(&self) {
        self.flush_to(self.counter.get());
    }

    fn flush_to(&self, target: u64) {
        let mut written = self.written.lock();
        if *written >= target {
            return; // another committer's batch covered it
        }
        let upto = self.counter.get();
        let mut failed = false;
        for log in &self.logs {
            if let Err(e) = log.flush_staged() {
                let now_ms = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
                self.failed_at.store(now_ms, Ordering::Relaxed);
                if let Some(not_logged) = self.failure_log.pass(now_ms / 1000) {
                    tracing::error!(
                        error = %e,
                        not_logged,
                        "writing staged journal/outbox lines to PREAUTH_DATA_DIR failed (a full or read-only volume?); \
                         their requests take the failsafe path and /readyz answers 503 until a write succeeds"
                    );
                }
                failed = true;
            }
        }
        if failed {
            self.failed_upto.fetch_max(upto, Ordering::AcqRel);
        }
        // No clock read on the hot path's success: only a failure is timed.
        self.last_failed.store(failed, Ordering::Relaxed);
        *written = upto;
    }

    fn outcome(&self, since: u64) -> io::Result<()> {
        if self.failed_upto.load(Ordering::Acquire) > since {
            return Err(io::Error::other("a batch of staged journal/outbox lines could not be written"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log that records what it wrote, failing when told to.
    #[derive(Default)]
    struct Log {
        counter: Arc<StageCounter>,
        staged: parking_lot::Mutex<Vec<u32>>,
        written: parking_lot::Mutex<Vec<Vec<u32>>>,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Log {
        fn stage(&self, v: u32) {
            self.staged.lock().push(v);
            self.counter.staged();
        }
    }

    impl Staged for Log {
        fn flush_staged(&self) -> io::Result<()> {
            let batch = std::mem::take(&mut *self.staged.lock());
            if self.fail.load(Ordering::Relaxed) {
                return Err(io::Error::other("disk full"));
            }
            if !batch.is_empty() {
                self.written.lock().push(batch);
            }
            Ok(())
        }
    }

    fn group() -> (Arc<Log>, GroupCommit) {
        let counter = Arc::new(StageCounter::default());
        let log = Arc::new(Log { counter: counter.clone(), ..Log::default() });
        (log.clone(), GroupCommit::new(vec![log], counter))
    }

    /// A failed write makes the group commit `failing` (the replica not ready) until a batch is
    /// written, or for FAILING_FOR_MS when nothing is (durability audit: /readyz said ready on a
    /// full disk while every request was refused).
    #[test]
    fn a_failed_write_is_failing_until_one_succeeds_or_a_while_passes() {
        let (log, g) = group();
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        assert!(!g.failing(now));
        log.fail.store(true, Ordering::Relaxed);
        let since = g.mark();
        log.stage(1);
        assert!(g.commit_now(since).is_err());
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        assert!(g.failing(now));
        assert!(!g.failing(now + FAILING_FOR_MS + 1_000), "tried again after a while");
        log.fail.store(false, Ordering::Relaxed);
        let since = g.mark();
        log.stage(2);
        assert!(g.commit_now(since).is_ok());
        assert!(!g.failing(crate::clock::Clock::now_ms(&crate::clock::SystemClock)), "a write succeeded");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn requests_of_one_turn_share_one_write() {
        let (log, g) = group();
        let g = Arc::new(g);
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (g, log) = (g.clone(), log.clone());
            tasks.push(tokio::spawn(async move {
                let since = g.mark();
                log.stage(i);
                g.commit(since).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let written = log.written.lock().clone();
        assert_eq!(written.len(), 1, "one batch: {written:?}");
        assert_eq!(written[0].len(), 8);
        // Nothing staged: no write, no wait.
        g.commit(g.mark()).await.unwrap();
        assert_eq!(log.written.lock().len(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_batch_fails_its_committers_only() {
        let (log, g) = group();
        let before = g.mark();
        log.stage(1);
        log.fail.store(true, Ordering::Relaxed);
        assert!(g.commit(before).await.is_err());
        log.fail.store(false, Ordering::Relaxed);
        // Staged after the failed batch was cut: unaffected.
        let since = g.mark();
        log.stage(2);
        g.commit(since).await.unwrap();
        assert_eq!(*log.written.lock(), vec![vec![2]]);
        // A commit that staged before the failure learns of it even when written later.
        let early = before;
        assert!(g.commit_now(early).is_err());
    }
}
