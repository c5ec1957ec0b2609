"""Helpers for the SSE endpoint tests (``tests/test_sse_*.py``).

* :func:`run_uvicorn` / :func:`run_hypercorn`: a real ASGI server for an app,
  on 127.0.0.1 and a free port (the listening socket is bound here, so there
  is no port race), in a background thread; stopped (and the thread joined)
  on exit.
* :class:`RawHTTP`: a tiny HTTP/1.1 client on asyncio streams that decodes
  ``Transfer-Encoding: chunked`` itself, so tests see the exact body bytes
  and whether the server ended the body properly (terminating chunk) or just
  dropped the connection. Cheap enough for 1,000 concurrent streams.
* Expected frames built from :meth:`JobEvent.to_json` (never from the C
  renderer under test), ``eventually()`` for bounded waits on server state.
* Fixtures (import them into a test module): ``make_sse`` (a notifier, an
  ``sse_app`` and a server per call) and ``sse`` (one default server shared
  by the module; also import ``_module_sse``). Both check at teardown that
  no stream is left open and the notifier's loop hub was released.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest

from blueprint_notify import JobEvent, JobNotifier
from blueprint_notify.asgi import SSEApp, sse_app

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
RETRY = b"retry: 3000\n\n"
PING = b": ping\n\n"
_job_numbers = itertools.count(1)


# -- expected bytes ---------------------------------------------------------------------
def frame(seq: int, event: JobEvent) -> bytes:
    """The SSE frame of ``event`` as sequence number ``seq``."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        seq,
        event.status.value.encode("ascii"),
        event.to_json().encode("utf-8"),
    )


def frames(events: list[JobEvent], first_seq: int = 1) -> bytes:
    return b"".join(frame(first_seq + i, e) for i, e in enumerate(events))


def lag_frame(skipped: int) -> bytes:
    return b'event: error\ndata: {"error":"lagged","skipped":%d}\n\n' % skipped


def retry(ms: int) -> bytes:
    return b"retry: %d\n\n" % ms


def events_path(job_id: str, prefix: str = "/v1/jobs") -> str:
    """The stream's path with the job id percent-encoded (slashes too)."""
    return f"{prefix}/{quote(job_id, safe='')}/events"


# -- waiting ------------------------------------------------------------------------------
async def eventually(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> float:
    """Polls ``predicate`` (server state that has no event to wait on) until
    it is true; returns the seconds it took. AssertionError after timeout."""
    start = time.monotonic()
    deadline = start + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what or predicate}")
        await asyncio.sleep(0.005)  # poll tick of a bounded wait, not a wait for work
    return time.monotonic() - start


def eventually_sync(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> float:
    start = time.monotonic()
    deadline = start + timeout
    event = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what or predicate}")
        event.wait(0.005)  # poll tick of a bounded wait, not a wait for work
    return time.monotonic() - start


# -- servers ------------------------------------------------------------------------------
def listening_socket(backlog: int = 128, sndbuf: int | None = None) -> socket.socket:
    """A listening TCP socket on 127.0.0.1 and a free port. ``sndbuf`` sets
    SO_SNDBUF, which accepted connections inherit (no autotuning): a server
    whose writes back up after a few KiB."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind((HOST, 0))
    sock.listen(backlog)
    return sock


@dataclass
class Served:
    """A server running an app in a background thread."""

    port: int
    thread: threading.Thread
    stop: Callable[[], float]
    server: Any = None
    errors: list[BaseException] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url_for(self, path: str) -> str:
        return self.url + path


@contextlib.contextmanager
def run_uvicorn(
    app: Any,
    *,
    backlog: int = 2048,
    limit_concurrency: int | None = None,
    timeout_graceful_shutdown: float | None = 5.0,
    lifespan: str = "auto",
    sndbuf: int | None = None,
    **config: Any,
) -> Iterator[Served]:
    """Serves ``app`` with a real ``uvicorn.Server`` (h11; uvloop if
    installed) on 127.0.0.1. On exit: ``should_exit = True`` and the thread
    is joined (AssertionError if it does not end within STOP_TIMEOUT).
    ``served.stop()`` does the same earlier and returns the seconds it took."""
    import uvicorn

    sock = listening_socket(backlog, sndbuf)
    port = sock.getsockname()[1]
    cfg = uvicorn.Config(
        app,
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan=lifespan,
        backlog=backlog,
        limit_concurrency=limit_concurrency,
        timeout_graceful_shutdown=timeout_graceful_shutdown,
        **config,
    )
    server = uvicorn.Server(cfg)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"uvicorn-{port}", daemon=True)

    def stop() -> float:
        start = time.monotonic()
        server.should_exit = True
        thread.join(STOP_TIMEOUT)
        assert not thread.is_alive(), f"uvicorn did not stop within {STOP_TIMEOUT} s"
        return time.monotonic() - start

    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"uvicorn ended during startup: {errors!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn not started within {STARTUP_TIMEOUT} s")
            thread.join(0.005)  # bounded wait for server.started
        yield Served(port, thread, stop, server, errors)
    finally:
        if thread.is_alive():
            stop()
        sock.close()
    assert not errors, f"uvicorn failed: {errors!r}"


@contextlib.contextmanager
def run_hypercorn(
    app: Any,
    *,
    graceful_timeout: float = 3.0,
    on_shutdown: Callable[[], None] | None = None,
    sndbuf: int | None = None,
    **config: Any,
) -> Iterator[Served]:
    """Serves ``app`` with hypercorn's asyncio worker (``hypercorn.asyncio.serve``)
    on 127.0.0.1. The listening socket exists before the thread starts, so
    clients may connect at once. On exit the shutdown trigger fires (calling
    ``on_shutdown`` first, on the server's loop) and the thread is joined."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    sock = listening_socket(sndbuf=sndbuf)
    port = sock.getsockname()[1]
    cfg = Config()
    cfg.bind = [f"fd://{sock.detach()}"]  # hypercorn takes the fd over
    cfg.graceful_timeout = graceful_timeout
    cfg.accesslog = None
    cfg.errorlog = None
    cfg.loglevel = "WARNING"
    for name, value in config.items():
        setattr(cfg, name, value)
    errors: list[BaseException] = []
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        state["loop"] = asyncio.get_running_loop()
        state["stop"] = asyncio.Event()
        ready.set()

        async def trigger() -> None:
            await state["stop"].wait()
            if on_shutdown is not None:
                on_shutdown()

        await serve(app, cfg, shutdown_trigger=trigger)

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=target, name=f"hypercorn-{port}", daemon=True)

    def stop() -> float:
        start = time.monotonic()
        loop = state.get("loop")
        if loop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(state["stop"].set)
        thread.join(STOP_TIMEOUT)
        assert not thread.is_alive(), f"hypercorn did not stop within {STOP_TIMEOUT} s"
        return time.monotonic() - start

    thread.start()
    try:
        assert ready.wait(STARTUP_TIMEOUT), "hypercorn thread did not start"
        if errors:
            raise RuntimeError(f"hypercorn ended during startup: {errors!r}")
        yield Served(port, thread, stop, None, errors)
    finally:
        if thread.is_alive():
            stop()
    assert not errors, f"hypercorn failed: {errors!r}"


@contextlib.contextmanager
def run_server(kind: str, app: Any, **kwargs: Any) -> Iterator[Served]:
    runner = {"uvicorn": run_uvicorn, "hypercorn": run_hypercorn}[kind]
    with runner(app, **kwargs) as served:
        yield served


# -- raw HTTP/1.1 client ----------------------------------------------------------------------
_OPEN_CLIENTS: set[RawHTTP] = set()


async def abort_open_clients() -> None:
    """Aborts the connections of RawHTTP clients a test left open (one that
    failed before its close()), inside the test's own loop: otherwise they
    are collected later, in another test, as unclosed-socket warnings."""
    clients = list(_OPEN_CLIENTS)
    _OPEN_CLIENTS.clear()
    for client in clients:
        client.writer.transport.abort()
    if clients:
        await asyncio.sleep(0)  # abort() closes the socket on the next loop pass


class RawHTTP:
    """One HTTP/1.1 request on its own connection, read with asyncio streams.

    ``body`` accumulates the de-chunked body; ``complete`` becomes True when
    the terminating chunk (or the whole Content-Length body) was read, and
    ``eof`` when the server closed the connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.complete = False
        self.eof = False
        self._chunked = False
        self._length: int | None = None

    @classmethod
    async def request(
        cls,
        port: int,
        target: str,
        headers: dict[str, str] | None = None,
        *,
        method: str = "GET",
        read_head: bool = True,
        limit: int = 2**16,
        rcvbuf: int | None = None,
    ) -> RawHTTP:
        """Connects, sends the request and (unless ``read_head`` is False)
        reads the response head. ``rcvbuf`` sets SO_RCVBUF before connecting
        (a client whose socket fills up after a few KiB)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        self = cls(reader, writer)
        _OPEN_CLIENTS.add(self)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}:{port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if read_head:
            await self.read_head()
        return self

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return ", ".join(values) if values else None

    async def read_head(self) -> None:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        _, status, self.reason = (status_line.split(" ", 2) + [""])[:3]
        self.status = int(status)
        for line in lines:
            name, _, value = line.partition(":")
            self.headers.append((name.strip().lower(), value.strip()))
        encoding = (self.header("transfer-encoding") or "").lower()
        self._chunked = "chunked" in encoding
        length = self.header("content-length")
        self._length = int(length) if length is not None else None
        if not self._chunked and (self._length == 0 or self.status in (204, 304)):
            self.complete = True

    async def read_some(self) -> bytes:
        """The next piece of body (a chunk); b"" once the body is complete or
        the connection ended."""
        if self.complete or self.eof:
            return b""
        if not self._chunked:
            if self._length is None:
                data = await self.reader.read(65536)
                if not data:
                    self.eof = True
            else:
                data = await self.reader.read(self._length - len(self.body))
                if not data:
                    self.eof = True
                elif len(self.body) + len(data) == self._length:
                    self.complete = True
            self.body += data
            return data
        try:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while await self.reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                self.complete = True
                return b""
            data = await self.reader.readexactly(size)
            if await self.reader.readexactly(2) != b"\r\n":
                raise AssertionError("chunk not followed by CRLF")
        except (asyncio.IncompleteReadError, ConnectionResetError):
            self.eof = True
            return b""
        self.body += data
        return data

    async def read_until(self, marker: bytes, timeout: float = 5.0) -> bytes:
        """Reads until ``marker`` is in the body; returns the body so far."""

        async def read() -> None:
            while marker not in self.body:
                if not await self.read_some() and (self.complete or self.eof):
                    raise AssertionError(f"body ended before {marker!r}: {bytes(self.body)!r}")

        await asyncio.wait_for(read(), timeout)
        return bytes(self.body)

    async def read_to_end(self, timeout: float = 5.0) -> bytes:
        """Reads until the body is complete or the connection ended."""

        async def read() -> None:
            while not (self.complete or self.eof):
                await self.read_some()

        await asyncio.wait_for(read(), timeout)
        return bytes(self.body)

    async def read_eof(self, timeout: float = 5.0) -> bytes:
        """Reads whatever else comes until the server closes the connection."""
        rest = await asyncio.wait_for(self.reader.read(), timeout)
        self.eof = True
        return rest

    async def close(self) -> None:
        _OPEN_CLIENTS.discard(self)
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


# -- fixture ------------------------------------------------------------------------------------
@dataclass
class SSE:
    """A notifier, its SSE app and the server running it."""

    notifier: JobNotifier
    app: SSEApp
    served: Served

    @property
    def port(self) -> int:
        return self.served.port

    @property
    def url(self) -> str:
        return self.served.url

    def url_for(self, job_id: str, query: str = "") -> str:
        return self.served.url + events_path(job_id, self.app.prefix) + (f"?{query}" if query else "")

    def path_for(self, job_id: str, query: str = "") -> str:
        return events_path(job_id, self.app.prefix) + (f"?{query}" if query else "")

    def new_job(self, name: str = "job") -> tuple[str, str]:
        """Registers a job with an id unique in the process; (job_id, token)."""
        job_id = f"{name}-{next(_job_numbers)}"
        return job_id, self.notifier.register_job(job_id)

    def assert_idle(self, timeout: float = 5.0) -> None:
        """No stream left open and the notifier's loop hub released (the
        server notices a client's disconnect asynchronously: bounded wait)."""
        eventually_sync(lambda: self.app.open_streams == 0, timeout, "open_streams == 0")
        eventually_sync(lambda: not self.notifier._hubs, timeout, "notifier._hubs empty")


@pytest.fixture
def make_sse(make_notifier: Callable[..., JobNotifier]) -> Iterator[Callable[..., SSE]]:
    """``make_sse(notifier=None, *, server="uvicorn", server_kwargs=None,
    notifier_kwargs=None, **app_kwargs)``: a notifier (from make_notifier
    unless given), ``sse_app(notifier, **app_kwargs)`` and a real server
    running it. Servers are stopped at teardown, which checks that no
    stream and no loop hub was left behind."""
    stack = contextlib.ExitStack()
    made: list[SSE] = []

    def make(
        notifier: JobNotifier | None = None,
        *,
        server: str = "uvicorn",
        server_kwargs: dict[str, Any] | None = None,
        notifier_kwargs: dict[str, Any] | None = None,
        **app_kwargs: Any,
    ) -> SSE:
        if notifier is None:
            notifier = make_notifier(**(notifier_kwargs or {}))
        app = sse_app(notifier, **app_kwargs)
        served = stack.enter_context(run_server(server, app, **(server_kwargs or {})))
        sse = SSE(notifier, app, served)
        made.append(sse)
        return sse

    with stack:
        yield make
        for sse in made:
            sse.assert_idle()
    for sse in made:
        assert sse.app.open_streams == 0, "a stream outlived its server"


@pytest.fixture(scope="module")
def _module_sse() -> Iterator[SSE]:
    notifier = JobNotifier(signing_secret="test-secret")
    app = sse_app(notifier)
    try:
        with run_uvicorn(app) as served:
            yield SSE(notifier, app, served)
    finally:
        notifier.close(0)


@pytest.fixture
def sse(_module_sse: SSE) -> Iterator[SSE]:
    """A default ``sse_app`` on uvicorn shared by a test module (starting a
    server per test costs ~0.2 s); use ``sse.new_job()`` for job ids. After
    each test: no stream left open and the loop hub released."""
    yield _module_sse
    _module_sse.assert_idle()
