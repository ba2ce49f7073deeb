// SPDX-License-Identifier: MIT
//! The VM metadata every telemetry event carries (MSP §7.3 common parameters): from the goal
//! state (§1.2 D), the shared config (E), IMDS (F, see [`super::imds`]) and the OS itself.
//!
//! The shared-config URL comes from a host document; it is followed only when it is plain
//! `http` to an IPv4 literal equal to the configured WireServer address (any port): no DNS, no
//! other host, whatever the goal state says.

use std::net::SocketAddrV4;

use heapless::String;

use super::extract::{self, XmlError};
use super::imds::{Compute, Value};
use crate::limits::TELEMETRY_URL_MAX_BYTES;

/// Values read from the goal state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GoalState {
    /// `Container/ContainerId`.
    pub container_id: Value,
    /// `Container/RoleInstanceList/RoleInstance/InstanceId` (the first).
    pub instance_id: Value,
    /// `…/RoleInstance/Configuration/SharedConfig`: an absolute URL.
    pub shared_config_url: String<TELEMETRY_URL_MAX_BYTES>,
}

/// Reads the goal state XML; `ContainerId` and the `SharedConfig` URL are required.
pub fn parse_goal_state(xml: &[u8]) -> Result<GoalState, XmlError> {
    let mut g = GoalState::default();
    read_goal_state(xml, &mut g).map(|()| g)
}

/// [`parse_goal_state`] into `g` in place; on an error the values read so far are kept.
pub fn read_goal_state(xml: &[u8], g: &mut GoalState) -> Result<(), XmlError> {
    g.container_id = extract::text(xml, &["Container", "ContainerId"])?;
    g.instance_id = extract::text(xml, &["RoleInstance", "InstanceId"]).unwrap_or_default();
    g.shared_config_url = extract::text(xml, &["RoleInstance", "Configuration", "SharedConfig"])?;
    Ok(())
}

/// Values read from the shared config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedConfig {
    /// `Deployment@name` (the telemetry `TenantName`).
    pub deployment_name: Value,
    /// `Role@name`.
    pub role_name: Value,
    /// `Instances/Instance@id` (the first; may be empty).
    pub instance_id: Value,
}

/// Reads the shared config XML; `Deployment@name` and `Role@name` are required.
pub fn parse_shared_config(xml: &[u8]) -> Result<SharedConfig, XmlError> {
    let mut s = SharedConfig::default();
    read_shared_config(xml, &mut s).map(|()| s)
}

/// [`parse_shared_config`] into `s` in place; on an error the values read so far are kept.
pub fn read_shared_config(xml: &[u8], s: &mut SharedConfig) -> Result<(), XmlError> {
    s.deployment_name = extract::attribute(xml, &["Deployment"], "name")?;
    s.role_name = extract::attribute(xml, &["Role"], "name")?;
    s.instance_id = extract::attribute(xml, &["Instances", "Instance"], "id").unwrap_or_default();
    Ok(())
}

/// Why a shared-config URL is not followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UrlError {
    /// Not `http://` (https, another scheme, or no scheme).
    NotHttp,
    /// The host is not an IPv4 literal, carries user info, or the port is not a number.
    NotIpv4,
    /// The address is not the configured WireServer's.
    NotWireServer,
    /// No path, or bytes that are not visible ASCII, or a fragment.
    BadTarget,
}

impl UrlError {
    /// A short reason for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotHttp => "shared config URL is not http",
            Self::NotIpv4 => "shared config URL host is not an IPv4 address",
            Self::NotWireServer => "shared config URL host is not the WireServer",
            Self::BadTarget => "shared config URL has a bad path",
        }
    }
}

/// Where to send the shared-config request, and the request-target (path and query as in the
/// URL), when `url` points at `wire_server`'s IP.
pub fn shared_config_target(url: &str, wire_server: SocketAddrV4) -> Result<(SocketAddrV4, &str), UrlError> {
    // The host writes its URLs in lower case; anything else is not followed.
    let rest = url.strip_prefix("http://").ok_or(UrlError::NotHttp)?;
    let slash = rest.bytes().position(|b| b == b'/').ok_or(UrlError::BadTarget)?;
    let (authority, target) = rest.split_at(slash);
    let (host, digits) = authority.split_once(':').unwrap_or((authority, "80"));
    // 1 to 5 digits: no overflow; 0 is refused below.
    let port = (1..=5)
        .contains(&digits.len())
        .then(|| digits.bytes().try_fold(0u32, |n, d| d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))))
        .flatten()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or(UrlError::NotIpv4)?;
    if ipv4_literal(host).ok_or(UrlError::NotIpv4)? != wire_server.ip().octets() {
        return Err(UrlError::NotWireServer);
    }
    if port == 0 || !target.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
        return Err(UrlError::BadTarget);
    }
    Ok((SocketAddrV4::new(*wire_server.ip(), port), target))
}

/// Longest os-release file read (they are well under 1 KiB).
const OS_RELEASE_MAX_BYTES: usize = 16 * 1024;

/// The octets of a dotted-decimal IPv4 literal: four numbers of 1 to 3 digits, at most 255,
/// no leading zeros (no octal, no other encoding, no names).
fn ipv4_literal(host: &str) -> Option<[u8; 4]> {
    let mut octets = [0u8; 4];
    let mut parts = host.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || (part.len() > 1 && part.starts_with('0')) {
            return None;
        }
        let n = part.bytes().try_fold(0u16, |n, d| d.is_ascii_digit().then(|| n * 10 + u16::from(d - b'0')))?;
        *octet = u8::try_from(n).ok()?;
    }
    parts.next().is_none().then_some(octets)
}

/// What the OS says about itself, read once at start (before the seccomp filter).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OsInfo {
    /// `Linux:<NAME>-<VERSION_ID>` from `/etc/os-release`.
    pub os_version: Value,
    /// Total RAM in MiB.
    pub ram_mb: u64,
    /// Processors online.
    pub processors: u64,
    /// CPU architecture (`x86_64`, `aarch64`).
    pub arch: &'static str,
}

impl OsInfo {
    /// Reads `/etc/os-release` (or `/usr/lib/os-release`), `sysinfo` and `sysconf`.
    pub fn collect() -> Self {
        // Root-owned files of a few hundred bytes; a bigger one is not an os-release file.
        let release = std::fs::read("/etc/os-release")
            .or_else(|_missing| std::fs::read("/usr/lib/os-release"))
            .ok()
            .filter(|text| text.len() <= OS_RELEASE_MAX_BYTES)
            .unwrap_or_default();
        Self::from_parts(&release, crate::sys::total_ram_bytes() / (1024 * 1024), u64::from(crate::sys::online_cpus()))
    }

    /// From an os-release text and the numbers.
    pub fn from_parts(os_release: &[u8], ram_mb: u64, processors: u64) -> Self {
        let text = core::str::from_utf8(os_release).unwrap_or_default();
        let mut os_version = Value::new();
        // A value too long for the room is left out.
        for piece in ["Linux:", os_release_value(text, "NAME"), "-", os_release_value(text, "VERSION_ID")] {
            os_version.push_str(piece).ok();
        }
        Self { os_version, ram_mb, processors, arch: std::env::consts::ARCH }
    }
}

/// The value of `key` in an os-release file: `KEY=value`, `KEY="value"` or `KEY='value'`
/// (quotes removed; shell escapes inside are rare in NAME and VERSION_ID and kept as they are).
/// Empty when absent.
fn os_release_value<'a>(text: &'a str, key: &str) -> &'a str {
    let raw = text.split('\n').find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('=')).unwrap_or_default();
    match raw.as_bytes() {
        [q @ (b'"' | b'\''), .., last] if last == q => raw.get(1..raw.len() - 1).unwrap_or_default(),
        _ => raw,
    }
}

/// Everything the common parameters need; empty values until fetched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmMetadata {
    /// From the goal state.
    pub goal_state: GoalState,
    /// From the shared config.
    pub shared_config: SharedConfig,
    /// From IMDS.
    pub compute: Compute,
    /// From the OS.
    pub os: OsInfo,
}

impl VmMetadata {
    /// `RoleInstanceName`: the shared config's instance id, else the goal state's.
    pub fn role_instance_name(&self) -> &str {
        if self.shared_config.instance_id.is_empty() {
            &self.goal_state.instance_id
        } else {
            &self.shared_config.instance_id
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape the host serves (trimmed): the fields the reference parser needs, plus ones
    /// it ignores.
    const GOAL_STATE: &[u8] = br#"<?xml version="1.0" encoding="utf-8"?>
<GoalState xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:noNamespaceSchemaLocation="goalstate10.xsd">
  <Version>2015-04-05</Version>
  <Incarnation>1</Incarnation>
  <Machine><ExpectedState>Started</ExpectedState><LBProbePorts><Port>16001</Port></LBProbePorts></Machine>
  <Container>
    <ContainerId>a8016240-7286-49ef-8981-63520cb8f6d0</ContainerId>
    <RoleInstanceList>
      <RoleInstance>
        <InstanceId>deployment.vm_IN_0</InstanceId>
        <State>Started</State>
        <Configuration>
          <HostingEnvironmentConfig>http://168.63.129.16:80/machine/a/b?comp=config&amp;type=hostingEnvironmentConfig&amp;incarnation=1</HostingEnvironmentConfig>
          <SharedConfig>http://168.63.129.16:80/machine/a/b?comp=config&amp;type=sharedConfig&amp;incarnation=1</SharedConfig>
        </Configuration>
      </RoleInstance>
    </RoleInstanceList>
  </Container>
</GoalState>"#;

    const SHARED_CONFIG: &[u8] = br#"<?xml version="1.0" encoding="utf-8"?>
<SharedConfig version="1.0.0.0" goalStateIncarnation="1">
  <Deployment name="fake-deployment" guid="{3f2b6c1e}" incarnation="0">
    <Service name="not-this" guid="{0}" />
  </Deployment>
  <Role guid="{9a8b}" name="fake-vm" settleTimeSeconds="0" />
  <Instances>
    <Instance id="fake-deployment.fake-vm_IN_0" address="10.0.0.4"><FaultDomains randomId="0" /></Instance>
  </Instances>
</SharedConfig>"#;

    fn ws() -> SocketAddrV4 {
        "168.63.129.16:80".parse().unwrap()
    }

    #[test]
    fn reads_goal_state_and_shared_config() {
        let g = parse_goal_state(GOAL_STATE).unwrap();
        assert_eq!(g.container_id, "a8016240-7286-49ef-8981-63520cb8f6d0");
        assert_eq!(g.instance_id, "deployment.vm_IN_0");
        assert_eq!(
            g.shared_config_url,
            "http://168.63.129.16:80/machine/a/b?comp=config&type=sharedConfig&incarnation=1"
        );
        let s = parse_shared_config(SHARED_CONFIG).unwrap();
        assert_eq!(s.deployment_name, "fake-deployment");
        assert_eq!(s.role_name, "fake-vm");
        assert_eq!(s.instance_id, "fake-deployment.fake-vm_IN_0");
        let meta = VmMetadata { goal_state: g, shared_config: s, ..VmMetadata::default() };
        assert_eq!(meta.role_instance_name(), "fake-deployment.fake-vm_IN_0");
    }

    #[test]
    fn truncated_or_garbage_documents_are_errors() {
        let complete = GOAL_STATE.windows(12).position(|w| w == b"</Container>").unwrap() + 12;
        for cut in 0..GOAL_STATE.len() {
            // Until the Container element is complete, nothing is returned.
            let r = parse_goal_state(&GOAL_STATE[..cut]);
            assert_eq!(r.is_ok(), cut >= complete, "cut {cut}: {r:?}");
        }
        for cut in 0..SHARED_CONFIG.len() {
            drop(parse_shared_config(&SHARED_CONFIG[..cut]));
        }
        for garbage in
            [&b""[..], b"<GoalState>", b"\x00\xff<<<>>>", b"<GoalState><Container><ContainerId>x</Container>"]
        {
            assert!(parse_goal_state(garbage).is_err());
            assert!(parse_shared_config(garbage).is_err());
        }
    }

    #[test]
    fn shared_config_url_must_be_plain_http_to_the_wireserver_ip() {
        let ok = shared_config_target("http://168.63.129.16/machine/x?comp=config&type=sharedConfig", ws()).unwrap();
        assert_eq!(ok, (ws(), "/machine/x?comp=config&type=sharedConfig"));
        let (addr, _) = shared_config_target("http://168.63.129.16:8080/m", ws()).unwrap();
        assert_eq!(addr.port(), 8080, "the port may differ");
        for (url, why) in [
            ("https://168.63.129.16/m", UrlError::NotHttp),
            ("HTTP://168.63.129.16/m", UrlError::NotHttp),
            ("ftp://168.63.129.16/m", UrlError::NotHttp),
            ("http://example.com/m", UrlError::NotIpv4),
            ("http://user@168.63.129.16/m", UrlError::NotIpv4),
            ("http://168.63.129.16:x/m", UrlError::NotIpv4),
            ("http://168.63.129.16:99999/m", UrlError::NotIpv4),
            ("http://168.063.129.16/m", UrlError::NotIpv4),
            ("http://168.63.129.256/m", UrlError::NotIpv4),
            ("http://168.63.129/m", UrlError::NotIpv4),
            ("http://168.63.129.16.1/m", UrlError::NotIpv4),
            ("http://168.63.129.16:/m", UrlError::NotIpv4),
            ("http://168.63.129.16:123456/m", UrlError::NotIpv4),
            ("http://169.254.169.254/m", UrlError::NotWireServer),
            ("http://10.0.0.1:80/m", UrlError::NotWireServer),
            ("http://168.63.129.16", UrlError::BadTarget),
            ("http://168.63.129.16/a b", UrlError::BadTarget),
            ("http://168.63.129.16/a#frag", UrlError::BadTarget),
            ("http://168.63.129.16:0/m", UrlError::BadTarget),
            ("http:/", UrlError::NotHttp),
            ("", UrlError::NotHttp),
            ("http://é/", UrlError::NotIpv4),
        ] {
            assert_eq!(shared_config_target(url, ws()), Err(why), "{url}");
        }
    }

    #[test]
    fn os_release_values_are_unquoted() {
        let os = OsInfo::from_parts(
            b"PRETTY_NAME=\"Debian GNU/Linux 12\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID='12'\n",
            2048,
            4,
        );
        assert_eq!(os.os_version, "Linux:Debian GNU/Linux-12");
        assert_eq!((os.ram_mb, os.processors), (2048, 4));
        assert_eq!(OsInfo::from_parts(b"NAME=Alpine\nVERSION_ID=3.20.0", 0, 0).os_version, "Linux:Alpine-3.20.0");
        assert_eq!(OsInfo::from_parts(b"\xff", 0, 0).os_version, "Linux:-");
        assert_eq!(OsInfo::from_parts(b"NAME=\"", 0, 0).os_version, "Linux:\"-");
    }
}
