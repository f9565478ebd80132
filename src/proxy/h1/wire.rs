//! The HTTP/1.1 wire format (RFC 9112) as the sidecar's driver needs it, with no I/O: request
//! heads (parsed by `httparse` into offsets of the connection's buffer, so nothing is copied or
//! allocated per header), response heads from the gateway, chunked coding, and how an answer's
//! body is relayed to the client (as framed, de-chunked for HTTP/1.0 clients, or chunked when the
//! gateway closes to delimit it).
//!
//! Owns: `RequestHead`, `ResponseHead`, `Fields`, `Chunked`, `Relay`, `Framing`. Imports:
//! httparse, http (method), the proxy's header-text rule.

use http::Method;

use crate::proxy::downstream::header_text;
use crate::proxy::extract::names;

/// Largest request or response head accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header lines accepted in one head.
pub const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (with extensions) and the most trailer bytes accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a message cannot be read: the client gets the JSON 400 (a request) or the 502 (an
/// answer from the gateway).
pub type Malformed = &'static str;

/// Header lines of one head, as offsets into the buffer the head was parsed from. Kept by the
/// connection and reused for every message.
#[derive(Default)]
pub struct Fields {
    /// (name start, name end, value start, value end).
    spans: Vec<[u32; 4]>,
    /// Where the first line of each of [`KNOWN`] is in `spans` (+1; 0: absent): the names every
    /// request is asked for, found in the one pass that records the lines.
    known: [u16; KNOWN.len()],
}

/// Header names looked up on every request (lowercase).
const KNOWN: [&str; 4] = ["authorization", "content-length", names::SOURCE, names::APPROVAL_TOKEN];

impl Fields {
    fn fill(&mut self, buf: &[u8], headers: &[httparse::Header<'_>]) {
        self.spans.clear();
        self.known = [0; KNOWN.len()];
        let base = buf.as_ptr() as usize;
        for (i, h) in headers.iter().enumerate() {
            let n = h.name.as_ptr() as usize - base;
            let v = h.value.as_ptr() as usize - base;
            self.spans.push([n as u32, (n + h.name.len()) as u32, v as u32, (v + h.value.len()) as u32]);
            // `eq_ignore_ascii_case` compares lengths first: most lines cost four comparisons.
            if let Some(k) = KNOWN.iter().position(|k| h.name.eq_ignore_ascii_case(k)) {
                if self.known[k] == 0 {
                    self.known[k] = (i + 1) as u16;
                }
            }
        }
    }

    /// The first raw value of `name` (lowercase, any case on the wire).
    pub fn first<'b>(&'b self, buf: &'b [u8], name: &str) -> Option<&'b [u8]> {
        match KNOWN.iter().position(|k| *k == name) {
            Some(k) => {
                let at = usize::from(self.known[k]).checked_sub(1)?;
                let s = self.spans[at];
                Some(&buf[s[2] as usize..s[3] as usize])
            }
            None => self.values(buf, name).next(),
        }
    }

    /// Every (name as sent, raw value) in order.
    pub fn iter<'b>(&'b self, buf: &'b [u8]) -> impl Iterator<Item = (&'b [u8], &'b [u8])> + 'b {
        self.spans.iter().map(move |s| (&buf[s[0] as usize..s[1] as usize], &buf[s[2] as usize..s[3] as usize]))
    }

    /// Every raw value of header `name` (any case).
    pub fn values<'b, 'n>(&'b self, buf: &'b [u8], name: &'n str) -> impl Iterator<Item = &'b [u8]> + use<'b, 'n> {
        self.iter(buf).filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
    }

    /// The first value of `name` (lowercase) as header text (see `header_text`).
    pub fn get<'b>(&'b self, buf: &'b [u8], name: &str) -> Option<&'b str> {
        self.first(buf, name).and_then(header_text)
    }

    /// The framing and persistence headers of a head, in one pass over its lines.
    fn framing(&self, buf: &[u8]) -> Result<FramingHeaders, Malformed> {
        let mut f = FramingHeaders::default();
        for (name, value) in self.iter(buf) {
            let is = |n: &str| name.len() == n.len() && name.eq_ignore_ascii_case(n.as_bytes());
            let tokens = || value.split(|&b| b == b',').map(<[u8]>::trim_ascii);
            if is("content-length") {
                for part in tokens() {
                    let n = parse_decimal(part).ok_or("invalid content-length")?;
                    if f.length.is_some_and(|l| l != n) {
                        return Err("conflicting content-length");
                    }
                    f.length = Some(n);
                }
            } else if is("transfer-encoding") {
                if let Some(last) = tokens().rev().find(|t| !t.is_empty()) {
                    f.chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
                }
                // A coding besides `chunked` (`gzip, chunked`) is one the sidecar cannot undo:
                // the body it would read and decide is not the body the gateway would see.
                if tokens().any(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"chunked")) {
                    f.other_coding = true;
                }
            } else if is("connection") {
                for t in tokens() {
                    let (close, keep_alive) = (t.eq_ignore_ascii_case(b"close"), t.eq_ignore_ascii_case(b"keep-alive"));
                    f.close |= close;
                    f.keep_alive |= keep_alive;
                    f.names_fields |= !(close || keep_alive || t.is_empty());
                }
            } else if is("expect") {
                f.expect_continue |= value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            } else if is("host") {
                f.hosts = f.hosts.saturating_add(1);
            }
        }
        Ok(f)
    }
}

/// What a head's framing and persistence headers say.
#[derive(Default)]
struct FramingHeaders {
    /// `content-length` (every line and list element agreeing).
    length: Option<u64>,
    /// `Some(true)`: the last transfer coding is `chunked`; `Some(false)`: another one is.
    chunked: Option<bool>,
    /// `connection: close` / `connection: keep-alive`.
    close: bool,
    keep_alive: bool,
    /// `connection` names other fields (hop-by-hop for this hop only).
    names_fields: bool,
    /// `transfer-encoding` names a coding other than `chunked`.
    other_coding: bool,
    expect_continue: bool,
    /// `host` lines.
    hosts: u8,
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// How a request's body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestBody {
    Length(u64),
    Chunked,
}

/// A parsed request head (offsets into the connection's buffer).
pub struct RequestHead {
    pub method: Method,
    /// The origin-form target (path and query) to forward.
    target: (u32, u32),
    /// The path alone, for routing.
    path: (u32, u32),
    /// HTTP/1.0 (no chunked answers; persistent only when asked for).
    pub http10: bool,
    pub fields: Fields,
    pub body: RequestBody,
    /// The client allows the connection to carry another request after this one.
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// The `connection` header names fields other than `close` / `keep-alive` (not forwarded).
    pub connection_names_fields: bool,
    /// Bytes of the head, blank line included.
    pub len: usize,
}

impl Default for RequestHead {
    fn default() -> Self {
        RequestHead {
            method: Method::GET,
            target: (0, 0),
            path: (0, 0),
            http10: false,
            fields: Fields::default(),
            body: RequestBody::Length(0),
            keep_alive: false,
            expect_continue: false,
            connection_names_fields: false,
            len: 0,
        }
    }
}

impl RequestHead {
    /// Parses the head at the start of `buf` into `self`. `Ok(false)`: incomplete, read more.
    pub fn parse(&mut self, buf: &[u8]) -> Result<bool, Malformed> {
        let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, &mut headers) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err("request head too large"),
            Ok(httparse::Status::Partial) => return Ok(false),
            Err(httparse::Error::TooManyHeaders) => return Err("too many request headers"),
            Err(_) => return Err("malformed request head"),
        };
        if len > MAX_HEAD_BYTES {
            return Err("request head too large");
        }
        let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
            return Err("malformed request head");
        };
        self.method = Method::from_bytes(method.as_bytes()).map_err(|_| "malformed request method")?;
        let base = buf.as_ptr() as usize;
        let t0 = target.as_ptr() as usize - base;
        let origin = origin_form_start(target.as_bytes());
        let path_len = target.as_bytes()[origin..].iter().position(|&b| b == b'?' || b == b'#');
        let t_start = (t0 + origin) as u32;
        self.target = (t_start, (t0 + target.len()) as u32);
        self.path = (t_start, t_start + path_len.unwrap_or(target.len() - origin) as u32);
        self.http10 = version == 0;
        self.fields.fill(buf, req.headers);
        self.len = len;

        let f = self.fields.framing(buf)?;
        // RFC 9112 §3.2: an HTTP/1.1 request without `host`, or any with more than one, is a 400.
        if f.hosts > 1 || (f.hosts == 0 && !self.http10) {
            return Err("missing or repeated host");
        }
        if f.other_coding {
            return Err("unsupported transfer-encoding");
        }
        self.body = match (f.chunked, f.length) {
            (Some(true), _) => RequestBody::Chunked,
            (Some(false), _) => return Err("unsupported transfer-encoding"),
            (None, n) => RequestBody::Length(n.unwrap_or(0)),
        };
        // Both framings: the chunked one wins (RFC 9112 §6.3), and the connection is not trusted
        // with another request; nor after `transfer-encoding` from HTTP/1.0 (§6.1: faulty framing).
        let suspect = f.chunked.is_some() && (f.length.is_some() || self.http10);
        self.keep_alive = !suspect && !f.close && (!self.http10 || f.keep_alive);
        self.expect_continue = !self.http10 && f.expect_continue;
        self.connection_names_fields = f.names_fields;
        Ok(true)
    }

    /// The path (without query) as text; `""` when it is not UTF-8.
    pub fn path<'b>(&self, buf: &'b [u8]) -> &'b str {
        std::str::from_utf8(&buf[self.path.0 as usize..self.path.1 as usize]).unwrap_or("")
    }

    /// The target to forward (origin form: path and query).
    pub fn target<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        let t = &buf[self.target.0 as usize..self.target.1 as usize];
        if t.is_empty() {
            b"/"
        } else {
            t
        }
    }
}

/// Where the origin form starts in a request target: 0 for `/path`, after the authority for
/// the absolute form (`http://host/path`).
fn origin_form_start(t: &[u8]) -> usize {
    let after_scheme = if t.len() > 7 && t[..7].eq_ignore_ascii_case(b"http://") {
        7
    } else if t.len() > 8 && t[..8].eq_ignore_ascii_case(b"https://") {
        8
    } else {
        return 0;
    };
    t[after_scheme..].iter().position(|&b| b == b'/').map_or(t.len(), |p| after_scheme + p)
}

/// How an answer's body is delimited on the gateway's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseBody {
    /// No body (1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the gateway closes the connection.
    Close,
}

/// A parsed response head from the gateway (offsets into the upstream connection's buffer).
pub struct ResponseHead {
    pub status: u16,
    reason: (u32, u32),
    pub fields: Fields,
    pub body: ResponseBody,
    /// The gateway may be sent another request on this connection once the body is read.
    pub reusable: bool,
    /// The `connection` header names fields other than `close` / `keep-alive`.
    pub connection_names_fields: bool,
    pub len: usize,
}

impl Default for ResponseHead {
    fn default() -> Self {
        ResponseHead {
            status: 0,
            reason: (0, 0),
            fields: Fields::default(),
            body: ResponseBody::Empty,
            reusable: false,
            connection_names_fields: false,
            len: 0,
        }
    }
}

impl ResponseHead {
    /// Parses the head at the start of `buf` into `self`. `Ok(false)`: incomplete, read more.
    pub fn parse(&mut self, buf: &[u8]) -> Result<bool, Malformed> {
        let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len =
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut headers) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err("response head too large"),
                Ok(httparse::Status::Partial) => return Ok(false),
                Err(_) => return Err("malformed response head"),
            };
        let (Some(status), Some(version)) = (resp.code, resp.version) else {
            return Err("malformed response head");
        };
        let base = buf.as_ptr() as usize;
        let reason = resp.reason.unwrap_or("");
        let r0 = if reason.is_empty() { 0 } else { reason.as_ptr() as usize - base };
        self.status = status;
        self.reason = (r0 as u32, (r0 + reason.len()) as u32);
        self.fields.fill(buf, resp.headers);
        self.len = len;
        let f = self.fields.framing(buf)?;
        let keep_alive = !f.close && (version != 0 || f.keep_alive);
        self.body = if (100..200).contains(&status) || status == 204 || status == 304 {
            ResponseBody::Empty
        } else {
            match (f.chunked, f.length) {
                (Some(true), _) => ResponseBody::Chunked,
                (Some(false), _) => ResponseBody::Close,
                (None, Some(n)) => ResponseBody::Length(n),
                (None, None) => ResponseBody::Close,
            }
        };
        self.reusable = keep_alive && self.body != ResponseBody::Close;
        self.connection_names_fields = f.names_fields;
        Ok(true)
    }

    pub fn reason<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.reason.0 as usize..self.reason.1 as usize]
    }
}

/// Incremental decoder of the chunked transfer coding.
#[derive(Clone, Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    /// Bytes of the current size line or of the trailers, for the limits.
    line: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ChunkState {
    /// Reading the size's hex digits (the value so far).
    #[default]
    Start,
    Size(u64),
    /// After the digits: blanks (before `;` or the line end).
    SizeBlank(u64),
    /// After `;`: extensions up to the line's CR.
    Ext(u64),
    /// Saw the size line's CR.
    SizeLf(u64),
    Data(u64),
    /// After a chunk's data: its CR, then its LF.
    DataCr,
    DataLf,
    /// After the last chunk: at the start of a trailer line (an empty one ends the body).
    TrailerStart,
    TrailerLine,
    /// Saw a trailer line's CR.
    TrailerLf,
    /// Saw CR of the final empty line.
    FinalLf,
    Done,
}

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes as much of `input` as belongs to the body, passing every piece of chunk data
    /// to `data`. Returns the bytes consumed (less than `input.len()` only once done).
    ///
    /// Strict framing (RFC 9112 §7.1): a size is hex digits, then optional blanks, then `;`
    /// extensions or the line end; every line ends in CRLF. Anything else is malformed — read
    /// leniently, a size like `0x1ce` or `0 junk` would end the body where a proxy in front sees
    /// it go on, and the rest would be served as a request of its own (smuggling).
    pub fn feed(&mut self, input: &[u8], mut data: impl FnMut(&[u8])) -> Result<usize, Malformed> {
        use ChunkState::*;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            if matches!(self.state, Size(_) | SizeBlank(_) | Ext(_) | SizeLf(_)) {
                self.line += 1;
                if self.line > MAX_CHUNK_LINE {
                    // Leading zeros or endless extensions: the size line would never end.
                    return Err("chunk size line too long");
                }
            }
            match self.state {
                Start => match hex(b) {
                    Some(d) => {
                        self.line = 1;
                        self.state = Size(u64::from(d));
                    }
                    None => return Err("invalid chunk size"),
                },
                Size(v) => match (hex(b), b) {
                    (Some(d), _) => {
                        if v >> 59 != 0 {
                            return Err("chunk size too large");
                        }
                        self.state = Size(v << 4 | u64::from(d));
                    }
                    (None, b' ' | b'\t') => self.state = SizeBlank(v),
                    (None, b';') => self.state = Ext(v),
                    (None, b'\r') => self.state = SizeLf(v),
                    (None, _) => return Err("invalid chunk size"),
                },
                SizeBlank(v) => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = Ext(v),
                    b'\r' => self.state = SizeLf(v),
                    _ => return Err("invalid chunk size"),
                },
                Ext(v) => match b {
                    b'\r' => self.state = SizeLf(v),
                    b'\t' | b' '..=b'~' => {}
                    _ => return Err("invalid chunk extension"),
                },
                SizeLf(v) => {
                    if b != b'\n' {
                        return Err("chunk size line not ended by CRLF");
                    }
                    self.line = 0;
                    self.state = if v == 0 { TrailerStart } else { Data(v) };
                }
                Data(left) => {
                    let n = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    data(&input[i..i + n]);
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 { DataCr } else { Data(left) };
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        return Err("chunk data longer than its size");
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err("chunk data not ended by CRLF");
                    }
                    self.state = Start;
                }
                TrailerStart => match b {
                    b'\r' => self.state = FinalLf,
                    b'\n' => return Err("chunked body end not CRLF"),
                    _ => {
                        self.state = TrailerLine;
                        continue;
                    }
                },
                TrailerLine => {
                    self.line += 1;
                    if self.line > MAX_TRAILERS {
                        return Err("trailers too large");
                    }
                    match b {
                        b'\r' => self.state = TrailerLf,
                        b'\n' => return Err("trailer line not ended by CRLF"),
                        _ => {}
                    }
                }
                TrailerLf => {
                    if b != b'\n' {
                        return Err("trailer line not ended by CRLF");
                    }
                    self.state = TrailerStart;
                }
                FinalLf => {
                    if b != b'\n' {
                        return Err("invalid chunked body end");
                    }
                    self.state = Done;
                    return Ok(i + 1);
                }
                Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// How the answer's body is framed for the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// The gateway's bytes as they are (`content-length`, chunked to an HTTP/1.1 client, none).
    AsIs,
    /// Chunked from the gateway, data only to an HTTP/1.0 client (which reads to the close).
    Dechunk,
    /// Close-delimited from the gateway, chunked for an HTTP/1.1 client (the connection stays).
    Rechunk,
}

/// The header line that announces a chunked answer.
pub const CHUNKED: &[u8] = b"transfer-encoding: chunked\r\n";
/// The last chunk (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

impl Framing {
    /// The client framing for a gateway body, and the header line that announces it (the
    /// gateway's own `content-length` is forwarded as it is).
    pub fn choose(body: ResponseBody, client_http10: bool) -> (Framing, Option<&'static [u8]>) {
        match (body, client_http10) {
            (ResponseBody::Chunked, false) => (Framing::AsIs, Some(CHUNKED)),
            (ResponseBody::Chunked, true) => (Framing::Dechunk, None),
            (ResponseBody::Close, false) => (Framing::Rechunk, Some(CHUNKED)),
            _ => (Framing::AsIs, None),
        }
    }

    /// The framing that shows the caller the body's data only, for a body the caller frames
    /// itself after changing it (chunked to an HTTP/1.1 client, to the close to an HTTP/1.0 one).
    pub fn data_only(body: ResponseBody, client_http10: bool) -> (Framing, Option<&'static [u8]>) {
        let framing = if body == ResponseBody::Chunked { Framing::Dechunk } else { Framing::AsIs };
        (framing, (!client_http10).then_some(CHUNKED))
    }

    /// Whether the client connection can carry another request after such an answer.
    pub fn keeps_client(self, body: ResponseBody) -> bool {
        !matches!((self, body), (Framing::Dechunk, _) | (Framing::AsIs, ResponseBody::Close))
    }
}

/// The answer's body on its way from the gateway to the client.
pub struct Relay {
    body: ResponseBody,
    framing: Framing,
    /// Bytes left of a `content-length` body.
    left: u64,
    chunked: Chunked,
    done: bool,
}

impl Relay {
    pub fn new(body: ResponseBody, framing: Framing) -> Relay {
        let left = if let ResponseBody::Length(n) = body { n } else { 0 };
        let done = matches!(body, ResponseBody::Empty) || left == 0 && matches!(body, ResponseBody::Length(_));
        Relay { body, framing, left, chunked: Chunked::default(), done }
    }

    /// The whole body was read from the gateway.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Takes gateway bytes: appends what the client gets to `out`, shows the body's data to
    /// `data`. Returns the bytes consumed; fewer than `input.len()` means the gateway sent more
    /// than the body (the connection cannot be reused).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>, mut data: impl FnMut(&[u8])) -> Result<usize, Malformed> {
        if self.done {
            return Ok(0);
        }
        match self.body {
            ResponseBody::Empty => Ok(0),
            ResponseBody::Length(_) => {
                let n = input.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
                out.extend_from_slice(&input[..n]);
                data(&input[..n]);
                self.left -= n as u64;
                self.done = self.left == 0;
                Ok(n)
            }
            ResponseBody::Chunked => {
                let n = if self.framing == Framing::Dechunk {
                    self.chunked.feed(input, |d| {
                        out.extend_from_slice(d);
                        data(d);
                    })?
                } else {
                    let n = self.chunked.feed(input, data)?;
                    out.extend_from_slice(&input[..n]);
                    n
                };
                self.done = self.chunked.is_done();
                Ok(n)
            }
            ResponseBody::Close => {
                if !input.is_empty() {
                    if self.framing == Framing::Rechunk {
                        push_chunk(out, input);
                    } else {
                        out.extend_from_slice(input);
                    }
                    data(input);
                }
                Ok(input.len())
            }
        }
    }

    /// The gateway closed its connection: ends a close-delimited body (the chunked terminator
    /// when re-chunking); for any other body the answer is cut short.
    pub fn eof(&mut self, out: &mut Vec<u8>) -> Result<(), Malformed> {
        if self.done {
            return Ok(());
        }
        if self.body != ResponseBody::Close {
            return Err("the gateway closed the connection before the end of the answer");
        }
        if self.framing == Framing::Rechunk {
            out.extend_from_slice(LAST_CHUNK);
        }
        self.done = true;
        Ok(())
    }
}

/// Appends `data` to `out` as one chunk (nothing for empty `data`: that is the last chunk).
pub fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let mut size = [0u8; 16];
    out.extend_from_slice(hex_len(data.len(), &mut size));
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

fn hex_len(n: usize, buf: &mut [u8; 16]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = DIGITS[n & 15];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `raw`, with a `host` line added after the request line when it has none.
    fn req(raw: &str) -> Result<(RequestHead, Vec<u8>), Malformed> {
        let mut h = RequestHead::default();
        let raw = if raw.to_ascii_lowercase().contains("\r\nhost:") {
            raw.to_string()
        } else {
            raw.replacen("\r\n", "\r\nHost: h\r\n", 1)
        };
        let buf = raw.as_bytes().to_vec();
        assert!(h.parse(&buf)?, "complete");
        Ok((h, buf))
    }

    #[test]
    fn request_head_offsets_and_lookups() {
        let (h, buf) = req("POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization:  Bearer t \r\nX-Two: 1\r\nx-two: 2\r\nContent-Length: 12\r\n\r\n{\"model\":1}x").unwrap();
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.path(&buf), "/v1/chat/completions");
        assert_eq!(h.target(&buf), b"/v1/chat/completions?x=1");
        assert_eq!(h.fields.get(&buf, "authorization"), Some("Bearer t"));
        assert_eq!(h.fields.get(&buf, "x-two"), Some("1"));
        assert_eq!(h.fields.values(&buf, "x-two").count(), 2);
        assert_eq!(h.body, RequestBody::Length(12));
        assert!(h.keep_alive && !h.http10 && !h.expect_continue);
        assert_eq!(&buf[h.len..], b"{\"model\":1}x");
    }

    #[test]
    fn known_names_are_indexed_like_a_scan_finds_them() {
        let head = "POST / HTTP/1.1\r\nX-Preauth-Source: batch\r\nx-approval-token: a\r\nX-APPROVAL-TOKEN: b\r\n\
                    Authorizatio: no\r\nAuthorization: Bearer t\r\nContent-Length: 0\r\n\r\n";
        let (h, buf) = req(head).unwrap();
        for name in KNOWN.iter().copied().chain(["x-unknown", "authorizatio", "host"]) {
            assert_eq!(h.fields.first(&buf, name), h.fields.values(&buf, name).next(), "{name}");
        }
        assert_eq!(h.fields.get(&buf, "x-approval-token"), Some("a"), "the first line wins");
        assert_eq!(h.fields.get(&buf, "authorization"), Some("Bearer t"));
        // A second head on the same fields forgets the first one's lines.
        let mut h = h;
        let buf = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert!(h.parse(&buf).unwrap());
        assert_eq!(h.fields.get(&buf, "authorization"), None);
        assert_eq!(h.fields.get(&buf, names::SOURCE), None);
    }

    #[test]
    fn partial_heads_ask_for_more_and_limits_hold() {
        let mut h = RequestHead::default();
        assert_eq!(h.parse(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n"), Ok(false));
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES + 1));
        assert_eq!(h.parse(huge.as_bytes()), Err("request head too large"));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(h.parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()), Err("too many request headers"));
        assert!(h.parse(b"GARBAGE\r\n\r\n").is_err());
        assert!(h.parse(b"GET / HTTP/2.0\r\n\r\n").is_err());
    }

    #[test]
    fn request_framing_and_persistence() {
        // A coding besides chunked is one the sidecar cannot undo (it decides on the plain body).
        assert_eq!(
            req("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").err(),
            Some("unsupported transfer-encoding")
        );
        let (h, _) = req("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!((h.body, h.keep_alive), (RequestBody::Chunked, true));
        let (h, _) = req("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert_eq!((h.body, h.keep_alive), (RequestBody::Chunked, false), "both framings: chunked, then close");
        assert_eq!(
            req("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n").err(),
            Some("unsupported transfer-encoding")
        );
        assert_eq!(req("POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n").err(), Some("conflicting content-length"));
        assert_eq!(
            req("POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n").unwrap().0.body,
            RequestBody::Length(5)
        );
        assert_eq!(req("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").err(), Some("invalid content-length"));
        assert_eq!(req("POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n").err(), Some("invalid content-length"));
        assert!(!req("GET / HTTP/1.1\r\nConnection: Keep-Alive, Close\r\n\r\n").unwrap().0.keep_alive);
        assert!(!req("GET / HTTP/1.0\r\n\r\n").unwrap().0.keep_alive);
        assert!(req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().0.keep_alive);
        assert!(req("POST / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n").unwrap().0.expect_continue);
        assert!(!req("POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").unwrap().0.expect_continue);
        let (h, _) = req("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert_eq!((h.body, h.keep_alive), (RequestBody::Chunked, false), "HTTP/1.0 with transfer-encoding: close");
    }

    #[test]
    fn host_is_required_once_on_http11() {
        let mut h = RequestHead::default();
        assert_eq!(h.parse(b"GET / HTTP/1.1\r\n\r\n"), Err("missing or repeated host"));
        assert_eq!(h.parse(b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n"), Err("missing or repeated host"));
        assert_eq!(h.parse(b"GET / HTTP/1.0\r\nHost: a\r\nHOST: b\r\n\r\n"), Err("missing or repeated host"));
        assert_eq!(h.parse(b"GET / HTTP/1.0\r\n\r\n"), Ok(true), "optional in HTTP/1.0");
        assert_eq!(h.parse(b"GET http://a/ HTTP/1.1\r\n\r\n"), Err("missing or repeated host"), "absolute form too");
        assert_eq!(h.parse(b"GET / HTTP/1.1\r\nhOsT: a\r\n\r\n"), Ok(true));
    }

    #[test]
    fn absolute_form_targets_route_by_their_path() {
        let (h, buf) = req("POST http://gw.example:8080/v1/embeddings?a HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!((h.path(&buf), h.target(&buf)), ("/v1/embeddings", &b"/v1/embeddings?a"[..]));
        let (h, buf) = req("GET http://gw.example HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!((h.path(&buf), h.target(&buf)), ("", &b"/"[..]));
    }

    #[test]
    fn header_text_rules() {
        let (h, buf) = req("GET / HTTP/1.1\r\nA: \r\nB: café\r\nC: x\ty\r\n\r\n").unwrap();
        assert_eq!(h.fields.get(&buf, "a"), None, "empty");
        assert_eq!(h.fields.get(&buf, "b"), None, "not visible ASCII");
        assert_eq!(h.fields.get(&buf, "c"), Some("x\ty"));
    }

    fn resp(raw: &str) -> ResponseHead {
        let mut h = ResponseHead::default();
        assert_eq!(h.parse(raw.as_bytes()), Ok(true));
        h
    }

    #[test]
    fn response_framing() {
        let h = resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!((h.status, h.body, h.reusable), (200, ResponseBody::Length(3), true));
        let h = resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
        assert_eq!((h.body, h.reusable), (ResponseBody::Chunked, false));
        let h = resp("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.body, h.reusable), (ResponseBody::Close, false));
        let h = resp("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.reusable, "HTTP/1.0 without keep-alive");
        assert_eq!(resp("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").body, ResponseBody::Empty);
        assert_eq!(resp("HTTP/1.1 100 Continue\r\n\r\n").body, ResponseBody::Empty);
        let h = resp("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        let buf = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(h.reason(buf), b"Not Found");
    }

    fn dechunk(parts: &[&[u8]]) -> Result<(Vec<u8>, usize, bool), Malformed> {
        let mut c = Chunked::default();
        let mut out = Vec::new();
        let mut used = 0;
        for p in parts {
            used += c.feed(p, |d| out.extend_from_slice(d))?;
        }
        Ok((out, used, c.is_done()))
    }

    #[test]
    fn chunked_decoding_at_every_split() {
        let body = b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let whole = &body[..body.len() - 4];
        for cut in 0..=whole.len() {
            for cut2 in cut..=whole.len() {
                let (out, used, done) = dechunk(&[&whole[..cut], &whole[cut..cut2], &body[cut2..]]).unwrap();
                assert_eq!(out, b"helloabcdefghijklmnopqrstuvwxyz");
                assert_eq!(used, whole.len(), "stops before the next message");
                assert!(done);
            }
        }
        // One byte at a time.
        let (out, _, done) = dechunk(&body.iter().map(std::slice::from_ref).collect::<Vec<_>>()).unwrap();
        assert_eq!((out.len(), done), (31, true));
        assert!(!dechunk(&[b"5\r\nhel"]).unwrap().2);
        assert_eq!(dechunk(&[b"x\r\n"]).err(), Some("invalid chunk size"));
        assert_eq!(dechunk(&[b"2\r\nabc\r\n"]).err(), Some("chunk data longer than its size"));
        assert_eq!(dechunk(&[b"fffffffffffffffff\r\n"]).err(), Some("chunk size too large"));
        let zeros = vec![b'0'; MAX_CHUNK_LINE + 1];
        assert_eq!(dechunk(&[&zeros]).err(), Some("chunk size line too long"), "before the line ends");
        assert_eq!(dechunk(&[b"0\r\n\rx"]).err(), Some("invalid chunked body end"));
        // Blanks before `;` or the line end are fine; nothing else may follow the digits, and
        // every line ends in CRLF: each of these would frame the body differently from a
        // proxy in front that reads the size (or the line end) another way.
        for ok in [&b"5 \r\nhello\r\n0\r\n\r\n"[..], b"5\t; a=\"b c\"\r\nhello\r\n0 ;x\r\n\r\n"] {
            assert_eq!(dechunk(&[ok]).map(|(o, _, d)| (o, d)), Ok((b"hello".to_vec(), true)), "{ok:?}");
        }
        for (bad, why) in [
            (&b"0x1ce\r\n\r\n"[..], "invalid chunk size"),
            (b"0 junk\r\n\r\n", "invalid chunk size"),
            (b"0_1\r\n\r\n", "invalid chunk size"),
            (b"5\nhello\r\n0\r\n\r\n", "invalid chunk size"),
            (b"5\r\rhello", "chunk size line not ended by CRLF"),
            (b"5\r\nhello\n0\r\n\r\n", "chunk data longer than its size"),
            (b"5\r\nhello\r\r\n", "chunk data not ended by CRLF"),
            (b"0\n\n", "invalid chunk size"),
            (b"0\r\n\n", "chunked body end not CRLF"),
            (b"0\r\nT: x\n\r\n", "trailer line not ended by CRLF"),
            (b"1;\x01\r\nx\r\n", "invalid chunk extension"),
        ] {
            assert_eq!(dechunk(&[bad]).err(), Some(why), "{bad:?}");
        }
    }

    #[test]
    fn relay_frames_for_the_client() {
        let mut seen = Vec::new();
        // content-length: exactly the body, extra bytes left over.
        let mut r = Relay::new(ResponseBody::Length(3), Framing::AsIs);
        let mut out = Vec::new();
        assert_eq!(r.feed(b"abcd", &mut out, |d| seen.extend_from_slice(d)), Ok(3));
        assert!(r.is_done());
        assert_eq!((out.as_slice(), seen.as_slice()), (&b"abc"[..], &b"abc"[..]));
        // chunked passed through, data shown.
        let mut r = Relay::new(ResponseBody::Chunked, Framing::AsIs);
        let (mut out, mut seen) = (Vec::new(), Vec::new());
        r.feed(b"3\r\nabc\r\n0\r\n\r\n", &mut out, |d| seen.extend_from_slice(d)).unwrap();
        assert_eq!((out.as_slice(), seen.as_slice(), r.is_done()), (&b"3\r\nabc\r\n0\r\n\r\n"[..], &b"abc"[..], true));
        // de-chunked for HTTP/1.0.
        let mut r = Relay::new(ResponseBody::Chunked, Framing::Dechunk);
        let mut out = Vec::new();
        r.feed(b"3\r\nabc\r\n0\r\n\r\n", &mut out, |_| {}).unwrap();
        assert_eq!(out, b"abc");
        // close-delimited, re-chunked; the close ends it.
        let mut r = Relay::new(ResponseBody::Close, Framing::Rechunk);
        let mut out = Vec::new();
        r.feed(&[b'x'; 26], &mut out, |_| {}).unwrap();
        assert!(!r.is_done());
        r.eof(&mut out).unwrap();
        assert_eq!(out, [&b"1a\r\n"[..], &[b'x'; 26], b"\r\n0\r\n\r\n"].concat());
        // a cut-short body is an error.
        let mut r = Relay::new(ResponseBody::Length(5), Framing::AsIs);
        r.feed(b"ab", &mut Vec::new(), |_| {}).unwrap();
        assert!(r.eof(&mut Vec::new()).is_err());
        assert!(Relay::new(ResponseBody::Length(0), Framing::AsIs).is_done());
        assert!(Relay::new(ResponseBody::Empty, Framing::AsIs).is_done());
    }

    #[test]
    fn framing_choice() {
        assert_eq!(Framing::choose(ResponseBody::Chunked, false).0, Framing::AsIs);
        assert_eq!(Framing::choose(ResponseBody::Chunked, true).0, Framing::Dechunk);
        assert_eq!(Framing::choose(ResponseBody::Close, false).0, Framing::Rechunk);
        assert_eq!(Framing::choose(ResponseBody::Length(1), true), (Framing::AsIs, None));
        assert!(!Framing::AsIs.keeps_client(ResponseBody::Close));
        assert!(Framing::Rechunk.keeps_client(ResponseBody::Close));
        assert!(!Framing::Dechunk.keeps_client(ResponseBody::Chunked));
    }
}
