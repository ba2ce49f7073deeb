// SPDX-License-Identifier: MIT
//! Catalog F2 (the audit trail): records cannot be forged through argv, comm or exe names; the
//! hash chain stays intact.

use super::*;

// ---- F2 ----------------------------------------------------------------------------------------

#[test]
fn audit_records_cannot_be_forged_through_argv_comm_or_exe_names() {
    let run = begin!("audit_records_cannot_be_forged_through_argv_comm_or_exe_names");
    let e = Env::new("audit");
    let inject = "\n{\"seq\":999999,\"kind\":\"forged\"}\n";
    // An executable whose path carries the injection (a copy of python).
    let dir = e.dir.0.join("bin");
    fs::create_dir_all(&dir).expect("bin");
    let exe = dir.join(format!("py{}", inject.replace('/', "_")));
    fs::copy(resolved_python(), &exe).expect("copy python");
    let code = "import ctypes,os,socket,sys\n\
        ctypes.CDLL(None).prctl(15, b'\\n{\"kind\":\"f\"}', 0, 0, 0)\n\
        s=socket.create_connection(('169.254.169.254',80))\n\
        s.sendall(b'GET /metadata/instance/compute HTTP/1.1\\r\\nHost: x\\r\\nMetadata: true\\r\\nConnection: close\\r\\n\\r\\n')\n\
        print(os.getpid(), s.recv(100).split(b'\\r\\n')[0].decode())";
    let out = client(&e.ns, root(&e.cg), &[exe.to_str().expect("utf-8"), "-c", code, inject]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" 200 "), "{text} {}", String::from_utf8_lossy(&out.stderr));
    let pid: u64 = text.split_whitespace().next().and_then(|p| p.parse().ok()).expect("pid");
    // A quote-and-brace path too (refused or forwarded, never a second record).
    e.raw1(root(&e.cg), Raw::bytes(b"GET /metadata/instance/\"},{\"kind\":\"forged\" HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n\r\n".to_vec()));
    std::thread::sleep(Duration::from_millis(300));

    let raw = fs::read_to_string(e.agent.log_dir.join("audit.ndjson")).expect("audit");
    let mut previous: Option<&str> = None;
    let mut count = 0;
    for line in raw.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("audit line is not one JSON object ({err}): {line:?}"));
        assert!(v.is_object(), "{line}");
        let kind = v["kind"].as_str().unwrap_or("");
        assert!(
            ["request", "checkpoint", "dropped", "chain-restart", "event", "suppressed"].contains(&kind),
            "forged kind {kind:?}: {line}"
        );
        assert_ne!(v["seq"], 999_999, "{line}");
        if let Some(prev) = previous {
            use sha2::Digest as _;
            let hash: String = sha2::Sha256::digest(prev.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(v["prev"].as_str(), Some(hash.as_str()), "chain broken at {line}");
        }
        previous = Some(line);
        count += 1;
    }
    let rec = e.audit_for(pid).pop().expect("a record for the injecting caller");
    assert!(
        rec["exe"].as_str().is_some_and(|x| x.contains("\"kind\":\"forged\"")),
        "the exe path is kept, escaped: {rec}"
    );
    assert!(rec["cmdline"].as_str().is_some_and(|c| c.contains("forged") && !c.contains('\n')), "{rec}");
    assert!(!raw.lines().any(|l| l.starts_with("{\"seq\":999999")), "an injected line");
    // The agent's own verifier agrees, checkpoints included (MACs from the latched key).
    let guid = e.stats()["currentKeyGuid"].as_str().expect("guid").to_owned();
    let verify = Command::new(gpa_system_tests::harness::binary("guest-proxy-agent"))
        .args(["audit", "verify", "--key-file"])
        .arg(e.agent.state_dir.join(format!("keys/{guid}.key")))
        .arg(e.agent.log_dir.join("audit.ndjson"))
        .output()
        .expect("audit verify");
    assert!(
        verify.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    run.pass("F2", format!("exe path, argv and PR_SET_NAME carrying \\n{{\"seq\":999999,\"kind\":\"forged\"}}: {count} lines, each one JSON object, hash chain intact (and `audit verify --key-file` exit 0), injection only inside escaped strings"));
    e.check_oracle();
}
