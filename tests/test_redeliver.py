"""Dead letters can be put back in the queue: redeliver(ids), redeliver_all()."""

from __future__ import annotations

import pytest

from blueprint_notify import JobEvent, JobStatus

P, DONE = JobStatus.PROCESSING, JobStatus.COMPLETED


def test_redeliver_all_after_the_endpoint_recovers(make_notifier, receiver) -> None:
    receiver.respond_with(500, times=3)
    n = make_notifier(max_retries=0)
    for i in range(3):
        n.notify(f"job-{i}", JobEvent(DONE, result={"i": i}), receiver.url_for("/h"))
    assert n.flush(5)
    dead = n.dead_letters()
    # Oldest first: the order they failed in, which across jobs (three
    # concurrent deliveries) is whichever 500 came back first.
    assert sorted(d.job_id for d in dead) == ["job-0", "job-1", "job-2"]
    assert [d.failed_at for d in dead] == sorted(d.failed_at for d in dead)
    assert n.redeliver_all() == 3
    assert n.dead_letters() == []
    assert n.flush(5)
    assert n.dead_letters() == []
    delivered = [r for r in receiver.requests if r.status == 200]
    assert sorted(r.json()["job_id"] for r in delivered) == ["job-0", "job-1", "job-2"]
    # Same message: the same webhook-id and the exact same body.
    by_job = {r.json()["job_id"]: r for r in delivered}
    for d in dead:
        assert by_job[d.job_id].headers["webhook-id"] == d.webhook_id
        assert by_job[d.job_id].body == d.payload.encode()
        assert by_job[d.job_id].verified
    assert n.stats()["delivered"] == 3


def test_redeliver_some_ids_keeps_the_others(make_notifier, receiver) -> None:
    receiver.respond_with(500, times=3)
    n = make_notifier(max_retries=0)
    for i in range(3):
        n.notify(f"job-{i}", JobEvent(DONE), receiver.url_for())
    assert n.flush(5)
    first, second, third = n.dead_letters()
    assert n.redeliver([second.id, 10**9, -1]) == 1  # unknown ids are ignored
    assert n.flush(5)
    assert [d.job_id for d in n.dead_letters()] == [first.job_id, third.job_id]
    assert [r.json()["job_id"] for r in receiver.requests if r.status == 200] == [second.job_id]
    assert n.redeliver([second.id]) == 0  # no longer a dead letter


def test_redelivered_attempts_start_over(make_notifier, receiver) -> None:
    receiver.respond_with(500)
    n = make_notifier(max_retries=1, retry_base_ms=5)
    n.notify("again", JobEvent(DONE), receiver.url_for())
    assert n.flush(5)
    (before,) = n.dead_letters()
    assert before.attempts == 2 and len(before.attempt_log) == 2
    assert n.redeliver([before.id]) == 1
    assert n.flush(5)
    (after,) = n.dead_letters()
    assert after.attempts == 2 and len(after.attempt_log) == 2
    assert after.webhook_id == before.webhook_id
    assert after.id != before.id
    assert len(receiver.requests) == 4


def test_redelivery_keeps_per_job_order_behind_newer_events(make_notifier, receiver) -> None:
    receiver.respond_with(500, times=1)
    n = make_notifier(max_retries=0)
    url = receiver.url_for()
    n.notify("ordered", JobEvent(P, progress=1), url)
    assert n.flush(5)
    (dead,) = n.dead_letters()
    n.notify("ordered", JobEvent(P, progress=2), url)
    assert n.redeliver([dead.id]) == 1
    assert n.flush(5)
    ok = [r.json()["event"]["progress"] for r in receiver.requests if r.status == 200]
    assert ok == [2, 1]  # requeued at the end of the job's lane


def test_redeliver_bad_input_and_after_close(make_notifier) -> None:
    n = make_notifier()
    with pytest.raises(TypeError, match="ids"):
        n.redeliver("12")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ids"):
        n.redeliver([1.5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="ids"):
        n.redeliver([True])
    assert n.redeliver([]) == 0 and n.redeliver_all() == 0
    n.close(0)
    with pytest.raises(RuntimeError, match="closed"):
        n.redeliver_all()
