// SPDX-License-Identifier: MIT
//! The key keeper (MSP §2): polls the secure-channel status, derives the per-endpoint modes,
//! latches and attests a key, and reuses a local key after a restart. It runs inside the event
//! loop as a state machine with one host call at a time and a timer — no thread, no sleep —
//! so a hung host never blocks the proxy.
//!
//! Poll cadence (§2.2): 1 s while the state is `Unknown` during the first 5 minutes, then the
//! configured interval; consecutive failures back off (×2, up to ×8), and a notify from
//! `/provision` polls at once. Every call has a timeout (§11 item 9).

use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use heapless::String;
use mio::{Registry, Token};

use super::host_call::{self, HostCall, HostCallError, HostResponse};
use super::host_clock::HostClock;
use super::key_doc::{ACQUIRE_BODY, KeyDoc};
use super::key_store::KeyStore;
use super::signing::SigningKey;
use super::status_doc::{Mode, StatusDocument, StatusSummary, parse_status};
use crate::calendar::{format_http_date, parse_http_date};
use crate::clock;
use crate::redirect::Endpoint;

/// Who hears of key-latch message changes besides the log: telemetry's module-status event
/// (MSP §6.1), registered by [`crate::telemetry::enable`]. Telemetry sits above msp (its
/// uploader calls the host with the keeper's key), so the keeper announces here instead of
/// calling up into it.
static MESSAGE_LISTENER: OnceLock<fn(&str, &str)> = OnceLock::new();

/// Registers `listener(module, message)`, called with `"KeyKeeper"` and the new message at
/// every change of the key-latch message. The first registration stands (it is process-wide,
/// like the telemetry queue it feeds).
pub fn announce_messages_to(listener: fn(&str, &str)) {
    // A second registration is the same function (telemetry enabled twice): nothing to do.
    MESSAGE_LISTENER.set(listener).ok();
}

/// Longest status message kept (§6.1 cuts reports at 1024 bytes).
pub const MESSAGE_MAX_BYTES: usize = 1024;

/// What the keeper needs from the configuration.
#[derive(Clone, Debug)]
pub struct KeeperConfig {
    /// WireServer (status and key calls).
    pub host: SocketAddrV4,
    /// `SO_MARK` of the agent's sockets.
    pub mark: u32,
    /// Timeout of each host call.
    pub timeout_ms: u64,
    /// Poll interval once the state is known.
    pub interval: Duration,
}

/// Which call is in flight.
#[derive(Debug)]
enum Purpose {
    Status,
    Acquire,
    Attest(Box<KeyDoc>),
}

#[derive(Debug)]
enum Phase {
    Waiting { until: Instant },
    Calling { call: HostCall, purpose: Purpose, started: Instant },
}

/// What changed in one step, for the event loop to act on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The redirect policy should be recomputed (modes changed or the key became ready).
    pub routes: bool,
    /// A new status document was parsed (rules may have changed).
    pub status: bool,
}

/// The key keeper.
#[derive(Debug)]
pub struct KeyKeeper {
    config: KeeperConfig,
    store: KeyStore,
    started: Instant,
    phase: Phase,
    summary: Option<StatusSummary>,
    document: Option<Box<StatusDocument>>,
    key: Option<(KeyDoc, SigningKey)>,
    message: String<MESSAGE_MAX_BYTES>,
    host_clock: HostClock,
    failures: u32,
    /// Counters for status and tests.
    pub calls: CallCounters,
    /// Unix time (ns) at which the key latch last became ready; 0 = not ready.
    ready_at_unix_ns: u64,
}

/// How many calls of each kind were made.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallCounters {
    /// Status polls.
    pub status: u64,
    /// Key acquisitions.
    pub acquire: u64,
    /// Attestations.
    pub attest: u64,
}

impl KeyKeeper {
    /// A keeper that polls at once.
    pub fn new(config: KeeperConfig, state_dir: &Path, now: Instant) -> Self {
        let store = KeyStore::new(state_dir);
        let mut keeper = Self {
            config,
            store,
            started: now,
            phase: Phase::Waiting { until: now },
            summary: None,
            document: None,
            key: None,
            message: String::new(),
            host_clock: HostClock::new(),
            failures: 0,
            calls: CallCounters::default(),
            ready_at_unix_ns: 0,
        };
        keeper.set_message(format_args!("poll secure channel status task started."));
        if let Err(e) = keeper.store.ensure_dir() {
            keeper.set_message(format_args!("Failed to prepare key folder: {e}"));
        }
        keeper
    }

    fn set_message(&mut self, args: core::fmt::Arguments<'_>) {
        let mut m = String::<MESSAGE_MAX_BYTES>::new();
        // Overflow only truncates the message.
        m.write_fmt(args).ok();
        if m != self.message {
            log::info!(target: "gpa::keeper", "key latch: {m}");
            if let Some(listener) = MESSAGE_LISTENER.get() {
                listener("KeyKeeper", &m);
            }
        }
        self.message = m;
    }

    /// The key-latch status message (never contains the key).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The derived secure-channel state string, `Unknown` before the first good poll.
    pub fn state(&self) -> &str {
        self.summary.as_ref().map_or("Unknown", |s| s.state.as_str())
    }

    /// The last good status summary.
    pub fn summary(&self) -> Option<&StatusSummary> {
        self.summary.as_ref()
    }

    /// The last good status document (for the allowlist).
    pub fn document(&self) -> Option<&StatusDocument> {
        self.document.as_deref()
    }

    /// The key to sign with, when one is latched.
    pub fn key(&self) -> Option<&SigningKey> {
        self.key.as_ref().map(|(_, k)| k)
    }

    /// The latched key's document (guid, incarnation; never printed with the secret).
    pub fn key_doc(&self) -> Option<&KeyDoc> {
        self.key.as_ref().map(|(d, _)| d)
    }

    /// The state is known and, unless MSP is off, a key is held: the redirect policy may
    /// follow the modes (§2.2 step 8–9: a failed key latch defers the redirect update).
    pub fn ready(&self) -> bool {
        self.summary.as_ref().is_some_and(|s| s.is_disabled() || self.key.is_some())
    }

    /// Unix ns at which the latch became ready (0: not ready).
    pub fn ready_at_unix_ns(&self) -> u64 {
        self.ready_at_unix_ns
    }

    /// The mode of an endpoint (Disabled until known).
    pub fn mode(&self, endpoint: Endpoint) -> Mode {
        match (self.summary.as_ref(), endpoint) {
            (Some(s), _) if s.is_disabled() => Mode::Disabled,
            (Some(s), Endpoint::Imds) => s.imds_mode,
            (Some(s), Endpoint::WireServer) => s.ws_mode,
            (Some(s), Endpoint::HostGaPlugin) => s.hgap_mode,
            _ => Mode::Disabled,
        }
    }

    /// The host-synchronised date for `x-ms-azure-host-date` (§2.9).
    pub fn host_date(&self) -> String<29> {
        format_http_date(self.host_clock.now_unix(clock::wall_now()))
    }

    /// When the keeper wants to run next (timer or call deadline).
    pub fn deadline(&self) -> Instant {
        match &self.phase {
            Phase::Waiting { until } => *until,
            Phase::Calling { call, .. } => call.deadline,
        }
    }

    /// `/provision` with `x-ms-azure-notify` (§2.7): poll now unless a call is running.
    /// Notify in the `Unknown` or `disabled` state also resets the provisioning timestamp.
    pub fn notify(&mut self, now: Instant) {
        if matches!(self.state(), "Unknown" | "disabled") {
            // Back to Unknown: the next good poll is a state change and marks readiness
            // again with a fresh timestamp, which the waiting caller's tick can compare.
            self.ready_at_unix_ns = 0;
            self.summary = None;
        }
        if let Phase::Waiting { until } = &mut self.phase {
            *until = now;
        }
    }

    /// A caller is waiting for the latch (a held request): poll within `within`, cutting
    /// any backoff short. Several held requests do not make it poll more often than that.
    pub fn poll_within(&mut self, now: Instant, within: Duration) {
        if let Phase::Waiting { until } = &mut self.phase {
            *until = (*until).min(now + within);
        }
    }

    fn next_delay(&self, now: Instant) -> Duration {
        let base = if self.summary.is_none()
            && now.saturating_duration_since(self.started)
                < Duration::from_millis(crate::limits::KEY_FAST_POLL_WINDOW_MS)
        {
            Duration::from_millis(crate::limits::KEY_FAST_POLL_INTERVAL_MS)
        } else {
            self.config.interval
        };
        base.saturating_mul(1 << self.failures.min(3))
    }

    /// Socket readiness or a timer: advance the state machine.
    pub fn drive(&mut self, registry: &Registry, token: Token, now: Instant) -> Changes {
        let mut changes = Changes::default();
        // Bounded loop: at most a status → acquire → attest chain per call.
        for _ in 0..4 {
            match &mut self.phase {
                Phase::Waiting { until } => {
                    if now < *until {
                        return changes;
                    }
                    self.start(registry, token, Purpose::Status, now);
                }
                Phase::Calling { call, .. } => {
                    let Some(result) = call.drive(now) else { return changes };
                    let Phase::Calling { call, purpose, started } =
                        std::mem::replace(&mut self.phase, Phase::Waiting { until: now })
                    else {
                        return changes;
                    };
                    call.finish(registry);
                    let next = self.complete(purpose, result, started, now, &mut changes);
                    match next {
                        Some(purpose) => self.start(registry, token, purpose, now),
                        None => {
                            let delay = self.next_delay(now);
                            self.phase = Phase::Waiting { until: now + delay };
                            return changes;
                        }
                    }
                }
            }
        }
        changes
    }

    fn start(&mut self, registry: &Registry, token: Token, purpose: Purpose, now: Instant) {
        let date = self.host_date();
        let host = self.config.host;
        let request = match &purpose {
            Purpose::Status => {
                self.calls.status += 1;
                host_call::build_request(
                    "GET",
                    "/secure-channel/status",
                    host,
                    &[("metadata", "True ")],
                    b"",
                    &date,
                    None,
                )
            }
            Purpose::Acquire => {
                self.calls.acquire += 1;
                host_call::build_request(
                    "POST",
                    "/secure-channel/key",
                    host,
                    &[("metadata", "True "), ("content-type", "application/json")],
                    ACQUIRE_BODY,
                    &date,
                    None,
                )
            }
            Purpose::Attest(doc) => {
                self.calls.attest += 1;
                let target = format!("/secure-channel/key/{}/key-attestation", doc.guid);
                match doc.signing_key() {
                    Ok(key) => host_call::build_request(
                        "POST",
                        &target,
                        host,
                        &[("metadata", "True ")],
                        b"",
                        &date,
                        Some(&key),
                    ),
                    Err(_) => Err(HostCallError::BadResponse),
                }
            }
        };
        let started = match request
            .and_then(|r| HostCall::start(registry, token, host, self.config.mark, r, now, self.config.timeout_ms))
        {
            Ok(call) => {
                self.phase = Phase::Calling { call, purpose, started: now };
                return;
            }
            Err(e) => e,
        };
        self.fail_call(&purpose, started);
        let delay = self.next_delay(now);
        self.phase = Phase::Waiting { until: now + delay };
    }

    fn fail_call(&mut self, purpose: &Purpose, error: HostCallError) {
        self.failures = self.failures.saturating_add(1);
        match purpose {
            Purpose::Status => self.set_message(format_args!("Failed to get key status - {error}")),
            Purpose::Acquire => self.set_message(format_args!("Failed to acquire key details: {error}")),
            Purpose::Attest(_) => self.set_message(format_args!("Failed to attest the key: {error}")),
        }
    }

    /// Handles a finished call; returns the next call to make at once, if any.
    fn complete(
        &mut self,
        purpose: Purpose,
        result: Result<HostResponse, HostCallError>,
        started: Instant,
        now: Instant,
        changes: &mut Changes,
    ) -> Option<Purpose> {
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                self.fail_call(&purpose, e);
                return None;
            }
        };
        let elapsed_ms = now.saturating_duration_since(started).as_millis();
        match purpose {
            Purpose::Status => self.on_status(response, elapsed_ms, changes),
            Purpose::Acquire => {
                if response.status != 200 {
                    self.failures = self.failures.saturating_add(1);
                    self.set_message(format_args!(
                        "Failed to acquire key details: Key(KeyResponse(\"acquire\", {}))",
                        response.status
                    ));
                    return None;
                }
                let doc = match KeyDoc::parse(&response.body) {
                    Ok(d) if d.signing_key().is_ok() => d,
                    _ => {
                        self.failures = self.failures.saturating_add(1);
                        self.set_message(format_args!("Failed to acquire key details: the key document is invalid"));
                        return None;
                    }
                };
                if let Err(e) = self.store.save(&doc) {
                    self.failures = self.failures.saturating_add(1);
                    if matches!(e, super::key_store::KeyStoreError::Mismatch) {
                        self.set_message(format_args!(
                            "Failed to check the key '{}' details saved locally: {e}",
                            doc.guid
                        ));
                    } else {
                        self.set_message(format_args!("Failed to save key details to file: {e}"));
                    }
                    return None;
                }
                Some(Purpose::Attest(Box::new(doc)))
            }
            Purpose::Attest(doc) => {
                if response.status != 200 {
                    self.failures = self.failures.saturating_add(1);
                    self.set_message(format_args!(
                        "Failed to attest the key: Key(KeyResponse(\"attest\", {}))",
                        response.status
                    ));
                    return None;
                }
                match doc.signing_key() {
                    Ok(key) => {
                        self.key = Some((*doc, key));
                        self.failures = 0;
                        self.mark_ready();
                        changes.routes = true;
                        self.set_message(format_args!("Successfully attest the key and ready to use. - {elapsed_ms}"));
                    }
                    Err(_) => self.set_message(format_args!("Failed to attest the key: the key document is invalid")),
                }
                None
            }
        }
    }

    fn mark_ready(&mut self) {
        let now = clock::wall_now();
        self.ready_at_unix_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX).max(1);
    }

    fn on_status(&mut self, response: HostResponse, elapsed_ms: u128, changes: &mut Changes) -> Option<Purpose> {
        if !(200..300).contains(&response.status) {
            self.failures = self.failures.saturating_add(1);
            self.set_message(format_args!("Failed to get key status - HTTP status {}", response.status));
            return None;
        }
        // §2.9: sync the host clock; an unparsable custom header disables the fallback.
        let local = clock::wall_now();
        if self.host_clock.needs_sync(local)
            && let Some((text, _custom)) = &response.date
            && let Ok(secs) = parse_http_date(text.as_bytes())
        {
            self.host_clock.sync(secs, local);
        }
        let (document, summary) = match parse_status(&response.body) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.set_message(format_args!("Failed to get key status - {e}"));
                return None;
            }
        };
        self.failures = 0;
        let state_changed = self.summary.as_ref().is_none_or(|old| {
            old.state != summary.state
                || old.ws_mode != summary.ws_mode
                || old.imds_mode != summary.imds_mode
                || old.hgap_mode != summary.hgap_mode
        });
        let disabled = summary.is_disabled();
        let reported_guid = summary.key_guid.clone();
        self.summary = Some(summary);
        self.document = Some(document);
        changes.status = true;
        if disabled {
            if state_changed || self.key.is_some() {
                self.key = None;
                self.mark_ready();
                changes.routes = true;
                self.set_message(format_args!("Customer has not enforce the secure channel state. - {elapsed_ms}"));
            }
            return None;
        }
        let held = self.key.as_ref().map(|(d, _)| d.guid.as_str());
        let need_key = match (&reported_guid, held) {
            (Some(g), Some(h)) => g.as_str() != h,
            _ => true,
        };
        if !need_key {
            changes.routes |= state_changed;
            return None;
        }
        // §2.3 step 1: the host still reports a key we latched before a restart.
        if let Some(guid) = &reported_guid
            && let Ok(doc) = self.store.load(guid)
            && let Ok(key) = doc.signing_key()
        {
            self.key = Some((doc, key));
            self.mark_ready();
            changes.routes = true;
            self.set_message(format_args!("Found key details from local and ready to use. - {elapsed_ms}"));
            return None;
        }
        Some(Purpose::Acquire)
    }
}
