"""The Redis broker (``broker_url``) across processes: uvicorn workers,
producer processes and a real ``redis-server`` (tests/redis_util.py).

* Two uvicorn worker processes (``tests/broker_worker.py``) on two ports,
  a job registered by one producer process and produced by another: a
  client on worker A and one on worker B each get every event, in order,
  byte-exact (``JobEvent.to_json()``), with strictly increasing ids that are
  the same on both workers; a client resuming on worker B with a
  ``Last-Event-ID`` from the middle gets exactly the rest (same ids), a late
  client without one gets the whole history, and one resuming after the
  terminal event gets 204. The token validates in every process (the
  workers, the test's own notifier); a wrong one is 403 on both workers.
* Two producer processes notifying one job at the same time (ids that
  collide or go backwards are re-sequenced in Redis): both workers stream
  the same events with the same ids in the same order, each producer's
  events in its own order.
* Redis SIGKILLed in the middle of a stream and restarted on the same port
  (AOF): the producer goes on notifying meanwhile (buffered), and the
  client (same connection, or reconnecting with ``Last-Event-ID`` if the
  stream ended) gets every event exactly once, in order; another worker
  replays the same history afterwards.
* A worker away from Redis (frozen with SIGSTOP across a Redis restart)
  while more events were published than Redis keeps (the producer's
  ``sse_capacity``): its client gets every event or a lagged frame (at
  least 1 skipped: the exact number trimmed is not known), never a silent
  gap.
* ``uvicorn --workers 2`` on one port: the two worker processes (told apart
  by ``GET /_worker``) stream the same events with the same ids.
* In-process: with Redis down, notify() buffers up to ``broker_buffer``
  events (local subscribers get them at once), then raises BrokerError;
  once Redis is back the buffered events reach another notifier's
  subscriber, in order. Two notifiers notifying one job while one of them
  has its Redis traffic held up (a paused TCP proxy), either one first:
  every subscriber gets every event or is told it lagged, never a silent
  gap. A malformed ``broker_url`` is a ValueError naming it (config
  time); an unreachable Redis is a BrokerError at construction, within a
  few seconds.

The tests drive every step through the producers' stdin
(tests/broker_producer.py) and wait on what they read back (stream frames,
producer replies, subscriptions), each wait bounded; nothing sleeps to wait
for work. Every process started here
(redis-server, uvicorn, producers) is stopped at teardown, failure or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from broker_producer import final_event, progress_event
from redis_util import HOST, PausableProxy, RedisServer, free_port, redis_server  # noqa: F401  (redis_server: fixture)
from sse_support import events_path

from blueprint_notify import (
    BrokerError,
    JobEvent,
    JobNotifier,
    NotifierConfig,
    Subscription,
    SubscriptionClosed,
    SubscriptionLagged,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="subprocesses, signals and a local redis-server")

logger = logging.getLogger(__name__)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PRODUCER = str(TESTS / "broker_producer.py")
STARTUP_TIMEOUT = 15.0  # generous: only reached when something is broken
STOP_TIMEOUT = 10.0
WAIT = 10.0  # any single wait for events or a producer's reply
WRONG_TOKEN = "0" * 64


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)  # LD_PRELOAD, ASAN_OPTIONS... under tools/asan-env
    paths = [str(ROOT), str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def _bounded_wait(seconds: float) -> None:
    threading.Event().wait(seconds)  # poll tick of a bounded wait, not a wait for work


# -- uvicorn workers ----------------------------------------------------------------------
class Worker:
    """``uvicorn --factory broker_worker:create_app`` in a subprocess (its own
    session) on 127.0.0.1 and a free port; ``processes`` > 1 runs
    ``--workers N`` on that port."""

    def __init__(self, broker_url: str, log_path: Path, processes: int = 1) -> None:
        self.broker_url = broker_url
        self.log_path = log_path
        self.processes = processes
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def stream_url(self, job_id: str) -> str:
        return self.url + events_path(job_id)

    def log(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def spawn(self) -> None:
        self.port = free_port()
        self._log = open(self.log_path, "ab")
        self._log_start = self._log.tell()
        args = [
            sys.executable, "-m", "uvicorn",
            "--factory", "broker_worker:create_app",
            "--app-dir", str(TESTS),
            "--host", HOST,
            "--port", str(self.port),
            "--log-level", "warning",
            "--no-access-log",
            "--timeout-graceful-shutdown", "3",
        ]  # fmt: skip
        if self.processes > 1:
            args += ["--workers", str(self.processes)]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env(BPN_TEST_BROKER_URL=self.broker_url),
            cwd=ROOT,
            start_new_session=True,
        )

    def pid_of_worker(self, timeout: float = 2.0) -> int | None:
        """``GET /_worker`` on a new connection: the pid of the process that
        answered, None if nothing answered."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request("GET", "/_worker")
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                return None
            return int(json.loads(body)["pid"])
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def wait_ready(self, deadline: float) -> bool:
        """True once it answers; False if it could not bind its port (taken
        in the meantime: spawn again)."""
        assert self.proc is not None
        while self.pid_of_worker() is None:
            if self.proc.poll() is not None:
                log = self.log(self._log_start)
                if "address already in use" in log.lower():
                    self._close_log()
                    return False
                raise RuntimeError(f"uvicorn worker exited with {self.proc.returncode} at startup\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn worker not ready within {STARTUP_TIMEOUT} s\n{self.log()}")
            _bounded_wait(0.02)
        return True

    def stop(self) -> None:
        """SIGTERM (after a SIGCONT, in case a test froze it); after
        STOP_TIMEOUT, SIGKILL to its whole session."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                logger.warning("uvicorn %d ignored SIGTERM; killing its process group", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        if proc is not None and self.processes > 1:
            # The supervisor waited for its workers; make sure none is left.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture
def start_workers(tmp_path: Path) -> Iterator[Callable[..., list[Worker]]]:
    """``start_workers(n, broker_url, processes=1)``: n uvicorn worker
    servers, started in parallel and ready. All are stopped at teardown,
    which fails if any of them logged a traceback."""
    workers: list[Worker] = []

    def start(n: int, broker_url: str, processes: int = 1) -> list[Worker]:
        new = [Worker(broker_url, tmp_path / f"worker-{len(workers) + i}.log", processes) for i in range(n)]
        workers.extend(new)
        for w in new:
            w.spawn()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for w in new:
            for _ in range(5):
                if w.wait_ready(deadline):
                    break
                w.spawn()  # its port was taken: another free port
            else:
                raise RuntimeError(f"uvicorn found no free port\n{w.log()}")
        return new

    try:
        yield start
    finally:
        for w in workers:
            w.stop()
    for w in workers:
        log = w.log()
        assert "Traceback" not in log, f"worker on port {w.port} logged an error:\n{log}"


# -- producers ------------------------------------------------------------------------------
class Producer:
    """tests/broker_producer.py in a subprocess (asyncio): commands on its
    stdin, replies read line by line with deadlines."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.token = "-"

    @classmethod
    async def start(cls, broker_url: str, job_id: str, *flags: str, log_path: Path) -> Producer:
        with open(log_path, "ab") as err:  # the child has its own copy
            proc = await asyncio.create_subprocess_exec(
                sys.executable, PRODUCER, "--broker", broker_url, "--job", job_id, *flags,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=child_env(),
                cwd=ROOT,
            )  # fmt: skip
        return cls(proc, log_path)

    async def ready(self) -> str:
        """Waits for the ready line; the token (``-`` without --register)."""
        line = await self.read_line(STARTUP_TIMEOUT)
        assert line.startswith("ready "), line
        self.token = line.split(" ", 1)[1]
        return self.token

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def read_line(self, timeout: float = WAIT) -> str:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"producer {self.proc.pid}: no reply within {timeout} s\n{self.log()}") from None
        if not line:
            code = await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            raise AssertionError(f"producer {self.proc.pid} ended (exit code {code})\n{self.log()}")
        return line.decode().rstrip("\n")

    async def command(self, command: str, expect: str, timeout: float = WAIT) -> str:
        """Sends a command; its reply, which must start with ``expect``
        (``error ...`` lines, a failed notify() each, fail the test)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        reply = await self.read_line(timeout)
        assert reply.startswith(expect), f"{command!r}: expected {expect!r}, got {reply!r}\n{self.log()}"
        return reply

    async def stats(self) -> dict[str, float]:
        reply = await self.command("stats", "stats ")
        return dict(json.loads(reply[len("stats ") :]))

    async def quit(self) -> None:
        """quit: flush, close, exit 0."""
        assert (await self.command("quit", "done ")) == "done True"
        code = await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        assert code == 0, f"producer exited with {code}\n{self.log()}"
        await self.close()

    async def close(self) -> None:
        """Kills it if it still runs; closes the pipes and reaps it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        if self.proc.stdout is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.stdout.read(), STOP_TIMEOUT)


# -- SSE client ----------------------------------------------------------------------------------
_FRAME = re.compile(rb"id: (\d+)\nevent: ([a-z]+)\ndata: ([^\n]*)")
_RETRY = re.compile(rb"retry: \d+")


@dataclass(frozen=True)
class Frame:
    id: int
    event: str
    data: str


class Stream:
    """One GET of a job's event stream (on a new connection, or on the
    given client's), read in a task.
    Frames must be exactly ``id: N\\nevent: S\\ndata: JSON``; ``retry:``
    and ``: ping`` blocks are allowed, anything else is recorded in
    ``problems``. ``complete``: the server ended the body properly;
    ``error``: the connection broke or the request failed."""

    def __init__(
        self, url: str, token: str | None, last_event_id: int | None = None, client: httpx.AsyncClient | None = None
    ) -> None:
        self.url = url
        self.client = client
        self.headers: dict[str, str] = {}
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"
        if last_event_id is not None:
            self.headers["Last-Event-ID"] = str(last_event_id)
        self.status: int | None = None
        self.body = b""  # of a non-200 answer
        self.frames: list[Frame] = []
        self.problems: list[bytes] = []
        self.complete = False
        self.error: BaseException | None = None
        self.done = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, url: str, token: str | None, last_event_id: int | None = None, *, client: httpx.AsyncClient | None = None
    ) -> Stream:
        """Starts the request (on ``client``'s connection if given, else on a
        new one) and waits for the response head."""
        self = cls(url, token, last_event_id, client)
        self._task = asyncio.create_task(self._run())
        await self.wait(lambda: self.status is not None or self.done, "response head")
        if self.status is None:
            raise AssertionError(f"GET {url}: no response: {self.error!r}")
        return self

    async def _run(self) -> None:
        try:
            timeout = httpx.Timeout(5.0, read=None)
            async with contextlib.AsyncExitStack() as stack:
                client = self.client
                if client is None:
                    client = await stack.enter_async_context(httpx.AsyncClient(trust_env=False))
                async with client.stream("GET", self.url, headers=self.headers, timeout=timeout) as response:
                    self.status = response.status_code
                    self._poke()
                    if response.status_code != 200:
                        self.body = await response.aread()
                        self.complete = True
                        return
                    buf = b""
                    async for chunk in response.aiter_raw():
                        buf += chunk
                        *blocks, buf = buf.split(b"\n\n")
                        for block in blocks:
                            self._parse(block)
                        self._poke()
                    if buf:
                        self.problems.append(buf)
                    self.complete = True
        except Exception as exc:  # the connection broke: the test looks at it
            self.error = exc
        finally:
            self.done = True
            self._poke()

    def _parse(self, block: bytes) -> None:
        m = _FRAME.fullmatch(block)
        if m is not None:
            self.frames.append(Frame(int(m[1]), m[2].decode(), m[3].decode("utf-8")))
        elif not (_RETRY.fullmatch(block) or block.startswith(b":")):
            self.problems.append(block)

    def _poke(self) -> None:
        self._changed.set()

    async def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Until ``predicate()`` (checked after every chunk read)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.url}: not true within {timeout} s: {what}; {len(self.frames)} frames, "
                    f"done={self.done}, error={self.error!r}, problems={self.problems!r}"
                )
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_frames(self, n: int, timeout: float = WAIT) -> None:
        await self.wait(lambda: len(self.frames) >= n or self.done, f"{n} frames", timeout)
        assert len(self.frames) >= n, f"stream ended after {len(self.frames)} frames: {self.error!r}"

    async def wait_end(self, timeout: float = WAIT) -> None:
        await self.wait(lambda: self.done, "end of the stream", timeout)

    async def close(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def status_of(url: str, token: str) -> tuple[int, bytes]:
    """Status and body of a request expected to be answered at once (no stream)."""
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        response = await client.get(url, headers={"Authorization": f"Bearer {token}"})
        return response.status_code, response.content


def expected_events(count: int, *, result: bool = False) -> list[JobEvent]:
    return [progress_event(k, result=result) for k in range(count)] + [final_event(count)]


def assert_events(frames: list[Frame], expected: list[JobEvent]) -> list[int]:
    """The frames are exactly ``expected`` (status, byte-exact JSON), with
    strictly increasing ids; returns the ids."""
    got = [(f.event, f.data) for f in frames]
    want = [(e.status.value, e.to_json()) for e in expected]
    if got != want:
        first = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        raise AssertionError(
            f"{len(got)} events, expected {len(want)}; first difference at {first}: "
            f"{got[first:first + 3]!r} != {want[first:first + 3]!r}"
        )
    assert [JobEvent.from_json(f.data) for f in frames] == expected
    ids = [f.id for f in frames]
    assert all(a < b for a, b in zip(ids, ids[1:])), f"ids not strictly increasing: {ids}"
    return ids


def assert_clean_end(stream: Stream) -> None:
    """The server ended the body properly, after a 200, nothing malformed."""
    assert stream.status == 200, (stream.status, stream.body)
    assert stream.complete and stream.error is None, f"stream broken: {stream.error!r}"
    assert not stream.problems, f"unexpected blocks: {stream.problems!r}"


# -- tests -----------------------------------------------------------------------------------------
async def test_two_workers_two_producers(
    redis_server: RedisServer, start_workers: Callable[..., list[Worker]], tmp_path: Path
) -> None:
    """One process registers the job, another produces its events; clients
    on two worker processes get them all, the same ids on both; resuming,
    replaying and tokens work on either worker."""
    url = redis_server.url
    job = "job-two-workers"
    count = 20
    a, b = start_workers(2, url)
    async with contextlib.AsyncExitStack() as stack:
        registrar = await Producer.start(url, job, "--register", log_path=tmp_path / "registrar.log")
        stack.push_async_callback(registrar.close)
        producer = await Producer.start(url, job, "--count", str(count), "--final", log_path=tmp_path / "producer.log")
        stack.push_async_callback(producer.close)
        token = await registrar.ready()
        assert re.fullmatch(r"[0-9a-f]{64}", token), token
        assert await producer.ready() == "-"

        # The token registered in the registrar's process is the job's
        # token in every process; a wrong one is refused on both workers.
        with JobNotifier(signing_secret="test-secret", broker_url=url) as here:
            assert here.validate_job_token(job, token)
            assert not here.validate_job_token(job, WRONG_TOKEN)
        for w in (a, b):
            status, body = await status_of(w.stream_url(job), WRONG_TOKEN)
            assert status == 403, (w.port, status, body)

        on_a = await Stream.open(a.stream_url(job), token)
        stack.push_async_callback(on_a.close)
        on_b = await Stream.open(b.stream_url(job), token)
        stack.push_async_callback(on_b.close)
        assert (on_a.status, on_b.status) == (200, 200), (on_a.body, on_b.body)

        # Events from a third process (neither registered the job).
        assert await producer.command("go", "done ") == "done True"
        expected = expected_events(count)
        await on_a.wait_end()
        await on_b.wait_end()
        assert_clean_end(on_a)
        assert_clean_end(on_b)
        ids = assert_events(on_a.frames, expected)
        assert assert_events(on_b.frames, expected) == ids, "the same event has another id on worker B"

        # Resuming on the other worker from the middle: exactly the rest.
        middle = ids[count // 2 - 1]
        resumed = await Stream.open(b.stream_url(job), token, last_event_id=middle)
        stack.push_async_callback(resumed.close)
        await resumed.wait_end()
        assert_clean_end(resumed)
        assert assert_events(resumed.frames, expected[count // 2 :]) == ids[count // 2 :]

        # A late client gets the retained history, on either worker.
        late = await Stream.open(a.stream_url(job), token)
        stack.push_async_callback(late.close)
        await late.wait_end()
        assert_clean_end(late)
        assert assert_events(late.frames, expected) == ids

        # Resuming after the terminal event: nothing will follow.
        after_end = await Stream.open(b.stream_url(job), token, last_event_id=ids[-1])
        stack.push_async_callback(after_end.close)
        await after_end.wait_end()
        assert after_end.status == 204, (after_end.status, after_end.frames)

        await registrar.quit()


async def test_two_producers_at_once_same_order_everywhere(
    redis_server: RedisServer, start_workers: Callable[..., list[Worker]], tmp_path: Path
) -> None:
    """Two processes notify the same job at the same time: their ids may
    collide or go backwards (re-sequenced in Redis), yet both workers
    stream the same events, with the same ids, in the same order, each
    producer's events in its own order."""
    url = redis_server.url
    job = "job-two-producers"
    count = 60
    a, b = start_workers(2, url)
    async with contextlib.AsyncExitStack() as stack:
        producers = []
        for tag in ("p", "q"):
            p = await Producer.start(url, job, "--tag", tag, log_path=tmp_path / f"producer-{tag}.log")
            stack.push_async_callback(p.close)
            producers.append(p)
        registrar = await Producer.start(url, job, "--register", log_path=tmp_path / "registrar.log")
        stack.push_async_callback(registrar.close)
        token = await registrar.ready()
        for p in producers:
            await p.ready()
        streams = []
        for w in (a, b):
            s = await Stream.open(w.stream_url(job), token)
            stack.push_async_callback(s.close)
            assert s.status == 200, s.body
            streams.append(s)

        # Both get their command before either answers: they notify at once.
        for p in producers:
            assert p.proc.stdin is not None
            p.proc.stdin.write(f"batch {count}\n".encode())
            await p.proc.stdin.drain()
        for p in producers:
            assert await p.read_line() == f"sent {count}"
        for p in producers:
            assert await p.command("flush", "flushed ") == "flushed True"
        assert await registrar.command("final", "sent ") == "sent 0"
        assert await registrar.command("flush", "flushed ") == "flushed True"

        for s in streams:
            await s.wait_end()
            assert_clean_end(s)
        on_a, on_b = streams
        assert on_a.frames == on_b.frames, "the workers disagree on the events, their order or their ids"
        ids = [f.id for f in on_a.frames]
        assert all(x < y for x, y in zip(ids, ids[1:])), f"ids not strictly increasing: {ids}"
        assert len(ids) == 2 * count + 1
        assert on_a.frames[-1].data == final_event(0).to_json()
        seen = [JobEvent.from_json(f.data) for f in on_a.frames[:-1]]
        for tag in ("p", "q"):
            mine = [e for e in seen if e.result["from"] == tag]
            assert mine == [progress_event(k, tag=tag) for k in range(count)], f"producer {tag}'s events out of order"
        resequenced = [(await p.stats())["broker_resequenced"] for p in producers]
        logger.info("re-sequenced events per producer: %s", resequenced)
        for p in (*producers, registrar):
            await p.quit()


async def test_redis_killed_and_restarted_mid_stream(
    redis_server: RedisServer, start_workers: Callable[..., list[Worker]], tmp_path: Path
) -> None:
    """Redis SIGKILLed while a client streams from a worker, restarted on the
    same port (AOF): the producer buffers meanwhile and the client ends up
    with every event exactly once, in order."""
    url = redis_server.url
    job = "job-redis-restart"
    a, b = start_workers(2, url)
    async with contextlib.AsyncExitStack() as stack:
        producer = await Producer.start(url, job, "--register", "--result", log_path=tmp_path / "producer.log")
        stack.push_async_callback(producer.close)
        token = await producer.ready()
        streams: list[Stream] = []

        async def connect(last_event_id: int | None) -> Stream:
            s = await Stream.open(a.stream_url(job), token, last_event_id)
            stack.push_async_callback(s.close)
            streams.append(s)
            return s

        stream = await connect(None)
        assert stream.status == 200, stream.body
        assert await producer.command("batch 10", "sent ") == "sent 10"
        await stream.wait_frames(10)

        redis_server.kill()
        # notify() keeps working while Redis is down: the events wait in
        # the producer's buffer.
        assert await producer.command("batch 10", "sent ") == "sent 20"
        stats = await producer.stats()
        logger.info("producer stats with Redis down: %s", stats)
        assert stats["broker_buffered"] == 10, stats

        await asyncio.to_thread(redis_server.restart)
        assert await producer.command("batch 10", "sent ") == "sent 30"
        assert await producer.command("final", "sent ") == "sent 30"
        assert await producer.command("flush", "flushed ") == "flushed True"
        stats = await producer.stats()
        logger.info("producer stats after the restart: %s", stats)
        assert stats["broker_buffered"] == 0, stats
        assert stats["broker_published"] >= 31, stats
        assert stats["broker_rejected"] == 0, stats

        # Everything arrives on the same connection, or (if the worker ended
        # the stream while Redis was away) after reconnecting with the last
        # id seen. A reconnect may briefly be refused (503) while the
        # worker's own Redis connection comes back: retried until WAIT.
        deadline = time.monotonic() + WAIT

        def received() -> list[Frame]:
            return [f for s in streams for f in s.frames]

        while True:
            await stream.wait(
                lambda: stream.done or (bool(stream.frames) and stream.frames[-1].event == "completed"),
                "the terminal event or the end of the stream",
                max(0.0, deadline - time.monotonic()),
            )
            frames = received()
            if frames and frames[-1].event == "completed":
                break
            logger.info("stream %d ended after %d frames (%r); reconnecting", len(streams), len(frames), stream.error)
            while True:
                assert time.monotonic() < deadline, f"no terminal event within {WAIT} s: {len(frames)} frames"
                stream = await connect(frames[-1].id if frames else None)
                if stream.status == 200:
                    break
                assert stream.status == 503, (stream.status, stream.body)
                streams.pop()
                await asyncio.sleep(0.05)  # reconnect backoff (EventSource's retry), bounded by the deadline
        await stream.wait_end()
        assert_clean_end(stream)
        for s in streams:
            assert not s.problems, s.problems
        expected = expected_events(30, result=True)
        ids = assert_events([f for s in streams for f in s.frames], expected)
        logger.info("%d connection(s) for %d events", len(streams), len(ids))

        # The history in Redis is the same (the events notified while it
        # was down included), from the other worker.
        replay = await Stream.open(b.stream_url(job), token)
        stack.push_async_callback(replay.close)
        await replay.wait_end()
        assert_clean_end(replay)
        assert assert_events(replay.frames, expected) == ids

        await producer.quit()


async def test_events_trimmed_while_a_worker_was_away_are_reported(
    redis_server: RedisServer, start_workers: Callable[..., list[Worker]], tmp_path: Path
) -> None:
    """Redis keeps the publishing process's ``sse_capacity`` newest events
    of a job (here 4). A worker whose Redis connection was down while more
    than that were published can only catch up on those 4: its client must
    then get every event or be told that it missed some (a lagged frame;
    ``skipped`` is a lower bound there, at least 1: how many were trimmed
    from Redis before this worker read them is not known), never a silent
    gap. The worker
    is frozen (SIGSTOP) across the Redis restart so that the producer
    publishes everything before the worker reconnects."""
    url = redis_server.url
    job = "job-trimmed"
    (a,) = start_workers(1, url)
    assert a.proc is not None
    async with contextlib.AsyncExitStack() as stack:
        producer = await Producer.start(
            url, job, "--register", "--sse-capacity", "4", log_path=tmp_path / "producer.log"
        )
        stack.push_async_callback(producer.close)
        token = await producer.ready()
        stream = await Stream.open(a.stream_url(job), token)
        stack.push_async_callback(stream.close)
        assert stream.status == 200, stream.body
        assert await producer.command("batch 2", "sent ") == "sent 2"
        await stream.wait_frames(2)

        pid = a.proc.pid

        def resume() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

        stack.callback(resume)  # also on failure
        os.kill(pid, signal.SIGSTOP)
        redis_server.kill()
        await asyncio.to_thread(redis_server.restart)
        assert await producer.command("batch 10", "sent ") == "sent 12"
        assert await producer.command("final", "sent ") == "sent 12"
        assert await producer.command("flush", "flushed ") == "flushed True"
        resume()

        await stream.wait(
            lambda: stream.done or (bool(stream.frames) and stream.frames[-1].event == "completed"),
            "the terminal event or the end of the stream",
        )
        expected = expected_events(12)
        got = [(f.event, f.data) for f in stream.frames]
        lagged = [
            json.loads(block.split(b"data: ", 1)[1]) for block in stream.problems if block.startswith(b"event: error\n")
        ]
        missing = [e for e in expected if (e.status.value, e.to_json()) not in got]
        assert not missing or lagged, (
            f"{len(missing)} events never reached the client and it was not told "
            f"(no lagged frame): {[e.progress for e in missing]}"
        )
        if missing:
            assert 1 <= sum(int(x.get("skipped", 0)) for x in lagged) <= len(missing), lagged
        assert got == [(e.status.value, e.to_json()) for e in expected if e not in missing]


async def test_uvicorn_two_worker_processes_one_port(
    redis_server: RedisServer, start_workers: Callable[..., list[Worker]], tmp_path: Path
) -> None:
    """``uvicorn --workers 2``: a stream served by each worker process gets
    the same events with the same ids."""
    url = redis_server.url
    job = "job-one-port"
    count = 10
    (server,) = start_workers(1, url, processes=2)
    async with contextlib.AsyncExitStack() as stack:
        producer = await Producer.start(
            url, job, "--register", "--count", str(count), "--final", log_path=tmp_path / "producer.log"
        )
        stack.push_async_callback(producer.close)
        # One keep-alive connection per worker process: new connections
        # until both pids answered (the kernel hands each to either one).
        clients: dict[int, httpx.AsyncClient] = {}
        for _ in range(64):
            client = await stack.enter_async_context(httpx.AsyncClient(trust_env=False, timeout=5.0))
            pid = (await client.get(server.url + "/_worker")).json()["pid"]
            clients.setdefault(pid, client)
            if len(clients) == 2:
                break
        assert len(clients) == 2, "64 connections all went to the same uvicorn worker process"
        token = await producer.ready()
        # Both streams are open before the events are produced: live
        # deliveries, each on its worker process's connection.
        streams = []
        for client in clients.values():
            s = await Stream.open(server.stream_url(job), token, client=client)
            stack.push_async_callback(s.close)
            assert s.status == 200, s.body
            streams.append(s)
        assert await producer.command("go", "done ") == "done True"
        expected = expected_events(count)
        ids = []
        for s in streams:
            await s.wait_end()
            assert_clean_end(s)
            ids.append(assert_events(s.frames, expected))
        assert ids[0] == ids[1], "the same event has different ids in the two worker processes"


async def test_buffer_while_redis_down(redis_server: RedisServer) -> None:
    """Redis down: notify() buffers broker_buffer events (local subscribers
    get them at once), then raises BrokerError; back up, the buffered
    events reach another notifier's subscriber in order."""
    job = "job-buffer"
    buffer = 20
    common: dict[str, Any] = {"signing_secret": "test-secret", "broker_url": redis_server.url, "sse_capacity": 1024}
    producer = JobNotifier(**common, broker_buffer=buffer)
    consumer = JobNotifier(**common)
    try:
        token = producer.register_job(job)
        assert consumer.validate_job_token(job, token)
        remote = consumer.subscribe(job)
        local = producer.subscribe(job)
        before = [progress_event(k) for k in range(5)]
        for event in before:
            producer.notify(job, event)
        assert producer.flush(10)
        assert [await asyncio.wait_for(remote.get(), WAIT) for _ in before] == before
        assert [await asyncio.wait_for(local.get(), WAIT) for _ in before] == before

        redis_server.kill()
        held = [progress_event(k) for k in range(5, 5 + buffer)]
        for event in held:
            producer.notify(job, event)  # buffered
        with pytest.raises(BrokerError) as excinfo:
            producer.notify(job, progress_event(5 + buffer))
        assert isinstance(excinfo.value, ConnectionError)
        logger.info("buffer full: %s", excinfo.value)
        stats = producer.stats()
        assert stats["broker_rejected"] >= 1, stats
        assert stats["broker_buffered"] == buffer, stats
        # Local subscribers are not held up by the broker.
        assert [await asyncio.wait_for(local.get(), WAIT) for _ in held] == held

        await asyncio.to_thread(redis_server.restart)
        assert await asyncio.to_thread(producer.flush, 10)
        assert producer.stats()["broker_buffered"] == 0
        # The buffered events reach the other process's subscriber, in order.
        assert [await asyncio.wait_for(remote.get(), WAIT) for _ in held] == held
        last = final_event(5 + buffer)
        producer.notify(job, last)
        assert await asyncio.wait_for(remote.get(), WAIT) == last
        assert remote.get_nowait() is None
        remote.close()
        local.close()
    finally:
        producer.close(0)
        consumer.close(0)


Seen = list[tuple[int, JobEvent] | tuple[str, int]]


async def _take(sub: Subscription, seen: Seen) -> JobEvent:
    """The next event of ``sub``, recorded with its id in ``seen``."""
    event = await asyncio.wait_for(sub.get(), WAIT)
    seen.append((sub.last_event_id, event))
    return event


async def _read_to_end(sub: Subscription, seen: Seen) -> None:
    """Records (id, event) of every event until the subscription ends, and
    ("lagged", skipped) where it was told it missed some."""
    while True:
        try:
            await _take(sub, seen)
        except SubscriptionClosed:
            return
        except SubscriptionLagged as exc:
            seen.append(("lagged", exc.skipped))


@pytest.mark.parametrize("first", ["held_up_first", "other_first"])
async def test_two_processes_notify_one_job_with_one_held_up(redis_server: RedisServer, first: str) -> None:
    """Two notifiers (two processes' worth) notify the same job while the
    first one's Redis connections are held up (a paused TCP proxy), so its
    event reaches Redis after the other's; a third one only reads. Every
    subscriber, the held-up notifier's own included, gets every event
    exactly once or is told it missed some (SubscriptionLagged), never a
    silent gap; the two that heard of the held-up event through Redis
    agree on ids and order."""
    job = "job-held-up"
    common: dict[str, Any] = {"signing_secret": "test-secret", "sse_capacity": 1024}
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(PausableProxy(redis_server.port))
        held = JobNotifier(broker_url=proxy.url, **common)
        stack.callback(held.close, 0)
        other = JobNotifier(broker_url=redis_server.url, **common)
        stack.callback(other.close, 0)
        reader = JobNotifier(broker_url=redis_server.url, **common)
        stack.callback(reader.close, 0)
        other.register_job(job)
        subs = [n.subscribe(job, last_event_id=0) for n in (held, other, reader)]
        for sub in subs:
            stack.callback(sub.close)
            await asyncio.wait_for(sub.ready(), WAIT)
        seen: list[Seen] = [[], [], []]
        mine, theirs, last = progress_event(1), progress_event(2), final_event(3)

        proxy.pause()
        if first == "held_up_first":
            held.notify(job, mine)  # its subscriber has it at once
            assert await _take(subs[0], seen[0]) == mine
            other.notify(job, theirs)  # a later id, but in Redis first
            assert await asyncio.to_thread(other.flush, WAIT)
            assert await _take(subs[2], seen[2]) == theirs
        else:
            other.notify(job, theirs)
            assert await asyncio.to_thread(other.flush, WAIT)
            assert await _take(subs[2], seen[2]) == theirs
            held.notify(job, mine)  # a later id; its subscriber has it before theirs
            assert await _take(subs[0], seen[0]) == mine
        proxy.resume()
        assert await asyncio.to_thread(held.flush, WAIT)
        # The other two have both events before the last one is notified
        # (else a terminal event notified first would end the job there).
        for i in (1, 2):
            while len(seen[i]) < 2:
                await _take(subs[i], seen[i])
        other.notify(job, last)
        assert await asyncio.to_thread(other.flush, WAIT)
        for sub, record in zip(subs, seen):
            await _read_to_end(sub, record)

        for name, record in zip(("held-up", "other", "reader"), seen):
            events = [e for _, e in record if isinstance(e, JobEvent)]
            lagged = sum(n for tag, n in record if tag == "lagged")
            missing = [e for e in (mine, theirs, last) if e not in events]
            assert not missing or lagged, (
                f"the {name} notifier's subscriber silently missed "
                f"{[f'{e.status.value} {e.progress}' for e in missing]}: it got {record}"
            )
            assert len(events) == len({e.to_json() for e in events}), f"{name}: an event twice: {record}"
            assert events[-1] == last, record
        assert seen[1] == seen[2], "two processes that got the events through Redis disagree"


@pytest.mark.parametrize("bad", ["http://127.0.0.1:6379/0", "redis://", "not a url", ""])
def test_malformed_broker_url(bad: str) -> None:
    with pytest.raises(ValueError, match="broker_url"):
        NotifierConfig(broker_url=bad)
    with pytest.raises(ValueError, match="broker_url"):
        JobNotifier(signing_secret="test-secret", broker_url=bad)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_unreachable_broker(kind: str, tmp_path: Path) -> None:
    if kind == "tcp":
        where = f"127.0.0.1:{free_port()}"  # nothing listens there
        url = f"redis://{where}/0"
    else:
        where = str(tmp_path / "no-redis.sock")
        url = f"unix://{where}"
    start = time.monotonic()
    with pytest.raises(BrokerError) as excinfo:
        JobNotifier(signing_secret="test-secret", broker_url=url)
    elapsed = time.monotonic() - start
    assert isinstance(excinfo.value, ConnectionError)
    assert where in str(excinfo.value), str(excinfo.value)
    assert elapsed < 5.0, f"BrokerError after {elapsed:.1f} s"

