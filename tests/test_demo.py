"""The web demo (blueprint_notify.demo) under a real uvicorn on a loopback
port, driven with httpx: pages, jobs streamed over SSE, the built-in
receiver's signature checks, dead letters, the page feed, dropped streams
resumed with Last-Event-ID, shutdown with open streams, and the CLI's
scripted run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from blueprint_notify.demo.app import HOOK_PATH, DemoApp, verify_webhook
from blueprint_notify.demo.server import serve_in_thread

TERMINAL = {"completed", "failed", "cancelled"}
FAST = {"job_steps": (2, 3), "job_interval": (0.02, 0.05)}


class Demo:
    def __init__(self, app: DemoApp, url: str) -> None:
        self.app = app
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10, trust_env=False)

    def start(self, **options: Any) -> dict[str, Any]:
        r = self.http.post("/api/jobs", json=options)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def state(self) -> dict[str, Any]:
        r = self.http.get("/api/state")
        assert r.status_code == 200
        return r.json()  # type: ignore[no-any-return]

    def follow(
        self,
        job: dict[str, Any],
        last_event_id: int | None = None,
        stop: Callable[[int], bool] | None = None,
        http: httpx.Client | None = None,
        connected: threading.Event | None = None,
    ) -> list[tuple[int, str, dict[str, Any]]]:
        """(id, event name, data) of the job's stream until the terminal
        event, the end of the stream, or ``stop(id)``."""
        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        out = []
        url = f"{job['events_url']}?token={job['token']}"
        with connect_sse(http or self.http, "GET", url, headers=headers) as source:
            assert source.response.status_code == 200
            if connected is not None:
                connected.set()
            for sse in source.iter_sse():
                if not sse.data:  # httpx-sse yields the "retry:" block too
                    continue
                out.append((int(sse.id), sse.event, json.loads(sse.data)))
                if sse.event in TERMINAL or (stop is not None and stop(int(sse.id))):
                    break
        return out

    def wait_state(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict[str, Any]:
        """Re-reads the state on each push of the demo's own SSE feed (no
        polling) until predicate holds."""
        state = self.state()
        if predicate(state):
            return state
        with httpx.Client(base_url=self.url, timeout=timeout, trust_env=False) as http:
            with connect_sse(http, "GET", "/api/feed") as source:
                deadline = time.monotonic() + timeout
                for _ in source.iter_sse():
                    state = self.state()
                    if predicate(state):
                        return state
                    assert time.monotonic() < deadline, f"timed out; last state: {state}"
        raise AssertionError(f"feed ended; last state: {state}")


@pytest.fixture
def make_demo() -> Iterator[Callable[..., Demo]]:
    stack: list[tuple[Any, DemoApp, Demo]] = []

    def make(**options: Any) -> Demo:
        app = DemoApp(**options)
        ctx = serve_in_thread(app)
        demo = Demo(app, ctx.__enter__())
        stack.append((ctx, app, demo))
        return demo

    yield make
    for ctx, app, demo in reversed(stack):
        demo.http.close()
        ctx.__exit__(None, None, None)
        app.close()


@pytest.fixture
def demo(make_demo: Callable[..., Demo]) -> Demo:
    return make_demo(**FAST)


def test_page_and_static_files(demo: Demo) -> None:
    page = demo.http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/app.js"' in page.text
    # Nothing is loaded from the network.
    links = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert links and all(link.startswith(("/static/", "data:")) for link in links), links
    js = demo.http.get("/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "new EventSource(" in js.text and "window.demo" in js.text
    css = demo.http.get("/static/style.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "@import" not in css.text and "url(http" not in css.text
    for path in ("/static/app.py", "/static/../app.py", "/static/", "/nope", "/api/nope"):
        assert demo.http.get(path).status_code == 404, path
    assert demo.http.post("/").status_code == 405


def test_job_streams_to_completion_and_every_webhook_verifies(demo: Demo) -> None:
    job = demo.start(steps=4, interval=0.02)
    assert set(job) == {"job_id", "token", "events_url"}
    assert job["events_url"] == f"/v1/jobs/{job['job_id']}/events"
    events = demo.follow(job)
    assert [i for i, _, _ in events] == list(range(1, 8))
    assert [(name, data.get("progress")) for _, name, data in events] == [
        ("queued", None),
        ("processing", 0),
        ("processing", 25),
        ("processing", 50),
        ("processing", 75),
        ("processing", 100),
        ("completed", 100),
    ]
    assert events[-1][2]["result"]["output"].endswith(f"{job['job_id']}.bin")
    assert demo.app.notifier.flush(10)
    hooks = [h for h in demo.state()["hooks"] if h["job_id"] == job["job_id"]]
    # One delivery per event, in the job's order, each signature verified.
    assert [(h["status"], h["progress"]) for h in hooks] == [(name, d.get("progress")) for _, name, d in events]
    assert all(h["verified"] and h["fresh"] and h["answer"] == 200 and h["attempt"] == 1 for h in hooks)
    assert demo.state()["dead_letters"] == []
    # A finished job's stream: replay from the start, then 204 after the end.
    assert [i for i, _, _ in demo.follow(job)] == list(range(1, 8))
    r = demo.http.get(job["events_url"], params={"token": job["token"]}, headers={"Last-Event-ID": "7"})
    assert r.status_code == 204


def test_crashing_and_cancelled_jobs(demo: Demo) -> None:
    crash = demo.start(steps=10, interval=0.02, crash=True)
    events = demo.follow(crash)
    assert events[-1][1] == "failed"
    assert "137" in events[-1][2]["error"] and 40 <= events[-1][2]["progress"] <= 70
    slow = demo.start(steps=10, interval=2)
    seen = demo.follow(slow, stop=lambda ident: ident >= 1)  # queued; 3 s until it starts
    assert demo.http.post(f"/api/jobs/{slow['job_id']}/cancel").json() == {"cancelling": True}
    rest = demo.follow(slow, last_event_id=seen[-1][0])
    assert rest[-1][1] == "cancelled"
    assert demo.http.post(f"/api/jobs/{slow['job_id']}/cancel").json() == {"cancelling": False}


def test_tokens_are_checked(demo: Demo) -> None:
    job = demo.start()
    other = demo.start()
    url = job["events_url"]
    assert demo.http.get(url).status_code == 401
    assert demo.http.get(url, params={"token": other["token"]}).status_code == 403
    assert demo.http.get(url, params={"token": "0" * 64}).status_code == 403
    assert "token" not in json.dumps(demo.state()["jobs"])  # the state never shows tokens


def test_receiver_rejects_bad_signatures(demo: Demo) -> None:
    body = b'{"job_id":"x","event":{"status":"queued","timestamp":1}}'
    ts = str(int(time.time()))
    good = "sha256=" + demo.app.notifier.sign_payload(body, int(ts))
    assert verify_webhook(demo.app.secret, ts, good, body)
    assert not verify_webhook(demo.app.secret, ts, good, body + b" ")
    assert not verify_webhook(demo.app.secret, str(int(ts) + 1), good, body)
    assert not verify_webhook(b"other secret", ts, good, body)
    headers = {"X-Webhook-Timestamp": ts, "X-Job-Id": "x", "Content-Type": "application/json"}
    ok = demo.http.post(HOOK_PATH, content=body, headers={**headers, "X-Webhook-Signature": good})
    assert ok.status_code == 200
    forged = good[:-1] + ("1" if good.endswith("0") else "0")
    bad = demo.http.post(HOOK_PATH, content=body, headers={**headers, "X-Webhook-Signature": forged})
    assert bad.status_code == 401
    stale_ts = str(int(ts) - 3600)
    stale_sig = "sha256=" + demo.app.notifier.sign_payload(body, int(stale_ts))
    stale = demo.http.post(HOOK_PATH, content=body, headers={**headers, "X-Webhook-Timestamp": stale_ts, "X-Webhook-Signature": stale_sig})
    assert stale.status_code == 401
    hooks = demo.state()["hooks"]
    assert [(h["verified"], h["fresh"], h["answer"]) for h in hooks] == [
        (True, True, 200),
        (False, True, 401),
        (True, False, 401),
    ]


def test_failing_endpoint_retries_then_dead_letters(make_demo: Callable[..., Demo]) -> None:
    demo = make_demo(retry_base_ms=20, **FAST)
    assert demo.http.post("/api/endpoint", json={"failing": True}).json() == {"failing": True}
    job = demo.start(steps=1, interval=0.02)
    events = demo.follow(job)
    assert [name for _, name, _ in events] == ["queued", "processing", "processing", "completed"]
    assert demo.app.notifier.flush(10)
    state = demo.wait_state(lambda s: len(s["dead_letters"]) == 4)  # the monitor polls the engine
    dead = state["dead_letters"]
    assert [(d["status"], d["progress"]) for d in dead] == [(name, d.get("progress")) for _, name, d in events]
    assert all(d["job_id"] == job["job_id"] and d["attempts"] == 4 and "500" in d["last_error"] for d in dead)
    hooks = [h for h in state["hooks"] if h["job_id"] == job["job_id"]]
    assert len(hooks) == 16 and all(h["answer"] == 500 and h["verified"] for h in hooks)
    assert [h["attempt"] for h in hooks] == [1, 2, 3, 4] * 4
    assert state["stats"]["dead_lettered"] == 4 and state["stats"]["pending"] == 0
    # Healthy again: the next job's webhooks all get through.
    assert demo.http.post("/api/endpoint", json={"failing": False}).json() == {"failing": False}
    job2 = demo.start(steps=1, interval=0.02)
    demo.follow(job2)
    assert demo.app.notifier.flush(10)
    hooks2 = [h for h in demo.state()["hooks"] if h["job_id"] == job2["job_id"]]
    assert len(hooks2) == 4 and all(h["answer"] == 200 for h in hooks2)
    assert demo.http.post("/api/endpoint").json() == {"failing": True}  # no body: toggles
    assert demo.http.post("/api/endpoint", json={"failing": "yes"}).status_code == 400


def test_dropped_stream_resumes_with_last_event_id(demo: Demo) -> None:
    job = demo.start(steps=8, interval=0.3)  # slow enough that the drop lands mid-job
    first = demo.follow(job, stop=lambda ident: ident == 3)
    # Dropped while a client is connected: that stream ends (no terminal event).
    cut: list[list[int]] = []

    connected = threading.Event()

    def hold() -> None:
        with httpx.Client(base_url=demo.url, timeout=10, trust_env=False) as http:
            cut.append([i for i, _, _ in demo.follow(job, last_event_id=3, http=http, connected=connected)])

    holder = threading.Thread(target=hold)
    holder.start()
    assert connected.wait(5)  # the holder's stream is open (its cut is registered)
    # The first stream, closed by its client at id 3, may still be winding down
    # on the server and be cut too: at least the holder's is.
    assert demo.http.post(f"/api/jobs/{job['job_id']}/drop").json()["dropped"] >= 1
    holder.join(5)
    assert not holder.is_alive() and cut
    last = cut[0][-1] if cut[0] else 3
    assert last < 11  # ended before the terminal event
    # Reconnect with Last-Event-ID: exactly the events after it.
    rest = demo.follow(job, last_event_id=last)
    ids = [i for i, _, _ in first] + cut[0] + [i for i, _, _ in rest]
    assert ids == list(range(1, 12)) and rest[-1][1] == "completed"
    resumes = [r for r in demo.state()["resumes"] if r["job_id"] == job["job_id"]]
    assert [(r["last_event_id"], r["via"]) for r in resumes] == [
        ("3", "Last-Event-ID header"),
        (str(last), "Last-Event-ID header"),
    ]
    assert demo.http.post("/api/jobs/nope/drop").status_code == 404


def test_feed_pushes_updates(demo: Demo) -> None:
    got: list[tuple[str, Any]] = []
    with connect_sse(demo.http, "GET", "/api/feed") as source:
        events = (sse for sse in source.iter_sse() if sse.data)
        first = next(events)
        assert first.event == "snapshot"
        snapshot = json.loads(first.data)
        assert snapshot["failing"] is False and snapshot["hooks"] == []
        demo.http.post("/api/endpoint", json={"failing": True})
        demo.http.post("/api/endpoint", json={"failing": False})
        job = demo.start(steps=1, interval=0.02)
        for sse in events:
            got.append((sse.event, json.loads(sse.data)))
            hooks = [d for kind, d in got if kind == "hook"]
            if len(hooks) == 4 and any(kind == "stats" and d["pending"] == 0 for kind, d in got[-3:]):
                break
    kinds = [kind for kind, _ in got]
    assert kinds[:2] == ["endpoint", "endpoint"]
    assert [d["failing"] for kind, d in got[:2]] == [True, False]
    hooks = [d for kind, d in got if kind == "hook"]
    assert [h["status"] for h in hooks] == ["queued", "processing", "processing", "completed"]
    assert all(h["job_id"] == job["job_id"] and h["verified"] for h in hooks)
    assert "stats" in kinds


def test_bad_requests(demo: Demo) -> None:
    post = demo.http.post
    assert post("/api/jobs", json={"steps": 0}).status_code == 400
    assert post("/api/jobs", json={"steps": True}).status_code == 400
    assert post("/api/jobs", json={"interval": 0}).status_code == 400
    assert post("/api/jobs", json={"crash": "yes"}).status_code == 400
    assert post("/api/jobs", content=b"{not json").status_code == 400
    assert post("/api/jobs", content=b"[]").status_code == 400
    assert post("/api/jobs", content=b"x" * (2 << 20)).status_code == 413
    assert demo.http.get("/api/jobs").status_code == 405
    assert demo.http.get(HOOK_PATH).status_code == 405
    assert demo.http.post("/api/jobs/nope/cancel").status_code == 404
    assert demo.http.get("/api/jobs/x/cancel").status_code == 405


def test_shutdown_ends_open_streams_promptly() -> None:
    app = DemoApp(job_steps=(50, 50), job_interval=(1, 1))
    ctx = serve_in_thread(app)
    url = ctx.__enter__()
    ended: list[str] = []
    try:
        with httpx.Client(base_url=url, timeout=10, trust_env=False) as http:
            job = http.post("/api/jobs", json={}).json()

            connected = threading.Semaphore(0)

            def read(path: str) -> None:
                try:
                    with httpx.Client(base_url=url, timeout=10, trust_env=False) as own, own.stream("GET", path) as r:
                        connected.release()  # response headers are in: the stream is open
                        for _ in r.iter_bytes():
                            pass
                except httpx.HTTPError:
                    pass
                ended.append(path)

            readers = [
                threading.Thread(target=read, args=(f"{job['events_url']}?token={job['token']}",)),
                threading.Thread(target=read, args=("/api/feed",)),
            ]
            for t in readers:
                t.start()
            for _ in readers:
                assert connected.acquire(timeout=5)
            assert app.sse.open_streams == 1 and app.stats()["feeds"] == 1
            started = time.monotonic()
            ctx.__exit__(None, None, None)
            took = time.monotonic() - started
            for t in readers:
                t.join(5)
        assert took < 2.5, f"shutdown took {took:.1f} s"
        assert len(ended) == 2
        assert all(job.task is not None and job.task.done() for job in app.jobs.values())
    finally:
        app.close()


def test_cli_scripted_run() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"))}
    proc = subprocess.run(
        [sys.executable, "-m", "blueprint_notify", "demo", "--once"],
        capture_output=True,
        text=True,
        timeout=45,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scripted run" in proc.stdout
    assert "all checks passed" in proc.stderr
    assert "Last-Event-ID" in proc.stderr


def test_cli_help_and_version() -> None:
    run = [sys.executable, "-m", "blueprint_notify"]
    out = subprocess.run([*run, "demo", "--help"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and "--no-browser" in out.stdout and "--once" in out.stdout
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=20)
    assert version.returncode == 0 and version.stdout.strip().endswith("0.1.0")
    bad = subprocess.run([*run, "demo", "--port", "70000"], capture_output=True, text=True, timeout=20)
    assert bad.returncode == 2
