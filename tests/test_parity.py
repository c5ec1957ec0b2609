"""The 16 behaviours the reference Rust notifier's tests check, on the real
engine (real loopback servers, the real delivery path)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time

import pytest

from blueprint_notify import (
    FailedDelivery,
    JobEvent,
    JobStatus,
    NotifierConfig,
    SubscriptionClosed,
)

SECRET = "test-secret"  # what the make_notifier and receiver fixtures use

HEX64 = re.compile(r"^[0-9a-f]{64}$")
UNREACHABLE = "http://127.0.0.1:1/nonexistent"


def reference_hmac(secret: str, ts: int, payload: bytes) -> str:
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
    mac.update(str(ts).encode())
    mac.update(b".")
    mac.update(payload)
    return mac.hexdigest()


def test_job_status_terminal() -> None:
    assert not JobStatus.QUEUED.is_terminal
    assert not JobStatus.PROCESSING.is_terminal
    assert JobStatus.COMPLETED.is_terminal
    assert JobStatus.FAILED.is_terminal
    assert JobStatus.CANCELLED.is_terminal


def test_hmac_signature_with_timestamp(make_notifier) -> None:
    n = make_notifier()
    ts = int(time.time())
    sig1 = n.sign_payload(b"hello", ts)
    sig2 = n.sign_payload("hello", ts)  # str payloads are signed as UTF-8
    assert HEX64.match(sig1), sig1
    assert sig1 == sig2, "same payload and timestamp must give the same signature"
    assert n.sign_payload(b"hello!", ts) != sig1, "the payload must affect the signature"


def test_hmac_signature_verifiable_with_timestamp(make_notifier) -> None:
    n = make_notifier()
    payload = b"test payload"
    ts = int(time.time())
    sig = n.sign_payload(payload, ts)
    expected = reference_hmac(SECRET, ts, payload)
    assert hmac.compare_digest(bytes.fromhex(sig), bytes.fromhex(expected))
    # Non-ASCII payload: signed over its exact UTF-8 bytes.
    text = '{"name":"ü✓"}'
    assert n.sign_payload(text, ts) == reference_hmac(SECRET, ts, text.encode("utf-8"))


def test_empty_secret_rejects_webhook_signing(make_notifier, receiver, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="blueprint_notify")
    n = make_notifier(signing_secret="")
    assert any(
        r.levelno == logging.WARNING and "signing_secret" in r.getMessage() for r in caplog.records
    ), "creating a notifier without a secret should warn"
    with pytest.raises(ValueError, match="signing_secret is empty"):
        n.sign_payload(b"payload", 1_700_000_000)
    with pytest.raises(ValueError, match="signing_secret"):
        n.notify("job-x", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    # SSE-only use is fine.
    n.notify("job-x", JobEvent(JobStatus.COMPLETED))
    assert n.flush(2)
    assert n.stats()["submitted"] == 0
    assert receiver.requests == []


def test_timestamp_included_in_hmac(make_notifier) -> None:
    n = make_notifier()
    payload = b"same payload"
    ts = int(time.time())
    sig = n.sign_payload(payload, ts)
    assert sig == reference_hmac(SECRET, ts, payload)
    assert sig != reference_hmac(SECRET, ts + 999, payload), "timestamp must affect the signature"
    assert n.sign_payload(payload, ts + 999) != sig


async def test_sse_subscribe_and_receive(make_notifier) -> None:
    n = make_notifier()
    sub = n.subscribe("job-1")
    n.notify("job-1", JobEvent(JobStatus.PROCESSING, progress=50))
    event = await sub.get()
    assert event.status is JobStatus.PROCESSING
    assert event.progress == 50
    assert sub.last_event_id == 1
    sub.close()


async def test_terminal_event_cleans_up_channel(make_notifier) -> None:
    n = make_notifier()
    sub = n.subscribe("job-2")
    assert n.active_channels() == 1
    n.notify(
        "job-2",
        JobEvent(JobStatus.COMPLETED, result={"url": "https://example.com/result.mp4"}),
    )
    assert n.active_channels() == 0
    event = await sub.get()
    assert event.status is JobStatus.COMPLETED
    with pytest.raises(SubscriptionClosed):
        await sub.get()


async def test_multiple_subscribers_same_job(make_notifier) -> None:
    n = make_notifier()
    rx1 = n.subscribe("job-3")
    rx2 = n.subscribe("job-3")
    assert n.active_channels() == 1
    n.notify("job-3", JobEvent(JobStatus.QUEUED))
    e1 = await rx1.get()
    e2 = await rx2.get()
    assert e1.status is JobStatus.QUEUED and e2.status is JobStatus.QUEUED
    assert e1 == e2
    rx1.close()
    rx2.close()


def test_webhook_to_unreachable_url_dead_letters(make_notifier) -> None:
    # Guard off: this is about a refused TCP connection, not the SSRF guard.
    n = make_notifier(max_retries=0, timeout_secs=1)
    event = JobEvent(JobStatus.COMPLETED)
    assert n.notify("job-4", event, UNREACHABLE) is None  # fire and forget
    assert n.flush(5)
    dead = n.dead_letters()
    assert len(dead) == 1
    d = dead[0]
    assert isinstance(d, FailedDelivery)
    assert d.job_id == "job-4"
    assert d.url == UNREACHABLE
    assert d.attempts == 1
    assert d.last_error and "allow_private_networks" not in d.last_error
    assert d.payload == '{"job_id":"job-4","event":%s}' % event.to_json()
    assert d.event() == event
    assert d.failed_at == pytest.approx(time.time(), abs=5)
    stats = n.stats()
    assert (stats["submitted"], stats["delivered"], stats["dead_lettered"]) == (1, 0, 1)
    assert (stats["attempts"], stats["failed_attempts"], stats["pending"]) == (1, 1, 0)


def test_notify_without_webhook_succeeds(make_notifier) -> None:
    n = make_notifier()
    assert n.notify("job-5", JobEvent(JobStatus.PROCESSING)) is None
    assert n.pending() == 0
    assert n.flush(0) is True
    assert n.stats()["submitted"] == 0
    assert n.dead_letters() == []
    # No channel is created for a job nobody registered or subscribed to.
    assert n.active_channels() == 0


def test_job_event_serialization() -> None:
    event = JobEvent(
        status=JobStatus.COMPLETED,
        progress=None,
        result={"video_url": "https://..."},
        error=None,
        timestamp=1_712_534_400,
    )
    d = event.to_dict()
    assert d == {"status": "completed", "result": {"video_url": "https://..."}, "timestamp": 1_712_534_400}
    assert "progress" not in d and "error" not in d
    assert event.to_json() == '{"status":"completed","result":{"video_url":"https://..."},"timestamp":1712534400}'
    # Key order status, progress, result, error, timestamp; compact separators.
    full = JobEvent(JobStatus.FAILED, progress=7, result=[1, {"a": None}], error="boom ü", timestamp=5)
    assert full.to_json() == (
        '{"status":"failed","progress":7,"result":[1,{"a":null}],"error":"boom ü","timestamp":5}'
    )
    assert list(json.loads(full.to_json())) == ["status", "progress", "result", "error", "timestamp"]
    assert JobEvent.from_json(full.to_json()) == full
    assert JobEvent.from_dict(full.to_dict()) == full


def test_default_config_values() -> None:
    config = NotifierConfig()
    assert config.max_retries == 3
    assert config.retry_base_ms == 1000
    assert config.timeout_secs == 10
    assert config.sse_capacity == 16
    assert config.max_channels == 10_000
    assert config.max_dead_letters == 1000
    assert config.allow_private_networks is False
    assert config.signing_secret == ""


def test_default_config_values_reach_the_notifier(make_notifier) -> None:
    n = make_notifier(signing_secret=SECRET, max_retries=3, retry_base_ms=1000, timeout_secs=10,
                      allow_private_networks=False)
    assert n.config == NotifierConfig(signing_secret=SECRET)


def test_dead_letter_cap_works(make_notifier) -> None:
    n = make_notifier(max_dead_letters=5, max_retries=0, timeout_secs=1)
    for i in range(6):
        n.notify(f"old-{i}", JobEvent(JobStatus.FAILED), UNREACHABLE)
        assert n.flush(5)  # one at a time: dead-letter order is deterministic
    assert len(n.dead_letters()) == 5
    n.notify("overflow-job", JobEvent(JobStatus.FAILED), UNREACHABLE)
    assert n.flush(5)
    dead = n.dead_letters()
    assert len(dead) == 5, "cap must not be exceeded"
    assert [d.job_id for d in dead] == ["old-2", "old-3", "old-4", "old-5", "overflow-job"]
    assert dead[0].job_id == "old-2", "oldest entries should be evicted first"
    assert dead[-1].job_id == "overflow-job", "newest entry should be at the end"
    ids = [d.id for d in dead]
    assert ids == sorted(ids) and len(set(ids)) == 5
    stats = n.stats()
    assert stats["dead_lettered"] == 7
    assert stats["dead_letters_evicted"] == 2
    n.clear_dead_letters()
    assert n.dead_letters() == []
    assert n.stats()["dead_lettered"] == 7  # counters are not reset


def test_sse_auth_register_and_validate(make_notifier) -> None:
    n = make_notifier()
    token = n.register_job("auth-job")
    assert isinstance(token, str) and HEX64.match(token), token
    assert n.validate_job_token("auth-job", token)
    assert not n.validate_job_token("auth-job", "wrong-token")
    assert not n.validate_job_token("auth-job", token.upper())
    assert not n.validate_job_token("auth-job", token[:-1] + ("0" if token[-1] != "0" else "1"))
    assert not n.validate_job_token("auth-job", token + "0")
    assert not n.validate_job_token("auth-job", "")
    assert not n.validate_job_token("no-such-job", token)
    # Tokens are per job and fresh each time.
    other = n.register_job("auth-job-2")
    assert other != token
    assert not n.validate_job_token("auth-job", other)
    renewed = n.register_job("auth-job")
    assert renewed != token
    assert n.validate_job_token("auth-job", renewed)
    assert not n.validate_job_token("auth-job", token), "registering again replaces the token"
    # A terminal event ends the job; its token stays valid for the retention
    # window (so late SSE clients get the replay), then it is gone.
    n.notify("auth-job", JobEvent(JobStatus.COMPLETED))
    assert n.validate_job_token("auth-job", renewed)
    assert n.validate_job_token("auth-job-2", other)
    short = make_notifier(retention_secs=0)
    tok = short.register_job("auth-job")
    short.notify("auth-job", JobEvent(JobStatus.COMPLETED))
    assert not short.validate_job_token("auth-job", tok)


def test_webhook_e2e_delivery_and_signature_verification(make_notifier, make_receiver) -> None:
    secret = "e2e-test-secret"
    receiver = make_receiver(secret=secret)
    n = make_notifier(signing_secret=secret, max_retries=0, timeout_secs=5)
    event = JobEvent(JobStatus.COMPLETED, result={"video_url": "https://cdn.example.com/out.mp4"})
    url = receiver.url_for("/callback")
    before = int(time.time())
    n.notify("job-e2e", event, url)
    assert n.flush(5)
    after = int(time.time())
    assert receiver.wait_for(1, timeout=1)
    (req,) = receiver.requests
    assert req.method == "POST"
    assert req.path == "/callback"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["X-Job-Id"] == "job-e2e"
    sig = req.headers["X-Webhook-Signature"]
    ts = req.headers["X-Webhook-Timestamp"]
    assert re.fullmatch(r"sha256=[0-9a-f]{64}", sig), sig
    assert re.fullmatch(r"[0-9]+", ts), ts
    assert before <= int(ts) <= after, "timestamp should be the time of sending"
    assert abs(int(ts) - time.time()) < 10
    # Byte-exact body.
    expected = '{"job_id":"%s","event":%s}' % ("job-e2e", event.to_json())
    assert req.body == expected.encode("utf-8")
    payload = req.json()
    assert payload["job_id"] == "job-e2e"
    assert payload["event"]["status"] == "completed"
    assert payload["event"]["result"]["video_url"] == "https://cdn.example.com/out.mp4"
    # The signature verifies the way a customer would check it...
    mac = hmac.new(secret.encode(), ts.encode() + b"." + req.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(sig, "sha256=" + mac)
    assert req.verified is True
    # ...and matches what the notifier itself computes.
    assert sig == "sha256=" + n.sign_payload(req.body, int(ts))
    assert n.stats()["delivered"] == 1
    assert n.dead_letters() == []


async def test_sse_e2e_full_lifecycle(make_notifier) -> None:
    n = make_notifier()
    rx = n.subscribe("lifecycle-job")
    steps = [
        (JobStatus.QUEUED, None, None),
        (JobStatus.PROCESSING, 50, None),
        (JobStatus.PROCESSING, 100, None),
        (JobStatus.COMPLETED, None, {"url": "https://result.mp4"}),
    ]
    sent = [JobEvent(status, progress=progress, result=result) for status, progress, result in steps]
    for event in sent:
        n.notify("lifecycle-job", event)
    received = [event async for event in rx]  # ends after the terminal event
    assert received == sent
    assert [e.status for e in received] == [s for s, _, _ in steps]
    assert received[1].progress == 50 and received[2].progress == 100
    assert received[3].result == {"url": "https://result.mp4"}
    assert rx.last_event_id == 4
    assert n.active_channels() == 0
