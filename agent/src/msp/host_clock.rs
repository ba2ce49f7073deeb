// SPDX-License-Identifier: MIT
//! The host-synchronised clock of MSP §2.9: which response header carries the host's time,
//! and host time advanced by the local time elapsed since it was learned.
//!
//! Heads up! Read `../shared/spec/msp-protocol.md` §1.2 (the date header on every agent
//! request), §2.9 (host time synchronisation) and §3.6 (the date is the only freshness input)
//! first. The date text itself is [`crate::calendar`]'s.
//!
//! Nothing here reads a clock: callers pass the time in, so tests choose any instant.

use core::time::Duration;

use crate::calendar::parse_http_date;

/// Host time is re-learned when the last sync is older than this (§2.9: 15 minutes).
pub const HOST_SYNC_MAX_AGE_SECS: u64 = 15 * 60;

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

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_SECS: u64 = 1_745_409_600;
    const SPEC_DATE: &[u8] = b"Wed, 23 Apr 2025 12:00:00 GMT";

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
