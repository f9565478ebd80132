//! State behind object-safe traits: request counters and concurrency leases ([`Counters`]) and the
//! runtime policy ([`PolicyStore`]). The embedded default is [`memory`]; a shared (fleet)
//! implementation plugs in behind the same traits without touching `decide/` or `proxy/`.
//!
//! Threshold logic stays out of backends: `Counters::admit` counts a request into every window
//! atomically and returns the counters *as they were just before it*; the pure `decide` module
//! compares them with the policy, and the glue calls `rollback` when the answer is not ALLOW.
//! Because each admission sees its own pre-increment values, two concurrent requests can never
//! both take the last slot of a cap.
//!
//! Owns: the traits, `StoreError`, `Ticket`, `after_each` (background retries). Imports: `decide`
//! types, async-trait, tokio (timer), std.

pub mod approvals;
pub mod approvals_memory;
pub mod budget;
pub mod budget_memory;
mod compact;
mod daily;
mod journal;
mod knobs;
pub mod memory;
pub mod redis;
pub mod runtime_policy;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::decide::{CountersView, GlobalView, Micros, Policy, TenantView, UnixMillis};

/// A store operation failed; the caller takes the failsafe path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("state store did not answer within the store timeout")]
    Timeout,
    #[error("state store unavailable: {0}")]
    Unavailable(String),
}

/// What to count for one request.
#[derive(Clone, Copy, Debug)]
pub struct AdmitRequest<'a> {
    pub tenant: &'a str,
    pub now: UnixMillis,
    /// Estimated tokens (prompt + max output) for the token-rate window.
    pub tokens: u64,
    /// Take a concurrency lease expiring after this long (`None`: the gate is off).
    pub lease_ttl_ms: Option<u64>,
}

/// Proof of one admission: what `rollback` undoes and `release_lease` frees. Opaque to callers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub(crate) seq: u64,
    pub(crate) tenant: Arc<str>,
    pub(crate) at: UnixMillis,
    /// Estimated tokens it added to the token window (rollback takes them back out).
    pub(crate) tokens: u64,
    pub(crate) has_lease: bool,
}

impl Ticket {
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
    pub fn has_lease(&self) -> bool {
        self.has_lease
    }
}

/// Result of a sweep pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    pub leases_expired: u64,
    pub tenants_reclaimed: u64,
    pub tenants_tracked: u64,
}

/// The per-request steps of [`Counters`] for a store in this process: answered at once, nothing
/// to await (no boxed future, no timer on the hot path).
pub trait CountersNow: Send + Sync {
    fn admit_now(&self, req: &AdmitRequest<'_>) -> (Ticket, CountersView);
    fn rollback_now(&self, ticket: &Ticket);
    fn release_now(&self, ticket: &Ticket);
}

/// Request counters, windows and concurrency leases.
#[async_trait]
pub trait Counters: Send + Sync {
    /// The same store answering at once, when it lives in this process (`None`: shared store).
    fn now(&self) -> Option<&dyn CountersNow> {
        None
    }

    /// Atomically counts the request into the global window, the tenant's day, minute and token
    /// windows, and takes a lease if asked; returns the counters as they were just before it.
    async fn admit(&self, req: &AdmitRequest<'_>) -> Result<(Ticket, CountersView), StoreError>;
    /// Undoes an admission that was not allowed (counts and lease).
    async fn rollback(&self, ticket: &Ticket) -> Result<(), StoreError>;
    /// Frees the ticket's concurrency lease (request finished, failed or was abandoned).
    async fn release_lease(&self, ticket: &Ticket) -> Result<(), StoreError>;
    /// Keeps the lease of a gate-API hold (`reservation_id`) until the hold ends, findable by every
    /// replica sharing the store (the hold may end on any of them); forgotten after `ttl_ms` (the
    /// lease has expired by then).
    async fn park_lease(&self, reservation_id: &str, ticket: &Ticket, ttl_ms: u64) -> Result<(), StoreError>;
    /// Frees the lease parked for `reservation_id` of `tenant`; nothing when none is.
    async fn release_parked_lease(&self, tenant: &str, reservation_id: &str) -> Result<(), StoreError>;
    /// Records a global block until `until` (every tenant, every replica sharing the store).
    async fn set_global_block(&self, until: UnixMillis) -> Result<(), StoreError>;
    /// Lifts a global block in force (an operator changed the guard that tripped it); `true`
    /// when there was one to lift.
    async fn clear_global_block(&self) -> Result<bool, StoreError>;
    /// Read-only views (admin API, gauges).
    async fn tenant_view(&self, tenant: &str, now: UnixMillis) -> Result<TenantView, StoreError>;
    async fn global_view(&self, now: UnixMillis) -> Result<GlobalView, StoreError>;
    /// Expires leases and windows and forgets idle tenants.
    async fn sweep(&self, now: UnixMillis) -> Result<SweepStats, StoreError>;
    /// Makes the day's request counts (tier daily quota) of `now`'s UTC day survive a restart,
    /// when they changed since the last call; returns whether it wrote. The embedded store writes
    /// a snapshot to its data directory (blocking file I/O: called off the request path, by the
    /// housekeeper every few seconds and once more after the server stopped — not async, as no
    /// runtime is left then). A shared store keeps its counts across restarts already: nothing
    /// to do (the default).
    fn persist_daily(&self, _now: UnixMillis) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// Admission and reservation of one request as one step: a shared store sends both in one
/// network round trip (the hot path of an admitted request). The counters view is the one of
/// `Counters::admit`; the reservation outcome that of `Budgets::reserve`. When the guards then
/// refuse the request, the caller rolls back both.
#[async_trait]
pub trait Gatekeeper: Send + Sync {
    /// [`Gatekeeper::admit_reserve`] answered at once by in-process stores; `None` (before any
    /// effect): await `admit_reserve` instead.
    #[allow(clippy::type_complexity)]
    fn admit_reserve_now(
        &self,
        _admit: &AdmitRequest<'_>,
        _reserve: Option<&budget::ReserveRequest<'_>>,
    ) -> Option<Result<(Ticket, CountersView, Option<budget::ReserveOutcome>), StoreError>> {
        None
    }

    /// [`Gatekeeper::settle_release`] answered at once by in-process stores; `None` (before any
    /// effect): await `settle_release` instead.
    #[allow(clippy::type_complexity)]
    fn settle_release_now(
        &self,
        _settle: Option<(&str, Micros, UnixMillis)>,
        _lease: Option<&Ticket>,
    ) -> Option<(Option<Result<budget::SettleOutcome, StoreError>>, Result<(), StoreError>)> {
        None
    }

    async fn admit_reserve(
        &self,
        admit: &AdmitRequest<'_>,
        reserve: Option<&budget::ReserveRequest<'_>>,
    ) -> Result<(Ticket, CountersView, Option<budget::ReserveOutcome>), StoreError>;

    /// The end of an admitted request as one step: settle its hold (`settle = (reservation id,
    /// actual cost, now)`), then release its concurrency lease. A shared store pipelines both
    /// (one round trip after the response). Each part reports its own result.
    async fn settle_release(
        &self,
        settle: Option<(&str, Micros, UnixMillis)>,
        lease: Option<&Ticket>,
    ) -> (Option<Result<budget::SettleOutcome, StoreError>>, Result<(), StoreError>);
}

/// The gatekeeper of stores that are not shared: admit, then reserve (both in-process).
pub struct Sequential {
    pub counters: Arc<dyn Counters>,
    pub budgets: Arc<dyn budget::Budgets>,
}

#[async_trait]
impl Gatekeeper for Sequential {
    fn admit_reserve_now(
        &self,
        admit: &AdmitRequest<'_>,
        reserve: Option<&budget::ReserveRequest<'_>>,
    ) -> Option<Result<(Ticket, CountersView, Option<budget::ReserveOutcome>), StoreError>> {
        let counters = self.counters.now()?;
        let budgets = match reserve {
            Some(_) => Some(self.budgets.now()?),
            None => None,
        };
        let (ticket, view) = counters.admit_now(admit);
        let (Some(r), Some(budgets)) = (reserve, budgets) else { return Some(Ok((ticket, view, None))) };
        Some(match budgets.reserve_now(r) {
            Ok(o) => Ok((ticket, view, Some(o))),
            Err(e) => {
                counters.rollback_now(&ticket);
                Err(e)
            }
        })
    }

    fn settle_release_now(
        &self,
        settle: Option<(&str, Micros, UnixMillis)>,
        lease: Option<&Ticket>,
    ) -> Option<(Option<Result<budget::SettleOutcome, StoreError>>, Result<(), StoreError>)> {
        let counters = self.counters.now()?;
        let budgets = self.budgets.now()?;
        let settled = settle.map(|(id, actual, now)| budgets.settle_now(id, actual, now));
        if let Some(t) = lease.filter(|t| t.has_lease()) {
            counters.release_now(t);
        }
        Some((settled, Ok(())))
    }

    async fn admit_reserve(
        &self,
        admit: &AdmitRequest<'_>,
        reserve: Option<&budget::ReserveRequest<'_>>,
    ) -> Result<(Ticket, CountersView, Option<budget::ReserveOutcome>), StoreError> {
        let (ticket, view) = self.counters.admit(admit).await?;
        let Some(r) = reserve else { return Ok((ticket, view, None)) };
        match self.budgets.reserve(r).await {
            Ok(o) => Ok((ticket, view, Some(o))),
            Err(e) => {
                let _ = self.counters.rollback(&ticket).await;
                Err(e)
            }
        }
    }

    async fn settle_release(
        &self,
        settle: Option<(&str, Micros, UnixMillis)>,
        lease: Option<&Ticket>,
    ) -> (Option<Result<budget::SettleOutcome, StoreError>>, Result<(), StoreError>) {
        settle_then_release(&*self.budgets, &*self.counters, settle, lease).await
    }
}

/// [`Gatekeeper::settle_release`] as two calls, one after the other (in-process stores, and a
/// shared store when there is only one of the two to do).
pub async fn settle_then_release(
    budgets: &dyn budget::Budgets,
    counters: &dyn Counters,
    settle: Option<(&str, Micros, UnixMillis)>,
    lease: Option<&Ticket>,
) -> (Option<Result<budget::SettleOutcome, StoreError>>, Result<(), StoreError>) {
    let settled = match settle {
        Some((id, actual, now)) => Some(budgets.settle(id, actual, now).await),
        None => None,
    };
    let released = match lease {
        Some(t) if t.has_lease() => counters.release_lease(t).await,
        _ => Ok(()),
    };
    (settled, released)
}

/// Store health as a backend sees it (fleet mode: the Redis circuit breaker is closed).
pub type HealthProbe = Arc<dyn Fn() -> bool + Send + Sync>;

/// A change to the runtime policy: applied to a copy of the current snapshot.
pub type PolicyPatch = Box<dyn FnOnce(&mut Policy) + Send>;

/// The runtime policy (kill switch, guards, caps, modes). Reads are synchronous and cheap: every
/// request reads it; changes are rare and go through `update`.
#[async_trait]
pub trait PolicyStore: Send + Sync {
    fn current(&self) -> Arc<Policy>;
    /// Applies `patch` to the current snapshot, bumps `version`, publishes the result.
    async fn update(&self, patch: PolicyPatch) -> Result<Arc<Policy>, StoreError>;
    /// Whether this replica runs changes that the fleet's shared store has not taken yet (fleet
    /// mode, store unavailable when they were made: runtime settings, which apply here only until
    /// it has, or a reload whose version bump is still to come).
    fn unshared(&self) -> bool {
        false
    }
    /// How many other replicas still ran an older policy when the last `update` here answered
    /// (fleet mode: it waits a bounded time for them).
    fn lagging(&self) -> usize {
        0
    }
    /// What this replica's outbox holds for the central ledger: when its oldest undelivered
    /// event was written (Unix ms, 0: nothing undelivered), as of `now_ms`. A fleet says it with
    /// its presence, for `rebuild-spend` to wait for the settlements still on their way.
    fn note_outbox(&self, _oldest_undelivered_ms: u64, _now_ms: u64) {}
    /// Changes this replica made while the shared store was unavailable that have since become
    /// the fleet's (the document's version, the settings written; empty for a version bump of a
    /// local reload), each returned once: a `runtime_changed` event is due for each.
    fn take_shared_changes(&self) -> Vec<(u64, serde_json::Map<String, serde_json::Value>)> {
        Vec::new()
    }
    /// How many other live replicas keep `knob` (`kill_switch`, `approval_issuance_frozen`)
    /// on whatever the policy says (their environment sets it), as seen by the last `update` here.
    fn pinned_elsewhere(&self, _knob: &str) -> usize {
        0
    }
}

/// Runs `step` after each of `waits` until it succeeds: a store step retried where nobody waits
/// for it (a give-back, a settlement or lease release the store refused). The last result;
/// `None` when `waits` is empty.
pub async fn after_each<T, F, Fut>(waits: &[Duration], mut step: F) -> Option<Result<T, StoreError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut last = None;
    for wait in waits {
        tokio::time::sleep(*wait).await;
        let out = step().await;
        let done = out.is_ok();
        last = Some(out);
        if done {
            break;
        }
    }
    last
}
