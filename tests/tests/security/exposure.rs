// SPDX-License-Identifier: MIT
//! Catalog A (listener / network exposure), B1 and C6: the listener is loopback-only, every
//! redirected connect reaches it, and a bypass around it is refused by the host.

use super::*;

// ---- A, B1, C6: exposure and interception ------------------------------------------------------

#[test]
fn network_exposure_is_loopback_only_and_interception_is_complete() {
    let run = begin!("network_exposure_is_loopback_only_and_interception_is_complete");
    let e = Env::new("expose");
    run.pass("A0/C0", "key latched and /provision finished before the first probe of every world");

    let state = aggregated(&e)["proxyAgentStatus"]["keyLatchStatus"]["states"]["secureChannelState"].clone();
    assert_eq!(state, "WireServer Enforce -  IMDS Enforce - HostGA Enforce");
    run.pass("CFG/PRE", format!("secureChannelState={state}"));

    let mut programs = attached_programs(&e.cg);
    programs.sort();
    assert_eq!(programs.len(), 3, "connect4, connect6, sock_ops once each: {programs:?}");
    run.pass("P5-bpftool", format!("bpftool cgroup show: {}", programs.join(",")));

    // A1: inside the namespace, :3080 listens on 127.0.0.1 and nowhere else (no v6 either).
    let found = listeners(&e.ns);
    let on_3080: Vec<&(String, u16)> = found.iter().filter(|(_, p)| *p == 3080).collect();
    assert_eq!(on_3080, vec![&("127.0.0.1".to_owned(), 3080)], "listeners: {found:?}");
    run.pass("A1", "/proc/net/tcp{,6}: one :3080 listener, 127.0.0.1");

    // A1b: a loopback connect works: /provision answers, a data request without a kernel
    // record is refused with 421.
    let (status, _) =
        http(&e.ns, "127.0.0.1:3080".parse().expect("addr"), "GET", "/provision", &[("Metadata", "true")], b"");
    assert_eq!(status, 200);
    let direct = e.raw1(OUTSIDE, Raw::get("/metadata/instance", &[]).to("127.0.0.1", 3080));
    assert_eq!(direct.status(), 421, "{}", direct.brief());
    run.pass("A1b", "/provision 200; data request on a direct connect 421");

    // B1 / B1a: through the proxy: signed, 200. Around it (outside the cgroup, or inside with
    // the agent's own SO_MARK): unsigned, and the host refuses it.
    assert!(e.legit(), "legitimate caller\n{}", tail(&e.agent.log()));
    let tag = e.tag("b1a-outside");
    let outside = e.raw1(OUTSIDE, Raw::get("/metadata/instance", &[(BYPASS, &tag)]));
    assert_eq!(outside.status(), 401, "{}", outside.brief());
    assert_eq!(e.record(&tag)["signature"], "missing");
    let tag_mark = e.tag("b1a-mark");
    let marked = e.python(
        root(&e.cg),
        &format!(
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, 36, {AGENT_MARK})\ns.connect(('{IMDS_IP}',80))\n\
             s.sendall(b'GET /metadata/instance HTTP/1.1\\r\\nHost: x\\r\\nMetadata: true\\r\\n{BYPASS}: {tag_mark}\\r\\nConnection: close\\r\\n\\r\\n')\n\
             print(s.recv(100).split(b'\\r\\n')[0].decode())"
        ),
        &[],
    );
    assert!(marked.contains(" 401 "), "agent mark from inside the cgroup: {marked}");
    assert_eq!(e.record(&tag_mark)["signature"], "missing");
    run.pass(
        "B1/B1a",
        "cgroup caller 200 signed; outside the cgroup 401 unsigned; SO_MARK=agent mark from inside 401 unsigned",
    );

    // B1b: the kernel shows the redirected peer.
    let peer = e.raw1(root(&e.cg), Raw::get("/metadata/instance", &[])).peer;
    assert_eq!(peer, "127.0.0.1:3080");
    run.pass("B1b", "getpeername() of a connect to 169.254.169.254:80 = 127.0.0.1:3080");

    // UDP carries no HTTP to the endpoints: not intercepted, nothing to sign.
    let udp = e.python(root(&e.cg), &format!("import socket\nu=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nu.connect(('{IMDS_IP}',80))\nprint('%s:%d' % u.getpeername())"), &[]);
    assert_eq!(udp.trim(), "169.254.169.254:80");
    run.pass("X-udp", "UDP connect from the cgroup is left alone (MSP is TCP only)");

    // A1c / A2 and C6: a peer namespace over a veth pair, routing the metadata addresses
    // directly to this namespace.
    let peer_ns = Peer::new(&e.ns);
    let tag = e.tag("c6-outside");
    let (status, text) = curl(&peer_ns.ns, OUTSIDE, &["-H", "Metadata: true", "-H", &bypass(&tag), IMDS]);
    assert_eq!(status, 401, "the peer reaches the host directly and unsigned: {text}");
    let rec = e.record(&tag);
    assert_eq!(rec["signature"], "missing");
    assert!(rec["peer"].as_str().unwrap_or("").starts_with(&peer_ns.peer_ip), "{rec}");
    let tag = e.tag("c6-cgroup");
    let (status, text) = curl(&peer_ns.ns, root(&e.cg), &["-H", "Metadata: true", "-H", &bypass(&tag), IMDS]);
    assert_eq!(status, 0, "in the cgroup but another netns: redirected to that netns's own loopback, refused: {text}");
    assert!(!e.host_saw(&tag));
    run.pass("C6", "peer netns routing 169.254/16 directly: outside the cgroup host 401 unsigned; inside the cgroup connect refused (its own :3080)");

    let own = e.raw1(OUTSIDE, Raw::get("/provision", &[]).to(&peer_ns.world_ip, 3080).timeout(3.0));
    assert!(own.error.as_deref().is_some_and(|m| m.contains("ConnectionRefused")), "{}", own.brief());
    let remote =
        raw_in(&peer_ns.ns, OUTSIDE, &e.dir.0, &[Raw::get("/provision", &[]).to(&peer_ns.world_ip, 3080).timeout(3.0)]);
    assert!(remote[0].error.as_deref().is_some_and(|m| m.contains("ConnectionRefused")), "{}", remote[0].brief());
    run.pass("A1c/A2", ":3080 on the namespace's external address refused, from itself and from the peer namespace");

    // W8/W9: no trace_printk on the hot path; cgroup hooks only (no kprobe). CO-RE reads of
    // the connecting task are deliberate (issue 12) and live only in the GPA_TASK_BTF build.
    let source =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/redirect.bpf.c")).expect("ebpf source");
    for banned in ["bpf_printk(", "bpf_trace_printk(", "SEC(\"kprobe", "SEC(\"kretprobe"] {
        assert!(!source.contains(banned), "ebpf/redirect.bpf.c uses {banned}");
    }
    let core_reads = source.matches("BPF_CORE_READ(").count();
    let in_task_build: usize = source
        .split("#ifdef GPA_TASK_BTF")
        .skip(1)
        .map(|block| block.split("#endif").next().unwrap_or("").matches("BPF_CORE_READ(").count())
        .sum();
    assert!(core_reads > 0 && in_task_build == core_reads, "CO-RE reads outside the GPA_TASK_BTF build");
    run.pass("W8", format!("redirect.bpf.c has no bpf_printk/trace_printk and no kprobe; its {core_reads} CO-RE reads are in the task-reading build only"));
    e.check_oracle();
}
