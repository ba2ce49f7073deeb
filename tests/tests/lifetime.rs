// SPDX-License-Identifier: MIT
//! Fail-closed lifetime (MSP §11 item 8): with pinned links and maps, the redirect outlives
//! the agent, so while it is down callers are refused instead of reaching the endpoints; a
//! restarted agent adopts the pinned state without stacking programs; `detach` removes it.

#![allow(clippy::tests_outside_test_module, reason = "integration test crate: every function here is a test")]

use std::time::Duration;

use gpa_system_tests::harness::{Agent, Bpffs, Cgroup, FakeHost, Netns, attached_programs, curl, root_in};
use gpa_system_tests::require_privileged;

const IMDS: &str = "http://169.254.169.254/metadata/instance?api-version=2021-02-01";

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
    let base = std::env::temp_dir().join(gpa_system_tests::harness::unique("life-state"));
    std::fs::create_dir_all(&base).expect("state dir");
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
    std::fs::remove_dir_all(&base).ok();
}

#[test]
fn detach_removes_the_pinned_redirect() {
    require_privileged!();
    let ns = Netns::new("detach");
    let cg = Cgroup::new("detach");
    let pins = Bpffs::new("detach-bpf");
    let host = FakeHost::start(&ns, "enforce");
    let base = std::env::temp_dir().join(gpa_system_tests::harness::unique("detach-state"));
    std::fs::create_dir_all(&base).expect("state dir");
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
    std::fs::remove_dir_all(&base).ok();
}

#[test]
fn no_request_bypasses_the_agent_while_it_is_killed_in_a_loop() {
    require_privileged!();
    let ns = Netns::new("killloop");
    let cg = Cgroup::new("killloop");
    let pins = Bpffs::new("killloop-bpf");
    let base = std::env::temp_dir().join(gpa_system_tests::harness::unique("killloop-state"));
    std::fs::create_dir_all(&base).expect("state dir");
    let host = FakeHost::start(&ns, "enforce");
    let pin_config = pins.config();
    let agent = Agent::start_in(&ns, &cg, &base, &[&pin_config]);
    agent.wait_ready(&ns);
    host.reset_requests(&ns);

    // A client loop in the protected cgroup for the whole test: every answer must be either a
    // proxied 200 (marker present) or no connection at all.
    let client = std::thread::scope(|s| {
        let handle = s.spawn(|| {
            gpa_system_tests::harness::python(
                &ns,
                root_in(&cg),
                "import http.client,time\n\
                 ok=refused=other=0\n\
                 end=time.time()+8\n\
                 while time.time()<end:\n\
                 \x20   try:\n\
                 \x20       c=http.client.HTTPConnection('169.254.169.254',80,timeout=3)\n\
                 \x20       c.request('GET','/metadata/instance',headers={'Metadata':'true'})\n\
                 \x20       r=c.getresponse(); r.read()\n\
                 \x20       if r.status==200 and r.getheader('x-ms-azure-host-authorization')=='value': ok+=1\n\
                 \x20       elif r.status in (502,503): refused+=1\n\
                 \x20       else: other+=1; print('unexpected', r.status)\n\
                 \x20   except OSError:\n\
                 \x20       refused+=1\n\
                 \x20       time.sleep(0.01)\n\
                 print('ok',ok,'refused',refused,'other',other)\n",
            )
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
    let counts: Vec<&str> = client.split_whitespace().collect();
    let unsigned: Vec<_> = data_requests(&host, &ns)
        .into_iter()
        .filter(|r| r["signature"] != "valid")
        .map(|r| format!("{} {} {}", r["signature"], r["status"], r["headers"]))
        .collect();
    assert!(
        client.contains("other 0"),
        "a caller saw an answer that did not come through the agent: {client} {unsigned:?}"
    );
    assert!(counts.get(1).and_then(|n| n.parse::<u32>().ok()).unwrap_or(0) > 0, "no request succeeded: {client}");
    for r in data_requests(&host, &ns) {
        assert_eq!(r["signature"], "valid", "an unsigned request reached the host: {r}");
    }
    assert_eq!(attached_programs(&cg).len(), 3, "restarts must not stack programs");
    std::fs::remove_dir_all(&base).ok();
}

#[test]
fn a_keep_alive_connection_opened_before_the_agent_is_never_served_unsigned() {
    require_privileged!();
    let ns = Netns::new("prestart");
    let cg = Cgroup::new("prestart");
    let host = FakeHost::start(&ns, "enforce");
    let base = std::env::temp_dir().join(gpa_system_tests::harness::unique("prestart-state"));
    std::fs::create_dir_all(&base).expect("state dir");
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
    std::fs::remove_dir_all(&base).ok();
}
