//! Audit log lines: structured events through `tracing` (target `audit`), JSON when
//! `PREAUTH_LOG_FORMAT=json`. Every non-ALLOW decision is written; ALLOWs are sampled at
//! `audit_sample_rate`. Tokens and secrets are never written.
//!
//! Owns: `decision`, `runtime_change`, `sampled`. Imports: `decide` types, tracing.

use crate::decide::Decision;

/// Fields of one decision's audit line.
pub struct DecisionRecord<'a> {
    pub request_id: &'a str,
    pub tenant_id: &'a str,
    pub tenant_tier: &'a str,
    pub source: &'a str,
    pub route: &'a str,
    pub model: Option<&'a str>,
    pub policy_version: u64,
    pub decision: &'a Decision,
}

/// Whether an ALLOW with this sample value (uniform in [0,1)) is written.
pub fn sampled(rate: f64, sample: f64) -> bool {
    rate >= 1.0 || sample < rate
}

pub fn decision(r: &DecisionRecord<'_>) {
    let d = r.decision;
    tracing::info!(
        target: "audit",
        event = "enforcement_decision",
        request_id = r.request_id,
        tenant_id = r.tenant_id,
        tenant_tier = r.tenant_tier,
        source = r.source,
        route = r.route,
        model = r.model.unwrap_or(""),
        decision = d.verdict.as_str(),
        reason = d.reason_label().unwrap_or(""),
        mode = d.mode.as_str(),
        path = d.path.as_str(),
        policy_version = r.policy_version,
        retry_after_seconds = d.retry_after_seconds.unwrap_or(0),
    );
}

/// A runtime policy change through the admin API. `changes` is the applied JSON patch (no secrets
/// can be patched, so it is safe to log whole).
pub fn runtime_change(policy_version: u64, reason: &str, changes: &str) {
    tracing::warn!(
        target: "audit",
        event = "runtime_changed",
        policy_version,
        reason,
        changes,
    );
}
