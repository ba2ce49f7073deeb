// SPDX-License-Identifier: MIT
//! The user-space half of the eBPF redirector: loads the embedded kernel programs, attaches
//! them to a cgroup, keeps the policy map (which endpoints are intercepted) and hands the
//! proxy the caller recorded for each redirected connection.
//!
//! Design and kernel facts: `../shared/spec/ebpf-redirector.md` and `docs/DESIGN.md`.

#[expect(unsafe_code, reason = "the aya::Pod impls of the kernel-shared structs; each names its padding argument")]
pub mod maps;

use std::fmt;
use std::fs::File;
use std::net::SocketAddrV4;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, MapError};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps};
use aya::{Ebpf, EbpfError, EbpfLoader};

pub use self::maps::{AuditKey, CallerRecord, Endpoint};
use self::maps::{ConfigValue, PolicyKey, PolicyValue};

/// The compiled kernel programs, built from `ebpf/redirect.bpf.c` by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect.bpf.o"));

/// Program names in the object, in attach order (sockops first, so that no connect is
/// rewritten before its identity can be re-keyed).
const PROGRAMS: [&str; 3] = ["gpa_sockops", "gpa_connect4", "gpa_connect6"];
/// Map names in the object (all pinned when pinning is on).
const MAPS: [&str; 5] = ["gpa_policy", "gpa_skip", "gpa_config", "gpa_pending", "gpa_audit"];
/// Sub-directory of the pin path for this map layout. A change to any struct in
/// `ebpf/maps.h` must bump it, so an upgraded agent never reuses maps of another layout.
pub const PIN_LAYOUT: &str = "v1";

/// Why the redirector could not start or change.
#[derive(Debug)]
pub enum RedirectError {
    /// The kernel refused the object (BPF syscall missing, verifier, permissions).
    LoadObject(EbpfError),
    /// A program is missing from the object (build mismatch).
    MissingProgram(&'static str),
    /// Loading or attaching one program failed.
    Program(&'static str, ProgramError),
    /// A map is missing or has the wrong key/value size.
    Map(&'static str, MapError),
    /// The cgroup directory could not be opened.
    OpenCgroup(PathBuf, std::io::Error),
    /// The pin directory could not be prepared (no bpffs, not a directory, mount failed).
    PinDirectory(PathBuf, std::io::Error),
    /// Pinning a new link, or adopting a pinned one, failed.
    Pin(&'static str, std::io::Error),
}

impl fmt::Display for RedirectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LoadObject(e) => write!(f, "loading the eBPF object failed: {e}"),
            Self::MissingProgram(name) => write!(f, "eBPF program {name} missing from the object"),
            Self::Program(name, e) => {
                write!(f, "eBPF program {name}: {e}")?;
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
            Self::Map(name, e) => write!(f, "eBPF map {name}: {e}"),
            Self::OpenCgroup(path, e) => write!(f, "cannot open cgroup {}: {e}", path.display()),
            Self::PinDirectory(path, e) => write!(f, "cannot use pin directory {}: {e}", path.display()),
            Self::Pin(name, e) => write!(f, "pinning eBPF link {name}: {e}"),
        }
    }
}

impl std::error::Error for RedirectError {}

/// Loaded and attached kernel programs plus the maps the agent uses.
#[derive(Debug)]
pub struct Redirector {
    // Owns the programs and their links while they are not pinned: dropping the redirector
    // then detaches them. With pins the kernel holds them and the loader's memory is freed.
    _ebpf: Option<Ebpf>,
    policy: HashMap<MapData, PolicyKey, PolicyValue>,
    audit: HashMap<MapData, AuditKey, CallerRecord>,
    cgroup: PathBuf,
}

impl Redirector {
    /// Loads the embedded object, exempts the agent (by `SO_MARK` and by tgid), and attaches
    /// the programs to `cgroup`.
    ///
    /// With `pins` (a directory on a bpf filesystem), the maps and links are pinned there so
    /// that the redirect outlives this process: while no agent runs, redirected connects are
    /// refused instead of reaching the endpoints (fail-closed, MSP §11 item 8). A later agent
    /// *adopts* that state: it reuses the pinned maps (routes stay installed) and swaps its
    /// freshly loaded programs into the pinned links with `BPF_LINK_UPDATE` — atomically, so
    /// there is never a moment with no program or with two.
    ///
    /// Without pins, the policy map starts empty and dropping the redirector detaches.
    pub fn attach(cgroup: &Path, agent_mark: u32, agent_tgid: u32, pins: Option<&Path>) -> Result<Self, RedirectError> {
        let pin_dir = pins.map(prepare_pin_dir).transpose()?;
        let mut loader = EbpfLoader::new();
        // The programs read no kernel structures (no CO-RE): parsing the kernel's multi-MiB
        // BTF would only cost start-up time and memory.
        loader.btf(None);
        let map_paths: Vec<(&str, PathBuf)> =
            pin_dir.iter().flat_map(|dir| MAPS.iter().map(move |name| (*name, dir.join(name)))).collect();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(RedirectError::LoadObject)?;

        let mut config: Array<_, ConfigValue> = take_map(&mut ebpf, "gpa_config")?;
        config.set(0, ConfigValue { agent_mark, pad: 0 }, 0).map_err(|e| RedirectError::Map("gpa_config", e))?;
        let mut skip: HashMap<_, u32, u32> = take_map(&mut ebpf, "gpa_skip")?;
        // A previous agent's tgid may belong to another process by now: only ours stays.
        let stale: Vec<u32> = skip.keys().filter_map(Result::ok).filter(|k| *k != agent_tgid).collect();
        for tgid in stale {
            drop(skip.remove(&tgid));
        }
        skip.insert(agent_tgid, 1, 0).map_err(|e| RedirectError::Map("gpa_skip", e))?;
        let policy = take_map(&mut ebpf, "gpa_policy")?;
        let audit = take_map(&mut ebpf, "gpa_audit")?;

        let cgroup_dir = File::open(cgroup).map_err(|e| RedirectError::OpenCgroup(cgroup.to_owned(), e))?;
        // On cgroup v2 the directory's inode number is the cgroup id links report.
        let cgroup_id = cgroup_dir.metadata().map_err(|e| RedirectError::OpenCgroup(cgroup.to_owned(), e))?.ino();
        for name in PROGRAMS {
            let program = ebpf.program_mut(name).ok_or(RedirectError::MissingProgram(name))?;
            let link_pin = pin_dir.as_ref().map(|d| d.join(format!("link-{name}")));
            let pinned = link_pin.as_deref().filter(|p| p.exists());
            let program_err = |e| RedirectError::Program(name, e);
            let pin_err = |e: aya::programs::links::LinkError| RedirectError::Pin(name, std::io::Error::other(e));
            // SockOps and CgroupSockAddr share the method names but no trait: one macro body
            // serves both, so the adopt-or-attach logic exists once.
            macro_rules! load_and_attach {
                ($program:ty) => {{
                    let p: &mut $program = program.try_into().map_err(program_err)?;
                    p.load().map_err(program_err)?;
                    let adopted = match pinned {
                        Some(path) => adopt_pinned_link(name, path, cgroup_id, p.fd().map_err(program_err)?.as_fd())?,
                        None => false,
                    };
                    if !adopted {
                        let id = p.attach(&cgroup_dir, CgroupAttachMode::Single).map_err(program_err)?;
                        if let Some(path) = &link_pin {
                            let link = FdLink::try_from(p.take_link(id).map_err(program_err)?).map_err(pin_err)?;
                            pin_link(name, link, path)?;
                        }
                    }
                }};
            }
            if name == "gpa_sockops" {
                load_and_attach!(SockOps);
            } else {
                load_and_attach!(CgroupSockAddr);
            }
        }
        let ebpf = if pin_dir.is_some() { None } else { Some(ebpf) };
        Ok(Self { _ebpf: ebpf, policy, audit, cgroup: cgroup.to_owned() })
    }

    /// Whether connects to `destination` are currently sent to `proxy` (after adopting pinned
    /// state, these are the previous agent's routes; one to another address does not count).
    pub fn routed(&self, destination: SocketAddrV4, proxy: SocketAddrV4) -> bool {
        self.policy
            .get(&policy_key(destination), 0)
            .is_ok_and(|v| v.proxy_ip == u32::from(*proxy.ip()).to_be() && v.proxy_port == proxy.port().to_be())
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Starts intercepting TCP connects to `destination`, sending them to `proxy`.
    pub fn set_route(
        &mut self,
        destination: SocketAddrV4,
        proxy: SocketAddrV4,
        endpoint: Endpoint,
    ) -> Result<(), RedirectError> {
        let value = PolicyValue {
            proxy_ip: u32::from(*proxy.ip()).to_be(),
            proxy_port: proxy.port().to_be(),
            endpoint: endpoint.to_raw(),
        };
        self.policy.insert(policy_key(destination), value, 0).map_err(|e| RedirectError::Map("gpa_policy", e))
    }

    /// Stops intercepting `destination` (absent already is fine).
    pub fn remove_route(&mut self, destination: SocketAddrV4) -> Result<(), RedirectError> {
        match self.policy.remove(&policy_key(destination)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(RedirectError::Map("gpa_policy", e)),
        }
    }

    /// Reads and deletes the caller recorded for a redirected connection. `None` means the
    /// connection was not redirected (a direct connect to the listener) or its record was
    /// evicted: either way it has no identity.
    pub fn take_caller(&mut self, key: &AuditKey) -> Option<CallerRecord> {
        let record = self.audit.get(key, 0).ok()?;
        // A failed delete only leaves a stale LRU entry that a later connection from the
        // same port would overwrite in the kernel first (BPF_ANY), so it cannot be misused.
        drop(self.audit.remove(key));
        Some(record)
    }
}

/// Makes sure `pins` is a usable directory on a bpf filesystem, mounting bpffs at its parent
/// when that parent is the conventional `/sys/fs/bpf` and nothing is mounted there yet.
fn prepare_pin_dir(pins: &Path) -> Result<PathBuf, RedirectError> {
    let err = |e: std::io::Error| RedirectError::PinDirectory(pins.to_owned(), e);
    let parent = pins.parent().ok_or_else(|| err(std::io::Error::other("pin path has no parent")))?;
    if !crate::sys::is_bpffs(parent) {
        if parent != Path::new("/sys/fs/bpf") {
            return Err(err(std::io::Error::other("parent directory is not a bpf filesystem")));
        }
        crate::sys::mount_bpffs(parent).map_err(err)?;
    }
    let dir = pins.join(PIN_LAYOUT);
    std::fs::create_dir_all(&dir).map_err(err)?;
    Ok(dir)
}

fn pin_link(name: &'static str, link: FdLink, path: &Path) -> Result<(), RedirectError> {
    // The pin keeps the link (and so the attachment) alive after this process exits.
    link.pin(path).map(drop).map_err(|e| RedirectError::Pin(name, std::io::Error::other(e)))
}

/// Swaps `program` into the link pinned at `path` when that link is alive and attached to
/// `cgroup_id`. Returns `false` (after removing the stale pin) when it is not — its cgroup
/// was removed, or it belongs to another cgroup — so the caller attaches afresh.
fn adopt_pinned_link(
    name: &'static str,
    path: &Path,
    cgroup_id: u64,
    program: std::os::fd::BorrowedFd<'_>,
) -> Result<bool, RedirectError> {
    let link = crate::sys::bpf_obj_get(path).map_err(|e| RedirectError::Pin(name, e))?;
    let attached_to = crate::sys::bpf_link_cgroup_id(link.as_fd()).map_err(|e| RedirectError::Pin(name, e))?;
    if attached_to != cgroup_id {
        log::warn!(target: "gpa::redirect", "stale pinned link replaced: program={name} pinned_cgroup={attached_to} configured_cgroup={cgroup_id}");
        std::fs::remove_file(path).map_err(|e| RedirectError::Pin(name, e))?;
        return Ok(false);
    }
    crate::sys::bpf_link_update(link.as_fd(), program).map_err(|e| RedirectError::Pin(name, e))?;
    Ok(true)
}

/// Removes the pinned links and maps under `pins` (`guest-proxy-agent detach`): once no
/// process holds them, the programs detach and the endpoints are reachable directly again.
/// Returns how many pins were removed.
pub fn detach_pinned(pins: &Path) -> std::io::Result<usize> {
    let dir = pins.join(PIN_LAYOUT);
    let mut removed = 0;
    for entry in std::fs::read_dir(&dir)? {
        std::fs::remove_file(entry?.path())?;
        removed += 1;
    }
    std::fs::remove_dir(&dir)?;
    drop(std::fs::remove_dir(pins));
    Ok(removed)
}

fn policy_key(destination: SocketAddrV4) -> PolicyKey {
    PolicyKey { ip: u32::from(*destination.ip()).to_be(), port: destination.port().to_be(), pad: 0 }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(RedirectError::Map(name, MapError::InvalidName { name: name.to_owned() }))?;
    T::try_from(map).map_err(|e| RedirectError::Map(name, e))
}

/// The cgroup v2 mount point from `/proc/self/mountinfo` (on a hybrid host,
/// `/sys/fs/cgroup/unified`).
pub fn find_cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&mountinfo)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source ...
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split(' ').next()?;
        (fstype == "cgroup2").then(|| left.split(' ').nth(4).map(PathBuf::from)).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_a_hybrid_host() {
        let info = "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:4 - cgroup2 cgroup2 rw\n\
                    27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(info), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_cgroup2_mount("27 25 0:24 / /x rw - cgroup cgroup rw\n"), None);
    }

    #[test]
    fn embedded_object_is_an_elf_bpf_file() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        // e_machine EM_BPF (247), little-endian.
        assert_eq!(u16::from_le_bytes([OBJECT[18], OBJECT[19]]), 247);
    }
}
