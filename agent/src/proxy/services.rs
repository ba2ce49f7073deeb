// SPDX-License-Identifier: MIT
//! The services the loop lends its connections: the real [`Gate`].
//!
//! Authorization (the allowlist, per request), endorsement (the latched key and host date),
//! the accounting of each answered request (counters, connection summaries, the audit
//! trail), the status document, and the caller's shares of body buffers and upstreams.

use std::io;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::time::Instant;

use super::body_pool::BodyPool;
use super::gate::{Decision, Endorse, Exchange, Gate, LocalResponse, Route, Verdict};
use super::shares::{Resource, Shares};
use super::upstream_pool::UpstreamPool;
use crate::audit::{AuditRecord, AuditTrail};
use crate::clock;
use crate::http::RequestHead;
use crate::identity::Caller;
use crate::limits::{GROUPS_PER_USER, KEY_LATCH_HOLD_POLL_MS};
use crate::msp::key_keeper::KeyKeeper;
use crate::policy::decide::{CallerView, Outcome};
use crate::policy::{Policy, snapshot};
use crate::redirect::Endpoint;
use crate::status::{KeyLatchStates, ModuleStatus, StatusInputs, StatusWriter, Summaries, SummaryKind, SummaryRecord};
use crate::telemetry::Uploader;

/// Counters since start.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Stats {
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

/// What the loop owns and the connections reach through [`Gate`]: the allowlist, the key
/// keeper, the audit trail, summaries and status, the fair shares and the body pool.
#[derive(Debug)]
pub(crate) struct Services {
    pub(crate) pool: BodyPool,
    /// Idle upstream connections between client connections (issue 17).
    pub(crate) upstream_pool: UpstreamPool,
    pub(crate) agent_mark: u32,
    /// Time the upstream has for its response head, and the longest gap inside a response.
    pub(crate) upstream_timeout_ms: u64,
    /// Counters.
    pub stats: Stats,
    pub(crate) keeper: KeyKeeper,
    pub(crate) provision: Provision,
    pub(crate) policy: Policy,
    /// Customer local rule files (MSP §4.7).
    pub(crate) rules_dir: PathBuf,
    /// The per-request audit trail; `None` if it could not be opened (logged at start).
    pub(crate) audit: Option<AuditTrail>,
    /// Per-uid and per-cgroup holdings of connections, body buffers and upstreams.
    pub(crate) shares: Shares,
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
    pub(crate) fn starting(message: &str) -> Self {
        Self { message: message.to_owned(), failed: false }
    }

    pub(crate) fn module_status(&self) -> ModuleStatus<'_> {
        if self.failed { ModuleStatus::stopped(&self.message) } else { ModuleStatus::running(&self.message) }
    }

    pub(crate) fn succeeded(&mut self, message: String) {
        self.message = message;
        self.failed = false;
    }

    /// Records a failure; `true` for the first one since the step last succeeded.
    pub(crate) fn record_failure(&mut self, message: String) -> bool {
        self.message = message;
        !std::mem::replace(&mut self.failed, true)
    }
}

/// Provisioning readiness (§2.8): the listener is ready once the loop runs; the redirector
/// reports a failed attach (finished with its error); the key latch reports when it is.
#[derive(Debug)]
pub(crate) struct Provision {
    pub(crate) started: Instant,
    pub(crate) finished_unix_ns: u64,
}

impl Provision {
    pub(crate) fn new(now: Instant) -> Self {
        Self { started: now, finished_unix_ns: 0 }
    }

    pub(crate) fn key_latch_ready(&mut self, at_unix_ns: u64) {
        self.finished_unix_ns = at_unix_ns;
    }
}

impl Services {
    /// How to endorse a request (MSP §3.1, §3.7). Unsigned only when the host does not
    /// require a signature for it: skip-listed, or MSP / the endpoint's mode known to be off.
    /// A redirected request while the state is still unknown or the key not yet latched (for
    /// example right after a restart that adopted pinned routes) is not forwarded unsigned:
    /// it is held for the latch, then answered `429` — fail closed, never a silent unsigned
    /// pass.
    fn endorsement_for(&self, route: &Route, method: &[u8], target: &[u8]) -> Endorse<'_> {
        if crate::policy::decide::is_skip_listed(route.endpoint, method, target) {
            return Endorse::Unsigned;
        }
        if let Some(key) = self.keeper.key() {
            return Endorse::Sign(key);
        }
        match self.keeper.summary() {
            Some(s) if s.is_disabled() || self.keeper.mode(route.endpoint).is_disabled() => Endorse::Unsigned,
            _ => Endorse::NotReady,
        }
    }

    /// The allowlist decision for a request (MSP §4.3–§4.5, evaluated per request against the
    /// installed rules).
    fn authorize_request(&mut self, caller: &Caller, method: &[u8], target: &[u8]) -> Verdict {
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
    fn summarise(&mut self, caller: Option<&Caller>, peer: SocketAddrV4, exchange: &Exchange) {
        if exchange.decision == Decision::Local || exchange.status == 413 {
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
            Decision::NoIdentity => record(&mut self.summaries, SummaryKind::FailedAuthenticate, exchange.status),
            Decision::Deny => {
                record(&mut self.summaries, SummaryKind::FailedAuthenticate, 403);
                record(&mut self.summaries, SummaryKind::ProxyConnection, 403)
            }
            Decision::AuditDeny => {
                record(&mut self.summaries, SummaryKind::FailedAuthenticate, 403);
                record(&mut self.summaries, SummaryKind::ProxyConnection, exchange.status)
            }
            _ => record(&mut self.summaries, SummaryKind::ProxyConnection, exchange.status),
        };
        if recorded.first_in_bucket {
            log::info!(target: "gpa::proxy", "connection summary: new bucket pid={} status={} decision={}", caller.map_or(0, Caller::pid), exchange.status, exchange.decision.as_str());
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
    pub(crate) fn write_status_file(&mut self) {
        let Some(len) = self.render_status(usize::MAX).map(<[u8]>::len) else { return };
        if let Err(e) = self.status_writer.write(&self.status_buf[..len]) {
            log::warn!(target: "gpa::loop", "status file not written: {e:?}");
        }
    }

    /// Re-applies the allowlist from the latest status document (and the local rule files);
    /// the policy swaps an endpoint's rules only when their content changed.
    pub(crate) fn refresh_policy(&mut self) {
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
                .and_then(|_| snapshot::prune_snapshots(&self.log_dir, snapshot::SNAPSHOTS_KEPT));
            if let Err(e) = written {
                log::warn!(target: "gpa::loop", "rules snapshot not written: {e}");
            }
        }
    }

    /// Accounts one answered request: counters and one audit record (written at the end of
    /// the loop turn).
    fn record_exchange(&mut self, caller: Option<&Caller>, peer: SocketAddrV4, exchange: &Exchange, now: Instant) {
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
        if caller.is_none() && exchange.decision == Decision::Local {
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
            endpoint: if exchange.decision == Decision::Local {
                "local"
            } else {
                endpoint.map_or("unknown", Endpoint::name)
            },
            method: &exchange.method,
            path: &exchange.path,
            decision: exchange.decision.as_str(),
            mode: endpoint.map_or("none", |e| self.keeper.mode(e).as_str()),
            status: exchange.status,
            latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
        };
        audit.record(&rec, now);
    }
}

impl Gate for Services {
    fn upstream_timeout_ms(&self) -> u64 {
        self.upstream_timeout_ms
    }

    fn draining(&self) -> bool {
        self.draining
    }

    fn count_request(&mut self) {
        self.stats.requests += 1;
    }

    fn local_endpoint(
        &mut self,
        head: &RequestHead,
        req: &[u8],
        caller: Option<&Caller>,
        now: Instant,
    ) -> Option<LocalResponse> {
        self.answer_local(head, req, caller, now)
    }

    fn authorize(&mut self, caller: &Caller, method: &[u8], target: &[u8]) -> Verdict {
        self.authorize_request(caller, method, target)
    }

    fn endorsement(&self, route: &Route, method: &[u8], target: &[u8]) -> Endorse<'_> {
        self.endorsement_for(route, method, target)
    }

    fn host_date(&self) -> heapless::String<29> {
        self.keeper.host_date()
    }

    fn hold_for_key(&mut self, now: Instant) {
        self.keeper.poll_within(now, std::time::Duration::from_millis(KEY_LATCH_HOLD_POLL_MS));
    }

    fn count_signed(&mut self) {
        self.stats.signed += 1;
    }

    fn take_body(&mut self, route: &Route) -> Option<Box<[u8]>> {
        // The caller's share first, then the pool itself (its last buffers are root's).
        if !self.shares.take(route.uid, route.cgroup, Resource::Body) {
            return None;
        }
        let body = self.pool.take(route.is_root);
        if body.is_none() {
            self.shares.give_back(route.uid, route.cgroup, Resource::Body);
        }
        body
    }

    fn give_back_body(&mut self, route: &Route, body: Box<[u8]>) {
        self.shares.give_back(route.uid, route.cgroup, Resource::Body);
        self.pool.give_back(body);
    }

    fn take_upstream(&mut self, route: &Route) -> bool {
        self.shares.take(route.uid, route.cgroup, Resource::Upstream)
    }

    fn give_back_upstream(&mut self, route: &Route) {
        self.shares.give_back(route.uid, route.cgroup, Resource::Upstream);
    }

    fn connect(&mut self, route: &Route, fresh: bool, now: Instant) -> io::Result<(std::net::TcpStream, bool)> {
        if !fresh && let Some(idle) = self.upstream_pool.take(route.destination, now) {
            return Ok((idle, true));
        }
        crate::sys::connect_marked(route.destination, self.agent_mark).map(|s| (s, false))
    }

    fn park_upstream(&mut self, route: &Route, stream: std::net::TcpStream, now: Instant) {
        self.upstream_pool.put(route.destination, stream, now);
    }

    fn record(&mut self, caller: Option<&Caller>, peer: SocketAddrV4, exchange: &Exchange, now: Instant) {
        self.record_exchange(caller, peer, exchange, now);
    }
}
