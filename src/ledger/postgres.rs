//! The central Postgres ledger (CONTRACT §7): table `enforcement_ledger`, append-only.
//!
//! - [`migrate`] creates (idempotently, under an advisory lock, in one transaction) the table,
//!   its indexes — `(tenant_id, occurred_at)`, `(reservation_id)` and `(occurred_at)` for the
//!   unfiltered newest-first listing — and the triggers rejecting `UPDATE`, `DELETE` and
//!   `TRUNCATE`.
//! - [`PostgresSink`] inserts a whole batch in one statement (`INSERT … SELECT FROM UNNEST(text
//!   arrays) ON CONFLICT (event_id) DO NOTHING`), so a replayed batch stores each `event_id`
//!   exactly once. A small pool ([`POOL_SIZE`] connections) is connected lazily and reconnected
//!   after any connection error; the relay owns retry and backoff.
//! - [`query`] / [`PostgresSink::query`] serve `GET /api/v1/enforcement/ledger`.
//!
//! Values are passed as text and cast by the server (`::uuid`, `::timestamptz`, `::jsonb`):
//! the crate builds tokio-postgres without its uuid/json/chrono features. `payload` is the event
//! object of CONTRACT §7 (money stays a six-decimal string inside it).
//!
//! TLS: connections are made without TLS (`NoTls`); a URL with `sslmode=require` is refused by
//! the configuration check ([`check_url`]). Run the ledger on a private network or a local
//! socket proxy.
//!
//! Owns: the ledger schema and its SQL. Imports: event, sink, LedgerFilter, tokio-postgres.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

use crate::decide::time::rfc3339_micros;
use crate::ledger::event::{Event, EventLine};
use crate::ledger::sink::{Sink, SinkError};
use crate::ledger::LedgerFilter;

/// Connections per sink (one for the relay, one for admin queries).
pub const POOL_SIZE: usize = 2;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one insert or query round trip.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The server-side `statement_timeout` of the sink's sessions (unless the URL sets `options`),
/// shorter than [`STATEMENT_TIMEOUT`]: the server cancels what the sink would stop waiting for.
pub const SERVER_STATEMENT_TIMEOUT: Duration = Duration::from_secs(25);

/// Idempotent schema. Serialised by an advisory lock so concurrent `migrate`s do not race.
const MIGRATION: &str = r#"
SELECT pg_advisory_xact_lock(4242001001);
CREATE TABLE IF NOT EXISTS enforcement_ledger (
    event_id       uuid        PRIMARY KEY,
    event_type     text        NOT NULL,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    tenant_id      text,
    reservation_id text,
    decision       text,
    payload        jsonb       NOT NULL
);
-- Each index on this table, whatever holds its usual name (a table renamed aside keeps its
-- indexes and their names: CREATE INDEX IF NOT EXISTS would then skip the new table's).
DO $do$
DECLARE
    ix record;
    ix_name text;
BEGIN
    FOR ix IN SELECT * FROM (VALUES
        ('enforcement_ledger_tenant_occurred_idx', '(tenant_id, occurred_at)'),
        ('enforcement_ledger_reservation_idx', '(reservation_id)'),
        ('enforcement_ledger_occurred_idx', '(occurred_at)')) AS v(base, cols)
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = current_schema()
                       AND tablename = 'enforcement_ledger' AND starts_with(indexname, ix.base)) THEN
            ix_name := ix.base;
            IF to_regclass(quote_ident(current_schema()) || '.' || quote_ident(ix_name)) IS NOT NULL THEN
                ix_name := ix.base || '_' || to_char(clock_timestamp(), 'YYYYMMDDHH24MISSUS');
            END IF;
            EXECUTE format('CREATE INDEX %I ON enforcement_ledger %s', ix_name, ix.cols);
        END IF;
    END LOOP;
END
$do$;
CREATE OR REPLACE FUNCTION enforcement_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'enforcement_ledger is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$fn$;
DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'enforcement_ledger_no_update_delete'
                   AND tgrelid = 'enforcement_ledger'::regclass) THEN
        CREATE TRIGGER enforcement_ledger_no_update_delete BEFORE UPDATE OR DELETE ON enforcement_ledger
            FOR EACH ROW EXECUTE FUNCTION enforcement_ledger_append_only();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'enforcement_ledger_no_truncate'
                   AND tgrelid = 'enforcement_ledger'::regclass) THEN
        CREATE TRIGGER enforcement_ledger_no_truncate BEFORE TRUNCATE ON enforcement_ledger
            FOR EACH STATEMENT EXECUTE FUNCTION enforcement_ledger_append_only();
    END IF;
END
$do$;
"#;

const INSERT: &str = "INSERT INTO enforcement_ledger \
     (event_id, event_type, occurred_at, tenant_id, reservation_id, decision, payload) \
     SELECT u.event_id::uuid, u.event_type, u.occurred_at::timestamptz, u.tenant_id, u.reservation_id, \
            u.decision, u.payload::jsonb \
     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[]) \
          AS u(event_id, event_type, occurred_at, tenant_id, reservation_id, decision, payload) \
     ON CONFLICT (event_id) DO NOTHING";

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid PREAUTH_LEDGER_URL: {0}")]
    Url(String),
    #[error("postgres: {}", crate::ledger::sink::error_chain(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("postgres: timed out after {0:?}")]
    Timeout(Duration),
    #[error("ledger row with an unreadable payload: {0}")]
    Payload(String),
}

pub(crate) fn parse_url(url: &str) -> Result<tokio_postgres::Config, PgError> {
    let mut c = tokio_postgres::Config::from_str(url).map_err(|e| PgError::Url(e.to_string()))?;
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(CONNECT_TIMEOUT);
    }
    if c.get_application_name().is_none() {
        c.application_name("preauth-sidecar");
    }
    if c.get_options().is_none() {
        // The server gives up on a statement before this sink does: a statement the sink stopped
        // waiting for (a table lock held for minutes) must not stay queued on the server behind
        // the lock while the sink opens another connection, one more every attempt.
        c.options(format!("-c statement_timeout={}", SERVER_STATEMENT_TIMEOUT.as_millis()));
    }
    Ok(c)
}

async fn connect(config: &tokio_postgres::Config) -> Result<Client, PgError> {
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls))
        .await
        .map_err(|_| PgError::Timeout(CONNECT_TIMEOUT))??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            // The cause is in the source chain ("db error" alone said nothing: 57P01 is an
            // administrator's pg_terminate_backend, 57P02/57P03 a restart or shutdown).
            tracing::warn!(
                error = %crate::ledger::sink::error_chain(&e),
                sqlstate = e.code().map_or("", |c| c.code()),
                "ledger postgres connection closed; the next insert reconnects"
            );
        }
    });
    Ok(client)
}

async fn timed<T>(f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T, PgError> {
    Ok(tokio::time::timeout(STATEMENT_TIMEOUT, f).await.map_err(|_| PgError::Timeout(STATEMENT_TIMEOUT))??)
}

/// Whether `url` is a Postgres URL this sink can connect with: it parses, and it does not demand
/// TLS (`sslmode=require`), which is not supported yet (connections are made with `NoTls`).
pub fn check_url(url: &str) -> Result<(), String> {
    let c = parse_url(url).map_err(|e| match e {
        PgError::Url(_) => {
            "invalid Postgres URL (expected postgres://user[:password]@host[:port]/database[?options])".to_string()
        }
        other => other.to_string(),
    })?;
    if c.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err("sslmode=require: TLS to the Postgres ledger is not supported yet; use sslmode=disable \
                    (or prefer) over a private network or a local TLS proxy"
            .into());
    }
    Ok(())
}

/// Creates or completes the ledger schema (`preauth-sidecar migrate`). Safe to run again, and
/// concurrently. `true` when the table was created by this run.
pub async fn migrate(url: &str) -> Result<bool, PgError> {
    let mut client = connect(&parse_url(url)?).await?;
    let tx = client.transaction().await?;
    let existed: bool = timed(tx.query_one("SELECT to_regclass('enforcement_ledger') IS NOT NULL", &[])).await?.get(0);
    timed(tx.batch_execute(MIGRATION)).await?;
    timed(tx.commit()).await?;
    Ok(!existed)
}

/// One ledger query on a fresh connection (see [`PostgresSink::query`] for the pooled one).
pub async fn query(url: &str, filter: &LedgerFilter) -> Result<Vec<Event>, PgError> {
    let client = connect(&parse_url(url)?).await?;
    run_query(&client, filter).await
}

async fn run_query(client: &Client, f: &LedgerFilter) -> Result<Vec<Event>, PgError> {
    let mut sql = String::from("SELECT payload::text FROM enforcement_ledger WHERE true");
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut add = |sql: &mut String, cond: &str, v: Box<dyn ToSql + Sync + Send>| {
        params.push(v);
        sql.push_str(&cond.replace('?', &format!("${}", params.len())));
    };
    if let Some(t) = f.start_at_us {
        add(&mut sql, " AND occurred_at >= ?::text::timestamptz", Box::new(rfc3339_micros(t)));
    }
    if let Some(t) = f.end_at_us {
        add(&mut sql, " AND occurred_at <= ?::text::timestamptz", Box::new(rfc3339_micros(t)));
    }
    if let Some(t) = &f.tenant_id {
        add(&mut sql, " AND tenant_id = ?", Box::new(t.clone()));
    }
    if let Some(t) = f.event_type {
        add(&mut sql, " AND event_type = ?", Box::new(t.as_str().to_string()));
    }
    if let Some(r) = &f.reservation_id {
        add(&mut sql, " AND reservation_id = ?", Box::new(r.clone()));
    }
    let limit = f.limit.clamp(1, LedgerFilter::MAX_LIMIT) as i64;
    add(&mut sql, " ORDER BY occurred_at DESC, event_id DESC LIMIT ?", Box::new(limit));
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
    let rows = timed(client.query(sql.as_str(), &refs)).await?;
    rows.iter()
        .map(|row| {
            let text: String = row.get(0);
            serde_json::from_str(&text).map_err(|e| PgError::Payload(e.to_string()))
        })
        .collect()
}

struct Conn {
    client: Client,
    insert: Statement,
}

/// Batched idempotent inserts into `enforcement_ledger` over a small lazily connected pool.
pub struct PostgresSink {
    config: tokio_postgres::Config,
    slots: Vec<tokio::sync::Mutex<Option<Conn>>>,
    next: AtomicUsize,
}

impl PostgresSink {
    /// Parses the URL; connects on first use.
    pub fn new(url: &str) -> Result<PostgresSink, String> {
        let config = parse_url(url).map_err(|e| e.to_string())?;
        Ok(PostgresSink {
            config,
            slots: (0..POOL_SIZE).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// A connection slot: a free one if any, else the next in turn.
    async fn slot(&self) -> tokio::sync::MutexGuard<'_, Option<Conn>> {
        for s in &self.slots {
            if let Ok(g) = s.try_lock() {
                return g;
            }
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        self.slots[i].lock().await
    }

    async fn ensure<'a>(&self, slot: &'a mut Option<Conn>) -> Result<&'a Conn, PgError> {
        if slot.as_ref().is_some_and(|c| c.client.is_closed()) {
            *slot = None;
        }
        if slot.is_none() {
            let client = connect(&self.config).await?;
            let insert = timed(client.prepare(INSERT)).await?;
            *slot = Some(Conn { client, insert });
        }
        Ok(slot.as_ref().expect("connected above"))
    }

    /// Inserts `batch`; returns the rows actually added (duplicates of stored ids are skipped).
    pub async fn insert(&self, batch: &[EventLine]) -> Result<u64, PgError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let n = batch.len();
        let (mut ids, mut types, mut times) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut tenants, mut reservations, mut decisions, mut payloads) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for e in batch {
            ids.push(e.event_id.as_str());
            types.push(e.event_type.as_str());
            times.push(e.occurred_at.as_str());
            tenants.push(e.tenant_id.as_deref().map(no_nul));
            reservations.push(e.reservation_id.as_deref().map(no_nul));
            decisions.push(e.decision.as_deref().map(no_nul));
            // The line as the outbox holds it (no event built and written again).
            payloads.push(json_no_nul(&e.json));
        }
        let mut guard = self.slot().await;
        let result = match self.ensure(&mut guard).await {
            Ok(conn) => {
                timed(
                    conn.client
                        .execute(&conn.insert, &[&ids, &types, &times, &tenants, &reservations, &decisions, &payloads]),
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            // A server-side error leaves the connection usable; anything else (I/O, timeout,
            // closed) gets a fresh connection next time.
            if !matches!(e, PgError::Db(db) if db.as_db_error().is_some()) {
                *guard = None;
            }
        }
        result
    }

    /// A batch Postgres refused for its data: the events inserted one by one, so that only the
    /// ones it refuses are parked (one event's bad field took its whole batch, other tenants'
    /// events with it, and the batch failed the same way when replayed). Events inserted before
    /// a transient failure are skipped as duplicates when the batch is retried.
    async fn isolate(&self, batch: &[EventLine], mut reason: String) -> Result<(), SinkError> {
        let mut rejected = Vec::new();
        for (i, e) in batch.iter().enumerate() {
            match self.insert(std::slice::from_ref(e)).await.map_err(classify) {
                Ok(_) => {}
                Err(SinkError::Rejected(r)) => {
                    rejected.push(i);
                    reason = r;
                }
                Err(other) => return Err(other),
            }
        }
        SinkError::outcome(batch.len(), rejected, reason)
    }

    /// Ledger query on the pool.
    pub async fn query(&self, filter: &LedgerFilter) -> Result<Vec<Event>, PgError> {
        let mut guard = self.slot().await;
        let result = match self.ensure(&mut guard).await {
            Ok(conn) => run_query(&conn.client, filter).await,
            Err(e) => Err(e),
        };
        if matches!(&result, Err(PgError::Timeout(_)))
            || matches!(&result, Err(PgError::Db(db)) if db.as_db_error().is_none())
        {
            *guard = None;
        }
        result
    }
}

/// `s` with each NUL (which Postgres text cannot hold: a tenant claim or a model name sent with
/// `\u0000`) replaced by U+FFFD.
fn no_nul(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// The JSON text `json` with each `\u0000` escape (which `jsonb` refuses: 22P05) written as
/// `\ufffd`; other escapes, an escaped backslash before `u0000` included, kept.
fn json_no_nul(json: &str) -> Cow<'_, str> {
    if !json.contains("\\u0000") {
        return Cow::Borrowed(json);
    }
    let b = json.as_bytes();
    let mut out = String::with_capacity(json.len());
    let (mut i, mut copied) = (0, 0);
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
        } else if b[i + 1..].starts_with(b"u0000") {
            out.push_str(&json[copied..i]);
            out.push_str("\\ufffd");
            i += 6;
            copied = i;
        } else {
            i += 2; // an escape: the backslash and the character it escapes
        }
    }
    out.push_str(&json[copied..]);
    Cow::Owned(out)
}

/// Retryable unless the server refused the data itself (SQLSTATE class 22 data exception or 23
/// integrity violation): those would fail the same way forever.
fn classify(e: PgError) -> SinkError {
    match &e {
        PgError::Db(db) => match db.as_db_error() {
            Some(d) if d.code().code().starts_with("22") || d.code().code().starts_with("23") => {
                SinkError::Rejected(format!("{}: {}", d.code().code(), d.message()))
            }
            // 42P01 undefined_table: the schema was never created at this URL.
            Some(d) if d.code().code() == "42P01" => SinkError::Retryable(format!(
                "{}: {}; create the schema with `preauth-sidecar migrate` (same PREAUTH_LEDGER_URL), events wait in the outbox until then",
                d.code().code(),
                d.message()
            )),
            Some(d) => SinkError::Retryable(format!("{}: {}", d.code().code(), d.message())),
            None => SinkError::Retryable(e.to_string()),
        },
        PgError::Payload(_) | PgError::Url(_) => SinkError::Rejected(e.to_string()),
        PgError::Timeout(_) => SinkError::Retryable(e.to_string()),
    }
}

#[async_trait]
impl Sink for PostgresSink {
    async fn deliver(&self, batch: &[EventLine]) -> Result<(), SinkError> {
        match self.insert(batch).await.map_err(classify) {
            Err(SinkError::Rejected(reason)) if batch.len() > 1 => self.isolate(batch, reason).await,
            other => other.map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_escapes_become_replacement_characters_and_nothing_else_changes() {
        let line = r#"{"m":"a\u0000b\u0000","n":"c\\u0000d","o":"\\\u0000","p":"\u00000"}"#;
        assert_eq!(json_no_nul(line), r#"{"m":"a\ufffdb\ufffd","n":"c\\u0000d","o":"\\\ufffd","p":"\ufffd0"}"#);
        let v: serde_json::Value = serde_json::from_str(&json_no_nul(line)).unwrap();
        assert_eq!(v["m"], "a\u{FFFD}b\u{FFFD}");
        assert_eq!(v["n"], "c\\u0000d", "an escaped backslash, then the text u0000");
        assert_eq!(v["o"], "\\\u{FFFD}");
        assert_eq!(v["p"], "\u{FFFD}0");
        assert!(matches!(json_no_nul(r#"{"q":"plain"}"#), Cow::Borrowed(_)));
        assert_eq!(no_nul("t\0"), "t\u{FFFD}");
    }
}
