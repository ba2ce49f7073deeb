// SPDX-License-Identifier: MIT
//! The client side of a request: its head, the checks of MSP §5.4 in order (traversal, local
//! endpoints, identity, body limit, authorization), and a body read whole for signing.

use std::io::{self, Write};

use super::body::{BufferedBody, Outgoing, Streamed};
use super::state::{CloseReason, Connection, Ctx, State, Step, read_some};
use crate::clock;
use crate::http::{BodyFraming, ChunkedDecoder, HeadError, RequestHead};
use crate::limits::{
    CLIENT_BODY_TIMEOUT_MS, CLIENT_HEAD_TIMEOUT_MS, EXCHANGE_METHOD_MAX_BYTES, EXCHANGE_PATH_MAX_BYTES,
    REQUEST_BODY_MAX_BYTES, SKIP_LIST_BODY_MAX_BYTES,
};
use crate::proxy::gate::{Decision, Exchange, Gate, Route, Verdict};

impl Connection {
    pub(super) fn read_head<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>) -> Step {
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
    pub(super) fn read_client(&mut self) -> Result<usize, Step> {
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

    pub(super) fn decide(&mut self, decision: Decision) {
        if let Some(e) = self.exchange.as_mut() {
            e.decision = decision;
        }
    }

    /// MSP §5.4, in order: method (refused by the parser), traversal, local endpoints,
    /// identity, body limit, authorization; then the body or the upstream.
    pub(super) fn on_head<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>, head: RequestHead) -> Step {
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
        let streamed =
            head.framing != BodyFraming::None && crate::policy::decide::is_skip_listed(route.endpoint, method, target);
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
    pub(super) fn send_continue(&mut self, head: &RequestHead) {
        if head.expect_continue && self.req_len == head.head_len {
            // Best effort: a client that does not see it sends the body after its own delay.
            drop(self.client.write(b"HTTP/1.1 100 Continue\r\n\r\n"));
        }
    }

    pub(super) fn read_body<G: Gate>(
        &mut self,
        ctx: &mut Ctx<'_, G>,
        head: RequestHead,
        mut body: BufferedBody,
    ) -> Step {
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
}
