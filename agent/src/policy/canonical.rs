// SPDX-License-Identifier: MIT
//! What the allowlist sees of a request target: the front-door checks of MSP §4.8 (method
//! allow-list, traversal guard), the *legacy* decoded path and query of §4.3 steps 2–3 that
//! decide every request, and the strict *shadow* canonical form of §4.8 that is only compared
//! and reported.
//!
//! Read MSP §4.3 and §4.8 first. Everything here works in caller-supplied fixed buffers
//! ([`DecodeScratch`]) so a per-request decision never allocates.
//!
//! Two deliberate choices the spec leaves open:
//! * lower-casing is per character (`char::to_lowercase`) on both the rule and the request side.
//!   `str::to_lowercase` has a context rule (final sigma) that would make the two sides
//!   disagree depending on what follows a letter; one function on both sides cannot.
//! * legacy query pairs are visited in the order *real query first, then pairs found after a
//!   decoded `%3F` in the path*. Rules use "the first pair with this key", and the real query is
//!   what the upstream server acts on, so it must win a conflict.

use core::fmt;

use crate::http::method_allowed;
use crate::limits::REQUEST_HEAD_MAX_BYTES;

/// Longest request target handled. A target comes out of a request head, which is never longer.
pub const TARGET_MAX_BYTES: usize = REQUEST_HEAD_MAX_BYTES;
/// Decoded-output room. Each raw byte becomes at most 3 bytes: an invalid byte turns into
/// U+FFFD (3 bytes), and lower-casing grows a character by at most half (`İ` → `i̇`, 2 → 3
/// bytes); percent-decoding only shrinks. So 3× the target can never overflow.
pub const DECODED_MAX_BYTES: usize = 3 * TARGET_MAX_BYTES;

/// Separates a key from its value in an encoded pair list. Never part of valid UTF-8.
const KEY_END: u8 = 0xFF;
/// Ends one pair in an encoded pair list. Never part of valid UTF-8.
const PAIR_END: u8 = 0xFE;

/// Why the traversal guard refused a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardError {
    /// `//` somewhere in the raw path.
    DoubleSlash,
    /// `..` in the once-decoded path (`..`, `%2e%2e`, `.%2E`, …).
    DotDot,
}

impl GuardError {
    /// Short name for logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DoubleSlash => "double-slash",
            Self::DotDot => "dot-dot",
        }
    }
}

/// The traversal guard of MSP §4.8, on the raw path (without the query; passing the whole
/// target is stricter, never looser).
///
/// Lossy UTF-8 conversion only replaces non-ASCII bytes, so "the decoded bytes hold two
/// adjacent dots" is exactly "the lossy decoded string contains `..`"; no buffer needed.
pub fn traversal_guard(raw_path: &[u8]) -> Result<(), GuardError> {
    if raw_path.windows(2).any(|w| w == b"//") {
        return Err(GuardError::DoubleSlash);
    }
    let mut previous_dot = false;
    for byte in LenientDecode::new(raw_path) {
        let dot = byte == b'.';
        if dot && previous_dot {
            return Err(GuardError::DotDot);
        }
        previous_dot = dot;
    }
    Ok(())
}

/// A request target that no real client sends and that the allowlist and a real upstream could
/// read differently (MSP §11 as extended in docs/DESIGN.md "Targets refused before
/// authorization"). Answered `400` before anything else looks at the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmbiguousTarget {
    /// `#` anywhere: a fragment is never sent on the wire; a server may read past it, the
    /// allowlist (like a browser) would not.
    Fragment,
    /// A path segment that is `.` or `..` once percent-decoded: servers differ on whether
    /// and when they remove them.
    DotSegment,
    /// `\` or `%5C` in the path: some servers treat it as a separator.
    Backslash,
    /// `%00` or a raw control byte: C-string truncation upstream.
    NulOrControl,
}

impl AmbiguousTarget {
    /// Short name for the audit record and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fragment => "target-fragment",
            Self::DotSegment => "target-dot-segment",
            Self::Backslash => "target-backslash",
            Self::NulOrControl => "target-nul",
        }
    }
}

/// Checks a raw request target (path and query) for the forms of [`AmbiguousTarget`].
pub fn ambiguous_target(target: &[u8]) -> Result<(), AmbiguousTarget> {
    if target.contains(&b'#') {
        return Err(AmbiguousTarget::Fragment);
    }
    if target.iter().any(|b| b.is_ascii_control()) || LenientDecode::new(target).any(|b| b == 0) {
        return Err(AmbiguousTarget::NulOrControl);
    }
    let path = target.split(|b| *b == b'?').next().unwrap_or(target);
    if path.contains(&b'\\') || LenientDecode::new(path).any(|b| b == b'\\') {
        return Err(AmbiguousTarget::Backslash);
    }
    for segment in path.split(|b| *b == b'/') {
        let mut decoded = LenientDecode::new(segment);
        let (first, second, third) = (decoded.next(), decoded.next(), decoded.next());
        let dots = matches!((first, second, third), (Some(b'.'), None, None) | (Some(b'.'), Some(b'.'), None));
        if dots {
            return Err(AmbiguousTarget::DotSegment);
        }
    }
    Ok(())
}

/// Why a request target could not be taken apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetError {
    /// Neither origin-form (`/path`) nor absolute-form (`scheme://authority/path`).
    Form,
    /// Longer than [`TARGET_MAX_BYTES`].
    TooLong,
}

/// A request target split into its RFC 3986 parts, without any decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetParts<'a> {
    /// Scheme of an absolute-form target.
    pub scheme: Option<&'a [u8]>,
    /// Authority of an absolute-form target (may hold userinfo and port).
    pub authority: Option<&'a [u8]>,
    /// Raw path; `/` when an absolute-form target has none.
    pub path: &'a [u8],
    /// Raw query, without the `?`.
    pub query: Option<&'a [u8]>,
    /// Raw fragment, without the `#`. Never sent by real clients; never matched.
    pub fragment: Option<&'a [u8]>,
}

/// Splits an origin-form or absolute-form request target.
pub fn split_target(target: &[u8]) -> Result<TargetParts<'_>, TargetError> {
    if target.len() > TARGET_MAX_BYTES {
        return Err(TargetError::TooLong);
    }
    let (rest, fragment) = split_once(target, b'#');
    let (scheme, authority, rest) = if rest.first() == Some(&b'/') {
        (None, None, rest)
    } else {
        let colon = rest.iter().position(|b| *b == b':').ok_or(TargetError::Form)?;
        let (scheme, after) = rest.split_at(colon);
        let valid_scheme = scheme.first().is_some_and(u8::is_ascii_alphabetic)
            && scheme.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
        let after = after.strip_prefix(b"://").ok_or(TargetError::Form)?;
        if !valid_scheme {
            return Err(TargetError::Form);
        }
        let end = after.iter().position(|b| matches!(b, b'/' | b'?')).unwrap_or(after.len());
        let (authority, rest) = after.split_at(end);
        (Some(scheme), Some(authority), rest)
    };
    let (path, query) = split_once(rest, b'?');
    let path: &[u8] = if path.is_empty() { b"/" } else { path };
    Ok(TargetParts { scheme, authority, path, query, fragment })
}

fn split_once(bytes: &[u8], separator: u8) -> (&[u8], Option<&[u8]>) {
    match bytes.iter().position(|b| *b == separator) {
        Some(i) => (&bytes[..i], Some(&bytes[i + 1..])),
        None => (bytes, None),
    }
}

/// Percent-decoding as the legacy matcher does it: a `%` not followed by two hex digits stays
/// a literal `%`.
struct LenientDecode<'a> {
    input: &'a [u8],
    at: usize,
}

impl<'a> LenientDecode<'a> {
    fn new(input: &'a [u8]) -> Self {
        Self { input, at: 0 }
    }
}

impl Iterator for LenientDecode<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let byte = *self.input.get(self.at)?;
        if byte == b'%' {
            let high = self.input.get(self.at + 1).copied().and_then(crate::text::hex_value);
            let low = self.input.get(self.at + 2).copied().and_then(crate::text::hex_value);
            if let (Some(high), Some(low)) = (high, low) {
                self.at += 3;
                return Some(high << 4 | low);
            }
        }
        self.at += 1;
        Some(byte)
    }
}

/// Fixed work space for decoding one request target (about 32 KiB: keep it on the stack of
/// the request path, or reuse one per connection).
#[derive(Debug)]
pub struct DecodeScratch {
    raw: [u8; TARGET_MAX_BYTES],
    out: [u8; DECODED_MAX_BYTES],
}

impl Default for DecodeScratch {
    fn default() -> Self {
        Self::new()
    }
}

impl DecodeScratch {
    /// Zeroed scratch.
    pub fn new() -> Self {
        Self { raw: [0; TARGET_MAX_BYTES], out: [0; DECODED_MAX_BYTES] }
    }
}

/// The decoded output ran out of room; only possible for inputs over [`TARGET_MAX_BYTES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Overflow;

/// Appends into a fixed buffer.
struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn push(&mut self, byte: u8) -> Result<(), Overflow> {
        let slot = self.buf.get_mut(self.len).ok_or(Overflow)?;
        *slot = byte;
        self.len += 1;
        Ok(())
    }

    fn push_slice(&mut self, bytes: &[u8]) -> Result<(), Overflow> {
        let end = self.len.checked_add(bytes.len()).ok_or(Overflow)?;
        self.buf.get_mut(self.len..end).ok_or(Overflow)?.copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    /// Per-character Unicode lower-casing of valid UTF-8.
    fn push_lower(&mut self, text: &str) -> Result<(), Overflow> {
        for c in text.chars() {
            if c.is_ascii() {
                self.push(c.to_ascii_lowercase() as u8)?;
            } else {
                for lower in c.to_lowercase() {
                    let mut utf8 = [0u8; 4];
                    self.push_slice(lower.encode_utf8(&mut utf8).as_bytes())?;
                }
            }
        }
        Ok(())
    }

    /// Lossy UTF-8 (each invalid sequence becomes one U+FFFD, as `from_utf8_lossy` does), then
    /// lower-cased.
    fn push_lossy_lower(&mut self, bytes: &[u8]) -> Result<(), Overflow> {
        for chunk in bytes.utf8_chunks() {
            self.push_lower(chunk.valid())?;
            if !chunk.invalid().is_empty() {
                self.push_slice("\u{FFFD}".as_bytes())?;
            }
        }
        Ok(())
    }
}

/// Lower-cases `text` the way request paths and query pairs are lower-cased, into a heapless
/// string; `None` if it does not fit. Used when compiling rules.
pub fn lower<const N: usize>(text: &str) -> Option<heapless::String<N>> {
    let mut out = heapless::String::new();
    for c in text.chars() {
        for lower in c.to_lowercase() {
            out.push(lower).ok()?;
        }
    }
    Some(out)
}

/// Iterates an encoded pair list (`key KEY_END value PAIR_END …`).
#[derive(Clone, Debug)]
pub struct EncodedPairs<'b> {
    rest: &'b [u8],
}

impl<'b> Iterator for EncodedPairs<'b> {
    type Item = (&'b str, &'b str);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.rest.is_empty() {
                return None;
            }
            let (pair, rest) = split_once(self.rest, PAIR_END);
            self.rest = rest.unwrap_or(&[]);
            let (key, value) = split_once(pair, KEY_END);
            // Both halves were written from `str`s, so this never skips; if it ever did, a
            // missing pair can only make a privilege fail to match.
            if let (Ok(key), Ok(value)) = (core::str::from_utf8(key), core::str::from_utf8(value.unwrap_or(&[]))) {
                return Some((key, value));
            }
        }
    }
}

/// Iterates `k=v&k2=v2` text already decoded, splitting on `&` and the first `=`.
#[derive(Clone, Debug)]
pub struct TextPairs<'b> {
    rest: Option<&'b str>,
}

impl<'b> Iterator for TextPairs<'b> {
    type Item = (&'b str, &'b str);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let rest = self.rest?;
            let (piece, next) = match rest.split_once('&') {
                Some((piece, next)) => (piece, Some(next)),
                None => (rest, None),
            };
            self.rest = next;
            let pair = piece.split_once('=').unwrap_or((piece, ""));
            // An empty key (`=value`, or an empty piece) takes no part in matching, as in
            // the reference.
            if pair.0.is_empty() {
                continue;
            }
            return Some(pair);
        }
    }
}

/// The legacy view of a request target (MSP §4.3 steps 2–3): what every decision uses.
#[derive(Clone, Copy, Debug)]
pub struct LegacyRequest<'b> {
    /// Decoded, lossy, lower-cased path, up to the first decoded `?`.
    pub path: &'b str,
    query: &'b [u8],
    path_query: Option<&'b str>,
}

impl<'b> LegacyRequest<'b> {
    /// Query pairs in matching order: the real query, then pairs after a decoded `%3F`.
    pub fn pairs(&self) -> impl Iterator<Item = (&'b str, &'b str)> + use<'b> {
        EncodedPairs { rest: self.query }.chain(TextPairs { rest: self.path_query })
    }

    /// The value of the first pair whose key is `key` (already lower-cased).
    pub fn first_value(&self, key: &str) -> Option<&'b str> {
        self.pairs().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// Decodes a target the legacy way: path and each query key and value percent-decoded once
/// (lenient), lossy UTF-8, per-character lower-cased; `+` stays `+`.
pub fn legacy_decode<'b>(target: &[u8], scratch: &'b mut DecodeScratch) -> Result<LegacyRequest<'b>, TargetError> {
    let parts = split_target(target)?;
    let DecodeScratch { raw, out } = scratch;
    let mut w = Writer { buf: out, len: 0 };
    let raw_len = decode_lenient_into(parts.path, raw);
    w.push_lossy_lower(&raw[..raw_len]).map_err(too_long)?;
    let path_end = w.len;
    for piece in parts.query.unwrap_or(&[]).split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        let (key, value) = split_once(piece, b'=');
        if key.is_empty() {
            // `=value`: an empty key takes no part in matching (the reference drops it).
            continue;
        }
        let n = decode_lenient_into(key, raw);
        w.push_lossy_lower(&raw[..n]).map_err(too_long)?;
        w.push(KEY_END).map_err(too_long)?;
        let n = decode_lenient_into(value.unwrap_or(&[]), raw);
        w.push_lossy_lower(&raw[..n]).map_err(too_long)?;
        w.push(PAIR_END).map_err(too_long)?;
    }
    let query_end = w.len;
    let out: &'b [u8] = out;
    // Only `str` text and the two non-UTF-8 markers were written, and the markers sit after
    // `path_end`; so the path is valid UTF-8.
    let full_path = core::str::from_utf8(&out[..path_end]).unwrap_or_default();
    let (path, path_query) = match full_path.split_once('?') {
        Some((path, rest)) => (path, Some(rest)),
        None => (full_path, None),
    };
    Ok(LegacyRequest { path, query: &out[path_end..query_end], path_query })
}

fn too_long(_: Overflow) -> TargetError {
    TargetError::TooLong
}

/// Lenient percent-decoding into `raw` (which is at least as long as any input: decoding
/// never grows). Returns the decoded length.
fn decode_lenient_into(input: &[u8], raw: &mut [u8]) -> usize {
    let mut n = 0;
    for (slot, byte) in raw.iter_mut().zip(LenientDecode::new(input)) {
        *slot = byte;
        n += 1;
    }
    n
}

/// Why the strict canonicaliser refused a request (MSP §4.8 codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CanonError {
    /// Not `http`, or not an origin/absolute-form target.
    Scheme,
    /// Method not in the allow-list.
    Method,
    /// Userinfo (`user@`) in the authority.
    Userinfo,
    /// Malformed percent escape.
    Pct,
    /// Overlong UTF-8 encoding.
    Overlong,
    /// Invalid UTF-8.
    Utf8,
    /// Non-ASCII in the path.
    NonAscii,
    /// Control byte (< 0x20 or 0x7F).
    Ctrl,
    /// `..` above the root.
    Underflow,
    /// Decoded `?` inside the path.
    EmbQ,
    /// Empty or malformed host.
    Host,
    /// Malformed port.
    Port,
    /// Output would exceed the fixed buffer (this project's addition; cannot happen for a
    /// target within [`TARGET_MAX_BYTES`]).
    Length,
}

impl CanonError {
    /// The code written in `CANON_DIVERGENCE` lines.
    pub fn code(self) -> &'static str {
        match self {
            Self::Scheme => "CANON_SCHEME",
            Self::Method => "CANON_METHOD",
            Self::Userinfo => "CANON_USERINFO",
            Self::Pct => "CANON_PCT",
            Self::Overlong => "CANON_OVERLONG",
            Self::Utf8 => "CANON_UTF8",
            Self::NonAscii => "CANON_NON_ASCII",
            Self::Ctrl => "CANON_CTRL",
            Self::Underflow => "CANON_UNDERFLOW",
            Self::EmbQ => "CANON_EMBQ",
            Self::Host => "CANON_HOST",
            Self::Port => "CANON_PORT",
            Self::Length => "CANON_LENGTH",
        }
    }
}

impl fmt::Display for CanonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// The strict canonical view of a request target (MSP §4.8), compared against the legacy
/// verdict and reported when they differ.
#[derive(Clone, Copy, Debug)]
pub struct CanonRequest<'b> {
    /// `/seg/seg` with dot segments resolved, empty and `.` segments and `;` parameters
    /// dropped, ASCII lower-case; empty for the root.
    path: &'b str,
    query: &'b [u8],
}

impl<'b> CanonRequest<'b> {
    /// The canonical path, `/` for the root.
    pub fn path(&self) -> &'b str {
        if self.path.is_empty() { "/" } else { self.path }
    }

    /// Query pairs (`+` as space, decoded once, lower-cased), in request order.
    pub fn pairs(&self) -> impl Iterator<Item = (&'b str, &'b str)> + use<'b> {
        EncodedPairs { rest: self.query }
    }

    /// Whether any pair has this key and value (both already lower-cased).
    pub fn has_pair(&self, key: &str, value: &str) -> bool {
        self.pairs().any(|(k, v)| k == key && v == value)
    }

    /// Segment-wise prefix test against a canonical rule path (from [`canonical_rule_path`]).
    pub fn path_starts_with(&self, rule: &str) -> bool {
        segment_prefix(self.path, rule)
    }
}

/// `rule` is `path` or a whole-segment ancestor of it; the empty rule (root) covers everything.
fn segment_prefix(path: &str, rule: &str) -> bool {
    match path.strip_prefix(rule) {
        Some(rest) => rule.is_empty() || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Canonicalises a rule path for segment-wise matching: ASCII lower-case, segments resolved
/// as for requests, no percent-decoding (rules hold literal paths). `None` when it can never
/// match a canonical request (non-ASCII, control bytes, `..` above the root, too long).
pub fn canonical_rule_path<const N: usize>(rule_path: &str) -> Option<heapless::String<N>> {
    let mut buf = [0u8; N];
    let bytes = rule_path.as_bytes();
    if bytes.iter().any(|b| !b.is_ascii() || is_ctrl(*b)) {
        return None;
    }
    let mut w = Writer { buf: &mut buf, len: 0 };
    push_segments(&mut w, bytes).ok()?;
    let len = w.len;
    let text = core::str::from_utf8(&buf[..len]).ok()?;
    heapless::String::try_from(text).ok()
}

fn is_ctrl(byte: u8) -> bool {
    byte < 0x20 || byte == 0x7F
}

/// Writes `/seg` for each kept segment of an ASCII path, ASCII lower-cased.
fn push_segments(w: &mut Writer<'_>, path: &[u8]) -> Result<(), CanonError> {
    for segment in path.split(|b| *b == b'/') {
        let segment = split_once(segment, b';').0;
        match segment {
            b"" | b"." => {}
            b".." => {
                let parent = w.buf[..w.len].iter().rposition(|b| *b == b'/').ok_or(CanonError::Underflow)?;
                w.len = parent;
            }
            _ => {
                w.push(b'/').map_err(length)?;
                for byte in segment {
                    w.push(byte.to_ascii_lowercase()).map_err(length)?;
                }
            }
        }
    }
    Ok(())
}

fn length(_: Overflow) -> CanonError {
    CanonError::Length
}

/// Strict percent-decoding into `raw`; `+` becomes a space first when `plus_is_space`.
fn decode_strict_into(input: &[u8], raw: &mut [u8], plus_is_space: bool) -> Result<usize, CanonError> {
    let mut n = 0;
    let mut i = 0;
    while let Some(&byte) = input.get(i) {
        let decoded = match byte {
            b'%' => {
                let high = input.get(i + 1).copied().and_then(crate::text::hex_value).ok_or(CanonError::Pct)?;
                let low = input.get(i + 2).copied().and_then(crate::text::hex_value).ok_or(CanonError::Pct)?;
                i += 3;
                high << 4 | low
            }
            b'+' if plus_is_space => {
                i += 1;
                b' '
            }
            _ => {
                i += 1;
                byte
            }
        };
        *raw.get_mut(n).ok_or(CanonError::Length)? = decoded;
        n += 1;
    }
    Ok(n)
}

/// Classifies decoded bytes: control bytes, then overlong and invalid UTF-8.
fn check_text(bytes: &[u8]) -> Result<&str, CanonError> {
    if bytes.iter().any(|b| is_ctrl(*b)) {
        return Err(CanonError::Ctrl);
    }
    for (i, lead) in bytes.iter().enumerate() {
        let next = bytes.get(i + 1).copied().unwrap_or(0);
        let overlong = matches!(lead, 0xC0 | 0xC1)
            || (*lead == 0xE0 && (0x80..=0x9F).contains(&next))
            || (*lead == 0xF0 && (0x80..=0x8F).contains(&next));
        if overlong {
            return Err(CanonError::Overlong);
        }
    }
    core::str::from_utf8(bytes).ok().ok_or(CanonError::Utf8)
}

/// Checks an absolute-form target's scheme and authority.
fn check_authority(scheme: &[u8], authority: &[u8]) -> Result<(), CanonError> {
    if !scheme.eq_ignore_ascii_case(b"http") {
        return Err(CanonError::Scheme);
    }
    if authority.contains(&b'@') {
        return Err(CanonError::Userinfo);
    }
    let port = if authority.first() == Some(&b'[') {
        let close = authority.iter().position(|b| *b == b']').ok_or(CanonError::Host)?;
        let inner = &authority[1..close];
        if inner.is_empty() || !inner.iter().all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.')) {
            return Err(CanonError::Host);
        }
        match &authority[close + 1..] {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return Err(CanonError::Host),
        }
    } else {
        let (host, port) = split_once(authority, b':');
        if host.is_empty() || !host.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')) {
            return Err(CanonError::Host);
        }
        port
    };
    if let Some(port) = port {
        // Digits and length first: the value is computed only from at most five digits.
        let digits_ok = !port.is_empty() && port.len() <= 5 && port.iter().all(u8::is_ascii_digit);
        if !digits_ok {
            return Err(CanonError::Port);
        }
        let value = port.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
        if value == 0 || value > 65_535 {
            return Err(CanonError::Port);
        }
    }
    Ok(())
}

/// The strict canonical pipeline of MSP §4.8. Errors are codes, never panics.
pub fn canonicalize<'b>(
    method: &[u8],
    target: &[u8],
    scratch: &'b mut DecodeScratch,
) -> Result<CanonRequest<'b>, CanonError> {
    let parts = match split_target(target) {
        Ok(parts) => parts,
        Err(TargetError::Form) => return Err(CanonError::Scheme),
        Err(TargetError::TooLong) => return Err(CanonError::Length),
    };
    if let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) {
        check_authority(scheme, authority)?;
    }
    if !method_allowed(method) {
        return Err(CanonError::Method);
    }
    let DecodeScratch { raw, out } = scratch;
    let n = decode_strict_into(parts.path, raw, false)?;
    let path = check_text(&raw[..n])?;
    if !path.is_ascii() {
        return Err(CanonError::NonAscii);
    }
    if path.contains('?') {
        return Err(CanonError::EmbQ);
    }
    let mut w = Writer { buf: out, len: 0 };
    push_segments(&mut w, path.as_bytes())?;
    let path_end = w.len;
    for piece in parts.query.unwrap_or(&[]).split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        let (key, value) = split_once(piece, b'=');
        if key.is_empty() {
            // `=value`: an empty key takes no part in matching (the reference drops it).
            continue;
        }
        let n = decode_strict_into(key, raw, true)?;
        w.push_lower(check_text(&raw[..n])?).map_err(length)?;
        w.push(KEY_END).map_err(length)?;
        let n = decode_strict_into(value.unwrap_or(&[]), raw, true)?;
        w.push_lower(check_text(&raw[..n])?).map_err(length)?;
        w.push(PAIR_END).map_err(length)?;
    }
    let query_end = w.len;
    let out: &'b [u8] = out;
    let path = core::str::from_utf8(&out[..path_end]).ok().ok_or(CanonError::Utf8)?;
    Ok(CanonRequest { path, query: &out[path_end..query_end] })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy(target: &str) -> (String, Vec<(String, String)>) {
        let mut scratch = Box::new(DecodeScratch::new());
        let request = legacy_decode(target.as_bytes(), &mut scratch).expect("decodable target");
        (request.path.into(), request.pairs().map(|(k, v)| (k.into(), v.into())).collect())
    }

    fn canon(target: &str) -> Result<(String, Vec<(String, String)>), CanonError> {
        let mut scratch = Box::new(DecodeScratch::new());
        canonicalize(b"GET", target.as_bytes(), &mut scratch)
            .map(|c| (c.path().into(), c.pairs().map(|(k, v)| (k.into(), v.into())).collect()))
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.into(), v.into())
    }

    #[test]
    fn guard_rejects_double_slash_and_decoded_dot_dot() {
        for path in ["//x", "/a//b", "/test/../", "/%2e%2e/x", "/.%2e/x", "/%2E./x", "/%2e%2E", "/a..b"] {
            assert!(traversal_guard(path.as_bytes()).is_err(), "{path}");
        }
        assert_eq!(traversal_guard(b"//x"), Err(GuardError::DoubleSlash));
        assert_eq!(traversal_guard(b"/x/%2e%2e"), Err(GuardError::DotDot));
    }

    #[test]
    fn guard_accepts_single_dots_matrix_params_and_non_ascii() {
        for path in ["/./x", "/x;p=1", "/.well-known/x", "/metadata/\u{131}dentity", "/a.b/.c", "/%2e/x", "/%zz"] {
            assert_eq!(traversal_guard(path.as_bytes()), Ok(()), "{path}");
        }
    }

    #[test]
    fn splits_origin_and_absolute_targets() {
        let parts = split_target(b"/a/b?x=1#frag").expect("origin form");
        assert_eq!((parts.path, parts.query, parts.fragment), (&b"/a/b"[..], Some(&b"x=1"[..]), Some(&b"frag"[..])));
        let parts = split_target(b"http://169.254.169.254:80/metadata?x").expect("absolute form");
        assert_eq!(parts.authority, Some(&b"169.254.169.254:80"[..]));
        assert_eq!(parts.path, b"/metadata");
        assert_eq!(split_target(b"http://host").expect("no path").path, b"/");
        assert_eq!(split_target(b"*"), Err(TargetError::Form));
        assert_eq!(split_target(b"host:80"), Err(TargetError::Form));
        assert_eq!(split_target(&[b'/'; TARGET_MAX_BYTES + 1]), Err(TargetError::TooLong));
    }

    #[test]
    fn legacy_decodes_once_and_lower_cases() {
        assert_eq!(legacy("/TEST/a%2Fb%252F").0, "/test/a/b%2f");
        assert_eq!(legacy("/%ff%FE/x").0, "/\u{FFFD}\u{FFFD}/x");
        assert_eq!(legacy("/%zz%4").0, "/%zz%4");
        assert_eq!(legacy("/\u{130}").0, "/i\u{307}");
        assert_eq!(legacy("http://HOST/Abs?K=V").0, "/abs");
    }

    #[test]
    fn legacy_query_decoded_and_plus_is_not_space() {
        let (_, pairs) = legacy("/p?k%65y1=valu%651&A+B=C+D&&flag&resource=https%3A%2F%2Fmanagement.azure.com%2F");
        assert_eq!(
            pairs,
            vec![
                pair("key1", "value1"),
                pair("a+b", "c+d"),
                pair("flag", ""),
                pair("resource", "https://management.azure.com/")
            ]
        );
    }

    #[test]
    fn empty_keys_take_no_part_in_matching_in_either_reading() {
        // `=value` matched a privilege requiring {"": "value"} before; the reference drops it.
        let (_, pairs) = legacy("/p?=value&a=1&=&x");
        assert_eq!(pairs, vec![pair("a", "1"), pair("x", "")]);
        let (_, pairs) = legacy("/p%3F=value&b=2");
        assert_eq!(pairs, vec![pair("b", "2")], "pairs after a decoded %3F too");
        let (_, pairs) = canon("/p?=value&a=1").expect("canonical");
        assert_eq!(pairs, vec![pair("a", "1")]);
    }

    #[test]
    fn legacy_encoded_question_mark_becomes_extra_pairs_after_the_real_query() {
        let (path, pairs) = legacy("/token%3Fresource=EVIL%26x=1?resource=good");
        assert_eq!(path, "/token");
        assert_eq!(pairs, vec![pair("resource", "good"), pair("resource", "evil"), pair("x", "1")]);
        let mut scratch = Box::new(DecodeScratch::new());
        let request = legacy_decode(b"/token%3Fresource=EVIL?resource=good", &mut scratch).expect("decodes");
        assert_eq!(request.first_value("resource"), Some("good"));
    }

    #[test]
    fn legacy_worst_case_expansion_fits() {
        let target: Vec<u8> = core::iter::once(b'/').chain(core::iter::repeat_n(0xFF, TARGET_MAX_BYTES - 1)).collect();
        let mut scratch = Box::new(DecodeScratch::new());
        let request = legacy_decode(&target, &mut scratch).expect("fits");
        assert_eq!(request.path.len(), 1 + 3 * (TARGET_MAX_BYTES - 1));
    }

    #[test]
    fn canon_resolves_segments_and_strips_matrix_params() {
        assert_eq!(canon("/Metadata/./identity//oauth2/token/").expect("ok").0, "/metadata/identity/oauth2/token");
        assert_eq!(canon("/a/b/../c;x=1/%2e/").expect("ok").0, "/a/c");
        assert_eq!(canon("/a%2Fb").expect("ok").0, "/a/b");
        assert_eq!(canon("/").expect("ok").0, "/");
        assert_eq!(canon("http://h:80").expect("ok").0, "/");
    }

    #[test]
    fn canon_query_plus_is_space_and_values_grouped() {
        let (_, pairs) = canon("/p?A+b=C%2Bd&a+b=x").expect("ok");
        assert_eq!(pairs, vec![pair("a b", "c+d"), pair("a b", "x")]);
        let mut scratch = Box::new(DecodeScratch::new());
        let request = canonicalize(b"GET", b"/p?k=1&k=2", &mut scratch).expect("ok");
        assert!(request.has_pair("k", "2"));
        assert!(!request.has_pair("k", "3"));
    }

    #[test]
    fn canon_error_codes() {
        let cases: [(&str, CanonError); 14] = [
            ("/..", CanonError::Underflow),
            ("/a/../..", CanonError::Underflow),
            ("/%zz", CanonError::Pct),
            ("/%4", CanonError::Pct),
            ("/%C0%AF", CanonError::Overlong),
            ("/%E0%80%AF", CanonError::Overlong),
            ("/%FF", CanonError::Utf8),
            ("/\u{131}", CanonError::NonAscii),
            ("/a%00", CanonError::Ctrl),
            ("/a%7F", CanonError::Ctrl),
            ("/a%3Fb", CanonError::EmbQ),
            ("https://h/x", CanonError::Scheme),
            ("http://u@h/x", CanonError::Userinfo),
            ("http://h:99999/x", CanonError::Port),
        ];
        for (target, code) in cases {
            assert_eq!(canon(target).map(|_| ()), Err(code), "{target}");
        }
        assert_eq!(canon("http://:80/x").map(|_| ()), Err(CanonError::Host));
        assert_eq!(canon("http://h_x/x").map(|_| ()), Err(CanonError::Host));
        assert_eq!(canon("http://h:/x").map(|_| ()), Err(CanonError::Port));
        assert_eq!(canon("*").map(|_| ()), Err(CanonError::Scheme));
        assert_eq!(canon("/p?k=%FF").map(|_| ()), Err(CanonError::Utf8));
        assert_eq!(canon("http://[::1]:8080/x").map(|(p, _)| p), Ok("/x".into()));
        let mut scratch = Box::new(DecodeScratch::new());
        assert_eq!(canonicalize(b"TRACE", b"/", &mut scratch).map(|_| ()), Err(CanonError::Method));
        assert_eq!(CanonError::EmbQ.code(), "CANON_EMBQ");
    }

    #[test]
    fn canon_query_allows_non_ascii() {
        assert_eq!(canon("/p?n=%C4%B1").expect("ok").1, vec![pair("n", "\u{131}")]);
    }

    #[test]
    fn segment_prefix_is_whole_segment() {
        assert!(segment_prefix("/test/x", "/test"));
        assert!(segment_prefix("/test", "/test"));
        assert!(!segment_prefix("/test-evil/x", "/test"));
        assert!(segment_prefix("/anything", ""));
        assert!(segment_prefix("", ""));
    }

    #[test]
    fn canonical_rule_paths() {
        assert_eq!(canonical_rule_path::<64>("/Metadata/Identity/").as_deref(), Some("/metadata/identity"));
        assert_eq!(canonical_rule_path::<64>("").as_deref(), Some(""));
        assert_eq!(canonical_rule_path::<64>("/.."), None);
        assert_eq!(canonical_rule_path::<64>("/\u{e9}"), None);
    }

    #[test]
    fn lower_is_per_character() {
        assert_eq!(lower::<16>("/A\u{130}").as_deref(), Some("/ai\u{307}"));
        assert_eq!(lower::<2>("abc"), None);
    }

    #[test]
    fn ambiguous_targets_are_named_and_real_ones_pass() {
        for ok in [
            &b"/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net"[..],
            b"/metadata/instance?api-version=2021-02-01&format=json",
            b"/machine?comp=goalstate",
            b"/vmAgentLog",
            b"/metadata/identity/oauth2/token?resource=https%3A%2F%2Fmanagement.azure.com%2F&mi_res_id=%2Fsubscriptions%2Fx",
            b"/a.b/c..d/.e/f.",
            // An encoded slash is decoded once by the allowlist (MSP §4.3), which reads it as
            // a separator: the stricter reading, so it is not refused here.
            b"/metadata%2Fidentity/oauth2/token",
            b"/metadata/identity/oauth2/token?resource=https://vault.azure.net",
        ] {
            assert_eq!(ambiguous_target(ok), Ok(()), "{}", String::from_utf8_lossy(ok));
        }
        for (bad, why) in [
            (&b"/metadata/identity/oauth2/token#?resource=https://vault.azure.net"[..], AmbiguousTarget::Fragment),
            (b"/metadata/identity/oauth2/token?api-version=2018-02-01#&resource=x", AmbiguousTarget::Fragment),
            (b"/metadata/./identity/oauth2/token", AmbiguousTarget::DotSegment),
            (b"/metadata/%2e/identity", AmbiguousTarget::DotSegment),
            (b"/metadata/identity/.", AmbiguousTarget::DotSegment),
            (b"/metadata/x/%2E%2e/identity", AmbiguousTarget::DotSegment),
            (b"/metadata\\identity\\oauth2\\token", AmbiguousTarget::Backslash),
            (b"/metadata%5cidentity/oauth2/token", AmbiguousTarget::Backslash),
            (b"/metadata/identity%00/x", AmbiguousTarget::NulOrControl),
            (b"/metadata/instance?x=%00", AmbiguousTarget::NulOrControl),
        ] {
            assert_eq!(ambiguous_target(bad), Err(why), "{}", String::from_utf8_lossy(bad));
        }
    }
}
