"""Per-job channels and asyncio subscribers: fan-out, order under
concurrency, lag, end of subscription, close, limits."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from blueprint_notify import (
    ChannelLimitError,
    JobEvent,
    JobStatus,
    Subscription,
    SubscriptionClosed,
    SubscriptionLagged,
)

P = JobStatus.PROCESSING
DONE = JobStatus.COMPLETED


async def _collect(sub: Subscription) -> list[JobEvent]:
    return [event async for event in sub]


# -- concurrency -----------------------------------------------------------------------------
async def test_notify_from_8_threads_reaches_subscribers_in_order(make_notifier, receiver) -> None:
    threads, per_thread, hook_every = 8, 200, 8
    n = make_notifier(sse_capacity=per_thread + 8, max_connections_per_host=8)
    subs = {k: n.subscribe(f"t{k}") for k in range(threads)}
    hook_subs = {k: n.subscribe(f"t{k}-hook") for k in range(threads)}
    barrier = threading.Barrier(threads)
    failures: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            barrier.wait(5)
            for i in range(per_thread):
                status = DONE if i == per_thread - 1 else P
                n.notify(f"t{k}", JobEvent(status, result={"seq": i, "thread": k}))
                if i % hook_every == 0:
                    n.notify(f"t{k}-hook", JobEvent(P, result={"seq": i}), receiver.url_for(f"/t{k}"))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    async def read(sub: Subscription) -> list[tuple[int, JobEvent]]:
        out = []
        async for event in sub:
            out.append((sub.last_event_id, event))
        return out

    async def read_hooks(sub: Subscription, count: int) -> list[JobEvent]:
        return [await sub.get() for _ in range(count)]

    workers = [threading.Thread(target=worker, args=(k,), name=f"notify-{k}") for k in range(threads)]
    for t in workers:
        t.start()
    hooks_per_job = len(range(0, per_thread, hook_every))
    results, hook_results = await asyncio.gather(
        asyncio.gather(*(read(subs[k]) for k in range(threads))),
        asyncio.gather(*(read_hooks(hook_subs[k], hooks_per_job) for k in range(threads))),
    )
    for t in workers:
        t.join(5)
    assert not failures, failures
    total = 0
    for k, got in enumerate(results):
        assert [e.result["seq"] for _, e in got] == list(range(per_thread)), f"thread {k}: loss or reorder"
        assert all(e.result["thread"] == k for _, e in got), "events leaked between jobs"
        assert [seq for seq, _ in got] == list(range(1, per_thread + 1))
        assert got[-1][1].status is DONE
        total += len(got)
    assert total == threads * per_thread
    # Webhooks: every delivery, per-job order, and the same order subscribers saw.
    assert n.flush(10)
    reqs = receiver.requests
    assert len(reqs) == threads * hooks_per_job
    for k in range(threads):
        arrived = [r.json()["event"]["result"]["seq"] for r in reqs if r.job_id == f"t{k}-hook"]
        assert arrived == list(range(0, per_thread, hook_every))
        assert [e.result["seq"] for e in hook_results[k]] == arrived
    assert all(r.verified for r in reqs)
    assert n.active_channels() == threads  # the hook jobs never ended
    for sub in hook_subs.values():
        sub.close()


async def test_subscriber_order_matches_webhook_order(make_notifier, receiver) -> None:
    n = make_notifier(sse_capacity=64)
    sub = n.subscribe("same-order")
    for i in range(40):
        status = DONE if i == 39 else P
        n.notify("same-order", JobEvent(status, result={"i": i}), receiver.url_for())
    seen = await _collect(sub)
    assert n.flush(5)
    expected = [('{"job_id":"same-order","event":%s}' % e.to_json()).encode() for e in seen]
    assert [r.body for r in receiver.requests] == expected
    assert len(seen) == 40


# -- lag ------------------------------------------------------------------------------------------
async def test_lagging_subscriber_is_told_and_continues(make_notifier) -> None:
    n = make_notifier(sse_capacity=4)
    sub = n.subscribe("lag")
    for i in range(9):
        n.notify("lag", JobEvent(P, progress=i))
    n.notify("lag", JobEvent(DONE, result="done"))
    with pytest.raises(SubscriptionLagged) as info:
        await sub.get()
    assert info.value.skipped == 6
    assert "6" in str(info.value)
    got = [await sub.get() for _ in range(4)]
    assert [e.progress for e in got[:3]] == [6, 7, 8]
    assert got[3].status is DONE and got[3].result == "done", "the terminal event must not be skipped"
    assert sub.last_event_id == 10
    with pytest.raises(SubscriptionClosed):
        await sub.get()


async def test_terminal_event_survives_extreme_lag(make_notifier) -> None:
    n = make_notifier(sse_capacity=1)
    sub = n.subscribe("lag1")
    for i in range(50):
        n.notify("lag1", JobEvent(P, progress=i % 101))
    n.notify("lag1", JobEvent(JobStatus.FAILED, error="oom"))
    with pytest.raises(SubscriptionLagged) as info:
        await sub.get()
    assert info.value.skipped == 50
    last = await sub.get()
    assert last.status is JobStatus.FAILED and last.error == "oom"
    with pytest.raises(SubscriptionClosed):
        await sub.get()


async def test_lag_mid_stream_with_async_for(make_notifier) -> None:
    n = make_notifier(sse_capacity=4)
    fast = n.subscribe("mid")
    slow = n.subscribe("mid")
    for i in range(3):
        n.notify("mid", JobEvent(P, progress=i))
    assert [(await fast.get()).progress for _ in range(3)] == [0, 1, 2]
    assert [(await slow.get()).progress for _ in range(3)] == [0, 1, 2]
    for i in range(3, 10):  # 7 more: the slow one falls 3 behind
        n.notify("mid", JobEvent(P, progress=i))
        assert (await fast.get()).progress == i, "a fast subscriber is not affected by a slow one"
    n.notify("mid", JobEvent(DONE))
    assert (await fast.get()).status is DONE
    seen: list[int | None] = []
    lagged: list[int] = []
    while True:
        try:
            async for event in slow:
                seen.append(event.progress)
            break
        except SubscriptionLagged as exc:
            lagged.append(exc.skipped)
    assert lagged == [4]
    assert seen == [7, 8, 9, None]


# -- end of a subscription -------------------------------------------------------------------------
async def test_subscription_ends_after_terminal_event(make_notifier) -> None:
    n = make_notifier()
    sub = n.subscribe("end")
    n.notify("end", JobEvent(P, progress=1))
    n.notify("end", JobEvent(JobStatus.CANCELLED))
    n.notify("end", JobEvent(P, progress=2))  # after the end: not for this subscriber
    events = await _collect(sub)
    assert [e.status for e in events] == [P, JobStatus.CANCELLED]
    assert sub.closed
    with pytest.raises(SubscriptionClosed):
        await sub.get()
    assert await _collect(sub) == []
    assert sub.get_nowait() is None


async def test_subscriber_only_sees_events_from_now_on(make_notifier) -> None:
    n = make_notifier()
    n.register_job("late")
    n.notify("late", JobEvent(P, progress=1))
    n.notify("late", JobEvent(P, progress=2))
    sub = n.subscribe("late")
    assert sub.get_nowait() is None
    n.notify("late", JobEvent(P, progress=3))
    assert (await sub.get()).progress == 3
    assert sub.last_event_id == 3
    assert sub.get_nowait() is None
    n.notify("late", JobEvent(P, progress=4))
    got = sub.get_nowait()
    assert got is not None and got.progress == 4
    sub.close()


async def test_jobs_are_isolated(make_notifier) -> None:
    n = make_notifier()
    a, b = n.subscribe("iso-a"), n.subscribe("iso-b")
    n.notify("iso-a", JobEvent(DONE, result="a"))
    n.notify("iso-b", JobEvent(DONE, result="b"))
    assert [e.result for e in await _collect(a)] == ["a"]
    assert [e.result for e in await _collect(b)] == ["b"]


async def test_notifier_close_ends_waiting_subscriptions(make_notifier) -> None:
    n = make_notifier()
    sub = n.subscribe("closing")
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)  # let it block on the empty channel
    assert not waiter.done()
    n.close(timeout=0)
    with pytest.raises(SubscriptionClosed):
        await asyncio.wait_for(waiter, 2)
    with pytest.raises(RuntimeError, match="closed"):
        n.subscribe("closing")


async def test_notifier_close_delivers_pending_events_first(make_notifier) -> None:
    n = make_notifier()
    sub = n.subscribe("closing2")
    reader = asyncio.create_task(_collect(sub))
    n.notify("closing2", JobEvent(P, progress=1))
    await asyncio.sleep(0)
    n.notify("closing2", JobEvent(P, progress=2))
    n.close(timeout=0)
    events = await asyncio.wait_for(reader, 2)
    assert [e.progress for e in events] == [1, 2]


async def test_subscription_close(make_notifier) -> None:
    n = make_notifier()
    sub = n.subscribe("sc")
    assert n.active_channels() == 1
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    sub.close()
    assert sub.closed
    with pytest.raises(SubscriptionClosed):
        await asyncio.wait_for(waiter, 2)
    with pytest.raises(SubscriptionClosed):
        await sub.get()
    sub.close()  # idempotent
    # A channel that subscribing made and that never held an event goes with
    # its last subscriber (else such channels pile up to max_channels).
    assert n.active_channels() == 0
    again = n.subscribe("sc")
    n.notify("sc", JobEvent(P, progress=5))
    first = await again.get()
    assert first.progress == 5
    # Once it holds events (or is registered), the channel belongs to the
    # job, not to its subscribers: it lives until the job's terminal event.
    again.close()
    assert n.active_channels() == 1
    again = n.subscribe("sc")
    assert n.active_channels() == 1
    n.notify("sc", JobEvent(DONE))
    assert [e.status for e in await _collect(again)] == [DONE]
    assert n.active_channels() == 0


async def test_async_with_subscription(make_notifier) -> None:
    n = make_notifier()
    async with n.subscribe("aw") as sub:
        n.notify("aw", JobEvent(P, progress=9))
        assert (await sub.get()).progress == 9
    assert sub.closed


async def test_dropped_subscription_is_released(make_notifier) -> None:
    n = make_notifier()
    sub = n.subscribe("dropped")
    del sub
    gc.collect()
    n.notify("dropped", JobEvent(P, progress=1))
    fresh = n.subscribe("dropped")
    n.notify("dropped", JobEvent(DONE))
    assert [e.status for e in await _collect(fresh)] == [DONE]


async def test_channel_restarts_after_terminal(make_notifier) -> None:
    n = make_notifier()
    first = n.subscribe("again")
    n.notify("again", JobEvent(DONE))
    assert len(await _collect(first)) == 1
    assert n.active_channels() == 0
    second = n.subscribe("again")
    assert n.active_channels() == 1
    n.notify("again", JobEvent(DONE, result=2))
    assert [e.result for e in await _collect(second)] == [2]
    assert second.last_event_id == 1


# -- misuse ------------------------------------------------------------------------------------
def test_subscribe_outside_a_running_loop(make_notifier) -> None:
    n = make_notifier()
    with pytest.raises(RuntimeError, match="running event loop"):
        n.subscribe("no-loop")
    assert n.active_channels() == 0


async def test_get_from_another_loop_is_refused(make_notifier) -> None:
    n = make_notifier()
    sub = n.subscribe("loops")

    def elsewhere() -> None:
        async def go() -> JobEvent:
            return await sub.get()

        with pytest.raises(RuntimeError, match="another event loop"):
            asyncio.run(go())

    await asyncio.to_thread(elsewhere)
    sub.close()


async def test_two_waiters_on_one_subscription_are_refused(make_notifier) -> None:
    n = make_notifier()
    sub = n.subscribe("two")
    first = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already waiting"):
        await sub.get()
    n.notify("two", JobEvent(P, progress=1))
    assert (await asyncio.wait_for(first, 2)).progress == 1
    sub.close()


# -- channel limit ---------------------------------------------------------------------------
async def test_channel_limit(make_notifier) -> None:
    n = make_notifier(max_channels=2)
    n.register_job("a")
    sub_b = n.subscribe("b")
    assert n.active_channels() == 2
    with pytest.raises(ChannelLimitError):
        n.subscribe("c")
    with pytest.raises(ChannelLimitError):
        n.register_job("c")
    assert issubclass(ChannelLimitError, RuntimeError)
    # Jobs that already have a channel are fine.
    sub_a = n.subscribe("a")
    sub_b2 = n.subscribe("b")
    assert len(n.register_job("b")) == 64
    assert n.active_channels() == 2
    # Publishing to a job without a channel neither fails nor creates one.
    n.notify("c", JobEvent(P))
    assert n.active_channels() == 2
    # A terminal event frees a slot.
    n.notify("a", JobEvent(DONE))
    assert [e.status for e in await _collect(sub_a)] == [DONE]
    assert n.active_channels() == 1
    sub_c = n.subscribe("c")
    assert n.active_channels() == 2
    for s in (sub_b, sub_b2, sub_c):
        s.close()


def test_channel_limit_register_only(make_notifier) -> None:
    n = make_notifier(max_channels=3)
    tokens = {n.register_job(f"r{i}") for i in range(3)}
    assert len(tokens) == 3
    with pytest.raises(ChannelLimitError, match="channel limit"):
        n.register_job("r3")
    n.register_job("r0")  # re-registering an existing job is fine
    n.notify("r1", JobEvent(JobStatus.CANCELLED))
    n.register_job("r3")
    assert n.active_channels() == 3


async def test_threads_sharing_a_job_see_one_order_everywhere(make_notifier, receiver) -> None:
    """Events of one job notified from several threads at once get one order:
    the subscriber's sequence numbers and the webhook arrival order agree."""
    n = make_notifier(sse_capacity=512)
    sub = n.subscribe("shared")
    start = threading.Barrier(4)

    def worker(k: int) -> None:
        start.wait(5)
        for i in range(100):
            n.notify("shared", JobEvent(P, result=f"{k}-{i}"), receiver.url_for())

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in workers:
        t.start()
    seen = [(await sub.get()).result for _ in range(400)]
    for t in workers:
        t.join(5)
    assert sub.last_event_id == 400
    for k in range(4):  # each thread's own events keep their order
        mine = [int(r.split("-")[1]) for r in seen if r.startswith(f"{k}-")]
        assert mine == list(range(100))
    assert n.flush(10)
    arrived = [r.json()["event"]["result"] for r in receiver.requests]
    assert arrived == seen, "webhook order must be the channel's order"
    sub.close()


async def test_drain_returns_when_another_thread_closes(make_notifier, receiver) -> None:
    receiver.respond_with(200, delay=5.0)  # server-side delay
    n = make_notifier()
    n.notify("drain-close", JobEvent(DONE), receiver.url_for())
    loop = asyncio.get_running_loop()
    closer = loop.run_in_executor(None, n.close, 0.1)
    assert await n.drain(3) is True
    await closer
    (dead,) = n.dead_letters()
    assert "notifier closed" in dead.last_error


def test_subscribers_on_several_loops_in_several_threads(make_notifier) -> None:
    """Each event loop gets its own waker: subscribers of one job on loops in
    three threads all receive every event, in order."""
    n = make_notifier(sse_capacity=64)
    ready = threading.Barrier(4)
    results: dict[int, list[int]] = {}
    failures: list[BaseException] = []

    def consumer(k: int) -> None:
        async def main() -> None:
            sub = n.subscribe("multi-loop")
            ready.wait(5)
            results[k] = [e.result async for e in sub]

        try:
            asyncio.run(asyncio.wait_for(main(), 10))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=consumer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    ready.wait(5)  # every consumer has subscribed
    for i in range(30):
        n.notify("multi-loop", JobEvent(DONE if i == 29 else P, result=i))
    for t in threads:
        t.join(10)
    assert not failures, failures
    assert results == {k: list(range(30)) for k in range(3)}
    assert n.active_channels() == 0
