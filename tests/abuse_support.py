"""Helpers for the SSE abuse tests (``tests/test_sse_abuse.py``).

* :class:`AbuseServer`: ``tests/abuse_app.py`` (uvicorn serving ``sse_app``)
  in a subprocess on a listening socket bound here, driven over its
  stdin/stdout control channel: register jobs, notify, run paced producers,
  and read its RSS, fds, threads, open streams, subscribers and uvicorn
  connections. Its stderr goes to a log file that :func:`log_problems`
  checks for tracebacks and errors.
* :class:`Crowd`: many raw client sockets that send the GET and never read
  (or read a byte now and then), closed abruptly in several ways; every
  socket is closed on exit, also on failure.
* :class:`Probe`: ``tests/abuse_probe.py``, a well-behaved client in a
  process of its own, measuring notify-to-receive latency.
* :func:`raise_nofile`, :func:`run` (a test's own asyncio runner and time
  budget), :func:`percentile`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import pytest

from blueprint_notify.asgi import listening_socket

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 20.0  # generous: only reached when something is broken
CALL_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
RST_LINGER = struct.pack("ii", 1, 0)


def under_sanitizer() -> bool:
    """``make test-asan`` (tools/asan-env) preloads ASan into every process:
    memory and timing figures then describe the sanitizer, not the server."""
    return "libasan" in os.environ.get("LD_PRELOAD", "")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)  # LD_PRELOAD, ASAN_OPTIONS... under tools/asan-env
    paths = [str(ROOT), str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


# -- limits and running ---------------------------------------------------------------------
@contextlib.contextmanager
def raise_nofile(need: int) -> Iterator[int]:
    """Soft RLIMIT_NOFILE raised to the hard limit in this process (the
    server process does the same for itself); skips the test if the hard
    limit is below ``need``. Restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need} file descriptors needed (client + server side)")
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def run(main: Callable[[], Awaitable[None]], budget: float) -> None:
    """Runs an async test body with its own time budget (the 5,000-connection
    tests need more than conftest's default for ``async def`` tests)."""

    async def guarded() -> None:
        await asyncio.wait_for(main(), budget)

    asyncio.run(guarded())


def percentile(values: Iterable[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def request_bytes(port: int, path: str, token: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode("latin-1")


def events_path(job_id: str) -> str:
    return f"/v1/jobs/{quote(job_id, safe='')}/events"


# -- the server ---------------------------------------------------------------------------------
class ServerError(RuntimeError):
    pass


class AbuseServer:
    """``tests/abuse_app.py`` in a subprocess (see its docstring). Use as
    ``async with AbuseServer(log_path, ...) as server``."""

    def __init__(
        self,
        log_path: Path,
        *,
        sndbuf: int | None = None,
        backlog: int = 4096,
        send_timeout: float = 30.0,
        ping_interval: float = 15.0,
        sse_capacity: int = 16,
        max_streams: int | None = None,
        user_timeout: float | None = None,
    ) -> None:
        self.log_path = log_path
        self.sndbuf = sndbuf
        self.user_timeout = user_timeout
        self.backlog = backlog
        self.options = {
            "--send-timeout": send_timeout,
            "--ping-interval": ping_interval,
            "--sse-capacity": sse_capacity,
        }
        if max_streams is not None:
            self.options["--max-streams"] = max_streams
        self.port = 0
        self.pid = 0
        self.exit_code: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> AbuseServer:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        # The socket of blueprint_notify.asgi.listening_socket (TCP_USER_TIMEOUT
        # only when user_timeout is given).
        sock = listening_socket(HOST, 0, backlog=self.backlog, user_timeout=self.user_timeout)
        try:
            if self.sndbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
            self.port = sock.getsockname()[1]
            args = [sys.executable, str(TESTS / "abuse_app.py"), "--fd", str(sock.fileno())]
            for name, value in self.options.items():
                args += [name, str(value)]
            self._log = open(self.log_path, "ab")
            self.proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=self._log,
                pass_fds=(sock.fileno(),),
                env=child_env(),
                cwd=ROOT,
                start_new_session=True,
                limit=1 << 20,
            )
        finally:
            sock.close()  # the server process has its own copy
        hello = await self._read(STARTUP_TIMEOUT, "startup")
        if not hello.get("ready"):
            raise ServerError(f"unexpected first line {hello!r}\n{self.log()}")
        self.pid = hello["pid"]

    async def _read(self, timeout: float, what: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            raise ServerError(f"server gave no answer to {what} within {timeout} s\n{self.log()}") from None
        if not line:
            code = await self.proc.wait()
            raise ServerError(f"server exited ({code}) during {what}\n{self.log()}")
        return json.loads(line)

    async def call(self, op: str, timeout: float = CALL_TIMEOUT, **args: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        async with self._lock:
            self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
            await self.proc.stdin.drain()
            reply = await self._read(timeout, op)
        if not reply.pop("ok"):
            raise ServerError(f"{op} failed in the server: {reply.get('error')}\n{self.log()}")
        return reply

    async def stats(self, *, gc: bool = False, trim: bool = False) -> dict[str, Any]:
        return await self.call("stats", gc=gc, trim=trim)

    async def register(self, jobs: list[str]) -> dict[str, str]:
        return (await self.call("register", jobs=jobs))["tokens"]

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> tuple[float, dict[str, Any]]:
        """Polls the server's stats until ``predicate`` holds; (seconds it
        took, the stats). AssertionError with the last stats after timeout."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            stats = await self.stats()
            if predicate(stats):
                return time.monotonic() - start, stats
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout} s: {what}; server stats {stats}")
            await asyncio.sleep(0.01)  # poll tick of a bounded wait, not a wait for work

    async def wait_idle(self, timeout: float) -> tuple[float, dict[str, Any]]:
        """Until no stream, subscriber or uvicorn connection is left."""
        return await self.wait_for(
            lambda s: s["open_streams"] == 0 and s["subscribers"] == 0 and s["connections"] == 0 and s["hubs"] == 0,
            timeout,
            "open_streams, subscribers, connections and loop hubs back to 0",
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def stop(self) -> None:
        """``exit`` over the control channel; SIGKILL to its session if it
        does not end within STOP_TIMEOUT. Everything is reaped and closed."""
        proc = self.proc
        if proc is not None:
            try:
                if proc.returncode is None and proc.stdin is not None and not proc.stdin.is_closing():
                    with contextlib.suppress(ConnectionError, ServerError, asyncio.TimeoutError):
                        await self.call("exit", timeout=STOP_TIMEOUT)
                if proc.stdin is not None:
                    proc.stdin.close()
                try:
                    await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
                except asyncio.TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
                if proc.stdout is not None:
                    await proc.stdout.read()
                self.exit_code = proc.returncode
            finally:
                self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


_PROBLEM = re.compile(r"Traceback|ERROR|CRITICAL|Exception|exception|Task was destroyed|Fatal Python error")


def log_problems(text: str, allowed: Iterable[str] = ()) -> list[str]:
    """Lines of a server log that show an error: tracebacks, ERROR or
    CRITICAL records, exceptions, ignored exceptions, destroyed pending
    tasks; less those matching one of the ``allowed`` regexes."""
    allow = [re.compile(a) for a in allowed]
    return [
        line for line in text.splitlines() if _PROBLEM.search(line) and not any(a.search(line) for a in allow)
    ]


# -- abusive clients ---------------------------------------------------------------------------------
class Crowd:
    """Raw client sockets that send an SSE request and do not read. Every
    socket still open is reset (SO_LINGER 0) on :meth:`close_all`, which
    ``async with`` calls on exit."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []

    async def __aenter__(self) -> Crowd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close_all("rst")

    async def connect(
        self, port: int, requests: list[bytes], *, rcvbuf: int | None = None, concurrency: int = 200
    ) -> list[socket.socket]:
        """Opens one connection per request and sends it; the new sockets."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        new: list[socket.socket] = []

        async def one(request: bytes) -> None:
            async with gate:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                self.socks.append(sock)
                new.append(sock)
                if rcvbuf is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.setblocking(False)
                await loop.sock_connect(sock, (HOST, port))
                await loop.sock_sendall(sock, request)

        await asyncio.gather(*(one(r) for r in requests))
        return new

    @staticmethod
    def close_one(sock: socket.socket, mode: str) -> None:
        """``rst``: SO_LINGER 0 then close (an RST, nothing else).
        ``fin``: shutdown(SHUT_WR): a FIN, the socket stays open (closed
        later by close_all). ``close``: a plain close(); with unread data
        in the receive buffer Linux answers with an RST too."""
        if sock.fileno() < 0:
            return
        if mode == "rst":
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_LINGER)
            sock.close()
        elif mode == "fin":
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        elif mode == "close":
            sock.close()
        else:
            raise ValueError(mode)

    def close(self, socks: Iterable[socket.socket], modes: Iterable[str]) -> None:
        for sock, mode in zip(socks, modes):
            self.close_one(sock, mode)

    def close_all(self, mode: str = "rst") -> None:
        for sock in self.socks:
            self.close_one(sock, mode)
            if sock.fileno() >= 0:
                sock.close()
        self.socks.clear()


async def open_paced(
    server: AbuseServer,
    crowd: Crowd,
    requests: list[bytes],
    *,
    rcvbuf: int | None = None,
    batch: int = 1000,
    timeout: float = 30.0,
) -> list[socket.socket]:
    """Opens the connections in batches, each batch once the server has
    taken the previous one (open_streams): the listen backlog (somaxconn)
    never overflows, so no SYN is dropped and retried a second later."""
    base = (await server.stats())["open_streams"]
    socks: list[socket.socket] = []
    for i in range(0, len(requests), batch):
        part = requests[i : i + batch]
        socks += await crowd.connect(server.port, part, rcvbuf=rcvbuf)
        target = base + len(socks)
        await server.wait_for(lambda s: s["open_streams"] >= target, timeout, f"{target} streams open")
    return socks


class Trickle:
    """Slow readers: every ``period`` seconds each socket gives up to
    ``nbytes`` bytes (non-blocking recv), kept in ``got[i]``. Runs as a
    task until stopped."""

    def __init__(self, socks: list[socket.socket], period: float = 0.1, nbytes: int = 1) -> None:
        self.socks = socks
        self.period = period
        self.nbytes = nbytes
        self.got = [bytearray() for _ in socks]
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Trickle:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        while not self._stop.is_set():
            for sock, got in zip(self.socks, self.got):
                if sock.fileno() < 0:
                    continue
                try:
                    got += sock.recv(self.nbytes)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    pass  # reset by the server: counted by the test from the server's side
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.period)  # the readers' pace

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None


async def drain_to_eof(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Reads a (non-blocking) socket until EOF or reset: (bytes, reset?)."""
    loop = asyncio.get_running_loop()
    got = bytearray()

    async def read() -> bool:
        while True:
            try:
                data = await loop.sock_recv(sock, 1 << 16)
            except ConnectionResetError:
                return True
            if not data:
                return False
            got.extend(data)

    reset = await asyncio.wait_for(read(), timeout)
    return bytes(got), reset


# -- the well-behaved client ---------------------------------------------------------------------------
class Probe:
    """``tests/abuse_probe.py`` in a subprocess: ``await probe.ready()`` once
    its stream is open, ``await probe.result()`` for its report."""

    def __init__(self, port: int, path: str, token: str, count: int, *, timeout: float = 20.0, to_end: bool = False):
        self.args = [
            sys.executable, str(TESTS / "abuse_probe.py"),
            "--port", str(port), "--path", path, "--token", token,
            "--count", str(count), "--timeout", str(timeout),
        ]  # fmt: skip
        if to_end:
            self.args.append("--to-end")
        self.timeout = timeout
        self.reported = False
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Probe:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_env(),
            cwd=ROOT,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            try:
                # After its report the probe exits by itself.
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT if self.reported else 0)
            except asyncio.TimeoutError:
                # os.kill, not proc.kill(): Popen.send_signal() polls first,
                # and would reap a child that just exited behind asyncio's
                # child watcher (which then warns and reports 255).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        await proc.communicate()
        self.proc = None

    async def _line(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), self.timeout + 10)
        if not line:
            _, err = await self.proc.communicate()
            raise AssertionError(f"probe exited ({self.proc.returncode}): {err.decode(errors='replace')}")
        return json.loads(line)

    async def ready(self) -> None:
        hello = await self._line()
        assert hello.get("ready"), hello

    async def result(self) -> dict[str, Any]:
        report = await self._line()
        self.reported = True
        return report
