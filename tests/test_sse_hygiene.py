"""Resource hygiene of the SSE endpoint on real servers: client disconnects
free the subscriber at once, a client that stops reading is cut off after
send_timeout, max_stream_secs ends streams, server shutdown and notifier
close end open streams promptly, and a wake-up is not lost while a frame is
being sent."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import httpx
import pytest
from sse_support import (  # noqa: F401  (make_sse: fixture)
    HOST,
    RETRY,
    RawHTTP,
    eventually,
    frame,
    frames,
    make_sse,
    run_hypercorn,
    run_uvicorn,
)

from blueprint_notify import JobEvent, JobStatus
from blueprint_notify.asgi import sse_app

DONE = JobStatus.COMPLETED
P = JobStatus.PROCESSING


def bearer(token: str, last_event_id: int | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    return headers


def progress(i: int) -> JobEvent:
    return JobEvent(P, progress=i, timestamp=1_700_000_000 + i)


# -- disconnects ---------------------------------------------------------------------------------
async def test_disconnect_frees_the_subscriber_at_once(make_sse) -> None:
    sse = make_sse()
    n = sse.notifier
    job, token = sse.new_job()
    n.notify(job, progress(1))
    clients = [httpx.AsyncClient(trust_env=False, timeout=5) for _ in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        streams = []
        for c in clients:
            await stack.enter_async_context(c)
            r = await stack.enter_async_context(c.stream("GET", sse.url_for(job), headers=bearer(token)))
            chunks = r.aiter_raw()
            got = b""
            while not got.endswith(frame(1, progress(1))):
                got += await anext(chunks)
            assert got == RETRY + frame(1, progress(1))
            streams.append((r, chunks))
        assert sse.app.open_streams == 3
        assert len(n._hubs) == 1  # one waker for the server's loop, shared
        for expected_left, (r, chunks) in zip((2, 1, 0), streams):
            await chunks.aclose()
            await r.aclose()  # the client hangs up mid-stream
            took = await eventually(lambda: sse.app.open_streams == expected_left, 2, "stream released")
            assert took < 1.0
    await eventually(lambda: not n._hubs, 2, "loop hub released")
    # The job is unaffected: events still go to new subscribers.
    n.notify(job, JobEvent(DONE, timestamp=2))
    raw = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token))
    assert await raw.read_to_end() == RETRY + frames([progress(1), JobEvent(DONE, timestamp=2)])
    await raw.close()


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_reset_connection_frees_the_subscriber(make_sse, server) -> None:
    sse = make_sse(server=server)
    job, token = sse.new_job()
    raws = [await RawHTTP.request(sse.port, sse.path_for(job), bearer(token)) for _ in range(5)]
    for raw in raws:
        await raw.read_until(RETRY)
    assert sse.app.open_streams == 5
    for raw in raws:
        sock = raw.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.writer.transport.abort()  # RST, no FIN
    await eventually(lambda: sse.app.open_streams == 0, 2, "streams released")
    await eventually(lambda: not sse.notifier._hubs, 2, "loop hub released")


# -- slow clients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_client_that_stops_reading_is_cut_off_after_send_timeout(make_sse, server) -> None:
    # uvicorn's send() returns once the data is queued in the transport and
    # waits for the client on the *next* send: the stall shows at the next
    # frame or ping, which then times out after send_timeout. (hypercorn
    # waits in the send that does not fit.)
    send_timeout, ping_interval = 0.5, 0.2
    sse = make_sse(
        server=server,
        send_timeout=send_timeout,
        ping_interval=ping_interval,
        server_kwargs={"sndbuf": 8192},
        notifier_kwargs={"sse_capacity": 64},
    )
    n = sse.notifier
    job, token = sse.new_job()
    # A backlog far larger than every buffer on the way (server socket 16 KiB,
    # client socket ~16 KiB): 8 x 512 KiB.
    backlog = [JobEvent(P, progress=i, result="x" * (512 << 10), timestamp=i) for i in range(8)]
    for e in backlog:
        n.notify(job, e)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(5)
        client.connect((HOST, sse.port))
        client.sendall(
            f"GET {sse.path_for(job)} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        # ... and never reads.
        await eventually(lambda: sse.app.open_streams == 1, 2, "stream opened")
        opened = time.monotonic()
        await eventually(lambda: sse.app.open_streams == 0, send_timeout + 3, "slow client cut off")
        took = time.monotonic() - opened
        assert send_timeout - 0.05 <= took < send_timeout + ping_interval + 2, took
        await eventually(lambda: not n._hubs, 2, "loop hub released")
        # The client then finds what was queued before the stall (the first
        # send: the retry: field and the first frame, as a send holds 64 KiB
        # or one frame), no terminating chunk, and the connection closed: an
        # EventSource reconnects with Last-Event-ID.
        received = bytearray()
        while chunk := await asyncio.to_thread(client.recv, 1 << 20):
            received += chunk
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        payload = RETRY + frames(backlog[:1])
        assert body == b"%x\r\n" % len(payload) + payload + b"\r\n"
    finally:
        client.close()


async def test_blocked_stream_is_freed_when_the_client_leaves(make_sse) -> None:
    # A client that stopped reading (the stream is stuck in send) and then
    # goes away is noticed at once, not after send_timeout.
    sse = make_sse(send_timeout=30, server_kwargs={"sndbuf": 8192}, notifier_kwargs={"sse_capacity": 64})
    job, token = sse.new_job()
    for i in range(8):
        sse.notifier.notify(job, JobEvent(P, result="z" * (512 << 10), timestamp=i))
    raw = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token), rcvbuf=4096, read_head=False)
    try:
        await eventually(lambda: sse.app.open_streams == 1, 2, "stream opened")
        sse.notifier.notify(job, progress(1))  # the next send waits for the client
    finally:
        raw.writer.transport.abort()
    took = await eventually(lambda: sse.app.open_streams == 0, 3, "stream released")
    assert took < 2
    await eventually(lambda: not sse.notifier._hubs, 2, "loop hub released")


async def test_client_that_reads_is_not_cut_off(make_sse) -> None:
    """send_timeout bounds each send, not the stream, and a send is at most
    64 KiB or one frame: a client that keeps reading at ~300 KiB/s gets a
    768 KiB burst whole, though the burst takes longer than send_timeout.
    (Before the byte bound most of the burst went out as one send, and the
    next send, which waits for that one to drain, was cut off.)"""
    send_timeout = 1.5
    sse = make_sse(send_timeout=send_timeout, server_kwargs={"sndbuf": 8192})
    job, token = sse.new_job()
    events = [JobEvent(P, result="y" * (128 << 10), timestamp=i) for i in range(6)] + [JobEvent(DONE, timestamp=9)]
    raw = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token), rcvbuf=16 << 10)
    started = time.monotonic()
    for e in events:
        sse.notifier.notify(job, e)
    wire = bytearray()
    while not wire.endswith(b"\r\n0\r\n\r\n"):
        piece = await raw.reader.read(16 << 10)
        assert piece, "the server ended the stream early"
        wire += piece
        await asyncio.sleep(0.05)  # a slow reader (pacing), not a wait for work
    took = time.monotonic() - started
    decoded = asyncio.StreamReader()
    decoded.feed_data(bytes(wire))
    decoded.feed_eof()
    raw.reader = decoded
    assert await raw.read_to_end() == RETRY + frames(events)
    assert raw.complete
    assert took > send_timeout, "the burst must outlast send_timeout for this test to mean anything"
    await raw.close()


def test_pull_frames_stops_at_the_byte_bound() -> None:
    """What the stream's sends are made of: up to max events, and no more
    once they hold max_bytes (one event at least, however big)."""
    from blueprint_notify import _core

    PROCESSING = 1  # the core's status code (JobStatus order)
    engine = _core.Engine(signing_secret=b"s")
    waker = _core.Waker(engine, lambda: None)
    sub = engine.subscribe("job", waker, lambda: None, None, 0)
    try:
        for size in (10, 10, 100_000, 10, 10, 10):
            engine.notify("job", PROCESSING, b'{"r":"%s"}' % (b"x" * size), None)
        sizes = []
        while True:
            frames, skipped, ended, _ = sub.pull_frames(4, 60)
            if not frames:
                break
            sizes.append(frames.count(b"\n\n"))
            assert skipped == 0 and not ended
        # Small frames are ~50 bytes: two reach 60 bytes; the big one goes
        # alone; the count bound (4) is never reached.
        assert sizes == [2, 1, 2, 1], sizes
    finally:
        sub.close()
        engine.close(0)


# -- stream lifetime -----------------------------------------------------------------------------------
async def test_max_stream_secs_ends_the_stream_and_resume_continues(make_sse) -> None:
    lifetime = 0.3
    sse = make_sse(max_stream_secs=lifetime, ping_interval=0.1)
    job, token = sse.new_job()
    sse.notifier.notify(job, progress(1))
    start = time.monotonic()
    raw = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token))
    body = await raw.read_to_end(timeout=lifetime + 3)
    took = time.monotonic() - start
    await raw.close()
    assert raw.complete  # ended properly, not dropped
    assert lifetime - 0.05 <= took < lifetime + 1.5, took
    head = RETRY + frame(1, progress(1))
    assert body.startswith(head)
    assert set(body[len(head) :].split(b"\n\n")) <= {b": ping", b""}  # only pings after it
    # The client reconnects with the last id it saw and goes on.
    raw = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token, 1))
    await raw.read_until(RETRY)
    sse.notifier.notify(job, JobEvent(DONE, timestamp=2))
    assert await raw.read_to_end() == RETRY + frame(2, JobEvent(DONE, timestamp=2))
    await raw.close()


# -- shutdown ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lifespan", ["on", "off"])
async def test_uvicorn_shutdown_ends_open_streams_promptly(make_notifier, lifespan) -> None:
    n = make_notifier()
    app = sse_app(n)
    jobs = [(f"shutdown-{lifespan}-{i}", None) for i in range(4)]
    jobs = [(job, n.register_job(job)) for job, _ in jobs]
    for job, _ in jobs:
        n.notify(job, progress(1))
    # No graceful-shutdown timeout: only the app ending its streams lets uvicorn stop.
    with run_uvicorn(app, lifespan=lifespan, timeout_graceful_shutdown=None) as served:
        raws = []
        for job, token in jobs:
            raw = await RawHTTP.request(served.port, f"/v1/jobs/{job}/events", bearer(token))
            await raw.read_until(RETRY + frame(1, progress(1)))
            raws.append(raw)
        assert app.open_streams == 4
        took, *bodies = await asyncio.gather(
            asyncio.to_thread(served.stop), *(raw.read_to_end(timeout=5) for raw in raws)
        )
        assert took < 2.0, f"uvicorn took {took:.2f} s to stop"
    for raw, body in zip(raws, bodies):
        assert raw.complete, "stream dropped instead of ended"
        assert body == RETRY + frame(1, progress(1))
        assert await raw.read_eof() == b""  # then the connection is closed
        await raw.close()
    assert app.open_streams == 0
    assert not n._hubs


async def _open_hypercorn_streams(served, n, count: int) -> list[RawHTTP]:
    raws = []
    for i in range(count):
        job = f"hc-{served.port}-{i}"
        token = n.register_job(job)
        n.notify(job, progress(1))
        raw = await RawHTTP.request(served.port, f"/v1/jobs/{job}/events", bearer(token))
        await raw.read_until(RETRY + frame(1, progress(1)))
        raws.append(raw)
    return raws


async def test_hypercorn_shutdown_with_end_streams_in_the_trigger(make_notifier) -> None:
    # The workaround for hypercorn (which tells the app nothing until its
    # graceful_timeout has passed): end the streams in the shutdown trigger.
    n = make_notifier()
    app = sse_app(n)
    with run_hypercorn(app, graceful_timeout=5, on_shutdown=app.end_streams) as served:
        raws = await _open_hypercorn_streams(served, n, 3)
        took, *bodies = await asyncio.gather(
            asyncio.to_thread(served.stop), *(raw.read_to_end(timeout=5) for raw in raws)
        )
    try:
        assert took < 2.0
        for raw, body in zip(raws, bodies):
            assert raw.complete and body == RETRY + frame(1, progress(1))
    finally:
        for raw in raws:
            await raw.close()
    assert app.open_streams == 0


@pytest.mark.xfail(
    strict=True,
    reason="KNOWN LIMITATION: under hypercorn, shutdown with open streams waits graceful_timeout "
    "and then cancels them (stream cut without the terminating chunk): hypercorn gives the app no "
    "signal before its graceful wait. Workaround (README): a shutdown_trigger that calls "
    "app.end_streams(); see the passing test below",
)
async def test_hypercorn_shutdown_ends_open_streams_promptly(make_notifier) -> None:
    n = make_notifier()
    app = sse_app(n)
    with run_hypercorn(app, graceful_timeout=1.0) as served:
        raws = await _open_hypercorn_streams(served, n, 2)
        took, *bodies = await asyncio.gather(
            asyncio.to_thread(served.stop), *(raw.read_to_end(timeout=5) for raw in raws)
        )
    try:
        for raw, body in zip(raws, bodies):
            assert raw.complete, "stream dropped instead of ended"
            assert body == RETRY + frame(1, progress(1))
        assert took < 0.9, f"hypercorn took {took:.2f} s to stop"
    finally:
        for raw in raws:
            await raw.close()


async def test_notifier_close_ends_streams_then_503(make_sse) -> None:
    sse = make_sse()
    n = sse.notifier
    job, token = sse.new_job()
    n.notify(job, progress(1))
    raws = [await RawHTTP.request(sse.port, sse.path_for(job), bearer(token)) for _ in range(3)]
    for raw in raws:
        await raw.read_until(RETRY + frame(1, progress(1)))
    n.close(timeout=0)
    for raw in raws:
        assert await raw.read_to_end() == RETRY + frame(1, progress(1))
        assert raw.complete
        await raw.close()
    await eventually(lambda: sse.app.open_streams == 0, 2, "streams ended")
    async with httpx.AsyncClient(trust_env=False, timeout=5) as c:
        r = await c.get(sse.url_for(job), headers=bearer(token))
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        assert r.content == b'{"error": "notifier closed"}'
        r = await c.get(sse.url_for("unknown"), headers=bearer(token))
        assert r.status_code == 403


# -- wake-ups -----------------------------------------------------------------------------------------------
def hold_first_body_chunk(app, entered: threading.Event, go: threading.Event):
    """ASGI middleware: the first body chunk of a response is held until the
    test sets ``go`` (a client slow to take the first frame; the event loop
    keeps running meanwhile)."""

    async def wrapper(scope, receive, send):
        first = True

        async def held_send(message):
            nonlocal first
            if first and message["type"] == "http.response.body":
                first = False
                entered.set()
                await asyncio.to_thread(go.wait, 5)
            await send(message)

        await app(scope, receive, held_send)

    return wrapper


async def test_event_published_while_first_frame_is_sent_is_not_delayed(make_notifier) -> None:
    # Regression: the wake-up for an event published while the stream is in
    # send() (no waiter yet) must not be lost until the next ping.
    n = make_notifier()
    app = sse_app(n, ping_interval=5)
    entered, go = threading.Event(), threading.Event()
    job = "held"
    token = n.register_job(job)
    with run_uvicorn(hold_first_body_chunk(app, entered, go)) as served:
        raw = await RawHTTP.request(served.port, f"/v1/jobs/{job}/events", bearer(token))
        try:
            assert await asyncio.to_thread(entered.wait, 5)  # the stream is sending "retry:"
            done = JobEvent(DONE, timestamp=1)
            n.notify(job, done)  # ... when the job ends
            go.set()
            # It should come at once, not after ping_interval (5 s).
            assert await raw.read_to_end(timeout=2) == RETRY + frame(1, done)
        finally:
            go.set()
            await raw.close()
        await eventually(lambda: app.open_streams == 0, 3, "stream released")


# -- more than one server in a process ------------------------------------------------------------------
async def test_stopping_one_server_leaves_streams_on_another(make_notifier) -> None:
    n = make_notifier()
    app_a, app_b = sse_app(n), sse_app(n)
    token = n.register_job("j")
    with run_uvicorn(app_b) as served_b:
        raw = await RawHTTP.request(served_b.port, "/v1/jobs/j/events", bearer(token))
        try:
            await raw.read_until(RETRY)
            with run_uvicorn(app_a):
                pass  # another server starts and stops
            done = JobEvent(DONE, timestamp=1)
            n.notify("j", done)
            assert await raw.read_to_end() == RETRY + frame(1, done)
        finally:
            await raw.close()


# -- max_stream_secs on a busy stream -------------------------------------------------------------------------
def publish_on_every_send(app, notifier, job: str, count: int):
    """ASGI middleware: each body chunk the app sends makes the job publish
    its next event (``count`` of them, the last terminal), after a 10 ms
    server-side delay (a slow network): the stream is never idle."""
    sent = 0

    async def wrapper(scope, receive, send):
        async def busy_send(message):
            nonlocal sent
            if message["type"] == "http.response.body" and message.get("more_body") and sent < count:
                sent += 1
                notifier.notify(job, JobEvent(DONE if sent == count else P, timestamp=sent))
                await asyncio.sleep(0.01)  # server-side delay: a slow network
            await send(message)

        await app(scope, receive, busy_send)

    return wrapper


async def test_max_stream_secs_ends_a_busy_stream(make_notifier) -> None:
    lifetime, count = 0.2, 100  # 100 sends take >= 1 s
    n = make_notifier(sse_capacity=count + 1)
    app = sse_app(n, max_stream_secs=lifetime)
    token = n.register_job("busy")
    with run_uvicorn(publish_on_every_send(app, n, "busy", count)) as served:
        start = time.monotonic()
        raw = await RawHTTP.request(served.port, "/v1/jobs/busy/events", bearer(token))
        try:
            body = await raw.read_to_end(timeout=5)
        finally:
            await raw.close()
        took = time.monotonic() - start
    assert raw.complete
    got = body.count(b"\nevent: ")
    assert 0 < got < count, "the stream ran until the job ended"
    assert body == RETRY + frames([JobEvent(P, timestamp=i) for i in range(1, got + 1)])
    assert took < lifetime + 0.5
