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
use std::net::{SocketAddr, SocketAddrV4};
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::Verdict;
use super::shares::Resource;
use super::upstream::{self, Endorsement, RequestBody};
use super::{CloseReason, Endorse, Shared};
use crate::clock;
use crate::http::{BodyFraming, ChunkedDecoder, HeadError, RequestHead, ResponseFraming, ResponseHead};
use crate::identity::Caller;
use crate::limits::{
    CLIENT_BODY_TIMEOUT_MS, CLIENT_HEAD_TIMEOUT_MS, CLIENT_WRITE_TIMEOUT_MS, CONNECTION_BUFFER_BYTES, IDLE_TIMEOUT_MS,
    KEY_LATCH_HOLD_MS, KEY_LATCH_HOLD_POLL_MS, REQUEST_BODY_MAX_BYTES, REQUEST_HEAD_MAX_BYTES,
    SKIP_LIST_BODY_MAX_BYTES, STREAMED_BODY_IDLE_TIMEOUT_MS, UPSTREAM_CONNECT_TIMEOUT_MS, UPSTREAM_HEAD_MAX_BYTES,
};

/// Added to every proxied response (MSP §5.7): tells the caller the call went through us.
const MARKER: &[u8] = b"x-ms-azure-host-authorization: value\r\n";
/// The marker plus `connection: close`, for a draining agent (handed over): the client learns
/// from the response itself not to reuse the connection. Its own line comes first, so a
/// client that reads only the first `Connection` header sees `close`.
const MARKER_CLOSING: &[u8] = b"x-ms-azure-host-authorization: value\r\nconnection: close\r\n";

/// The fixed buffers of one connection slot: a slice of one arena allocated at start-up for
/// the whole table (see [`Buffers::arena`]) and reused by every connection in that slot.
#[derive(Debug)]
pub(crate) struct Buffers {
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
    pub(crate) fn arena(slots: usize) -> Vec<Self> {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for a complete request head (first request or keep-alive).
    ReadingHead,
    /// Reading a body into a pool buffer (it must be complete before it can be signed).
    ReadingBody,
    /// Non-blocking connect to the original destination in flight.
    Connecting,
    /// Writing the serialised head (and a buffered body) upstream.
    SendingRequest,
    /// Relaying a skip-listed body from the client to the upstream as it arrives.
    StreamingBody,
    /// Authorized, waiting for the key latch before it can be signed (bounded).
    HeldForKey,
    /// Waiting for the upstream response head.
    AwaitingResponse,
    /// Streaming the response to the client.
    Relaying,
    /// Writing a response the proxy generated itself.
    WritingLocal { close: bool },
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
pub(crate) enum Next {
    /// Keep it; wake it at the deadline.
    Continue(Instant),
    /// Keep it and drive it again on the loop's next turn (its step budget ran out).
    Again,
    /// Remove it.
    Close(CloseReason),
}

/// Per-request facts kept after the head bytes are gone (for the response and the audit
/// record).
#[derive(Clone, Debug)]
pub(crate) struct Exchange {
    pub(crate) started: Instant,
    is_head: bool,
    close: bool,
    pub(crate) status: u16,
    pub(crate) method: heapless::Vec<u8, 16>,
    /// Path without the query (queries can carry secrets), cut to fit.
    pub(crate) path: heapless::Vec<u8, 256>,
    /// What the checks decided: `allow`, `audit-deny`, `deny`, `no-identity`, `local`,
    /// `refused` (method, traversal, framing, limits) or `error`.
    pub(crate) decision: &'static str,
}

/// One proxied client connection.
#[derive(Debug)]
pub(crate) struct Connection {
    client: TcpStream,
    peer: SocketAddrV4,
    caller: Option<Caller>,
    upstream: Option<TcpStream>,
    /// The upstream connection was reused from an earlier request (may have gone stale).
    upstream_reused: bool,
    state: State,
    deadline: Instant,
    bufs: Buffers,
    req_len: usize,
    parsed_len: usize,
    head: Option<RequestHead>,
    body: Option<Box<[u8]>>,
    body_len: usize,
    body_want: BodyFraming,
    body_decoder: ChunkedDecoder,
    up_len: usize,
    up_sent: usize,
    body_sent: usize,
    /// A skip-listed body being relayed (MSP §3.7); `None` for every other request.
    streamed: Option<Streamed>,
    resp_start: usize,
    resp_len: usize,
    remaining: Remaining,
    upstream_keep_alive: bool,
    exchange: Option<Exchange>,
}

/// What the event loop lends a connection for one drive.
pub(crate) struct Ctx<'a> {
    pub(crate) shared: &'a mut Shared,
    pub(crate) registry: &'a Registry,
    /// Token of the upstream socket of this slot.
    pub(crate) upstream_token: Token,
    pub(crate) now: Instant,
}

impl Connection {
    pub(crate) fn new(
        client: TcpStream,
        peer: SocketAddrV4,
        caller: Option<Caller>,
        bufs: Buffers,
        now: Instant,
    ) -> Self {
        Self {
            client,
            peer,
            upstream: None,
            upstream_reused: false,
            state: State::ReadingHead,
            // Without identity only a local endpoint can be asked: one short request.
            deadline: clock::after(
                now,
                if caller.is_some() { CLIENT_HEAD_TIMEOUT_MS } else { crate::limits::NO_IDENTITY_HEAD_TIMEOUT_MS },
            ),
            bufs,
            req_len: 0,
            parsed_len: usize::MAX,
            head: None,
            body: None,
            body_len: 0,
            body_want: BodyFraming::None,
            body_decoder: ChunkedDecoder::new(),
            up_len: 0,
            up_sent: 0,
            body_sent: 0,
            streamed: None,
            resp_start: 0,
            resp_len: 0,
            remaining: Remaining::Done,
            upstream_keep_alive: false,
            exchange: None,
            caller,
        }
    }

    /// Hands back the slot's buffers and the pool buffer, if any, when the connection ends,
    /// and whether it still held an upstream (both counted in the caller's shares).
    pub(crate) fn into_parts(mut self, registry: &Registry) -> (Buffers, Option<Box<[u8]>>, bool) {
        drop(registry.deregister(&mut self.client));
        let had_upstream = self.upstream.is_some();
        if let Some(mut up) = self.upstream.take() {
            drop(registry.deregister(&mut up));
        }
        (self.bufs, self.body.take(), had_upstream)
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    fn set_state(&mut self, state: State, timeout_ms: u64, now: Instant) {
        log::trace!(target: "gpa::proxy", "state={:?}=>{:?} peer={}", self.state, state, self.peer);
        self.state = state;
        self.deadline = clock::after(now, timeout_ms);
    }

    /// Runs the state machine until it would block.
    pub(crate) fn drive(&mut self, ctx: &mut Ctx<'_>) -> Next {
        // Bounded: each Progress consumes bytes or changes state; the cap only guards against
        // a logic error spinning the single thread.
        for _ in 0..1024 {
            let step = match self.state {
                State::ReadingHead => self.read_head(ctx),
                State::ReadingBody => self.read_body(ctx),
                State::Connecting => self.connecting(ctx),
                State::SendingRequest => self.send_request(ctx),
                State::StreamingBody => self.stream_body(ctx),
                State::HeldForKey => self.prepare_upstream(ctx),
                State::AwaitingResponse => self.await_response(ctx),
                State::Relaying => self.relay(ctx),
                State::WritingLocal { close } => self.write_local(ctx, close),
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
    fn audit_abandoned(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(mut e) = self.exchange.take() {
            e.status = 0;
            e.decision = "abandoned";
            ctx.shared.record(self.caller.as_ref(), self.peer, &e, ctx.now);
        }
    }

    /// Waiting for the key latch: the loop drives it again when the keeper's state changes.
    pub(crate) fn is_held_for_key(&self) -> bool {
        self.state == State::HeldForKey
    }

    /// The caller's uid and cgroup, under which its shares are counted.
    pub(crate) fn owner(&self) -> Option<(u32, u64)> {
        self.caller.as_ref().map(|c| (c.uid(), c.record.cgroup_id))
    }

    /// A deadline passed: answer what the state calls for.
    pub(crate) fn on_timeout(&mut self, ctx: &mut Ctx<'_>) -> Next {
        match self.state {
            State::ReadingHead if self.req_len == 0 => return Next::Close(CloseReason::Idle),
            State::ReadingHead | State::ReadingBody => self.respond(ctx, 408, &[], b"", true),
            // Still no key: a status every provisioning client retries, with when (issue 14).
            State::HeldForKey => self.respond(ctx, 429, &[b"retry-after: 1\r\n"], b"", true),
            State::Connecting => self.respond(ctx, 502, &[], b"", true),
            // Silence from the client mid-body is the client's; a full upstream is the host's.
            State::StreamingBody if self.streamed.is_some_and(|s| s.ready == 0) => {
                self.respond(ctx, 408, &[], b"", true)
            }
            State::SendingRequest | State::StreamingBody | State::AwaitingResponse => {
                self.respond(ctx, 504, &[], b"", true)
            }
            State::Relaying | State::WritingLocal { .. } => return Next::Close(CloseReason::Timeout),
        }
        self.drive(ctx)
    }

    // ---- client side: request head and body -------------------------------------------------

    fn read_head(&mut self, ctx: &mut Ctx<'_>) -> Step {
        if self.req_len != self.parsed_len && self.req_len > 0 {
            self.parsed_len = self.req_len;
            match RequestHead::parse(&self.bufs.req[..self.req_len]) {
                Ok(Some(head)) => return self.on_head(ctx, head),
                Ok(None) if self.req_len == self.bufs.req.len() => {
                    self.respond(ctx, 431, &[], b"", true);
                    return Step::Progress;
                }
                Ok(None) => {}
                Err(HeadError::MethodNotAllowed) => {
                    self.respond_method_not_allowed(ctx);
                    return Step::Progress;
                }
                Err(e) => {
                    self.respond(ctx, e.status(), &[], b"", true);
                    return Step::Progress;
                }
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

    /// MSP §5.4, in order: method, traversal, local endpoints, identity, body limit,
    /// authorization; then the body or the upstream.
    fn on_head(&mut self, ctx: &mut Ctx<'_>, head: RequestHead) -> Step {
        let req = &self.bufs.req[..self.req_len];
        let method = head.method(req);
        let target = head.target(req);
        let path = head.path(req);
        self.exchange = Some(Exchange {
            started: ctx.now,
            is_head: head.is_head(req),
            close: head.close,
            status: 0,
            method: heapless::Vec::from_slice(&method[..method.len().min(16)]).unwrap_or_default(),
            path: heapless::Vec::from_slice(&path[..path.len().min(256)]).unwrap_or_default(),
            decision: "refused",
        });
        ctx.shared.stats.requests += 1;

        if !crate::policy::canonical::method_allowed(method) {
            self.respond_method_not_allowed(ctx);
            return Step::Progress;
        }
        // Before local endpoints, identity and authorization: a target the allowlist and the
        // upstream could read differently is refused whoever sends it (issue 12).
        if let Err(why) = crate::policy::canonical::ambiguous_target(target) {
            self.set_decision(why.as_str());
            self.respond(ctx, 400, &[], b"", true);
            return Step::Progress;
        }
        if crate::policy::canonical::traversal_guard(head.path(req)).is_err() {
            self.respond(ctx, 403, &[], b"", true);
            return Step::Progress;
        }
        if let Some(local) = ctx.shared.local_endpoint(&head, req, self.caller.as_ref(), ctx.now) {
            self.set_decision("local");
            let close = local.close || head.framing != BodyFraming::None || head.close;
            self.respond(ctx, local.status, &[local.content_type], local.body.as_bytes(), close);
            if !close {
                self.consume_head(head.head_len);
            }
            return Step::Progress;
        }
        let Some(caller) = self.caller.as_ref() else {
            // A direct connect to the listener, or an identity that could not be recovered.
            self.set_decision("no-identity");
            self.respond(ctx, 421, &[], b"", true);
            return Step::Progress;
        };
        // A skip-listed body is never signed, so it is streamed, with its own limit (§3.7).
        let streamed = head.framing != BodyFraming::None && crate::msp::signing::is_skip_listed(method, target);
        let body_max = if streamed { SKIP_LIST_BODY_MAX_BYTES } else { REQUEST_BODY_MAX_BYTES as u64 };
        if let BodyFraming::Length(n) = head.framing
            && n > body_max
        {
            self.respond(ctx, 413, &[], b"", true);
            return Step::Progress;
        }
        let verdict = ctx.shared.authorize(caller, method, target);
        match verdict {
            Verdict::Allow => self.set_decision("allow"),
            Verdict::AllowWithAudit => self.set_decision("audit-deny"),
            Verdict::Forbidden => {
                self.set_decision("deny");
                self.respond(ctx, 403, &[], b"", true);
                return Step::Progress;
            }
        }
        self.head = Some(head);
        if head.framing == BodyFraming::None {
            return self.prepare_upstream(ctx);
        }
        if streamed {
            self.streamed = Some(Streamed::new(head.framing));
            self.send_continue(&head);
            return self.prepare_upstream(ctx);
        }
        let Some((uid, cgroup)) = self.owner() else { return Step::Close(CloseReason::Internal) };
        // A uid's share of the body buffers, then the pool itself (its last buffers are root's).
        if !ctx.shared.shares.take(uid, cgroup, Resource::Body) {
            self.respond(ctx, 503, &[], b"", true);
            return Step::Progress;
        }
        let Some(body) = ctx.shared.pool.take(uid == 0) else {
            // Every body buffer is in use: degrade predictably rather than queue.
            ctx.shared.shares.give_back(uid, cgroup, Resource::Body);
            self.respond(ctx, 503, &[], b"", true);
            return Step::Progress;
        };
        self.body = Some(body);
        self.body_len = 0;
        self.body_want = head.framing;
        self.body_decoder = ChunkedDecoder::new();
        self.send_continue(&head);
        self.set_state(State::ReadingBody, CLIENT_BODY_TIMEOUT_MS, ctx.now);
        Step::Progress
    }

    /// `100 Continue` to a client that waits for it before sending its body.
    fn send_continue(&mut self, head: &RequestHead) {
        if head.expect_continue && self.req_len == head.head_len {
            // Best effort: a client that does not see it sends the body after its own delay.
            drop(self.client.write(b"HTTP/1.1 100 Continue\r\n\r\n"));
        }
    }

    fn read_body(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let Some(head) = self.head else { return Step::Close(CloseReason::Internal) };
        let start = head.head_len;
        if self.req_len > start {
            let (consumed, complete) = match self.absorb_body(start) {
                Ok(r) => r,
                Err(status) => {
                    self.respond(ctx, status, &[], b"", true);
                    return Step::Progress;
                }
            };
            self.bufs.req.copy_within(start + consumed..self.req_len, start);
            self.req_len -= consumed;
            if complete {
                return self.prepare_upstream(ctx);
            }
        }
        // The body deadline is absolute (set when the body started): a byte every few seconds
        // must not hold a body buffer for ever (issue 13).
        self.read_client().map_or_else(|step| step, |_| Step::Progress)
    }

    /// Moves body bytes from the request buffer into the body buffer. Returns the bytes
    /// consumed and whether the body is complete, or the status to answer.
    fn absorb_body(&mut self, start: usize) -> Result<(usize, bool), u16> {
        let Some(body) = self.body.as_mut() else { return Err(500) };
        let input = &self.bufs.req[start..self.req_len];
        match self.body_want {
            BodyFraming::Length(total) => {
                let want = usize::try_from(total).unwrap_or(usize::MAX) - self.body_len;
                let take = want.min(input.len());
                body[self.body_len..self.body_len + take].copy_from_slice(&input[..take]);
                self.body_len += take;
                Ok((take, self.body_len as u64 == total))
            }
            BodyFraming::Chunked => {
                let mut overflow = false;
                let len = &mut self.body_len;
                let consumed = self
                    .body_decoder
                    .feed(input, |data| {
                        if *len + data.len() > REQUEST_BODY_MAX_BYTES {
                            overflow = true;
                        } else {
                            body[*len..*len + data.len()].copy_from_slice(data);
                            *len += data.len();
                        }
                    })
                    .map_err(|_malformed| 400u16)?;
                if overflow {
                    return Err(413);
                }
                Ok((consumed, self.body_decoder.is_done()))
            }
            BodyFraming::None => Ok((0, true)),
        }
    }

    // ---- upstream side ----------------------------------------------------------------------

    fn prepare_upstream(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let (Some(head), Some(caller)) = (self.head, self.caller.as_ref()) else {
            return Step::Close(CloseReason::Internal);
        };
        let req = &self.bufs.req[..self.req_len];
        let body = match (self.streamed, self.body.as_deref()) {
            (Some(_), _) => RequestBody::Streamed,
            (None, body) => RequestBody::Buffered(body.map_or(&[][..], |b| &b[..self.body_len])),
        };
        let key = match ctx.shared.endorsement_for(caller, head.method(req), head.target(req)) {
            Endorse::Sign(key) => Some(key),
            Endorse::Unsigned => None,
            Endorse::NotReady => {
                // Before the first status document or the key latch: hold the request, with
                // the keeper told to poll now, instead of a `503` no provisioning agent retries.
                // The loop drives it again when the keeper's state changes.
                ctx.shared.keeper.poll_within(ctx.now, std::time::Duration::from_millis(KEY_LATCH_HOLD_POLL_MS));
                if self.state != State::HeldForKey {
                    log::debug!(target: "gpa::proxy", "request held for the key latch: peer={}", self.peer);
                    self.set_state(State::HeldForKey, KEY_LATCH_HOLD_MS, ctx.now);
                }
                return Step::Blocked;
            }
        };
        let date = ctx.shared.host_date();
        let endorsement = Endorsement { key, is_root: caller.is_root(), date: &date };
        match upstream::write_request_head(&head, req, body, &endorsement, self.bufs.up) {
            Ok(n) => self.up_len = n,
            Err(e) => {
                log::warn!(target: "gpa::proxy", "cannot build upstream request: peer={} error={e:?}", self.peer);
                self.respond(ctx, 502, &[], b"", true);
                return Step::Progress;
            }
        }
        ctx.shared.stats.signed += u64::from(key.is_some());
        self.up_sent = 0;
        self.body_sent = 0;
        // The head is serialised; what follows it in the buffer is the next pipelined request.
        self.consume_head(head.head_len);
        self.head = None;
        if self.streamed.is_some() {
            // A streamed body cannot be replayed, so a kept-alive upstream the host may have
            // closed meanwhile is not risked: it goes up on a fresh connection.
            self.drop_upstream(ctx);
        }
        if self.upstream.is_some() {
            self.upstream_reused = true;
            self.set_state(State::SendingRequest, ctx.shared.upstream_timeout_ms, ctx.now);
            return Step::Progress;
        }
        self.connect_upstream(ctx)
    }

    fn connect_upstream(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let (Some(destination), Some((uid, cgroup))) =
            (self.caller.as_ref().map(|c| c.record.original_destination()), self.owner())
        else {
            return Step::Close(CloseReason::Internal);
        };
        // One uid's requests in flight to the hosts are bounded: its slow upstreams cannot
        // hold every descriptor and connection the others need.
        if !ctx.shared.shares.take(uid, cgroup, Resource::Upstream) {
            self.respond(ctx, 503, &[], b"", true);
            return Step::Progress;
        }
        let stream = match crate::sys::connect_marked(destination, ctx.shared.agent_mark) {
            Ok(s) => TcpStream::from_std(s),
            Err(e) => {
                ctx.shared.shares.give_back(uid, cgroup, Resource::Upstream);
                log::warn!(target: "gpa::proxy", "upstream connect failed: destination={destination} error={e}");
                self.respond(ctx, 502, &[], b"", true);
                return Step::Progress;
            }
        };
        let mut stream = stream;
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!(target: "gpa::proxy", "TCP_NODELAY not set upstream: {e}");
        }
        if ctx.registry.register(&mut stream, ctx.upstream_token, Interest::READABLE | Interest::WRITABLE).is_err() {
            ctx.shared.shares.give_back(uid, cgroup, Resource::Upstream);
            self.respond(ctx, 502, &[], b"", true);
            return Step::Progress;
        }
        self.upstream = Some(stream);
        self.upstream_reused = false;
        self.set_state(State::Connecting, UPSTREAM_CONNECT_TIMEOUT_MS, ctx.now);
        Step::Progress
    }

    fn drop_upstream(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(mut up) = self.upstream.take() {
            drop(ctx.registry.deregister(&mut up));
            if let Some((uid, cgroup)) = self.owner() {
                ctx.shared.shares.give_back(uid, cgroup, Resource::Upstream);
            }
        }
    }

    fn connecting(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let Some(up) = self.upstream.as_ref() else { return Step::Close(CloseReason::Internal) };
        if let Ok(Some(_)) | Err(_) = up.take_error() {
            self.drop_upstream(ctx);
            self.respond(ctx, 502, &[], b"", true);
            return Step::Progress;
        }
        match up.peer_addr() {
            Ok(_) => {
                self.set_state(State::SendingRequest, ctx.shared.upstream_timeout_ms, ctx.now);
                Step::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected || e.kind() == io::ErrorKind::WouldBlock => Step::Blocked,
            Err(_) => {
                self.drop_upstream(ctx);
                self.respond(ctx, 502, &[], b"", true);
                Step::Progress
            }
        }
    }

    fn send_request(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let Some(up) = self.upstream.as_mut() else { return Step::Close(CloseReason::Internal) };
        let body = self.body.as_deref().map_or(&[][..], |b| &b[..self.body_len]);
        if self.up_sent == self.up_len && self.body_sent == body.len() {
            if self.streamed.is_some() {
                self.set_state(State::StreamingBody, STREAMED_BODY_IDLE_TIMEOUT_MS, ctx.now);
                return Step::Progress;
            }
            if let Some(buf) = self.body.take() {
                ctx.shared.pool.give_back(buf);
                if let Some((uid, cgroup)) = self.owner() {
                    ctx.shared.shares.give_back(uid, cgroup, Resource::Body);
                }
            }
            self.resp_start = 0;
            self.resp_len = 0;
            self.set_state(State::AwaitingResponse, ctx.shared.upstream_timeout_ms, ctx.now);
            return Step::Progress;
        }
        let slices = [IoSlice::new(&self.bufs.up[self.up_sent..self.up_len]), IoSlice::new(&body[self.body_sent..])];
        match up.write_vectored(&slices) {
            Ok(0) => self.upstream_failed(ctx),
            Ok(mut n) => {
                let head_part = n.min(self.up_len - self.up_sent);
                self.up_sent += head_part;
                n -= head_part;
                self.body_sent += n;
                Step::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Step::Progress,
            Err(_) => self.upstream_failed(ctx),
        }
    }

    /// Relays a skip-listed body: checks what the client sent against its framing, writes the
    /// checked bytes upstream, reads more; then waits for the response. The bytes after the
    /// body's end stay in the buffer (a pipelined request).
    fn stream_body(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let Some(mut streamed) = self.streamed else { return Step::Close(CloseReason::Internal) };
        if streamed.ready == 0 {
            if streamed.done {
                self.streamed = None;
                self.resp_start = 0;
                self.resp_len = 0;
                self.set_state(State::AwaitingResponse, ctx.shared.upstream_timeout_ms, ctx.now);
                return Step::Progress;
            }
            if self.req_len > 0 {
                if let Err(status) = streamed.check(&self.bufs.req[..self.req_len]) {
                    // The host has part of a request it will never see end: that upstream goes.
                    self.streamed = None;
                    self.drop_upstream(ctx);
                    self.respond(ctx, status, &[], b"", true);
                    return Step::Progress;
                }
                self.streamed = Some(streamed);
                if streamed.ready > 0 || streamed.done {
                    return Step::Progress;
                }
                // Nothing was body yet (the decoder holds a partial chunk-size line): read on.
            }
            return match self.read_client() {
                Ok(_) => {
                    self.deadline = clock::after(ctx.now, STREAMED_BODY_IDLE_TIMEOUT_MS);
                    Step::Progress
                }
                Err(step) => step,
            };
        }
        let Some(up) = self.upstream.as_mut() else { return Step::Close(CloseReason::Internal) };
        match up.write(&self.bufs.req[..streamed.ready]) {
            Ok(0) => self.stream_failed(ctx),
            Ok(n) => {
                self.bufs.req.copy_within(n..self.req_len, 0);
                self.req_len -= n;
                streamed.ready -= n;
                self.streamed = Some(streamed);
                self.deadline = clock::after(ctx.now, STREAMED_BODY_IDLE_TIMEOUT_MS);
                Step::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Step::Progress,
            Err(_) => self.stream_failed(ctx),
        }
    }

    /// The upstream went away mid-body: the body cannot be replayed, so no retry.
    fn stream_failed(&mut self, ctx: &mut Ctx<'_>) -> Step {
        self.streamed = None;
        self.drop_upstream(ctx);
        self.respond(ctx, 502, &[], b"", true);
        Step::Progress
    }

    /// The upstream failed before any response byte. A kept-alive connection the host closed
    /// meanwhile is retried once on a fresh connection (nothing was processed upstream);
    /// otherwise the client gets `502`.
    fn upstream_failed(&mut self, ctx: &mut Ctx<'_>) -> Step {
        self.drop_upstream(ctx);
        if self.upstream_reused && self.resp_len == 0 {
            self.upstream_reused = false;
            self.up_sent = 0;
            self.body_sent = 0;
            return self.connect_upstream(ctx);
        }
        self.respond(ctx, 502, &[], b"", true);
        Step::Progress
    }

    fn await_response(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let Some(up) = self.upstream.as_mut() else { return Step::Close(CloseReason::Internal) };
        // Keep room to insert the marker header (and `connection: close`) into the head in place.
        let limit = self.bufs.resp.len() - MARKER_CLOSING.len();
        if self.resp_len == limit {
            self.drop_upstream(ctx);
            self.respond(ctx, 502, &[], b"", true);
            return Step::Progress;
        }
        match read_some(up, &mut self.bufs.resp[self.resp_len..limit]) {
            Ok(0) => self.upstream_failed(ctx),
            Ok(n) => {
                self.resp_len += n;
                self.deadline = clock::after(ctx.now, ctx.shared.upstream_timeout_ms);
                let is_head = self.exchange.as_ref().is_some_and(|e| e.is_head);
                match ResponseHead::parse(&self.bufs.resp[..self.resp_len], is_head) {
                    Ok(Some(head)) => self.on_response_head(ctx, head),
                    Ok(None) => Step::Progress,
                    Err(_) => {
                        self.drop_upstream(ctx);
                        self.respond(ctx, 502, &[], b"", true);
                        Step::Progress
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Step::Progress,
            Err(_) => self.upstream_failed(ctx),
        }
    }

    fn on_response_head(&mut self, ctx: &mut Ctx<'_>, head: ResponseHead) -> Step {
        if head.status == 100 {
            // Interim response to a body we already sent whole: drop it, read the final one.
            self.bufs.resp.copy_within(head.head_len..self.resp_len, 0);
            self.resp_len -= head.head_len;
            return Step::Progress;
        }
        // Insert the marker after the status line.
        let marker = if ctx.shared.draining { MARKER_CLOSING } else { MARKER };
        let at = head.status_line_len;
        self.bufs.resp.copy_within(at..self.resp_len, at + marker.len());
        self.bufs.resp[at..at + marker.len()].copy_from_slice(marker);
        self.resp_len += marker.len();
        let body_start = head.head_len + marker.len();
        self.remaining = match head.framing {
            ResponseFraming::None => Remaining::Done,
            ResponseFraming::Length(n) => Remaining::Bytes(n),
            ResponseFraming::Chunked => Remaining::Chunked(ChunkedDecoder::new()),
            ResponseFraming::UntilClose => Remaining::UntilClose,
        };
        self.upstream_keep_alive = head.keep_alive;
        if let Some(e) = self.exchange.as_mut() {
            e.status = head.status;
            e.close |= !head.keep_alive || ctx.shared.draining;
        }
        self.resp_start = 0;
        self.resp_len = body_start + self.track_body(body_start);
        self.set_state(State::Relaying, ctx.shared.upstream_timeout_ms, ctx.now);
        Step::Progress
    }

    /// Feeds response body bytes at `from..resp_len` to the framing tracker and returns how
    /// many belong to this response (the rest, if any, is dropped with the upstream).
    fn track_body(&mut self, from: usize) -> usize {
        let input = &self.bufs.resp[from..self.resp_len];
        let keep = match &mut self.remaining {
            Remaining::Done => 0,
            Remaining::UntilClose => input.len(),
            Remaining::Bytes(left) => {
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(input.len());
                *left -= take as u64;
                if *left == 0 {
                    self.remaining = Remaining::Done;
                }
                take
            }
            Remaining::Chunked(decoder) => match decoder.feed(input, |_| {}) {
                Ok(n) => {
                    if decoder.is_done() {
                        self.remaining = Remaining::Done;
                    }
                    n
                }
                Err(_) => {
                    // A malformed chunked response: relay what we have, then close.
                    self.upstream_keep_alive = false;
                    if let Some(e) = self.exchange.as_mut() {
                        e.close = true;
                    }
                    self.remaining = Remaining::Done;
                    input.len()
                }
            },
        };
        if keep < input.len() {
            // The upstream sent more than the response: it cannot be reused safely.
            self.upstream_keep_alive = false;
        }
        keep
    }

    fn relay(&mut self, ctx: &mut Ctx<'_>) -> Step {
        if self.resp_start < self.resp_len {
            return match self.client.write(&self.bufs.resp[self.resp_start..self.resp_len]) {
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
        if matches!(self.remaining, Remaining::Done) {
            return self.finish_exchange(ctx);
        }
        let Some(up) = self.upstream.as_mut() else { return Step::Close(CloseReason::Internal) };
        match read_some(up, &mut self.bufs.resp[..]) {
            Ok(0) => {
                if matches!(self.remaining, Remaining::UntilClose) {
                    self.remaining = Remaining::Done;
                    self.upstream_keep_alive = false;
                    if let Some(e) = self.exchange.as_mut() {
                        e.close = true;
                    }
                    Step::Progress
                } else {
                    // Truncated response: the client sees the connection end.
                    Step::Close(CloseReason::UpstreamClosed)
                }
            }
            Ok(n) => {
                self.resp_start = 0;
                self.resp_len = n;
                self.resp_len = self.track_body(0);
                self.deadline = clock::after(ctx.now, ctx.shared.upstream_timeout_ms);
                Step::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Step::Progress,
            Err(_) => Step::Close(CloseReason::UpstreamClosed),
        }
    }

    fn set_decision(&mut self, decision: &'static str) {
        if let Some(e) = self.exchange.as_mut() {
            e.decision = decision;
        }
    }

    fn finish_exchange(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let exchange = self.exchange.take();
        let close = exchange.as_ref().is_some_and(|e| e.close);
        if let Some(e) = exchange {
            ctx.shared.record(self.caller.as_ref(), self.peer, &e, ctx.now);
        }
        if !self.upstream_keep_alive {
            self.drop_upstream(ctx);
        }
        // A draining agent (handed over) keeps no connection alive: the client's next
        // connection goes to the successor.
        if close || ctx.shared.draining {
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
    fn respond_method_not_allowed(&mut self, ctx: &mut Ctx<'_>) {
        let allow: &[&[u8]] = &[
            b"allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH\r\n",
            b"content-type: text/plain; charset=utf-8\r\n",
        ];
        self.respond(ctx, 405, allow, b"Method Not Allowed", true);
    }

    /// Formats a response into the response buffer and switches to writing it.
    fn respond(&mut self, ctx: &mut Ctx<'_>, status: u16, extra: &[&[u8]], body: &[u8], close: bool) {
        let close = close || ctx.shared.draining;
        let len_buf = crate::http::decimal(u64::try_from(body.len()).unwrap_or(u64::MAX));
        let mut w = 0;
        let parts: [&[u8]; 6] = [
            b"HTTP/1.1 ",
            status_line(status),
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
            if status >= 500 && e.decision == "allow" {
                e.decision = "error";
            }
            ctx.shared.record(self.caller.as_ref(), self.peer, &e, ctx.now);
        }
        if close {
            self.drop_upstream(ctx);
        }
        self.set_state(State::WritingLocal { close }, CLIENT_WRITE_TIMEOUT_MS, ctx.now);
    }

    fn write_local(&mut self, ctx: &mut Ctx<'_>, close: bool) -> Step {
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

/// One read, retried on `Interrupted`.
fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Status code and reason phrase for the answers the proxy generates.
pub(crate) fn status_line(status: u16) -> &'static [u8] {
    match status {
        200 => b"200 OK",
        400 => b"400 Bad Request",
        403 => b"403 Forbidden",
        405 => b"405 Method Not Allowed",
        408 => b"408 Request Timeout",
        413 => b"413 Content Too Large",
        421 => b"421 Misdirected Request",
        429 => b"429 Too Many Requests",
        431 => b"431 Request Header Fields Too Large",
        502 => b"502 Bad Gateway",
        503 => b"503 Service Unavailable",
        504 => b"504 Gateway Timeout",
        _ => b"500 Internal Server Error",
    }
}

/// The peer of an accepted socket as IPv4 (the listener is IPv4 loopback only).
pub(crate) fn peer_v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().map(|ip| SocketAddrV4::new(ip, a.port())),
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
