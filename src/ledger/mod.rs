//! Ledger: every decision, settlement, release, approval step and runtime change as an
//! [`event::Event`], on its way to the central ledger.
//!
//! - [`event`] — the event model (CONTRACT §7).
//! - [`outbox`] — the durable local outbox in `PREAUTH_DATA_DIR/outbox/` (hot-path `append`,
//!   group commit, fsync every 100 ms, cursor, replay after restart, full policy) and its
//!   [`outbox::OutboxSyncer`] background service (fsync, retention, `preauth_outbox_*` metrics).
//! - [`sink`] — the `Sink` trait the relay delivers to, and the choice of sink from `PREAUTH_LEDGER_URL`.
//! - [`postgres`] — the `enforcement_ledger` table: `migrate`, batched idempotent inserts, queries.
//! - [`http_sink`] — CloudEvents 1.0 batches over HTTP(S).
//! - [`relay`] — the background service moving outbox batches into the sink (backoff, parking).
//! - [`local`] — the local ledger (retained outbox segments) when Postgres is not the sink.
//!
//! [`LedgerFilter`] and [`LedgerSource`] serve `GET /api/v1/enforcement/ledger` from whichever of
//! Postgres or the local ledger holds the events.
//!
//! Owns: events, outbox, sinks, relay, ledger queries. Imports: decide (money, time), config,
//! telemetry, tokio-postgres, reqwest, pingora (background services).

pub mod event;
pub mod http_sink;
pub mod local;
pub mod outbox;
pub mod postgres;
pub mod relay;
pub mod sink;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

use crate::decide::time::parse_rfc3339_micros;
use event::{Event, EventType};

/// Filters of `GET /api/v1/enforcement/ledger` (CONTRACT §8). Bounds are inclusive and compare
/// with `occurred_at` to the microsecond (an event's own `occurred_at` as `end_at` includes it,
/// and nothing later); results are newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerFilter {
    /// 1..=1000, default 200.
    pub limit: usize,
    /// Unix microseconds.
    pub start_at_us: Option<u64>,
    pub end_at_us: Option<u64>,
    pub tenant_id: Option<String>,
    pub event_type: Option<EventType>,
    pub reservation_id: Option<String>,
}

impl Default for LedgerFilter {
    fn default() -> Self {
        LedgerFilter {
            limit: LedgerFilter::DEFAULT_LIMIT,
            start_at_us: None,
            end_at_us: None,
            tenant_id: None,
            event_type: None,
            reservation_id: None,
        }
    }
}

impl LedgerFilter {
    pub const DEFAULT_LIMIT: usize = 200;
    pub const MAX_LIMIT: usize = 1000;

    /// Parses a raw (percent-encoded) query string: `limit`, `start_at`, `end_at`, `tenant_id`,
    /// `event_type`, `reservation_id`; other parameters are ignored; empty values mean "unset".
    /// The error is a sentence for a 400 `invalid_request`.
    pub fn from_query(query: &str) -> Result<LedgerFilter, String> {
        let mut f = LedgerFilter::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            if v.is_empty() {
                continue;
            }
            match k {
                "limit" => {
                    f.limit =
                        v.parse::<usize>().ok().filter(|n| (1..=Self::MAX_LIMIT).contains(n)).ok_or_else(|| {
                            format!("limit must be an integer from 1 to {}, got `{v}`", Self::MAX_LIMIT)
                        })?;
                }
                "start_at" => f.start_at_us = Some(parse_time("start_at", &v)?),
                "end_at" => f.end_at_us = Some(parse_time("end_at", &v)?),
                "tenant_id" => f.tenant_id = Some(v),
                "reservation_id" => f.reservation_id = Some(v),
                "event_type" => {
                    f.event_type = Some(EventType::parse(&v).ok_or_else(|| {
                        let all: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
                        format!("event_type `{v}` is not one of {}", all.join(", "))
                    })?)
                }
                _ => {}
            }
        }
        Ok(f)
    }

    /// Whether `e` passes every filter (the limit aside).
    pub fn matches(&self, e: &Event) -> bool {
        if self.event_type.is_some_and(|t| t != e.event_type) {
            return false;
        }
        if self.tenant_id.as_deref().is_some_and(|t| e.tenant_id.as_deref() != Some(t)) {
            return false;
        }
        if self.reservation_id.as_ref().is_some_and(|r| e.reservation_id.as_ref() != Some(r)) {
            return false;
        }
        if self.start_at_us.is_some() || self.end_at_us.is_some() {
            let Some(t) = parse_rfc3339_micros(&e.occurred_at) else { return false };
            if self.start_at_us.is_some_and(|s| t < s) || self.end_at_us.is_some_and(|end| t > end) {
                return false;
            }
        }
        true
    }
}

fn parse_time(name: &str, v: &str) -> Result<u64, String> {
    // A literal `+` in a query string decodes to a space: accept `…T10:00:00 02:00` as `+02:00`.
    parse_rfc3339_micros(v)
        .or_else(|| parse_rfc3339_micros(&v.replace(' ', "+")))
        .ok_or_else(|| format!("{name} must be an RFC 3339 timestamp (e.g. 2026-11-25T10:00:00Z), got `{v}`"))
}

/// `application/x-www-form-urlencoded` value decoding (`+` is a space, `%XX` a byte); invalid
/// escapes are kept literally.
pub fn percent_decode(s: &str) -> String {
    decode(s, true)
}

/// URL path segment decoding (`%XX` a byte, `+` itself): `/tenants/org%2F1` names `org/1`.
pub fn percent_decode_path(s: &str) -> String {
    decode(s, false)
}

fn decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (b.get(i + 1).and_then(|&c| hex(c)), b.get(i + 2).and_then(|&c| hex(c))) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a ledger query failed (the admin API answers 503 for `Unavailable`).
#[derive(Debug, thiserror::Error)]
pub enum LedgerQueryError {
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
}

/// Where `GET /api/v1/enforcement/ledger` reads from: the Postgres ledger when it is the sink,
/// else the local ledger (the retained outbox segments).
#[derive(Clone)]
pub enum LedgerSource {
    Postgres(Arc<postgres::PostgresSink>),
    Local(PathBuf),
}

impl LedgerSource {
    /// Newest first, at most `filter.limit` events.
    pub async fn query(&self, filter: &LedgerFilter) -> Result<Vec<Event>, LedgerQueryError> {
        match self {
            LedgerSource::Postgres(pg) => {
                pg.query(filter).await.map_err(|e| LedgerQueryError::Unavailable(e.to_string()))
            }
            LedgerSource::Local(dir) => {
                // One scan at a time: each reads and parses one or two 16 MiB segments, and a
                // dashboard firing a dozen queries at once took a replica from ≈ 40 to ≈ 670 MB
                // (audit). The others wait their turn.
                static ONE_SCAN: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
                let _turn = ONE_SCAN.acquire().await.map_err(|e| LedgerQueryError::Unavailable(e.to_string()))?;
                let (dir, filter) = (dir.clone(), filter.clone());
                tokio::task::spawn_blocking(move || local::query_local(&dir, &filter))
                    .await
                    .map_err(|e| LedgerQueryError::Unavailable(e.to_string()))?
                    .map_err(|e| LedgerQueryError::Unavailable(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    #[test]
    fn filter_parses_and_validates() {
        let f = LedgerFilter::from_query(
            "limit=5&start_at=2026-11-25T10%3A00%3A00Z&end_at=2026-11-25T12:00:00+02:00&tenant_id=ac%20me&event_type=decision&x=1",
        )
        .unwrap();
        assert_eq!(f.limit, 5);
        assert_eq!(f.start_at_us, parse_rfc3339_micros("2026-11-25T10:00:00Z"));
        assert_eq!(f.end_at_us, parse_rfc3339_micros("2026-11-25T10:00:00Z"));
        assert_eq!(f.tenant_id.as_deref(), Some("ac me"));
        assert_eq!(f.event_type, Some(EventType::Decision));
        assert_eq!(LedgerFilter::from_query("").unwrap(), LedgerFilter::default());
        assert!(LedgerFilter::from_query("limit=1001").is_err());
        assert!(LedgerFilter::from_query("limit=0").is_err());
        assert!(LedgerFilter::from_query("start_at=yesterday").is_err());
        assert!(LedgerFilter::from_query("event_type=nope").is_err());
        assert_eq!(percent_decode("a%2Fb%zz%"), "a/b%zz%");
        assert_eq!(percent_decode_path("a+b%2Fc%zz"), "a+b/c%zz");
    }

    /// Bounds compare with `occurred_at` to the microsecond, inclusive: an event's own time as
    /// `end_at` keeps it and drops one a microsecond later, at any precision the bound is given.
    #[test]
    fn time_bounds_are_exact_to_the_microsecond() {
        let at = |t: &str| {
            let mut e = Event::by(EventType::Decision, "i".into(), 0, 1);
            e.occurred_at = t.into();
            e
        };
        let (e1, e2) = (at("2026-12-05T07:00:26.989133Z"), at("2026-12-05T07:00:26.989134Z"));
        let f = LedgerFilter::from_query("end_at=2026-12-05T07:00:26.989133Z").unwrap();
        assert!(f.matches(&e1) && !f.matches(&e2));
        let f = LedgerFilter::from_query("start_at=2026-12-05T07:00:26.989134Z").unwrap();
        assert!(!f.matches(&e1) && f.matches(&e2));
        // Millisecond precision: 26.989 is 26.989000, before both.
        let f = LedgerFilter::from_query("end_at=2026-12-05T07:00:26.989Z").unwrap();
        assert!(!f.matches(&e1) && !f.matches(&e2));
        let f = LedgerFilter::from_query("end_at=2026-12-05T09:00:26.9891335%2B02:00").unwrap();
        assert!(f.matches(&e1) && !f.matches(&e2), "offsets apply; digits past the microsecond are cut");
    }
}
