// SPDX-License-Identifier: MIT
//! Every run-time bound of the agent in one place, each with its unit and why.
//!
//! The rule: a bound on how much the agent holds at once (tables, buffers, pools, queues,
//! caches, the kernel's maps), how long it waits (timeouts, retries, holds) or how fast it
//! lets something go (rates) lives here, and related bounds are derived from each other here.
//! A cap that is a fact of one format (the bytes a field of an audit line, a status document
//! or a rule set may hold, the depth a parser accepts, the size of a file read whole) lives
//! beside the code that writes or parses that format; where it must cover a bound of this
//! file, a `const` assertion there says so. Fixed-size buffers only stay honest if their
//! limits are visible; change a number here and nowhere else.

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
/// Idle upstream connections kept for the next client connection (issue 17), over all
/// destinations: well inside [`FD_RESERVE`].
pub const UPSTREAM_POOL_MAX: usize = 16;
/// Longest an idle upstream connection is kept: shorter than any host keep-alive timeout we
/// know of, so the host rarely closes one under us (a stale one is retried, idempotent
/// requests only).
pub const UPSTREAM_POOL_IDLE_MS: u64 = 4_000;
/// Time a keep-alive connection may sit idle between requests.
pub const IDLE_TIMEOUT_MS: u64 = 60_000;
/// Time a response may take to drain to a slow client.
pub const CLIENT_WRITE_TIMEOUT_MS: u64 = 30_000;

/// mio events handled per poll turn.
pub const EVENTS_PER_TURN: usize = 256;
/// Steps one drive of a connection may take before it yields to the others (each step reads
/// or writes or changes state); a long pipeline is driven again on the next turn (issue 13).
pub const STEPS_PER_DRIVE: usize = 1024;
/// Method bytes a request keeps for its audit record and summary (the longest method the
/// proxy forwards, `OPTIONS`, is 7).
pub const EXCHANGE_METHOD_MAX_BYTES: usize = 16;
/// Path bytes (no query: queries can carry secrets) a request keeps for its audit record and
/// summary; longer paths are cut.
pub const EXCHANGE_PATH_MAX_BYTES: usize = 256;

/// Pending connections the kernel queues for `accept` on the proxy listener.
pub const LISTEN_BACKLOG: i32 = 1024;
/// Binds tried at start before the listener counts as failed (MSP §5.1: an old instance may
/// still be exiting), [`BIND_RETRY_MS`] apart.
pub const BIND_ATTEMPTS_AT_START: u32 = 6;
/// Pause between two binds at start.
pub const BIND_RETRY_MS: u64 = 500;
/// First wait before a failed start step (the listener's bind, the redirector's attach) is
/// tried again; it doubles up to [`START_RETRY_MAX_MS`].
pub const START_RETRY_FIRST_MS: u64 = 1_000;
/// Longest wait between two tries of a failed start step.
pub const START_RETRY_MAX_MS: u64 = 30_000;
/// `/provision` stops waiting for the key latch after this long and reports what it has
/// (MSP §2.2 step 2).
pub const PROVISION_TIMEOUT_MS: u64 = 120_000;
/// How long a taking agent waits for its key latch before it tells the early agent to stop
/// anyway (the early agent faces the same host, so waiting longer gains nothing).
pub const TAKEOVER_READY_WAIT_MS: u64 = 10_000;
/// How long a taking agent waits for the early agent's offer after connecting to it.
pub const HANDOVER_OFFER_TIMEOUT_MS: u64 = 3_000;
/// An early agent that handed over waits for its open connections at most the longest
/// exchange (an idle keep-alive, or an upstream answer) plus this.
pub const DRAIN_GRACE_MS: u64 = 1_000;
/// First minutes after start in which an unknown secure-channel state is polled every
/// [`KEY_FAST_POLL_INTERVAL_MS`] (boot: the host may answer any moment).
pub const KEY_FAST_POLL_WINDOW_MS: u64 = 5 * 60 * 1000;
/// See [`KEY_FAST_POLL_WINDOW_MS`].
pub const KEY_FAST_POLL_INTERVAL_MS: u64 = 1_000;
/// Largest host response the agent's own calls read (status, key and goal-state documents are
/// a few KiB).
pub const HOST_RESPONSE_MAX_BYTES: usize = 64 * 1024;
/// Log lines per second allowed from guest-triggerable targets (burst of the same size).
pub const GUEST_TRIGGERED_LINES_PER_SECOND: u64 = 20;

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
pub const PER_UID_BODY_BUFFERS: usize = (BODY_BUFFERS - ROOT_RESERVED_BODY_BUFFERS) / 3;
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
/// uids the audit rate tracks one by one (more distinct callers in the window share a bucket).
pub const AUDIT_RATE_TABLE_UIDS: usize = 4096;
/// How often a uid's `suppressed` summary is written while it stays over its rate.
pub const AUDIT_SUPPRESSED_INTERVAL_MS: u64 = 1_000;
/// Size of one audit file before rotation, and files kept per trail.
pub const AUDIT_FILE_BYTES: u64 = 10 * 1024 * 1024;
pub const AUDIT_FILES: u32 = 5;
/// Of [`BODY_BUFFERS`], how many only root callers may take (a health report or log upload
/// must not wait for other users' slow uploads): a quarter.
pub const ROOT_RESERVED_BODY_BUFFERS: usize = BODY_BUFFERS / 4;
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

/// Capacities of the kernel maps; each equals its `*_MAX_ENTRIES` in `ebpf/redirect.bpf.c`
/// (checked by a test below). The routes: one per metadata endpoint, with room.
pub const POLICY_MAX_ENTRIES: u32 = 16;
/// The skip list the kernel consults before redirecting.
pub const SKIP_MAX_ENTRIES: u32 = 16;
/// Connects between `connect()` and their SYN (sockops re-keys them): a burst of parallel
/// connects, far below the table.
pub const PENDING_MAX_ENTRIES: u32 = 4096;
/// Caller records waiting for their accept (an LRU: an evicted record makes the proxy answer
/// `421`, fail closed).
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

/// The user and group databases (`/etc/passwd`, `/etc/group`) are checked for changes at most
/// this often; a change empties the name cache.
pub const IDENTITY_DB_RECHECK_MS: u64 = 1_000;
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

/// `--status`: time to connect to the listener, and for its `/provision` answer.
pub const STATUS_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// See [`STATUS_CONNECT_TIMEOUT_MS`].
pub const STATUS_READ_TIMEOUT_MS: u64 = 5_000;
/// `--status --wait`: pause between two asks.
pub const STATUS_POLL_MS: u64 = 100;
/// `--status` believes a `status.json` written within two status intervals plus this.
pub const STATUS_FILE_GRACE_SECS: u64 = 5;

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
/// Connection-summary keys per table: a VM has a handful of metadata callers (agents,
/// cloud-init, a few scripts), each with a few outcomes; 64 live keys × 16 buckets of 15 min
/// cover 4 h of a busy VM, and a table costs about 64 × 2.3 KiB on the heap.
pub const SUMMARY_KEYS: usize = 64;
/// Width of one summary bucket (MSP §6.3: 15 minutes).
pub const SUMMARY_BUCKET_SECS: u64 = 15 * 60;
/// Buckets per summary key: 16 × 15 min = the 4 h retention of MSP §6.3.
pub const SUMMARY_BUCKETS: usize = 16;

/// Longest `SharedConfig` URL accepted from the goal state.
pub const TELEMETRY_URL_MAX_BYTES: usize = 1024;

// How the bounds relate, checked when the agent is built.
// The root reserves leave the others a table, and what a direct connect may hold fits beside it.
const _: () = assert!(ROOT_RESERVED_CONNECTIONS < DEFAULT_MAX_CONNECTIONS / 2);
const _: () = assert!(NO_IDENTITY_MAX_CONNECTIONS + ROOT_RESERVED_CONNECTIONS <= DEFAULT_MAX_CONNECTIONS);
const _: () = assert!(ROOT_RESERVED_BODY_BUFFERS > 0 && PER_UID_BODY_BUFFERS > 0);
// A held request is polled for several times before it is answered, and answered before a
// client's own head timeout would end the connection.
const _: () = assert!(4 * KEY_LATCH_HOLD_POLL_MS <= KEY_LATCH_HOLD_MS);
const _: () = assert!(KEY_LATCH_HOLD_MS < CLIENT_HEAD_TIMEOUT_MS);
// A direct connect asks one short local request: its head timeout is the shorter one.
const _: () = assert!(NO_IDENTITY_HEAD_TIMEOUT_MS < CLIENT_HEAD_TIMEOUT_MS);
// Every header the parser accepts can be signed, with the agent's own three.
const _: () = assert!(UPSTREAM_HEADERS_MAX == MAX_HEADERS + 3);
// The backoff of a failed start step grows to its ceiling.
const _: () = assert!(START_RETRY_FIRST_MS < START_RETRY_MAX_MS);
// The telemetry queue's byte budget holds the 64 longest messages.
const _: () = assert!(TELEMETRY_QUEUE_BYTES >= 64 * TELEMETRY_MESSAGE_MAX_BYTES);
// The pooled upstreams fit in the descriptors beyond the table's.
const _: () = assert!((UPSTREAM_POOL_MAX as u64) < FD_RESERVE / 2);

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's copies of the kernel map sizes are the kernel's: a map the agent thinks is
    /// larger than it is would fail its updates at run time.
    #[test]
    fn the_kernel_map_sizes_are_the_agents() {
        let source = include_str!("../../ebpf/redirect.bpf.c");
        let defined = |name: &str| -> u32 {
            let prefix = format!("#define {name} ");
            let line = source.lines().find_map(|l| l.strip_prefix(prefix.as_str())).unwrap_or_else(|| panic!("{name}"));
            line.trim().parse().unwrap_or_else(|_| panic!("{name}: {line}"))
        };
        let sizes = [
            ("POLICY_MAX_ENTRIES", POLICY_MAX_ENTRIES),
            ("SKIP_MAX_ENTRIES", SKIP_MAX_ENTRIES),
            ("PENDING_MAX_ENTRIES", PENDING_MAX_ENTRIES),
            ("AUDIT_MAX_ENTRIES", AUDIT_MAX_ENTRIES),
            ("LISTENERS_MAX_ENTRIES", LISTENERS_MAX_ENTRIES),
        ];
        for (name, ours) in sizes {
            assert_eq!(defined(name), ours, "{name}");
        }
        // Every map the object declares has its size among these (or is the one-entry config).
        for line in source.lines().filter_map(|l| l.trim().strip_prefix("__uint(max_entries, ")) {
            let size = line.trim_end_matches(");");
            assert!(size == "1" || sizes.iter().any(|(name, _)| *name == size), "unmirrored map size {size}");
        }
    }
}
