#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Spawns the agent and measures exec -> redirect armed, from the caller's side.

Run inside the bench's network namespace, outside the agent's cgroup. It spawns the agent
(argv after `--`), notes the spawn time, then moves itself (only itself) into the agent's
cgroup and probes 169.254.169.254:80 every millisecond. Before the redirect is armed a probe
reaches nginx directly (no marker header, x-gpa-signed: no); the first probe answered through
the agent (its `x-ms-azure-host-authorization: value` marker) and signed (nginx reports
x-gpa-signed: yes) ends the measurement. The agent's stderr goes to a file that is polled
for its `redirect on: endpoint=imds` line, as a second, log-side, figure.

Writes one JSON object to --out; the agent keeps running (its pid is in --pidfile).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

PROBE = (b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\n"
         b"Host: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n")


def probe():
    """(redirected, signed, status) of one request, or None when it failed."""
    try:
        with socket.create_connection(("169.254.169.254", 80), timeout=0.5) as s:
            s.sendall(PROBE)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    status = head.split(b" ", 2)[1].decode() if head.startswith(b"http/") else "?"
    return (b"\r\nx-ms-azure-host-authorization: value" in head,
            b"\r\nx-gpa-signed: yes" in head, status)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cgroup", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--pidfile", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    log = open(a.log, "wb")
    t0 = time.monotonic()
    agent = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    with open(a.pidfile, "w") as f:
        f.write(f"{agent.pid}\n")
    # Only this process joins the cgroup (the agent stays where the bench started it).
    with open(os.path.join(a.cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    marks = {"listener_ms": b"proxy listener ready", "attached_ms": b"eBPF redirector attached",
             "log_redirect_on_ms": b"redirect on: endpoint=imds"}
    seen = {}
    first_request_ms = None
    probes = 0
    last = None
    while time.monotonic() - t0 < a.timeout:
        now_ms = (time.monotonic() - t0) * 1000.0
        try:
            with open(a.log, "rb") as f:
                text = f.read()
        except OSError:
            text = b""
        for key, needle in marks.items():
            if key not in seen and needle in text:
                seen[key] = round(now_ms, 2)
        if first_request_ms is None:
            r = probe()
            probes += 1
            last = r
            if r and r[0] and r[1] and r[2] == "200":
                first_request_ms = round((time.monotonic() - t0) * 1000.0, 2)
        if first_request_ms is not None and len(seen) == len(marks):
            break
        if agent.poll() is not None:
            break
        time.sleep(0.001)
    result = {"first_signed_request_ms": first_request_ms, "probes": probes,
              "last_probe": list(last) if last else None, "agent_exit": agent.poll(), **seen}
    with open(a.out, "w") as f:
        json.dump(result, f)
    return 0 if first_request_ms is not None else 1


if __name__ == "__main__":
    sys.exit(main())
