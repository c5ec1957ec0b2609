"""History, resume and retention of the SSE endpoint, over real uvicorn:
events before the first subscriber, Last-Event-ID (header and query) after
a dropped connection, 204 after the end, the lag frame, late connects
within retention and 403 after it, active_channels()."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from httpx_sse import aconnect_sse
from sse_support import (  # noqa: F401  (_module_sse, make_sse, sse: fixtures)
    RETRY,
    RawHTTP,
    _module_sse,
    events_path,
    frame,
    frames,
    lag_frame,
    make_sse,
    run_uvicorn,
    sse,
)

from blueprint_notify import JobEvent, JobStatus
from blueprint_notify.asgi import sse_app

DONE = JobStatus.COMPLETED
P = JobStatus.PROCESSING
FORBIDDEN = b'{"error": "forbidden"}'


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=5)


def bearer(token: str, last_event_id: int | str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    return headers


def progress(i: int) -> JobEvent:
    return JobEvent(P, progress=i, timestamp=1_700_000_000 + i)


async def get_body(sse, job: str, headers: dict[str, str], query: str = "") -> tuple[int, bytes]:
    raw = await RawHTTP.request(sse.port, sse.path_for(job, query), headers)
    body = await raw.read_to_end()
    assert raw.complete, "the body did not end properly"
    await raw.close()
    return raw.status, body


# -- history before the first subscriber -------------------------------------------------------------
async def test_events_before_first_subscriber_are_replayed_then_live(sse) -> None:
    job, token = sse.new_job()
    early = [JobEvent("queued", timestamp=1), progress(10), progress(20)]
    for e in early:
        sse.notifier.notify(job, e)
    raw = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token))
    await raw.read_until(RETRY + frames(early))
    late = [progress(30), JobEvent(DONE, result=[1, 2], timestamp=9)]
    for e in late:
        sse.notifier.notify(job, e)
    assert await raw.read_to_end() == RETRY + frames(early + late)
    assert raw.complete
    await raw.close()


async def test_two_clients_see_the_same_ids(sse) -> None:
    job, token = sse.new_job()
    sse.notifier.notify(job, progress(1))
    a = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token))
    await a.read_until(frame(1, progress(1)))
    sse.notifier.notify(job, progress(2))
    b = await RawHTTP.request(sse.port, sse.path_for(job, f"token={token}"))
    await b.read_until(frame(2, progress(2)))
    sse.notifier.notify(job, JobEvent(DONE, timestamp=3))
    expected = RETRY + frames([progress(1), progress(2), JobEvent(DONE, timestamp=3)])
    assert await a.read_to_end() == expected
    assert await b.read_to_end() == expected
    await a.close()
    await b.close()


# -- resume ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("via", ["header", "query"])
async def test_resume_after_dropped_connection(sse, via) -> None:
    job, token = sse.new_job()
    n = sse.notifier
    events = [progress(i) for i in range(1, 7)] + [JobEvent(DONE, result="ok", timestamp=7)]
    n.notify(job, events[0])
    n.notify(job, events[1])
    seen = []
    async with client() as c, aconnect_sse(c, "GET", sse.url_for(job), headers=bearer(token)) as source:
        stream = source.aiter_sse()
        assert (await anext(stream)).retry == 3000
        seen += [await anext(stream), await anext(stream)]
        n.notify(job, events[2])
        seen.append(await anext(stream))
        await stream.aclose()
    # Dropped mid-stream; the job goes on.
    for e in events[3:]:
        n.notify(job, e)
    last = seen[-1].id
    assert [s.id for s in seen] == ["1", "2", "3"]
    if via == "header":
        status, body = await get_body(sse, job, bearer(token, last))
    else:
        status, body = await get_body(sse, job, bearer(token), f"last_event_id={last}")
    assert status == 200
    assert body == RETRY + frames(events[3:], first_seq=4)  # exactly the missing ones


async def test_resume_with_httpx_sse_while_events_keep_coming(make_sse) -> None:
    # A publisher thread streams 120 events; the client drops its connection
    # every 17 events and resumes from the last id it saw: it must see every
    # id exactly once, in order.
    total = 120
    sse = make_sse(notifier_kwargs={"sse_capacity": 256})
    job, token = sse.new_job()
    n = sse.notifier
    start = threading.Event()

    def publish() -> None:
        start.wait(5)
        for i in range(1, total):
            n.notify(job, progress(i % 101))
        n.notify(job, JobEvent(DONE, timestamp=1))

    publisher = threading.Thread(target=publish)
    publisher.start()
    ids: list[int] = []
    connections = 0
    try:
        async with client() as c:
            while not ids or ids[-1] != total:
                headers = bearer(token, ids[-1] if ids else None)
                connections += 1
                async with aconnect_sse(c, "GET", sse.url_for(job), headers=headers) as source:
                    assert source.response.status_code == 200
                    start.set()
                    stream = source.aiter_sse()
                    try:
                        read = 0
                        async for event in stream:
                            if not event.id:
                                assert (event.retry, event.event, event.data) == (3000, "message", "")
                                continue
                            assert event.event != "error", f"lagged: {event.data}"
                            ids.append(int(event.id))
                            read += 1
                            if read == 17:
                                break
                    finally:
                        await stream.aclose()
    finally:
        start.set()
        publisher.join(5)
    assert ids == list(range(1, total + 1))
    assert connections == -(-total // 17)


async def test_last_event_id_zero_and_empty_replay_everything(sse) -> None:
    job, token = sse.new_job()
    events = [progress(1), progress(2), JobEvent(DONE, timestamp=3)]
    for e in events:
        sse.notifier.notify(job, e)
    for headers, query in [(bearer(token, 0), ""), (bearer(token, ""), ""), (bearer(token), "last_event_id=0")]:
        assert await get_body(sse, job, headers, query) == (200, RETRY + frames(events))


async def test_resume_ahead_of_history_waits_for_the_next_event(sse) -> None:
    job, token = sse.new_job()
    sse.notifier.notify(job, progress(1))
    raw = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token, 50))
    await raw.read_until(RETRY)
    sse.notifier.notify(job, JobEvent(DONE, timestamp=2))
    assert await raw.read_to_end() == RETRY + frame(2, JobEvent(DONE, timestamp=2))
    await raw.close()


@pytest.mark.parametrize("after", ["last", "beyond"])
async def test_resume_after_terminal_event_is_204(sse, after) -> None:
    job, token = sse.new_job()
    for e in [progress(1), JobEvent(DONE, timestamp=2)]:
        sse.notifier.notify(job, e)
    last_id = 2 if after == "last" else 1000
    async with client() as c:
        r = await c.get(sse.url_for(job), headers=bearer(token, last_id))
        assert r.status_code == 204
        assert r.content == b""
        assert "content-type" not in r.headers
        assert r.headers["cache-control"] == "no-store"
        # One before the end: the terminal event, then the end.
        r = await c.get(sse.url_for(job), headers=bearer(token, 1))
        assert (r.status_code, r.content) == (200, RETRY + frame(2, JobEvent(DONE, timestamp=2)))


# -- lag ----------------------------------------------------------------------------------------------
async def test_lag_frame_first_when_history_overflowed(make_sse) -> None:
    sse = make_sse(notifier_kwargs={"sse_capacity": 4})
    job, token = sse.new_job()
    events = [progress(i) for i in range(1, 11)]
    for e in events:
        sse.notifier.notify(job, e)
    raw = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token))
    expected = RETRY + lag_frame(6) + frames(events[6:], first_seq=7)
    assert await raw.read_until(expected) == expected
    # ... and the stream goes on.
    sse.notifier.notify(job, progress(11))
    sse.notifier.notify(job, JobEvent(DONE, timestamp=12))
    rest = frames([progress(11), JobEvent(DONE, timestamp=12)], first_seq=11)
    assert await raw.read_to_end() == expected + rest
    await raw.close()
    # Resuming from an id that fell out: the lag frame counts what was lost.
    status, body = await get_body(sse, job, bearer(token, 2))
    assert status == 200
    assert body == RETRY + lag_frame(6) + frames(events[8:], first_seq=9) + rest


def observe_sends(app, marker: bytes, seen: threading.Event):
    """ASGI middleware that only watches: sets ``seen`` when the app starts
    sending a body chunk containing ``marker``."""

    async def wrapper(scope, receive, send):
        async def watched_send(message):
            if message["type"] == "http.response.body" and marker in message.get("body", b""):
                seen.set()
            await send(message)

        await app(scope, receive, watched_send)

    return wrapper


async def test_lag_frame_while_connected_to_a_slow_reader(make_notifier) -> None:
    # The server's socket buffer is small and the client stops reading in
    # the middle of a 1 MiB event 1. uvicorn queues it and waits in the
    # next send (event 2) for the client: while the stream is stuck there,
    # 29 more events overflow the ring of 2. When the client reads again it
    # gets events 1 and 2, the lag frame, and the last 2 events.
    n = make_notifier(sse_capacity=2)
    app = sse_app(n)
    sending_2 = threading.Event()
    job = "slow-reader"
    token = n.register_job(job)
    with run_uvicorn(observe_sends(app, b"id: 2\n", sending_2), sndbuf=8192) as served:
        raw = await RawHTTP.request(served.port, events_path(job), bearer(token), rcvbuf=8192)
        try:
            await raw.read_until(RETRY)
            big = JobEvent(P, result="x" * (1 << 20), timestamp=1)
            n.notify(job, big)
            size = int(await raw.reader.readuntil(b"\r\n"), 16)  # the server wrote event 1
            assert size == len(frame(1, big))
            n.notify(job, progress(2))
            assert await asyncio.to_thread(sending_2.wait, 5)  # stuck sending event 2
            rest = [progress(i) for i in range(3, 31)] + [JobEvent(DONE, timestamp=99)]  # ids 3..31
            for e in rest:
                n.notify(job, e)
            raw.body += await raw.reader.readexactly(size)
            assert await raw.reader.readexactly(2) == b"\r\n"
            body = await raw.read_to_end()
            assert raw.complete
        finally:
            await raw.close()
    assert body == RETRY + frame(1, big) + frame(2, progress(2)) + lag_frame(27) + frames(rest[-2:], first_seq=30)


# -- retention ----------------------------------------------------------------------------------------
async def test_late_connect_within_retention_gets_replay_and_close(sse) -> None:
    n = sse.notifier
    job, token = sse.new_job()
    events = [JobEvent("queued", timestamp=1), progress(50), JobEvent(JobStatus.FAILED, error="boom", timestamp=3)]
    before = n.active_channels()
    for e in events:
        n.notify(job, e)
    assert n.active_channels() == before - 1  # retained jobs are not live channels
    assert n.validate_job_token(job, token)
    assert await get_body(sse, job, bearer(token)) == (200, RETRY + frames(events))
    assert await get_body(sse, job, bearer(token), f"token={token}") == (200, RETRY + frames(events))
    async with client() as c:
        r = await c.get(sse.url_for(job), headers=bearer("0" * 64))
    assert (r.status_code, r.content) == (403, FORBIDDEN)


async def test_retention_expires_to_403(make_sse) -> None:
    retention = 0.3
    sse = make_sse(notifier_kwargs={"retention_secs": retention})
    n = sse.notifier
    job, token = sse.new_job()
    events = [progress(1), JobEvent(JobStatus.CANCELLED, timestamp=2)]
    n.notify(job, events[0])
    n.notify(job, events[1])
    ended_at = time.monotonic()
    assert n.active_channels() == 0
    statuses = []
    async with client() as c:
        deadline = ended_at + retention + 5
        while True:
            r = await c.get(sse.url_for(job), headers=bearer(token))
            statuses.append(r.status_code)
            if r.status_code == 403:
                expired_at = time.monotonic()
                break
            assert r.status_code == 200 and r.content == RETRY + frames(events)
            assert time.monotonic() < deadline, "retained job never expired"
            await asyncio.sleep(0.02)  # poll tick of a bounded wait (no event marks the expiry)
        assert r.content == FORBIDDEN
        # Expired like an unknown job: the same 403, for resumes too.
        assert (await c.get(sse.url_for(job), headers=bearer(token, 1))).content == FORBIDDEN
    assert statuses[0] == 200
    assert expired_at - ended_at >= retention - 0.01
    assert not n.validate_job_token(job, token)
    assert n.active_channels() == 0


async def test_zero_retention(make_sse) -> None:
    sse = make_sse(notifier_kwargs={"retention_secs": 0})
    n = sse.notifier
    job, token = sse.new_job()
    # A stream connected before the end still gets the terminal event.
    raw = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token))
    n.notify(job, progress(1))
    await raw.read_until(frame(1, progress(1)))
    n.notify(job, JobEvent(DONE, timestamp=2))
    assert await raw.read_to_end() == RETRY + frames([progress(1), JobEvent(DONE, timestamp=2)])
    await raw.close()
    # Afterwards the job is gone at once.
    assert not n.validate_job_token(job, token)
    async with client() as c:
        r = await c.get(sse.url_for(job), headers=bearer(token))
    assert (r.status_code, r.content) == (403, FORBIDDEN)


async def test_active_channels_counts_live_jobs_only(make_sse) -> None:
    sse = make_sse()
    n = sse.notifier
    jobs = [sse.new_job() for _ in range(3)]
    assert n.active_channels() == 3
    (j0, t0), (j1, _), _ = jobs
    raw = await RawHTTP.request(sse.port, sse.path_for(j0), bearer(t0))
    await raw.read_until(RETRY)
    n.notify(j0, JobEvent(DONE, timestamp=1))
    assert await raw.read_to_end() == RETRY + frame(1, JobEvent(DONE, timestamp=1))
    await raw.close()
    n.notify(j1, JobEvent(JobStatus.FAILED, timestamp=1))
    assert n.active_channels() == 1
    # Retained jobs still serve their history.
    assert await get_body(sse, j0, bearer(t0)) == (200, RETRY + frame(1, JobEvent(DONE, timestamp=1)))
    assert n.active_channels() == 1


async def test_register_again_after_end_starts_a_new_history(sse) -> None:
    n = sse.notifier
    job, old = sse.new_job()
    n.notify(job, JobEvent(DONE, timestamp=1))
    new = n.register_job(job)  # the id's next lifecycle replaces the retained one
    n.notify(job, JobEvent("queued", timestamp=2))
    n.notify(job, JobEvent(DONE, timestamp=3))
    async with client() as c:
        assert (await c.get(sse.url_for(job), headers=bearer(old))).status_code == 403
    assert await get_body(sse, job, bearer(new)) == (
        200,
        RETRY + frames([JobEvent("queued", timestamp=2), JobEvent(DONE, timestamp=3)]),
    )
