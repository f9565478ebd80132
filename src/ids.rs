//! Identifiers: UUID v7 (time-ordered) for request, reservation, approval and event ids, with
//! the random part from a per-thread generator seeded once from the OS — not one `getrandom(2)`
//! per id (four per request on the hot path otherwise).
//!
//! Owns: `v7`. Imports: uuid, std.

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
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut rand = [0u8; 10];
    rand[..8].copy_from_slice(&next().to_le_bytes());
    rand[8..].copy_from_slice(&next().to_le_bytes()[..2]);
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Builder::from_unix_timestamp_millis(ms, &rand).into_uuid().hyphenated().encode_lower(&mut buf).to_string()
}

#[cfg(test)]
mod tests {
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
