"""The well-behaved client of the abuse tests (``tests/test_sse_abuse.py``),
in a process of its own so that the test's own clients (thousands of
sockets, slow readers) cost it nothing::

    python tests/abuse_probe.py --port P --path /v1/jobs/J/events --token T \\
        --count N [--timeout S] [--to-end]

It opens the stream (a plain blocking socket, reading as fast as it can),
writes ``{"ready": true}`` on stdout once the response head and the
``retry:`` frame are in, then reads until it has ``count`` events (or the
stream ends, or ``timeout``) and writes one JSON line: ``events`` (ids in
order), ``latency_us`` (per event, receive time minus the ``result.t``
stamp the server's producer took just before ``notify()``; both
``time.monotonic_ns()``, a system-wide clock), ``lagged`` (a lag frame came),
``pings``, ``ended`` (terminating chunk read), ``eof``, ``status``,
``error`` (None when all went well).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time


class ChunkedReader:
    """Decodes ``Transfer-Encoding: chunked`` from a socket and hands out
    complete SSE frames with the time of the recv() that completed them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = bytearray()
        self.body = bytearray()
        self.ended = False
        self.eof = False
        self.last_recv_ns = 0

    def _recv(self) -> None:
        data = self.sock.recv(1 << 20)
        self.last_recv_ns = time.monotonic_ns()
        if not data:
            self.eof = True
        self.raw += data

    def head(self) -> bytes:
        while b"\r\n\r\n" not in self.raw:
            if self.eof:
                raise ConnectionError(f"closed before the response head: {bytes(self.raw)!r}")
            self._recv()
        head, _, rest = bytes(self.raw).partition(b"\r\n\r\n")
        self.raw = bytearray(rest)
        return head

    def _dechunk(self) -> None:
        while not self.ended:
            end = self.raw.find(b"\r\n")
            if end < 0:
                return
            size = int(bytes(self.raw[:end]).split(b";")[0], 16)
            if size == 0:
                self.ended = True
                return
            if len(self.raw) < end + 2 + size + 2:
                return
            self.body += self.raw[end + 2 : end + 2 + size]
            del self.raw[: end + 2 + size + 2]

    def frames(self) -> tuple[list[bytes], int]:
        """The next complete frames (at least one unless the stream ended)
        and the time they were completed."""
        while True:
            self._dechunk()
            out = []
            while (i := self.body.find(b"\n\n")) >= 0:
                out.append(bytes(self.body[:i]))
                del self.body[: i + 2]
            if out or self.ended or self.eof:
                return out, self.last_recv_ns
            self._recv()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--to-end", action="store_true", help="then read until the stream ends")
    args = parser.parse_args(argv)

    result: dict[str, object] = {
        "events": [], "latency_us": [], "lagged": False, "pings": 0,
        "ended": False, "eof": False, "status": 0, "error": None,
    }  # fmt: skip
    events: list[int] = result["events"]  # type: ignore[assignment]
    latency: list[float] = result["latency_us"]  # type: ignore[assignment]
    deadline = time.monotonic() + args.timeout
    sock = socket.create_connection(("127.0.0.1", args.port), timeout=args.timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(
            (
                f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
                f"Authorization: Bearer {args.token}\r\nAccept: text/event-stream\r\n\r\n"
            ).encode("latin-1")
        )
        reader = ChunkedReader(sock)
        head = reader.head()
        result["status"] = int(head.split(b" ", 2)[1])
        first, _ = reader.frames()
        if not first or not first[0].startswith(b"retry: "):
            raise AssertionError(f"expected the retry frame first, got {first!r}")
        pending = first[1:]
        print(json.dumps({"ready": True}), flush=True)
        when = time.monotonic_ns()
        while len(events) < args.count:
            for frame in pending:
                if frame.startswith(b":"):
                    result["pings"] += 1  # type: ignore[operator]
                    continue
                fields = dict(line.split(b": ", 1) for line in frame.split(b"\n"))
                if fields.get(b"event") == b"error":
                    result["lagged"] = True
                    continue
                events.append(int(fields[b"id"]))
                data = json.loads(fields[b"data"])
                stamp = data.get("result", {}).get("t") if isinstance(data.get("result"), dict) else None
                if stamp is not None:
                    latency.append((when - stamp) / 1000)
            if len(events) >= args.count or reader.ended or reader.eof:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(events)} of {args.count} events within {args.timeout} s")
            sock.settimeout(remaining)
            pending, when = reader.frames()
        while args.to_end and not (reader.ended or reader.eof):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"stream not ended within {args.timeout} s")
            sock.settimeout(remaining)
            rest, _ = reader.frames()
            if any(not f.startswith(b":") for f in rest):
                raise AssertionError(f"frames after the last expected event: {rest!r}")
        result["ended"] = reader.ended
        result["eof"] = reader.eof
    except Exception as exc:  # noqa: BLE001  (reported to the test)
        result["error"] = repr(exc)
    finally:
        sock.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
