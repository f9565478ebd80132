//! Every metric and the audit log, in one place. Metrics live in a [`Metrics`] registered into an
//! injected `prometheus::Registry` (no globals: each server, and each test, has its own).
//! Label values are bounded enums (sources are the configured set plus `default`; tenant ids
//! never appear).
//!
//! Owns: `Metrics`, `audit`, `EverySecond` (pacing of per-request log lines). Imports: `decide`
//! label types, prometheus, parking_lot, tracing.

pub mod audit;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::decide::{Decision, Gate, Reason, Tier};

/// Latency buckets, 100 µs to 5 s (CONTRACT §9).
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// All metrics of one server.
pub struct Metrics {
    pub registry: Registry,
    pub gate_decisions: IntCounterVec,
    pub gate_decision_reasons: IntCounterVec,
    pub gate_failures: IntCounterVec,
    pub gate_latency: HistogramVec,
    pub pre_auth_denials: IntCounterVec,
    pub fair_use_denials: IntCounterVec,
    pub fair_use_evaluations: IntCounterVec,
    pub fair_use_observed: IntGaugeVec,
    /// Children of the two above by (gate, tier[, outcome]), resolved on first use: every
    /// decision touches ~10 of them, and a label lookup hashes the values under a lock.
    gate_children: GateChildren,
    /// The children every request touches (default source, upstream status class, usage
    /// settlements), resolved on first use like `gate_children`.
    hot: HotChildren,
    pub spend_usd: prometheus::CounterVec,
    /// `spend_usd` children by (tier, provider, model), see [`Metrics::spend_child`].
    spend_children: SpendChildren,
    pub drift_usd: prometheus::CounterVec,
    pub reconciliations: IntCounterVec,
    pub approval_token_events: IntCounterVec,
    pub approval_queue_backlog: IntGauge,
    pub kill_switch_enabled: IntGauge,
    pub global_block_active: IntGauge,
    pub policy_version: IntGauge,
    pub reservations_active: IntGauge,
    pub outbox_events: IntCounterVec,
    pub outbox_depth: IntGauge,
    pub outbox_oldest_age_seconds: Gauge,
    pub store_errors: IntCounterVec,
    pub upstream_responses: IntCounterVec,
    pub tenants_tracked: GaugeVec,
    pub config_reloads: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn fcounter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::CounterVec {
    let c = prometheus::CounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let gate_latency = HistogramVec::new(
            HistogramOpts::new(
                "valdrics_ops_enforcement_gate_latency_seconds",
                "Time to reach an enforcement decision (identity to decision, excluding the upstream).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["source", "path"],
        )
        .expect("valid metric");
        r.register(Box::new(gate_latency.clone())).expect("metric registered once");
        let fair_use_observed = IntGaugeVec::new(
            Opts::new("valdrics_ops_llm_fair_use_observed", "Last observed counter value per fair-use gate."),
            &["gate", "tenant_tier"],
        )
        .expect("valid metric");
        r.register(Box::new(fair_use_observed.clone())).expect("metric registered once");
        let outbox_oldest_age_seconds =
            Gauge::new("preauth_outbox_oldest_age_seconds", "Age of the oldest undelivered outbox event.")
                .expect("valid metric");
        r.register(Box::new(outbox_oldest_age_seconds.clone())).expect("metric registered once");
        let tenants_tracked = GaugeVec::new(
            Opts::new("preauth_tenants_tracked", "Tenants with live counters in this replica's embedded store."),
            &["store"],
        )
        .expect("valid metric");
        r.register(Box::new(tenants_tracked.clone())).expect("metric registered once");
        let m = Metrics {
            gate_decisions: counter(
                &r,
                "valdrics_ops_enforcement_gate_decisions_total",
                "Enforcement decisions by source, decision and path (normal|failsafe).",
                &["source", "decision", "path"],
            ),
            gate_decision_reasons: counter(
                &r,
                "valdrics_ops_enforcement_gate_decision_reasons_total",
                "Reason codes attached to decisions.",
                &["source", "reason"],
            ),
            gate_failures: counter(
                &r,
                "valdrics_ops_enforcement_gate_failures_total",
                "Decisions that could not be made normally (store error, timeout, internal error).",
                &["source", "failure_type"],
            ),
            gate_latency,
            pre_auth_denials: counter(
                &r,
                "valdrics_ops_llm_pre_auth_denials_total",
                "LLM pre-authorization denials by reason and tier.",
                &["reason", "tenant_tier"],
            ),
            fair_use_denials: counter(
                &r,
                "valdrics_ops_llm_fair_use_denials_total",
                "Fair-use and global-abuse denials by gate and tier.",
                &["gate", "tenant_tier"],
            ),
            fair_use_evaluations: counter(
                &r,
                "valdrics_ops_llm_fair_use_evaluations_total",
                "Fair-use gate evaluations by outcome (allow|deny).",
                &["gate", "outcome", "tenant_tier"],
            ),
            fair_use_observed,
            gate_children: GateChildren::default(),
            hot: HotChildren::default(),
            spend_children: SpendChildren::default(),
            spend_usd: fcounter(
                &r,
                "valdrics_ops_llm_spend_usd_total",
                "Settled LLM spend in USD by tier, provider and model (models outside the price table: other).",
                &["tenant_tier", "provider", "model"],
            ),
            drift_usd: fcounter(
                &r,
                "valdrics_ops_enforcement_reservation_drift_usd_total",
                "Absolute settlement drift (actual - reserved) in USD by direction (overage|savings).",
                &["direction"],
            ),
            reconciliations: counter(
                &r,
                "valdrics_ops_enforcement_reservation_reconciliations_total",
                "Reservation reconciliations by trigger and status.",
                &["trigger", "status"],
            ),
            approval_token_events: counter(
                &r,
                "valdrics_ops_enforcement_approval_token_events_total",
                "Approval token events (issued, consumed, replay, expired, invalid, mismatch).",
                &["event"],
            ),
            approval_queue_backlog: gauge(&r, "valdrics_ops_enforcement_approval_queue_backlog", "Pending approvals."),
            kill_switch_enabled: gauge(&r, "preauth_kill_switch_enabled", "1 while the global kill switch is on."),
            global_block_active: gauge(&r, "preauth_global_block_active", "1 while a global abuse block is in force."),
            policy_version: gauge(&r, "preauth_policy_version", "Version of the runtime policy in force."),
            reservations_active: gauge(&r, "preauth_reservations_active", "Reservations held and not yet settled."),
            outbox_events: counter(
                &r,
                "preauth_outbox_events_total",
                "Outbox events by state (appended|delivered|dropped; parked: refused by the ledger, set aside in the outbox parked/ directory).",
                &["state"],
            ),
            outbox_depth: gauge(&r, "preauth_outbox_depth", "Events in the outbox not yet delivered."),
            outbox_oldest_age_seconds,
            store_errors: counter(
                &r,
                "preauth_store_errors_total",
                "State store operation failures by operation.",
                &["op"],
            ),
            upstream_responses: counter(
                &r,
                "preauth_upstream_responses_total",
                "Upstream responses by status class (2xx|3xx|4xx|5xx|error).",
                &["status_class"],
            ),
            tenants_tracked,
            config_reloads: counter(
                &r,
                "preauth_config_reloads_total",
                "SIGHUP reloads of the tenants, tiers and pricing files by result (ok|error; error keeps the old tables).",
                &["result"],
            ),
            registry: r,
        };
        m.zero_series();
        m
    }

    /// Creates, at zero, every series whose labels are known in advance and whose first
    /// increment may come late or never (failures, drops, drift, token events): a fresh
    /// process exposes every contract name, and `rate()`/`increase()` see the first event.
    fn zero_series(&self) {
        let default = "default";
        for verdict in ["ALLOW", "DENY", "REQUIRE_APPROVAL"] {
            for path in ["normal", "failsafe"] {
                self.gate_decisions.with_label_values(&[default, verdict, path]);
            }
        }
        for path in ["normal", "failsafe"] {
            self.gate_latency.with_label_values(&[default, path]);
        }
        for failure in GATE_FAILURE_TYPES {
            self.gate_failures.with_label_values(&[default, failure]);
        }
        for gate in Gate::ALL {
            for tier in Tier::ALL {
                self.fair_use_denials.with_label_values(&[gate.as_str(), tier.as_str()]);
                for outcome in ["allow", "deny"] {
                    self.fair_use_evaluations.with_label_values(&[gate.as_str(), outcome, tier.as_str()]);
                }
                if gate != Gate::GlobalAbuse {
                    self.fair_use_observed.with_label_values(&[gate.as_str(), tier.as_str()]);
                }
            }
        }
        // Reason counters: every reason code of the default source, and every code that refuses
        // or escalates per tier (what `pre_auth_denials` counts), so the first denial of a kind
        // is an increase from 0, not a new series.
        for reason in Reason::ALL {
            self.gate_decision_reasons.with_label_values(&[default, reason.as_str()]);
            if !matches!(reason, Reason::MaxTokensClamped | Reason::ApprovedOverBudget | Reason::ShadowFailOpen) {
                for tier in Tier::ALL {
                    self.pre_auth_denials.with_label_values(&[reason.as_str(), tier.as_str()]);
                }
            }
        }
        // Spend: the series of models outside the price table (provider and model `other`).
        for tier in Tier::ALL {
            self.spend_usd.with_label_values(&[tier.as_str(), "other", "other"]);
        }
        for direction in ["overage", "savings"] {
            self.drift_usd.with_label_values(&[direction]);
        }
        for (trigger, statuses) in [
            ("usage", &["matched", "overage", "savings", "released"][..]),
            ("manual", &["matched", "overage", "savings", "auto_release"][..]),
            ("auto", &["auto_release"][..]),
        ] {
            for status in statuses {
                self.reconciliations.with_label_values(&[trigger, status]);
            }
        }
        for event in ["issued", "consumed", "replay", "expired", "invalid", "mismatch"] {
            self.approval_token_events.with_label_values(&[event]);
        }
        for state in ["appended", "delivered", "dropped", "parked"] {
            self.outbox_events.with_label_values(&[state]);
        }
        for op in STORE_OPS {
            self.store_errors.with_label_values(&[op]);
        }
        for status in [Some(200), Some(300), Some(400), Some(500), None] {
            self.upstream_responses.with_label_values(&[status_class(status)]);
        }
        for result in ["ok", "error"] {
            self.config_reloads.with_label_values(&[result]);
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        use prometheus::Encoder;
        let mut buf = Vec::with_capacity(16 * 1024);
        prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        buf
    }

    /// Counts a settlement by `trigger` (`usage`, `manual`) with its drift (actual − reserved);
    /// returns the status label (`matched`, `overage`, `savings`).
    pub fn record_settlement(&self, trigger: &str, drift: crate::decide::Micros) -> &'static str {
        let status = settlement_status(drift);
        let i = match status {
            "matched" => 0,
            "overage" => 1,
            _ => 2,
        };
        if trigger == "usage" {
            self.hot.usage_settlements[i]
                .get_or_init(|| self.reconciliations.with_label_values(&[trigger, status]))
                .inc();
        } else {
            self.reconciliations.with_label_values(&[trigger, status]).inc();
        }
        if drift.0 != 0 {
            let usd = crate::decide::Micros(drift.0.abs()).as_usd_f64();
            self.hot.drift[i].get_or_init(|| self.drift_usd.with_label_values(&[status])).inc_by(usd);
        }
        status
    }

    /// Counts an upstream answer by status class (`None`: no answer).
    pub fn count_upstream(&self, status: Option<u16>) {
        let class = status_class(status);
        let i = match status {
            Some(200..=299) => 0,
            Some(300..=399) => 1,
            Some(400..=499) => 2,
            Some(500..=599) => 3,
            _ => 4,
        };
        self.hot.upstream[i].get_or_init(|| self.upstream_responses.with_label_values(&[class])).inc();
    }

    /// Adds settled spend (`models outside the price table` arrive as `other`).
    pub fn record_spend(&self, tier: &str, provider: &str, model: &str, actual: crate::decide::Micros) {
        self.spend_child(tier, provider, model).inc_by(actual.as_usd_f64());
    }

    /// The `spend_usd` child of these labels from a small list of the ones seen (a label lookup
    /// hashes three values under a lock on every settlement). The labels are bounded (tiers ×
    /// price-table keys); past [`SPEND_CHILDREN`] distinct ones the lookup is done each time.
    fn spend_child(&self, tier: &str, provider: &str, model: &str) -> prometheus::Counter {
        let mut seen = self.spend_children.lock();
        if let Some((.., c)) = seen.iter().find(|(t, p, m, _)| **t == *tier && **m == *model && **p == *provider) {
            return c.clone();
        }
        let c = self.spend_usd.with_label_values(&[tier, provider, model]);
        if seen.len() < SPEND_CHILDREN {
            seen.push((tier.into(), provider.into(), model.into(), c.clone()));
        }
        c
    }

    /// Counts one decision everywhere it belongs.
    pub fn record_decision(&self, source: &str, tier: Tier, d: &Decision, elapsed_s: f64) {
        let path = d.path.as_str();
        if source == "default" {
            let i = d.verdict as usize * 2 + d.path as usize;
            let h = &self.hot;
            h.decisions[i]
                .get_or_init(|| self.gate_decisions.with_label_values(&[source, d.verdict.as_str(), path]))
                .inc();
            h.latency[d.path as usize]
                .get_or_init(|| self.gate_latency.with_label_values(&[source, path]))
                .observe(elapsed_s);
        } else {
            self.gate_decisions.with_label_values(&[source, d.verdict.as_str(), path]).inc();
            self.gate_latency.with_label_values(&[source, path]).observe(elapsed_s);
        }
        let tier_index = tier as usize;
        let tier = tier.as_str();
        for e in &d.evaluations {
            let outcome = if e.allowed { "allow" } else { "deny" };
            let slot = (e.gate as usize * Tier::ALL.len() + tier_index) * 2 + usize::from(e.allowed);
            self.gate_children.evaluations[slot]
                .get_or_init(|| self.fair_use_evaluations.with_label_values(&[e.gate.as_str(), outcome, tier]))
                .inc();
            if e.gate != Gate::GlobalAbuse {
                self.gate_children.observed[slot / 2]
                    .get_or_init(|| self.fair_use_observed.with_label_values(&[e.gate.as_str(), tier]))
                    .set(e.observed as i64);
            }
        }
        if let Some(label) = d.reason_label() {
            self.gate_decision_reasons.with_label_values(&[source, label]).inc();
            if !d.is_allow() || d.is_would_deny() {
                self.pre_auth_denials.with_label_values(&[label, tier]).inc();
            }
            if d.verdict == crate::decide::Verdict::Deny {
                if let Some(gate) = d.reason.and_then(|r| r.gate()) {
                    self.fair_use_denials.with_label_values(&[gate.as_str(), tier]).inc();
                }
            }
        }
    }
}

/// `failure_type` values of `valdrics_ops_enforcement_gate_failures_total`.
pub const GATE_FAILURE_TYPES: [&str; 4] = ["store_timeout", "store_error", "gate_timeout", "outbox_unavailable"];

/// `op` values of `preauth_store_errors_total`: the store calls of the request path
/// (`AppState::store_failed`) and of the background workers.
pub const STORE_OPS: [&str; 15] = [
    "admit",
    "consume_approval",
    "create_pending",
    "get_reservation",
    "release_lease",
    "rollback",
    "set_global_block",
    "settle",
    "charge",
    "release",
    "park_lease",
    "tenant_spend",
    "sweep",
    "expire",
    "sync",
];

const GATE_SLOTS: usize = Gate::ALL.len() * Tier::ALL.len();

struct GateChildren {
    /// By `(gate, tier, allowed)`.
    evaluations: [OnceLock<IntCounter>; GATE_SLOTS * 2],
    /// By `(gate, tier)`.
    observed: [OnceLock<IntGauge>; GATE_SLOTS],
}

/// How many (tier, provider, model) `spend_usd` children [`Metrics::spend_child`] remembers.
const SPEND_CHILDREN: usize = 64;

type SpendChildren = parking_lot::Mutex<Vec<(Box<str>, Box<str>, Box<str>, prometheus::Counter)>>;

/// See [`Metrics::hot`]. Indexes: verdict × 2 + path; path; status class (`count_upstream`);
/// settlement status (matched, overage, savings).
struct HotChildren {
    decisions: [OnceLock<IntCounter>; 6],
    latency: [OnceLock<prometheus::Histogram>; 2],
    upstream: [OnceLock<IntCounter>; 5],
    usage_settlements: [OnceLock<IntCounter>; 3],
    drift: [OnceLock<prometheus::Counter>; 3],
}

impl Default for HotChildren {
    fn default() -> Self {
        HotChildren {
            decisions: std::array::from_fn(|_| OnceLock::new()),
            latency: std::array::from_fn(|_| OnceLock::new()),
            upstream: std::array::from_fn(|_| OnceLock::new()),
            usage_settlements: std::array::from_fn(|_| OnceLock::new()),
            drift: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

impl Default for GateChildren {
    fn default() -> Self {
        GateChildren {
            evaluations: std::array::from_fn(|_| OnceLock::new()),
            observed: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `2xx` … `5xx`, or `error` when there was no response.
pub fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "error",
    }
}

/// Paces a log line that every request may trigger (a failing store, a full outbox): lets one
/// event a second through and counts the others, so the line that passes can say how many it
/// stands for.
#[derive(Debug, Default)]
pub struct EverySecond {
    /// The second (Unix) of the last event let through.
    last: AtomicU64,
    skipped: AtomicU64,
}

impl EverySecond {
    /// `Some(events not let through since the last one)` when this one, at `now_s`, may pass.
    pub fn pass(&self, now_s: u64) -> Option<u64> {
        self.pass_every(now_s, 1)
    }

    /// As `pass`, one event per `period_s` seconds (a condition that a periodic task meets on
    /// every run, such as a sweep failing while the store is down).
    pub fn pass_every(&self, now_s: u64, period_s: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        let early = last != 0 && now_s < last.saturating_add(period_s.max(1));
        if early
            || now_s <= last
            || self.last.compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.skipped.swap(0, Ordering::Relaxed))
    }
}

/// The status label of a settlement with `drift` (actual − reserved): `matched`, `overage` or
/// `savings`.
pub fn settlement_status(drift: crate::decide::Micros) -> &'static str {
    match drift.0 {
        0 => "matched",
        d if d > 0 => "overage",
        _ => "savings",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Micros;

    #[test]
    fn every_second_lets_one_through_per_second_and_counts_the_rest() {
        let g = EverySecond::default();
        assert_eq!(g.pass(100), Some(0));
        assert_eq!(g.pass(100), None);
        assert_eq!(g.pass(100), None);
        assert_eq!(g.pass(99), None, "a clock step back lets nothing through");
        assert_eq!(g.pass(101), Some(3));
        assert_eq!(g.pass(101), None);
        assert_eq!(g.pass(105), Some(1));
    }

    #[test]
    fn every_period_lets_one_through_per_period() {
        let g = EverySecond::default();
        assert_eq!(g.pass_every(30, 60), Some(0), "the first one passes");
        assert_eq!(g.pass_every(31, 60), None);
        assert_eq!(g.pass_every(89, 60), None);
        assert_eq!(g.pass_every(90, 60), Some(2));
        assert_eq!(g.pass_every(80, 60), None, "a clock step back lets nothing through");
        assert_eq!(g.pass_every(150, 60), Some(1));
    }

    #[test]
    fn spend_is_added_to_the_child_of_its_labels_also_past_the_remembered_ones() {
        let m = Metrics::new();
        let spent =
            |tier: &str, provider: &str, model: &str| m.spend_usd.with_label_values(&[tier, provider, model]).get();
        m.record_spend("pro", "openai", "gpt-4o", Micros(1_500_000));
        m.record_spend("pro", "openai", "gpt-4o", Micros(500_000));
        m.record_spend("free", "openai", "gpt-4o", Micros(250_000));
        m.record_spend("pro", "anthropic", "gpt-4o", Micros(125_000));
        m.record_spend("pro", "openai", "other", Micros(1));
        assert_eq!(spent("pro", "openai", "gpt-4o"), 2.0);
        assert_eq!(spent("free", "openai", "gpt-4o"), 0.25);
        assert_eq!(spent("pro", "anthropic", "gpt-4o"), 0.125);
        assert_eq!(spent("pro", "openai", "other"), 0.000001);
        let models: Vec<String> = (0..SPEND_CHILDREN + 10).map(|i| format!("model-{i}")).collect();
        for _ in 0..2 {
            for model in &models {
                m.record_spend("pro", "openai", model, Micros(1_000_000));
            }
        }
        for model in &models {
            assert_eq!(spent("pro", "openai", model), 2.0, "{model}");
        }
        assert_eq!(m.spend_children.lock().len(), SPEND_CHILDREN);
    }

    #[test]
    fn a_fresh_process_exposes_its_failure_and_drop_counters_at_zero() {
        let text = String::from_utf8(Metrics::new().encode()).unwrap();
        for series in [
            "valdrics_ops_enforcement_gate_failures_total{failure_type=\"store_error\",source=\"default\"} 0",
            "valdrics_ops_enforcement_gate_decisions_total{decision=\"DENY\",path=\"failsafe\",source=\"default\"} 0",
            "valdrics_ops_enforcement_gate_latency_seconds_count{path=\"normal\",source=\"default\"} 0",
            "valdrics_ops_llm_fair_use_denials_total{gate=\"concurrency\",tenant_tier=\"pro\"} 0",
            "valdrics_ops_enforcement_reservation_drift_usd_total{direction=\"overage\"} 0",
            "valdrics_ops_enforcement_reservation_reconciliations_total{status=\"auto_release\",trigger=\"auto\"} 0",
            "valdrics_ops_enforcement_approval_token_events_total{event=\"replay\"} 0",
            "preauth_outbox_events_total{state=\"dropped\"} 0",
            "preauth_store_errors_total{op=\"admit\"} 0",
            "preauth_store_errors_total{op=\"sync\"} 0",
            "preauth_upstream_responses_total{status_class=\"error\"} 0",
        ] {
            assert!(text.lines().any(|l| l == series), "{series} missing from:\n{text}");
        }
    }
}
