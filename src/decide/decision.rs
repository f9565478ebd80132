//! What a decision is: verdict, the rule that fired, how the mode transformed it, and the facts
//! the glue needs to act (retry hint, global block to trip, gate evaluations for metrics).
//!
//! Owns: `Decision`, `Verdict`, `Reason`, `Gate`. Imports: `decide::{policy, time}`.

use super::policy::Mode;
use super::time::UnixMillis;

/// The answer sent in `x-preauth-decision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
    RequireApproval,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
            Verdict::RequireApproval => "REQUIRE_APPROVAL",
        }
    }
}

/// Whether the decision came from the rules or from the failsafe path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecisionPath {
    Normal,
    Failsafe,
}

impl DecisionPath {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionPath::Normal => "normal",
            DecisionPath::Failsafe => "failsafe",
        }
    }
}

/// How the enforcement mode changed a violation (CONTRACT §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transform {
    /// Kept as the rule says (hard mode, or a rule modes do not touch).
    None,
    /// Soft mode: turned into REQUIRE_APPROVAL, reason `soft_mode_<reason>`.
    Soft,
    /// Shadow mode: let through, reason `shadow_mode_<reason>_override`, counted as would-deny.
    Shadow,
}

/// Fair-use gate names used as metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gate {
    GlobalAbuse,
    SoftDaily,
    PerMinute,
    Concurrency,
    TokenRate,
}

impl Gate {
    pub const ALL: [Gate; 5] =
        [Gate::GlobalAbuse, Gate::SoftDaily, Gate::PerMinute, Gate::Concurrency, Gate::TokenRate];

    pub fn as_str(self) -> &'static str {
        match self {
            Gate::GlobalAbuse => "global_abuse",
            Gate::SoftDaily => "soft_daily",
            Gate::PerMinute => "per_minute",
            Gate::Concurrency => "concurrency",
            Gate::TokenRate => "token_rate",
        }
    }
}

/// One gate's evaluation, for `valdrics_ops_llm_fair_use_evaluations_total` and `_observed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateEval {
    pub gate: Gate,
    pub allowed: bool,
    pub observed: u64,
}

macro_rules! reasons {
    ($( $variant:ident => $label:literal, )*) => {
        /// A rule that decided (or, in shadow/soft mode, would have decided) the request.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason { $( $variant, )* }

        impl Reason {
            pub const ALL: &'static [Reason] = &[$( Reason::$variant, )*];

            /// The reason code, as the reference system spells it.
            pub fn as_str(self) -> &'static str {
                match self { $( Reason::$variant => $label, )* }
            }

            /// `soft_mode_<reason>`.
            pub fn soft_label(self) -> &'static str {
                match self { $( Reason::$variant => concat!("soft_mode_", $label), )* }
            }

            /// `shadow_mode_<reason>_override`.
            pub fn shadow_label(self) -> &'static str {
                match self { $( Reason::$variant => concat!("shadow_mode_", $label, "_override"), )* }
            }
        }
    };
}

reasons! {
    KillSwitch => "global_abuse_kill_switch",
    GlobalTemporalBlock => "global_abuse_temporal_block",
    GlobalTriggered => "global_abuse_triggered",
    DailyTenantLimit => "daily_tenant_limit_exceeded",
    FairUseSoftDaily => "fair_use_soft_daily",
    FairUsePerMinute => "fair_use_per_minute",
    FairUseConcurrency => "fair_use_concurrency",
    FairUseTokenRate => "fair_use_token_rate",
    HardDenyThreshold => "hard_deny_threshold_exceeded",
    ApprovalRequired => "approval_required",
    BudgetExceeded => "budget_exceeded",
    MaxTokensClamped => "max_tokens_clamped_to_budget",
    ApprovedOverBudget => "approved_over_budget",
    ApprovalTokenInvalid => "approval_token_invalid",
    ApprovalTokenExpired => "approval_token_expired",
    ApprovalTokenMismatch => "approval_token_mismatch",
    ApprovalTokenReplayed => "approval_token_replayed",
    ShadowFailOpen => "shadow_mode_fail_open",
    SoftFailSafeEscalation => "soft_mode_fail_safe_escalation",
    HardFailClosed => "hard_mode_fail_closed",
}

impl Reason {
    /// The fair-use gate this reason belongs to, if any (for `_fair_use_denials_total`).
    pub fn gate(self) -> Option<Gate> {
        Some(match self {
            Reason::KillSwitch | Reason::GlobalTemporalBlock | Reason::GlobalTriggered => Gate::GlobalAbuse,
            Reason::FairUseSoftDaily => Gate::SoftDaily,
            Reason::FairUsePerMinute => Gate::PerMinute,
            Reason::FairUseConcurrency => Gate::Concurrency,
            Reason::FairUseTokenRate => Gate::TokenRate,
            _ => return None,
        })
    }

    /// The label of this reason after the mode's transform.
    pub fn label(self, t: Transform) -> &'static str {
        match t {
            Transform::None => self.as_str(),
            Transform::Soft => self.soft_label(),
            Transform::Shadow => self.shadow_label(),
        }
    }
}

/// The outcome of the guard steps for one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub verdict: Verdict,
    pub mode: Mode,
    pub path: DecisionPath,
    /// The rule that fired (the first deny), before the mode's transform.
    pub reason: Option<Reason>,
    pub transform: Transform,
    /// Seconds the client should wait before retrying (`Retry-After`).
    pub retry_after_seconds: Option<u64>,
    /// Waiting `Retry-After` does not clear this refusal: the kill switch (an operator lifts it),
    /// a request that alone exceeds its tenant's token rate. Clients are told not to retry.
    pub lasting: bool,
    /// Set when this request detected a burst: the glue must record a global block until then.
    pub trip_global_block_until: Option<UnixMillis>,
    /// Each gate that was evaluated, in order.
    pub evaluations: GateEvals,
}

/// The gates evaluated for one decision, in order, held inline: each of the [`Gate::ALL`] is
/// evaluated at most once, and a decision is made per request (a `Vec` cost an allocation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GateEvals {
    items: [Option<GateEval>; Gate::ALL.len()],
    len: usize,
}

impl GateEvals {
    /// Appends one evaluation. A gate evaluated twice is a bug in the caller.
    pub fn push(&mut self, e: GateEval) {
        debug_assert!(self.iter().all(|x| x.gate != e.gate), "{:?} evaluated twice", e.gate);
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = Some(e);
            self.len += 1;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &GateEval> {
        self.into_iter()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<const N: usize> From<[GateEval; N]> for GateEvals {
    fn from(all: [GateEval; N]) -> GateEvals {
        let mut evals = GateEvals::default();
        all.into_iter().for_each(|e| evals.push(e));
        evals
    }
}

impl<'a> IntoIterator for &'a GateEvals {
    type Item = &'a GateEval;
    type IntoIter = std::iter::Flatten<std::slice::Iter<'a, Option<GateEval>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.items[..self.len].iter().flatten()
    }
}

impl Decision {
    pub fn allow(mode: Mode) -> Decision {
        Decision {
            verdict: Verdict::Allow,
            mode,
            path: DecisionPath::Normal,
            reason: None,
            transform: Transform::None,
            retry_after_seconds: None,
            lasting: false,
            trip_global_block_until: None,
            evaluations: GateEvals::default(),
        }
    }

    /// The reason label to report (`reasons` in events, the reason metric, error details).
    pub fn reason_label(&self) -> Option<&'static str> {
        self.reason.map(|r| r.label(self.transform))
    }

    /// Shadow mode let a violation through.
    pub fn is_would_deny(&self) -> bool {
        self.transform == Transform::Shadow
    }

    pub fn is_allow(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}
