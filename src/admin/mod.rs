//! The admin listener (`PREAUTH_ADMIN_ADDR`, loopback by default). Endpoints:
//!
//! | method | path | auth |
//! |---|---|---|
//! | GET | `/healthz` | none — the process is up |
//! | GET | `/readyz` | none — 503 until started, while the state store fails, and during shutdown |
//! | GET | `/metrics` | none — Prometheus text |
//! | GET | `/api/v1/enforcement/runtime` | bearer `ADMIN_API_KEY` |
//! | PATCH | `/api/v1/enforcement/runtime` | bearer — applies at once, bumps `policy_version`, `reason` required |
//! | GET | `/api/v1/enforcement/tenants/{id}` | bearer — tier, budget, spend, reserved, counters |
//! | GET | `/api/v1/enforcement/reservations?active=true` | bearer — `{"items": [...]}`, oldest first |
//! | POST | `/api/v1/enforcement/reservations/{id}/reconcile` | bearer — settle by hand, idempotent by key |
//! | POST | `/api/v1/enforcement/reservations/reconcile-overdue` | bearer — run the TTL sweep now |
//! | GET | `/api/v1/enforcement/approvals?status=pending` | bearer — the approval queue |
//! | GET | `/api/v1/enforcement/ledger?limit=&start_at=&end_at=&tenant_id=&event_type=&reservation_id=` | bearer — newest first |
//! | POST | `/api/v1/enforcement/approvals/{id}/approve` | bearer — `{approval_token, expires_at}`; 423 while frozen |
//! | POST | `/api/v1/enforcement/approvals/{id}/deny` | bearer — `{reason?}` |
//! | POST | `/api/v1/enforcement/reload` | bearer — re-reads the tenants, tiers and pricing files as `SIGHUP` does, answers once they apply |
//!
//! Without `ADMIN_API_KEY` every authenticated route answers 403 `admin_disabled`: mutating
//! routes are off unless configured.
//!
//! Owns: `AdminApp`. Imports: state, store traits, telemetry, `admin::runtime`, the reloader.

pub mod approvals;
pub mod runtime;
pub mod spend;

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::state::AppState;

/// Largest admin request body accepted.
const MAX_ADMIN_BODY: usize = 64 * 1024;

pub struct AdminApp {
    state: Arc<AppState>,
    reconciles: spend::ReconcileMemo,
}

impl AdminApp {
    pub fn new(state: Arc<AppState>) -> AdminApp {
        AdminApp { state, reconciles: spend::ReconcileMemo::default() }
    }

    /// Authenticated routes under `/api/v1/enforcement/` other than `runtime`.
    async fn enforcement(&self, s: &mut ServerSession, method: &Method, rest: &str, query: &str) -> Response<Vec<u8>> {
        // Ids are percent-decoded per segment: tenant ids may hold `/`, `?`, `%` or `#`
        // (`/tenants/org%2F1` is tenant `org/1`), as the query parameters are decoded.
        let decoded: Vec<String> = rest.split('/').map(crate::ledger::percent_decode_path).collect();
        let parts: Vec<&str> = decoded.iter().map(String::as_str).collect();
        let (status, body) = match (method, parts.as_slice()) {
            (&Method::GET, ["tenants", id]) if !id.is_empty() => spend::tenant(&self.state, id).await,
            (&Method::GET, ["reservations"]) => spend::list(&self.state, query).await,
            (&Method::GET, ["approvals"]) => approvals::list(&self.state, query).await,
            (&Method::GET, ["ledger"]) => match crate::ledger::LedgerFilter::from_query(query) {
                Ok(f) => match self.state.ledger.query(&f).await {
                    Ok(items) => (200, json!({ "items": items })),
                    Err(e) => err(503, "ledger_unavailable", &format!("The ledger could not be read: {e}. Retry.")),
                },
                Err(e) => err(400, "invalid_request", &e),
            },
            (&Method::POST, ["reload"]) => {
                let reloader = crate::worker::Reloader { state: self.state.clone() };
                match reloader.reload_and_count("admin API").await {
                    Ok(warnings) => {
                        let mut body = json!({"reloaded": reloader.files(),
                                              "policy_version": self.state.policy.current().version,
                                              "scope": "replica"});
                        if !warnings.is_empty() {
                            body["warnings"] = json!(warnings);
                        }
                        (200, body)
                    }
                    Err(e) => {
                        err(400, "reload_failed", &format!("Nothing was reloaded, the previous tables stay: {e}"))
                    }
                }
            }
            (&Method::POST, ["approvals", id, "approve"]) => approvals::approve(&self.state, id).await,
            (&Method::POST, ["approvals", id, "deny"]) => match read_json(s).await {
                Ok(v) => approvals::deny(&self.state, id, &v).await,
                Err(r) => return r,
            },
            (&Method::POST, ["reservations", "reconcile-overdue"]) => match read_json(s).await {
                Ok(v) => spend::reconcile_overdue(&self.state, &v).await,
                Err(r) => return r,
            },
            (&Method::POST, ["reservations", id, "reconcile"]) => {
                // An `Idempotency-Key` header wins over the body's `idempotency_key` (as in the
                // reference system, whose clients send either).
                let header_key =
                    s.req_header().headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string);
                match read_json(s).await {
                    Ok(mut v) => {
                        if let (Some(k), Some(o)) = (header_key, v.as_object_mut()) {
                            o.insert("idempotency_key".into(), Value::String(k));
                        }
                        spend::reconcile(&self.state, &self.reconciles, id, &v).await
                    }
                    Err(r) => return r,
                }
            }
            _ => return admin_error(404, "not_found", "No such admin route."),
        };
        json_response(status, &body)
    }
}

/// Reads a JSON object body (an empty body is `{}`).
async fn read_json(s: &mut ServerSession) -> Result<Value, Response<Vec<u8>>> {
    let body = read_body(s).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(admin_error(400, "invalid_request", "Body must be a JSON object.")),
    }
}

/// `v` as the answer; an error (see [`error_body`]) also carries `x-preauth-error` and
/// `x-preauth-request-id`, as the proxy listener's do.
fn json_response(status: u16, v: &Value) -> Response<Vec<u8>> {
    let body = serde_json::to_vec(v).expect("JSON value serialises");
    let mut r = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .header("content-length", body.len());
    let error = &v["error"];
    if let (Some(code), Some(id)) = (error["code"].as_str(), error["id"].as_str()) {
        r = r.header("x-preauth-error", code).header("x-preauth-request-id", id);
    }
    r.body(body).expect("static response parts are valid")
}

/// An admin error in the error shape of the proxy listener (CONTRACT §3): `type`
/// `preauth_error`, an `id` of its own (admin requests have no other), empty `details`.
pub fn error_body(code: &str, message: &str) -> Value {
    json!({"error": {"message": message, "type": "preauth_error", "code": code, "id": crate::ids::v7(), "details": {}}})
}

/// An admin handler's error answer ([`error_body`] with its status).
pub(crate) fn err(status: u16, code: &str, message: &str) -> spend::Answer {
    (status, error_body(code, message))
}

fn admin_error(status: u16, code: &str, message: &str) -> Response<Vec<u8>> {
    json_response(status, &error_body(code, message))
}

/// Constant-time equality of two byte strings (length may leak, content does not).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_body(s: &mut ServerSession) -> Result<Vec<u8>, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match s.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ADMIN_BODY {
                    return Err(admin_error(413, "request_too_large", "Admin request bodies are limited to 64 KiB."));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(_) => return Err(admin_error(400, "invalid_request", "Could not read the request body.")),
        }
    }
}

impl AdminApp {
    fn authorize(&self, s: &ServerSession) -> Result<(), Box<Response<Vec<u8>>>> {
        let Some(key) = &self.state.config.admin_api_key else {
            return Err(Box::new(admin_error(
                403,
                "admin_disabled",
                "The admin API is disabled: set ADMIN_API_KEY to enable it.",
            )));
        };
        let given = s
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            // The scheme is case-insensitive (RFC 9110 §11.1): `bearer KEY` is the same key.
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, k)| k.trim())
            .unwrap_or("");
        if ct_eq(given.as_bytes(), key.expose().as_bytes()) {
            Ok(())
        } else {
            Err(Box::new(admin_error(
                401,
                "unauthorized",
                "Missing or wrong admin key: send Authorization: Bearer $ADMIN_API_KEY.",
            )))
        }
    }

    async fn patch_runtime(&self, s: &mut ServerSession) -> Response<Vec<u8>> {
        let body = match read_body(s).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let Ok(Value::Object(mut patch)) = serde_json::from_slice::<Value>(&body) else {
            return admin_error(
                400,
                "invalid_request",
                "Body must be a JSON object of runtime settings plus `reason`.",
            );
        };
        let reason =
            match patch.remove("reason") {
                Some(Value::String(r)) if !r.trim().is_empty() && r.len() <= 1000 => r,
                Some(Value::String(r)) if r.len() > 1000 => return admin_error(
                    400,
                    "invalid_request",
                    "`reason` is at most 1000 bytes: a short sentence (an incident id and why), kept with the change.",
                ),
                _ => {
                    return admin_error(
                        400,
                        "invalid_request",
                        "`reason` is required: say why this change is made (it is logged and kept with the change).",
                    )
                }
            };
        if patch.is_empty() {
            return admin_error(400, "invalid_request", "No setting to change: name at least one runtime setting.");
        }
        let mut probe = (*self.state.policy.current()).clone();
        if let Err(e) = runtime::apply_patch(&mut probe, &patch) {
            return admin_error(400, "invalid_request", &e);
        }
        let changes = Value::Object(patch.clone());
        let global_changed = runtime::changes_global_guard(&patch);
        let asked_off: Vec<&'static str> = ["kill_switch", "approval_issuance_frozen"]
            .into_iter()
            .filter(|k| patch.get(*k) == Some(&Value::Bool(false)))
            .collect();
        let applied = self
            .state
            .policy
            .update(Box::new(move |p| {
                runtime::apply_patch(p, &patch).expect("patch validated above");
            }))
            .await;
        match applied {
            Ok(p) => {
                let m = &self.state.metrics;
                m.policy_version.set(p.version as i64);
                m.kill_switch_enabled.set(i64::from(p.kill_switch));
                // A block in force was tripped under the guard settings just replaced: it is
                // lifted, and the next request is judged by the new settings.
                let lifted = match global_changed {
                    false => Ok(false),
                    true => {
                        // Here at once, whether or not the store can be told.
                        self.state.forget_global_block();
                        self.state.counters.clear_global_block().await
                    }
                };
                if let Ok(true) = lifted {
                    m.global_block_active.set(0);
                }
                let mut extra = serde_json::Map::new();
                extra.insert("global_block_lifted".into(), json!(lifted.as_ref().is_ok_and(|l| *l)));
                let unshared = self.state.policy.unshared();
                if unshared {
                    extra.insert("scope".into(), json!("replica"));
                }
                self.state.record_runtime_change(p.version, &reason, changes, extra);
                let mut warnings = Vec::new();
                if unshared {
                    warnings.push(
                        "The state store is unavailable: this change applies to this replica only until the store \
                         answers again, then it is written for the whole fleet. Until then, send it to every replica."
                            .to_string(),
                    );
                }
                let lagging = self.state.policy.lagging();
                if lagging > 0 {
                    warnings.push(format!(
                        "{lagging} replica(s) still ran an older policy after 1 s (slow or cut from the state store): \
                         they adopt this one within 2 s of reaching it; check their /readyz."
                    ));
                }
                let view = runtime::view(&p);
                for k in asked_off {
                    if view[k] == Value::Bool(true) {
                        warnings.push(format!(
                            "`{k}` stays on for this replica: its environment sets it (a kill switch or approval \
                             freeze in the environment always applies); remove the variable and restart to turn it off."
                        ));
                    }
                    let elsewhere = self.state.policy.pinned_elsewhere(k);
                    if elsewhere > 0 {
                        warnings.push(format!(
                            "`{k}` stays on for {elsewhere} other replica(s): their environment sets it (GET \
                             /api/v1/enforcement/runtime on each shows it); remove the variable there and restart them."
                        ));
                    }
                }
                let answer = |status: u16, warnings: &[String]| {
                    let mut body = view.clone();
                    if !warnings.is_empty() {
                        body["warnings"] = json!(warnings);
                    }
                    json_response(status, &body)
                };
                match lifted {
                    // 202: accepted here, not yet for the fleet.
                    Ok(_) => answer(if unshared { 202 } else { 200 }, &warnings),
                    // The store is down: the change stands here (202); the block is lifted by the
                    // same PATCH sent again once the store answers.
                    Err(e) if unshared => {
                        warnings.push(format!(
                            "The global block no longer applies on this replica; the fleet's (kept in the state \
                             store) could not be lifted ({e}): send this PATCH again once the state store answers."
                        ));
                        answer(202, &warnings)
                    }
                    Err(e) => admin_error(
                        503,
                        "store_unavailable",
                        &format!(
                            "The change was applied (policy_version {}), but the global block in force could not be lifted: {e}. Send the PATCH again.",
                            p.version
                        ),
                    ),
                }
            }
            Err(e) => admin_error(503, "store_unavailable", &format!("The change was not applied: {e}. Retry.")),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, s: &mut ServerSession) -> Response<Vec<u8>> {
        let method = s.req_header().method.clone();
        let path = s.req_header().uri.path().to_string();
        let query = s.req_header().uri.query().unwrap_or("").to_string();
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => json_response(200, &json!({"status": "ok"})),
            (Method::GET, "/readyz") => {
                if self.state.is_ready() {
                    json_response(200, &json!({"status": "ready"}))
                } else {
                    json_response(503, &json!({"status": "not_ready"}))
                }
            }
            (Method::GET, "/metrics") => {
                let body = self.state.metrics.encode();
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "text/plain; version=0.0.4")
                    .header("content-length", body.len())
                    .body(body)
                    .expect("static response parts are valid")
            }
            (m, "/api/v1/enforcement/runtime") => {
                if let Err(r) = self.authorize(s) {
                    return *r;
                }
                match m {
                    Method::GET => json_response(200, &runtime::view(&self.state.policy.current())),
                    Method::PATCH => self.patch_runtime(s).await,
                    _ => admin_error(405, "method_not_allowed", "Use GET or PATCH."),
                }
            }
            (m, p) if p.starts_with("/api/") => {
                if let Err(r) = self.authorize(s) {
                    return *r;
                }
                match p.strip_prefix("/api/v1/enforcement/") {
                    Some(rest) => self.enforcement(s, &m, rest, &query).await,
                    None => admin_error(404, "not_found", "No such admin route."),
                }
            }
            _ => admin_error(404, "not_found", "No such admin route."),
        }
    }
}
