// SPDX-License-Identifier: MIT
//! One telemetry event (MSP §7.2) and how a message becomes one: formatted into bounded room,
//! secret-redacted with the audit redactor (§7.4), and cut to
//! [`TELEMETRY_MESSAGE_MAX_BYTES`] on a character boundary.

use core::fmt::{self, Write as _};

use heapless::String as Short;

use crate::audit::redact;
use crate::limits::{TELEMETRY_FORMAT_BYTES, TELEMETRY_MESSAGE_MAX_BYTES};

/// Longest operation (module) and task name kept.
pub const NAME_MAX_BYTES: usize = 64;

/// A queued event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `CapabilityUsed` (`ERROR`, `WARN`, `INFO`, …).
    pub level: log::Level,
    /// `Context3`: the module (`OperationId`), e.g. `KeyKeeper` or a log target.
    pub operation: Short<NAME_MAX_BYTES>,
    /// `TaskName`.
    pub task: Short<NAME_MAX_BYTES>,
    /// `Context1`: redacted, at most [`TELEMETRY_MESSAGE_MAX_BYTES`].
    pub message: String,
    /// `EventPid`.
    pub pid: u32,
    /// `EventTid`.
    pub tid: u32,
    /// When it happened (Unix ms, wall clock).
    pub unix_ms: u64,
}

impl Event {
    /// An event from a message given as format arguments (a log record's). `operation` and
    /// `task` longer than [`NAME_MAX_BYTES`] are cut.
    pub fn new(level: log::Level, operation: &str, task: &str, message: fmt::Arguments<'_>, now: EventTime) -> Self {
        Self {
            level,
            operation: short(operation),
            task: short(task),
            message: prepare_message(message),
            pid: now.pid,
            tid: now.tid,
            unix_ms: now.unix_ms,
        }
    }

    /// Bytes this event holds on the heap (counted against the queue's byte budget).
    pub fn heap_bytes(&self) -> usize {
        self.message.len()
    }
}

/// Who and when, captured at the event's source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventTime {
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Unix ms.
    pub unix_ms: u64,
}

impl EventTime {
    /// Now, for the calling thread.
    pub fn now() -> Self {
        Self {
            pid: crate::sys::getpid(),
            tid: crate::sys::gettid(),
            unix_ms: u64::try_from(crate::clock::wall_now().as_millis()).unwrap_or(u64::MAX),
        }
    }
}

fn short(text: &str) -> Short<NAME_MAX_BYTES> {
    // Cut, not refused: `try_from` of the cut text cannot fail.
    Short::try_from(&text[..text.floor_char_boundary(NAME_MAX_BYTES)]).unwrap_or_default()
}

/// Formats `message` into [`TELEMETRY_FORMAT_BYTES`] of room, redacts it and cuts it to
/// [`TELEMETRY_MESSAGE_MAX_BYTES`] on a character boundary.
///
/// When the formatted text did not fit, its last, cut-off word is removed before redaction:
/// a secret split by the cut could otherwise be too short to be recognised.
pub fn prepare_message(message: fmt::Arguments<'_>) -> String {
    let mut room = Bounded { buf: [0; TELEMETRY_FORMAT_BYTES], len: 0, cut: false };
    // An error only means "did not fit", recorded in `cut`.
    room.write_fmt(message).ok();
    let mut text = &room.buf[..room.len];
    if room.cut {
        let word_start = text.iter().rposition(u8::is_ascii_whitespace).unwrap_or(0);
        text = &text[..word_start];
    }
    let mut redacted = heapless::Vec::<u8, TELEMETRY_MESSAGE_MAX_BYTES>::new();
    redact(text, &mut redacted);
    let valid = match core::str::from_utf8(&redacted) {
        Ok(all) => all,
        // The capacity cut may split a character: keep the whole ones.
        Err(e) => core::str::from_utf8(&redacted[..e.valid_up_to()]).unwrap_or_default(),
    };
    valid.to_owned()
}

/// A fixed buffer that keeps what fits (cut on a character boundary) and remembers the cut.
struct Bounded {
    buf: [u8; TELEMETRY_FORMAT_BYTES],
    len: usize,
    cut: bool,
}

impl fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let take = s.floor_char_boundary(self.buf.len() - self.len);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        if take < s.len() {
            self.cut = true;
            return Err(fmt::Error);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: EventTime = EventTime { pid: 1, tid: 2, unix_ms: 3 };

    #[test]
    fn messages_are_redacted() {
        let e = Event::new(log::Level::Warn, "gpa::keeper", "log", format_args!("conn pwd=secret;x"), T);
        assert_eq!(e.message, "conn [REDACTED];x");
        let e = Event::new(log::Level::Warn, "m", "t", format_args!("Authorization: Bearer abc"), T);
        assert_eq!(e.message, "[REDACTED]");
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        // 3-byte characters: 4096 is not a multiple of 3, so the cut falls inside one.
        let long = "€".repeat(2000);
        let e = Event::new(log::Level::Info, "m", "t", format_args!("{long}"), T);
        assert_eq!(e.message.len(), TELEMETRY_MESSAGE_MAX_BYTES - 1);
        assert!(e.message.chars().all(|c| c == '€'));
    }

    #[test]
    fn a_secret_cut_by_the_format_limit_is_dropped_not_leaked() {
        let key44 = format!("{}=", "A1b2".repeat(10) + "xyz");
        let filler = "x ".repeat((TELEMETRY_FORMAT_BYTES - 20) / 2);
        // The key starts 20 bytes before the end of the format room: it is cut in half.
        let e = Event::new(log::Level::Info, "m", "t", format_args!("{filler}{key44} tail"), T);
        assert!(!e.message.contains("A1b2A1b2"), "part of a key leaked");
    }

    #[test]
    fn names_are_cut_not_refused() {
        let e = Event::new(log::Level::Info, &"o".repeat(100), "t", format_args!("m"), T);
        assert_eq!(e.operation.len(), NAME_MAX_BYTES);
    }
}
