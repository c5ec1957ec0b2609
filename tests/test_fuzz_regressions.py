"""Inputs the fuzz harnesses (fuzz/, tools/fuzz.sh) found to break a
property, replayed through the public API wherever Python can reach them.
Each names its file under fuzz/regressions/, which tools/fuzz.sh replays
against the C harness as well."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from blueprint_notify import JobEvent, JobNotifier, JobStatus, StoreError
from blueprint_notify.testing import ReceivedRequest


def gaps(reqs: list[ReceivedRequest]) -> list[float]:
    return [b.received_at - a.received_at for a, b in zip(reqs, reqs[1:])]


# -- fuzz/regressions/url/port-zero ---------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://p:0/", "https://example.com:00/x", "http://[::1]:0"])
def test_port_zero_is_refused_at_notify(url: str) -> None:
    """Nothing can be reached on port 0: such a URL was accepted, then
    retried until dead-lettered."""
    n = JobNotifier(signing_secret="s")
    try:
        with pytest.raises(ValueError, match="invalid port"):
            n.notify("job", JobEvent(JobStatus.QUEUED), url)
        n.notify("job", JobEvent(JobStatus.QUEUED), "https://example.com:000443/x")  # leading zeros: 443
    finally:
        n.close(0)


# -- fuzz/regressions/url/percent-{7f,ff}-host ---------------------------------------------------------
@pytest.mark.parametrize(
    "url", ["http://a%7fb.example/", "http://a%7Fb/", "https://%ff.example/x", "http://a%80b.example/"]
)
def test_a_host_that_decodes_to_del_or_non_utf8_is_refused(url: str) -> None:
    """libcurl percent-decodes hosts and refuses control characters there,
    but not DEL or bytes that are not UTF-8: such a URL was accepted, could
    never resolve, and put the raw byte into last_error and log lines."""
    n = JobNotifier(signing_secret="s")
    try:
        with pytest.raises(ValueError, match="webhook_url host must not decode to DEL"):
            n.notify("job", JobEvent(JobStatus.QUEUED), url)
        assert n.stats()["submitted"] == 0
        # An international name, percent-encoded as UTF-8, is still a host.
        n.notify("job", JobEvent(JobStatus.QUEUED), "http://b%C3%BCcher.example/")
    finally:
        n.close(0)


# -- fuzz/regressions/retry_after/seconds-wrap-to-384ms -------------------------------------------------
def test_a_huge_retry_after_does_not_wrap_to_a_short_wait(make_notifier, receiver) -> None:
    """18446744073709552 seconds is more milliseconds than 64 bits hold: the
    product wrapped around to 384 ms. Now it saturates and the cap
    (max_retry_delay_ms) applies, as for any other huge value."""
    receiver.respond_with(429, headers={"Retry-After": "18446744073709552"}, times=1)
    n = make_notifier(max_retries=1, retry_base_ms=10, max_retry_delay_ms=1500)
    n.notify("ra-wrap", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(6)
    reqs = receiver.requests
    assert [r.status for r in reqs] == [429, 200]
    (gap,) = gaps(reqs)
    assert 1.5 <= gap < 2.5, f"the 1500 ms cap should apply, retried after {gap:.3f} s"


# -- fuzz/regressions/store_row/url-not-utf8 ------------------------------------------------------------
def refused_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/down"


def store_with_one_dead_letter(path: Path) -> None:
    n = JobNotifier(
        signing_secret="s", allow_private_networks=True, max_retries=0, timeout_secs=2, store_path=path
    )
    try:
        n.notify("job", JobEvent(JobStatus.COMPLETED), refused_url())
        assert n.flush(5)
        assert len(n.dead_letters()) == 1
    finally:
        n.close(0)


def damage(path: Path, column: str, value: bytes) -> None:
    con = sqlite3.connect(path)
    try:  # text that is not UTF-8, as a damaged or edited file may hold
        con.execute(f"UPDATE deliveries SET {column} = CAST(? AS TEXT)", (value,))
        con.commit()
    finally:
        con.close()


@pytest.mark.parametrize(
    ("column", "value"),
    [("job_id", b"j\xffob"), ("url", b"http://127.0.0.1:1/\xff"), ("url", b"http://qooks\xb5example.com/")],
)
def test_a_row_that_is_not_utf8_is_refused_at_construction(tmp_path: Path, column: str, value: bytes) -> None:
    """notify() only takes str, so a job id or URL that is not UTF-8 comes
    from a damaged file. Such a row was accepted, then dead_letters() raised
    UnicodeDecodeError on every call."""
    store = tmp_path / "damaged.db"
    store_with_one_dead_letter(store)
    damage(store, column, value)
    with pytest.raises(StoreError, match=r"row 1 is damaged"):
        JobNotifier(signing_secret="s", store_path=store)


def test_a_last_error_that_is_not_utf8_is_read_leniently(tmp_path: Path) -> None:
    """last_error is the engine's own text (bounded, so it may be cut inside
    a character); from a damaged file it may hold anything. dead_letters()
    raised UnicodeDecodeError; now the bad bytes become U+FFFD."""
    store = tmp_path / "damaged.db"
    store_with_one_dead_letter(store)
    damage(store, "last_error", b"x\xff\xe2\x82")
    n = JobNotifier(signing_secret="s", store_path=store)
    try:
        (dead,) = n.dead_letters()
        assert dead.last_error == "x\ufffd\ufffd"
        assert dead.job_id == "job"
    finally:
        n.close(0)


# -- fuzz/regressions/ingest/gap-skips-held-events ------------------------------------------------------
def test_a_gap_in_the_shared_history_does_not_skip_events_held_here() -> None:
    """An entry from Redis whose previous id never arrived (trimmed before
    this process read it) tells the job's readers they lagged. It also moved
    their cursors past that id, so events this process held and the reader
    had not read yet were skipped. Now the reader gets them, and the lag."""
    from blueprint_notify import _core

    PROCESSING = 1  # the core's status code (JobStatus order)
    engine = _core.Engine(signing_secret=b"s", clock_ids=True)
    waker = _core.Waker(engine, lambda: None)
    sub = engine.subscribe("job", waker, lambda: None, None, 0)
    try:
        assert engine.ingest("job", 1, PROCESSING, b"{}", 0, 0)
        assert engine.ingest("job", 16, PROCESSING, b"{}", 0, 8)  # 8 never arrived
        assert not engine.ingest("job", 5, PROCESSING, b"{}", 0, 0)  # counted lost: not taken in late
        events, skipped, ended = sub.pull(10)
        assert [seq for seq, _status, _data in events] == [1, 16]
        assert skipped == 1
        assert not ended
    finally:
        sub.close()
        engine.close(0)


# -- fuzz/fuzz_url.c: origins have no capitals ----------------------------------------------------------
def test_host_case_does_not_split_the_per_host_connection_limit(make_notifier, receiver) -> None:
    """The engine keeps max_connections_per_host per origin (scheme://host:port)
    and holds a job's delivery back while its host is at the cap. The host
    kept its case there, so http://localhost and http://LOCALHOST were two
    hosts: the second transfer went to libcurl at once and waited there for
    the connection (libcurl caps hosts too, ignoring case) with its timeout
    running, and timed out."""
    port = urlsplit(receiver.url).port
    lock = threading.Lock()
    active = peak = 0

    def slow(req: ReceivedRequest) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.7)  # server-side delay: the receiver answers slowly
        with lock:
            active -= 1
        return None  # answer from the script: 200

    receiver.set_handler(slow)
    n = make_notifier(max_connections_per_host=1, timeout_secs=1)
    n.notify("job-a", JobEvent(JobStatus.COMPLETED), f"http://localhost:{port}/a")
    n.notify("job-b", JobEvent(JobStatus.COMPLETED), f"http://LOCALHOST:{port}/b")
    assert n.flush(5)
    assert [d.last_error for d in n.dead_letters()] == []
    assert sorted(r.path for r in receiver.requests) == ["/a", "/b"]
    assert peak == 1
