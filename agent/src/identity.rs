// SPDX-License-Identifier: MIT
//! Who is calling: the kernel's record of the connect turned into the caller the allowlist
//! matches on (executable path, process name, user and group names).
//!
//! Binding the executable to the caller (MSP §11 item 3). The kernel programs record, at the
//! moment of the connect, the device and inode of the task's executable (`mm->exe_file`), the
//! process start time, the effective ids and whether the task was being traced. None of that
//! can be changed afterwards: an `execve` after the connect, a thread name set with
//! `PR_SET_NAME`, a deferred SYN (`TCP_FASTOPEN_CONNECT`) written by another process: the
//! record still names the program that connected. A path is trusted only if the file it names
//! *in the agent's mount namespace* is that same (device, inode): the path comes from
//! `/proc/<pid>/exe` at accept time, so a process that exec'd since, a reused pid, a replaced
//! or deleted file, a memfd, or a bind mount in the caller's namespace all resolve to a path
//! whose file is another inode, and the caller then has no executable identity, never a
//! borrowed one. A task traced at connect (its code may be someone else's) has none either.
//!
//! The fallback (`callerIdentity: procfs`, or a kernel without BTF) has no inode: the path is
//! read from `/proc` at accept and bound by the start time and the comm, before and after the
//! `readlink`; a connect whose SYN was sent by another task than the one that connected, or
//! more than `DEFERRED_SYN_MS` after it (a `TCP_FASTOPEN_CONNECT` socket written later by a fork
//! or a thread after an exec), has no executable identity. The exec-after-connect race that the comm cannot close (the caller
//! chooses its comm) remains there, and `doctor` and the status say so. uid 0 is never assumed
//! in either mode.

use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use heapless::{String, Vec};

use crate::limits::{
    CMDLINE_MAX_BYTES, DEFERRED_SYN_MS, EXE_PATH_MAX_BYTES, GROUPS_PER_USER, IDENTITY_CACHE_ENTRIES, NAME_MAX_BYTES,
};
use crate::redirect::{CALLER_NO_EXE, CALLER_SYN_OTHER_TASK, CALLER_TRACED, CallerRecord};

/// A user or group name.
pub type Name = String<NAME_MAX_BYTES>;

/// The resolved caller of one redirected connection.
#[derive(Clone, Debug)]
pub struct Caller {
    /// What the kernel recorded at connect time.
    pub record: CallerRecord,
    /// Executable path, when the process could be bound to the connect (see module docs).
    pub exe: Option<Vec<u8, EXE_PATH_MAX_BYTES>>,
    /// First items of the command line, for audit only (never for decisions).
    pub cmdline: Vec<u8, CMDLINE_MAX_BYTES>,
    /// User name of the real uid, if known.
    pub user: Option<Name>,
    /// Names of all groups of that user (primary first).
    pub groups: Vec<Name, GROUPS_PER_USER>,
}

impl Caller {
    /// Real uid at connect time.
    pub fn uid(&self) -> u32 {
        self.record.uid
    }

    /// `isRoot` means uid 0 (MSP §11 item 1).
    pub fn is_root(&self) -> bool {
        self.record.uid == 0
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.record.tgid
    }

    /// File name of the executable.
    pub fn process_name(&self) -> Option<&[u8]> {
        self.exe.as_ref().map(|e| e.rsplit(|b| *b == b'/').next().unwrap_or(e))
    }
}

/// Resolves callers; caches user and group names per uid.
#[derive(Debug)]
pub struct Resolver {
    proc_root: &'static str,
    ticks_per_second: u64,
    users: Vec<UserEntry, IDENTITY_CACHE_ENTRIES>,
    next_evict: usize,
    db_stamp: Option<(std::time::SystemTime, std::time::SystemTime)>,
    /// When the databases' modification times were last looked at (at most once a second:
    /// two `stat` calls per connection would be most of the accept path's cost).
    db_checked: Option<std::time::Instant>,
}

#[derive(Clone, Debug)]
struct UserEntry {
    uid: u32,
    user: Option<Name>,
    groups: Vec<Name, GROUPS_PER_USER>,
}

impl Resolver {
    /// A resolver reading the real `/proc`, `/etc/passwd` and `/etc/group`.
    pub fn new() -> Self {
        Self {
            proc_root: "/proc",
            ticks_per_second: crate::sys::clock_ticks_per_second(),
            users: Vec::new(),
            next_evict: 0,
            db_stamp: None,
            db_checked: None,
        }
    }

    /// Builds the caller for a kernel record.
    pub fn resolve(&mut self, record: CallerRecord, now: std::time::Instant) -> Caller {
        if self.db_checked.is_none_or(|t| {
            now.saturating_duration_since(t) >= std::time::Duration::from_millis(crate::limits::IDENTITY_DB_RECHECK_MS)
        }) {
            self.db_checked = Some(now);
            let stamp = db_stamp();
            if stamp != self.db_stamp {
                // /etc/passwd or /etc/group changed: names may have moved.
                self.users.clear();
                self.db_stamp = stamp;
            }
        }
        let exe = self.bound_executable(&record);
        // The fallback's binding already proved the process is the one that connected; the
        // kernel's inode does not, so its start time is checked before the command line is read.
        let same_process = exe.is_some() && (!record.task_read() || self.started_as_recorded(&record));
        let cmdline = if same_process { self.cmdline(record.tgid) } else { Vec::new() };
        let entry = self.user_entry(record.uid, record.gid);
        Caller { record, exe, cmdline, user: entry.user, groups: entry.groups }
    }

    fn start_time_ns(&self, pid: u32) -> Option<u64> {
        let mut buf = [0u8; 1024];
        let stat = read_small(&format_path(self.proc_root, pid, "stat"), &mut buf)?;
        // Field 2 (comm) may contain spaces and ')': parse after the last ')'. starttime is
        // field 22, i.e. the 20th field after the comm.
        let after = &stat[stat.iter().rposition(|b| *b == b')')? + 1..];
        let field = after.split(|b| *b == b' ').filter(|f| !f.is_empty()).nth(19)?;
        let ticks: u64 = std::str::from_utf8(field).ok()?.parse().ok()?;
        Some(ticks.saturating_mul(1_000_000_000) / self.ticks_per_second)
    }

    fn bound_executable(&self, record: &CallerRecord) -> Option<Vec<u8, EXE_PATH_MAX_BYTES>> {
        if record.task_read() { self.bound_by_inode(record) } else { self.bound_by_procfs(record) }
    }

    /// The kernel named the executable by (device, inode) at connect: any path whose file in
    /// our namespace is that inode names it. `lstat`, not `stat`: a symlink at the path is a
    /// name someone made, not the file.
    fn bound_by_inode(&self, record: &CallerRecord) -> Option<Vec<u8, EXE_PATH_MAX_BYTES>> {
        if record.flags & (CALLER_TRACED | CALLER_NO_EXE) != 0 {
            return None;
        }
        let link = fs::read_link(format_path(self.proc_root, record.tgid, "exe")).ok()?;
        let named = fs::symlink_metadata(&link).ok()?;
        if !named.is_file() || (named.dev(), named.ino()) != (record.exe_dev_userspace(), record.exe_ino) {
            return None;
        }
        Vec::from_slice(link.as_os_str().as_bytes()).ok()
    }

    /// Whether the process now at `record.tgid` started when the kernel's record says (a pid
    /// reused since has another start time).
    fn started_as_recorded(&self, record: &CallerRecord) -> bool {
        let Some(started) = self.start_time_ns(record.tgid) else { return false };
        // /proc shows the start time in clock ticks: compare at that precision.
        let tick_ns = 1_000_000_000 / self.ticks_per_second.max(1);
        started / tick_ns == record.start_boot_ns / tick_ns
    }

    fn bound_by_procfs(&self, record: &CallerRecord) -> Option<Vec<u8, EXE_PATH_MAX_BYTES>> {
        // The SYN of an ordinary connect leaves inside the connect call, from the connecting
        // task. A deferred SYN (TCP_FASTOPEN_CONNECT) sent by another task (a fork sharing the
        // socket, another thread) or much later may follow an exec of the connecting process:
        // /proc could only show the new program.
        let why = if record.flags & CALLER_SYN_OTHER_TASK != 0 {
            Some("syn-from-another-task")
        } else if record.syn_boot_ns.saturating_sub(record.connect_boot_ns) > DEFERRED_SYN_MS * 1_000_000 {
            Some("late-syn")
        } else {
            None
        };
        if let Some(why) = why {
            log::debug!(target: "gpa::identity", "executable identity withheld: pid={} reason={why}", record.tgid);
            return None;
        }
        let before = self.start_time_ns(record.tgid)?;
        // A process that started after the connect cannot have made it: the pid was reused.
        if before > record.connect_boot_ns {
            return None;
        }
        let comm_path = format!("{}/{}/task/{}/comm", self.proc_root, record.tgid, record.tid);
        let comm_unchanged = || {
            let mut comm_buf = [0u8; 64];
            let comm = read_small(&comm_path, &mut comm_buf)?;
            (comm.strip_suffix(b"\n").unwrap_or(comm) == record.comm()).then_some(())
        };
        comm_unchanged()?;
        let exe_link = format_path(self.proc_root, record.tgid, "exe");
        let link = fs::read_link(&exe_link).ok()?;
        // The path names the running file only if it leads to the same inode in our mount
        // namespace: a bind mount over an allowed path (in the caller's own namespace) or a
        // replaced file must not lend the caller that path's identity.
        let running = fs::metadata(&exe_link).ok()?;
        let named = fs::metadata(&link).ok()?;
        if (running.dev(), running.ino()) != (named.dev(), named.ino()) {
            return None;
        }
        if self.start_time_ns(record.tgid)? != before {
            return None;
        }
        // Again after the readlink: an `execve` that completed between the first check and
        // the readlink would otherwise lend the new program's path to the old connect.
        comm_unchanged()?;
        Vec::from_slice(link.as_os_str().as_bytes()).ok()
    }

    fn cmdline(&self, pid: u32) -> Vec<u8, CMDLINE_MAX_BYTES> {
        let mut buf = [0u8; CMDLINE_MAX_BYTES];
        let mut out = Vec::new();
        let Some(raw) = read_small(&format_path(self.proc_root, pid, "cmdline"), &mut buf) else {
            return out;
        };
        for item in raw.split(|b| *b == 0).filter(|i| !i.is_empty()).take(4) {
            if !out.is_empty() && out.push(b' ').is_err() {
                break;
            }
            for b in item {
                // Control bytes become '?': a command line must never forge a log or audit line.
                let b = if b.is_ascii_control() { b'?' } else { *b };
                if out.push(b).is_err() {
                    break;
                }
            }
        }
        out
    }

    fn user_entry(&mut self, uid: u32, gid: u32) -> UserEntry {
        if let Some(e) = self.users.iter().find(|e| e.uid == uid) {
            return e.clone();
        }
        let entry = lookup_user(uid, gid);
        if self.users.is_full() {
            let slot = self.next_evict % self.users.len();
            self.users[slot] = entry.clone();
            self.next_evict = self.next_evict.wrapping_add(1);
        } else if self.users.push(entry.clone()).is_err() {
            // Unreachable (checked is_full); the entry is still returned, just not cached.
        }
        entry
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Self::new()
    }
}

fn format_path(root: &str, pid: u32, leaf: &str) -> std::string::String {
    format!("{root}/{pid}/{leaf}")
}

fn read_small<'b>(path: &str, buf: &'b mut [u8]) -> Option<&'b [u8]> {
    let mut file = fs::File::open(path).ok()?;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(&buf[..n])
}

fn db_stamp() -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let p = fs::metadata("/etc/passwd").and_then(|m| m.modified()).ok()?;
    let g = fs::metadata("/etc/group").and_then(|m| m.modified()).ok()?;
    Some((p, g))
}

fn lookup_user(uid: u32, gid: u32) -> UserEntry {
    let passwd = fs::read("/etc/passwd").unwrap_or_default();
    let group = fs::read("/etc/group").unwrap_or_default();
    user_from_databases(uid, gid, &passwd, &group)
}

fn user_from_databases(uid: u32, gid: u32, passwd: &[u8], group: &[u8]) -> UserEntry {
    let mut entry = UserEntry { uid, user: None, groups: Vec::new() };
    let mut primary_gid = gid;
    for line in passwd.split(|b| *b == b'\n') {
        let mut f = line.split(|b| *b == b':');
        let (Some(name), _, Some(u), Some(g)) = (f.next(), f.next(), f.next(), f.next()) else { continue };
        if parse_u32(u) == Some(uid) {
            entry.user = to_name(name);
            primary_gid = parse_u32(g).unwrap_or(gid);
            break;
        }
    }
    // Primary group first, then every group that lists the user as a member.
    for line in group.split(|b| *b == b'\n') {
        let mut f = line.split(|b| *b == b':');
        let (Some(name), _, Some(g), members) = (f.next(), f.next(), f.next(), f.next().unwrap_or(b"")) else {
            continue;
        };
        let is_primary = parse_u32(g) == Some(primary_gid);
        let is_member = entry.user.as_ref().is_some_and(|u| members.split(|b| *b == b',').any(|m| m == u.as_bytes()));
        if let (true, Some(n)) = (is_primary || is_member, to_name(name)) {
            if entry.groups.iter().any(|e| e == &n) {
                continue;
            }
            let pushed = if is_primary { entry.groups.insert(0, n) } else { entry.groups.push(n) };
            if pushed.is_err() {
                break;
            }
        }
    }
    entry
}

fn parse_u32(b: &[u8]) -> Option<u32> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn to_name(b: &[u8]) -> Option<Name> {
    let s = std::str::from_utf8(b).ok()?;
    (!s.is_empty()).then(|| Name::try_from(s).ok()).flatten()
}

/// Whether an executable path exists as a file (used by `doctor` and explain).
pub fn is_file(path: &Path) -> bool {
    path.is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &[u8] =
        b"root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\nbob:x:1001:100::/home/bob:/bin/sh\n";
    const GROUP: &[u8] = b"root:x:0:\nusers:x:100:alice\nalice:x:1000:\nadm:x:4:alice,bob\n";

    #[test]
    fn user_and_all_groups_come_from_the_databases() {
        let e = user_from_databases(1000, 1000, PASSWD, GROUP);
        assert_eq!(e.user.as_deref(), Some("alice"));
        let groups: std::vec::Vec<&str> = e.groups.iter().map(|g| g.as_str()).collect();
        assert_eq!(groups, ["alice", "users", "adm"]);
        let e = user_from_databases(1001, 100, PASSWD, GROUP);
        assert_eq!(e.groups.first().map(|g| g.as_str()), Some("users"));
    }

    #[test]
    fn unknown_uid_has_no_name_but_keeps_its_primary_group() {
        let e = user_from_databases(4242, 4, PASSWD, GROUP);
        assert!(e.user.is_none());
        assert_eq!(e.groups.len(), 1);
        assert_eq!(e.groups[0].as_str(), "adm");
    }

    /// A record of this test process as the procfs fallback object would make it.
    fn procfs_record_of_self() -> CallerRecord {
        let me = std::process::id();
        let comm = fs::read(format!("/proc/{me}/task/{me}/comm")).unwrap();
        let now = crate::sys::boottime_ns();
        let mut record = CallerRecord {
            connect_boot_ns: now,
            syn_boot_ns: now,
            tgid: me,
            tid: me,
            endpoint: 1,
            ..CallerRecord::zeroed()
        };
        let n = comm.len().saturating_sub(1).min(15);
        record.comm[..n].copy_from_slice(&comm[..n]);
        record
    }

    /// The same as the task-reading object would make it: the executable's inode and the
    /// process start time from the kernel.
    fn kernel_record_of_self() -> CallerRecord {
        let exe = fs::metadata("/proc/self/exe").unwrap();
        let r = Resolver::new();
        let (major, minor) = (libc::major(exe.dev()), libc::minor(exe.dev()));
        CallerRecord {
            flags: crate::redirect::CALLER_TASK_READ,
            exe_ino: exe.ino(),
            exe_dev: (major << 20) | minor,
            start_boot_ns: r.start_time_ns(std::process::id()).unwrap(),
            ..procfs_record_of_self()
        }
    }

    #[test]
    fn procfs_fallback_binds_by_start_time_comm_and_an_immediate_syn() {
        let mut r = Resolver::new();
        let exe = fs::read_link("/proc/self/exe").unwrap();
        let record = procfs_record_of_self();
        let caller = r.resolve(record, crate::clock::now());
        assert_eq!(caller.exe.as_deref(), Some(exe.as_os_str().as_bytes()));
        // A connect "before the process started" means the pid was reused: no identity.
        assert!(
            r.resolve(CallerRecord { connect_boot_ns: 1, syn_boot_ns: 1, ..record }, crate::clock::now()).exe.is_none()
        );
        // A different comm means the process exec'd or renamed since the connect.
        assert!(r.resolve(CallerRecord { comm: *b"not-the-caller\0\0", ..record }, crate::clock::now()).exe.is_none());
        // A SYN long after the connect (TCP_FASTOPEN_CONNECT) proves nothing about who wrote.
        let late_syn = record.connect_boot_ns + (DEFERRED_SYN_MS + 1) * 1_000_000;
        assert!(r.resolve(CallerRecord { syn_boot_ns: late_syn, ..record }, crate::clock::now()).exe.is_none());
        // A SYN sent by another task (a fork that shares the socket) at once: no identity either.
        let other_task = CallerRecord { flags: record.flags | CALLER_SYN_OTHER_TASK, ..record };
        assert!(r.resolve(other_task, crate::clock::now()).exe.is_none());
    }

    #[test]
    fn kernel_record_binds_by_inode_only() {
        let mut r = Resolver::new();
        let exe = fs::read_link("/proc/self/exe").unwrap();
        let record = kernel_record_of_self();
        let caller = r.resolve(record, crate::clock::now());
        assert_eq!(caller.exe.as_deref(), Some(exe.as_os_str().as_bytes()));
        assert!(!caller.cmdline.is_empty(), "same start time: the command line is read");
        // The comm and the SYN time do not matter: the inode is the kernel's.
        let renamed = CallerRecord { comm: *b"anything\0\0\0\0\0\0\0\0", syn_boot_ns: u64::MAX, ..record };
        assert!(r.resolve(renamed, crate::clock::now()).exe.is_some());
        // Another inode at connect time (the caller exec'd since): no identity, never this path.
        let other = fs::metadata("/proc/self/cwd").unwrap();
        assert!(r.resolve(CallerRecord { exe_ino: other.ino(), ..record }, crate::clock::now()).exe.is_none());
        assert!(r.resolve(CallerRecord { exe_dev: record.exe_dev ^ 1, ..record }, crate::clock::now()).exe.is_none());
        // Traced at connect, or no executable at all: no identity.
        for flag in [CALLER_TRACED, CALLER_NO_EXE] {
            assert!(
                r.resolve(CallerRecord { flags: record.flags | flag, ..record }, crate::clock::now()).exe.is_none()
            );
        }
        // Another start time (a reused pid): the path still names the recorded inode, but the
        // command line belongs to someone else and is not read.
        let reused = CallerRecord { start_boot_ns: record.start_boot_ns + 10_000_000_000, ..record };
        let caller = r.resolve(reused, crate::clock::now());
        assert!(caller.exe.is_some() && caller.cmdline.is_empty());
    }
}
