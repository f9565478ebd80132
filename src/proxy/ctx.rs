//! Per-request context (`ProxyHttp::CTX`): what was learned in the request phases and is needed
//! again when the response streams and in `logging`.
//!
//! Owns: `RequestCtx`. Imports: decide types, store ticket, bytes.

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::extract::Caller;
use super::respond::Rendered;
use crate::decide::{Route, Tier, Verdict};
use crate::store::Ticket;

pub struct RequestCtx {
    pub start: Instant,
    pub request_id: std::sync::Arc<str>,
    /// `Some` for inspected LLM routes.
    pub route: Option<Route>,
    /// `GET /v1/models`: forwarded after identity, no decision.
    pub passthrough: bool,
    pub caller: Option<Caller>,
    pub tier: Tier,
    /// Raw `x-preauth-source` header (resolved against the policy at decision time).
    pub source_header: Option<String>,
    /// The configured source the decision used (bounded label).
    pub source: std::sync::Arc<str>,
    pub verdict: Option<Verdict>,
    /// Body decision deferred to `request_body_filter` (no `Content-Length`, or larger than the
    /// 64 KiB that pingora can buffer before connecting upstream).
    pub deferred: bool,
    /// Body bytes held back while a deferred decision is pending.
    pub held: BytesMut,
    /// Replacement body to forward (include_usage injection).
    pub new_body: Option<Bytes>,
    /// Counters admission; its lease is released in `logging`.
    pub ticket: Option<Ticket>,
    /// A refusal decided in `request_body_filter`, written by `fail_to_proxy`.
    pub pending_refusal: Option<Box<Rendered>>,
    pub upstream_status: Option<u16>,
    pub model: Option<std::sync::Arc<str>>,
    /// `x-approval-token`, when sent.
    pub approval_token: Option<String>,
    /// The approval this request consumed.
    pub approval_id: Option<String>,
    /// Gate API call: decide and hold, never forward or settle.
    pub gate: bool,
    /// The decision's reason label, mode and policy version (events, gate answers).
    pub reason_label: Option<&'static str>,
    pub mode: Option<crate::decide::Mode>,
    pub policy_version: u64,
    pub estimated_cost: Option<crate::decide::Micros>,
    pub fingerprint: Option<String>,
    /// Cost, hold and usage scanner of an admitted request; settled in `logging`. Boxed (as is
    /// the pending refusal): pingora keeps the context inside its per-request future and moves
    /// that future, so every byte here is copied on every request.
    pub spend: Option<Box<super::spend::SpendCtx>>,
    /// Where the group commit stood before `conclude` staged the settlement: `finish` writes
    /// from there. `Some` once `conclude` ran (settled, lease released, counted), which then does
    /// nothing the next time.
    pub staged_since: Option<u64>,
    /// The exchange ended after the request was written to the gateway and before its answer
    /// began — the client went away, or the gateway did not answer within
    /// `PREAUTH_UPSTREAM_TIMEOUT_SECONDS`: settled as a cut stream (the estimated prompt), not
    /// released (the gateway may bill the call).
    pub unanswered_after_forward: bool,
    /// ... because the gateway did not answer within `PREAUTH_UPSTREAM_TIMEOUT_SECONDS`.
    pub upstream_timed_out: bool,
    /// The request's last body bytes went to the gateway (h2c: pingora's body filter; HTTP/1:
    /// set from the driver when the exchange fails).
    pub body_forwarded: bool,
    /// Counts this request as in flight for the drain (h2c; the HTTP/1 driver holds its count
    /// beside the context, until `finish` is done).
    pub counted: Option<crate::drain::Counted>,
}

impl RequestCtx {
    /// The id of the reservation this request holds, if any (`x-preauth-reservation-id`).
    pub fn reservation_id(&self) -> Option<&str> {
        self.spend.as_ref().and_then(|s| s.reservation.as_ref()).map(|r| r.id.as_str())
    }

    pub fn new() -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            request_id: crate::ids::v7_shared(),
            route: None,
            passthrough: false,
            caller: None,
            tier: Tier::Free,
            source_header: None,
            source: crate::ledger::event::label("default"),
            verdict: None,
            deferred: false,
            held: BytesMut::new(),
            new_body: None,
            ticket: None,
            pending_refusal: None,
            upstream_status: None,
            model: None,
            spend: None,
            approval_token: None,
            approval_id: None,
            gate: false,
            reason_label: None,
            mode: None,
            policy_version: 0,
            estimated_cost: None,
            fingerprint: None,
            staged_since: None,
            unanswered_after_forward: false,
            upstream_timed_out: false,
            body_forwarded: false,
            counted: None,
        }
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}
