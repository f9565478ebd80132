//! Borrowed JSON documents for the request-body path: a body is parsed once into a flat tape of
//! nodes whose strings point into the body (only strings with escapes are copied, into one
//! arena), so parsing a request allocates about once and dropping it frees about once.
//!
//! Owns: `Doc` (a parsed document), `Json` (a copyable handle to one of its values), `Kind`,
//! `Num`, `Items`, `Entries`, and `write_json` (compact serialisation, byte for byte what
//! `serde_json::to_writer` writes for the same `serde_json::Value`). Imports: std, serde,
//! serde_json, itoa. Pure: no I/O.
//!
//! Meaning is `serde_json::Value`'s, exactly:
//! - Accepted and rejected documents are serde_json's, with its error messages. A hand-written
//!   scanner reads the common case; anything it does not fully understand (an error of any kind,
//!   deep nesting, invalid UTF-8, a number other than a short integer, a lone surrogate) is read
//!   again by serde_json itself, whose answer stands. Numbers other than short integers are
//!   always read by serde_json (float rounding is its own).
//! - Numbers are serde_json's `Number`: non-negative integers, negative integers, finite floats
//!   (`-0` is the float `-0.0`, integers beyond 64 bits are floats).
//! - A key repeated in one object: the last occurrence wins (as `Map::insert`); the earlier ones
//!   are invisible to lookups and iteration.
//! - Object entries iterate in document order; [`write_json`] writes them in key order, as
//!   `serde_json::Map` (a `BTreeMap` without the `preserve_order` feature) does.
//!
//! Bodies must be shorter than 4 GiB (offsets are `u32`; the proxy caps bodies at 1 GiB).

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// A number, as `serde_json::Number` holds it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Num {
    PosInt(u64),
    NegInt(i64),
    Float(f64),
}

impl Num {
    /// As `serde_json::Number::as_u64`.
    pub fn as_u64(self) -> Option<u64> {
        match self {
            Num::PosInt(n) => Some(n),
            Num::NegInt(_) | Num::Float(_) => None,
        }
    }

    /// As `serde_json::Number::as_f64`.
    pub fn as_f64(self) -> Option<f64> {
        Some(match self {
            Num::PosInt(n) => n as f64,
            Num::NegInt(n) => n as f64,
            Num::Float(f) => f,
        })
    }

    fn of(n: &serde_json::Number) -> Num {
        match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Num::PosInt(u),
            (None, Some(i), _) => Num::NegInt(i),
            (None, None, f) => Num::Float(f.unwrap_or(0.0)),
        }
    }
}

/// A string's text: borrowed from the body, or (when it had escapes) a range of the arena.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Text<'a> {
    Body(&'a str),
    Arena { start: u32, len: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Node<'a> {
    Null,
    Bool(bool),
    Num(Num),
    Str(Text<'a>),
    /// An object key, followed by its value's nodes; `live` is false when the key occurs again
    /// later in the same object.
    Key {
        text: Text<'a>,
        live: bool,
    },
    /// `end`: the index after the last node of the array; `len`: its element count.
    Array {
        end: u32,
        len: u32,
    },
    /// `end`: the index after the last node of the object.
    Object {
        end: u32,
    },
}

/// A parsed JSON document (see the module doc for its exact meaning).
#[derive(Clone, Debug, PartialEq)]
pub struct Doc<'a> {
    /// Pre-order: a container's node, then its children's (an object's as key, value, ...).
    nodes: Vec<Node<'a>>,
    /// The unescaped text of strings that had escapes.
    arena: String,
}

impl<'a> Doc<'a> {
    /// Parses `body` as `serde_json::from_slice::<Value>` would, with the same errors.
    pub fn parse(body: &'a [u8]) -> Result<Doc<'a>, serde_json::Error> {
        let mut b = Builder::new(body.len());
        if u32::try_from(body.len()).is_ok() && Scanner::run(body, &mut b).is_some() {
            return Ok(b.finish());
        }
        // The authoritative path: serde_json's own parser drives the same builder, emptied.
        b.nodes.clear();
        b.arena.clear();
        let mut de = serde_json::Deserializer::from_slice(body);
        Seed { b: &mut b }.deserialize(&mut de)?;
        de.end()?;
        Ok(b.finish())
    }

    /// The document of an existing `Value`, borrowing its strings (tests, benchmarks, callers
    /// that already hold a `Value`).
    pub fn from_value(v: &'a serde_json::Value) -> Doc<'a> {
        let mut b = Builder::new(0);
        match (Seed { b: &mut b }).deserialize(v) {
            Ok(()) => b.finish(),
            // A Value always deserialises; keep the type total anyway.
            Err(_) => Doc { nodes: vec![Node::Null], arena: String::new() },
        }
    }

    /// The top-level value.
    #[inline]
    pub fn root(&self) -> Json<'_> {
        Json { doc: self, at: 0 }
    }
}

/// A value of a [`Doc`]. Cheap to copy.
#[derive(Clone, Copy)]
pub struct Json<'d> {
    doc: &'d Doc<'d>,
    at: usize,
}

/// What a [`Json`] is.
pub enum Kind<'d> {
    Null,
    Bool(bool),
    Number(Num),
    String(&'d str),
    Array(Items<'d>),
    Object(Entries<'d>),
}

impl<'d> Json<'d> {
    #[inline]
    pub fn kind(self) -> Kind<'d> {
        let doc = self.doc;
        match doc.nodes[self.at] {
            Node::Null => Kind::Null,
            Node::Bool(b) => Kind::Bool(b),
            Node::Num(n) => Kind::Number(n),
            Node::Str(t) => Kind::String(doc.text(t)),
            Node::Array { end, len } => Kind::Array(Items { doc, at: self.at + 1, end: end as usize, left: len }),
            Node::Object { end } => Kind::Object(Entries { doc, at: self.at + 1, end: end as usize }),
            // A handle never points at a key.
            Node::Key { .. } => Kind::Null,
        }
    }

    /// The value of `key` when this is an object that has it (as `Value::get(&str)`).
    #[inline]
    pub fn get(self, key: &str) -> Option<Json<'d>> {
        self.as_object()?.get(key)
    }

    #[inline]
    pub fn as_object(self) -> Option<Entries<'d>> {
        match self.kind() {
            Kind::Object(o) => Some(o),
            _ => None,
        }
    }

    #[inline]
    pub fn as_str(self) -> Option<&'d str> {
        match self.doc.nodes[self.at] {
            Node::Str(t) => Some(self.doc.text(t)),
            _ => None,
        }
    }

    #[inline]
    pub fn as_bool(self) -> Option<bool> {
        match self.doc.nodes[self.at] {
            Node::Bool(b) => Some(b),
            _ => None,
        }
    }

    #[inline]
    pub fn as_u64(self) -> Option<u64> {
        match self.doc.nodes[self.at] {
            Node::Num(n) => n.as_u64(),
            _ => None,
        }
    }

    #[inline]
    pub fn is_null(self) -> bool {
        matches!(self.doc.nodes[self.at], Node::Null)
    }
}

impl std::fmt::Debug for Json<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        write_json(&mut s, *self);
        f.write_str(&s)
    }
}

impl<'a> Doc<'a> {
    #[inline]
    fn text<'d>(&'d self, t: Text<'d>) -> &'d str {
        text_in(&self.arena, t)
    }

    #[inline]
    fn end_of(&self, at: usize) -> usize {
        end_in(&self.nodes, at)
    }
}

/// The elements of an array.
#[derive(Clone, Copy)]
pub struct Items<'d> {
    doc: &'d Doc<'d>,
    at: usize,
    end: usize,
    left: u32,
}

impl<'d> Iterator for Items<'d> {
    type Item = Json<'d>;

    #[inline]
    fn next(&mut self) -> Option<Json<'d>> {
        if self.at >= self.end {
            return None;
        }
        let v = Json { doc: self.doc, at: self.at };
        self.at = self.doc.end_of(self.at);
        self.left -= 1;
        Some(v)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

impl ExactSizeIterator for Items<'_> {}

/// The entries of an object, in document order, each key once (its last occurrence).
#[derive(Clone, Copy)]
pub struct Entries<'d> {
    doc: &'d Doc<'d>,
    at: usize,
    end: usize,
}

impl<'d> Entries<'d> {
    /// The value of `key` (as `Map::get`).
    #[inline]
    pub fn get(self, key: &str) -> Option<Json<'d>> {
        let mut at = self.at;
        while at < self.end {
            let value = at + 1;
            if let Node::Key { text, live: true } = self.doc.nodes[at] {
                if self.doc.text(text) == key {
                    return Some(Json { doc: self.doc, at: value });
                }
            }
            at = self.doc.end_of(value);
        }
        None
    }
}

impl<'d> Iterator for Entries<'d> {
    type Item = (&'d str, Json<'d>);

    #[inline]
    fn next(&mut self) -> Option<(&'d str, Json<'d>)> {
        while self.at < self.end {
            let (key, value) = (self.at, self.at + 1);
            self.at = self.doc.end_of(value);
            if let Node::Key { text, live: true } = self.doc.nodes[key] {
                return Some((self.doc.text(text), Json { doc: self.doc, at: value }));
            }
        }
        None
    }
}

// ------------------------------------------------------------------------------ writing

/// Where [`write_json`] writes: a `String`, or a token counter that never needs the text whole.
pub trait Sink {
    fn put(&mut self, s: &str);
}

impl Sink for String {
    fn put(&mut self, s: &str) {
        self.push_str(s);
    }
}

/// `fmt::Write` onto a [`Sink`].
struct Put<'s, S: ?Sized>(&'s mut S);

impl<S: Sink + ?Sized> std::fmt::Write for Put<'_, S> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put(s);
        Ok(())
    }
}

/// Writes `v` as compact JSON, exactly as `serde_json::to_writer` writes the equivalent
/// `serde_json::Value` (key order, string escapes, number spellings).
pub fn write_json(out: &mut impl Sink, v: Json<'_>) {
    match v.kind() {
        Kind::Null => out.put("null"),
        Kind::Bool(b) => out.put(if b { "true" } else { "false" }),
        Kind::Number(Num::PosInt(n)) => out.put(itoa::Buffer::new().format(n)),
        Kind::Number(Num::NegInt(n)) => out.put(itoa::Buffer::new().format(n)),
        Kind::Number(Num::Float(f)) => match serde_json::Number::from_f64(f) {
            // serde_json's own float formatting (shortest round-trip digits, its exponent rules).
            Some(n) => {
                let _ = std::fmt::Write::write_fmt(&mut Put(out), format_args!("{n}"));
            }
            None => out.put("null"),
        },
        Kind::String(s) => write_str(out, s),
        Kind::Array(items) => {
            out.put("[");
            for (i, item) in items.enumerate() {
                if i > 0 {
                    out.put(",");
                }
                write_json(out, item);
            }
            out.put("]");
        }
        Kind::Object(entries) => {
            // serde_json::Map is a BTreeMap: keys in byte order (they are unique).
            const SMALL: usize = 16;
            let mut small = [("", 0usize); SMALL];
            let mut large = Vec::new();
            let mut n = 0;
            for (k, val) in entries {
                if n < SMALL {
                    small[n] = (k, val.at);
                } else {
                    if n == SMALL {
                        large.extend_from_slice(&small);
                    }
                    large.push((k, val.at));
                }
                n += 1;
            }
            let sorted = if n <= SMALL { &mut small[..n] } else { &mut large[..] };
            if !sorted.is_sorted_by(|a, b| a.0 <= b.0) {
                sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
            }
            out.put("{");
            for (i, &(k, at)) in sorted.iter().enumerate() {
                if i > 0 {
                    out.put(",");
                }
                write_str(out, k);
                out.put(":");
                write_json(out, Json { doc: v.doc, at });
            }
            out.put("}");
        }
    }
}

/// A JSON string literal as serde_json escapes it: `"`, `\` and control characters only
/// (`\b \t \n \f \r`, else `\u00XX` in lower-case hex).
fn write_str(out: &mut impl Sink, s: &str) {
    out.put("\"");
    let bytes = s.as_bytes();
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            b'\t' => "\\t",
            b'\n' => "\\n",
            0x0c => "\\f",
            b'\r' => "\\r",
            0..=0x1f => "",
            _ => continue,
        };
        if from < i {
            out.put(&s[from..i]);
        }
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let u = [b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]];
            out.put(std::str::from_utf8(&u).unwrap_or_default());
        } else {
            out.put(esc);
        }
        from = i + 1;
    }
    if from < bytes.len() {
        out.put(&s[from..]);
    }
    out.put("\"");
}

// ------------------------------------------------------------------------------ building

/// Appends nodes in pre-order; both parsers below drive it.
struct Builder<'a> {
    nodes: Vec<Node<'a>>,
    arena: String,
}

/// One bit of a 64-bit filter per key: two keys with different bits differ, so an object whose
/// keys set distinct bits has no repeated key and needs no further check.
fn key_bit(k: &str) -> u64 {
    let b = k.as_bytes();
    let (first, last) = (b.first().copied().unwrap_or(0), b.last().copied().unwrap_or(0));
    let h = (b.len() as u64).wrapping_mul(0x9E37_79B9) ^ u64::from(first) << 7 ^ u64::from(last).wrapping_mul(0x2F);
    1 << (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58)
}

impl<'a> Builder<'a> {
    fn new(body_len: usize) -> Builder<'a> {
        // About one node per 10 bytes of a typical request body; the Vec grows if not enough.
        Builder { nodes: Vec::with_capacity(body_len / 10 + 4), arena: String::new() }
    }

    fn finish(self) -> Doc<'a> {
        Doc { nodes: self.nodes, arena: self.arena }
    }

    fn push(&mut self, n: Node<'a>) {
        self.nodes.push(n);
    }

    fn copied(&mut self, s: &str) -> Text<'a> {
        let start = self.arena.len() as u32;
        self.arena.push_str(s);
        Text::Arena { start, len: s.len() as u32 }
    }

    /// Reserves the node of a container opened now; `close_*` fills it in.
    fn open(&mut self) -> usize {
        self.nodes.push(Node::Null);
        self.nodes.len() - 1
    }

    fn close_array(&mut self, at: usize, len: u32) {
        self.nodes[at] = Node::Array { end: self.nodes.len() as u32, len };
    }

    fn close_object(&mut self, at: usize, maybe_repeated: bool) {
        self.nodes[at] = Node::Object { end: self.nodes.len() as u32 };
        if maybe_repeated {
            self.hide_repeated_keys(at);
        }
    }

    /// Marks every key of the object at `at` that occurs again later in it as not live.
    fn hide_repeated_keys(&mut self, at: usize) {
        let (nodes, arena) = (&mut self.nodes, &self.arena);
        let end = nodes.len();
        let key = |n: Node<'a>| match n {
            Node::Key { text, .. } => text_in(arena, text),
            _ => "",
        };
        let next_key = |k: usize| end_in(nodes, k + 1);
        let mut hidden = Vec::new();
        let mut count = 0;
        let mut k = at + 1;
        while k < end {
            count += 1;
            k = next_key(k);
        }
        if count <= 32 {
            let mut k = at + 1;
            while k < end {
                let (name, next) = (key(nodes[k]), next_key(k));
                let mut j = next;
                while j < end && key(nodes[j]) != name {
                    j = next_key(j);
                }
                if j < end {
                    hidden.push(k);
                }
                k = next;
            }
        } else {
            let mut sorted = Vec::with_capacity(count);
            let mut k = at + 1;
            while k < end {
                sorted.push((key(nodes[k]), k));
                k = next_key(k);
            }
            // Stable: equal keys stay in document order, so each run's last one survives.
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            hidden.extend(sorted.windows(2).filter(|w| w[0].0 == w[1].0).map(|w| w[0].1));
        }
        for k in hidden {
            if let Node::Key { live, .. } = &mut nodes[k] {
                *live = false;
            }
        }
    }
}

#[inline]
fn text_in<'x>(arena: &'x str, t: Text<'x>) -> &'x str {
    match t {
        Text::Body(s) => s,
        Text::Arena { start, len } => &arena[start as usize..(start + len) as usize],
    }
}

/// The index after the last node of the value at `at`.
#[inline]
fn end_in(nodes: &[Node<'_>], at: usize) -> usize {
    match nodes[at] {
        Node::Array { end, .. } | Node::Object { end } => end as usize,
        _ => at + 1,
    }
}

// --------------------------------------------------------------------- serde_json driven

/// Builds the tape from any serde `Deserializer` (serde_json's parser, or a `&Value`).
struct Seed<'b, 'a> {
    b: &'b mut Builder<'a>,
}

impl<'a> DeserializeSeed<'a> for Seed<'_, 'a> {
    type Value = ();

    fn deserialize<D: Deserializer<'a>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'a> Visitor<'a> for Seed<'_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.b.push(Node::Bool(v));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.b.push(Node::Num(if v < 0 { Num::NegInt(v) } else { Num::PosInt(v as u64) }));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.b.push(Node::Num(Num::PosInt(v)));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        // As Value: a non-finite float is not a JSON number and becomes null.
        self.b.push(if v.is_finite() { Node::Num(Num::Float(v)) } else { Node::Null });
        Ok(())
    }

    fn visit_borrowed_str<E>(self, v: &'a str) -> Result<(), E> {
        self.b.push(Node::Str(Text::Body(v)));
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        let t = self.b.copied(v);
        self.b.push(Node::Str(t));
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.b.push(Node::Null);
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        self.b.push(Node::Null);
        Ok(())
    }

    fn visit_some<D: Deserializer<'a>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'a>>(self, mut seq: A) -> Result<(), A::Error> {
        let at = self.b.open();
        let mut len = 0;
        while seq.next_element_seed(Seed { b: &mut *self.b })?.is_some() {
            len += 1;
        }
        self.b.close_array(at, len);
        Ok(())
    }

    fn visit_map<A: MapAccess<'a>>(self, mut map: A) -> Result<(), A::Error> {
        let at = self.b.open();
        let (mut seen, mut repeated) = (0u64, false);
        while let Some(bit) = map.next_key_seed(KeySeed { b: &mut *self.b })? {
            repeated |= seen & bit != 0;
            seen |= bit;
            map.next_value_seed(Seed { b: &mut *self.b })?;
        }
        self.b.close_object(at, repeated);
        Ok(())
    }
}

/// An object key: pushes a `Key` node, yields its filter bit.
struct KeySeed<'b, 'a> {
    b: &'b mut Builder<'a>,
}

impl<'a> DeserializeSeed<'a> for KeySeed<'_, 'a> {
    type Value = u64;

    fn deserialize<D: Deserializer<'a>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'a> Visitor<'a> for KeySeed<'_, 'a> {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'a str) -> Result<u64, E> {
        self.b.push(Node::Key { text: Text::Body(v), live: true });
        Ok(key_bit(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        let text = self.b.copied(v);
        self.b.push(Node::Key { text, live: true });
        Ok(key_bit(v))
    }
}

// ------------------------------------------------------------------------- fast scanner

/// Deeper documents are left to serde_json (which refuses nesting beyond 127).
const SCAN_MAX_DEPTH: u32 = 100;

/// The common case, read directly: `None` for anything it does not fully handle, and serde_json
/// reads the body instead. What it accepts, serde_json accepts with the same values.
struct Scanner<'a, 'b> {
    src: &'a str,
    bytes: &'a [u8],
    i: usize,
    b: &'b mut Builder<'a>,
}

/// Bytes that end the plain run of a string: `"`, `\` and control characters.
const fn string_stops() -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
}
static STRING_STOP: [bool; 256] = string_stops();

/// The index of the first `"`, `\` or control character at or after `i` (or the length).
#[inline]
fn plain_run(bytes: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Eight bytes at a time (reading on past the string is harmless: the first stop byte is
    // what is looked for). A byte's high bit is flagged when it is below 0x20 or equal to `"`
    // or `\`: the zero-byte trick never misses one and flags nothing below the first one, so
    // the lowest flagged byte is the answer.
    while let Some(chunk) = bytes.get(i..i + 8) {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        let quote = w ^ (ONES * u64::from(b'"'));
        let backslash = w ^ (ONES * u64::from(b'\\'));
        let flagged = ((w.wrapping_sub(ONES * 0x20) & !w)
            | (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash))
            & HIGH;
        if flagged != 0 {
            return i + (flagged.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while bytes.get(i).is_some_and(|&b| !STRING_STOP[usize::from(b)]) {
        i += 1;
    }
    i
}

impl<'a, 'b> Scanner<'a, 'b> {
    fn run(body: &'a [u8], b: &'b mut Builder<'a>) -> Option<()> {
        let src = std::str::from_utf8(body).ok()?;
        let mut s = Scanner { src, bytes: body, i: 0, b };
        s.value(0)?;
        s.ws();
        (s.i == s.bytes.len()).then_some(())
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.bytes.get(self.i) {
            self.i += 1;
        }
    }

    /// Skips whitespace, then consumes `want` when it is the next byte.
    #[inline]
    fn eat(&mut self, want: u8) -> bool {
        // Compact JSON first: no whitespace to skip.
        if self.bytes.get(self.i) == Some(&want) {
            self.i += 1;
            return true;
        }
        self.ws();
        if self.bytes.get(self.i) == Some(&want) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: u32) -> Option<()> {
        self.ws();
        match *self.bytes.get(self.i)? {
            b'"' => {
                self.i += 1;
                let t = self.string()?;
                self.b.push(Node::Str(t));
            }
            b'{' => self.object(depth + 1)?,
            b'[' => self.array(depth + 1)?,
            b't' => self.literal("true", Node::Bool(true))?,
            b'f' => self.literal("false", Node::Bool(false))?,
            b'n' => self.literal("null", Node::Null)?,
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return None,
        }
        Some(())
    }

    /// A value inside a container: strings (the usual case) without the call to `value`.
    #[inline]
    fn element(&mut self, depth: u32) -> Option<()> {
        if self.bytes.get(self.i) == Some(&b'"') {
            self.i += 1;
            let t = self.string()?;
            self.b.push(Node::Str(t));
            return Some(());
        }
        self.value(depth)
    }

    fn literal(&mut self, word: &str, node: Node<'a>) -> Option<()> {
        self.bytes[self.i..].starts_with(word.as_bytes()).then_some(())?;
        self.i += word.len();
        self.b.push(node);
        Some(())
    }

    fn array(&mut self, depth: u32) -> Option<()> {
        if depth > SCAN_MAX_DEPTH {
            return None;
        }
        self.i += 1;
        let at = self.b.open();
        let mut len = 0;
        if !self.eat(b']') {
            loop {
                self.element(depth)?;
                len += 1;
                if self.eat(b',') {
                    continue;
                }
                if self.eat(b']') {
                    break;
                }
                return None;
            }
        }
        self.b.close_array(at, len);
        Some(())
    }

    fn object(&mut self, depth: u32) -> Option<()> {
        if depth > SCAN_MAX_DEPTH {
            return None;
        }
        self.i += 1;
        let at = self.b.open();
        let (mut seen, mut repeated) = (0u64, false);
        if !self.eat(b'}') {
            loop {
                if !self.eat(b'"') {
                    return None;
                }
                let text = self.string()?;
                let bit = match text {
                    Text::Body(k) => key_bit(k),
                    Text::Arena { start, len } => key_bit(&self.b.arena[start as usize..(start + len) as usize]),
                };
                repeated |= seen & bit != 0;
                seen |= bit;
                self.b.push(Node::Key { text, live: true });
                if !self.eat(b':') {
                    return None;
                }
                self.element(depth)?;
                if self.eat(b',') {
                    continue;
                }
                if self.eat(b'}') {
                    break;
                }
                return None;
            }
        }
        self.b.close_object(at, repeated);
        Some(())
    }

    /// The rest of a string whose opening quote was consumed.
    #[inline(always)]
    fn string(&mut self) -> Option<Text<'a>> {
        let start = self.i;
        self.i = plain_run(self.bytes, start);
        if self.bytes.get(self.i) == Some(&b'"') {
            self.i += 1;
            return Some(Text::Body(self.src.get(start..self.i - 1)?));
        }
        self.escaped_string(start)
    }

    /// A string with escapes (or an error), from its start; `self.i` is at its first stop byte.
    #[inline(never)]
    fn escaped_string(&mut self, start: usize) -> Option<Text<'a>> {
        if self.b.arena.capacity() == 0 {
            // Room for the unescaped strings to come, up to a quarter of the rest of the body.
            self.b.arena.reserve((self.bytes.len() - start) / 4 + 16);
        }
        let arena_start = self.b.arena.len() as u32;
        let mut plain_from = start;
        loop {
            match *self.bytes.get(self.i)? {
                b'"' => {
                    self.b.arena.push_str(self.src.get(plain_from..self.i)?);
                    self.i += 1;
                    return Some(Text::Arena { start: arena_start, len: self.b.arena.len() as u32 - arena_start });
                }
                b'\\' => {
                    self.b.arena.push_str(self.src.get(plain_from..self.i)?);
                    self.i += 1;
                    let c = self.escape()?;
                    self.b.arena.push(c);
                    plain_from = self.i;
                    self.i = plain_run(self.bytes, self.i);
                }
                // A raw control character: serde_json's error.
                _ => return None,
            }
        }
    }

    /// The character of the escape after a backslash.
    fn escape(&mut self) -> Option<char> {
        let c = *self.bytes.get(self.i)?;
        self.i += 1;
        Some(match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let unit = self.hex4()?;
                match unit {
                    0xD800..=0xDBFF => {
                        // Only a well-formed surrogate pair; anything else is serde_json's call.
                        if self.bytes.get(self.i..self.i + 2) != Some(b"\\u") {
                            return None;
                        }
                        self.i += 2;
                        let low = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return None;
                        }
                        char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))?
                    }
                    _ => char::from_u32(unit)?,
                }
            }
            _ => return None,
        })
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.bytes.get(self.i..self.i + 4)?;
        let mut n = 0;
        for &d in digits {
            n = n * 16 + char::from(d).to_digit(16)?;
        }
        self.i += 4;
        Some(n)
    }

    /// Integers of up to 18 digits are read here; any other number (fraction, exponent, `-0`,
    /// long integers) is read by serde_json, from the longest run of number characters.
    fn number(&mut self) -> Option<()> {
        let start = self.i;
        let neg = self.bytes[start] == b'-';
        let digits_from = start + usize::from(neg);
        let mut i = digits_from;
        let mut n: u64 = 0;
        while let Some(&d @ b'0'..=b'9') = self.bytes.get(i) {
            n = n.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
            i += 1;
        }
        let count = i - digits_from;
        let simple = (1..=18).contains(&count)
            && (self.bytes[digits_from] != b'0' || count == 1)
            && !(neg && n == 0)
            && !matches!(self.bytes.get(i), Some(b'.' | b'e' | b'E' | b'+' | b'-'));
        let num = if simple {
            if neg {
                Num::NegInt(-(n as i64))
            } else {
                Num::PosInt(n)
            }
        } else {
            while let Some(b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') = self.bytes.get(i) {
                i += 1;
            }
            let parsed: serde_json::Number = serde_json::from_slice(&self.bytes[start..i]).ok()?;
            Num::of(&parsed)
        };
        self.i = i;
        self.b.push(Node::Num(num));
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::testgen::{self, Rng};
    use serde_json::Value;

    /// Parses with serde_json only (the authoritative path).
    fn serde_path(body: &[u8]) -> Result<Doc<'_>, serde_json::Error> {
        let mut b = Builder::new(body.len());
        let mut de = serde_json::Deserializer::from_slice(body);
        Seed { b: &mut b }.deserialize(&mut de)?;
        de.end()?;
        Ok(b.finish())
    }

    /// Parses with the scanner only.
    fn scan_path(body: &[u8]) -> Option<Doc<'_>> {
        let mut b = Builder::new(body.len());
        Scanner::run(body, &mut b).map(|()| b.finish())
    }

    fn written(d: &Doc<'_>) -> String {
        let mut s = String::new();
        write_json(&mut s, d.root());
        s
    }

    /// Everything this module promises about one body, against `serde_json::Value`.
    fn check(body: &[u8]) -> bool {
        let want = serde_json::from_slice::<Value>(body);
        let got = Doc::parse(body);
        let scanned = scan_path(body);
        match (&want, &got) {
            (Ok(v), Ok(d)) => {
                assert_eq!(written(d), serde_json::to_string(v).unwrap(), "{}", String::from_utf8_lossy(body));
                assert_eq!(written(&Doc::from_value(v)), serde_json::to_string(v).unwrap());
                // The scanner, when it answers, builds exactly what serde_json's path builds.
                if let Some(s) = &scanned {
                    assert_eq!(format!("{s:?}"), format!("{:?}", serde_path(body).unwrap()));
                }
                same(d.root(), v);
            }
            (Err(e), Err(g)) => {
                assert_eq!(e.to_string(), g.to_string());
                assert!(scanned.is_none(), "scanner accepted {:?}", String::from_utf8_lossy(body));
            }
            _ => panic!("{:?}: serde_json {want:?}, Doc {got:?}", String::from_utf8_lossy(body)),
        }
        want.is_ok() && scanned.is_some()
    }

    /// The handle's accessors agree with Value's, all the way down.
    fn same(j: Json<'_>, v: &Value) {
        assert_eq!(j.as_str(), v.as_str());
        assert_eq!(j.as_bool(), v.as_bool());
        assert_eq!(j.as_u64(), v.as_u64());
        assert_eq!(j.is_null(), v.is_null());
        match (j.kind(), v) {
            (Kind::Number(n), Value::Number(m)) => {
                assert_eq!(n.as_f64().map(f64::to_bits), m.as_f64().map(f64::to_bits));
                assert_eq!(n.as_u64(), m.as_u64());
            }
            (Kind::Array(items), Value::Array(a)) => {
                assert_eq!(items.len(), a.len());
                items.zip(a).for_each(|(j, v)| same(j, v));
            }
            (Kind::Object(entries), Value::Object(m)) => {
                assert_eq!(entries.count(), m.len());
                for (k, val) in entries {
                    same(val, &m[k]);
                    assert_eq!(entries.get(k).map(|g| g.at), Some(val.at));
                }
                assert!(m.keys().all(|k| j.get(k).is_some()));
                assert!(j.get("no such key \u{1}").is_none());
            }
            (Kind::Null, Value::Null) | (Kind::Bool(_), Value::Bool(_)) | (Kind::String(_), Value::String(_)) => {}
            _ => panic!("kind differs: {j:?} vs {v}"),
        }
    }

    #[test]
    fn hand_picked_documents() {
        let fast = [
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#,
            r#" { "a" : [ 1 , -2 , 0 , true , false , null , "x" , { } , [ ] ] } "#,
            r#"{"a":1,"b":2,"a":3}"#,
            r#"{"a":1,"a":{"a":2,"a":[]}}"#,
            r#"{"esc":"\"\\\/\b\f\n\r\t\u0041\u00e9\u4e16\ud83c\udf89","k\u0065y":1,"key":2}"#,
            r#"{"f":16.0,"g":1e2,"h":-0,"i":-0.0,"j":18446744073709551615,"k":18446744073709551616}"#,
            r#"{"l":-9223372036854775808,"m":-9223372036854775809,"n":123456789012345678}"#,
            r#"{"o":1.7976931348623157e308,"p":5e-324,"q":0.1,"r":2.5E+3,"s":-1.5e-7}"#,
            "[\"\u{0}\"]",
            "\"plain\"",
            "12",
            "{\"\u{7f}é世🎉\":\"\u{7f}\"}",
        ];
        for body in fast {
            check(body.as_bytes());
        }
        let invalid: &[&[u8]] = &[
            b"",
            b" ",
            b"{",
            b"{not json",
            b"{\"a\":1,}",
            b"[1,]",
            b"[1 2]",
            b"{\"a\" 1}",
            b"{\"a\":01}",
            b"{\"a\":1.}",
            b"{\"a\":.5}",
            b"{\"a\":1e}",
            b"{\"a\":1e400}",
            b"{\"a\":-}",
            b"{\"a\":+1}",
            b"{\"a\":tru}",
            b"{\"a\":nul}",
            b"{\"a\":\"\x01\"}",
            b"{\"a\":\"\n\"}",
            b"{\"a\":\"\\x\"}",
            b"{\"a\":\"\\u12\"}",
            b"{\"a\":\"\\ud83c\"}",
            b"{\"a\":\"\\ud83cx\"}",
            b"{\"a\":\"\\ud83c\\u0041\"}",
            b"{\"a\":\"\\udf89\"}",
            b"{\"a\":\"\xff\"}",
            b"{\"a\":\"\xc3\"}",
            b"\xef\xbb\xbf{}",
            b"{} x",
            b"{}{}",
            b"{1:2}",
            b"{\"a\":1}\x00",
            b"nan",
            b"\"unterminated",
        ];
        for body in invalid {
            assert!(Doc::parse(body).is_err(), "{:?}", String::from_utf8_lossy(body));
            check(body);
        }
    }

    #[test]
    fn nesting_limits_are_serde_jsons() {
        for depth in [1, 99, 100, 101, 126, 127, 128, 129, 300] {
            for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
                let body = format!("{}1{}", open.repeat(depth), close.repeat(depth));
                let ok = serde_json::from_str::<Value>(&body).is_ok();
                assert_eq!(Doc::parse(body.as_bytes()).is_ok(), ok, "depth {depth}");
                check(body.as_bytes());
            }
        }
    }

    #[test]
    fn random_documents_and_their_corruptions() {
        let mut rng = Rng::new(1);
        let (mut scanned, mut total) = (0, 0);
        for i in 0..4000 {
            let body = testgen::json_text(&mut rng, 1 + i % 6);
            scanned += usize::from(check(body.as_bytes()));
            total += 1;
            // One byte deleted, replaced or inserted: mostly invalid, sometimes still valid.
            let mut bad = body.clone().into_bytes();
            let at = rng.below(bad.len() as u64 + 1) as usize;
            let byte = *rng.pick(b"\"\\{}[],:0-.eE \x00\xff\xc3ua");
            match rng.below(3) {
                0 if at < bad.len() => {
                    bad.remove(at);
                }
                1 if at < bad.len() => bad[at] = byte,
                _ => bad.insert(at, byte),
            }
            check(&bad);
        }
        // The scanner must be the common path, not a rarely taken one.
        assert!(scanned * 10 > total * 7, "scanner read {scanned} of {total}");
    }

    #[test]
    fn plain_run_finds_the_first_stop_byte() {
        let naive = |b: &[u8], i: usize| (i..b.len()).find(|&j| STRING_STOP[usize::from(b[j])]).unwrap_or(b.len());
        let fillers = [b'a', b' ', b'!', b'#', b'[', b']', 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xa2, 0xdc, 0xff];
        let stops = [b'"', b'\\', 0x00, 0x01, 0x1f, b'\n'];
        let mut rng = Rng::new(3);
        for len in 0..40 {
            for _ in 0..50 {
                let mut b: Vec<u8> = (0..len).map(|_| *rng.pick(&fillers)).collect();
                for _ in 0..rng.below(3) {
                    if len > 0 {
                        let at = rng.below(len as u64) as usize;
                        b[at] = *rng.pick(&stops);
                    }
                }
                for from in 0..=len {
                    assert_eq!(plain_run(&b, from), naive(&b, from), "{b:?} from {from}");
                }
            }
        }
    }

    #[test]
    fn big_objects_with_repeated_keys() {
        let mut body = String::from("{");
        for i in 0..200 {
            body.push_str(&format!("\"k{}\":{i},", i % 70));
        }
        body.push_str("\"last\":true}");
        check(body.as_bytes());
        let d = Doc::parse(body.as_bytes()).unwrap();
        assert_eq!(d.root().as_object().unwrap().count(), 71);
        assert_eq!(d.root().get("k5").unwrap().as_u64(), Some(145));
    }
}
