#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Turns the raw outputs of build/bench into the printed table, bench-results.json and
bench-results.md, and checks the figures against the targets of issue 7.

Usage: report.py WORKDIR OUTDIR. WORKDIR holds, per workload, scenario and round,
wrk-<workload>-<scenario>-r<N>.txt (wrk --latency output) and .cpu (clock ticks the proxy
and the upstream spent during the run), armed-<label>.json, and facts.tsv (key<TAB>value
lines). With several rounds each scenario keeps its median round by requests/s.

Exit 0 when every scenario produced figures (missed targets are reported, never fatal),
1 when a scenario could not run.
"""
import glob
import json
import os
import re
import sys

SCENARIOS = ["direct", "nginx", "agent"]
WORKLOADS = [
    ("keepalive_c1", "keep-alive, 1 connection"),
    ("keepalive_c16", "keep-alive, 16 connections"),
    ("keepalive_c256", "keep-alive, 256 connections"),
    ("newconn_c16", "new connection per request, 16 connections"),
]
UNIT_US = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def parse_time_us(text):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
    return float(m.group(1)) * UNIT_US[m.group(2)] if m else None


def parse_wrk(path, clk_tck):
    """Requests/s, latency percentiles, errors and CPU per request of one run."""
    try:
        text = open(path).read()
    except OSError:
        return None
    out = {"rps": None, "requests": 0, "errors": 0, "non_2xx": 0}
    if m := re.search(r"Requests/sec:\s+([0-9.]+)", text):
        out["rps"] = float(m.group(1))
    if m := re.search(r"(\d+) requests in", text):
        out["requests"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        out["errors"] = sum(int(g) for g in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        out["non_2xx"] = int(m.group(1))
    if m := re.search(r"Latency\s+([0-9.]+\w+)\s+([0-9.]+\w+)\s+([0-9.]+\w+)", text):
        out["avg_us"] = parse_time_us(m.group(1))
        out["max_us"] = parse_time_us(m.group(3))
    for pct in ("50", "75", "90", "99"):
        if m := re.search(rf"^\s+{pct}%\s+([0-9.]+\w+)", text, re.M):
            out[f"p{pct}_us"] = parse_time_us(m.group(1))
    cpu = read_facts(path[:-4] + ".cpu")
    if out["requests"] and cpu:
        us_per_tick = 1_000_000 / clk_tck
        for k in ("proxy", "upstream"):
            ticks = int(cpu.get(f"{k}_ticks", 0))
            out[f"{k}_cpu_us_per_req"] = round(ticks * us_per_tick / out["requests"], 1) if ticks else None
    return out


def parse_strace(path, wrk_path):
    """Syscalls per request from an `strace -c` summary and the wrk run it covered."""
    try:
        lines = open(path).read().splitlines()
        wrk = open(wrk_path).read()
    except OSError:
        return None
    m = re.search(r"(\d+) requests in", wrk)
    requests = int(m.group(1)) if m else 0
    calls = {}
    for line in lines:
        tokens = line.split()
        if len(tokens) < 4 or not tokens[0].replace(".", "", 1).isdigit():
            continue
        # % time, seconds, usecs/call, calls, [errors,] syscall
        name = tokens[-1]
        try:
            calls[name] = int(tokens[3])
        except ValueError:
            continue
    total = calls.pop("total", None)
    if not requests or total is None:
        return None
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
    return {"requests": requests, "per_request": round(total / requests, 1),
            "top": [(k, round(v / requests, 2)) for k, v in top]}


def read_facts(path):
    try:
        return dict(line.rstrip("\n").split("\t", 1) for line in open(path) if "\t" in line)
    except OSError:
        return {}


def ok_run(r):
    # A run counts when it answered, and at most 1% of its answers were not 2xx.
    return bool(r and r["rps"] and r["requests"] > 0 and r["non_2xx"] <= r["requests"] // 100)


def median_round(runs):
    good = sorted((r for r in runs if ok_run(r)), key=lambda r: r["rps"])
    if good:
        return good[len(good) // 2]
    return runs[0] if runs else None


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def num(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def fmt(v, unit=""):
    if v is None:
        return "n/a"
    if unit == "x":
        return f"{v:.2f}x"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v:,.0f}{unit}" if abs(v) >= 100 else f"{v:.1f}{unit}"


def main():
    work, outdir = sys.argv[1], sys.argv[2]
    facts = read_facts(os.path.join(work, "facts.tsv"))
    clk_tck = int(facts.get("clk_tck", "100"))
    failures = []
    workloads = {}
    for key, title in WORKLOADS:
        row = {"title": title}
        for sc in SCENARIOS:
            runs = [parse_wrk(p, clk_tck) for p in sorted(glob.glob(os.path.join(work, f"wrk-{key}-{sc}-r*.txt")))]
            r = median_round([x for x in runs if x])
            if r is not None and len(runs) > 1:
                r["rounds_rps"] = [x["rps"] for x in runs if x]
            row[sc] = r
            if not ok_run(r):
                failures.append(f"{key}/{sc}")
        get = lambda sc: row[sc]["rps"] if row[sc] else None
        row["agent_over_direct"] = ratio(get("agent"), get("direct"))
        row["agent_over_nginx"] = ratio(get("agent"), get("nginx"))
        workloads[key] = row

    def lat(sc, p):
        r = workloads["keepalive_c1"][sc]
        return r.get(f"p{p}_us") if r else None

    added = {}
    for sc in ("nginx", "agent"):
        for p in ("50", "99"):
            v, d = lat(sc, p), lat("direct", p)
            added[f"{sc}_added_p{p}_us"] = round(v - d, 1) if v is not None and d is not None else None

    armed = {}
    for label in ("release", "static"):
        try:
            armed[label] = json.load(open(os.path.join(work, f"armed-{label}.json")))
        except (OSError, ValueError):
            armed[label] = {}
    footprint = {
        "rss_idle_kib": num(facts.get("rss_idle_kib_release")),
        "rss_conns_kib": num(facts.get("rss_conns_kib_release")),
        "connections_held": num(facts.get("connections_held_release")),
        "hwm_start_kib": num(facts.get("hwm_start_kib_release")),
        "hwm_end_kib": num(facts.get("hwm_end_kib_release")),
        "static_rss_idle_kib": num(facts.get("rss_idle_kib_static")),
        "static_rss_conns_kib": num(facts.get("rss_conns_kib_static")),
        "static_hwm_start_kib": num(facts.get("hwm_start_kib_static")),
        "idle_connections": num(facts.get("idle_connections")),
        "binary_bytes": num(facts.get("binary_bytes")),
        "binary_kind": facts.get("binary_kind"),
    }
    for k in ("rss_idle_kib", "rss_conns_kib", "binary_bytes"):
        if footprint[k] is None:
            failures.append(k)
    if armed["release"].get("first_signed_request_ms") is None:
        failures.append("armed")

    def target(name, required, value, met, unit=""):
        return {"target": name, "required": required, "measured": value, "unit": unit,
                "met": None if value is None else bool(met)}

    def latency_target(name, required, value, limit):
        # A proxy cannot be faster than no proxy: a negative difference means the run-to-run
        # noise of the machine is larger than the proxy's cost, and the figure proves nothing.
        t = target(name, required, value, value is not None and 0 <= value <= limit, " us")
        if value is not None and value < 0:
            t["met"] = None
            t["note"] = "inconclusive: below the noise of the direct run"
        return t

    t = []
    for key, c in (("keepalive_c1", 1), ("keepalive_c16", 16), ("keepalive_c256", 256)):
        r = workloads[key]["agent_over_nginx"]
        t.append(target(f"keep-alive throughput, {c} conn., agent/nginx", ">= 1.0x", r, r is not None and r >= 1.0, "x"))
    a50, a99 = added["agent_added_p50_us"], added["agent_added_p99_us"]
    t.append(latency_target("added latency over direct, p50 (1 conn.)", "<= 30 us", a50, 30))
    t.append(latency_target("added latency over direct, p99 (1 conn.)", "<= 200 us", a99, 200))
    nc = workloads["newconn_c16"]["agent_over_direct"]
    t.append(target("new-connection rate, agent/direct", ">= 0.5x", nc, nc is not None and nc >= 0.5, "x"))
    mib = lambda k: None if footprint[k] is None else round(footprint[k] / 1024, 2)
    idle, busy = mib("rss_idle_kib"), mib("rss_conns_kib")
    t.append(target("RSS idle (release build)", "<= 3 MiB", idle, idle is not None and idle <= 3, " MiB"))
    t.append(target(f"RSS at {footprint['idle_connections']} idle connections (release build)", "<= 12 MiB",
                    busy, busy is not None and busy <= 12, " MiB"))
    size = footprint["binary_bytes"]
    t.append(target("stripped static binary", "<= 1.2 MB", size, size is not None and size <= 1_200_000, " B"))
    am = armed["release"].get("first_signed_request_ms")
    t.append(target("exec -> redirect armed (first signed redirected request)", "<= 60 ms", am, am is not None and am <= 60, " ms"))

    syscalls = {}
    for key, _title in WORKLOADS:
        for sc in ("nginx", "agent"):
            r = parse_strace(os.path.join(work, f"strace-{key}-{sc}.txt"), os.path.join(work, f"wrkstrace-{key}-{sc}.txt"))
            if r is not None:
                syscalls.setdefault(key, {})[sc] = r

    machine = {k: facts.get(k) for k in ("cpu", "nproc", "kernel", "nginx", "wrk", "load_start", "load_end")}
    setup = {k: facts.get(k) for k in ("seconds_per_run", "rounds", "pinning", "response_bytes", "commit", "source_digest")}
    results = {"machine": machine, "setup": setup, "workloads": workloads, "latency_c1_added_over_direct": added,
               "footprint": footprint, "armed": armed, "syscalls_per_request": syscalls, "targets": t,
               "failed_scenarios": failures}
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "bench-results.json"), "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")

    md = [f"Machine: {machine['cpu']}, {machine['nproc']} vCPUs, kernel {machine['kernel']}, nginx {machine['nginx']}, "
          f"wrk {machine['wrk']}; load average at start {machine['load_start']}, at end {machine['load_end']}.",
          f"Runs: {setup['seconds_per_run']} s each, {setup['rounds']} round(s), wrk -t1 --latency, "
          f"{setup['response_bytes']}-byte JSON answer; {setup['pinning']}.",
          f"Agent built from commit {setup['commit']}, sources {setup['source_digest']}.", "",
          "| workload | metric | direct | nginx | agent | agent/direct | agent/nginx |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for key, title in WORKLOADS:
        row = workloads[key]
        g = lambda sc, k: row[sc].get(k) if row[sc] else None
        md.append(f"| {title} | req/s | {fmt(g('direct', 'rps'))} | {fmt(g('nginx', 'rps'))} | {fmt(g('agent', 'rps'))} | "
                  f"{fmt(row['agent_over_direct'], 'x')} | {fmt(row['agent_over_nginx'], 'x')} |")
        for p in ("50", "99"):
            d, n, a = g("direct", f"p{p}_us"), g("nginx", f"p{p}_us"), g("agent", f"p{p}_us")
            md.append(f"| | p{p} latency | {fmt(d, ' us')} | {fmt(n, ' us')} | {fmt(a, ' us')} | "
                      f"{fmt(ratio(a, d), 'x')} | {fmt(ratio(a, n), 'x')} |")
        pn, pa = g("nginx", "proxy_cpu_us_per_req"), g("agent", "proxy_cpu_us_per_req")
        md.append(f"| | proxy CPU/request | | {fmt(pn, ' us')} | {fmt(pa, ' us')} | | {fmt(ratio(pa, pn), 'x')} |")
        ud, un, ua = (g(s, "upstream_cpu_us_per_req") for s in SCENARIOS)
        md.append(f"| | upstream CPU/request | {fmt(ud, ' us')} | {fmt(un, ' us')} | {fmt(ua, ' us')} | | |")
        errs = [f"{sc}: {row[sc]['errors']} socket errors, {row[sc]['non_2xx']} non-2xx" for sc in SCENARIOS
                if row[sc] and (row[sc]["errors"] or row[sc]["non_2xx"])]
        if errs:
            md.append(f"| | errors | {'; '.join(errs)} | | | | |")
    if syscalls:
        md += ["", "| syscalls per request (strace -c, 2 s runs) | nginx | agent | agent/nginx | agent's most frequent |",
               "|---|---:|---:|---:|---|"]
        for key, title in WORKLOADS:
            row = syscalls.get(key)
            if not row:
                continue
            n, a = (row.get(sc, {}).get("per_request") for sc in ("nginx", "agent"))
            top = ", ".join(f"{k} {v}" for k, v in row.get("agent", {}).get("top", []))
            md.append(f"| {title} | {fmt(n)} | {fmt(a)} | {fmt(ratio(a, n), 'x')} | {top} |")
    md += ["", f"Added latency over direct at 1 connection: nginx p50 {fmt(added['nginx_added_p50_us'], ' us')}, "
           f"p99 {fmt(added['nginx_added_p99_us'], ' us')}; agent p50 {fmt(a50, ' us')}, p99 {fmt(a99, ' us')}.", "",
           "| footprint and start | release build (glibc) | shipped static binary (musl) |",
           "|---|---:|---:|"]
    fp = footprint
    n_conn = fp["idle_connections"]
    rows = [
        ("RSS idle, after ready", fmt(fp["rss_idle_kib"], " KiB"), fmt(fp["static_rss_idle_kib"], " KiB")),
        (f"RSS holding {n_conn} idle connections", fmt(fp["rss_conns_kib"], " KiB"), fmt(fp["static_rss_conns_kib"], " KiB")),
        ("peak RSS (VmHWM) right after ready", fmt(fp["hwm_start_kib"], " KiB"), fmt(fp["static_hwm_start_kib"], " KiB")),
        ("peak RSS (VmHWM) after all load runs", fmt(fp["hwm_end_kib"], " KiB"), ""),
        ("spawn -> proxy listener ready (log)", fmt(armed["release"].get("listener_ms"), " ms"), fmt(armed["static"].get("listener_ms"), " ms")),
        ("spawn -> eBPF attached (log)", fmt(armed["release"].get("attached_ms"), " ms"), fmt(armed["static"].get("attached_ms"), " ms")),
        ("spawn -> `redirect on: endpoint=imds` (log)", fmt(armed["release"].get("log_redirect_on_ms"), " ms"), fmt(armed["static"].get("log_redirect_on_ms"), " ms")),
        ("spawn -> first signed, redirected request", fmt(am, " ms"), fmt(armed["static"].get("first_signed_request_ms"), " ms")),
        ("stripped static binary size", "", fmt(size, " B")),
    ]
    md += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    md += ["", "| target (issue 7) | required | measured | |", "|---|---|---:|---|"]
    for x in t:
        verdict = x.get("note", "n/a") if x["met"] is None else ("met" if x["met"] else "**missed**")
        md.append(f"| {x['target']} | {x['required']} | {fmt(x['measured'], x['unit'])} | {verdict} |")
    if failures:
        md += ["", f"Scenarios that could not run: {', '.join(failures)}"]
    text = "\n".join(md) + "\n"
    with open(os.path.join(outdir, "bench-results.md"), "w") as f:
        f.write(text)
    print(text)
    met = sum(1 for x in t if x["met"])
    print(f"targets met: {met} of {len(t)}; written to {outdir}/bench-results.json and bench-results.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
