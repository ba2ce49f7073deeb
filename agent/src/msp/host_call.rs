// SPDX-License-Identifier: MIT
//! The agent's own calls to the host (MSP §1.2): a small non-blocking HTTP/1.1 client that
//! runs inside the event loop, one call at a time, each with a deadline, so a slow or hung
//! host never stalls the proxy (§11 item 9).
//!
//! Requests carry exactly the headers of §1.2 (`x-ms-azure-host-date`, `host` without port,
//! `x-ms-azure-host-claims` root, `content-length`, plus the call's own) and are signed over
//! exactly those bytes when a key is given. The socket carries the agent's `SO_MARK`, so the
//! kernel never redirects it back to the proxy.

use std::io::{self, Read, Write};
use std::net::SocketAddrV4;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::signing::{self, SigningKey};
use crate::clock;
use crate::http::{ChunkedDecoder, ResponseFraming, ResponseHead, eq_ignore_case};
use crate::limits::HOST_RESPONSE_MAX_BYTES;

/// Why a host call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostCallError {
    /// The TCP connect failed or was refused.
    Connect(io::ErrorKind),
    /// Reading or writing failed.
    Io(io::ErrorKind),
    /// No complete response before the deadline.
    Timeout,
    /// The host closed before a complete response.
    Closed,
    /// The response is not valid HTTP.
    BadResponse,
    /// The response is larger than [`HOST_RESPONSE_MAX_BYTES`].
    TooLarge,
    /// The request could not be signed.
    Sign(signing::SignError),
}

impl core::fmt::Display for HostCallError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Connect(k) => write!(f, "connect failed: {k}"),
            Self::Io(k) => write!(f, "I/O error: {k}"),
            Self::Timeout => f.write_str("timed out"),
            Self::Closed => f.write_str("connection closed before a complete response"),
            Self::BadResponse => f.write_str("malformed HTTP response"),
            Self::TooLarge => f.write_str("response too large"),
            Self::Sign(e) => write!(f, "signing failed: {e:?}"),
        }
    }
}

/// A complete host response.
#[derive(Debug)]
pub struct HostResponse {
    /// Status code.
    pub status: u16,
    /// De-chunked body.
    pub body: Vec<u8>,
    /// `x-ms-azure-host-date` if present, else `Date`: `(value, was_custom_header)`.
    pub date: Option<(heapless::String<40>, bool)>,
}

/// Builds a request per §1.2. `extra` are the call's own headers, in order.
pub fn build_request(
    method: &str,
    target: &str,
    host: SocketAddrV4,
    extra: &[(&str, &str)],
    body: &[u8],
    date: &str,
    key: Option<&SigningKey>,
) -> Result<Vec<u8>, HostCallError> {
    let host_ip = host.ip().to_string();
    let length = body.len().to_string();
    let mut headers: Vec<(&[u8], &[u8])> = vec![
        (signing::DATE_HEADER.as_bytes(), date.as_bytes()),
        (b"host", host_ip.as_bytes()),
        (signing::CLAIMS_HEADER.as_bytes(), signing::CLAIMS_ROOT.as_bytes()),
        (b"content-length", length.as_bytes()),
    ];
    headers.extend(extra.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let mut out = Vec::with_capacity(512 + body.len());
    out.extend_from_slice(format!("{method} {target} HTTP/1.1\r\n").as_bytes());
    for (n, v) in &headers {
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(key) = key {
        let mac =
            signing::sign(key, method.as_bytes(), body, &headers, target.as_bytes()).map_err(HostCallError::Sign)?;
        let value = signing::authorization_value(key, &mac);
        out.extend_from_slice(format!("{}: {}\r\n", signing::AUTHORIZATION_HEADER, value.as_str()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    Ok(out)
}

/// One call in flight.
#[derive(Debug)]
pub struct HostCall {
    stream: TcpStream,
    out: Vec<u8>,
    sent: usize,
    input: Vec<u8>,
    connected: bool,
    /// When the call gives up.
    pub deadline: Instant,
}

impl HostCall {
    /// Starts the connect and registers the socket under `token`.
    pub fn start(
        registry: &Registry,
        token: Token,
        destination: SocketAddrV4,
        mark: u32,
        request: Vec<u8>,
        now: Instant,
        timeout_ms: u64,
    ) -> Result<Self, HostCallError> {
        let std_stream = crate::sys::connect_marked(destination, mark).map_err(|e| HostCallError::Connect(e.kind()))?;
        let mut stream = TcpStream::from_std(std_stream);
        registry
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| HostCallError::Io(e.kind()))?;
        Ok(Self {
            stream,
            out: request,
            sent: 0,
            input: Vec::new(),
            connected: false,
            deadline: clock::after(now, timeout_ms),
        })
    }

    /// Deregisters the socket (the call is over or abandoned).
    pub fn finish(mut self, registry: &Registry) {
        drop(registry.deregister(&mut self.stream));
    }

    /// Makes what progress the socket allows. `None` while the call is still running.
    pub fn drive(&mut self, now: Instant) -> Option<Result<HostResponse, HostCallError>> {
        if now >= self.deadline {
            return Some(Err(HostCallError::Timeout));
        }
        if !self.connected {
            if let Ok(Some(e)) = self.stream.take_error() {
                return Some(Err(HostCallError::Connect(e.kind())));
            }
            match self.stream.peer_addr() {
                Ok(_) => self.connected = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return None,
                Err(e) => return Some(Err(HostCallError::Connect(e.kind()))),
            }
        }
        while self.sent < self.out.len() {
            match self.stream.write(&self.out[self.sent..]) {
                Ok(0) => return Some(Err(HostCallError::Closed)),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(HostCallError::Io(e.kind()))),
            }
        }
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Some(parse_response(&self.input, true).unwrap_or(Err(HostCallError::Closed))),
                Ok(n) => {
                    if self.input.len() + n > HOST_RESPONSE_MAX_BYTES {
                        return Some(Err(HostCallError::TooLarge));
                    }
                    self.input.extend_from_slice(&chunk[..n]);
                    if let Some(done) = parse_response(&self.input, false) {
                        return Some(done);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(HostCallError::Io(e.kind()))),
            }
        }
    }
}

/// A complete response from `input`, `None` if more bytes are needed (`closed`: no more will
/// come, so a close-delimited body is complete).
fn parse_response(input: &[u8], closed: bool) -> Option<Result<HostResponse, HostCallError>> {
    let head = match ResponseHead::parse(input, false) {
        Ok(Some(h)) => h,
        Ok(None) => return closed.then_some(Err(HostCallError::Closed)),
        Err(_) => return Some(Err(HostCallError::BadResponse)),
    };
    let rest = &input[head.head_len..];
    let body = match head.framing {
        ResponseFraming::None => Vec::new(),
        ResponseFraming::Length(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if rest.len() < n {
                return closed.then_some(Err(HostCallError::Closed));
            }
            rest[..n].to_vec()
        }
        ResponseFraming::Chunked => {
            let mut decoder = ChunkedDecoder::new();
            let mut body = Vec::new();
            if decoder.feed(rest, |d| body.extend_from_slice(d)).is_err() {
                return Some(Err(HostCallError::BadResponse));
            }
            if !decoder.is_done() {
                return closed.then_some(Err(HostCallError::Closed));
            }
            body
        }
        ResponseFraming::UntilClose => {
            if !closed {
                return None;
            }
            rest.to_vec()
        }
    };
    Some(Ok(HostResponse { status: head.status, body, date: host_date(&input[..head.head_len]) }))
}

/// §2.9: the custom header wins; `Date` only when it is absent.
fn host_date(head: &[u8]) -> Option<(heapless::String<40>, bool)> {
    let mut raw = [httparse::EMPTY_HEADER; crate::limits::MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw);
    resp.parse(head).ok()?;
    let find = |name: &[u8]| resp.headers.iter().find(|h| eq_ignore_case(h.name.as_bytes(), name)).map(|h| h.value);
    let (value, custom) = match find(signing::DATE_HEADER.as_bytes()) {
        Some(v) => (v, true),
        None => (find(b"date")?, false),
    };
    let text = core::str::from_utf8(value).ok()?.trim();
    Some((heapless::String::try_from(text).ok()?, custom))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_chunked_and_close_delimited_responses() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-ms-azure-host-date: Wed, 23 Apr 2025 12:00:00 GMT\r\n\r\nok",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        assert_eq!(r.date.unwrap(), (heapless::String::try_from("Wed, 23 Apr 2025 12:00:00 GMT").unwrap(), true));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", false).is_none());
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(r.body, b"ok");
        let r = parse_response(b"HTTP/1.0 403 Forbidden\r\nDate: x\r\n\r\nno", true).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_slice()), (403, &b"no"[..]));
        assert!(!r.date.unwrap().1);
    }

    #[test]
    fn agent_requests_carry_the_spec_headers_in_order() {
        let host: SocketAddrV4 = "168.63.129.16:80".parse().unwrap();
        let req = build_request(
            "GET",
            "/secure-channel/status",
            host,
            &[("metadata", "True ")],
            b"",
            "Wed, 23 Apr 2025 12:00:00 GMT",
            None,
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&req).unwrap(),
            "GET /secure-channel/status HTTP/1.1\r\nx-ms-azure-host-date: Wed, 23 Apr 2025 12:00:00 GMT\r\nhost: 168.63.129.16\r\n\
             x-ms-azure-host-claims: { \"isRoot\": \"true\"}\r\ncontent-length: 0\r\nmetadata: True \r\n\r\n"
        );
    }
}
