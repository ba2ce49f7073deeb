// SPDX-License-Identifier: MIT
//! One client connection: an explicit state machine driven by readiness events.
//!
//! ```text
//! ReadingHead ──> ReadingBody ──> Connecting ──> SendingRequest ──> AwaitingResponse ──> Relaying
//!      ^   │            (body only)   (no kept-alive upstream)   │               ^             │
//!      │   │                                                     └─> StreamingBody            │
//!      │   │                                                   (skip-listed body) │            │
//!      │   └──> WritingLocal (errors, /provision, ...) ──> Closed or ReadingHead            │
//!      └────────────────────────── keep-alive ───────────────────────────────────────────────┘
//! ```
//!
//! A signed request's body is read whole into a pool buffer first (the signature covers it).
//! A skip-listed request's body (MSP §3.7: never signed, up to 100 MiB) is relayed through the
//! request buffer after the head has gone up, so a log upload holds no body buffer.
//!
//! Both sockets are registered once for read and write readiness (edge-triggered). Every
//! event runs [`Connection::drive`], which performs whatever I/O the current state wants until
//! it would block, so no readiness edge is ever lost and interest never drifts from state.
//! Each request's checks run in the order of MSP §5.4; every wait has a deadline.

use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddrV4;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::gate::{Decision, Endorse, Exchange, Gate, Route, Verdict};
use super::upstream::{self, Endorsement, RequestBody};
use crate::clock;
use crate::http::{BodyFraming, ChunkedDecoder, HeadError, RequestHead, ResponseFraming, ResponseHead};
use crate::identity::Caller;
use crate::limits::{
    CLIENT_BODY_TIMEOUT_MS, CLIENT_HEAD_TIMEOUT_MS, CLIENT_WRITE_TIMEOUT_MS, CONNECTION_BUFFER_BYTES,
    EXCHANGE_METHOD_MAX_BYTES, EXCHANGE_PATH_MAX_BYTES, IDLE_TIMEOUT_MS, KEY_LATCH_HOLD_MS,
    NO_IDENTITY_HEAD_TIMEOUT_MS, REQUEST_BODY_MAX_BYTES, REQUEST_HEAD_MAX_BYTES, SKIP_LIST_BODY_MAX_BYTES,
    STEPS_PER_DRIVE, STREAMED_BODY_IDLE_TIMEOUT_MS, UPSTREAM_CONNECT_TIMEOUT_MS, UPSTREAM_HEAD_MAX_BYTES,
};

/// Added to every proxied response (MSP §5.7): tells the caller the call went through us.
const MARKER: &[u8] = b"x-ms-azure-host-authorization: value\r\n";
/// The marker plus `connection: close`, for a draining agent (handed over): the client learns
/// from the response itself not to reuse the connection. Its own line comes first, so a
/// client that reads only the first `Connection` header sees `close`.
const MARKER_CLOSING: &[u8] = b"x-ms-azure-host-authorization: value\r\nconnection: close\r\n";

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

/// The fixed buffers of one connection slot: a slice of one arena allocated at start-up for
/// the whole table (see [`Buffers::arena`]) and reused by every connection in that slot.
#[derive(Debug)]
pub struct Buffers {
    /// Client bytes: the request head, then body bytes or a pipelined next request.
    req: &'static mut [u8],
    /// The serialised upstream request head.
    up: &'static mut [u8],
    /// Response bytes on their way to the client.
    resp: &'static mut [u8],
}

impl Buffers {
    /// Buffers for `slots` connections, carved from one zeroed allocation. It is large
    /// (`slots` × [`CONNECTION_BUFFER_BYTES`]), so the allocator takes it straight from
    /// `mmap`: pages cost memory only once a connection touches them. It lives as long as
    /// the process (leaked on purpose: the table is never freed).
    pub fn arena(slots: usize) -> Vec<Self> {
        let arena: &'static mut [u8] = Box::leak(vec![0u8; slots * CONNECTION_BUFFER_BYTES].into_boxed_slice());
        arena
            .chunks_exact_mut(CONNECTION_BUFFER_BYTES)
            .map(|chunk| {
                let (req, rest) = chunk.split_at_mut(REQUEST_HEAD_MAX_BYTES);
                let (up, resp) = rest.split_at_mut(UPSTREAM_HEAD_MAX_BYTES);
                Self { req, up, resp }
            })
            .collect()
    }
}

/// A request body read whole into a pool buffer before it goes up (the signature covers it).
#[derive(Debug)]
struct BufferedBody {
    buf: Box<[u8]>,
    len: usize,
    framing: BodyFraming,
    decoder: ChunkedDecoder,
    /// Whose share the buffer is counted in.
    route: Route,
}

impl BufferedBody {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Moves body bytes from `input` (the request buffer after the head) into the buffer.
    /// Returns the bytes consumed and whether the body is complete, or the status to answer.
    fn absorb(&mut self, input: &[u8]) -> Result<(usize, bool), u16> {
        match self.framing {
            BodyFraming::Length(total) => {
                let want = usize::try_from(total).unwrap_or(usize::MAX) - self.len;
                let take = want.min(input.len());
                self.buf[self.len..self.len + take].copy_from_slice(&input[..take]);
                self.len += take;
                Ok((take, self.len as u64 == total))
            }
            BodyFraming::Chunked => {
                let mut overflow = false;
                let (buf, len) = (&mut self.buf, &mut self.len);
                let consumed = self
                    .decoder
                    .feed(input, |data| {
                        if *len + data.len() > REQUEST_BODY_MAX_BYTES {
                            overflow = true;
                        } else {
                            buf[*len..*len + data.len()].copy_from_slice(data);
                            *len += data.len();
                        }
                    })
                    .map_err(|_malformed| 400u16)?;
                if overflow {
                    return Err(413);
                }
                Ok((consumed, self.decoder.is_done()))
            }
            BodyFraming::None => Ok((0, true)),
        }
    }
}

/// What follows the request head upstream.
#[derive(Debug)]
enum Outgoing {
    /// No body.
    Nothing,
    /// Read whole, de-chunked and signed with the head.
    Buffered(BufferedBody),
    /// A skip-listed body relayed as it arrives (never signed, MSP §3.7).
    Streamed(Streamed),
}

impl Outgoing {
    fn give_back<G: Gate>(self, gate: &mut G) {
        if let Self::Buffered(body) = self {
            gate.give_back_body(&body.route, body.buf);
        }
    }
}

/// An upstream connection and the caller whose share it is counted in.
#[derive(Debug)]
struct Upstream {
    stream: TcpStream,
    route: Route,
    /// Kept alive from an earlier request (the host may have closed it meanwhile).
    reused: bool,
}

/// The serialised request on its way up: the head in the slot's `up` buffer, then the body.
#[derive(Debug)]
struct Sending {
    up_len: usize,
    up_sent: usize,
    body: Outgoing,
    body_sent: usize,
}

/// Where a connection is, with exactly the data that step needs: a state that would need an
/// upstream, a body buffer or a parsed head has it, so none can be missing.
#[derive(Debug)]
enum State {
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
    fn name(&self) -> &'static str {
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
enum Remaining {
    Bytes(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

/// A skip-listed body on its way up: how much of it is left and how much of the request
/// buffer's front is body bytes checked against the framing and not yet written upstream.
#[derive(Clone, Copy, Debug)]
struct Streamed {
    framing: BodyFraming,
    /// `Length`: body bytes not yet checked.
    left: u64,
    decoder: ChunkedDecoder,
    /// `Chunked`: decoded bytes so far (the limit counts content, not framing).
    decoded: u64,
    /// Bytes at the front of the request buffer that are body, checked, not yet sent.
    ready: usize,
    /// The end of the body is within `ready`.
    done: bool,
}

impl Streamed {
    fn new(framing: BodyFraming) -> Self {
        let left = if let BodyFraming::Length(n) = framing { n } else { 0 };
        Self {
            framing,
            left,
            decoder: ChunkedDecoder::new(),
            decoded: 0,
            ready: 0,
            done: left == 0 && framing != BodyFraming::Chunked,
        }
    }

    /// Checks the unchecked bytes at `input` (the request buffer from `ready` on) against the
    /// framing: what belongs to the body becomes `ready`, the rest (a pipelined request) stays.
    fn check(&mut self, input: &[u8]) -> Result<(), u16> {
        match self.framing {
            BodyFraming::Length(_) => {
                let take = usize::try_from(self.left).unwrap_or(usize::MAX).min(input.len());
                self.left -= take as u64;
                self.ready += take;
                self.done = self.left == 0;
            }
            BodyFraming::Chunked => {
                let decoded = &mut self.decoded;
                let consumed =
                    self.decoder.feed(input, |data| *decoded += data.len() as u64).map_err(|_malformed| 400u16)?;
                if self.decoded > SKIP_LIST_BODY_MAX_BYTES {
                    return Err(413);
                }
                self.ready += consumed;
                self.done = self.decoder.is_done();
            }
            BodyFraming::None => self.done = true,
        }
        Ok(())
    }
}

/// Outcome of one step of the state machine.
enum Step {
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
enum Expiry {
    Close(CloseReason),
    Answer(u16),
    RetryLater,
}

/// One proxied client connection.
#[derive(Debug)]
pub struct Connection {
    client: TcpStream,
    peer: SocketAddrV4,
    caller: Option<Caller>,
    state: State,
    deadline: Instant,
    bufs: Buffers,
    /// Client bytes in `bufs.req`.
    req_len: usize,
    /// `req_len` when the head was last parsed (no new bytes: no new parse).
    parsed_len: usize,
    /// Response bytes in `bufs.resp` not yet written to the client: `resp_start..resp_len`.
    resp_start: usize,
    resp_len: usize,
    /// A kept-alive upstream while no request uses it.
    parked: Option<Upstream>,
    /// The request being served, from its head until it is recorded.
    exchange: Option<Exchange>,
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
    pub fn close<G: Gate>(mut self, gate: &mut G, registry: &Registry) -> Buffers {
        drop(registry.deregister(&mut self.client));
        let state = std::mem::replace(&mut self.state, State::Closed);
        release(gate, registry, state);
        if let Some(up) = self.parked.take() {
            drop_upstream(gate, registry, up);
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

    fn set_state(&mut self, state: State, timeout_ms: u64, now: Instant) {
        log::trace!(target: "gpa::proxy", "state=>{} peer={}", state.name(), self.peer);
        self.state = state;
        self.deadline = clock::after(now, timeout_ms);
    }

    /// Runs the state machine until it would block.
    pub fn drive<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>) -> Next {
        // Bounded: each Progress consumes bytes or changes state; the cap only guards against
        // a logic error spinning the single thread.
        for _ in 0..STEPS_PER_DRIVE {
            // Each step takes its state's data and leaves the next state behind.
            let step = match std::mem::replace(&mut self.state, State::Closed) {
                State::ReadingHead => self.read_head(ctx),
                State::ReadingBody { head, body } => self.read_body(ctx, head, body),
                State::HeldForKey { head, route, body } => self.prepare_upstream(ctx, head, route, body, true),
                State::Connecting { up, send } => self.connecting(ctx, up, send),
                State::SendingRequest { up, send } => self.send_request(ctx, up, send),
                State::StreamingBody { up, streamed } => self.stream_body(ctx, up, streamed),
                State::AwaitingResponse { up, replay } => self.await_response(ctx, up, replay),
                State::Relaying { up, remaining, keep_alive } => self.relay(ctx, up, remaining, keep_alive),
                State::WritingLocal { close } => self.write_local(ctx, close),
                State::Closed => {
                    log::error!(target: "gpa::proxy", "connection driven after it ended: peer={}", self.peer);
                    Step::Close(CloseReason::Internal)
                }
            };
            match step {
                Step::Progress => {}
                Step::Blocked => return Next::Continue(self.deadline),
                Step::Close(reason) => {
                    self.audit_abandoned(ctx);
                    return Next::Close(reason);
                }
            }
        }
        // Work is left (a long pipeline) and no readiness event will announce it: the loop
        // drives this connection again on its next turn (issue 13).
        Next::Again
    }

    /// A request whose head was read but that was never answered (the client went away
    /// mid-body, say) still leaves an audit record: abandoned requests are evidence too.
    fn audit_abandoned<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>) {
        if let Some(mut e) = self.exchange.take() {
            e.status = 0;
            e.decision = Decision::Abandoned;
            ctx.gate.record(self.caller.as_ref(), self.peer, &e, ctx.now);
        }
    }

    /// A deadline passed: answer what the state calls for.
    pub fn on_timeout<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>) -> Next {
        let expiry = match &self.state {
            State::ReadingHead if self.req_len == 0 => Expiry::Close(CloseReason::Idle),
            State::ReadingHead | State::ReadingBody { .. } => Expiry::Answer(408),
            // Still no key: a status every provisioning client retries, with when (issue 14).
            State::HeldForKey { .. } => Expiry::RetryLater,
            State::Connecting { .. } => Expiry::Answer(502),
            // Silence from the client mid-body is the client's; a full upstream is the host's.
            State::StreamingBody { streamed, .. } if streamed.ready == 0 => Expiry::Answer(408),
            State::SendingRequest { .. } | State::StreamingBody { .. } | State::AwaitingResponse { .. } => {
                Expiry::Answer(504)
            }
            State::Relaying { .. } | State::WritingLocal { .. } | State::Closed => Expiry::Close(CloseReason::Timeout),
        };
        match expiry {
            Expiry::Close(reason) => return Next::Close(reason),
            Expiry::Answer(status) => self.respond_empty(ctx, status),
            Expiry::RetryLater => self.respond(ctx, 429, &[b"retry-after: 1\r\n"], b"", true),
        }
        self.drive(ctx)
    }

    // ---- client side: request head and body -------------------------------------------------

    fn read_head<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>) -> Step {
        self.state = State::ReadingHead;
        if self.req_len != self.parsed_len && self.req_len > 0 {
            self.parsed_len = self.req_len;
            match RequestHead::parse(&self.bufs.req[..self.req_len]) {
                Ok(Some(head)) => return self.on_head(ctx, head),
                Ok(None) if self.req_len == self.bufs.req.len() => return self.fail(ctx, 431),
                Ok(None) => {}
                Err(HeadError::MethodNotAllowed) => {
                    self.respond_method_not_allowed(ctx);
                    return Step::Progress;
                }
                Err(e) => return self.fail(ctx, e.status()),
            }
        }
        if self.req_len == self.bufs.req.len() {
            return Step::Blocked;
        }
        let first = self.req_len == 0;
        match self.read_client() {
            Ok(_) => {
                if first {
                    // First byte of a new request: the head timeout starts now.
                    self.deadline = clock::after(ctx.now, CLIENT_HEAD_TIMEOUT_MS);
                }
                Step::Progress
            }
            Err(step) => step,
        }
    }

    /// Reads client bytes onto the end of the request buffer: how many (never 0), or the step
    /// to return (the client closed or failed, or nothing is there yet).
    fn read_client(&mut self) -> Result<usize, Step> {
        match read_some(&mut self.client, &mut self.bufs.req[self.req_len..]) {
            Ok(0) => Err(Step::Close(CloseReason::ClientClosed)),
            Ok(n) => {
                self.req_len += n;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Step::Blocked),
            Err(_) => Err(Step::Close(CloseReason::ClientError)),
        }
    }

    fn decide(&mut self, decision: Decision) {
        if let Some(e) = self.exchange.as_mut() {
            e.decision = decision;
        }
    }

    /// MSP §5.4, in order: method (refused by the parser), traversal, local endpoints,
    /// identity, body limit, authorization; then the body or the upstream.
    fn on_head<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, head: RequestHead) -> Step {
        let req = &self.bufs.req[..self.req_len];
        let method = head.method(req);
        let target = head.target(req);
        let path = head.path(req);
        self.exchange = Some(Exchange {
            started: ctx.now,
            is_head: head.is_head(req),
            close: head.close,
            status: 0,
            method: heapless::Vec::from_slice(&method[..method.len().min(EXCHANGE_METHOD_MAX_BYTES)])
                .unwrap_or_default(),
            path: heapless::Vec::from_slice(&path[..path.len().min(EXCHANGE_PATH_MAX_BYTES)]).unwrap_or_default(),
            decision: Decision::Refused,
        });
        ctx.gate.count_request();

        // Before local endpoints, identity and authorization: a target the allowlist and the
        // upstream could read differently is refused whoever sends it (issue 12).
        if let Err(why) = crate::policy::canonical::ambiguous_target(target) {
            self.decide(Decision::Ambiguous(why));
            return self.fail(ctx, 400);
        }
        if crate::policy::canonical::traversal_guard(path).is_err() {
            return self.fail(ctx, 403);
        }
        if let Some(local) = ctx.gate.local_endpoint(&head, req, self.caller.as_ref(), ctx.now) {
            self.decide(Decision::Local);
            let close = local.close || head.framing != BodyFraming::None || head.close;
            self.respond(ctx, local.status, &[local.content_type], local.body.as_bytes(), close);
            if !close {
                self.consume_head(head.head_len);
            }
            return Step::Progress;
        }
        let Some(caller) = self.caller.as_ref() else {
            // A direct connect to the listener, or an identity that could not be recovered.
            self.decide(Decision::NoIdentity);
            return self.fail(ctx, 421);
        };
        let route = Route::of(caller);
        // A skip-listed body is never signed, so it is streamed, with its own limit (§3.7).
        let streamed = head.framing != BodyFraming::None && crate::msp::signing::is_skip_listed(method, target);
        let body_max = if streamed { SKIP_LIST_BODY_MAX_BYTES } else { REQUEST_BODY_MAX_BYTES as u64 };
        if let BodyFraming::Length(n) = head.framing
            && n > body_max
        {
            return self.fail(ctx, 413);
        }
        match ctx.gate.authorize(caller, method, target) {
            Verdict::Allow => self.decide(Decision::Allow),
            Verdict::AllowWithAudit => self.decide(Decision::AuditDeny),
            Verdict::Forbidden => {
                self.decide(Decision::Deny);
                return self.fail(ctx, 403);
            }
        }
        if head.framing == BodyFraming::None {
            return self.prepare_upstream(ctx, head, route, Outgoing::Nothing, false);
        }
        if streamed {
            self.send_continue(&head);
            return self.prepare_upstream(ctx, head, route, Outgoing::Streamed(Streamed::new(head.framing)), false);
        }
        // The caller's share of the body buffers, then the pool itself (its last buffers are
        // root's): when every buffer is in use, degrade predictably rather than queue.
        let Some(buf) = ctx.gate.take_body(&route) else { return self.fail(ctx, 503) };
        let body = BufferedBody { buf, len: 0, framing: head.framing, decoder: ChunkedDecoder::new(), route };
        self.send_continue(&head);
        self.set_state(State::ReadingBody { head, body }, CLIENT_BODY_TIMEOUT_MS, ctx.now);
        Step::Progress
    }

    /// `100 Continue` to a client that waits for it before sending its body.
    fn send_continue(&mut self, head: &RequestHead) {
        if head.expect_continue && self.req_len == head.head_len {
            // Best effort: a client that does not see it sends the body after its own delay.
            drop(self.client.write(b"HTTP/1.1 100 Continue\r\n\r\n"));
        }
    }

    fn read_body<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, head: RequestHead, mut body: BufferedBody) -> Step {
        let start = head.head_len;
        if self.req_len > start {
            let (consumed, complete) = match body.absorb(&self.bufs.req[start..self.req_len]) {
                Ok(r) => r,
                Err(status) => {
                    self.state = State::ReadingBody { head, body };
                    return self.fail(ctx, status);
                }
            };
            self.bufs.req.copy_within(start + consumed..self.req_len, start);
            self.req_len -= consumed;
            if complete {
                let route = body.route;
                return self.prepare_upstream(ctx, head, route, Outgoing::Buffered(body), false);
            }
        }
        self.state = State::ReadingBody { head, body };
        // The body deadline is absolute (set when the body started): a byte every few seconds
        // must not hold a body buffer for ever (issue 13).
        self.read_client().map_or_else(|step| step, |_| Step::Progress)
    }

    // ---- upstream side ----------------------------------------------------------------------

    /// Serialises (and signs) the request head, then sends it on the parked upstream or a new
    /// one. Without a key yet, holds the request for the latch (`held`: it already waits).
    fn prepare_upstream<G: Gate>(
        &mut self,
        ctx: &mut Ctx<'_, G>,
        head: RequestHead,
        route: Route,
        body: Outgoing,
        held: bool,
    ) -> Step {
        let req = &self.bufs.req[..self.req_len];
        let request_body = match &body {
            Outgoing::Nothing => RequestBody::Buffered(&[]),
            Outgoing::Buffered(b) => RequestBody::Buffered(b.bytes()),
            Outgoing::Streamed(_) => RequestBody::Streamed,
        };
        let key = match ctx.gate.endorsement(&route, head.method(req), head.target(req)) {
            Endorse::Sign(key) => Some(key),
            Endorse::Unsigned => None,
            Endorse::NotReady => {
                // Before the first status document or the key latch: hold the request, with
                // the keeper told to poll now, instead of a `503` no provisioning agent retries.
                // The loop drives it again when the keeper's state changes.
                ctx.gate.hold_for_key(ctx.now);
                let state = State::HeldForKey { head, route, body };
                if held {
                    self.state = state;
                } else {
                    log::debug!(target: "gpa::proxy", "request held for the key latch: peer={}", self.peer);
                    self.set_state(state, KEY_LATCH_HOLD_MS, ctx.now);
                }
                return Step::Blocked;
            }
        };
        let date = ctx.gate.host_date();
        let endorsement = Endorsement { key, is_root: route.is_root, date: &date };
        let written = upstream::write_request_head(&head, req, request_body, &endorsement, self.bufs.up);
        let signed = key.is_some();
        let up_len = match written {
            Ok(n) => n,
            Err(e) => {
                log::warn!(target: "gpa::proxy", "cannot build upstream request: peer={} error={e:?}", self.peer);
                self.state = State::HeldForKey { head, route, body };
                return self.fail(ctx, 502);
            }
        };
        if signed {
            ctx.gate.count_signed();
        }
        // The head is serialised; what follows it in the buffer is the next pipelined request.
        self.consume_head(head.head_len);
        let streamed = matches!(body, Outgoing::Streamed(_));
        let send = Sending { up_len, up_sent: 0, body, body_sent: 0 };
        match self.parked.take() {
            // A streamed body cannot be replayed, so a kept-alive upstream the host may have
            // closed meanwhile is not risked: it goes up on a fresh connection.
            Some(up) if streamed => {
                drop_upstream(ctx.gate, ctx.registry, up);
                self.connect_upstream(ctx, route, send)
            }
            Some(mut up) => {
                up.reused = true;
                self.set_state(State::SendingRequest { up, send }, ctx.gate.upstream_timeout_ms(), ctx.now);
                Step::Progress
            }
            None => self.connect_upstream(ctx, route, send),
        }
    }

    fn connect_upstream<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, route: Route, send: Sending) -> Step {
        // One uid's requests in flight to the hosts are bounded: its slow upstreams cannot
        // hold every descriptor and connection the others need.
        if !ctx.gate.take_upstream(&route) {
            send.body.give_back(ctx.gate);
            return self.fail(ctx, 503);
        }
        let mut stream = match ctx.gate.connect(&route) {
            Ok(s) => TcpStream::from_std(s),
            Err(e) => {
                ctx.gate.give_back_upstream(&route);
                log::warn!(target: "gpa::proxy", "upstream connect failed: destination={} error={e}", route.destination);
                send.body.give_back(ctx.gate);
                return self.fail(ctx, 502);
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!(target: "gpa::proxy", "TCP_NODELAY not set upstream: {e}");
        }
        if ctx.registry.register(&mut stream, ctx.upstream_token, Interest::READABLE | Interest::WRITABLE).is_err() {
            ctx.gate.give_back_upstream(&route);
            send.body.give_back(ctx.gate);
            return self.fail(ctx, 502);
        }
        let up = Upstream { stream, route, reused: false };
        self.set_state(State::Connecting { up, send }, UPSTREAM_CONNECT_TIMEOUT_MS, ctx.now);
        Step::Progress
    }

    fn connecting<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, up: Upstream, send: Sending) -> Step {
        let failed = matches!(up.stream.take_error(), Ok(Some(_)) | Err(_));
        let connected = match up.stream.peer_addr() {
            _ if failed => Err(()),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected || e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(_) => Err(()),
        };
        match connected {
            Ok(true) => {
                self.set_state(State::SendingRequest { up, send }, ctx.gate.upstream_timeout_ms(), ctx.now);
                Step::Progress
            }
            Ok(false) => {
                self.state = State::Connecting { up, send };
                Step::Blocked
            }
            Err(()) => {
                self.state = State::Connecting { up, send };
                self.fail(ctx, 502)
            }
        }
    }

    fn send_request<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, mut up: Upstream, mut send: Sending) -> Step {
        let body: &[u8] = if let Outgoing::Buffered(b) = &send.body { b.bytes() } else { &[] };
        if send.up_sent == send.up_len && send.body_sent == body.len() {
            if let Outgoing::Streamed(streamed) = send.body {
                self.set_state(State::StreamingBody { up, streamed }, STREAMED_BODY_IDLE_TIMEOUT_MS, ctx.now);
                return Step::Progress;
            }
            // Sent whole. On a kept-alive upstream the request is kept for one replay; else
            // the body buffer goes back now.
            let replay = if up.reused {
                Some(send)
            } else {
                send.body.give_back(ctx.gate);
                None
            };
            self.resp_start = 0;
            self.resp_len = 0;
            self.set_state(State::AwaitingResponse { up, replay }, ctx.gate.upstream_timeout_ms(), ctx.now);
            return Step::Progress;
        }
        let slices = [IoSlice::new(&self.bufs.up[send.up_sent..send.up_len]), IoSlice::new(&body[send.body_sent..])];
        match up.stream.write_vectored(&slices) {
            Ok(0) => self.upstream_failed(ctx, up, Some(send)),
            Ok(mut n) => {
                let head_part = n.min(send.up_len - send.up_sent);
                send.up_sent += head_part;
                n -= head_part;
                send.body_sent += n;
                self.state = State::SendingRequest { up, send };
                Step::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.state = State::SendingRequest { up, send };
                Step::Blocked
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                self.state = State::SendingRequest { up, send };
                Step::Progress
            }
            Err(_) => self.upstream_failed(ctx, up, Some(send)),
        }
    }

    /// Relays a skip-listed body: checks what the client sent against its framing, writes the
    /// checked bytes upstream, reads more; then waits for the response. The bytes after the
    /// body's end stay in the buffer (a pipelined request).
    fn stream_body<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, mut up: Upstream, mut streamed: Streamed) -> Step {
        if streamed.ready == 0 {
            if streamed.done {
                self.resp_start = 0;
                self.resp_len = 0;
                let upstream_ms = ctx.gate.upstream_timeout_ms();
                self.set_state(State::AwaitingResponse { up, replay: None }, upstream_ms, ctx.now);
                return Step::Progress;
            }
            if self.req_len > 0 {
                let checked = streamed.check(&self.bufs.req[..self.req_len]);
                self.state = State::StreamingBody { up, streamed };
                if let Err(status) = checked {
                    // The host has part of a request it will never see end: that upstream goes.
                    return self.fail(ctx, status);
                }
                if streamed.ready > 0 || streamed.done {
                    return Step::Progress;
                }
                // Nothing was body yet (the decoder holds a partial chunk-size line): read on.
            } else {
                self.state = State::StreamingBody { up, streamed };
            }
            return match self.read_client() {
                Ok(_) => {
                    self.deadline = clock::after(ctx.now, STREAMED_BODY_IDLE_TIMEOUT_MS);
                    Step::Progress
                }
                Err(step) => step,
            };
        }
        let written = up.stream.write(&self.bufs.req[..streamed.ready]);
        match written {
            Ok(n) if n > 0 => {
                self.bufs.req.copy_within(n..self.req_len, 0);
                self.req_len -= n;
                streamed.ready -= n;
                self.state = State::StreamingBody { up, streamed };
                self.deadline = clock::after(ctx.now, STREAMED_BODY_IDLE_TIMEOUT_MS);
                Step::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.state = State::StreamingBody { up, streamed };
                Step::Blocked
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                self.state = State::StreamingBody { up, streamed };
                Step::Progress
            }
            // The upstream went away mid-body: the body cannot be replayed, so no retry.
            Ok(_) | Err(_) => {
                self.state = State::StreamingBody { up, streamed };
                self.fail(ctx, 502)
            }
        }
    }

    /// The upstream failed before any response byte. A kept-alive connection the host closed
    /// meanwhile is retried once on a fresh connection with the request as sent (`replay`:
    /// nothing was processed upstream); otherwise the client gets `502`.
    fn upstream_failed<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, up: Upstream, replay: Option<Sending>) -> Step {
        let (route, reused) = (up.route, up.reused);
        drop_upstream(ctx.gate, ctx.registry, up);
        match replay {
            Some(mut send) if reused && self.resp_len == 0 => {
                send.up_sent = 0;
                send.body_sent = 0;
                self.connect_upstream(ctx, route, send)
            }
            Some(send) => {
                send.body.give_back(ctx.gate);
                self.fail(ctx, 502)
            }
            None => self.fail(ctx, 502),
        }
    }

    fn await_response<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, mut up: Upstream, replay: Option<Sending>) -> Step {
        // Keep room to insert the marker header (and `connection: close`) into the head in place.
        let limit = self.bufs.resp.len() - MARKER_CLOSING.len();
        if self.resp_len == limit {
            self.state = State::AwaitingResponse { up, replay };
            return self.fail(ctx, 502);
        }
        match read_some(&mut up.stream, &mut self.bufs.resp[self.resp_len..limit]) {
            Ok(0) => self.upstream_failed(ctx, up, replay),
            Ok(n) => {
                self.resp_len += n;
                self.deadline = clock::after(ctx.now, ctx.gate.upstream_timeout_ms());
                let is_head = self.exchange.as_ref().is_some_and(|e| e.is_head);
                let parsed = ResponseHead::parse(&self.bufs.resp[..self.resp_len], is_head);
                match parsed {
                    Ok(Some(head)) => self.on_response_head(ctx, up, replay, head),
                    Ok(None) => {
                        self.state = State::AwaitingResponse { up, replay };
                        Step::Progress
                    }
                    Err(_) => {
                        self.state = State::AwaitingResponse { up, replay };
                        self.fail(ctx, 502)
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.state = State::AwaitingResponse { up, replay };
                Step::Blocked
            }
            Err(_) => self.upstream_failed(ctx, up, replay),
        }
    }

    fn on_response_head<G: Gate>(
        &mut self,
        ctx: &mut Ctx<'_, G>,
        up: Upstream,
        replay: Option<Sending>,
        head: ResponseHead,
    ) -> Step {
        if head.status == 100 {
            // Interim response to a body we already sent whole: drop it, read the final one.
            self.bufs.resp.copy_within(head.head_len..self.resp_len, 0);
            self.resp_len -= head.head_len;
            self.state = State::AwaitingResponse { up, replay };
            return Step::Progress;
        }
        // The response has begun: the request will not be sent again.
        if let Some(send) = replay {
            send.body.give_back(ctx.gate);
        }
        // Insert the marker after the status line.
        let draining = ctx.gate.draining();
        let marker = if draining { MARKER_CLOSING } else { MARKER };
        let at = head.status_line_len;
        self.bufs.resp.copy_within(at..self.resp_len, at + marker.len());
        self.bufs.resp[at..at + marker.len()].copy_from_slice(marker);
        self.resp_len += marker.len();
        let body_start = head.head_len + marker.len();
        let mut remaining = match head.framing {
            ResponseFraming::None => Remaining::Done,
            ResponseFraming::Length(n) => Remaining::Bytes(n),
            ResponseFraming::Chunked => Remaining::Chunked(ChunkedDecoder::new()),
            ResponseFraming::UntilClose => Remaining::UntilClose,
        };
        let mut keep_alive = head.keep_alive;
        if let Some(e) = self.exchange.as_mut() {
            e.status = head.status;
            e.close |= !head.keep_alive || draining;
        }
        self.resp_start = 0;
        self.resp_len = body_start + self.track_body(body_start, &mut remaining, &mut keep_alive);
        let upstream_ms = ctx.gate.upstream_timeout_ms();
        self.set_state(State::Relaying { up, remaining, keep_alive }, upstream_ms, ctx.now);
        Step::Progress
    }

    /// Feeds response body bytes at `from..resp_len` to the framing tracker and returns how
    /// many belong to this response (the rest, if any, is dropped with the upstream).
    fn track_body(&mut self, from: usize, remaining: &mut Remaining, keep_alive: &mut bool) -> usize {
        let input = &self.bufs.resp[from..self.resp_len];
        let keep = match remaining {
            Remaining::Done => 0,
            Remaining::UntilClose => input.len(),
            Remaining::Bytes(left) => {
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(input.len());
                *left -= take as u64;
                if *left == 0 {
                    *remaining = Remaining::Done;
                }
                take
            }
            Remaining::Chunked(decoder) => match decoder.feed(input, |_| {}) {
                Ok(n) => {
                    if decoder.is_done() {
                        *remaining = Remaining::Done;
                    }
                    n
                }
                Err(_) => {
                    // A malformed chunked response: relay what we have, then close.
                    *keep_alive = false;
                    if let Some(e) = self.exchange.as_mut() {
                        e.close = true;
                    }
                    *remaining = Remaining::Done;
                    input.len()
                }
            },
        };
        if keep < input.len() {
            // The upstream sent more than the response: it cannot be reused safely.
            *keep_alive = false;
        }
        keep
    }

    fn relay<G: Gate>(
        &mut self,
        ctx: &mut Ctx<'_, G>,
        mut up: Upstream,
        mut remaining: Remaining,
        mut keep_alive: bool,
    ) -> Step {
        if self.resp_start < self.resp_len {
            let written = self.client.write(&self.bufs.resp[self.resp_start..self.resp_len]);
            self.state = State::Relaying { up, remaining, keep_alive };
            return match written {
                Ok(0) => Step::Close(CloseReason::ClientClosed),
                Ok(n) => {
                    self.resp_start += n;
                    self.deadline = clock::after(ctx.now, CLIENT_WRITE_TIMEOUT_MS);
                    Step::Progress
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Step::Progress,
                Err(_) => Step::Close(CloseReason::ClientError),
            };
        }
        if matches!(remaining, Remaining::Done) {
            return self.finish_exchange(ctx, up, keep_alive);
        }
        let read = read_some(&mut up.stream, &mut self.bufs.resp[..]);
        let step = match read {
            Ok(0) if matches!(remaining, Remaining::UntilClose) => {
                remaining = Remaining::Done;
                keep_alive = false;
                if let Some(e) = self.exchange.as_mut() {
                    e.close = true;
                }
                Step::Progress
            }
            // Truncated response: the client sees the connection end.
            Ok(0) => Step::Close(CloseReason::UpstreamClosed),
            Ok(n) => {
                self.resp_start = 0;
                self.resp_len = n;
                self.resp_len = self.track_body(0, &mut remaining, &mut keep_alive);
                self.deadline = clock::after(ctx.now, ctx.gate.upstream_timeout_ms());
                Step::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Blocked,
            Err(_) => Step::Close(CloseReason::UpstreamClosed),
        };
        self.state = State::Relaying { up, remaining, keep_alive };
        step
    }

    fn finish_exchange<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, up: Upstream, keep_alive: bool) -> Step {
        let exchange = self.exchange.take();
        let close = exchange.as_ref().is_some_and(|e| e.close);
        if let Some(e) = exchange {
            ctx.gate.record(self.caller.as_ref(), self.peer, &e, ctx.now);
        }
        if keep_alive {
            self.parked = Some(up);
        } else {
            drop_upstream(ctx.gate, ctx.registry, up);
        }
        // A draining agent (handed over) keeps no connection alive: the client's next
        // connection goes to the successor.
        if close || ctx.gate.draining() {
            self.state = State::ReadingHead;
            return Step::Close(CloseReason::Done);
        }
        self.parsed_len = usize::MAX;
        self.set_state(State::ReadingHead, IDLE_TIMEOUT_MS, ctx.now);
        Step::Progress
    }

    // ---- responses the proxy writes itself --------------------------------------------------

    /// Removes a processed head from the request buffer, keeping any pipelined bytes.
    fn consume_head(&mut self, head_len: usize) {
        let head_len = head_len.min(self.req_len);
        self.bufs.req.copy_within(head_len..self.req_len, 0);
        self.req_len -= head_len;
        self.parsed_len = usize::MAX;
    }

    /// MSP §5.4 step 2: `405` with the `Allow` list and a text body.
    fn respond_method_not_allowed<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>) {
        let allow: &[&[u8]] = &[
            b"allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH\r\n",
            b"content-type: text/plain; charset=utf-8\r\n",
        ];
        self.respond(ctx, 405, allow, b"Method Not Allowed", true);
    }

    /// Answers `status` with no body and closes, ending whatever the current state holds.
    fn fail<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, status: u16) -> Step {
        self.respond_empty(ctx, status);
        Step::Progress
    }

    fn respond_empty<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, status: u16) {
        self.respond(ctx, status, &[], b"", true);
    }

    /// Formats a response into the response buffer and switches to writing it. What the
    /// current state holds (a body buffer, an upstream mid-exchange) goes back now; a parked
    /// upstream goes too when the connection will close.
    fn respond<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, status: u16, extra: &[&[u8]], body: &[u8], close: bool) {
        let close = close || ctx.gate.draining();
        let len_buf = crate::http::decimal(u64::try_from(body.len()).unwrap_or(u64::MAX));
        let mut w = 0;
        let parts: [&[u8]; 6] = [
            b"HTTP/1.1 ",
            // Every status the proxy answers is registered; 500 is the fallback of last resort.
            crate::http::status_line(status).unwrap_or("500 Internal Server Error").as_bytes(),
            b"\r\ncontent-length: ",
            &len_buf,
            b"\r\n",
            if close { b"connection: close\r\n" } else { b"" },
        ];
        let resp = &mut self.bufs.resp;
        for p in parts.iter().chain(extra.iter()).chain([&&b"\r\n"[..], &body]) {
            let take = p.len().min(resp.len() - w);
            resp[w..w + take].copy_from_slice(&p[..take]);
            w += take;
        }
        self.resp_start = 0;
        self.resp_len = w;
        if let Some(mut e) = self.exchange.take() {
            e.status = status;
            if status >= 500 && e.decision == Decision::Allow {
                e.decision = Decision::Error;
            }
            ctx.gate.record(self.caller.as_ref(), self.peer, &e, ctx.now);
        }
        let ended = std::mem::replace(&mut self.state, State::Closed);
        release(ctx.gate, ctx.registry, ended);
        if close && let Some(up) = self.parked.take() {
            drop_upstream(ctx.gate, ctx.registry, up);
        }
        self.set_state(State::WritingLocal { close }, CLIENT_WRITE_TIMEOUT_MS, ctx.now);
    }

    fn write_local<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, close: bool) -> Step {
        self.state = State::WritingLocal { close };
        if self.resp_start == self.resp_len {
            if close {
                return Step::Close(CloseReason::Done);
            }
            self.set_state(State::ReadingHead, IDLE_TIMEOUT_MS, ctx.now);
            return Step::Progress;
        }
        match self.client.write(&self.bufs.resp[self.resp_start..self.resp_len]) {
            Ok(0) => Step::Close(CloseReason::ClientClosed),
            Ok(n) => {
                self.resp_start += n;
                Step::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Step::Progress,
            Err(_) => Step::Close(CloseReason::ClientError),
        }
    }
}

/// Gives back what an ended state holds: body buffers and upstreams, with their shares.
fn release<G: Gate>(gate: &mut G, registry: &Registry, state: State) {
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

fn drop_upstream<G: Gate>(gate: &mut G, registry: &Registry, mut up: Upstream) {
    drop(registry.deregister(&mut up.stream));
    gate.give_back_upstream(&up.route);
}

/// One read, retried on `Interrupted`.
fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_body_is_checked_against_its_framing_and_the_skip_list_limit() {
        // A length: body bytes become ready, a pipelined request after them does not.
        let mut s = Streamed::new(BodyFraming::Length(5));
        s.check(b"abc").expect("body");
        assert_eq!((s.ready, s.done), (3, false));
        s.ready = 0;
        s.check(b"deGET / HTTP/1.1\r\n").expect("body");
        assert_eq!((s.ready, s.done), (2, true));

        // Chunked: framing goes up verbatim with the data; the end is found.
        let mut s = Streamed::new(BodyFraming::Chunked);
        let body = b"3\r\nabc\r\n0\r\n\r\nGET /next";
        s.check(body).expect("chunked");
        assert_eq!((s.ready, s.done, s.decoded), (body.len() - b"GET /next".len(), true, 3));
        assert_eq!(Streamed::new(BodyFraming::Chunked).check(b"zz\r\n"), Err(400));

        // The limit counts decoded bytes, across pieces: one byte over is 413 before it is ready.
        let mut s = Streamed::new(BodyFraming::Chunked);
        s.decoded = SKIP_LIST_BODY_MAX_BYTES - 2;
        s.check(b"2\r\nab").expect("at the limit");
        s.ready = 0;
        assert_eq!(s.check(b"\r\n1\r\nc"), Err(413));
        assert_eq!(s.ready, 0);
    }
}
