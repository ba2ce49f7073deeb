// SPDX-License-Identifier: MIT
//! The allowlist: rules model, compilation and per-request decisions.
//! Spec: `../shared/spec/msp-protocol.md` §4.
pub mod rules;
