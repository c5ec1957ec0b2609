"""Retry policy on real loopback deliveries: 410 Gone ends a delivery at
once, 429/503 Retry-After (delta-seconds or HTTP-date) holds the next
attempt back (capped by max_retry_delay_ms), other failures back off with
jitter, and every attempt's outcome is kept on the dead letter
(``attempt_log``).

Timings are measured where they happen: the receiver's arrival times
(``ReceivedRequest.received_at``, monotonic) or, for HTTP-dates, the wall
clock taken by a handler hook when the request arrives.
"""

from __future__ import annotations

import email.utils
import math
import threading
import time

import pytest

from blueprint_notify import Attempt, JobEvent, JobStatus
from blueprint_notify.testing import ReceivedRequest

UNREACHABLE = "http://127.0.0.1:1/nope"  # nothing listens on port 1: connection refused


def gaps(reqs: list[ReceivedRequest]) -> list[float]:
    return [b.received_at - a.received_at for a, b in zip(reqs, reqs[1:])]


# -- 410 Gone ------------------------------------------------------------------------------------------
def test_410_gone_is_not_retried(make_notifier, receiver) -> None:
    receiver.respond_with(410)
    n = make_notifier(max_retries=5, retry_base_ms=10)
    event = JobEvent(JobStatus.COMPLETED)
    n.notify("gone", event, receiver.url_for("/gone"))
    assert n.flush(5)
    assert [r.status for r in receiver.requests] == [410]
    (dead,) = n.dead_letters()
    assert dead.attempts == 1
    assert dead.url == receiver.url_for("/gone")
    assert dead.last_error.startswith("HTTP 410 Gone"), dead.last_error
    assert "not retried" in dead.last_error
    assert dead.webhook_id == receiver.requests[0].headers["webhook-id"]
    (attempt,) = dead.attempt_log
    assert (attempt.status, attempt.error) == (410, dead.last_error)
    s = n.stats()
    assert (s["attempts"], s["retried"], s["dead_lettered"], s["delivered"]) == (1, 0, 1, 0)


def test_410_after_a_retry_stops_there(make_notifier, receiver) -> None:
    receiver.respond_with(500, times=1)
    receiver.respond_with(410, times=1)
    n = make_notifier(max_retries=5, retry_base_ms=10)
    n.notify("gone-later", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    assert [r.status for r in receiver.requests] == [500, 410]
    (dead,) = n.dead_letters()
    assert dead.attempts == 2
    assert [(a.status, a.error) for a in dead.attempt_log] == [(500, "HTTP 500"), (410, dead.last_error)]
    assert "410" in dead.last_error and "not retried" in dead.last_error
    assert n.stats()["retried"] == 1


def test_other_4xx_are_retried(make_notifier, receiver) -> None:
    receiver.respond_with(404, times=1)
    receiver.respond_with(400, times=1)
    n = make_notifier(max_retries=2, retry_base_ms=10)
    n.notify("retry-4xx", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    assert [r.status for r in receiver.requests] == [404, 400, 200]
    assert n.dead_letters() == []


# -- Retry-After -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "header"), [(429, "Retry-After"), (503, "retry-after")])
def test_retry_after_seconds_holds_the_next_attempt_back(make_notifier, receiver, status, header) -> None:
    receiver.respond_with(status, headers={header: "1"}, times=1)
    n = make_notifier(max_retries=1, retry_base_ms=10)
    n.notify("ra", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    reqs = receiver.requests
    assert [r.status for r in reqs] == [status, 200]
    (gap,) = gaps(reqs)
    assert 1.0 <= gap < 1.8, f"Retry-After: 1 but the retry came after {gap:.3f} s"
    assert n.dead_letters() == []
    assert n.stats()["retried"] == 1


def test_retry_after_http_date(make_notifier, receiver) -> None:
    when = math.ceil(time.time()) + 2  # a whole second: an HTTP-date has no fraction
    arrivals: list[float] = []

    def clock(req: ReceivedRequest) -> None:
        arrivals.append(time.time())
        return None  # answer from the script

    receiver.set_handler(clock)
    receiver.respond_with(429, headers={"Retry-After": email.utils.formatdate(when, usegmt=True)}, times=1)
    n = make_notifier(max_retries=1, retry_base_ms=10)
    n.notify("ra-date", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(6)
    reqs = receiver.requests
    assert [r.status for r in reqs] == [429, 200]
    assert arrivals[1] >= when, f"retried {when - arrivals[1]:.3f} s before the Retry-After date"
    (gap,) = gaps(reqs)
    assert 1.0 <= gap < 3.5, gap


@pytest.mark.parametrize("retry_after", ["5", "99999999999999999999999999"])
def test_retry_after_is_capped_by_max_retry_delay(make_notifier, receiver, retry_after) -> None:
    receiver.respond_with(429, headers={"Retry-After": retry_after}, times=1)
    n = make_notifier(max_retries=1, retry_base_ms=10, max_retry_delay_ms=300)
    n.notify("ra-cap", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    reqs = receiver.requests
    assert [r.status for r in reqs] == [429, 200]
    (gap,) = gaps(reqs)
    assert 0.3 <= gap < 0.9, f"the 300 ms cap should apply, retried after {gap:.3f} s"


def test_retry_after_is_capped_for_an_http_date_too(make_notifier, receiver) -> None:
    when = time.time() + 60
    receiver.respond_with(503, headers={"Retry-After": email.utils.formatdate(when, usegmt=True)}, times=1)
    n = make_notifier(max_retries=1, retry_base_ms=10, max_retry_delay_ms=300)
    n.notify("ra-cap-date", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    reqs = receiver.requests
    assert [r.status for r in reqs] == [503, 200]
    (gap,) = gaps(reqs)
    assert 0.3 <= gap < 0.9, gap


@pytest.mark.parametrize(
    ("status", "retry_after"),
    [
        (500, "5"),  # Retry-After only counts on 429 and 503
        (502, "5"),
        (429, None),  # no hint: plain backoff
        (429, "soon"),  # unparseable: plain backoff
        (503, "Wed, 21 Oct 2015 07:28:00 GMT"),  # in the past: plain backoff
    ],
)
def test_retry_after_is_ignored_otherwise(make_notifier, receiver, status, retry_after) -> None:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    receiver.respond_with(status, headers=headers, times=1)
    n = make_notifier(max_retries=1, retry_base_ms=10)
    n.notify("ra-ignored", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    reqs = receiver.requests
    assert [r.status for r in reqs] == [status, 200]
    (gap,) = gaps(reqs)
    assert gap < 0.5, f"expected the 10 ms backoff, retried after {gap:.3f} s"


def test_retry_after_applies_to_the_next_attempt_only(make_notifier, receiver) -> None:
    receiver.respond_with(503, headers={"Retry-After": "1"}, times=1)
    receiver.respond_with(500, times=1)
    n = make_notifier(max_retries=2, retry_base_ms=10)
    n.notify("ra-once", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    reqs = receiver.requests
    assert [r.status for r in reqs] == [503, 500, 200]
    first, second = gaps(reqs)
    assert 1.0 <= first < 1.8, first
    assert second < 0.5, second


def test_retry_after_shorter_than_the_backoff_does_not_shorten_it(make_notifier, receiver) -> None:
    # Backoff before retry 1: 1000 ms +-20 %; Retry-After: 0 must not make it sooner.
    receiver.respond_with(429, headers={"Retry-After": "0"}, times=1)
    n = make_notifier(max_retries=1, retry_base_ms=1000)
    n.notify("ra-short", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    (gap,) = gaps(receiver.requests)
    assert 0.8 <= gap < 1.6, gap


def test_other_failures_back_off_exponentially_with_jitter(make_notifier, receiver) -> None:
    receiver.respond_with(500, times=2)
    n = make_notifier(max_retries=2, retry_base_ms=150)
    n.notify("backoff", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    reqs = receiver.requests
    assert [r.status for r in reqs] == [500, 500, 200]
    first, second = gaps(reqs)
    # 150 ms then 300 ms, each within +-20 % (plus the round trip).
    assert 0.12 <= first < 0.45, first
    assert 0.24 <= second < 0.6, second
    assert second > first


# -- attempt log ------------------------------------------------------------------------------------------
def test_attempt_log_records_every_attempt(make_notifier, receiver) -> None:
    receiver.respond_with(500, times=1)
    receiver.respond_with(503, times=1, delay=0.3)  # server-side delay
    receiver.respond_with(404, times=1)
    n = make_notifier(max_retries=2, retry_base_ms=10)
    before = time.time()
    n.notify("logged", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    after = time.time()
    assert [r.status for r in receiver.requests] == [500, 503, 404]
    (dead,) = n.dead_letters()
    assert dead.attempts == 3
    assert dead.last_error == "HTTP 404"
    log = dead.attempt_log
    assert all(isinstance(a, Attempt) for a in log)
    assert [(a.status, a.error) for a in log] == [(500, "HTTP 500"), (503, "HTTP 503"), (404, "HTTP 404")]
    # Start times: wall clock, in order, within the run.
    ats = [a.at for a in log]
    assert before - 0.01 <= ats[0] <= ats[1] <= ats[2] <= after + 0.01, (before, ats, after)
    assert ats[1] - ats[0] >= log[0].duration_ms / 1000 - 0.002
    assert ats[2] - ats[1] >= 0.3, "the second attempt alone took 300 ms"
    # Durations: the delayed answer took at least 300 ms, the others far less.
    assert 300 <= log[1].duration_ms < 2000, log[1]
    assert log[0].duration_ms < 250 and log[2].duration_ms < 250, log
    assert dead.failed_at >= ats[2]


def test_attempt_log_records_timeouts_as_errors_with_status_0(make_notifier, receiver) -> None:
    receiver.respond_with(200, delay=1.5)  # server-side delay, beyond the timeout
    n = make_notifier(max_retries=1, retry_base_ms=10, timeout_secs=0.2)
    n.notify("slow", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    assert receiver.wait_for(2, 1)
    (dead,) = n.dead_letters()
    assert dead.attempts == 2
    assert len(dead.attempt_log) == 2
    for a in dead.attempt_log:
        assert a.status == 0
        assert a.error.startswith("Timeout was reached"), a.error
        assert 190 <= a.duration_ms < 1000, a
    assert dead.last_error == dead.attempt_log[-1].error


def test_attempt_log_records_connection_errors(make_notifier) -> None:
    n = make_notifier(max_retries=2, retry_base_ms=10)
    n.notify("refused", JobEvent(JobStatus.COMPLETED), UNREACHABLE)
    assert n.flush(5)
    (dead,) = n.dead_letters()
    assert dead.attempts == 3
    assert [a.status for a in dead.attempt_log] == [0, 0, 0]
    for a in dead.attempt_log:
        assert a.error.startswith("Couldn't connect to server"), a.error
        assert 0 <= a.duration_ms < 1000
    ats = [a.at for a in dead.attempt_log]
    assert ats == sorted(ats) and len(set(ats)) == 3


def test_attempt_log_keeps_the_last_50(make_notifier) -> None:
    n = make_notifier(max_retries=59, retry_base_ms=0)
    n.notify("many-attempts", JobEvent(JobStatus.COMPLETED), UNREACHABLE)
    assert n.flush(10)
    (dead,) = n.dead_letters()
    assert dead.attempts == 60
    assert len(dead.attempt_log) == 50
    ats = [a.at for a in dead.attempt_log]
    assert ats == sorted(ats)
    assert all(a.status == 0 for a in dead.attempt_log)


def test_attempt_log_of_a_delivery_closed_while_waiting(make_notifier, receiver) -> None:
    """close() dead-letters a delivery waiting for its retry: the attempts it
    made are on its log, and last_error says why it stopped."""
    receiver.respond_with(503, headers={"Retry-After": "30"}, times=1)
    n = make_notifier(max_retries=3, retry_base_ms=10)
    n.notify("closed", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert receiver.wait_for(1, 5)
    assert not n.flush(0.3)  # held back by Retry-After
    n.close(0)
    (dead,) = n.dead_letters()
    assert dead.attempts == 1
    assert [(a.status, a.error) for a in dead.attempt_log] == [(503, "HTTP 503")]
    assert "closed" in dead.last_error and "HTTP 503" in dead.last_error, dead.last_error
    assert len(receiver.requests) == 1


def test_retry_after_does_not_hold_back_other_jobs(make_notifier, receiver) -> None:
    """Retry-After delays that delivery's lane only: another job to the
    same receiver is delivered at once."""
    released = threading.Event()

    def by_job(req: ReceivedRequest):
        if req.job_id == "throttled" and not released.is_set():
            released.set()
            return (429, {"Retry-After": "1"}, b"")
        return None

    receiver.set_handler(by_job)
    n = make_notifier(max_retries=1, retry_base_ms=10)
    n.notify("throttled", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert receiver.wait_for(1, 5)
    n.notify("free", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert receiver.wait_for(2, 0.8), "the other job waited for the throttled one"
    assert [r.job_id for r in receiver.requests] == ["throttled", "free"]
    assert n.flush(5)
    assert [(r.job_id, r.status) for r in receiver.requests] == [
        ("throttled", 429),
        ("free", 200),
        ("throttled", 200),
    ]
