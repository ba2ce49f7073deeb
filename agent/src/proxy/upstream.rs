// SPDX-License-Identifier: MIT
//! Serialising the upstream request: the proxy writes the request itself, header by header,
//! so that what it signs is exactly what it sends (MSP §11 item 4).
//!
//! What changes on the way (MSP §5.5, with this project's fixes):
//! * every client-supplied `x-ms-azure-host-*` header is dropped, on every path;
//! * the hop-by-hop headers (`connection`, `keep-alive`, `proxy-connection`, `te`, `upgrade`)
//!   are dropped: they speak of the client's connection, and the upstream one is the agent's
//!   (kept alive and pooled; the reference forwards them, MSP §5.5);
//! * a buffered chunked body has been de-chunked, so `transfer-encoding` is dropped and a
//!   `content-length` with the decoded length is sent instead; a streamed (skip-listed, never
//!   signed) body keeps the client's framing and goes up byte for byte; `expect` is dropped
//!   (the proxy answered `100 Continue` itself);
//! * `x-ms-azure-host-claims` and `x-ms-azure-host-date` are added, and
//!   `x-ms-azure-host-authorization` when a key is held and the request is not skip-listed.
//!
//! Everything else — target, version, header order and spelling — is forwarded as received.

use crate::http::{BodyFraming, RequestHead, eq_ignore_case};
use crate::limits::UPSTREAM_HEADERS_MAX;
use crate::msp::signing::{self, SigningKey};

/// Why the upstream request could not be built (answered `502`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndorseError {
    /// The serialised head does not fit the buffer.
    HeadTooLarge,
    /// Signing failed (for example a header value that is not visible ASCII).
    Sign(signing::SignError),
    /// A key was passed with a streamed body: a signature covers the whole body, so only a
    /// skip-listed (never signed) request may be streamed.
    StreamedBodyCannotBeSigned,
}

/// Inputs that are not in the request itself.
#[derive(Debug)]
pub struct Endorsement<'a> {
    /// The key to sign with; `None` forwards unsigned (no key held, or skip-listed request).
    pub key: Option<&'a SigningKey>,
    /// Caller is root (uid 0).
    pub is_root: bool,
    /// The host-synchronised date, RFC 1123.
    pub date: &'a str,
}

struct Writer<'o> {
    out: &'o mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn put(&mut self, parts: &[&[u8]]) -> Result<(), EndorseError> {
        for p in parts {
            let end =
                self.len.checked_add(p.len()).filter(|e| *e <= self.out.len()).ok_or(EndorseError::HeadTooLarge)?;
            self.out[self.len..end].copy_from_slice(p);
            self.len = end;
        }
        Ok(())
    }
}

/// The headers the agent owns: every client header with this prefix is dropped (exactly this
/// prefix: `x-ms-azure-hostname` is the client's and is forwarded).
const HOST_PREFIX: &[u8] = b"x-ms-azure-host-";

/// The body that follows the head upstream.
#[derive(Clone, Copy, Debug)]
pub enum RequestBody<'a> {
    /// Complete and de-chunked: sent with a `content-length` and covered by the signature.
    Buffered(&'a [u8]),
    /// A skip-listed body relayed as the client frames it (MSP §3.7); never signed.
    Streamed,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe the client's connection to the agent,
/// not the agent's to the host, and the upstream connection outlives the client's (it is
/// pooled). `transfer-encoding` is handled with the body.
const HOP_BY_HOP: [&[u8]; 5] = [b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade"];

/// Whether a client header is replaced or dropped rather than forwarded. `rechunked`: the
/// body was de-chunked, so the client's `transfer-encoding` no longer describes it.
fn is_dropped(name: &[u8], rechunked: bool) -> bool {
    name.len() >= HOST_PREFIX.len() && eq_ignore_case(&name[..HOST_PREFIX.len()], HOST_PREFIX)
        || eq_ignore_case(name, b"expect")
        || HOP_BY_HOP.iter().any(|h| eq_ignore_case(name, h))
        || (rechunked && eq_ignore_case(name, b"transfer-encoding"))
}

/// What a client header is in the list sent upstream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Its name occurs once: sent as it came.
    Single,
    /// The first of a repeated name: sent with every value of that name (a range of the
    /// joined scratch).
    Joined(usize, usize),
    /// A later occurrence of a repeated name: already in the first one's field.
    Later,
}

/// Writes the upstream request head for `head` (parsed from `req`) into `out` and returns its
/// length. `body` says what follows: a buffered body is complete and de-chunked; a streamed
/// one is never signed (`Sign(BodyStreamed)` if a key is passed with it).
pub fn write_request_head(
    head: &RequestHead,
    req: &[u8],
    body: RequestBody<'_>,
    endorsement: &Endorsement<'_>,
    out: &mut [u8],
) -> Result<usize, EndorseError> {
    let (body, rechunked) = match body {
        RequestBody::Buffered(body) => (body, head.framing == BodyFraming::Chunked),
        RequestBody::Streamed if endorsement.key.is_some() => return Err(EndorseError::StreamedBodyCannotBeSigned),
        RequestBody::Streamed => (&[][..], false),
    };
    let method = head.method(req);
    let target = head.target(req);
    let mut w = Writer { out, len: 0 };
    let version: &[u8] = if head.minor_version == 0 { b" HTTP/1.0\r\n" } else { b" HTTP/1.1\r\n" };
    w.put(&[method, b" ", target, version])?;

    let length_buf = crate::http::decimal(u64::try_from(body.len()).unwrap_or(u64::MAX));
    let length = length_buf.as_slice();
    let claims = if endorsement.is_root { signing::CLAIMS_ROOT } else { signing::CLAIMS_NOT_ROOT };

    // Repeated names become one field, values joined with `, ` in wire order (RFC 9110 §5.3):
    // first the joined values of every repeated name, then the list refers to them. The
    // scratch is a heapless Vec: nothing is zeroed on the per-request path.
    let mut joined: heapless::Vec<u8, { crate::limits::REQUEST_HEAD_MAX_BYTES }> = heapless::Vec::new();
    let mut role = [Role::Single; crate::limits::MAX_HEADERS];
    let headers: heapless::Vec<(&[u8], &[u8]), { crate::limits::MAX_HEADERS }> = head.headers(req).collect();
    for (i, (name, _)) in headers.iter().enumerate() {
        if role[i] == Role::Later || !headers[i + 1..].iter().any(|(n, _)| eq_ignore_case(n, name)) {
            continue;
        }
        let start = joined.len();
        for (j, (_, value)) in headers.iter().enumerate().skip(i).filter(|(_, (n, _))| eq_ignore_case(n, name)) {
            let sep: &[u8] = if j == i { b"" } else { b", " };
            // Values and separators of one head never outgrow the head itself.
            joined
                .extend_from_slice(sep)
                .and_then(|()| joined.extend_from_slice(value))
                .map_err(|()| EndorseError::HeadTooLarge)?;
            if j != i {
                role[j] = Role::Later;
            }
        }
        role[i] = Role::Joined(start, joined.len());
    }

    // The header list as sent, also the input of the signature.
    let mut sent: [(&[u8], &[u8]); UPSTREAM_HEADERS_MAX] = [(&[], &[]); UPSTREAM_HEADERS_MAX];
    let mut n = 0;
    for (i, &(name, value)) in headers.iter().enumerate() {
        let value = match role[i] {
            _ if is_dropped(name, rechunked) => continue,
            Role::Later => continue,
            Role::Joined(start, end) => &joined[start..end],
            Role::Single => value,
        };
        let value = if rechunked && eq_ignore_case(name, b"content-length") { length } else { value };
        sent[n] = (name, value);
        n += 1;
    }
    if rechunked {
        sent[n] = (b"content-length", length);
        n += 1;
    }
    sent[n] = (signing::CLAIMS_HEADER.as_bytes(), claims.as_bytes());
    sent[n + 1] = (signing::DATE_HEADER.as_bytes(), endorsement.date.as_bytes());
    n += 2;
    for (name, value) in &sent[..n] {
        w.put(&[name, b": ", value, b"\r\n"])?;
    }
    if let Some(key) = endorsement.key {
        let mac = signing::sign(key, method, body, &sent[..n], target).map_err(EndorseError::Sign)?;
        let value = signing::authorization_value(key, &mac);
        w.put(&[signing::AUTHORIZATION_HEADER.as_bytes(), b": ", value.as_bytes(), b"\r\n"])?;
    }
    w.put(&[b"\r\n"])?;
    Ok(w.len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_the_host_prefix_is_dropped() {
        for name in
            [&b"x-ms-azure-host-authorization"[..], b"X-MS-Azure-Host-Claims", b"x-ms-azure-host-date", b"Expect"]
        {
            assert!(is_dropped(name, false), "{}", String::from_utf8_lossy(name));
        }
        // Headers of the client that only share the first letters: forwarded.
        for name in [&b"x-ms-azure-hostname"[..], b"x-ms-azure-ho", b"x-ms-azure-host", b"x-ms-version", b"metadata"] {
            assert!(!is_dropped(name, false), "{}", String::from_utf8_lossy(name));
        }
        for name in [&b"Connection"[..], b"keep-alive", b"Proxy-Connection", b"TE", b"Upgrade"] {
            assert!(is_dropped(name, false), "hop-by-hop: {}", String::from_utf8_lossy(name));
        }
        assert!(!is_dropped(b"Trailer-Foo", false) && !is_dropped(b"Connection-Id", false));
        assert!(is_dropped(b"Transfer-Encoding", true));
        assert!(!is_dropped(b"Transfer-Encoding", false));
    }

    #[test]
    fn repeated_names_go_upstream_as_one_signed_field() {
        let req = b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\nMetadata: true\r\naccept: application/json\r\n\r\n";
        let head = RequestHead::parse(req).expect("parses").expect("complete");
        let key = SigningKey::from_hex("8f4d2c1e-9b3a-4e6f-8a7d-2c1b0e9f8a7d", &"ab".repeat(32)).expect("key");
        let date = "Wed, 02 Dec 2026 06:00:00 GMT";
        let endorsement = Endorsement { key: Some(&key), is_root: true, date };
        let mut out = [0_u8; 4096];
        let n = write_request_head(&head, req, RequestBody::Buffered(b""), &endorsement, &mut out).expect("written");
        let text = core::str::from_utf8(&out[..n]).expect("ascii");
        assert_eq!(text.matches("ccept:").count(), 1, "one field: {text}");
        assert!(text.contains("Accept: text/plain, application/json\r\n"), "{text}");
        // The signature is over exactly the list as sent.
        let sent: [(&[u8], &[u8]); 5] = [
            (b"Host", b"x"),
            (b"Accept", b"text/plain, application/json"),
            (b"Metadata", b"true"),
            (signing::CLAIMS_HEADER.as_bytes(), signing::CLAIMS_ROOT.as_bytes()),
            (signing::DATE_HEADER.as_bytes(), date.as_bytes()),
        ];
        let mac = signing::sign(&key, b"GET", b"", &sent, b"/metadata/instance?api-version=2021-02-01").expect("signs");
        let value = signing::authorization_value(&key, &mac);
        assert!(text.contains(value.as_str()), "{text}");
    }

    #[test]
    fn a_streamed_body_keeps_its_framing_and_is_never_signed() {
        let req = b"PUT /vmAgentLog HTTP/1.1\r\nHost: 168.63.129.16:32526\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\nX-MS-Azure-Host-Authorization: forged\r\n\r\n";
        let head = RequestHead::parse(req).expect("parses").expect("complete");
        let date = "Wed, 02 Dec 2026 06:00:00 GMT";
        let mut out = [0_u8; 4096];
        let unsigned = Endorsement { key: None, is_root: true, date };
        let n = write_request_head(&head, req, RequestBody::Streamed, &unsigned, &mut out).expect("written");
        let text = core::str::from_utf8(&out[..n]).expect("ascii");
        assert_eq!(
            text,
            "PUT /vmAgentLog HTTP/1.1\r\nHost: 168.63.129.16:32526\r\nTransfer-Encoding: chunked\r\n\
             x-ms-azure-host-claims: { \"isRoot\": \"true\"}\r\nx-ms-azure-host-date: Wed, 02 Dec 2026 06:00:00 GMT\r\n\r\n"
        );
        // The same head buffered: de-chunked, so the framing header becomes a length.
        let n = write_request_head(&head, req, RequestBody::Buffered(b"log"), &unsigned, &mut out).expect("written");
        let text = core::str::from_utf8(&out[..n]).expect("ascii");
        assert!(!text.contains("Transfer-Encoding") && text.contains("content-length: 3\r\n"), "{text}");
        // A key with a streamed body is a caller's mistake, refused rather than half-signed.
        let key = SigningKey::from_hex("8f4d2c1e-9b3a-4e6f-8a7d-2c1b0e9f8a7d", &"ab".repeat(32)).expect("key");
        let signed = Endorsement { key: Some(&key), is_root: true, date };
        assert_eq!(
            write_request_head(&head, req, RequestBody::Streamed, &signed, &mut out),
            Err(EndorseError::StreamedBodyCannotBeSigned)
        );
    }

    /// The spec's key (MSP §3.4) and a GUID for the authorization value.
    fn spec_key() -> SigningKey {
        SigningKey::from_hex(
            "9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf",
            "4A404E635266556A586E3272357538782F413F4428472B4B6250645367566B59",
        )
        .expect("the spec's key")
    }

    const SPEC_DATE: &str = "Wed, 23 Apr 2025 12:00:00 GMT";

    fn written(req: &[u8], body: RequestBody<'_>, key: Option<&SigningKey>, is_root: bool) -> String {
        let head = RequestHead::parse(req).expect("parses").expect("complete");
        let endorsement = Endorsement { key, is_root, date: SPEC_DATE };
        let mut out = [0_u8; 4096];
        let n = write_request_head(&head, req, body, &endorsement, &mut out).expect("written");
        String::from_utf8(out[..n].to_vec()).expect("ascii")
    }

    #[test]
    fn a_proxied_curl_request_goes_up_as_the_spec_signs_it_whatever_the_client_forged() {
        // MSP §3.4 vector 3: a non-root curl to IMDS. The client's own host headers, its
        // `Expect` and its `Connection` never reach the host, and do not change the signature.
        let req = b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: 169.254.169.254\r\n\
            User-Agent: curl/8.5.0\r\nAccept: */*\r\nX-MS-Azure-Host-Claims: { \"isRoot\": \"true\"}\r\n\
            Metadata: true\r\nx-ms-azure-host-authorization: Azure-HMAC-SHA256 forged 00\r\n\
            x-ms-azure-host-date: Thu, 01 Jan 2099 00:00:00 GMT\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n";
        let key = spec_key();
        assert_eq!(
            written(req, RequestBody::Buffered(b""), Some(&key), false),
            "GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: 169.254.169.254\r\n\
             User-Agent: curl/8.5.0\r\nAccept: */*\r\nMetadata: true\r\n\
             x-ms-azure-host-claims: { \"isRoot\": \"false\"}\r\nx-ms-azure-host-date: Wed, 23 Apr 2025 12:00:00 GMT\r\n\
             x-ms-azure-host-authorization: Azure-HMAC-SHA256 9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf \
             75afe2e9a612e6be0caaac7d967c639ab0b1141a193212de74ab4cce3657a6a6\r\n\r\n"
        );
    }

    #[test]
    fn a_dechunked_body_goes_up_with_its_length_and_is_signed_as_sent() {
        // MSP §3.4 vector 4, sent chunked by the client: de-chunked, the framing header becomes
        // `content-length: 7`, and the MAC is the vector's (the signature covers the list as
        // sent, sorted by name).
        let req = b"POST /machine?comp=health HTTP/1.1\r\nHost: 168.63.129.16\r\nTransfer-Encoding: chunked\r\n\
            Content-Type: application/json\r\n\r\n";
        let key = spec_key();
        assert_eq!(
            written(req, RequestBody::Buffered(b"{\"a\":1}"), Some(&key), true),
            "POST /machine?comp=health HTTP/1.1\r\nHost: 168.63.129.16\r\nContent-Type: application/json\r\n\
             content-length: 7\r\nx-ms-azure-host-claims: { \"isRoot\": \"true\"}\r\n\
             x-ms-azure-host-date: Wed, 23 Apr 2025 12:00:00 GMT\r\n\
             x-ms-azure-host-authorization: Azure-HMAC-SHA256 9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf \
             ee5d7beb3802e34afb744e7f4c224bb24747c4052e76f802a4a623bd9c20917e\r\n\r\n"
        );
        // The client's own length of a buffered body is kept in place.
        let req = b"POST /machine?comp=health HTTP/1.1\r\nContent-Length: 7\r\nContent-Type: application/json\r\n\
            Host: 168.63.129.16\r\n\r\n";
        let text = written(req, RequestBody::Buffered(b"{\"a\":1}"), Some(&key), true);
        assert!(text.contains("Content-Length: 7\r\n") && !text.contains("content-length"), "{text}");
        assert!(text.contains("ee5d7beb3802e34afb744e7f4c224bb24747c4052e76f802a4a623bd9c20917e"), "{text}");
    }

    #[test]
    fn an_http_1_0_request_goes_up_as_1_0_and_unsigned_without_a_key() {
        let req = b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.0\r\nHost: 169.254.169.254\r\n\
            User-Agent: curl/8.5.0\r\nAccept: */*\r\nMetadata: true\r\n\r\n";
        assert_eq!(
            written(req, RequestBody::Buffered(b""), None, false),
            "GET /metadata/instance?api-version=2021-02-01 HTTP/1.0\r\nHost: 169.254.169.254\r\n\
             User-Agent: curl/8.5.0\r\nAccept: */*\r\nMetadata: true\r\n\
             x-ms-azure-host-claims: { \"isRoot\": \"false\"}\r\nx-ms-azure-host-date: Wed, 23 Apr 2025 12:00:00 GMT\r\n\r\n"
        );
        // The version is not signed: the 1.0 request carries vector 3's MAC.
        let key = spec_key();
        let text = written(req, RequestBody::Buffered(b""), Some(&key), false);
        assert!(text.contains("75afe2e9a612e6be0caaac7d967c639ab0b1141a193212de74ab4cce3657a6a6"), "{text}");
    }

    #[test]
    fn a_head_that_does_not_fit_the_buffer_is_refused_not_cut() {
        let req = b"GET /metadata/instance HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n";
        let head = RequestHead::parse(req).expect("parses").expect("complete");
        let endorsement = Endorsement { key: None, is_root: true, date: SPEC_DATE };
        let mut out = [0_u8; 64];
        assert_eq!(
            write_request_head(&head, req, RequestBody::Buffered(b""), &endorsement, &mut out),
            Err(EndorseError::HeadTooLarge)
        );
    }
}
