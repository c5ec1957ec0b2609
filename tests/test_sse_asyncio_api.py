"""The asyncio equivalents of the SSE history: ``subscribe(job_id,
last_event_id=N)`` replays exactly what follows N, ``subscribe(job_id)`` is
live-only; lag, retained jobs, validation; and the same ids as the SSE
stream."""

from __future__ import annotations

import asyncio

import pytest
from sse_support import RETRY, RawHTTP, frames, make_sse  # noqa: F401  (make_sse: fixture)

from blueprint_notify import JobEvent, JobStatus, Subscription, SubscriptionClosed, SubscriptionLagged

DONE = JobStatus.COMPLETED
P = JobStatus.PROCESSING


def progress(i: int) -> JobEvent:
    return JobEvent(P, progress=i, timestamp=1_700_000_000 + i)


async def get(sub: Subscription) -> tuple[int, JobEvent]:
    event = await asyncio.wait_for(sub.get(), 2)
    return sub.last_event_id, event


async def rest(sub: Subscription) -> list[tuple[int, JobEvent]]:
    async def collect() -> list[tuple[int, JobEvent]]:
        return [(sub.last_event_id, e) async for e in sub]

    return await asyncio.wait_for(collect(), 2)


async def test_last_event_id_replays_exactly_what_follows(make_notifier) -> None:
    n = make_notifier()
    n.register_job("j")
    events = [progress(i) for i in range(1, 6)]
    for e in events:
        n.notify("j", e)
    async with n.subscribe("j", last_event_id=2) as sub:
        assert [await get(sub) for _ in range(3)] == [(3, events[2]), (4, events[3]), (5, events[4])]
        assert sub.get_nowait() is None
        done = JobEvent(DONE, timestamp=9)
        n.notify("j", done)
        assert await rest(sub) == [(6, done)]
    with pytest.raises(SubscriptionClosed):
        await sub.get()


async def test_last_event_id_zero_replays_from_the_first_event(make_notifier) -> None:
    n = make_notifier()
    n.register_job("j")
    events = [JobEvent("queued", timestamp=1), progress(1), JobEvent(DONE, timestamp=2)]
    for e in events:
        n.notify("j", e)
    sub = n.subscribe("j", last_event_id=0)
    assert await rest(sub) == list(enumerate(events, 1))
    assert sub.closed


async def test_subscribe_without_last_event_id_is_live_only(make_notifier) -> None:
    n = make_notifier()
    n.register_job("j")
    for i in range(1, 4):
        n.notify("j", progress(i))
    async with n.subscribe("j") as sub:
        assert sub.get_nowait() is None
        n.notify("j", progress(4))
        assert await get(sub) == (4, progress(4))
        n.notify("j", JobEvent(DONE, timestamp=5))
        assert await rest(sub) == [(5, JobEvent(DONE, timestamp=5))]


async def test_resume_a_subscription_after_closing_it(make_notifier) -> None:
    n = make_notifier()
    n.register_job("j")
    events = [progress(i) for i in range(1, 8)] + [JobEvent(DONE, timestamp=99)]
    for e in events[:3]:
        n.notify("j", e)
    first = n.subscribe("j", last_event_id=0)
    assert [await get(first) for _ in range(2)] == [(1, events[0]), (2, events[1])]
    first.close()  # dropped after id 2 (id 3 was pending, unread)
    for e in events[3:]:
        n.notify("j", e)
    second = n.subscribe("j", last_event_id=first.last_event_id)
    assert await rest(second) == [(i, e) for i, e in enumerate(events, 1)][2:]


async def test_lag_then_continues(make_notifier) -> None:
    n = make_notifier(sse_capacity=4)
    n.register_job("j")
    events = [progress(i) for i in range(1, 11)]
    for e in events:
        n.notify("j", e)
    async with n.subscribe("j", last_event_id=0) as sub:
        with pytest.raises(SubscriptionLagged) as lagged:
            await sub.get()
        assert lagged.value.skipped == 6
        assert [await get(sub) for _ in range(4)] == [(i, events[i - 1]) for i in range(7, 11)]
        n.notify("j", JobEvent(DONE, timestamp=1))
        assert await rest(sub) == [(11, JobEvent(DONE, timestamp=1))]


async def test_retained_job_replays_and_ends(make_notifier) -> None:
    n = make_notifier()
    n.register_job("j")
    events = [progress(1), JobEvent(JobStatus.FAILED, error="x", timestamp=2)]
    for e in events:
        n.notify("j", e)
    assert n.active_channels() == 0
    assert await rest(n.subscribe("j", last_event_id=0)) == [(1, events[0]), (2, events[1])]
    assert await rest(n.subscribe("j", last_event_id=1)) == [(2, events[1])]
    assert await rest(n.subscribe("j", last_event_id=2)) == []  # nothing follows the end
    assert n.active_channels() == 0


async def test_last_event_id_ahead_of_history(make_notifier) -> None:
    n = make_notifier()
    n.register_job("j")
    n.notify("j", progress(1))
    async with n.subscribe("j", last_event_id=1000) as sub:
        assert sub.get_nowait() is None
        n.notify("j", progress(2))
        assert await get(sub) == (2, progress(2))


async def test_events_for_a_job_without_channel_are_not_kept(make_notifier) -> None:
    n = make_notifier()
    n.notify("nobody", progress(1))  # no register_job, no subscriber: dropped
    async with n.subscribe("nobody", last_event_id=0) as sub:
        assert sub.get_nowait() is None
        n.notify("nobody", progress(2))
        assert await get(sub) == (1, progress(2))


@pytest.mark.parametrize("value, error", [(-1, ValueError), (True, TypeError), ("3", TypeError), (1.0, TypeError)])
async def test_invalid_last_event_id(make_notifier, value, error) -> None:
    n = make_notifier()
    with pytest.raises(error):
        n.subscribe("j", last_event_id=value)
    assert not n._hubs


async def test_same_ids_as_the_sse_stream(make_sse) -> None:
    sse = make_sse()
    n = sse.notifier
    job, token = sse.new_job()
    n.notify(job, progress(1))
    sub = n.subscribe(job, last_event_id=0)
    raw = await RawHTTP.request(sse.port, sse.path_for(job), {"Authorization": f"Bearer {token}"})
    events = [progress(1), progress(2), JobEvent(DONE, timestamp=3)]
    for e in events[1:]:
        n.notify(job, e)
    assert await raw.read_to_end() == RETRY + frames(events)
    await raw.close()
    assert await rest(sub) == list(enumerate(events, 1))
