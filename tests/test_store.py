"""The durable outbox (NotifierConfig.store_path): a SQLite file (WAL) that
holds every webhook delivery, so that a restart loses nothing.

Everything runs against real loopback receivers (WebhookReceiver) or a
closed loopback port (connection refused at once). What is on disk is
checked with read-only sqlite3 connections, mostly once the notifier is
closed. Nothing sleeps to wait for work: tests wait on flush(), on
WebhookReceiver.wait_for() or on a child process's output. Only the
retention test lets wall-clock time pass, because time is what it tests.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import select
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from blueprint_notify import (
    JobEvent,
    JobNotifier,
    JobStatus,
    NotifierConfig,
    StoreError,
    StoreLockedError,
    verify,
)
from blueprint_notify.testing import ReceivedRequest, Response, WebhookReceiver

SECRET = "test-secret"  # what the receiver fixtures verify with
P, DONE = JobStatus.PROCESSING, JobStatus.COMPLETED
APPLICATION_ID = 0x42504E31  # "BPN1"
PENDING, DELIVERED, DEAD = 0, 1, 2
MAIN = Path(__file__).resolve().parent.parent  # the project root, for child processes


# -- helpers -------------------------------------------------------------------------------------------
def store_notifier(path: Any, **overrides: Any) -> JobNotifier:
    """A notifier on the store at ``path`` with test-friendly defaults
    (no retries, 10 ms backoff, 2 s timeout, loopback allowed). The caller
    closes it."""
    options: dict[str, Any] = {
        "signing_secret": SECRET,
        "allow_private_networks": True,
        "max_retries": 0,
        "retry_base_ms": 10,
        "timeout_secs": 2,
        "store_path": path,
        "close_timeout_secs": 5,
    }
    options.update(overrides)
    return JobNotifier(**options)


def refused_url(path: str = "/down") -> str:
    """A URL on a loopback port nothing listens on: connection refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def _connect_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(Path(path).as_uri() + "?mode=ro", uri=True, timeout=5)


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Runs a read-only query on the store file; rows as dicts."""
    con = _connect_ro(path)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute(sql, params)]
    finally:
        con.close()


def read_rows(path: Path) -> list[dict[str, Any]]:
    return query(path, "SELECT * FROM deliveries ORDER BY id")


def read_meta(path: Path) -> dict[str, Any]:
    return {r["key"]: r["value"] for r in query(path, "SELECT key, value FROM meta")}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def lock_is_free(path: Path) -> bool:
    """Whether ``<path>-lock`` can be locked (nobody holds the store)."""
    with open(f"{path}-lock", "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def wait_for_jobs(rx: WebhookReceiver, jobs: set[str], timeout: float = 5.0) -> None:
    """Blocks until every job in ``jobs`` had at least one request."""
    deadline = time.monotonic() + timeout
    for n in range(1, 1000):
        if jobs <= {r.job_id for r in rx.requests}:
            return
        assert rx.wait_for(n, max(0.0, deadline - time.monotonic())), (
            f"only {sorted({r.job_id for r in rx.requests})} of {sorted(jobs)} arrived"
        )
    raise AssertionError("too many requests")


# -- 1. restart resumes pending deliveries ----------------------------------------------------------------
def test_restart_resumes_pending_deliveries_in_order_with_the_same_webhook_ids(
    tmp_path: Path, make_receiver: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "outbox.db"
    rx = make_receiver()
    rx.respond_with(503)  # the endpoint is down while notifier A runs
    url = rx.url_for("/hook")
    jobs = ["job-a", "job-b", "job-c"]
    # Old event timestamps: the signing timestamp must be the send time, not these.
    events = {
        job: [JobEvent(P, progress=p, timestamp=1_000_000 + p) for p in (0, 30, 60)]
        + [JobEvent(DONE, result={"job": job}, timestamp=1_000_100)]
        for job in jobs
    }
    # A retries every ~0.4 s: the first attempts (one per lane) fail at once,
    # close(0) follows well before any retry can be in flight.
    a = store_notifier(store, max_retries=1000, retry_base_ms=400, max_retry_delay_ms=400)
    try:
        for k in range(4):
            for job in jobs:
                a.notify(job, events[job][k], url)
        wait_for_jobs(rx, set(jobs))
    finally:
        with caplog.at_level(logging.WARNING, logger="blueprint_notify.delivery"):
            a.close(0)
    a_stats = a.stats()
    assert a_stats["left_in_store"] == 12, a_stats
    assert a_stats["store_errors"] == 0 and a_stats["store_commits"] >= 1, a_stats
    assert a.dead_letters() == [], "with a store, close() must not dead-letter what is pending"
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "blueprint_notify.delivery" and r.levelno == logging.WARNING and "left pending" in r.getMessage()
    ]
    assert len(warnings) == 1 and "12 webhook deliveries" in warnings[0] and str(store) in warnings[0], warnings
    assert lock_is_free(store), "close() must release the store's lock"

    a_reqs = rx.requests
    assert a_reqs and all(r.status == 503 for r in a_reqs)
    # One delivery in flight per job: A only ever tried each lane's head.
    a_ids = {job: {r.headers["webhook-id"] for r in a_reqs if r.job_id == job} for job in jobs}
    assert all(len(ids) == 1 for ids in a_ids.values()), a_ids

    # On disk: 12 pending rows, per job in notify order; heads carry A's failure.
    rows = read_rows(store)
    assert len(rows) == 12
    assert all(r["state"] == PENDING for r in rows)
    assert len({r["msg_id"] for r in rows}) == 12, "webhook-ids must be unique"
    for job in jobs:
        lane = [r for r in rows if r["job_id"] == job]
        assert [json.loads(r["payload"])["event"] for r in lane] == [e.to_dict() for e in events[job]]
        assert all(r["url"] == url for r in lane)
        head, *rest = lane
        assert {head["msg_id"]} == a_ids[job]
        assert head["attempts"] >= 1 and head["last_error"] == "HTTP 503" and head["log"] is not None
        assert head["due_ms"] > 0
        assert all(r["attempts"] == 0 and r["last_error"] is None for r in rest)
        a_bodies = {r.body for r in a_reqs if r.job_id == job}
        assert a_bodies == {head["payload"].encode()}
    by_payload = {r["payload"].encode(): r for r in rows}
    meta = read_meta(store)
    assert meta["last_id"] == max(r["id"] for r in rows) and len(meta["prefix"]) == 16
    assert query(store, "PRAGMA application_id")[0]["application_id"] == APPLICATION_ID

    # Notifier B on the same file, the endpoint back up.
    rx.respond_with(200)
    opened_at = int(time.time())
    b = store_notifier(store, max_retries=3)
    try:
        assert b.stats()["recovered"] == 12
        # A new event for job-a queues behind job-a's recovered ones.
        late = JobEvent(P, progress=99, timestamp=1_000_200)
        b.notify("job-a", late, url)
        assert b.flush(10)
        b_stats = b.stats()
    finally:
        b.close()
    assert b_stats["delivered"] == 13 and b_stats["dead_lettered"] == 0, b_stats
    assert b_stats["store_errors"] == 0 and b.stats()["left_in_store"] == 0
    assert b.dead_letters() == []

    b_reqs = rx.requests[len(a_reqs):]
    assert len(b_reqs) == 13 and all(r.status == 200 for r in b_reqs), [r.status for r in b_reqs]
    for job in jobs:
        got = [r.json()["event"] for r in b_reqs if r.job_id == job]
        want = [e.to_dict() for e in events[job]] + ([late.to_dict()] if job == "job-a" else [])
        assert got == want, f"{job}: order broken after restart"
    for r in b_reqs:
        if r.json()["event"] == late.to_dict():
            assert r.headers["webhook-id"] not in {row["msg_id"] for row in rows}, "a new delivery reused a webhook-id"
            continue
        row = by_payload[r.body]  # the exact stored body
        assert r.headers["webhook-id"] == row["msg_id"], "the resumed delivery must keep its webhook-id"
        # Re-signed now: valid signatures of both schemes with a fresh timestamp.
        assert r.verified, r.headers
        assert verify(r.body, r.headers, SECRET)["job_id"] == row["job_id"]
        assert int(r.headers["webhook-timestamp"]) >= opened_at
        assert r.headers["webhook-timestamp"] == r.headers["X-Webhook-Timestamp"]
    for job in jobs:
        first_b = next(r for r in b_reqs if r.job_id == job)
        assert {first_b.headers["webhook-id"]} == a_ids[job]

    # Delivered rows are kept (default retention), in state 1, same ids.
    after = read_rows(store)
    assert len(after) == 13 and all(r["state"] == DELIVERED for r in after)
    assert [r["msg_id"] for r in after[:12]] == [r["msg_id"] for r in rows]
    assert all(r["done_at"] is not None and r["log"] is None for r in after)


# -- 2. the retry schedule survives a restart -------------------------------------------------------------
def test_restart_honours_the_stored_retry_due_time(tmp_path: Path, make_receiver: Any) -> None:
    store = tmp_path / "outbox.db"
    rx = make_receiver()
    arrivals: list[float] = []  # wall clock at each request's arrival

    def clock(req: ReceivedRequest) -> None:
        arrivals.append(time.time())
        return None  # answered from the script

    rx.set_handler(clock)
    rx.respond_with(503)
    url = rx.url_for("/slow")
    a = store_notifier(store, max_retries=3, retry_base_ms=1500, max_retry_delay_ms=1500)
    try:
        a.notify("slow", JobEvent(P, progress=1), url)
        a.notify("slow", JobEvent(DONE), url)
        assert rx.wait_for(1, 5)
    finally:
        a.close(0)
    failed_at = arrivals[0]
    head, second = read_rows(store)
    assert head["state"] == second["state"] == PENDING
    assert head["attempts"] == 1 and head["last_error"] == "HTTP 503"
    assert second["attempts"] == 0 and second["due_ms"] == 0
    due = head["due_ms"] / 1000.0
    # Backoff before retry 1: 1500 ms jittered +-20%.
    assert failed_at + 1.15 <= due <= failed_at + 1.85, (due - failed_at)

    rx.respond_with(200)
    b = store_notifier(store, max_retries=3, retry_base_ms=1500)
    try:
        assert b.stats()["recovered"] == 2
        assert due - time.time() > 0.5, "the restart took too long for this test to mean anything"
        assert rx.wait_for(3, 5), "the recovered deliveries never came"
        assert b.flush(5)
    finally:
        b.close()
    reqs = rx.requests
    assert [r.status for r in reqs] == [503, 200, 200]
    assert arrivals[1] >= due - 0.005, f"resent {due - arrivals[1]:.3f} s before its due time"
    assert arrivals[1] < due + 1.0, f"resent {arrivals[1] - due:.3f} s after its due time"
    assert reqs[1].body == reqs[0].body == head["payload"].encode()
    assert reqs[1].headers["webhook-id"] == reqs[0].headers["webhook-id"] == head["msg_id"]
    assert reqs[2].body == second["payload"].encode()
    assert reqs[2].headers["webhook-id"] == second["msg_id"]


# -- 3. dead letters ----------------------------------------------------------------------------------------
def test_dead_letters_survive_a_restart(tmp_path: Path, make_receiver: Any) -> None:
    store = tmp_path / "outbox.db"
    rx = make_receiver()
    rx.respond_with(500)
    a = store_notifier(store, max_retries=1, retry_base_ms=5)
    try:
        for i in range(3):
            a.notify(f"dl-{i}", JobEvent(DONE, result={"i": i}), rx.url_for(f"/dl/{i}"))
        assert a.flush(5)
        before = a.dead_letters()
    finally:
        a.close()
    assert len(before) == 3
    for d in before:
        assert d.attempts == 2 and d.last_error == "HTTP 500"
        assert [(x.status, x.error) for x in d.attempt_log] == [(500, "HTTP 500")] * 2
    assert [d.failed_at for d in before] == sorted(d.failed_at for d in before)

    rows = read_rows(store)
    assert [r["state"] for r in rows] == [DEAD] * 3
    by_id = {r["id"]: r for r in rows}
    for d in before:
        row = by_id[d.id]
        assert (row["msg_id"], row["job_id"], row["url"], row["payload"]) == (d.webhook_id, d.job_id, d.url, d.payload)
        assert (row["attempts"], row["last_error"], row["done_at"]) == (d.attempts, d.last_error, d.failed_at)
        assert row["log"] is not None

    b = store_notifier(store, max_retries=1, retry_base_ms=5)
    try:
        after = b.dead_letters()
        s = b.stats()
    finally:
        b.close()
    # Every field read back: id, webhook_id, attempts, last_error, failed_at, attempt_log...
    assert after == before
    assert s["recovered"] == 0 and s["pending"] == 0 and s["dead_letters_evicted"] == 0, s
    assert len(rx.requests) == 6, "dead letters must not be re-sent by a restart"


def test_redeliver_after_restart_keeps_the_webhook_ids(tmp_path: Path, make_receiver: Any) -> None:
    store = tmp_path / "outbox.db"
    rx = make_receiver()
    rx.respond_with(500, times=3)
    a = store_notifier(store)
    try:
        for i in range(3):
            a.notify(f"re-{i}", JobEvent(DONE, result={"i": i}), rx.url_for())
        assert a.flush(5)
        dead = a.dead_letters()
    finally:
        a.close()
    assert sorted(d.job_id for d in dead) == ["re-0", "re-1", "re-2"]
    old_ids = {d.id for d in dead}

    b = store_notifier(store)
    try:
        assert b.dead_letters() == dead
        assert b.redeliver([dead[1].id, 10**9]) == 1
        assert b.flush(5)
        assert b.dead_letters() == [dead[0], dead[2]]
        ok = [r for r in rx.requests if r.status == 200]
        assert len(ok) == 1
        assert ok[0].headers["webhook-id"] == dead[1].webhook_id
        assert ok[0].body == dead[1].payload.encode() and ok[0].verified
        assert b.redeliver_all() == 2
        assert b.flush(5)
        assert b.dead_letters() == []
        s = b.stats()
    finally:
        b.close()
    assert s["delivered"] == 3 and s["dead_lettered"] == 0, s
    ok = [r for r in rx.requests if r.status == 200]
    assert sorted(r.job_id for r in ok) == ["re-0", "re-1", "re-2"]
    by_job = {d.job_id: d for d in dead}
    for r in ok:
        assert r.headers["webhook-id"] == by_job[r.job_id].webhook_id
        assert r.body == by_job[r.job_id].payload.encode()
        assert r.verified

    rows = read_rows(store)
    assert [r["state"] for r in rows] == [DELIVERED] * 3, rows
    assert {r["msg_id"] for r in rows} == {d.webhook_id for d in dead}
    assert not old_ids & {r["id"] for r in rows}, "redelivered rows take new ids"
    assert min(r["id"] for r in rows) > max(old_ids)
    c = store_notifier(store)
    try:
        assert c.dead_letters() == [] and c.stats()["recovered"] == 0
    finally:
        c.close()


def test_redelivered_dead_letter_left_pending_at_close_resumes(tmp_path: Path, make_receiver: Any) -> None:
    store = tmp_path / "outbox.db"
    rx = make_receiver()
    rx.respond_with(500, times=1)
    a = store_notifier(store)
    try:
        a.notify("requeued", JobEvent(DONE), rx.url_for())
        assert a.flush(5)
        (dead,) = a.dead_letters()
        rx.respond(Response(200, delay=5), times=1)  # the redelivery hangs in flight
        assert a.redeliver_all() == 1
        assert rx.wait_for(2, 5)
    finally:
        a.close(0)
    assert a.stats()["left_in_store"] == 1
    assert a.dead_letters() == []
    (row,) = read_rows(store)
    assert row["state"] == PENDING and row["id"] > dead.id
    assert row["msg_id"] == dead.webhook_id
    assert (row["attempts"], row["due_ms"], row["last_error"], row["log"]) == (0, 0, None, None)

    b = store_notifier(store)
    try:
        assert b.stats()["recovered"] == 1
        assert b.flush(5)
        assert b.dead_letters() == []
    finally:
        b.close()
    reqs = rx.requests
    assert len(reqs) == 3
    assert {r.headers["webhook-id"] for r in reqs} == {dead.webhook_id}
    assert reqs[2].body == dead.payload.encode() and reqs[2].verified
    (row,) = read_rows(store)
    assert row["state"] == DELIVERED


def test_clear_dead_letters_deletes_them_from_the_store(tmp_path: Path) -> None:
    store = tmp_path / "outbox.db"
    url = refused_url()
    a = store_notifier(store)
    try:
        a.notify("c-1", JobEvent(DONE), url)
        a.notify("c-2", JobEvent(DONE), url)
        assert a.flush(5)
        assert len(a.dead_letters()) == 2
        a.clear_dead_letters()
        assert a.dead_letters() == []
        a.notify("c-3", JobEvent(DONE), url)
        assert a.flush(5)
        (kept,) = a.dead_letters()
    finally:
        a.close()
    (row,) = read_rows(store)
    assert (row["state"], row["id"], row["job_id"]) == (DEAD, kept.id, "c-3")

    b = store_notifier(store)
    try:
        assert b.dead_letters() == [kept]
        b.clear_dead_letters()
        assert b.dead_letters() == []
    finally:
        b.close()
    assert read_rows(store) == []
    with pytest.raises(RuntimeError, match="closed"):
        b.clear_dead_letters()  # the store is closed: its rows cannot be deleted now
    c = store_notifier(store)
    try:
        assert c.dead_letters() == []
    finally:
        c.close()


def test_a_lower_max_dead_letters_on_reopen_evicts_the_oldest(tmp_path: Path) -> None:
    store = tmp_path / "outbox.db"
    url = refused_url()
    a = store_notifier(store)
    try:
        for i in range(5):  # one lane: dead-lettered in this order
            a.notify("one-lane", JobEvent(P, progress=i), url)
        assert a.flush(5)
        dead = a.dead_letters()
    finally:
        a.close()
    assert [d.event().progress for d in dead] == [0, 1, 2, 3, 4]

    b = store_notifier(store, max_dead_letters=2)
    try:
        assert b.dead_letters() == dead[3:]
        s = b.stats()
    finally:
        b.close()
    assert s["dead_letters_evicted"] == 3 and s["recovered"] == 0, s
    assert [(r["id"], r["state"]) for r in read_rows(store)] == [(d.id, DEAD) for d in dead[3:]]

    c = store_notifier(store)  # the default cap again: the evicted ones are gone for good
    try:
        assert c.dead_letters() == dead[3:]
        assert c.stats()["dead_letters_evicted"] == 0
    finally:
        c.close()


def test_dead_letters_evicted_at_runtime_are_deleted_from_the_store(tmp_path: Path) -> None:
    store = tmp_path / "outbox.db"
    url = refused_url()
    a = store_notifier(store, max_dead_letters=2)
    try:
        for i in range(4):
            a.notify("evict", JobEvent(P, progress=i), url)
        assert a.flush(5)
        dead = a.dead_letters()
        assert a.stats()["dead_letters_evicted"] == 2
    finally:
        a.close()
    assert [d.event().progress for d in dead] == [2, 3]
    assert [(r["id"], r["state"]) for r in read_rows(store)] == [(d.id, DEAD) for d in dead]


# -- 4. delivered rows and their retention ---------------------------------------------------------------
def test_delivered_rows_are_kept_by_default(tmp_path: Path, receiver: WebhookReceiver) -> None:
    store = tmp_path / "outbox.db"
    started = time.time()
    a = store_notifier(store)
    try:
        for i in range(5):
            a.notify(f"kept-{i % 2}", JobEvent(P, progress=i), receiver.url_for())
        assert a.flush(5)
    finally:
        a.close()
    ended = time.time()
    rows = read_rows(store)
    assert len(rows) == 5 and all(r["state"] == DELIVERED for r in rows), rows
    reqs = receiver.requests
    assert {r.headers["webhook-id"] for r in reqs} == {r["msg_id"] for r in rows}
    assert {r.body for r in reqs} == {r["payload"].encode() for r in rows}
    for r in rows:
        assert started <= r["created_at"] <= r["done_at"] <= ended
        assert r["log"] is None and r["last_error"] is None


def test_zero_retention_deletes_rows_at_delivery_and_ids_stay_unique(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    store = tmp_path / "outbox.db"
    a = store_notifier(store, delivered_retention_secs=0)
    try:
        for i in range(3):
            a.notify("gone", JobEvent(P, progress=i), receiver.url_for())
        assert a.flush(5)
    finally:
        a.close()
    assert read_rows(store) == []
    assert read_meta(store)["last_id"] >= 3
    # A later run must not reuse the webhook-ids of deleted rows.
    b = store_notifier(store, delivered_retention_secs=0)
    try:
        for i in range(3):
            b.notify("gone", JobEvent(P, progress=10 + i), receiver.url_for())
        assert b.flush(5)
    finally:
        b.close()
    assert read_rows(store) == []
    reqs = receiver.requests
    assert len(reqs) == 6 and all(r.status == 200 for r in reqs)
    assert len({r.headers["webhook-id"] for r in reqs}) == 6, "webhook-ids reused across a restart"


def test_opening_prunes_delivered_rows_past_the_retention(tmp_path: Path, receiver: WebhookReceiver) -> None:
    store = tmp_path / "outbox.db"
    a = store_notifier(store)
    try:
        for i in range(3):
            a.notify("old", JobEvent(P, progress=i), receiver.url_for())
        assert a.flush(5)
    finally:
        a.close()
    assert len(read_rows(store)) == 3
    b = store_notifier(store, delivered_retention_secs=3600)  # still young: kept
    b.close()
    assert [r["state"] for r in read_rows(store)] == [DELIVERED] * 3
    c = store_notifier(store, delivered_retention_secs=0)  # past a zero retention: pruned at open
    try:
        assert read_rows(store) == []
    finally:
        c.close()
    assert read_rows(store) == []


def test_delivered_rows_are_pruned_while_running(tmp_path: Path, receiver: WebhookReceiver) -> None:
    # Time is what is tested here: rows must outlive the retention, then
    # the periodic prune (about once a second) removes them.
    store = tmp_path / "outbox.db"
    retention = 0.3
    n = store_notifier(store, delivered_retention_secs=retention, durability="sync")
    try:
        t0 = time.time()
        n.notify("prune", JobEvent(DONE), receiver.url_for())  # sync: its row is committed
        assert n.flush(5)
        gone_at = None
        deadline = time.monotonic() + 3.0
        seen_delivered = False
        while time.monotonic() < deadline:
            rows = read_rows(store)
            now = time.time()
            if not rows:
                gone_at = now
                break
            seen_delivered |= rows[0]["state"] == DELIVERED
            time.sleep(0.02)  # poll tick of a bounded wait (no event marks the prune)
        assert gone_at is not None, "the delivered row was never pruned"
        assert gone_at - t0 >= retention, f"pruned {gone_at - t0:.3f} s after notify (< {retention})"
        assert seen_delivered, "the delivered row should have been visible before the prune"
    finally:
        n.close()


# -- 5. durability -----------------------------------------------------------------------------------------
def test_sync_durability_commits_before_notify_returns(tmp_path: Path) -> None:
    store = tmp_path / "outbox.db"
    url = refused_url()
    # Failures retry in a minute: the rows stay pending meanwhile.
    n = store_notifier(store, durability="sync", max_retries=5, retry_base_ms=60_000)
    reader = None
    try:
        reader = _connect_ro(store)  # WAL: a concurrent reader sees every commit
        for i in range(20):
            job = f"sync-{i % 2}"
            event = JobEvent(P, progress=i)
            n.notify(job, event, url)
            rows = reader.execute("SELECT job_id, payload, state FROM deliveries ORDER BY id").fetchall()
            assert len(rows) == i + 1, f"notify #{i} returned before its row was committed"
            assert rows[-1][0] == job
            assert json.loads(rows[-1][1]) == {"job_id": job, "event": event.to_dict()}
            assert rows[-1][2] == PENDING
        assert n.stats()["store_commits"] >= 20
    finally:
        if reader is not None:
            reader.close()
        n.close(0)
    assert n.stats()["left_in_store"] == 20
    assert len(read_rows(store)) == 20


def test_batched_durability_commits_shortly_after_notify(tmp_path: Path) -> None:
    store = tmp_path / "outbox.db"
    url = refused_url()
    n = store_notifier(store, max_retries=5, retry_base_ms=60_000)
    reader = None
    try:
        reader = _connect_ro(store)
        start = time.monotonic()
        n.notify("batched", JobEvent(P, progress=1), url)
        # Bounded poll (no sleep): the group commit is due 10 ms after the write.
        count = 0
        while time.monotonic() - start < 2.0:
            count = reader.execute("SELECT count(*) FROM deliveries").fetchone()[0]
            if count:
                break
        elapsed = time.monotonic() - start
        assert count == 1, "the delivery was not committed within 2 s"
        assert elapsed < 0.5, f"batched commit took {elapsed:.3f} s"
    finally:
        if reader is not None:
            reader.close()
        n.close(0)


# -- 6. one notifier per store ------------------------------------------------------------------------------
def test_a_second_notifier_on_the_same_store_is_refused(
    tmp_path: Path, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "outbox.db"
    a = store_notifier(store)
    try:
        with pytest.raises(StoreLockedError) as info:
            store_notifier(store)
        assert isinstance(info.value, StoreError) and isinstance(info.value, OSError)
        msg = str(info.value)
        assert str(store) in msg and f"{store}-lock" in msg, msg
        assert f"process {os.getpid()} " in msg, msg
        assert not lock_is_free(store)
        # The same file spelled differently is the same store.
        monkeypatch.chdir(tmp_path)
        with pytest.raises(StoreLockedError):
            store_notifier("outbox.db")
        with pytest.raises(StoreLockedError):
            store_notifier(f"{tmp_path}/nowhere/../outbox.db")
        # The refused attempts left the first notifier alone.
        a.notify("still-works", JobEvent(DONE), receiver.url_for())
        assert a.flush(5)
        assert a.stats()["delivered"] == 1
    finally:
        a.close()
    assert lock_is_free(store)
    b = store_notifier(store)  # released at close: a new one opens fine
    try:
        assert b.stats()["recovered"] == 0
        assert [r["state"] for r in read_rows(store)] == [DELIVERED]
    finally:
        b.close()


def test_a_symlink_to_a_store_in_use_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "outbox.db"
    link = tmp_path / "link.db"
    a = store_notifier(store)
    try:
        link.symlink_to(store)
        with pytest.raises(StoreLockedError):
            b = store_notifier(link)
            b.close(0)  # only reached if the lock did not hold
    finally:
        a.close()


_HOLD_CHILD = r"""
import sys
from blueprint_notify import JobNotifier
n = JobNotifier(signing_secret="x", store_path=sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
n.close(0)
print("closed", flush=True)
"""

# Child processes open the store given as argv[1] and print what happened.
_IMPORTS = r"""
import json, os, sys
from blueprint_notify import JobNotifier, StoreError, StoreLockedError
"""
_OPEN_STORE = r"""
try:
    n = JobNotifier(signing_secret="x", store_path=sys.argv[1])
except StoreError as exc:
    print(json.dumps({"type": type(exc).__name__, "locked": isinstance(exc, StoreLockedError), "msg": str(exc)}))
else:
    n.close(0)
    print(json.dumps({"type": None}))
"""
_TRY_CHILD = _IMPORTS + _OPEN_STORE


def test_a_store_held_by_another_process_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "outbox.db"
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD_CHILD, str(store)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=MAIN,
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 20)
        assert ready, "the child never said it was ready"
        line = child.stdout.readline()
        assert line.strip() == "ready", (line, child.stderr.read() if child.poll() is not None else "")
        with pytest.raises(StoreLockedError) as info:
            store_notifier(store)
        msg = str(info.value)
        assert f"process {child.pid} " in msg and f"{store}-lock" in msg, msg
        out, err = child.communicate("", timeout=10)
        assert child.returncode == 0, err
        assert out.strip() == "closed", (out, err)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    # And the other way round: this process holds it, a child is refused.
    a = store_notifier(store)
    try:
        res = subprocess.run(
            [sys.executable, "-c", _TRY_CHILD, str(store)], capture_output=True, text=True, timeout=20, cwd=MAIN
        )
        assert res.returncode == 0, res.stderr
        outcome = json.loads(res.stdout)
        assert outcome["type"] == "StoreLockedError" and outcome["locked"], outcome
        assert f"process {os.getpid()} " in outcome["msg"], outcome
    finally:
        a.close()
    res = subprocess.run(
        [sys.executable, "-c", _TRY_CHILD, str(store)], capture_output=True, text=True, timeout=20, cwd=MAIN
    )
    assert json.loads(res.stdout) == {"type": None}, res.stderr


# -- 7. bad paths and bad configuration ----------------------------------------------------------------------
def _garbage(path: Path) -> None:
    path.write_bytes(b"these are not the bytes of a database\n" * 200)


def _other_app(path: Path) -> None:
    con = sqlite3.connect(path)
    try:
        con.execute("CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT)")
        con.execute("INSERT INTO users(name) VALUES ('ada')")
        con.commit()
    finally:
        con.close()


def _other_app_id(path: Path) -> None:
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA application_id = 12345")
        con.commit()
    finally:
        con.close()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_garbage, "not a SQLite database"),
        (_other_app, "another application"),
        (_other_app_id, "another application"),
    ],
    ids=["garbage", "other-app-tables", "other-app-id"],
)
def test_a_file_that_is_not_a_store_is_refused_and_left_alone(tmp_path: Path, make: Any, expected: str) -> None:
    path = tmp_path / "foreign.db"
    make(path)
    digest = sha256(path)
    with pytest.raises(StoreError) as info:
        store_notifier(path)
    assert not isinstance(info.value, StoreLockedError)
    msg = str(info.value)
    assert "store_path" in msg and str(path) in msg and expected in msg, msg
    assert sha256(path) == digest, "a refused file must not be modified"
    assert not Path(f"{path}-wal").exists()
    assert lock_is_free(path), "a refused open must release the lock"
    # The path is usable once the foreign file is moved away.
    path.unlink()
    n = store_notifier(path)
    n.close()


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory") as info:
        store_notifier(tmp_path)
    msg = str(info.value)
    assert "store_path" in msg and str(tmp_path) in msg, msg
    assert not isinstance(info.value, StoreLockedError)


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "outbox.db"
    with pytest.raises(StoreError, match="does not exist") as info:
        store_notifier(path)
    msg = str(info.value)
    assert "store_path" in msg and str(path) in msg, msg
    assert not (tmp_path / "missing").exists(), "the directory must not be created"


def test_an_empty_file_and_a_relative_path_become_a_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    n = store_notifier(empty)
    n.close()
    assert query(empty, "PRAGMA application_id")[0]["application_id"] == APPLICATION_ID
    assert query(empty, "PRAGMA journal_mode")[0]["journal_mode"] == "wal"
    assert {r["name"] for r in query(empty, "SELECT name FROM sqlite_master WHERE type = 'table'")} == {
        "deliveries",
        "meta",
    }
    # A relative path is taken relative to the working directory at construction.
    monkeypatch.chdir(tmp_path)
    n = store_notifier("relative.db")
    try:
        monkeypatch.chdir(MAIN)
        assert (tmp_path / "relative.db").exists() and not (MAIN / "relative.db").exists()
    finally:
        n.close()
    assert not (MAIN / "relative.db").exists()
    assert query(tmp_path / "relative.db", "SELECT count(*) AS n FROM deliveries") == [{"n": 0}]


# Imported while still root: the interpreter lives under /root.
_NOBODY_CHILD = (
    _IMPORTS
    + r"""
try:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
except OSError as exc:
    print(json.dumps({"skip": f"cannot drop privileges: {exc}"}))
    sys.exit(0)
if os.access(os.path.dirname(sys.argv[1]), os.W_OK):
    print(json.dumps({"skip": "the store's directory is writable even as nobody"}))
    sys.exit(0)
"""
    + _OPEN_STORE
)


@pytest.mark.parametrize("lock_writable", [True, False], ids=["file-read-only", "dir-read-only"])
def test_a_store_that_is_not_writable_is_refused(tmp_path: Path, lock_writable: bool) -> None:
    if os.geteuid() != 0:
        store = tmp_path / "ro.db"
        store_notifier(store).close()
        store.chmod(0o444)
        if not lock_writable:
            Path(f"{store}-lock").chmod(0o444)
        try:
            with pytest.raises(StoreError) as info:
                store_notifier(store)
        finally:
            store.chmod(0o644)
            Path(f"{store}-lock").chmod(0o644)
        msg = str(info.value)
        assert "store_path" in msg and str(store) in msg, msg
        if lock_writable:
            assert "writable" in msg, msg
        return
    # Root writes anything: the attempt runs in a child that drops to nobody
    # after importing (the interpreter lives under /root, which nobody cannot
    # read). pytest's tmp_path is under a 0700 directory, so this test uses
    # its own world-readable temporary directory.
    base = Path(tempfile.mkdtemp(prefix="bpn-store-ro-"))
    try:
        base.chmod(0o755)
        store = base / "ro.db"
        store_notifier(store).close()
        # file-read-only: the file itself; dir-read-only: the file is
        # writable but its directory (where SQLite puts -wal and -shm) and
        # the lock file are not.
        store.chmod(0o444 if lock_writable else 0o666)
        Path(f"{store}-lock").chmod(0o666 if lock_writable else 0o444)
        digest = sha256(store)
        res = subprocess.run(
            [sys.executable, "-c", _NOBODY_CHILD, str(store)],
            capture_output=True,
            text=True,
            timeout=20,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(MAIN)},
        )
        assert res.returncode == 0, res.stderr
        outcome = json.loads(res.stdout)
        if "skip" in outcome:
            pytest.skip(outcome["skip"])
        assert outcome["type"] == "StoreError" and not outcome["locked"], outcome
        msg = outcome["msg"]
        assert "store_path" in msg and str(store) in msg, msg
        if lock_writable:
            assert "is not readable and writable by this process" in msg, msg
        else:
            assert f"the directory {base} is not writable" in msg, msg
        assert sha256(store) == digest
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize(
    ("overrides", "exc", "match"),
    [
        ({"store_path": ""}, ValueError, "store_path"),
        ({"store_path": ":memory:"}, ValueError, "store_path"),
        ({"store_path": "out\x00box.db"}, ValueError, "store_path"),
        ({"store_path": 123}, TypeError, "store_path"),
        ({"store_path": b"outbox.db"}, TypeError, "store_path"),
        ({"durability": "x"}, ValueError, "durability"),
        ({"durability": "SYNC"}, ValueError, "durability"),
        ({"durability": None}, ValueError, "durability"),
        ({"delivered_retention_secs": -1}, ValueError, "delivered_retention_secs"),
        ({"delivered_retention_secs": float("nan")}, ValueError, "delivered_retention_secs"),
        ({"delivered_retention_secs": "60"}, TypeError, "delivered_retention_secs"),
        ({"delivered_retention_secs": True}, TypeError, "delivered_retention_secs"),
    ],
)
def test_bad_store_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any], exc: type, match: str
) -> None:
    monkeypatch.chdir(tmp_path)
    options = {"signing_secret": SECRET, "store_path": "ok.db", **overrides}
    with pytest.raises(exc, match=match):
        NotifierConfig(**options)
    with pytest.raises(exc, match=match):
        JobNotifier(**options)
    assert os.listdir(tmp_path) == [], "nothing may be created for a bad configuration"


def test_store_options_accept_paths_and_boundaries(tmp_path: Path) -> None:
    c = NotifierConfig(store_path=tmp_path / "p.db", durability="sync", delivered_retention_secs=0)
    assert c.store_path == tmp_path / "p.db"
    n = JobNotifier(c, signing_secret=SECRET)
    n.close()
    assert (tmp_path / "p.db").is_file()


# -- 8. without a store nothing changes -------------------------------------------------------------------------
def test_without_a_store_close_dead_letters_leftovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = refused_url()
    n = JobNotifier(
        signing_secret=SECRET, allow_private_networks=True, max_retries=5, retry_base_ms=60_000, timeout_secs=2
    )
    try:
        for i in range(3):
            n.notify("mem", JobEvent(P, progress=i), url)
    finally:
        n.close(0)
    dead = n.dead_letters()
    assert [d.event().progress for d in dead] == [0, 1, 2]
    assert all("notifier closed" in d.last_error for d in dead), [d.last_error for d in dead]
    s = n.stats()
    assert s["dead_lettered"] == 3 and s["pending"] == 0, s
    assert (s["left_in_store"], s["recovered"], s["store_commits"], s["store_errors"]) == (0, 0, 0, 0), s
    n.clear_dead_letters()  # no store to close: allowed after close
    assert n.dead_letters() == []
    assert os.listdir(tmp_path) == [], "no file without a store_path"


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("job_id", "job\r\nX-Injected: 1"),
        ("job_id", ""),
        ("url", "http://127.0.0.1:1/a b"),
        ("url", "gopher://127.0.0.1/"),
        ("msg_id", "msg_1\r\nX-Injected: 1"),
    ],
)
def test_a_damaged_row_is_refused_at_construction(tmp_path: Path, column: str, value: str) -> None:
    """What is read back ends up in request headers and the request line:
    a row notify() would not have accepted (a damaged or edited file) makes
    opening fail with StoreError, before anything is sent."""
    store = tmp_path / "damaged.db"
    n = store_notifier(store, max_retries=100, retry_base_ms=60_000)
    n.notify("job", JobEvent(JobStatus.COMPLETED), refused_url())
    n.close(0)  # left pending in the store
    con = sqlite3.connect(store)
    try:
        con.execute(f"UPDATE deliveries SET {column} = ?", (value,))
        con.commit()
    finally:
        con.close()
    with pytest.raises(StoreError, match=r"row 1 is damaged") as info:
        store_notifier(store)
    assert str(store) in str(info.value)
