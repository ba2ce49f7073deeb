// SPDX-License-Identifier: MIT
//! A small, bounded reader for the host's XML documents (goal state, shared config): the text
//! or an attribute of the first element reached by a chain of element names, each searched
//! inside the previous one's content. No XML crate: these documents are flat, host-issued, and
//! only a few values with unique names are needed.
//!
//! Not a parser. It finds `<Name>`, `<Name attr="…">` or `<Name/>` (the name must be followed
//! by `>`, `/` or whitespace, so `Role` never matches `RoleInstance`), takes the content up to
//! the next `</Name>`, and decodes the five predefined entities and character references.
//! Elements nested in an element of the same name, CDATA and comments holding markup are not
//! understood (host documents have none); content with markup where text is expected is an
//! error. Every index is checked and values are decoded into fixed-capacity strings: no input
//! can panic it or make it allocate.

use core::fmt::Write;

use heapless::String;

/// Why a value could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XmlError {
    /// The document ended inside the element.
    Truncated,
    /// Markup where text was expected, an unquoted attribute, or bytes that are not UTF-8.
    Malformed,
    /// No element (or attribute) of that name.
    NotFound,
    /// The value is longer than the room for it.
    TooLong,
    /// An entity or character reference that is not allowed.
    BadEntity,
}

impl XmlError {
    /// A short reason for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Truncated => "XML truncated",
            Self::Malformed => "XML malformed",
            Self::NotFound => "XML element missing",
            Self::TooLong => "XML value too long",
            Self::BadEntity => "XML bad entity",
        }
    }
}

/// Finds `needle` in `hay`; returns its start.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether `b` may follow an element name in a tag.
fn ends_name(b: u8) -> bool {
    b == b'>' || b == b'/' || b.is_ascii_whitespace()
}

/// The first element `name` in `xml`: its attribute text and its content (empty for `<x/>`).
fn element<'a>(xml: &'a [u8], name: &str) -> Result<(&'a [u8], &'a [u8]), XmlError> {
    let name = name.as_bytes();
    let mut from = 0;
    loop {
        let rest = xml.get(from..).ok_or(XmlError::NotFound)?;
        let lt = find(rest, b"<").ok_or(XmlError::NotFound)?;
        let tag = &rest[lt + 1..];
        from += lt + 1;
        let Some(after) = tag.strip_prefix(name) else { continue };
        match after.first() {
            Some(&b) if ends_name(b) => {}
            Some(_) => continue,
            None => return Err(XmlError::Truncated),
        }
        // The end of the start tag: the first `>` outside a quoted attribute value.
        let mut quote = None;
        let gt = after
            .iter()
            .position(|&b| match quote {
                Some(q) if b == q => {
                    quote = None;
                    false
                }
                Some(_) => false,
                None if b == b'"' || b == b'\'' => {
                    quote = Some(b);
                    false
                }
                None => b == b'>',
            })
            .ok_or(XmlError::Truncated)?;
        if let Some(attrs) = after[..gt].strip_suffix(b"/") {
            return Ok((attrs, b""));
        }
        let (attrs, body) = (&after[..gt], &after[gt + 1..]);
        // The matching end tag: `</name` then `>` or whitespace.
        let mut at = 0;
        loop {
            let close = find(&body[at..], b"</").ok_or(XmlError::Truncated)? + at;
            let candidate = &body[close + 2..];
            if candidate
                .strip_prefix(name)
                .and_then(<[u8]>::first)
                .is_some_and(|&b| b == b'>' || b.is_ascii_whitespace())
            {
                return Ok((attrs, &body[..close]));
            }
            at = close + 2;
        }
    }
}

/// The content of the element reached by `path` (each name searched inside the previous).
fn content<'a>(xml: &'a [u8], path: &[&str]) -> Result<(&'a [u8], &'a [u8]), XmlError> {
    let mut found = (&b""[..], xml);
    for name in path {
        found = element(found.1, name)?;
    }
    Ok(found)
}

/// The text of the element at `path`, entity-decoded and trimmed.
pub fn text<const N: usize>(xml: &[u8], path: &[&str]) -> Result<String<N>, XmlError> {
    let mut out = String::new();
    text_into(xml, path, &mut out).map(|()| out)
}

/// The value of attribute `name` of the element at `path`, entity-decoded.
pub fn attribute<const N: usize>(xml: &[u8], path: &[&str], name: &str) -> Result<String<N>, XmlError> {
    let mut out = String::new();
    attribute_into(xml, path, name, &mut out).map(|()| out)
}

// The work is done once, not per capacity: `out` is a `dyn Write` whose failure means "full".

fn text_into(xml: &[u8], path: &[&str], out: &mut dyn Write) -> Result<(), XmlError> {
    let (_, body) = content(xml, path)?;
    if body.contains(&b'<') {
        return Err(XmlError::Malformed);
    }
    decode_into(body.trim_ascii(), out)
}

fn attribute_into(xml: &[u8], path: &[&str], name: &str, out: &mut dyn Write) -> Result<(), XmlError> {
    let (mut rest, _) = content(xml, path)?;
    loop {
        rest = rest.trim_ascii_start();
        if rest.is_empty() {
            return Err(XmlError::NotFound);
        }
        let eq = rest.iter().position(|&b| b == b'=').ok_or(XmlError::Malformed)?;
        let (attr, after) = (rest[..eq].trim_ascii(), rest[eq + 1..].trim_ascii_start());
        let Some((&quote @ (b'"' | b'\''), value)) = after.split_first() else { return Err(XmlError::Malformed) };
        let close = value.iter().position(|&b| b == quote).ok_or(XmlError::Malformed)?;
        if attr == name.as_bytes() {
            return decode_into(&value[..close], out);
        }
        rest = &value[close + 1..];
    }
}

/// Writes `raw` with the predefined entities and decimal or hex character references decoded.
fn decode_into(raw: &[u8], out: &mut dyn Write) -> Result<(), XmlError> {
    let full = |_full| XmlError::TooLong;
    let text = core::str::from_utf8(raw).map_err(|_bad| XmlError::Malformed)?;
    // Pieces between references, cut at ASCII `&` and `;` (always character boundaries).
    for (i, piece) in text.split('&').enumerate() {
        if i == 0 {
            out.write_str(piece).map_err(full)?;
            continue;
        }
        let semi = piece.bytes().position(|b| b == b';').ok_or(XmlError::BadEntity)?;
        let (entity, tail) = (piece.get(..semi).unwrap_or_default(), piece.get(semi + 1..).unwrap_or_default());
        let c = match entity.as_bytes() {
            b"amp" => '&',
            b"lt" => '<',
            b"gt" => '>',
            b"quot" => '"',
            b"apos" => '\'',
            [b'#', b'x', digits @ ..] => reference(digits, 16)?,
            [b'#', digits @ ..] => reference(digits, 10)?,
            _ => return Err(XmlError::BadEntity),
        };
        out.write_char(c).map_err(full)?;
        out.write_str(tail).map_err(full)?;
    }
    Ok(())
}

/// A character reference's code point: 1 to 7 digits (no overflow; past U+10FFFF and
/// surrogates are refused by `char::from_u32`).
fn reference(digits: &[u8], radix: u32) -> Result<char, XmlError> {
    let code = (1..8)
        .contains(&digits.len())
        .then(|| digits.iter().try_fold(0u32, |acc, &d| Some(acc * radix + char::from(d).to_digit(radix)?)))
        .flatten();
    code.and_then(char::from_u32).ok_or(XmlError::BadEntity)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &[u8] = br#"<?xml version="1.0" encoding="utf-8"?>
<Root xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <Empty/>
  <Roles><Role name="not-this"/></Roles>
  <RoleInstance><Role x='1>' y="a&amp;b &#x41;&#66;">  hello &lt;world&gt;  </Role></RoleInstance>
  <Role name="top" />
  <D>before<Child>inner</Child>after</D>
</Root>"#;

    #[test]
    fn finds_text_and_attributes_along_a_path() {
        assert_eq!(text::<64>(DOC, &["RoleInstance", "Role"]).unwrap(), "hello <world>");
        assert_eq!(attribute::<64>(DOC, &["RoleInstance", "Role"], "y").unwrap(), "a&b AB");
        assert_eq!(
            attribute::<64>(DOC, &["RoleInstance", "Role"], "x").unwrap(),
            "1>",
            "a quoted > is not the tag end"
        );
        assert_eq!(attribute::<64>(DOC, &["Roles", "Role"], "name").unwrap(), "not-this");
        assert_eq!(text::<64>(DOC, &["Empty"]).unwrap(), "");
        assert_eq!(text::<64>(DOC, &["D", "Child"]).unwrap(), "inner");
        assert_eq!(text::<64>(DOC, &["D"]), Err(XmlError::Malformed), "markup where text is expected");
        assert_eq!(text::<64>(DOC, &["Missing"]), Err(XmlError::NotFound));
        assert_eq!(attribute::<64>(DOC, &["RoleInstance", "Role"], "z"), Err(XmlError::NotFound));
        assert_eq!(text::<4>(DOC, &["RoleInstance", "Role"]), Err(XmlError::TooLong));
    }

    #[test]
    fn hostile_input_is_an_error_never_a_panic() {
        let complete = DOC.windows(15).position(|w| w == b"</RoleInstance>").unwrap() + 15;
        for cut in 0..DOC.len() {
            let r = text::<64>(&DOC[..cut], &["RoleInstance", "Role"]);
            assert_eq!(r.is_ok(), cut >= complete, "cut {cut}: {r:?}");
            drop(attribute::<64>(&DOC[..cut], &["RoleInstance", "Role"], "y"));
        }
        assert_eq!(text::<8>(b"<a>&bogus;</a>", &["a"]), Err(XmlError::BadEntity));
        assert_eq!(text::<8>(b"<a>&#xD800;</a>", &["a"]), Err(XmlError::BadEntity));
        assert_eq!(text::<8>(b"<a>&#99999999999;</a>", &["a"]), Err(XmlError::BadEntity));
        assert_eq!(text::<8>(b"<a>&#;</a>", &["a"]), Err(XmlError::BadEntity));
        assert_eq!(text::<8>(b"<a>&#65;&#x42;</a>", &["a"]).unwrap(), "AB");
        assert_eq!(text::<8>(b"<a>open", &["a"]), Err(XmlError::Truncated));
        assert_eq!(text::<8>(b"<a", &["a"]), Err(XmlError::Truncated));
        for garbage in [
            &b"<"[..],
            b"<>",
            b"</>",
            b"<a></b>",
            b"<a x=>t</a>",
            b"<a x='1>t</a>",
            b"<a>&amp</a>",
            b"\xff\xfe<a>\xff</a>",
            b"<a x=\"\xff\"/>",
            b"<a/",
        ] {
            drop(text::<8>(garbage, &["a"]));
            drop(attribute::<8>(garbage, &["a"], "x"));
        }
        let mut noise = [0u8; 4096];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..200 {
            for b in &mut noise {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = b"<>/='\"&;#xa b?!-"[usize::try_from(seed % 16).unwrap()];
            }
            drop(text::<64>(&noise[..round * 20], &["a", "b"]));
            drop(attribute::<64>(&noise[..round * 20], &["a"], "b"));
        }
    }
}
