//! Calendar arithmetic on injected time: UTC day and month of a Unix-millisecond instant, and
//! RFC 3339 formatting/parsing. Pure; no clock is read here.
//!
//! Owns: `UnixMillis` helpers. Imports: std only.

/// Milliseconds since the Unix epoch, UTC. Every `now` in this crate is one of these.
pub type UnixMillis = u64;

pub const MS_PER_SECOND: u64 = 1_000;
pub const MS_PER_MINUTE: u64 = 60_000;
pub const MS_PER_DAY: u64 = 86_400_000;

/// Days since 1970-01-01 (UTC day number).
pub fn utc_day(now: UnixMillis) -> u32 {
    (now / MS_PER_DAY) as u32
}

/// Milliseconds left until the next UTC midnight.
pub fn ms_until_next_utc_day(now: UnixMillis) -> u64 {
    MS_PER_DAY - now % MS_PER_DAY
}

/// (year, month 1..=12, day 1..=31) of a day number (Howard Hinnant's civil_from_days).
pub fn civil_from_days(days: i64) -> (i32, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    ((if m <= 2 { y + 1 } else { y }) as i32, m, d)
}

/// Day number of a civil date (inverse of `civil_from_days`).
pub fn days_from_civil(y: i32, m: u32, d: u32) -> i64 {
    let y = i64::from(if m <= 2 { y - 1 } else { y });
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A UTC calendar month, e.g. `2026-11`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    pub year: i32,
    pub month: u32,
}

impl Month {
    pub fn of(now: UnixMillis) -> Month {
        let (year, month, _) = civil_from_days((now / MS_PER_DAY) as i64);
        Month { year, month }
    }

    /// Parses `YYYY-MM`.
    pub fn parse(s: &str) -> Option<Month> {
        let (y, m) = s.split_once('-')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        let year: i32 = y.parse().ok()?;
        let month: u32 = m.parse().ok()?;
        (1..=12).contains(&month).then_some(Month { year, month })
    }

    /// First millisecond of the month.
    pub fn start(self) -> UnixMillis {
        (days_from_civil(self.year, self.month, 1).max(0) as u64) * MS_PER_DAY
    }

    pub fn next(self) -> Month {
        if self.month == 12 {
            Month { year: self.year + 1, month: 1 }
        } else {
            Month { year: self.year, month: self.month + 1 }
        }
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// RFC 3339 UTC with microseconds: `2026-11-25T10:00:00.123000Z`.
pub fn rfc3339_micros(now_us: u64) -> String {
    let secs = now_us / 1_000_000;
    let micros = now_us % 1_000_000;
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    if !(0..=9999).contains(&y) {
        return format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z", sod / 3600, (sod / 60) % 60, sod % 60);
    }
    // Hand-written digits, two at a time: one of these per ledger event, on the request path.
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    let mut put2 = |at: usize, v: u64| b[at..at + 2].copy_from_slice(&DIGIT_PAIRS[v as usize % 100]);
    put2(0, y as u64 / 100);
    put2(2, y as u64);
    put2(5, u64::from(mo));
    put2(8, u64::from(d));
    put2(11, sod / 3600);
    put2(14, (sod / 60) % 60);
    put2(17, sod % 60);
    put2(20, micros / 10_000);
    put2(22, (micros / 100) % 100);
    put2(24, micros % 100);
    String::from_utf8(b.to_vec()).expect("ASCII digits")
}

/// "00" to "99".
const DIGIT_PAIRS: [[u8; 2]; 100] = {
    let mut t = [[0u8; 2]; 100];
    let mut i = 0;
    while i < 100 {
        t[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    t
};

/// RFC 3339 UTC, second precision: `2026-11-25T10:00:00Z`.
pub fn rfc3339_seconds(now: UnixMillis) -> String {
    let secs = now / 1000;
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z", sod / 3600, (sod / 60) % 60, sod % 60)
}

/// Parses an RFC 3339 timestamp (`Z` or `±hh:mm` offset, optional fraction) into Unix millis
/// (the fraction truncated to the millisecond).
pub fn parse_rfc3339(s: &str) -> Option<UnixMillis> {
    parse_rfc3339_micros(s).map(|us| us / 1000)
}

/// Parses an RFC 3339 timestamp into Unix microseconds (the fraction truncated to the
/// microsecond): event times (`occurred_at`) compare exactly.
pub fn parse_rfc3339_micros(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':'
        || b[16] != b':'
        || !(1..=12).contains(&mo)
        || !(1..=31).contains(&d)
        || h > 23
        || mi > 59
        || se > 60
    {
        return None;
    }
    let mut i = 19;
    let mut frac_us = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() {
            return None;
        }
        let us: String = digits.chars().chain("000000".chars()).take(6).collect();
        frac_us = us.parse().ok()?;
    }
    let offset_s = match &s[i..] {
        "Z" | "z" => 0,
        rest if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) && &rest[3..4] == ":" => {
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(y as i32, mo as u32, d as u32);
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset_s;
    u64::try_from(secs.checked_mul(1_000_000)?.checked_add(frac_us)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for days in [-1000i64, 0, 1, 59, 365, 11_016, 20_417, 20_454, 30_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_417), (2025, 11, 25));
    }

    #[test]
    fn months_and_days() {
        let t = parse_rfc3339("2026-11-30T23:59:59.999Z").unwrap();
        assert_eq!(Month::of(t).to_string(), "2026-11");
        assert_eq!(Month::of(t + 1).to_string(), "2026-12");
        assert_eq!(utc_day(t) + 1, utc_day(t + 1));
        assert_eq!(ms_until_next_utc_day(t), 1);
        assert_eq!(Month::parse("2026-12").unwrap().next().to_string(), "2027-01");
        assert_eq!(Month::parse("2026-11").unwrap().start(), parse_rfc3339("2026-11-01T00:00:00Z").unwrap());
        assert!(Month::parse("2026-13").is_none());
    }

    #[test]
    fn rfc3339_format_and_parse() {
        let t = parse_rfc3339("2026-11-25T10:00:00.123Z").unwrap();
        assert_eq!(rfc3339_micros(t * 1000), "2026-11-25T10:00:00.123000Z");
        assert_eq!(rfc3339_seconds(t), "2026-11-25T10:00:00Z");
        assert_eq!(parse_rfc3339("2026-11-25T12:00:00+02:00"), parse_rfc3339("2026-11-25T10:00:00Z"));
        assert!(parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn micros_digits_match_the_formatter() {
        let mut t = 0u64;
        // From 1970 through year 9999, in uneven steps, with every micro digit exercised.
        while t < 253_402_300_799_999_999 {
            let secs = t / 1_000_000;
            let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
            let sod = secs % 86_400;
            let expected = format!(
                "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
                sod / 3600,
                (sod / 60) % 60,
                sod % 60,
                t % 1_000_000
            );
            assert_eq!(rfc3339_micros(t), expected);
            t = t * 3 / 2 + 7_654_321;
        }
    }
}
