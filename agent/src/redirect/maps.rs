// SPDX-License-Identifier: MIT
//! The Rust mirror of `ebpf/maps.h`. Read that file first: both sides must agree byte for
//! byte. Every struct is `#[repr(C)]` with explicit padding fields (so no uninitialised byte is
//! ever handed to the kernel) and a compile-time size assertion.

use std::net::Ipv4Addr;

/// `struct gpa_policy_key`: a destination to intercept (ip and port in network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyKey {
    /// Destination IPv4 address, network byte order.
    pub ip: u32,
    /// Destination port, network byte order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
}

/// `struct gpa_policy_value`: where to connect instead, and which endpoint it was.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyValue {
    /// Proxy IPv4 address, network byte order.
    pub proxy_ip: u32,
    /// Proxy port, network byte order.
    pub proxy_port: u16,
    /// `enum gpa_endpoint`.
    pub endpoint: u16,
}

/// `struct gpa_caller`: who connected, captured in the kernel at connect time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerRecord {
    /// cgroup v2 id of the caller.
    pub cgroup_id: u64,
    /// Network namespace cookie of the caller's socket.
    pub netns_cookie: u64,
    /// `CLOCK_BOOTTIME` at connect, nanoseconds.
    pub connect_boot_ns: u64,
    /// Process id (thread group id).
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// Real uid.
    pub uid: u32,
    /// Real gid.
    pub gid: u32,
    /// Original destination IPv4, network byte order.
    pub orig_ip: u32,
    /// Original destination port, network byte order.
    pub orig_port: u16,
    /// `enum gpa_endpoint`.
    pub endpoint: u16,
    /// 1 when the caller used an AF_INET6 socket with a v4-mapped destination.
    pub is_v6: u32,
    /// Explicit padding.
    pub pad: u32,
    /// The calling thread's comm, NUL-padded.
    pub comm: [u8; 16],
}

/// `struct gpa_audit_key`: the client end of a redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditKey {
    /// Network namespace cookie.
    pub netns_cookie: u64,
    /// Client IPv4 address, network byte order.
    pub src_ip: u32,
    /// Client port, host byte order.
    pub src_port: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
}

/// `struct gpa_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigValue {
    /// `SO_MARK` value of the agent's own sockets (0: none).
    pub agent_mark: u32,
    /// Explicit padding.
    pub pad: u32,
}

const _: () = assert!(size_of::<PolicyKey>() == 8);
const _: () = assert!(size_of::<PolicyValue>() == 8);
const _: () = assert!(size_of::<CallerRecord>() == 72);
const _: () = assert!(size_of::<AuditKey>() == 16);
const _: () = assert!(size_of::<ConfigValue>() == 8);

// SAFETY: repr(C), only integer fields, no implicit padding (sizes asserted above equal the
// sum of the fields), so every bit pattern is valid and no byte is uninitialised.
unsafe impl aya::Pod for PolicyKey {}
// SAFETY: as for PolicyKey: 4 + 2 + 2 bytes, no implicit padding.
unsafe impl aya::Pod for PolicyValue {}
// SAFETY: 3×8 + 5×4 + 2×2 + 2×4 + 16 = 72 bytes, no implicit padding; all fields integers.
unsafe impl aya::Pod for CallerRecord {}
// SAFETY: 8 + 4 + 2 + 2 = 16 bytes, no implicit padding.
unsafe impl aya::Pod for AuditKey {}
// SAFETY: 4 + 4 bytes, no implicit padding.
unsafe impl aya::Pod for ConfigValue {}

/// Which metadata endpoint a connection was headed for (`enum gpa_endpoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// Azure Instance Metadata Service, 169.254.169.254:80.
    Imds,
    /// WireServer, 168.63.129.16:80.
    WireServer,
    /// HostGAPlugin, 168.63.129.16:32526.
    HostGaPlugin,
    /// A value this agent does not know (kept, not rejected: forward compatibility).
    Unknown(u16),
}

impl Endpoint {
    /// All known endpoints, in the order of the status document.
    pub const ALL: [Self; 3] = [Self::WireServer, Self::Imds, Self::HostGaPlugin];

    /// The kernel's number for it.
    pub fn to_raw(self) -> u16 {
        match self {
            Self::Imds => 1,
            Self::WireServer => 2,
            Self::HostGaPlugin => 3,
            Self::Unknown(v) => v,
        }
    }

    /// From the kernel's number.
    pub fn from_raw(raw: u16) -> Self {
        match raw {
            1 => Self::Imds,
            2 => Self::WireServer,
            3 => Self::HostGaPlugin,
            v => Self::Unknown(v),
        }
    }

    /// Short name for logs and audit records.
    pub fn name(self) -> &'static str {
        match self {
            Self::Imds => "imds",
            Self::WireServer => "wireserver",
            Self::HostGaPlugin => "hostgaplugin",
            Self::Unknown(_) => "unknown",
        }
    }
}

impl CallerRecord {
    /// The original destination the caller asked for.
    pub fn original_destination(&self) -> std::net::SocketAddrV4 {
        std::net::SocketAddrV4::new(Ipv4Addr::from(u32::from_be(self.orig_ip)), u16::from_be(self.orig_port))
    }

    /// The comm bytes without NUL padding.
    pub fn comm(&self) -> &[u8] {
        let end = self.comm.iter().position(|b| *b == 0).unwrap_or(self.comm.len());
        &self.comm[..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_numbers_round_trip_and_unknown_is_kept() {
        for e in Endpoint::ALL {
            assert_eq!(Endpoint::from_raw(e.to_raw()), e);
        }
        assert_eq!(Endpoint::from_raw(9), Endpoint::Unknown(9));
    }

    #[test]
    fn original_destination_is_decoded_from_network_order() {
        let rec = CallerRecord {
            cgroup_id: 0,
            netns_cookie: 0,
            connect_boot_ns: 0,
            tgid: 0,
            tid: 0,
            uid: 0,
            gid: 0,
            orig_ip: u32::from(Ipv4Addr::new(169, 254, 169, 254)).to_be(),
            orig_port: 80u16.to_be(),
            endpoint: 1,
            is_v6: 0,
            pad: 0,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        assert_eq!(rec.original_destination().to_string(), "169.254.169.254:80");
        assert_eq!(rec.comm(), b"curl");
    }
}
