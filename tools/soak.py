#!/usr/bin/env python3
"""Soak: a million job events through notify(), a quarter of them webhooks to
a flaky receiver, with asyncio subscribers attached; then every count must add
up, and memory must stay flat.

    .venv/bin/python tools/soak.py                  # make soak: 1,000,000 events (~1 min on 2 cores)
    .venv/bin/python tools/soak.py --ci             # CI: produce for 50 s, flush, check (~55 s)
    .venv/bin/python tools/soak.py --events 200000  # a shorter fixed run
    .venv/bin/python tools/soak.py --seconds 600    # produce for 10 minutes
    .venv/bin/python tools/soak.py --json soak.json # also write the figures (and the memory trend)

**Receiver.** ``tools/flaky_receiver.py`` in a child process (its CPU and
memory are not ours), on 127.0.0.1 and a free port, killed with us
(PR_SET_PDEATHSIG) or when its stdin closes. It verifies both signatures of
every request and answers at random: 5xx (10 %), a connection reset or a
close without an answer (3 %), 429 with ``Retry-After: 0`` (1 %), 410 Gone
(0.02 %), a stall past our timeout, then 200 (0.1 %), and 2xx otherwise; 5 %
of the answers come 50-200 ms late. It records per event its webhook-id and
how often it was requested and answered 2xx; per job the order of first 2xx
answers and any request for an event older than one it already had.
``--calm``: a receiver that never fails.

**Producer** (this process, one asyncio loop): ``JobNotifier(retry_base_ms=20,
max_retries=3, timeout_secs=1, sse_capacity=64, retention_secs=0.25,
max_connections=64, max_connections_per_host=64, max_dead_letters=100000)``.
1,000 job slots, round-robin; event ``seq = round * 1000 + slot`` is the
event's ``timestamp``, so the receiver and the subscribers know it. Jobs
churn: each lives 100 events (``register_job``, queued, processing, some
with a ``result``, then completed with a result / failed with an error /
cancelled) and the slots are staggered (slot s is at step ``(round + s) %
100``), so every round holds the same mix of live jobs and histories. An
event carries the receiver's URL when it is terminal or ``(round + slot) % 4
== 0``. Every third slot's jobs have a ``Subscription``, made before the
job's first event and read by a task (``async for``); one in ten of those
(``get()``) stops once per job, after 10 events, until the producer opens a
gate (every 90 rounds), and lags when that is more than 64 events. Each
checks its job's events arrive in order, gaps exactly as
``SubscriptionLagged.skipped`` says, the terminal event last, and ``read +
skipped == published``. The producer yields to the loop after each round;
it takes a ``drain()`` ticket every 2,000 webhooks and, while more than
10,000 deliveries are pending, awaits the oldest (it is far faster than the
delivery thread: the backlog sits at that ceiling). No other waiting.

**Memory.** "Quiet points": the producer awaits ``drain()`` (nothing pending,
subscribers caught up), takes the dead letters out (checked, kept in compact
form, ``clear_dead_letters()``: nothing can be dead-lettered meanwhile; they
are held on purpose and would otherwise count as growth), runs
``gc.collect()`` and glibc ``malloc_trim(0)``, then reads VmRSS, malloc's
bytes in use (``mallinfo2``) and Python's allocated blocks. The warm-up point
comes after the first 10 % of the rounds (time mode: 10 s, at most a fifth),
and at least one job lifetime; checkpoints every 10 % (10 s) after it; the
end point just before the last round (which ends every job). The staggered
jobs make every quiet point hold the same state. Checks: RSS growth
(end - warm-up) / warm-up < 10 %, malloc in use growth < 5 %. VmRSS as is
(every round) is reported, not checked: the pending backlog's high-water
stays in malloc's heaps. Open fds and threads: before the notifier, at the
end, and after close() (which must bring both back).

**Checks** (exit 1 if any fails; each failure says what did not add up):
``flush()`` True; ``enqueued`` = webhook events notified = ``delivered +
dead_lettered``; ``attempts = delivered + failed_attempts = enqueued +
retried``; at the end ``pending``, ``in_flight``, ``channels``,
``subscribers`` and evicted dead letters 0; dead letters read = dead_lettered,
none twice, each with a ``last_error`` matching its attempt log (length =
attempts <= max_retries + 1; a 410 is the last attempt), its job's, and the
webhook-id the receiver got; every webhook event not dead-lettered was
answered 2xx by the receiver (lost = 0) and nothing it answered 2xx was not
sent; a dead letter the receiver did answer 2xx must show an attempt without
an HTTP answer (a timeout: its 2xx never arrived); per job, first 2xx
answers in notify() order, and no request for an event after a request for
a later one (the next waits until the previous is delivered or
dead-lettered); webhook-ids the same on every retry and unique; all
signatures valid; subscribers as above (and the lag path exercised); memory
and fds/threads as above.

Prints a markdown summary to stdout, progress to stderr. ``--json PATH``
writes the figures, the failures, the quiet points and a sample every 10
rounds (ms, events, RSS, malloc in use, Python blocks, pending, dead
letters).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import ctypes
import gc
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the checkout's package (built in place)

from blueprint_notify import (  # noqa: E402
    JobEvent,
    JobNotifier,
    JobStatus,
    SubscriptionClosed,
    SubscriptionLagged,
)

log = logging.getLogger("soak")

SECRET = "soak-signing-secret-0123456789abcdef"
SLOTS = 1000  # jobs alive at any time
JOB_EVENTS = 100  # events per job, terminal included (slots are staggered)
SUB_EVERY = 3  # every third slot's jobs are subscribed to
PAUSER_EVERY = 10  # one subscribed slot in 10 reads with pauses (lags)
PAUSE_AFTER = 10  # a pauser stops once, after this many events of its job...
GATE_ROUNDS = 90  # ...until the producer opens the gate (every 90 rounds)
WINDOW = 2000  # webhooks per drain window (a drain() ticket taken at each boundary)
HIGH_WATER = 10_000  # pending deliveries beyond which the producer awaits the oldest window
MAX_RETRIES = 3
TIMEOUT_SECS = 1.0
RETENTION_SECS = 0.25  # ended jobs' history: short, so that quiet points hold none of it
RSS_LIMIT = 0.10  # growth of RSS after the warm-up (the target)
MALLOC_LIMIT = 0.05  # growth of malloc's bytes in use after the warm-up (a leak in C)
PAGE = os.sysconf("SC_PAGE_SIZE")

_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: the receiver stops


# ---- this process ------------------------------------------------------------------


def rss_kb() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE // 1024


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # the listdir's own fd


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip


try:
    _mallinfo2 = ctypes.CDLL(None).mallinfo2
    _mallinfo2.restype = _MallInfo2
except AttributeError:  # glibc < 2.33, or not glibc
    _mallinfo2 = None


def malloc_kb() -> int:
    """Bytes in use in malloc's heaps (every arena, mmapped chunks
    included), in KB; -1 where mallinfo2 is missing. Python objects mostly
    live in pymalloc's arenas, which are not in it (see py_blocks)."""
    if _mallinfo2 is None:
        return -1
    m = _mallinfo2()
    return (m.uordblks + m.hblkhd) // 1024


_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)


def quiescent_memory() -> dict[str, int]:
    """Memory at a quiet point (nothing pending): VmRSS as is ("raw"), then
    after gc.collect() and malloc_trim(0) (glibc hands free pages of every
    arena back), which leaves what is in use plus fragmentation: the
    high-water of the delivery queue no longer counts, a leak still does."""
    raw = rss_kb()
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
    return {"raw_kb": raw, "rss_kb": rss_kb(), "malloc_kb": malloc_kb(), "py_blocks": py_blocks()}


def py_blocks() -> int:
    """Python's allocated memory blocks (sys.getallocatedblocks)."""
    return sys.getallocatedblocks()


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class LogCounter(logging.Handler):
    """Counts the delivery thread's log records (attempt failures at
    WARNING, dead letters at ERROR); the ring they come through drops
    records under load and says so in a record of its own."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "records were dropped" in msg:
            self.counts["dropped_notices"] += 1
            try:
                self.counts["dropped"] += int(msg.split()[0])
            except ValueError:
                pass
        else:
            self.counts[record.levelname.lower()] += 1


# ---- the receiver process ----------------------------------------------------------


class Receiver:
    """tools/flaky_receiver.py as a child; one JSON line per message each way."""

    def __init__(self, seed: int, calm: bool = False) -> None:
        extra = ["--p-reset", "0", "--p-5xx", "0", "--p-429", "0", "--p-410", "0", "--p-stall", "0",
                 "--p-delay", "0", "--p-close", "0"] if calm else []  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "flaky_receiver.py"), "--secret", SECRET, "--seed", str(seed),
             "--stall-secs", str(TIMEOUT_SECS * 1.5), *extra],  # fmt: skip
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            preexec_fn=_die_with_parent,  # spawned while this process has one thread
        )
        self._buf = b""
        hello = self.recv(30)
        self.port = int(hello["port"])
        self.pid = int(hello["pid"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/soak"

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self, timeout: float = 120) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"flaky receiver: no answer within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"flaky receiver exited (status {self.proc.poll()})")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.send(msg)
        return self.recv()

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()  # it exits when its stdin closes
                proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait(5)


# ---- subscribers ---------------------------------------------------------------------


@dataclass
class SubTotals:
    started: int = 0
    finished: int = 0
    pausers: int = 0
    read: int = 0
    skipped: int = 0
    lag_reports: int = 0
    published: int = 0  # events published while subscribed (sum over jobs)
    errors: int = 0
    samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < 20:
            self.samples.append(what)


class SubState:
    """One job's subscription: what the producer published to it."""

    __slots__ = ("job", "first_seq", "published")

    def __init__(self, job: str, first_seq: int) -> None:
        self.job = job
        self.first_seq = first_seq
        self.published = 0  # set by the producer as it notifies
        # (the terminal event's notify() sets the final count before the
        # reader can see that event)


class Gate:
    """Pausers wait on the current event; the producer opens it now and then."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.released = False

    def pulse(self) -> None:
        old, self.event = self.event, asyncio.Event()
        old.set()

    def release(self) -> None:
        self.released = True
        self.event.set()


async def read_job(sub: Any, st: SubState, tot: SubTotals, pauser: bool, gate: Gate) -> None:
    """Reads one job's subscription to its end and checks what came."""
    read = skipped = 0
    last: JobEvent | None = None
    expect = st.first_seq

    def take(ev: JobEvent) -> None:
        nonlocal read, expect, last
        if ev.timestamp != expect:
            tot.error(f"{st.job}: event seq {ev.timestamp}, expected {expect} (read {read}, skipped {skipped})")
            expect = ev.timestamp  # resynchronise: report one error, not every event after it
        if last is not None and last.status.is_terminal:
            tot.error(f"{st.job}: event seq {ev.timestamp} after the terminal one")
        read += 1
        expect += SLOTS
        last = ev

    def lagged(exc: SubscriptionLagged) -> None:
        nonlocal skipped, expect
        if exc.skipped < 1:
            tot.error(f"{st.job}: SubscriptionLagged with skipped={exc.skipped}")
        skipped += exc.skipped
        expect += exc.skipped * SLOTS
        tot.lag_reports += 1

    try:
        if pauser:
            since = 0
            while True:
                try:
                    take(await sub.get())
                except SubscriptionLagged as exc:
                    lagged(exc)
                    continue
                except SubscriptionClosed:
                    break
                since += 1
                if since == PAUSE_AFTER and not gate.released:
                    # One pause per job, until the producer's next pulse
                    # (0-89 rounds away): past 64 events it lags.
                    await gate.event.wait()
        else:
            while True:
                try:
                    async for ev in sub:
                        take(ev)
                    break
                except SubscriptionLagged as exc:
                    lagged(exc)
        if last is None or not last.status.is_terminal:
            tot.error(f"{st.job}: ended without its terminal event (last {last})")
        if read + skipped != st.published:
            tot.error(f"{st.job}: read {read} + skipped {skipped} != published {st.published}")
    except Exception as exc:  # a bug here or in the library: report, never hang
        tot.error(f"{st.job}: reader failed: {exc!r}")
    finally:
        sub.close()
        tot.read += read
        tot.skipped += skipped
        tot.published += st.published
        tot.finished += 1


# ---- the run ----------------------------------------------------------------------------


def progress_of(k: int) -> int:
    return min(100, k * 100 // (JOB_EVENTS - 1))


class Soak:
    def __init__(self, args: argparse.Namespace, receiver: Receiver) -> None:
        self.args = args
        self.receiver = receiver
        self.timed = args.seconds is not None
        if self.timed:
            # At most 60,000 events/s (three times what 2 cores do): the bitmap's size.
            self.rounds_max = bitmap_rounds = max(2 * JOB_EVENTS, int(args.seconds * 60))
            self.warm_s = min(10.0, args.seconds / 5)
            self.warm_rounds = JOB_EVENTS  # and at least one job lifetime: the staggered state is steady
            self.check_every_s = 10.0  # a quiet checkpoint every 10 s after the warm-up
        else:
            self.rounds_max = max(1, -(-args.events // SLOTS))
            self.warm_rounds = max(JOB_EVENTS, self.rounds_max // 10)
            self.check_rounds = max(1, self.rounds_max // 10)  # a quiet checkpoint every 10 % of the run
            bitmap_rounds = self.rounds_max
        # Which seqs carried a webhook: one bit each, allocated up front so
        # that it is part of the warm-up RSS, not growth.
        self.webhook_bits = bytearray(bitmap_rounds * SLOTS // 8 + 1)
        self.events = 0
        self.webhooks = 0
        self.rounds = 0
        self.jobs_started = 0
        self.jobs_ended = 0
        self.tot = SubTotals()
        self.gate: Gate | None = None
        self.readers: set[asyncio.Task[None]] = set()
        # every 10 rounds, flat: ms, events, rss_kb, malloc_kb, py_blocks, pending, dead_lettered
        self.samples = array.array("q")
        self.mem_warm: dict[str, int] = {}
        self.mem_end: dict[str, int] = {}
        self.checkpoints: list[dict[str, Any]] = []  # quiet points: warm-up, every 10 %, end
        self.rss_warm = 0  # quiescent, trimmed: the baseline of the growth check
        self.rss_max_after = 0  # raw, every round after the warm-up
        self.warm_events = 0
        self.warm_t = 0.0
        self.windows_waited = 0
        self.window_wait_s = 0.0
        self.failures: list[str] = []
        self.figures: dict[str, Any] = {}
        self.dead: list[tuple[int, str, int, bool, str]] = []  # harvested dead letters
        self.dead_seqs: set[int] = set()
        self.bad_dead = 0
        self.harvests = 0
        self.harvested = 0
        self.notifier: JobNotifier | None = None

    async def run(self) -> None:
        args = self.args
        loop = asyncio.get_running_loop()
        self.gate = Gate()
        gc.collect()
        fds0, threads0 = fd_count(), thread_count()
        counter = LogCounter()
        dlog = logging.getLogger("blueprint_notify.delivery")
        dlog.addHandler(counter)
        dlog.propagate = False
        dlog.setLevel(logging.DEBUG)
        notifier = JobNotifier(
            signing_secret=SECRET,
            allow_private_networks=True,
            retry_base_ms=20,
            max_retries=MAX_RETRIES,
            timeout_secs=TIMEOUT_SECS,
            sse_capacity=64,
            retention_secs=RETENTION_SECS,
            max_connections=64,
            max_connections_per_host=64,
            max_dead_letters=100_000,
            close_timeout_secs=30,
        )
        self.notifier = notifier  # for main() to close on an abort
        url = self.receiver.url
        tot = self.tot
        gate = self.gate
        job_ids: list[str | None] = [None] * SLOTS
        gens = [0] * SLOTS
        subs: list[SubState | None] = [None] * SLOTS
        bits = self.webhook_bits
        marks: collections.deque[asyncio.Future[bool]] = collections.deque()
        since_mark = 0
        notify = notifier.notify
        PROCESSING, QUEUED = JobStatus.PROCESSING, JobStatus.QUEUED
        t0 = time.monotonic()
        cpu0 = cpu_s()
        rcpu0 = self.receiver.cpu_s()
        stop_at = t0 + args.seconds if self.timed else None
        log.info(
            "producing %s over %d job slots (%d events per job), webhooks to %s",
            f"for {args.seconds:.0f} s" if self.timed else f"{self.rounds_max * SLOTS:,} events",
            SLOTS, JOB_EVENTS, url,
        )  # fmt: skip
        warmed = False
        next_report = t0 + 10
        samples = self.samples

        async def quiet(what: str) -> dict[str, int]:
            """Waits until everything queued so far is delivered or
            dead-lettered (the subscribers read meanwhile), then measures."""
            nonlocal since_mark
            q0 = time.monotonic()
            while marks:
                await marks.popleft()
            since_mark = 0
            if not await notifier.drain(args.window_timeout):
                raise RuntimeError(f"the {what} drain did not finish within {args.window_timeout:.0f} s: delivery hung")
            self.harvest(notifier)
            mem: dict[str, Any] = quiescent_memory()
            mem.update(point=what, events=self.events, s=round(q0 - t0, 1), drain_s=round(time.monotonic() - q0, 2))
            self.checkpoints.append(mem)
            log.info(
                "%s point after %d events (%.1f s), drained in %.1f s: RSS %d KB (as is %d KB), malloc %d KB, "
                "%d Python blocks",
                what, self.events, q0 - t0, time.monotonic() - q0, mem["rss_kb"], mem["raw_kb"], mem["malloc_kb"],
                mem["py_blocks"],
            )  # fmt: skip
            return mem

        rnd = warm_rnd = 0
        next_check = 0.0
        while True:
            now = time.monotonic()
            final = rnd == self.rounds_max - 1 or (stop_at is not None and now >= stop_at)
            if warmed and not final and (
                now >= next_check if self.timed else rnd % self.check_rounds == 0 and rnd >= warm_rnd + self.check_rounds
            ):
                await quiet("checkpoint")
                next_check = time.monotonic() + self.check_every_s if self.timed else 0.0
            elif not warmed and not final and rnd >= self.warm_rounds and (not self.timed or now - t0 >= self.warm_s):
                # The baseline. Jobs are staggered (slot s is at step
                # (round + s) % 100 of a job), so every round has the same
                # mix of live jobs and channel histories: this point and
                # the end point hold the same state, with nothing pending.
                warmed = True
                warm_rnd = rnd
                self.warm_events, self.warm_t = self.events, now - t0
                self.mem_warm = await quiet("warm-up")
                self.rss_warm = self.mem_warm["rss_kb"]
                self.rss_max_after = self.mem_warm["raw_kb"]
                self.fds_warm, self.threads_warm = fd_count(), thread_count()
                if self.timed:
                    next_check = time.monotonic() + self.check_every_s
            elif final and warmed:
                self.mem_end = await quiet("end")  # before the last round ends every job
                self.rss_max_after = max(self.rss_max_after, self.mem_end["raw_kb"])
            base = rnd * SLOTS
            for slot in range(SLOTS):
                seq = base + slot
                k = (rnd + slot) % JOB_EVENTS
                job = job_ids[slot]
                first = job is None
                if first:  # (in the last round: a job cancelled at once)
                    job = job_ids[slot] = f"job-{slot}-{gens[slot]}"
                    self.jobs_started += 1
                    notifier.register_job(job)
                    if slot % SUB_EVERY == 0:
                        st = subs[slot] = SubState(job, seq)
                        pauser = slot % (SUB_EVERY * PAUSER_EVERY) == 0
                        task = loop.create_task(read_job(notifier.subscribe(job), st, tot, pauser, gate))
                        self.readers.add(task)
                        task.add_done_callback(self.readers.discard)
                        tot.started += 1
                        tot.pausers += pauser
                terminal = final or k == JOB_EVENTS - 1
                if terminal:
                    which = (slot + gens[slot]) % 10
                    if which == 9:
                        ev = JobEvent(JobStatus.FAILED, progress_of(k), None, f"step {k} failed", seq)
                    elif which == 8:
                        ev = JobEvent(JobStatus.CANCELLED, progress_of(k), None, None, seq)
                    else:
                        ev = JobEvent(JobStatus.COMPLETED, 100, {"rows": k, "job": job}, None, seq)
                elif first:
                    ev = JobEvent(QUEUED, None, None, None, seq)
                elif k % 50 == 25:
                    ev = JobEvent(PROCESSING, progress_of(k), {"step": k}, None, seq)
                else:
                    ev = JobEvent(PROCESSING, progress_of(k), None, None, seq)
                if terminal or (rnd + slot) & 3 == 0:
                    notify(job, ev, url)
                    bits[seq >> 3] |= 1 << (seq & 7)
                    self.webhooks += 1
                    since_mark += 1
                else:
                    notify(job, ev)
                self.events += 1
                st = subs[slot]
                if st is not None:
                    st.published += 1
                if terminal:
                    job_ids[slot] = None
                    subs[slot] = None
                    gens[slot] += 1
                    self.jobs_ended += 1
            rnd += 1
            self.rounds = rnd
            if rnd % GATE_ROUNDS == 0:
                gate.pulse()
            rss = rss_kb()
            now = time.monotonic()
            if warmed:
                self.rss_max_after = max(self.rss_max_after, rss)
            if rnd % 10 == 0:
                st_ = notifier.stats()
                samples.extend((int((now - t0) * 1000), self.events, rss, malloc_kb(), py_blocks(),
                                int(st_["pending"]), int(st_["dead_lettered"])))  # fmt: skip
                if now >= next_report:
                    next_report = now + 10
                    log.info(
                        "%6.0f s  %9d events  %8d webhooks  delivered %8d  dead %5d  pending %6d  RSS %d KB",
                        now - t0, self.events, self.webhooks, st_["delivered"], st_["dead_lettered"],
                        st_["pending"], rss,
                    )  # fmt: skip
            if final:
                break
            # Keep the delivery thread within HIGH_WATER deliveries of the
            # producer (which is far faster): past it, await the oldest
            # windows until back under it. So the backlog, and the memory it
            # takes, has the same ceiling from the first seconds on.
            if since_mark >= WINDOW:
                since_mark = 0
                marks.append(asyncio.ensure_future(notifier.drain(args.window_timeout)))
            await asyncio.sleep(0)  # a yield (a new drain takes its ticket now); the subscribers read
            if notifier.pending() > HIGH_WATER:
                w0 = time.monotonic()
                while marks and notifier.pending() > HIGH_WATER:
                    ok = await marks.popleft()
                    self.windows_waited += 1
                    if not ok:
                        raise RuntimeError(
                            f"a drain window did not finish within {args.window_timeout:.0f} s "
                            f"(pending {notifier.pending()}): delivery hung"
                        )
                self.window_wait_s += time.monotonic() - w0
        t_produced = time.monotonic() - t0
        log.info("produced %d events (%d webhooks) in %.1f s; waiting for subscribers and flush()",
                 self.events, self.webhooks, t_produced)  # fmt: skip

        # ---- the end: subscribers, flush, counts -------------------------------
        gate.release()
        readers_ok = True
        if self.readers:
            done, left = await asyncio.wait(set(self.readers), timeout=60)
            if left:
                readers_ok = False
                self.failures.append(f"{len(left)} subscriptions did not end within 60 s of the last event")
                for t in left:
                    t.cancel()
        for m in marks:
            await m
        f0 = time.monotonic()
        flushed = notifier.flush(args.flush_timeout)
        flush_s = time.monotonic() - f0
        t_end = time.monotonic() - t0
        cpu_run = cpu_s() - cpu0
        rcpu_run = self.receiver.cpu_s() - rcpu0
        stats = notifier.stats()
        if flushed:
            self.harvest(notifier)
        else:  # not quiet: read them, do not clear (the counts will not add up anyway)
            self.fail(f"flush({args.flush_timeout:.0f}) returned False: {notifier.pending()} still pending")
        self.mem_done = quiescent_memory()  # every job ended: for the record
        if not self.mem_end:  # a run too short for an end point
            self.mem_end = dict(self.mem_done)
        rss_end = self.mem_end["rss_kb"]
        fds_end, threads_end = fd_count(), thread_count()
        notifier.close(5)
        self.notifier = None
        del notifier, notify
        gc.collect()
        fds_closed, threads_closed = fd_count(), thread_count()
        rss_closed = rss_kb()
        log.info("flush() %s after %.1f s; %d dead letters; asking the receiver", flushed, flush_s, len(self.dead))

        report = self.receiver.ask({"cmd": "report"})
        lookup = self.receiver.ask({"cmd": "lookup", "seqs": [d[0] for d in self.dead]})["seqs"]
        # Every failed attempt is logged once (a retry at WARNING, a dead
        # letter at ERROR); what the bounded log ring drops is counted in a
        # record of its own. All of it has been handed to Python by now.
        logged = counter.counts["warning"] + counter.counts["error"] + counter.counts["dropped"]
        if logged != stats["failed_attempts"]:
            self.fail(
                f"delivery log: {counter.counts['warning']} warnings + {counter.counts['error']} errors + "
                f"{counter.counts['dropped']} dropped = {logged} != failed_attempts {stats['failed_attempts']:.0f}"
            )
        self.check(
            stats=stats, report=report, lookup=lookup, readers_ok=readers_ok, rss_end=rss_end,
            fds=(fds0, fds_end, fds_closed), threads=(threads0, threads_end, threads_closed),
        )  # fmt: skip
        ok_answers = report["ok_answers"]
        self.figures = {
            "mode": "seconds" if self.timed else "events",
            "events": self.events,
            "rounds": self.rounds,
            "jobs": self.jobs_started,
            "webhook_events": self.webhooks,
            "enqueued": stats["enqueued"],
            "delivered": stats["delivered"],
            "dead_lettered": stats["dead_lettered"],
            "dead_letters_evicted": stats["dead_letters_evicted"],
            "attempts": stats["attempts"],
            "failed_attempts": stats["failed_attempts"],
            "retried": stats["retried"],
            "lost": self.lost,
            "latency_p50_ms": stats["latency_p50_ms"],
            "latency_p99_ms": stats["latency_p99_ms"],
            "receiver_requests": report["requests"],
            "receiver_connections": report["connections"],
            "receiver_outcomes": report["outcomes"],
            "receiver_statuses": report["statuses"],
            "receiver_delayed": report["delayed"],
            "receiver_answers_lost": report["answers_lost"],
            "receiver_ok_answers": ok_answers,
            "duplicates": report["duplicates"],
            "events_with_duplicates": report["events_with_duplicates"],
            "dead_received_2xx": self.dead_received_ok,
            "dead_resent": self.dead_resent,
            "dead_errors": dict(collections.Counter(d[4] for d in self.dead)),
            "dead_letter_harvests": self.harvests,
            "quiet_s": round(sum(c["drain_s"] for c in self.checkpoints), 1),
            "sse_subscriptions": tot.started,
            "sse_pausers": tot.pausers,
            "sse_published": tot.published,
            "sse_read": tot.read,
            "sse_skipped": tot.skipped,
            "sse_lag_reports": tot.lag_reports,
            "delivery_log": dict(counter.counts),
            "rss_warm_kb": self.rss_warm,
            "rss_end_kb": rss_end,
            "rss_growth": self.rss_growth,
            "rss_warm_raw_kb": self.mem_warm.get("raw_kb", 0),
            "rss_end_raw_kb": self.mem_end["raw_kb"],
            "rss_raw_growth": self.rss_raw_growth,
            "malloc_growth": self.malloc_growth,
            "rss_max_after_warm_kb": self.rss_max_after,
            "rss_all_jobs_ended_kb": self.mem_done["rss_kb"],
            "rss_after_close_kb": rss_closed,
            "malloc_warm_kb": self.mem_warm.get("malloc_kb", 0),
            "malloc_end_kb": self.mem_end["malloc_kb"],
            "py_blocks_warm": self.mem_warm.get("py_blocks", 0),
            "py_blocks_end": self.mem_end["py_blocks"],
            "warm_events": self.warm_events,
            "warm_s": round(self.warm_t, 1),
            "fds": {"start": fds0, "warm": getattr(self, "fds_warm", None), "end": fds_end, "closed": fds_closed},
            "threads": {"start": threads0, "warm": getattr(self, "threads_warm", None), "end": threads_end,
                        "closed": threads_closed},  # fmt: skip
            "produce_s": round(t_produced, 1),
            "flush_s": round(flush_s, 2),
            "duration_s": round(t_end, 1),
            "events_per_s": round(self.events / t_end),
            "webhooks_per_s": round(self.webhooks / t_end),
            "windows_waited": self.windows_waited,
            "window_wait_s": round(self.window_wait_s, 1),
            "cpu_s": round(cpu_run, 1),
            "receiver_cpu_s": round(rcpu_run, 1),
            "receiver_maxrss_kb": report["maxrss_kb"],
            "checkpoints": self.checkpoints,
            "samples_fields": ["ms", "events", "rss_kb", "malloc_kb", "py_blocks", "pending", "dead_lettered"],
            "samples": [list(self.samples[i : i + 7]) for i in range(0, len(self.samples), 7)],
        }
        dlog.removeHandler(counter)
        dlog.propagate = True

    # ---- dead letters --------------------------------------------------------------

    def harvest(self, notifier: JobNotifier) -> None:
        """Takes the dead letters out: checks each, keeps a compact record,
        then clear_dead_letters(). Only at a quiet point: with nothing
        pending none can be added meanwhile, so the clear forgets exactly
        the ones read (checked: the counters do not move). They are taken
        out so that what they hold (~8 KB each, by design, while kept) does
        not count as growth of the process."""
        before = notifier.stats()
        if before["pending"] or before["in_flight"]:
            self.fail(f"dead-letter harvest at a point that is not quiet: {before['pending']:.0f} pending")
            return
        dead = notifier.dead_letters()
        notifier.clear_dead_letters()
        after = notifier.stats()
        for key in ("dead_lettered", "dead_letters_evicted", "enqueued"):
            if after[key] != before[key]:
                self.fail(f"{key} moved from {before[key]:.0f} to {after[key]:.0f} while harvesting dead letters at a quiet point")
        if notifier.dead_letters():
            self.fail("dead_letters() not empty right after clear_dead_letters()")
        self.harvests += 1
        self.harvested += len(dead)
        bits = self.webhook_bits
        for d in dead:
            try:
                seq = json.loads(d.payload)["event"]["timestamp"]
                if type(seq) is not int:
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                seq = None
            why = []
            if seq is None:
                why.append(f"payload without an event timestamp: {d.payload[:100]!r}")
            elif seq in self.dead_seqs:
                why.append("dead-lettered twice")
            elif not (seq >> 3 < len(bits) and bits[seq >> 3] >> (seq & 7) & 1):
                why.append("not a webhook event of this run")
            elif d.job_id.rsplit("-", 2)[1] != str(seq % SLOTS):
                why.append(f"job {d.job_id} does not own seq {seq}")
            if not d.last_error:
                why.append("empty last_error")
            if not 1 <= d.attempts <= MAX_RETRIES + 1:
                why.append(f"attempts {d.attempts}")
            if len(d.attempt_log) != d.attempts:
                why.append(f"attempt_log has {len(d.attempt_log)} entries for {d.attempts} attempts")
            elif not d.last_error.startswith(d.attempt_log[-1].error[:100]):
                why.append(f"last_error {d.last_error!r} vs last attempt {d.attempt_log[-1].error!r}")
            if d.last_error.startswith("HTTP 410") and d.attempt_log and d.attempt_log[-1].status != 410:
                why.append("410 dead letter whose last attempt is not a 410")
            if not d.webhook_id:
                why.append("no webhook_id")
            if why:
                self.bad_dead += 1
                if self.bad_dead <= 10:
                    self.fail(f"dead letter {d.id} (job {d.job_id}, seq {seq}): {'; '.join(why)}")
            if seq is not None:
                self.dead_seqs.add(seq)
                # (seq, webhook-id, attempts, any attempt without an HTTP answer, kind)
                self.dead.append((seq, d.webhook_id, d.attempts, any(a.status == 0 for a in d.attempt_log),
                                  _error_kind(d.last_error)))  # fmt: skip

    # ---- checks ----------------------------------------------------------------------

    def fail(self, what: str) -> None:
        self.failures.append(what)
        log.error("CHECK FAILED: %s", what)

    def check(
        self,
        *,
        stats: dict[str, Any],
        report: dict[str, Any],
        lookup: dict[str, Any],
        readers_ok: bool,
        rss_end: int,
        fds: tuple[int, int, int],
        threads: tuple[int, int, int],
    ) -> None:
        fail = self.fail
        s = {k: int(v) for k, v in stats.items() if not k.startswith("latency")}
        if s["enqueued"] != self.webhooks:
            fail(f"enqueued {s['enqueued']} != webhook events notified {self.webhooks}")
        if s["delivered"] + s["dead_lettered"] != s["enqueued"]:
            fail(
                f"delivered {s['delivered']} + dead_lettered {s['dead_lettered']} = "
                f"{s['delivered'] + s['dead_lettered']} != enqueued {s['enqueued']}"
            )
        if s["attempts"] != s["delivered"] + s["failed_attempts"]:
            fail(f"attempts {s['attempts']} != delivered {s['delivered']} + failed_attempts {s['failed_attempts']}")
        if s["attempts"] != s["enqueued"] + s["retried"]:
            fail(f"attempts {s['attempts']} != enqueued {s['enqueued']} + retried {s['retried']}")
        for key in ("pending", "in_flight", "channels", "subscribers", "dead_letters_evicted"):
            if s[key] != 0:
                fail(f"stats()[{key!r}] = {s[key]} at the end, expected 0")
        if self.harvested + s["dead_letters_evicted"] != s["dead_lettered"]:
            fail(
                f"dead letters read {self.harvested} (+{s['dead_letters_evicted']} evicted) "
                f"!= dead_lettered {s['dead_lettered']}"
            )

        # The webhook events, from the bitmap.
        bits = self.webhook_bits
        nseq = self.rounds * SLOTS
        w = {i for i in range(nseq) if bits[i >> 3] >> (i & 7) & 1}
        if len(w) != self.webhooks:
            fail(f"internal: bitmap holds {len(w)} webhook events, counted {self.webhooks}")

        # Dead letters against the receiver.
        dset = self.dead_seqs
        self.dead_received_ok = 0
        self.dead_resent = 0
        bad = 0
        for seq, wid, attempts, transport_failure, _kind in self.dead:
            why = []
            r = lookup.get(str(seq))
            if r is None or r["requests"] == 0:
                why.append("never reached the receiver")
            else:
                if r["wid"] != wid:
                    why.append(f"webhook_id {wid} but the receiver got {r['wid']}")
                if r["requests"] > attempts:
                    self.dead_resent += 1
                if r["ok"]:
                    # Answered 2xx yet dead-lettered: only if that answer
                    # never reached us (a timeout or a dropped connection).
                    self.dead_received_ok += 1
                    if not transport_failure:
                        why.append(f"the receiver answered 2xx {r['ok']} time(s), but every attempt got an HTTP status")
            if why:
                bad += 1
                if bad <= 10:
                    fail(f"dead letter seq {seq} ({wid}): {'; '.join(why)}")
        if bad > 10:
            fail(f"... {bad} dead letters did not match the receiver's records")

        # Receiver side.
        ok_first: dict[str, list[int]] = report["ok_first"]
        ok_set: set[int] = set()
        order_bad = 0
        for job, seqs in ok_first.items():
            ok_set.update(seqs)
            if any(a >= b for a, b in zip(seqs, seqs[1:])):
                order_bad += 1
                if order_bad <= 5:
                    i = next(i for i, (a, b) in enumerate(zip(seqs, seqs[1:])) if a >= b)
                    fail(f"job {job}: first 2xx answers out of notify() order: seq {seqs[i]} then {seqs[i + 1]}")
        if order_bad > 5:
            fail(f"... {order_bad} jobs with first 2xx answers out of order")
        delivered_set = w - dset
        if len(delivered_set) != s["delivered"]:
            fail(f"webhook events {len(w)} - dead-lettered {len(dset)} = {len(delivered_set)} != delivered {s['delivered']}")
        lost = sorted(delivered_set - ok_set)
        self.lost = len(lost)
        if lost:
            fail(f"{len(lost)} events counted delivered were never answered 2xx by the receiver (lost), e.g. seqs {lost[:10]}")
        phantom = sorted(ok_set - w)
        if phantom:
            fail(f"the receiver answered 2xx for {len(phantom)} events never sent as webhooks, e.g. {phantom[:10]}")
        for key, what in (
            ("bad_signature", "requests with a bad signature or an unexpected body"),
            ("bad_request", "malformed requests"),
            ("wid_mismatch", "retries that changed the webhook-id"),
            ("wid_shared", "webhook-ids shared by two events"),
            ("order_violations", "requests for an event after a later event of the same job (per-job order)"),
        ):
            if report[key]:
                samples = report.get("order_samples" if key == "order_violations" else
                                     "wid_samples" if key.startswith("wid") else "bad_samples", [])  # fmt: skip
                fail(f"receiver: {report[key]} {what}; e.g. {samples[:5]}")

        # Subscribers.
        tot = self.tot
        if not readers_ok or tot.finished != tot.started:
            fail(f"subscriptions: {tot.started} started, {tot.finished} finished")
        if tot.errors:
            fail(f"subscriptions: {tot.errors} errors, e.g. {tot.samples[:5]}")
        if tot.read + tot.skipped != tot.published:
            fail(f"subscriptions: read {tot.read} + skipped {tot.skipped} != published {tot.published}")
        if tot.pausers and not tot.lag_reports and self.rounds >= 2 * GATE_ROUNDS:
            fail("subscriptions: the pausing subscribers never lagged (the lag path was not exercised)")

        # Memory and resources.
        warm = self.rss_warm
        self.rss_growth = self.rss_raw_growth = self.malloc_growth = None
        if warm <= 0:
            log.warning("memory not checked: the run ended before its warm-up (%d rounds)", self.warm_rounds)
        else:
            self.rss_growth = (rss_end - warm) / warm
            raw0 = self.mem_warm["raw_kb"]
            self.rss_raw_growth = (self.mem_end["raw_kb"] - raw0) / raw0
            m0, m1 = self.mem_warm["malloc_kb"], self.mem_end["malloc_kb"]
            self.malloc_growth = (m1 - m0) / m0 if m0 > 0 else None
            if self.malloc_growth is not None and self.malloc_growth >= MALLOC_LIMIT:
                fail(
                    f"malloc's bytes in use grew {self.malloc_growth:.1%} after warm-up ({m0} KB -> {m1} KB at quiet "
                    f"points holding the same state), limit {MALLOC_LIMIT:.0%}: memory is leaking"
                )
            if self.rss_growth >= RSS_LIMIT:
                fail(
                    f"RSS grew {self.rss_growth:.1%} after warm-up ({warm} KB -> {rss_end} KB, both at quiet points "
                    f"holding the same state, after gc and malloc_trim), limit {RSS_LIMIT:.0%}; meanwhile malloc's "
                    f"bytes in use {m0} -> {m1} KB, Python blocks {self.mem_warm['py_blocks']} -> "
                    f"{self.mem_end['py_blocks']} (see the checkpoints in --json for the trend)"
                )
        fds0, fds_end, fds_closed = fds
        threads0, threads_end, threads_closed = threads
        if fds_closed != fds0:
            fail(f"open fds: {fds0} before the notifier, {fds_closed} after close()")
        if threads_closed != threads0:
            fail(f"threads: {threads0} before the notifier, {threads_closed} after close()")
        if fds_end > fds0 + 64 + 8:
            fail(f"open fds at the end {fds_end} > start {fds0} + max_connections 64 + 8")


def _error_kind(err: str) -> str:
    if err.startswith("HTTP 410"):
        return "HTTP 410"
    if err.startswith("HTTP "):
        return "HTTP 4xx/5xx"
    if "imeout" in err or "timed out" in err:
        return "timeout"
    return "connection"


def fmt_kb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def markdown(fig: dict[str, Any], failures: list[str], args: argparse.Namespace) -> str:
    g = fig
    mode = f"{args.seconds:.0f} s of production" if args.seconds is not None else f"{g['events']:,} events"
    if args.calm:
        mode += ", calm receiver"
    oc = g["receiver_outcomes"]
    trend = " → ".join(f"{c['rss_kb'] / 1024:.1f}" for c in g["checkpoints"])
    mtrend = " → ".join(f"{c['malloc_kb'] / 1024:.1f}" for c in g["checkpoints"])
    dead = ", ".join(f"{k} {v}" for k, v in sorted(g["dead_errors"].items())) or "none"
    rows = [
        ("events pushed (notify)", f"{g['events']:,} ({g['jobs']:,} jobs, {SLOTS:,} at a time, {JOB_EVENTS} events each)"),
        ("webhook events", f"{g['webhook_events']:,} ({g['webhook_events'] / max(1, g['events']):.1%})"),
        ("delivered", f"{g['delivered']:,}"),
        ("dead-lettered", f"{g['dead_lettered']:,} ({dead}); evicted {g['dead_letters_evicted']:,}"),
        ("**lost** (counted delivered, never answered 2xx)", f"**{g['lost']:,}**"),
        ("attempts / retries", f"{g['attempts']:,} / {g['retried']:,} ({g['failed_attempts']:,} failed attempts)"),
        ("receiver requests", f"{g['receiver_requests']:,} on {g['receiver_connections']:,} connections: "
                              + ", ".join(f"{k} {v:,}" for k, v in oc.items())  # fmt: skip
                              + f"; {g['receiver_requests'] - g['attempts']:+,} vs attempts"),
        ("duplicates received (extra 2xx)", f"{g['duplicates']:,} ({g['events_with_duplicates']:,} events); "
                                            f"dead letters the receiver answered 2xx: {g['dead_received_2xx']:,}"),  # fmt: skip
        ("delivery log: warnings / errors / dropped by the ring",
         f"{g['delivery_log'].get('warning', 0):,} / {g['delivery_log'].get('error', 0):,} / "
         f"{g['delivery_log'].get('dropped', 0):,} (= failed attempts)"),
        ("SSE subscriptions", f"{g['sse_subscriptions']:,} ({g['sse_pausers']:,} pausing)"),
        ("SSE events read / skipped (lag)", f"{g['sse_read']:,} / {g['sse_skipped']:,} "
                                            f"({g['sse_lag_reports']:,} lag reports); published {g['sse_published']:,}"),  # fmt: skip
        ("RSS at quiet points, MB (warm-up → checkpoints → end)", trend),
        ("**RSS growth after warm-up**", f"**{_pct(g['rss_growth'])}** (limit {RSS_LIMIT:.0%}; warm-up: first "
                                         f"{g['warm_events']:,} events, {g['warm_s']} s)" if g["rss_growth"] is not None
                                         else "not checked: the run ended before its warm-up"),  # fmt: skip
        ("malloc in use at quiet points, MB", f"{mtrend}: {_pct(g['malloc_growth'])} (limit {MALLOC_LIMIT:.0%})"),
        ("Python blocks, warm-up → end", f"{g['py_blocks_warm']:,} → {g['py_blocks_end']:,}"),
        ("RSS as is: warm-up / end / max", f"{fmt_kb(g['rss_warm_raw_kb'])} / {fmt_kb(g['rss_end_raw_kb'])} / "
                                           f"{fmt_kb(g['rss_max_after_warm_kb'])}: {_pct(g['rss_raw_growth'])} (not a check)"),  # fmt: skip
        ("open fds start / end / after close", f"{g['fds']['start']} / {g['fds']['end']} / {g['fds']['closed']}"),
        ("threads start / end / after close", f"{g['threads']['start']} / {g['threads']['end']} / {g['threads']['closed']}"),
        ("delivery latency p50 / p99", f"{g['latency_p50_ms']:.0f} / {g['latency_p99_ms']:.0f} ms (notify to 2xx, "
                                       f"backlog up to {HIGH_WATER:,})"),  # fmt: skip
        ("duration", f"{g['duration_s']} s (producing {g['produce_s']} s of which {g['quiet_s']} s in quiet points, "
                     f"final flush {g['flush_s']} s)"),  # fmt: skip
        ("events/s, webhooks/s", f"{g['events_per_s']:,}, {g['webhooks_per_s']:,}"),
        ("CPU: soak / receiver", f"{g['cpu_s']} s / {g['receiver_cpu_s']} s"),
    ]
    out = [f"## Soak: {mode}", "", "| | |", "|---|---|"]
    out += [f"| {a} | {b} |" for a, b in rows]
    out.append("")
    if failures:
        out.append(f"**FAILED** ({len(failures)} checks):")
        out += [f"- {f}" for f in failures]
    else:
        out.append("**All checks passed.**")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--events", type=int, default=None, help="events to push (default 1,000,000)")
    mode.add_argument("--seconds", type=float, default=None, help="produce for this long instead of a count")
    mode.add_argument("--ci", action="store_true", help="the CI variant: produce 50 s, then flush and check (~60 s)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--seed", type=int, default=1, help="the receiver's random seed")
    ap.add_argument(
        "--calm", action="store_true",
        help="a receiver that never fails (2xx at once): to tell the failure paths' share of a problem",
    )  # fmt: skip
    ap.add_argument("--flush-timeout", type=float, default=120.0, help="final flush() timeout (s)")
    ap.add_argument("--window-timeout", type=float, default=120.0, help="a drain window's timeout (s): a hang")
    args = ap.parse_args()
    if args.ci:
        args.seconds = 50.0
    if args.seconds is None and args.events is None:
        args.events = 1_000_000
    if (args.events is not None and args.events < SLOTS) or (args.seconds is not None and args.seconds <= 0):
        ap.error(f"--events must be at least {SLOTS}, --seconds positive")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    receiver = Receiver(args.seed, args.calm)  # first, while this process has a single thread
    log.info("flaky receiver pid %d on port %d", receiver.pid, receiver.port)
    soak = Soak(args, receiver)
    try:
        asyncio.run(soak.run())
    except Exception as exc:
        log.exception("soak aborted")
        soak.failures.append(f"aborted: {exc!r}")
    finally:
        if soak.notifier is not None and not soak.notifier.closed:
            soak.notifier.close(0)  # what is still pending is dead-lettered: we are failing anyway
        receiver.close()
    if not soak.figures:
        print("## Soak\n\n**FAILED**: " + "; ".join(soak.failures))
        return 1
    md = markdown(soak.figures, soak.failures, args)
    print(md)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"case": "soak", "ok": not soak.failures, "failures": soak.failures, "figures": soak.figures,
                        "markdown": md}, indent=1)  # fmt: skip
            + "\n"
        )
    return 1 if soak.failures else 0


if __name__ == "__main__":
    sys.exit(main())
