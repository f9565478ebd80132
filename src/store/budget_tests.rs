//! Tests of [`super::MemoryBudgets`] (included from `budget_memory.rs`): arithmetic, clamp,
//! settle/release/expire life cycle, concurrency, a deterministic randomized model check and
//! durability of the journal.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;

use crate::store::budget::month_key;
use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::decide::time::parse_rfc3339;

const BUDGET: Micros = Micros(1_000_000);

fn t0() -> UnixMillis {
    parse_rfc3339("2026-11-25T10:00:00Z").unwrap()
}

fn req<'a>(tenant: &'a str, now: UnixMillis, budget: Micros, amount: i64, min: Option<i64>) -> ReserveRequest<'a> {
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

fn settled(o: SettleOutcome) -> Settlement {
    match o {
        SettleOutcome::Settled(s) => s,
        other => panic!("expected Settled, got {other:?}"),
    }
}

fn view(b: &MemoryBudgets, tenant: &str, month: &str) -> (i64, i64, u64) {
    let v = b.tenant_spend_now(tenant, month);
    (v.spent.0, v.reserved.0, v.active_reservations)
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("preauth-budgets-{}", uuid::Uuid::new_v4().simple()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ------------------------------------------------------------------------------------------------
// Arithmetic

#[test]
fn reserve_holds_exact_amounts_and_exact_fit_is_allowed() {
    let b = MemoryBudgets::in_memory();
    let now = t0();
    let r1 = reserved(b.reserve_now(&req("acme", now, BUDGET, 300_000, None)).unwrap());
    assert_eq!(r1.amount, Micros(300_000));
    assert_eq!(&*r1.month, "2026-11");
    assert_eq!((&*r1.tenant, &*r1.tenant_tier, &*r1.model), ("acme", "pro", "gpt-4o"));
    assert_eq!(r1.created_at, now);
    assert_eq!(uuid::Uuid::parse_str(&r1.id).unwrap().get_version_num(), 7);
    assert_eq!(view(&b, "acme", "2026-11"), (0, 300_000, 1));

    let r2 = reserved(b.reserve_now(&req("acme", now + 1, BUDGET, 700_000, None)).unwrap());
    assert_eq!(r2.amount, Micros(700_000), "spent + reserved + amount == budget fits");
    assert_eq!(view(&b, "acme", "2026-11"), (0, 1_000_000, 2));

    assert_eq!(
        b.reserve_now(&req("acme", now + 2, BUDGET, 1, None)).unwrap(),
        ReserveOutcome::Insufficient { spent: Micros(0), reserved: Micros(1_000_000), remaining: Micros(0) }
    );
    // Other tenants and other months are independent.
    reserved(b.reserve_now(&req("other", now, BUDGET, 1_000_000, None)).unwrap());
    let december = parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
    let r3 = reserved(b.reserve_now(&req("acme", december, BUDGET, 1_000_000, None)).unwrap());
    assert_eq!(&*r3.month, "2026-12");
    assert_eq!(view(&b, "acme", "2026-11"), (0, 1_000_000, 2));
}

#[test]
fn insufficient_counts_spend_and_reports_the_month() {
    let b = MemoryBudgets::in_memory();
    let now = t0();
    b.charge_now("acme", "2026-11", Micros(400_000), now).unwrap();
    reserved(b.reserve_now(&req("acme", now, BUDGET, 100_000, None)).unwrap());
    assert_eq!(
        b.reserve_now(&req("acme", now, BUDGET, 500_001, None)).unwrap(),
        ReserveOutcome::Insufficient { spent: Micros(400_000), reserved: Micros(100_000), remaining: Micros(500_000) }
    );
    assert_eq!(view(&b, "acme", "2026-11"), (400_000, 100_000, 1), "a refusal holds nothing");
    reserved(b.reserve_now(&req("acme", now, BUDGET, 500_000, None)).unwrap());
    assert_eq!(b.tenant_spend_now("acme", "2026-11").remaining(BUDGET), Micros(0));
    // Zero-cost requests fit while the month is not overspent.
    reserved(b.reserve_now(&req("acme", now, BUDGET, 0, None)).unwrap());
}

#[test]
fn clamp_holds_what_fits_or_refuses_below_the_minimum() {
    let b = MemoryBudgets::in_memory();
    let now = t0();
    let budget = Micros(1_000);
    reserved(b.reserve_now(&req("acme", now, budget, 700, None)).unwrap());
    let full = reserved(b.reserve_now(&req("acme", now, budget, 100, Some(50))).unwrap());
    assert_eq!(full.amount, Micros(100), "fits: the full amount even in clamp mode");
    let clamped = reserved(b.reserve_now(&req("acme", now, budget, 500, Some(200))).unwrap());
    assert_eq!(clamped.amount, Micros(200), "exactly the minimum is still enough");
    assert_eq!(view(&b, "acme", "2026-11"), (0, 1_000, 3));
    assert_eq!(
        b.reserve_now(&req("acme", now, budget, 500, Some(1))).unwrap(),
        ReserveOutcome::Insufficient { spent: Micros(0), reserved: Micros(1_000), remaining: Micros(0) }
    );
    b.release_now(&clamped.id, now).unwrap().unwrap();
    assert_eq!(
        b.reserve_now(&req("acme", now, budget, 500, Some(201))).unwrap(),
        ReserveOutcome::Insufficient { spent: Micros(0), reserved: Micros(800), remaining: Micros(200) }
    );
    let r = reserved(b.reserve_now(&req("acme", now, budget, 500, Some(150))).unwrap());
    assert_eq!(r.amount, Micros(200));
    // A minimum above the amount is the amount.
    b.release_now(&r.id, now).unwrap().unwrap();
    assert!(matches!(
        b.reserve_now(&req("acme", now, budget, 300, Some(10_000))).unwrap(),
        ReserveOutcome::Insufficient { .. }
    ));
    assert_eq!(reserved(b.reserve_now(&req("acme", now, budget, 200, Some(10_000))).unwrap()).amount, Micros(200));
}

/// Past its budget (spend over a budget lowered since, or a settlement above its hold), a tenant
/// has less than nothing left: an approved over-budget request (minimum 0) is still admitted,
/// holding nothing, and a clamp minimum is still refused (runbook drill: soft mode re-asked for
/// approval forever).
#[test]
fn an_approved_request_is_admitted_past_the_budget_holding_nothing() {
    let b = MemoryBudgets::in_memory();
    let now = t0();
    let r = reserved(b.reserve_now(&req("acme", now, Micros(1_000), 1_000, None)).unwrap());
    b.settle_now(&r.id, Micros(1_500), now).unwrap();
    let over = reserved(b.reserve_now(&req("acme", now, Micros(1_000), 300, Some(0))).unwrap());
    assert_eq!(over.amount, Micros(0));
    assert_eq!(view(&b, "acme", "2026-11"), (1_500, 0, 1));
    assert_eq!(
        b.reserve_now(&req("acme", now, Micros(1_000), 300, Some(10))).unwrap(),
        ReserveOutcome::Insufficient { spent: Micros(1_500), reserved: Micros(0), remaining: Micros(0) }
    );
}

#[test]
fn settle_charges_actual_releases_the_rest_and_reports_drift() {
    let b = MemoryBudgets::in_memory();
    let now = t0();
    let r = reserved(b.reserve_now(&req("acme", now, BUDGET, 500_000, None)).unwrap());
    let s = settled(b.settle_now(&r.id, Micros(300_000), now + 10).unwrap());
    assert_eq!((s.actual, s.released, s.drift), (Micros(300_000), Micros(200_000), Micros(-200_000)));
    assert_eq!((&*s.tenant, s.reserved), (&*r.tenant, r.amount));
    assert_eq!(view(&b, "acme", "2026-11"), (300_000, 0, 0));
    assert_eq!(b.get_now(&r.id), Some((r.clone(), ReservationState::Settled { actual: Micros(300_000) })));

    // Overage is charged in full, never refused.
    let r2 = reserved(b.reserve_now(&req("acme", now, BUDGET, 500_000, None)).unwrap());
    let s2 = settled(b.settle_now(&r2.id, Micros(900_000), now + 20).unwrap());
    assert_eq!((s2.actual, s2.released, s2.drift), (Micros(900_000), Micros(0), Micros(400_000)));
    assert_eq!(view(&b, "acme", "2026-11"), (1_200_000, 0, 0));
    assert_eq!(
        b.reserve_now(&req("acme", now, BUDGET, 0, None)).unwrap(),
        ReserveOutcome::Insufficient { spent: Micros(1_200_000), reserved: Micros(0), remaining: Micros(0) },
        "overspent: nothing fits, not even zero"
    );

    // Exact settle: no drift.
    let b2 = MemoryBudgets::in_memory();
    let r3 = reserved(b2.reserve_now(&req("x", now, BUDGET, 42, None)).unwrap());
    let s3 = settled(b2.settle_now(&r3.id, Micros(42), now).unwrap());
    assert_eq!((s3.released, s3.drift), (Micros(0), Micros(0)));
}

#[test]
fn double_settle_release_then_settle_and_unknown_ids() {
    let b = MemoryBudgets::in_memory();
    let now = t0();
    let r = reserved(b.reserve_now(&req("acme", now, BUDGET, 500, None)).unwrap());
    settled(b.settle_now(&r.id, Micros(100), now).unwrap());
    assert_eq!(b.settle_now(&r.id, Micros(100), now).unwrap(), SettleOutcome::NotActive);
    assert_eq!(b.release_now(&r.id, now).unwrap(), None);
    assert_eq!(view(&b, "acme", "2026-11"), (100, 0, 0), "charged once");

    let r2 = reserved(b.reserve_now(&req("acme", now, BUDGET, 700, None)).unwrap());
    assert_eq!(b.release_now(&r2.id, now + 1).unwrap(), Some(r2.clone()));
    assert_eq!(b.release_now(&r2.id, now + 1).unwrap(), None);
    assert_eq!(b.settle_now(&r2.id, Micros(700), now + 2).unwrap(), SettleOutcome::NotActive);
    assert_eq!(b.get_now(&r2.id), Some((r2, ReservationState::Released)));
    assert_eq!(view(&b, "acme", "2026-11"), (100, 0, 0), "a release charges nothing");

    assert_eq!(b.settle_now("nope", Micros(1), now).unwrap(), SettleOutcome::NotFound);
    assert_eq!(b.get_now("nope"), None);
}

#[test]
fn settle_after_month_end_charges_the_reservation_month() {
    let b = MemoryBudgets::in_memory();
    let late = parse_rfc3339("2026-11-30T23:59:59Z").unwrap();
    let r = reserved(b.reserve_now(&req("acme", late, BUDGET, 500, None)).unwrap());
    settled(b.settle_now(&r.id, Micros(400), late + 5_000).unwrap());
    assert_eq!(view(&b, "acme", "2026-11"), (400, 0, 0));
    assert_eq!(view(&b, "acme", "2026-12"), (0, 0, 0));
}

#[test]
fn expire_releases_only_old_ones_exactly_once() {
    let b = MemoryBudgets::in_memory();
    let now = t0();
    let a = reserved(b.reserve_now(&req("acme", now, BUDGET, 10, None)).unwrap());
    let c = reserved(b.reserve_now(&req("acme", now + 10, BUDGET, 20, None)).unwrap());
    let d = reserved(b.reserve_now(&req("acme", now + 20, BUDGET, 30, None)).unwrap());
    assert_eq!(b.active_now(10), vec![a.clone(), c.clone(), d.clone()], "oldest first");
    assert_eq!(b.active_now(1), vec![a.clone()]);

    assert_eq!(b.expire_now(now + 10, now + 100).unwrap(), vec![a.clone()], "strictly older than");
    assert_eq!(b.expire_now(now + 20, now + 100).unwrap(), vec![c.clone()]);
    assert!(b.expire_now(now + 20, now + 100).unwrap().is_empty());
    assert_eq!(view(&b, "acme", "2026-11"), (0, 30, 1), "expiry charges nothing");
    assert_eq!(b.settle_now(&a.id, Micros(5), now + 200).unwrap(), SettleOutcome::NotActive);
    assert_eq!(b.get_now(&c.id).unwrap().1, ReservationState::Released);
    assert_eq!(b.active_now(10), vec![d]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_expire_returns_each_reservation_once() {
    let b = Arc::new(MemoryBudgets::in_memory());
    let now = t0();
    for i in 0..500 {
        reserved(b.reserve_now(&req("acme", now + i, Micros(i64::MAX), 1, None)).unwrap());
    }
    let mut tasks = Vec::new();
    for k in 0..8u64 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for step in 0..=50u64 {
                got.extend(b.expire(now + step * 10 + k, now + 1_000).await.unwrap());
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
    assert_eq!(ids.len(), 500);
    assert_eq!(view(&b, "acme", "2026-11"), (0, 0, 0));
}

#[test]
fn finished_records_are_kept_for_a_day_then_forgotten() {
    let b = MemoryBudgets::in_memory();
    let now = t0();
    let r = reserved(b.reserve_now(&req("acme", now, BUDGET, 10, None)).unwrap());
    settled(b.settle_now(&r.id, Micros(10), now).unwrap());
    b.charge_now("acme", "2026-11", Micros(1), now + MS_PER_DAY).unwrap();
    assert_eq!(b.settle_now(&r.id, Micros(10), now + MS_PER_DAY).unwrap(), SettleOutcome::NotActive, "24 h: kept");
    b.charge_now("acme", "2026-11", Micros(1), now + MS_PER_DAY + 1).unwrap();
    assert_eq!(b.settle_now(&r.id, Micros(10), now + MS_PER_DAY + 1).unwrap(), SettleOutcome::NotFound);
    assert_eq!(b.get_now(&r.id), None);
    assert_eq!(view(&b, "acme", "2026-11"), (12, 0, 0));
}

#[test]
fn finished_records_are_capped() {
    let opts = BudgetsOptions { max_finished: 2, ..BudgetsOptions::default() };
    let b = MemoryBudgets::in_memory_with(opts);
    let now = t0();
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let r = reserved(b.reserve_now(&req("acme", now + i, BUDGET, 10, None)).unwrap());
            b.release_now(&r.id, now + i).unwrap().unwrap();
            r.id
        })
        .collect();
    assert_eq!(b.get_now(&ids[0]), None, "oldest forgotten first");
    assert!(b.get_now(&ids[1]).is_some() && b.get_now(&ids[2]).is_some());
}

#[test]
fn charge_adds_spend_and_rejects_bad_months() {
    let b = MemoryBudgets::in_memory();
    let now = t0();
    b.charge_now("acme", "2026-11", Micros(250), now).unwrap();
    b.charge_now("acme", "2026-11", Micros(-5), now).unwrap();
    b.charge_now("acme", "2026-11", Micros(0), now).unwrap();
    assert_eq!(view(&b, "acme", "2026-11"), (250, 0, 0), "negative amounts count as zero");
    assert!(matches!(b.charge_now("acme", "November", Micros(1), now), Err(StoreError::Unavailable(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_tasks_never_overspend() {
    for durable in [false, true] {
        let dir = TempDir::new();
        let store: Arc<MemoryBudgets> =
            Arc::new(if durable { MemoryBudgets::open(&dir.0).unwrap() } else { MemoryBudgets::in_memory() });
        let budgets: Arc<dyn Budgets> = store.clone();
        let now = t0();
        let start = Arc::new(tokio::sync::Barrier::new(200));
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let (budgets, start) = (budgets.clone(), start.clone());
                tokio::spawn(async move {
                    let rid = format!("r{i}");
                    start.wait().await;
                    let r = ReserveRequest { request_id: &rid, ..req("acme", now + i, BUDGET, BUDGET.0 / 10, None) };
                    budgets.reserve(&r).await.unwrap()
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                ReserveOutcome::Reserved(r) => {
                    assert_eq!(r.amount, Micros(100_000));
                    ok += 1;
                }
                ReserveOutcome::Insufficient { spent, reserved, .. } => {
                    assert_eq!(spent, Micros(0));
                    assert!(reserved.0 > BUDGET.0 - 100_000);
                }
            }
        }
        assert_eq!(ok, 10);
        let v = budgets.tenant_spend("acme", "2026-11").await.unwrap();
        assert_eq!((v.spent, v.reserved, v.active_reservations), (Micros(0), BUDGET, 10));
        if durable {
            let before = store.dump();
            drop((budgets, store));
            assert_eq!(MemoryBudgets::open(&dir.0).unwrap().dump(), before);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Randomized model check (deterministic, no external crates).

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

struct ModelRes {
    tenant: usize,
    month: String,
    amount: i64,
    created_at: UnixMillis,
}

fn run_model(b: &MemoryBudgets, seed: u64, steps: usize, mut between: impl FnMut(usize)) {
    const TENANTS: [&str; 3] = ["t0", "t1", "t2"];
    const BUDGETS: [i64; 3] = [1_000, 20_000, 100_000];
    let mut rng = XorShift(seed);
    // Starts an hour before a month ends, so the run crosses into the next month.
    let mut now = parse_rfc3339("2026-11-30T23:00:00Z").unwrap();
    let mut spent: HashMap<(usize, String), i64> = HashMap::new();
    let mut active: HashMap<String, ModelRes> = HashMap::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut all_ids: Vec<String> = Vec::new();
    let mut stats = [0u32; 6];

    for step in 0..steps {
        between(step);
        now += rng.below(5_000);
        // Mostly recent ids (likely still active), sometimes any id (likely finished already).
        let pick = |rng: &mut XorShift, ids: &[String]| {
            let n = ids.len() as u64;
            let i = if rng.below(4) == 0 { rng.below(n) } else { n - 1 - rng.below(n.min(6)) };
            ids[i as usize].clone()
        };
        match rng.below(12) {
            0..=4 => {
                let t = rng.below(3) as usize;
                let budget = BUDGETS[t];
                let amount = rng.below(300) as i64;
                let min = (rng.below(3) == 0).then(|| rng.below(amount as u64 + 1) as i64);
                let month = month_key(now);
                let pre = b.tenant_spend_now(TENANTS[t], &month);
                let used = pre.spent.0 + pre.reserved.0;
                match b.reserve_now(&req(TENANTS[t], now, Micros(budget), amount, min)).unwrap() {
                    ReserveOutcome::Reserved(r) => {
                        stats[0] += 1;
                        // Past the budget only a minimum of 0 (approved over budget) holds: nothing.
                        let over_ok = r.amount.0 == 0 && min == Some(0);
                        assert!(used + r.amount.0 <= budget || over_ok, "step {step}: reserve overspends");
                        if r.amount.0 != amount {
                            let m = min.expect("only clamp mode holds less");
                            assert!(used + amount > budget && r.amount.0 == (budget - used).max(0) && r.amount.0 >= m);
                        }
                        assert_eq!((&*r.month, r.created_at), (month.as_str(), now));
                        let mr = ModelRes { tenant: t, month, amount: r.amount.0, created_at: now };
                        all_ids.push(r.id.clone());
                        assert!(active.insert(r.id, mr).is_none());
                    }
                    ReserveOutcome::Insufficient { spent: s, reserved: rs, remaining } => {
                        stats[1] += 1;
                        assert_eq!((s, rs), (pre.spent, pre.reserved));
                        assert_eq!(remaining.0, (budget - used).max(0));
                        assert!(used + amount > budget, "step {step}: refused although it fits");
                        if let Some(m) = min {
                            assert!((budget - used).max(0) < m, "step {step}: clamp refused although the minimum fits");
                        }
                    }
                }
            }
            5..=7 if !all_ids.is_empty() => {
                let id = pick(&mut rng, &all_ids);
                let amount = active.get(&id).map_or(100, |m| m.amount);
                let actual = rng.below(2 * amount as u64 + 1) as i64;
                match b.settle_now(&id, Micros(actual), now).unwrap() {
                    SettleOutcome::Settled(s) => {
                        stats[2] += 1;
                        let m = active.remove(&id).expect("settled an id the model has as active");
                        assert!(finished.insert(id), "settled twice");
                        assert_eq!((s.reserved.0, s.actual.0), (m.amount, actual));
                        assert_eq!(&*s.tenant, TENANTS[m.tenant]);
                        assert_eq!(s.drift.0, actual - m.amount);
                        assert_eq!(s.released.0, (m.amount - actual).max(0));
                        *spent.entry((m.tenant, m.month)).or_default() += actual;
                    }
                    SettleOutcome::NotActive => assert!(finished.contains(&id) && !active.contains_key(&id)),
                    SettleOutcome::NotFound => panic!("step {step}: a known id was not found"),
                }
            }
            8 if !all_ids.is_empty() => {
                let id = pick(&mut rng, &all_ids);
                match b.release_now(&id, now).unwrap() {
                    Some(r) => {
                        stats[3] += 1;
                        let m = active.remove(&id).expect("released an id the model has as active");
                        assert_eq!(r.amount.0, m.amount);
                        assert!(finished.insert(id), "released twice");
                    }
                    None => assert!(finished.contains(&id)),
                }
            }
            9 => {
                let older_than = now.saturating_sub(20_000 + rng.below(60_000));
                let got = b.expire_now(older_than, now).unwrap();
                let mut want: Vec<&String> =
                    active.iter().filter(|(_, m)| m.created_at < older_than).map(|(id, _)| id).collect();
                want.sort();
                let mut got_ids: Vec<&String> = got.iter().map(|r| &r.id).collect();
                got_ids.sort();
                assert_eq!(got_ids, want, "step {step}: expire");
                assert!(got.windows(2).all(|w| w[0].created_at <= w[1].created_at), "oldest first");
                for r in &got {
                    stats[4] += 1;
                    active.remove(&r.id);
                    assert!(finished.insert(r.id.clone()), "expired twice");
                }
            }
            10 => {
                let t = rng.below(3) as usize;
                let amount = rng.below(200) as i64;
                let month = month_key(now);
                b.charge_now(TENANTS[t], &month, Micros(amount), now).unwrap();
                *spent.entry((t, month)).or_default() += amount;
                stats[5] += 1;
            }
            _ => {
                assert_eq!(b.settle_now("unknown", Micros(1), now).unwrap(), SettleOutcome::NotFound);
            }
        }

        // Sums are consistent after every step.
        let mut keys: HashSet<(usize, String)> = spent.keys().cloned().collect();
        keys.extend(active.values().map(|m| (m.tenant, m.month.clone())));
        for (t, month) in keys {
            let v = b.tenant_spend_now(TENANTS[t], &month);
            let want_spent = spent.get(&(t, month.clone())).copied().unwrap_or(0);
            let holds: Vec<i64> =
                active.values().filter(|m| m.tenant == t && m.month == month).map(|m| m.amount).collect();
            assert_eq!(v.spent.0, want_spent, "step {step}: spent of {t} {month}");
            assert_eq!(v.reserved.0, holds.iter().sum::<i64>(), "step {step}: reserved of {t} {month}");
            assert_eq!(v.active_reservations, holds.len() as u64);
            assert!(v.reserved.0 <= BUDGETS[t], "step {step}: holds exceed the budget");
        }
        assert_eq!(b.active_now(usize::MAX).len(), active.len());
    }
    assert_eq!(month_key(now), "2026-12", "the run crossed a month boundary");
    assert!(stats.iter().all(|n| *n > 50), "every operation was exercised: {stats:?}");
}

#[test]
fn randomized_interleavings_keep_the_books_exact() {
    for seed in [0x9E37_79B9_7F4A_7C15, 42, 7] {
        run_model(&MemoryBudgets::in_memory(), seed, 2_000, |_| {});
    }
}

#[test]
fn randomized_run_survives_compaction_and_reopen() {
    let dir = TempDir::new();
    let b = MemoryBudgets::open(&dir.0).unwrap();
    run_model(&b, 0xDEAD_BEEF, 2_000, |step| {
        if step % 500 == 499 {
            let before = b.dump();
            b.compact().unwrap();
            assert_eq!(b.dump(), before);
        }
    });
    let before = b.dump();
    drop(b);
    let reopened = MemoryBudgets::open(&dir.0).unwrap();
    assert_eq!(reopened.dump(), before);
    // The journal now holds the snapshot only.
    let lines = fs::read_to_string(dir.0.join(JOURNAL_FILE)).unwrap().lines().count();
    assert!(lines < 2_000, "compacted: {lines} lines");
}

// ------------------------------------------------------------------------------------------------
// Durability

fn populate(b: &MemoryBudgets) -> (Reservation, Reservation) {
    let now = t0();
    let open = reserved(b.reserve_now(&req("acme", now, BUDGET, 300_000, None)).unwrap());
    let done = reserved(b.reserve_now(&req("acme", now + 1, BUDGET, 200_000, None)).unwrap());
    settled(b.settle_now(&done.id, Micros(250_000), now + 2).unwrap());
    let gone = reserved(b.reserve_now(&req("beta", now + 3, BUDGET, 1_000, None)).unwrap());
    b.release_now(&gone.id, now + 4).unwrap().unwrap();
    b.charge_now("beta", "2026-11", Micros(7), now + 5).unwrap();
    (open, done)
}

/// A journaled store in group-commit mode, populated; its directory and the open hold.
fn group_committed() -> (TempDir, MemoryBudgets, Reservation) {
    let dir = TempDir::new();
    let b = MemoryBudgets::open(&dir.0).unwrap();
    b.group_commit(Arc::new(crate::commit::StageCounter::default()));
    let (open, _) = populate(&b);
    (dir, b, open)
}

#[test]
fn group_commit_mode_writes_at_the_flush_in_one_piece() {
    use crate::commit::{StageCounter, Staged};
    let dir = TempDir::new();
    let b = MemoryBudgets::open(&dir.0).unwrap();
    let counter = Arc::new(StageCounter::default());
    b.group_commit(counter.clone());
    let path = dir.0.join(JOURNAL_FILE);
    let base = b.journal_len();
    let before = b.dump();
    let (open, done) = populate(&b);
    // Applied at once, written only at the flush.
    assert_ne!(b.dump(), before);
    assert_eq!((b.journal_len(), fs::metadata(&path).unwrap().len()), (base, base));
    assert!(!fs::read_to_string(&path).unwrap().contains(&open.id));
    b.flush_staged().unwrap();
    assert!(b.journal_len() > base);
    let (replayed, skipped) = State::replay(&fs::read(&path).unwrap(), &BudgetsOptions::default());
    assert_eq!((replayed.dump(), skipped), (b.dump(), 0));
    assert!(replayed.active.contains_key(&Id::new(&open.id)) && replayed.finished.contains(&Id::new(&done.id)));
    // Closing writes what is still staged.
    let later = reserved(b.reserve_now(&req("gamma", t0() + 10, BUDGET, 5, None)).unwrap());
    let state = b.dump();
    drop(b);
    let reopened = MemoryBudgets::open(&dir.0).unwrap();
    assert_eq!(reopened.dump(), state);
    assert!(reopened.get_now(&later.id).is_some());
}

/// A compaction in group-commit mode snapshots the state with the staged changes in it: it
/// writes them first, so that nothing is in the snapshot and again in the tail (or missing).
#[test]
fn compaction_writes_staged_lines_first_and_keeps_the_state() {
    use crate::commit::Staged;
    let (dir, b, open) = group_committed();
    b.compact().unwrap();
    // Staged after the compaction: still written at the flush, once.
    let later = reserved(b.reserve_now(&req("gamma", t0() + 10, BUDGET, 5, None)).unwrap());
    settled(b.settle_now(&open.id, Micros(2), t0() + 11).unwrap());
    b.flush_staged().unwrap();
    let state = b.dump();
    let text = fs::read_to_string(dir.0.join(JOURNAL_FILE)).unwrap();
    assert_eq!(text.matches(&later.id).count(), 1, "{text}");
    let (replayed, skipped) = State::replay(text.as_bytes(), &BudgetsOptions::default());
    assert_eq!((replayed.dump(), skipped), (state.clone(), 0));
    drop(b);
    assert_eq!(MemoryBudgets::open(&dir.0).unwrap().dump(), state);
}

/// A background compaction copies the finished records a piece at a time, letting requests in
/// between: records forgotten meanwhile are left out, records finished meanwhile are not taken
/// (the journal's tail has them), and the rest come in finishing order.
#[test]
fn finished_records_are_copied_in_pieces_skipping_those_forgotten_meanwhile() {
    let b = MemoryBudgets::in_memory_with(BudgetsOptions { max_finished: 50, ..BudgetsOptions::default() });
    let finish = |n: u64, at: u64| -> Vec<String> {
        (0..n)
            .map(|i| {
                let r = reserved(b.reserve_now(&req("acme", at + i, BUDGET, 1, None)).unwrap());
                settled(b.settle_now(&r.id, Micros(1), at + i).unwrap());
                r.id
            })
            .collect()
    };
    let ids = finish(80, t0());
    let end = b.shared.inner.lock().state.finished.end_seq();
    let (mut out, mut from, mut later) = (Vec::new(), 0, Vec::new());
    while from < end {
        from = b.shared.inner.lock().state.copy_finished(from, end, 7, &mut out);
        // Between two pieces: ten more finished, so the ten oldest are forgotten (faster than
        // the copy goes: it has to skip some).
        later.extend(finish(10, t0() + 1_000 + from));
    }
    let got: Vec<String> = out.iter().map(|(id, _)| id.text()).collect();
    // Remembered at the start: the last 50. Each piece of 7 is followed by 10 forgotten.
    let mut want = Vec::new();
    let (mut next, mut forgotten) = (30, 0);
    while next < 80 {
        next = next.max(30 + forgotten);
        want.extend(ids[next..(next + 7).min(80)].iter().cloned());
        next += 7;
        forgotten += 10;
    }
    assert_eq!(got, want);
    assert_eq!(got.len(), 35, "15 of the 50 were forgotten before their piece was copied");
    assert!(got.iter().all(|id| !later.contains(id)));
    assert_eq!(b.shared.inner.lock().state.snapshot().finished.len(), 50);
}

/// When the compaction's early write of staged lines fails, the group commit they belong to
/// fails too (it must not acknowledge lines that are not in the file).
#[test]
fn a_failed_early_write_of_staged_lines_fails_their_group_commit() {
    use crate::commit::Staged;
    let (dir, b, _) = group_committed();
    let path = dir.0.join(JOURNAL_FILE);
    let swap = |f: File| std::mem::replace(&mut b.shared.inner.lock().journal.as_mut().unwrap().file, Arc::new(f));
    let good = swap(File::open(&path).unwrap());
    assert!(b.compact().is_err());
    swap(Arc::try_unwrap(good).unwrap());
    assert!(b.flush_staged().is_err(), "the lost lines reach the group commit");
    b.flush_staged().unwrap();
}

/// A group commit whose write fails after its lines were applied (a full volume): the next
/// `sync` that can write rewrites the journal from memory, so a settlement of a request already
/// served is not lost at the next start (durability audit: it was, and the sweep then released
/// the hold: served, charged nothing).
#[test]
fn changes_whose_group_commit_failed_are_written_back_by_the_next_sync() {
    use crate::commit::Staged;
    let (dir, b, open) = group_committed();
    b.flush_staged().unwrap();
    let path = dir.0.join(JOURNAL_FILE);
    let swap = |f: File| std::mem::replace(&mut b.shared.inner.lock().journal.as_mut().unwrap().file, Arc::new(f));
    settled(b.settle_now(&open.id, Micros(5), t0() + 1).unwrap());
    let good = swap(File::open(&path).unwrap()); // read-only: the write fails
    assert!(b.flush_staged().is_err());
    swap(Arc::try_unwrap(good).unwrap());
    b.sync().unwrap();
    let before = b.dump();
    drop(b);
    let b = MemoryBudgets::open(&dir.0).unwrap();
    assert_eq!(b.dump(), before, "the settlement survived the failed write");
    assert_eq!(b.settle_now(&open.id, Micros(5), t0() + 2).unwrap(), SettleOutcome::NotActive);
}

#[test]
fn reopen_restores_spend_active_and_finished() {
    let dir = TempDir::new();
    let b = MemoryBudgets::open(&dir.0).unwrap();
    let (open, done) = populate(&b);
    b.sync().unwrap();
    let before = b.dump();
    drop(b);

    let b = MemoryBudgets::open(&dir.0).unwrap();
    assert_eq!(b.dump(), before);
    assert_eq!(view(&b, "acme", "2026-11"), (250_000, 300_000, 1));
    assert_eq!(view(&b, "beta", "2026-11"), (7, 0, 0));
    assert_eq!(b.active_now(10), vec![open.clone()]);
    assert_eq!(b.settle_now(&done.id, Micros(1), t0() + 10).unwrap(), SettleOutcome::NotActive);
    // It keeps working and journaling after a reopen.
    settled(b.settle_now(&open.id, Micros(1), t0() + 10).unwrap());
    drop(b);
    let b = MemoryBudgets::open(&dir.0).unwrap();
    assert_eq!(view(&b, "acme", "2026-11"), (250_001, 0, 0));
    assert!(b.active_now(10).is_empty());
}

#[test]
fn journal_lines_are_written_before_the_call_returns() {
    let dir = TempDir::new();
    let b = MemoryBudgets::open(&dir.0).unwrap();
    let base = b.journal_len();
    let r = reserved(b.reserve_now(&req("acme", t0(), BUDGET, 5, None)).unwrap());
    let text = fs::read_to_string(dir.0.join(JOURNAL_FILE)).unwrap();
    let last = text.lines().last().unwrap();
    assert!(last.starts_with(r#"{"op":"reserve","id":""#) && last.contains(&r.id), "{last}");
    assert_eq!(text.len() as u64, b.journal_len());
    assert!(b.journal_len() > base);
    // Refusals and no-ops write nothing.
    let len = b.journal_len();
    b.reserve_now(&req("acme", t0(), BUDGET, BUDGET.0, None)).unwrap();
    b.settle_now("nope", Micros(1), t0()).unwrap();
    b.expire_now(0, t0()).unwrap();
    assert_eq!(b.journal_len(), len);
}

/// A journal as written by earlier versions (the format is fixed), with ids that are not canonical
/// UUIDs: everything comes back exactly as written, also after the compaction in `open`.
#[test]
fn a_journal_with_any_id_text_replays_exactly() {
    let t = t0();
    let uuid = "01a212ea-2553-722d-ae80-a3c5862df6d2";
    let upper = "01A212EA-2553-722D-AE80-A3C5862DF6D2";
    let journal = [
        format!(r#"{{"op":"snapshot","v":1,"now":{t}}}"#),
        r#"{"op":"spent","tenant":"acme","month":"2026-11","spent":500}"#.to_string(),
        format!(
            r#"{{"op":"done","id":"01a212ea-2553-722d-ae80-a3c5862df6d3","tenant":"beta","tier":"free","request_id":"{uuid}","model":"m","month":"2026-11","amount":5,"created":{},"at":{},"actual":4}}"#,
            t - 5,
            t - 1
        ),
        format!(
            r#"{{"op":"done","id":"x","tenant":"gone","tier":"","request_id":"","model":"","month":"2026-11","amount":5,"created":{},"at":{},"actual":null}}"#,
            t - 5,
            t - 1
        ),
        format!(
            r#"{{"op":"reserve","id":"{uuid}","tenant":"acme","tier":"pro","request_id":"REQ-Upper","model":"gpt-4o","month":"2026-11","amount":100,"at":{t}}}"#
        ),
        format!(
            r#"{{"op":"reserve","id":"legacy-1","tenant":"acme","tier":"pro","request_id":"{upper}","model":"gpt-4o","month":"2026-11","amount":200,"at":{}}}"#,
            t + 1
        ),
        format!(r#"{{"op":"settle","id":"legacy-1","actual":150,"at":{}}}"#, t + 2),
        format!(r#"{{"op":"charge","tenant":"beta","month":"2026-11","amount":7,"at":{}}}"#, t + 3),
    ]
    .join("\n");
    let dir = TempDir::new();
    fs::create_dir_all(&dir.0).unwrap();
    fs::write(dir.0.join(JOURNAL_FILE), journal + "\n").unwrap();
    let res =
        |id: &str, tenant: &str, tier: &str, request_id: &str, model: &str, amount: i64, created_at| Reservation {
            id: id.into(),
            tenant: tenant.into(),
            tenant_tier: tier.into(),
            request_id: request_id.into(),
            model: model.into(),
            month: "2026-11".into(),
            amount: Micros(amount),
            created_at,
        };
    let check = |b: &MemoryBudgets| {
        let open = res(uuid, "acme", "pro", "REQ-Upper", "gpt-4o", 100, t);
        assert_eq!(b.get_now(uuid), Some((open.clone(), ReservationState::Active)));
        assert_eq!(b.active_now(10), vec![open]);
        assert_eq!(
            b.get_now("legacy-1"),
            Some((
                res("legacy-1", "acme", "pro", upper, "gpt-4o", 200, t + 1),
                ReservationState::Settled { actual: Micros(150) }
            ))
        );
        let id = "01a212ea-2553-722d-ae80-a3c5862df6d3";
        assert_eq!(
            b.get_now(id),
            Some((res(id, "beta", "free", uuid, "m", 5, t - 5), ReservationState::Settled { actual: Micros(4) }))
        );
        assert_eq!(b.get_now("x"), Some((res("x", "gone", "", "", "", 5, t - 5), ReservationState::Released)));
        assert_eq!(b.get_now(upper), None, "ids are compared as text");
        assert_eq!(view(b, "acme", "2026-11"), (650, 100, 1));
        assert_eq!(view(b, "beta", "2026-11"), (7, 0, 0));
    };
    let b = MemoryBudgets::open(&dir.0).unwrap();
    check(&b);
    let before = b.dump();
    drop(b);
    let b = MemoryBudgets::open(&dir.0).unwrap();
    check(&b);
    assert_eq!(b.dump(), before);
    assert_eq!(b.settle_now("x", Micros(1), t + 4).unwrap(), SettleOutcome::NotActive);
}

#[test]
fn a_torn_or_garbage_last_line_is_ignored() {
    let tails: [&[u8]; 3] = [br#"{"op":"settle","id":"#, b"\x00\x00garbage\xff", br#"{"op":"bogus"}"#];
    for tail in tails {
        let dir = TempDir::new();
        let b = MemoryBudgets::open(&dir.0).unwrap();
        populate(&b);
        let before = b.dump();
        drop(b);
        let mut f = OpenOptions::new().append(true).open(dir.0.join(JOURNAL_FILE)).unwrap();
        f.write_all(tail).unwrap();
        drop(f);
        let b = MemoryBudgets::open(&dir.0).unwrap();
        assert_eq!(b.dump(), before);
        // The garbage is gone after the compaction in `open`, and new lines are readable.
        b.charge_now("acme", "2026-11", Micros(1), t0() + 100).unwrap();
        let before = b.dump();
        drop(b);
        assert_eq!(MemoryBudgets::open(&dir.0).unwrap().dump(), before);
    }
}

/// A line lost in the middle (a disk error, a hand edit) is not a torn last write: the store
/// refuses to start from it and leaves the file as it is (durability audit: one bad line reset a
/// tenant's month spend to 0, and the start's compaction erased the evidence).
#[test]
fn a_damaged_line_before_the_tail_refuses_the_start_and_keeps_the_file() {
    let dir = TempDir::new();
    let b = MemoryBudgets::open(&dir.0).unwrap();
    populate(&b);
    drop(b);
    let path = dir.0.join(JOURNAL_FILE);
    let text = fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "{text}");
    let damaged = text.replacen(lines[1], &lines[1].replacen('{', "{x", 1), 1);
    fs::write(&path, &damaged).unwrap();
    let err = MemoryBudgets::open(&dir.0).err().expect("refused");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    let msg = err.to_string();
    assert!(msg.contains("line 2 of") && msg.contains("left as it is") && msg.contains(JOURNAL_FILE), "{msg}");
    assert_eq!(fs::read_to_string(&path).unwrap(), damaged, "the file is kept as it is");
    // A complete (newline-terminated) last line that cannot be read is no torn write either; a
    // line of NUL bytes (what a power loss can leave) is.
    fs::write(&path, format!("{text}{{\"op\":\"settle\",\"id\"x}}\n")).unwrap();
    let err = MemoryBudgets::open(&dir.0).err().expect("refused");
    assert!(err.to_string().contains(&format!("line {} of", lines.len() + 1)), "{err}");
    fs::write(&path, format!("{text}{}\n", "\0".repeat(200))).unwrap();
    MemoryBudgets::open(&dir.0).expect("a NUL tail is a torn write");
}

#[test]
fn a_leftover_temp_file_is_ignored() {
    let dir = TempDir::new();
    let b = MemoryBudgets::open(&dir.0).unwrap();
    populate(&b);
    let before = b.dump();
    drop(b);
    fs::write(dir.0.join(TMP_FILE), b"half a snapshot").unwrap();
    assert_eq!(MemoryBudgets::open(&dir.0).unwrap().dump(), before);
}

#[test]
fn compaction_keeps_the_state_and_shrinks_the_journal() {
    let dir = TempDir::new();
    let b = MemoryBudgets::open(&dir.0).unwrap();
    let now = t0();
    for i in 0..300 {
        let r = reserved(b.reserve_now(&req("acme", now + i, Micros(i64::MAX), 10, None)).unwrap());
        if i % 3 != 0 {
            settled(b.settle_now(&r.id, Micros(7), now + i).unwrap());
        }
    }
    // An old month: dropped by compaction, the current and previous month are kept.
    b.charge_now("acme", "2026-10", Micros(5), now).unwrap();
    b.charge_now("acme", "2026-09", Micros(5), now).unwrap();
    let grown = b.journal_len();
    b.compact().unwrap();
    assert!(b.journal_len() < grown, "{} < {grown}", b.journal_len());
    let mut before = b.dump();
    drop(b);
    let b = MemoryBudgets::open(&dir.0).unwrap();
    before = before.lines().filter(|l| !l.contains(" 2026-09 ")).map(|l| format!("{l}\n")).collect();
    assert_eq!(b.dump(), before);
    assert_eq!(view(&b, "acme", "2026-10"), (5, 0, 0));
    assert_eq!(view(&b, "acme", "2026-09"), (0, 0, 0));
    assert_eq!(view(&b, "acme", "2026-11"), (200 * 7, 100 * 10, 100));
}

#[test]
fn background_compaction_keeps_the_state() {
    let dir = TempDir::new();
    let opts = BudgetsOptions { compact_above_bytes: 8 * 1024, ..BudgetsOptions::default() };
    let b = MemoryBudgets::open_with(&dir.0, opts.clone()).unwrap();
    let now = t0();
    for i in 0..2_000 {
        let r = reserved(b.reserve_now(&req("acme", now + i, Micros(i64::MAX), 10, None)).unwrap());
        if i % 2 == 0 {
            settled(b.settle_now(&r.id, Micros(3), now + i).unwrap());
        }
    }
    while b.is_compacting() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let before = b.dump();
    let len = b.journal_len();
    drop(b);
    assert_eq!(fs::metadata(dir.0.join(JOURNAL_FILE)).unwrap().len(), len);
    let lines = fs::read_to_string(dir.0.join(JOURNAL_FILE)).unwrap().lines().count();
    assert!(lines < 3_000, "compacted at least once: {lines} lines");
    let b = MemoryBudgets::open_with(&dir.0, opts).unwrap();
    assert_eq!(b.dump(), before);
    assert_eq!(view(&b, "acme", "2026-11"), (1_000 * 3, 1_000 * 10, 1_000));
}

#[test]
fn a_failed_journal_write_changes_nothing() {
    let dir = TempDir::new();
    let b = MemoryBudgets::open(&dir.0).unwrap();
    let (open, _) = populate(&b);
    let before = b.dump();
    let path = dir.0.join(JOURNAL_FILE);
    let swap = |f: File| std::mem::replace(&mut b.shared.inner.lock().journal.as_mut().unwrap().file, Arc::new(f));
    // A read-only handle: every write (and the truncation after it) fails.
    let good = swap(File::open(&path).unwrap());
    assert!(matches!(b.reserve_now(&req("acme", t0(), BUDGET, 1, None)), Err(StoreError::Unavailable(_))));
    assert!(matches!(b.settle_now(&open.id, Micros(1), t0()), Err(StoreError::Unavailable(_))));
    assert!(matches!(b.release_now(&open.id, t0()), Err(StoreError::Unavailable(_))));
    assert!(matches!(b.expire_now(u64::MAX, t0()), Err(StoreError::Unavailable(_))));
    assert!(matches!(b.charge_now("acme", "2026-11", Micros(1), t0()), Err(StoreError::Unavailable(_))));
    assert_eq!(b.dump(), before, "nothing applied without its journal line");
    // Writable again: it recovers and the journal stays replayable.
    swap(Arc::try_unwrap(good).unwrap());
    settled(b.settle_now(&open.id, Micros(1), t0() + 1).unwrap());
    let before = b.dump();
    drop(b);
    assert_eq!(MemoryBudgets::open(&dir.0).unwrap().dump(), before);
}

#[test]
fn in_memory_store_has_no_journal() {
    let b = MemoryBudgets::in_memory();
    populate(&b);
    assert_eq!(b.journal_len(), 0);
    b.sync().unwrap();
    b.compact().unwrap();
}

#[test]
fn hand_written_journal_lines_are_serdes_bytes() {
    let odd = "q\"b\\s/\u{1}\n\u{1f} é 日本 🦀";
    let entries = [
        Entry::Reserve {
            id: Cow::Borrowed("01a212ea-2553-722d-ae80-a3c5862df6d2"),
            tenant: Cow::Borrowed(odd),
            tier: Cow::Borrowed("pro"),
            request_id: Cow::Borrowed(""),
            model: Cow::Borrowed(odd),
            month: Cow::Borrowed("2026-11"),
            amount: i64::MAX,
            at: u64::MAX,
        },
        Entry::Reserve {
            id: Cow::Borrowed("x"),
            tenant: Cow::Borrowed("t"),
            tier: Cow::Borrowed("free"),
            request_id: Cow::Borrowed("r"),
            model: Cow::Borrowed("m"),
            month: Cow::Borrowed("2026-01"),
            amount: -5,
            at: 0,
        },
        Entry::Settle { id: Cow::Borrowed(odd), actual: i64::MIN, at: 1_795_600_000_000 },
        Entry::Release { id: Cow::Borrowed("id"), at: 7 },
        Entry::Charge { tenant: Cow::Borrowed(odd), month: Cow::Borrowed("2026-11"), amount: 3, at: 4 },
        Entry::Snapshot { v: 1, now: 9 },
    ];
    for e in &entries {
        let mut fast = Vec::new();
        e.write_line(&mut fast).unwrap();
        assert_eq!(String::from_utf8(fast).unwrap(), serde_json::to_string(e).unwrap());
    }
}

#[test]
fn the_tier_of_the_latest_hold_survives_reopen_and_compaction() {
    assert!(std::mem::size_of::<Slot>() <= 32, "the tier fits in the slot's padding");
    let dir = TempDir::new();
    let b = MemoryBudgets::open(&dir.0).unwrap();
    let now = t0();
    assert_eq!(b.tenant_spend_now("acme", "2026-11").tier, None, "no hold yet");
    let r = reserved(
        b.reserve_now(&ReserveRequest { tenant_tier: "growth", ..req("acme", now, BUDGET, 10, None) }).unwrap(),
    );
    assert_eq!(b.tenant_spend_now("acme", "2026-11").tier, Some(Tier::Growth));
    // The latest hold decides; released, nothing spent: the tier is still kept.
    let r2 = reserved(b.reserve_now(&req("acme", now + 1, BUDGET, 10, None)).unwrap());
    b.release_now(&r.id, now + 2).unwrap();
    b.release_now(&r2.id, now + 2).unwrap();
    assert_eq!(b.tenant_spend_now("acme", "2026-11"), SpendView { tier: Some(Tier::Pro), ..SpendView::default() });
    drop(b);
    let b = MemoryBudgets::open(&dir.0).unwrap(); // replays, then compacts
    assert_eq!(b.tenant_spend_now("acme", "2026-11").tier, Some(Tier::Pro));
    drop(b);
    let b = MemoryBudgets::open(&dir.0).unwrap(); // from the snapshot alone
    assert_eq!(b.tenant_spend_now("acme", "2026-11").tier, Some(Tier::Pro));
    assert_eq!(b.tenant_spend_now("beta", "2026-11").tier, None);
}
