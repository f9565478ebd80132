//! Incremental usage extraction from upstream response bodies (CONTRACT §6 settlement).
//!
//! Owns: `UsageScanner` (fed response-body chunks as they pass, split at any byte boundary),
//! `BodyKind`, `ScanResult`, and the normalisation of provider usage shapes into `Usage`
//! (semantics in `usage_types.rs`). It only reads the bytes it is shown: it never holds, delays or
//! changes the stream. Imports: std, serde, serde_json, and the sibling modules `route`,
//! `usage_types` and `estimate` (for counting observed output text). Pure: no I/O, no clock.
//!
//! Shapes understood:
//! - OpenAI chat/completions JSON and SSE (`usage.prompt_tokens`, `completion_tokens`,
//!   `prompt_tokens_details.cached_tokens`, `completion_tokens_details.reasoning_tokens`; in SSE the
//!   final chunk carries `usage`, earlier chunks may carry `"usage": null`);
//! - OpenAI Responses JSON and SSE (`usage.input_tokens`, `output_tokens`,
//!   `input_tokens_details.cached_tokens`, `output_tokens_details.reasoning_tokens`; in SSE inside
//!   `response` of `response.completed` / `response.incomplete` / `response.failed`);
//! - OpenAI embeddings JSON (`usage.prompt_tokens`; no output);
//! - Anthropic Messages JSON and SSE (`input_tokens`, `output_tokens`, `cache_read_input_tokens`,
//!   `cache_creation_input_tokens`; normalised as prompt = input + cache reads + cache writes,
//!   cached = cache reads; in SSE `message_start` carries `message.usage` and `message_delta`
//!   carries cumulative `usage`, the last value of each field wins).
//!
//! SSE cost: only the partial last line is kept (at most `MAX_SSE_LINE_BYTES`); a line is
//! deserialised only when it holds a usage object (`"usage": {`) or, once, the model name;
//! output text is counted by locating the delta string values in place.

use super::estimate::TokenCounter;
use super::route::Route;
use super::usage_types::Usage;

/// Longest SSE line kept; a longer line is dropped and counted as unparsable.
pub const MAX_SSE_LINE_BYTES: usize = 1 << 20;
/// Largest JSON body buffered for parsing; beyond it the scanner gives up (usage `None`).
pub const MAX_JSON_BODY_BYTES: usize = 8 << 20;

/// How the response body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// One JSON document.
    Json,
    /// Server-sent events (`text/event-stream`).
    Sse,
}

impl BodyKind {
    /// `Sse` for a `text/event-stream` content type, else `Json`.
    pub fn from_content_type(content_type: Option<&str>) -> BodyKind {
        match content_type {
            Some(ct) if ct.trim_start().get(..17).is_some_and(|p| p.eq_ignore_ascii_case("text/event-stream")) => {
                BodyKind::Sse
            }
            _ => BodyKind::Json,
        }
    }
}

/// What a scan found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanResult {
    /// Provider-reported usage, normalised (see `usage_types.rs`); `None` when the body ended
    /// before it (cut stream), was too large, or did not carry it.
    pub usage: Option<Usage>,
    /// Estimated tokens of the output text seen (content, tool-call arguments, thinking); for
    /// settling cut streams and bodies without usage. A JSON body that reports usage is not
    /// counted (0): the figure would never be used.
    pub observed_output_tokens: u64,
    /// The model the provider reported, if seen.
    pub model: Option<String>,
}

// ---------------------------------------------------------------------------- wire structs

#[derive(serde::Deserialize, Default, Debug, PartialEq)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

/// Every usage field of every shape; absent and `null` fields are `None`.
#[derive(serde::Deserialize, Default, Debug, PartialEq)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    completion_tokens_details: Option<Details>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
    #[serde(default)]
    output_tokens_details: Option<Details>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

#[derive(serde::Deserialize, Debug, PartialEq)]
struct Inner {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<RawUsage>,
}

/// A JSON body or an SSE data payload: only the fields that matter.
#[derive(serde::Deserialize, Debug, PartialEq)]
struct Frame {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<RawUsage>,
    /// Anthropic `message_start`.
    #[serde(default)]
    message: Option<Inner>,
    /// Responses API stream events.
    #[serde(default)]
    response: Option<Inner>,
}

fn details(d: &Option<Details>, f: fn(&Details) -> Option<u64>) -> Option<u64> {
    d.as_ref().and_then(f)
}

/// OpenAI chat/completions/embeddings and Responses usage → `Usage`.
fn openai_usage(u: &RawUsage, route: Route) -> Option<Usage> {
    let prompt = u.prompt_tokens.or(u.input_tokens);
    let completion = u.completion_tokens.or(u.output_tokens);
    if prompt.is_none() && completion.is_none() {
        return None;
    }
    let cached = details(&u.prompt_tokens_details, |d| d.cached_tokens)
        .or(details(&u.input_tokens_details, |d| d.cached_tokens));
    let reasoning = details(&u.completion_tokens_details, |d| d.reasoning_tokens)
        .or(details(&u.output_tokens_details, |d| d.reasoning_tokens));
    let has_output = route.has_output();
    Some(Usage {
        prompt_tokens: prompt.unwrap_or(0),
        completion_tokens: if has_output { completion.unwrap_or(0) } else { 0 },
        cached_tokens: cached.unwrap_or(0),
        reasoning_tokens: if has_output { reasoning.unwrap_or(0) } else { 0 },
    })
}

/// Anthropic usage fields, last value of each wins.
#[derive(Clone, Copy, Debug, Default)]
struct AnthropicAcc {
    input: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
    output: Option<u64>,
}

impl AnthropicAcc {
    fn merge(&mut self, u: &RawUsage) {
        self.input = u.input_tokens.or(self.input);
        self.cache_read = u.cache_read_input_tokens.or(self.cache_read);
        self.cache_creation = u.cache_creation_input_tokens.or(self.cache_creation);
        self.output = u.output_tokens.or(self.output);
    }

    fn usage(&self) -> Usage {
        let read = self.cache_read.unwrap_or(0);
        Usage {
            prompt_tokens: self
                .input
                .unwrap_or(0)
                .saturating_add(read)
                .saturating_add(self.cache_creation.unwrap_or(0)),
            completion_tokens: self.output.unwrap_or(0),
            cached_tokens: read,
            reasoning_tokens: 0,
        }
    }
}

// ------------------------------------------------------------------------------ byte helpers

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\r' | b'\n') {
        i += 1;
    }
    i
}

/// If `b[i..]` is `"key"` followed by `:` and the value's first byte is `open`, the index of
/// that byte.
fn value_after_key(b: &[u8], i: usize, key: &[u8], open: u8) -> Option<usize> {
    // b[i] == b'"' is checked by the caller.
    let k_end = i + 1 + key.len();
    if b.get(i + 1..k_end)? != key || b.get(k_end) != Some(&b'"') {
        return None;
    }
    let j = skip_ws(b, k_end + 1);
    if b.get(j) != Some(&b':') {
        return None;
    }
    let j = skip_ws(b, j + 1);
    (b.get(j) == Some(&open)).then_some(j)
}

/// An OpenAI-shape JSON text's (a whole body or one SSE data line) usage and model without
/// parsing all of it: the one `"usage"` value (an object or `null`) and the one `"model"` value
/// (a string or `null`), each parsed alone. `None` (parse the whole text instead) when either key
/// appears more than once or holds another kind of value. Inside a JSON string a quote is
/// escaped, so a key pattern cannot match there.
fn json_frame_fast(b: &[u8]) -> Option<Frame> {
    let usage = match key_values(b, b"usage") {
        (0, _) => None,
        (1, Some(j)) if b[j] == b'{' => {
            let obj = &b[j..object_end(b, j)?];
            Some(raw_usage_fast(obj).or_else(|| serde_json::from_slice::<RawUsage>(obj).ok())?)
        }
        (1, Some(j)) if b[j..].starts_with(b"null") => None,
        _ => return None,
    };
    let model = match key_values(b, b"model") {
        (0, _) => None,
        (1, Some(j)) if b[j] == b'"' => Some(serde_json::from_slice::<String>(&b[j..string_end(b, j + 1)?]).ok()?),
        (1, Some(j)) if b[j..].starts_with(b"null") => None,
        _ => return None,
    };
    Some(Frame { model, usage, message: None, response: None })
}

/// A usage object (`b` is exactly `{…}`) read by hand: integers and `null`s of the known keys,
/// their `*_details` objects, anything under other keys skipped. `None` (use serde instead) for
/// what serde might read differently: a non-integer number, another value kind under a known key,
/// a duplicate known key, an escape in a key.
fn raw_usage_fast(b: &[u8]) -> Option<RawUsage> {
    let mut u = RawUsage::default();
    let mut seen = 0u32;
    members(b, |key, v| {
        let (bit, slot): (u32, &mut Option<u64>) = match key {
            b"prompt_tokens" => (0, &mut u.prompt_tokens),
            b"completion_tokens" => (1, &mut u.completion_tokens),
            b"input_tokens" => (2, &mut u.input_tokens),
            b"output_tokens" => (3, &mut u.output_tokens),
            b"cache_read_input_tokens" => (4, &mut u.cache_read_input_tokens),
            b"cache_creation_input_tokens" => (5, &mut u.cache_creation_input_tokens),
            _ => {
                let (bit, slot) = match key {
                    b"prompt_tokens_details" => (6, &mut u.prompt_tokens_details),
                    b"completion_tokens_details" => (7, &mut u.completion_tokens_details),
                    b"input_tokens_details" => (8, &mut u.input_tokens_details),
                    b"output_tokens_details" => (9, &mut u.output_tokens_details),
                    _ => return Some(()),
                };
                first_time(&mut seen, bit)?;
                *slot = if v == b"null" { None } else { Some(details_fast(v)?) };
                return Some(());
            }
        };
        first_time(&mut seen, bit)?;
        *slot = int_or_null(v)?;
        Some(())
    })?;
    Some(u)
}

/// Marks known key `bit` as seen; `None` (not the simple shape: serde decides) the second time.
fn first_time(seen: &mut u32, bit: u32) -> Option<()> {
    if *seen & (1 << bit) != 0 {
        return None;
    }
    *seen |= 1 << bit;
    Some(())
}

fn details_fast(b: &[u8]) -> Option<Details> {
    if b.first() != Some(&b'{') {
        return None;
    }
    let mut d = Details::default();
    let mut seen = 0u32;
    members(b, |key, v| {
        let (bit, slot) = match key {
            b"cached_tokens" => (0, &mut d.cached_tokens),
            b"reasoning_tokens" => (1, &mut d.reasoning_tokens),
            _ => return Some(()),
        };
        first_time(&mut seen, bit)?;
        *slot = int_or_null(v)?;
        Some(())
    })?;
    Some(d)
}

/// `null` → `Some(None)`; a plain non-negative integer that fits u64 → `Some(Some(n))`; else `None`.
fn int_or_null(v: &[u8]) -> Option<Option<u64>> {
    if v == b"null" {
        return Some(None);
    }
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) || (v.len() > 1 && v[0] == b'0') {
        return None;
    }
    let n = v.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))?;
    Some(Some(n))
}

/// Calls `f(key, value)` for each member of the JSON object `b` (exactly `{…}`); `None` when `f`
/// says so or the text is not the simple shape (escaped keys, bad separators).
fn members(b: &[u8], mut f: impl FnMut(&[u8], &[u8]) -> Option<()>) -> Option<()> {
    let mut i = skip_ws(b, 1);
    if b.get(i) == Some(&b'}') {
        return (skip_ws(b, i + 1) == b.len()).then_some(());
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let k_end = string_end(b, i + 1)?;
        let key = &b[i + 1..k_end - 1];
        if key.contains(&b'\\') {
            return None;
        }
        let colon = skip_ws(b, k_end);
        if b.get(colon) != Some(&b':') {
            return None;
        }
        let v = skip_ws(b, colon + 1);
        let v_end = match b.get(v)? {
            b'{' | b'[' => object_end(b, v)?,
            b'"' => string_end(b, v + 1)?,
            _ => v + b[v..].iter().position(|c| matches!(c, b',' | b'}' | b' ' | b'\t' | b'\r' | b'\n'))?,
        };
        f(key, &b[v..v_end])?;
        i = skip_ws(b, v_end);
        match b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return (skip_ws(b, i + 1) == b.len()).then_some(()),
            _ => return None,
        }
    }
}

/// How many `"key":` there are, and where the value of the first one starts.
fn key_values(b: &[u8], key: &'static [u8]) -> (usize, Option<usize>) {
    let finder = quoted_finder(key);
    let (mut n, mut first, mut from) = (0, None, 0);
    while let Some(i) = b.get(from..).and_then(|h| finder.find(h)).map(|i| i + from) {
        let colon = skip_ws(b, i + key.len() + 2);
        if b.get(colon) == Some(&b':') {
            n += 1;
            let v = skip_ws(b, colon + 1);
            if v < b.len() {
                first = first.or(Some(v));
            }
        }
        from = i + 1;
    }
    (n, first)
}

/// The index after the closing quote of the string whose content starts at `i`.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    while i < b.len() {
        match b[i] {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

/// The index after the `}` that closes the object opening at `b[i]`.
fn object_end(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = string_end(b, i + 1)?;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Whether the JSON text holds a `"usage": {` (an object, not `null`).
fn has_usage_object(b: &[u8]) -> bool {
    let mut from = 0;
    let f = quoted_finder(b"usage");
    while let Some(i) = b.get(from..).and_then(|h| f.find(h)).map(|i| i + from) {
        if value_after_key(b, i, b"usage", b'{').is_some() {
            return true;
        }
        from = i + 1;
    }
    false
}

fn push_bytes(c: &mut TokenCounter, bytes: &[u8]) {
    for chunk in bytes.utf8_chunks() {
        c.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            c.push('\u{FFFD}');
        }
    }
}

fn hex4(b: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(b.get(..4)?).ok()?;
    u32::from_str_radix(s, 16).ok()
}

/// Feeds the JSON string starting at `b[i]` (just after its opening quote) into the counter,
/// decoding escapes; returns the index after the closing quote (or `b.len()`).
fn count_json_string(b: &[u8], mut i: usize, c: &mut TokenCounter) -> usize {
    let mut seg = i;
    while i < b.len() {
        match b[i] {
            b'"' => {
                push_bytes(c, &b[seg..i]);
                return i + 1;
            }
            b'\\' => {
                push_bytes(c, &b[seg..i]);
                let esc = b.get(i + 1).copied().unwrap_or(b'\\');
                i += 2;
                match esc {
                    b'n' => c.push('\n'),
                    b'r' => c.push('\r'),
                    b't' => c.push('\t'),
                    b'b' => c.push('\u{8}'),
                    b'f' => c.push('\u{c}'),
                    b'u' => {
                        let mut cp = hex4(&b[i.min(b.len())..]).unwrap_or(0xFFFD);
                        i += 4;
                        if (0xD800..0xDC00).contains(&cp) && b.get(i..i + 2) == Some(b"\\u") {
                            if let Some(lo @ 0xDC00..=0xDFFF) = hex4(&b[(i + 2).min(b.len())..]) {
                                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                                i += 6;
                            }
                        }
                        c.push(char::from_u32(cp).unwrap_or('\u{FFFD}'));
                    }
                    other => c.push(char::from(other)),
                }
                i = i.min(b.len());
                seg = i;
            }
            _ => i += 1,
        }
    }
    push_bytes(c, &b[seg..]);
    b.len()
}

/// Counts the string values of `keys` in JSON text `b` (any nesting), in order.
fn count_output_text(b: &[u8], keys: &[&'static [u8]], c: &mut TokenCounter) {
    // Each key's `"key"` is searched with a prebuilt SIMD searcher (most lines hold no such key, or
    // one); the values are then counted in text order. Inside a JSON string a quote is escaped,
    // so a key pattern `"key"` followed by `:` cannot match there (the key would be followed by
    // `\`), and matches cannot overlap.
    let mut found: [usize; 8] = [0; 8];
    let mut n = 0;
    let mut more = Vec::new();
    for k in keys {
        let f = quoted_finder(k);
        for i in f.find_iter(b) {
            if let Some(j) = value_after_key(b, i, k, b'"') {
                if n < found.len() {
                    found[n] = j;
                    n += 1;
                } else {
                    more.push(j);
                }
            }
        }
    }
    if more.is_empty() {
        found[..n].sort_unstable();
        for &j in &found[..n] {
            count_json_string(b, j + 1, c);
        }
    } else {
        more.extend_from_slice(&found[..n]);
        more.sort_unstable();
        for j in more {
            count_json_string(b, j + 1, c);
        }
    }
}

/// A prebuilt searcher for `"key"` (the keys of [`text_keys`] and the few this module looks up).
fn quoted_finder(key: &'static [u8]) -> &'static memchr::memmem::Finder<'static> {
    use memchr::memmem::Finder;
    use std::sync::LazyLock;
    static KEYS: &[&[u8]] = &[
        b"content",
        b"arguments",
        b"refusal",
        b"reasoning_content",
        b"text",
        b"delta",
        b"partial_json",
        b"thinking",
        b"model",
        b"usage",
    ];
    static FINDERS: LazyLock<Vec<Finder<'static>>> =
        LazyLock::new(|| KEYS.iter().map(|k| Finder::new(&[b"\"", *k, b"\""].concat()).into_owned()).collect());
    let i = KEYS.iter().position(|k| *k == key).expect("a key listed in quoted_finder");
    &FINDERS[i]
}

/// Keys whose string values are output text, per route and framing.
fn text_keys(route: Route, kind: BodyKind) -> &'static [&'static [u8]] {
    match (route, kind) {
        (Route::ChatCompletions, _) => &[b"content", b"arguments", b"refusal", b"reasoning_content"],
        (Route::Completions, _) => &[b"text"],
        // Stream: the `.delta` events only (`.done` events and `response.completed` repeat the
        // text). Body: the output parts.
        (Route::Responses, BodyKind::Sse) => &[b"delta"],
        (Route::Responses, BodyKind::Json) => &[b"text", b"arguments"],
        (Route::Messages, _) => &[b"text", b"partial_json", b"thinking"],
        (Route::Embeddings, _) => &[],
    }
}

// ---------------------------------------------------------------------------------- scanner

/// Incremental usage extractor: `feed` each response-body chunk as it passes, `finish` at the end.
#[derive(Debug)]
pub struct UsageScanner {
    route: Route,
    kind: BodyKind,
    /// SSE: the partial last line. JSON: the body so far.
    buf: Vec<u8>,
    /// SSE: the current line passed the cap and is being skipped. JSON: the body passed the cap.
    overflow: bool,
    unparsable: u64,
    usage: Option<Usage>,
    anthropic: AnthropicAcc,
    anthropic_final: bool,
    model: Option<String>,
    text: TokenCounter,
}

impl UsageScanner {
    pub fn new(route: Route, kind: BodyKind) -> Self {
        UsageScanner {
            route,
            kind,
            buf: Vec::new(),
            overflow: false,
            unparsable: 0,
            usage: None,
            anthropic: AnthropicAcc::default(),
            anthropic_final: false,
            model: None,
            text: TokenCounter::new(),
        }
    }

    /// SSE lines dropped as oversized or whose JSON did not parse (and unparsable JSON bodies).
    pub fn unparsable_lines(&self) -> u64 {
        self.unparsable
    }

    /// Feeds the next body chunk (any size, split anywhere).
    pub fn feed(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        match self.kind {
            BodyKind::Sse => self.feed_sse(chunk),
            BodyKind::Json => self.feed_json(chunk),
        }
    }

    /// Ends the scan and reports. Call once, after the last chunk.
    pub fn finish(&mut self) -> ScanResult {
        match self.kind {
            BodyKind::Sse => {
                if self.overflow {
                    self.unparsable += 1;
                    self.overflow = false;
                } else if !self.buf.is_empty() {
                    // A last line without its newline.
                    let line = std::mem::take(&mut self.buf);
                    self.sse_line(&line);
                }
            }
            BodyKind::Json => {
                if !self.overflow && !self.buf.is_empty() {
                    let body = std::mem::take(&mut self.buf);
                    let fast = if self.route == Route::Messages { None } else { json_frame_fast(&body) };
                    match fast.map_or_else(|| serde_json::from_slice::<Frame>(&body), Ok) {
                        Ok(f) => self.apply(f),
                        Err(_) => self.unparsable += 1,
                    }
                    // The observed text only matters when the body reports no usage.
                    if self.current_usage().is_none() {
                        count_output_text(&body, text_keys(self.route, self.kind), &mut self.text);
                    }
                }
            }
        }
        self.buf = Vec::new();
        ScanResult { usage: self.current_usage(), observed_output_tokens: self.text.tokens(), model: self.model.take() }
    }

    /// The usage seen so far (Anthropic: only once the final `message_delta` arrived).
    fn current_usage(&self) -> Option<Usage> {
        if self.route == Route::Messages {
            self.anthropic_final.then(|| self.anthropic.usage())
        } else {
            self.usage
        }
    }

    fn feed_json(&mut self, chunk: &[u8]) {
        if self.overflow {
            return;
        }
        if self.buf.len() + chunk.len() > MAX_JSON_BODY_BYTES {
            // Give up on usage; keep what the seen text says about output.
            self.overflow = true;
            let body = std::mem::take(&mut self.buf);
            count_output_text(&body, text_keys(self.route, self.kind), &mut self.text);
            return;
        }
        self.buf.extend_from_slice(chunk);
    }

    fn feed_sse(&mut self, mut chunk: &[u8]) {
        while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
            let (head, rest) = (&chunk[..nl], &chunk[nl + 1..]);
            chunk = rest;
            if self.overflow {
                self.overflow = false;
                self.unparsable += 1;
            } else if self.buf.len() + head.len() > MAX_SSE_LINE_BYTES {
                self.buf.clear();
                self.unparsable += 1;
            } else if self.buf.is_empty() {
                self.sse_line(head);
            } else {
                self.buf.extend_from_slice(head);
                let line = std::mem::take(&mut self.buf);
                self.sse_line(&line);
                self.buf = line;
                self.buf.clear();
                if self.buf.capacity() > 64 * 1024 {
                    self.buf = Vec::new();
                }
            }
        }
        if chunk.is_empty() || self.overflow {
            return;
        }
        if self.buf.len() + chunk.len() > MAX_SSE_LINE_BYTES {
            self.overflow = true;
            self.buf = Vec::new();
        } else {
            self.buf.extend_from_slice(chunk);
        }
    }

    fn sse_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line); // a BOM
        let Some(data) = line.strip_prefix(b"data:") else {
            return; // event:, id:, retry:, comments, blank lines
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data.is_empty() || data == b"[DONE]" {
            return;
        }
        count_output_text(data, text_keys(self.route, self.kind), &mut self.text);
        let wants_model = self.model.is_none() && quoted_finder(b"model").find(data).is_some();
        if wants_model || has_usage_object(data) {
            let fast = if self.route == Route::Messages { None } else { json_frame_fast(data) };
            match fast.map_or_else(|| serde_json::from_slice::<Frame>(data), Ok) {
                Ok(f) => self.apply(f),
                Err(_) => self.unparsable += 1,
            }
        }
    }

    fn apply(&mut self, f: Frame) {
        let Frame { model, usage, message, response } = f;
        let (m_model, m_usage) = message.map_or((None, None), |m| (m.model, m.usage));
        let (r_model, r_usage) = response.map_or((None, None), |r| (r.model, r.usage));
        if self.model.is_none() {
            self.model = model.or(m_model).or(r_model).filter(|m| !m.is_empty());
        }
        if self.route == Route::Messages {
            if let Some(u) = m_usage {
                self.anthropic.merge(&u);
            }
            if let Some(u) = usage {
                self.anthropic.merge(&u);
                self.anthropic_final = true;
            }
        } else if let Some(u) = usage.or(r_usage) {
            if let Some(u) = openai_usage(&u, self.route) {
                self.usage = Some(u);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(prompt: u64, completion: u64, cached: u64, reasoning: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
            reasoning_tokens: reasoning,
        }
    }

    fn scan(route: Route, kind: BodyKind, pieces: &[&[u8]]) -> (ScanResult, u64) {
        let mut s = UsageScanner::new(route, kind);
        for p in pieces {
            s.feed(p);
        }
        let r = s.finish();
        (r, s.unparsable_lines())
    }

    fn whole(route: Route, kind: BodyKind, body: &str) -> ScanResult {
        let (r, bad) = scan(route, kind, &[body.as_bytes()]);
        assert_eq!(bad, 0, "unparsable lines in fixture");
        r
    }

    /// Same result for every two-piece split and for byte-by-byte feeding.
    fn assert_split_invariant(route: Route, kind: BodyKind, body: &str) -> ScanResult {
        let b = body.as_bytes();
        let want = whole(route, kind, body);
        for i in 0..=b.len() {
            let (got, _) = scan(route, kind, &[&b[..i], &b[i..]]);
            assert_eq!(got, want, "split at byte {i}");
        }
        let bytes: Vec<&[u8]> = b.chunks(1).collect();
        assert_eq!(scan(route, kind, &bytes).0, want, "byte by byte");
        want
    }

    // Fixtures follow the providers' API reference examples (values changed to exercise every
    // field).

    const OPENAI_CHAT_JSON: &str = r#"{
  "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
  "object": "chat.completion",
  "created": 1741570283,
  "model": "o4-mini-2025-04-16",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "The image shows a wooden boardwalk extending through a lush green marshland.",
        "refusal": null,
        "annotations": []
      },
      "logprobs": null,
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 1117,
    "completion_tokens": 846,
    "total_tokens": 1963,
    "prompt_tokens_details": {
      "cached_tokens": 1024,
      "audio_tokens": 0
    },
    "completion_tokens_details": {
      "reasoning_tokens": 768,
      "audio_tokens": 0,
      "accepted_prediction_tokens": 0,
      "rejected_prediction_tokens": 0
    }
  },
  "service_tier": "default",
  "system_fingerprint": "fp_fc9f1d7035"
}"#;

    const OPENAI_CHAT_SSE: &str = concat!(
        "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there, \\\"friend\\\"\\n\\u00e9\\ud83c\\udf89\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29,\"prompt_tokens_details\":{\"cached_tokens\":3,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":2,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}\n\n",
        "data: [DONE]\n\n",
    );

    const OPENAI_CHAT_SSE_TOOL: &str = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4.1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4.1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"location\\\":\\\"Paris\\\"}\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4.1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4.1\",\"choices\":[],\"usage\":{\"prompt_tokens\":82,\"completion_tokens\":17,\"total_tokens\":99}}\n\n",
        "data: [DONE]\n\n",
    );

    const OPENAI_COMPLETIONS_JSON: &str = r#"{
  "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
  "object": "text_completion",
  "created": 1589478378,
  "model": "gpt-3.5-turbo-instruct",
  "system_fingerprint": "fp_44709d6fcb",
  "choices": [
    {
      "text": "\n\nThis is indeed a test",
      "index": 0,
      "logprobs": null,
      "finish_reason": "length"
    }
  ],
  "usage": {
    "prompt_tokens": 5,
    "completion_tokens": 7,
    "total_tokens": 12
  }
}"#;

    const OPENAI_COMPLETIONS_SSE: &str = concat!(
        "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1690759702,\"choices\":[{\"text\":\"This\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}],\"model\":\"gpt-3.5-turbo-instruct\",\"usage\":null}\n\n",
        "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1690759702,\"choices\":[{\"text\":\" is a test\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"length\"}],\"model\":\"gpt-3.5-turbo-instruct\",\"usage\":null}\n\n",
        "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1690759702,\"choices\":[],\"model\":\"gpt-3.5-turbo-instruct\",\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4,\"total_tokens\":9}}\n\n",
        "data: [DONE]\n\n",
    );

    const RESPONSES_JSON: &str = r#"{
  "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
  "object": "response",
  "created_at": 1741476542,
  "status": "completed",
  "error": null,
  "incomplete_details": null,
  "instructions": null,
  "max_output_tokens": null,
  "model": "gpt-4.1-2025-04-14",
  "output": [
    {
      "type": "message",
      "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b",
      "status": "completed",
      "role": "assistant",
      "content": [
        {
          "type": "output_text",
          "text": "In a peaceful grove beneath a silver moon, a unicorn named Lumina discovered a hidden pool.",
          "annotations": []
        }
      ]
    }
  ],
  "parallel_tool_calls": true,
  "previous_response_id": null,
  "reasoning": {"effort": null, "summary": null},
  "store": true,
  "temperature": 1.0,
  "text": {"format": {"type": "text"}},
  "tool_choice": "auto",
  "tools": [],
  "top_p": 1.0,
  "truncation": "disabled",
  "usage": {
    "input_tokens": 36,
    "input_tokens_details": {"cached_tokens": 12},
    "output_tokens": 87,
    "output_tokens_details": {"reasoning_tokens": 5},
    "total_tokens": 123
  },
  "user": null,
  "metadata": {}
}"#;

    const RESPONSES_SSE: &str = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654\",\"object\":\"response\",\"created_at\":1741290958,\"status\":\"in_progress\",\"model\":\"gpt-5-mini-2025-08-07\",\"output\":[],\"usage\":null,\"metadata\":{}}}\n\n",
        "event: response.in_progress\n",
        "data: {\"type\":\"response.in_progress\",\"sequence_number\":1,\"response\":{\"id\":\"resp_67c9\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"gpt-5-mini-2025-08-07\",\"output\":[],\"usage\":null}}\n\n",
        "event: response.output_item.added\n",
        "data: {\"type\":\"response.output_item.added\",\"sequence_number\":2,\"output_index\":0,\"item\":{\"id\":\"msg_67c9\",\"type\":\"message\",\"status\":\"in_progress\",\"role\":\"assistant\",\"content\":[]}}\n\n",
        "event: response.content_part.added\n",
        "data: {\"type\":\"response.content_part.added\",\"sequence_number\":3,\"item_id\":\"msg_67c9\",\"output_index\":0,\"content_index\":0,\"part\":{\"type\":\"output_text\",\"text\":\"\",\"annotations\":[]}}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_67c9\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":5,\"item_id\":\"msg_67c9\",\"output_index\":0,\"content_index\":0,\"delta\":\" there! How can I help?\"}\n\n",
        "event: response.output_text.done\n",
        "data: {\"type\":\"response.output_text.done\",\"sequence_number\":6,\"item_id\":\"msg_67c9\",\"output_index\":0,\"content_index\":0,\"text\":\"Hi there! How can I help?\"}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"sequence_number\":7,\"response\":{\"id\":\"resp_67c9\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"gpt-5-mini-2025-08-07\",\"output\":[{\"id\":\"msg_67c9\",\"type\":\"message\",\"status\":\"completed\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi there! How can I help?\",\"annotations\":[]}]}],\"usage\":{\"input_tokens\":37,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":139,\"output_tokens_details\":{\"reasoning_tokens\":128},\"total_tokens\":176}}}\n\n",
    );

    const EMBEDDINGS_JSON: &str = r#"{
  "object": "list",
  "data": [
    {
      "object": "embedding",
      "embedding": [0.0023064255, -0.009327292, -0.0028842222],
      "index": 0
    }
  ],
  "model": "text-embedding-3-small",
  "usage": {
    "prompt_tokens": 8,
    "total_tokens": 8
  }
}"#;

    const ANTHROPIC_JSON: &str = r#"{
  "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
  "type": "message",
  "role": "assistant",
  "content": [
    {
      "type": "text",
      "text": "Hello! How can I help you today?"
    }
  ],
  "model": "claude-sonnet-4-20250514",
  "stop_reason": "end_turn",
  "stop_sequence": null,
  "usage": {
    "input_tokens": 12,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 2048,
    "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 10,
    "service_tier": "standard"
  }
}"#;

    const ANTHROPIC_SSE: &str = concat!(
        "event: message_start\n",
        "data: {\"type\": \"message_start\", \"message\": {\"id\": \"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\", \"type\": \"message\", \"role\": \"assistant\", \"content\": [], \"model\": \"claude-sonnet-4-5-20250929\", \"stop_reason\": null, \"stop_sequence\": null, \"usage\": {\"input_tokens\": 25, \"cache_creation_input_tokens\": 7, \"cache_read_input_tokens\": 1800, \"output_tokens\": 1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\": \"content_block_start\", \"index\": 0, \"content_block\": {\"type\": \"text\", \"text\": \"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"Hello\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"! How are you today?\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\": \"content_block_stop\", \"index\": 0}\n\n",
        "event: content_block_start\n",
        "data: {\"type\": \"content_block_start\", \"index\": 1, \"content_block\": {\"type\": \"tool_use\", \"id\": \"toolu_01T1x1fJ34qAmk2tNTrN7Up6\", \"name\": \"get_weather\", \"input\": {}}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\": \"content_block_delta\", \"index\": 1, \"delta\": {\"type\": \"input_json_delta\", \"partial_json\": \"{\\\"location\\\": \\\"San Fra\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\": \"content_block_delta\", \"index\": 1, \"delta\": {\"type\": \"input_json_delta\", \"partial_json\": \"ncisco, CA\\\"}\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\": \"content_block_stop\", \"index\": 1}\n\n",
        "event: message_delta\n",
        "data: {\"type\": \"message_delta\", \"delta\": {\"stop_reason\": \"tool_use\", \"stop_sequence\": null}, \"usage\": {\"output_tokens\": 89}}\n\n",
        "event: message_stop\n",
        "data: {\"type\": \"message_stop\"}\n\n",
    );

    /// Newer API versions repeat (and may update) the input fields in `message_delta`.
    const ANTHROPIC_SSE_DELTA_INPUT: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-haiku-4-5-20251001\",\"usage\":{\"input_tokens\":472,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":2}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Let me work through this step by step.\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds\"}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"input_tokens\":480,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":256,\"output_tokens\":503}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );

    #[test]
    fn the_json_fast_path_agrees_with_the_full_parse() {
        // What `apply` takes from a frame on an OpenAI-shape route.
        let effect = |f: Frame| {
            let (m_model, r_model, r_usage) = (
                f.message.and_then(|m| m.model),
                f.response.as_ref().and_then(|r| r.model.clone()),
                f.response.and_then(|r| r.usage),
            );
            (f.model.or(m_model).or(r_model), f.usage.or(r_usage))
        };
        let agree = |body: &str| {
            let full: Option<Frame> = serde_json::from_slice(body.as_bytes()).ok();
            if let Some(fast) = json_frame_fast(body.as_bytes()) {
                assert_eq!(Some(effect(fast)), full.map(effect), "{body}");
            }
        };
        for body in [OPENAI_CHAT_JSON, OPENAI_COMPLETIONS_JSON, RESPONSES_JSON, EMBEDDINGS_JSON] {
            assert!(json_frame_fast(body.as_bytes()).is_some(), "fast path taken for {body}");
            agree(body);
        }
        // Key patterns inside strings, nulls, duplicates, nesting, escapes: agree or fall back.
        for body in [
            r#"{"model":"m","choices":[{"message":{"content":"say \"usage\": {\"prompt_tokens\": 9}"}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            r#"{"model":"m","usage":null}"#,
            r#"{"usage":null,"model":"m"}"#,
            r#"{"usage" : null , "model" : null}"#,
            r#"{"model":"m"}"#,
            r#"{"model":"a\"b\\","usage":{"prompt_tokens":1}}"#,
            r#"{"usage":{"prompt_tokens":1},"x":{"usage":{"prompt_tokens":2}}}"#,
            r#"{"model":"m","model":"n","usage":{"prompt_tokens":1}}"#,
            r#"{"model":7,"usage":{"prompt_tokens":1}}"#,
            r#"{"usage":{"prompt_tokens":1,"prompt_tokens_details":{"cached_tokens":1}}, "model" : "x"}"#,
            r#"{"usage":{"prompt_tokens":1"#,
            r#"{"usage":{"prompt_tokens":"1"},"model":"m"}"#,
        ] {
            agree(body);
        }
        assert!(json_frame_fast(br#"{"usage":{"prompt_tokens":1},"x":{"usage":{}}}"#).is_none());
        assert!(json_frame_fast(br#"{"usage":[1],"model":"m"}"#).is_none());
        assert!(json_frame_fast(br#"{"usage":{},"model":["m"]}"#).is_none());
        // Every SSE data line of the OpenAI-shape fixtures: the fast path is taken and agrees.
        for stream in [OPENAI_CHAT_SSE, OPENAI_CHAT_SSE_TOOL, OPENAI_COMPLETIONS_SSE, RESPONSES_SSE] {
            for line in stream.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|l| *l != "[DONE]") {
                assert!(json_frame_fast(line.as_bytes()).is_some(), "{line}");
                agree(line);
            }
        }
    }

    #[test]
    fn the_hand_read_usage_agrees_with_serde() {
        for obj in [
            r#"{}"#,
            r#"{"prompt_tokens":46,"completion_tokens":16,"total_tokens":62}"#,
            r#"{"completion_tokens":16,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":7,"rejected_prediction_tokens":0},"prompt_tokens":46,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":32},"total_tokens":62}"#,
            r#"{ "input_tokens" : 12 , "output_tokens":null, "cache_read_input_tokens": 2048, "server_tool_use": {"web_search_requests": 0}, "service_tier": "standard" }"#,
            r#"{"input_tokens":36,"input_tokens_details":{"cached_tokens":12},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":5},"total_tokens":123}"#,
            r#"{"prompt_tokens":1,"x":[1,{"prompt_tokens":9}],"y":"a\"}b"}"#,
            r#"{"prompt_tokens_details":null,"completion_tokens":18446744073709551615}"#,
        ] {
            let fast = raw_usage_fast(obj.as_bytes()).unwrap_or_else(|| panic!("fast path taken for {obj}"));
            assert_eq!(fast, serde_json::from_str::<RawUsage>(obj).unwrap(), "{obj}");
        }
        // Shapes serde may read differently: left to serde.
        for obj in [
            r#"{"prompt_tokens":1.0}"#,
            r#"{"prompt_tokens":-1}"#,
            r#"{"prompt_tokens":"1"}"#,
            r#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            r#"{"prompt_tokens":18446744073709551616}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":1}}"#,
            r#"{"prompt_tokens_details":[1]}"#,
            r#"{"prompt\u005ftokens":1}"#,
            r#"{"prompt_tokens":01}"#,
            r#"{"prompt_tokens":1,}"#,
        ] {
            assert!(raw_usage_fast(obj.as_bytes()).is_none(), "{obj}");
        }
    }

    #[test]
    fn openai_chat_json() {
        let r = whole(Route::ChatCompletions, BodyKind::Json, OPENAI_CHAT_JSON);
        assert_eq!(r.usage, Some(u(1117, 846, 1024, 768)));
        assert_eq!(r.model.as_deref(), Some("o4-mini-2025-04-16"));
        assert_eq!(r.observed_output_tokens, 0, "usage reported: the text is not counted");
        let no_usage = OPENAI_CHAT_JSON.replace("\"usage\"", "\"usage_elsewhere\"");
        assert!(whole(Route::ChatCompletions, BodyKind::Json, &no_usage).observed_output_tokens >= 10);
        // split anywhere, byte by byte
        assert_eq!(assert_split_invariant(Route::ChatCompletions, BodyKind::Json, OPENAI_CHAT_JSON), r);
    }

    #[test]
    fn openai_chat_sse() {
        let r = assert_split_invariant(Route::ChatCompletions, BodyKind::Sse, OPENAI_CHAT_SSE);
        assert_eq!(r.usage, Some(u(19, 10, 3, 2)));
        assert_eq!(r.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        let mut c = TokenCounter::new();
        c.push_str("Hello there, \"friend\"\n\u{e9}\u{1F389}");
        assert_eq!(r.observed_output_tokens, c.tokens());

        let t = assert_split_invariant(Route::ChatCompletions, BodyKind::Sse, OPENAI_CHAT_SSE_TOOL);
        assert_eq!(t.usage, Some(u(82, 17, 0, 0)));
        assert_eq!(t.model.as_deref(), Some("gpt-4.1"));
        assert!(t.observed_output_tokens >= 5);
    }

    #[test]
    fn openai_completions() {
        let r = whole(Route::Completions, BodyKind::Json, OPENAI_COMPLETIONS_JSON);
        assert_eq!(r.usage, Some(u(5, 7, 0, 0)));
        assert_eq!(r.model.as_deref(), Some("gpt-3.5-turbo-instruct"));
        let s = assert_split_invariant(Route::Completions, BodyKind::Sse, OPENAI_COMPLETIONS_SSE);
        assert_eq!(s.usage, Some(u(5, 4, 0, 0)));
        assert_eq!(s.observed_output_tokens, crate_approx("This is a test"));
    }

    fn crate_approx(s: &str) -> u64 {
        super::super::estimate::approx_tokens(s)
    }

    #[test]
    fn responses() {
        let r = whole(Route::Responses, BodyKind::Json, RESPONSES_JSON);
        assert_eq!(r.usage, Some(u(36, 87, 12, 5)));
        assert_eq!(r.model.as_deref(), Some("gpt-4.1-2025-04-14"));
        assert_eq!(r.observed_output_tokens, 0, "usage reported: the text is not counted");
        let no_usage = RESPONSES_JSON.replace("\"usage\"", "\"usage_elsewhere\"");
        assert!(whole(Route::Responses, BodyKind::Json, &no_usage).observed_output_tokens >= 15);
        let s = assert_split_invariant(Route::Responses, BodyKind::Sse, RESPONSES_SSE);
        assert_eq!(s.usage, Some(u(37, 139, 0, 128)));
        assert_eq!(s.model.as_deref(), Some("gpt-5-mini-2025-08-07"));
        // deltas only: the `.done` event and `response.completed` are not counted again
        assert_eq!(s.observed_output_tokens, crate_approx("Hi there! How can I help?"));
    }

    #[test]
    fn embeddings() {
        let r = whole(Route::Embeddings, BodyKind::Json, EMBEDDINGS_JSON);
        assert_eq!(r.usage, Some(u(8, 0, 0, 0)));
        assert_eq!(r.model.as_deref(), Some("text-embedding-3-small"));
        assert_eq!(r.observed_output_tokens, 0);
    }

    #[test]
    fn anthropic() {
        let r = whole(Route::Messages, BodyKind::Json, ANTHROPIC_JSON);
        // prompt = 12 input + 2048 cache reads + 100 cache writes; cached = reads
        assert_eq!(r.usage, Some(u(2160, 10, 2048, 0)));
        assert_eq!(r.model.as_deref(), Some("claude-sonnet-4-20250514"));
        assert_eq!(r.observed_output_tokens, 0, "usage reported: the text is not counted");
        let no_usage = ANTHROPIC_JSON.replace("\"usage\"", "\"usage_elsewhere\"");
        assert!(whole(Route::Messages, BodyKind::Json, &no_usage).observed_output_tokens >= 8);

        let s = assert_split_invariant(Route::Messages, BodyKind::Sse, ANTHROPIC_SSE);
        assert_eq!(s.usage, Some(u(25 + 1800 + 7, 89, 1800, 0)));
        assert_eq!(s.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
        let mut c = TokenCounter::new();
        c.push_str("Hello! How are you today?{\"location\": \"San Francisco, CA\"}");
        assert_eq!(s.observed_output_tokens, c.tokens());

        let d = assert_split_invariant(Route::Messages, BodyKind::Sse, ANTHROPIC_SSE_DELTA_INPUT);
        assert_eq!(d.usage, Some(u(480 + 256, 503, 256, 0)));
        assert_eq!(d.observed_output_tokens, crate_approx("Let me work through this step by step."));
    }

    #[test]
    fn null_usage_chunks_are_ignored_without_parsing() {
        let mut s = UsageScanner::new(Route::ChatCompletions, BodyKind::Sse);
        let null_only: String = OPENAI_CHAT_SSE.lines().take(6).map(|l| format!("{l}\n")).collect();
        s.feed(null_only.as_bytes());
        let r = s.finish();
        assert_eq!(r.usage, None);
        assert_eq!(s.unparsable_lines(), 0);
        assert!(!has_usage_object(br#"{"usage":null}"#));
        assert!(!has_usage_object(br#"{"usage" : null, "x": {}}"#));
        assert!(has_usage_object(br#"{"usage" :	{"a":1}}"#));
        assert!(!has_usage_object(br#"{"text":"\"usage\": {"}"#));
    }

    #[test]
    fn cut_streams_have_no_usage_but_observed_output() {
        for (route, body, marker) in [
            (Route::ChatCompletions, OPENAI_CHAT_SSE, "\"usage\":{"),
            (Route::Responses, RESPONSES_SSE, "event: response.completed"),
            (Route::Messages, ANTHROPIC_SSE, "event: message_delta"),
            (Route::Completions, OPENAI_COMPLETIONS_SSE, "\"usage\":{"),
        ] {
            let cut = &body[..body.find(marker).unwrap()];
            // cut in the middle of the last kept line too
            for end in [cut.len(), cut.len() - 7] {
                let r = whole(route, BodyKind::Sse, &cut[..end]);
                assert_eq!(r.usage, None, "{route:?}");
                assert!(r.observed_output_tokens > 0, "{route:?}");
                assert!(r.model.is_some(), "{route:?}");
            }
        }
        // a JSON body cut short
        let cut = &ANTHROPIC_JSON[..ANTHROPIC_JSON.find("\"usage\"").unwrap()];
        let (r, bad) = scan(Route::Messages, BodyKind::Json, &[cut.as_bytes()]);
        assert_eq!(r.usage, None);
        assert!(r.observed_output_tokens > 0);
        assert_eq!(bad, 1);
    }

    #[test]
    fn crlf_and_no_space_after_data() {
        for (route, body) in [
            (Route::ChatCompletions, OPENAI_CHAT_SSE),
            (Route::Responses, RESPONSES_SSE),
            (Route::Messages, ANTHROPIC_SSE),
        ] {
            let want = whole(route, BodyKind::Sse, body);
            let crlf = body.replace('\n', "\r\n");
            assert_eq!(assert_split_invariant(route, BodyKind::Sse, &crlf), want);
            let tight = body.replace("data: ", "data:");
            assert_eq!(whole(route, BodyKind::Sse, &tight), want);
            // no final newline
            assert_eq!(whole(route, BodyKind::Sse, body.trim_end()), want);
        }
    }

    #[test]
    fn oversized_line_is_dropped_and_counted() {
        let mut s = UsageScanner::new(Route::ChatCompletions, BodyKind::Sse);
        let big =
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n", "x".repeat(MAX_SSE_LINE_BYTES));
        for piece in big.as_bytes().chunks(64 * 1024) {
            s.feed(piece);
        }
        s.feed(OPENAI_CHAT_SSE.as_bytes());
        let r = s.finish();
        assert_eq!(r.usage, Some(u(19, 10, 3, 2)));
        assert_eq!(s.unparsable_lines(), 1);

        // in one chunk, and as the last line without newline
        let (r, bad) = scan(Route::ChatCompletions, BodyKind::Sse, &[big.as_bytes()]);
        assert_eq!((r.usage, bad), (None, 1));
        let (_, bad) = scan(Route::ChatCompletions, BodyKind::Sse, &[big.trim_end().as_bytes()]);
        assert_eq!(bad, 1);

        // a line just under the cap is kept
        let fits = format!(
            "data: {{\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":2}},\"pad\":\"{}\"}}\n",
            "y".repeat(MAX_SSE_LINE_BYTES - 100)
        );
        let (r, bad) = scan(Route::ChatCompletions, BodyKind::Sse, &[fits.as_bytes()]);
        assert_eq!((r.usage, bad), (Some(u(1, 2, 0, 0)), 0));
    }

    #[test]
    fn oversized_json_body_gives_up() {
        let mut s = UsageScanner::new(Route::ChatCompletions, BodyKind::Json);
        s.feed(b"{\"choices\":[{\"message\":{\"content\":\"");
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..8 {
            s.feed(&chunk);
        }
        s.feed(b"\"}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}");
        let r = s.finish();
        assert_eq!(r.usage, None);
        assert!(r.observed_output_tokens > 0);
    }

    #[test]
    fn body_kind_from_content_type() {
        assert_eq!(BodyKind::from_content_type(Some("text/event-stream; charset=utf-8")), BodyKind::Sse);
        assert_eq!(BodyKind::from_content_type(Some("Text/Event-Stream")), BodyKind::Sse);
        assert_eq!(BodyKind::from_content_type(Some("application/json")), BodyKind::Json);
        assert_eq!(BodyKind::from_content_type(None), BodyKind::Json);
    }

    #[test]
    fn throughput_of_a_1mib_chat_stream() {
        let mut body = String::new();
        let mut i = 0;
        while body.len() < (1 << 20) {
            body.push_str(&format!(
                "data: {{\"id\":\"chatcmpl-AbCdEf123\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
            ));
            i += 1;
        }
        body.push_str("data: {\"id\":\"chatcmpl-AbCdEf123\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":20}}\n\ndata: [DONE]\n\n");
        let runs = 5;
        let start = std::time::Instant::now();
        for _ in 0..runs {
            let mut s = UsageScanner::new(Route::ChatCompletions, BodyKind::Sse);
            for piece in body.as_bytes().chunks(16 * 1024) {
                s.feed(piece);
            }
            let r = s.finish();
            assert_eq!(r.usage, Some(u(10, 20, 0, 0)));
            assert!(r.observed_output_tokens >= i as u64);
        }
        let secs = start.elapsed().as_secs_f64();
        let mb = (body.len() * runs) as f64 / 1e6;
        println!(
            "usage scanner: {:.1} MB/s on a {:.2} MB synthetic chat SSE stream ({i} chunks, 16 KiB reads)",
            mb / secs,
            body.len() as f64 / 1e6
        );
    }
}
