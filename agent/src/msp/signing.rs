// SPDX-License-Identifier: MIT
//! Request signing: the HMAC-SHA256 string-to-sign, the canonical query, the authorization and
//! claims header values, and the skip list.
//!
//! Heads up! Read `../shared/spec/msp-protocol.md` §3.2–§3.7 first: the string-to-sign has
//! quirks (raw body bytes, last-wins headers, a canonical query whose sort keys can collide)
//! that are wire facts and must be reproduced exactly, and §10 item 11 explains why header
//! values outside visible ASCII are an error here instead of a panic.
//!
//! Signing runs on the per-request path, so nothing here allocates: the string-to-sign is
//! never built, its pieces are streamed into the MAC, and sorting uses fixed index arrays.

use core::cmp::Ordering;
use core::fmt;

use heapless::String;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::limits::UPSTREAM_HEADERS_MAX;
use crate::text::{decode_hex_into, hex_pair};

/// The only authorization scheme the host speaks (§1.2, §3.2).
pub const AUTHORIZATION_SCHEME: &str = "Azure-HMAC-SHA256";
/// Carries `Azure-HMAC-SHA256 <keyGuid> <hexmac>`; never part of the string-to-sign.
pub const AUTHORIZATION_HEADER: &str = "x-ms-azure-host-authorization";
/// Carries the caller's elevation, [`CLAIMS_ROOT`] or [`CLAIMS_NOT_ROOT`] (§3.5).
pub const CLAIMS_HEADER: &str = "x-ms-azure-host-claims";
/// Carries the host-synchronised RFC 1123 date, the only freshness input (§3.6).
pub const DATE_HEADER: &str = "x-ms-azure-host-date";
/// Claims of a root caller, and of all the agent's own calls. Spacing is a wire fact (§3.5).
pub const CLAIMS_ROOT: &str = "{ \"isRoot\": \"true\"}";
/// Claims of a non-root caller (§3.5).
pub const CLAIMS_NOT_ROOT: &str = "{ \"isRoot\": \"false\"}";

/// Most non-empty-key pieces in one query string: as many as a request head the proxy accepts
/// can hold (`k&` is two bytes), so whatever the parser accepts can be signed. Each piece is a
/// few offsets (10 bytes), so the sort still runs on a fixed 40 KiB stack array.
pub const MAX_QUERY_PIECES: usize = crate::limits::REQUEST_HEAD_MAX_BYTES / 2;
/// Longest key GUID accepted; GUIDs are 36 characters (38 with braces).
pub const GUID_MAX_BYTES: usize = 64;
/// Shortest key accepted (128 bits); the host issues 256-bit keys.
pub const KEY_MIN_BYTES: usize = 16;
/// Longest key accepted (one SHA-256 block; the key JSON holds at most 128 hex digits).
pub const KEY_MAX_BYTES: usize = 64;
/// Length of a MAC in bytes.
pub const MAC_BYTES: usize = 32;
/// Capacity of an authorization header value: scheme, space, GUID, space, 64 hex digits.
pub const AUTHORIZATION_VALUE_MAX_BYTES: usize = 160;

const _: () =
    assert!(AUTHORIZATION_SCHEME.len() + 1 + GUID_MAX_BYTES + 1 + 2 * MAC_BYTES <= AUTHORIZATION_VALUE_MAX_BYTES);

type HmacSha256 = Hmac<Sha256>;

/// Why a key could not be built or a request could not be signed or verified.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SignError {
    /// The key string is not an even number of hex digits.
    DecodeKeyHex,
    /// The decoded key is shorter than [`KEY_MIN_BYTES`] or longer than [`KEY_MAX_BYTES`].
    KeyLength,
    /// The key GUID is empty, too long, or has characters other than `[0-9A-Za-z{}_-]`.
    KeyGuid,
    /// The request has more than [`UPSTREAM_HEADERS_MAX`] headers.
    TooManyHeaders,
    /// A header name is empty or not a visible-ASCII token without `:`.
    HeaderNameInvalid,
    /// A header value has a byte outside visible ASCII, space and tab (§10 item 11).
    HeaderValueNotAscii,
    /// The query has more than [`MAX_QUERY_PIECES`] pieces.
    QueryTooComplex,
    /// An authorization header value is not `Azure-HMAC-SHA256 <guid> <64 hex digits>`.
    AuthorizationMalformed,
    /// The MAC does not match the request.
    SignatureMismatch,
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DecodeKeyHex => "signing key is not valid hex",
            Self::KeyLength => "signing key length is out of range",
            Self::KeyGuid => "signing key guid is empty, too long or has invalid characters",
            Self::TooManyHeaders => "too many headers to sign",
            Self::HeaderNameInvalid => "header name is not a token",
            Self::HeaderValueNotAscii => "header value has bytes outside visible ascii",
            Self::QueryTooComplex => "query has too many pieces to sign",
            Self::AuthorizationMalformed => "authorization header value is malformed",
            Self::SignatureMismatch => "signature does not match",
        })
    }
}

/// A latched key, ready to sign: its GUID and the keyed HMAC state.
///
/// Only the keyed MAC state is kept (it is cloned per request, which also saves re-keying);
/// the raw key bytes are dropped after construction. `Debug` prints the GUID only.
#[derive(Clone)]
pub struct SigningKey {
    guid: String<GUID_MAX_BYTES>,
    mac: HmacSha256,
}

impl SigningKey {
    /// Builds a key from its GUID and the hex `key` of the key document (upper or lower case).
    pub fn from_hex(guid: &str, hex_key: &str) -> Result<Self, SignError> {
        let guid_ok = !guid.is_empty()
            && guid.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'{' | b'}'));
        if !guid_ok {
            return Err(SignError::KeyGuid);
        }
        let guid = String::try_from(guid).map_err(|()| SignError::KeyGuid)?;
        let hex = hex_key.as_bytes();
        if !hex.len().is_multiple_of(2) {
            return Err(SignError::DecodeKeyHex);
        }
        let len = hex.len() / 2;
        if !(KEY_MIN_BYTES..=KEY_MAX_BYTES).contains(&len) {
            return Err(SignError::KeyLength);
        }
        let mut key = [0_u8; KEY_MAX_BYTES];
        if decode_hex_into(hex, &mut key).is_none() {
            key.fill(0);
            return Err(SignError::DecodeKeyHex);
        }
        let mac = HmacSha256::new_from_slice(&key[..len]).map_err(|_invalid| SignError::KeyLength);
        key.fill(0);
        Ok(Self { guid, mac: mac? })
    }

    /// The key GUID, exactly as in the key document.
    pub fn guid(&self) -> &str {
        &self.guid
    }

    /// HMAC-SHA256 of `data` with this key (for deriving subordinate keys, e.g. the audit
    /// checkpoint key; the raw key never leaves this type).
    pub fn mac(&self, data: &[u8]) -> [u8; MAC_BYTES] {
        let mut mac = self.mac.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("guid", &self.guid.as_str()).field("key", &"<redacted>").finish()
    }
}

/// Signs a request (§3.2): returns the HMAC-SHA256 of its string-to-sign.
///
/// `headers` are `(name, value)` in wire order, exactly the headers that will be sent;
/// `target` is the request-target as sent (path, then optionally `?` and the raw query).
pub fn sign(
    key: &SigningKey,
    method: &[u8],
    body: &[u8],
    headers: &[(&[u8], &[u8])],
    target: &[u8],
) -> Result<[u8; MAC_BYTES], SignError> {
    let mac = mac_request(key, method, body, headers, target)?;
    Ok(mac.finalize().into_bytes().into())
}

/// Checks `mac` against the request in constant time (for fakes and tests; the agent only
/// signs). Arguments as for [`sign`].
pub fn verify(
    key: &SigningKey,
    method: &[u8],
    body: &[u8],
    headers: &[(&[u8], &[u8])],
    target: &[u8],
    mac: &[u8; MAC_BYTES],
) -> Result<(), SignError> {
    mac_request(key, method, body, headers, target)?.verify_slice(mac).map_err(|_mismatch| SignError::SignatureMismatch)
}

/// The `x-ms-azure-host-authorization` value: `Azure-HMAC-SHA256 <guid> <64 lower-case hex>`.
pub fn authorization_value(key: &SigningKey, mac: &[u8; MAC_BYTES]) -> String<AUTHORIZATION_VALUE_MAX_BYTES> {
    let mut hex = [0_u8; 2 * MAC_BYTES];
    for (pair, &byte) in hex.chunks_exact_mut(2).zip(mac) {
        pair.copy_from_slice(&hex_pair(byte));
    }
    let mut out = String::new();
    // Capacity is checked by the const assertion above; pushes of ASCII cannot fail.
    for part in [AUTHORIZATION_SCHEME.as_bytes(), b" ", key.guid.as_bytes(), b" ", &hex] {
        for &b in part {
            if out.push(char::from(b)).is_err() {
                break;
            }
        }
    }
    out
}

/// Splits an authorization header value into its GUID and MAC. The hex is accepted in either
/// case (§3.8: a verifier should be lenient).
pub fn parse_authorization_value(value: &[u8]) -> Result<(&[u8], [u8; MAC_BYTES]), SignError> {
    let rest = value
        .strip_prefix(AUTHORIZATION_SCHEME.as_bytes())
        .and_then(|rest| rest.strip_prefix(b" "))
        .ok_or(SignError::AuthorizationMalformed)?;
    let space = rest.iter().position(|&b| b == b' ').ok_or(SignError::AuthorizationMalformed)?;
    let (guid, hex) = (&rest[..space], &rest[space + 1..]);
    if guid.is_empty() || hex.len() != 2 * MAC_BYTES {
        return Err(SignError::AuthorizationMalformed);
    }
    let mut mac = [0_u8; MAC_BYTES];
    decode_hex_into(hex, &mut mac).ok_or(SignError::AuthorizationMalformed)?;
    Ok((guid, mac))
}

/// Streams the canonical form (§3.3) of `raw_query` (the part after `?`) to `out`.
///
/// Pieces split on `&` and at the first `=`; empty keys are dropped; keys are ASCII
/// lower-cased, values kept verbatim; entries sort by lower-cased key followed by the raw
/// value, and entries with identical sort keys collapse (last wins, so `a=bc` and `ab=c`
/// collide); each is `key=value`, or `key` when the value is empty; joined with `&`.
/// Nothing is emitted when the query is over [`MAX_QUERY_PIECES`].
pub fn canonical_query(raw_query: &[u8], out: &mut impl FnMut(&[u8])) -> Result<(), SignError> {
    if raw_query.len() > usize::from(u16::MAX) {
        return Err(SignError::QueryTooComplex);
    }
    let mut pieces = [QueryPiece::default(); MAX_QUERY_PIECES];
    let mut count = 0;
    let mut start = 0_usize;
    for (order, piece) in raw_query.split(|&b| b == b'&').enumerate() {
        let at = start;
        start += piece.len() + 1;
        let key_len = piece.iter().position(|&b| b == b'=').unwrap_or(piece.len());
        if key_len == 0 {
            continue;
        }
        let value_at = (at + key_len + 1).min(at + piece.len());
        let slot = pieces.get_mut(count).ok_or(SignError::QueryTooComplex)?;
        // Every offset fits in u16: the query is at most u16::MAX bytes (checked above).
        let short = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
        *slot = QueryPiece {
            key: (short(at), short(key_len)),
            value: (short(value_at), short(at + piece.len() - value_at)),
            order: short(order),
        };
        count += 1;
    }
    let pieces = &mut pieces[..count];
    pieces.sort_unstable_by(|a, b| a.sort_key_cmp(b, raw_query).then(a.order.cmp(&b.order)));
    let mut first = true;
    for (i, piece) in pieces.iter().enumerate() {
        let superseded = pieces.get(i + 1).is_some_and(|next| next.sort_key_cmp(piece, raw_query) == Ordering::Equal);
        if superseded {
            continue;
        }
        if !first {
            out(b"&");
        }
        first = false;
        emit_lowercase(piece.key(raw_query), out);
        let value = piece.value(raw_query);
        if !value.is_empty() {
            out(b"=");
            out(value);
        }
    }
    Ok(())
}

/// One query piece: offsets and lengths into the raw query.
#[derive(Clone, Copy, Default)]
struct QueryPiece {
    key: (u16, u16),
    value: (u16, u16),
    /// Position in the query, so that the last of equal sort keys wins.
    order: u16,
}

impl QueryPiece {
    fn key<'q>(&self, query: &'q [u8]) -> &'q [u8] {
        &query[usize::from(self.key.0)..usize::from(self.key.0) + usize::from(self.key.1)]
    }

    fn value<'q>(&self, query: &'q [u8]) -> &'q [u8] {
        &query[usize::from(self.value.0)..usize::from(self.value.0) + usize::from(self.value.1)]
    }

    /// Compares the sort keys (lower-cased key immediately followed by the raw value).
    fn sort_key_cmp(&self, other: &Self, query: &[u8]) -> Ordering {
        let sort_key = |p: &Self| p.key(query).iter().map(u8::to_ascii_lowercase).chain(p.value(query).iter().copied());
        sort_key(self).cmp(sort_key(other))
    }
}

/// Keys the MAC and feeds it the string-to-sign; validation happens before any hashing.
fn mac_request(
    key: &SigningKey,
    method: &[u8],
    body: &[u8],
    headers: &[(&[u8], &[u8])],
    target: &[u8],
) -> Result<HmacSha256, SignError> {
    if headers.len() > UPSTREAM_HEADERS_MAX {
        return Err(SignError::TooManyHeaders);
    }
    let mut signed = [0_usize; UPSTREAM_HEADERS_MAX];
    let mut count = 0;
    for (index, &(name, value)) in headers.iter().enumerate() {
        let name_ok = !name.is_empty() && name.iter().all(|&b| b.is_ascii_graphic() && b != b':');
        if !name_ok {
            return Err(SignError::HeaderNameInvalid);
        }
        if name.eq_ignore_ascii_case(AUTHORIZATION_HEADER.as_bytes()) {
            continue;
        }
        if !value.iter().all(|&b| b == b'\t' || b == b' ' || b.is_ascii_graphic()) {
            return Err(SignError::HeaderValueNotAscii);
        }
        signed[count] = index;
        count += 1;
    }
    let signed = &mut signed[..count];
    let name_cmp = |a: usize, b: usize| {
        let lower = |i: usize| headers[i].0.iter().map(u8::to_ascii_lowercase);
        lower(a).cmp(lower(b))
    };
    signed.sort_unstable_by(|&a, &b| name_cmp(a, b).then(a.cmp(&b)));

    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(q) => (&target[..q], Some(&target[q + 1..])),
        None => (target, None),
    };

    let mut mac = key.mac.clone();
    mac.update(method);
    mac.update(b"\n");
    mac.update(body);
    mac.update(b"\n");
    for (i, &index) in signed.iter().enumerate() {
        // A repeated name is signed once, with its last value.
        if signed.get(i + 1).is_some_and(|&next| name_cmp(next, index) == Ordering::Equal) {
            continue;
        }
        let (name, value) = headers[index];
        emit_lowercase(name, &mut |bytes| mac.update(bytes));
        mac.update(b":");
        mac.update(value.trim_ascii());
        mac.update(b"\n");
    }
    mac.update(path);
    mac.update(b"\n");
    if let Some(query) = query {
        canonical_query(query, &mut |bytes| mac.update(bytes))?;
    }
    Ok(mac)
}

/// Emits `bytes` ASCII-lower-cased, in chunks through a small stack buffer.
fn emit_lowercase(bytes: &[u8], out: &mut impl FnMut(&[u8])) {
    let mut buf = [0_u8; 64];
    for chunk in bytes.chunks(buf.len()) {
        let lowered = &mut buf[..chunk.len()];
        lowered.copy_from_slice(chunk);
        lowered.make_ascii_lowercase();
        out(lowered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repository's key (§3.4).
    const KEY_HEX: &str = "4A404E635266556A586E3272357538782F413F4428472B4B6250645367566B59";
    const GUID: &str = "9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf";
    const DATE: &[u8] = b"Wed, 23 Apr 2025 12:00:00 GMT";

    fn key() -> SigningKey {
        SigningKey::from_hex(GUID, KEY_HEX).expect("the spec's key is valid")
    }

    fn hex(mac: &[u8; MAC_BYTES]) -> std::string::String {
        mac.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn canonical(query: &[u8]) -> Result<std::string::String, SignError> {
        let mut out = Vec::new();
        canonical_query(query, &mut |bytes| out.extend_from_slice(bytes))?;
        Ok(std::string::String::from_utf8(out).expect("canonical query of ASCII is ASCII"))
    }

    #[test]
    fn hmac_primitive_matches_hello_world_vector() {
        // The key as literal bytes, so the vector does not depend on our hex decoder.
        let raw = [
            0x4A, 0x40, 0x4E, 0x63, 0x52, 0x66, 0x55, 0x6A, 0x58, 0x6E, 0x32, 0x72, 0x35, 0x75, 0x38, 0x78, 0x2F, 0x41,
            0x3F, 0x44, 0x28, 0x47, 0x2B, 0x4B, 0x62, 0x50, 0x64, 0x53, 0x67, 0x56, 0x6B, 0x59,
        ];
        let mut mac = HmacSha256::new_from_slice(&raw).expect("any length is a valid hmac key");
        mac.update(b"Hello world");
        let tag: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(hex(&tag), "a15b46f621193876a6d3121b836dc2af4180e2786642e55235ef916fc5b082a3");
        // And the decoded key behaves identically.
        let mut keyed = key().mac;
        keyed.update(b"Hello world");
        let tag2: [u8; 32] = keyed.finalize().into_bytes().into();
        assert_eq!(tag, tag2);
    }

    #[test]
    fn canonical_query_matches_repository_vector() {
        let target: &[u8] = b"/machine/a8016240-7286-49ef-8981-63520cb8f6d0/49c242ba%2Dc18a%2D4f6c%2D8cf8%2D85ff790b6431.%5Fzpeng%2Debpf%2Dvm2?comp=config&keyOnly&comp=again&type=hostingEnvironmentConfig&incarnation=1&resource=https%3a%2f%2fstorage.azure.com%2f";
        let q = target.iter().position(|&b| b == b'?').expect("vector has a query");
        assert_eq!(
            &target[..q],
            b"/machine/a8016240-7286-49ef-8981-63520cb8f6d0/49c242ba%2Dc18a%2D4f6c%2D8cf8%2D85ff790b6431.%5Fzpeng%2Debpf%2Dvm2"
        );
        assert_eq!(
            canonical(&target[q + 1..]).as_deref(),
            Ok(
                "comp=again&comp=config&incarnation=1&keyonly&resource=https%3a%2f%2fstorage.azure.com%2f&type=hostingEnvironmentConfig"
            )
        );
    }

    #[test]
    fn canonical_query_key_and_empty_value_are_the_same_entry() {
        assert_eq!(canonical(b"k&k=").as_deref(), Ok("k"));
        assert_eq!(canonical(b"k=").as_deref(), Ok("k"));
    }

    #[test]
    fn canonical_query_colliding_sort_keys_keep_the_last() {
        assert_eq!(canonical(b"a=bc&ab=c").as_deref(), Ok("ab=c"));
        assert_eq!(canonical(b"ab=c&a=bc").as_deref(), Ok("a=bc"));
        assert_eq!(canonical(b"X=1&x=1").as_deref(), Ok("x=1"));
    }

    #[test]
    fn canonical_query_drops_empty_keys_and_lowercases_escapes_in_keys_only() {
        assert_eq!(canonical(b"&=v&&B%2F=%2F&a").as_deref(), Ok("a&b%2f=%2F"));
        assert_eq!(canonical(b"").as_deref(), Ok(""));
        assert_eq!(canonical(b"a=b=c").as_deref(), Ok("a=b=c"));
    }

    #[test]
    fn canonical_query_rejects_too_many_pieces_without_emitting() {
        let query = |pieces: usize| {
            let keys: Vec<_> = (0..pieces).map(|i| format!("k{i}=v")).collect();
            keys.join("&")
        };
        let mut emitted = 0;
        let result = canonical_query(query(MAX_QUERY_PIECES + 1).as_bytes(), &mut |bytes| {
            emitted += bytes.len();
        });
        assert_eq!(result, Err(SignError::QueryTooComplex));
        assert_eq!(emitted, 0);
        // Exactly the limit, plus empty-key pieces that are dropped, is fine.
        let at_limit = query(MAX_QUERY_PIECES) + "&&=x&";
        assert!(canonical(at_limit.as_bytes()).is_ok());
    }

    #[test]
    fn signs_agent_goal_state_vector() {
        let headers: [(&[u8], &[u8]); 5] = [
            (b"x-ms-version", b"2012-11-30"),
            (b"x-ms-azure-host-date", DATE),
            (b"host", b"168.63.129.16"),
            (b"x-ms-azure-host-claims", CLAIMS_ROOT.as_bytes()),
            (b"content-length", b"0"),
        ];
        let mac = sign(&key(), b"GET", b"", &headers, b"/machine?comp=goalstate");
        let mac = mac.expect("signable");
        assert_eq!(hex(&mac), "35d027d96fb783dcbd427dfbd3a0b81fb463cdd5cd43542e5f5dcb5db9786537");
    }

    #[test]
    fn signs_attestation_vector_with_trimmed_metadata_value() {
        let target = format!("/secure-channel/key/{GUID}/key-attestation");
        let headers: [(&[u8], &[u8]); 5] = [
            (b"Metadata", b"True "),
            (b"x-ms-azure-host-date", DATE),
            (b"host", b"168.63.129.16"),
            (b"x-ms-azure-host-claims", CLAIMS_ROOT.as_bytes()),
            (b"content-length", b"0"),
        ];
        let mac = sign(&key(), b"POST", b"", &headers, target.as_bytes()).expect("signable");
        assert_eq!(hex(&mac), "71a091e6c9e21a0e3972a3b5a481c4d7a578f4d4f28c810636f7e43387bfb8e0");
        assert_eq!(
            authorization_value(&key(), &mac),
            "Azure-HMAC-SHA256 9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf 71a091e6c9e21a0e3972a3b5a481c4d7a578f4d4f28c810636f7e43387bfb8e0"
        );
    }

    #[test]
    fn signs_proxied_non_root_imds_vector_ignoring_client_authorization() {
        let headers: [(&[u8], &[u8]); 7] = [
            (b"Host", b"169.254.169.254"),
            (b"User-Agent", b"curl/8.5.0"),
            (b"Accept", b"*/*"),
            (b"X-MS-Azure-Host-Authorization", b"forged"),
            (b"Metadata", b"true"),
            (b"x-ms-azure-host-claims", CLAIMS_NOT_ROOT.as_bytes()),
            (b"x-ms-azure-host-date", DATE),
        ];
        let target: &[u8] = b"/metadata/instance?api-version=2021-02-01";
        let mac = sign(&key(), b"GET", b"", &headers, target).expect("signable");
        assert_eq!(hex(&mac), "75afe2e9a612e6be0caaac7d967c639ab0b1141a193212de74ab4cce3657a6a6");
    }

    #[test]
    fn signs_post_with_raw_body_vector() {
        let headers: [(&[u8], &[u8]); 5] = [
            (b"content-type", b"application/json"),
            (b"content-length", b"7"),
            (b"host", b"168.63.129.16"),
            (b"x-ms-azure-host-claims", CLAIMS_ROOT.as_bytes()),
            (b"x-ms-azure-host-date", DATE),
        ];
        let body: &[u8] = b"{\"a\":1}";
        let mac = sign(&key(), b"POST", body, &headers, b"/machine?comp=health");
        let mac = mac.expect("signable");
        assert_eq!(hex(&mac), "ee5d7beb3802e34afb744e7f4c224bb24747c4052e76f802a4a623bd9c20917e");
        assert_eq!(verify(&key(), b"POST", body, &headers, b"/machine?comp=health", &mac), Ok(()));
        assert_eq!(
            verify(&key(), b"POST", b"{\"a\":2}", &headers, b"/machine?comp=health", &mac),
            Err(SignError::SignatureMismatch)
        );
    }

    #[test]
    fn wrong_key_gives_a_different_mac_and_fails_verification() {
        let other = SigningKey::from_hex(GUID, &"00".repeat(32)).expect("valid key");
        let headers: [(&[u8], &[u8]); 1] = [(b"host", b"168.63.129.16")];
        let mac = sign(&key(), b"GET", b"", &headers, b"/").expect("signable");
        let mac_other = sign(&other, b"GET", b"", &headers, b"/").expect("signable");
        assert_ne!(mac, mac_other);
        assert_eq!(verify(&other, b"GET", b"", &headers, b"/", &mac), Err(SignError::SignatureMismatch));
    }

    #[test]
    fn duplicate_header_signs_last_value_only() {
        let dup: [(&[u8], &[u8]); 3] = [(b"X-A", b"first"), (b"host", b"h"), (b"x-a", b" second ")];
        let single: [(&[u8], &[u8]); 2] = [(b"host", b"h"), (b"x-a", b"second")];
        assert_eq!(sign(&key(), b"GET", b"", &dup, b"/p"), sign(&key(), b"GET", b"", &single, b"/p"));
    }

    #[test]
    fn no_query_and_empty_query_sign_the_same() {
        let headers: [(&[u8], &[u8]); 0] = [];
        assert_eq!(sign(&key(), b"GET", b"", &headers, b"/p"), sign(&key(), b"GET", b"", &headers, b"/p?"));
    }

    #[test]
    fn rejects_non_ascii_and_control_header_values() {
        for value in [&b"caf\xc3\xa9"[..], b"a\rb", b"\x7f", b"\x00"] {
            let headers: [(&[u8], &[u8]); 1] = [(b"x-a", value)];
            assert_eq!(sign(&key(), b"GET", b"", &headers, b"/"), Err(SignError::HeaderValueNotAscii));
        }
        let tab: [(&[u8], &[u8]); 1] = [(b"x-a", b"a\tb")];
        assert!(sign(&key(), b"GET", b"", &tab, b"/").is_ok());
    }

    #[test]
    fn rejects_invalid_header_names_and_too_many_headers() {
        let colon: [(&[u8], &[u8]); 1] = [(b"x:a", b"v")];
        assert_eq!(sign(&key(), b"GET", b"", &colon, b"/"), Err(SignError::HeaderNameInvalid));
        let empty: [(&[u8], &[u8]); 1] = [(b"", b"v")];
        assert_eq!(sign(&key(), b"GET", b"", &empty, b"/"), Err(SignError::HeaderNameInvalid));
        let many: Vec<(&[u8], &[u8])> = vec![(b"x", b"v"); UPSTREAM_HEADERS_MAX + 1];
        assert_eq!(sign(&key(), b"GET", b"", &many, b"/"), Err(SignError::TooManyHeaders));
        assert!(sign(&key(), b"GET", b"", &many[..UPSTREAM_HEADERS_MAX], b"/").is_ok());
    }

    #[test]
    fn key_from_hex_accepts_either_case_and_rejects_bad_input() {
        let lower = SigningKey::from_hex(GUID, &KEY_HEX.to_ascii_lowercase()).expect("valid");
        let headers: [(&[u8], &[u8]); 0] = [];
        assert_eq!(sign(&lower, b"GET", b"", &headers, b"/"), sign(&key(), b"GET", b"", &headers, b"/"));
        let bad_digit = KEY_HEX.replace('4', "g");
        assert_eq!(SigningKey::from_hex(GUID, &bad_digit).map(|_| ()), Err(SignError::DecodeKeyHex));
        assert_eq!(SigningKey::from_hex(GUID, "abc").map(|_| ()), Err(SignError::DecodeKeyHex));
        assert_eq!(SigningKey::from_hex(GUID, "").map(|_| ()), Err(SignError::KeyLength));
        assert_eq!(SigningKey::from_hex(GUID, &"ab".repeat(15)).map(|_| ()), Err(SignError::KeyLength));
        assert_eq!(SigningKey::from_hex(GUID, &"ab".repeat(65)).map(|_| ()), Err(SignError::KeyLength));
        assert!(SigningKey::from_hex(GUID, &"ab".repeat(64)).is_ok());
        for guid in ["", "../etc/passwd", "a b", &"a".repeat(65)] {
            assert_eq!(SigningKey::from_hex(guid, KEY_HEX).map(|_| ()), Err(SignError::KeyGuid));
        }
    }

    #[test]
    fn debug_never_prints_key_material() {
        let printed = format!("{:?}", key());
        assert!(printed.contains(GUID));
        assert!(printed.contains("<redacted>"));
        assert!(!printed.to_ascii_lowercase().contains("4a404e"));
        assert!(!printed.contains("74, 64"));
    }

    #[test]
    fn parses_authorization_value_round_trip_and_rejects_malformed() {
        let mac = [0xAB_u8; MAC_BYTES];
        let value = authorization_value(&key(), &mac);
        assert_eq!(parse_authorization_value(value.as_bytes()), Ok((GUID.as_bytes(), mac)));
        let upper = value.to_ascii_uppercase().replace("AZURE-HMAC-SHA256", AUTHORIZATION_SCHEME);
        assert_eq!(parse_authorization_value(upper.as_bytes()).map(|(_, m)| m), Ok(mac));
        for bad in [&b""[..], b"Azure-HMAC-SHA256 guid", b"Basic g ab", b"Azure-HMAC-SHA256  ab"] {
            assert_eq!(parse_authorization_value(bad), Err(SignError::AuthorizationMalformed));
        }
    }

    #[test]
    fn claims_values_have_exact_wire_spacing() {
        assert_eq!(CLAIMS_ROOT.as_bytes(), b"{ \"isRoot\": \"true\"}");
        assert_eq!(CLAIMS_NOT_ROOT.as_bytes(), b"{ \"isRoot\": \"false\"}");
    }
}
