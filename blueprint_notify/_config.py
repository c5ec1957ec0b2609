"""NotifierConfig: every tunable, with the reference notifier's defaults."""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, fields

from ._broker import check_broker_url
from typing import Any, Optional, Union

__all__ = ["NotifierConfig", "standard_key"]

__version__ = "0.1.0"


_SCHEMES = {"blueprint": 1, "standard": 2, "both": 3}


def standard_key(secret: str, name: str = "signing_secret") -> bytes:
    """The Standard Webhooks key of a secret: base64 after a ``whsec_``
    prefix (padding optional), else the secret's UTF-8 bytes. ValueError
    naming ``name`` for a bad one."""
    if not secret.startswith("whsec_"):
        return _text(name, secret).encode("utf-8")
    raw = secret[len("whsec_") :]
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} starts with 'whsec_' but the rest is not base64") from None
    if not key:
        raise ValueError(f"{name} 'whsec_' holds no key (nothing after the prefix)")
    return key


def _text(name: str, value: str) -> str:
    """value, if it has a UTF-8 form (no lone surrogates); else ValueError."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} must be valid Unicode text (it holds a lone surrogate)") from None
    return value


def _int_in(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value}")


def _secs_in(name: str, value: Any, lo: float, hi: float, *, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if value != value or value > hi or value < lo or (open_low and value == lo):
        low = f"greater than {lo}" if open_low else f"at least {lo}"
        raise ValueError(f"{name} must be {low} and at most {hi}, got {value}")


@dataclass(frozen=True, slots=True)
class NotifierConfig:
    """Configuration of a JobNotifier. Validated on construction.

    The first five fields and their defaults are the reference notifier's.
    """

    #: HMAC-SHA256 key (its UTF-8 bytes). Required for webhooks.
    signing_secret: str = ""
    #: Extra attempts after the first one failed.
    max_retries: int = 3
    #: Backoff before retry n is retry_base_ms * 2**(n-1), jittered +-20%.
    retry_base_ms: int = 1000
    #: Per-attempt timeout, connection included.
    timeout_secs: float = 10
    #: Events a subscriber may fall behind before it is told it lagged.
    sse_capacity: int = 16
    #: Live channels (registered or subscribed, non-terminal jobs) at most.
    max_channels: int = 10_000
    #: Dead letters kept; the oldest is evicted first.
    max_dead_letters: int = 1000
    #: Allow webhooks to loopback, private, link-local... addresses.
    allow_private_networks: bool = False
    #: Cap of a single backoff delay.
    max_retry_delay_ms: int = 300_000
    #: Concurrent connections (and transfers) in total.
    max_connections: int = 64
    #: Concurrent connections to one origin (scheme, host, port).
    max_connections_per_host: int = 16
    #: Response bytes read before the rest is discarded unread.
    max_response_bytes: int = 64 * 1024
    #: How long close() (and interpreter exit) waits for pending deliveries.
    close_timeout_secs: float = 10.0
    #: After a terminal event, how long the job's history and token stay
    #: (late or reconnecting SSE clients get the replay), in seconds.
    retention_secs: float = 300.0
    #: Signature headers: "blueprint" (X-Webhook-Signature, the reference's),
    #: "standard" (Standard Webhooks: webhook-id/-timestamp/-signature) or
    #: "both". A "whsec_" secret is base64-decoded for the standard scheme.
    signature_scheme: str = "both"
    #: User-Agent header of webhook requests.
    user_agent: str = f"blueprint-notify/{__version__}"
    #: The durable outbox: a SQLite file (WAL) holding every pending
    #: delivery and every dead letter, so a crash or a restart loses
    #: nothing; pending deliveries resume when a notifier opens it again.
    #: None keeps everything in memory. One notifier per file (locked).
    store_path: Union[str, "os.PathLike[str]", None] = None
    #: With a store: "batched" (default) group-commits writes at most 10 ms
    #: after notify() returned (a crash loses at most that window);
    #: "sync" makes notify() return only once the delivery is on disk.
    durability: str = "batched"
    #: With a store: how long delivered records are kept (seconds; 0
    #: deletes them as soon as they are delivered).
    delivered_retention_secs: float = 3600.0
    #: Redis shared by every process serving the same jobs
    #: ("redis://host:port/db", "rediss://...", "unix:///path"): tokens,
    #: events and history are seen by every process (see README, Scaling
    #: out). None: this process only.
    broker_url: Optional[str] = None
    #: Prefix of the broker's Redis keys and channels.
    broker_prefix: str = "bpn"
    #: Events held while Redis is unreachable; beyond, notify() raises
    #: BrokerError.
    broker_buffer: int = 100_000
    #: How long a live job's keys stay in Redis after its last event
    #: (a terminal event shortens it to retention_secs).
    broker_ttl_secs: float = 86_400.0

    def __post_init__(self) -> None:
        if not isinstance(self.signing_secret, str):
            raise TypeError(
                f"signing_secret must be a str, not {type(self.signing_secret).__name__}"
            )
        _int_in("max_retries", self.max_retries, 0, 1_000_000)
        _int_in("retry_base_ms", self.retry_base_ms, 0, 86_400_000)
        _secs_in("timeout_secs", self.timeout_secs, 0, 3600, open_low=True)
        _int_in("sse_capacity", self.sse_capacity, 1, 1_000_000)
        _int_in("max_channels", self.max_channels, 1, 100_000_000)
        _int_in("max_dead_letters", self.max_dead_letters, 0, 100_000_000)
        if not isinstance(self.allow_private_networks, bool):
            raise TypeError("allow_private_networks must be a bool")
        _int_in("max_retry_delay_ms", self.max_retry_delay_ms, 0, 7 * 86_400_000)
        _int_in("max_connections", self.max_connections, 1, 4096)
        _int_in("max_connections_per_host", self.max_connections_per_host, 1, 4096)
        if self.max_connections_per_host > self.max_connections:
            raise ValueError(
                "max_connections_per_host must not exceed max_connections "
                f"({self.max_connections_per_host} > {self.max_connections})"
            )
        _int_in("max_response_bytes", self.max_response_bytes, 0, 1 << 30)
        _secs_in("close_timeout_secs", self.close_timeout_secs, 0, 86_400)
        _secs_in("retention_secs", self.retention_secs, 0, 7 * 86_400)
        if not isinstance(self.signature_scheme, str) or self.signature_scheme not in _SCHEMES:
            raise ValueError(
                f"signature_scheme must be one of {', '.join(sorted(_SCHEMES))}; "
                f"got {self.signature_scheme!r}"
            )
        _text("signing_secret", self.signing_secret)
        if self.signing_secret:
            standard_key(self.signing_secret)  # a bad whsec_ secret fails here
        if not isinstance(self.user_agent, str):
            raise TypeError("user_agent must be a str")
        _text("user_agent", self.user_agent)
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in self.user_agent) or "\x00" in self.user_agent:
            raise ValueError("user_agent must not contain control characters")
        if self.store_path is not None:
            if not isinstance(self.store_path, (str, os.PathLike)):
                raise TypeError(
                    f"store_path must be a str, a path or None, not {type(self.store_path).__name__}"
                )
            path = os.fspath(self.store_path)
            if not isinstance(path, str):
                raise TypeError("store_path must be a str path, not bytes")
            if not path or path == ":memory:" or "\x00" in path:
                raise ValueError(
                    f"store_path must be a file path (None keeps deliveries in memory), got {path!r}"
                )
            try:
                os.fsencode(path)
            except UnicodeEncodeError:
                raise ValueError("store_path has no file-system encoding (a lone surrogate?)") from None
        if self.durability not in ("batched", "sync"):
            raise ValueError(f"durability must be 'batched' or 'sync', got {self.durability!r}")
        _secs_in("delivered_retention_secs", self.delivered_retention_secs, 0, 365 * 86_400)
        if self.broker_url is not None:
            check_broker_url(self.broker_url)
        if not isinstance(self.broker_prefix, str):
            raise TypeError(f"broker_prefix must be a str, not {type(self.broker_prefix).__name__}")
        if not self.broker_prefix or len(self.broker_prefix) > 64 or not all(
            c.isascii() and (c.isalnum() or c in "-_.:") for c in self.broker_prefix
        ):
            raise ValueError(
                "broker_prefix must be 1 to 64 ASCII letters, digits or '-_.:', "
                f"got {self.broker_prefix!r}"
            )
        _int_in("broker_buffer", self.broker_buffer, 1, 100_000_000)
        _secs_in("broker_ttl_secs", self.broker_ttl_secs, 0, 365 * 86_400, open_low=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
