//! HTTP ledger sink: CloudEvents 1.0 in batched mode (`content-type:
//! application/cloudevents-batch+json`), one POST per outbox batch. Each element:
//! `{"specversion":"1.0","id":<event_id>,"source":"preauth-sidecar/<instance_id>",
//! "type":"dev.preauth.<event_type>","time":<occurred_at>,"datacontenttype":"application/json",
//! "data":<the CONTRACT §7 event object>}`.
//!
//! Outcome: 2xx acknowledges the batch. 413 splits it in halves, sent one after the other, until
//! the parts pass (an event refused alone is parked by itself). 400, 409, 413 and 422 (the receiver refuses this
//! batch's content) reject it: it is parked, never looped on. Every other status (5xx, 408, 429,
//! and the configuration failures 3xx — redirects are not followed, configure the final URL —,
//! 401, 403, 404, …), connection errors and timeouts are retryable: the relay backs off and the
//! events wait in the outbox until the receiver is fixed.
//! Receivers deduplicate by `id` (delivery is at-least-once).
//!
//! Owns: the CloudEvents mapping. Imports: event, sink, reqwest.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;

use crate::clock::{Clock, SystemClock};
use crate::jsonw::json_str;
use crate::ledger::event::EventLine;
use crate::ledger::sink::{error_chain, Sink, SinkError};

pub const CONTENT_TYPE: &str = "application/cloudevents-batch+json";
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The JSON body of one batch POST: a CloudEvents 1.0 envelope per event (structured JSON, the
/// fields in the order of the module doc), `data` the event object as the outbox holds it.
pub fn batch_body(batch: &[EventLine], source: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.iter().map(|e| e.json.len() + 256).sum::<usize>() + 2);
    out.push(b'[');
    for (i, e) in batch.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"specversion\":\"1.0\",\"id\":");
        json_str(&mut out, &e.event_id);
        out.extend_from_slice(b",\"source\":");
        json_str(&mut out, source);
        out.extend_from_slice(b",\"type\":\"dev.preauth.");
        out.extend_from_slice(e.event_type.as_str().as_bytes());
        out.extend_from_slice(b"\",\"time\":");
        json_str(&mut out, &e.occurred_at);
        out.extend_from_slice(b",\"datacontenttype\":\"application/json\",\"data\":");
        out.extend_from_slice(e.json.as_bytes());
        out.push(b'}');
    }
    out.push(b']');
    out
}

pub struct HttpSink {
    client: reqwest::Client,
    url: reqwest::Url,
    source: String,
    /// What an HTTP-date `Retry-After` is counted from.
    clock: Arc<dyn Clock>,
}

impl HttpSink {
    pub fn new(url: &str, instance_id: &str) -> Result<HttpSink, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("invalid ledger URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("the HTTP ledger URL must be http:// or https://".into());
        }
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("preauth-sidecar/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(HttpSink { client, url, source: format!("preauth-sidecar/{instance_id}"), clock: Arc::new(SystemClock) })
    }

    /// The same sink counting time on `clock` (tests).
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> HttpSink {
        HttpSink { clock, ..self }
    }

    /// `text` (what the receiver answered, logged and kept with a parked batch) with every
    /// credential of the URL replaced by `<redacted>`: its password, as sent (`Basic` base64 of
    /// `user:password`) and as written, and its query values — a receiver that echoes the
    /// request it refused must not put them in the sidecar's log.
    fn scrub(&self, text: &str) -> String {
        use base64::Engine;
        let decode = |s: &str| percent_decode(s);
        let mut secrets: Vec<String> = Vec::new();
        if let Some(password) = self.url.password() {
            let user = decode(self.url.username());
            let pass = decode(password);
            secrets.push(base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")));
            secrets.push(password.to_string());
            secrets.push(pass);
        }
        if let Some(query) = self.url.query() {
            for value in query.split('&').filter_map(|pair| pair.split_once('=').map(|(_, v)| v)) {
                secrets.push(value.to_string());
                secrets.push(decode(value));
            }
        }
        // Values too short to be credentials would redact ordinary words.
        secrets.retain(|s| s.len() >= 6);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.iter().fold(text.to_string(), |t, s| t.replace(s.as_str(), "<redacted>"))
    }

    /// Scheme, host, port and path only (credentials and the query string are never logged).
    pub fn endpoint(&self) -> String {
        let port = self.url.port().map(|p| format!(":{p}")).unwrap_or_default();
        format!("{}://{}{port}{}", self.url.scheme(), self.url.host_str().unwrap_or(""), self.url.path())
    }
}

/// How a response status is treated: `None` acknowledged, `Some(true)` retryable, `Some(false)`
/// rejected for good. Only statuses that refuse the batch's content (400, 409, 413, 422) reject:
/// every other one (5xx, 408, 429, but also 3xx, 401, 403, 404, 405, 415 …) says the receiver or
/// its configuration is not ready, which is fixed on that side, so the events wait in the outbox.
pub fn classify_status(status: u16) -> Option<bool> {
    match status {
        200..=299 => None,
        400 | 409 | 413 | 422 => Some(false),
        _ => Some(true),
    }
}

/// The pause a 429 or 503 asks for with `Retry-After` (RFC 9110 §10.2.3): delay-seconds, or an
/// HTTP-date counted from `now_ms`. A date already past, or a value that is neither, asks for
/// nothing (the relay's backoff applies).
fn retry_after(status: u16, headers: &reqwest::header::HeaderMap, now_ms: u64) -> Option<Duration> {
    if !matches!(status, 429 | 503) {
        return None;
    }
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?.duration_since(UNIX_EPOCH).ok()?;
    let now = Duration::from_millis(now_ms);
    (at > now).then(|| at - now)
}

/// What the operator can do about a retried status that will not pass by itself.
fn status_hint(status: u16) -> &'static str {
    match status {
        300..=399 => " (redirects are not followed: set PREAUTH_LEDGER_URL to the final URL)",
        401 | 403 => " (the receiver refuses the credentials: check those in PREAUTH_LEDGER_URL)",
        404 | 405 | 410 | 415 => " (the receiver has no CloudEvents batch endpoint here: check PREAUTH_LEDGER_URL)",
        _ => "",
    }
}

#[async_trait]
impl Sink for HttpSink {
    /// One POST of `batch`. 413 (the receiver's body limit) splits it in halves until the parts
    /// pass; an event refused alone is parked by itself, the rest delivered.
    async fn deliver(&self, batch: &[EventLine]) -> Result<(), SinkError> {
        let mut parts = vec![(0, batch.len())];
        let (mut rejected, mut reason) = (Vec::new(), String::new());
        while let Some((a, b)) = parts.pop() {
            match self.post(&batch[a..b]).await {
                Ok(()) => {}
                Err((413, _)) if b - a > 1 => {
                    let mid = a + (b - a) / 2;
                    parts.push((mid, b));
                    parts.push((a, mid));
                }
                Err((_, SinkError::Rejected(msg))) => {
                    rejected.extend(a..b);
                    reason = msg;
                }
                // Retried whole: the receiver deduplicates what parts it already took.
                Err((_, other)) => return Err(other),
            }
        }
        SinkError::outcome(batch.len(), rejected, reason)
    }
}

impl HttpSink {
    /// POSTs `batch` as one CloudEvents batch; a failure comes with the status (0: none).
    async fn post(&self, batch: &[EventLine]) -> Result<(), (u16, SinkError)> {
        if batch.is_empty() {
            return Ok(());
        }
        let body = batch_body(batch, &self.source);
        let resp = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                (0, SinkError::Retryable(format!("{}: {}", self.endpoint(), error_chain(&e.without_url()))))
            })?;
        let status = resp.status().as_u16();
        match classify_status(status) {
            None => Ok(()),
            Some(retryable) => {
                let after = retry_after(status, resp.headers(), self.clock.now_ms());
                let text = resp.text().await.unwrap_or_default();
                let snippet: String = self.scrub(&text).chars().take(300).collect();
                let msg = format!("{} answered {status}{}: {snippet}", self.endpoint(), status_hint(status));
                Err((
                    status,
                    match (retryable, after) {
                        (false, _) => SinkError::Rejected(msg),
                        (true, Some(after)) => SinkError::RetryAfter(msg, after),
                        (true, None) => SinkError::Retryable(msg),
                    },
                ))
            }
        }
    }
}

/// `s` with `%XX` escapes decoded (`+` kept); invalid escapes and bytes left as they are.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::event::{Event, EventType};

    #[test]
    fn envelope_fields() {
        let mut e = Event::new(EventType::ReservationSettled, "i-1", 1_795_600_000_123_456, 3);
        e.actual_cost_usd = Some(crate::decide::Micros(1_500));
        let body = batch_body(&[EventLine::of(&e), EventLine::of(&e)], "preauth-sidecar/i-\"1");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v.as_array().map(Vec::len), Some(2));
        assert_eq!(v[1]["source"], "preauth-sidecar/i-\"1");
        let body = batch_body(&[EventLine::of(&e)], "preauth-sidecar/i-1");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let ce = &v[0];
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], e.event_id.as_str());
        assert_eq!(ce["source"], "preauth-sidecar/i-1");
        assert_eq!(ce["type"], "dev.preauth.reservation_settled");
        assert_eq!(ce["time"], e.occurred_at.as_str());
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["data"]["actual_cost_usd"], "0.001500");
        assert_eq!(serde_json::from_value::<Event>(ce["data"].clone()).unwrap(), e);
        assert_eq!(classify_status(204), None);
        assert_eq!(classify_status(429), Some(true));
        assert_eq!(classify_status(503), Some(true));
        assert_eq!(classify_status(408), Some(true));
        assert_eq!(classify_status(400), Some(false));
        assert_eq!(classify_status(422), Some(false));
        assert_eq!(classify_status(401), Some(true));
        assert_eq!(classify_status(404), Some(true));
        assert_eq!(classify_status(301), Some(true));
    }

    #[test]
    fn retry_after_in_seconds_or_as_an_http_date() {
        let h = |v: &str| {
            let mut m = reqwest::header::HeaderMap::new();
            m.insert(reqwest::header::RETRY_AFTER, v.parse().unwrap());
            m
        };
        // Sun, 06 Nov 1994 08:49:37 GMT = 784111777 s.
        let now_ms = 784_111_777_000 - 90_500;
        assert_eq!(retry_after(429, &h("120"), now_ms), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(503, &h(" 7 "), now_ms), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(429, &h("Sun, 06 Nov 1994 08:49:37 GMT"), now_ms), Some(Duration::from_millis(90_500)));
        // RFC 850 and asctime forms are HTTP-dates too.
        assert_eq!(retry_after(503, &h("Sunday, 06-Nov-94 08:49:37 GMT"), now_ms), Some(Duration::from_millis(90_500)));
        assert_eq!(retry_after(503, &h("Sun Nov  6 08:49:37 1994"), now_ms), Some(Duration::from_millis(90_500)));
        // Past, garbage, negative, or on a status that does not ask for a pause: nothing.
        assert_eq!(retry_after(429, &h("Sun, 06 Nov 1994 08:49:37 GMT"), 784_111_778_000), None);
        assert_eq!(retry_after(429, &h("soon"), now_ms), None);
        assert_eq!(retry_after(429, &h("-5"), now_ms), None);
        assert_eq!(retry_after(500, &h("120"), now_ms), None);
        assert_eq!(retry_after(429, &reqwest::header::HeaderMap::new(), now_ms), None);
    }

    #[test]
    fn what_a_receiver_echoes_of_the_urls_credentials_is_not_logged() {
        use base64::Engine;
        let sink = HttpSink::new("http://ledger:p%40ss-w0rd@127.0.0.1:9/ingest?token=tok-123456&x=1", "i").unwrap();
        let basic = base64::engine::general_purpose::STANDARD.encode("ledger:p@ss-w0rd");
        let echoed = format!("you sent Basic {basic}, p%40ss-w0rd or p@ss-w0rd, to /ingest?token=tok-123456&x=1");
        let out = sink.scrub(&echoed);
        assert!(!out.contains(&basic) && !out.contains("ss-w0rd") && !out.contains("tok-123456"), "{out}");
        assert!(out.contains("x=1") && out.contains("you sent Basic <redacted>"), "{out}");
    }
}
