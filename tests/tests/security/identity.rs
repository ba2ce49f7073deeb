// SPDX-License-Identifier: MIT
//! Catalog C (authZ / identity spoofing): the identity is the connect-time caller (C1, C2, C5,
//! W2, W5, comm spoofing) and a binary bind-mounted over an allowed exe does not inherit it (C3).

use super::*;

// ---- C1, C2, C5, W2, W5, comm spoofing ---------------------------------------------------------

#[test]
fn identity_is_the_connect_time_caller() {
    let run = begin!("identity_is_the_connect_time_caller");
    let python = resolved_python();
    let w = World::new("ident");
    let item = imds_item(
        "ident-1",
        "allow",
        &[
            ("compute", "/metadata/instance/compute", &[("py", json!({"exePath": python}))]),
            ("token", "/metadata/identity/oauth2/token", &[("curl-by-name", json!({"processName": "curl"}))]),
        ],
    );
    w.control(&json!({"rules": rules_with_imds(item)}));
    let e = w.ready(&[]);

    // C1: a non-root caller is refused by the WireServer authorizer, and audited.
    let (pid, status, text) = run_with_pid(
        &e.ns,
        nobody(&e.cg),
        &["curl", "-s", "-i", "-m", "10", "-H", "x-ms-version: 2012-11-30", GOAL_STATE],
    );
    assert_eq!(status, 403, "{text}");
    let rec = e.eventually(Duration::from_secs(3), "an audit record for the refused caller", || e.audit_for(pid).pop());
    assert_eq!(
        (rec["uid"].as_u64(), rec["status"].as_u64(), rec["decision"].as_str(), rec["endpoint"].as_str()),
        (Some(65534), Some(403), Some("deny"), Some("wireserver")),
        "{rec}"
    );
    // W5: the skip list's relaxed path is for root only.
    let tag = e.tag("c1-vmagentlog");
    let (status, text) = e.curl(
        nobody(&e.cg),
        &["-X", "PUT", "--data-binary", "log", "-H", &tagged(&tag), "http://168.63.129.16/vmAgentLog"],
    );
    assert_eq!(status, 403, "{text}");
    assert!(!e.host_saw(&tag));
    run.pass("C1", format!("uid 65534 → WireServer 403, audit {{uid:65534, decision:deny, status:403}} for pid {pid}"));
    run.pass(
        "W5",
        "non-root PUT /vmAgentLog (skip-listed) → 403, not forwarded; forged headers on skip-listed requests: msp.rs",
    );

    // C2: identity is fixed at connect time, whatever the process does to its ids afterwards.
    let drop_after = format!(
        "import os,socket\ns=socket.create_connection(('{WS_IP}',80))\nos.setresgid(65534,65534,65534)\nos.setresuid(65534,65534,65534)\n\
         s.sendall(b'GET /machine?comp=goalstate HTTP/1.1\\r\\nHost: x\\r\\nx-ms-version: 2012-11-30\\r\\nConnection: close\\r\\n\\r\\n')\n\
         print(os.getpid(), s.recv(100).split(b'\\r\\n')[0].decode())"
    );
    let gain_after = format!(
        "import os,socket\nos.setresuid(65534,65534,0)\ns=socket.create_connection(('{WS_IP}',80))\nos.setresuid(0,0,0)\n\
         s.sendall(b'GET /machine?comp=goalstate HTTP/1.1\\r\\nHost: x\\r\\nx-ms-version: 2012-11-30\\r\\nConnection: close\\r\\n\\r\\n')\n\
         print(os.getpid(), s.recv(100).split(b'\\r\\n')[0].decode())"
    );
    let mut seen = Vec::new();
    for (code, expect_status, expect_uid) in [(&drop_after, "200", 0), (&gain_after, "403", 65534)] {
        let out = e.python(root(&e.cg), code, &[]);
        let pid: u64 = out.split_whitespace().next().and_then(|p| p.parse().ok()).expect("pid");
        assert!(out.contains(&format!(" {expect_status} ")), "{out}");
        let rec = e.eventually(Duration::from_secs(3), "audit record", || e.audit_for(pid).pop());
        assert_eq!(rec["uid"].as_u64(), Some(expect_uid), "{rec}");
        seen.push(format!("{expect_status} uid {expect_uid}"));
    }
    run.pass(
        "C2",
        format!(
            "connect as root then setresuid(65534) → {}; connect as 65534 then setresuid(0) → {}",
            seen[0], seen[1]
        ),
    );

    // C5: a new cgroup namespace does not leave the cgroup.
    let tag = e.tag("c5");
    let out = client(
        &e.ns,
        root(&e.cg),
        &["unshare", "-C", "curl", "-s", "-i", "-H", "Metadata: true", "-H", &tagged(&tag), IMDS],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200") && text.contains(MARKER), "unshare -C: {text}");
    assert_eq!(e.record(&tag)["signature"], "valid");
    run.pass("C5", "unshare -C curl inside the cgroup: 200 through the proxy, signed");

    // W2 / exec-after-connect: bash connects, then execs the allowlisted python on the socket.
    let direct = e.python(root(&e.cg), ONE_REQUEST, &[IMDS_IP, "/metadata/instance/compute"]);
    assert!(direct.contains(" 200 "), "python is allowlisted for /compute: {direct}");
    let script = format!(
        "exec 3<>/dev/tcp/{IMDS_IP}/80; exec {PYTHON} -c \"import os;os.write(3,b'GET /metadata/instance/compute HTTP/1.1\\r\\nHost: x\\r\\nMetadata: true\\r\\nConnection: close\\r\\n\\r\\n');print(os.read(3,100).split(b'\\r\\n')[0].decode())\""
    );
    let (pid, _, out) = run_with_pid(&e.ns, root(&e.cg), &["bash", "-c", &script]);
    assert!(out.contains(" 403 "), "exec after connect must not inherit python's identity: {out}");
    let rec = e.eventually(Duration::from_secs(3), "audit record", || e.audit_for(pid).pop());
    assert_ne!(rec["exe"].as_str(), Some(python.as_str()), "{rec}");
    run.pass("W2", format!("bash connects, execs python on the socket: 403, recorded exe {}", rec["exe"]));

    // Comm spoofing: PR_SET_NAME("curl") does not make python match processName "curl".
    let spoof = format!(
        "import ctypes,os,socket\nctypes.CDLL(None).prctl(15, b'curl', 0, 0, 0)\ns=socket.create_connection(('{IMDS_IP}',80))\n\
         s.sendall(b'GET {TOKEN} HTTP/1.1\\r\\nHost: x\\r\\nMetadata: true\\r\\nConnection: close\\r\\n\\r\\n')\nprint(os.getpid(), s.recv(100).split(b'\\r\\n')[0].decode())"
    );
    let out = e.python(root(&e.cg), &spoof, &[]);
    assert!(out.contains(" 403 "), "comm 'curl' is not processName curl: {out}");
    assert_eq!(root_status(&e, TOKEN_URL), 200, "the real curl matches processName curl");
    run.pass("X-comm", "python with PR_SET_NAME(\"curl\") → token 403; real curl → 200");
    e.check_oracle();
}

#[test]
fn a_binary_bind_mounted_over_an_allowed_exe_does_not_inherit_its_identity() {
    let run = begin!("a_binary_bind_mounted_over_an_allowed_exe_does_not_inherit_its_identity");
    let w = World::new("bind");
    let item = imds_item(
        "bind-1",
        "deny",
        &[("token", "/metadata/identity/oauth2/token", &[("curl-exe", json!({"exePath": "/usr/bin/curl"}))])],
    );
    w.control(&json!({"rules": rules_with_imds(item)}));
    let e = w.ready(&[]);
    let python = resolved_python();
    // The bind-mounted "curl" is python running attacker code.
    let code = format!(
        "import socket;s=socket.create_connection(('{IMDS_IP}',80));s.sendall(b'GET {TOKEN} HTTP/1.1\\r\\nHost: x\\r\\nMetadata: true\\r\\nConnection: close\\r\\n\\r\\n');print(s.recv(100).split(b'\\r\\n')[0].decode())"
    );
    let script = format!("mount --bind {python} /usr/bin/curl && exec /usr/bin/curl -c \"{code}\"");
    // `unshare -m` makes the new mount namespace private, so the bind mount never reaches the
    // machine's /usr/bin/curl.
    let mut answers = Vec::new();
    for (who, unshare) in [(root(&e.cg), "-m"), (nobody(&e.cg), "-Urm")] {
        let out = client(&e.ns, who, &["unshare", unshare, "sh", "-c", &script]);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        answers.push(format!("unshare {unshare}: {text} {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let exes: Vec<String> = e
        .agent
        .audit()
        .iter()
        .filter(|r| r["path"] == "/metadata/identity/oauth2/token")
        .map(|r| format!("uid {} exe {}", r["uid"], r["exe"]))
        .collect();
    assert!(
        answers.iter().all(|a| a.contains(" 403 ")),
        "python bind-mounted over /usr/bin/curl: {answers:?}; audit: {exes:?}"
    );
    run.pass("C3", "python bind-mounted over /usr/bin/curl (root, and uid 65534 in a user namespace): token 403");
    e.check_oracle();
}
