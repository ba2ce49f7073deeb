// SPDX-License-Identifier: MIT
//! The aggregate status document (MSP §6.2), written to `<logDir>/status.json` and served on
//! `/gpa-aggregated-status`.
//!
//! Heads up! Read `../shared/spec/msp-protocol.md` §6.1–§6.3 first. The field names, their
//! order and the value shapes are the wire contract (the MSP FAQ shows the document in the VM
//! instance view and E2E tooling reads `.timestamp` and
//! `.proxyAgentStatus.keyLatchStatus.states.secureChannelState`). Where this project differs,
//! on purpose (§11 item 10): every component reports its real state — the telemetry logger is
//! `STOPPED` with [`ModuleStatus::TELEMETRY_NOT_CONFIGURED`] instead of a never-set `UNKNOWN`.
//!
//! Rendering is serde-json-core into a caller-provided buffer of [`STATUS_JSON_MAX_BYTES`].
//! The part without summaries always fits (see the size argument at the constant); when the
//! summaries do not, fewer are rendered — the lowest counts are left out, the same number from
//! each list — and the document is never truncated.

use core::fmt;
use core::fmt::Write as _;

use serde::ser::{SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};

use super::summary::Summaries;
use super::summary::{SummaryKind, SummaryTable, SummaryView, status_text};
use crate::calendar::{TIMESTAMP_BYTES, format_timestamp_millis};
use crate::msp::key_keeper::KeyKeeper;

/// Messages longer than this are cut (on a character boundary) and end in `...` (MSP §6.1).
pub const MESSAGE_REPORT_MAX_BYTES: usize = 1024;
/// Size of the buffer a document is rendered into (allocated once, on the heap).
///
/// Without summaries a document is at most 42 KiB even in the worst case (a test renders
/// it): five messages of 1,027 bytes that escape at most 6× (a control character becomes
/// `\u00XX`) are 31 KiB; the `states` values (a 96-byte state string, a 64-byte guid, three
/// rule ids of at most 512 bytes, also escaped) add under 11 KiB; the rest is fixed text. The
/// remaining 86 KiB or more hold the summaries: typically 300–600 bytes each, so both full
/// tables (2 × 64) fit unless callers' command lines and paths are unusually long.
pub const STATUS_JSON_MAX_BYTES: usize = 128 * 1024;

/// A component's state (MSP §6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleState {
    /// Not started yet (the initial state).
    Unknown,
    /// Working.
    Running,
    /// Stopped, failed to start, or not configured.
    Stopped,
}

impl ModuleState {
    /// The report spelling: `UNKNOWN`, `RUNNING`, `STOPPED`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "UNKNOWN",
            Self::Running => "RUNNING",
            Self::Stopped => "STOPPED",
        }
    }
}

/// A component's state and its current message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleStatus<'a> {
    /// State.
    pub state: ModuleState,
    /// Message (cut to [`MESSAGE_REPORT_MAX_BYTES`] + `...` when rendered).
    pub message: &'a str,
}

impl<'a> ModuleStatus<'a> {
    /// Every component's status before it reports (MSP §6.1).
    pub const INITIAL: ModuleStatus<'static> = ModuleStatus { state: ModuleState::Unknown, message: "Status unknown." };
    /// The telemetry logger of this agent: upload is off unless configured (MSP §11 item 10).
    pub const TELEMETRY_NOT_CONFIGURED: ModuleStatus<'static> =
        ModuleStatus { state: ModuleState::Stopped, message: "Telemetry upload is not configured." };

    /// `RUNNING` with `message`.
    pub const fn running(message: &'a str) -> Self {
        Self { state: ModuleState::Running, message }
    }

    /// `STOPPED` with `message`.
    pub const fn stopped(message: &'a str) -> Self {
        Self { state: ModuleState::Stopped, message }
    }
}

/// `keyLatchStatus.states` (MSP §6.2). Every value is reported as a JSON string (the
/// reference's `states` is a string map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyLatchStates<'a> {
    /// `secureChannelState`: the derived state string (§1.4), `Unknown` before the first poll.
    pub secure_channel_state: &'a str,
    /// `keyGuid`: only when a key is held.
    pub key_guid: Option<&'a str>,
    /// `wireServerRuleId`: raw id, empty before any rules.
    pub wire_server_rule_id: &'a str,
    /// `imdsRuleId`.
    pub imds_rule_id: &'a str,
    /// `hostGARuleId`.
    pub host_ga_rule_id: &'a str,
    /// `keyIncarnationId`: only when the held key has one.
    pub key_incarnation_id: Option<u32>,
    /// `hostClockSkewSeconds` (this project's addition, omitted when `None`): host time minus
    /// local time at the last host clock sync (§2.9), for `guest-proxy-agent doctor`.
    pub host_clock_skew_secs: Option<i64>,
    /// `rulesRefused` (this project's addition, omitted when none): the endpoints (imds,
    /// wireserver, hostga) whose rule set the agent could not take, and why; those endpoints
    /// allow nothing until a document it can take arrives.
    pub rules_refused: [bool; 3],
}

struct RulesRefused([bool; 3]);

impl Serialize for RulesRefused {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for RulesRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = ["imds", "wireserver", "hostga"];
        let mut first = true;
        for (name, refused) in names.iter().zip(self.0) {
            if refused {
                f.write_str(if first { "" } else { "," })?;
                f.write_str(name)?;
                first = false;
            }
        }
        write!(f, ": {}", crate::msp::status_doc::RULES_REFUSED_REASON)
    }
}

impl<'a> KeyLatchStates<'a> {
    /// The states as the key keeper knows them now.
    pub fn from_keeper(keeper: &'a KeyKeeper) -> Self {
        let summary = keeper.summary();
        let key = keeper.key_doc();
        Self {
            secure_channel_state: keeper.state(),
            key_guid: key.map(|k| k.guid.as_str()),
            wire_server_rule_id: summary.map_or("", |s| s.ws_rule_id.as_str()),
            imds_rule_id: summary.map_or("", |s| s.imds_rule_id.as_str()),
            host_ga_rule_id: summary.map_or("", |s| s.hgap_rule_id.as_str()),
            key_incarnation_id: key.and_then(|k| k.incarnation_id),
            host_clock_skew_secs: None,
            rules_refused: keeper.document().map_or([false; 3], |d| d.refused_rules),
        }
    }
}

/// Everything a status document is made of; the event loop fills it from the live components.
#[derive(Clone, Copy, Debug)]
pub struct StatusInputs<'a> {
    /// `timestamp`: when the document was made (Unix ms, rendered UTC).
    pub timestamp_unix_ms: u64,
    /// `version`: the agent's version ([`crate::VERSION`]).
    pub version: &'a str,
    /// `monitorStatus`: the status writer (see `StatusWriter::monitor`).
    pub monitor: ModuleStatus<'a>,
    /// `keyLatchStatus`: the key keeper.
    pub key_latch: ModuleStatus<'a>,
    /// `keyLatchStatus.states` (omitted when `None`).
    pub key_latch_states: Option<KeyLatchStates<'a>>,
    /// `ebpfProgramStatus`: the redirector.
    pub ebpf_program: ModuleStatus<'a>,
    /// `proxyListenerStatus`: the listener.
    pub proxy_listener: ModuleStatus<'a>,
    /// `telemetryLoggerStatus`.
    pub telemetry_logger: ModuleStatus<'a>,
    /// `proxyConnectionsCount`: HTTP requests handled since start.
    pub proxy_connections_count: u64,
    /// The connection summaries.
    pub summaries: &'a Summaries,
}

/// Overall status: `SUCCESS` only when the key latch, the eBPF programs and the listener are
/// all running (MSP §6.1), else `ERROR`.
pub fn overall(inputs: &StatusInputs<'_>) -> &'static str {
    let running =
        [inputs.key_latch, inputs.ebpf_program, inputs.proxy_listener].iter().all(|m| m.state == ModuleState::Running);
    if running { "SUCCESS" } else { "ERROR" }
}

/// A rendered document.
#[derive(Debug)]
pub struct Rendered<'b> {
    /// The JSON text (valid UTF-8).
    pub json: &'b [u8],
    /// Summaries left out for lack of room (0 normally).
    pub summaries_omitted: usize,
}

/// Why a document could not be rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenderError {
    /// Even without summaries the document does not fit (the buffer is smaller than
    /// [`STATUS_JSON_MAX_BYTES`]).
    BufferTooSmall,
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("status document does not fit its buffer")
    }
}

/// A zeroed buffer of [`STATUS_JSON_MAX_BYTES`] (allocate once, reuse).
pub fn new_buffer() -> Box<[u8]> {
    vec![0; STATUS_JSON_MAX_BYTES].into_boxed_slice()
}

/// Renders the document into `buf`; see the module docs for what happens when it is too
/// small. Summary counts are taken at the document's timestamp (aged-out buckets are never
/// reported, whether or not `Summaries::age` ran).
pub fn render<'b>(inputs: &StatusInputs<'_>, buf: &'b mut [u8]) -> Result<Rendered<'b>, RenderError> {
    let now_s = inputs.timestamp_unix_ms / 1000;
    let lens = [SummaryKind::ProxyConnection, SummaryKind::FailedAuthenticate]
        .map(|k| inputs.summaries.table(k).ranked(now_s).len());
    let all = lens[0].max(lens[1]);
    let attempt =
        |limit: usize, buf: &mut [u8]| serde_json_core::to_slice(&Document { inputs, now_s, limit }, buf).ok();
    let (limit, len) = match attempt(all, buf) {
        Some(len) => (all, len),
        None => {
            // Largest per-list limit that fits: `lo` always fits, `hi` never does.
            let mut lo = 0;
            attempt(0, buf).ok_or(RenderError::BufferTooSmall)?;
            let mut hi = all;
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if attempt(mid, buf).is_some() {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            (lo, attempt(lo, buf).ok_or(RenderError::BufferTooSmall)?)
        }
    };
    let omitted = lens.iter().map(|n| n.saturating_sub(limit)).sum();
    Ok(Rendered { json: &buf[..len], summaries_omitted: omitted })
}

/// The document with a per-list summary limit.
struct Document<'i, 'a> {
    inputs: &'i StatusInputs<'a>,
    now_s: u64,
    limit: usize,
}

impl Serialize for Document<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let i = self.inputs;
        let timestamp: heapless::String<TIMESTAMP_BYTES> = format_timestamp_millis(i.timestamp_unix_ms);
        let mut doc = s.serialize_struct("Document", 4)?;
        doc.serialize_field("timestamp", timestamp.as_str())?;
        doc.serialize_field("proxyAgentStatus", &AgentStatus(i))?;
        let table = |kind| SummaryList { table: i.summaries.table(kind), now_s: self.now_s, limit: self.limit };
        doc.serialize_field("proxyConnectionSummary", &table(SummaryKind::ProxyConnection))?;
        doc.serialize_field("failedAuthenticateSummary", &table(SummaryKind::FailedAuthenticate))?;
        doc.end()
    }
}

struct AgentStatus<'i, 'a>(&'i StatusInputs<'a>);

impl Serialize for AgentStatus<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let i = self.0;
        let mut st = s.serialize_struct("ProxyAgentStatus", 8)?;
        st.serialize_field("version", i.version)?;
        st.serialize_field("status", overall(i))?;
        st.serialize_field("monitorStatus", &Module { status: i.monitor, states: None })?;
        st.serialize_field("keyLatchStatus", &Module { status: i.key_latch, states: i.key_latch_states.as_ref() })?;
        st.serialize_field("ebpfProgramStatus", &Module { status: i.ebpf_program, states: None })?;
        st.serialize_field("proxyListenerStatus", &Module { status: i.proxy_listener, states: None })?;
        st.serialize_field("telemetryLoggerStatus", &Module { status: i.telemetry_logger, states: None })?;
        st.serialize_field("proxyConnectionsCount", &i.proxy_connections_count)?;
        st.end()
    }
}

struct Module<'m, 'a> {
    status: ModuleStatus<'a>,
    states: Option<&'m KeyLatchStates<'a>>,
}

impl Serialize for Module<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Module", 3)?;
        st.serialize_field("status", self.status.state.as_str())?;
        st.serialize_field("message", &Message(self.status.message))?;
        if let Some(states) = self.states {
            st.serialize_field("states", &States(states))?;
        }
        st.end()
    }
}

/// A message as reported: cut to [`MESSAGE_REPORT_MAX_BYTES`] on a character boundary,
/// followed by `...` when cut.
struct Message<'a>(&'a str);

impl Serialize for Message<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.len() <= MESSAGE_REPORT_MAX_BYTES {
            return s.serialize_str(self.0);
        }
        s.collect_str(&Cut(cut_at_char_boundary(self.0, MESSAGE_REPORT_MAX_BYTES)))
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub fn cut_at_char_boundary(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

struct Cut<'a>(&'a str);

impl fmt::Display for Cut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)?;
        f.write_str("...")
    }
}

struct States<'m, 'a>(&'m KeyLatchStates<'a>);

impl Serialize for States<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let k = self.0;
        let mut st = s.serialize_struct("States", 8)?;
        st.serialize_field("secureChannelState", k.secure_channel_state)?;
        if let Some(guid) = k.key_guid {
            st.serialize_field("keyGuid", guid)?;
        }
        st.serialize_field("wireServerRuleId", k.wire_server_rule_id)?;
        st.serialize_field("imdsRuleId", k.imds_rule_id)?;
        st.serialize_field("hostGARuleId", k.host_ga_rule_id)?;
        if let Some(inc) = k.key_incarnation_id {
            st.serialize_field("keyIncarnationId", &Decimal(i128::from(inc)))?;
        }
        if let Some(skew) = k.host_clock_skew_secs {
            st.serialize_field("hostClockSkewSeconds", &Decimal(i128::from(skew)))?;
        }
        if k.rules_refused.contains(&true) {
            st.serialize_field("rulesRefused", &RulesRefused(k.rules_refused))?;
        }
        st.end()
    }
}

/// A number reported as a JSON string.
struct Decimal(i128);

impl Serialize for Decimal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut text = heapless::String::<40>::new();
        // 40 bytes hold any i128.
        write!(text, "{}", self.0).ok();
        s.serialize_str(&text)
    }
}

struct SummaryList<'t> {
    table: &'t SummaryTable,
    now_s: u64,
    limit: usize,
}

impl Serialize for SummaryList<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ranked = self.table.ranked(self.now_s);
        let n = ranked.len().min(self.limit);
        let mut seq = s.serialize_seq(Some(n))?;
        for view in ranked.take(n) {
            seq.serialize_element(&Summary(view))?;
        }
        seq.end()
    }
}

/// `Summary` (MSP §6.2), fields in the documented order.
struct Summary<'a>(SummaryView<'a>);

impl Serialize for Summary<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = &self.0;
        let mut st = s.serialize_struct("Summary", 8)?;
        st.serialize_field("userName", v.user_name)?;
        st.serialize_field("ip", &Ip(v.ip))?;
        st.serialize_field("port", &v.port)?;
        st.serialize_field("processCmdLine", v.process_cmd_line)?;
        st.serialize_field("responseStatus", &Collected(status_text(v.response_status)))?;
        st.serialize_field("count", &v.count)?;
        st.serialize_field("userGroups", &v.user_groups)?;
        st.serialize_field("processFullPath", &v.process_full_path)?;
        st.end()
    }
}

/// The upstream IP as a string, `None` when unknown (MSP §6.2).
struct Ip(Option<std::net::Ipv4Addr>);

impl Serialize for Ip {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(ip) => s.collect_str(&ip),
            None => s.serialize_str("None"),
        }
    }
}

struct Collected<T>(T);

impl<T: fmt::Display> Serialize for Collected<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// Test fixture: a rendered document of a healthy agent (key latched, redirector attached)
/// with `listener` as `proxyListenerStatus`, made at `ts_ms` with host clock skew `skew`.
#[cfg(test)]
pub(crate) fn sample_json(listener: ModuleStatus<'_>, ts_ms: u64, skew: Option<i64>) -> Vec<u8> {
    let summaries = Summaries::new();
    let inputs = StatusInputs {
        timestamp_unix_ms: ts_ms,
        version: "0.1.0",
        monitor: ModuleStatus::running("Proxy agent status is running."),
        key_latch: ModuleStatus::running("Successfully attest the key and ready to use. - 12"),
        key_latch_states: Some(KeyLatchStates {
            secure_channel_state: "WireServer Enforce - IMDS Enforce - HostGA Enforce",
            key_guid: Some("g"),
            wire_server_rule_id: "",
            imds_rule_id: "",
            host_ga_rule_id: "",
            key_incarnation_id: None,
            host_clock_skew_secs: skew,
            rules_refused: [false; 3],
        }),
        ebpf_program: ModuleStatus::running("Started Redirector with eBPF maps - 8"),
        proxy_listener: listener,
        telemetry_logger: ModuleStatus::TELEMETRY_NOT_CONFIGURED,
        proxy_connections_count: 0,
        summaries: &summaries,
    };
    let mut buf = new_buffer();
    render(&inputs, &mut buf).unwrap().json.to_vec()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::identity::Name;
    use crate::status::summary::SummaryRecord;

    /// 2026-07-22T10:11:12.345 UTC.
    const TS_MS: u64 = 1_784_715_072_345;

    fn inputs(summaries: &Summaries) -> StatusInputs<'_> {
        StatusInputs {
            timestamp_unix_ms: TS_MS,
            version: "0.1.0",
            monitor: ModuleStatus::running(
                "Aggregate status written to status file: /var/log/guest-proxy-agent/status.json",
            ),
            key_latch: ModuleStatus::running("Successfully attest the key and ready to use. - 12"),
            key_latch_states: Some(KeyLatchStates {
                secure_channel_state: "WireServer Enforce - IMDS Enforce - HostGA Enforce",
                key_guid: Some("9d1ab8c2-3f2e-4b6f-a1c0-5e8d7f6a4b3c"),
                wire_server_rule_id: "ws-rules-1",
                imds_rule_id: "imds-rules-1",
                host_ga_rule_id: "ws-rules-1",
                key_incarnation_id: Some(3),
                host_clock_skew_secs: None,
                rules_refused: [false; 3],
            }),
            ebpf_program: ModuleStatus::running("Started Redirector with eBPF maps - 8"),
            proxy_listener: ModuleStatus::running("Started proxy listener, ready to accept request - 2"),
            telemetry_logger: ModuleStatus::TELEMETRY_NOT_CONFIGURED,
            proxy_connections_count: 42,
            summaries,
        }
    }

    fn sample_summaries() -> Summaries {
        let mut s = Summaries::new();
        let groups = [Name::try_from("root").unwrap()];
        let ok = SummaryRecord {
            user_name: "root",
            user_groups: Some(&groups),
            client_ip: Ipv4Addr::LOCALHOST,
            ip: Some(Ipv4Addr::new(169, 254, 169, 254)),
            port: 80,
            process_full_path: Some(b"/usr/bin/curl"),
            process_cmd_line: b"curl -H Metadata:true http://169.254.169.254/metadata/instance",
            response_status: 200,
        };
        let now = TS_MS / 1000;
        s.record(SummaryKind::ProxyConnection, &ok, now - 1000);
        s.record(SummaryKind::ProxyConnection, &ok, now);
        let misdirected = SummaryRecord {
            user_name: "empty",
            user_groups: None,
            ip: None,
            port: 0,
            process_full_path: None,
            process_cmd_line: b"empty",
            response_status: 421,
            ..ok
        };
        s.record(SummaryKind::FailedAuthenticate, &misdirected, now);
        s
    }

    fn render_string(inputs: &StatusInputs<'_>) -> String {
        let mut buf = new_buffer();
        let r = render(inputs, &mut buf).unwrap();
        String::from_utf8(r.json.to_vec()).unwrap()
    }

    #[test]
    fn golden_document_has_the_msp_field_names_order_and_shapes() {
        let summaries = sample_summaries();
        let got = render_string(&inputs(&summaries));
        let want = concat!(
            r#"{"timestamp":"2026-07-22T10:11:12.345","#,
            r#""proxyAgentStatus":{"version":"0.1.0","status":"SUCCESS","#,
            r#""monitorStatus":{"status":"RUNNING","message":"Aggregate status written to status file: /var/log/guest-proxy-agent/status.json"},"#,
            r#""keyLatchStatus":{"status":"RUNNING","message":"Successfully attest the key and ready to use. - 12","#,
            r#""states":{"secureChannelState":"WireServer Enforce - IMDS Enforce - HostGA Enforce","#,
            r#""keyGuid":"9d1ab8c2-3f2e-4b6f-a1c0-5e8d7f6a4b3c","wireServerRuleId":"ws-rules-1","imdsRuleId":"imds-rules-1","#,
            r#""hostGARuleId":"ws-rules-1","keyIncarnationId":"3"}},"#,
            r#""ebpfProgramStatus":{"status":"RUNNING","message":"Started Redirector with eBPF maps - 8"},"#,
            r#""proxyListenerStatus":{"status":"RUNNING","message":"Started proxy listener, ready to accept request - 2"},"#,
            r#""telemetryLoggerStatus":{"status":"STOPPED","message":"Telemetry upload is not configured."},"#,
            r#""proxyConnectionsCount":42},"#,
            r#""proxyConnectionSummary":[{"userName":"root","ip":"169.254.169.254","port":80,"#,
            r#""processCmdLine":"curl -H Metadata:true http://169.254.169.254/metadata/instance","#,
            r#""responseStatus":"200 OK","count":2,"userGroups":["root"],"processFullPath":"/usr/bin/curl"}],"#,
            r#""failedAuthenticateSummary":[{"userName":"empty","ip":"None","port":0,"processCmdLine":"empty","#,
            r#""responseStatus":"421 Misdirected Request","count":1,"userGroups":null,"processFullPath":null}]}"#,
        );
        assert_eq!(got, want);
    }

    #[test]
    fn optional_states_are_omitted_before_a_key_is_held() {
        let summaries = Summaries::new();
        let mut i = inputs(&summaries);
        i.key_latch_states = Some(blank_states());
        let got = render_string(&i);
        assert!(
            got.contains(
                r#""states":{"secureChannelState":"Unknown","wireServerRuleId":"","imdsRuleId":"","hostGARuleId":""}}"#
            ),
            "{got}"
        );
        assert!(got.ends_with(r#""proxyConnectionSummary":[],"failedAuthenticateSummary":[]}"#));
        // No states at all: the key is left out.
        i.key_latch_states = None;
        let got = render_string(&i);
        assert!(got.contains(
            r#""keyLatchStatus":{"status":"RUNNING","message":"Successfully attest the key and ready to use. - 12"},"#
        ));
        // The recorded skew, when given, is reported as a string.
        i.key_latch_states = Some(KeyLatchStates { host_clock_skew_secs: Some(-3), ..blank_states() });
        assert!(render_string(&i).contains(r#""hostGARuleId":"","hostClockSkewSeconds":"-3"}"#));
    }

    fn blank_states() -> KeyLatchStates<'static> {
        KeyLatchStates {
            secure_channel_state: "Unknown",
            key_guid: None,
            wire_server_rule_id: "",
            imds_rule_id: "",
            host_ga_rule_id: "",
            key_incarnation_id: None,
            host_clock_skew_secs: None,
            rules_refused: [false; 3],
        }
    }

    #[test]
    fn overall_is_success_only_when_key_latch_ebpf_and_listener_run() {
        let summaries = Summaries::new();
        let base = inputs(&summaries);
        assert_eq!(overall(&base), "SUCCESS");
        // Monitor and telemetry do not count.
        let i = StatusInputs { telemetry_logger: ModuleStatus::INITIAL, monitor: ModuleStatus::stopped("x"), ..base };
        assert_eq!(overall(&i), "SUCCESS");
        for state in [ModuleState::Unknown, ModuleState::Stopped] {
            let m = ModuleStatus { state, message: "m" };
            assert_eq!(overall(&StatusInputs { key_latch: m, ..base }), "ERROR");
            assert_eq!(overall(&StatusInputs { ebpf_program: m, ..base }), "ERROR");
            assert_eq!(overall(&StatusInputs { proxy_listener: m, ..base }), "ERROR");
        }
        let stopped = StatusInputs { proxy_listener: ModuleStatus::stopped("Failed to bind"), ..base };
        assert!(render_string(&stopped).contains(r#""status":"ERROR","#));
    }

    #[test]
    fn messages_are_cut_at_1024_bytes_on_a_char_boundary() {
        let summaries = Summaries::new();
        // 1023 ASCII bytes then a 3-byte character straddling the limit.
        let long = format!("{}€tail", "a".repeat(1023));
        let exact = "b".repeat(1024);
        let i = StatusInputs {
            key_latch: ModuleStatus::running(&long),
            ebpf_program: ModuleStatus::running(&exact),
            ..inputs(&summaries)
        };
        let got = render_string(&i);
        assert!(got.contains(&format!(r#""message":"{}...""#, "a".repeat(1023))), "cut before the euro sign");
        assert!(got.contains(&format!(r#""message":"{exact}""#)), "exactly 1024 bytes is not cut");
        assert_eq!(cut_at_char_boundary("aé", 2), "a");
        assert_eq!(cut_at_char_boundary("aé", 3), "aé");
    }

    #[test]
    fn messages_are_escaped() {
        let summaries = Summaries::new();
        let i = StatusInputs { key_latch: ModuleStatus::running("a\"b\\c\nd\u{1}"), ..inputs(&summaries) };
        assert!(render_string(&i).contains(r#""message":"a\"b\\c\nd\u0001""#));
    }

    #[test]
    fn a_small_buffer_renders_fewer_summaries_never_a_truncated_document() {
        let mut summaries = Summaries::new();
        let now = TS_MS / 1000;
        let users: Vec<String> = (0..20).map(|i| format!("user{i:02}")).collect();
        for (i, u) in users.iter().enumerate() {
            let r = SummaryRecord {
                user_name: u,
                user_groups: None,
                client_ip: Ipv4Addr::LOCALHOST,
                ip: Some(Ipv4Addr::new(168, 63, 129, 16)),
                port: 80,
                process_full_path: None,
                process_cmd_line: b"x",
                response_status: 200,
            };
            // user00 gets 20 requests, user19 one: the smallest are dropped first.
            for _ in 0..(20 - i) {
                summaries.record(SummaryKind::ProxyConnection, &r, now);
            }
        }
        let i = inputs(&summaries);
        let full = render_string(&i);
        let mut small = vec![0u8; full.len() - 1];
        let r = render(&i, &mut small).unwrap();
        assert_eq!(r.summaries_omitted, 1);
        let text = core::str::from_utf8(r.json).unwrap();
        assert!(text.ends_with("]}") && text.contains("user18") && !text.contains("user19"));
        // A buffer too small even for the empty lists is an error, not a cut document.
        let bare = render_string(&inputs(&Summaries::new()));
        let mut tiny = vec![0u8; bare.len() - 1];
        assert_eq!(render(&i, &mut tiny).unwrap_err(), RenderError::BufferTooSmall);
    }

    #[test]
    fn worst_case_document_without_summaries_fits_the_buffer() {
        let summaries = Summaries::new();
        let nasty = "\u{1}".repeat(2000);
        let id = "\u{1}".repeat(crate::policy::rules::limits::ID_MAX_BYTES);
        let m = ModuleStatus::running(&nasty);
        let i = StatusInputs {
            monitor: m,
            key_latch: m,
            ebpf_program: m,
            proxy_listener: m,
            telemetry_logger: m,
            key_latch_states: Some(KeyLatchStates {
                secure_channel_state: &id[..96],
                key_guid: Some(&id[..64]),
                wire_server_rule_id: &id,
                imds_rule_id: &id,
                host_ga_rule_id: &id,
                key_incarnation_id: Some(u32::MAX),
                host_clock_skew_secs: Some(i64::MIN),
                rules_refused: [false; 3],
            }),
            ..inputs(&summaries)
        };
        let mut buf = new_buffer();
        let r = render(&i, &mut buf).unwrap();
        assert!(r.json.len() < 42 * 1024, "{}", r.json.len());
    }
}
