"""The demo's ASGI application (plain ASGI, no framework).

Routes::

    GET  /                          the page (static/index.html)
    GET  /static/{name}             its script and style sheet
    POST /api/jobs                  start a simulated job -> 201 {job_id, token, events_url}
    POST /api/jobs/{id}/cancel      ask a running job to stop (it ends "cancelled")
    POST /api/jobs/{id}/drop        end the job's open SSE streams once (demo only):
                                    EventSource then reconnects with Last-Event-ID
    POST /api/endpoint              {"failing": true|false} (no body: toggle)
    GET  /api/state                 JSON snapshot: endpoint, stats, webhooks, dead letters
    GET  /api/feed                  the same as Server-Sent Events, live
    POST /hooks/{anything}          the built-in "customer" webhook receiver
    GET  /v1/jobs/{id}/events       blueprint_notify.asgi.sse_app, mounted as is

Everything runs on the server's event loop, except the webhook deliveries,
which the notifier's native thread makes to ``/hooks/customer`` on this very
server, like a customer's endpoint would receive them.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import itertools
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote

from .._events import FailedDelivery, JobEvent, JobStatus
from .._notifier import JobNotifier
from ..asgi import SSEApp, _headers, _wait_disconnect, sse_app

__all__ = ["DemoApp", "HOOK_PATH"]

logger = logging.getLogger("blueprint_notify.demo")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Where the notifier delivers the demo's webhooks (on this same server).
HOOK_PATH = "/hooks/customer"
SSE_PREFIX = "/v1/jobs"

_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page loads nothing from anywhere else: no CDN, no inline script.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_KINDS = ("render", "transcode", "export", "thumbnail", "ingest")
_MAX_RUNNING = 50
_MAX_JOBS_KEPT = 500
_MAX_BODY = 1 << 20
_FEED_PING = 15.0
_MONITOR_INTERVAL = 0.2
_SIGNATURE_MAX_AGE = 300  # seconds a webhook timestamp may be off by


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientGone(Exception):
    pass


@dataclass
class _Job:
    job_id: str
    kind: str
    steps: int
    interval: float
    crash_at: int | None
    token: str = field(default="", repr=False)
    created: float = field(default_factory=time.time)
    status: str = "registered"
    progress: int | None = None
    events: int = 0
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled", "aborted")

    def public(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "status": self.status,
            "progress": self.progress,
            "events": self.events,
            "created": self.created,
        }


def verify_webhook(secret: bytes, timestamp: str, signature: str, body: bytes) -> bool:
    """What a customer's endpoint does with every webhook: recompute
    ``sha256=`` + hex HMAC-SHA256(secret, "{X-Webhook-Timestamp}.{raw body}")
    over the raw body bytes (before any JSON parsing) and compare in
    constant time."""
    mac = hmac.new(secret, timestamp.encode("latin-1", "replace") + b"." + body, hashlib.sha256)
    expected = b"sha256=" + mac.hexdigest().encode("ascii")
    return hmac.compare_digest(expected, signature.encode("latin-1", "replace"))


class DemoApp:
    """The demo server: simulated jobs, the SSE endpoint, a built-in webhook
    receiver and a live feed of what it received.

    ``DemoApp(**notifier_overrides)`` creates and owns its JobNotifier (a
    random signing secret unless ``signing_secret`` is given); ``close()``
    closes it. ``retry_ms`` is the reconnection delay the SSE streams send;
    a job started without options gets a number of steps from ``job_steps``
    and seconds per step from ``job_interval`` (random, uniform).
    """

    def __init__(
        self,
        *,
        retry_ms: int = 1000,
        job_steps: tuple[int, int] = (6, 10),
        job_interval: tuple[float, float] = (0.35, 0.6),
        seed: int | None = None,
        **notifier_overrides: Any,
    ) -> None:
        options: dict[str, Any] = {
            "signing_secret": secrets.token_hex(16),
            # The built-in receiver is this server, on a loopback address,
            # which the SSRF guard refuses by default. Only do this for
            # endpoints you control, never for URLs your customers give you.
            "allow_private_networks": True,
            # Short backoff so a failing endpoint dead-letters within seconds:
            # attempts at 0, ~0.3, ~0.9, ~2.1 s.
            "retry_base_ms": 300,
            "max_retries": 3,
            "max_retry_delay_ms": 2000,
            "timeout_secs": 3,
            "sse_capacity": 64,  # a job's whole history stays replayable
            "retention_secs": 900,
            "close_timeout_secs": 1,
        }
        options.update(notifier_overrides)
        self.notifier = JobNotifier(**options)
        self.secret = self.notifier.config.signing_secret.encode("utf-8")
        #: The durable outbox file, or None (in memory).
        self.store_path = self.notifier.config.store_path
        self.sse: SSEApp = sse_app(self.notifier, retry_ms=retry_ms, ping_interval=10.0, prefix=SSE_PREFIX)
        self.failing = False
        self.job_steps = job_steps
        self.job_interval = job_interval
        self.rng = random.Random(seed)
        self.jobs: collections.OrderedDict[str, _Job] = collections.OrderedDict()
        self.hooks: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        self.dead: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self.resumes: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self._attempts: collections.OrderedDict[tuple[str, bytes], int] = collections.OrderedDict()
        self._received = 0
        self._job_seq = itertools.count(1)
        self._last_dead_id = 0
        self._last_stats: dict[str, int] = {}
        self._feeds: set[asyncio.Queue[tuple[str, Any]]] = set()
        self._cuts: dict[str, set[asyncio.Event]] = {}
        self._closing: asyncio.Event | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Dead letters kept in the store by earlier runs are on the page too.
        for dead in self.notifier.dead_letters():
            self._add_dead(dead)

    # -- lifetime ----------------------------------------------------------------
    def _start(self) -> None:
        """Starts the engine monitor on the server's loop (first request or
        lifespan startup, whichever comes first)."""
        if self._monitor is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        self._monitor = self._loop.create_task(self._watch_engine(), name="demo-monitor")

    def end_streams(self) -> None:
        """Ends the page feeds and the jobs' SSE streams (server shutdown:
        a web server waits for open responses). Call on the server's loop."""
        if self._closing is not None:
            self._closing.set()
        self.sse.end_streams()

    async def shutdown(self) -> None:
        """Stops the jobs and the monitor (on the server's loop)."""
        self.end_streams()
        tasks = [job.task for job in self.jobs.values() if job.task is not None and not job.task.done()]
        for task in tasks:
            task.cancel()
        if self._monitor is not None:
            self._monitor.cancel()
            tasks.append(self._monitor)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._monitor = None  # served again, it starts afresh
        self._feeds.clear()

    def close(self, timeout: float = 0) -> None:
        """Closes the notifier; deliveries still pending after ``timeout``
        seconds stay in the store for the next run (without a store they
        are dead-lettered and logged). Idempotent."""
        if not self.notifier.closed:
            pending = self.notifier.pending()
            if pending and timeout == 0:
                where = f"stay in {self.store_path} for the next run" if self.store_path else "are dropped"
                logger.info("closing: %d webhook deliveries still pending %s", pending, where)
            self.notifier.close(timeout)

    # -- ASGI --------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        self._start()
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if path.startswith(SSE_PREFIX + "/"):
                await self._job_events(scope, receive, send)
            elif path.startswith("/hooks/"):
                await self._hook(scope, receive, send)
            elif path.startswith("/api/"):
                await self._api(scope, method, path, receive, send)
            elif path == "/" or path == "/index.html":
                await self._static(method, "index.html", send)
            elif path.startswith("/static/"):
                await self._static(method, path[len("/static/") :], send)
            elif path == "/favicon.ico":
                await _respond(send, 204, b"")
            else:
                raise _HTTPError(404, "not found")
        except _HTTPError as exc:
            await _json(send, exc.status, {"error": exc.message})
        except _ClientGone:
            pass

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _static(self, method: str, name: str, send: Send) -> None:
        if method not in ("GET", "HEAD"):
            raise _HTTPError(405, "method not allowed")
        ctype = _STATIC.get(name)
        if ctype is None:
            raise _HTTPError(404, "not found")
        data = resources.files(__package__).joinpath("static", name).read_bytes()
        headers = [
            (b"content-type", ctype.encode()),
            (b"cache-control", b"no-cache"),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
        ]
        if name == "index.html":
            headers.append((b"content-security-policy", _CSP.encode()))
        await _respond(send, 200, b"" if method == "HEAD" else data, headers, length=len(data))

    # -- /api --------------------------------------------------------------------
    async def _api(self, scope: Scope, method: str, path: str, receive: Receive, send: Send) -> None:
        parts = path.strip("/").split("/")  # "api", ...
        if parts == ["api", "jobs"]:
            _allow(method, "POST")
            options = await _read_json(receive)
            job = self.start_job(
                steps=options.get("steps"),
                interval=options.get("interval"),
                crash=options.get("crash", False),
                hook_url=self._hook_url(scope),
            )
            await _json(
                send,
                201,
                {
                    "job_id": job.job_id,
                    "token": job.token,
                    "events_url": f"{SSE_PREFIX}/{quote(job.job_id, safe='')}/events",
                },
            )
        elif len(parts) == 4 and parts[:2] == ["api", "jobs"] and parts[3] in ("cancel", "drop"):
            _allow(method, "POST")
            await _drain_body(receive)
            job_id = parts[2]
            if job_id not in self.jobs:
                raise _HTTPError(404, "no such job")
            if parts[3] == "cancel":
                await _json(send, 200, {"cancelling": self.cancel_job(job_id)})
            else:
                await _json(send, 200, {"dropped": self.drop_streams(job_id)})
        elif parts == ["api", "endpoint"]:
            if method == "POST":
                options = await _read_json(receive)
                failing = options.get("failing", not self.failing)
                if not isinstance(failing, bool):
                    raise _HTTPError(400, "failing must be true or false")
                self.set_failing(failing)
            else:
                _allow(method, "GET")
            await _json(send, 200, {"failing": self.failing})
        elif parts == ["api", "state"]:
            _allow(method, "GET")
            await _json(send, 200, self.snapshot())
        elif parts == ["api", "feed"]:
            _allow(method, "GET")
            await self._feed(receive, send)
        else:
            raise _HTTPError(404, "not found")

    def _hook_url(self, scope: Scope) -> str:
        # The address this request reached us on is one the notifier can
        # reach too (it runs on this machine).
        server = scope.get("server") or ("127.0.0.1", 80)
        host, port = server[0], server[1]
        if host in ("0.0.0.0", "", None):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}{HOOK_PATH}"

    # -- jobs --------------------------------------------------------------------
    def start_job(
        self,
        *,
        hook_url: str,
        steps: Any = None,
        interval: Any = None,
        crash: Any = False,
    ) -> _Job:
        """Registers a simulated job and starts it (on the running loop)."""
        if steps is None:
            steps = self.rng.randint(*self.job_steps)
        if interval is None:
            interval = round(self.rng.uniform(*self.job_interval), 3)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 50:
            raise _HTTPError(400, "steps must be an int from 1 to 50")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0.02 <= interval <= 5:
            raise _HTTPError(400, "interval must be a number of seconds from 0.02 to 5")
        if not isinstance(crash, bool):
            raise _HTTPError(400, "crash must be true or false")
        if sum(1 for j in self.jobs.values() if not j.finished) >= _MAX_RUNNING:
            raise _HTTPError(429, f"{_MAX_RUNNING} jobs are running already")
        seq = next(self._job_seq)
        kind = "transcode" if crash else _KINDS[(seq - 1) % len(_KINDS)]
        job = _Job(
            job_id=f"{kind}-{seq:03d}",
            kind=kind,
            steps=steps,
            interval=float(interval),
            crash_at=self.rng.choice((40, 50, 60, 70)) if crash else None,
        )
        # The job's bearer token: the page passes it to EventSource as
        # ?token= (EventSource cannot send an Authorization header).
        job.token = self.notifier.register_job(job.job_id)
        self.jobs[job.job_id] = job
        while len(self.jobs) > _MAX_JOBS_KEPT:
            oldest = next(iter(self.jobs.values()))
            if not oldest.finished:
                break
            self.jobs.popitem(last=False)
        job.task = asyncio.get_running_loop().create_task(self._run_job(job, hook_url), name=f"job-{job.job_id}")
        logger.info("job %s started (%d steps)%s", job.job_id, steps, " - it will crash" if crash else "")
        return job

    def cancel_job(self, job_id: str) -> bool:
        job = self.jobs[job_id]
        if job.finished:
            return False
        job.cancel.set()
        return True

    async def _run_job(self, job: _Job, url: str) -> None:
        """The simulated work: queued, processing 0..100 %, then completed
        (or failed half-way, or cancelled). Each step is one notify():
        published on the job's SSE channel and sent as a signed webhook."""

        def emit(event: JobEvent) -> None:
            self.notifier.notify(job.job_id, event, url)
            job.status = event.status.value
            job.progress = event.progress
            job.events += 1

        async def work(seconds: float) -> bool:
            """Sleeps; True if the job was cancelled meanwhile."""
            try:
                await asyncio.wait_for(job.cancel.wait(), seconds)
            except asyncio.TimeoutError:
                return False
            return True

        try:
            emit(JobEvent(JobStatus.QUEUED))
            if await work(job.interval * 1.5):
                emit(JobEvent(JobStatus.CANCELLED))
                return
            started = time.monotonic()
            for step in range(job.steps + 1):
                progress = round(100 * step / job.steps)
                if job.crash_at is not None and progress >= job.crash_at:
                    emit(JobEvent(JobStatus.FAILED, progress=progress, error="worker exited with status 137 (out of memory)"))
                    return
                emit(JobEvent(JobStatus.PROCESSING, progress=progress))
                if step == job.steps:
                    break
                if await work(job.interval * self.rng.uniform(0.7, 1.3)):
                    emit(JobEvent(JobStatus.CANCELLED, progress=progress))
                    return
            result = {
                "output": f"s3://demo-bucket/{job.job_id}.bin",
                "bytes": self.rng.randint(1, 900) * 1_048_576,
                "seconds": round(time.monotonic() - started, 2),
            }
            emit(JobEvent(JobStatus.COMPLETED, progress=100, result=result))
        except RuntimeError:  # the notifier was closed under us (shutdown)
            job.status = "aborted"
        except asyncio.CancelledError:
            job.status = "aborted"
            raise
        finally:
            self._broadcast("job", job.public())

    # -- the SSE endpoint, wrapped ---------------------------------------------------
    def drop_streams(self, job_id: str) -> int:
        """Ends the job's open SSE streams, once, as a flaky proxy would.
        The browser's EventSource reconnects by itself after the ``retry``
        delay and sends ``Last-Event-ID``; sse_app resumes right after it."""
        cuts = self._cuts.get(job_id, set())
        for cut in cuts:
            cut.set()
        if cuts:
            logger.info("dropped %d SSE stream(s) of job %s", len(cuts), job_id)
        return len(cuts)

    async def _job_events(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serves sse_app as is, but lets drop_streams() end a stream: the
        app is told the client left, then the response is finished cleanly
        (a client that really left makes that last send a no-op)."""
        path: str = scope["path"]
        job_id = path[len(SSE_PREFIX) + 1 : -len("/events")] if path.endswith("/events") else ""
        headers = _headers(scope)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        resumed_from = headers.get("last-event-id")
        via = "Last-Event-ID header"
        if resumed_from is None and query.get("last_event_id"):
            resumed_from, via = query["last_event_id"][0], "last_event_id query"
        cut = asyncio.Event()
        self._cuts.setdefault(job_id, set()).add(cut)
        started = finished = False

        async def send_(message: Message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
                if message["status"] == 200 and resumed_from is not None:
                    self._record_resume(job_id, resumed_from, via)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        async def receive_() -> Message:
            if cut.is_set():
                return {"type": "http.disconnect"}
            real = asyncio.ensure_future(receive())
            dropped = asyncio.ensure_future(cut.wait())
            try:
                await asyncio.wait((real, dropped), return_when=asyncio.FIRST_COMPLETED)
            finally:
                dropped.cancel()
            if real.done():
                return real.result()
            real.cancel()
            return {"type": "http.disconnect"}

        try:
            await self.sse(scope, receive_, send_)
        finally:
            cuts = self._cuts.get(job_id)
            if cuts is not None:
                cuts.discard(cut)
                if not cuts:
                    del self._cuts[job_id]
        if started and not finished:
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass

    def _record_resume(self, job_id: str, last_event_id: str, via: str) -> None:
        entry = {"job_id": job_id, "last_event_id": last_event_id, "via": via, "at": time.time()}
        self.resumes.append(entry)
        logger.info("job %s: SSE stream resumed after event %s (%s)", job_id, last_event_id, via)
        self._broadcast("resume", entry)

    # -- the customer's webhook endpoint ------------------------------------------------
    def set_failing(self, failing: bool) -> None:
        if failing != self.failing:
            self.failing = failing
            logger.info("customer endpoint is now %s", "failing (500)" if failing else "healthy")
            self._broadcast("endpoint", {"failing": failing})

    async def _hook(self, scope: Scope, receive: Receive, send: Send) -> None:
        _allow(scope["method"], "POST")
        body = await _read_body(receive)
        headers = _headers(scope)
        timestamp = headers.get("x-webhook-timestamp", "")
        signature = headers.get("x-webhook-signature", "")
        verified = verify_webhook(self.secret, timestamp, signature, body)
        fresh = timestamp.isascii() and timestamp.isdigit() and abs(time.time() - int(timestamp)) <= _SIGNATURE_MAX_AGE
        job_id = headers.get("x-job-id", "").encode("latin-1").decode("utf-8", "replace")
        try:
            event = json.loads(body).get("event", {})
        except (ValueError, AttributeError):
            event = {}
        self._received += 1
        key = (job_id, hashlib.sha256(body).digest())
        attempt = self._attempts.pop(key, 0) + 1  # a retry carries the same body
        self._attempts[key] = attempt
        while len(self._attempts) > 5000:
            self._attempts.popitem(last=False)
        if self.failing:
            answer = 500
        elif not (verified and fresh):
            answer = 401
        else:
            answer = 200
        record = {
            "seq": self._received,
            "at": time.time(),
            "job_id": job_id,
            "status": event.get("status") if isinstance(event, dict) else None,
            "progress": event.get("progress") if isinstance(event, dict) else None,
            "attempt": attempt,
            "verified": verified,
            "fresh": fresh,
            "signature": signature[:19] + "…" if len(signature) > 19 else signature,
            "answer": answer,
            "bytes": len(body),
        }
        self.hooks.append(record)
        self._broadcast("hook", record)
        if answer == 500:
            await _json(send, 500, {"error": "simulated outage"})
        elif answer == 401:
            logger.warning("webhook for %s rejected: %s", job_id, "stale timestamp" if verified else "bad signature")
            await _json(send, 401, {"error": "bad signature"})
        else:
            await _json(send, 200, {"ok": True})

    # -- engine state and the page's feed ------------------------------------------------
    def stats(self) -> dict[str, int]:
        stats = self.notifier.stats() if not self.notifier.closed else dict(self._last_stats)
        stats["sse_streams"] = self.sse.open_streams
        stats["feeds"] = len(self._feeds)
        stats["received"] = self._received
        return stats

    def snapshot(self) -> dict[str, Any]:
        return {
            "failing": self.failing,
            "stats": self.stats(),
            "hook_url_path": HOOK_PATH,
            "jobs": [job.public() for job in self.jobs.values()],
            "hooks": list(self.hooks),
            "dead_letters": list(self.dead),
            "store": None if self.store_path is None else str(self.store_path),
            "resumes": list(self.resumes),
        }

    def _poll_engine(self) -> None:
        if self.notifier.closed:
            return
        stats = self.stats()
        if stats.get("dead_lettered") != self._last_stats.get("dead_lettered"):
            for dead in self.notifier.dead_letters():
                entry = self._add_dead(dead)
                if entry is not None:
                    logger.info(
                        "dead letter: %s %s after %d attempts (%s)",
                        dead.job_id,
                        entry["status"],
                        dead.attempts,
                        dead.last_error,
                    )
                    self._broadcast("dead_letter", entry)
        if stats != self._last_stats:
            self._last_stats = stats
            self._broadcast("stats", stats)

    def _add_dead(self, dead: FailedDelivery) -> dict[str, Any] | None:
        """Records a dead letter not seen yet; returns its page entry."""
        if dead.id <= self._last_dead_id:
            return None
        self._last_dead_id = dead.id
        try:
            event = dead.event()
            status, progress = event.status.value, event.progress
        except (ValueError, KeyError, TypeError):
            status, progress = None, None
        entry = {
            "id": dead.id,
            "job_id": dead.job_id,
            "status": status,
            "progress": progress,
            "attempts": dead.attempts,
            "last_error": dead.last_error,
            "failed_at": dead.failed_at,
        }
        self.dead.append(entry)
        return entry

    async def _watch_engine(self) -> None:
        # The notifier has no callback for dead letters; its counters are
        # cheap to read, so look five times a second.
        while True:
            self._poll_engine()
            await asyncio.sleep(_MONITOR_INTERVAL)

    def _broadcast(self, kind: str, data: Any) -> None:
        for queue in self._feeds:
            try:
                queue.put_nowait((kind, data))
            except asyncio.QueueFull:  # a stalled page: resend everything
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(("snapshot", None))

    async def _feed(self, receive: Receive, send: Send) -> None:
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=1000)
        self._feeds.add(queue)
        closing = self._closing
        assert closing is not None
        disconnect = asyncio.ensure_future(_wait_disconnect(receive))
        stop = asyncio.ensure_future(closing.wait())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-store"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            out = b"retry: 1000\n\n" + _frame("snapshot", self.snapshot())
            while True:
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait((get, disconnect, stop), timeout=_FEED_PING, return_when=asyncio.FIRST_COMPLETED)
                if disconnect.done():
                    get.cancel()
                    return
                if stop.done():
                    get.cancel()
                    break
                if not get.done():
                    get.cancel()
                    out = b": ping\n\n"
                    continue
                items = [get.result()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                out = b"".join(
                    _frame(kind, self.snapshot() if kind == "snapshot" else data) for kind, data in items
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass
        finally:
            self._feeds.discard(queue)
            disconnect.cancel()
            stop.cancel()


# -- ASGI helpers ---------------------------------------------------------------------
def _frame(kind: str, data: Any) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(data, separators=(",", ":")).encode())


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise _HTTPError(405, "method not allowed")


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            raise _HTTPError(413, "body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _drain_body(receive: Receive) -> None:
    await _read_body(receive)


async def _read_json(receive: Receive) -> dict[str, Any]:
    body = await _read_body(receive)
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise _HTTPError(400, "body must be JSON") from None
    if not isinstance(data, dict):
        raise _HTTPError(400, "body must be a JSON object")
    return data


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None, *, length: int | None = None
) -> None:
    hdrs = list(headers or [])
    hdrs.append((b"content-length", str(len(body) if length is None else length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _json(send: Send, status: int, data: Any) -> None:
    body = json.dumps(data, separators=(",", ":")).encode()
    await _respond(send, status, body, [(b"content-type", b"application/json"), (b"cache-control", b"no-store")])
