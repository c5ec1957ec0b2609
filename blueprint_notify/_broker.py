"""The Redis broker: jobs shared by several processes and hosts.

One ``Broker`` per JobNotifier with ``broker_url``. It runs an asyncio loop
in a thread of its own (``blueprint-notify-broker``) with two Redis
connections (redis-py): commands, and Pub/Sub.

Keys, for a job ``J`` under ``prefix`` (default ``bpn``):

* ``{prefix}:ev:J``   a Redis Stream: the job's events, at most
  ``sse_capacity``, entry id ``0-<event id>``, fields ``s`` (status code),
  ``d`` (the event JSON), ``o`` (the publishing notifier), ``r`` (the id it
  asked for) and ``p`` (the entry before it: a reader that finds it missing
  knows the trimmed events it never got, and reports the lag). Expires ``broker_ttl_secs`` after the last event, or
  ``retention_secs`` after the terminal one.
* ``{prefix}:tok:J``  SHA-256 (hex) of the job's bearer token; same expiry.
* ``{prefix}:live:J`` the Pub/Sub channel of the job's new events.

Publishing (any thread): ``notify()`` has already put the event in the local
channel with its id (a microsecond-clock id, see ``bpn_hub_init``); it
appends it to ``_queue`` and wakes the loop only when it was idle. The
loop sends what is queued in batches: one Lua call (``_PUBLISH``) per up to
1024 events: for each, XADD with the event's id, PEXPIRE, PUBLISH. A
batch leaves the queue only once Redis has answered; on a connection error
it is sent again after a backoff, in order; the script is idempotent (an
entry already there with the same content is not added twice). An id
that is not above the stream's newest (two processes producing for one job
at once, or clocks apart) is replaced by the next one; that is counted as
``broker_resequenced``.

Receiving: a process *attaches* a job while it has local readers of it (an
SSE stream, a Subscription): it subscribes to the job's channel, then
reads the stream's retained entries into the local channel
(``Engine.ingest``, in id order, duplicates ignored), then takes the
channel's messages. After a lost connection it reconnects with backoff,
subscribes again and reads every attached job's stream from the last id it
holds: nothing published meanwhile is missed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import hmac
import logging
import os
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from ._core import ChannelLimitError

__all__ = ["Broker", "BrokerError", "redact_url", "check_broker_url"]

logger = logging.getLogger("blueprint_notify.broker")

_BATCH = 1024  # events per Lua call (one round trip)
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0
_CONNECT_TIMEOUT = 3.0  # seconds: the check at start, register_job, token checks
_TERMINAL_CODES = frozenset({2, 3, 4})  # completed, failed, cancelled (_events._CODES)
_LOG_EVERY = 1.0  # seconds between repeated warnings
_ROOM_TIMEOUT = 5.0  # seconds notify() waits for room while Redis answers

# One call publishes a batch. ARGV: maxlen, origin, key prefix, ttl ms of
# a live job, ttl ms after a terminal event, then per event: job id, event
# id, status code, JSON. For each event: XADD with its id (and the id of
# the entry before it, so readers see what MAXLEN trimmed before they got
# it), PUBLISH; then per job PEXPIRE of the stream and the token (the
# expiry of its last event in the batch). Returns {i, entry id, ...} for the events
# stored under another id than theirs (none, normally). Idempotent: a retry
# of an event whose first attempt got through finds it (same content, same
# origin) and leaves it; an id not above the stream's newest gets the next
# one (XADD 0-*). Keys are built here from the job ids: fine on one Redis
# (the broker does not support Redis Cluster).
_PUBLISH = """
local maxlen, origin, prefix = ARGV[1], ARGV[2], ARGV[3]
local live_ttl, end_ttl = ARGV[4], ARGV[5]
local out, last, ttls = {}, {}, {}
for a = 6, #ARGV, 4 do
  local job, eid, status, data = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local stream = prefix .. ':ev:' .. job
  local want = '0-' .. eid
  local prev = last[stream]
  if prev == nil then
    local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    prev = '0-0'
    if #top > 0 then prev = top[1][1] end
  end
  local id = redis.pcall('XADD', stream, 'MAXLEN', maxlen, want,
                         's', status, 'd', data, 'o', origin, 'r', eid, 'p', prev)
  local fresh = true
  if type(id) == 'table' and id.err then
    local held = redis.call('XRANGE', stream, want, want)
    if #held > 0 and held[1][2][4] == data and held[1][2][6] == origin then
      id, fresh = want, false
    else
      id = redis.call('XADD', stream, 'MAXLEN', maxlen, '0-*',
                      's', status, 'd', data, 'o', origin, 'r', eid, 'p', prev)
      out[#out + 1] = (a - 6) / 4
      out[#out + 1] = id
    end
  end
  if status == '2' or status == '3' or status == '4' then
    ttls[job] = end_ttl
  else
    ttls[job] = live_ttl
  end
  if fresh then
    redis.call('PUBLISH', prefix .. ':live:' .. job, id .. '\\n' .. status .. '\\n' ..
               origin .. '\\n' .. eid .. '\\n' .. prev .. '\\n' .. data)
  end
  last[stream] = id
end
for job, ttl in pairs(ttls) do
  redis.call('PEXPIRE', prefix .. ':ev:' .. job, ttl)
  redis.call('PEXPIRE', prefix .. ':tok:' .. job, ttl)
end
return out
"""


class BrokerError(ConnectionError):
    """The Redis broker cannot be reached (at start, or while it is down and
    ``broker_buffer`` events are already waiting for it)."""


def redact_url(url: str) -> str:
    """The URL for messages: whatever comes before an ``@`` in its
    authority (user and password) replaced by ``***``, also in malformed
    URLs (``://u:pw@h``, ``redis:/u:pw@h``)."""
    if not isinstance(url, str) or "@" not in url:
        return url
    start = url.find("//")
    start = 0 if start < 0 else start + 2
    end = len(url)
    for sep in "/?#" if start else "?#":  # no '//': up to the query
        i = url.find(sep, start)
        if i >= 0:
            end = min(end, i)
    at = url.rfind("@", start, end)
    if at < 0:
        return url
    return url[:start] + "***" + url[at:]


def check_broker_url(url: str) -> None:
    """Raises ValueError naming broker_url unless it is a redis://,
    rediss:// or unix:// URL with a host (or a path)."""
    if not isinstance(url, str):
        raise TypeError(f"broker_url must be a str or None, not {type(url).__name__}")
    bad = f"broker_url must be redis://host[:port][/db], rediss://... or unix:///path, got {redact_url(url)!r}"
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise ValueError(bad + " (spaces or control characters)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(bad) from None
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ValueError(bad + " (no host)")
        if port == 0:
            raise ValueError(bad + " (port 0)")
        db = parts.path.lstrip("/")
        if db and not (db.isascii() and db.isdigit()):
            raise ValueError(bad + f" (database {db!r} is not a number)")
    elif parts.scheme == "unix":
        if not parts.path:
            raise ValueError(bad + " (no socket path)")
    else:
        raise ValueError(bad)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class _Attached:
    __slots__ = ("users", "last_id", "ready")

    def __init__(self) -> None:
        self.users = 0
        self.last_id = 0  # newest entry id read from the stream or channel
        self.ready: asyncio.Future[None] | None = None


class Broker:
    """See the module docstring. Built by JobNotifier; not public."""

    def __init__(
        self,
        engine: Any,
        *,
        url: str,
        prefix: str,
        buffer: int,
        ttl_ms: int,
        retention_ms: int,
        capacity: int,
    ) -> None:
        try:
            import redis.asyncio as aioredis
            from redis import exceptions as redis_exceptions
        except ImportError:  # pragma: no cover - the extra is missing
            raise ImportError(
                "broker_url needs the redis package: pip install 'blueprint_notify[broker]'"
            ) from None
        self._aioredis = aioredis
        self._noscript = redis_exceptions.NoScriptError
        self._errors: tuple[type[BaseException], ...] = (
            redis_exceptions.ConnectionError,
            redis_exceptions.TimeoutError,
            OSError,
        )
        self._engine = engine
        self._url = url
        self._shown_url = redact_url(url)
        self._prefix = prefix
        self._bound = buffer
        self._ttl_ms = max(1, ttl_ms)
        self._retention_ms = max(1, retention_ms)
        self._capacity = capacity
        self._origin = os.urandom(8).hex()  # this notifier, in entries and messages
        # (job, event id, status, json bytes): filled by notify() on any thread.
        self._queue: collections.deque[tuple[str, int, int, bytes]] = collections.deque()
        self._lock = threading.Lock()
        self._idle = True  # the publisher waits for a wake-up (under _lock)
        self._enqueued = 0  # events queued so far (under _lock)
        self._sent = 0  # events Redis acknowledged (loop thread; read anywhere)
        self._flushed = threading.Condition(self._lock)
        self._drain_waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[bool]]] = []
        self._attached: dict[str, _Attached] = {}
        self._closing = False
        self._healthy = True  # the last batch got through
        self._last_warning = 0.0
        self.stats = {
            "broker_published": 0,
            "broker_rejected": 0,
            "broker_reconnects": 0,
            "broker_resequenced": 0,
            "broker_ingested": 0,
        }
        self._loop = asyncio.new_event_loop()
        self._wake_publisher = asyncio.Event()
        self._wake_listener = asyncio.Event()  # a job attached, or a resync is due
        self._resync = False  # the Pub/Sub connection must be made again
        # Subscribing while the Pub/Sub connection is being made would make
        # another one (redis-py connects lazily): one change at a time.
        self._sub_lock = asyncio.Lock()
        self._thread = threading.Thread(target=self._run, name="blueprint-notify-broker", daemon=True)
        self._thread.start()
        try:
            self._call(self._start(), _CONNECT_TIMEOUT + 1)
        except BaseException:
            self.close(0)
            raise

    # -- the loop thread -----------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _call(self, coro: Any, timeout: float) -> Any:
        """Runs coro on the loop thread and waits for it (not from that thread)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise BrokerError(f"the broker at {self._shown_url} did not answer within {timeout} s") from None

    async def _start(self) -> None:
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        # One retry of a command on a fresh connection: pooled connections
        # are stale after Redis restarted. Longer outages are ours to handle.
        kwargs = dict(
            socket_connect_timeout=_CONNECT_TIMEOUT,
            socket_timeout=None,
            health_check_interval=0,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
        )
        self._redis = self._aioredis.from_url(self._url, **kwargs)
        # None on the Pub/Sub connection: a silent reconnect there would
        # hide the messages missed meanwhile; _resubscribe catches up.
        kwargs["retry"] = Retry(ExponentialBackoff(), 0)
        self._pubsub_client = self._aioredis.from_url(self._url, **kwargs)
        from redis.exceptions import RedisError

        try:
            await asyncio.wait_for(self._redis.ping(), _CONNECT_TIMEOUT)
            info = await self._redis.info("server")
        except (asyncio.TimeoutError, RedisError, *self._errors) as exc:
            # Refused, timed out, wrong password, or not Redis at all.
            what = str(exc) or type(exc).__name__
            raise BrokerError(f"cannot reach the broker at {self._shown_url}: {what}") from None
        version = tuple(int(x) for x in str(info.get("redis_version", "0")).split(".")[:2] if x.isdigit())
        if version < (7, 0):
            raise BrokerError(f"the broker at {self._shown_url} runs Redis {info.get('redis_version')}; 7.0 or later is needed")
        self._sha: bytes | None = None  # _PUBLISH's SHA-1 once loaded
        self._pub_conn = None  # the publisher's own connection (see _send)
        self._pubsub = self._pubsub_client.pubsub(ignore_subscribe_messages=True)
        self._publisher = asyncio.ensure_future(self._publish_loop())
        self._listener = asyncio.ensure_future(self._listen_loop())

    def _warn(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _LOG_EVERY:
            self._last_warning = now
            logger.warning(msg, *args)

    # -- publishing ------------------------------------------------------------
    def check_room(self) -> None:
        """Called by notify() before it changes anything, when broker_buffer
        events already wait. While Redis answers (only slower than the
        producer), waits for room (the GIL released), at most
        _ROOM_TIMEOUT; while it is unreachable, or after that, raises
        BrokerError (counted, logged)."""
        if len(self._queue) < self._bound:
            return
        with self._flushed:
            self._flushed.wait_for(
                lambda: len(self._queue) < self._bound or not self._healthy or self._closing, _ROOM_TIMEOUT
            )
        if len(self._queue) < self._bound:
            return
        self.stats["broker_rejected"] += 1
        why = "unreachable" if not self._healthy else f"not keeping up for {_ROOM_TIMEOUT:g} s"
        logger.error(
            "broker at %s %s and %d events waiting for it: event refused", self._shown_url, why, len(self._queue)
        )
        raise BrokerError(
            f"the broker at {self._shown_url} is {why} and broker_buffer ({self._bound}) events already wait for it"
        )

    def publish(self, job_id: str, event_id: int, status: int, data: bytes) -> None:
        """Queues an event that notify() just published locally."""
        with self._lock:
            self._queue.append((job_id, event_id, status, data))
            self._enqueued += 1
            if not self._idle:
                return
            self._idle = False
        try:
            self._loop.call_soon_threadsafe(self._wake_publisher.set)
        except RuntimeError:  # loop closed: close() reports what is left
            pass

    @property
    def buffered(self) -> int:
        return len(self._queue)

    async def _publish_loop(self) -> None:
        backoff = _BACKOFF_MIN
        queue = self._queue
        # The arguments before the events, ready to send (see _PUBLISH).
        head = b"".join(
            _bulk(str(x).encode()) for x in (self._capacity, self._origin, self._prefix, self._ttl_ms, self._retention_ms)
        )
        while True:
            if not queue:
                with self._lock:
                    if not queue:
                        self._idle = True
                if self._idle:
                    await self._wake_publisher.wait()
                    self._wake_publisher.clear()
                    continue
            count = min(_BATCH, len(queue))
            try:
                renumbered = await self._send(head, [queue[i] for i in range(count)])
            except self._errors as exc:
                if self._closing:
                    return
                if self._healthy:
                    self._healthy = False
                    with self._flushed:  # producers waiting for room: fail now
                        self._flushed.notify_all()
                self._warn("broker at %s unreachable (%s); %d events wait, retrying", self._shown_url, exc, len(queue))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = _BACKOFF_MIN
            self._healthy = True
            for k in range(0, len(renumbered), 2):
                job_id, event_id = queue[renumbered[k]][:2]
                self.stats["broker_resequenced"] += 1
                self._warn(
                    "job %r: event id %d was taken (another process publishing for this job at the "
                    "same time, or clocks apart); stored as %d",
                    job_id,
                    event_id,
                    _entry_id(renumbered[k + 1]),
                )
            for _ in range(count):
                queue.popleft()
            self.stats["broker_published"] += count
            self._sent += count
            self._signal_sent()

    async def _send(self, head: bytes, batch: list[tuple[str, int, int, bytes]]) -> Any:
        """One EVALSHA of _PUBLISH for the batch, on the publisher's own
        connection, the command packed here (redis-py's generic encoder cost
        more than the rest of the loop); the script is loaded when Redis
        does not know it (first use, or Redis restarted)."""
        conn = self._pub_conn
        if conn is None:
            conn = self._pub_conn = await self._redis.connection_pool.get_connection()
        parts = [b"", head]
        for job_id, event_id, status, data in batch:
            job = job_id.encode("utf-8", "surrogateescape")
            eid = b"%d" % event_id
            parts.append(
                b"$%d\r\n%b\r\n$%d\r\n%b\r\n$1\r\n%d\r\n$%d\r\n%b\r\n"
                % (len(job), job, len(eid), eid, status, len(data), data)
            )
        for _ in range(2):
            if self._sha is None:
                self._sha = (await self._redis.script_load(_PUBLISH)).encode("ascii")
            parts[0] = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n$1\r\n0\r\n" % (8 + 4 * len(batch), self._sha)
            try:
                await conn.send_packed_command(b"".join(parts))
                return await conn.read_response()
            except self._noscript:
                self._sha = None
            except BaseException:
                await conn.disconnect()  # half-read: start afresh
                raise
        raise BrokerError("the broker forgot the publish script twice in a row")

    def _signal_sent(self) -> None:
        with self._flushed:
            self._flushed.notify_all()
        sent = self._sent
        keep = []
        for target, loop, fut in self._drain_waiters:
            if sent >= target:
                loop.call_soon_threadsafe(_resolve, fut, True)
            else:
                keep.append((target, loop, fut))
        self._drain_waiters = keep

    def flush(self, timeout: float | None) -> bool:
        """Waits until every event queued before the call is in Redis."""
        with self._flushed:
            target = self._enqueued
            return self._flushed.wait_for(lambda: self._sent >= target, timeout)

    async def drain(self, timeout: float | None) -> bool:
        with self._lock:
            target = self._enqueued
        if self._sent >= target:
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()

        def add() -> None:
            if self._sent >= target:
                loop.call_soon_threadsafe(_resolve, fut, True)
            else:
                self._drain_waiters.append((target, loop, fut))

        self._loop.call_soon_threadsafe(add)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return False

    # -- tokens ----------------------------------------------------------------
    def register_token(self, job_id: str, token: str) -> None:
        """Stores the token's digest in Redis; raises BrokerError if it could
        not within a few seconds (the token would not work elsewhere)."""

        async def store() -> None:
            try:
                await self._redis.set(f"{self._prefix}:tok:{job_id}", token_digest(token), px=self._ttl_ms)
            except self._errors as exc:
                raise BrokerError(f"cannot store the job's token at the broker {self._shown_url}: {exc}") from None

        self._call(store(), _CONNECT_TIMEOUT)

    async def _token_ok(self, job_id: str, token: str) -> bool:
        try:
            stored = await self._redis.get(f"{self._prefix}:tok:{job_id}")
        except self._errors as exc:
            raise BrokerError(f"cannot check the job's token at the broker {self._shown_url}: {exc}") from None
        if stored is None:
            return False
        return hmac.compare_digest(stored, token_digest(token).encode("ascii"))

    def check_token(self, job_id: str, token: str) -> bool:
        return bool(self._call(self._token_ok(job_id, token), _CONNECT_TIMEOUT))

    async def check_token_async(self, job_id: str, token: str) -> bool:
        future = asyncio.run_coroutine_threadsafe(self._token_ok(job_id, token), self._loop)
        try:
            return bool(await asyncio.wait_for(asyncio.wrap_future(future), _CONNECT_TIMEOUT))
        except asyncio.TimeoutError:
            raise BrokerError(f"the broker at {self._shown_url} did not answer within {_CONNECT_TIMEOUT} s") from None

    # -- receiving ---------------------------------------------------------------
    def attach(self, job_id: str) -> concurrent.futures.Future[None]:
        """Mirrors the job's events from Redis into the local channel while
        attached. The future is done once the retained history is in (or
        Redis is unreachable: the reconnect catches up later)."""
        return asyncio.run_coroutine_threadsafe(self._attach(job_id), self._loop)

    async def attach_async(self, job_id: str) -> None:
        await asyncio.wrap_future(self.attach(job_id))

    def detach(self, job_id: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._detach, job_id)
        except RuntimeError:  # closed
            pass

    async def _attach(self, job_id: str) -> None:
        entry = self._attached.get(job_id)
        if entry is not None:
            entry.users += 1
            if entry.ready is not None:
                await asyncio.shield(entry.ready)
            return
        entry = self._attached[job_id] = _Attached()
        entry.users = 1
        entry.ready = self._loop.create_future()
        try:
            async with self._sub_lock:
                await self._pubsub.subscribe(f"{self._prefix}:live:{job_id}")
            await self._catch_up(job_id, entry)
        except self._errors as exc:
            # The listener reconnects, subscribes again and catches up.
            self._warn("broker at %s unreachable (%s): job %r attached, will catch up", self._shown_url, exc, job_id)
            self._resync = True
        finally:
            ready, entry.ready = entry.ready, None
            ready.set_result(None)
            self._wake_listener.set()

    def _detach(self, job_id: str) -> None:
        entry = self._attached.get(job_id)
        if entry is None:
            return
        entry.users -= 1
        if entry.users > 0:
            return
        del self._attached[job_id]
        asyncio.ensure_future(self._unsubscribe(job_id))

    async def _unsubscribe(self, job_id: str) -> None:
        if job_id in self._attached:
            return  # attached again meanwhile
        try:
            async with self._sub_lock:
                await self._pubsub.unsubscribe(f"{self._prefix}:live:{job_id}")
        except self._errors:
            pass  # gone with the connection anyway

    async def _catch_up(self, job_id: str, entry: _Attached) -> None:
        """Reads the job's stream after the last id held into the channel."""
        start = "-" if not entry.last_id else f"(0-{entry.last_id}"
        rows = await self._redis.xrange(f"{self._prefix}:ev:{job_id}", min=start, max="+")
        for raw_id, fields in rows:
            self._ingest(job_id, entry, _entry_id(raw_id), fields)

    def _ingest(self, job_id: str, entry: _Attached, event_id: int, fields: dict[bytes, bytes]) -> None:
        try:
            status = int(fields[b"s"])
            data = fields[b"d"]
            alias = int(fields[b"r"]) if fields.get(b"o") == self._origin.encode() else 0
            if alias == event_id:
                alias = 0
            prev = _entry_id(fields[b"p"]) if b"p" in fields else 0
            if self._engine.ingest(job_id, event_id, status, data, alias, prev):
                self.stats["broker_ingested"] += 1
        except (KeyError, ValueError, TypeError) as exc:
            self._warn("job %r: malformed broker entry %d skipped (%s)", job_id, event_id, exc)
        except ChannelLimitError:
            self._warn("job %r: event %d from the broker not taken in: max_channels reached", job_id, event_id)
        except RuntimeError:  # the notifier closed
            return
        if event_id > entry.last_id:
            entry.last_id = event_id

    async def _listen_loop(self) -> None:
        live = f"{self._prefix}:live:".encode()
        backoff = _BACKOFF_MIN
        while not self._closing:
            if self._resync:
                if not await self._resubscribe():
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                    continue
                backoff = _BACKOFF_MIN
            if not self._pubsub.subscribed:
                # Nothing to read until a job is attached.
                await self._wake_listener.wait()
                self._wake_listener.clear()
                continue
            pubsub = self._pubsub
            try:
                # Blocks until the next message (get_message with a timeout
                # costs twice as much per message).
                response = await pubsub.parse_response(block=True)
            except self._errors as exc:
                if self._closing:
                    return
                self._warn("broker at %s: subscription lost (%s), reconnecting", self._shown_url, exc)
                self._resync = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            if not response:
                continue
            if response[0] != b"message":
                # (un)subscribe confirmations: redis-py keeps its state
                await pubsub.handle_message(response, ignore_subscribe_messages=True)
                continue
            channel, payload = response[1], response[2]
            if not channel.startswith(live):
                continue
            job_id = channel[len(live) :].decode("utf-8", "surrogateescape")
            entry = self._attached.get(job_id)
            if entry is None:
                continue
            try:
                raw_id, status, origin, asked, prev, data = payload.split(b"\n", 5)
                event_id = _entry_id(raw_id)
            except ValueError:
                self._warn("job %r: malformed broker message skipped", job_id)
                continue
            self._ingest(job_id, entry, event_id, {b"s": status, b"d": data, b"o": origin, b"r": asked, b"p": prev})

    async def _resubscribe(self) -> bool:
        """After a lost connection: a new Pub/Sub connection, every attached
        job subscribed again and read from its last id. False if Redis is
        still unreachable."""
        async with self._sub_lock:
            try:
                await self._pubsub.aclose()
            except Exception:  # noqa: BLE001 - the old connection is gone anyway
                pass
            self._pubsub = self._pubsub_client.pubsub(ignore_subscribe_messages=True)
        try:
            jobs = list(self._attached)
            if jobs:
                async with self._sub_lock:
                    await self._pubsub.subscribe(*(f"{self._prefix}:live:{j}" for j in jobs))
            for job_id in jobs:
                entry = self._attached.get(job_id)
                if entry is not None:
                    await self._catch_up(job_id, entry)
        except self._errors as exc:
            self._warn("broker at %s still unreachable (%s)", self._shown_url, exc)
            return False
        self._resync = False
        self.stats["broker_reconnects"] += 1
        logger.info("broker at %s: reconnected, %d jobs caught up", self._shown_url, len(jobs))
        return True

    # -- lifetime -------------------------------------------------------------------
    def close(self, timeout: float) -> None:
        """Waits up to timeout for queued events to reach Redis, then stops.
        Events still queued are reported (ERROR), never dropped silently."""
        if not self._thread.is_alive():
            return
        if timeout > 0 and self._queue:
            self.flush(timeout)
        self._closing = True
        left = len(self._queue)
        if left:
            logger.error(
                "notifier closed with %d events not published to the broker at %s "
                "(unreachable); other processes' subscribers will not see them",
                left,
                self._shown_url,
            )

        async def stop() -> None:
            for task in (getattr(self, "_publisher", None), getattr(self, "_listener", None)):
                if task is not None:
                    task.cancel()
            conn = getattr(self, "_pub_conn", None)
            if conn is not None:
                try:
                    await asyncio.wait_for(conn.disconnect(), 1.0)
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass
            for closer in (getattr(self, "_pubsub", None), getattr(self, "_redis", None), getattr(self, "_pubsub_client", None)):
                if closer is not None:
                    try:
                        await asyncio.wait_for(closer.aclose(), 1.0)
                    except Exception:  # noqa: BLE001 - closing a dead connection
                        pass

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(3.0)
        except Exception:  # noqa: BLE001
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(3.0)
        with self._flushed:
            self._flushed.notify_all()


def _entry_id(raw: Any) -> int:
    """The event id of a stream entry id ``0-<id>`` (bytes or str)."""
    if isinstance(raw, bytes):
        raw = raw.decode("ascii")
    ms, _, seq = str(raw).partition("-")
    if ms != "0" or not seq.isdigit():
        raise ValueError(f"not an event entry id: {raw!r}")
    return int(seq)


def _bulk(value: bytes) -> bytes:
    """A RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)
