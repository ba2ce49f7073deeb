// SPDX-License-Identifier: MIT
//! What the fuzz targets in `fuzz/` reach: every untrusted-input parser, and the few types
//! their properties need, re-exported in one place.
//!
//! Only with the `fuzzing` feature (which `fuzz/Cargo.toml` turns on, and which lib.rs refuses
//! in release builds), and hidden from the documentation: this is a test seam, not an API. A
//! harness that needs something new adds it here, so the list says exactly which internals
//! the fuzzers depend on.

pub use crate::audit::redact as redact_command_line;
pub use crate::http::{BodyFraming, ChunkError, ChunkedDecoder, RequestHead, ResponseHead};
pub use crate::limits::{REQUEST_HEAD_MAX_BYTES, TELEMETRY_MESSAGE_MAX_BYTES};
pub use crate::msp::key_doc::{KEY_DOC_MAX_BYTES, KeyDoc};
pub use crate::msp::signing::canonical_query;
pub use crate::msp::status_doc::parse_status;
pub use crate::policy::canonical::{DecodeScratch, canonicalize, split_target, traversal_guard};
pub use crate::policy::local_rules::{parse_local_file, validate as validate_local_file};
pub use crate::proxy::scripted::run as run_connection_script;
pub use crate::telemetry::event::{Event, EventTime};
pub use crate::telemetry::imds::parse_compute;
pub use crate::telemetry::metadata::{VmMetadata, parse_goal_state, parse_shared_config, shared_config_target};
pub use crate::telemetry::xml::Batch;
