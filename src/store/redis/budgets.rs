//! [`Budgets`] on Redis with the semantics of `store::budget_memory` (read its tests): reserve is
//! one script that checks `spent + reserved + amount ≤ budget` and holds (clamp mode: what is
//! left if at least `min_amount`); settle / release / expire end a reservation by a state
//! transition inside one script, so each happens exactly once across replicas; expire walks
//! the active index oldest first and claims each reservation by that transition, so two
//! replicas' sweeps never release one twice and never miss one.
//!
//! Money is integer micro-USD; the hold arithmetic runs in Lua doubles (exact below 2^53
//! micro-USD, i.e. 9 billion USD; larger budgets are treated as 2^53), the stored sums use
//! `HINCRBY` (exact 64-bit).
//!
//! Owns: the `Budgets` impl. Imports: `store::redis` core, `store::budget` types, `decide` money.

use std::collections::HashMap;

use async_trait::async_trait;
use redis::Value;

use super::{as_array, as_i64, as_map, as_string, proto, RedisStore};
use crate::decide::time::{Month, MS_PER_DAY};
use crate::decide::{Micros, Tier, UnixMillis};
use crate::store::budget::{
    Budgets, Claim, Reservation, ReservationState, ReserveOutcome, ReserveRequest, SettleOutcome, Settlement,
    SpendView, CHARGE_ID_TTL_MS,
};
use crate::store::StoreError;

/// A month's spend hash lives this long after it is created (and after each `charge`): past the
/// month's end by more than the longest an active record lives, so no settle outlives it.
const SPEND_TTL_MS: u64 = 70 * MS_PER_DAY;
/// An active reservation record outlives any reservation TTL by far (the sweep ends it first).
const ACTIVE_RECORD_TTL_MS: u64 = 35 * MS_PER_DAY;
/// Settled and released reservations are remembered this long (duplicate settle → NotActive),
/// at most [`super::RedisOptions::max_finished`] of them.
const FINISHED_TTL_MS: u64 = MS_PER_DAY;
/// Reservations released per expire script call (the call loops until a batch is short).
const EXPIRE_BATCH: usize = 500;
/// Money above this is not exact in Lua doubles; budgets are capped to it.
const MAX_EXACT: i64 = (1i64 << 53) - 1;

impl RedisStore {
    fn spend_key(&self, tenant: &str, month: &str) -> String {
        format!("{}s:{tenant}:{month}", self.inner.keys.budget_base())
    }

    fn active_key(&self) -> String {
        format!("{}active", self.inner.keys.budget_base())
    }
}

/// `{id, tenant, tier, request_id, model, month, amount, created_at}`.
/// A reply string as a shared label (tenant, tier, model, month of a reservation).
fn as_shared(v: &redis::Value) -> redis::RedisResult<std::sync::Arc<str>> {
    as_string(v).map(Into::into)
}

fn reservation(v: &[Value]) -> redis::RedisResult<Reservation> {
    if v.len() < 8 {
        return Err(proto(format!("reservation of {} fields", v.len())));
    }
    Ok(Reservation {
        id: as_string(&v[0])?,
        tenant: as_shared(&v[1])?,
        tenant_tier: as_shared(&v[2])?,
        request_id: as_string(&v[3])?,
        model: as_shared(&v[4])?,
        month: as_shared(&v[5])?,
        amount: Micros(as_i64(&v[6])?),
        created_at: as_i64(&v[7])?.max(0) as u64,
    })
}

fn reservation_from_map(id: &str, m: &HashMap<String, String>) -> redis::RedisResult<Reservation> {
    let f = |k: &str| m.get(k).cloned().ok_or_else(|| proto(format!("reservation {id} lacks {k}")));
    let n = |k: &str| f(k)?.parse::<i64>().map_err(|_| proto(format!("reservation {id}: bad {k}")));
    Ok(Reservation {
        id: id.to_string(),
        tenant: f("tenant")?.into(),
        tenant_tier: f("tier")?.into(),
        request_id: f("request_id")?,
        model: f("model")?.into(),
        month: f("month")?.into(),
        amount: Micros(n("amount")?),
        created_at: n("created_at")?.max(0) as u64,
    })
}

impl RedisStore {
    /// Settle (`actual = Some`) or release one reservation. `Err(code)`: 0 unknown, -1 not active.
    async fn finish(
        &self,
        op: &'static str,
        id: &str,
        actual: Option<Micros>,
        now: UnixMillis,
    ) -> Result<Result<Reservation, i64>, StoreError> {
        let inv = self.plan_finish(id, actual, now);
        self.exec(op, 1, |mut c| async move { run_finish(inv, &mut c).await }).await
    }

    /// Prepares the settle (`actual = Some`) or release script call without sending it.
    pub(crate) fn plan_finish(&self, id: &str, actual: Option<Micros>, now: UnixMillis) -> redis::ScriptInvocation<'_> {
        let mut inv = self.inner.scripts.finish.prepare_invoke();
        inv.key(self.active_key())
            .arg(self.inner.keys.budget_base())
            .arg(id)
            .arg(actual.map_or(-1, |a| a.0.max(0)))
            .arg(now);
        self.finish_limits(&mut inv);
        inv
    }

    /// The claim script (`ttl_ms` 0: give the claim back). `true`: claimed (or nothing to claim).
    async fn run_claim(
        &self,
        op: &'static str,
        id: &str,
        owner: &str,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        let mut inv = self.inner.scripts.claim.prepare_invoke();
        inv.key(self.active_key()).arg(self.inner.keys.budget_base()).arg(id).arg(owner).arg(now).arg(ttl_ms);
        self.exec(op, 1, |mut c| async move { inv.invoke_async::<i64>(&mut c).await }).await.map(|n| n == 1)
    }

    /// The trailing arguments of every script that finishes reservations (`finish`, `expire`):
    /// the finished records' TTL, the month spend's TTL, finished records remembered at most.
    fn finish_limits(&self, inv: &mut redis::ScriptInvocation<'_>) {
        inv.arg(FINISHED_TTL_MS).arg(SPEND_TTL_MS).arg(self.inner.max_finished);
    }
}

/// Sends a planned finish. `Err(code)`: 0 unknown, -1 not active.
pub(crate) async fn run_finish(
    inv: redis::ScriptInvocation<'_>,
    c: &mut super::Conn,
) -> redis::RedisResult<Result<Reservation, i64>> {
    let v = as_array(inv.invoke_async(c).await?)?;
    let code = v.first().map(as_i64).transpose()?.ok_or_else(|| proto("empty finish reply"))?;
    if code != 1 {
        return Ok(Err(code));
    }
    let rec = as_array(v.into_iter().nth(1).ok_or_else(|| proto("finish reply lacks the record"))?)?;
    Ok(Ok(reservation(&rec)?))
}

/// A settle script's result as the trait reports it.
pub(crate) fn settle_outcome(r: Result<Reservation, i64>, actual: Micros) -> SettleOutcome {
    match r {
        Ok(reservation) => SettleOutcome::Settled(Settlement::of(reservation.tenant, reservation.amount, actual)),
        Err(0) => SettleOutcome::NotFound,
        Err(_) => SettleOutcome::NotActive,
    }
}

impl RedisStore {
    /// Sets the tier kept with a tenant's month spend (what every replica's tenant view shows)
    /// when none is kept: `rebuild-spend` restores it from the ledger with the spend, without
    /// overwriting the tier of a hold made since.
    pub async fn restore_tier(&self, tenant: &str, month: &str, tier: &str) -> Result<(), StoreError> {
        let key = self.spend_key(tenant, month);
        let tier = tier.to_string();
        self.exec("restore_tier", 1, |mut c| async move {
            redis::cmd("HSETNX").arg(&key).arg("tier").arg(&tier).query_async::<()>(&mut c).await
        })
        .await
    }

    /// Prepares the atomic check-and-hold of `r` without sending it: the reservation it would
    /// create and the script call.
    pub(crate) fn plan_reserve(&self, r: &ReserveRequest<'_>) -> (Reservation, redis::ScriptInvocation<'_>) {
        let (res, args) = reservation_of(r);
        let inv = self.reserve_invocation(&res, &args);
        (res, inv)
    }

    /// The reserve script call creating `res` (see [`reservation_of`]).
    pub(crate) fn reserve_invocation(&self, res: &Reservation, a: &ReserveArgs) -> redis::ScriptInvocation<'_> {
        let mut inv = self.inner.scripts.reserve.prepare_invoke();
        inv.key(self.spend_key(&res.tenant, &res.month))
            .key(self.active_key())
            .arg(self.inner.keys.budget_base())
            .arg(&res.id)
            .arg(&*res.tenant)
            .arg(&*res.tenant_tier)
            .arg(&res.request_id)
            .arg(&*res.model)
            .arg(&*res.month)
            .arg(res.created_at)
            .arg(a.budget)
            .arg(res.amount.0)
            .arg(a.min)
            .arg(SPEND_TTL_MS)
            .arg(ACTIVE_RECORD_TTL_MS);
        inv
    }
}

/// The reserve script's arguments besides the reservation itself.
pub(crate) struct ReserveArgs {
    /// The tenant's budget for the month, clamped to what the script computes exactly.
    budget: i64,
    /// Clamp mode's smallest hold; -1: all of the amount or nothing.
    min: i64,
}

/// The reservation `r` would create (its amount clamped to what the script computes exactly),
/// and the rest of the script's arguments.
pub(crate) fn reservation_of(r: &ReserveRequest<'_>) -> (Reservation, ReserveArgs) {
    let amount = r.amount.0.clamp(0, MAX_EXACT);
    let min = r.min_amount.map_or(-1, |m| m.0.clamp(0, amount));
    let res = r.reservation(Micros(amount));
    (res, ReserveArgs { budget: r.monthly_budget.0.clamp(i64::MIN / 2, MAX_EXACT), min })
}

/// Sends a prepared reserve call.
pub(crate) async fn run_reserve(inv: redis::ScriptInvocation<'_>, c: &mut super::Conn) -> redis::RedisResult<Vec<i64>> {
    let v = as_array(inv.invoke_async(c).await?)?;
    v.iter().map(as_i64).collect::<redis::RedisResult<Vec<i64>>>()
}

/// Interprets the reserve script's reply for the reservation it would create.
pub(crate) fn reserve_outcome(mut res: Reservation, reply: &[i64]) -> Result<ReserveOutcome, StoreError> {
    match reply {
        [1, hold] => {
            res.amount = Micros(*hold);
            Ok(ReserveOutcome::Reserved(res))
        }
        [0, spent, reserved, remaining] => Ok(ReserveOutcome::Insufficient {
            spent: Micros(*spent),
            reserved: Micros(*reserved),
            remaining: Micros(*remaining),
        }),
        other => Err(StoreError::Unavailable(format!("reserve: unexpected reply {other:?}"))),
    }
}

#[async_trait]
impl Budgets for RedisStore {
    async fn reserve(&self, r: &ReserveRequest<'_>) -> Result<ReserveOutcome, StoreError> {
        let (res, inv) = self.plan_reserve(r);
        let reply = self.exec("reserve", 1, |mut c| async move { run_reserve(inv, &mut c).await }).await?;
        reserve_outcome(res, &reply)
    }

    async fn settle(&self, id: &str, actual: Micros, now: UnixMillis) -> Result<SettleOutcome, StoreError> {
        let actual = actual.max(Micros::ZERO);
        Ok(settle_outcome(self.finish("settle", id, Some(actual), now).await?, actual))
    }

    async fn release(&self, id: &str, now: UnixMillis) -> Result<Option<Reservation>, StoreError> {
        Ok(self.finish("release", id, None, now).await?.ok())
    }

    async fn expire(&self, older_than: UnixMillis, now: UnixMillis) -> Result<Vec<Reservation>, StoreError> {
        let mut out = Vec::new();
        loop {
            let mut inv = self.inner.scripts.expire.prepare_invoke();
            inv.key(self.active_key()).arg(self.inner.keys.budget_base()).arg(older_than).arg(now).arg(EXPIRE_BATCH);
            self.finish_limits(&mut inv);
            let (scanned, batch) = self
                .exec("expire", 1, |mut c| async move {
                    let mut v = as_array(inv.invoke_async(&mut c).await?)?.into_iter();
                    let scanned = as_i64(&v.next().ok_or_else(|| proto("expire: empty reply"))?)?;
                    let rows = as_array(v.next().unwrap_or(Value::Nil))?;
                    let mut batch = Vec::with_capacity(rows.len());
                    for row in rows {
                        batch.push(reservation(&as_array(row)?)?);
                    }
                    Ok((scanned, batch))
                })
                .await?;
            out.extend(batch);
            if (scanned as usize) < EXPIRE_BATCH {
                return Ok(out);
            }
        }
    }

    async fn charge(
        &self,
        id: &str,
        tenant: &str,
        month: &str,
        amount: Micros,
        _now: UnixMillis,
    ) -> Result<(), StoreError> {
        if Month::parse(month).is_none() {
            return Err(StoreError::Unavailable(format!("budget charge: month {month:?} is not YYYY-MM")));
        }
        if amount.0 <= 0 {
            return Ok(());
        }
        let mut inv = self.inner.scripts.charge.prepare_invoke();
        inv.key(self.active_key())
            .arg(self.inner.keys.budget_base())
            .arg(id)
            .arg(tenant)
            .arg(month)
            .arg(amount.0)
            .arg(SPEND_TTL_MS)
            .arg(CHARGE_ID_TTL_MS);
        self.exec("charge", 1, |mut c| async move { inv.invoke_async::<i64>(&mut c).await }).await.map(|_| ())
    }

    async fn active_count(&self) -> Result<u64, StoreError> {
        let key = self.active_key();
        self.exec("active_count", 1, |mut c| async move { redis::cmd("ZCARD").arg(&key).query_async(&mut c).await })
            .await
    }

    async fn tenant_spend(&self, tenant: &str, month: &str) -> Result<SpendView, StoreError> {
        let key = self.spend_key(tenant, month);
        let (spent, reserved, active, tier): (Option<i64>, Option<i64>, Option<i64>, Option<String>) = self
            .exec("tenant_spend", 1, |mut c| async move {
                let fields = ["spent", "reserved", "active", "tier"];
                redis::cmd("HMGET").arg(&key).arg(&fields[..]).query_async(&mut c).await
            })
            .await?;
        Ok(SpendView {
            spent: Micros(spent.unwrap_or(0)),
            reserved: Micros(reserved.unwrap_or(0)),
            active_reservations: active.unwrap_or(0).max(0) as u64,
            tier: tier.as_deref().and_then(Tier::parse),
        })
    }

    async fn active(&self, limit: usize) -> Result<Vec<Reservation>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut inv = self.inner.scripts.active.prepare_invoke();
        inv.key(self.active_key()).arg(self.inner.keys.budget_base()).arg(limit.min(100_000));
        self.exec("active", 1, |mut c| async move {
            let rows = as_array(inv.invoke_async(&mut c).await?)?;
            rows.into_iter().map(|r| reservation(&as_array(r)?)).collect()
        })
        .await
    }

    async fn claim(&self, id: &str, owner: &str, ttl_ms: u64, now: UnixMillis) -> Result<Claim, StoreError> {
        let ttl_ms = ttl_ms.max(1);
        let claimed = self.run_claim("claim", id, owner, ttl_ms, now).await?;
        Ok(if claimed { Claim::Claimed } else { Claim::Busy })
    }

    async fn unclaim(&self, id: &str, owner: &str) -> Result<(), StoreError> {
        self.run_claim("unclaim", id, owner, 0, 0).await.map(|_| ())
    }

    async fn get(&self, id: &str) -> Result<Option<(Reservation, ReservationState)>, StoreError> {
        let key = format!("{}r:{id}", self.inner.keys.budget_base());
        let id = id.to_string();
        self.exec("get_reservation", 1, |mut c| async move {
            let m = as_map(redis::cmd("HGETALL").arg(&key).query_async::<Value>(&mut c).await?)?;
            if m.is_empty() {
                return Ok(None);
            }
            let r = reservation_from_map(&id, &m)?;
            let state = match m.get("state").map(String::as_str) {
                Some("active") => ReservationState::Active,
                Some("settled") => ReservationState::Settled {
                    actual: Micros(m.get("actual").and_then(|a| a.parse().ok()).unwrap_or(0)),
                },
                Some("released") => ReservationState::Released,
                other => return Err(proto(format!("reservation {id}: state {other:?}"))),
            };
            Ok(Some((r, state)))
        })
        .await
    }
}
