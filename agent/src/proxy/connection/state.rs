// SPDX-License-Identifier: MIT
//! The connection and its states: each state holds exactly the data its step needs, so an
//! upstream, a body buffer or a parsed head is never missing where it is used; and what an
//! ended state holds goes back through the gate.

use std::io::{self, Read};
use std::net::SocketAddrV4;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Registry, Token};

use super::body::{BufferedBody, Outgoing, Streamed};
use super::buffers::Buffers;
use crate::clock;
use crate::http::{ChunkedDecoder, RequestHead};
use crate::identity::Caller;
use crate::limits::{CLIENT_HEAD_TIMEOUT_MS, NO_IDENTITY_HEAD_TIMEOUT_MS};
use crate::proxy::gate::{Exchange, Gate, Route};

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

/// An upstream connection and the caller whose share it is counted in.
#[derive(Debug)]
pub(super) struct Upstream {
    pub(super) stream: TcpStream,
    pub(super) route: Route,
    /// Kept alive from an earlier request (the host may have closed it meanwhile).
    pub(super) reused: bool,
    /// A streamed body went up on it in the client's own framing: never kept for another
    /// request (the pool would carry one caller's framing into another caller's exchange).
    pub(super) carried_client_framing: bool,
}

/// The serialised request on its way up: the head in the slot's `up` buffer, then the body.
#[derive(Debug)]
pub(super) struct Sending {
    /// Safe to send again if the upstream turns out stale (RFC 9110 §9.2.2).
    pub(super) idempotent: bool,
    pub(super) up_len: usize,
    pub(super) up_sent: usize,
    pub(super) body: Outgoing,
    pub(super) body_sent: usize,
}

impl Sending {
    /// The head and the whole body have been written upstream.
    pub(super) fn sent_whole(&self) -> bool {
        let body_len = if let Outgoing::Buffered(b) = &self.body { b.len } else { 0 };
        self.up_sent == self.up_len && self.body_sent == body_len
    }
}

/// Where a connection is, with exactly the data that step needs: a state that would need an
/// upstream, a body buffer or a parsed head has it, so none can be missing.
#[derive(Debug)]
pub(super) enum State {
    /// Waiting for a complete request head (first request or keep-alive).
    ReadingHead,
    /// Reading a body into a pool buffer (it must be complete before it can be signed).
    ReadingBody { head: RequestHead, body: BufferedBody },
    /// Authorized, waiting for the key latch before it can be signed (bounded).
    HeldForKey { head: RequestHead, route: Route, body: Outgoing },
    /// Non-blocking connect to the original destination in flight.
    Connecting { up: Upstream, send: Sending },
    /// Writing the serialised head (and a buffered body) upstream.
    SendingRequest { up: Upstream, send: Sending },
    /// Relaying a skip-listed body from the client to the upstream as it arrives.
    StreamingBody { up: Upstream, streamed: Streamed },
    /// Waiting for the upstream response head. `replay`: the request as sent on a kept-alive
    /// upstream, to send again once on a fresh one if the host had closed it.
    AwaitingResponse { up: Upstream, replay: Option<Sending> },
    /// Streaming the response to the client.
    Relaying { up: Upstream, remaining: Remaining, keep_alive: bool },
    /// Writing a response the proxy generated itself.
    WritingLocal { close: bool },
    /// Between two steps: the state is out being worked on, or the connection has ended.
    Closed,
}

impl State {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::ReadingHead => "ReadingHead",
            Self::ReadingBody { .. } => "ReadingBody",
            Self::HeldForKey { .. } => "HeldForKey",
            Self::Connecting { .. } => "Connecting",
            Self::SendingRequest { .. } => "SendingRequest",
            Self::StreamingBody { .. } => "StreamingBody",
            Self::AwaitingResponse { .. } => "AwaitingResponse",
            Self::Relaying { .. } => "Relaying",
            Self::WritingLocal { .. } => "WritingLocal",
            Self::Closed => "Closed",
        }
    }
}

/// Where the response being relayed ends.
#[derive(Clone, Copy, Debug)]
pub(super) enum Remaining {
    Bytes(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

/// Outcome of one step of the state machine.
pub(super) enum Step {
    /// Something changed: run again.
    Progress,
    /// Waiting for readiness.
    Blocked,
    /// Done with this connection.
    Close(CloseReason),
}

/// What the event loop should do next with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Keep it; wake it at the deadline.
    Continue(Instant),
    /// Keep it and drive it again on the loop's next turn (its step budget ran out).
    Again,
    /// Remove it.
    Close(CloseReason),
}

/// What a deadline calls for, by state.
pub(super) enum Expiry {
    Close(CloseReason),
    Answer(u16),
    RetryLater,
}

/// One proxied client connection.
#[derive(Debug)]
pub struct Connection {
    pub(super) client: TcpStream,
    pub(super) peer: SocketAddrV4,
    pub(super) caller: Option<Caller>,
    pub(super) state: State,
    pub(super) deadline: Instant,
    pub(super) bufs: Buffers,
    /// Client bytes in `bufs.req`.
    pub(super) req_len: usize,
    /// `req_len` when the head was last parsed (no new bytes: no new parse).
    pub(super) parsed_len: usize,
    /// Response bytes in `bufs.resp` not yet written to the client: `resp_start..resp_len`.
    pub(super) resp_start: usize,
    pub(super) resp_len: usize,
    /// A kept-alive upstream while no request uses it.
    pub(super) parked: Option<Upstream>,
    /// The request being served, from its head until it is recorded.
    pub(super) exchange: Option<Exchange>,
}

/// What the event loop lends a connection for one drive.
#[derive(Debug)]
pub struct Ctx<'a, G> {
    /// Decisions and resources.
    pub gate: &'a mut G,
    /// Where the upstream socket is registered.
    pub registry: &'a Registry,
    /// Token of the upstream socket of this slot.
    pub upstream_token: Token,
    /// The loop's time for this turn.
    pub now: Instant,
}

impl Connection {
    /// A connection accepted from `peer`; `caller` is who the kernel says made it, `None` for
    /// a direct connect (which can only ask a local endpoint).
    pub fn new(client: TcpStream, peer: SocketAddrV4, caller: Option<Caller>, bufs: Buffers, now: Instant) -> Self {
        // Without identity only a local endpoint can be asked: one short request.
        let head_ms = if caller.is_some() { CLIENT_HEAD_TIMEOUT_MS } else { NO_IDENTITY_HEAD_TIMEOUT_MS };
        Self {
            client,
            peer,
            caller,
            state: State::ReadingHead,
            deadline: clock::after(now, head_ms),
            bufs,
            req_len: 0,
            parsed_len: usize::MAX,
            resp_start: 0,
            resp_len: 0,
            parked: None,
            exchange: None,
        }
    }

    /// Ends the connection: every body buffer and upstream it holds goes back through the
    /// gate, and the slot's buffers come back for the next connection.
    pub fn close<G: Gate>(mut self, gate: &mut G, registry: &Registry, now: Instant) -> Buffers {
        drop(registry.deregister(&mut self.client));
        let state = std::mem::replace(&mut self.state, State::Closed);
        release(gate, registry, state);
        if let Some(up) = self.parked.take() {
            park_upstream(gate, registry, up, now);
        }
        self.bufs
    }

    /// When the loop must wake this connection ([`Connection::on_timeout`]).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Waiting for the key latch: the loop drives it again when the keeper's state changes.
    pub fn is_held_for_key(&self) -> bool {
        matches!(self.state, State::HeldForKey { .. })
    }

    /// The caller's uid and cgroup, under which its connection is counted.
    pub fn owner(&self) -> Option<(u32, u64)> {
        self.caller.as_ref().map(|c| (c.uid(), c.record.cgroup_id))
    }

    pub(super) fn set_state(&mut self, state: State, timeout_ms: u64, now: Instant) {
        log::trace!(target: "gpa::proxy", "state=>{} peer={}", state.name(), self.peer);
        self.state = state;
        self.deadline = clock::after(now, timeout_ms);
    }

    /// Removes a processed head from the request buffer, keeping any pipelined bytes.
    pub(super) fn consume_head(&mut self, head_len: usize) {
        let head_len = head_len.min(self.req_len);
        self.bufs.req.copy_within(head_len..self.req_len, 0);
        self.req_len -= head_len;
        self.parsed_len = usize::MAX;
    }
}

/// Gives back what an ended state holds: body buffers and upstreams, with their shares.
pub(super) fn release<G: Gate>(gate: &mut G, registry: &Registry, state: State) {
    match state {
        State::ReadingBody { body, .. } => gate.give_back_body(&body.route, body.buf),
        State::HeldForKey { body, .. } => body.give_back(gate),
        State::Connecting { up, send } | State::SendingRequest { up, send } => {
            drop_upstream(gate, registry, up);
            send.body.give_back(gate);
        }
        State::AwaitingResponse { up, replay } => {
            drop_upstream(gate, registry, up);
            if let Some(send) = replay {
                send.body.give_back(gate);
            }
        }
        State::StreamingBody { up, .. } | State::Relaying { up, .. } => drop_upstream(gate, registry, up),
        State::ReadingHead | State::WritingLocal { .. } | State::Closed => {}
    }
}

/// Nothing waits on an idle upstream: no close, no stray bytes.
pub(super) fn still_clean(stream: &TcpStream) -> bool {
    crate::proxy::upstream_pool::is_clean(stream.peek(&mut [0u8; 1]))
}

/// An idle upstream after a clean exchange goes to the gate's pool, its share back.
pub(super) fn park_upstream<G: Gate>(gate: &mut G, registry: &Registry, mut up: Upstream, now: Instant) {
    drop(registry.deregister(&mut up.stream));
    gate.give_back_upstream(&up.route);
    gate.park_upstream(&up.route, up.stream.into(), now);
}

pub(super) fn drop_upstream<G: Gate>(gate: &mut G, registry: &Registry, mut up: Upstream) {
    drop(registry.deregister(&mut up.stream));
    gate.give_back_upstream(&up.route);
}

/// One read, retried on `Interrupted`.
pub(super) fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}
