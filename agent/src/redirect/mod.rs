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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, MapError, SockHash};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps};
use aya::{Ebpf, EbpfError, EbpfLoader};

pub use self::maps::{
    AuditKey, CALLER_NO_EXE, CALLER_SYN_OTHER_TASK, CALLER_TASK_READ, CALLER_TRACED, CallerRecord, Endpoint,
};
use self::maps::{ConfigValue, PolicyKey, PolicyValue};

/// The compiled kernel programs, built from `ebpf/redirect.bpf.c` by `build.rs`: this one reads
/// the connecting task with CO-RE (needs the kernel's BTF).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect.bpf.o"));
/// The same programs without the task read, for kernels without BTF (the agent then binds the
/// executable through `/proc`, see `identity`).
pub static OBJECT_PROCFS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect-procfs.bpf.o"));

/// Program names in the object, in attach order (sockops first, so that no connect is
/// rewritten before its identity can be re-keyed).
const PROGRAMS: [&str; 3] = ["gpa_sockops", "gpa_connect4", "gpa_connect6"];
/// Map names in the object (all pinned when pinning is on).
const MAPS: [&str; 6] = ["gpa_policy", "gpa_skip", "gpa_config", "gpa_pending", "gpa_audit", "gpa_listeners"];
/// Sub-directory of the pin path for this map layout. A change to any struct in
/// `ebpf/maps.h` must bump it, so an upgraded agent never reuses maps of another layout.
pub const PIN_LAYOUT: &str = "v2";
/// Earlier layouts: their pinned links are adopted (the new program swapped in atomically) and
/// their pins removed, so an upgrade neither stacks programs nor opens a window.
const OLDER_PIN_LAYOUTS: [&str; 1] = ["v1"];

/// Where the caller's executable identity comes from, as loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskIdentity {
    /// The kernel records the executable's device and inode, the start time and the
    /// effective ids at connect (the CO-RE object).
    Kernel,
    /// The fallback object: `/proc` at accept time; the text says why.
    Procfs(String),
}

/// Why the proxy did not get a caller for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRecord {
    /// No record: a direct connect to the listener, or an evicted entry.
    Missing,
    /// Made under another agent's generation (left over from before a restart).
    OtherGeneration,
    /// Older than `RECORD_MAX_AGE_MS`.
    Stale,
}

impl NoRecord {
    /// Short reason for logs and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "no kernel record",
            Self::OtherGeneration => "record of another agent generation",
            Self::Stale => "stale kernel record",
        }
    }
}

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
    generation: u32,
    task_identity: TaskIdentity,
}

/// What [`Redirector::attach`] needs besides the cgroup.
#[derive(Debug)]
pub struct AttachOptions<'a> {
    /// `SO_MARK` of the agent's own sockets.
    pub agent_mark: u32,
    /// The agent's tgid (also never redirected).
    pub agent_tgid: u32,
    /// Pin directory on a bpffs, or `None`.
    pub pins: Option<&'a Path>,
    /// The agent's listening socket: the only place redirected connects can go.
    pub listener: BorrowedFd<'a>,
    /// Its network namespace cookie.
    pub netns_cookie: u64,
    /// Whether to try the kernel task record at all (`callerIdentity: kernel`).
    pub kernel_identity: bool,
    /// Keep the pinned generation and records: the listener is shared with an early agent
    /// that is still accepting from it (hand-over).
    pub keep_records: bool,
}

impl Redirector {
    /// Loads the embedded object, exempts the agent (by `SO_MARK` and by tgid), registers the
    /// agent's listener as the only redirect target, and attaches the programs to `cgroup`.
    ///
    /// With `pins` (a directory on a bpf filesystem), the maps and links are pinned there so
    /// that the redirect outlives this process: while no agent runs, redirected connects are
    /// refused in the kernel (the listener entry went with the socket: fail-closed, MSP §11
    /// item 8). A later agent *adopts* that state: it reuses the pinned maps (routes stay
    /// installed) and swaps its freshly loaded programs into the pinned links with
    /// `BPF_LINK_UPDATE`, atomically, so there is never a moment with no program or with two.
    /// Unless it shares the listener with a still-running early agent, it starts a new record
    /// generation and deletes every record left in the maps: nothing recorded for another agent
    /// can be claimed by a connection to this one.
    ///
    /// Without pins, the policy map starts empty and dropping the redirector detaches.
    pub fn attach(cgroup: &Path, opts: &AttachOptions<'_>) -> Result<Self, RedirectError> {
        let pin_dir = opts.pins.map(prepare_pin_dir).transpose()?;
        let (mut ebpf, task_identity) = load_object(pin_dir.as_deref(), opts.kernel_identity)?;

        let mut config: Array<_, ConfigValue> = take_map(&mut ebpf, "gpa_config")?;
        let previous = config.get(&0, 0).map(|c| c.generation).unwrap_or(0);
        let generation = match (opts.keep_records, previous) {
            (true, g) if g != 0 => g,
            (_, g) => g.wrapping_add(1).max(1),
        };
        config
            .set(0, ConfigValue { agent_mark: opts.agent_mark, generation }, 0)
            .map_err(|e| RedirectError::Map("gpa_config", e))?;
        let mut skip: HashMap<_, u32, u32> = take_map(&mut ebpf, "gpa_skip")?;
        // A previous agent's tgid may belong to another process by now: only ours stays.
        let stale: Vec<u32> = skip.keys().filter_map(Result::ok).filter(|k| *k != opts.agent_tgid).collect();
        for tgid in stale {
            drop(skip.remove(&tgid));
        }
        skip.insert(opts.agent_tgid, 1, 0).map_err(|e| RedirectError::Map("gpa_skip", e))?;
        let policy = take_map(&mut ebpf, "gpa_policy")?;
        let mut audit: HashMap<MapData, AuditKey, CallerRecord> = take_map(&mut ebpf, "gpa_audit")?;
        let mut pending: HashMap<MapData, u64, CallerRecord> = take_map(&mut ebpf, "gpa_pending")?;
        if !opts.keep_records {
            let cleared = clear(&mut audit) + clear(&mut pending);
            if cleared > 0 {
                log::info!(target: "gpa::redirect", "deleted {cleared} kernel records left by an earlier agent");
            }
        }
        // The map keeps the entry (the programs hold the map); the kernel removes it when the
        // listening socket closes.
        let mut listeners: SockHash<MapData, u64> = take_map(&mut ebpf, "gpa_listeners")?;
        listeners
            .insert(opts.netns_cookie, opts.listener.as_raw_fd(), 0)
            .map_err(|e| RedirectError::Map("gpa_listeners", e))?;

        let cgroup_dir = File::open(cgroup).map_err(|e| RedirectError::OpenCgroup(cgroup.to_owned(), e))?;
        // On cgroup v2 the directory's inode number is the cgroup id links report.
        let cgroup_id = cgroup_dir.metadata().map_err(|e| RedirectError::OpenCgroup(cgroup.to_owned(), e))?.ino();
        for name in PROGRAMS {
            let program = ebpf.program_mut(name).ok_or(RedirectError::MissingProgram(name))?;
            let link_pin = pin_dir.as_ref().map(|d| d.join(format!("link-{name}")));
            let pinned = link_pin.as_deref().and_then(|p| pinned_link(p, name));
            let program_err = |e| RedirectError::Program(name, e);
            let pin_err = |e: aya::programs::links::LinkError| RedirectError::Pin(name, std::io::Error::other(e));
            // SockOps and CgroupSockAddr share the method names but no trait: one macro body
            // serves both, so the adopt-or-attach logic exists once.
            macro_rules! load_and_attach {
                ($program:ty) => {{
                    // Loaded already by `load_object`.
                    let p: &mut $program = program.try_into().map_err(program_err)?;
                    let adopted = match (&pinned, &link_pin) {
                        (Some(found), Some(want)) => {
                            adopt_pinned_link(name, found, want, cgroup_id, p.fd().map_err(program_err)?.as_fd())?
                        }
                        _ => false,
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
        if let Some(dir) = &pin_dir {
            remove_older_layouts(dir);
        }
        let ebpf = if pin_dir.is_some() { None } else { Some(ebpf) };
        Ok(Self { _ebpf: ebpf, policy, audit, cgroup: cgroup.to_owned(), generation, task_identity })
    }

    /// Where executable identities come from with the programs as loaded.
    pub fn task_identity(&self) -> &TaskIdentity {
        &self.task_identity
    }

    /// Whether connects to `destination` are currently intercepted (after adopting pinned
    /// state, these are the previous agent's routes).
    pub fn routed(&self, destination: SocketAddrV4) -> bool {
        self.policy.get(&policy_key(destination), 0).is_ok()
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Starts intercepting TCP connects to `destination`, sending them to the agent's
    /// listener.
    pub fn set_route(&mut self, destination: SocketAddrV4, endpoint: Endpoint) -> Result<(), RedirectError> {
        let value = PolicyValue { endpoint: endpoint.to_raw(), pad: 0, pad2: 0 };
        self.policy.insert(policy_key(destination), value, 0).map_err(|e| RedirectError::Map("gpa_policy", e))
    }

    /// Stops intercepting `destination` (absent already is fine).
    pub fn remove_route(&mut self, destination: SocketAddrV4) -> Result<(), RedirectError> {
        match self.policy.remove(&policy_key(destination)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(RedirectError::Map("gpa_policy", e)),
        }
    }

    /// Reads and deletes the caller recorded for a redirected connection. A record is taken
    /// once, by the connection it was made for: it must carry this agent's generation and be
    /// fresh (`now_boot_ns` is `CLOCK_BOOTTIME`); the kernel already removed it if the client
    /// socket that made it closed. Anything else means the connection has no identity.
    pub fn take_caller(&mut self, key: &AuditKey, now_boot_ns: u64) -> Result<CallerRecord, NoRecord> {
        let record = self.audit.get(key, 0).map_err(|_absent| NoRecord::Missing)?;
        // A failed delete only leaves an entry that the kernel removes when its socket closes
        // and that a later take refuses as taken-too-late or of another generation.
        drop(self.audit.remove(key));
        accept_record(record, self.generation, now_boot_ns)
    }
}

/// The freshness and generation rules of [`Redirector::take_caller`], apart for unit tests.
fn accept_record(record: CallerRecord, generation: u32, now_boot_ns: u64) -> Result<CallerRecord, NoRecord> {
    if record.generation != generation {
        return Err(NoRecord::OtherGeneration);
    }
    let age_ns = now_boot_ns.saturating_sub(record.connect_boot_ns);
    if age_ns > crate::limits::RECORD_MAX_AGE_MS * 1_000_000 {
        return Err(NoRecord::Stale);
    }
    Ok(record)
}

/// Where the kernel publishes its own BTF.
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Loads the CO-RE object with the kernel's BTF when asked and possible, else the fallback.
fn load_object(pin_dir: Option<&Path>, kernel_identity: bool) -> Result<(Ebpf, TaskIdentity), RedirectError> {
    let map_paths: Vec<(&str, PathBuf)> =
        pin_dir.iter().flat_map(|dir| MAPS.iter().map(move |name| (*name, dir.join(name)))).collect();
    // Loads the object and every program in it: a kernel that accepts the object but refuses
    // one of its programs (a helper it lacks) must fall back too, not fail the start.
    // `EbpfLoader::new` itself reads and parses the kernel BTF (aya 0.14): the CO-RE object
    // uses that copy, and the fallback drops it. Parsing it a second time here would double
    // the start-up peak (measured: 34 MiB instead of 20 MiB).
    let load = |object: &[u8], with_btf: bool| -> Result<Ebpf, RedirectError> {
        let mut loader = EbpfLoader::new();
        if !with_btf {
            loader.btf(None);
        }
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(RedirectError::LoadObject)?;
        for name in PROGRAMS {
            let program = ebpf.program_mut(name).ok_or(RedirectError::MissingProgram(name))?;
            let loaded = if name == "gpa_sockops" {
                <&mut SockOps>::try_from(program).and_then(|p| p.load())
            } else {
                <&mut CgroupSockAddr>::try_from(program).and_then(|p| p.load())
            };
            loaded.map_err(|e| RedirectError::Program(name, e))?;
        }
        Ok(ebpf)
    };
    let why = if !kernel_identity {
        "callerIdentity is procfs".to_owned()
    } else if !Path::new(KERNEL_BTF).is_file() {
        format!("no kernel BTF at {KERNEL_BTF}")
    } else {
        match load(OBJECT, true) {
            Ok(ebpf) => return Ok((ebpf, TaskIdentity::Kernel)),
            Err(e) => format!("the kernel refused the task-reading programs: {e}"),
        }
    };
    if kernel_identity {
        log::warn!(target: "gpa::redirect", "caller identity falls back to /proc: {why}");
    }
    let ebpf = load(OBJECT_PROCFS, false)?;
    Ok((ebpf, TaskIdentity::Procfs(why)))
}

/// Deletes every entry of a record map; returns how many.
fn clear<K: aya::Pod>(map: &mut HashMap<MapData, K, CallerRecord>) -> usize {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    keys.iter().filter(|k| map.remove(k).is_ok()).count()
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

/// The pinned link for `name`: at `path` (this layout), else in an older layout's directory.
fn pinned_link(path: &Path, name: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_owned());
    }
    let root = path.parent()?.parent()?;
    OLDER_PIN_LAYOUTS.iter().map(|l| root.join(l).join(format!("link-{name}"))).find(|p| p.exists())
}

/// Swaps `program` into the link pinned at `found` when that link is alive and attached to
/// `cgroup_id`, and makes sure it is pinned at `want` (an older layout's pin moves). Returns
/// `false` (after removing the stale pin) when it is not — its cgroup was removed, or it
/// belongs to another cgroup — so the caller attaches afresh.
fn adopt_pinned_link(
    name: &'static str,
    found: &Path,
    want: &Path,
    cgroup_id: u64,
    program: BorrowedFd<'_>,
) -> Result<bool, RedirectError> {
    let link = crate::sys::bpf_obj_get(found).map_err(|e| RedirectError::Pin(name, e))?;
    let attached_to = crate::sys::bpf_link_cgroup_id(link.as_fd()).map_err(|e| RedirectError::Pin(name, e))?;
    if attached_to != cgroup_id {
        log::warn!(target: "gpa::redirect", "stale pinned link replaced: program={name} pinned_cgroup={attached_to} configured_cgroup={cgroup_id}");
        std::fs::remove_file(found).map_err(|e| RedirectError::Pin(name, e))?;
        return Ok(false);
    }
    crate::sys::bpf_link_update(link.as_fd(), program).map_err(|e| RedirectError::Pin(name, e))?;
    if found != want {
        crate::sys::bpf_obj_pin(link.as_fd(), want).map_err(|e| RedirectError::Pin(name, e))?;
        std::fs::remove_file(found).map_err(|e| RedirectError::Pin(name, e))?;
        log::info!(target: "gpa::redirect", "adopted {name} from an older pin layout");
    }
    Ok(true)
}

/// Removes what is left of older pin layouts (their maps; their links were adopted).
fn remove_older_layouts(dir: &Path) {
    let Some(root) = dir.parent() else { return };
    for layout in OLDER_PIN_LAYOUTS {
        let old = root.join(layout);
        if old.exists() {
            drop(std::fs::remove_dir_all(&old));
        }
    }
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
    fn embedded_objects_are_elf_bpf_files() {
        for object in [OBJECT, OBJECT_PROCFS] {
            assert_eq!(&object[..4], b"\x7fELF");
            // e_machine EM_BPF (247), little-endian.
            assert_eq!(u16::from_le_bytes([object[18], object[19]]), 247);
        }
    }

    #[test]
    fn a_record_is_taken_only_fresh_and_of_this_generation() {
        let rec = CallerRecord { generation: 7, connect_boot_ns: 1_000_000_000, ..CallerRecord::zeroed() };
        assert_eq!(accept_record(rec, 7, 1_000_000_000 + 5_000_000).map(|r| r.generation), Ok(7));
        assert_eq!(accept_record(rec, 8, 1_000_000_000), Err(NoRecord::OtherGeneration));
        let late = 1_000_000_000 + crate::limits::RECORD_MAX_AGE_MS * 1_000_000 + 1;
        assert_eq!(accept_record(rec, 7, late), Err(NoRecord::Stale));
        // A clock that reads earlier than the connect (never on one machine) is not "old".
        assert!(accept_record(rec, 7, 0).is_ok());
    }
}
