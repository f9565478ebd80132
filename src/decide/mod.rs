//! Pure, synchronous policy: `(policy snapshot, request facts, counters view, now) -> Decision`.
//!
//! No tokio, no pingora, no clock reads, no I/O: everything the rules need arrives as arguments,
//! so every edge (window boundaries, block expiry, UTC day rollover, lease expiry, modes) is a
//! unit test with an injected `now`. A deny is a `Decision`, not an error.
//!
//! Order of checks (CONTRACT §3, first deny wins):
//! 3. kill switch → [`kill_switch`] (needs no counters, so the glue asks before touching the store)
//! 4. global block in force, then burst detection → [`evaluate`]
//! 5. tier daily quota
//! 6. fair use: soft daily, per minute, concurrency, token rate
//!
//! Steps 5–6 are transformed by the mode (`hard` keeps, `soft` escalates to REQUIRE_APPROVAL,
//! `shadow` lets through as a would-deny); steps 3–4 apply in every mode. [`failsafe`] is the
//! answer when no decision could be made.
//!
//! May import: std, serde, serde_json, itoa (`json`), thiserror, toml, hmac/sha2/base64 (token
//! checks). Nothing else.

pub mod approval;
pub mod decision;
pub mod estimate;
pub mod json;
pub mod jwt;
pub mod money;
pub mod policy;
pub mod pricing;
pub mod route;
#[cfg(test)]
pub(crate) mod testgen;
pub mod time;
pub mod usage;
#[cfg(test)]
mod usage_reference;
pub mod usage_types;

pub use decision::{Decision, DecisionPath, Gate, GateEval, GateEvals, Reason, Transform, Verdict};
pub use money::Micros;
pub use policy::{Mode, Policy, Tier};
pub use route::Route;
pub use time::UnixMillis;

/// The hash map of every per-request lookup (tenants, models, tokens): foldhash's quality hasher,
/// seeded per process, several times cheaper than std's SipHash for short keys.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::quality::RandomState>;

use time::{ms_until_next_utc_day, MS_PER_MINUTE, MS_PER_SECOND};

/// What is known about the request when the guards run.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub tenant: &'a str,
    pub tier: Tier,
    /// The configured source (bounded), see [`Policy::source_of`].
    pub source: &'a str,
    /// Estimated tokens of this request (prompt + max output), for the token-rate gate.
    pub estimated_tokens: u64,
}

/// Global counters as they were just before this request (the store counts it atomically).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalView {
    /// Admitted requests in the last 60 s, all tenants.
    pub requests_last_minute: u64,
    /// Distinct tenants among them.
    pub distinct_tenants_last_minute: u64,
    /// A global block in force until then (if in the future).
    pub block_until: Option<UnixMillis>,
}

/// One tenant's counters as they were just before this request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantView {
    /// Requests admitted in the current UTC day.
    pub daily_requests: u64,
    /// Requests admitted in the last 60 s.
    pub minute_requests: u64,
    /// Admission time of the oldest request still in the 60 s window.
    pub minute_oldest: Option<UnixMillis>,
    /// Live (unexpired, unreleased) concurrency leases.
    pub in_flight: u64,
    /// Estimated tokens admitted in the last 60 s.
    pub tokens_last_minute: u64,
    /// Admission time of the oldest token entry still in the window.
    pub tokens_oldest: Option<UnixMillis>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountersView {
    pub global: GlobalView,
    pub tenant: TenantView,
}

/// Kill switch: `Some(deny)` when on. Applies in every mode.
pub fn kill_switch(policy: &Policy, mode: Mode) -> Option<Decision> {
    policy.kill_switch.then(|| Decision {
        verdict: Verdict::Deny,
        reason: Some(Reason::KillSwitch),
        retry_after_seconds: Some(60),
        lasting: true,
        evaluations: [GateEval { gate: Gate::GlobalAbuse, allowed: false, observed: 0 }].into(),
        ..Decision::allow(mode)
    })
}

/// The failsafe decision for a request whose decision could not be made (CONTRACT §3).
pub fn failsafe(mode: Mode) -> Decision {
    let (verdict, reason, retry) = match mode {
        Mode::Shadow => (Verdict::Allow, Reason::ShadowFailOpen, None),
        Mode::Soft => (Verdict::RequireApproval, Reason::SoftFailSafeEscalation, None),
        Mode::Hard => (Verdict::Deny, Reason::HardFailClosed, Some(1)),
    };
    Decision {
        verdict,
        path: DecisionPath::Failsafe,
        reason: Some(reason),
        retry_after_seconds: retry,
        ..Decision::allow(mode)
    }
}

/// The failsafe decision, for a replica that last saw a global block in force until
/// `block_seen_until`: while it lasts, the block refuses every request in every mode, the store
/// answering or not (CONTRACT §3); otherwise [`failsafe`].
pub fn undecided(policy: &Policy, mode: Mode, block_seen_until: Option<UnixMillis>, now: UnixMillis) -> Decision {
    match block_seen_until.filter(|until| policy.global.enabled && *until > now) {
        Some(until) => Decision {
            verdict: Verdict::Deny,
            path: DecisionPath::Failsafe,
            reason: Some(Reason::GlobalTemporalBlock),
            retry_after_seconds: Some((until - now).div_ceil(MS_PER_SECOND).max(1)),
            evaluations: [GateEval { gate: Gate::GlobalAbuse, allowed: false, observed: 0 }].into(),
            ..Decision::allow(mode)
        },
        None => failsafe(mode),
    }
}

/// The refusal of a request whose approval token failed a check (step 8). In hard mode a request
/// above the hard-deny limit is refused for that first (step 7, and no token could admit it).
pub fn bad_token_refusal(mode: Mode, threshold: Option<Reason>, e: approval::ApprovalError) -> Decision {
    match threshold {
        Some(Reason::HardDenyThreshold) if mode == Mode::Hard => violation(mode, Reason::HardDenyThreshold, None),
        _ => token_refusal(mode, e),
    }
}

/// Seconds until `since + window` (rounded up, at least 1).
fn seconds_until(since: UnixMillis, window_ms: u64, now: UnixMillis) -> u64 {
    let until = since.saturating_add(window_ms);
    until.saturating_sub(now).div_ceil(MS_PER_SECOND).max(1)
}

/// Steps 4–6 for one request. `mode` is the request's source mode.
pub fn evaluate(policy: &Policy, facts: &Facts<'_>, view: &CountersView, mode: Mode, now: UnixMillis) -> Decision {
    let mut evaluations = GateEvals::default();

    // 4. Global abuse guard: a block in force, then burst detection. Every mode.
    if policy.global.enabled {
        let g = &view.global;
        let deny = |reason, retry, trip, evaluations| Decision {
            verdict: Verdict::Deny,
            reason: Some(reason),
            retry_after_seconds: Some(retry),
            trip_global_block_until: trip,
            evaluations,
            ..Decision::allow(mode)
        };
        if let Some(until) = g.block_until.filter(|u| *u > now) {
            evaluations.push(GateEval { gate: Gate::GlobalAbuse, allowed: false, observed: g.requests_last_minute });
            return deny(Reason::GlobalTemporalBlock, (until - now).div_ceil(MS_PER_SECOND).max(1), None, evaluations);
        }
        let cap = policy.global.per_minute_cap.max(1);
        let threshold = policy.global.unique_tenants_threshold.max(1);
        let tripped = g.requests_last_minute >= cap && g.distinct_tenants_last_minute >= threshold;
        evaluations.push(GateEval { gate: Gate::GlobalAbuse, allowed: !tripped, observed: g.requests_last_minute });
        if tripped {
            let block_ms = policy.global.block_seconds * MS_PER_SECOND;
            return deny(Reason::GlobalTriggered, policy.global.block_seconds, Some(now + block_ms), evaluations);
        }
    }

    let t = &view.tenant;
    match first_tenant_violation(policy, facts, t, now, &mut evaluations) {
        None => Decision { evaluations, ..Decision::allow(mode) },
        Some((reason, retry)) => {
            // A request larger than the tenant's whole token rate never fits, however long it waits.
            let lasting = reason == Reason::FairUseTokenRate
                && facts.estimated_tokens > policy.limits(facts.tenant).tokens_per_minute().max(0) as u64;
            let d = violation(mode, reason, Some(retry));
            Decision { evaluations, lasting: lasting && d.verdict == Verdict::Deny, ..d }
        }
    }
}

/// A violation of steps 5–9 as the mode turns it (CONTRACT §3): `hard` keeps it (a deny, or
/// REQUIRE_APPROVAL for `approval_required`), `soft` escalates to REQUIRE_APPROVAL, `shadow`
/// lets the request through as a would-deny.
pub fn violation(mode: Mode, reason: Reason, retry_after_seconds: Option<u64>) -> Decision {
    let (verdict, transform) = match mode {
        Mode::Hard if reason == Reason::ApprovalRequired => (Verdict::RequireApproval, Transform::None),
        Mode::Hard => (Verdict::Deny, Transform::None),
        Mode::Soft => (Verdict::RequireApproval, Transform::Soft),
        Mode::Shadow => (Verdict::Allow, Transform::Shadow),
    };
    Decision {
        verdict,
        reason: Some(reason),
        transform,
        retry_after_seconds: retry_after_seconds.filter(|_| verdict == Verdict::Deny),
        ..Decision::allow(mode)
    }
}

/// Step 8: a presented approval token that failed verification, binding or single use. Not
/// transformed by the mode: a bad token is refused in every mode.
pub fn token_refusal(mode: Mode, e: approval::ApprovalError) -> Decision {
    let reason = match e {
        approval::ApprovalError::Invalid(_) => Reason::ApprovalTokenInvalid,
        approval::ApprovalError::Expired => Reason::ApprovalTokenExpired,
        approval::ApprovalError::Mismatch(_) => Reason::ApprovalTokenMismatch,
        approval::ApprovalError::Replayed => Reason::ApprovalTokenReplayed,
    };
    Decision { verdict: Verdict::Deny, reason: Some(reason), ..Decision::allow(mode) }
}

/// A valid approval token lifts soft-mode escalations of the guard steps (CONTRACT §5): the
/// request is admitted, the escalated reason stays on record.
pub fn lift_soft_escalation(d: Decision) -> Decision {
    if d.verdict == Verdict::RequireApproval && d.transform == Transform::Soft {
        Decision { verdict: Verdict::Allow, ..d }
    } else {
        d
    }
}

/// Step 7: the estimated cost against the per-request thresholds. `approved` = the request
/// carries a valid approval token (it lifts the approval threshold, never the hard limit).
pub fn spend_threshold(policy: &Policy, estimated_cost: Micros, approved: bool) -> Option<Reason> {
    if estimated_cost > policy.spend.hard_deny_above {
        Some(Reason::HardDenyThreshold)
    } else if estimated_cost > policy.spend.require_approval_above && !approved {
        Some(Reason::ApprovalRequired)
    } else {
        None
    }
}

/// Whether a valid approval token lifts the step-7 `threshold` in `mode`. The approval threshold
/// is lifted by [`spend_threshold`] itself; the hard limit is a soft-mode escalation in soft
/// mode, which a valid token lifts like every other (CONTRACT §5), bounded by the token's
/// `max_cost_usd`. In hard mode the hard limit is a 402 no token lifts; shadow holds nothing.
pub fn token_lifts_threshold(mode: Mode, approved: bool, threshold: Option<Reason>) -> bool {
    approved && mode == Mode::Soft && threshold == Some(Reason::HardDenyThreshold)
}

/// Steps 5–6: the first tenant rule violated, with its retry hint in seconds.
fn first_tenant_violation(
    policy: &Policy,
    facts: &Facts<'_>,
    t: &TenantView,
    now: UnixMillis,
    evals: &mut GateEvals,
) -> Option<(Reason, u64)> {
    let until_tomorrow = ms_until_next_utc_day(now).div_ceil(MS_PER_SECOND);
    let limits = policy.limits(facts.tenant);

    // 5. Tier daily quota.
    if let Some(quota) = limits.daily_quota(facts.tier) {
        if t.daily_requests >= quota {
            return Some((Reason::DailyTenantLimit, until_tomorrow));
        }
    }

    // 6. Fair use.
    if policy.fair_use.enabled {
        let soft_cap = policy.soft_daily_cap(facts.tier);
        if soft_cap > 0 {
            let over = t.daily_requests >= soft_cap as u64;
            evals.push(GateEval { gate: Gate::SoftDaily, allowed: !over, observed: t.daily_requests });
            if over {
                return Some((Reason::FairUseSoftDaily, until_tomorrow));
            }
        }
        let minute_cap = limits.per_minute_cap();
        if minute_cap > 0 {
            let over = t.minute_requests >= minute_cap as u64;
            evals.push(GateEval { gate: Gate::PerMinute, allowed: !over, observed: t.minute_requests });
            if over {
                let retry = t.minute_oldest.map_or(60, |o| seconds_until(o, MS_PER_MINUTE, now));
                return Some((Reason::FairUsePerMinute, retry));
            }
        }
        let conc_cap = limits.concurrency_cap();
        if conc_cap > 0 {
            let over = t.in_flight >= conc_cap as u64;
            evals.push(GateEval { gate: Gate::Concurrency, allowed: !over, observed: t.in_flight });
            if over {
                let retry = policy.fair_use.lease_ttl_seconds.clamp(5, 60);
                return Some((Reason::FairUseConcurrency, retry));
            }
        }
    }
    let token_cap = limits.tokens_per_minute();
    if token_cap > 0 {
        let over = t.tokens_last_minute.saturating_add(facts.estimated_tokens) > token_cap as u64;
        evals.push(GateEval { gate: Gate::TokenRate, allowed: !over, observed: t.tokens_last_minute });
        if over {
            let retry = t.tokens_oldest.map_or(60, |o| seconds_until(o, MS_PER_MINUTE, now));
            return Some((Reason::FairUseTokenRate, retry));
        }
    }
    None
}

#[cfg(test)]
mod tests;
