// SPDX-License-Identifier: MIT
//! The optional telemetry upload end to end (read `msp-protocol.md` §1.2 rows D–G, §3.7, §7.2
//! and §7.3 first): a real agent in a namespace and child cgroup made here, the fake host on the
//! real metadata addresses, and the fake host's request record as the judge.
//!
//! * With `telemetryIntervalSeconds` set, the host receives a well-formed `TelemetryData` body
//!   (provider, Event id 7, the parameters in the order of §7.3) carrying the agent's version,
//!   the VM metadata the fake host served and a start milestone; the goal state, shared config
//!   and IMDS calls that fetched that metadata were signed with the latched key; the upload
//!   itself was not.
//! * Without it, nothing of the kind reaches the host in the same time.
//! * A failed upload is sent again, with the same body, 15 s later.

#![expect(clippy::tests_outside_test_module, reason = "an integration test file: every item is a test or its helper")]
#![expect(clippy::disallowed_methods, reason = "system tests wait on real agents and hosts in real time")]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpa_system_tests::harness::{Env, World, binary, eventually, header_values};
use gpa_system_tests::require_privileged;
use serde_json::{Value, json};

const UPLOAD: &str = "/machine/?comp=telemetrydata";
const PROVIDER: &str = "FFF0196F-EE4C-4EAF-9AA5-776F622DEB4F";
/// How long an agent with a 1 s interval may take from "ready" to its first upload; the test
/// without telemetry waits as long before concluding nothing was sent.
const UPLOAD_WITHIN: Duration = Duration::from_secs(10);
/// The §7.3 parameters of an Event 7, in order, with their types.
const EVENT_7_PARAMS: [(&str, &str); 23] = [
    ("KeywordName", "mt:wstr"),
    ("TenantName", "mt:wstr"),
    ("RoleName", "mt:wstr"),
    ("RoleInstanceName", "mt:wstr"),
    ("ContainerId", "mt:wstr"),
    ("ResourceGroupName", "mt:wstr"),
    ("SubscriptionId", "mt:wstr"),
    ("VMId", "mt:wstr"),
    ("ImageOrigin", "mt:uint64"),
    ("OSVersion", "mt:wstr"),
    ("RAM", "mt:uint64"),
    ("Processors", "mt:uint64"),
    ("EventPid", "mt:uint64"),
    ("EventTid", "mt:uint64"),
    ("GAVersion", "mt:wstr"),
    ("ExecutionMode", "mt:wstr"),
    ("TaskName", "mt:wstr"),
    ("OpcodeName", "mt:wstr"),
    ("EventName", "mt:wstr"),
    ("CapabilityUsed", "mt:wstr"),
    ("Context1", "mt:wstr"),
    ("Context2", "mt:wstr"),
    ("Context3", "mt:wstr"),
];

/// What the telemetry tests need on top of the shared [`Env`].
trait TelemetryEnv: Sized {
    /// Fake host in enforce mode (configured with `host_patch` before the agent starts), then
    /// an agent polling every second with `extra` config keys, key latched.
    fn ready(tag: &str, host_patch: Option<Value>, extra: &[&str]) -> Self;
    /// Every request the fake host recorded.
    fn requests(&self) -> Vec<Value>;
    /// The telemetry uploads among them.
    fn uploads(&self) -> Vec<Value>;
    /// `telemetryLoggerStatus` from the status file, once it satisfies `done`.
    fn telemetry_status(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value;
}

impl TelemetryEnv for Env {
    fn ready(tag: &str, host_patch: Option<Value>, extra: &[&str]) -> Self {
        let world = World::new(tag, &["--mode", "enforce"]);
        if let Some(patch) = host_patch {
            world.control(&patch);
        }
        let mut keys = vec!["\"pollIntervalSeconds\":1", "\"statusIntervalSeconds\":1"];
        keys.extend_from_slice(extra);
        world.ready(&keys)
    }

    fn requests(&self) -> Vec<Value> {
        self.host.requests(&self.ns)
    }

    fn uploads(&self) -> Vec<Value> {
        self.requests().into_iter().filter(|r| r["target"] == UPLOAD).collect()
    }

    fn telemetry_status(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let path = self.agent.log_dir.join("status.json");
        eventually(Duration::from_secs(10), what, || {
            let doc: Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
            let status = doc["proxyAgentStatus"]["telemetryLoggerStatus"].clone();
            done(&status).then_some(status)
        })
    }
}

/// The agent's version as it prints it.
fn agent_version() -> String {
    let out = Command::new(binary("guest-proxy-agent")).arg("--version").output().expect("--version");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    text.strip_prefix("guest-proxy-agent ").unwrap_or_else(|| panic!("--version said {text:?}")).to_owned()
}

/// Parses a `TelemetryData` body with Python's XML parser (an independent, strict parser: a
/// body that is not well-formed XML fails here), the CDATA of each event included.
fn parse_telemetry(body: &str) -> Value {
    const SCRIPT: &str = r#"
import json, sys, xml.etree.ElementTree as ET
root = ET.fromstring(sys.stdin.buffer.read())
providers = []
for p in root:
    events = []
    for e in p:
        inner = ET.fromstring("<r>" + (e.text or "") + "</r>")
        events.append({"tag": e.tag, "id": e.get("id"),
                       "params": [[q.tag, q.get("Name"), q.get("Value"), q.get("T")] for q in inner]})
    providers.append({"tag": p.tag, "id": p.get("id"), "events": events})
print(json.dumps({"tag": root.tag, "version": root.get("version"), "providers": providers}))
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("write body");
    let out = child.wait_with_output().expect("python3 output");
    assert!(out.status.success(), "not well-formed XML: {}\nbody: {body}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("parser output")
}

/// `Name → Value` of one parsed event, after checking the names, order and types of §7.3.
fn params(event: &Value) -> serde_json::Map<String, Value> {
    let list = event["params"].as_array().expect("params");
    let shape: Vec<(String, String, String)> = list
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap_or("").to_owned(),
                p[1].as_str().unwrap_or("").to_owned(),
                p[3].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> =
        EVENT_7_PARAMS.iter().map(|(n, t)| ("Param".to_owned(), (*n).to_owned(), (*t).to_owned())).collect();
    assert_eq!(shape, expected, "parameter names, order and types of §7.3");
    list.iter().map(|p| (p[1].as_str().unwrap_or("").to_owned(), p[2].clone())).collect()
}

#[test]
fn telemetry_reaches_the_host_with_metadata_fetched_by_signed_calls() {
    require_privileged!();
    let e = Env::ready("tele", None, &["\"telemetryIntervalSeconds\":1", "\"telemetryLevel\":\"info\""]);
    let version = agent_version();
    let upload = eventually(UPLOAD_WITHIN, "a telemetry upload answered 200", || {
        e.uploads().into_iter().find(|r| r["status"] == 200)
    });

    // G: unsigned (skip list), with the headers of §1.2.
    assert_eq!(upload["endpoint"], "wireserver", "{upload}");
    assert_eq!(upload["method"], "POST");
    assert_eq!(upload["signature"], "missing", "the upload is never signed: {upload}");
    assert_eq!(header_values(&upload, "x-ms-version"), ["2012-11-30"]);
    assert_eq!(header_values(&upload, "content-type"), ["text/xml; charset=utf-8"]);
    assert_eq!(header_values(&upload, "host"), ["168.63.129.16"]);

    let body = upload["body"].as_str().expect("body");
    let first_event = body.find("]]></Event>").map_or(body.len(), |end| end + "]]></Event>".len());
    eprintln!("sample TelemetryData body ({} bytes), up to its first event:\n{}", body.len(), &body[..first_event]);
    assert!(body.starts_with("<?xml version=\"1.0\"?><TelemetryData version=\"1.0\">"), "{body}");
    assert!(body.len() <= 64 * 1024, "batches are at most 64 KiB");
    let doc = parse_telemetry(body);
    assert_eq!((doc["tag"].as_str(), doc["version"].as_str()), (Some("TelemetryData"), Some("1.0")));
    let providers = doc["providers"].as_array().expect("providers");
    assert_eq!(providers.len(), 1, "{doc}");
    assert_eq!((providers[0]["tag"].as_str(), providers[0]["id"].as_str()), (Some("Provider"), Some(PROVIDER)));
    let events = providers[0]["events"].as_array().expect("events");
    assert!(!events.is_empty(), "{doc}");
    let all: Vec<_> = events
        .iter()
        .map(|event| {
            assert_eq!((event["tag"].as_str(), event["id"].as_str()), (Some("Event"), Some("7")), "{event}");
            params(event)
        })
        .collect();

    for p in &all {
        eprintln!("event: {} {} {} {}", p["CapabilityUsed"], p["Context3"], p["TaskName"], p["Context1"]);
    }

    // The metadata the fake host served (tests/src/fake_host/handlers.rs), on every event.
    let expected = json!({
        "KeywordName": format!("{{\"CpuArchitecture\":\"{}\"}}", std::env::consts::ARCH),
        "TenantName": "fake-deployment",
        "RoleName": "fake-vm",
        "RoleInstanceName": "fake-deployment.fake-vm_IN_0",
        "ContainerId": "a8016240-7286-49ef-8981-63520cb8f6d0",
        "ResourceGroupName": "fake-rg",
        "SubscriptionId": "0e1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b",
        "VMId": "5c3e5d2a-8f7e-4b7a-9d61-0b6f7e9a1c42",
        "ImageOrigin": "1",
        "GAVersion": version,
        "ExecutionMode": "ProxyAgent",
        "EventName": "MicrosoftAzureGuestProxyAgent",
        "EventPid": e.agent.proc.pid().to_string(),
    });
    for p in &all {
        for (name, value) in expected.as_object().expect("object") {
            assert_eq!(&p[name], value, "{name} in {p:?}");
        }
        let os = p["OSVersion"].as_str().unwrap_or("");
        assert!(os.starts_with("Linux:") && os.len() > "Linux:-".len(), "OSVersion {os:?}");
        assert_ne!(p["RAM"], "0", "RAM in MB");
        assert_ne!(p["Processors"], "0");
        assert_eq!(p["OpcodeName"], p["Context2"], "both carry the event time");
    }
    let milestone = format!("started, version {version}");
    assert!(
        all.iter().any(|p| p["Context1"] == milestone.as_str()
            && p["Context3"] == "ProxyAgent"
            && p["CapabilityUsed"] == "INFO"),
        "the start milestone is among the events: {all:?}"
    );
    assert!(
        all.iter().any(|p| p["Context3"] == "KeyKeeper"
            && p["TaskName"] == "set_module_status_message"
            && p["CapabilityUsed"] == "WARN"),
        "key latch status changes are Warn events (§6.1): {all:?}"
    );

    // D, E, F came first and were signed with the key the host had attested.
    let requests = e.requests();
    let key = e.host.get(&e.ns, "/stats")["currentKeyGuid"].clone();
    let seq_of = |r: &Value| r["seq"].as_u64().unwrap_or(0);
    let find = |what: &str, matches: &dyn Fn(&Value) -> bool| {
        requests.iter().find(|r| matches(r)).unwrap_or_else(|| panic!("no {what} request in {requests:?}")).clone()
    };
    let goal = find("goal state", &|r| r["endpoint"] == "wireserver" && r["target"] == "/machine?comp=goalstate");
    let shared = find("shared config", &|r| {
        r["endpoint"] == "wireserver"
            && r["target"].as_str().is_some_and(|t| {
                t.starts_with("/machine/a8016240-7286-49ef-8981-63520cb8f6d0/") && t.contains("type=sharedConfig")
            })
    });
    let imds = find("IMDS instance", &|r| {
        r["endpoint"] == "imds" && r["target"] == "/metadata/instance?api-version=2018-02-01"
    });
    for (what, r) in [("goal state", &goal), ("shared config", &shared), ("IMDS", &imds)] {
        assert_eq!(r["method"], "GET", "{what}: {r}");
        assert_eq!(r["signature"], "valid", "{what} signed with the latched key (host verdict): {r}");
        assert_eq!(r["keyGuid"], key, "{what}: {r}");
        assert_eq!(r["status"], 200, "{what}: {r}");
        assert!(seq_of(r) < seq_of(&upload), "{what} before the upload");
    }
    assert_eq!(header_values(&goal, "x-ms-version"), ["2012-11-30"]);
    assert_eq!(header_values(&shared, "x-ms-version"), ["2012-11-30"]);
    assert_eq!(header_values(&imds, "metadata"), ["true"]);
    assert_eq!(header_values(&imds, "host"), ["169.254.169.254"]);
    assert!(seq_of(&goal) < seq_of(&shared) && seq_of(&shared) < seq_of(&imds), "D, E, F in order");

    // The status is honest about it.
    let status = e.telemetry_status("telemetryLoggerStatus reporting sent events", |s| {
        s["message"].as_str().is_some_and(|m| m.contains("sent ") && !m.contains("sent 0 events"))
    });
    assert_eq!(status["status"], "RUNNING", "{status}");
    assert!(status["message"].as_str().unwrap_or("").contains("last error: none"), "{status}");
}

#[test]
fn without_telemetry_config_nothing_is_uploaded_or_fetched() {
    require_privileged!();
    let e = Env::ready("notele", None, &[]);
    std::thread::sleep(UPLOAD_WITHIN);
    let requests = e.requests();
    let telemetry: Vec<&Value> = requests
        .iter()
        .filter(|r| {
            r["target"].as_str().is_some_and(|t| t.to_ascii_lowercase().contains("comp=telemetrydata"))
                || r["target"] == "/machine?comp=goalstate"
                || r["endpoint"] == "imds"
        })
        .collect();
    assert!(telemetry.is_empty(), "telemetry is off unless configured, yet the host saw {telemetry:?}");
    let status = e.telemetry_status("telemetryLoggerStatus", |s| s.is_object());
    assert_eq!(status, json!({"status": "STOPPED", "message": "Telemetry upload is not configured."}));
}

#[test]
fn a_failed_upload_is_sent_again_15_seconds_later_with_the_same_body() {
    require_privileged!();
    let e = Env::ready("teleretry", Some(json!({"telemetryFailures": 1})), &["\"telemetryIntervalSeconds\":1"]);
    let first = eventually(UPLOAD_WITHIN, "a first upload", || e.uploads().into_iter().next());
    let failed_at = Instant::now();
    assert_eq!(first["status"], 500, "the injected failure: {first}");
    let status = e.telemetry_status("the failure in telemetryLoggerStatus", |s| {
        s["message"].as_str().is_some_and(|m| m.contains("last error: upload: HTTP status 500"))
    });
    assert_eq!(status["status"], "RUNNING");
    let second = eventually(Duration::from_secs(25), "the retry", || e.uploads().into_iter().nth(1));
    let waited = failed_at.elapsed();
    assert_eq!(second["status"], 200, "{second}");
    assert_eq!(second["body"], first["body"], "the same batch is sent again");
    assert!(
        waited >= Duration::from_secs(13) && waited <= Duration::from_secs(20),
        "retried 15 s apart (seen after {waited:?})"
    );
    assert_eq!(e.host.get(&e.ns, "/stats")["telemetryFailuresInjected"], 1);
}
