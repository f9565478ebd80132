//! The proxy glue: the only code that touches a downstream session. Per inspected request it
//! extracts facts (identity, body), asks `decide`, acts on the store (admit/rollback/lease
//! release), answers refusals through the one table in `respond`, and forwards the rest.
//!
//! Two drivers run the same phases (methods on `PreauthProxy`, over the `Downstream` trait):
//! the sidecar's own HTTP/1 driver in `h1` (every HTTP/1.x connection), and pingora's
//! `ProxyHttp` below (h2c).
//! - `inspect`: route, identity, size; reads the body and decides before any upstream contact
//!   (`h1`: every body; pingora: bodies with `Content-Length` ≤ 64 KiB). `Ok(true)` = answered.
//!   The decision's hold and event are group-committed (`crate::commit`) before it is acted on.
//! - `replaced_upstream` / `own_upstream_headers`: credentials, `accept-encoding` removed, host,
//!   request id (`rewrite_upstream` applies them, with framing, to pingora's header).
//! - pingora only, `request_body_filter`: swaps in a rewritten body; for deferred bodies (no
//!   length or larger than 64 KiB) holds every chunk back and decides at end of body — the
//!   upstream has the headers then, but no body byte reaches it unless the request is admitted.
//! - `on_upstream_response`, `response_headers` (`x-preauth-*`), `on_response_chunk` (usage, the
//!   overall deadline). `failure_answer`: deferred refusals, 400 and 502.
//! - `finish`: settles, releases the concurrency lease (completion, error or client
//!   disconnect), counts, commits the settlement.
//!
//! Imports: decide, store traits, telemetry, state, config. Nothing imports this but `server`.

pub mod ctx;
pub mod downstream;
pub mod extract;
pub mod gate;
pub mod h1;
pub mod respond;
pub mod spend;
pub mod strip;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::proxy::FailToProxy;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::config::Identity;
use crate::decide::approval::{self, ApprovalClaims, ApprovalError};
use crate::decide::pricing::{max_output_that_fits, worst_case_cost};
use crate::decide::{self, estimate, Decision, Facts, Micros, Mode, Policy, Reason, Route, UnixMillis, Verdict};
use crate::ledger::event::{self, EventType};
use crate::state::AppState;
use crate::store::approvals::{ConsumeOutcome, NewApproval};
use crate::store::budget::{ReserveOutcome, ReserveRequest};
use crate::store::{AdmitRequest, StoreError, Ticket};
use crate::telemetry::audit;
pub use ctx::RequestCtx;
use downstream::Downstream;
use extract::names;
use respond::{render_stamped, Refusal, Rendered};
use spend::SpendCtx;

/// The message of the 400 for a request that is not valid HTTP.
const MALFORMED: &str = "Malformed HTTP request.";

/// What pingora can buffer before connecting upstream (`BODY_BUF_LIMIT` in pingora-core 0.9).
pub const RETRY_BUFFER_LIMIT: u64 = 64 * 1024;

/// The proxy service. Cloning shares everything (state, token cache): the lean HTTP/1 driver
/// (`h1`) and pingora's proxy each hold one.
#[derive(Clone)]
pub struct PreauthProxy {
    state: Arc<AppState>,
    pub(crate) upstream_addr: SocketAddr,
    pub(crate) upstream_tls: bool,
    upstream_sni: String,
    upstream_host_header: String,
    /// `Bearer <PREAUTH_UPSTREAM_API_KEY>`, formatted once.
    upstream_bearer: Option<String>,
    tokens: Arc<extract::VerifiedTokens>,
}

/// Distinct bearer tokens whose verification is remembered (~300 B each).
const VERIFIED_TOKENS: usize = 4096;

impl PreauthProxy {
    pub fn new(state: Arc<AppState>, upstream_addr: SocketAddr, tls: bool, host: &str, port: u16) -> PreauthProxy {
        let default_port = if tls { 443 } else { 80 };
        let host_header = if port == default_port { host.to_string() } else { format!("{host}:{port}") };
        let upstream_bearer = state.config.upstream_api_key.as_ref().map(|k| format!("Bearer {}", k.expose()));
        PreauthProxy {
            state,
            upstream_addr,
            upstream_tls: tls,
            upstream_sni: host.to_string(),
            upstream_host_header: host_header,
            upstream_bearer,
            tokens: Arc::new(extract::VerifiedTokens::new(VERIFIED_TOKENS)),
        }
    }

    /// Writes a sidecar-made error response.
    async fn respond<D: Downstream>(&self, d: &mut D, ctx: &RequestCtx, r: &Rendered) -> Result<()> {
        self.respond_naming(d, ctx, r, ctx.reservation_id()).await
    }

    /// [`Self::respond`] naming `hold`, the request's reservation (settled already, so no longer
    /// in `ctx`), when the answer is an `ALLOW` (a 502 for an admitted request).
    async fn respond_naming<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &RequestCtx,
        r: &Rendered,
        hold: Option<&str>,
    ) -> Result<()> {
        let mut retry = itoa::Buffer::new();
        let retry = r.retry_after.map(|s| retry.format(s));
        let (mut headers, mut n) = json_headers(ctx, Some(r.verdict), Some(r.code), retry, hold);
        // An admitted request that used its approval token up and then failed (the gateway
        // unreachable): an SDK retry would only meet `approval_token_replayed`.
        let used_token = r.verdict == Verdict::Allow && ctx.approval_id.is_some();
        if let Some(retry) = r.should_retry.or(used_token.then_some(false)) {
            headers[n] = ("x-should-retry", if retry { "true" } else { "false" });
            n += 1;
        }
        d.answer(r.status, &headers[..n], &r.body).await
    }

    /// The error answer for `r`, its details stamped with the request's mode (from its
    /// `x-preauth-source`) and the policy version in force.
    pub(crate) fn refusal(&self, r: &Refusal, ctx: &RequestCtx) -> Rendered {
        let policy = self.state.policy.current();
        let mode = policy.mode_for(policy.source_of(ctx.source_header.as_deref()));
        render_stamped(r, &ctx.request_id, Some((mode, policy.version)))
    }

    /// [`Self::refusal`] of an inspected request's body (`body`: as read, when it was). A body
    /// refused before the policy steps (413, 400: CONTRACT §3 step 2) is a decision of its own
    /// and gets its `decision` event (§7: every decision produces one), the refusal's code as its
    /// reason; later refusals are decisions recorded by `decide_body`. An unauthenticated
    /// request (401) is not recorded: it names no tenant, and anyone could fill the ledger.
    fn body_refusal(&self, r: &Refusal, ctx: &RequestCtx, body: Option<&[u8]>) -> Rendered {
        let rendered = self.refusal(r, ctx);
        if let (Refusal::TooLarge { .. } | Refusal::InvalidRequest(_), Some(caller), Some(route)) =
            (r, ctx.caller.as_ref(), ctx.route)
        {
            let policy = self.state.policy.current();
            let source = policy.source_of(ctx.source_header.as_deref());
            let tier = policy.limits(&caller.tenant).tier(caller.claimed_tier.as_deref());
            let mut e = self.state.event(EventType::Decision, policy.version);
            e.request_id = Some(ctx.request_id.clone());
            e.tenant_id = Some(caller.tenant.clone());
            e.tenant_tier = Some(event::label(tier.as_str()));
            e.mode = Some(event::label(policy.mode_for(source).as_str()));
            e.source = Some(source.into());
            e.decision = Some(event::label(Verdict::Deny.as_str()));
            e.reasons = vec![rendered.code.to_string()];
            e.reserved_usd = Some(Micros::ZERO);
            e.request_fingerprint = body.map(|b| fingerprint(&caller.tenant, "POST", route.path(), b));
            self.state.emit(&e);
        }
        rendered
    }

    fn now_s(&self) -> i64 {
        (self.state.clock.now_ms() / 1000) as i64
    }

    /// The JSON 400 for a request whose head could not be parsed (no request to route).
    pub(crate) fn malformed(&self) -> (RequestCtx, Rendered) {
        let ctx = RequestCtx::new();
        let r = self.refusal(&Refusal::InvalidRequest(MALFORMED.into()), &ctx);
        (ctx, r)
    }

    /// Steps 2–9 for a complete body. `Ok(())` = admitted (body rewrite in `ctx.new_body`, the
    /// hold in `ctx.spend`).
    async fn decide_body(&self, ctx: &mut RequestCtx, body: &[u8]) -> std::result::Result<(), Refusal> {
        let route = ctx.route.expect("only inspected routes carry a body decision");
        let req = extract::parse_body(route, body).map_err(Refusal::InvalidRequest)?;
        // Everything this decision stages (hold, events) is committed before it is acted on.
        let since = self.state.group.mark();
        let caller = ctx.caller.clone().expect("identity checked before the body");
        let policy = self.state.policy.current();
        let source = match policy.source_of(ctx.source_header.as_deref()) {
            "default" => event::label("default"),
            named => named.into(),
        };
        let mode = policy.mode_for(&source);
        let limits = policy.limits(&caller.tenant);
        let tier = limits.tier(caller.claimed_tier.as_deref());
        self.state.note_tier(&caller.tenant, tier);
        ctx.tier = tier;
        ctx.source = source;
        let model: Arc<str> = Arc::from(req.model.as_str());
        ctx.model = Some(model.clone());

        let pricing = self.state.pricing();
        let est = estimate::estimate(route, &req.json);
        let price = pricing.lookup(&req.model);
        let choices = estimate::output_choices(route, &req.json).max(1);
        let max_output = estimate::max_output_tokens(est.requested_max_output, price.price, route) * choices;
        let estimated_cost = worst_case_cost(price.price, est.prompt_tokens, max_output);
        // Boxed from the start: it ends in `ctx.spend`, and unboxed it would be moved there and
        // with every move of this future.
        let mut spend = Box::new(SpendCtx {
            route,
            tier,
            tenant: caller.tenant.clone(),
            model_label: spend::model_label(if price.known { price.name } else { "other" }),
            price: price.price.clone(),
            prompt_tokens: est.prompt_tokens,
            max_output_tokens: max_output,
            estimated_cost,
            reservation: None,
            charge_only: false,
            scanner: None,
            strip_usage: false,
            strip: None,
            event: None,
        });
        let facts = Facts {
            tenant: &caller.tenant,
            tier,
            source: &ctx.source,
            estimated_tokens: est.prompt_tokens + max_output,
        };

        // The fingerprint binds approvals to this exact body, and every decision event names it
        // (CONTRACT §7).
        let fp = fingerprint(&caller.tenant, "POST", route.path(), body);
        let gate = Duration::from_millis(self.state.config.gate_timeout_ms);
        // One clock read for the whole decision (store windows, token expiry, the hold's time).
        let now = self.state.clock.now_ms();
        let now_s = (now / 1000) as i64;
        // What the store admitted, kept outside the timed decision: when the decision fails
        // after the admission (a later store step times out, or the gate timeout ends it), the
        // failsafe answer still gives the counts and the lease back (and `spend` the hold).
        let mut admitted: Option<Ticket> = None;
        let decided = tokio::time::timeout(gate, async {
            if let Some(d) = decide::kill_switch(&policy, mode) {
                return Ok((d, None, None));
            }
            // Pure pre-checks first, so the store is asked once: the approval token (verified and
            // bound, not yet used; step 8) and the thresholds it may lift (step 7).
            let token_check = ctx
                .approval_token
                .as_deref()
                .map(|token| self.verify_approval(token, &caller.tenant, &ctx.request_id, &fp, estimated_cost, now_s));
            let approved = matches!(token_check, Some(Ok(_)));
            let threshold = decide::spend_threshold(&policy, estimated_cost, approved);
            let threshold_lifted = decide::token_lifts_threshold(mode, approved, threshold);
            let over_budget_ok = approved && mode == Mode::Soft;
            let budget = limits.monthly_budget(tier);
            // Steps 4–6 and 9 in one store step: count the request and, when it may be admitted,
            // hold its cost. A request the guards then refuse gives both back.
            let wants_hold = mode != Mode::Shadow
                && (threshold.is_none() || threshold_lifted)
                && !matches!(token_check, Some(Err(_)));
            let hold = wants_hold
                .then(|| self.reserve_request(ctx, &policy, &spend, budget, max_output, choices, over_budget_ok, now));
            let lease = limits.wants_lease();
            let (mut d, ticket, held) = self.guard(&policy, &facts, mode, lease, hold.as_ref(), now).await?;
            admitted = Some(ticket);
            // What the store held: the reservation goes to `spend`, its amount to the decision.
            let held = held.map(|outcome| match outcome {
                ReserveOutcome::Reserved(r) => {
                    let amount = r.amount;
                    spend.reservation = Some(r);
                    Held::Reserved(amount)
                }
                ReserveOutcome::Insufficient { .. } => Held::Insufficient,
            });
            if let Some(until) = d.trip_global_block_until {
                self.state.note_global_block(Some(until), &policy.global);
                if let Err(e) = self.state.counters.set_global_block(until).await {
                    self.store_failed("set_global_block", e);
                }
            }
            if d.verdict == Verdict::Deny {
                return Ok((d, None, None));
            }
            let mut approval = None;
            match token_check {
                Some(Ok(claims)) => {
                    d = decide::lift_soft_escalation(d);
                    approval = Some(claims);
                }
                Some(Err(e)) => {
                    let refusal =
                        Decision { evaluations: d.evaluations, ..decide::bad_token_refusal(mode, threshold, e) };
                    return Ok((refusal, None, None));
                }
                None => {}
            }
            let mut clamp_to = None;
            if d.is_allow() && !d.is_would_deny() {
                if let Some(reason) = threshold {
                    d = Decision { evaluations: d.evaluations, ..decide::violation(mode, reason, None) };
                    if threshold_lifted {
                        d = decide::lift_soft_escalation(d);
                    }
                }
            }
            if d.is_allow() && !d.is_would_deny() {
                let step = match held {
                    Some(outcome) => self.reserve_step(&spend, outcome, choices, over_budget_ok),
                    None => self.shadow_fit(&spend, budget).await?,
                };
                if let Some(reason) = step.violation {
                    d = Decision { evaluations: d.evaluations, ..decide::violation(mode, reason, None) };
                } else if step.over_budget {
                    d.reason = Some(Reason::ApprovedOverBudget);
                } else if let Some(n) = step.clamped_to {
                    d.reason = Some(Reason::MaxTokensClamped);
                    clamp_to = Some(n);
                }
            }
            // Step 8, consumption: only an admitted request uses its token up.
            if let (true, Some(claims)) = (d.is_allow(), approval.as_ref()) {
                if self.consume_approval(claims, &caller.tenant, &ctx.request_id).await? {
                    d = Decision { evaluations: d.evaluations, ..decide::token_refusal(mode, ApprovalError::Replayed) };
                }
            }
            let consumed = approval.filter(|_| d.is_allow()).map(|c| c.approval_id);
            Ok::<_, StoreError>((d, clamp_to, consumed))
        })
        .await;
        let (mut decision, clamp_to, consumed_approval) = match decided {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let failure = match e {
                    StoreError::Timeout => "store_timeout",
                    StoreError::Unavailable(_) => "store_error",
                };
                self.state.metrics.gate_failures.with_label_values(&[&ctx.source, failure]).inc();
                (decide::undecided(&policy, mode, self.state.global_block_seen(&policy.global), now), None, None)
            }
            Err(_) => {
                self.state.metrics.gate_failures.with_label_values(&[&ctx.source, "gate_timeout"]).inc();
                (decide::undecided(&policy, mode, self.state.global_block_seen(&policy.global), now), None, None)
            }
        };
        // A refused admission leaves every counter, and its hold the budget, before anything
        // below waits (the approvals store, the outbox turn): requests racing this one must not
        // see it counted, or they are refused for a quota or budget it never used.
        if !decision.is_allow() {
            admitted = self.settle_admission(false, admitted).await;
            if let Some(r) = spend.reservation.take() {
                let _ = self.state.budgets.release(&r.id, self.state.clock.now_ms()).await;
            }
        }
        // The fields every event of this request carries.
        let mut base = self.state.event(EventType::Decision, policy.version);
        base.request_id = Some(ctx.request_id.clone());
        base.tenant_id = Some(caller.tenant.clone());
        base.tenant_tier = Some(event::label(tier.as_str()));
        base.source = Some(ctx.source.clone());
        base.mode = Some(event::label(mode.as_str()));
        base.model = Some(model);
        base.estimated_cost_usd = Some(estimated_cost);
        let event_of = |event_type: EventType| base.sibling(self.state.event(event_type, policy.version));
        let mut extra = Map::new();
        if decision.verdict == Verdict::RequireApproval {
            let reasons = decision.reason_label().map(|r| vec![r.to_string()]).unwrap_or_default();
            let now = self.state.clock.now_ms();
            let pending = self
                .state
                .approvals
                .create_pending(NewApproval {
                    tenant_id: caller.tenant.to_string(),
                    tenant_tier: tier.as_str().to_string(),
                    request_id: ctx.request_id.to_string(),
                    route: route.path().to_string(),
                    model: req.model.clone(),
                    request_fingerprint: fp.clone(),
                    estimated_cost,
                    reasons: reasons.clone(),
                    now,
                    expires_at: now + self.state.config.approvals.ttl_seconds * 1000,
                })
                .await;
            match pending {
                Ok(a) => {
                    // The housekeeper recounts the backlog every second; this keeps it current meanwhile.
                    self.state.metrics.approval_queue_backlog.inc();
                    extra.insert("approval_id".into(), json!(a.approval_id));
                    extra.insert("expires_at".into(), json!(decide::time::rfc3339_seconds(a.expires_at)));
                    let mut e = event_of(EventType::ApprovalRequested);
                    e.request_fingerprint = Some(fp.clone());
                    e.approval_id = Some(a.approval_id.clone());
                    // This request's reasons, as its decision's (a pending approval asked for
                    // again keeps the reasons it was first asked with).
                    e.reasons = reasons;
                    self.state.emit(&e);
                    ctx.approval_id = Some(a.approval_id);
                }
                Err(e) => {
                    self.store_failed("create_pending", e);
                }
            }
            extra.insert("request_fingerprint".into(), json!(fp));
        } else {
            ctx.approval_id = consumed_approval.clone();
        }

        // The decision reaches the outbox (the OS) before anything is forwarded; when it cannot,
        // no decision can be recorded and the failsafe path applies.
        // A refused request holds nothing (its hold is given back below).
        let reservation = spend.reservation.as_ref().filter(|_| decision.is_allow());
        let mut ev = base;
        ev.decision = Some(event::label(decision.verdict.as_str()));
        ev.reasons = decision.reason_label().map(|r| vec![r.to_string()]).unwrap_or_default();
        ev.reservation_id = reservation.map(|r| r.id.clone());
        ev.reserved_usd = Some(reservation.map_or(Micros::ZERO, |r| r.amount));
        ev.request_fingerprint = Some(fp.clone());
        ev.approval_id = ctx.approval_id.clone();
        let (mut recorded, template) = self.state.stage_decision(ev);
        if let (true, true, Some(id)) = (recorded, decision.is_allow(), consumed_approval) {
            let mut e = template.event().sibling(self.state.event(EventType::ApprovalConsumed, policy.version));
            e.reserved_usd = None; // the hold it admitted is named, its amount is the decision's
            e.approval_id = Some(id);
            e.request_fingerprint = Some(fp.clone());
            self.state.stage(&e);
        }
        // The hold and the events staged above are written (with those of every request served
        // in this turn) before anything is forwarded or answered.
        recorded &= self.state.group.commit(since).await.is_ok();
        if !recorded {
            self.state.metrics.gate_failures.with_label_values(&[&ctx.source, "outbox_unavailable"]).inc();
            // Only a request that would go on needs its record first. A refusal stands: the kill
            // switch and the global block act in every mode, and shadow's fail-open must not
            // turn them (or any refusal) into a forwarded call.
            if decision.verdict != Verdict::Deny {
                decision = decide::failsafe(mode);
            }
        }
        if decision.verdict == Verdict::RequireApproval {
            // Every key an `approval_required` answer promises; `null` where no approval could be
            // queued (approvals store or outbox unusable: the soft failsafe path).
            extra.entry("request_fingerprint").or_insert_with(|| json!(fp));
            extra.entry("approval_id").or_insert(Value::Null);
            extra.entry("expires_at").or_insert(Value::Null);
        }

        let ticket = self.settle_admission(decision.is_allow(), admitted).await;
        if !decision.is_allow() {
            if let Some(r) = spend.reservation.take() {
                // Admitted, then refused because the decision could not be recorded: give the
                // hold back at once.
                let since = self.state.group.mark();
                let _ = self.state.budgets.release(&r.id, self.state.clock.now_ms()).await;
                let _ = self.state.group.commit(since).await;
            }
        }
        self.observe(ctx, &caller.tenant, &policy, &decision, route);
        ctx.verdict = Some(decision.verdict);
        ctx.reason_label = decision.reason_label();
        ctx.mode = Some(mode);
        ctx.policy_version = policy.version;
        ctx.estimated_cost = Some(estimated_cost);
        ctx.fingerprint = Some(fp);
        if decision.is_allow() {
            ctx.ticket = ticket;
            // Shadow mode and fail-open hold nothing but still settle usage into spend.
            spend.charge_only = spend.reservation.is_none();
            spend.event = Some(template);
            ctx.new_body = match clamp_to {
                Some(n) => extract::clamp_body(route, &req, n),
                None => extract::inject_include_usage(route, &req, body),
            };
            spend.strip_usage = extract::refuses_usage(route, &req);
            ctx.spend = Some(spend);
            return Ok(());
        }
        extra.insert("estimated_cost_usd".into(), json!(estimated_cost.to_string()));
        Err(Refusal::Decision { decision, policy_version: policy.version, extra })
    }

    /// Verifies an approval token (primary secret, then fallbacks) and binds it to this request.
    /// Audit lines: every rejection, and every token only a fallback secret verified (during a
    /// rotation after a key compromise, the tokens still signed with the old key).
    fn verify_approval(
        &self,
        token: &str,
        tenant: &str,
        request_id: &str,
        fingerprint: &str,
        estimated_cost: Micros,
        now_s: i64,
    ) -> std::result::Result<ApprovalClaims, ApprovalError> {
        let a = &self.state.config.approvals;
        let keys: Vec<&[u8]> =
            a.secret.iter().chain(a.fallback_secrets.iter()).map(|s| s.expose().as_bytes()).collect();
        let result = if keys.is_empty() {
            Err(ApprovalError::Invalid("no_signing_secret_configured"))
        } else {
            approval::verify_keyed(token, &keys, &a.issuer, now_s).and_then(|(c, key)| {
                approval::check_binding(&c, tenant, fingerprint, estimated_cost).map(|()| (c, key))
            })
        };
        match result {
            Ok((claims, key)) => {
                if key > 0 {
                    tracing::warn!(
                        target: "audit",
                        event = "approval_token_verified_by_fallback",
                        tenant_id = tenant,
                        request_id,
                        approval_id = %claims.approval_id,
                        jti = %claims.jti,
                        fallback = key,
                    );
                }
                Ok(claims)
            }
            Err(e) => {
                self.state.metrics.approval_token_events.with_label_values(&[e.metric_event()]).inc();
                tracing::warn!(
                    target: "audit",
                    event = "approval_token_rejected",
                    tenant_id = tenant,
                    request_id,
                    code = e.code(),
                    detail = e.detail().unwrap_or(""),
                );
                Err(e)
            }
        }
    }

    /// Uses a verified token up (single use by `jti`, across replicas sharing the store).
    /// `Ok(true)` = it had been used before.
    async fn consume_approval(
        &self,
        claims: &ApprovalClaims,
        tenant: &str,
        request_id: &str,
    ) -> std::result::Result<bool, StoreError> {
        let now = self.state.clock.now_ms();
        let outcome = match tokio::time::timeout(
            Duration::from_millis(self.state.config.store_timeout_ms),
            self.state.approvals.consume(&claims.jti, claims.exp, now),
        )
        .await
        {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => return Err(self.store_failed("consume_approval", e)),
            Err(_) => return Err(self.store_failed("consume_approval", StoreError::Timeout)),
        };
        let replayed = outcome == ConsumeOutcome::Replayed;
        let event = if replayed { "replay" } else { "consumed" };
        self.state.metrics.approval_token_events.with_label_values(&[event]).inc();
        tracing::info!(
            target: "audit",
            event = "approval_token_consumed",
            tenant_id = tenant,
            request_id,
            approval_id = %claims.approval_id,
            jti = %claims.jti,
            replayed
        );
        Ok(replayed)
    }

    /// Step 9's hold: the worst-case cost against the tenant's month. With clamp-to-budget the
    /// store holds what fits down to the minimum output; with an approval in soft mode, whatever
    /// is left.
    #[allow(clippy::too_many_arguments)]
    fn reserve_request<'a>(
        &self,
        ctx: &'a RequestCtx,
        policy: &Policy,
        spend: &'a SpendCtx,
        budget: Micros,
        max_output: u64,
        choices: u64,
        over_budget_ok: bool,
        now: UnixMillis,
    ) -> ReserveRequest<'a> {
        let min_output = policy.spend.clamp_min_output_tokens * choices;
        let clamp = policy.spend.clamp_max_tokens_to_budget && spend.route.has_output() && max_output > min_output;
        let min_amount = if over_budget_ok {
            Some(Micros::ZERO)
        } else {
            clamp.then(|| worst_case_cost(&spend.price, spend.prompt_tokens, min_output))
        };
        ReserveRequest {
            tenant: &spend.tenant,
            tenant_tier: spend.tier.as_str(),
            request_id: &ctx.request_id,
            model: ctx.model.as_deref().unwrap_or(""),
            now,
            monthly_budget: budget,
            amount: spend.estimated_cost,
            min_amount,
        }
    }

    /// What the store's answer to the hold means for the decision.
    fn reserve_step(&self, spend: &SpendCtx, outcome: Held, choices: u64, over_budget_ok: bool) -> ReserveStep {
        match outcome {
            Held::Insufficient => ReserveStep { violation: Some(Reason::BudgetExceeded), ..ReserveStep::default() },
            Held::Reserved(amount) => {
                let short = amount < spend.estimated_cost;
                if short && over_budget_ok {
                    ReserveStep { over_budget: true, ..ReserveStep::default() }
                } else {
                    let clamped_to = short
                        .then(|| (max_output_that_fits(&spend.price, spend.prompt_tokens, amount) / choices).max(1));
                    ReserveStep { clamped_to, ..ReserveStep::default() }
                }
            }
        }
    }

    /// Shadow mode holds nothing; it only checks whether the request would have fitted.
    async fn shadow_fit(&self, spend: &SpendCtx, budget: Micros) -> std::result::Result<ReserveStep, StoreError> {
        let month = crate::store::budget::month_key(self.state.clock.now_ms());
        let store_timeout = Duration::from_millis(self.state.config.store_timeout_ms);
        let view =
            match tokio::time::timeout(store_timeout, self.state.budgets.tenant_spend(&spend.tenant, &month)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(self.store_failed("tenant_spend", e)),
                Err(_) => return Err(self.store_failed("tenant_spend", StoreError::Timeout)),
            };
        let fits = view.remaining(budget) >= spend.estimated_cost;
        Ok(ReserveStep { violation: (!fits).then_some(Reason::BudgetExceeded), ..ReserveStep::default() })
    }

    /// Counts the request in the store (taking a concurrency lease when `lease`, and holding its
    /// cost when asked) in one step, then evaluates steps 4–6 on the counters it saw.
    async fn guard(
        &self,
        policy: &Policy,
        facts: &Facts<'_>,
        mode: Mode,
        lease: bool,
        hold: Option<&ReserveRequest<'_>>,
        now: UnixMillis,
    ) -> std::result::Result<(Decision, Ticket, Option<ReserveOutcome>), StoreError> {
        let lease_ttl_ms = lease.then(|| policy.fair_use.lease_life_ms());
        let req = AdmitRequest { tenant: facts.tenant, now, tokens: facts.estimated_tokens, lease_ttl_ms };
        let store_timeout = Duration::from_millis(self.state.config.store_timeout_ms);
        // An in-process store answers at once; a shared one is awaited under the store timeout.
        let answered = match self.state.gatekeeper.admit_reserve_now(&req, hold) {
            Some(r) => Ok(r),
            None => tokio::time::timeout(store_timeout, self.state.gatekeeper.admit_reserve(&req, hold)).await,
        };
        let (ticket, view, held) = match answered {
            Ok(Ok(v)) => {
                self.state.set_store_healthy(true);
                self.state.note_global_block(v.1.global.block_until, &policy.global);
                v
            }
            Ok(Err(e)) => return Err(self.store_failed("admit", e)),
            Err(_) => return Err(self.store_failed("admit", StoreError::Timeout)),
        };
        Ok((decide::evaluate(policy, facts, &view, mode, now), ticket, held))
    }

    fn store_failed(&self, op: &str, e: StoreError) -> StoreError {
        self.state.store_failed(op, e)
    }

    /// Keeps the admission of an allowed request; undoes it otherwise.
    async fn settle_admission(&self, allowed: bool, ticket: Option<Ticket>) -> Option<Ticket> {
        let ticket = ticket?;
        if allowed {
            return Some(ticket);
        }
        if let Err(e) = self.state.counters.rollback(&ticket).await {
            self.store_failed("rollback", e);
        }
        None
    }

    /// Metrics and audit line for one decision.
    fn observe(&self, ctx: &RequestCtx, tenant: &str, policy: &Policy, d: &Decision, route: Route) {
        let m = &self.state.metrics;
        m.record_decision(&ctx.source, ctx.tier, d, ctx.start.elapsed().as_secs_f64());
        if d.trip_global_block_until.is_some() {
            m.global_block_active.set(1);
        }
        let sample = f64::from(uuid_sample(&ctx.request_id)) / 65_536.0;
        if !d.is_allow() || d.reason.is_some() || audit::sampled(policy.audit_sample_rate, sample) {
            audit::decision(&audit::DecisionRecord {
                request_id: &ctx.request_id,
                tenant_id: tenant,
                tenant_tier: ctx.tier.as_str(),
                source: &ctx.source,
                route: route.path(),
                model: ctx.model.as_deref(),
                policy_version: policy.version,
                decision: d,
            });
        }
    }
}

/// The headers of a sidecar-made JSON answer (`content-length` is the driver's): type, no
/// caching, request id (also under the SDKs' names), decision, the hold of an `ALLOW`, error
/// code, `retry-after`.
fn json_headers<'a>(
    ctx: &'a RequestCtx,
    verdict: Option<Verdict>,
    error: Option<&'static str>,
    retry_after: Option<&'a str>,
    hold: Option<&'a str>,
) -> ([(&'static str, &'a str); 10], usize) {
    let mut h = [("", ""); 10];
    let mut n = 0;
    let mut add = |name: &'static str, value: &'a str| {
        h[n] = (name, value);
        n += 1;
    };
    add("content-type", "application/json");
    add("cache-control", "no-store");
    add(names::REQUEST_ID, &ctx.request_id);
    // The sidecar is the origin of this answer: the SDKs show its id as the request id
    // (OpenAI: `x-request-id`, Anthropic: `request-id`).
    add("x-request-id", &ctx.request_id);
    add("request-id", &ctx.request_id);
    if let Some(v) = verdict {
        add(names::DECISION, v.as_str());
        // An admitted request the gateway then failed (502) names its hold, as every ALLOW does.
        if let (Verdict::Allow, Some(id)) = (v, hold) {
            add(names::RESERVATION_ID, id);
        }
    }
    if let Some(code) = error {
        add(names::ERROR, code);
    }
    if let Some(s) = retry_after {
        add("retry-after", s);
    }
    (h, n)
}

/// What the store's hold came to (the reservation itself is kept in `SpendCtx`).
enum Held {
    Reserved(Micros),
    Insufficient,
}

/// What step 9 found.
#[derive(Default)]
struct ReserveStep {
    violation: Option<Reason>,
    /// Clamp-to-budget lowered the max output tokens to this.
    clamped_to: Option<u64>,
    /// Admitted over budget on an approval (soft mode).
    over_budget: bool,
}

/// `request_fingerprint` of CONTRACT §5. Computed for every decision (its event names it): the
/// hex digits are written into stack buffers, one allocation for the result.
pub fn fingerprint(tenant: &str, method: &str, path: &str, body: &[u8]) -> String {
    let mut body_hash = [0u8; 64];
    hex_into(&Sha256::digest(body).into(), &mut body_hash);
    let mut h = Sha256::new();
    h.update(tenant.as_bytes());
    h.update(b"\n");
    h.update(method.as_bytes());
    h.update(b" ");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(body_hash);
    let mut out = [0u8; 64];
    hex_into(&h.finalize().into(), &mut out);
    String::from_utf8(out.to_vec()).expect("hex digits are ASCII")
}

/// `digest` as 64 lowercase hex digits.
fn hex_into(digest: &[u8; 32], out: &mut [u8; 64]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(digest) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// 16 random bits of a v7 UUID string (its last hex digits), for audit sampling.
fn uuid_sample(id: &str) -> u16 {
    u16::from_str_radix(&id[id.len().saturating_sub(4)..], 16).unwrap_or(0)
}

/// The phases, on the downstream session alone: pingora's proxy (`ProxyHttp` below) and the
/// lean HTTP/1 driver (`h1`) both call these, so every rule lives once.
impl PreauthProxy {
    /// Route, identity, size, and — when the driver can forward what it read (or the body is
    /// small enough for pingora's retry buffer) — the whole decision. `Ok(true)` = answered.
    pub(crate) async fn inspect<D: Downstream>(&self, d: &mut D, ctx: &mut RequestCtx) -> Result<bool> {
        let (route, passthrough, gate) = {
            let (method, path) = (d.method(), d.path());
            let route = (method == http::Method::POST).then(|| Route::from_path(path)).flatten();
            let passthrough = method == http::Method::GET && crate::decide::route::is_models_path(path);
            (route, passthrough, gate::GateRoute::parse(method, path))
        };
        if route.is_none() && !passthrough && gate.is_none() {
            self.respond(d, ctx, &self.refusal(&Refusal::RouteNotFound, ctx)).await?;
            return Ok(true);
        }
        ctx.route = route;
        ctx.passthrough = passthrough;

        let caller = match extract::ambiguous_identity(&self.state.config.identity, |n| d.header_count(n)) {
            Some(why) => Err(why),
            None => {
                extract::identify_cached(&self.state.config.identity, |n| d.header(n), self.now_s(), Some(&self.tokens))
            }
        };
        match caller {
            Ok(c) => ctx.caller = Some(c),
            Err(why) => {
                self.respond(d, ctx, &self.refusal(&Refusal::Unauthenticated(why), ctx)).await?;
                return Ok(true);
            }
        }
        if passthrough {
            // Nothing inspects a passthrough's body: it may not have one (a gateway that ignores
            // a GET's body would otherwise run what it holds as a request of its own).
            let declared = d.header("content-length").is_some_and(|v| v.trim() != "0");
            if declared || d.header("transfer-encoding").is_some() {
                let why = format!("{} {} takes no request body.", d.method(), d.path());
                self.respond(d, ctx, &self.refusal(&Refusal::InvalidRequest(why), ctx)).await?;
                return Ok(true);
            }
            return Ok(false);
        }
        // The Gate API takes both as the proxy path does (CONTRACT §3, §10).
        ctx.source_header = d.header(names::SOURCE).map(str::to_string);
        ctx.approval_token = d.header(names::APPROVAL_TOKEN).map(str::to_string);
        if let Some(g) = gate {
            Box::pin(self.serve_gate(d, ctx, g)).await?; // boxed: a large, rarer future
            return Ok(true);
        }

        let limit = self.state.config.max_body_bytes;
        let content_length = d.header("content-length").and_then(|v| v.parse::<u64>().ok());
        match content_length {
            Some(n) if n > limit => {
                self.respond(d, ctx, &self.body_refusal(&Refusal::TooLarge { limit }, ctx, None)).await?;
                Ok(true)
            }
            Some(n) if n <= RETRY_BUFFER_LIMIT || d.forwards_read_body() => self.read_and_decide(d, ctx, limit).await,
            _ if d.forwards_read_body() => self.read_and_decide(d, ctx, limit).await,
            _ => {
                ctx.deferred = true;
                Ok(false)
            }
        }
    }

    /// Reads the whole body and decides. `Ok(true)` = refused (answered).
    async fn read_and_decide<D: Downstream>(&self, d: &mut D, ctx: &mut RequestCtx, limit: u64) -> Result<bool> {
        let Some(body) = d.read_body(limit).await? else {
            self.respond(d, ctx, &self.body_refusal(&Refusal::TooLarge { limit }, ctx, None)).await?;
            return Ok(true);
        };
        // Boxed: the decision's future is ~4 KiB; unboxed it would be part of (and moved
        // with) every request's future.
        match Box::pin(self.decide_body(ctx, &body)).await {
            Ok(()) => {
                if ctx.new_body.is_none() {
                    ctx.new_body = Some(body);
                }
                Ok(false)
            }
            Err(refusal) => {
                self.respond(d, ctx, &self.body_refusal(&refusal, ctx, Some(&body))).await?;
                Ok(true)
            }
        }
    }

    /// Caller headers the gateway never sees as sent: the sidecar sets its own (host, request id,
    /// replaced credentials) or none (`accept-encoding`, the approval token, a caller JWT).
    pub(crate) fn replaced_upstream(&self, name: &[u8]) -> bool {
        match name {
            b"host" | b"accept-encoding" => true,
            b"authorization" => {
                self.state.config.upstream_api_key.is_some()
                    || matches!(self.state.config.identity, Identity::Jwt { .. })
            }
            b"x-api-key" => self.state.config.upstream_api_key.is_some(),
            n => n == names::APPROVAL_TOKEN.as_bytes() || n == names::REQUEST_ID.as_bytes(),
        }
    }

    /// The sidecar's own headers for the gateway: its host, the gateway credentials (when
    /// configured; `x-api-key` only where the caller sent one), the request id.
    pub(crate) fn own_upstream_headers(
        &self,
        ctx: &RequestCtx,
        caller_sent_api_key: bool,
        mut add: impl FnMut(&'static str, &str),
    ) {
        add("host", &self.upstream_host_header);
        // Usage is read from plain bytes: a request without the header allows any coding (RFC
        // 9110 §12.5.3), and a gzipped answer would settle as almost free.
        add("accept-encoding", "identity");
        if let (Some(bearer), Some(key)) = (&self.upstream_bearer, &self.state.config.upstream_api_key) {
            add("authorization", bearer);
            if caller_sent_api_key {
                add("x-api-key", key.expose());
            }
        }
        add(names::REQUEST_ID, &ctx.request_id);
    }

    /// The upstream request header (pingora's path): `replaced_upstream` removed,
    /// `own_upstream_headers` set, and body framing.
    pub(crate) fn rewrite_upstream(&self, up: &mut RequestHeader, ctx: &RequestCtx) -> Result<()> {
        let caller_sent_api_key = up.headers.contains_key("x-api-key");
        let replaced: Vec<http::HeaderName> =
            up.headers.keys().filter(|n| self.replaced_upstream(n.as_str().as_bytes())).cloned().collect();
        for name in &replaced {
            up.remove_header(name);
        }
        let mut result = Ok(());
        self.own_upstream_headers(ctx, caller_sent_api_key, |name, value| {
            if result.is_ok() {
                result = up.insert_header(name, value).map(|_| ());
            }
        });
        result?;
        if ctx.deferred {
            // Length unknown until the decision: frame the body ourselves.
            up.remove_header("content-length");
            if up.version != http::Version::HTTP_2 {
                up.insert_header("transfer-encoding", "chunked")?;
            }
        } else if let Some(b) = &ctx.new_body {
            up.insert_header("content-length", b.len().to_string())?;
        }
        Ok(())
    }

    /// The upstream answered: remember its status and start reading usage from a success.
    pub(crate) fn on_upstream_response(&self, status: u16, content_type: Option<&str>, ctx: &mut RequestCtx) {
        ctx.upstream_status = Some(status);
        if (200..300).contains(&status) {
            if let Some(spend) = ctx.spend.as_mut() {
                spend.start_scan(content_type);
            }
        }
    }

    /// The `x-preauth-*` headers of a forwarded answer (none on pass-through routes), and
    /// `x-should-retry: false` on a failed answer to a request that used an approval token.
    pub(crate) fn response_headers<'a>(&self, ctx: &'a RequestCtx, mut add: impl FnMut(&'static str, &'a str)) {
        if ctx.route.is_some() {
            add(names::REQUEST_ID, &ctx.request_id);
            add(names::DECISION, ctx.verdict.unwrap_or(Verdict::Allow).as_str());
            if let Some(id) = ctx.reservation_id() {
                add(names::RESERVATION_ID, id);
            }
            // The request used its approval token up: an SDK retrying the gateway's failure
            // (they retry 408/409/429/5xx) would only get `approval_token_replayed` instead.
            if ctx.approval_id.is_some() && !ctx.upstream_status.is_some_and(|s| (200..300).contains(&s)) {
                add("x-should-retry", "false");
            }
        }
    }

    /// `response_headers` set on pingora's response header (pingora's path).
    pub(crate) fn decorate_response(&self, resp: &mut ResponseHeader, ctx: &RequestCtx) -> Result<()> {
        let mut result = Ok(());
        self.response_headers(ctx, |name, value| {
            if result.is_ok() {
                result = resp.insert_header(name, value);
            }
        });
        result
    }

    /// One upstream body chunk on its way to the client (unchanged, at once): usage is read from
    /// it, and the whole call may not outlive `PREAUTH_UPSTREAM_TIMEOUT_SECONDS`.
    pub(crate) fn on_response_chunk(&self, chunk: &[u8], ctx: &mut RequestCtx) -> Result<()> {
        if let Some(scanner) = ctx.spend.as_mut().and_then(|s| s.scanner.as_mut()) {
            scanner.feed(chunk);
        }
        if ctx.start.elapsed().as_secs() >= self.state.config.upstream_timeout_seconds {
            return Error::e_explain(ReadTimedout, "PREAUTH_UPSTREAM_TIMEOUT_SECONDS exceeded");
        }
        Ok(())
    }

    /// What to answer for a request that failed after `inspect` (`answered`: a final response
    /// header was already written, so nothing can be): the deferred refusal, the 400, or the 502.
    pub(crate) fn failure_answer(&self, e: &Error, ctx: &mut RequestCtx, answered: bool) -> Option<Rendered> {
        // The gateway had the request and did not answer in time: it may bill the call (settled
        // as unanswered), and a retry would send that work again.
        if ctx.body_forwarded && !answered && matches!(e.etype(), ReadTimedout) {
            ctx.upstream_timed_out = true;
            ctx.unanswered_after_forward = true;
        }
        match ctx.pending_refusal.take() {
            Some(r) => Some(*r),
            None if answered => None,
            None => match e.esource() {
                ErrorSource::Upstream => Some(self.unreachable(ctx)),
                ErrorSource::Downstream => None,
                _ => match e.etype() {
                    HTTPStatus(400) => Some(self.refusal(&Refusal::InvalidRequest(MALFORMED.into()), ctx)),
                    _ => Some(self.unreachable(ctx)),
                },
            },
        }
    }

    /// The 502 for a request the upstream failed: `ALLOW` when it had been admitted.
    fn unreachable(&self, ctx: &RequestCtx) -> Rendered {
        let admitted = ctx.verdict == Some(Verdict::Allow);
        self.refusal(&Refusal::UpstreamUnavailable { admitted, timed_out: ctx.upstream_timed_out }, ctx)
    }

    /// pingora's path: writes [`Self::failure_answer`]; returns the status written (0 = none).
    async fn fail(&self, session: &mut ServerSession, e: &Error, ctx: &mut RequestCtx) -> u16 {
        let answered = session.response_written().is_some_and(|h| !h.status.is_informational());
        match self.failure_answer(e, ctx, answered) {
            Some(r) => {
                if let Err(we) = self.respond(session, ctx, &r).await {
                    tracing::debug!(error = %we, "could not write error response; client gone");
                }
                r.status
            }
            None => 0,
        }
    }

    /// Runs for every request, whatever happened: settles, frees the concurrency lease, counts
    /// ([`Self::conclude`]), then writes the settlement's journal line and event.
    pub(crate) async fn finish(&self, ctx: &mut RequestCtx) {
        self.conclude(ctx).await;
        // The settlement (journal and event) is written before the connection takes its next
        // request. A failure is logged by the group commit; the events are lost, the hold stays
        // for the sweep.
        if let Some(since) = ctx.staged_since {
            let _ = self.state.group.commit(since).await;
        }
    }

    /// Settles, frees the concurrency lease and counts, once per request (later calls do
    /// nothing); the settlement's lines are staged for [`Self::finish`] to write. The HTTP/1
    /// driver calls it before the last bytes of the answer go out, so that a client sending its
    /// next request as soon as it has this one's answer finds this one's lease released and its
    /// hold settled.
    pub(crate) async fn conclude(&self, ctx: &mut RequestCtx) {
        if ctx.staged_since.is_some() {
            return;
        }
        ctx.staged_since = Some(self.state.group.mark());
        if ctx.gate {
            // Gate API: the caller settles its own hold later; the lease lives until then.
            if let (Some(t), Some(r)) = (ctx.ticket.take(), ctx.spend.as_ref().and_then(|s| s.reservation.as_ref())) {
                self.state.hold_gate_lease(&r.id, t).await;
            }
        } else if let Some(mut s) = ctx.spend.take() {
            let unanswered = ctx.unanswered_after_forward;
            spend::settle(&self.state, &mut s, ctx.upstream_status, unanswered, &mut ctx.ticket).await;
        }
        // Whatever lease the settlement did not take along.
        if let Some(ticket) = ctx.ticket.take() {
            if ticket.has_lease() {
                if let (Err(err), _) = spend::retrying(|| self.state.counters.release_lease(&ticket)).await {
                    self.store_failed("release_lease", err);
                    spend::release_lease_later(&self.state, ticket);
                }
            }
        }
        // The gate API contacts no gateway: its answers are not upstream responses.
        if !ctx.gate && (ctx.verdict == Some(Verdict::Allow) || ctx.passthrough) {
            self.state.metrics.count_upstream(ctx.upstream_status);
        }
    }

    /// The configured gateway, with the connect and I/O timeouts.
    pub(crate) fn peer(&self) -> HttpPeer {
        let mut peer = HttpPeer::new(self.upstream_addr, self.upstream_tls, self.upstream_sni.clone());
        let timeout = Duration::from_secs(self.state.config.upstream_timeout_seconds);
        // A connection attempt is part of the exchange: never longer than its timeout.
        peer.options.connection_timeout = Some(h1::CONNECT_TIMEOUT.min(timeout));
        peer.options.read_timeout = Some(timeout);
        peer.options.write_timeout = Some(timeout);
        peer
    }
}

#[async_trait]
impl ProxyHttp for PreauthProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        // pingora's path (h2c): the context counts the request for the drain while it lives.
        let mut ctx = RequestCtx::new();
        ctx.counted = Some(self.state.drain.counted());
        ctx
    }

    /// No downstream modules: pingora's default adds a (disabled) response-compression module that
    /// still runs on every request; the sidecar never compresses (it strips `accept-encoding`).
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        self.inspect(session.as_downstream_mut(), ctx).await
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer()))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.rewrite_upstream(up, ctx)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if !ctx.deferred {
            if end_of_stream {
                if let Some(b) = ctx.new_body.take() {
                    *body = Some(b);
                }
                ctx.body_forwarded = true;
            }
            return Ok(());
        }
        if let Some(chunk) = body.take() {
            if ctx.held.len() as u64 + chunk.len() as u64 > self.state.config.max_body_bytes {
                let limit = self.state.config.max_body_bytes;
                ctx.pending_refusal = Some(Box::new(self.body_refusal(&Refusal::TooLarge { limit }, ctx, None)));
                return Error::e_explain(HTTPStatus(413), "request body over PREAUTH_MAX_BODY_BYTES");
            }
            ctx.held.extend_from_slice(&chunk);
        }
        if !end_of_stream {
            *body = Some(Bytes::new()); // hold back; `None` would end the upstream body
            return Ok(());
        }
        let full = std::mem::take(&mut ctx.held).freeze();
        match self.decide_body(ctx, &full).await {
            Ok(()) => {
                *body = Some(ctx.new_body.take().unwrap_or(full));
                ctx.body_forwarded = true;
                Ok(())
            }
            Err(refusal) => {
                let r = self.body_refusal(&refusal, ctx, Some(&full));
                let status = r.status;
                ctx.pending_refusal = Some(Box::new(r));
                Error::e_explain(HTTPStatus(status), "request refused after reading its body")
            }
        }
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let content_type = resp.headers.get("content-type").and_then(|v| v.to_str().ok());
        self.on_upstream_response(resp.status.as_u16(), content_type, ctx);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.spend.as_ref().is_some_and(|s| s.strip.is_some()) {
            // The body changes on the way (`strip`): its length is not the gateway's.
            resp.remove_header("content-length");
        }
        self.decorate_response(resp, ctx)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        self.on_response_chunk(body.as_deref().unwrap_or_default(), ctx)?;
        if let Some(strip) = ctx.spend.as_mut().and_then(|s| s.strip.as_mut()) {
            let mut kept = Vec::new();
            strip.feed(body.as_deref().unwrap_or_default(), end_of_stream, &mut kept);
            *body = (!kept.is_empty()).then(|| Bytes::from(kept));
        }
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let error_code = self.fail(session.as_downstream_mut(), e, ctx).await;
        FailToProxy { error_code, can_reuse_downstream: false }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        // Refusals decided after reading the body travel as errors; they are not failures. Nor is
        // a client that went away (an h2 stream reset, a closed connection): a debug line, not an
        // error line per stream.
        if matches!(error.esource(), ErrorSource::Downstream) {
            tracing::debug!(error = %error, request_id = %ctx.request_id, "client went away");
            return true;
        }
        if ctx.pending_refusal.is_some() || matches!(error.etype(), HTTPStatus(_)) {
            return true;
        }
        // pingora's own line quotes the error's context: a malformed gateway head as received
        // (whatever the gateway reflected, keys included) and the request path with its query.
        // This one names the failure only.
        tracing::warn!(
            request_id = %ctx.request_id,
            error_type = %error.etype().as_str(),
            source = ?error.esource(),
            "h2c exchange failed"
        );
        true
    }

    async fn logging(&self, _session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // Gone (a stream reset, a closed connection) after its request reached the gateway, as
        // the HTTP/1 driver judges it: the call may be billed all the same.
        ctx.unanswered_after_forward |=
            ctx.body_forwarded && e.is_some_and(|e| matches!(e.esource(), ErrorSource::Downstream));
        self.finish(ctx).await;
    }
}
