// SPDX-License-Identifier: MIT
//! Optional telemetry upload to the WireServer (MSP §1.2 D–G, §6.1, §7.2–§7.4). Off (nothing is
//! queued, nothing is sent) unless `telemetryIntervalSeconds` is set; then
//! `telemetryLoggerStatus` reports it `RUNNING` with what was sent, queued and dropped.
//!
//! ```text
//!  logger (records ≤ telemetryLevel, after the rate limit) ──┐
//!  logger::milestone ─────────────────────────────────────────┼─> event (redact, cut to 4 KiB)
//!  module status changes (KeyKeeper, Redirector, ProxyServer) ┘        │
//!                                                                      v
//!                                          queue (1,000 events, 256 KiB; full → drop + count)
//!                                                                      │ every telemetryIntervalSeconds
//!                                                                      v
//!  uploader (event loop token): goal state → shared config → IMDS (signed when latched)
//!            → xml (TelemetryData batches ≤ 64 KiB) → POST /machine/?comp=telemetrydata
//! ```
//!
//! Files, one role each: [`event`] (one event and its message), [`queue`] (bounded, never
//! blocks), [`xml`] (the §7.3 body), [`extract`] (a bounded XML value reader), [`metadata`]
//! (goal state, shared config, OS), [`imds`] (the IMDS compute values), [`uploader`] (the
//! state machine).
//!
//! Not sent: the 15-minute extension-status event (provider `69B669B9-…`, Event id 1, §6.4).
//! Its `ExtensionType`, `Name`, `Version` and `Operation` values are not in the spec, and a
//! guess would be worse than nothing; the status document carries the same facts.
//! Records of the `gpa::telemetry` target (the uploader's own failures) are not queued, so a
//! failing upload cannot feed itself.

pub mod event;
pub mod extract;
pub mod imds;
pub mod metadata;
pub mod queue;
pub mod uploader;
pub mod xml;

pub use self::event::{Event, EventTime};
pub use self::uploader::{Uploader, UploaderConfig};

/// Turns telemetry on (the logger does, when `telemetryIntervalSeconds` is set): the queue
/// accepts events, log records up to `log_level` among them, and the key keeper's status
/// message changes reach [`module_status`].
pub fn enable(log_level: log::LevelFilter) {
    queue::enable(log_level);
    crate::msp::key_keeper::announce_messages_to(module_status);
}

/// Queues a log record the logger has already admitted (past its rate limit), when telemetry
/// is on and the record is at or below the configured level. Milestones (queued by
/// [`milestone`]) and telemetry's own records (`gpa::telemetry`, the uploader's failures) are
/// skipped.
pub fn log_record(record: &log::Record<'_>) {
    let target = record.target();
    if !queue::wants_log(record.level()) || target == "gpa::milestone" || target.starts_with("gpa::telemetry") {
        return;
    }
    let task = record.module_path().unwrap_or(target);
    queue::push(Event::new(record.level(), target, task, *record.args(), EventTime::now()));
}

/// Queues a start/stop milestone (always, when telemetry is on).
pub fn milestone(message: &str) {
    if queue::is_on() {
        queue::push(Event::new(
            log::Level::Info,
            "ProxyAgent",
            "milestone",
            format_args!("{message}"),
            EventTime::now(),
        ));
    }
}

/// Queues a module status message change as a Warn event (MSP §6.1), `module` being
/// `KeyKeeper`, `Redirector`, `ProxyServer`, ….
pub fn module_status(module: &str, message: &str) {
    if queue::is_on() {
        queue::push(Event::new(
            log::Level::Warn,
            module,
            "set_module_status_message",
            format_args!("{message}"),
            EventTime::now(),
        ));
    }
}
