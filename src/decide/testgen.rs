//! Deterministic test inputs (test builds only): a xorshift generator, random texts that visit
//! every branch of the token counter, and random JSON documents (as text, so that they may hold
//! what `serde_json::Value` cannot: duplicate keys, escapes, number spellings).
//!
//! Owns: `Rng`, `text`, `json_text`. Imports: std only.

/// xorshift64*: small, fast, good enough to shuffle test inputs; never zero.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Code point ranges of every class the token counter tells apart (see `estimate::TokenCounter`).
const WIDE: &[(u32, u32)] = &[
    (0x80, 0xBF),
    (0xD7, 0xD7),
    (0xF7, 0xF7),
    (0xC0, 0x24F),
    (0x250, 0x7FF),
    (0x200D, 0x200D),
    (0xFE00, 0xFE0F),
    (0x2000, 0x2BFF),
    (0x3000, 0x303F),
    (0xFF00, 0xFFEF),
    (0x3040, 0x30FF),
    (0x1100, 0x11FF),
    (0x3130, 0x318F),
    (0xAC00, 0xD7AF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF),
    (0x800, 0xFFFF),
    (0x1F3FB, 0x1F3FF),
    (0x1F300, 0x1FAFF),
    (0x10000, 0x10FFFF),
];

const PUNCT: &[u8] = b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// One random character, mostly ASCII prose.
pub fn char(rng: &mut Rng) -> char {
    let roll = rng.below(100);
    let b = match roll {
        0..=39 => b'a' + rng.below(26) as u8,
        40..=49 => b'A' + rng.below(26) as u8,
        50..=57 => b'0' + rng.below(10) as u8,
        58..=67 => b' ',
        68..=69 => *rng.pick(b"\n\r"),
        70 => b'\t',
        71..=80 => *rng.pick(PUNCT),
        81..=82 => *rng.pick(&[0u8, 1, 8, 0x0b, 0x0c, 0x1b, 0x1f, 0x7f]),
        _ => {
            let (lo, hi) = *rng.pick(WIDE);
            let cp = lo + rng.below(u64::from(hi - lo) + 1) as u32;
            return char::from_u32(cp).unwrap_or('\u{FFFD}');
        }
    };
    char::from(b)
}

/// A random text of up to `max` characters; runs of one class are common (words, indentation,
/// digit groups, `=====`), as in real prompts.
pub fn text(rng: &mut Rng, max: u64) -> String {
    let len = rng.below(max + 1);
    let mut s = String::new();
    while (s.chars().count() as u64) < len {
        let c = char(rng);
        let repeat = if rng.chance(20) { 1 + rng.below(12) } else { 1 };
        for _ in 0..repeat {
            s.push(c);
        }
    }
    s
}

/// Keys of request bodies, so that random documents hit the estimator's fields.
const KEYS: &[&str] = &[
    "model",
    "messages",
    "role",
    "content",
    "name",
    "type",
    "text",
    "input",
    "prompt",
    "suffix",
    "instructions",
    "system",
    "tools",
    "functions",
    "response_format",
    "tool_calls",
    "function_call",
    "audio",
    "image_url",
    "detail",
    "url",
    "source",
    "data",
    "id",
    "call_id",
    "status",
    "arguments",
    "output",
    "refusal",
    "thinking",
    "format",
    "stream",
    "stream_options",
    "include_usage",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "cache_control",
];

const TYPES: &[&str] = &[
    "text",
    "input_text",
    "output_text",
    "refusal",
    "tool_use",
    "server_tool_use",
    "tool_result",
    "web_search_tool_result",
    "thinking",
    "redacted_thinking",
    "document",
    "content",
    "base64",
    "file",
    "input_file",
    "input_audio",
    "audio",
    "image",
    "image_url",
    "input_image",
    "function_call",
    "function_call_output",
    "json_schema",
    "low",
    "high",
];

/// A random JSON string literal (with its quotes): plain, or with every kind of escape.
pub fn json_string(rng: &mut Rng, max: u64) -> String {
    if rng.chance(30) {
        let words = if rng.chance(50) { TYPES } else { KEYS };
        return format!("\"{}\"", rng.pick(words));
    }
    let mut out = String::from("\"");
    for c in text(rng, max).chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' if rng.chance(80) => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if rng.chance(5) => {
                // \u escapes, upper or lower case hex, surrogate pairs beyond the BMP.
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    if rng.chance(50) {
                        out.push_str(&format!("\\u{:04X}", u));
                    } else {
                        out.push_str(&format!("\\u{:04x}", u));
                    }
                }
            }
            c if rng.chance(2) => {
                out.push('\\');
                out.push(*rng.pick(&['/', 'b', 'f', 'r', 't']));
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A random JSON number literal, in the spellings serde_json reads differently.
pub fn json_number(rng: &mut Rng) -> String {
    match rng.below(12) {
        0 => rng.below(20).to_string(),
        1 => rng.below(100_000).to_string(),
        2 => format!("-{}", rng.below(1000)),
        3 => format!("{}.0", rng.below(5000)),
        4 => format!("{}.{}", rng.below(100), rng.below(1000)),
        5 => format!("{}e{}", rng.below(10), rng.below(25)),
        6 => format!("-{}.{}E-{}", rng.below(10), rng.below(100), rng.below(30)),
        7 => rng
            .pick(&["18446744073709551615", "18446744073709551616", "9223372036854775807", "-9223372036854775808"])
            .to_string(),
        8 => rng
            .pick(&["-9223372036854775809", "123456789012345678", "1234567890123456789", "-0", "0.0", "-0.0"])
            .to_string(),
        9 => rng.pick(&["1e308", "2.5e-320", "1.8e19", "17999999999999999999", "99999999999999999999999"]).to_string(),
        10 => format!("{}", rng.next()),
        _ => format!("-{}", rng.next() >> rng.below(64)),
    }
}

/// A random JSON document of nesting at most `depth`, as text; whitespace varies, keys repeat
/// now and then.
pub fn json_text(rng: &mut Rng, depth: u32) -> String {
    let mut out = String::new();
    value(rng, depth, &mut out);
    out
}

fn ws(rng: &mut Rng, out: &mut String) {
    if rng.chance(15) {
        for _ in 0..=rng.below(3) {
            out.push(*rng.pick(&[' ', '\n', '\t', '\r']));
        }
    }
}

fn value(rng: &mut Rng, depth: u32, out: &mut String) {
    ws(rng, out);
    let container = depth > 0 && rng.chance(45);
    if container && rng.chance(55) {
        out.push('{');
        let n = rng.below(7);
        let mut keys: Vec<String> = Vec::new();
        for i in 0..n {
            if i > 0 {
                out.push(',');
            }
            ws(rng, out);
            let key = if !keys.is_empty() && rng.chance(10) {
                rng.pick(&keys).clone()
            } else if rng.chance(75) {
                format!("\"{}\"", rng.pick(KEYS))
            } else {
                json_string(rng, 8)
            };
            out.push_str(&key);
            keys.push(key);
            ws(rng, out);
            out.push(':');
            if keys.last().is_some_and(|k| k == "\"type\"") && rng.chance(80) {
                out.push_str(&format!("\"{}\"", rng.pick(TYPES)));
            } else {
                value(rng, depth - 1, out);
            }
        }
        ws(rng, out);
        out.push('}');
    } else if container {
        out.push('[');
        let n = rng.below(6);
        for i in 0..n {
            if i > 0 {
                out.push(',');
            }
            value(rng, depth - 1, out);
        }
        ws(rng, out);
        out.push(']');
    } else {
        match rng.below(10) {
            0..=4 => out.push_str(&json_string(rng, 40)),
            5..=7 => out.push_str(&json_number(rng)),
            8 => out.push_str(if rng.chance(50) { "true" } else { "false" }),
            _ => out.push_str("null"),
        }
    }
    ws(rng, out);
}
