//! [`Counters`] on Redis: the semantics of `store::memory::MemoryCounters` (pre-increment views,
//! exact 60 s sliding windows where an entry at exactly `now − 60 000` is out, UTC-day counters,
//! leases with expiry, rollback undoing everything, a global block that keeps the later end),
//! with the state shared by every replica. See the module docs of `store::redis` for keys and
//! round trips.
//!
//! Owns: the `Counters` impl. Imports: `store::redis` core, `decide` views and time helpers.

use std::sync::Arc;

use async_trait::async_trait;
use redis::Value;

use super::{as_array, as_i64, as_string, opt_ms, proto, RedisStore};
use crate::decide::time::{civil_from_days, utc_day};
use crate::decide::{CountersView, GlobalView, TenantView, UnixMillis};
use crate::store::{AdmitRequest, Counters, StoreError, SweepStats, Ticket};

/// A block key outlives its end by this much (reads compare with the caller's clock).
const BLOCK_MARGIN_MS: u64 = 120_000;

/// `YYYYMMDD` of the UTC day of `now`.
fn day_key(now: UnixMillis) -> String {
    let (y, m, d) = civil_from_days(i64::from(utc_day(now)));
    format!("day:{y:04}{m:02}{d:02}")
}

/// The tenant's keys in script order: minute, tokens, tokens sum, day (of `day_of`), leases.
fn tenant_keys(store: &RedisStore, tenant: &str, day_of: UnixMillis) -> [String; 5] {
    let k = &store.inner.keys;
    [
        k.tenant(tenant, "minute"),
        k.tenant(tenant, "tokens"),
        k.tenant(tenant, "tokens_sum"),
        k.tenant(tenant, &day_key(day_of)),
        k.tenant(tenant, "leases"),
    ]
}

/// Where a gate-API hold's lease is parked (the tenant's slot): its seq in the leases set.
fn parked_key(store: &RedisStore, tenant: &str, reservation_id: &str) -> String {
    store.inner.keys.tenant(tenant, &format!("gate_lease:{reservation_id}"))
}

fn global_keys(store: &RedisStore) -> [String; 4] {
    let k = &store.inner.keys;
    [k.global("window"), k.global("window_tenants"), k.global("block"), k.global("seq")]
}

fn u(v: &Value) -> redis::RedisResult<u64> {
    as_i64(v).map(|i| i.max(0) as u64)
}

/// `{daily, minute, minute_oldest, in_flight, tokens, tokens_oldest}`.
fn tenant_view(v: &[Value]) -> redis::RedisResult<TenantView> {
    if v.len() < 6 {
        return Err(proto(format!("tenant view of {} fields", v.len())));
    }
    Ok(TenantView {
        daily_requests: u(&v[0])?,
        minute_requests: u(&v[1])?,
        minute_oldest: opt_ms(as_i64(&v[2])?),
        in_flight: u(&v[3])?,
        tokens_last_minute: u(&v[4])?,
        tokens_oldest: opt_ms(as_i64(&v[5])?),
    })
}

/// `{global, distinct, block}`.
fn global_view(v: &[Value]) -> redis::RedisResult<GlobalView> {
    if v.len() < 3 {
        return Err(proto(format!("global view of {} fields", v.len())));
    }
    Ok(GlobalView {
        requests_last_minute: u(&v[0])?,
        distinct_tenants_last_minute: u(&v[1])?,
        block_until: opt_ms(as_i64(&v[2])?),
    })
}

/// A sequence for cluster mode (no shared counter across slots): random, non-zero, below 2^53.
fn random_seq() -> u64 {
    ((uuid::Uuid::new_v4().as_u128() as u64) & ((1u64 << 53) - 1)).max(1)
}

/// The admission script(s) of one request, ready to send: one script on a single node; the
/// global and tenant halves sent together (pipelined, one round trip) in cluster mode.
pub(crate) struct AdmitPlan<'a> {
    single: Option<redis::ScriptInvocation<'a>>,
    halves: Option<(redis::ScriptInvocation<'a>, redis::ScriptInvocation<'a>)>,
    seq: u64,
}

impl AdmitPlan<'_> {
    /// Sends the plan on `c` and parses `(seq, view)`.
    pub(crate) async fn run(self, c: super::Conn) -> redis::RedisResult<(u64, CountersView)> {
        match (self.single, self.halves) {
            (Some(inv), _) => {
                let mut c = c;
                let v = as_array(inv.invoke_async::<Value>(&mut c).await?)?;
                if v.len() < 10 {
                    return Err(proto(format!("admit reply of {} fields", v.len())));
                }
                let seq: u64 = as_string(&v[0])?.parse().map_err(|_| proto("admit: bad seq"))?;
                let tenant = tenant_view(&v[1..7])?;
                let global = global_view(&v[7..10])?;
                Ok((seq, CountersView { global, tenant }))
            }
            (None, Some((g, t))) => {
                let (mut c1, mut c2) = (c.clone(), c);
                let (gv, tv) = tokio::try_join!(g.invoke_async::<Value>(&mut c1), t.invoke_async::<Value>(&mut c2))?;
                let global = global_view(&as_array(gv)?)?;
                let tenant = tenant_view(&as_array(tv)?)?;
                Ok((self.seq, CountersView { global, tenant }))
            }
            (None, None) => Err(proto("empty admit plan")),
        }
    }
}

/// The admission a ticket stands for (what [`RedisStore::plan_admit`] needs), for a step that
/// owns its data (`exec_undoable`).
pub(crate) fn admission_of(t: &Ticket, lease_ttl_ms: Option<u64>) -> AdmitRequest<'_> {
    AdmitRequest { tenant: &t.tenant, now: t.at, tokens: t.tokens, lease_ttl_ms }
}

pub(crate) fn ticket_of(req: &AdmitRequest<'_>, seq: u64) -> Ticket {
    Ticket {
        seq,
        tenant: Arc::from(req.tenant),
        at: req.now,
        tokens: req.tokens,
        has_lease: req.lease_ttl_ms.is_some(),
    }
}

impl RedisStore {
    /// Commands an admission sends: one script on a single node, two (global and tenant halves)
    /// in a cluster.
    pub(crate) fn admit_commands(&self) -> u64 {
        if self.inner.cluster {
            2
        } else {
            1
        }
    }

    /// Gives back an admission nobody waited for (its counts and lease; the rollback is
    /// idempotent, so it is sent again while Redis does not answer), logging a failure: the
    /// windows and the lease then end by their TTLs.
    pub(crate) async fn undo_admission(&self, ticket: &Ticket) {
        if let Err(e) = super::patiently(|| self.rollback(ticket)).await {
            tracing::warn!(error = %e, "an admission nobody waited for could not be rolled back; its counts and lease end by their TTLs");
        }
    }

    /// Prepares the admission of `req` without sending it.
    pub(crate) fn plan_admit(&self, req: &AdmitRequest<'_>) -> AdmitPlan<'_> {
        let s = &self.inner.scripts;
        let tk = tenant_keys(self, req.tenant, req.now);
        let gk = global_keys(self);
        let lease = req.lease_ttl_ms.map_or(-1i64, |t| t.min(i64::MAX as u64) as i64);
        if !self.inner.cluster {
            let mut inv = s.admit.prepare_invoke();
            for k in gk.iter().chain(tk.iter()) {
                inv.key(k);
            }
            inv.arg(req.tenant).arg(req.now).arg(req.tokens).arg(lease);
            AdmitPlan { single: Some(inv), halves: None, seq: 0 }
        } else {
            let seq = random_seq();
            let mut g = s.admit_global.prepare_invoke();
            g.key(&gk[0]).key(&gk[1]).key(&gk[2]).arg(req.tenant).arg(req.now).arg(seq);
            let mut t = s.admit_tenant.prepare_invoke();
            for k in &tk {
                t.key(k);
            }
            t.arg(seq).arg(req.now).arg(req.tokens).arg(lease);
            AdmitPlan { single: None, halves: Some((g, t)), seq }
        }
    }
}

#[async_trait]
impl Counters for RedisStore {
    async fn admit(&self, req: &AdmitRequest<'_>) -> Result<(Ticket, CountersView), StoreError> {
        // The step runs in a task of its own (`exec_undoable`): it owns what it sends.
        let ticket = ticket_of(req, 0);
        let commands = self.admit_commands();
        let (store, lease_ttl_ms, held) = (self.clone(), req.lease_ttl_ms, ticket.clone());
        let run =
            move |c: super::Conn| async move { store.plan_admit(&admission_of(&held, lease_ttl_ms)).run(c).await };
        let (store, taken) = (self.clone(), ticket.clone());
        let undo =
            move |(seq, _): (u64, CountersView)| async move { store.undo_admission(&Ticket { seq, ..taken }).await };
        let (seq, view) = self.exec_undoable("admit", commands, run, undo).await?;
        Ok((Ticket { seq, ..ticket }, view))
    }

    async fn rollback(&self, ticket: &Ticket) -> Result<(), StoreError> {
        let s = &self.inner.scripts;
        let tk = tenant_keys(self, &ticket.tenant, ticket.at);
        let gk = global_keys(self);
        if !self.inner.cluster {
            let mut inv = s.rollback.prepare_invoke();
            for k in gk.iter().chain(tk.iter()) {
                inv.key(k);
            }
            inv.arg(&*ticket.tenant).arg(ticket.seq).arg(ticket.at);
            self.exec("rollback", 1, |mut c| async move { inv.invoke_async::<()>(&mut c).await }).await
        } else {
            let mut g = s.rollback_global.prepare_invoke();
            g.key(&gk[0]).key(&gk[1]).arg(&*ticket.tenant).arg(ticket.seq);
            let mut t = s.rollback_tenant.prepare_invoke();
            for k in &tk {
                t.key(k);
            }
            t.arg(ticket.seq).arg(ticket.at);
            self.exec("rollback", 2, |c| async move {
                let (mut c1, mut c2) = (c.clone(), c);
                tokio::try_join!(g.invoke_async::<()>(&mut c1), t.invoke_async::<()>(&mut c2))?;
                Ok(())
            })
            .await
        }
    }

    async fn release_lease(&self, ticket: &Ticket) -> Result<(), StoreError> {
        if !ticket.has_lease {
            return Ok(());
        }
        let key = self.inner.keys.tenant(&ticket.tenant, "leases");
        let seq = ticket.seq;
        self.exec("release_lease", 1, |mut c| async move {
            redis::cmd("ZREM").arg(&key).arg(seq).query_async::<()>(&mut c).await
        })
        .await
    }

    async fn park_lease(&self, reservation_id: &str, ticket: &Ticket, ttl_ms: u64) -> Result<(), StoreError> {
        if !ticket.has_lease {
            return Ok(());
        }
        let key = parked_key(self, &ticket.tenant, reservation_id);
        let seq = ticket.seq;
        self.exec("park_lease", 1, |mut c| async move {
            redis::cmd("SET").arg(&key).arg(seq).arg("PX").arg(ttl_ms.max(1)).query_async::<()>(&mut c).await
        })
        .await
    }

    async fn release_parked_lease(&self, tenant: &str, reservation_id: &str) -> Result<(), StoreError> {
        let mut inv = self.inner.scripts.release_parked.prepare_invoke();
        inv.key(parked_key(self, tenant, reservation_id)).key(self.inner.keys.tenant(tenant, "leases"));
        self.exec("release_parked_lease", 1, |mut c| async move { inv.invoke_async::<()>(&mut c).await }).await
    }

    async fn set_global_block(&self, until: UnixMillis) -> Result<(), StoreError> {
        let mut inv = self.inner.scripts.set_block.prepare_invoke();
        inv.key(self.inner.keys.global("block")).arg(until).arg(BLOCK_MARGIN_MS);
        self.exec("set_global_block", 1, |mut c| async move { inv.invoke_async::<()>(&mut c).await }).await
    }

    async fn clear_global_block(&self) -> Result<bool, StoreError> {
        let key = self.inner.keys.global("block");
        let removed: i64 = self
            .exec("clear_global_block", 1, |mut c| async move { redis::cmd("DEL").arg(&key).query_async(&mut c).await })
            .await?;
        Ok(removed > 0)
    }

    async fn tenant_view(&self, tenant: &str, now: UnixMillis) -> Result<TenantView, StoreError> {
        let mut inv = self.inner.scripts.tenant_view.prepare_invoke();
        for k in tenant_keys(self, tenant, now) {
            inv.key(k);
        }
        inv.arg(now);
        self.exec("tenant_view", 1, |mut c| async move { tenant_view(&as_array(inv.invoke_async(&mut c).await?)?) })
            .await
    }

    async fn global_view(&self, now: UnixMillis) -> Result<GlobalView, StoreError> {
        let gk = global_keys(self);
        let mut inv = self.inner.scripts.global_view.prepare_invoke();
        inv.key(&gk[0]).key(&gk[1]).key(&gk[2]).arg(now);
        self.exec("global_view", 1, |mut c| async move { global_view(&as_array(inv.invoke_async(&mut c).await?)?) })
            .await
    }

    /// Nothing to do: windows and leases are pruned inside every script and idle keys expire by
    /// TTL (the server forgets idle tenants). Reports zeros.
    async fn sweep(&self, _now: UnixMillis) -> Result<SweepStats, StoreError> {
        Ok(SweepStats::default())
    }
}
