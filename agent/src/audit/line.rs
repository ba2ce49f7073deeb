// SPDX-License-Identifier: MIT
//! One audit line, both directions.
//!
//! [`LineWriter`] writes into a caller-supplied fixed slice and can only ever produce one line:
//! every string goes through [`LineWriter::string`], which escapes `"`, `\`, every byte below
//! 0x20, DEL, the C1 controls, the Unicode line/paragraph separators and bidi overrides as
//! `\uXXXX`, and each byte of invalid UTF-8 as `\u00XX`. So a newline or `{` in a process name
//! or command line can never start a second record (attack catalog F2).
//!
//! [`parse_record`] is the strict reader used by the tail resume and the verifier: a flat
//! object, no whitespace, our keys in our order. Anything else is "bad json".

use heapless::Vec;

use crate::text::{JsonEscapes, escape_json, hex_pair};

/// Writes one JSON line into a fixed slice; on overflow it stops and [`Self::finish`] says so.
pub(super) struct LineWriter<'a> {
    out: &'a mut [u8],
    len: usize,
    overflow: bool,
}

impl<'a> LineWriter<'a> {
    pub(super) fn new(out: &'a mut [u8]) -> Self {
        Self { out, len: 0, overflow: false }
    }

    /// Bytes copied verbatim: only ever our own ASCII punctuation and key names.
    pub(super) fn raw(&mut self, bytes: &[u8]) {
        if self.overflow {
            return;
        }
        let dst = self.len.checked_add(bytes.len()).and_then(|end| self.out.get_mut(self.len..end));
        match dst {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.overflow = true,
        }
    }

    pub(super) fn u64(&mut self, value: u64) {
        self.raw(&crate::http::decimal(value));
    }

    pub(super) fn hex(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.raw(&hex_pair(b));
        }
    }

    /// A JSON string (quotes included) holding `text`, escaped so it stays on one line
    /// ([`JsonEscapes::OneLine`]; invalid UTF-8 as `\u00XX` per byte).
    pub(super) fn string(&mut self, text: &[u8]) {
        self.raw(b"\"");
        let Ok(()) = escape_json(text, JsonEscapes::OneLine, |piece| {
            self.raw(piece.as_bytes());
            Ok::<(), core::convert::Infallible>(())
        });
        self.raw(b"\"");
    }

    /// A string, or `null` for `None`.
    pub(super) fn opt_string(&mut self, text: Option<&[u8]>) {
        match text {
            Some(text) => self.string(text),
            None => self.raw(b"null"),
        }
    }

    /// Bytes written, or `None` if the line did not fit (nothing of it may be used then).
    pub(super) fn finish(self) -> Option<usize> {
        (!self.overflow).then_some(self.len)
    }
}

/// What kind of line this is (the `kind` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Request,
    Checkpoint,
    Dropped,
    ChainRestart,
    Suppressed,
    Event,
}

impl Kind {
    pub(super) fn name(self) -> &'static [u8] {
        match self {
            Self::Request => b"request",
            Self::Checkpoint => b"checkpoint",
            Self::Dropped => b"dropped",
            Self::ChainRestart => b"chain-restart",
            Self::Suppressed => b"suppressed",
            Self::Event => b"event",
        }
    }
}

/// The chain-relevant part of a parsed line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) seq: u64,
    pub(super) ts: u64,
    pub(super) prev: [u8; 32],
    pub(super) kind: Kind,
    /// The checkpoint MAC (checkpoints only).
    pub(super) mac: Option<[u8; 32]>,
}

/// The keys a request record carries after `seq`, `ts`, `prev`, `kind`, in order.
pub(super) const REQUEST_KEYS: [&[u8]; 13] = [
    b"pid",
    b"uid",
    b"gid",
    b"user",
    b"exe",
    b"cmdline",
    b"endpoint",
    b"method",
    b"path",
    b"decision",
    b"mode",
    b"status",
    b"latency_us",
];

/// Parses one line (without its newline) strictly; `None` means "bad json".
pub(super) fn parse_record(line: &[u8]) -> Option<Header> {
    core::str::from_utf8(line).ok()?;
    let fields = parse_flat(line)?;
    let (head, rest) = fields.split_at_checked(4)?;
    let [(b"seq", Value::Num(seq)), (b"ts", Value::Num(ts)), (b"prev", Value::Str(prev)), (b"kind", Value::Str(kind))] =
        head
    else {
        return None;
    };
    let prev = decode_hash(prev)?;
    let (kind, mac) = match *kind {
        b"request" => {
            let shape_ok = rest.len() == REQUEST_KEYS.len()
                && rest.iter().zip(REQUEST_KEYS).all(|((key, value), want)| {
                    *key == want
                        && match want {
                            b"user" | b"exe" => matches!(value, Value::Str(_) | Value::Null),
                            b"pid" | b"uid" | b"gid" | b"status" | b"latency_us" => {
                                matches!(value, Value::Num(_))
                            }
                            _ => matches!(value, Value::Str(_)),
                        }
                });
            shape_ok.then_some((Kind::Request, None))?
        }
        b"checkpoint" => match rest {
            [(b"mac", Value::Str(mac))] => (Kind::Checkpoint, Some(decode_hash(mac)?)),
            _ => return None,
        },
        b"dropped" => match rest {
            [(b"count", Value::Num(_))] => (Kind::Dropped, None),
            _ => return None,
        },
        b"chain-restart" => match rest {
            [(b"reason", Value::Str(_))] => (Kind::ChainRestart, None),
            _ => return None,
        },
        b"suppressed" => match rest {
            [(b"uid", Value::Num(_)), (b"count", Value::Num(_)), (b"security", Value::Num(_))] => {
                (Kind::Suppressed, None)
            }
            _ => return None,
        },
        b"event" => match rest {
            [(b"event", Value::Str(_)), (b"detail", Value::Str(_))] => (Kind::Event, None),
            _ => return None,
        },
        _ => return None,
    };
    Some(Header { seq: *seq, ts: *ts, prev, kind, mac })
}

/// 64 lowercase hex digits → 32 bytes.
fn decode_hash(hex: &[u8]) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0_u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// A value of a flat object; strings are the raw (still escaped) bytes between the quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value<'a> {
    Str(&'a [u8]),
    Num(u64),
    Null,
    Bool,
}

/// More than any record has (17), so a longer object is simply not ours.
const MAX_FIELDS: usize = 24;

/// `{"key":value,...}` with no whitespace, keys `[a-z_]+`, values string, unsigned integer,
/// `null`, `true` or `false`; the whole line must be consumed.
fn parse_flat(line: &[u8]) -> Option<Vec<(&[u8], Value<'_>), MAX_FIELDS>> {
    let mut fields = Vec::new();
    let mut cur = Cursor { bytes: line, at: 0 };
    cur.expect(b'{')?;
    if cur.eat(b'}') {
        return cur.at_end().then_some(fields);
    }
    loop {
        let key = cur.string()?;
        if key.is_empty() || !key.iter().all(|b| b.is_ascii_lowercase() || *b == b'_') {
            return None;
        }
        cur.expect(b':')?;
        let value = cur.value()?;
        fields.push((key, value)).ok()?;
        if !cur.eat(b',') {
            cur.expect(b'}')?;
            return cur.at_end().then_some(fields);
        }
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, want: u8) -> bool {
        let hit = self.peek() == Some(want);
        if hit {
            self.at += 1;
        }
        hit
    }

    fn expect(&mut self, want: u8) -> Option<()> {
        self.eat(want).then_some(())
    }

    fn at_end(&self) -> bool {
        self.at == self.bytes.len()
    }

    fn eat_word(&mut self, word: &[u8]) -> Option<()> {
        let end = self.at.checked_add(word.len())?;
        (self.bytes.get(self.at..end)? == word).then(|| self.at = end)
    }

    /// A string's raw content; escapes are checked for validity but not decoded.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let start = self.at;
        loop {
            let b = self.peek()?;
            self.at += 1;
            match b {
                b'"' => return self.bytes.get(start..self.at - 1),
                b'\\' => match self.peek()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                    b'u' => {
                        let end = self.at + 5;
                        let digits = self.bytes.get(self.at + 1..end)?;
                        if !digits.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        self.at = end;
                    }
                    _ => return None,
                },
                0..=0x1f => return None,
                _ => {}
            }
        }
    }

    fn value(&mut self) -> Option<Value<'a>> {
        match self.peek()? {
            b'"' => self.string().map(Value::Str),
            b'0'..=b'9' => self.number().map(Value::Num),
            b'n' => self.eat_word(b"null").map(|()| Value::Null),
            b't' => self.eat_word(b"true").map(|()| Value::Bool),
            b'f' => self.eat_word(b"false").map(|()| Value::Bool),
            _ => None,
        }
    }

    /// An unsigned integer without leading zeros that fits `u64`.
    fn number(&mut self) -> Option<u64> {
        let start = self.at;
        let mut value: u64 = 0;
        while let Some(b @ b'0'..=b'9') = self.peek() {
            value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
            self.at += 1;
        }
        let len = self.at - start;
        (len == 1 || self.bytes.get(start) != Some(&b'0')).then_some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(text: &[u8]) -> std::vec::Vec<u8> {
        let mut buf = [0_u8; 512];
        let mut w = LineWriter::new(&mut buf);
        w.string(text);
        let len = w.finish().expect("fits");
        buf[..len].to_vec()
    }

    #[test]
    fn escapes_quotes_backslash_controls_and_invalid_utf8() {
        assert_eq!(written(b"a\"b\\c"), b"\"a\\\"b\\\\c\"");
        assert_eq!(written(b"\n{\r\t\x7f"), b"\"\\u000a{\\u000d\\u0009\\u007f\"");
        assert_eq!(written(b"\xff\xc3"), b"\"\\u00ff\\u00c3\"");
        assert_eq!(written("é\u{202e}\u{9b}".as_bytes()), "\"é\\u202e\\u009b\"".as_bytes());
    }

    #[test]
    fn overflow_is_reported_not_truncated() {
        let mut buf = [0_u8; 4];
        let mut w = LineWriter::new(&mut buf);
        w.string(b"abcdef");
        assert_eq!(w.finish(), None);
    }

    #[test]
    fn numbers_render_in_full() {
        let mut buf = [0_u8; 64];
        let mut w = LineWriter::new(&mut buf);
        w.u64(0);
        w.raw(b",");
        w.u64(u64::MAX);
        let len = w.finish().expect("fits");
        assert_eq!(&buf[..len], b"0,18446744073709551615");
    }

    #[test]
    fn parser_is_strict() {
        let zero = "0".repeat(64);
        let good = format!(r#"{{"seq":1,"ts":2,"prev":"{zero}","kind":"dropped","count":3}}"#);
        let header = parse_record(good.as_bytes()).expect("parses");
        assert_eq!((header.seq, header.ts, header.kind), (1, 2, Kind::Dropped));
        for bad in [
            good.replace(":1,", ": 1,"),
            good.replace(":1,", ":01,"),
            good.replace("dropped", "nope"),
            good.replace(r#","count":3"#, ""),
            format!("{good} "),
            good.replace(&zero, &"0".repeat(63)),
            good.replace("\"ts\":2,\"prev\"", "\"prev\""),
        ] {
            assert_eq!(parse_record(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(parse_record(b"{\"seq\":1\n}"), None);
        assert_eq!(parse_record(b""), None);
    }
}
