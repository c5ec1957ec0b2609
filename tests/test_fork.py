"""Fork safety: after ``os.fork()`` a notifier created before the fork
raises a clear RuntimeError in the child on first use; a notifier created
in the child works; the parent keeps working; and nothing of the parent's
(in flight or queued at the fork) is sent again by the child, not even at
the child's interpreter exit.

The child reports through a pipe as JSON and leaves with ``os._exit`` (so
no pytest machinery runs twice); the parent waits for it with a deadline.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from blueprint_notify import JobEvent, JobNotifier, JobStatus

SECRET = "test-secret"  # what the receiver fixture verifies with
CHILD_TIMEOUT = 20.0

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def run_in_fork(child: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs ``child`` in a forked process; returns what it returned (or
    raises AssertionError with the child's traceback)."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads: that is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.close(r)
            try:
                out = {"result": child()}
            except BaseException:
                out = {"error": traceback.format_exc()}
                code = 1
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + CHILD_TIMEOUT
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the forked child did not finish within {CHILD_TIMEOUT} s")
            ready, _, _ = select.select([r], [], [], remaining)
            if ready:
                data = os.read(r, 65536)
                if not data:
                    break
                chunks.append(data)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks) or b"{}")
    assert "error" not in out, "child failed:\n" + out["error"]
    assert os.waitstatus_to_exitcode(status) == 0, status
    return out["result"]


def _raises(call: Callable[[], object]) -> str | None:
    try:
        call()
    except RuntimeError as exc:
        return str(exc)
    return None


def test_child_gets_a_clear_error_and_a_new_notifier_works(make_notifier, receiver) -> None:
    parent = make_notifier(max_retries=0)
    # The parent holds one delivery in flight (a slow answer) and one queued behind it.
    receiver.respond_with(200, delay=1.0, times=1)  # server-side delay
    parent.notify("parent-job", JobEvent(JobStatus.PROCESSING, progress=1), receiver.url_for())
    parent.notify("parent-job", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert receiver.wait_for(1, 5)
    assert parent.pending() == 2
    url = receiver.url_for("/child")

    def child() -> dict[str, Any]:
        errors = {
            "notify": _raises(lambda: parent.notify("x", JobEvent(JobStatus.COMPLETED), url)),
            "notify_sse_only": _raises(lambda: parent.notify("x", JobEvent(JobStatus.COMPLETED))),
            "flush": _raises(lambda: parent.flush(1)),
            "stats": _raises(parent.stats),
            "pending": _raises(parent.pending),
            "dead_letters": _raises(parent.dead_letters),
            "register_job": _raises(lambda: parent.register_job("x")),
        }
        closed_before = parent.closed
        parent.close()  # must neither raise nor send anything
        fresh = JobNotifier(signing_secret=SECRET, allow_private_networks=True, max_retries=0, timeout_secs=5)
        fresh.notify("child-job", JobEvent(JobStatus.COMPLETED, result={"pid": os.getpid()}), url)
        delivered = fresh.flush(5)
        stats = fresh.stats()
        dead = [d.last_error for d in fresh.dead_letters()]
        fresh.close()
        return {
            "errors": errors,
            "closed_before": closed_before,
            "delivered": delivered,
            "stats": {k: stats[k] for k in ("enqueued", "delivered", "dead_lettered")},
            "dead": dead,
            "pid": os.getpid(),
        }

    result = run_in_fork(child)
    for name, message in result["errors"].items():
        assert message is not None, f"{name}() of a pre-fork notifier did not raise RuntimeError in the child"
        assert "fork" in message, (name, message)
    assert "create a new JobNotifier" in result["errors"]["notify"]
    assert result["closed_before"] is True
    assert result["delivered"] is True and result["dead"] == []
    assert result["stats"] == {"enqueued": 1, "delivered": 1, "dead_lettered": 0}

    # The parent keeps working: its held deliveries complete, new ones go out.
    assert parent.flush(5)
    parent.notify("parent-after", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert parent.flush(5)
    assert parent.dead_letters() == []
    s = parent.stats()
    assert (s["enqueued"], s["delivered"]) == (3, 3)

    reqs = receiver.requests
    assert Counter(r.job_id for r in reqs) == {"parent-job": 2, "child-job": 1, "parent-after": 1}
    ids = [r.headers["webhook-id"] for r in reqs]
    assert len(set(ids)) == len(ids) == 4, ids
    assert all(r.verified for r in reqs)
    (child_req,) = [r for r in reqs if r.job_id == "child-job"]
    assert child_req.path == "/child"
    assert child_req.json()["event"]["result"] == {"pid": result["pid"]}
    assert [r.json()["event"]["status"] for r in reqs if r.job_id == "parent-job"] == ["processing", "completed"]


def test_child_exiting_normally_resends_nothing(receiver, tmp_path) -> None:
    """A child that exits through the interpreter (atexit closes live
    notifiers) must not deliver, dead-letter or log the parent's pending
    work; the parent delivers it once."""
    script = tmp_path / "forker.py"
    script.write_text(
        textwrap.dedent(
            """
            import logging, os, sys, warnings
            from blueprint_notify import JobEvent, JobNotifier, JobStatus

            logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(process)d %(name)s %(message)s")
            url = sys.argv[1]
            n = JobNotifier(signing_secret="test-secret", allow_private_networks=True, max_retries=0)
            n.notify("pending-at-fork", JobEvent(JobStatus.COMPLETED), url)
            n.notify("pending-at-fork", JobEvent(JobStatus.COMPLETED, progress=100), url)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                print("child", os.getpid(), flush=True)
                if "libasan" in os.environ.get("LD_PRELOAD", ""):
                    # Under ASan, LeakSanitizer's exit-time check hangs in a fork
                    # child of a threaded process (it locks ASan's allocator, which
                    # a thread that did not survive the fork may hold): run the
                    # atexit hooks (what this test is about), then leave without it.
                    import atexit
                    atexit._run_exitfuncs()
                    os._exit(0)
                sys.exit(0)  # normal exit: atexit hooks and finalizers run
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, status
            assert n.flush(10)
            print("parent", n.stats()["delivered"], len(n.dead_letters()), flush=True)
            """
        )
    )
    receiver.respond_with(200, delay=0.5, times=1)  # server-side delay: in flight across the fork
    done = subprocess.run(
        [sys.executable, str(script), receiver.url_for("/p")],
        capture_output=True,
        encoding="utf-8",
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("child ") and lines[1] == "parent 2 0", done.stdout
    child_pid = lines[0].split()[1]
    # Nothing was logged by the child (no dead letters, no "closing now" warning).
    assert not [ln for ln in done.stderr.splitlines() if ln.startswith(child_pid + " ")], done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    reqs = receiver.requests
    assert [r.job_id for r in reqs] == ["pending-at-fork", "pending-at-fork"]
    assert len({r.headers["webhook-id"] for r in reqs}) == 2
    assert all(r.verified for r in reqs)


def test_parent_notifier_created_after_a_fork_is_unaffected(make_notifier, receiver) -> None:
    """Forking (and the child's exit) leaves notifiers created later in the
    parent alone, and the child may create several notifiers of its own."""
    url = receiver.url_for("/many")

    def child() -> dict[str, Any]:
        results = []
        for i in range(2):
            with JobNotifier(signing_secret=SECRET, allow_private_networks=True, max_retries=0) as n:
                n.notify(f"child-{i}", JobEvent(JobStatus.COMPLETED), url)
                results.append(n.flush(5))
        return {"flushed": results}

    assert run_in_fork(child) == {"flushed": [True, True]}
    n = make_notifier()
    n.notify("parent", JobEvent(JobStatus.COMPLETED), url)
    assert n.flush(5)
    assert sorted(r.job_id for r in receiver.requests) == ["child-0", "child-1", "parent"]
    assert all(r.verified for r in receiver.requests)


def test_repr_of_a_pre_fork_notifier_in_the_child(make_notifier) -> None:
    n = make_notifier()

    def child() -> dict[str, Any]:
        try:
            return {"repr": repr(n)}
        except RuntimeError as exc:
            return {"raised": str(exc)}

    result = run_in_fork(child)
    assert "repr" in result, result
    assert result["repr"].startswith("<JobNotifier"), result
