"""Prometheus text exposition of a notifier's stats.

``prometheus_text(notifier)`` returns the exposition (format 0.0.4);
``metrics_app(notifier)`` is an ASGI app serving it on ``GET`` (mount it at
``/metrics``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._notifier import JobNotifier

__all__ = ["prometheus_text", "metrics_app"]

_COUNTERS = [
    ("enqueued", "webhook deliveries queued by notify()"),
    ("delivered", "webhook deliveries answered with 2xx"),
    ("retried", "failed attempts followed by a retry"),
    ("dead_lettered", "deliveries given up (dead letters)"),
    ("dead_letters_evicted", "dead letters dropped by max_dead_letters"),
    ("attempts", "HTTP attempts made"),
    ("failed_attempts", "HTTP attempts that failed"),
]
_GAUGES = [
    ("pending", "deliveries queued, in flight or waiting for a retry"),
    ("in_flight", "deliveries on the wire"),
    ("channels", "live (non-terminal) job channels"),
    ("subscribers", "subscribers attached to job channels"),
]


def prometheus_text(notifier: JobNotifier, *, prefix: str = "blueprint_notify") -> str:
    """The notifier's stats in the Prometheus text format."""
    stats = notifier.stats()
    lines: list[str] = []
    for name, help_text in _COUNTERS:
        metric = f"{prefix}_{name}_total"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter", f"{metric} {int(stats[name])}"]
    for name, help_text in _GAUGES:
        metric = f"{prefix}_{name}"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge", f"{metric} {int(stats[name])}"]
    metric = f"{prefix}_delivery_latency_seconds"
    lines += [
        f"# HELP {metric} notify() to 2xx latency quantiles (histogram estimate)",
        f"# TYPE {metric} summary",
    ]
    for q in ("50", "90", "99"):
        value = stats[f"latency_p{q}_ms"] / 1000.0
        lines.append(f'{metric}{{quantile="0.{q}"}} {value:.6f}')
    lines.append(f"{metric}_sum {stats['latency_sum_ms'] / 1000.0:.6f}")
    lines.append(f"{metric}_count {int(stats['delivered'])}")
    return "\n".join(lines) + "\n"


def metrics_app(
    notifier: JobNotifier, *, prefix: str = "blueprint_notify"
) -> Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]:
    """An ASGI app answering GET (any path) with the exposition."""

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await send({"type": "http.response.start", "status": 405, "headers": [(b"allow", b"GET")]})
            await send({"type": "http.response.body", "body": b""})
            return
        body = prometheus_text(notifier, prefix=prefix).encode()
        headers = [
            (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    return app
