// SPDX-License-Identifier: MIT
//! One client connection: an explicit state machine driven by readiness events.
//!
//! The files, in the order a request meets them: `state.rs` (the connection and its states,
//! each with exactly its data), `request.rs` (the head, the checks of MSP §5.4, the body),
//! `forward.rs` (the upstream request: endorsed, connected, sent, a skip-listed body
//! streamed), `response.rs` (the upstream's answer relayed with the marker, and the answers
//! the proxy writes itself); `body.rs` holds the two kinds of request body, `buffers.rs` the
//! slot's fixed buffers. This file drives it all: one step after another until it would block,
//! and what each state does when its deadline passes.
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

mod body;
mod buffers;
mod forward;
mod request;
mod response;
mod state;

pub use self::buffers::Buffers;
pub use self::state::{CloseReason, Connection, Ctx, Next};
use self::state::{Expiry, State, Step};
use super::gate::{Decision, Gate};
use crate::limits::STEPS_PER_DRIVE;

impl Connection {
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
    pub(super) fn audit_abandoned<G: Gate>(&mut self, ctx: &mut Ctx<'_, G>) {
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
            Expiry::Close(reason) => {
                // A response cut by its deadline leaves its record too.
                self.audit_abandoned(ctx);
                return Next::Close(reason);
            }
            Expiry::Answer(status) => self.respond_empty(ctx, status),
            Expiry::RetryLater => self.respond(ctx, 429, &[b"retry-after: 1\r\n"], b"", true),
        }
        self.drive(ctx)
    }
}
