"""Event and record types: JobStatus, JobEvent, FailedDelivery."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["JobStatus", "JobEvent", "FailedDelivery", "Attempt"]

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


class JobStatus(str, enum.Enum):
    """Job lifecycle status; values are the wire's snake_case strings."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        """True for COMPLETED, FAILED and CANCELLED: no event follows."""
        return self in _TERMINAL

    @property
    def _code(self) -> int:
        return _CODES[self]


_TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
_CODES = {status: i for i, status in enumerate(JobStatus)}
_BY_CODE = list(JobStatus)
# '{"status":"<value>"' per status: the hot path formats the rest with an
# f-string (JobStatus.value is a Python-level property, slow in a loop).
_JSON_HEAD = {status: f'{{"status":"{status.value}"' for status in JobStatus}


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _now() -> int:
    return int(time.time())


# The default of JobEvent.__init__'s timestamp: the marker the generated
# __init__ of a dataclass uses for a default_factory (its repr is <factory>,
# so the signature reads as before).
_FACTORY: Any = getattr(dataclasses, "_HAS_DEFAULT_FACTORY", object())

#: How deep a result may nest (lists and objects): far below the recursion
#: limit, so that every subscriber and receiver can parse it.
MAX_RESULT_DEPTH = 100
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]').finditer


def _json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in compact JSON text."""
    depth = deepest = 0
    for m in _JSON_TOKEN(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif c in "]}":
            depth -= 1
    return deepest
_set = object.__setattr__


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One job lifecycle event, as sent to subscribers and webhooks.

    ``status`` accepts a JobStatus or its string value. ``progress`` is an int
    from 0 to 100, ``result`` any JSON-serialisable value nested at most
    100 levels deep (checked when the event is sent: TypeError, ValueError), ``error`` a str and ``timestamp`` unix seconds (default:
    now). None fields are left out of the JSON.
    """

    status: JobStatus
    progress: int | None = None
    result: Any = None
    error: str | None = None
    timestamp: int = field(default_factory=_now)

    # Written out rather than generated: events are made in hot loops. Same
    # signature and behaviour: __post_init__ still does every check and
    # conversion, and is skipped only for a JobEvent (not a subclass) whose
    # fields are already of the checked types and ranges.
    def __init__(
        self,
        status: JobStatus,
        progress: int | None = None,
        result: Any = None,
        error: str | None = None,
        timestamp: int = _FACTORY,
    ) -> None:
        if timestamp is _FACTORY:
            timestamp = _now()
        _set(self, "status", status)
        _set(self, "progress", progress)
        _set(self, "result", result)
        _set(self, "error", error)
        _set(self, "timestamp", timestamp)
        if (
            type(self) is JobEvent
            and type(status) is JobStatus
            and type(timestamp) is int
            and timestamp >= 0
            and (progress is None or (type(progress) is int and 0 <= progress <= 100))
            and (error is None or type(error) is str)
        ):
            return
        self.__post_init__()

    def __post_init__(self) -> None:
        status = self.status
        if not isinstance(status, JobStatus):
            if not isinstance(status, str):
                raise TypeError(f"status must be a JobStatus or str, not {type(status).__name__}")
            try:
                object.__setattr__(self, "status", JobStatus(status))
            except ValueError:
                allowed = ", ".join(s.value for s in JobStatus)
                raise ValueError(f"status must be one of {allowed}; got {status!r}") from None
        progress = self.progress
        if progress is not None:
            if type(progress) is not int:
                if isinstance(progress, bool) or not isinstance(progress, int):
                    raise TypeError(f"progress must be an int or None, not {type(progress).__name__}")
                object.__setattr__(self, "progress", int(progress))
            if not 0 <= progress <= 100:
                raise ValueError(f"progress must be between 0 and 100, got {progress}")
        if self.error is not None and not isinstance(self.error, str):
            raise TypeError(f"error must be a str or None, not {type(self.error).__name__}")
        ts = self.timestamp
        if type(ts) is not int:
            if isinstance(ts, bool) or not isinstance(ts, int):
                raise TypeError(f"timestamp must be an int (unix seconds), not {type(ts).__name__}")
            object.__setattr__(self, "timestamp", int(ts))
        if ts < 0:
            raise ValueError(f"timestamp must not be negative, got {ts}")

    def to_dict(self) -> dict[str, Any]:
        """The event as a dict, None fields omitted."""
        out: dict[str, Any] = {"status": self.status.value}
        if self.progress is not None:
            out["progress"] = self.progress
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        out["timestamp"] = self.timestamp
        return out

    def to_json(self) -> str:
        """Compact JSON (the bytes sent are its UTF-8). TypeError if the
        result cannot be serialised."""
        if self.result is None and self.error is None:  # the common case, fast
            if self.progress is None:
                return f'{_JSON_HEAD[self.status]},"timestamp":{self.timestamp}}}'
            return f'{_JSON_HEAD[self.status]},"progress":{self.progress},"timestamp":{self.timestamp}}}'
        parts = ['{"status":"', self.status.value, '"']
        if self.progress is not None:
            parts += [',"progress":', str(self.progress)]
        if self.result is not None:
            try:
                encoded = _encode(self.result)
            except (TypeError, ValueError, RecursionError) as exc:
                raise TypeError(f"result is not JSON-serialisable: {exc}") from None
            if (
                len(encoded) > 2 * MAX_RESULT_DEPTH
                and encoded.count("[") + encoded.count("{") > MAX_RESULT_DEPTH  # C-speed precheck
                and _json_depth(encoded) > MAX_RESULT_DEPTH
            ):
                # Every reader must be able to parse it, on any stack.
                raise ValueError(f"result is nested more than {MAX_RESULT_DEPTH} levels deep")
            parts += [',"result":', encoded]
        if self.error is not None:
            parts += [',"error":', _encode(self.error)]
        parts += [',"timestamp":', str(self.timestamp), "}"]
        return "".join(parts)

    def _json_bytes(self) -> bytes:
        """to_json() as the UTF-8 bytes sent; ValueError naming the field
        that holds a lone surrogate (no UTF-8 form)."""
        if type(self) is JobEvent and self.result is None and self.error is None:
            # to_json()'s fast case, inlined: plain ASCII, always encodable.
            if self.progress is None:
                return f'{_JSON_HEAD[self.status]},"timestamp":{self.timestamp}}}'.encode()
            return f'{_JSON_HEAD[self.status]},"progress":{self.progress},"timestamp":{self.timestamp}}}'.encode()
        text = self.to_json()
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            bad = "error" if self.error is not None and not _utf8_ok(self.error) else "result"
            raise ValueError(
                f"{bad} must be valid Unicode text (it contains a lone surrogate, "
                "which has no UTF-8 form)"
            ) from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobEvent:
        """Builds an event from its dict form (as produced by to_dict)."""
        return cls(
            status=data["status"],
            progress=data.get("progress"),
            result=data.get("result"),
            error=data.get("error"),
            timestamp=data["timestamp"],
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> JobEvent:
        """Parses the JSON form of an event (ValueError if it is not one)."""
        try:
            return cls.from_dict(json.loads(data))
        except RecursionError:
            raise ValueError("event JSON nested too deeply to parse") from None


JobEvent.__init__.__annotations__["return"] = None  # as the generated one's



# The JSON of an event without result and error, exactly as to_json() writes
# it (JSON integers: no leading zeros, no sign).
_SIMPLE_JSON = re.compile(
    rb'\{"status":"([a-z]+)"(?:,"progress":(0|[1-9][0-9]*))?,"timestamp":(0|[1-9][0-9]*)\}'
).fullmatch
_STATUS_BY_BYTES = {status.value.encode(): status for status in JobStatus}


def _decode(data: bytes) -> JobEvent:
    """JobEvent.from_json(data) for the JSON of a published event (same
    result, same errors); without json.loads for the common shape."""
    m = _SIMPLE_JSON(data)
    if m is not None:
        name, progress, timestamp = m.groups()
        status = _STATUS_BY_BYTES.get(name)
        if status is not None:  # else from_json raises the usual ValueError
            return JobEvent(status, None if progress is None else int(progress), None, None, int(timestamp))
    return JobEvent.from_json(data)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One failed delivery attempt: when it started (unix seconds), how long
    it took, the HTTP status (0 if none) and what went wrong."""

    at: float
    duration_ms: int
    status: int
    error: str


@dataclass(frozen=True, slots=True)
class FailedDelivery:
    """A webhook that could not be delivered (a dead letter).

    ``payload`` is the exact JSON body that was sent; ``last_error`` says why
    the last attempt failed; ``failed_at`` is a unix time in seconds.
    """

    job_id: str
    url: str
    attempts: int
    last_error: str
    payload: str
    id: int = 0
    failed_at: float = 0.0
    #: The webhook-id sent with every attempt (receivers deduplicate on it).
    webhook_id: str = ""
    #: Every attempt's outcome, oldest first (the last 50 are kept).
    attempt_log: tuple[Attempt, ...] = ()

    def event(self) -> JobEvent:
        """The event this delivery carried."""
        return JobEvent.from_dict(json.loads(self.payload)["event"])
