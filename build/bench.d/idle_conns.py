#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Opens N keep-alive TCP connections to 169.254.169.254:80, sends nothing, and holds them.

Run inside the agent's cgroup so every connect is redirected to the agent. Prints
`open N` (or `failed K of N: error`) once all connects returned, then holds the sockets until
killed or until --hold seconds passed (a bound, never an open-ended loop).
"""
import resource
import socket
import sys
import time


def main():
    n = int(sys.argv[1])
    hold = float(sys.argv[2]) if len(sys.argv) > 2 else 30.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    socks, err = [], None
    for _ in range(n):
        try:
            s = socket.create_connection(("169.254.169.254", 80), timeout=2.0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            socks.append(s)
        except OSError as e:
            err = e
            break
    if err is None:
        print(f"open {len(socks)}", flush=True)
    else:
        print(f"failed {n - len(socks)} of {n}: {err}", flush=True)
    end = time.monotonic() + hold
    while time.monotonic() < end:
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
