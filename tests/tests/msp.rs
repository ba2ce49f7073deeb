// SPDX-License-Identifier: MIT
//! The Metadata Security Protocol end to end (read `msp-protocol.md` §1–§3, §5, §6.5, §8.2 and
//! §11 first): key latching, signing, header hygiene, restarts with the key on disk, key
//! rotation under traffic, host outages, per-endpoint modes, schema 1.0 and the `--status`
//! contract. Real parts throughout: the agent with its eBPF programs attached to a child cgroup
//! made here, the fake host in a network namespace made here, and real clients (curl, python).
//!
//! Every resource is held by a harness guard, so a failing assertion still stops the agent and
//! the fake host, empties and removes the cgroup and deletes the namespace.

#![expect(clippy::tests_outside_test_module, reason = "an integration test file: every item is a test or its helper")]
#![expect(clippy::disallowed_methods, reason = "system tests wait on real agents and hosts in real time")]

use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use gpa_system_tests::callers::CallerLoop;
use gpa_system_tests::harness::{
    Agent, As, Cgroup, Env, FakeHost, Netns, TempDir, World, attached_programs, binary, curl, eventually,
    header_values, http, root_in,
};
use gpa_system_tests::require_privileged;
use serde_json::{Value, json};

const IMDS: &str = "http://169.254.169.254/metadata/instance?api-version=2021-02-01";
const GOAL_STATE: &str = "http://168.63.129.16/machine?comp=goalstate";
const AGGREGATED_STATUS: &str = "http://168.63.129.16/gpa-aggregated-status";
/// The response header the proxy adds to every answer it relays (MSP §5.7).
const MARKER: &str = "x-ms-azure-host-authorization: value";
/// Poll the host every second once the state is known, so mode changes land within seconds.
const FAST_POLL: &[&str] = &["\"pollIntervalSeconds\":1"];
const ROOT_CLAIMS: &str = "{ \"isRoot\": \"true\"}";

/// Fake host in `mode` (schema 2.0), agent polling every second, key latched.
fn ready_env(tag: &str, mode: &str) -> Env {
    World::new(tag, &["--mode", mode]).ready(FAST_POLL)
}

/// What the MSP tests read from their world, on top of the shared [`Env`].
trait MspEnv {
    /// The fake host's counters (`GET /stats` on its control port).
    fn stats(&self) -> Value;
    /// A root curl from inside the agent's cgroup, tagged so the fake host's record of it can
    /// be found again.
    fn root_curl(&self, tag: &str, args: &[&str]) -> (u16, String);
    /// The fake host's record of the request tagged `tag`.
    fn record(&self, tag: &str) -> Value;
    /// The agent's derived secure-channel state, read from `/gpa-aggregated-status` through the
    /// WireServer redirect (root claims required, MSP §1.7).
    fn agent_state(&self) -> String;
    /// `/provision` as a plain caller sees it (no time tick, no notify).
    fn provision(&self) -> Value;
    /// `guest-proxy-agent --config <this agent's config> --status [--wait N]`, run in the
    /// namespace. Returns the output and how long it took.
    fn status_cli(&self, wait: Option<u64>) -> (Output, Duration);
}

impl MspEnv for Env {
    fn stats(&self) -> Value {
        self.host.get(&self.ns, "/stats")
    }

    fn root_curl(&self, tag: &str, args: &[&str]) -> (u16, String) {
        let tag_header = format!("x-gpa-test: {tag}");
        let mut all = vec!["-H", tag_header.as_str()];
        all.extend_from_slice(args);
        curl(&self.ns, root_in(&self.cg), &all)
    }

    fn record(&self, tag: &str) -> Value {
        self.host
            .requests(&self.ns)
            .into_iter()
            .rev()
            .find(|r| header_values(r, "x-gpa-test").iter().any(|v| v == tag))
            .unwrap_or_else(|| panic!("the fake host saw no request tagged {tag}\nagent log:\n{}", self.agent.log()))
    }

    fn agent_state(&self) -> String {
        let (status, text) = curl(&self.ns, root_in(&self.cg), &["-H", "Metadata: true", AGGREGATED_STATUS]);
        assert_eq!(status, 200, "aggregated status: {text}");
        let doc: Value =
            serde_json::from_str(body_of(&text)).unwrap_or_else(|err| panic!("aggregated status JSON: {err}: {text}"));
        doc["proxyAgentStatus"]["keyLatchStatus"]["states"]["secureChannelState"]
            .as_str()
            .unwrap_or_else(|| panic!("no secureChannelState in {doc}"))
            .to_owned()
    }

    fn provision(&self) -> Value {
        provision(&self.ns)
    }

    fn status_cli(&self, wait: Option<u64>) -> (Output, Duration) {
        status_cli(&self.ns, &self.agent.config, wait)
    }
}

fn provision(ns: &Netns) -> Value {
    let (status, body) =
        http(ns, "127.0.0.1:3080".parse().expect("addr"), "GET", "/provision", &[("Metadata", "true")], b"");
    assert_eq!(status, 200, "/provision: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body)
        .unwrap_or_else(|err| panic!("/provision JSON: {err}: {}", String::from_utf8_lossy(&body)))
}

fn status_cli(ns: &Netns, config: &Path, wait: Option<u64>) -> (Output, Duration) {
    let mut cmd = ns.command(binary("guest-proxy-agent").to_str().expect("utf-8 path"));
    cmd.arg("--config").arg(config).arg("--status");
    if let Some(secs) = wait {
        cmd.args(["--wait", &secs.to_string()]);
    }
    let started = Instant::now();
    let out = cmd.output().expect("run guest-proxy-agent --status");
    (out, started.elapsed())
}

/// Waits until `<logDir>/status.json` shows `module` (e.g. `ebpfProgramStatus`) as `status`.
fn status_file_showing(e: &Env, module: &str, status: &str, within: Duration) -> Value {
    eventually(within, &format!("status.json to show {module} {status}"), || {
        let text = fs::read_to_string(e.agent.log_dir.join("status.json")).ok()?;
        let doc: Value = serde_json::from_str(&text).ok()?;
        (doc["proxyAgentStatus"][module]["status"] == status).then_some(doc)
    })
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The body of `curl -i` output (after the last header block; curl may print a `100
/// Continue` block first).
fn body_of(text: &str) -> &str {
    text.rsplit_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// Asserts that a tagged request went through the proxy and reached the host signed with the
/// currently attested key.
fn assert_redirected_and_signed(e: &Env, tag: &str, status: u16, text: &str) -> Value {
    assert_eq!(status, 200, "{tag}: {text}\nagent log:\n{}", e.agent.log());
    assert!(text.contains(MARKER), "{tag}: no proxy marker, not redirected: {text}");
    let seen = e.record(tag);
    assert_eq!(seen["signature"], "valid", "{tag}: {seen}");
    assert_eq!(seen["keyGuid"], e.stats()["currentKeyGuid"], "{tag}: signed with the attested key: {seen}");
    seen
}

/// Asserts that a tagged request bypassed the proxy and reached the host unsigned.
fn assert_direct_and_unsigned(e: &Env, tag: &str, status: u16, text: &str) {
    assert_eq!(status, 200, "{tag}: host in disabled mode serves unsigned requests: {text}");
    assert!(!text.contains(MARKER), "{tag}: still redirected: {text}");
    assert_eq!(e.record(tag)["signature"], "missing", "{tag}");
}

#[test]
fn enforce_signs_cgroup_traffic_and_the_host_refuses_everything_else() {
    require_privileged!();
    let e = ready_env("e2e", "enforce");

    let (status, text) = e.root_curl("imds", &["-H", "Metadata: true", IMDS]);
    assert_redirected_and_signed(&e, "imds", status, &text);
    assert!(body_of(&text).contains("\"vmId\""), "IMDS answer relayed: {text}");

    let (status, text) = e.root_curl("goal", &["-H", "x-ms-version: 2012-11-30", GOAL_STATE]);
    let seen = assert_redirected_and_signed(&e, "goal", status, &text);
    assert_eq!(seen["endpoint"], "wireserver");
    assert!(body_of(&text).contains("<GoalState"), "goal state relayed: {text}");

    // The test process is outside the agent's cgroup: not redirected, so unsigned, and the host
    // (not the guest) refuses it.
    let imds = "169.254.169.254:80".parse().expect("addr");
    let (status, body) = http(
        &e.ns,
        imds,
        "GET",
        "/metadata/instance?api-version=2021-02-01",
        &[("Metadata", "true"), ("x-gpa-test", "outside")],
        b"",
    );
    assert_eq!(status, 401, "default-closed at the host: {}", String::from_utf8_lossy(&body));
    assert_eq!(e.record("outside")["signature"], "missing");
    let ws = "168.63.129.16:80".parse().expect("addr");
    let (status, _) = http(
        &e.ns,
        ws,
        "GET",
        "/machine?comp=goalstate",
        &[("x-ms-version", "2012-11-30"), ("x-gpa-test", "outside-ws")],
        b"",
    );
    assert_eq!(status, 401);
    assert_eq!(e.record("outside-ws")["signature"], "missing");
}

/// Checks that the recorded request carries only the agent's `x-ms-azure-host-*` headers.
fn assert_only_agent_headers(seen: &Value, signed: bool, guid: &Value) {
    let auth = header_values(seen, "x-ms-azure-host-authorization");
    if signed {
        assert_eq!(auth.len(), 1, "exactly one authorization header: {seen}");
        let expected_prefix = format!("Azure-HMAC-SHA256 {} ", guid.as_str().expect("guid"));
        assert!(auth[0].starts_with(&expected_prefix), "the agent's signature: {seen}");
        assert_eq!(seen["signature"], "valid", "{seen}");
    } else {
        assert!(auth.is_empty(), "skip-listed: no authorization header at all upstream: {seen}");
        assert_eq!(seen["signature"], "missing", "{seen}");
    }
    assert_eq!(
        header_values(seen, "x-ms-azure-host-claims"),
        vec![ROOT_CLAIMS.to_owned()],
        "the agent's claims only: {seen}"
    );
    let dates = header_values(seen, "x-ms-azure-host-date");
    assert_eq!(dates.len(), 1, "one date header: {seen}");
    assert!(
        dates[0].ends_with(" GMT") && !dates[0].contains("2001"),
        "the agent's host date, not the forged one: {seen}"
    );
    assert!(!seen["headers"].to_string().contains("forged"), "a forged value reached the host: {seen}");
}

/// Forged `x-ms-azure-host-*` headers in the spelling `names` gives, as curl arguments.
fn forged_headers(names: [&str; 3]) -> Vec<String> {
    let [auth, claims, date] = names;
    vec![
        "-H".to_owned(),
        format!("{auth}: Azure-HMAC-SHA256 forged {}", "0".repeat(64)),
        "-H".to_owned(),
        format!("{claims}: {{ \"isRoot\": \"forged\"}}"),
        "-H".to_owned(),
        format!("{date}: Mon, 01 Jan 2001 00:00:00 GMT"),
    ]
}

const LOWER: [&str; 3] = ["x-ms-azure-host-authorization", "x-ms-azure-host-claims", "x-ms-azure-host-date"];
const MIXED: [&str; 3] = ["X-MS-Azure-Host-Authorization", "X-Ms-Azure-Host-Claims", "X-MS-AZURE-HOST-DATE"];

#[test]
fn client_supplied_host_headers_never_reach_the_host() {
    require_privileged!();
    let e = ready_env("forge", "enforce");
    let run = |tag: &str, names: [&str; 3], extra: &[&str]| {
        let mut args = forged_headers(names);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        e.root_curl(tag, &args)
    };
    let guid = e.stats()["currentKeyGuid"].clone();

    let (status, text) = run("enforce-imds", LOWER, &["-H", "Metadata: true", IMDS]);
    assert_eq!(status, 200, "{text}\n{}", e.agent.log());
    assert_only_agent_headers(&e.record("enforce-imds"), true, &guid);
    // Header names are case-insensitive: another spelling is dropped as well.
    let (status, text) = run("enforce-ws", MIXED, &["-H", "x-ms-version: 2012-11-30", GOAL_STATE]);
    assert_eq!(status, 200, "{text}");
    assert_only_agent_headers(&e.record("enforce-ws"), true, &guid);
    // Two forged authorization headers (a repeated name, differently spelt): both are the
    // agent's prefix, so both are dropped, and only the agent's own reach the host (a repeated
    // name is otherwise combined into one signed field, issue 14).
    let (status, text) = run(
        "repeated",
        LOWER,
        &["-H", "X-MS-Azure-Host-Authorization: Azure-HMAC-SHA256 forged 00", "-H", "Metadata: true", IMDS],
    );
    assert_eq!(status, 200, "{text}");
    assert_only_agent_headers(&e.record("repeated"), true, &guid);

    // Audit everywhere: still signed, forged headers still dropped.
    e.control(&json!({"mode": "audit"}));
    eventually(Duration::from_secs(8), "the agent to see audit mode", || {
        (e.agent_state() == "WireServer Audit -  IMDS Audit - HostGA Audit").then_some(())
    });
    let (status, text) = run("audit-imds", MIXED, &["-H", "Metadata: true", IMDS]);
    assert_eq!(status, 200, "{text}");
    assert_only_agent_headers(&e.record("audit-imds"), true, &guid);

    // Skip-listed (root `PUT /vmAgentLog`): forwarded unsigned, and the forged authorization
    // must not ride along in place of the missing signature (MSP §11 item 4).
    for (tag, names) in [("skip", LOWER), ("skip-mixed", MIXED)] {
        let (status, text) =
            run(tag, names, &["-X", "PUT", "--data-binary", "log line", "http://168.63.129.16/vmAgentLog"]);
        assert_eq!(status, 200, "{tag}: {text}");
        assert!(text.contains(MARKER), "{tag}: went through the proxy: {text}");
        let seen = e.record(tag);
        assert_eq!(seen["method"], "PUT");
        assert_eq!(seen["body"], "log line");
        assert_only_agent_headers(&seen, false, &guid);
    }
}

#[test]
fn a_restarted_agent_reuses_its_key_from_disk_without_new_host_calls() {
    require_privileged!();
    let base = TempDir::new("restart");
    let w = World::new("restart", &["--mode", "enforce"]);
    let first = Agent::start_in(&w.ns, &w.cg, &base.0, FAST_POLL);
    first.wait_ready(&w.ns);
    let before = w.host.get(&w.ns, "/stats");
    assert_eq!(before["acquireCalls"], 1, "{before}");
    assert_eq!(before["attestCalls"], 1, "{before}");
    let guid = before["currentKeyGuid"].as_str().expect("attested guid").to_owned();
    let key_file = first.state_dir.join("keys").join(format!("{guid}.key"));
    assert!(key_file.is_file(), "the latched key is on disk: {}", key_file.display());
    let first_log = first.log();
    assert!(!first_log.contains("Found key details from local"), "first start latched a new key:\n{first_log}");
    drop(first);

    let second = Agent::start_in(&w.ns, &w.cg, &base.0, FAST_POLL);
    let e = Env { agent: second, host: w.host, cg: w.cg, ns: w.ns };
    e.agent.wait_ready(&e.ns);
    let after = e.stats();
    assert_eq!(after["acquireCalls"], 1, "no new acquire after a restart: {after}");
    assert_eq!(after["attestCalls"], 1, "no new attestation after a restart: {after}");
    assert!(after["statusCalls"].as_u64() > before["statusCalls"].as_u64(), "the new agent polled: {after}");
    assert_eq!(after["currentKeyGuid"], guid.as_str());
    let second_log = e.agent.log()[first_log.len()..].to_owned();
    assert!(second_log.contains("Found key details from local and ready to use."), "restart path:\n{second_log}");

    let (status, text) = e.root_curl("after-restart", &["-H", "Metadata: true", IMDS]);
    let seen = assert_redirected_and_signed(&e, "after-restart", status, &text);
    assert_eq!(seen["keyGuid"], guid.as_str(), "signed with the key from disk");
}

/// The rotation caller: fresh connections to IMDS for `secs`, tagged so the test finds its
/// requests on the host; every answer is kept in order.
fn traffic_loop(secs: f64) -> CallerLoop {
    CallerLoop::imds(secs).path("/metadata/instance?api-version=2021-02-01").header("x-gpa-test", "rotation").gap(0.05)
}

#[test]
fn key_rotation_under_traffic_switches_to_the_new_key_at_once() {
    require_privileged!();
    let e = ready_env("rotate", "enforce");
    let old = e.stats()["currentKeyGuid"].as_str().expect("attested guid").to_owned();
    let code = traffic_loop(7.0);

    let (answers, rotated_in, forget_seq) = std::thread::scope(|s| {
        let client = s.spawn(|| code.run(&e.ns, root_in(&e.cg)));
        std::thread::sleep(Duration::from_millis(1500));
        let forget_seq = e.host.requests(&e.ns).iter().filter_map(|r| r["seq"].as_u64()).max().unwrap_or(0);
        let t0 = Instant::now();
        e.control(&json!({"forgetAttestedKey": true}));
        let new = eventually(Duration::from_secs(5), "a new key to be attested", || {
            e.stats()["currentKeyGuid"].as_str().filter(|g| *g != old).map(str::to_owned)
        });
        let rotated_in = t0.elapsed();
        assert_ne!(new, old);
        (client.join().expect("client thread"), rotated_in, forget_seq)
    });
    let new = e.stats()["currentKeyGuid"].as_str().expect("new guid").to_owned();

    let mut ok = 0;
    let mut unauthorized = 0;
    for line in &answers.answers {
        match line.as_str() {
            "200" => ok += 1,
            "401" => unauthorized += 1,
            other => {
                panic!("only 200, or 401 during the switch, may be answered; got {other:?}\n{:?}", answers.answers)
            }
        }
    }
    eprintln!("rotation: new key attested {rotated_in:?} after forget; client saw {ok}x200 and {unauthorized}x401");

    let data: Vec<Value> = e
        .host
        .requests(&e.ns)
        .into_iter()
        .filter(|r| header_values(r, "x-gpa-test").iter().any(|v| v == "rotation"))
        .collect();
    assert_eq!(data.len(), ok + unauthorized, "every client request reached the host");
    let first_new = data
        .iter()
        .position(|r| r["keyGuid"] == new.as_str())
        .unwrap_or_else(|| panic!("no request signed with the new key {new}"));
    for r in &data[..first_new] {
        assert_eq!(r["keyGuid"], old.as_str(), "before the switch every request carries the old key: {r}");
        let seq = r["seq"].as_u64().unwrap_or(0);
        if seq <= forget_seq {
            assert_eq!(r["signature"], "valid", "before the rotation: {r}");
        } else if r["status"] == 401 {
            assert_eq!(r["signature"], "invalid:not-current-key", "only the retired key is refused: {r}");
        }
    }
    for r in &data[first_new..] {
        assert_eq!(r["keyGuid"], new.as_str(), "after the switch the agent never goes back to the old key: {r}");
        assert_eq!(r["signature"], "valid", "{r}");
        assert_eq!(r["status"], 200, "{r}");
    }
    assert!(
        data.len() - first_new >= 10,
        "enough traffic after the switch to mean something: {}",
        data.len() - first_new
    );
    // The window is bounded by one poll interval (1 s) plus the acquire and attest calls.
    assert!(rotated_in < Duration::from_secs(3), "rotation took {rotated_in:?}");
    assert!(unauthorized <= 60, "{unauthorized} refusals during a switch of {rotated_in:?}");
}

#[test]
fn an_agent_started_while_the_host_is_down_becomes_ready_when_it_comes_up() {
    require_privileged!();
    let w = World::new("down", &["--mode", "enforce"]);
    w.control(&json!({"down": true}));
    let e = w.with_agent(FAST_POLL);

    eventually(Duration::from_secs(5), "a failed status poll", || {
        e.agent.log().contains("Failed to get key status").then_some(())
    });
    let (out, _) = e.status_cli(None);
    assert_eq!(out.status.code(), Some(1), "not finished while the host is down: {}", stdout(&out));
    assert!(stdout(&out).contains("not finished"), "{}", stdout(&out));
    let p = e.provision();
    assert_eq!(p["finished"], false, "{p}");
    assert!(p["errorMessage"].as_str().unwrap_or("").contains("keyLatchStatus - Failed to get key status"), "{p}");
    // Let a few failed polls build up backoff before the host returns.
    std::thread::sleep(Duration::from_secs(2));

    e.control(&json!({"down": false}));
    let (out, took) = e.status_cli(Some(15));
    assert_eq!(out.status.code(), Some(0), "ready once the host is back: {}\n{}", stdout(&out), e.agent.log());
    assert!(took < Duration::from_secs(10), "became ready in {took:?}");
    let (status, text) = e.root_curl("after-outage", &["-H", "Metadata: true", IMDS]);
    assert_redirected_and_signed(&e, "after-outage", status, &text);
}

#[test]
fn disabling_the_secure_channel_removes_interception_and_enabling_restores_it() {
    require_privileged!();
    let e = ready_env("disable", "enforce");
    let (status, text) = e.root_curl("on", &["-H", "Metadata: true", IMDS]);
    assert_redirected_and_signed(&e, "on", status, &text);

    e.control(&json!({"secureChannelEnabled": false}));
    let mut n = 0;
    eventually(Duration::from_secs(8), "IMDS to be answered directly", || {
        n += 1;
        let (_, text) = e.root_curl(&format!("off-probe-{n}"), &["-H", "Metadata: true", IMDS]);
        (!text.contains(MARKER)).then_some(())
    });
    let (status, text) = e.root_curl("off", &["-H", "Metadata: true", IMDS]);
    assert_direct_and_unsigned(&e, "off", status, &text);
    let (status, text) = e.root_curl("off-ws", &["-H", "x-ms-version: 2012-11-30", GOAL_STATE]);
    assert_direct_and_unsigned(&e, "off-ws", status, &text);

    e.control(&json!({"secureChannelEnabled": true}));
    eventually(Duration::from_secs(8), "interception to return", || {
        n += 1;
        let (_, text) = e.root_curl(&format!("on-probe-{n}"), &["-H", "Metadata: true", IMDS]);
        text.contains(MARKER).then_some(())
    });
    let (status, text) = e.root_curl("on-again", &["-H", "Metadata: true", IMDS]);
    assert_redirected_and_signed(&e, "on-again", status, &text);
    let stats = e.stats();
    assert_eq!(
        stats["acquireCalls"], 1,
        "the host still reports the latched key, so the key on disk is reused: {stats}"
    );
    assert!(e.agent.log().contains("Found key details from local and ready to use."), "{}", e.agent.log());
}

#[test]
fn endpoint_modes_audit_and_disabled_decide_redirection_per_endpoint() {
    require_privileged!();
    let w = World::new("modes", &["--mode", "enforce"]);
    w.control(&json!({"imdsMode": "audit", "wireserverMode": "enforce"}));
    let e = w.with_agent(FAST_POLL);
    e.agent.wait_ready(&e.ns);
    assert_eq!(e.agent_state(), "WireServer Enforce -  IMDS Audit - HostGA Enforce");

    let (status, text) = e.root_curl("audit-imds", &["-H", "Metadata: true", IMDS]);
    assert_redirected_and_signed(&e, "audit-imds", status, &text);
    let (status, text) = e.root_curl("enforce-ws", &["-H", "x-ms-version: 2012-11-30", GOAL_STATE]);
    assert_redirected_and_signed(&e, "enforce-ws", status, &text);

    e.control(&json!({"imdsMode": "disabled"}));
    eventually(Duration::from_secs(8), "the agent to see IMDS disabled", || {
        (e.agent_state() == "WireServer Enforce -  IMDS Disabled - HostGA Enforce").then_some(())
    });
    let (status, text) = e.root_curl("disabled-imds", &["-H", "Metadata: true", IMDS]);
    assert_direct_and_unsigned(&e, "disabled-imds", status, &text);
    let (status, text) = e.root_curl("still-ws", &["-H", "x-ms-version: 2012-11-30", GOAL_STATE]);
    assert_redirected_and_signed(&e, "still-ws", status, &text);
}

#[test]
fn status_cli_exits_0_when_ready_and_1_while_the_key_cannot_be_acquired() {
    require_privileged!();
    let e = ready_env("cli-ok", "enforce");
    let (out, _) = e.status_cli(Some(5));
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("ready"), "{}", stdout(&out));
    drop(e);

    let w = World::new("cli-403", &["--mode", "enforce"]);
    w.control(&json!({"acquireHttpStatus": 403}));
    let e = w.with_agent(FAST_POLL);
    eventually(Duration::from_secs(5), "a refused acquire", || {
        e.agent.log().contains("Failed to acquire key details").then_some(())
    });
    let (out, took) = e.status_cli(Some(2));
    assert_eq!(out.status.code(), Some(1), "not finished: {}", stdout(&out));
    assert!(took >= Duration::from_secs(2), "--wait 2 kept asking for 2 s, took {took:?}");
    let p = e.provision();
    assert_eq!(p["finished"], false, "{p}");
    assert_eq!(
        p["errorMessage"].as_str().unwrap_or(""),
        "keyLatchStatus - Failed to acquire key details: Key(KeyResponse(\"acquire\", 403))\r\n",
        "{p}"
    );
    assert_eq!(e.stats()["attestCalls"], 0);
}

#[test]
fn status_cli_exits_1_when_no_agent_listens() {
    require_privileged!();
    let ns = Netns::new("cli-none");
    let dir = TempDir::new("cli-none");
    let config = dir.0.join("config.json");
    fs::write(&config, "{}").expect("config");
    let (out, took) = status_cli(&ns, &config, Some(1));
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(stdout(&out).contains("not finished"), "{}", stdout(&out));
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn status_cli_exits_2_when_the_channel_is_on_but_no_key_can_be_latched() {
    require_privileged!();
    // Provisioning finishes with MSP off; then the host turns it on and refuses the key.
    let w = World::new("cli-err", &["--mode", "enforce"]);
    w.control(&json!({"secureChannelEnabled": false}));
    let e = w.with_agent(FAST_POLL);
    e.agent.wait_ready(&e.ns);
    e.control(&json!({"secureChannelEnabled": true, "acquireHttpStatus": 403}));
    eventually(Duration::from_secs(8), "the refused acquire to show in /provision", || {
        e.provision()["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("Failed to acquire key details"))
            .then_some(())
    });
    let (out, _) = e.status_cli(Some(5));
    assert_eq!(out.status.code(), Some(2), "finished with error: {}", stdout(&out));
    assert!(
        stdout(&out).contains("keyLatchStatus - Failed to acquire key details: Key(KeyResponse(\"acquire\", 403))"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn status_cli_reports_ready_when_msp_is_disabled() {
    require_privileged!();
    let w = World::new("cli-off", &["--mode", "enforce"]);
    w.control(&json!({"secureChannelEnabled": false}));
    let e = w.with_agent(FAST_POLL);
    e.agent.wait_ready(&e.ns);
    // The CLI's time tick is later than the moment provisioning finished; with MSP off the
    // notify must make the agent report ready again (MSP §2.7).
    std::thread::sleep(Duration::from_millis(300));
    let (out, took) = e.status_cli(Some(5));
    assert_eq!(out.status.code(), Some(0), "after {took:?}: {}\n{}", stdout(&out), e.agent.log());
}

#[test]
fn a_refused_attestation_keeps_the_agent_unready_until_the_host_accepts_it() {
    require_privileged!();
    let w = World::new("attest", &["--mode", "enforce"]);
    w.control(&json!({"attestHttpStatus": 403}));
    let e = w.with_agent(FAST_POLL);
    eventually(Duration::from_secs(5), "a refused attestation", || {
        e.agent.log().contains("Failed to attest the key").then_some(())
    });
    assert!(e.agent.log().contains("Failed to attest the key: Key(KeyResponse(\"attest\", 403))"), "{}", e.agent.log());
    let p = e.provision();
    assert_eq!(p["finished"], false, "{p}");
    assert!(p["errorMessage"].as_str().unwrap_or("").contains("keyLatchStatus - Failed to attest the key"), "{p}");
    let (out, _) = e.status_cli(None);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    // Not attested, so not redirected: a cgroup client reaches the host unsigned and is refused.
    let (status, text) = e.root_curl("unattested", &["-H", "Metadata: true", IMDS]);
    assert_eq!(status, 401, "{text}");
    assert!(!text.contains(MARKER), "{text}");

    e.control(&json!({"attestHttpStatus": 0}));
    let (out, took) = e.status_cli(Some(15));
    assert_eq!(out.status.code(), Some(0), "after {took:?}: {}\n{}", stdout(&out), e.agent.log());
    let stats = e.stats();
    assert!(stats["attestFailures"].as_u64() >= Some(1), "{stats}");
    let (status, text) = e.root_curl("attested", &["-H", "Metadata: true", IMDS]);
    assert_redirected_and_signed(&e, "attested", status, &text);
}

#[test]
fn schema_1_0_wireserver_and_imds_signs_both_endpoints() {
    require_privileged!();
    let e = World::new("v1", &["--mode", "enforce", "--version", "1.0"]).with_agent(FAST_POLL);
    e.agent.wait_ready(&e.ns);
    assert_eq!(e.agent_state(), "wireserverandimds");
    let (status, text) = e.root_curl("v1-imds", &["-H", "Metadata: true", IMDS]);
    assert_redirected_and_signed(&e, "v1-imds", status, &text);
    let (status, text) = e.root_curl("v1-ws", &["-H", "x-ms-version: 2012-11-30", GOAL_STATE]);
    assert_redirected_and_signed(&e, "v1-ws", status, &text);
    // Non-root callers: WireServer is root-only in the default policy (MSP §4.5), IMDS open.
    let nobody = As { ids: Some((65534, 65534)), cgroup: Some(&e.cg) };
    let (status, text) = curl(&e.ns, nobody, &["http://168.63.129.16/machine?comp=goalstate"]);
    assert_eq!(status, 403, "{text}");
}

#[test]
fn slow_failing_and_malformed_host_answers_keep_the_agent_unready_and_it_recovers() {
    require_privileged!();
    // The harness sets hostTimeoutMs to 1000: a 2 s answer is past the agent's timeout.
    for (fault, expect) in [
        (json!({"statusDelayMs": 2500}), "Failed to get key status - timed out"),
        (json!({"statusHttpStatus": 503}), "Failed to get key status - HTTP status 503"),
        (json!({"malformedStatus": true}), "Failed to get key status"),
    ] {
        let w = World::new("faults", &["--mode", "enforce"]);
        w.control(&fault);
        let e = w.with_agent(FAST_POLL);
        eventually(Duration::from_secs(8), expect, || e.agent.log().contains(expect).then_some(()));
        let p = e.provision();
        assert_eq!(p["finished"], false, "{fault}: {p}");
        // A caller meanwhile is not intercepted (no routes before the first good poll) and
        // the host refuses it unsigned: fail closed at the host.
        let (status, text) = e.root_curl("during-fault", &["-H", "Metadata: true", IMDS]);
        assert_eq!(status, 401, "{fault}: {text}");
        e.control(&json!({"statusDelayMs": 0, "statusHttpStatus": 0, "malformedStatus": false}));
        let (out, _) = e.status_cli(Some(20));
        assert_eq!(out.status.code(), Some(0), "{fault}: recovered: {}\n{}", stdout(&out), e.agent.log());
        let (status, text) = e.root_curl("after-fault", &["-H", "Metadata: true", IMDS]);
        assert_redirected_and_signed(&e, "after-fault", status, &text);
    }
}

/// The listener's address is not on the machine yet (loopback configured with 127.0.0.1 only,
/// `listenAddress` 127.0.0.2, an address that comes later): the daemon stays up, `status.json` says `proxyListenerStatus` STOPPED
/// with the cause, and `--status`, which finds no socket to ask, reads it there and exits 2
/// with it, as cloud-init needs to report it. Nothing is redirected meanwhile (callers reach
/// the host directly and are refused unsigned). Once the address exists, the retry binds,
/// the redirector attaches, the key latches and callers are served signed.
#[test]
fn a_listener_that_cannot_bind_is_reported_by_status_and_retried_until_it_binds() {
    require_privileged!();
    let ns = Netns::new("late-addr");
    let ip = |args: &[&str]| {
        let status = ns.command("ip").args(args).status().expect("run ip");
        assert!(status.success(), "ip {args:?}");
    };
    ip(&["addr", "del", "127.0.0.1/8", "dev", "lo"]);
    ip(&["addr", "add", "127.0.0.1/32", "dev", "lo"]);
    let host = FakeHost::start_with(&ns, &["--mode", "enforce"]);
    let cg = Cgroup::new("late-addr");
    let mut extra = FAST_POLL.to_vec();
    extra.push("\"listenAddress\":\"127.0.0.2:3080\"");
    let agent = Agent::spawn(&ns, &cg, &extra);
    let e = Env { agent, host, cg, ns };

    let doc = status_file_showing(&e, "proxyListenerStatus", "STOPPED", Duration::from_secs(20));
    let message = doc["proxyAgentStatus"]["proxyListenerStatus"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("Failed to start proxy listener - cannot listen on 127.0.0.2:3080"), "{doc}");
    assert!(e.agent.log().contains("started, version"), "the daemon runs:\n{}", e.agent.log());
    let (out, _) = e.status_cli(Some(5));
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(
            "Provisioning finished with errors: proxyListenerStatus - Failed to start proxy listener - cannot listen on 127.0.0.2:3080"
        ),
        "{}",
        stdout(&out)
    );
    assert!(attached_programs(&e.cg).is_empty(), "no redirect without the listener");
    let (status, _) = e.root_curl("no-listener", &["-H", "Metadata: true", IMDS]);
    assert_eq!(status, 401, "not redirected: the enforcing host refuses the unsigned request");

    // The address appears; the next retry binds, then everything else follows.
    let added = e.ns.command("ip").args(["addr", "add", "127.0.0.2/32", "dev", "lo"]).status().expect("ip addr add");
    assert!(added.success());
    eventually(Duration::from_secs(10), "the retry to bind", || {
        e.agent.log().contains("proxy listener ready on 127.0.0.2:3080").then_some(())
    });
    let (out, _) = e.status_cli(Some(20));
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(e.agent.log().contains("eBPF redirector attached to"), "{}", e.agent.log());
    let (status, text) = e.root_curl("after-bind", &["-H", "Metadata: true", IMDS]);
    assert_redirected_and_signed(&e, "after-bind", status, &text);
    let doc = status_file_showing(&e, "proxyListenerStatus", "RUNNING", Duration::from_secs(5));
    assert_eq!(doc["proxyAgentStatus"]["ebpfProgramStatus"]["status"], "RUNNING", "{doc}");
}

#[test]
fn a_failed_redirector_start_is_reported_by_status_and_retried_until_it_attaches() {
    require_privileged!();
    // The cgroup the agent is told to protect does not exist yet (a unit ordered too early, a
    // container runtime that makes it later): the attach fails for a real reason.
    let ns = Netns::new("late-cg");
    let host = FakeHost::start_with(&ns, &["--mode", "enforce"]);
    let path =
        gpa_system_tests::harness::cgroup2_root().expect("cgroup2").join(gpa_system_tests::harness::unique("late-cg"));
    // Dropped (removed) at the end like any test cgroup; created below, by this test.
    let cg = Cgroup { path };
    let agent = Agent::start(&ns, &cg, FAST_POLL);
    let e = Env { agent, host, cg, ns };

    // The daemon stays up and says why; `--status` finishes with that error, exit 2.
    let answer = provision(&e.ns);
    assert_eq!(answer["finished"], true, "{answer}");
    let error = answer["errorMessage"].as_str().unwrap_or_default();
    assert!(error.starts_with("ebpfProgramStatus - Failed to start redirector:"), "{answer}");
    let (out, _) = e.status_cli(Some(5));
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("Provisioning finished with errors: ebpfProgramStatus - Failed to start redirector"),
        "{}",
        stdout(&out)
    );
    let (status, body) = http(
        &e.ns,
        "127.0.0.1:3080".parse().expect("addr"),
        "GET",
        "/gpa-aggregated-status",
        &[("Metadata", "true")],
        b"",
    );
    // Not through the redirect: 403 (no claims); the status file says the same as --status.
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    let doc = status_file_showing(&e, "ebpfProgramStatus", "STOPPED", Duration::from_secs(5));
    let message = doc["proxyAgentStatus"]["ebpfProgramStatus"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("Failed to start redirector"), "{doc}");

    // The cgroup appears; the next retry attaches, the key latch goes on, callers are served.
    fs::create_dir(&e.cg.path).expect("create the cgroup");
    eventually(Duration::from_secs(10), "the retry to attach", || {
        e.agent.log().contains("eBPF redirector attached to").then_some(())
    });
    e.agent.wait_ready(&e.ns);
    let (out, _) = e.status_cli(Some(10));
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let (status, text) = e.root_curl("after-retry", &["-H", "Metadata: true", IMDS]);
    assert_redirected_and_signed(&e, "after-retry", status, &text);
    assert!(e.agent.log().contains("hardened: capabilities dropped"), "hardening followed the attach");
}
