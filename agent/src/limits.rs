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
/// Headers of a request the agent sends upstream and signs: every client header it accepted
/// plus its own (`content-length` of a de-chunked body, claims, date), so that whatever the
/// parser accepts can be signed.
pub const UPSTREAM_HEADERS_MAX: usize = MAX_HEADERS + 3;
/// Largest request body accepted for signing (MSP §5.6: 100 KiB). Over it: `413`.
pub const REQUEST_BODY_MAX_BYTES: usize = 100 * 1024;
/// Largest body of a skip-listed request (MSP §3.7, §5.6: 100 MiB, as the reference). Such a
/// body is never signed, so it is streamed through the connection's request buffer and never
/// held whole: the guest agent's log archive (`PUT /vmAgentLog`) reaches ~150 MB uncompressed
/// but is uploaded compressed. Declared or streamed over it: `413`.
pub const SKIP_LIST_BODY_MAX_BYTES: u64 = 100 * 1024 * 1024;
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

/// Longest a redirected request waits for the key latch (or the first status document) before
/// it is answered `429` with `Retry-After: 1` (issue 14). Early boot intercepts everything
/// before the network is up; a `503` there would be a provisioning failure to cloud-init,
/// which retries IMDS only on 404, 410, 429 and 500. Shorter than any client's read timeout
/// we know of (cloud-init's IMDS calls allow several seconds).
pub const KEY_LATCH_HOLD_MS: u64 = 5_000;
/// While requests are held, the key keeper polls the host at least this often, whatever its
/// backoff (a caller is waiting: the network may just have come up).
pub const KEY_LATCH_HOLD_POLL_MS: u64 = 250;

/// Time a client has to send a complete request head (slow-loris bound).
pub const CLIENT_HEAD_TIMEOUT_MS: u64 = 10_000;
/// Time a client has to send a complete request body.
pub const CLIENT_BODY_TIMEOUT_MS: u64 = 10_000;
/// Longest pause between two pieces of a streamed (skip-listed) body. Such a body may take
/// minutes, so the bound is on silence, not on the whole: it holds no body buffer, only its
/// connection and upstream, both counted in the caller's shares.
pub const STREAMED_BODY_IDLE_TIMEOUT_MS: u64 = 10_000;
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

/// Connection-table slots only uid 0 callers may take: while other users hold the rest, the
/// provisioning and guest agents (root) are still served (issue 13).
pub const ROOT_RESERVED_CONNECTIONS: usize = 64;
/// One non-root uid may hold at most `maxConnections / PER_UID_SHARE_DIVISOR` connections, so a
/// single user cannot take the table from the others (root has its reserve on top).
pub const PER_UID_SHARE_DIVISOR: usize = 4;
/// The non-root callers of one cgroup (a container, a service) may hold at most
/// `maxConnections / PER_CGROUP_SHARE_DIVISOR` connections together: one workload cannot take
/// the table from the others however many uids it runs as.
pub const PER_CGROUP_SHARE_DIVISOR: usize = 2;
/// Body buffers one non-root uid may hold: with [`ROOT_RESERVED_BODY_BUFFERS`] kept for root,
/// three uids' slow uploads together still leave the reserve untouched.
pub const PER_UID_BODY_BUFFERS: usize = 4;
/// One non-root uid may hold at most `maxConnections / PER_UID_UPSTREAM_DIVISOR` upstream
/// connections (requests in flight to a host): a flood of slow upstream answers from one user
/// keeps the other users' and root's requests moving.
pub const PER_UID_UPSTREAM_DIVISOR: usize = 8;
/// Audit records per second one non-root uid (all identity-less callers together count as one)
/// may write; beyond that they are counted into a `suppressed` record each second. At the
/// rate, one uid needs about an hour and a half to fill the default 5 × 10 MiB trail
/// (records of ~350 bytes), and its security records go to their own trail.
pub const AUDIT_UID_RECORDS_PER_SECOND: u32 = 25;
/// Records a uid may write at once before the rate applies (a boot's burst of requests is
/// audited in full).
pub const AUDIT_UID_BURST: u32 = 500;
/// Size of one audit file before rotation, and files kept per trail.
pub const AUDIT_FILE_BYTES: u64 = 10 * 1024 * 1024;
pub const AUDIT_FILES: u32 = 5;
/// Of [`BODY_BUFFERS`], how many only root callers may take (a health report or log upload
/// must not wait for other users' slow uploads).
pub const ROOT_RESERVED_BODY_BUFFERS: usize = 4;
/// Live connections without identity (direct connects to the listener, which can only ask the
/// local endpoints): more are refused at once.
pub const NO_IDENTITY_MAX_CONNECTIONS: usize = 64;
/// Head timeout of a connection without identity: it can only ask a local endpoint, which
/// takes one short request.
pub const NO_IDENTITY_HEAD_TIMEOUT_MS: u64 = 2_000;
/// After `accept` failed for lack of descriptors, the listener is tried again this soon (the
/// queue may hold connections that no new readiness event will announce).
pub const ACCEPT_RETRY_MS: u64 = 50;
/// Descriptors beyond two per connection slot: listener, epoll, signalfd, the spare, host
/// calls, the audit and status files, the hand-over socket.
pub const FD_RESERVE: u64 = 64;

/// Capacities of the kernel maps; must equal the `*_MAX_ENTRIES` in `ebpf/redirect.bpf.c`.
pub const POLICY_MAX_ENTRIES: u32 = 16;
/// See [`POLICY_MAX_ENTRIES`].
pub const AUDIT_MAX_ENTRIES: u32 = 16_384;
/// The agent listeners the kernel can redirect to (`LISTENERS_MAX_ENTRIES`, one per network
/// namespace served).
pub const LISTENERS_MAX_ENTRIES: u32 = 64;
/// The oldest kernel record the proxy still takes, measured from the connect. A redirected
/// connect is accepted within milliseconds; the slow legitimate cases (a TCP Fast Open connect
/// whose first write comes later, a full accept queue while the agent catches up) are seconds.
/// Anything older is not trusted to belong to the connection that presents it.
pub const RECORD_MAX_AGE_MS: u64 = 30_000;
/// Longest gap between the connect and its SYN that still counts as one `connect()` call. A
/// normal connect sends the SYN within the same system call (microseconds); `TCP_FASTOPEN_CONNECT`
/// defers it to the first write, which may come from another process after an `execve` (a
/// fork and an exec take milliseconds). Only the `/proc` fallback needs this: with the kernel's
/// task record the executable is fixed at the connect whatever happens later. A connect
/// preempted for longer than this inside the system call loses its executable identity once
/// (fails closed).
pub const DEFERRED_SYN_MS: u64 = 1;

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

/// Telemetry events kept in memory before upload (MSP §7.2: a queue of 1,000 entries). A full
/// queue drops new events and counts them; logging never waits for room.
pub const TELEMETRY_QUEUE_EVENTS: usize = 1000;
/// Bytes of event messages the telemetry queue holds at most, whatever their number: 64
/// full-size messages, or the whole queue of typical one-line messages (≈ 250 bytes each).
/// Bounds the queue's memory at about this plus [`TELEMETRY_QUEUE_EVENTS`] small headers.
pub const TELEMETRY_QUEUE_BYTES: usize = 256 * 1024;
/// Longest telemetry message (MSP §7.2: 4 KiB), cut on a character boundary after redaction.
pub const TELEMETRY_MESSAGE_MAX_BYTES: usize = 4 * 1024;
/// A log line is formatted into this much room before redaction and the cut to
/// [`TELEMETRY_MESSAGE_MAX_BYTES`], so a secret that straddles 4 KiB is still recognised whole.
pub const TELEMETRY_FORMAT_BYTES: usize = 2 * TELEMETRY_MESSAGE_MAX_BYTES;
/// Largest `TelemetryData` body posted (MSP §7.2: batches ≤ 64 KiB).
pub const TELEMETRY_BATCH_MAX_BYTES: usize = 64 * 1024;
/// Further attempts after a failed upload before the batch is dropped (MSP §1.2 G).
pub const TELEMETRY_UPLOAD_RETRIES: u32 = 5;
/// Pause between upload attempts (MSP §1.2 G: 15 s apart).
pub const TELEMETRY_RETRY_DELAY_MS: u64 = 15_000;
/// VM metadata (goal state, shared config, IMDS) is fetched again after this long; it changes
/// only on redeployment.
pub const TELEMETRY_METADATA_MAX_AGE_MS: u64 = 60 * 60 * 1000;
/// After start, uploads wait this long at most for the key latch, so the metadata calls can be
/// signed; after it they go out regardless (a failing latch is when telemetry matters most).
pub const TELEMETRY_KEY_WAIT_MS: u64 = 60_000;
/// Longest value kept from a host document (ids, names, URLs).
pub const TELEMETRY_VALUE_MAX_BYTES: usize = 256;
/// Longest `SharedConfig` URL accepted from the goal state.
pub const TELEMETRY_URL_MAX_BYTES: usize = 1024;
