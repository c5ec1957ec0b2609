"""The SSE app at the ASGI level (no server): the exact messages it sends
(headers included, no Connection header), the lifespan exchange, websocket
and unknown scopes, end_streams(), and argument validation."""

from __future__ import annotations

import asyncio

import pytest
from sse_support import RETRY, frame, frames

from blueprint_notify import JobEvent, JobNotifier, JobStatus
from blueprint_notify.asgi import SSEApp, sse_app

DONE = JobStatus.COMPLETED
P = JobStatus.PROCESSING


class Client:
    """Drives one ASGI http request: records what the app sends; the
    client 'disconnects' when told to."""

    def __init__(self, app, path: str, headers: dict[str, str] | None = None, method: str = "GET", query: bytes = b"") -> None:
        self.sent: list[dict] = []
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.inbox.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        self.got_body = asyncio.Event()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query,
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        self.task = asyncio.ensure_future(app(scope, self.inbox.get, self._send))

    async def _send(self, message: dict) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body":
            self.got_body.set()

    def disconnect(self) -> None:
        self.inbox.put_nowait({"type": "http.disconnect"})

    @property
    def start(self) -> dict:
        assert self.sent[0]["type"] == "http.response.start"
        return self.sent[0]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    @property
    def finished(self) -> bool:
        return bool(self.sent) and self.sent[-1]["type"] == "http.response.body" and not self.sent[-1].get("more_body", False)

    async def wait_for_body(self, data: bytes, timeout: float = 5) -> None:
        async def wait() -> None:
            while data not in self.body:
                self.got_body.clear()
                await self.got_body.wait()

        await asyncio.wait_for(wait(), timeout)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- exact messages ----------------------------------------------------------------------------------
async def test_stream_messages_exactly(make_notifier) -> None:
    n = make_notifier()
    app = sse_app(n)
    token = n.register_job("j")
    events = [JobEvent(P, progress=1, timestamp=1), JobEvent(DONE, timestamp=2)]
    for e in events:
        n.notify("j", e)
    c = Client(app, "/v1/jobs/j/events", bearer(token))
    await asyncio.wait_for(c.task, 5)
    assert c.start == {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ],
    }
    assert all(m["more_body"] for m in c.sent[1:-1])
    assert c.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert c.body == RETRY + frames(events)
    assert app.open_streams == 0 and not n._hubs


async def test_cors_headers_exactly(make_notifier) -> None:
    n = make_notifier()
    app = sse_app(n, allow_origins=["http://x"])
    token = n.register_job("j")
    n.notify("j", JobEvent(DONE, timestamp=1))
    c = Client(app, "/v1/jobs/j/events", {**bearer(token), "origin": "http://x"})
    await asyncio.wait_for(c.task, 5)
    assert c.start["headers"] == [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-store"),
        (b"x-accel-buffering", b"no"),
        (b"access-control-allow-origin", b"http://x"),
        (b"vary", b"Origin"),
    ]
    pre = Client(app, "/v1/jobs/j/events", {"origin": "http://x"}, method="OPTIONS")
    await asyncio.wait_for(pre.task, 5)
    assert pre.start == {
        "type": "http.response.start",
        "status": 204,
        "headers": [
            (b"access-control-allow-origin", b"http://x"),
            (b"vary", b"Origin"),
            (b"access-control-allow-methods", b"GET"),
            (b"access-control-allow-headers", b"authorization, last-event-id"),
            (b"access-control-max-age", b"600"),
            (b"content-length", b"0"),
            (b"cache-control", b"no-store"),
        ],
    }
    assert pre.sent[1:] == [{"type": "http.response.body", "body": b"", "more_body": False}]


@pytest.mark.parametrize(
    "path, headers, method, status, extra, body",
    [
        ("/x", {}, "GET", 404, [], b'{"error": "not found"}'),
        ("/v1/jobs/j/events", {}, "POST", 405, [(b"allow", b"GET")], b'{"error": "method not allowed"}'),
        ("/v1/jobs/j/events", {}, "GET", 401, [(b"www-authenticate", b"Bearer")], b'{"error": "missing bearer token"}'),
        ("/v1/jobs/j/events", {"authorization": "Bearer t", "last-event-id": "x"}, "GET", 400, [], b'{"error": "invalid Last-Event-ID"}'),
        ("/v1/jobs/j/events", {"authorization": "Bearer t"}, "GET", 403, [], b'{"error": "forbidden"}'),
        ("/v1/jobs/nope/events", {"authorization": "Bearer t"}, "GET", 403, [], b'{"error": "forbidden"}'),
    ],
)
async def test_error_responses_exactly(make_notifier, path, headers, method, status, extra, body) -> None:
    n = make_notifier()
    app = sse_app(n)
    n.register_job("j")
    c = Client(app, path, headers, method=method)
    await asyncio.wait_for(c.task, 5)
    assert c.sent == [
        {
            "type": "http.response.start",
            "status": status,
            "headers": extra
            + [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        },
        {"type": "http.response.body", "body": body, "more_body": False},
    ]
    assert app.open_streams == 0 and not n._hubs


async def test_204_after_the_end_exactly(make_notifier) -> None:
    n = make_notifier()
    app = sse_app(n)
    token = n.register_job("j")
    n.notify("j", JobEvent(DONE, timestamp=1))
    c = Client(app, "/v1/jobs/j/events", {**bearer(token), "last-event-id": "1"})
    await asyncio.wait_for(c.task, 5)
    assert c.sent == [
        {
            "type": "http.response.start",
            "status": 204,
            "headers": [(b"content-length", b"0"), (b"cache-control", b"no-store")],
        },
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]


async def test_max_streams_503_exactly(make_notifier) -> None:
    n = make_notifier()
    app = sse_app(n, max_streams=1)
    token = n.register_job("j")
    first = Client(app, "/v1/jobs/j/events", bearer(token))
    await first.wait_for_body(RETRY)
    second = Client(app, "/v1/jobs/j/events", bearer(token))
    await asyncio.wait_for(second.task, 5)
    assert second.start["status"] == 503
    assert second.start["headers"][0] == (b"retry-after", b"5")
    assert second.body == b'{"error": "too many streams"}'
    first.disconnect()
    await asyncio.wait_for(first.task, 5)
    assert not first.finished  # a client that left gets no more messages
    assert first.body == RETRY
    assert app.open_streams == 0 and not n._hubs


# -- lifespan, other scopes ----------------------------------------------------------------------------
async def test_lifespan_exchange(make_notifier) -> None:
    app = sse_app(make_notifier())
    inbox: asyncio.Queue = asyncio.Queue()
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, 5)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


async def test_lifespan_shutdown_ends_open_streams(make_notifier) -> None:
    n = make_notifier()
    app = sse_app(n)
    token = n.register_job("j")
    n.notify("j", JobEvent(P, timestamp=1))
    streams = [Client(app, "/v1/jobs/j/events", bearer(token)) for _ in range(3)]
    for c in streams:
        await c.wait_for_body(RETRY + frame(1, JobEvent(P, timestamp=1)))
    assert app.open_streams == 3
    inbox: asyncio.Queue = asyncio.Queue()
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    for message in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
        inbox.put_nowait(message)
    await asyncio.wait_for(app({"type": "lifespan"}, inbox.get, send), 5)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    await asyncio.wait_for(asyncio.gather(*(c.task for c in streams)), 5)
    for c in streams:
        assert c.finished
        assert c.body == RETRY + frame(1, JobEvent(P, timestamp=1))
    assert app.open_streams == 0 and not n._hubs
    # New streams are still served after end_streams().
    n.notify("j", JobEvent(DONE, timestamp=2))
    c = Client(app, "/v1/jobs/j/events", bearer(token))
    await asyncio.wait_for(c.task, 5)
    assert c.body == RETRY + frames([JobEvent(P, timestamp=1), JobEvent(DONE, timestamp=2)])


async def test_end_streams(make_notifier) -> None:
    n = make_notifier()
    app = sse_app(n)
    token = n.register_job("j")
    c = Client(app, "/v1/jobs/j/events", bearer(token))
    await c.wait_for_body(RETRY)
    app.end_streams()
    await asyncio.wait_for(c.task, 5)
    assert c.finished and c.body == RETRY


async def test_websocket_scope_is_refused(make_notifier) -> None:
    app = sse_app(make_notifier())
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/jobs/j/events", "headers": [], "query_string": b""}
    await asyncio.wait_for(app(scope, receive, send), 5)
    assert sent == [{"type": "websocket.close", "code": 1003}]


async def test_unknown_scope_type_is_ignored(make_notifier) -> None:
    app = sse_app(make_notifier())
    sent: list[dict] = []

    async def receive() -> dict:
        raise AssertionError("not expected")

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app({"type": "something-else"}, receive, send), 5)
    assert sent == []


# -- arguments -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"ping_interval": 0},
        {"ping_interval": -1},
        {"ping_interval": True},
        {"ping_interval": "15"},
        {"send_timeout": 0},
        {"max_stream_secs": 0},
        {"max_stream_secs": -5.0},
        {"retry_ms": -1},
        {"retry_ms": 1.5},
        {"retry_ms": True},
        {"max_streams": 0},
        {"max_streams": True},
        {"max_streams": 2.0},
        {"prefix": "v1/jobs"},
        {"prefix": "/v1/jobs/"},
        {"prefix": ""},
    ],
)
def test_invalid_arguments(make_notifier, kwargs) -> None:
    with pytest.raises(ValueError):
        sse_app(make_notifier(), **kwargs)


def test_valid_arguments_and_type(make_notifier) -> None:
    n = make_notifier()
    app = sse_app(
        n, ping_interval=0.5, retry_ms=0, send_timeout=1, max_stream_secs=None, max_streams=None, prefix="/a", allow_origins=iter(["http://x"])
    )
    assert isinstance(app, SSEApp)
    assert (app.ping_interval, app.retry_ms, app.prefix, app.allow_origins) == (0.5, 0, "/a", frozenset({"http://x"}))
    assert app.open_streams == 0
    with pytest.raises(TypeError):
        sse_app(object())  # type: ignore[arg-type]
    assert isinstance(n, JobNotifier)


async def test_allow_origins_as_a_string_is_not_silently_ignored(make_notifier) -> None:
    n = make_notifier()
    try:
        app = sse_app(n, allow_origins="http://x")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return  # refused loudly: fine
    token = n.register_job("j")
    n.notify("j", JobEvent(DONE, timestamp=1))
    c = Client(app, "/v1/jobs/j/events", {**bearer(token), "origin": "http://x"})
    await asyncio.wait_for(c.task, 5)
    assert (b"access-control-allow-origin", b"http://x") in c.start["headers"]
