// SPDX-License-Identifier: MIT
//! The Metadata Security Protocol: status document, key, request signing, key keeper.
//! Spec: `../shared/spec/msp-protocol.md` §1–§3.
