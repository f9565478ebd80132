//! Hand-written JSON output for the lines written on every request (ledger events, budget
//! journal records): byte for byte what `serde_json` writes for the same values (tested where
//! used), without serde's per-field machinery.
//!
//! Also the canonical form the gate API hashes ([`canonical`]).
//!
//! Owns: `json_str`, `str_field`, `uint_field`, `opt_str`, `opt_money`, `money`, `uint`,
//! `canonical`. Imports: decide (money), itoa, serde_json (`Value`).

use crate::decide::Micros;

/// `key` (e.g. `,"tenant":`) then the string.
pub fn str_field(out: &mut Vec<u8>, key: &[u8], v: &str) {
    out.extend_from_slice(key);
    json_str(out, v);
}

/// `key` then the integer.
pub fn uint_field(out: &mut Vec<u8>, key: &[u8], v: impl itoa::Integer) {
    out.extend_from_slice(key);
    uint(out, v);
}

/// `key` then the string or `null`.
pub fn opt_str(out: &mut Vec<u8>, key: &[u8], v: Option<&str>) {
    out.extend_from_slice(key);
    match v {
        None => out.extend_from_slice(b"null"),
        Some(s) => json_str(out, s),
    }
}

/// `key` then the amount as a six-decimal string (`"1.000000"`) or `null`.
pub fn opt_money(out: &mut Vec<u8>, key: &[u8], v: Option<Micros>) {
    out.extend_from_slice(key);
    match v {
        None => out.extend_from_slice(b"null"),
        Some(m) => money(out, m),
    }
}

/// `00` to `99`, two ASCII digits each.
const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// An amount as `Micros`' serde form: a string with six decimals.
pub fn money(out: &mut Vec<u8>, m: Micros) {
    let abs = m.0.unsigned_abs();
    let mut whole = itoa::Buffer::new();
    let whole = whole.format(abs / 1_000_000).as_bytes();
    // `"`, sign, whole part, `.`, six digits, `"` in one copy.
    let mut buf = [0u8; 32];
    let mut n = 0;
    buf[n] = b'"';
    n += 1;
    if m.0 < 0 {
        buf[n] = b'-';
        n += 1;
    }
    buf[n..n + whole.len()].copy_from_slice(whole);
    n += whole.len();
    buf[n] = b'.';
    // The six decimals as three pairs of digits (three divisions instead of six).
    let frac = (abs % 1_000_000) as usize;
    for (i, pair) in [frac / 10_000, frac / 100 % 100, frac % 100].into_iter().enumerate() {
        buf[n + 1 + 2 * i..n + 3 + 2 * i].copy_from_slice(&PAIRS[2 * pair..2 * pair + 2]);
    }
    buf[n + 7] = b'"';
    out.extend_from_slice(&buf[..n + 8]);
}

/// An integer as JSON.
pub fn uint(out: &mut Vec<u8>, v: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Whether any byte of `b` is `"`, `\\` or a control character. Eight bytes at a time (SWAR):
/// ids, names and timestamps are short and clean, and a byte loop cost ~50 instructions each.
fn needs_escape(b: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Exact per-word tests (no false positives): some byte < 0x20, some byte == '"', == '\\'.
    let hit = |w: u64| {
        let control = w.wrapping_sub(ONES * 0x20) & !w;
        let quote = (w ^ (ONES * u64::from(b'"'))).wrapping_sub(ONES) & !(w ^ (ONES * u64::from(b'"')));
        let backslash = (w ^ (ONES * u64::from(b'\\'))).wrapping_sub(ONES) & !(w ^ (ONES * u64::from(b'\\')));
        (control | quote | backslash) & HIGH != 0
    };
    let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("eight bytes"));
    if b.len() < 8 {
        return b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
    }
    let mut chunks = b.chunks_exact(8);
    let mut any = chunks.by_ref().fold(false, |any, c| any | hit(word(c)));
    if !chunks.remainder().is_empty() {
        // The last eight bytes, overlapping the words already tested.
        any |= hit(word(&b[b.len() - 8..]));
    }
    any
}

/// A JSON string with serde_json's escaping: `"`, `\\` and control characters; everything else
/// (non-ASCII included) verbatim.
pub fn json_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    // Fast path (ids, names, timestamps): nothing to escape, one copy.
    if !needs_escape(b) {
        out.reserve(b.len() + 2);
        out.push(b'"');
        out.extend_from_slice(b);
        out.push(b'"');
        return;
    }
    out.push(b'"');
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc = short_escape(c);
        if esc.is_none() && c >= 0x20 {
            continue;
        }
        out.extend_from_slice(&b[start..i]);
        match esc {
            Some(esc) => out.extend_from_slice(esc),
            None => unicode_escape(out, u16::from(c)),
        }
        start = i + 1;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

/// `v` as Python's `json.dumps(v, sort_keys=True, separators=(",", ":"))` writes it: compact,
/// keys sorted, every character outside printable ASCII escaped as `\uXXXX` (UTF-16, lowercase
/// hex), floats as Python's `repr` (`1e+16`, `1e-05`, `100.0`). The gate API hashes this form
/// (CONTRACT §10: "compact JSON with sorted keys"), so a client can compute the same
/// fingerprint with the standard library of the reference control plane's language.
/// Integers beyond 64 bits were already read as floats by serde_json and are written as such.
pub fn canonical(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                uint(out, u);
            } else if let Some(i) = n.as_i64() {
                uint(out, i);
            } else {
                python_float(out, n.as_f64().unwrap_or(0.0));
            }
        }
        Value::String(s) => ascii_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // serde_json's map (without `preserve_order`) iterates by key, in code point order,
            // which is Python's order for `str` keys.
            out.push(b'{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                ascii_str(out, k);
                out.push(b':');
                canonical(item, out);
            }
            out.push(b'}');
        }
    }
}

/// The two-character escape JSON has for `c` (`\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`).
fn short_escape(c: u8) -> Option<&'static [u8]> {
    Some(match c {
        b'"' => b"\\\"",
        b'\\' => b"\\\\",
        b'\n' => b"\\n",
        b'\r' => b"\\r",
        b'\t' => b"\\t",
        0x08 => b"\\b",
        0x0c => b"\\f",
        _ => return None,
    })
}

/// `\uXXXX` (lowercase hex) for one UTF-16 code unit.
fn unicode_escape(out: &mut Vec<u8>, u: u16) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(b"\\u");
    for shift in [12, 8, 4, 0] {
        out.push(HEX[usize::from((u >> shift) & 15)]);
    }
}

/// A JSON string as Python's `ensure_ascii` writes it: [`json_str`]'s escapes, and every
/// character outside printable ASCII as `\uXXXX` code units.
fn ascii_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match u8::try_from(c) {
            Ok(b) if b.is_ascii() => match short_escape(b) {
                Some(esc) => out.extend_from_slice(esc),
                None if (b' '..=b'~').contains(&b) => out.push(b),
                None => unicode_escape(out, u16::from(b)),
            },
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    unicode_escape(out, *u);
                }
            }
        }
    }
    out.push(b'"');
}

/// A finite float as Python's `repr`: the shortest digits that read back to it, positional
/// when the decimal point falls within -4 < exponent < 16 (with `.0` for whole numbers),
/// scientific otherwise (`1.5e-07`, `1e+16`).
fn python_float(out: &mut Vec<u8>, f: f64) {
    use std::io::Write;
    if f == 0.0 {
        out.extend_from_slice(if f.is_sign_negative() { b"-0.0" } else { b"0.0" });
        return;
    }
    // Rust's `{:e}` writes the same shortest round-trip digits: `d[.ddd]e<exp>`.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').expect("{:e} writes an exponent");
    let exp: i32 = exp.parse().expect("{:e} writes an integer exponent");
    let digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    if f < 0.0 {
        out.push(b'-');
    }
    // The value is 0.d1d2… × 10^decpt.
    let decpt = exp + 1;
    let n = digits.len() as i32;
    if decpt <= -4 || decpt > 16 {
        out.push(digits[0]);
        if n > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else if decpt <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', (-decpt) as usize));
        out.extend_from_slice(&digits);
    } else if decpt >= n {
        out.extend_from_slice(&digits);
        out.extend(std::iter::repeat_n(b'0', (decpt - n) as usize));
        out.extend_from_slice(b".0");
    } else {
        out.extend_from_slice(&digits[..decpt as usize]);
        out.push(b'.');
        out.extend_from_slice(&digits[decpt as usize..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_test_matches_a_byte_loop() {
        let slow = |b: &[u8]| b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
        // Every byte value at every position of strings of 1..=19 bytes, on clean backgrounds
        // (ASCII and UTF-8 high bytes, which must not read as control characters).
        for len in 1..=19 {
            for background in [b'a', 0x7f, 0x80, 0xe6, 0xff, b' '] {
                for pos in 0..len {
                    for c in 0..=255u8 {
                        let mut b = vec![background; len];
                        b[pos] = c;
                        assert_eq!(needs_escape(&b), slow(&b), "len {len} bg {background:#x} byte {c:#x} at {pos}");
                    }
                }
            }
        }
        assert!(!needs_escape(b""));
    }

    #[test]
    fn money_and_strings_are_serde_exact() {
        let every_fraction = (0..1_000_000).step_by(7).chain([999_999, 10, 100, 1_000, 10_000, 100_000]);
        let cases = [0, 1, -1, 999_999, 1_000_000, -1_000_001, 123_456_789, i64::MAX, i64::MIN, -7, 50_000_000];
        for v in cases.into_iter().chain(every_fraction.clone()).chain(every_fraction.map(|f| -3_000_000 - f)) {
            let mut out = Vec::new();
            money(&mut out, Micros(v));
            assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&Micros(v)).unwrap(), "{v}");
        }
        for s in [
            "",
            "plain",
            "q\"b\\s",
            "\u{1}\u{1f}\n\t",
            "01a212ea-2553-722d-ae80-a3c5862df6d2",
            "é 日本 🦀",
            &"x".repeat(100),
        ] {
            let mut out = Vec::new();
            json_str(&mut out, s);
            assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(s).unwrap());
        }
    }

    /// Expected outputs are Python 3.11's `json.dumps(json.loads(input), sort_keys=True,
    /// separators=(",", ":"))`.
    #[test]
    fn canonical_is_what_python_json_dumps_writes() {
        let input = r#"{"b": 1, "a": [1.0, -0.0, 0.5, 1e+16, 1000000000000000.0, 123456789.125, 1.5e-07,
            0.0001, 1e-05, -2.5e+300, 1e+22, 3.14, 100.0, 1.2345678901234568e+16, 5e-324,
            1.7976931348623157e+308, 0.1, 2.5e-05, 1E2],
            "é": "naïve ☃ 😀 \u007f \u0001 \n\t\"\\ /", "z": null, "t": true, "f": false,
            "n": -42, "u": 18446744073709551615, "e": {}, "l": [], "Z": {"y": [{"b": 2, "a": 1}]}}"#;
        let want = r#"{"Z":{"y":[{"a":1,"b":2}]},"a":[1.0,-0.0,0.5,1e+16,1000000000000000.0,123456789.125,1.5e-07,0.0001,1e-05,-2.5e+300,1e+22,3.14,100.0,1.2345678901234568e+16,5e-324,1.7976931348623157e+308,0.1,2.5e-05,100.0],"b":1,"e":{},"f":false,"l":[],"n":-42,"t":true,"u":18446744073709551615,"z":null,"\u00e9":"na\u00efve \u2603 \ud83d\ude00 \u007f \u0001 \n\t\"\\ /"}"#;
        let mut out = Vec::new();
        canonical(&serde_json::from_str(input).unwrap(), &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), want);
        // Plain ASCII without floats: the same bytes as serde_json's compact form.
        let v = serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16});
        let mut out = Vec::new();
        canonical(&v, &mut out);
        assert_eq!(out, serde_json::to_vec(&v).unwrap());
    }
}
