// SPDX-License-Identifier: MIT
//! Catalog B (authN forgery), B2: a captured signature replays only verbatim; any change to
//! the request is refused by the host.

use super::*;

// ---- B2 ----------------------------------------------------------------------------------------

#[test]
fn captured_signatures_replay_only_verbatim_and_any_change_is_refused() {
    let run = begin!("captured_signatures_replay_only_verbatim_and_any_change_is_refused");
    let e = Env::new("replay");
    let tag = e.tag("b2");
    let (status, _) = e.curl(root(&e.cg), &["-H", "Metadata: true", "-H", &tagged(&tag), IMDS]);
    assert_eq!(status, 200);
    let original = e.record(&tag);
    assert_eq!(original["signature"], "valid");
    let date = header_values(&original, "x-ms-azure-host-date");

    // Verbatim, from another process outside the cgroup.
    let verbatim = e.raw1(OUTSIDE, Raw::bytes(rebuild(&original, |_| {})).timeout(1.5));
    let replayed = e.records().into_iter().filter(|r| r.to_string().contains(&tag)).collect::<Vec<_>>();
    let last = replayed.last().expect("replay recorded");
    assert_eq!(replayed.len(), 2, "original and replay");
    assert_eq!(header_values(last, "x-ms-azure-host-date"), date, "a replay can only carry the original date");

    // Any change breaks the signature.
    let changed_date = e.raw1(
        OUTSIDE,
        Raw::bytes(rebuild(&original, |h| {
            for (n, v) in h.iter_mut() {
                if n.eq_ignore_ascii_case("x-ms-azure-host-date") {
                    *v = "Mon, 01 Jan 2035 00:00:00 GMT".to_owned();
                }
            }
            h.push((BYPASS.to_owned(), "b2-date".to_owned()));
        }))
        .timeout(1.5),
    );
    let mut path_changed = original.clone();
    path_changed["target"] = json!(TOKEN);
    let changed_path = e.raw1(
        OUTSIDE,
        Raw::bytes(rebuild(&path_changed, |h| h.push((BYPASS.to_owned(), "b2-path".to_owned())))).timeout(1.5),
    );
    let tag_nobody = e.tag("b2-nobody");
    let (status, _) = e.curl(nobody(&e.cg), &["-H", "Metadata: true", "-H", &tagged(&tag_nobody), IMDS]);
    assert_eq!(status, 200);
    let non_root = e.record(&tag_nobody);
    assert_eq!(header_values(&non_root, "x-ms-azure-host-claims"), vec!["{ \"isRoot\": \"false\"}".to_owned()]);
    let elevated = e.raw1(
        OUTSIDE,
        Raw::bytes(rebuild(&non_root, |h| {
            for (n, v) in h.iter_mut() {
                if n.eq_ignore_ascii_case("x-ms-azure-host-claims") {
                    *v = "{ \"isRoot\": \"true\"}".to_owned();
                }
            }
            h.push((BYPASS.to_owned(), "b2-claims".to_owned()));
        }))
        .timeout(1.5),
    );
    for (what, reply, t) in
        [("date", &changed_date, "b2-date"), ("path", &changed_path, "b2-path"), ("claims", &elevated, "b2-claims")]
    {
        assert_eq!(reply.status(), 401, "{what} changed: {}", reply.brief());
        assert_eq!(e.record(t)["signature"], "invalid:signature-mismatch", "{what}");
    }
    assert_eq!(
        (verbatim.status(), last["signature"].as_str()),
        (200, Some("valid")),
        "verbatim replay: {}",
        verbatim.brief()
    );
    run.documented(
        "B2",
        "OPEN (as in the reference): a verbatim replay from outside the cgroup is accepted (200, host verdict valid) — MSP has no nonce; freshness is only the signed x-ms-azure-host-date (§3.6), which a replay cannot refresh; changing date, path or isRoot claims → 401 signature-mismatch",
    );
    e.check_oracle();
}
