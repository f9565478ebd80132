//! Spend glue (CONTRACT §3 steps 7 and 9, §6): what the proxy remembers about a request's cost,
//! the reservation it holds, the usage scanner fed by the response, and settlement when the
//! response ends. The arithmetic lives in `decide::pricing`; the atomic hold in `store::budget`.
//!
//! Owns: `SpendCtx`, `settle`. Imports: decide (pricing, usage), store::budget, telemetry, state.

use crate::decide::pricing::{cost, ModelPrice};
use crate::decide::usage::{BodyKind, UsageScanner};
use crate::decide::usage_types::Usage;
use crate::decide::{Micros, Route, Tier};
use crate::ledger::event::{Event, EventType, Template};
use crate::state::AppState;
use crate::store::budget::{Reservation, SettleOutcome};
use crate::store::{StoreError, Ticket};

/// Cost facts of one admitted request.
pub struct SpendCtx {
    pub route: Route,
    pub tier: Tier,
    pub tenant: std::sync::Arc<str>,
    /// Price-table key for metrics (`other` for models outside the table).
    pub model_label: std::sync::Arc<str>,
    pub price: ModelPrice,
    pub prompt_tokens: u64,
    /// The most output the request may produce (its max tokens × choices, else the model's):
    /// what the hold was sized for, and the cap of an output estimated from the text seen.
    pub max_output_tokens: u64,
    pub estimated_cost: Micros,
    /// The hold, when one was taken (not in shadow mode or on the failsafe path).
    pub reservation: Option<Reservation>,
    /// No hold, but settle the real usage into spend (shadow mode, fail-open).
    pub charge_only: bool,
    pub scanner: Option<UsageScanner>,
    /// The decision event, the template of this request's settlement or release event.
    pub event: Option<Template>,
}

impl SpendCtx {
    /// Starts scanning a 2xx response whose content type is `content_type`.
    pub fn start_scan(&mut self, content_type: Option<&str>) {
        self.scanner = Some(UsageScanner::new(self.route, BodyKind::from_content_type(content_type)));
    }
}

/// A price-table key (or `other`) as a shared metric label: one copy per distinct key and
/// thread (the table is bounded; past 64 keys a label is allocated per request).
pub fn model_label(key: &str) -> std::sync::Arc<str> {
    thread_local! {
        static LABELS: crate::intern::Table = const { std::cell::RefCell::new(Vec::new()) };
    }
    crate::intern::shared(&LABELS, key)
}

/// Settles a finished request: charge the real cost and release the rest, or release everything
/// when the upstream did not answer 2xx. Events and journal lines are staged: the caller commits. A settlement takes the concurrency lease (`lease`) along,
/// in the same store round trip, and leaves `None`; otherwise the lease stays for the caller.
pub async fn settle(state: &AppState, spend: &mut SpendCtx, upstream_status: Option<u16>, lease: &mut Option<Ticket>) {
    let now = state.clock.now_ms();
    let m = &state.metrics;
    let ok = upstream_status.is_some_and(|s| (200..300).contains(&s));
    let reservation = spend.reservation.take();
    if !ok {
        let Some(r) = reservation else { return };
        if let Some((template, mut e)) = follow_up(state, spend, EventType::ReservationReleased) {
            e.reserved_usd = Some(r.amount);
            e.upstream_status = upstream_status;
            e.details = Some(
                serde_json::json!({"reason": if upstream_status.is_some() { "upstream_error" } else { "no_response" }}),
            );
            state.stage_follow_up(template, &e);
        }
        match state.budgets.release(&r.id, now).await {
            Ok(_) => m.reconciliations.with_label_values(&["usage", "released"]).inc(),
            Err(e) => {
                m.store_errors.with_label_values(&["release"]).inc();
                tracing::warn!(error = %e, reservation_id = %r.id, "release failed; the sweep will release it after PREAUTH_RESERVATION_TTL_SECONDS");
            }
        }
        return;
    }
    if reservation.is_none() && !spend.charge_only {
        return;
    }
    let scan = spend.scanner.take().map(|mut s| s.finish());
    let (usage, usage_source) = match scan.as_ref().and_then(|s| s.usage) {
        Some(u) => (u, "reported"),
        None => (
            Usage {
                prompt_tokens: spend.prompt_tokens,
                // The text seen, never more than the request allowed (an answer too odd to
                // read usage from must not cost more than the hold was sized for).
                completion_tokens: scan.as_ref().map_or(0, |s| s.observed_output_tokens).min(spend.max_output_tokens),
                cached_tokens: 0,
                reasoning_tokens: 0,
            },
            "estimated",
        ),
    };
    let actual = cost(&spend.price, &usage);
    // The settlement reaches the outbox before the hold is released.
    if let Some((template, mut e)) = follow_up(state, spend, EventType::ReservationSettled) {
        let reserved = reservation.as_ref().map_or(Micros::ZERO, |r| r.amount);
        e.reserved_usd = Some(reserved);
        e.actual_cost_usd = Some(actual);
        e.drift_usd = Some(Micros(actual.0 - reserved.0));
        e.usage = Some(usage);
        e.usage_source = Some(crate::ledger::event::label(usage_source));
        e.upstream_status = upstream_status;
        state.stage_follow_up(template, &e);
    }
    match reservation {
        Some(r) => match settle_release(state, &r.id, actual, now, lease).await {
            Ok(SettleOutcome::Settled(s)) => {
                m.record_settlement("usage", s.drift);
            }
            Ok(_) => {
                // Released by the sweep or reconciled by an operator meanwhile: never charge twice.
                tracing::warn!(reservation_id = %r.id, "reservation no longer active at settlement; not charged again");
                return;
            }
            Err(e) => {
                m.store_errors.with_label_values(&["settle"]).inc();
                tracing::error!(error = %e, reservation_id = %r.id, actual = %actual, "settlement failed; the sweep will release the hold");
                return;
            }
        },
        None => {
            let month = crate::store::budget::month_key(now);
            if let Err(e) = state.budgets.charge(&spend.tenant, &month, actual, now).await {
                m.store_errors.with_label_values(&["charge"]).inc();
                tracing::error!(error = %e, "charging shadow-mode usage failed");
                return;
            }
        }
    }
    m.record_spend(spend.tier.as_str(), &spend.price.provider, &spend.model_label, actual);
}

/// Settles `id` and releases `lease` (taken) through the gatekeeper: one store step.
async fn settle_release(
    state: &AppState,
    id: &str,
    actual: Micros,
    now: crate::decide::UnixMillis,
    lease: &mut Option<Ticket>,
) -> Result<SettleOutcome, StoreError> {
    let ticket = lease.take();
    let settle = Some((id, actual, now));
    let (settled, released) = match state.gatekeeper.settle_release_now(settle, ticket.as_ref()) {
        Some(done) => done,
        None => state.gatekeeper.settle_release(settle, ticket.as_ref()).await,
    };
    if let Err(e) = released {
        state.store_failed("release_lease", e);
    }
    settled.unwrap_or(Ok(SettleOutcome::NotFound))
}

/// A follow-up event of this request (settlement, release), built from its decision event.
fn follow_up<'s>(state: &AppState, spend: &'s SpendCtx, event_type: EventType) -> Option<(&'s Template, Event)> {
    let template = spend.event.as_ref()?;
    Some((template, template.follow_up(state.event(event_type, template.event().policy_version))))
}
