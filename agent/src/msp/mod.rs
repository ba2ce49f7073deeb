// SPDX-License-Identifier: MIT
//! The Metadata Security Protocol: status document, key, request signing, key keeper.
//! Spec: `../shared/spec/msp-protocol.md` §1–§3.
pub mod host_call;
pub mod host_clock;
pub mod key_doc;
pub mod key_keeper;
pub mod key_store;
pub mod signing;
pub mod status_doc;
