//! Embedded, in-process state for a single replica: exact sliding windows, UTC-day counters and
//! concurrency leases, sharded by tenant to keep lock hold times short.
//!
//! Memory per tracked tenant is bounded by its caps (entries only live for 60 s) and a tenant with
//! nothing in flight and no count for today is forgotten by `sweep`.
//!
//! Owns: `MemoryCounters`, `MemoryPolicy`. Imports: `store` traits, `decide` types, parking_lot.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};

use super::{AdmitRequest, Counters, PolicyPatch, PolicyStore, StoreError, SweepStats, Ticket};
use crate::decide::time::{utc_day, MS_PER_MINUTE};
use crate::decide::{CountersView, GlobalView, Policy, TenantView, UnixMillis};

const SHARDS: usize = 32;

#[derive(Default)]
struct GlobalState {
    /// (admitted at, requests, tenant), oldest first. Admissions of one tenant in the same
    /// millisecond share an entry: exact at the clock's resolution, and memory is bounded by
    /// time (≤ one entry per tenant per ms) instead of growing with the request rate.
    window: VecDeque<(UnixMillis, u32, Arc<str>)>,
    /// Requests in `window`.
    requests: u64,
    /// Requests per tenant inside `window`.
    tenants: HashMap<Arc<str>, u32>,
    block_until: Option<UnixMillis>,
}

impl GlobalState {
    fn prune(&mut self, now: UnixMillis) {
        let horizon = now.saturating_sub(MS_PER_MINUTE);
        while let Some((at, _, _)) = self.window.front() {
            if *at > horizon {
                break;
            }
            let (_, n, tenant) = self.window.pop_front().expect("front exists");
            self.forget(&tenant, n);
        }
        if self.window.is_empty() && self.window.capacity() > 1024 {
            self.window = VecDeque::new();
        }
        if self.block_until.is_some_and(|u| u <= now) {
            self.block_until = None;
        }
    }

    fn add(&mut self, at: UnixMillis, tenant: &Arc<str>) {
        match self.window.back_mut() {
            Some((t, n, who)) if *t == at && Arc::ptr_eq(who, tenant) => *n += 1,
            _ => self.window.push_back((at, 1, tenant.clone())),
        }
        self.requests += 1;
        *self.tenants.entry(tenant.clone()).or_insert(0) += 1;
    }

    /// Takes one admission at `at` by `tenant` back out.
    fn remove(&mut self, at: UnixMillis, tenant: &Arc<str>) {
        if let Some(i) = self.window.iter().rposition(|(t, _, who)| *t == at && **who == **tenant) {
            let entry = &mut self.window[i];
            entry.1 -= 1;
            if entry.1 == 0 {
                self.window.remove(i);
            }
            self.forget(tenant, 1);
        }
    }

    fn forget(&mut self, tenant: &Arc<str>, requests: u32) {
        self.requests = self.requests.saturating_sub(u64::from(requests));
        if let Some(n) = self.tenants.get_mut(tenant) {
            *n = n.saturating_sub(requests);
            if *n == 0 {
                self.tenants.remove(tenant);
            }
        }
    }

    fn view(&self) -> GlobalView {
        GlobalView {
            requests_last_minute: self.requests,
            distinct_tenants_last_minute: self.tenants.len() as u64,
            block_until: self.block_until,
        }
    }
}

#[derive(Default)]
struct TenantState {
    day: u32,
    daily: u64,
    /// (admitted at, requests, estimated tokens) of the last 60 s, oldest first: both the
    /// per-minute and the token-rate window; admissions in the same millisecond share an entry.
    minute: VecDeque<(UnixMillis, u32, u64)>,
    minute_count: u64,
    tokens_sum: u64,
    /// (seq, expires at).
    leases: Vec<(u64, UnixMillis)>,
}

impl TenantState {
    fn prune(&mut self, now: UnixMillis) -> u64 {
        let today = utc_day(now);
        if self.day != today {
            self.day = today;
            self.daily = 0;
        }
        let horizon = now.saturating_sub(MS_PER_MINUTE);
        while let Some((at, count, n)) = self.minute.front() {
            if *at > horizon {
                break;
            }
            self.minute_count -= u64::from(*count);
            self.tokens_sum -= n;
            self.minute.pop_front();
        }
        if self.minute.is_empty() && self.minute.capacity() > 0 {
            self.minute = VecDeque::new();
        }
        let before = self.leases.len();
        self.leases.retain(|(_, exp)| *exp > now);
        if self.leases.is_empty() && self.leases.capacity() > 0 {
            self.leases = Vec::new();
        }
        (before - self.leases.len()) as u64
    }

    fn view(&self) -> TenantView {
        TenantView {
            daily_requests: self.daily,
            minute_requests: self.minute_count,
            minute_oldest: self.minute.front().map(|(at, _, _)| *at),
            in_flight: self.leases.len() as u64,
            tokens_last_minute: self.tokens_sum,
            tokens_oldest: self.minute.iter().find(|(_, _, n)| *n > 0).map(|(at, _, _)| *at),
        }
    }

    fn is_idle(&self) -> bool {
        self.daily == 0 && self.minute.is_empty() && self.leases.is_empty()
    }
}

/// In-process counters (embedded mode).
pub struct MemoryCounters {
    global: Mutex<GlobalState>,
    shards: Vec<Mutex<HashMap<Arc<str>, TenantState>>>,
    seq: AtomicU64,
}

impl Default for MemoryCounters {
    fn default() -> Self {
        MemoryCounters {
            global: Mutex::new(GlobalState::default()),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            seq: AtomicU64::new(1),
        }
    }
}

impl MemoryCounters {
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, tenant: &str) -> &Mutex<HashMap<Arc<str>, TenantState>> {
        // FNV-1a: cheap and stable; the map inside uses SipHash against adversarial keys.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in tenant.as_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        &self.shards[(h % SHARDS as u64) as usize]
    }

    /// Synchronous core of `admit` (also used by benches).
    pub fn admit_now(&self, req: &AdmitRequest<'_>) -> (Ticket, CountersView) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tenant_key, tenant_view) = {
            let mut shard = self.shard(req.tenant).lock();
            let key = match shard.get_key_value(req.tenant) {
                Some((k, _)) => k.clone(),
                None => {
                    let k: Arc<str> = Arc::from(req.tenant);
                    shard.insert(k.clone(), TenantState::default());
                    k
                }
            };
            let st = shard.get_mut(&key).expect("inserted above");
            st.prune(req.now);
            let view = st.view();
            st.daily += 1;
            match st.minute.back_mut() {
                Some((at, count, tokens)) if *at == req.now => {
                    *count += 1;
                    *tokens += req.tokens;
                }
                _ => st.minute.push_back((req.now, 1, req.tokens)),
            }
            st.minute_count += 1;
            st.tokens_sum += req.tokens;
            if let Some(ttl) = req.lease_ttl_ms {
                st.leases.push((seq, req.now + ttl));
            }
            (key, view)
        };
        let global_view = {
            let mut g = self.global.lock();
            g.prune(req.now);
            let view = g.view();
            g.add(req.now, &tenant_key);
            view
        };
        let ticket =
            Ticket { seq, tenant: tenant_key, at: req.now, tokens: req.tokens, has_lease: req.lease_ttl_ms.is_some() };
        (ticket, CountersView { global: global_view, tenant: tenant_view })
    }

    pub fn rollback_now(&self, t: &Ticket) {
        {
            let mut shard = self.shard(&t.tenant).lock();
            if let Some(st) = shard.get_mut(&t.tenant) {
                if st.day == utc_day(t.at) {
                    st.daily = st.daily.saturating_sub(1);
                }
                if let Some(i) = st.minute.iter().rposition(|(at, _, _)| *at == t.at) {
                    let entry = &mut st.minute[i];
                    entry.1 -= 1;
                    entry.2 = entry.2.saturating_sub(t.tokens);
                    if entry.1 == 0 {
                        st.minute.remove(i);
                    }
                    st.minute_count -= 1;
                    st.tokens_sum = st.tokens_sum.saturating_sub(t.tokens);
                }
                st.leases.retain(|(s, _)| *s != t.seq);
            }
        }
        self.global.lock().remove(t.at, &t.tenant);
    }

    pub fn release_now(&self, t: &Ticket) {
        if !t.has_lease {
            return;
        }
        let mut shard = self.shard(&t.tenant).lock();
        if let Some(st) = shard.get_mut(&t.tenant) {
            st.leases.retain(|(s, _)| *s != t.seq);
            if st.leases.is_empty() {
                st.leases = Vec::new();
            }
        }
    }

    pub fn sweep_now(&self, now: UnixMillis) -> SweepStats {
        let mut stats = SweepStats::default();
        for shard in &self.shards {
            let mut map = shard.lock();
            map.retain(|_, st| {
                stats.leases_expired += st.prune(now);
                let keep = !st.is_idle();
                stats.tenants_reclaimed += u64::from(!keep);
                keep
            });
            stats.tenants_tracked += map.len() as u64;
            if map.capacity() > 64 && map.capacity() > map.len() * 4 {
                map.shrink_to_fit();
            }
        }
        self.global.lock().prune(now);
        stats
    }
}

#[async_trait]
impl Counters for MemoryCounters {
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

    async fn set_global_block(&self, until: UnixMillis) -> Result<(), StoreError> {
        let mut g = self.global.lock();
        g.block_until = Some(g.block_until.map_or(until, |u| u.max(until)));
        Ok(())
    }

    async fn tenant_view(&self, tenant: &str, now: UnixMillis) -> Result<TenantView, StoreError> {
        let mut shard = self.shard(tenant).lock();
        Ok(shard.get_mut(tenant).map_or_else(TenantView::default, |st| {
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
}

/// In-process runtime policy.
pub struct MemoryPolicy {
    current: RwLock<Arc<Policy>>,
    /// Serialises updates so no change is lost between read and publish.
    write: Mutex<()>,
}

impl MemoryPolicy {
    pub fn new(initial: Policy) -> Self {
        MemoryPolicy { current: RwLock::new(Arc::new(initial)), write: Mutex::new(()) }
    }
}

#[async_trait]
impl PolicyStore for MemoryPolicy {
    fn current(&self) -> Arc<Policy> {
        self.current.read().clone()
    }

    async fn update(&self, patch: PolicyPatch) -> Result<Arc<Policy>, StoreError> {
        let _w = self.write.lock();
        let mut next = (**self.current.read()).clone();
        patch(&mut next);
        next.version = self.current.read().version + 1;
        let next = Arc::new(next);
        *self.current.write() = next.clone();
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::time::parse_rfc3339;

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

    #[tokio::test]
    async fn policy_updates_bump_the_version() {
        let p = MemoryPolicy::new(Policy::for_test());
        let v = p.update(Box::new(|p| p.kill_switch = true)).await.unwrap();
        assert_eq!((v.version, v.kill_switch), (2, true));
        assert!(p.current().kill_switch);
    }
}
