// SPDX-License-Identifier: MIT
//! A small `log` backend: one line per event on stderr (journald under systemd) as
//! `<level> <target>: <message>`, and start/stop milestones also on `/dev/console`.
//!
//! Rate limiting: anything an unprivileged in-guest process can trigger (connection and
//! request events, logged under the `gpa::proxy` target) passes a token bucket, so a local
//! process cannot flood the journal. Dropped lines are counted and reported by the next line
//! that passes. Lines never carry the key or a signature (see `msp::signing`'s Debug impls).
//!
//! When telemetry is configured, admitted records at or below its level (and every milestone)
//! also become telemetry events (`crate::telemetry`); a record the rate limit suppressed is
//! neither printed nor queued. The `log` maximum level is then the more verbose of `logLevel`
//! and the telemetry level, and stderr keeps printing only up to `logLevel`.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use log::{LevelFilter, Log, Metadata, Record};

use crate::limits::GUEST_TRIGGERED_LINES_PER_SECOND;

struct Logger {
    /// Bucket state: the second the bucket was last refilled and the tokens used in it.
    window: AtomicU64,
    used: AtomicU64,
    dropped: AtomicU64,
    /// Most verbose level printed on stderr (`LevelFilter as usize`).
    print_level: AtomicUsize,
}

static LOGGER: Logger = Logger {
    window: AtomicU64::new(0),
    used: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    print_level: AtomicUsize::new(LevelFilter::Trace as usize),
};

impl Logger {
    fn admit(&self, target: &str) -> Option<u64> {
        if !target.starts_with("gpa::proxy") {
            return Some(0);
        }
        let second = crate::clock::wall_now().as_secs();
        if self.window.swap(second, Ordering::Relaxed) != second {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < GUEST_TRIGGERED_LINES_PER_SECOND {
            Some(self.dropped.swap(0, Ordering::Relaxed))
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Libraries (aya's loader) are chatty at debug level; only their warnings matter here.
        if !record.target().starts_with("gpa") && record.level() > log::Level::Warn {
            return;
        }
        let Some(dropped) = self.admit(record.target()) else { return };
        crate::telemetry::log_record(record);
        if record.level() as usize > self.print_level.load(Ordering::Relaxed) {
            return;
        }
        let mut err = std::io::stderr().lock();
        // A failing stderr cannot be reported anywhere; the agent keeps working.
        let written = if dropped > 0 {
            writeln!(
                err,
                "{} {}: {} (rate limit dropped {dropped} lines)",
                record.level(),
                record.target(),
                record.args()
            )
        } else {
            writeln!(err, "{} {}: {}", record.level(), record.target(), record.args())
        };
        drop(written);
    }

    fn flush(&self) {
        drop(std::io::stderr().flush());
    }
}

/// Installs the logger: stderr prints up to `level`; with `events: Some(l)` telemetry is on
/// and records up to `l` are also queued for upload. Safe to call twice (the second call only
/// sets the levels).
pub fn init(level: LevelFilter, events: Option<LevelFilter>) {
    LOGGER.print_level.store(level as usize, Ordering::Relaxed);
    if let Some(events) = events {
        crate::telemetry::enable(events);
    }
    // A failure means a logger is installed already (a second call): only the levels change.
    log::set_logger(&LOGGER).ok();
    log::set_max_level(level.max(events.unwrap_or(LevelFilter::Off)));
}

/// A start/stop milestone: logged and also written to `/dev/console` when it can be opened
/// (early boot and serial consoles show it).
pub fn milestone(message: &str) {
    log::info!(target: "gpa::milestone", "{message}");
    crate::telemetry::milestone(message);
    if let Ok(mut console) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        drop(writeln!(console, "guest-proxy-agent: {message}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::queue;

    /// How many events of each operation in `of` the process-wide queue holds (it is drained).
    fn drain_counting<const N: usize>(of: [&str; N]) -> [u64; N] {
        let mut seen = [0; N];
        queue::global().pop_while(|e| {
            for (count, operation) in seen.iter_mut().zip(of) {
                *count += u64::from(e.operation == operation);
            }
            true
        });
        seen
    }

    #[test]
    fn a_guest_triggered_flood_is_neither_printed_nor_queued_past_the_rate_limit() {
        // The only test that installs the process-wide logger: stderr off, every level queued.
        init(LevelFilter::Off, Some(LevelFilter::Trace));
        drain_counting([]);
        log::warn!(target: "gpa::loop_test", "not guest-triggered: queued");
        for i in 0..500 {
            log::warn!(target: "gpa::proxy::flood_test", "request denied: pid={i}");
        }
        let [other, flood] = drain_counting(["gpa::loop_test", "gpa::proxy::flood_test"]);
        assert_eq!(other, 1);
        // Some pass (a bucket is 20 a second); the loop may straddle one second boundary, so at
        // most two buckets' worth: the other 460+ records were neither printed nor queued.
        assert!((1..=2 * GUEST_TRIGGERED_LINES_PER_SECOND).contains(&flood), "{flood} of 500 flood records queued");
    }
}
