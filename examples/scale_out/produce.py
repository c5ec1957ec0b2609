"""A job runner in its own process: registers a job, prints how to watch it,
then reports progress through Redis to whichever worker serves the stream.

    BPN_BROKER_URL=redis://127.0.0.1:6379/0 python examples/scale_out/produce.py
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid

from blueprint_notify import JobEvent, JobNotifier, JobStatus

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("produce")


def main() -> int:
    url = os.environ.get("BPN_BROKER_URL", "redis://127.0.0.1:6379/0")
    port = os.environ.get("PORT", "8000")
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    job = f"job-{uuid.uuid4().hex[:8]}"
    with JobNotifier(broker_url=url) as notifier:
        token = notifier.register_job(job)  # valid on every worker once this returns
        log.info("watch it from any worker:\n  curl -sN -H 'Authorization: Bearer %s' http://127.0.0.1:%s/v1/jobs/%s/events", token, port, job)
        log.info("press Enter to start")
        sys.stdin.readline()
        for step in range(steps):
            notifier.notify(job, JobEvent(JobStatus.PROCESSING, progress=step * 100 // steps))
            time.sleep(0.5)  # the job's work
        notifier.notify(job, JobEvent(JobStatus.COMPLETED, progress=100, result={"steps": steps}))
        notifier.flush(10)  # every event is in Redis before the process ends
    return 0


if __name__ == "__main__":
    sys.exit(main())
