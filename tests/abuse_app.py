"""The SSE server of the abuse tests (``tests/test_sse_abuse.py``), run in a
process of its own so that its memory, file descriptors and threads are
measured apart from the clients::

    python tests/abuse_app.py --fd FD [--send-timeout S] [--ping-interval S]
                              [--sse-capacity N] [--max-streams N]

``FD`` is a listening TCP socket inherited from the test (bound there, so
there is no port race; its SO_SNDBUF, if the test set one, is inherited by
every accepted connection). It serves ``sse_app(notifier)`` with a real
``uvicorn.Server`` (h11; uvloop when installed, as ``tests/sse_support.py``'s
``run_uvicorn``) and raises its soft RLIMIT_NOFILE to the hard limit.

The control channel is stdin/stdout, one JSON object a line, handled on the
server's event loop between requests (like an endpoint of the app, but
without a socket that would show in the counts): a request
``{"op": ..., ...}`` gets one reply line, ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. The first line written, once uvicorn has
started, is ``{"ok": true, "ready": true, "pid": ...}``. Ops:

- ``register`` ``jobs: [str]`` -> ``tokens: {job: token}``
- ``notify`` ``job, count, size, terminal=False``: ``count`` events with a
  ``size``-byte ``result`` (the last one COMPLETED if ``terminal``).
- ``stats`` ``gc=False, trim=False``: ``gc.collect()`` (its duration in
  ``gc_ms``, and ``gc_objects``: how many objects the gc tracks, the leak
  signal: freelists and caches do not count there) and glibc
  ``malloc_trim(0)`` first, then: ``rss_kb``/``hwm_kb`` (VmRSS/VmHWM),
  ``threads``, ``fds``, ``open_streams`` (``app.open_streams``),
  ``subscribers`` (``notifier.stats()["subscribers"]``), ``connections``
  (uvicorn's live connections), ``write_buffered`` (bytes queued in the
  transports: what the kernel did not take yet), ``write_paused``
  (connections over the transport's high-water mark), ``closing``
  (connections closed by the server, waiting to flush), ``hubs``, ``tickers``,
  ``tasks``, ``channels``, ``blocks`` (``sys.getallocatedblocks()``: pymalloc
  blocks in use, freelists and caches included).
- ``objects`` ``top=40``: the most common types among the live objects
  the gc tracks (diagnostics: what a leak is made of).
- ``monitor``: the longest event-loop stall (a 5 ms timer's lateness) and
  the longest garbage-collector pause since the last ``monitor``, and how
  many full (generation 2) collections ran.
- ``reset_peak``: resets VmHWM (``/proc/self/clear_refs``); a later
  ``stats`` then reports the peak since.
- ``produce`` ``name, job, count, interval, size=0, stamp=True,
  terminal=False``: a producer thread (a job runner) notifies ``count``
  events (``count`` null: until ``halt``), one every ``interval`` seconds;
  with ``stamp`` each ``result`` is ``{"t": time.monotonic_ns(), "pad": ...}``
  taken just before ``notify()`` (CLOCK_MONOTONIC is system-wide, so a client
  process computes notify-to-receive latency from it).
- ``join`` ``name, timeout``: waits for that producer to finish ->
  ``sent``, ``elapsed``. ``halt`` ``name``: stops it, then the same.
- ``exit``: the server shuts down (also on stdin EOF); the process exits 0
  after closing the notifier.

Logging: WARNING and above of every logger to stderr (which the test
captures to a file and checks for tracebacks and errors).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import ctypes.util
import faulthandler
import gc
import json
import logging
import os
import resource
import socket
import sys
import threading
import time
from typing import Any

import uvicorn

from blueprint_notify import JobEvent, JobNotifier, JobStatus
from blueprint_notify.asgi import SSEApp, sse_app

logger = logging.getLogger("abuse_app")


def _fd_kinds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}").split(":")[0])
        except OSError:
            pass
    return out


def _status_fields() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                out[name] = int(value.split()[0])
    return out


def _malloc_trim() -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


class Producer:
    """A job runner thread publishing paced events."""

    def __init__(self, notifier: JobNotifier, loop: asyncio.AbstractEventLoop, spec: dict[str, Any]) -> None:
        self.notifier = notifier
        self.job: str = spec["job"]
        self.count: int | None = spec.get("count")
        self.interval = float(spec.get("interval", 0.0))
        self.pad = "x" * int(spec.get("size", 0))
        self.stamp = bool(spec.get("stamp", True))
        self.terminal = bool(spec.get("terminal", False))
        self.halted = threading.Event()
        self.sent = 0
        self.elapsed = 0.0
        self.error: str | None = None
        self.done: asyncio.Future[None] = loop.create_future()
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name=f"producer-{spec['name']}", daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        next_at = start
        try:
            i = 0
            while self.count is None or i < self.count:
                if self.halted.is_set():
                    break
                last = self.count is not None and i == self.count - 1
                status = JobStatus.COMPLETED if (last and self.terminal) else JobStatus.PROCESSING
                if self.stamp:
                    result: Any = {"t": time.monotonic_ns(), "pad": self.pad}
                else:
                    result = self.pad
                self.notifier.notify(self.job, JobEvent(status, progress=i % 101, result=result, timestamp=i))
                i += 1
                self.sent = i
                next_at += self.interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    self.halted.wait(delay)  # the producer's pace
        except BaseException as exc:  # reported through join
            self.error = repr(exc)
            logger.exception("producer for %r failed", self.job)
        finally:
            self.elapsed = time.monotonic() - start
            try:
                self.loop.call_soon_threadsafe(self._finish)
            except RuntimeError:  # the loop is closed: the server is gone
                pass

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Monitor:
    """Event-loop stalls (a 5 ms timer's lateness) and garbage-collector
    pauses, both as maxima since the last ``take()``: what explains a
    latency spike."""

    PERIOD = 0.005

    def __init__(self) -> None:
        self.loop_max = 0.0
        self.gc_max = 0.0
        self.gc_full = 0
        self._gc_start = 0.0
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due = loop.time() + self.PERIOD
        self._handle = loop.call_at(self._due, self._tick)
        gc.callbacks.append(self._on_gc)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _tick(self) -> None:
        now = self._loop.time()
        self.loop_max = max(self.loop_max, now - self._due)
        self._due = now + self.PERIOD
        self._handle = self._loop.call_at(self._due, self._tick)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_max = max(self.gc_max, time.perf_counter() - self._gc_start)
            self.gc_full += info["generation"] == 2

    def take(self) -> dict[str, float]:
        out = {
            "loop_stall_max_ms": self.loop_max * 1000,
            "gc_pause_max_ms": self.gc_max * 1000,
            "gc_full": self.gc_full,
        }
        self.loop_max = self.gc_max = 0.0
        self.gc_full = 0
        return out


class Control:
    """The stdin/stdout control channel (see the module docstring)."""

    def __init__(self, notifier: JobNotifier, app: SSEApp, server: uvicorn.Server) -> None:
        self.notifier = notifier
        self.app = app
        self.server = server
        self.producers: dict[str, Producer] = {}
        self.monitor = Monitor()

    def reply(self, obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self.monitor.start(loop)
        try:
            while not self.server.started:
                if self.server.should_exit:
                    return
                await asyncio.sleep(0.01)  # startup poll, bounded by the test's startup timeout
            self.reply({"ok": True, "ready": True, "pid": os.getpid()})
            while True:
                line = await reader.readline()
                if not line:
                    break  # the test went away: shut down
                request: dict[str, Any] = {}
                try:
                    request = json.loads(line)
                    result = await self.handle(request)
                    self.reply({"ok": True, **result})
                except Exception as exc:  # noqa: BLE001  (reported to the test)
                    self.reply({"ok": False, "error": repr(exc)})
                if request.get("op") == "exit":
                    break
        finally:
            self.monitor.stop()
            transport.close()
            for producer in self.producers.values():
                producer.halted.set()
            self.server.should_exit = True

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        n = self.notifier
        if op == "register":
            return {"tokens": {job: n.register_job(job) for job in request["jobs"]}}
        if op == "notify":
            pad = "x" * int(request.get("size", 0))
            count = int(request["count"])
            for i in range(count):
                last = i == count - 1 and request.get("terminal", False)
                status = JobStatus.COMPLETED if last else JobStatus.PROCESSING
                n.notify(request["job"], JobEvent(status, progress=i % 101, result=pad, timestamp=i))
            return {}
        if op == "stats":
            gc_ms = 0.0
            if request.get("gc"):
                start = time.perf_counter()
                gc.collect()
                gc_ms = (time.perf_counter() - start) * 1000
            trimmed = _malloc_trim() if request.get("trim") else False
            extra = {"trimmed": trimmed, "gc_ms": gc_ms}
            if request.get("gc"):
                extra["gc_objects"] = len(gc.get_objects())
            return self.stats() | extra
        if op == "objects":
            # Live objects tracked by the gc, by type (diagnostics for a leak).
            gc.collect()
            counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
            return {"objects": dict(counts.most_common(int(request.get("top", 40))))}
        if op == "monitor":
            return self.monitor.take()
        if op == "reset_peak":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return {}
        if op == "produce":
            name = request["name"]
            if name in self.producers:
                raise ValueError(f"producer {name!r} exists")
            producer = self.producers[name] = Producer(n, asyncio.get_running_loop(), request)
            producer.thread.start()
            return {}
        if op in ("join", "halt"):
            producer = self.producers[request["name"]]
            if op == "halt":
                producer.halted.set()
            await asyncio.wait_for(asyncio.shield(producer.done), float(request.get("timeout", 30)))
            producer.thread.join()
            del self.producers[request["name"]]
            return {"sent": producer.sent, "elapsed": producer.elapsed, "error": producer.error}
        if op == "exit":
            return {}
        raise ValueError(f"unknown op {op!r}")

    def stats(self) -> dict[str, Any]:
        status = _status_fields()
        connections = list(self.server.server_state.connections)
        buffered = paused = closing = 0
        for conn in connections:
            transport = getattr(conn, "transport", None)
            if transport is not None:
                buffered += transport.get_write_buffer_size()
                closing += transport.is_closing()
            flow = getattr(conn, "flow", None)
            if flow is not None and flow.write_paused:
                paused += 1
        return {
            "rss_kb": status["VmRSS"],
            "hwm_kb": status["VmHWM"],
            "threads": status["Threads"],
            "fds": len(os.listdir("/proc/self/fd")) - 1,  # less listdir's own
            "open_streams": self.app.open_streams,
            "subscribers": int(self.notifier.stats()["subscribers"]),
            "connections": len(connections),
            "write_buffered": buffered,
            "write_paused": paused,
            "closing": closing,
            "hubs": len(self.notifier._hubs),
            "tickers": len(self.app._tickers),
            "tasks": len(asyncio.all_tasks()),
            "channels": self.notifier.active_channels(),
            "fd_kinds": sorted(_fd_kinds()),
            "blocks": sys.getallocatedblocks(),
        }


class ControlledServer(uvicorn.Server):
    """uvicorn's server, with the control channel started on its loop
    (``run()`` keeps uvicorn's own loop setup: uvloop when installed)."""

    control: Control
    _control_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._control_task = asyncio.ensure_future(self.control.run())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets=sockets)
        task = self._control_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    parser.add_argument("--send-timeout", type=float, default=30.0)
    parser.add_argument("--ping-interval", type=float, default=15.0)
    parser.add_argument("--sse-capacity", type=int, default=16)
    parser.add_argument("--max-streams", type=int, default=None)
    args = parser.parse_args(argv)

    faulthandler.enable()
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    sock = socket.socket(fileno=args.fd)
    notifier = JobNotifier(signing_secret="abuse-secret", sse_capacity=args.sse_capacity, max_channels=100_000)
    app = sse_app(
        notifier,
        send_timeout=args.send_timeout,
        ping_interval=args.ping_interval,
        max_streams=args.max_streams,
    )
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=3,
        limit_concurrency=None,
    )
    server = ControlledServer(config)
    server.control = Control(notifier, app, server)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        notifier.close(timeout=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
