"""Bad input is refused at the call, with an exception naming the field, and
never reaches subscribers, the delivery queue or an HTTP header."""

from __future__ import annotations

import math

import pytest

from blueprint_notify import JobEvent, JobNotifier, JobStatus, NotifierConfig

P = JobStatus.PROCESSING

BAD_JOB_IDS = [
    pytest.param("", ValueError, id="empty"),
    pytest.param("x" * 257, ValueError, id="257-bytes"),
    pytest.param("é" * 129, ValueError, id="258-utf8-bytes"),
    pytest.param("a\r\nX-Evil: 1", ValueError, id="crlf"),
    pytest.param("a\nb", ValueError, id="lf"),
    pytest.param("a\x00b", ValueError, id="nul"),
    pytest.param("a\tb", ValueError, id="tab"),
    pytest.param("a\x7fb", ValueError, id="del"),
    pytest.param("\x1b[31m", ValueError, id="escape"),
    pytest.param(123, TypeError, id="int"),
    pytest.param(None, TypeError, id="none"),
    pytest.param(b"job", TypeError, id="bytes"),
]

GOOD_JOB_IDS = ["x" * 256, "é" * 128, "job-é-✓", "a b", 'q"uote', "back\\slash", "ü🚀"]


@pytest.mark.parametrize(("job_id", "exc"), BAD_JOB_IDS)
def test_bad_job_id_notify(make_notifier, receiver, job_id, exc) -> None:
    n = make_notifier()
    with pytest.raises(exc, match="job_id"):
        n.notify(job_id, JobEvent(P))
    with pytest.raises(exc, match="job_id"):
        n.notify(job_id, JobEvent(P), receiver.url_for())
    assert n.flush(2)
    assert n.stats()["submitted"] == 0
    assert receiver.requests == [] and receiver.connections_accepted == 0


@pytest.mark.parametrize(("job_id", "exc"), BAD_JOB_IDS)
def test_bad_job_id_register_job(make_notifier, job_id, exc) -> None:
    n = make_notifier()
    with pytest.raises(exc, match="job_id"):
        n.register_job(job_id)
    assert n.active_channels() == 0


@pytest.mark.parametrize(("job_id", "exc"), BAD_JOB_IDS)
async def test_bad_job_id_subscribe(make_notifier, job_id, exc) -> None:
    n = make_notifier()
    with pytest.raises(exc, match="job_id"):
        n.subscribe(job_id)
    assert n.active_channels() == 0
    # The notifier still works on this loop afterwards.
    sub = n.subscribe("fine")
    n.notify("fine", JobEvent(JobStatus.COMPLETED))
    assert (await sub.get()).status is JobStatus.COMPLETED


@pytest.mark.parametrize("job_id", GOOD_JOB_IDS)
async def test_good_job_ids(make_notifier, job_id) -> None:
    n = make_notifier()
    token = n.register_job(job_id)
    assert n.validate_job_token(job_id, token)
    sub = n.subscribe(job_id)
    n.notify(job_id, JobEvent(JobStatus.COMPLETED))
    assert (await sub.get()).status is JobStatus.COMPLETED


def test_validate_job_token_types(make_notifier) -> None:
    n = make_notifier()
    token = n.register_job("tok")
    with pytest.raises(TypeError, match="token"):
        n.validate_job_token("tok", token.encode())
    with pytest.raises(TypeError, match="job_id"):
        n.validate_job_token(1, token)
    assert not n.validate_job_token("", token)
    assert not n.validate_job_token("tok\r\n", token)


def test_crlf_job_id_never_reaches_a_header(make_notifier, receiver) -> None:
    n = make_notifier()
    for evil in ("a\r\nX-Evil: 1", "a\rX-Evil: 1", "a\nX-Evil: 1", "a\x00X-Evil: 1"):
        with pytest.raises(ValueError, match="job_id"):
            n.notify(evil, JobEvent(P), receiver.url_for())
    n.notify("good", JobEvent(P), receiver.url_for())
    assert n.flush(5)
    assert [r.job_id for r in receiver.requests] == ["good"]
    assert all("x-evil" not in r.headers for r in receiver.requests)


# -- events -------------------------------------------------------------------------------------
@pytest.mark.parametrize("progress", [-1, 101, 1000, -(2**70)])
def test_progress_out_of_range(progress) -> None:
    with pytest.raises(ValueError, match="progress"):
        JobEvent(P, progress=progress)


@pytest.mark.parametrize("progress", ["50", 50.0, True, False, [50]])
def test_progress_wrong_type(progress) -> None:
    with pytest.raises(TypeError, match="progress"):
        JobEvent(P, progress=progress)


def test_progress_bounds_and_int_subclasses() -> None:
    import enum

    class Pct(enum.IntEnum):
        HALF = 50

    assert JobEvent(P, progress=0).progress == 0
    assert JobEvent(P, progress=100).progress == 100
    event = JobEvent(P, progress=Pct.HALF)
    assert type(event.progress) is int and event.progress == 50
    assert event.to_json().startswith('{"status":"processing","progress":50,')


@pytest.mark.parametrize("status", ["bogus", "COMPLETED", "", "done"])
def test_bad_status_value(status) -> None:
    with pytest.raises(ValueError, match="status"):
        JobEvent(status)


@pytest.mark.parametrize("status", [2, None, b"completed", 1.0])
def test_bad_status_type(status) -> None:
    with pytest.raises(TypeError, match="status"):
        JobEvent(status)


@pytest.mark.parametrize(
    ("field", "value", "exc"),
    [
        ("error", 42, TypeError),
        ("error", b"bytes", TypeError),
        ("timestamp", 1.5, TypeError),
        ("timestamp", "1700000000", TypeError),
        ("timestamp", True, TypeError),
        ("timestamp", -1, ValueError),
    ],
)
def test_bad_event_fields(field, value, exc) -> None:
    with pytest.raises(exc, match=field):
        JobEvent(P, **{field: value})


def _circular() -> list:
    loop: list = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    "result",
    [
        pytest.param(object(), id="object"),
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="inf"),
        pytest.param({1, 2}, id="set"),
        pytest.param({"x": float("-inf")}, id="nested-inf"),
        pytest.param({(1, 2): "tuple-key"}, id="tuple-key"),
        pytest.param(b"bytes", id="bytes"),
        pytest.param(_circular(), id="circular"),
    ],
)
async def test_non_json_result(make_notifier, receiver, result) -> None:
    n = make_notifier()
    event = JobEvent(JobStatus.COMPLETED, result=result)
    with pytest.raises(TypeError, match="result"):
        event.to_json()
    sub = n.subscribe("nonjson")
    with pytest.raises(TypeError, match="result"):
        n.notify("nonjson", event, receiver.url_for())
    with pytest.raises(TypeError, match="result"):
        n.notify("nonjson", event)
    # Nothing was published or queued.
    assert sub.get_nowait() is None
    assert n.active_channels() == 1, "a refused terminal event must not end the channel"
    assert n.stats()["submitted"] == 0
    assert n.flush(2) and receiver.requests == []
    n.notify("nonjson", JobEvent(JobStatus.COMPLETED, result={"ok": [1, 2.5, None, True, "ü"]}))
    assert (await sub.get()).result == {"ok": [1, 2.5, None, True, "ü"]}


@pytest.mark.parametrize("event", [None, {"status": "completed"}, "completed", JobStatus.COMPLETED])
def test_event_must_be_a_job_event(make_notifier, event) -> None:
    n = make_notifier()
    with pytest.raises(TypeError, match="JobEvent"):
        n.notify("j", event)


# -- URLs ---------------------------------------------------------------------------------------
BAD_URLS = [
    "ftp://example.com/hook",
    "file:///etc/passwd",
    "gopher://example.com/",
    "javascript:alert(1)",
    "not a url",
    "http://",
    "http://exa mple.com/",
    "http://x/\r\nX-Evil: 1",
    "http://x/\nX-Evil: 1",
    "http://x/\x00",
    "http://x/\t",
    "",
    "/relative/path",
    "example.com/hook",
    "http://example.com:99999/",
    "http://example.com/" + "a" * 5000,
]


@pytest.mark.parametrize("url", BAD_URLS)
async def test_bad_webhook_url(make_notifier, receiver, url) -> None:
    n = make_notifier()
    sub = n.subscribe("badurl")
    with pytest.raises(ValueError, match="webhook_url"):
        n.notify("badurl", JobEvent(JobStatus.COMPLETED), url)
    assert sub.get_nowait() is None, "a refused notify must not publish"
    assert n.active_channels() == 1
    assert n.stats()["submitted"] == 0
    assert receiver.requests == []


@pytest.mark.parametrize("url", [b"http://example.com/", 42, ["http://example.com/"]])
def test_webhook_url_wrong_type(make_notifier, url) -> None:
    n = make_notifier()
    with pytest.raises(TypeError, match="webhook_url"):
        n.notify("j", JobEvent(P), url)


def test_url_scheme_is_case_insensitive(make_notifier, receiver) -> None:
    n = make_notifier()
    n.notify("case", JobEvent(P), "HTTP://127.0.0.1:%d/Hook?x=1#frag" % receiver.port)
    assert n.flush(5)
    (req,) = receiver.requests
    assert req.path == "/Hook?x=1", "the fragment is not sent"


def test_empty_secret_with_url(make_notifier, receiver) -> None:
    n = make_notifier(signing_secret="")
    with pytest.raises(ValueError, match="signing_secret"):
        n.notify("nosecret", JobEvent(P), receiver.url_for())
    assert n.stats()["submitted"] == 0


def test_notify_after_close(make_notifier, receiver) -> None:
    n = make_notifier()
    n.close(timeout=0)
    with pytest.raises(RuntimeError, match="closed"):
        n.notify("late", JobEvent(P))
    with pytest.raises(RuntimeError, match="closed"):
        n.notify("late", JobEvent(P), receiver.url_for())
    with pytest.raises(RuntimeError, match="closed"):
        n.register_job("late-new-job")
    assert n.stats()["submitted"] == 0


def test_flush_and_close_timeouts_are_checked(make_notifier) -> None:
    n = make_notifier()
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            n.flush(bad)
        with pytest.raises(ValueError, match="timeout"):
            n.close(bad)
    with pytest.raises(TypeError, match="timeout"):
        n.close("now")
    assert not n.closed
    n.close(0)
    assert n.closed


# -- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "field"),
    [
        ({"max_retries": -1}, ValueError, "max_retries"),
        ({"max_retries": "3"}, TypeError, "max_retries"),
        ({"max_retries": True}, TypeError, "max_retries"),
        ({"max_retries": 3.0}, TypeError, "max_retries"),
        ({"retry_base_ms": -1}, ValueError, "retry_base_ms"),
        ({"timeout_secs": 0}, ValueError, "timeout_secs"),
        ({"timeout_secs": -1}, ValueError, "timeout_secs"),
        ({"timeout_secs": float("nan")}, ValueError, "timeout_secs"),
        ({"timeout_secs": float("inf")}, ValueError, "timeout_secs"),
        ({"timeout_secs": "10"}, TypeError, "timeout_secs"),
        ({"sse_capacity": 0}, ValueError, "sse_capacity"),
        ({"max_channels": 0}, ValueError, "max_channels"),
        ({"max_dead_letters": -1}, ValueError, "max_dead_letters"),
        ({"max_connections": 0}, ValueError, "max_connections"),
        ({"max_connections_per_host": 65}, ValueError, "max_connections_per_host"),
        ({"max_connections": 4, "max_connections_per_host": 5}, ValueError, "max_connections_per_host"),
        ({"max_response_bytes": -1}, ValueError, "max_response_bytes"),
        ({"max_retry_delay_ms": -1}, ValueError, "max_retry_delay_ms"),
        ({"close_timeout_secs": -1}, ValueError, "close_timeout_secs"),
        ({"allow_private_networks": 1}, TypeError, "allow_private_networks"),
        ({"signing_secret": b"secret"}, TypeError, "signing_secret"),
        ({"signing_secret": None}, TypeError, "signing_secret"),
        ({"user_agent": "a\r\nX-Evil: 1"}, ValueError, "user_agent"),
        ({"user_agent": None}, TypeError, "user_agent"),
    ],
)
def test_bad_config(kwargs, exc, field) -> None:
    with pytest.raises(exc, match=field):
        NotifierConfig(**kwargs)
    with pytest.raises(exc, match=field):
        JobNotifier(**kwargs)
    with pytest.raises(exc, match=field):
        JobNotifier(NotifierConfig(signing_secret="s"), **kwargs)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(TypeError, match="max_retrys"):
        JobNotifier(signing_secret="s", max_retrys=3)
    with pytest.raises(TypeError, match="max_retrys"):
        JobNotifier(NotifierConfig(signing_secret="s"), max_retrys=3)


def test_config_must_be_a_notifier_config() -> None:
    with pytest.raises(TypeError, match="NotifierConfig"):
        JobNotifier({"signing_secret": "s"})


def test_close_timeout_nan_is_refused() -> None:
    with pytest.raises(ValueError, match="close_timeout_secs"):
        NotifierConfig(close_timeout_secs=math.nan)
