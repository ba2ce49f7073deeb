// SPDX-License-Identifier: MIT
//! Audit trail tests: write → verify round trips, every kind of tampering, rotation, keys,
//! injection, redaction and file safety.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};

use super::verify::verify_contents;
use super::*;

/// A scratch directory under the system temp dir, named for the process and the test, removed
/// on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let path = std::env::temp_dir().join(format!("gpa-audit-{}-{test}", std::process::id()));
        let _ignored = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        fs::set_permissions(&path, Permissions::from_mode(0o700)).expect("chmod temp dir");
        Self(path)
    }

    fn audit(&self) -> PathBuf {
        self.0.join(ACTIVE_FILE_NAME)
    }

    fn rotated(&self, n: u32) -> PathBuf {
        rotated_path(&self.0, n)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ignored = fs::remove_dir_all(&self.0);
    }
}

fn request(n: u64) -> AuditRecord<'static> {
    AuditRecord {
        unix_ms: 1_767_225_600_000 + n,
        pid: 4242,
        uid: 1000,
        gid: 1000,
        user: Some("alice"),
        exe: Some(b"/usr/bin/curl"),
        cmdline: b"curl -s http://169.254.169.254/metadata/instance",
        endpoint: "imds",
        method: b"GET",
        path: b"/metadata/instance",
        decision: "allow",
        mode: "enforce",
        status: 200,
        latency_us: 1830 + n,
    }
}

/// Opens a log in `dir`, writes `count` records flushing once, returns the file's lines.
fn write_records(dir: &TempDir, count: u64) -> Vec<Vec<u8>> {
    let mut log = AuditLog::open(&dir.0, 1 << 20, 4).expect("open");
    for n in 0..count {
        log.record(&request(n));
    }
    log.flush().expect("flush");
    assert_eq!(log.counts(), (count, 0));
    lines_of(&dir.audit())
}

fn lines_of(path: &Path) -> Vec<Vec<u8>> {
    let content = fs::read(path).expect("read audit file");
    assert!(content.ends_with(b"\n"), "file ends with a newline");
    content[..content.len() - 1].split(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
}

fn joined(lines: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in lines {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out
}

/// Verifies `lines` as the content of `audit.ndjson`.
fn verify_lines(lines: &[Vec<u8>], key: Option<&[u8; 32]>) -> VerifyReport {
    let content = joined(lines);
    verify_contents(&[(Path::new(ACTIVE_FILE_NAME), &content)], key)
}

fn broken_at(report: &VerifyReport) -> Option<(u64, &'static str)> {
    report.first_break.as_ref().map(|(_, line, why)| (*line, *why))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(line: &[u8]) -> String {
    hex(&Sha256::digest(line))
}

#[test]
fn round_trip_verifies() {
    let dir = TempDir::new("round_trip");
    let lines = write_records(&dir, 10);
    assert_eq!(lines.len(), 10);
    let report = verify_files(&[dir.audit()], None);
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.to_string(), "ok: 10 records, 0 checkpoints");
    let first = String::from_utf8(lines[0].clone()).expect("utf-8");
    let zeros = "0".repeat(64);
    assert_eq!(
        first,
        format!(
            r#"{{"seq":1,"ts":1767225600000,"prev":"{zeros}","kind":"request","pid":4242,"uid":1000,"gid":1000,"user":"alice","exe":"/usr/bin/curl","cmdline":"curl -s http://169.254.169.254/metadata/instance","endpoint":"imds","method":"GET","path":"/metadata/instance","decision":"allow","mode":"enforce","status":200,"latency_us":1830}}"#
        )
    );
    assert!(String::from_utf8_lossy(&lines[1]).contains(&sha256_hex(&lines[0])));
}

#[test]
fn any_flipped_byte_in_a_middle_line_names_that_line() {
    let dir = TempDir::new("flip");
    let lines = write_records(&dir, 10);
    for offset in 0..lines[4].len() {
        let mut tampered = lines.clone();
        tampered[4][offset] ^= 0x01;
        let report = verify_lines(&tampered, None);
        let (line, _) = broken_at(&report).unwrap_or_else(|| panic!("offset {offset} undetected"));
        assert_eq!(line, 5, "offset {offset}: {report}");
    }
    // A content edit (not a structural one) reads as "edited".
    let mut tampered = lines.clone();
    let text = String::from_utf8(tampered[4].clone()).expect("utf-8");
    tampered[4] = text.replace("\"uid\":1000", "\"uid\":0").into_bytes();
    let report = verify_lines(&tampered, None);
    assert_eq!(broken_at(&report), Some((5, why::EDITED)));
    assert_eq!(
        report.to_string(),
        "audit.ndjson:5: chain broken (edited): this record was changed after it was written"
    );
}

#[test]
fn deleted_line_names_the_next_one() {
    let dir = TempDir::new("delete");
    let mut lines = write_records(&dir, 10);
    lines.remove(3);
    let report = verify_lines(&lines, None);
    assert_eq!(broken_at(&report), Some((4, why::SEQUENCE_GAP)), "{report}");
}

#[test]
fn inserted_forged_line_is_detected() {
    let dir = TempDir::new("insert");
    let lines = write_records(&dir, 10);
    let genuine = String::from_utf8(lines[4].clone()).expect("utf-8");
    // A forgery with a correct-looking prev and seq: a twin of line 5 saying "deny".
    let twin = genuine.replace("\"decision\":\"allow\"", "\"decision\":\"deny\"");
    let mut tampered = lines.clone();
    tampered.insert(4, twin.into_bytes());
    let report = verify_lines(&tampered, None);
    assert_eq!(broken_at(&report), Some((5, why::SEQUENCE_OUT_OF_ORDER)), "{report}");
    // A replayed copy of an earlier line.
    let mut tampered = lines.clone();
    tampered.insert(6, lines[2].clone());
    let report = verify_lines(&tampered, None);
    assert_eq!(broken_at(&report), Some((7, why::SEQUENCE_OUT_OF_ORDER)), "{report}");
    // A forgery continuing from line 5 with seq 6: the genuine line 6 no longer links.
    let mut forged = genuine.replacen("\"seq\":5", "\"seq\":6", 1);
    let at = forged.find("\"prev\":\"").expect("prev") + 8;
    forged.replace_range(at..at + 64, &sha256_hex(&lines[4]));
    let mut tampered = lines.clone();
    tampered.insert(5, forged.into_bytes());
    let report = verify_lines(&tampered, None);
    assert_eq!(broken_at(&report), Some((6, why::SEQUENCE_OUT_OF_ORDER)), "{report}");
}

#[test]
fn swapped_lines_are_detected() {
    let dir = TempDir::new("swap");
    let mut lines = write_records(&dir, 10);
    lines.swap(2, 3);
    let report = verify_lines(&lines, None);
    assert_eq!(broken_at(&report), Some((3, why::SEQUENCE_GAP)), "{report}");
}

#[test]
fn rotation_keeps_the_chain_and_deletes_old_files() {
    let dir = TempDir::new("rotation");
    // A leftover from a larger max_files, and symlinks planted where rotation renames to.
    fs::write(dir.rotated(7), b"stale\n").expect("plant stale");
    let victim = dir.0.join("victim");
    fs::write(&victim, b"precious").expect("victim");
    symlink(&victim, dir.rotated(1)).expect("plant symlink .1");
    symlink(&victim, dir.rotated(2)).expect("plant symlink .2");
    let mut log = AuditLog::open(&dir.0, MIN_FILE_BYTES, 3).expect("open");
    for n in 0..40 {
        log.record(&request(n));
        log.flush().expect("flush");
    }
    assert_eq!(log.counts(), (40, 0));
    drop(log);
    assert_eq!(fs::read(&victim).expect("victim"), b"precious");
    assert!(!dir.rotated(3).exists() && !dir.rotated(7).exists());
    let files = [dir.rotated(2), dir.rotated(1), dir.audit()];
    for file in &files {
        let meta = fs::symlink_metadata(file).expect("rotated file");
        assert!(meta.is_file() && meta.len() <= MIN_FILE_BYTES, "{file:?}");
    }
    let report = verify_files(&files, None);
    assert!(report.is_ok(), "{report}");
    // The oldest kept file starts mid-chain; the total is what the three files hold.
    let held: usize = files.iter().map(|f| lines_of(f).len()).sum();
    assert_eq!(report.records, u64::try_from(held).expect("small"));
    assert!(!String::from_utf8_lossy(&lines_of(&files[0])[0]).contains("\"seq\":1,"));
    // Wrong order is a break.
    let report = verify_files(&[dir.rotated(1), dir.rotated(2), dir.audit()], None);
    assert!(!report.is_ok());
}

#[test]
fn checkpoints_verify_with_the_right_key_only() {
    let dir = TempDir::new("checkpoint");
    let key = derive_checkpoint_key_from_raw(b"latched msp key bytes");
    let mut log = AuditLog::open(&dir.0, 1 << 20, 4).expect("open");
    log.set_checkpoint_key(Some(key));
    for n in 0..70 {
        log.record(&request(n));
    }
    log.flush().expect("flush");
    drop(log);
    let lines = lines_of(&dir.audit());
    // 64 records, a checkpoint, 6 records, a checkpoint at flush.
    assert_eq!(lines.len(), 72);
    assert!(String::from_utf8_lossy(&lines[64]).contains("\"kind\":\"checkpoint\""));
    assert!(String::from_utf8_lossy(&lines[71]).contains("\"kind\":\"checkpoint\""));
    let report = verify_files(&[dir.audit()], Some(&key));
    assert_eq!(report.to_string(), "ok: 70 records, 2 checkpoints");
    let wrong = derive_checkpoint_key_from_raw(b"another key");
    let report = verify_files(&[dir.audit()], Some(&wrong));
    assert_eq!(broken_at(&report), Some((65, why::BAD_CHECKPOINT_MAC)), "{report}");
    let report = verify_files(&[dir.audit()], None);
    assert_eq!(report.to_string(), "ok: 70 records, 2 checkpoints (checkpoint macs not checked: no key)");
    // A forger who edits line 3 and re-chains everything after it fools the chain, not the MAC.
    let mut forged: Vec<Vec<u8>> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let mut text = String::from_utf8(line.clone()).expect("utf-8");
        if i == 2 {
            text = text.replace("\"uid\":1000", "\"uid\":0");
        }
        if let Some(before) = forged.last() {
            let at = text.find("\"prev\":\"").expect("prev") + 8;
            text.replace_range(at..at + 64, &sha256_hex(before));
        }
        forged.push(text.into_bytes());
    }
    assert!(verify_lines(&forged, None).is_ok());
    assert_eq!(broken_at(&verify_lines(&forged, Some(&key))), Some((65, why::BAD_CHECKPOINT_MAC)));
}

#[test]
fn checkpoint_key_is_hmac_of_the_label() {
    // RFC 4231 test case 2 pins the HMAC itself.
    assert_eq!(
        hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    let raw = b"0123456789abcdef0123456789abcdef";
    let via_closure = derive_checkpoint_key(|label| hmac_sha256(raw, label));
    assert_eq!(via_closure, derive_checkpoint_key_from_raw(raw));
    assert_eq!(via_closure, hmac_sha256(raw, b"gpa audit checkpoint v1"));
}

#[test]
fn control_bytes_and_newlines_cannot_forge_a_record() {
    let dir = TempDir::new("injection");
    let mut log = AuditLog::open(&dir.0, 1 << 20, 4).expect("open");
    let zeros = "0".repeat(64);
    let forged =
        format!("x\n{{\"seq\":1,\"ts\":0,\"prev\":\"{zeros}\",\"kind\":\"dropped\",\"count\":0}}\r\n\x1b[2K\u{202e}");
    let mut rec = request(0);
    rec.cmdline = forged.as_bytes();
    rec.exe = Some(b"/tmp/\n{\"seq\":2}\xff\x00\x7f");
    rec.user = Some("eve\n\"}");
    rec.method = b"GET\r\n";
    rec.path = b"/a\nb";
    log.record(&rec);
    log.flush().expect("flush");
    let content = fs::read(dir.audit()).expect("read");
    assert_eq!(content.iter().filter(|b| **b == b'\n').count(), 1);
    assert!(!content[..content.len() - 1].iter().any(|b| *b < 0x20 || *b == 0x7f));
    let text = String::from_utf8(content).expect("always valid utf-8");
    assert!(text.contains(r#""exe":"/tmp/\u000a{\"seq\":2}\u00ff\u0000\u007f""#), "{text}");
    assert!(text.contains(r#"\u000d\u000a\u001b[2K\u202e""#), "{text}");
    assert!(verify_files(&[dir.audit()], None).is_ok());
}

#[test]
fn secrets_are_redacted_and_queries_dropped() {
    let dir = TempDir::new("redaction");
    let mut log = AuditLog::open(&dir.0, 1 << 20, 4).expect("open");
    let mut rec = request(0);
    rec.cmdline = b"sqlcmd -S db pwd=secret123; --token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln";
    rec.path = b"/metadata/identity/oauth2/token?resource=x&sig=abc";
    log.record(&rec);
    log.flush().expect("flush");
    let text = String::from_utf8(fs::read(dir.audit()).expect("read")).expect("utf-8");
    assert!(text.contains(r#""cmdline":"sqlcmd -S db [REDACTED]; --token [REDACTED]""#), "{text}");
    assert!(text.contains(r#""path":"/metadata/identity/oauth2/token","#), "{text}");
    for secret in ["secret123", "eyJ", "sig=", "resource"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
}

#[test]
fn file_is_0640_and_symlinks_are_refused() {
    let dir = TempDir::new("symlink");
    drop(AuditLog::open(&dir.0, 1 << 20, 4).expect("open"));
    let mode = fs::metadata(dir.audit()).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o640);
    fs::remove_file(dir.audit()).expect("remove");
    let victim = dir.0.join("victim");
    fs::write(&victim, b"precious").expect("victim");
    symlink(&victim, dir.audit()).expect("plant");
    assert!(matches!(AuditLog::open(&dir.0, 1 << 20, 4), Err(AuditError::Symlink)));
    assert_eq!(fs::read(&victim).expect("victim"), b"precious");
    // A dangling symlink is refused too (nothing gets created at its target).
    fs::remove_file(dir.audit()).expect("remove");
    let target = dir.0.join("not-yet");
    symlink(&target, dir.audit()).expect("plant dangling");
    assert!(matches!(AuditLog::open(&dir.0, 1 << 20, 4), Err(AuditError::Symlink)));
    assert!(!target.exists());
    // A hard link to another file is refused.
    fs::remove_file(dir.audit()).expect("remove");
    fs::hard_link(&victim, dir.audit()).expect("hard link");
    assert!(matches!(AuditLog::open(&dir.0, 1 << 20, 4), Err(AuditError::UnsafeFile(_))));
    // So is a directory others can write to.
    let open_dir = dir.0.join("open");
    fs::create_dir(&open_dir).expect("mkdir");
    fs::set_permissions(&open_dir, Permissions::from_mode(0o777)).expect("chmod");
    assert!(matches!(AuditLog::open(&open_dir, 1 << 20, 4), Err(AuditError::UnsafeDir(_))));
    assert!(matches!(AuditLog::open(&dir.0, 10, 4), Err(AuditError::Limits)));
}

#[test]
fn record_does_no_io_and_counts_drops_past_capacity() {
    let dir = TempDir::new("capacity");
    let mut log = AuditLog::open(&dir.0, 1 << 20, 4).expect("open");
    for n in 0..1000 {
        log.record(&request(n));
    }
    assert_eq!(fs::metadata(dir.audit()).expect("meta").len(), 0, "record() wrote");
    let (written, dropped) = log.counts();
    assert_eq!(written, 0);
    assert!(dropped > 0 && dropped < 1000, "dropped {dropped}");
    log.flush().expect("flush");
    let (written, dropped_after) = log.counts();
    assert_eq!((written + dropped_after, dropped_after), (1000, dropped));
    let lines = lines_of(&dir.audit());
    let last = String::from_utf8(lines.last().expect("lines").clone()).expect("utf-8");
    assert!(last.contains(&format!("\"kind\":\"dropped\",\"count\":{dropped}}}")), "{last}");
    let report = verify_files(&[dir.audit()], None);
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.records, written + 1);
}

#[test]
fn reopen_resumes_the_chain_and_a_torn_tail_restarts_it() {
    let dir = TempDir::new("resume");
    write_records(&dir, 3);
    write_records(&dir, 2);
    let report = verify_files(&[dir.audit()], None);
    assert_eq!(report.to_string(), "ok: 5 records, 0 checkpoints");
    // A crash mid-write leaves a torn line: the next open ends it and restarts the chain.
    let mut file = OpenOptions::new().append(true).open(dir.audit()).expect("open");
    file.write_all(b"{\"seq\":6,\"ts\":17").expect("tear");
    drop(file);
    let lines = write_records(&dir, 1);
    assert_eq!(lines.len(), 8);
    let restart = String::from_utf8(lines[6].clone()).expect("utf-8");
    assert!(restart.starts_with("{\"seq\":1,\"ts\":"), "{restart}");
    assert!(restart.ends_with(&format!(
        "\"prev\":\"{}\",\"kind\":\"chain-restart\",\"reason\":\"torn last line\"}}",
        "0".repeat(64)
    )));
    let report = verify_files(&[dir.audit()], None);
    assert_eq!(broken_at(&report), Some((6, why::BAD_JSON)), "{report}");
    // The new segment verifies on its own.
    assert!(verify_lines(&lines[6..], None).is_ok());
}

#[test]
fn empty_active_file_continues_from_the_rotated_one() {
    let dir = TempDir::new("after_rotation");
    write_records(&dir, 3);
    fs::rename(dir.audit(), dir.rotated(1)).expect("rotate by hand");
    write_records(&dir, 2);
    let report = verify_files(&[dir.rotated(1), dir.audit()], None);
    assert_eq!(report.to_string(), "ok: 5 records, 0 checkpoints");
}

#[test]
fn rotation_recovers_from_a_failed_create_and_honours_one_file() {
    let dir = TempDir::new("rotation_retry");
    let mut log = AuditLog::open(&dir.0, MIN_FILE_BYTES, 3).expect("open");
    log.record(&request(0));
    log.flush().expect("flush");
    // As if the last rotation renamed the active file but could not create the new one.
    fs::rename(dir.audit(), dir.rotated(1)).expect("rename");
    log.file_bytes = MIN_FILE_BYTES;
    log.record(&request(1));
    log.flush().expect("rotation retried");
    let report = verify_files(&[dir.rotated(2), dir.audit()], None);
    assert_eq!(report.to_string(), "ok: 2 records, 0 checkpoints");

    let dir = TempDir::new("rotation_one_file");
    let mut log = AuditLog::open(&dir.0, MIN_FILE_BYTES, 1).expect("open");
    for n in 0..10 {
        log.record(&request(n));
        log.flush().expect("flush");
    }
    assert!(!dir.rotated(1).exists());
    assert!(verify_files(&[dir.audit()], None).is_ok());
}

// ---- the trail: per-uid rate, security chain, summaries, events (issue 13) --------------------

fn trail_caps(rate: u32, burst: u32) -> crate::config::Caps {
    crate::config::Caps {
        audit_records_per_second: rate,
        audit_burst: burst,
        audit_max_file_bytes: 1 << 20,
        audit_max_files: 4,
        ..crate::config::Caps::for_table(1024)
    }
}

fn kinds(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let at = l.find(r#""kind":""#).expect("a kind") + 8;
            l[at..].split('"').next().unwrap_or("").to_owned()
        })
        .collect()
}

#[test]
fn a_flooding_uid_is_summarised_and_root_and_security_records_stay() {
    let dir = TempDir::new("trail-rate");
    let mut trail = AuditTrail::open(&dir.0, &trail_caps(1, 10)).expect("open");
    let t0 = crate::clock::now();
    trail.event("start", "pid 1");
    // uid 1000 floods allowed requests: only its burst is written.
    for n in 0..500 {
        trail.record(&request(n), t0);
    }
    // Its denial is over the rate too, but counted as security-relevant in the summary.
    trail.record(&AuditRecord { decision: "deny", status: 403, ..request(501) }, t0);
    // Root's records are never limited; its WireServer request is a security record.
    for n in 0..50 {
        trail.record(&AuditRecord { uid: 0, endpoint: "wireserver", ..request(600 + n) }, t0);
    }
    trail.flush(t0 + std::time::Duration::from_millis(1_500)).expect("flush");
    assert_eq!(trail.counts().2, 491, "500 + 1 - burst of 10 suppressed");

    let all = kinds(&dir.audit());
    assert_eq!(all.iter().filter(|k| *k == "request").count(), 10 + 50);
    assert_eq!(all.iter().filter(|k| *k == "suppressed").count(), 1);
    let summary = fs::read_to_string(dir.audit()).unwrap();
    assert!(summary.contains(r#""kind":"suppressed","uid":1000,"count":491,"security":1"#), "{summary}");

    let security = dir.0.join(trail::SECURITY_DIR_NAME).join(ACTIVE_FILE_NAME);
    let sec = kinds(&security);
    assert_eq!(sec.iter().filter(|k| *k == "request").count(), 50, "root's WireServer requests, not uid 1000's allows");
    assert!(sec.contains(&"event".to_owned()) && sec.contains(&"suppressed".to_owned()), "{sec:?}");
    for path in [dir.audit(), security] {
        let report = verify_files(std::slice::from_ref(&path), None);
        assert!(report.is_ok(), "{}: {report}", path.display());
    }
}

#[test]
fn the_rate_refills_with_time() {
    let dir = TempDir::new("trail-refill");
    let mut trail = AuditTrail::open(&dir.0, &trail_caps(10, 1)).expect("open");
    let t0 = crate::clock::now();
    let at = |ms| t0 + std::time::Duration::from_millis(ms);
    for ms in (0..1000).step_by(10) {
        trail.record(&request(ms), at(ms));
    }
    trail.flush_all(at(1000)).expect("flush");
    let written = kinds(&dir.audit()).iter().filter(|k| *k == "request").count();
    assert!((10..=12).contains(&written), "10 per second and a burst of one: {written}");
}
