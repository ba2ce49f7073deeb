// SPDX-License-Identifier: MIT
//! The adversarial layer (issue 12): what an unprivileged local user (uid 65534) does to borrow
//! another program's identity, claim a record that is not theirs, or receive callers meant for
//! the agent, each as a test with its variants. Every case here failed against the agent
//! before the fix it names (see docs/TESTING.md "Adversarial cases").

use super::*;

/// The attack program: every exec-after-connect variant, one per invocation
/// (`python3 exec_attacks.py VARIANT HOST PORT PATH ALLOWED_EXE [ARGS...]`, prints
/// `RESULT <variant> <status|none> <pid>`).
const EXEC_ATTACKS: &str = include_str!("exec_attacks.py");

/// The variants of [`EXEC_ATTACKS`].
const EXEC_VARIANTS: [&str; 8] =
    ["tfo", "tfo_prefork", "plain", "thread_exec", "thread_connect", "vfork", "memfd", "setname_only"];

/// The token path, guarded by an `exePath` rule in these worlds.
const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

/// Runs a python snippet with the system python (readable by every user) as `who`.
fn py(ns: &gpa_system_tests::harness::Netns, who: As<'_>, code: &str) -> String {
    let out = client(ns, who, &[PYTHON, "-c", code]);
    assert!(out.status.success(), "python client failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn canonical(path: &str) -> String {
    fs::canonicalize(path).unwrap_or_else(|e| panic!("{path}: {e}")).to_string_lossy().into_owned()
}

/// A world whose IMDS rules grant the token path only to the listed executables.
fn exe_world(tag: &str, allowed: &[&str], extra: &[&str]) -> Env {
    let w = World::new(tag);
    let who: Vec<(String, Value)> =
        allowed.iter().enumerate().map(|(i, exe)| (format!("exe{i}"), json!({"exePath": exe}))).collect();
    let who: Vec<(&str, Value)> = who.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
    let item = imds_item(&format!("{tag}-1"), "deny", &[("token", TOKEN_PATH, &who)]);
    w.control(&json!({"rules": rules_with_imds(item)}));
    w.ready(extra)
}

/// Runs one exec variant as uid 65534 inside the cgroup; returns (status, connecting pid).
fn exec_attack(e: &Env, script: &Path, variant: &str, allowed: &str) -> (String, u64) {
    let out = client(
        &e.ns,
        nobody(&e.cg),
        &[PYTHON, script.to_str().expect("utf-8"), variant, IMDS_IP, "80", TOKEN_PATH, allowed, "3"],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("{variant}: no RESULT line: {text} {}", String::from_utf8_lossy(&out.stderr)));
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.get(1).copied(), Some(variant), "{line}");
    (f.get(2).copied().unwrap_or("none").to_owned(), f.get(3).and_then(|p| p.parse().ok()).unwrap_or(0))
}

// ---- exec after connect, in every variant ------------------------------------------------------

#[test]
fn exec_after_connect_never_lends_an_executable_identity() {
    let run = begin!("exec_after_connect_never_lends_an_executable_identity");
    let sleep = canonical("/usr/bin/sleep");
    let curl_exe = canonical("/usr/bin/curl");
    let e = exe_world("advexec", &[&sleep, &curl_exe], &[]);
    let script = e.dir.0.join("exec_attacks.py");
    fs::write(&script, EXEC_ATTACKS).expect("attack script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).expect("chmod");

    // The rule works: the real allowed program, run by the same unprivileged user, is served.
    let url = format!("http://{IMDS_IP}{TOKEN_PATH}");
    let (status, text) = e.curl(nobody(&e.cg), &["-H", "Metadata: true", &url]);
    assert_eq!(status, 200, "curl is allowlisted by exePath: {text}");

    let mut seen = Vec::new();
    for variant in EXEC_VARIANTS {
        let (status, pid) = exec_attack(&e, &script, variant, &sleep);
        seen.push(format!("{variant} {status}"));
        if std::env::var_os("GPA_ADV_REPORT").is_some() {
            eprintln!("{variant}: {status} (pid {pid})");
            continue;
        }
        assert_eq!(status, "403", "{variant}: uid 65534 borrowed {sleep}'s identity (pid {pid})");
    }
    assert!(e.agent.log().contains("executable identity from the kernel"), "{}", e.agent.log());
    let rec = e.audit_for(exec_attack(&e, &script, "tfo", &sleep).1).pop().expect("audit record of the tfo attack");
    assert_ne!(rec["exe"].as_str(), Some(sleep.as_str()), "{rec}");
    assert_eq!(rec["uid"].as_u64(), Some(65534), "{rec}");
    run.pass(
        "ADV-exec",
        format!(
            "uid 65534, comm set to 'sleep', connect then execve(/usr/bin/sleep), a child writes: {}; real curl (exePath) 200",
            seen.join(", ")
        ),
    );
    e.check_oracle();

    // The /proc fallback (no kernel BTF, or callerIdentity: procfs) still closes the deferred
    // SYN: a TCP Fast Open connect whose first write, and so whose SYN, comes from another task
    // (a fork, after the exec) carries no executable identity, in every variant that defers it.
    let e = exe_world("advexecp", &[&sleep, &curl_exe], &["\"callerIdentity\":\"procfs\""]);
    let script = e.dir.0.join("exec_attacks.py");
    fs::write(&script, EXEC_ATTACKS).expect("attack script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).expect("chmod");
    assert!(e.agent.log().contains("executable identity from /proc only"), "{}", e.agent.log());
    let (status, text) = e.curl(nobody(&e.cg), &["-H", "Metadata: true", &url]);
    assert_eq!(status, 200, "procfs mode, real curl: {text}");
    let mut seen = Vec::new();
    let deferred = EXEC_VARIANTS.iter().filter(|v| **v != "plain");
    for variant in deferred.chain(std::iter::repeat_n(&"tfo_prefork", 20)) {
        let (status, pid) = exec_attack(&e, &script, variant, &sleep);
        seen.push(format!("{variant} {status}"));
        if std::env::var_os("GPA_ADV_REPORT").is_some() {
            eprintln!("procfs {variant}: {status} (pid {pid})");
            continue;
        }
        assert_eq!(status, "403", "procfs mode, {variant}: uid 65534 borrowed {sleep}'s identity (pid {pid})");
        // The kernel told the agent why: the SYN left from another task (the fork), whatever
        // the time between connect and SYN, so no timing luck decides it.
        if *variant != "setname_only" && *variant != "vfork" {
            let why = format!("executable identity withheld: pid={pid} reason=syn-from-another-task");
            assert!(e.agent.log().contains(&why), "procfs mode, {variant}: no `{why}` in the agent log");
        }
    }
    let doctor =
        e.ns.command(gpa_system_tests::harness::binary("guest-proxy-agent").to_str().expect("utf-8"))
            .args(["doctor", "--config"])
            .arg(&e.agent.config)
            .output()
            .expect("doctor");
    let doctor = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert!(doctor.contains("WARN caller-identity: callerIdentity is procfs"), "{doctor}");
    run.pass(
        "ADV-exec-procfs",
        format!(
            "callerIdentity procfs: deferred-SYN variants (SYN sent by another task): {}; real curl 200; doctor WARN caller-identity",
            seen.join(", ")
        ),
    );
    // What the fallback cannot close (docs/DESIGN.md, and why doctor warns): an ordinary
    // connect whose SYN leaves from the connecting task, then an execve that completes before
    // the agent reads /proc. Counted, not asserted: the kernel object closes it.
    let wins = (0..4).filter(|_| exec_attack(&e, &script, "plain", &sleep).0 == "200").count();
    run.documented(
        "ADV-exec-procfs-race",
        format!("callerIdentity procfs only: plain connect, execve, child writes: borrowed in {wins} of 4 tries (the kernel object closes it: ADV-exec)"),
    );
    e.check_oracle();
}

// ---- the executable file itself: setuid, capabilities, deleted, replaced, traced, scripts ---

/// A root-owned copy of the system python in a root-owned 0755 directory, as `name`.
fn python_copy(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    fs::copy(resolved_python(), &path).expect("copy python");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    path.to_string_lossy().into_owned()
}

/// Python that (optionally) does `before`, connects to IMDS, asks for the token and prints
/// `STATUS <code> <pid>`.
fn token_client(before: &str) -> String {
    format!(
        "import os,socket,sys,ctypes\n{before}\ns=socket.create_connection(('{IMDS_IP}',80),timeout=10)\n\
         s.sendall(b'GET {TOKEN_PATH} HTTP/1.1\\r\\nHost: x\\r\\nMetadata: true\\r\\nConnection: close\\r\\n\\r\\n')\n\
         r=s.recv(200).split(b'\\r\\n')[0].decode()\nprint('STATUS', r.split(' ')[1] if ' ' in r else 'none', os.getpid())"
    )
}

fn status_of(out: &str) -> &str {
    out.lines().find_map(|l| l.strip_prefix("STATUS ")).and_then(|l| l.split(' ').next()).unwrap_or("none")
}

#[test]
fn the_executable_is_the_file_that_ran_at_connect() {
    let run = begin!("the_executable_is_the_file_that_ran_at_connect");
    let bins = TempDir::new("adv-bins");
    let allowed = python_copy(&bins.0, "allowed-py");
    let doomed = python_copy(&bins.0, "doomed-py");
    let replaced = python_copy(&bins.0, "replaced-py");
    let capped = python_copy(&bins.0, "cap-py");
    let other = python_copy(&bins.0, "other-py");
    let script = bins.0.join("allowed-script.py").to_string_lossy().into_owned();
    // Every path above but `other` is allowlisted: each 403 below is the identity check, not
    // a missing rule (each has a 200 control).
    let e = exe_world("advfile", &[&allowed, &doomed, &replaced, &capped, &script], &[]);
    let run_as = |who: As<'_>, argv: &[&str]| String::from_utf8_lossy(&client(&e.ns, who, argv).stdout).into_owned();
    let plain = token_client("");

    assert_eq!(status_of(&run_as(nobody(&e.cg), &[&allowed, "-c", &plain])), "200", "allowed copy");

    // Traced at connect (PTRACE_TRACEME in a child of the allowed program): code in a traced
    // process may be the tracer's, so it has no executable identity.
    let traced = token_client("if os.fork():\n    os.wait(); sys.exit(0)\nctypes.CDLL(None).ptrace(0,0,0,0)");
    assert_eq!(status_of(&run_as(nobody(&e.cg), &[&allowed, "-c", &traced])), "403", "traced at connect");

    // Deleted while running: no path names the running file any more.
    assert_eq!(status_of(&run_as(root(&e.cg), &[&doomed, "-c", &plain])), "200", "doomed copy, control");
    let deleted = token_client(&format!("os.unlink('{doomed}')"));
    assert_eq!(status_of(&run_as(root(&e.cg), &[&doomed, "-c", &deleted])), "403", "deleted executable");

    // Replaced while running: the allowlisted path now names another inode.
    assert_eq!(status_of(&run_as(root(&e.cg), &[&replaced, "-c", &plain])), "200", "replaced copy, control");
    let swap = python_copy(&bins.0, "swap-src");
    let replace = token_client(&format!("os.rename('{swap}', '{replaced}')"));
    assert_eq!(status_of(&run_as(root(&e.cg), &[&replaced, "-c", &replace])), "403", "replaced executable");

    // setuid root: the real uid is still 65534 (euid 0): not root for the WireServer.
    let suid = python_copy(&bins.0, "suid-py");
    fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).expect("chmod u+s");
    let ws = format!(
        "import os,socket\ns=socket.create_connection(('{WS_IP}',80),timeout=10)\n\
         s.sendall(b'GET /machine?comp=goalstate HTTP/1.1\\r\\nHost: x\\r\\nx-ms-version: 2012-11-30\\r\\nConnection: close\\r\\n\\r\\n')\n\
         r=s.recv(200).split(b'\\r\\n')[0].decode()\nprint('STATUS', r.split(' ')[1], os.getpid(), os.geteuid())"
    );
    let out = run_as(nobody(&e.cg), &[&suid, "-c", &ws]);
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields.get(3).copied(), Some("0"), "the copy runs with euid 0: {out}");
    assert_eq!(status_of(&out), "403", "setuid-root binary run by 65534: {out}");
    let pid: u64 = fields.get(2).and_then(|p| p.parse().ok()).expect("pid");
    let rec = e.eventually(Duration::from_secs(3), "audit record of the setuid caller", || e.audit_for(pid).pop());
    assert_eq!(rec["uid"].as_u64(), Some(65534), "{rec}");

    // A file capability neither grants nor takes an identity: the path is what matches.
    let setcap = Command::new("setcap").args(["cap_net_raw+ep", &capped]).status();
    let cap_note = if setcap.is_ok_and(|s| s.success()) {
        assert_eq!(status_of(&run_as(nobody(&e.cg), &[&capped, "-c", &plain])), "200", "capability binary by path");
        "cap_net_raw binary served by its own path 200"
    } else {
        "setcap unavailable: capability case not run"
    };

    // A script is its interpreter: an exePath naming the script matches only if its
    // interpreter is allowlisted too (here it is: 200), never by the script's own path.
    fs::write(&script, format!("#!{allowed}\n{plain}")).expect("script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
    assert_eq!(status_of(&run_as(nobody(&e.cg), &[&script])), "200", "script under the allowed interpreter");
    fs::write(&script, format!("#!{other}\n{plain}")).expect("script");
    assert_eq!(status_of(&run_as(nobody(&e.cg), &[&script])), "403", "the script's own exePath never matches");

    run.pass(
        "ADV-exefile",
        format!(
            "allowed copy 200; traced at connect 403; deleted 403 (control 200); replaced 403 (control 200); setuid-root run by 65534 → WireServer 403, audit uid 65534; {cap_note}; script under a non-allowed interpreter 403"
        ),
    );
    e.check_oracle();
}

// ---- records: only the connection they were made for, once ------------------------------------

/// Python: a direct connect to the listener from exactly `port` (outside any cgroup), asking
/// the WireServer goal state; prints the status.
fn direct_from_port(port: u16, listen_port: u16) -> String {
    format!(
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         try:\n    s.bind(('127.0.0.1',{port}))\n    s.settimeout(5)\n    s.connect(('127.0.0.1',{listen_port}))\n\
         \x20   s.sendall(b'GET /machine?comp=goalstate HTTP/1.1\\r\\nHost: x\\r\\nx-ms-version: 2012-11-30\\r\\nConnection: close\\r\\n\\r\\n')\n\
         \x20   print(s.recv(100).split(b'\\r\\n')[0].decode())\nexcept OSError as e:\n    print('ERR', e)"
    )
}

#[test]
fn a_record_is_claimed_only_by_the_connection_it_was_made_for() {
    let run = begin!("a_record_is_claimed_only_by_the_connection_it_was_made_for");
    let pins = Bpffs::new("adv-rec-bpf");
    let pin = pins.config();
    let w = World::new("advrec");
    let base = TempDir::new("adv-rec-agent");
    let start = |w: &World| Agent::start_in(&w.ns, &w.cg, &base.0, &[FAST_POLL, &pin]);
    let mut agent = start(&w);
    agent.wait_ready(&w.ns);

    // 1. While no agent runs, a redirected connect from a chosen port is refused in the kernel.
    agent.proc.signal(libc::SIGKILL);
    assert!(agent.proc.wait_timeout(Duration::from_secs(5)).is_some(), "agent did not die");
    drop(agent);
    let port_down = 40_100;
    let victim = format!(
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',{port_down}))\n\
         s.settimeout(3)\ntry:\n    s.connect(('{WS_IP}',80)); print('CONNECTED')\nexcept OSError as e:\n    print('REFUSED', e.errno)"
    );
    let out = py(&w.ns, root(&w.cg), &victim);
    assert_eq!(out.trim(), "REFUSED 1", "no agent: the kernel refuses (EPERM), never a queue");

    // 2. Connections waiting in the accept queue when the agent dies: a stopped agent, root
    // callers connect from known ports, then the agent is killed (its listener closes and the
    // kernel resets them).
    let mut agent = start(&w);
    agent.wait_ready(&w.ns);
    agent.proc.signal(libc::SIGSTOP);
    let queued: Vec<u16> = (0..8).map(|i| 40_200 + i).collect();
    let hold = format!(
        "import socket,time\nss=[]\nfor p in {queued:?}:\n    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         \x20   s.bind(('0.0.0.0',p)); s.settimeout(3); s.connect(('{WS_IP}',80)); ss.append(s)\n\
         for s in ss:\n    s.sendall(b'GET /machine?comp=goalstate HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\nprint('QUEUED', len(ss))"
    );
    let out = py(&w.ns, root(&w.cg), &hold);
    assert!(out.starts_with("QUEUED 8"), "{out}");
    agent.proc.signal(libc::SIGKILL);
    agent.proc.signal(libc::SIGCONT);
    assert!(agent.proc.wait_timeout(Duration::from_secs(5)).is_some(), "agent did not die");
    drop(agent);

    // A new agent; the attacker, outside the cgroup and as uid 65534, connects directly from
    // every port a root record could have been left under, and from the ports around them.
    let agent = start(&w);
    agent.wait_ready(&w.ns);
    let mut probes = vec![port_down];
    probes.extend(&queued);
    probes.extend(40_090..40_110);
    probes.extend(40_190..40_220);
    probes.sort_unstable();
    probes.dedup();
    let mut answers = BTreeMap::new();
    for port in &probes {
        let out = py(&w.ns, As { ids: Some((65534, 65534)), cgroup: None }, &direct_from_port(*port, 3080));
        *answers.entry(out.trim().to_owned()).or_insert(0) += 1;
        assert!(
            out.starts_with("HTTP/1.1 421") || out.starts_with("ERR"),
            "a direct connection from port {port} was served as someone else: {out}\n{}",
            agent.log()
        );
    }
    assert!(answers.keys().any(|k| k.starts_with("HTTP/1.1 421")), "no probe reached the agent: {answers:?}");
    // And the agent serves the real caller normally afterwards.
    let (status, text) = curl(&w.ns, root(&w.cg), &["-H", "x-ms-version: 2012-11-30", GOAL_STATE]);
    assert_eq!(status, 200, "{text}");
    run.pass(
        "ADV-records",
        format!(
            "no agent: redirected connect EPERM; 8 root connects queued then agent killed; after restart {} direct probes from those ports and neighbours as 65534: {answers:?}",
            probes.len()
        ),
    );
    drop(agent);
    w.check_oracle();
}

// ---- the proxy port: squatted while the agent is down ------------------------------------------

/// A squatter: listens where it is told (as uid 65534), answers every request like a ready
/// agent, and appends every request line it receives to `log`.
fn squatter_code(bind: &str, family: &str, log: &Path, reuseport: bool) -> String {
    format!(
        "import socket,threading\ns=socket.socket(socket.{family})\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         if {reuseport}: s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEPORT,1)\n\
         s.bind(('{bind}',3080)); s.listen(64); print('LISTENING',flush=True)\n\
         def serve(c):\n    c.settimeout(5)\n    try:\n        d=c.recv(4096)\n        open('{log}','ab').write(d.split(b'\\r\\n')[0]+b'\\n')\n\
         \x20       c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: 39\\r\\n\\r\\n{{\"finished\":true,\"errorMessage\":\"\"}}   ')\n\
         \x20   except OSError: pass\n    c.close()\n\
         while True:\n    c,_=s.accept(); threading.Thread(target=serve,args=(c,),daemon=True).start()",
        log = log.display(),
        reuseport = if reuseport { "True" } else { "False" },
    )
}

#[test]
fn a_squatter_on_the_proxy_port_never_receives_a_caller_and_the_agent_still_starts() {
    let run = begin!("a_squatter_on_the_proxy_port_never_receives_a_caller_and_the_agent_still_starts");
    let pins = Bpffs::new("adv-squat-bpf");
    let pin = pins.config();
    let w = World::new("advsquat");
    let base = TempDir::new("adv-squat-agent");
    let mut agent = Agent::start_in(&w.ns, &w.cg, &base.0, &[FAST_POLL, &pin]);
    agent.wait_ready(&w.ns);

    // While the agent runs, the port cannot be shared, whatever the options.
    let grab = "import socket\nfor fam,addr in ((socket.AF_INET,'127.0.0.1'),(socket.AF_INET,'0.0.0.0'),(socket.AF_INET6,'::')):\n    \
                s=socket.socket(fam); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEPORT,1)\n    \
                try:\n        s.bind((addr,3080)); s.listen(1); print('BOUND',addr)\n    except OSError as e:\n        print('REFUSED',addr,e.errno)";
    let out = py(&w.ns, As { ids: Some((65534, 65534)), cgroup: None }, grab);
    assert!(!out.contains("BOUND"), "a user shares the agent's port: {out}");

    let status_cli = |w: &World| {
        let out =
            w.ns.command(gpa_system_tests::harness::binary("guest-proxy-agent").to_str().expect("utf-8"))
                .args(["--status", "--wait", "2", "--config"])
                .arg(base.0.join("config.json"))
                .output()
                .expect("--status");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(status_cli(&w).0, Some(0), "ready agent");
    agent.proc.signal(libc::SIGKILL);
    assert!(agent.proc.wait_timeout(Duration::from_secs(5)).is_some(), "agent did not die");
    drop(agent);

    let mut notes = Vec::new();
    for (bind, family, reuseport) in
        [("127.0.0.1", "AF_INET", false), ("0.0.0.0", "AF_INET", true), ("::", "AF_INET6", false)]
    {
        let log = w.dir.0.join(format!("squat-{}.log", bind.replace(':', "6")));
        fs::write(&log, "").expect("log");
        fs::set_permissions(&log, fs::Permissions::from_mode(0o666)).expect("chmod");
        let mut squatter =
            w.ns.command("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", PYTHON, "-c"])
                .arg(squatter_code(bind, family, &log, reuseport))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("squatter");
        let mut line = String::new();
        {
            use std::io::BufRead as _;
            let mut reader = std::io::BufReader::new(squatter.stdout.take().expect("stdout"));
            drop(reader.read_line(&mut line));
        }
        assert!(line.starts_with("LISTENING"), "squatter on {bind}: {line}");

        // No agent: callers are refused in the kernel; the squatter gets nothing; --status
        // does not believe the squatter.
        let tag = format!("squat-{bind}");
        let (status, text) =
            curl(&w.ns, root(&w.cg), &["-H", "x-ms-version: 2012-11-30", "-H", &tagged(&tag), GOAL_STATE]);
        assert_eq!(status, 0, "no agent: the caller must not get an answer: {text}");
        let (code, said) = status_cli(&w);
        assert_eq!(code, Some(1), "--status believed a squatter on {bind}: {said}");
        assert!(said.contains("held by uid 65534"), "{said}");

        // The agent starts anyway, on another port, and protects.
        let agent = Agent::start_in(&w.ns, &w.cg, &base.0, &[FAST_POLL, &pin]);
        let moved = eventually(Duration::from_secs(10), "the agent to listen elsewhere", || {
            let log = agent.log();
            log.contains("is held by another socket").then_some(log)
        });
        let in_use = fs::read_to_string(base.0.join("state/listener")).expect("listener address file");
        assert!(!in_use.trim().ends_with(":3080"), "{in_use}\n{moved}");
        eventually(Duration::from_secs(20), "readiness through --status", || {
            (status_cli(&w).0 == Some(0)).then_some(())
        });
        let (status, text) =
            curl(&w.ns, root(&w.cg), &["-H", "x-ms-version: 2012-11-30", "-H", &tagged(&tag), GOAL_STATE]);
        assert_eq!(status, 200, "caller served by the agent despite the squatter: {text}\n{}", agent.log());
        let (status, _) = curl(&w.ns, nobody(&w.cg), &["-H", "Metadata: true", IMDS]);
        assert_eq!(status, 200, "IMDS for 65534 through the agent");
        let seen = fs::read_to_string(&log).unwrap_or_default();
        let requests: Vec<&str> = seen.lines().filter(|l| !l.is_empty()).collect();
        assert!(
            requests.iter().all(|l| l.starts_with("GET /provision")),
            "the squatter on {bind} received a caller: {requests:?}"
        );
        notes.push(format!(
            "{bind}{}: caller refused while down, agent on {}",
            if reuseport { "+reuseport" } else { "" },
            in_use.trim()
        ));

        drop(agent);
        drop(squatter.kill());
        drop(squatter.wait());
    }
    run.pass(
        "ADV-squat",
        format!("{}; squatter saw 0 callers; --status exit 1 naming uid 65534 while down, 0 after", notes.join("; ")),
    );
    w.check_oracle();
}

// ---- targets the allowlist and the upstream could read differently --------------------------

#[test]
fn ambiguous_request_targets_are_refused_before_authorization() {
    let run = begin!("ambiguous_request_targets_are_refused_before_authorization");
    let w = World::new("advtgt");
    // Default allow, with a query-conditioned deny: the shape the fragment trick got around.
    let item = json!({"defaultAccess": "allow", "mode": "enforce", "id": "advtgt-1", "rules": {
        "privileges": [{"name": "vault", "path": TOKEN_PATH, "queryParameters": {"resource": "https://vault.azure.net"}}],
        "roles": [{"name": "r", "privileges": ["vault"]}],
        "identities": [{"name": "nobody-here", "userName": "no-such-user"}],
        "roleAssignments": [{"role": "r", "identities": ["nobody-here"]}]}});
    w.control(&json!({"rules": rules_with_imds(item)}));
    let e = w.ready(&[]);
    let vault = format!("{TOKEN_PATH}?resource=https://vault.azure.net");
    let denied = e.raw1(root(&e.cg), Raw::get(&vault, &[]));
    assert_eq!(denied.status(), 403, "the deny rule holds: {}\n{:?}", denied.brief(), e.agent.audit().last());
    let cases = [
        (format!("{TOKEN_PATH}#?resource=https://vault.azure.net"), "target-fragment"),
        (format!("{TOKEN_PATH}?api-version=2018-02-01#&resource=https://vault.azure.net"), "target-fragment"),
        ("/metadata/./identity/oauth2/token?resource=https://vault.azure.net".to_owned(), "target-dot-segment"),
        ("/metadata/%2e/identity/oauth2/token".to_owned(), "target-dot-segment"),
        ("/metadata/x/../identity/oauth2/token".to_owned(), "target-dot-segment"),
        ("/metadata\\identity\\oauth2\\token".to_owned(), "target-backslash"),
        ("/metadata%5Cidentity/oauth2/token".to_owned(), "target-backslash"),
        ("/metadata/instance%00/x".to_owned(), "target-nul"),
    ];
    let mut notes = Vec::new();
    for (target, why) in &cases {
        let tag = e.tag("tgt");
        let reply = e.raw1(root(&e.cg), Raw::get(target, &[("x-gpa-tag", &tag)]));
        assert_eq!(reply.status(), 400, "{target}: {}", reply.brief());
        assert!(!e.host_saw(&tag), "{target} reached the host");
        let audited = e.eventually(Duration::from_secs(3), "audit record of the refused target", || {
            e.agent.audit().into_iter().rev().find(|r| r["decision"].as_str() == Some(why))
        });
        assert_eq!(audited["status"].as_u64(), Some(400), "{audited}");
        notes.push(format!("{target} → 400 {why}"));
    }
    // What real clients send still works.
    assert_eq!(e.raw1(root(&e.cg), Raw::get("/metadata/instance?api-version=2021-02-01", &[])).status(), 200);
    run.pass("ADV-targets", notes.join("; "));
    e.check_oracle();
}

// ---- the upstream side of the data path (issue 16's attack on the rewritten connection) ---

/// One skip-listed request whose chunked body ends a trailer line with a bare LF and goes on
/// with a second request in bare-LF lines: a host that ends lines at a bare LF (RFC 9112 §2.2
/// allows it) would read that second request, unsigned, never authorized, with the claims the
/// attacker wrote. argv: host port method target tag. Prints the answer's status line.
const SMUGGLE: &str = r#"
import socket, sys
host, port, method, target, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
inner = (b"POST /machine?comp=health HTTP/1.1\nHost: 168.63.129.16\nx-ms-version: 2012-11-30\n"
         b"x-ms-azure-host-claims: { \"isRoot\": \"true\"}\nContent-Length: 2\nx-gpa-tag: " + tag.encode() + b"\n")
req = (method.encode() + b" " + target.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
       b"4\r\nabcd\r\n0\r\nX: a\n\n" + inner + b"\r\n\r\n")
s = socket.create_connection((host, port), timeout=5)
s.sendall(req)
data = b""
try:
    while True:
        d = s.recv(65536)
        if not d: break
        data += d
except OSError:
    pass
print(data.split(b"\r\n")[0].decode() if data else "closed")
"#;

#[test]
fn a_streamed_body_cannot_smuggle_a_request_past_the_agent() {
    let run = begin!("a_streamed_body_cannot_smuggle_a_request_past_the_agent");
    let e = Env::new("advsmug");
    let mut notes = Vec::new();
    for (who, name) in [(nobody(&e.cg), "65534"), (root(&e.cg), "root")] {
        for (host, port, method, target) in [
            (WS_IP, "80", "POST", "/machine/?comp=telemetrydata"),
            (WS_IP, "32526", "PUT", "/vmAgentLog"),
            // Not skip-listed on IMDS (the reference streams them there too, unsigned).
            (IMDS_IP, "80", "PUT", "/vmAgentLog"),
            (IMDS_IP, "80", "POST", "/machine/?comp=telemetrydata"),
        ] {
            let tag = e.tag("smuggled");
            let out = client(&e.ns, who, &[PYTHON, "-c", SMUGGLE, host, port, method, target, &tag]);
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            std::thread::sleep(Duration::from_millis(300));
            assert!(!e.host_saw(&tag), "{name} {method} {host}:{port}{target} smuggled a request ({answer})");
            assert!(answer.starts_with("HTTP/1.1 4"), "{name} {method} {host}:{port}{target}: {answer}");
            notes.push(format!("{name} {method} :{port}{target} → {answer}"));
        }
    }
    run.pass("ADV-smuggle", notes.join("; "));
    e.check_oracle();
}

/// An IMDS stand-in on 169.254.169.254:81 that answers the first request on a connection and
/// reads the second, then closes without an answer (a host that acted on it and dropped the
/// connection). Logs every request it read to argv[1].
const EAT_UPSTREAM: &str = r#"
import socket, sys, threading
log = sys.argv[1]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("169.254.169.254", 81)); s.listen(16)
lock = threading.Lock()
def serve(c):
    n, buf = 0, b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d: c.close(); return
                buf += d
            head, _, buf = buf.partition(b"\r\n\r\n")
            cl = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length": cl = int(v.strip())
            while len(buf) < cl:
                buf += c.recv(65536)
            body, buf = buf[:cl], buf[cl:]
            with lock:
                open(log, "a").write(head.split(b"\r\n")[0].decode() + " " + body.decode() + "\n")
            n += 1
            if n == 2:
                c.close(); return
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    except OSError:
        pass
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

#[test]
fn a_request_the_host_may_have_acted_on_is_not_sent_twice() {
    let run = begin!("a_request_the_host_may_have_acted_on_is_not_sent_twice");
    let w = World::new("adveat");
    let log = w.dir.join("eaten.log");
    let up = w.ns.command(PYTHON).args(["-c", EAT_UPSTREAM, log.to_str().expect("utf-8")]).spawn().expect("upstream");
    let _up = gpa_system_tests::harness::Proc { child: up };
    std::thread::sleep(Duration::from_millis(400));
    let e = w.ready(&["\"imdsAddress\":\"169.254.169.254:81\""]);
    let mut notes = Vec::new();
    // A POST the host read and dropped: `502`, read once. A GET: sent again, answered.
    for (round, method, body, want_status, want_reads) in
        [(1, "POST", "PAYMENT-ONCE", "502", 1), (2, "GET", "", "200", 2)]
    {
        let code = format!(
            "import http.client\nc = http.client.HTTPConnection('169.254.169.254', 81, timeout=10)\nout = []\n\
             for m, b, q in (('GET', None, 'first'), ('{method}', {body:?}.encode() or None, 'second')):\n    \
             c.request(m, '/metadata/instance?api-version=2021-02-01&r={round}&' + q, body=b, headers={{'Metadata': 'true'}})\n    \
             r = c.getresponse(); r.read(); out.append(str(r.status))\nprint(' '.join(out))"
        );
        let out = client(&e.ns, root(&e.cg), &[PYTHON, "-c", &code]);
        let statuses = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(statuses, format!("200 {want_status}"), "{method}: {}", String::from_utf8_lossy(&out.stderr));
        let seen = fs::read_to_string(&log).unwrap_or_default();
        let reads = seen.matches(&format!("r={round}&second")).count();
        assert_eq!(reads, want_reads, "{method} read by the host: {seen}");
        notes.push(format!("{method} → {statuses}, read by the host {reads}×"));
    }
    run.pass("ADV-resend", notes.join("; "));
    drop(e);
}
