// SPDX-License-Identifier: MIT
//! Catalog D (rule engine) and the rule sources: equivalent URLs, addresses and names get one
//! decision (D1/P4/S20, C7, D2/S9, D3/S19); host rules apply per request and fail closed (D4, D5,
//! S2, S10, S11, host faults); a rules file writable by a non-root user is not trusted (F4).

use super::*;

// ---- D1/P4/S20, C7, D2/S9, D3/S19 --------------------------------------------------------------

#[test]
fn equivalent_urls_addresses_and_names_get_one_decision() {
    let run = begin!("equivalent_urls_addresses_and_names_get_one_decision");
    let w = World::new("urls");
    let homoglyph = "r\u{43e}\u{43e}t"; // Cyrillic о (U+043E) twice
    let item = imds_item(
        "urls-1",
        "deny",
        &[
            ("token", "/metadata/identity/oauth2/token", &[("curl-exe", json!({"exePath": "/usr/bin/curl"}))]),
            ("network", "/metadata/instance/network", &[("root-user", json!({"userName": "root"}))]),
            (
                "compute",
                "/metadata/instance/compute",
                &[
                    ("homoglyph-user", json!({"userName": homoglyph})),
                    ("case-user", json!({"userName": "Root"})),
                    ("homoglyph-group", json!({"groupName": homoglyph})),
                ],
            ),
        ],
    );
    w.control(&json!({"rules": rules_with_imds(item)}));
    let e = w.ready(&[]);

    // Positive control: the allowlisted curl gets the token.
    let (status, text) = e.curl(root(&e.cg), &["-H", "Metadata: true", TOKEN_URL]);
    assert!(status == 200 && text.contains("access_token"), "curl is allowlisted for the token: {text}");

    // D1 / phase 4: twelve spellings of the token URL from python (not allowlisted).
    let q = "?resource=https://management.azure.com/";
    let variants: Vec<(&str, String)> = vec![
        ("canonical", format!("/metadata/identity/oauth2/token{q}")),
        ("%2F", format!("/metadata/identity/oauth2%2Ftoken{q}")),
        ("%2f", format!("/metadata/identity/oauth2%2ftoken{q}")),
        ("%252F", format!("/metadata/identity/oauth2%252Ftoken{q}")),
        ("trailing ./", format!("/metadata/identity/oauth2/token/./{q}")),
        ("dot segments", format!("/metadata/identity/../identity/oauth2/token{q}")),
        ("encoded dots", format!("/metadata/identity/%2e%2e/identity/oauth2/token{q}")),
        (";x=1", format!("/metadata/identity/oauth2/token;x=1{q}")),
        ("mixed case", format!("/Metadata/IDENTITY/OAuth2/Token{q}")),
        ("extra slashes", format!("//metadata///identity/oauth2//token{q}")),
        ("#fragment", format!("/metadata/identity/oauth2/token{q}#fragment")),
        ("dotless \u{131}", format!("/metadata/\u{131}dentity/oauth2/token{q}")),
    ];
    let reqs: Vec<Raw> = variants
        .iter()
        .enumerate()
        .map(|(i, (_, target))| {
            Raw::bytes([format!("GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nx-gpa-tag: d1-{i}-\r\nConnection: close\r\n\r\n").into_bytes()].concat())
        })
        .collect();
    let replies = e.raw(root(&e.cg), &reqs);
    let mut seen = Vec::new();
    for (i, ((name, _), reply)) in variants.iter().zip(&replies).enumerate() {
        assert!(matches!(reply.status(), 400 | 403), "variant {name}: {}", reply.brief());
        assert!(!reply.text().contains("access_token"), "variant {name} got a token");
        assert!(!e.host_saw(&format!("d1-{i}-")), "variant {name} reached the host");
        seen.push(format!("{name}:{}", reply.status()));
    }
    run.pass("D1", format!("12 variants from python: {}", seen.join(" ")));
    run.pass(
        "P4",
        "see D1: all twelve spellings get the same (deny) decision; the allowlisted curl gets the canonical one",
    );
    run.pass("S20", "see D1 (token path denied across equivalent forms, default deny)");
    run.pass("S6", "see D1: %2F, %2f, %252F, ./../, //…///, encoded dots all refused");

    // C7: alternate address forms are redirected and get the canonical decision.
    let forms = [
        "2852039166",
        "0xa9fea9fe",
        "169.254.43518",
        "0251.0376.0251.0376",
        "[::ffff:169.254.169.254]",
        "[::ffff:a9fe:a9fe]",
    ];
    for form in forms {
        let tag = e.tag("c7");
        let (status, text) = e.curl(
            root(&e.cg),
            &["-g", "-H", "Metadata: true", "-H", &tagged(&tag), &format!("http://{form}/metadata/instance/network")],
        );
        assert!(status == 200 && text.contains(MARKER), "{form}: allowed path through the proxy: {text}");
        assert_eq!(e.record(&tag)["signature"], "valid", "{form}");
        let host = form.trim_start_matches('[').trim_end_matches(']');
        let reply = e.raw1(root(&e.cg), Raw::get(TOKEN, &[]).to(host, 80));
        assert_eq!(reply.status(), 403, "{form}: the token stays denied to python: {}", reply.brief());
        assert_eq!(
            reply.peer,
            if host.contains(':') { "::ffff:127.0.0.1:3080" } else { "127.0.0.1:3080" },
            "{form}: redirected"
        );
    }
    run.pass(
        "C7",
        format!("{}: /network 200 signed, token 403, peer = the proxy — same as 169.254.169.254", forms.join(", ")),
    );

    // D2 / S9: a symlink runs the real binary (allowed, recorded as the resolved path); a copy
    // elsewhere is another executable (denied).
    let bin = e.dir.0.join("bin");
    fs::create_dir_all(&bin).expect("bin dir");
    std::os::unix::fs::symlink("/usr/bin/curl", bin.join("curl")).expect("symlink");
    fs::copy("/usr/bin/curl", bin.join("curl-copy")).expect("copy");
    let link = bin.join("curl");
    let copy = bin.join("curl-copy");
    let (pid, status, text) = run_with_pid(
        &e.ns,
        root(&e.cg),
        &[link.to_str().expect("utf-8"), "-s", "-i", "-H", "Metadata: true", TOKEN_URL],
    );
    assert_eq!(status, 200, "symlink to the allowed curl: {text}");
    let rec = e.eventually(Duration::from_secs(3), "audit record", || e.audit_for(pid).pop());
    assert_eq!(rec["exe"], "/usr/bin/curl", "{rec}");
    let (pid, status, text) = run_with_pid(
        &e.ns,
        root(&e.cg),
        &[copy.to_str().expect("utf-8"), "-s", "-i", "-H", "Metadata: true", TOKEN_URL],
    );
    assert_eq!(status, 403, "a copy of curl elsewhere: {text}");
    let rec = e.eventually(Duration::from_secs(3), "audit record", || e.audit_for(pid).pop());
    assert_eq!(rec["exe"].as_str(), copy.to_str(), "{rec}");
    run.pass(
        "D2",
        "symlink → /usr/bin/curl: 200, audit exe /usr/bin/curl; copy of curl: 403, audit exe = the copy's path",
    );
    run.pass("S9", "see D2: exePath identity matches the real /usr/bin/curl only (python denied in D1)");

    // D3 / S19: homoglyph and case variants of root do not match root.
    assert_eq!(
        root_status(&e, "http://169.254.169.254/metadata/instance/compute"),
        403,
        "Cyrillic/case variants of root must not match"
    );
    assert_eq!(
        root_status(&e, "http://169.254.169.254/metadata/instance/network"),
        200,
        "control: userName root matches"
    );
    run.pass("D3", "identities userName \"rооt\" (Cyrillic), \"Root\", groupName \"rооt\": root denied; userName \"root\": allowed");
    run.pass("S19", "see D3 (byte-exact identity comparison)");
    e.check_oracle();
}

// ---- D4, D5, S2, S10, S11, host faults ---------------------------------------------------------

#[test]
fn host_rules_apply_per_request_and_bad_rules_or_host_faults_fail_closed() {
    let run = begin!("host_rules_apply_per_request_and_bad_rules_or_host_faults_fail_closed");
    let trusted_only = || {
        imds_item(
            "rules-good",
            "allow",
            &[("token", "/metadata/identity/oauth2/token", &[("trusted", json!({"userName": "gpa-trusted"}))])],
        )
    };
    let w = World::new("rules");
    w.control(&json!({"rules": rules_with_imds(trusted_only())}));
    let e = w.ready(&[]);
    let instance = "http://169.254.169.254/metadata/instance/compute";
    assert_eq!(root_status(&e, instance), 200);
    assert_eq!(root_status(&e, TOKEN_URL), 403);

    // D5: a kept-alive connection gets each request decided against the rules of that moment.
    let step = e.dir.0.join("d5-step");
    let go = e.dir.0.join("d5-go");
    let keep_alive = "import http.client,os,sys,time\n\
        c=http.client.HTTPConnection('169.254.169.254',80,timeout=10)\n\
        c.request('GET','/metadata/instance/compute',headers={'Metadata':'true'})\n\
        r=c.getresponse(); r.read(); print(r.status, flush=True)\n\
        open(sys.argv[1],'w').write('1')\n\
        end=time.time()+20\n\
        while not os.path.exists(sys.argv[2]) and time.time()<end: time.sleep(0.05)\n\
        c.request('GET','/metadata/instance/compute',headers={'Metadata':'true'})\n\
        r=c.getresponse(); r.read(); print(r.status, flush=True)\n";
    let (out, deny_all_seen) = std::thread::scope(|s| {
        let client = s
            .spawn(|| e.python(root(&e.cg), keep_alive, &[step.to_str().expect("utf-8"), go.to_str().expect("utf-8")]));
        e.eventually(Duration::from_secs(10), "the first keep-alive request", || step.exists().then_some(()));
        // S2: enforce + deny with no rules.
        apply_rules(
            &e,
            json!({"defaultAccess": "deny", "mode": "enforce", "id": "deny-all", "rules": null}),
            "deny-all applied",
            || root_status(&e, instance) == 403,
        );
        fs::write(&go, "1").expect("go");
        (client.join().expect("client"), root_status(&e, IMDS))
    });
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["200", "403"], "same connection, rules changed in between");
    run.pass(
        "D5",
        "keep-alive connection: request 1 → 200; host switches to deny; request 2 on the same connection → 403",
    );
    assert_eq!(deny_all_seen, 403);
    let (ws, _) = e.curl(root(&e.cg), &["-H", "x-ms-version: 2012-11-30", GOAL_STATE]);
    assert_eq!(ws, 200, "the WireServer item is unaffected");
    run.pass("S2", "IMDS enforce + defaultAccess deny + no rules: /metadata/instance and /compute 403 for root (WireServer unaffected)");

    // D4: malformed rules close their endpoint; an over-size document is refused whole.
    apply_rules(&e, trusted_only(), "good rules back", || root_status(&e, instance) == 200);
    let polls = |e: &Env| e.stats()["statusCalls"].as_u64().unwrap_or(0);
    let wrong_types = json!({"defaultAccess": "allow", "mode": "enforce", "id": "bad-types", "rules": {"privileges": "not-an-array", "roles": 7, "identities": {}, "roleAssignments": null}});
    let huge_privileges: Vec<Value> = (0..3000).map(|i| json!({"name": format!("p{i}"), "path": format!("/metadata/identity/oauth2/token/{i}/{}", "x".repeat(64))})).collect();
    let huge = json!({"defaultAccess": "allow", "mode": "enforce", "id": "huge", "rules": {"privileges": huge_privileges, "roles": [], "identities": [], "roleAssignments": []}});
    // Waits until the agent polled again, and lets it digest the answer. Failed polls back off
    // (×2 each, up to ×8), hence the generous limit.
    let next_poll = |e: &Env, what: &str| {
        let before = polls(e);
        e.eventually(Duration::from_secs(20), what, || (polls(e) > before).then_some(()));
        std::thread::sleep(Duration::from_millis(400));
    };
    // A rule set the agent cannot take (wrong types) closes its endpoint only (issue 14): the
    // document applies, IMDS allows nothing, the WireServer keeps its rules.
    e.control(&json!({"rules": rules_with_imds(wrong_types)}));
    next_poll(&e, "wrong types");
    assert_eq!(root_status(&e, TOKEN_URL), 403, "wrong types: the token must stay denied");
    assert_eq!(root_status(&e, instance), 403, "wrong types: IMDS is closed, not left open");
    let (ws, _) = e.curl(root(&e.cg), &["-H", "x-ms-version: 2012-11-30", GOAL_STATE]);
    assert_eq!(ws, 200, "wrong types: the WireServer keeps its rules");
    assert!(e.agent.log().contains("rules refused: endpoint=imds"), "{}", tail(&e.agent.log()));
    // A document over the size limit is refused whole: the last good rules stay.
    apply_rules(&e, trusted_only(), "good rules back", || root_status(&e, instance) == 200);
    e.control(&json!({"rules": rules_with_imds(huge)}));
    next_poll(&e, "over-size");
    assert_eq!(root_status(&e, TOKEN_URL), 403, "over-size: the token must stay denied");
    assert_eq!(root_status(&e, instance), 200, "over-size: the last good rules are kept");
    assert!(
        e.agent.log().contains("Failed to get key status"),
        "the over-size document was refused:\n{}",
        tail(&e.agent.log())
    );
    run.pass(
        "D4",
        "wrong-typed IMDS rules: IMDS closed (token and /compute 403), WireServer 200, `rules refused` logged; over-size (~300 KiB) document refused whole, last good rules kept (token 403, /compute 200)",
    );

    // Host faults: slower than the agent's timeout, malformed JSON as text/plain, 500.
    e.control(&json!({"rules": rules_with_imds(trusted_only())}));
    next_poll(&e, "a good poll (resets the backoff)");
    for (what, patch) in [
        ("status slower than hostTimeoutMs", json!({"statusDelayMs": 2500})),
        (
            "malformed status as text/plain",
            json!({"statusDelayMs": 0, "malformedStatus": true, "statusContentType": "text/plain"}),
        ),
        ("status HTTP 500", json!({"malformedStatus": false, "statusContentType": null, "statusHttpStatus": 500})),
    ] {
        e.control(&patch);
        next_poll(&e, what);
        assert!(e.legit(), "{what}: a legitimate caller is served with the last good state\n{}", tail(&e.agent.log()));
        assert_eq!(root_status(&e, TOKEN_URL), 403, "{what}");
    }
    e.control(&json!({"statusHttpStatus": 0}));
    next_poll(&e, "a good poll after the faults");
    run.pass("X-hostfaults", "status slower than the timeout, malformed JSON as text/plain, HTTP 500: proxy keeps serving signed with the last good state, token stays denied");

    // S10 / S11: customer local rules (descriptor id with useLocalFileRules).
    let descriptor = "eyJpZCI6ImxvY2FsIiwidXNlTG9jYWxGaWxlUnVsZXMiOnRydWV9"; // {"id":"local","useLocalFileRules":true}
    let rules_dir = e.agent.state_dir.join("rules");
    fs::create_dir_all(&rules_dir).expect("rules dir");
    fs::set_permissions(&rules_dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    let file = rules_dir.join("IMDS_Rules.json");
    fs::write(&file, "{\"defaultAccess\": \"allow\", \"rules\": ").expect("rules file");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut item = trusted_only();
    item["id"] = json!(descriptor);
    apply_rules(&e, item, "malformed local file fails closed", || root_status(&e, instance) == 403);
    assert_eq!(root_status(&e, TOKEN_URL), 403);
    run.pass("S10", "malformed IMDS_Rules.json: IMDS fails closed (defaultAccess deny, rules dropped): /compute 403");
    let local = json!({"defaultAccess": "allow", "rules": {"privileges": [{"name": "t", "path": "/metadata/identity/oauth2/token"}], "roles": [{"name": "r", "privileges": ["t"]}], "identities": [{"name": "i", "userName": "gpa-trusted"}], "roleAssignments": [{"role": "r", "identities": ["i"]}]}});
    fs::write(&file, [b"\xEF\xBB\xBF".to_vec(), local.to_string().into_bytes()].concat()).expect("rules file");
    e.eventually(Duration::from_secs(10), "the BOM file applied", || (root_status(&e, instance) == 200).then_some(()));
    assert_eq!(root_status(&e, TOKEN_URL), 403, "BOM file still enforced");
    run.pass("S11", "IMDS_Rules.json with a UTF-8 BOM: applied (/compute 200) and enforced (token 403)");
    e.check_oracle();
}

#[test]
fn a_rules_file_writable_by_a_non_root_user_is_not_trusted() {
    let run = begin!("a_rules_file_writable_by_a_non_root_user_is_not_trusted");
    let w = World::new("rulesdir");
    let mut item = imds_item(
        "x",
        "allow",
        &[("token", "/metadata/identity/oauth2/token", &[("trusted", json!({"userName": "gpa-trusted"}))])],
    );
    item["id"] = json!("eyJpZCI6ImxvY2FsIiwidXNlTG9jYWxGaWxlUnVsZXMiOnRydWV9");
    w.control(&json!({"rules": rules_with_imds(item)}));
    let e = w.ready(&[]);
    // Misprovisioned: the folder exists world-writable (the agent should have made it 0700
    // root on start, MSP §2.1); uid 65534 writes a file granting itself the token.
    let rules_dir = e.agent.state_dir.join("rules");
    let created_by_agent = rules_dir.is_dir();
    fs::create_dir_all(&rules_dir).expect("rules dir");
    fs::set_permissions(&rules_dir, fs::Permissions::from_mode(0o777)).expect("chmod");
    fs::set_permissions(&e.agent.state_dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    let grant = r#"{"defaultAccess":"allow","rules":{"privileges":[{"name":"t","path":"/metadata/identity/oauth2/token"}],"roles":[{"name":"r","privileges":["t"]}],"identities":[{"name":"me","userName":"nobody"}],"roleAssignments":[{"role":"r","identities":["me"]}]}}"#;
    let file = rules_dir.join("IMDS_Rules.json");
    let out = client(
        &e.ns,
        As { ids: Some((65534, 65534)), cgroup: None },
        &["sh", "-c", &format!("umask 022; printf '%s' '{grant}' > {}", file.display())],
    );
    assert!(out.status.success());
    std::thread::sleep(Duration::from_secs(3));
    let (status, _) = e.curl(nobody(&e.cg), &["-H", "Metadata: true", TOKEN_URL]);
    assert_eq!(status, 403, "uid 65534 granted itself the token through a rules file it owns");
    assert!(created_by_agent, "MSP §2.1: the agent creates the rules folder (0700 root) on start");
    run.pass("F4", "rules folder 0700 root; a rules file owned by another uid is refused");
    e.check_oracle();
}
