"""Child process for tests/test_store_crash.py (run with sys.executable).

Modes (first argument; the second is a JSON object of options):

``stream``  opens a notifier on a store and notifies ``total`` events,
            interleaved over ``jobs`` jobs (event i goes to job i % jobs
            with sequence number n = i // jobs), to ``url``. After each
            notify() returns it writes ``"<job> <n> <time.monotonic()>"``
            to stdout (line-buffered), after the last one ``"done"``, then
            waits for stdin to close. ``pace_every`` > 0 sleeps 1 ms after
            every that many events (a steady producer rate, so that the
            parent can kill the stream in the middle even when notify() is
            very fast).
``diskfull`` opens a notifier on a store, caps the size of any file it may
            write (RLIMIT_FSIZE, SIGXFSZ ignored), notifies ``count`` events
            with big results to ``url`` and prints a JSON summary.
``hold``    opens a notifier on a store, prints ``"ready <pid>"``, waits for
            stdin to close, closes the notifier and prints ``"closed"``.

The parent kills or reaps this process; it never sleeps to wait for work.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from blueprint_notify import JobEvent, JobNotifier, JobStatus

SECRET = "test-secret"


def _notifier(opts: dict[str, Any]) -> JobNotifier:
    return JobNotifier(
        signing_secret=SECRET,
        allow_private_networks=True,
        store_path=opts["store"],
        durability=opts.get("durability", "batched"),
        max_retries=opts.get("max_retries", 1_000_000),
        retry_base_ms=opts.get("retry_base_ms", 50),
        max_retry_delay_ms=opts.get("max_retry_delay_ms", 200),
        timeout_secs=opts.get("timeout_secs", 5),
        close_timeout_secs=0,
    )


def stream(opts: dict[str, Any]) -> int:
    # The failing attempts log a WARNING each: keep stderr quiet.
    logging.getLogger("blueprint_notify").setLevel(logging.ERROR)
    out = sys.stdout
    n = _notifier(opts)
    url, total, jobs = opts["url"], opts["total"], opts["jobs"]
    pace_every = opts.get("pace_every", 0)
    out.write(f"ready {os.getpid()}\n")
    out.flush()
    mono = time.monotonic
    for i in range(total):
        job, seq = i % jobs, i // jobs
        n.notify(
            f"job-{job:03d}",
            JobEvent(status=JobStatus.PROCESSING, progress=seq % 101, result={"n": seq}),
            url,
        )
        out.write(f"{job} {seq} {mono():.6f}\n")  # line-buffered: written now
        if pace_every and (i + 1) % pace_every == 0:
            time.sleep(0.001)  # producer pacing, not a wait for work
    out.write("done\n")
    out.flush()
    sys.stdin.read()  # until the parent closes it
    n.close(0)
    return 0


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, record.levelname, record.getMessage()))


def diskfull(opts: dict[str, Any]) -> int:
    import resource
    import signal

    collect = _Collect()
    root = logging.getLogger("blueprint_notify")
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    root.propagate = False
    n = _notifier(opts)
    sizes_before = {
        name: os.path.getsize(os.path.join(os.path.dirname(opts["store"]), name))
        for name in os.listdir(os.path.dirname(opts["store"]))
    }
    limit = opts["limit"]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    started = time.monotonic()
    blob = "x" * opts["blob"]
    count = opts["count"]
    for i in range(count):
        n.notify(
            f"big-{i % 4}",
            JobEvent(status=JobStatus.PROCESSING, progress=i % 101, result={"n": i, "blob": blob}),
            opts["url"],
        )
    flushed = n.flush(opts.get("flush_timeout", 10))
    stats = n.stats()
    pending = n.pending()
    dead = [(d.job_id, d.last_error) for d in n.dead_letters()]
    n.close()
    closed = n.closed
    elapsed = time.monotonic() - started
    # close() pumps the last log records: take them after it.
    summary = {
        "pid": os.getpid(),
        "flushed": flushed,
        "stats": stats,
        "pending": pending,
        "dead": dead,
        "closed": closed,
        "logs": collect.lines,
        "sizes_before": sizes_before,
        "limit": limit,
        "elapsed": elapsed,
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    return 0


def hold(opts: dict[str, Any]) -> int:
    n = _notifier(opts)
    sys.stdout.write(f"ready {os.getpid()}\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the parent closes it
    n.close(0)
    sys.stdout.write("closed\n")
    sys.stdout.flush()
    return 0


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    mode, opts = sys.argv[1], json.loads(sys.argv[2])
    return {"stream": stream, "diskfull": diskfull, "hold": hold}[mode](opts)


if __name__ == "__main__":
    sys.exit(main())
