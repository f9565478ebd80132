//! The gate API on the proxy listener (CONTRACT §8, §10), for gateways that call out instead of
//! proxying: `POST /api/v1/enforcement/gate/llm` decides — same steps, metrics and audit as the
//! proxy path — and holds a reservation on ALLOW; `POST /api/v1/enforcement/reservations/{id}/settle`
//! lets the caller settle its own hold. Identity is the caller's, as for LLM calls.
//!
//! Owns: `GateRoute`, `PreauthProxy::serve_gate`. Imports: proxy internals, decide, store::budget.

use http::Method;
use pingora::prelude::*;
use serde_json::{json, Value};

use super::downstream::Downstream;
use super::respond::Refusal;
use super::{PreauthProxy, RequestCtx};
use crate::decide::pricing::cost;
use crate::decide::usage_types::Usage;
use crate::decide::{Micros, Route};
use crate::ledger::event::EventType;
use crate::store::budget::{ReservationState, SettleOutcome};

/// Largest gate-API body read (the embedded request plus a little).
const MAX_GATE_BODY: u64 = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateRoute {
    Decide,
    Settle(String),
}

impl GateRoute {
    pub fn parse(method: &Method, path: &str) -> Option<GateRoute> {
        if method != Method::POST {
            return None;
        }
        if path == "/api/v1/enforcement/gate/llm" {
            return Some(GateRoute::Decide);
        }
        let id = path.strip_prefix("/api/v1/enforcement/reservations/")?.strip_suffix("/settle")?;
        (!id.is_empty() && !id.contains('/')).then(|| GateRoute::Settle(id.to_string()))
    }
}

fn other(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal::Other { status, code, message: message.into() }
}

impl PreauthProxy {
    /// Answers a gate-API call completely (the caller already passed identity).
    pub(super) async fn serve_gate<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut RequestCtx,
        route: GateRoute,
    ) -> Result<()> {
        let limit = self.state.config.max_body_bytes.min(MAX_GATE_BODY);
        let Some(body) = d.read_body(limit).await? else {
            return self.respond(d, ctx, &self.refusal(&Refusal::TooLarge { limit }, ctx)).await;
        };
        let answer = match route {
            GateRoute::Decide => self.gate_decide(ctx, &body).await,
            GateRoute::Settle(id) => self.gate_settle(ctx, &id, &body).await,
        };
        // A hold's lease is parked before the caller hears of the hold: it may settle at once, on
        // any replica, and that must find the lease to give back.
        self.conclude(ctx).await;
        match answer {
            Ok(v) => {
                let body = serde_json::to_vec(&v).expect("JSON value serialises");
                // As on the proxy path: an ALLOW that holds a reservation names it.
                let (headers, n) = super::json_headers(ctx, ctx.verdict, None, None, ctx.reservation_id());
                d.answer(200, &headers[..n], &body).await
            }
            Err(refusal) => self.respond(d, ctx, &self.refusal(&refusal, ctx)).await,
        }
    }

    /// `{"route": "/v1/chat/completions", "request": {...}}` → the decision, HTTP 200 for every
    /// decision. The fingerprint hashes `request` as compact JSON with sorted keys, written as
    /// Python's `json.dumps(request, sort_keys=True, separators=(",", ":"))` writes it
    /// (non-ASCII escaped), so clients of the reference control plane's language match it.
    async fn gate_decide(&self, ctx: &mut RequestCtx, body: &[u8]) -> std::result::Result<Value, Refusal> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| Refusal::InvalidRequest(format!("Gate body is not valid JSON: {e}")))?;
        // `route` may be left out (chat completions); given, it must name a route.
        let path = match v.get("route") {
            None => "/v1/chat/completions",
            Some(r) => r.as_str().ok_or_else(|| {
                Refusal::InvalidRequest(
                    "`route` must be the LLM route as a string, e.g. \"/v1/chat/completions\".".into(),
                )
            })?,
        };
        let route = Route::from_path(path)
            .ok_or_else(|| Refusal::InvalidRequest(format!("`route` `{path}` is not an inspected LLM route.")))?;
        let request = v.get("request").filter(|r| r.is_object()).ok_or_else(|| {
            Refusal::InvalidRequest("`request` must be the LLM request body (a JSON object).".to_string())
        })?;
        // Compact, sorted keys, as Python's `json.dumps(…, sort_keys=True, separators=(",", ":"))`.
        let mut canonical = Vec::with_capacity(body.len());
        crate::jsonw::canonical(request, &mut canonical);
        ctx.route = Some(route);
        ctx.gate = true;
        let outcome = self.decide_body(ctx, &canonical).await;
        let fingerprint = ctx.fingerprint.clone().unwrap_or_else(|| {
            super::fingerprint(ctx.caller.as_ref().map_or("", |c| &*c.tenant), "POST", route.path(), &canonical)
        });
        let reservation = ctx.spend.as_ref().and_then(|s| s.reservation.as_ref());
        match outcome {
            Ok(()) | Err(Refusal::Decision { .. }) => Ok(json!({
                "decision": ctx.verdict.map(|v| v.as_str()),
                "reasons": ctx.reason_label.map(|r| vec![r]).unwrap_or_default(),
                "request_id": ctx.request_id,
                "reservation_id": reservation.map(|r| r.id.clone()),
                "estimated_cost_usd": ctx.estimated_cost.map(|c| c.to_string()),
                "approval_id": ctx.approval_id,
                "request_fingerprint": fingerprint,
                "mode": ctx.mode.map(|m| m.as_str()),
                "policy_version": ctx.policy_version,
            })),
            Err(other) => Err(other),
        }
    }

    /// `{"usage": {...}}` or `{"actual_cost_usd": "…"}` → the settlement of the caller's own hold.
    async fn gate_settle(&self, ctx: &mut RequestCtx, id: &str, body: &[u8]) -> std::result::Result<Value, Refusal> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| Refusal::InvalidRequest(format!("Settle body is not valid JSON: {e}")))?;
        let tenant = ctx.caller.as_ref().map(|c| c.tenant.to_string()).unwrap_or_default();
        let not_found = || other(404, "reservation_not_found", "No such reservation for this tenant.");
        let _turn = self.state.settlement_turn(id).await;
        let reservation = match self.state.budgets.get(id).await {
            Ok(Some((r, ReservationState::Active))) => r,
            Ok(Some((r, _))) if *r.tenant == *tenant => {
                return Err(other(409, "reservation_not_active", "This reservation was already settled or released."))
            }
            Ok(Some(_)) => return Err(not_found()),
            Ok(None) => return Err(not_found()),
            Err(e) => {
                self.store_failed("get_reservation", e);
                return Err(other(503, "enforcement_unavailable", "The reservation could not be read. Retry."));
            }
        };
        if *reservation.tenant != *tenant {
            return Err(not_found());
        }
        let pricing = self.state.pricing();
        let price = pricing.lookup(&reservation.model);
        let (actual, usage) = if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let field = |k: &str| match u.get(k) {
                None | Some(Value::Null) => Some(0),
                Some(n) => n.as_u64().filter(|n| *n <= Usage::MAX_PLAUSIBLE_TOKENS),
            };
            let counts = ["prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"].map(field);
            let [Some(prompt_tokens), Some(completion_tokens), Some(cached_tokens), Some(reasoning_tokens)] = counts
            else {
                return Err(Refusal::InvalidRequest(format!(
                    "`usage` token counts must be integers from 0 to {}.",
                    Usage::MAX_PLAUSIBLE_TOKENS
                )));
            };
            let usage = Usage { prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens };
            (cost(price.price, &usage), Some(usage))
        } else if let Some(a) = v.get("actual_cost_usd") {
            let text = a.as_str().map(str::to_string).unwrap_or_else(|| a.to_string());
            let amount = Micros::from_usd_str(&text).ok().filter(|m| m.0 >= 0).ok_or_else(|| {
                Refusal::InvalidRequest("`actual_cost_usd` must be a non-negative decimal like \"0.012500\".".into())
            })?;
            (amount, None)
        } else {
            return Err(Refusal::InvalidRequest(
                "Send `usage` {prompt_tokens, completion_tokens, …} or `actual_cost_usd`.".into(),
            ));
        };
        let now = self.state.clock.now_ms();
        let m = &self.state.metrics;
        let mut e = self.state.reservation_event(&reservation, EventType::ReservationSettled);
        e.actual_cost_usd = Some(actual);
        e.drift_usd = Some(Micros(actual.0 - reservation.amount.0));
        e.usage = usage;
        e.usage_source = Some(if usage.is_some() { "reported" } else { "caller" }.to_string().into());
        e.details = Some(json!({"trigger": "gate_settle"}));
        if !self.state.emit(&e) {
            return Err(other(503, "enforcement_unavailable", "The settlement could not be recorded. Retry."));
        }
        let settled = self.state.budgets.settle(id, actual, now).await;
        self.state.group.flush(); // written before the caller hears of it
        match settled {
            Ok(SettleOutcome::Settled(s)) => {
                self.state.release_gate_lease(&s.tenant, id).await;
                m.record_settlement("usage", s.drift);
                self.state.record_spend_of(&reservation.tenant_tier, &reservation.model, actual);
                Ok(json!({
                    "reservation_id": id,
                    "actual_cost_usd": s.actual,
                    "reserved_usd": s.reserved,
                    "drift_usd": s.drift,
                    "released_usd": s.released,
                    "usage": usage,
                }))
            }
            Ok(SettleOutcome::NotActive) => {
                Err(other(409, "reservation_not_active", "This reservation was already settled or released."))
            }
            Ok(SettleOutcome::NotFound) => Err(not_found()),
            Err(e) => {
                self.store_failed("settle", e);
                Err(other(503, "enforcement_unavailable", "The settlement could not be recorded. Retry."))
            }
        }
    }
}
