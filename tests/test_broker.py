"""The Redis broker within one process: several JobNotifiers on one real
``redis-server`` (tests/redis_util.py) stand for several processes.

Covered: config errors and an unreachable Redis at start; tokens shared
(stored as digests, with an expiry); events and history across notifiers
with the same ids everywhere; the local path without Redis; Redis down
(buffer, then BrokerError, counted; published in order when it is back);
a subscription that survives a Redis restart without a gap; ids taken by
another process (resequenced, no duplicate locally); the SSE app serving a
job registered and produced elsewhere, with Last-Event-ID. The
multi-process cases (uvicorn workers, producer processes) are in
tests/test_broker_procs.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from redis_util import RedisServer, free_port, redis_server  # noqa: F401
from sse_support import events_path, run_uvicorn

from blueprint_notify import BrokerError, JobEvent, JobNotifier, JobStatus, NotifierConfig
from blueprint_notify.asgi import sse_app

P = JobStatus.PROCESSING
DONE = JobStatus.COMPLETED


@pytest.fixture
def notifiers(redis_server: RedisServer) -> Iterator[Callable[..., JobNotifier]]:
    """Makes notifiers on the test's Redis (each one a 'process'); closes them."""
    made: list[JobNotifier] = []

    def make(**kw: Any) -> JobNotifier:
        kw.setdefault("sse_capacity", 256)
        n = JobNotifier(broker_url=redis_server.url, close_timeout_secs=2, **kw)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close(0)


async def collect(sub: Any, n: int, timeout: float = 5.0) -> list[tuple[int, JobEvent]]:
    out = []
    for _ in range(n):
        ev = await asyncio.wait_for(sub.get(), timeout)
        out.append((sub.last_event_id, ev))
    return out


# -- configuration ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379", "redis://", "not a url", "redis://host:99999", "redis://h/abc", "unix://", " redis://h", "redis://h\r\n"],
)
def test_bad_broker_url_is_a_value_error_naming_it(url: str) -> None:
    with pytest.raises(ValueError, match="broker_url"):
        NotifierConfig(broker_url=url)


def test_bad_broker_options() -> None:
    with pytest.raises(TypeError, match="broker_url"):
        NotifierConfig(broker_url=6379)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="broker_prefix"):
        NotifierConfig(broker_prefix="has space")
    with pytest.raises(ValueError, match="broker_prefix"):
        NotifierConfig(broker_prefix="")
    with pytest.raises(ValueError, match="broker_buffer"):
        NotifierConfig(broker_buffer=0)
    with pytest.raises(ValueError, match="broker_ttl_secs"):
        NotifierConfig(broker_ttl_secs=0)


def test_unreachable_redis_at_start_is_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(BrokerError, match=f"127.0.0.1:{port}") as info:
        JobNotifier(broker_url=f"redis://user:s3cret@127.0.0.1:{port}/0")
    assert time.monotonic() - start < 5
    assert "s3cret" not in str(info.value)  # the password is not shown
    assert isinstance(info.value, ConnectionError)


# -- tokens --------------------------------------------------------------------------
def test_token_registered_in_one_process_validates_in_another(notifiers, redis_server) -> None:
    a, b = notifiers(), notifiers()
    token = a.register_job("job-t")
    assert b.validate_job_token("job-t", token)
    assert not b.validate_job_token("job-t", "0" * 64)
    assert not b.validate_job_token("other-job", token)
    with redis_server.client() as r:
        stored = r.get("bpn:tok:job-t")
        ttl = r.pttl("bpn:tok:job-t")
    assert stored == hashlib.sha256(token.encode()).hexdigest().encode()  # a digest, not the token
    assert 0 < ttl <= 86_400_000
    # Registering again (anywhere) replaces it everywhere.
    token2 = b.register_job("job-t")
    assert a.validate_job_token("job-t", token2)
    assert not b.validate_job_token("job-t", token)


async def test_token_validation_async(notifiers) -> None:
    a, b = notifiers(), notifiers()
    token = a.register_job("job-ta")
    assert await b.validate_job_token_async("job-ta", token)
    assert not await b.validate_job_token_async("job-ta", token[::-1])


# -- events ----------------------------------------------------------------------------
async def test_events_reach_every_process_with_the_same_ids(notifiers) -> None:
    a, b, c = notifiers(), notifiers(), notifiers()
    job = "job-ev/ü:1"  # slashes, colons, unicode are fine in keys
    local = a.subscribe(job)
    remote = b.subscribe(job)
    await remote.ready()
    events = [JobEvent(P, progress=k) for k in range(20)] + [JobEvent(DONE, progress=100, result={"url": "s3://x"})]
    for ev in events:
        a.notify(job, ev)
    got_local = await collect(local, len(events))
    got_remote = await collect(remote, len(events))
    assert [e for _, e in got_local] == events
    assert [e for _, e in got_remote] == events
    ids = [i for i, _ in got_local]
    assert ids == [i for i, _ in got_remote]
    assert ids == sorted(set(ids))  # strictly increasing
    # A late process resumes from the history kept in Redis.
    assert a.flush(5)
    late = c.subscribe(job, last_event_id=ids[9])
    tail = await collect(late, len(events) - 10)
    assert [(i, e) for i, e in tail] == got_local[10:]
    assert c.stats()["broker_ingested"] >= len(events) - 10
    for s in (local, remote, late):
        s.close()


async def test_history_is_bounded_and_expires_after_terminal(notifiers, redis_server) -> None:
    a = notifiers(sse_capacity=8, retention_secs=30)
    for k in range(20):
        a.notify("job-h", JobEvent(P, progress=k))
    assert a.flush(5)
    with redis_server.client() as r:
        assert r.xlen("bpn:ev:job-h") == 8
        assert r.pttl("bpn:ev:job-h") > 30_000  # live job: broker_ttl_secs
        a.notify("job-h", JobEvent(DONE))
        assert a.flush(5)
        assert 0 < r.pttl("bpn:ev:job-h") <= 30_000  # terminal: retention_secs


async def test_local_subscribers_do_not_wait_for_redis(notifiers, redis_server) -> None:
    a = notifiers()
    sub = a.subscribe("job-local")
    redis_server.kill()
    for k in range(3):
        a.notify("job-local", JobEvent(P, progress=k))
    got = await collect(sub, 3)
    assert [e.progress for _, e in got] == [0, 1, 2]
    assert a.stats()["broker_buffered"] == 3
    sub.close()


async def test_redis_down_buffers_then_refuses_then_publishes_in_order(notifiers, redis_server, caplog) -> None:
    a = notifiers(broker_buffer=50)
    b = notifiers()
    redis_server.kill()
    for k in range(50):
        a.notify("job-down", JobEvent(P, progress=k % 101))
    with caplog.at_level(logging.ERROR, "blueprint_notify.broker"):
        with pytest.raises(BrokerError, match="broker_buffer"):
            a.notify("job-down", JobEvent(P, progress=99))
    assert any("event refused" in r.getMessage() for r in caplog.records)
    stats = a.stats()
    assert stats["broker_rejected"] == 1 and stats["broker_buffered"] == 50
    assert not a.flush(0.2)
    redis_server.restart()
    assert a.flush(10)
    assert a.stats()["broker_buffered"] == 0
    sub = b.subscribe("job-down", last_event_id=0)
    got = await collect(sub, 50)
    assert [e.progress for _, e in got] == list(range(50))
    sub.close()


async def test_subscription_survives_a_redis_restart_without_a_gap(notifiers, redis_server) -> None:
    a, b = notifiers(), notifiers()
    sub = b.subscribe("job-r")
    await sub.ready()
    for k in range(5):
        a.notify("job-r", JobEvent(P, progress=k))
    first = await collect(sub, 5)
    redis_server.kill()
    for k in range(5, 10):
        a.notify("job-r", JobEvent(P, progress=k))
    redis_server.restart()
    assert a.flush(10)
    for k in range(10, 15):
        a.notify("job-r", JobEvent(P, progress=k))
    rest = await collect(sub, 10, timeout=10)
    got = first + rest
    assert [e.progress for _, e in got] == list(range(15))
    assert [i for i, _ in got] == sorted({i for i, _ in got})
    assert b.stats()["broker_reconnects"] >= 1
    sub.close()


async def test_an_id_taken_elsewhere_is_resequenced_without_duplicates(notifiers, redis_server) -> None:
    a, b = notifiers(), notifiers()
    local = a.subscribe("job-q")
    await local.ready()
    ahead = (time.time_ns() // 1000) + 60_000_000  # another process, its clock a minute ahead
    with redis_server.client() as r:
        r.xadd("bpn:ev:job-q", {"s": 1, "d": JobEvent(P, progress=7, timestamp=1).to_json(), "o": "x", "r": ahead}, id=f"0-{ahead}")
    a.notify("job-q", JobEvent(P, progress=8, timestamp=2))
    assert a.flush(5)
    assert a.stats()["broker_resequenced"] == 1
    remote = b.subscribe("job-q", last_event_id=0)
    got = await collect(remote, 2)
    assert [e.progress for _, e in got] == [7, 8]
    assert got[0][0] == ahead and got[1][0] == ahead + 1
    # The producer's own subscriber saw its event once (under the id it gave it).
    mine = await collect(local, 1)
    assert mine[0][1].progress == 8
    assert local.get_nowait() is None
    for s in (local, remote):
        s.close()


def test_close_with_redis_down_reports_what_was_not_published(notifiers, redis_server, caplog) -> None:
    a = notifiers()
    redis_server.kill()
    a.notify("job-c", JobEvent(P))
    with caplog.at_level(logging.ERROR, "blueprint_notify.broker"):
        a.close(0.2)
    assert any("1 events not published" in r.getMessage() for r in caplog.records)


# -- the SSE app -----------------------------------------------------------------------
async def test_sse_app_serves_a_job_registered_and_produced_elsewhere(notifiers) -> None:
    producer, web = notifiers(), notifiers()
    job = "job-sse"
    token = producer.register_job(job)
    events = [JobEvent(P, progress=k) for k in range(5)] + [JobEvent(DONE, progress=100)]
    for ev in events[:3]:
        producer.notify(job, ev)
    assert producer.flush(5)
    app = sse_app(web)
    with run_uvicorn(app) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
            bad = await client.get(events_path(job), headers={"authorization": "Bearer " + "0" * 64})
            assert bad.status_code == 403
            frames: list[tuple[int, str, str]] = []
            async with client.stream("GET", events_path(job), headers={"authorization": f"Bearer {token}"}) as resp:
                assert resp.status_code == 200
                buf = b""
                async for chunk in resp.aiter_bytes():
                    buf += chunk
                    while b"\n\n" in buf:
                        block, buf = buf.split(b"\n\n", 1)
                        fields = dict(line.split(": ", 1) for line in block.decode().split("\n") if ": " in line)
                        if "id" in fields:
                            frames.append((int(fields["id"]), fields["event"], fields["data"]))
                            if len(frames) == 3:
                                for ev in events[3:]:
                                    producer.notify(job, ev)
            assert [f[2] for f in frames] == [e.to_json() for e in events]
            ids = [f[0] for f in frames]
            assert ids == sorted(set(ids))
            # Resume on this worker from the middle: exactly what followed.
            async with client.stream(
                "GET", events_path(job), headers={"authorization": f"Bearer {token}", "last-event-id": str(ids[2])}
            ) as resp:
                body = (await resp.aread()).decode()
            assert [int(line[4:]) for line in body.split("\n") if line.startswith("id: ")] == ids[3:]


def test_a_server_that_is_not_redis_is_a_clear_error() -> None:
    import socket
    import threading

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        with pytest.raises(BrokerError, match=f"127.0.0.1:{port}"):
            JobNotifier(broker_url=f"redis://127.0.0.1:{port}/0")
        t.join(5)


def test_wrong_password_is_a_clear_error(redis_server) -> None:
    with redis_server.client() as r:
        r.config_set("requirepass", "right")
    try:
        with pytest.raises(BrokerError, match="cannot reach the broker") as info:
            JobNotifier(broker_url=redis_server.url.replace("redis://", "redis://:wrong@"))
        assert "wrong" not in str(info.value)
        n = JobNotifier(broker_url=redis_server.url.replace("redis://", "redis://:right@"))
        n.close()
    finally:
        with redis_server.client(password="right") as r:
            r.config_set("requirepass", "")


async def test_subscriptions_made_together_all_receive(notifiers, redis_server) -> None:
    """The first subscriptions of a process, made before any is ready, share
    one Pub/Sub connection (each reaching Redis on its own would leave all
    but one unread)."""
    a, b = notifiers(), notifiers()
    jobs = [f"job-together-{i}" for i in range(8)]
    subs = [b.subscribe(job) for job in jobs]
    await asyncio.gather(*(s.ready() for s in subs))
    for i, job in enumerate(jobs):
        a.notify(job, JobEvent(P, progress=i))
    got = [await asyncio.wait_for(s.get(), 5) for s in subs]
    assert [e.progress for e in got] == list(range(8))
    with redis_server.client() as r:
        pubsub_conns = [c for c in r.client_list() if int(c.get("sub", 0)) > 0]
    assert len(pubsub_conns) == 1, pubsub_conns
    for s in subs:
        s.close()
