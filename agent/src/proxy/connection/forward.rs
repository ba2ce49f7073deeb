// SPDX-License-Identifier: MIT
//! The upstream side of a request: endorsed (signed, unsigned, or held for the key latch),
//! serialised by `proxy::upstream`, sent on the parked upstream or a new one, a skip-listed
//! body streamed after its head; a stale kept-alive upstream retried once with the request.

use std::io::{self, IoSlice, Write};

use mio::Interest;
use mio::net::TcpStream;

use super::body::{Outgoing, Streamed};
use super::state::{Connection, Ctx, Sending, State, Step, Upstream, drop_upstream, park_upstream, still_clean};
use crate::clock;
use crate::http::RequestHead;
use crate::limits::{KEY_LATCH_HOLD_MS, STREAMED_BODY_IDLE_TIMEOUT_MS, UPSTREAM_CONNECT_TIMEOUT_MS};
use crate::proxy::gate::{Endorse, Gate, Route};
use crate::proxy::upstream::{self, Endorsement, RequestBody};

impl Connection {
    /// Serialises (and signs) the request head, then sends it on the parked upstream or a new
    /// one. Without a key yet, holds the request for the latch (`held`: it already waits).
    pub(super) fn prepare_upstream<G: Gate>(
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
        // Read from the head while its bytes are still in place (the next request's come next).
        let idempotent = matches!(head.method(req), b"GET" | b"HEAD" | b"OPTIONS" | b"PUT" | b"DELETE");
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
        // The response buffer counts this request's answer from now on ("no response byte yet"
        // decides whether it may be sent again).
        self.resp_start = 0;
        self.resp_len = 0;
        let streamed = matches!(body, Outgoing::Streamed(_));
        let send = Sending { idempotent, up_len, up_sent: 0, body, body_sent: 0 };
        match self.parked.take() {
            // A streamed body cannot be replayed, so a kept-alive upstream the host may have
            // closed meanwhile is not risked: it goes up on a fresh connection (the parked
            // one to the pool). One the host closed already (or that holds stray bytes) goes.
            Some(up) if streamed => {
                park_upstream(ctx.gate, ctx.registry, up, ctx.now);
                self.connect_upstream(ctx, route, send, true)
            }
            Some(mut up) if still_clean(&up.stream) => {
                up.reused = true;
                self.set_state(State::SendingRequest { up, send }, ctx.gate.upstream_timeout_ms(), ctx.now);
                Step::Progress
            }
            Some(up) => {
                drop_upstream(ctx.gate, ctx.registry, up);
                self.connect_upstream(ctx, route, send, false)
            }
            None => self.connect_upstream(ctx, route, send, streamed),
        }
    }

    /// Takes an upstream for `send`: from the pool, unless `fresh` (a streamed body, which
    /// cannot be replayed, or the retry of a stale one), else a new connect.
    pub(super) fn connect_upstream<G: Gate>(
        &mut self,
        ctx: &mut Ctx<'_, G>,
        route: Route,
        send: Sending,
        fresh: bool,
    ) -> Step {
        // One uid's requests in flight to the hosts are bounded: its slow upstreams cannot
        // hold every descriptor and connection the others need.
        if !ctx.gate.take_upstream(&route) {
            send.body.give_back(ctx.gate);
            return self.fail(ctx, 503);
        }
        let (mut stream, reused) = match ctx.gate.connect(&route, fresh, ctx.now) {
            Ok((s, reused)) => (TcpStream::from_std(s), reused),
            Err(e) => {
                ctx.gate.give_back_upstream(&route);
                log::warn!(target: "gpa::proxy", "upstream connect failed: destination={} error={e}", route.destination);
                send.body.give_back(ctx.gate);
                return self.fail(ctx, 502);
            }
        };
        if !reused && let Err(e) = stream.set_nodelay(true) {
            log::debug!(target: "gpa::proxy", "TCP_NODELAY not set upstream: {e}");
        }
        if ctx.registry.register(&mut stream, ctx.upstream_token, Interest::READABLE | Interest::WRITABLE).is_err() {
            ctx.gate.give_back_upstream(&route);
            send.body.give_back(ctx.gate);
            return self.fail(ctx, 502);
        }
        let up = Upstream { stream, route, reused, carried_client_framing: false };
        if reused {
            // Connected long ago: straight to sending.
            self.set_state(State::SendingRequest { up, send }, ctx.gate.upstream_timeout_ms(), ctx.now);
        } else {
            self.set_state(State::Connecting { up, send }, UPSTREAM_CONNECT_TIMEOUT_MS, ctx.now);
        }
        Step::Progress
    }

    pub(super) fn connecting<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, up: Upstream, send: Sending) -> Step {
        let connected = match up.stream.take_error() {
            Ok(Some(_)) | Err(_) => Err(()),
            Ok(None) => match up.stream.peer_addr() {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotConnected || e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                Err(_) => Err(()),
            },
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

    pub(super) fn send_request<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, mut up: Upstream, mut send: Sending) -> Step {
        let body: &[u8] = if let Outgoing::Buffered(b) = &send.body { b.bytes() } else { &[] };
        if send.up_sent == send.up_len && send.body_sent == body.len() {
            if let Outgoing::Streamed(streamed) = send.body {
                up.carried_client_framing = true;
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
    pub(super) fn stream_body<G: Gate>(
        &mut self,
        ctx: &mut Ctx<'_, G>,
        mut up: Upstream,
        mut streamed: Streamed,
    ) -> Step {
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

    /// The upstream failed before any response byte. On a kept-alive connection the host
    /// closed meanwhile, the request is sent once more on a fresh connection: always if it had
    /// not gone up whole (the host cannot have acted on part of a request), and after it had
    /// only if its method is idempotent (RFC 9110 §9.2.2: the host may have acted on it).
    /// Otherwise the client gets `502`.
    pub(super) fn upstream_failed<G: Gate>(
        &mut self,
        ctx: &mut Ctx<'_, G>,
        up: Upstream,
        replay: Option<Sending>,
    ) -> Step {
        let (route, reused) = (up.route, up.reused);
        drop_upstream(ctx.gate, ctx.registry, up);
        match replay {
            Some(mut send) if reused && self.resp_len == 0 && (send.idempotent || !send.sent_whole()) => {
                send.up_sent = 0;
                send.body_sent = 0;
                self.connect_upstream(ctx, route, send, true)
            }
            Some(send) => {
                send.body.give_back(ctx.gate);
                self.fail(ctx, 502)
            }
            None => self.fail(ctx, 502),
        }
    }
}
