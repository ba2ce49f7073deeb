// SPDX-License-Identifier: MIT
//! The hand-over steps, as the loop lives them (the socket protocol is [`crate::handover`]).
//!
//! ```text
//! early agent:   Offering ── taker says stop ──> Draining ── last connection ends ──> exit
//! taking agent:  Taking ── key latch ready (or deadline) ──> accepting, early agent told to stop
//! ```
//!
//! The loop owns the listener and its registration; this state machine says when to accept,
//! when to stop accepting and when the agent is done.

use std::net::SocketAddrV4;
use std::os::fd::AsFd;
use std::time::Instant;

use mio::net::TcpListener;
use mio::{Interest, Registry, Token};

use crate::config::ValidatedConfig;
use crate::handover::{Offer, PeerEvent, Taker};
use crate::{clock, logger};

/// The listener hand-over in progress, if any.
#[derive(Debug)]
pub(crate) enum Handover {
    /// Not involved.
    None,
    /// Early agent: offering the listener to the next agent.
    Offering(Offer),
    /// Taking over: the shared listener is held but not yet accepted on; the early agent is
    /// told to stop once this agent is ready (or at the deadline).
    Taking { taker: Taker, deadline: Instant, started: Instant },
    /// Handed over: accepting no more; exit when the last connection ends or at the deadline.
    Draining { deadline: Instant, successor: u32 },
}

/// What [`Handover::advance`] asks of the loop.
#[derive(Debug)]
pub(crate) enum Advance {
    /// Nothing this turn.
    Wait,
    /// Taking agent, ready: accept on the shared listener, then [`finish_takeover`].
    TakeOver { taker: Taker, started: Instant },
    /// Early agent, handed over and drained: exit without unpinning.
    Done,
}

impl Handover {
    /// Taking over from an early agent whose listener this agent now shares.
    pub(crate) fn taking(taker: Taker, started: Instant) -> Self {
        Self::Taking { taker, deadline: clock::after(clock::now(), crate::limits::TAKEOVER_READY_WAIT_MS), started }
    }

    /// Early agent: listen for the agent that will take over (only with pinning, which is
    /// what lets the successor adopt the programs and maps).
    pub(crate) fn offer(config: &ValidatedConfig, registry: &Registry, token: Token) -> Self {
        let (Some(path), Some(_)) = (&config.handover_socket, &config.pin_dir) else {
            log::warn!(target: "gpa::handover", "no listener hand-over: it needs handoverSocket and pinPath");
            return Self::None;
        };
        match Offer::bind(path) {
            Ok(mut offer) => match registry.register(offer.listener(), token, Interest::READABLE) {
                Ok(()) => {
                    logger::milestone(&format!("offering the listener for hand-over on {}", path.display()));
                    Self::Offering(offer)
                }
                Err(e) => {
                    log::warn!(target: "gpa::handover", "no listener hand-over: {e}");
                    Self::None
                }
            },
            Err(e) => {
                log::warn!(target: "gpa::handover", "no listener hand-over on {}: {e}", path.display());
                Self::None
            }
        }
    }

    /// Handed over: the loop finishes its connections with `connection: close`.
    pub(crate) fn is_draining(&self) -> bool {
        matches!(self, Self::Draining { .. })
    }

    /// The hand-over's own deadline, if one is running.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self {
            Self::Taking { deadline, .. } | Self::Draining { deadline, .. } => Some(*deadline),
            Self::None | Self::Offering(_) => None,
        }
    }

    /// Early agent: a taker connected; send it `listener` and watch what it says on `peer`.
    pub(crate) fn offer_listener(
        &mut self,
        registry: &Registry,
        peer: Token,
        listener: Option<&TcpListener>,
        listen: SocketAddrV4,
    ) {
        let Self::Offering(offer) = self else { return };
        let Some(listener) = listener else {
            // Nothing to offer: the taker times out and binds its own.
            log::warn!(target: "gpa::handover", "a taker connected, but this agent has no listener to offer");
            return;
        };
        match offer.accept(listener.as_fd(), listen) {
            Ok(Some(pid)) => {
                log::info!(target: "gpa::handover", "listener offered to pid {pid}");
                if let Some(stream) = offer.peer()
                    && let Err(e) = registry.register(stream, peer, Interest::READABLE)
                {
                    log::warn!(target: "gpa::handover", "cannot watch the taking agent: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => log::warn!(target: "gpa::handover", "hand-over accept failed: {e}"),
        }
    }

    /// Early agent: the taker said something (or went away). `Some(pid)`: it asked this agent
    /// to stop; the loop stops accepting and calls [`Handover::drain`].
    pub(crate) fn read_taker(&mut self) -> Option<u32> {
        let Self::Offering(offer) = self else { return None };
        match offer.read_peer() {
            PeerEvent::Pending => None,
            PeerEvent::Gone => {
                log::warn!(target: "gpa::handover", "the taking agent went away before taking over; still serving");
                None
            }
            PeerEvent::Stop(pid) => Some(pid),
        }
    }

    /// Early agent, handed over (the loop no longer accepts: the successor accepts from the
    /// same socket): answer what still comes on open connections with `connection: close`,
    /// then exit without unpinning once the last one ends. A kept-alive connection is not cut
    /// while idle (its client could be sending right then): it ends after its next response,
    /// or by its own idle timeout; `wait_ms` only bounds the wait.
    pub(crate) fn drain(&mut self, successor: u32, live: usize, wait_ms: u64, now: Instant) {
        if let Self::Offering(offer) = self {
            // Best effort: after switch_root this process may no longer see the path.
            drop(std::fs::remove_file(offer.path()));
        }
        logger::milestone(&format!("handed the listener over to pid {successor}; finishing {live} connections"));
        *self = Self::Draining { deadline: clock::after(now, wait_ms), successor };
    }

    /// Moves the hand-over along, given whether the key latch is ready and how many
    /// connections are open.
    pub(crate) fn advance(&mut self, now: Instant, ready: bool, live: usize) -> Advance {
        match self {
            Self::Taking { deadline, .. } if ready || now >= *deadline => {
                let Self::Taking { taker, started, .. } = std::mem::replace(self, Self::None) else {
                    return Advance::Wait;
                };
                Advance::TakeOver { taker, started }
            }
            Self::Draining { deadline, successor } if live == 0 || now >= *deadline => {
                logger::milestone(&format!(
                    "hand-over to pid {successor} complete{}; exiting without unpinning",
                    if live == 0 { "" } else { " (connections still open at the deadline are closed)" }
                ));
                Advance::Done
            }
            _ => Advance::Wait,
        }
    }
}

/// Taking agent: the shared listener is accepted on; tell the early agent to stop.
pub(crate) fn finish_takeover(taker: Taker, started: Instant, now: Instant, ready: bool) {
    let early = taker.early_pid;
    if let Err(e) = taker.stop() {
        log::warn!(target: "gpa::handover", "could not tell the early agent to stop: {e}");
    }
    let ms = now.saturating_duration_since(started).as_millis();
    logger::milestone(&format!(
        "took over from the early agent (pid {early}) after {ms} ms, key latch {}",
        if ready { "ready" } else { "not ready yet" }
    ));
}
