// SPDX-License-Identifier: MIT
//! guest-proxy-agent: the in-guest half of the Metadata Security Protocol (MSP).
//!
//! How the pieces connect (one thread, one `mio` loop, no async runtime):
//!
//! ```text
//!  caller connect() ──[ebpf/redirect.bpf.c: connect4/connect6 rewrite, sockops re-key]──┐
//!                                                                                        v
//!  event_loop ── accept ──> identity (audit map → pid, exe, uid, user, groups)
//!      │                      │
//!      │                   connection (http head parse → checks → policy → msp::signing)
//!      │                      │
//!      │                   upstream connect (SO_MARK: exempt from redirect) → relay response
//!      │
//!      ├── msp::key_keeper (status poll, key latch, attestation) → redirect policy map
//!      ├── telemetry::uploader (optional: queued events → WireServer, MSP §7.2)
//!      └── signals (signalfd), status timer
//! ```
//!
//! Modules, one role each: [`limits`] (every capacity and timeout), [`config`], [`clock`]
//! (reads clocks), [`calendar`] (converts times to and from text), [`text`] (JSON escaping,
//! hex), [`logger`], [`sys`] (all `unsafe`), [`redirect`] (eBPF load/attach/maps),
//! [`identity`] (who is calling), [`http`] (parsing and framing), [`proxy`] (event loop and
//! connections), [`msp`] (protocol: status document, key, signing), [`policy`] (allowlist),
//! [`telemetry`] (optional event upload), [`handover`] (passing the listener from the
//! initramfs agent to the root file system's agent), [`cli`] (parsing the command line),
//! [`commands`] (the sub-commands' bodies), [`exit`] (the exit statuses). `fuzzing` (hidden,
//! feature `fuzzing`) re-exports what the fuzz targets in `fuzz/` use.

#![deny(unsafe_code)]

#[cfg(all(feature = "fuzzing", not(debug_assertions)))]
compile_error!("the `fuzzing` feature must never be enabled in a release build");

pub mod audit;
pub mod calendar;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod doctor;
pub mod exit;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod handover;
pub mod http;
pub mod identity;
pub mod limits;
pub mod listener;
pub mod logger;
pub mod msp;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod status;
#[expect(unsafe_code, reason = "the one module allowed raw libc; every block has a SAFETY comment")]
pub mod sys;
pub mod telemetry;
pub mod text;

/// The agent's version, as printed by `--version` and reported in the status document.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
