// SPDX-License-Identifier: MIT
//! The upstream response head: only what the relay needs to know where the response ends
//! (RFC 9112 §6.3) and whether the connection may be reused.

use super::{eq_ignore_case, has_token, parse_content_length, trim_ows};
use crate::limits::MAX_HEADERS;

/// How the response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body (HEAD request, 1xx, 204, 304, or `content-length: 0`).
    None,
    /// `content-length: n`.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the upstream closes.
    UntilClose,
}

/// A parsed upstream response head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Length of the head including the final CRLF.
    pub head_len: usize,
    /// Length of the status line including its CRLF (where extra headers may be inserted).
    pub status_line_len: usize,
    /// Body framing.
    pub framing: ResponseFraming,
    /// The upstream connection may carry another request.
    pub keep_alive: bool,
}

/// Why an upstream response head was refused (answered `502`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseError {
    /// Not a valid HTTP/1.x response head.
    Malformed,
    /// Conflicting or invalid framing headers.
    AmbiguousFraming,
}

impl ResponseHead {
    /// Parses a response head at the start of `buf`; `Ok(None)` when incomplete.
    pub fn parse(buf: &[u8], request_was_head: bool) -> Result<Option<Self>, ResponseError> {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut raw);
        let head_len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(ResponseError::Malformed),
        };
        let (Some(status), Some(version)) = (resp.code, resp.version) else {
            return Err(ResponseError::Malformed);
        };
        let status_line_len = buf.iter().position(|b| *b == b'\n').map_or(head_len, |p| p + 1);
        let mut keep_alive = version == 1;
        let mut length = None;
        let mut chunked = false;
        for h in resp.headers.iter() {
            let name = h.name.as_bytes();
            if eq_ignore_case(name, b"content-length") {
                let n = parse_content_length(h.value).ok_or(ResponseError::AmbiguousFraming)?;
                if length.is_some_and(|l| l != n) {
                    return Err(ResponseError::AmbiguousFraming);
                }
                length = Some(n);
            } else if eq_ignore_case(name, b"transfer-encoding") {
                chunked = has_token(h.value, b"chunked");
                if !chunked && !trim_ows(h.value).is_empty() {
                    // Another coding without chunked: delimited by close.
                    keep_alive = false;
                }
            } else if eq_ignore_case(name, b"connection") {
                if has_token(h.value, b"close") {
                    keep_alive = false;
                } else if has_token(h.value, b"keep-alive") && version == 0 {
                    keep_alive = true;
                }
            }
        }
        let framing = if request_was_head || (100..200).contains(&status) || status == 204 || status == 304 {
            ResponseFraming::None
        } else if chunked {
            ResponseFraming::Chunked
        } else {
            match length {
                Some(0) => ResponseFraming::None,
                Some(n) => ResponseFraming::Length(n),
                None => {
                    keep_alive = false;
                    ResponseFraming::UntilClose
                }
            }
        };
        Ok(Some(Self { status, head_len, status_line_len, framing, keep_alive }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_follows_rfc9112() {
        let r = ResponseHead::parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false).unwrap().unwrap();
        assert_eq!((r.status, r.framing, r.keep_alive), (200, ResponseFraming::Length(5), true));
        assert_eq!(r.status_line_len, 17);
        let r = ResponseHead::parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).unwrap().unwrap();
        assert_eq!(r.framing, ResponseFraming::None);
        let r = ResponseHead::parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false).unwrap().unwrap();
        assert_eq!(r.framing, ResponseFraming::Chunked);
        let r = ResponseHead::parse(b"HTTP/1.0 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert_eq!((r.framing, r.keep_alive), (ResponseFraming::UntilClose, false));
        let r = ResponseHead::parse(b"HTTP/1.1 204 No Content\r\n\r\n", false).unwrap().unwrap();
        assert_eq!(r.framing, ResponseFraming::None);
        let r = ResponseHead::parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(!r.keep_alive);
        assert!(
            ResponseHead::parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", false).is_err()
        );
        assert!(ResponseHead::parse(b"HTTP/1.1 200 OK\r\n", false).unwrap().is_none());
    }
}
