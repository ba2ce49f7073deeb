// SPDX-License-Identifier: MIT
//! The bounded event queue between the event sources (the logger, milestones, module status
//! changes) and the uploader.
//!
//! Bounded twice: at most [`TELEMETRY_QUEUE_EVENTS`] events and [`TELEMETRY_QUEUE_BYTES`] of
//! message text. A push never waits and never grows the queue past either bound: an event that
//! does not fit is dropped and counted, and the count is reported in `telemetryLoggerStatus`.
//!
//! The process-wide instance behind [`push`] is off (pushes return at once, nothing is kept)
//! until [`enable`] is called, which only happens when telemetry is configured. It sits behind
//! a `Mutex` only because `log::Log` must be `Sync`; the agent logs from one thread, so the lock
//! is never contended. Nothing logs while holding it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::event::Event;
use crate::limits::{TELEMETRY_QUEUE_BYTES, TELEMETRY_QUEUE_EVENTS};

/// The queue and its counters.
#[derive(Debug)]
pub struct Queue {
    /// Oldest first. A `Vec` drained from the front in batches (one move per batch, not per
    /// event) keeps the code small.
    events: Vec<Event>,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
    /// Events accepted since start.
    pub accepted: u64,
    /// Events dropped because the queue was full.
    pub dropped_full: u64,
}

impl Queue {
    /// An empty queue with the given bounds.
    pub const fn with_bounds(max_events: usize, max_bytes: usize) -> Self {
        Self { events: Vec::new(), bytes: 0, max_events, max_bytes, accepted: 0, dropped_full: 0 }
    }

    /// Adds `event`, or drops and counts it when either bound would be passed.
    pub fn push(&mut self, event: Event) -> bool {
        let size = event.heap_bytes();
        if self.events.len() >= self.max_events || self.bytes + size > self.max_bytes {
            self.dropped_full += 1;
            return false;
        }
        self.bytes += size;
        self.accepted += 1;
        self.events.push(event);
        true
    }

    /// Removes events from the front while `take` accepts them (it sees each once and returns
    /// `false` for the first it does not take, which stays queued). Returns how many left.
    pub fn pop_while(&mut self, mut take: impl FnMut(&Event) -> bool) -> usize {
        let taken = self.events.iter().take_while(|e| take(e)).count();
        self.bytes -= self.events[..taken].iter().map(Event::heap_bytes).sum::<usize>();
        self.events.drain(..taken);
        if self.events.is_empty() {
            // A burst's memory is returned once it has been sent.
            self.events = Vec::new();
        }
        taken
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Message bytes waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

static ON: AtomicBool = AtomicBool::new(false);
/// The most verbose log level queued, as `LevelFilter as usize` (0 = off).
static LOG_LEVEL: AtomicUsize = AtomicUsize::new(0);
static QUEUE: Mutex<Queue> = Mutex::new(Queue::with_bounds(TELEMETRY_QUEUE_EVENTS, TELEMETRY_QUEUE_BYTES));

/// Turns the process-wide queue on; log records at or below `log_level` are queued from now.
pub fn enable(log_level: log::LevelFilter) {
    LOG_LEVEL.store(log_level as usize, Ordering::Relaxed);
    ON.store(true, Ordering::Relaxed);
}

/// Whether telemetry is on at all (milestones and status changes are queued).
pub fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Whether log records at `level` are queued.
pub fn wants_log(level: log::Level) -> bool {
    is_on() && level as usize <= LOG_LEVEL.load(Ordering::Relaxed)
}

/// The process-wide queue. The lock is never held across logging.
pub fn global() -> MutexGuard<'static, Queue> {
    // A panic aborts the process (panic = "abort"), so poisoning cannot be observed in
    // production; in tests the data is still consistent (every mutation is one step).
    QUEUE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Queues `event` on the process-wide queue when telemetry is on.
pub fn push(event: Event) {
    if is_on() {
        global().push(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::event::EventTime;

    fn event(text: &str) -> Event {
        Event::new(log::Level::Warn, "m", "t", format_args!("{text}"), EventTime { pid: 1, tid: 1, unix_ms: 0 })
    }

    #[test]
    fn full_queue_drops_and_counts_without_growing() {
        let mut q = Queue::with_bounds(3, 1000);
        for i in 0..10 {
            q.push(event(&format!("e{i}")));
        }
        assert_eq!((q.len(), q.accepted, q.dropped_full), (3, 3, 7));
        assert!(q.events.capacity() <= 4);
        let mut seen = Vec::new();
        assert_eq!(
            q.pop_while(|e| {
                seen.push(e.message.clone());
                seen.len() < 3
            }),
            2
        );
        assert_eq!(seen, ["e0", "e1", "e2"]);
        assert_eq!(q.len(), 1, "the refused event stays queued");
        assert_eq!(q.pop_while(|_| true), 1);
        assert!(q.is_empty() && q.bytes() == 0);
    }

    #[test]
    fn byte_budget_bounds_big_messages() {
        let mut q = Queue::with_bounds(1000, 10_000);
        let big = "x".repeat(4000);
        for _ in 0..5 {
            q.push(event(&big));
        }
        assert_eq!((q.len(), q.dropped_full), (2, 3));
        assert_eq!(q.bytes(), 8000);
        // A small one still fits.
        assert!(q.push(event("small")));
    }

    #[test]
    fn a_flood_never_grows_memory_past_the_bound() {
        let mut q = Queue::with_bounds(TELEMETRY_QUEUE_EVENTS, TELEMETRY_QUEUE_BYTES);
        for i in 0..20_000 {
            q.push(event(&format!("request denied: pid={i} uid=1000 endpoint=imds")));
        }
        assert_eq!(q.len(), TELEMETRY_QUEUE_EVENTS);
        assert_eq!(q.dropped_full, 20_000 - TELEMETRY_QUEUE_EVENTS as u64);
        // Doubling stops at the first power of two above the bound.
        assert!(q.events.capacity() <= TELEMETRY_QUEUE_EVENTS.next_power_of_two());
        assert!(q.bytes() <= TELEMETRY_QUEUE_BYTES);
    }
}
