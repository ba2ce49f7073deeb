// SPDX-License-Identifier: MIT
//! Operability (issue 5): the status file while traffic flows, `status`, `doctor`,
//! `audit verify` on the live audit trail, and `policy explain --live`.

#![allow(clippy::tests_outside_test_module, reason = "integration test crate: every function here is a test")]

use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::Duration;

use gpa_system_tests::harness::{Agent, As, Bpffs, Cgroup, FakeHost, Netns, binary, curl, root_in};
use gpa_system_tests::require_privileged;

const IMDS: &str = "http://169.254.169.254/metadata/instance?api-version=2021-02-01";

fn cli(ns: &Netns, agent: &Agent, args: &[&str]) -> Output {
    ns.command(binary("guest-proxy-agent").to_str().expect("utf-8"))
        .arg("--config")
        .arg(&agent.config)
        .args(args)
        .output()
        .expect("run the CLI")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn status_file_status_doctor_audit_verify_and_explain_on_a_live_agent() {
    require_privileged!();
    let ns = Netns::new("ops");
    let cg = Cgroup::new("ops");
    let pins = Bpffs::new("ops-bpf");
    let host = FakeHost::start(&ns, "enforce");
    let agent = Agent::start(&ns, &cg, &[&pins.config(), "\"statusIntervalSeconds\":1", "\"pollIntervalSeconds\":1"]);
    agent.wait_ready(&ns);
    for _ in 0..3 {
        let (status, body) = curl(&ns, root_in(&cg), &["-H", "Metadata: true", IMDS]);
        assert_eq!(status, 200, "{body}");
    }
    let (status, _) = curl(
        &ns,
        As { ids: Some((65534, 65534)), cgroup: Some(&cg) },
        &["http://168.63.129.16/machine?comp=goalstate"],
    );
    assert_eq!(status, 403);

    // status.json: rewritten every second while traffic flows.
    let path = agent.log_dir.join("status.json");
    let mut doc = serde_json::Value::Null;
    for _ in 0..50 {
        if let Ok(bytes) = std::fs::read(&path)
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && v["proxyAgentStatus"]["proxyConnectionsCount"].as_u64().unwrap_or(0) >= 4
        {
            doc = v;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !doc.is_null(),
        "status.json never showed the traffic: {}",
        std::fs::read_to_string(&path).unwrap_or_default()
    );
    eprintln!("sample status.json:\n{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    let p = &doc["proxyAgentStatus"];
    assert_eq!(p["status"], "SUCCESS", "{doc}");
    assert_eq!(
        p["keyLatchStatus"]["states"]["secureChannelState"],
        "WireServer Enforce -  IMDS Enforce - HostGA Enforce"
    );
    assert_eq!(p["ebpfProgramStatus"]["status"], "RUNNING");
    assert_eq!(p["proxyListenerStatus"]["status"], "RUNNING");
    let summaries = doc["proxyConnectionSummary"].as_array().expect("summaries");
    assert!(
        summaries.iter().any(|s| s["responseStatus"] == "200 OK"
            && s["count"].as_u64().unwrap_or(0) >= 3
            && s["processFullPath"] == "/usr/bin/curl"),
        "{summaries:?}"
    );
    let failed = doc["failedAuthenticateSummary"].as_array().expect("failed summaries");
    assert!(failed.iter().any(|s| s["userName"] == "nobody" && s["responseStatus"] == "403 Forbidden"), "{failed:?}");
    let mode = std::fs::metadata(&path).expect("status file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    let raw = std::fs::read_to_string(&path).expect("status file");
    let keys = host.get(&ns, "/keys");
    for (_, hex) in keys.as_object().expect("keys") {
        assert!(
            !raw.to_ascii_lowercase().contains(&hex.as_str().unwrap_or("-").to_ascii_lowercase()),
            "key in status.json"
        );
    }

    let out = cli(&ns, &agent, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));

    let out = cli(&ns, &agent, &["doctor"]);
    eprintln!("sample doctor output:\n{}", text(&out));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("FAIL"), "{}", text(&out));

    // The audit trail verifies with the latched key; a flipped byte is named.
    std::thread::sleep(Duration::from_millis(300));
    let audit = agent.log_dir.join("audit.ndjson");
    let key_file = std::fs::read_dir(agent.state_dir.join("keys"))
        .expect("keys dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "key"))
        .expect("key file");
    let out = cli(
        &ns,
        &agent,
        &["audit", "verify", "--key-file", key_file.to_str().expect("utf-8"), audit.to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let copy = agent.log_dir.join("tampered.ndjson");
    let mut bytes = std::fs::read(&audit).expect("audit");
    let second_line = bytes.iter().position(|b| *b == b'\n').expect("two lines") + 10;
    bytes[second_line] ^= 0x01;
    std::fs::write(&copy, &bytes).expect("tampered copy");
    let out = cli(&ns, &agent, &["audit", "verify", copy.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(":2:"), "names line 2: {}", text(&out));

    // policy explain on the live rules (the snapshot the agent wrote).
    let out = cli(
        &ns,
        &agent,
        &[
            "policy",
            "explain",
            "--live",
            "--endpoint",
            "wireserver",
            "--url",
            "/machine?comp=goalstate",
            "--uid",
            "65534",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).to_ascii_lowercase().contains("forbidden"), "{}", text(&out));
}

/// Unprivileged: the shipped unit's restart settings can never reach systemd's start limit,
/// which would leave the VM without an agent until someone notices (issue 14).
#[test]
fn the_unit_restarts_forever_and_never_hits_the_start_limit() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/guest-proxy-agent.service"))
        .expect("the shipped unit");
    let value = |key: &str| {
        unit.lines().find_map(|l| l.trim().strip_prefix(key).and_then(|v| v.strip_prefix('='))).map(str::trim)
    };
    assert_eq!(value("Restart"), Some("always"), "{unit}");
    let restart_sec: f64 = value("RestartSec").and_then(|v| v.parse().ok()).expect("RestartSec in seconds");
    // systemd's defaults (DefaultStartLimitIntervalSec=10s, DefaultStartLimitBurst=5) unless set.
    let interval: f64 =
        value("StartLimitIntervalSec").map_or(10.0, |v| v.trim_end_matches('s').parse().expect("seconds"));
    let burst: f64 = value("StartLimitBurst").map_or(5.0, |v| v.parse().expect("count"));
    // Disabled, or `burst` starts cannot fit into one interval even if each fails at once.
    assert!(interval == 0.0 || restart_sec * (burst - 1.0) > interval, "start limit reachable: {unit}");
    assert!(restart_sec >= 2.0, "a crash loop must not spin: RestartSec={restart_sec}");
}
