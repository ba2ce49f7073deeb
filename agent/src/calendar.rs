// SPDX-License-Identifier: MIT
//! Calendar time: Unix seconds and milliseconds to and from the two text forms the agent
//! writes and reads, the RFC 1123 date of `x-ms-azure-host-date` and `Date` (MSP §1.2, §2.9)
//! and the `YYYY-MM-DDTHH:MM:SS.fff` timestamp of the status document and `provisioned.tag`
//! (MSP §2.1, §6).
//!
//! One home for the civil-calendar arithmetic, next to [`crate::clock`]: that module reads
//! clocks, this one only converts, so the protocol (`msp`), the status writer and reader, the
//! rules snapshot and telemetry share one formatter without depending on each other.
//!
//! The RFC 1123 form is fixed: `Www, DD Mon YYYY HH:MM:SS GMT`, day zero-padded, see
//! [RFC 7231 §7.1.1.1](https://www.rfc-editor.org/rfc/rfc7231#section-7.1.1.1).
//!
//! Nothing here reads a clock: callers pass the time in, so tests choose any instant.

use core::fmt;

use heapless::String;

/// Length of an RFC 1123 date: `Wed, 23 Apr 2025 12:00:00 GMT`.
pub const HTTP_DATE_BYTES: usize = 29;
/// Length of a status timestamp: `2025-04-23T12:00:00.000`.
pub const TIMESTAMP_BYTES: usize = 23;
/// The last second with a four-digit year, 9999-12-31T23:59:59Z; later times saturate to it.
pub const MAX_UNIX_SECS: u64 = 253_402_300_799;

const SECS_PER_DAY: u64 = 86_400;
const WEEKDAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
const MONTHS: [&[u8; 3]; 12] =
    [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"];

/// Why a date header could not be parsed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HttpDateError {
    /// The text is not exactly `Www, DD Mon YYYY HH:MM:SS GMT` (length, separators, digits,
    /// weekday or month name).
    Syntax,
    /// The fields are well-formed but not a real time (day 31 of a 30-day month, hour 24,
    /// a year before 1970).
    OutOfRange,
    /// The weekday name does not match the date.
    WeekdayMismatch,
}

impl fmt::Display for HttpDateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Syntax => "date is not in rfc 1123 form",
            Self::OutOfRange => "date fields are out of range",
            Self::WeekdayMismatch => "date weekday does not match the date",
        })
    }
}

/// Formats Unix seconds as `Www, DD Mon YYYY HH:MM:SS GMT` (saturating at [`MAX_UNIX_SECS`]).
pub fn format_http_date(unix_secs: u64) -> String<HTTP_DATE_BYTES> {
    let secs = unix_secs.min(MAX_UNIX_SECS);
    let days = secs / SECS_PER_DAY;
    let (year, month, day) = civil_from_days(days);
    let time = secs % SECS_PER_DAY;
    let mut out = [0_u8; HTTP_DATE_BYTES];
    out[..3].copy_from_slice(WEEKDAYS[index(days % 7)]);
    out[3..5].copy_from_slice(b", ");
    put_digits(&mut out[5..7], day);
    out[7] = b' ';
    out[8..11].copy_from_slice(MONTHS[index(month - 1)]);
    out[11] = b' ';
    put_digits(&mut out[12..16], year);
    out[16] = b' ';
    put_clock(&mut out[17..25], time);
    out[25..].copy_from_slice(b" GMT");
    ascii_string(&out)
}

/// Parses `Www, DD Mon YYYY HH:MM:SS GMT` back to Unix seconds. Strict: nothing else is
/// accepted (no other date forms, no surrounding whitespace, no lower-case names).
pub fn parse_http_date(text: &[u8]) -> Result<u64, HttpDateError> {
    let text: &[u8; HTTP_DATE_BYTES] = text.try_into().map_err(|_len| HttpDateError::Syntax)?;
    let separators_ok = &text[3..5] == b", "
        && text[7] == b' '
        && text[11] == b' '
        && text[16] == b' '
        && text[19] == b':'
        && text[22] == b':'
        && &text[25..] == b" GMT";
    if !separators_ok {
        return Err(HttpDateError::Syntax);
    }
    let weekday = WEEKDAYS.iter().position(|w| w[..] == text[..3]).ok_or(HttpDateError::Syntax)?;
    let month = MONTHS.iter().position(|m| m[..] == text[8..11]).ok_or(HttpDateError::Syntax)?;
    let month = u64::try_from(month).map_err(|_overflow| HttpDateError::Syntax)? + 1;
    let day = digits(&text[5..7])?;
    let year = digits(&text[12..16])?;
    let (hour, minute, second) = (digits(&text[17..19])?, digits(&text[20..22])?, digits(&text[23..25])?);
    if year < 1970 || day == 0 || day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 59 {
        return Err(HttpDateError::OutOfRange);
    }
    let days = days_from_civil(year, month, day);
    if index(days % 7) != weekday {
        return Err(HttpDateError::WeekdayMismatch);
    }
    Ok(days * SECS_PER_DAY + hour * 3600 + minute * 60 + second)
}

/// Formats Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.fff` (UTC, no zone suffix: the status
/// and `provisioned.tag` format of §2.1 and §6), saturating at [`MAX_UNIX_SECS`].
pub fn format_timestamp_millis(unix_ms: u64) -> String<TIMESTAMP_BYTES> {
    let secs = (unix_ms / 1000).min(MAX_UNIX_SECS);
    let millis = if unix_ms / 1000 > MAX_UNIX_SECS { 999 } else { unix_ms % 1000 };
    let (year, month, day) = civil_from_days(secs / SECS_PER_DAY);
    let mut out = [0_u8; TIMESTAMP_BYTES];
    put_digits(&mut out[..4], year);
    out[4] = b'-';
    put_digits(&mut out[5..7], month);
    out[7] = b'-';
    put_digits(&mut out[8..10], day);
    out[10] = b'T';
    put_clock(&mut out[11..19], secs % SECS_PER_DAY);
    out[19] = b'.';
    put_digits(&mut out[20..], millis);
    ascii_string(&out)
}

/// Parses a `YYYY-MM-DDTHH:MM:SS[.fff]` UTC timestamp to Unix milliseconds. Lenient where
/// [`format_timestamp_millis`] is exact (the status reader accepts what other writers may
/// produce): one to three fraction digits or none, a leap second, any day 1..=31.
pub fn parse_timestamp_millis(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: core::ops::Range<usize>| -> Option<u64> {
        let s = text.get(r)?;
        if s.bytes().all(|c| c.is_ascii_digit()) { s.parse().ok() } else { None }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let millis = match b.get(19) {
        None => 0,
        Some(b'.') => {
            let frac = text.get(20..)?;
            if frac.is_empty() || frac.len() > 3 || !frac.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            // "5" is 500 ms, "05" is 50 ms.
            frac.parse::<u64>().ok()? * 10u64.pow(u32::try_from(3 - frac.len()).ok()?)
        }
        Some(_) => return None,
    };
    let days = days_from_civil(year, month, day);
    Some(((days * SECS_PER_DAY + hour * 3600 + minute * 60 + second) * 1000) + millis)
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic Gregorian.
///
/// Counts in 400-year eras starting on 0000-03-01, so the leap day is the last day of the
/// shifted year and the month lengths follow the `(153 * m + 2) / 5` pattern. See
/// <https://howardhinnant.github.io/date_algorithms.html#civil_from_days>.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // 719,468 days from 0000-03-01 to 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

/// (year ≥ 1970, month 1..=12, day) → days since 1970-01-01; the inverse of
/// [`civil_from_days`].
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = year - u64::from(month <= 2);
    let era = year / 400;
    let year_of_era = year % 400;
    let shifted_month = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Writes `hh:mm:ss` for seconds within a day.
fn put_clock(out: &mut [u8], secs_of_day: u64) {
    put_digits(&mut out[..2], secs_of_day / 3600);
    out[2] = b':';
    put_digits(&mut out[3..5], secs_of_day / 60 % 60);
    out[5] = b':';
    put_digits(&mut out[6..8], secs_of_day % 60);
}

/// Writes `value` as zero-padded decimal filling `out` (higher digits are dropped).
fn put_digits(out: &mut [u8], mut value: u64) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + u8::try_from(value % 10).unwrap_or(0);
        value /= 10;
    }
}

/// Reads exactly `text.len()` ASCII digits.
fn digits(text: &[u8]) -> Result<u64, HttpDateError> {
    text.iter().try_fold(0, |acc, &b| {
        if b.is_ascii_digit() { Ok(acc * 10 + u64::from(b - b'0')) } else { Err(HttpDateError::Syntax) }
    })
}

/// A value already reduced below a small modulus, as an index.
fn index(value: u64) -> usize {
    usize::try_from(value).unwrap_or(0)
}

/// Copies ASCII bytes into a string of exactly their capacity.
fn ascii_string<const N: usize>(bytes: &[u8; N]) -> String<N> {
    let mut out = String::new();
    for &b in bytes {
        // N bytes into capacity N: cannot overflow.
        if out.push(char::from(b)).is_err() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_SECS: u64 = 1_745_409_600;
    const SPEC_DATE: &[u8] = b"Wed, 23 Apr 2025 12:00:00 GMT";

    #[test]
    fn formats_and_parses_the_spec_date() {
        assert_eq!(format_http_date(SPEC_SECS).as_bytes(), SPEC_DATE);
        assert_eq!(parse_http_date(SPEC_DATE), Ok(SPEC_SECS));
    }

    #[test]
    fn formats_epoch_leap_days_and_padding() {
        assert_eq!(format_http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(format_http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(format_http_date(1_709_251_199), "Thu, 29 Feb 2024 23:59:59 GMT");
        assert_eq!(format_http_date(4_107_542_400), "Mon, 01 Mar 2100 00:00:00 GMT");
        assert_eq!(format_http_date(MAX_UNIX_SECS), "Fri, 31 Dec 9999 23:59:59 GMT");
        assert_eq!(format_http_date(u64::MAX), "Fri, 31 Dec 9999 23:59:59 GMT");
    }

    #[test]
    fn every_day_round_trips_through_format_and_parse() {
        // Every day 1970..2101 plus an odd second offset, through leap and century years.
        for day in 0..48_000_u64 {
            let secs = day * SECS_PER_DAY + (day * 7919) % SECS_PER_DAY;
            let text = format_http_date(secs);
            assert_eq!(parse_http_date(text.as_bytes()), Ok(secs), "{text}");
        }
    }

    #[test]
    fn rejects_other_forms_and_malformed_text() {
        for bad in [
            &b""[..],
            b"Wed, 23 Apr 2025 12:00:00 UTC",
            b"Wed, 23 Apr 2025 12:00:00 GMT ",
            b" Wed, 23 Apr 2025 12:00:00 GMT",
            b"Wed, 23-Apr-2025 12:00:00 GMT",
            b"Wednesday, 23-Apr-25 12:00:00 GMT",
            b"Wed Apr 23 12:00:00 2025",
            b"wed, 23 apr 2025 12:00:00 GMT",
            b"Wed, 2a Apr 2025 12:00:00 GMT",
            b"Wed, 23 Apr 2025 12.00.00 GMT",
            b"Wed, +3 Apr 2025 12:00:00 GMT",
            b"Wed, 23 Foo 2025 12:00:00 GMT",
        ] {
            assert_eq!(parse_http_date(bad), Err(HttpDateError::Syntax), "{bad:?}");
        }
    }

    #[test]
    fn rejects_impossible_dates_and_wrong_weekday() {
        for bad in [
            &b"Thu, 31 Apr 2025 12:00:00 GMT"[..],
            b"Sat, 29 Feb 2025 12:00:00 GMT",
            b"Wed, 00 Apr 2025 12:00:00 GMT",
            b"Wed, 23 Apr 2025 24:00:00 GMT",
            b"Wed, 23 Apr 2025 12:60:00 GMT",
            b"Wed, 23 Apr 2025 12:00:60 GMT",
            b"Wed, 31 Dec 1969 23:59:59 GMT",
        ] {
            assert_eq!(parse_http_date(bad), Err(HttpDateError::OutOfRange), "{bad:?}");
        }
        assert_eq!(parse_http_date(b"Thu, 23 Apr 2025 12:00:00 GMT"), Err(HttpDateError::WeekdayMismatch));
    }

    #[test]
    fn formats_status_timestamps_with_millis() {
        assert_eq!(format_timestamp_millis(SPEC_SECS * 1000 + 7), "2025-04-23T12:00:00.007");
        assert_eq!(format_timestamp_millis(0), "1970-01-01T00:00:00.000");
        assert_eq!(format_timestamp_millis(u64::MAX), "9999-12-31T23:59:59.999");
    }

    #[test]
    fn timestamps_parse_back_to_unix_millis() {
        const TS_MS: u64 = 1_784_715_072_345;
        assert_eq!(parse_timestamp_millis("2026-07-22T10:11:12.345"), Some(TS_MS));
        assert_eq!(parse_timestamp_millis("1970-01-01T00:00:00"), Some(0));
        assert_eq!(parse_timestamp_millis("2024-02-29T00:00:00.5"), Some(1_709_164_800_500));
        assert_eq!(parse_timestamp_millis("2024-13-01T00:00:00"), None);
        assert_eq!(parse_timestamp_millis("2024-01-01 00:00:00"), None);
        assert_eq!(parse_timestamp_millis("2024-01-01T00:00:00.1234"), None);
        assert_eq!(parse_timestamp_millis("+024-01-01T00:00:00"), None);
        // Round trip with the writer's formatter.
        for ms in [0, 951_782_400_000, 4_102_444_799_999, TS_MS] {
            let text = format_timestamp_millis(ms);
            assert_eq!(parse_timestamp_millis(&text), Some(ms), "{text}");
        }
    }
}
