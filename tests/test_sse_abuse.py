"""SSE abuse on a real uvicorn in a process of its own (``tests/abuse_app.py``),
so that its memory, file descriptors and threads are measured apart from the
clients (this process) and the well-behaved client (``tests/abuse_probe.py``,
another process):

1. 5,000 connections opened and abandoned without reading (some with their
   buffers full), then dropped (RST, FIN, plain close): memory bounded,
   streams, subscribers, connections, fds and threads back to the baseline,
   no Python objects left behind, a second round reuses the memory.
2. Slow readers (a byte now and then) are cut off after send_timeout with a
   warning while a good client on the same job gets every event. Two strict
   xfails record what a client that stops reading still holds (known bugs,
   see their reasons): its connection after the cut-off, and its whole
   stream when the job ends while its buffers are full.
3. Clients that leave in the middle of a frame (or of their request): all
   freed, nothing in the server's log.
4. A well-behaved client's notify-to-receive latency under abuse (5,000
   open abandoned streams + slow readers) stays within 2x of idle.

Every test prints its figures (``ABUSE FIGURES ...``: run with ``-s`` to see
them; ``BPN_ABUSE_FIGURES=path`` also appends them there as JSON lines).
Async bodies run under :func:`abuse_support.run` with their own time budget
(test 1 needs more than conftest's 20 s default on a busy machine). Under ``make test-asan`` the server runs with ASan and
PYTHONMALLOC=malloc: memory and latency figures then describe the sanitizer,
so those bounds are not asserted there (and 1,000 connections stand in for
5,000); everything else is.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from abuse_support import (
    AbuseServer,
    Crowd,
    Probe,
    Trickle,
    drain_to_eof,
    events_path,
    log_problems,
    open_paced,
    percentile,
    raise_nofile,
    request_bytes,
    run,
    under_sanitizer,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc, RLIMIT_NOFILE and Linux TCP behaviour")

SANITIZER = under_sanitizer()
STREAMS = 1000 if SANITIZER else 5000
JOBS = 50  # the abandoned streams are spread over this many jobs
HEAVY_JOBS = 5  # ... of which these get large events (their clients' buffers fill up)
SNDBUF = 16384  # the server's SO_SNDBUF (no autotuning): writes back up after a few dozen KiB
SMALL_RCVBUF = 4096  # clients whose receive buffer fills at once
KB_PER_MB = 1024  # RSS figures are in KB
SLOW_LOG = "too slow (send_timeout); stream cut off"
# uvicorn's reaction to an app that returns without finishing its response
# (what a send_timeout cut-off is): one ERROR line per cut-off client.
UVICORN_INCOMPLETE = r"ERROR uvicorn\.error: ASGI callable returned without completing response\."


def figures(test: str, **values: Any) -> None:
    """Prints a test's figures (and appends them to $BPN_ABUSE_FIGURES)."""
    line = json.dumps({"test": test, **values}, default=str)
    print(f"ABUSE FIGURES {line}")
    path = os.environ.get("BPN_ABUSE_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@contextlib.contextmanager
def precondition() -> Iterator[None]:
    """A failed set-up step of an xfail(raises=AssertionError) test is an
    error, not the expected failure."""
    try:
        yield
    except AssertionError as exc:
        raise RuntimeError(f"precondition failed: {exc}") from exc


def assert_clean_log(server: AbuseServer, allowed: tuple[str, ...] = ()) -> None:
    problems = log_problems(server.log(), allowed)
    assert not problems, "the server logged errors:\n" + "\n".join(problems[:40])


def assert_back_to(base: dict[str, Any], after: dict[str, Any], what: str) -> None:
    assert after["fds"] == base["fds"], f"{what}: server fds {after['fds']}, baseline {base['fds']}"
    assert after["threads"] == base["threads"], f"{what}: server threads {after['threads']}, baseline {base['threads']}"
    assert after["tasks"] == base["tasks"], f"{what}: asyncio tasks {after['tasks']}, baseline {base['tasks']}"


# -- 1. 5,000 connections opened and abandoned --------------------------------------------------------
async def _abandon_round(server: AbuseServer, tag: str, per_job: int) -> dict[str, Any]:
    """Opens per_job streams on each of JOBS new jobs (the heavy jobs'
    clients with a small receive buffer), publishes, then drops every
    connection without ever having read a byte. Returns the round's
    figures."""
    jobs = [f"abandon-{tag}-{i}" for i in range(JOBS)]
    tokens = await server.register(jobs)
    heavy, light = jobs[:HEAVY_JOBS], jobs[HEAVY_JOBS:]
    port = server.port
    await server.call("reset_peak")
    async with Crowd() as crowd:
        start = time.monotonic()
        light_socks = await open_paced(
            server, crowd, [request_bytes(port, events_path(j), tokens[j]) for j in light for _ in range(per_job)]
        )
        heavy_socks = await open_paced(
            server,
            crowd,
            [request_bytes(port, events_path(j), tokens[j]) for j in heavy for _ in range(per_job)],
            rcvbuf=SMALL_RCVBUF,
        )
        opened_in = time.monotonic() - start
        total = len(light_socks) + len(heavy_socks)
        opened = await server.stats(gc=True)
        assert opened["open_streams"] == opened["subscribers"] == opened["connections"] == total, opened
        # Every stream sends a few KiB; the heavy ones 128 KiB more, far more
        # than their socket buffers hold: their writes back up in the server.
        for job in jobs:
            await server.call("notify", job=job, count=4, size=1024)
        for job in heavy:
            await server.call("notify", job=job, count=8, size=16 * 1024)
        stalled_in, _ = await server.wait_for(
            lambda s: s["write_paused"] >= len(heavy_socks), 20, f"{len(heavy_socks)} heavy streams stalled"
        )
        loaded = await server.stats(gc=True)
        # Drop them all: RST (SO_LINGER 0), FIN (half-close, the socket stays
        # open here), plain close (an RST too: unread data). A half-closed
        # client the server still has data queued for would be waited for
        # until send_timeout (it may still read): the heavy ones get RSTs.
        closed_at = time.monotonic()
        crowd.close(light_socks, itertools.cycle(("rst", "fin", "close")))
        crowd.close(heavy_socks, itertools.cycle(("rst", "close")))
        idle_in, _ = await server.wait_idle(20)
        freed_in = time.monotonic() - closed_at
        after = await server.stats(gc=True)
    return {
        "streams": total,
        "opened_in_s": round(opened_in, 2),
        "rss_open_kb": opened["rss_kb"],
        "rss_loaded_kb": loaded["rss_kb"],
        "peak_kb": after["hwm_kb"],  # VmHWM since the round began
        "write_buffered_kb": loaded["write_buffered"] // 1024,
        "write_paused": loaded["write_paused"],
        "stalled_in_s": round(stalled_in, 2),
        "gc_ms_with_streams_open": round(opened["gc_ms"], 1),
        "freed_in_s": round(freed_in, 3),
        "idle_poll_s": round(idle_in, 3),
        "rss_after_kb": after["rss_kb"],
        "blocks_open": opened["blocks"],
        "blocks_after": after["blocks"],
        "gc_objects_open": opened["gc_objects"],
        "gc_objects_after": after["gc_objects"],
        "after": after,
    }


async def _abandoned(tmp_path: Path) -> None:
    per_job = STREAMS // JOBS
    heavy_streams = HEAVY_JOBS * per_job
    async with AbuseServer(tmp_path / "server.log", sndbuf=SNDBUF) as server:
        # A small round first: first-use costs (the loop hub, the ticker,
        # caches, lazily imported code) belong in the baseline.
        await _abandon_round(server, "warm-up", per_job=2)
        base = await server.stats(gc=True)
        rounds = [await _abandon_round(server, str(i), per_job) for i in range(2)]
        trimmed = await server.stats(gc=True, trim=True)
    assert server.exit_code == 0, server.log()

    first, second = rounds
    idle_kb = (first["rss_open_kb"] - base["rss_kb"]) / STREAMS
    peak_growth = max(r["peak_kb"] for r in rounds) - base["rss_kb"]
    figures(
        "abandoned",
        streams=STREAMS,
        heavy_streams=heavy_streams,
        rss_baseline_kb=base["rss_kb"],
        kb_per_idle_stream=round(idle_kb, 1),
        kb_per_stalled_stream=round(first["write_buffered_kb"] / heavy_streams, 1),
        peak_growth_mb=round(peak_growth / KB_PER_MB, 1),
        rss_after_trim_kb=trimmed["rss_kb"],
        blocks_baseline=base["blocks"],
        gc_objects_baseline=base["gc_objects"],
        fds_baseline=base["fds"],
        threads=base["threads"],
        rounds=[{k: v for k, v in r.items() if k != "after"} for r in rounds],
    )
    for i, r in enumerate(rounds, 1):
        what = f"round {i}"
        assert r["streams"] == STREAMS
        assert r["write_paused"] == heavy_streams, r
        assert_back_to(base, r["after"], what)
        # No Python object left per stream: a leak of even one per stream
        # would show as +STREAMS (memory blocks also count what freelists
        # and caches keep: a one-off few hundred). Unrelated one-offs of up
        # to ~120 tracked objects were seen in loaded CI runs, which is more
        # than a tenth of the 1,000 streams of the sanitizer run.
        assert r["gc_objects_after"] - base["gc_objects"] < max(STREAMS // 10, 300), (what, r, base)
        assert r["blocks_after"] - base["blocks"] < STREAMS // 2, (what, r, base)
        assert r["freed_in_s"] < 10, r
    assert_clean_log(server)
    if SANITIZER:
        return
    # Bounded: the whole crowd, idle streams and stalled buffers, in < 200 MB
    # (an idle stream costs uvicorn's connection and our stream, ~12 KB).
    assert idle_kb < 40, f"{idle_kb:.1f} KB per idle stream"
    assert peak_growth < 200 * KB_PER_MB, f"peak RSS {peak_growth / KB_PER_MB:.0f} MB above the baseline"
    # Memory is given back to the allocators and reused: a second round
    # does not grow the process beyond the first one's peak. (RSS itself
    # does not drop back to the baseline once the crowd is gone: glibc's heap
    # and pymalloc's arenas keep most of it, see gc_objects for the leak
    # check; how much they keep varies from round to round.)
    assert second["peak_kb"] <= first["peak_kb"] + 16 * KB_PER_MB, (first["peak_kb"], second["peak_kb"])
    for r in rounds:
        assert r["rss_after_kb"] <= r["peak_kb"] + 4 * KB_PER_MB, r


def test_5000_abandoned_streams_are_freed(tmp_path: Path) -> None:
    with raise_nofile(STREAMS + 1024):
        run(lambda: _abandoned(tmp_path), budget=50)


# -- 2. slow readers ---------------------------------------------------------------------------------
SLOW_READERS = 200


async def _slow_readers(tmp_path: Path) -> None:
    send_timeout, events, size = 1.0, 100, 8 * 1024
    async with AbuseServer(
        tmp_path / "server.log", sndbuf=SNDBUF, send_timeout=send_timeout, sse_capacity=256
    ) as server:
        job = "slow-readers"
        tokens = await server.register([job, "warm-up"])
        # The same in small first: first-use costs (the cut-off and logging
        # paths, the producer, a stream's end) belong in the baseline.
        async with Crowd() as crowd:
            request = request_bytes(server.port, events_path("warm-up"), tokens["warm-up"])
            await open_paced(server, crowd, [request] * 4, rcvbuf=SMALL_RCVBUF)
            async with Probe(server.port, events_path("warm-up"), tokens["warm-up"], 21, to_end=True) as probe:
                await probe.ready()
                await server.call("notify", job="warm-up", count=20, size=size)
                await server.wait_for(lambda s: s["write_paused"] == 4, 10, "warm-up readers stalled")
                # The send that times out, by a producer, the job's end.
                await server.call("produce", name="warm-up", job="warm-up", count=1, interval=0, terminal=True)
                assert (await probe.result())["ended"]
                await server.call("join", name="warm-up")
            await server.wait_for(lambda s: s["open_streams"] == 0, send_timeout + 5, "warm-up readers cut off")
        await server.wait_idle(5)
        log_start = len(server.log())
        base = await server.stats(gc=True)
        await server.call("reset_peak")
        request = request_bytes(server.port, events_path(job), tokens[job])
        async with Crowd() as crowd:
            slow = await open_paced(server, crowd, [request] * SLOW_READERS, rcvbuf=SMALL_RCVBUF)
            trickle = Trickle(slow, period=0.1, nbytes=1).start()
            try:
                async with Probe(server.port, events_path(job), tokens[job], events) as probe:
                    await probe.ready()
                    start = time.monotonic()
                    # 8 KiB events, 100 a second, until every slow reader is
                    # gone (so each stalled stream has a next send, which
                    # times out); the good client reads the first `events`.
                    await server.call("produce", name="job", job=job, count=None, interval=0.01, size=size)
                    good = await probe.result()
                    during = await server.stats()
                await server.wait_for(
                    lambda s: s["open_streams"] == 0 and s["subscribers"] == 0,
                    send_timeout + 10,
                    "every slow reader cut off",
                )
                cut_at = time.monotonic() - start
                produced = await server.call("halt", name="job")
            finally:
                await trickle.stop()
            peak = await server.stats(gc=True)
            # The slow clients find what was queued before the stall, then the
            # end of the connection (no terminating chunk: an EventSource
            # reconnects with Last-Event-ID).
            drained = await asyncio.gather(*(drain_to_eof(s, 10) for s in slow))
        idle_in, _ = await server.wait_idle(10)
        after = await server.stats(gc=True)
    assert server.exit_code == 0, server.log()

    log = server.log()[log_start:]
    cut_off = log.count(SLOW_LOG)
    latency = good["latency_us"]
    figures(
        "slow_readers",
        slow_readers=SLOW_READERS,
        send_timeout_s=send_timeout,
        events=events,
        event_kb=size // 1024,
        cut_off_logged=cut_off,
        cut_off_after_s=round(cut_at, 2),
        good_events=len(good["events"]),
        good_lagged=good["lagged"],
        good_pings=good["pings"],
        good_p50_ms=round(percentile(latency, 50) / 1000, 3),
        good_p99_ms=round(percentile(latency, 99) / 1000, 3),
        rss_baseline_kb=base["rss_kb"],
        peak_growth_mb=round((peak["hwm_kb"] - base["rss_kb"]) / KB_PER_MB, 1),
        write_buffered_kb=during["write_buffered"] // 1024,
        kb_buffered_per_slow_reader=round(during["write_buffered"] / 1024 / SLOW_READERS, 1),
        rss_after_kb=after["rss_kb"],
        freed_after_clients_left_s=round(idle_in, 3),
        produced=produced,
    )
    # The good client got every event, in order, without a lag.
    assert good["error"] is None, good
    assert good["events"] == list(range(1, events + 1)), good["events"]
    assert not good["lagged"], good
    # Every slow reader was cut off (one warning each), none before it had
    # stalled for send_timeout; they stall within a fraction of a second.
    assert cut_off == SLOW_READERS, f"{cut_off} cut-off warnings for {SLOW_READERS} slow readers"
    assert send_timeout <= cut_at < send_timeout + 5, cut_at
    for trickled, (rest, _) in zip(trickle.got, drained):
        head, _, chunks = (bytes(trickled) + rest).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert not chunks.endswith(b"0\r\n\r\n"), "a cut-off stream was ended as if complete"
    assert_back_to(base, after, "after the slow readers")
    # A stream that leaked would leave ~50 objects (its task, frames,
    # futures); fewer objects than clients means none did. (A handful of
    # unrelated ones, a logging record or a pending callback on a busy
    # machine, may still be there: ~120 in a loaded CI run.)
    assert after["gc_objects"] - base["gc_objects"] < SLOW_READERS, (base, after)
    # Allowed: the cut-off warnings and uvicorn's ERROR for each (see the
    # report: uvicorn calls an app that returns mid-response an error).
    assert log.count("ASGI callable returned without completing response") == SLOW_READERS
    assert_clean_log(server, (UVICORN_INCOMPLETE,))
    if not SANITIZER:
        # Bounded: until it is cut off, each stalled stream holds what its
        # transport queued (up to uvicorn's 64 KiB high-water mark plus the
        # last chunk: ~70 KB here) and the chunk it waits to send.
        assert peak["hwm_kb"] - base["rss_kb"] < 100 * KB_PER_MB


def test_slow_readers_are_cut_off_and_a_good_client_gets_every_event(tmp_path: Path) -> None:
    with raise_nofile(SLOW_READERS + 1024):
        run(lambda: _slow_readers(tmp_path), budget=40)


async def _cut_off_then_stay(tmp_path: Path, user_timeout: float | None = None) -> None:
    send_timeout, clients = 0.5, 20
    async with AbuseServer(
        tmp_path / "server.log", sndbuf=SNDBUF, send_timeout=send_timeout, user_timeout=user_timeout
    ) as server:
        job = "stay"
        tokens = await server.register([job])
        base = await server.stats(gc=True)
        async with Crowd() as crowd:
            request = request_bytes(server.port, events_path(job), tokens[job])
            with precondition():
                await open_paced(server, crowd, [request] * clients, rcvbuf=SMALL_RCVBUF)
                # 8 x 16 KiB: the streams stall; the next event's send times out.
                await server.call("notify", job=job, count=8, size=16 * 1024)
                await server.wait_for(lambda s: s["write_paused"] == clients, 5, "clients' buffers full")
                await server.call("notify", job=job, count=1, size=0)
                await server.wait_for(lambda s: s["open_streams"] == 0, send_timeout + 5, "streams cut off")
                assert server.log().count(SLOW_LOG) == clients
            # The clients stay connected and never read. The server is done
            # with them: their sockets and buffers should be gone too.
            await server.wait_for(
                lambda s: s["connections"] == 0,
                send_timeout + 3 + (user_timeout or 0),
                "connections of cut-off clients closed",
            )
            # A cut-off stream's timeout leaves reference cycles (exception,
            # frames) that hold its loop's waker (an eventfd) until the
            # cyclic GC runs: collect, then count.
            after = await server.stats(gc=True)
            assert after["fds"] == base["fds"], (base["fd_kinds"], after["fd_kinds"])


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="KNOWN LIMITATION (ASGI has no abort): a send_timeout cut-off ends the stream but not "
    "the connection. The app returns mid-response; uvicorn then calls transport.close(), which "
    "waits to flush what is queued: a client that stays connected without reading keeps its "
    "socket, fd and the queued bytes (up to 64 KiB + one chunk) in the server for as long as "
    "it likes. Workaround (README): serve from asgi.listening_socket(user_timeout=...), see the "
    "passing test below",
)
def test_cut_off_connection_is_released_while_the_client_stays(tmp_path: Path) -> None:
    run(lambda: _cut_off_then_stay(tmp_path), budget=30)


def test_cut_off_connection_is_released_with_tcp_user_timeout(tmp_path: Path) -> None:
    """listening_socket(user_timeout=1): the kernel drops the connection of
    a cut-off client that stays without reading about a second later."""
    run(lambda: _cut_off_then_stay(tmp_path, user_timeout=1.0), budget=30)


async def _terminal_then_stall(tmp_path: Path) -> None:
    send_timeout, clients = 0.5, 10
    async with AbuseServer(tmp_path / "server.log", sndbuf=SNDBUF, send_timeout=send_timeout) as server:
        job = "short-job"
        tokens = await server.register([job])
        # The whole job (8 x 16 KiB, then its terminal event) is published
        # before the clients come: each stream sends it in one chunk, which
        # fills the client's buffers, and then ends the response.
        await server.call("notify", job=job, count=9, size=16 * 1024, terminal=True)
        async with Crowd() as crowd:
            request = request_bytes(server.port, events_path(job), tokens[job])
            with precondition():
                await open_paced(server, crowd, [request] * clients, rcvbuf=SMALL_RCVBUF)
                await server.wait_for(lambda s: s["write_paused"] == clients, 5, "clients' buffers full")
            # The clients never read: cut off within send_timeout.
            await server.wait_for(
                lambda s: s["open_streams"] == 0 and s["subscribers"] == 0,
                send_timeout + 3,
                "streams of clients that stopped reading cut off",
            )


def test_stream_ending_with_the_client_not_reading_is_cut_off(tmp_path: Path) -> None:
    """(Found here: the response's last send, after the terminal event,
    max_stream_secs or end(), was not bounded by send_timeout.)"""
    run(lambda: _terminal_then_stall(tmp_path), budget=30)


# -- 3. disconnects mid-frame ----------------------------------------------------------------------------
FRAME_SIZES = {"tiny": 100, "medium": 8 * 1024, "large": 64 * 1024, "huge": 256 * 1024}
PER_SIZE = 60


async def _read_half_frame_and_leave(port: int, request: bytes, size: int, mode: str) -> int:
    """Reads the response head and about half of the first event's frame
    (``size`` is its result's length), then leaves (``mode``). Returns the
    bytes read."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        got = bytearray()
        while b"\nid: " not in got:
            data = await loop.sock_recv(sock, 4096)
            assert data, f"closed early: {bytes(got)!r}"
            got += data
        want = got.index(b"\nid: ") + (size + 100) // 2
        while len(got) < want:
            data = await loop.sock_recv(sock, min(4096, want - len(got)))
            assert data, "closed early"
            got += data
        if mode == "fin":
            sock.shutdown(socket.SHUT_WR)  # FIN, then close(): an RST for what is unread
        Crowd.close_one(sock, "rst" if mode == "rst" else "close")
        return len(got)
    finally:
        sock.close()


async def _mid_frame(tmp_path: Path) -> None:
    # sse_capacity 4: a stream's first chunk (the job's history) stays small
    # (4 x 256 KiB at most) with 60 clients at a time on the largest frames.
    async with AbuseServer(tmp_path / "server.log", sndbuf=SNDBUF, sse_capacity=4) as server:
        jobs = list(FRAME_SIZES)
        tokens = await server.register(jobs + ["warm-up"])
        async with Crowd() as crowd:
            await open_paced(server, crowd, [request_bytes(server.port, events_path("warm-up"), tokens["warm-up"])])
        await server.wait_idle(5)
        base = await server.stats(gc=True)
        await server.call("reset_peak")
        for job, size in FRAME_SIZES.items():
            await server.call("notify", job=job, count=3, size=size)
        # More events keep coming while the clients leave.
        for job, size in FRAME_SIZES.items():
            await server.call("produce", name=job, job=job, count=None, interval=0.02, size=size, stamp=False)
        modes = itertools.cycle(("rst", "close", "fin"))
        gate = asyncio.Semaphore(100)

        async def client(job: str, mode: str) -> int:
            async with gate:
                request = request_bytes(server.port, events_path(job), tokens[job])
                return await asyncio.wait_for(
                    _read_half_frame_and_leave(server.port, request, FRAME_SIZES[job], mode), 15
                )

        start = time.monotonic()
        read = await asyncio.gather(*(client(job, next(modes)) for job in jobs for _ in range(PER_SIZE)))
        # Clients that leave in the middle of their request, or right after
        # the response head.
        async with Crowd() as crowd:
            request = request_bytes(server.port, events_path("large"), tokens["large"])
            half = await crowd.connect(server.port, [request[: len(request) // 2]] * 30)
            crowd.close(half, itertools.cycle(("rst", "close", "fin")))
            heads = await crowd.connect(server.port, [request] * 30)
            for sock in heads:
                sock.setblocking(True)
                sock.settimeout(10)
                assert sock.recv(12) == b"HTTP/1.1 200"
            crowd.close(heads, itertools.cycle(("rst", "close")))
            crowd.close_all("close")
        left_in = time.monotonic() - start
        for job in jobs:
            await server.call("halt", name=job)
        idle_in, _ = await server.wait_idle(10)
        after = await server.stats(gc=True)
    assert server.exit_code == 0, server.log()

    figures(
        "mid_frame",
        clients=len(read) + 60,
        frame_sizes=FRAME_SIZES,
        clients_in_s=round(left_in, 2),
        freed_in_s=round(idle_in, 3),
        rss_baseline_kb=base["rss_kb"],
        peak_growth_mb=round((after["hwm_kb"] - base["rss_kb"]) / KB_PER_MB, 1),
        rss_after_kb=after["rss_kb"],
        fds=(base["fds"], after["fds"]),
    )
    assert_back_to(base, after, "after the mid-frame disconnects")
    # Fewer objects than clients: no stream leaked (see the slow readers).
    assert after["gc_objects"] - base["gc_objects"] < 240, (base, after)
    assert_clean_log(server)
    if not SANITIZER:
        # Bounded by what is in flight at once: up to 60 clients of the
        # 256 KiB frames, each stream's first chunk holding up to 4 of them
        # (1 MiB) plus the transport's copy. 15 MB on a quiet machine, 140
        # MB seen in a CI run where they overlapped more.
        assert after["hwm_kb"] - base["rss_kb"] < 200 * KB_PER_MB


def test_clients_leaving_mid_frame_are_freed_without_errors(tmp_path: Path) -> None:
    with raise_nofile(2048):
        run(lambda: _mid_frame(tmp_path), budget=40)


# -- 4. a good client's latency under abuse ------------------------------------------------------------
PROBE_EVENTS = 200
PROBE_INTERVAL = 0.005
_probe_jobs = itertools.count()


async def _probe(server: AbuseServer) -> dict[str, Any]:
    """One latency run: a fresh job (no history to replay), the probe
    connected, then PROBE_EVENTS events, one every PROBE_INTERVAL seconds,
    each stamped just before notify()."""
    job = f"probe-{next(_probe_jobs)}"
    token = (await server.register([job]))[job]
    async with Probe(server.port, events_path(job), token, PROBE_EVENTS) as probe:
        await probe.ready()
        await server.call("monitor")
        await server.call("produce", name="probe", job=job, count=PROBE_EVENTS, interval=PROBE_INTERVAL)
        result = await probe.result()
        await server.call("join", name="probe")
        monitor = await server.call("monitor")
    assert result["error"] is None, result
    assert result["events"] == list(range(1, PROBE_EVENTS + 1)) and not result["lagged"], result["events"]
    lat = result["latency_us"]
    return {
        "p50_ms": round(percentile(lat, 50) / 1000, 3),
        "p90_ms": round(percentile(lat, 90) / 1000, 3),
        "p99_ms": round(percentile(lat, 99) / 1000, 3),
        "max_ms": round(max(lat) / 1000, 3),
        **{k: round(v, 1) for k, v in monitor.items()},
    }


async def _latency(tmp_path: Path) -> None:
    slow_readers = SLOW_READERS
    # sse_capacity 1024: a server pause (a full garbage collection with
    # thousands of streams takes ~0.2 s) must not make the probe lag; its
    # latency is what is measured.
    async with AbuseServer(tmp_path / "server.log", sndbuf=SNDBUF, sse_capacity=1024) as server:
        jobs = [f"abuser-{i}" for i in range(JOBS)]
        tokens = await server.register(jobs + ["firehose"])
        await _probe(server)  # warm-up
        idle = await _probe(server)
        async with Crowd() as crowd:
            start = time.monotonic()
            per_job = STREAMS // JOBS
            await open_paced(
                server,
                crowd,
                [request_bytes(server.port, events_path(j), tokens[j]) for j in jobs for _ in range(per_job)],
            )
            for job in jobs:
                await server.call("notify", job=job, count=2, size=512)
            slow = await open_paced(
                server,
                crowd,
                [request_bytes(server.port, events_path("firehose"), tokens["firehose"])] * slow_readers,
                rcvbuf=SMALL_RCVBUF,
            )
            trickle = Trickle(slow, period=0.1, nbytes=1).start()
            try:
                # The slow readers' job publishes 8 KiB events, 100 a second.
                await server.call("produce", name="firehose", job="firehose", count=None, interval=0.01,
                                  size=8 * 1024, stamp=False)  # fmt: skip
                await server.wait_for(lambda s: s["write_paused"] >= slow_readers, 20, "slow readers stalled")
                abuse_ready_in = time.monotonic() - start
                during = await server.stats()
                abused = await _probe(server)
                await server.call("halt", name="firehose")
            finally:
                await trickle.stop()
        await server.wait_idle(20)
        idle_after = await _probe(server)
    assert server.exit_code == 0, server.log()

    figures(
        "latency",
        probe_events=PROBE_EVENTS,
        interval_ms=PROBE_INTERVAL * 1000,
        abandoned_streams=STREAMS,
        slow_readers=slow_readers,
        abuse_ready_in_s=round(abuse_ready_in, 2),
        open_streams_during=during["open_streams"],
        rss_during_kb=during["rss_kb"],
        idle=idle,
        abused=abused,
        idle_after=idle_after,
    )
    assert during["open_streams"] == STREAMS + slow_readers
    assert_clean_log(server)
    if SANITIZER:
        return
    # The bound of the issue, with 2 ms of slack for a busy 2-core machine.
    assert abused["p50_ms"] <= 2 * idle["p50_ms"] + 2.0, (idle, abused)


def test_good_client_latency_under_abuse_within_2x_of_idle(tmp_path: Path) -> None:
    with raise_nofile(STREAMS + SLOW_READERS + 1024):
        run(lambda: _latency(tmp_path), budget=50)
