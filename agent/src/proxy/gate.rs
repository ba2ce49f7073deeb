// SPDX-License-Identifier: MIT
//! The gate: everything a [`Connection`](super::connection::Connection) may ask of the rest of
//! the agent, and nothing more.
//!
//! A connection parses, frames and relays; every decision and every scarce resource is behind
//! this trait: local endpoints, authorization, endorsement (key and host date), body buffers,
//! upstream connections (and the caller's share of them), the audit record, and the two
//! limits that change at run time. The event loop lends its [`Services`](super::services)
//! through it; the unprivileged tests in `agent/tests/` lend a fake one, so the state
//! machine is exercised over real sockets without root, eBPF or a host.

use std::io;
use std::net::SocketAddrV4;
use std::time::Instant;

use crate::http::RequestHead;
use crate::identity::Caller;
use crate::limits::{EXCHANGE_METHOD_MAX_BYTES, EXCHANGE_PATH_MAX_BYTES};
use crate::msp::signing::SigningKey;
use crate::policy::canonical::AmbiguousTarget;
use crate::redirect::Endpoint;

/// What a connection may ask while it serves one request.
pub trait Gate {
    /// Time the upstream has for its response head, and the longest gap inside a response.
    fn upstream_timeout_ms(&self) -> u64;
    /// Handing over to another agent: finish each exchange, keep no connection alive.
    fn draining(&self) -> bool;
    /// A request head was read (`proxyConnectionsCount`).
    fn count_request(&mut self);
    /// The answer to a local endpoint (`/provision`, ...), or `None` for every other target.
    fn local_endpoint(
        &mut self,
        head: &RequestHead,
        req: &[u8],
        caller: Option<&Caller>,
        now: Instant,
    ) -> Option<LocalResponse>;
    /// The allowlist decision for a request.
    fn authorize(&mut self, caller: &Caller, method: &[u8], target: &[u8]) -> Verdict;
    /// How an authorized request goes upstream.
    fn endorsement(&self, route: &Route, method: &[u8], target: &[u8]) -> Endorse<'_>;
    /// `x-ms-azure-host-date` now.
    fn host_date(&self) -> heapless::String<29>;
    /// A request waits for the key latch: have it polled for soon.
    fn hold_for_key(&mut self, now: Instant);
    /// A request went upstream signed.
    fn count_signed(&mut self);
    /// A buffer for a request body, within the caller's share; `None`: answer `503`.
    fn take_body(&mut self, route: &Route) -> Option<Box<[u8]>>;
    /// Returns a buffer from [`Gate::take_body`].
    fn give_back_body(&mut self, route: &Route, body: Box<[u8]>);
    /// One upstream connection within the caller's share; `false`: answer `503`.
    fn take_upstream(&mut self, route: &Route) -> bool;
    /// Returns a share from [`Gate::take_upstream`].
    fn give_back_upstream(&mut self, route: &Route);
    /// An upstream connection to the route's destination, exempt from the redirect: an idle
    /// one kept from an earlier exchange (`true`: it may have gone stale) unless `fresh` is
    /// asked, else a new non-blocking connect (`false`).
    fn connect(&mut self, route: &Route, fresh: bool, now: Instant) -> io::Result<(std::net::TcpStream, bool)>;
    /// Takes back an idle upstream whose last exchange ended cleanly, for the next request to
    /// the same destination from any caller (or closes it).
    fn park_upstream(&mut self, route: &Route, stream: std::net::TcpStream, now: Instant);
    /// Accounts one answered (or abandoned) request: counters, summaries, the audit trail.
    fn record(&mut self, caller: Option<&Caller>, peer: SocketAddrV4, exchange: &Exchange, now: Instant);
}

/// Where an identified caller's request goes, and under which account its resources are
/// counted: fixed for the connection (one connect, one caller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The caller's real uid (shares are per uid).
    pub uid: u32,
    /// The caller's cgroup (shares are also per cgroup).
    pub cgroup: u64,
    /// The endpoint the connect was headed for.
    pub endpoint: Endpoint,
    /// The address the caller asked for (the upstream).
    pub destination: SocketAddrV4,
    /// uid 0 (`isRoot` claim, root reserves).
    pub is_root: bool,
}

impl Route {
    /// The route of `caller`'s connection.
    pub fn of(caller: &Caller) -> Self {
        Self {
            uid: caller.uid(),
            cgroup: caller.record.cgroup_id,
            endpoint: Endpoint::from_raw(caller.record.endpoint),
            destination: caller.record.original_destination(),
            is_root: caller.is_root(),
        }
    }
}

/// How a request goes upstream.
#[derive(Clone, Copy, Debug)]
pub enum Endorse<'a> {
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

/// What the checks decided about a request; the audit trail and the summaries use
/// [`Decision::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Refused before authorization: method, traversal, framing, limits.
    Refused,
    /// A target the allowlist and the upstream could read differently (issue 12).
    Ambiguous(AmbiguousTarget),
    /// Answered by the listener itself.
    Local,
    /// No kernel record for the connection: `421`.
    NoIdentity,
    /// Allowed and forwarded.
    Allow,
    /// Denied by rules in audit mode, forwarded.
    AuditDeny,
    /// Denied: `403`.
    Deny,
    /// Allowed, but the proxy or the upstream failed (`5xx` of ours).
    Error,
    /// The head was read, the request never answered (the client went away).
    Abandoned,
}

impl Decision {
    /// The audit trail's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Ambiguous(why) => why.as_str(),
            Self::Local => "local",
            Self::NoIdentity => "no-identity",
            Self::Allow => "allow",
            Self::AuditDeny => "audit-deny",
            Self::Deny => "deny",
            Self::Error => "error",
            Self::Abandoned => "abandoned",
        }
    }
}

/// Per-request facts kept after the head bytes are gone (for the response and the audit
/// record).
#[derive(Clone, Debug)]
pub struct Exchange {
    /// When the head was complete.
    pub started: Instant,
    /// A `HEAD` request (its response has no body whatever it says).
    pub is_head: bool,
    /// The connection ends after this exchange.
    pub close: bool,
    /// The status answered; 0 while none (and for an abandoned request).
    pub status: u16,
    /// The request method, cut to fit.
    pub method: heapless::Vec<u8, EXCHANGE_METHOD_MAX_BYTES>,
    /// Path without the query (queries can carry secrets), cut to fit.
    pub path: heapless::Vec<u8, EXCHANGE_PATH_MAX_BYTES>,
    /// What the checks decided.
    pub decision: Decision,
}

/// An answer generated by the listener.
#[derive(Debug)]
pub struct LocalResponse {
    /// HTTP status.
    pub status: u16,
    /// A whole `content-type` header line, or empty.
    pub content_type: &'static [u8],
    /// The body.
    pub body: String,
    /// Close the connection after it.
    pub close: bool,
}
