//! Admin routes over the approval queue (CONTRACT §8, §10): list, approve (returns a signed
//! single-use token), deny. Approving is refused while issuance is frozen (423) — the runbook's
//! key-compromise response — and for anything not pending (409 `approval_not_pending`).
//!
//! Owns: the handlers. Imports: state, store::approvals, decide::approval.

use serde_json::{json, Value};

use super::err;
use super::spend::{query_param, Answer};
use crate::decide::approval::{mint, MintRequest};
use crate::decide::time::rfc3339_seconds;
use crate::ledger::event::EventType;
use crate::state::AppState;
use crate::store::approvals::{ApprovalStatus, ApprovalTransitionError};

fn transition_error(e: ApprovalTransitionError) -> Answer {
    match e {
        ApprovalTransitionError::NotFound => err(404, "approval_not_found", "No such approval."),
        ApprovalTransitionError::NotPending(s) => err(
            409,
            "approval_not_pending",
            &format!("The approval is {}: only pending, unexpired approvals can be approved or denied.", s.as_str()),
        ),
        ApprovalTransitionError::Store(e) => err(503, "store_unavailable", &format!("{e}. Retry.")),
    }
}

/// `GET /api/v1/enforcement/approvals?status=pending&limit=200`.
pub async fn list(state: &AppState, query: &str) -> Answer {
    let status = match query_param(query, "status") {
        None | Some("") | Some("all") => None,
        Some(s) => match ApprovalStatus::parse(s) {
            Some(st) => Some(st),
            None => {
                return err(400, "invalid_request", "`status` must be pending, approved, denied, expired or consumed.")
            }
        },
    };
    let limit = match query_param(query, "limit").map(|l| l.parse::<usize>()) {
        None => 200,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => return err(400, "invalid_request", "`limit` must be an integer between 1 and 1000."),
    };
    // `tenant_id`: one tenant's approvals, among the newest 1,000 of the status asked for.
    let tenant = query_param(query, "tenant_id").map(crate::ledger::percent_decode).filter(|t| !t.is_empty());
    let now = state.clock.now_ms();
    let fetch = if tenant.is_some() { 1000 } else { limit };
    match state.approvals.list(status, now, fetch).await {
        Ok(items) => {
            let mine = |a: &&crate::store::approvals::Approval| tenant.as_deref().is_none_or(|t| a.tenant_id == t);
            let items: Vec<_> = items.iter().filter(mine).take(limit).map(|a| a.to_json(now)).collect();
            (200, json!({ "items": items }))
        }
        Err(e) => err(503, "store_unavailable", &format!("{e}. Retry.")),
    }
}

/// `POST /api/v1/enforcement/approvals/{id}/approve` → `{approval_token, expires_at}`.
pub async fn approve(state: &AppState, id: &str) -> Answer {
    if state.policy.current().approval_issuance_frozen {
        return err(
            423,
            "approval_issuance_frozen",
            "Approval issuance is frozen (ENFORCEMENT_APPROVAL_ISSUANCE_FROZEN / runtime approval_issuance_frozen): \
             no token is issued until it is lifted with PATCH /api/v1/enforcement/runtime \
             {\"approval_issuance_frozen\": false, \"reason\": \"…\"}.",
        );
    }
    let Some(secret) = state.config.approvals.secret.as_ref() else {
        return err(
            503,
            "approval_signing_unavailable",
            "No signing secret: set ENFORCEMENT_APPROVAL_TOKEN_SECRET (at least 32 characters) to issue approval tokens.",
        );
    };
    let now = state.clock.now_ms();
    let a = match state.approvals.approve(id, now).await {
        Ok(a) => a,
        Err(e) => return transition_error(e),
    };
    let cfg = &state.config.approvals;
    let req = MintRequest {
        issuer: &cfg.issuer,
        tenant_id: &a.tenant_id,
        approval_id: &a.approval_id,
        request_fingerprint: &a.request_fingerprint,
        max_cost: a.estimated_cost,
        now_s: (now / 1000) as i64,
        ttl_seconds: cfg.ttl_seconds,
    };
    if let Err(field) = req.validate() {
        return err(500, "approval_invalid", &format!("The approval cannot be turned into a token ({field})."));
    }
    let token = mint(&req, secret.expose().as_bytes(), cfg.kid.as_deref());
    let expires_at = rfc3339_seconds(req.claims().expires_at_ms());
    state.metrics.approval_token_events.with_label_values(&["issued"]).inc();
    state.metrics.approval_queue_backlog.dec();
    let mut e = state.event(EventType::ApprovalGranted, state.policy.current().version);
    e.tenant_id = Some(a.tenant_id.clone().into());
    e.tenant_tier = Some(a.tenant_tier.clone().into());
    e.request_id = Some(a.request_id.clone().into());
    e.model = Some(a.model.clone().into());
    e.approval_id = Some(a.approval_id.clone());
    e.request_fingerprint = Some(a.request_fingerprint.clone());
    e.estimated_cost_usd = Some(a.estimated_cost);
    state.emit(&e);
    tracing::warn!(target: "audit", event = "approval_granted", approval_id = %a.approval_id, tenant_id = %a.tenant_id, max_cost_usd = %a.estimated_cost);
    (200, json!({"approval_id": a.approval_id, "approval_token": token, "expires_at": expires_at}))
}

/// `POST /api/v1/enforcement/approvals/{id}/deny` `{reason?}`.
pub async fn deny(state: &AppState, id: &str, body: &Value) -> Answer {
    let reason = body.get("reason").and_then(Value::as_str);
    let now = state.clock.now_ms();
    match state.approvals.deny(id, reason, now).await {
        Ok(a) => {
            state.metrics.approval_queue_backlog.dec();
            let mut e = state.event(EventType::ApprovalDenied, state.policy.current().version);
            e.tenant_id = Some(a.tenant_id.clone().into());
            e.tenant_tier = Some(a.tenant_tier.clone().into());
            e.request_id = Some(a.request_id.clone().into());
            e.model = Some(a.model.clone().into());
            e.approval_id = Some(a.approval_id.clone());
            e.request_fingerprint = Some(a.request_fingerprint.clone());
            e.estimated_cost_usd = Some(a.estimated_cost);
            e.details = Some(json!({"reason": reason}));
            state.emit(&e);
            tracing::warn!(target: "audit", event = "approval_denied", approval_id = %a.approval_id, tenant_id = %a.tenant_id, reason = reason.unwrap_or(""));
            (200, a.to_json(now))
        }
        Err(e) => transition_error(e),
    }
}
