// SPDX-License-Identifier: MIT
//! RFC 1123 dates for `x-ms-azure-host-date`, the host-synchronised clock, and status
//! timestamps.
//!
//! Heads up! Read `../shared/spec/msp-protocol.md` §1.2 (the date header on every agent
//! request), §2.9 (host time synchronisation) and §3.6 (the date is the only freshness input)
//! first. The format is fixed: `Www, DD Mon YYYY HH:MM:SS GMT`, day zero-padded, see
//! [RFC 7231 §7.1.1.1](https://www.rfc-editor.org/rfc/rfc7231#section-7.1.1.1).
//!
//! Nothing here reads a clock: callers pass the time in, so tests choose any instant.

use core::fmt;
use core::time::Duration;

use heapless::String;

/// Length of an RFC 1123 date: `Wed, 23 Apr 2025 12:00:00 GMT`.
pub const HTTP_DATE_BYTES: usize = 29;
/// Length of a status timestamp: `2025-04-23T12:00:00.000`.
pub const TIMESTAMP_BYTES: usize = 23;
/// Host time is re-learned when the last sync is older than this (§2.9: 15 minutes).
pub const HOST_SYNC_MAX_AGE_SECS: u64 = 15 * 60;
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

/// Picks the host time from a status response (§2.9): `x-ms-azure-host-date` if present,
/// else `Date`. A present but unparsable custom header disables the fallback.
pub fn host_time_from_headers(host_date: Option<&[u8]>, date: Option<&[u8]>) -> Option<u64> {
    match host_date {
        Some(value) => parse_http_date(value).ok(),
        None => date.and_then(|value| parse_http_date(value).ok()),
    }
}

/// The host-synchronised clock (§2.9): host time learned from a response, advanced by the
/// local time elapsed since. Local time is any monotonic-enough `Duration` the caller reads
/// (e.g. `clock::wall_now()`); before the first sync, local time is returned as is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostClock {
    /// `(host Unix seconds, local time)` at the last sync; `None` until the first one.
    synced: Option<(u64, Duration)>,
}

impl HostClock {
    /// A clock that has never synced.
    pub const fn new() -> Self {
        Self { synced: None }
    }

    /// Records that the host said `host_unix_secs` when local time was `local_now`.
    pub fn sync(&mut self, host_unix_secs: u64, local_now: Duration) {
        self.synced = Some((host_unix_secs, local_now));
    }

    /// True if the clock never synced, the last sync is older than 15 minutes, or local time
    /// went backwards since (so the elapsed time is unknown).
    pub fn needs_sync(&self, local_now: Duration) -> bool {
        match self.synced {
            None => true,
            Some((_, at)) => {
                local_now.checked_sub(at).is_none_or(|elapsed| elapsed.as_secs() >= HOST_SYNC_MAX_AGE_SECS)
            }
        }
    }

    /// Host time now, in Unix seconds. If local time went backwards since the sync, the
    /// host time of the sync is returned (never earlier).
    pub fn now_unix(&self, local_now: Duration) -> u64 {
        match self.synced {
            None => local_now.as_secs(),
            Some((host, at)) => host.saturating_add(local_now.saturating_sub(at).as_secs()),
        }
    }
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
    fn host_date_header_is_preferred_and_invalid_disables_fallback() {
        let other: &[u8] = b"Thu, 01 Jan 1970 00:00:00 GMT";
        assert_eq!(host_time_from_headers(Some(SPEC_DATE), Some(other)), Some(SPEC_SECS));
        assert_eq!(host_time_from_headers(None, Some(SPEC_DATE)), Some(SPEC_SECS));
        assert_eq!(host_time_from_headers(Some(b"garbage"), Some(SPEC_DATE)), None);
        assert_eq!(host_time_from_headers(None, Some(b"garbage")), None);
        assert_eq!(host_time_from_headers(None, None), None);
    }

    #[test]
    fn host_clock_advances_from_the_sync_and_resyncs_after_fifteen_minutes() {
        let mut clock = HostClock::new();
        let local = Duration::from_secs(1_000_000);
        assert!(clock.needs_sync(local));
        assert_eq!(clock.now_unix(local), 1_000_000);
        clock.sync(SPEC_SECS, local);
        assert!(!clock.needs_sync(local));
        assert_eq!(clock.now_unix(local + Duration::from_millis(90_500)), SPEC_SECS + 90);
        assert!(!clock.needs_sync(local + Duration::from_secs(HOST_SYNC_MAX_AGE_SECS - 1)));
        assert!(clock.needs_sync(local + Duration::from_secs(HOST_SYNC_MAX_AGE_SECS)));
        // Local time going backwards never moves host time before the sync.
        assert_eq!(clock.now_unix(local - Duration::from_secs(5)), SPEC_SECS);
        assert!(clock.needs_sync(local - Duration::from_secs(5)));
    }
}
