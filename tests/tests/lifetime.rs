// SPDX-License-Identifier: MIT
//! Fail-closed lifetime (MSP §11 item 8): with pinned links and maps, the redirect outlives
//! the agent, so while it is down callers are refused instead of reaching the endpoints; a
//! restarted agent adopts the pinned state without stacking programs; `detach` removes it.

#![allow(clippy::tests_outside_test_module, reason = "integration test crate: every function here is a test")]

use std::time::Duration;

use gpa_system_tests::callers::CallerLoop;
use gpa_system_tests::harness::{Agent, Bpffs, Cgroup, FakeHost, Netns, TempDir, attached_programs, curl, root_in};
use gpa_system_tests::require_privileged;

const IMDS: &str = "http://169.254.169.254/metadata/instance?api-version=2021-02-01";

/// A fresh directory for an agent's config, state and logs (the harness's [`TempDir`]).
fn scratch(tag: &str) -> TempDir {
    TempDir::new(tag)
}

fn data_requests(host: &FakeHost, ns: &Netns) -> Vec<serde_json::Value> {
    host.requests(ns)
        .into_iter()
        .filter(|r| !r["target"].as_str().unwrap_or("").starts_with("/secure-channel"))
        .collect()
}

#[test]
fn a_killed_agent_fails_closed_and_a_restarted_one_adopts_without_stacking() {
    require_privileged!();
    let ns = Netns::new("life");
    let cg = Cgroup::new("life");
    let pins = Bpffs::new("life-bpf");
    let base = scratch("life-state");
    let host = FakeHost::start(&ns, "enforce");
    let pin_config = pins.config();
    let mut agent = Agent::start_in(&ns, &cg, &base, &[&pin_config]);
    agent.wait_ready(&ns);
    let mut before = attached_programs(&cg);
    before.sort();
    assert_eq!(before.len(), 3, "connect4, connect6 and sock_ops attached: {before:?}");

    agent.proc.signal(libc::SIGKILL);
    assert!(agent.proc.wait_timeout(Duration::from_secs(5)).is_some(), "agent did not die");
    host.reset_requests(&ns);
    // While no agent runs, the pinned programs still redirect: the connect is refused.
    let (status, text) = curl(&ns, root_in(&cg), &["-H", "Metadata: true", IMDS]);
    assert_eq!(status, 0, "expected a refused connection, got: {text}");
    assert!(data_requests(&host, &ns).is_empty(), "a request reached the host while the agent was down");
    assert_eq!(attached_programs(&cg).len(), 3, "programs must stay attached after SIGKILL");

    let agent = Agent::start_in(&ns, &cg, &base, &[&pin_config]);
    agent.wait_ready(&ns);
    let mut after = attached_programs(&cg);
    after.sort();
    assert_eq!(after, before, "a restarted agent must swap programs in place, never stack");
    let (status, text) = curl(&ns, root_in(&cg), &["-H", "Metadata: true", IMDS]);
    assert_eq!(status, 200, "{text}\n{}", agent.log());
    assert_eq!(data_requests(&host, &ns).last().expect("request")["signature"], "valid");
    drop(agent);
}

#[test]
fn detach_removes_the_pinned_redirect() {
    require_privileged!();
    let ns = Netns::new("detach");
    let cg = Cgroup::new("detach");
    let pins = Bpffs::new("detach-bpf");
    let host = FakeHost::start(&ns, "enforce");
    let base = scratch("detach-state");
    let agent = Agent::start_in(&ns, &cg, &base, &[&pins.config()]);
    agent.wait_ready(&ns);
    let config = agent.config.clone();
    drop(agent);
    assert_eq!(attached_programs(&cg).len(), 3, "pinned programs stay after a clean stop");
    let out = ns
        .command(gpa_system_tests::harness::binary("guest-proxy-agent").to_str().expect("utf-8"))
        .arg("--config")
        .arg(&config)
        .arg("detach")
        .output()
        .expect("detach");
    assert!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
    assert!(attached_programs(&cg).is_empty(), "detach must leave nothing attached");
    // Now the caller reaches the host directly, unsigned, and the host refuses it.
    let (status, _) = curl(&ns, root_in(&cg), &["-H", "Metadata: true", IMDS]);
    assert_eq!(status, 401);
    assert_eq!(data_requests(&host, &ns).last().expect("request")["signature"], "missing");
}

#[test]
fn no_request_bypasses_the_agent_while_it_is_killed_in_a_loop() {
    require_privileged!();
    let ns = Netns::new("killloop");
    let cg = Cgroup::new("killloop");
    let pins = Bpffs::new("killloop-bpf");
    let base = scratch("killloop-state");
    let host = FakeHost::start(&ns, "enforce");
    let pin_config = pins.config();
    let agent = Agent::start_in(&ns, &cg, &base, &[&pin_config]);
    agent.wait_ready(&ns);
    host.reset_requests(&ns);

    // A client loop in the protected cgroup for the whole test: every answer must be either a
    // proxied 200 (marker present) or no connection at all.
    let client = std::thread::scope(|s| {
        let handle = s.spawn(|| {
            // Fresh connections for 8 s; while no agent listens a connect is refused (or the
            // agent's own 429/502/503): a gap, but never an answer that bypassed it.
            CallerLoop::imds(8.0).timeout(3.0).error_gap(0.01).refused(&[429, 502, 503]).marker().run(&ns, root_in(&cg))
        });
        let mut current = Some(agent);
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(700));
            if let Some(mut a) = current.take() {
                a.proc.signal(libc::SIGKILL);
                let _exited = a.proc.wait_timeout(Duration::from_secs(5));
            }
            std::thread::sleep(Duration::from_millis(300));
            current = Some(Agent::start_in(&ns, &cg, &base, &[&pin_config]));
        }
        let out = handle.join().expect("client thread");
        drop(current);
        out
    });
    let unsigned: Vec<_> = data_requests(&host, &ns)
        .into_iter()
        .filter(|r| r["signature"] != "valid")
        .map(|r| format!("{} {} {}", r["signature"], r["status"], r["headers"]))
        .collect();
    assert!(client.other == 0, "a caller saw an answer that did not come through the agent: {client} {unsigned:?}");
    assert!(client.ok > 0, "no request succeeded: {client}");
    for r in data_requests(&host, &ns) {
        assert_eq!(r["signature"], "valid", "an unsigned request reached the host: {r}");
    }
    assert_eq!(attached_programs(&cg).len(), 3, "restarts must not stack programs");
}

#[test]
fn a_keep_alive_connection_opened_before_the_agent_is_never_served_unsigned() {
    require_privileged!();
    let ns = Netns::new("prestart");
    let cg = Cgroup::new("prestart");
    let host = FakeHost::start(&ns, "enforce");
    let base = scratch("prestart-state");
    let config = base.join("config.json");
    // A client in the protected cgroup opens a keep-alive connection while no agent runs,
    // waits until the agent is up (it polls the same config's --status), then reuses it and
    // also opens a fresh one.
    let agent_bin = gpa_system_tests::harness::binary("guest-proxy-agent");
    let script = format!(
        "import http.client,subprocess,time\n\
         old=http.client.HTTPConnection('169.254.169.254',80,timeout=5)\n\
         old.request('GET','/metadata/instance',headers={{'Metadata':'true'}})\n\
         r=old.getresponse(); r.read(); print('before', r.status)\n\
         while subprocess.run(['{}','--config','{}','--status']).returncode!=0: time.sleep(0.2)\n\
         old.request('GET','/metadata/instance',headers={{'Metadata':'true'}})\n\
         r=old.getresponse(); r.read(); print('reused', r.status, r.getheader('x-ms-azure-host-authorization'))\n\
         new=http.client.HTTPConnection('169.254.169.254',80,timeout=5)\n\
         new.request('GET','/metadata/instance',headers={{'Metadata':'true'}})\n\
         r=new.getresponse(); r.read(); print('fresh', r.status, r.getheader('x-ms-azure-host-authorization'))\n",
        agent_bin.display(),
        config.display()
    );
    let (out, agent) = std::thread::scope(|s| {
        let client = s.spawn(|| gpa_system_tests::harness::python(&ns, root_in(&cg), &script));
        std::thread::sleep(Duration::from_millis(800));
        let agent = Agent::start_in(&ns, &cg, &base, &["\"pollIntervalSeconds\":1"]);
        (client.join().expect("client"), agent)
    });
    assert!(out.contains("before 401"), "{out}");
    // The old connection still goes straight to the host, which refuses it unsigned.
    assert!(out.contains("reused 401 None"), "{out}\n{}", agent.log());
    assert!(out.contains("fresh 200 value"), "{out}\n{}", agent.log());
    for r in data_requests(&host, &ns) {
        let status = r["status"].as_u64().unwrap_or(0);
        assert!(r["signature"] == "valid" || status == 401, "an unsigned request was served: {r}");
    }
    drop(agent);
}

/// Copies the latched key files the way the unit's `handover` step does (never overwriting).
fn copy_keys(from: &std::path::Path, to: &std::path::Path) {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(to).expect("keys dir");
    for entry in std::fs::read_dir(from).expect("early keys").flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy key");
    }
}

#[test]
fn the_early_agent_hands_its_listener_over_without_a_refused_connect() {
    require_privileged!();
    let ns = Netns::new("handover");
    let cg = Cgroup::new("handover");
    let pins = Bpffs::new("handover-bpf");
    let early_base = scratch("handover-early");
    let late_base = scratch("handover-late");
    let host = FakeHost::start(&ns, "enforce");
    let socket = format!("\"handoverSocket\":\"{}\"", early_base.join("handover.sock").display());
    let extra = [pins.config(), socket, "\"pollIntervalSeconds\":1".to_owned()];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut early = Agent::start_with_args(&ns, &cg, &early_base, &extra, &["--early"]);
    early.wait_ready(&ns);
    assert!(early.log().contains("offering the listener for hand-over"), "{}", early.log());
    host.reset_requests(&ns);

    // A caller making a fresh connection every few milliseconds across the whole hand-over,
    // each held open a moment before its request (so one is likely accepted but still
    // silent when the early agent is told to stop): every one must be answered through an
    // agent, signed. A refused connect, a reset, a 503 or any other answer is a gap.
    // Beside it, a caller that keeps one connection alive and reuses it: the response the
    // early agent gives after the hand-over says `connection: close`, so the caller moves to
    // a new connection (the successor's) without ever meeting a closed socket.
    let (client, keepalive, late) = std::thread::scope(|s| {
        let reuse = s.spawn(|| CallerLoop::imds(7.0).keep_alive().gap(0.02).marker().run(&ns, root_in(&cg)));
        let handle = s.spawn(|| CallerLoop::imds(7.0).connect_pause(0.03).gap(0.005).marker().run(&ns, root_in(&cg)));
        std::thread::sleep(Duration::from_millis(1500));
        copy_keys(&early_base.join("state/keys"), &late_base.join("state/keys"));
        let late = Agent::start_with_args(&ns, &cg, &late_base, &extra, &[]);
        (handle.join().expect("client thread"), reuse.join().expect("keep-alive thread"), late)
    });
    println!("hand-over client loop: {client}");
    println!("hand-over keep-alive caller: {keepalive}");
    let exit = early.proc.wait_timeout(Duration::from_secs(15));
    let logs = format!("--- early\n{}\n--- late\n{}", early.log(), late.log());
    assert!(
        exit.is_some_and(|s| s.success()),
        "the early agent must exit cleanly after the hand-over: {exit:?}\n{logs}"
    );
    assert!(client.refused == 0 && client.other == 0, "a caller met a gap during the hand-over: {client}\n{logs}");
    assert!(client.ok > 40, "too few requests to mean anything: {client}");
    // The kept-alive caller's errors are its refused and other answers together.
    assert!(
        keepalive.refused + keepalive.other == 0 && keepalive.closes == 1,
        "a kept-alive caller met a gap: {keepalive}\n{logs}"
    );
    assert!(early.log().contains("hand-over to pid"), "{logs}");
    assert!(late.log().contains("took over from the early agent"), "{logs}");
    // Both agents answered part of the loop, and the host saw nothing unsigned.
    let served = |a: &Agent| a.audit().iter().filter(|r| r["endpoint"] == "imds").count();
    assert!(served(&early) > 0 && served(&late) > 0, "early {} late {}\n{logs}", served(&early), served(&late));
    for r in data_requests(&host, &ns) {
        assert_eq!(r["signature"], "valid", "an unsigned request reached the host: {r}");
    }
    assert_eq!(attached_programs(&cg).len(), 3, "the taker adopts the pins, never stacks");
    assert!(!early_base.join("handover.sock").exists(), "the offer's socket file is removed");
    // The listener really is the same socket: the late agent serves on after the early one left.
    let (status, text) = curl(&ns, root_in(&cg), &["-H", "Metadata: true", IMDS]);
    assert_eq!(status, 200, "{text}\n{logs}");
    drop(late);
    drop(early);
}

#[test]
fn systemd_hears_ready_only_once_the_redirect_is_armed() {
    require_privileged!();
    let ns = Netns::new("notify");
    let cg = Cgroup::new("notify");
    let _host = FakeHost::start(&ns, "enforce");
    let base = scratch("notify-state");
    // The socket systemd would pass as $NOTIFY_SOCKET (Type=notify).
    let socket_path = base.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("notify socket");
    socket.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let notify = socket_path.to_str().expect("utf-8").to_owned();
    let agent = Agent::start_full(&ns, &cg, &base, &[], &[], &[("NOTIFY_SOCKET", &notify)]);
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("no sd_notify datagram from the agent");
    assert_eq!(&buf[..n], b"READY=1");
    // Sent after start-up returned: the programs are on the cgroup.
    assert_eq!(attached_programs(&cg).len(), 3, "READY=1 before the programs were attached");
    assert!(agent.log().contains("eBPF redirector attached"), "{}", agent.log());
    drop(agent);
}

#[test]
fn before_the_key_latch_early_boot_holds_requests_instead_of_answering_503() {
    require_privileged!();
    let ns = Netns::new("hold");
    let cg = Cgroup::new("hold");
    let host = FakeHost::start(&ns, "enforce");
    // The host answers the first status polls late (the network still coming up), within the
    // agent's host timeout: the early agent intercepts everything before it knows the modes.
    host.control(&ns, &serde_json::json!({"statusDelayMs": 600}));
    let base = scratch("hold-early");
    let early = Agent::start_with_args(&ns, &cg, &base, &["\"pollIntervalSeconds\":1"], &["--early"]);
    // Right away, as cloud-init does at boot: held until the latch, then signed. curl and
    // python's http.client (the shape of cloud-init's own IMDS call, with its timeout).
    let (status, text) = curl(&ns, root_in(&cg), &["-H", "Metadata: true", IMDS]);
    assert_eq!(status, 200, "{text}\n{}", early.log());
    assert!(text.contains("x-ms-azure-host-authorization: value"), "{text}");
    assert!(early.log().contains("request held for the key latch"), "it was held: {}", early.log());
    let out = gpa_system_tests::harness::python(
        &ns,
        root_in(&cg),
        "import http.client\n\
         c=http.client.HTTPConnection('169.254.169.254',80,timeout=30)\n\
         c.request('GET','/metadata/instance/compute?api-version=2021-08-01',headers={'Metadata':'true'})\n\
         r=c.getresponse(); r.read(); print(r.status)\n",
    );
    assert_eq!(out.trim(), "200", "{}", early.log());
    drop(early);

    // A host that does not answer within the agent's timeout at all: the hold is bounded and
    // ends in a status provisioning agents retry (429, with when), never a 503.
    host.control(&ns, &serde_json::json!({"statusDelayMs": 3000}));
    let base = scratch("hold-bounded");
    let early = Agent::start_with_args(&ns, &cg, &base, &["\"pollIntervalSeconds\":1"], &["--early"]);
    let (status, text) = curl(&ns, root_in(&cg), &["-H", "Metadata: true", IMDS]);
    assert_eq!(status, 429, "{text}\n{}", early.log());
    assert!(text.to_ascii_lowercase().contains("retry-after: 1\r\n"), "{text}");
    drop(early);
    for r in data_requests(&host, &ns) {
        assert_eq!(r["signature"], "valid", "an unsigned request reached the host: {r}");
    }
}
