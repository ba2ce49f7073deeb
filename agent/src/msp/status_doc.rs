// SPDX-License-Identifier: MIT
//! The secure-channel status document (`GET /secure-channel/status`): parsing, validation, and
//! the derived state string and per-endpoint modes.
//!
//! Heads up! Read `../shared/spec/msp-protocol.md` §1.3 (fields and validation), §1.4
//! (derivation, with its quirks: the two-space state string, HostGAPlugin mirroring
//! WireServer, raw unknown mode words counting as "not disabled"), §1.5 and §9 items 1–5 first.
//! Validation and derivation reproduce the reference exactly, with one deliberate exception
//! noted on [`StatusDocument::summary`].
//!
//! This runs once per poll, on the setup path. A parsed rule item is about 160 KiB and serde
//! builds it on the stack, so each item is boxed as soon as it is parsed ([`StatusRules`]) and
//! never held by value in the frames above it; the peak stack is that of one item.

use core::fmt;

use heapless::{String, Vec};
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::policy::rules::AuthorizationItem;
use crate::policy::rules::limits::{ID_MAX_BYTES, WORD_MAX_BYTES};

/// Largest status document accepted, checked before any JSON work. A document with full rule
/// sets for all three endpoints is tens of KiB; this leaves room without letting the host
/// make the agent parse megabytes.
pub const STATUS_DOC_MAX_BYTES: usize = 256 * 1024;
/// Capacity of the derived state string; the longest 2.0 string is 54 bytes and a 1.0 state
/// is at most [`STATE_MAX_BYTES`].
pub const STATE_STRING_MAX_BYTES: usize = 96;
/// Capacity of `secureChannelState`.
pub const STATE_MAX_BYTES: usize = 64;
/// Capacity of `authorizationScheme`.
pub const SCHEME_MAX_BYTES: usize = 64;
/// Capacity of `keyDeliveryMethod`.
pub const DELIVERY_METHOD_MAX_BYTES: usize = 32;
/// Capacity of `version`.
pub const VERSION_MAX_BYTES: usize = 16;
/// Capacity of `keyGuid`.
pub const KEY_GUID_MAX_BYTES: usize = 64;
/// Entries in `requiredClaimsHeaderPairs` (the host sends `["isRoot"]`).
pub const MAX_CLAIM_PAIRS: usize = 16;
/// Length of one `requiredClaimsHeaderPairs` entry.
pub const CLAIM_PAIR_MAX_BYTES: usize = 64;

/// The state string meaning "MSP off"; only this exact string counts (§1.4).
pub const STATE_DISABLED: &str = "disabled";

/// A rule-set id (`authorizationRules.<endpoint>.id`), empty when absent.
pub type RuleId = String<ID_MAX_BYTES>;

/// Why a status document was refused. Any of these fails the poll iteration with
/// `Failed to get key status - …` (§2.2 step 4).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StatusError {
    /// The body is larger than [`STATUS_DOC_MAX_BYTES`].
    TooLarge,
    /// The JSON is malformed, a required field is missing, or a field is over capacity.
    ParseJson,
    /// Neither `secureChannelEnabled` nor `secureChannelState` is present.
    SwitchesMissing,
    /// `secureChannelState` is not `disabled`, `wireserver` or `wireserverandimds` (any case).
    UnknownSecureChannelState,
    /// `version` is `1.0` but `secureChannelState` is absent.
    StateMissingForV1,
    /// `version` is `2.0` but `secureChannelEnabled` is absent.
    EnabledMissingForV2,
}

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TooLarge => "status document is too large",
            Self::ParseJson => "status document is not valid status json",
            Self::SwitchesMissing => "status document has neither secureChannelEnabled nor secureChannelState",
            Self::UnknownSecureChannelState => "status document has an unknown secureChannelState",
            Self::StateMissingForV1 => "status document version 1.0 has no secureChannelState",
            Self::EnabledMissingForV2 => "status document version 2.0 has no secureChannelEnabled",
        })
    }
}

/// The status document as sent (§1.3). Unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub struct StatusDocument {
    /// Expected `Azure-HMAC-SHA256`; a different value is only diagnostic (§1.3 quirk).
    #[serde(rename = "authorizationScheme")]
    pub authorization_scheme: String<SCHEME_MAX_BYTES>,
    /// `http` or `vtpm`; an unknown value is only diagnostic.
    #[serde(rename = "keyDeliveryMethod")]
    pub key_delivery_method: String<DELIVERY_METHOD_MAX_BYTES>,
    /// Informational.
    #[serde(rename = "keyIncarnationId", default)]
    pub key_incarnation_id: Option<u32>,
    /// GUID of the key the host considers latched; `None` (null or absent) = none yet.
    #[serde(rename = "keyGuid", default)]
    pub key_guid: Option<String<KEY_GUID_MAX_BYTES>>,
    /// Parsed, never used.
    #[serde(rename = "requiredClaimsHeaderPairs", default)]
    pub required_claims_header_pairs: Option<Vec<String<CLAIM_PAIR_MAX_BYTES>, MAX_CLAIM_PAIRS>>,
    /// Schema 1.0 switch: `Disabled`, `Wireserver` or `WireserverAndImds`, any case.
    #[serde(rename = "secureChannelState", default)]
    pub secure_channel_state: Option<String<STATE_MAX_BYTES>>,
    /// Schema 2.0 master switch.
    #[serde(rename = "secureChannelEnabled", default)]
    pub secure_channel_enabled: Option<bool>,
    /// `1.0` or `2.0`.
    pub version: String<VERSION_MAX_BYTES>,
    /// Schema 2.0 rules per endpoint (§4.1).
    #[serde(rename = "authorizationRules", default)]
    pub authorization_rules: Option<StatusRules>,
    /// Endpoints (imds, wireserver, hostga) whose rule set could not be taken (over a
    /// capacity of the rules model, or malformed): the rest of the document applies, and that
    /// endpoint's item keeps its mode and id but allows nothing (`defaultAccess` deny, no
    /// privileges): closed for that endpoint only.
    #[serde(skip)]
    pub refused_rules: [bool; 3],
}

/// Why a refused rule set was refused, for the log and the status.
pub const RULES_REFUSED_REASON: &str =
    "rule set over the agent's capacities or malformed (docs/DESIGN.md, rule capacities): this endpoint allows nothing";

/// The same document, with each rule item reduced to what applies even when its rules
/// cannot be taken: the mode, the default access and the id.
#[derive(Debug, Deserialize)]
struct HeadersOnly {
    #[serde(rename = "authorizationScheme")]
    authorization_scheme: String<SCHEME_MAX_BYTES>,
    #[serde(rename = "keyDeliveryMethod")]
    key_delivery_method: String<DELIVERY_METHOD_MAX_BYTES>,
    #[serde(rename = "keyIncarnationId", default)]
    key_incarnation_id: Option<u32>,
    #[serde(rename = "keyGuid", default)]
    key_guid: Option<String<KEY_GUID_MAX_BYTES>>,
    #[serde(rename = "requiredClaimsHeaderPairs", default)]
    required_claims_header_pairs: Option<Vec<String<CLAIM_PAIR_MAX_BYTES>, MAX_CLAIM_PAIRS>>,
    #[serde(rename = "secureChannelState", default)]
    secure_channel_state: Option<String<STATE_MAX_BYTES>>,
    #[serde(rename = "secureChannelEnabled", default)]
    secure_channel_enabled: Option<bool>,
    version: String<VERSION_MAX_BYTES>,
    #[serde(rename = "authorizationRules", default)]
    authorization_rules: Option<HeaderRules>,
}

#[derive(Debug, Deserialize)]
struct HeaderRules {
    #[serde(default)]
    imds: Option<ItemHeader>,
    #[serde(default)]
    wireserver: Option<ItemHeader>,
    #[serde(default)]
    hostga: Option<ItemHeader>,
}

/// What applies of an item whose rules cannot be taken: the mode and the id (`rules` and
/// `defaultAccess` are skipped unread: the closed item denies).
#[derive(Debug, Deserialize)]
struct ItemHeader {
    mode: String<WORD_MAX_BYTES>,
    id: String<ID_MAX_BYTES>,
}

/// One endpoint's full item, every other part of the document skipped unread.
#[derive(Deserialize)]
struct OneEndpoint {
    #[serde(rename = "authorizationRules", default)]
    authorization_rules: Option<OneItem>,
}

thread_local! {
    /// The endpoint [`OneItem`] picks, set on this thread for the one parse it serves
    /// (serde-json-core takes no seed; one item parser serves all three endpoints).
    static PICK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// `authorizationRules` with only the picked endpoint's item read.
#[derive(Default)]
struct OneItem(Option<Box<AuthorizationItem>>);

impl<'de> Deserialize<'de> for OneItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of authorization items per endpoint")
            }
            #[expect(clippy::large_stack_frames, reason = "serde builds the ~300 KiB item here, once per poll")]
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<OneItem, A::Error> {
                let want = RulesField::from_index(PICK.with(std::cell::Cell::get));
                let mut item = OneItem(None);
                while let Some(key) = access.next_key::<RulesField>()? {
                    if key == want {
                        item.0 = access.next_value::<Option<AuthorizationItem>>()?.map(Box::new);
                    } else {
                        access.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(item)
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// Parses one endpoint's full item (0 imds, 1 wireserver, 2 hostga) out of `body`; `Err` when
/// that item cannot be taken.
#[inline(never)]
fn endpoint_item(body: &[u8], unescaped: &mut [u8], endpoint: usize) -> Result<Option<Box<AuthorizationItem>>, ()> {
    PICK.with(|pick| pick.set(endpoint));
    let (doc, _consumed) = serde_json_core::from_slice_escaped::<OneEndpoint>(body, unescaped).map_err(|_json| ())?;
    Ok(doc.authorization_rules.and_then(|r| r.0))
}

/// The item a refused rule set leaves: its mode and id, no privileges, deny by default.
fn closed_item(header: &ItemHeader) -> Box<AuthorizationItem> {
    // Built in its box: an item is ~300 KiB even without rules.
    let mut item = Box::<AuthorizationItem>::default();
    item.default_access = String::try_from("deny").unwrap_or_default();
    item.mode.clone_from(&header.mode);
    item.id.clone_from(&header.id);
    item
}

/// `authorizationRules`: the schema of [`crate::policy::rules::AuthorizationRules`], with each
/// item boxed as soon as serde has built it. Unknown endpoints are ignored; a repeated
/// endpoint is refused (a document that says two things is never half-believed).
#[derive(Clone, Debug, Default)]
pub struct StatusRules {
    /// Rules for IMDS.
    pub imds: Option<Box<AuthorizationItem>>,
    /// Rules for WireServer (and, per §1.4, HostGAPlugin).
    pub wireserver: Option<Box<AuthorizationItem>>,
    /// Parsed and ignored (§1.4: HostGAPlugin mirrors WireServer).
    pub hostga: Option<Box<AuthorizationItem>>,
}

impl<'de> Deserialize<'de> for StatusRules {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(StatusRulesVisitor)
    }
}

struct StatusRulesVisitor;

impl<'de> Visitor<'de> for StatusRulesVisitor {
    type Value = StatusRules;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of authorization items per endpoint")
    }

    #[expect(
        clippy::large_stack_frames,
        reason = "serde builds each ~300 KiB item here before it is boxed, once per poll"
    )]
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<StatusRules, A::Error> {
        let mut rules = StatusRules::default();
        let mut seen = [false; 3];
        while let Some(endpoint) = access.next_key::<RulesField>()? {
            let (slot, index, name) = match endpoint {
                RulesField::Imds => (&mut rules.imds, 0, "imds"),
                RulesField::Wireserver => (&mut rules.wireserver, 1, "wireserver"),
                RulesField::Hostga => (&mut rules.hostga, 2, "hostga"),
                RulesField::Other => {
                    access.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if seen[index] {
                return Err(de::Error::duplicate_field(name));
            }
            seen[index] = true;
            *slot = access.next_value::<Option<AuthorizationItem>>()?.map(Box::new);
        }
        Ok(rules)
    }
}

/// A key of `authorizationRules`, read from borrowed or unescaped text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RulesField {
    Imds,
    Wireserver,
    Hostga,
    Other,
}

impl RulesField {
    fn from_index(index: usize) -> Self {
        match index {
            0 => Self::Imds,
            1 => Self::Wireserver,
            _ => Self::Hostga,
        }
    }
}

impl<'de> Deserialize<'de> for RulesField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_identifier(RulesFieldVisitor)
    }
}

struct RulesFieldVisitor;

impl Visitor<'_> for RulesFieldVisitor {
    type Value = RulesField;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an endpoint name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<RulesField, E> {
        Ok(match name {
            "imds" => RulesField::Imds,
            "wireserver" => RulesField::Wireserver,
            "hostga" => RulesField::Hostga,
            _ => RulesField::Other,
        })
    }
}

/// An endpoint's mode (§1.4, §1.5).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// No redirect for this endpoint.
    Disabled,
    /// Redirected; denials are logged and forwarded.
    Audit,
    /// Redirected; denials are answered `403`.
    Enforce,
    /// A schema 2.0 mode word that is none of the above. The reference keeps the raw word, so
    /// it counts as "not disabled" (the endpoint is redirected).
    Unknown,
}

impl Mode {
    /// Parses a mode word case-insensitively; anything unrecognised is [`Mode::Unknown`].
    pub fn from_word(word: &str) -> Self {
        if word.eq_ignore_ascii_case("disabled") {
            Self::Disabled
        } else if word.eq_ignore_ascii_case("audit") {
            Self::Audit
        } else if word.eq_ignore_ascii_case("enforce") {
            Self::Enforce
        } else {
            Self::Unknown
        }
    }

    /// True only for [`Mode::Disabled`]; the endpoint is redirected otherwise.
    pub fn is_disabled(self) -> bool {
        self == Self::Disabled
    }

    /// Lower-case name, as in the reference's mode strings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Audit => "audit",
            Self::Enforce => "enforce",
            Self::Unknown => "unknown",
        }
    }

    /// The capitalised word used in the schema 2.0 state string: anything but audit or
    /// enforce shows as `Disabled`, even an unknown word (§1.4).
    fn state_word(self) -> &'static str {
        match self {
            Self::Audit => "Audit",
            Self::Enforce => "Enforce",
            Self::Disabled | Self::Unknown => "Disabled",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the agent derives from a status document (§1.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusSummary {
    /// The display/state string; `disabled` means MSP off.
    pub state: String<STATE_STRING_MAX_BYTES>,
    /// WireServer mode.
    pub ws_mode: Mode,
    /// IMDS mode.
    pub imds_mode: Mode,
    /// HostGAPlugin mode: always the WireServer mode.
    pub hgap_mode: Mode,
    /// `keyGuid` of the document.
    pub key_guid: Option<String<KEY_GUID_MAX_BYTES>>,
    /// `keyIncarnationId` of the document.
    pub key_incarnation_id: Option<u32>,
    /// `authorizationRules.wireserver.id`, or empty.
    pub ws_rule_id: RuleId,
    /// `authorizationRules.imds.id`, or empty.
    pub imds_rule_id: RuleId,
    /// Always the WireServer rule id (the `hostga` item is ignored).
    pub hgap_rule_id: RuleId,
}

impl StatusSummary {
    /// True only for the exact state string `disabled` (§1.4: a 2.0 document with every mode
    /// disabled is *not* MSP off, and the agent still latches a key).
    pub fn is_disabled(&self) -> bool {
        self.state == STATE_DISABLED
    }
}

/// Parses, validates and summarises a status response body.
pub fn parse_status(body: &[u8]) -> Result<(Box<StatusDocument>, StatusSummary), StatusError> {
    let doc = StatusDocument::parse(body)?;
    doc.validate()?;
    let summary = doc.summary();
    Ok((doc, summary))
}

impl StatusDocument {
    /// Parses the JSON only (no validation). Unknown fields are ignored; escaped strings are
    /// unescaped.
    pub fn parse(body: &[u8]) -> Result<Box<Self>, StatusError> {
        if body.len() > STATUS_DOC_MAX_BYTES {
            return Err(StatusError::TooLarge);
        }
        // An unescaped string is never longer than the document it came from.
        let mut unescaped = vec![0_u8; body.len()];
        if let Ok((doc, _consumed)) = serde_json_core::from_slice_escaped::<Self>(body, &mut unescaped) {
            return Ok(Box::new(doc));
        }
        Self::parse_per_endpoint(body, &mut unescaped)
    }

    /// The document did not parse whole. If it does with each rule item reduced to its mode,
    /// default access and id, only a rule set is at fault: every endpoint whose full item
    /// parses keeps it, the others are closed ([`closed_item`]) and named in `refused_rules`.
    /// Malformed anywhere else, the document is refused as before.
    #[inline(never)]
    fn parse_per_endpoint(body: &[u8], unescaped: &mut [u8]) -> Result<Box<Self>, StatusError> {
        let (headers, _consumed) = serde_json_core::from_slice_escaped::<HeadersOnly>(body, unescaped)
            .map_err(|_json| StatusError::ParseJson)?;
        let mut refused_rules = [false; 3];
        let authorization_rules = match &headers.authorization_rules {
            None => None,
            Some(h) => {
                let mut take = |index: usize,
                                header: Option<&ItemHeader>,
                                full: Result<Option<Box<AuthorizationItem>>, ()>| {
                    match (header, full) {
                        (_, Ok(item)) => item,
                        (Some(header), Err(())) => {
                            refused_rules[index] = true;
                            Some(closed_item(header))
                        }
                        (None, Err(())) => None,
                    }
                };
                let imds = take(0, h.imds.as_ref(), endpoint_item(body, unescaped, 0));
                let wireserver = take(1, h.wireserver.as_ref(), endpoint_item(body, unescaped, 1));
                let hostga = take(2, h.hostga.as_ref(), endpoint_item(body, unescaped, 2));
                Some(StatusRules { imds, wireserver, hostga })
            }
        };
        Ok(Box::new(Self {
            authorization_scheme: headers.authorization_scheme,
            key_delivery_method: headers.key_delivery_method,
            key_incarnation_id: headers.key_incarnation_id,
            key_guid: headers.key_guid,
            required_claims_header_pairs: headers.required_claims_header_pairs,
            secure_channel_state: headers.secure_channel_state,
            secure_channel_enabled: headers.secure_channel_enabled,
            version: headers.version,
            authorization_rules,
            refused_rules,
        }))
    }

    /// The checks of §1.3, in its order. A wrong `authorizationScheme` or unknown
    /// `keyDeliveryMethod` is not an error (quirk kept: the host decides).
    pub fn validate(&self) -> Result<(), StatusError> {
        if self.secure_channel_enabled.is_none() && self.secure_channel_state.is_none() {
            return Err(StatusError::SwitchesMissing);
        }
        if let Some(state) = &self.secure_channel_state {
            let known =
                ["disabled", "wireserver", "wireserverandimds"].iter().any(|word| state.eq_ignore_ascii_case(word));
            if !known {
                return Err(StatusError::UnknownSecureChannelState);
            }
        }
        if self.version == "1.0" && self.secure_channel_state.is_none() {
            return Err(StatusError::StateMissingForV1);
        }
        if self.version == "2.0" && self.secure_channel_enabled.is_none() {
            return Err(StatusError::EnabledMissingForV2);
        }
        Ok(())
    }

    /// Derives the state string, modes and rule ids (§1.4).
    ///
    /// Deliberate difference: when a 2.0 document gives the state `disabled`
    /// (`secureChannelEnabled` false) while still carrying rules, the reference derives the
    /// endpoint modes from those rules anyway; here every mode is then `Disabled`, so the
    /// modes never ask for a redirect while MSP is off (§1.5, §11 item 7).
    pub fn summary(&self) -> StatusSummary {
        let rules = self.authorization_rules.as_ref();
        let ws_item = rules.and_then(|r| r.wireserver.as_deref());
        let imds_item = rules.and_then(|r| r.imds.as_deref());
        let ws_rule_id = rule_id(ws_item);
        let imds_rule_id = rule_id(imds_item);

        let (state, ws_mode, imds_mode) = if self.version == "2.0" {
            let item_mode =
                |item: Option<&AuthorizationItem>| item.map_or(Mode::Disabled, |item| Mode::from_word(&item.mode));
            let enabled = self.secure_channel_enabled == Some(true);
            if !enabled || rules.is_none() {
                (String::try_from(STATE_DISABLED).unwrap_or_default(), Mode::Disabled, Mode::Disabled)
            } else {
                let (ws, imds) = (item_mode(ws_item), item_mode(imds_item));
                let mut state = String::new();
                // The leading space of " IMDS" is the reference's: two spaces after the first
                // dash. HostGA shows the WireServer mode.
                for part in
                    ["WireServer ", ws.state_word(), " -  IMDS ", imds.state_word(), " - HostGA ", ws.state_word()]
                {
                    // At most 54 bytes into 96.
                    if state.push_str(part).is_err() {
                        break;
                    }
                }
                (state, ws, imds)
            }
        } else {
            let state = self.secure_channel_state.as_ref().map_or(STATE_DISABLED, |s| s.as_str());
            let mut lowered = String::new();
            for c in state.chars() {
                // STATE_MAX_BYTES into STATE_STRING_MAX_BYTES.
                if lowered.push(c.to_ascii_lowercase()).is_err() {
                    break;
                }
            }
            let ws = match lowered.as_str() {
                "wireserver" | "wireserverandimds" => Mode::Enforce,
                "audit" => Mode::Audit,
                _ => Mode::Disabled,
            };
            let imds = match lowered.as_str() {
                STATE_DISABLED => Mode::Disabled,
                "wireserverandimds" => Mode::Enforce,
                _ => Mode::Audit,
            };
            (lowered, ws, imds)
        };

        StatusSummary {
            state,
            ws_mode,
            imds_mode,
            hgap_mode: ws_mode,
            key_guid: self.key_guid.clone(),
            key_incarnation_id: self.key_incarnation_id,
            hgap_rule_id: ws_rule_id.clone(),
            ws_rule_id,
            imds_rule_id,
        }
    }
}

fn rule_id(item: Option<&AuthorizationItem>) -> RuleId {
    item.map(|item| item.id.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_WIRESERVER: &[u8] = br#"{"authorizationScheme":"Azure-HMAC-SHA256","keyDeliveryMethod":"http","keyIncarnationId":1,"keyGuid":null,"requiredClaimsHeaderPairs":["isRoot"],"secureChannelState":"Wireserver","version":"1.0"}"#;

    /// A 2.0 document with full rules; the `hostga` item differs from `wireserver` on purpose.
    const V2_RULES: &[u8] = br#"{
        "authorizationScheme": "Azure-HMAC-SHA256",
        "keyDeliveryMethod": "http",
        "keyIncarnationId": 7,
        "keyGuid": "9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf",
        "requiredClaimsHeaderPairs": ["isRoot"],
        "secureChannelEnabled": true,
        "version": "2.0",
        "futureField": {"a": [1, 2, {"b": null}], "c": "d"},
        "authorizationRules": {
            "wireserver": {
                "defaultAccess": "deny",
                "mode": "Enforce",
                "id": "ws-rules-1",
                "rules": {
                    "privileges": [
                        {"name": "goalstate", "path": "/machine", "queryParameters": {"comp": "goalstate"}},
                        {"name": "health", "path": "/machine/health"}
                    ],
                    "roles": [{"name": "reader", "privileges": ["goalstate", "health"]}],
                    "identities": [
                        {"name": "agent", "userName": "root", "exePath": "/usr/sbin/waagent", "unknown": 1},
                        {"name": "any-python", "processName": "python3", "groupName": "adm"}
                    ],
                    "roleAssignments": [{"role": "reader", "identities": ["agent", "any-python"]}]
                }
            },
            "imds": {"defaultAccess": "allow", "mode": "audit", "id": "imds-rules-2", "rules": null},
            "hostga": {"defaultAccess": "allow", "mode": "disabled", "id": "hostga-ignored"}
        }
    }"#;

    fn v2(enabled: &str, ws_mode: &str, imds: &str) -> std::string::String {
        format!(
            r#"{{"authorizationScheme":"Azure-HMAC-SHA256","keyDeliveryMethod":"http","version":"2.0","secureChannelEnabled":{enabled},"authorizationRules":{{"wireserver":{{"defaultAccess":"allow","mode":"{ws_mode}","id":"w"}}{imds}}}}}"#
        )
    }

    /// Parses on a thread with a large stack: debug builds need several MiB to build one rule
    /// item (release builds about 1.5 MiB), more than the 2 MiB of a test thread.
    fn parse(json: &[u8]) -> Result<(Box<StatusDocument>, StatusSummary), StatusError> {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .stack_size(64 << 20)
                .spawn_scoped(scope, || parse_status(json))
                .expect("spawn parser thread")
                .join()
                .expect("parser thread panicked")
        })
    }

    fn summary(json: &[u8]) -> StatusSummary {
        parse(json).expect("valid status document").1
    }

    #[test]
    fn v1_wireserver_enforces_ws_and_audits_imds() {
        let s = summary(V1_WIRESERVER);
        assert_eq!(s.state, "wireserver");
        assert_eq!((s.ws_mode, s.imds_mode, s.hgap_mode), (Mode::Enforce, Mode::Audit, Mode::Enforce));
        assert_eq!((s.ws_rule_id.as_str(), s.imds_rule_id.as_str(), s.hgap_rule_id.as_str()), ("", "", ""));
        assert_eq!((s.key_guid.as_deref(), s.key_incarnation_id), (None, Some(1)));
        assert!(!s.is_disabled());
    }

    #[test]
    fn v1_wireserver_and_imds_enforces_both_in_any_case() {
        let json = br#"{"authorizationScheme":"Azure-HMAC-SHA256","keyDeliveryMethod":"vtpm","secureChannelState":"WIRESERVERandImds","version":"1.0"}"#;
        let s = summary(json);
        assert_eq!(s.state, "wireserverandimds");
        assert_eq!((s.ws_mode, s.imds_mode, s.hgap_mode), (Mode::Enforce, Mode::Enforce, Mode::Enforce));
    }

    #[test]
    fn v1_disabled_disables_everything() {
        let json = br#"{"authorizationScheme":"Azure-HMAC-SHA256","keyDeliveryMethod":"http","secureChannelState":"Disabled","version":"1.0"}"#;
        let s = summary(json);
        assert_eq!(s.state, "disabled");
        assert!(s.is_disabled());
        assert_eq!((s.ws_mode, s.imds_mode, s.hgap_mode), (Mode::Disabled, Mode::Disabled, Mode::Disabled));
    }

    #[test]
    fn v2_disabled_with_null_rules_disables_everything() {
        let json = br#"{"authorizationScheme":"Azure-HMAC-SHA256","keyDeliveryMethod":"http","secureChannelEnabled":false,"authorizationRules":null,"version":"2.0"}"#;
        let s = summary(json);
        assert!(s.is_disabled());
        assert_eq!((s.ws_mode, s.imds_mode, s.hgap_mode), (Mode::Disabled, Mode::Disabled, Mode::Disabled));
    }

    #[test]
    fn v2_enabled_without_rules_is_disabled() {
        let json = br#"{"authorizationScheme":"Azure-HMAC-SHA256","keyDeliveryMethod":"http","secureChannelEnabled":true,"version":"2.0"}"#;
        assert!(summary(json).is_disabled());
    }

    #[test]
    fn v2_switched_off_with_rules_never_asks_for_a_redirect() {
        let s = summary(v2("false", "enforce", "").as_bytes());
        assert!(s.is_disabled());
        assert_eq!((s.ws_mode, s.imds_mode, s.hgap_mode), (Mode::Disabled, Mode::Disabled, Mode::Disabled));
        assert_eq!(s.ws_rule_id, "w");
    }

    #[test]
    fn v2_rules_parse_and_hgap_mirrors_wireserver() {
        let (doc, s) = parse(V2_RULES).expect("valid status document");
        assert_eq!(s.state, "WireServer Enforce -  IMDS Audit - HostGA Enforce");
        assert_eq!((s.ws_mode, s.imds_mode, s.hgap_mode), (Mode::Enforce, Mode::Audit, Mode::Enforce));
        assert_eq!(s.ws_rule_id, "ws-rules-1");
        assert_eq!(s.imds_rule_id, "imds-rules-2");
        assert_eq!(s.hgap_rule_id, "ws-rules-1");
        assert_eq!(s.key_guid.as_deref(), Some("9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf"));
        assert_eq!(s.key_incarnation_id, Some(7));

        let rules = doc.authorization_rules.as_ref().expect("rules present");
        let hostga = rules.hostga.as_ref().expect("hostga parsed");
        assert_eq!(hostga.id, "hostga-ignored");
        let ws = rules.wireserver.as_ref().expect("wireserver item");
        assert_eq!(ws.default_access, "deny");
        let acl = ws.rules.as_ref().expect("acl");
        let privileges = acl.privileges.as_ref().expect("privileges");
        assert_eq!(privileges.len(), 2);
        assert_eq!(privileges[0].path, "/machine");
        let query = privileges[0].query_parameters.as_ref().expect("query parameters");
        assert_eq!(query.get(&String::try_from("comp").expect("fits")).map(String::as_str), Some("goalstate"));
        assert!(privileges[1].query_parameters.is_none());
        assert_eq!(acl.roles.as_ref().expect("roles")[0].privileges.len(), 2);
        let identities = acl.identities.as_ref().expect("identities");
        assert_eq!(identities[0].exe_path.as_deref(), Some("/usr/sbin/waagent"));
        assert_eq!(identities[1].process_name.as_deref(), Some("python3"));
        assert_eq!(identities[1].group_name.as_deref(), Some("adm"));
        assert_eq!(acl.role_assignments.as_ref().expect("assignments")[0].identities.len(), 2);
        let imds = rules.imds.as_ref().expect("imds item");
        assert!(imds.rules.is_none());
        assert_eq!(doc.required_claims_header_pairs.as_ref().map(|claims| claims.len()), Some(1));
    }

    #[test]
    fn v2_fully_on_gives_the_e2e_state_string_with_two_spaces() {
        let imds = r#","imds":{"defaultAccess":"allow","mode":"ENFORCE","id":"i"}"#;
        let s = summary(v2("true", "enforce", imds).as_bytes());
        assert_eq!(s.state, "WireServer Enforce -  IMDS Enforce - HostGA Enforce");
        assert_eq!((s.ws_rule_id.as_str(), s.imds_rule_id.as_str(), s.hgap_rule_id.as_str()), ("w", "i", "w"));
    }

    #[test]
    fn v2_all_disabled_modes_are_not_msp_off() {
        let imds = r#","imds":{"defaultAccess":"allow","mode":"disabled","id":"i"}"#;
        let s = summary(v2("true", "Disabled", imds).as_bytes());
        assert_eq!(s.state, "WireServer Disabled -  IMDS Disabled - HostGA Disabled");
        assert!(!s.is_disabled());
        assert_eq!((s.ws_mode, s.imds_mode, s.hgap_mode), (Mode::Disabled, Mode::Disabled, Mode::Disabled));
    }

    #[test]
    fn v2_unknown_mode_word_shows_disabled_but_is_not_disabled() {
        let s = summary(v2("true", "foo", "").as_bytes());
        assert_eq!(s.state, "WireServer Disabled -  IMDS Disabled - HostGA Disabled");
        assert_eq!((s.ws_mode, s.imds_mode, s.hgap_mode), (Mode::Unknown, Mode::Disabled, Mode::Unknown));
        assert!(!s.ws_mode.is_disabled());
        assert_eq!(s.imds_rule_id, "");
    }

    #[test]
    fn other_versions_use_the_v1_mapping() {
        let json =
            br#"{"authorizationScheme":"x","keyDeliveryMethod":"y","secureChannelEnabled":true,"version":"3.0"}"#;
        let s = summary(json);
        assert!(s.is_disabled());
        assert_eq!(s.imds_mode, Mode::Disabled);
    }

    #[test]
    fn wrong_scheme_and_delivery_method_do_not_fail_validation() {
        let json = br#"{"authorizationScheme":"Other","keyDeliveryMethod":"carrier-pigeon","secureChannelState":"wireserver","version":"1.0"}"#;
        assert!(parse(json).is_ok());
    }

    #[test]
    fn validation_failures_match_the_spec() {
        let cases: [(&[u8], StatusError); 6] = [
            (br#"{"authorizationScheme":"a","keyDeliveryMethod":"http","version":"1.0"}"#, StatusError::SwitchesMissing),
            (br#"{"authorizationScheme":"a","keyDeliveryMethod":"http","version":"2.0"}"#, StatusError::SwitchesMissing),
            (br#"{"authorizationScheme":"a","keyDeliveryMethod":"http","secureChannelState":"audit","version":"1.0"}"#, StatusError::UnknownSecureChannelState),
            (br#"{"authorizationScheme":"a","keyDeliveryMethod":"http","secureChannelState":"enforce","secureChannelEnabled":true,"version":"2.0"}"#, StatusError::UnknownSecureChannelState),
            (br#"{"authorizationScheme":"a","keyDeliveryMethod":"http","secureChannelEnabled":true,"version":"1.0"}"#, StatusError::StateMissingForV1),
            (br#"{"authorizationScheme":"a","keyDeliveryMethod":"http","secureChannelState":"Wireserver","version":"2.0"}"#, StatusError::EnabledMissingForV2),
        ];
        for (json, error) in cases {
            assert_eq!(parse(json).map(|_| ()), Err(error), "{}", std::string::String::from_utf8_lossy(json));
        }
    }

    #[test]
    fn rejects_missing_required_fields_and_bad_json() {
        for json in [
            &br#"{"keyDeliveryMethod":"http","secureChannelState":"disabled","version":"1.0"}"#[..],
            br#"{"authorizationScheme":"a","secureChannelState":"disabled","version":"1.0"}"#,
            br#"{"authorizationScheme":"a","keyDeliveryMethod":"http","secureChannelState":"disabled"}"#,
            br#"{"authorizationScheme":"a","keyDeliveryMethod":"http","secureChannelEnabled":"yes","version":"2.0"}"#,
            b"",
            b"{",
            b"null",
        ] {
            assert_eq!(parse(json).map(|_| ()), Err(StatusError::ParseJson));
        }
        let big = vec![b' '; STATUS_DOC_MAX_BYTES + 1];
        assert_eq!(parse(&big).map(|_| ()), Err(StatusError::TooLarge));
    }

    #[test]
    fn unescapes_strings_in_json() {
        let json = br#"{"authorizationScheme":"Azure-HMAC-SHA256","keyDeliveryMethod":"http","keyGuid":"ab\u0063\/d","secureChannelState":"Wire\u0073erver","version":"1\u002e0","note":"\"\\\n"}"#;
        let s = summary(json);
        assert_eq!(s.state, "wireserver");
        assert_eq!(s.key_guid.as_deref(), Some("abc/d"));
        let rules = v2("true", r"\u0045nforce", "").replace(r#""id":"w""#, r#""id":"w\"1\"""#);
        let s = summary(rules.as_bytes());
        assert_eq!(s.ws_mode, Mode::Enforce);
        assert_eq!(s.ws_rule_id, "w\"1\"");
    }

    #[test]
    fn ignores_unknown_endpoints_and_refuses_repeated_ones() {
        let item = r#"{"defaultAccess":"allow","mode":"enforce","id":"x"}"#;
        let unknown = format!(r#","future":{item},"imds":null"#);
        let s = summary(v2("true", "audit", &unknown).as_bytes());
        assert_eq!((s.ws_mode, s.imds_mode), (Mode::Audit, Mode::Disabled));
        let repeated = format!(r#","wireserver":{item}"#);
        assert_eq!(parse(v2("true", "audit", &repeated).as_bytes()).map(|_| ()), Err(StatusError::ParseJson));
    }

    /// A v2.0 document shaped like a real one: IMDS rules for managed identities (user-
    /// assigned ARM ids, client and object ids) beside WireServer rules, `imds_privileges`
    /// privileges in the IMDS item.
    fn managed_identity_doc(imds_privileges: usize, mi_res_id: &str) -> std::string::String {
        let privileges: std::vec::Vec<std::string::String> = (0..imds_privileges)
            .map(|i| {
                format!(
                    r#"{{"name":"token-{i}","path":"/metadata/identity/oauth2/token","queryParameters":{{"resource":"https://vault.azure.net","mi_res_id":"{mi_res_id}","client_id":"8d9c3f4e-2b1a-4c6d-9e8f-7a6b5c4d3e2f","object_id":"1f2e3d4c-5b6a-4978-8a9b-0c1d2e3f4a5b"}}}}"#
                )
            })
            .collect();
        let names: std::vec::Vec<std::string::String> =
            (0..imds_privileges.min(16)).map(|i| format!(r#""token-{i}""#)).collect();
        format!(
            r#"{{"authorizationScheme":"Azure-HMAC-SHA256","keyDeliveryMethod":"http","keyIncarnationId":3,
            "keyGuid":"9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf","requiredClaimsHeaderPairs":["isRoot"],
            "secureChannelEnabled":true,"version":"2.0",
            "authorizationRules":{{
              "imds":{{"defaultAccess":"allow","mode":"enforce","id":"sigid-imds-7","rules":{{
                "privileges":[{}],
                "roles":[{{"name":"tokens","privileges":[{}]}}],
                "identities":[{{"name":"app","exePath":"/usr/bin/app","groupName":"app"}}],
                "roleAssignments":[{{"role":"tokens","identities":["app"]}}]}}}},
              "wireserver":{{"defaultAccess":"deny","mode":"audit","id":"sigid-ws-2","rules":{{
                "privileges":[{{"name":"gs","path":"/machine","queryParameters":{{"comp":"goalstate"}}}}],
                "roles":[{{"name":"r","privileges":["gs"]}}],
                "identities":[{{"name":"root","userName":"root"}}],
                "roleAssignments":[{{"role":"r","identities":["root"]}}]}}}}}}}}"#,
            privileges.join(","),
            names.join(",")
        )
    }

    const ARM_ID: &str = "/subscriptions/2c5a8f1e-7b3d-4e9a-b6c2-1d0f8e7a6b5c/resourceGroups/rg-contoso-production-westeurope-identity/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-contoso-orders-api-prod-westeurope-001";

    #[test]
    fn real_managed_identity_rules_parse_whole() {
        assert!(ARM_ID.len() > 170, "a typical user-assigned identity id");
        let doc = managed_identity_doc(24, ARM_ID);
        let (doc, summary) =
            crate::policy::test_support::on_big_stack(|| parse_status(doc.as_bytes())).expect("parses");
        assert_eq!(doc.refused_rules, [false; 3]);
        let imds = doc.authorization_rules.as_ref().and_then(|r| r.imds.as_deref()).expect("imds item");
        let privileges = imds.rules.as_ref().and_then(|r| r.privileges.as_ref()).expect("privileges");
        assert_eq!(privileges.len(), 24);
        let query = privileges[0].query_parameters.as_ref().expect("query");
        assert_eq!(query.iter().find(|(k, _)| k.as_str() == "mi_res_id").map(|(_, v)| v.as_str()), Some(ARM_ID));
        assert_eq!((summary.imds_mode, summary.ws_mode), (Mode::Enforce, Mode::Audit));
    }

    #[test]
    fn a_rule_set_over_capacity_closes_its_endpoint_only() {
        // 33 privileges (over MAX_PRIVILEGES), and separately an id value longer than any
        // ARM id: the IMDS item is refused, the rest of the document applies.
        let longest = format!("{ARM_ID}{}", "x".repeat(400));
        for doc in [managed_identity_doc(33, ARM_ID), managed_identity_doc(2, &longest)] {
            let (doc, summary) = crate::policy::test_support::on_big_stack(|| parse_status(doc.as_bytes()))
                .expect("the document still applies");
            assert_eq!(doc.refused_rules, [true, false, false]);
            let rules = doc.authorization_rules.as_ref().expect("rules");
            let imds = rules.imds.as_deref().expect("a closed imds item");
            assert_eq!(
                (imds.default_access.as_str(), imds.mode.as_str(), imds.id.as_str()),
                ("deny", "enforce", "sigid-imds-7")
            );
            assert!(imds.rules.is_none(), "a closed item has no privileges");
            let ws = rules.wireserver.as_deref().expect("wireserver item kept");
            assert_eq!(ws.rules.as_ref().and_then(|r| r.privileges.as_ref()).map(|p| p.len()), Some(1));
            assert_eq!(
                summary.key_guid.as_deref(),
                Some("9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf"),
                "the key latch proceeds"
            );
            assert_eq!((summary.imds_mode, summary.ws_mode), (Mode::Enforce, Mode::Audit), "modes still apply");
            assert_eq!(summary.imds_rule_id.as_str(), "sigid-imds-7");
        }
        // Malformed outside the rules: still refused as a whole.
        let broken = managed_identity_doc(2, ARM_ID).replace(r#""version":"2.0""#, r#""version":2"#);
        assert_eq!(parse_status(broken.as_bytes()).err(), Some(StatusError::ParseJson));
    }
}
