// SPDX-License-Identifier: MIT
//! Text utilities shared by every writer and reader of the agent: JSON string escaping, hex,
//! and the log-line escaping of caller-chosen bytes.
//!
//! One home so that each rule is written once and a fix reaches every caller: the audit line,
//! the status and rules-snapshot writers, `policy explain` and the proxy's local answers all
//! escape JSON strings through [`escape_json`]; the signing code and the percent-decoder read
//! hex digits through [`hex_value`]. Nothing here allocates except the `String` adapter
//! [`json_escape_into`], and nothing depends on any other module of the agent.
//!
//! The JSON writers do not all escape the same set, on purpose ([`JsonEscapes`]): the audit
//! trail must stay one line on any terminal and any viewer (attack catalog F2), while the
//! other documents only need valid JSON. Each caller keeps the exact output it always had.

use core::fmt;

/// Lower-case hex digits, indexed by nibble.
pub const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// The two lower-case hex digits of `byte`, high nibble first.
pub const fn hex_pair(byte: u8) -> [u8; 2] {
    [HEX_DIGITS[(byte >> 4) as usize], HEX_DIGITS[(byte & 0x0f) as usize]]
}

/// The value of one hex digit, upper or lower case.
pub const fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Decodes hex pairs (either case) into `out`, one byte per pair, as many as both `hex` and
/// `out` hold; `None` at the first pair that is not two hex digits. The caller checks the
/// lengths it needs (an odd trailing digit is ignored here).
pub fn decode_hex_into(hex: &[u8], out: &mut [u8]) -> Option<()> {
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
    }
    Some(())
}

/// Which characters a JSON string writer escapes besides `"` and `\` (always `\"`, `\\`).
/// Every escape is `\u` and four lower-case hex digits unless said otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonEscapes {
    /// What RFC 8259 requires, plus DEL: U+0000–U+001F and U+007F.
    Controls,
    /// [`Self::Controls`], with `\n`, `\r` and `\t` in their short forms.
    ControlsShort,
    /// Everything a terminal, a line splitter or a bidi-aware viewer could act on: C0
    /// controls, DEL, C1 controls, LRM and RLM, the line and paragraph separators, the bidi
    /// embeddings, overrides and isolates, and the BOM. Used by the audit trail, whose lines
    /// must stay one line whatever a caller puts in a process name.
    OneLine,
}

impl JsonEscapes {
    /// The escape for `c`, if this set escapes it: either a fixed text or a `\uXXXX` code.
    fn escape(self, c: char) -> Option<Escape> {
        match c {
            '"' => return Some(Escape::Text("\\\"")),
            '\\' => return Some(Escape::Text("\\\\")),
            _ => {}
        }
        let escaped = match self {
            Self::Controls => matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'),
            Self::ControlsShort => match c {
                '\n' => return Some(Escape::Text("\\n")),
                '\r' => return Some(Escape::Text("\\r")),
                '\t' => return Some(Escape::Text("\\t")),
                _ => matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'),
            },
            Self::OneLine => matches!(c,
                '\u{0}'..='\u{1f}'            // C0 controls, including \n and \r
                | '\u{7f}'..='\u{9f}'         // DEL and C1 controls (CSI as U+009B)
                | '\u{200e}' | '\u{200f}'     // LRM, RLM
                | '\u{2028}' | '\u{2029}'     // line and paragraph separators
                | '\u{202a}'..='\u{202e}'     // bidi embeddings and overrides
                | '\u{2066}'..='\u{2069}'     // bidi isolates
                | '\u{feff}'), // BOM
        };
        escaped.then(|| Escape::Unicode(u32::from(c)))
    }
}

/// One escape sequence.
enum Escape {
    Text(&'static str),
    /// `\uXXXX`; every escaped character is in the Basic Multilingual Plane.
    Unicode(u32),
}

/// Emits `\uXXXX` for a code point below U+10000, lower-case hex.
fn emit_unicode<E>(code: u32, emit: &mut impl FnMut(&str) -> Result<(), E>) -> Result<(), E> {
    let nibble = |shift: u32| HEX_DIGITS[usize::try_from((code >> shift) & 0xf).unwrap_or(0)];
    let escape = [b'\\', b'u', nibble(12), nibble(8), nibble(4), nibble(0)];
    // Six ASCII bytes: always UTF-8.
    emit(core::str::from_utf8(&escape).unwrap_or_default())
}

/// Escapes `text` as the inside of a JSON string (no quotes), handing the output to `emit` in
/// pieces: runs of unescaped text and single escapes. Bytes that are not UTF-8 (only possible
/// from byte input such as a command line) are written as `\u00XX`, one per byte, so the
/// output is always valid UTF-8 and shows what the bytes were. The first error of `emit` stops
/// the writing and is returned.
pub fn escape_json<E>(text: &[u8], escapes: JsonEscapes, mut emit: impl FnMut(&str) -> Result<(), E>) -> Result<(), E> {
    for chunk in text.utf8_chunks() {
        let valid = chunk.valid();
        let mut run_start = 0;
        for (at, c) in valid.char_indices() {
            let Some(escape) = escapes.escape(c) else { continue };
            if run_start < at {
                emit(&valid[run_start..at])?;
            }
            match escape {
                Escape::Text(text) => emit(text)?,
                Escape::Unicode(code) => emit_unicode(code, &mut emit)?,
            }
            run_start = at + c.len_utf8();
        }
        if run_start < valid.len() {
            emit(&valid[run_start..])?;
        }
        for &b in chunk.invalid() {
            emit_unicode(u32::from(b), &mut emit)?;
        }
    }
    Ok(())
}

/// A JSON string literal, quotes included, with the [`JsonEscapes::Controls`] set: the form of
/// `policy explain --json` and the rules snapshots.
pub fn json_str(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    out.write_char('"')?;
    escape_json(text.as_bytes(), JsonEscapes::Controls, |piece| out.write_str(piece))?;
    out.write_char('"')
}

/// [`json_str`], or `null` for `None`.
pub fn json_opt(out: &mut impl fmt::Write, text: Option<&str>) -> fmt::Result {
    match text {
        Some(text) => json_str(out, text),
        None => out.write_str("null"),
    }
}

/// Appends `text` as the inside of a JSON string with the [`JsonEscapes::ControlsShort`] set
/// (quotes, backslashes and every control character escaped), so no caller-controlled text can
/// break out of its field: the form of the proxy's local JSON answers.
pub fn json_escape_into(out: &mut String, text: &str) {
    let Ok(()) = escape_json(text.as_bytes(), JsonEscapes::ControlsShort, |piece| {
        out.push_str(piece);
        Ok::<(), core::convert::Infallible>(())
    });
}

/// Writes bytes for a log line or report: printable ASCII as-is, `"` and `\` escaped, anything
/// else as `\xNN`, so a caller-chosen target can never forge a line or a field.
pub fn write_escaped(out: &mut impl fmt::Write, bytes: &[u8]) -> fmt::Result {
    for &byte in bytes {
        match byte {
            b'"' => out.write_str("\\\"")?,
            b'\\' => out.write_str("\\\\")?,
            0x20..=0x7E => out.write_char(char::from(byte))?,
            _ => write!(out, "\\x{byte:02x}")?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(text: &[u8], escapes: JsonEscapes) -> String {
        let mut out = String::new();
        let Ok(()) = escape_json(text, escapes, |piece| {
            out.push_str(piece);
            Ok::<(), core::convert::Infallible>(())
        });
        out
    }

    #[test]
    fn hex_round_trips_in_either_case() {
        assert_eq!(hex_pair(0x00), *b"00");
        assert_eq!(hex_pair(0xa5), *b"a5");
        assert_eq!(hex_pair(0xff), *b"ff");
        for digit in 0..=255_u8 {
            let expected = char::from(digit).to_digit(16).map(|v| u8::try_from(v).unwrap());
            assert_eq!(hex_value(digit), expected, "{digit:#x}");
        }
        let mut out = [0_u8; 3];
        assert_eq!(decode_hex_into(b"0aFf7E", &mut out), Some(()));
        assert_eq!(out, [0x0a, 0xff, 0x7e]);
        assert_eq!(decode_hex_into(b"0g", &mut out), None);
        // Stops at the shorter of the two.
        let mut one = [0_u8; 1];
        assert_eq!(decode_hex_into(b"12zz", &mut one), Some(()));
        assert_eq!(one, [0x12]);
    }

    #[test]
    fn json_escaping_neutralises_control_characters() {
        let mut s = String::new();
        json_escape_into(&mut s, "a\"b\\c\nd\r\u{1}\u{7f}");
        assert_eq!(s, "a\\\"b\\\\c\\nd\\r\\u0001\\u007f");
    }

    #[test]
    fn the_three_escape_sets_differ_only_where_documented() {
        let text = "q\"b\\n\nt\t\u{1}\u{7f}\u{9b}\u{202e}é€".as_bytes();
        assert_eq!(escaped(text, JsonEscapes::Controls), "q\\\"b\\\\n\\u000at\\u0009\\u0001\\u007f\u{9b}\u{202e}é€");
        assert_eq!(escaped(text, JsonEscapes::ControlsShort), "q\\\"b\\\\n\\nt\\t\\u0001\\u007f\u{9b}\u{202e}é€");
        assert_eq!(escaped(text, JsonEscapes::OneLine), "q\\\"b\\\\n\\u000at\\u0009\\u0001\\u007f\\u009b\\u202eé€");
        // Invalid UTF-8: one escape per byte, the valid text around it kept.
        assert_eq!(escaped(b"a\xffb\xc3", JsonEscapes::OneLine), "a\\u00ffb\\u00c3");
    }

    #[test]
    fn json_str_quotes_and_opt_writes_null() {
        let mut out = String::new();
        json_str(&mut out, "a\"\n").unwrap();
        out.push(',');
        json_opt(&mut out, None).unwrap();
        assert_eq!(out, "\"a\\\"\\u000a\",null");
    }

    #[test]
    fn escaping_neutralises_quotes_and_controls() {
        let mut out = String::new();
        write_escaped(&mut out, b"/a\"b\\c\r\n\xff").expect("string write");
        assert_eq!(out, "/a\\\"b\\\\c\\x0d\\x0a\\xff");
    }

    #[test]
    fn an_emit_error_stops_the_writing() {
        let mut pieces = 0;
        let result = escape_json(b"ab\ncd\ne", JsonEscapes::Controls, |_| {
            pieces += 1;
            if pieces == 2 { Err(()) } else { Ok(()) }
        });
        assert_eq!((result, pieces), (Err(()), 2));
    }
}
