// SPDX-License-Identifier: MIT
//! The uploader: an event-loop state machine (token [`crate::proxy`]'s `TELEMETRY`) that sends
//! queued events to the WireServer (MSP §1.2 D–G, §7.2), one host call at a time, each with
//! the configured host timeout, so telemetry never blocks or delays the proxy.
//!
//! Every `intervalSeconds`, when events are queued:
//!
//! 1. the VM metadata is refreshed if it is missing or older than an hour: D the goal state,
//!    E the shared config it links to, F the IMDS instance document — each signed when a key is
//!    latched (uploads wait up to a minute after start for the latch, then go regardless);
//!    a failed step is recorded and the next one still runs, and the upload goes out with the
//!    values known so far;
//! 2. G: batches of at most 64 KiB are posted unsigned; a batch that fails is retried up to
//!    five times 15 s apart, then dropped and counted. The next batch follows at once while
//!    events remain.

use core::fmt::Write as _;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use heapless::String;
use mio::{Registry, Token};

use super::metadata::{self, OsInfo, VmMetadata};
use super::{imds, queue, xml};
use crate::clock;
use crate::limits::{
    TELEMETRY_BATCH_MAX_BYTES, TELEMETRY_KEY_WAIT_MS, TELEMETRY_METADATA_MAX_AGE_MS, TELEMETRY_RETRY_DELAY_MS,
    TELEMETRY_UPLOAD_RETRIES,
};
use crate::msp::host_call::{self, HostCall, HostCallError, HostResponse};
use crate::msp::key_keeper::KeyKeeper;

/// `x-ms-version` of the WireServer calls.
const WIRESERVER_VERSION: (&str, &str) = ("x-ms-version", "2012-11-30");
const GOAL_STATE_TARGET: &str = "/machine?comp=goalstate";
const IMDS_TARGET: &str = "/metadata/instance?api-version=2018-02-01";
const UPLOAD_TARGET: &str = "/machine/?comp=telemetrydata";
/// Longest last-error text kept.
const ERROR_MAX_BYTES: usize = 256;

/// What the uploader needs from the configuration.
#[derive(Clone, Debug)]
pub struct UploaderConfig {
    /// WireServer (goal state, shared config, upload).
    pub wire_server: SocketAddrV4,
    /// IMDS.
    pub imds: SocketAddrV4,
    /// `SO_MARK` of the agent's sockets.
    pub mark: u32,
    /// Timeout of each host call.
    pub timeout_ms: u64,
    /// Flush interval.
    pub interval: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    GoalState,
    /// To the URL the goal state named (checked when it was read).
    SharedConfig,
    Imds,
    Upload,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Self::GoalState => "goal state",
            Self::SharedConfig => "shared config",
            Self::Imds => "IMDS instance",
            Self::Upload => "upload",
        }
    }
}

#[derive(Debug)]
enum Phase {
    Waiting { until: Instant },
    Calling { call: HostCall, step: Step },
}

/// A rendered batch waiting to be (re)sent.
#[derive(Debug)]
struct Pending {
    body: Vec<u8>,
    events: usize,
    attempts: u32,
}

/// Counters reported in `telemetryLoggerStatus`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Events the host accepted.
    pub sent_events: u64,
    /// Batches the host accepted.
    pub sent_batches: u64,
    /// Events dropped with a batch that failed every attempt.
    pub failed_events: u64,
    /// Events dropped because they could not fit a batch even with an empty message.
    pub oversized_events: u64,
    /// Events sent with their message cut to fit a batch.
    pub truncated_events: u64,
}

/// The uploader.
#[derive(Debug)]
pub struct Uploader {
    config: UploaderConfig,
    started: Instant,
    phase: Phase,
    metadata: Box<VmMetadata>,
    /// When the metadata was last fetched completely (all of D, E, F).
    metadata_at: Option<Instant>,
    /// Whether every metadata step of the current refresh succeeded.
    round_ok: bool,
    pending: Option<Pending>,
    /// Counters.
    pub stats: UploadStats,
    last_error: String<ERROR_MAX_BYTES>,
    message: std::string::String,
}

/// What to do after a step.
enum Next {
    Call(Step),
    WaitUntil(Instant),
}

impl Uploader {
    /// An uploader that first looks at the queue one interval from `now`. `os` is read by the
    /// caller before the seccomp filter (it needs `sysinfo`).
    pub fn new(config: UploaderConfig, os: OsInfo, now: Instant) -> Self {
        let until = now + config.interval;
        let metadata = Box::new(VmMetadata { os, ..VmMetadata::default() });
        Self {
            config,
            started: now,
            phase: Phase::Waiting { until },
            metadata,
            metadata_at: None,
            round_ok: true,
            pending: None,
            stats: UploadStats::default(),
            last_error: String::new(),
            message: std::string::String::new(),
        }
    }

    /// When the uploader wants to run next.
    pub fn deadline(&self) -> Instant {
        match &self.phase {
            Phase::Waiting { until } => *until,
            Phase::Calling { call, .. } => call.deadline,
        }
    }

    /// The metadata known so far.
    pub fn metadata(&self) -> &VmMetadata {
        &self.metadata
    }

    /// Socket readiness or the timer: advance. `keeper` lends the key (D, E, F are signed when
    /// one is latched) and the host-synchronised date.
    pub fn drive(&mut self, registry: &Registry, token: Token, now: Instant, keeper: &KeyKeeper) {
        let mut next = match &mut self.phase {
            Phase::Waiting { until } => {
                if now < *until {
                    return;
                }
                self.next_round(now, keeper)
            }
            Phase::Calling { call, .. } => {
                let Some(result) = call.drive(now) else { return };
                let Phase::Calling { call, step } = std::mem::replace(&mut self.phase, Phase::Waiting { until: now })
                else {
                    return;
                };
                call.finish(registry);
                self.complete(step, result, now)
            }
        };
        // Bounded: a step that cannot even start (connect refused at once) fails and the next
        // is tried; a round has at most D, E, F and the upload.
        for _ in 0..8 {
            match next {
                Next::WaitUntil(until) => {
                    self.phase = Phase::Waiting { until };
                    return;
                }
                Next::Call(step) => match self.start(step, registry, token, now, keeper) {
                    Ok(call) => {
                        self.phase = Phase::Calling { call, step };
                        return;
                    }
                    Err(e) => next = self.complete(step, Err(e), now),
                },
            }
        }
        // Every step failed at once: pause for an interval.
        self.phase = Phase::Waiting { until: now + self.config.interval };
    }

    /// The timer fired: what to do.
    fn next_round(&mut self, now: Instant, keeper: &KeyKeeper) -> Next {
        let later = Next::WaitUntil(now + self.config.interval);
        if self.pending.is_some() {
            return Next::Call(Step::Upload);
        }
        if queue::global().is_empty() {
            return later;
        }
        let waiting_for_key =
            now.saturating_duration_since(self.started) < Duration::from_millis(TELEMETRY_KEY_WAIT_MS);
        if !keeper.ready() && waiting_for_key {
            return later;
        }
        let stale = self
            .metadata_at
            .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_millis(TELEMETRY_METADATA_MAX_AGE_MS));
        if stale {
            self.round_ok = true;
            return Next::Call(Step::GoalState);
        }
        self.next_batch(now)
    }

    /// Takes the next batch off the queue.
    fn next_batch(&mut self, now: Instant) -> Next {
        let mut batch = xml::Batch::new(TELEMETRY_BATCH_MAX_BYTES);
        let metadata = &*self.metadata;
        queue::global().pop_while(|event| batch.try_add(event, metadata));
        self.stats.oversized_events += batch.dropped;
        self.stats.truncated_events += batch.truncated;
        if batch.events() == 0 {
            return Next::WaitUntil(now + self.config.interval);
        }
        self.pending = Some(Pending { events: batch.events(), body: batch.finish(), attempts: 0 });
        Next::Call(Step::Upload)
    }

    fn start(
        &mut self,
        step: Step,
        registry: &Registry,
        token: Token,
        now: Instant,
        keeper: &KeyKeeper,
    ) -> Result<HostCall, HostCallError> {
        let ws = self.config.wire_server;
        // D, E, F: signed when a key is latched; G: never (MSP §3.7 skip list).
        let (method, target, to, extra, key) = match step {
            Step::GoalState => ("GET", GOAL_STATE_TARGET, ws, WIRESERVER_VERSION, keeper.key()),
            Step::SharedConfig => {
                let url = &self.metadata.goal_state.shared_config_url;
                let (to, target) =
                    metadata::shared_config_target(url, ws).map_err(|_checked| HostCallError::BadResponse)?;
                ("GET", target, to, WIRESERVER_VERSION, keeper.key())
            }
            Step::Imds => ("GET", IMDS_TARGET, self.config.imds, ("metadata", "true"), keeper.key()),
            Step::Upload => ("POST", UPLOAD_TARGET, ws, WIRESERVER_VERSION, None),
        };
        let (headers, body) = match (step, &self.pending) {
            (Step::Upload, Some(p)) => (&[extra, ("content-type", "text/xml; charset=utf-8")][..], p.body.as_slice()),
            _ => (&[extra][..], &[][..]),
        };
        let request = host_call::build_request(method, target, to, headers, body, &keeper.host_date(), key)?;
        HostCall::start(registry, token, to, self.config.mark, request, now, self.config.timeout_ms)
    }

    /// A step finished (or could not start): record it and pick the next.
    fn complete(&mut self, step: Step, result: Result<HostResponse, HostCallError>, now: Instant) -> Next {
        let outcome = match result {
            Ok(r) if (200..300).contains(&r.status) => self.absorb(step, &r.body),
            Ok(r) => Err(Failure::Status(r.status)),
            Err(e) => Err(Failure::Call(e)),
        };
        if step == Step::Upload {
            return self.uploaded(outcome, now);
        }
        if let Err(f) = outcome {
            self.record_error(step, f);
            self.round_ok = false;
        }
        match step {
            Step::GoalState if outcome.is_ok() => Next::Call(Step::SharedConfig),
            // A failed metadata step does not stop the others, nor the upload.
            Step::GoalState | Step::SharedConfig => Next::Call(Step::Imds),
            _ => {
                if self.round_ok {
                    self.metadata_at = Some(now);
                }
                self.next_batch(now)
            }
        }
    }

    /// Takes what a metadata response says.
    fn absorb(&mut self, step: Step, body: &[u8]) -> Result<(), Failure> {
        let m = &mut *self.metadata;
        match step {
            Step::GoalState => {
                metadata::read_goal_state(body, &mut m.goal_state).map_err(Failure::Xml)?;
                // Checked now so that a refused URL is reported and E is skipped.
                metadata::shared_config_target(&m.goal_state.shared_config_url, self.config.wire_server)
                    .map_err(Failure::Url)?;
            }
            Step::SharedConfig => metadata::read_shared_config(body, &mut m.shared_config).map_err(Failure::Xml)?,
            Step::Imds => imds::read_compute(body, &mut m.compute).map_err(Failure::Json)?,
            Step::Upload => {}
        }
        Ok(())
    }

    fn uploaded(&mut self, result: Result<(), Failure>, now: Instant) -> Next {
        let Some(mut pending) = self.pending.take() else { return self.next_batch(now) };
        match result {
            Ok(()) => {
                self.stats.sent_events += pending.events as u64;
                self.stats.sent_batches += 1;
                self.next_batch(now)
            }
            Err(f) => {
                self.record_error(Step::Upload, f);
                pending.attempts += 1;
                if pending.attempts > TELEMETRY_UPLOAD_RETRIES {
                    self.stats.failed_events += pending.events as u64;
                    log::warn!(target: "gpa::telemetry", "telemetry batch dropped after {} attempts: events={}", pending.attempts, pending.events);
                    return Next::WaitUntil(now + self.config.interval);
                }
                self.pending = Some(pending);
                Next::WaitUntil(clock::after(now, TELEMETRY_RETRY_DELAY_MS))
            }
        }
    }

    /// Remembers the last failure (logged when it changes, so a host that stays down is one
    /// line, not one per interval).
    fn record_error(&mut self, step: Step, failure: Failure) {
        let mut text = String::<ERROR_MAX_BYTES>::new();
        // Overflow only shortens the text.
        write!(text, "{}: {failure}", step.name()).ok();
        if text != self.last_error {
            log::warn!(target: "gpa::telemetry", "telemetry {text}");
            self.last_error = text;
        }
    }

    /// `telemetryLoggerStatus.message`: what was sent, queued and dropped, and the last error.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Recomputes [`Self::message`] from the counters and the queue (before each status
    /// report, not on every step).
    pub fn update_message(&mut self) {
        let (queued, dropped_full) = {
            let q = queue::global();
            (q.len(), q.dropped_full)
        };
        let s = &self.stats;
        // Events of a batch being retried are still waiting: counted as queued.
        let queued = queued + self.pending.as_ref().map_or(0, |p| p.events);
        self.message.clear();
        // Writing to a String cannot fail.
        write!(
            self.message,
            "Telemetry upload running: sent {} events in {} batches, queued {queued}, dropped {} (queue full \
             {dropped_full}, upload failed {}, too large {}); last error: {}",
            s.sent_events,
            s.sent_batches,
            dropped_full + s.failed_events + s.oversized_events,
            s.failed_events,
            s.oversized_events,
            if self.last_error.is_empty() { "none" } else { &self.last_error },
        )
        .ok();
    }
}

/// Why a step failed.
#[derive(Clone, Copy, Debug)]
enum Failure {
    Call(HostCallError),
    Status(u16),
    Xml(super::extract::XmlError),
    Json(imds::ImdsError),
    Url(metadata::UrlError),
}

impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Call(e) => write!(f, "{e}"),
            Self::Status(s) => write!(f, "HTTP status {s}"),
            Self::Xml(e) => f.write_str(e.as_str()),
            Self::Json(e) => f.write_str(e.as_str()),
            Self::Url(e) => f.write_str(e.as_str()),
        }
    }
}
