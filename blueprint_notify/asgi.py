"""Server-Sent Events over ASGI: ``GET {prefix}/{job_id}/events``.

A pure ASGI 3 application (no framework dependency)::

    from blueprint_notify.asgi import sse_app
    app = sse_app(notifier)            # or Mount("/", app=...) / app.mount("/", ...)

Authentication: the job's bearer token (``JobNotifier.register_job``) from
``Authorization: Bearer <token>`` or ``?token=<token>`` (``EventSource`` cannot
send headers). Resume: ``Last-Event-ID`` (header, or ``?last_event_id=``)
replays exactly the retained events after that id.

Frames are rendered once in C when the event is published; a stream copies
them out in batches and sends them as they are.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from ._broker import BrokerError
from ._notifier import JobNotifier

__all__ = ["sse_app", "SSEApp", "listening_socket"]

logger = logging.getLogger("blueprint_notify")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_PULL_BATCH = 256
# One send holds at most this much (or one frame): send_timeout then bounds
# the time a client takes to read 64 KiB, so a client that reads steadily
# but slowly is not cut off because a burst of events went out as one send.
_PULL_BYTES = 64 << 10
_FROM_OLDEST = -2
_PING = b": ping\n\n"
_NO_HEADERS: tuple[tuple[bytes, bytes], ...] = ()
_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+
_MAX_TICK = 0.25
_MAX_SECONDS = 366 * 86_400.0  # a year: time options above it are mistakes

_live_apps: weakref.WeakSet[SSEApp] = weakref.WeakSet()


def sse_app(
    notifier: JobNotifier,
    *,
    ping_interval: float = 15.0,
    retry_ms: int = 3000,
    send_timeout: float = 30.0,
    max_stream_secs: float | None = None,
    max_streams: int | None = None,
    prefix: str = "/v1/jobs",
    allow_origins: Iterable[str] = (),
) -> SSEApp:
    """Returns the ASGI app serving ``GET {prefix}/{job_id}/events``.

    - ``ping_interval``: seconds between ``: ping`` comments on an idle stream
      (a ping, like the end of ``max_stream_secs``, may come up to
      ``ping_interval / 20``, at most 0.25 s, late: one timer per event loop
      serves every stream).
    - ``retry_ms``: the reconnection delay sent to clients (``retry:`` field).
    - ``send_timeout``: a client that does not take a frame (or 64 KiB of
      frames: sends are no bigger unless one frame is) within this many
      seconds is cut off.
    - ``max_stream_secs``: end a stream after this long (clients reconnect with
      ``Last-Event-ID``; spreads reconnects, bounds proxies' idle timeouts).
    - ``max_streams``: concurrent streams at most; beyond, 503.
    - ``allow_origins``: origins allowed to read streams cross-origin (CORS);
      ``"*"`` allows any.
    """
    return SSEApp(
        notifier,
        ping_interval=ping_interval,
        retry_ms=retry_ms,
        send_timeout=send_timeout,
        max_stream_secs=max_stream_secs,
        max_streams=max_streams,
        prefix=prefix,
        allow_origins=allow_origins,
    )


def listening_socket(
    host: str = "127.0.0.1", port: int = 0, *, backlog: int = 2048, user_timeout: float | None = 30.0
) -> socket.socket:
    """A listening TCP socket to serve an SSE app from, e.g.
    ``uvicorn.Server(uvicorn.Config(app)).run(sockets=[sock])`` or
    ``uvicorn.run(app, fd=sock.fileno())``.

    ``user_timeout`` (seconds; Linux ``TCP_USER_TIMEOUT``, inherited by every
    accepted connection) closes a connection whose sent data stays
    unacknowledged that long. It frees what ``send_timeout`` cannot: when a
    client stops reading, the app cuts its stream off, but the server then
    closes the connection gracefully, waiting to flush what is queued, so a
    client that stays connected without reading would keep its socket and
    its queued bytes (~70 KB) for as long as it likes. None leaves the
    system default (many minutes)."""
    if user_timeout is not None and (isinstance(user_timeout, bool) or not user_timeout > 0):
        raise ValueError(f"user_timeout must be a positive number of seconds or None, got {user_timeout!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if user_timeout is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(user_timeout * 1000)))
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= _MAX_SECONDS:
        raise ValueError(f"{name} must be a positive number of seconds, at most {_MAX_SECONDS:g}, got {value!r}")


class SSEApp:
    """The ASGI application returned by :func:`sse_app`."""

    def __init__(
        self,
        notifier: JobNotifier,
        *,
        ping_interval: float,
        retry_ms: int,
        send_timeout: float,
        max_stream_secs: float | None,
        max_streams: int | None,
        prefix: str,
        allow_origins: Iterable[str],
    ) -> None:
        if not isinstance(notifier, JobNotifier):
            raise TypeError(f"notifier must be a JobNotifier, not {type(notifier).__name__}")
        _positive("ping_interval", ping_interval)
        _positive("send_timeout", send_timeout)
        _positive("max_stream_secs", max_stream_secs, allow_none=True)
        if isinstance(retry_ms, bool) or not isinstance(retry_ms, int) or retry_ms < 0:
            raise ValueError(f"retry_ms must be a non-negative int, got {retry_ms!r}")
        if max_streams is not None and (isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 1):
            raise ValueError(f"max_streams must be a positive int or None, got {max_streams!r}")
        if isinstance(allow_origins, (str, bytes)) or not isinstance(allow_origins, Iterable):
            raise TypeError(
                "allow_origins must be a collection of origins, e.g. ['https://app.example'], "
                f"not {type(allow_origins).__name__}"
            )
        allow_origins = list(allow_origins)
        if not all(isinstance(o, str) for o in allow_origins):
            raise TypeError("allow_origins must hold str origins")
        if not isinstance(prefix, str) or not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"prefix must start with '/' and not end with one, got {prefix!r}")
        self.notifier = notifier
        self.ping_interval = float(ping_interval)
        self.retry_ms = retry_ms
        self.send_timeout = float(send_timeout)
        self.max_stream_secs = max_stream_secs
        self.max_streams = max_streams
        self.prefix = prefix
        self.allow_origins = frozenset(allow_origins)
        self._streams: set[_Stream] = set()
        self._tickers: dict[asyncio.AbstractEventLoop, _Ticker] = {}
        # Pings and max_stream_secs are at most a tick late.
        self._tick = min(_MAX_TICK, self.ping_interval / 20, (max_stream_secs or _MAX_TICK) / 20)
        _live_apps.add(self)
        _hook_uvicorn_shutdown()

    @property
    def open_streams(self) -> int:
        """Streams being served now."""
        return len(self._streams)

    def end_streams(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Ends every open stream (server shutdown), or only those served on
        ``loop``; new ones are still served. Any thread."""
        for stream in list(self._streams):
            if loop is None or stream.loop is loop:
                stream.end()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        # The request is parsed in a frame of its own: nothing of it (headers
        # dict, query) stays alive for the life of the stream.
        stream = await self._accept(scope, send)
        if stream is not None:
            await stream.run(receive, send)

    async def _accept(self, scope: Scope, send: Send) -> _Stream | None:
        """Routes and checks the request; the stream to serve, or None once
        an error response was sent."""
        job_id = self._route(scope)
        if job_id is None:
            await _respond(send, 404, {"error": "not found"})
            return None
        headers = _headers(scope)
        cors = self._cors_headers(headers)
        method = scope["method"]
        if method == "OPTIONS" and cors:
            await _respond(
                send,
                204,
                None,
                cors
                + [
                    (b"access-control-allow-methods", b"GET"),
                    (b"access-control-allow-headers", b"authorization, last-event-id"),
                    (b"access-control-max-age", b"600"),
                ],
            )
            return None
        if method != "GET":
            await _respond(send, 405, {"error": "method not allowed"}, [(b"allow", b"GET")] + cors)
            return None
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        token = _bearer(headers.get("authorization")) or _first(query.get("token"))
        if not token:
            await _respond(
                send, 401, {"error": "missing bearer token"}, [(b"www-authenticate", b"Bearer")] + cors
            )
            return None
        raw_id = headers.get("last-event-id") or _first(query.get("last_event_id"))
        after = _FROM_OLDEST
        if raw_id:
            raw_id = raw_id.strip(" \t")  # HTTP's whitespace only, not Unicode's
            # ASCII digits only (str.isdigit accepts '²' and '١'), below 2**63.
            if not (raw_id.isascii() and raw_id.isdigit() and len(raw_id) <= 19 and int(raw_id) < 2**63):
                await _respond(send, 400, {"error": "invalid Last-Event-ID"}, cors)
                return None
            after = int(raw_id)
        if self.max_streams is not None and len(self._streams) >= self.max_streams:
            await _respond(send, 503, {"error": "too many streams"}, [(b"retry-after", b"5")] + cors)
            return None
        _hook_uvicorn_shutdown()
        return _Stream(self, job_id, token, after, cors)

    def _ticker(self, loop: asyncio.AbstractEventLoop) -> _Ticker:
        ticker = self._tickers.get(loop)
        if ticker is None:
            ticker = self._tickers[loop] = _Ticker(self, loop)
        return ticker

    # -- helpers ---------------------------------------------------------------
    def _route(self, scope: Scope) -> str | None:
        path: str = scope["path"]
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root) :]
        head, tail = self.prefix + "/", "/events"
        if not (path.startswith(head) and path.endswith(tail)):
            return None
        job_id = path[len(head) : -len(tail)]
        return job_id or None

    def _cors_headers(self, headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
        origin = headers.get("origin")
        if not origin or not self.allow_origins:
            return []
        if "*" in self.allow_origins:
            return [(b"access-control-allow-origin", b"*")]
        if origin in self.allow_origins:
            return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        return []

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.end_streams(asyncio.get_running_loop())
                await send({"type": "lifespan.shutdown.complete"})
                return


class _Stream:
    """One client's event stream.

    An idle stream holds little: this object, one coroutine (``run``), a
    subscriber, one future (``ready``), a place in its loop's ``_Ticker``
    (the next ping or the end of ``max_stream_secs``; kept, not moved, when
    an event is sent) and a task awaiting the server's ``receive()``
    (``http.disconnect``). ``ready`` is completed by whatever needs the
    stream: an event (``on_ready`` from the loop's waker), the ticker, the
    client leaving, or ``end()``.
    """

    __slots__ = (
        "app", "job_id", "token", "after", "cors", "loop", "ready", "ended",
        "slot", "ping_at", "receive", "listener", "disconnected",
    )  # fmt: skip

    def __init__(self, app: SSEApp, job_id: str, token: str, after: int, cors: list[tuple[bytes, bytes]]) -> None:
        self.app = app
        self.job_id = job_id
        self.token: str | None = token
        self.after = after
        self.cors = cors or _NO_HEADERS
        self.loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] | None = None
        self.ended = False
        self.slot: int | None = None  # in the loop's _Ticker, while there
        self.ping_at = 0.0
        self.receive: Receive | None = None
        self.listener: asyncio.Future[Message] | None = None
        self.disconnected = False

    def _wake(self) -> None:
        ready = self.ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    def _on_tick(self) -> None:
        self.slot = None
        self._wake()

    def _listen(self) -> None:
        """Awaits the next request message in a task of its own (the
        stream's task waits for events meanwhile)."""
        assert self.receive is not None
        self.listener = listener = asyncio.ensure_future(self.receive())
        listener.add_done_callback(self._on_message)

    def _on_message(self, listener: asyncio.Future[Message]) -> None:
        if listener is not self.listener or listener.cancelled():
            return  # the stream is over
        if listener.exception() is None and listener.result()["type"] != "http.disconnect":
            self._listen()  # the request's body: not ours to read, go on
            return
        # http.disconnect, or the server's receive() failed: the client is gone.
        self.disconnected = True
        self._wake()

    def end(self) -> None:
        """Ends the stream; any thread."""
        self.ended = True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._wake()
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake)

    async def run(self, receive: Receive, send: Send) -> None:
        app = self.app
        notifier = app.notifier
        loop = self.loop
        hub = notifier._hub_for(loop)
        hub.acquire()
        sub = None
        broker = notifier._broker
        attached = False
        try:
            token: str | None
            token, self.token = self.token, None
            if broker is not None:
                # The token may be another process's (Redis); then the job's
                # history comes from Redis into the local channel before
                # the cursor is placed.
                try:
                    ok = await notifier.validate_job_token_async(self.job_id, token or "")
                    if ok:
                        await broker.attach_async(self.job_id)
                        attached = True
                except BrokerError:
                    await _respond(send, 503, {"error": "broker unavailable"}, [(b"retry-after", b"5"), *self.cors])
                    return
                except ValueError:
                    ok = False
                if not ok:
                    await _respond(send, 403, {"error": "forbidden"}, list(self.cors))
                    return
                token = None  # checked
            try:
                # The subscriber holds _wake (and so this stream) strongly;
                # only this frame holds the subscriber, and closes it.
                sub = notifier._engine.subscribe(self.job_id, hub.waker, self._wake, token, self.after)
            except (PermissionError, ValueError):
                await _respond(send, 403, {"error": "forbidden"}, list(self.cors))
                return
            except RuntimeError:  # notifier closed (ChannelLimitError cannot happen here)
                await _respond(send, 503, {"error": "notifier closed"}, [(b"retry-after", b"5"), *self.cors])
                return
            del token
            frames, skipped, ended, _ = sub.pull_frames(_PULL_BATCH, _PULL_BYTES)
            if ended and not frames and not skipped:
                # Resumed after the terminal event: nothing will ever follow.
                # 204 tells EventSource to stop reconnecting.
                await _respond(send, 204, None, list(self.cors))
                return
            app._streams.add(self)
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-store"),
                            (b"x-accel-buffering", b"no"),
                            *self.cors,
                        ],
                    }
                )
                out = b"retry: %d\n\n" % app.retry_ms
                self.receive = receive
                self._listen()
                ping_interval = app.ping_interval
                deadline = None if app.max_stream_secs is None else time.monotonic() + app.max_stream_secs
                while True:
                    if skipped:
                        out += b'event: error\ndata: {"error":"lagged","skipped":%d}\n\n' % skipped
                    out += frames
                    if out:
                        if not await self._send(send, out):
                            return
                        out = b""
                        self.ping_at = time.monotonic() + ping_interval
                    if ended or self.ended:
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        break  # a busy stream ends on time too
                    # Pull after every send: a wake-up during it found no waiter.
                    frames, skipped, ended, _ = sub.pull_frames(_PULL_BATCH, _PULL_BYTES)
                    if frames or skipped or ended:
                        continue
                    # Idle: wait for events, a ping, the deadline or the client.
                    due = self.ping_at if deadline is None else min(self.ping_at, deadline)
                    now = time.monotonic()
                    if now < due:
                        if self.slot is None:
                            # For the earliest thing due. A slot taken before
                            # a send moved the ping wakes the stream once for
                            # nothing, and it takes a new one.
                            self.slot = app._ticker(loop).add(self, due)
                        self.ready = ready = loop.create_future()
                        try:
                            await ready
                        finally:
                            self.ready = None
                        if self.disconnected:
                            return
                        if self.ended:
                            break
                        now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        break
                    frames, skipped, ended, _ = sub.pull_frames(_PULL_BATCH, _PULL_BYTES)
                    if now >= self.ping_at and not (frames or skipped or ended):
                        out = _PING
                # The last write too is bounded: a client that stopped
                # reading before its job ended is cut off like any other.
                await self._send(send, b"", more=False)
            finally:
                app._streams.discard(self)
                if self.slot is not None:
                    self.slot = None
                    app._ticker(loop).leave()
                listener, self.listener = self.listener, None
                if listener is not None:
                    listener.cancel()
                self.receive = None
        finally:
            if sub is not None:
                sub.close()
            if attached:
                broker.detach(self.job_id)
            hub.release()

    async def _send(self, send: Send, body: bytes, *, more: bool = True) -> bool:
        """Sends a chunk (``more=False``: the end of the response); False if
        the client left or did not take it within send_timeout (then the
        stream is abandoned)."""
        if self.disconnected:
            return False
        message = {"type": "http.response.body", "body": body, "more_body": more}
        try:
            if _timeout is not None:
                # No task per send (wait_for makes one before Python 3.12).
                async with _timeout(self.app.send_timeout):
                    await send(message)
            else:
                await asyncio.wait_for(send(message), self.app.send_timeout)
        except asyncio.TimeoutError:
            logger.warning("SSE client of job %r too slow (send_timeout); stream cut off", self.job_id)
            return False
        except OSError:  # the server says the client is gone
            return False
        return True


class _Ticker:
    """The one timer of an app's streams on one event loop. A stream that
    goes idle takes a slot: its next ping (or end of ``max_stream_secs``)
    rounded up to a tick; the loop timer is armed for the earliest slot and
    wakes the streams still in it. Leaving a slot is O(1) (the stream
    forgets it; the slot's list drops it when it fires). Used on the loop's
    thread only; dropped when no stream holds a slot."""

    __slots__ = ("app", "loop", "tick", "slots", "count", "handle", "armed")

    def __init__(self, app: SSEApp, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop
        self.tick = app._tick
        self.slots: dict[int, list[_Stream]] = {}
        self.count = 0  # streams holding a slot
        self.handle: asyncio.TimerHandle | None = None
        self.armed = 0

    def add(self, stream: _Stream, due: float) -> int:
        slot = math.ceil(due / self.tick)
        members = self.slots.get(slot)
        if members is None:
            self.slots[slot] = [stream]
        else:
            members.append(stream)
        self.count += 1
        if self.handle is None or slot < self.armed:
            self._arm(slot, time.monotonic())
        return slot

    def leave(self) -> None:
        """A stream gave its slot up (and set its ``slot`` to None)."""
        self.count -= 1
        if not self.count:
            self._drop()

    def _arm(self, slot: int, now: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.armed = slot
        self.handle = self.loop.call_later(max(0.0, slot * self.tick - now), self._fire)

    def _drop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.slots.clear()
        if self.app._tickers.get(self.loop) is self:
            del self.app._tickers[self.loop]

    def _fire(self) -> None:
        self.handle = None
        now = time.monotonic()
        for slot in sorted(s for s in self.slots if s * self.tick <= now):
            for stream in self.slots.pop(slot):
                if stream.slot == slot:
                    self.count -= 1
                    stream._on_tick()
        if not self.count:
            self._drop()
        elif self.slots:
            self._arm(min(self.slots), now)  # also when the loop woke us early


async def _wait_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (used by the demo's feed)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _respond(
    send: Send, status: int, body: dict[str, Any] | None, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = b"" if body is None else json.dumps(body).encode()
    hdrs = list(headers or [])
    if body is not None:
        hdrs.append((b"content-type", b"application/json"))
    hdrs.append((b"content-length", str(len(data)).encode()))
    hdrs.append((b"cache-control", b"no-store"))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _first(values: list[str] | None) -> str | None:
    return values[0] if values else None


def _hook_uvicorn_shutdown() -> None:
    """uvicorn waits for open responses before shutting down, and an SSE
    stream never ends by itself: end our streams when a uvicorn server starts
    shutting down (signal or ``should_exit``)."""
    module = sys.modules.get("uvicorn.server")
    server = getattr(module, "Server", None)
    if server is None or getattr(server.shutdown, "_bpn_hook", False):
        return
    original = server.shutdown

    async def shutdown(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Only this server's streams: they run on the loop shutting down.
        loop = asyncio.get_running_loop()
        for app in list(_live_apps):
            app.end_streams(loop)
        return await original(self, *args, **kwargs)

    shutdown._bpn_hook = True  # type: ignore[attr-defined]
    server.shutdown = shutdown
