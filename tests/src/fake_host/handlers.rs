// SPDX-License-Identifier: MIT
//! What the fake host answers: the secure-channel API (spec §1.2 A–C, §1.3, §1.6), data requests
//! on WireServer, HostGAPlugin and IMDS (with the signature check of §3), and the control API.
//!
//! Every endpoint request is logged *on arrival* with its signature verdict, and the log entry is
//! completed with the status once the answer is decided; a test that reads `/requests` after
//! getting its response therefore always finds it, in arrival order even when answers are
//! delayed.

use std::fmt;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::Shared;
use super::http::{Request, Response};
use super::signing;
use super::state::{Endpoint, Mode, Record, State, StatusVersion};

/// The acquire body the agent must send, byte for byte (spec §1.2 B).
const ACQUIRE_BODY: &[u8] = br#"{"authorizationScheme": "Azure-HMAC-SHA256"}"#;
/// The `issued` text of the project's samples; deliberately not valid ISO 8601 (spec §1.6).
const ISSUED: &str = "2021-05-05T 12:00:00Z";
/// Truncated status JSON for `malformedStatus`.
const MALFORMED_STATUS: &str = r#"{"version": "2.0", "#;
/// The telemetry upload (spec §1.2 G, §7.3): on the skip list of §3.7, so never signed.
const TELEMETRY_TARGET: &str = "/machine/?comp=telemetrydata";
/// The guest agent's log upload to HostGAPlugin: the other §3.7 skip-list entry.
const AGENT_LOG_TARGET: &str = "/vmagentlog";
const JSON: &str = "application/json; charset=utf-8";
const XML: &str = "text/xml; charset=utf-8";

/// Fixed identity of the pretend VM, shared by IMDS, the goal state and the shared config.
const VM_NAME: &str = "fake-vm";
const VM_ID: &str = "5c3e5d2a-8f7e-4b7a-9d61-0b6f7e9a1c42";
const SUBSCRIPTION_ID: &str = "0e1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b";
const CONTAINER_ID: &str = "a8016240-7286-49ef-8981-63520cb8f6d0";
const ROLE_INSTANCE: &str = "fake-deployment.fake-vm_IN_0";
const DEPLOYMENT: &str = "fake-deployment";
/// The admin account of the provisioning documents (IMDS `osProfile`, OVF environment).
const ADMIN_USER: &str = "azureuser";
/// An ed25519 public key whose private half was discarded when it was made.
const ADMIN_SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOc3rW9Ycz1R3YE0YL8oZgGMDuz7F9+AQIs2r4Hogjpm azureuser@fake-vm";

/// Wall-clock time since the Unix epoch: the one place the fake reads the clock.
#[expect(
    clippy::disallowed_methods,
    reason = "the fake host must stamp real host time on status replies; it has no injected clock"
)]
pub(crate) fn wall_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// RFC 1123 date (`Wed, 23 Apr 2025 12:00:00 GMT`) for `secs` since the Unix epoch.
pub(crate) fn rfc1123(secs: u64) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[usize::try_from(days % 7).unwrap_or_default()],
        day,
        MONTHS[usize::try_from(month - 1).unwrap_or_default()],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian (year, month 1-12, day 1-31) for a day count since 1970-01-01, using
/// 400-year eras of 146 097 days counted from 0000-03-01 so leap days fall at an era's end.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Outcome of the signature check of one request, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Valid,
    Missing,
    Invalid(&'static str),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Valid => f.write_str("valid"),
            Self::Missing => f.write_str("missing"),
            Self::Invalid(reason) => write!(f, "invalid:{reason}"),
        }
    }
}

/// Checks the request's `x-ms-azure-host-authorization`. For attestation `expected_guid` is the
/// guid in the URL (the header must name it); for data requests the key must be the currently
/// attested one, as a real host only honours the latched key. Returns the verdict and the guid
/// named in the header.
fn check_signature(
    state: &State,
    req: &Request,
    expected_guid: Option<&str>,
    require_current: bool,
) -> (Verdict, Option<String>) {
    let values: Vec<&[u8]> = req.header_all(signing::AUTHORIZATION_HEADER).collect();
    let Some(value) = values.last() else {
        return (Verdict::Missing, None);
    };
    let parsed = match signing::parse_authorization(value) {
        Ok(parsed) => parsed,
        Err(e) => return (Verdict::Invalid(e.reason()), None),
    };
    let named = Some(parsed.guid.to_owned());
    if values.len() > 1 {
        return (Verdict::Invalid("repeated-authorization-header"), named);
    }
    if expected_guid.is_some_and(|g| g != parsed.guid) {
        return (Verdict::Invalid("guid-mismatch"), named);
    }
    let Some(key) = state.key(parsed.guid) else {
        return (Verdict::Invalid("unknown-key"), named);
    };
    let sts = signing::string_to_sign(&req.method, &req.body, &req.headers, &req.target);
    if let Err(e) = signing::verify(&key.key, &sts, parsed.signature_hex) {
        return (Verdict::Invalid(e.reason()), named);
    }
    if require_current && state.current_key.as_deref() != Some(parsed.guid) {
        return (Verdict::Invalid("not-current-key"), named);
    }
    (Verdict::Valid, named)
}

/// Which handler a request goes to. Only the WireServer listener serves the secure-channel API.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Status,
    Acquire,
    Attest(String),
    /// `POST /machine/?comp=telemetrydata` (exact target, case-insensitive, as in §3.7).
    Telemetry,
    /// `PUT /vmAgentLog` on HostGAPlugin (exact target, case-insensitive, §3.7): taken unsigned
    /// in every mode, as the host does.
    AgentLog,
    /// `POST /machine?comp=health`: the provisioning agent's ready (or failure) report.
    Health,
    Data,
}

fn route(endpoint: Endpoint, req: &Request) -> Route {
    if endpoint == Endpoint::HostGa && req.method == "PUT" && req.target.eq_ignore_ascii_case(AGENT_LOG_TARGET) {
        return Route::AgentLog;
    }
    if endpoint != Endpoint::WireServer {
        return Route::Data;
    }
    let path = req.path();
    match req.method.as_str() {
        "GET" | "HEAD" if path == "/secure-channel/status" => Route::Status,
        "POST" if path == "/secure-channel/key" => Route::Acquire,
        "POST" if req.target.eq_ignore_ascii_case(TELEMETRY_TARGET) => Route::Telemetry,
        // Only a health report document: the system tests also use this target as a signed
        // POST echo, with bodies of their own.
        "POST" if is_machine(path) && query_has(req, "comp", "health") && is_health_report(&req.body) => Route::Health,
        "POST" => path
            .strip_prefix("/secure-channel/key/")
            .and_then(|rest| rest.strip_suffix("/key-attestation"))
            .filter(|guid| !guid.is_empty() && !guid.contains('/'))
            .map_or(Route::Data, |guid| Route::Attest(guid.to_owned())),
        _ => Route::Data,
    }
}

/// Handles one request that arrived on an endpoint listener. `None` means "close without
/// answering" (the host was switched `down` meanwhile).
pub(crate) fn handle_endpoint(
    shared: &Shared,
    endpoint: Endpoint,
    peer: SocketAddr,
    req: &Request,
) -> Option<Response> {
    let route = route(endpoint, req);
    let (seq, verdict, delay_ms) = {
        let mut state = shared.lock();
        let (verdict, key_guid) = match &route {
            Route::Attest(guid) => check_signature(&state, req, Some(guid), false),
            _ => check_signature(&state, req, None, true),
        };
        let secure_channel = match route {
            Route::Status => {
                state.stats.status_calls += 1;
                true
            }
            Route::Acquire => {
                state.stats.acquire_calls += 1;
                true
            }
            Route::Attest(_) => {
                state.stats.attest_calls += 1;
                true
            }
            Route::Telemetry => {
                state.stats.telemetry_uploads += 1;
                false
            }
            Route::AgentLog => {
                state.stats.agent_log_uploads += 1;
                false
            }
            Route::Health | Route::Data => false,
        };
        let seq = state.next_seq;
        state.next_seq += 1;
        state.records.push(Record {
            seq,
            endpoint,
            peer,
            method: req.method.clone(),
            target: req.target.clone(),
            version: req.version.clone(),
            headers: req.headers.clone(),
            body: req.body.clone(),
            signature: verdict.to_string(),
            key_guid,
            status: 0,
            note: None,
        });
        let delay_ms = if secure_channel { state.settings.status_delay_ms } else { 0 };
        (seq, verdict, delay_ms)
    };

    if delay_ms > 0 {
        // A slow host: sleep without the lock so the control API and other endpoints stay live.
        thread::sleep(Duration::from_millis(delay_ms));
    }

    let mut state = shared.lock();
    let (response, note) = match route {
        Route::Status => (status_response(&state), None),
        Route::Acquire => acquire_response(&mut state, req),
        Route::Attest(guid) => attest_response(&mut state, &guid, verdict),
        Route::Telemetry => telemetry_response(&mut state),
        Route::AgentLog => (Response::new(200, JSON, "{}"), None),
        Route::Health => health_response(&mut state, req, verdict),
        Route::Data => (data_response(&state, shared, endpoint, req, verdict), None),
    };
    let down = state.settings.down;
    if let Some(record) = state.records.iter_mut().rev().find(|r| r.seq == seq) {
        if down {
            record.note = Some("host down: closed without answering".to_owned());
        } else {
            record.status = response.status;
            record.note = note;
        }
    }
    (!down).then_some(response)
}

/// The secure-channel status document for the current settings (spec §1.3).
pub(crate) fn status_document(state: &State) -> Value {
    let settings = &state.settings;
    let key_guid = state.reported_key_guid();
    match settings.version {
        StatusVersion::V1 => {
            let ws = settings.effective_mode(Endpoint::WireServer);
            let imds = settings.effective_mode(Endpoint::Imds);
            let channel_state = match (ws, imds) {
                (Mode::Enforce, Mode::Enforce) => "WireserverAndImds",
                (Mode::Enforce, _) => "Wireserver",
                _ => "Disabled",
            };
            json!({
                "authorizationScheme": signing::SCHEME,
                "keyDeliveryMethod": "http",
                "keyGuid": key_guid,
                "secureChannelState": channel_state,
                "version": "1.0",
            })
        }
        StatusVersion::V2 => {
            let enabled = settings.secure_channel_enabled;
            json!({
                "authorizationScheme": signing::SCHEME,
                "keyDeliveryMethod": "http",
                "keyGuid": key_guid,
                "requiredClaimsHeaderPairs": ["isRoot"],
                "secureChannelEnabled": enabled,
                "version": "2.0",
                "authorizationRules": if enabled { settings.authorization_rules() } else { Value::Null },
            })
        }
    }
}

fn status_response(state: &State) -> Response {
    let settings = &state.settings;
    if settings.status_http_status != 0 {
        return Response::json(settings.status_http_status, &json!({"error": "injected status failure"}));
    }
    let body = if settings.malformed_status { MALFORMED_STATUS.to_owned() } else { status_document(state).to_string() };
    let content_type = settings.status_content_type.as_deref().unwrap_or(JSON);
    let mut response = Response::new(200, content_type, body);
    if !settings.no_host_date {
        response.headers.push(("x-ms-azure-host-date".to_owned(), rfc1123(wall_now().as_secs())));
    }
    response
}

fn acquire_response(state: &mut State, req: &Request) -> (Response, Option<String>) {
    let note = (req.body != ACQUIRE_BODY).then(|| {
        state.stats.acquire_body_mismatches += 1;
        format!("unexpected acquire body: {}", String::from_utf8_lossy(&req.body))
    });
    if state.settings.acquire_http_status != 0 {
        let status = state.settings.acquire_http_status;
        return (Response::json(status, &json!({"error": "injected acquire failure"})), note);
    }
    let (key, incarnation) = state.issue_key();
    let body = json!({
        "authorizationScheme": signing::SCHEME,
        "guid": key.guid,
        "issued": ISSUED,
        "key": key.key_hex,
        "incarnationId": incarnation,
    });
    (Response::json(200, &body), note)
}

fn attest_response(state: &mut State, guid: &str, verdict: Verdict) -> (Response, Option<String>) {
    if state.settings.attest_http_status != 0 {
        state.stats.attest_failures += 1;
        let status = state.settings.attest_http_status;
        let body = json!({"error": "injected attestation failure"});
        return (Response::json(status, &body), Some("injected attestation failure".to_owned()));
    }
    if verdict != Verdict::Valid {
        state.stats.attest_failures += 1;
        let why = format!("key attestation rejected: signature {verdict}");
        return (Response::json(401, &json!({"error": why})), Some(why));
    }
    state.current_key = Some(guid.to_owned());
    (Response::json(200, &json!({"guid": guid, "attested": true})), None)
}

/// `200` with an empty body (the body was recorded on arrival), or an injected `500`.
fn telemetry_response(state: &mut State) -> (Response, Option<String>) {
    if state.settings.telemetry_failures > 0 {
        state.settings.telemetry_failures -= 1;
        state.stats.telemetry_failures_injected += 1;
        let body = json!({"error": "injected telemetry failure"});
        return (Response::json(500, &body), Some("injected telemetry failure".to_owned()));
    }
    (Response::new(200, XML, Vec::new()), None)
}

/// A provisioning health report (the XML cloud-init and waagent post after provisioning).
/// Signed like any WireServer request; a report for another container or role instance
/// is refused with 400, as the host would.
fn health_response(state: &mut State, req: &Request, verdict: Verdict) -> (Response, Option<String>) {
    if state.settings.effective_mode(Endpoint::WireServer) == Mode::Enforce && verdict != Verdict::Valid {
        return (Response::json(401, &json!({"error": "unsigned or invalid signature"})), None);
    }
    let report = String::from_utf8_lossy(&req.body);
    let field = |tag: &str| xml_text(&report, tag).unwrap_or_default();
    if field("ContainerId") != CONTAINER_ID || field("InstanceId") != ROLE_INSTANCE {
        state.stats.rejected_health_reports += 1;
        let note = format!("health report for container {:?} instance {:?}", field("ContainerId"), field("InstanceId"));
        return (Response::json(400, &json!({"error": "unknown container or role instance"})), Some(note));
    }
    let health = field("State");
    let note = match health {
        "Ready" => {
            state.stats.ready_reports += 1;
            "health Ready".to_owned()
        }
        _ => {
            state.stats.not_ready_reports += 1;
            format!("health {health} {}: {}", field("SubStatus"), field("Description"))
        }
    };
    (Response::new(200, XML, Vec::new()), Some(note))
}

/// The text of the first `<tag>…</tag>` element (no attributes, no nesting: the health
/// report's leaf elements), entity references left as sent.
fn xml_text<'a>(doc: &'a str, tag: &str) -> Option<&'a str> {
    let start = doc.find(&format!("<{tag}>"))? + tag.len() + 2;
    let len = doc[start..].find(&format!("</{tag}>"))?;
    Some(doc[start..start + len].trim())
}

fn is_health_report(body: &[u8]) -> bool {
    body.windows(b"<Health".len()).any(|w| w == b"<Health")
}

/// `/machine` as WireServer clients spell it: waagent and cloud-init use `/machine/?comp=…`
/// for the goal state and `/machine?comp=health` for reports.
fn is_machine(path: &str) -> bool {
    path == "/machine" || path == "/machine/"
}

fn data_response(state: &State, shared: &Shared, endpoint: Endpoint, req: &Request, verdict: Verdict) -> Response {
    if state.settings.effective_mode(endpoint) == Mode::Enforce && verdict != Verdict::Valid {
        return Response::json(401, &json!({"error": "unsigned or invalid signature"}));
    }
    let reads = req.method == "GET" || req.method == "HEAD";
    let path = req.path();
    match endpoint {
        Endpoint::Imds if reads && path.starts_with("/metadata/instance") => imds_instance(path),
        Endpoint::Imds if reads && path.starts_with("/metadata/identity/oauth2/token") => imds_token(req),
        Endpoint::WireServer if reads && is_machine(path) && query_has(req, "comp", "goalstate") => {
            Response::new(200, XML, goal_state(&wireserver_base(shared, req)))
        }
        Endpoint::WireServer if reads && path.starts_with("/machine/") && query_has(req, "type", "sharedconfig") => {
            Response::new(200, XML, SHARED_CONFIG)
        }
        _ => echo(endpoint, req),
    }
}

/// Whether the query has `key=value` (compared case-insensitively, after percent-decoding).
fn query_has(req: &Request, key: &str, value: &str) -> bool {
    query_value(req, key).is_some_and(|v| v.eq_ignore_ascii_case(value))
}

fn query_value(req: &Request, key: &str) -> Option<String> {
    req.query()?.split('&').find_map(|piece| {
        let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
        percent_decode(k).eq_ignore_ascii_case(key).then(|| percent_decode(v))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%').then(|| bytes.get(i + 1..i + 3)).flatten().and_then(signing::decode_hex);
        match decoded {
            Some(byte) => {
                out.extend_from_slice(&byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Base URL of the WireServer as the agent reaches it, so the goal state's links point back
/// at this fake. A wildcard bind is replaced by the `Host` the agent used.
fn wireserver_base(shared: &Shared, req: &Request) -> String {
    let Some(addr) = shared.addrs.wireserver else {
        return "http://168.63.129.16".to_owned();
    };
    let host = if addr.ip().is_unspecified() {
        let header = req.header("host").map(String::from_utf8_lossy).unwrap_or_default();
        header.split(':').next().unwrap_or_default().to_owned()
    } else {
        addr.ip().to_string()
    };
    if addr.port() == 80 { format!("http://{host}") } else { format!("http://{host}:{}", addr.port()) }
}

fn goal_state(base: &str) -> String {
    let machine = format!("{base}/machine/{CONTAINER_ID}/{ROLE_INSTANCE}");
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<GoalState xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:noNamespaceSchemaLocation="goalstate10.xsd">
  <Version>2015-04-05</Version>
  <Incarnation>1</Incarnation>
  <Machine>
    <ExpectedState>Started</ExpectedState>
    <StopRolesDeadlineHint>300000</StopRolesDeadlineHint>
    <LBProbePorts>
      <Port>16001</Port>
    </LBProbePorts>
    <ExpectHealthReport>FALSE</ExpectHealthReport>
  </Machine>
  <Container>
    <ContainerId>{CONTAINER_ID}</ContainerId>
    <RoleInstanceList>
      <RoleInstance>
        <InstanceId>{ROLE_INSTANCE}</InstanceId>
        <State>Started</State>
        <Configuration>
          <HostingEnvironmentConfig>{machine}?comp=config&amp;type=hostingEnvironmentConfig&amp;incarnation=1</HostingEnvironmentConfig>
          <SharedConfig>{machine}?comp=config&amp;type=sharedConfig&amp;incarnation=1</SharedConfig>
          <ExtensionsConfig>{machine}?comp=config&amp;type=extensionsConfig&amp;incarnation=1</ExtensionsConfig>
          <FullConfig>{machine}?comp=config&amp;type=fullConfig&amp;incarnation=1</FullConfig>
          <Certificates>{machine}?comp=certificates&amp;incarnation=1</Certificates>
          <ConfigName>{ROLE_INSTANCE}.1.xml</ConfigName>
        </Configuration>
      </RoleInstance>
    </RoleInstanceList>
  </Container>
</GoalState>
"#
    )
}

const SHARED_CONFIG: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<SharedConfig version="1.0.0.0" goalStateIncarnation="1">
  <Deployment name="fake-deployment" guid="{3f2b6c1e-6a0d-4f4e-9b8a-1d2c3e4f5a6b}" incarnation="0" isNonCancellableTopologyChangeEnabled="false">
    <Service name="fake-service" guid="{00000000-0000-0000-0000-000000000000}" />
    <ServiceInstance name="fake-deployment.0" guid="{7d8e9f0a-1b2c-4d3e-8f4a-5b6c7d8e9f0a}" />
  </Deployment>
  <Incarnation number="1" instance="fake-deployment.fake-vm_IN_0" guid="{1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d}" />
  <Role guid="{9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d}" name="fake-vm" settleTimeSeconds="0" />
  <Instances>
    <Instance id="fake-deployment.fake-vm_IN_0" address="10.0.0.4">
      <FaultDomains randomId="0" updateId="0" updateCount="0" />
      <UpdateDomains randomId="0" updateId="0" updateCount="0" />
    </Instance>
  </Instances>
</SharedConfig>
"#;

fn imds_instance(path: &str) -> Response {
    let compute = json!({
        "azEnvironment": "AzurePublicCloud",
        "location": "eastus",
        "name": VM_NAME,
        "offer": "debian-13",
        "osProfile": {
            "adminUsername": ADMIN_USER,
            "computerName": VM_NAME,
            "disablePasswordAuthentication": "true",
        },
        "osType": "Linux",
        "publicKeys": [{"keyData": ADMIN_SSH_KEY, "path": format!("/home/{ADMIN_USER}/.ssh/authorized_keys")}],
        "publisher": "Debian",
        "resourceGroupName": "fake-rg",
        "resourceId": format!("/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/fake-rg/providers/Microsoft.Compute/virtualMachines/{VM_NAME}"),
        "sku": "13-gen2",
        "subscriptionId": SUBSCRIPTION_ID,
        "tags": "",
        "version": "0.20251117.2299",
        "vmId": VM_ID,
        "vmSize": "Standard_D2s_v3",
        "zone": "1",
        "tenantName": DEPLOYMENT,
    });
    let network = json!({
        "interface": [{
            "ipv4": {
                "ipAddress": [{"privateIpAddress": "10.0.0.4", "publicIpAddress": ""}],
                "subnet": [{"address": "10.0.0.0", "prefix": "24"}],
            },
            "ipv6": {"ipAddress": []},
            "macAddress": "000D3A1B2C3D",
        }],
    });
    let body = match path.trim_end_matches('/') {
        "/metadata/instance/compute" => compute,
        "/metadata/instance/network" => network,
        _ => json!({"compute": compute, "network": network}),
    };
    Response::json(200, &body)
}

/// The OVF environment the platform puts on the provisioning media (`ovf-env.xml`), for
/// the same VM the IMDS document describes. `ProvisionGuestProxyAgent` is the platform
/// setting that makes cloud-init wait for `azure-proxy-agent --status --wait` before it
/// talks to IMDS or WireServer.
pub(crate) fn ovf_environment(provision_guest_proxy_agent: bool) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<ns0:Environment xmlns:ns0="http://schemas.dmtf.org/ovf/environment/1" xmlns:ns1="http://schemas.microsoft.com/windowsazure" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
  <ns1:ProvisioningSection>
    <ns1:Version>1.0</ns1:Version>
    <ns1:LinuxProvisioningConfigurationSet>
      <ns1:ConfigurationSetType>LinuxProvisioningConfiguration</ns1:ConfigurationSetType>
      <ns1:UserName>{ADMIN_USER}</ns1:UserName>
      <ns1:DisableSshPasswordAuthentication>true</ns1:DisableSshPasswordAuthentication>
      <ns1:SSH>
        <ns1:PublicKeys>
          <ns1:PublicKey>
            <ns1:Path>/home/{ADMIN_USER}/.ssh/authorized_keys</ns1:Path>
            <ns1:Value>{ADMIN_SSH_KEY}</ns1:Value>
          </ns1:PublicKey>
        </ns1:PublicKeys>
      </ns1:SSH>
      <ns1:HostName>{VM_NAME}</ns1:HostName>
    </ns1:LinuxProvisioningConfigurationSet>
  </ns1:ProvisioningSection>
  <ns1:PlatformSettingsSection>
    <ns1:Version>1.0</ns1:Version>
    <ns1:PlatformSettings>
      <ns1:KmsServerHostname>kms.core.windows.net</ns1:KmsServerHostname>
      <ns1:ProvisionGuestAgent>false</ns1:ProvisionGuestAgent>
      <ns1:GuestAgentPackageName i:nil="true" />
      <ns1:RetainWindowsPEPassInUnattend>true</ns1:RetainWindowsPEPassInUnattend>
      <ns1:RetainOfflineServicingPassInUnattend>true</ns1:RetainOfflineServicingPassInUnattend>
      <ns1:PreprovisionedVm>false</ns1:PreprovisionedVm>
      <ns1:EnableTrustedImageIdentifier>false</ns1:EnableTrustedImageIdentifier>
      <ns1:ProvisionGuestProxyAgent>{provision_guest_proxy_agent}</ns1:ProvisionGuestProxyAgent>
    </ns1:PlatformSettings>
  </ns1:PlatformSettingsSection>
</ns0:Environment>
"#
    )
}

fn imds_token(req: &Request) -> Response {
    let resource = query_value(req, "resource").unwrap_or_else(|| "https://management.azure.com/".to_owned());
    Response::json(
        200,
        &json!({
            "access_token": "eyJ0eXAi.fake.token",
            "expires_in": "3599",
            "token_type": "Bearer",
            "resource": resource,
        }),
    )
}

fn echo(endpoint: Endpoint, req: &Request) -> Response {
    let headers: Vec<Value> =
        req.headers.iter().map(|(n, v)| json!([String::from_utf8_lossy(n), String::from_utf8_lossy(v)])).collect();
    Response::json(
        200,
        &json!({
            "endpoint": endpoint.as_str(),
            "method": req.method,
            "target": req.target,
            "headers": headers,
            "body": super::state::body_text(&req.body),
        }),
    )
}

/// Handles one request on the control listener.
pub(crate) fn handle_control(shared: &Shared, req: &Request) -> Response {
    let not_found = || Response::json(404, &json!({"error": "unknown control path"}));
    match (req.method.as_str(), req.path()) {
        ("GET", "/requests") => {
            let state = shared.lock();
            let records: Vec<Value> = state.records.iter().map(Record::to_json).collect();
            Response::json(200, &Value::Array(records))
        }
        ("POST", "/reset-requests") => {
            let mut state = shared.lock();
            let cleared = state.records.len();
            state.records.clear();
            Response::json(200, &json!({"cleared": cleared}))
        }
        ("GET", "/stats") => Response::json(200, &shared.lock().stats_json()),
        ("GET", "/keys") => Response::json(200, &shared.lock().keys_json()),
        ("GET", "/control") => Response::json(200, &shared.lock().settings.to_json()),
        ("POST", "/control") => control(shared, req),
        _ => not_found(),
    }
}

fn control(shared: &Shared, req: &Request) -> Response {
    let patch: Value = match serde_json::from_slice(&req.body) {
        Ok(patch) => patch,
        Err(e) => return Response::json(400, &json!({"error": format!("invalid JSON: {e}")})),
    };
    let (settings, down) = {
        let mut state = shared.lock();
        match state.settings.apply(&patch) {
            Ok(actions) => {
                if actions.forget_attested_key {
                    state.current_key = None;
                }
            }
            Err(e) => return Response::json(400, &json!({"error": e})),
        }
        (state.settings.to_json(), state.settings.down)
    };
    if down {
        // Outside the state lock: connection threads take the state lock, never the reverse.
        shared.drop_endpoint_connections();
    }
    Response::json(200, &settings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_host::state::Settings;

    fn request(method: &str, target: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            method: method.to_owned(),
            target: target.to_owned(),
            version: "HTTP/1.1".to_owned(),
            headers: headers.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect(),
            body: Vec::new(),
        }
    }

    #[test]
    fn formats_rfc1123_dates() {
        assert_eq!(rfc1123(1_745_409_600), "Wed, 23 Apr 2025 12:00:00 GMT");
        assert_eq!(rfc1123(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(rfc1123(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(rfc1123(4_107_542_399), "Sun, 28 Feb 2100 23:59:59 GMT");
    }

    #[test]
    fn routes_secure_channel_only_on_wireserver() {
        let status = request("GET", "/secure-channel/status", &[]);
        assert_eq!(route(Endpoint::WireServer, &status), Route::Status);
        assert_eq!(route(Endpoint::Imds, &status), Route::Data);
        let attest = request("POST", "/secure-channel/key/abc/key-attestation", &[]);
        assert_eq!(route(Endpoint::WireServer, &attest), Route::Attest("abc".to_owned()));
        let nested = request("POST", "/secure-channel/key/a/b/key-attestation", &[]);
        assert_eq!(route(Endpoint::WireServer, &nested), Route::Data);
        let telemetry = request("POST", "/machine/?comp=TelemetryData", &[]);
        assert_eq!(route(Endpoint::WireServer, &telemetry), Route::Telemetry);
        assert_eq!(route(Endpoint::Imds, &telemetry), Route::Data);
        let extra_query = request("POST", "/machine/?comp=telemetrydata&x=1", &[]);
        assert_eq!(route(Endpoint::WireServer, &extra_query), Route::Data, "the exemption needs the exact target");
    }

    #[test]
    fn version_1_state_follows_modes() {
        let mut state = State::new(Settings::new(Mode::Enforce, StatusVersion::V1, None));
        assert_eq!(status_document(&state)["secureChannelState"], "WireserverAndImds");
        state.settings.imds_mode = Mode::Audit;
        assert_eq!(status_document(&state)["secureChannelState"], "Wireserver");
        state.settings.wireserver_mode = Mode::Audit;
        assert_eq!(status_document(&state)["secureChannelState"], "Disabled");
    }

    #[test]
    fn version_2_switch_off_drops_rules() {
        let mut state = State::new(Settings::new(Mode::Audit, StatusVersion::V2, None));
        let doc = status_document(&state);
        assert_eq!(doc["secureChannelEnabled"], true);
        assert_eq!(doc["authorizationRules"]["wireserver"]["mode"], "audit");
        assert_eq!(doc["keyGuid"], Value::Null);
        state.settings.secure_channel_enabled = false;
        let doc = status_document(&state);
        assert_eq!(doc["secureChannelEnabled"], false);
        assert_eq!(doc["authorizationRules"], Value::Null);
    }

    #[test]
    fn signature_check_requires_issued_and_current_key() {
        let mut state = State::new(Settings::new(Mode::Enforce, StatusVersion::V2, None));
        let (key, _) = state.issue_key();
        let mut req = request("GET", "/machine?comp=goalstate", &[("host", "168.63.129.16")]);
        assert_eq!(check_signature(&state, &req, None, true).0, Verdict::Missing);

        let sts = signing::string_to_sign(&req.method, &req.body, &req.headers, &req.target);
        let value = signing::authorization_value(&key.guid, &key.key, &sts);
        req.headers.push((b"x-ms-azure-host-authorization".to_vec(), value.into_bytes()));
        assert_eq!(check_signature(&state, &req, None, true).0, Verdict::Invalid("not-current-key"));
        state.current_key = Some(key.guid.clone());
        let (verdict, guid) = check_signature(&state, &req, None, true);
        assert_eq!(verdict, Verdict::Valid);
        assert_eq!(guid.as_deref(), Some(key.guid.as_str()));

        req.headers.push((b"x-extra".to_vec(), b"added after signing".to_vec()));
        assert_eq!(check_signature(&state, &req, None, true).0, Verdict::Invalid("signature-mismatch"));
        assert_eq!(check_signature(&state, &req, Some("other"), false).0, Verdict::Invalid("guid-mismatch"));
    }

    #[test]
    fn decodes_query_values() {
        let req = request("GET", "/t?api-version=1&resource=https%3A%2F%2Fvault.azure.net", &[]);
        assert_eq!(query_value(&req, "resource").as_deref(), Some("https://vault.azure.net"));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
