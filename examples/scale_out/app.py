"""The SSE app of a scaled-out deployment: run it with several workers.

    BPN_BROKER_URL=redis://127.0.0.1:6379/0 \
        uvicorn --workers 2 --app-dir examples/scale_out app:app --port 8000

Every worker process has its own JobNotifier on the same Redis: a client's
stream may land on any worker and still gets every event of its job, whichever
process produced it, with tokens registered anywhere and Last-Event-ID resume
on any worker (see README, "Scaling out").
"""

from __future__ import annotations

import os

from blueprint_notify import JobNotifier
from blueprint_notify.asgi import sse_app

notifier = JobNotifier(broker_url=os.environ.get("BPN_BROKER_URL", "redis://127.0.0.1:6379/0"))
app = sse_app(notifier)
