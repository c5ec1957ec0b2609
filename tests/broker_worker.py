"""ASGI app factory for the uvicorn worker processes of the broker tests
(``tests/test_broker_procs.py``)::

    python -m uvicorn --factory broker_worker:create_app --app-dir tests \\
        --host 127.0.0.1 --port PORT --log-level warning

``create_app()`` reads ``BPN_TEST_BROKER_URL`` (required) and
``BPN_TEST_SSE_CAPACITY`` (default 1024), makes a
``JobNotifier(broker_url=..., sse_capacity=...)`` and serves
``sse_app(notifier)``, plus ``GET /_worker``, which answers this process's
pid as JSON (``{"pid": 123}``): tests running ``uvicorn --workers N`` use it
to tell the workers apart. With ``--workers N`` every worker process calls
the factory, so each has its own notifier. The notifier is closed when the
process exits (the package closes live notifiers at exit).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from blueprint_notify import JobNotifier
from blueprint_notify.asgi import SSEApp, sse_app

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger("broker_worker")


class WorkerApp:
    """``sse_app`` with ``GET /_worker`` (the pid) in front of it."""

    def __init__(self, notifier: JobNotifier, sse: SSEApp) -> None:
        self.notifier = notifier
        self.sse = sse
        self._pid_body = json.dumps({"pid": os.getpid()}).encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/_worker":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(self._pid_body)),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": self._pid_body})
            return
        await self.sse(scope, receive, send)


def create_app() -> WorkerApp:
    """The worker's ASGI app (see the module docstring)."""
    broker_url = os.environ["BPN_TEST_BROKER_URL"]
    capacity = int(os.environ.get("BPN_TEST_SSE_CAPACITY", "1024"))
    notifier = JobNotifier(signing_secret="test-secret", broker_url=broker_url, sse_capacity=capacity)
    logger.info("worker %d: notifier on %s", os.getpid(), broker_url)
    return WorkerApp(notifier, sse_app(notifier))
