// SPDX-License-Identifier: MIT
//! Process hardening after start-up: drop every capability the running agent no longer needs,
//! forbid privilege gain, and install a seccomp filter that allows only the system calls the
//! event loop makes. Called once the programs are attached and the listener is bound.
//!
//! Kept capabilities (why):
//! * `CAP_NET_ADMIN` — `SO_MARK` on every upstream socket (the kernel programs' exemption);
//! * `CAP_SYS_PTRACE` — reading `/proc/<pid>/exe` of callers running as other users;
//! * `CAP_BPF` and `CAP_SYS_ADMIN` — *not* kept: map lookups and updates go through file
//!   descriptors opened at start, which need no capability.

use std::io;

/// Capability numbers kept (see module docs).
const KEPT_CAPS: [u32; 2] = [12 /* CAP_NET_ADMIN */, 19 /* CAP_SYS_PTRACE */];
/// Highest capability number the kernel may know (`CAP_LAST_CAP` is 40 in 6.x; probing the
/// bounding set stops at the first EINVAL).
const CAP_PROBE_MAX: u32 = 63;

/// Drops all capabilities but [`KEPT_CAPS`] from the bounding, permitted, effective and
/// inheritable sets, and sets `PR_SET_NO_NEW_PRIVS`.
pub fn drop_capabilities() -> io::Result<()> {
    for cap in 0..=CAP_PROBE_MAX {
        if KEPT_CAPS.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if ret == -1 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) {
                break; // past the kernel's last capability
            }
            return Err(err);
        }
    }
    let mask = KEPT_CAPS.iter().fold(0u64, |m, c| m | (1u64 << c));
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let low = u32::try_from(mask & 0xffff_ffff).unwrap_or(0);
    let high = u32::try_from(mask >> 32).unwrap_or(0);
    let data = [
        Data { effective: low, permitted: low, inheritable: 0 },
        Data { effective: high, permitted: high, inheritable: 0 },
    ];
    // SAFETY: capset reads a v3 header and two data structs, both fully initialised repr(C).
    let ret = unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl with integer arguments only.
    super::cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    Ok(())
}

/// System calls the running agent makes on every architecture (event loop, sockets, files,
/// bpf map access, logging, allocation, time). Anything not listed fails with `EPERM`.
const ALLOWED: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_readlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlinkat,
    libc::SYS_mkdirat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fchmod,
    libc::SYS_getdents64,
    libc::SYS_fcntl,
    libc::SYS_statfs,
    libc::SYS_ftruncate,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_ctl,
    libc::SYS_bpf,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_geteuid,
    libc::SYS_getuid,
    libc::SYS_getrandom,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
    libc::SYS_membarrier,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
];
/// The older x86_64-only forms of some calls (aarch64 has only the `*at` forms), which the
/// standard library may still use there.
#[cfg(target_arch = "x86_64")]
const ALLOWED_ARCH: &[libc::c_long] = &[
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_readlink,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_mkdir,
    libc::SYS_epoll_wait,
];
#[cfg(target_arch = "aarch64")]
const ALLOWED_ARCH: &[libc::c_long] = &[];

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64

/// Installs the seccomp filter: [`ALLOWED`] pass, any other call fails with `EPERM` (not
/// killed: an unexpected path degrades to an error the agent reports), a foreign
/// architecture is killed. Requires no-new-privs (set by [`drop_capabilities`]).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "syscall numbers are small non-negative")]
pub fn install_seccomp() -> io::Result<()> {
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let stmt = |code: u16, k: u32| libc::sock_filter { code, jt: 0, jf: 0, k };
    let allowed: Vec<libc::c_long> = ALLOWED.iter().chain(ALLOWED_ARCH).copied().collect();
    let mut prog: Vec<libc::sock_filter> = Vec::with_capacity(allowed.len() + 6);
    // seccomp_data: nr at offset 0, arch at offset 4.
    prog.push(stmt(BPF_LD_W_ABS, 4));
    prog.push(libc::sock_filter { code: BPF_JEQ_K, jt: 1, jf: 0, k: AUDIT_ARCH });
    prog.push(stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS));
    prog.push(stmt(BPF_LD_W_ABS, 0));
    for (i, nr) in allowed.iter().enumerate() {
        // On a match jump to the ALLOW at the end; the distance shrinks by one per entry.
        let to_allow = (allowed.len() - i) as u8;
        prog.push(libc::sock_filter { code: BPF_JEQ_K, jt: to_allow, jf: 0, k: *nr as u32 });
    }
    prog.push(stmt(BPF_RET_K, SECCOMP_RET_ERRNO | libc::EPERM as u32));
    prog.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_mut_ptr() };
    // SAFETY: `fprog` points at a valid filter that outlives the call; the kernel copies it.
    super::cvt(unsafe {
        libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &raw const fprog as libc::c_ulong, 0, 0)
    })?;
    Ok(())
}

/// Proves the filter: after [`install_seccomp`], a call outside the list (`ptrace`) must fail
/// with `EPERM`. Returns the error the kernel gave.
pub fn forbidden_call_result() -> io::Error {
    // SAFETY: PTRACE_TRACEME with null arguments; it fails under the filter by design, and
    // would only mark this process traceable by its parent otherwise.
    let ret = unsafe {
        libc::ptrace(
            libc::PTRACE_TRACEME,
            0,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if ret == -1 { io::Error::last_os_error() } else { io::Error::other("ptrace succeeded: no filter") }
}
