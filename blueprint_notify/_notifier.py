"""JobNotifier: the Python face of the native engine."""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from . import _core
from ._broker import Broker
from ._config import _SCHEMES, NotifierConfig, standard_key
from ._events import _CODES, Attempt, FailedDelivery, JobEvent
from ._subscription import _MEMO_GENERATION, Subscription, _EventMemo, _LoopHub

__all__ = ["JobNotifier"]

logger = logging.getLogger("blueprint_notify")

_live: weakref.WeakSet[JobNotifier] = weakref.WeakSet()


delivery_logger = logging.getLogger("blueprint_notify.delivery")


def _emit_logs(records: list[tuple[int, str]]) -> None:
    """Sink for the delivery thread's log records (called with the GIL, from
    whichever Python thread next enters the engine)."""
    for level, msg in records:
        delivery_logger.log(level, "%s", msg)


class JobNotifier:
    """Tells customers what their jobs are doing: signed webhooks delivered by
    a native thread, and live per-job channels for asyncio subscribers.

    ``JobNotifier(config=None, **overrides)``: overrides replace fields of
    ``config`` (or of the defaults). Use as a context manager (``with`` or
    ``async with``) or call ``close()``.
    """

    def __init__(self, config: NotifierConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = NotifierConfig(**overrides)
        elif not isinstance(config, NotifierConfig):
            raise TypeError(f"config must be a NotifierConfig, not {type(config).__name__}")
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self._config = config
        self._secret = config.signing_secret.encode("utf-8")
        if not self._secret:
            logger.warning(
                "notifier created with an empty signing_secret: notify() with a "
                "webhook_url will raise ValueError (SSE-only use is fine)"
            )
        self._engine = _core.Engine(
            signing_secret=self._secret,
            max_retries=config.max_retries,
            retry_base_ms=config.retry_base_ms,
            max_retry_delay_ms=config.max_retry_delay_ms,
            timeout_ms=max(1, round(config.timeout_secs * 1000)),
            sse_capacity=config.sse_capacity,
            max_channels=config.max_channels,
            max_dead_letters=config.max_dead_letters,
            allow_private_networks=config.allow_private_networks,
            max_connections=config.max_connections,
            max_connections_per_host=config.max_connections_per_host,
            max_response_bytes=config.max_response_bytes,
            user_agent=config.user_agent,
            log_sink=_emit_logs,
            retention_ms=round(config.retention_secs * 1000),
            standard_key=standard_key(config.signing_secret),
            schemes=_SCHEMES[config.signature_scheme],
            store_path=None if config.store_path is None else os.path.abspath(config.store_path),
            store_sync=config.durability == "sync",
            keep_delivered_ms=round(config.delivered_retention_secs * 1000),
            clock_ids=config.broker_url is not None,
        )
        #: The Redis broker (broker_url), or None: this process only.
        self._broker: Broker | None = None
        if config.broker_url is not None:
            try:
                self._broker = Broker(
                    self._engine,
                    url=config.broker_url,
                    prefix=config.broker_prefix,
                    buffer=config.broker_buffer,
                    ttl_ms=round(config.broker_ttl_secs * 1000),
                    retention_ms=round(config.retention_secs * 1000),
                    capacity=config.sse_capacity,
                )
            except BaseException:
                self._engine.close(0)
                raise
        #: Live secrets, current first, with the time each stops being used.
        self._secrets: list[tuple[str, float]] = [(config.signing_secret, 0.0)]
        self._hubs: dict[asyncio.AbstractEventLoop, _LoopHub] = {}
        self._hubs_lock = threading.Lock()
        self._memo = _EventMemo()
        #: Live Subscription objects per job id: notify() remembers the
        #: events of these jobs (see _EventMemo). Changed under _hubs_lock.
        self._subscribed: dict[str, int] = {}
        _live.add(self)

    @property
    def config(self) -> NotifierConfig:
        return self._config

    @property
    def closed(self) -> bool:
        return bool(self._engine.closed)

    # -- tokens ----------------------------------------------------------------
    def register_job(self, job_id: str) -> str:
        """Creates the job's channel and returns a fresh bearer token: 32 bytes
        from the OS CSPRNG as 64 lowercase hex chars. Registering again
        replaces the token. Raises ChannelLimitError at max_channels.

        With a broker the token's SHA-256 is stored in Redis before this
        returns, so every process accepts it (BrokerError if Redis cannot
        be reached within a few seconds)."""
        token = self._engine.register_job(job_id)
        if self._broker is not None:
            self._broker.register_token(job_id, token)
        return token

    def validate_job_token(self, job_id: str, token: str) -> bool:
        """True if the job is live and the token is its own (constant time).
        Unknown jobs and wrong tokens are both False. With a broker, a
        job registered by another process is checked in Redis (a round
        trip; BrokerError if Redis cannot be reached)."""
        if not (_is_text(job_id) and _is_text(token)):
            return False  # text without a UTF-8 form matches nothing
        if self._engine.validate_job_token(job_id, token):
            return True
        if self._broker is None:
            return False
        return self._broker.check_token(job_id, token)

    async def validate_job_token_async(self, job_id: str, token: str) -> bool:
        """validate_job_token() without blocking the event loop on Redis."""
        if not (_is_text(job_id) and _is_text(token)):
            return False
        if self._engine.validate_job_token(job_id, token):
            return True
        if self._broker is None:
            return False
        return await self._broker.check_token_async(job_id, token)

    # -- events ----------------------------------------------------------------
    def notify(self, job_id: str, event: JobEvent, webhook_url: str | None = None) -> None:
        """Publishes an event to the job's subscribers and, with a URL, queues
        a signed webhook delivery. Non-blocking (with a store and
        ``durability="sync"``, it returns once the delivery is on disk,
        the GIL released meanwhile); callable from any thread.

        Raises ValueError (bad job_id, bad URL, URL without a signing
        secret), TypeError (wrong types, result not JSON-serialisable) or
        RuntimeError after close().
        """
        exact = type(event) is JobEvent
        if not exact and not isinstance(event, JobEvent):
            raise TypeError(f"event must be a JobEvent, not {type(event).__name__}")
        if webhook_url is not None and not self._secret:
            raise ValueError(
                "webhook_url given but signing_secret is empty: webhooks cannot be "
                "signed (set NotifierConfig.signing_secret)"
            )
        broker = self._broker
        if broker is not None:
            self._notify_shared(broker, job_id, event, exact, webhook_url)
            return
        if exact:
            # A plain event (no result, no error) is encoded by the engine
            # itself; None means it is not plain. For a job with
            # Subscriptions, remember the event by its JSON so that they
            # hand out this immutable object instead of decoding the JSON
            # again (see _EventMemo).
            subscribed = self._subscribed
            want = bool(subscribed) and type(job_id) is str and job_id in subscribed
            done = self._engine.notify_plain(job_id, event, webhook_url, want)
            if done is not None:
                if want:
                    seq, body = done
                    if seq:
                        memo = self._memo
                        recent = memo.recent
                        recent[body] = event
                        if len(recent) >= _MEMO_GENERATION:
                            memo.older = recent
                            memo.recent = {}
                return
        self._engine.notify(job_id, _CODES[event.status], event._json_bytes(), webhook_url)

    def _notify_shared(
        self, broker: Broker, job_id: str, event: JobEvent, exact: bool, webhook_url: str | None
    ) -> None:
        """notify() with a broker: locally as without one, then queued for
        Redis with the event's id."""
        broker.check_room()
        done = self._engine.notify_plain(job_id, event, webhook_url, True) if exact else None
        if done is not None:
            seq, body = done
            if job_id in self._subscribed:
                memo = self._memo
                memo.recent[body] = event
                if len(memo.recent) >= _MEMO_GENERATION:
                    memo.older = memo.recent
                    memo.recent = {}
        else:
            body = event._json_bytes()
            seq = self._engine.notify(job_id, _CODES[event.status], body, webhook_url)
        broker.publish(job_id, seq, _CODES[event.status], body)

    def subscribe(self, job_id: str, *, last_event_id: int | None = None) -> Subscription:
        """Subscribes the running event loop to the job's events: those
        published from now on or, with ``last_event_id``, every retained
        event after that sequence number (0: from the job's first event).
        With a broker, events published by other processes come too (and,
        with ``last_event_id``, the job's history kept in Redis).
        Raises ChannelLimitError at max_channels, RuntimeError outside a
        running loop or after close()."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("subscribe() must be called from a running event loop") from None
        if self._engine.closed:
            raise RuntimeError("notifier is closed")
        after = -1
        if last_event_id is not None:
            if isinstance(last_event_id, bool) or not isinstance(last_event_id, int):
                raise TypeError("last_event_id must be an int or None")
            if not 0 <= last_event_id < 2**63:
                raise ValueError(f"last_event_id must be between 0 and 2**63-1, got {last_event_id}")
            after = last_event_id
        hub = self._hub_for(loop)
        hub.acquire()
        try:
            return Subscription(self, job_id, hub, after=after)
        finally:
            hub.release()

    def _hub_for(self, loop: asyncio.AbstractEventLoop) -> _LoopHub:
        with self._hubs_lock:
            hub = self._hubs.get(loop)
            if hub is None:
                # Loops closed with subscriptions never closed leave a hub
                # behind; its eventfd goes with it once nothing uses it.
                for stale in [lp for lp in self._hubs if lp.is_closed()]:
                    del self._hubs[stale]
                hub = self._hubs[loop] = _LoopHub(self, loop)
            return hub

    def _forget_hub(self, hub: _LoopHub) -> None:
        with self._hubs_lock:
            if self._hubs.get(hub.loop) is hub:
                del self._hubs[hub.loop]

    def _watch_job(self, job_id: str) -> None:
        with self._hubs_lock:
            self._subscribed[job_id] = self._subscribed.get(job_id, 0) + 1

    def _unwatch_job(self, job_id: str) -> None:
        with self._hubs_lock:
            left = self._subscribed.get(job_id, 0) - 1
            if left > 0:
                self._subscribed[job_id] = left
            else:
                self._subscribed.pop(job_id, None)
                if not self._subscribed:  # nobody left to hand remembered events to
                    self._memo.clear()

    # -- delivery state ----------------------------------------------------------
    def dead_letters(self) -> list[FailedDelivery]:
        """Deliveries that failed for good, oldest first (at most
        ``max_dead_letters``). With a store they live there too, so they
        survive restarts."""
        return [
            FailedDelivery(
                job_id=job_id,
                url=url,
                attempts=attempts,
                last_error=last_error,
                payload=payload.decode("utf-8"),
                id=ident,
                failed_at=failed_at,
                webhook_id=webhook_id,
                attempt_log=tuple(Attempt(*entry) for entry in log),
            )
            for ident, job_id, url, attempts, last_error, payload, failed_at, webhook_id, log in (
                self._engine.dead_letters()
            )
        ]

    def clear_dead_letters(self) -> None:
        """Forgets every dead letter (and deletes them from the store)."""
        self._engine.clear_dead_letters()

    def redeliver(self, ids: Iterable[int]) -> int:
        """Puts the dead letters with these ``FailedDelivery.id`` values back
        in the queue (at the end of their job's lane, attempts reset, same
        ``webhook_id`` so receivers can deduplicate). Unknown ids are
        ignored. Returns how many were requeued. RuntimeError after close()."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError("ids must be an iterable of FailedDelivery.id ints")
        id_list = list(ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in id_list):
            raise TypeError("ids must be ints (FailedDelivery.id)")
        return self._engine.redeliver(id_list)

    def redeliver_all(self) -> int:
        """Puts every dead letter back in the queue; returns how many."""
        return self._engine.redeliver(None)

    def active_channels(self) -> int:
        """Live (registered or subscribed, non-terminal) job channels.
        Jobs retained after their terminal event are not counted."""
        return self._engine.active_channels()

    def pending(self) -> int:
        """Webhook deliveries queued, in flight or waiting for a retry."""
        return self._engine.pending()

    def stats(self) -> dict[str, float]:
        """Counters and gauges: enqueued (alias submitted), delivered,
        retried, dead_lettered, dead_letters_evicted, attempts,
        failed_attempts, in_flight, pending, channels (alias
        active_channels), subscribers, the notify-to-2xx delivery
        latency percentiles latency_p50_ms / p90 / p99 (histogram, ~19%
        buckets; 0 before the first delivery) and, with a store,
        recovered (pending deliveries read back at start), left_in_store
        (pending at close, resumed by the next start), store_commits and
        store_errors (failed writes: logged, delivery went on from
        memory) and, with a broker, broker_published (events written to
        Redis), broker_buffered (waiting for it), broker_rejected (refused:
        buffer full), broker_reconnects, broker_resequenced and
        broker_ingested (events of other processes taken in)."""
        stats = self._engine.stats()
        broker = self._broker
        if broker is not None:
            stats.update(broker.stats)
            stats["broker_buffered"] = broker.buffered
        return stats

    def flush(self, timeout: float | None = None) -> bool:
        """Blocks (without the GIL) until every delivery queued before the
        call is delivered or dead-lettered (later ones do not delay it), and,
        with a broker, every event notified before it is in Redis; False if
        the timeout passed first."""
        if self._broker is None:
            return self._engine.flush(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._broker.flush(timeout):
            return False
        return self._engine.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))

    async def drain(self, timeout: float | None = None) -> bool:
        """Like flush() without blocking the event loop: True once every
        delivery queued before the call is delivered or dead-lettered (and,
        with a broker, every event notified before it is in Redis)."""
        if self._broker is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            if not await self._broker.drain(timeout):
                return False
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
        engine = self._engine
        ticket = engine.ticket()
        if engine.ticket_done(ticket):
            engine.pump_logs()
            return True
        loop = asyncio.get_running_loop()
        hub = self._hub_for(loop)
        hub.acquire()
        try:
            return await hub.wait_drained(ticket, timeout)
        finally:
            hub.release()
            engine.pump_logs()

    def rotate_secret(self, new_secret: str, overlap_secs: float = 86_400) -> None:
        """Makes ``new_secret`` the signing secret. For ``overlap_secs`` the
        previous secrets stay live: every delivery then carries one ``v1,``
        signature per live secret in ``webhook-signature``, so receivers can
        switch at their pace; ``X-Webhook-Signature`` uses the new one."""
        if not isinstance(new_secret, str):
            raise TypeError(f"new_secret must be a str, not {type(new_secret).__name__}")
        if not new_secret:
            raise ValueError("new_secret must not be empty")
        if isinstance(overlap_secs, bool) or not isinstance(overlap_secs, (int, float)) or not 0 <= overlap_secs <= 30 * 86_400:
            raise ValueError(f"overlap_secs must be between 0 and {30 * 86_400}, got {overlap_secs!r}")
        std = standard_key(new_secret, "new_secret")  # validates it (whsec_, text)
        now = time.time()
        until = now + overlap_secs
        previous = [(secret, exp if exp else until) for secret, exp in self._secrets if secret and (not exp or exp > now)]
        if overlap_secs == 0:
            previous = []  # no overlap: the old secrets stop now
        live = [(new_secret, 0.0)] + [(s, e) for s, e in previous if s != new_secret][:7]
        # Whole seconds on the native side: round up, never cut an overlap short.
        self._engine.set_keys(
            [(s.encode("utf-8"), standard_key(s) if s != new_secret else std, math.ceil(e)) for s, e in live]
        )
        self._secrets = live
        self._secret = new_secret.encode("utf-8")

    def sign_payload(self, payload: bytes | str, timestamp: int) -> str:
        """The hex HMAC-SHA256 of ``"{timestamp}.{payload}"`` with this
        notifier's secret, as sent in X-Webhook-Signature (after "sha256=")."""
        if not self._secret:
            raise ValueError("cannot sign webhook: signing_secret is empty")
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        return _core.sign(self._secret, timestamp, data)

    # -- lifetime ----------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """Stops accepting events (notify then raises RuntimeError), ends
        subscriptions and waits up to ``timeout`` (default:
        close_timeout_secs) for pending deliveries. Without a store the
        rest are dead-lettered with a last_error that says so; with one
        they stay pending in the store (logged) and resume when a notifier
        opens it again. Idempotent."""
        if timeout is None:
            timeout = self._config.close_timeout_secs
        if self._broker is not None:
            self._broker.close(timeout)
        self._engine.close(timeout)

    def __enter__(self) -> JobNotifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> JobNotifier:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Wait on the loop (a receiver may run on it), then close at once.
        await self.drain(self._config.close_timeout_secs)
        self.close(0)

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None and not engine.closed:
            logger.warning(
                "JobNotifier garbage-collected without close(): closing now; "
                "%d pending deliveries are %s",
                engine.pending(),
                "dead-lettered" if self._config.store_path is None else "left in the store",
            )
            broker = getattr(self, "_broker", None)
            if broker is not None:
                broker.close(0)
            engine.close(0)

    def __repr__(self) -> str:
        try:
            pending, channels = self._engine.pending(), self._engine.active_channels()
        except RuntimeError:  # a fork child: the parent's notifier is unusable here
            return "<JobNotifier from before fork(): unusable in this process>"
        state = "closed" if self.closed else "open"
        return f"<JobNotifier {state} pending={pending} channels={channels}>"


def _is_text(value: object) -> bool:
    """True for a str with a UTF-8 form (no lone surrogates); TypeError for
    anything but a str."""
    if not isinstance(value, str):
        raise TypeError(f"job_id and token must be str, not {type(value).__name__}")
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@atexit.register
def _close_all() -> None:
    """At interpreter exit, give pending deliveries close_timeout_secs and
    dead-letter (and log) the rest instead of dropping them silently."""
    for notifier in list(_live):
        if not notifier.closed:
            notifier.close()
