// SPDX-License-Identifier: MIT
//! The allowlist end to end (read `msp-protocol.md` §4 and the attack catalog's phase 4 and
//! 4b first): the real agent with its eBPF programs attached to a child cgroup made here, the
//! fake host in a network namespace made here, and real callers — root and `nobody` (via
//! `setpriv`), `/usr/bin/curl` and `/usr/bin/python3` — in audit and in enforce.
//!
//! Every case checks two things: what the caller got (`200` relayed from the host, `200`
//! straight from the host when the endpoint is not redirected, or the proxy's own `403`), and
//! the `decision` of the agent's audit record for that request.
//!
//! Rule changes are made through the fake host's control API (and the local rule files), then
//! the test waits until the agent has *completed* a status poll that started after the change
//! (two more polls seen by the host), so each case is judged against the new rules — never
//! "eventually", which could pass on stale rules.
//!
//! Every resource is held by a harness guard, so a failing assertion still stops the agent and
//! the fake host, empties and removes the cgroup and deletes the namespace.

#![allow(
    clippy::tests_outside_test_module,
    reason = "integration test crate: every function here is a test or its helper"
)]
#![allow(clippy::disallowed_methods, reason = "system tests wait on real agents and hosts in real time")]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use gpa_system_tests::harness::{self, Agent, As, Cgroup, FakeHost, Netns, World, client};
use gpa_system_tests::require_privileged;
use serde_json::{Value, json};

/// Poll the host every second so rule changes land within seconds.
const FAST_POLL: &[&str] = &["\"pollIntervalSeconds\":1"];
/// The response header the proxy adds to every answer it relays (MSP §5.7).
const MARKER: &str = "x-ms-azure-host-authorization";
/// `nobody:nogroup` on Debian.
const NOBODY: (u32, u32) = (65534, 65534);
/// base64 of `{"id":"t","useLocalFileRules":true}` (MSP §4.7 descriptor id).
const LOCAL_DESCRIPTOR: &str = "eyJpZCI6InQiLCJ1c2VMb2NhbEZpbGVSdWxlcyI6dHJ1ZX0=";

const INSTANCE: &str = "/metadata/instance?api-version=2021-02-01";
const TOKEN: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/";
const GOAL_STATE: &str = "/machine?comp=goalstate";
const CERTIFICATES: &str = "/machine/c/r?comp=certificates&incarnation=1";
const SHARED_CONFIG: &str = "/machine/c/r?comp=config&type=sharedConfig&incarnation=1";
const EXTENSIONS_CONFIG: &str = "/machine/c/r?comp=config&type=extensionsConfig&incarnation=1";
const HGAP_PATH: &str = "/status";

/// Which program makes the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    /// `/usr/bin/curl --path-as-is` (the target is sent byte for byte).
    Curl,
    /// `/usr/bin/python3` with `http.client` (the target is sent byte for byte).
    Python,
}

/// A real caller: a user and an executable.
#[derive(Debug, Clone, Copy)]
struct Who {
    /// `None`: root; else (uid, gid) via setpriv.
    ids: Option<(u32, u32)>,
    tool: Tool,
}

const ROOT_CURL: Who = Who { ids: None, tool: Tool::Curl };
const ROOT_PY: Who = Who { ids: None, tool: Tool::Python };
const NOBODY_CURL: Who = Who { ids: Some(NOBODY), tool: Tool::Curl };
const NOBODY_PY: Who = Who { ids: Some(NOBODY), tool: Tool::Python };

impl Who {
    fn name(self) -> String {
        let user = if self.ids.is_some() { "nobody" } else { "root" };
        format!("{user}/{:?}", self.tool)
    }
}

/// The three redirected endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ep {
    Imds,
    Ws,
    Hgap,
}

impl Ep {
    fn host_port(self) -> (&'static str, u16) {
        match self {
            Self::Imds => ("169.254.169.254", 80),
            Self::Ws => ("168.63.129.16", 80),
            Self::Hgap => ("168.63.129.16", 32526),
        }
    }

    fn header(self) -> &'static str {
        match self {
            Self::Imds => "Metadata: true",
            Self::Ws | Self::Hgap => "x-ms-version: 2012-11-30",
        }
    }
}

/// What the agent's audit trail must say about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Not redirected: `200` straight from the host, no audit record.
    Direct,
    /// Relayed `200`, decision `allow`.
    Allow,
    /// Relayed `200`, decision `audit-deny` (forwarded in audit mode).
    AuditDeny,
    /// The proxy's `403`, decision `deny` (rules or the root-only rule).
    Deny,
    /// The proxy's `403` from the traversal guard, before any rule (decision `refused`).
    Refused,
    /// The proxy's `400` for a target the allowlist and an upstream could read differently
    /// (dot segments, `#`, backslashes; decision `target-…`), before any rule.
    Ambiguous,
}

/// What one request produced.
#[derive(Debug)]
struct Seen {
    status: u16,
    relayed: bool,
    audit: Option<Value>,
    tag: String,
}

static PROBE: AtomicU32 = AtomicU32::new(0);

const PY_CLIENT: &str = r"
import http.client, sys
host, port, target = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.putrequest('GET', target, skip_accept_encoding=True)
    for h in sys.argv[4:]:
        k, v = h.split(':', 1)
        c.putheader(k, v.strip())
    c.endheaders()
    r = c.getresponse()
    r.read()
    print(r.status, r.getheader('x-ms-azure-host-authorization') or '-')
except Exception as e:
    print(0, '-', repr(e))
";

/// One test's world, built from the shared [`World`] and shaped like the shared
/// [`harness::Env`], but a type of this file: its `control` also waits until the agent has
/// applied the change, where the shared one only sends it. Fields drop in declaration order: the agent stops first, then the fake host, then the
/// cgroup is emptied and removed, then the namespace is deleted.
struct Env {
    agent: Agent,
    host: FakeHost,
    cg: Cgroup,
    ns: Netns,
}

impl Env {
    /// The shared world with the fake host configured with `setup` before the agent's first
    /// poll, agent polling every second, key latched.
    fn new(tag: &str, fake_host_args: &[&str], setup: &Value) -> Self {
        let world = World::new(tag, fake_host_args);
        world.control(setup);
        let harness::Env { agent, host, cg, ns } = world.ready(FAST_POLL);
        Self { agent, host, cg, ns }
    }

    /// Changes the host (the agent sees it at its next poll).
    fn set(&self, patch: &Value) {
        let answer = self.host.control(&self.ns, patch);
        assert!(answer.get("error").is_none(), "control {patch} refused: {answer}");
    }

    /// Changes the host and waits until the agent has applied the new status document.
    fn control(&self, patch: &Value) {
        self.set(patch);
        self.settle();
    }

    /// Waits until a status poll that *started* after now has been processed: the host has
    /// seen two more polls, and the agent handles one poll's answer (and refreshes its rules
    /// and local files) before it sends the next.
    fn settle(&self) {
        let calls = || self.host.get(&self.ns, "/stats")["statusCalls"].as_u64().unwrap_or(0);
        let start = calls();
        let end = Instant::now() + Duration::from_secs(15);
        while calls() < start + 2 {
            assert!(Instant::now() < end, "the agent stopped polling\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let log = self.agent.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The agent's request audit records (not the harness's direct `/provision` calls).
    fn requests_audited(&self) -> Vec<Value> {
        self.agent.audit().into_iter().filter(|r| r["kind"] == "request" && r["endpoint"] != "local").collect()
    }

    /// Sends `GET target` to `ep` as `who` and collects what happened.
    fn probe(&self, who: Who, ep: Ep, target: &str) -> Seen {
        let before = self.requests_audited().len();
        let tag = format!("p{}", PROBE.fetch_add(1, Ordering::Relaxed));
        let tag_header = format!("x-gpa-probe: {tag}");
        let (host, port) = ep.host_port();
        let as_ = As { ids: who.ids, cgroup: Some(&self.cg) };
        let (status, relayed) = match who.tool {
            Tool::Curl => {
                let url = format!("http://{host}:{port}{target}");
                let out = client(
                    &self.ns,
                    as_,
                    &[
                        "/usr/bin/curl",
                        "-s",
                        "-i",
                        "-m",
                        "10",
                        "--path-as-is",
                        "-H",
                        ep.header(),
                        "-H",
                        &tag_header,
                        &url,
                    ],
                );
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                (status, text.to_ascii_lowercase().contains(MARKER))
            }
            Tool::Python => {
                let port = port.to_string();
                let out = client(
                    &self.ns,
                    as_,
                    &["/usr/bin/python3", "-c", PY_CLIENT, host, &port, target, ep.header(), &tag_header],
                );
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let mut words = text.split_whitespace();
                let status = words.next().and_then(|c| c.parse().ok()).unwrap_or(0);
                let relayed = words.next().is_some_and(|m| m != "-");
                (status, relayed)
            }
        };
        // The record is written at the end of the agent's loop turn, which may be just after
        // the answer reached the client.
        let proxied = relayed || status != 200;
        let end = Instant::now() + Duration::from_millis(if proxied { 3000 } else { 300 });
        let audit = loop {
            let records = self.requests_audited();
            if records.len() > before {
                assert_eq!(records.len(), before + 1, "one request, one audit record: {:?}", &records[before..]);
                break records.last().cloned();
            }
            if Instant::now() >= end {
                break None;
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        Seen { status, relayed, audit, tag }
    }

    /// Probes and asserts the outcome; returns what was seen for further checks.
    fn check(&self, case: &str, who: Who, ep: Ep, target: &str, expect: Expect) -> Seen {
        let seen = self.probe(who, ep, target);
        let what = format!("[{case}] {} {ep:?} {target}: expected {expect:?}, saw {seen:?}", who.name());
        let decision = seen.audit.as_ref().map(|r| r["decision"].as_str().unwrap_or("?").to_owned());
        match expect {
            Expect::Direct => {
                assert_eq!(seen.status, 200, "{what}\n{}", self.log_tail());
                assert!(!seen.relayed, "{what}: relayed although the endpoint is not redirected");
                assert!(seen.audit.is_none(), "{what}: audited although not redirected");
            }
            Expect::Allow | Expect::AuditDeny => {
                assert_eq!(seen.status, 200, "{what}\n{}", self.log_tail());
                assert!(seen.relayed, "{what}: not relayed by the proxy");
                let want = if expect == Expect::Allow { "allow" } else { "audit-deny" };
                assert_eq!(decision.as_deref(), Some(want), "{what}");
            }
            Expect::Ambiguous => {
                assert_eq!(seen.status, 400, "{what}\n{}", self.log_tail());
                assert!(!seen.relayed, "{what}: an ambiguous target is never relayed");
                assert!(decision.as_deref().is_some_and(|d| d.starts_with("target-")), "{what}");
            }
            Expect::Deny | Expect::Refused => {
                assert_eq!(seen.status, 403, "{what}\n{}", self.log_tail());
                assert!(!seen.relayed, "{what}: a 403 of the proxy is never relayed");
                let want = if expect == Expect::Deny { "deny" } else { "refused" };
                assert_eq!(decision.as_deref(), Some(want), "{what}");
            }
        }
        if let Some(record) = &seen.audit {
            assert_eq!(record["status"], seen.status, "{what}");
            let exe = match who.tool {
                Tool::Curl => "/usr/bin/curl".to_owned(),
                Tool::Python => python_exe(),
            };
            assert_eq!(record["exe"], exe.as_str(), "{what}");
            assert_eq!(record["uid"], who.ids.map_or(0, |(uid, _)| uid), "{what}");
        }
        seen
    }

    /// Whether the host received the request tagged by a probe (forwarded by the proxy).
    fn host_saw(&self, seen: &Seen) -> bool {
        self.host.requests(&self.ns).iter().any(|r| {
            r["headers"].as_array().is_some_and(|hs| {
                hs.iter().any(|h| {
                    h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case("x-gpa-probe")) && h[1] == seen.tag.as_str()
                })
            })
        })
    }

    fn rules_dir(&self) -> PathBuf {
        self.agent.state_dir.join("rules")
    }
}

/// The real file behind `/usr/bin/python3` (what `/proc/<pid>/exe` shows).
fn python_exe() -> String {
    fs::canonicalize("/usr/bin/python3").expect("python3").to_string_lossy().into_owned()
}

/// The file name of that executable (what a `processName` selector compares).
fn python_name() -> String {
    python_exe().rsplit('/').next().unwrap_or_default().to_owned()
}

/// One rule item as the host sends it (`mode` is overwritten by the fake with the live mode).
fn item(id: &str, default_access: &str, rules: &Value) -> Value {
    json!({"defaultAccess": default_access, "mode": "enforce", "id": id, "rules": rules})
}

/// `authorizationRules` with the same item for every endpoint.
fn all_items(item: &Value) -> Value {
    json!({"imds": item, "wireserver": item, "hostga": item})
}

/// Access control rules: each entry is (privilege name, path, query parameters, identity).
fn grants(entries: &[(&str, &str, Value, Value)]) -> Value {
    let mut privileges = Vec::new();
    let mut roles = Vec::new();
    let mut identities = Vec::new();
    let mut assignments = Vec::new();
    for (name, path, query, identity) in entries {
        let mut privilege = json!({"name": name, "path": path});
        if !query.is_null() {
            privilege["queryParameters"] = query.clone();
        }
        privileges.push(privilege);
        roles.push(json!({"name": format!("{name}-role"), "privileges": [name]}));
        let mut identity = identity.clone();
        identity["name"] = json!(format!("{name}-who"));
        identities.push(identity);
        assignments.push(json!({"role": format!("{name}-role"), "identities": [format!("{name}-who")]}));
    }
    json!({"privileges": privileges, "roles": roles, "identities": identities, "roleAssignments": assignments})
}

/// Writes a local rule file the way an administrator should (root, 0600, atomic replace) —
/// or with `mode` to test the agent's permission check.
fn write_rule_file(dir: &Path, name: &str, content: &[u8], mode: u32) {
    fs::create_dir_all(dir).expect("rules dir");
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).expect("chmod rules dir");
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, content).expect("write rules");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).expect("chmod rules");
    fs::rename(&tmp, dir.join(name)).expect("replace rules");
}

// ---------------------------------------------------------------------------------------------
// 1. Per endpoint × mode × default access (MSP §9 item 19, §4.4)

#[test]
fn every_endpoint_in_every_mode_with_allow_and_deny() {
    require_privileged!();
    let config = |mode: &str, access: &str, n: u32| {
        json!({
            "imdsMode": mode, "wireserverMode": mode, "hostgaMode": mode,
            "rules": all_items(&item(&format!("matrix-{n}"), access, &Value::Null)),
        })
    };
    let e = Env::new("pmodes", &["--mode", "disabled"], &config("disabled", "allow", 0));

    let cases = [
        ("disabled", "allow", Expect::Direct),
        ("audit", "allow", Expect::Allow),
        ("audit", "deny", Expect::AuditDeny),
        ("enforce", "allow", Expect::Allow),
        ("enforce", "deny", Expect::Deny),
    ];
    for (n, (mode, access, root_expect)) in (1..).zip(cases) {
        if n > 1 {
            e.control(&config(mode, access, n));
        }
        let case = format!("{mode}+{access}");
        for who in [ROOT_CURL, ROOT_PY] {
            let seen = e.check(&case, who, Ep::Imds, INSTANCE, root_expect);
            e.check(&case, who, Ep::Ws, GOAL_STATE, root_expect);
            e.check(&case, who, Ep::Hgap, HGAP_PATH, root_expect);
            if let Some(record) = &seen.audit {
                assert_eq!(record["mode"], mode, "[{case}] audit mode field: {record}");
                assert_eq!(record["endpoint"], "imds", "[{case}] {record}");
            }
            match root_expect {
                Expect::Deny => assert!(!e.host_saw(&seen), "[{case}] a denied request reached the host"),
                Expect::AuditDeny => assert!(e.host_saw(&seen), "[{case}] an audit denial is still forwarded"),
                _ => {}
            }
        }
        // Non-root: WireServer and HostGAPlugin are root-only in every mode (§4.4); IMDS
        // follows the rules like root. Disabled means "not redirected": the agent is not
        // consulted at all.
        let (ws_nobody, imds_nobody) = match root_expect {
            Expect::Direct => (Expect::Direct, Expect::Direct),
            other => (Expect::Deny, other),
        };
        for who in [NOBODY_CURL, NOBODY_PY] {
            e.check(&case, who, Ep::Ws, GOAL_STATE, ws_nobody);
            e.check(&case, who, Ep::Hgap, HGAP_PATH, ws_nobody);
            e.check(&case, who, Ep::Imds, INSTANCE, imds_nobody);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. The default policy without rule items (§4.5)

#[test]
fn default_policy_without_rules_is_root_only_wireserver_and_open_imds() {
    require_privileged!();
    // Schema 1.0 `WireserverAndImds`: every endpoint enforced, no rule items at all.
    let e = Env::new("pdefault", &["--mode", "enforce", "--version", "1.0"], &json!({}));
    for who in [NOBODY_CURL, NOBODY_PY] {
        let seen = e.check("1.0 default", who, Ep::Imds, INSTANCE, Expect::Allow);
        assert_eq!(seen.audit.as_ref().map(|r| r["mode"].clone()), Some(json!("enforce")));
        e.check("1.0 default", who, Ep::Imds, TOKEN, Expect::Allow);
        e.check("1.0 default", who, Ep::Ws, GOAL_STATE, Expect::Deny);
        e.check("1.0 default", who, Ep::Hgap, HGAP_PATH, Expect::Deny);
    }
    for who in [ROOT_CURL, ROOT_PY] {
        e.check("1.0 default", who, Ep::Imds, TOKEN, Expect::Allow);
        e.check("1.0 default", who, Ep::Ws, GOAL_STATE, Expect::Allow);
        e.check("1.0 default", who, Ep::Hgap, HGAP_PATH, Expect::Allow);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Identity selectors through real callers (§4.3)

#[test]
fn identity_selectors_match_real_callers_in_enforce_and_audit() {
    require_privileged!();
    let py = python_name();
    let rules = grants(&[
        ("token", "/metadata/identity/oauth2/token", Value::Null, json!({"exePath": "/usr/bin/curl"})),
        ("compute", "/metadata/instance/compute", Value::Null, json!({"userName": "root"})),
        ("network", "/metadata/instance/network", Value::Null, json!({"groupName": "nogroup"})),
        ("versions", "/metadata/versions", Value::Null, json!({"processName": py})),
    ]);
    let setup = json!({
        "imdsMode": "enforce", "wireserverMode": "enforce", "hostgaMode": "enforce",
        "rules": {
            "imds": item("identities-1", "allow", &rules),
            "wireserver": item("ws-1", "allow", &Value::Null),
            "hostga": item("ws-1", "allow", &Value::Null),
        },
    });
    let e = Env::new("pident", &["--mode", "enforce"], &setup);
    let compute = "/metadata/instance/compute?api-version=2021-02-01";
    let network = "/metadata/instance/network?api-version=2021-02-01";
    let versions = "/metadata/versions";

    // Enforce.
    let c = "enforce";
    e.check(c, ROOT_CURL, Ep::Imds, TOKEN, Expect::Allow);
    e.check(c, NOBODY_CURL, Ep::Imds, TOKEN, Expect::Allow);
    let denied = e.check(c, ROOT_PY, Ep::Imds, TOKEN, Expect::Deny);
    assert!(!e.host_saw(&denied), "denied token request reached the host");
    e.check(c, NOBODY_PY, Ep::Imds, TOKEN, Expect::Deny);
    // Paths no privilege covers fall back to defaultAccess allow.
    e.check(c, ROOT_PY, Ep::Imds, INSTANCE, Expect::Allow);
    // userName root.
    e.check(c, ROOT_CURL, Ep::Imds, compute, Expect::Allow);
    e.check(c, ROOT_PY, Ep::Imds, compute, Expect::Allow);
    e.check(c, NOBODY_CURL, Ep::Imds, compute, Expect::Deny);
    // groupName only (S8): nobody's primary group; unset selectors are wildcards.
    e.check(c, NOBODY_CURL, Ep::Imds, network, Expect::Allow);
    e.check(c, NOBODY_PY, Ep::Imds, network, Expect::Allow);
    e.check(c, ROOT_CURL, Ep::Imds, network, Expect::Deny);
    // processName (the executable's file name, exact).
    e.check(c, ROOT_PY, Ep::Imds, versions, Expect::Allow);
    e.check(c, NOBODY_PY, Ep::Imds, versions, Expect::Allow);
    e.check(c, ROOT_CURL, Ep::Imds, versions, Expect::Deny);
    // Encoded and case-variant forms of the restricted path (§4.8, §9 item 17): the attacker
    // is still denied, the trusted identity still allowed; `..` and `//` never pass.
    for target in [
        "/metadata/identity/oauth2%2Ftoken?api-version=2018-02-01&resource=https://management.azure.com/",
        "/metadata/identity/oauth2%2ftoken?api-version=2018-02-01&resource=https://management.azure.com/",
        "/METADATA/Identity/OAuth2/Token?api-version=2018-02-01&resource=https://management.azure.com/",
        "/metadata/identity/oauth2/token;x=1?api-version=2018-02-01&resource=https://management.azure.com/",
        "/metadata/identity/oauth2/token%3Fapi-version=2018-02-01",
    ] {
        e.check("enforce encoded", ROOT_PY, Ep::Imds, target, Expect::Deny);
        e.check("enforce encoded", ROOT_CURL, Ep::Imds, target, Expect::Allow);
    }
    // Dot segments are refused as ambiguous (400) for everyone, the trusted identity too.
    for target in [
        "/metadata/identity/oauth2/token/./?api-version=2018-02-01&resource=https://management.azure.com/",
        "/metadata/instance/../identity/oauth2/token?resource=https://management.azure.com/",
        "/metadata/instance/%2e%2e/identity/oauth2/token",
        "/metadata/instance/.%2E/identity/oauth2/token",
    ] {
        e.check("ambiguous", ROOT_PY, Ep::Imds, target, Expect::Ambiguous);
        e.check("ambiguous", ROOT_CURL, Ep::Imds, target, Expect::Ambiguous);
    }
    for target in [
        "/metadata/instance/x..y/identity/oauth2/token",
        "//metadata/identity/oauth2/token",
        "/metadata/identity//oauth2/token",
    ] {
        e.check("traversal", ROOT_PY, Ep::Imds, target, Expect::Refused);
        e.check("traversal", ROOT_CURL, Ep::Imds, target, Expect::Refused);
    }

    // Audit: the same rules, denials are recorded and forwarded.
    e.control(&json!({"imdsMode": "audit"}));
    let c = "audit";
    e.check(c, ROOT_CURL, Ep::Imds, TOKEN, Expect::Allow);
    let forwarded = e.check(c, ROOT_PY, Ep::Imds, TOKEN, Expect::AuditDeny);
    assert!(e.host_saw(&forwarded), "an audit denial is forwarded to the host");
    assert_eq!(forwarded.audit.as_ref().map(|r| r["mode"].clone()), Some(json!("audit")));
    e.check(c, NOBODY_CURL, Ep::Imds, compute, Expect::AuditDeny);
    e.check(c, ROOT_CURL, Ep::Imds, network, Expect::AuditDeny);
    e.check(c, ROOT_CURL, Ep::Imds, versions, Expect::AuditDeny);
    e.check(c, ROOT_PY, Ep::Imds, versions, Expect::Allow);
    // The traversal guard and the ambiguous-target refusal do not depend on the mode.
    e.check(c, ROOT_PY, Ep::Imds, "/metadata/instance/x..y/identity/oauth2/token", Expect::Refused);
    e.check(c, ROOT_PY, Ep::Imds, "/metadata/instance/../identity/oauth2/token", Expect::Ambiguous);
    // WireServer stays root-only in audit.
    e.control(&json!({"wireserverMode": "audit", "hostgaMode": "audit"}));
    e.check(c, NOBODY_PY, Ep::Ws, GOAL_STATE, Expect::Deny);
    e.check(c, ROOT_PY, Ep::Ws, GOAL_STATE, Expect::Allow);
}

// ---------------------------------------------------------------------------------------------
// 4. Customer local rule files (§4.7, attack catalog phase 4b)

#[test]
fn local_rule_files_matrix() {
    require_privileged!();
    // Host items: descriptor ids with useLocalFileRules, defaultAccess allow, no rules — so
    // everything the tests see as "deny" comes from the local files.
    let host_rules = json!({
        "imds": item(LOCAL_DESCRIPTOR, "allow", &Value::Null),
        "wireserver": item(LOCAL_DESCRIPTOR, "allow", &Value::Null),
        "hostga": item(LOCAL_DESCRIPTOR, "allow", &Value::Null),
    });
    let e = Env::new(
        "plocal",
        &["--mode", "disabled"],
        &json!({"imdsMode": "disabled", "wireserverMode": "disabled", "hostgaMode": "disabled", "rules": host_rules}),
    );
    let dir = e.rules_dir();
    let files = |imds: Option<&str>, ws: Option<&str>| {
        if let Some(text) = imds {
            write_rule_file(&dir, "IMDS_Rules.json", text.as_bytes(), 0o600);
        }
        if let Some(text) = ws {
            write_rule_file(&dir, "WireServer_Rules.json", text.as_bytes(), 0o600);
        }
    };
    let root_only = json!({"userName": "root"});
    let instance_for_root = grants(&[("inst", "/metadata/instance", Value::Null, root_only.clone())]);
    let goalstate_for_root = grants(&[("gs", "/machine", json!({"comp": "goalstate"}), root_only.clone())]);
    let deny_with = |rules: &Value| json!({"defaultAccess": "deny", "id": "local", "rules": rules}).to_string();

    // S1 disabled + allow: the control — not redirected, everything answered by the host.
    files(Some(r#"{"defaultAccess":"allow"}"#), Some(r#"{"defaultAccess":"allow"}"#));
    e.settle();
    for (ep, target) in [(Ep::Imds, INSTANCE), (Ep::Imds, TOKEN), (Ep::Ws, GOAL_STATE), (Ep::Ws, CERTIFICATES)] {
        e.check("S1", ROOT_CURL, ep, target, Expect::Direct);
    }
    e.check("S1", NOBODY_PY, Ep::Imds, TOKEN, Expect::Direct);

    // S2 enforce + deny, no rules: everything 403 (the file's defaultAccess wins).
    files(Some(r#"{"defaultAccess":"deny"}"#), Some(r#"{"defaultAccess":"deny"}"#));
    e.control(&json!({"imdsMode": "enforce", "wireserverMode": "enforce", "hostgaMode": "enforce"}));
    for (ep, target) in [(Ep::Imds, INSTANCE), (Ep::Imds, TOKEN), (Ep::Ws, GOAL_STATE), (Ep::Ws, CERTIFICATES)] {
        e.check("S2", ROOT_CURL, ep, target, Expect::Deny);
    }
    e.check("S2", NOBODY_PY, Ep::Imds, INSTANCE, Expect::Deny);
    // HostGAPlugin never uses local files: the host item (allow) applies.
    e.check("S2 hgap", ROOT_CURL, Ep::Hgap, HGAP_PATH, Expect::Allow);

    // S3 `mode: audit` in the local file is ignored: still enforced.
    let audit_file = r#"{"mode":"audit","defaultAccess":"deny"}"#;
    files(Some(audit_file), Some(audit_file));
    e.settle();
    let seen = e.check("S3", ROOT_CURL, Ep::Imds, INSTANCE, Expect::Deny);
    assert_eq!(seen.audit.as_ref().map(|r| r["mode"].clone()), Some(json!("enforce")));
    e.check("S3", ROOT_PY, Ep::Ws, GOAL_STATE, Expect::Deny);

    // S4 allow one path; S6 encoded forms against it; S7 on WireServer (required query).
    files(Some(&deny_with(&instance_for_root)), Some(&deny_with(&goalstate_for_root)));
    e.settle();
    e.check("S4", ROOT_CURL, Ep::Imds, INSTANCE, Expect::Allow);
    e.check("S4", ROOT_PY, Ep::Imds, "/metadata/instance/compute?api-version=2021-02-01", Expect::Allow);
    e.check("S4", ROOT_CURL, Ep::Imds, TOKEN, Expect::Deny);
    e.check("S4", NOBODY_CURL, Ep::Imds, INSTANCE, Expect::Deny);
    e.check("S4", ROOT_CURL, Ep::Ws, GOAL_STATE, Expect::Allow);
    for target in [CERTIFICATES, SHARED_CONFIG, EXTENSIONS_CONFIG] {
        e.check("S4", ROOT_CURL, Ep::Ws, target, Expect::Deny);
    }
    // S6: one percent-decode before matching, never two; `?` only from one decode; case
    // folded; `..` and `//` refused before any rule.
    for (target, expect) in [
        ("/metadata/identity/oauth2%2Ftoken?api-version=2018-02-01", Expect::Deny),
        ("/metadata/identity/oauth2%2ftoken?api-version=2018-02-01", Expect::Deny),
        ("/metadata%252Finstance?api-version=2021-02-01", Expect::Deny),
        ("/metadata/identity/oauth2/token%3Fx=/metadata/instance", Expect::Deny),
        ("/metadata/instance/./../identity/oauth2/token?api-version=2018-02-01", Expect::Ambiguous),
        ("/metadata/instance%2F..%2F..%2Fidentity/oauth2/token", Expect::Refused),
        ("//metadata/instance?api-version=2021-02-01", Expect::Refused),
        ("/metadata%2Finstance?api-version=2021-02-01", Expect::Allow),
        ("/METADATA/Instance?api-version=2021-02-01", Expect::Allow),
    ] {
        e.check("S6 imds", ROOT_CURL, Ep::Imds, target, expect);
    }
    for (target, expect) in [
        ("//machine///?comp=goalstate", Expect::Refused),
        ("/machine//?comp=goalstate", Expect::Refused),
        ("/machine?comp=Certificates", Expect::Deny),
        ("/machine?comp%3Dgoalstate", Expect::Deny),
        ("/machine?comp=GOALSTATE", Expect::Allow),
        ("/machine?comp=goal%73tate", Expect::Allow),
        ("/MACHINE?COMP=goalstate", Expect::Allow),
        // S7 (WireServer): required parameter missing or wrong → 403; extra → still 200.
        ("/machine", Expect::Deny),
        ("/machine?comp=config", Expect::Deny),
        ("/machine?comp=goalstate&incarnation=1", Expect::Allow),
    ] {
        e.check("S6/S7 ws", ROOT_CURL, Ep::Ws, target, expect);
    }
    e.check("S4 ws", NOBODY_CURL, Ep::Ws, GOAL_STATE, Expect::Deny);

    // S5 wrong identity, S8 groupName only, S9 exePath, S19 homoglyph (IMDS);
    // S9 exePath (WireServer).
    let imds_identities = grants(&[
        ("s5", "/metadata/instance/compute", Value::Null, json!({"userName": "gpa-no-such-user"})),
        ("s8", "/metadata/instance/network", Value::Null, json!({"groupName": "root"})),
        ("s19", "/metadata/versions", Value::Null, json!({"userName": "r\u{43e}\u{43e}t"})),
        ("s9", "/metadata/identity/oauth2/token", Value::Null, json!({"exePath": "/usr/bin/curl"})),
    ]);
    let ws_exe = grants(&[("s9", "/machine", Value::Null, json!({"exePath": "/usr/bin/curl"}))]);
    files(Some(&deny_with(&imds_identities)), Some(&deny_with(&ws_exe)));
    e.settle();
    e.check("S5", ROOT_CURL, Ep::Imds, "/metadata/instance/compute?api-version=2021-02-01", Expect::Deny);
    e.check("S8", ROOT_CURL, Ep::Imds, "/metadata/instance/network?api-version=2021-02-01", Expect::Allow);
    e.check("S8", ROOT_PY, Ep::Imds, "/metadata/instance/network?api-version=2021-02-01", Expect::Allow);
    e.check("S8", NOBODY_CURL, Ep::Imds, "/metadata/instance/network?api-version=2021-02-01", Expect::Deny);
    e.check("S19", ROOT_CURL, Ep::Imds, "/metadata/versions", Expect::Deny);
    e.check("S9", ROOT_CURL, Ep::Imds, TOKEN, Expect::Allow);
    e.check("S9", NOBODY_CURL, Ep::Imds, TOKEN, Expect::Allow);
    e.check("S9", ROOT_PY, Ep::Imds, TOKEN, Expect::Deny);
    e.check("S9", NOBODY_PY, Ep::Imds, TOKEN, Expect::Deny);
    e.check("S9 ws", ROOT_CURL, Ep::Ws, GOAL_STATE, Expect::Allow);
    e.check("S9 ws", ROOT_PY, Ep::Ws, GOAL_STATE, Expect::Deny);
    e.check("S9 ws", NOBODY_CURL, Ep::Ws, GOAL_STATE, Expect::Deny);

    // S7 (IMDS): required query parameter (decoded, case-folded); S11 (WireServer): a UTF-8
    // BOM is tolerated and the file still enforced.
    let token_param = grants(&[(
        "s7",
        "/metadata/identity/oauth2/token",
        json!({"resource": "https://management.azure.com/"}),
        root_only.clone(),
    )]);
    let mut bom_file = b"\xEF\xBB\xBF".to_vec();
    bom_file.extend_from_slice(deny_with(&goalstate_for_root).as_bytes());
    files(Some(&deny_with(&token_param)), None);
    write_rule_file(&dir, "WireServer_Rules.json", &bom_file, 0o600);
    e.settle();
    for (target, expect) in [
        (
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F",
            Expect::Allow,
        ),
        (
            "/metadata/identity/oauth2/token?resource=HTTPS://MANAGEMENT.AZURE.COM/&api-version=2018-02-01",
            Expect::Allow,
        ),
        ("/metadata/identity/oauth2/token?api-version=2018-02-01", Expect::Deny),
        ("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net", Expect::Deny),
        (
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/&foo=bar",
            Expect::Allow,
        ),
    ] {
        e.check("S7 imds", ROOT_CURL, Ep::Imds, target, expect);
    }
    e.check("S11 ws", ROOT_CURL, Ep::Ws, GOAL_STATE, Expect::Allow);
    e.check("S11 ws", ROOT_CURL, Ep::Ws, CERTIFICATES, Expect::Deny);

    // S11 (IMDS) BOM; S10 (WireServer) malformed JSON → fail closed.
    let mut bom_file = b"\xEF\xBB\xBF".to_vec();
    bom_file.extend_from_slice(deny_with(&instance_for_root).as_bytes());
    write_rule_file(&dir, "IMDS_Rules.json", &bom_file, 0o600);
    files(None, Some(r#"{"defaultAccess":"allow","rules":{"privileges":["#));
    e.settle();
    e.check("S11 imds", ROOT_CURL, Ep::Imds, INSTANCE, Expect::Allow);
    e.check("S11 imds", ROOT_CURL, Ep::Imds, TOKEN, Expect::Deny);
    e.check("S10 ws", ROOT_CURL, Ep::Ws, GOAL_STATE, Expect::Deny);

    // S10 (IMDS) malformed; S12 (WireServer) duplicate keys → fail closed or last wins (deny),
    // never first wins.
    files(Some(r#"{"defaultAccess":"allow""#), Some(r#"{"defaultAccess":"allow","defaultAccess":"deny"}"#));
    e.settle();
    e.check("S10 imds", ROOT_CURL, Ep::Imds, INSTANCE, Expect::Deny);
    e.check("S12 ws", ROOT_CURL, Ep::Ws, GOAL_STATE, Expect::Deny);

    // S12 (IMDS) duplicate keys; S18 (WireServer) dangling role → privilege reference.
    let dangling = json!({
        "defaultAccess": "allow", "id": "local",
        "rules": {
            "privileges": [{"name": "gs", "path": "/machine"}],
            "roles": [{"name": "r", "privileges": ["gs", "no-such-privilege"]}],
            "identities": [{"name": "root", "userName": "root"}],
            "roleAssignments": [{"role": "r", "identities": ["root"]}],
        },
    });
    files(Some(r#"{"defaultAccess":"allow","defaultAccess":"deny"}"#), Some(&dangling.to_string()));
    e.settle();
    e.check("S12 imds", ROOT_CURL, Ep::Imds, INSTANCE, Expect::Deny);
    e.check("S18 ws", ROOT_CURL, Ep::Ws, GOAL_STATE, Expect::Deny);
    e.check("S18 ws", ROOT_CURL, Ep::Ws, CERTIFICATES, Expect::Deny);

    // S18 (IMDS) dangling; WireServer file writable by others → refused (fail closed).
    let mut dangling_imds = dangling.clone();
    dangling_imds["rules"]["privileges"][0]["path"] = json!("/metadata/instance");
    files(Some(&dangling_imds.to_string()), None);
    write_rule_file(&dir, "WireServer_Rules.json", br#"{"defaultAccess":"allow"}"#, 0o666);
    e.settle();
    e.check("S18 imds", ROOT_CURL, Ep::Imds, INSTANCE, Expect::Deny);
    e.check("S18 imds", ROOT_CURL, Ep::Imds, TOKEN, Expect::Deny);
    e.check("writable ws", ROOT_CURL, Ep::Ws, GOAL_STATE, Expect::Deny);

    // Files removed: the host items apply unchanged (allow; WireServer still root-only).
    fs::remove_file(dir.join("IMDS_Rules.json")).expect("remove IMDS file");
    fs::remove_file(dir.join("WireServer_Rules.json")).expect("remove WS file");
    e.settle();
    e.check("missing", NOBODY_CURL, Ep::Imds, TOKEN, Expect::Allow);
    e.check("missing", ROOT_PY, Ep::Ws, GOAL_STATE, Expect::Allow);
    e.check("missing", NOBODY_PY, Ep::Ws, GOAL_STATE, Expect::Deny);
}

// ---------------------------------------------------------------------------------------------
// 5. Rules re-applied when their content changes, id unchanged (§11 item 7)

#[test]
fn rule_content_changes_apply_without_an_id_change() {
    require_privileged!();
    let with = |access: &str, rules: &Value| json!({"rules": all_items(&item("stable-id", access, rules))});
    let e = Env::new("preapply", &["--mode", "enforce"], &with("allow", &Value::Null));
    e.check("allow", ROOT_CURL, Ep::Imds, INSTANCE, Expect::Allow);
    e.check("allow", ROOT_CURL, Ep::Ws, GOAL_STATE, Expect::Allow);

    // Each change is observed within a few polls (without waiting on the poll count first, to
    // measure the delay a real operator would see).
    let within_polls = |case: &str, who: Who, ep: Ep, target: &str, want: Expect| {
        let end = Instant::now() + Duration::from_secs(6);
        loop {
            let seen = e.probe(who, ep, target);
            let decision = seen.audit.as_ref().and_then(|r| r["decision"].as_str()).unwrap_or("");
            let done = match want {
                Expect::Deny => seen.status == 403 && decision == "deny",
                Expect::Allow => seen.status == 200 && decision == "allow",
                Expect::AuditDeny => seen.status == 200 && decision == "audit-deny",
                Expect::Direct | Expect::Refused | Expect::Ambiguous => false,
            };
            if done {
                return;
            }
            assert!(Instant::now() < end, "[{case}] not applied within a few polls: last {seen:?}\n{}", e.log_tail());
            std::thread::sleep(Duration::from_millis(300));
        }
    };

    // defaultAccess allow → deny, same id.
    e.set(&with("deny", &Value::Null));
    within_polls("deny", ROOT_CURL, Ep::Imds, INSTANCE, Expect::Deny);
    within_polls("deny", ROOT_CURL, Ep::Ws, GOAL_STATE, Expect::Deny);

    // Privileges added, same id: only curl may read the instance path.
    let curl_only = grants(&[("inst", "/metadata/instance", Value::Null, json!({"exePath": "/usr/bin/curl"}))]);
    e.set(&with("deny", &curl_only));
    within_polls("privilege", ROOT_CURL, Ep::Imds, INSTANCE, Expect::Allow);
    e.check("privilege", ROOT_PY, Ep::Imds, INSTANCE, Expect::Deny);

    // The identity changed, same id and same names: now python only.
    let python_only = grants(&[("inst", "/metadata/instance", Value::Null, json!({"exePath": python_exe()}))]);
    e.set(&with("deny", &python_only));
    within_polls("identity", ROOT_PY, Ep::Imds, INSTANCE, Expect::Allow);
    e.check("identity", ROOT_CURL, Ep::Imds, INSTANCE, Expect::Deny);

    // Mode only, same id: enforce → audit.
    e.set(&json!({"imdsMode": "audit"}));
    within_polls("mode", ROOT_CURL, Ep::Imds, INSTANCE, Expect::AuditDeny);

    // And back to allow.
    e.set(&json!({"imdsMode": "enforce", "rules": all_items(&item("stable-id", "allow", &Value::Null))}));
    within_polls("allow again", ROOT_CURL, Ep::Imds, INSTANCE, Expect::Allow);
    e.check("allow again", ROOT_PY, Ep::Imds, INSTANCE, Expect::Allow);
    within_polls("allow again", ROOT_CURL, Ep::Ws, GOAL_STATE, Expect::Allow);
}

/// A user-assigned identity's ARM id as the portal shows it (the `mi_res_id` of a token
/// request): 190 bytes, over the old 128-byte cap.
const ARM_ID: &str = "/subscriptions/2c5a8f1e-7b3d-4e9a-b6c2-1d0f8e7a6b5c/resourceGroups/rg-contoso-production-westeurope-identity/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-contoso-orders-api-prod-westeurope-001";

/// Managed-identity token privileges, one per user-assigned identity (`n` of them), for curl.
fn managed_identity_rules(n: usize) -> Value {
    let entries: Vec<(String, Value)> = (0..n)
        .map(|i| {
            let query = json!({"resource": "https://vault.azure.net", "mi_res_id": format!("{ARM_ID}-{i:02}"),
                               "client_id": format!("8d9c3f4e-2b1a-4c6d-9e8f-7a6b5c4d3e{i:02}")});
            (format!("token-{i:02}"), query)
        })
        .collect();
    let entries: Vec<(&str, &str, Value, Value)> = entries
        .iter()
        .map(|(name, query)| {
            (name.as_str(), "/metadata/identity/oauth2/token", query.clone(), json!({"exePath": "/usr/bin/curl"}))
        })
        .collect();
    grants(&entries)
}

#[test]
fn managed_identity_rules_apply_and_a_rule_set_over_capacity_closes_only_its_endpoint() {
    require_privileged!();
    let token = |i: usize| {
        format!(
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net&mi_res_id={ARM_ID}-{i:02}&client_id=8d9c3f4e-2b1a-4c6d-9e8f-7a6b5c4d3e{i:02}"
        )
    };
    let rules = |imds: Value| json!({"rules": {"imds": imds, "wireserver": item("ws-allow", "allow", &Value::Null), "hostga": item("ws-allow", "allow", &Value::Null)}});
    // 24 identities: the document latches, the token of each is curl's only.
    let e = Env::new("mirules", &["--mode", "enforce"], &rules(item("imds-mi", "deny", &managed_identity_rules(24))));
    e.check("mi allowed", ROOT_CURL, Ep::Imds, &token(0), Expect::Allow);
    e.check("mi allowed", ROOT_CURL, Ep::Imds, &token(23), Expect::Allow);
    e.check("mi other program", ROOT_PY, Ep::Imds, &token(0), Expect::Deny);
    e.check("mi unknown identity", ROOT_CURL, Ep::Imds, &token(24), Expect::Deny);
    e.check("ws", ROOT_CURL, Ep::Ws, GOAL_STATE, Expect::Allow);
    assert!(!e.agent.log().contains("rules refused"), "{}", e.log_tail());

    // 33 identities (one over the capacity) under defaultAccess allow: IMDS is closed, not
    // opened, and the rest of the document still applies.
    e.control(&rules(item("imds-mi-33", "allow", &managed_identity_rules(33))));
    e.check("over capacity: closed", ROOT_CURL, Ep::Imds, &token(0), Expect::Deny);
    e.check("over capacity: closed", ROOT_CURL, Ep::Imds, INSTANCE, Expect::Deny);
    e.check("the other endpoint keeps its rules", ROOT_CURL, Ep::Ws, GOAL_STATE, Expect::Allow);
    assert!(e.agent.log().contains("rules refused: endpoint=imds"), "{}", e.log_tail());
    assert!(!e.agent.log().contains("rules refused: endpoint=wireserver"), "{}", e.log_tail());

    // Back under the capacity: applied again.
    e.control(&rules(item("imds-mi-2", "deny", &managed_identity_rules(2))));
    e.check("applied again", ROOT_CURL, Ep::Imds, &token(1), Expect::Allow);
}

// ---------------------------------------------------------------------------------------------
// 6. Rules snapshot files (§4.12)

#[test]

fn rules_snapshots_are_written_and_capped_at_five() {
    require_privileged!();
    let with = |n: u32| json!({"rules": all_items(&item(&format!("snap-{n}"), "allow", &Value::Null))});
    let e = Env::new("psnap", &["--mode", "enforce"], &with(0));
    let snapshots = || -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(&e.agent.log_dir)
            .map(|dir| dir.filter_map(Result::ok).map(|f| f.path()).collect())
            .unwrap_or_default();
        files.retain(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("AuthorizationRules_") && n.ends_with(".json"))
        });
        files.sort();
        files
    };
    e.settle();
    let first = snapshots();
    assert!(!first.is_empty(), "no snapshot after the first rules were applied in {}", e.agent.log_dir.display());
    let doc: Value =
        serde_json::from_slice(&fs::read(first.last().expect("one")).expect("read snapshot")).expect("snapshot JSON");
    assert_eq!(doc["computedRules"]["imds"]["mode"], "Enforce", "{doc}");
    assert_eq!(doc["computedRules"]["imds"]["id"], "snap-0", "{doc}");
    for n in 1..=6 {
        e.control(&with(n));
    }
    let files = snapshots();
    assert_eq!(files.len(), 5, "at most five snapshots kept: {files:?}");
    let newest: Value = serde_json::from_slice(&fs::read(files.last().expect("newest")).expect("read")).expect("JSON");
    assert_eq!(newest["computedRules"]["wireserver"]["id"], "snap-6", "{newest}");
}
