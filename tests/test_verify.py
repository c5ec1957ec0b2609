"""Receiver side: ``blueprint_notify.verify(body, headers, secret, *,
tolerance=300)`` over both signature schemes.

Signed headers are built here with hmac/base64 (independently of the code
under test); a few tests also verify real deliveries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator, Mapping

import httpx
import pytest
from starlette.datastructures import Headers as StarletteHeaders

import blueprint_notify
from blueprint_notify import JobEvent, JobStatus, SignatureError, verify
from blueprint_notify import _verify as verify_module
from blueprint_notify.testing import Headers as ReceiverHeaders

NOW = 1_700_000_000
SECRET = "whsec_" + base64.b64encode(b"receiver-side-key-32-bytes-long!").decode()
KEY = b"receiver-side-key-32-bytes-long!"
SEED = "seed-secret"
BODY = b'{"job_id":"job-1","event":{"status":"completed","progress":100,"timestamp":1700000000}}'
PAYLOAD = json.loads(BODY)


def std_headers(
    body: bytes = BODY, *, key: bytes = KEY, ts: int = NOW, msg_id: str = "msg_abc123", extra_keys: tuple[bytes, ...] = ()
) -> dict[str, str]:
    sigs = []
    for k in (key, *extra_keys):
        mac = hmac.new(k, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
        sigs.append("v1," + base64.b64encode(mac).decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": " ".join(sigs)}


def seed_headers(body: bytes = BODY, *, secret: str = SEED, ts: int = NOW) -> dict[str, str]:
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Webhook-Timestamp": str(ts), "X-Webhook-Signature": "sha256=" + mac}


def test_public_api() -> None:
    assert blueprint_notify.verify is verify
    assert blueprint_notify.SignatureError is SignatureError
    assert issubclass(SignatureError, Exception)


# -- both schemes ---------------------------------------------------------------------------------------------
def test_standard_scheme() -> None:
    assert verify(BODY, std_headers(), SECRET, now=NOW) == PAYLOAD


def test_standard_scheme_with_a_plain_secret_uses_its_utf8_bytes() -> None:
    headers = std_headers(key="plain-sécret".encode())
    assert verify(BODY, headers, "plain-sécret", now=NOW) == PAYLOAD
    with pytest.raises(SignatureError):
        verify(BODY, headers, "plain-secret", now=NOW)


def test_blueprint_scheme() -> None:
    assert verify(BODY, seed_headers(), SEED, now=NOW) == PAYLOAD
    with pytest.raises(SignatureError, match="X-Webhook-Signature"):
        verify(BODY, seed_headers(secret="other"), SEED, now=NOW)


def test_both_schemes_on_one_request() -> None:
    # The seed scheme keys HMAC with the secret's UTF-8 bytes, the standard
    # one with its whsec_ decoding (KEY).
    headers = {**std_headers(), **seed_headers(secret=SECRET)}
    assert verify(BODY, headers, SECRET, now=NOW) == PAYLOAD


def test_several_secrets_during_a_rotation() -> None:
    old_key, new_key = b"old-key", b"new-key"
    old = "whsec_" + base64.b64encode(old_key).decode()
    new = "whsec_" + base64.b64encode(new_key).decode()
    both = std_headers(key=new_key, extra_keys=(old_key,))
    assert verify(BODY, both, old, now=NOW) == PAYLOAD
    assert verify(BODY, both, new, now=NOW) == PAYLOAD
    only_old = std_headers(key=old_key)
    assert verify(BODY, only_old, [new, old], now=NOW) == PAYLOAD
    assert verify(BODY, only_old, (old,), now=NOW) == PAYLOAD
    assert verify(BODY, only_old, iter([new, old]), now=NOW) == PAYLOAD
    with pytest.raises(SignatureError):
        verify(BODY, only_old, [new, "whsec_" + base64.b64encode(b"third").decode()], now=NOW)
    # Seed scheme with several secrets.
    assert verify(BODY, seed_headers(secret="b"), ["a", "b"], now=NOW) == PAYLOAD
    with pytest.raises(SignatureError):
        verify(BODY, seed_headers(secret="c"), ["a", "b"], now=NOW)


def test_signatures_of_other_versions_are_ignored() -> None:
    headers = std_headers()
    v1 = headers["webhook-signature"]
    headers["webhook-signature"] = "v1a,bogus " + v1.replace("v1,", "v2,")
    with pytest.raises(SignatureError):
        verify(BODY, headers, SECRET, now=NOW)
    headers["webhook-signature"] = "v1a,bogus " + v1
    assert verify(BODY, headers, SECRET, now=NOW) == PAYLOAD


# -- tolerance ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["standard", "blueprint"])
def test_tolerance_past_and_future(scheme) -> None:
    def headers(ts: int) -> dict[str, str]:
        return std_headers(ts=ts) if scheme == "standard" else seed_headers(ts=ts)

    secret = SECRET if scheme == "standard" else SEED
    assert verify(BODY, headers(NOW - 300), secret, now=NOW) == PAYLOAD
    assert verify(BODY, headers(NOW + 300), secret, now=NOW) == PAYLOAD
    with pytest.raises(SignatureError, match=r"301 s old .*tolerance 300"):
        verify(BODY, headers(NOW - 301), secret, now=NOW)
    with pytest.raises(SignatureError, match=r"301 s in the future"):
        verify(BODY, headers(NOW + 301), secret, now=NOW)
    # A custom tolerance.
    assert verify(BODY, headers(NOW - 3000), secret, now=NOW, tolerance=3600) == PAYLOAD
    with pytest.raises(SignatureError, match="old"):
        verify(BODY, headers(NOW - 11), secret, now=NOW, tolerance=10)
    with pytest.raises(SignatureError, match="future"):
        verify(BODY, headers(NOW + 11), secret, now=NOW, tolerance=10)


def test_tolerance_against_the_real_clock() -> None:
    now = int(time.time())
    assert verify(BODY, std_headers(ts=now), SECRET) == PAYLOAD
    with pytest.raises(SignatureError, match="old"):
        verify(BODY, std_headers(ts=now - 3600), SECRET)


# -- missing and malformed headers ----------------------------------------------------------------------------
def test_no_signature_headers() -> None:
    with pytest.raises(SignatureError, match="no signature headers"):
        verify(BODY, {}, SECRET, now=NOW)
    with pytest.raises(SignatureError, match="no signature headers"):
        verify(BODY, {"Content-Type": "application/json", "webhook-id": "msg_1"}, SECRET, now=NOW)


@pytest.mark.parametrize(
    ("drop", "message"),
    [("webhook-id", "missing webhook-id"), ("webhook-timestamp", "missing webhook-timestamp")],
)
def test_missing_standard_header(drop, message) -> None:
    headers = std_headers()
    del headers[drop]
    with pytest.raises(SignatureError, match=message):
        verify(BODY, headers, SECRET, now=NOW)


def test_missing_seed_timestamp() -> None:
    headers = seed_headers()
    del headers["X-Webhook-Timestamp"]
    with pytest.raises(SignatureError, match="missing X-Webhook-Timestamp"):
        verify(BODY, headers, SEED, now=NOW)


@pytest.mark.parametrize("ts", ["", "abc", "-5", "1.5", "1e9", " 1700000000", "0x10"])
def test_malformed_timestamps(ts) -> None:
    headers = std_headers()
    headers["webhook-timestamp"] = ts
    with pytest.raises(SignatureError):
        verify(BODY, headers, SECRET, now=NOW)
    seed = seed_headers()
    seed["X-Webhook-Timestamp"] = ts
    with pytest.raises(SignatureError):
        verify(BODY, seed, SEED, now=NOW)


def test_unicode_digit_timestamp_is_a_signature_error() -> None:
    headers = std_headers()
    headers["webhook-timestamp"] = "²"
    with pytest.raises(SignatureError):
        verify(BODY, headers, SECRET, now=NOW)


def test_non_ascii_digit_timestamp_is_rejected() -> None:
    headers = std_headers()
    headers["webhook-timestamp"] = str(NOW).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    with pytest.raises(SignatureError):
        verify(BODY, headers, SECRET, now=NOW)


def test_bad_seed_signature_format() -> None:
    headers = seed_headers()
    headers["X-Webhook-Signature"] = headers["X-Webhook-Signature"].replace("sha256=", "md5=")
    with pytest.raises(SignatureError, match="sha256="):
        verify(BODY, headers, SEED, now=NOW)
    headers["X-Webhook-Signature"] = "sha256="
    with pytest.raises(SignatureError):
        verify(BODY, headers, SEED, now=NOW)


@pytest.mark.parametrize("scheme", ["standard", "blueprint"])
def test_non_ascii_signature_header_is_a_signature_error(scheme) -> None:
    if scheme == "standard":
        headers, secret = std_headers(), SECRET
        headers["webhook-signature"] = "v1,\u00e9"
    else:
        headers, secret = seed_headers(), SEED
        headers["X-Webhook-Signature"] = "sha256=\u00e9"
    with pytest.raises(SignatureError):
        verify(BODY, headers, secret, now=NOW)


# -- tampering ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["standard", "blueprint"])
def test_tampered_body(scheme) -> None:
    headers, secret = (std_headers(), SECRET) if scheme == "standard" else (seed_headers(), SEED)
    tampered = BODY.replace(b"100", b"101")
    assert tampered != BODY
    with pytest.raises(SignatureError):
        verify(tampered, headers, secret, now=NOW)
    with pytest.raises(SignatureError):
        verify(BODY + b" ", headers, secret, now=NOW)


def test_tampered_id_or_timestamp() -> None:
    headers = std_headers()
    with pytest.raises(SignatureError):
        verify(BODY, {**headers, "webhook-id": "msg_other"}, SECRET, now=NOW)
    with pytest.raises(SignatureError):
        verify(BODY, {**headers, "webhook-timestamp": str(NOW + 1)}, SECRET, now=NOW)
    seed = seed_headers()
    with pytest.raises(SignatureError):
        verify(BODY, {**seed, "X-Webhook-Timestamp": str(NOW + 1)}, SEED, now=NOW)


def test_signed_body_must_be_a_json_object() -> None:
    for body, message in ((b"not json", "not JSON"), (b"[1, 2]", "not a JSON object"), (b"\xff\xfe", "not JSON")):
        with pytest.raises(SignatureError, match=message):
            verify(body, std_headers(body), SECRET, now=NOW)


# -- argument types ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [BODY.decode(), None, PAYLOAD, 123])
def test_body_must_be_bytes(body) -> None:
    with pytest.raises(TypeError, match="raw request bytes"):
        verify(body, std_headers(), SECRET, now=NOW)  # type: ignore[arg-type]


def test_bytes_like_bodies_are_accepted() -> None:
    assert verify(bytearray(BODY), std_headers(), SECRET, now=NOW) == PAYLOAD
    assert verify(memoryview(BODY), std_headers(), SECRET, now=NOW) == PAYLOAD


@pytest.mark.parametrize("secret", ["", [], [""], b"bytes", ["ok", 1]])
def test_secret_must_be_text(secret) -> None:
    with pytest.raises(TypeError, match="secret must be a non-empty str"):
        verify(BODY, std_headers(), secret, now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("secret", [None, 42])
def test_secret_of_another_type_is_a_type_error(secret) -> None:
    with pytest.raises(TypeError):
        verify(BODY, std_headers(), secret, now=NOW)  # type: ignore[arg-type]


# -- header mappings -------------------------------------------------------------------------------------------
class _CaseInsensitive(Mapping[str, str]):
    """A minimal case-insensitive mapping, like a framework's headers."""

    def __init__(self, items: dict[str, str]) -> None:
        self._items = {k.title(): v for k, v in items.items()}

    def __getitem__(self, key: str) -> str:
        for k, v in self._items.items():
            if k.lower() == key.lower():
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def _mappings(headers: dict[str, str]) -> list[Mapping[str, str]]:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    return [
        headers,
        {k.upper(): v for k, v in headers.items()},
        {k.title(): v for k, v in headers.items()},
        httpx.Headers(headers),
        StarletteHeaders(raw=[(k.lower(), v) for k, v in raw]),
        ReceiverHeaders(list(headers.items())),
        _CaseInsensitive(headers),
    ]


@pytest.mark.parametrize("scheme", ["standard", "blueprint"])
def test_any_header_mapping(scheme) -> None:
    headers, secret = (std_headers(), SECRET) if scheme == "standard" else (seed_headers(), SEED)
    for mapping in _mappings(headers):
        assert verify(BODY, mapping, secret, now=NOW) == PAYLOAD, type(mapping)


def test_real_deliveries_verify_from_framework_headers(make_notifier, make_receiver) -> None:
    receiver = make_receiver(secret=SECRET)
    n = make_notifier(signing_secret=SECRET)
    event = JobEvent(JobStatus.FAILED, error="disk full ✗")
    n.notify("real", event, receiver.url_for())
    assert n.flush(5)
    (req,) = receiver.requests
    expected = {"job_id": "real", "event": event.to_dict()}
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in req.headers.raw]
    for mapping in (req.headers, httpx.Headers(list(req.headers.raw)), StarletteHeaders(raw=raw)):
        assert verify(req.body, mapping, SECRET) == expected
    # Only the seed headers (a receiver behind a proxy that drops webhook-*).
    seed_only = {k: v for k, v in req.headers.items() if k.lower().startswith("x-webhook-")}
    assert verify(req.body, seed_only, SECRET) == expected


# -- constant time -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["standard", "blueprint"])
def test_signatures_are_compared_in_constant_time(monkeypatch, scheme) -> None:
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(verify_module.hmac, "compare_digest", spy)
    if scheme == "standard":
        headers, secrets = std_headers(), ["whsec_" + base64.b64encode(b"x").decode(), SECRET]
    else:
        headers, secrets = seed_headers(), ["x", SEED]
    assert verify(BODY, headers, secrets, now=NOW) == PAYLOAD
    # Every secret is compared (no early exit that would tell which matched),
    # always through hmac.compare_digest.
    assert len(calls) >= len(secrets)
    calls.clear()
    with pytest.raises(SignatureError):
        verify(BODY.replace(b"100", b"101"), headers, secrets, now=NOW)
    assert len(calls) >= len(secrets)
