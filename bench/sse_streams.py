#!/usr/bin/env python3
"""SSE over HTTP: memory per idle stream and fan-out latency of
``blueprint_notify.asgi.sse_app`` served by uvicorn.

    .venv/bin/python bench/sse_streams.py                # 1k and 10k streams, all settings, ~50 s
    .venv/bin/python bench/sse_streams.py --quick        # 1k streams, default settings, ~5 s
    .venv/bin/python bench/sse_streams.py --json out.json
    .venv/bin/python bench/sse_streams.py --profile      # where a stream's Python memory goes (tracemalloc)

Three processes: this one (orchestrator), a uvicorn server (127.0.0.1, a
free port, listening socket bound before uvicorn starts) and a load client
(asyncio ``Protocol``s on raw sockets, uvloop if installed). Both children
are driven over stdin/stdout with one JSON line per command; both are
killed at the end, on errors, and by the kernel (PR_SET_PDEATHSIG) if this
process dies.

* **RSS per idle stream**: the server's VmRSS (and Pss) after a warm-up
  (64 streams opened and closed, ``gc.collect()``) with 0 streams, then with
  1,000 and with 10,000 streams open and idle (each has received its headers
  and the ``retry:`` frame, and the server counts it): (RSS_N - RSS_0) / N.
  All jobs are registered before RSS_0 (a job costs memory whether or not a
  client watches it), so this is the cost of the streams alone.
* **floor**: the same server settings with a bare ASGI app that sends the
  same headers and ``retry:`` frame and then waits for ``http.disconnect``:
  what uvicorn and asyncio cost per open streaming response, before any of
  ours.
* **fan-out**: 1,000 (and, in the full run, 10,000) streams on ONE job;
  the server's control thread takes ``clock_gettime(CLOCK_MONOTONIC)``
  (system-wide on Linux, so comparable across processes) and calls
  ``notifier.notify()``; the client takes the same clock in
  ``data_received`` of each stream when the frame's ``id:`` arrives. Per
  event: p50 and p99 over the clients, the last client, and the server's
  CPU time for the event; medians over the events (a first, unmeasured
  event warms up). Server and client are pinned to one CPU each.

``--asgi-file PATH`` serves ``sse_app`` from another copy of
``blueprint_notify/asgi.py`` (A/B a change against the same floor).
``--profile`` prints, from tracemalloc snapshots in the server, the Python
allocations per stream by source line, for sse_app and the floor.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import resource
import select
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
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's package (built in place)

HOST = "127.0.0.1"
MONO = time.CLOCK_MONOTONIC
WARMUP_STREAMS = 64
OPEN_CONCURRENCY = 200  # connections being set up at once by the client
BACKLOG = 4096
CMD_TIMEOUT = 120.0  # seconds any one command to a child may take

# A browser-like request (~330 bytes of headers): uvicorn keeps the request's
# headers in the scope for the life of the stream, so their size matters.
REQUEST = (
    "GET /v1/jobs/{job}/events HTTP/1.1\r\n"
    "Host: {host}:{port}\r\n"
    "Authorization: Bearer {token}\r\n"
    "Accept: text/event-stream\r\n"
    "Cache-Control: no-cache\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    "Accept-Language: en-US,en;q=0.5\r\n"
    "Accept-Encoding: gzip, deflate, br\r\n"
    "\r\n"
)


def log(msg: str) -> None:
    print(f"[sse_streams] {msg}", file=sys.stderr, flush=True)


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _control_channel() -> Any:
    """The child's reply stream: the original stdout. fd 1 then points at
    stderr, so nothing else (uvicorn's loggers, prints) can mix into it."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return out


# ======================================================================================
# server process
# ======================================================================================
def _proc_mem_kb(pid: int | str = "self") -> dict[str, int]:
    mem: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:", "VmHWM:")):
                k, v = line.split(":", 1)
                mem[k] = int(v.split()[0])
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                mem["Pss"] = int(line.split()[1])
    return mem


def _pin(which: int) -> str:
    """Server on one CPU, client on another (when there are two): steadier
    latencies than letting the scheduler move them around."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "not pinned"
    os.sched_setaffinity(0, {cpus[which]})
    return f"CPU {cpus[which]}"


def server_main(args: argparse.Namespace) -> None:
    import asyncio
    import gc

    ctl = _control_channel()
    cpu = _pin(0)
    nofile = raise_nofile()
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(args.tracemalloc)

    import uvicorn

    from blueprint_notify import JobEvent, JobNotifier

    if args.asgi_file:  # A/B: another copy of blueprint_notify/asgi.py
        import importlib.util

        spec = importlib.util.spec_from_file_location("blueprint_notify._asgi_ab", args.asgi_file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        sse_app = module.sse_app
    else:
        from blueprint_notify.asgi import sse_app

    notifier = JobNotifier(signing_secret="bench-secret", max_channels=max(20_000, args.jobs + 1000))
    jobs = [f"job-{i:06d}" for i in range(args.jobs)]
    tokens = [notifier.register_job(j) for j in jobs]
    with open(args.tokens_file, "w") as f:
        json.dump(list(zip(jobs, tokens)), f)

    bare_open = [0]
    if args.app == "sse":
        app: Any = sse_app(notifier)

        def open_streams() -> int:
            return app.open_streams

    else:

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                while True:
                    msg = await receive()
                    if msg["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    elif msg["type"] == "lifespan.shutdown":
                        await send({"type": "lifespan.shutdown.complete"})
                        return
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-store"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b"retry: 3000\n\n", "more_body": True})
            bare_open[0] += 1
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            finally:
                bare_open[0] -= 1

        def open_streams() -> int:
            return bare_open[0]

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(BACKLOG)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http=args.http,
        loop=args.loop,
        lifespan="on",
        access_log=False,
        log_level="warning",
        backlog=BACKLOG,
        timeout_graceful_shutdown=3,
    )
    loop_box: list[asyncio.AbstractEventLoop] = []

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            loop = asyncio.get_running_loop()
            loop_box.append(loop)
            reply(
                {
                    "ready": True,
                    "port": port,
                    "pid": os.getpid(),
                    "nofile": nofile,
                    "cpu": cpu,
                    "loop": f"{type(loop).__module__}.{type(loop).__name__}",
                    "http": config.http_protocol_class.__name__,
                }
            )

    server = Server(config)

    def reply(obj: dict[str, Any]) -> None:
        ctl.write(json.dumps(obj) + "\n")
        ctl.flush()

    def barrier() -> None:
        # Everything the loop had ready when this was posted has run.
        for _ in range(2):
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop_box[0]).result(30)

    def control() -> None:
        seq = 0
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            try:
                if op == "mem":
                    barrier()
                    gc.collect()
                    out: dict[str, Any] = {"mem": _proc_mem_kb(), "streams": open_streams()}
                    if args.tracemalloc:
                        out["traced"] = tracemalloc.get_traced_memory()[0]
                    reply(out)
                elif op == "wait_streams":
                    # Server state with no event to wait on: bounded polling.
                    deadline = time.monotonic() + cmd.get("timeout", 30)
                    while open_streams() != cmd["n"] and time.monotonic() < deadline:
                        time.sleep(0.01)
                    reply({"streams": open_streams()})
                elif op == "notify":
                    seq += 1
                    t0 = time.clock_gettime_ns(MONO)
                    notifier.notify(cmd["job"], JobEvent("processing", progress=seq % 101))
                    t1 = time.clock_gettime_ns(MONO)
                    reply({"t0": t0, "t1": t1})
                elif op == "barrier":
                    barrier()
                    reply({})
                elif op == "cpu":
                    reply({"cpu": time.process_time(), "gc": sum(gc_time)})
                elif op == "snapshot":
                    barrier()
                    gc.collect()
                    tracemalloc.take_snapshot().dump(cmd["path"])
                    reply({})
                elif op == "quit":
                    server.should_exit = True
                    reply({})
                    return
                else:
                    reply({"error": f"unknown op {op!r}"})
            except Exception as exc:  # report, keep serving
                reply({"error": repr(exc)})
        server.should_exit = True  # stdin closed: the orchestrator is gone

    gc_time = [0.0, 0.0, 0.0]  # seconds spent in collections, per generation
    gc_t0 = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        else:
            gc_time[info["generation"]] += time.perf_counter() - gc_t0[0]

    gc.callbacks.append(on_gc)
    threading.Thread(target=control, daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        notifier.close(0)


# ======================================================================================
# client process
# ======================================================================================
ID_RE = re.compile(rb"\nid: (\d+)\n")


def client_main(args: argparse.Namespace) -> None:
    import asyncio

    ctl = _control_channel()
    _pin(1)
    nofile = raise_nofile()
    with open(args.tokens_file) as f:
        jobs: list[tuple[str, str]] = [tuple(x) for x in json.load(f)]  # type: ignore[misc]

    class Stream(asyncio.Protocol):
        __slots__ = ("owner", "request", "transport", "ready", "head", "tail", "times", "closed", "failed")

        def __init__(self, owner: Client, request: bytes, ready: asyncio.Future[bool]) -> None:
            self.owner = owner
            self.request = request
            self.transport: Any = None
            self.ready: asyncio.Future[bool] | None = ready
            self.head = b""
            self.tail = b""
            self.times: dict[int, int] = {}
            self.closed: asyncio.Future[None] = ready.get_loop().create_future()
            self.failed = ""

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            transport.write(self.request)

        def data_received(self, data: bytes) -> None:
            now = time.clock_gettime_ns(MONO)
            if self.ready is not None:
                self.head += data
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    return
                if not self.head.startswith(b"HTTP/1.1 200"):
                    self.failed = self.head.split(b"\r\n", 1)[0].decode("latin-1")
                    self.ready.set_result(False)
                    self.ready = None
                    self.transport.close()
                    return
                if b"retry:" not in self.head[end:]:
                    return
                self.ready.set_result(True)
                self.ready = None
                data, self.head = self.head[end:], b""
            buf = self.tail + data
            for m in ID_RE.finditer(buf):
                seq = int(m[1])
                if seq not in self.times:
                    self.times[seq] = now
                    self.owner.on_frame(seq)
            self.tail = buf[-40:]

        def connection_lost(self, exc: BaseException | None) -> None:
            if self.ready is not None and not self.ready.done():
                self.failed = self.failed or f"closed before the first frame ({exc!r})"
                self.ready.set_result(False)
            if not self.closed.done():
                self.closed.set_result(None)

    class Client:
        def __init__(self) -> None:
            self.streams: list[Stream] = []
            self.want: tuple[int, int, asyncio.Future[None]] | None = None
            self.seen: dict[int, int] = {}

        def on_frame(self, seq: int) -> None:
            n = self.seen[seq] = self.seen.get(seq, 0) + 1
            want = self.want
            if want is not None and want[0] == seq and n >= want[1] and not want[2].done():
                want[2].set_result(None)

        async def open(self, start: int, count: int, per_job: int) -> dict[str, Any]:
            loop = asyncio.get_running_loop()
            sem = asyncio.Semaphore(OPEN_CONCURRENCY)
            failures: list[str] = []

            async def one(job: str, token: str) -> None:
                async with sem:
                    req = REQUEST.format(job=job, token=token, host=HOST, port=args.port).encode()
                    ready: asyncio.Future[bool] = loop.create_future()
                    stream = Stream(self, req, ready)
                    try:
                        await loop.create_connection(lambda: stream, HOST, args.port)
                    except OSError as exc:
                        failures.append(repr(exc))
                        return
                    if await ready:
                        self.streams.append(stream)
                    else:
                        failures.append(stream.failed)

            t = time.monotonic()
            targets = [jobs[start + i // per_job] for i in range(count)]
            await asyncio.gather(*(one(j, tok) for j, tok in targets))
            return {
                "opened": count - len(failures),
                "failed": len(failures),
                "first_failure": failures[0] if failures else "",
                "secs": time.monotonic() - t,
                "open": len(self.streams),
            }

        async def close(self) -> dict[str, Any]:
            streams, self.streams = self.streams, []
            for s in streams:
                s.transport.close()
            if streams:
                await asyncio.wait_for(asyncio.gather(*(s.closed for s in streams)), 30)
            return {"closed": len(streams)}

        async def wait(self, seq: int, timeout: float) -> dict[str, Any]:
            need = len(self.streams)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.want = (seq, need, fut)
            if self.seen.get(seq, 0) >= need:
                fut.set_result(None)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(fut, timeout)
            self.want = None
            times = [s.times[seq] for s in self.streams if seq in s.times]
            return {"times": times, "missing": need - len(times)}

    async def run() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        client = Client()
        ctl.write(json.dumps({"ready": True, "nofile": nofile, "loop": type(loop).__module__}) + "\n")
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = json.loads(line)
            op = cmd["op"]
            try:
                if op == "open":
                    out = await client.open(cmd["start"], cmd["count"], cmd["per_job"])
                elif op == "close":
                    out = await client.close()
                elif op == "wait":
                    out = await client.wait(cmd["seq"], cmd.get("timeout", 10))
                elif op == "quit":
                    await client.close()
                    ctl.write("{}\n")
                    return
                else:
                    out = {"error": f"unknown op {op!r}"}
            except Exception as exc:
                out = {"error": repr(exc)}
            ctl.write(json.dumps(out) + "\n")

    if args.client_loop == "uvloop" and _have("uvloop"):
        import uvloop

        uvloop.run(run())
    else:
        asyncio.run(run())


# ======================================================================================
# orchestrator
# ======================================================================================
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class Child:
    """A child process driven by JSON lines on its stdin/stdout."""

    def __init__(self, argv: list[str], name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # inherited: the children's warnings go to our stderr
            preexec_fn=_die_with_parent,
            bufsize=0,
        )
        self.pid = self.proc.pid
        self.seq = 0
        self.buf = bytearray()

    def read(self, timeout: float = CMD_TIMEOUT) -> dict[str, Any]:
        """The child's next reply line (its own buffer: select() cannot see
        lines a buffered reader already holds)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"{self.name}: no answer within {timeout} s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"{self.name} exited (code {self.proc.poll()})")
            self.buf += chunk
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"{self.name}: {out['error']}")
        return out

    def cmd(self, op: str, timeout: float = CMD_TIMEOUT, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        return self.read(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.cmd("quit", timeout=5)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                if f is not None:
                    f.close()


@dataclass
class Setting:
    app: str  # "sse" | "bare"
    http: str  # uvicorn --http
    loop: str  # uvicorn --loop
    layout: str  # "many" (1 stream per job) | "one" (every stream on one job)
    sizes: tuple[int, ...]
    fanout: bool = False
    resolved: str = ""
    kb: dict[int, float] = field(default_factory=dict)
    pss_kb: dict[int, float] = field(default_factory=dict)
    open_secs: dict[int, float] = field(default_factory=dict)
    fan: dict[int, dict[str, float]] = field(default_factory=dict)
    note: str = ""


def run_setting(
    s: Setting, events: int, tmp: str, profile_dir: str | None = None, asgi_file: str | None = None
) -> None:
    total = max(s.sizes)
    jobs = (total if s.layout == "many" else 1) + WARMUP_STREAMS
    tokens_file = os.path.join(tmp, "tokens.json")
    me = [sys.executable, os.path.abspath(__file__)]
    server = client = None
    env_note = f"{s.app} http={s.http} loop={s.loop} layout={s.layout}"
    log(f"setting: {env_note}")
    try:
        argv = me + ["--_server", "--app", s.app, "--http", s.http, "--loop", s.loop, "--jobs", str(jobs),
                     "--tokens-file", tokens_file]
        if profile_dir:
            argv += ["--tracemalloc", "12"]
        if asgi_file:
            argv += ["--asgi-file", os.path.abspath(asgi_file)]
        server = Child(argv, "server")
        info = server.read(60)
        s.resolved = f"{info['http']}, {info['loop']}"
        port = info["port"]
        client = Child(me + ["--_client", "--port", str(port), "--tokens-file", tokens_file], "client")
        cinfo = client.read(30)
        if min(info["nofile"][0], cinfo["nofile"][0]) < total + 100:
            s.note = f"RLIMIT_NOFILE {info['nofile']} is too low for {total} streams"
            log(s.note)
            return
        # Warm-up: open and close a few streams on jobs of their own.
        warm_start = jobs - WARMUP_STREAMS
        r = client.cmd("open", start=warm_start, count=WARMUP_STREAMS, per_job=1)
        if r["failed"]:
            raise RuntimeError(f"warm-up: {r['failed']} stream(s) failed: {r['first_failure']}")
        client.cmd("close")
        server.cmd("wait_streams", n=0)
        base = server.cmd("mem")
        if base["streams"] != 0:
            raise RuntimeError(f"{base['streams']} streams still open after the warm-up")
        if profile_dir:
            server.cmd("snapshot", path=os.path.join(profile_dir, f"{s.app}-0.snap"))
        log(f"  RSS_0 = {base['mem']['VmRSS']} KB")
        opened = 0
        for n in sorted(s.sizes):
            t = time.monotonic()
            r = client.cmd(
                "open",
                start=0 if s.layout == "one" else opened,
                count=n - opened,
                per_job=(n - opened) if s.layout == "one" else 1,
            )
            if r["failed"]:
                s.note = f"{r['failed']} of {n - opened} streams failed to open: {r['first_failure']}"
                log("  " + s.note)
                return
            opened = n
            seen = server.cmd("wait_streams", n=n)["streams"]
            if seen != n:
                raise RuntimeError(f"server counts {seen} streams, client {n}")
            s.open_secs[n] = time.monotonic() - t
            mem = server.cmd("mem")
            s.kb[n] = (mem["mem"]["VmRSS"] - base["mem"]["VmRSS"]) / n
            if "Pss" in mem["mem"] and "Pss" in base["mem"]:
                s.pss_kb[n] = (mem["mem"]["Pss"] - base["mem"]["Pss"]) / n
            log(f"  {n} streams open in {s.open_secs[n]:.1f} s: RSS {mem['mem']['VmRSS']} KB, "
                f"{s.kb[n]:.2f} KB/stream")
            if profile_dir:
                server.cmd("snapshot", path=os.path.join(profile_dir, f"{s.app}-{n}.snap"))
            if s.fanout:
                s.fan[n] = fanout(server, client, events, n)
    finally:
        for child in (client, server):
            if child is not None:
                child.stop()
        with contextlib.suppress(OSError):
            os.unlink(tokens_file)


def fanout(server: Child, client: Child, events: int, n: int) -> dict[str, float]:
    """Publishes 1 + events events to job 0 and times their arrival."""
    job = "job-000000"
    p50s, p99s, lasts, firsts, cpus, gcs = [], [], [], [], [], []
    for i in range(events + 1):
        seq = server.seq = server.seq + 1  # the job's events are numbered from 1
        server.cmd("barrier")
        c0 = server.cmd("cpu")
        t = server.cmd("notify", job=job)
        r = client.cmd("wait", seq=seq, timeout=20)
        if r["missing"]:
            raise RuntimeError(f"event {seq}: {r['missing']} of {n} streams did not get it")
        server.cmd("barrier")  # the streams are back to idle
        c1 = server.cmd("cpu")
        if i == 0:
            continue  # warm-up event
        cpus.append((c1["cpu"] - c0["cpu"]) * 1000)
        gcs.append((c1["gc"] - c0["gc"]) * 1000)
        lat = sorted((x - t["t0"]) / 1e6 for x in r["times"])
        p50s.append(lat[len(lat) // 2])
        p99s.append(lat[min(len(lat) - 1, int(len(lat) * 0.99))])
        lasts.append(lat[-1])
        firsts.append(lat[0])
    out = {
        "p50": statistics.median(p50s),
        "p99": statistics.median(p99s),
        "last": statistics.median(lasts),
        "first": statistics.median(firsts),
        "last_min": min(lasts),
        "last_max": max(lasts),
        "cpu_ms": statistics.median(cpus),
        "gc_ms": statistics.mean(gcs),
        "events": events,
    }
    log(
        f"  fan-out to {n}: p50 {out['p50']:.2f} ms, p99 {out['p99']:.2f} ms, last {out['last']:.2f} ms, "
        f"server CPU {out['cpu_ms']:.1f} ms"
    )
    return out


def markdown(
    settings: list[Setting], quick: bool, events: int, nofile: tuple[int, int], asgi_file: str | None
) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    sizes = sorted({n for s in settings for n in s.sizes})
    lines = [
        "## SSE over HTTP",
        "",
        "uvicorn serving `sse_app(JobNotifier(max_channels=20000))` on 127.0.0.1 in its own process "
        "(access log off); a separate client process (asyncio `Protocol`s on raw sockets, uvloop) opens "
        "the streams with a browser-like request (~330 bytes of headers, `Authorization: Bearer`). "
        f"`RLIMIT_NOFILE` raised to {nofile[0]} in both.",
        "",
        "**RSS per idle stream**: (server VmRSS with N streams open and idle − VmRSS after a warm-up "
        "with 0 streams) / N, in KB; every job registered before the baseline, `gc.collect()` before "
        "each reading. *many jobs*: one stream per job; *one job*: every stream on the same job. "
        "*floor*: a bare ASGI app that sends the same headers and `retry:` frame, then awaits "
        "`http.disconnect` — uvicorn's and asyncio's own cost per open streaming response. "
        "Kernel socket buffers are not in RSS. Target: ≤ 10 KB per stream.",
        "",
        *([f"`sse_app` loaded from `{asgi_file}` (A/B run).", ""] if asgi_file else []),
        *(
            []
            if quick or _have("httptools")
            else ["httptools is not installed: uvicorn's `auto` is h11, and the httptools rows are left out.", ""]
        ),
        "| app | streams on | uvicorn http, loop | " + " | ".join(f"KB/stream @ {n:,}" for n in sizes)
        + " | " + " | ".join(f"open {n:,} (s)" for n in sizes) + " |",
        "|---|---|---|" + "---:|" * (2 * len(sizes)),
    ]
    notes: list[str] = []
    for s in settings:
        if not s.kb and not s.note:
            continue
        where = "—" if s.app == "bare" else ("many jobs" if s.layout == "many" else "one job")
        app = "sse_app" if s.app == "sse" else "floor (bare app)"
        if s.http == "auto" and s.loop == "auto":
            app += " (uvicorn defaults)"
        cells = [fmt(s.kb.get(n)) if n in s.sizes else "" for n in sizes]
        opens = [f"{s.open_secs[n]:.1f}" if n in s.open_secs else "" for n in sizes]
        label = s.resolved or f"--http {s.http}, --loop {s.loop}"
        lines.append(f"| {app} | {where} | {label} | " + " | ".join(cells + opens) + " |")
        if s.note:
            notes.append(f"- {app}, {where}, {label}: {s.note}")
    if notes:
        lines += ["", *notes]
    fan = [(s, n, f) for s in settings for n, f in s.fan.items()]
    if fan:
        lines += [
            "",
            f"**Fan-out**: N streams on one job; the server process takes CLOCK_MONOTONIC and calls "
            f"`notify()`, each client stream takes the same clock when the frame arrives. Per event: "
            f"p50 / p99 over the streams and the last stream, and the server process's CPU time from "
            f"`notify()` until every stream is idle again; medians over {events} events (after one "
            f"warm-up event). Cyclic GC: time in `gc` collections during an event, the mean (collections, "
            f"full ones over every object of every stream, come every few events). "
            + (
                f"Server and client pinned to one CPU each ({len(os.sched_getaffinity(0))} CPUs here)."
                if len(os.sched_getaffinity(0)) >= 2
                else "One CPU: server and client share it."
            ),
            "",
            "| streams | uvicorn http, loop | first (ms) | p50 (ms) | p99 (ms) | last (ms) | last: min–max (ms) "
            "| server CPU per event (ms) | per stream (µs) | cyclic GC per event, mean (ms) |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s, n, f in fan:
            lines.append(
                f"| {n:,} | {s.resolved} | {f['first']:.2f} | {f['p50']:.2f} | {f['p99']:.2f} | "
                f"{f['last']:.2f} | {f['last_min']:.2f}–{f['last_max']:.2f} | {f['cpu_ms']:.1f} | "
                f"{f['cpu_ms'] * 1000 / n:.1f} | {f['gc_ms']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def profile_report(profile_dir: str, sizes: tuple[int, ...]) -> str:
    import tracemalloc

    out = []
    for app in ("sse", "bare"):
        p0 = os.path.join(profile_dir, f"{app}-0.snap")
        n = max(sizes)
        pn = os.path.join(profile_dir, f"{app}-{n}.snap")
        if not (os.path.exists(p0) and os.path.exists(pn)):
            continue
        s0, sn = tracemalloc.Snapshot.load(p0), tracemalloc.Snapshot.load(pn)
        filt = [tracemalloc.Filter(False, tracemalloc.__file__)]
        s0, sn = s0.filter_traces(filt), sn.filter_traces(filt)
        total = sum(st.size_diff for st in sn.compare_to(s0, "filename"))
        out.append(f"### {app}: Python heap per stream (tracemalloc, {n} streams): {total / n:.0f} B")
        out.append("")
        out.append("| bytes/stream | blocks/stream | allocated at |")
        out.append("|---:|---:|---|")
        for st in sn.compare_to(s0, "lineno")[:25]:
            fr = st.traceback[0]
            fname = "/".join(fr.filename.split("/")[-2:])
            out.append(f"| {st.size_diff / n:.0f} | {st.count_diff / n:.2f} | {fname}:{fr.lineno} |")
        out.append("")
    return "\n".join(out)


def _on_signal(signum: int, frame: Any) -> None:
    log(f"signal {signum}: stopping")
    sys.exit(128 + signum)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 streams, default uvicorn settings only")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--events", type=int, default=None, help="measured fan-out events (default 7, quick 5)")
    ap.add_argument("--profile", action="store_true", help="tracemalloc: where a stream's Python memory goes")
    ap.add_argument(
        "--asgi-file", metavar="PATH", help="serve sse_app from this copy of blueprint_notify/asgi.py (A/B a change)"
    )
    ap.add_argument("--_server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--app", default="sse", help=argparse.SUPPRESS)
    ap.add_argument("--http", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--loop", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--tokens-file", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tracemalloc", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--client-loop", default="uvloop", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._server:
        server_main(args)
        return 0
    if args._client:
        client_main(args)
        return 0

    # SIGTERM/SIGHUP: unwind (the children are stopped in finally blocks).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    nofile = raise_nofile()
    events = args.events or (7 if args.quick else 11)
    big = (1000,) if args.quick else (1000, 10_000)
    settings = [
        Setting("sse", "auto", "auto", "many", big),
        Setting("sse", "auto", "auto", "one", big, fanout=True),
        Setting("bare", "auto", "auto", "many", big),
    ]
    if args.profile:
        settings = [Setting("sse", "auto", "auto", "many", (1000,)), Setting("bare", "auto", "auto", "many", (1000,))]
    elif not args.quick:
        https = ["h11"] + (["httptools"] if _have("httptools") else [])
        loops = ["asyncio"] + (["uvloop"] if _have("uvloop") else [])
        for http in https:
            for lp in loops:
                for app in ("sse", "bare"):
                    settings.append(Setting(app, http, lp, "many", (10_000,)))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bpn-sse-") as tmp:
        failed = 0
        for s in settings:
            try:
                run_setting(s, events, tmp, tmp if args.profile else None, args.asgi_file)
            except Exception as exc:  # the children are stopped; report it in the table, go on
                failed += 1
                s.note = f"failed: {exc}"
                log(f"  {s.note}")
        extra = profile_report(tmp, (1000,)) if args.profile else ""
    log(f"done in {time.monotonic() - t0:.0f} s")
    md = markdown(settings, args.quick, events, nofile, args.asgi_file)
    if extra:
        md += "\n" + extra
    print(md)
    if args.json:
        head = settings[0]
        one = settings[1] if not args.profile else head
        fan = one.fan.get(1000, {})
        headline = {
            "rss_kb_per_stream_1k": head.kb.get(1000),
            "rss_kb_per_stream_10k": head.kb.get(10_000),
            "fanout_1000_p50_ms": fan.get("p50"),
            "fanout_1000_p99_ms": fan.get("p99"),
            "fanout_1000_last_ms": fan.get("last"),
        }
        with open(args.json, "w") as f:
            json.dump({"case": "sse", "markdown": md, "headline": headline}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
