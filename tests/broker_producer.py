"""Producer process of the broker tests (``tests/test_broker_procs.py``)::

    python tests/broker_producer.py --broker URL --job JOB [--register]
        [--token-file F] [--count N] [--final] [--result] [--broker-buffer N]
        [--sse-capacity N] [--tag NAME]

Makes a ``JobNotifier(broker_url=URL, sse_capacity=N)`` (default 1024, as
the workers of tests/broker_worker.py: the publishing process's
``sse_capacity`` is how many events of a job Redis keeps), registers JOB if ``--register``
(the token goes into ``--token-file`` if given, and into the ready line),
prints ``ready <token or ->`` and then obeys the lines it reads on stdin,
so that the test decides when each event is produced:

``go``           notifies ``--count`` progress events (then the terminal event
                 if ``--final``), flushes (10 s), prints ``done <flushed>``, exits
``batch N``      notifies the next N progress events; prints ``sent <total>``
``final``        notifies the terminal event; prints ``sent <total>``
``flush [T]``    ``notifier.flush(T)`` (default 10 s); prints ``flushed <bool>``
``stats``        prints ``stats <json of notifier.stats()>``
``quit`` / EOF   flushes (10 s), prints ``done <flushed>``, closes, exits 0

A notify() that raises prints ``error <ExceptionType> <message>`` (and the
event does not count). Event k (0-based, counted over the whole process) is
:func:`progress_event` ``(k)``, the terminal one :func:`final_event`
``(total)``; the tests import both to know exactly what to expect.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from blueprint_notify import JobEvent, JobNotifier, JobStatus

T0 = 1_700_000_000  # event timestamps: fixed, so the expected JSON is exact


def progress_event(k: int, *, result: bool = False, tag: str | None = None) -> JobEvent:
    """The k-th (0-based) progress event a producer sends (``result``:
    with ``{"k": k}``; ``tag``: with ``{"k": k, "from": tag}``)."""
    body: dict[str, Any] | None = None
    if tag is not None:
        body = {"k": k, "from": tag}
    elif result:
        body = {"k": k}
    return JobEvent(JobStatus.PROCESSING, progress=k % 101, result=body, timestamp=T0 + k)


def final_event(total: int) -> JobEvent:
    """The terminal event sent after ``total`` progress events."""
    return JobEvent(JobStatus.COMPLETED, progress=100, result={"events": total}, timestamp=T0 + total)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--register", action="store_true")
    parser.add_argument("--token-file")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--final", action="store_true")
    parser.add_argument("--result", action="store_true", help="progress events carry {'k': k}")
    parser.add_argument("--tag", help="progress events carry {'k': k, 'from': TAG}")
    parser.add_argument("--broker-buffer", type=int)
    parser.add_argument("--sse-capacity", type=int, default=1024)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="producer %(levelname)s %(name)s: %(message)s")

    options: dict[str, Any] = {
        "signing_secret": "test-secret",
        "broker_url": args.broker,
        "sse_capacity": args.sse_capacity,
    }
    if args.broker_buffer is not None:
        options["broker_buffer"] = args.broker_buffer
    notifier = JobNotifier(**options)
    try:
        token = notifier.register_job(args.job) if args.register else "-"
        if args.token_file:
            with open(args.token_file, "w") as f:
                f.write(token)
        _say(f"ready {token}")
        sent = 0

        def send(event: JobEvent) -> bool:
            try:
                notifier.notify(args.job, event)
            except Exception as exc:  # reported to the test
                _say(f"error {type(exc).__name__} {exc}")
                return False
            return True

        for raw in sys.stdin:
            command, _, arg = raw.strip().partition(" ")
            if command == "go":
                for _ in range(args.count):
                    if send(progress_event(sent, result=args.result, tag=args.tag)):
                        sent += 1
                if args.final:
                    send(final_event(sent))
                _say(f"done {notifier.flush(10)}")
                return 0
            if command == "batch":
                for _ in range(int(arg)):
                    if send(progress_event(sent, result=args.result, tag=args.tag)):
                        sent += 1
                _say(f"sent {sent}")
            elif command == "final":
                send(final_event(sent))
                _say(f"sent {sent}")
            elif command == "flush":
                _say(f"flushed {notifier.flush(float(arg) if arg else 10.0)}")
            elif command == "stats":
                _say("stats " + json.dumps(notifier.stats()))
            elif command == "quit":
                break
            elif command:
                _say(f"error ValueError unknown command {command!r}")
        _say(f"done {notifier.flush(10)}")
        return 0
    finally:
        notifier.close(5)


if __name__ == "__main__":
    sys.exit(main())
