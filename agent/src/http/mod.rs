// SPDX-License-Identifier: MIT
//! HTTP/1.x as the proxy needs it: the request head parsed in place (offsets into the
//! connection's fixed buffer, no copies), framing validated so that what we sign is exactly
//! what we send (MSP §11 item 4), chunked bodies decoded or scanned, and the upstream
//! response head parsed for its framing.
//!
//! The front door is the main attack surface: everything here is bounded by `limits` and
//! returns small `Copy` errors instead of panicking.

pub mod chunked;
pub mod request;
pub mod response;
pub mod status;

pub use self::chunked::{ChunkError, ChunkedDecoder};
pub use self::request::{BodyFraming, HeadError, RequestHead};
pub use self::response::{ResponseFraming, ResponseHead};
pub use self::status::{reason_phrase, status_line};

/// `value` in decimal ASCII (`u64::MAX` has 20 digits), without going through `core::fmt`:
/// `content-length` values, audit lines and telemetry parameters are written per request.
pub fn decimal(mut value: u64) -> heapless::Vec<u8, 20> {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + u8::try_from(value % 10).unwrap_or(0);
        value /= 10;
        if value == 0 {
            break;
        }
    }
    heapless::Vec::from_slice(&digits[at..]).unwrap_or_default()
}

/// The methods MSP §5.4 forwards, case-sensitive (RFC 9110 methods are). The front door's
/// first check (the request parser refuses any other method before looking at the target);
/// `policy` asks the same question when it explains or canonicalises a request.
pub fn method_allowed(method: &[u8]) -> bool {
    matches!(method, b"GET" | b"POST" | b"PUT" | b"DELETE" | b"HEAD" | b"OPTIONS" | b"PATCH")
}

/// Case-insensitive ASCII comparison of a header name or token.
pub fn eq_ignore_case(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Trims leading and trailing spaces and tabs (optional whitespace around header values).
pub fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Whether a comma-separated header value lists `token` (case-insensitive), e.g.
/// `Connection: keep-alive, close`.
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|b| *b == b',').any(|t| eq_ignore_case(trim_ows(t), token))
}

/// Parses a decimal `Content-Length` strictly: digits only, no sign, no overflow.
pub fn parse_content_length(v: &[u8]) -> Option<u64> {
    let v = trim_ows(v);
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    v.iter().try_fold(0u64, |acc, b| {
        let digit = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_allow_list_is_exact_and_case_sensitive() {
        for m in ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"] {
            assert!(method_allowed(m.as_bytes()), "{m}");
        }
        for m in ["get", "CONNECT", "TRACE", "WIDGET", "", "GET "] {
            assert!(!method_allowed(m.as_bytes()), "{m}");
        }
    }

    #[test]
    fn decimal_writes_every_width() {
        assert_eq!(decimal(0).as_slice(), b"0");
        assert_eq!(decimal(4096).as_slice(), b"4096");
        assert_eq!(decimal(u64::MAX).as_slice(), b"18446744073709551615");
    }

    #[test]
    fn content_length_is_strict() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b" 42 "), Some(42));
        assert_eq!(parse_content_length(b"+1"), None);
        assert_eq!(parse_content_length(b"1,1"), None);
        assert_eq!(parse_content_length(b""), None);
        assert_eq!(parse_content_length(b"99999999999999999999"), None);
    }

    #[test]
    fn connection_tokens_are_found_in_lists() {
        assert!(has_token(b"keep-alive, Close", b"close"));
        assert!(!has_token(b"closed", b"close"));
    }
}
