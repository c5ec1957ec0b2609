"""Configuration, status and event types."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

import blueprint_notify
from blueprint_notify import FailedDelivery, JobEvent, JobNotifier, JobStatus, NotifierConfig


def test_all_defaults() -> None:
    c = NotifierConfig()
    assert dataclasses.asdict(c) == {
        "signing_secret": "",
        "max_retries": 3,
        "retry_base_ms": 1000,
        "timeout_secs": 10,
        "sse_capacity": 16,
        "max_channels": 10_000,
        "max_dead_letters": 1000,
        "allow_private_networks": False,
        "max_retry_delay_ms": 300_000,
        "max_connections": 64,
        "max_connections_per_host": 16,
        "max_response_bytes": 64 * 1024,
        "close_timeout_secs": 10.0,
        "retention_secs": 300.0,
        "signature_scheme": "both",
        "user_agent": f"blueprint-notify/{blueprint_notify.__version__}",
        "store_path": None,
        "durability": "batched",
        "delivered_retention_secs": 3600.0,
        "broker_url": None,
        "broker_prefix": "bpn",
        "broker_buffer": 100_000,
        "broker_ttl_secs": 86_400.0,
    }
    assert NotifierConfig.field_names()[:5] == [
        "signing_secret",
        "max_retries",
        "retry_base_ms",
        "timeout_secs",
        "sse_capacity",
    ]


def test_config_is_frozen() -> None:
    c = NotifierConfig(signing_secret="s")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.max_retries = 5  # type: ignore[misc]


def test_overrides_replace_config_fields(make_notifier) -> None:
    base = NotifierConfig(signing_secret="s", max_retries=7, sse_capacity=3)
    n = JobNotifier(base, max_retries=1)
    try:
        assert n.config.max_retries == 1
        assert n.config.sse_capacity == 3
        assert n.config.signing_secret == "s"
        assert base.max_retries == 7, "the given config is not modified"
    finally:
        n.close(0)
    m = make_notifier(sse_capacity=2)
    assert m.config.sse_capacity == 2 and m.config.allow_private_networks is True


def test_boundary_values_are_accepted() -> None:
    NotifierConfig(max_retries=0, retry_base_ms=0, sse_capacity=1, max_channels=1, max_dead_letters=0,
                   max_connections=1, max_connections_per_host=1, max_response_bytes=0,
                   close_timeout_secs=0, timeout_secs=0.001, max_retry_delay_ms=0)


def test_notifier_repr_and_closed(make_notifier) -> None:
    n = make_notifier()
    assert "open" in repr(n) and not n.closed
    n.close(0)
    assert "closed" in repr(n) and n.closed


def test_zero_dead_letters_kept_still_counts(make_notifier) -> None:
    n = make_notifier(max_dead_letters=0)
    n.notify("none-kept", JobEvent(JobStatus.FAILED), "http://127.0.0.1:1/")
    assert n.flush(5)
    assert n.dead_letters() == []
    s = n.stats()
    assert s["dead_lettered"] == 1 and s["dead_letters_evicted"] == 1


# -- JobStatus ----------------------------------------------------------------------------------
def test_job_status_values() -> None:
    assert JobStatus("completed") is JobStatus.COMPLETED
    assert str(JobStatus.COMPLETED) == "completed"
    assert f"{JobStatus.PROCESSING}" == "processing"
    assert JobStatus.COMPLETED == "completed"  # a str enum
    assert [s.value for s in JobStatus] == ["queued", "processing", "completed", "failed", "cancelled"]
    assert {s for s in JobStatus if s.is_terminal} == {
        JobStatus.COMPLETED,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
    }
    with pytest.raises(ValueError):
        JobStatus("Completed")


# -- JobEvent ----------------------------------------------------------------------------------
def test_job_event_defaults() -> None:
    before = int(time.time())
    event = JobEvent(JobStatus.QUEUED)
    after = int(time.time())
    assert type(event.timestamp) is int
    assert before - 2 <= event.timestamp <= after + 2
    assert event.progress is None and event.result is None and event.error is None
    assert event.to_dict() == {"status": "queued", "timestamp": event.timestamp}


def test_job_event_accepts_status_strings() -> None:
    event = JobEvent("failed", error="boom", timestamp=1)
    assert event.status is JobStatus.FAILED
    assert event.to_json() == '{"status":"failed","error":"boom","timestamp":1}'


def test_job_event_is_immutable_and_hashable_when_result_is() -> None:
    event = JobEvent(JobStatus.QUEUED, timestamp=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.progress = 5  # type: ignore[misc]
    assert event == JobEvent("queued", timestamp=1)
    assert hash(event) == hash(JobEvent("queued", timestamp=1))


def test_job_event_json_escapes_and_unicode() -> None:
    event = JobEvent("completed", result={"q": 'a"b\\c', "u": "ü✓", "ctl": "\x01\n"}, error="\u2028", timestamp=3)
    text = event.to_json()
    assert "ü✓" in text, "non-ASCII is kept as UTF-8, not \\u-escaped"
    assert json.loads(text) == event.to_dict()
    assert JobEvent.from_json(text.encode()) == event
    assert " " not in text.replace("ü✓", "")


def test_result_falsy_values_are_kept() -> None:
    for value in (0, "", [], {}, False):
        event = JobEvent("completed", result=value, timestamp=1)
        assert "result" in event.to_dict()
        assert json.loads(event.to_json())["result"] == value


def test_failed_delivery_event_round_trip() -> None:
    event = JobEvent("failed", progress=3, error="x", timestamp=9)
    payload = '{"job_id":"j","event":%s}' % event.to_json()
    d = FailedDelivery(job_id="j", url="http://h/", attempts=2, last_error="HTTP 500", payload=payload)
    assert d.event() == event


def test_public_api_exports() -> None:
    for name in blueprint_notify.__all__:
        assert hasattr(blueprint_notify, name), name
    from blueprint_notify import testing

    for name in testing.__all__:
        assert hasattr(testing, name), name
