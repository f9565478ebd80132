//! The one table from every refusal (a non-ALLOW decision or a request/upstream error) to HTTP:
//! status, error `code`, message, `Retry-After`, and the JSON body of CONTRACT §3.
//!
//! Owns: `Refusal`, `Rendered`, `render`. Imports: `decide` types, serde_json, bytes.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::decide::{Decision, Mode, Reason, Verdict};

/// Why the sidecar answers instead of the upstream.
#[derive(Clone, Debug, PartialEq)]
pub enum Refusal {
    /// 401: no or bad caller identity. The detail names what was wrong (never the token).
    Unauthenticated(&'static str),
    /// 400: body is not valid JSON or lacks required fields.
    InvalidRequest(String),
    /// 413: body larger than `PREAUTH_MAX_BODY_BYTES`.
    TooLarge { limit: u64 },
    /// 404: not an inspected route.
    RouteNotFound,
    /// A non-ALLOW decision.
    Decision { decision: Decision, policy_version: u64, extra: Map<String, Value> },
    /// 502: the upstream could not be reached or broke the protocol. `admitted`: the request
    /// was allowed and forwarded (the answer then says `ALLOW`, the decision the ledger holds;
    /// the failure was the gateway's, not a refusal).
    /// `timed_out`: the gateway had the request and did not answer within
    /// `PREAUTH_UPSTREAM_TIMEOUT_SECONDS` (charged the estimated prompt; not to be retried).
    UpstreamUnavailable { admitted: bool, timed_out: bool },
    /// Any other sidecar answer (gate API): status, code and message.
    Other { status: u16, code: &'static str, message: String },
}

/// An error response ready to write.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub status: u16,
    pub code: &'static str,
    pub verdict: Verdict,
    pub retry_after: Option<u64>,
    /// `x-should-retry`, the retry hint the OpenAI and Anthropic SDKs obey over their own rule
    /// (they retry 408/409/429/5xx, sleeping the whole `Retry-After`). `None`: no header.
    pub should_retry: Option<bool>,
    pub body: Bytes,
}

/// The longest `Retry-After` an SDK is told to wait out itself; a refusal lasting longer says
/// `x-should-retry: false`, so the caller gets its 429 at once (and the `Retry-After` with it).
pub const SDK_RETRY_AFTER_MAX_SECONDS: u64 = 60;

/// The `x-should-retry` hint of a sidecar answer.
fn should_retry(status: u16, retry_after: Option<u64>) -> Option<bool> {
    match status {
        429 | 503 => Some(retry_after.is_some_and(|s| s <= SDK_RETRY_AFTER_MAX_SECONDS)),
        // 409s (approval token expired or used, reservation already settled) stay as they are.
        409 => Some(false),
        _ => None,
    }
}

/// Status, code and message of a decision's rule.
fn decision_status(d: &Decision) -> (u16, &'static str, &'static str) {
    if d.verdict == Verdict::RequireApproval {
        return (
            403,
            "approval_required",
            "This request needs an approval token: send it again with the x-approval-token header once approved.",
        );
    }
    match d.reason {
        Some(Reason::KillSwitch) => {
            (429, "llm_fair_use_exceeded", "Global abuse protections are active. LLM analysis is temporarily unavailable.")
        }
        Some(Reason::GlobalTemporalBlock) => {
            (429, "llm_fair_use_exceeded", "Global abuse protections are active. Retry shortly.")
        }
        Some(Reason::GlobalTriggered) => {
            (429, "llm_fair_use_exceeded", "Global anti-abuse throttle is active. Retry shortly.")
        }
        Some(Reason::FairUseSoftDaily) => (
            429,
            "llm_fair_use_exceeded",
            "Daily fair-use limit reached. Retry tomorrow or contact support to increase limits.",
        ),
        Some(Reason::FairUsePerMinute) => (
            429,
            "llm_fair_use_exceeded",
            "Rate limit reached for this tenant. Retry after the Retry-After delay or contact support for higher throughput.",
        ),
        Some(Reason::FairUseConcurrency) => (
            429,
            "llm_fair_use_exceeded",
            "Too many in-flight LLM requests for this tenant. Retry shortly or contact support for higher throughput.",
        ),
        Some(Reason::FairUseTokenRate) => (
            429,
            "llm_fair_use_exceeded",
            "Token rate limit reached for this tenant. Retry after the Retry-After delay or send smaller requests.",
        ),
        Some(Reason::DailyTenantLimit) => {
            (402, "budget_exceeded", "Daily request quota for this tenant's tier is used up. Retry tomorrow (UTC) or upgrade the tier.")
        }
        Some(Reason::HardDenyThreshold) => {
            (402, "budget_exceeded", "The estimated cost of this request is above the hard limit for a single request.")
        }
        Some(Reason::BudgetExceeded) => {
            (402, "budget_exceeded", "The estimated cost of this request exceeds the tenant's remaining monthly budget.")
        }
        Some(Reason::ApprovalTokenInvalid) => (
            401,
            "approval_token_invalid",
            "The x-approval-token is not a valid approval token (signature, algorithm, audience, issuer or claims): ask for a new approval.",
        ),
        Some(Reason::ApprovalTokenExpired) => {
            (409, "approval_token_expired", "The approval token has expired: ask for a new approval.")
        }
        Some(Reason::ApprovalTokenMismatch) => (
            403,
            "approval_token_mismatch",
            "The approval token was issued for another tenant, another request body or a lower cost: ask for an approval of this request.",
        ),
        Some(Reason::ApprovalTokenReplayed) => {
            (409, "approval_token_replayed", "The approval token has already been used: each token admits one request; ask for a new approval.")
        }
        Some(Reason::HardFailClosed) => (
            503,
            "enforcement_unavailable",
            "The enforcement decision could not be made; the request was not forwarded. Retry shortly.",
        ),
        _ => (403, "approval_required", "This request was not admitted."),
    }
}

/// Renders a refusal for request `request_id`.
pub fn render(r: &Refusal, request_id: &str) -> Rendered {
    render_stamped(r, request_id, None)
}

/// Renders a refusal; `stamp` (the request's mode and the policy version in force) fills
/// `details.mode` and `details.policy_version` of refusals that are not decisions (401, 400,
/// 413, 404, 502), so every error body has the same four details (a decision carries its own).
pub fn render_stamped(r: &Refusal, request_id: &str, stamp: Option<(Mode, u64)>) -> Rendered {
    let mut details = Map::new();
    let (status, code, message, verdict, retry_after): (u16, &'static str, String, Verdict, Option<u64>) = match r {
        Refusal::Unauthenticated(why) => {
            details.insert("reason".into(), json!(why));
            (
                401,
                "unauthenticated",
                match *why {
                    "invalid_tenant_id" => {
                        "The caller's tenant id is not valid: 1 to 128 visible ASCII characters, no spaces."
                    }
                    "duplicate_identity_header" => {
                        "The caller's identity is ambiguous: x-tenant-id, x-tenant-tier and x-user-id must each appear \
                         at most once (the authenticating gateway should replace them, not append)."
                    }
                    "duplicate_authorization_header" => {
                        "The caller's credentials are ambiguous: send exactly one Authorization: Bearer <tenant JWT>."
                    }
                    w if w.ends_with("_header") => {
                        "Missing caller identity: the x-tenant-id header (set by the authenticating gateway) is required."
                    }
                    _ => "Missing or invalid caller credentials: send Authorization: Bearer <tenant JWT>.",
                }
                .into(),
                Verdict::Deny,
                None,
            )
        }
        Refusal::InvalidRequest(why) => {
            details.insert("reason".into(), json!("invalid_request"));
            (400, "invalid_request", why.clone(), Verdict::Deny, None)
        }
        Refusal::TooLarge { limit } => {
            details.insert("reason".into(), json!("request_too_large"));
            details.insert("max_body_bytes".into(), json!(limit));
            (413, "request_too_large", format!("Request body is larger than {limit} bytes."), Verdict::Deny, None)
        }
        Refusal::RouteNotFound => {
            details.insert("reason".into(), json!("route_not_found"));
            (404, "route_not_found", "This path is not an LLM route served by this proxy.".into(), Verdict::Deny, None)
        }
        Refusal::Other { status, code, message } => {
            details.insert("reason".into(), json!(code));
            (*status, *code, message.clone(), Verdict::Deny, None)
        }
        Refusal::UpstreamUnavailable { admitted, timed_out } => {
            details.insert("reason".into(), json!("upstream_unavailable"));
            let message = if *timed_out {
                "The LLM gateway did not answer within PREAUTH_UPSTREAM_TIMEOUT_SECONDS. It had the request \
                 and may bill it: it is charged the estimated prompt, and should not be retried as is."
            } else {
                "The LLM gateway could not be reached or broke the protocol."
            };
            (502, "upstream_unavailable", message.into(), if *admitted { Verdict::Allow } else { Verdict::Deny }, None)
        }
        Refusal::Decision { decision, policy_version, extra } => {
            let (status, code, message) = decision_status(decision);
            details.insert("reason".into(), json!(decision.reason_label().unwrap_or("")));
            details.insert("decision".into(), json!(decision.verdict.as_str()));
            details.insert("mode".into(), json!(decision.mode.as_str()));
            details.insert("policy_version".into(), json!(policy_version));
            if let Some(gate) = decision.reason.and_then(|r| r.gate()) {
                details.insert("gate".into(), json!(gate.as_str()));
            }
            let retry = decision.retry_after_seconds.filter(|_| matches!(status, 429 | 503));
            if let Some(s) = decision.retry_after_seconds {
                details.insert("retry_after_seconds".into(), json!(s));
            }
            details.extend(extra.clone());
            // An `approval_required` for which no approval could be queued (the soft failsafe
            // path: approvals store or outbox unusable) has nothing to approve yet.
            let message = if code == "approval_required" && extra.get("approval_id") == Some(&Value::Null) {
                "This request needs an approval, but none could be queued (the sidecar cannot record \
                 decisions right now): send it again shortly, or have an operator mint an approval token \
                 (preauth-sidecar mint-approval) for the request_fingerprint in details."
            } else {
                message
            };
            (status, code, message.to_string(), decision.verdict, retry)
        }
    };
    if !matches!(r, Refusal::Decision { .. }) {
        details.insert("decision".into(), json!(verdict.as_str()));
        if let Some((mode, version)) = stamp {
            details.insert("mode".into(), json!(mode.as_str()));
            details.insert("policy_version".into(), json!(version));
        }
    }
    let body = json!({"error": {
        "message": message,
        "type": "preauth_error",
        "code": code,
        "id": request_id,
        "details": Value::Object(details),
    }});
    // A lasting refusal (the kill switch until an operator lifts it, a request larger than its
    // tenant's token rate) does not clear by waiting: its `Retry-After` is a polling hint, and an
    // SDK waiting it out twice would hang every caller for two minutes.
    let until_lifted = matches!(r, Refusal::Decision { decision, .. } if decision.lasting)
        || matches!(r, Refusal::UpstreamUnavailable { timed_out: true, .. });
    Rendered {
        status,
        code,
        verdict,
        retry_after,
        should_retry: if until_lifted { Some(false) } else { should_retry(status, retry_after) },
        body: Bytes::from(serde_json::to_vec(&body).expect("JSON value serialises")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::approval::ApprovalError;
    use crate::decide::{failsafe, kill_switch, Mode, Policy};

    fn parse(r: &Rendered) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn kill_switch_is_429_with_retry_after() {
        let mut p = Policy::for_test();
        p.kill_switch = true;
        let d = kill_switch(&p, Mode::Hard).unwrap();
        let r = render(&Refusal::Decision { decision: d, policy_version: 7, extra: Map::new() }, "rid");
        assert_eq!((r.status, r.code, r.retry_after), (429, "llm_fair_use_exceeded", Some(60)));
        assert_eq!(r.should_retry, Some(false), "lasts until lifted: SDKs must not wait it out twice");
        let v = parse(&r);
        assert_eq!(v["error"]["type"], "preauth_error");
        assert_eq!(v["error"]["id"], "rid");
        assert_eq!(v["error"]["details"]["reason"], "global_abuse_kill_switch");
        assert_eq!(v["error"]["details"]["policy_version"], 7);
        assert_eq!(v["error"]["details"]["decision"], "DENY");
    }

    #[test]
    fn failsafe_hard_is_503_retry_1() {
        let r =
            render(&Refusal::Decision { decision: failsafe(Mode::Hard), policy_version: 1, extra: Map::new() }, "x");
        assert_eq!((r.status, r.code, r.retry_after), (503, "enforcement_unavailable", Some(1)));
        let r =
            render(&Refusal::Decision { decision: failsafe(Mode::Soft), policy_version: 1, extra: Map::new() }, "x");
        assert_eq!((r.status, r.code, r.retry_after), (403, "approval_required", None));
    }

    /// The OpenAI and Anthropic SDKs retry every 429 (twice by default) after sleeping for the
    /// whole `Retry-After`, however long (openai-node 6, anthropic-python 2): a refusal that
    /// cannot clear within a minute must say `x-should-retry: false`, or the caller hangs for
    /// hours (soft daily cap: until UTC midnight).
    #[test]
    fn long_retry_after_tells_sdks_not_to_retry() {
        let deny = |reason, retry| Refusal::Decision {
            decision: crate::decide::violation(Mode::Hard, reason, Some(retry)),
            policy_version: 1,
            extra: Map::new(),
        };
        let r = render(&deny(Reason::FairUseSoftDaily, 2220), "x");
        assert_eq!((r.status, r.retry_after, r.should_retry), (429, Some(2220), Some(false)));
        let r = render(&deny(Reason::GlobalTemporalBlock, 61), "x");
        assert_eq!((r.status, r.should_retry), (429, Some(false)));
        let r = render(&deny(Reason::FairUsePerMinute, 60), "x");
        assert_eq!((r.status, r.retry_after, r.should_retry), (429, Some(60), Some(true)));
        let r =
            render(&Refusal::Decision { decision: failsafe(Mode::Hard), policy_version: 1, extra: Map::new() }, "x");
        assert_eq!((r.status, r.should_retry), (503, Some(true)));
    }

    /// The SDKs retry 409 ("lock timeout") by default; an expired or used approval token never
    /// becomes valid again, so these say `x-should-retry: false`.
    #[test]
    fn approval_token_conflicts_are_not_retried() {
        for e in [ApprovalError::Expired, ApprovalError::Replayed] {
            let d = crate::decide::token_refusal(Mode::Hard, e);
            let r = render(&Refusal::Decision { decision: d, policy_version: 1, extra: Map::new() }, "x");
            assert_eq!((r.status, r.should_retry), (409, Some(false)), "{}", r.code);
        }
    }

    #[test]
    fn plain_errors() {
        assert_eq!(render(&Refusal::Unauthenticated("missing_token"), "x").status, 401);
        assert_eq!(render(&Refusal::RouteNotFound, "x").code, "route_not_found");
        assert_eq!(render(&Refusal::TooLarge { limit: 10 }, "x").status, 413);
        assert_eq!(render(&Refusal::InvalidRequest("bad".into()), "x").status, 400);
        assert_eq!(render(&Refusal::UpstreamUnavailable { admitted: false, timed_out: false }, "x").status, 502);
        let timed_out = render(&Refusal::UpstreamUnavailable { admitted: true, timed_out: true }, "x");
        assert_eq!(
            (timed_out.status, timed_out.should_retry),
            (502, Some(false)),
            "sent again, the work is billed twice"
        );
    }

    #[test]
    fn every_error_body_carries_reason_decision_mode_and_policy_version() {
        for r in [
            Refusal::Unauthenticated("missing_bearer_token"),
            Refusal::RouteNotFound,
            Refusal::TooLarge { limit: 10 },
            Refusal::InvalidRequest("bad".into()),
            Refusal::UpstreamUnavailable { admitted: false, timed_out: false },
        ] {
            let v = parse(&render_stamped(&r, "x", Some((Mode::Soft, 9))));
            let d = &v["error"]["details"];
            assert!(d["reason"].is_string(), "{r:?}: {v}");
            assert_eq!(
                (&d["decision"], &d["mode"], &d["policy_version"]),
                (&json!("DENY"), &json!("soft"), &json!(9)),
                "{r:?}"
            );
        }
        // The gateway failing an admitted request is not a refusal: the answer keeps its ALLOW.
        let r = render(&Refusal::UpstreamUnavailable { admitted: true, timed_out: false }, "x");
        assert_eq!((r.status, r.verdict), (502, Verdict::Allow));
        assert_eq!(parse(&r)["error"]["details"]["decision"], json!("ALLOW"));
        // A decision keeps its own mode and version.
        let d = failsafe(Mode::Hard);
        let v = parse(&render_stamped(
            &Refusal::Decision { decision: d, policy_version: 3, extra: Map::new() },
            "x",
            Some((Mode::Soft, 9)),
        ));
        assert_eq!(
            (&v["error"]["details"]["mode"], &v["error"]["details"]["policy_version"]),
            (&json!("hard"), &json!(3))
        );
    }
}
