// SPDX-License-Identifier: MIT
//! The answer: the upstream's response head read, the marker inserted, the body relayed to its
//! framed end (the upstream parked for keep-alive when it can be); and the answers the proxy
//! writes itself.

use std::io::{self, Write};

use super::state::{
    CloseReason, Connection, Ctx, Remaining, Sending, State, Step, Upstream, drop_upstream, park_upstream, read_some,
    release,
};
use crate::clock;
use crate::http::{ChunkedDecoder, ResponseFraming, ResponseHead};
use crate::limits::{CLIENT_WRITE_TIMEOUT_MS, IDLE_TIMEOUT_MS};
use crate::proxy::gate::{Decision, Gate};

/// Added to every proxied response (MSP §5.7): tells the caller the call went through us.
pub(super) const MARKER: &[u8] = b"x-ms-azure-host-authorization: value\r\n";
/// The marker plus `connection: close`, for a connection that ends after the response (a
/// draining agent, a client that asked): the client learns from the response itself not to
/// reuse the connection. Its own line comes first, so a
/// client that reads only the first `Connection` header sees `close`.
pub(super) const MARKER_CLOSING: &[u8] = b"x-ms-azure-host-authorization: value\r\nconnection: close\r\n";

impl Connection {
    pub(super) fn await_response<G: Gate>(
        &mut self,
        ctx: &mut Ctx<'_, G>,
        mut up: Upstream,
        replay: Option<Sending>,
    ) -> Step {
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
                self.parse_response(ctx, up, replay)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.state = State::AwaitingResponse { up, replay };
                Step::Blocked
            }
            Err(_) => self.upstream_failed(ctx, up, replay),
        }
    }

    /// Parses the response bytes read so far: the head, or more to read.
    fn parse_response<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, up: Upstream, replay: Option<Sending>) -> Step {
        let is_head = self.exchange.as_ref().is_some_and(|e| e.is_head);
        match ResponseHead::parse(&self.bufs.resp[..self.resp_len], is_head) {
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

    pub(super) fn on_response_head<G: Gate>(
        &mut self,
        ctx: &mut Ctx<'_, G>,
        up: Upstream,
        replay: Option<Sending>,
        head: ResponseHead,
    ) -> Step {
        if head.status == 101 {
            // An upgrade the proxy cannot relay (it speaks HTTP/1.1 only).
            self.state = State::AwaitingResponse { up, replay };
            return self.fail(ctx, 502);
        }
        if (100..200).contains(&head.status) {
            // Interim (`100 Continue` to a body already sent whole, `103 Early Hints`): dropped,
            // the final response follows. Taken for the final one, it would leave the real
            // answer on the upstream to be read as the next request's.
            self.bufs.resp.copy_within(head.head_len..self.resp_len, 0);
            self.resp_len -= head.head_len;
            // The final head may have come in the same read.
            return self.parse_response(ctx, up, replay);
        }
        // The response has begun: the request will not be sent again.
        if let Some(send) = replay {
            send.body.give_back(ctx.gate);
        }
        // Insert the marker after the status line. The client connection ends after this
        // response when the agent drains or the client asked (its `Connection: close` stays
        // on its own hop: the upstream does not see it and may answer keep-alive), and then the
        // response says so, or the client would send its next request into a closed socket.
        let draining = ctx.gate.draining();
        let client_closes = self.exchange.as_ref().is_some_and(|e| e.close);
        let marker = if draining || client_closes { MARKER_CLOSING } else { MARKER };
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
    pub(super) fn track_body(&mut self, from: usize, remaining: &mut Remaining, keep_alive: &mut bool) -> usize {
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

    pub(super) fn relay<G: Gate>(
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

    pub(super) fn finish_exchange<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, up: Upstream, keep_alive: bool) -> Step {
        let exchange = self.exchange.take();
        let close = exchange.as_ref().is_some_and(|e| e.close);
        if let Some(e) = exchange {
            ctx.gate.record(self.caller.as_ref(), self.peer, &e, ctx.now);
        }
        if keep_alive && !up.carried_client_framing {
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

    /// MSP §5.4 step 2: `405` with the `Allow` list and a text body.
    pub(super) fn respond_method_not_allowed<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>) {
        let allow: &[&[u8]] = &[
            b"allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH\r\n",
            b"content-type: text/plain; charset=utf-8\r\n",
        ];
        self.respond(ctx, 405, allow, b"Method Not Allowed", true);
    }

    /// Answers `status` with no body and closes, ending whatever the current state holds.
    pub(super) fn fail<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, status: u16) -> Step {
        self.respond_empty(ctx, status);
        Step::Progress
    }

    pub(super) fn respond_empty<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, status: u16) {
        self.respond(ctx, status, &[], b"", true);
    }

    /// Formats a response into the response buffer and switches to writing it. What the
    /// current state holds (a body buffer, an upstream mid-exchange) goes back now; a parked
    /// upstream goes too when the connection will close.
    pub(super) fn respond<G: Gate>(
        &mut self,
        ctx: &mut Ctx<'_, G>,
        status: u16,
        extra: &[&[u8]],
        body: &[u8],
        close: bool,
    ) {
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
            park_upstream(ctx.gate, ctx.registry, up, ctx.now);
        }
        self.set_state(State::WritingLocal { close }, CLIENT_WRITE_TIMEOUT_MS, ctx.now);
    }

    pub(super) fn write_local<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, close: bool) -> Step {
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
