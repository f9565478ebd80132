//! Tests against a real Redis (`PREAUTH_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`); each
//! test uses its own key prefix and deletes its keys at the end. Without a reachable Redis the
//! tests print a note and pass (nothing to test against).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::decide::time::{parse_rfc3339, MS_PER_DAY};
use crate::decide::{CountersView, Facts, GlobalView, Micros, Mode, Policy, TenantView, Tier, UnixMillis, Verdict};
use crate::store::approvals::{ApprovalStatus, ApprovalTransitionError, Approvals, ConsumeOutcome, NewApproval};
use crate::store::budget::{Budgets, Reservation, ReservationState, ReserveOutcome, ReserveRequest, SettleOutcome};
use crate::store::{AdmitRequest, Counters, PolicyStore};

fn url() -> String {
    std::env::var("PREAUTH_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4().simple())
}

/// A store on a fresh prefix. Redis is part of this machine kind (CI runs with it): a missing
/// Redis is a failure, never a skipped test.
async fn store_at(prefix: &str) -> Option<RedisStore> {
    let s = RedisStore::connect(&url(), prefix, Duration::from_millis(500)).await.expect("valid url");
    assert!(s.healthy(), "no Redis answers at {}: start it (see README, Set up)", url());
    Some(s)
}

async fn cleanup(s: &RedisStore) {
    s.delete_all_keys().await.expect("cleanup");
}

fn t0() -> UnixMillis {
    parse_rfc3339("2026-11-25T10:00:00Z").unwrap()
}

fn req(tenant: &str, now: UnixMillis, lease: Option<u64>) -> AdmitRequest<'_> {
    AdmitRequest { tenant, now, tokens: 10, lease_ttl_ms: lease }
}

/// The PTTL of `key` (ms; -1 without a TTL, -2 when missing).
async fn pttl(s: &RedisStore, key: &str) -> i64 {
    let mut conn = s.inner.conn.read().clone().unwrap();
    redis::cmd("PTTL").arg(key).query_async(&mut conn).await.unwrap()
}

/// `pttl` lies in the last minute below `ttl_ms` (a TTL set moments ago).
fn about(ttl_ms: u64, pttl: i64) -> bool {
    pttl > ttl_ms as i64 - 60_000 && pttl <= ttl_ms as i64
}

// ------------------------------------------------------------------------------------------------
// Counters (mirror of the memory store's tests)

#[tokio::test]
async fn admit_returns_pre_increment_views() {
    let Some(c) = store_at(&prefix()).await else { return };
    let t0 = t0();
    let (_, v1) = c.admit(&req("a", t0, None)).await.unwrap();
    assert_eq!(v1, CountersView::default());
    let (_, v2) = c.admit(&req("b", t0 + 1, None)).await.unwrap();
    assert_eq!(v2.global.requests_last_minute, 1);
    assert_eq!(v2.global.distinct_tenants_last_minute, 1);
    let (_, v3) = c.admit(&req("a", t0 + 2, None)).await.unwrap();
    assert_eq!((v3.tenant.daily_requests, v3.tenant.minute_requests, v3.tenant.tokens_last_minute), (1, 1, 10));
    assert_eq!(v3.tenant.minute_oldest, Some(t0));
    assert_eq!(v3.tenant.tokens_oldest, Some(t0));
    assert_eq!((v3.global.requests_last_minute, v3.global.distinct_tenants_last_minute), (2, 2));
    let tv = c.tenant_view("a", t0 + 3).await.unwrap();
    assert_eq!((tv.daily_requests, tv.minute_requests, tv.tokens_last_minute), (2, 2, 20));
    let gv = c.global_view(t0 + 3).await.unwrap();
    assert_eq!((gv.requests_last_minute, gv.distinct_tenants_last_minute), (3, 2));
    cleanup(&c).await;
}

#[tokio::test]
async fn windows_slide_exactly_at_sixty_seconds() {
    let Some(c) = store_at(&prefix()).await else { return };
    let t0 = t0();
    c.admit(&req("a", t0, None)).await.unwrap();
    let (_, v) = c.admit(&req("a", t0 + 59_999, None)).await.unwrap();
    assert_eq!(v.tenant.minute_requests, 1);
    assert_eq!(v.tenant.tokens_last_minute, 10);
    assert_eq!(v.global.requests_last_minute, 1);
    let (_, v) = c.admit(&req("a", t0 + 60_000, None)).await.unwrap();
    assert_eq!(v.tenant.minute_requests, 1, "the first entry left at exactly 60 s");
    assert_eq!(v.tenant.minute_oldest, Some(t0 + 59_999));
    assert_eq!((v.tenant.tokens_last_minute, v.tenant.tokens_oldest), (10, Some(t0 + 59_999)));
    assert_eq!((v.global.requests_last_minute, v.global.distinct_tenants_last_minute), (1, 1));
    assert_eq!(v.tenant.daily_requests, 2);
    let gv = c.global_view(t0 + 200_000).await.unwrap();
    assert_eq!(gv, GlobalView::default(), "everything left the window; the tenant count too");
    cleanup(&c).await;
}

/// A whole window leaving at once (after a pause) takes every tenant's count with it.
#[tokio::test]
async fn a_window_pruned_at_once_forgets_each_tenant_exactly() {
    let Some(c) = store_at(&prefix()).await else { return };
    let t0 = t0();
    for i in 0..30 {
        c.admit(&req(["a", "b", "c"][i % 3], t0 + i as u64, None)).await.unwrap();
    }
    c.admit(&req("b", t0 + 40_000, None)).await.unwrap();
    // Everything but b's last entry is out: 30 entries of 3 tenants pruned in one admission.
    let (_, v) = c.admit(&req("d", t0 + 60_029, None)).await.unwrap();
    assert_eq!((v.global.requests_last_minute, v.global.distinct_tenants_last_minute), (1, 1));
    let mut conn = c.inner.conn.read().clone().unwrap();
    let counts: std::collections::HashMap<String, i64> =
        redis::cmd("HGETALL").arg(c.inner.keys.global("window_tenants")).query_async(&mut conn).await.unwrap();
    assert_eq!(counts, [("b".to_string(), 1), ("d".to_string(), 1)].into_iter().collect());
    cleanup(&c).await;
}

#[tokio::test]
async fn daily_counts_reset_at_utc_midnight() {
    let Some(c) = store_at(&prefix()).await else { return };
    let late = parse_rfc3339("2026-11-25T23:59:59Z").unwrap();
    c.admit(&req("a", late, None)).await.unwrap();
    let (_, v) = c.admit(&req("a", late + 999, None)).await.unwrap();
    assert_eq!(v.tenant.daily_requests, 1);
    let (_, v) = c.admit(&req("a", late + 1000, None)).await.unwrap();
    assert_eq!(v.tenant.daily_requests, 0, "new UTC day");
    cleanup(&c).await;
}

#[tokio::test]
async fn leases_expire_and_release() {
    let Some(c) = store_at(&prefix()).await else { return };
    let t0 = t0();
    let (t1, _) = c.admit(&req("a", t0, Some(5_000))).await.unwrap();
    let (_t2, v) = c.admit(&req("a", t0 + 1, Some(5_000))).await.unwrap();
    assert_eq!(v.tenant.in_flight, 1);
    c.release_lease(&t1).await.unwrap();
    let (_, v) = c.admit(&req("a", t0 + 2, Some(5_000))).await.unwrap();
    assert_eq!(v.tenant.in_flight, 1, "released lease is gone, second one still live");
    let (_, v) = c.admit(&req("a", t0 + 5_001, Some(5_000))).await.unwrap();
    assert_eq!(v.tenant.in_flight, 1, "the t0+1 lease expired at t0+5001; the t0+2 one lives until t0+5002");
    let (_, v) = c.admit(&req("a", t0 + 5_002, Some(5_000))).await.unwrap();
    assert_eq!(v.tenant.in_flight, 1, "the t0+2 lease expired; only the one taken at t0+5001 is live");
    // The lease key carries a TTL (lease TTL + 60 s) so an abandoned one cannot linger.
    let pttl = pttl(&c, &c.inner.keys.tenant("a", "leases")).await;
    assert!(pttl > 60_000 && pttl <= 65_000, "{pttl}");
    cleanup(&c).await;
}

#[tokio::test]
async fn rollback_undoes_everything() {
    let Some(c) = store_at(&prefix()).await else { return };
    let t0 = t0();
    let (t, _) = c.admit(&req("a", t0, Some(1000))).await.unwrap();
    c.rollback(&t).await.unwrap();
    let (_, v) = c.admit(&req("b", t0 + 1, Some(1000))).await.unwrap();
    assert_eq!(v.global, GlobalView::default());
    let (_, v) = c.admit(&req("a", t0 + 2, Some(1000))).await.unwrap();
    assert_eq!(v.tenant, TenantView::default());
    cleanup(&c).await;
}

/// A rollback sent again (its first answer lost to a timeout) takes nothing twice: the day's
/// count of another admission stays.
#[tokio::test]
async fn rollback_is_idempotent() {
    let Some(c) = store_at(&prefix()).await else { return };
    let t0 = t0();
    c.admit(&req("a", t0, None)).await.unwrap();
    let (t, _) = c.admit(&req("a", t0 + 1, Some(1000))).await.unwrap();
    c.rollback(&t).await.unwrap();
    c.rollback(&t).await.unwrap();
    let v = c.tenant_view("a", t0 + 2).await.unwrap();
    assert_eq!((v.daily_requests, v.minute_requests, v.in_flight), (1, 1, 0), "{v:?}");
    cleanup(&c).await;
}

/// An admission whose answer came but was never taken (its caller dropped the wait between the
/// answer and its next poll) is given back by the dropped wait: nothing counts, nothing is held.
#[tokio::test]
async fn an_admission_answered_but_never_taken_is_given_back() {
    use crate::store::Gatekeeper;
    let Some(c) = store_at(&prefix()).await else { return };
    let t0 = t0();
    let admit = req("late", t0, Some(60_000));
    let hold = ReserveRequest {
        tenant: "late",
        tenant_tier: "pro",
        request_id: "r1",
        model: "gpt-4o-mini",
        now: t0,
        monthly_budget: Micros(1_000_000),
        amount: Micros(1000),
        min_amount: None,
    };
    {
        let mut step = std::pin::pin!(c.admit_reserve(&admit, Some(&hold)));
        // Polled once: the step's task runs; its answer then waits, untaken, until the drop.
        assert!(futures_util::poll!(step.as_mut()).is_pending());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = c.tenant_view("late", t0 + 1).await.unwrap();
        let spend = c.tenant_spend("late", &crate::store::budget::month_key(t0)).await.unwrap();
        if (v.daily_requests, v.in_flight, spend.active_reservations, spend.reserved) == (0, 0, 0, Micros::ZERO) {
            break;
        }
        assert!(Instant::now() < deadline, "still counted or held: {v:?} {spend:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cleanup(&c).await;
}

#[tokio::test]
async fn global_block_keeps_the_later_end_and_expires_by_the_callers_clock() {
    let Some(c) = store_at(&prefix()).await else { return };
    let t0 = t0();
    c.set_global_block(t0 + 120_000).await.unwrap();
    c.set_global_block(t0 + 60_000).await.unwrap();
    assert_eq!(c.global_view(t0).await.unwrap().block_until, Some(t0 + 120_000), "the later one is kept");
    let (_, v) = c.admit(&req("a", t0 + 1, None)).await.unwrap();
    assert_eq!(v.global.block_until, Some(t0 + 120_000));
    assert_eq!(c.global_view(t0 + 120_000).await.unwrap().block_until, None, "over at its end");
    cleanup(&c).await;
}

#[tokio::test]
async fn global_block_is_lifted_for_every_replica() {
    let Some(c) = store_at(&prefix()).await else { return };
    let t0 = t0();
    assert!(!c.clear_global_block().await.unwrap(), "nothing to lift");
    c.set_global_block(t0 + 120_000).await.unwrap();
    assert!(c.clear_global_block().await.unwrap());
    assert_eq!(c.global_view(t0).await.unwrap().block_until, None);
    let (_, v) = c.admit(&req("a", t0 + 1, None)).await.unwrap();
    assert_eq!(v.global.block_until, None);
    cleanup(&c).await;
}

#[tokio::test]
async fn odd_tenant_names_get_their_own_keys() {
    let Some(c) = store_at(&prefix()).await else { return };
    let t0 = t0();
    for t in ["", "%00", "a{b}", "a%7Bb}", "x|y:z"] {
        let (_, v) = c.admit(&req(t, t0, None)).await.unwrap();
        assert_eq!(v.tenant, TenantView::default(), "{t:?} shares keys with another tenant");
    }
    let gv = c.global_view(t0 + 1).await.unwrap();
    assert_eq!((gv.requests_last_minute, gv.distinct_tenants_last_minute), (5, 5));
    cleanup(&c).await;
}

/// Three replicas: the global guard sees the fleet's total (cap 5 → the 6th request trips).
#[tokio::test]
async fn three_replicas_trip_the_global_cap_on_the_fleet_total() {
    let p = prefix();
    let Some(a) = store_at(&p).await else { return };
    let (b, c) = (store_at(&p).await.unwrap(), store_at(&p).await.unwrap());
    let replicas = [&a, &b, &c];
    let mut policy = Policy::for_test();
    policy.global.per_minute_cap = 5;
    policy.global.unique_tenants_threshold = 3;
    let now = t0();
    let mut tripped_at = None;
    for i in 0..6u64 {
        let tenant = format!("tenant-{}", i % 3);
        let r = replicas[i as usize % 3];
        let (ticket, view) = r.admit(&req(&tenant, now + i, None)).await.unwrap();
        let facts = Facts { tenant: &tenant, tier: Tier::Pro, source: "default", estimated_tokens: 10 };
        let d = crate::decide::evaluate(&policy, &facts, &view, Mode::Hard, now + i);
        if d.verdict != Verdict::Allow {
            tripped_at = Some((i, view.global.requests_last_minute));
            r.rollback(&ticket).await.unwrap();
            if let Some(until) = d.trip_global_block_until {
                r.set_global_block(until).await.unwrap();
            }
            break;
        }
    }
    assert_eq!(tripped_at, Some((5, 5)), "each replica saw 2 requests, the fleet 5: the 6th trips");
    let (_, v) = b.admit(&req("tenant-9", now + 10, None)).await.unwrap();
    assert!(v.global.block_until.is_some(), "the block is visible on every replica");
    cleanup(&a).await;
}

// ------------------------------------------------------------------------------------------------
// Budgets (mirror of budget_tests.rs where it applies)

const BUDGET: Micros = Micros(1_000_000);

fn rreq<'a>(tenant: &'a str, now: UnixMillis, budget: Micros, amount: i64, min: Option<i64>) -> ReserveRequest<'a> {
    ReserveRequest {
        tenant,
        tenant_tier: "pro",
        request_id: "req-1",
        model: "gpt-4o",
        now,
        monthly_budget: budget,
        amount: Micros(amount),
        min_amount: min.map(Micros),
    }
}

fn reserved(o: ReserveOutcome) -> Reservation {
    match o {
        ReserveOutcome::Reserved(r) => r,
        other => panic!("expected Reserved, got {other:?}"),
    }
}

async fn spend(b: &RedisStore, tenant: &str, month: &str) -> (i64, i64, u64) {
    let v = b.tenant_spend(tenant, month).await.unwrap();
    (v.spent.0, v.reserved.0, v.active_reservations)
}

/// Mirror of `an_approved_request_is_admitted_past_the_budget_holding_nothing` (reserve.lua).
#[tokio::test]
async fn an_approved_request_is_admitted_past_the_budget_holding_nothing() {
    let Some(b) = store_at(&prefix()).await else { return };
    let now = t0();
    let r = reserved(b.reserve(&rreq("acme", now, Micros(1_000), 1_000, None)).await.unwrap());
    b.settle(&r.id, Micros(1_500), now).await.unwrap();
    let over = reserved(b.reserve(&rreq("acme", now, Micros(1_000), 300, Some(0))).await.unwrap());
    assert_eq!(over.amount, Micros(0));
    assert_eq!(spend(&b, "acme", "2026-11").await, (1_500, 0, 1));
    assert_eq!(
        b.reserve(&rreq("acme", now, Micros(1_000), 300, Some(10))).await.unwrap(),
        ReserveOutcome::Insufficient { spent: Micros(1_500), reserved: Micros(0), remaining: Micros(0) }
    );
    cleanup(&b).await;
}

#[tokio::test]
async fn budget_arithmetic_clamp_settle_release() {
    let Some(b) = store_at(&prefix()).await else { return };
    let now = t0();
    assert_eq!(b.tenant_spend("acme", "2026-11").await.unwrap().tier, None, "no hold yet, no tier");
    let r1 = reserved(b.reserve(&rreq("acme", now, BUDGET, 300_000, None)).await.unwrap());
    assert_eq!(b.tenant_spend("acme", "2026-11").await.unwrap().tier, Some(Tier::Pro), "the hold's tier is shared");
    assert_eq!((r1.amount, &*r1.month, r1.created_at), (Micros(300_000), "2026-11", now));
    assert_eq!(uuid::Uuid::parse_str(&r1.id).unwrap().get_version_num(), 7);
    let r2 = reserved(b.reserve(&rreq("acme", now + 1, BUDGET, 700_000, None)).await.unwrap());
    assert_eq!(r2.amount, Micros(700_000), "exact fit is allowed");
    assert_eq!(
        b.reserve(&rreq("acme", now + 2, BUDGET, 1, None)).await.unwrap(),
        ReserveOutcome::Insufficient { spent: Micros(0), reserved: Micros(1_000_000), remaining: Micros(0) }
    );
    assert_eq!(spend(&b, "acme", "2026-11").await, (0, 1_000_000, 2));

    // Settle: actual charged, rest released, drift; exactly once.
    let SettleOutcome::Settled(s) = b.settle(&r1.id, Micros(100_000), now + 10).await.unwrap() else { panic!() };
    assert_eq!((s.actual, s.released, s.drift), (Micros(100_000), Micros(200_000), Micros(-200_000)));
    assert_eq!((&*s.tenant, s.reserved), (&*r1.tenant, r1.amount));
    assert_eq!(b.settle(&r1.id, Micros(100_000), now + 11).await.unwrap(), SettleOutcome::NotActive);
    assert_eq!(b.release(&r1.id, now + 11).await.unwrap(), None);
    assert_eq!(
        Budgets::get(&b, &r1.id).await.unwrap(),
        Some((r1.clone(), ReservationState::Settled { actual: Micros(100_000) }))
    );
    assert_eq!(b.release(&r2.id, now + 12).await.unwrap(), Some(r2.clone()));
    assert_eq!(b.settle(&r2.id, Micros(1), now + 13).await.unwrap(), SettleOutcome::NotActive);
    assert_eq!(Budgets::get(&b, &r2.id).await.unwrap().unwrap().1, ReservationState::Released);
    assert_eq!(b.settle("nope", Micros(1), now).await.unwrap(), SettleOutcome::NotFound);
    assert_eq!(Budgets::get(&b, "nope").await.unwrap(), None);
    assert_eq!(spend(&b, "acme", "2026-11").await, (100_000, 0, 0));

    // Clamp: the full amount if it fits, else what is left if at least the minimum.
    let budget = Micros(1_000);
    reserved(b.reserve(&rreq("c", now, budget, 700, None)).await.unwrap());
    assert_eq!(reserved(b.reserve(&rreq("c", now, budget, 100, Some(50))).await.unwrap()).amount, Micros(100));
    let clamped = reserved(b.reserve(&rreq("c", now, budget, 500, Some(200))).await.unwrap());
    assert_eq!(clamped.amount, Micros(200), "exactly the minimum is still enough");
    b.release(&clamped.id, now).await.unwrap().unwrap();
    assert_eq!(
        b.reserve(&rreq("c", now, budget, 500, Some(201))).await.unwrap(),
        ReserveOutcome::Insufficient { spent: Micros(0), reserved: Micros(800), remaining: Micros(200) }
    );
    // Overspent: nothing fits, not even zero; charge rejects bad months.
    b.charge("c1", "o", "2026-11", Micros(1_200_000), now).await.unwrap();
    b.charge("c2", "o", "2026-11", Micros(-5), now).await.unwrap();
    // A retry of charge c1 (its first attempt timed out, yet landed) adds nothing.
    b.charge("c1", "o", "2026-11", Micros(1_200_000), now).await.unwrap();
    assert_eq!(
        b.reserve(&rreq("o", now, BUDGET, 0, None)).await.unwrap(),
        ReserveOutcome::Insufficient { spent: Micros(1_200_000), reserved: Micros(0), remaining: Micros(0) }
    );
    assert!(matches!(b.charge("c3", "o", "November", Micros(1), now).await, Err(StoreError::Unavailable(_))));
    // A reservation settled after the month ended charges its own month.
    let late = parse_rfc3339("2026-11-30T23:59:59Z").unwrap();
    let r = reserved(b.reserve(&rreq("m", late, BUDGET, 500, None)).await.unwrap());
    b.settle(&r.id, Micros(400), late + 5_000).await.unwrap();
    assert_eq!(spend(&b, "m", "2026-11").await, (400, 0, 0));
    assert_eq!(spend(&b, "m", "2026-12").await, (0, 0, 0));
    // Finished records are kept for 24 h (server clock).
    let pttl = pttl(&b, &format!("{}r:{}", b.inner.keys.budget_base(), r.id)).await;
    assert!(about(MS_PER_DAY, pttl), "{pttl}");
    cleanup(&b).await;
}

/// Keys that name their period (a day counter, a month's spend) get their TTL when created, and
/// again when re-created after expiring; the money in them stays integer text at any size Lua
/// doubles hold exactly.
#[tokio::test]
async fn period_keys_get_their_ttl_at_creation_and_money_stays_exact() {
    let Some(s) = store_at(&prefix()).await else { return };
    let now = t0();
    for i in 0..3 {
        let (_, v) = s.admit(&req("a", now + i, None)).await.unwrap();
        assert_eq!(v.tenant.daily_requests, i, "the count before this admission");
    }
    let day = s.inner.keys.tenant("a", "day:20261125");
    assert!(about(2 * MS_PER_DAY, pttl(&s, &day).await), "{}", pttl(&s, &day).await);

    let spend_key = format!("{}s:acme:2026-11", s.inner.keys.budget_base());
    let big = 2_000_000_000_000_001; // 2e15 + 1 micro-USD
    let r = reserved(s.reserve(&rreq("acme", now, Micros((1 << 53) - 1), big, None)).await.unwrap());
    assert!(about(70 * MS_PER_DAY, pttl(&s, &spend_key).await));
    let r2 = reserved(s.reserve(&rreq("acme", now, Micros((1 << 53) - 1), big, None)).await.unwrap());
    assert_eq!(spend(&s, "acme", "2026-11").await, (0, 2 * big, 2));
    let SettleOutcome::Settled(done) = s.settle(&r.id, Micros(big - 2), now + 1).await.unwrap() else { panic!() };
    assert_eq!((done.actual, done.released), (Micros(big - 2), Micros(2)));
    assert_eq!(spend(&s, "acme", "2026-11").await, (big - 2, big, 1));
    let mut conn = s.inner.conn.read().clone().unwrap();
    let raw: Vec<String> =
        redis::cmd("HMGET").arg(&spend_key).arg("spent").arg("reserved").query_async(&mut conn).await.unwrap();
    assert_eq!(raw, vec![(big - 2).to_string(), big.to_string()], "integer text, no exponent");

    // The month's hash expired while r2 was active: the settle re-creates it, with its TTL.
    let _: () = redis::cmd("DEL").arg(&spend_key).query_async(&mut conn).await.unwrap();
    s.settle(&r2.id, Micros(5), now + 2).await.unwrap();
    assert_eq!(spend(&s, "acme", "2026-11").await, (5, -big, 0));
    assert!(about(70 * MS_PER_DAY, pttl(&s, &spend_key).await));
    cleanup(&s).await;
}

#[tokio::test]
async fn expire_releases_only_old_ones_oldest_first() {
    let Some(b) = store_at(&prefix()).await else { return };
    let now = t0();
    let a = reserved(b.reserve(&rreq("acme", now, BUDGET, 10, None)).await.unwrap());
    let c = reserved(b.reserve(&rreq("acme", now + 10, BUDGET, 20, None)).await.unwrap());
    let d = reserved(b.reserve(&rreq("acme", now + 20, BUDGET, 30, None)).await.unwrap());
    assert_eq!(b.active(10).await.unwrap(), vec![a.clone(), c.clone(), d.clone()], "oldest first");
    assert_eq!(b.active(1).await.unwrap(), vec![a.clone()]);
    assert_eq!(b.expire(now + 10, now + 100).await.unwrap(), vec![a.clone()], "strictly older than");
    assert_eq!(b.expire(now + 20, now + 100).await.unwrap(), vec![c.clone()]);
    assert!(b.expire(now + 20, now + 100).await.unwrap().is_empty());
    assert_eq!(spend(&b, "acme", "2026-11").await, (0, 30, 1), "expiry charges nothing");
    assert_eq!(b.settle(&a.id, Micros(5), now + 200).await.unwrap(), SettleOutcome::NotActive);
    assert_eq!(b.active(10).await.unwrap(), vec![d]);
    cleanup(&b).await;
}

#[tokio::test]
async fn a_settlement_claim_holds_off_other_replicas_and_the_sweep_until_given_back_or_expired() {
    use crate::store::budget::Claim;
    let Some(b) = store_at(&prefix()).await else { return };
    let now = t0();
    let r = reserved(b.reserve(&rreq("acme", now, BUDGET, 10, None)).await.unwrap());
    assert_eq!(b.claim(&r.id, "a", 1_000, now).await.unwrap(), Claim::Claimed);
    assert_eq!(b.claim(&r.id, "a", 1_000, now + 1).await.unwrap(), Claim::Claimed, "its owner again");
    assert_eq!(b.claim(&r.id, "b", 1_000, now + 2).await.unwrap(), Claim::Busy);
    assert!(b.expire(now + 10, now + 3).await.unwrap().is_empty(), "the sweep leaves a claimed hold");
    b.unclaim(&r.id, "b").await.unwrap(); // not b's: nothing happens
    assert_eq!(b.claim(&r.id, "b", 1_000, now + 4).await.unwrap(), Claim::Busy);
    b.unclaim(&r.id, "a").await.unwrap();
    assert_eq!(b.claim(&r.id, "b", 1_000, now + 5).await.unwrap(), Claim::Claimed, "given back");
    // b's claim runs out (b died): another replica may claim, and the sweep releases.
    assert_eq!(b.claim(&r.id, "c", 1_000, now + 1_006).await.unwrap(), Claim::Claimed);
    assert_eq!(b.expire(now + 10, now + 2_007).await.unwrap(), vec![r.clone()], "claim expired");
    // Nothing left to claim: the caller's read says why.
    assert_eq!(b.claim(&r.id, "d", 1_000, now + 2_008).await.unwrap(), Claim::Claimed);
    assert_eq!(b.claim("no-such-id", "d", 1_000, now).await.unwrap(), Claim::Claimed);
    cleanup(&b).await;
}

/// A store on a fresh prefix that remembers at most `max_finished` finished reservations.
async fn store_remembering(max_finished: u64) -> RedisStore {
    let opts = RedisOptions { max_finished, ..RedisOptions::default() };
    RedisStore::connect_with(&url(), &prefix(), Duration::from_millis(500), opts).await.unwrap()
}

/// The finished reservations' list: its length and its TTL (ms).
async fn finished_list(b: &RedisStore) -> (u64, i64) {
    let mut conn = b.inner.conn.read().clone().unwrap();
    let key = format!("{}finished", b.inner.keys.budget_base());
    redis::pipe().cmd("LLEN").arg(&key).cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap()
}

/// At most `max_finished` settled or released reservations are remembered, fleet-wide: the
/// oldest records go first (a second settle of one is then unknown, not "not active"), and the
/// index of finished ones carries the records' 24 h TTL.
#[tokio::test]
async fn finished_reservations_are_remembered_up_to_the_bound() {
    let b = store_remembering(3).await;
    let now = t0();
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = reserved(b.reserve(&rreq("acme", now + i, BUDGET, 10, None)).await.unwrap());
        ids.push(r.id);
    }
    b.settle(&ids[0], Micros(1), now + 10).await.unwrap();
    b.release(&ids[1], now + 11).await.unwrap().unwrap();
    b.settle(&ids[2], Micros(1), now + 12).await.unwrap();
    b.settle(&ids[3], Micros(1), now + 13).await.unwrap();
    // The sweep's releases are finishes too.
    assert_eq!(b.expire(now + 5, now + 14).await.unwrap().len(), 1);
    for (i, id) in ids.iter().enumerate() {
        let remembered = i >= 2;
        assert_eq!(Budgets::get(&b, id).await.unwrap().is_some(), remembered, "record {i}");
        let again = if remembered { SettleOutcome::NotActive } else { SettleOutcome::NotFound };
        assert_eq!(b.settle(id, Micros(1), now + 20).await.unwrap(), again, "second settle of {i}");
    }
    assert_eq!(spend(&b, "acme", "2026-11").await, (3, 0, 0), "forgetting a record changes no money");
    let (n, pttl) = finished_list(&b).await;
    assert_eq!(n, 3);
    assert!(about(MS_PER_DAY, pttl), "{pttl}");
    cleanup(&b).await;
}

/// Above 1,000 the oldest are trimmed in batches: up to max_finished / 1000 more are kept
/// meanwhile, then all of the excess goes in one call.
#[tokio::test]
async fn finished_reservations_are_trimmed_in_batches() {
    let b = store_remembering(1_000).await;
    let now = t0();
    let mut ids = Vec::new();
    let list = format!("{}finished", b.inner.keys.budget_base());
    for i in 0..1_002 {
        let r = reserved(b.reserve(&rreq("acme", now + i, BUDGET, 1, None)).await.unwrap());
        b.settle(&r.id, Micros(1), now + i).await.unwrap();
        ids.push(r.id);
        let (n, ttl) = finished_list(&b).await;
        let want = if i < 1_001 { i + 1 } else { 1_000 };
        assert_eq!(n, want, "after {} finished", i + 1);
        if i == 0 {
            assert!(about(MS_PER_DAY, ttl), "set when the list is created: {ttl}");
            // From here on, as if it had been lost: the TTL is not refreshed on every append ...
            let mut conn = b.inner.conn.read().clone().unwrap();
            let _: () = redis::cmd("PERSIST").arg(&list).query_async(&mut conn).await.unwrap();
        } else if i < 999 {
            assert_eq!(ttl, -1, "after {} finished", i + 1);
        } else {
            // ... but at the latest on the 1,000th, and on every trim.
            assert!(about(MS_PER_DAY, ttl), "after {} finished: {ttl}", i + 1);
        }
    }
    for (i, id) in ids.iter().enumerate().take(3) {
        assert_eq!(Budgets::get(&b, id).await.unwrap().is_some(), i >= 2, "record {i}");
    }
    cleanup(&b).await;
}

/// 300 concurrent reservations spread over three replicas; the budget fits 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_300_concurrent_reserves_exactly_10_fit() {
    let p = prefix();
    let Some(a) = store_at(&p).await else { return };
    let replicas: Vec<Arc<dyn Budgets>> =
        vec![Arc::new(a.clone()), Arc::new(store_at(&p).await.unwrap()), Arc::new(store_at(&p).await.unwrap())];
    let now = t0();
    let start = Arc::new(tokio::sync::Barrier::new(300));
    let tasks: Vec<_> = (0..300u64)
        .map(|i| {
            let (b, start) = (replicas[i as usize % 3].clone(), start.clone());
            tokio::spawn(async move {
                let rid = format!("r{i}");
                start.wait().await;
                let r = ReserveRequest { request_id: &rid, ..rreq("acme", now + i, BUDGET, BUDGET.0 / 10, None) };
                b.reserve(&r).await.unwrap()
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if let ReserveOutcome::Reserved(r) = t.await.unwrap() {
            assert_eq!(r.amount, Micros(100_000));
            ok += 1;
        }
    }
    assert_eq!(ok, 10);
    assert_eq!(spend(&a, "acme", "2026-11").await, (0, BUDGET.0, 10));
    cleanup(&a).await;
}

/// Concurrent sweeps on three replicas: each expired reservation is released exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sweeps_on_replicas_release_each_reservation_once() {
    let p = prefix();
    let Some(a) = store_at(&p).await else { return };
    let replicas = [a.clone(), store_at(&p).await.unwrap(), store_at(&p).await.unwrap()];
    let now = t0();
    for i in 0..600 {
        reserved(a.reserve(&rreq("acme", now + i, Micros(i64::MAX), 1, None)).await.unwrap());
    }
    let mut tasks = Vec::new();
    for k in 0..6u64 {
        let b = replicas[k as usize % 3].clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for step in 0..=30u64 {
                got.extend(b.expire(now + step * 20 + k, now + 1_000).await.unwrap());
            }
            got
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        for r in t.await.unwrap() {
            assert!(ids.insert(r.id), "released twice");
        }
    }
    assert_eq!(ids.len(), 600, "none lost");
    assert_eq!(spend(&a, "acme", "2026-11").await, (0, 0, 0));
    assert!(a.active(10).await.unwrap().is_empty());
    cleanup(&a).await;
}

// ------------------------------------------------------------------------------------------------
// Approvals

fn new_approval(tenant: &str, fp: &str, now: UnixMillis) -> NewApproval {
    NewApproval {
        tenant_id: tenant.into(),
        tenant_tier: "pro".into(),
        request_id: format!("req-{now}"),
        route: "/v1/chat/completions".into(),
        model: "gpt-4o".into(),
        request_fingerprint: fp.into(),
        estimated_cost: Micros(2_500_000),
        reasons: vec![],
        now,
        expires_at: now + 900_000,
    }
}

#[tokio::test]
async fn approvals_queue_decide_and_expire() {
    let Some(s) = store_at(&prefix()).await else { return };
    let t0 = t0();
    let a = s.create_pending(new_approval("acme", "f1", t0)).await.unwrap();
    let b = s.create_pending(new_approval("acme", "f2", t0 + 1)).await.unwrap();
    assert_eq!(a.status, ApprovalStatus::Pending);
    assert_eq!(s.create_pending(new_approval("acme", "f1", t0 + 5)).await.unwrap().approval_id, a.approval_id);
    let pending = s.list(Some(ApprovalStatus::Pending), t0 + 2, 10).await.unwrap();
    assert_eq!(pending.iter().map(|x| x.approval_id.as_str()).collect::<Vec<_>>(), [&b.approval_id, &a.approval_id]);
    assert_eq!(pending[1], a, "round trip through the store keeps every field");
    assert_eq!(s.backlog(t0 + 2).await.unwrap(), 2);
    let ok = s.approve(&a.approval_id, t0 + 10).await.unwrap();
    assert_eq!((ok.status, ok.decided_at), (ApprovalStatus::Approved, Some(t0 + 10)));
    let no = s.deny(&b.approval_id, Some("too expensive"), t0 + 11).await.unwrap();
    assert_eq!((no.status, no.decided_reason.as_deref()), (ApprovalStatus::Denied, Some("too expensive")));
    assert_eq!(s.backlog(t0 + 12).await.unwrap(), 0);
    use ApprovalTransitionError::*;
    assert_eq!(s.approve(&b.approval_id, t0 + 12).await, Err(NotPending(ApprovalStatus::Denied)));
    assert_eq!(s.deny(&a.approval_id, None, t0 + 12).await, Err(NotPending(ApprovalStatus::Approved)));
    assert_eq!(s.approve("nope", t0 + 12).await, Err(NotFound));
    // A denied request asked again is queued anew; an expired one cannot be approved.
    let c = s.create_pending(new_approval("acme", "f2", t0 + 20)).await.unwrap();
    assert_ne!(c.approval_id, b.approval_id);
    let at = t0 + 20 + 900_000;
    assert_eq!(s.list(Some(ApprovalStatus::Expired), at, 10).await.unwrap().len(), 1);
    assert_eq!(s.approve(&c.approval_id, at).await, Err(NotPending(ApprovalStatus::Expired)));
    assert_eq!(s.backlog(at).await.unwrap(), 0);
    assert_eq!(s.backlog(at - 1).await.unwrap(), 1);
    cleanup(&s).await;
}

/// A token consumed on one replica is refused on another; 50 concurrent uses: one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_consumed_on_one_replica_is_replayed_on_another() {
    let p = prefix();
    let Some(a) = store_at(&p).await else { return };
    let b = store_at(&p).await.unwrap();
    let now = now_ms();
    let exp_s = (now / 1000 + 900) as i64;
    let ap = a.create_pending(new_approval("acme", "f1", now)).await.unwrap();
    b.approve(&ap.approval_id, now + 1).await.unwrap();
    assert_eq!(a.consume(&ap.approval_id, exp_s, now + 2).await.unwrap(), ConsumeOutcome::Consumed);
    assert_eq!(b.consume(&ap.approval_id, exp_s, now + 3).await.unwrap(), ConsumeOutcome::Replayed);
    let got = Approvals::get(&b, &ap.approval_id, now + 3).await.unwrap().unwrap();
    assert_eq!((got.status, got.consumed_at), (ApprovalStatus::Consumed, Some(now + 2)));
    // The consumed id is remembered until exp + 5 min (server clock).
    let key = format!("{}jti:{}", a.inner.keys.approvals_base(), ap.approval_id);
    let pttl = pttl(&a, &key).await;
    assert!(pttl > 1_190_000 && pttl <= 1_200_000, "{pttl}");

    let replicas = [a.clone(), b.clone(), store_at(&p).await.unwrap()];
    let start = Arc::new(tokio::sync::Barrier::new(60));
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let (s, start) = (replicas[i % 3].clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                s.consume("cli-token", exp_s, now).await.unwrap()
            })
        })
        .collect();
    let mut consumed = 0;
    for t in tasks {
        consumed += usize::from(t.await.unwrap() == ConsumeOutcome::Consumed);
    }
    assert_eq!(consumed, 1);
    cleanup(&a).await;
}

fn now_ms() -> UnixMillis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

// ------------------------------------------------------------------------------------------------
// Runtime policy

/// A `SIGHUP` reload's patch (local only): the free tier's daily request quota set to `quota`.
fn reload_free_quota(quota: u64) -> crate::store::PolicyPatch {
    let toml = format!("[tiers.free]\ndaily_request_quota = {quota}\n");
    let dir = Arc::new(crate::decide::policy::Directory::from_files(Some(&toml), None).unwrap());
    Box::new(move |p| p.directory = dir)
}

/// Drops `policies` (their re-reads stop; one under way ends first: it could re-create the
/// document), then deletes the prefix's keys.
async fn clean_after<T>(a: &RedisStore, policies: T) {
    drop(policies);
    tokio::time::sleep(Duration::from_millis(100)).await;
    cleanup(a).await;
}

async fn wait_until(deadline: Duration, f: impl Fn() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if f() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_update_on_one_replica_is_seen_by_all_within_a_second() {
    let p = prefix();
    let Some(a) = store_at(&p).await else { return };
    let (b, c) = (store_at(&p).await.unwrap(), store_at(&p).await.unwrap());
    let mut local = Policy::for_test();
    local.global.per_minute_cap = 700;
    let pa = a.policy_store(local.clone()).await;
    // Another replica's local config differs: the stored document wins.
    let mut other = Policy::for_test();
    other.global.per_minute_cap = 1;
    other.fair_use.enabled = true;
    let pb = b.policy_store(other.clone()).await;
    let pc = c.policy_store(other).await;
    for x in [&pb, &pc] {
        assert_eq!((x.current().global.per_minute_cap, x.current().fair_use.enabled), (700, false));
        assert_eq!(x.current().version, 1);
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // subscriptions up

    let started = Instant::now();
    let v = pa.update(Box::new(|p| p.kill_switch = true)).await.unwrap();
    let update_took = started.elapsed();
    assert_eq!((v.version, v.kill_switch), (2, true));
    let lat_b = wait_until(Duration::from_secs(1), || pb.current().kill_switch).await;
    let lat_c = wait_until(Duration::from_secs(1), || pc.current().kill_switch).await;
    eprintln!(
        "kill switch: update took {update_took:?}; then visible on replica b after {lat_b:?}, c after {lat_c:?} \
         (total from the update call: {:?})",
        started.elapsed()
    );
    assert!(lat_b.is_some() && lat_c.is_some(), "seen by all within 1 s");
    assert_eq!(pb.current().version, 2);

    // Concurrent updates from two replicas: neither is lost, versions are consecutive.
    let (r1, r2) = tokio::join!(
        pb.update(Box::new(|p| p.global.block_seconds = 300)),
        pc.update(Box::new(|p| p.audit_sample_rate = 0.5))
    );
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert_eq!(r1.version.max(r2.version), 4);
    let both = wait_until(Duration::from_secs(1), || {
        let x = pa.current();
        x.global.block_seconds == 300 && x.audit_sample_rate == 0.5 && x.kill_switch && x.version == 4
    })
    .await;
    assert!(both.is_some(), "both changes everywhere: {:?}", pa.current());

    // Lifting the switch restores all.
    pc.update(Box::new(|p| p.kill_switch = false)).await.unwrap();
    assert!(wait_until(Duration::from_secs(1), || !pa.current().kill_switch && !pb.current().kill_switch)
        .await
        .is_some());

    // A local-only change (directory reload) stays local, and bumps the fleet's version (the
    // same knobs): a version never names two policies.
    let before = pa.current().version;
    let v = pa.update(reload_free_quota(3)).await.unwrap();
    assert_eq!(v.version, before + 1);
    assert!(wait_until(Duration::from_secs(1), || pb.current().version == before + 1).await.is_some());
    assert_eq!(v.directory.daily_quota("x", Tier::Free), Some(3));
    assert_eq!(pb.current().directory.daily_quota("x", Tier::Free), Some(1), "directories stay local");
    // Later shared changes keep the reloaded local directory.
    pb.update(Box::new(|p| p.audit_sample_rate = 0.25)).await.unwrap();
    assert!(wait_until(Duration::from_secs(1), || pa.current().audit_sample_rate == 0.25).await.is_some());
    assert_eq!(pa.current().directory.daily_quota("x", Tier::Free), Some(3));

    // A replica starting later adopts the stored knobs.
    let pd = store_at(&p).await.unwrap().policy_store(Policy::for_test()).await;
    assert_eq!((pd.current().global.block_seconds, pd.current().version), (300, 7));
    clean_after(&a, (pa, pb, pc, pd)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_switch_or_freeze_in_the_environment_applies_whatever_the_document_says() {
    let p = prefix();
    let (a, b) = (store_at(&p).await.unwrap(), store_at(&p).await.unwrap());
    let pa = a.policy_store(Policy::for_test()).await;
    assert!(!pa.current().kill_switch);
    let mut forced = Policy::for_test();
    forced.kill_switch = true;
    forced.approval_issuance_frozen = true;
    forced.global.per_minute_cap = 7;
    let pb = b.policy_store(forced.clone()).await;
    let now = pb.current();
    assert!(now.kill_switch && now.approval_issuance_frozen, "the environment's switches apply on b");
    assert_ne!(now.global.per_minute_cap, 7, "other settings: the document wins");
    assert!(!pa.current().kill_switch, "and only there: the document is unchanged");
    // The document cannot turn them off on b; a document change of other knobs still applies.
    pa.update(Box::new(|p| p.audit_sample_rate = 0.5)).await.unwrap();
    assert!(wait_until(Duration::from_secs(1), || pb.current().audit_sample_rate == 0.5).await.is_some());
    assert!(pb.current().kill_switch);
    let v = pb.update(Box::new(|p| p.kill_switch = false)).await.unwrap();
    assert!(v.kill_switch, "b keeps its environment's kill switch");
    // Tools (mint-approval) read the same: frozen for b's environment.
    assert!(a.read_policy(&forced).await.unwrap().approval_issuance_frozen);
    assert!(!a.read_policy(&Policy::for_test()).await.unwrap().approval_issuance_frozen);
    clean_after(&a, (pa, pb)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_redis_is_down_applies_here_and_reaches_the_fleet_when_it_is_back() {
    let p = prefix();
    let a = store_at(&p).await.unwrap();
    let pa = a.policy_store(Policy::for_test()).await;
    let mut relay = Relay::start(0).await;
    let port = relay.port;
    let b = RedisStore::connect(&format!("redis://127.0.0.1:{port}"), &p, Duration::from_millis(50)).await.unwrap();
    let pb = b.policy_store(Policy::for_test()).await;
    let version = pb.current().version;
    relay.cut();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let v = pb.update(Box::new(|p| p.kill_switch = true)).await.unwrap();
    assert!(v.kill_switch && pb.unshared(), "applied on this replica at once, marked unshared");
    assert_eq!(v.version, version, "no version of its own while unshared");
    // A reload meanwhile (local only) applies too; its version bump follows Redis.
    let v = pb.update(reload_free_quota(3)).await.unwrap();
    assert_eq!((v.version, v.directory.daily_quota("x", Tier::Free)), (version, Some(3)));
    assert!(!pa.current().kill_switch, "the fleet has not got it yet");
    relay = Relay::start(port).await;
    let reached = wait_until(Duration::from_secs(10), || pa.current().kill_switch).await;
    assert!(reached.is_some(), "written for the fleet once Redis answers");
    assert!(wait_until(Duration::from_secs(2), || !pb.unshared()).await.is_some());
    assert!(pb.current().kill_switch && pb.current().version > version);
    // Each such change is handed out once for its runtime_changed event, at the fleet's version.
    let mut shared = pb.take_shared_changes();
    assert_eq!(shared.len(), 1, "{shared:?}");
    let (at, changes) = shared.remove(0);
    assert_eq!(at, pb.current().version);
    assert_eq!(changes.get("kill_switch"), Some(&serde_json::json!(true)), "{changes:?}");
    assert!(pb.take_shared_changes().is_empty() && pa.take_shared_changes().is_empty());
    // A reload alone while Redis is down: its version bump reaches the fleet afterwards.
    let before = pa.current().version;
    relay.cut();
    tokio::time::sleep(Duration::from_millis(50)).await;
    pb.update(reload_free_quota(4)).await.unwrap();
    assert!(pb.unshared() && pb.current().version == before);
    let _relay = Relay::start(port).await;
    assert!(wait_until(Duration::from_secs(10), || pa.current().version == before + 1).await.is_some());
    assert!(wait_until(Duration::from_secs(2), || !pb.unshared()).await.is_some());
    let shared = pb.take_shared_changes();
    assert_eq!(shared.iter().map(|(v, c)| (*v, c.len())).collect::<Vec<_>>(), [(before + 1, 0)], "a bump alone");
    clean_after(&a, (pa, pb)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_document_lost_is_recreated_from_the_running_policy() {
    let p = prefix();
    let Some(a) = store_at(&p).await else { return };
    let pa = a.policy_store(Policy::for_test()).await;
    pa.update(Box::new(|p| p.kill_switch = true)).await.unwrap();
    cleanup(&a).await; // Redis "lost its data"
    tokio::time::sleep(Duration::from_millis(2_500)).await; // the 2 s re-read re-creates it
    let pb = store_at(&p).await.unwrap().policy_store(Policy::for_test()).await;
    assert!(pb.current().kill_switch, "the kill switch survived the flush");
    clean_after(&a, (pa, pb)).await;
}

/// Redis lost its data and a replica started meanwhile created the document from its
/// environment (a new epoch, version 1, no kill switch): the replicas that ran the fleet's policy
/// (a kill switch at version 2) do not adopt it but write theirs back above it, and every replica
/// runs the kill switch again (audit: the kill switch was lifted fleet-wide, version going back
/// from 3 to 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_re_created_below_the_running_version_is_overwritten_not_adopted() {
    let p = prefix();
    let Some(a) = store_at(&p).await else { return };
    let pa = a.policy_store(Policy::for_test()).await;
    pa.update(Box::new(|p| p.kill_switch = true)).await.unwrap();
    let running = pa.current().version;
    let key = a.inner.keys.global("policy");
    let mut conn = a.inner.conn.read().clone().unwrap();
    let text: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
    let mut fresh: serde_json::Value = serde_json::from_str(&text).unwrap();
    fresh["version"] = 1.into();
    fresh["epoch"] = "fresh-replica".into();
    fresh["knobs"]["kill_switch"] = false.into();
    redis::cmd("SET").arg(&key).arg(fresh.to_string()).query_async::<()>(&mut conn).await.unwrap();
    // Within one re-read (2 s) the running policy is written back above both versions...
    let started = Instant::now();
    loop {
        let text: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
        let d: serde_json::Value = serde_json::from_str(&text).unwrap();
        if d["epoch"] == "fresh-replica" && d["version"].as_u64() > Some(running) && d["knobs"]["kill_switch"] == true {
            break;
        }
        assert!(pa.current().kill_switch, "this replica adopted the lost document");
        assert!(started.elapsed() < Duration::from_secs(5), "the running policy was not written back: {d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...while this replica never ran the lost document's kill switch off.
    assert!(pa.current().kill_switch && pa.current().version > running);
    let pb = store_at(&p).await.unwrap().policy_store(Policy::for_test()).await;
    assert!(pb.current().kill_switch, "a replica started now runs the restored kill switch");
    // Changes go on as usual from there (same epoch, higher version).
    pb.update(Box::new(|p| p.kill_switch = false)).await.unwrap();
    assert!(wait_until(Duration::from_secs(3), || !pa.current().kill_switch).await.is_some());
    clean_after(&a, (pa, pb)).await;
}

/// A replica keeps the fleet's policy it runs in its data directory and starts from it: restarted
/// after Redis lost its data it re-creates the document with the kill switch, and started while
/// Redis is unreachable it runs the kill switch until Redis answers (audit: a replica restarted
/// during the loss wrote its environment's policy, kill switch off, for the fleet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_after_redis_lost_its_data_runs_the_fleets_last_policy() {
    let p = prefix();
    let Some(a) = store_at(&p).await else { return };
    let dir = crate::ledger::outbox::tests::TempDir::new("fleet-policy-saved");
    let pa = a.policy_store_saved(Policy::for_test(), Some(dir.0.clone())).await;
    pa.update(Box::new(|p| p.kill_switch = true)).await.unwrap();
    let version = pa.current().version;
    drop(pa);
    cleanup(&a).await; // Redis lost its data while the replica restarted
    let pb = a.policy_store_saved(Policy::for_test(), Some(dir.0.clone())).await;
    assert!(pb.current().kill_switch && pb.current().version >= version, "{:?}", pb.current().version);
    let fresh = store_at(&p).await.unwrap().policy_store(Policy::for_test()).await;
    assert!(fresh.current().kill_switch, "the document was re-created with the fleet's kill switch");
    drop((pb, fresh));
    // Redis unreachable at the start: the saved policy runs until it answers.
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let opts = RedisOptions { connect_wait: Duration::from_millis(100), ..RedisOptions::default() };
    let down = RedisStore::connect_with(&url, &prefix(), Duration::from_millis(20), opts).await.unwrap();
    let pd = down.policy_store_saved(Policy::for_test(), Some(dir.0.clone())).await;
    assert!(pd.current().kill_switch);
    assert!(
        !down.policy_store(Policy::for_test()).await.current().kill_switch,
        "without the file: the configuration's"
    );
    drop(pd);
    clean_after(&a, ()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_document_with_bad_fields_still_applies_its_kill_switch() {
    let p = prefix();
    let Some(a) = store_at(&p).await else { return };
    let local = Policy::for_test();
    let pa = a.policy_store(local.clone()).await;
    // Edited by hand (redis-cli), not through the admin API: one field out of range, one of the
    // wrong type, and the kill switch on. No message is published: the 2 s re-read finds it.
    let key = a.inner.keys.global("policy");
    let mut conn = a.inner.conn.read().clone().unwrap();
    let get = |mut conn: Conn, key: String| async move {
        let text: String = redis::cmd("GET").arg(key).query_async(&mut conn).await.unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    let mut doc = get(conn.clone(), key.clone()).await;
    doc["version"] = serde_json::json!(doc["version"].as_u64().unwrap() + 1);
    doc["knobs"]["kill_switch"] = true.into();
    doc["knobs"]["audit_sample_rate"] = 7.0.into();
    doc["knobs"]["global_abuse_per_minute_cap"] = "lots".into();
    redis::cmd("SET").arg(&key).arg(doc.to_string()).query_async::<()>(&mut conn).await.unwrap();

    assert!(wait_until(Duration::from_secs(4), || pa.current().kill_switch).await.is_some(), "the kill switch acts");
    let cur = pa.current();
    assert_eq!(
        (cur.audit_sample_rate, cur.global.per_minute_cap),
        (local.audit_sample_rate, local.global.per_minute_cap),
        "the bad fields keep this replica's values"
    );
    // The next update writes a repaired document.
    pa.update(Box::new(|p| p.fair_use.per_minute_cap = 9)).await.unwrap();
    let stored = get(conn, key).await;
    assert_eq!(stored["knobs"]["kill_switch"], true);
    assert_eq!(stored["knobs"]["fair_use_per_minute_cap"], 9);
    assert_eq!(stored["knobs"]["audit_sample_rate"], local.audit_sample_rate);
    assert_eq!(stored["knobs"]["global_abuse_per_minute_cap"], local.global.per_minute_cap);
    drop(pa);
    cleanup(&a).await;
}

// ------------------------------------------------------------------------------------------------
// Failures

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

#[tokio::test]
async fn unreachable_redis_fails_without_network_once_the_breaker_is_open() {
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let opts = RedisOptions { connect_wait: Duration::from_millis(300), ..RedisOptions::default() };
    let started = Instant::now();
    let s = RedisStore::connect_with(&url, &prefix(), Duration::from_millis(20), opts).await.unwrap();
    eprintln!("connect to a closed port returned in {:?}", started.elapsed());
    assert!(!s.healthy(), "starts unhealthy");
    let now = t0();
    let mut worst = Duration::ZERO;
    for i in 0..1000 {
        let t = Instant::now();
        let r = s.admit(&req("a", now + i, None)).await;
        worst = worst.max(t.elapsed());
        // The breaker answers without touching the network (no connect, no op timeout spent).
        assert_eq!(r.map(|_| ()), Err(StoreError::Unavailable("circuit open".into())));
    }
    // Timing is reported, not asserted (benchmarks own performance goals); the op timeout
    // here is 20 ms, so even a loaded machine shows the breaker is not waiting on Redis.
    eprintln!("breaker open: worst admit of 1000 took {worst:?}");
    let r = s.reserve(&rreq("a", now, BUDGET, 1, None)).await;
    assert_eq!(r, Err(StoreError::Unavailable("circuit open".into())));
    assert!(s.error_counts().iter().any(|(op, n)| *op == "admit" && *n == 1000));
}

/// `host:port` of the real Redis.
fn redis_addr() -> String {
    url().trim_start_matches("redis://").trim_end_matches('/').to_string()
}

/// A store at `url` whose breaker never opens in a test's time (the test is about connections or
/// timeouts, not the breaker).
async fn store_without_breaker(url: &str, prefix: &str, op_timeout: Duration) -> RedisStore {
    let opts = RedisOptions {
        breaker: BreakerConfig { failure_threshold: 1000, ..BreakerConfig::default() },
        ..RedisOptions::default()
    };
    RedisStore::connect_with(url, prefix, op_timeout, opts).await.unwrap()
}

/// A TCP relay to the real Redis that shapes what clients send: each chunk is held for
/// `delay_ms` (a stalled Redis: commands land after their sender gave up on them), and with
/// `idle` a connection on which the client sent nothing for that long is closed (Redis'
/// `timeout`, a NAT or load balancer idle timer). Its port.
async fn shaping_relay(idle: Option<Duration>, delay_ms: Arc<std::sync::atomic::AtomicU64>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = redis_addr();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((inbound, _)) = listener.accept().await else { return };
            let (target, delay_ms) = (target.clone(), delay_ms.clone());
            tokio::spawn(async move {
                let Ok(out) = tokio::net::TcpStream::connect(&target).await else { return };
                let ((mut ci, mut co), (mut si, mut so)) = (inbound.into_split(), out.into_split());
                let back = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut si, &mut co).await;
                });
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let read = ci.read(&mut buf);
                    let n = match idle {
                        Some(idle) => tokio::time::timeout(idle, read).await.unwrap_or(Ok(0)),
                        None => read.await,
                    };
                    // Both halves dropped on leaving: the client sees its connection closed.
                    let Ok(n @ 1..) = n else { break };
                    tokio::time::sleep(Duration::from_millis(delay_ms.load(Ordering::Relaxed))).await;
                    if so.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                back.abort();
            });
        }
    });
    port
}

/// Connections kept alive: a quiet spell longer than an idle timer on the way to Redis does not
/// make the next request meet a closed connection (audit: with Redis' `timeout` at 4 s, the first
/// request on each proxy thread after 7 quiet seconds took the failsafe path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_spell_longer_than_an_idle_timeout_does_not_fail_the_next_request() {
    if store_at(&prefix()).await.is_none() {
        return;
    }
    let port = shaping_relay(Some(Duration::from_millis(1_200)), Arc::default()).await;
    let s =
        RedisStore::connect(&format!("redis://127.0.0.1:{port}"), &prefix(), Duration::from_millis(500)).await.unwrap();
    own_id(&s).await; // this thread's own connection is up
    let now = t0();
    for i in 0..2 {
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        s.admit(&req("a", now + i, None)).await.unwrap_or_else(|e| panic!("after quiet spell {i}: {e}"));
    }
    cleanup(&s).await;
}

/// A charge retried after timeouts is added once, although every attempt reaches Redis late
/// (audit: shadow-mode spend 1.5–1.7× the ledger after short Redis stalls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_retried_after_timeouts_that_all_landed_is_added_once() {
    let Some(direct) = store_at(&prefix()).await else { return };
    let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let port = shaping_relay(None, delay_ms.clone()).await;
    let p = prefix();
    // The health pings time out too: keep the breaker out of it.
    let s = store_without_breaker(&format!("redis://127.0.0.1:{port}"), &p, Duration::from_millis(20)).await;
    own_id(&s).await; // connected, this thread's own connection too
    let now = t0();
    // The script is loaded (an EVALSHA that finds it missing is resent by a caller long gone).
    s.charge("warm", "other", "2026-11", Micros(1), now).await.unwrap();
    delay_ms.store(150, Ordering::Relaxed);
    let (out, retried) =
        crate::proxy::spend::retrying(|| s.charge("shadow-1", "acme", "2026-11", Micros(1_000), now)).await;
    assert!(retried && out == Err(StoreError::Timeout), "every attempt timed out: {out:?}");
    tokio::time::sleep(Duration::from_millis(1_000)).await; // all of them have landed by now
    let d = RedisStore::connect(&url(), &p, Duration::from_millis(500)).await.unwrap();
    assert_eq!(d.tenant_spend("acme", "2026-11").await.unwrap().spent, Micros(1_000));
    cleanup(&d).await;
    cleanup(&direct).await;
}

/// A TCP relay to the real Redis that can be cut and restored (Redis "dies" and "comes back").
struct Relay {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(port: u16) -> Relay {
        let target = redis_addr();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                let target = target.clone();
                conns.spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Relay { port, task: Some(task) }
    }

    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort(); // drops the listener and, with the JoinSet, every relayed connection
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_coming_back_is_picked_up_within_seconds() {
    if store_at(&prefix()).await.is_none() {
        return;
    }
    let mut relay = Relay::start(0).await;
    let port = relay.port;
    let p = prefix();
    let s = RedisStore::connect(&format!("redis://127.0.0.1:{port}"), &p, Duration::from_millis(50)).await.unwrap();
    let now = t0();
    s.admit(&req("a", now, None)).await.unwrap();
    relay.cut();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut errors = 0;
    for i in 0..10 {
        errors += usize::from(s.admit(&req("a", now + i, None)).await.is_err());
    }
    assert!(errors >= 5 && !s.healthy(), "errors {errors}");
    let _relay = Relay::start(port).await;
    let back = Instant::now();
    let mut recovered = None;
    while back.elapsed() < Duration::from_secs(10) {
        if s.admit(&req("a", now + 100, None)).await.is_ok() {
            recovered = Some(back.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("recovered {recovered:?} after Redis came back");
    assert!(recovered.is_some_and(|d| d < Duration::from_secs(5)), "{recovered:?}");
    assert!(s.healthy());
    cleanup(&s).await;
}

// ------------------------------------------------------------------------------------------------
// Measurements: round trips per admitted request, admit + reserve latency.

/// Server-wide (EVALSHA + EVAL + ZREM + HMGET calls, all calls) from `INFO commandstats`: the
/// client-visible commands of the hot path (scripts, ZREM of the lease) and everything else.
async fn server_calls(s: &RedisStore) -> (u64, u64) {
    let mut conn = s.inner.conn.read().clone().unwrap();
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
    let calls = |l: &str| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok();
    let mut scripts = 0;
    let mut all = 0;
    for l in info.lines().filter(|l| l.starts_with("cmdstat_")) {
        let n = calls(l).unwrap_or(0);
        all += n;
        if l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:") {
            scripts += n;
        }
    }
    (scripts, all)
}

#[tokio::test]
async fn measure_round_trips_and_latency() {
    let Some(s) = store_at(&prefix()).await else { return };
    // Warm up (scripts cached, connection up).
    let now = now_ms();
    for i in 0..50 {
        let (t, _) = s.admit(&req(&format!("w{}", i % 5), now, Some(60_000))).await.unwrap();
        s.release_lease(&t).await.unwrap();
    }
    // Round trips for one admitted request: admit, reserve, settle, release lease.
    let n = 200u64;
    let (c0, srv0) = (s.commands_sent(), server_calls(&s).await);
    for i in 0..n {
        let tenant = format!("t{}", i % 20);
        let (ticket, _) = s.admit(&req(&tenant, now + i, Some(60_000))).await.unwrap();
        let r = reserved(s.reserve(&rreq(&tenant, now + i, Micros(i64::MAX), 1_000, None)).await.unwrap());
        s.settle(&r.id, Micros(900), now + i + 1).await.unwrap();
        s.release_lease(&ticket).await.unwrap();
    }
    let (c1, srv1) = (s.commands_sent(), server_calls(&s).await);
    let per = (c1 - c0) as f64 / n as f64;
    // Server-wide deltas: they include any other client of this Redis (run this test alone).
    eprintln!(
        "round trips per admitted request (admit + reserve + settle + lease release): {per:.2} client-side \
         [admit 1, reserve 1, settle 1, release 1]; server-side script calls per request {:.2}, \
         all server-side calls per request (incl. those inside scripts) {:.1}",
        (srv1.0 - srv0.0) as f64 / n as f64,
        (srv1.1 - srv0.1) as f64 / n as f64
    );
    assert_eq!(c1 - c0, 4 * n);

    // Latency of admit + reserve (the hot path before forwarding), 2,000 calls, sequential.
    let mut lat = Vec::with_capacity(2000);
    let mut admit_only = Vec::with_capacity(2000);
    for i in 0..2000u64 {
        let tenant = format!("l{}", i % 50);
        let t = Instant::now();
        let (ticket, _) = s.admit(&req(&tenant, now + i, Some(60_000))).await.unwrap();
        let a = t.elapsed();
        let r = s.reserve(&rreq(&tenant, now + i, Micros(i64::MAX), 1_000, None)).await.unwrap();
        lat.push(t.elapsed());
        admit_only.push(a);
        if let ReserveOutcome::Reserved(r) = r {
            s.release(&r.id, now + i).await.unwrap();
        }
        s.release_lease(&ticket).await.unwrap();
    }
    lat.sort();
    admit_only.sort();
    let pct = |v: &[Duration], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    eprintln!(
        "admit+reserve latency over 2000 calls: p50 {:?} p99 {:?} max {:?}; admit alone p50 {:?} p99 {:?}",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat[lat.len() - 1],
        pct(&admit_only, 0.5),
        pct(&admit_only, 0.99)
    );

    // The proxy's hot path: admission and hold through the gatekeeper, one network round trip.
    let mut gk = Vec::with_capacity(2000);
    let c0 = s.commands_sent();
    let sent_before = server_calls(&s).await;
    for i in 0..2000u64 {
        let tenant = format!("g{}", i % 50);
        let t = Instant::now();
        let hold = rreq(&tenant, now + i, Micros(i64::MAX), 1_000, None);
        let (ticket, _, held) =
            crate::store::Gatekeeper::admit_reserve(&s, &req(&tenant, now + i, Some(60_000)), Some(&hold))
                .await
                .unwrap();
        gk.push(t.elapsed());
        if let Some(ReserveOutcome::Reserved(r)) = held {
            s.release(&r.id, now + i).await.unwrap();
        }
        s.release_lease(&ticket).await.unwrap();
    }
    let sent_after = server_calls(&s).await;
    gk.sort();
    eprintln!(
        "gatekeeper admit_reserve (pipelined, 1 round trip, {} commands per call by the client counter incl. the 2 clean-up calls): p50 {:?} p99 {:?}; server script calls per iteration {:.2}",
        (s.commands_sent() - c0) as f64 / 2000.0,
        pct(&gk, 0.5),
        pct(&gk, 0.99),
        (sent_after.0 - sent_before.0) as f64 / 2000.0,
    );

    // The embedded stores for comparison.
    let mc = crate::store::memory::MemoryCounters::new();
    let mb = crate::store::budget_memory::MemoryBudgets::in_memory();
    let mut mem = Vec::with_capacity(2000);
    for i in 0..2000u64 {
        let tenant = format!("l{}", i % 50);
        let t = Instant::now();
        let (ticket, _) = mc.admit(&req(&tenant, now + i, Some(60_000))).await.unwrap();
        let _ = mb.reserve(&rreq(&tenant, now + i, Micros(i64::MAX), 1_000, None)).await.unwrap();
        mem.push(t.elapsed());
        mc.release_lease(&ticket).await.unwrap();
    }
    mem.sort();
    eprintln!("embedded admit+reserve: p50 {:?} p99 {:?}", pct(&mem, 0.5), pct(&mem, 0.99));
    cleanup(&s).await;
}

#[tokio::test]
async fn settle_release_pipelines_the_settlement_and_the_lease() {
    use crate::store::Gatekeeper;
    let Some(s) = store_at(&prefix()).await else { return };
    let now = t0();
    let hold = rreq("acme", now, BUDGET, 300_000, None);
    let (ticket, view, held) = s.admit_reserve(&req("acme", now, Some(60_000)), Some(&hold)).await.unwrap();
    assert_eq!(view.tenant.in_flight, 0);
    let r = reserved(held.unwrap());
    let (_, v) = s.admit(&req("acme", now + 1, Some(60_000))).await.unwrap();
    assert_eq!(v.tenant.in_flight, 1, "the first request's lease is live");
    let c0 = s.commands_sent();
    let (settled, released) = s.settle_release(Some((&r.id, Micros(120_000), now + 5)), Some(&ticket)).await;
    assert_eq!(s.commands_sent() - c0, 2, "two commands, sent together");
    released.unwrap();
    let Some(Ok(SettleOutcome::Settled(st))) = settled else { panic!("{settled:?}") };
    assert_eq!((st.actual, st.released, st.drift), (Micros(120_000), Micros(180_000), Micros(-180_000)));
    assert_eq!(spend(&s, "acme", "2026-11").await, (120_000, 0, 0));
    let (_, v) = s.admit(&req("acme", now + 6, Some(60_000))).await.unwrap();
    assert_eq!(v.tenant.in_flight, 1, "only the second request's lease is left");
    // Settling again: not active; the lease part alone still works.
    let (again, released) = s.settle_release(Some((&r.id, Micros(1), now + 7)), Some(&ticket)).await;
    assert_eq!(again, Some(Ok(SettleOutcome::NotActive)));
    released.unwrap();
    let (none, released) = s.settle_release(None, Some(&ticket)).await;
    assert!(none.is_none() && released.is_ok());
    cleanup(&s).await;
}

// ------------------------------------------------------------------------------------------------
// Connections: the caller's own, the store's shared one.

/// `CLIENT ID` of the connection `exec` picks on the current thread.
async fn client_id(s: &RedisStore) -> i64 {
    s.exec("client_id", 1, |mut c| async move { redis::cmd("CLIENT").arg("ID").query_async::<i64>(&mut c).await })
        .await
        .unwrap()
}

/// `CLIENT ID` of the shared connection.
async fn shared_id(s: &RedisStore) -> i64 {
    let mut conn = s.inner.conn.read().clone().unwrap();
    redis::cmd("CLIENT").arg("ID").query_async::<i64>(&mut conn).await.unwrap()
}

/// [`client_id`] once the thread's own connection is connected (until then: the shared one).
async fn own_id(s: &RedisStore) -> i64 {
    let shared = shared_id(s).await;
    let t = Instant::now();
    loop {
        let id = client_id(s).await;
        if id != shared {
            return id;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "still on the shared connection");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn callers_use_a_connection_of_their_own_until_the_shared_one_is_replaced() {
    let Some(s) = store_at(&prefix()).await else { return };
    let shared = shared_id(&s).await;
    // A thread's first command takes the shared connection (no request waits for a connect)...
    assert_eq!(client_id(&s).await, shared);
    // ...while its own connects; from then on, the same own connection on every call.
    let own = own_id(&s).await;
    assert_ne!(own, shared);
    assert_eq!(client_id(&s).await, own);
    // The store's own tasks (health, policy sync) use the shared connection.
    let on_store = {
        let s2 = s.clone();
        s.inner.handle.spawn(async move { client_id(&s2).await }).await.unwrap()
    };
    assert_eq!(on_store, shared);
    // Another runtime on another thread: another connection.
    let s3 = s.clone();
    let other = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(own_id(&s3))
    })
    .join()
    .unwrap();
    assert!(other != own && other != shared);
    // A replacement (after a breaker opening) replaces the callers' connections too.
    s.replace_connection().await.unwrap();
    let renewed = own_id(&s).await;
    assert!(renewed != own && renewed != shared && renewed != shared_id(&s).await);
    assert_eq!(client_id(&s).await, renewed);
    cleanup(&s).await;
}

/// A caller's own connection whose reconnect failed authentication (the password changed, then
/// was put back) never reconnects by itself: redis' connection manager retries only after I/O
/// errors. The thread takes the shared connection at once, and the health task has every caller
/// connect afresh (audit: a replica stayed on the failsafe path for up to 27 s after the password
/// was restored, until the breaker happened to open again).
#[tokio::test]
async fn an_own_connection_stuck_on_a_failed_login_is_replaced() {
    let Some(admin) = store_at(&prefix()).await else { return };
    let user = format!("preauth-test-{}", uuid::Uuid::new_v4().simple());
    let acl = |args: Vec<String>| {
        let admin = admin.clone();
        async move {
            let mut c = admin.inner.conn.read().clone().unwrap();
            redis::cmd("ACL").arg(args).query_async::<()>(&mut c).await.unwrap();
        }
    };
    acl(vec!["SETUSER".into(), user.clone(), "on".into(), ">pw1".into(), "~*".into(), "&*".into(), "+@all".into()])
        .await;
    let s =
        store_without_breaker(&format!("redis://{user}:pw1@{}", redis_addr()), &prefix(), Duration::from_millis(500))
            .await;
    let own = own_id(&s).await;
    // The password changes and this thread's own connection is cut: its reconnect fails.
    acl(vec!["SETUSER".into(), user.clone(), "resetpass".into(), ">pw2".into()]).await;
    {
        let mut c = admin.inner.conn.read().clone().unwrap();
        redis::cmd("CLIENT").arg("KILL").arg("ID").arg(own).query_async::<()>(&mut c).await.unwrap();
    }
    let ping = || s.exec("ping", 1, |mut c| async move { redis::cmd("PING").query_async::<()>(&mut c).await });
    let t = Instant::now();
    loop {
        match ping().await {
            Err(StoreError::Unavailable(e)) if e.contains("uthentication") => break,
            _ => {}
        }
        assert!(t.elapsed() < Duration::from_secs(5), "the own connection never failed its login");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The password is back: the next command is served (on the shared connection)...
    acl(vec!["SETUSER".into(), user.clone(), "resetpass".into(), ">pw1".into()]).await;
    ping().await.expect("served right after the password is back");
    // ...and the thread soon has an own connection again, a new one.
    let renewed = own_id(&s).await;
    assert_ne!(renewed, own);
    ping().await.unwrap();
    cleanup(&s).await;
    acl(vec!["DELUSER".into(), user]).await;
}
