//! Monthly budgets: the atomic money arithmetic behind pre-authorization (CONTRACT §4, §6).
//!
//! A request is admitted only when its worst-case cost *fits* the tenant's month —
//! `spent + reserved + amount ≤ monthly_budget` — and the check and the hold happen in one atomic
//! step ([`Budgets::reserve`]), so concurrent requests can never reserve more than what is left.
//! Later the hold is either settled at its real cost ([`Budgets::settle`]: the actual cost is
//! charged even above the hold, the rest is released, drift is reported), released with nothing
//! charged ([`Budgets::release`], upstream errors) or released by the sweep once it is too old
//! ([`Budgets::expire`]). Shadow mode charges usage without any hold ([`Budgets::charge`]).
//!
//! Months are UTC calendar months (`YYYY-MM`, [`Month::of`]); a reservation counts against the
//! month it was created in, also when it is settled after the month ended. Time is always
//! injected (`now`), never read here.
//!
//! Threshold logic (approval thresholds, hard/soft/shadow modes) is *not* here: backends only do
//! the arithmetic, `decide` and the proxy glue decide what to ask for.
//!
//! Money arguments are never negative: a negative `amount`, `min_amount` or `actual` is treated
//! as zero by every implementation.
//!
//! Owns: the [`Budgets`] trait and its request/outcome types. Imports: `store::StoreError`,
//! `decide` money/time types, async-trait, std. The embedded implementation is
//! [`super::budget_memory`].

use std::sync::Arc;

use async_trait::async_trait;

use super::StoreError;
use crate::decide::time::Month;
use crate::decide::{Micros, Tier, UnixMillis};

/// What to hold for one request.
#[derive(Clone, Copy, Debug)]
pub struct ReserveRequest<'a> {
    pub tenant: &'a str,
    pub tenant_tier: &'a str,
    pub request_id: &'a str,
    pub model: &'a str,
    pub now: UnixMillis,
    /// The tenant's budget for the month of `now`.
    pub monthly_budget: Micros,
    /// The worst-case (estimated) cost to hold.
    pub amount: Micros,
    /// Clamp mode: when `amount` does not fit, hold the largest amount `≥ min_amount` that does
    /// (i.e. everything that is left). `None`: all of `amount` or nothing.
    pub min_amount: Option<Micros>,
}

/// A hold on part of a tenant's month.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// UUID v7.
    pub id: String,
    /// The labels below are shared (`Arc<str>`): the embedded store rebuilds a reservation on
    /// every settlement from the copies it keeps, and a clone then copies no text.
    pub tenant: Arc<str>,
    pub tenant_tier: Arc<str>,
    pub request_id: String,
    pub model: Arc<str>,
    /// `YYYY-MM` (UTC) of `created_at`: the month this reservation counts against.
    pub month: Arc<str>,
    /// The amount held (may be less than asked for in clamp mode).
    pub amount: Micros,
    pub created_at: UnixMillis,
}

/// The answer to [`Budgets::reserve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReserveOutcome {
    Reserved(Reservation),
    /// Nothing was held. The figures are the tenant's month just before the attempt;
    /// `remaining = max(0, budget − spent − reserved)`.
    Insufficient {
        spent: Micros,
        reserved: Micros,
        remaining: Micros,
    },
}

/// A settled reservation. (Not the whole [`Reservation`]: the embedded store would rebuild its
/// ids' text on every settlement for callers that read only the amounts.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settlement {
    /// The tenant whose month was charged.
    pub tenant: Arc<str>,
    /// What the reservation held.
    pub reserved: Micros,
    /// Charged to the reservation's month in full, even above the hold.
    pub actual: Micros,
    /// `max(0, reserved − actual)`: what went back to the budget.
    pub released: Micros,
    /// `actual − reserved`: overage when positive, savings when negative.
    pub drift: Micros,
}

impl Settlement {
    /// `actual` charged to `tenant`'s reservation of `reserved`.
    pub fn of(tenant: Arc<str>, reserved: Micros, actual: Micros) -> Settlement {
        Settlement {
            tenant,
            reserved,
            released: reserved.saturating_sub(actual).max(Micros::ZERO),
            drift: actual.saturating_sub(reserved),
            actual,
        }
    }
}

/// The answer to [`Budgets::settle`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettleOutcome {
    Settled(Settlement),
    /// No such reservation (never existed, or finished long enough ago to be forgotten).
    NotFound,
    /// The reservation exists but was already settled or released (duplicate settle → 409).
    NotActive,
}

/// Where a reservation is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservationState {
    Active,
    Settled { actual: Micros },
    Released,
}

/// A tenant's month.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpendView {
    /// Charged so far (settlements and direct charges).
    pub spent: Micros,
    /// Held by active reservations.
    pub reserved: Micros,
    pub active_reservations: u64,
    /// The tier the tenant's latest hold resolved to, when the store keeps it (Redis: shared by
    /// every replica, so each one's tenant view shows it; the embedded store leaves it to the
    /// replica's own memory of tiers seen).
    pub tier: Option<Tier>,
}

impl SpendView {
    /// `budget − spent − reserved`, never below zero.
    pub fn remaining(&self, monthly_budget: Micros) -> Micros {
        monthly_budget.saturating_sub(self.spent).saturating_sub(self.reserved).max(Micros::ZERO)
    }
}

impl ReserveRequest<'_> {
    /// The reservation this request would create, holding `amount`, with a fresh id.
    pub fn reservation(&self, amount: Micros) -> Reservation {
        Reservation {
            id: crate::ids::v7_at_ms(self.now),
            tenant: self.tenant.into(),
            tenant_tier: shared_tier(self.tenant_tier),
            request_id: self.request_id.to_owned(),
            model: self.model.into(),
            month: month_label(self.now),
            amount,
            created_at: self.now,
        }
    }
}

/// The month key (`YYYY-MM`) of an instant, as used by [`Reservation::month`] and
/// [`Budgets::tenant_spend`].
pub fn month_key(now: UnixMillis) -> String {
    String::from(&*month_label(now))
}

/// [`month_key`] shared: the last month formatted on this thread, so that every hold of a month
/// shares its text.
fn month_label(now: UnixMillis) -> Arc<str> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Month, Arc<str>)>> = const { std::cell::RefCell::new(None) };
    }
    let month = Month::of(now);
    LAST.with_borrow_mut(|last| match last {
        Some((m, text)) if *m == month => text.clone(),
        _ => last.insert((month, month.to_string().into())).1.clone(),
    })
}

/// A tier name shared per thread (the few tier names are on every hold).
fn shared_tier(tier: &str) -> Arc<str> {
    thread_local! {
        static TIERS: crate::intern::Table = const { std::cell::RefCell::new(Vec::new()) };
    }
    crate::intern::shared(&TIERS, tier)
}

/// How long a shared store remembers a charge id ([`Budgets::charge`]): past the last background
/// retry of a charge (≈ 9 minutes).
pub const CHARGE_ID_TTL_MS: u64 = 15 * 60 * 1000;

/// What [`Budgets::claim`] answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The store lives in this process: nothing to claim beyond its own turns.
    Local,
    /// Claimed for the caller (or nothing left to claim: the reservation is unknown or ended,
    /// which the caller's read of it then shows). Give it back with [`Budgets::unclaim`].
    Claimed,
    /// Another replica's claim is in force: it is settling this reservation now.
    Busy,
}

/// The per-request steps of [`Budgets`] for a store in this process: answered at once, nothing
/// to await.
pub trait BudgetsNow: Send + Sync {
    fn reserve_now(&self, r: &ReserveRequest<'_>) -> Result<ReserveOutcome, StoreError>;
    fn settle_now(&self, id: &str, actual: Micros, now: UnixMillis) -> Result<SettleOutcome, StoreError>;
}

/// Atomic monthly budget arithmetic. Object-safe; every method is a single atomic step.
#[async_trait]
pub trait Budgets: Send + Sync {
    /// The same store answering at once, when it lives in this process (`None`: shared store).
    fn now(&self) -> Option<&dyn BudgetsNow> {
        None
    }

    /// Holds `amount` (or, in clamp mode, what is left if at least `min_amount`) against the
    /// tenant's month of `now` if it fits; check and hold are one atomic step.
    async fn reserve(&self, r: &ReserveRequest<'_>) -> Result<ReserveOutcome, StoreError>;
    /// Charges `actual` to the reservation's month and releases the hold. Exactly once per
    /// reservation: later calls answer `NotActive` (or `NotFound` once the record is forgotten).
    async fn settle(&self, id: &str, actual: Micros, now: UnixMillis) -> Result<SettleOutcome, StoreError>;
    /// Releases the hold, charging nothing (upstream error). `None` if it is not active.
    async fn release(&self, id: &str, now: UnixMillis) -> Result<Option<Reservation>, StoreError>;
    /// Releases (charging nothing) every active reservation created before `older_than` and
    /// returns them; each one is returned by exactly one call, also under concurrency.
    async fn expire(&self, older_than: UnixMillis, now: UnixMillis) -> Result<Vec<Reservation>, StoreError>;
    /// Adds spend without a reservation (shadow mode, admin adjustments). `month` must be
    /// `YYYY-MM` (else `Unavailable`), usually [`month_key`]`(now)`. `id` names this charge: its
    /// retries pass the same one, and a shared store adds it once although an attempt that timed
    /// out may still land (for [`CHARGE_ID_TTL_MS`]; a store in this process never answers late).
    async fn charge(
        &self,
        id: &str,
        tenant: &str,
        month: &str,
        amount: Micros,
        now: UnixMillis,
    ) -> Result<(), StoreError>;
    /// The tenant's month (`YYYY-MM`). Unknown tenant or month: zeros.
    async fn tenant_spend(&self, tenant: &str, month: &str) -> Result<SpendView, StoreError>;
    /// Up to `limit` active reservations, oldest first.
    async fn active(&self, limit: usize) -> Result<Vec<Reservation>, StoreError>;
    /// A reservation and its state. Settled and released ones are remembered for at least 24 h.
    async fn get(&self, id: &str) -> Result<Option<(Reservation, ReservationState)>, StoreError>;
    /// The fleet-wide half of a settlement turn ([`crate::state::AppState::settlement_turn`]):
    /// claims reservation `id` for `owner` until `now + ttl_ms`, so that one replica at a time
    /// writes a settlement for it, and the overdue sweep leaves it alone meanwhile. A store in
    /// this process answers `Local`: the process's own turns suffice.
    async fn claim(&self, _id: &str, _owner: &str, _ttl_ms: u64, _now: UnixMillis) -> Result<Claim, StoreError> {
        Ok(Claim::Local)
    }
    /// Gives `owner`'s claim on `id` back (a claim also ends with its TTL).
    async fn unclaim(&self, _id: &str, _owner: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// How many reservations are active (the `preauth_reservations_active` gauge).
    async fn active_count(&self) -> Result<u64, StoreError> {
        Ok(self.active(usize::MAX).await?.len() as u64)
    }
    /// Makes every change so far durable against power loss (fsync). Called about once a second
    /// by the housekeeper; a SIGKILL loses nothing even without it.
    async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
