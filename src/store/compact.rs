//! Compact in-memory forms for what the embedded budget store keeps per reservation: ids as
//! 16 bytes instead of 36-byte strings, and the few distinct (tier, model, month) labels stored
//! once and shared. Both are lossless: the original text comes back exactly.
//!
//! Owns: `Id`, `Labels`, `LabelTable`. Imports: `decide::time::Month`, std.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::decide::time::Month;

/// A reservation or request id. A canonical UUID (36 characters, lowercase hex, hyphenated — what
/// [`crate::ids::v7`] makes) is kept as its 16 bytes, any other text as itself; `to_string` gives
/// back exactly the text it was made from, and ids order like their text.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Id {
    Uuid([u8; 16]),
    /// Never a canonical UUID (so equal text always means an equal `Id`).
    Text(Box<str>),
}

impl Id {
    pub(crate) fn new(s: &str) -> Id {
        match parse_uuid(s) {
            Some(b) => Id::Uuid(b),
            None => Id::Text(s.into()),
        }
    }
}

/// The 16 bytes of a canonical UUID: `8-4-4-4-12` lowercase hex digits.
fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if s.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let (mut i, mut n) = (0, 0);
    while i < 36 {
        if matches!(i, 8 | 13 | 18 | 23) {
            if s[i] != b'-' {
                return None;
            }
            i += 1;
            continue;
        }
        out[n] = (nibble(s[i])? << 4) | nibble(s[i + 1])?;
        n += 1;
        i += 2;
    }
    Some(out)
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Text(s) => f.write_str(s),
            Id::Uuid(b) => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let mut buf = [0u8; 36];
                let mut i = 0;
                for (n, byte) in b.iter().enumerate() {
                    if matches!(n, 4 | 6 | 8 | 10) {
                        buf[i] = b'-';
                        i += 1;
                    }
                    buf[i] = HEX[usize::from(byte >> 4)];
                    buf[i + 1] = HEX[usize::from(byte & 0xf)];
                    i += 2;
                }
                f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
            }
        }
    }
}

impl Ord for Id {
    /// The order of the text: for two UUIDs their bytes order the same way (hex digits sort like
    /// their values, the hyphens are at the same places).
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Id::Uuid(a), Id::Uuid(b)) => a.cmp(b),
            (Id::Text(a), Id::Text(b)) => a.cmp(b),
            _ => self.to_string().cmp(&other.to_string()),
        }
    }
}

impl PartialOrd for Id {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The tier, model and month (`YYYY-MM`, as given) of a reservation, shared through a
/// [`LabelTable`], with the month's account key parsed once.
#[derive(Debug)]
pub(crate) struct Labels {
    pub(crate) tier: Box<str>,
    pub(crate) model: Box<str>,
    pub(crate) month: Box<str>,
    /// `month` parsed; a month that does not parse (only possible from a damaged journal line)
    /// books into year 0.
    pub(crate) account_month: Month,
}

/// Lookup of [`Labels`] by borrowed text (no allocation for a hit).
trait LabelKey {
    fn key(&self) -> (&str, &str, &str);
}

impl LabelKey for Labels {
    fn key(&self) -> (&str, &str, &str) {
        (&self.tier, &self.model, &self.month)
    }
}

impl LabelKey for (&str, &str, &str) {
    fn key(&self) -> (&str, &str, &str) {
        *self
    }
}

impl<'a> Borrow<dyn LabelKey + 'a> for Arc<Labels> {
    fn borrow(&self) -> &(dyn LabelKey + 'a) {
        &**self
    }
}

impl Hash for dyn LabelKey + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.key().hash(h);
    }
}

impl PartialEq for dyn LabelKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for dyn LabelKey + '_ {}

impl Hash for Labels {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.key().hash(h);
    }
}

impl PartialEq for Labels {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Labels {}

/// One shared copy of each distinct [`Labels`]. The model comes from requests, so the table
/// cannot be trusted to stay small: whenever it has doubled since the last sweep, labels no
/// record holds any more are dropped.
#[derive(Default)]
pub(crate) struct LabelTable {
    set: HashSet<Arc<Labels>>,
    sweep_above: usize,
}

impl LabelTable {
    pub(crate) fn get(&mut self, tier: &str, model: &str, month: &str) -> Arc<Labels> {
        if let Some(l) = self.set.get(&(tier, model, month) as &dyn LabelKey) {
            return l.clone();
        }
        if self.set.len() >= self.sweep_above {
            self.set.retain(|l| Arc::strong_count(l) > 1);
            if self.set.capacity() > 4 * self.set.len() {
                self.set.shrink_to_fit();
            }
            self.sweep_above = (2 * self.set.len()).max(64);
        }
        let l = Arc::new(Labels {
            tier: tier.into(),
            model: model.into(),
            month: month.into(),
            account_month: Month::parse(month).unwrap_or(Month { year: 0, month: 1 }),
        });
        self.set.insert(l.clone());
        l
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.set.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_exactly() {
        let v7 = crate::ids::v7();
        for s in [
            v7.as_str(),
            "01a212ea-2553-722d-ae80-a3c5862df6d2",
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "01A212EA-2553-722D-AE80-A3C5862DF6D2",
            "01a212ea2553722dae80a3c5862df6d2",
            "{01a212ea-2553-722d-ae80-a3c5862df6d2}",
            "01a212ea-2553-722d-ae80-a3c5862df6dg",
            "01a212ea-2553-722d-ae80_a3c5862df6d2",
            "req-1",
            "",
            "é",
        ] {
            let id = Id::new(s);
            assert_eq!(id.to_string(), s);
            assert_eq!(matches!(id, Id::Uuid(_)), s.len() == 36 && s == s.to_lowercase() && !s.contains(['g', '_']));
        }
    }

    #[test]
    fn ids_order_like_their_text() {
        let texts = [
            "01a212ea-2553-722d-ae80-a3c5862df6d2",
            "01a212ea-2553-722d-ae80-a3c5862df6d3",
            "01a212eb-0000-722d-ae80-a3c5862df6d2",
            "9fffffff-ffff-ffff-ffff-ffffffffffff",
            "a0000000-0000-0000-0000-000000000000",
            "01a212ea",
            "r1",
            "R1",
            "",
        ];
        for a in texts {
            for b in texts {
                assert_eq!(Id::new(a).cmp(&Id::new(b)), a.cmp(b), "{a} vs {b}");
                assert_eq!(Id::new(a) == Id::new(b), a == b);
            }
        }
    }

    #[test]
    fn labels_are_shared_and_unused_ones_dropped() {
        let mut t = LabelTable::default();
        let a = t.get("pro", "gpt-4o", "2026-11");
        let b = t.get("pro", "gpt-4o", "2026-11");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.account_month, Month { year: 2026, month: 11 });
        assert_eq!(t.get("pro", "m", "November").account_month, Month { year: 0, month: 1 });
        for i in 0..1000 {
            t.get("free", &format!("model-{i}"), "2026-11");
        }
        assert!(t.len() <= 64, "unused labels are swept: {}", t.len());
        assert!(Arc::ptr_eq(&a, &t.get("pro", "gpt-4o", "2026-11")), "labels in use are kept");
    }
}
