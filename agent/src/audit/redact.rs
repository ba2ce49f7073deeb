// SPDX-License-Identifier: MIT
//! Secret redaction for command lines (msp-protocol.md §7.4), without regexes.
//!
//! Each detector below marks byte spans of the input as secret; overlapping and adjacent spans
//! merge, and each merged span becomes one `[REDACTED]`. Detectors err on the side of hiding:
//! an audit line that says less is better than one that leaks a credential (§11 item 6).
//! The shapes covered:
//!
//! * `name=value` and `name: value` / `"name":"value"` where `name` ends (ASCII
//!   case-insensitively) in `pwd`, `passwd`, `password`, `key`, `sig`, `token`, `secret` or
//!   `credential(s)`; the name is redacted with its value (`pwd=secret123;` → `[REDACTED];`).
//!   Values end at `;`, a quote, `&`, `,` or whitespace (password values only at `;` or a quote,
//!   as in SQL connection strings).
//! * `--password VALUE` style flags with such names: the value is redacted, the flag kept.
//! * `Authorization: <scheme> <credentials>` and `Bearer <token>` anywhere.
//! * JWTs and other base64 JSON (`eyJ…`), PEM private-key blocks (`-----[REDACTED]-----`),
//!   credentials in URLs (`scheme://[REDACTED]@host`).
//! * Key shapes: 44/88-character padded base64 (32/64-byte keys, storage account keys), Redis
//!   `…AzCa…` keys, Azure DevOps PATs (52 base32 characters, or 84 with `AZDO`), Entra client
//!   secrets (`xxx8Q~…`) and AWS access key ids (`AKIA…`).
//!
//! When more spans are found than [`MAX_SPANS`], everything from the first unrecorded span on
//! is redacted.

use heapless::Vec;

/// What replaces each secret.
pub const REDACTED: &[u8] = b"[REDACTED]";

/// Secret spans tracked per input; a command line is at most a few hundred bytes.
const MAX_SPANS: usize = 16;

/// Name suffixes whose value is a secret (compared ASCII case-insensitively).
const SECRET_NAME_SUFFIXES: [&[u8]; 9] =
    [b"pwd", b"passwd", b"password", b"key", b"sig", b"token", b"secret", b"credential", b"credentials"];

/// Of those, the names whose values may contain spaces (SQL connection strings).
const SPACED_VALUE_SUFFIXES: [&[u8]; 3] = [b"pwd", b"passwd", b"password"];

/// Writes `input` with every secret it recognises replaced by [`REDACTED`] into `out`
/// (cleared first). Output beyond `out`'s capacity is cut off.
pub fn redact<const N: usize>(input: &[u8], out: &mut Vec<u8, N>) {
    out.clear();
    // The work is done once for every capacity, into a plain slice: `resize` to the capacity
    // cannot fail, and the result is cut back to what was written.
    out.resize(N, 0).unwrap_or(());
    let written = redact_into(input, out);
    out.truncate(written);
}

/// [`redact`] into `out`, cut at its length; returns the bytes written.
fn redact_into(input: &[u8], out: &mut [u8]) -> usize {
    let mut spans = Spans { list: Vec::new(), rest_from: input.len() };
    assignments(input, &mut spans);
    flags(input, &mut spans);
    authorization(input, &mut spans);
    base64_json(input, &mut spans);
    pem_blocks(input, &mut spans);
    url_credentials(input, &mut spans);
    key_shapes(input, &mut spans);
    entra_secrets(input, &mut spans);
    spans.emit(input, out)
}

struct Spans {
    list: Vec<(usize, usize), MAX_SPANS>,
    /// Everything from here on is redacted (the span list overflowed).
    rest_from: usize,
}

impl Spans {
    fn add(&mut self, start: usize, end: usize) {
        if start < end && self.list.push((start, end)).is_err() {
            self.rest_from = self.rest_from.min(start);
        }
    }

    fn emit(mut self, input: &[u8], out: &mut [u8]) -> usize {
        self.list.sort_unstable();
        let mut merged: Vec<(usize, usize), { MAX_SPANS + 1 }> = Vec::new();
        let rest = (self.rest_from < input.len()).then_some((self.rest_from, input.len()));
        let clipped = self
            .list
            .iter()
            .filter(|(start, _)| *start < self.rest_from)
            .map(|&(start, end)| (start, end.min(self.rest_from)))
            .chain(rest);
        for (start, end) in clipped {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                // Capacity is the list's plus one for `rest`, so this push cannot fail.
                _ => merged.push((start, end)).unwrap_or(()),
            }
        }
        let (mut cursor, mut written) = (0, 0);
        for (start, end) in merged {
            push_capped(out, &mut written, input.get(cursor..start).unwrap_or_default());
            push_capped(out, &mut written, REDACTED);
            cursor = end;
        }
        push_capped(out, &mut written, input.get(cursor..).unwrap_or_default());
        written
    }
}

/// Appends what fits of `bytes` at `out[*written..]`.
fn push_capped(out: &mut [u8], written: &mut usize, bytes: &[u8]) {
    let room = out.get_mut(*written..).unwrap_or_default();
    let n = bytes.len().min(room.len());
    room[..n].copy_from_slice(&bytes[..n]);
    *written += n;
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_quote(b: u8) -> bool {
    b == b'"' || b == b'\''
}

/// The secret-name suffix `name` ends with, if any.
fn secret_suffix(name: &[u8]) -> Option<&'static [u8]> {
    SECRET_NAME_SUFFIXES
        .into_iter()
        .find(|suffix| name.len() >= suffix.len() && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix))
}

/// Start positions of `needle` in `hay`, ASCII case-insensitively.
fn positions_ci<'h>(hay: &'h [u8], needle: &'h [u8]) -> impl Iterator<Item = usize> + 'h {
    hay.windows(needle.len()).enumerate().filter(move |(_, w)| w.eq_ignore_ascii_case(needle)).map(|(i, _)| i)
}

/// Start positions of `needle` in `hay`, case-sensitively.
fn positions<'h>(hay: &'h [u8], needle: &'h [u8]) -> impl Iterator<Item = usize> + 'h {
    hay.windows(needle.len()).enumerate().filter(move |(_, w)| *w == needle).map(|(i, _)| i)
}

/// First index at or after `from` where `stop` holds, else the end.
fn run_end(input: &[u8], from: usize, stop: impl Fn(u8) -> bool) -> usize {
    input.get(from..).and_then(|tail| tail.iter().position(|&b| stop(b))).map_or(input.len(), |p| from + p)
}

/// `name=value`, `name: value`, `"name":"value"`.
fn assignments(input: &[u8], spans: &mut Spans) {
    for (at, &sep) in input.iter().enumerate() {
        if sep != b'=' && sep != b':' {
            continue;
        }
        let mut name_end = at;
        if sep == b':' && at > 0 && is_quote(input[at - 1]) {
            name_end -= 1;
        }
        let name_start = input[..name_end].iter().rposition(|&b| !is_word(b)).map_or(0, |p| p + 1);
        let Some(suffix) = secret_suffix(&input[name_start..name_end]) else {
            continue;
        };
        let mut value = at + 1;
        if sep == b':' {
            value = run_end(input, value, |b| b != b' ');
        }
        let quote = input.get(value).copied().filter(|b| is_quote(*b));
        if quote.is_some() {
            value += 1;
        }
        let spaced = SPACED_VALUE_SUFFIXES.contains(&suffix);
        let end = run_end(input, value, |b| match quote {
            Some(q) => b == q,
            None if spaced => b == b';' || is_quote(b),
            None => matches!(b, b';' | b'&' | b',') || is_quote(b) || b.is_ascii_whitespace(),
        });
        if end > value {
            spans.add(name_start, end);
        }
    }
}

/// `--password VALUE`, `-client-secret VALUE`: the flag stays, the next argument goes.
fn flags(input: &[u8], spans: &mut Spans) {
    for (at, &b) in input.iter().enumerate() {
        let starts_arg = at == 0 || input[at - 1].is_ascii_whitespace();
        if b != b'-' || !starts_arg {
            continue;
        }
        let name_start = run_end(input, at, |b| b != b'-');
        let name_end = run_end(input, name_start, |b| !(is_word(b) || b == b'-'));
        if name_end == name_start || secret_suffix(&input[name_start..name_end]).is_none() {
            continue;
        }
        if !input.get(name_end).is_some_and(u8::is_ascii_whitespace) {
            continue;
        }
        let value = run_end(input, name_end, |b| !b.is_ascii_whitespace());
        spans.add(value, run_end(input, value, |b| b.is_ascii_whitespace()));
    }
}

/// `Authorization: <scheme> <credentials>` (the whole header) and `Bearer <token>`.
fn authorization(input: &[u8], spans: &mut Spans) {
    let token_end = |from: usize| run_end(input, from, |b| b.is_ascii_whitespace() || is_quote(b));
    for start in positions_ci(input, b"authorization") {
        let mut at = start + b"authorization".len();
        if input.get(at).copied().is_some_and(is_quote) {
            at += 1;
        }
        if !matches!(input.get(at), Some(b':' | b'=')) {
            continue;
        }
        at = run_end(input, at + 1, |b| b != b' ' && !is_quote(b));
        let scheme_end = token_end(at);
        let credentials = run_end(input, scheme_end, |b| b != b' ');
        let end = match token_end(credentials) {
            end if end > credentials => end,
            _ => scheme_end,
        };
        spans.add(start, end);
    }
    for start in positions_ci(input, b"bearer") {
        if start > 0 && is_word(input[start - 1]) {
            continue;
        }
        let after = start + b"bearer".len();
        if !input.get(after).is_some_and(u8::is_ascii_whitespace) {
            continue;
        }
        let token = run_end(input, after, |b| !b.is_ascii_whitespace());
        let end = token_end(token);
        if end > token {
            spans.add(start, end);
        }
    }
}

/// `eyJ…`: base64 of `{"`, the start of every JWT part and of most encoded credentials.
fn base64_json(input: &[u8], spans: &mut Spans) {
    for start in positions(input, b"eyJ") {
        if start > 0 && (input[start - 1].is_ascii_alphanumeric() || input[start - 1] == b'-') {
            continue;
        }
        let end = run_end(input, start, |b| {
            !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+' | b'/' | b'='))
        });
        if end - start >= 8 {
            spans.add(start, end);
        }
    }
}

/// `-----BEGIN … PRIVATE KEY----- … -----END … PRIVATE KEY-----` → `-----[REDACTED]-----`;
/// a block cut off by truncation is redacted to the end.
fn pem_blocks(input: &[u8], spans: &mut Spans) {
    for marker in positions(input, b"PRIVATE KEY-----") {
        let Some(begin) = positions(&input[..marker], b"-----BEGIN").last() else {
            continue;
        };
        if positions(&input[begin + 5..marker], b"-----").next().is_some() {
            continue; // this marker closes an END line, not a BEGIN line
        }
        let body = marker + b"PRIVATE KEY-----".len();
        let end = positions(&input[body..], b"-----END")
            .next()
            .map(|p| body + p + b"-----END".len())
            .and_then(|tail| positions(&input[tail..], b"-----").next().map(|p| tail + p))
            .unwrap_or(input.len());
        spans.add(begin + b"-----".len(), end);
    }
}

/// `scheme://user:pass@host` → `scheme://[REDACTED]@host`.
fn url_credentials(input: &[u8], spans: &mut Spans) {
    for sep in positions(input, b"://") {
        let start = sep + 3;
        let end = run_end(input, start, |b| matches!(b, b'/' | b'?' | b'#') || is_quote(b) || b.is_ascii_whitespace());
        if let Some(at) = input[start..end].iter().rposition(|&b| b == b'@') {
            spans.add(start, start + at);
        }
    }
}

/// Runs of base64 characters that have the shape of a key or token.
fn key_shapes(input: &[u8], spans: &mut Spans) {
    let is_b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
    let mut at = 0;
    while at < input.len() {
        if !is_b64(input[at]) {
            at += 1;
            continue;
        }
        let start = at;
        at = run_end(input, at, |b| !is_b64(b));
        let padded = run_end(input, at, |b| b != b'=').min(at + 2);
        let run = &input[start..padded];
        let body = &input[start..at];
        let contains = |needle: &[u8]| positions(run, needle).next().is_some();
        let base32 = |b: &u8| b.is_ascii_lowercase() || (b'2'..=b'7').contains(b);
        let secret = (padded > at && matches!(run.len(), 44 | 88))
            || (run.len() >= 40 && contains(b"AzCa"))
            || (body.len() == 52 && body.iter().all(base32))
            || (body.len() == 84 && contains(b"AZDO"))
            || (body.len() == 20
                && body.starts_with(b"AKIA")
                && body.iter().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()));
        if secret {
            spans.add(start, padded);
        }
        at = padded;
    }
}

/// Entra client secrets: three characters, a digit, `Q~`, then at least 31 more.
fn entra_secrets(input: &[u8], spans: &mut Spans) {
    let is_secret_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'~' | b'.' | b'-');
    for q in positions(input, b"Q~") {
        if q < 4 || !input[q - 1].is_ascii_digit() || !input[q - 4..q].iter().all(|b| is_secret_char(*b)) {
            continue;
        }
        let end = run_end(input, q + 2, |b| !is_secret_char(b));
        if end - (q + 2) >= 31 {
            spans.add(q - 4, end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redacted(input: &str) -> String {
        let mut out: Vec<u8, 1024> = Vec::new();
        redact(input.as_bytes(), &mut out);
        String::from_utf8(out.to_vec()).expect("ascii in, ascii out")
    }

    #[test]
    fn spec_examples_hold() {
        assert_eq!(redacted("pwd=secret123;"), "[REDACTED];");
        assert_eq!(redacted("https://x/blob?sig=abc&o=v"), "https://x/blob?[REDACTED]&o=v");
        assert_eq!(redacted("Authorization: Bearer abc"), "[REDACTED]");
        assert_eq!(
            redacted("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----"),
            "-----[REDACTED]-----"
        );
    }

    #[test]
    fn connection_strings_and_assignments() {
        assert_eq!(
            redacted("sqlcmd Server=db;Password=two words;Database=x"),
            "sqlcmd Server=db;[REDACTED];Database=x"
        );
        assert_eq!(
            redacted("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abc+/==;EndpointSuffix=x"),
            "DefaultEndpointsProtocol=https;AccountName=a;[REDACTED];EndpointSuffix=x"
        );
        assert_eq!(redacted("app token=abc key=def secret=ghi"), "app [REDACTED] [REDACTED] [REDACTED]");
        assert_eq!(redacted(r#"{"password":"hunter2","user":"u"}"#), r#"{"[REDACTED]","user":"u"}"#);
        assert_eq!(redacted("--client-secret=abc x"), "--client-[REDACTED] x");
        assert_eq!(redacted("name=value key="), "name=value key=");
    }

    #[test]
    fn flags_keep_their_name() {
        assert_eq!(redacted("login --password hunter2 -u bob"), "login --password [REDACTED] -u bob");
        assert_eq!(redacted("az --account-key abc"), "az --account-key [REDACTED]");
        assert_eq!(redacted("ls --key-file /x"), "ls --key-file /x");
    }

    #[test]
    fn bearer_jwt_url_credentials() {
        assert_eq!(redacted("curl -H Bearer abc.def"), "curl -H [REDACTED]");
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl";
        assert_eq!(redacted(&format!("tool {jwt} --x")), "tool [REDACTED] --x");
        assert_eq!(redacted("git clone https://user:pa55@github.com/x"), "git clone https://[REDACTED]@github.com/x");
    }

    #[test]
    fn key_shapes_are_redacted() {
        let key44 = format!("{}=", "A1b2".repeat(10) + "xyz");
        assert_eq!(redacted(&format!("run {key44} now")), "run [REDACTED] now");
        let pat = "abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrst";
        assert_eq!(redacted(&format!("pat {pat}")), "pat [REDACTED]");
        assert_eq!(redacted("id AKIAIOSFODNN7EXAMPLE"), "id [REDACTED]");
        let entra = "abc8Q~abcdefghijklmnopqrstuvwxyz0123456";
        assert_eq!(redacted(&format!("s {entra}")), "s [REDACTED]");
    }

    #[test]
    fn innocent_command_lines_pass_unchanged() {
        for line in [
            "/usr/bin/python3 /opt/app/main.py --verbose",
            "curl -s http://169.254.169.254/metadata/instance?api-version=2021-02-01",
            "systemctl status waagent",
        ] {
            assert_eq!(redacted(line), line);
        }
    }

    #[test]
    fn span_overflow_redacts_the_rest_and_output_is_capped() {
        let many = "key=v ".repeat(40);
        let out = redacted(&many);
        assert!(!out.contains("=v"), "{out}");
        let mut small: Vec<u8, 8> = Vec::new();
        redact(b"0123456789", &mut small);
        assert_eq!(&small[..], b"01234567");
    }
}
