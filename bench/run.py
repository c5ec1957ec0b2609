#!/usr/bin/env python3
"""Every benchmark in one run (what ``make bench`` does): runs each case
script with ``--json``, prints the tables, and writes docs/BENCHMARKS.md
with the machine described and the targets checked.

    .venv/bin/python bench/run.py              # full run (< 10 min on 2 cores)
    .venv/bin/python bench/run.py --quick      # short run; writes nothing
    .venv/bin/python bench/run.py --quick --out /tmp/BENCH.md

Cases (each script also runs alone; see bench/README.md):
  throughput.py   webhook delivery vs aiohttp, httpx and wrk; durable mode;
                  notify-to-receiver latency
  notify_cost.py  notify() vs a pure-Python fan-out; callgrind count
  sse_streams.py  SSE over HTTP: RSS per idle stream, fan-out latency
  broker.py       scale-out through Redis (broker_url): events across
                  processes vs redis-py, notify-to-subscriber latency,
                  notify() cost with and without the broker
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CASES = [
    ("delivery", "throughput.py"),
    ("notify", "notify_cost.py"),
    ("sse", "sse_streams.py"),
    ("broker", "broker.py"),
]

# (case, headline key, description, comparison, threshold, value format)
TARGETS = [
    ("delivery", "vs_aiohttp", "delivery ≥ 10x aiohttp (asyncio)", ">=", 10.0, "{:.2f}x"),
    ("delivery", "vs_wrk", "delivery ≥ 0.35x wrk", ">=", 0.35, "{:.2f}x"),
    ("notify", "notify_vs_baseline_1sub", "notify() ≥ 2x the pure-Python fan-out (1 subscriber)", ">=", 2.0, "{:.2f}x"),
    ("sse", "rss_kb_per_stream_10k", "≤ 10 KB RSS per idle SSE stream (10,000 streams)", "<=", 10.0, "{:.1f} KB"),
    ("delivery", "store_batched_vs_memory", "durable batched ≥ 0.5x in-memory", ">=", 0.5, "{:.2f}x"),
]


def _cmd(args: list[str]) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr).strip() else "?"


def _pkg(name: str) -> str:
    return _cmd(["pkg-config", "--modversion", name])


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    distro = "?"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    nginx = _cmd(["nginx", "-v"]).split("/")[-1]
    return (
        f"{distro}, Linux {platform.release()}, {os.cpu_count()} vCPUs ({cpu}), {mem} RAM; "
        f"Python {platform.python_version()}, libcurl {_pkg('libcurl')}, OpenSSL {_pkg('libcrypto')}, "
        f"SQLite {_pkg('sqlite3')}, nginx {nginx}; load average "
        f"{Path('/proc/loadavg').read_text().split()[0]} at start; "
        f"run of {datetime.date.today().isoformat()}."
    )


def run_case(name: str, script: str, quick: bool, tmp: str) -> dict[str, Any] | None:
    path = HERE / script
    if not path.exists():
        print(f"bench: {script} missing, {name} skipped", file=sys.stderr)
        return None
    out = os.path.join(tmp, f"{name}.json")
    args = [sys.executable, str(path), "--json", out] + (["--quick"] if quick else [])
    print(f"bench: {' '.join(args[1:2])} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    r = subprocess.run(args, cwd=ROOT, stdout=subprocess.DEVNULL)
    took = time.monotonic() - t0
    if r.returncode != 0 or not os.path.exists(out):
        print(f"bench: {script} failed (exit {r.returncode}) after {took:.0f} s", file=sys.stderr)
        return {"case": name, "failed": True, "markdown": f"## {name}\n\n{script} failed (exit {r.returncode}).\n", "headline": {}}
    data: dict[str, Any] = json.loads(Path(out).read_text())
    print(f"bench: {script} done in {took:.0f} s", file=sys.stderr, flush=True)
    data["seconds"] = took
    return data


def targets_table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| target | measured | |", "|---|---:|---|"]
    for case, key, text, op, limit, fmt in TARGETS:
        value = results.get(case, {}).get("headline", {}).get(key)
        if value is None:
            lines.append(f"| {text} | not measured | |")
            continue
        met = value >= limit if op == ">=" else value <= limit
        lines.append(f"| {text} | {fmt.format(value)} | {'met' if met else '**missed**'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs of every case; writes no file unless --out")
    ap.add_argument("--out", help="where to write the report (default: docs/BENCHMARKS.md; none with --quick)")
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(n for n, _ in CASES))
    args = ap.parse_args()
    wanted = set(args.only.split(",")) if args.only else {n for n, _ in CASES}
    out = args.out or (None if args.quick else str(ROOT / "docs" / "BENCHMARKS.md"))
    started = time.monotonic()
    desc = machine()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bpn-bench-") as tmp:
        for name, script in CASES:
            if name in wanted:
                data = run_case(name, script, args.quick, tmp)
                if data is not None:
                    results[name] = data
    total = time.monotonic() - started
    notes = HERE / "NOTES.md"
    parts = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`bench/run.py`" + (" --quick" if args.quick else "") + f") in {total / 60:.1f} min; "
        "every case ran in this one invocation, on this machine. How each case is "
        "measured: [bench/README.md](../bench/README.md).",
        "",
        "## Machine",
        "",
        desc,
        "",
        "## Targets",
        "",
        targets_table(results),
        "",
    ]
    for name, _ in CASES:
        if name in results:
            parts.append(results[name]["markdown"].rstrip() + "\n")
    if notes.exists():
        parts.append(notes.read_text().rstrip() + "\n")
    report = "\n".join(parts)
    print(report)
    if out:
        Path(out).write_text(report)
        print(f"bench: wrote {out}", file=sys.stderr)
    return 1 if any(r.get("failed") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
