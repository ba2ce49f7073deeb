// SPDX-License-Identifier: MIT
//! Every capacity, size and timeout of the agent in one place, each with its unit and why.
//!
//! Fixed-size buffers only stay honest if their limits are visible; change a number here and
//! nowhere else.

/// Default size of the connection table. A metadata guard serves a handful of local callers;
/// 1,024 concurrent connections is far above any legitimate load and bounds memory at about
/// 1,024 × [`CONNECTION_BUFFER_BYTES`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Hard ceiling for the configured table size.
pub const MAX_CONNECTIONS_LIMIT: usize = 65_536;

/// Largest request head (request line + headers) accepted from a client. IMDS and WireServer
/// requests are a few hundred bytes; 8 KiB matches common server defaults. Over it: `431`.
pub const REQUEST_HEAD_MAX_BYTES: usize = 8 * 1024;
/// Most headers in one request or response head (httparse needs a fixed array).
pub const MAX_HEADERS: usize = 48;
/// Largest request body accepted for signing (MSP §5.6: 100 KiB). Over it: `413`.
pub const REQUEST_BODY_MAX_BYTES: usize = 100 * 1024;
/// Request body buffers shared by all connections: only requests with a body need one, and
/// metadata callers almost never send bodies. When all are busy a new body gets `503`.
pub const BODY_BUFFERS: usize = 16;
/// Room for the upstream request head we serialise: the client's head plus our own headers
/// (claims, date, authorization ≈ 300 bytes).
pub const UPSTREAM_HEAD_MAX_BYTES: usize = REQUEST_HEAD_MAX_BYTES + 1024;
/// Response relay buffer per connection. Also the largest upstream response head accepted
/// (a bigger head gets `502`).
pub const RESPONSE_BUFFER_BYTES: usize = 16 * 1024;
/// All buffers one connection slot owns, allocated on first use of the slot and reused.
pub const CONNECTION_BUFFER_BYTES: usize = REQUEST_HEAD_MAX_BYTES + UPSTREAM_HEAD_MAX_BYTES + RESPONSE_BUFFER_BYTES;

/// Time a client has to send a complete request head (slow-loris bound).
pub const CLIENT_HEAD_TIMEOUT_MS: u64 = 10_000;
/// Time a client has to send a complete request body.
pub const CLIENT_BODY_TIMEOUT_MS: u64 = 10_000;
/// Time the upstream has to accept a TCP connection (answer: `502`).
pub const UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Default time the upstream has to send a complete response head (answer: `504`) and, after
/// that, the longest gap allowed between response bytes (config `upstreamTimeoutMs`).
pub const UPSTREAM_RESPONSE_TIMEOUT_MS: u64 = 30_000;
/// Time a keep-alive connection may sit idle between requests.
pub const IDLE_TIMEOUT_MS: u64 = 60_000;
/// Time a response may take to drain to a slow client.
pub const CLIENT_WRITE_TIMEOUT_MS: u64 = 30_000;

/// mio events handled per poll turn.
pub const EVENTS_PER_TURN: usize = 256;

/// Capacities of the kernel maps; must equal the `*_MAX_ENTRIES` in `ebpf/redirect.bpf.c`.
pub const POLICY_MAX_ENTRIES: u32 = 16;
/// See [`POLICY_MAX_ENTRIES`].
pub const AUDIT_MAX_ENTRIES: u32 = 16_384;

/// Entries in the uid → user/groups cache (bounded; evicts round-robin when full).
pub const IDENTITY_CACHE_ENTRIES: usize = 64;
/// Longest user, group or process name kept.
pub const NAME_MAX_BYTES: usize = 64;
/// Groups kept per user.
pub const GROUPS_PER_USER: usize = 16;
/// Longest executable path kept (PATH_MAX is 4096; real binaries are far shorter).
pub const EXE_PATH_MAX_BYTES: usize = 512;
/// Longest command line kept for audit (first items only, like the reference).
pub const CMDLINE_MAX_BYTES: usize = 256;
