"""Observability: ``notifier.stats()`` after known runs, the Prometheus text
exposition (``blueprint_notify.metrics``) parsed line by line and served by
a real uvicorn, and delivery outcomes on the ``blueprint_notify.delivery``
logger, emitted from Python threads only (the native delivery thread never
takes the GIL)."""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
import time

import httpx
import pytest
from sse_support import eventually_sync, run_uvicorn

from blueprint_notify import JobEvent, JobStatus
from blueprint_notify.metrics import metrics_app, prometheus_text
from blueprint_notify.testing import ReceivedRequest, Response

UNREACHABLE = "http://127.0.0.1:1/nope"
STATS_KEYS = {
    "enqueued",
    "delivered",
    "retried",
    "dead_lettered",
    "in_flight",
    "pending",
    "channels",
    "subscribers",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
}


def scripted_by_job(receiver, plan: dict[str, list[int]]) -> None:
    """Answers each job's attempts from its own list (then 200)."""
    lock = threading.Lock()
    left = {job: list(statuses) for job, statuses in plan.items()}

    def handler(req: ReceivedRequest):
        with lock:
            statuses = left.get(req.job_id or "")
            return statuses.pop(0) if statuses else None

    receiver.set_handler(handler)


# -- stats -------------------------------------------------------------------------------------------
def test_stats_of_a_fresh_notifier(make_notifier) -> None:
    s = make_notifier().stats()
    assert STATS_KEYS <= set(s)
    assert all(s[k] == 0 for k in STATS_KEYS), s
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in s.values()), s


async def test_stats_after_a_known_run(make_notifier, receiver) -> None:
    # retry: 500 then 200; dead: 500 twice (max_retries=1); ok-1, ok-2: 200.
    scripted_by_job(receiver, {"retry": [500], "dead": [500, 500]})
    n = make_notifier(max_retries=1, retry_base_ms=10)
    n.register_job("watched-1")
    subs = [n.subscribe("watched-1"), n.subscribe("watched-1"), n.subscribe("watched-2")]
    s = n.stats()
    assert (s["channels"], s["subscribers"]) == (2, 3)
    for job in ("ok-1", "retry", "dead", "ok-2"):
        n.notify(job, JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert await n.drain(5)
    s = n.stats()
    assert s["enqueued"] == 4
    assert s["delivered"] == 3
    assert s["retried"] == 2  # one retry each for "retry" and "dead"
    assert s["dead_lettered"] == 1
    assert (s["attempts"], s["failed_attempts"]) == (6, 3)
    assert (s["in_flight"], s["pending"]) == (0, 0)
    assert (s["channels"], s["subscribers"]) == (2, 3)
    assert 0 < s["latency_p50_ms"] <= s["latency_p90_ms"] <= s["latency_p99_ms"] < 5000, s
    assert len(receiver.requests) == 6
    (dead,) = n.dead_letters()
    assert dead.job_id == "dead"
    for sub in subs:
        sub.close()
    assert n.stats()["subscribers"] == 0
    # Counters only grow: a second run adds to them.
    n.notify("ok-3", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert await n.drain(5)
    s2 = n.stats()
    assert (s2["enqueued"], s2["delivered"], s2["retried"], s2["dead_lettered"]) == (5, 4, 2, 1)


def test_latency_percentiles_reflect_slow_deliveries(make_notifier, receiver) -> None:
    receiver.set_handler(lambda req: Response(200, delay=0.5) if req.job_id == "slow" else None)  # server-side delay
    n = make_notifier()
    n.notify("slow", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    for i in range(19):
        n.notify(f"fast-{i}", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    s = n.stats()
    assert s["delivered"] == 20
    # Histogram buckets are ~19 % wide: the 500 ms delivery lands above 400 ms.
    assert s["latency_p50_ms"] < 200, s
    assert s["latency_p50_ms"] <= s["latency_p90_ms"] <= s["latency_p99_ms"]
    assert 400 <= s["latency_p99_ms"] <= 700, s


def test_in_flight_and_pending_during_a_slow_delivery(make_notifier, receiver) -> None:
    receiver.respond_with(200, delay=0.6, times=1)  # server-side delay
    n = make_notifier()
    n.notify("slow", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    n.notify("slow", JobEvent(JobStatus.COMPLETED), receiver.url_for())  # queued behind it (same lane)
    assert receiver.wait_for(1, 5)
    eventually_sync(lambda: n.stats()["in_flight"] == 1, 2, "in_flight == 1")
    s = n.stats()
    assert (s["in_flight"], s["pending"], s["delivered"]) == (1, 2, 0)
    assert n.flush(5)
    s = n.stats()
    assert (s["in_flight"], s["pending"], s["delivered"]) == (0, 0, 2)


def test_stats_count_evicted_dead_letters(make_notifier) -> None:
    n = make_notifier(max_dead_letters=2)
    for i in range(5):
        n.notify(f"j{i}", JobEvent(JobStatus.FAILED), UNREACHABLE)
        assert n.flush(5)  # one at a time: the order they fail in is known
    s = n.stats()
    assert (s["dead_lettered"], s["dead_letters_evicted"]) == (5, 3)
    assert [d.job_id for d in n.dead_letters()] == ["j3", "j4"]


# -- Prometheus ---------------------------------------------------------------------------------------
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*"(,[a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*")*)?\})? (\S+)$')


def parse_exposition(text: str) -> tuple[dict[str, str], dict[str, str], dict[tuple[str, str], float]]:
    """Parses the text format 0.0.4 strictly: HELP/TYPE comments and
    ``name{labels} value`` samples. Returns (help, type, samples)."""
    assert text.endswith("\n") and not text.endswith("\n\n")
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    samples: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            m = re.match(r"^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)$", line)
            assert m, f"bad comment line: {line!r}"
            kind, name, rest = m.groups()
            target = helps if kind == "HELP" else types
            assert name not in target, f"duplicate {kind} for {name}"
            target[name] = rest
            if kind == "TYPE":
                assert rest in ("counter", "gauge", "summary", "histogram", "untyped"), line
            continue
        m = SAMPLE.match(line)
        assert m, f"not a `name{{labels}} value` line: {line!r}"
        name, labels, value = m.group(1), m.group(3) or "", m.group(5)
        v = float(value)
        assert not math.isnan(v)
        assert (name, labels) not in samples, f"duplicate sample {line!r}"
        samples[(name, labels)] = v
    # Every sample belongs to a declared metric family.
    for name, _ in samples:
        family = re.sub(r"_(count|sum)$", "", name) if name not in types else name
        assert family in types and family in helps, f"{name} has no HELP/TYPE"
    return helps, types, samples


def test_prometheus_text_matches_stats(make_notifier, receiver) -> None:
    scripted_by_job(receiver, {"retry": [503], "dead": [500, 500]})
    n = make_notifier(max_retries=1, retry_base_ms=10, max_dead_letters=0)
    for job in ("a", "retry", "dead"):
        n.notify(job, JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    text = prometheus_text(n)
    s = n.stats()
    _, types, samples = parse_exposition(text)
    counters = ["enqueued", "delivered", "retried", "dead_lettered", "dead_letters_evicted", "attempts", "failed_attempts"]
    for name in counters:
        metric = f"blueprint_notify_{name}_total"
        assert types[metric] == "counter"
        assert samples[(metric, "")] == s[name], name
    for name in ("pending", "in_flight", "channels", "subscribers"):
        metric = f"blueprint_notify_{name}"
        assert types[metric] == "gauge"
        assert samples[(metric, "")] == s[name], name
    assert samples[("blueprint_notify_enqueued_total", "")] == 3
    assert samples[("blueprint_notify_delivered_total", "")] == 2
    assert samples[("blueprint_notify_retried_total", "")] == 2
    assert samples[("blueprint_notify_dead_lettered_total", "")] == 1
    assert samples[("blueprint_notify_dead_letters_evicted_total", "")] == 1
    latency = "blueprint_notify_delivery_latency_seconds"
    assert types[latency] == "summary"
    quantiles = {}
    for (name, labels), value in samples.items():
        if name == latency:
            m = re.fullmatch(r'quantile="([0-9.]+)"', labels)
            assert m, labels
            quantiles[float(m.group(1))] = value
    assert sorted(quantiles) == [0.5, 0.9, 0.99]
    assert quantiles[0.5] == pytest.approx(s["latency_p50_ms"] / 1000, abs=1e-6)
    assert quantiles[0.99] == pytest.approx(s["latency_p99_ms"] / 1000, abs=1e-6)
    assert 0 < quantiles[0.5] <= quantiles[0.9] <= quantiles[0.99]
    assert samples[(latency + "_count", "")] == s["delivered"]


def test_prometheus_text_with_a_prefix(make_notifier) -> None:
    text = prometheus_text(make_notifier(), prefix="jobs")
    _, types, samples = parse_exposition(text)
    assert all(name.startswith("jobs_") for name, _ in samples)
    assert all(name.startswith("jobs_") for name in types)
    assert samples[("jobs_enqueued_total", "")] == 0


def test_metrics_app_under_uvicorn(make_notifier, receiver) -> None:
    n = make_notifier()
    n.notify("m", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    with run_uvicorn(metrics_app(n)) as served, httpx.Client(trust_env=False, timeout=5) as client:
        r = client.get(served.url_for("/metrics"))
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert "version=0.0.4" in r.headers["content-type"]
        assert r.text == prometheus_text(n)
        _, _, samples = parse_exposition(r.text)
        assert samples[("blueprint_notify_delivered_total", "")] == 1
        head = client.head(served.url_for("/metrics"))
        assert head.status_code == 200 and head.content == b""
        post = client.post(served.url_for("/metrics"))
        assert post.status_code == 405
        assert post.headers["allow"] == "GET"
        # Live: the exposition follows the notifier.
        n.notify("m2", JobEvent(JobStatus.COMPLETED), receiver.url_for())
        assert n.flush(5)
        _, _, samples = parse_exposition(client.get(served.url_for("/metrics")).text)
        assert samples[("blueprint_notify_delivered_total", "")] == 2


# -- logging -------------------------------------------------------------------------------------------
def test_delivery_outcomes_are_logged_on_the_delivery_logger(make_notifier, receiver, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="blueprint_notify")
    receiver.respond_with(500)
    n = make_notifier(max_retries=1, retry_base_ms=10)
    n.notify("logged-job", JobEvent(JobStatus.COMPLETED), receiver.url_for("/l"))
    assert n.flush(5)
    records = [r for r in caplog.records if r.name == "blueprint_notify.delivery"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.ERROR], [r.getMessage() for r in records]
    retry, dead = (r.getMessage() for r in records)
    assert retry.startswith("webhook attempt 1 failed, retrying in ")
    assert "job_id=logged-job" in retry and receiver.url_for("/l") in retry and "error=HTTP 500" in retry
    assert dead.startswith("webhook dead-lettered after 2 attempt(s)")
    assert "job_id=logged-job" in dead and "error=HTTP 500" in dead
    # Emitted by this (Python) thread when it entered the engine, never by the native thread.
    me = threading.current_thread()
    assert {(r.thread, r.threadName) for r in records} == {(me.ident, me.name)}


async def test_drain_brings_the_logs_to_the_event_loop_thread(make_notifier, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="blueprint_notify.delivery")
    n = make_notifier(max_retries=0)
    n.notify("async-logged", JobEvent(JobStatus.COMPLETED), UNREACHABLE)
    assert await n.drain(5)
    records = [r for r in caplog.records if r.name == "blueprint_notify.delivery"]
    assert len(records) == 1 and records[0].levelno == logging.ERROR
    assert "async-logged" in records[0].getMessage()
    assert records[0].thread == threading.get_ident()


def test_delivery_thread_never_takes_the_gil(make_notifier, caplog) -> None:
    """While this thread holds the GIL without a break (switch interval of
    10 s, pure-Python spin), the native thread makes three attempts, dead-
    letters the delivery and queues its log records: it needs no GIL. The
    records reach logging once Python enters the engine (flush)."""
    caplog.set_level(logging.WARNING, logger="blueprint_notify.delivery")
    n = make_notifier(max_retries=2, retry_base_ms=0)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        n.notify("gil-job", JobEvent(JobStatus.COMPLETED), UNREACHABLE)
        # notify() itself passes on what the thread logged so far (refused
        # connections fail in microseconds): count from here.
        logged = len([r for r in caplog.records if r.name == "blueprint_notify.delivery"])
        deadline = time.monotonic() + 3.0
        while n.pending() and time.monotonic() < deadline:
            pass  # spin holding the GIL (pending() does not release it)
        pending = n.pending()
    finally:
        sys.setswitchinterval(previous)
    assert pending == 0, "the delivery thread stalled while Python held the GIL"
    during_spin = [r for r in caplog.records if r.name == "blueprint_notify.delivery"][logged:]
    assert not during_spin, "logged while Python held the GIL without entering the engine"
    assert n.flush(1)
    records = [r for r in caplog.records if r.name == "blueprint_notify.delivery"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING, logging.ERROR]
    assert "3 attempt(s)" in records[-1].getMessage()
