// SPDX-License-Identifier: MIT
//! Optional telemetry upload to the WireServer (MSP §1.2 D–G, §7.2–§7.4).
//!
//! Files, one role each: [`extract`] (a bounded XML value reader), [`metadata`] (goal state,
//! shared config, OS), [`imds`] (the IMDS compute values).

pub mod extract;
pub mod imds;
pub mod metadata;
