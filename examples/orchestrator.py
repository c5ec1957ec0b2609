"""A simulated job orchestrator that reports progress through blueprint_notify.

Five jobs run concurrently: queued, processing 0..100 %, then completed (one
of them fails half-way). For every job an asyncio subscriber prints a live
progress bar, and every event is also sent as a signed webhook to a real
HTTP receiver on 127.0.0.1 (blueprint_notify.testing.WebhookReceiver), which
checks each signature. One job's webhook endpoint answers 500, so its
deliveries are retried and end up as dead letters, listed at the end.

    make demo        (or: .venv/bin/python examples/orchestrator.py [-v])

On a terminal the bars are redrawn in place; when stdout is not a terminal
every update is printed as a plain line instead. Exits 0 when every webhook
was signed correctly, arrived in per-job order, and only the broken endpoint
produced dead letters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import shutil
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass

from blueprint_notify import (
    JobEvent,
    JobNotifier,
    JobStatus,
    Subscription,
    SubscriptionClosed,
    SubscriptionLagged,
)
from blueprint_notify.testing import ReceivedRequest, WebhookReceiver

log = logging.getLogger("orchestrator")

SECRET = "demo-signing-secret"
BROKEN_PATH = "/hooks/broken"  # the receiver answers 500 here


@dataclass(frozen=True)
class JobPlan:
    job_id: str
    steps: int  # progress updates after 0 %
    fail_at: int | None = None  # progress at which the job fails
    webhook_path: str = "/hooks/customer"


PLANS = [
    JobPlan("render-001", steps=10),
    JobPlan("render-002", steps=8),
    JobPlan("transcode-003", steps=10, fail_at=60),
    JobPlan("render-004", steps=6, webhook_path=BROKEN_PATH),
    JobPlan("export-005", steps=5),
]


# -- terminal output ------------------------------------------------------------------
class Board:
    """Progress bars plus a scrolling area of messages above them.

    Live mode (stdout is a terminal) redraws the bars in place with ANSI
    escapes; otherwise each update is printed as one line. Only call it from
    the event loop's thread (use ``note_threadsafe`` from others).
    """

    BAR = 24

    def __init__(self, job_ids: list[str], live: bool) -> None:
        self.live = live
        self.rows = {job_id: "waiting" for job_id in job_ids}
        self.width = max(len(j) for j in job_ids)
        self.drawn = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.out = sys.stdout

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        if self.live:
            self.out.write("\x1b[?25l")  # hide the cursor while redrawing
            self._draw()

    def stop(self) -> None:
        """Leaves the bars on screen as they are. Idempotent."""
        if self.loop is not None and self.live:
            self.out.write("\x1b[?25h")
            self.out.flush()
        self.loop = None

    def _erase(self) -> None:
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")  # up N lines, clear below
            self.drawn = 0

    def _draw(self) -> None:
        cols = shutil.get_terminal_size().columns
        for job_id, text in self.rows.items():
            self.out.write(f"{job_id:<{self.width}}  {text}"[: cols - 1] + "\n")
        self.drawn = len(self.rows)
        self.out.flush()

    def note(self, line: str) -> None:
        """Prints a message above the bars."""
        if self.live:
            self._erase()
            self.out.write(line + "\n")
            self._draw()
        else:
            print(line, file=self.out, flush=True)

    def note_threadsafe(self, line: str) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                if _on_loop_thread(loop):
                    self.note(line)
                else:
                    loop.call_soon_threadsafe(self.note, line)
                return
            except RuntimeError:  # the loop closed meanwhile
                pass
        print(line, file=self.out, flush=True)

    def update(self, job_id: str, event: JobEvent) -> None:
        text = render(event, self.BAR)
        self.rows[job_id] = text
        if self.live:
            self._erase()
            self._draw()
        else:
            print(f"{job_id:<{self.width}}  {text}", file=self.out, flush=True)


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def render(event: JobEvent, width: int) -> str:
    status = event.status
    if status is JobStatus.QUEUED:
        return f"[{'.' * width}]    -  queued"
    progress = event.progress if event.progress is not None else 100
    filled = round(width * progress / 100)
    bar = "#" * filled + "-" * (width - filled)
    text = f"[{bar}] {progress:3d} %  {status.value}"
    if status is JobStatus.FAILED:
        text += f": {event.error}"
    elif status is JobStatus.COMPLETED and event.result is not None:
        text += f"  {json.dumps(event.result, separators=(',', ':'))}"
    return text


class BoardLogHandler(logging.Handler):
    """Sends log records through the board, so they scroll above the bars
    instead of tearing through them (used when stdout and stderr are the
    same terminal)."""

    def __init__(self, board: Board) -> None:
        super().__init__()
        self.board = board

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.board.note_threadsafe(self.format(record))
        except Exception:
            self.handleError(record)


# -- the orchestrator ------------------------------------------------------------------
async def run_job(
    notifier: JobNotifier, plan: JobPlan, url: str, rng: random.Random
) -> None:
    """Simulates one job, publishing each lifecycle step."""
    await asyncio.sleep(rng.uniform(0.0, 1.0))  # staggered arrival
    notifier.notify(plan.job_id, JobEvent(JobStatus.QUEUED), url)
    await asyncio.sleep(rng.uniform(0.2, 0.6))
    for step in range(plan.steps + 1):
        progress = round(100 * step / plan.steps)
        if plan.fail_at is not None and progress >= plan.fail_at:
            event = JobEvent(
                JobStatus.FAILED, progress=progress, error="worker exited with status 137"
            )
            notifier.notify(plan.job_id, event, url)
            return
        notifier.notify(plan.job_id, JobEvent(JobStatus.PROCESSING, progress=progress), url)
        await asyncio.sleep(rng.uniform(0.25, 0.7))  # pacing the simulated work
    result = {"output": f"s3://demo-bucket/{plan.job_id}.mp4"}
    notifier.notify(plan.job_id, JobEvent(JobStatus.COMPLETED, progress=100, result=result), url)


async def watch_job(sub: Subscription, board: Board) -> None:
    """One asyncio subscriber: draws every event of the job until its end."""
    job_id = sub.job_id
    async with sub:
        while True:
            try:
                event = await sub.get()
            except SubscriptionLagged as lag:  # fell behind: some events were dropped
                log.warning("%s: subscriber lagged, %d event(s) skipped", job_id, lag.skipped)
                continue
            except SubscriptionClosed:
                return
            board.update(job_id, event)


def describe_webhook(req: ReceivedRequest, status: int) -> str:
    try:
        body = req.json()
        event = JobEvent.from_dict(body["event"])
        what = event.status.value
        if event.progress is not None and event.status is JobStatus.PROCESSING:
            what += f" {event.progress}%"
    except (ValueError, KeyError, TypeError):
        what = "unparsable body"
    sig = "signature ok" if req.verified else "BAD SIGNATURE"
    return f"  webhook {req.path:<16} {req.job_id or '?':<14} {what:<16} {sig}  -> {status}"


async def orchestrate(board: Board) -> int:
    board.start(asyncio.get_running_loop())
    received: dict[str, list[ReceivedRequest]] = defaultdict(list)
    lock = threading.Lock()

    def on_request(req: ReceivedRequest) -> int:
        """Receiver hook (on a server thread): picks the answer, records and
        prints the request."""
        status = 500 if req.path == BROKEN_PATH else 200
        with lock:
            received[req.path].append(req)
        board.note_threadsafe(describe_webhook(req, status))
        return status

    rng = random.Random(7)
    with WebhookReceiver(SECRET, handler=on_request) as receiver:
        log.info("webhook receiver listening on %s", receiver.url)
        # The receiver is on loopback, which the SSRF guard refuses by
        # default: allow_private_networks=True lifts that for this demo only.
        # Small retry_base_ms so the broken endpoint dead-letters in time.
        async with JobNotifier(
            signing_secret=SECRET,
            allow_private_networks=True,
            max_retries=2,
            retry_base_ms=40,
            timeout_secs=5,
        ) as notifier:
            watchers = []
            for plan in PLANS:
                token = notifier.register_job(plan.job_id)
                log.info("%s registered (subscriber token %s...)", plan.job_id, token[:8])
                # Subscribe before the job starts: a subscription sees the
                # events published after it was made.
                sub = notifier.subscribe(plan.job_id)
                watchers.append(asyncio.create_task(watch_job(sub, board)))
            await asyncio.gather(
                *(run_job(notifier, p, receiver.url_for(p.webhook_path), rng) for p in PLANS)
            )
            await asyncio.gather(*watchers)
            log.info("all jobs finished; waiting for webhook deliveries")
            if not await notifier.drain(timeout=30):
                log.error("deliveries did not finish within 30 s")
                return 1
            dead = notifier.dead_letters()
            stats = notifier.stats()
        board.stop()
        errors = receiver.errors

    return report(received, dead, stats, errors)


def report(received, dead, stats, errors) -> int:
    ok = True
    requests = [r for reqs in received.values() for r in reqs]
    bad = [r for r in requests if not r.verified]
    print()
    print(
        f"webhooks: {stats['delivered']} delivered, {stats['dead_lettered']} dead-lettered, "
        f"{stats['attempts']} attempts; {len(requests) - len(bad)}/{len(requests)} "
        "signatures verified"
    )
    if bad or errors:
        log.error("%d request(s) failed signature verification; receiver errors: %r", len(bad), errors)
        ok = False

    # Per-job order: the 2xx deliveries of each job arrive in notify() order.
    by_job: dict[str, list[JobEvent]] = defaultdict(list)
    for r in received.get("/hooks/customer", []):
        by_job[r.job_id].append(JobEvent.from_dict(r.json()["event"]))
    for job_id, events in sorted(by_job.items()):
        progress = [e.progress or 0 for e in events]
        if progress != sorted(progress) or not events[-1].status.is_terminal:
            log.error("%s: webhooks out of order: %s", job_id, [str(e.status) for e in events])
            ok = False
    print(f"per-job order: {'kept' if ok else 'BROKEN'} for {len(by_job)} jobs")

    print(f"dead letters: {len(dead)}")
    for d in dead:
        event = d.event()
        what = event.status.value + (
            f" {event.progress}%" if event.status is JobStatus.PROCESSING else ""
        )
        print(f"  #{d.id:<3} {d.job_id:<12} {what:<16} {d.attempts} attempts  {d.last_error}")
    wrong = [d for d in dead if not d.url.endswith(BROKEN_PATH)]
    if not dead or wrong:
        log.error("expected dead letters only for %s, got %r", BROKEN_PATH, wrong or dead)
        ok = False
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="also show retries and debug logs")
    args = parser.parse_args()

    live = sys.stdout.isatty()
    board = Board([p.job_id for p in PLANS], live=live)
    if live and sys.stderr.isatty():
        handler: logging.Handler = BoardLogHandler(board)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    if not args.verbose:
        # Each failed attempt is already shown by the receiver; keep the
        # library's retry warnings and the receiver's request log out.
        logging.getLogger("blueprint_notify").setLevel(logging.ERROR)

    try:
        return asyncio.run(orchestrate(board))
    finally:
        board.stop()


if __name__ == "__main__":
    sys.exit(main())
