// SPDX-License-Identifier: MIT
//! Privileged system tests and the fake MSP host.

pub mod fake_host;
pub mod harness;
