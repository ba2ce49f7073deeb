// SPDX-License-Identifier: MIT
//! The key document: the `POST /secure-channel/key` response and the on-disk `<guid>.key`.
//!
//! Heads up! Read `../shared/spec/msp-protocol.md` §1.6 (fields), §1.2 B (the acquire body)
//! and §2.1–§2.3 (how the file is written, re-read and compared) first. `issued` is free text
//! and is never parsed. The key is a secret (§11 item 6): `Debug` never prints it, and nothing
//! here logs.

use core::fmt;

use heapless::String;
use serde::{Deserialize, Serialize};

use super::signing::{SignError, SigningKey};

/// The exact body of the acquire call (§1.2 B): 44 bytes, one space after the colon.
pub const ACQUIRE_BODY: &[u8] = b"{\"authorizationScheme\": \"Azure-HMAC-SHA256\"}";
/// Largest key document accepted. A real one is about 200 bytes; checked before any JSON
/// work, and it also sizes the stack buffer that unescapes strings.
pub const KEY_DOC_MAX_BYTES: usize = 4096;

/// Capacity of `authorizationScheme`.
pub const SCHEME_MAX_BYTES: usize = 32;
/// Capacity of `guid`.
pub const GUID_MAX_BYTES: usize = 64;
/// Capacity of `issued`.
pub const ISSUED_MAX_BYTES: usize = 64;
/// Capacity of `key`: 128 hex digits, a 512-bit key.
pub const KEY_HEX_MAX_BYTES: usize = 128;

/// Why a key document could not be read, written or turned into a signing key.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyDocError {
    /// The document is larger than [`KEY_DOC_MAX_BYTES`].
    TooLarge,
    /// The JSON is malformed, a required field is missing, or a field is over capacity.
    ParseJson,
    /// The output buffer is too small for the serialised document.
    SerializeJson,
    /// The `guid`/`key` pair is not a usable signing key.
    SigningKey(SignError),
}

impl fmt::Display for KeyDocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge => f.write_str("key document is too large"),
            Self::ParseJson => f.write_str("key document is not valid key json"),
            Self::SerializeJson => f.write_str("key document does not fit the output buffer"),
            Self::SigningKey(error) => write!(f, "key document has an unusable key: {error}"),
        }
    }
}

/// A key document (§1.6). Unknown fields are ignored when parsing; `incarnationId` is omitted
/// when serialising if absent.
#[derive(Clone, Deserialize, Serialize)]
pub struct KeyDoc {
    /// `Azure-HMAC-SHA256`; not validated (the host decides).
    #[serde(rename = "authorizationScheme")]
    pub authorization_scheme: String<SCHEME_MAX_BYTES>,
    /// Surfaced as `keyIncarnationId` in the status.
    #[serde(rename = "incarnationId", default, skip_serializing_if = "Option::is_none")]
    pub incarnation_id: Option<u32>,
    /// Key identifier; names the file and goes into the authorization header.
    pub guid: String<GUID_MAX_BYTES>,
    /// Free text; never parsed.
    pub issued: String<ISSUED_MAX_BYTES>,
    /// Hex-encoded secret, upper or lower case. Private so it cannot be printed by accident.
    key: String<KEY_HEX_MAX_BYTES>,
}

impl KeyDoc {
    /// Parses a key document from the acquire response or the key file.
    pub fn parse(json: &[u8]) -> Result<Self, KeyDocError> {
        if json.len() > KEY_DOC_MAX_BYTES {
            return Err(KeyDocError::TooLarge);
        }
        // An unescaped string is never longer than the document it came from.
        let mut unescaped = [0_u8; KEY_DOC_MAX_BYTES];
        serde_json_core::from_slice_escaped(json, &mut unescaped)
            .map(|(doc, _consumed)| doc)
            .map_err(|_json| KeyDocError::ParseJson)
    }

    /// Serialises the document as compact JSON into `out` (the on-disk `<guid>.key` format);
    /// returns the number of bytes written.
    pub fn to_json(&self, out: &mut [u8]) -> Result<usize, KeyDocError> {
        serde_json_core::to_slice(self, out).map_err(|_full| KeyDocError::SerializeJson)
    }

    /// The signing key this document describes.
    pub fn signing_key(&self) -> Result<SigningKey, KeyDocError> {
        SigningKey::from_hex(&self.guid, &self.key).map_err(KeyDocError::SigningKey)
    }

    /// True if both documents name the same key: equal `guid` and equal `key` (§2.3 step 4,
    /// the check after re-reading the saved file). Hex case is significant, as in a byte
    /// comparison of what was written.
    pub fn same_key(&self, other: &Self) -> bool {
        self.guid == other.guid && self.key == other.key
    }
}

impl fmt::Debug for KeyDoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyDoc")
            .field("authorization_scheme", &self.authorization_scheme.as_str())
            .field("incarnation_id", &self.incarnation_id)
            .field("guid", &self.guid.as_str())
            .field("issued", &self.issued.as_str())
            .field("key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_HEX: &str = "4A404E635266556A586E3272357538782F413F4428472B4B6250645367566B59";
    const RESPONSE: &[u8] = b"{\"authorizationScheme\":\"Azure-HMAC-SHA256\",\"guid\":\"9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf\",\"issued\":\"2021-05-05T 12:00:00Z\",\"key\":\"4A404E635266556A586E3272357538782F413F4428472B4B6250645367566B59\",\"incarnationId\":3,\"extra\":{\"nested\":[1,\"x\"]}}";

    #[test]
    fn acquire_body_is_the_exact_44_bytes() {
        assert_eq!(ACQUIRE_BODY.len(), 44);
        assert_eq!(ACQUIRE_BODY, b"{\"authorizationScheme\": \"Azure-HMAC-SHA256\"}");
    }

    #[test]
    fn parses_response_ignoring_unknown_fields() {
        let doc = KeyDoc::parse(RESPONSE).expect("valid key document");
        assert_eq!(doc.authorization_scheme, "Azure-HMAC-SHA256");
        assert_eq!(doc.guid, "9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf");
        assert_eq!(doc.issued, "2021-05-05T 12:00:00Z");
        assert_eq!(doc.incarnation_id, Some(3));
        assert_eq!(doc.key, KEY_HEX);
        let key = doc.signing_key().expect("upper-case hex is accepted");
        assert_eq!(key.guid(), "9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf");
    }

    #[test]
    fn round_trips_through_json_and_omits_absent_incarnation() {
        let doc = KeyDoc::parse(RESPONSE).expect("valid key document");
        let mut buf = [0_u8; 512];
        let len = doc.to_json(&mut buf).expect("fits");
        let again = KeyDoc::parse(&buf[..len]).expect("own output parses");
        assert!(again.same_key(&doc));
        assert_eq!(again.incarnation_id, Some(3));
        assert_eq!(again.issued, doc.issued);

        let without: &[u8] =
            b"{\"authorizationScheme\":\"Azure-HMAC-SHA256\",\"guid\":\"g\",\"issued\":\"i\",\"key\":\"00\"}";
        let doc = KeyDoc::parse(without).expect("incarnationId is optional");
        let len = doc.to_json(&mut buf).expect("fits");
        assert_eq!(&buf[..len], without);
    }

    #[test]
    fn parses_escaped_strings_and_escapes_them_back() {
        let json: &[u8] = b"{\"authorizationScheme\":\"Azure-HMAC-SHA256\",\"guid\":\"g\",\"issued\":\"a \\\"quoted\\\" \\u0041\",\"key\":\"00\",\"note\":\"\\n\\u00e9\"}";
        let doc = KeyDoc::parse(json).expect("escapes are unescaped");
        assert_eq!(doc.issued, "a \"quoted\" A");
        let mut buf = [0_u8; 256];
        let len = doc.to_json(&mut buf).expect("fits");
        let again = KeyDoc::parse(&buf[..len]).expect("own output parses");
        assert_eq!(again.issued, doc.issued);
    }

    #[test]
    fn rejects_missing_required_fields() {
        for json in [
            &b"{\"guid\":\"g\",\"issued\":\"i\",\"key\":\"00\"}"[..],
            b"{\"authorizationScheme\":\"s\",\"issued\":\"i\",\"key\":\"00\"}",
            b"{\"authorizationScheme\":\"s\",\"guid\":\"g\",\"key\":\"00\"}",
            b"{\"authorizationScheme\":\"s\",\"guid\":\"g\",\"issued\":\"i\"}",
            b"{}",
            b"",
            b"[]",
        ] {
            assert_eq!(KeyDoc::parse(json).map(|_| ()), Err(KeyDocError::ParseJson));
        }
    }

    #[test]
    fn rejects_oversized_documents_and_fields() {
        let big = [b' '; KEY_DOC_MAX_BYTES + 1];
        assert_eq!(KeyDoc::parse(&big).map(|_| ()), Err(KeyDocError::TooLarge));
        let long_key = format!(
            "{{\"authorizationScheme\":\"s\",\"guid\":\"g\",\"issued\":\"i\",\"key\":\"{}\"}}",
            "0".repeat(KEY_HEX_MAX_BYTES + 2)
        );
        assert_eq!(KeyDoc::parse(long_key.as_bytes()).map(|_| ()), Err(KeyDocError::ParseJson));
    }

    #[test]
    fn reports_unusable_key_and_small_buffer() {
        let json =
            format!("{{\"authorizationScheme\":\"s\",\"guid\":\"g\",\"issued\":\"i\",\"key\":\"{}\"}}", "z".repeat(64));
        let doc = KeyDoc::parse(json.as_bytes()).expect("hex is checked later");
        assert_eq!(doc.signing_key().map(|_| ()), Err(KeyDocError::SigningKey(SignError::DecodeKeyHex)));
        assert_eq!(doc.to_json(&mut [0_u8; 8]), Err(KeyDocError::SerializeJson));
    }

    #[test]
    fn same_key_compares_guid_and_key() {
        let a = KeyDoc::parse(RESPONSE).expect("valid");
        let mut b = a.clone();
        assert!(a.same_key(&b));
        b.guid = String::try_from("other").expect("fits");
        assert!(!a.same_key(&b));
        let mut c = a.clone();
        c.key = String::try_from("00").expect("fits");
        assert!(!a.same_key(&c));
    }

    #[test]
    fn debug_never_prints_the_key() {
        let printed = format!("{:?}", KeyDoc::parse(RESPONSE).expect("valid"));
        assert!(printed.contains("9cf81e97"));
        assert!(printed.contains("<redacted>"));
        assert!(!printed.contains(KEY_HEX));
        assert!(!printed.contains("4A404E"));
    }
}
