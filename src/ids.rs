//! Identifiers: UUID v7 (time-ordered) for request, reservation, approval and event ids, with
//! the random part from a per-thread generator seeded once from the OS — not one `getrandom(2)`
//! per id (four per request on the hot path otherwise).
//!
//! Owns: `v7`, `hyphenated` (the one place a UUID's bytes become text). Imports: uuid (the
//! seed), std.

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    // One OS random draw per thread; never zero (xorshift's fixed point).
    (uuid::Uuid::new_v4().as_u128() as u64) | 1
}

/// xorshift64* step: fast, full-period; the ids need uniqueness, not secrecy (the approval
/// tokens' security rests on their HMAC, not on the unpredictability of ids).
fn next() -> u64 {
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// A UUID v7 for now (millisecond timestamp, 74 random bits), as its hyphenated string.
pub fn v7() -> String {
    v7_at_ms(now_ms())
}

/// [`v7`] as a shared string (one allocation, where `v7().into()` makes two).
pub fn v7_shared() -> std::sync::Arc<str> {
    std::sync::Arc::from(hyphenated(&v7_bytes(now_ms(), next(), next())).as_str())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A UUID v7 for the Unix time `ms` the caller already read (no clock read of its own).
pub fn v7_at_ms(ms: u64) -> String {
    v7_at(ms, next(), next())
}

/// The v7 UUID of `ms` with random bits from `r1` (62 bits) and `r2` (12 bits) (RFC 9562 §5.7:
/// 48-bit time, version 7, 12 random bits, variant 10, 62 random bits), hyphenated.
fn v7_at(ms: u64, r1: u64, r2: u64) -> String {
    hyphenated(&v7_bytes(ms, r1, r2)).into_string()
}

fn v7_bytes(ms: u64, r1: u64, r2: u64) -> [u8; 16] {
    let hi = (ms << 16) | 0x7000 | (r2 & 0x0fff);
    let lo = (r1 & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&hi.to_be_bytes());
    b[8..].copy_from_slice(&lo.to_be_bytes());
    b
}

/// The 16 lowercase hex digits of `x`, most significant first, eight bytes at a time: each
/// nibble is spread into a byte of a `u128`, then shifted to its ASCII digit.
fn hex_u64(x: u64) -> [u8; 16] {
    const fn lanes(pattern: u128, width: u32) -> u128 {
        let mut m = 0;
        let mut at = 0;
        while at < 128 {
            m |= pattern << at;
            at += width;
        }
        m
    }
    let mut v = u128::from(x);
    v = ((v & lanes(0xffff_ffff_0000_0000, 128)) << 32) | (v & lanes(0xffff_ffff, 128));
    v = ((v & lanes(0xffff_0000, 64)) << 16) | (v & lanes(0xffff, 64));
    v = ((v & lanes(0xff00, 32)) << 8) | (v & lanes(0xff, 32));
    v = ((v & lanes(0xf0, 16)) << 4) | (v & lanes(0x0f, 16));
    // A nibble n sits alone in its byte: n + 6 has bit 4 set exactly when n is a-f.
    let letters = ((v + lanes(0x06, 8)) >> 4) & lanes(0x01, 8);
    (v + lanes(b'0' as u128, 8) + letters * u128::from(b'a' - b'0' - 10)).to_be_bytes()
}

/// A UUID's 16 bytes as hyphenated lowercase hex (`8-4-4-4-12`), in a fixed buffer: no
/// formatter (the uuid crate's `to_string` goes through `Formatter::pad`), no per-digit table.
pub(crate) fn hyphenated(b: &[u8; 16]) -> Hyphenated {
    let (hi, lo) = b.split_at(8);
    let hi = hex_u64(u64::from_be_bytes(hi.try_into().expect("eight bytes")));
    let lo = hex_u64(u64::from_be_bytes(lo.try_into().expect("eight bytes")));
    let mut buf = [b'-'; 36];
    buf[..8].copy_from_slice(&hi[..8]);
    buf[9..13].copy_from_slice(&hi[8..12]);
    buf[14..18].copy_from_slice(&hi[12..]);
    buf[19..23].copy_from_slice(&lo[..4]);
    buf[24..].copy_from_slice(&lo[4..]);
    Hyphenated(buf)
}

/// Where each byte's two hex digits sit in a hyphenated UUID.
#[cfg(test)]
pub(crate) const HEX_AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];

/// The 36 ASCII bytes of a hyphenated UUID.
pub(crate) struct Hyphenated([u8; 36]);

impl Hyphenated {
    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits and hyphens")
    }

    pub(crate) fn into_string(self) -> String {
        String::from_utf8(self.0.to_vec()).expect("hex digits and hyphens")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn formatted_like_the_uuid_crate() {
        for (ms, r1, r2) in
            [(0, 0, 0), (u64::MAX >> 16, u64::MAX, u64::MAX), (1_796_329_966_123, 0xDEAD_BEEF_0123_4567, 0xABC)]
        {
            let ours = super::v7_at(ms, r1, r2);
            // The same bits as the uuid crate formats them: 12 after the version, 62 after the
            // variant.
            let u = uuid::Uuid::from_u128(
                (u128::from((ms << 16) | 0x7000 | (r2 & 0xfff)) << 64)
                    | u128::from((r1 & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000),
            );
            assert_eq!(ours, u.hyphenated().to_string());
            let parsed = uuid::Uuid::parse_str(&ours).unwrap();
            assert_eq!((parsed.get_version_num(), parsed.get_variant()), (7, uuid::Variant::RFC4122));
            let (secs, nanos) = parsed.get_timestamp().unwrap().to_unix();
            assert_eq!(secs * 1000 + u64::from(nanos / 1_000_000), ms);
        }
    }

    #[test]
    fn hex_digits_match_the_uuid_crate() {
        let mut x = 0x0123_4567_89ab_cdefu64;
        let mut samples = vec![[0u8; 16], [0xff; 16], *b"0123456789abcdef"];
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&x.to_le_bytes());
            b[8..].copy_from_slice(&x.rotate_left(29).to_be_bytes());
            samples.push(b);
        }
        // Every byte value in every position.
        for v in 0..=255u8 {
            samples.push([v; 16]);
        }
        for b in samples {
            assert_eq!(super::hyphenated(&b).as_str(), uuid::Uuid::from_bytes(b).hyphenated().to_string());
        }
    }

    #[test]
    fn ids_are_v7_unique_and_time_ordered() {
        let a: Vec<String> = (0..10_000).map(|_| super::v7()).collect();
        let set: std::collections::HashSet<&String> = a.iter().collect();
        assert_eq!(set.len(), a.len());
        for id in &a {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 7);
        }
        let first = uuid::Uuid::parse_str(&a[0]).unwrap().get_timestamp().unwrap().to_unix();
        let last = uuid::Uuid::parse_str(&a[a.len() - 1]).unwrap().get_timestamp().unwrap().to_unix();
        assert!(last >= first);
    }
}
