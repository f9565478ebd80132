//! Where the relay delivers outbox batches: the [`Sink`] trait, its error contract, and the
//! choice of sink from `PREAUTH_LEDGER_URL` (`postgres://…` / `postgresql://…` → the
//! `enforcement_ledger` table; `http://…` / `https://…` → CloudEvents batches).
//!
//! A sink must be idempotent per `event_id`: delivery is at-least-once (a batch whose
//! acknowledgement was lost, or that was in flight at a crash, is delivered again).
//!
//! Owns: `Sink`, `SinkError`, `LedgerTarget`, `sink_from_url`. Imports: event, postgres, http_sink.

use std::sync::Arc;

use async_trait::async_trait;

use crate::ledger::event::EventLine;

/// Why a batch was not delivered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Transient or fixed on the receiver's side (connection refused, timeout, 5xx, 408, 429,
    /// 401/403/404, database unavailable): retried with backoff until it succeeds.
    #[error("retryable: {0}")]
    Retryable(String),
    /// Retryable, and the receiver asked for this long a pause first (`Retry-After` on a 429 or
    /// 503): the relay waits at least that long (at most [`MAX_RETRY_AFTER`]).
    #[error("retryable in {}s: {}", .1.as_secs(), .0)]
    RetryAfter(String, std::time::Duration),
    /// The receiver refuses this batch for good (400, 409, 413, 422, invalid data): the relay parks the batch in
    /// `outbox/parked/`, logs an error and moves on instead of looping.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The receiver refused these events of the batch (their indices) for good and stored the
    /// others: the relay parks only those and moves on.
    #[error("rejected {} events: {reason}", rejected.len())]
    PartlyRejected { reason: String, rejected: Vec<usize> },
}

impl SinkError {
    /// The outcome of a batch of `len` events delivered event by event or part by part: those at
    /// `rejected` refused for good (the last one for `reason`), the others stored.
    pub fn outcome(len: usize, rejected: Vec<usize>, reason: String) -> Result<(), SinkError> {
        match rejected.len() {
            0 => Ok(()),
            n if n == len => Err(SinkError::Rejected(reason)),
            _ => Err(SinkError::PartlyRejected { reason, rejected }),
        }
    }
}

/// The longest `Retry-After` the relay honours.
pub const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

/// A ledger receiver. `deliver` returns `Ok` only once every event of `batch` is stored.
#[async_trait]
pub trait Sink: Send + Sync {
    async fn deliver(&self, batch: &[EventLine]) -> Result<(), SinkError>;
}

/// `e` and each of its causes, `: `-separated ("error sending request: client error (Connect):
/// tcp connect error: Connection refused (os error 111)"): the top-level message of an HTTP or
/// Postgres client error alone does not tell the operator what went wrong. Causes that repeat
/// the previous message are skipped.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !m.is_empty() && !last.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        last = m;
        cause = c.source();
    }
    out
}

/// What `PREAUTH_LEDGER_URL` points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LedgerTarget {
    Postgres,
    Http,
}

impl LedgerTarget {
    /// Classifies a ledger URL by scheme; the error is a sentence for the config report.
    pub fn of(url: &str) -> Result<LedgerTarget, String> {
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("postgres" | "postgresql") => Ok(LedgerTarget::Postgres),
            Some("http" | "https") => Ok(LedgerTarget::Http),
            _ => Err("must start with postgres://, postgresql://, http:// or https://".to_string()),
        }
    }
}

/// `true` for `postgres://` and `postgresql://` URLs.
pub fn is_postgres_url(url: &str) -> bool {
    LedgerTarget::of(url) == Ok(LedgerTarget::Postgres)
}

/// Whether `url` is a ledger URL the sinks can use (the configuration check, so that
/// `check-config` and `run` refuse the same URLs, exit 64); the error is a sentence for the
/// config report and never contains the URL's credentials.
pub fn check_url(url: &str) -> Result<(), String> {
    match LedgerTarget::of(url)? {
        LedgerTarget::Postgres => crate::ledger::postgres::check_url(url),
        LedgerTarget::Http => match reqwest::Url::parse(url) {
            Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
            Ok(_) => Err("the HTTP ledger URL has no host".into()),
            Err(e) => Err(format!("invalid HTTP ledger URL: {e}")),
        },
    }
}

/// The sink for `url`. Nothing is connected yet (the relay connects, and reconnects, on use), so
/// this succeeds while the ledger is down; it fails only on a malformed URL.
pub fn sink_from_url(url: &str, instance_id: &str) -> Result<Arc<dyn Sink>, String> {
    Ok(match LedgerTarget::of(url)? {
        LedgerTarget::Postgres => Arc::new(crate::ledger::postgres::PostgresSink::new(url)?),
        LedgerTarget::Http => Arc::new(crate::ledger::http_sink::HttpSink::new(url, instance_id)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_by_scheme() {
        assert_eq!(LedgerTarget::of("postgres://u@h/db"), Ok(LedgerTarget::Postgres));
        assert_eq!(LedgerTarget::of("PostgreSQL://u@h/db"), Ok(LedgerTarget::Postgres));
        assert_eq!(LedgerTarget::of("https://ledger.example/ingest"), Ok(LedgerTarget::Http));
        assert!(LedgerTarget::of("ftp://x").is_err());
        assert!(LedgerTarget::of("nonsense").is_err());
        assert!(sink_from_url("postgres://postgres@127.0.0.1:1/x", "i").is_ok());
        assert!(sink_from_url("http://127.0.0.1:1/ingest", "i").is_ok());
    }
}
