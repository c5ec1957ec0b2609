"""Fan-out: 1,000 concurrent SSE streams on one job, on a real uvicorn,
all receive every event in order. The clients are raw asyncio streams in
this process (far cheaper than 1,000 httpx clients)."""

from __future__ import annotations

import asyncio
import resource
import time

import pytest
from sse_support import RETRY, RawHTTP, eventually, frames, make_sse  # noqa: F401  (make_sse: fixture)

from blueprint_notify import JobEvent, JobStatus

STREAMS = 1000


@pytest.fixture
def enough_fds():
    """Raises the soft RLIMIT_NOFILE for 1,000 client and 1,000 server sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * STREAMS + 512
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_1000_streams_on_one_job_receive_every_event(enough_fds, make_sse) -> None:
    sse = make_sse(server_kwargs={"backlog": 2048, "limit_concurrency": None})
    job, token = sse.new_job("fanout")
    headers = {"Authorization": f"Bearer {token}"}
    start = time.monotonic()
    raws = await asyncio.gather(
        *(RawHTTP.request(sse.port, sse.path_for(job), headers, read_head=False) for _ in range(STREAMS))
    )
    try:

        async def opened(raw: RawHTTP) -> None:
            await asyncio.wait_for(raw.read_head(), 10)
            assert raw.status == 200
            await raw.read_until(RETRY, timeout=10)

        await asyncio.gather(*(opened(raw) for raw in raws))
        assert sse.app.open_streams == STREAMS
        connected = time.monotonic() - start
        # Every stream is live; now the job runs.
        events = [JobEvent(JobStatus.PROCESSING, progress=p, timestamp=p) for p in (0, 25, 50, 75, 99)]
        events.append(JobEvent(JobStatus.COMPLETED, progress=100, result={"rows": 1000}, timestamp=100))
        for e in events:
            sse.notifier.notify(job, e)
        bodies = await asyncio.gather(*(raw.read_to_end(timeout=10) for raw in raws))
        expected = RETRY + frames(events)
        wrong = [i for i, (raw, body) in enumerate(zip(raws, bodies)) if body != expected or not raw.complete]
        assert not wrong, f"{len(wrong)} streams got something else, e.g. #{wrong[0]}: {bodies[wrong[0]]!r}"
        total = time.monotonic() - start
        assert total < 15, f"connect {connected:.1f} s, total {total:.1f} s"
    finally:
        await asyncio.gather(*(raw.close() for raw in raws))
    await eventually(lambda: sse.app.open_streams == 0, 5, "all streams released")
    await eventually(lambda: not sse.notifier._hubs, 5, "loop hub released")
