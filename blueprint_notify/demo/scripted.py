"""``blueprint-notify demo --once``: the demo, driven over HTTP like the page
drives it, with checks; for CI and for a quick look without a browser.

1. Healthy endpoint: three jobs (one crashes half-way). Each job's events
   are read from its SSE stream; one stream is dropped by the server
   mid-way and the client reconnects with ``Last-Event-ID``, as EventSource
   does.
2. The endpoint fails (500): one more job; its first webhook is retried and
   ends up in the dead letters. Then the endpoint recovers and the rest of
   that job's webhooks get through on a retry.

Checks: every job's event ids are 1..N without gap or duplicate, every
webhook's signature verified, every event was either delivered (200) or
dead-lettered, and the dead letter is the failing job's. Only the standard
library is used as the client.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

__all__ = ["run_script"]

logger = logging.getLogger("blueprint_notify.demo")

_TERMINAL = ("completed", "failed", "cancelled")
_TIMEOUT = 20.0  # seconds any one wait may take


class ScriptError(Exception):
    pass


@dataclass
class Followed:
    job_id: str
    ids: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    reconnects: list[int] = field(default_factory=list)  # Last-Event-ID sent

    @property
    def final(self) -> dict[str, Any]:
        return self.events[-1] if self.events else {}


class Client:
    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=_TIMEOUT) as resp:
            return json.loads(resp.read() or b"null")

    def state(self) -> dict[str, Any]:
        return self.call("GET", "/api/state")  # type: ignore[no-any-return]

    def wait_state(self, what: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + _TIMEOUT
        while True:
            state = self.state()
            if predicate(state):
                return state
            if time.monotonic() > deadline:
                raise ScriptError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def follow(
        self, job_id: str, token: str, on_event: Callable[[Followed, int, dict[str, Any]], None] | None = None
    ) -> Followed:
        """Reads the job's SSE stream to its terminal event, reconnecting
        with Last-Event-ID (after the server's retry delay) when the stream
        ends early, like EventSource."""
        out = Followed(job_id)
        url = f"{self.base}/v1/jobs/{quote(job_id, safe='')}/events?token={quote(token)}"
        retry_ms = 1000
        deadline = time.monotonic() + _TIMEOUT
        while time.monotonic() < deadline:
            headers = {"Accept": "text/event-stream"}
            if out.ids:
                headers["Last-Event-ID"] = str(out.ids[-1])
                out.reconnects.append(out.ids[-1])
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT) as resp:
                if resp.status == 204:  # nothing after the id we sent
                    return out
                name, data, ident = "message", [], None
                for raw in resp:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if line:
                        key, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if key == "event":
                            name = value
                        elif key == "data":
                            data.append(value)
                        elif key == "id":
                            ident = value
                        elif key == "retry" and value.isdigit():
                            retry_ms = int(value)
                        continue
                    if data and name != "error":
                        event = json.loads("\n".join(data))
                        out.ids.append(int(ident or 0))
                        out.events.append(event)
                        if on_event is not None:
                            on_event(out, int(ident or 0), event)
                        if name in _TERMINAL:
                            return out
                    elif data:
                        logger.warning("job %s: stream says %s", job_id, "\n".join(data))
                    name, data = "message", []
            time.sleep(retry_ms / 1000)  # the reconnection delay the server asked for
        raise ScriptError(f"job {job_id}: no terminal event within {_TIMEOUT:.0f} s")


def _bar(progress: int | None, width: int = 20) -> str:
    filled = round(width * (progress or 0) / 100)
    return "#" * filled + "." * (width - filled)


def _describe(f: Followed) -> str:
    final = f.final
    text = f"{f.job_id:<14} [{_bar(final.get('progress'))}] {final.get('progress', 0):3d} %  {final.get('status')}"
    if final.get("error"):
        text += f": {final['error']}"
    elif final.get("result"):
        text += f"  -> {final['result'].get('output')}"
    return text


def run_script(base_url: str) -> int:
    """Runs the scenario against a demo server; 0 if every check passed."""
    client = Client(base_url)
    problems: list[str] = []
    try:
        followed = _scenario(client, problems)
        state = client.state()
    except ScriptError as exc:
        logger.error("scripted run failed: %s", exc)
        return 1
    problems += _check(followed, state)
    hooks = state["hooks"]
    logger.info(
        "webhooks: %d requests received, %d verified, %d answered 200, %d answered 500; %d dead letter(s)",
        len(hooks),
        sum(h["verified"] for h in hooks),
        sum(h["answer"] == 200 for h in hooks),
        sum(h["answer"] == 500 for h in hooks),
        len(state["dead_letters"]),
    )
    for dead in state["dead_letters"]:
        logger.info(
            "dead letter: %s %s after %d attempts (%s)", dead["job_id"], dead["status"], dead["attempts"], dead["last_error"]
        )
    for problem in problems:
        logger.error("check failed: %s", problem)
    if problems:
        return 1
    logger.info("all checks passed")
    return 0


def _scenario(client: Client, problems: list[str]) -> list[Followed]:
    client.call("POST", "/api/endpoint", {"failing": False})
    logger.info("1. customer endpoint healthy: three jobs, one crashes; one SSE stream is dropped mid-way")
    plans = [{"steps": 5, "interval": 0.15}, {"steps": 6, "interval": 0.15, "crash": True}, {"steps": 8, "interval": 0.2}]
    jobs = [client.call("POST", "/api/jobs", plan) for plan in plans]
    dropper = jobs[2]["job_id"]
    dropped = threading.Event()

    def on_event(f: Followed, ident: int, event: dict[str, Any]) -> None:
        if f.job_id == dropper and ident == 3 and not dropped.is_set():
            dropped.set()
            n = client.call("POST", f"/api/jobs/{quote(f.job_id, safe='')}/drop")["dropped"]
            logger.info("   %s: after event %d the server drops its stream (%d)", f.job_id, ident, n)

    with ThreadPoolExecutor(len(jobs)) as pool:
        first = list(pool.map(lambda j: client.follow(j["job_id"], j["token"], on_event), jobs))
    for f in first:
        logger.info("   %s", _describe(f))
        if f.reconnects:
            logger.info("   %s: reconnected with Last-Event-ID: %s", f.job_id, ", ".join(map(str, f.reconnects)))
    client.wait_state("the webhooks to be delivered", lambda s: s["stats"]["pending"] == 0)

    logger.info("2. customer endpoint failing (500): one more job; its first webhook ends in the dead letters")
    client.call("POST", "/api/endpoint", {"failing": True})
    job = client.call("POST", "/api/jobs", {"steps": 2, "interval": 0.1})
    f = client.follow(job["job_id"], job["token"])
    logger.info("   %s", _describe(f))
    started = time.monotonic()
    client.wait_state("a dead letter", lambda s: any(d["job_id"] == job["job_id"] for d in s["dead_letters"]))
    logger.info("   dead letter after %.1f s; the endpoint recovers, the other webhooks get through on a retry", time.monotonic() - started)
    client.call("POST", "/api/endpoint", {"failing": False})
    client.wait_state("the retries to be delivered", lambda s: s["stats"]["pending"] == 0)
    return [*first, f]


def _check(followed: list[Followed], state: dict[str, Any]) -> list[str]:
    problems = []
    hooks, dead = state["hooks"], state["dead_letters"]
    for f in followed:
        if f.ids != list(range(1, len(f.ids) + 1)):
            problems.append(f"{f.job_id}: event ids {f.ids} are not 1..{len(f.ids)}")
        if f.final.get("status") not in _TERMINAL:
            problems.append(f"{f.job_id}: no terminal event")
        # Every event was delivered once with 200, or dead-lettered.
        seen = {(e["status"], e.get("progress")) for e in f.events}
        ok = [(h["status"], h["progress"]) for h in hooks if h["job_id"] == f.job_id and h["answer"] == 200]
        failed = {(d["status"], d["progress"]) for d in dead if d["job_id"] == f.job_id}
        if len(ok) != len(set(ok)):
            problems.append(f"{f.job_id}: an event was delivered twice")
        if set(ok) | failed != seen or set(ok) & failed:
            problems.append(f"{f.job_id}: delivered {sorted(map(str, ok))}, dead {sorted(map(str, failed))}, events {sorted(map(str, seen))}")
    if not any(f.reconnects for f in followed):
        problems.append("no stream was resumed")
    if not any(r["via"] == "Last-Event-ID header" for r in state["resumes"]):
        problems.append("the server saw no reconnect with a Last-Event-ID header")
    if not all(h["verified"] for h in hooks):
        problems.append("a webhook signature did not verify")
    if not dead or {d["job_id"] for d in dead} != {followed[-1].job_id}:
        problems.append(f"dead letters {dead} are not the failing job's")
    if any(d["attempts"] != 4 for d in dead):
        problems.append("a dead letter was not tried 1 + max_retries (3) times")
    if state.get("store") and not state["stats"].get("store_commits"):
        problems.append(f"nothing was committed to the store {state['store']}")
    return problems
