#!/usr/bin/env python3
"""Scale-out: job events across processes through the Redis broker
(``JobNotifier(broker_url=...)``), against a pure-Python redis-py sender and
receiver doing the same Redis work; plus what the broker costs notify() in
the producing process.

    .venv/bin/python bench/broker.py               # ~60 s on 2 cores
    .venv/bin/python bench/broker.py --quick       # ~15 s
    .venv/bin/python bench/broker.py --json out.json

Starts its own ``redis-server`` (``/usr/bin/redis-server``, or
``$BPN_REDIS_SERVER``) on a free 127.0.0.1 port, in a temp dir, with
``--save '' --appendonly no``; it is stopped at the end, on errors, on
SIGTERM/SIGHUP/Ctrl-C, and by the kernel (PR_SET_PDEATHSIG) if this process
dies. Producers and consumers are child processes running this same script
(``--role ours-producer|ours-consumer|peer-producer|peer-consumer``), driven
over stdin/stdout with one JSON line per command; they exit when their stdin
closes.

* **cross-process throughput**: a producer process calls ``notify()`` N times
  over 100 jobs, then one terminal event per job; a consumer process holds
  one ``Subscription`` per job (all ``await sub.ready()`` before the producer
  starts) and checks that it gets every event, in order per job (timestamps,
  strictly increasing event ids, the terminal last). The peer: the same JSON
  (``json`` encoder, compact), ``XADD bpn2:ev:{job} MAXLEN 1024 * d <json>``
  + ``PUBLISH bpn2:live:{job} <json>`` pipelined 1,024 events per round trip
  (``redis.asyncio``, hiredis); its consumer subscribes to the 100 channels
  (``redis.asyncio`` PubSub) and ``json.loads`` each message, with the same
  checks.
* **latency**: one event at a time, every ``--interval-us`` (1 ms), each
  carrying ``result={"t": time.time_ns()}`` taken just before ``notify()``
  (the peer: just before building its pipeline); the consumer subtracts it
  from ``time.time_ns()`` on receipt (one machine: CLOCK_REALTIME is shared).
* **in one process**: ``notify()`` µs per call with and without
  ``broker_url`` (100 registered jobs, no subscriber), and local
  subscribers (one per job, same process) with and without the broker: their
  events never wait for Redis (``broker_ingested`` stays 0), but the
  process also receives its own events back over Pub/Sub.

Prints a markdown section (``## Scale-out: events across processes through
Redis``) to stdout; progress to stderr. With ``--json PATH`` it also writes
``{"case": "broker", "markdown": ..., "headline": {...}}``. A run where any
consumer misses, duplicates or reorders an event fails (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import gc
import json
import logging
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the checkout's package (built in place)

from blueprint_notify import JobEvent, JobNotifier, JobStatus  # noqa: E402

log = logging.getLogger("bench.broker")

SECRET = "bench-signing-secret"  # no webhook is ever sent
TS = 1_700_000_000  # event k has timestamp TS + k; job j's terminal event TS + N + j
JOBS = 100
MAXLEN = 1024  # stream length: the producer's sse_capacity, and the peer's MAXLEN
BATCH = 1024  # the peer's events per pipeline (the broker's batch)
PEER_PREFIX = "bpn2"
REDIS_SERVER = os.environ.get("BPN_REDIS_SERVER", "/usr/bin/redis-server")
CHILD_TIMEOUT = 120.0  # seconds any one step of a child may take
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROCESSING = JobStatus.PROCESSING
COMPLETED = JobStatus.COMPLETED

# The peer's JSON: json's C encoder, compact separators (the bytes
# JobEvent.to_json() writes), built once.
ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def now_ns() -> int:
    """CLOCK_MONOTONIC, system-wide on Linux: comparable across processes."""
    return time.monotonic_ns()


# ---- redis-server ----------------------------------------------------------------

_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a child (redis-server, the producers and consumers) before exec:
    SIGTERM it when this process dies."""
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """redis-server in the foreground, no persistence, in a temp dir;
    stop() is idempotent and registered with atexit. Start it from the main
    thread (the death signal fires when the spawning thread exits)."""

    def __init__(self) -> None:
        self.dir: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.version = "?"
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1.0, socket_timeout=10.0)

    def start(self) -> None:
        import redis

        exe = REDIS_SERVER if os.access(REDIS_SERVER, os.X_OK) else shutil.which("redis-server")
        if not exe:
            raise RuntimeError(f"{REDIS_SERVER} not found (Debian: apt-get install redis-server)")
        self.dir = tempfile.mkdtemp(prefix="bpn-bench-redis-")
        logpath = os.path.join(self.dir, "redis.log")
        for _ in range(5):  # the port can be taken between probe and bind
            self.port = free_port()
            with open(logpath, "ab") as logf:
                self.proc = subprocess.Popen(
                    [
                        exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                        "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", "",
                    ],  # fmt: skip
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    cwd=self.dir,
                    preexec_fn=_die_with_parent,
                )
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=1.0)
            deadline = time.monotonic() + 10
            try:
                while time.monotonic() < deadline and self.proc.poll() is None:
                    with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                        if client.ping():
                            self.version = str(client.info("server").get("redis_version", "?"))
                            return
                    time.sleep(0.02)
            finally:
                client.close()
            self._stop_proc()
        raise RuntimeError(f"redis-server did not start:\n{Path(logpath).read_text()[-2000:]}")

    def cpu_ticks(self) -> int:
        """utime + stime of redis-server, in clock ticks."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def _stop_proc(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop(self) -> None:
        self._stop_proc()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


# ---- the children (run with --role) -------------------------------------------------


def _reply(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def _expected(j: int, n: int, jobs: int) -> int:
    """Progress events job j gets: k = j, j + jobs, ... < n."""
    return len(range(j, n, jobs))


def _check_terminal(side: str, j: int, ts: int, got: int, n: int, jobs: int) -> None:
    if ts != TS + n + j or got != _expected(j, n, jobs):
        raise AssertionError(
            f"{side} job {j}: terminal event timestamp {ts} (want {TS + n + j}) after "
            f"{got} events (want {_expected(j, n, jobs)})"
        )


class OursProducer:
    """notify() through a JobNotifier with broker_url."""

    def __init__(self, url: str) -> None:
        self.notifier = JobNotifier(signing_secret=SECRET, broker_url=url, sse_capacity=MAXLEN)

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        notifier = self.notifier
        notify = notifier.notify
        tag, n, nj = msg["tag"], msg["n"], msg["jobs"]
        jobs = [f"{tag}-{j}" for j in range(nj)]
        for job in jobs:
            notifier.register_job(job)  # a job's producer registers it (outside the timing)
        before = notifier.stats()
        gc.collect()
        c0 = time.process_time()
        t0 = now_ns()
        if msg["op"] == "xproc":
            for k in range(n):
                notify(jobs[k % nj], JobEvent(PROCESSING, progress=k % 101, timestamp=TS + k))
        else:  # latency: one job, paced
            interval = msg["interval_us"] / 1e6
            job = jobs[0]
            due = time.monotonic()
            for k in range(n):
                notify(job, JobEvent(PROCESSING, progress=k % 101, result={"t": time.time_ns()}, timestamp=TS + k))
                due += interval
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        for j, job in enumerate(jobs):
            notify(job, JobEvent(COMPLETED, progress=100, timestamp=TS + n + j))
        t_loop = now_ns()
        flushed = notifier.flush(CHILD_TIMEOUT)
        t_flushed = now_ns()
        cpu = time.process_time() - c0
        after = notifier.stats()
        delta = {k: after[k] - before[k] for k in ("broker_published", "broker_rejected", "broker_resequenced")}
        if not flushed or delta["broker_published"] != n + nj or delta["broker_rejected"] or delta["broker_resequenced"]:
            raise AssertionError(f"ours producer: flushed={flushed}, {delta} (want {n + nj} published)")
        return {"t0": t0, "t_loop": t_loop, "t_flushed": t_flushed, "cpu": cpu}

    def close(self) -> None:
        self.notifier.close(5)


class PeerProducer:
    """redis.asyncio (hiredis): XADD + PUBLISH per event, pipelined."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(url)

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        tag, n, nj = msg["tag"], msg["n"], msg["jobs"]
        streams = [f"{PEER_PREFIX}:ev:{tag}-{j}" for j in range(nj)]
        channels = [f"{PEER_PREFIX}:live:{tag}-{j}" for j in range(nj)]
        await self.redis.ping()
        pipe = self.redis.pipeline(transaction=False)
        encode = ENCODE
        gc.collect()
        c0 = time.process_time()
        t0 = now_ns()
        if msg["op"] == "xproc":
            pending = 0
            for k in range(n):
                j = k % nj
                data = encode({"status": "processing", "progress": k % 101, "timestamp": TS + k})
                pipe.xadd(streams[j], {"d": data}, maxlen=MAXLEN, approximate=False)
                pipe.publish(channels[j], data)
                pending += 1
                if pending == BATCH:
                    await pipe.execute()
                    pending = 0
        else:
            interval = msg["interval_us"] / 1e6
            due = time.monotonic()
            for k in range(n):
                data = encode(
                    {"status": "processing", "progress": k % 101, "result": {"t": time.time_ns()}, "timestamp": TS + k}
                )
                pipe.xadd(streams[0], {"d": data}, maxlen=MAXLEN, approximate=False)
                pipe.publish(channels[0], data)
                await pipe.execute()
                due += interval
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        for j in range(nj):
            data = encode({"status": "completed", "progress": 100, "timestamp": TS + n + j})
            pipe.xadd(streams[j], {"d": data}, maxlen=MAXLEN, approximate=False)
            pipe.publish(channels[j], data)
        await pipe.execute()
        t_end = now_ns()
        cpu = time.process_time() - c0
        return {"t0": t0, "t_loop": t_end, "t_flushed": t_end, "cpu": cpu}

    def close(self) -> None:
        pass


async def _ours_job(
    sub: Any, j: int, n: int, nj: int, lat: list[int] | None, done_at: list[int], got: list[int]
) -> None:
    """Reads one job's subscription to its end, checking every event."""
    expect = TS + j
    last_id = 0
    async for ev in sub:
        if lat is not None and ev.result is not None:
            lat.append(time.time_ns() - ev.result["t"])
        eid = sub.last_event_id
        if eid <= last_id:
            raise AssertionError(f"ours job {j}: event id {eid} after {last_id}")
        last_id = eid
        if ev.status is PROCESSING:
            if ev.timestamp != expect:
                raise AssertionError(f"ours job {j}: timestamp {ev.timestamp}, want {expect} (lost or reordered)")
            expect += nj
            got[j] += 1
        else:
            done_at[j] = now_ns()
            if ev.status is not COMPLETED:
                raise AssertionError(f"ours job {j}: terminal status {ev.status}")
            _check_terminal("ours", j, ev.timestamp, got[j], n, nj)
    if not done_at[j]:
        raise AssertionError(f"ours job {j}: subscription ended without the terminal event")


async def subscribe_all(notifier: JobNotifier, jobs: list[str]) -> list[Any]:
    """One Subscription per job, all made at once, every one ready (its
    channel subscribed). (Made at once on purpose: this is how an early
    broker lost events, found by this benchmark; see bench/README.md.)"""
    subs = [notifier.subscribe(job) for job in jobs]
    await asyncio.wait_for(asyncio.gather(*(s.ready() for s in subs)), 30)
    return subs


class OursConsumer:
    """One Subscription per job on a JobNotifier with broker_url."""

    def __init__(self, url: str, capacity: int) -> None:
        self.notifier = JobNotifier(signing_secret=SECRET, broker_url=url, sse_capacity=capacity)

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        tag, n, nj = msg["tag"], msg["n"], msg["jobs"]
        notifier = self.notifier
        subs = await subscribe_all(notifier, [f"{tag}-{j}" for j in range(nj)])
        ingested0 = notifier.stats()["broker_ingested"]
        lat: list[int] | None = [] if msg["op"] == "latency" else None
        done_at = [0] * nj
        got = [0] * nj
        gc.collect()
        c0 = time.process_time()
        tasks = [asyncio.ensure_future(_ours_job(s, j, n, nj, lat, done_at, got)) for j, s in enumerate(subs)]
        _reply({"ready": True})
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), msg["timeout"])
        except asyncio.TimeoutError:
            raise AssertionError(
                f"ours consumer: timed out with {sum(got)} of {n} events, {sum(1 for d in done_at if d)} of {nj} "
                f"terminal events"
            ) from None
        finally:
            for s in subs:
                s.close()
        cpu = time.process_time() - c0
        ingested = notifier.stats()["broker_ingested"] - ingested0
        if ingested != n + nj:
            raise AssertionError(f"ours consumer: broker_ingested grew by {ingested}, want {n + nj}")
        return {"t_last": max(done_at), "cpu": cpu, "count": sum(got), "lat": lat}

    def close(self) -> None:
        self.notifier.close(5)


class PeerConsumer:
    """redis.asyncio PubSub on the 100 channels, json.loads per message."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(url)

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        tag, n, nj = msg["tag"], msg["n"], msg["jobs"]
        channels = [f"{PEER_PREFIX}:live:{tag}-{j}".encode() for j in range(nj)]
        index = {c: j for j, c in enumerate(channels)}
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(*channels)
            confirmed = 0
            while confirmed < nj:  # every SUBSCRIBE confirmed: the channels are live
                m = await pubsub.get_message(timeout=10)
                if m is None:
                    raise AssertionError(f"peer consumer: {confirmed} of {nj} subscriptions confirmed")
                if m["type"] == "subscribe":
                    confirmed += 1
            lat: list[int] | None = [] if msg["op"] == "latency" else None
            done_at = [0] * nj
            got = [0] * nj
            gc.collect()
            c0 = time.process_time()
            _reply({"ready": True})

            async def receive() -> None:
                expect = [TS + j for j in range(nj)]
                left = nj
                loads = json.loads
                async for m in pubsub.listen():
                    if m["type"] != "message":
                        continue
                    d = loads(m["data"])
                    if lat is not None and "result" in d:
                        lat.append(time.time_ns() - d["result"]["t"])
                    j = index[m["channel"]]
                    if d["status"] == "processing":
                        if d["timestamp"] != expect[j]:
                            raise AssertionError(
                                f"peer job {j}: timestamp {d['timestamp']}, want {expect[j]} (lost or reordered)"
                            )
                        expect[j] += nj
                        got[j] += 1
                    else:
                        done_at[j] = now_ns()
                        if d["status"] != "completed" or done_at.count(0) != left - 1:
                            raise AssertionError(f"peer job {j}: second or bad terminal event {d}")
                        _check_terminal("peer", j, d["timestamp"], got[j], n, nj)
                        left -= 1
                        if not left:
                            return

            try:
                await asyncio.wait_for(receive(), msg["timeout"])
            except asyncio.TimeoutError:
                raise AssertionError(
                    f"peer consumer: timed out with {sum(got)} of {n} events, "
                    f"{sum(1 for d in done_at if d)} of {nj} terminal events"
                ) from None
            cpu = time.process_time() - c0
        finally:
            await pubsub.aclose()
        return {"t_last": max(done_at), "cpu": cpu, "count": sum(got), "lat": lat}

    def close(self) -> None:
        pass


async def child_main(role: str, url: str, capacity: int) -> int:
    if role == "ours-producer":
        handler: Any = OursProducer(url)
    elif role == "ours-consumer":
        handler = OursConsumer(url, capacity)
    elif role == "peer-producer":
        handler = PeerProducer(url)
    elif role == "peer-consumer":
        handler = PeerConsumer(url)
    else:
        raise SystemExit(f"unknown role {role!r}")
    loop = asyncio.get_running_loop()
    try:
        _reply({"started": role, "pid": os.getpid()})
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return 0
            msg = json.loads(line)
            if msg["op"] == "quit":
                return 0
            try:
                _reply(await handler.handle(msg))
            except Exception as exc:  # reported to the parent, which fails the run
                traceback.print_exc(file=sys.stderr)
                _reply({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        handler.close()


# ---- the parent's side of a child -----------------------------------------------------


class Child:
    """A child process of this script; one JSON line per message each way."""

    def __init__(self, role: str, url: str, capacity: int) -> None:
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--role", role, "--redis", url,
             "--capacity", str(capacity)],  # fmt: skip
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            preexec_fn=_die_with_parent,  # spawned while this process has one thread
        )
        self._buf = b""
        self.pid = self.recv(30)["pid"]

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self, timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.role}: no answer within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"{self.role} exited (code {self.proc.wait(5)})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.role}: {msg['error']}")
        return msg

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send({"op": "quit"})
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# ---- cross-process runs ------------------------------------------------------------------


@dataclass
class XRun:
    events: int  # progress + terminal events
    seconds: float  # producer's first notify() to the consumer's last event
    loop_s: float  # producer's loop (ours: notify() calls; peer: until its last pipeline answered)
    publish_s: float  # producer's first event to flush() returning (all in Redis)
    prod_cpu: float  # seconds
    cons_cpu: float
    redis_cpu: float
    lat_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def run_pair(
    redis: RedisServer, producer: Child, consumer: Child, op: str, tag: str, n: int, jobs: int, interval_us: int
) -> XRun:
    client = redis.client()
    try:
        client.flushall()
    finally:
        client.close()
    msg = {"op": op, "tag": tag, "n": n, "jobs": jobs, "interval_us": interval_us, "timeout": CHILD_TIMEOUT}
    consumer.send(msg)
    consumer.recv()  # ready: every channel subscribed
    r0 = redis.cpu_ticks()
    producer.send(msg)
    p = producer.recv()
    c = consumer.recv()
    r1 = redis.cpu_ticks()
    total = n + jobs
    if c["count"] != n:
        raise AssertionError(f"{consumer.role}: {c['count']} events, want {n}")
    lat = [x / 1e6 for x in c["lat"]] if c["lat"] is not None else []
    if op == "latency" and len(lat) != n:
        raise AssertionError(f"{consumer.role}: {len(lat)} latencies, want {n}")
    return XRun(
        events=total,
        seconds=(c["t_last"] - p["t0"]) / 1e9,
        loop_s=(p["t_loop"] - p["t0"]) / 1e9,
        publish_s=(p["t_flushed"] - p["t0"]) / 1e9,
        prod_cpu=p["cpu"],
        cons_cpu=c["cpu"],
        redis_cpu=(r1 - r0) / CLK_TCK,
        lat_ms=lat,
    )


def pct(cpu: float, wall: float) -> str:
    return f"{100 * cpu / wall:.0f}%" if wall > 0 else "?"


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---- in one process ----------------------------------------------------------------------


@dataclass
class LocalRun:
    seconds: float  # notify() loop (notify case) or first notify() to the last local event (subs case)
    cpu: float
    publish_s: float = 0.0  # first notify() to flush() returning (broker only)
    ingested: int = 0


def run_notify_cost(url: str | None, tag: str, n: int, nj: int) -> LocalRun:
    """notify() n times over nj registered jobs, no subscriber."""
    options: dict[str, Any] = {"signing_secret": SECRET, "sse_capacity": MAXLEN}
    if url:
        options["broker_url"] = url
    notifier = JobNotifier(**options)
    try:
        notify = notifier.notify
        jobs = [f"{tag}-{j}" for j in range(nj)]
        for job in jobs:
            notifier.register_job(job)
        gc.collect()
        c0 = time.process_time()
        t0 = time.perf_counter()
        for k in range(n):
            notify(jobs[k % nj], JobEvent(PROCESSING, progress=k % 101, timestamp=TS + k))
        t1 = time.perf_counter()
        cpu = time.process_time() - c0
        if not notifier.flush(CHILD_TIMEOUT):
            raise AssertionError("notify cost: flush() timed out")
        t2 = time.perf_counter()
        if url:
            st = notifier.stats()
            if st["broker_published"] != n or st["broker_rejected"]:
                raise AssertionError(f"notify cost: {st['broker_published']} published, want {n}")
        return LocalRun(t1 - t0, cpu, publish_s=t2 - t0)
    finally:
        notifier.close(5)


async def run_local_subs(url: str | None, tag: str, n: int, nj: int) -> LocalRun:
    """notify() n events over nj jobs, each with one Subscription in this
    process (producer yields every BATCH events); until the last terminal
    event is read."""
    options: dict[str, Any] = {"signing_secret": SECRET, "sse_capacity": max(MAXLEN, n // nj + 16)}
    if url:
        options["broker_url"] = url
    notifier = JobNotifier(**options)
    try:
        notify = notifier.notify
        jobs = [f"{tag}-{j}" for j in range(nj)]
        subs = await subscribe_all(notifier, jobs)
        done_at = [0] * nj
        got = [0] * nj
        tasks = [asyncio.ensure_future(_ours_job(s, j, n, nj, None, done_at, got)) for j, s in enumerate(subs)]
        await asyncio.sleep(0)
        ingested0 = notifier.stats().get("broker_ingested", 0)
        gc.collect()
        c0 = time.process_time()
        t0 = now_ns()
        for start in range(0, n, BATCH):
            for k in range(start, min(start + BATCH, n)):
                notify(jobs[k % nj], JobEvent(PROCESSING, progress=k % 101, timestamp=TS + k))
            await asyncio.sleep(0)
        for j, job in enumerate(jobs):
            notify(job, JobEvent(COMPLETED, progress=100, timestamp=TS + n + j))
        await asyncio.wait_for(asyncio.gather(*tasks), CHILD_TIMEOUT)
        t1 = max(done_at)
        cpu = time.process_time() - c0
        if sum(got) != n:
            raise AssertionError(f"local subscribers: {sum(got)} events, want {n}")
        ingested = notifier.stats().get("broker_ingested", 0) - ingested0
        for s in subs:
            s.close()
        if url and not notifier.flush(CHILD_TIMEOUT):
            raise AssertionError("local subscribers: flush() timed out")
        publish_s = (now_ns() - t0) / 1e9
        return LocalRun((t1 - t0) / 1e9, cpu, publish_s=publish_s if url else 0.0, ingested=ingested)
    finally:
        notifier.close(5)


# ---- main -------------------------------------------------------------------------------------


def _on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: children and redis-server stop


def wire_check() -> str:
    """Ours and the peer publish the same JSON bytes."""
    for k in (0, 7, 12345):
        ours = JobEvent(PROCESSING, progress=k % 101, timestamp=TS + k).to_json()
        peer = ENCODE({"status": "processing", "progress": k % 101, "timestamp": TS + k})
        assert ours == peer, (ours, peer)
    stamped = JobEvent(PROCESSING, progress=5, result={"t": 123}, timestamp=TS).to_json()
    assert stamped == ENCODE({"status": "processing", "progress": 5, "result": {"t": 123}, "timestamp": TS}), stamped
    return f"`{JobEvent(PROCESSING, progress=5, timestamp=TS).to_json()}`"


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller runs (~15 s)")
    ap.add_argument("--json", metavar="PATH", help="also write the section and headline figures as JSON")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every measurement (default 3)")
    ap.add_argument("--events", type=int, help="cross-process progress events (default 200,000; quick 20,000)")
    ap.add_argument("--jobs", type=int, default=JOBS, help=f"jobs the events are spread over (default {JOBS})")
    ap.add_argument("--latency-events", type=int, help="paced events per latency run (default 2,000; quick 500)")
    ap.add_argument("--interval-us", type=int, default=1000, help="latency pacing (default 1,000 µs)")
    ap.add_argument("--local-events", type=int, help="in-process events (default 100,000; quick 20,000)")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--redis", help=argparse.SUPPRESS)
    ap.add_argument("--capacity", type=int, default=MAXLEN, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"{args.role} %(levelname)s %(name)s: %(message)s")
        return asyncio.run(child_main(args.role, args.redis, args.capacity))

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    reps = args.reps
    n = args.events or (20_000 if args.quick else 200_000)
    nj = args.jobs
    n_lat = args.latency_events or (500 if args.quick else 2_000)
    n_local = args.local_events or (20_000 if args.quick else 100_000)
    if reps < 1 or nj < 1 or min(n, n_lat, n_local) < nj or args.interval_us < 0:
        ap.error("--reps and --jobs must be positive, event counts at least --jobs")
    # The consumer's sse_capacity: a whole job's events, so that a subscriber
    # task behind the broker thread's ingest never lags (asserted anyway).
    capacity = max(MAXLEN, -(-n // nj) + 16, n_lat + 16)

    if not (os.access(REDIS_SERVER, os.X_OK) or shutil.which("redis-server")):
        print(f"{REDIS_SERVER} not found (Debian: apt-get install redis-server)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    started = time.perf_counter()
    check = wire_check()
    redis = RedisServer()
    children: list[Child] = []
    xruns: dict[str, list[XRun]] = {"ours": [], "peer": []}
    lruns: dict[str, list[XRun]] = {"ours": [], "peer": []}
    cost: dict[str, list[LocalRun]] = {"local": [], "broker": []}
    local: dict[str, list[LocalRun]] = {"local": [], "broker": []}
    try:
        redis.start()  # first, while this process has a single thread
        log.info("redis-server %s on port %d", redis.version, redis.port)
        sides = {}
        for side in ("ours", "peer"):
            prod = Child(f"{side}-producer", redis.url, capacity)
            children.append(prod)
            cons = Child(f"{side}-consumer", redis.url, capacity)
            children.append(cons)
            sides[side] = (prod, cons)
        for rep in range(reps):
            for side, (prod, cons) in sides.items():
                r = run_pair(redis, prod, cons, "xproc", f"x{rep}", n, nj, 0)
                xruns[side].append(r)
                log.info(
                    "xproc rep %d/%d %-4s %d events in %.3f s = %.0f/s (loop %.2f µs/event, in Redis after %.3f s)",
                    rep + 1, reps, side, r.events, r.seconds, r.rate, r.loop_s / r.events * 1e6, r.publish_s,
                )  # fmt: skip
        for rep in range(reps):
            for side, (prod, cons) in sides.items():
                r = run_pair(redis, prod, cons, "latency", f"l{rep}", n_lat, 1, args.interval_us)
                lruns[side].append(r)
                log.info(
                    "latency rep %d/%d %-4s p50 %.3f ms p99 %.3f ms",
                    rep + 1, reps, side, quantile(r.lat_ms, 0.5), quantile(r.lat_ms, 0.99),
                )  # fmt: skip
        for c in children:
            c.close()
        children.clear()
        for rep in range(reps):
            for key, url in (("local", None), ("broker", redis.url)):
                lr = run_notify_cost(url, f"c{rep}{key}", n_local, nj)
                cost[key].append(lr)
                log.info("notify() rep %d/%d %-6s %.3f µs/call", rep + 1, reps, key, lr.seconds / n_local * 1e6)
        for rep in range(reps):
            for key, url in (("local", None), ("broker", redis.url)):
                lr = asyncio.run(run_local_subs(url, f"s{rep}{key}", n_local, nj))
                local[key].append(lr)
                log.info(
                    "local subscribers rep %d/%d %-6s %.0f events/s (ingested %d)",
                    rep + 1, reps, key, n_local / lr.seconds, lr.ingested,
                )  # fmt: skip
                if lr.ingested:
                    raise AssertionError(f"local subscribers got {lr.ingested} events through Redis, want 0")
    finally:
        for c in children:
            with contextlib.suppress(Exception):
                c.close()
        redis.stop()

    md, headline = report(
        redis.version, check, reps, n, nj, n_lat, args.interval_us, n_local, capacity, xruns, lruns, cost, local
    )
    print(md)
    log.info("done in %.0f s", time.perf_counter() - started)
    if args.json:
        Path(args.json).write_text(json.dumps({"case": "broker", "markdown": md, "headline": headline}, indent=2) + "\n")
    return 0


def _median_run(runs: list[XRun], key: Callable[[XRun], float]) -> XRun:
    return sorted(runs, key=key)[len(runs) // 2]


def report(
    version: str,
    check: str,
    reps: int,
    n: int,
    nj: int,
    n_lat: int,
    interval_us: int,
    n_local: int,
    capacity: int,
    xruns: dict[str, list[XRun]],
    lruns: dict[str, list[XRun]],
    cost: dict[str, list[LocalRun]],
    local: dict[str, list[LocalRun]],
) -> tuple[str, dict[str, Any]]:
    names = {"ours": "blueprint_notify (broker_url)", "peer": "redis-py asyncio + hiredis"}
    ratio = med([o.rate / p.rate for o, p in zip(xruns["ours"], xruns["peer"])])
    out = [
        "## Scale-out: events across processes through Redis",
        "",
        f"redis-server {version} on 127.0.0.1 (`--save '' --appendonly no`), started by the benchmark; "
        f"{os.cpu_count()} CPUs shared by the producer process, the consumer process and Redis; Python "
        f"{sys.version.split()[0]}, default asyncio loop; load average "
        f"{Path('/proc/loadavg').read_text().split()[0]} at the end. Medians of {reps} repetitions (sides interleaved).",
        "",
        "### Cross-process throughput",
        "",
        f"A producer process sends {n:,} progress events round-robin over {nj} jobs, then one terminal event "
        f"per job ({n + nj:,} events); a consumer process reads them. The clock runs from the producer's first "
        "event to the consumer's last (CLOCK_MONOTONIC, shared by the processes). Every run checks that each "
        "job's events all arrive, once, in order (timestamps, event ids), the terminal one last.",
        "",
        f"- **{names['ours']}**: the producer calls `notify(job, JobEvent(...))` (no webhook URL; jobs registered "
        f"first, `sse_capacity={MAXLEN}`, so Redis keeps {MAXLEN:,} events per job), then `flush()`; its broker "
        "thread sends batches of up to 1,024 events in one Lua call (per event: XADD with the event id, the "
        "previous entry's id and an idempotence check, PUBLISH; per job and batch: 2 PEXPIRE). The consumer has one `notifier.subscribe(job)` per job (each "
        "`await sub.ready()` first) read with `async for`, on a notifier whose broker thread receives the Pub/Sub "
        f"messages and ingests them into the local channels (`sse_capacity={capacity:,}`: at least a whole "
        "job's events, so no subscriber can lag behind that thread).",
        f"- **{names['peer']}**: builds the same JSON bytes (e.g. {check}; json's encoder with compact "
        f"separators), pipelines `XADD {PEER_PREFIX}:ev:{{job}} MAXLEN {MAXLEN} * d <json>` + "
        f"`PUBLISH {PEER_PREFIX}:live:{{job}} <json>`, 1,024 events per round trip, awaiting each; the consumer "
        "is one `redis.asyncio` PubSub on the 100 channels (every SUBSCRIBE confirmed first), `async for m in "
        "pubsub.listen()`, `json.loads` per message, and gets dicts, not `JobEvent`s.",
        "",
        "| side | events | seconds | events/s | producer loop µs/event | into Redis, events/s | producer CPU | consumer CPU | Redis CPU | Redis CPU µs/event |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in ("ours", "peer"):
        runs = xruns[side]
        r = _median_run(runs, lambda x: x.seconds)
        out.append(
            f"| {names[side]} | {r.events:,} | {r.seconds:.3f} | {med([x.rate for x in runs]):,.0f} "
            f"| {med([x.loop_s / x.events * 1e6 for x in runs]):.2f} | {med([x.events / x.publish_s for x in runs]):,.0f} "
            f"| {pct(r.prod_cpu, r.seconds)} | {pct(r.cons_cpu, r.seconds)} | {pct(r.redis_cpu, r.seconds)} "
            f"| {med([x.redis_cpu / x.events * 1e6 for x in runs]):.2f} |"
        )
    out += [
        "",
        f"**{ratio:.2f}x** the redis-py pair's events/s (median of per-repetition ratios). *producer loop*: "
        "ours, the `notify()` calls alone (the broker thread sends meanwhile); the peer, until its last pipeline "
        "is answered. *into Redis*: first event to `flush()` returning (ours) or the last pipeline answered "
        "(peer). CPU: % of one core over the run's seconds (median run; the consumer's includes its broker "
        "thread); *Redis CPU µs/event*: redis-server's user + system time per event (median), the cost that "
        "bounds how far one Redis scales out.",
        "",
        "### Latency: notify() to a subscriber in another process",
        "",
        f"{n_lat:,} events on one job, one every {interval_us} µs, each stamped with `time.time_ns()` just before "
        "`notify()` (peer: before building its one-event pipeline) in `result`; the consumer subtracts the stamp "
        "from `time.time_ns()` as it reads the event (`await sub.get()` / the PubSub message). p50/p99 of each run; "
        "medians over the runs.",
        "",
        "| side | events | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lat: dict[str, dict[str, float]] = {}
    for side in ("ours", "peer"):
        runs = lruns[side]
        lat[side] = {q: med([quantile(r.lat_ms, v) for r in runs]) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
        lat[side]["max"] = med([max(r.lat_ms) for r in runs])
        d = lat[side]
        out.append(f"| {names[side]} | {n_lat:,} | {d['p50']:.3f} | {d['p90']:.3f} | {d['p99']:.3f} | {d['max']:.3f} |")
    us = {k: med([r.seconds / n_local * 1e6 for r in v]) for k, v in cost.items()}
    cpu_us = {k: med([r.cpu / n_local * 1e6 for r in v]) for k, v in cost.items()}
    pub_rate = med([n_local / r.publish_s for r in cost["broker"]])
    sub_rate = {k: med([n_local / r.seconds for r in v]) for k, v in local.items()}
    sub_cpu = {k: med([r.cpu / n_local * 1e6 for r in v]) for k, v in local.items()}
    # broker rate / no-broker rate, paired by repetition
    sub_ratio = med([lo.seconds / br.seconds for lo, br in zip(local["local"], local["broker"])])
    out += [
        "",
        "### In one process: what the broker costs the producer",
        "",
        f"`notify()` {n_local:,} times over {nj} registered jobs, no subscriber (the notifier otherwise as above), "
        "with and without `broker_url`: the loop's wall time and the process CPU over it (which includes the "
        "broker thread's share). Then local subscribers: one `Subscription` per job in the same process and "
        f"loop, the producer yielding every {BATCH:,} events; from the first `notify()` to the last event read. "
        "With the broker the local events are read before they reach Redis (the run checks that "
        "`broker_ingested` stays 0), but the subscribed jobs are attached, so each event also comes back "
        "over Pub/Sub and is dropped as a duplicate by the broker thread.",
        "",
        "| notifier | notify() µs/call | CPU µs/call | into Redis, events/s | local subscribers, events/s | CPU µs/event |",
        "|---|---:|---:|---:|---:|---:|",
        f"| no broker | {us['local']:.3f} | {cpu_us['local']:.3f} | - | {sub_rate['local']:,.0f} | {sub_cpu['local']:.3f} |",
        f"| `broker_url` | {us['broker']:.3f} | {cpu_us['broker']:.3f} | {pub_rate:,.0f} | {sub_rate['broker']:,.0f} "
        f"| {sub_cpu['broker']:.3f} |",
        "",
        f"With the broker, `notify()` costs {us['broker'] / us['local']:.2f}x; local subscribers run at "
        f"{sub_ratio:.2f}x their rate without it (median of per-repetition ratios).",
        "",
    ]
    ours = xruns["ours"]
    headline = {
        "xproc_events_per_s": round(med([r.rate for r in ours])),
        "xproc_vs_redis_py": round(ratio, 3),
        "xproc_publish_events_per_s": round(med([r.events / r.publish_s for r in ours])),
        "producer_notify_us": round(med([r.loop_s / r.events * 1e6 for r in ours]), 3),
        "latency_p50_ms": round(lat["ours"]["p50"], 3),
        "latency_p99_ms": round(lat["ours"]["p99"], 3),
        "redis_py_latency_p50_ms": round(lat["peer"]["p50"], 3),
        "redis_py_latency_p99_ms": round(lat["peer"]["p99"], 3),
        "notify_us_broker": round(us["broker"], 3),
        "notify_us_local": round(us["local"], 3),
        "local_subs_broker_vs_none": round(sub_ratio, 3),
    }
    return "\n".join(out), headline


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
