// SPDX-License-Identifier: MIT
//! The proxy: one thread, one `mio` loop, a fixed table of connections.
//!
//! Event sources, each with a reserved token: the listener, the signalfd (SIGTERM, SIGINT,
//! SIGHUP), the key keeper's host call, the telemetry uploader's host call; connections use two
//! tokens per table slot from [`FIRST_CONNECTION`] (client, then upstream). Time is read once
//! per turn and the poll timeout is the nearest deadline of any connection, the key keeper,
//! the telemetry uploader or the status timer.

pub mod connection;
pub mod local;
mod shares;
pub mod upstream;

use std::io::{self, Write};
use std::net::SocketAddrV4;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use self::connection::{Buffers, Connection, Ctx, Next, peer_v4};
use self::shares::Resource;
use crate::audit::{AuditRecord, AuditTrail, derive_checkpoint_key};
use crate::config::{CallerIdentity, RedirectPolicy, ValidatedConfig};
use crate::identity::{Caller, Resolver};
use crate::limits::{
    ACCEPT_RETRY_MS, BODY_BUFFERS, EVENTS_PER_TURN, GROUPS_PER_USER, REQUEST_BODY_MAX_BYTES, ROOT_RESERVED_BODY_BUFFERS,
};
use crate::msp::key_keeper::{KeeperConfig, KeyKeeper};
use crate::msp::signing::{self, SigningKey};
use crate::policy::decide::{CallerView, Outcome};
use crate::policy::{Policy, snapshot};
use crate::redirect::{AttachOptions, AuditKey, Endpoint, NoRecord, RedirectError, Redirector, TaskIdentity};
use crate::status::{KeyLatchStates, ModuleStatus, StatusInputs, StatusWriter, Summaries, SummaryKind, SummaryRecord};
use crate::sys::{Signal, SignalFd};
use crate::telemetry::metadata::OsInfo;
use crate::telemetry::{Uploader, UploaderConfig};
use crate::{clock, logger, telemetry};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const KEEPER: Token = Token(2);
/// The early agent's hand-over socket, and the taker connected to it (crate::handover).
const HANDOVER_OFFER: Token = Token(4);
const HANDOVER_PEER: Token = Token(5);
const TELEMETRY: Token = Token(3);
/// Connection tokens start here: slot `i` uses `FIRST_CONNECTION + 2i` (client) and `+ 1`
/// (upstream).
pub const FIRST_CONNECTION: usize = 16;

/// Sent when the table is full (never queued, MSP §11 item 5).
/// Pending connections the kernel queues for `accept` (see `sys::listen_tcp`).
const LISTEN_BACKLOG: i32 = 1024;

/// How long a taking agent waits for its key latch before it tells the early agent to stop
/// anyway (the early agent faces the same host, so waiting longer gains nothing).
const TAKEOVER_READY_WAIT: Duration = Duration::from_secs(10);
/// First wait before a failed start step (the listener's bind, the redirector's attach) is
/// tried again, and the longest.
const START_RETRY_FIRST_MS: u64 = 1_000;
const START_RETRY_MAX_MS: u64 = 30_000;
/// Binds tried at start (500 ms apart, MSP §5.1) before the listener counts as failed.
const BIND_ATTEMPTS_AT_START: u32 = 6;

const SERVER_FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Why a connection ended (for logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The exchange completed and the connection was not to be kept.
    Done,
    /// The client closed.
    ClientClosed,
    /// Reading from or writing to the client failed.
    ClientError,
    /// The upstream closed mid-response.
    UpstreamClosed,
    /// Keep-alive idle timeout.
    Idle,
    /// A deadline passed while relaying or writing.
    Timeout,
    /// A state that should not happen (logged).
    Internal,
}

/// How a request goes upstream.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Endorse<'a> {
    /// Signed with the latched key.
    Sign(&'a SigningKey),
    /// Unsigned: the host does not require a signature for it.
    Unsigned,
    /// A signature is (or may be) required and no key is held yet: hold the request (bounded).
    NotReady,
}

/// The authorization outcome the proxy acts on (MSP §4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward.
    Allow,
    /// Denied by rules in audit mode: logged, forwarded.
    AllowWithAudit,
    /// Answer `403`.
    Forbidden,
}

/// Request body buffers shared by all connections (only bodies need one).
#[derive(Debug)]
pub(crate) struct BodyPool {
    free: Vec<Box<[u8]>>,
    allocated: usize,
}

impl BodyPool {
    fn new() -> Self {
        Self { free: Vec::with_capacity(BODY_BUFFERS), allocated: 0 }
    }

    /// A body buffer; the last `ROOT_RESERVED_BODY_BUFFERS` go to root callers only, so slow
    /// uploads of other users can never hold every buffer (issue 13).
    pub(crate) fn take(&mut self, for_root: bool) -> Option<Box<[u8]>> {
        let in_use = self.allocated - self.free.len();
        if !for_root && in_use + ROOT_RESERVED_BODY_BUFFERS >= BODY_BUFFERS {
            return None;
        }
        if let Some(b) = self.free.pop() {
            return Some(b);
        }
        if self.allocated == BODY_BUFFERS {
            return None;
        }
        self.allocated += 1;
        Some(vec![0; REQUEST_BODY_MAX_BYTES].into_boxed_slice())
    }

    pub(crate) fn give_back(&mut self, buf: Box<[u8]>) {
        self.free.push(buf);
    }
}

/// Counters since start.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Local-endpoint requests without identity (direct connections), counted instead of
    /// audited one by one.
    pub local_unaudited: u64,
    /// Connections refused because the caller is not root and only the root reserve is left.
    pub refused_reserved: u64,
    /// HTTP requests handled (`proxyConnectionsCount`).
    pub requests: u64,
    /// Requests forwarded with a signature.
    pub signed: u64,
    /// TCP connections accepted.
    pub connections: u64,
    /// Connections refused because the table was full.
    pub refused_full: u64,
    /// Connections without a kernel record (direct connects).
    pub without_identity: u64,
    /// Answers by class.
    pub responses_2xx: u64,
    /// 4xx answers (upstream or ours).
    pub responses_4xx: u64,
    /// 5xx answers (upstream or ours).
    pub responses_5xx: u64,
}

/// State every connection may consult; owned by the loop, lent for each drive.
#[derive(Debug)]
pub struct Shared {
    pub(crate) pool: BodyPool,
    pub(crate) agent_mark: u32,
    /// Time the upstream has for its response head, and the longest gap inside a response.
    pub(crate) upstream_timeout_ms: u64,
    /// Counters.
    pub stats: Stats,
    pub(crate) keeper: KeyKeeper,
    pub(crate) provision: local::Provision,
    pub(crate) policy: Policy,
    /// Customer local rule files (MSP §4.7).
    pub(crate) rules_dir: PathBuf,
    /// The per-request audit trail; `None` if it could not be opened (logged at start).
    pub(crate) audit: Option<AuditTrail>,
    /// Per-uid and per-cgroup holdings of connections, body buffers and upstreams.
    pub(crate) shares: shares::Shares,
    /// Connection summaries for the status document.
    pub(crate) summaries: Summaries,
    /// Writes `status.json` (and is the `monitorStatus` component).
    pub(crate) status_writer: StatusWriter,
    /// Fixed buffer the status document is rendered into.
    pub(crate) status_buf: Box<[u8]>,
    /// Status and snapshot directory.
    pub(crate) log_dir: PathBuf,
    /// `ebpfProgramStatus`. Failed: `/provision` finishes with that error (issue 14).
    pub(crate) ebpf: StartStep,
    /// `proxyListenerStatus`. Failed: nothing is redirected meanwhile (the redirect needs the
    /// socket), and `--status` reads the cause from `status.json` (issue 14).
    pub(crate) listener: StartStep,
    /// Handing over to another agent: finish each exchange, keep no connection alive.
    pub(crate) draining: bool,
    /// The telemetry uploader (`telemetryLoggerStatus`); `None`: not configured.
    pub(crate) telemetry: Option<Uploader>,
}

/// A start step that may fail and is then retried (the listener's bind, the redirector's
/// attach), as `status.json` and `/provision` report it.
#[derive(Debug)]
pub(crate) struct StartStep {
    /// The module's status message.
    pub(crate) message: String,
    /// The last try failed: the module is `STOPPED`.
    pub(crate) failed: bool,
}

impl StartStep {
    fn starting(message: &str) -> Self {
        Self { message: message.to_owned(), failed: false }
    }

    fn module_status(&self) -> ModuleStatus<'_> {
        if self.failed { ModuleStatus::stopped(&self.message) } else { ModuleStatus::running(&self.message) }
    }

    fn succeeded(&mut self, message: String) {
        self.message = message;
        self.failed = false;
    }

    /// Records a failure; `true` for the first one since the step last succeeded.
    fn record_failure(&mut self, message: String) -> bool {
        self.message = message;
        !std::mem::replace(&mut self.failed, true)
    }
}

/// Which start step failed (for [`EventLoop::start_step_failed`]).
#[derive(Debug, Clone, Copy)]
enum Step {
    Listener,
    Redirector,
}

impl Shared {
    /// How to endorse a request (MSP §3.1, §3.7). Unsigned only when the host does not
    /// require a signature for it: skip-listed, or MSP / the endpoint's mode known to be off.
    /// A redirected request while the state is still unknown or the key not yet latched (for
    /// example right after a restart that adopted pinned routes) is not forwarded unsigned:
    /// it is held for the latch, then answered `429` — fail closed, never a silent unsigned
    /// pass.
    pub(crate) fn endorsement_for(&self, caller: &Caller, method: &[u8], target: &[u8]) -> Endorse<'_> {
        if signing::is_skip_listed(method, target) {
            return Endorse::Unsigned;
        }
        if let Some(key) = self.keeper.key() {
            return Endorse::Sign(key);
        }
        let endpoint = Endpoint::from_raw(caller.record.endpoint);
        match self.keeper.summary() {
            Some(s) if s.is_disabled() || self.keeper.mode(endpoint).is_disabled() => Endorse::Unsigned,
            _ => Endorse::NotReady,
        }
    }

    /// `x-ms-azure-host-date` now.
    pub(crate) fn host_date(&self) -> heapless::String<29> {
        self.keeper.host_date()
    }

    /// The allowlist decision for a request (MSP §4.3–§4.5, evaluated per request against the
    /// installed rules).
    pub(crate) fn authorize(&mut self, caller: &Caller, method: &[u8], target: &[u8]) -> Verdict {
        let mut groups = [""; GROUPS_PER_USER];
        for (slot, g) in groups.iter_mut().zip(caller.groups.iter()) {
            *slot = g.as_str();
        }
        let view = CallerView {
            uid: caller.uid(),
            user_name: caller.user.as_deref(),
            groups: &groups[..caller.groups.len().min(GROUPS_PER_USER)],
            exe_path: caller.exe.as_deref(),
            process_name: None,
        };
        let endpoint = Endpoint::from_raw(caller.record.endpoint);
        let decision = self.policy.decide(endpoint, &view, method, target);
        if let Some(divergence) = &decision.divergence {
            let mut line = heapless::String::<512>::new();
            let rule_set = self.policy.rules(endpoint).map_or("", |r| r.id.as_str());
            if divergence.write_line(&mut line, "shadow", rule_set, target).is_ok() {
                log::info!(target: "gpa::proxy", "{line}");
            }
        }
        match decision.outcome {
            Outcome::Allow => Verdict::Allow,
            Outcome::AllowWithAudit => {
                log::info!(target: "gpa::proxy", "audit-mode denial forwarded: pid={} uid={} endpoint={} reason={}", caller.pid(), caller.uid(), endpoint.name(), decision.reason.as_str());
                Verdict::AllowWithAudit
            }
            Outcome::Forbidden => {
                log::info!(target: "gpa::proxy", "request denied: pid={} uid={} endpoint={} reason={}", caller.pid(), caller.uid(), endpoint.name(), decision.reason.as_str());
                Verdict::Forbidden
            }
        }
    }

    /// Connection summaries (MSP §6.3): local endpoints and 413s are not summarised; missing
    /// identities and denials also count as failed authentications.
    fn summarise(&mut self, caller: Option<&Caller>, peer: SocketAddrV4, exchange: &connection::Exchange) {
        if exchange.decision == "local" || exchange.status == 413 {
            return;
        }
        let now_s = clock::wall_now().as_secs();
        let upstream = caller.map(|c| c.record.original_destination());
        let mut uid_text = heapless::String::<10>::new();
        let mut record = |summaries: &mut Summaries, kind, status| {
            let rec = SummaryRecord::from_caller(caller, peer, upstream, status, &mut uid_text);
            summaries.record(kind, &rec, now_s)
        };
        let recorded = match exchange.decision {
            "no-identity" => record(&mut self.summaries, SummaryKind::FailedAuthenticate, exchange.status),
            "deny" => {
                record(&mut self.summaries, SummaryKind::FailedAuthenticate, 403);
                record(&mut self.summaries, SummaryKind::ProxyConnection, 403)
            }
            "audit-deny" => {
                record(&mut self.summaries, SummaryKind::FailedAuthenticate, 403);
                record(&mut self.summaries, SummaryKind::ProxyConnection, exchange.status)
            }
            _ => record(&mut self.summaries, SummaryKind::ProxyConnection, exchange.status),
        };
        if recorded.first_in_bucket {
            log::info!(target: "gpa::proxy", "connection summary: new bucket pid={} status={} decision={}", caller.map_or(0, Caller::pid), exchange.status, exchange.decision);
        }
    }

    /// Renders the aggregate status document (MSP §6.2) into `status_buf`, at most `limit`
    /// bytes (fewer summaries when it would not fit).
    pub(crate) fn render_status(&mut self, limit: usize) -> Option<&[u8]> {
        self.summaries.age(clock::wall_now().as_secs());
        if let Some(t) = self.telemetry.as_mut() {
            t.update_message();
        }
        let inputs = StatusInputs {
            timestamp_unix_ms: u64::try_from(clock::wall_now().as_millis()).unwrap_or(0),
            version: crate::VERSION,
            monitor: self.status_writer.monitor(),
            key_latch: ModuleStatus::running(self.keeper.message()),
            key_latch_states: Some(KeyLatchStates::from_keeper(&self.keeper)),
            ebpf_program: self.ebpf.module_status(),
            proxy_listener: self.listener.module_status(),
            telemetry_logger: self
                .telemetry
                .as_ref()
                .map_or(ModuleStatus::TELEMETRY_NOT_CONFIGURED, |t| ModuleStatus::running(t.message())),
            proxy_connections_count: self.stats.requests,
            summaries: &self.summaries,
        };
        let limit = limit.min(self.status_buf.len());
        match crate::status::render(&inputs, &mut self.status_buf[..limit]) {
            Ok(rendered) => Some(rendered.json),
            Err(e) => {
                log::error!(target: "gpa::loop", "status document does not render: {e:?}");
                None
            }
        }
    }

    /// Writes `<logDir>/status.json` atomically.
    fn write_status_file(&mut self) {
        let Some(len) = self.render_status(usize::MAX).map(<[u8]>::len) else { return };
        if let Err(e) = self.status_writer.write(&self.status_buf[..len]) {
            log::warn!(target: "gpa::loop", "status file not written: {e:?}");
        }
    }

    /// Re-applies the allowlist from the latest status document (and the local rule files);
    /// the policy swaps an endpoint's rules only when their content changed.
    fn refresh_policy(&mut self) {
        if let Some(doc) = self.keeper.document() {
            for (name, refused) in ["imds", "wireserver", "hostga"].iter().zip(doc.refused_rules) {
                if refused {
                    log::error!(target: "gpa::loop", "rules refused: endpoint={name}: {}", crate::msp::status_doc::RULES_REFUSED_REASON);
                }
            }
        }
        let rules = self.keeper.document().and_then(|d| d.authorization_rules.as_ref());
        let imds = rules.and_then(|r| r.imds.as_deref());
        let wireserver = rules.and_then(|r| r.wireserver.as_deref());
        let changed = self.policy.update_items(imds, wireserver, &self.rules_dir);
        for (endpoint, event) in self.policy.local_events() {
            log::info!(target: "gpa::loop", "local rules: endpoint={} event={}", endpoint.name(), event.name());
        }
        if changed {
            log::info!(target: "gpa::loop", "authorization rules applied");
            // §4.12: a snapshot of what was applied, keeping the five newest.
            let written = snapshot::write_snapshot(&self.log_dir, clock::wall_now().as_nanos(), &self.policy)
                .and_then(|_| snapshot::prune_snapshots(&self.log_dir, 5));
            if let Err(e) = written {
                log::warn!(target: "gpa::loop", "rules snapshot not written: {e}");
            }
        }
    }

    /// Accounts one answered request: counters and one audit record (written at the end of
    /// the loop turn).
    pub(crate) fn record(
        &mut self,
        caller: Option<&Caller>,
        peer: SocketAddrV4,
        exchange: &connection::Exchange,
        now: Instant,
    ) {
        match exchange.status {
            200..=299 => self.stats.responses_2xx += 1,
            400..=499 => self.stats.responses_4xx += 1,
            500..=599 => self.stats.responses_5xx += 1,
            _ => {}
        }
        self.summarise(caller, peer, exchange);
        // `/provision` and friends asked on a direct connection carry no identity and nothing
        // security-relevant: counted, never written one by one, so a flood of them cannot
        // rotate the audit trail (issue 13).
        if caller.is_none() && exchange.decision == "local" {
            self.stats.local_unaudited += 1;
            return;
        }
        let Some(audit) = self.audit.as_mut() else { return };
        let endpoint = caller.map(|c| Endpoint::from_raw(c.record.endpoint));
        let latency = now.saturating_duration_since(exchange.started);
        let rec = AuditRecord {
            unix_ms: u64::try_from(clock::wall_now().as_millis()).unwrap_or(0),
            pid: caller.map_or(0, Caller::pid),
            uid: caller.map_or(u32::MAX, Caller::uid),
            gid: caller.map_or(u32::MAX, |c| c.record.gid),
            user: caller.and_then(|c| c.user.as_deref()),
            exe: caller.and_then(|c| c.exe.as_deref()),
            cmdline: caller.map_or(&[][..], |c| c.cmdline.as_slice()),
            endpoint: if exchange.decision == "local" { "local" } else { endpoint.map_or("unknown", Endpoint::name) },
            method: &exchange.method,
            path: &exchange.path,
            decision: exchange.decision,
            mode: endpoint.map_or("none", |e| self.keeper.mode(e).as_str()),
            status: exchange.status,
            latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
        };
        audit.record(&rec, now);
    }
}

/// One slot of the connection table.
#[derive(Debug, Default)]
struct Slot {
    /// Boxed so the table itself stays small (a few words per slot) however many slots.
    conn: Option<Box<Connection>>,
    /// The slot's buffers while no connection uses them.
    spare: Option<Buffers>,
}

/// Why the daemon could not start.
#[derive(Debug)]
pub enum StartError {
    /// `mio::Poll` or the signalfd could not be created.
    Poll(io::Error),
    /// The listener could not be bound.
    Bind(SocketAddrV4, io::Error),
    /// The redirector could not load or attach.
    Redirect(RedirectError),
    /// No cgroup v2 mount was found and none was configured.
    NoCgroup2,
}

impl core::fmt::Display for StartError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Poll(e) => write!(f, "cannot create the event loop: {e}"),
            Self::Bind(a, e) => write!(f, "cannot listen on {a}: {e}"),
            Self::Redirect(e) => write!(f, "{e}"),
            Self::NoCgroup2 => f.write_str("no cgroup v2 mount found (mount one or set cgroupPath)"),
        }
    }
}

impl std::error::Error for StartError {}

/// The listener hand-over in progress, if any (crate::handover).
#[derive(Debug)]
enum Handover {
    /// Not involved.
    None,
    /// Early agent: offering the listener to the next agent.
    Offering(crate::handover::Offer),
    /// Taking over: the shared listener is held but not yet accepted on; the early agent is
    /// told to stop once this agent is ready (or at the deadline).
    Taking { taker: crate::handover::Taker, deadline: Instant, started: Instant },
    /// Handed over: accepting no more; exit when the last connection ends or at the deadline.
    Draining { deadline: Instant, successor: u32 },
}

/// The running daemon.
#[derive(Debug)]
pub struct EventLoop {
    poll: Poll,
    /// `None` while the listener cannot be bound (retried with the redirector's backoff).
    listener: Option<TcpListener>,
    /// The listener is registered (it is not while taking over, or once handed over).
    accepting: bool,
    handover: Handover,
    listen: SocketAddrV4,
    signals: SignalFd,
    slots: Box<[Slot]>,
    free: Vec<usize>,
    live: usize,
    /// Live connections without identity (capped: `NO_IDENTITY_MAX_CONNECTIONS`).
    no_identity_live: usize,
    /// Connections to drive again on the next turn (their step budget ran out).
    redrive: Vec<usize>,
    /// Set while `accept` is stopped for lack of descriptors: when to try the queue again
    /// (brought forward whenever a slot frees).
    accept_retry: Option<Instant>,
    /// A descriptor held in reserve so that, out of descriptors, one queued connection can
    /// still be accepted and shed.
    spare_fd: Option<std::fs::File>,
    shared: Shared,
    /// `None` while the programs are not attached (a failed start, retried with backoff): the
    /// agent stays up to report why, and nothing is redirected meanwhile.
    redirector: Option<Redirector>,
    /// What the redirector is attached to, and with which options, for the retries.
    cgroup: PathBuf,
    keep_records: bool,
    /// When the failed start step is tried again (the listener's bind, then the
    /// redirector's attach), and the wait after that one.
    start_retry: Option<(Instant, u64)>,
    /// Capabilities and seccomp wait for the redirector: the retries need `bpf()`.
    harden_pending: bool,
    resolver: Resolver,
    config: ValidatedConfig,
    routes: [bool; 3],
    netns_cookie: u64,
    /// When `status.json` is written next.
    next_status: Instant,
    /// The key GUID the audit trail last recorded as latched.
    audited_key: Option<String>,
}

impl EventLoop {
    /// Binds, loads and attaches everything; the redirect policy starts empty and follows the
    /// key keeper (or intercepts everything with `redirect: all`).
    pub fn start(config: ValidatedConfig) -> Result<Self, StartError> {
        let started = clock::now();
        // Two descriptors per slot (client and upstream) plus the loop's own: a full table must
        // never run the process out of descriptors (issue 13). The unit's LimitNOFILE allows it.
        let wanted = 2 * config.max_connections as u64 + crate::limits::FD_RESERVE;
        let max_connections = match crate::sys::raise_nofile(wanted) {
            Ok((soft, _)) if soft < wanted => {
                // A table the descriptors cannot back would end in EMFILE, where the queue
                // stalls; a smaller table ends in `503`, which drains it and keeps the root
                // reserve meaningful.
                let fits = usize::try_from(soft.saturating_sub(crate::limits::FD_RESERVE) / 2).unwrap_or(0);
                let fits = fits.max(config.caps.root_reserved_connections + 1).min(config.max_connections);
                log::warn!(
                    target: "gpa::loop",
                    "descriptor limit {soft} is below the {wanted} a table of {} needs (raise LimitNOFILE): serving {fits} connections",
                    config.max_connections
                );
                fits
            }
            Ok(_) => config.max_connections,
            Err(e) => {
                log::warn!(target: "gpa::loop", "cannot read or raise RLIMIT_NOFILE: {e}");
                config.max_connections
            }
        };
        // The caps follow the table actually served: a smaller table scales the shares down.
        let mut caps = config.caps;
        if max_connections < config.max_connections {
            let fit = crate::config::Caps::for_table(max_connections);
            caps.per_uid_connections = caps.per_uid_connections.min(fit.per_uid_connections);
            caps.per_cgroup_connections = caps.per_cgroup_connections.min(fit.per_cgroup_connections);
            caps.root_reserved_connections = caps.root_reserved_connections.min(fit.root_reserved_connections);
            caps.per_uid_upstreams = caps.per_uid_upstreams.min(fit.per_uid_upstreams);
        }
        // Early boot has `lo` down; the listener needs it. Failure shows up at bind.
        drop(crate::sys::loopback_up());
        let poll = Poll::new().map_err(StartError::Poll)?;
        let signals = SignalFd::new().map_err(StartError::Poll)?;
        poll.registry()
            .register(&mut SourceFd(&signals.raw()), SIGNALS, Interest::READABLE)
            .map_err(StartError::Poll)?;
        // A listener that cannot be bound does not stop the daemon either: it is reported
        // and retried like the redirector (issue 14).
        let (listener, taker, shared_listener) = match listener_for(&config, BIND_ATTEMPTS_AT_START) {
            Ok((listener, taker, shared)) => (Ok(listener), taker, shared),
            Err(e @ StartError::Bind(..)) => (Err(e.to_string()), None, false),
            Err(e) => return Err(e),
        };

        let cgroup = match &config.cgroup {
            Some(p) => p.clone(),
            None => crate::redirect::find_cgroup2_root().ok_or(StartError::NoCgroup2)?,
        };
        // Read now: the seccomp filter installed after start does not allow `sysinfo`.
        let telemetry = config.telemetry.map(|t| {
            let uploader = UploaderConfig {
                wire_server: config.wire_server,
                imds: config.imds,
                mark: config.agent_mark,
                timeout_ms: config.host_timeout_ms,
                interval: Duration::from_secs(t.interval_secs),
            };
            Uploader::new(uploader, OsInfo::collect(), clock::now())
        });

        secure_rules_dir(&config.state_dir.join("rules"));
        let keeper = KeyKeeper::new(
            KeeperConfig {
                host: config.wire_server,
                mark: config.agent_mark,
                timeout_ms: config.host_timeout_ms,
                interval: Duration::from_secs(config.poll_interval_secs),
            },
            &config.state_dir,
            clock::now(),
        );
        let handover = match taker {
            Some(taker) => Handover::Taking { taker, deadline: clock::now() + TAKEOVER_READY_WAIT, started },
            None if config.early => offer_handover(&config, &poll),
            None => Handover::None,
        };
        let slots = Buffers::arena(max_connections)
            .into_iter()
            .map(|bufs| Slot { conn: None, spare: Some(bufs) })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        let free = (0..max_connections).rev().collect();
        let mut this = Self {
            poll,
            listener: None,
            accepting: false,
            handover,
            listen: config.listen,
            signals,
            slots,
            free,
            live: 0,
            no_identity_live: 0,
            redrive: Vec::new(),
            accept_retry: None,
            spare_fd: std::fs::File::open("/dev/null").ok(),
            shared: Shared {
                pool: BodyPool::new(),
                agent_mark: config.agent_mark,
                upstream_timeout_ms: config.upstream_timeout_ms,
                stats: Stats::default(),
                keeper,
                provision: local::Provision::new(clock::now()),
                policy: Policy::new(),
                rules_dir: config.state_dir.join("rules"),
                summaries: Summaries::new(),
                status_writer: StatusWriter::new(&config.log_dir),
                status_buf: crate::status::new_buffer(),
                log_dir: config.log_dir.clone(),
                ebpf: StartStep::starting("eBPF redirector is starting"),
                listener: StartStep::starting("Proxy listener is starting"),
                draining: false,
                telemetry,
                shares: shares::Shares::new(caps),
                audit: match AuditTrail::open(&config.log_dir, &caps) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        log::error!(target: "gpa::loop", "audit log disabled: cannot open it in {}: {e}", config.log_dir.display());
                        None
                    }
                },
            },
            redirector: None,
            cgroup,
            keep_records: shared_listener,
            start_retry: None,
            harden_pending: false,
            resolver: Resolver::new(),
            config,
            routes: [false; 3],
            netns_cookie: 0,
            next_status: clock::now(),
            audited_key: None,
        };
        match listener {
            Ok(listener) => {
                this.install_listener(listener, shared_listener, started).map_err(StartError::Poll)?;
                this.attach_redirector(started);
            }
            Err(why) => this.listener_unavailable(&why, clock::now()),
        }
        let started = format!(
            "pid {}, version {}, caller identity {}, {} connections",
            std::process::id(),
            env!("CARGO_PKG_VERSION"),
            match this.redirector.as_ref().map(Redirector::task_identity) {
                Some(TaskIdentity::Kernel) => "kernel",
                Some(TaskIdentity::Procfs(_)) => "procfs",
                None => "none (redirector not attached)",
            },
            max_connections
        );
        this.audit_event("start", &started);
        Ok(this)
    }

    /// Takes `listener` into the loop: registered unless it is shared with an early agent
    /// that still accepts from it (it is registered at the hand-over), its address recorded
    /// for `--status`, its namespace noted for the redirect.
    fn install_listener(&mut self, mut listener: TcpListener, shared: bool, started: Instant) -> io::Result<()> {
        // A listener shared with the early agent is accepted on only once this agent is armed
        // and latched; until then the early agent keeps accepting from the same queue.
        if !shared {
            self.poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        }
        self.accepting = !shared;
        self.netns_cookie = crate::sys::netns_cookie(listener.as_fd()).unwrap_or(0);
        self.listen = match listener.local_addr() {
            Ok(std::net::SocketAddr::V4(a)) => a,
            _ => self.config.listen,
        };
        if let Err(e) = crate::listener::record_address(&self.config.state_dir, self.listen) {
            log::warn!(target: "gpa::loop", "cannot record the listener address for --status: {e}");
        }
        logger::milestone(&format!(
            "proxy listener ready on {}{}",
            self.listen,
            if shared { " (shared by the early agent)" } else { "" }
        ));
        self.shared.listener.succeeded(format!(
            "Started proxy listener, ready to accept request - {}",
            clock::now().saturating_duration_since(started).as_millis()
        ));
        self.next_status = clock::now();
        telemetry::module_status("ProxyServer", &self.shared.listener.message);
        self.listener = Some(listener);
        Ok(())
    }

    /// The listener could not be bound: report it (`proxyListenerStatus` `STOPPED`, read by
    /// `--status` from `status.json`, since no socket answers `/provision`) and retry. The
    /// redirector waits: its redirect needs this socket.
    fn listener_unavailable(&mut self, why: &str, now: Instant) {
        self.shared.ebpf.message = "eBPF redirector waits for the proxy listener".to_owned();
        self.start_step_failed(Step::Listener, format!("Failed to start proxy listener - {why}"), now);
    }

    /// A start step failed: said once (milestone, telemetry, status written now) until it
    /// succeeds, logged at each retry; the next try follows the backoff, 1 s doubling to
    /// [`START_RETRY_MAX_MS`]. A process that exits instead loses the cause, and systemd
    /// gives up on it after a few restarts.
    fn start_step_failed(&mut self, step: Step, message: String, now: Instant) {
        let wait_ms = self.start_retry.map_or(START_RETRY_FIRST_MS, |(_, wait)| wait);
        let (state, module) = match step {
            Step::Listener => (&mut self.shared.listener, "ProxyServer"),
            Step::Redirector => (&mut self.shared.ebpf, "Redirector"),
        };
        if state.record_failure(message) {
            logger::milestone(&format!("{}; retrying, nothing is redirected meanwhile", state.message));
            telemetry::module_status(module, &state.message);
            self.next_status = now;
        } else {
            log::warn!(target: "gpa::loop", "{}; next try in {wait_ms} ms", state.message);
        }
        self.start_retry = Some((clock::after(now, wait_ms), (wait_ms * 2).min(START_RETRY_MAX_MS)));
    }

    /// The retry timer fired: bind the listener if it is still missing (one attempt, the
    /// loop must not sleep), then attach the redirector.
    fn retry_start(&mut self, now: Instant) {
        if self.listener.is_none() {
            match bind_listener(self.config.listen, 1) {
                Ok(listener) => {
                    if let Err(e) = self.install_listener(listener, false, now) {
                        self.listener_unavailable(&format!("cannot watch the listener: {e}"), now);
                        return;
                    }
                    self.start_retry = None;
                }
                Err(e) => {
                    self.listener_unavailable(&e.to_string(), now);
                    return;
                }
            }
        }
        self.attach_redirector(now);
    }

    /// Loads and attaches the redirector. A failure does not stop the agent: it is reported
    /// (`ebpfProgramStatus`, `/provision`, `--status`) and retried
    /// ([`Self::start_step_failed`]).
    fn attach_redirector(&mut self, started: Instant) {
        let Some(listener) = self.listener.as_ref() else { return };
        let attached = Redirector::attach(
            &self.cgroup,
            &AttachOptions {
                agent_mark: self.config.agent_mark,
                agent_tgid: crate::sys::getpid(),
                pins: self.config.pin_dir.as_deref(),
                listener: listener.as_fd(),
                netns_cookie: self.netns_cookie,
                kernel_identity: self.config.caller_identity == CallerIdentity::Kernel,
                keep_records: self.keep_records,
            },
        );
        let now = clock::now();
        let redirector = match attached {
            Ok(r) => r,
            Err(e) => {
                self.start_step_failed(Step::Redirector, format!("Failed to start redirector: {e}"), now);
                return;
            }
        };
        let attach_ms = now.saturating_duration_since(started).as_millis();
        let identity = match redirector.task_identity() {
            TaskIdentity::Kernel => "executable identity from the kernel's connect-time record".to_owned(),
            TaskIdentity::Procfs(why) => format!("executable identity from /proc only ({why})"),
        };
        logger::milestone(&format!(
            "eBPF redirector attached to {} in {attach_ms} ms; {identity}",
            self.cgroup.display()
        ));
        self.shared.ebpf.succeeded(format!("Started Redirector with eBPF maps - {attach_ms}; {identity}"));
        self.start_retry = None;
        self.next_status = now;
        telemetry::module_status("Redirector", &self.shared.ebpf.message);
        // Adopted pinned state keeps the previous agent's routes until the key latch decides.
        for (i, destination) in
            [self.config.wire_server, self.config.imds, self.config.host_ga_plugin].into_iter().enumerate()
        {
            self.routes[i] = redirector.routed(destination);
        }
        self.redirector = Some(redirector);
        self.apply_routes();
        if self.harden_pending {
            self.harden();
        }
    }

    /// Drops the capabilities and installs the seccomp filter (`sys::harden`) once everything
    /// privileged is done: now, or after the redirector's retry succeeds.
    pub fn harden(&mut self) {
        if self.redirector.is_none() {
            self.harden_pending = true;
            log::info!(target: "gpa::main", "hardening waits for the redirector (its retries need bpf())");
            return;
        }
        self.harden_pending = false;
        match crate::sys::harden::drop_capabilities().and_then(|()| crate::sys::harden::install_seccomp()) {
            Ok(()) => log::info!(target: "gpa::main", "hardened: capabilities dropped, seccomp filter installed"),
            Err(e) => log::error!(target: "gpa::main", "hardening failed, running with full privileges: {e}"),
        }
    }

    /// An `event` record in both audit trails, written at once (events are rare and are the
    /// evidence an operator looks for first).
    fn audit_event(&mut self, event: &str, detail: &str) {
        if let Some(audit) = self.shared.audit.as_mut() {
            audit.event(event, detail);
            if let Err(e) = audit.flush_all(clock::now()) {
                log::warn!(target: "gpa::loop", "audit log write failed: {e}");
            }
        }
    }

    /// The address the proxy listens on.
    pub fn listen_address(&self) -> SocketAddrV4 {
        self.listen
    }

    /// Runs until SIGTERM or SIGINT.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_PER_TURN);
        let mut now = clock::now();
        loop {
            let timeout = self.next_deadline(now).map(|d| d.saturating_duration_since(now));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            now = clock::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(now),
                    SIGNALS => {
                        if self.handle_signals()? {
                            logger::milestone("stopping on signal");
                            self.audit_event("stop", "signal");
                            return Ok(());
                        }
                    }
                    KEEPER => self.drive_keeper(now),
                    HANDOVER_OFFER => self.offer_listener(),
                    HANDOVER_PEER => self.read_taker(now),
                    TELEMETRY => self.drive_telemetry(now),
                    Token(t) if t >= FIRST_CONNECTION => self.drive_connection((t - FIRST_CONNECTION) / 2, now, false),
                    Token(_) => {}
                }
            }
            self.expire(now);
            if self.start_retry.is_some_and(|(at, _)| now >= at) {
                self.retry_start(now);
            }
            if let Some(audit) = self.shared.audit.as_mut()
                && let Err(e) = audit.flush(now)
            {
                log::warn!(target: "gpa::loop", "audit log write failed: {e}");
            }
            if self.advance_handover(now) {
                self.audit_event("stop", "handed over");
                return Ok(());
            }
        }
    }

    /// Early agent: a taker connected; send it the listener.
    fn offer_listener(&mut self) {
        let Handover::Offering(offer) = &mut self.handover else { return };
        let Some(listener) = self.listener.as_ref() else {
            // Nothing to offer: the taker times out and binds its own.
            log::warn!(target: "gpa::handover", "a taker connected, but this agent has no listener to offer");
            return;
        };
        match offer.accept(listener.as_fd(), self.listen) {
            Ok(Some(pid)) => {
                log::info!(target: "gpa::handover", "listener offered to pid {pid}");
                if let Some(peer) = offer.peer()
                    && let Err(e) = self.poll.registry().register(peer, HANDOVER_PEER, Interest::READABLE)
                {
                    log::warn!(target: "gpa::handover", "cannot watch the taking agent: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => log::warn!(target: "gpa::handover", "hand-over accept failed: {e}"),
        }
    }

    /// Early agent: the taker said something (or went away).
    fn read_taker(&mut self, now: Instant) {
        let Handover::Offering(offer) = &mut self.handover else { return };
        match offer.read_peer() {
            crate::handover::PeerEvent::Pending => {}
            crate::handover::PeerEvent::Gone => {
                log::warn!(target: "gpa::handover", "the taking agent went away before taking over; still serving");
            }
            crate::handover::PeerEvent::Stop(pid) => self.begin_drain(pid, now),
        }
    }

    /// Early agent, handed over: stop accepting (the successor accepts from the same socket),
    /// answer what still comes on open connections with `connection: close`, then exit
    /// without unpinning once the last one ends. A kept-alive connection is not cut while
    /// idle (its client could be sending right then): it ends after its next response, or by
    /// its own idle timeout; the deadline only bounds the wait.
    fn begin_drain(&mut self, successor: u32, now: Instant) {
        if self.accepting
            && let Some(listener) = self.listener.as_mut()
        {
            drop(self.poll.registry().deregister(listener));
            self.accepting = false;
        }
        if let Handover::Offering(offer) = &self.handover {
            // Best effort: after switch_root this process may no longer see the path.
            drop(std::fs::remove_file(offer.path()));
        }
        logger::milestone(&format!("handed the listener over to pid {successor}; finishing {} connections", self.live));
        let wait_ms = crate::limits::IDLE_TIMEOUT_MS.max(self.config.upstream_timeout_ms) + 1_000;
        self.handover = Handover::Draining { deadline: clock::after(now, wait_ms), successor };
        self.shared.draining = true;
    }

    /// Moves the hand-over along; `true` when this agent has handed over and is done.
    fn advance_handover(&mut self, now: Instant) -> bool {
        match &self.handover {
            Handover::Taking { deadline, .. } if self.shared.keeper.ready() || now >= *deadline => {
                let Handover::Taking { taker, started, .. } = std::mem::replace(&mut self.handover, Handover::None)
                else {
                    return false;
                };
                if !self.accepting
                    && let Some(listener) = self.listener.as_mut()
                {
                    match self.poll.registry().register(listener, LISTENER, Interest::READABLE) {
                        Ok(()) => self.accepting = true,
                        Err(e) => log::error!(target: "gpa::handover", "cannot accept on the shared listener: {e}"),
                    }
                }
                let early = taker.early_pid;
                if let Err(e) = taker.stop() {
                    log::warn!(target: "gpa::handover", "could not tell the early agent to stop: {e}");
                }
                let ms = now.saturating_duration_since(started).as_millis();
                logger::milestone(&format!(
                    "took over from the early agent (pid {early}) after {ms} ms, key latch {}",
                    if self.shared.keeper.ready() { "ready" } else { "not ready yet" }
                ));
                false
            }
            Handover::Draining { deadline, successor } if self.live == 0 || now >= *deadline => {
                logger::milestone(&format!(
                    "hand-over to pid {successor} complete{}; exiting without unpinning",
                    if self.live == 0 { "" } else { " (connections still open at the deadline are closed)" }
                ));
                true
            }
            _ => false,
        }
    }

    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut next = match &self.handover {
            // A draining agent waits only for its connections and the drain deadline.
            Handover::Draining { deadline, .. } => *deadline,
            other => {
                let mut timers = self.shared.keeper.deadline().min(self.next_status);
                if let Some(t) = &self.shared.telemetry {
                    timers = timers.min(t.deadline());
                }
                if let Handover::Taking { deadline, .. } = other {
                    timers = timers.min(*deadline);
                }
                timers
            }
        };
        if self.live > 0 {
            for slot in self.slots.iter() {
                if let Some(c) = &slot.conn {
                    next = next.min(c.deadline());
                }
            }
        }
        if let Some(retry) = self.accept_retry {
            next = next.min(retry);
        }
        if let Some((retry, _)) = self.start_retry {
            next = next.min(retry);
        }
        if !self.redrive.is_empty() {
            return Some(now);
        }
        // Never spin: a deadline in the past fires on this turn's expire() anyway.
        Some(next.max(now))
    }

    fn handle_signals(&mut self) -> io::Result<bool> {
        while let Some(signal) = self.signals.read()? {
            match signal {
                Signal::Terminate => return Ok(true),
                Signal::Reload => log::info!(target: "gpa::loop", "SIGHUP: nothing to reload yet"),
                Signal::Other(n) => log::debug!(target: "gpa::loop", "ignored signal {n}"),
            }
        }
        Ok(false)
    }

    fn drive_keeper(&mut self, now: Instant) {
        let changes = self.shared.keeper.drive(self.poll.registry(), KEEPER, now);
        if changes.status {
            self.shared.refresh_policy();
            // The document parse ran deep on the stack; do not keep those pages resident.
            crate::sys::trim_stack();
        }
        if changes.routes {
            self.apply_routes();
            // Checkpoints of the audit chain are MAC'd with a key derived from the latched key.
            let checkpoint = self.shared.keeper.key().map(|k| derive_checkpoint_key(|label| k.mac(label)));
            if let Some(audit) = self.shared.audit.as_mut() {
                audit.set_checkpoint_key(checkpoint);
            }
            let guid: Option<String> = self.shared.keeper.key_doc().map(|d| d.guid.as_str().to_owned());
            if guid != self.audited_key {
                let detail = guid.as_deref().map_or_else(|| "none held".to_owned(), |g| format!("guid {g}"));
                self.audit_event(if guid.is_some() { "key-latched" } else { "key-dropped" }, &detail);
                self.audited_key = guid;
            }
        }
        if self.shared.keeper.ready() {
            self.shared.provision.key_latch_ready(self.shared.keeper.ready_at_unix_ns());
        }
        // A module's state changed (rules applied, key latched, redirect armed): the status
        // file says so now, not at the next timer tick (issue 14).
        if changes.status || changes.routes {
            self.next_status = now;
            // Requests held for the latch try again: signed now, or forwarded unsigned if MSP
            // turned out to be off, or held on until their deadline.
            for (index, slot) in self.slots.iter().enumerate() {
                if slot.conn.as_ref().is_some_and(|c| c.is_held_for_key()) && !self.redrive.contains(&index) {
                    self.redrive.push(index);
                }
            }
        }
    }

    /// The telemetry uploader's call or timer (never touches connections: it only shares the
    /// loop).
    fn drive_telemetry(&mut self, now: Instant) {
        let Shared { telemetry, keeper, .. } = &mut self.shared;
        if let Some(t) = telemetry.as_mut() {
            t.drive(self.poll.registry(), TELEMETRY, now, keeper);
        }
    }

    /// Installs or removes each endpoint's route: one source of truth, the endpoint modes of
    /// the latest status document (MSP §11 item 7), applied once the key latch is ready.
    fn apply_routes(&mut self) {
        let all = self.config.redirect == RedirectPolicy::All;
        if !all && !self.shared.keeper.ready() {
            return;
        }
        let endpoints = [
            (Endpoint::WireServer, self.config.wire_server),
            (Endpoint::Imds, self.config.imds),
            (Endpoint::HostGaPlugin, self.config.host_ga_plugin),
        ];
        for (i, (endpoint, destination)) in endpoints.into_iter().enumerate() {
            let want = all || !self.shared.keeper.mode(endpoint).is_disabled();
            if want == self.routes[i] {
                continue;
            }
            let Some(redirector) = self.redirector.as_mut() else { return };
            let result =
                if want { redirector.set_route(destination, endpoint) } else { redirector.remove_route(destination) };
            match result {
                Ok(()) => {
                    self.routes[i] = want;
                    log::info!(target: "gpa::loop", "redirect {}: endpoint={} destination={destination}", if want { "on" } else { "off" }, endpoint.name());
                }
                Err(e) => {
                    log::error!(target: "gpa::loop", "redirect update failed: endpoint={} error={e}", endpoint.name())
                }
            }
        }
    }

    fn accept_all(&mut self, now: Instant) {
        loop {
            let Some(listener) = self.listener.as_ref() else { return };
            let (mut stream, addr) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE/ENFILE (or ENOBUFS): the queue still holds connections, and with
                    // edge-triggered readiness no new event may ever come for them. Shed one
                    // with the spare descriptor, and come back on a timer (issue 13).
                    self.accept_retry = Some(clock::after(now, ACCEPT_RETRY_MS));
                    self.shed_one_with_spare(&e);
                    return;
                }
            };
            self.shared.stats.connections += 1;
            let Some(peer) = peer_v4(addr) else {
                log::debug!(target: "gpa::proxy", "dropped connection from a non-IPv4 peer: {addr}");
                continue;
            };
            // Read and delete the kernel's record before anything else: an entry left behind
            // could be picked up by a later connection from the same port.
            let key = AuditKey {
                netns_cookie: self.netns_cookie,
                src_ip: u32::from(*peer.ip()).to_be(),
                src_port: peer.port(),
                pad: 0,
            };
            let taken = self
                .redirector
                .as_mut()
                .map_or(Err(NoRecord::Missing), |r| r.take_caller(&key, crate::sys::boottime_ns()));
            let record = match taken {
                Ok(record) => Some(record),
                Err(why) => {
                    if why != NoRecord::Missing {
                        log::warn!(target: "gpa::proxy", "connection without identity: peer={peer} reason={}", why.as_str());
                    }
                    None
                }
            };
            // Fair shares (issue 13): the last slots are root's; connections without identity
            // (direct connects, which can only ask a local endpoint) have a cap of their own.
            let caps = *self.shared.shares.caps();
            let over_share = match record {
                None => self.no_identity_live >= caps.identityless_connections,
                Some(r) if r.uid == 0 => false,
                Some(r) => {
                    self.free.len() <= caps.root_reserved_connections
                        || !self.shared.shares.take(r.uid, r.cgroup_id, Resource::Connection)
                }
            };
            if over_share {
                self.shared.stats.refused_reserved += 1;
                drop(stream.write(SERVER_FULL));
                continue;
            }
            let Some(index) = self.free.pop() else {
                if let Some(r) = record {
                    self.shared.shares.give_back(r.uid, r.cgroup_id, Resource::Connection);
                }
                self.shared.stats.refused_full += 1;
                drop(stream.write(SERVER_FULL));
                continue;
            };
            let caller = record.map(|r| self.resolver.resolve(r, now));
            // A caller's connection was counted in `shares` by the admission above.
            if caller.is_none() {
                self.shared.stats.without_identity += 1;
                self.no_identity_live += 1;
            }
            let token = Token(FIRST_CONNECTION + 2 * index);
            if let Err(e) = self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE) {
                log::warn!(target: "gpa::proxy", "cannot register connection: peer={peer} error={e}");
                match &caller {
                    None => self.no_identity_live = self.no_identity_live.saturating_sub(1),
                    Some(c) => self.shared.shares.give_back(c.uid(), c.record.cgroup_id, Resource::Connection),
                }
                self.free.push(index);
                continue;
            }
            log::trace!(target: "gpa::proxy", "accepted: slot={index} peer={peer} identity={}", caller.is_some());
            // Small requests and responses must not wait for delayed ACKs (Nagle).
            if let Err(e) = stream.set_nodelay(true) {
                log::debug!(target: "gpa::proxy", "TCP_NODELAY not set: {e}");
            }
            let Some(bufs) = self.slots[index].spare.take() else {
                // Every free slot holds its buffers; a slot without them is a bug, not a reason
                // to stop: refuse this connection like a full table.
                self.free.push(index);
                drop(stream.write(SERVER_FULL));
                continue;
            };
            self.slots[index].conn = Some(Box::new(Connection::new(stream, peer, caller, bufs, now)));
            self.live += 1;
            self.drive_connection(index, now, false);
        }
    }

    /// Out of descriptors: release the spare, accept one queued connection and close it at
    /// once (its caller sees a reset and retries), then take the spare back. Keeps the queue
    /// moving while the table's own connections drain.
    fn shed_one_with_spare(&mut self, error: &io::Error) {
        log::warn!(target: "gpa::proxy", "accept failed: {error}; retrying in {ACCEPT_RETRY_MS} ms");
        if self.spare_fd.take().is_none() {
            return;
        }
        if let Some(Ok((stream, _))) = self.listener.as_ref().map(TcpListener::accept) {
            self.shared.stats.refused_full += 1;
            drop(stream);
        }
        self.spare_fd = std::fs::File::open("/dev/null").ok();
    }

    fn drive_connection(&mut self, index: usize, now: Instant, timed_out: bool) {
        let Some(slot) = self.slots.get_mut(index) else { return };
        let Some(conn) = slot.conn.as_mut() else { return };
        let registry = self.poll.registry();
        let mut ctx =
            Ctx { shared: &mut self.shared, registry, upstream_token: Token(FIRST_CONNECTION + 2 * index + 1), now };
        let next = if timed_out { conn.on_timeout(&mut ctx) } else { conn.drive(&mut ctx) };
        // Take the connection out only when it is closing (a tuple pattern would take it
        // unconditionally and drop a live connection).
        match next {
            Next::Close(reason) => self.close_connection(index, reason),
            Next::Again => {
                if !self.redrive.contains(&index) {
                    self.redrive.push(index);
                }
            }
            Next::Continue(_) => {}
        }
    }

    /// Ends the connection in slot `index` and returns its buffers to the slot.
    fn close_connection(&mut self, index: usize, reason: CloseReason) {
        let Some(slot) = self.slots.get_mut(index) else { return };
        let Some(conn) = slot.conn.take() else { return };
        log::debug!(target: "gpa::proxy", "connection closed: slot={index} reason={reason:?}");
        let owner = conn.owner();
        let (bufs, body, had_upstream) = conn.into_parts(self.poll.registry());
        match owner {
            None => self.no_identity_live = self.no_identity_live.saturating_sub(1),
            Some((uid, cgroup)) => {
                self.shared.shares.give_back(uid, cgroup, Resource::Connection);
                if had_upstream {
                    self.shared.shares.give_back(uid, cgroup, Resource::Upstream);
                }
                if body.is_some() {
                    self.shared.shares.give_back(uid, cgroup, Resource::Body);
                }
            }
        }
        if let Some(body) = body {
            self.shared.pool.give_back(body);
        }
        slot.spare = Some(bufs);
        self.free.push(index);
        self.live -= 1;
        // A slot (and its descriptors) came free: if accepting had stopped for lack of either,
        // try the queue now rather than wait for an edge that may never come.
        if let Some(retry) = self.accept_retry.as_mut() {
            *retry = clock::now();
        }
    }

    fn expire(&mut self, now: Instant) {
        if self.accept_retry.is_some_and(|t| t <= now) && self.accepting {
            self.accept_retry = None;
            self.accept_all(now);
        }
        for index in std::mem::take(&mut self.redrive) {
            self.drive_connection(index, now, false);
        }
        // A draining agent has handed the host calls and the status file to its successor.
        if !self.shared.draining {
            if self.shared.keeper.deadline() <= now {
                self.drive_keeper(now);
            }
            if self.shared.telemetry.as_ref().is_some_and(|t| t.deadline() <= now) {
                self.drive_telemetry(now);
            }
            if self.next_status <= now {
                self.shared.write_status_file();
                self.next_status = now + Duration::from_secs(self.config.status_interval_secs);
            }
        }
        if self.live == 0 {
            return;
        }
        for index in 0..self.slots.len() {
            if self.slots[index].conn.as_ref().is_some_and(|c| c.deadline() <= now) {
                self.drive_connection(index, now, true);
            }
        }
    }
}

/// Creates the customer rules folder 0700 and closes it to others if it exists (MSP §2.1);
/// `policy::local_rules` refuses files in a folder that is not.
fn secure_rules_dir(dir: &std::path::Path) {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let made = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
    let fixed = made.and_then(|()| {
        let meta = std::fs::symlink_metadata(dir)?;
        if meta.is_dir() && meta.uid() == crate::sys::geteuid() && meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    });
    if let Err(e) = fixed {
        log::warn!(target: "gpa::loop", "rules folder {} not secured: {e}", dir.display());
    }
}

/// The proxy listener: the early agent's own socket when it offers one (hand-over), else a
/// fresh bind. Returns the listener, the line to the early agent, and whether the socket is
/// shared with it.
fn listener_for(
    config: &ValidatedConfig,
    attempts: u32,
) -> Result<(TcpListener, Option<crate::handover::Taker>, bool), StartError> {
    // Without pins the early agent's programs and maps would go with it: nothing to adopt.
    if let (false, Some(path), Some(_)) = (config.early, &config.handover_socket, &config.pin_dir) {
        match crate::handover::take(path, config.listen) {
            Ok(Some(taken)) => {
                logger::milestone(&format!("taking over from the early agent (pid {})", taken.taker.early_pid));
                return Ok(match taken.listener {
                    Some(shared) => (TcpListener::from_std(shared), Some(taken.taker), true),
                    None => (bind_listener(config.listen, attempts)?, Some(taken.taker), false),
                });
            }
            Ok(None) => {}
            Err(e) => log::warn!(target: "gpa::handover", "no hand-over from {}: {e}", path.display()),
        }
    }
    Ok((bind_listener(config.listen, attempts)?, None, false))
}

/// Early agent: listen for the agent that will take over (only with pinning, which is what
/// lets the successor adopt the programs and maps).
fn offer_handover(config: &ValidatedConfig, poll: &Poll) -> Handover {
    let (Some(path), Some(_)) = (&config.handover_socket, &config.pin_dir) else {
        log::warn!(target: "gpa::handover", "no listener hand-over: it needs handoverSocket and pinPath");
        return Handover::None;
    };
    match crate::handover::Offer::bind(path) {
        Ok(mut offer) => match poll.registry().register(offer.listener(), HANDOVER_OFFER, Interest::READABLE) {
            Ok(()) => {
                logger::milestone(&format!("offering the listener for hand-over on {}", path.display()));
                Handover::Offering(offer)
            }
            Err(e) => {
                log::warn!(target: "gpa::handover", "no listener hand-over: {e}");
                Handover::None
            }
        },
        Err(e) => {
            log::warn!(target: "gpa::handover", "no listener hand-over on {}: {e}", path.display());
            Handover::None
        }
    }
}

/// Binds `addr`, `attempts` times 500 ms apart.
fn bind_listener(addr: SocketAddrV4, attempts: u32) -> Result<TcpListener, StartError> {
    // MSP §5.1: a busy port is retried (an old instance may still be exiting).
    let mut last = None;
    for attempt in 1..=attempts {
        match crate::sys::listen_tcp(addr, LISTEN_BACKLOG) {
            Ok(l) => return Ok(TcpListener::from_std(l)),
            Err(e) => last = Some(e),
        }
        if attempt < attempts {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let last = last.unwrap_or_else(|| io::Error::other("bind failed"));
    if last.kind() != io::ErrorKind::AddrInUse {
        return Err(StartError::Bind(addr, last));
    }
    // Someone else holds the port (a squatter, or a stuck process). The kernel redirects only
    // to this agent's own socket, wherever it listens, so take a free port on the same address
    // rather than leave the callers unprotected; the holder never receives a caller.
    let holders = crate::listener::owners_now(addr);
    let l = crate::sys::listen_tcp(SocketAddrV4::new(*addr.ip(), 0), LISTEN_BACKLOG)
        .map_err(|e| StartError::Bind(addr, e))?;
    let actual = l.local_addr().map_err(|e| StartError::Bind(addr, e))?;
    log::error!(
        target: "gpa::loop",
        "listenAddress {addr} is held by another socket (owner uid {holders:?}); listening on {actual} instead. \
         Redirected callers reach only this agent; find the holder with `ss -ltnp`"
    );
    Ok(TcpListener::from_std(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_body_buffers_are_roots() {
        let mut pool = BodyPool::new();
        let mut held = Vec::new();
        while let Some(b) = pool.take(false) {
            held.push(b);
        }
        assert_eq!(held.len(), BODY_BUFFERS - ROOT_RESERVED_BODY_BUFFERS, "others stop at the reserve");
        while let Some(b) = pool.take(true) {
            held.push(b);
        }
        assert_eq!(held.len(), BODY_BUFFERS, "root gets the reserve");
        pool.give_back(held.pop().expect("one"));
        assert!(pool.take(false).is_none(), "a freed reserved buffer is still root's");
        assert!(pool.take(true).is_some());
    }
}
