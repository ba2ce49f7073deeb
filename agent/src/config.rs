// SPDX-License-Identifier: MIT
//! The configuration file (`/etc/guest-proxy-agent/config.json`), parsed once at start with
//! serde-json-core into fixed-size fields and validated into [`ValidatedConfig`]. An unknown
//! key or a bad value is refused with a message naming it; nothing downstream sees raw strings.
//! Every setting has a default, so `{}` is a valid file.

use std::fmt;
use std::net::SocketAddrV4;
use std::path::PathBuf;

use heapless::String;
use serde::Deserialize;

use crate::limits::{DEFAULT_MAX_CONNECTIONS, MAX_CONNECTIONS_LIMIT};

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/guest-proxy-agent/config.json";
/// Largest config file read.
const CONFIG_MAX_BYTES: usize = 16 * 1024;

/// The file as written (camelCase keys, all optional).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
struct RawConfig {
    listen_address: String<32>,
    imds_address: String<32>,
    wire_server_address: String<32>,
    host_ga_plugin_address: String<32>,
    cgroup_path: String<256>,
    pin_path: String<256>,
    state_directory: String<256>,
    log_directory: String<256>,
    max_connections: u32,
    poll_interval_seconds: u32,
    status_interval_seconds: u32,
    host_timeout_ms: u32,
    upstream_timeout_ms: u32,
    agent_mark: u32,
    log_level: String<8>,
    redirect: String<16>,
    caller_identity: String<16>,
    handover_socket: String<108>,
    /// 0 (the default): no telemetry upload.
    telemetry_interval_seconds: u32,
    telemetry_level: String<8>,
    /// Fair shares and audit volume (`limits`, every key optional; 0 = the default).
    limits: RawLimits,
}

/// `limits`: the caps of issue 13. Each is explained where its default is (`limits.rs`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
struct RawLimits {
    per_uid_connections: u32,
    per_cgroup_connections: u32,
    root_reserved_connections: u32,
    identityless_connections: u32,
    per_uid_body_buffers: u32,
    per_uid_upstreams: u32,
    audit_records_per_second: u32,
    audit_burst: u32,
    audit_max_file_bytes: u32,
    audit_max_files: u32,
}

impl Default for RawConfig {
    fn default() -> Self {
        fn s<const N: usize>(v: &str) -> String<N> {
            String::try_from(v).unwrap_or_default()
        }
        Self {
            listen_address: s("127.0.0.1:3080"),
            imds_address: s("169.254.169.254:80"),
            wire_server_address: s("168.63.129.16:80"),
            host_ga_plugin_address: s("168.63.129.16:32526"),
            cgroup_path: String::new(),
            pin_path: s("/sys/fs/bpf/guest-proxy-agent"),
            state_directory: s("/var/lib/guest-proxy-agent"),
            log_directory: s("/var/log/guest-proxy-agent"),
            max_connections: u32::try_from(DEFAULT_MAX_CONNECTIONS).unwrap_or(1024),
            poll_interval_seconds: 15,
            status_interval_seconds: 60,
            host_timeout_ms: 5_000,
            upstream_timeout_ms: u32::try_from(crate::limits::UPSTREAM_RESPONSE_TIMEOUT_MS).unwrap_or(30_000),
            agent_mark: DEFAULT_AGENT_MARK,
            log_level: s("info"),
            redirect: s("hostModes"),
            caller_identity: s("kernel"),
            handover_socket: s(DEFAULT_HANDOVER_SOCKET),
            telemetry_interval_seconds: 0,
            telemetry_level: s("warn"),
            limits: RawLimits::default(),
        }
    }
}

/// Where the initramfs agent offers its listener to the root file system's agent
/// (docs/EARLY-BOOT.md). `/run` survives `switch_root`; the directory is root-only.
pub const DEFAULT_HANDOVER_SOCKET: &str = "/run/guest-proxy-agent-early/handover.sock";

/// `SO_MARK` on the agent's own sockets ("GPA" + 1); any non-zero value works, it only has to
/// be one no other software on the image uses.
pub const DEFAULT_AGENT_MARK: u32 = 0x4750_4101;

/// Which endpoints the kernel intercepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectPolicy {
    /// Follow the per-endpoint modes of the host's status document (MSP §1.5; the default).
    HostModes,
    /// Intercept every endpoint from the start, whatever the host says (deployments that want
    /// attribution and the allowlist even before MSP is enabled).
    All,
}

/// Where the caller's executable identity comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerIdentity {
    /// The kernel's connect-time record of the task (executable device and inode, start time,
    /// effective ids, traced), read with CO-RE; falls back to `Procfs` where the kernel has no
    /// BTF or refuses the program (the default).
    Kernel,
    /// `/proc` at accept time only (the fallback, forced): weaker, see docs/DESIGN.md.
    Procfs,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct ValidatedConfig {
    /// Proxy listener (loopback).
    pub listen: SocketAddrV4,
    /// IMDS endpoint.
    pub imds: SocketAddrV4,
    /// WireServer endpoint (also the status/key host).
    pub wire_server: SocketAddrV4,
    /// HostGAPlugin endpoint.
    pub host_ga_plugin: SocketAddrV4,
    /// cgroup to attach to; `None`: the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    /// Where links and maps are pinned (bpffs); `None`: no pinning (the redirect ends with
    /// the process).
    pub pin_dir: Option<PathBuf>,
    /// Keys and other state.
    pub state_dir: PathBuf,
    /// Status file and audit log.
    pub log_dir: PathBuf,
    /// Connection table size.
    pub max_connections: usize,
    /// Status poll interval once latched.
    pub poll_interval_secs: u64,
    /// Status file write interval.
    pub status_interval_secs: u64,
    /// Timeout of each host call.
    pub host_timeout_ms: u64,
    /// Time a proxied upstream has to answer (then `504`).
    pub upstream_timeout_ms: u64,
    /// `SO_MARK` of the agent's own sockets.
    pub agent_mark: u32,
    /// Log level.
    pub log_level: log::LevelFilter,
    /// Which endpoints to intercept.
    pub redirect: RedirectPolicy,
    /// Where the executable identity comes from (`callerIdentity`).
    pub caller_identity: CallerIdentity,
    /// Unix socket of the listener hand-over (`handoverSocket`); `None`: never offered nor
    /// taken.
    pub handover_socket: Option<PathBuf>,
    /// Run as the initramfs instance (`--early`, not a file setting): intercept every
    /// endpoint from the first instant and offer the listener on `handover_socket`.
    pub early: bool,
    /// Telemetry upload to the WireServer; `None`: off (the default).
    pub telemetry: Option<TelemetryConfig>,
    /// Fair shares and audit volume (`limits`).
    pub caps: Caps,
}

/// Fair shares of the proxy's resources and the audit volume a non-root uid may write
/// (config `limits`; defaults and reasons in `limits.rs`). uid 0 is never capped by these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Connections one non-root uid may hold.
    pub per_uid_connections: usize,
    /// Connections the non-root callers of one cgroup may hold together.
    pub per_cgroup_connections: usize,
    /// The last slots of the table, for uid 0 only.
    pub root_reserved_connections: usize,
    /// Connections without identity (direct connects) at once.
    pub identityless_connections: usize,
    /// Request body buffers one non-root uid may hold.
    pub per_uid_body_buffers: usize,
    /// Upstream connections (requests in flight to a host) one non-root uid may hold.
    pub per_uid_upstreams: usize,
    /// Audit records per second one non-root uid (or all identity-less callers) may write;
    /// the rest is counted in `suppressed` records.
    pub audit_records_per_second: u32,
    /// Records a uid may write at once before the rate applies.
    pub audit_burst: u32,
    /// Size of one audit file before rotation.
    pub audit_max_file_bytes: u64,
    /// Files kept per trail (the active one included).
    pub audit_max_files: u32,
}

impl Caps {
    /// The defaults for a table of `max_connections` slots.
    pub fn for_table(max_connections: usize) -> Self {
        use crate::limits as l;
        Self {
            per_uid_connections: (max_connections / l::PER_UID_SHARE_DIVISOR).max(1),
            per_cgroup_connections: (max_connections / l::PER_CGROUP_SHARE_DIVISOR).max(1),
            root_reserved_connections: l::ROOT_RESERVED_CONNECTIONS.min(max_connections / 2),
            identityless_connections: l::NO_IDENTITY_MAX_CONNECTIONS,
            per_uid_body_buffers: l::PER_UID_BODY_BUFFERS,
            per_uid_upstreams: (max_connections / l::PER_UID_UPSTREAM_DIVISOR).max(1),
            audit_records_per_second: l::AUDIT_UID_RECORDS_PER_SECOND,
            audit_burst: l::AUDIT_UID_BURST,
            audit_max_file_bytes: l::AUDIT_FILE_BYTES,
            audit_max_files: l::AUDIT_FILES,
        }
    }
}

/// The optional telemetry upload (MSP §7.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// How often queued events are sent.
    pub interval_secs: u64,
    /// Log records at or below this level become events (milestones and module status changes
    /// always do).
    pub level: log::LevelFilter,
}

/// Why the configuration was refused.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read(PathBuf, std::io::Error),
    /// The file is larger than we read.
    TooLarge(PathBuf),
    /// Not valid JSON for the schema (unknown key, wrong type, value too long).
    Parse(PathBuf, serde_json_core::de::Error),
    /// A value is out of range or malformed.
    Invalid(&'static str, &'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read(p, e) => write!(f, "cannot read config {}: {e}", p.display()),
            Self::TooLarge(p) => write!(f, "config {} is larger than {CONFIG_MAX_BYTES} bytes", p.display()),
            Self::Parse(p, e) => {
                write!(f, "config {} is invalid (unknown key, wrong type or value too long): {e}", p.display())
            }
            Self::Invalid(key, why) => write!(f, "config key {key}: {why}"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ValidatedConfig {
    /// Reads and validates a file. When `path` is the default and the file does not exist,
    /// the built-in defaults are used (a fresh image still runs protected).
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        match std::fs::read(path) {
            Ok(bytes) if bytes.len() > CONFIG_MAX_BYTES => Err(ConfigError::TooLarge(path.to_owned())),
            Ok(bytes) => Self::parse(&bytes).map_err(|e| match e {
                ConfigError::Parse(_, err) => ConfigError::Parse(path.to_owned(), err),
                other => other,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == std::path::Path::new(DEFAULT_CONFIG_PATH) => {
                Self::parse(b"{}")
            }
            Err(e) => Err(ConfigError::Read(path.to_owned(), e)),
        }
    }

    /// Parses and validates JSON text.
    pub fn parse(json: &[u8]) -> Result<Self, ConfigError> {
        let json = json.strip_prefix(b"\xef\xbb\xbf").unwrap_or(json);
        let mut unescape = [0u8; 512];
        let (raw, _): (RawConfig, usize) = serde_json_core::from_slice_escaped(json, &mut unescape)
            .map_err(|e| ConfigError::Parse(PathBuf::new(), e))?;
        let addr = |key: &'static str, v: &str| {
            v.parse::<SocketAddrV4>().map_err(|_bad| ConfigError::Invalid(key, "expected IPv4 address:port"))
        };
        let listen = addr("listenAddress", &raw.listen_address)?;
        if !listen.ip().is_loopback() {
            return Err(ConfigError::Invalid(
                "listenAddress",
                "must be a loopback address (the proxy must not be reachable from outside)",
            ));
        }
        let max_connections = usize::try_from(raw.max_connections).unwrap_or(usize::MAX);
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&max_connections) {
            return Err(ConfigError::Invalid("maxConnections", "must be between 1 and 65536"));
        }
        if raw.poll_interval_seconds == 0 || raw.poll_interval_seconds > 3600 {
            return Err(ConfigError::Invalid("pollIntervalSeconds", "must be between 1 and 3600"));
        }
        if raw.status_interval_seconds == 0 || raw.status_interval_seconds > 3600 {
            return Err(ConfigError::Invalid("statusIntervalSeconds", "must be between 1 and 3600"));
        }
        if !(100..=60_000).contains(&raw.host_timeout_ms) {
            return Err(ConfigError::Invalid("hostTimeoutMs", "must be between 100 and 60000"));
        }
        if !(100..=600_000).contains(&raw.upstream_timeout_ms) {
            return Err(ConfigError::Invalid("upstreamTimeoutMs", "must be between 100 and 600000"));
        }
        if raw.agent_mark == 0 {
            return Err(ConfigError::Invalid("agentMark", "must not be 0 (0 is every unmarked socket)"));
        }
        let log_level = parse_level(&raw.log_level)
            .ok_or(ConfigError::Invalid("logLevel", "expected off, error, warn, info, debug or trace"))?;
        let level = parse_level(&raw.telemetry_level)
            .filter(|l| *l != log::LevelFilter::Off)
            .ok_or(ConfigError::Invalid("telemetryLevel", "expected error, warn, info, debug or trace"))?;
        let telemetry = match raw.telemetry_interval_seconds {
            0 => None,
            1..=3600 => Some(TelemetryConfig { interval_secs: u64::from(raw.telemetry_interval_seconds), level }),
            _ => return Err(ConfigError::Invalid("telemetryIntervalSeconds", "must be 0 (off) or between 1 and 3600")),
        };
        let redirect = match raw.redirect.as_str() {
            "hostModes" => RedirectPolicy::HostModes,
            "all" => RedirectPolicy::All,
            _ => return Err(ConfigError::Invalid("redirect", "expected hostModes or all")),
        };
        let caller_identity = match raw.caller_identity.as_str() {
            "kernel" => CallerIdentity::Kernel,
            "procfs" => CallerIdentity::Procfs,
            _ => return Err(ConfigError::Invalid("callerIdentity", "expected kernel or procfs")),
        };
        let caps = validate_caps(&raw.limits, max_connections)?;
        let dir = |key: &'static str, v: &str| {
            if v.starts_with('/') {
                Ok(PathBuf::from(v))
            } else {
                Err(ConfigError::Invalid(key, "must be an absolute path"))
            }
        };
        Ok(Self {
            listen,
            imds: addr("imdsAddress", &raw.imds_address)?,
            wire_server: addr("wireServerAddress", &raw.wire_server_address)?,
            host_ga_plugin: addr("hostGaPluginAddress", &raw.host_ga_plugin_address)?,
            cgroup: if raw.cgroup_path.is_empty() { None } else { Some(dir("cgroupPath", &raw.cgroup_path)?) },
            pin_dir: if raw.pin_path.is_empty() { None } else { Some(dir("pinPath", &raw.pin_path)?) },
            state_dir: dir("stateDirectory", &raw.state_directory)?,
            log_dir: dir("logDirectory", &raw.log_directory)?,
            max_connections,
            poll_interval_secs: u64::from(raw.poll_interval_seconds),
            status_interval_secs: u64::from(raw.status_interval_seconds),
            host_timeout_ms: u64::from(raw.host_timeout_ms),
            upstream_timeout_ms: u64::from(raw.upstream_timeout_ms),
            agent_mark: raw.agent_mark,
            log_level,
            redirect,
            caller_identity,
            handover_socket: if raw.handover_socket.is_empty() {
                None
            } else {
                Some(dir("handoverSocket", &raw.handover_socket)?)
            },
            early: false,
            telemetry,
            caps,
        })
    }
}

/// `limits` over the defaults for the table size; 0 keeps a default.
fn validate_caps(raw: &RawLimits, max_connections: usize) -> Result<Caps, ConfigError> {
    let mut caps = Caps::for_table(max_connections);
    let set = |key: &'static str, v: u32, min: u32, max: usize, into: &mut usize| match v {
        0 => Ok(()),
        v if v >= min && v as usize <= max => {
            *into = v as usize;
            Ok(())
        }
        _ => Err(ConfigError::Invalid(key, "out of range (see the limits table in README.md)")),
    };
    set("limits.perUidConnections", raw.per_uid_connections, 1, max_connections, &mut caps.per_uid_connections)?;
    set(
        "limits.perCgroupConnections",
        raw.per_cgroup_connections,
        1,
        max_connections,
        &mut caps.per_cgroup_connections,
    )?;
    set(
        "limits.rootReservedConnections",
        raw.root_reserved_connections,
        1,
        max_connections / 2,
        &mut caps.root_reserved_connections,
    )?;
    set(
        "limits.identitylessConnections",
        raw.identityless_connections,
        1,
        max_connections,
        &mut caps.identityless_connections,
    )?;
    let others = crate::limits::BODY_BUFFERS - crate::limits::ROOT_RESERVED_BODY_BUFFERS;
    set("limits.perUidBodyBuffers", raw.per_uid_body_buffers, 1, others, &mut caps.per_uid_body_buffers)?;
    set("limits.perUidUpstreams", raw.per_uid_upstreams, 1, max_connections, &mut caps.per_uid_upstreams)?;
    let mut rate = caps.audit_records_per_second as usize;
    set("limits.auditRecordsPerSecond", raw.audit_records_per_second, 1, 100_000, &mut rate)?;
    let mut burst = caps.audit_burst as usize;
    set("limits.auditBurst", raw.audit_burst, 1, 1_000_000, &mut burst)?;
    let mut files = caps.audit_max_files as usize;
    set("limits.auditMaxFiles", raw.audit_max_files, 1, 100, &mut files)?;
    let mut bytes = usize::try_from(caps.audit_max_file_bytes).unwrap_or(usize::MAX);
    set("limits.auditMaxFileBytes", raw.audit_max_file_bytes, 16 * 1024, 1 << 30, &mut bytes)?;
    caps.audit_records_per_second = u32::try_from(rate).unwrap_or(u32::MAX);
    caps.audit_burst = u32::try_from(burst).unwrap_or(u32::MAX);
    caps.audit_max_files = u32::try_from(files).unwrap_or(u32::MAX);
    caps.audit_max_file_bytes = bytes as u64;
    Ok(caps)
}

/// `off`, `error`, `warn`, `info`, `debug` or `trace`, in any case (`log`'s own parser).
fn parse_level(text: &str) -> Option<log::LevelFilter> {
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_override_the_defaults_and_are_range_checked() {
        let c = ValidatedConfig::parse(b"{}").unwrap();
        assert_eq!(c.caps, Caps::for_table(1024));
        assert_eq!((c.caps.per_uid_connections, c.caps.per_cgroup_connections), (256, 512));
        let c = ValidatedConfig::parse(
            br#"{"limits":{"perUidConnections":10,"auditRecordsPerSecond":5,"auditMaxFileBytes":65536,"auditMaxFiles":2}}"#,
        )
        .unwrap();
        assert_eq!(c.caps.per_uid_connections, 10);
        assert_eq!(c.caps.audit_records_per_second, 5);
        assert_eq!((c.caps.audit_max_file_bytes, c.caps.audit_max_files), (65536, 2));
        assert_eq!(c.caps.per_uid_body_buffers, crate::limits::PER_UID_BODY_BUFFERS, "untouched keys keep defaults");
        for bad in [
            r#"{"limits":{"perUidConnections":2000}}"#,
            r#"{"limits":{"perUidBodyBuffers":13}}"#,
            r#"{"limits":{"rootReservedConnections":600}}"#,
            r#"{"limits":{"auditMaxFileBytes":100}}"#,
        ] {
            let e = ValidatedConfig::parse(bad.as_bytes()).unwrap_err();
            assert!(e.to_string().contains("limits."), "{bad}: {e}");
        }
        assert!(ValidatedConfig::parse(br#"{"limits":{"perUid":1}}"#).is_err(), "unknown keys are refused");
    }

    #[test]
    fn empty_object_gives_the_documented_defaults() {
        let c = ValidatedConfig::parse(b"{}").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:3080");
        assert_eq!(c.imds.to_string(), "169.254.169.254:80");
        assert_eq!(c.wire_server.to_string(), "168.63.129.16:80");
        assert_eq!(c.host_ga_plugin.to_string(), "168.63.129.16:32526");
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.redirect, RedirectPolicy::HostModes);
        assert!(c.cgroup.is_none());
        assert_eq!(c.handover_socket.as_deref(), Some(std::path::Path::new(DEFAULT_HANDOVER_SOCKET)));
        assert!(!c.early);
        assert!(ValidatedConfig::parse(br#"{"handoverSocket":""}"#).unwrap().handover_socket.is_none());
        assert!(ValidatedConfig::parse(br#"{"handoverSocket":"run/x.sock"}"#).is_err());
        assert_eq!(c.telemetry, None, "telemetry is off unless configured");
    }

    #[test]
    fn telemetry_is_on_only_with_an_interval() {
        let c = ValidatedConfig::parse(br#"{"telemetryIntervalSeconds":60}"#).unwrap();
        assert_eq!(c.telemetry, Some(TelemetryConfig { interval_secs: 60, level: log::LevelFilter::Warn }));
        let c = ValidatedConfig::parse(br#"{"telemetryIntervalSeconds":1,"telemetryLevel":"INFO"}"#).unwrap();
        assert_eq!(c.telemetry, Some(TelemetryConfig { interval_secs: 1, level: log::LevelFilter::Info }));
        assert_eq!(ValidatedConfig::parse(br#"{"telemetryIntervalSeconds":0}"#).unwrap().telemetry, None);
        assert_eq!(ValidatedConfig::parse(br#"{"telemetryLevel":"info"}"#).unwrap().telemetry, None);
        assert!(matches!(
            ValidatedConfig::parse(br#"{"telemetry":{"intervalSeconds":5}}"#),
            Err(ConfigError::Parse(..))
        ));
        for (bad, key) in [
            (&br#"{"telemetryIntervalSeconds":3601}"#[..], "telemetryIntervalSeconds"),
            (br#"{"telemetryIntervalSeconds":60,"telemetryLevel":"off"}"#, "telemetryLevel"),
            (br#"{"telemetryLevel":"loud"}"#, "telemetryLevel"),
        ] {
            let e = ValidatedConfig::parse(bad).unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_the_key_named() {
        assert!(matches!(ValidatedConfig::parse(br#"{"listenAdress":"127.0.0.1:1"}"#), Err(ConfigError::Parse(..))));
        let e = ValidatedConfig::parse(br#"{"listenAddress":"0.0.0.0:3080"}"#).unwrap_err();
        assert!(e.to_string().contains("listenAddress"), "{e}");
        let e = ValidatedConfig::parse(br#"{"maxConnections":0}"#).unwrap_err();
        assert!(e.to_string().contains("maxConnections"));
        let e = ValidatedConfig::parse(br#"{"logLevel":"loud"}"#).unwrap_err();
        assert!(e.to_string().contains("logLevel"));
        let e = ValidatedConfig::parse(br#"{"stateDirectory":"relative"}"#).unwrap_err();
        assert!(e.to_string().contains("stateDirectory"));
    }

    #[test]
    fn values_are_taken_from_the_file() {
        let c = ValidatedConfig::parse(
            br#"{"listenAddress":"127.0.0.1:4000","cgroupPath":"/sys/fs/cgroup/unified/x","maxConnections":8,"redirect":"all"}"#,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 4000);
        assert_eq!(c.cgroup.as_deref(), Some(std::path::Path::new("/sys/fs/cgroup/unified/x")));
        assert_eq!(c.max_connections, 8);
        assert_eq!(c.redirect, RedirectPolicy::All);
    }
}
