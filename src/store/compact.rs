//! Compact in-memory forms for what the embedded budget store keeps per reservation: ids as
//! 16 bytes instead of 36-byte strings, and the few distinct (tier, model, month) labels stored
//! once and shared. Both are lossless: the original text comes back exactly. And [`IdRing`], an
//! insertion-ordered table by id whose memory does not grow with churn.
//!
//! Owns: `Id`, `Labels`, `LabelTable`, `IdRing`. Imports: `decide::time::Month`, `ids` (UUID
//! text), std.

use foldhash::quality::RandomState;
use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use crate::decide::time::Month;
use crate::decide::Tier;
use crate::ids::hyphenated;

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

    /// The id's text (what `to_string` gives, without the formatting machinery).
    pub(crate) fn text(&self) -> String {
        match self {
            Id::Text(s) => String::from(&**s),
            Id::Uuid(b) => hyphenated(b).into_string(),
        }
    }
}

/// The 16 bytes of a canonical UUID: `8-4-4-4-12` lowercase hex digits. The 32 digits are
/// gathered into four words and decoded eight at a time (SWAR): a byte loop with a table cost
/// ~250 instructions per id, and the embedded store reads three ids per request.
fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let s = s.as_bytes();
    if s.len() != 36 || s[8] != b'-' || s[13] != b'-' || s[18] != b'-' || s[23] != b'-' {
        return None;
    }
    let mut digits = [0u8; 32];
    digits[..8].copy_from_slice(&s[..8]);
    digits[8..12].copy_from_slice(&s[9..13]);
    digits[12..16].copy_from_slice(&s[14..18]);
    digits[16..20].copy_from_slice(&s[19..23]);
    digits[20..].copy_from_slice(&s[24..]);
    let mut out = [0u8; 16];
    for (o, d) in out.chunks_exact_mut(4).zip(digits.chunks_exact(8)) {
        o.copy_from_slice(&hex_word(u64::from_le_bytes(d.try_into().expect("eight bytes")))?);
    }
    Some(out)
}

/// Eight ASCII lowercase hex digits (first digit in the lowest byte) as their four bytes, or
/// `None` when any byte is not `0-9` / `a-f`.
fn hex_word(w: u64) -> Option<[u8; 4]> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    // Every byte below 0x80, so adding less than 0x80 to a byte never carries into the next:
    // bit 7 of `w + (0x80 - k)` says "byte >= k".
    let at_least = |k: u64| w.wrapping_add(ONES * (0x80 - k)) & HIGH;
    let digit = at_least(0x30) & !at_least(0x3a);
    let letter = at_least(0x61) & !at_least(0x67);
    if w & HIGH != 0 || (digit | letter) != HIGH {
        return None;
    }
    // '0'-'9' -> 0-9 (low nibble); 'a'-'f' -> 1-6 + 9 (bit 6 set only for letters).
    let v = (w & (ONES * 0x0f)) + ((w >> 6) & ONES) * 9;
    // Each 16-bit lane: first digit << 4 | second digit, in its low byte; then the four low
    // bytes packed together in order.
    let mut x = ((v & 0x000f_000f_000f_000f) << 4) | ((v >> 8) & 0x000f_000f_000f_000f);
    x = (x | (x >> 8)) & 0x0000_ffff_0000_ffff;
    x = (x | (x >> 16)) & 0x0000_0000_ffff_ffff;
    Some((x as u32).to_le_bytes())
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Text(s) => f.write_str(s),
            Id::Uuid(b) => f.write_str(hyphenated(b).as_str()),
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
    pub(crate) tier: Arc<str>,
    pub(crate) model: Arc<str>,
    pub(crate) month: Arc<str>,
    /// `month` parsed; a month that does not parse (only possible from a damaged journal line)
    /// books into year 0.
    pub(crate) account_month: Month,
    /// `tier` parsed (`None` for text that names no tier).
    pub(crate) account_tier: Option<Tier>,
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
/// record holds any more are dropped. Hashed with foldhash's seeded quality hasher, like every
/// per-request map (SipHash cost ~300 instructions per reservation here).
#[derive(Default)]
pub(crate) struct LabelTable {
    set: HashSet<Arc<Labels>, RandomState>,
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
            account_tier: Tier::parse(tier),
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
            assert_eq!(id.text(), s);
            assert_eq!(matches!(id, Id::Uuid(_)), s.len() == 36 && s == s.to_lowercase() && !s.contains(['g', '_']));
        }
    }

    /// The byte-at-a-time reading `parse_uuid` replaced.
    fn parse_uuid_slow(s: &str) -> Option<[u8; 16]> {
        let s = s.as_bytes();
        if s.len() != 36 || s[8] != b'-' || s[13] != b'-' || s[18] != b'-' || s[23] != b'-' {
            return None;
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 16];
        for (o, &at) in out.iter_mut().zip(crate::ids::HEX_AT.iter()) {
            *o = (nibble(s[at])? << 4) | nibble(s[at + 1])?;
        }
        Some(out)
    }

    #[test]
    fn uuid_reading_matches_a_byte_loop_for_every_byte_at_every_digit() {
        let base = "0123abcd-ef45-6789-89ab-cdef01234567";
        assert_eq!(parse_uuid(base), parse_uuid_slow(base));
        assert!(parse_uuid(base).is_some());
        for at in crate::ids::HEX_AT.iter().flat_map(|&a| [a, a + 1]) {
            for c in 0..=255u8 {
                let mut b = base.as_bytes().to_vec();
                b[at] = c;
                let Ok(s) = std::str::from_utf8(&b) else {
                    // Not text: only the byte loop's view matters, and it rejects non-hex bytes.
                    assert!(!c.is_ascii_hexdigit());
                    continue;
                };
                assert_eq!(parse_uuid(s), parse_uuid_slow(s), "byte {c:#x} at {at}");
            }
        }
        for _ in 0..1000 {
            let v7 = crate::ids::v7();
            assert_eq!(parse_uuid(&v7), parse_uuid_slow(&v7));
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

/// Values in insertion order, found by [`Id`]: a ring buffer plus an open-addressing index of
/// sequence numbers (linear probing, at most half full, deletion by shifting back — no
/// tombstones). A `HashMap` with the same churn (insert at one end, remove at the other) fills
/// with tombstones and settles at twice the buckets; this costs a fixed ~16 bytes per entry on
/// top of the entry itself.
pub(crate) struct IdRing<V> {
    /// `None`: replaced by a later entry with the same id. Never `None` at the front.
    ring: VecDeque<Option<(Id, V)>>,
    /// Sequence number of `ring[0]`; numbers start at 1 (0 marks a free index slot).
    first: u64,
    /// Sequence numbers of the live entries; the length is 0 or a power of two.
    index: Vec<u64>,
    len: usize,
    /// The ring grows by doubling, but to no more than this at once while it is below.
    expected: usize,
    hasher: RandomState,
}

impl<V> Default for IdRing<V> {
    fn default() -> Self {
        Self::expecting(usize::MAX)
    }
}

impl<V> IdRing<V> {
    /// A ring that will usually hold at most `expected` entries (its memory does not round up
    /// past that to the next doubling).
    pub(crate) fn expecting(expected: usize) -> Self {
        IdRing { ring: VecDeque::new(), first: 1, index: Vec::new(), len: 0, expected, hasher: RandomState::default() }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn get(&self, id: &Id) -> Option<&V> {
        self.find(id).map(|(_, seq)| &self.entry(seq).1)
    }

    pub(crate) fn contains(&self, id: &Id) -> bool {
        self.find(id).is_some()
    }

    /// The oldest entry.
    pub(crate) fn front(&self) -> Option<(&Id, &V)> {
        self.ring.front().map(|e| {
            let (id, v) = e.as_ref().expect("the front is live");
            (id, v)
        })
    }

    /// Live entries, oldest first.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Id, &V)> {
        self.ring.iter().flatten().map(|(id, v)| (id, v))
    }

    /// The sequence number the next [`IdRing::push_back`] gives (entries are numbered in
    /// insertion order).
    pub(crate) fn end_seq(&self) -> u64 {
        self.first + self.ring.len() as u64
    }

    /// `from..until` narrowed to the numbers still held (`first..end_seq`); an empty range when
    /// none of them is.
    pub(crate) fn clamp_seqs(&self, from: u64, until: u64) -> (u64, u64) {
        let until = until.min(self.end_seq());
        (from.max(self.first).min(until), until)
    }

    /// Live entries numbered `from..until`, oldest first; the range must lie within
    /// [`IdRing::clamp_seqs`]'s bounds.
    pub(crate) fn range(&self, from: u64, until: u64) -> impl Iterator<Item = (&Id, &V)> {
        self.ring.range((from - self.first) as usize..(until - self.first) as usize).flatten().map(|(id, v)| (id, v))
    }

    /// Appends an entry; an older one with the same id is dropped.
    pub(crate) fn push_back(&mut self, id: Id, v: V) {
        let h = self.hash(&id);
        if let Some((slot, seq)) = self.find_hashed(&id, h) {
            self.unindex(slot);
            self.ring[(seq - self.first) as usize] = None;
            self.len -= 1;
            self.trim_front();
        }
        if (self.len + 1) * 2 > self.index.len() {
            self.reindex(((self.len + 1) * 2).next_power_of_two().max(16));
        }
        if self.ring.len() == self.ring.capacity() {
            let cap = self.ring.capacity();
            let mut grown = (cap * 2).max(16);
            if cap < self.expected {
                grown = grown.min(self.expected);
            }
            self.ring.reserve_exact(grown - cap);
        }
        let seq = self.first + self.ring.len() as u64;
        let mask = self.index.len() - 1;
        let mut i = home(h, mask);
        while self.index[i] != 0 {
            i = (i + 1) & mask;
        }
        self.index[i] = slot(h, seq);
        self.ring.push_back(Some((id, v)));
        self.len += 1;
    }

    /// Removes and returns the oldest entry.
    pub(crate) fn pop_front(&mut self) -> Option<(Id, V)> {
        let (id, _) = self.front()?;
        // Found by its sequence number: no id comparisons on the probe run.
        let (h, first) = (self.hash(id), self.first);
        let mask = self.index.len() - 1;
        let mut i = home(h, mask);
        loop {
            match self.seq_of(self.index[i]).expect("live entries are indexed") {
                seq if seq == first => break,
                _ => i = (i + 1) & mask,
            }
        }
        self.unindex(i);
        let e = self.ring.pop_front().flatten();
        self.first += 1;
        self.len -= 1;
        self.trim_front();
        e
    }

    /// Gives memory back once at most a quarter of it is in use (after a burst).
    pub(crate) fn shrink_if_sparse(&mut self) {
        if self.ring.capacity() > 64 && self.ring.capacity() > 4 * self.ring.len() {
            self.ring.shrink_to_fit();
        }
        if self.index.len() > 64 && self.index.len() > 8 * self.len {
            self.reindex((self.len * 2).next_power_of_two().max(16));
        }
    }

    /// 31 bits of the id's hash with bit 31 set (so that a used slot is never 0).
    fn hash(&self, id: &Id) -> u32 {
        (self.hasher.hash_one(id) as u32) | 0x8000_0000
    }

    /// The sequence number in a used slot (`None` for a free one). Slots keep its low 32 bits;
    /// live numbers lie in `first .. first + ring.len()`, a span far below 2^32.
    fn seq_of(&self, slot: u64) -> Option<u64> {
        (slot != 0).then(|| self.first + u64::from((slot as u32).wrapping_sub(self.first as u32)))
    }

    fn entry(&self, seq: u64) -> &(Id, V) {
        self.ring[(seq - self.first) as usize].as_ref().expect("indexed entries are live")
    }

    /// The index slot and sequence number of `id`.
    fn find(&self, id: &Id) -> Option<(usize, u64)> {
        self.find_hashed(id, self.hash(id))
    }

    /// [`Self::find`] with the hash known. A slot's entry is read only when the slot's hash
    /// bits match: a miss (most lookups here) touches the index alone, not the ring.
    fn find_hashed(&self, id: &Id, h: u32) -> Option<(usize, u64)> {
        if self.index.is_empty() {
            return None;
        }
        let mask = self.index.len() - 1;
        let mut i = home(h, mask);
        loop {
            let s = self.index[i];
            let seq = self.seq_of(s)?;
            if slot_hash(s) == h && self.entry(seq).0 == *id {
                return Some((i, seq));
            }
            i = (i + 1) & mask;
        }
    }

    /// Frees index slot `i`, moving later entries of its probe run back so that every entry
    /// stays reachable from its home slot (computed from the slot's hash bits, not the entry).
    fn unindex(&mut self, mut i: usize) {
        let mask = self.index.len() - 1;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let s = self.index[j];
            if s == 0 {
                break;
            }
            let home = home(slot_hash(s), mask);
            // The entry at `j` may move to `i` unless its home lies cyclically in (i, j].
            let stays = if i <= j { i < home && home <= j } else { i < home || home <= j };
            if !stays {
                self.index[i] = s;
                i = j;
            }
        }
        self.index[i] = 0;
    }

    fn trim_front(&mut self) {
        while matches!(self.ring.front(), Some(None)) {
            self.ring.pop_front();
            self.first += 1;
        }
    }

    fn reindex(&mut self, size: usize) {
        assert!(size <= 1 << 31, "an id index is addressed by 31 hash bits");
        let mut index = vec![0u64; size];
        let mask = size - 1;
        for (n, e) in self.ring.iter().enumerate() {
            if let Some((id, _)) = e {
                let h = self.hash(id);
                let mut i = home(h, mask);
                while index[i] != 0 {
                    i = (i + 1) & mask;
                }
                index[i] = slot(h, self.first + n as u64);
            }
        }
        self.index = index;
    }
}

/// An index slot of [`IdRing`]: 0 when free, else the hash bits (from `IdRing::hash`, bit 31
/// set) above the sequence number's low 32 bits.
fn slot(h: u32, seq: u64) -> u64 {
    (u64::from(h) << 32) | u64::from(seq as u32)
}

fn slot_hash(slot: u64) -> u32 {
    (slot >> 32) as u32
}

/// The home slot of hash bits `h` in an index of `mask + 1` (at most 2^31) slots.
fn home(h: u32, mask: usize) -> usize {
    (h & 0x7fff_ffff) as usize & mask
}

#[cfg(test)]
mod ring_tests {
    use super::*;

    /// Against a plain model (a list in insertion order), with many collisions in a small id
    /// space, duplicates, pops, shrinking and regrowth (past the expected size too).
    #[test]
    fn id_ring_matches_a_model() {
        matches_a_model(IdRing::expecting(37), 200_000);
    }

    /// Index slots keep the low 32 bits of sequence numbers: the same, with numbers crossing 2^32.
    #[test]
    fn sequence_numbers_past_32_bits() {
        let mut ring = IdRing::expecting(37);
        ring.first = (1 << 32) - 20_000;
        matches_a_model(ring, 60_000);
    }

    fn matches_a_model(mut ring: IdRing<u64>, steps: u64) {
        let mut model: VecDeque<(String, u64)> = VecDeque::new();
        // The sequence number each live entry got.
        let mut seqs: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for step in 0..steps {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = if x % 3 == 0 {
                format!("{:08x}-0000-7000-8000-{:012x}", x % 500, x % 7)
            } else {
                format!("r{}", x % 700)
            };
            match (x >> 20) % 10 {
                0..=5 => {
                    model.retain(|(k, _)| *k != id);
                    model.push_back((id.clone(), step));
                    seqs.insert(id.clone(), ring.end_seq());
                    ring.push_back(Id::new(&id), step);
                }
                6..=7 => {
                    let m = model.pop_front();
                    let r = ring.pop_front().map(|(k, v)| (k.to_string(), v));
                    assert_eq!(r, m);
                }
                8 => {
                    let want = model.iter().find(|(k, _)| *k == id).map(|(_, v)| v);
                    assert_eq!(ring.get(&Id::new(&id)), want);
                }
                _ => {
                    if step % 1000 == 0 {
                        while model.len() > 3 {
                            model.pop_front();
                            ring.pop_front();
                        }
                        ring.shrink_if_sparse();
                    }
                }
            }
            if step % 97 == 0 {
                // A range of sequence numbers, partly outside what is held: the live entries
                // numbered within it, in order.
                let span = ring.end_seq() - ring.first;
                let from = (ring.first + x % (span + 3)).saturating_sub(2);
                let until = from + (x >> 32) % (span + 3);
                let (f, u) = ring.clamp_seqs(from, until);
                assert!(f <= u && ring.first <= f && u <= ring.end_seq());
                let got: Vec<_> = ring.range(f, u).map(|(k, v)| (k.to_string(), *v)).collect();
                let want: Vec<_> = model.iter().filter(|(k, _)| (from..until).contains(&seqs[k])).cloned().collect();
                assert_eq!(got, want, "{from}..{until}");
            }
            assert_eq!(ring.len(), model.len());
            assert_eq!(ring.front().map(|(k, v)| (k.to_string(), *v)), model.front().cloned());
        }
        let all: Vec<_> = ring.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        assert_eq!(all, model.into_iter().collect::<Vec<_>>());
        for (k, v) in &all {
            assert_eq!(ring.get(&Id::new(k)), Some(v));
        }
    }
}
