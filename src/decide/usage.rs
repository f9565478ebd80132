//! Incremental usage extraction from upstream response bodies (CONTRACT §6 settlement).
//!
//! Owns: `UsageScanner` (fed response-body chunks as they pass, split at any byte boundary),
//! `BodyKind`, `ScanResult`, and the normalisation of provider usage shapes into `Usage`
//! (semantics in `usage_types.rs`). It only reads the bytes it is shown: it never holds, delays or
//! changes the stream. Imports: std, serde, serde_json, memchr, and the sibling modules `route`,
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
//! Reading rules (a "text" is a whole JSON body or one SSE `data:` payload):
//! - Messages: the text is deserialised (`Frame`): top-level `model` and `usage`, `message.model`
//!   and `message.usage`; a duplicate field or a value of the wrong kind makes it unparsable.
//! - OpenAI shapes: when `"usage":` occurs once in the text (at any depth) with an object or
//!   `null` value, and `"model":` at most once with a string or `null`, those two values are the
//!   frame, wherever they sit (this also reads `response.usage` of Responses events, and a lone
//!   nested usage such as Groq's `x_groq.usage`); otherwise the text is deserialised as for
//!   Messages, plus `response.model` / `response.usage`.
//! - Output text: the string values of the route's text keys (`text_keys`), at any depth, in
//!   order, escapes decoded, into one `TokenCounter`: in SSE every data line, in a JSON body only
//!   when it reports no usage.
//! - SSE: a data line is read for its frame only when it holds a usage object (`"usage": {`) or,
//!   until a model is known, the bytes `"model"`; `event:`/`id:`/comment lines, `[DONE]`, CR
//!   before LF and one space after `data:` are skipped.
//! - Keys are matched as written: an escaped key (`"us\u0061ge"`) is not the key. A text that is
//!   not valid JSON (e.g. cut short) is read as far as these rules find what they look for.
//!
//! Cost (no text is parsed as a whole on the usual paths; `benches/hot_path.rs` measures the fake
//! upstream's bodies):
//! - SSE: lines are cut with `memchr`. A data line gets one pass over its `:` bytes, found 32 bytes
//!   at a time with word arithmetic (`scan_keys`); at each, the key before it is matched in place
//!   against the route's text keys, `usage` and `model` (a table on its last two bytes, then its
//!   quoted bytes compared as words), and a text value is counted where it lies. serde_json runs
//!   only for Messages frames and for shapes the fast readers refuse.
//! - JSON: `"usage"` and `"model"` are located with `memchr::memmem`; the usage object is read in
//!   one pass (`usage_object`, known keys compared as words, integers read in place).
//! - Allocation: the JSON body copy (one exact allocation when it comes in one piece), the partial
//!   SSE line (at least `MIN_LINE_BUFFER` once one is split, then reused; at most
//!   `MAX_SSE_LINE_BYTES`), and the model name. The JSON body is kept up to `MAX_JSON_BODY_BYTES`;
//!   of a larger one (a big embeddings batch) its last `JSON_TAIL_BYTES`, where the last usage
//!   object is read (OpenAI shapes; an Anthropic message that large reports no usage).

use super::estimate::TokenCounter;
use super::route::Route;
use super::usage_types::Usage;
use memchr::memmem::Finder;
use std::sync::LazyLock;

/// Longest SSE line kept whole; of a longer one only its last [`JSON_TAIL_BYTES`] are kept, and
/// an OpenAI-shaped usage object is read from them (the line is counted as unparsable).
pub const MAX_SSE_LINE_BYTES: usize = 1 << 20;
/// Largest JSON body buffered for parsing whole; beyond it only its last [`JSON_TAIL_BYTES`] are
/// kept, and the usage object is read from them (OpenAI shapes end with it).
pub const MAX_JSON_BODY_BYTES: usize = 8 << 20;
/// How much of the end of a JSON body past [`MAX_JSON_BODY_BYTES`] is kept for its usage.
pub const JSON_TAIL_BYTES: usize = 64 << 10;
/// First capacity of the partial-line buffer (most event lines are shorter).
const MIN_LINE_BUFFER: usize = 1024;

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
    /// A stream cut before its usage whose provider had already reported the prompt (Anthropic
    /// `message_start`: input, cache reads and writes): `(prompt_tokens, cached_tokens)`,
    /// normalised as in `usage`. `None` when `usage` is known or nothing was reported.
    pub reported_prompt: Option<(u64, u64)>,
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

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_ws(b[i]) {
        i += 1;
    }
    i
}

const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;

/// The high bit of each byte of `x` that is zero (exact: no carry crosses a byte).
#[inline]
fn zero_bytes(x: u64) -> u64 {
    !(((x & LOW7).wrapping_add(LOW7)) | x) & !LOW7
}

/// `c` in every byte.
const fn splat(c: u8) -> u64 {
    u64::from_le_bytes([c; 8])
}

/// The index of the first `"` or `\` at or after `i` (`b.len()` if none), eight bytes at a time.
#[inline]
fn quote_or_backslash(b: &[u8], mut i: usize) -> usize {
    while let Some(w) = b.get(i..i + 8) {
        let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        let m = zero_bytes(v ^ splat(b'"')) | zero_bytes(v ^ splat(b'\\'));
        if m != 0 {
            return i + (m.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < b.len() && b[i] != b'"' && b[i] != b'\\' {
        i += 1;
    }
    i
}

/// The index after the closing quote of the string whose content starts at `i`.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i = quote_or_backslash(b, i);
        match b.get(i)? {
            b'"' => return Some(i + 1),
            _ => i += 2,
        }
    }
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

/// Bytes of a number or literal (`[0-9A-Za-z+.-]`), and bytes that may follow a member value
/// (`,`, `}`, whitespace).
const SCALAR: u8 = 1;
const AFTER_VALUE: u8 = 2;
static BYTE_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.') {
            t[c] = SCALAR;
        } else if matches!(b, b',' | b'}' | b' ' | b'\t' | b'\r' | b'\n') {
            t[c] = AFTER_VALUE;
        }
        c += 1;
    }
    t
};

/// The end of the number or literal starting at `b[i]`: a run of `[0-9A-Za-z+.-]` followed by
/// `,`, `}` or whitespace. `None` for anything else (left to the general readers).
fn scalar_end(b: &[u8], i: usize) -> Option<usize> {
    let mut e = i;
    while e < b.len() && BYTE_CLASS[usize::from(b[e])] == SCALAR {
        e += 1;
    }
    (e > i && BYTE_CLASS[usize::from(*b.get(e)?)] == AFTER_VALUE).then_some(e)
}

// ----------------------------------------------------------------------------- key search

/// How often `"key":` occurs in a text, and where the value of the first one starts.
#[derive(Clone, Copy, Debug, Default)]
struct Occurrences {
    n: u32,
    /// The first occurrence's value start, if the text goes on after its colon.
    first: Option<usize>,
}

impl Occurrences {
    fn add(&mut self, value: usize, len: usize) {
        self.n += 1;
        if value < len && self.first.is_none() {
            self.first = Some(value);
        }
    }
}

/// Most keys one [`scan_keys`] pass looks for: four text keys, `usage`, `model`.
const MAX_KEYS: usize = 6;
/// Longest key a [`KeySet`] can hold (its quoted form is compared in three words).
const MAX_KEY_LEN: usize = 22;

/// The keys one [`scan_keys`] pass matches: the route's text keys, then `usage` and `model`.
/// Each key is matched in its quoted form `"key"`, whose bytes are kept as little-endian words:
/// `tail` is its last eight bytes (fewer for short keys: `tail_mask` keeps those), `head` and
/// `mid` its bytes 0..8 and 8..16 when it is longer than eight.
struct KeySet {
    len: usize,
    /// Keys `..text` are output-text keys; `text` is `usage`, `text + 1` is `model`.
    text: usize,
    /// Bit `k` of `by_end[end_hash(a, z)]`: key `k` may end with bytes `a`, `z`.
    by_end: [u8; 256],
    quoted_len: [usize; MAX_KEYS],
    tail: [u64; MAX_KEYS],
    tail_mask: [u64; MAX_KEYS],
    head: [u64; MAX_KEYS],
    mid: [u64; MAX_KEYS],
}

/// Bytes `from..from + 8` of `"key"` as a little-endian word; bytes past its end are zero.
const fn quoted_word(key: &[u8], from: usize) -> u64 {
    let mut w = 0u64;
    let mut i = 0;
    while i < 8 {
        let at = from + i;
        let byte = if at == 0 || at == key.len() + 1 {
            b'"'
        } else if at <= key.len() {
            key[at - 1]
        } else {
            0
        };
        w |= (byte as u64) << (8 * i);
        i += 1;
    }
    w
}

/// The [`KeySet::by_end`] slot of a key ending with bytes `a`, `z`.
#[inline(always)]
const fn end_hash(a: u8, z: u8) -> usize {
    (z ^ a.rotate_left(4)) as usize
}

const fn key_set(text_keys: &[&'static [u8]]) -> KeySet {
    let mut set = KeySet {
        len: text_keys.len() + 2,
        text: text_keys.len(),
        by_end: [0; 256],
        quoted_len: [0; MAX_KEYS],
        tail: [0; MAX_KEYS],
        tail_mask: [0; MAX_KEYS],
        head: [0; MAX_KEYS],
        mid: [0; MAX_KEYS],
    };
    let mut k = 0;
    while k < set.len {
        let key: &[u8] = if k < text_keys.len() {
            text_keys[k]
        } else if k == text_keys.len() {
            b"usage"
        } else {
            b"model"
        };
        assert!(key.len() >= 2 && key.len() <= MAX_KEY_LEN);
        let quoted = key.len() + 2;
        set.by_end[end_hash(key[key.len() - 2], key[key.len() - 1])] |= 1 << k;
        set.quoted_len[k] = quoted;
        if quoted >= 8 {
            set.tail[k] = quoted_word(key, quoted - 8);
            set.tail_mask[k] = u64::MAX;
        } else {
            // The window ends with the closing quote: the key sits in its high bytes.
            set.tail[k] = quoted_word(key, 0) << (8 * (8 - quoted));
            set.tail_mask[k] = u64::MAX << (8 * (8 - quoted));
        }
        set.head[k] = quoted_word(key, 0);
        set.mid[k] = quoted_word(key, 8);
        k += 1;
    }
    set
}

static CHAT_KEYS: KeySet = key_set(&[b"content", b"arguments", b"refusal", b"reasoning_content"]);
static COMPLETIONS_KEYS: KeySet = key_set(&[b"text"]);
static RESPONSES_SSE_KEYS: KeySet = key_set(&[b"delta"]);
static RESPONSES_JSON_KEYS: KeySet = key_set(&[b"text", b"arguments"]);
static MESSAGES_KEYS: KeySet = key_set(&[b"text", b"partial_json", b"thinking"]);
static NO_TEXT_KEYS: KeySet = key_set(&[]);

/// Keys whose string values are output text, per route and framing.
fn text_keys(route: Route, kind: BodyKind) -> &'static KeySet {
    match (route, kind) {
        (Route::ChatCompletions, _) => &CHAT_KEYS,
        (Route::Completions, _) => &COMPLETIONS_KEYS,
        // Stream: the `.delta` events only (`.done` events and `response.completed` repeat the
        // text). Body: the output parts.
        (Route::Responses, BodyKind::Sse) => &RESPONSES_SSE_KEYS,
        (Route::Responses, BodyKind::Json) => &RESPONSES_JSON_KEYS,
        (Route::Messages, _) => &MESSAGES_KEYS,
        (Route::Embeddings, _) => &NO_TEXT_KEYS,
    }
}

/// What [`scan_keys`] saw of `usage` and `model`.
#[derive(Clone, Copy, Debug, Default)]
struct Found {
    usage: Occurrences,
    model: Occurrences,
    /// Some `"usage":` holds an object (not `null`).
    usage_object: bool,
}

/// One pass over JSON text `b`, at any nesting: feeds the string values of the set's text keys,
/// in order, to `text`, and notes the `"usage":` and `"model":` keys. A key is a `"key"` followed
/// by optional whitespace and `:`; inside a JSON string every quote is escaped, so no string
/// content can look like one. The `:` bytes are found sixteen at a time; at each, the key before
/// it is checked in place (its last two bytes, then its quoted bytes a word at a time).
fn scan_keys(b: &[u8], set: &KeySet, mut text: Option<&mut TokenCounter>) -> Found {
    let mut found = Found::default();
    let mut blocks = b.chunks_exact(32);
    let mut i = 0;
    for block in &mut blocks {
        let w: [u64; 4] = std::array::from_fn(|k| {
            zero_bytes(u64::from_le_bytes(block[8 * k..8 * k + 8].try_into().expect("8 bytes")) ^ splat(b':'))
        });
        if w[0] | w[1] | w[2] | w[3] != 0 {
            colons_in_block(b, i, w[0], w[1], set, &mut found, &mut text);
            colons_in_block(b, i + 16, w[2], w[3], set, &mut found, &mut text);
        }
        i += 32;
    }
    let tail = blocks.remainder();
    if tail.len() >= 16 {
        let x = zero_bytes(word_at(tail, 0) ^ splat(b':'));
        let y = zero_bytes(word_at(tail, 8) ^ splat(b':'));
        colons_in_block(b, i, x, y, set, &mut found, &mut text);
        i += 16;
    }
    for colon in i..b.len() {
        if b[colon] == b':' {
            key_at(b, colon, set, &mut found, &mut text);
        }
    }
    found
}

/// [`colons_in_word`] for the two words of the block at `b[i..i + 16]`.
#[inline(always)]
fn colons_in_block(
    b: &[u8],
    i: usize,
    x: u64,
    y: u64,
    set: &KeySet,
    found: &mut Found,
    text: &mut Option<&mut TokenCounter>,
) {
    colons_in_word(b, i, x, set, found, text);
    colons_in_word(b, i + 8, y, set, found, text);
}

/// The little-endian word at `b[i..i + 8]`.
#[inline(always)]
fn word_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// [`key_at`] for each `:` marked in `colons` (high bits of bytes, from [`zero_bytes`]) of the
/// word at `b[i..]`. The usual `"key":` whose last bytes match no key is turned away here.
#[inline(always)]
fn colons_in_word(
    b: &[u8],
    i: usize,
    mut colons: u64,
    set: &KeySet,
    found: &mut Found,
    text: &mut Option<&mut TokenCounter>,
) {
    while colons != 0 {
        let colon = i + (colons.trailing_zeros() / 8) as usize;
        colons &= colons - 1;
        if colon >= 9 && b[colon - 1] == b'"' {
            let candidates = set.by_end[end_hash(b[colon - 3], b[colon - 2])];
            if candidates != 0 {
                key_before(b, colon, colon - 1, candidates, set, found, text);
            }
        } else {
            key_at(b, colon, set, found, text);
        }
    }
}

/// The [`scan_keys`] step at the `:` at `b[colon]`.
#[inline(never)]
fn key_at(b: &[u8], colon: usize, set: &KeySet, found: &mut Found, text: &mut Option<&mut TokenCounter>) {
    // b[close] is the key's closing quote.
    let mut close = colon.wrapping_sub(1);
    while close < b.len() && is_ws(b[close]) {
        close = close.wrapping_sub(1);
    }
    if close >= b.len() || b[close] != b'"' || close < 2 {
        return;
    }
    if close < 8 {
        return key_at_start(b, colon, close, set, found, text);
    }
    let candidates = set.by_end[end_hash(b[close - 2], b[close - 1])];
    if candidates != 0 {
        key_before(b, colon, close, candidates, set, found, text);
    }
}

/// Matches the keys in `candidates` against the quoted key closing at `b[close]` (`close >= 8`).
#[inline(always)]
fn key_before(
    b: &[u8],
    colon: usize,
    close: usize,
    mut candidates: u8,
    set: &KeySet,
    found: &mut Found,
    text: &mut Option<&mut TokenCounter>,
) {
    let tail = word_at(b, close - 7);
    while candidates != 0 {
        let k = candidates.trailing_zeros() as usize;
        candidates &= candidates - 1;
        if tail & set.tail_mask[k] != set.tail[k] {
            continue;
        }
        let quoted = set.quoted_len[k];
        if quoted > 8 {
            let Some(open) = (close + 1).checked_sub(quoted) else { continue };
            if word_at(b, open) != set.head[k] || (quoted > 16 && word_at(b, open + 8) != set.mid[k]) {
                continue;
            }
        }
        return key_found(b, colon, k, set, found, text);
    }
}

/// [`key_at`] for a key that closes within the first eight bytes of the text.
#[cold]
fn key_at_start(
    b: &[u8],
    colon: usize,
    close: usize,
    set: &KeySet,
    found: &mut Found,
    text: &mut Option<&mut TokenCounter>,
) {
    for k in 0..set.len {
        let quoted = set.quoted_len[k];
        let Some(open) = (close + 1).checked_sub(quoted) else { continue };
        let mut window = [0u8; 24];
        window[..quoted].copy_from_slice(&b[open..=close]);
        let mut want = [0u8; 24];
        want[..8].copy_from_slice(&set.head[k].to_le_bytes());
        want[8..16].copy_from_slice(&set.mid[k].to_le_bytes());
        if quoted > 16 {
            want[quoted - 8..quoted].copy_from_slice(&set.tail[k].to_le_bytes());
        }
        if window[..quoted] == want[..quoted] {
            return key_found(b, colon, k, set, found, text);
        }
    }
}

/// Key `k` of the set ends just before the `:` at `b[colon]`.
#[inline(always)]
fn key_found(b: &[u8], colon: usize, k: usize, set: &KeySet, found: &mut Found, text: &mut Option<&mut TokenCounter>) {
    let v = skip_ws(b, colon + 1);
    if k < set.text {
        if let (Some(t), Some(b'"')) = (text.as_deref_mut(), b.get(v)) {
            count_json_string(b, v + 1, t);
        }
    } else if k == set.text {
        found.usage.add(v, b.len());
        found.usage_object |= b.get(v) == Some(&b'{');
    } else {
        found.model.add(v, b.len());
    }
}

static USAGE_FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static MODEL_FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"model\""));

/// The `"key":` occurrences of a text found by `memmem` (for a whole JSON body, where most bytes
/// are far from both keys); the same count as [`scan_keys`] gives.
fn occurrences(b: &[u8], finder: &Finder<'_>) -> Occurrences {
    let mut o = Occurrences::default();
    each_value(b, finder, |v| o.add(v, b.len()));
    o
}

/// Calls `f` with where the value starts (maybe `b.len()`) for each occurrence of the quoted key
/// `finder` looks for that a colon follows.
fn each_value(b: &[u8], finder: &Finder<'_>, mut f: impl FnMut(usize)) {
    let after_key = finder.needle().len();
    let mut from = 0;
    while let Some(i) = b.get(from..).and_then(|h| finder.find(h)).map(|i| i + from) {
        let colon = skip_ws(b, i + after_key);
        if b.get(colon) == Some(&b':') {
            f(skip_ws(b, colon + 1));
        }
        from = i + 1;
    }
}

// -------------------------------------------------------------------------- frame readers

/// An OpenAI-shape frame read from its key occurrences (module doc): the model (only built when
/// `want_model`) and the usage. `None`: deserialise the whole text instead.
fn fast_frame(b: &[u8], usage: Occurrences, model: Occurrences, want_model: bool) -> Option<FastFrame> {
    let usage = match (usage.n, usage.first) {
        (0, _) => None,
        (1, Some(j)) if b[j] == b'{' => Some(usage_at(b, j)?),
        (1, Some(j)) if b[j..].starts_with(b"null") => None,
        _ => return None,
    };
    let model = match (model.n, model.first) {
        (0, _) => None,
        (1, Some(j)) if b[j] == b'"' => model_string(&b[j..string_end(b, j + 1)?], want_model)?,
        (1, Some(j)) if b[j..].starts_with(b"null") => None,
        _ => return None,
    };
    Some(FastFrame { model, usage })
}

/// The usage object opening at `b[j]`: read in place, else cut out and read with the fast reader,
/// else with serde; `None` when none of them can.
fn usage_at(b: &[u8], j: usize) -> Option<RawUsage> {
    usage_object(b, j).or_else(|| {
        let obj = &b[j..object_end(b, j)?];
        raw_usage_fast(obj).or_else(|| serde_json::from_slice::<RawUsage>(obj).ok())
    })
}

/// What [`fast_frame`] read.
struct FastFrame {
    model: Option<String>,
    usage: Option<RawUsage>,
}

/// The JSON string `s` (with its quotes) as serde_json reads it; `Some(None)` when it is valid but
/// not wanted, `None` when serde_json would refuse it.
fn model_string(s: &[u8], want: bool) -> Option<Option<String>> {
    let content = &s[1..s.len() - 1];
    if content.iter().all(|&c| (0x20..0x80).contains(&c) && c != b'\\') {
        // Printable ASCII without escapes: serde_json would take it as it is.
        return Some(if want { Some(std::str::from_utf8(content).ok()?.to_owned()) } else { None });
    }
    let text = serde_json::from_slice::<String>(s).ok()?;
    Some(want.then_some(text))
}

/// Calls `f(key, value_start)` for each member of the JSON object opening at `b[i]`, where
/// `key_at(b, q)` names the key whose opening quote is `b[q]` and returns it with the index after
/// its closing quote; `f` returns where the value ends. Returns the index after the object's `}`;
/// `None` when either says so or the text is not the plain shape (a bad separator, its end).
#[inline(always)]
fn each_member<K>(
    b: &[u8],
    i: usize,
    key_at: impl Fn(&[u8], usize) -> Option<(K, usize)>,
    mut f: impl FnMut(K, usize) -> Option<usize>,
) -> Option<usize> {
    let mut i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let (key, after) = key_at(b, i)?;
        // The compact layout (`"key":value,"key"`) is tried before whitespace is skipped.
        let mut colon = after;
        if b.get(colon) != Some(&b':') {
            colon = skip_ws(b, colon);
            if b.get(colon) != Some(&b':') {
                return None;
            }
        }
        let mut v = colon + 1;
        if b.get(v).is_some_and(|&c| is_ws(c)) {
            v = skip_ws(b, v);
        }
        let mut end = f(key, v)?;
        if b.get(end).is_some_and(|&c| is_ws(c)) {
            end = skip_ws(b, end);
        }
        match b.get(end)? {
            b',' => {
                i = end + 1;
                if b.get(i) != Some(&b'"') {
                    i = skip_ws(b, i);
                }
            }
            b'}' => return Some(end + 1),
            _ => return None,
        }
    }
}

/// The end of any value starting at `b[v]`, as [`members`] delimits it (scalars more strictly).
fn value_end(b: &[u8], v: usize) -> Option<usize> {
    match b.get(v)? {
        b'{' | b'[' => object_end(b, v),
        b'"' => string_end(b, v + 1),
        _ => scalar_end(b, v),
    }
}

/// An integer or `null` member value at `b[v]` and its end, as [`int_or_null`] reads the scalar
/// that [`scalar_end`] delimits.
#[inline(always)]
fn int_member(b: &[u8], v: usize) -> Option<(Option<u64>, usize)> {
    let mut e = v;
    let mut n = 0u64;
    // Up to 19 digits cannot overflow; a longer run is checked digit by digit.
    while let Some(d) = b.get(e).map(|d| d.wrapping_sub(b'0')).filter(|&d| d < 10) {
        n = if e - v < 19 { n * 10 + u64::from(d) } else { n.checked_mul(10)?.checked_add(u64::from(d))? };
        e += 1;
    }
    let value = match e - v {
        0 if b[v..].starts_with(b"null") => {
            e += 4;
            None
        }
        0 => return None,
        1 => Some(n),
        _ if b[v] == b'0' => return None,
        _ => Some(n),
    };
    (BYTE_CLASS[usize::from(*b.get(e)?)] == AFTER_VALUE).then_some((value, e))
}

/// [`value_end`] with plain integers (most unknown usage members) read in place.
#[inline(always)]
fn member_value_end(b: &[u8], v: usize) -> Option<usize> {
    let mut e = v;
    while b.get(e).is_some_and(u8::is_ascii_digit) {
        e += 1;
    }
    if e > v && b.get(e).is_some_and(|&c| BYTE_CLASS[usize::from(c)] == AFTER_VALUE) {
        return Some(e);
    }
    value_end(b, v)
}

/// A known key of an object the fast readers walk: its bytes and, as little-endian words, its
/// bytes at 0, 8 and 16 (zero-padded) and its last eight: enough to compare any key of 8 to 32
/// bytes in place, with the closing quote after it.
struct KnownKey {
    len: usize,
    words: [u64; 3],
    tail: u64,
}

const fn known(key: &[u8]) -> KnownKey {
    assert!(key.len() >= 8 && key.len() <= 32);
    let mut words = [0u64; 3];
    let mut i = 0;
    while i < 24 && i < key.len() {
        words[i / 8] |= (key[i] as u64) << (8 * (i % 8));
        i += 1;
    }
    let mut tail = 0u64;
    let mut k = 0;
    while k < 8 {
        tail |= (key[key.len() - 8 + k] as u64) << (8 * k);
        k += 1;
    }
    KnownKey { len: key.len(), words, tail }
}

/// Whether the key whose opening quote is `b[q]` and whose first word is `head` is `k`; the
/// index after its closing quote if so.
#[inline(always)]
fn is_known(b: &[u8], q: usize, head: u64, k: &KnownKey) -> Option<usize> {
    let close = q + 1 + k.len;
    if head != k.words[0] || b.get(close) != Some(&b'"') {
        return None;
    }
    let key = &b[q + 1..close];
    let same = word_at(key, k.len - 8) == k.tail
        && (k.len <= 16 || word_at(key, 8) == k.words[1])
        && (k.len <= 24 || word_at(key, 16) == k.words[2]);
    same.then_some(close + 1)
}

/// The key whose opening quote is `b[q]`, when it is none of the known ones: `Some((None,
/// after))`, or `None` for a key with an escape or no end.
#[inline(always)]
fn other_key<K>(b: &[u8], q: usize) -> Option<(Option<K>, usize)> {
    let close = quote_or_backslash(b, q + 1);
    (b.get(close) == Some(&b'"')).then_some((None, close + 1))
}

/// The first word of the key whose opening quote is `b[q]` (0 when the text ends first).
#[inline(always)]
fn key_head(b: &[u8], q: usize) -> u64 {
    b.get(q + 1..q + 9).map_or(0, |w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
}

/// The usage keys [`usage_object`] reads: counts first (their `RawUsage` field by index), then
/// the `*_details` objects.
const USAGE_KEYS: [KnownKey; 10] = [
    known(b"prompt_tokens"),
    known(b"completion_tokens"),
    known(b"input_tokens"),
    known(b"output_tokens"),
    known(b"cache_read_input_tokens"),
    known(b"cache_creation_input_tokens"),
    known(b"prompt_tokens_details"),
    known(b"completion_tokens_details"),
    known(b"input_tokens_details"),
    known(b"output_tokens_details"),
];

/// The key whose opening quote is `b[q]`: `Some((Some(id), after))` for `USAGE_KEYS[id]`,
/// `Some((None, after))` for another key, `None` for a key with an escape or no end (`after`:
/// the index after the closing quote).
#[inline(always)]
fn usage_key(b: &[u8], q: usize) -> Option<(Option<usize>, usize)> {
    const PROMPT: u64 = USAGE_KEYS[0].words[0];
    const COMPLETION: u64 = USAGE_KEYS[1].words[0];
    const INPUT: u64 = USAGE_KEYS[2].words[0];
    const OUTPUT: u64 = USAGE_KEYS[3].words[0];
    const CACHE_READ: u64 = USAGE_KEYS[4].words[0];
    const CACHE_CREATION: u64 = USAGE_KEYS[5].words[0];
    let head = key_head(b, q);
    let is = |id: usize| is_known(b, q, head, &USAGE_KEYS[id]).map(|after| (Some(id), after));
    let found = match head {
        PROMPT => is(0).or_else(|| is(6)),
        COMPLETION => is(1).or_else(|| is(7)),
        INPUT => is(2).or_else(|| is(8)),
        OUTPUT => is(3).or_else(|| is(9)),
        CACHE_READ => is(4),
        CACHE_CREATION => is(5),
        _ => None,
    };
    found.or_else(|| other_key(b, q))
}

const DETAILS_KEYS: [KnownKey; 2] = [known(b"cached_tokens"), known(b"reasoning_tokens")];

/// [`usage_key`] for [`DETAILS_KEYS`].
#[inline(always)]
fn details_key(b: &[u8], q: usize) -> Option<(Option<usize>, usize)> {
    let head = key_head(b, q);
    let is = |id: usize| is_known(b, q, head, &DETAILS_KEYS[id]).map(|after| (Some(id), after));
    is(0).or_else(|| is(1)).or_else(|| other_key(b, q))
}

impl RawUsage {
    /// The count field of `USAGE_KEYS[id]` (`id < 6`).
    fn count_mut(&mut self, id: usize) -> &mut Option<u64> {
        match id {
            0 => &mut self.prompt_tokens,
            1 => &mut self.completion_tokens,
            2 => &mut self.input_tokens,
            3 => &mut self.output_tokens,
            4 => &mut self.cache_read_input_tokens,
            _ => &mut self.cache_creation_input_tokens,
        }
    }

    /// The details field of `USAGE_KEYS[id]` (`6 <= id < 10`).
    fn details_mut(&mut self, id: usize) -> &mut Option<Details> {
        match id {
            6 => &mut self.prompt_tokens_details,
            7 => &mut self.completion_tokens_details,
            8 => &mut self.input_tokens_details,
            _ => &mut self.output_tokens_details,
        }
    }
}

/// The usage object opening at `b[j]`, read in one pass; the same as [`raw_usage_fast`] on the
/// object's bytes wherever this accepts (it refuses a little more: odd scalars). `None`: use
/// `raw_usage_fast` and serde.
fn usage_object(b: &[u8], j: usize) -> Option<RawUsage> {
    let mut u = RawUsage::default();
    let mut seen = 0u32;
    each_member(b, j, usage_key, |id, v| match id {
        None => member_value_end(b, v),
        Some(id) => {
            first_time(&mut seen, id as u32)?;
            if id < 6 {
                let (n, end) = int_member(b, v)?;
                *u.count_mut(id) = n;
                return Some(end);
            }
            if b.get(v) == Some(&b'{') {
                let (d, end) = details_object(b, v)?;
                *u.details_mut(id) = Some(d);
                return Some(end);
            }
            let (None, end) = int_member(b, v)? else { return None };
            *u.details_mut(id) = None;
            Some(end)
        }
    })?;
    Some(u)
}

/// A `*_details` object opening at `b[v]` and its end, as [`details_fast`] reads it.
fn details_object(b: &[u8], v: usize) -> Option<(Details, usize)> {
    let mut d = Details::default();
    let mut seen = 0u32;
    let end = each_member(b, v, details_key, |id, v| {
        let Some(id) = id else { return member_value_end(b, v) };
        first_time(&mut seen, id as u32)?;
        let (n, end) = int_member(b, v)?;
        *(if id == 0 { &mut d.cached_tokens } else { &mut d.reasoning_tokens }) = n;
        Some(end)
    })?;
    Some((d, end))
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

/// An OpenAI-shape text's frame from two `memmem` searches (tests call it on lines and bodies).
#[cfg(test)]
fn json_frame_fast(b: &[u8]) -> Option<Frame> {
    let f = fast_frame(b, occurrences(b, &USAGE_FINDER), occurrences(b, &MODEL_FINDER), true)?;
    Some(Frame { model: f.model, usage: f.usage, message: None, response: None })
}

/// Whether the JSON text holds a `"usage": {` (an object, not `null`).
#[cfg(test)]
fn has_usage_object(b: &[u8]) -> bool {
    scan_keys(b, &NO_TEXT_KEYS, None).usage_object
}

// ----------------------------------------------------------------------------- output text

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
/// decoding escapes; returns the index after the closing quote (or `b.len()`). ASCII goes to the
/// counter byte by byte; a run of other bytes is decoded as UTF-8 up to the next ASCII byte (an
/// invalid sequence never spans one, so each becomes one U+FFFD as in the whole string).
fn count_json_string(b: &[u8], mut i: usize, c: &mut TokenCounter) -> usize {
    while i < b.len() {
        match b[i] {
            b'"' => return i + 1,
            b'\\' => {
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
            }
            a if a.is_ascii() => {
                c.push_ascii(a);
                i += 1;
            }
            _ => {
                let end = b[i..].iter().position(u8::is_ascii).map_or(b.len(), |n| i + n);
                push_bytes(c, &b[i..end]);
                i = end;
            }
        }
    }
    b.len()
}

// ---------------------------------------------------------------------------------- scanner

/// Incremental usage extractor: `feed` each response-body chunk as it passes, `finish` at the end.
#[derive(Debug)]
pub struct UsageScanner {
    route: Route,
    kind: BodyKind,
    /// SSE: the partial last line. JSON: the body so far (past the cap: its end).
    buf: Vec<u8>,
    /// SSE: the current line passed the cap and is being skipped. JSON: the body passed the cap
    /// (`buf` keeps its last `JSON_TAIL_BYTES` or more, up to twice that).
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
                    self.end_long_line(&[]);
                } else if !self.buf.is_empty() {
                    // A last line without its newline.
                    let line = std::mem::take(&mut self.buf);
                    self.sse_line(&line);
                }
            }
            BodyKind::Json if self.overflow => {
                if self.route != Route::Messages {
                    let tail = std::mem::take(&mut self.buf);
                    self.tail_usage(&tail);
                }
            }
            BodyKind::Json => {
                if !self.buf.is_empty() {
                    let body = std::mem::take(&mut self.buf);
                    if self.route == Route::Messages {
                        self.deserialize_frame(&body);
                    } else {
                        let (usage, model) = (occurrences(&body, &USAGE_FINDER), occurrences(&body, &MODEL_FINDER));
                        self.openai_frame(&body, usage, model);
                    }
                    // The observed text only matters when the body reports no usage it can be
                    // settled from (none, or counts beyond any model's).
                    if self.current_usage().is_none_or(|u| !u.plausible()) {
                        scan_keys(&body, text_keys(self.route, self.kind), Some(&mut self.text));
                    }
                }
            }
        }
        self.buf = Vec::new();
        ScanResult {
            usage: self.current_usage(),
            observed_output_tokens: self.text.tokens(),
            model: self.model.take(),
            reported_prompt: self.reported_prompt(),
        }
    }

    /// The prompt an Anthropic stream reported in `message_start`, when it ended before its
    /// final `message_delta`.
    fn reported_prompt(&self) -> Option<(u64, u64)> {
        let a = &self.anthropic;
        let reported = a.input.is_some() || a.cache_read.is_some() || a.cache_creation.is_some();
        (self.route == Route::Messages && !self.anthropic_final && reported).then(|| {
            let u = a.usage();
            (u.prompt_tokens, u.cached_tokens)
        })
    }

    /// The usage seen so far (Anthropic: only once the final `message_delta` arrived, and only
    /// when some answer carried its token counts — a `"usage": {}` or another provider's shape
    /// reports nothing, and the request is charged from what was observed).
    fn current_usage(&self) -> Option<Usage> {
        if self.route == Route::Messages {
            let a = &self.anthropic;
            let counted =
                a.input.is_some() || a.output.is_some() || a.cache_read.is_some() || a.cache_creation.is_some();
            (self.anthropic_final && counted).then(|| a.usage())
        } else {
            self.usage
        }
    }

    fn feed_json(&mut self, chunk: &[u8]) {
        if self.overflow {
            self.keep_tail(chunk);
            return;
        }
        if self.buf.len() + chunk.len() > MAX_JSON_BODY_BYTES {
            // Too large to parse whole: count the text seen (in case no usage turns up) and keep
            // only the end, where the usage object is.
            self.overflow = true;
            scan_keys(&self.buf, text_keys(self.route, self.kind), Some(&mut self.text));
            let cut = self.buf.len().saturating_sub(JSON_TAIL_BYTES);
            self.buf.drain(..cut);
            self.buf.shrink_to(2 * JSON_TAIL_BYTES);
            self.keep_tail(chunk);
            return;
        }
        if self.buf.capacity() == 0 {
            // Most bodies arrive in one piece: one exact allocation.
            self.buf = chunk.to_vec();
        } else {
            self.buf.extend_from_slice(chunk);
        }
    }

    /// Appends to the kept end of an oversized JSON body, dropping its front past twice the
    /// tail (each byte moves at most once).
    fn keep_tail(&mut self, chunk: &[u8]) {
        let chunk = &chunk[chunk.len().saturating_sub(JSON_TAIL_BYTES)..];
        if self.buf.len() + chunk.len() > 2 * JSON_TAIL_BYTES {
            let cut = (self.buf.len() + chunk.len()).saturating_sub(JSON_TAIL_BYTES).min(self.buf.len());
            self.buf.drain(..cut);
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The usage of an oversized OpenAI-shaped JSON body: its last `"usage": {…}` in the kept
    /// end (a key: quotes inside strings are escaped).
    fn tail_usage(&mut self, tail: &[u8]) {
        let mut last = None;
        each_value(tail, &USAGE_FINDER, |v| {
            if tail.get(v) == Some(&b'{') {
                last = Some(v);
            }
        });
        let Some(j) = last else { return };
        if let Some(u) = usage_at(tail, j).and_then(|u| openai_usage(&u, self.route)) {
            self.usage = Some(u);
        }
    }

    fn feed_sse(&mut self, mut chunk: &[u8]) {
        loop {
            // Lines end with `\n`, `\r\n` or a lone `\r` (the SSE spec allows all three; the
            // empty "line" between `\r` and `\n` is skipped as blank lines are). Events end with
            // a blank line: a line end right away is common, skip the search.
            let nl = if matches!(chunk.first(), Some(b'\n' | b'\r')) {
                Some(0)
            } else {
                memchr::memchr2(b'\n', b'\r', chunk)
            };
            let Some(nl) = nl else { break };
            let (head, rest) = (&chunk[..nl], &chunk[nl + 1..]);
            chunk = rest;
            if self.overflow || self.buf.len() + head.len() > MAX_SSE_LINE_BYTES {
                self.end_long_line(head);
            } else if self.buf.is_empty() {
                if !head.is_empty() {
                    self.sse_line(head);
                }
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
        if chunk.is_empty() {
            return;
        }
        if self.overflow {
            self.keep_tail(chunk);
        } else if self.buf.len() + chunk.len() > MAX_SSE_LINE_BYTES {
            // Too long to keep: only its end, where an OpenAI-shaped event has its usage.
            self.overflow = true;
            self.keep_tail(chunk);
            self.buf.shrink_to(2 * JSON_TAIL_BYTES);
        } else {
            if self.buf.capacity() == 0 {
                // Room for the rest of a typical event line, so that it does not move again.
                self.buf.reserve(chunk.len().max(MIN_LINE_BUFFER));
            }
            self.buf.extend_from_slice(chunk);
        }
    }

    /// The end of an SSE line too long to keep whole (`head`: its last piece; `buf` holds the
    /// end of what came before): counted as unparsable, and an OpenAI-shaped event — a Responses
    /// `response.completed` carrying a large output (a generated image), a big chat chunk — still
    /// gives its usage, read from the line's last `JSON_TAIL_BYTES` as for an oversized JSON body.
    fn end_long_line(&mut self, head: &[u8]) {
        self.overflow = false;
        self.unparsable += 1;
        if self.route != Route::Messages {
            self.keep_tail(head);
            let tail = std::mem::take(&mut self.buf);
            self.tail_usage(&tail);
        }
        self.buf = Vec::new();
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
        let found = scan_keys(data, text_keys(self.route, self.kind), Some(&mut self.text));
        let wants_model = self.model.is_none() && (found.model.n > 0 || MODEL_FINDER.find(data).is_some());
        if wants_model || found.usage_object {
            if self.route == Route::Messages {
                self.deserialize_frame(data);
            } else {
                self.openai_frame(data, found.usage, found.model);
            }
        }
    }

    /// Reads an OpenAI-shape text whose `usage` and `model` keys were located.
    fn openai_frame(&mut self, b: &[u8], usage: Occurrences, model: Occurrences) {
        match fast_frame(b, usage, model, self.model.is_none()) {
            Some(FastFrame { model, usage }) => {
                if self.model.is_none() {
                    self.model = model.filter(|m| !m.is_empty());
                }
                if let Some(u) = usage.and_then(|u| openai_usage(&u, self.route)) {
                    self.usage = Some(u);
                }
            }
            None => self.deserialize_frame(b),
        }
    }

    fn deserialize_frame(&mut self, b: &[u8]) {
        match serde_json::from_slice::<Frame>(b) {
            Ok(f) => self.apply(f),
            Err(_) => self.unparsable += 1,
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
    fn the_one_pass_usage_reader_agrees_with_the_hand_read_one() {
        let read = |obj: &str| {
            let text = format!("{{\"usage\":{obj}");
            usage_object(text.as_bytes(), 9)
        };
        for obj in [
            r#"{}"#,
            r#"{ }"#,
            r#"{"completion_tokens":16,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":7,"rejected_prediction_tokens":0},"prompt_tokens":46,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":32},"total_tokens":62}"#,
            r#"{ "input_tokens" : 12 , "output_tokens":null, "cache_read_input_tokens": 2048, "server_tool_use": {"web_search_requests": 0}, "service_tier": "standard" }"#,
            r#"{"input_tokens":36,"input_tokens_details":{"cached_tokens":12},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":5},"total_tokens":123}"#,
            r#"{"prompt_tokens":1,"x":[1,{"prompt_tokens":9}],"y":"a\"}b","z":-1.5e3}"#,
            r#"{"prompt_tokens_details":null,"completion_tokens":18446744073709551615}"#,
            "{\n  \"prompt_tokens\": 0,\n  \"prompt_tokens_details\": { \"cached_tokens\": null }\n}",
        ] {
            let fast = read(obj).unwrap_or_else(|| panic!("one pass taken for {obj}"));
            assert_eq!(Some(fast), raw_usage_fast(obj.as_bytes()), "{obj}");
        }
        // Refused, as by the hand reader (then serde decides), or where it would take odd scalars.
        for obj in [
            r#"{"prompt_tokens":1.0}"#,
            r#"{"prompt_tokens":-1}"#,
            r#"{"prompt_tokens":"1"}"#,
            r#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            r#"{"prompt_tokens":18446744073709551616}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":1}}"#,
            r#"{"prompt_tokens_details":[1]}"#,
            r#"{"prompt_tokens_details":7}"#,
            r#"{"prompt\u005ftokens":1}"#,
            r#"{"prompt_tokens":01}"#,
            r#"{"prompt_tokens":00}"#,
            r#"{"prompt_tokens":1,}"#,
            r#"{"prompt_tokens":nullx}"#,
            r#"{"x":,"prompt_tokens":1}"#,
            r#"{"x":1"y}","prompt_tokens":1}"#,
            r#"{"prompt_tokens":1"#,
        ] {
            assert!(read(obj).is_none(), "{obj}");
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
        // Usage beyond any model's is not settled from: the text is counted, as without usage.
        let absurd = OPENAI_CHAT_JSON.replace("\"prompt_tokens\": 1117", "\"prompt_tokens\": 2000000000");
        assert_ne!(absurd, OPENAI_CHAT_JSON);
        let a = whole(Route::ChatCompletions, BodyKind::Json, &absurd);
        assert!(a.usage.is_some_and(|u| !u.plausible()) && a.observed_output_tokens >= 10, "{a:?}");
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
        // An empty usage object, or another provider's shape, reports nothing: not a free call.
        let start = ANTHROPIC_JSON.find("\"usage\"").unwrap();
        for other in ["\"usage\": {}\n}", "\"usage\": {\"prompt_tokens\": 400, \"completion_tokens\": 100}\n}"] {
            let body = format!("{}{other}", &ANTHROPIC_JSON[..start]);
            let r = whole(Route::Messages, BodyKind::Json, &body);
            assert_eq!(r.usage, None, "{other}");
            assert!(r.observed_output_tokens >= 8, "{other}: charged from the text seen");
        }
        let no_counts = ANTHROPIC_SSE.replace("input_tokens", "in").replace("output_tokens", "out");
        assert_eq!(whole(Route::Messages, BodyKind::Sse, &no_counts).usage, None, "usage objects without counts");

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
                // Anthropic reported the prompt in message_start (25 + 1800 read + 7 written).
                let want = (route == Route::Messages).then_some((25 + 1800 + 7, 1800));
                assert_eq!(r.reported_prompt, want, "{route:?}");
            }
        }
        assert_eq!(whole(Route::Messages, BodyKind::Sse, ANTHROPIC_SSE).reported_prompt, None, "usage known");
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
            // A lone `\r` ends a line too (the SSE spec allows it).
            let cr = body.replace('\n', "\r");
            assert_eq!(assert_split_invariant(route, BodyKind::Sse, &cr), want);
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

        // A Responses `response.completed` carrying a 1.5 MB generated image: its usage is read
        // from the end of the line (in pieces and whole, with or without a final newline).
        let completed = format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"output\":[{{\"type\":\"image_generation_call\",\"result\":\"{}\"}}],\"usage\":{{\"input_tokens\":1000,\"output_tokens\":5000}}}}}}\n\n",
            "A".repeat(1_500_000)
        );
        for pieces in [completed.as_bytes().chunks(64 * 1024).collect::<Vec<_>>(), vec![completed.as_bytes()]] {
            let (r, bad) = scan(Route::Responses, BodyKind::Sse, &pieces);
            assert_eq!((r.usage, bad), (Some(u(1000, 5000, 0, 0)), 1));
        }
        let (r, _) = scan(Route::Responses, BodyKind::Sse, &[completed.trim_end().as_bytes()]);
        assert_eq!(r.usage, Some(u(1000, 5000, 0, 0)));
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
    fn an_oversized_json_body_is_read_for_the_usage_at_its_end() {
        // A chat completion past the cap, in pieces of every size; the usage object at the end,
        // split across pieces, and a decoy inside a string before it.
        let mut body = b"{\"model\":\"gpt-4o\",\"choices\":[{\"message\":{\"content\":\"\\\"usage\\\": {}".to_vec();
        body.extend(std::iter::repeat_n(b'a', MAX_JSON_BODY_BYTES + 3 * JSON_TAIL_BYTES));
        body.extend_from_slice(b"\"}}],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":5,\"total_tokens\":15}}");
        for piece in [1 << 20, 16 << 10, 4097, 100] {
            let mut s = UsageScanner::new(Route::ChatCompletions, BodyKind::Json);
            for c in body.chunks(piece) {
                s.feed(c);
            }
            assert!(s.buf.len() <= 2 * JSON_TAIL_BYTES, "only the end is kept: {}", s.buf.len());
            assert_eq!(s.finish().usage, Some(u(10, 5, 0, 0)), "pieces of {piece}");
        }
        // An embeddings batch: usage after a long data array.
        let mut emb = b"{\"object\":\"list\",\"data\":[".to_vec();
        while emb.len() <= MAX_JSON_BODY_BYTES {
            emb.extend_from_slice(b"{\"object\":\"embedding\",\"index\":0,\"embedding\":[0.0123,-0.0456,0.0789]},");
        }
        emb.extend_from_slice(
            b"{}],\"model\":\"text-embedding-3-small\",\"usage\":{\"prompt_tokens\":4800,\"total_tokens\":4800}}",
        );
        let (r, _) = scan(Route::Embeddings, BodyKind::Json, &emb.chunks(16 << 10).collect::<Vec<_>>());
        assert_eq!(r.usage.map(|u| u.prompt_tokens), Some(4800));
        // No usage at the end: none, and the output text seen is what is left to go on.
        let mut s = UsageScanner::new(Route::ChatCompletions, BodyKind::Json);
        s.feed(b"{\"choices\":[{\"message\":{\"content\":\"");
        for _ in 0..9 {
            s.feed(&[b'a'; 1 << 20]);
        }
        s.feed(b"\"}}]}");
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
