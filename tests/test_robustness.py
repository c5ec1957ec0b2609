"""Edge cases of the engine's lifetime and of misbehaving peers."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
import urllib.parse

import pytest

from blueprint_notify import JobEvent, JobStatus
from blueprint_notify.testing import Response

DONE = JobStatus.COMPLETED
P = JobStatus.PROCESSING


def test_long_non_ascii_urls_do_not_break_logging(make_notifier, caplog, monkeypatch) -> None:
    """Regression (fixed in e94e01d): log records truncated to 511 bytes inside
    a UTF-8 sequence made pump_logs() fail with an unraisable
    UnicodeDecodeError and drop the whole batch of records."""
    unraisable: list = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    caplog.set_level(logging.ERROR, logger="blueprint_notify")
    n = make_notifier(max_retries=0)
    # One of the two paddings puts byte 511 of the log line inside an "é".
    urls = ["http://127.0.0.1:1/" + "x" * pad + "é" * 300 for pad in (0, 1)]
    for url in urls:
        n.notify("utf8-log", JobEvent(DONE), url)
    assert n.flush(5)
    assert [d.url for d in n.dead_letters()] == urls
    assert [u.exc_value for u in unraisable] == []
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "utf8-log" in r.getMessage()]
    assert len(errors) == 2


def test_non_ascii_url_path_is_delivered(make_notifier, receiver) -> None:
    n = make_notifier()
    n.notify("path", JobEvent(DONE), receiver.url_for("/hooks/é?x=✓"))
    assert n.flush(5)
    assert n.dead_letters() == []
    (req,) = receiver.requests
    # libcurl percent-encodes the path (not the query): either way the
    # decoded request target is the URL's.
    assert urllib.parse.unquote_to_bytes(req.path.encode("latin-1")) == "/hooks/é?x=✓".encode()


def test_close_while_waiting_to_retry(make_notifier, receiver) -> None:
    receiver.respond_with(500)
    n = make_notifier(max_retries=5, retry_base_ms=10_000)
    n.notify("waiting", JobEvent(DONE), receiver.url_for())
    assert receiver.wait_for(1, 2)
    assert n.flush(0.2) is False  # the retry is 8+ seconds away
    start = time.monotonic()
    n.close(timeout=0)
    assert time.monotonic() - start < 1
    (dead,) = n.dead_letters()
    assert dead.attempts == 1
    assert "notifier closed" in dead.last_error and "HTTP 500" in dead.last_error, dead.last_error
    assert len(receiver.requests) == 1


def test_notify_racing_close_loses_nothing(make_notifier, receiver) -> None:
    n = make_notifier(max_connections_per_host=4)
    accepted = [0] * 4
    refused = [0] * 4
    go = threading.Barrier(5)

    def worker(k: int) -> None:
        go.wait(5)
        for i in range(100_000):
            try:
                n.notify(f"race-{k}", JobEvent(P, result={"i": i}), receiver.url_for())
            except RuntimeError:
                refused[k] += 1
                return
            accepted[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    go.wait(5)
    assert receiver.wait_for(20, 5)
    n.close(timeout=0.1)
    for t in threads:
        t.join(10)
    assert refused == [1, 1, 1, 1], "every thread must see the close as RuntimeError"
    s = n.stats()
    assert s["pending"] == 0
    assert s["submitted"] == sum(accepted)
    assert s["delivered"] + s["dead_lettered"] == s["submitted"], s
    # Every delivered event reached the server; nothing is both lost and uncounted.
    assert len(receiver.requests) >= s["delivered"]
    assert len(receiver.requests) <= s["delivered"] + 4  # at most the abandoned in-flight ones
    assert len(n.dead_letters()) == min(s["dead_lettered"], n.config.max_dead_letters)


def test_flush_is_interruptible_by_signals(make_notifier, receiver) -> None:
    class Interrupted(Exception):
        pass

    def on_alarm(signum, frame):
        raise Interrupted

    receiver.respond_with(200, delay=2.0)  # server-side delay
    n = make_notifier(timeout_secs=5)
    n.notify("sig", JobEvent(DONE), receiver.url_for())
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        start = time.monotonic()
        with pytest.raises(Interrupted):
            n.flush(10)
        assert time.monotonic() - start < 1.0, "flush() must let signal handlers run"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert n.pending() == 1


def test_server_dropping_keep_alive_connections(make_notifier, receiver) -> None:
    # Answer, then hang up without announcing it: the next delivery must not
    # fail on the dead pooled connection.
    receiver.respond(Response(200, headers={"Connection": "keep-alive"}, close=True))
    n = make_notifier(max_retries=0, max_connections_per_host=1)
    for i in range(5):
        n.notify("hangup", JobEvent(P, progress=i), receiver.url_for())
        assert n.flush(5)
    assert n.dead_letters() == []
    assert len(receiver.requests) == 5
    assert receiver.connections_accepted == 5


def test_connection_close_responses(make_notifier, receiver) -> None:
    receiver.respond(Response(200, close=True))
    n = make_notifier(max_retries=0, max_connections_per_host=2)
    for i in range(20):
        n.notify(f"cc-{i % 3}", JobEvent(P, progress=i), receiver.url_for())
    assert n.flush(10)
    assert n.dead_letters() == []
    assert len(receiver.requests) == 20 == receiver.connections_accepted


def test_large_payload(make_notifier, receiver) -> None:
    big = "ü" * (1024 * 1024)  # 2 MiB of UTF-8
    event = JobEvent(DONE, result={"blob": big})
    n = make_notifier(timeout_secs=5)
    n.notify("big-payload", event, receiver.url_for())
    assert n.flush(10)
    (req,) = receiver.requests
    assert req.body == ('{"job_id":"big-payload","event":%s}' % event.to_json()).encode()
    assert req.verified
    assert "expect" not in req.headers


@pytest.fixture
def garbage_server():
    """A loopback TCP server that answers every connection with non-HTTP
    bytes and hangs up."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.05)
    stop = threading.Event()
    hits: list[int] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(b"SSH-2.0-OpenSSH_9.0\r\nthis is not http\r\n\r\n")
                except OSError:
                    pass
                hits.append(1)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}/", hits
    stop.set()
    t.join(5)
    srv.close()


def test_non_http_answer_is_a_failure(make_notifier, garbage_server) -> None:
    url, hits = garbage_server
    n = make_notifier(max_retries=1, retry_base_ms=5)
    n.notify("garbage", JobEvent(DONE), url)
    assert n.flush(5)
    (dead,) = n.dead_letters()
    assert dead.attempts == 2
    assert dead.last_error
    assert len(hits) == 2


def test_dropping_an_open_notifier_does_not_lose_deliveries_silently(receiver, caplog) -> None:
    """A notifier garbage-collected without close() must not drop its pending
    deliveries without a trace (at exit, _close_all dead-letters and logs
    them; a dropped notifier should at least log or warn). Regression: fixed
    in e94e01d."""
    import gc
    import warnings

    from blueprint_notify import JobNotifier

    caplog.set_level(logging.WARNING, logger="blueprint_notify")
    receiver.respond_with(200, delay=2.0)  # server-side delay
    n = JobNotifier(signing_secret="test-secret", allow_private_networks=True, max_retries=0)
    for i in range(3):
        n.notify("dropped-notifier", JobEvent(P, progress=i), receiver.url_for())
    assert receiver.wait_for(1, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del n
        gc.collect()
    traces = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    traces += [str(w.message) for w in caught]
    assert traces, "3 pending deliveries vanished without a log record or a warning"


@pytest.mark.parametrize(
    ("field", "call"),
    [
        pytest.param("job_id", lambda n, url: n.notify("job-\ud800", JobEvent(P)), id="notify-job_id"),
        pytest.param("job_id", lambda n, url: n.register_job("job-\udcff"), id="register-job_id"),
        pytest.param("webhook_url", lambda n, url: n.notify("j", JobEvent(P), url + "/\ud800"), id="url"),
        pytest.param("result", lambda n, url: n.notify("j", JobEvent(P, result="\ud800")), id="result"),
        pytest.param("error", lambda n, url: n.notify("j", JobEvent(P, error="\ud800")), id="error"),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(make_notifier, receiver, field, call) -> None:
    """Regression (fixed in e94e01d): a bare UnicodeEncodeError that named no field."""
    n = make_notifier()
    with pytest.raises((ValueError, TypeError), match=field):
        call(n, receiver.url)
    assert n.stats()["submitted"] == 0


def test_atexit_dead_letters_and_logs_pending_deliveries(tmp_path) -> None:
    import subprocess

    script = tmp_path / "exit_with_pending.py"
    script.write_text(
        "import logging, sys\n"
        "logging.basicConfig(level=logging.ERROR, stream=sys.stdout, format='%(levelname)s %(message)s')\n"
        "from blueprint_notify import JobEvent, JobNotifier\n"
        "from blueprint_notify.testing import WebhookReceiver\n"
        "r = WebhookReceiver().start()\n"
        "r.respond_with(200, delay=30)\n"
        "n = JobNotifier(signing_secret='s', allow_private_networks=True, close_timeout_secs=0.2)\n"
        "for i in range(3):\n"
        "    n.notify('exit-job', JobEvent('processing', progress=i), r.url_for())\n"
        "assert r.wait_for(1, 5)\n"
        "print('exiting', flush=True)\n"
    )
    import os

    import blueprint_notify

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(blueprint_notify.__file__))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=20, env=env)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 10
    lines = proc.stdout.splitlines()
    assert lines[0] == "exiting"
    dead = [line for line in lines if line.startswith("ERROR") and "exit-job" in line]
    assert len(dead) == 3, proc.stdout + proc.stderr
    assert all("notifier closed" in line for line in dead)


_CLOSE_BLOCKED_LANES_SCRIPT = """
import logging
logging.getLogger("blueprint_notify").addHandler(logging.NullHandler())
logging.getLogger("blueprint_notify").propagate = False
from blueprint_notify import JobEvent, JobNotifier
from blueprint_notify.testing import WebhookReceiver

with WebhookReceiver() as r:
    r.respond_with(200, delay=30)  # server-side delay: everything stays in flight
    for trial in range(20):
        n = JobNotifier(signing_secret="s", allow_private_networks=True, max_retries=0,
                        max_connections_per_host=2, max_connections=8)
        for j in range(20):  # 2 in flight, 18 lanes blocked on the per-host limit
            n.notify(f"job-{j}", JobEvent("processing"), r.url_for())
        assert r.wait_for(2 * (trial + 1), 5)
        n.close(0)
        assert len(n.dead_letters()) == 20
print("survived", flush=True)
"""


def test_close_with_lanes_blocked_on_the_per_host_limit_is_memory_safe(tmp_path) -> None:
    """Regression (fixed in e94e01d): close() freed lanes still linked in a
    host's blocked FIFO, then transfer_detach() -> blocked_pop() read and
    ready_push() wrote the freed lane (heap-use-after-free).

    Run in a child process: with glibc's MALLOC_PERTURB_ (tcache off) a read
    of freed memory follows a garbage pointer and crashes; under `make
    test-asan` the preloaded ASan reports it (into tmp_path, so the report
    is attributed to this test rather than failing the whole run)."""
    import os
    import subprocess

    import blueprint_notify

    script = tmp_path / "close_blocked.py"
    script.write_text(_CLOSE_BLOCKED_LANES_SCRIPT)
    env = dict(os.environ)
    env["MALLOC_PERTURB_"] = "165"
    env["GLIBC_TUNABLES"] = "glibc.malloc.tcache_count=0"
    for name in ("ASAN_OPTIONS", "UBSAN_OPTIONS"):
        if name in env:
            env[name] += f":log_path={tmp_path}/sanitizer"
    root = os.path.dirname(os.path.dirname(blueprint_notify.__file__))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    reports = "".join(p.read_text(errors="replace") for p in tmp_path.glob("sanitizer*"))
    assert proc.returncode == 0 and "survived" in proc.stdout and not reports, (
        f"exit status {proc.returncode}\n{proc.stderr[-2000:]}\n{reports[:3000]}"
    )


async def test_no_reference_leaks_on_hot_paths(make_notifier) -> None:
    """The binding must not leak references to the objects it is given, on
    success and on error paths."""
    import gc

    n = make_notifier()
    job = "".join(["ref", "count-job"])  # fresh objects, not interned
    url = "".join(["http://127.0.0.1:1", "/x"])
    bad = "".join(["ftp://", "x"])
    payload = bytes(bytearray(b"payload"))
    event = JobEvent(P, result={"a": 1})

    def counts() -> tuple[int, ...]:
        return tuple(sys.getrefcount(o) for o in (job, url, bad, payload, event))

    before = counts()
    for _ in range(100):
        n.notify(job, event)
        n.notify(job, event, url)
        with pytest.raises(ValueError):
            n.notify(job, event, bad)
        n.register_job(job)
        n.validate_job_token(job, "x")
        n.sign_payload(payload, 5)
        n.stats()
        n.dead_letters()
        sub = n.subscribe(job)
        n.notify(job, event)
        await sub.get()
        sub.close()
        del sub
    assert await n.drain(5)
    gc.collect()
    assert counts() == before


def test_truncated_log_records_end_on_a_character_boundary(make_notifier, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="blueprint_notify")
    n = make_notifier(max_retries=0)
    # 3-byte characters: of three paddings, two put the 511-byte cut inside one.
    for pad in range(3):
        n.notify(f"cut-{pad}", JobEvent(DONE), "http://127.0.0.1:1/" + "x" * pad + "✓" * 200)
    assert n.flush(5)
    messages = [r.getMessage() for r in caplog.records if "job_id=cut-" in r.getMessage()]
    assert len(messages) == 3
    for message in messages:
        assert "\ufffd" not in message, repr(message[-10:])
        assert message.endswith("✓")
        assert len(message.encode()) <= 511


def test_webhook_url_passwords_stay_out_of_log_lines(make_notifier, caplog) -> None:
    """Found by the property tests: the retry WARNING and dead-letter ERROR
    lines printed the URL with its userinfo. The user and password are now
    shown as ***; the dead letter keeps the real URL (redeliver needs it)."""
    caplog.set_level(logging.WARNING, logger="blueprint_notify")
    n = make_notifier(max_retries=1, retry_base_ms=1, allow_private_networks=True)
    url = "http://user:s3cret-pw@127.0.0.1:1/hook?q=1"
    n.notify("redact-job", JobEvent(DONE), url)
    assert n.flush(5)
    (dead,) = n.dead_letters()
    assert dead.url == url
    lines = [r.getMessage() for r in caplog.records if "redact-job" in r.getMessage()]
    assert len(lines) == 2, lines  # one retry warning, one dead letter
    assert all("s3cret-pw" not in line and "user" not in line for line in lines), lines
    assert all("url=http://***@127.0.0.1:1/hook?q=1 " in line for line in lines), lines


async def test_a_channel_made_by_subscribing_goes_with_its_last_subscriber(make_notifier) -> None:
    """Found by the property tests: subscribe() then close() on jobs that
    never had an event left live channels behind until ChannelLimitError.
    Registered jobs and jobs with history keep their channel."""
    n = make_notifier(max_channels=3)
    for i in range(10):
        sub = n.subscribe(f"empty-{i}")
        sub.close()
    assert n.active_channels() == 0
    kept = n.subscribe("with-history")
    n.notify("with-history", JobEvent(P, progress=1))
    kept.close()
    n.register_job("registered")
    sub = n.subscribe("registered")
    sub.close()
    assert n.active_channels() == 2
    late = n.subscribe("with-history", last_event_id=0)
    assert (await late.get()).progress == 1
    late.close()
