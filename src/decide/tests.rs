use super::*;
use crate::decide::time::parse_rfc3339;

fn at(s: &str) -> UnixMillis {
    parse_rfc3339(s).unwrap()
}

fn facts(tier: Tier) -> Facts<'static> {
    Facts { tenant: "t1", tier, source: "default", estimated_tokens: 100 }
}

fn fair_use_policy() -> Policy {
    let mut p = Policy::for_test();
    p.fair_use.enabled = true;
    p.fair_use.per_minute_cap = 3;
    p.fair_use.concurrency_cap = 2;
    p
}

#[test]
fn clean_request_is_allowed() {
    let p = Policy::for_test();
    let d = evaluate(&p, &facts(Tier::Pro), &CountersView::default(), Mode::Hard, at("2026-11-25T10:00:00Z"));
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(d.reason, None);
    assert_eq!(d.path, DecisionPath::Normal);
}

#[test]
fn kill_switch_applies_in_every_mode() {
    let mut p = Policy::for_test();
    assert!(kill_switch(&p, Mode::Hard).is_none());
    p.kill_switch = true;
    for mode in [Mode::Hard, Mode::Soft, Mode::Shadow] {
        let d = kill_switch(&p, mode).unwrap();
        assert_eq!(d.verdict, Verdict::Deny);
        assert_eq!(d.reason_label(), Some("global_abuse_kill_switch"));
        assert_eq!(d.retry_after_seconds, Some(60));
    }
}

#[test]
fn global_burst_trips_at_cap_and_threshold() {
    let mut p = Policy::for_test();
    p.global.per_minute_cap = 5;
    p.global.unique_tenants_threshold = 2;
    p.global.block_seconds = 120;
    let now = at("2026-11-25T10:00:00Z");
    let mut v = CountersView::default();
    v.global.requests_last_minute = 4;
    v.global.distinct_tenants_last_minute = 3;
    assert!(evaluate(&p, &facts(Tier::Free), &v, Mode::Hard, now).is_allow(), "5th request is admitted");
    v.global.requests_last_minute = 5;
    let d = evaluate(&p, &facts(Tier::Free), &v, Mode::Shadow, now);
    assert_eq!(d.verdict, Verdict::Deny, "the 6th request trips, even in shadow mode");
    assert_eq!(d.reason, Some(Reason::GlobalTriggered));
    assert_eq!(d.trip_global_block_until, Some(now + 120_000));
    assert_eq!(d.retry_after_seconds, Some(120));
    v.global.distinct_tenants_last_minute = 1;
    assert!(evaluate(&p, &facts(Tier::Free), &v, Mode::Hard, now).is_allow(), "one tenant alone never trips");
    p.global.enabled = false;
    v.global.distinct_tenants_last_minute = 3;
    assert!(evaluate(&p, &facts(Tier::Free), &v, Mode::Hard, now).is_allow(), "guards disabled");
}

#[test]
fn global_block_expires() {
    let p = Policy::for_test();
    let now = at("2026-11-25T10:00:00Z");
    let mut v = CountersView::default();
    v.global.block_until = Some(now + 90_500);
    let d = evaluate(&p, &facts(Tier::Pro), &v, Mode::Hard, now);
    assert_eq!(d.reason, Some(Reason::GlobalTemporalBlock));
    assert_eq!(d.retry_after_seconds, Some(91), "rounded up");
    assert_eq!(evaluate(&p, &facts(Tier::Pro), &v, Mode::Hard, now + 90_499).retry_after_seconds, Some(1));
    assert!(evaluate(&p, &facts(Tier::Pro), &v, Mode::Hard, now + 90_500).is_allow(), "expired exactly at its end");
}

#[test]
fn daily_quota_and_rollover() {
    let p = Policy::for_test(); // free: 1 per day
    let late = at("2026-11-25T23:59:30Z");
    let mut v = CountersView::default();
    assert!(evaluate(&p, &facts(Tier::Free), &v, Mode::Hard, late).is_allow());
    v.tenant.daily_requests = 1;
    let d = evaluate(&p, &facts(Tier::Free), &v, Mode::Hard, late);
    assert_eq!(d.reason, Some(Reason::DailyTenantLimit));
    assert_eq!(d.retry_after_seconds, Some(30), "until UTC midnight");
    // The store resets daily counts at the UTC day boundary; the rule itself only compares.
    assert_eq!(time::utc_day(late) + 1, time::utc_day(at("2026-11-26T00:00:00Z")));
    v.tenant.daily_requests = 0;
    assert!(evaluate(&p, &facts(Tier::Free), &v, Mode::Hard, at("2026-11-26T00:00:00Z")).is_allow());
}

#[test]
fn per_minute_window_edges() {
    let p = fair_use_policy();
    let now = at("2026-11-25T10:00:30Z");
    let mut v = CountersView::default();
    v.tenant.minute_requests = 2;
    assert!(evaluate(&p, &facts(Tier::Growth), &v, Mode::Hard, now).is_allow());
    v.tenant.minute_requests = 3;
    v.tenant.minute_oldest = Some(at("2026-11-25T10:00:00Z"));
    let d = evaluate(&p, &facts(Tier::Growth), &v, Mode::Hard, now);
    assert_eq!(d.reason, Some(Reason::FairUsePerMinute));
    assert_eq!(d.retry_after_seconds, Some(30), "oldest leaves the window at 10:01:00");
    assert_eq!(d.reason.unwrap().gate(), Some(Gate::PerMinute));
}

#[test]
fn concurrency_retry_after_is_bounded() {
    let mut p = fair_use_policy();
    let mut v = CountersView::default();
    v.tenant.in_flight = 2;
    let now = at("2026-11-25T10:00:00Z");
    let d = evaluate(&p, &facts(Tier::Free), &v, Mode::Hard, now);
    assert_eq!(d.reason, Some(Reason::FairUseConcurrency));
    assert_eq!(d.retry_after_seconds, Some(60));
    p.fair_use.lease_ttl_seconds = 2;
    assert_eq!(evaluate(&p, &facts(Tier::Free), &v, Mode::Hard, now).retry_after_seconds, Some(5));
    // The hint follows the setting; the lease itself lives at least 30 s (as the reference's
    // max(30, ttl)), so a short TTL does not free the slots of requests still streaming.
    assert_eq!(p.fair_use.lease_life_ms(), 30_000);
    p.fair_use.lease_ttl_seconds = 180;
    assert_eq!(p.fair_use.lease_life_ms(), 180_000);
    p.fair_use.lease_ttl_seconds = 2;
    p.fair_use.concurrency_cap = 0;
    assert!(evaluate(&p, &facts(Tier::Free), &v, Mode::Hard, now).is_allow(), "cap <= 0 disables the gate");
}

#[test]
fn soft_daily_only_for_pro_and_enterprise() {
    let mut p = fair_use_policy();
    p.fair_use.pro_daily_soft_cap = 50;
    let mut v = CountersView::default();
    v.tenant.daily_requests = 50;
    let now = at("2026-11-25T10:00:00Z");
    assert_eq!(evaluate(&p, &facts(Tier::Pro), &v, Mode::Hard, now).reason, Some(Reason::FairUseSoftDaily));
    p.directory = std::sync::Arc::new(
        policy::Directory::from_files(Some("[tiers.growth]\ndaily_request_quota = 0\n"), None).unwrap(),
    );
    assert!(evaluate(&p, &facts(Tier::Growth), &v, Mode::Hard, now).is_allow());
}

#[test]
fn token_rate_counts_this_request() {
    let mut p = Policy::for_test();
    p.fair_use.tokens_per_minute = 1000;
    let now = at("2026-11-25T10:00:10Z");
    let mut v = CountersView::default();
    v.tenant.tokens_last_minute = 900;
    v.tenant.tokens_oldest = Some(at("2026-11-25T10:00:00Z"));
    assert!(evaluate(&p, &facts(Tier::Pro), &v, Mode::Hard, now).is_allow(), "900 + 100 fits");
    v.tenant.tokens_last_minute = 901;
    let d = evaluate(&p, &facts(Tier::Pro), &v, Mode::Hard, now);
    assert_eq!(d.reason, Some(Reason::FairUseTokenRate));
    assert_eq!(d.retry_after_seconds, Some(50));
    assert!(!d.lasting, "fits once the window drains");
}

#[test]
fn a_request_larger_than_the_token_rate_is_a_lasting_refusal() {
    let mut p = Policy::for_test();
    p.fair_use.tokens_per_minute = 1000;
    let now = at("2026-11-25T10:00:10Z");
    let big = Facts { estimated_tokens: 1001, ..facts(Tier::Pro) };
    let d = evaluate(&p, &big, &CountersView::default(), Mode::Hard, now);
    assert_eq!((d.reason, d.lasting), (Some(Reason::FairUseTokenRate), true), "even on an empty window");
    assert!(kill_switch(&Policy { kill_switch: true, ..Policy::for_test() }, Mode::Hard).unwrap().lasting);
    // Soft and shadow do not deny: nothing to retry.
    assert!(!evaluate(&p, &big, &CountersView::default(), Mode::Soft, now).lasting);
}

#[test]
fn modes_transform_tenant_violations() {
    let p = fair_use_policy();
    let now = at("2026-11-25T10:00:00Z");
    let mut v = CountersView::default();
    v.tenant.minute_requests = 3;
    let hard = evaluate(&p, &facts(Tier::Pro), &v, Mode::Hard, now);
    assert_eq!((hard.verdict, hard.reason_label()), (Verdict::Deny, Some("fair_use_per_minute")));
    let soft = evaluate(&p, &facts(Tier::Pro), &v, Mode::Soft, now);
    assert_eq!((soft.verdict, soft.reason_label()), (Verdict::RequireApproval, Some("soft_mode_fair_use_per_minute")));
    assert_eq!(soft.retry_after_seconds, None);
    let shadow = evaluate(&p, &facts(Tier::Pro), &v, Mode::Shadow, now);
    assert_eq!(
        (shadow.verdict, shadow.reason_label()),
        (Verdict::Allow, Some("shadow_mode_fair_use_per_minute_override"))
    );
    assert!(shadow.is_would_deny());
}

#[test]
fn failsafe_per_mode() {
    let d = failsafe(Mode::Shadow);
    assert_eq!(
        (d.verdict, d.reason_label(), d.path),
        (Verdict::Allow, Some("shadow_mode_fail_open"), DecisionPath::Failsafe)
    );
    let d = failsafe(Mode::Soft);
    assert_eq!((d.verdict, d.reason_label()), (Verdict::RequireApproval, Some("soft_mode_fail_safe_escalation")));
    let d = failsafe(Mode::Hard);
    assert_eq!(
        (d.verdict, d.reason_label(), d.retry_after_seconds),
        (Verdict::Deny, Some("hard_mode_fail_closed"), Some(1))
    );
}

#[test]
fn every_reason_label_is_unique() {
    let mut seen = std::collections::HashSet::new();
    for r in Reason::ALL {
        for t in [Transform::None, Transform::Soft, Transform::Shadow] {
            assert!(seen.insert(r.label(t)), "{}", r.label(t));
        }
    }
}

#[test]
fn spend_thresholds_and_their_modes() {
    let p = Policy::for_test(); // approval above 1.00, hard deny above 50.00
    assert_eq!(spend_threshold(&p, Micros(1_000_000), false), None, "exactly at the threshold is fine");
    assert_eq!(spend_threshold(&p, Micros(1_000_001), false), Some(Reason::ApprovalRequired));
    assert_eq!(spend_threshold(&p, Micros(1_000_001), true), None, "a valid token lifts the approval threshold");
    assert_eq!(spend_threshold(&p, Micros(50_000_001), true), Some(Reason::HardDenyThreshold), "never the hard limit");
    let hard_limit = Some(Reason::HardDenyThreshold);
    assert!(token_lifts_threshold(Mode::Soft, true, hard_limit), "soft mode: a token lifts the escalated hard limit");
    assert!(!token_lifts_threshold(Mode::Hard, true, hard_limit), "hard mode: the hard limit is a 402");
    assert!(!token_lifts_threshold(Mode::Soft, false, hard_limit));
    assert!(!token_lifts_threshold(Mode::Soft, true, None));
    let hard = violation(Mode::Hard, Reason::ApprovalRequired, None);
    assert_eq!((hard.verdict, hard.reason_label()), (Verdict::RequireApproval, Some("approval_required")));
    let hard = violation(Mode::Hard, Reason::BudgetExceeded, None);
    assert_eq!((hard.verdict, hard.reason_label()), (Verdict::Deny, Some("budget_exceeded")));
    let soft = violation(Mode::Soft, Reason::BudgetExceeded, None);
    assert_eq!((soft.verdict, soft.reason_label()), (Verdict::RequireApproval, Some("soft_mode_budget_exceeded")));
    let shadow = violation(Mode::Shadow, Reason::HardDenyThreshold, None);
    assert_eq!(
        (shadow.verdict, shadow.reason_label()),
        (Verdict::Allow, Some("shadow_mode_hard_deny_threshold_exceeded_override"))
    );
}

#[test]
fn every_gate_evaluated_is_listed_once_in_order() {
    let mut p = fair_use_policy();
    p.global.per_minute_cap = 1000;
    let mut v = CountersView::default();
    v.global.requests_last_minute = 10;
    v.tenant.minute_requests = 1;
    v.tenant.in_flight = 1;
    let d = evaluate(&p, &facts(Tier::Pro), &v, Mode::Hard, at("2026-11-25T10:00:00Z"));
    assert!(d.is_allow());
    let gates: Vec<(Gate, bool, u64)> = d.evaluations.iter().map(|e| (e.gate, e.allowed, e.observed)).collect();
    assert_eq!(gates[0], (Gate::GlobalAbuse, true, 10));
    assert!(gates.contains(&(Gate::PerMinute, true, 1)), "{gates:?}");
    assert!(gates.contains(&(Gate::Concurrency, true, 1)), "{gates:?}");
    assert_eq!(d.evaluations.len(), gates.len());
    assert_eq!((&d.evaluations).into_iter().count(), gates.len());

    v.tenant.minute_requests = 3;
    let d = evaluate(&p, &facts(Tier::Pro), &v, Mode::Hard, at("2026-11-25T10:00:00Z"));
    assert_eq!(d.reason, Some(Reason::FairUsePerMinute));
    let last = d.evaluations.iter().last().unwrap();
    assert_eq!(
        (last.gate, last.allowed, last.observed),
        (Gate::PerMinute, false, 3),
        "evaluation stops at the first deny"
    );
    assert!(!d.evaluations.iter().any(|e| e.gate == Gate::Concurrency));

    let all: GateEvals = Gate::ALL.map(|gate| GateEval { gate, allowed: true, observed: 0 }).into();
    assert_eq!(all.len(), Gate::ALL.len());
    assert!(GateEvals::default().is_empty());
}

#[test]
fn a_global_block_seen_before_the_store_failed_still_refuses_in_every_mode() {
    let mut p = Policy::for_test();
    let now = at("2026-11-25T10:00:00Z");
    for mode in [Mode::Hard, Mode::Soft, Mode::Shadow] {
        let d = undecided(&p, mode, Some(now + 30_500), now);
        assert_eq!(
            (d.verdict, d.reason_label(), d.retry_after_seconds, d.path),
            (Verdict::Deny, Some("global_abuse_temporal_block"), Some(31), DecisionPath::Failsafe)
        );
        // Over, or none seen: the mode's failsafe answer.
        assert_eq!(undecided(&p, mode, Some(now), now), failsafe(mode));
        assert_eq!(undecided(&p, mode, None, now), failsafe(mode));
    }
    p.global.enabled = false;
    assert_eq!(undecided(&p, Mode::Shadow, Some(now + 30_500), now), failsafe(Mode::Shadow));
}

#[test]
fn a_bad_token_on_a_request_above_the_hard_limit_is_refused_for_the_limit_in_hard_mode() {
    let expired = || approval::ApprovalError::Expired;
    let d = bad_token_refusal(Mode::Hard, Some(Reason::HardDenyThreshold), expired());
    assert_eq!((d.verdict, d.reason_label()), (Verdict::Deny, Some("hard_deny_threshold_exceeded")));
    // Where a token could have admitted the request, what is wrong with the token is the answer.
    for (mode, threshold) in [
        (Mode::Hard, Some(Reason::ApprovalRequired)),
        (Mode::Hard, None),
        (Mode::Soft, Some(Reason::HardDenyThreshold)),
        (Mode::Shadow, Some(Reason::HardDenyThreshold)),
    ] {
        let d = bad_token_refusal(mode, threshold, expired());
        assert_eq!((d.verdict, d.reason_label()), (Verdict::Deny, Some("approval_token_expired")), "{mode:?}");
    }
}
