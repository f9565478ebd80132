//! The approval queue and single-use approval tokens (CONTRACT §5, §8).
//!
//! An `approval_required` answer creates a *pending* approval ([`Approvals::create_pending`]); an
//! operator approves or denies it through the admin API ([`Approvals::approve`],
//! [`Approvals::deny`]); a pending approval not decided before its `expires_at` is *expired* and
//! can no longer be approved. A token is spent with [`Approvals::consume`], atomically and once
//! per `jti`, across every replica sharing the store; the store remembers a consumed `jti` until
//! the token's `exp` plus a margin (after that the token no longer verifies anyway), then forgets it.
//!
//! Expiry is evaluated against the injected `now` on every read: a stored `Pending` whose
//! `expires_at` has passed is reported as `Expired` (see [`Approval::status_at`]).
//!
//! Minting and verifying tokens is not here (`decide::approval`); neither is the issuance freeze
//! (the admin API checks it before calling `approve`).
//!
//! Owns: the [`Approvals`] trait and its types. Imports: `store::StoreError`, `decide` money/time
//! types, async-trait, serde, serde_json, std. The embedded implementation is
//! [`super::approvals_memory`].

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::decide::time::{rfc3339_micros, rfc3339_seconds};
use crate::decide::{Micros, UnixMillis};

/// Where an approval is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Denied,
    /// Pending past its `expires_at` (never stored: derived from the time).
    Expired,
    /// Its token was used by an admitted request.
    Consumed,
}

impl ApprovalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Denied => "denied",
            ApprovalStatus::Expired => "expired",
            ApprovalStatus::Consumed => "consumed",
        }
    }

    /// Parses the `?status=` query value (lowercase names as in [`Self::as_str`]).
    pub fn parse(s: &str) -> Option<ApprovalStatus> {
        Some(match s {
            "pending" => ApprovalStatus::Pending,
            "approved" => ApprovalStatus::Approved,
            "denied" => ApprovalStatus::Denied,
            "expired" => ApprovalStatus::Expired,
            "consumed" => ApprovalStatus::Consumed,
            _ => return None,
        })
    }
}

/// What an `approval_required` answer asks the store to queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewApproval {
    pub tenant_id: String,
    pub tenant_tier: String,
    pub request_id: String,
    /// The request path (e.g. `/v1/chat/completions`).
    pub route: String,
    pub model: String,
    pub request_fingerprint: String,
    pub estimated_cost: Micros,
    /// The reason codes that required approval.
    pub reasons: Vec<String>,
    pub now: UnixMillis,
    /// Until then it can be approved (now + the token TTL).
    pub expires_at: UnixMillis,
}

impl NewApproval {
    /// The pending approval this request becomes, with a fresh id.
    pub fn into_pending(self) -> Approval {
        Approval {
            approval_id: crate::ids::v7(),
            tenant_id: self.tenant_id,
            tenant_tier: self.tenant_tier,
            request_id: self.request_id,
            route: self.route,
            model: self.model,
            request_fingerprint: self.request_fingerprint,
            estimated_cost: self.estimated_cost,
            reasons: self.reasons,
            status: ApprovalStatus::Pending,
            created_at: self.now,
            expires_at: self.expires_at,
            decided_at: None,
            decided_reason: None,
            consumed_at: None,
        }
    }
}

/// One approval in the queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// UUID v7.
    pub approval_id: String,
    pub tenant_id: String,
    pub tenant_tier: String,
    pub request_id: String,
    pub route: String,
    pub model: String,
    pub request_fingerprint: String,
    pub estimated_cost: Micros,
    pub reasons: Vec<String>,
    /// As stored; readers see [`Approval::status_at`] (the trait's methods already apply it).
    pub status: ApprovalStatus,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    /// When it was approved or denied.
    pub decided_at: Option<UnixMillis>,
    /// The operator's reason for a denial.
    pub decided_reason: Option<String>,
    /// When its token was consumed.
    pub consumed_at: Option<UnixMillis>,
}

impl Approval {
    /// The status as of `now`: a `Pending` past `expires_at` is `Expired`.
    pub fn status_at(&self, now: UnixMillis) -> ApprovalStatus {
        match self.status {
            ApprovalStatus::Pending if now >= self.expires_at => ApprovalStatus::Expired,
            s => s,
        }
    }

    /// Whether it can still be approved or denied at `now`.
    pub fn is_open(&self, now: UnixMillis) -> bool {
        self.status_at(now) == ApprovalStatus::Pending
    }

    /// The admin API's item shape: RFC 3339 UTC timestamps, money as 6-decimal strings, the
    /// status as of `now`.
    pub fn to_json(&self, now: UnixMillis) -> serde_json::Value {
        let ts = |ms: UnixMillis| rfc3339_micros(ms.saturating_mul(1000));
        serde_json::json!({
            "approval_id": self.approval_id,
            "status": self.status_at(now).as_str(),
            "tenant_id": self.tenant_id,
            "tenant_tier": self.tenant_tier,
            "request_id": self.request_id,
            "route": self.route,
            "model": self.model,
            "request_fingerprint": self.request_fingerprint,
            "estimated_cost_usd": self.estimated_cost.to_string(),
            "reasons": self.reasons,
            "created_at": ts(self.created_at),
            "expires_at": rfc3339_seconds(self.expires_at),
            "decided_at": self.decided_at.map(ts),
            "decided_reason": self.decided_reason,
            "consumed_at": self.consumed_at.map(ts),
        })
    }
}

/// Why an approval could not be approved or denied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalTransitionError {
    /// 404 at the API.
    #[error("approval not found")]
    NotFound,
    /// 409 `approval_not_pending`: already approved, denied, consumed, or expired.
    #[error("approval is not pending (it is {})", .0.as_str())]
    NotPending(ApprovalStatus),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result of [`Approvals::consume`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumeOutcome {
    /// First use: the request may go ahead.
    Consumed,
    /// Used before (here or on another replica): 409 `approval_token_replayed`.
    Replayed,
}

/// The approval queue and the consumed-token set.
#[async_trait]
pub trait Approvals: Send + Sync {
    /// Queues a pending approval. If the same tenant already has a pending, unexpired approval for
    /// the same fingerprint, that one is returned instead (a client retrying the same expensive
    /// request does not flood the queue).
    async fn create_pending(&self, a: NewApproval) -> Result<Approval, StoreError>;
    async fn get(&self, approval_id: &str, now: UnixMillis) -> Result<Option<Approval>, StoreError>;
    /// Newest first, at most `limit`; `status` filters on the status as of `now`.
    async fn list(
        &self,
        status: Option<ApprovalStatus>,
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<Approval>, StoreError>;
    /// Pending and unexpired → `Approved`; otherwise `NotPending` (or `NotFound`).
    async fn approve(&self, approval_id: &str, now: UnixMillis) -> Result<Approval, ApprovalTransitionError>;
    /// Pending and unexpired → `Denied` with the operator's reason; otherwise `NotPending`.
    async fn deny(
        &self,
        approval_id: &str,
        reason: Option<&str>,
        now: UnixMillis,
    ) -> Result<Approval, ApprovalTransitionError>;
    /// Spends the token `jti` (its `exp` in Unix seconds), atomically: the first call answers
    /// `Consumed`, every later one `Replayed` until `exp` + a margin has passed. A known approval
    /// with that id (pending or approved) becomes `Consumed`. Call it only once the request is
    /// admitted.
    async fn consume(&self, jti: &str, exp_s: i64, now: UnixMillis) -> Result<ConsumeOutcome, StoreError>;
    /// Pending, unexpired approvals (`valdrics_ops_enforcement_approval_queue_backlog`).
    async fn backlog(&self, now: UnixMillis) -> Result<u64, StoreError>;
    /// Makes every change so far durable against power loss (fsync); called by the housekeeper.
    async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
