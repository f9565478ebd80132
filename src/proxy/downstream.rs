//! What the proxy phases need of one client request, whichever driver carries it: the sidecar's
//! own HTTP/1 driver (`h1`) or pingora's session (h2c). The phases (`inspect`, the gate API,
//! `respond`) are written once against this trait.
//!
//! Owns: `Downstream`, its implementation for pingora's `ServerSession`. Imports: pingora's
//! session and header types.

use std::future::Future;

use bytes::Bytes;
use http::Method;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;

/// Longest wait for each piece of a request body on pingora's path (h2c), as the HTTP/1
/// driver's read timeout.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// One client request and the connection it arrived on.
pub(crate) trait Downstream: Send {
    fn method(&self) -> &Method;

    /// The request path, without the query.
    fn path(&self) -> &str;

    /// The first value of header `name` (lowercase), trimmed, when it is non-empty visible ASCII.
    fn header(&self, name: &str) -> Option<&str>;

    /// How many lines carry header `name` (lowercase).
    fn header_count(&self, name: &str) -> usize;

    /// Whether this driver forwards a body read by [`Downstream::read_body`] itself (every body is
    /// then read and decided before the gateway is contacted). pingora's proxy can only replay
    /// what its retry buffer holds (64 KiB).
    fn forwards_read_body(&self) -> bool;

    /// The whole request body (`Expect: 100-continue` is answered first). `Ok(None)`: it is
    /// longer than `limit` bytes (and was not read to its end).
    fn read_body(&mut self, limit: u64) -> impl Future<Output = Result<Option<Bytes>>> + Send;

    /// Writes a complete answer made by the sidecar (`content-length` is added). When the request
    /// body was not read to its end the connection is closed after it.
    fn answer(
        &mut self,
        status: u16,
        headers: &[(&'static str, &str)],
        body: &[u8],
    ) -> impl Future<Output = Result<()>> + Send;
}

/// `value` as HTTP header text: visible ASCII, spaces and tabs (what `HeaderValue::to_str`
/// accepts), trimmed; `None` when empty.
pub(crate) fn header_text(value: &[u8]) -> Option<&str> {
    // Branch-free over every byte (vectorised; bearer tokens are hundreds of bytes).
    let bad = value.iter().fold(false, |bad, &b| bad | ((b < b' ' && b != b'\t') | (b > b'~')));
    if bad {
        return None;
    }
    // All ASCII: valid UTF-8.
    let s = std::str::from_utf8(value).ok()?.trim();
    (!s.is_empty()).then_some(s)
}

impl Downstream for ServerSession {
    fn method(&self) -> &Method {
        &self.req_header().method
    }

    fn path(&self) -> &str {
        self.req_header().uri.path()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.req_header().headers.get(name).and_then(|v| header_text(v.as_bytes()))
    }

    fn header_count(&self, name: &str) -> usize {
        self.req_header().headers.get_all(name).iter().count()
    }

    fn forwards_read_body(&self) -> bool {
        false
    }

    async fn read_body(&mut self, limit: u64) -> Result<Option<Bytes>> {
        let expects = self.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if expects && self.as_http1().is_some() && self.response_written().is_none() && !self.is_body_done() {
            self.write_response_header(Box::new(ResponseHeader::build(100, Some(0))?)).await?;
        }
        self.enable_retry_buffering();
        let mut body = Vec::new();
        // Each read within the HTTP/1 driver's read timeout: an h2c stream whose body never
        // comes would otherwise be held (and counted in flight) for good.
        loop {
            let chunk = match tokio::time::timeout(BODY_READ_TIMEOUT, self.read_request_body()).await {
                Ok(r) => r?,
                Err(_) => return Error::e_explain(ReadTimedout, "reading the request body").map_err(|e| e.into_down()),
            };
            let Some(chunk) = chunk else { break };
            if body.len() as u64 + chunk.len() as u64 > limit {
                return Ok(None);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Some(Bytes::from(body)))
    }

    async fn answer(&mut self, status: u16, headers: &[(&'static str, &str)], body: &[u8]) -> Result<()> {
        let mut resp = ResponseHeader::build(status, Some(headers.len() + 1))?;
        for (name, value) in headers {
            resp.insert_header(*name, *value)?;
        }
        resp.insert_header("content-length", body.len().to_string())?;
        if !self.is_body_done() {
            // The unread body would poison a reused connection.
            self.set_keepalive(None);
        }
        self.write_response_header(Box::new(resp)).await?;
        self.write_response_body(Bytes::copy_from_slice(body), true).await
    }
}
