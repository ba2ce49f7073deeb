// SPDX-License-Identifier: MIT
//! The proxy: one thread, one `mio` loop, a fixed table of connections.
//!
//! A request's way through the files of this folder:
//!
//! ```text
//! mod.rs         accept: the kernel's record of the connect, fair shares, a table slot
//! connection/    the state machine: request.rs (head, MSP §5.4 checks, body), forward.rs
//!                (endorse, connect, send), response.rs (relay, the proxy's own answers)
//! gate.rs        what a connection may ask: the trait, and the request's types
//! services.rs    the real gate: authorize, endorse, account (summaries, audit), shares
//! local.rs       the endpoints the listener answers itself (/provision, ...)
//! upstream.rs    the upstream request head, written and signed header by header
//! upstream_pool.rs  idle upstream connections kept between client connections
//! body_pool.rs   the shared request body buffers
//! shares.rs      per-uid and per-cgroup caps
//! startup.rs     bind, attach, harden, and the retries of a failed start step
//! handover.rs    passing the listener from the early agent to its successor
//! scripted.rs    a connection driven by a byte script (fuzzing and its seeds; not built
//!                into the agent)
//! ```
//!
//! Event sources, each with a reserved token: the listener, the signalfd (SIGTERM, SIGINT,
//! SIGHUP), the key keeper's host call, the telemetry uploader's host call, the hand-over
//! sockets; connections use two tokens per table slot from [`FIRST_CONNECTION`] (client,
//! then upstream). Time is read once per turn and the poll timeout is the nearest deadline of
//! any connection, the key keeper, the telemetry uploader or the status timer.

mod body_pool;
pub mod connection;
pub mod gate;
mod handover;
mod local;
#[cfg(any(test, feature = "fuzzing"))]
pub mod scripted;
mod services;
mod shares;
pub mod startup;
pub mod upstream;
pub(crate) mod upstream_pool;

use std::io::{self, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};

use self::connection::{Buffers, CloseReason, Connection, Ctx, Next};
use self::handover::{Advance, Handover};
use self::services::Services;
use self::shares::Resource;
use crate::audit::derive_checkpoint_key;
use crate::config::{RedirectPolicy, ValidatedConfig};
use crate::identity::Resolver;
use crate::limits::{ACCEPT_RETRY_MS, EVENTS_PER_TURN};
use crate::redirect::{AuditKey, Endpoint, NoRecord, Redirector};
use crate::sys::{Signal, SignalFd};
use crate::{clock, logger};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const KEEPER: Token = Token(2);
const TELEMETRY: Token = Token(3);
/// The early agent's hand-over socket, and the taker connected to it (crate::handover).
const HANDOVER_OFFER: Token = Token(4);
const HANDOVER_PEER: Token = Token(5);
/// Connection tokens start here: slot `i` uses `FIRST_CONNECTION + 2i` (client) and `+ 1`
/// (upstream).
pub const FIRST_CONNECTION: usize = 16;

/// Sent when the table is full (never queued, MSP §11 item 5).
const SERVER_FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// One slot of the connection table.
#[derive(Debug, Default)]
struct Slot {
    /// Boxed so the table itself stays small (a few words per slot) however many slots.
    conn: Option<Box<Connection>>,
    /// The slot's buffers while no connection uses them.
    spare: Option<Buffers>,
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
    services: Services,
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
    /// evidence an operator looks for first).
    fn audit_event(&mut self, event: &str, detail: &str) {
        if let Some(audit) = self.services.audit.as_mut() {
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
            if let Some(audit) = self.services.audit.as_mut()
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
        self.handover.offer_listener(self.poll.registry(), HANDOVER_PEER, self.listener.as_ref(), self.listen);
    }

    /// Early agent: the taker said something; when it says stop, stop accepting (the
    /// successor accepts from the same socket) and finish the open connections.
    fn read_taker(&mut self, now: Instant) {
        let Some(successor) = self.handover.read_taker() else { return };
        if self.accepting
            && let Some(listener) = self.listener.as_mut()
        {
            drop(self.poll.registry().deregister(listener));
            self.accepting = false;
        }
        let wait_ms =
            crate::limits::IDLE_TIMEOUT_MS.max(self.config.upstream_timeout_ms) + crate::limits::DRAIN_GRACE_MS;
        self.handover.drain(successor, self.live, wait_ms, now);
        self.services.draining = true;
    }

    /// Moves the hand-over along; `true` when this agent has handed over and is done.
    fn advance_handover(&mut self, now: Instant) -> bool {
        let ready = self.services.keeper.ready();
        match self.handover.advance(now, ready, self.live) {
            Advance::Wait => false,
            Advance::TakeOver { taker, started } => {
                if !self.accepting
                    && let Some(listener) = self.listener.as_mut()
                {
                    match self.poll.registry().register(listener, LISTENER, Interest::READABLE) {
                        Ok(()) => self.accepting = true,
                        Err(e) => log::error!(target: "gpa::handover", "cannot accept on the shared listener: {e}"),
                    }
                }
                handover::finish_takeover(taker, started, now, ready);
                false
            }
            Advance::Done => true,
        }
    }

    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut next = match self.handover.deadline() {
            // A draining agent waits only for its connections and the drain deadline.
            Some(deadline) if self.handover.is_draining() => deadline,
            handover => {
                let mut timers = self.services.keeper.deadline().min(self.next_status);
                if let Some(t) = &self.services.telemetry {
                    timers = timers.min(t.deadline());
                }
                handover.map_or(timers, |d| timers.min(d))
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
        let changes = self.services.keeper.drive(self.poll.registry(), KEEPER, now);
        if changes.status {
            self.services.refresh_policy();
            // The document parse ran deep on the stack; do not keep those pages resident.
            crate::sys::trim_stack();
        }
        if changes.routes {
            self.apply_routes();
            // Checkpoints of the audit chain are MAC'd with a key derived from the latched key.
            let checkpoint = self.services.keeper.key().map(|k| derive_checkpoint_key(|label| k.mac(label)));
            if let Some(audit) = self.services.audit.as_mut() {
                audit.set_checkpoint_key(checkpoint);
            }
            let guid: Option<String> = self.services.keeper.key_doc().map(|d| d.guid.as_str().to_owned());
            if guid != self.audited_key {
                let detail = guid.as_deref().map_or_else(|| "none held".to_owned(), |g| format!("guid {g}"));
                self.audit_event(if guid.is_some() { "key-latched" } else { "key-dropped" }, &detail);
                self.audited_key = guid;
            }
        }
        if self.services.keeper.ready() {
            self.services.provision.key_latch_ready(self.services.keeper.ready_at_unix_ns());
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
        let Services { telemetry, keeper, .. } = &mut self.services;
        if let Some(t) = telemetry.as_mut() {
            t.drive(self.poll.registry(), TELEMETRY, now, keeper);
        }
    }

    /// Installs or removes each endpoint's route: one source of truth, the endpoint modes of
    /// the latest status document (MSP §11 item 7), applied once the key latch is ready.
    fn apply_routes(&mut self) {
        let all = self.config.redirect == RedirectPolicy::All;
        if !all && !self.services.keeper.ready() {
            return;
        }
        let endpoints = [
            (Endpoint::WireServer, self.config.wire_server),
            (Endpoint::Imds, self.config.imds),
            (Endpoint::HostGaPlugin, self.config.host_ga_plugin),
        ];
        for (i, (endpoint, destination)) in endpoints.into_iter().enumerate() {
            let want = all || !self.services.keeper.mode(endpoint).is_disabled();
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
            self.services.stats.connections += 1;
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
            let caps = *self.services.shares.caps();
            let over_share = match record {
                None => self.no_identity_live >= caps.identityless_connections,
                Some(r) if r.uid == 0 => false,
                Some(r) => {
                    self.free.len() <= caps.root_reserved_connections
                        || !self.services.shares.take(r.uid, r.cgroup_id, Resource::Connection)
                }
            };
            if over_share {
                self.services.stats.refused_reserved += 1;
                drop(stream.write(SERVER_FULL));
                continue;
            }
            let Some(index) = self.free.pop() else {
                if let Some(r) = record {
                    self.services.shares.give_back(r.uid, r.cgroup_id, Resource::Connection);
                }
                self.services.stats.refused_full += 1;
                drop(stream.write(SERVER_FULL));
                continue;
            };
            let caller = record.map(|r| self.resolver.resolve(r, now));
            // A caller's connection was counted in `shares` by the admission above.
            if caller.is_none() {
                self.services.stats.without_identity += 1;
                self.no_identity_live += 1;
            }
            let token = Token(FIRST_CONNECTION + 2 * index);
            if let Err(e) = self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE) {
                log::warn!(target: "gpa::proxy", "cannot register connection: peer={peer} error={e}");
                match &caller {
                    None => self.no_identity_live = self.no_identity_live.saturating_sub(1),
                    Some(c) => self.services.shares.give_back(c.uid(), c.record.cgroup_id, Resource::Connection),
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
            self.services.stats.refused_full += 1;
            drop(stream);
        }
        self.spare_fd = std::fs::File::open("/dev/null").ok();
    }

    fn drive_connection(&mut self, index: usize, now: Instant, timed_out: bool) {
        let Some(slot) = self.slots.get_mut(index) else { return };
        let Some(conn) = slot.conn.as_mut() else { return };
        let registry = self.poll.registry();
        let mut ctx =
            Ctx { gate: &mut self.services, registry, upstream_token: Token(FIRST_CONNECTION + 2 * index + 1), now };
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
        // Its body buffer and upstream go back through the gate; its slot here.
        let owner = conn.owner();
        let bufs = conn.close(&mut self.services, self.poll.registry(), clock::now());
        match owner {
            None => self.no_identity_live = self.no_identity_live.saturating_sub(1),
            Some((uid, cgroup)) => self.services.shares.give_back(uid, cgroup, Resource::Connection),
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
        self.services.upstream_pool.expire(now);
        if self.accept_retry.is_some_and(|t| t <= now) && self.accepting {
            self.accept_retry = None;
            self.accept_all(now);
        }
        for index in std::mem::take(&mut self.redrive) {
            self.drive_connection(index, now, false);
        }
        // A draining agent has handed the host calls and the status file to its successor.
        if !self.services.draining {
            if self.services.keeper.deadline() <= now {
                self.drive_keeper(now);
            }
            if self.services.telemetry.as_ref().is_some_and(|t| t.deadline() <= now) {
                self.drive_telemetry(now);
            }
            if self.next_status <= now {
                self.services.write_status_file();
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

/// The peer of an accepted socket as IPv4 (the listener is IPv4 loopback only).
fn peer_v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().map(|ip| SocketAddrV4::new(ip, a.port())),
    }
}
