//! Background services (pingora `BackgroundService`s) that honour shutdown:
//! - [`Housekeeper`]: marks the replica ready, sweeps expired leases and idle tenants, refreshes
//!   gauges, writes the embedded counters' daily request counts when they changed (every
//!   [`DAILY_COUNTS_INTERVAL`], and once more when shutdown begins), and marks the replica not
//!   ready when shutdown begins (so `/readyz` fails before listeners stop).
//! - [`Reloader`]: on `SIGHUP` re-reads the tenants, tiers and pricing files; a bad file keeps the
//!   old table and is logged.
//!
//! Owns: the services. Imports: state, store traits, config loaders, telemetry.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::{load_directory, load_pricing};
use crate::ledger::event::EventType;
use crate::state::AppState;

/// How often the sweep runs.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A housekeeping failure that repeats on every tick (the store down) is logged once per this
/// many seconds; the metrics count every one.
const HOUSEKEEPING_LOG_SECONDS: u64 = 60;

/// How often the embedded counters' daily request counts are written to the data directory when
/// they changed (`Counters::persist_daily`): what a `SIGKILL` can lose of them. A graceful stop
/// writes them at the end.
pub const DAILY_COUNTS_INTERVAL: Duration = Duration::from_secs(2);

pub struct Housekeeper {
    pub state: Arc<AppState>,
    /// The backend's own health (fleet mode), so `/readyz` follows the store while idle too.
    pub health: Option<crate::store::HealthProbe>,
}

impl Housekeeper {
    async fn tick(&self) {
        let now = self.state.clock.now_ms();
        if let Some(probe) = &self.health {
            self.state.set_store_healthy(probe());
        }
        let m = &self.state.metrics;
        match self.state.counters.sweep(now).await {
            Ok(stats) => {
                m.tenants_tracked.with_label_values(&["counters"]).set(stats.tenants_tracked as f64);
            }
            Err(e) => {
                m.store_errors.with_label_values(&["sweep"]).inc();
                if let Some(not_logged) = self.state.housekeeping_log.pass_every(now / 1000, HOUSEKEEPING_LOG_SECONDS) {
                    tracing::warn!(error = %e, not_logged, "counters sweep failed; the housekeeper retries every second");
                }
            }
        }
        if let Ok(g) = self.state.counters.global_view(now).await {
            m.global_block_active.set(i64::from(g.block_until.is_some_and(|u| u > now)));
            // Kept for a store outage also by a replica that serves no request meanwhile.
            self.state.note_global_block(g.block_until, &self.state.policy.current().global);
        }
        self.release_overdue(now).await;
        if let Ok(n) = self.state.approvals.backlog(now).await {
            m.approval_queue_backlog.set(n as i64);
        }
        if let Err(e) = self.state.approvals.sync().await {
            m.store_errors.with_label_values(&["sync"]).inc();
            tracing::error!(error = %e, "approvals journal fsync failed");
        }
        if let Err(e) = self.state.budgets.sync().await {
            m.store_errors.with_label_values(&["sync"]).inc();
            tracing::error!(error = %e, "budget journal fsync failed");
        }
        // What the outbox still holds for the central ledger (said with the fleet presence, for
        // `rebuild-spend`); 1 ("long ago") when undelivered events have no known time.
        if self.state.config.ledger_url.is_some() {
            let s = self.state.outbox.stats();
            self.state.policy.note_outbox(s.oldest_undelivered_ms.unwrap_or(u64::from(s.depth > 0)), now);
        }
        // A change made here during a store outage, now the fleet's at a version of its own
        // (CONTRACT §7: every runtime change produces an event).
        for (version, changes) in self.state.policy.take_shared_changes() {
            let mut extra = serde_json::Map::new();
            extra.insert("scope".into(), "fleet".into());
            self.state.record_runtime_change(
                version,
                "changes made on this replica while the state store was unavailable, now the fleet's",
                serde_json::Value::Object(changes),
                extra,
            );
        }
        let p = self.state.policy.current();
        m.kill_switch_enabled.set(i64::from(p.kill_switch));
        m.policy_version.set(p.version as i64);
    }
}

/// [`Counters::persist_daily`](crate::store::Counters::persist_daily) at the state's clock (the
/// embedded store writes the day's request counts if they changed; a no-op on Redis), failures
/// logged and counted (`preauth_store_errors_total{op="sync"}`; retried at the next call).
/// Blocking file I/O: on the housekeeper's own thread, or after the server stopped.
pub fn persist_daily(state: &AppState) {
    if let Err(e) = state.counters.persist_daily(state.clock.now_ms()) {
        state.metrics.store_errors.with_label_values(&["sync"]).inc();
        tracing::error!(
            error = %e,
            "daily request counts could not be written to PREAUTH_DATA_DIR; a restart would count \
             today's tier daily quotas from zero (retrying; check the data volume)"
        );
    }
}

impl Housekeeper {
    /// Releases reservations older than `PREAUTH_RESERVATION_TTL_SECONDS` (nothing charged;
    /// reason `reservation_auto_released_sla`) and refreshes the active-reservations gauge.
    pub async fn release_overdue(&self, now: crate::decide::UnixMillis) -> Vec<crate::store::budget::Reservation> {
        // A failure is counted and logged there; the next tick retries.
        release_overdue(&self.state, self.state.config.reservation_ttl_seconds, now, "auto").await.unwrap_or_default()
    }
}

/// The sweep: releases every active reservation at least `older_than_seconds` old (every one
/// with `0`). `trigger` labels
/// the reconciliations metric: `auto` for the housekeeper's, `manual` for an operator's
/// `reconcile-overdue` (so the sweep-release alert counts only the holds nobody settled). `Err`
/// when the store could not be swept (nothing was released).
pub async fn release_overdue(
    state: &AppState,
    older_than_seconds: u64,
    now: crate::decide::UnixMillis,
    trigger: &'static str,
) -> Result<Vec<crate::store::budget::Reservation>, crate::store::StoreError> {
    let m = &state.metrics;
    // Holds at least `older_than_seconds` old (the store releases those created strictly before
    // the cutoff, hence the + 1). `0` means every active hold: one created in this millisecond,
    // or stamped a little ahead by another replica's clock, included.
    let cutoff = match older_than_seconds {
        0 => u64::MAX,
        s => now.saturating_sub(s.saturating_mul(1000)).saturating_add(1),
    };
    let expired = {
        // Not a hold a reconcile or a Gate API settle on this replica is settling (it wrote its
        // settlement event already; releasing it here would leave that event uncharged).
        let _turn = state.sweep_turn().await;
        state.budgets.expire(cutoff, now).await
    };
    state.group.flush();
    let released = match expired {
        Ok(r) => r,
        Err(e) => {
            m.store_errors.with_label_values(&["expire"]).inc();
            // The housekeeper's sweep fails every second while the store is down: one line a
            // minute (with how many it stands for); an operator's reconcile is always logged.
            let log =
                trigger != "auto" || state.housekeeping_log.pass_every(now / 1000, HOUSEKEEPING_LOG_SECONDS).is_some();
            if log {
                tracing::warn!(
                    error = %e,
                    trigger,
                    "reservation sweep failed; the housekeeper retries every second (failures: \
                     preauth_store_errors_total{{op=\"expire\"}})"
                );
            }
            return Err(e);
        }
    };
    for r in &released {
        // A gate API hold released here gives its concurrency slot back too.
        state.release_gate_lease(&r.tenant, &r.id).await;
        // Exactly one replica's expire claims each hold, so each release is recorded once.
        let mut e = state.reservation_event(r, EventType::ReservationReleased);
        e.reasons = vec!["reservation_auto_released_sla".to_string()];
        e.details = Some(
            serde_json::json!({"reason": "reservation_auto_released_sla", "older_than_seconds": older_than_seconds}),
        );
        state.emit(&e);
        m.reconciliations.with_label_values(&[trigger, "auto_release"]).inc();
        tracing::warn!(
            target: "audit",
            event = "reservation_released",
            reason = "reservation_auto_released_sla",
            reservation_id = %r.id,
            tenant_id = %r.tenant,
            reserved_usd = %r.amount,
            age_seconds = now.saturating_sub(r.created_at) / 1000,
        );
    }
    if let Ok(n) = state.budgets.active_count().await {
        m.reservations_active.set(n as i64);
    }
    Ok(released)
}

#[async_trait]
impl BackgroundService for Housekeeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.state.set_ready(true);
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut daily = tokio::time::interval(DAILY_COUNTS_INTERVAL);
        daily.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => self.tick().await,
                _ = daily.tick() => persist_daily(&self.state),
            }
        }
        self.state.set_ready(false);
        // SIGTERM: the drain is over (no request in flight) by the time services hear of it.
        // The composition root writes once more after every service stopped (`server::run`).
        persist_daily(&self.state);
    }
}

pub struct Reloader {
    pub state: Arc<AppState>,
}

impl Reloader {
    /// Re-reads the files and applies them; returns the warnings about what was read, or why
    /// nothing was applied. The files are read and parsed off the caller's thread (the admin
    /// listener answers meanwhile). The caller holds the reload turn.
    async fn reload(&self) -> Result<Vec<String>, String> {
        let state = self.state.clone();
        let (directory, pricing) = tokio::task::spawn_blocking(move || {
            let c = &state.config;
            let directory = load_directory(c.tiers_file.as_deref(), c.tenants_file.as_deref())
                .map_err(|errors| errors.iter().map(|(var, e)| format!("{var}: {e}")).collect::<Vec<_>>().join("; "))?;
            let pricing = match &c.pricing_file {
                None => None,
                Some(_) => Some(load_pricing(c)?),
            };
            Ok::<_, String>((directory, pricing))
        })
        .await
        .map_err(|e| format!("the reload stopped: {e}"))??;
        let warnings = crate::config::directory_warnings(self.state.config.tenants_file.as_deref(), &directory);
        let directory = Arc::new(directory);
        self.state.policy.update(Box::new(move |p| p.directory = directory)).await.map_err(|e| e.to_string())?;
        if let Some(t) = pricing {
            self.state.set_pricing(Arc::new(t));
        }
        Ok(warnings)
    }

    /// The files a reload reads (those configured).
    pub fn files(&self) -> Vec<String> {
        let c = &self.state.config;
        [&c.tenants_file, &c.tiers_file, &c.pricing_file]
            .into_iter()
            .flatten()
            .map(|f| f.display().to_string())
            .collect()
    }

    /// A successful reload changes the policy like a `PATCH` does: an audit line and a
    /// `runtime_changed` event naming the files, so the change is on record.
    fn record_reload(&self, trigger: &str) {
        let reason = format!("{trigger}: tenants, tiers and pricing files reloaded");
        let files = self.files();
        let changes = serde_json::json!({ "files_reloaded": files });
        let version = self.state.policy.current().version;
        let mut extra = serde_json::Map::new();
        if self.state.policy.unshared() {
            // Fleet mode with the store down: the fleet's version moves once it answers.
            extra.insert("scope".into(), serde_json::json!("replica"));
        }
        self.state.record_runtime_change(version, &reason, changes, extra);
    }

    /// Re-reads the files (one reload at a time: a slow one asked for earlier must not put
    /// older tables back after a later one), logged, on record and counted in
    /// `preauth_config_reloads_total{result}`; `trigger` names what asked for it (`SIGHUP`, the
    /// admin API). `Ok`: the warnings about what was read.
    pub async fn reload_and_count(&self, trigger: &str) -> Result<Vec<String>, String> {
        let _one_at_a_time = self.state.reload_turn().await;
        let r = self.reload().await;
        match &r {
            Ok(warnings) => {
                self.record_reload(trigger);
                for w in warnings {
                    tracing::warn!(trigger, "{w}");
                }
            }
            Err(e) => tracing::error!(error = %e, trigger, "reload failed; keeping the previous tables"),
        }
        let result = if r.is_ok() { "ok" } else { "error" };
        self.state.metrics.config_reloads.with_label_values(&[result]).inc();
        r
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; file reload disabled");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = hup.recv() => {
                    let _ = self.reload_and_count("SIGHUP").await;
                }
            }
        }
    }
}
