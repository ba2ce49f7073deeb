// SPDX-License-Identifier: MIT
//! Status reporting (MSP §6): what the agent tells operators and the host about itself.
//!
//! * [`summary`]: per-request connection summaries in two bounded tables (§6.3).
//! * [`document`]: the aggregate status document (§6.2), rendered with serde-json-core into a
//!   fixed buffer from a plain [`StatusInputs`] the event loop fills from the live components.
//! * [`writer`]: the atomic, symlink-safe write of `<logDir>/status.json` (§6.4), which is also
//!   the `monitorStatus` component.
//! * [`view`]: reading a document back for `guest-proxy-agent status` and `doctor`.
//!
//! Nothing here reads a clock or touches the network: the loop passes the time in, renders on
//! its status timer (every `statusIntervalSeconds`) and for `/gpa-aggregated-status`.

pub mod document;
pub mod summary;
pub mod view;
pub mod writer;

pub use self::document::{
    KeyLatchStates, ModuleState, ModuleStatus, RenderError, Rendered, STATUS_JSON_MAX_BYTES, StatusInputs, new_buffer,
    overall, render,
};
pub use self::summary::{Recorded, Summaries, SummaryKind, SummaryRecord};
pub use self::writer::{StatusWriter, WriteError, write_atomic};
