//! Spend glue (CONTRACT §3 steps 7 and 9, §6): what the proxy remembers about a request's cost,
//! the reservation it holds, the usage scanner fed by the response, and settlement when the
//! response ends. The arithmetic lives in `decide::pricing`; the atomic hold in `store::budget`.
//!
//! Settlement, release and lease release run once the gateway has answered, and a store timeout
//! there is retried ([`retrying`], [`RETRY_WAITS`]): it is most often the sidecar's own queueing
//! under saturation (the step may even have run: each is idempotent by reservation id or lease),
//! and giving up would leave the hold to the sweep after `PREAUTH_RESERVATION_TTL_SECONDS` (its
//! spend never charged) and the lease counting against the tenant's concurrency cap until its
//! TTL. Only a timeout is retried at once; a settlement the store still refuses is retried in
//! the background ([`LATER_WAITS`]) until it lands.
//!
//! Owns: `SpendCtx`, `settle`, `retrying`. Imports: decide (pricing, usage), store::budget,
//! telemetry, state.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::decide::pricing::{cost, ModelPrice};
use crate::decide::usage::{BodyKind, UsageScanner};
use crate::decide::usage_types::Usage;
use crate::decide::{Micros, Route, Tier, UnixMillis};
use crate::ledger::event::{Event, EventType, Template};
use crate::state::AppState;
use crate::store::budget::{Reservation, ReservationState, SettleOutcome};
use crate::store::{StoreError, Ticket};

/// The waits before each retry of a timed-out store step after the gateway answered: at most
/// three attempts, ≈ 60 ms of waiting plus the attempts' own `PREAUTH_STORE_TIMEOUT_MS`.
pub const RETRY_WAITS: [Duration; 2] = [Duration::from_millis(10), Duration::from_millis(50)];

/// Runs `step`, and again after each of [`RETRY_WAITS`] while it times out. The second result
/// says whether a retry ran (a retried step may find its work done by the attempt that timed out).
pub async fn retrying<T, F, Fut>(mut step: F) -> (Result<T, StoreError>, bool)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut out = step().await;
    let mut retried = false;
    for wait in RETRY_WAITS {
        if !matches!(out, Err(StoreError::Timeout)) {
            break;
        }
        tokio::time::sleep(wait).await;
        retried = true;
        out = step().await;
    }
    (out, retried)
}

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
    /// The client asked for no usage chunk (`include_usage: false`); the gateway was asked for
    /// one, and `strip` takes it out of a streamed answer.
    pub strip_usage: bool,
    pub strip: Option<super::strip::UsageChunkStrip>,
    /// The decision event, the template of this request's settlement or release event.
    pub event: Option<Template>,
}

impl SpendCtx {
    /// Starts scanning a 2xx response whose content type is `content_type`.
    pub fn start_scan(&mut self, content_type: Option<&str>) {
        let kind = BodyKind::from_content_type(content_type);
        self.scanner = Some(UsageScanner::new(self.route, kind));
        if self.strip_usage && kind == BodyKind::Sse {
            self.strip = Some(Default::default());
        }
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
/// when the upstream did not answer 2xx (unless the client went away after the request reached
/// the gateway: see below). Events and journal lines are staged: the caller commits. A
/// settlement takes the concurrency lease (`lease`) along, in the same store round trip, and
/// leaves `None`; otherwise the lease stays for the caller.
pub async fn settle(
    state: &Arc<AppState>,
    spend: &mut SpendCtx,
    upstream_status: Option<u16>,
    unanswered_after_forward: bool,
    lease: &mut Option<Ticket>,
) {
    let now = state.clock.now_ms();
    let m = &state.metrics;
    // A client that went away after its request reached the gateway, before any answer: the
    // gateway may bill the call all the same (providers do), so it is settled like a stream cut
    // before its usage — the estimated prompt — not released (short client timeouts would
    // otherwise make every forwarded call free).
    let ok = upstream_status.is_some_and(|s| (200..300).contains(&s))
        || (upstream_status.is_none() && unanswered_after_forward);
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
        match retrying(|| state.budgets.release(&r.id, now)).await.0 {
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
    let reported = scan.as_ref().and_then(|s| s.usage);
    let reported = match reported {
        Some(u) if !u.plausible() => {
            tracing::warn!(
                prompt_tokens = u.prompt_tokens,
                completion_tokens = u.completion_tokens,
                "the gateway reported usage beyond any model's (over 10^9 tokens); settled from what was observed"
            );
            None
        }
        other => other,
    };
    let (usage, usage_source) = match reported {
        Some(u) => (u, "reported"),
        None => {
            // The prompt as the provider reported it before the stream was cut (Anthropic's
            // message_start), else as estimated from the request.
            let (prompt_tokens, cached_tokens) =
                scan.as_ref().and_then(|s| s.reported_prompt).unwrap_or((spend.prompt_tokens, 0));
            let usage = Usage {
                prompt_tokens,
                // The text seen, never more than the request allowed (an answer too odd to
                // read usage from must not cost more than the hold was sized for).
                completion_tokens: scan.as_ref().map_or(0, |s| s.observed_output_tokens).min(spend.max_output_tokens),
                cached_tokens,
                reasoning_tokens: 0,
            };
            (usage, "estimated")
        }
    };
    let actual = cost(&spend.price, &usage);
    // The settlement reaches the outbox before the hold is released.
    if let Some((template, mut e)) = follow_up(state, spend, EventType::ReservationSettled) {
        let reserved = reservation.as_ref().map_or(Micros::ZERO, |r| r.amount);
        e.reserved_usd = Some(reserved);
        e.actual_cost_usd = Some(actual);
        // Drift compares a hold with its settlement: none without a hold (shadow mode, fail-open),
        // as the drift metrics count none.
        e.drift_usd = reservation.as_ref().map(|r| Micros(actual.0 - r.amount.0));
        e.usage = Some(usage);
        e.usage_source = Some(crate::ledger::event::label(usage_source));
        e.upstream_status = upstream_status;
        state.stage_follow_up(template, &e);
    }
    match reservation {
        Some(r) => match settle_release(state, &r.id, actual, now, lease).await {
            (Ok(SettleOutcome::Settled(s)), _) => {
                m.record_settlement("usage", s.drift);
            }
            (Ok(SettleOutcome::NotActive), true) => {
                // The attempt that timed out settled it (a retry finds it done): charged once.
                tracing::info!(reservation_id = %r.id, "settlement confirmed by a retry after a store timeout");
            }
            (Ok(_), _) => {
                if !charge_late(state, &r, actual, now).await {
                    return;
                }
            }
            (Err(e), _) => {
                m.store_errors.with_label_values(&["settle"]).inc();
                if let Some(not_logged) = state.spend_failure_log.pass(now / 1000) {
                    tracing::warn!(error = %e, reservation_id = %r.id, actual = %actual, not_logged, "settlement failed; retried in the background");
                }
                tokio::spawn(settle_later(state.clone(), r, actual, now, SpendLabels::of(spend)));
                return;
            }
        },
        None => {
            let month = crate::store::budget::month_key(now);
            // One id for every attempt: a timed-out attempt that lands late is not added twice.
            let id = crate::ids::v7();
            if let (Err(e), _) = retrying(|| state.budgets.charge(&id, &spend.tenant, &month, actual, now)).await {
                m.store_errors.with_label_values(&["charge"]).inc();
                if let Some(not_logged) = state.spend_failure_log.pass(now / 1000) {
                    tracing::warn!(error = %e, tenant_id = %spend.tenant, actual = %actual, not_logged, "charging shadow-mode usage failed; retried in the background");
                }
                let tenant = spend.tenant.clone();
                tokio::spawn(charge_later(state.clone(), id, tenant, month, actual, now, SpendLabels::of(spend)));
                return;
            }
        }
    }
    m.record_spend(spend.tier.as_str(), &spend.price.provider, &spend.model_label, actual);
}

/// Waits before each background attempt of a settlement the store refused after the gateway
/// answered (Redis down, the breaker open): ≈ 9 minutes in all, long enough for a Redis restart
/// or failover, shorter than `PREAUTH_RESERVATION_TTL_SECONDS`' default (30 min).
pub const LATER_WAITS: [Duration; 9] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(15),
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(120),
    Duration::from_secs(300),
];

/// The metric labels of a settlement finished in the background.
struct SpendLabels {
    tier: Tier,
    provider: std::sync::Arc<str>,
    model: std::sync::Arc<str>,
}

impl SpendLabels {
    fn of(spend: &SpendCtx) -> SpendLabels {
        SpendLabels { tier: spend.tier, provider: spend.price.provider.clone(), model: spend.model_label.clone() }
    }

    /// Counts `actual` in the spend metric under these labels.
    fn record(&self, state: &AppState, actual: Micros) {
        state.metrics.record_spend(self.tier.as_str(), &self.provider, &self.model, actual);
    }
}

/// A settlement that failed against the store, retried until it lands: its event is in the
/// ledger already, and without it the tenant's spend would miss a call the gateway served (the
/// sweep would only release the hold). Settling is idempotent by reservation id; a hold the
/// sweep released meanwhile is charged as a late settlement ([`charge_late`]). Given up after
/// [`LATER_WAITS`] (or at shutdown), the ledger still has the settlement:
/// `preauth-sidecar rebuild-spend` restores a fleet's spend from it.
async fn settle_later(state: Arc<AppState>, r: Reservation, actual: Micros, now: UnixMillis, labels: SpendLabels) {
    let m = &state.metrics;
    let charged = match crate::store::after_each(&LATER_WAITS, || state.budgets.settle(&r.id, actual, now)).await {
        Some(Ok(SettleOutcome::Settled(s))) => {
            m.record_settlement("usage", s.drift);
            true
        }
        Some(Ok(SettleOutcome::NotActive)) => charge_late(&state, &r, actual, now).await,
        Some(Ok(SettleOutcome::NotFound)) => {
            forgotten(&r, actual);
            false
        }
        Some(Err(_)) | None => {
            m.store_errors.with_label_values(&["settle"]).inc();
            tracing::error!(
                reservation_id = %r.id,
                tenant_id = %r.tenant,
                actual = %actual,
                "settlement could not be written to the state store in ≈ 9 minutes; the sweep releases the hold and \
                 the ledger keeps the settlement (preauth-sidecar rebuild-spend restores spend from a Postgres ledger)"
            );
            return;
        }
    };
    if charged {
        labels.record(&state, actual);
        tracing::info!(reservation_id = %r.id, actual = %actual, "settlement retried in the background went through");
    }
}

/// Shadow-mode usage (no hold) the store refused, charged in the background like
/// [`settle_later`]: its settlement event is in the ledger already, and the spend should show it.
async fn charge_later(
    state: Arc<AppState>,
    id: String,
    tenant: Arc<str>,
    month: String,
    actual: Micros,
    now: UnixMillis,
    labels: SpendLabels,
) {
    match crate::store::after_each(&LATER_WAITS, || state.budgets.charge(&id, &tenant, &month, actual, now)).await {
        Some(Ok(())) => {
            labels.record(&state, actual);
            tracing::info!(tenant_id = %tenant, actual = %actual, "shadow-mode usage charged in the background");
        }
        Some(Err(_)) | None => {
            state.metrics.store_errors.with_label_values(&["charge"]).inc();
            tracing::error!(
                tenant_id = %tenant,
                actual = %actual,
                "shadow-mode usage could not be written to the state store in ≈ 9 minutes; the ledger keeps the \
                 settlement (preauth-sidecar rebuild-spend restores spend from a Postgres ledger)"
            );
        }
    }
}

/// A settlement that found its hold no longer active although no retry of its own ended it: the
/// sweep released it (the request outlived `PREAUTH_RESERVATION_TTL_SECONDS`, or an operator ran
/// the overdue sweep while it was in flight) or an operator reconciled it. A released hold charged
/// nothing, yet the gateway did the work: its actual cost is charged to the hold's month now, as
/// the settlement event already staged says. A reconciled one was charged by the operator: never
/// twice. Only this request settles its proxy hold (the reconcile and gate-settle endpoints
/// refuse one that is not active), so the check and the charge cannot race with another charge.
/// `true` when the cost was charged here.
async fn charge_late(state: &AppState, r: &Reservation, actual: Micros, now: UnixMillis) -> bool {
    let m = &state.metrics;
    match state.budgets.get(&r.id).await {
        Ok(Some((_, ReservationState::Released))) => {}
        Ok(Some(_)) => {
            tracing::warn!(reservation_id = %r.id, "reservation already settled or reconciled; not charged again");
            return false;
        }
        Ok(None) => {
            forgotten(r, actual);
            return false;
        }
        Err(e) => {
            m.store_errors.with_label_values(&["settle"]).inc();
            tracing::error!(error = %e, reservation_id = %r.id, actual = %actual, "settlement after the sweep released the hold could not read it; its cost is not charged");
            return false;
        }
    }
    let id = format!("late:{}", r.id); // one late charge per hold
    if let (Err(e), _) = retrying(|| state.budgets.charge(&id, &r.tenant, &r.month, actual, now)).await {
        m.store_errors.with_label_values(&["charge"]).inc();
        tracing::error!(error = %e, reservation_id = %r.id, actual = %actual, "charging a settlement after the sweep released its hold failed");
        return false;
    }
    tracing::warn!(
        reservation_id = %r.id,
        actual = %actual,
        "the sweep released this hold while its request was still running (it outlived PREAUTH_RESERVATION_TTL_SECONDS or an overdue sweep ran); its actual cost is charged now"
    );
    m.record_settlement("usage", Micros(actual.0 - r.amount.0));
    true
}

/// A settlement whose hold the store no longer knows: Redis lost its data (or the hold ended
/// long ago and its record was trimmed). Its cost is not charged here — it cannot be told from a
/// hold an operator reconciled — but the ledger has the settlement.
fn forgotten(r: &Reservation, actual: Micros) {
    tracing::warn!(
        reservation_id = %r.id,
        tenant_id = %r.tenant,
        actual = %actual,
        "the state store no longer knows this reservation at its settlement (Redis lost its data, or the hold \
         ended long ago); its cost was not charged to the tenant's spend. The ledger has the settlement: \
         preauth-sidecar rebuild-spend restores spend from a Postgres ledger"
    );
}

/// Settles `id` and releases `lease` (taken) through the gatekeeper: one store step, whose
/// timed-out halves are retried after [`RETRY_WAITS`]. The second result says whether the
/// settlement was retried.
async fn settle_release(
    state: &Arc<AppState>,
    id: &str,
    actual: Micros,
    now: crate::decide::UnixMillis,
    lease: &mut Option<Ticket>,
) -> (Result<SettleOutcome, StoreError>, bool) {
    let ticket = lease.take();
    let settle = Some((id, actual, now));
    let first = match state.gatekeeper.settle_release_now(settle, ticket.as_ref()) {
        Some(done) => done,
        None => state.gatekeeper.settle_release(settle, ticket.as_ref()).await,
    };
    let ((settled, released), retried) = retry_halves(first, |settle_again, release_again| {
        state.gatekeeper.settle_release(settle.filter(|_| settle_again), ticket.as_ref().filter(|_| release_again))
    })
    .await;
    if let (Err(e), Some(t)) = (released, ticket) {
        state.store_failed("release_lease", e);
        release_lease_later(state, t);
    }
    (settled.unwrap_or(Ok(SettleOutcome::NotFound)), retried)
}

/// Gives a concurrency lease back in the background after the store refused it (Redis gone):
/// retried after 1, 2, 4, 8, 15, 30 and 60 s (releasing is idempotent). Without it the slot
/// counted against the tenant's concurrency cap until the lease's TTL (3 minutes by default),
/// so a short Redis blip could lock a busy tenant out.
pub fn release_lease_later(state: &Arc<AppState>, ticket: Ticket) {
    let state = state.clone();
    tokio::spawn(async move {
        match crate::store::after_each(&LATER_WAITS[..7], || state.counters.release_lease(&ticket)).await {
            Some(Ok(())) => tracing::info!("concurrency lease released in the background"),
            _ => tracing::warn!("concurrency lease could not be released; it ends by its TTL"),
        }
    });
}

/// The settlement's and the lease release's results of one step.
type Halves<S> = (Option<Result<S, StoreError>>, Result<(), StoreError>);

/// Redoes the timed-out halves of a settle-and-release step (`step(settle, release)` runs the
/// halves asked for) after each of [`RETRY_WAITS`]; the second result says whether the
/// settlement half was retried.
async fn retry_halves<S, F, Fut>(first: Halves<S>, mut step: F) -> (Halves<S>, bool)
where
    F: FnMut(bool, bool) -> Fut,
    Fut: Future<Output = Halves<S>>,
{
    let (mut settled, mut released) = first;
    let mut retried = false;
    for wait in RETRY_WAITS {
        let settle_again = matches!(settled, Some(Err(StoreError::Timeout)));
        let release_again = matches!(released, Err(StoreError::Timeout));
        if !settle_again && !release_again {
            break;
        }
        tokio::time::sleep(wait).await;
        retried |= settle_again;
        let (s, l) = step(settle_again, release_again).await;
        if settle_again {
            settled = s;
        }
        if release_again {
            released = l;
        }
    }
    ((settled, released), retried)
}

/// A follow-up event of this request (settlement, release), built from its decision event.
fn follow_up<'s>(state: &AppState, spend: &'s SpendCtx, event_type: EventType) -> Option<(&'s Template, Event)> {
    let template = spend.event.as_ref()?;
    Some((template, template.follow_up(state.event(event_type, template.event().policy_version))))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    fn timeout_then<T: Clone>(timeouts: usize, then: Result<T, StoreError>) -> impl FnMut() -> Result<T, StoreError> {
        let mut n = 0;
        move || {
            n += 1;
            if n <= timeouts {
                Err(StoreError::Timeout)
            } else {
                then.clone()
            }
        }
    }

    #[tokio::test]
    async fn a_timed_out_step_is_retried_and_other_errors_are_not() {
        let calls = RefCell::new(0);
        let mut f = timeout_then(2, Ok(7));
        let (r, retried) = retrying(|| {
            *calls.borrow_mut() += 1;
            std::future::ready(f())
        })
        .await;
        assert_eq!((r.ok(), retried, *calls.borrow()), (Some(7), true, 3));

        *calls.borrow_mut() = 0;
        let (r, retried) = retrying(|| {
            *calls.borrow_mut() += 1;
            std::future::ready(Err::<(), _>(StoreError::Timeout))
        })
        .await;
        assert!(matches!(r, Err(StoreError::Timeout)) && retried);
        assert_eq!(*calls.borrow(), 1 + RETRY_WAITS.len(), "bounded");

        *calls.borrow_mut() = 0;
        let (r, retried) = retrying(|| {
            *calls.borrow_mut() += 1;
            std::future::ready(Err::<(), _>(StoreError::Unavailable("circuit open".into())))
        })
        .await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))) && !retried);
        assert_eq!(*calls.borrow(), 1, "an open breaker or a store error is not retried");
    }

    #[tokio::test]
    async fn only_the_timed_out_half_of_a_settlement_is_redone() {
        // The lease release timed out once; the settlement went through: only the lease again.
        let asked = RefCell::new(Vec::new());
        let first: Halves<u8> = (Some(Ok(1)), Err(StoreError::Timeout));
        let ((s, l), retried) = retry_halves(first, |settle, release| {
            asked.borrow_mut().push((settle, release));
            std::future::ready((None, Ok(())))
        })
        .await;
        assert_eq!((s.unwrap().ok(), l.is_ok(), retried), (Some(1), true, false));
        assert_eq!(*asked.borrow(), [(false, true)]);

        // The settlement timed out twice; the third attempt answers.
        asked.borrow_mut().clear();
        let mut answers = vec![(Some(Ok(3)), Ok(())), (Some(Err(StoreError::Timeout)), Ok(()))];
        let first: Halves<u8> = (Some(Err(StoreError::Timeout)), Ok(()));
        let ((s, l), retried) = retry_halves(first, |settle, release| {
            asked.borrow_mut().push((settle, release));
            std::future::ready(answers.pop().unwrap())
        })
        .await;
        assert_eq!((s.unwrap().ok(), l.is_ok(), retried), (Some(3), true, true));
        assert_eq!(*asked.borrow(), [(true, false), (true, false)]);
    }
}
