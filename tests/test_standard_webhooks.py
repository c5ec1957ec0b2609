"""Standard Webhooks signatures (webhook-id / webhook-timestamp /
webhook-signature) on real deliveries: the spec's public test vector, the
three signature schemes, whsec_ secrets (padded or not), webhook-id
stability across retries, and secret rotation with overlapping keys.

Deliveries are cross-checked with the reference implementation from PyPI
(``standardwebhooks``) as well as with :func:`blueprint_notify.verify`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re

import pytest
import standardwebhooks

from blueprint_notify import JobEvent, JobStatus, NotifierConfig, SignatureError, _core, verify
from blueprint_notify._config import standard_key
from blueprint_notify.testing import compute_signature

# The public test vector of the Standard Webhooks specification.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

WEBHOOK_HEADERS = {"webhook-id", "webhook-timestamp", "webhook-signature"}
SEED_HEADERS = {"x-webhook-signature", "x-webhook-timestamp"}
# A safe webhook-id: what the spec's own ids look like, nothing a header needs escaping for.
WEBHOOK_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


def body_of(job_id: str, event: JobEvent) -> bytes:
    return ('{"job_id":%s,"event":%s}' % (json.dumps(job_id), event.to_json())).encode()


def v1_signatures(header: str) -> list[str]:
    parts = header.split(" ")
    assert all(p.startswith("v1,") for p in parts), header
    return parts


def expected_v1(key: bytes, msg_id: str, ts: str, body: bytes) -> str:
    """Computed here with hmac/base64 (not with the code under test)."""
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def reference_verify(secret: str | bytes, body: bytes, headers) -> dict:
    """The PyPI reference verifier (5-minute tolerance against now)."""
    return standardwebhooks.Webhook(secret).verify(body, dict(headers))


# -- the spec's public vector ----------------------------------------------------------------
def test_spec_vector_with_the_native_signer() -> None:
    key = standard_key(SPEC_SECRET)
    assert key == base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert _core.sign_standard(key, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIG
    # And byte-exact with the reference implementation's signer.
    from datetime import datetime, timezone

    ref = standardwebhooks.Webhook(SPEC_SECRET).sign(
        SPEC_ID, datetime.fromtimestamp(SPEC_TS, tz=timezone.utc), SPEC_BODY.decode()
    )
    assert ref == SPEC_SIG
    # Any change of id, timestamp or body changes the signature.
    assert _core.sign_standard(key, SPEC_ID + "x", SPEC_TS, SPEC_BODY) != SPEC_SIG
    assert _core.sign_standard(key, SPEC_ID, SPEC_TS + 1, SPEC_BODY) != SPEC_SIG
    assert _core.sign_standard(key, SPEC_ID, SPEC_TS, SPEC_BODY + b" ") != SPEC_SIG


def test_spec_vector_with_verify_at_a_fixed_now() -> None:
    headers = {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TS), "webhook-signature": SPEC_SIG}
    assert verify(SPEC_BODY, headers, SPEC_SECRET, now=SPEC_TS) == {"test": 2432232314}
    assert verify(SPEC_BODY, headers, SPEC_SECRET, now=SPEC_TS + 299) == {"test": 2432232314}
    tampered = dict(headers, **{"webhook-signature": SPEC_SIG[:-1] + "A"})
    assert SPEC_SIG[-1] != "A"
    with pytest.raises(SignatureError, match="no webhook-signature matches"):
        verify(SPEC_BODY, tampered, SPEC_SECRET, now=SPEC_TS)
    # The vector fails against now (2021 is far outside the tolerance).
    with pytest.raises(SignatureError, match="old"):
        verify(SPEC_BODY, headers, SPEC_SECRET)


def test_unpadded_whsec_secret_decodes_to_the_same_key() -> None:
    raw = bytes(range(1, 18))  # 17 bytes: base64 needs one "=" of padding
    padded = "whsec_" + base64.b64encode(raw).decode()
    assert padded.endswith("=") and not padded.endswith("==")
    unpadded = padded.rstrip("=")
    assert standard_key(padded) == standard_key(unpadded) == raw
    raw2 = bytes(range(1, 17))  # 16 bytes: two "=" of padding
    assert standard_key("whsec_" + base64.b64encode(raw2).decode().rstrip("=")) == raw2
    # A secret without the prefix is used as its UTF-8 bytes.
    assert standard_key("plain-sécret") == "plain-sécret".encode()
    # Not base64 after the prefix: refused up front.
    with pytest.raises(ValueError, match="whsec_"):
        NotifierConfig(signing_secret="whsec_not*base64!")
    with pytest.raises(ValueError, match="whsec_"):
        standard_key("whsec_a")  # 6 bits are not a byte


def test_unpadded_whsec_secret_on_a_real_delivery(make_notifier, make_receiver) -> None:
    raw = b"seventeen bytes!!"
    assert len(raw) == 17
    padded = "whsec_" + base64.b64encode(raw).decode()
    unpadded = padded.rstrip("=")
    receiver = make_receiver(secret=unpadded)
    n = make_notifier(signing_secret=unpadded, signature_scheme="standard")
    event = JobEvent(JobStatus.COMPLETED, result={"rows": 1})
    n.notify("unpadded", event, receiver.url_for())
    assert n.flush(5)
    (req,) = receiver.requests
    assert req.verified is True
    assert req.body == body_of("unpadded", event)
    h = req.headers
    assert h["webhook-signature"] == expected_v1(raw, h["webhook-id"], h["webhook-timestamp"], req.body)
    payload = {"job_id": "unpadded", "event": event.to_dict()}
    assert verify(req.body, h, unpadded) == payload
    assert verify(req.body, h, padded) == payload
    assert reference_verify(padded, req.body, h) == payload
    assert reference_verify(unpadded, req.body, h) == payload


# -- real deliveries pass the reference verifier -----------------------------------------------
@pytest.mark.parametrize("secret", [SPEC_SECRET, "plain-secret-not-base64"])
def test_real_delivery_passes_the_pypi_reference_verifier(make_notifier, make_receiver, secret) -> None:
    receiver = make_receiver(secret=secret)
    n = make_notifier(signing_secret=secret)
    event = JobEvent(JobStatus.PROCESSING, progress=40, result={"note": "héllo ✓"})
    n.notify("ref-job", event, receiver.url_for("/std"))
    assert n.flush(5)
    (req,) = receiver.requests
    assert req.verified is True
    expected_payload = {"job_id": "ref-job", "event": event.to_dict()}
    # The reference decodes a str secret as base64 (prefix or not): give it
    # the key bytes for a plain secret, as the issue specifies (raw UTF-8).
    ref_secret: str | bytes = secret if secret.startswith("whsec_") else secret.encode()
    assert reference_verify(ref_secret, req.body, req.headers) == expected_payload
    assert verify(req.body, req.headers, secret) == expected_payload
    h = req.headers
    assert h["webhook-signature"] == expected_v1(
        standard_key(secret), h["webhook-id"], h["webhook-timestamp"], req.body
    )
    # The reference rejects it under another secret.
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        reference_verify(b"another key", req.body, req.headers)


# -- schemes ---------------------------------------------------------------------------------------
BASE_HEADERS = {"host", "user-agent", "accept", "content-type", "content-length", "x-job-id"}


@pytest.mark.parametrize(
    ("scheme", "present", "absent"),
    [
        ("blueprint", SEED_HEADERS, WEBHOOK_HEADERS),
        ("standard", WEBHOOK_HEADERS, SEED_HEADERS),
        ("both", SEED_HEADERS | WEBHOOK_HEADERS, set()),
    ],
)
def test_signature_scheme_selects_the_headers(make_notifier, make_receiver, scheme, present, absent) -> None:
    receiver = make_receiver(secret=SPEC_SECRET)
    n = make_notifier(signing_secret=SPEC_SECRET, signature_scheme=scheme)
    assert n.config.signature_scheme == scheme
    event = JobEvent(JobStatus.COMPLETED, timestamp=1_700_000_000)
    n.notify("scheme-job", event, receiver.url_for())
    assert n.flush(5)
    (req,) = receiver.requests
    names = {name.lower() for name, _ in req.headers.raw}
    assert names == BASE_HEADERS | present, sorted(names)
    assert not names & absent
    assert req.verified is True
    assert verify(req.body, req.headers, SPEC_SECRET) == {"job_id": "scheme-job", "event": event.to_dict()}
    if "x-webhook-signature" in present:
        # The seed scheme keys HMAC with the secret's UTF-8 bytes, whsec_ or not.
        assert req.signature == compute_signature(SPEC_SECRET, req.headers["X-Webhook-Timestamp"], req.body)
    if "webhook-signature" in present:
        h = req.headers
        assert WEBHOOK_ID.match(h["webhook-id"]), h["webhook-id"]
        assert h["webhook-signature"] == expected_v1(
            standard_key(SPEC_SECRET), h["webhook-id"], h["webhook-timestamp"], req.body
        )
        reference_verify(SPEC_SECRET, req.body, h)
    if scheme == "both":
        assert req.headers["webhook-timestamp"] == req.headers["X-Webhook-Timestamp"]


def test_default_scheme_is_both_and_unknown_schemes_are_refused() -> None:
    assert NotifierConfig().signature_scheme == "both"
    for bad in ("Standard", "", "hmac", "blueprint,standard"):
        with pytest.raises(ValueError, match="signature_scheme"):
            NotifierConfig(signature_scheme=bad)


# -- webhook-id ------------------------------------------------------------------------------------
def test_webhook_id_is_identical_across_retries(make_notifier, make_receiver) -> None:
    receiver = make_receiver(secret=SPEC_SECRET)
    receiver.respond_with(500, times=2)
    n = make_notifier(signing_secret=SPEC_SECRET, max_retries=2, retry_base_ms=10)
    n.notify("retry-id", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    reqs = receiver.requests
    assert [r.status for r in reqs] == [500, 500, 200]
    ids = {r.headers["webhook-id"] for r in reqs}
    assert len(ids) == 1, ids
    for r in reqs:
        # Each attempt is signed anew, over its own timestamp, with the same id.
        assert r.verified is True
        reference_verify(SPEC_SECRET, r.body, r.headers)
    assert n.dead_letters() == []


def test_webhook_id_of_a_dead_letter_is_the_one_sent(make_notifier, make_receiver) -> None:
    receiver = make_receiver(secret=SPEC_SECRET)
    receiver.respond_with(500)
    n = make_notifier(signing_secret=SPEC_SECRET, max_retries=1, retry_base_ms=10)
    n.notify("dead-id", JobEvent(JobStatus.FAILED, error="boom"), receiver.url_for())
    assert n.flush(5)
    (dead,) = n.dead_letters()
    assert [r.headers["webhook-id"] for r in receiver.requests] == [dead.webhook_id] * 2


def test_webhook_id_is_unique_per_event_and_per_notifier(make_notifier, make_receiver) -> None:
    receiver = make_receiver(secret=SPEC_SECRET)
    a = make_notifier(signing_secret=SPEC_SECRET)
    b = make_notifier(signing_secret=SPEC_SECRET)
    for i in range(3):
        a.notify("same-job", JobEvent(JobStatus.PROCESSING, progress=i), receiver.url_for())
    a.notify("other-job", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    # Identical events (same job, same body): still distinct ids.
    same = JobEvent(JobStatus.QUEUED, timestamp=1_700_000_000)
    a.notify("dup", same, receiver.url_for())
    a.notify("dup", same, receiver.url_for())
    b.notify("same-job", JobEvent(JobStatus.PROCESSING, progress=0), receiver.url_for())
    assert a.flush(5) and b.flush(5)
    reqs = receiver.requests
    assert len(reqs) == 7
    ids = [r.headers["webhook-id"] for r in reqs]
    assert len(set(ids)) == 7, ids
    assert all(WEBHOOK_ID.match(i) for i in ids), ids
    assert all(r.verified for r in reqs)


# -- secret rotation ---------------------------------------------------------------------------------
OLD = "whsec_" + base64.b64encode(b"old-key-0123456789abcdef").decode()
NEW = "whsec_" + base64.b64encode(b"new-key-fedcba9876543210").decode()


def test_rotation_sends_one_signature_per_live_secret(make_notifier, make_receiver) -> None:
    receiver = make_receiver(secret=None)
    n = make_notifier(signing_secret=OLD)
    n.rotate_secret(NEW, overlap_secs=86_400)
    event = JobEvent(JobStatus.COMPLETED, result={"rotated": True})
    n.notify("rot", event, receiver.url_for())
    assert n.flush(5)
    (req,) = receiver.requests
    h = req.headers
    sigs = v1_signatures(h["webhook-signature"])
    assert len(sigs) == 2, sigs
    ts, msg_id = h["webhook-timestamp"], h["webhook-id"]
    assert set(sigs) == {
        expected_v1(standard_key(NEW), msg_id, ts, req.body),
        expected_v1(standard_key(OLD), msg_id, ts, req.body),
    }
    payload = {"job_id": "rot", "event": event.to_dict()}
    # Each secret verifies on its own: receivers switch at their pace.
    assert verify(req.body, h, OLD) == payload
    assert verify(req.body, h, NEW) == payload
    assert verify(req.body, h, ["whsec_" + base64.b64encode(b"unrelated").decode(), NEW]) == payload
    assert reference_verify(OLD, req.body, h) == payload
    assert reference_verify(NEW, req.body, h) == payload
    # The seed header carries the current (new) secret's signature only.
    assert req.signature == compute_signature(NEW, h["X-Webhook-Timestamp"], req.body)
    assert req.signature != compute_signature(OLD, h["X-Webhook-Timestamp"], req.body)
    assert n.sign_payload(req.body, int(h["X-Webhook-Timestamp"])) == req.signature.removeprefix("sha256=")
    # A receiver that only knows the old secret and checks the seed header fails:
    # only webhook-signature carries the old one.
    seed_only = {k: v for k, v in h.items() if not k.startswith("webhook-")}
    with pytest.raises(SignatureError):
        verify(req.body, seed_only, OLD)
    assert verify(req.body, seed_only, NEW) == payload


def test_rotation_with_zero_overlap_drops_the_old_secret_at_once(make_notifier, make_receiver) -> None:
    receiver = make_receiver(secret=NEW)
    n = make_notifier(signing_secret=OLD)
    n.rotate_secret(NEW, overlap_secs=0)
    n.notify("rot0", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    (req,) = receiver.requests
    h = req.headers
    assert v1_signatures(h["webhook-signature"]) == [
        expected_v1(standard_key(NEW), h["webhook-id"], h["webhook-timestamp"], req.body)
    ]
    assert req.verified is True
    with pytest.raises(SignatureError):
        verify(req.body, h, OLD)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        reference_verify(OLD, req.body, h)


def test_old_secret_stops_signing_when_the_overlap_ends(make_notifier, make_receiver) -> None:
    """Each attempt is signed with the secrets live at its time: the first
    attempt (inside a 2 s overlap) carries both signatures; the retry, held
    back 3 s by Retry-After, only the new one."""
    receiver = make_receiver(secret=NEW)
    receiver.respond_with(503, headers={"Retry-After": "3"}, times=1)
    n = make_notifier(signing_secret=OLD, max_retries=1, retry_base_ms=10)
    n.rotate_secret(NEW, overlap_secs=2)
    n.notify("expiring", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(8)
    first, second = receiver.requests
    assert (first.status, second.status) == (503, 200)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert len(v1_signatures(first.headers["webhook-signature"])) == 2
    verify(first.body, first.headers, OLD)
    verify(first.body, first.headers, NEW)
    h = second.headers
    assert v1_signatures(h["webhook-signature"]) == [
        expected_v1(standard_key(NEW), h["webhook-id"], h["webhook-timestamp"], second.body)
    ]
    with pytest.raises(SignatureError):
        verify(second.body, h, OLD)
    assert second.verified is True
    # A later rotation does not bring the expired secret back.
    third = "whsec_" + base64.b64encode(b"third-key").decode()
    n.rotate_secret(third, overlap_secs=60)
    n.notify("after", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    last = receiver.requests[-1]
    sigs = v1_signatures(last.headers["webhook-signature"])
    assert len(sigs) == 2
    verify(last.body, last.headers, third)
    verify(last.body, last.headers, NEW)
    with pytest.raises(SignatureError):
        verify(last.body, last.headers, OLD)


def test_rotation_keeps_at_most_eight_live_secrets(make_notifier, make_receiver) -> None:
    secrets = [f"secret-{i}" for i in range(11)]
    receiver = make_receiver(secret=secrets[-1])
    n = make_notifier(signing_secret=secrets[0])
    for s in secrets[1:]:
        n.rotate_secret(s, overlap_secs=3600)
    n.notify("many", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    (req,) = receiver.requests
    h = req.headers
    sigs = v1_signatures(h["webhook-signature"])
    assert len(sigs) == 8, sigs
    live = secrets[-8:]  # the current one and the seven most recent before it
    assert sigs == [
        expected_v1(s.encode(), h["webhook-id"], h["webhook-timestamp"], req.body) for s in reversed(live)
    ]
    for s in live:
        verify(req.body, h, s)
    for s in secrets[:3]:
        with pytest.raises(SignatureError):
            verify(req.body, h, s)
    assert req.signature == compute_signature(secrets[-1], h["X-Webhook-Timestamp"], req.body)


def test_rotating_to_the_same_secret_does_not_duplicate_it(make_notifier, make_receiver) -> None:
    receiver = make_receiver(secret=NEW)
    n = make_notifier(signing_secret=OLD)
    n.rotate_secret(NEW)
    n.rotate_secret(NEW)
    n.rotate_secret(OLD)
    n.rotate_secret(NEW)
    n.notify("dedupe", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    (req,) = receiver.requests
    h = req.headers
    assert v1_signatures(h["webhook-signature"]) == [
        expected_v1(standard_key(NEW), h["webhook-id"], h["webhook-timestamp"], req.body),
        expected_v1(standard_key(OLD), h["webhook-id"], h["webhook-timestamp"], req.body),
    ]


def test_rotate_secret_validates_its_arguments(make_notifier, make_receiver) -> None:
    receiver = make_receiver(secret=OLD)
    n = make_notifier(signing_secret=OLD)
    with pytest.raises(ValueError, match="whsec_"):
        n.rotate_secret("whsec_***not base64***")
    with pytest.raises(ValueError):
        n.rotate_secret("")
    with pytest.raises(TypeError):
        n.rotate_secret(b"bytes-secret")  # type: ignore[arg-type]
    for bad in (-1, 30 * 86_400 + 1, float("nan"), True):
        with pytest.raises(ValueError, match="overlap_secs"):
            n.rotate_secret(NEW, overlap_secs=bad)
    # Nothing changed: deliveries are still signed by OLD alone.
    n.notify("unchanged", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    (req,) = receiver.requests
    assert req.verified is True
    assert len(v1_signatures(req.headers["webhook-signature"])) == 1
    with pytest.raises(SignatureError):
        verify(req.body, req.headers, NEW)


def test_rotation_with_the_blueprint_scheme_signs_with_the_new_secret(make_notifier, make_receiver) -> None:
    receiver = make_receiver(secret="new-seed")
    n = make_notifier(signing_secret="old-seed", signature_scheme="blueprint")
    n.rotate_secret("new-seed", overlap_secs=3600)
    n.notify("seed", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    (req,) = receiver.requests
    assert "webhook-signature" not in req.headers
    assert req.verified is True
    assert req.signature == compute_signature("new-seed", req.headers["X-Webhook-Timestamp"], req.body)


def test_rotate_secret_gives_a_secretless_notifier_a_key(make_notifier, make_receiver) -> None:
    receiver = make_receiver(secret=NEW)
    n = make_notifier(signing_secret="")
    with pytest.raises(ValueError, match="signing_secret"):
        n.notify("no-key", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    n.rotate_secret(NEW, overlap_secs=3600)
    n.notify("keyed", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(5)
    (req,) = receiver.requests
    assert req.verified is True
    # The empty secret was never live: one signature only.
    assert len(v1_signatures(req.headers["webhook-signature"])) == 1
