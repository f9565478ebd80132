//! Shared state of one running sidecar: configuration, stores, metrics, clock. Built once by the
//! composition root (`server`), shared as `Arc<AppState>` by the proxy, the admin API and the
//! workers.
//!
//! Owns: `AppState`, `TiersSeen`. Imports: config, store traits, telemetry, clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::clock::Clock;
use crate::commit::GroupCommit;
use crate::config::Config;
use crate::decide::pricing::PriceTable;
use crate::decide::{Tier, UnixMillis};
use crate::ledger::event::{Event, EventType, Template};
use crate::ledger::outbox::Outbox;
use crate::ledger::LedgerSource;
use crate::store::approvals::Approvals;
use crate::store::budget::{Budgets, Claim};
use crate::store::{Counters, Gatekeeper, PolicyStore};
use crate::telemetry::Metrics;

/// Bound on the tenant → tier memo (cleared when full; it only feeds the admin view), and on the
/// gate-lease bookkeeping.
const MAX_TIERS_SEEN: usize = 200_000;

/// Shards of [`TiersSeen`]: requests of different tenants rarely wait on each other's lock.
const TIER_SHARDS: usize = 16;

/// The tier each tenant's last request resolved to, for the admin tenant view (which falls back
/// to it when the directory has no tier for the tenant). Bounded (a shard is cleared when full)
/// and sharded by tenant; `Free`, what the view assumes for a tenant it has no tier for, is not
/// stored, so tenants on the free tier cost nothing. Keyed by a 64-bit hash of the tenant (seeded
/// per process), not its name: ~20 B per tenant; two tenants sharing a hash (odds ~1e-10 among
/// 100k) would only show each other's tier in this display.
pub struct TiersSeen {
    hasher: foldhash::quality::RandomState,
    shards: Vec<parking_lot::Mutex<crate::decide::FastMap<u64, Tier>>>,
}

impl Default for TiersSeen {
    fn default() -> Self {
        TiersSeen { hasher: Default::default(), shards: (0..TIER_SHARDS).map(|_| Default::default()).collect() }
    }
}

impl TiersSeen {
    fn shard(&self, tenant: &str) -> (u64, &parking_lot::Mutex<crate::decide::FastMap<u64, Tier>>) {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(tenant);
        (h, &self.shards[(h >> 60) as usize % TIER_SHARDS])
    }

    /// Remembers the tier a tenant's request resolved to.
    pub fn note(&self, tenant: &str, tier: Tier) {
        let (key, shard) = self.shard(tenant);
        let mut m = shard.lock();
        if tier == Tier::Free {
            if m.remove(&key).is_some() && m.is_empty() {
                m.shrink_to_fit();
            }
            return;
        }
        match m.get_mut(&key) {
            Some(t) => *t = tier,
            None => {
                if m.len() >= MAX_TIERS_SEEN / TIER_SHARDS {
                    m.clear();
                }
                m.insert(key, tier);
            }
        }
    }

    /// The tier last noted for `tenant`; `None` if it was never noted or last noted as `Free`.
    pub fn get(&self, tenant: &str) -> Option<Tier> {
        let (key, shard) = self.shard(tenant);
        shard.lock().get(&key).copied()
    }
}

pub struct AppState {
    pub config: Config,
    pub policy: Arc<dyn PolicyStore>,
    pub counters: Arc<dyn Counters>,
    pub budgets: Arc<dyn Budgets>,
    pub approvals: Arc<dyn Approvals>,
    pub gatekeeper: Arc<dyn Gatekeeper>,
    /// Durable local outbox of ledger events (`PREAUTH_DATA_DIR/outbox`).
    pub outbox: Arc<Outbox>,
    /// Group commit of the lines the hot path stages (outbox, embedded budget journal).
    pub group: Arc<GroupCommit>,
    /// `config.instance_id`, shared by every event.
    instance: Arc<str>,
    /// Where `GET /ledger` reads from: Postgres when that is the sink, else the local ledger.
    pub ledger: LedgerSource,
    pub metrics: Metrics,
    pub clock: Arc<dyn Clock>,
    /// The price table; replaced whole on `SIGHUP`.
    pricing: parking_lot::RwLock<Arc<PriceTable>>,
    /// The tier each tenant was last seen with (for the admin tenant view), bounded.
    tiers_seen: TiersSeen,
    /// Requests in flight and open client connections, for draining on `SIGTERM`.
    pub drain: Arc<crate::drain::Drain>,
    /// False while starting and once shutdown began (`/readyz` answers 503).
    ready: AtomicBool,
    /// Set while the state store is failing (`/readyz` answers 503).
    store_unhealthy: AtomicBool,
    /// The end (ms) of the global block the store last showed this replica, 0 for none: it
    /// still refuses requests while the store cannot be asked.
    global_block_seen: std::sync::atomic::AtomicU64,
    /// The global guard's settings when that block was seen: a block tripped under other
    /// settings is not applied (a `PATCH` of them lifts it, fleet-wide, even when this replica
    /// cannot ask the store).
    global_block_settings: parking_lot::Mutex<Option<crate::decide::policy::GlobalAbuse>>,
    /// Reservations an admin reconcile or a Gate API settle is settling on this replica.
    settling: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// This process's name on a settlement claim in a shared store (unique per start).
    claim_owner: Arc<str>,
    /// Held (shared) by every settlement turn, and alone by the overdue sweep's release: a
    /// hold the sweep releases is never one a turn has read as active and is settling.
    sweeping: tokio::sync::RwLock<()>,
    /// One file reload at a time (`SIGHUP`, the admin API).
    reloading: tokio::sync::Mutex<()>,
    /// Paces the store-failure log line (a dead store fails every request).
    store_failure_log: crate::telemetry::EverySecond,
    /// Paces the housekeeper's warnings (one a minute): its sweeps fail on every tick while the
    /// store is down.
    pub housekeeping_log: crate::telemetry::EverySecond,
    /// Paces the warning of a settlement or charge the store refused (retried in the background):
    /// while it refuses, every request meets it.
    pub spend_failure_log: crate::telemetry::EverySecond,
}

/// Whether the outbox took `e`; logs the loss otherwise (a full outbox logs it itself, once a
/// second: under sustained traffic every request meets it). `ids`: the event whose request,
/// tenant and reservation `e` is about (`e` itself, or the decision a follow-up leaves them to).
fn recorded(e: &Event, ids: &Event, r: Result<(), crate::ledger::outbox::OutboxError>) -> bool {
    match &r {
        Err(crate::ledger::outbox::OutboxError::Full { .. }) if crate::ledger::outbox::takes_headroom(e.event_type) => {
            // Past the follow-up headroom too: what the ledger will miss, for a manual entry.
            tracing::error!(
                event_type = e.event_type.as_str(),
                event_id = %e.event_id,
                request_id = ids.request_id.as_deref().unwrap_or(""),
                tenant_id = ids.tenant_id.as_deref().unwrap_or(""),
                reservation_id = ids.reservation_id.as_deref().unwrap_or(""),
                actual_cost_usd = %e.actual_cost_usd.map(|m| m.to_string()).unwrap_or_default(),
                "ledger event lost: the outbox is full beyond the follow-up headroom (counted in \
                 preauth_outbox_events_total{{state=\"dropped\"}}); the state store has the change, the ledger will not"
            )
        }
        Err(crate::ledger::outbox::OutboxError::Full { .. }) => {}
        Err(err) => {
            tracing::error!(error = %err, event_type = e.event_type.as_str(), event_id = %e.event_id, "ledger event not recorded")
        }
        Ok(()) => {}
    }
    r.is_ok()
}

/// The state backends of one sidecar (embedded or shared).
pub struct Stores {
    pub policy: Arc<dyn PolicyStore>,
    /// Admission + reservation in one step (one round trip on a shared store).
    pub gatekeeper: Arc<dyn Gatekeeper>,
    pub counters: Arc<dyn Counters>,
    pub budgets: Arc<dyn Budgets>,
    pub approvals: Arc<dyn Approvals>,
}

/// Where events go: the durable outbox and the ledger the admin API reads.
pub struct Ledger {
    pub outbox: Arc<Outbox>,
    pub source: LedgerSource,
    /// Writes the staged outbox (and embedded journal) lines together.
    pub group: Arc<GroupCommit>,
}

impl AppState {
    pub fn new(
        config: Config,
        stores: Stores,
        ledger: Ledger,
        clock: Arc<dyn Clock>,
        pricing: Arc<PriceTable>,
    ) -> AppState {
        let Stores { policy, gatekeeper, counters, budgets, approvals } = stores;
        let Ledger { outbox, source: ledger, group } = ledger;
        let metrics = Metrics::new();
        let p = policy.current();
        metrics.policy_version.set(p.version as i64);
        metrics.kill_switch_enabled.set(i64::from(p.kill_switch));
        let claim_owner = format!("{}/{}", config.instance_id, uuid::Uuid::new_v4().simple()).into();
        AppState {
            instance: config.instance_id.as_str().into(),
            config,
            policy,
            counters,
            budgets,
            approvals,
            gatekeeper,
            outbox,
            group,
            ledger,
            metrics,
            tiers_seen: TiersSeen::default(),
            drain: Arc::default(),
            clock,
            pricing: parking_lot::RwLock::new(pricing),
            ready: AtomicBool::new(false),
            store_unhealthy: AtomicBool::new(false),
            global_block_seen: std::sync::atomic::AtomicU64::new(0),
            global_block_settings: parking_lot::Mutex::new(None),
            settling: parking_lot::Mutex::new(std::collections::HashSet::new()),
            claim_owner,
            sweeping: tokio::sync::RwLock::new(()),
            reloading: tokio::sync::Mutex::new(()),
            store_failure_log: crate::telemetry::EverySecond::default(),
            housekeeping_log: crate::telemetry::EverySecond::default(),
            spend_failure_log: crate::telemetry::EverySecond::default(),
        }
    }

    /// Counts `actual` spent on a call to `model` by a tenant of `tier` (the spend metric's
    /// labels: the price table's provider and key, `other` outside it) — for settlements made
    /// outside the proxy path (gate API, manual reconcile).
    pub fn record_spend_of(&self, tier: &str, model: &str, actual: crate::decide::Micros) {
        let pricing = self.pricing();
        let price = pricing.lookup(model);
        let label = if price.known { price.name } else { "other" };
        self.metrics.record_spend(tier, &price.price.provider, label, actual);
    }

    pub fn pricing(&self) -> Arc<PriceTable> {
        self.pricing.read().clone()
    }

    pub fn set_pricing(&self, table: Arc<PriceTable>) {
        *self.pricing.write() = table;
    }

    /// Remembers the tier a tenant's last request resolved to (admin tenant view).
    pub fn note_tier(&self, tenant: &str, tier: Tier) {
        self.tiers_seen.note(tenant, tier);
    }

    /// See [`TiersSeen::get`]: `None` also for a tenant last seen on the free tier.
    pub fn tier_seen(&self, tenant: &str) -> Option<Tier> {
        self.tiers_seen.get(tenant)
    }

    /// A blank event stamped now, by this replica.
    pub fn event(&self, event_type: EventType, policy_version: u64) -> Event {
        Event::by(event_type, self.instance.clone(), self.clock.now_us(), policy_version)
    }

    /// An event about reservation `r` (settlement or release) with its identifying fields.
    pub fn reservation_event(&self, r: &crate::store::budget::Reservation, event_type: EventType) -> Event {
        let mut e = self.event(event_type, self.policy.current().version);
        e.request_id = Some(r.request_id.clone().into());
        e.tenant_id = Some(r.tenant.clone());
        e.tenant_tier = Some(r.tenant_tier.clone());
        e.model = Some(r.model.clone());
        e.reservation_id = Some(r.id.clone());
        e.reserved_usd = Some(r.amount);
        e
    }

    /// Appends `e` to the outbox (written to the OS before this returns). `false` when it could
    /// not be recorded (outbox full under the `failsafe` policy, disk error): the caller takes
    /// the failsafe path for decisions; other events are logged as lost.
    pub fn emit(&self, e: &Event) -> bool {
        recorded(e, e, self.outbox.append(e))
    }

    /// A runtime change on record (a `PATCH`, a `SIGHUP` reload, a runtime policy restored at
    /// start): an audit line and a `runtime_changed` event whose `details` are `reason`,
    /// `changes` and the `extra` fields.
    pub fn record_runtime_change(
        &self,
        version: u64,
        reason: &str,
        changes: serde_json::Value,
        extra: serde_json::Map<String, serde_json::Value>,
    ) {
        crate::telemetry::audit::runtime_change(version, reason, &changes.to_string());
        let mut details = serde_json::Map::new();
        details.insert("reason".into(), reason.into());
        details.insert("changes".into(), changes);
        details.extend(extra);
        let mut e = self.event(EventType::RuntimeChanged, version);
        e.details = Some(serde_json::Value::Object(details));
        self.emit(&e);
    }

    /// Stages `e` for the group commit (`group.commit` writes it before the request goes on).
    /// `false` when it cannot be recorded (outbox full under the `failsafe` policy).
    pub fn stage(&self, e: &Event) -> bool {
        recorded(e, e, self.outbox.stage(e))
    }

    /// [`AppState::stage`] of a request's decision event, kept as the template of its
    /// follow-up events.
    pub fn stage_decision(&self, e: Event) -> (bool, Template) {
        let mut template = None;
        let event_type = e.event_type;
        let staged = self.outbox.stage_written(event_type, |line| template = Some(Template::write(e, line)));
        let template = template.expect("the line was written");
        (recorded(template.event(), template.event(), staged), template)
    }

    /// [`AppState::stage`] of `e`, a follow-up made by [`Template::follow_up`].
    pub fn stage_follow_up(&self, template: &Template, e: &Event) -> bool {
        recorded(e, template.event(), self.outbox.stage_written(e.event_type, |line| template.write_follow_up(e, line)))
    }

    /// Writes what was staged since `since` now (paths that answer without batching: admin,
    /// gate API, workers). `false` when some of it could not be written.
    pub fn commit_now(&self, since: u64) -> bool {
        self.group.commit_now(since).is_ok()
    }

    /// Keeps a gate-API hold's lease until the hold ends, parked in the counters store so that
    /// whichever replica ends it (the caller's settle, the sweep, an operator) gives it back.
    pub async fn hold_gate_lease(&self, reservation_id: &str, ticket: crate::store::Ticket) {
        if !ticket.has_lease() {
            return;
        }
        let ttl_ms = self.policy.current().fair_use.lease_life_ms().saturating_add(60_000);
        if let Err(e) = self.counters.park_lease(reservation_id, &ticket, ttl_ms).await {
            self.metrics.store_errors.with_label_values(&["park_lease"]).inc();
            tracing::warn!(error = %e, reservation_id, "gate hold's lease not parked; it expires by its TTL");
        }
    }

    /// Gives back the concurrency lease of a gate-API hold of `tenant` that was settled or
    /// released (by its caller, the sweep or an operator, on any replica); nothing when none is
    /// parked for it.
    pub async fn release_gate_lease(&self, tenant: &str, reservation_id: &str) {
        if let Err(e) = self.counters.release_parked_lease(tenant, reservation_id).await {
            self.metrics.store_errors.with_label_values(&["release_lease"]).inc();
            tracing::warn!(error = %e, reservation_id, "gate hold's lease not released; it expires by its TTL");
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Started, not stopping, the state store usable and the data directory writable (a full
    /// volume: the group commit failing).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
            && !self.store_unhealthy.load(Ordering::Relaxed)
            // The group commit stamps its writes with the system clock (not the injected one).
            && !self.group.failing(crate::clock::Clock::now_ms(&crate::clock::SystemClock))
    }

    /// The global block (its end) the store showed, or tripped here; `None`: none in force.
    /// `settings`: the global guard's settings it was seen under.
    pub fn note_global_block(&self, until: Option<UnixMillis>, settings: &crate::decide::policy::GlobalAbuse) {
        let until = until.unwrap_or(0);
        if self.global_block_seen.load(Ordering::Relaxed) != until {
            *self.global_block_settings.lock() = Some(settings.clone());
            self.global_block_seen.store(until, Ordering::Relaxed);
        }
    }

    /// Forgets the global block seen (an operator lifted it here).
    pub fn forget_global_block(&self) {
        self.global_block_seen.store(0, Ordering::Relaxed);
    }

    /// Waits until no other manual or Gate API settlement of reservation `id` is under way on
    /// this replica, and holds the turn until the returned claim is dropped. A settlement event
    /// is written before the store settles (it must be durable first): without turns, a
    /// reconcile racing a Gate API settle of the same hold both wrote one, though only one
    /// settled. The caller reads the hold's state after taking its turn.
    ///
    /// With a shared store the turn is the fleet's: the hold is also claimed in the store for
    /// [`CLAIM_TTL_MS`] (waiting while another replica's claim is in force), so a reconcile on
    /// one replica and a Gate API settle on another write one settlement between them, and the
    /// overdue sweep of any replica leaves the hold alone meanwhile. A store failure does not
    /// hold the turn back: the caller's read of the hold then fails the same way.
    pub async fn settlement_turn(&self, id: &str) -> SettlementTurn<'_> {
        loop {
            if self.settling.lock().insert(id.to_string()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Built now, so that a cancelled wait below still ends the local turn.
        let mut turn = SettlementTurn { state: self, id: id.to_string(), claimed: false, _sweep: None };
        let started = self.clock.now_ms();
        loop {
            let now = self.clock.now_ms();
            match self.budgets.claim(id, &self.claim_owner, CLAIM_TTL_MS, now).await {
                Ok(Claim::Busy) if now.saturating_sub(started) < 2 * CLAIM_TTL_MS => {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await
                }
                Ok(Claim::Claimed) => {
                    turn.claimed = true;
                    break;
                }
                _ => break,
            }
        }
        turn._sweep = Some(self.sweeping.read().await);
        turn
    }

    /// A file reload's turn (one at a time, in the order asked).
    pub async fn reload_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reloading.lock().await
    }

    /// The overdue sweep's turn: waits for the settlement turns under way and holds new ones
    /// back while it lasts.
    pub async fn sweep_turn(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.sweeping.write().await
    }

    /// The end of the global block last seen in force, if it was seen under `settings` (the
    /// guard's settings in force now).
    pub fn global_block_seen(&self, settings: &crate::decide::policy::GlobalAbuse) -> Option<UnixMillis> {
        let until = Some(self.global_block_seen.load(Ordering::Relaxed)).filter(|u| *u > 0)?;
        (self.global_block_settings.lock().as_ref() == Some(settings)).then_some(until)
    }

    /// Store health as seen by the last operation.
    pub fn set_store_healthy(&self, healthy: bool) {
        self.store_unhealthy.store(!healthy, Ordering::Relaxed);
    }

    /// A failed state-store operation on the request path: counted by `op`, readiness follows,
    /// logged (one line a second at most, with the count of those not logged; the metric counts
    /// each). Returns the error for the caller's failsafe path.
    pub fn store_failed(&self, op: &str, e: crate::store::StoreError) -> crate::store::StoreError {
        self.metrics.store_errors.with_label_values(&[op]).inc();
        self.set_store_healthy(false);
        if let Some(not_logged) = self.store_failure_log.pass(self.clock.now_ms() / 1000) {
            tracing::warn!(
                op,
                error = %e,
                not_logged,
                "state store operation failed; taking the failsafe path (see preauth_store_errors_total for every failure)"
            );
        }
        e
    }
}

/// How long a replica's claim on a hold it is settling lasts at most (it is given back when the
/// settlement is done; the TTL only matters for a replica that died meanwhile).
pub const CLAIM_TTL_MS: u64 = 10_000;

/// A turn to settle one reservation (see [`AppState::settlement_turn`]); ends when dropped.
pub struct SettlementTurn<'a> {
    state: &'a AppState,
    id: String,
    /// Claimed in the shared store: given back at the end.
    claimed: bool,
    _sweep: Option<tokio::sync::RwLockReadGuard<'a, ()>>,
}

impl Drop for SettlementTurn<'_> {
    fn drop(&mut self) {
        self.state.settling.lock().remove(&self.id);
        if self.claimed {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let (budgets, id, owner) =
                    (self.state.budgets.clone(), self.id.clone(), self.state.claim_owner.clone());
                runtime.spawn(async move {
                    // Left to its TTL when this fails.
                    let _ = budgets.unclaim(&id, &owner).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_seen_keeps_the_last_tier_stores_no_free_and_stays_bounded() {
        let t = TiersSeen::default();
        assert_eq!(t.get("a"), None);
        t.note("a", Tier::Pro);
        assert_eq!(t.get("a"), Some(Tier::Pro));
        t.note("a", Tier::Growth);
        assert_eq!(t.get("a"), Some(Tier::Growth));
        t.note("a", Tier::Free);
        t.note("b", Tier::Free);
        assert_eq!((t.get("a"), t.get("b")), (None, None), "free is what the admin view assumes");
        assert!(t.shards.iter().all(|s| s.lock().is_empty()));
        for i in 0..MAX_TIERS_SEEN + 1000 {
            t.note(&format!("t{i}"), Tier::Pro);
        }
        let held: usize = t.shards.iter().map(|s| s.lock().len()).sum();
        assert!(held <= MAX_TIERS_SEEN, "{held}");
        assert_eq!(t.get(&format!("t{}", MAX_TIERS_SEEN + 999)), Some(Tier::Pro));
    }
}
