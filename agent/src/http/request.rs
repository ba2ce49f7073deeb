// SPDX-License-Identifier: MIT
//! The request head, parsed by httparse over the connection's fixed buffer and kept as
//! offsets, so the connection can hold it across events without copying or borrowing.
//!
//! Framing rules (MSP §11 item 4, RFC 9112 §6): a request with both `Content-Length` and
//! `Transfer-Encoding`, a repeated `Content-Length` or `Host`, a transfer coding other than
//! plain `chunked`, control bytes or obs-text in a header value, or a repeated `Host` is
//! refused with `400` and never forwarded. Any other repeated name is combined into one field
//! (values joined with `, `, RFC 9110 §5.3) when the request is written upstream, and that one
//! field is what is signed: the MSP signature covers one value per name, so forwarding the
//! repeats as they came would send bytes it does not cover.

use std::ops::Range;

use super::{eq_ignore_case, has_token, parse_content_length, trim_ows};
use crate::limits::MAX_HEADERS;

/// Why a request head was refused. Each maps to one status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Not valid HTTP/1.x (bad request line, bad header syntax, obs-fold) → 400.
    Malformed,
    /// More than `MAX_HEADERS` headers → 431.
    TooManyHeaders,
    /// The head does not fit in the buffer → 431.
    TooLarge,
    /// Ambiguous framing: CL+TE, repeated CL, unsupported transfer coding → 400.
    AmbiguousFraming,
    /// `Host` occurs twice → 400 (other repeated names are combined).
    RepeatedHeader,
    /// Control bytes in a header value → 400.
    ControlBytes,
    /// A header value byte at or above 0x80 (obs-text) → 400.
    ObsText,
    /// The target is not origin-form (`/path?query`) → 400.
    TargetForm,
    /// The method is not one the proxy forwards (CONNECT, TRACE, unknown) → 405.
    MethodNotAllowed,
}

impl HeadError {
    /// The status code this error is answered with.
    pub fn status(self) -> u16 {
        match self {
            Self::TooManyHeaders | Self::TooLarge => 431,
            Self::MethodNotAllowed => 405,
            _ => 400,
        }
    }
}

/// How the request body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// `Content-Length: n` (n > 0).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Offsets of one header's name and value in the buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeaderSpan {
    name: (u16, u16),
    value: (u16, u16),
}

/// A parsed, validated request head (offsets into the buffer it was parsed from).
#[derive(Clone, Copy, Debug)]
pub struct RequestHead {
    method: (u16, u16),
    target: (u16, u16),
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Length of the head including the final CRLF.
    pub head_len: usize,
    headers: [HeaderSpan; MAX_HEADERS],
    header_count: usize,
    /// Body framing.
    pub framing: BodyFraming,
    /// The client wants the connection closed after this response.
    pub close: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
}

#[expect(clippy::cast_possible_truncation, reason = "offsets are bounded by the u16-sized buffer (asserted)")]
fn span(buf: &[u8], part: &[u8]) -> (u16, u16) {
    // httparse hands out sub-slices of `buf`; their offsets fit in u16 because the buffer is
    // at most REQUEST_HEAD_MAX_BYTES (asserted at compile time below).
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    (start as u16, (start + part.len()) as u16)
}

const _: () = assert!(crate::limits::REQUEST_HEAD_MAX_BYTES <= u16::MAX as usize);

fn range((start, end): (u16, u16)) -> Range<usize> {
    usize::from(start)..usize::from(end)
}

impl RequestHead {
    /// Parses a head at the start of `buf`. `Ok(None)`: incomplete, read more (if `buf` is
    /// already full, the caller answers [`HeadError::TooLarge`]).
    pub fn parse(buf: &[u8]) -> Result<Option<Self>, HeadError> {
        let buf = &buf[..buf.len().min(crate::limits::REQUEST_HEAD_MAX_BYTES)];
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut raw);
        let head_len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
            Err(_) => return Err(HeadError::Malformed),
        };
        let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
            return Err(HeadError::Malformed);
        };
        // The method first (MSP §5.4 step 2): CONNECT's authority-form target is a method
        // problem (405 with Allow), not a malformed request.
        if !super::method_allowed(method.as_bytes()) {
            return Err(HeadError::MethodNotAllowed);
        }
        if !target.starts_with('/') {
            return Err(HeadError::TargetForm);
        }
        let mut head = Self {
            method: span(buf, method.as_bytes()),
            target: span(buf, target.as_bytes()),
            minor_version: version,
            head_len,
            headers: [HeaderSpan::default(); MAX_HEADERS],
            header_count: req.headers.len(),
            framing: BodyFraming::None,
            close: version == 0,
            expect_continue: false,
        };
        let mut content_length = None;
        let mut chunked = false;
        for (i, h) in req.headers.iter().enumerate() {
            let name = h.name.as_bytes();
            if h.value.iter().any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f) {
                return Err(HeadError::ControlBytes);
            }
            // obs-text (RFC 9110 §5.5): no client of the metadata services sends it, and the
            // signature covers ASCII values only; refused here rather than failing upstream.
            if h.value.iter().any(|b| *b >= 0x80) {
                return Err(HeadError::ObsText);
            }
            if req.headers[..i].iter().any(|p| eq_ignore_case(p.name.as_bytes(), name)) {
                if eq_ignore_case(name, b"content-length") || eq_ignore_case(name, b"transfer-encoding") {
                    return Err(HeadError::AmbiguousFraming);
                }
                if eq_ignore_case(name, b"host") {
                    return Err(HeadError::RepeatedHeader);
                }
                // Any other repeated name is combined into one field upstream (RFC 9110 §5.3),
                // and that one field is what is signed (`proxy::upstream`).
            }
            head.headers[i] = HeaderSpan { name: span(buf, name), value: span(buf, h.value) };
            if eq_ignore_case(name, b"content-length") {
                content_length = Some(parse_content_length(h.value).ok_or(HeadError::AmbiguousFraming)?);
            } else if eq_ignore_case(name, b"transfer-encoding") {
                // Only exactly `chunked`: anything else (gzip, "chunked, chunked", obfuscated
                // spellings) is a classic smuggling vector.
                if !eq_ignore_case(trim_ows(h.value), b"chunked") {
                    return Err(HeadError::AmbiguousFraming);
                }
                chunked = true;
            } else if eq_ignore_case(name, b"connection") {
                if has_token(h.value, b"close") {
                    head.close = true;
                } else if has_token(h.value, b"keep-alive") && version == 0 {
                    head.close = false;
                }
            } else if eq_ignore_case(name, b"expect") && eq_ignore_case(trim_ows(h.value), b"100-continue") {
                head.expect_continue = true;
            }
        }
        head.framing = match (content_length, chunked) {
            (Some(_), true) => return Err(HeadError::AmbiguousFraming),
            (Some(0) | None, false) => BodyFraming::None,
            (Some(n), false) => BodyFraming::Length(n),
            (None, true) => BodyFraming::Chunked,
        };
        Ok(Some(head))
    }

    /// The method token.
    pub fn method<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[range(self.method)]
    }

    /// The request-target as received.
    pub fn target<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[range(self.target)]
    }

    /// The target's path (before `?`).
    pub fn path<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        let t = self.target(buf);
        t.split(|b| *b == b'?').next().unwrap_or(t)
    }

    /// Headers as (name, value) in wire order.
    pub fn headers<'b>(&self, buf: &'b [u8]) -> impl Iterator<Item = (&'b [u8], &'b [u8])> + use<'b, '_> {
        self.headers[..self.header_count].iter().map(move |h| (&buf[range(h.name)], &buf[range(h.value)]))
    }

    /// The value of the header `name` (case-insensitive), if present.
    pub fn header<'b>(&self, buf: &'b [u8], name: &[u8]) -> Option<&'b [u8]> {
        self.headers(buf).find(|(n, _)| eq_ignore_case(n, name)).map(|(_, v)| v)
    }

    /// Whether the method is HEAD (its response has no body whatever it says).
    pub fn is_head(&self, buf: &[u8]) -> bool {
        self.method(buf) == b"HEAD"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static GET: &[u8] =
        b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n";

    #[test]
    fn parses_a_metadata_get_in_place() {
        let head = RequestHead::parse(GET).unwrap().unwrap();
        assert_eq!(head.method(GET), b"GET");
        assert_eq!(head.target(GET), b"/metadata/instance?api-version=2021-02-01");
        assert_eq!(head.path(GET), b"/metadata/instance");
        assert_eq!(head.header(GET, b"metadata"), Some(&b"true"[..]));
        assert_eq!(head.framing, BodyFraming::None);
        assert_eq!(head.head_len, GET.len());
        assert!(!head.close);
    }

    #[test]
    fn partial_head_asks_for_more() {
        assert!(RequestHead::parse(&GET[..20]).unwrap().is_none());
    }

    #[test]
    fn refuses_smuggling_shapes() {
        let cases: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        ];
        for c in cases {
            assert_eq!(
                RequestHead::parse(c).unwrap_err(),
                HeadError::AmbiguousFraming,
                "{}",
                String::from_utf8_lossy(c)
            );
        }
        assert_eq!(
            RequestHead::parse(b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n").unwrap_err(),
            HeadError::RepeatedHeader
        );
        assert_eq!(RequestHead::parse(b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n").unwrap_err(), HeadError::Malformed);
        assert_eq!(RequestHead::parse(b"GET http://a/ HTTP/1.1\r\n\r\n").unwrap_err(), HeadError::TargetForm);
        assert_eq!(RequestHead::parse(b"CONNECT a:1 HTTP/1.1\r\n\r\n").unwrap_err(), HeadError::MethodNotAllowed);
    }

    #[test]
    fn refuses_control_bytes_in_values() {
        assert!(RequestHead::parse(b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n").is_err());
        assert!(RequestHead::parse(b"GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n").is_err());
    }

    #[test]
    fn framing_and_connection_semantics() {
        let h = RequestHead::parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, BodyFraming::Chunked);
        let h = RequestHead::parse(b"POST / HTTP/1.1\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, BodyFraming::Length(7));
        assert!(h.expect_continue);
        let h = RequestHead::parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(h.close);
        let h = RequestHead::parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().unwrap();
        assert!(!h.close);
        let h = RequestHead::parse(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap().unwrap();
        assert!(h.close);
    }
}
