// SPDX-License-Identifier: MIT
//! Catalog E (key keeper / provisioning) and F1/F3 (local state): key and log files are private
//! and tampered keys are refused (E1, B3, E2, E5, F1, F3, local faults); a read-only or full
//! state directory fails closed (E3).

use super::*;

// ---- E1, B3, E2, E5, F1, F3, local faults ------------------------------------------------------

#[test]
fn key_and_log_files_are_private_and_tampered_keys_are_refused() {
    let run = begin!("key_and_log_files_are_private_and_tampered_keys_are_refused");
    let w = World::new("keys");
    let base = TempDir::new("keys-base");
    let start = |w: &World| {
        let agent = Agent::start_in(&w.ns, &w.cg, &base.0, &[FAST_POLL]);
        agent.wait_ready(&w.ns);
        agent
    };
    let stats = |w: &World| w.host.get(&w.ns, "/stats");
    let keys_dir = base.0.join("state/keys");
    let key_file = |guid: &str| keys_dir.join(format!("{guid}.key"));
    let legit_guid = |w: &World, agent: &Agent| -> String {
        let tag = format!("keys-legit-{}", stats(w)["statusCalls"]);
        let (status, text) = curl(&w.ns, root(&w.cg), &["-H", "Metadata: true", "-H", &tagged(&tag), IMDS]);
        assert_eq!(status, 200, "{text}\n{}", tail(&agent.log()));
        let rec = w.host.requests(&w.ns).into_iter().rev().find(|r| r.to_string().contains(&tag)).expect("record");
        assert_eq!(rec["signature"], "valid", "{rec}");
        rec["keyGuid"].as_str().expect("guid").to_owned()
    };

    let mut agent = start(&w);
    let g1 = stats(&w)["currentKeyGuid"].as_str().expect("g1").to_owned();
    assert_eq!(legit_guid(&w, &agent), g1);

    // E1 / B3: modes and owners.
    let dir_meta = fs::symlink_metadata(&keys_dir).expect("keys dir");
    let file_meta = fs::symlink_metadata(key_file(&g1)).expect("key file");
    assert!(dir_meta.is_dir() && file_meta.is_file());
    assert_eq!((dir_meta.uid(), dir_meta.mode() & 0o777), (0, 0o700), "keys dir");
    assert_eq!((file_meta.uid(), file_meta.mode() & 0o777), (0, 0o600), "key file");
    let audit_meta = fs::metadata(agent.log_dir.join("audit.ndjson")).expect("audit file");
    assert_eq!(audit_meta.mode() & 0o007, 0, "audit file not world-accessible: {:o}", audit_meta.mode());
    let log_meta = fs::metadata(&agent.log_dir).expect("log dir");
    assert_eq!(log_meta.mode() & 0o022, 0, "log dir not group/world-writable: {:o}", log_meta.mode());
    let out =
        client(&w.ns, As { ids: Some((65534, 65534)), cgroup: None }, &["cat", key_file(&g1).to_str().expect("utf-8")]);
    assert!(!out.status.success() && out.stdout.is_empty(), "uid 65534 read the key file");
    run.pass(
        "E1",
        format!(
            "keys dir 0700 root, key file 0600 root, audit.ndjson {:o}, log dir {:o}",
            audit_meta.mode() & 0o777,
            log_meta.mode() & 0o777
        ),
    );
    run.pass("B3", "uid 65534: cat <keys>/<guid>.key → permission denied");

    // E5: the host rotates to G2; then G2's file is rolled back to G1's content.
    w.control(&json!({"forgetAttestedKey": true}));
    let g2 = eventually(Duration::from_secs(10), "a second key", || {
        stats(&w)["currentKeyGuid"].as_str().filter(|g| *g != g1).map(str::to_owned)
    });
    // The agent switches to a key in the turn its attestation succeeds, which is when the host
    // makes it current.
    assert_eq!(legit_guid(&w, &agent), g2);
    drop(agent);
    let g1_bytes = fs::read(key_file(&g1)).expect("g1 key");
    fs::write(key_file(&g2), &g1_bytes).expect("roll back");
    let acquired = stats(&w)["acquireCalls"].as_u64().unwrap_or(0);
    let log_len = fs::read_to_string(base.0.join("agent.stderr")).unwrap_or_default().len();
    agent = start(&w);
    let g3 = stats(&w)["currentKeyGuid"].as_str().expect("g3").to_owned();
    assert!(![&g1, &g2].contains(&&g3), "a fresh key after the rolled-back file");
    assert_eq!(stats(&w)["acquireCalls"].as_u64(), Some(acquired + 1));
    assert!(!agent.log()[log_len..].contains("Found key details from local"), "the rolled-back file was used");
    assert_eq!(legit_guid(&w, &agent), g3);
    run.pass("E5", "status reports G2, G2's file holds G1: refused, G3 acquired and used, G1 never signed again");

    // Truncated key file: refused, re-acquired.
    drop(agent);
    fs::write(key_file(&g3), &fs::read(key_file(&g3)).expect("g3")[..10]).expect("truncate");
    let log_len = fs::read_to_string(base.0.join("agent.stderr")).unwrap_or_default().len();
    agent = start(&w);
    let g4 = stats(&w)["currentKeyGuid"].as_str().expect("g4").to_owned();
    assert_ne!(g4, g3);
    assert!(!agent.log()[log_len..].contains("Found key details from local"));
    assert_eq!(legit_guid(&w, &agent), g4);
    run.pass("X-localfaults", "truncated key file → refused, new key latched (deleted / symlinked / rolled-back: E2, E5; read-only / full: E3; SIGKILL under load: lifetime.rs)");

    // E2 + F3: a symlink planted at the key path and one at the audit file path.
    drop(agent);
    let stolen = w.dir.0.join("stolen.key");
    fs::rename(key_file(&g4), &stolen).expect("move key");
    std::os::unix::fs::symlink(&stolen, key_file(&g4)).expect("plant key symlink");
    let victim = w.dir.0.join("victim");
    fs::write(&victim, "victim\n").expect("victim");
    let audit_path = base.0.join("log/audit.ndjson");
    fs::rename(&audit_path, w.dir.0.join("audit.old")).expect("move audit");
    std::os::unix::fs::symlink(&victim, &audit_path).expect("plant audit symlink");
    let stolen_before = fs::read(&stolen).expect("stolen");
    let log_len = fs::read_to_string(base.0.join("agent.stderr")).unwrap_or_default().len();
    agent = start(&w);
    let g5 = stats(&w)["currentKeyGuid"].as_str().expect("g5").to_owned();
    assert_ne!(g5, g4, "the symlinked key file must not be loaded");
    assert!(!agent.log()[log_len..].contains("Found key details from local"));
    assert_eq!(legit_guid(&w, &agent), g5);
    assert_eq!(fs::read(&stolen).expect("stolen"), stolen_before, "the symlink target was modified");
    assert_eq!(
        fs::read_to_string(&victim).expect("victim"),
        "victim\n",
        "the audit log wrote through a planted symlink"
    );
    run.pass("F3", "symlink planted at audit.ndjson before start: never written through (victim unchanged); rotation over planted symlinks: audit/tests.rs::rotation_keeps_the_chain_and_deletes_old_files");

    // F1: nothing readable by others holds a key or a signature.
    let keys: Vec<String> = w
        .host
        .get(&w.ns, "/keys")
        .as_object()
        .expect("keys")
        .values()
        .filter_map(|v| v.as_str().map(str::to_ascii_lowercase))
        .collect();
    let signatures: Vec<String> = w
        .host
        .requests(&w.ns)
        .iter()
        .flat_map(|r| header_values(r, "x-ms-azure-host-authorization"))
        .filter_map(|v| v.split(' ').nth(2).map(str::to_ascii_lowercase))
        .collect();
    assert!(keys.len() >= 5 && !signatures.is_empty());
    let mut scanned = Vec::new();
    let mut stack = vec![base.0.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read dir").filter_map(Result::ok) {
            let meta = fs::symlink_metadata(entry.path()).expect("meta");
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && (meta.mode() & 0o044 != 0 || entry.file_name() == "agent.stderr") {
                scanned.push(entry.path());
            }
        }
    }
    let status_doc = {
        let (status, text) =
            curl(&w.ns, root(&w.cg), &["-H", "Metadata: true", "http://168.63.129.16/gpa-aggregated-status"]);
        assert_eq!(status, 200);
        text
    };
    let mut texts: Vec<(String, String)> = scanned
        .iter()
        .map(|p| {
            (p.display().to_string(), String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).to_ascii_lowercase())
        })
        .collect();
    texts.push(("/gpa-aggregated-status".to_owned(), status_doc.to_ascii_lowercase()));
    let guids: Vec<String> = w
        .host
        .get(&w.ns, "/keys")
        .as_object()
        .expect("keys")
        .keys()
        .map(|g| format!("azure-hmac-sha256 {}", g.to_ascii_lowercase()))
        .collect();
    for (name, text) in &texts {
        for k in &keys {
            assert!(!text.contains(k.as_str()), "{name} contains a key");
        }
        for s in &signatures {
            assert!(!text.contains(s.as_str()), "{name} contains a signature");
        }
        for g in &guids {
            assert!(!text.contains(g.as_str()), "{name} contains an authorization header value");
        }
    }
    run.pass("F1", format!("{} files readable by group/others (incl. the agent's debug log) and /gpa-aggregated-status: none of {} keys or {} signatures", texts.len() - 1, keys.len(), signatures.len()));
    run.pass("W6", "see F1: the debug-level agent log holds no signature");

    // E2: the keys directory replaced by a symlink: nothing written through it, fail closed.
    drop(agent);
    w.control(&json!({"forgetAttestedKey": true}));
    let attacker = w.dir.0.join("attacker");
    fs::create_dir(&attacker).expect("attacker dir");
    fs::set_permissions(&attacker, fs::Permissions::from_mode(0o700)).expect("chmod");
    fs::rename(&keys_dir, base.0.join("state/keys.moved")).expect("move keys");
    std::os::unix::fs::symlink(&attacker, &keys_dir).expect("plant dir symlink");
    let acquired = stats(&w)["acquireCalls"].as_u64().unwrap_or(0);
    let agent = Agent::start_in(&w.ns, &w.cg, &base.0, &[FAST_POLL]);
    eventually(Duration::from_secs(10), "acquire attempts", || {
        (stats(&w)["acquireCalls"].as_u64().unwrap_or(0) >= acquired + 2).then_some(())
    });
    assert_eq!(
        fs::read_dir(&attacker).expect("attacker").count(),
        0,
        "a key was written through the symlinked keys dir"
    );
    let (status, body) =
        http(&w.ns, "127.0.0.1:3080".parse().expect("addr"), "GET", "/provision", &[("Metadata", "true")], b"");
    let body = String::from_utf8_lossy(&body);
    assert!(status == 200 && body.contains("\"finished\":false"), "not ready: {body}");
    let tag = "keys-dirlink";
    let (status, text) = curl(&w.ns, root(&w.cg), &["-H", "Metadata: true", "-H", &bypass(tag), IMDS]);
    assert!(status == 401 && !text.contains(MARKER), "not redirected, refused by the host: {text}");
    run.pass("E2", "symlink at <keys>/<guid>.key: not loaded (new key), target unchanged; keys dir replaced by a symlink: nothing written through it, agent not ready, callers refused by the host (401)");
    drop(agent);
    w.check_oracle();
}

// ---- E3 ----------------------------------------------------------------------------------------

#[test]
fn read_only_or_full_state_fails_closed() {
    let run = begin!("read_only_or_full_state_fails_closed");
    let w = World::new("state");
    let base = TempDir::new("state-base");
    let state = SmallFs::new(&base.0.join("state"), "64k");
    let remount = |opts: &str| {
        let out = Command::new("mount").args(["-o", &format!("remount,{opts}")]).arg(&state.0).output().expect("mount");
        assert!(out.status.success(), "remount {opts}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let provision = |w: &World, notify: bool| {
        let mut headers = vec![("Metadata", "true")];
        if notify {
            headers.push(("x-ms-azure-notify", "1"));
        }
        let (_, body) = http(&w.ns, "127.0.0.1:3080".parse().expect("addr"), "GET", "/provision", &headers, b"");
        String::from_utf8_lossy(&body).into_owned()
    };
    let refused_by_host = |w: &World, tag: &str| {
        let (status, text) = curl(&w.ns, root(&w.cg), &["-H", "Metadata: true", "-H", &bypass(tag), IMDS]);
        assert!(
            status == 401 && !text.contains(MARKER),
            "{tag}: not redirected, the host refuses the unsigned call: {text}"
        );
    };
    // Until the agent recovers, a probe goes around it (not redirected) and the host refuses it:
    // probes are tagged as deliberate bypasses for the oracle.
    let serves = |w: &World, tag: &str| {
        let (status, text) = curl(&w.ns, root(&w.cg), &["-H", "Metadata: true", "-H", &bypass(tag), IMDS]);
        status == 200 && text.contains(MARKER)
    };

    // Read-only state.
    remount("ro");
    let agent = Agent::start_in(&w.ns, &w.cg, &base.0, &[FAST_POLL]);
    eventually(Duration::from_secs(10), "a failed key save", || {
        agent.log().contains("Failed to save key details").then_some(())
    });
    assert!(provision(&w, false).contains("\"finished\":false"));
    refused_by_host(&w, "e3-ro");
    remount("rw");
    eventually(Duration::from_secs(15), "recovery once writable", || {
        provision(&w, true);
        serves(&w, "e3-ro-ok").then_some(())
    });
    drop(agent);

    // Full state: a fresh key is needed and cannot be saved.
    w.control(&json!({"forgetAttestedKey": true}));
    for entry in fs::read_dir(state.0.join("keys")).expect("keys").filter_map(Result::ok) {
        fs::remove_file(entry.path()).expect("remove key");
    }
    let filler = state.0.join("filler");
    {
        use std::io::Write as _;
        let mut f = fs::File::create(&filler).expect("filler");
        let chunk = [0u8; 4096];
        for _ in 0..64 {
            if f.write_all(&chunk).and_then(|()| f.sync_all()).is_err() {
                break;
            }
        }
    }
    let log_len = agent_log_len(&base.0);
    let agent = Agent::start_in(&w.ns, &w.cg, &base.0, &[FAST_POLL]);
    eventually(Duration::from_secs(10), "a failed key save on a full disk", || {
        agent.log()[log_len..].contains("Failed to save key details").then_some(())
    });
    assert!(provision(&w, false).contains("\"finished\":false"));
    refused_by_host(&w, "e3-full");
    fs::remove_file(&filler).expect("free space");
    eventually(Duration::from_secs(15), "recovery once space is free", || {
        provision(&w, true);
        serves(&w, "e3-full-ok").then_some(())
    });
    drop(agent);
    run.pass("E3", "state on a read-only tmpfs, then a full one: key not saved → not ready, not redirected, callers refused by the host 401; served signed once writable again");
    w.check_oracle();
    drop(state);
}
