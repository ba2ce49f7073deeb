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

/// `struct gpa_policy_value`: which endpoint an intercepted destination is. Where the connect
/// goes instead is the agent's live listener (`gpa_listeners`), not a stored address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyValue {
    /// `enum gpa_endpoint`.
    pub endpoint: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
    /// Explicit padding, always zero.
    pub pad2: u32,
}

/// `gpa_caller.flags`: the task fields were read in the kernel (CO-RE object).
pub const CALLER_TASK_READ: u32 = 1 << 0;
/// `gpa_caller.flags`: the connecting task was being traced (ptrace) at connect time.
pub const CALLER_TRACED: u32 = 1 << 1;
/// `gpa_caller.flags`: the connecting task had no executable.
pub const CALLER_NO_EXE: u32 = 1 << 2;
/// `gpa_caller.flags`: the SYN was sent by another task than the one that connected (a
/// deferred TCP Fast Open SYN written by a fork or another thread).
pub const CALLER_SYN_OTHER_TASK: u32 = 1 << 3;

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
    /// `CLOCK_BOOTTIME` when the SYN left (sockops), nanoseconds.
    pub syn_boot_ns: u64,
    /// The process's start time (`start_boottime` of the thread group leader), nanoseconds
    /// since boot; 0 without [`CALLER_TASK_READ`].
    pub start_boot_ns: u64,
    /// Inode of the executable at connect time (`mm->exe_file`).
    pub exe_ino: u64,
    /// Device of that inode, kernel encoding (`major << 20 | minor`).
    pub exe_dev: u32,
    /// Process id (thread group id).
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// Real uid.
    pub uid: u32,
    /// Real gid.
    pub gid: u32,
    /// Effective uid (with [`CALLER_TASK_READ`]).
    pub euid: u32,
    /// Effective gid (with [`CALLER_TASK_READ`]).
    pub egid: u32,
    /// The agent generation the record was made under (`gpa_config.generation`).
    pub generation: u32,
    /// `CALLER_*` flags.
    pub flags: u32,
    /// Original destination IPv4, network byte order.
    pub orig_ip: u32,
    /// Original destination port, network byte order.
    pub orig_port: u16,
    /// `enum gpa_endpoint`.
    pub endpoint: u16,
    /// 1 when the caller used an AF_INET6 socket with a v4-mapped destination.
    pub is_v6: u32,
    /// The calling thread's comm, NUL-padded (audit only: the caller chooses it).
    pub comm: [u8; 16],
    /// The connecting task as the kernel knows it; zeroed by sockops once the SYN's task was
    /// compared with it, so always 0 here.
    pub connect_task: u64,
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
    /// Stamped into every record; each agent that does not share a listener picks a new one.
    pub generation: u32,
}

const _: () = assert!(size_of::<PolicyKey>() == 8);
const _: () = assert!(size_of::<PolicyValue>() == 8);
const _: () = assert!(size_of::<CallerRecord>() == 120);
const _: () = assert!(size_of::<AuditKey>() == 16);
const _: () = assert!(size_of::<ConfigValue>() == 8);

// SAFETY: repr(C), only integer fields, no implicit padding (sizes asserted above equal the
// sum of the fields), so every bit pattern is valid and no byte is uninitialised.
unsafe impl aya::Pod for PolicyKey {}
// SAFETY: as for PolicyKey: 2 + 2 + 4 bytes, no implicit padding.
unsafe impl aya::Pod for PolicyValue {}
// SAFETY: 6×8 + 10×4 + 2×2 + 4 + 16 + 8 = 120 bytes, no implicit padding; all fields integers.
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

    /// Whether the kernel read the task (executable inode, start time, effective ids).
    pub fn task_read(&self) -> bool {
        self.flags & CALLER_TASK_READ != 0
    }

    /// The executable's device in the encoding `stat(2)` uses (the kernel stores
    /// `major << 20 | minor`; userspace `dev_t` is `makedev(major, minor)`).
    pub fn exe_dev_userspace(&self) -> u64 {
        libc::makedev(self.exe_dev >> 20, self.exe_dev & 0xf_ffff)
    }

    /// A record with every field zero (tests and fuzzing build on it).
    pub const fn zeroed() -> Self {
        Self {
            cgroup_id: 0,
            netns_cookie: 0,
            connect_boot_ns: 0,
            syn_boot_ns: 0,
            start_boot_ns: 0,
            exe_ino: 0,
            exe_dev: 0,
            tgid: 0,
            tid: 0,
            uid: 0,
            gid: 0,
            euid: 0,
            egid: 0,
            generation: 0,
            flags: 0,
            orig_ip: 0,
            orig_port: 0,
            endpoint: 0,
            is_v6: 0,
            comm: [0; 16],
            connect_task: 0,
        }
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
            orig_ip: u32::from(Ipv4Addr::new(169, 254, 169, 254)).to_be(),
            orig_port: 80u16.to_be(),
            endpoint: 1,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            ..CallerRecord::zeroed()
        };
        assert_eq!(rec.original_destination().to_string(), "169.254.169.254:80");
        assert_eq!(rec.comm(), b"curl");
    }

    #[test]
    fn kernel_device_numbers_convert_to_the_stat_encoding() {
        // Measured on this machine kind: s_dev 266338304 is 254:0, which stat() gives as 65024.
        let rec = CallerRecord { exe_dev: 266_338_304, ..CallerRecord::zeroed() };
        assert_eq!(rec.exe_dev_userspace(), 65024);
        let rec = CallerRecord { exe_dev: (8 << 20) | 1, ..CallerRecord::zeroed() };
        assert_eq!(rec.exe_dev_userspace(), libc::makedev(8, 1));
    }
}
