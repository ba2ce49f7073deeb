// SPDX-License-Identifier: MIT
//! Server-side HTTP/1.1 for the fake host: read one request, write one response.
//!
//! The fake host is a test oracle, so this parser keeps *exactly* what arrived: header names and
//! values as raw bytes, in arrival order, repeats included, and the body after de-chunking. It is
//! strict about framing (a request it cannot frame unambiguously gets `400` and the connection is
//! closed) because an agent bug that emits sloppy framing should show up in tests, not be papered
//! over. It is not hardened for hostile input beyond fixed size limits: it only ever faces the
//! agent under test.

use std::io::{self, BufRead, Read, Write};

/// Longest request head (request line plus headers) accepted; far above anything the agent
/// sends, small enough that a runaway client cannot exhaust memory.
const HEAD_MAX_BYTES: usize = 64 * 1024;
/// Most headers accepted in one request.
const MAX_HEADERS: usize = 256;
/// Largest body accepted: the agent streams skip-list bodies of up to 100 MiB (spec §3.7), plus
/// headroom.
const BODY_MAX_BYTES: usize = 110 * 1024 * 1024;
/// Initial body allocation cap, so a lying `Content-Length` cannot reserve memory up front.
const BODY_PREALLOC_MAX_BYTES: usize = 64 * 1024;

/// Why a request could not be read.
#[derive(Debug)]
pub(crate) enum HttpError {
    /// The socket failed or closed mid-request.
    Io(io::Error),
    /// The bytes are not a request this server can frame; the text says which rule broke.
    Malformed(&'static str),
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "i/o error while reading request: {e}"),
            Self::Malformed(why) => write!(f, "malformed request: {why}"),
        }
    }
}

/// One request as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    /// Method token as sent.
    pub(crate) method: String,
    /// Request-target as sent (origin form normally).
    pub(crate) target: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub(crate) version: String,
    /// Headers in arrival order: raw name, raw value with the leading optional whitespace after
    /// the colon removed and trailing whitespace kept (so `Metadata: True ` records `True `).
    pub(crate) headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Body bytes after de-chunking.
    pub(crate) body: Vec<u8>,
}

impl Request {
    /// Last value of a header (case-insensitive name), trimmed.
    pub(crate) fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().rev().find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v.trim_ascii())
    }

    /// All values of a header (case-insensitive name), in order.
    pub(crate) fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v.as_slice())
    }

    /// Path part of the target (before `?`).
    pub(crate) fn path(&self) -> &str {
        self.target.split_once('?').map_or(self.target.as_str(), |(p, _)| p)
    }

    /// Query part of the target (after the first `?`), if any.
    pub(crate) fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// Whether the client asked to keep the connection open, per RFC 9112 §9.3: HTTP/1.1
    /// persists unless `Connection: close`; HTTP/1.0 closes unless `Connection: keep-alive`.
    pub(crate) fn keep_alive(&self) -> bool {
        let has_token = |token: &str| {
            self.header_all("connection")
                .any(|v| v.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes())))
        };
        if self.version == "HTTP/1.0" { has_token("keep-alive") } else { !has_token("close") }
    }
}

/// Reads one request. `Ok(None)` means the peer closed cleanly before sending a byte (the normal
/// end of a keep-alive connection).
pub(crate) fn read_request<R: BufRead>(reader: &mut R) -> Result<Option<Request>, HttpError> {
    let mut budget = HEAD_MAX_BYTES;
    let Some(request_line) = read_line(reader, &mut budget)? else {
        return Ok(None);
    };
    let (method, target, version) = parse_request_line(&request_line)?;

    let mut headers = Vec::new();
    loop {
        let Some(line) = read_line(reader, &mut budget)? else {
            return Err(HttpError::Io(io::ErrorKind::UnexpectedEof.into()));
        };
        if line.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(HttpError::Malformed("too many headers"));
        }
        headers.push(parse_header_line(&line)?);
    }

    let body = read_body(reader, &headers)?;
    Ok(Some(Request { method, target, version, headers, body }))
}

/// Reads a line ending in CRLF (a bare LF is tolerated) and returns it without the terminator.
/// `None` only on EOF before the first byte of the line.
fn read_line<R: BufRead>(reader: &mut R, budget: &mut usize) -> Result<Option<Vec<u8>>, HttpError> {
    let mut line = Vec::new();
    loop {
        let available = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if available.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(HttpError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let (take, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if take > *budget {
            return Err(HttpError::Malformed("request head too large"));
        }
        *budget -= take;
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(line));
        }
    }
}

fn parse_request_line(line: &[u8]) -> Result<(String, String, String), HttpError> {
    let text = std::str::from_utf8(line).map_err(|_utf8| HttpError::Malformed("request line not utf-8"))?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed("request line is not `METHOD SP TARGET SP VERSION`"));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(HttpError::Malformed("invalid method token"));
    }
    if target.is_empty() || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(HttpError::Malformed("invalid request-target"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::Malformed("unsupported http version"));
    }
    Ok((method.to_owned(), target.to_owned(), version.to_owned()))
}

fn parse_header_line(line: &[u8]) -> Result<(Vec<u8>, Vec<u8>), HttpError> {
    if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        // obs-fold: RFC 9112 §5.2 lets a server reject it, and a fake should surface it.
        return Err(HttpError::Malformed("obsolete line folding"));
    }
    let colon = line.iter().position(|b| *b == b':').ok_or(HttpError::Malformed("header line without colon"))?;
    let (name, rest) = line.split_at(colon);
    if name.is_empty() || !name.iter().copied().all(is_tchar) {
        return Err(HttpError::Malformed("invalid header name"));
    }
    let value = &rest[1..];
    if value.iter().any(|b| (*b < b' ' && *b != b'\t') || *b == 0x7f) {
        return Err(HttpError::Malformed("control byte in header value"));
    }
    let start = value.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(value.len());
    Ok((name.to_vec(), value[start..].to_vec()))
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn read_body<R: BufRead>(reader: &mut R, headers: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<u8>, HttpError> {
    let mut transfer_codings = Vec::new();
    for value in header_values(headers, "transfer-encoding") {
        for coding in value.split(|b| *b == b',') {
            transfer_codings.push(coding.trim_ascii().to_ascii_lowercase());
        }
    }
    if let Some(last) = transfer_codings.last() {
        // RFC 9112 §6.1: chunked must be the final coding of a request, else it cannot be framed.
        if last.as_slice() != b"chunked" {
            return Err(HttpError::Malformed("transfer-encoding without final chunked"));
        }
        return read_chunked(reader);
    }

    let mut length: Option<usize> = None;
    for value in header_values(headers, "content-length") {
        let parsed = parse_decimal(value).ok_or(HttpError::Malformed("invalid content-length"))?;
        if length.is_some_and(|l| l != parsed) {
            return Err(HttpError::Malformed("conflicting content-length headers"));
        }
        length = Some(parsed);
    }
    let length = length.unwrap_or(0);
    if length > BODY_MAX_BYTES {
        return Err(HttpError::Malformed("body too large"));
    }
    read_exact_vec(reader, length)
}

/// Trimmed values of every header called `name` (case-insensitive).
fn header_values<'a>(headers: &'a [(Vec<u8>, Vec<u8>)], name: &'static str) -> impl Iterator<Item = &'a [u8]> {
    headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v.trim_ascii())
}

fn read_exact_vec<R: BufRead>(reader: &mut R, length: usize) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::with_capacity(length.min(BODY_PREALLOC_MAX_BYTES));
    let read = reader.take(length as u64).read_to_end(&mut body)?;
    if read != length {
        return Err(HttpError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(body)
}

fn read_chunked<R: BufRead>(reader: &mut R) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    let mut budget = HEAD_MAX_BYTES;
    loop {
        let line = read_line(reader, &mut budget)?.ok_or(HttpError::Io(io::ErrorKind::UnexpectedEof.into()))?;
        // Chunk extensions (`;name=value`) carry nothing the fake needs.
        let size_text = line.split(|b| *b == b';').next().unwrap_or_default().trim_ascii();
        let size = parse_hex(size_text).ok_or(HttpError::Malformed("invalid chunk size"))?;
        if size == 0 {
            break;
        }
        if body.len().saturating_add(size) > BODY_MAX_BYTES {
            return Err(HttpError::Malformed("body too large"));
        }
        body.extend_from_slice(&read_exact_vec(reader, size)?);
        let terminator = read_line(reader, &mut budget)?.ok_or(HttpError::Io(io::ErrorKind::UnexpectedEof.into()))?;
        if !terminator.is_empty() {
            return Err(HttpError::Malformed("chunk data not followed by crlf"));
        }
    }
    // Trailer section: read up to the empty line; trailers are not signed by the agent, so they
    // are dropped.
    loop {
        let line = read_line(reader, &mut budget)?.ok_or(HttpError::Io(io::ErrorKind::UnexpectedEof.into()))?;
        if line.is_empty() {
            return Ok(body);
        }
    }
}

fn parse_decimal(text: &[u8]) -> Option<usize> {
    if text.is_empty() || text.len() > 18 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    text.iter().try_fold(0usize, |acc, d| acc.checked_mul(10)?.checked_add(usize::from(d - b'0')))
}

fn parse_hex(text: &[u8]) -> Option<usize> {
    if text.is_empty() || text.len() > 15 {
        return None;
    }
    text.iter().try_fold(0usize, |acc, d| {
        let digit = char::from(*d).to_digit(16)?;
        acc.checked_mul(16)?.checked_add(usize::try_from(digit).ok()?)
    })
}

/// A response to serialise. `Content-Length` and `Connection` are added by [`write_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Response {
    /// A response with a `Content-Type` and body.
    pub(crate) fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Self { status, headers: vec![("Content-Type".to_owned(), content_type.to_owned())], body: body.into() }
    }

    /// A JSON response (`application/json; charset=utf-8`).
    pub(crate) fn json(status: u16, value: &serde_json::Value) -> Self {
        Self::new(status, "application/json; charset=utf-8", value.to_string())
    }
}

/// Writes `response`; with `head_only` the body is omitted but `Content-Length` still states its
/// size (RFC 9110 §9.3.2). `close` adds `Connection: close`; `keep_alive_http10` adds
/// `Connection: keep-alive` for an HTTP/1.0 client that asked for it.
pub(crate) fn write_response<W: Write>(
    out: &mut W,
    response: &Response,
    head_only: bool,
    close: bool,
    keep_alive_http10: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", response.status, reason(response.status));
    for (name, value) in &response.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
    if close {
        head.push_str("Connection: close\r\n");
    } else if keep_alive_http10 {
        head.push_str("Connection: keep-alive\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    if !head_only {
        bytes.extend_from_slice(&response.body);
    }
    out.write_all(&bytes)?;
    out.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<Request>, HttpError> {
        read_request(&mut io::BufReader::new(raw))
    }

    static AGENT_STATUS_GET: &[u8] = b"GET /secure-channel/status HTTP/1.1\r\n\
metadata: True \r\n\
host: 168.63.129.16\r\n\
content-length: 0\r\n\
\r\n";

    #[test]
    fn keeps_headers_in_order_with_raw_values() {
        let req = parse(AGENT_STATUS_GET).unwrap().unwrap();
        assert_eq!(req.method, "GET");
        assert_eq!(req.target, "/secure-channel/status");
        assert_eq!(req.version, "HTTP/1.1");
        assert_eq!(
            req.headers,
            vec![
                (b"metadata".to_vec(), b"True ".to_vec()),
                (b"host".to_vec(), b"168.63.129.16".to_vec()),
                (b"content-length".to_vec(), b"0".to_vec()),
            ]
        );
        assert_eq!(req.header("METADATA"), Some(&b"True"[..]));
        assert!(req.keep_alive());
    }

    #[test]
    fn reads_pipelined_requests_and_clean_eof() {
        let raw = b"POST /a?x=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.0\r\n\r\n";
        let mut reader = io::BufReader::new(&raw[..]);
        let first = read_request(&mut reader).unwrap().unwrap();
        assert_eq!(first.body, b"abc");
        assert_eq!(first.path(), "/a");
        assert_eq!(first.query(), Some("x=1"));
        let second = read_request(&mut reader).unwrap().unwrap();
        assert_eq!(second.target, "/b");
        assert!(!second.keep_alive(), "HTTP/1.0 closes by default");
        assert!(read_request(&mut reader).unwrap().is_none());
    }

    #[test]
    fn dechunks_body_with_extensions_and_trailers() {
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nx-trailer: y\r\n\r\n";
        let req = parse(raw).unwrap().unwrap();
        assert_eq!(req.body, b"Wikipedia");
    }

    #[test]
    fn connection_header_controls_persistence() {
        let close = parse(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").unwrap().unwrap();
        assert!(!close.keep_alive());
        let ka = parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().unwrap();
        assert!(ka.keep_alive());
    }

    #[test]
    fn rejects_ambiguous_framing() {
        for raw in [
            &b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"[..],
            b"GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\na",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(matches!(parse(raw), Err(HttpError::Malformed(_))), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn truncated_body_is_an_io_error() {
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc";
        assert!(matches!(parse(raw), Err(HttpError::Io(_))));
    }

    #[test]
    fn writes_content_length_and_omits_body_for_head() {
        let resp = Response::new(200, "text/plain", "hello");
        let mut out = Vec::new();
        write_response(&mut out, &resp, true, true, false).unwrap();
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
        );
        let mut out = Vec::new();
        write_response(&mut out, &resp, false, false, false).unwrap();
        assert!(out.ends_with(b"Content-Length: 5\r\n\r\nhello"));
    }
}
