//! Memory per tracked tenant of the embedded stores: RSS before and after 100k tenants each make
//! one admitted, reserved and settled request, and of the tenant → tier memo (`AppState::note_tier`)
//! for tenants on a paid tier. `cargo run --release --example mem_probe [tenants]`.
//!
//! Measured with the system allocator (the binary uses mimalloc).

use preauth_sidecar::decide::{Micros, Tier};
use preauth_sidecar::state::TiersSeen;
use preauth_sidecar::store::budget::{ReserveOutcome, ReserveRequest};
use preauth_sidecar::store::budget_memory::MemoryBudgets;
use preauth_sidecar::store::memory::MemoryCounters;
use preauth_sidecar::store::AdmitRequest;

fn rss_kb() -> i64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap()
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let now = 1_795_600_000_000u64;
    let base = rss_kb();
    let counters = MemoryCounters::new();
    let tenants: Vec<String> = (0..n).map(|i| format!("tenant-{i:06}")).collect();
    let names = rss_kb();
    for (i, t) in tenants.iter().enumerate() {
        let (ticket, _) = counters.admit_now(&AdmitRequest {
            tenant: t,
            now: now + i as u64 / 10,
            tokens: 100,
            lease_ttl_ms: Some(180_000),
        });
        counters.release_now(&ticket);
    }
    let after_counters = rss_kb();
    let budgets = MemoryBudgets::in_memory();
    for (i, t) in tenants.iter().enumerate() {
        let r = ReserveRequest {
            tenant: t,
            tenant_tier: "pro",
            request_id: "01a212ea-2553-722d-ae80-a3c5862df6d2",
            model: "gpt-4o-mini",
            now: now + i as u64 / 10,
            monthly_budget: Micros(50_000_000),
            amount: Micros(2_500),
            min_amount: None,
        };
        if let ReserveOutcome::Reserved(res) = budgets.reserve_now(&r).unwrap() {
            budgets.settle_now(&res.id, Micros(1_000), now + i as u64 / 10 + 1).unwrap();
        }
    }
    let after_budgets = rss_kb();
    let tiers = TiersSeen::default();
    for t in &tenants {
        tiers.note(t, Tier::Pro);
    }
    let after_tiers = rss_kb();
    let per_tenant = |kb: i64| kb * 1024 / n as i64;
    println!(
        "{n} tenants: names {} KB, counters {} KB ({} B/tenant), budgets {} KB ({} B/tenant), \
         counters + budgets {} B/tenant; tiers seen {} KB ({} B/tenant)",
        names - base,
        after_counters - names,
        per_tenant(after_counters - names),
        after_budgets - after_counters,
        per_tenant(after_budgets - after_counters),
        per_tenant(after_budgets - names),
        after_tiers - after_budgets,
        per_tenant(after_tiers - after_budgets),
    );
}
