#!/usr/bin/env python3
"""notify() cost: blueprint_notify's SSE-only publish path, end to end to
asyncio subscribers, against the pure-Python fan-out a user would write
without it; plus the callgrind instruction count of one notify() call.

    .venv/bin/python bench/notify_cost.py              # ~70 s on 2 cores
    .venv/bin/python bench/notify_cost.py --quick      # ~15 s
    .venv/bin/python bench/notify_cost.py --json out.json

Prints a markdown section (``## notify() cost``, which says what each side
does) to stdout; progress goes to stderr. With ``--json PATH`` it also writes
``{"case": "notify", "markdown": ..., "headline": {...}}``: headline ratios
are baseline time / ours (above 1: ours is faster), instructions_per_notify is
null when valgrind is missing (Debian: apt-get install valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the checkout's package (built in place)

from blueprint_notify import JobEvent, JobNotifier, JobStatus  # noqa: E402

log = logging.getLogger("bench.notify_cost")

SECRET = "bench-signing-secret"  # no webhook is ever sent; avoids the empty-secret warning
TS = 1_700_000_000  # event k has timestamp TS + k (both sides): every event's JSON differs, no clock call
SSE_CAPACITY = 8192  # ring per job: far above the producer's window below
BATCH = 1024  # events produced before the producer yields to the loop
WINDOW = 2 * BATCH  # the producer waits while a subscriber is more than this behind
RUN_TIMEOUT = 120.0  # seconds; a run that takes longer is a failure
PULL_BATCH = 256  # as the SSE app (asgi.py) pulls

Timing = tuple[float, float]  # (wall seconds, process CPU seconds)
Runner = Callable[[int, int], Coroutine[Any, Any, Timing]]


# ---- the shared producer shape ----------------------------------------------------


class Progress:
    """Per-subscriber count of events received, and when the last arrived.

    Subscribers store their count after every event (one list store, the
    same on both sides); the producer reads the minimum after each batch and
    waits (yielding to the loop) while a subscriber is more than WINDOW
    events behind, so no subscriber ever falls out of its ring."""

    def __init__(self, subs: int) -> None:
        self.seen = [0] * subs
        self.done_at = [0.0] * subs
        self.done_cpu = [0.0] * subs

    def finish(self, i: int) -> None:
        """Subscriber i has received its last event."""
        self.done_at[i] = time.perf_counter()
        self.done_cpu[i] = time.process_time()

    async def wait_window(self, produced: int, deadline: float) -> None:
        seen = self.seen
        while produced - min(seen) > WINDOW:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"subscribers stuck at {min(seen)} of {produced} events")
            await asyncio.sleep(0)


async def _produce(emit: Callable[[int, int], None], final: Callable[[], None], n: int, prog: Progress) -> Timing:
    """Emits events 0..n-2 as PROCESSING in batches, then the terminal one.
    Returns the start (wall and CPU clocks, just before the first event)."""
    deadline = time.perf_counter() + RUN_TIMEOUT
    c0 = time.process_time()
    t0 = time.perf_counter()
    start = 0
    while start < n - 1:
        stop = min(start + BATCH, n - 1)
        emit(start, stop)
        start = stop
        await prog.wait_window(start, deadline)
    final()
    return t0, c0


async def _finish(tasks: list[asyncio.Task[None]], prog: Progress, start: Timing) -> Timing:
    await asyncio.wait_for(asyncio.gather(*tasks), RUN_TIMEOUT)
    return max(prog.done_at) - start[0], max(prog.done_cpu) - start[1]


# ---- pure-Python baseline ------------------------------------------------------------


async def run_baseline(n: int, subs: int) -> Timing:
    """What a user writes without the library: build the event dict,
    json.dumps it once, put_nowait the string into one asyncio.Queue per
    subscriber; each subscriber task awaits queue.get()."""
    queues: list[asyncio.Queue[str]] = [asyncio.Queue() for _ in range(subs)]
    prog = Progress(subs)
    last: list[str] = [""] * subs

    async def consume(i: int) -> None:
        get = queues[i].get
        seen = prog.seen
        msg = ""
        for k in range(1, n + 1):
            msg = await get()
            seen[i] = k
        prog.finish(i)
        last[i] = msg

    dumps = json.dumps
    puts = [q.put_nowait for q in queues]

    def emit(start: int, stop: int) -> None:
        if len(puts) == 1:
            put = puts[0]
            for k in range(start, stop):
                put(dumps({"status": "processing", "progress": k % 101, "timestamp": TS + k}))
        else:
            for k in range(start, stop):
                data = dumps({"status": "processing", "progress": k % 101, "timestamp": TS + k})
                for put in puts:
                    put(data)

    def final() -> None:
        data = dumps({"status": "completed", "progress": 100, "timestamp": TS})
        for put in puts:
            put(data)

    tasks = [asyncio.create_task(consume(i)) for i in range(subs)]
    await asyncio.sleep(0)  # every subscriber is waiting in get()
    start = await _produce(emit, final, n, prog)
    elapsed = await _finish(tasks, prog, start)
    want = json.dumps({"status": "completed", "progress": 100, "timestamp": TS})
    assert all(m == want for m in last), "baseline: wrong last event"
    assert all(s == n for s in prog.seen)
    return elapsed


# ---- blueprint_notify ----------------------------------------------------------------


def _notifier() -> JobNotifier:
    return JobNotifier(signing_secret=SECRET, sse_capacity=SSE_CAPACITY)


def _emitters(notifier: JobNotifier, job_id: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    notify = notifier.notify
    processing = JobStatus.PROCESSING

    def emit(start: int, stop: int) -> None:
        for k in range(start, stop):
            notify(job_id, JobEvent(processing, progress=k % 101, timestamp=TS + k))

    def final() -> None:
        notify(job_id, JobEvent(JobStatus.COMPLETED, progress=100, timestamp=TS))

    return emit, final


async def run_ours(n: int, subs: int) -> Timing:
    """notifier.notify(job_id, JobEvent(...)) with no webhook URL; each
    subscriber is notifier.subscribe(job_id) read with ``await sub.get()``:
    it gets JobEvent objects (the one given to notify(), remembered by the
    notifier, or decoded from the JSON when not remembered)."""
    notifier = _notifier()
    job_id = "job-bench"
    try:
        subscriptions = [notifier.subscribe(job_id) for _ in range(subs)]
        prog = Progress(subs)
        last: list[JobEvent | None] = [None] * subs

        async def consume(i: int) -> None:
            get = subscriptions[i].get
            seen = prog.seen
            ev = None
            for k in range(1, n + 1):
                ev = await get()
                seen[i] = k
            prog.finish(i)
            last[i] = ev

        emit, final = _emitters(notifier, job_id)
        tasks = [asyncio.create_task(consume(i)) for i in range(subs)]
        await asyncio.sleep(0)
        start = await _produce(emit, final, n, prog)
        elapsed = await _finish(tasks, prog, start)
        want = JobEvent(JobStatus.COMPLETED, progress=100, timestamp=TS)
        assert all(ev == want for ev in last), "ours: wrong last event"
        assert all(s.last_event_id == n for s in subscriptions), "ours: sequence numbers"
        for s in subscriptions:
            s.close()
    finally:
        notifier.close(0)
    return elapsed


async def run_ours_frames(n: int, subs: int) -> Timing:
    """The same notify() calls; each subscriber reads the raw path the SSE
    endpoint (asgi.py) uses: ``Subscriber.pull_frames(256)`` on the engine
    subscription, woken through the loop's waker; it gets the pre-rendered
    SSE frames (``id: N\\nevent: S\\ndata: JSON\\n\\n``) as one bytes object per
    batch, never a Python object per event."""
    notifier = _notifier()
    job_id = "job-bench"
    loop = asyncio.get_running_loop()
    hub = notifier._hub_for(loop)
    hub.acquire()
    try:
        prog = Progress(subs)
        waiters: list[asyncio.Future[None] | None] = [None] * subs
        tails: list[bytes] = [b""] * subs

        def on_ready_for(i: int) -> Callable[[], None]:
            def on_ready() -> None:
                w = waiters[i]
                if w is not None and not w.done():
                    w.set_result(None)

            return on_ready

        cores = [notifier._engine.subscribe(job_id, hub.waker, on_ready_for(i), None, -1) for i in range(subs)]

        async def consume(i: int) -> None:
            pull = cores[i].pull_frames
            seen = prog.seen
            got = 0
            frames = b""
            while True:
                frames, skipped, ended, last_seq = pull(PULL_BATCH)
                if skipped:
                    raise AssertionError(f"frames subscriber lagged: {skipped} skipped")
                if frames:
                    got = last_seq  # a fresh job: sequence numbers are 1..n
                    seen[i] = got
                    tails[i] = frames
                    if ended or got >= n:
                        break
                    continue
                if ended:
                    break
                waiters[i] = fut = loop.create_future()
                try:
                    await fut
                finally:
                    waiters[i] = None
            prog.finish(i)
            assert got == n, f"frames subscriber got {got} of {n}"

        emit, final = _emitters(notifier, job_id)
        tasks = [asyncio.create_task(consume(i)) for i in range(subs)]
        await asyncio.sleep(0)
        start = await _produce(emit, final, n, prog)
        elapsed = await _finish(tasks, prog, start)
        want_tail = f"id: {n}\nevent: completed\n".encode()
        assert all(want_tail in t for t in tails), "frames: wrong last frame"
        for c in cores:
            c.close()
    finally:
        hub.release()
        notifier.close(0)
    return elapsed


# ---- running and reporting -----------------------------------------------------------


@dataclass
class Variant:
    key: str
    side: str
    gets: str
    runner: Runner


VARIANTS = [
    Variant("baseline", "pure-Python fan-out", "the JSON `str`", run_baseline),
    Variant("ours", "blueprint_notify, `sub.get()`", "a `JobEvent`", run_ours),
    Variant("frames", "blueprint_notify, raw SSE path", "SSE frame bytes, ≤256 per `bytes`", run_ours_frames),
]


@dataclass
class Case:
    subs: int
    events: int
    times: dict[str, list[float]] = field(default_factory=dict)  # wall seconds per repetition
    cpu: dict[str, list[float]] = field(default_factory=dict)  # process CPU seconds

    def us(self, key: str) -> float:
        return statistics.median(self.times[key]) / self.events * 1e6

    def cpu_us(self, key: str) -> float:
        return statistics.median(self.cpu[key]) / self.events * 1e6

    def ratio(self, key: str) -> float:
        """Median over repetitions of baseline time / our time (paired by
        repetition): >1 means ours is faster."""
        return statistics.median(b / o for b, o in zip(self.times["baseline"], self.times[key]))


def run_case(case: Case, reps: int) -> None:
    for rep in range(reps):
        for v in VARIANTS:  # interleaved, so drift hits every side alike
            gc.collect()
            wall, cpu = asyncio.run(v.runner(case.events, case.subs))
            case.times.setdefault(v.key, []).append(wall)
            case.cpu.setdefault(v.key, []).append(cpu)
            log.info(
                "%d sub(s), %d events, rep %d/%d, %-8s %.3f s = %.3f us/event (CPU %.3f)",
                case.subs, case.events, rep + 1, reps, v.key, wall, wall / case.events * 1e6,
                cpu / case.events * 1e6,
            )


# ---- callgrind ---------------------------------------------------------------------

CALLGRIND_SCRIPT = """\
import sys
sys.path.insert(0, {root!r})
from blueprint_notify import JobEvent, JobNotifier, JobStatus
n = int(sys.argv[1])
notifier = JobNotifier(signing_secret="bench", sse_capacity=16)
notifier.register_job("job-1")  # one channel, no subscriber, no webhook URL
event = JobEvent(JobStatus.PROCESSING, progress=50, timestamp=1700000000)
notify = notifier.notify
for _ in range(64):  # fill the ring: every counted call then also evicts one
    notify("job-1", event)
for _ in range(n):
    notify("job-1", event)
notifier.close(0)
"""


@dataclass
class Costs:
    total: int  # every instruction of the process
    c_incl: int  # inside Engine.notify (the binding, the core, and the libc it calls)
    core_self: int  # self cost of functions in _core*.so


def parse_callgrind(path: Path) -> Costs:
    """Total Ir, inclusive Ir of calls to Engine_notify, and self Ir of the
    _core object file, from a callgrind.out file (name compression aware)."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}}
    ob = ""
    core_self = 0
    c_incl = 0
    total = 0
    after_calls = False
    call_target_is_notify = False
    ref = re.compile(r"\((\d+)\)(?: (.*))?")

    def resolve(kind: str, value: str) -> str:
        m = ref.fullmatch(value)
        if not m:
            return value
        if m.group(2) is not None:
            names[kind][m.group(1)] = m.group(2)
        return names[kind].get(m.group(1), "")

    cfn = ""
    with path.open() as fh:
        for line in fh:
            c = line[:1]
            if c.isdigit() or c in "+-*":
                if after_calls:
                    if call_target_is_notify:
                        c_incl += int(line.split()[1])
                    after_calls = False
                elif "_core" in ob:
                    core_self += int(line.split()[1])
                continue
            if line.startswith("ob="):
                ob = resolve("ob", line[3:].strip())
            elif line.startswith("cob="):
                resolve("ob", line[4:].strip())
            elif line.startswith(("fn=", "cfn=")):
                key, _, value = line.partition("=")
                name = resolve("fn", value.strip())
                if key == "cfn":
                    cfn = name
            elif line.startswith("calls="):
                after_calls = True
                call_target_is_notify = cfn in ("Engine_notify", "Engine_notify_plain")
            elif line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return Costs(total, c_incl, core_self)


def callgrind(n: int, python: str) -> tuple[str, int | None]:
    """Runs the script with n and 2n calls; returns the markdown line and the
    instructions per notify() (None if skipped)."""
    if not shutil.which("valgrind"):
        return ("callgrind: skipped, valgrind not found (Debian: apt-get install valgrind)", None)
    costs: dict[int, Costs] = {}
    with tempfile.TemporaryDirectory(prefix="bpn-callgrind-") as tmp:
        script = Path(tmp) / "notify_loop.py"
        script.write_text(CALLGRIND_SCRIPT.format(root=str(ROOT)))
        env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
        for count in (n, 2 * n):
            out = Path(tmp) / f"callgrind.{count}"
            log.info("callgrind: %d notify() calls", count)
            proc = subprocess.run(
                [
                    "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                    "--dump-line=no", python, str(script), str(count),
                ],
                env=env, capture_output=True, text=True, timeout=300,
            )
            if proc.returncode != 0 or not out.exists():
                tail = "\n".join(proc.stderr.splitlines()[-5:])
                return (f"callgrind: failed (exit {proc.returncode}): {tail}", None)
            costs[count] = parse_callgrind(out)
    a, b = costs[n], costs[2 * n]
    per = round((b.total - a.total) / n)
    c_incl = round((b.c_incl - a.c_incl) / n)
    core = round((b.core_self - a.core_self) / n)
    line = (
        f"callgrind: **{per:,} instructions per notify() call** (Python + C; (Ir(2N) − Ir(N)) / N, "
        f"N = {n:,}, SSE-only, one channel, no subscriber), of which {c_incl:,} "
        f"({c_incl / per:.0%}) inside `Engine.notify`/`notify_plain` (C: binding, core, libc) and "
        f"{core:,} ({core / per:.0%}) in `_core.so` itself; the rest is the Python side "
        f"(`JobNotifier.notify`, `JobEvent` to JSON)."
    )
    return line, per


# ---- main ----------------------------------------------------------------------------


def markdown(cases: list[Case], reps: int, cg_line: str) -> str:
    out = [
        "## notify() cost",
        "",
        "End to end in one process and one asyncio loop (the default event loop): from the first",
        "event produced to every subscriber having received the last one. The producer makes",
        f"{BATCH:,} events per batch and then yields, waiting while any subscriber is more than",
        f"{WINDOW:,} events behind (`sse_capacity={SSE_CAPACITY}`), so nothing lags; every run",
        "asserts that each subscriber got all the events, the last one being the terminal",
        "event (and on our side that the last sequence number is the event count).",
        "",
        "- **pure-Python fan-out** (the baseline): builds the event dict, `json.dumps` it once,",
        "  `put_nowait` of the string into one `asyncio.Queue` per subscriber; each subscriber",
        "  task does `await queue.get()` and gets the JSON `str`.",
        "- **blueprint_notify, `sub.get()`**: `notifier.notify(job_id, JobEvent(...))` with no",
        "  webhook URL (the producer builds a validated `JobEvent` per event where the baseline",
        "  builds a dict); each subscriber is `notifier.subscribe(job_id)` read with",
        "  `await sub.get()` and gets a `JobEvent`, not a string: the object given to `notify()`",
        "  (the notifier remembers its latest few thousand events while subscribers exist), or",
        "  decoded from the JSON when it is no longer remembered.",
        "- **blueprint_notify, raw SSE path**: the same `notify()` calls; each subscriber pulls",
        "  pre-rendered SSE frames (`pull_frames(256)`, what the SSE endpoint sends), no Python",
        "  object per event.",
        "",
        f"Python {sys.version.split()[0]}, default asyncio loop. Median of {reps} repetitions",
        "(variants interleaved). *vs baseline* = baseline time / ours",
        "(median of per-repetition ratios): above 1 means faster than the baseline. With 100",
        "subscribers, µs/event is per event published (each is delivered 100 times). *CPU* is",
        "the process's CPU time over the same span: well below the wall time means the run was",
        "preempted (a busy machine), so rerun.",
        "",
        "| subscribers | events | side | subscriber gets | µs/event | CPU µs/event | events/s | vs baseline |",
        "|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for case in cases:
        for v in VARIANTS:
            us = case.us(v.key)
            ratio = "1.00x" if v.key == "baseline" else f"{case.ratio(v.key):.2f}x"
            out.append(
                f"| {case.subs} | {case.events:,} | {v.side} | {v.gets} | {us:.3f} | {case.cpu_us(v.key):.3f} "
                f"| {1e6 / us:,.0f} | {ratio} |"
            )
    out += ["", cg_line, ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller runs (~15 s)")
    ap.add_argument("--json", metavar="PATH", help="also write the section and headline figures as JSON")
    ap.add_argument("--reps", type=int, help="repetitions (default 3)")
    ap.add_argument("--events", type=int, help="events, 1 subscriber (default 1,000,000; quick 100,000)")
    ap.add_argument("--events-100", type=int, help="events, 100 subscribers (default 100,000; quick 5,000)")
    ap.add_argument("--callgrind-n", type=int, help="N of the callgrind runs (default 20,000; quick 5,000)")
    ap.add_argument("--no-callgrind", action="store_true", help="skip the callgrind runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    reps = args.reps or 3
    n1 = args.events or (100_000 if args.quick else 1_000_000)
    n100 = args.events_100 or (5_000 if args.quick else 100_000)
    cg_n = args.callgrind_n or (5_000 if args.quick else 20_000)
    if reps < 1 or min(n1, n100, cg_n) < 2:
        ap.error("--reps must be positive; --events, --events-100 and --callgrind-n at least 2")

    started = time.perf_counter()
    cases = [Case(1, n1), Case(100, n100)]
    for case in cases:
        run_case(case, reps)
    if args.no_callgrind:
        cg_line, per = "callgrind: skipped (--no-callgrind)", None
    else:
        cg_line, per = callgrind(cg_n, sys.executable)
    md = markdown(cases, reps, cg_line)
    print(md)
    log.info("done in %.0f s", time.perf_counter() - started)
    if args.json:
        headline = {
            "notify_vs_baseline_1sub": round(cases[0].ratio("ours"), 3),
            "notify_vs_baseline_100sub": round(cases[1].ratio("ours"), 3),
            "instructions_per_notify": per,
        }
        Path(args.json).write_text(json.dumps({"case": "notify", "markdown": md, "headline": headline}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
