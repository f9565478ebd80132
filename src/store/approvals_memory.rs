//! Embedded [`Approvals`]: the approval queue and the consumed-token set in memory behind one
//! mutex, made durable by an append-only journal in the data directory (`<dir>/approvals.journal`).
//!
//! # Journal
//! Every change (a new approval, approve, deny, consume) is one compact JSON line, written with a
//! single `write_all` to a file opened with `O_APPEND` *before* the call returns and *before* the
//! change becomes visible in memory; if the write fails, the change is not made and the call
//! answers `StoreError::Unavailable` (the proxy then takes the failsafe path). No fsync per change:
//! after a process crash or `SIGKILL` nothing is lost (the page cache outlives the process); after
//! a power loss, changes since the last [`MemoryApprovals::sync`] may be. Because `consume` checks
//! and records under the same lock, two concurrent uses of one `jti` can never both succeed.
//!
//! # Compaction
//! `open` replays the journal (an unreadable line — a torn last write — is skipped and logged)
//! and rewrites it as a snapshot through `approvals.journal.tmp` (write, fsync, rename, fsync the
//! directory), dropping what is no longer remembered. While running, once the journal exceeds
//! [`ApprovalsOptions::compact_above_bytes`] (and twice its size after the last compaction), a
//! background thread does the same: it serialises the state under the lock (memory only), writes
//! and fsyncs it without the lock, then under the lock appends the lines written meanwhile,
//! fsyncs, renames and swaps the file handle. A crash at any point leaves a complete journal.
//!
//! # Memory
//! A consumed `jti` is remembered until its token's `exp` + [`ApprovalsOptions::replay_margin_ms`]
//! (a token past its `exp` no longer verifies; the margin covers clock skew between replicas).
//! An approval is remembered for [`ApprovalsOptions::retention_ms`] after it ended (expired,
//! decided or consumed), and at most [`ApprovalsOptions::max_approvals`] are kept (oldest first
//! forgotten). Forgetting happens as time (the `now` of calls) moves on.
//!
//! One process per data directory.
//!
//! Owns: `MemoryApprovals`, `ApprovalsOptions`, the journal format. Imports: `store::approvals`,
//! `store::StoreError`, `decide` money/time types, parking_lot, serde/serde_json, uuid, tracing, std.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::approvals::{Approval, ApprovalStatus, ApprovalTransitionError, Approvals, ConsumeOutcome, NewApproval};
use super::journal::{create_append, push_line, sync_dir, Journal, Unreadable};
use super::StoreError;
use crate::decide::time::MS_PER_DAY;
use crate::decide::UnixMillis;

/// The journal's file name inside the data directory.
pub const JOURNAL_FILE: &str = "approvals.journal";
const TMP_FILE: &str = "approvals.journal.tmp";

/// Retention and compaction settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalsOptions {
    /// How long an approval is remembered after it ended. Default 24 h.
    pub retention_ms: u64,
    /// A consumed `jti` is remembered until its `exp` plus this. Default 5 min.
    pub replay_margin_ms: u64,
    /// At most this many approvals are remembered (oldest forgotten first). Default 100 000.
    pub max_approvals: usize,
    /// Compact in the background once the journal is larger than this. Default 16 MiB.
    pub compact_above_bytes: u64,
}

impl Default for ApprovalsOptions {
    fn default() -> Self {
        ApprovalsOptions {
            retention_ms: MS_PER_DAY,
            replay_margin_ms: 5 * 60 * 1000,
            max_approvals: 100_000,
            compact_above_bytes: 16 << 20,
        }
    }
}

/// One journal line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Entry {
    /// A new approval, or (in a snapshot) an approval as it is now.
    Put {
        approval: Box<Approval>,
    },
    Approve {
        id: String,
        at: UnixMillis,
    },
    Deny {
        id: String,
        reason: Option<String>,
        at: UnixMillis,
    },
    Consume {
        jti: String,
        forget_at: UnixMillis,
        at: UnixMillis,
    },
}

impl Entry {
    fn at(&self) -> UnixMillis {
        match self {
            Entry::Put { approval } => approval.created_at,
            Entry::Approve { at, .. } | Entry::Deny { at, .. } | Entry::Consume { at, .. } => *at,
        }
    }
}

fn pending_key(tenant: &str, fingerprint: &str) -> String {
    format!("{tenant}\n{fingerprint}")
}

// ---------------------------------------------------------------------------------------------
// State: pure bookkeeping, no I/O. Replaying a journal and serving live calls use the same code.

struct State {
    opts: ApprovalsOptions,
    approvals: HashMap<Arc<str>, Approval>,
    /// (created_at, id): listing newest first and evicting oldest first.
    by_created: BTreeSet<(UnixMillis, Arc<str>)>,
    /// (forget at, id).
    forget: BTreeSet<(UnixMillis, Arc<str>)>,
    /// (expires_at, id) of approvals stored as `Pending` and not yet seen expired.
    pending: BTreeSet<(UnixMillis, Arc<str>)>,
    /// `tenant\nfingerprint` → id, for the entries of `pending`.
    pending_by_key: HashMap<String, Arc<str>>,
    /// jti → forget at.
    consumed: HashMap<Arc<str>, UnixMillis>,
    consumed_by_time: BTreeSet<(UnixMillis, Arc<str>)>,
    /// The latest `now` seen.
    last_now: UnixMillis,
}

impl State {
    fn new(opts: ApprovalsOptions) -> State {
        State {
            opts,
            approvals: HashMap::new(),
            by_created: BTreeSet::new(),
            forget: BTreeSet::new(),
            pending: BTreeSet::new(),
            pending_by_key: HashMap::new(),
            consumed: HashMap::new(),
            consumed_by_time: BTreeSet::new(),
            last_now: 0,
        }
    }

    /// Rebuilds a state from journal bytes; unreadable lines are skipped and counted.
    fn replay(bytes: &[u8], opts: ApprovalsOptions) -> (State, Unreadable) {
        let mut state = State::new(opts);
        let mut unreadable = Unreadable::default();
        for line in bytes.split_inclusive(|b| *b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)) {
            let entry = serde_json::from_slice::<Entry>(line);
            unreadable.line(entry.is_ok(), line);
            if let Ok(e) = entry {
                state.apply(e);
            }
        }
        (state, unreadable)
    }

    fn forget_at(&self, a: &Approval) -> UnixMillis {
        let ended = match a.status {
            ApprovalStatus::Pending | ApprovalStatus::Expired => a.expires_at,
            ApprovalStatus::Approved | ApprovalStatus::Denied => a.decided_at.unwrap_or(a.created_at),
            ApprovalStatus::Consumed => a.consumed_at.unwrap_or(a.created_at),
        };
        ended.max(a.created_at).saturating_add(self.opts.retention_ms)
    }

    fn insert(&mut self, a: Approval) {
        let id: Arc<str> = Arc::from(a.approval_id.as_str());
        self.remove(&id);
        self.by_created.insert((a.created_at, id.clone()));
        self.forget.insert((self.forget_at(&a), id.clone()));
        if a.status == ApprovalStatus::Pending && a.expires_at > self.last_now {
            self.pending.insert((a.expires_at, id.clone()));
            self.pending_by_key.insert(pending_key(&a.tenant_id, &a.request_fingerprint), id.clone());
        }
        self.approvals.insert(id, a);
    }

    fn remove(&mut self, id: &str) -> Option<Approval> {
        let (id, a) = self.approvals.remove_entry(id)?;
        self.by_created.remove(&(a.created_at, id.clone()));
        let forget_at = self.forget_at(&a);
        self.forget.remove(&(forget_at, id.clone()));
        self.unindex_pending(&id, &a);
        Some(a)
    }

    fn unindex_pending(&mut self, id: &Arc<str>, a: &Approval) {
        self.pending.remove(&(a.expires_at, id.clone()));
        let key = pending_key(&a.tenant_id, &a.request_fingerprint);
        if self.pending_by_key.get(&key) == Some(id) {
            self.pending_by_key.remove(&key);
        }
    }

    /// Moves time on: forgets what is due, un-indexes expired pending approvals.
    fn advance(&mut self, now: UnixMillis) {
        self.last_now = self.last_now.max(now);
        let now = self.last_now;
        while let Some((t, jti)) = self.consumed_by_time.first().cloned() {
            if t > now {
                break;
            }
            self.consumed_by_time.pop_first();
            self.consumed.remove(&jti);
        }
        while let Some((t, id)) = self.forget.first().cloned() {
            if t > now {
                break;
            }
            self.remove(&id);
        }
        while let Some((t, id)) = self.pending.first().cloned() {
            if t > now {
                break;
            }
            self.pending.pop_first();
            if let Some(a) = self.approvals.get(&id) {
                let key = pending_key(&a.tenant_id, &a.request_fingerprint);
                if self.pending_by_key.get(&key) == Some(&id) {
                    self.pending_by_key.remove(&key);
                }
            }
        }
        self.trim();
    }

    /// Forgets the oldest approvals beyond `max_approvals`.
    fn trim(&mut self) {
        while self.approvals.len() > self.opts.max_approvals {
            let Some((_, id)) = self.by_created.first().cloned() else { break };
            self.remove(&id);
        }
    }

    /// Applies one (already validated or replayed) change.
    fn apply(&mut self, e: Entry) {
        self.advance(e.at());
        match e {
            Entry::Put { approval } => {
                self.insert(*approval);
                self.trim();
            }
            Entry::Approve { id, at } => {
                if let Some(mut a) = self.remove(&id) {
                    a.status = ApprovalStatus::Approved;
                    a.decided_at = Some(at);
                    self.insert(a);
                }
            }
            Entry::Deny { id, reason, at } => {
                if let Some(mut a) = self.remove(&id) {
                    a.status = ApprovalStatus::Denied;
                    a.decided_at = Some(at);
                    a.decided_reason = reason;
                    self.insert(a);
                }
            }
            Entry::Consume { jti, forget_at, at } => {
                let jti: Arc<str> = Arc::from(jti);
                if let Some(old) = self.consumed.insert(jti.clone(), forget_at) {
                    self.consumed_by_time.remove(&(old, jti.clone()));
                }
                self.consumed_by_time.insert((forget_at, jti.clone()));
                let known = self.approvals.get(&jti).map(|a| a.status);
                if matches!(known, Some(ApprovalStatus::Pending | ApprovalStatus::Approved)) {
                    if let Some(mut a) = self.remove(&jti) {
                        a.status = ApprovalStatus::Consumed;
                        a.consumed_at = Some(at);
                        self.insert(a);
                    }
                }
            }
        }
    }

    /// An open pending approval for the same tenant and fingerprint.
    fn open_pending(&self, tenant: &str, fingerprint: &str, now: UnixMillis) -> Option<&Approval> {
        let id = self.pending_by_key.get(&pending_key(tenant, fingerprint))?;
        self.approvals.get(id).filter(|a| a.is_open(now))
    }

    /// The whole state as journal lines.
    fn snapshot(&self, out: &mut Vec<u8>) -> io::Result<()> {
        for (_, id) in &self.by_created {
            push_line(out, &Entry::Put { approval: Box::new(self.approvals[id].clone()) })?;
        }
        for (forget_at, jti) in &self.consumed_by_time {
            push_line(out, &Entry::Consume { jti: jti.to_string(), forget_at: *forget_at, at: self.last_now })?;
        }
        Ok(())
    }

    /// The stored record with its status as of `now`.
    fn view(a: &Approval, now: UnixMillis) -> Approval {
        Approval { status: a.status_at(now), ..a.clone() }
    }
}

// ---------------------------------------------------------------------------------------------
// The journal file.

fn unavailable(e: io::Error) -> StoreError {
    StoreError::Unavailable(format!("approvals journal: {e}"))
}

// ---------------------------------------------------------------------------------------------

struct Inner {
    state: State,
    journal: Option<Journal>,
}

impl Inner {
    /// Journals `e` (if durable), then applies it. Returns whether a compaction is due.
    fn commit(&mut self, e: Entry) -> Result<bool, StoreError> {
        let due = match &mut self.journal {
            Some(j) => j.append(std::slice::from_ref(&e)).map_err(unavailable)?,
            None => false,
        };
        self.state.apply(e);
        Ok(due)
    }
}

struct Shared {
    inner: Mutex<Inner>,
    compacting: AtomicBool,
}

/// Embedded approvals: in memory, journaled to a data directory (see the module docs).
pub struct MemoryApprovals {
    shared: Arc<Shared>,
}

impl MemoryApprovals {
    /// Opens (creating `dir` if needed) with default options: replays and compacts the journal.
    pub fn open(dir: &Path) -> io::Result<MemoryApprovals> {
        Self::open_with(dir, ApprovalsOptions::default(), None)
    }

    /// Like [`open`](Self::open); with `now`, what is due to be forgotten by then is dropped
    /// before the snapshot is written (otherwise the latest time in the journal is used).
    pub fn open_with(dir: &Path, opts: ApprovalsOptions, now: Option<UnixMillis>) -> io::Result<MemoryApprovals> {
        fs::create_dir_all(dir)?;
        let path = dir.join(JOURNAL_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let compact_above = opts.compact_above_bytes;
        let (mut state, unreadable) = State::replay(&bytes, opts);
        unreadable.check(&path, "approvals and consumed approval tokens")?;
        drop(bytes);
        if let Some(now) = now {
            state.advance(now);
        }
        let mut snap = Vec::new();
        state.snapshot(&mut snap)?;
        let journal = Journal::install(dir, TMP_FILE, &path, &snap, compact_above)?;
        Ok(Self::build(state, Some(journal)))
    }

    /// No journal: nothing survives the process (tests, benches).
    pub fn in_memory() -> MemoryApprovals {
        Self::in_memory_with(ApprovalsOptions::default())
    }

    pub fn in_memory_with(opts: ApprovalsOptions) -> MemoryApprovals {
        Self::build(State::new(opts), None)
    }

    fn build(state: State, journal: Option<Journal>) -> MemoryApprovals {
        MemoryApprovals {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner { state, journal }),
                compacting: AtomicBool::new(false),
            }),
        }
    }

    /// Flushes the journal to stable storage (fsync); bounds what a power loss can take.
    pub fn sync(&self) -> io::Result<()> {
        let file = self.shared.inner.lock().journal.as_ref().map(|j| j.file.clone());
        match file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }

    /// Rewrites the journal as a snapshot now (returns at once if a compaction is running).
    pub fn compact(&self) -> io::Result<()> {
        if self.shared.compacting.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let r = self.shared.compact();
        self.shared.compacting.store(false, Ordering::Release);
        r
    }

    /// Current journal size in bytes (0 without a journal).
    pub fn journal_len(&self) -> u64 {
        self.shared.inner.lock().journal.as_ref().map_or(0, |j| j.len)
    }

    fn after_commit(&self, due: bool) {
        if due {
            self.shared.compact_in_background();
        }
    }

    /// Synchronous core of [`Approvals::create_pending`].
    pub fn create_pending_now(&self, a: NewApproval) -> Result<Approval, StoreError> {
        let mut inner = self.shared.inner.lock();
        inner.state.advance(a.now);
        if let Some(existing) = inner.state.open_pending(&a.tenant_id, &a.request_fingerprint, a.now) {
            return Ok(State::view(existing, a.now));
        }
        let now = a.now;
        let approval = a.into_pending();
        let due = inner.commit(Entry::Put { approval: Box::new(approval.clone()) })?;
        drop(inner);
        self.after_commit(due);
        Ok(State::view(&approval, now))
    }

    fn transition(
        &self,
        id: &str,
        now: UnixMillis,
        entry: impl FnOnce(String) -> Entry,
    ) -> Result<Approval, ApprovalTransitionError> {
        let mut inner = self.shared.inner.lock();
        inner.state.advance(now);
        let a = inner.state.approvals.get(id).ok_or(ApprovalTransitionError::NotFound)?;
        if !a.is_open(now) {
            return Err(ApprovalTransitionError::NotPending(a.status_at(now)));
        }
        let due = inner.commit(entry(id.to_owned()))?;
        let out =
            inner.state.approvals.get(id).map(|a| State::view(a, now)).ok_or(ApprovalTransitionError::NotFound)?;
        drop(inner);
        self.after_commit(due);
        Ok(out)
    }

    /// Synchronous core of [`Approvals::consume`].
    pub fn consume_now(&self, jti: &str, exp_s: i64, now: UnixMillis) -> Result<ConsumeOutcome, StoreError> {
        let mut inner = self.shared.inner.lock();
        inner.state.advance(now);
        if inner.state.consumed.contains_key(jti) {
            return Ok(ConsumeOutcome::Replayed);
        }
        let exp_ms = u64::try_from(exp_s).unwrap_or(0).saturating_mul(1000);
        let forget_at = exp_ms.saturating_add(inner.state.opts.replay_margin_ms);
        let due = inner.commit(Entry::Consume { jti: jti.to_owned(), forget_at, at: now })?;
        drop(inner);
        self.after_commit(due);
        Ok(ConsumeOutcome::Consumed)
    }
}

impl Drop for MemoryApprovals {
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::warn!(error = %e, "approvals journal: final sync failed");
        }
    }
}

impl Shared {
    fn compact_in_background(self: &Arc<Self>) {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = self.clone();
        let spawned = std::thread::Builder::new().name("approvals-compact".into()).spawn(move || {
            if let Err(e) = shared.compact() {
                tracing::warn!(error = %e, "approvals journal: compaction failed (will retry when it grows)");
            }
            shared.compacting.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            self.compacting.store(false, Ordering::Release);
        }
    }

    /// See the module docs. The caller holds the `compacting` flag.
    fn compact(&self) -> io::Result<()> {
        // 1. Under the lock: the state as lines, and how much of the journal it reflects.
        let mut snap = Vec::new();
        let (dir, start_len) = {
            let inner = self.inner.lock();
            let Some(j) = &inner.journal else { return Ok(()) };
            inner.state.snapshot(&mut snap)?;
            (j.dir.clone(), j.len)
        };
        // 2. Without the lock: write and fsync the snapshot.
        let tmp_path = dir.join(TMP_FILE);
        let tmp = create_append(&tmp_path)?;
        (&tmp).write_all(&snap)?;
        tmp.sync_all()?;
        // 3. Under the lock: append what was written meanwhile, fsync, rename, swap.
        let mut inner = self.inner.lock();
        let Some(j) = inner.journal.as_mut() else { return Ok(()) };
        j.repair()?;
        let path = dir.join(JOURNAL_FILE);
        let tail_len = j.len - start_len;
        if tail_len > 0 {
            let mut tail = vec![0; tail_len as usize];
            let mut f = File::open(&path)?;
            f.seek(SeekFrom::Start(start_len))?;
            f.read_exact(&mut tail)?;
            (&tmp).write_all(&tail)?;
            tmp.sync_all()?;
        }
        fs::rename(&tmp_path, &path)?;
        j.file = Arc::new(tmp);
        j.len = snap.len() as u64 + tail_len;
        j.base_len = j.len;
        sync_dir(&dir)
    }
}

#[async_trait]
impl Approvals for MemoryApprovals {
    async fn sync(&self) -> Result<(), StoreError> {
        MemoryApprovals::sync(self).map_err(|e| StoreError::Unavailable(format!("approvals journal fsync: {e}")))
    }

    async fn create_pending(&self, a: NewApproval) -> Result<Approval, StoreError> {
        self.create_pending_now(a)
    }

    async fn get(&self, approval_id: &str, now: UnixMillis) -> Result<Option<Approval>, StoreError> {
        let inner = self.shared.inner.lock();
        Ok(inner.state.approvals.get(approval_id).map(|a| State::view(a, now)))
    }

    async fn list(
        &self,
        status: Option<ApprovalStatus>,
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<Approval>, StoreError> {
        let inner = self.shared.inner.lock();
        let s = &inner.state;
        Ok(s.by_created
            .iter()
            .rev()
            .map(|(_, id)| &s.approvals[id])
            .filter(|a| status.is_none_or(|want| a.status_at(now) == want))
            .take(limit)
            .map(|a| State::view(a, now))
            .collect())
    }

    async fn approve(&self, approval_id: &str, now: UnixMillis) -> Result<Approval, ApprovalTransitionError> {
        self.transition(approval_id, now, |id| Entry::Approve { id, at: now })
    }

    async fn deny(
        &self,
        approval_id: &str,
        reason: Option<&str>,
        now: UnixMillis,
    ) -> Result<Approval, ApprovalTransitionError> {
        let reason = reason.map(str::to_owned);
        self.transition(approval_id, now, |id| Entry::Deny { id, reason, at: now })
    }

    async fn consume(&self, jti: &str, exp_s: i64, now: UnixMillis) -> Result<ConsumeOutcome, StoreError> {
        self.consume_now(jti, exp_s, now)
    }

    async fn backlog(&self, now: UnixMillis) -> Result<u64, StoreError> {
        let inner = self.shared.inner.lock();
        Ok(inner.state.pending.range((now.saturating_add(1), Arc::<str>::from(""))..).count() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Micros;
    use std::fs::OpenOptions;
    use std::path::PathBuf;

    const T0: UnixMillis = 1_800_000_000_000;
    const TTL: UnixMillis = 900_000;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            TempDir(std::env::temp_dir().join(format!("preauth-approvals-{}", uuid::Uuid::new_v4().simple())))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn new(tenant: &str, fp: &str, now: UnixMillis) -> NewApproval {
        NewApproval {
            tenant_id: tenant.into(),
            tenant_tier: "pro".into(),
            request_id: format!("req-{now}"),
            route: "/v1/chat/completions".into(),
            model: "gpt-4o".into(),
            request_fingerprint: fp.into(),
            estimated_cost: Micros(2_500_000),
            reasons: vec!["approval_required".into()],
            now,
            expires_at: now + TTL,
        }
    }

    #[tokio::test]
    async fn create_list_approve_deny() {
        let s = MemoryApprovals::in_memory();
        let a = s.create_pending(new("acme", "f1", T0)).await.unwrap();
        let b = s.create_pending(new("acme", "f2", T0 + 1)).await.unwrap();
        assert_eq!(a.status, ApprovalStatus::Pending);
        assert_eq!(uuid::Uuid::parse_str(&a.approval_id).unwrap().get_version_num(), 7);
        let pending = s.list(Some(ApprovalStatus::Pending), T0 + 2, 10).await.unwrap();
        assert_eq!(
            pending.iter().map(|x| x.approval_id.as_str()).collect::<Vec<_>>(),
            [&b.approval_id, &a.approval_id]
        );
        assert_eq!(s.list(None, T0 + 2, 1).await.unwrap().len(), 1);
        assert_eq!(s.backlog(T0 + 2).await.unwrap(), 2);

        let ok = s.approve(&a.approval_id, T0 + 10).await.unwrap();
        assert_eq!((ok.status, ok.decided_at), (ApprovalStatus::Approved, Some(T0 + 10)));
        let no = s.deny(&b.approval_id, Some("too expensive"), T0 + 11).await.unwrap();
        assert_eq!(no.status, ApprovalStatus::Denied);
        assert_eq!(no.decided_reason.as_deref(), Some("too expensive"));
        assert_eq!(s.backlog(T0 + 12).await.unwrap(), 0);
        assert!(s.list(Some(ApprovalStatus::Pending), T0 + 12, 10).await.unwrap().is_empty());

        use ApprovalTransitionError::*;
        assert_eq!(s.approve(&b.approval_id, T0 + 12).await, Err(NotPending(ApprovalStatus::Denied)));
        assert_eq!(s.approve(&a.approval_id, T0 + 12).await, Err(NotPending(ApprovalStatus::Approved)));
        assert_eq!(s.deny(&a.approval_id, None, T0 + 12).await, Err(NotPending(ApprovalStatus::Approved)));
        assert_eq!(s.approve("nope", T0 + 12).await, Err(NotFound));
        assert_eq!(s.get(&a.approval_id, T0 + 12).await.unwrap().unwrap().status, ApprovalStatus::Approved);
        let j = s.get(&b.approval_id, T0 + 12).await.unwrap().unwrap().to_json(T0 + 12);
        assert_eq!(j["status"], "denied");
        assert_eq!(j["estimated_cost_usd"], "2.500000");
        assert!(j["created_at"].as_str().unwrap().ends_with('Z'));
    }

    #[tokio::test]
    async fn expired_cannot_be_approved_or_denied() {
        let s = MemoryApprovals::in_memory();
        let a = s.create_pending(new("acme", "f1", T0)).await.unwrap();
        let at = T0 + TTL;
        assert_eq!(s.list(None, at, 10).await.unwrap()[0].status, ApprovalStatus::Expired);
        assert_eq!(s.list(Some(ApprovalStatus::Expired), at, 10).await.unwrap().len(), 1);
        assert!(s.list(Some(ApprovalStatus::Pending), at, 10).await.unwrap().is_empty());
        assert_eq!(s.backlog(at).await.unwrap(), 0);
        assert_eq!(s.backlog(at - 1).await.unwrap(), 1);
        let e = ApprovalTransitionError::NotPending(ApprovalStatus::Expired);
        assert_eq!(s.approve(&a.approval_id, at).await, Err(e.clone()));
        assert_eq!(s.deny(&a.approval_id, None, at + 1).await, Err(e));
        // Forgotten after the retention (reads do not move time; a change does).
        let later = at + ApprovalsOptions::default().retention_ms;
        s.consume("x", 0, later).await.unwrap(); // moves time on
        assert_eq!(s.get(&a.approval_id, later).await.unwrap(), None);
    }

    #[tokio::test]
    async fn same_request_while_pending_is_not_queued_twice() {
        let s = MemoryApprovals::in_memory();
        let a = s.create_pending(new("acme", "f1", T0)).await.unwrap();
        assert_eq!(s.create_pending(new("acme", "f1", T0 + 5)).await.unwrap().approval_id, a.approval_id);
        assert_ne!(s.create_pending(new("globex", "f1", T0 + 5)).await.unwrap().approval_id, a.approval_id);
        s.deny(&a.approval_id, None, T0 + 6).await.unwrap();
        let b = s.create_pending(new("acme", "f1", T0 + 7)).await.unwrap();
        assert_ne!(b.approval_id, a.approval_id);
        // Once expired, a new one is created.
        let c = s.create_pending(new("acme", "f1", T0 + 7 + TTL)).await.unwrap();
        assert_ne!(c.approval_id, b.approval_id);
        assert_eq!(s.backlog(T0 + 8 + TTL).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn consume_once_then_replayed_and_forgotten_after_exp() {
        let s = MemoryApprovals::in_memory();
        let a = s.create_pending(new("acme", "f1", T0)).await.unwrap();
        s.approve(&a.approval_id, T0 + 1).await.unwrap();
        let exp_s = (T0 / 1000 + 900) as i64;
        assert_eq!(s.consume(&a.approval_id, exp_s, T0 + 2).await.unwrap(), ConsumeOutcome::Consumed);
        assert_eq!(s.consume(&a.approval_id, exp_s, T0 + 3).await.unwrap(), ConsumeOutcome::Replayed);
        let got = s.get(&a.approval_id, T0 + 3).await.unwrap().unwrap();
        assert_eq!((got.status, got.consumed_at), (ApprovalStatus::Consumed, Some(T0 + 2)));
        assert_eq!(s.list(Some(ApprovalStatus::Consumed), T0 + 3, 10).await.unwrap().len(), 1);
        // A token not from the queue (mint-approval CLI) is single use too.
        assert_eq!(s.consume("cli-1", exp_s, T0 + 4).await.unwrap(), ConsumeOutcome::Consumed);
        assert_eq!(s.consume("cli-1", exp_s, T0 + 5).await.unwrap(), ConsumeOutcome::Replayed);
        // Remembered through exp + margin, forgotten after.
        let margin = ApprovalsOptions::default().replay_margin_ms;
        let edge = exp_s as u64 * 1000 + margin;
        assert_eq!(s.consume("cli-1", exp_s, edge - 1).await.unwrap(), ConsumeOutcome::Replayed);
        assert_eq!(s.consume("cli-1", exp_s, edge).await.unwrap(), ConsumeOutcome::Consumed);
    }

    #[tokio::test]
    async fn durable_across_reopen_and_sigkill() {
        let dir = TempDir::new();
        let exp_s = (T0 / 1000 + 900) as i64;
        let (a, b) = {
            let s = MemoryApprovals::open(&dir.0).unwrap();
            let a = s.create_pending(new("acme", "f1", T0)).await.unwrap();
            let b = s.create_pending(new("acme", "f2", T0)).await.unwrap();
            s.create_pending(new("acme", "f3", T0)).await.unwrap();
            s.approve(&a.approval_id, T0 + 1).await.unwrap();
            s.deny(&b.approval_id, Some("no"), T0 + 1).await.unwrap();
            assert_eq!(s.consume(&a.approval_id, exp_s, T0 + 2).await.unwrap(), ConsumeOutcome::Consumed);
            assert_eq!(s.consume("cli-1", exp_s, T0 + 2).await.unwrap(), ConsumeOutcome::Consumed);
            // No Drop, no sync: what a SIGKILL leaves behind.
            std::mem::forget(s);
            (a, b)
        };
        // A torn last write.
        let mut f = OpenOptions::new().append(true).open(dir.0.join(JOURNAL_FILE)).unwrap();
        f.write_all(br#"{"op":"consume","jti":"torn","forg"#).unwrap();
        drop(f);

        let s = MemoryApprovals::open(&dir.0).unwrap();
        assert_eq!(s.consume(&a.approval_id, exp_s, T0 + 3).await.unwrap(), ConsumeOutcome::Replayed);
        assert_eq!(s.consume("cli-1", exp_s, T0 + 3).await.unwrap(), ConsumeOutcome::Replayed);
        assert_eq!(s.consume("torn", exp_s, T0 + 3).await.unwrap(), ConsumeOutcome::Consumed);
        assert_eq!(s.get(&a.approval_id, T0 + 3).await.unwrap().unwrap().status, ApprovalStatus::Consumed);
        let denied = s.get(&b.approval_id, T0 + 3).await.unwrap().unwrap();
        assert_eq!((denied.status, denied.decided_reason.as_deref()), (ApprovalStatus::Denied, Some("no")));
        assert_eq!(s.backlog(T0 + 3).await.unwrap(), 1);
        assert_eq!(s.list(None, T0 + 3, 10).await.unwrap().len(), 3);
        drop(s);

        // A line lost before the tail is damage, not a torn write: no start, the file kept.
        {
            let path = dir.0.join(JOURNAL_FILE);
            let good = fs::read(&path).unwrap();
            let mut damaged = b"{\"op\":\"consume\",\"jti\":".to_vec();
            damaged.extend_from_slice(b"\n");
            damaged.extend_from_slice(&good);
            fs::write(&path, &damaged).unwrap();
            let err = MemoryApprovals::open(&dir.0).err().expect("refused");
            assert!(
                err.to_string().contains("line 1 of") && err.to_string().contains("consumed approval tokens"),
                "{err}"
            );
            assert_eq!(fs::read(&path).unwrap(), damaged, "kept as it is");
            fs::write(&path, &good).unwrap();
        }

        // A third generation, with the running compaction in between.
        let s = MemoryApprovals::open(&dir.0).unwrap();
        assert_eq!(s.consume("torn", exp_s, T0 + 4).await.unwrap(), ConsumeOutcome::Replayed);
        s.compact().unwrap();
        assert_eq!(s.consume("after-compact", exp_s, T0 + 5).await.unwrap(), ConsumeOutcome::Consumed);
        drop(s);
        let s = MemoryApprovals::open(&dir.0).unwrap();
        for jti in ["torn", "after-compact", "cli-1", a.approval_id.as_str()] {
            assert_eq!(s.consume(jti, exp_s, T0 + 6).await.unwrap(), ConsumeOutcome::Replayed, "{jti}");
        }
    }

    #[tokio::test]
    async fn compaction_on_open_drops_what_is_forgotten() {
        let dir = TempDir::new();
        let exp_s = (T0 / 1000 + 60) as i64;
        {
            let s = MemoryApprovals::open(&dir.0).unwrap();
            s.consume("old-jti", exp_s, T0).await.unwrap();
            s.consume("long-jti", exp_s + 3 * 86_400, T0).await.unwrap();
            s.create_pending(new("acme", "fp-short-lived", T0)).await.unwrap();
        }
        let later = T0 + 2 * MS_PER_DAY;
        let s = MemoryApprovals::open_with(&dir.0, ApprovalsOptions::default(), Some(later)).unwrap();
        let text = fs::read_to_string(dir.0.join(JOURNAL_FILE)).unwrap();
        assert!(!text.contains("old-jti") && !text.contains("fp-short-lived"), "{text}");
        assert!(text.contains("long-jti"));
        assert_eq!(s.consume("long-jti", exp_s + 3 * 86_400, later).await.unwrap(), ConsumeOutcome::Replayed);
        assert!(!dir.0.join(TMP_FILE).exists());
    }

    #[tokio::test]
    async fn background_compaction_keeps_everything() {
        let dir = TempDir::new();
        let opts = ApprovalsOptions { compact_above_bytes: 2_000, ..ApprovalsOptions::default() };
        let exp_s = (T0 / 1000 + 900) as i64;
        {
            let s = MemoryApprovals::open_with(&dir.0, opts.clone(), None).unwrap();
            for i in 0..300 {
                s.consume(&format!("jti-{i}"), exp_s, T0 + i).await.unwrap();
            }
            // Let a background compaction finish.
            for _ in 0..200 {
                if !s.shared.compacting.load(Ordering::Acquire) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let s = MemoryApprovals::open_with(&dir.0, opts, None).unwrap();
        for i in 0..300 {
            assert_eq!(s.consume(&format!("jti-{i}"), exp_s, T0 + 400).await.unwrap(), ConsumeOutcome::Replayed);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_consume_is_single_use() {
        let dir = TempDir::new();
        for store in [MemoryApprovals::in_memory(), MemoryApprovals::open(&dir.0).unwrap()] {
            let store: Arc<dyn Approvals> = Arc::new(store);
            let start = Arc::new(tokio::sync::Barrier::new(50));
            let tasks: Vec<_> = (0..50)
                .map(|_| {
                    let (store, start) = (store.clone(), start.clone());
                    tokio::spawn(async move {
                        start.wait().await;
                        store.consume("the-jti", (T0 / 1000 + 900) as i64, T0).await.unwrap()
                    })
                })
                .collect();
            let mut consumed = 0;
            for t in tasks {
                if t.await.unwrap() == ConsumeOutcome::Consumed {
                    consumed += 1;
                }
            }
            assert_eq!(consumed, 1);
        }
    }

    #[tokio::test]
    async fn bounded_number_of_approvals() {
        let opts = ApprovalsOptions { max_approvals: 3, ..ApprovalsOptions::default() };
        let s = MemoryApprovals::in_memory_with(opts);
        let first = s.create_pending(new("acme", "f0", T0)).await.unwrap();
        for i in 1..5 {
            s.create_pending(new("acme", &format!("f{i}"), T0 + i)).await.unwrap();
        }
        let all = s.list(None, T0 + 10, 100).await.unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|a| a.approval_id != first.approval_id));
    }
}
