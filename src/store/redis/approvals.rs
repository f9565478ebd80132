//! [`Approvals`] on Redis with the semantics of `store::approvals_memory`: approvals as hashes
//! (the record as created in JSON, plus the fields that change: status, decided/consumed times),
//! a newest-first index, a pending index by expiry (backlog), a pending key per tenant and
//! fingerprint (no duplicate queueing), and single use of a token id across every replica:
//! `SET P{approvals}:jti:<jti> 1 NX PXAT <(exp + 300) × 1000>` → Consumed / Replayed.
//!
//! A consumed id is forgotten by the server clock (`PXAT`), not the injected `now`: after the
//! token's `exp` + 5 min it no longer verifies anyway.
//!
//! Owns: the `Approvals` impl. Imports: `store::redis` core, `store::approvals` types.

use std::collections::HashMap;

use async_trait::async_trait;
use redis::Value;

use super::{as_array, as_i64, as_map, as_string, proto, RedisStore};
use crate::decide::time::MS_PER_DAY;
use crate::decide::UnixMillis;
use crate::store::approvals::{
    Approval, ApprovalStatus, ApprovalTransitionError, Approvals, ConsumeOutcome, NewApproval,
};
use crate::store::StoreError;

/// How long an approval is remembered after it ended.
const RETENTION_MS: u64 = MS_PER_DAY;
/// A consumed token id is remembered until its `exp` plus this.
const REPLAY_MARGIN_MS: u64 = 5 * 60 * 1000;
/// At most this many approvals are remembered (oldest forgotten first).
const MAX_APPROVALS: u64 = 100_000;
/// The longest approval-token TTL (ENFORCEMENT_APPROVAL_TOKEN_TTL_SECONDS ≤ 86400).
const MAX_TOKEN_TTL_MS: u64 = MS_PER_DAY;
/// `list` looks at most at this many newest approvals.
const LIST_SCAN: usize = 10_000;

impl RedisStore {
    fn approval_keys(&self) -> (String, String, String) {
        let base = self.inner.keys.approvals_base();
        (format!("{base}by_created"), format!("{base}pending"), base)
    }
}

/// Rebuilds an approval from its hash: the JSON as created, overridden by the changing fields.
fn approval_from_map(m: &HashMap<String, String>) -> redis::RedisResult<Approval> {
    let doc = m.get("doc").ok_or_else(|| proto("approval without doc"))?;
    let mut a: Approval = serde_json::from_str(doc).map_err(|e| proto(format!("approval doc: {e}")))?;
    let ms = |k: &str| m.get(k).and_then(|v| v.parse::<u64>().ok());
    a.status = match m.get("status").map(String::as_str) {
        Some(s) => ApprovalStatus::parse(s).ok_or_else(|| proto(format!("approval status {s:?}")))?,
        None => a.status,
    };
    a.decided_at = ms("decided_at").or(a.decided_at);
    a.consumed_at = ms("consumed_at").or(a.consumed_at);
    if let Some(r) = m.get("decided_reason") {
        a.decided_reason = Some(r.clone());
    }
    Ok(a)
}

fn view(mut a: Approval, now: UnixMillis) -> Approval {
    a.status = a.status_at(now);
    a
}

impl RedisStore {
    async fn approval(&self, op: &'static str, id: &str) -> Result<Option<Approval>, StoreError> {
        let key = format!("{}a:{id}", self.inner.keys.approvals_base());
        self.exec(op, 1, |mut c| async move {
            let m = as_map(redis::cmd("HGETALL").arg(&key).query_async::<Value>(&mut c).await?)?;
            if m.is_empty() {
                return Ok(None);
            }
            approval_from_map(&m).map(Some)
        })
        .await
    }

    async fn decide(
        &self,
        op: &'static str,
        id: &str,
        status: ApprovalStatus,
        reason: Option<&str>,
        now: UnixMillis,
    ) -> Result<Approval, ApprovalTransitionError> {
        let (_, pending, base) = self.approval_keys();
        let mut inv = self.inner.scripts.approval_decide.prepare_invoke();
        inv.key(pending)
            .arg(base)
            .arg(id)
            .arg(now)
            .arg(status.as_str())
            .arg(reason.unwrap_or(""))
            .arg(if reason.is_some() { "1" } else { "0" })
            .arg(RETENTION_MS);
        let (code, current) = self
            .exec(op, 1, |mut c| async move {
                let v = as_array(inv.invoke_async(&mut c).await?)?;
                let code = as_i64(v.first().ok_or_else(|| proto("empty reply"))?)?;
                let current = v.get(1).map(as_string).transpose()?;
                Ok((code, current))
            })
            .await?;
        match code {
            1 => self.approval(op, id).await?.map(|a| view(a, now)).ok_or(ApprovalTransitionError::NotFound),
            0 => Err(ApprovalTransitionError::NotFound),
            _ => {
                let s = current.as_deref().and_then(ApprovalStatus::parse).unwrap_or(ApprovalStatus::Expired);
                Err(ApprovalTransitionError::NotPending(s))
            }
        }
    }
}

#[async_trait]
impl Approvals for RedisStore {
    async fn create_pending(&self, a: NewApproval) -> Result<Approval, StoreError> {
        let now = a.now;
        let approval = a.into_pending();
        let doc = serde_json::to_string(&approval).map_err(|e| StoreError::Unavailable(format!("approval: {e}")))?;
        let (by_created, pending, base) = self.approval_keys();
        let pkey = format!("{base}pkey:{}\n{}", approval.tenant_id, approval.request_fingerprint);
        let mut inv = self.inner.scripts.approval_create.prepare_invoke();
        inv.key(by_created)
            .key(pending)
            .key(pkey)
            .arg(&base)
            .arg(&approval.approval_id)
            .arg(doc)
            .arg(approval.created_at)
            .arg(approval.expires_at)
            .arg(now)
            .arg(RETENTION_MS)
            .arg(MAX_APPROVALS)
            .arg(MAX_TOKEN_TTL_MS);
        let (created, id) = self
            .exec("create_approval", 1, |mut c| async move {
                let v = as_array(inv.invoke_async(&mut c).await?)?;
                if v.len() < 2 {
                    return Err(proto("create approval: short reply"));
                }
                Ok((as_i64(&v[0])? == 1, as_string(&v[1])?))
            })
            .await?;
        if created {
            return Ok(view(approval, now));
        }
        match self.approval("create_approval", &id).await? {
            Some(existing) => Ok(view(existing, now)),
            // Forgotten in between (its TTL ended): an unlikely race; report it as a failure.
            None => Err(StoreError::Unavailable("pending approval vanished; retry".into())),
        }
    }

    async fn get(&self, approval_id: &str, now: UnixMillis) -> Result<Option<Approval>, StoreError> {
        Ok(self.approval("get_approval", approval_id).await?.map(|a| view(a, now)))
    }

    async fn list(
        &self,
        status: Option<ApprovalStatus>,
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<Approval>, StoreError> {
        let (by_created, _, base) = self.approval_keys();
        let mut inv = self.inner.scripts.approval_list.prepare_invoke();
        inv.key(by_created)
            .arg(base)
            .arg(now)
            .arg(limit.min(LIST_SCAN))
            .arg(status.map_or("", ApprovalStatus::as_str))
            .arg(LIST_SCAN);
        self.exec("list_approvals", 1, |mut c| async move {
            let rows = as_array(inv.invoke_async(&mut c).await?)?;
            rows.into_iter().map(|r| Ok(view(approval_from_map(&as_map(r)?)?, now))).collect()
        })
        .await
    }

    async fn approve(&self, approval_id: &str, now: UnixMillis) -> Result<Approval, ApprovalTransitionError> {
        self.decide("approve", approval_id, ApprovalStatus::Approved, None, now).await
    }

    async fn deny(
        &self,
        approval_id: &str,
        reason: Option<&str>,
        now: UnixMillis,
    ) -> Result<Approval, ApprovalTransitionError> {
        self.decide("deny", approval_id, ApprovalStatus::Denied, reason, now).await
    }

    async fn consume(&self, jti: &str, exp_s: i64, now: UnixMillis) -> Result<ConsumeOutcome, StoreError> {
        let (_, pending, base) = self.approval_keys();
        let forget_at = u64::try_from(exp_s).unwrap_or(0).saturating_mul(1000).saturating_add(REPLAY_MARGIN_MS);
        let mut inv = self.inner.scripts.approval_consume.prepare_invoke();
        inv.key(format!("{base}jti:{jti}"))
            .key(pending)
            .arg(&base)
            .arg(jti)
            .arg(forget_at.min(i64::MAX as u64 / 2))
            .arg(now)
            .arg(RETENTION_MS);
        let consumed = self.exec("consume", 1, |mut c| async move { inv.invoke_async::<i64>(&mut c).await }).await?;
        Ok(if consumed == 1 { ConsumeOutcome::Consumed } else { ConsumeOutcome::Replayed })
    }

    async fn backlog(&self, now: UnixMillis) -> Result<u64, StoreError> {
        let (_, pending, _) = self.approval_keys();
        self.exec("approval_backlog", 1, |mut c| async move {
            redis::cmd("ZCOUNT").arg(&pending).arg(format!("({now}")).arg("+inf").query_async::<u64>(&mut c).await
        })
        .await
    }
}
