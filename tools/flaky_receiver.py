#!/usr/bin/env python3
"""A deliberately unreliable webhook receiver, for the soak (tools/soak.py).

    .venv/bin/python tools/flaky_receiver.py --secret S [--port 0] [--seed 1]

An HTTP/1.1 keep-alive server on 127.0.0.1 (asyncio, uvloop when installed),
one process, one thread. Every request must be a signed blueprint_notify
webhook (both signature schemes are checked: ``verify()`` for the Standard
Webhooks headers and the HMAC of ``X-Webhook-Signature``; a bad one gets
401 and is counted). Its event's ``timestamp`` is the soak's sequence number
of the event (``seq``). Each request then gets, at random (``--seed``):

* a connection reset (``--p-reset``, 3 %): half of them an RST (SO_LINGER 0),
  half a plain close without an answer;
* a 5xx (``--p-5xx``, 10 %): 500, 502, 503 (no Retry-After) or 504;
* a 429 with ``Retry-After: 0`` (``--p-429``, 1 %);
* a 410 Gone (``--p-410``, 0.02 %): the notifier dead-letters at once;
* a stall (``--p-stall``, 0.1 %): a 200 only after ``--stall-secs`` (1.5 s),
  later than the notifier's timeout;
* otherwise a 2xx (200, sometimes 202 or 204), 1 % of them with
  ``Connection: close``.

Independently, ``--p-delay`` (5 %) of the answers (whatever they are) wait
``--delay-ms`` (50-200 ms) first. The outcome is decided, and the request
counted, when it has been read: so "received with a 2xx" means the receiver
answered (or, after a stall or a delay the client gave up on, tried to
answer) 2xx to it.

Kept per event: its ``webhook-id`` (must be the same on every attempt, and
different from every other event's), requests and 2xx answers; per job: the
events in the order of their first 2xx answer, and every request whose event
is older than one already seen for that job (an order violation: the
notifier sends a job's next event only once the previous one is delivered
or dead-lettered).

Driven over stdin/stdout, one JSON line each way: it first prints
``{"port": P, "pid": N}``; then ``{"cmd": "report"}`` answers the counters,
the order violations and ``ok_first`` (job -> seqs in order of first 2xx);
``{"cmd": "lookup", "seqs": [...]}`` answers, per seq, its webhook-id,
requests and 2xx answers. It exits when its stdin closes (or on
SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's package (built in place)

from blueprint_notify import SignatureError, verify  # noqa: E402
from blueprint_notify.testing import verify_signature  # noqa: E402

_LINGER_RST = struct.pack("ii", 1, 0)
_REASONS = {200: "OK", 202: "Accepted", 204: "No Content", 401: "Unauthorized", 400: "Bad Request",
            410: "Gone", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}  # fmt: skip
_MAX_HEAD = 64 * 1024
_MAX_BODY = 1 << 20


def _response(status: int, headers: tuple[tuple[str, str], ...] = (), close: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}".rstrip()]
    if status != 204:
        lines.append("Content-Length: 0")
    for name, value in headers:
        lines.append(f"{name}: {value}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Stats:
    """Everything the receiver keeps (one event loop thread: no locks)."""

    def __init__(self) -> None:
        self.requests = 0
        self.outcomes: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.bad_signature = 0
        self.bad_request = 0
        self.bad_samples: list[str] = []
        self.connections = 0
        self.answers_lost = 0  # the client had gone when the (delayed) answer was due
        self.delayed = 0
        self.wid: dict[int, str] = {}  # seq -> webhook-id
        self.wid_mismatch = 0
        self.wid_samples: list[str] = []
        self.req_count: dict[int, int] = {}  # seq -> requests
        self.ok_count: dict[int, int] = {}  # seq -> 2xx answers
        self.ok_first: dict[str, list[int]] = {}  # job -> seqs, order of first 2xx
        self.last_seq: dict[str, int] = {}  # job -> newest seq requested
        self.order_violations = 0
        self.order_samples: list[str] = []
        self.started = time.monotonic()

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def bad(self, what: str) -> None:
        if len(self.bad_samples) < 20:
            self.bad_samples.append(what)

    def report(self) -> dict[str, Any]:
        dup = sum(n - 1 for n in self.ok_count.values() if n > 1)
        wids = self.wid.values()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "requests": self.requests,
            "connections": self.connections,
            "outcomes": dict(sorted(self.outcomes.items())),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "delayed": self.delayed,
            "answers_lost": self.answers_lost,
            "bad_signature": self.bad_signature,
            "bad_request": self.bad_request,
            "bad_samples": self.bad_samples,
            "events_seen": len(self.req_count),
            "events_ok": len(self.ok_count),
            "ok_answers": sum(self.ok_count.values()),
            "duplicates": dup,
            "events_with_duplicates": sum(1 for n in self.ok_count.values() if n > 1),
            "wid_mismatch": self.wid_mismatch,
            "wid_shared": len(self.wid) - len(set(wids)),
            "wid_samples": self.wid_samples,
            "order_violations": self.order_violations,
            "order_samples": self.order_samples,
            "cpu_s": ru.ru_utime + ru.ru_stime,
            "maxrss_kb": ru.ru_maxrss,
            "ok_first": self.ok_first,
        }


class Flaky:
    def __init__(self, args: argparse.Namespace) -> None:
        self.secret: str = args.secret
        self.rng = random.Random(args.seed)
        self.stats = Stats()
        a = args
        # Cumulative thresholds of the outcomes, in this order.
        self.table: list[tuple[float, str]] = []
        acc = 0.0
        for p, name in ((a.p_reset, "reset"), (a.p_5xx, "5xx"), (a.p_429, "429"), (a.p_410, "410"),
                        (a.p_stall, "stall")):  # fmt: skip
            acc += p
            self.table.append((acc, name))
        if acc >= 1:
            raise SystemExit("the failure probabilities add up to 1 or more")
        self.p_delay = a.p_delay
        self.delay_lo, self.delay_hi = a.delay_ms[0] / 1000, a.delay_ms[1] / 1000
        self.stall = a.stall_secs
        self.p_close = a.p_close

    def decide(self) -> str:
        r = self.rng.random()
        for limit, name in self.table:
            if r < limit:
                return name
        return "ok"

    def check(self, headers: dict[str, str], body: bytes) -> tuple[str, int, str] | str:
        """(job, seq, webhook-id) of an authentic webhook, or why not."""
        try:
            payload = verify(body, headers, self.secret)
        except SignatureError as exc:
            return f"standard signature: {exc}"
        if not verify_signature(
            self.secret, headers.get("x-webhook-signature"), headers.get("x-webhook-timestamp"), body
        ):
            return "X-Webhook-Signature does not verify"
        wid = headers.get("webhook-id", "")
        job = headers.get("x-job-id", "")
        try:
            seq = payload["event"]["timestamp"]
            if payload["job_id"] != job or type(seq) is not int or not wid:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            return f"unexpected webhook: job header {job!r}, id {wid!r}, body {body[:200]!r}"
        return job, seq, wid


class Conn(asyncio.Protocol):
    """One client connection: requests are read in order and answered one at
    a time (the next is parsed only after the previous one's answer)."""

    def __init__(self, app: Flaky) -> None:
        self.app = app
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # an answer is scheduled for later
        self.gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.app.stats.connections += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.process()

    def process(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self.fail(400, "request head too large")
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            try:
                length = int(headers.get("content-length", "0"))
                if not 0 <= length <= _MAX_BODY or "chunked" in headers.get("transfer-encoding", ""):
                    raise ValueError
            except ValueError:
                self.fail(400, f"bad framing: {head[:200]!r}")
                return
            if len(self.buf) < end + 4 + length:
                if headers.get("expect", "").lower() == "100-continue":
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self.handle(lines[0], headers, body)

    def fail(self, status: int, why: str) -> None:
        st = self.app.stats
        st.bad_request += 1
        st.bad(why)
        assert self.transport is not None
        self.transport.write(_response(status, close=True))
        self.transport.close()
        self.transport = None

    def handle(self, request_line: str, headers: dict[str, str], body: bytes) -> None:
        app = self.app
        st = app.stats
        st.requests += 1
        if not request_line.startswith("POST "):
            self.fail(400, f"not a POST: {request_line[:200]!r}")
            return
        checked = app.check(headers, body)
        if isinstance(checked, str):
            st.bad_signature += 1
            st.bad(checked)
            st.count("401")
            self.answer(401, (), False, 0.0)
            return
        job, seq, wid = checked
        known = st.wid.get(seq)
        if known is None:
            st.wid[seq] = wid
        elif known != wid:
            st.wid_mismatch += 1
            if len(st.wid_samples) < 20:
                st.wid_samples.append(f"seq {seq}: {known} then {wid}")
        st.req_count[seq] = st.req_count.get(seq, 0) + 1
        last = st.last_seq.get(job, -1)
        if seq < last:
            st.order_violations += 1
            if len(st.order_samples) < 20:
                st.order_samples.append(f"job {job}: seq {seq} requested after seq {last}")
        else:
            st.last_seq[job] = seq
        outcome = app.decide()
        st.count(outcome)
        rng = app.rng
        delay = rng.uniform(app.delay_lo, app.delay_hi) if rng.random() < app.p_delay else 0.0
        if delay:
            st.delayed += 1
        if outcome == "reset":
            self.reset(rng.random() < 0.5, delay)
            return
        extra: tuple[tuple[str, str], ...] = ()
        close = False
        if outcome == "5xx":
            status = rng.choice((500, 502, 503, 504))
        elif outcome == "429":
            status, extra = 429, (("Retry-After", "0"),)
        elif outcome == "410":
            status = 410
        else:  # ok or stall: a 2xx
            r = rng.random()
            status = 202 if r < 0.05 else 204 if r < 0.10 else 200
            close = rng.random() < app.p_close
            if outcome == "stall":
                delay = app.stall
            n = st.ok_count.get(seq, 0)
            st.ok_count[seq] = n + 1
            if n == 0:
                first = st.ok_first.get(job)
                if first is None:
                    st.ok_first[job] = [seq]
                else:
                    first.append(seq)
        self.answer(status, extra, close, delay)

    def answer(self, status: int, extra: tuple[tuple[str, str], ...], close: bool, delay: float) -> None:
        self.app.stats.statuses[status] = self.app.stats.statuses.get(status, 0) + 1
        data = _response(status, extra, close)
        if delay:
            self.busy = True
            asyncio.get_running_loop().call_later(delay, self._send_later, data, close)
        else:
            self._send(data, close)

    def _send_later(self, data: bytes, close: bool) -> None:
        self.busy = False
        if self.gone or self.transport is None:
            self.app.stats.answers_lost += 1
            return
        self._send(data, close)
        self.process()

    def _send(self, data: bytes, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if close:
            self.transport.close()
            self.transport = None

    def reset(self, rst: bool, delay: float) -> None:
        if delay:
            self.busy = True
            asyncio.get_running_loop().call_later(delay, self._reset_now, rst)
        else:
            self._reset_now(rst)

    def _reset_now(self, rst: bool) -> None:
        self.busy = False
        transport, self.transport = self.transport, None
        if transport is None:
            return
        if rst:
            sock = transport.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except (OSError, AttributeError):
                pass
            transport.abort()
        else:
            transport.close()


async def serve(args: argparse.Namespace) -> None:
    app = Flaky(args)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Conn(app), args.host, args.port, backlog=1024, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(json.dumps({"port": port, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    done = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: done.done() or done.set_result(None))

    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            msg = json.loads(line)
            cmd = msg.get("cmd")
            if cmd == "report":
                out: dict[str, Any] = app.stats.report()
            elif cmd == "lookup":
                st = app.stats
                out = {
                    "seqs": {
                        str(s): {"wid": st.wid.get(s), "requests": st.req_count.get(s, 0), "ok": st.ok_count.get(s, 0)}
                        for s in msg.get("seqs", [])
                    }
                }
            else:
                out = {"error": f"unknown command {cmd!r}"}
            sys.stdout.write(json.dumps(out, separators=(",", ":")) + "\n")
            sys.stdout.flush()

    cmd_task = asyncio.ensure_future(commands())
    await asyncio.wait([cmd_task, done], return_when=asyncio.FIRST_COMPLETED)
    server.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: a random free port (default)")
    ap.add_argument("--secret", required=True, help="the notifier's signing_secret")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--p-reset", type=float, default=0.03)
    ap.add_argument("--p-5xx", type=float, default=0.10)
    ap.add_argument("--p-429", type=float, default=0.01)
    ap.add_argument("--p-410", type=float, default=0.0002)
    ap.add_argument("--p-stall", type=float, default=0.001)
    ap.add_argument("--stall-secs", type=float, default=1.5)
    ap.add_argument("--p-delay", type=float, default=0.05)
    ap.add_argument("--delay-ms", type=float, nargs=2, default=(50.0, 200.0), metavar=("LO", "HI"))
    ap.add_argument("--p-close", type=float, default=0.01, help="2xx answers with Connection: close")
    ap.add_argument("--no-uvloop", action="store_true")
    args = ap.parse_args()
    factory = None
    if not args.no_uvloop:
        try:
            import uvloop  # type: ignore[import-not-found]

            factory = uvloop.new_event_loop
        except ImportError:
            pass
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(args))
    else:  # 3.10: no Runner
        if factory is not None:
            asyncio.set_event_loop_policy(__import__("uvloop").EventLoopPolicy())
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
