// SPDX-License-Identifier: MIT
//! Fuzz harnesses for the agent's untrusted-input parsers, one function per target (each
//! `fuzz_targets/<name>.rs` is a single line calling the function of the same name).
//!
//! They use only `gpa::fuzzing`, the agent's hidden module of re-exported parsers (the
//! `fuzzing` feature, turned on in fuzz/Cargo.toml). Besides "no panic, no overflow", each
//! checks a property that must hold for every input — the guarantees the proxy relies on after a parse succeeded:
//!
//! - `http_request`: a complete head has an origin-form target, no control bytes in values,
//!   no repeated header name, unambiguous framing, and every prefix of it is "incomplete",
//!   never an error (so the proxy's incremental reads cannot change a verdict);
//! - `chunked`: decoding is independent of how the input is split into reads;
//! - `key_json`: parse → serialise → parse gives the same key;
//! - `canonical`: the canonical path is absolute, lower-case ASCII, without empty, `.` or
//!   `..` segments, and canonicalising it again changes nothing (when it holds no `%`, `#`,
//!   `;` or `?`: decoding is single-pass on purpose);
//! - `telemetry`: a followed shared-config URL targets the WireServer with an origin-form
//!   path; a `TelemetryData` batch stays under its limit and no value closes its CDATA;
//! - the rest (`response_head`, `status_json`, `rules_json`, `signing_query`, `redact`):
//!   bounded, panic-free, and self-consistent where they report lengths.
//!
//! - `connection`: the whole connection state machine in-process (`proxy::scripted`): a script
//!   of client bytes, host bytes, closes and passing deadlines drives a real `Connection` on
//!   loopback sockets; every body buffer and upstream share it takes must come back. The
//!   system test `generated_byte_streams_never_crash_the_agent_or_reach_the_host_unsigned`
//!   does the same from the outside, through the real agent and the fake host.

use gpa::fuzzing::{
    Batch, BodyFraming, ChunkError, ChunkedDecoder, DecodeScratch, Event, EventTime, KEY_DOC_MAX_BYTES, KeyDoc,
    REQUEST_HEAD_MAX_BYTES, RequestHead, ResponseHead, TELEMETRY_MESSAGE_MAX_BYTES, VmMetadata, canonical_query,
    canonicalize, parse_compute, parse_goal_state, parse_local_file, parse_shared_config, parse_status,
    redact_command_line, run_connection_script, shared_config_target, split_target, traversal_guard,
    validate_local_file,
};

/// The connection state machine, driven by a script (see `proxy::scripted` for its opcodes).
pub fn connection(data: &[u8]) {
    run_connection_script(data);
}

/// The request head parser and its framing rules (MSP §11 item 4).
pub fn http_request(data: &[u8]) {
    let Ok(Some(head)) = RequestHead::parse(data) else { return };
    assert!(head.head_len <= data.len().min(REQUEST_HEAD_MAX_BYTES));
    assert_eq!(head.target(data).first(), Some(&b'/'), "only origin-form targets pass");
    let mut names: Vec<Vec<u8>> = Vec::new();
    let (mut content_length, mut transfer_encoding) = (false, false);
    for (name, value) in head.headers(data) {
        assert!(!value.iter().any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f), "control byte in a value");
        assert!(!value.iter().any(|b| *b >= 0x80), "obs-text in a value");
        let lower = name.to_ascii_lowercase();
        // Other repeated names are combined upstream; these three never pass repeated.
        let framing_or_host = [&b"host"[..], b"content-length", b"transfer-encoding"].contains(&lower.as_slice());
        assert!(!(framing_or_host && names.contains(&lower)), "repeated header {:?}", String::from_utf8_lossy(name));
        content_length |= lower == b"content-length";
        transfer_encoding |= lower == b"transfer-encoding";
        names.push(lower);
    }
    assert!(!(content_length && transfer_encoding), "CL and TE together");
    match head.framing {
        BodyFraming::Chunked => assert!(transfer_encoding),
        BodyFraming::Length(n) => assert!(content_length && n > 0),
        BodyFraming::None => assert!(!transfer_encoding),
    }
    for cut in [head.head_len - 1, head.head_len / 2] {
        assert!(
            matches!(RequestHead::parse(&data[..cut]), Ok(None)),
            "a prefix of a complete head must be incomplete (cut at {cut})"
        );
    }
}

/// The chunked decoder, fed whole and in pieces (the first byte picks the piece size).
pub fn chunked(data: &[u8]) {
    let Some((&step, input)) = data.split_first() else { return };
    let step = usize::from(step % 7) + 1;
    let whole = decode(input, input.len().max(1));
    let pieces = decode(input, step);
    match (&whole, &pieces) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "split into {step}-byte reads"),
        (Err(_), Err(_)) => {}
        _ => panic!("split reads changed the verdict: whole {whole:?}, {step}-byte reads {pieces:?}"),
    }
}

/// Decodes in `step`-byte reads: (body, consumed, done).
fn decode(input: &[u8], step: usize) -> Result<(Vec<u8>, usize, bool), ChunkError> {
    let mut decoder = ChunkedDecoder::new();
    let mut body = Vec::new();
    let mut consumed = 0;
    for piece in input.chunks(step) {
        let n = decoder.feed(piece, |d| body.extend_from_slice(d))?;
        assert!(n <= piece.len());
        consumed += n;
        if decoder.is_done() {
            break;
        }
    }
    Ok((body, consumed, decoder.is_done()))
}

/// The upstream response head parser.
pub fn response_head(data: &[u8]) {
    for head_request in [false, true] {
        if let Ok(Some(head)) = ResponseHead::parse(data, head_request) {
            let ResponseHead { head_len, status_line_len, status, .. } = head;
            assert!(status_line_len <= head_len && head_len <= data.len());
            // Any three digits parse (the host is trusted to send sensible ones).
            assert!(status <= 999);
        }
    }
}

/// The secure-channel status document (host-controlled JSON, MSP §1.3). Parsing builds large
/// rule items on the stack, so it runs on a thread with the stack the agent gives its loop.
pub fn status_json(data: &[u8]) {
    let data = data.to_vec();
    let parsed = std::thread::Builder::new()
        .stack_size(32 * 1024 * 1024)
        .spawn(move || parse_status(&data).map(|(_, summary)| summary.state.len()))
        .expect("spawn")
        .join()
        .expect("parse_status panicked");
    if let Ok(len) = parsed {
        assert!(len > 0, "a valid document has a state string");
    }
}

/// The key document: parse, serialise, parse again.
pub fn key_json(data: &[u8]) {
    let Ok(doc) = KeyDoc::parse(data) else { return };
    let mut out = [0u8; KEY_DOC_MAX_BYTES];
    let n = doc.to_json(&mut out).expect("a parsed key document serialises");
    let again = KeyDoc::parse(&out[..n]).expect("a serialised key document parses");
    assert!(again.same_key(&doc), "round trip changed the key");
    assert_eq!(again.guid, doc.guid);
}

/// Customer rule files (`IMDS_Rules.json`, `WireServer_Rules.json`, MSP §4.7).
pub fn rules_json(data: &[u8]) {
    if let Ok(file) = parse_local_file(data) {
        validate_local_file(&file).expect("parse_local_file validated it");
    }
}

/// URL canonicalisation (MSP §4.8): the traversal guard, target splitting and the strict
/// canonical form.
pub fn canonical(data: &[u8]) {
    let _parts = split_target(data).is_ok();
    let path = data.split(|b| *b == b'?').next().unwrap_or(data);
    let _guarded = traversal_guard(path).is_ok();
    // The proxy refuses every target that is not origin-form before the policy runs, so only
    // those reach `canonicalize` here. Absolute-form authorities hit a latent overflow in
    // `check_authority` (see regressions/canonical/ and README.md).
    if data.first() != Some(&b'/') {
        return;
    }
    let mut scratch = Box::new(DecodeScratch::new());
    let Ok(canon) = canonicalize(b"GET", data, &mut scratch) else { return };
    let path = canon.path().to_owned();
    assert!(path.starts_with('/'), "{path:?}");
    assert!(path.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()), "{path:?}");
    if path != "/" {
        assert!(path[1..].split('/').all(|s| !s.is_empty() && s != "." && s != ".."), "{path:?}");
    }
    // Decoding is single-pass on purpose (`%252F` names `%2F`, `%23` a literal `#`), so only a
    // path without bytes that are delimiters on a second pass must come back unchanged.
    if !path.bytes().any(|b| matches!(b, b'%' | b'#' | b';' | b'?')) {
        let mut again = Box::new(DecodeScratch::new());
        let twice = canonicalize(b"GET", path.as_bytes(), &mut again).expect("a canonical path is canonical");
        assert_eq!(twice.path(), path, "canonicalisation is idempotent");
    }
}

/// The canonical query of the string-to-sign (MSP §3.3).
pub fn signing_query(data: &[u8]) {
    let mut out = Vec::new();
    if canonical_query(data, &mut |part| out.extend_from_slice(part)).is_ok() {
        assert!(out.len() <= data.len(), "the canonical query only drops and reorders");
    }
}

/// Secret redaction of command lines written to the audit log (MSP §7.4).
pub fn redact(data: &[u8]) {
    let mut out = heapless::Vec::<u8, 2048>::new();
    redact_command_line(data, &mut out);
    let again = out.clone();
    redact_command_line(&again, &mut out);
    assert!(out.len() <= 2048);
}

/// The telemetry side (MSP §7.3): the host documents it reads (goal state, shared config,
/// IMDS instance JSON, the shared-config URL) and the `TelemetryData` body it writes. The first
/// byte picks the reader; the rest is its input, also used as an event message. A URL that is
/// followed always targets the WireServer address with an origin-form path; a rendered batch
/// is never over its limit and its CDATA sections are closed only by the renderer.
pub fn telemetry(data: &[u8]) {
    let Some((&pick, input)) = data.split_first() else { return };
    let ws = std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(168, 63, 129, 16), 80);
    let mut meta = VmMetadata::default();
    match pick % 4 {
        0 => {
            if let Ok(g) = parse_goal_state(input) {
                if let Ok((to, target)) = shared_config_target(&g.shared_config_url, ws) {
                    assert_eq!(to.ip(), ws.ip());
                    assert!(to.port() != 0 && target.starts_with('/'), "{target:?}");
                    assert!(target.bytes().all(|b| b.is_ascii_graphic() && b != b'#'), "{target:?}");
                }
                meta.goal_state = g;
            }
        }
        1 => meta.shared_config = parse_shared_config(input).unwrap_or_default(),
        2 => meta.compute = parse_compute(input).unwrap_or_default(),
        _ => {}
    }
    let text = String::from_utf8_lossy(input);
    let time = EventTime { pid: 1, tid: 1, unix_ms: 0 };
    let e = Event::new(log::Level::Warn, &text, &text, format_args!("{text}"), time);
    assert!(e.message.len() <= TELEMETRY_MESSAGE_MAX_BYTES);
    let limit = 2048 + usize::from(pick) * 64;
    let mut batch = Batch::new(limit);
    for _ in 0..3 {
        if !batch.try_add(&e, &meta) {
            break;
        }
    }
    let body = batch.finish();
    assert!(body.len() <= limit, "{} > {limit}", body.len());
    let text = String::from_utf8(body).expect("UTF-8 body");
    assert_eq!(text.matches("]]>").count(), text.matches("<![CDATA[").count(), "a value closed a CDATA section");
}
