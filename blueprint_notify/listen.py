"""``blueprint-notify listen``: a local receiver that verifies and prints
every delivery (the ``stripe listen`` of this project)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import TextIO

from ._verify import SignatureError, verify
from .testing import ReceivedRequest, Response, WebhookReceiver

__all__ = ["listen"]


def _describe(req: ReceivedRequest) -> str:
    scheme = "standard" if "webhook-signature" in req.headers else "blueprint"
    wid = req.headers.get("webhook-id")
    return f"{req.method} {req.path}  scheme={scheme}" + (f"  webhook-id={wid}" if wid else "")


def listen(
    host: str,
    port: int,
    secret: str,
    *,
    tolerance: float = 300,
    out: TextIO | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Serves until interrupted (or ``stop`` is set). Verified deliveries
    get 200 and are printed; bad signatures get 401 and are reported."""
    stream = out or sys.stdout
    stop = stop or threading.Event()

    def handler(req: ReceivedRequest) -> Response:
        stamp = time.strftime("%H:%M:%S")
        try:
            payload = verify(req.body, req.headers, secret, tolerance=tolerance)
        except SignatureError as exc:
            print(f"✗ {stamp} {_describe(req)}  REJECTED (401): {exc}", file=stream, flush=True)
            return Response(401, {"Content-Type": "application/json"}, b'{"error":"invalid signature"}')
        event = payload.get("event") if isinstance(payload.get("event"), dict) else {}
        summary = f"job={payload.get('job_id')!s}  status={event.get('status')!s}"
        if event.get("progress") is not None:
            summary += f" {event['progress']}%"
        print(f"✓ {stamp} {_describe(req)}  {summary}", file=stream)
        print(json.dumps(payload, indent=2, ensure_ascii=False), file=stream, flush=True)
        return Response(200)

    with WebhookReceiver(None, host=host, port=port, handler=handler) as receiver:
        previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        if previous is not None:
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        # Announced once SIGTERM stops it cleanly (a supervisor may send it
        # as soon as it sees this line).
        print(f"blueprint-notify listening on {receiver.url} (Ctrl-C to stop)", file=stream, flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    return 0
