// SPDX-License-Identifier: MIT
//! The proxy's listening address: where it is bound, where the tools find it, and whether the
//! socket that listens there is the agent's.
//!
//! The kernel redirects callers only to the agent's own listening socket (its entry in the
//! `gpa_listeners` map, which the kernel drops when the socket closes), never to an address.
//! So a user who binds the configured port while the agent is down receives no caller, and the
//! agent does not give up either: it listens on a free port of the same loopback address and
//! says so. The address in use is written to `<stateDirectory>/listener` for `--status`, which
//! also refuses to believe an answer from a port that a non-root user holds.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

/// Name of the file in the state directory that holds the address in use.
pub const ADDRESS_FILE: &str = "listener";

/// The file [`ADDRESS_FILE`] in `state_dir`.
pub fn address_file(state_dir: &Path) -> PathBuf {
    state_dir.join(ADDRESS_FILE)
}

/// Records `addr` as the address in use (atomically: a reader sees the old or the new one).
pub fn record_address(state_dir: &Path, addr: SocketAddrV4) -> io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(format!(".{ADDRESS_FILE}.tmp"));
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, address_file(state_dir))
}

/// The address the running agent recorded, else `configured`.
pub fn address_in_use(state_dir: &Path, configured: SocketAddrV4) -> SocketAddrV4 {
    std::fs::read_to_string(address_file(state_dir))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(configured)
}

/// One socket in LISTEN state, as `/proc/net/tcp{,6}` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    /// Local address.
    pub ip: IpAddr,
    /// Local port.
    pub port: u16,
    /// Owner.
    pub uid: u32,
}

/// Every socket in LISTEN state in the text of `/proc/net/tcp` or `/proc/net/tcp6`.
pub fn listening(table: &str) -> impl Iterator<Item = Listening> + '_ {
    const TCP_LISTEN: &str = "0A";
    table.lines().skip(1).filter_map(|line| {
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
        let mut f = line.split_whitespace();
        let local = f.nth(1)?;
        let state = f.nth(1)?;
        let uid = f.nth(3)?;
        let (ip_hex, port_hex) = local.split_once(':')?;
        if state != TCP_LISTEN {
            return None;
        }
        Some(Listening {
            ip: proc_net_addr(ip_hex)?,
            port: u16::from_str_radix(port_hex, 16).ok()?,
            uid: uid.parse().ok()?,
        })
    })
}

/// The kernel prints each 32-bit word of the address as a native-endian hex number.
pub(crate) fn proc_net_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| hex.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()).map(u32::to_ne_bytes);
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for (i, chunk) in b.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Uids of every socket that listens where a connect to `addr` would land: the exact
/// address, or a wildcard on the same port (IPv4 `0.0.0.0`, IPv6 `::`), from the text of
/// `/proc/net/tcp` and `/proc/net/tcp6`.
pub fn owners(tcp: &str, tcp6: &str, addr: SocketAddrV4) -> Vec<u32> {
    let covers = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4 == *addr.ip() || v4 == Ipv4Addr::UNSPECIFIED,
        IpAddr::V6(v6) => v6.is_unspecified() || v6.to_ipv4_mapped() == Some(*addr.ip()),
    };
    listening(tcp).chain(listening(tcp6)).filter(|s| s.port == addr.port() && covers(s.ip)).map(|s| s.uid).collect()
}

/// The uids of the sockets listening at `addr` on this machine (this network namespace).
pub fn owners_now(addr: SocketAddrV4) -> Vec<u32> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let tcp6 = std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    owners(&tcp, &tcp6, addr)
}

/// Whether what listens at `addr` can only be the agent (root's): someone listens, and every
/// socket that could take the connection belongs to uid 0.
pub fn held_by_root_only(addr: SocketAddrV4) -> Result<(), String> {
    let owners = owners_now(addr);
    if owners.is_empty() {
        return Err(format!("nothing listens on {addr}"));
    }
    match owners.iter().find(|uid| **uid != 0) {
        Some(uid) => Err(format!("{addr} is held by uid {uid}, not by the agent")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str =
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    #[test]
    fn owners_are_read_for_the_exact_address_and_wildcards_only() {
        let tcp = format!(
            "{HEADER}   0: 0100007F:0C08 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
             \x20  1: 00000000:0C08 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 2 1\n\
             \x20  2: 0200007F:0C08 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 3 1\n\
             \x20  3: 0100007F:0C09 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 4 1\n\
             \x20  4: 0100007F:0C08 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1002        0 5 1\n"
        );
        let tcp6 = format!(
            "{HEADER}   0: 00000000000000000000000000000000:0C08 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   42        0 6 1\n"
        );
        let addr: SocketAddrV4 = "127.0.0.1:3080".parse().unwrap();
        assert_eq!(owners(&tcp, &tcp6, addr), [0, 65534, 42]);
        assert!(owners(&tcp, "", "127.0.0.1:3081".parse().unwrap()).contains(&1001));
    }

    #[test]
    fn the_recorded_address_wins_over_the_configured_one() {
        let dir = std::env::temp_dir().join(format!("gpa-listener-{}", std::process::id()));
        let configured: SocketAddrV4 = "127.0.0.1:3080".parse().unwrap();
        assert_eq!(address_in_use(&dir, configured), configured);
        record_address(&dir, "127.0.0.1:41234".parse().unwrap()).unwrap();
        assert_eq!(address_in_use(&dir, configured).port(), 41234);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
