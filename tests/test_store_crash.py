"""The durable outbox (``store_path``) across crashes, a full disk and a
second process.

* sync durability: a child notifies into a store while its receiver is down
  and is SIGKILLed in the middle of the stream; a new notifier on the store
  delivers every event whose notify() had returned, per job in order, with
  the original webhook-id and fresh signatures.
* batched durability: the same crash loses at most the events acknowledged
  in the last few milliseconds (the group-commit window); the figure is
  printed (run with -s).
* a file size limit (RLIMIT_FSIZE, like a full disk) makes store writes
  fail: logged, counted, and every event is still delivered from memory.
* one notifier per store: a second one, in another process or this one,
  raises StoreLockedError naming the holder's pid, until the holder exits
  (a SIGKILL included: the kernel drops the flock).

Children run ``tests/store_child.py`` with ``sys.executable`` and inherit
the environment (the ASan preload included); every wait has a deadline and
every child is killed and reaped in a finally block.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from blueprint_notify import StoreLockedError

SECRET = "test-secret"  # what the make_receiver fixture verifies with
ROOT = str(Path(__file__).resolve().parent.parent)
CHILD = str(Path(__file__).resolve().parent / "store_child.py")
CHILD_TIMEOUT = 30.0  # generous: only reached when something is broken

TOTAL = 10_000
JOBS = 100

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL, flock and RLIMIT_FSIZE semantics")


# -- child processes -------------------------------------------------------------------
def child_env() -> dict[str, str]:
    env = dict(os.environ)  # LD_PRELOAD, ASAN_OPTIONS, PYTHONMALLOC... under tools/asan-env
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Child:
    """tests/store_child.py in a subprocess: stdout read line by line with
    deadlines (never an unbounded read), stderr into a file."""

    def __init__(self, mode: str, opts: dict[str, Any], tmp_path: Path) -> None:
        self.stderr_path = tmp_path / f"child-{mode}-{time.monotonic_ns()}.stderr"
        self._err = open(self.stderr_path, "wb")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, CHILD, mode, json.dumps(opts)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._err,
                env=child_env(),
                cwd=ROOT,
                bufsize=0,
            )
        except BaseException:
            self._err.close()
            raise
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._fd, selectors.EVENT_READ)
        self._buf = b""
        self._lines: list[str] = []  # read but not returned yet
        self.eof = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_lines(self, deadline: float) -> list[str]:
        """The complete lines available within one wait (up to the
        deadline); [] at EOF. Raises AssertionError past the deadline."""
        if self._lines:
            lines, self._lines = self._lines, []
            return lines
        while True:
            if self.eof:
                return []
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"child {self.pid}: no output before the deadline\n{self.stderr()}")
            if not self._sel.select(remaining):
                continue
            data = os.read(self._fd, 1 << 16)
            if not data:
                self.eof = True  # a partial last line (the child died writing it) is dropped
                return []
            self._buf += data
            *lines, self._buf = self._buf.split(b"\n")
            if lines:
                return [ln.decode() for ln in lines]

    def read_line(self, deadline: float) -> str:
        """The next line (the rest of a chunk is kept for read_lines());
        AssertionError at EOF or past the deadline."""
        while True:
            lines = self.read_lines(deadline)
            if lines:
                self._lines = lines[1:]
                return lines[0]
            if self.eof:
                raise AssertionError(f"child {self.pid} ended early\n{self.stderr()}")

    def rest(self, deadline: float) -> list[str]:
        """Every complete line until EOF."""
        out: list[str] = []
        while not self.eof or self._lines:
            out += self.read_lines(deadline)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=CHILD_TIMEOUT)

    def finish(self, deadline: float) -> int:
        """Closes stdin and waits for the exit code."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def stderr(self) -> str:
        self._err.flush()
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        """Kills (if still running) and reaps the child; closes everything."""
        try:
            self.kill()
        finally:
            self._sel.close()
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    f.close()
            self._err.close()


def reserve_port() -> socket.socket:
    """A loopback port that is bound but not listening: connecting to it is
    refused (the receiver is down) and nobody else can take it until the
    socket is closed."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    return s


def read_store(path: Path) -> list[dict[str, Any]]:
    """Every row of the store, in id order, with the event's (job, n)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT id, state, msg_id, job_id, url, payload FROM deliveries ORDER BY id"
        ).fetchall()
    finally:
        con.close()
    out = []
    for ident, state, msg_id, job_id, url, payload in rows:
        body = json.loads(payload)
        assert body["job_id"] == job_id, (job_id, payload[:200])
        out.append(
            {
                "id": ident,
                "state": state,
                "msg_id": msg_id,
                "job_id": job_id,
                "url": url,
                "key": (job_id, body["event"]["result"]["n"]),
            }
        )
    return out


def job_name(job: int) -> str:
    return f"job-{job:03d}"


def global_index(key: tuple[str, int]) -> int:
    """Position of an event in the child's notify() order."""
    job, n = key
    return n * JOBS + int(job.split("-")[1])


def run_stream(
    tmp_path: Path, store: Path, url: str, durability: str, kill_after: int, pace_every: int
) -> tuple[list[tuple[tuple[str, int], float]], float, bool]:
    """Runs a ``stream`` child, SIGKILLs it once ``kill_after`` notify()
    calls were acknowledged. Returns the acknowledged events in order with
    the child's time.monotonic() after each returned, the parent's
    time.monotonic() just before the kill, and whether the child was still
    streaming then (not done, still alive)."""
    opts = {
        "store": str(store),
        "url": url,
        "durability": durability,
        "total": TOTAL,
        "jobs": JOBS,
        "pace_every": pace_every,
        "retry_base_ms": 50,
        "max_retry_delay_ms": 200,
        "max_retries": 1_000_000,
    }
    acked: list[tuple[tuple[str, int], float]] = []
    done = False

    def take(lines: list[str]) -> None:
        nonlocal done
        for line in lines:
            if line == "done":
                done = True
                continue
            job, n, t = line.split()
            acked.append(((job_name(int(job)), int(n)), float(t)))

    child = Child("stream", opts, tmp_path)
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT
        ready = child.read_line(deadline)
        assert ready == f"ready {child.pid}", ready
        while len(acked) < kill_after and not done and not child.eof:
            take(child.read_lines(deadline))
        streaming = not done and child.proc.poll() is None
        kill_time = time.monotonic()
        child.kill()
        take(child.rest(deadline))  # what it wrote before it died
        assert child.proc.returncode == -signal.SIGKILL, (child.proc.returncode, child.stderr())
    finally:
        child.close()
    # The acknowledgements are the notify() order: event i is (i % JOBS, i // JOBS).
    assert [global_index(key) for key, _ in acked] == list(range(len(acked))), "ack lines out of order"
    return acked, kill_time, streaming and not done and len(acked) < TOTAL


# -- 1. sync durability: nothing acknowledged is lost --------------------------------------
def test_sync_kill9_mid_stream_every_acknowledged_event_is_delivered_after_restart(
    tmp_path, make_receiver, make_notifier
) -> None:
    store = tmp_path / "outbox.db"
    hold = reserve_port()
    try:
        port = hold.getsockname()[1]
        url = f"http://127.0.0.1:{port}/hook"  # down while the child runs: connection refused
        acked, _, streaming = run_stream(tmp_path, store, url, "sync", kill_after=2_000, pace_every=0)
    finally:
        hold.close()
    assert streaming, f"the child was not killed mid-stream ({len(acked)} of {TOTAL} acknowledged)"
    assert 2_000 <= len(acked) < TOTAL

    rows = read_store(store)
    stored = {r["key"]: r for r in rows}
    acked_keys = [key for key, _ in acked]
    missing = [k for k in acked_keys if k not in stored]
    assert not missing, f"{len(missing)} acknowledged events are not in the store, e.g. {missing[:5]}"
    # Sync: a row is committed before notify() returns; only the call in
    # progress at the kill (or its ack line) may be in the store unacknowledged.
    assert 0 <= len(rows) - len(acked) <= 1, (len(rows), len(acked))
    assert len(stored) == len(rows), "one row per event"
    assert all(r["state"] == 0 for r in rows), Counter(r["state"] for r in rows)
    assert {r["url"] for r in rows} == {url}
    assert len({r["msg_id"] for r in rows}) == len(rows), "webhook-ids must be unique"

    # Phase 2: the receiver comes up on the same port; a new notifier resumes the store.
    rx = make_receiver(port=port)
    rx.respond_with(204)
    wall_before = int(time.time())
    n = make_notifier(store_path=str(store), max_retries=5, retry_base_ms=10, timeout_secs=5)
    recovered = n.stats()["recovered"]
    assert recovered == len(rows), (recovered, len(rows))
    t0 = time.monotonic()
    assert n.flush(20), f"recovery did not finish: {n.stats()}"
    flush_secs = time.monotonic() - t0
    stats = n.stats()
    assert stats["delivered"] == len(rows) and stats["dead_lettered"] == 0, stats

    reqs = rx.requests
    by_id: dict[str, list[Any]] = defaultdict(list)
    first_order: dict[str, list[int]] = defaultdict(list)
    for r in reqs:
        assert r.verified is True, "every recovered delivery carries a valid fresh signature"
        assert int(r.headers["webhook-timestamp"]) >= wall_before, "signed at send time, not at the crash"
        assert r.path == "/hook"
        body = r.json()
        key = (body["job_id"], body["event"]["result"]["n"])
        assert r.job_id == key[0]
        wid = r.headers["webhook-id"]
        assert key in stored and stored[key]["msg_id"] == wid, (key, wid)
        if not by_id[wid]:
            first_order[key[0]].append(key[1])
        by_id[wid].append(r)
    arrived = len(by_id)
    duplicates = len(reqs) - arrived
    print(
        f"\n[sync crash] acked={len(acked)} stored={len(rows)} recovered={recovered} "
        f"arrived={arrived} requests={len(reqs)} duplicates={duplicates} "
        f"recovery_flush={flush_secs * 1000:.0f}ms"
    )
    assert arrived >= len(acked), (arrived, len(acked))
    assert set(by_id) == {r["msg_id"] for r in rows}, "exactly the stored deliveries arrive"
    arrived_keys = {(r.json()["job_id"], r.json()["event"]["result"]["n"]) for r in reqs}
    not_arrived = [k for k in acked_keys if k not in arrived_keys]
    assert not not_arrived, f"{len(not_arrived)} acknowledged events never arrived, e.g. {not_arrived[:5]}"
    # Per job, first arrivals in notify() order.
    for job, seqs in first_order.items():
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"{job} out of order: {seqs[:20]}"
        assert seqs == list(range(len(seqs))), f"{job}: not the prefix of its events: {seqs[:20]}"


# -- 2. batched durability: the loss window ----------------------------------------------
def test_batched_kill9_loses_at_most_the_last_commit_window(tmp_path) -> None:
    store = tmp_path / "outbox.db"
    hold = reserve_port()
    try:
        url = f"http://127.0.0.1:{hold.getsockname()[1]}/hook"
        # notify() takes microseconds here: pace the producer (1 ms pause every
        # 10 events, ~10 events/ms) so that the kill lands mid-stream.
        acked, kill_time, streaming = run_stream(tmp_path, store, url, "batched", kill_after=2_000, pace_every=10)
    finally:
        hold.close()
    assert streaming, f"the child was not killed mid-stream ({len(acked)} of {TOTAL} acknowledged)"

    rows = read_store(store)
    stored = {r["key"] for r in rows}
    assert len(stored) == len(rows), "one row per event"
    # Commits go in notify() order: the store holds a prefix of the stream.
    indices = sorted(global_index(k) for k in stored)
    assert indices == list(range(len(indices))), "the store has holes: not a prefix of the notify() order"
    # At most the call in progress and one unwritten ack line beyond what was acknowledged.
    assert len(rows) <= len(acked) + 2, (len(rows), len(acked))

    lost = [(key, t) for key, t in acked if key not in stored]
    last_200ms = sum(1 for _, t in acked if t >= kill_time - 0.2)
    last_10ms = sum(1 for _, t in acked if t >= kill_time - 0.010)
    if lost:
        oldest = min(t for _, t in lost)
        window_ms = (kill_time - oldest) * 1000
        newest_ms = (kill_time - max(t for _, t in lost)) * 1000
    else:
        window_ms = newest_ms = 0.0
    span_ms = (acked[-1][1] - acked[0][1]) * 1000
    print(
        f"\n[batched crash] acked={len(acked)} stored={len(rows)} lost={len(lost)} "
        f"lost_window_ms={window_ms:.1f} (oldest lost event acked {window_ms:.1f} ms before the kill, "
        f"newest {newest_ms:.1f} ms) acked_in_last_10ms={last_10ms} acked_in_last_200ms={last_200ms} "
        f"rate={len(acked) / max(span_ms, 1e-3):.1f} events/ms"
    )
    assert window_ms <= 200, (
        f"{len(lost)} acknowledged events lost, the oldest acked {window_ms:.1f} ms before the kill "
        f"(promise: about 10 ms)"
    )
    assert len(lost) <= last_200ms, (len(lost), last_200ms)


# -- 3. a full disk: store errors, deliveries go on from memory --------------------------
@pytest.mark.parametrize("durability", ["batched", "sync"])
def test_store_write_failures_are_logged_counted_and_delivery_goes_on(
    tmp_path, receiver, make_notifier, durability
) -> None:
    store = tmp_path / "outbox.db"
    count, blob, limit = 200, 16 * 1024, 256 * 1024  # ~3 MB of payloads into a 256 KB cap
    opts = {
        "store": str(store),
        "url": receiver.url_for("/full"),
        "durability": durability,
        "count": count,
        "blob": blob,
        "limit": limit,
        "max_retries": 3,
        "retry_base_ms": 10,
        "max_retry_delay_ms": 50,
        "flush_timeout": 15,
    }
    child = Child("diskfull", opts, tmp_path)
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT
        line = child.read_line(deadline)
        code = child.finish(deadline)
        stderr = child.stderr()
    finally:
        child.close()
    assert code == 0, f"the child crashed (exit {code})\n{stderr}"
    summary = json.loads(line)
    stats = summary["stats"]
    assert all(size < limit for size in summary["sizes_before"].values()), summary["sizes_before"]
    assert summary["flushed"] is True, stats
    assert stats["delivered"] == count and stats["dead_lettered"] == 0, stats
    assert summary["dead"] == [] and summary["pending"] == 0
    assert summary["closed"] is True
    assert stats["store_errors"] > 0, f"no store write failed under a {limit}-byte file size cap: {stats}"
    errors = [m for name, level, m in summary["logs"] if level == "ERROR" and name == "blueprint_notify.delivery"]
    store_errors = [m for m in errors if "store" in m]
    assert store_errors, f"no ERROR line about the store: {summary['logs'][:10]}"
    assert str(store) in store_errors[0], store_errors[0]
    # At most one line a second (every failure counted all the same).
    assert len(store_errors) <= 1 + int(summary["elapsed"]), (len(store_errors), summary["elapsed"])
    for name in os.listdir(tmp_path):
        if name.startswith("outbox.db"):
            assert os.path.getsize(tmp_path / name) <= limit, name

    reqs = receiver.requests
    got = Counter(r.headers["webhook-id"] for r in reqs)
    assert len(got) == count, f"{len(got)} of {count} events arrived"
    seqs = sorted(r.json()["event"]["result"]["n"] for r in reqs if r.status == 200)
    assert sorted(set(seqs)) == list(range(count))
    assert all(r.verified for r in reqs)
    assert all(len(r.json()["event"]["result"]["blob"]) == blob for r in reqs)

    # The store survived the failures: it opens again (without the cap).
    before = len(reqs)
    n = make_notifier(store_path=str(store), max_retries=3)
    recovered = n.stats()["recovered"]
    assert n.flush(10)
    assert n.stats()["store_errors"] == 0
    print(
        f"\n[disk full, {durability}] store_errors={stats['store_errors']} store_commits={stats['store_commits']} "
        f"error_lines={len(store_errors)} elapsed={summary['elapsed'] * 1000:.0f}ms "
        f"pending rows recovered on reopen={recovered} (re-sent: {len(receiver.requests) - before})\n"
        f"  {store_errors[0]}"
    )


# -- 4. one notifier per store -----------------------------------------------------------
@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_second_notifier_on_a_store_is_refused_until_the_holder_exits(tmp_path, make_notifier, how) -> None:
    store = tmp_path / "outbox.db"
    child = Child("hold", {"store": str(store)}, tmp_path)
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT
        ready = child.read_line(deadline)
        assert ready == f"ready {child.pid}", ready
        with pytest.raises(StoreLockedError) as info:
            make_notifier(store_path=str(store))
        assert isinstance(info.value, OSError)
        assert str(child.pid) in str(info.value), str(info.value)
        if how == "sigkill":
            child.kill()
            assert child.proc.returncode == -signal.SIGKILL
        else:
            assert child.finish(deadline) == 0, child.stderr()
            assert child.rest(deadline) == ["closed"]
    finally:
        child.close()

    n = make_notifier(store_path=str(store))  # the kernel released the flock
    assert n.stats()["recovered"] == 0
    # One per store in this process too, naming this process.
    with pytest.raises(StoreLockedError) as info:
        make_notifier(store_path=str(store))
    assert str(os.getpid()) in str(info.value), str(info.value)
    n.close(0)
    make_notifier(store_path=str(store)).close(0)  # free again after close()
