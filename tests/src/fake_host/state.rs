// SPDX-License-Identifier: MIT
//! Shared state of the fake host: live settings (changed through `POST /control`), issued keys,
//! counters and the request log.
//!
//! Everything lives in one `State` behind one `Mutex`, so a test that changes a setting and then
//! sends a request sees a consistent host: there is no moment where, say, the mode changed but
//! the status document did not.

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;

use serde_json::{Map, Value, json};

/// How strictly one endpoint checks signatures (the `mode` of its authorization item).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Unsigned or wrongly signed data requests get `401`.
    Enforce,
    /// Signatures are checked and recorded, every request is served.
    Audit,
    /// Signatures are recorded, every request is served.
    Disabled,
}

impl Mode {
    /// Parses `enforce`, `audit` or `disabled` (case-insensitive).
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "enforce" => Some(Self::Enforce),
            "audit" => Some(Self::Audit),
            "disabled" => Some(Self::Disabled),
            _ => None,
        }
    }

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
            Self::Disabled => "disabled",
        }
    }
}

/// Schema of the secure-channel status document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusVersion {
    /// `secureChannelState` string.
    V1,
    /// `secureChannelEnabled` plus `authorizationRules`.
    V2,
}

impl StatusVersion {
    /// Parses `1.0` or `2.0`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "1.0" => Some(Self::V1),
            "2.0" => Some(Self::V2),
            _ => None,
        }
    }

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "1.0",
            Self::V2 => "2.0",
        }
    }
}

/// Which host service a listener plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// IMDS (`169.254.169.254:80`).
    Imds,
    /// WireServer (`168.63.129.16:80`), also serving the secure-channel API.
    WireServer,
    /// HostGAPlugin (`168.63.129.16:32526`).
    HostGa,
}

impl Endpoint {
    /// Name used in the request log and the status document.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Imds => "imds",
            Self::WireServer => "wireserver",
            Self::HostGa => "hostga",
        }
    }
}

/// Live settings. Field names in `to_json`/`apply` are the control API's.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    pub(crate) wireserver_mode: Mode,
    pub(crate) imds_mode: Mode,
    pub(crate) hostga_mode: Mode,
    pub(crate) version: StatusVersion,
    pub(crate) secure_channel_enabled: bool,
    /// Custom `authorizationRules` object; `None` = the built-in default.
    pub(crate) rules: Option<Value>,
    pub(crate) down: bool,
    pub(crate) status_delay_ms: u64,
    /// The next this many telemetry uploads are answered `500` (each one used up).
    pub(crate) telemetry_failures: u64,
    pub(crate) status_http_status: u16,
    pub(crate) malformed_status: bool,
    pub(crate) status_content_type: Option<String>,
    pub(crate) acquire_http_status: u16,
    pub(crate) attest_http_status: u16,
    /// Reported in place of the attested guid; `Some("none")` reports null.
    pub(crate) key_guid_override: Option<String>,
    pub(crate) no_host_date: bool,
}

/// Side effects of a control request that are actions rather than settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ControlActions {
    pub(crate) forget_attested_key: bool,
}

impl Settings {
    pub(crate) fn new(mode: Mode, version: StatusVersion, rules: Option<Value>) -> Self {
        Self {
            wireserver_mode: mode,
            imds_mode: mode,
            hostga_mode: mode,
            version,
            secure_channel_enabled: true,
            rules,
            down: false,
            status_delay_ms: 0,
            telemetry_failures: 0,
            status_http_status: 0,
            malformed_status: false,
            status_content_type: None,
            acquire_http_status: 0,
            attest_http_status: 0,
            key_guid_override: None,
            no_host_date: false,
        }
    }

    /// The configured mode of an endpoint.
    pub(crate) fn mode(&self, endpoint: Endpoint) -> Mode {
        match endpoint {
            Endpoint::Imds => self.imds_mode,
            Endpoint::WireServer => self.wireserver_mode,
            Endpoint::HostGa => self.hostga_mode,
        }
    }

    /// The mode the fake actually applies: with the master switch off the host tells the agent
    /// MSP is off, so it must not then reject the agent's (now unsigned) traffic.
    pub(crate) fn effective_mode(&self, endpoint: Endpoint) -> Mode {
        if self.secure_channel_enabled { self.mode(endpoint) } else { Mode::Disabled }
    }

    /// `authorizationRules` as reported: the custom object (each present item's `mode`
    /// overwritten with the live mode, so what the fake enforces and what it reports never
    /// disagree) or one default item per endpoint.
    pub(crate) fn authorization_rules(&self) -> Value {
        let endpoints = [Endpoint::Imds, Endpoint::WireServer, Endpoint::HostGa];
        if let Some(Value::Object(custom)) = &self.rules {
            let mut rules = custom.clone();
            for endpoint in endpoints {
                if let Some(Value::Object(item)) = rules.get_mut(endpoint.as_str()) {
                    item.insert("mode".to_owned(), json!(self.mode(endpoint).as_str()));
                }
            }
            return Value::Object(rules);
        }
        let mut rules = Map::new();
        for endpoint in endpoints {
            rules.insert(
                endpoint.as_str().to_owned(),
                json!({
                    "defaultAccess": "allow",
                    "mode": self.mode(endpoint).as_str(),
                    "id": "fake-rules-1",
                    "rules": null,
                }),
            );
        }
        Value::Object(rules)
    }

    pub(crate) fn to_json(&self) -> Value {
        let all_same = self.wireserver_mode == self.imds_mode && self.imds_mode == self.hostga_mode;
        json!({
            "mode": all_same.then(|| self.wireserver_mode.as_str()),
            "wireserverMode": self.wireserver_mode.as_str(),
            "imdsMode": self.imds_mode.as_str(),
            "hostgaMode": self.hostga_mode.as_str(),
            "version": self.version.as_str(),
            "secureChannelEnabled": self.secure_channel_enabled,
            "rules": self.rules,
            "down": self.down,
            "statusDelayMs": self.status_delay_ms,
            "telemetryFailures": self.telemetry_failures,
            "statusHttpStatus": self.status_http_status,
            "malformedStatus": self.malformed_status,
            "statusContentType": self.status_content_type,
            "acquireHttpStatus": self.acquire_http_status,
            "attestHttpStatus": self.attest_http_status,
            "keyGuidOverride": self.key_guid_override,
            "noHostDate": self.no_host_date,
        })
    }

    /// Applies a control patch. All-or-nothing: on any error nothing changes, so a typo in a
    /// test cannot leave the host half-reconfigured.
    pub(crate) fn apply(&mut self, patch: &Value) -> Result<ControlActions, String> {
        let Value::Object(fields) = patch else {
            return Err("control body must be a JSON object".to_owned());
        };
        let mut next = self.clone();
        let mut actions = ControlActions::default();
        for (name, value) in fields {
            match name.as_str() {
                "mode" => {
                    let mode = mode_field(name, value)?;
                    next.wireserver_mode = mode;
                    next.imds_mode = mode;
                    next.hostga_mode = mode;
                }
                "wireserverMode" => next.wireserver_mode = mode_field(name, value)?,
                "imdsMode" => next.imds_mode = mode_field(name, value)?,
                "hostgaMode" => next.hostga_mode = mode_field(name, value)?,
                "version" => {
                    next.version = value
                        .as_str()
                        .and_then(StatusVersion::parse)
                        .ok_or_else(|| format!("{name}: expected \"1.0\" or \"2.0\""))?;
                }
                "secureChannelEnabled" => next.secure_channel_enabled = bool_field(name, value)?,
                "rules" => {
                    next.rules = match value {
                        Value::Null => None,
                        Value::Object(_) => Some(value.clone()),
                        _ => return Err(format!("{name}: expected an object or null")),
                    };
                }
                "down" => next.down = bool_field(name, value)?,
                "statusDelayMs" => {
                    next.status_delay_ms =
                        value.as_u64().ok_or_else(|| format!("{name}: expected a non-negative integer"))?;
                }
                "telemetryFailures" => {
                    next.telemetry_failures =
                        value.as_u64().ok_or_else(|| format!("{name}: expected a non-negative integer"))?;
                }
                "statusHttpStatus" => next.status_http_status = status_field(name, value)?,
                "acquireHttpStatus" => next.acquire_http_status = status_field(name, value)?,
                "attestHttpStatus" => next.attest_http_status = status_field(name, value)?,
                "malformedStatus" => next.malformed_status = bool_field(name, value)?,
                "statusContentType" => next.status_content_type = optional_string_field(name, value)?,
                "keyGuidOverride" => next.key_guid_override = optional_string_field(name, value)?,
                "forgetAttestedKey" => actions.forget_attested_key = bool_field(name, value)?,
                "noHostDate" => next.no_host_date = bool_field(name, value)?,
                _ => return Err(format!("unknown control field {name:?}")),
            }
        }
        *self = next;
        Ok(actions)
    }
}

fn mode_field(name: &str, value: &Value) -> Result<Mode, String> {
    value
        .as_str()
        .and_then(Mode::parse)
        .ok_or_else(|| format!("{name}: expected \"enforce\", \"audit\" or \"disabled\""))
}

fn bool_field(name: &str, value: &Value) -> Result<bool, String> {
    value.as_bool().ok_or_else(|| format!("{name}: expected a boolean"))
}

/// `0` (or null) means "behave normally"; anything else must be a real HTTP status.
fn status_field(name: &str, value: &Value) -> Result<u16, String> {
    if value.is_null() {
        return Ok(0);
    }
    value
        .as_u64()
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n == 0 || (100..=599).contains(n))
        .ok_or_else(|| format!("{name}: expected 0 or an HTTP status code"))
}

fn optional_string_field(name: &str, value: &Value) -> Result<Option<String>, String> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(format!("{name}: expected a string or null")),
    }
}

/// A key handed out by `POST /secure-channel/key`.
#[derive(Debug, Clone)]
pub(crate) struct IssuedKey {
    pub(crate) guid: String,
    /// As sent: 64 upper-case hex digits.
    pub(crate) key_hex: String,
    pub(crate) key: Vec<u8>,
}

/// Call counters for `GET /stats`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stats {
    pub(crate) status_calls: u64,
    pub(crate) acquire_calls: u64,
    pub(crate) attest_calls: u64,
    pub(crate) attest_failures: u64,
    pub(crate) acquire_body_mismatches: u64,
    /// `POST /machine/?comp=telemetrydata` requests, and how many were failed on purpose.
    pub(crate) telemetry_uploads: u64,
    pub(crate) telemetry_failures_injected: u64,
    /// `PUT /vmAgentLog` uploads to HostGAPlugin.
    pub(crate) agent_log_uploads: u64,
    /// Provisioning health reports (`POST /machine?comp=health`): `Ready`, `NotReady` (the
    /// provisioning agent's failure signal), and reports for another container or role
    /// instance, which the host refuses.
    pub(crate) ready_reports: u64,
    pub(crate) not_ready_reports: u64,
    pub(crate) rejected_health_reports: u64,
}

/// One request as received on an endpoint listener, and what the fake made of it.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) seq: u64,
    pub(crate) endpoint: Endpoint,
    pub(crate) peer: SocketAddr,
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) version: String,
    pub(crate) headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub(crate) body: Vec<u8>,
    pub(crate) signature: String,
    pub(crate) key_guid: Option<String>,
    /// Status answered; `0` while the answer is pending or when none was sent (host down).
    pub(crate) status: u16,
    /// Anything the fake noticed beyond the signature verdict (e.g. an unexpected acquire body).
    pub(crate) note: Option<String>,
}

impl Record {
    pub(crate) fn to_json(&self) -> Value {
        let headers: Vec<Value> =
            self.headers.iter().map(|(n, v)| json!([String::from_utf8_lossy(n), String::from_utf8_lossy(v)])).collect();
        json!({
            "seq": self.seq,
            "endpoint": self.endpoint.as_str(),
            "peer": self.peer.to_string(),
            "method": self.method,
            "target": self.target,
            "version": self.version,
            "headers": headers,
            "body": body_text(&self.body),
            "bodyLength": self.body.len(),
            "bodySha256": body_sha256(&self.body),
            "signature": self.signature,
            "keyGuid": self.key_guid,
            "status": self.status,
            "note": self.note,
        })
    }
}

/// Bodies larger than this are not copied into the request log's JSON (a log upload is MiB):
/// `body` is empty for them and `bodyLength` and `bodySha256` say what arrived.
const BODY_TEXT_MAX_BYTES: usize = 64 * 1024;

/// A body as text for the request log and the echo, or `""` when it is over
/// [`BODY_TEXT_MAX_BYTES`].
pub(crate) fn body_text(body: &[u8]) -> String {
    if body.len() > BODY_TEXT_MAX_BYTES { String::new() } else { String::from_utf8_lossy(body).into_owned() }
}

/// Lower-case hex SHA-256 of a body: tests compare what arrived with what was sent.
fn body_sha256(body: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(body).iter().map(|b| format!("{b:02x}")).collect()
}

/// splitmix64: tiny, good enough for key material *in a test fake*, seeded from the OS.
#[derive(Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    /// Seeds from `/dev/urandom`; falls back to the wall clock (seconds and nanoseconds),
    /// which still differs run to run.
    pub(crate) fn from_os() -> Self {
        let mut seed = [0u8; 8];
        let from_urandom = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed));
        if from_urandom.is_err() {
            let now = super::handlers::wall_now();
            seed = (now.as_secs() ^ u64::from(now.subsec_nanos()).rotate_left(32)).to_le_bytes();
        }
        Self(u64::from_le_bytes(seed))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Everything mutable, behind one lock.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) settings: Settings,
    /// In issue order.
    pub(crate) keys: Vec<IssuedKey>,
    /// Guid of the most recently attested key.
    pub(crate) current_key: Option<String>,
    pub(crate) stats: Stats,
    pub(crate) records: Vec<Record>,
    pub(crate) next_seq: u64,
    pub(crate) next_incarnation: u32,
    pub(crate) rng: Rng,
}

impl State {
    pub(crate) fn new(settings: Settings) -> Self {
        Self {
            settings,
            keys: Vec::new(),
            current_key: None,
            stats: Stats::default(),
            records: Vec::new(),
            next_seq: 1,
            next_incarnation: 1,
            rng: Rng::from_os(),
        }
    }

    pub(crate) fn key(&self, guid: &str) -> Option<&IssuedKey> {
        self.keys.iter().find(|k| k.guid == guid)
    }

    /// The guid the status document reports: the override if set, else the attested key.
    pub(crate) fn reported_key_guid(&self) -> Option<String> {
        match self.settings.key_guid_override.as_deref() {
            Some("none") => None,
            Some(guid) => Some(guid.to_owned()),
            None => self.current_key.clone(),
        }
    }

    /// Issues a fresh 256-bit key under a fresh GUID-shaped id (random version-4 layout).
    pub(crate) fn issue_key(&mut self) -> (IssuedKey, u32) {
        let mut key = vec![0u8; 32];
        self.rng.fill(&mut key);
        let mut id = [0u8; 16];
        self.rng.fill(&mut id);
        id[6] = (id[6] & 0x0f) | 0x40;
        id[8] = (id[8] & 0x3f) | 0x80;
        let hex = super::signing::encode_hex_lower(&id);
        let guid = format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]);
        let issued = IssuedKey { guid, key_hex: super::signing::encode_hex_lower(&key).to_ascii_uppercase(), key };
        self.keys.push(issued.clone());
        let incarnation = self.next_incarnation;
        self.next_incarnation = self.next_incarnation.wrapping_add(1);
        (issued, incarnation)
    }

    pub(crate) fn stats_json(&self) -> Value {
        json!({
            "statusCalls": self.stats.status_calls,
            "acquireCalls": self.stats.acquire_calls,
            "attestCalls": self.stats.attest_calls,
            "attestFailures": self.stats.attest_failures,
            "acquireBodyMismatches": self.stats.acquire_body_mismatches,
            "telemetryUploads": self.stats.telemetry_uploads,
            "telemetryFailuresInjected": self.stats.telemetry_failures_injected,
            "agentLogUploads": self.stats.agent_log_uploads,
            "readyReports": self.stats.ready_reports,
            "notReadyReports": self.stats.not_ready_reports,
            "rejectedHealthReports": self.stats.rejected_health_reports,
            "currentKeyGuid": self.current_key,
            "issuedKeys": self.keys.iter().map(|k| k.guid.as_str()).collect::<Vec<_>>(),
        })
    }

    pub(crate) fn keys_json(&self) -> Value {
        let mut map = Map::new();
        for key in &self.keys {
            map.insert(key.guid.clone(), json!(key.key_hex));
        }
        Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::new(Mode::Enforce, StatusVersion::V2, None)
    }

    #[test]
    fn control_patch_changes_only_named_fields() {
        let mut s = settings();
        let actions =
            s.apply(&json!({"imdsMode": "audit", "statusHttpStatus": 500, "forgetAttestedKey": true})).unwrap();
        assert!(actions.forget_attested_key);
        assert_eq!(s.imds_mode, Mode::Audit);
        assert_eq!(s.wireserver_mode, Mode::Enforce);
        assert_eq!(s.status_http_status, 500);
        assert_eq!(s.to_json()["mode"], Value::Null, "modes differ");
    }

    #[test]
    fn control_patch_is_all_or_nothing() {
        let mut s = settings();
        assert!(s.apply(&json!({"mode": "audit", "version": "3.0"})).is_err());
        assert!(s.apply(&json!({"mode": "audit", "bogus": 1})).is_err());
        assert!(s.apply(&json!({"statusHttpStatus": 70000})).is_err());
        assert_eq!(s, settings());
    }

    #[test]
    fn custom_rules_report_live_modes() {
        let rules = json!({"wireserver": {"defaultAccess": "deny", "mode": "audit", "id": "x", "rules": null}});
        let mut s = Settings::new(Mode::Enforce, StatusVersion::V2, Some(rules));
        s.wireserver_mode = Mode::Disabled;
        let reported = s.authorization_rules();
        assert_eq!(reported["wireserver"]["mode"], "disabled");
        assert_eq!(reported["wireserver"]["defaultAccess"], "deny");
        assert!(reported.get("imds").is_none());
    }

    #[test]
    fn default_rules_cover_all_endpoints() {
        let reported = settings().authorization_rules();
        for endpoint in ["imds", "wireserver", "hostga"] {
            assert_eq!(reported[endpoint]["mode"], "enforce");
            assert_eq!(reported[endpoint]["id"], "fake-rules-1");
            assert_eq!(reported[endpoint]["defaultAccess"], "allow");
        }
    }

    #[test]
    fn issued_keys_are_guid_shaped_and_distinct() {
        let mut state = State::new(settings());
        let (a, first) = state.issue_key();
        let (b, second) = state.issue_key();
        assert_ne!(a.guid, b.guid);
        assert_ne!(a.key_hex, b.key_hex);
        assert_eq!(a.key_hex.len(), 64);
        assert!(a.key_hex.bytes().all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()));
        assert_eq!(a.guid.len(), 36);
        assert_eq!(a.guid.matches('-').count(), 4);
        assert_eq!((first, second), (1, 2));
    }

    #[test]
    fn key_guid_override_none_reports_null() {
        let mut state = State::new(settings());
        state.current_key = Some("g".to_owned());
        assert_eq!(state.reported_key_guid().as_deref(), Some("g"));
        state.settings.key_guid_override = Some("none".to_owned());
        assert_eq!(state.reported_key_guid(), None);
        state.settings.key_guid_override = Some("other".to_owned());
        assert_eq!(state.reported_key_guid().as_deref(), Some("other"));
    }
}
