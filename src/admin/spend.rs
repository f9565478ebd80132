//! Admin routes over budgets and reservations (CONTRACT §8, §10):
//! `GET /tenants/{id}`, `GET /reservations?active=true`, `POST /reservations/{id}/reconcile`,
//! `POST /reservations/reconcile-overdue`. Answers are JSON values; `admin::mod` writes them.
//!
//! Owns: the handlers and the reconcile idempotency memo. Imports: state, store::budget, worker.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::decide::time::rfc3339_seconds;
use crate::decide::Micros;
use crate::ledger::event::EventType;
use crate::state::AppState;
use crate::store::budget::{month_key, Reservation, ReservationState, SettleOutcome};

use super::err;

/// An admin answer: status and JSON body.
pub type Answer = (u16, Value);

fn reservation_json(r: &Reservation, now: u64) -> Value {
    json!({
        "reservation_id": r.id,
        "tenant_id": r.tenant,
        "tenant_tier": r.tenant_tier,
        "request_id": r.request_id,
        "model": r.model,
        "month": r.month,
        "reserved_usd": r.amount,
        "created_at": rfc3339_seconds(r.created_at),
        "age_seconds": now.saturating_sub(r.created_at) / 1000,
    })
}

/// `GET /api/v1/enforcement/tenants/{tenant_id}`.
pub async fn tenant(state: &AppState, tenant: &str) -> Answer {
    let now = state.clock.now_ms();
    let policy = state.policy.current();
    let month = month_key(now);
    let spend = match state.budgets.tenant_spend(tenant, &month).await {
        Ok(s) => s,
        Err(e) => return err(503, "store_unavailable", &format!("Spend could not be read: {e}. Retry.")),
    };
    // The tenants file decides; else the tier the tenant's requests resolved to (from their
    // identity): the shared store's record of the latest hold (fleet), this replica's memory.
    let tier = policy
        .directory
        .tenant(tenant)
        .and_then(|t| t.tier)
        .or(spend.tier)
        .or_else(|| state.tier_seen(tenant))
        .unwrap_or(crate::decide::Tier::Free);
    let budget = policy.directory.monthly_budget(tenant, tier);
    let counters = state.counters.tenant_view(tenant, now).await.unwrap_or_default();
    (
        200,
        json!({
            "tenant_id": tenant,
            "tier": tier.as_str(),
            "month": month,
            "monthly_budget_usd": budget,
            "spent_usd": spend.spent,
            "reserved_usd": spend.reserved,
            "remaining_usd": spend.remaining(budget),
            "daily_requests": counters.daily_requests,
            "requests_last_minute": counters.minute_requests,
            "in_flight": counters.in_flight,
            "active_reservations": spend.active_reservations,
            "policy_version": policy.version,
        }),
    )
}

/// `GET /api/v1/enforcement/reservations?active=true` (only active reservations are listed).
pub async fn list(state: &AppState, query: &str) -> Answer {
    let active = query_param(query, "active").unwrap_or("true");
    if !matches!(active, "true" | "1") {
        return err(400, "invalid_request", "Only active reservations are listed: use ?active=true.");
    }
    let limit = query_param(query, "limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(1000).clamp(1, 10_000);
    let now = state.clock.now_ms();
    match state.budgets.active(limit).await {
        Ok(items) => (200, json!({"items": items.iter().map(|r| reservation_json(r, now)).collect::<Vec<_>>()})),
        Err(e) => err(503, "store_unavailable", &format!("Reservations could not be read: {e}. Retry.")),
    }
}

/// What a reconcile call stored, for idempotent replays.
#[derive(Clone)]
struct Reconciled {
    key: String,
    actual: Micros,
    notes: Option<String>,
    answer: Value,
}

/// Serialises reconciles (they are rare) and remembers keyed answers for replays.
#[derive(Default)]
pub struct ReconcileMemo {
    inner: tokio::sync::Mutex<HashMap<String, Reconciled>>,
}

/// Bound on remembered reconcile answers.
const MAX_MEMO: usize = 100_000;

fn money_field(v: &Value) -> Option<Micros> {
    match v {
        Value::String(s) => Micros::from_usd_str(s).ok(),
        Value::Number(n) => Micros::from_usd_str(&n.to_string()).ok(),
        _ => None,
    }
}

/// The answer to a reconcile call repeating `prev`'s key: the same answer for the same payload,
/// 409 `idempotency_key_mismatch` for another.
fn replay(state: &AppState, prev: &Reconciled, actual: Micros, notes: Option<&String>) -> Answer {
    if prev.actual != actual || notes.is_some_and(|n| Some(n) != prev.notes.as_ref()) {
        return err(
            409,
            "idempotency_key_mismatch",
            "This idempotency key was already used for this reservation with a different payload.",
        );
    }
    let status = prev.answer["status"].as_str().unwrap_or("matched");
    state.metrics.reconciliations.with_label_values(&["manual_replay", status]).inc();
    (200, prev.answer.clone())
}

/// The manual settlement of `r` made with idempotency key `key`, rebuilt from its
/// `reservation_settled` event (local ledger, or Postgres when it is the sink — another
/// replica's reconcile shows there once the relay delivered it). `None` when there is none.
async fn reconciled_in_ledger(state: &AppState, r: &Reservation, key: &str) -> Option<Reconciled> {
    let filter = crate::ledger::LedgerFilter {
        limit: 100,
        start_at_us: Some(r.created_at.saturating_sub(60_000).saturating_mul(1000)),
        event_type: Some(EventType::ReservationSettled),
        reservation_id: Some(r.id.clone()),
        ..crate::ledger::LedgerFilter::default()
    };
    let events = state.ledger.query(&filter).await.ok()?;
    events.into_iter().find_map(|e| {
        let d = e.details.as_ref()?;
        if d["trigger"] != "manual" || d["idempotency_key"].as_str() != Some(key) {
            return None;
        }
        let actual = e.actual_cost_usd?;
        let reserved = e.reserved_usd.unwrap_or(r.amount);
        let drift = Micros(actual.0 - reserved.0);
        let notes = d["notes"].as_str().map(str::to_string);
        let at = crate::decide::time::parse_rfc3339(&e.occurred_at)?;
        let answer = json!({
            "reservation_id": r.id,
            "tenant_id": e.tenant_id.as_deref().unwrap_or(&r.tenant),
            "status": crate::telemetry::settlement_status(drift),
            "reserved_usd": reserved,
            "actual_cost_usd": actual,
            "released_usd": Micros((reserved.0 - actual.0).max(0)),
            "drift_usd": drift,
            "reconciled_at": rfc3339_seconds(at),
            "idempotency_key": key,
            "notes": notes,
        });
        Some(Reconciled { key: key.to_string(), actual, notes, answer })
    })
}

/// `POST /api/v1/enforcement/reservations/{id}/reconcile` `{actual_cost_usd, idempotency_key, notes}`.
pub async fn reconcile(state: &AppState, memo: &ReconcileMemo, id: &str, body: &Value) -> Answer {
    let Some(actual) = body.get("actual_cost_usd").and_then(money_field).filter(|m| m.0 >= 0) else {
        return err(400, "invalid_request", "`actual_cost_usd` is required: a non-negative decimal like \"0.012500\".");
    };
    let key = body.get("idempotency_key").and_then(Value::as_str).map(str::trim).filter(|k| !k.is_empty());
    let notes = body.get("notes").and_then(Value::as_str).map(str::to_string);
    let m = &state.metrics;
    let mut memo = memo.inner.lock().await;
    if let (Some(prev), Some(k)) = (memo.get(id), key) {
        if prev.key == k {
            return replay(state, prev, actual, notes.as_ref());
        }
    }
    let _turn = state.settlement_turn(id).await;
    let now = state.clock.now_ms();
    // The settlement reaches the outbox before the hold is released.
    let active = match state.budgets.get(id).await {
        Ok(Some((r, ReservationState::Active))) => Some(r),
        Ok(Some((r, _))) => {
            // Ended: by this key before this process remembered it (a restart, another replica)?
            // The ledger has the answer.
            if let Some(k) = key {
                if let Some(prev) = reconciled_in_ledger(state, &r, k).await {
                    return replay(state, &prev, actual, notes.as_ref());
                }
            }
            None
        }
        Ok(None) => None,
        Err(e) => return err(503, "store_unavailable", &format!("Reservation could not be read: {e}. Retry.")),
    };
    // When it happened, as the ledger says (a replay rebuilt from the ledger says the same).
    let mut reconciled_at = now;
    if let Some(r) = &active {
        let mut e = state.reservation_event(r, EventType::ReservationSettled);
        reconciled_at = crate::decide::time::parse_rfc3339(&e.occurred_at).unwrap_or(now);
        e.actual_cost_usd = Some(actual);
        e.drift_usd = Some(Micros(actual.0 - r.amount.0));
        e.usage_source = Some("manual".to_string().into());
        e.details = Some(json!({"trigger": "manual", "idempotency_key": key, "notes": notes}));
        state.emit(&e);
    }
    let settled = state.budgets.settle(id, actual, now).await;
    state.group.flush(); // written before the operator hears of it
    match settled {
        Ok(SettleOutcome::Settled(s)) => {
            state.release_gate_lease(&s.tenant, id).await;
            let status = m.record_settlement("manual", s.drift);
            if let Some(r) = &active {
                state.record_spend_of(&r.tenant_tier, &r.model, s.actual);
            }
            let answer = json!({
                "reservation_id": id,
                "tenant_id": s.tenant,
                "status": status,
                "reserved_usd": s.reserved,
                "actual_cost_usd": s.actual,
                "released_usd": s.released,
                "drift_usd": s.drift,
                "reconciled_at": rfc3339_seconds(reconciled_at),
                "idempotency_key": key,
                "notes": notes,
            });
            tracing::warn!(target: "audit", event = "reservation_reconciled", reservation_id = id, status, actual = %s.actual, drift = %s.drift);
            if let Some(k) = key {
                if memo.len() >= MAX_MEMO {
                    memo.clear();
                }
                memo.insert(id.to_string(), Reconciled { key: k.to_string(), actual, notes, answer: answer.clone() });
            }
            (200, answer)
        }
        Ok(SettleOutcome::NotActive) => {
            err(409, "reservation_not_active", "Reservation is not active (already settled or released).")
        }
        Ok(SettleOutcome::NotFound) => err(404, "reservation_not_found", "No such reservation."),
        Err(e) => err(503, "store_unavailable", &format!("Reservation could not be reconciled: {e}. Retry.")),
    }
}

/// `POST /api/v1/enforcement/reservations/reconcile-overdue` `{older_than_seconds?}`: runs the sweep now.
pub async fn reconcile_overdue(state: &AppState, body: &Value) -> Answer {
    let older = match body.get("older_than_seconds") {
        None | Some(Value::Null) => state.config.reservation_ttl_seconds,
        Some(v) => match v.as_u64() {
            Some(n) if n <= 7 * 86_400 => n,
            _ => return err(400, "invalid_request", "`older_than_seconds` must be an integer between 0 and 604800."),
        },
    };
    let now = state.clock.now_ms();
    let released = match crate::worker::release_overdue(state, older, now, "manual").await {
        Ok(r) => r,
        Err(e) => return err(503, "store_unavailable", &format!("Reservations could not be swept: {e}. Retry.")),
    };
    let total = released.iter().fold(Micros::ZERO, |acc, r| acc.saturating_add(r.amount));
    (
        200,
        json!({
            "released_count": released.len(),
            "total_released_usd": total,
            "reservation_ids": released.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
            "older_than_seconds": older,
        }),
    )
}

/// A query parameter's raw value.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}
