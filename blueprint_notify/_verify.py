"""Receiver side: verify a delivery's signature over the raw body bytes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ._config import standard_key

__all__ = ["verify", "SignatureError"]


class SignatureError(ValueError):
    """The delivery is not authentic, or too old or too new to trust."""


def _secrets(secret: str | Iterable[str]) -> list[str]:
    if isinstance(secret, str):
        items = [secret]
    elif isinstance(secret, Iterable) and not isinstance(secret, (bytes, bytearray)):
        items = list(secret)
    else:
        items = []
    if not items or not all(isinstance(s, str) and s for s in items):
        raise TypeError("secret must be a non-empty str or a list of them")
    return items


def _same(expected: str, offered: str) -> bool:
    """Constant-time comparison; a non-ASCII offer is simply a mismatch."""
    return offered.isascii() and hmac.compare_digest(expected.encode("ascii"), offered.encode("ascii"))


def _timestamp(value: str | None, name: str, tolerance: float, now: float) -> int:
    if value is None:
        raise SignatureError(f"missing {name} header")
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise SignatureError(f"{name} is not an integer unix timestamp: {value[:40]!r}")
    ts = int(value)
    if ts < now - tolerance:
        raise SignatureError(f"{name} is {int(now - ts)} s old (tolerance {tolerance:g} s): stale or replayed")
    if ts > now + tolerance:
        raise SignatureError(f"{name} is {int(ts - now)} s in the future (tolerance {tolerance:g} s)")
    return ts


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secret: str | Iterable[str],
    *,
    tolerance: float = 300,
    now: float | None = None,
) -> dict[str, Any]:
    """Verifies a webhook and returns its parsed JSON payload.

    ``body`` must be the raw request bytes (not re-serialised JSON).
    ``headers`` may be any mapping (case-insensitive lookups are done
    here). Whichever scheme the headers carry is checked: Standard Webhooks
    (``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<b64>``,
    a ``whsec_`` secret is base64-decoded) or the blueprint scheme
    (``X-Webhook-Timestamp``, ``X-Webhook-Signature: sha256=<hex>``). Several
    secrets may be given (during a rotation). Comparisons are constant time.
    Raises :class:`SignatureError` on a bad signature, a timestamp more
    than ``tolerance`` seconds away from now or a body that is not a JSON
    object; TypeError for arguments of the wrong type.
    """
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise TypeError("body must be the raw request bytes")
    body = bytes(body)
    secrets = _secrets(secret)
    if not isinstance(headers, Mapping):
        raise TypeError(f"headers must be a mapping of header names to values, not {type(headers).__name__}")
    h = {str(k).lower(): str(v) for k, v in headers.items()}
    now = time.time() if now is None else now
    if "webhook-signature" in h:
        msg_id = h.get("webhook-id")
        if not msg_id:
            raise SignatureError("missing webhook-id header")
        ts = _timestamp(h.get("webhook-timestamp"), "webhook-timestamp", tolerance, now)
        try:
            signed = f"{msg_id}.{ts}.".encode() + body
        except UnicodeEncodeError:  # e.g. surrogate-escaped header bytes
            raise SignatureError("webhook-id is not valid text") from None
        offered = [p.partition(",")[2] for p in h["webhook-signature"].split() if p.startswith("v1,")]
        ok = False
        for s in secrets:
            expected = base64.b64encode(hmac.new(standard_key(s), signed, hashlib.sha256).digest()).decode()
            for sig in offered:
                ok |= _same(expected, sig)
        if not ok:
            raise SignatureError("no webhook-signature matches the secret")
    elif "x-webhook-signature" in h:
        ts = _timestamp(h.get("x-webhook-timestamp"), "X-Webhook-Timestamp", tolerance, now)
        scheme, _, offered_hex = h["x-webhook-signature"].partition("=")
        if scheme != "sha256":
            raise SignatureError("X-Webhook-Signature must look like sha256=<hex>")
        signed = f"{ts}.".encode() + body
        ok = False
        for s in secrets:
            expected = hmac.new(s.encode("utf-8"), signed, hashlib.sha256).hexdigest()
            ok |= _same(expected, offered_hex.strip())
        if not ok:
            raise SignatureError("X-Webhook-Signature does not match the secret")
    else:
        raise SignatureError("no signature headers (webhook-signature or X-Webhook-Signature)")
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise SignatureError(f"signed body is not JSON: {exc}") from None
    except RecursionError:
        raise SignatureError("signed body is JSON nested too deeply to parse") from None
    if not isinstance(payload, dict):
        raise SignatureError("signed body is not a JSON object")
    return payload
