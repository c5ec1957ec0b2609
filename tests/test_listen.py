"""``blueprint-notify listen`` (``python -m blueprint_notify listen``) run
as a real subprocess: it prints its URL first, verifies and pretty-prints
every delivery (200), answers 401 to a bad signature, and ends cleanly on
SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from blueprint_notify import JobEvent, JobStatus
from blueprint_notify.testing import compute_signature

SECRET = "whsec_bGlzdGVuLXRlc3Qtc2VjcmV0"
LINE_TIMEOUT = 10.0


class Listener:
    """A running ``listen`` subprocess and its stdout, line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blueprint_notify", "listen", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            encoding="utf-8",
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, name="listen-stdout", daemon=True)
        self._reader.start()
        first = self.next_line()
        m = re.match(r"blueprint-notify listening on (http://127\.0\.0\.1:\d+) ", first)
        assert m, f"first line should announce the URL: {first!r}"
        self.url = m.group(1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float = LINE_TIMEOUT) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"listen printed nothing within {timeout} s") from None
        if line is None:
            self.stop()
            raise AssertionError(f"listen exited ({self.proc.returncode}); stderr: {self.stderr}")
        return line

    def read_json_block(self) -> str:
        """The pretty-printed payload after a ✓ line: up to the closing brace."""
        lines = [self.next_line()]
        assert lines[0] == "{", lines
        while lines[-1] != "}":
            lines.append(self.next_line())
        return "\n".join(lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError("listen did not end within 5 s of SIGTERM") from None
        self.stderr += err or ""
        self._reader.join(5)
        return self.proc.returncode


@pytest.fixture
def start_listener() -> Iterator[Callable[..., Listener]]:
    listeners: list[Listener] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Listener:
        listener = Listener(list(args) or ["--port", "0", "--secret", SECRET], env)
        listeners.append(listener)
        return listener

    yield start
    for listener in listeners:
        listener.stop()


def _client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=5)  # loopback only: ignore proxy settings


def test_prints_and_accepts_a_verified_delivery(start_listener, make_notifier) -> None:
    listener = start_listener()
    n = make_notifier(signing_secret=SECRET)
    event = JobEvent(JobStatus.PROCESSING, progress=50, result={"stage": "résumé", "rows": [1, 2]})
    n.notify("listen-job", event, listener.url + "/hooks")
    assert n.flush(5)
    assert n.dead_letters() == []
    s = n.stats()
    assert (s["delivered"], s["attempts"]) == (1, 1)
    summary = listener.next_line()
    assert summary.startswith("✓ "), summary
    assert re.search(r"POST /hooks  scheme=standard  webhook-id=\S+  job=listen-job  status=processing 50%$", summary), summary
    expected = {"job_id": "listen-job", "event": event.to_dict()}
    block = listener.read_json_block()
    assert block == json.dumps(expected, indent=2, ensure_ascii=False)
    assert json.loads(block) == expected
    assert listener.stop() == 0


def test_blueprint_scheme_is_verified_too(start_listener, make_notifier) -> None:
    listener = start_listener()
    n = make_notifier(signing_secret=SECRET, signature_scheme="blueprint")
    event = JobEvent(JobStatus.COMPLETED, result={"ok": True})
    n.notify("seed-job", event, listener.url)
    assert n.flush(5)
    assert n.dead_letters() == []
    summary = listener.next_line()
    assert summary.startswith("✓ ") and "scheme=blueprint" in summary and "job=seed-job  status=completed" in summary
    assert "webhook-id" not in summary
    assert json.loads(listener.read_json_block()) == {"job_id": "seed-job", "event": event.to_dict()}


def test_bad_signature_is_rejected_with_401(start_listener, make_notifier) -> None:
    listener = start_listener()
    n = make_notifier(signing_secret="whsec_" + "d3JvbmctbGlzdGVuLXNlY3JldA", max_retries=0)
    n.notify("forged", JobEvent(JobStatus.COMPLETED), listener.url + "/x")
    assert n.flush(5)
    (dead,) = n.dead_letters()
    assert dead.last_error == "HTTP 401"
    line = listener.next_line()
    assert line.startswith("✗ "), line
    assert "REJECTED (401)" in line and "no webhook-signature matches the secret" in line, line
    # Nothing is pretty-printed for a rejected delivery: the next line is the next request's.
    with _client() as client:
        r = client.post(listener.url + "/raw", content=b'{"job_id":"x"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    assert r.json() == {"error": "invalid signature"}
    line = listener.next_line()
    assert "POST /raw" in line and "REJECTED (401)" in line and "no signature headers" in line, line


def test_stale_timestamp_is_rejected(start_listener) -> None:
    listener = start_listener("--port", "0", "--secret", "seed", "--tolerance", "60")
    body = b'{"job_id":"old","event":{"status":"completed","timestamp":1}}'
    with _client() as client:
        ok_ts = int(time.time())
        ok = client.post(
            listener.url,
            content=body,
            headers={"X-Webhook-Timestamp": str(ok_ts), "X-Webhook-Signature": compute_signature("seed", ok_ts, body)},
        )
        old_ts = ok_ts - 120
        stale = client.post(
            listener.url,
            content=body,
            headers={"X-Webhook-Timestamp": str(old_ts), "X-Webhook-Signature": compute_signature("seed", old_ts, body)},
        )
    assert (ok.status_code, stale.status_code) == (200, 401)
    assert listener.next_line().startswith("✓ ")
    assert json.loads(listener.read_json_block()) == json.loads(body)
    line = listener.next_line()
    assert "REJECTED (401)" in line and "s old (tolerance 60 s)" in line, line


def test_non_ascii_signature_is_rejected_with_401(start_listener) -> None:
    listener = start_listener()
    with _client() as client:
        r = client.post(
            listener.url,
            content=b"{}",
            headers=[
                (b"webhook-id", b"msg_1"),
                (b"webhook-timestamp", str(int(time.time())).encode()),
                (b"webhook-signature", b"v1,\xe9"),
            ],
        )
    assert r.status_code == 401


def test_terminates_cleanly_on_sigterm(start_listener) -> None:
    listener = start_listener()
    start = time.monotonic()
    assert listener.stop() == 0
    assert time.monotonic() - start < 3
    assert "Traceback" not in listener.stderr, listener.stderr
    with pytest.raises(httpx.TransportError):
        with _client() as client:
            client.post(listener.url, content=b"{}")


def test_secret_from_the_environment(start_listener, make_notifier) -> None:
    env = dict(os.environ, BLUEPRINT_NOTIFY_SECRET="env-secret")
    listener = start_listener("--port", "0", env=env)
    n = make_notifier(signing_secret="env-secret")
    n.notify("env-job", JobEvent(JobStatus.COMPLETED), listener.url)
    assert n.flush(5)
    assert n.dead_letters() == []
    assert "job=env-job" in listener.next_line()


def test_secret_is_required() -> None:
    env = {k: v for k, v in os.environ.items() if k != "BLUEPRINT_NOTIFY_SECRET"}
    done = subprocess.run(
        [sys.executable, "-m", "blueprint_notify", "listen", "--port", "0"],
        capture_output=True,
        encoding="utf-8",
        env=env,
        timeout=20,
    )
    assert done.returncode == 2
    assert "--secret" in done.stderr and done.stdout == ""
