// SPDX-License-Identifier: MIT
//! The core data path, end to end with real parts: the embedded eBPF programs attached to a
//! child cgroup made by the test, a network namespace holding the metadata addresses, the
//! fake host, the agent, and real clients (curl, python's http.client).

#![allow(clippy::tests_outside_test_module, reason = "integration test crate: every function here is a test")]
#![allow(clippy::disallowed_methods, reason = "tests measure real time")]

use gpa_system_tests::harness::{
    Agent, As, Cgroup, Env, FakeHost, NO_EXTRA, Netns, World, client, curl, python, root_in,
};
use gpa_system_tests::require_privileged;

const IMDS: &str = "http://169.254.169.254/metadata/instance?api-version=2021-02-01";

/// The shared world (fake host in `mode`), agent with the default config, key latched.
fn env(tag: &str, mode: &str) -> Env {
    World::new(tag, &["--mode", mode]).ready(NO_EXTRA)
}

/// Sends `request` (a python bytes literal's body, escapes as python reads them) to IMDS on one
/// connection, as root inside the cgroup, and returns the answer's status line.
fn raw_status_line(e: &Env, request: &str) -> String {
    let code = format!(
        "import socket\ns = socket.create_connection(('169.254.169.254', 80))\ns.sendall(b'{request}')\nprint(s.recv(100).split(b'\\r\\n')[0].decode())"
    );
    python(&e.ns, root_in(&e.cg), &code)
}

fn last_data_request(e: &Env) -> serde_json::Value {
    e.host
        .requests(&e.ns)
        .into_iter()
        .rev()
        .find(|r| !r["target"].as_str().unwrap_or("").starts_with("/secure-channel"))
        .expect("the fake host saw a data request")
}

#[test]
fn imds_request_is_redirected_signed_and_attributed() {
    require_privileged!();
    let e = env("imds", "enforce");
    let (status, text) = curl(&e.ns, root_in(&e.cg), &["-H", "Metadata: true", IMDS]);
    assert_eq!(status, 200, "{text}\n{}", e.agent.log());
    assert!(text.contains("x-ms-azure-host-authorization: value"), "marker header missing: {text}");
    assert!(text.contains("\"vmId\""), "upstream answer missing: {text}");
    let seen = last_data_request(&e);
    assert_eq!(seen["signature"], "valid", "{seen}");
    assert_eq!(seen["endpoint"], "imds");
}

/// A caller that opens a connection per request (curl) does not cost a new connection to the
/// host each time: the agent keeps the idle upstream (issue 17), for any caller, each request
/// still signed with its own caller's claims.
#[test]
fn new_client_connections_reuse_an_idle_upstream_and_each_request_is_still_signed_as_its_own() {
    require_privileged!();
    let e = env("pool", "enforce");
    let nobody = As { ids: Some((65534, 65534)), cgroup: Some(&e.cg) };
    let callers = [root_in(&e.cg), nobody];
    for who in callers {
        let (status, text) = curl(&e.ns, who, &["-H", "Metadata: true", IMDS]);
        assert_eq!(status, 200, "{text}\n{}", e.agent.log());
    }
    // urllib asks to close its connection (`Connection: close`): its own, not the agent's.
    let code = format!(
        "import urllib.request\nr = urllib.request.urlopen(urllib.request.Request('{IMDS}', headers={{'Metadata': 'true'}}))\nprint(r.status)"
    );
    assert_eq!(python(&e.ns, root_in(&e.cg), &code).trim(), "200", "{}", e.agent.log());
    let (status, text) = curl(&e.ns, root_in(&e.cg), &["-H", "Metadata: true", IMDS]);
    assert_eq!(status, 200, "{text}");
    let seen: Vec<serde_json::Value> = e
        .host
        .requests(&e.ns)
        .into_iter()
        .filter(|r| r["target"].as_str().is_some_and(|t| t.starts_with("/metadata")))
        .collect();
    assert_eq!(seen.len(), 4, "{seen:?}");
    let peers: Vec<&str> = seen.iter().map(|r| r["peer"].as_str().unwrap_or("")).collect();
    assert!(
        peers.iter().all(|p| *p == peers[0] && !p.is_empty()),
        "one upstream connection for four clients: {peers:?}"
    );
    let claims: Vec<String> = seen
        .iter()
        .map(|r| {
            assert_eq!(r["signature"], "valid", "{r}");
            let h = r["headers"].as_array().expect("headers");
            h.iter().find(|h| h[0] == "x-ms-azure-host-claims").map(|h| h[1].to_string()).unwrap_or_default()
        })
        .collect();
    let (root, other) = (r#""{ \"isRoot\": \"true\"}""#, r#""{ \"isRoot\": \"false\"}""#);
    assert_eq!(claims, [root, other, root, root]);
}

#[test]
fn agent_knows_pid_exe_uid_and_gid_of_a_non_root_caller() {
    require_privileged!();
    let e = env("ident", "enforce");
    let out = client(
        &e.ns,
        As { ids: Some((65534, 65533)), cgroup: Some(&e.cg) },
        // Debian's interpreter: a root-only one (pyenv under /root) is not executable by nobody.
        &[
            "/usr/bin/python3",
            "-c",
            &format!(
                "import os,urllib.request as u; r=u.urlopen(u.Request('{IMDS}',headers={{'Metadata':'true'}})); print(os.getpid(), r.status)"
            ),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "client failed: {}\n{}", String::from_utf8_lossy(&out.stderr), e.agent.log());
    let mut parts = stdout.split_whitespace();
    let pid: u64 = parts.next().and_then(|p| p.parse().ok()).expect("pid printed");
    assert_eq!(parts.next(), Some("200"));
    let exe = std::fs::canonicalize("/proc/self/exe").ok();
    drop(exe);
    let record = e
        .agent
        .audit()
        .into_iter()
        .find(|r| r["pid"].as_u64() == Some(pid))
        .unwrap_or_else(|| panic!("no audit record for pid {pid}: {:?}", e.agent.audit()));
    assert_eq!(record["uid"], 65534, "{record}");
    assert_eq!(record["gid"], 65533, "{record}");
    let python = std::fs::canonicalize(
        String::from_utf8_lossy(
            &client(
                &e.ns,
                As { ids: None, cgroup: None },
                &["/usr/bin/python3", "-c", "import sys;print(sys.executable)"],
            )
            .stdout,
        )
        .trim(),
    )
    .expect("python path");
    assert_eq!(record["exe"].as_str(), python.to_str(), "{record}");
    assert_eq!(record["endpoint"], "imds");
    assert_eq!(record["status"], 200);
}

#[test]
fn a_process_outside_the_cgroup_is_not_redirected_and_the_host_refuses_it() {
    require_privileged!();
    let e = env("outside", "enforce");
    let (status, text) = curl(&e.ns, As { ids: None, cgroup: None }, &["-H", "Metadata: true", IMDS]);
    assert_eq!(status, 401, "direct unsigned request must fail closed at the host: {text}");
    assert!(!text.contains("x-ms-azure-host-authorization: value"));
    assert_eq!(last_data_request(&e)["signature"], "missing");
}

#[test]
fn v4_mapped_ipv6_and_tcp_fast_open_are_redirected() {
    require_privileged!();
    let e = env("v6tfo", "enforce");
    let (status, text) = curl(
        &e.ns,
        root_in(&e.cg),
        &["-g", "-H", "Metadata: true", "http://[::ffff:169.254.169.254]/metadata/instance?api-version=2021-02-01"],
    );
    assert_eq!(status, 200, "v4-mapped connect: {text}\n{}", e.agent.log());
    assert!(text.contains("x-ms-azure-host-authorization: value"));
    assert_eq!(last_data_request(&e)["signature"], "valid");

    e.ns.sysctl("net.ipv4.tcp_fastopen", "3");
    let out = python(
        &e.ns,
        root_in(&e.cg),
        "import socket\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_STREAM)\n\
         req=b'GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\\r\\nHost: 169.254.169.254\\r\\nMetadata: true\\r\\nConnection: close\\r\\n\\r\\n'\n\
         s.sendto(req, socket.MSG_FASTOPEN, ('169.254.169.254', 80))\n\
         data=b''\n\
         while True:\n\
         \x20   c=s.recv(65536)\n\
         \x20   if not c: break\n\
         \x20   data+=c\n\
         print(data.split(b'\\r\\n')[0].decode()); print('marker' if b'x-ms-azure-host-authorization: value' in data else 'nomarker')",
    );
    assert!(out.contains("200 OK") && out.contains("marker\n") && !out.contains("nomarker"), "TFO: {out}");
}

#[test]
fn a_direct_connect_to_the_listener_gets_421() {
    require_privileged!();
    let e = env("direct", "enforce");
    let (status, text) = curl(&e.ns, As { ids: None, cgroup: None }, &["http://127.0.0.1:3080/metadata/instance"]);
    assert_eq!(status, 421, "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"));
}

#[test]
fn keep_alive_pipelining_chunked_bodies_and_http_1_0_work() {
    require_privileged!();
    let e = env("framing", "enforce");
    let out = python(
        &e.ns,
        root_in(&e.cg),
        "import http.client\n\
         c=http.client.HTTPConnection('168.63.129.16',80,timeout=10)\n\
         c.request('GET','/machine?comp=goalstate',headers={'x-ms-version':'2012-11-30'})\n\
         r=c.getresponse(); b=r.read(); print(r.status, r.getheader('x-ms-azure-host-authorization'))\n\
         def body():\n\
         \x20   yield b'{\"a\":'\n\
         \x20   yield b'1}'\n\
         c.request('POST','/machine?comp=health',body=body(),headers={'Content-Type':'application/json'},encode_chunked=True)\n\
         r=c.getresponse(); b=r.read(); print(r.status, len(b))\n\
         c.request('HEAD','/machine?comp=goalstate')\n\
         r=c.getresponse(); r.read(); print(r.status)\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"200 value"), "{out}\n{}", e.agent.log());
    assert!(lines.get(1).is_some_and(|l| l.starts_with("200 ")), "{out}");
    assert_eq!(lines.get(2), Some(&"200"), "{out}");
    let post = e
        .host
        .requests(&e.ns)
        .into_iter()
        .find(|r| r["method"] == "POST" && r["target"] == "/machine?comp=health")
        .expect("POST seen");
    assert_eq!(post["signature"], "valid", "{post}");
    assert_eq!(post["body"], "{\"a\":1}");
    let headers = post["headers"].to_string().to_ascii_lowercase();
    assert!(headers.contains("[\"content-length\",\"7\"]"), "de-chunked with a length: {headers}");
    assert!(!headers.contains("transfer-encoding"), "{headers}");

    // Two pipelined requests in one write, then HTTP/1.0.
    let out = python(
        &e.ns,
        root_in(&e.cg),
        "import socket\n\
         s=socket.create_connection(('169.254.169.254',80))\n\
         r=b'GET /metadata/instance HTTP/1.1\\r\\nHost: 169.254.169.254\\r\\nMetadata: true\\r\\n\\r\\n'\n\
         s.sendall(r + r.replace(b'\\r\\n\\r\\n', b'\\r\\nConnection: close\\r\\n\\r\\n'))\n\
         d=b''\n\
         while True:\n\
         \x20   c=s.recv(65536)\n\
         \x20   if not c: break\n\
         \x20   d+=c\n\
         print(d.count(b'HTTP/1.1 200 OK'))\n\
         s=socket.create_connection(('169.254.169.254',80))\n\
         s.sendall(b'GET /metadata/instance HTTP/1.0\\r\\nMetadata: true\\r\\n\\r\\n')\n\
         d=b''\n\
         while True:\n\
         \x20   c=s.recv(65536)\n\
         \x20   if not c: break\n\
         \x20   d+=c\n\
         print(d.split(b'\\r\\n')[0].decode())\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"2"), "pipelined: {out}");
    assert!(lines.get(1).is_some_and(|l| l.contains(" 200 ")), "HTTP/1.0: {out}");
}

#[test]
fn the_proxy_answers_its_documented_error_codes() {
    require_privileged!();
    let e = env("errors", "enforce");
    let root = root_in(&e.cg);
    let (s, t) = curl(&e.ns, root, &["-X", "TRACE", "http://169.254.169.254/metadata/instance"]);
    assert_eq!(s, 405, "{t}");
    assert!(t.to_ascii_lowercase().contains("allow: get, head, post, put, delete, options, patch"), "{t}");
    let (s, t) = curl(&e.ns, root, &["--path-as-is", "http://169.254.169.254/metadata//instance"]);
    assert_eq!(s, 403, "{t}");
    // A dot segment is refused as ambiguous before the traversal guard (400, issue 12); `..`
    // inside a segment is still the guard's (403, MSP §4.8).
    let (s, t) = curl(&e.ns, root, &["--path-as-is", "http://169.254.169.254/metadata/%2e%2e/x"]);
    assert_eq!(s, 400, "{t}");
    let (s, t) = curl(&e.ns, root, &["--path-as-is", "http://169.254.169.254/metadata/a%2e%2eb/x"]);
    assert_eq!(s, 403, "{t}");
    let (s, t) = curl(&e.ns, root, &["-H", "Content-Length: 102401", "-X", "POST", "http://169.254.169.254/x"]);
    assert_eq!(s, 413, "{t}");
    let (s, t) = curl(
        &e.ns,
        root,
        &[
            "-H",
            "Content-Length: 3",
            "-H",
            "Transfer-Encoding: chunked",
            "-X",
            "POST",
            "--data-binary",
            "abc",
            "http://169.254.169.254/x",
        ],
    );
    assert_eq!(s, 400, "{t}");
    // The fake host is told to be down: the upstream refuses or drops → 502.
    e.host.control(&e.ns, &serde_json::json!({"down": true}));
    let (s, t) = curl(&e.ns, root, &["-H", "Metadata: true", IMDS]);
    assert_eq!(s, 502, "{t}");
    assert!(!t.contains("x-ms-azure-host-authorization"), "generated errors carry no marker: {t}");
}

#[test]
fn non_root_callers_are_refused_by_wireserver_but_served_by_imds() {
    require_privileged!();
    let e = env("nonroot", "enforce");
    let nobody = As { ids: Some((65534, 65534)), cgroup: Some(&e.cg) };
    let (s, t) = curl(&e.ns, nobody, &["http://168.63.129.16/machine?comp=goalstate"]);
    assert_eq!(s, 403, "{t}");
    let (s, t) = curl(&e.ns, nobody, &["-H", "Metadata: true", IMDS]);
    assert_eq!(s, 200, "{t}");
    let imds = last_data_request(&e);
    let claims =
        imds["headers"].as_array().expect("headers").iter().find(|h| h[0] == "x-ms-azure-host-claims").cloned();
    assert_eq!(claims.expect("claims header")[1], "{ \"isRoot\": \"false\"}");
}

#[test]
fn a_silent_upstream_gets_504_after_the_configured_timeout() {
    require_privileged!();
    let ns = Netns::new("silent");
    let cg = Cgroup::new("silent");
    let _host = FakeHost::start(&ns, "enforce");
    // An "IMDS" on port 81 that accepts and never answers.
    let silent = ns
        .command("python3")
        .args(["-c", "import socket,time\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('169.254.169.254',81));s.listen(8)\nc=[]\nwhile True: c.append(s.accept())"])
        .spawn()
        .expect("silent upstream");
    let _silent = gpa_system_tests::harness::Proc { child: silent };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let agent = Agent::start(&ns, &cg, &["\"imdsAddress\":\"169.254.169.254:81\"", "\"upstreamTimeoutMs\":500"]);
    agent.wait_ready(&ns);
    let started = std::time::Instant::now();
    let (status, text) =
        curl(&ns, root_in(&cg), &["-H", "Metadata: true", "http://169.254.169.254:81/metadata/instance"]);
    assert_eq!(status, 504, "{text}\n{}", agent.log());
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "the timeout is the configured one");
}

/// Valid requests at the edges of what the parser accepts are forwarded and signed, never a
/// gateway error; what it refuses is a 4xx (issue 14, finding 6).
#[test]
fn requests_at_the_parser_limits_are_forwarded_or_get_a_4xx_never_a_5xx() {
    require_privileged!();
    let e = env("limits", "enforce");
    let base = "http://169.254.169.254/metadata/instance";
    // 65, 200 and 600 query pieces (the signer stopped at 64: 502).
    for pieces in [65, 200, 600] {
        let query: Vec<String> = (0..pieces).map(|i| format!("k{i}=v{i}")).collect();
        let url = format!("{base}?api-version=2021-02-01&{}", query.join("&"));
        let (status, text) = curl(&e.ns, root_in(&e.cg), &["-H", "Metadata: true", &url]);
        assert_eq!(status, 200, "{pieces} query pieces: {text}\n{}", e.agent.log());
        assert_eq!(last_data_request(&e)["signature"], "valid", "{pieces} query pieces");
    }
    // 1,000 pieces do not fit the 8 KiB head: a 4xx, not a gateway error.
    let query: Vec<String> = (0..1000).map(|i| format!("k{i}=v{i}")).collect();
    let (status, _) = curl(&e.ns, root_in(&e.cg), &["-H", "Metadata: true", &format!("{base}?{}", query.join("&"))]);
    assert!((400..500).contains(&status), "an oversized target got {status}");
    // Client headers up to the parser's 48 (curl adds Host, User-Agent, Accept): all signed;
    // one more is 431 (47 and 48 were 502: the signer counted the agent's own headers too).
    for extra in [40, 44, 45] {
        let mut args = vec!["-H".to_owned(), "Metadata: true".to_owned()];
        for i in 0..extra {
            args.push("-H".to_owned());
            args.push(format!("x-test-{i}: {i}"));
        }
        args.push(format!("{base}?api-version=2021-02-01"));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, text) = curl(&e.ns, root_in(&e.cg), &argv);
        let headers = extra + 4;
        if headers <= 48 {
            assert_eq!(status, 200, "{headers} headers: {text}\n{}", e.agent.log());
            assert_eq!(last_data_request(&e)["signature"], "valid", "{headers} headers");
        } else {
            assert_eq!(status, 431, "{headers} headers: {text}");
        }
    }
    // An obs-text byte in a header value: 400 at the agent (it was 502).
    let out = raw_status_line(
        &e,
        r"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nX-Name: caf\xe9\r\nConnection: close\r\n\r\n",
    );
    assert!(out.contains(" 400 "), "obs-text header: {out}");
    // x-ms-azure-hostname is the client's header: it reaches the host (the x-ms-azure-host-
    // prefix alone is the agent's).
    let (status, text) = curl(
        &e.ns,
        root_in(&e.cg),
        &["-H", "Metadata: true", "-H", "x-ms-azure-hostname: vm-1", &format!("{base}?api-version=2021-02-01")],
    );
    assert_eq!(status, 200, "{text}");
    let seen = last_data_request(&e);
    let headers = seen["headers"].to_string().to_ascii_lowercase();
    assert!(headers.contains("x-ms-azure-hostname"), "x-ms-azure-hostname was dropped: {seen}");
}

/// `status.json` follows the modules: once the key is latched and the redirect armed it says
/// so at once, not at the next timer tick (here an hour away).
#[test]
fn the_status_file_changes_when_the_key_latches_not_on_the_timer() {
    require_privileged!();
    let ns = Netns::new("stfile");
    let cg = Cgroup::new("stfile");
    let host = FakeHost::start(&ns, "enforce");
    let agent = Agent::start(&ns, &cg, &[r#""statusIntervalSeconds":3600"#]);
    agent.wait_ready(&ns);
    let path = agent.log_dir.join("status.json");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let latched = loop {
        let doc: serde_json::Value =
            std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        let states = &doc["proxyAgentStatus"]["keyLatchStatus"]["states"];
        if states["keyGuid"].is_string() && states["secureChannelState"] != "Unknown" {
            break doc;
        }
        assert!(
            std::time::Instant::now() < end,
            "status.json still shows no key 3 s after readiness: {doc}\n{}",
            agent.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(latched["proxyAgentStatus"]["keyLatchStatus"]["status"], "RUNNING", "{latched}");
    drop(host);
}

/// urllib3 sends a repeated header name as it was given (an `HTTPHeaderDict`); IMDS answers
/// it directly, so the agent must too: one combined field, signed as sent (issue 14).
#[test]
fn a_repeated_header_name_is_combined_signed_and_forwarded() {
    require_privileged!();
    let e = env("repeat", "enforce");
    let code = "import urllib3\n\
        from urllib3._collections import HTTPHeaderDict\n\
        h = HTTPHeaderDict()\n\
        h.add('Metadata', 'true')\n\
        h.add('X-Trace', 'a')\n\
        h.add('x-trace', 'b')\n\
        r = urllib3.PoolManager().request('GET', 'http://169.254.169.254/metadata/instance?api-version=2021-02-01', headers=h, retries=False)\n\
        print(r.status)";
    let out = client(&e.ns, root_in(&e.cg), &["/usr/bin/python3", "-c", code]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text.trim(), "200", "{text} {}\n{}", String::from_utf8_lossy(&out.stderr), e.agent.log());
    let seen = last_data_request(&e);
    assert_eq!(seen["signature"], "valid", "{seen}");
    let headers = seen["headers"].as_array().expect("headers");
    let traces: Vec<&serde_json::Value> =
        headers.iter().filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case("x-trace"))).collect();
    assert_eq!(traces.len(), 1, "one field: {seen}");
    assert_eq!(traces[0][1], "a, b", "{seen}");
    // A repeated Host stays refused.
    let out = raw_status_line(
        &e,
        r"GET /metadata/instance HTTP/1.1\r\nHost: a\r\nHost: b\r\nMetadata: true\r\nConnection: close\r\n\r\n",
    );
    assert!(out.contains(" 400 "), "repeated Host: {out}");
}

/// The agent's `VmHWM` (peak resident set), in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn a_skip_listed_upload_of_several_mib_is_streamed_through_not_buffered() {
    require_privileged!();
    // Enforce: the host takes `PUT /vmAgentLog` unsigned (skip list), everything else signed.
    let e = env("agentlog", "enforce");
    let pid = e.agent.proc.pid();
    // Forget the start-up peak: from here VmHWM is what the uploads cost.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
    let before = peak_rss_kib(pid);

    // curl with a Content-Length (the guest agent's upload is a plain PUT of a zip), then
    // python's http.client chunked, on one kept-alive connection with a signed GET after it.
    let dir = gpa_system_tests::harness::TempDir::new("agentlog");
    let archive = dir.0.join("logs.zip");
    let code = format!(
        "import hashlib, http.client\n\
         data = b''.join(hashlib.sha256(str(i).encode()).digest() for i in range(8 * 1024 * 1024 // 32))\n\
         open('{archive}', 'wb').write(data)\n\
         print(hashlib.sha256(data).hexdigest())\n\
         c = http.client.HTTPConnection('168.63.129.16', 32526, timeout=30)\n\
         def pieces():\n\
         \x20   for i in range(0, 6 * 1024 * 1024, 61 * 1024):\n\
         \x20       yield data[i:min(i + 61 * 1024, 6 * 1024 * 1024)]\n\
         c.request('PUT', '/vmAgentLog', body=pieces(), encode_chunked=True)\n\
         r = c.getresponse(); r.read(); print(r.status, r.getheader('x-ms-azure-host-authorization'))\n\
         print(hashlib.sha256(data[:6 * 1024 * 1024]).hexdigest())\n\
         c.request('GET', '/status')\n\
         r = c.getresponse(); r.read(); print(r.status)\n",
        archive = archive.display()
    );
    let out = python(&e.ns, root_in(&e.cg), &code);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}\n{}", e.agent.log());
    let (whole_sha, chunked_status, chunked_sha, after_status) = (lines[0], lines[1], lines[2], lines[3]);
    assert_eq!(chunked_status, "200 value", "chunked upload through the proxy: {out}\n{}", e.agent.log());
    assert_eq!(after_status, "200", "the connection stays usable after a streamed body: {out}");

    let (status, text) = curl(
        &e.ns,
        root_in(&e.cg),
        &["-X", "PUT", "--data-binary", &format!("@{}", archive.display()), "http://168.63.129.16:32526/vmAgentLog"],
    );
    assert_eq!(status, 200, "{text}\n{}", e.agent.log());
    assert!(text.contains("x-ms-azure-host-authorization: value"), "went through the proxy: {text}");

    let uploads: Vec<serde_json::Value> =
        e.host.requests(&e.ns).into_iter().filter(|r| r["target"] == "/vmAgentLog").collect();
    assert_eq!(uploads.len(), 2, "{uploads:?}");
    let (chunked, whole) = (&uploads[0], &uploads[1]);
    assert_eq!((chunked["bodyLength"].as_u64(), chunked["bodySha256"].as_str()), (Some(6 << 20), Some(chunked_sha)));
    assert_eq!((whole["bodyLength"].as_u64(), whole["bodySha256"].as_str()), (Some(8 << 20), Some(whole_sha)));
    for upload in &uploads {
        assert_eq!(upload["status"], 200, "{upload}");
        assert_eq!(upload["signature"], "missing", "skip-listed: never signed");
    }
    // The chunked one keeps its framing (streamed), not a de-chunked length.
    let framing = gpa_system_tests::harness::header_values(chunked, "transfer-encoding");
    assert_eq!(framing, ["chunked"], "{chunked}");
    assert!(gpa_system_tests::harness::header_values(chunked, "content-length").is_empty(), "{chunked}");
    assert_eq!(gpa_system_tests::harness::header_values(whole, "content-length"), [(8 << 20).to_string()]);
    let signed_after =
        e.host.requests(&e.ns).into_iter().rev().find(|r| r["target"] == "/status").expect("the GET after the upload");
    assert_eq!(signed_after["signature"], "valid", "{signed_after}");

    // 14 MiB went through; the agent's peak grew by far less than one of the bodies.
    let grown = peak_rss_kib(pid).saturating_sub(before);
    eprintln!("agent VmHWM grew by {grown} KiB over two uploads (14 MiB)");
    assert!(grown < 2048, "VmHWM grew by {grown} KiB while streaming 14 MiB: bodies were buffered");

    // Over the skip list's 100 MiB limit: refused from the declared length, nothing forwarded;
    // an ordinary request keeps the 100 KiB limit.
    for (port, target, length) in
        [(32526, "/vmAgentLog", (100 << 20) + 1), (80, "/machine?comp=health", (100 << 10) + 1)]
    {
        let code = format!(
            "import socket\ns = socket.create_connection(('168.63.129.16', {port}))\n\
             s.sendall(b'PUT {target} HTTP/1.1\\r\\nHost: 168.63.129.16\\r\\nContent-Length: {length}\\r\\n\\r\\n')\n\
             print(s.recv(100).split(b'\\r\\n')[0].decode())"
        );
        let line = python(&e.ns, root_in(&e.cg), &code);
        assert_eq!(line.trim(), "HTTP/1.1 413 Content Too Large", "{target} with {length} bytes");
    }
    assert_eq!(e.host.requests(&e.ns).iter().filter(|r| r["target"] == "/vmAgentLog").count(), 2);
}
