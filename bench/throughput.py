#!/usr/bin/env python3
"""Webhook delivery throughput: blueprint_notify against pure-Python senders
and wrk, all POSTing to a local nginx that answers 204.

    .venv/bin/python bench/throughput.py            # 50,000 events, ~2 min
    .venv/bin/python bench/throughput.py --quick    # 5,000 events
    .venv/bin/python bench/throughput.py --only bpn --reps 1 --events 20000

Needs nginx (Debian: nginx-light) and wrk on PATH, and aiohttp, httpx
(uvloop optional) in the venv; a missing optional sender is skipped. See
bench/README.md for what is measured and how to read the table.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import hashlib
import hmac
import http.server
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's package (built in place)

from blueprint_notify import JobEvent, JobNotifier, JobStatus  # noqa: E402

SECRET = "bench-signing-secret-0123456789abcdef"
CONCURRENCY = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
CASE_TIMEOUT = 150.0  # seconds; a case that takes longer is a failure

Workload = list[tuple[str, JobEvent]]


# ---- workload and the wire format ---------------------------------------------


def make_workload(n: int, jobs: int) -> Workload:
    """n events round-robin over `jobs` job ids: event k goes to job k % jobs,
    so consecutive events hit different jobs and per-job ordering (one in
    flight per job) never serialises more than n / jobs events. Bodies are
    ~130 bytes."""
    ts = int(time.time())
    ids = [f"job-{i:06d}" for i in range(jobs)]
    return [
        (
            ids[k % jobs],
            JobEvent(
                JobStatus.PROCESSING,
                progress=(k // jobs) % 101,
                result={"stage": "transcode", "chunk": k},
                timestamp=ts,
            ),
        )
        for k in range(n)
    ]


def wire_body(job_id: str, event: JobEvent) -> bytes:
    """The body blueprint_notify sends (csrc/core/event.c); job ids here need
    no JSON escaping."""
    return b'{"job_id":"' + job_id.encode() + b'","event":' + event.to_json().encode() + b"}"


def signed_headers(secret: bytes, job_id: str, body: bytes) -> dict[str, str]:
    """The headers blueprint_notify sends, signed now (like its per-attempt
    signing)."""
    ts = int(time.time())
    sig = hmac.new(secret, b"%d." % ts + body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-Webhook-Signature": "sha256=" + sig,
        "X-Webhook-Timestamp": str(ts),
        "X-Job-Id": job_id,
    }


# ---- CPU accounting from /proc ------------------------------------------------


def _stat_user_sys(path: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from a /proc .../stat file, 0s if gone."""
    try:
        with open(path) as f:
            data = f.read()
    except OSError:
        return 0, 0
    rest = data[data.rindex(")") + 2 :].split()  # rest[0] is field 3 (state)
    return int(rest[11]), int(rest[12])  # fields 14 (utime) and 15 (stime)


def _stat_ticks(path: str) -> int:
    return sum(_stat_user_sys(path))


def _children(ppid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except OSError:
            continue
        if int(data[data.rindex(")") + 2 :].split()[1]) == ppid:
            out.append(int(name))
    return out


def self_tids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


@dataclass
class CpuSnap:
    wall: float
    process: int
    threads: dict[int, tuple[int, int]]  # tid -> (utime, stime)
    nginx: int
    machine: int  # busy ticks of all CPUs (user, nice, system, irq, softirq, steal)


def _machine_busy() -> int:
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


class CpuProbe:
    """Samples this process (and each of its threads) and nginx's workers."""

    def __init__(self, nginx_master: int) -> None:
        self.master = nginx_master
        self.workers = _children(nginx_master)

    def snap(self) -> CpuSnap:
        pid = os.getpid()
        return CpuSnap(
            wall=time.perf_counter(),
            process=_stat_ticks("/proc/self/stat"),
            threads={t: _stat_user_sys(f"/proc/{pid}/task/{t}/stat") for t in self_tids()},
            nginx=sum(_stat_ticks(f"/proc/{w}/stat") for w in self.workers),
            machine=_machine_busy(),
        )

    @staticmethod
    def pct(ticks: int, wall: float) -> float:
        """CPU time as % of one core over `wall` seconds."""
        return 100.0 * ticks / CLK_TCK / wall if wall > 0 else 0.0


# ---- nginx ------------------------------------------------------------------


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a child (nginx, wrk) before exec: SIGTERM it when this process
    dies, so even a crash of the benchmark (no finally, no atexit) stops it."""
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Nginx:
    """nginx in the foreground (daemon off) with its pid file, error log and
    temp dirs in a temp dir; stopped by stop(), which is idempotent and also
    registered with atexit, and by the kernel (PR_SET_PDEATHSIG) if this
    process dies without running either. Start it from the main thread: the
    death signal fires when the thread that spawned it exits."""

    def __init__(self, workers: str) -> None:
        self.workers = workers
        self.dir: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        self.dir = tempfile.mkdtemp(prefix="bpn-bench-nginx-")
        template = (HERE / "nginx.conf.template").read_text()
        for _ in range(5):  # the port can be taken between probe and bind
            self.port = free_port()
            conf = os.path.join(self.dir, "nginx.conf")
            with open(conf, "w") as f:
                f.write(
                    template.replace("@PREFIX@", self.dir)
                    .replace("@PORT@", str(self.port))
                    .replace("@WORKERS@", self.workers)
                )
            err = os.path.join(self.dir, "error.log")
            self.proc = subprocess.Popen(
                [exe, "-p", self.dir, "-c", conf, "-e", err],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(self.dir, "stderr.log"), "wb"),
                start_new_session=True,  # its own process group, for stop()
                preexec_fn=_die_with_parent,
            )
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _port_open(self.port) and _children(self.proc.pid):
                    return
                time.sleep(0.05)
            self._stop_proc()
        log = ""
        for name in ("stderr.log", "error.log"):
            try:
                log += Path(self.dir, name).read_text()[-2000:]
            except OSError:
                pass
        raise RuntimeError(f"nginx did not start:\n{log}")

    def _stop_proc(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: fast shutdown, workers exit too
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the group we started (a stuck worker).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        self._stop_proc()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def nginx_version() -> str:
    r = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    return (r.stderr or r.stdout).strip().split("/")[-1]


# ---- results ------------------------------------------------------------------


@dataclass
class Run:
    events: int
    seconds: float
    client_cpu: float  # % of one core, whole client process
    nginx_cpu: float
    other_cpu: float  # everything else on the machine: noise if it is not ~0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Case:
    name: str
    runs: list[Run] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> Run:
        ordered = sorted(self.runs, key=lambda r: r.events / r.seconds)
        return ordered[len(ordered) // 2]

    @property
    def rate(self) -> float:
        return statistics.median(r.events / r.seconds for r in self.runs)


def _measure(probe: CpuProbe, events: int, body: Callable[[], dict[str, float]]) -> Run:
    s0 = probe.snap()
    extra = body()
    s1 = probe.snap()
    wall = extra.pop("seconds")
    span = s1.wall - s0.wall
    client = probe.pct(s1.process - s0.process, span)
    nginx = probe.pct(s1.nginx - s0.nginx, span)
    return Run(
        events=events,
        seconds=wall,
        client_cpu=client,
        nginx_cpu=nginx,
        other_cpu=max(0.0, probe.pct(s1.machine - s0.machine, span) - client - nginx),
        extra=extra,
    )


# ---- senders ------------------------------------------------------------------


def bpn_notifier(store_path: str | None = None, durability: str = "batched") -> JobNotifier:
    return JobNotifier(
        signing_secret=SECRET,
        max_connections=CONCURRENCY,
        max_connections_per_host=CONCURRENCY,
        allow_private_networks=True,
        store_path=store_path,
        durability=durability,
    )


def run_bpn(url: str, workload: Workload, probe: CpuProbe, durability: str | None = None, tmp: str = "") -> Run:
    """durability None: in memory; "batched"/"sync": with a fresh store file
    in tmp (delivered rows kept, the default: each delivery is an INSERT and
    an UPDATE)."""
    before = self_tids()
    store = os.path.join(tmp, "bench-outbox.db") if durability else None
    with bpn_notifier(store, durability or "batched") as notifier:
        engine_tids = self_tids() - before  # the delivery thread
        main_tid = threading.get_native_id()
        holder: dict[str, Any] = {}

        def body() -> dict[str, float]:
            holder["t0"] = probe.snap()
            notify = notifier.notify
            t0 = time.perf_counter()
            for job_id, event in workload:
                notify(job_id, event, url)
            t1 = time.perf_counter()
            drained = notifier.flush(CASE_TIMEOUT)
            t2 = time.perf_counter()
            holder["t2"] = probe.snap()
            if not drained:
                raise RuntimeError(f"flush() timed out after {CASE_TIMEOUT}s")
            return {"seconds": t2 - t0, "notify_seconds": t1 - t0}

        run = _measure(probe, len(workload), body)
        stats = notifier.stats()
        dead = notifier.dead_letters()
    if store:
        for suffix in ("", "-wal", "-shm", "-lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(store + suffix)
        if stats["store_errors"]:
            raise RuntimeError(f"store errors: {stats}")
        run.extra["commits"] = stats["store_commits"]
    if stats["delivered"] != len(workload) or stats["dead_lettered"] or dead:
        raise RuntimeError(f"blueprint_notify did not deliver everything: {stats}")
    if stats["failed_attempts"]:
        raise RuntimeError(f"blueprint_notify had failed attempts: {stats}")
    s0, s2 = holder["t0"], holder["t2"]
    wall = s2.wall - s0.wall

    def used(tids: set[int], which: int) -> int:
        return sum(s2.threads.get(t, (0, 0))[which] - s0.threads.get(t, (0, 0))[which] for t in tids)

    run.extra["main_cpu"] = probe.pct(used({main_tid}, 0) + used({main_tid}, 1), wall)
    user, system = used(engine_tids, 0), used(engine_tids, 1)
    run.extra["delivery_cpu"] = probe.pct(user + system, wall)
    run.extra["delivery_us_user"] = user / CLK_TCK / len(workload) * 1e6
    run.extra["delivery_us_sys"] = system / CLK_TCK / len(workload) * 1e6
    return run


def run_latency(url: str, workload: Workload, rate: float, seconds: float) -> dict[str, float]:
    """notify() to the receiver's 2xx, from the notifier's own histogram
    (buckets ~19% wide; the value reported is the bucket's midpoint).
    rate 0: idle, one event at a time (notify, then flush). Else a paced
    producer: every millisecond, the events due by then."""
    with bpn_notifier() as notifier:
        sent = 0
        t0 = time.perf_counter()
        if rate == 0:
            n = min(len(workload), 2_000)
            for job_id, event in workload[:n]:
                notifier.notify(job_id, event, url)
                notifier.flush(CASE_TIMEOUT)
            sent = n
        else:
            total = min(len(workload), int(rate * seconds))
            while sent < total:
                due = min(total, int((time.perf_counter() - t0) * rate) + 1)
                for job_id, event in workload[sent:due]:
                    notifier.notify(job_id, event, url)
                sent = due
                time.sleep(0.001)
        elapsed = time.perf_counter() - t0
        if not notifier.flush(CASE_TIMEOUT):
            raise RuntimeError("flush() timed out")
        stats = notifier.stats()
    if stats["delivered"] != sent or stats["failed_attempts"]:
        raise RuntimeError(f"latency run did not deliver everything cleanly: {stats}")
    # The first deliveries include connecting (at most 64 of thousands:
    # below the 99th percentile).
    return {
        "events": sent,
        "rate": sent / elapsed,
        "p50_ms": stats["latency_p50_ms"],
        "p99_ms": stats["latency_p99_ms"],
    }


async def _drive(workload: Workload, send: Callable[[str, bytes, dict[str, str]], Any]) -> dict[str, float]:
    """64 worker tasks pull from one queue; each request is built, signed and
    sent by the worker. Returns the timing."""
    secret = SECRET.encode()
    queue: asyncio.Queue[tuple[str, JobEvent]] = asyncio.Queue()
    bad: list[int] = []

    async def worker() -> None:
        while True:
            try:
                job_id, event = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = wire_body(job_id, event)
            status = await send(job_id, body, signed_headers(secret, job_id, body))
            if not 200 <= status < 300:
                bad.append(status)

    t0 = time.perf_counter()
    for item in workload:
        queue.put_nowait(item)
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), CASE_TIMEOUT)
    t1 = time.perf_counter()
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. HTTP {bad[0]}")
    return {"seconds": t1 - t0}


async def aiohttp_send(url: str, workload: Workload) -> dict[str, float]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=CONCURRENCY, limit_per_host=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(job_id: str, body: bytes, headers: dict[str, str]) -> int:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status

        return await _drive(workload, send)


async def httpx_send(url: str, workload: Workload) -> dict[str, float]:
    import httpx

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:

        async def send(job_id: str, body: bytes, headers: dict[str, str]) -> int:
            resp = await client.post(url, content=body, headers=headers)
            return resp.status_code

        return await _drive(workload, send)


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run_async(kind: str, coro_fn: Callable[..., Any], url: str, workload: Workload, probe: CpuProbe) -> Run:
    def body() -> dict[str, float]:
        with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
            return runner.run(coro_fn(url, workload))

    return _measure(probe, len(workload), body)


def run_wrk(url: str, seconds: int, tmp: str, workload: Workload, probe: CpuProbe) -> Run:
    job_id, event = workload[0]
    body = wire_body(job_id, event)
    headers = signed_headers(SECRET.encode(), job_id, body)
    headers["User-Agent"] = "blueprint-notify/0.1.0"
    lua = ['wrk.method = "POST"', f"wrk.body = [==[{body.decode()}]==]"]
    lua += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    script = os.path.join(tmp, "post.lua")
    Path(script).write_text("\n".join(lua) + "\n")
    out: dict[str, str] = {}

    def run_it() -> dict[str, float]:
        c0 = os.times()
        t0 = time.perf_counter()
        r = subprocess.run(
            ["wrk", "-t2", f"-c{CONCURRENCY}", f"-d{seconds}s", "-s", script, url],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            preexec_fn=_die_with_parent,
        )
        t1 = time.perf_counter()
        c1 = os.times()
        out["stdout"] = r.stdout
        if r.returncode != 0:
            raise RuntimeError(f"wrk failed: {r.stderr or r.stdout}")
        m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", r.stdout)
        if not m:
            raise RuntimeError(f"cannot parse wrk output:\n{r.stdout}")
        reqs, dur = int(m.group(1)), float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
        if non2xx:
            raise RuntimeError(f"wrk saw {non2xx.group(1)} non-2xx responses")
        wrk_ticks = (c1.children_user + c1.children_system - c0.children_user - c0.children_system) * CLK_TCK
        out["wrk_cpu"] = str(CpuProbe.pct(int(wrk_ticks), t1 - t0))
        return {"seconds": dur, "events": reqs}

    run = _measure(probe, 0, run_it)
    run.events = int(run.extra.pop("events"))
    # wrk is a child: its CPU was counted as "other" (only reaped children
    # show in os.times()); move it to "client".
    wrk_cpu = float(out["wrk_cpu"])
    run.other_cpu = max(0.0, run.other_cpu + run.client_cpu - wrk_cpu)
    run.client_cpu = wrk_cpu
    errors = re.search(r"Socket errors: .*", out["stdout"])
    if errors:
        run.extra["socket_errors"] = 1.0
        print(f"    wrk: {errors.group(0)}", file=sys.stderr)
    return run


# ---- wire check: every sender sends the same bytes ------------------------------


class _Capture(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.captured.append((self.headers, body))  # type: ignore[attr-defined]
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def wire_check(have: dict[str, bool]) -> str:
    """Sends one event with each sender to a capturing server and checks they
    put the same body and a valid signature on the wire."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    server.daemon_threads = True
    server.captured = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    workload = make_workload(1, 1)
    job_id, event = workload[0]
    expected = wire_body(job_id, event)
    names = ["blueprint_notify"]
    try:
        with bpn_notifier() as notifier:
            notifier.notify(job_id, event, url)
            if not notifier.flush(10):
                raise RuntimeError("wire check: blueprint_notify did not deliver")
        if have["aiohttp"]:
            asyncio.run(asyncio.wait_for(aiohttp_send(url, workload), 10))
            names.append("aiohttp")
        if have["httpx"]:
            asyncio.run(asyncio.wait_for(httpx_send(url, workload), 10))
            names.append("httpx")
    finally:
        server.shutdown()
        server.server_close()
    captured = server.captured  # type: ignore[attr-defined]
    if len(captured) != len(names):
        raise RuntimeError(f"wire check: expected {len(names)} requests, got {len(captured)}")
    for name, (headers, body) in zip(names, captured):
        ts = headers.get("X-Webhook-Timestamp", "")
        sig = hmac.new(SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
        problems = []
        if body != expected:
            problems.append(f"body {body!r} != {expected!r}")
        if headers.get("X-Webhook-Signature") != "sha256=" + sig:
            problems.append("bad signature")
        if headers.get("X-Job-Id") != job_id:
            problems.append("bad X-Job-Id")
        if headers.get("Content-Type") != "application/json":
            problems.append(f"Content-Type {headers.get('Content-Type')!r}")
        if problems:
            raise RuntimeError(f"wire check failed for {name}: {'; '.join(problems)}")
    return f"{len(expected)}-byte body, identical and validly signed from {', '.join(names)}"


# ---- main ---------------------------------------------------------------------


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: nginx stops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000, help="events per run (default 50,000)")
    ap.add_argument("--quick", action="store_true", help="5,000 events (overrides --events)")
    ap.add_argument("--jobs", type=int, default=1000, help="distinct job ids (default 1,000)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per sender, median reported")
    ap.add_argument(
        "--httpx-events",
        type=int,
        help="cap on httpx's events, it is ~100x slower (default 5,000; 1,000 with --quick)",
    )
    ap.add_argument("--wrk-seconds", type=int, default=5)
    ap.add_argument("--nginx-workers", default="1", help="nginx worker_processes (default 1; or auto)")
    ap.add_argument(
        "--only",
        default="bpn,bpn-batched,bpn-sync,aiohttp,aiohttp-uvloop,httpx,wrk,latency",
        help="comma-separated subset of bpn,bpn-batched,bpn-sync,aiohttp,aiohttp-uvloop,httpx,wrk,latency",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON (for bench/run.py)")
    ap.add_argument(
        "--sync-events",
        type=int,
        help="cap on the sync-durability case's events, one fsync per notify() (default 5,000)",
    )
    args = ap.parse_args()
    n = 5_000 if args.quick else args.events
    if n < 1 or args.jobs < 1 or args.reps < 1:
        ap.error("--events, --jobs and --reps must be positive")
    only = set(args.only.split(","))
    unknown = only - {"bpn", "bpn-batched", "bpn-sync", "aiohttp", "aiohttp-uvloop", "httpx", "wrk", "latency"}
    if unknown:
        ap.error(f"unknown senders: {', '.join(sorted(unknown))}")
    have = {m: _have(m) for m in ("aiohttp", "uvloop", "httpx")}
    have_wrk = shutil.which("wrk") is not None
    if not shutil.which("nginx") and not os.path.exists("/usr/sbin/nginx"):
        print("nginx not found (Debian: apt-get install nginx-light)", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    out: list[str] = ["## Webhook delivery throughput", ""]
    out.append(
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, nginx {nginx_version()} "
        f"(worker_processes {args.nginx_workers}, `return 204`), {CONCURRENCY} connections, "
        f"{n:,} events over {min(args.jobs, n):,} jobs, median of {args.reps}; "
        f"load average {open('/proc/loadavg').read().split()[0]} at start."
    )
    print(out[-1], file=sys.stderr)
    workload = make_workload(n, args.jobs)
    httpx_cap = args.httpx_events or (1_000 if args.quick else 5_000)
    httpx_workload = workload[: min(n, httpx_cap)]
    sync_workload = workload[: min(n, args.sync_events or (1_000 if args.quick else 5_000))]
    nginx = Nginx(args.nginx_workers)
    tmp = tempfile.mkdtemp(prefix="bpn-bench-")
    cases: list[Case] = []
    latency: dict[str, dict[str, float]] = {}
    try:
        nginx.start()  # first, while this process has a single thread
        check = wire_check(have)
        out.append(f"Wire check: {check}.")
        print(f"wire check: {check}", file=sys.stderr, flush=True)
        assert nginx.proc is not None
        probe = CpuProbe(nginx.proc.pid)
        url = nginx.url
        plan: list[tuple[str, str, Callable[[], Run], int]] = []
        if "bpn" in only:
            plan.append(("blueprint_notify", "", lambda: run_bpn(url, workload, probe), args.reps))
        if "bpn-batched" in only:
            plan.append(("blueprint_notify + store, batched", "", lambda: run_bpn(url, workload, probe, "batched", tmp), args.reps))
        if "bpn-sync" in only:
            note = "capped" if len(sync_workload) < n else ""
            plan.append(("blueprint_notify + store, sync", note, lambda: run_bpn(url, sync_workload, probe, "sync", tmp), args.reps))
        if "aiohttp" in only and have["aiohttp"]:
            plan.append(("aiohttp (asyncio)", "", lambda: run_async("asyncio", aiohttp_send, url, workload, probe), args.reps))
        if "aiohttp-uvloop" in only and have["aiohttp"] and have["uvloop"]:
            plan.append(("aiohttp (uvloop)", "", lambda: run_async("uvloop", aiohttp_send, url, workload, probe), args.reps))
        if "httpx" in only and have["httpx"]:
            note = "capped" if len(httpx_workload) < n else ""
            plan.append(("httpx.AsyncClient (asyncio)", note, lambda: run_async("asyncio", httpx_send, url, httpx_workload, probe), args.reps))
        if "wrk" in only and have_wrk:
            plan.append((f"wrk -t2 -c{CONCURRENCY} -d{args.wrk_seconds}s (static request)", "", lambda: run_wrk(url, args.wrk_seconds, tmp, workload, probe), 1))
        for name, note, fn, reps in plan:
            case = Case(name, note=note)
            cases.append(case)
            for i in range(reps):
                run = fn()
                case.runs.append(run)
                extra = "".join(f" {k}={v:.3g}" for k, v in run.extra.items())
                print(
                    f"  {name} #{i + 1}: {run.events:,} in {run.seconds:.3f}s = {run.events / run.seconds:,.0f}/s "
                    f"(client CPU {run.client_cpu:.0f}%, nginx CPU {run.nginx_cpu:.0f}%, "
                    f"other CPU {run.other_cpu:.0f}%{extra})",
                    file=sys.stderr,
                    flush=True,
                )
        if "latency" in only:
            bpn_case = next((c for c in cases if c.name == "blueprint_notify"), None)
            if bpn_case is None:  # the half-load rate needs the maximum
                bpn_case = Case("blueprint_notify", [run_bpn(url, workload, probe)])
            for label, rate in (("idle", 0.0), ("50% load", bpn_case.rate / 2)):
                runs = [run_latency(url, workload, rate, seconds=3.0 if n >= 50_000 else 1.0) for _ in range(args.reps)]
                latency[label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                print(f"  latency {label}: {latency[label]}", file=sys.stderr, flush=True)
    finally:
        nginx.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    bpn = next((c for c in cases if c.name == "blueprint_notify"), None)
    wrk = next((c for c in cases if c.name.startswith("wrk")), None)
    headline: dict[str, float] = {}
    out += ["", "| sender | events | seconds | events/s | vs blueprint_notify | client CPU | nginx CPU | other CPU |"]
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        m = c.median
        ratio = "-"
        if bpn:
            r = c.rate / bpn.rate
            ratio = f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"
        name = c.name + (f" ({c.note})" if c.note else "")
        out.append(
            f"| {name} | {m.events:,} | {m.seconds:.3f} | {c.rate:,.0f} | {ratio} "
            f"| {m.client_cpu:.0f}% | {m.nginx_cpu:.0f}% | {m.other_cpu:.0f}% |"
        )
    out.append(
        "\nseconds: median run, first notify()/request to flush() returning/last response; "
        "CPU: % of one core over that run (client: the sending process, or wrk; "
        f"nginx: its worker{'s' if args.nginx_workers != '1' else ''}; other: the rest of the machine, "
        "i.e. noise — rerun if it is not near 0%)."
    )
    if bpn:
        m = bpn.median
        ns = m.extra.get("notify_seconds", 0.0)
        headline["delivery_per_s"] = bpn.rate
        out.append(
            f"\nblueprint_notify: notify() loop {ns:.3f}s ({ns / m.events * 1e6:.2f} µs per call) of {m.seconds:.3f}s; "
            f"delivery thread CPU {m.extra.get('delivery_cpu', 0):.0f}% "
            f"({m.extra.get('delivery_us_user', 0):.1f} µs user + {m.extra.get('delivery_us_sys', 0):.1f} µs kernel per delivery), "
            f"Python thread CPU {m.extra.get('main_cpu', 0):.0f}%."
        )
        ratios = []
        for c in cases:
            key = {
                "aiohttp (asyncio)": "vs_aiohttp",
                "aiohttp (uvloop)": "vs_aiohttp_uvloop",
                "httpx.AsyncClient (asyncio)": "vs_httpx",
            }.get(c.name)
            if c is wrk:
                key = "vs_wrk"
            if key:
                headline[key] = bpn.rate / c.rate
                ratios.append(f"{bpn.rate / c.rate:.2f}x {c.name if c is not wrk else 'wrk'}")
            if c.name.startswith("blueprint_notify + store"):
                mode = c.name.rsplit(" ", 1)[-1]
                headline[f"store_{mode}_vs_memory"] = c.rate / bpn.rate
                headline[f"store_{mode}_per_s"] = c.rate
                ratios.append(f"store {mode} {c.rate / bpn.rate:.2f}x in-memory ({c.rate:,.0f}/s)")
        if ratios:
            out.append("Ratios (blueprint_notify / other): " + ", ".join(ratios) + ".")
        if wrk and any(c.name.startswith("aiohttp") for c in cases):
            aio = max((c for c in cases if c.name.startswith("aiohttp")), key=lambda c: c.rate)
            out.append(
                f"The wire's limit (wrk) is {wrk.rate / aio.rate:.1f}x the best aiohttp sender in this run: "
                f"no sender can be more than that many times faster than aiohttp here."
            )
    if latency:
        out += ["", "### Latency: notify() to the receiver's response", ""]
        out.append(
            "From the notifier's own notify-to-2xx histogram (buckets ~19% wide, midpoints), nginx as the receiver; "
            f"medians of {args.reps} runs. Idle: one event at a time (notify, flush). 50% load: a paced "
            "producer at half this run's blueprint_notify rate for a few seconds."
        )
        out += ["", "| load | events | rate/s | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
        for label, r in latency.items():
            out.append(f"| {label} | {r['events']:,.0f} | {r['rate']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |")
            key = "idle" if label == "idle" else "half"
            headline[f"latency_{key}_p50_ms"] = r["p50_ms"]
            headline[f"latency_{key}_p99_ms"] = r["p99_ms"]
    markdown = "\n".join(out) + "\n"
    print(markdown)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"case": "delivery", "markdown": markdown, "headline": headline}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
