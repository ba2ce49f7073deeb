// SPDX-License-Identifier: MIT
//! The attack catalog (`../shared/spec/attack-catalog.md`) as hermetic system tests, with the
//! printed table `case id | what was tried | result` (issue 8 item 1). Read MSP §4.8, §5.4 and
//! §11 first: they say what the agent must answer.
//!
//! Every world is real: the agent with its eBPF programs attached to a child cgroup made here,
//! the fake host on the metadata addresses inside a network namespace made here, real clients
//! (curl, the system python, raw sockets, `setpriv`, `unshare`). The fake host re-verifies every
//! signed request on its own; [`support::Env::check_oracle`] asserts at the end of each world
//! that nothing unsigned, mis-signed or unauthorised reached it except deliberate bypasses that
//! the host refused.
//!
//! The cases live in `security/<area>.rs`, one module per catalog area (exposure, parsing,
//! forgery, identity, rules, keys, audit, dos, and the adversarial layer); this root holds the
//! test names, the helpers they share, and the table (rows in `security/catalog.rs`).
//!
//! Several cases share one world per test to keep the run short. The final test
//! (`zz_catalog_table`, last in libtest's name order) waits for the others of this invocation,
//! prints the table, and asserts that every catalog case has a row with a result: passed,
//! covered by another named test, or not automated with the reason.
//!
//! Run: `GPA_BIN_GUEST_PROXY_AGENT=… GPA_BIN_FAKE_HOST=… cargo test -p gpa-system-tests --test
//! security -- --test-threads=2` (root; skips with a printed reason otherwise).

#![allow(
    clippy::tests_outside_test_module,
    reason = "integration test crate: every function here is a test or its helper"
)]
#![allow(clippy::disallowed_methods, reason = "system tests wait on real agents and hosts in real time")]
#![allow(clippy::print_stdout, clippy::print_stderr, reason = "the suite prints its case table")]

// One module per catalog area (the letters of attack-catalog.md); test names inside them are
// the ones the table refers to (`T_*` below), the libtest path adds the module. The table test
// stays here at the root: `zz_catalog_table` must sort after every module's tests (libtest
// dispatches in name order, and the table waits for the tests dispatched before it), so no
// module may be named `zz*`.
#[path = "security/adversarial.rs"]
mod adversarial;
#[path = "security/audit.rs"]
mod audit;
#[path = "security/catalog.rs"]
mod catalog;
#[path = "security/dos.rs"]
mod dos;
#[path = "security/exposure.rs"]
mod exposure;
#[path = "security/forgery.rs"]
mod forgery;
#[path = "security/identity.rs"]
mod identity;
#[path = "security/keys.rs"]
mod keys;
#[path = "security/parsing.rs"]
mod parsing;
#[path = "security/rules.rs"]
mod rules;
#[path = "security/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use catalog::{CATALOG, Cover, spec_ids};
use gpa_system_tests::harness::{Agent, As, Bpffs, Cgroup, TempDir, attached_programs, client, curl, eventually, http};
use serde_json::{Value, json};
use support::*;

// ---- test names (the table refers to them) -----------------------------------------------------

const T_EXPOSE: &str = "network_exposure_is_loopback_only_and_interception_is_complete";
const T_MALFORMED: &str = "malformed_and_ambiguous_http_is_refused_and_the_agent_keeps_serving";
const T_FORMS: &str = "methods_upgrades_and_proxy_forms_are_never_tunnelled";
const T_CONNECT: &str = "connect_in_authority_form_is_answered_405_with_allow";
const T_REPLAY: &str = "captured_signatures_replay_only_verbatim_and_any_change_is_refused";
const T_IDENTITY: &str = "identity_is_the_connect_time_caller";
const T_URLS: &str = "equivalent_urls_addresses_and_names_get_one_decision";
const T_BIND: &str = "a_binary_bind_mounted_over_an_allowed_exe_does_not_inherit_its_identity";
const T_RULES: &str = "host_rules_apply_per_request_and_bad_rules_or_host_faults_fail_closed";
const T_RULESDIR: &str = "a_rules_file_writable_by_a_non_root_user_is_not_trusted";
const T_KEYS: &str = "key_and_log_files_are_private_and_tampered_keys_are_refused";
const T_STATE: &str = "read_only_or_full_state_fails_closed";
const T_AUDIT: &str = "audit_records_cannot_be_forged_through_argv_comm_or_exe_names";
const T_FLOOD: &str = "connection_floods_and_audit_map_churn_do_not_starve_a_legitimate_caller";
const T_BURST: &str = "a_burst_of_connects_does_not_stall_callers";
const T_FUZZ: &str = "generated_byte_streams_never_crash_the_agent_or_reach_the_host_unsigned";
const T_TABLE: &str = "zz_catalog_table";
// The adversarial layer (issue 12, security/adversarial.rs).
const T_EXEC: &str = "exec_after_connect_never_lends_an_executable_identity";
const T_EXEFILE: &str = "the_executable_is_the_file_that_ran_at_connect";
const T_RECORDS: &str = "a_record_is_claimed_only_by_the_connection_it_was_made_for";
const T_SQUAT: &str = "a_squatter_on_the_proxy_port_never_receives_a_caller_and_the_agent_still_starts";
const T_TARGETS: &str = "ambiguous_request_targets_are_refused_before_authorization";
const T_SMUGGLE: &str = "a_streamed_body_cannot_smuggle_a_request_past_the_agent";
const T_RESEND: &str = "a_request_the_host_may_have_acted_on_is_not_sent_twice";

/// Tests marked `#[ignore]` because they expose an agent bug; the reason is repeated here so
/// the table can show it (an attribute cannot take a constant).
const IGNORED: &[(&str, &str)] = &[];

// ---- constants ---------------------------------------------------------------------------------

const TOKEN: &str = "/metadata/identity/oauth2/token?resource=https://management.azure.com/";
const TOKEN_URL: &str = "http://169.254.169.254/metadata/identity/oauth2/token?resource=https://management.azure.com/";
const WS_IP: &str = "168.63.129.16";
const IMDS_IP: &str = "169.254.169.254";
/// The agent's `SO_MARK` (config.rs `DEFAULT_AGENT_MARK`): sockets carrying it are not redirected.
const AGENT_MARK: u32 = 0x4750_4101;
/// Per-slot buffers (limits.rs: 8 KiB head + 9 KiB upstream head + 16 KiB response) times the
/// default table (1,024) plus the body pool (16 × 100 KiB): the most the fixed tables can hold.
const FIXED_TABLES_KIB: u64 = 1024 * 33 + 16 * 100;

fn resolved_python() -> String {
    fs::canonicalize(PYTHON).expect("python path").to_string_lossy().into_owned()
}

fn tagged(tag: &str) -> String {
    format!("x-gpa-tag: {tag}")
}

fn bypass(tag: &str) -> String {
    format!("{BYPASS}: {tag}")
}

/// `secureChannelState` from `/gpa-aggregated-status` (root, through the redirect).
fn aggregated(e: &Env) -> Value {
    let (status, text) = e.curl(root(&e.cg), &["-H", "Metadata: true", "http://168.63.129.16/gpa-aggregated-status"]);
    assert_eq!(status, 200, "aggregated status: {text}");
    serde_json::from_str(text.rsplit_once("\r\n\r\n").map_or("", |(_, b)| b)).expect("status JSON")
}

/// An IMDS item: `defaultAccess`, and privileges given as (name, path, identities) with
/// identities as (name, selectors JSON object).
/// One privilege: (name, path, identities as (name, selectors)).
type Grant<'a> = (&'a str, &'a str, &'a [(&'a str, Value)]);

fn imds_item(id: &str, default: &str, grants: &[Grant<'_>]) -> Value {
    let mut privileges = Vec::new();
    let mut roles = Vec::new();
    let mut identities = Vec::new();
    let mut assignments = Vec::new();
    for (name, path, who) in grants {
        privileges.push(json!({"name": name, "path": path}));
        roles.push(json!({"name": format!("role-{name}"), "privileges": [name]}));
        let mut names = Vec::new();
        for (id_name, selectors) in who.iter() {
            let mut identity = selectors.clone();
            identity["name"] = json!(id_name);
            identities.push(identity);
            names.push(json!(id_name));
        }
        assignments.push(json!({"role": format!("role-{name}"), "identities": names}));
    }
    json!({"defaultAccess": default, "mode": "enforce", "id": id, "rules": {
        "privileges": privileges, "roles": roles, "identities": identities, "roleAssignments": assignments}})
}

/// Applies `imds` through the fake host and waits until `probe` shows it took effect.
fn apply_rules(e: &Env, imds: Value, what: &str, mut probe: impl FnMut() -> bool) {
    e.control(&json!({"rules": rules_with_imds(imds)}));
    // Up to one poll interval with failure backoff (×8 at most) plus the request itself.
    e.eventually(Duration::from_secs(20), what, || probe().then_some(()));
}

/// Status of a root curl from the cgroup.
fn root_status(e: &Env, url: &str) -> u16 {
    e.curl(root(&e.cg), &["-g", "-H", "Metadata: true", url]).0
}

/// User + system CPU seconds the agent process has used.
fn agent_cpu_secs(e: &Env) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{}/stat", e.agent.proc.pid())).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. the 12th and 13th after the comm.
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0
}

fn agent_log_len(base: &Path) -> usize {
    fs::read_to_string(base.join("agent.stderr")).unwrap_or_default().len()
}

// ---- the table ---------------------------------------------------------------------------------

#[test]
fn zz_catalog_table() {
    let _run = Run::start("zz_catalog_table");
    let snapshot = wait_for_other_tests(T_TABLE, Duration::from_secs(300));
    let ignored = |t: &str| IGNORED.iter().find(|(n, _)| *n == t).map(|(_, r)| *r);

    // Completeness: every case of the catalog file has a row, and no row is listed twice.
    let mut ids: Vec<&str> = CATALOG.iter().map(|(id, _, _)| *id).collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "a case id is listed twice");
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/spec/attack-catalog.md");
    let spec_note = match fs::read_to_string(&spec) {
        Ok(text) => {
            let from_spec = spec_ids(&text);
            let missing: Vec<&String> = from_spec.iter().filter(|id| !ids.contains(&id.as_str())).collect();
            assert!(missing.is_empty(), "catalog cases without a row: {missing:?}");
            format!("all {} case ids of {} have a row", from_spec.len(), spec.display())
        }
        Err(_) => {
            "attack-catalog.md not found next to the repository; checked against the built-in list only".to_owned()
        }
    };

    let oracle = (
        ORACLE_WORLDS.load(Ordering::Relaxed),
        ORACLE_RECORDS.load(Ordering::Relaxed),
        ORACLE_VALID.load(Ordering::Relaxed),
        ORACLE_BYPASS.load(Ordering::Relaxed),
    );
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    for (id, tried, cover) in CATALOG {
        let result = match cover {
            Cover::By(other) => format!("covered-by: {other}"),
            Cover::No(reason) => format!("NOT AUTOMATED: {reason}"),
            Cover::Test(T_TABLE) if oracle.0 > 0 => {
                format!(
                    "PASS: {} worlds, {} data requests at the host: {} signed valid, {} deliberate bypasses refused 401, 0 leaks",
                    oracle.0, oracle.1, oracle.2, oracle.3
                )
            }
            Cover::Test(T_TABLE) => "NOT RUN in this invocation (no world ran)".to_owned(),
            Cover::Test(test) => match (snapshot.results.get(id), ignored(test)) {
                (Some(Verdict::Pass(note)), _) => format!("PASS: {note}"),
                (Some(Verdict::Documented(note)), _) => format!("DOCUMENTED: {note}"),
                (None, Some(reason)) if !snapshot.started.contains(test) => format!("IGNORED ({test}): {reason}"),
                (None, _) if snapshot.skipped.contains_key(test) => format!("SKIPPED: {}", snapshot.skipped[test]),
                (None, _) if !snapshot.started.contains(test) => {
                    format!("NOT RUN in this invocation ({test} filtered out)")
                }
                (None, _) => {
                    let why = if snapshot.failed.contains(test) {
                        "failed"
                    } else if snapshot.finished.contains(test) {
                        "finished without recording it"
                    } else {
                        "still running"
                    };
                    problems.push(format!("{id}: {test} {why}"));
                    format!("FAIL: {test} {why}")
                }
            },
        };
        rows.push((*id, *tried, result));
    }
    let mut table = String::from("\n| case id | what was tried | result |\n|---|---|---|\n");
    for (id, tried, result) in &rows {
        table.push_str(&format!("| {id} | {tried} | {result} |\n"));
    }
    let count = |p: &str| rows.iter().filter(|(_, _, r)| r.starts_with(p)).count();
    table.push_str(&format!(
        "\n{} cases: {} PASS, {} DOCUMENTED, {} covered-by, {} NOT AUTOMATED, {} IGNORED (agent bugs), {} SKIPPED, {} NOT RUN, {} FAIL; {spec_note}\n",
        rows.len(),
        count("PASS"),
        count("DOCUMENTED"),
        count("covered-by"),
        count("NOT AUTOMATED"),
        count("IGNORED"),
        count("SKIPPED"),
        count("NOT RUN"),
        count("FAIL"),
    ));
    // Straight to the stdout file descriptor: libtest captures print!/eprint! of passing tests,
    // and the table must show in a normal run. Also kept as a file for the docs.
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        drop(out.write_all(table.as_bytes()));
        drop(out.flush());
    }
    let saved = Path::new(env!("CARGO_TARGET_TMPDIR")).join("security-catalog.md");
    if fs::write(&saved, &table).is_ok() {
        println!("table saved to {}", saved.display());
    }
    assert!(problems.is_empty(), "cases whose test ran but did not pass them: {problems:?}");
}
