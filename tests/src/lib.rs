// SPDX-License-Identifier: MIT
//! Privileged system tests and the fake MSP host.

#![allow(
    clippy::disallowed_methods,
    reason = "test tooling measures real time; the agent's injected clock is not in play here"
)]

pub mod callers;
pub mod fake_host;
pub mod harness;
