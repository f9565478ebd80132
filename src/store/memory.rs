//! Embedded, in-process state for a single replica: exact sliding windows, UTC-day counters and
//! concurrency leases, sharded by tenant to keep lock hold times short.
//!
//! Memory per tracked tenant is bounded by its caps (entries only live for 60 s) and a tenant with
//! nothing in flight and no count for today is forgotten by `sweep`. It is kept small for the
//! common case of a tenant with one entry in its minute window and at most one request in flight:
//! both are stored inline, with no allocation of their own, and the global window refers to the
//! tenant by a slot number instead of its name (see `GlobalState`).
//!
//! Lock order: a tenant's shard, then the global window (never the other way round).
//!
//! # Restarts
//! Opened on a data directory ([`MemoryCounters::open`]), the day's request counts (the tier
//! daily quota) survive a restart: [`MemoryCounters::persist_daily_now`] writes the tenants'
//! counts of the current UTC day as one snapshot (`store::daily`), and `open` restores them when
//! the snapshot is of the same day. The request path does nothing for it but add one to a
//! counter under the shard lock it already holds (`Shard::daily_changes`); the housekeeper
//! writes the snapshot every [`crate::worker::DAILY_COUNTS_INTERVAL`] when a count changed, and
//! once more at shutdown, so a `SIGKILL` loses at most the admissions of that last interval. The
//! windows, leases and the global guard are not kept: they cover at most a minute (a lease its
//! TTL) and start afresh.
//!
//! Opened on the data directory too ([`MemoryPolicy::open`]), the runtime policy keeps its
//! runtime knobs (what `PATCH /api/v1/enforcement/runtime` changes) and `policy_version` across a
//! restart: every change is saved (`store::runtime_policy`, written durably) before it is
//! published, a change of the knobs that cannot be saved is refused, and a start merges the
//! saved knobs with the configuration per knob (the configuration wins for a knob it changed
//! since). The request path only reads the current snapshot, as before.
//!
//! Owns: `MemoryCounters` (and when its daily counts are written), `MemoryPolicy` (and when its
//! knobs are saved). Imports: `store` traits, `store::daily`, `store::runtime_policy`,
//! `store::knobs`, `decide` types, parking_lot, tracing.

use std::collections::VecDeque;
use std::io;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};

use super::knobs::Knobs;
use super::{daily, runtime_policy, AdmitRequest, Counters, PolicyPatch, PolicyStore, StoreError, SweepStats, Ticket};
use crate::decide::time::{utc_day, MS_PER_MINUTE};
use crate::decide::{CountersView, FastMap, GlobalView, Policy, TenantView, UnixMillis};

const SHARDS: usize = 32;

/// Admissions of one tenant in one millisecond of the global window.
#[derive(Clone, Copy, Debug)]
struct Admitted {
    at: UnixMillis,
    requests: u32,
    /// The tenant's slot (see `GlobalState::slots`).
    slot: u32,
}

/// The slot number of a tenant that has none yet.
const NO_SLOT: u32 = u32::MAX;

#[derive(Default)]
struct GlobalState {
    /// Admissions of the last 60 s, oldest first. Admissions of one tenant in the same
    /// millisecond share an entry: exact at the clock's resolution, and memory is bounded by
    /// time (≤ one entry per tenant per ms) instead of growing with the request rate.
    window: VecDeque<Admitted>,
    /// Requests in `window`.
    requests: u64,
    /// Requests inside `window` per tenant, by slot: a tenant's state holds its slot number from
    /// its first admission until `sweep` forgets it (only once the slot is at zero), so the
    /// window refers to tenants by number, not by name, and 4 bytes per tenant replace a map.
    slots: Vec<u32>,
    /// Slots of forgotten tenants, for reuse.
    free: Vec<u32>,
    /// Slots above zero: the distinct tenants in `window`.
    distinct: u64,
    block_until: Option<UnixMillis>,
}

impl GlobalState {
    fn prune(&mut self, now: UnixMillis) {
        let horizon = now.saturating_sub(MS_PER_MINUTE);
        while let Some(a) = self.window.front() {
            if a.at > horizon {
                break;
            }
            let a = self.window.pop_front().expect("front exists");
            self.forget(a.slot, a.requests);
        }
        if self.window.is_empty() && self.window.capacity() > 1024 {
            self.window = VecDeque::new();
        }
        if self.block_until.is_some_and(|u| u <= now) {
            self.block_until = None;
        }
    }

    /// Counts an admission at `at` by the tenant whose slot is `*slot` (given one if it has
    /// none yet).
    fn add(&mut self, at: UnixMillis, slot: &mut u32) {
        if *slot == NO_SLOT {
            *slot = match self.free.pop() {
                Some(s) => s,
                None => {
                    self.slots.push(0);
                    (self.slots.len() - 1) as u32
                }
            };
        }
        let slot = *slot;
        match self.window.back_mut() {
            Some(a) if a.at == at && a.slot == slot => a.requests += 1,
            _ => self.window.push_back(Admitted { at, requests: 1, slot }),
        }
        self.requests += 1;
        let n = &mut self.slots[slot as usize];
        if *n == 0 {
            self.distinct += 1;
        }
        *n += 1;
    }

    /// Takes one admission at `at` by the tenant of `slot` back out.
    fn remove(&mut self, at: UnixMillis, slot: u32) {
        if slot == NO_SLOT {
            return;
        }
        if let Some(i) = self.window.iter().rposition(|a| a.at == at && a.slot == slot) {
            let entry = &mut self.window[i];
            entry.requests -= 1;
            if entry.requests == 0 {
                self.window.remove(i);
            }
            self.forget(slot, 1);
        }
    }

    fn forget(&mut self, slot: u32, requests: u32) {
        self.requests = self.requests.saturating_sub(u64::from(requests));
        let n = &mut self.slots[slot as usize];
        if *n > 0 {
            *n = n.saturating_sub(requests);
            if *n == 0 {
                self.distinct -= 1;
            }
        }
    }

    /// Whether the tenant of `slot` has requests in the window.
    fn counts(&self, slot: u32) -> bool {
        slot != NO_SLOT && self.slots[slot as usize] > 0
    }

    /// The tenant of `slot` is forgotten (it has nothing in the window).
    fn release(&mut self, slot: u32) {
        if slot == NO_SLOT {
            return;
        }
        self.free.push(slot);
        if self.free.len() == self.slots.len() && self.slots.capacity() > 1024 {
            self.slots = Vec::new();
            self.free = Vec::new();
        }
    }

    fn view(&self) -> GlobalView {
        GlobalView {
            requests_last_minute: self.requests,
            distinct_tenants_last_minute: self.distinct,
            block_until: self.block_until,
        }
    }
}

/// Requests admitted in one millisecond (the minute and token-rate windows).
#[derive(Clone, Copy, Debug)]
struct Minute {
    at: UnixMillis,
    /// Estimated tokens.
    tokens: u64,
    requests: NonZeroU32,
}

/// More than one [`Minute`], oldest first, with running totals.
struct Minutes {
    entries: VecDeque<Minute>,
    requests: u64,
    tokens: u64,
}

/// A tenant's last 60 s: a single entry inline, more in a queue of their own.
enum Window {
    One(Minute),
    /// `None`: empty. A queue is kept until the window empties (no allocation per request for a
    /// tenant with steady traffic).
    Queue(Option<Box<Minutes>>),
}

impl Window {
    fn entries(&self) -> impl Iterator<Item = &Minute> {
        let (one, queue) = match self {
            Window::One(m) => (Some(m), None),
            Window::Queue(q) => (None, q.as_deref()),
        };
        one.into_iter().chain(queue.into_iter().flat_map(|q| q.entries.iter()))
    }

    fn is_empty(&self) -> bool {
        matches!(self, Window::Queue(None))
    }

    fn requests(&self) -> u64 {
        match self {
            Window::One(m) => u64::from(m.requests.get()),
            Window::Queue(q) => q.as_ref().map_or(0, |q| q.requests),
        }
    }

    fn tokens(&self) -> u64 {
        match self {
            Window::One(m) => m.tokens,
            Window::Queue(q) => q.as_ref().map_or(0, |q| q.tokens),
        }
    }

    /// Counts `tokens` in at `at`; admissions in the same millisecond share an entry.
    fn push(&mut self, at: UnixMillis, tokens: u64) {
        let new = Minute { at, tokens, requests: NonZeroU32::MIN };
        match self {
            Window::One(m) if m.at == at => {
                m.requests = m.requests.saturating_add(1);
                m.tokens += tokens;
            }
            Window::One(m) => {
                let first = *m;
                *self = Window::Queue(Some(Box::new(Minutes {
                    entries: VecDeque::from([first, new]),
                    requests: u64::from(first.requests.get()) + 1,
                    tokens: first.tokens + tokens,
                })));
            }
            Window::Queue(None) => *self = Window::One(new),
            Window::Queue(Some(q)) => {
                match q.entries.back_mut() {
                    Some(m) if m.at == at => {
                        m.requests = m.requests.saturating_add(1);
                        m.tokens += tokens;
                    }
                    _ => q.entries.push_back(new),
                }
                q.requests += 1;
                q.tokens += tokens;
            }
        }
    }

    /// Drops the entries at or before `horizon` (from the front).
    fn prune(&mut self, horizon: UnixMillis) {
        match self {
            Window::One(m) if m.at <= horizon => *self = Window::Queue(None),
            Window::One(_) | Window::Queue(None) => {}
            Window::Queue(Some(q)) => {
                while let Some(m) = q.entries.front() {
                    if m.at > horizon {
                        break;
                    }
                    q.requests -= u64::from(m.requests.get());
                    q.tokens -= m.tokens;
                    q.entries.pop_front();
                }
                if q.entries.is_empty() {
                    *self = Window::Queue(None);
                }
            }
        }
    }

    /// Takes one admission at `at` with `tokens` back out (the newest entry at `at`).
    fn remove(&mut self, at: UnixMillis, tokens: u64) {
        match self {
            Window::One(m) if m.at == at => match NonZeroU32::new(m.requests.get() - 1) {
                Some(n) => {
                    m.requests = n;
                    m.tokens = m.tokens.saturating_sub(tokens);
                }
                None => *self = Window::Queue(None),
            },
            Window::One(_) | Window::Queue(None) => {}
            Window::Queue(Some(q)) => {
                if let Some(i) = q.entries.iter().rposition(|m| m.at == at) {
                    let entry = &mut q.entries[i];
                    entry.tokens = entry.tokens.saturating_sub(tokens);
                    match NonZeroU32::new(entry.requests.get() - 1) {
                        Some(n) => entry.requests = n,
                        None => {
                            q.entries.remove(i);
                        }
                    }
                    q.requests -= 1;
                    q.tokens = q.tokens.saturating_sub(tokens);
                    if q.entries.is_empty() {
                        *self = Window::Queue(None);
                    }
                }
            }
        }
    }
}

/// A concurrency lease: (seq, expires at).
#[derive(Clone, Copy, Debug)]
struct Lease {
    seq: NonZeroU64,
    expires: UnixMillis,
}

/// A tenant's concurrency leases: a single one inline, more in a list of their own.
enum Leases {
    One(Lease),
    /// `None`: no lease. A list is kept until its last lease ends (no allocation per request for
    /// a tenant with steady concurrency). Boxed: a thin pointer keeps `Leases` at 16 bytes per
    /// tenant; the extra allocation is only made for a tenant with several requests in flight.
    #[allow(clippy::box_collection)]
    List(Option<Box<Vec<Lease>>>),
}

impl Leases {
    fn len(&self) -> usize {
        match self {
            Leases::One(_) => 1,
            Leases::List(l) => l.as_ref().map_or(0, |l| l.len()),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, lease: Lease) {
        match self {
            Leases::One(first) => *self = Leases::List(Some(Box::new(vec![*first, lease]))),
            Leases::List(None) => *self = Leases::One(lease),
            Leases::List(Some(l)) => l.push(lease),
        }
    }

    /// Keeps the leases `keep` accepts; returns how many were dropped.
    fn retain(&mut self, keep: impl Fn(&Lease) -> bool) -> usize {
        let before = self.len();
        match self {
            Leases::One(l) if !keep(l) => *self = Leases::List(None),
            Leases::One(_) | Leases::List(None) => {}
            Leases::List(Some(l)) => {
                l.retain(keep);
                if l.is_empty() {
                    *self = Leases::List(None);
                }
            }
        }
        before - self.len()
    }
}

struct TenantState {
    daily: u64,
    day: u32,
    /// Where the tenant is counted in the global window (`NO_SLOT` until its first admission).
    slot: u32,
    /// Admissions of the last 60 s, oldest first: both the per-minute and the token-rate window.
    minute: Window,
    leases: Leases,
}

impl Default for TenantState {
    fn default() -> Self {
        TenantState { daily: 0, day: 0, slot: NO_SLOT, minute: Window::Queue(None), leases: Leases::List(None) }
    }
}

impl TenantState {
    fn prune(&mut self, now: UnixMillis) -> u64 {
        let today = utc_day(now);
        if self.day != today {
            self.day = today;
            self.daily = 0;
        }
        self.minute.prune(now.saturating_sub(MS_PER_MINUTE));
        self.leases.retain(|l| l.expires > now) as u64
    }

    fn view(&self) -> TenantView {
        TenantView {
            daily_requests: self.daily,
            minute_requests: self.minute.requests(),
            minute_oldest: self.minute.entries().next().map(|m| m.at),
            in_flight: self.leases.len() as u64,
            tokens_last_minute: self.minute.tokens(),
            tokens_oldest: self.minute.entries().find(|m| m.tokens > 0).map(|m| m.at),
        }
    }

    fn is_idle(&self) -> bool {
        self.daily == 0 && self.minute.is_empty() && self.leases.is_empty()
    }
}

/// The tenants whose names hash to one shard.
#[derive(Default)]
struct Shard {
    tenants: FastMap<Arc<str>, TenantState>,
    /// Changes of a daily count in this shard (admissions, rollbacks that took one back), counted
    /// under the shard's lock: a daily snapshot that copied the shard knows exactly which changes
    /// it holds, and a later count above that says it is behind (see `persist_daily_now`).
    daily_changes: u64,
}

/// Where the daily counts are kept across restarts, and what was last written there.
struct DailyFile {
    dir: PathBuf,
    /// The day and the sum of every shard's `daily_changes` the file holds (`None`: nothing
    /// written yet). Its lock also keeps two writers apart.
    written: Mutex<Option<(u32, u64)>>,
}

/// In-process counters (embedded mode).
pub struct MemoryCounters {
    global: Mutex<GlobalState>,
    shards: Vec<Mutex<Shard>>,
    seq: AtomicU64,
    /// Leases of gate-API holds by reservation id (see `Counters::park_lease`), bounded.
    parked: Mutex<std::collections::HashMap<String, Ticket>>,
    /// `None`: the daily counts live in memory only (`new`).
    daily_file: Option<DailyFile>,
}

/// Parked leases remembered at most: callers that never settle make the oldest bookkeeping go
/// (their leases expire by TTL).
const MAX_PARKED: usize = 200_000;

impl Default for MemoryCounters {
    fn default() -> Self {
        MemoryCounters {
            global: Mutex::new(GlobalState::default()),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            seq: AtomicU64::new(1),
            parked: Mutex::new(std::collections::HashMap::new()),
            daily_file: None,
        }
    }
}

impl MemoryCounters {
    /// Counters in memory only: nothing survives the process (tests, benches).
    pub fn new() -> Self {
        Self::default()
    }

    /// Counters whose daily request counts survive a restart in `dir` (the data directory): the
    /// counts of `now`'s UTC day kept there are restored (a snapshot of another day is ignored,
    /// an unreadable one moved aside with a warning: see `store::daily`), and
    /// [`MemoryCounters::persist_daily_now`] writes them back.
    pub fn open(dir: &Path, now: UnixMillis) -> Self {
        let today = utc_day(now);
        let counters = MemoryCounters {
            daily_file: Some(DailyFile { dir: dir.to_path_buf(), written: Mutex::new(None) }),
            ..Self::default()
        };
        for (tenant, daily) in daily::load(dir, today) {
            let st = TenantState { daily, day: today, ..TenantState::default() };
            counters.shard(&tenant).lock().tenants.insert(Arc::from(tenant), st);
        }
        // What was just read is what the file holds: nothing to write until a count changes.
        *counters.daily_file.as_ref().expect("set above").written.lock() = Some((today, 0));
        counters
    }

    /// Writes the daily counts (see [`MemoryCounters::open`]) when they changed since the last
    /// write: the tenants with a count above zero on `now`'s UTC day — or on a later day some
    /// tenant already counts in (an admission stamped just after midnight, `now` just before).
    /// Off the request path: the housekeeper calls it every few seconds and at shutdown. Returns
    /// whether it wrote; nothing to do without a data directory.
    pub fn persist_daily_now(&self, now: UnixMillis) -> io::Result<bool> {
        let Some(file) = &self.daily_file else { return Ok(false) };
        let mut written = file.written.lock();
        // Cheap check first: one short lock per shard, no copy.
        let changes: u64 = self.shards.iter().map(|s| s.lock().daily_changes).sum();
        let today = utc_day(now);
        if written.is_some_and(|(day, seen)| seen == changes && day >= today) {
            return Ok(false);
        }
        // The latest day a tenant counts in: `today`, or the next day for an admission stamped
        // just after midnight while `now` is just before it.
        let counted = |st: &&TenantState| st.daily > 0 && st.day >= today;
        let day = self
            .shards
            .iter()
            .filter_map(|shard| shard.lock().tenants.values().filter(counted).map(|st| st.day).max())
            .max()
            .unwrap_or(today);
        // Shard by shard: each one's counts gathered with its change count under one lock hold,
        // written to the file after the lock is let go (never the whole snapshot in memory).
        // A count of a later day than `day` (midnight passed since) is not in this snapshot:
        // then the next call writes again.
        let (mut changes, mut later) = (0, false);
        daily::write(&file.dir, day, |sink| {
            for shard in &self.shards {
                {
                    let shard = shard.lock();
                    changes += shard.daily_changes;
                    for (tenant, st) in shard.tenants.iter().filter(|(_, st)| st.daily > 0 && st.day >= day) {
                        if st.day == day {
                            sink.push(tenant, st.daily);
                        } else {
                            later = true;
                        }
                    }
                }
                sink.end_piece()?;
            }
            Ok(())
        })?;
        *written = if later { None } else { Some((day, changes)) };
        Ok(true)
    }

    fn shard(&self, tenant: &str) -> &Mutex<Shard> {
        // FNV-1a: cheap and stable; the map inside uses a seeded hasher against adversarial keys.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in tenant.as_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        &self.shards[(h % SHARDS as u64) as usize]
    }

    /// Synchronous core of `admit` (also used by benches).
    pub fn admit_now(&self, req: &AdmitRequest<'_>) -> (Ticket, CountersView) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.shard(req.tenant).lock();
        let shard = &mut *guard;
        let key = match shard.tenants.get_key_value(req.tenant) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(req.tenant);
                shard.tenants.insert(k.clone(), TenantState::default());
                k
            }
        };
        let st = shard.tenants.get_mut(&key).expect("inserted above");
        st.prune(req.now);
        let tenant_view = st.view();
        st.daily += 1;
        shard.daily_changes += 1;
        st.minute.push(req.now, req.tokens);
        if let Some(ttl) = req.lease_ttl_ms {
            let seq = NonZeroU64::new(seq).expect("sequence numbers start at 1");
            st.leases.push(Lease { seq, expires: req.now + ttl });
        }
        let global_view = {
            let mut g = self.global.lock();
            g.prune(req.now);
            let view = g.view();
            g.add(req.now, &mut st.slot);
            view
        };
        drop(guard);
        let ticket =
            Ticket { seq, tenant: key, at: req.now, tokens: req.tokens, has_lease: req.lease_ttl_ms.is_some() };
        (ticket, CountersView { global: global_view, tenant: tenant_view })
    }

    pub fn rollback_now(&self, t: &Ticket) {
        let mut guard = self.shard(&t.tenant).lock();
        let shard = &mut *guard;
        if let Some(st) = shard.tenants.get_mut(&t.tenant) {
            if st.day == utc_day(t.at) && st.daily > 0 {
                st.daily -= 1;
                shard.daily_changes += 1;
            }
            st.minute.remove(t.at, t.tokens);
            st.leases.retain(|l| l.seq.get() != t.seq);
            // A tenant is only forgotten once it has nothing left in the global window either
            // (see `sweep_now`), so without its state there is nothing to take out there.
            self.global.lock().remove(t.at, st.slot);
        }
    }

    pub fn release_now(&self, t: &Ticket) {
        if !t.has_lease {
            return;
        }
        let mut shard = self.shard(&t.tenant).lock();
        if let Some(st) = shard.tenants.get_mut(&t.tenant) {
            st.leases.retain(|l| l.seq.get() != t.seq);
        }
    }

    pub fn sweep_now(&self, now: UnixMillis) -> SweepStats {
        let mut stats = SweepStats::default();
        self.global.lock().prune(now);
        for shard in &self.shards {
            let mut shard = shard.lock();
            let map = &mut shard.tenants;
            map.retain(|_, st| {
                stats.leases_expired += st.prune(now);
                if !st.is_idle() {
                    return true;
                }
                // Idle, and nothing left in the global window either (an entry can outlive the
                // tenant's own copy there when admissions arrived out of time order).
                let mut g = self.global.lock();
                if g.counts(st.slot) {
                    return true;
                }
                g.release(st.slot);
                stats.tenants_reclaimed += 1;
                false
            });
            stats.tenants_tracked += map.len() as u64;
            if map.capacity() > 64 && map.capacity() > map.len() * 4 {
                map.shrink_to_fit();
            }
        }
        stats
    }
}

impl super::CountersNow for MemoryCounters {
    fn admit_now(&self, req: &AdmitRequest<'_>) -> (Ticket, CountersView) {
        MemoryCounters::admit_now(self, req)
    }
    fn rollback_now(&self, ticket: &Ticket) {
        MemoryCounters::rollback_now(self, ticket)
    }
    fn release_now(&self, ticket: &Ticket) {
        MemoryCounters::release_now(self, ticket)
    }
}

#[async_trait]
impl Counters for MemoryCounters {
    fn now(&self) -> Option<&dyn super::CountersNow> {
        Some(self)
    }

    async fn admit(&self, req: &AdmitRequest<'_>) -> Result<(Ticket, CountersView), StoreError> {
        Ok(self.admit_now(req))
    }

    async fn rollback(&self, ticket: &Ticket) -> Result<(), StoreError> {
        self.rollback_now(ticket);
        Ok(())
    }

    async fn release_lease(&self, ticket: &Ticket) -> Result<(), StoreError> {
        self.release_now(ticket);
        Ok(())
    }

    async fn park_lease(&self, reservation_id: &str, ticket: &Ticket, _ttl_ms: u64) -> Result<(), StoreError> {
        if ticket.has_lease {
            let mut m = self.parked.lock();
            if m.len() >= MAX_PARKED {
                m.clear();
            }
            m.insert(reservation_id.to_string(), ticket.clone());
        }
        Ok(())
    }

    async fn release_parked_lease(&self, _tenant: &str, reservation_id: &str) -> Result<(), StoreError> {
        let parked = self.parked.lock().remove(reservation_id);
        if let Some(ticket) = parked {
            self.release_now(&ticket);
        }
        Ok(())
    }

    async fn set_global_block(&self, until: UnixMillis) -> Result<(), StoreError> {
        let mut g = self.global.lock();
        g.block_until = Some(g.block_until.map_or(until, |u| u.max(until)));
        Ok(())
    }

    async fn clear_global_block(&self) -> Result<bool, StoreError> {
        Ok(self.global.lock().block_until.take().is_some())
    }

    async fn tenant_view(&self, tenant: &str, now: UnixMillis) -> Result<TenantView, StoreError> {
        let mut shard = self.shard(tenant).lock();
        Ok(shard.tenants.get_mut(tenant).map_or_else(TenantView::default, |st| {
            st.prune(now);
            st.view()
        }))
    }

    async fn global_view(&self, now: UnixMillis) -> Result<GlobalView, StoreError> {
        let mut g = self.global.lock();
        g.prune(now);
        Ok(g.view())
    }

    async fn sweep(&self, now: UnixMillis) -> Result<SweepStats, StoreError> {
        Ok(self.sweep_now(now))
    }

    fn persist_daily(&self, now: UnixMillis) -> Result<bool, StoreError> {
        self.persist_daily_now(now).map_err(|e| StoreError::Unavailable(format!("daily counts snapshot: {e}")))
    }
}

/// In-process runtime policy; opened on a data directory ([`MemoryPolicy::open`]) its runtime
/// knobs and version survive a restart (see the module docs, `# Restarts`).
pub struct MemoryPolicy {
    current: RwLock<Arc<Policy>>,
    /// Serialises updates so no change is lost between read and publish.
    write: Mutex<()>,
    /// Where the runtime knobs are kept; `None`: in memory only.
    disk: Option<PolicyDisk>,
    /// What `open` changed against the configuration (see [`MemoryPolicy::take_start_changes`]).
    start_changes: Mutex<Option<serde_json::Value>>,
}

struct PolicyDisk {
    dir: PathBuf,
    /// The local configuration's knobs (the file's `base`).
    base: Knobs,
}

impl MemoryPolicy {
    /// A policy in memory only (nothing survives the process).
    pub fn new(initial: Policy) -> Self {
        MemoryPolicy {
            current: RwLock::new(Arc::new(initial)),
            write: Mutex::new(()),
            disk: None,
            start_changes: Mutex::new(None),
        }
    }

    /// The runtime policy kept in `dir` (`store::runtime_policy`): starts from `config` (the local
    /// configuration's policy) with the runtime changes saved there merged in per knob, at a
    /// version after the saved one, and saves that at once (so the next start compares with this
    /// configuration, and a version is never handed out twice). Never fails: an unreadable file
    /// is moved aside, a failed write is logged (the next change reports it).
    pub fn open(dir: &Path, config: Policy) -> Self {
        let found = runtime_policy::restore(dir, &config);
        let initial = found.policy(&config);
        let base = Knobs::of(&config);
        if !matches!(found, runtime_policy::Found::Nothing) {
            if let Err(e) = runtime_policy::write(dir, initial.version, &Knobs::of(&initial), &base) {
                tracing::warn!(
                    path = %dir.join(runtime_policy::FILE).display(),
                    error = %e,
                    "runtime policy: cannot save the policy at start; a runtime change (PATCH) will fail until \
                     PREAUTH_DATA_DIR is writable again"
                );
            }
        }
        MemoryPolicy {
            current: RwLock::new(Arc::new(initial)),
            write: Mutex::new(()),
            disk: Some(PolicyDisk { dir: dir.to_path_buf(), base }),
            start_changes: Mutex::new(found.changes()),
        }
    }

    /// What [`MemoryPolicy::open`] changed against the configuration (the runtime knobs
    /// restored or dropped, an unreadable file), once, for the restart's `runtime_changed`
    /// event; `None` after a first start, or when already taken.
    pub fn take_start_changes(&self) -> Option<serde_json::Value> {
        self.start_changes.lock().take()
    }
}

#[async_trait]
impl PolicyStore for MemoryPolicy {
    fn current(&self) -> Arc<Policy> {
        self.current.read().clone()
    }

    /// Opened on a data directory, the new version and knobs are saved (blocking file I/O and an
    /// fsync, a few milliseconds: called by the admin listener and the reloader, never on the
    /// request path) before they are published. When that fails, a change of the runtime knobs
    /// is refused and nothing changes; a change of local parts only (a `SIGHUP` reload of the
    /// files, not saved) is applied all the same, with a warning.
    async fn update(&self, patch: PolicyPatch) -> Result<Arc<Policy>, StoreError> {
        let _w = self.write.lock();
        let before = self.current.read().clone();
        let mut next = (*before).clone();
        patch(&mut next);
        next.version = before.version + 1;
        if let Some(disk) = &self.disk {
            let knobs = Knobs::of(&next);
            if let Err(e) = runtime_policy::write(&disk.dir, next.version, &knobs, &disk.base) {
                let path = disk.dir.join(runtime_policy::FILE);
                if knobs != Knobs::of(&before) {
                    return Err(StoreError::Unavailable(format!(
                        "the runtime policy could not be saved to {} ({e}); it would not survive a restart, so \
                         nothing was changed and policy_version {} is still in force. Check the data volume \
                         (full disk, disk errors, permissions of PREAUTH_DATA_DIR)",
                        path.display(),
                        before.version
                    )));
                }
                tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    policy_version = next.version,
                    "runtime policy: cannot save the new policy_version (the change itself is not a runtime \
                     setting and is applied); check PREAUTH_DATA_DIR"
                );
            }
        }
        let next = Arc::new(next);
        *self.current.write() = next.clone();
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::time::{parse_rfc3339, MS_PER_DAY};
    use crate::ledger::outbox::tests::TempDir;

    fn req(tenant: &str, now: UnixMillis, lease: Option<u64>) -> AdmitRequest<'_> {
        AdmitRequest { tenant, now, tokens: 10, lease_ttl_ms: lease }
    }

    #[test]
    fn admit_returns_pre_increment_views() {
        let c = MemoryCounters::new();
        let t0 = parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        let (_, v1) = c.admit_now(&req("a", t0, None));
        assert_eq!(v1, CountersView::default());
        let (_, v2) = c.admit_now(&req("b", t0 + 1, None));
        assert_eq!(v2.global.requests_last_minute, 1);
        assert_eq!(v2.global.distinct_tenants_last_minute, 1);
        let (_, v3) = c.admit_now(&req("a", t0 + 2, None));
        assert_eq!((v3.tenant.daily_requests, v3.tenant.minute_requests, v3.tenant.tokens_last_minute), (1, 1, 10));
        assert_eq!(v3.tenant.minute_oldest, Some(t0));
        assert_eq!((v3.global.requests_last_minute, v3.global.distinct_tenants_last_minute), (2, 2));
    }

    #[test]
    fn windows_slide_exactly_at_sixty_seconds() {
        let c = MemoryCounters::new();
        let t0 = parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        c.admit_now(&req("a", t0, None));
        let (_, v) = c.admit_now(&req("a", t0 + 59_999, None));
        assert_eq!(v.tenant.minute_requests, 1);
        assert_eq!(v.global.requests_last_minute, 1);
        let (_, v) = c.admit_now(&req("a", t0 + 60_000, None));
        assert_eq!(v.tenant.minute_requests, 1, "the first entry left at exactly 60 s");
        assert_eq!(v.tenant.daily_requests, 2);
    }

    #[test]
    fn daily_counts_reset_at_utc_midnight() {
        let c = MemoryCounters::new();
        let late = parse_rfc3339("2026-11-25T23:59:59Z").unwrap();
        c.admit_now(&req("a", late, None));
        let (_, v) = c.admit_now(&req("a", late + 999, None));
        assert_eq!(v.tenant.daily_requests, 1);
        let (_, v) = c.admit_now(&req("a", late + 1000, None));
        assert_eq!(v.tenant.daily_requests, 0, "new UTC day");
    }

    #[test]
    fn leases_expire_and_release() {
        let c = MemoryCounters::new();
        let t0 = parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        let (t1, _) = c.admit_now(&req("a", t0, Some(5_000)));
        let (_t2, v) = c.admit_now(&req("a", t0 + 1, Some(5_000)));
        assert_eq!(v.tenant.in_flight, 1);
        c.release_now(&t1);
        let (_, v) = c.admit_now(&req("a", t0 + 2, Some(5_000)));
        assert_eq!(v.tenant.in_flight, 1, "released lease is gone, second one still live");
        let (_, v) = c.admit_now(&req("a", t0 + 5_001, Some(5_000)));
        assert_eq!(v.tenant.in_flight, 1, "the t0+1 lease expired at t0+5001; the t0+2 one lives until t0+5002");
        let (_, v) = c.admit_now(&req("a", t0 + 5_002, Some(5_000)));
        assert_eq!(v.tenant.in_flight, 1, "the t0+2 lease expired; only the one taken at t0+5001 is live");
    }

    #[test]
    fn rollback_undoes_everything() {
        let c = MemoryCounters::new();
        let t0 = parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        let (t, _) = c.admit_now(&req("a", t0, Some(1000)));
        c.rollback_now(&t);
        let (_, v) = c.admit_now(&req("b", t0 + 1, Some(1000)));
        assert_eq!(v.global, GlobalView::default());
        let (_, v) = c.admit_now(&req("a", t0 + 2, Some(1000)));
        assert_eq!(v.tenant, TenantView::default());
    }

    #[test]
    fn same_millisecond_admissions_share_an_entry_and_roll_back_exactly() {
        let c = MemoryCounters::new();
        let t0 = parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        let (_, _) = c.admit_now(&req("a", t0, None));
        let (t2, _) = c.admit_now(&req("a", t0, None));
        let (_, v) = c.admit_now(&req("a", t0, None));
        assert_eq!((v.tenant.minute_requests, v.tenant.tokens_last_minute, v.global.requests_last_minute), (2, 20, 2));
        assert_eq!(c.global.lock().window.len(), 1, "one entry for one tenant and millisecond");
        c.rollback_now(&t2);
        let (_, v) = c.admit_now(&req("b", t0, None));
        assert_eq!((v.global.requests_last_minute, v.global.distinct_tenants_last_minute), (2, 1));
        let (_, v) = c.admit_now(&req("a", t0 + 1, None));
        assert_eq!((v.tenant.minute_requests, v.tenant.daily_requests, v.tenant.tokens_last_minute), (2, 2, 20));
        let (_, v) = c.admit_now(&req("a", t0 + 60_000, None));
        assert_eq!(v.tenant.minute_requests, 1, "the t0 entry (2 requests) left the window together");
        assert_eq!(v.global.requests_last_minute, 1);
    }

    #[test]
    fn distinct_tenants_count_each_tenant_once_and_slots_are_reused() {
        let c = MemoryCounters::new();
        let t0 = parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        let (ta, _) = c.admit_now(&req("a", t0, None));
        c.admit_now(&req("b", t0 + 1, None));
        let (_, v) = c.admit_now(&req("a", t0 + 2, None));
        assert_eq!((v.global.requests_last_minute, v.global.distinct_tenants_last_minute), (2, 2));
        c.rollback_now(&ta);
        let (_, v) = c.admit_now(&req("c", t0 + 3, None));
        assert_eq!((v.global.requests_last_minute, v.global.distinct_tenants_last_minute), (2, 2), "a has t0+2 left");
        // A minute later all of them have left.
        for i in 0..10 {
            c.admit_now(&req(&format!("n{i}"), t0 + 60_003, None));
        }
        let (_, v) = c.admit_now(&req("a", t0 + 60_004, None));
        assert_eq!((v.global.requests_last_minute, v.global.distinct_tenants_last_minute), (10, 10));
        assert_eq!(c.global.lock().slots.len(), 13, "one slot per tracked tenant");
        let s = c.sweep_now(t0 + 86_400_000);
        assert_eq!(s.tenants_reclaimed, 13);
        let (_, v) = c.admit_now(&req("x", t0 + 86_400_000, None));
        assert_eq!(v.global.distinct_tenants_last_minute, 0);
        let (_, v) = c.admit_now(&req("y", t0 + 86_400_000, None));
        assert_eq!(v.global.distinct_tenants_last_minute, 1);
        assert_eq!(c.global.lock().slots.len(), 13, "freed slots are taken first");
    }

    #[test]
    fn a_tenant_still_in_the_global_window_is_not_forgotten() {
        let c = MemoryCounters::new();
        let late = parse_rfc3339("2026-11-25T23:59:59Z").unwrap();
        c.admit_now(&req("b", late + 500, None));
        // Out of time order: a's entry sits behind b's and leaves the global window after it.
        c.admit_now(&req("a", late, None));
        let now = late + 60_100;
        let s = c.sweep_now(now);
        assert_eq!((s.tenants_tracked, s.tenants_reclaimed), (2, 0), "a is idle but still counted globally");
        c.admit_now(&req("a", now, None));
        let (_, v) = c.admit_now(&req("z", now, None));
        assert_eq!(v.global.distinct_tenants_last_minute, 2, "a is counted once");
        let s = c.sweep_now(now + MS_PER_MINUTE);
        assert_eq!((s.tenants_tracked, s.tenants_reclaimed), (2, 1), "b had nothing today; a and z have");
    }

    #[test]
    fn sweep_reclaims_idle_tenants() {
        let c = MemoryCounters::new();
        let t0 = parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        for i in 0..1000 {
            c.admit_now(&req(&format!("t{i}"), t0, None));
        }
        let s = c.sweep_now(t0 + 1000);
        assert_eq!((s.tenants_tracked, s.tenants_reclaimed), (1000, 0), "counted today: kept");
        let s = c.sweep_now(t0 + 86_400_000);
        assert_eq!((s.tenants_tracked, s.tenants_reclaimed), (0, 1000));
    }

    fn daily_of(c: &MemoryCounters, tenant: &str, now: UnixMillis) -> u64 {
        let mut shard = c.shard(tenant).lock();
        shard.tenants.get_mut(tenant).map_or(0, |st| {
            st.prune(now);
            st.daily
        })
    }

    #[test]
    fn daily_counts_survive_a_restart_on_the_same_day() {
        let tmp = TempDir::new("counters");
        let d = tmp.0.clone();
        let t0 = parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        let c = MemoryCounters::open(&d, t0);
        assert!(!c.persist_daily_now(t0).unwrap(), "nothing counted: nothing to write");
        c.admit_now(&req("free-tenant", t0, None));
        c.admit_now(&req("pro", t0 + 1, Some(5_000)));
        c.admit_now(&req("pro", t0 + 2, None));
        let (denied, _) = c.admit_now(&req("pro", t0 + 3, None));
        c.rollback_now(&denied);
        assert!(c.persist_daily_now(t0 + 10).unwrap());
        assert!(!c.persist_daily_now(t0 + 20).unwrap(), "unchanged since: not written again");
        drop(c);

        let later = t0 + 5 * 3_600_000;
        let c = MemoryCounters::open(&d, later);
        assert_eq!((daily_of(&c, "free-tenant", later), daily_of(&c, "pro", later)), (1, 2));
        let (_, v) = c.admit_now(&req("free-tenant", later, Some(5_000)));
        assert_eq!(v.tenant.daily_requests, 1, "the quota already used before the restart");
        assert_eq!((v.tenant.minute_requests, v.tenant.in_flight), (0, 0), "windows and leases start afresh");
        assert_eq!(v.global, GlobalView::default());
        assert_eq!(c.sweep_now(later).tenants_reclaimed, 0, "restored tenants count today: kept");
        assert!(c.persist_daily_now(later).unwrap());
        drop(c);
        let c = MemoryCounters::open(&d, later);
        assert_eq!(daily_of(&c, "free-tenant", later), 2);
    }

    #[test]
    fn a_rollback_after_a_snapshot_is_written_too() {
        let tmp = TempDir::new("counters");
        let d = tmp.0.clone();
        let t0 = parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        let c = MemoryCounters::open(&d, t0);
        let (t, _) = c.admit_now(&req("a", t0, None));
        assert!(c.persist_daily_now(t0).unwrap());
        // The decision refused it after the snapshot was taken: the count goes back down.
        c.rollback_now(&t);
        assert!(c.persist_daily_now(t0 + 1).unwrap());
        assert_eq!(daily_of(&MemoryCounters::open(&d, t0 + 2), "a", t0 + 2), 0);
    }

    #[test]
    fn daily_counts_of_another_day_are_not_restored() {
        let tmp = TempDir::new("counters");
        let d = tmp.0.clone();
        let late = parse_rfc3339("2026-11-25T23:59:59Z").unwrap();
        let c = MemoryCounters::open(&d, late);
        c.admit_now(&req("a", late, None));
        // An admission stamped just after midnight while the writer's clock is still before it:
        // the snapshot is of the new day (the old day's counts are over).
        c.admit_now(&req("b", late + 1_000, None));
        assert!(c.persist_daily_now(late).unwrap());
        drop(c);
        let c = MemoryCounters::open(&d, late + 1_000);
        assert_eq!((daily_of(&c, "a", late + 1_000), daily_of(&c, "b", late + 1_000)), (0, 1));
        drop(c);
        let c = MemoryCounters::open(&d, late + 1_000 + MS_PER_DAY);
        assert_eq!(daily_of(&c, "b", late + 1_000 + MS_PER_DAY), 0, "a day later: ignored");
        assert_eq!(c.sweep_now(late + 1_000 + MS_PER_DAY).tenants_tracked, 0, "nothing restored");
    }

    #[test]
    fn an_unreadable_daily_snapshot_starts_from_zero_and_is_replaced() {
        let tmp = TempDir::new("counters");
        let d = tmp.0.clone();
        let t0 = parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        std::fs::write(d.join(daily::FILE), b"{\"day\": 20417, \"counts\": {\"a\": ").unwrap();
        let c = MemoryCounters::open(&d, t0);
        assert_eq!(daily_of(&c, "a", t0), 0);
        assert!(d.join(daily::CORRUPT_FILE).exists(), "moved aside for the operator");
        c.admit_now(&req("a", t0, None));
        assert!(c.persist_daily_now(t0).unwrap());
        assert_eq!(daily_of(&MemoryCounters::open(&d, t0), "a", t0), 1);
    }

    #[test]
    fn counters_without_a_data_directory_write_nothing() {
        let c = MemoryCounters::new();
        let t0 = parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        c.admit_now(&req("a", t0, None));
        assert!(!c.persist_daily_now(t0).unwrap());
    }

    #[tokio::test]
    async fn policy_updates_bump_the_version() {
        let p = MemoryPolicy::new(Policy::for_test());
        let v = p.update(Box::new(|p| p.kill_switch = true)).await.unwrap();
        assert_eq!((v.version, v.kill_switch), (2, true));
        assert!(p.current().kill_switch);
    }

    #[tokio::test]
    async fn a_runtime_change_survives_a_restart_and_the_version_never_goes_back() {
        let tmp = TempDir::new("counters");
        let d = tmp.0.clone();
        let config = Policy::for_test();
        let p = MemoryPolicy::open(&d, config.clone());
        assert_eq!(p.current().version, 1, "a first start is the configuration as is");
        assert!(!d.join(runtime_policy::FILE).exists(), "nothing to keep yet");
        let v = p.update(Box::new(|p| p.kill_switch = true)).await.unwrap();
        assert_eq!(v.version, 2);
        let mut versions = vec![v.version];
        for _ in 0..3 {
            let p = MemoryPolicy::open(&d, config.clone());
            assert!(p.current().kill_switch, "a plain restart keeps the kill switch");
            versions.push(p.current().version);
        }
        assert_eq!(versions, vec![2, 3, 4, 5], "each start resumes after the last");
        // A reload of the files (local parts only) is saved too: its version is not handed out again.
        let p = MemoryPolicy::open(&d, config.clone());
        let reloaded = p.update(Box::new(|_| {})).await.unwrap().version;
        assert!(MemoryPolicy::open(&d, config.clone()).current().version > reloaded);
    }

    #[tokio::test]
    async fn a_redeployed_configuration_wins_and_is_the_new_base() {
        let tmp = TempDir::new("counters");
        let d = tmp.0.clone();
        let config = Policy::for_test();
        let p = MemoryPolicy::open(&d, config.clone());
        p.update(Box::new(|p| p.fair_use.per_minute_cap = 5)).await.unwrap();
        let mut redeployed = config.clone();
        redeployed.fair_use.per_minute_cap = 12;
        assert_eq!(MemoryPolicy::open(&d, redeployed.clone()).current().fair_use.per_minute_cap, 12);
        // That start saved the new configuration as the base: going back to the old
        // configuration later does not bring the superseded runtime change back.
        assert_eq!(MemoryPolicy::open(&d, config.clone()).current().fair_use.per_minute_cap, 30);
    }

    #[tokio::test]
    async fn a_runtime_change_that_cannot_be_saved_is_refused_and_changes_nothing() {
        let tmp = TempDir::new("counters");
        let d = tmp.0.clone();
        let p = MemoryPolicy::open(&d, Policy::for_test());
        p.update(Box::new(|p| p.approval_issuance_frozen = true)).await.unwrap();
        // The temporary file's name taken by a directory: the write fails (even as root).
        std::fs::create_dir(d.join(runtime_policy::TMP_FILE)).unwrap();
        let before = p.current();
        let e = p.update(Box::new(|p| p.kill_switch = true)).await.unwrap_err();
        let StoreError::Unavailable(msg) = e else { panic!("{e:?}") };
        assert!(msg.contains("runtime-policy.json") && msg.contains("nothing was changed"), "{msg}");
        assert!(Arc::ptr_eq(&p.current(), &before), "no half-applied state");
        assert!(!p.current().kill_switch);
        // A reload of local parts still goes through (it is not a saved setting).
        let v = p.update(Box::new(|_| {})).await.unwrap();
        assert_eq!(v.version, before.version + 1);
        std::fs::remove_dir(d.join(runtime_policy::TMP_FILE)).unwrap();
        assert!(MemoryPolicy::open(&d, Policy::for_test()).current().approval_issuance_frozen, "the file is intact");
    }

    #[tokio::test]
    async fn an_unreadable_runtime_policy_file_starts_from_the_configuration() {
        let tmp = TempDir::new("counters");
        let d = tmp.0.clone();
        std::fs::write(d.join(runtime_policy::FILE), b"{\"version\": 41, \"knobs\": {\"kill_sw").unwrap();
        let p = MemoryPolicy::open(&d, Policy::for_test());
        assert!(!p.current().kill_switch);
        assert!(d.join(runtime_policy::CORRUPT_FILE).exists(), "moved aside for the operator");
        p.update(Box::new(|p| p.kill_switch = true)).await.unwrap();
        assert!(MemoryPolicy::open(&d, Policy::for_test()).current().kill_switch, "saving works again");
    }
}
