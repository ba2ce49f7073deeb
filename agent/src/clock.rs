// SPDX-License-Identifier: MIT
//! The only place that reads clocks. The event loop reads time once per turn and passes `now`
//! down, so every deadline is computed from one value and tests can construct any instant.

#![expect(clippy::disallowed_methods, reason = "this module is the one allowed caller")]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Monotonic now.
pub fn now() -> Instant {
    Instant::now()
}

/// Wall-clock time as a duration since the Unix epoch (zero if the clock is before 1970).
pub fn wall_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// `now + ms`, saturating.
pub fn after(now: Instant, ms: u64) -> Instant {
    now.checked_add(Duration::from_millis(ms)).unwrap_or(now)
}
