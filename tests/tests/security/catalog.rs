// SPDX-License-Identifier: MIT
//! The catalog's rows: every case id of `../shared/spec/attack-catalog.md` with what was tried
//! and how it is covered (a test of this crate, another named test, or not automated and why),
//! and the parser that reads the ids out of the catalog file. `zz_catalog_table` (the crate
//! root) prints the table from them.

use super::*;

/// How a catalog case is covered.
pub(super) enum Cover {
    /// Automated here, by this test.
    Test(&'static str),
    /// Proven by another named test (another file or a unit test).
    By(&'static str),
    /// Not automated, with the reason.
    No(&'static str),
}

/// Every case of the catalog (ids as the catalog writes them; `W<n>` = the numbered weaknesses
/// of the reference, `X-*` = the project's further cases, `SIG` = the oracle).
pub(super) const CATALOG: &[(&str, &str, Cover)] = &[
    ("A0/C0", "agent active before every phase (/provision finished)", Cover::Test(T_EXPOSE)),
    ("CFG/PRE", "run config recorded: effective modes from /gpa-aggregated-status", Cover::Test(T_EXPOSE)),
    (
        "P3-cap",
        "packet capture of fabric IPs and lo:3080",
        Cover::No(
            "no tcpdump in hermetic runs; the fake host's per-request record (GET /requests) and the signature oracle replace it",
        ),
    ),
    ("P5-bpftool", "bpftool cgroup show of the test cgroup", Cover::Test(T_EXPOSE)),
    ("A1", "/proc/net/tcp{,6} in the namespace: :3080 only on 127.0.0.1", Cover::Test(T_EXPOSE)),
    ("A1b", "loopback connect to :3080", Cover::Test(T_EXPOSE)),
    (
        "A1c/A2",
        ":3080 on the external address, from the namespace and from a peer namespace (veth)",
        Cover::Test(T_EXPOSE),
    ),
    (
        "A3",
        "bad method, HTTP/9.9, 65 KB URI, 64 KB header, 60 headers, slow-loris ×20, chunked desync; RSS",
        Cover::Test(T_MALFORMED),
    ),
    ("A4", "TRACE, CONNECT, h2c and websocket upgrades", Cover::Test(T_FORMS)),
    ("A4-connect", "CONNECT host:port (authority-form) → 405 + Allow", Cover::Test(T_CONNECT)),
    ("A5", "absolute/authority-form targets, curl -x via :3080, foreign Host header", Cover::Test(T_FORMS)),
    ("B1/B1a", "signed through the proxy; unsigned around it (outside the cgroup, SO_MARK)", Cover::Test(T_EXPOSE)),
    ("B1b", "kernel shows the redirected peer 127.0.0.1:3080", Cover::Test(T_EXPOSE)),
    ("B2", "replay a captured signed request from outside the cgroup; tampered replays", Cover::Test(T_REPLAY)),
    (
        "B3",
        "non-root reads the key file (an exfiltrated key used on another VM needs a second host: not hermetic)",
        Cover::Test(T_KEYS),
    ),
    (
        "B4",
        "client-supplied x-ms-azure-host-* headers",
        Cover::By("msp.rs::client_supplied_host_headers_never_reach_the_host"),
    ),
    ("C1", "non-root caller to WireServer (+ audit entry)", Cover::Test(T_IDENTITY)),
    ("C2", "setresuid between connect and send, both directions", Cover::Test(T_IDENTITY)),
    ("C3", "another binary bind-mounted over an allowed exe path (root; uid 65534 via userns)", Cover::Test(T_BIND)),
    (
        "C4",
        "ptrace-injected connect inside an allowed process",
        Cover::No(
            "in-process trust boundary: code injected into an allowed process is that process to the kernel and the agent (documented, not testable as a bypass)",
        ),
    ),
    ("C5", "unshare -C (new cgroup namespace)", Cover::Test(T_IDENTITY)),
    ("C6", "other network namespace routing 169.254/16 directly", Cover::Test(T_EXPOSE)),
    ("C7", "alternate IP forms: 2852039166, 0xa9fea9fe, 169.254.43518, octal, v4-mapped v6", Cover::Test(T_URLS)),
    ("D1", "URL differentials (phase 4 variants) against a deny rule", Cover::Test(T_URLS)),
    ("D2", "symlink to an allowed binary; a copy elsewhere", Cover::Test(T_URLS)),
    ("D3", "case and Cyrillic homoglyphs in user/group names", Cover::Test(T_URLS)),
    ("D4", "malformed and over-size rules from the host", Cover::Test(T_RULES)),
    ("D5", "rule reload between two requests of one connection", Cover::Test(T_RULES)),
    ("E1", "modes/owners of keys dir, key files, log dir, audit file", Cover::Test(T_KEYS)),
    ("E2", "pre-planted symlink at the key path; symlinked keys dir", Cover::Test(T_KEYS)),
    ("E3", "read-only or full state directory", Cover::Test(T_STATE)),
    (
        "E4",
        "killing the agent leaves no fail-open window",
        Cover::By("lifetime.rs::no_request_bypasses_the_agent_while_it_is_killed_in_a_loop"),
    ),
    ("E5", "rolled-back (older) key file", Cover::Test(T_KEYS)),
    ("F1", "readable status/audit/log files hold no key, signature or token", Cover::Test(T_KEYS)),
    ("F2", "newline/JSON injection via argv, PR_SET_NAME, exe path", Cover::Test(T_AUDIT)),
    ("F3", "symlink planted at the audit file", Cover::Test(T_KEYS)),
    ("F4", "rules dir root-owned, not group/world-writable; foreign-owned rules file", Cover::Test(T_RULESDIR)),
    ("G1", "200 concurrent connections, many pids; over the table", Cover::Test(T_FLOOD)),
    ("G1-burst", "400 back-to-back redirected connects: no caller stalls (listen backlog)", Cover::Test(T_BURST)),
    ("G2", "huge body or URL", Cover::Test(T_MALFORMED)),
    ("G3", "connection churn from many pids and cgroups vs the audit map", Cover::Test(T_FLOOD)),
    (
        "G4",
        "SIGKILL → restart loop leaves no orphan programs",
        Cover::By("lifetime.rs::a_killed_agent_fails_closed_and_a_restarted_one_adopts_without_stacking"),
    ),
    (
        "H1",
        "tampered backup/rollback archive in the setup tool",
        Cover::No(
            "this project ships no setup tool or rollback archive (images install the package); nothing to tamper with",
        ),
    ),
    (
        "H2",
        "extension settings / env vars inject commands",
        Cover::No(
            "the agent spawns no commands and reads no extension settings; config is typed JSON with deny_unknown_fields (config.rs unit tests); exec is outside the seccomp list (hardening.rs)",
        ),
    ),
    ("P4", "phase 4: twelve variants of the IMDS token URL", Cover::Test(T_URLS)),
    ("P4b", "phase 4b: local-rules matrix", Cover::By("S1–S20 rows below")),
    (
        "S1",
        "disabled + allow: all 200",
        Cover::By("msp.rs::endpoint_modes_audit_and_disabled_decide_redirection_per_endpoint"),
    ),
    ("S2", "enforce + deny, no rules: everything 403", Cover::Test(T_RULES)),
    (
        "S3",
        "mode=audit in the local file is ignored",
        Cover::By("agent/src/policy/local_rules.rs::s3_local_mode_is_ignored (unit)"),
    ),
    (
        "S4",
        "allow one path only",
        Cover::By("agent/src/policy/local_rules.rs::s4_one_path_allowed_token_path_still_denied (unit)"),
    ),
    (
        "S5",
        "wrong identity on an allowed path",
        Cover::By("agent/src/policy/local_rules.rs::s5_wrong_identity_denied_on_allowed_path (unit)"),
    ),
    ("S6", "encoding bypasses", Cover::Test(T_URLS)),
    (
        "S7",
        "required query parameter",
        Cover::By("agent/src/policy/local_rules.rs::s6_s7_wireserver_goalstate_only_against_encodings (unit)"),
    ),
    (
        "S8",
        "groupName-only identity",
        Cover::By("agent/src/policy/local_rules.rs::s8_group_name_only_identity_matches (unit)"),
    ),
    ("S9", "exePath identity", Cover::Test(T_URLS)),
    ("S10", "malformed local JSON fails closed", Cover::Test(T_RULES)),
    ("S11", "UTF-8 BOM tolerated and enforced", Cover::Test(T_RULES)),
    (
        "S12",
        "duplicate JSON keys never pick the first",
        Cover::By("agent/src/policy/local_rules.rs::s12_duplicate_keys_never_pick_the_first_value (unit)"),
    ),
    (
        "S17",
        "pre-prefixed rule names",
        Cover::By("agent/src/policy/local_rules.rs::s17_prefixer_is_idempotent_and_references_still_bind (unit)"),
    ),
    (
        "S18",
        "dangling role → privilege reference",
        Cover::By("agent/src/policy/local_rules.rs::s18_dangling_reference_fails_closed (unit)"),
    ),
    ("S19", "Cyrillic homoglyph userName", Cover::Test(T_URLS)),
    ("S20", "token path denied across equivalent forms", Cover::Test(T_URLS)),
    ("W1", "audit map keyed by source port only (collisions, LRU eviction)", Cover::Test(T_FLOOD)),
    ("W2", "exe/cmdline read late: exec after connect", Cover::Test(T_IDENTITY)),
    ("W3", "duplicate headers vs what is signed", Cover::Test(T_MALFORMED)),
    ("W4", "non-ASCII header values (reference panics)", Cover::Test(T_MALFORMED)),
    ("W5", "skip-listed requests forward client headers / relaxed auth", Cover::Test(T_IDENTITY)),
    ("W6", "signature written to a trace log", Cover::Test(T_KEYS)),
    (
        "W7",
        "placeholder response header; no response verified",
        Cover::No("MSP defines no response signature; the marker header is kept for compatibility (MSP §5.7)"),
    ),
    ("W8", "bpf_printk on the hot path", Cover::Test(T_EXPOSE)),
    (
        "W9",
        "kprobe needs BTF, may fail under lockdown",
        Cover::No(
            "lockdown cannot be switched at run time in a test; the design avoids it (cgroup hooks only — checked in W8's source scan)",
        ),
    ),
    ("X-comm", "PR_SET_NAME spoofing of a process name", Cover::Test(T_IDENTITY)),
    (
        "X-pidreuse",
        "pid reuse between connect and accept",
        Cover::No(
            "forcing pid wrap-around is not hermetic; the start-time check is unit-tested: identity.rs::own_process_resolves_and_a_later_connect_time_is_required",
        ),
    ),
    ("X-tfo", "TCP Fast Open", Cover::By("data_path.rs::v4_mapped_ipv6_and_tcp_fast_open_are_redirected")),
    ("X-udp", "UDP to the endpoints", Cover::Test(T_EXPOSE)),
    ("X-sibling", "a process in a sibling cgroup", Cover::Test(T_FLOOD)),
    ("X-framing", "smuggling shapes, folding, NUL/CR/LF, HTTP/1.0, pipelining, Expect", Cover::Test(T_MALFORMED)),
    (
        "X-hostfaults",
        "slow / malformed / 5xx status (down at boot, key 5xx, rotation, mode switches: msp.rs)",
        Cover::Test(T_RULES),
    ),
    ("X-localfaults", "key file truncated (deleted/symlink/older: E2/E5; RO/full: E3)", Cover::Test(T_KEYS)),
    ("X-exhaust", "thousands of connections, slow-loris, idle keep-alive floods", Cover::Test(T_FLOOD)),
    ("FUZZ", "property test: mutated byte streams through the real agent", Cover::Test(T_FUZZ)),
    (
        "ADV-exec",
        "exec after connect as 65534 with comm spoofed: TFO deferred SYN, plain race, leader connects/thread execs, thread connects/leader execs, posix_spawn child, memfd exec, comm only",
        Cover::Test(T_EXEC),
    ),
    (
        "ADV-exec-procfs",
        "the /proc fallback (no BTF): every deferred-SYN exec variant and comm spoofing",
        Cover::Test(T_EXEC),
    ),
    (
        "ADV-exec-procfs-race",
        "the /proc fallback: plain connect then exec before the agent reads /proc",
        Cover::Test(T_EXEC),
    ),
    (
        "ADV-exefile",
        "traced at connect, deleted and replaced executables, setuid-root and file-capability binaries, scripts via their interpreter",
        Cover::Test(T_EXEFILE),
    ),
    (
        "ADV-records",
        "stale kernel records after restarts (refused while down, queued when killed) claimed by direct connects from probed ports",
        Cover::Test(T_RECORDS),
    ),
    (
        "ADV-squat",
        "65534 listens on 127.0.0.1/0.0.0.0(+SO_REUSEPORT)/[::]:3080 while the agent is down; shares the port while it runs",
        Cover::Test(T_SQUAT),
    ),
    (
        "ADV-targets",
        "'#', dot segments, backslashes, %5C, %00 in the target vs a query-conditioned deny",
        Cover::Test(T_TARGETS),
    ),
    (
        "ADV-smuggle",
        "a second request after a bare LF in a streamed chunked body's trailer, as 65534 and root, to every skip-listed target and to IMDS",
        Cover::Test(T_SMUGGLE),
    ),
    (
        "ADV-resend",
        "a host that reads a request on an idle upstream and drops it: a POST is not sent twice, a GET is sent again",
        Cover::Test(T_RESEND),
    ),
    ("SIG", "signature oracle over every world", Cover::Test(T_TABLE)),
];

/// Case ids as the catalog file writes them in bold (`**A1c / A2**` → `A1c/A2`).
pub(super) fn spec_ids(text: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for (i, part) in text.split("**").enumerate() {
        if i % 2 == 0 {
            continue;
        }
        if let Some(rest) = part.strip_prefix("Phase ") {
            ids.push(if rest.starts_with("4b") { "P4b".to_owned() } else { "P4".to_owned() });
            continue;
        }
        let words: Vec<&str> = part.split_whitespace().collect();
        let looks_like_id = |w: &str| {
            let mut chars = w.chars();
            chars.next().is_some_and(|c| c.is_ascii_uppercase())
                && (w.chars().any(|c| c.is_ascii_digit()) || w == "CFG" || w == "PRE")
                && w.len() <= 12
        };
        match words.as_slice() {
            [a, "/", b, ..] if looks_like_id(a) && looks_like_id(b) => ids.push(format!("{a}/{b}")),
            [a, ..] if looks_like_id(a) => ids.push((*a).trim_end_matches(':').to_owned()),
            _ => {}
        }
    }
    ids
}
