//! Exact money: integer micro-USD (`Micros`), parsed from and printed as decimal strings.
//!
//! Owns: the money type and its decimal-string conversions. Imports: std only.

use std::fmt;

/// An amount of money in micro-USD (1 USD = 1_000_000). Signed so drift can be negative.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(pub i64);

/// Why a decimal money string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("not a decimal amount (expected digits with at most 6 decimal places, e.g. \"1.50\")")]
    Malformed,
    #[error("more than 6 decimal places (money is kept in micro-USD)")]
    TooPrecise,
    #[error("amount too large")]
    Overflow,
}

impl Micros {
    pub const ZERO: Micros = Micros(0);
    pub const PER_USD: i64 = 1_000_000;

    pub fn from_usd_str(s: &str) -> Result<Micros, MoneyError> {
        let s = s.trim();
        let (neg, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (int_part, frac_part) = match digits.split_once('.') {
            Some((i, f)) => (i, f),
            None => (digits, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(MoneyError::Malformed);
        }
        if !int_part.bytes().all(|b| b.is_ascii_digit()) || !frac_part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(MoneyError::Malformed);
        }
        if frac_part.len() > 6 {
            return Err(MoneyError::TooPrecise);
        }
        let whole: i64 = if int_part.is_empty() { 0 } else { int_part.parse().map_err(|_| MoneyError::Overflow)? };
        let mut frac: i64 = 0;
        for (i, b) in frac_part.bytes().enumerate() {
            frac += i64::from(b - b'0') * 10_i64.pow(5 - i as u32);
        }
        let v = whole.checked_mul(Self::PER_USD).and_then(|w| w.checked_add(frac)).ok_or(MoneyError::Overflow)?;
        Ok(Micros(if neg { -v } else { v }))
    }

    pub fn saturating_add(self, o: Micros) -> Micros {
        Micros(self.0.saturating_add(o.0))
    }
    pub fn saturating_sub(self, o: Micros) -> Micros {
        Micros(self.0.saturating_sub(o.0))
    }
    pub fn max(self, o: Micros) -> Micros {
        Micros(self.0.max(o.0))
    }
    pub fn min(self, o: Micros) -> Micros {
        Micros(self.0.min(o.0))
    }
    pub fn is_positive(self) -> bool {
        self.0 > 0
    }
    /// Dollars as a float, for metrics only (never for accounting).
    pub fn as_usd_f64(self) -> f64 {
        self.0 as f64 / Self::PER_USD as f64
    }
}

/// Six decimal places, always: `"0.000150"`, `"-1.250000"`.
impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000)
    }
}

impl serde::Serialize for Micros {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Micros {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Micros::from_usd_str(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_six_places() {
        assert_eq!(Micros::from_usd_str("1.00").unwrap(), Micros(1_000_000));
        assert_eq!(Micros::from_usd_str("0.000150").unwrap(), Micros(150));
        assert_eq!(Micros::from_usd_str(".5").unwrap(), Micros(500_000));
        assert_eq!(Micros::from_usd_str("-2").unwrap(), Micros(-2_000_000));
        assert_eq!(Micros(150).to_string(), "0.000150");
        assert_eq!(Micros(-1_250_000).to_string(), "-1.250000");
        assert_eq!(Micros(50_000_000).to_string(), "50.000000");
    }

    #[test]
    fn refuses_bad_strings() {
        assert_eq!(Micros::from_usd_str("1.0000001"), Err(MoneyError::TooPrecise));
        assert_eq!(Micros::from_usd_str("abc"), Err(MoneyError::Malformed));
        assert_eq!(Micros::from_usd_str(""), Err(MoneyError::Malformed));
        assert_eq!(Micros::from_usd_str("1e3"), Err(MoneyError::Malformed));
        assert_eq!(Micros::from_usd_str("99999999999999999"), Err(MoneyError::Overflow));
    }
}
