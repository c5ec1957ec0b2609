"""Webhook delivery through the native engine to real loopback servers:
retries, re-signing, per-job order, parallelism, connection reuse, timeouts,
response bodies, close(), flush(), drain() and logging."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import re
import threading
import time
from collections import defaultdict

import pytest

from blueprint_notify import JobEvent, JobStatus
from blueprint_notify import _core
from blueprint_notify.testing import Response, compute_signature

SECRET = "test-secret"  # what the make_notifier and receiver fixtures use
UNREACHABLE = "http://127.0.0.1:1/nope"


def body_of(job_id: str, event: JobEvent) -> bytes:
    """The webhook body the reference builds: {"job_id":..,"event":..}."""
    return ('{"job_id":%s,"event":%s}' % (json.dumps(job_id, ensure_ascii=False), event.to_json())).encode()


def assert_stats_consistent(n) -> dict[str, int]:
    s = n.stats()
    assert s["submitted"] == s["delivered"] + s["dead_lettered"] + s["pending"], s
    assert s["attempts"] == s["delivered"] + s["failed_attempts"], s
    return s


# -- retries and signatures ------------------------------------------------------------
def test_retries_then_success(make_notifier, receiver) -> None:
    receiver.respond_with(500, times=2)
    receiver.respond_with(200)
    n = make_notifier(max_retries=2, retry_base_ms=10)
    event = JobEvent(JobStatus.COMPLETED, result={"ok": True})
    n.notify("retry-job", event, receiver.url_for())
    assert n.flush(5)
    reqs = receiver.requests
    assert [r.status for r in reqs] == [500, 500, 200], "exactly three attempts"
    for r in reqs:
        assert r.body == body_of("retry-job", event)
        assert r.verified is True, "each attempt's signature must match its own timestamp"
        assert r.signature == compute_signature(SECRET, r.headers["X-Webhook-Timestamp"], r.body)
    assert n.dead_letters() == []
    s = assert_stats_consistent(n)
    assert (s["delivered"], s["attempts"], s["failed_attempts"], s["dead_lettered"]) == (1, 3, 2, 0)


def test_retries_exhausted_dead_letters_with_last_status(make_notifier, receiver, caplog) -> None:
    caplog.set_level(logging.INFO, logger="blueprint_notify")
    receiver.respond_with(503)
    n = make_notifier(max_retries=2, retry_base_ms=10)
    n.notify("doomed", JobEvent(JobStatus.FAILED, error="x"), receiver.url_for())
    assert n.flush(5)
    assert [r.status for r in receiver.requests] == [503, 503, 503]
    assert all(r.verified for r in receiver.requests)
    (dead,) = n.dead_letters()
    assert dead.attempts == 3
    assert dead.last_error == "HTTP 503"
    assert dead.payload.encode() == receiver.requests[0].body
    retries = [r for r in caplog.records if r.levelno == logging.WARNING and "retrying" in r.getMessage()]
    assert len(retries) == 2, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_any_2xx_is_delivered(make_notifier, receiver, status) -> None:
    receiver.respond_with(status)
    n = make_notifier(max_retries=2)
    n.notify("ok", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    assert len(receiver.requests) == 1
    assert n.dead_letters() == []


@pytest.mark.parametrize("status", [301, 304, 400, 404, 410, 429, 500, 502])
def test_non_2xx_is_a_failure(make_notifier, receiver, status) -> None:
    receiver.respond_with(status)
    n = make_notifier(max_retries=0)
    n.notify("bad", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    (dead,) = n.dead_letters()
    if status == 410:  # Gone: never retried, and the reason says so
        assert dead.last_error.startswith("HTTP 410 Gone") and "not retried" in dead.last_error
    else:
        assert dead.last_error == f"HTTP {status}"
    assert dead.attempts == 1


def test_each_attempt_is_resigned_with_a_fresh_timestamp(make_notifier, receiver) -> None:
    # Backoff is retry_base_ms * [0.8, 1.2): 1250 ms gives 1.0-1.5 s, so the
    # whole-second timestamps of the two attempts must differ.
    receiver.respond_with(500, times=1)
    n = make_notifier(max_retries=1, retry_base_ms=1250)
    n.notify("resign", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    first, second = receiver.requests
    assert (first.status, second.status) == (500, 200)
    assert second.received_at - first.received_at >= 0.95, "backoff must be honoured"
    assert second.timestamp > first.timestamp, "the retry must carry a new timestamp"
    assert first.signature != second.signature
    assert first.verified and second.verified
    assert first.body == second.body


def test_large_max_retries_does_not_overflow(make_notifier, receiver) -> None:
    receiver.respond_with(500, times=3)
    n = make_notifier(max_retries=1_000_000, retry_base_ms=5, max_retry_delay_ms=20)
    n.notify("many", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    assert [r.status for r in receiver.requests] == [500, 500, 500, 200]
    assert n.dead_letters() == []


@pytest.mark.parametrize("n_failed", [1, 2, 10, 31, 32, 33, 63, 64, 65, 1000, 2**31, 2**32 - 1])
def test_backoff_is_capped_and_never_overflows(n_failed) -> None:
    base, cap = 1000, 300_000

    def ideal_for(cap: int) -> int:  # min(cap, base * 2**(n-1)) without a giant int
        return cap if n_failed - 1 >= 80 else min(cap, base * 2 ** (n_failed - 1))

    ideal = ideal_for(cap)
    rng = random.Random(n_failed)
    for rnd in [0, 1, 2**63, 2**64 - 1, *(rng.getrandbits(64) for _ in range(200))]:
        delay = _core.backoff_ms(base, n_failed, cap, rnd)
        assert 4 * ideal <= 5 * delay and delay <= cap, (n_failed, rnd, delay)  # [0.8 ideal, cap]
        assert 5 * delay < 6 * ideal or delay == cap  # below 1.2 ideal unless capped
    assert _core.backoff_ms(0, n_failed, cap, 12345) == 0
    assert _core.backoff_ms(base, n_failed, 0, 12345) == 0


def test_backoff_with_a_huge_cap_does_not_wrap_around() -> None:
    """Regression (fixed in e94e01d): with a cap above ~2**64/1.2 the jittered
    delay overflowed uint64 and wrapped to a small number."""
    huge = 2**64 - 1
    span = huge // 5 * 2
    for rnd in (0, span // 2, span - 1):
        delay = _core.backoff_ms(1000, 64, huge, rnd)
        assert 4 * huge <= 5 * delay <= 5 * huge, (rnd, delay)


def test_backoff_first_retry_uses_the_base() -> None:
    delays = {_core.backoff_ms(1000, 1, 300_000, r) for r in range(0, 4000, 7)}
    assert min(delays) == 800 and max(delays) < 1200
    assert len(delays) > 100, "jitter should spread retries"


# -- ordering and parallelism --------------------------------------------------------------
def test_per_job_order_under_retries_and_random_delays(make_notifier, receiver) -> None:
    rng = random.Random(20240611)
    lock = threading.Lock()
    seen: set[bytes] = set()
    failed_first: set[bytes] = set()

    def flaky(req):
        with lock:
            first = req.body not in seen
            seen.add(req.body)
            fail = first and rng.random() < 0.3
            if fail:
                failed_first.add(req.body)
            delay = rng.random() * 0.008
        return Response(500 if fail else 200, delay=delay)  # server-side delay

    receiver.set_handler(flaky)
    n = make_notifier(max_retries=3, retry_base_ms=5, max_connections_per_host=16)
    jobs = [f"order-{j}" for j in range(10)]
    for i in range(20):
        for job in jobs:
            n.notify(job, JobEvent(JobStatus.PROCESSING, result={"seq": i}), receiver.url_for(f"/{job}"))
    assert n.flush(20)
    reqs = receiver.requests
    assert failed_first, "the random script should have failed some first attempts"
    assert len(reqs) == 200 + len(failed_first)
    by_job: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in reqs:
        assert r.verified
        assert r.path == f"/{r.job_id}"
        by_job[r.job_id].append((r.json()["event"]["result"]["seq"], r.status))
    assert sorted(by_job) == sorted(jobs)
    for job, arrivals in by_job.items():
        ok = [seq for seq, status in arrivals if status == 200]
        assert ok == list(range(20)), f"{job}: successful arrivals out of order: {ok}"
        # Head of line: nothing of event k+1 is sent before event k succeeded.
        pos = 0
        for seq in range(20):
            while arrivals[pos] == (seq, 500):
                pos += 1
            assert arrivals[pos] == (seq, 200), f"{job}: {arrivals}"
            pos += 1
        assert pos == len(arrivals)
    assert n.dead_letters() == []
    s = assert_stats_consistent(n)
    assert s["delivered"] == 200 and s["failed_attempts"] == len(failed_first)


def test_different_jobs_are_delivered_in_parallel(make_notifier, receiver) -> None:
    """Job A's answer is held until job B's *second* event arrives. B's second
    event can only be sent once B's first was answered, so if A blocked B the
    hold would time out."""
    b2_arrived = threading.Event()
    a_released: list[bool] = []

    def handler(req):
        event = req.json()["event"]
        if req.job_id == "job-a":
            a_released.append(b2_arrived.wait(3.0))  # server-side delay
        elif event["progress"] == 2:
            b2_arrived.set()
        return None

    receiver.set_handler(handler)
    n = make_notifier(max_connections_per_host=4)
    n.notify("job-a", JobEvent(JobStatus.PROCESSING, progress=1), receiver.url_for("/slow"))
    n.notify("job-b", JobEvent(JobStatus.PROCESSING, progress=1), receiver.url_for("/fast"))
    n.notify("job-b", JobEvent(JobStatus.PROCESSING, progress=2), receiver.url_for("/fast"))
    assert n.flush(5)
    assert a_released == [True], "job B was held up behind job A"
    order = [(r.job_id, r.json()["event"]["progress"]) for r in receiver.requests]
    assert order.index(("job-b", 1)) < order.index(("job-b", 2))
    assert n.stats()["delivered"] == 3


def test_a_slow_endpoint_does_not_delay_other_jobs(make_notifier, receiver) -> None:
    def handler(req):
        if req.path == "/slow":
            return Response(200, delay=1.0)  # server-side delay
        return None

    receiver.set_handler(handler)
    n = make_notifier()
    start = time.monotonic()
    n.notify("slow-job", JobEvent(JobStatus.COMPLETED), receiver.url_for("/slow"))
    n.notify("fast-job", JobEvent(JobStatus.COMPLETED), receiver.url_for("/fast"))
    assert receiver.wait_for(2, timeout=0.8), "the fast job should not wait for the slow one"
    assert time.monotonic() - start < 0.8
    assert n.flush(5)
    assert n.stats()["delivered"] == 2


def test_one_delivery_in_flight_per_job(make_notifier, receiver) -> None:
    second_seen_early: list[bool] = []
    second = threading.Event()

    def handler(req):
        if req.json()["event"]["progress"] == 1:
            second_seen_early.append(second.wait(0.5))  # server-side delay
        else:
            second.set()
        return None

    receiver.set_handler(handler)
    n = make_notifier(max_connections_per_host=8)
    for p in (1, 2):
        n.notify("serial", JobEvent(JobStatus.PROCESSING, progress=p), receiver.url_for())
    assert n.flush(5)
    assert second_seen_early == [False], "event 2 was sent while event 1 was in flight"
    assert [r.json()["event"]["progress"] for r in receiver.requests] == [1, 2]


def test_connection_reuse(make_notifier, receiver) -> None:
    n = make_notifier(max_connections_per_host=4)
    expected = set()
    for i in range(1000):
        job = f"reuse-{i % 50}"
        event = JobEvent(JobStatus.PROCESSING, result={"i": i})
        expected.add(body_of(job, event))
        n.notify(job, event, receiver.url_for())
    assert n.flush(30)
    reqs = receiver.requests
    assert len(reqs) == 1000
    assert {r.body for r in reqs} == expected
    assert all(r.verified for r in reqs)
    assert receiver.connections_accepted <= 4, receiver.connections_accepted
    assert {r.connection_id for r in reqs} <= set(range(1, 5))
    assert n.stats()["delivered"] == 1000


def test_no_busy_loop_while_connection_limit_is_saturated(make_notifier, receiver) -> None:
    """Regression (fixed in e94e01d): with max_connections transfers in flight
    and other lanes ready, the delivery thread looped without polling and
    spun at 100% CPU until a slot freed."""
    # max_connections=1 and four jobs: while one delivery waits on the slow
    # server, three lanes are ready but may not start.
    receiver.respond_with(200, delay=0.25)  # server-side delay
    n = make_notifier(max_connections=1, max_connections_per_host=1)
    for j in range(4):
        n.notify(f"busy-{j}", JobEvent(JobStatus.COMPLETED), receiver.url_for(f"/{j}"))
    cpu0, wall0 = time.process_time(), time.monotonic()
    assert n.flush(5)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    assert wall >= 0.9
    assert cpu < 0.15 * wall, f"process used {cpu:.2f}s of CPU in {wall:.2f}s waiting on a slow server"


def test_no_busy_loop_while_waiting_on_a_slow_server(make_notifier, receiver) -> None:
    """The healthy case of the test above: the per-host limit (lanes wait in
    the host's blocked queue), not the total limit."""
    receiver.respond_with(200, delay=0.25)  # server-side delay
    n = make_notifier(max_connections=8, max_connections_per_host=1)
    for j in range(4):
        n.notify(f"idle-{j}", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    cpu0, wall0 = time.process_time(), time.monotonic()
    assert n.flush(5)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    assert wall >= 0.9
    assert cpu < 0.15 * wall, f"process used {cpu:.2f}s of CPU in {wall:.2f}s"


# -- timeouts and response bodies ------------------------------------------------------
def test_timeout_counts_as_a_failure(make_notifier, receiver) -> None:
    receiver.respond_with(200, delay=2.0)  # server-side delay
    n = make_notifier(timeout_secs=0.3, max_retries=0)
    start = time.monotonic()
    n.notify("timeout-job", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(3)
    assert time.monotonic() - start < 1.5
    (dead,) = n.dead_letters()
    assert dead.attempts == 1
    assert re.search(r"time.?out|timed out", dead.last_error, re.I), dead.last_error
    assert receiver.wait_for(1, 1)


def test_huge_response_body_is_not_read_and_still_delivered(make_notifier, receiver) -> None:
    receiver.respond_with(200, body=b"x" * (10 * 1024 * 1024))
    n = make_notifier()
    start = time.monotonic()
    n.notify("big", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    assert time.monotonic() - start < 3
    assert n.dead_letters() == []
    assert n.stats()["delivered"] == 1


def test_endless_chunked_response_is_cut_off_and_delivered(make_notifier, receiver) -> None:
    sent = [0]

    def endless():
        chunk = b"y" * 65536
        while True:
            sent[0] += 1
            yield chunk

    receiver.respond(Response(200, stream=endless))
    n = make_notifier(max_response_bytes=256 * 1024)
    for i in range(2):
        n.notify("stream", JobEvent(JobStatus.PROCESSING, progress=i), receiver.url_for())
    assert n.flush(5), "an endless response body must not hang the delivery"
    assert n.dead_letters() == []
    assert n.stats()["delivered"] == 2
    assert receiver.wait_for(2, 1)
    # The client hung up early: at most the cap plus what socket buffers took.
    assert sent[0] * 65536 < 2 * 64 * 1024 * 1024, sent[0]


def test_huge_error_response_is_a_failure(make_notifier, receiver) -> None:
    receiver.respond_with(500, body=b"e" * (10 * 1024 * 1024))
    n = make_notifier(max_retries=0)
    n.notify("big-error", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    (dead,) = n.dead_letters()
    assert dead.last_error == "HTTP 500"


def test_zero_max_response_bytes_still_delivers(make_notifier, receiver) -> None:
    receiver.respond_with(200, body=b"a small body")
    n = make_notifier(max_response_bytes=0)
    for i in range(3):
        n.notify("tiny", JobEvent(JobStatus.PROCESSING, progress=i), receiver.url_for())
    assert n.flush(5)
    assert n.stats()["delivered"] == 3
    assert n.dead_letters() == []


# -- close / flush / drain -------------------------------------------------------------------
def test_close_dead_letters_leftovers(make_notifier, receiver) -> None:
    receiver.respond_with(200, delay=2.0)  # server-side delay
    n = make_notifier()
    events = [JobEvent(JobStatus.PROCESSING, progress=i) for i in range(5)]
    for event in events:
        n.notify("leftover", event, receiver.url_for())
    assert receiver.wait_for(1, 2), "the first delivery should be in flight"
    start = time.monotonic()
    n.close(timeout=0.2)
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 2.0, elapsed
    assert n.closed
    with pytest.raises(RuntimeError, match="closed"):
        n.notify("leftover", JobEvent(JobStatus.COMPLETED))
    with pytest.raises(RuntimeError, match="closed"):
        n.notify("other", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    dead = n.dead_letters()
    s = n.stats()
    assert s["pending"] == 0
    assert s["delivered"] + s["dead_lettered"] == 5 == s["submitted"], s
    assert len(dead) == s["dead_lettered"] == 5
    assert [d.event() for d in dead] == events
    assert all("notifier closed" in d.last_error for d in dead), [d.last_error for d in dead]
    assert "in flight" in dead[0].last_error
    assert all(d.attempts == 0 for d in dead[1:])
    assert n.flush(0)
    n.close(timeout=0)  # idempotent
    assert len(receiver.requests) == 1


def test_close_waits_for_pending_deliveries(make_notifier, receiver) -> None:
    receiver.respond_with(200, delay=0.3)  # server-side delay
    n = make_notifier()
    for i in range(2):
        n.notify("graceful", JobEvent(JobStatus.PROCESSING, progress=i), receiver.url_for())
    n.close(timeout=5)
    assert n.stats()["delivered"] == 2
    assert n.dead_letters() == []


def test_context_manager_closes(make_notifier, receiver) -> None:
    from blueprint_notify import JobNotifier

    with JobNotifier(signing_secret=SECRET, allow_private_networks=True, close_timeout_secs=5) as n:
        n.notify("ctx", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.closed
    assert n.stats()["delivered"] == 1
    assert receiver.wait_for(1, 1)


def test_flush_semantics(make_notifier, receiver) -> None:
    n = make_notifier()
    assert n.flush() is True
    assert n.flush(0) is True
    receiver.respond_with(200, delay=0.8)  # server-side delay
    n.notify("flush", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.pending() == 1
    start = time.monotonic()
    assert n.flush(timeout=0.1) is False
    assert 0.08 <= time.monotonic() - start < 0.6
    assert n.pending() == 1
    assert n.flush(5) is True
    assert n.pending() == 0
    with pytest.raises(ValueError):
        n.flush(-1)
    with pytest.raises(TypeError):
        n.flush("soon")


def test_flush_waits_only_for_deliveries_queued_before_it(make_notifier, receiver) -> None:
    """A delivery queued while flush() waits (here from a signal handler run
    inside flush()) does not hold flush() up."""
    import signal

    def handler(req):
        if req.path == "/later":
            return Response(200, delay=3.0)  # server-side delay
        return Response(200, delay=0.4)  # server-side delay

    receiver.set_handler(handler)
    n = make_notifier(timeout_secs=5)
    queued_late: list[bool] = []

    def on_alarm(signum, frame):
        n.notify("later-job", JobEvent(JobStatus.COMPLETED), receiver.url_for("/later"))
        queued_late.append(True)

    n.notify("early-job", JobEvent(JobStatus.COMPLETED), receiver.url_for("/early"))
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        start = time.monotonic()
        assert n.flush(5) is True
        elapsed = time.monotonic() - start
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert queued_late == [True], "the alarm should have fired inside flush()"
    assert elapsed < 2.0, f"flush() waited {elapsed:.2f}s for a delivery queued after it started"
    assert n.pending() == 1
    assert n.stats()["delivered"] == 1


async def test_drain_waits_only_for_deliveries_queued_before_it(make_notifier, receiver) -> None:
    def handler(req):
        return Response(200, delay=3.0 if req.path == "/later" else 0.3)  # server-side delay

    receiver.set_handler(handler)
    n = make_notifier(timeout_secs=5)
    n.notify("early-job", JobEvent(JobStatus.COMPLETED), receiver.url_for("/early"))
    start = time.monotonic()
    drained = asyncio.create_task(n.drain(5))
    await asyncio.sleep(0)  # drain() takes its ticket
    n.notify("later-job", JobEvent(JobStatus.COMPLETED), receiver.url_for("/later"))
    assert await drained is True
    assert time.monotonic() - start < 2.0
    assert n.pending() == 1


async def _http_server(gate: asyncio.Event | None = None):
    """A minimal HTTP/1.1 keep-alive server on the running loop."""
    bodies: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                bodies.append(await reader.readexactly(length))
                if gate is not None:
                    await gate.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, bodies, writers


async def _close_server(server, writers) -> None:
    server.close()
    for w in writers:
        w.close()
    for w in writers:
        try:
            await w.wait_closed()
        except ConnectionError:
            pass
    await server.wait_closed()


async def test_drain_does_not_block_the_loop(make_notifier) -> None:
    server, bodies, writers = await _http_server()
    port = server.sockets[0].getsockname()[1]
    try:
        n = make_notifier(timeout_secs=2)
        assert await n.drain(1) is True  # idle
        for i in range(3):
            n.notify("drain", JobEvent(JobStatus.PROCESSING, progress=i), f"http://127.0.0.1:{port}/h")
        start = time.monotonic()
        assert await n.drain(5) is True
        assert time.monotonic() - start < 1.5
        assert len(bodies) == 3
        assert [json.loads(b)["event"]["progress"] for b in bodies] == [0, 1, 2]
        assert n.dead_letters() == []
        assert n.stats()["delivered"] == 3
    finally:
        await _close_server(server, writers)


async def test_drain_times_out_while_the_loop_keeps_running(make_notifier) -> None:
    gate = asyncio.Event()
    server, bodies, writers = await _http_server(gate)
    port = server.sockets[0].getsockname()[1]
    try:
        n = make_notifier(timeout_secs=3)
        n.notify("gated", JobEvent(JobStatus.COMPLETED), f"http://127.0.0.1:{port}/h")
        assert await n.drain(0.2) is False
        assert len(bodies) == 1, "the server on this loop must have run during drain()"
        gate.set()
        assert await n.drain(5) is True
        assert n.stats()["delivered"] == 1
    finally:
        await _close_server(server, writers)


async def test_async_context_manager_drains(receiver) -> None:
    from blueprint_notify import JobNotifier

    async with JobNotifier(signing_secret=SECRET, allow_private_networks=True) as n:
        n.notify("actx", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.closed
    assert n.stats()["delivered"] == 1


# -- logging ------------------------------------------------------------------------------
def test_dead_letter_is_logged_as_error(make_notifier, caplog) -> None:
    caplog.set_level(logging.INFO, logger="blueprint_notify")
    n = make_notifier(max_retries=1, retry_base_ms=5)
    n.notify("log-job", JobEvent(JobStatus.COMPLETED), UNREACHABLE)
    assert n.flush(5)
    errors = [r for r in caplog.records if r.name == "blueprint_notify.delivery" and r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    msg = errors[0].getMessage()
    assert "log-job" in msg and UNREACHABLE in msg and "2 attempt" in msg
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "retrying" in warnings[0].getMessage()
    caplog.clear()
    n.dead_letters()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "logged twice"


def test_no_log_record_is_lost_silently(make_notifier, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="blueprint_notify")
    n = make_notifier(max_dead_letters=1000)
    for i in range(300):
        n.notify(f"flood-{i}", JobEvent(JobStatus.FAILED), UNREACHABLE)
    assert n.flush(10)
    assert n.stats()["dead_lettered"] == 300
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "dead-lettered" in r.getMessage()]
    dropped = 0
    for r in caplog.records:
        m = re.match(r"(\d+) delivery log records were dropped", r.getMessage())
        if m:
            dropped += int(m.group(1))
    assert len(errors) + dropped == 300


# -- payload fidelity ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "job_id",
    ["job-é-✓", 'quote"and\\backslash', "emoji-🚀", "spaces are fine", "x" * 256, "ü" * 128],
)
def test_unicode_and_special_job_ids_arrive_byte_exact(make_notifier, receiver, job_id) -> None:
    n = make_notifier()
    event = JobEvent(JobStatus.COMPLETED, result={"name": "ü", "emoji": "✓🚀", "nl": "a\nb"}, error="é")
    n.notify(job_id, event, receiver.url_for())
    assert n.flush(5)
    (req,) = receiver.requests
    assert req.body == body_of(job_id, event)
    assert req.json() == {"job_id": job_id, "event": event.to_dict()}
    assert req.headers.get_bytes("X-Job-Id") == job_id.encode("utf-8")
    assert req.job_id == job_id
    assert req.verified


def test_user_agent_header(make_notifier, receiver) -> None:
    n = make_notifier(user_agent="acme-orchestrator/2.1")
    n.notify("ua", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    (req,) = receiver.requests
    assert req.headers["User-Agent"] == "acme-orchestrator/2.1"
    assert "expect" not in req.headers
    assert req.headers["Content-Length"] == str(len(req.body))


def test_default_user_agent(make_notifier, receiver) -> None:
    from blueprint_notify import __version__

    n = make_notifier()
    n.notify("ua", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    assert receiver.requests[0].headers["User-Agent"] == f"blueprint-notify/{__version__}"


def test_same_event_to_two_urls(make_notifier, make_receiver) -> None:
    r1, r2 = make_receiver(), make_receiver()
    n = make_notifier()
    event = JobEvent(JobStatus.COMPLETED)
    n.notify("fanout", event, r1.url_for())
    n.notify("fanout", event, r2.url_for())
    assert n.flush(5)
    assert [r.body for r in r1.requests] == [r.body for r in r2.requests] == [body_of("fanout", event)]


def test_delivery_ids_are_unique_and_increasing(make_notifier) -> None:
    n = make_notifier()
    for i in range(5):
        n.notify("ids", JobEvent(JobStatus.PROCESSING, progress=i), UNREACHABLE)
    assert n.flush(5)
    dead = n.dead_letters()
    assert [d.event().progress for d in dead] == list(range(5))
    ids = [d.id for d in dead]
    assert ids == sorted(set(ids))
    assert all(a < b for a, b in itertools.pairwise(ids))


def test_random_unicode_job_ids_round_trip(make_notifier, receiver) -> None:
    rng = random.Random(7)
    alphabet = (
        [chr(c) for c in range(0x20, 0x7F)]
        + list('"\\/\u00a0\u0085\u2028\u2029\ufeff\u0301é✓\U0001f680\U0010fffd')
        + [chr(rng.randrange(0xA0, 0xD7FF)) for _ in range(50)]
    )
    ids = set()
    while len(ids) < 40:
        candidate = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        if len(candidate.encode()) <= 256 and candidate.strip() == candidate:
            ids.add(candidate)
    n = make_notifier(max_connections_per_host=8)
    expected = {}
    for job_id in ids:
        event = JobEvent(JobStatus.COMPLETED, result={"id": job_id})
        expected[job_id] = body_of(job_id, event)
        n.notify(job_id, event, receiver.url_for())
    assert n.flush(10)
    reqs = receiver.requests
    assert len(reqs) == len(ids)
    for req in reqs:
        job_id = req.headers.get_bytes("X-Job-Id").decode("utf-8")
        assert req.body == expected[job_id]
        assert req.json()["job_id"] == job_id == req.json()["event"]["result"]["id"]
        assert req.verified
