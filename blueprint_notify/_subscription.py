"""Asyncio subscribers of per-job channels.

The native side marks a subscriber ready and writes the loop's eventfd (only
on the 0->1 transition); ``loop.add_reader`` runs ``Waker.dispatch`` on the
loop thread, which calls each ready subscription's ``_wake``. Everything in
this module runs on the subscription's event loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import weakref
from typing import TYPE_CHECKING, Any

from . import _core
from ._events import JobEvent, _decode

if TYPE_CHECKING:
    from ._notifier import JobNotifier

__all__ = ["Subscription", "SubscriptionLagged", "SubscriptionClosed"]

logger = logging.getLogger("blueprint_notify")

_PULL_BATCH = 256
# Entries per generation of the notifier's _EventMemo: it remembers between
# _MEMO_GENERATION and twice that many of the latest events published.
_MEMO_GENERATION = 4096


class _EventMemo:
    """The events ``notify()`` published lately, by their JSON bytes.

    Only events that are a JobEvent exactly, without ``result`` (which could
    be mutable) and without ``error``, are remembered: for those, equal JSON
    bytes mean an equal, immutable (frozen) JobEvent. A subscription that
    pulls such bytes returns the remembered object instead of decoding them
    again, which saves a ``json.loads`` and a validation per event and per
    subscriber. Anything else is decoded as before. Two generations of dicts
    keep it bounded without per-entry bookkeeping; notify() fills it only
    for jobs with a live Subscription (not for SSE streams, which send the
    frames as they are), a job's only Subscription takes the entries out as
    it reads them, and it is emptied when the last Subscription closes.
    """

    __slots__ = ("recent", "older")

    def __init__(self) -> None:
        self.recent: dict[bytes, JobEvent] = {}
        self.older: dict[bytes, JobEvent] = {}

    def clear(self) -> None:
        self.recent = {}
        self.older = {}


class SubscriptionLagged(Exception):
    """Raised by ``get()`` (and ``async for``) when the subscriber fell more
    than ``sse_capacity`` events behind: ``skipped`` events were lost. The
    subscription continues with the oldest event still retained; the
    terminal event is never skipped. Catch it and keep reading."""

    def __init__(self, skipped: int) -> None:
        super().__init__(f"subscriber lagged: {skipped} event(s) skipped")
        self.skipped = skipped


class SubscriptionClosed(Exception):
    """Raised by ``get()`` once the subscription has ended (after the
    terminal event, ``close()``, or the notifier's close)."""


class _LoopHub:
    """One waker (eventfd) per (notifier, event loop), shared by the loop's
    subscriptions and drain() waiters; removed when its last user leaves."""

    def __init__(self, notifier: JobNotifier, loop: asyncio.AbstractEventLoop) -> None:
        self.notifier = notifier
        self.loop = loop
        self.users = 0
        self.drain_waiters: list[tuple[int, asyncio.Future[bool]]] = []
        self.waker = _core.Waker(notifier._engine, self._on_drained)
        self.fd = self.waker.fileno()
        loop.add_reader(self.fd, self.waker.dispatch)

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        self.notifier._forget_hub(self)
        if not self.loop.is_closed():
            self.loop.remove_reader(self.fd)

    def _on_drained(self) -> None:
        engine = self.notifier._engine
        for ticket, fut in self.drain_waiters:
            if not fut.done() and engine.ticket_done(ticket):
                fut.set_result(True)

    async def wait_drained(self, ticket: int, timeout: float | None) -> bool:
        """Waits until every delivery up to ``ticket`` is finished."""
        engine = self.notifier._engine
        fut: asyncio.Future[bool] = self.loop.create_future()
        entry = (ticket, fut)
        self.drain_waiters.append(entry)
        self.waker.want_drain(True)
        engine.watch(True)
        try:
            if engine.ticket_done(ticket):  # finished before we asked
                return True
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                return False
        finally:
            engine.watch(False)
            self.drain_waiters.remove(entry)
            if not self.drain_waiters:
                self.waker.want_drain(False)


def _on_ready_for(sub: Subscription) -> Any:
    # A weak reference keeps the native side from holding the subscription
    # alive: dropping it unsubscribes at once.
    ref = weakref.ref(sub)

    def on_ready() -> None:
        s = ref()
        if s is not None:
            s._wake()

    return on_ready


def _release_later(hub: _LoopHub, job_id: str) -> None:
    hub.notifier._unwatch_job(job_id)
    hub.release()


class Subscription:
    """Live events of one job, for one asyncio consumer.

    Use ``async for event in sub`` (ends after the terminal event) or
    ``await sub.get()``; ``async with`` or ``close()`` releases it. A
    subscriber that falls more than ``sse_capacity`` events behind gets
    :class:`SubscriptionLagged` from its next read, then continues.
    """

    def __init__(self, notifier: JobNotifier, job_id: str, hub: _LoopHub, *, after: int = -1) -> None:
        self._hub: _LoopHub | None = None
        self._loop = hub.loop
        #: (sequence number, event) pulled but not yet returned.
        self._buf: collections.deque[tuple[int, JobEvent]] = collections.deque()
        self._lagged = 0
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        self.job_id = job_id
        #: Sequence number of the last event returned (0: none yet).
        self.last_event_id = 0
        self._memo = notifier._memo
        self._subscribed = notifier._subscribed
        self._core = notifier._engine.subscribe(job_id, hub.waker, _on_ready_for(self), None, after)
        #: With a broker: the job's events from other processes are mirrored
        #: into the local channel while subscribed; a resuming subscription
        #: reads once the history kept in Redis is in (see _broker).
        self._broker = notifier._broker
        self._attached: concurrent.futures.Future[None] | None = None
        self._attaching: concurrent.futures.Future[None] | None = None
        if self._broker is not None:
            self._attached = self._broker.attach(job_id)
            if after != -1:
                self._attaching = self._attached
        notifier._watch_job(job_id)
        hub.acquire()
        self._hub = hub

    # -- reading -----------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fill(self) -> None:
        events, skipped, ended = self._core.pull(_PULL_BATCH)
        if skipped:
            self._lagged += skipped
        if events:
            append = self._buf.append
            memo = self._memo
            if self._subscribed.get(self.job_id) == 1:
                # The job's only Subscription: nobody else needs these
                # entries, drop them now rather than keep them alive.
                recent, older = memo.recent.pop, memo.older.pop
            else:
                recent, older = memo.recent.get, memo.older.get
            for seq, _status, data in events:
                event = recent(data, None) or older(data, None)
                append((seq, event if event is not None else _decode(data)))
        if ended:
            self._ended = True

    def _take(self) -> JobEvent | None:
        if self._lagged:
            skipped, self._lagged = self._lagged, 0
            raise SubscriptionLagged(skipped)
        if self._buf:
            self.last_event_id, event = self._buf.popleft()
            return event
        return None

    async def get(self) -> JobEvent:
        """The next event. Raises SubscriptionLagged after a gap and
        SubscriptionClosed once the subscription has ended."""
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("Subscription.get() called from another event loop")
        buf = self._buf
        if buf and not self._lagged:  # the common case: _take() inlined
            self.last_event_id, event = buf.popleft()
            return event
        if self._attaching is not None:
            attaching, self._attaching = self._attaching, None
            await asyncio.wrap_future(attaching)
        while True:
            event = self._take()
            if event is not None:
                return event
            if self._ended or self._core.closed:
                self.close()
                raise SubscriptionClosed(f"subscription to job {self.job_id!r} has ended")
            self._fill()
            if self._buf or self._lagged or self._ended:
                continue
            if self._waiter is not None:
                raise RuntimeError("another coroutine is already waiting on this subscription")
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def ready(self) -> None:
        """Returns once events published by other processes reach this
        subscription (with a broker: the job's Redis channel is subscribed
        and its history read; at once without a broker)."""
        if self._attached is not None and not self._attached.done():
            await asyncio.wrap_future(self._attached)

    def get_nowait(self) -> JobEvent | None:
        """The next event if one is ready, else None."""
        if self._attaching is not None:
            if not self._attaching.done():
                return None
            self._attaching = None
        event = self._take()
        if event is None and not self._core.closed:
            self._fill()
            event = self._take()
        return event

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> JobEvent:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    # -- lifetime ------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._hub is None

    def close(self) -> None:
        """Unsubscribes. Idempotent; call on the subscription's loop."""
        hub, self._hub = self._hub, None
        if hub is None:
            return
        self._ended = True
        self._core.close()
        self._wake()
        if self._broker is not None:
            self._broker.detach(self.job_id)
        hub.notifier._unwatch_job(self.job_id)
        hub.release()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        hub = getattr(self, "_hub", None)
        if hub is None:
            return
        # Possibly on another thread (GC): release on the loop's thread.
        self._core.close()
        if self._broker is not None:
            self._broker.detach(self.job_id)
        try:
            hub.loop.call_soon_threadsafe(_release_later, hub, self.job_id)
        except RuntimeError:  # loop closed: nothing to unregister from
            # (the job stays counted in notifier._subscribed: its events keep
            # going into the bounded memo, which costs a little, no more)
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Subscription job_id={self.job_id!r} {state} last_event_id={self.last_event_id}>"
