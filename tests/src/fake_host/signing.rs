// SPDX-License-Identifier: MIT
//! Independent MSP request-signature verifier (read `msp-protocol.md` §3.2–§3.4 first).
//!
//! The fake host is an oracle for the agent, so this module is written from the spec alone and
//! shares no code with the agent's signer: if both were built from one implementation, a bug in
//! it would sign and verify consistently and no test would notice. Everything works on bytes as
//! they crossed the wire, so what is verified is what was received.
//!
//! It is public so system tests can sign requests themselves (with a key from `GET /keys`).

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Header carrying the signature; it is the one header excluded from the string-to-sign.
pub const AUTHORIZATION_HEADER: &str = "x-ms-azure-host-authorization";
/// The only authorization scheme MSP defines.
pub const SCHEME: &str = "Azure-HMAC-SHA256";
/// Length of an HMAC-SHA256 tag in bytes.
const MAC_LEN_BYTES: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Why a signature did not verify. Each has a short stable `reason()` used in the request log
/// as `invalid:<reason>`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum VerifyError {
    /// The header is not `Azure-HMAC-SHA256 <guid> <hex>` with single spaces.
    MalformedHeader,
    /// The scheme word is not `Azure-HMAC-SHA256`.
    WrongScheme,
    /// The signature is not 64 hex digits.
    BadSignatureHex,
    /// The MAC does not match the string-to-sign rebuilt from the received bytes.
    Mismatch,
}

impl VerifyError {
    /// Short machine-readable reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::MalformedHeader => "malformed-authorization-header",
            Self::WrongScheme => "wrong-scheme",
            Self::BadSignatureHex => "bad-signature-hex",
            Self::Mismatch => "signature-mismatch",
        }
    }
}

/// A parsed `x-ms-azure-host-authorization` value.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AuthorizationHeader<'a> {
    /// The key GUID named by the signer.
    pub guid: &'a str,
    /// The signature as sent (hex).
    pub signature_hex: &'a str,
}

/// Parses `Azure-HMAC-SHA256 <guid> <hex>` (surrounding whitespace is allowed, as for any header
/// value; inner separators must be single spaces, as the spec's emitter writes them).
pub fn parse_authorization(value: &[u8]) -> Result<AuthorizationHeader<'_>, VerifyError> {
    let text = std::str::from_utf8(value.trim_ascii()).map_err(|_utf8| VerifyError::MalformedHeader)?;
    let mut parts = text.split(' ');
    let (Some(scheme), Some(guid), Some(signature_hex), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VerifyError::MalformedHeader);
    };
    if scheme != SCHEME {
        return Err(VerifyError::WrongScheme);
    }
    if guid.is_empty() || signature_hex.is_empty() {
        return Err(VerifyError::MalformedHeader);
    }
    Ok(AuthorizationHeader { guid, signature_hex })
}

/// Decodes hex of either case; `None` on odd length or a non-hex digit.
pub fn decode_hex(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks_exact(2)
        .map(|pair| {
            let hi = char::from(pair[0]).to_digit(16)?;
            let lo = char::from(pair[1]).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

/// Lower-case hex, as the signer emits it.
pub fn encode_hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// HMAC-SHA256 of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; MAC_LEN_BYTES] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Splits a request-target into (raw path, raw query). An absolute-form target
/// (`http://host/p?q`) has its scheme and authority removed first, since only the path is signed.
pub fn split_target(target: &str) -> (&str, Option<&str>) {
    let mut rest = target;
    if let Some(scheme_end) = target.find("://") {
        let scheme = &target[..scheme_end];
        if !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphabetic()) {
            let after = &target[scheme_end + 3..];
            let authority_end = after.find(['/', '?']).unwrap_or(after.len());
            rest = &after[authority_end..];
        }
    }
    match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    }
}

/// Canonical query of §3.3: split on `&` and the first `=`, drop empty keys, lower-case keys
/// (never decode), sort by `key ++ value`, collapse identical sort keys (last wins), join with
/// `&`, writing a bare `key` when the value is empty.
pub fn canonical_query(query: &[u8]) -> Vec<u8> {
    let mut sorted: BTreeMap<Vec<u8>, (Vec<u8>, &[u8])> = BTreeMap::new();
    for piece in query.split(|b| *b == b'&') {
        let (key, value) = match piece.iter().position(|b| *b == b'=') {
            Some(i) => (&piece[..i], &piece[i + 1..]),
            None => (piece, &b""[..]),
        };
        if key.is_empty() {
            continue;
        }
        let key = key.to_ascii_lowercase();
        let mut sort_key = key.clone();
        sort_key.extend_from_slice(value);
        sorted.insert(sort_key, (key, value));
    }
    let mut out = Vec::new();
    for (key, value) in sorted.values() {
        if !out.is_empty() {
            out.push(b'&');
        }
        out.extend_from_slice(key);
        if !value.is_empty() {
            out.push(b'=');
            out.extend_from_slice(value);
        }
    }
    out
}

/// The string-to-sign of §3.2, rebuilt from a request exactly as received:
/// `METHOD \n BODY \n (name:value\n)* PATH \n CANONICAL-QUERY`.
///
/// Headers: every one except the authorization header, name lower-cased, value trimmed, the
/// last occurrence of a repeated name winning, sorted by name.
pub fn string_to_sign<N, V>(method: &str, body: &[u8], headers: &[(N, V)], target: &str) -> Vec<u8>
where
    N: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut lines: BTreeMap<Vec<u8>, &[u8]> = BTreeMap::new();
    for (name, value) in headers {
        let name = name.as_ref().to_ascii_lowercase();
        if name == AUTHORIZATION_HEADER.as_bytes() {
            continue;
        }
        lines.insert(name, value.as_ref().trim_ascii());
    }
    let (path, query) = split_target(target);

    let mut out = Vec::with_capacity(method.len() + body.len() + path.len() + 256);
    out.extend_from_slice(method.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(body);
    out.push(b'\n');
    for (name, value) in &lines {
        out.extend_from_slice(name);
        out.push(b':');
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out.extend_from_slice(path.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&canonical_query(query.unwrap_or_default().as_bytes()));
    out
}

/// Lower-case hex signature of `string_to_sign` under `key`.
pub fn sign(key: &[u8], string_to_sign: &[u8]) -> String {
    encode_hex_lower(&hmac_sha256(key, string_to_sign))
}

/// A complete `x-ms-azure-host-authorization` value.
pub fn authorization_value(guid: &str, key: &[u8], string_to_sign: &[u8]) -> String {
    format!("{SCHEME} {guid} {}", sign(key, string_to_sign))
}

/// Checks `signature_hex` (either case, to be lenient as §3.8 suggests) against the MAC of
/// `string_to_sign`, in constant time.
pub fn verify(key: &[u8], string_to_sign: &[u8], signature_hex: &str) -> Result<(), VerifyError> {
    if signature_hex.len() != MAC_LEN_BYTES * 2 {
        return Err(VerifyError::BadSignatureHex);
    }
    let tag = decode_hex(signature_hex.as_bytes()).ok_or(VerifyError::BadSignatureHex)?;
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(string_to_sign);
    mac.verify_slice(&tag).map_err(|_mac| VerifyError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// §3.4 key.
    const KEY_HEX: &[u8] = b"4A404E635266556A586E3272357538782F413F4428472B4B6250645367566B59";
    const DATE: &str = "Wed, 23 Apr 2025 12:00:00 GMT";
    const ROOT_CLAIMS: &str = "{ \"isRoot\": \"true\"}";

    fn key() -> Vec<u8> {
        decode_hex(KEY_HEX).unwrap()
    }

    fn check(sts: &[u8], expected: &str) {
        assert_eq!(sign(&key(), sts), expected);
        verify(&key(), sts, expected).unwrap();
        verify(&key(), sts, &expected.to_ascii_uppercase()).unwrap();
        let mut tampered = sts.to_vec();
        tampered.push(b'x');
        assert_eq!(verify(&key(), &tampered, expected), Err(VerifyError::Mismatch));
    }

    #[test]
    fn hmac_primitive_matches_spec_vector() {
        assert_eq!(
            encode_hex_lower(&hmac_sha256(&key(), b"Hello world")),
            "a15b46f621193876a6d3121b836dc2af4180e2786642e55235ef916fc5b082a3"
        );
    }

    #[test]
    fn vector_1_goal_state_get() {
        let headers = [
            ("x-ms-version", "2012-11-30"),
            ("x-ms-azure-host-date", DATE),
            ("host", "168.63.129.16"),
            ("x-ms-azure-host-claims", ROOT_CLAIMS),
            ("content-length", "0"),
        ];
        let sts = string_to_sign("GET", b"", &headers, "/machine?comp=goalstate");
        assert_eq!(
            sts,
            b"GET\n\ncontent-length:0\nhost:168.63.129.16\nx-ms-azure-host-claims:{ \"isRoot\": \"true\"}\nx-ms-azure-host-date:Wed, 23 Apr 2025 12:00:00 GMT\nx-ms-version:2012-11-30\n/machine\ncomp=goalstate"
        );
        check(&sts, "35d027d96fb783dcbd427dfbd3a0b81fb463cdd5cd43542e5f5dcb5db9786537");
    }

    #[test]
    fn vector_2_attestation_trims_metadata_and_ignores_authorization() {
        let guid = "9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf";
        let expected = "71a091e6c9e21a0e3972a3b5a481c4d7a578f4d4f28c810636f7e43387bfb8e0";
        let authorization = format!("{SCHEME} {guid} {expected}");
        let headers = [
            ("Metadata", "True "),
            ("x-ms-azure-host-date", DATE),
            ("host", "168.63.129.16"),
            ("x-ms-azure-host-claims", ROOT_CLAIMS),
            ("content-length", "0"),
            ("X-MS-Azure-Host-Authorization", authorization.as_str()),
        ];
        let target = format!("/secure-channel/key/{guid}/key-attestation");
        let sts = string_to_sign("POST", b"", &headers, &target);
        assert!(sts.ends_with(b"/key-attestation\n"), "empty query keeps the trailing newline");
        check(&sts, expected);
        let parsed = parse_authorization(authorization.as_bytes()).unwrap();
        assert_eq!(parsed.guid, guid);
        assert_eq!(parsed.signature_hex, expected);
    }

    #[test]
    fn vector_3_proxied_imds_get() {
        let headers = [
            ("host", "169.254.169.254"),
            ("user-agent", "curl/8.5.0"),
            ("accept", "*/*"),
            ("metadata", "true"),
            ("x-ms-azure-host-claims", "{ \"isRoot\": \"false\"}"),
            ("x-ms-azure-host-date", DATE),
        ];
        let sts = string_to_sign("GET", b"", &headers, "/metadata/instance?api-version=2021-02-01");
        check(&sts, "75afe2e9a612e6be0caaac7d967c639ab0b1141a193212de74ab4cce3657a6a6");
    }

    #[test]
    fn vector_4_post_with_raw_body() {
        let headers = [
            ("content-type", "application/json"),
            ("content-length", "7"),
            ("host", "168.63.129.16"),
            ("x-ms-azure-host-claims", ROOT_CLAIMS),
            ("x-ms-azure-host-date", DATE),
        ];
        let sts = string_to_sign("POST", b"{\"a\":1}", &headers, "/machine?comp=health");
        check(&sts, "ee5d7beb3802e34afb744e7f4c224bb24747c4052e76f802a4a623bd9c20917e");
    }

    #[test]
    fn canonical_query_matches_spec_vector() {
        let target = "/machine/a8016240-7286-49ef-8981-63520cb8f6d0/49c242ba%2Dc18a%2D4f6c%2D8cf8%2D85ff790b6431.%5Fzpeng%2Debpf%2Dvm2?comp=config&keyOnly&comp=again&type=hostingEnvironmentConfig&incarnation=1&resource=https%3a%2f%2fstorage.azure.com%2f";
        let (path, query) = split_target(target);
        assert_eq!(
            path,
            "/machine/a8016240-7286-49ef-8981-63520cb8f6d0/49c242ba%2Dc18a%2D4f6c%2D8cf8%2D85ff790b6431.%5Fzpeng%2Debpf%2Dvm2"
        );
        assert_eq!(
            canonical_query(query.unwrap().as_bytes()),
            b"comp=again&comp=config&incarnation=1&keyonly&resource=https%3a%2f%2fstorage.azure.com%2f&type=hostingEnvironmentConfig"
        );
    }

    #[test]
    fn canonical_query_quirks() {
        // Empty keys dropped, `k` and `k=` both become `k`, identical sort keys collapse, and
        // `a=bc` / `ab=c` collide on sort key `abc` (last wins).
        assert_eq!(canonical_query(b"=x&k=&&K"), b"k");
        assert_eq!(canonical_query(b"a=bc&ab=c"), b"ab=c");
        assert_eq!(canonical_query(b"B=%2F&a=1"), b"a=1&b=%2F");
    }

    #[test]
    fn last_repeated_header_wins() {
        let headers = [("X-A", "first"), ("x-a", " second ")];
        assert_eq!(string_to_sign("GET", b"", &headers, "/"), b"GET\n\nx-a:second\n/\n");
    }

    #[test]
    fn absolute_form_target_signs_only_path_and_query() {
        assert_eq!(split_target("http://168.63.129.16/machine?comp=goalstate"), ("/machine", Some("comp=goalstate")));
        assert_eq!(split_target("http://h?x=1"), ("", Some("x=1")));
    }

    #[test]
    fn rejects_malformed_authorization_values() {
        assert_eq!(parse_authorization(b"Azure-HMAC-SHA256 g"), Err(VerifyError::MalformedHeader));
        assert_eq!(parse_authorization(b"Azure-HMAC-SHA256  g s"), Err(VerifyError::MalformedHeader));
        assert_eq!(parse_authorization(b"Bearer g s"), Err(VerifyError::WrongScheme));
        assert_eq!(verify(&key(), b"", "abc"), Err(VerifyError::BadSignatureHex));
        assert_eq!(verify(&key(), b"", &"zz".repeat(32)), Err(VerifyError::BadSignatureHex));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(decode_hex(b"0aFf").unwrap(), [0x0a, 0xff]);
        assert_eq!(encode_hex_lower(&[0x0a, 0xff]), "0aff");
        assert!(decode_hex(b"abc").is_none());
    }
}
