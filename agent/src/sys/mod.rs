// SPDX-License-Identifier: MIT
//! All `unsafe` and raw libc of the agent, each call behind a small safe function.
//!
//! Every raw syscall goes through [`cvt`], which turns `-1` into `io::Error::last_os_error()`,
//! and every new fd is wrapped in an `OwnedFd` at once so it can neither leak nor be closed
//! twice.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub mod harden;

/// `AF_INET` in the `sa_family_t` width.
const AF_INET_FAMILY: libc::sa_family_t = 2;
const _: () = assert!(libc::AF_INET == 2);

/// A size of a small C struct as `socklen_t`.
fn socklen(size: usize) -> libc::socklen_t {
    libc::socklen_t::try_from(size).unwrap_or(libc::socklen_t::MAX)
}

/// Turns a libc `-1` return into the thread's last OS error.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn setsockopt_u32(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, value: u32) -> io::Result<()> {
    // SAFETY: `fd` is a live socket for the borrow; the option value points at a u32 that
    // outlives the call and its exact size is passed.
    cvt(unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, (&raw const value).cast(), socklen(size_of::<u32>()))
    })?;
    Ok(())
}

/// Sets `SO_MARK`, which the kernel programs test to exempt the agent's own sockets.
pub fn set_mark(fd: BorrowedFd<'_>, mark: u32) -> io::Result<()> {
    setsockopt_u32(fd, libc::SOL_SOCKET, libc::SO_MARK, mark)
}

/// `SO_NETNS_COOKIE` (Linux 5.14): the cookie of the network namespace a socket lives in. The
/// kernel programs key identities by it, so callers in different namespaces never collide.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut value: u64 = 0;
    let mut len = socklen(size_of::<u64>());
    // SAFETY: `fd` is a live socket; `value` and `len` are valid for writes of the sizes given.
    cvt(unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut value).cast(), &raw mut len)
    })?;
    Ok(value)
}

/// Starts a non-blocking TCP connect with `SO_MARK` set before the SYN, so the connect itself is
/// exempt from redirection. The connect completes later (writable readiness).
pub fn connect_marked(addr: SocketAddrV4, mark: u32) -> io::Result<TcpStream> {
    // SAFETY: plain socket(2); the result is checked and owned immediately.
    let raw =
        cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if mark != 0 {
        set_mark(std::os::fd::AsFd::as_fd(&fd), mark)?;
    }
    let sin = libc::sockaddr_in {
        sin_family: AF_INET_FAMILY,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: `sin` is a valid sockaddr_in for the duration of the call and its size is passed.
    let ret =
        unsafe { libc::connect(fd.as_raw_fd(), (&raw const sin).cast(), socklen(size_of::<libc::sockaddr_in>())) };
    if ret == -1 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
    }
    Ok(TcpStream::from(fd))
}

/// `CLOCK_BOOTTIME` in nanoseconds: the clock of `bpf_ktime_get_boot_ns()` and of the process
/// start times in `/proc/<pid>/stat`.
pub fn boottime_ns() -> u64 {
    // SAFETY: an all-zero timespec is a valid value.
    let mut ts: libc::timespec = unsafe { zeroed() };
    // SAFETY: `ts` is valid for writes; CLOCK_BOOTTIME exists on every supported kernel.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
    if ret != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and threads it spawns later), so
/// they are only ever read from a signalfd. Call it before spawning any thread.
pub fn block_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: an all-zero sigset_t is a valid argument for sigemptyset.
    let mut set: libc::sigset_t = unsafe { zeroed() };
    // SAFETY: `set` is a valid sigset_t for all of these calls.
    unsafe {
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGHUP);
    }
    // SAFETY: `set` is initialised; the old mask is not wanted (null is allowed).
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(set)
}

/// A signalfd delivering SIGTERM, SIGINT and SIGHUP, which are blocked for normal delivery
/// so that they arrive through the event loop instead of interrupting it.
#[derive(Debug)]
pub struct SignalFd {
    fd: OwnedFd,
}

/// What a signal asks the agent to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT.
    Terminate,
    /// SIGHUP.
    Reload,
    /// Anything else read from the fd (not expected).
    Other(u32),
}

impl SignalFd {
    /// Blocks the signals and opens the fd.
    pub fn new() -> io::Result<Self> {
        let set = block_signals()?;
        // SAFETY: `set` is initialised; -1 asks for a new fd.
        let raw = cvt(unsafe { libc::signalfd(-1, &raw const set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) })?;
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(raw) } })
    }

    /// The raw fd, for registration with mio's `SourceFd`.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one pending signal, `None` when none is pending.
    pub fn read(&self) -> io::Result<Option<Signal>> {
        // SAFETY: an all-zero signalfd_siginfo is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { zeroed() };
        let size = size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is valid for writes of `size` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut info).cast(), size) };
        if n == -1 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(err) };
        }
        if usize::try_from(n).ok() != Some(size) {
            return Ok(None);
        }
        let signal = match i32::try_from(info.ssi_signo).unwrap_or(0) {
            libc::SIGTERM | libc::SIGINT => Signal::Terminate,
            libc::SIGHUP => Signal::Reload,
            other => Signal::Other(u32::try_from(other).unwrap_or(0)),
        };
        Ok(Some(signal))
    }
}

/// The agent's process id.
pub fn getpid() -> u32 {
    std::process::id()
}

/// The calling thread's id (telemetry events carry it, MSP §7.2).
pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    u32::try_from(tid).unwrap_or(0)
}

/// Total usable RAM in bytes (`sysinfo(2)`), 0 when unknown. Call it before the seccomp
/// filter is installed (`sysinfo` is not on its list).
pub fn total_ram_bytes() -> u64 {
    // SAFETY: an all-zero `struct sysinfo` is a valid value.
    let mut info: libc::sysinfo = unsafe { zeroed() };
    // SAFETY: `info` is valid for writes of its full size.
    if cvt(unsafe { libc::sysinfo(&raw mut info) }).is_err() {
        return 0;
    }
    info.totalram.saturating_mul(u64::from(info.mem_unit.max(1)))
}

/// Processors online (`sysconf(_SC_NPROCESSORS_ONLN)`), 0 when unknown. Call it before the
/// seccomp filter is installed.
pub fn online_cpus() -> u32 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(0)
}

/// Effective uid of this process.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() }
}

/// `PR_SET_DUMPABLE 0`: no core dumps (the key lives in memory) and no ptrace by same-uid
/// processes.
pub fn set_not_dumpable() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })?;
    Ok(())
}

/// The request number in the type this libc's `ioctl` takes (glibc: `c_ulong`, musl: `c_int`).
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::unnecessary_cast,
    reason = "SIOC* numbers fit in 32 bits; the cast is a no-op on glibc"
)]
fn ioctl_request(request: libc::c_ulong) -> libc::Ioctl {
    request as libc::Ioctl
}

/// Brings the loopback interface up (early boot has `lo` down; the listener needs it).
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "IFF_UP and ASCII name bytes fit; c_char's signedness differs by architecture"
)]
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2); owned immediately.
    let raw = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero ifreq is valid; the name is copied in below.
    let mut req: libc::ifreq = unsafe { zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name; SIOCGIFFLAGS fills ifru_flags.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), ioctl_request(libc::SIOCGIFFLAGS), &raw mut req) })?;
    // SAFETY: SIOCGIFFLAGS initialised the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: `req` is valid and carries the new flags.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), ioctl_request(libc::SIOCSIFFLAGS), &raw mut req) })?;
    Ok(())
}

/// `BPF_FS_MAGIC` from `<linux/magic.h>`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` is on a bpf filesystem (where BPF objects can be pinned).
pub fn is_bpffs(path: &std::path::Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is valid for writes.
    let ret = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
    #[allow(clippy::unnecessary_cast, reason = "f_type's width differs between libcs")]
    let magic = st.f_type as i64;
    ret == 0 && magic == BPF_FS_MAGIC
}

/// Mounts a bpf filesystem at `path` (which must exist).
pub fn mount_bpffs(path: &std::path::Path) -> io::Result<()> {
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: all strings are NUL-terminated and live for the call; no data argument.
    cvt(unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) })?;
    Ok(())
}

/// `BPF_LINK_UPDATE`: atomically replaces the program behind a link (a cgroup link stays
/// attached throughout: no moment without a program, and never two).
pub fn bpf_link_update(link: BorrowedFd<'_>, new_program: BorrowedFd<'_>) -> io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdate {
        link_fd: u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?,
        new_prog_fd: u32::try_from(new_program.as_raw_fd()).map_err(io::Error::other)?,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: bpf(2) reads `size_of::<LinkUpdate>()` bytes of a fully initialised, repr(C)
    // prefix of `union bpf_attr` for BPF_LINK_UPDATE; the kernel zero-extends the rest.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, &raw const attr, size_of::<LinkUpdate>()) };
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `BPF_OBJ_GET`: opens a pinned BPF object (map, program or link) by its bpffs path.
pub fn bpf_obj_get(path: &std::path::Path) -> io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let attr = ObjGet { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: the attr prefix is fully initialised and `c` outlives the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &raw const attr, size_of::<ObjGet>()) };
    let raw = i32::try_from(ret).map_err(io::Error::other)?;
    cvt(raw)?;
    // SAFETY: the kernel returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Raises the soft `RLIMIT_NOFILE` to at least `wanted` (never above the hard limit, never
/// lowering it). Returns the (soft, hard) limits now in force.
pub fn raise_nofile(wanted: u64) -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into `lim`, which is valid for writes.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) })?;
    let target = wanted.min(lim.rlim_max);
    if lim.rlim_cur < target {
        lim.rlim_cur = target;
        // SAFETY: setrlimit reads one valid rlimit.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) })?;
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// `BPF_OBJ_PIN`: pins a BPF object (here: a link) at a bpffs path.
pub fn bpf_obj_pin(object: BorrowedFd<'_>, path: &std::path::Path) -> io::Result<()> {
    const BPF_OBJ_PIN: libc::c_long = 6;
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let attr = ObjPin {
        pathname: c.as_ptr() as u64,
        bpf_fd: u32::try_from(object.as_raw_fd()).map_err(io::Error::other)?,
        file_flags: 0,
    };
    // SAFETY: the attr prefix is fully initialised and `c` outlives the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, &raw const attr, size_of::<ObjPin>()) };
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The cgroup id a cgroup BPF link is attached to (`BPF_OBJ_GET_INFO_BY_FD`); 0 when the
/// link is defunct (its cgroup was removed).
pub fn bpf_link_cgroup_id(link: BorrowedFd<'_>) -> io::Result<u64> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-aligned union whose
    // `cgroup` member starts with `__u64 cgroup_id` (offset 16).
    let mut info = [0u64; 8];
    let attr = GetInfo {
        bpf_fd: u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?,
        info_len: socklen(size_of::<[u64; 8]>()),
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `info` is valid for `info_len` bytes of writes for the duration of the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &raw const attr, size_of::<GetInfo>()) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[2])
}

/// The calling thread's stack as `(lowest usable address, size)`, from pthread.
fn thread_stack() -> Option<(usize, usize)> {
    // SAFETY: an all-zero pthread_attr_t is a valid out-parameter for pthread_getattr_np.
    let mut attr: libc::pthread_attr_t = unsafe { zeroed() };
    // SAFETY: `attr` is valid for writes; pthread_self() is the calling thread.
    if unsafe { libc::pthread_getattr_np(libc::pthread_self(), &raw mut attr) } != 0 {
        return None;
    }
    let mut addr: *mut libc::c_void = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: `attr` was initialised by pthread_getattr_np; the out-pointers are valid.
    let ok = unsafe { libc::pthread_attr_getstack(&raw const attr, &raw mut addr, &raw mut size) } == 0;
    // SAFETY: `attr` was initialised above and is destroyed exactly once.
    unsafe { libc::pthread_attr_destroy(&raw mut attr) };
    ok.then_some((addr as usize, size))
}

/// Gives the pages of the calling thread's stack well below the current frame back to the
/// kernel.
///
/// Parsing a status document with fixed-capacity structures needs a deep stack once per poll;
/// without this, every page it touched stays resident for the life of the process. The bounds
/// come from pthread (not guessed), the current position from a live local that cannot be
/// promoted to a constant, and a margin stays untouched at both ends (the guard page below,
/// the live frames above), so only pages no frame uses are dropped; they read back as zeros.
///
/// Never inlined: the live local must sit in a frame of its own, at the bottom of the stack.
/// Inlined into a caller whose frame is larger than the margin (a release build folding the
/// rule compiler into the event loop), the caller's own live locals below it were zeroed and
/// the static binary crashed after its first rules update.
#[inline(never)]
pub fn trim_stack() {
    const PAGE: usize = 4096;
    const MARGIN: usize = 256 * 1024;
    let Some((low, size)) = thread_stack() else { return };
    let mut probe = [0u8; 1];
    let here = std::hint::black_box(probe.as_mut_ptr()) as usize;
    if here < low || here >= low + size {
        return; // not the stack pthread describes (should not happen): do nothing
    }
    let start = (low + MARGIN).next_multiple_of(PAGE);
    let end = here.saturating_sub(MARGIN) & !(PAGE - 1);
    if end <= start {
        return;
    }
    // SAFETY: [start, end) lies inside this thread's stack as reported by pthread, at least
    // MARGIN above its lowest address and MARGIN below the current frame, where no live data
    // is; MADV_DONTNEED on private anonymous memory only drops those pages.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
    }
}

/// A listening TCP socket with `SO_REUSEADDR` and a backlog of `backlog` (std and mio use 128,
/// which a burst of redirected connects overflows: callers then wait a second for a SYN
/// retransmit).
pub fn listen_tcp(addr: SocketAddrV4, backlog: i32) -> io::Result<std::net::TcpListener> {
    // SAFETY: plain socket(2); the result is checked and owned immediately.
    let raw =
        cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    setsockopt_u32(std::os::fd::AsFd::as_fd(&fd), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    let sin = libc::sockaddr_in {
        sin_family: AF_INET_FAMILY,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: `sin` is a valid sockaddr_in for the duration of the call and its size is passed.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), (&raw const sin).cast(), socklen(size_of::<libc::sockaddr_in>())) })?;
    // SAFETY: listen(2) on the socket we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(std::net::TcpListener::from(fd))
}

/// Uid of the process at the other end of a Unix socket (`SO_PEERCRED`, as of its connect).
pub fn peer_uid_pid(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // SAFETY: `ucred` is plain data; all-zero is a valid value.
    let mut cred: libc::ucred = unsafe { zeroed() };
    let mut len = socklen(size_of::<libc::ucred>());
    // SAFETY: `fd` is a live socket; `cred` and `len` are valid for writes of the size given.
    cvt(unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &raw mut len)
    })?;
    Ok((cred.uid, u32::try_from(cred.pid).unwrap_or(0)))
}

/// Room for one `SCM_RIGHTS` message carrying a single fd (`CMSG_SPACE(sizeof(int))`, with
/// margin), aligned for `cmsghdr`.
#[repr(C, align(8))]
struct FdControl([u8; 64]);

/// Sends `bytes` with one file descriptor attached (`SCM_RIGHTS`). The receiver gets its own
/// descriptor for the same open file (here: the same listening socket).
pub fn send_with_fd(sock: BorrowedFd<'_>, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
    let mut control = FdControl([0; 64]);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(socklen(size_of::<RawFd>())) } as usize;
    // SAFETY: `msghdr` is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = space.min(control.0.len()) as _;
    // SAFETY: `msg` points at `control`, which is large enough for one cmsghdr with one int
    // (checked by the min above), so CMSG_FIRSTHDR is non-null and CMSG_DATA is in bounds.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        if cmsg.is_null() {
            return Err(io::Error::other("control buffer too small"));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(socklen(size_of::<RawFd>())) as _;
        libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(fd.as_raw_fd());
    }
    // SAFETY: `msg` and everything it points at (iov, bytes, control) outlive the call.
    let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
    usize::try_from(sent).map_err(|_negative| io::Error::last_os_error())
}

/// Receives into `buf` and returns the bytes read and the first file descriptor attached, if
/// any (received close-on-exec; any further descriptors are closed, never leaked).
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = FdControl([0; 64]);
    // SAFETY: `msghdr` is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: `msg` points at `buf` and `control`, both valid for writes of the sizes given.
    let got = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    let got = usize::try_from(got).map_err(|_negative| io::Error::last_os_error())?;
    let mut first = None;
    // SAFETY: the kernel filled `control` and set `msg_controllen`; the CMSG_* walk stays
    // within it. Every descriptor found is wrapped in an OwnedFd at once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    let owned = OwnedFd::from_raw_fd(data.add(i).read_unaligned());
                    if first.is_none() {
                        first = Some(owned);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((got, first))
}

/// The local address of `fd` if it is a listening IPv4 TCP socket, `None` if it is any other
/// kind of descriptor.
pub fn listening_tcp_v4(fd: BorrowedFd<'_>) -> Option<SocketAddrV4> {
    let get = |name| {
        let mut value: libc::c_int = 0;
        let mut len = socklen(size_of::<libc::c_int>());
        // SAFETY: `value` and `len` are valid for writes of the sizes given; a non-socket fd
        // just fails with ENOTSOCK.
        cvt(unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, name, (&raw mut value).cast(), &raw mut len) })
            .ok()
            .map(|_| value)
    };
    if get(libc::SO_DOMAIN)? != libc::AF_INET
        || get(libc::SO_TYPE)? != libc::SOCK_STREAM
        || get(libc::SO_ACCEPTCONN)? != 1
    {
        return None;
    }
    // SAFETY: `sockaddr_in` is plain data; all-zero is a valid value.
    let mut sin: libc::sockaddr_in = unsafe { zeroed() };
    let mut len = socklen(size_of::<libc::sockaddr_in>());
    // SAFETY: `sin` and `len` are valid for writes of the size given.
    cvt(unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut sin).cast(), &raw mut len) }).ok()?;
    Some(SocketAddrV4::new(u32::from_be(sin.sin_addr.s_addr).into(), u16::from_be(sin.sin_port)))
}

/// Tells systemd about the service state (`sd_notify(3)` protocol: one datagram to
/// `$NOTIFY_SOCKET`, a path or an abstract name starting with `@`). `Ok(false)` when not run
/// by systemd with `Type=notify`.
pub fn sd_notify(state: &str) -> io::Result<bool> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(false) };
    let addr = match target.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::path::Path::new(&target))?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

#[cfg(test)]
mod stack_tests {
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    #[inline(never)]
    fn deep(n: usize) -> u8 {
        let mut big = [0u8; 256 * 1024];
        for (i, b) in big.iter_mut().enumerate().step_by(4096) {
            *b = u8::try_from(i % 251).unwrap_or(0);
        }
        let b = std::hint::black_box(&big);
        if n == 0 { b[4096] } else { b[8192].wrapping_add(deep(n - 1)) }
    }

    #[test]
    fn trimming_releases_deep_stack_pages_and_keeps_the_thread_working() {
        let handle = std::thread::Builder::new()
            .stack_size(16 * 1024 * 1024)
            .spawn(|| {
                let touched = deep(24); // ~6 MiB of stack
                let before = rss_kib();
                super::trim_stack();
                let after = rss_kib();
                // The thread still works, deep again, after the trim.
                let again = deep(24);
                (touched, again, before, after)
            })
            .expect("thread");
        let (touched, again, before, after) = handle.join().expect("no crash");
        assert_eq!(touched, again);
        assert!(after + 4 * 1024 < before, "RSS {before} KiB -> {after} KiB: stack pages not released");
    }
}
