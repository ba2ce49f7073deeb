// SPDX-License-Identifier: MIT
//! Hostile neighbours (issue 13): while uid 65534 runs an availability attack, a root caller
//! loop (the provisioning and guest agents' requests) keeps going, and every one of its
//! requests must succeed: failures are counted and expected to be zero, not watched. After the
//! attack the agent must serve normally within a second, by itself.
//!
//! Run: `GPA_BIN_GUEST_PROXY_AGENT=… GPA_BIN_FAKE_HOST=… cargo test -p gpa-system-tests --test
//! availability -- --test-threads=1` (root; skips with a printed reason otherwise).

#![allow(
    clippy::tests_outside_test_module,
    reason = "integration test crate: every function here is a test or its helper"
)]
#![allow(clippy::disallowed_methods, reason = "system tests wait on real agents and hosts in real time")]
#![allow(clippy::print_stdout, clippy::print_stderr, reason = "the tests print what they measured")]

#[path = "security/support.rs"]
#[allow(dead_code, unused_imports, reason = "shared with the security suite; not every helper is used here")]
mod support;

use std::time::Duration;

use gpa_system_tests::harness::{As, client};
use serde_json::Value;
use support::*;

/// The shipped unit's `LimitNOFILE` (packaging/guest-proxy-agent.service): systemd sets soft
/// and hard to it. The test process (and so the agent it starts) gets the same.
const UNIT_NOFILE: u64 = 8192;

fn unit_fd_limit() {
    let lim = libc::rlimit { rlim_cur: UNIT_NOFILE, rlim_max: UNIT_NOFILE };
    // SAFETY: setrlimit reads one valid rlimit; raising our own limit affects nothing else.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) };
    assert_eq!(rc, 0, "cannot set RLIMIT_NOFILE to the unit's {UNIT_NOFILE}");
}

/// Root's loop: `count` sequential requests alternating WireServer goal state, IMDS and a
/// WireServer health POST, `gap` seconds apart; with `imds` (the uid 1000 neighbour) an IMDS
/// GET and an IMDS POST (a body buffer of its own share); prints JSON {ok, failed, statuses,
/// p50_ms, max_ms}.
const ROOT_LOOP: &str = r#"
import http.client, json, sys, time
count, gap = int(sys.argv[1]), float(sys.argv[2])
only_imds = len(sys.argv) > 3 and sys.argv[3] == "imds"
ok, failed, statuses, lat = 0, 0, {}, []
reqs = [("168.63.129.16", "GET", "/machine?comp=goalstate", {"x-ms-version": "2012-11-30"}, None),
        ("169.254.169.254", "GET", "/metadata/instance?api-version=2021-02-01", {"Metadata": "true"}, None),
        ("168.63.129.16", "POST", "/machine?comp=health", {"x-ms-version": "2012-11-30", "Content-Type": "text/xml"},
         # A ready report as cloud-init sends it, for the fake host's container and role instance.
         b"<?xml version=\"1.0\" encoding=\"utf-8\"?><Health><GoalStateIncarnation>1</GoalStateIncarnation>"
         b"<Container><ContainerId>a8016240-7286-49ef-8981-63520cb8f6d0</ContainerId><RoleInstanceList><Role>"
         b"<InstanceId>fake-deployment.fake-vm_IN_0</InstanceId><Health><State>Ready</State></Health>"
         b"</Role></RoleInstanceList></Container></Health>")]
imds_post = ("169.254.169.254", "POST", "/metadata/instance?api-version=2021-02-01",
             {"Metadata": "true", "Content-Type": "application/json"}, b'{"probe": 1}')
for i in range(count):
    # The neighbour (imds mode) alternates a GET and a POST, which needs a body buffer.
    host, method, path, headers, body = (reqs[1] if i % 2 == 0 else imds_post) if only_imds else reqs[i % 3]
    t = time.monotonic()
    try:
        c = http.client.HTTPConnection(host, 80, timeout=5)
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse(); r.read(); c.close()
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        if r.status == 200: ok += 1
        else: failed += 1
    except Exception as e:
        failed += 1
        statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
    lat.append((time.monotonic() - t) * 1000)
    time.sleep(gap)
lat.sort()
print(json.dumps({"ok": ok, "failed": failed, "statuses": statuses,
                  "p50_ms": round(lat[len(lat) // 2], 2), "max_ms": round(lat[-1], 2)}))
"#;

/// The attacks, as uid 65534. argv: kind seconds [n].
const ATTACK: &str = r#"
import json, socket, sys, time
kind, seconds = sys.argv[1], float(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 0
end = time.monotonic() + seconds
out = {"kind": kind, "opened": 0, "errors": 0}
socks = []
def conn(host, port):
    s = socket.socket(); s.settimeout(3); s.connect((host, port)); return s
def pipeline(host, port, one, per_conn, drain):
    # `per_conn` copies of request `one` in one write per connection until the end; returns
    # how many were sent.
    sent = 0
    while time.monotonic() < end:
        try:
            s = conn(host, port); s.sendall(one * per_conn); sent += per_conn
            s.settimeout(drain)
            try:
                while s.recv(65536): pass
            except OSError: pass
            s.close()
        except OSError:
            out["errors"] += 1
    return sent
if kind in ("hold-keepalive", "hold-idle-direct"):
    # n connections held: kept alive after one allowed IMDS GET each (redirected), or idle
    # direct connections to the listener (no identity).
    for i in range(n):
        try:
            if kind == "hold-keepalive":
                s = conn("169.254.169.254", 80)
                s.sendall(b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n\r\n")
            else:
                s = conn("127.0.0.1", 3080)
            socks.append(s); out["opened"] += 1
        except OSError:
            out["errors"] += 1
    while time.monotonic() < end: time.sleep(0.1)
elif kind == "slow-post":
    # n POSTs whose bodies trickle: one byte every 3 s.
    for i in range(n):
        try:
            s = conn("169.254.169.254", 80)
            s.sendall(b"POST /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Length: 100000\r\n\r\n")
            socks.append(s); out["opened"] += 1
        except OSError:
            out["errors"] += 1
    while time.monotonic() < end:
        for s in socks:
            try: s.send(b"x")
            except OSError: pass
        time.sleep(3)
elif kind == "provision-flood":
    # Pipelined GET /provision on direct connections: no identity, no cgroup needed.
    out["sent"] = pipeline("127.0.0.1", 3080, b"GET /provision HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n\r\n", 200, 0.2)
elif kind == "imds-pipeline":
    # Allowed IMDS GETs, 100 pipelined per redirected connection, as fast as answered: every
    # one is an ordinary audit record of this uid.
    req = b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n\r\n"
    out["sent"] = pipeline("169.254.169.254", 80, req, 100, 0.3)
elif kind == "fd-storm":
    # As many connections as the kernel lets this user open, held briefly, then all closed.
    while time.monotonic() < end and len(socks) < n:
        try: socks.append(conn("169.254.169.254", 80)); out["opened"] += 1
        except OSError: out["errors"] += 1
for s in socks:
    try: s.close()
    except OSError: pass
print(json.dumps(out))
"#;

fn json_of(out: &std::process::Output, what: &str) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{what}: {e}: {text} {}", String::from_utf8_lossy(&out.stderr)))
}

/// Runs `attack` as uid 65534 (`inside`: in the agent's cgroup, else outside) while root's
/// loop makes `count` requests; returns (root loop result, attack result).
fn under_attack(e: &Env, attack: &[&str], inside: bool, count: u32, gap: f64) -> (Value, Value) {
    under_attacks(e, &[(attack, inside)], count, gap)
}

/// One attack: the attack script's argv, and whether it runs inside the agent's cgroup.
type Attack<'a> = (&'a [&'a str], bool);

/// [`under_attack`] with several attacks at once (each its own uid 65534 process); the attack
/// result is the list of their results.
fn under_attacks(e: &Env, attacks: &[Attack<'_>], count: u32, gap: f64) -> (Value, Value) {
    std::thread::scope(|s| {
        let attackers: Vec<_> = attacks
            .iter()
            .map(|(attack, inside)| {
                let who = As { ids: Some((65534, 65534)), cgroup: if *inside { Some(&e.cg) } else { None } };
                s.spawn(move || {
                    let mut argv = vec![PYTHON, "-c", ATTACK];
                    argv.extend_from_slice(attack);
                    client(&e.ns, who, &argv)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        let count = count.to_string();
        let gap = gap.to_string();
        // Another unprivileged user (uid 1000) asks IMDS meanwhile: one user's flood must
        // not take the table from the others either.
        let neighbour = s.spawn(|| {
            let who = As { ids: Some((1000, 1000)), cgroup: Some(&e.cg) };
            client(&e.ns, who, &[PYTHON, "-c", ROOT_LOOP, "8", "0.5", "imds"])
        });
        let root_loop = client(&e.ns, root(&e.cg), &[PYTHON, "-c", ROOT_LOOP, &count, &gap]);
        let results: Vec<Value> =
            attackers.into_iter().map(|a| json_of(&a.join().expect("attacker"), "attack")).collect();
        let neighbour = json_of(&neighbour.join().expect("neighbour"), "uid 1000 loop");
        assert_eq!(neighbour["failed"], 0, "uid 1000 failed during {attacks:?}: {neighbour}");
        let attack = if results.len() == 1 { results[0].clone() } else { Value::Array(results) };
        (json_of(&root_loop, "root loop"), attack)
    })
}

/// Root is served normally right after the attack: 6 requests, all 200, within a second of
/// starting.
fn recovers(e: &Env, what: &str) -> Value {
    let out = client(&e.ns, root(&e.cg), &[PYTHON, "-c", ROOT_LOOP, "6", "0"]);
    let after = json_of(&out, "after");
    assert_eq!(after["failed"], 0, "{what}: not recovered: {after}\n{}", tail(&e.agent.log()));
    after
}

#[test]
fn root_callers_never_fail_while_an_unprivileged_user_attacks_availability() {
    let _run = begin!("root_callers_never_fail_while_an_unprivileged_user_attacks_availability");
    unit_fd_limit();
    let mut e = World::new("avail").ready(&[]);
    // Evidence written before the attacks: a denial of uid 65534 at the WireServer.
    let (status, _) = e.curl(nobody(&e.cg), &["-H", "x-ms-version: 2012-11-30", GOAL_STATE]);
    assert_eq!(status, 403);
    let evidence = |e: &Env| e.agent.audit().iter().any(|r| r["uid"] == 65534 && r["decision"] == "deny");
    e.eventually(Duration::from_secs(3), "the denial's audit record", || evidence(&e).then_some(()));

    let mut report = Vec::new();
    let attacks: [(&str, &[Attack<'_>]); 7] = [
        ("1,100 kept-alive connections (table exhaustion)", &[(&["hold-keepalive", "12", "1100"], true)]),
        ("1,100 idle direct connections, outside the cgroup", &[(&["hold-idle-direct", "12", "1100"], false)]),
        ("16 slow POSTs to IMDS, one byte every 3 s", &[(&["slow-post", "14", "16"], true)]),
        ("pipelined GET /provision flood on direct connections", &[(&["provision-flood", "10"], false)]),
        ("fd storm: 3,000 connections opened, held, closed", &[(&["fd-storm", "6", "3000"], true)]),
        (
            "combined, inside the cgroup: kept-alive table, slow POSTs, allowed-request flood, fd storm",
            &[
                (&["hold-keepalive", "12", "1100"], true),
                (&["slow-post", "14", "16"], true),
                (&["imds-pipeline", "12"], true),
                (&["fd-storm", "8", "2000"], true),
            ],
        ),
        (
            "combined, inside and outside: kept-alive table, idle direct, /provision flood, slow POSTs",
            &[
                (&["hold-keepalive", "12", "1100"], true),
                (&["hold-idle-direct", "12", "1100"], false),
                (&["provision-flood", "12"], false),
                (&["slow-post", "14", "16"], true),
            ],
        ),
    ];
    // GPA_AVAIL_ONLY=i runs attack i alone (to check each against a reverted agent).
    let only: Option<usize> = std::env::var("GPA_AVAIL_ONLY").ok().and_then(|v| v.parse().ok());
    for (i, (what, attacks)) in attacks.into_iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let audit_before = e.agent.audit().len();
        let (root_result, attack_result) = under_attacks(&e, attacks, 24, 0.25);
        // Identity-less local requests are counted, not audited one by one: the flood of
        // thousands adds no more lines than root's own requests and a few checkpoints.
        let added = e.agent.audit().len().saturating_sub(audit_before);
        if attacks.len() == 1 && attacks[0].0[0] == "provision-flood" {
            assert!(added <= 80, "{what}: {added} audit lines added (attack {attack_result})");
        }
        assert_eq!(
            root_result["failed"],
            0,
            "{what}: root failed: {root_result} (attack {attack_result})\n{}",
            tail(&e.agent.log())
        );
        let after = recovers(&e, what);
        e.assert_alive();
        report.push(format!(
            "{what}: root {} ok / 0 failed, p50 {} ms, max {} ms during; after: max {} ms; attack {attack_result}",
            root_result["ok"], root_result["p50_ms"], root_result["max_ms"], after["max_ms"]
        ));
    }
    // Abandoned slow uploads left audit records (408 at their absolute body deadline, or
    // `abandoned` when the client went away).
    if only.is_none_or(|o| o == 2) {
        let audit = e.agent.audit();
        let uploads: Vec<&Value> = audit.iter().filter(|r| r["uid"] == 65534 && r["method"] == "POST").collect();
        assert!(uploads.len() >= 16, "the 16 slow uploads left {} records", uploads.len());
        let timed_out = uploads.iter().filter(|r| r["status"] == 408 || r["decision"] == "abandoned").count();
        let refused = uploads.iter().filter(|r| r["status"] == 503).count();
        assert_eq!(timed_out + refused, uploads.len(), "{uploads:?}");
        assert!(refused >= 4, "the root reserve of body buffers was not kept: {uploads:?}");
    }
    // The audit trail kept the evidence from before the attacks.
    assert!(evidence(&e), "the pre-attack denial was rotated away");
    let (rss, hwm) = e.agent_memory_kib();
    for line in &report {
        eprintln!("[availability] {line}");
    }
    eprintln!("[availability] agent VmRSS {rss} KiB, VmHWM {hwm} KiB");
    e.check_oracle();
}

/// Out of descriptors anyway (a unit with a far lower `LimitNOFILE` than the table needs, set
/// here on the running agent with `prlimit`): `accept` fails with EMFILE while the queue is full.
/// The agent sheds with its spare descriptor and retries on a timer, so once the storm ends it
/// serves again at once, instead of waiting for a readiness edge that never comes.
#[test]
fn after_descriptor_exhaustion_the_proxy_recovers_by_itself() {
    let _run = begin!("after_descriptor_exhaustion_the_proxy_recovers_by_itself");
    let e = World::new("fdstorm").ready(&[]);
    let pid = e.agent.proc.pid().to_string();
    let limited = std::process::Command::new("prlimit").args(["--pid", &pid, "--nofile=200:200"]).status();
    assert!(limited.is_ok_and(|s| s.success()), "prlimit");
    let who = As { ids: Some((65534, 65534)), cgroup: Some(&e.cg) };
    let storm = client(&e.ns, who, &[PYTHON, "-c", ATTACK, "fd-storm", "5", "1500"]);
    let storm = json_of(&storm, "storm");
    // The storm is over and every one of its sockets closed: root is served within a second.
    let started = std::time::Instant::now();
    let after = recovers(&e, "after EMFILE");
    assert!(started.elapsed() < Duration::from_secs(2), "recovery took {:?}", started.elapsed());
    assert!(e.agent.log().contains("accept failed"), "EMFILE was not reached: {storm}\n{}", tail(&e.agent.log()));
    eprintln!("[availability] EMFILE (prlimit 200): storm {storm}; root after: {after}");
    e.check_oracle();
}

#[test]
fn a_long_pipeline_of_local_requests_is_answered_to_the_end() {
    let _run = begin!("a_long_pipeline_of_local_requests_is_answered_to_the_end");
    let e = World::new("pipeline").ready(&[]);
    let n = 1000;
    let code = format!(
        "import socket\ns=socket.create_connection(('127.0.0.1',3080),timeout=10)\n\
         s.sendall(b'GET /provision HTTP/1.1\\r\\nHost: x\\r\\nMetadata: true\\r\\n\\r\\n'*{n})\n\
         data=b''\ntry:\n    while data.count(b'HTTP/1.1 200')<{n}:\n        d=s.recv(65536)\n        if not d: break\n        data+=d\n\
         except OSError: pass\nprint(data.count(b'HTTP/1.1 200'))"
    );
    let out = client(&e.ns, As { ids: Some((65534, 65534)), cgroup: None }, &[PYTHON, "-c", &code]);
    let answered: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    assert_eq!(answered, n, "pipelined /provision answered {answered} of {n}");
}

/// The audit trail of a small configuration (2 × 64 KiB, so that without the per-uid rate and
/// the security trail a few hundred records would rotate everything away) keeps the evidence
/// through a flood of ordinary records: allowed IMDS requests from uid 65534 inside the cgroup
/// and `/provision` on direct connections, together, while root's loop runs.
#[test]
fn a_flood_of_ordinary_records_cannot_evict_the_security_trail() {
    let _run = begin!("a_flood_of_ordinary_records_cannot_evict_the_security_trail");
    unit_fd_limit();
    let limits =
        r#""limits":{"auditMaxFileBytes":65536,"auditMaxFiles":2,"auditRecordsPerSecond":25,"auditBurst":100}"#;
    let mut e = World::new("avaudit").ready(&[limits]);
    let security_dir = e.agent.log_dir.join("security");
    let security = |dir: &std::path::Path| -> Vec<Value> {
        ["audit.ndjson.1", "audit.ndjson"]
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(dir.join(f)).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>()
            })
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    };
    // The evidence: uid 65534 denied at the WireServer, root's goal state, the agent's start.
    let (status, _) = e.curl(nobody(&e.cg), &["-H", "x-ms-version: 2012-11-30", GOAL_STATE]);
    assert_eq!(status, 403);
    let (status, _) = e.curl(root(&e.cg), &["-H", "x-ms-version: 2012-11-30", GOAL_STATE]);
    assert_eq!(status, 200);
    let denial = |r: &Value| r["uid"] == 65534 && r["decision"] == "deny" && r["endpoint"] == "wireserver";
    let root_goal = |r: &Value| r["uid"] == 0 && r["endpoint"] == "wireserver" && r["status"] == 200;
    let started = |r: &Value| r["kind"] == "event" && r["event"] == "start";
    e.eventually(Duration::from_secs(3), "the evidence in the security trail", || {
        let sec = security(&security_dir);
        (sec.iter().any(denial) && sec.iter().any(root_goal) && sec.iter().any(started)).then_some(())
    });

    // Both floods at once: uid 65534 inside the cgroup and outside it.
    let (root_result, floods) = std::thread::scope(|s| {
        let direct = s.spawn(|| {
            client(
                &e.ns,
                As { ids: Some((65534, 65534)), cgroup: None },
                &[PYTHON, "-c", ATTACK, "provision-flood", "10"],
            )
        });
        let (root_result, inside) = under_attack(&e, &["imds-pipeline", "10"], true, 24, 0.25);
        (root_result, (inside, json_of(&direct.join().expect("direct flood"), "direct flood")))
    });
    assert_eq!(
        root_result["failed"],
        0,
        "root failed during the floods: {root_result} {floods:?}\n{}",
        tail(&e.agent.log())
    );
    let sent = floods.0["sent"].as_u64().unwrap_or(0);
    assert!(sent >= 1_000, "the allowed flood was too small to prove anything: {floods:?}");
    recovers(&e, "after the audit floods");

    // The flood went through the full trail (which rotated), but not into the security one.
    let sec = security(&security_dir);
    assert!(sec.iter().any(denial), "the pre-flood denial was rotated out of the security trail");
    assert!(sec.iter().any(root_goal), "root's pre-flood WireServer record was rotated away");
    assert!(sec.iter().any(started), "the start event was rotated away");
    let allowed_in_security = sec.iter().filter(|r| r["uid"] == 65534 && r["decision"] == "allow").count();
    assert_eq!(allowed_in_security, 0, "ordinary records entered the security trail");
    // What was not written is counted, per uid, in both trails.
    let all = e.agent.audit();
    let suppressed: u64 = all
        .iter()
        .chain(sec.iter())
        .filter(|r| r["kind"] == "suppressed" && r["uid"] == 65534)
        .map(|r| r["count"].as_u64().unwrap_or(0))
        .sum();
    assert!(suppressed > 0, "no suppressed summary for uid 65534");
    let written = all.iter().filter(|r| r["uid"] == 65534 && r["kind"] == "request").count();
    // Both chains still verify (the newest rotated file first, then the active one).
    for dir in [&e.agent.log_dir, &security_dir] {
        let mut files = Vec::new();
        for f in ["audit.ndjson.1", "audit.ndjson"] {
            if dir.join(f).exists() {
                files.push(dir.join(f));
            }
        }
        let out = std::process::Command::new(gpa_system_tests::harness::binary("guest-proxy-agent"))
            .args(["audit", "verify"])
            .args(&files)
            .output()
            .expect("audit verify");
        assert!(
            out.status.success(),
            "audit verify {files:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "[availability] audit flood: {sent} allowed requests + {} /provision from uid 65534; root {} ok / 0 failed, p50 {} ms, max {} ms; {written} of uid 65534's records in the active file, {suppressed} counted as suppressed; the security trail kept the evidence",
        floods.1["sent"], root_result["ok"], root_result["p50_ms"], root_result["max_ms"]
    );
    e.assert_alive();
    e.check_oracle();
}
