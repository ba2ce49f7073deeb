// SPDX-License-Identifier: MIT
//! Reading a status document back: `guest-proxy-agent status [--json]` and the doctor's
//! status checks. The document is parsed with serde-json-core into fixed-capacity fields
//! sized for what [`super::document`] writes; of each summary list only the first
//! [`TOP_SUMMARIES`] (the highest counts, as written) are kept.

use core::fmt::{self, Write as _};
use std::io::Read as _;
use std::path::Path;

use heapless::{String, Vec};
use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::document::{MESSAGE_REPORT_MAX_BYTES, STATUS_JSON_MAX_BYTES};
use super::summary::CMDLINE_SUMMARY_MAX_BYTES;
use crate::exit::ExitStatus;
use crate::limits::{EXE_PATH_MAX_BYTES, NAME_MAX_BYTES};
use crate::msp::status_doc::STATE_STRING_MAX_BYTES;
use crate::policy::rules::limits::ID_MAX_BYTES;

/// Summaries shown per list by `status`.
pub const TOP_SUMMARIES: usize = 8;
/// A message as written: the cut text plus `...`.
const MESSAGE_MAX_BYTES: usize = MESSAGE_REPORT_MAX_BYTES + 3;
/// Scratch for unescaping one string (the longest field is a message).
const UNESCAPE_BYTES: usize = 2 * MESSAGE_MAX_BYTES;

/// One component as read back.
#[derive(Debug, Deserialize)]
pub struct ModuleView {
    /// `UNKNOWN`, `RUNNING` or `STOPPED`.
    pub status: String<16>,
    /// The message.
    pub message: String<MESSAGE_MAX_BYTES>,
    /// Only in `keyLatchStatus`.
    #[serde(default)]
    pub states: Option<StatesView>,
}

/// `keyLatchStatus.states` as read back.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StatesView {
    /// `secureChannelState`.
    pub secure_channel_state: String<STATE_STRING_MAX_BYTES>,
    /// `keyGuid`.
    pub key_guid: Option<String<64>>,
    /// `wireServerRuleId`.
    pub wire_server_rule_id: String<ID_MAX_BYTES>,
    /// `imdsRuleId`.
    pub imds_rule_id: String<ID_MAX_BYTES>,
    /// `hostGARuleId`.
    #[serde(rename = "hostGARuleId")]
    pub host_ga_rule_id: String<ID_MAX_BYTES>,
    /// `keyIncarnationId`.
    pub key_incarnation_id: Option<String<16>>,
    /// `hostClockSkewSeconds`.
    pub host_clock_skew_seconds: Option<String<24>>,
}

/// `proxyAgentStatus` as read back.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    /// `version`.
    pub version: String<64>,
    /// `SUCCESS` or `ERROR`.
    pub status: String<16>,
    /// `monitorStatus`.
    pub monitor_status: ModuleView,
    /// `keyLatchStatus`.
    pub key_latch_status: ModuleView,
    /// `ebpfProgramStatus`.
    pub ebpf_program_status: ModuleView,
    /// `proxyListenerStatus`.
    pub proxy_listener_status: ModuleView,
    /// `telemetryLoggerStatus`.
    pub telemetry_logger_status: ModuleView,
    /// `proxyConnectionsCount`.
    pub proxy_connections_count: u64,
}

/// One summary as read back (`userGroups` is not kept).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SummaryRow {
    /// `userName`.
    pub user_name: String<NAME_MAX_BYTES>,
    /// `ip`.
    pub ip: String<16>,
    /// `port`.
    pub port: u16,
    /// `processCmdLine`.
    pub process_cmd_line: String<CMDLINE_SUMMARY_MAX_BYTES>,
    /// `responseStatus`.
    pub response_status: String<48>,
    /// `count`.
    pub count: u64,
    /// `processFullPath`.
    pub process_full_path: Option<String<EXE_PATH_MAX_BYTES>>,
}

/// The first [`TOP_SUMMARIES`] of a list, and how many it had.
#[derive(Debug, Default)]
pub struct TopSummaries {
    /// The rows kept.
    pub rows: Vec<SummaryRow, TOP_SUMMARIES>,
    /// All rows in the list.
    pub total: usize,
}

impl<'de> Deserialize<'de> for TopSummaries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Top;
        impl<'de> Visitor<'de> for Top {
            type Value = TopSummaries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of summaries")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TopSummaries, A::Error> {
                let mut top = TopSummaries::default();
                while top.rows.len() < TOP_SUMMARIES {
                    match seq.next_element::<SummaryRow>()? {
                        Some(row) => {
                            top.total += 1;
                            top.rows.push(row).map_err(|_full| de::Error::custom("summary list overflow"))?;
                        }
                        None => return Ok(top),
                    }
                }
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    top.total += 1;
                }
                Ok(top)
            }
        }
        d.deserialize_seq(Top)
    }
}

/// A status document as read back.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    /// `timestamp` (`YYYY-MM-DDTHH:MM:SS.fff`, UTC).
    pub timestamp: String<32>,
    /// `proxyAgentStatus`.
    pub proxy_agent_status: AgentView,
    /// `proxyConnectionSummary`.
    #[serde(default)]
    pub proxy_connection_summary: TopSummaries,
    /// `failedAuthenticateSummary`.
    #[serde(default)]
    pub failed_authenticate_summary: TopSummaries,
}

/// Why a status file could not be read.
#[derive(Debug)]
pub enum ViewError {
    /// Missing or unreadable.
    Read(std::io::Error),
    /// Larger than a document can be.
    TooLarge,
    /// Not a status document.
    Parse(serde_json_core::de::Error),
}

impl fmt::Display for ViewError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read(e) => write!(f, "cannot read: {e}"),
            Self::TooLarge => write!(f, "larger than {STATUS_JSON_MAX_BYTES} bytes"),
            Self::Parse(e) => write!(f, "not a status document: {e}"),
        }
    }
}

impl std::error::Error for ViewError {}

/// Reads a status file (at most [`STATUS_JSON_MAX_BYTES`]); returns its bytes.
pub fn read_file(path: &Path) -> Result<std::vec::Vec<u8>, ViewError> {
    read_open(std::fs::File::open(path).map_err(ViewError::Read)?)
}

/// Reads a status file already open (at most [`STATUS_JSON_MAX_BYTES`]).
pub fn read_open(file: std::fs::File) -> Result<std::vec::Vec<u8>, ViewError> {
    let mut bytes = std::vec::Vec::new();
    file.take(u64::try_from(STATUS_JSON_MAX_BYTES).unwrap_or(u64::MAX) + 1)
        .read_to_end(&mut bytes)
        .map_err(ViewError::Read)?;
    if bytes.len() > STATUS_JSON_MAX_BYTES {
        return Err(ViewError::TooLarge);
    }
    Ok(bytes)
}

/// Parses a status document.
pub fn parse(json: &[u8]) -> Result<Box<StatusView>, ViewError> {
    let mut scratch = [0u8; UNESCAPE_BYTES];
    serde_json_core::from_slice_escaped::<StatusView>(json, &mut scratch)
        .map(|(v, _)| Box::new(v))
        .map_err(ViewError::Parse)
}

/// `status` outcomes, with exit codes 0, 1 and 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShowExit {
    /// The document says `SUCCESS` (exit 0).
    Success,
    /// The document says anything else (exit 1).
    Error,
    /// No readable document (exit 2).
    Unreadable,
}

impl ShowExit {
    /// The process exit status.
    pub const fn exit_status(self) -> ExitStatus {
        match self {
            Self::Success => ExitStatus::Success,
            Self::Error => ExitStatus::Failure,
            Self::Unreadable => ExitStatus::Severe,
        }
    }
}

/// `guest-proxy-agent status [--json]`: the text to print and the exit code. With `json`, the
/// file is printed as is (after checking it parses).
pub fn show(log_dir: &Path, json: bool, now_unix_ms: u64) -> (ShowExit, std::string::String) {
    let path = log_dir.join(super::writer::STATUS_FILE_NAME);
    let parsed = read_file(&path).and_then(|bytes| parse(&bytes).map(|v| (bytes, v)));
    let (bytes, view) = match parsed {
        Ok(p) => p,
        Err(e) => return (ShowExit::Unreadable, format!("status file {}: {e}", path.display())),
    };
    let exit = if view.proxy_agent_status.status == "SUCCESS" { ShowExit::Success } else { ShowExit::Error };
    if json {
        return (exit, std::string::String::from_utf8_lossy(&bytes).into_owned());
    }
    (exit, human(&view, now_unix_ms))
}

/// The human summary of a status document.
pub fn human(v: &StatusView, now_unix_ms: u64) -> std::string::String {
    let a = &v.proxy_agent_status;
    let mut out = std::string::String::new();
    let age = crate::calendar::parse_timestamp_millis(&v.timestamp).map(|t| i128::from(now_unix_ms) - i128::from(t));
    let age = match age {
        Some(ms) if ms >= 0 => format!("{} s ago", ms / 1000),
        Some(ms) => format!("{} s in the future", -ms / 1000),
        None => "unknown age".into(),
    };
    // Writing into a String cannot fail.
    writeln!(out, "status: {}  (agent {}, written {} UTC, {age})", a.status, a.version, v.timestamp).ok();
    for (name, m) in [
        ("key latch", &a.key_latch_status),
        ("eBPF programs", &a.ebpf_program_status),
        ("proxy listener", &a.proxy_listener_status),
        ("telemetry logger", &a.telemetry_logger_status),
        ("status monitor", &a.monitor_status),
    ] {
        writeln!(out, "  {name:<17} {:<8} {}", m.status, m.message).ok();
    }
    if let Some(s) = &a.key_latch_status.states {
        writeln!(out, "secure channel: {}", s.secure_channel_state).ok();
        match (&s.key_guid, &s.key_incarnation_id) {
            (Some(g), Some(i)) => writeln!(out, "key: {g} (incarnation {i})").ok(),
            (Some(g), None) => writeln!(out, "key: {g}").ok(),
            (None, _) => writeln!(out, "key: none held").ok(),
        };
        writeln!(
            out,
            "rules: wireServer={:?} imds={:?} hostGA={:?}",
            s.wire_server_rule_id, s.imds_rule_id, s.host_ga_rule_id
        )
        .ok();
    }
    writeln!(out, "requests handled: {}", a.proxy_connections_count).ok();
    for (title, list) in
        [("connections", &v.proxy_connection_summary), ("failed authentications", &v.failed_authenticate_summary)]
    {
        writeln!(out, "{title} (last 4 h, {} keys):", list.total).ok();
        for r in &list.rows {
            let exe = r.process_full_path.as_deref().unwrap_or("?");
            writeln!(
                out,
                "  {:>7}  {:<26} {:<12} {} -> {}:{}  [{}]",
                r.count, r.response_status, r.user_name, exe, r.ip, r.port, r.process_cmd_line
            )
            .ok();
        }
        if list.total > list.rows.len() {
            writeln!(out, "  ... {} more (see --json)", list.total - list.rows.len()).ok();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::document::{KeyLatchStates, ModuleStatus, StatusInputs, new_buffer, render};
    use crate::status::summary::{Summaries, SummaryKind, SummaryRecord};

    const TS_MS: u64 = 1_784_715_072_345;

    fn document(summaries: &Summaries, listener: ModuleStatus<'_>) -> std::vec::Vec<u8> {
        let long = "m\"\n".repeat(600);
        let inputs = StatusInputs {
            timestamp_unix_ms: TS_MS,
            version: "0.1.0",
            monitor: ModuleStatus::running("Proxy agent status is running."),
            key_latch: ModuleStatus::running(&long),
            key_latch_states: Some(KeyLatchStates {
                secure_channel_state: "WireServer Enforce - IMDS Audit - HostGA Enforce",
                key_guid: Some("guid-1"),
                wire_server_rule_id: "ws",
                imds_rule_id: "imds",
                host_ga_rule_id: "ws",
                key_incarnation_id: Some(7),
                host_clock_skew_secs: Some(2),
                rules_refused: [false; 3],
            }),
            ebpf_program: ModuleStatus::running("Started Redirector with eBPF maps - 8"),
            proxy_listener: listener,
            telemetry_logger: ModuleStatus::TELEMETRY_NOT_CONFIGURED,
            proxy_connections_count: 99,
            summaries,
        };
        let mut buf = new_buffer();
        render(&inputs, &mut buf).unwrap().json.to_vec()
    }

    fn many_summaries() -> Summaries {
        let mut s = Summaries::new();
        let users: std::vec::Vec<std::string::String> = (0..12).map(|i| format!("user{i}")).collect();
        for u in &users {
            let r = SummaryRecord {
                user_name: u,
                user_groups: None,
                client_ip: std::net::Ipv4Addr::LOCALHOST,
                ip: Some(std::net::Ipv4Addr::new(168, 63, 129, 16)),
                port: 80,
                process_full_path: Some(b"/usr/bin/python3"),
                process_cmd_line: b"python3 agent.py",
                response_status: 200,
            };
            s.record(SummaryKind::ProxyConnection, &r, TS_MS / 1000);
        }
        s
    }

    #[test]
    fn reads_back_what_the_renderer_writes() {
        let summaries = many_summaries();
        let json = document(&summaries, ModuleStatus::running("Started proxy listener"));
        let v = parse(&json).unwrap();
        assert_eq!(v.timestamp, "2026-07-22T10:11:12.345");
        assert_eq!(v.proxy_agent_status.status, "SUCCESS");
        assert_eq!(v.proxy_agent_status.key_latch_status.message.len(), MESSAGE_MAX_BYTES);
        let states = v.proxy_agent_status.key_latch_status.states.as_ref().unwrap();
        assert_eq!(states.key_incarnation_id.as_deref(), Some("7"));
        assert_eq!(states.host_clock_skew_seconds.as_deref(), Some("2"));
        assert_eq!(v.proxy_connection_summary.total, 12);
        assert_eq!(v.proxy_connection_summary.rows.len(), TOP_SUMMARIES);
        assert_eq!(v.failed_authenticate_summary.total, 0);
        let text = human(&v, TS_MS + 5_000);
        assert!(
            text.starts_with("status: SUCCESS  (agent 0.1.0, written 2026-07-22T10:11:12.345 UTC, 5 s ago)\n"),
            "{text}"
        );
        assert!(text.contains("secure channel: WireServer Enforce - IMDS Audit - HostGA Enforce\n"));
        assert!(text.contains("key: guid-1 (incarnation 7)\n"));
        assert!(text.contains("telemetry logger  STOPPED  Telemetry upload is not configured.\n"));
        assert!(text.contains("        1  200 OK"));
        assert!(text.contains("... 4 more (see --json)"));
    }

    #[test]
    fn show_exit_codes_follow_the_overall_status() {
        let dir = std::env::temp_dir().join(format!("gpa-status-view-{}", std::process::id()));
        drop(std::fs::remove_dir_all(&dir));
        let (code, text) = show(&dir, false, TS_MS);
        assert_eq!(code, ShowExit::Unreadable);
        assert!(text.contains("status.json"), "{text}");
        let summaries = Summaries::new();
        let ok = document(&summaries, ModuleStatus::running("listening"));
        super::super::writer::write_atomic(&dir, &ok).unwrap();
        assert_eq!(show(&dir, false, TS_MS).0, ShowExit::Success);
        let (code, raw) = show(&dir, true, TS_MS);
        assert_eq!((code, raw.as_bytes()), (ShowExit::Success, &ok[..]));
        let bad = document(&summaries, ModuleStatus::stopped("cannot listen on 127.0.0.1:3080"));
        super::super::writer::write_atomic(&dir, &bad).unwrap();
        let (code, text) = show(&dir, false, TS_MS);
        assert_eq!(code, ShowExit::Error);
        assert!(text.contains("proxy listener    STOPPED  cannot listen on 127.0.0.1:3080"), "{text}");
        std::fs::write(dir.join("status.json"), b"{\"timestamp\":").unwrap();
        assert_eq!(show(&dir, true, TS_MS).0, ShowExit::Unreadable);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
