// SPDX-License-Identifier: MIT
//! `guest-proxy-agent doctor [--json]`: read-only health checks for operators.
//!
//! Every check reads files only (`/proc`, the pin directory, the key directory, the status
//! file): no BPF syscalls, no network, nothing created or changed, so it runs in a few
//! milliseconds and is safe next to a running agent. What each check looks at:
//!
//! | check | reads | FAIL when |
//! |---|---|---|
//! | `kernel-version` | `/proc/sys/kernel/osrelease` | older than 5.7 (no `bpf_link` for cgroup programs) |
//! | `bpf-syscall` | `/proc/sys/kernel/unprivileged_bpf_disabled` | missing: kernel without `CONFIG_BPF_SYSCALL` |
//! | `kernel-filesystems` | `/proc/filesystems` | no `cgroup2` (or no `bpf` while `pinPath` is set) |
//! | `cgroup2-mount` | `/proc/self/mountinfo` | no cgroup v2 mount, or `cgroupPath` not on one |
//! | `pinned-programs` | mountinfo, `<pinPath>/v2/` | pin dir not on bpffs, or a link/map pin missing |
//! | `listener-loopback` | `/proc/net/tcp`, `/proc/net/tcp6`, `<stateDir>/listener` | nothing listens on the port, a non-loopback address does, or a non-root user holds it |
//! | `caller-identity` | `/sys/kernel/btf/vmlinux`, the config | never (WARN when executable identity falls back to `/proc`) |
//! | `key-directory` | `<stateDir>/keys` | dir not 0700 root-owned, or a file there not a 0600 root-owned regular file |
//! | `status-file` | `<logDir>/status.json` | missing, symlink, not 0640 root-owned, unparsable, or older than 3 × `statusIntervalSeconds` |
//! | `agent-status` | the status document | overall status `ERROR` |
//! | `clock-skew` | the status document | never (WARN above 60 s) |
//!
//! Attachment is checked through the pins: a pinned cgroup link keeps its program attached
//! to the cgroup it was created on, so `link-gpa_sockops`, `link-gpa_connect4` and
//! `link-gpa_connect6` under `<pinPath>/v2/` mean the programs are attached. Which cgroup
//! they are attached to is not visible without the BPF syscall (`bpftool cgroup tree` shows
//! it). Clock skew against the host is not measured here (that needs a host call); the skew
//! the agent recorded is reported when the status document carries it.
//!
//! Each check is a function of paths and text, so tests run it against fixture directories.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::ValidatedConfig;
use crate::exit::ExitStatus;
use crate::redirect::PIN_LAYOUT;
use crate::status::view::{self, StatusView};
use crate::status::writer::{STATUS_FILE_MODE, STATUS_FILE_NAME};

/// The pinned links (one per program of `redirect`, in its attach order).
const PINNED_LINKS: [&str; 3] = ["link-gpa_sockops", "link-gpa_connect4", "link-gpa_connect6"];
/// The pinned maps (`redirect`'s map names).
const PINNED_MAPS: [&str; 6] = ["gpa_policy", "gpa_skip", "gpa_config", "gpa_pending", "gpa_audit", "gpa_listeners"];
/// `bpf_link` for cgroup programs (`BPF_LINK_CREATE` on cgroups) arrived in Linux 5.7.
const MIN_KERNEL: (u32, u32) = (5, 7);
/// A status file older than this many write intervals is stale.
const STALE_INTERVALS: u64 = 3;
/// Recorded skew above this is worth a warning (requests are dated with host time anyway).
const SKEW_WARN_SECS: i64 = 60;
/// Longest component message quoted in a detail.
const QUOTE_MAX_BYTES: usize = 200;

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Fine.
    Pass,
    /// Broken: `doctor` exits 1.
    Fail,
    /// Worth a look, not broken.
    Warn,
}

impl Outcome {
    /// `PASS`, `FAIL`, `WARN`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Warn => "WARN",
        }
    }
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Short name (`listener-loopback`).
    pub name: &'static str,
    /// Outcome.
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// What to do about it (on FAIL, and on some WARNs).
    pub hint: Option<&'static str>,
}

impl Check {
    fn pass(name: &'static str, detail: String) -> Self {
        Self { name, outcome: Outcome::Pass, detail, hint: None }
    }

    fn fail(name: &'static str, detail: String, hint: &'static str) -> Self {
        Self { name, outcome: Outcome::Fail, detail, hint: Some(hint) }
    }

    fn warn(name: &'static str, detail: String, hint: Option<&'static str>) -> Self {
        Self { name, outcome: Outcome::Warn, detail, hint }
    }
}

/// Where the checks look and what they expect; [`Environment::system`] in production.
#[derive(Clone, Debug)]
pub struct Environment {
    /// `/proc`.
    pub proc_root: PathBuf,
    /// Owner of the key directory, key files and status file (root).
    pub owner_uid: u32,
    /// Now, Unix milliseconds.
    pub now_unix_ms: u64,
    /// The kernel's BTF (`/sys/kernel/btf/vmlinux`), which the task-reading programs need.
    pub kernel_btf: PathBuf,
}

impl Environment {
    /// The real system at `now_unix_ms`.
    pub fn system(now_unix_ms: u64) -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            owner_uid: 0,
            now_unix_ms,
            kernel_btf: PathBuf::from("/sys/kernel/btf/vmlinux"),
        }
    }

    fn proc(&self, rel: &str) -> PathBuf {
        self.proc_root.join(rel)
    }
}

/// Runs every check, in the order of the module docs.
pub fn run_checks(config: &ValidatedConfig, env: &Environment) -> Vec<Check> {
    let read = |rel: &str| fs::read_to_string(env.proc(rel));
    let mountinfo = read("self/mountinfo");
    let mut checks = vec![
        check_kernel_version(read("sys/kernel/osrelease").as_deref().ok()),
        check_bpf_syscall(&env.proc("sys/kernel/unprivileged_bpf_disabled")),
        check_kernel_filesystems(read("filesystems").as_deref().ok(), config.pin_dir.is_some()),
        check_cgroup2(mountinfo.as_deref().ok(), config.cgroup.as_deref()),
        check_pins(mountinfo.as_deref().ok(), config.pin_dir.as_deref()),
        check_listener(
            read("net/tcp").as_deref().ok(),
            read("net/tcp6").as_deref().unwrap_or(""),
            crate::listener::address_in_use(&config.state_dir, config.listen),
        ),
        check_caller_identity(&env.kernel_btf, config.caller_identity),
        check_key_directory(&config.state_dir.join("keys"), env.owner_uid),
    ];
    let (status_check, document) = check_status_file(&config.log_dir, config.status_interval_secs, env);
    checks.push(status_check);
    checks.push(check_agent_status(document.as_deref()));
    checks.push(check_clock_skew(document.as_deref()));
    checks
}

/// `doctor`: the text to print and the exit status (success: no FAIL, failure: some FAIL).
pub fn run(config: &ValidatedConfig, json: bool, env: &Environment) -> (ExitStatus, String) {
    let checks = run_checks(config, env);
    let code = exit_code(&checks);
    (code, if json { to_json(&checks) } else { to_text(&checks) })
}

/// Success (0) when no check failed, else failure (1).
pub fn exit_code(checks: &[Check]) -> ExitStatus {
    ExitStatus::success_if(!checks.iter().any(|c| c.outcome == Outcome::Fail))
}

/// `PASS|FAIL|WARN <name>: <detail>` lines, each followed by `  hint: …` when there is one.
pub fn to_text(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        // Writing into a String cannot fail.
        writeln!(out, "{} {}: {}", c.outcome.as_str(), c.name, c.detail).ok();
        if let Some(hint) = c.hint {
            writeln!(out, "  hint: {hint}").ok();
        }
    }
    out
}

#[derive(Serialize)]
struct JsonCheck<'a> {
    check: &'a str,
    result: &'a str,
    detail: &'a str,
    hint: Option<&'a str>,
}

/// A JSON array of `{check, result, detail, hint}` (`hint` is `null` when there is none).
pub fn to_json(checks: &[Check]) -> String {
    let rows: Vec<JsonCheck<'_>> = checks
        .iter()
        .map(|c| JsonCheck { check: c.name, result: c.outcome.as_str(), detail: &c.detail, hint: c.hint })
        .collect();
    // Escaping grows text at most 6×; the rest is field names and punctuation.
    let room =
        2 + rows.iter().map(|r| 64 + 6 * (r.check.len() + r.detail.len() + r.hint.map_or(0, str::len))).sum::<usize>();
    let mut buf = vec![0u8; room];
    match serde_json_core::to_slice(&rows[..], &mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        // Not reachable with the room computed above; never print a cut document.
        Err(_) => "[]".to_owned(),
    }
}

/// `kernel-version`: Linux 5.7 or later.
pub fn check_kernel_version(osrelease: Option<&str>) -> Check {
    const NAME: &str = "kernel-version";
    let Some(release) = osrelease.map(str::trim) else {
        return Check::warn(NAME, "cannot read /proc/sys/kernel/osrelease".into(), None);
    };
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let version =
        parts.next().and_then(|a| a.parse::<u32>().ok()).zip(parts.next().and_then(|b| b.parse::<u32>().ok()));
    match version {
        Some(v) if v >= MIN_KERNEL => {
            Check::pass(NAME, format!("Linux {release} (cgroup bpf_link needs 5.7 or later)"))
        }
        Some(_) => Check::fail(
            NAME,
            format!("Linux {release} is older than 5.7: cgroup programs cannot be attached as bpf_links"),
            "boot a kernel of 5.7 or later (every supported Azure image ships one)",
        ),
        None => Check::warn(NAME, format!("cannot parse the kernel release {release:?}"), None),
    }
}

/// `bpf-syscall`: `unprivileged_bpf_disabled` exists only when the kernel has the BPF syscall.
pub fn check_bpf_syscall(sysctl: &Path) -> Check {
    const NAME: &str = "bpf-syscall";
    match fs::read_to_string(sysctl) {
        Ok(v) => Check::pass(NAME, format!("BPF syscall present (unprivileged_bpf_disabled={})", v.trim())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Check::fail(
            NAME,
            format!("{} is missing: the kernel has no BPF syscall", sysctl.display()),
            "use a kernel built with CONFIG_BPF_SYSCALL=y and CONFIG_CGROUP_BPF=y",
        ),
        Err(e) => Check::warn(NAME, format!("cannot read {}: {e}", sysctl.display()), None),
    }
}

/// `kernel-filesystems`: cgroup2 (required) and bpf (required when pinning) are known.
pub fn check_kernel_filesystems(filesystems: Option<&str>, pinning: bool) -> Check {
    const NAME: &str = "kernel-filesystems";
    let Some(text) = filesystems else {
        return Check::warn(NAME, "cannot read /proc/filesystems".into(), None);
    };
    let has = |fs: &str| text.lines().any(|l| l.split_whitespace().last() == Some(fs));
    match (has("cgroup2"), has("bpf")) {
        (false, _) => Check::fail(
            NAME,
            "the kernel does not know cgroup2".into(),
            "use a kernel with cgroup v2 support (CONFIG_CGROUPS)",
        ),
        (true, false) if pinning => Check::fail(
            NAME,
            "the kernel does not know the bpf filesystem, and pinPath is set".into(),
            "use a kernel with CONFIG_BPF_SYSCALL (it provides bpffs), or set pinPath to \"\"",
        ),
        (true, false) => Check::warn(NAME, "cgroup2 present; no bpf filesystem (pinning is off anyway)".into(), None),
        (true, true) => Check::pass(NAME, "cgroup2 and bpf filesystems present".into()),
    }
}

/// `(mount point, filesystem type)` of each line of a mountinfo text.
fn mounts(mountinfo: &str) -> impl Iterator<Item = (PathBuf, &str)> {
    mountinfo.lines().filter_map(|line| {
        // id parent major:minor root mount-point options [optional...] - fstype source ...
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split(' ').next()?;
        let point = left.split(' ').nth(4)?;
        Some((PathBuf::from(unescape_octal(point)), fstype))
    })
}

/// Mountinfo escapes space, tab, newline and backslash as `\NNN` (octal).
fn unescape_octal(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `cgroup2-mount`: a cgroup v2 mount exists, and the configured cgroup (if any) is on it.
pub fn check_cgroup2(mountinfo: Option<&str>, configured: Option<&Path>) -> Check {
    const NAME: &str = "cgroup2-mount";
    let Some(info) = mountinfo else {
        return Check::fail(
            NAME,
            "cannot read /proc/self/mountinfo".into(),
            "run doctor on the VM itself with /proc mounted",
        );
    };
    let cgroup2: Vec<PathBuf> = mounts(info).filter(|(_, t)| *t == "cgroup2").map(|(p, _)| p).collect();
    let Some(first) = cgroup2.first() else {
        return Check::fail(
            NAME,
            "no cgroup v2 mount found".into(),
            "mount one (mount -t cgroup2 none /sys/fs/cgroup) or boot with systemd.unified_cgroup_hierarchy=1",
        );
    };
    match configured {
        None => Check::pass(
            NAME,
            format!("cgroup v2 mounted at {}; programs attach there (cgroupPath unset)", first.display()),
        ),
        Some(path) if cgroup2.iter().any(|m| path.starts_with(m)) && path.is_dir() => {
            Check::pass(NAME, format!("cgroupPath {} is a directory on the cgroup v2 mount", path.display()))
        }
        Some(path) => Check::fail(
            NAME,
            format!(
                "cgroupPath {} is not a directory on a cgroup v2 mount ({} is one)",
                path.display(),
                first.display()
            ),
            "set cgroupPath to a cgroup v2 directory, or leave it unset to use the cgroup v2 root",
        ),
    }
}

/// `pinned-programs`: the pin directory is on bpffs and every link and map is pinned.
pub fn check_pins(mountinfo: Option<&str>, pin_dir: Option<&Path>) -> Check {
    const NAME: &str = "pinned-programs";
    let Some(pins) = pin_dir else {
        return Check::warn(
            NAME,
            "pinPath is empty: nothing is pinned, the redirect ends with the agent process and attachment cannot be checked from outside it".into(),
            Some("set pinPath (default /sys/fs/bpf/guest-proxy-agent) so callers stay redirected across agent restarts"),
        );
    };
    if let Some(info) = mountinfo {
        // The mount a path is on: the longest mount point that is a prefix of it.
        let on = mounts(info).filter(|(p, _)| pins.starts_with(p)).max_by_key(|(p, _)| p.as_os_str().len());
        match on {
            Some((_, "bpf")) => {}
            Some((point, fstype)) => {
                return Check::fail(
                    NAME,
                    format!("{} is on {fstype} (mounted at {}), not bpffs", pins.display(), point.display()),
                    "mount bpffs (mount -t bpf bpf /sys/fs/bpf) and restart the agent so it pins its programs",
                );
            }
            None => {}
        }
    }
    let dir = pins.join(PIN_LAYOUT);
    let mut missing = Vec::new();
    let mut odd = Vec::new();
    for name in PINNED_LINKS.iter().chain(PINNED_MAPS.iter()) {
        match fs::symlink_metadata(dir.join(name)) {
            Ok(m) if m.file_type().is_symlink() => odd.push(*name),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(*name),
            Err(_) => odd.push(*name),
        }
    }
    if !missing.is_empty() || !odd.is_empty() {
        let mut detail = format!("under {}:", dir.display());
        if !missing.is_empty() {
            write!(detail, " missing {}", missing.join(", ")).ok();
        }
        if !odd.is_empty() {
            write!(detail, " unusable (symlink or unreadable) {}", odd.join(", ")).ok();
        }
        return Check::fail(
            NAME,
            detail,
            "the agent pins its links and maps at start: check `journalctl -u guest-proxy-agent`; missing links mean callers are not redirected",
        );
    }
    Check::pass(
        NAME,
        format!(
            "{} links and {} maps pinned under {} (a pinned cgroup link keeps its program attached)",
            PINNED_LINKS.len(),
            PINNED_MAPS.len(),
            dir.display()
        ),
    )
}

/// Local addresses of sockets in LISTEN state on `port`, from `/proc/net/tcp` or `tcp6` text.
fn listeners(table: &str, port: u16) -> Vec<IpAddr> {
    crate::listener::listening(table).filter(|s| s.port == port).map(|s| s.ip).collect()
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// `listener-loopback`: something listens on the configured port, and only on loopback.
pub fn check_listener(tcp: Option<&str>, tcp6: &str, listen: SocketAddrV4) -> Check {
    const NAME: &str = "listener-loopback";
    let Some(tcp) = tcp else {
        return Check::warn(NAME, "cannot read /proc/net/tcp".into(), None);
    };
    let port = listen.port();
    let mut found = listeners(tcp, port);
    found.extend(listeners(tcp6, port));
    if found.is_empty() {
        return Check::fail(
            NAME,
            format!("nothing listens on port {port} (listenAddress {listen})"),
            "is the agent running? `systemctl status guest-proxy-agent`",
        );
    }
    let exposed: Vec<String> = found.iter().filter(|ip| !is_loopback(**ip)).map(|ip| format!("{ip}:{port}")).collect();
    if !exposed.is_empty() {
        return Check::fail(
            NAME,
            format!("port {port} listens on {}: reachable from outside the VM", exposed.join(", ")),
            "listenAddress must be a loopback address; find the program holding the port with `ss -ltnp`",
        );
    }
    if let Some(uid) = crate::listener::owners(tcp, tcp6, listen).into_iter().find(|uid| *uid != 0) {
        return Check::fail(
            NAME,
            format!("{listen} is held by uid {uid}, not by the agent"),
            "callers are never redirected to it, but the agent is not serving there: find the holder with `ss -ltnp`",
        );
    }
    let addrs: Vec<String> = found.iter().map(|ip| format!("{ip}:{port}")).collect();
    Check::pass(NAME, format!("listening on {} only", addrs.join(", ")))
}

/// `caller-identity`: whether the executable identity can come from the kernel's record.
pub fn check_caller_identity(kernel_btf: &Path, mode: crate::config::CallerIdentity) -> Check {
    const NAME: &str = "caller-identity";
    const HINT: &str =
        "without the kernel record an execve racing the agent's /proc read can lend a program's path (docs/DESIGN.md)";
    match mode {
        crate::config::CallerIdentity::Procfs => {
            Check::warn(NAME, "callerIdentity is procfs: executable identity from /proc only".into(), Some(HINT))
        }
        crate::config::CallerIdentity::Kernel if kernel_btf.is_file() => Check::pass(
            NAME,
            format!("kernel BTF at {}: executable identity from the connect-time record", kernel_btf.display()),
        ),
        crate::config::CallerIdentity::Kernel => Check::warn(
            NAME,
            format!("no kernel BTF at {}: executable identity falls back to /proc", kernel_btf.display()),
            Some(HINT),
        ),
    }
}

/// `key-directory`: `<stateDir>/keys` is 0700 and owned by `owner`; every entry in it is a
/// regular 0600 file owned by `owner`.
pub fn check_key_directory(dir: &Path, owner: u32) -> Check {
    const NAME: &str = "key-directory";
    const HINT: &str = "the key directory must be a 0700 root-owned directory of 0600 root-owned key files: \
                        fix with chown/chmod, or remove stray entries (the agent re-acquires its key)";
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Check::warn(
                NAME,
                format!("{} does not exist yet", dir.display()),
                Some("the agent creates it when it starts"),
            );
        }
        Err(e) => {
            return Check::warn(NAME, format!("cannot inspect {}: {e}", dir.display()), Some("run doctor as root"));
        }
    };
    if meta.file_type().is_symlink() || !meta.is_dir() {
        return Check::fail(NAME, format!("{} is a symlink or not a directory", dir.display()), HINT);
    }
    let mode = meta.mode() & 0o7777;
    if mode != 0o700 || meta.uid() != owner {
        return Check::fail(
            NAME,
            format!("{} is mode {mode:04o} owned by uid {} (want 0700, uid {owner})", dir.display(), meta.uid()),
            HINT,
        );
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            return Check::warn(
                NAME,
                format!("{} is 0700 but cannot be listed: {e}", dir.display()),
                Some("run doctor as root"),
            );
        }
    };
    let mut files = 0;
    let mut problems = Vec::new();
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        match fs::symlink_metadata(entry.path()) {
            Ok(m) if m.file_type().is_symlink() => problems.push(format!("{name} is a symlink")),
            Ok(m) if !m.is_file() => problems.push(format!("{name} is not a regular file")),
            Ok(m) if m.mode() & 0o7777 != 0o600 || m.uid() != owner => {
                problems.push(format!("{name} is mode {:04o} owned by uid {}", m.mode() & 0o7777, m.uid()));
            }
            Ok(_) => files += 1,
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    if problems.is_empty() {
        Check::pass(
            NAME,
            format!(
                "{} is 0700 owned by uid {owner}; {files} key file(s), all 0600 owned by uid {owner}",
                dir.display()
            ),
        )
    } else {
        Check::fail(NAME, format!("in {}: {}", dir.display(), problems.join("; ")), HINT)
    }
}

/// `status-file`: present, a regular 0640 file owned by the owner, parsable, and written
/// within 3 × the status interval. Returns the parsed document for the next checks.
pub fn check_status_file(log_dir: &Path, interval_secs: u64, env: &Environment) -> (Check, Option<Box<StatusView>>) {
    const NAME: &str = "status-file";
    const HINT: &str =
        "the agent writes it every statusIntervalSeconds: check `systemctl status guest-proxy-agent` and its journal";
    let path = log_dir.join(STATUS_FILE_NAME);
    let meta = match fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return (Check::fail(NAME, format!("{} is missing", path.display()), HINT), None);
        }
        Err(e) => {
            return (
                Check::warn(NAME, format!("cannot inspect {}: {e}", path.display()), Some("run doctor as root")),
                None,
            );
        }
    };
    if meta.file_type().is_symlink() || !meta.is_file() {
        let hint = "remove it; the agent writes a regular file in its place";
        return (Check::fail(NAME, format!("{} is a symlink or not a regular file", path.display()), hint), None);
    }
    let mode = meta.mode() & 0o7777;
    if mode != STATUS_FILE_MODE || meta.uid() != env.owner_uid {
        let detail = format!(
            "{} is mode {mode:04o} owned by uid {} (want 0640, uid {})",
            path.display(),
            meta.uid(),
            env.owner_uid
        );
        return (
            Check::fail(NAME, detail, "the agent rewrites it 0640 on its next write; something else changed it"),
            None,
        );
    }
    let document = match view::read_file(&path) {
        Ok(bytes) => view::parse(&bytes),
        Err(view::ViewError::Read(e)) if e.kind() == io::ErrorKind::PermissionDenied => {
            return (
                Check::warn(
                    NAME,
                    format!("{} is 0640 but not readable: {e}", path.display()),
                    Some("run doctor as root"),
                ),
                None,
            );
        }
        Err(e) => Err(e),
    };
    let document = match document {
        Ok(d) => d,
        Err(e) => return (Check::fail(NAME, format!("{}: {e}", path.display()), HINT), None),
    };
    let Some(written) = crate::calendar::parse_timestamp_millis(&document.timestamp) else {
        return (
            Check::fail(NAME, format!("{}: bad timestamp {:?}", path.display(), document.timestamp.as_str()), HINT),
            Some(document),
        );
    };
    let age_ms = i128::from(env.now_unix_ms) - i128::from(written);
    let limit_ms = i128::from(interval_secs) * i128::from(STALE_INTERVALS) * 1000;
    let check = if age_ms > limit_ms {
        Check::fail(
            NAME,
            format!(
                "{} is stale: written {} s ago (limit {STALE_INTERVALS} × {interval_secs} s)",
                path.display(),
                age_ms / 1000
            ),
            "the agent may be stopped or stuck: check `systemctl status guest-proxy-agent` and its journal",
        )
    } else if age_ms < -limit_ms {
        Check::warn(
            NAME,
            format!("{} is dated {} s in the future", path.display(), -age_ms / 1000),
            Some("the clock stepped back since it was written"),
        )
    } else {
        Check::pass(NAME, format!("{} is 0640 and was written {} s ago", path.display(), age_ms.max(0) / 1000))
    };
    (check, Some(document))
}

/// `agent-status`: the overall status in the document.
pub fn check_agent_status(document: Option<&StatusView>) -> Check {
    const NAME: &str = "agent-status";
    let Some(doc) = document else {
        return Check::warn(NAME, "no readable status document (see status-file)".into(), None);
    };
    let a = &doc.proxy_agent_status;
    if a.status == "SUCCESS" {
        let state = a.key_latch_status.states.as_ref().map_or("unknown", |s| s.secure_channel_state.as_str());
        return Check::pass(NAME, format!("SUCCESS (secure channel: {state})"));
    }
    let mut detail = format!("{}:", a.status);
    for (name, m) in [
        ("keyLatch", &a.key_latch_status),
        ("ebpfProgram", &a.ebpf_program_status),
        ("proxyListener", &a.proxy_listener_status),
    ] {
        if m.status != "RUNNING" {
            write!(
                detail,
                " {name} {} ({})",
                m.status,
                crate::status::document::cut_at_char_boundary(&m.message, QUOTE_MAX_BYTES)
            )
            .ok();
        }
    }
    Check::fail(NAME, detail, "`guest-proxy-agent status` shows each component's message")
}

/// `clock-skew`: the host clock skew the agent recorded, if the document carries it.
pub fn check_clock_skew(document: Option<&StatusView>) -> Check {
    const NAME: &str = "clock-skew";
    let recorded = document
        .and_then(|d| d.proxy_agent_status.key_latch_status.states.as_ref())
        .and_then(|s| s.host_clock_skew_seconds.as_ref());
    let Some(text) = recorded else {
        return Check::pass(
            NAME,
            "not measured (the status document records no host clock skew; requests are dated with the host-synchronised clock)".into(),
        );
    };
    match text.parse::<i64>() {
        Ok(s) if s.abs() <= SKEW_WARN_SECS => Check::pass(NAME, format!("host clock - local clock = {s} s")),
        Ok(s) => Check::warn(
            NAME,
            format!("host clock - local clock = {s} s"),
            Some("enable time synchronisation (chrony with the Hyper-V PTP clock /dev/ptp_hyperv)"),
        ),
        Err(_) => Check::warn(NAME, format!("unreadable skew value {:?}", text.as_str()), None),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::listener::proc_net_addr;
    use crate::status::document::{ModuleStatus, sample_json};

    const NOW_MS: u64 = 1_784_715_072_345;

    struct Fixture {
        root: PathBuf,
        uid: u32,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let root = std::env::temp_dir().join(format!("gpa-doctor-{name}-{}", std::process::id()));
            drop(fs::remove_dir_all(&root));
            fs::create_dir_all(&root).unwrap();
            let uid = fs::metadata(&root).unwrap().uid();
            Self { root, uid }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.root.join(rel)
        }

        fn write(&self, rel: &str, content: &str, mode: u32) -> PathBuf {
            let p = self.path(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, content).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            p
        }

        fn dir(&self, rel: &str, mode: u32) -> PathBuf {
            let p = self.path(rel);
            fs::create_dir_all(&p).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            p
        }

        fn env(&self) -> Environment {
            Environment {
                proc_root: self.path("proc"),
                owner_uid: self.uid,
                now_unix_ms: NOW_MS,
                kernel_btf: self.path("sys/kernel/btf/vmlinux"),
            }
        }

        fn config(&self) -> ValidatedConfig {
            let json = format!(
                r#"{{"stateDirectory":"{0}/state","logDirectory":"{0}/log","pinPath":"{0}/bpf/gpa","statusIntervalSeconds":60}}"#,
                self.root.display()
            );
            ValidatedConfig::parse(json.as_bytes()).unwrap()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            drop(fs::remove_dir_all(&self.root));
        }
    }

    fn hex4(ip: Ipv4Addr) -> String {
        format!("{:08X}", u32::from_ne_bytes(ip.octets()))
    }

    fn hex6(ip: Ipv6Addr) -> String {
        ip.octets().chunks_exact(4).map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))).collect()
    }

    fn tcp_table(rows: &[(String, u16, &str)]) -> String {
        let mut t =
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
                .to_owned();
        for (i, (addr, port, st)) in rows.iter().enumerate() {
            writeln!(t, "   {i}: {addr}:{port:04X} 00000000:0000 {st} 00000000:00000000 00:00000000 00000000     0        0 1234 1 0").unwrap();
        }
        t
    }

    /// A healthy system: every check passes.
    fn healthy(f: &Fixture) {
        let bpf = f.path("bpf");
        let cg = f.path("cgroup");
        f.write(
            "proc/self/mountinfo",
            &format!(
                "22 1 0:21 / /proc rw - proc proc rw\n\
                 30 1 0:26 / {} rw,nosuid shared:4 - cgroup2 cgroup2 rw\n\
                 31 1 0:27 / {} rw,nosuid - bpf bpf rw,mode=700\n",
                cg.display(),
                bpf.display()
            ),
            0o644,
        );
        f.dir("cgroup", 0o755);
        for name in PINNED_LINKS.iter().chain(PINNED_MAPS.iter()) {
            f.write(&format!("bpf/gpa/v2/{name}"), "", 0o600);
        }
        f.write("proc/sys/kernel/osrelease", "6.8.0-1015-azure\n", 0o644);
        f.write("sys/kernel/btf/vmlinux", "", 0o444);
        f.write("proc/sys/kernel/unprivileged_bpf_disabled", "2\n", 0o644);
        f.write("proc/filesystems", "nodev\tsysfs\nnodev\tcgroup\nnodev\tcgroup2\nnodev\tbpf\n\text4\n", 0o644);
        let tcp = tcp_table(&[
            (hex4(Ipv4Addr::LOCALHOST), 3080, "0A"),
            (hex4(Ipv4Addr::UNSPECIFIED), 22, "0A"),
            (hex4(Ipv4Addr::UNSPECIFIED), 3080, "01"),
        ]);
        f.write("proc/net/tcp", &tcp, 0o644);
        f.write("proc/net/tcp6", &tcp_table(&[(hex6(Ipv6Addr::UNSPECIFIED), 22, "0A")]), 0o644);
        f.dir("state/keys", 0o700);
        f.write("state/keys/guid-1.key", "{}", 0o600);
        f.dir("log", 0o755);
        crate::status::writer::write_atomic(
            &f.path("log"),
            &sample_json(ModuleStatus::running("ok"), NOW_MS - 30_000, None),
        )
        .unwrap();
    }

    #[test]
    fn a_healthy_fixture_passes_every_check_and_exits_0() {
        let f = Fixture::new("healthy");
        healthy(&f);
        let checks = run_checks(&f.config(), &f.env());
        assert_eq!(checks.len(), 11);
        for c in &checks {
            assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
        }
        assert_eq!(exit_code(&checks).code(), 0);
        let text = to_text(&checks);
        assert!(text.starts_with("PASS kernel-version: Linux 6.8.0-1015-azure"), "{text}");
        assert!(text.contains("PASS listener-loopback: listening on 127.0.0.1:3080 only\n"), "{text}");
        assert!(text.contains("PASS clock-skew: not measured"));
        assert!(!text.contains("hint:"));
    }

    #[test]
    fn failures_print_a_hint_exit_1_and_render_as_json() {
        let f = Fixture::new("json");
        healthy(&f);
        fs::remove_file(f.path("proc/sys/kernel/unprivileged_bpf_disabled")).unwrap();
        let (code, text) = run(&f.config(), false, &f.env());
        assert_eq!(code.code(), 1);
        assert!(text.contains("FAIL bpf-syscall: "), "{text}");
        assert!(text.contains("\n  hint: use a kernel built with CONFIG_BPF_SYSCALL=y"), "{text}");
        let (code, json) = run(&f.config(), true, &f.env());
        assert_eq!(code.code(), 1);
        assert!(json.starts_with(r#"[{"check":"kernel-version","result":"PASS","detail":"Linux 6.8.0-1015-azure (cgroup bpf_link needs 5.7 or later)","hint":null},"#), "{json}");
        assert!(json.contains(r#"{"check":"bpf-syscall","result":"FAIL","detail":""#), "{json}");
        assert!(json.ends_with("}]"));
    }

    #[test]
    fn kernel_version_needs_5_7() {
        assert_eq!(check_kernel_version(Some("5.7.0\n")).outcome, Outcome::Pass);
        assert_eq!(check_kernel_version(Some("6.1.0-18-cloud-amd64")).outcome, Outcome::Pass);
        let old = check_kernel_version(Some("5.4.0-1109-azure"));
        assert_eq!((old.outcome, old.hint.is_some()), (Outcome::Fail, true));
        assert_eq!(check_kernel_version(Some("4.19.0")).outcome, Outcome::Fail);
        assert_eq!(check_kernel_version(Some("weird")).outcome, Outcome::Warn);
        assert_eq!(check_kernel_version(None).outcome, Outcome::Warn);
    }

    #[test]
    fn kernel_filesystems_need_cgroup2_and_bpf_when_pinning() {
        let both = "nodev\tcgroup2\nnodev\tbpf\n";
        assert_eq!(check_kernel_filesystems(Some(both), true).outcome, Outcome::Pass);
        assert_eq!(check_kernel_filesystems(Some("nodev\tcgroup\nnodev\tbpf\n"), false).outcome, Outcome::Fail);
        assert_eq!(check_kernel_filesystems(Some("nodev\tcgroup2\n"), true).outcome, Outcome::Fail);
        assert_eq!(check_kernel_filesystems(Some("nodev\tcgroup2\n"), false).outcome, Outcome::Warn);
    }

    #[test]
    fn cgroup2_mount_is_found_and_the_configured_path_must_be_on_it() {
        let f = Fixture::new("cgroup");
        healthy(&f);
        let info = fs::read_to_string(f.path("proc/self/mountinfo")).unwrap();
        assert_eq!(check_cgroup2(Some(&info), None).outcome, Outcome::Pass);
        let child = f.dir("cgroup/agent.slice", 0o755);
        assert_eq!(check_cgroup2(Some(&info), Some(&child)).outcome, Outcome::Pass);
        assert_eq!(check_cgroup2(Some(&info), Some(&f.path("bpf"))).outcome, Outcome::Fail);
        assert_eq!(check_cgroup2(Some(&info), Some(&f.path("cgroup/missing"))).outcome, Outcome::Fail);
        let v1_only = "25 1 0:22 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        let c = check_cgroup2(Some(v1_only), None);
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.hint.unwrap().contains("cgroup2"));
        // Escaped mount points (a space is \040).
        let spaced = "30 1 0:26 / /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert!(check_cgroup2(Some(spaced), None).detail.contains("/sys/fs/my cgroup"));
    }

    #[test]
    fn pins_must_be_on_bpffs_and_complete() {
        let f = Fixture::new("pins");
        healthy(&f);
        let info = fs::read_to_string(f.path("proc/self/mountinfo")).unwrap();
        let pins = f.path("bpf/gpa");
        assert_eq!(check_pins(Some(&info), Some(&pins)).outcome, Outcome::Pass);
        // Pinning off: a warning, not a failure.
        assert_eq!(check_pins(Some(&info), None).outcome, Outcome::Warn);
        // A missing link is a failure that names it.
        fs::remove_file(pins.join("v2/link-gpa_connect4")).unwrap();
        let c = check_pins(Some(&info), Some(&pins));
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("missing link-gpa_connect4"), "{}", c.detail);
        // A symlink in its place is not accepted.
        symlink(pins.join("v2/gpa_policy"), pins.join("v2/link-gpa_connect4")).unwrap();
        assert!(
            check_pins(Some(&info), Some(&pins)).detail.contains("unusable (symlink or unreadable) link-gpa_connect4")
        );
        // Not on bpffs.
        let not_bpf = format!("30 1 0:26 / {} rw - tmpfs tmpfs rw\n", f.root.display());
        let c = check_pins(Some(&not_bpf), Some(&pins));
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("not bpffs"), "{}", c.detail);
    }

    #[test]
    fn the_listener_must_be_on_loopback_only() {
        let listen: SocketAddrV4 = "127.0.0.1:3080".parse().unwrap();
        let lo = tcp_table(&[(hex4(Ipv4Addr::LOCALHOST), 3080, "0A")]);
        assert_eq!(check_listener(Some(&lo), "", listen).outcome, Outcome::Pass);
        // Bound to every interface.
        let any = tcp_table(&[(hex4(Ipv4Addr::UNSPECIFIED), 3080, "0A")]);
        let c = check_listener(Some(&any), "", listen);
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("0.0.0.0:3080"), "{}", c.detail);
        // Loopback, plus a second listener on the IPv6 wildcard.
        let v6 = tcp_table(&[(hex6(Ipv6Addr::UNSPECIFIED), 3080, "0A")]);
        assert_eq!(check_listener(Some(&lo), &v6, listen).outcome, Outcome::Fail);
        let v6_lo = tcp_table(&[(hex6(Ipv6Addr::LOCALHOST), 3080, "0A")]);
        assert_eq!(check_listener(Some(&lo), &v6_lo, listen).outcome, Outcome::Pass);
        // Nothing in LISTEN state on the port (an established connection does not count).
        let established = tcp_table(&[(hex4(Ipv4Addr::LOCALHOST), 3080, "01")]);
        let c = check_listener(Some(&established), "", listen);
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.hint.unwrap().contains("systemctl"));
        assert_eq!(check_listener(None, "", listen).outcome, Outcome::Warn);
    }

    #[test]
    fn key_directory_must_be_0700_with_0600_regular_files() {
        let f = Fixture::new("keys");
        healthy(&f);
        let keys = f.path("state/keys");
        let c = check_key_directory(&keys, f.uid);
        assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
        assert!(c.detail.contains("1 key file(s)"));
        // Wrong owner expected (as if the files were not root's).
        assert_eq!(check_key_directory(&keys, f.uid.wrapping_add(1)).outcome, Outcome::Fail);
        // A key file readable by the group.
        fs::set_permissions(keys.join("guid-1.key"), fs::Permissions::from_mode(0o640)).unwrap();
        let c = check_key_directory(&keys, f.uid);
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("guid-1.key is mode 0640"), "{}", c.detail);
        fs::set_permissions(keys.join("guid-1.key"), fs::Permissions::from_mode(0o600)).unwrap();
        // A symlink among the keys.
        symlink("/etc/passwd", keys.join("other.key")).unwrap();
        let c = check_key_directory(&keys, f.uid);
        assert!(c.outcome == Outcome::Fail && c.detail.contains("other.key is a symlink"), "{c:?}");
        fs::remove_file(keys.join("other.key")).unwrap();
        // The directory itself too open.
        fs::set_permissions(&keys, fs::Permissions::from_mode(0o755)).unwrap();
        let c = check_key_directory(&keys, f.uid);
        assert!(c.outcome == Outcome::Fail && c.detail.contains("mode 0755"), "{c:?}");
        // A symlinked directory.
        let link = f.path("state/keys-link");
        symlink(&keys, &link).unwrap();
        assert_eq!(check_key_directory(&link, f.uid).outcome, Outcome::Fail);
        // Not created yet.
        assert_eq!(check_key_directory(&f.path("state/none"), f.uid).outcome, Outcome::Warn);
    }

    #[test]
    fn status_file_must_be_present_0640_and_fresh() {
        let f = Fixture::new("status");
        healthy(&f);
        let env = f.env();
        let log = f.path("log");
        let (c, doc) = check_status_file(&log, 60, &env);
        assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
        assert!(c.detail.ends_with("written 30 s ago"), "{}", c.detail);
        assert!(doc.is_some());
        // Stale: older than 3 × 60 s.
        crate::status::writer::write_atomic(&log, &sample_json(ModuleStatus::running("ok"), NOW_MS - 181_000, None))
            .unwrap();
        let (c, _) = check_status_file(&log, 60, &env);
        assert!(c.outcome == Outcome::Fail && c.detail.contains("stale: written 181 s ago"), "{c:?}");
        // Within 3 × 600 s it is fresh.
        assert_eq!(check_status_file(&log, 600, &env).0.outcome, Outcome::Pass);
        // Wrong mode.
        fs::set_permissions(log.join(STATUS_FILE_NAME), fs::Permissions::from_mode(0o644)).unwrap();
        let (c, _) = check_status_file(&log, 600, &env);
        assert!(c.outcome == Outcome::Fail && c.detail.contains("mode 0644"), "{c:?}");
        // Not a status document.
        f.write("log/status.json", "{\"nope\":1}", 0o640);
        assert_eq!(check_status_file(&log, 600, &env).0.outcome, Outcome::Fail);
        // A symlink.
        fs::remove_file(log.join(STATUS_FILE_NAME)).unwrap();
        symlink(f.path("elsewhere.json"), log.join(STATUS_FILE_NAME)).unwrap();
        assert_eq!(check_status_file(&log, 600, &env).0.outcome, Outcome::Fail);
        // Missing.
        fs::remove_file(log.join(STATUS_FILE_NAME)).unwrap();
        let (c, doc) = check_status_file(&log, 600, &env);
        assert!(c.outcome == Outcome::Fail && c.detail.ends_with("is missing") && doc.is_none(), "{c:?}");
        assert_eq!(check_agent_status(None).outcome, Outcome::Warn);
    }

    #[test]
    fn agent_status_fails_on_error_and_names_the_component() {
        let ok = view::parse(&sample_json(ModuleStatus::running("ok"), NOW_MS, None)).unwrap();
        let c = check_agent_status(Some(&ok));
        assert_eq!(c.outcome, Outcome::Pass);
        assert!(c.detail.contains("WireServer Enforce"));
        let bad = view::parse(&sample_json(
            ModuleStatus::stopped("cannot listen on 127.0.0.1:3080: address in use"),
            NOW_MS,
            None,
        ))
        .unwrap();
        let c = check_agent_status(Some(&bad));
        assert_eq!(c.outcome, Outcome::Fail);
        assert_eq!(c.detail, "ERROR: proxyListener STOPPED (cannot listen on 127.0.0.1:3080: address in use)");
    }

    #[test]
    fn clock_skew_is_reported_when_recorded() {
        let none = view::parse(&sample_json(ModuleStatus::running("ok"), NOW_MS, None)).unwrap();
        let c = check_clock_skew(Some(&none));
        assert!(c.outcome == Outcome::Pass && c.detail.starts_with("not measured"));
        let small = view::parse(&sample_json(ModuleStatus::running("ok"), NOW_MS, Some(-2))).unwrap();
        let c = check_clock_skew(Some(&small));
        assert_eq!((c.outcome, c.detail.as_str()), (Outcome::Pass, "host clock - local clock = -2 s"));
        let big = view::parse(&sample_json(ModuleStatus::running("ok"), NOW_MS, Some(300))).unwrap();
        assert_eq!(check_clock_skew(Some(&big)).outcome, Outcome::Warn);
    }

    #[test]
    fn bpf_syscall_is_detected_from_the_sysctl() {
        let f = Fixture::new("bpf");
        let p = f.write("unprivileged_bpf_disabled", "1\n", 0o644);
        let c = check_bpf_syscall(&p);
        assert_eq!(
            (c.outcome, c.detail.as_str()),
            (Outcome::Pass, "BPF syscall present (unprivileged_bpf_disabled=1)")
        );
        assert_eq!(check_bpf_syscall(&f.path("absent")).outcome, Outcome::Fail);
    }

    #[test]
    fn proc_net_addresses_decode_in_native_byte_order() {
        assert_eq!(proc_net_addr(&hex4(Ipv4Addr::new(127, 0, 0, 1))), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let mapped = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped();
        assert_eq!(proc_net_addr(&hex6(mapped)), Some(IpAddr::V6(mapped)));
        assert!(is_loopback(IpAddr::V6(mapped)));
        assert_eq!(proc_net_addr("zz"), None);
    }

    #[test]
    fn the_real_system_is_checked_quickly() {
        // Whatever this machine's state, the checks must finish fast and never panic.
        let config = ValidatedConfig::parse(b"{}").unwrap();
        let start = crate::clock::now();
        let checks = run_checks(&config, &Environment::system(NOW_MS));
        assert_eq!(checks.len(), 11);
        assert!(crate::clock::now().saturating_duration_since(start) < std::time::Duration::from_secs(1));
    }

    #[test]
    fn a_fallback_identity_warns_and_a_squatted_port_fails() {
        use crate::config::CallerIdentity;
        let missing = Path::new("/nonexistent/btf/vmlinux");
        assert_eq!(check_caller_identity(missing, CallerIdentity::Kernel).outcome, Outcome::Warn);
        assert_eq!(check_caller_identity(missing, CallerIdentity::Procfs).outcome, Outcome::Warn);
        let header =
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let squatted = format!(
            "{header}   0: 0100007F:0C08 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 1 1\n"
        );
        let c = check_listener(Some(&squatted), "", "127.0.0.1:3080".parse().unwrap());
        assert_eq!(c.outcome, Outcome::Fail, "{c:?}");
        assert!(c.detail.contains("uid 65534"), "{c:?}");
    }
}
