"""A hostile HTTP receiver for fault-injection tests.

:class:`HostileReceiver` listens on 127.0.0.1 and a random free port and
serves each TCP connection from its own thread with raw sockets, so it can
misbehave precisely: reset the connection in the middle of a request, write
half a response, never answer, stream an endless or 100 MB body, drip a body
one byte per second, send bytes that are not HTTP. It records what it saw on
every connection (the request head, how many bytes went each way, how the
connection ended) and stops cleanly (every thread joined, every socket
closed), also while a behaviour is holding a connection or dripping bytes.

A *behaviour* is a callable taking a :class:`Conn`; the factories below
(:func:`respond`, :func:`rst_mid_request`, :func:`never_answer`, ...) build
the usual ones. Which behaviour serves a connection:

1. the next one queued with :meth:`HostileReceiver.script` (per connection,
   in accept order; nothing has been read yet when it starts), else
2. the one routed with :meth:`HostileReceiver.route` for the request's path
   (the request head has been read by then), else
3. the default given to the constructor.

Every connection carries one request at most: well-behaved answers say
``Connection: close`` and close, so each attempt of a client is one
connection and :attr:`HostileReceiver.connections` is the attempt log as the
server saw it.

Nothing here talks to anything but the loopback interface.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType

__all__ = [
    "Behaviour",
    "Conn",
    "ConnRecord",
    "HostileReceiver",
    "RequestHead",
    "close_on_accept",
    "endless_chunked",
    "huge_body",
    "never_answer",
    "raw",
    "reset_on_accept",
    "respond",
    "rst_mid_request",
    "slow_body",
    "slow_head",
]

_JOIN_TIMEOUT = 5.0
_MAX_HEAD = 64 * 1024

Behaviour = Callable[["Conn"], None]


@dataclass(frozen=True)
class RequestHead:
    """The request line and headers as received."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    raw: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def content_length(self) -> int:
        value = self.header("Content-Length")
        return int(value) if value is not None and value.strip().isdigit() else 0


@dataclass
class ConnRecord:
    """What happened on one TCP connection."""

    #: 1, 2, ... in accept order.
    id: int
    #: time.monotonic() at accept.
    accepted_at: float
    #: Name of the behaviour that served it ("" until chosen).
    behaviour: str = ""
    head: RequestHead | None = None
    #: Request body bytes the behaviour consumed (read_body).
    body_received: int = 0
    #: Every byte read from the client, head included.
    bytes_received: int = 0
    #: Bytes the kernel accepted from us (sent or buffered for the peer).
    bytes_sent: int = 0
    #: time.monotonic() when the server was done with the connection.
    ended_at: float | None = None
    #: How it ended: "done" (the behaviour finished and closed), "reset" (we
    #: sent a RST), "peer-closed", "peer-reset" (the client went away first),
    #: "stopped" (the receiver stopped while the behaviour was running).
    end: str = ""
    #: Milestones a behaviour reached, in order ("holding", "head-sent", ...).
    marks: list[str] = field(default_factory=list)

    @property
    def path(self) -> str | None:
        return None if self.head is None else self.head.target

    @property
    def duration(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.accepted_at


class _PeerGone(Exception):
    """The client closed or reset the connection."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class _Stopping(Exception):
    """The receiver is stopping."""


class Conn:
    """One accepted connection, as a behaviour sees it. Reads and writes
    raise internally when the client goes away or the receiver stops; the
    receiver records that as the connection's end, so behaviours are plain
    straight-line code."""

    def __init__(self, owner: HostileReceiver, sock: socket.socket, record: ConnRecord) -> None:
        self._owner = owner
        self.sock = sock
        self.record = record
        self._buf = b""
        self._closed = False

    # -- reading -------------------------------------------------------------------
    def _recv(self, n: int = 65536) -> bytes:
        self._check_stopping()
        try:
            data = self.sock.recv(n)
        except (ConnectionResetError, ConnectionAbortedError):
            self._check_stopping()
            raise _PeerGone("peer-reset") from None
        except OSError:
            self._check_stopping()
            raise
        if not data:
            self._check_stopping()
            raise _PeerGone("peer-closed")
        self._owner._update(self.record, bytes_received=len(data))
        return data

    def read_head(self) -> RequestHead:
        """Reads the request line and headers (once; later calls return the
        same head)."""
        if self.record.head is not None:
            return self.record.head
        while b"\r\n\r\n" not in self._buf:
            if len(self._buf) > _MAX_HEAD:
                raise ValueError("request head too large")
            self._buf += self._recv()
        raw_head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        method, target, version = (lines[0].split(" ", 2) + ["", ""])[:3]
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        head = RequestHead(method, target, version, tuple(headers), raw_head + b"\r\n\r\n")
        self._owner._update(self.record, head=head)
        return head

    def read_body(self, limit: int | None = None) -> bytes:
        """Reads the request body (Content-Length bytes), or only its first
        ``limit`` bytes."""
        want = self.read_head().content_length
        if limit is not None:
            want = min(want, limit)
        while len(self._buf) < want:
            self._buf += self._recv()
        body, self._buf = self._buf[:want], self._buf[want:]
        self._owner._update(self.record, body_received=len(body))
        return body

    def read_request(self) -> tuple[RequestHead, bytes]:
        """Reads the whole request: head and body."""
        return self.read_head(), self.read_body()

    # -- writing -------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Writes all of ``data`` (counted as it is accepted by the kernel)."""
        view = memoryview(data)
        while view:
            self._check_stopping()
            try:
                n = self.sock.send(view)
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                self._check_stopping()
                raise _PeerGone("peer-reset") from None
            except OSError:
                self._check_stopping()
                raise
            self._owner._update(self.record, bytes_sent=n)
            view = view[n:]

    def limit_send_buffer(self, size: int = 16 * 1024) -> None:
        """Shrinks SO_SNDBUF, so bytes_sent stays close to what the client
        actually took (the kernel buffers less on our side)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    # -- waiting -------------------------------------------------------------------
    def mark(self, name: str) -> None:
        """Records a milestone (tests wait for it with wait_for_mark)."""
        self._owner._mark(self.record, name)

    def pause(self, seconds: float | None) -> None:
        """Waits ``seconds`` (None: for ever) unless the client goes away or
        the receiver stops first (then raises). Bytes the client sends
        meanwhile are read and counted."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            readable, _, _ = select.select([self.sock, self._owner._wake_r], [], [], left)
            self._check_stopping()
            if self.sock in readable:
                self._buf += self._recv()

    def hold(self) -> None:
        """Never answers: waits until the client gives up (or the receiver
        stops)."""
        self.mark("holding")
        self.pause(None)

    # -- ending --------------------------------------------------------------------
    def reset(self) -> None:
        """Aborts the connection with a TCP RST (SO_LINGER 0, then close)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._close("reset")

    def close(self) -> None:
        """Closes the connection with a FIN (the request must have been read
        entirely, else the kernel sends a RST)."""
        self._close("done")

    def _close(self, how: str) -> None:
        if not self._closed:
            self._closed = True
            self._owner._finish(self, how)

    def _check_stopping(self) -> None:
        if self._owner._stopping.is_set():
            raise _Stopping()


def _named(name: str, fn: Behaviour) -> Behaviour:
    fn.__name__ = name  # type: ignore[attr-defined]
    fn.__qualname__ = name  # type: ignore[attr-defined]
    return fn


def _status_line(status: int) -> bytes:
    reasons = {200: "OK", 301: "Moved Permanently", 302: "Found", 303: "See Other",
               307: "Temporary Redirect", 308: "Permanent Redirect", 500: "Internal Server Error"}
    return f"HTTP/1.1 {status} {reasons.get(status, 'Status')}\r\n".encode()


# -- behaviours ------------------------------------------------------------------------
def respond(status: int = 200, headers: dict[str, str] | None = None, body: bytes = b"") -> Behaviour:
    """A well-formed answer (with Content-Length and Connection: close)."""

    def behaviour(conn: Conn) -> None:
        conn.read_request()
        lines = [_status_line(status)]
        for name, value in {"Content-Length": str(len(body)), "Connection": "close", **(headers or {})}.items():
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        conn.send(b"".join(lines) + b"\r\n" + body)
        conn.close()

    return _named(f"respond({status})", behaviour)


def reset_on_accept() -> Behaviour:
    """RST before reading anything."""

    def behaviour(conn: Conn) -> None:
        conn.reset()

    return _named("reset_on_accept", behaviour)


def close_on_accept() -> Behaviour:
    """FIN before reading anything, no answer."""

    def behaviour(conn: Conn) -> None:
        conn.close()

    return _named("close_on_accept", behaviour)


def rst_mid_request(body_bytes: int = 16) -> Behaviour:
    """Reads the head and ``body_bytes`` of the body, then RST."""

    def behaviour(conn: Conn) -> None:
        head = conn.read_head()
        assert head.content_length > body_bytes, "the request body is too short to cut"
        conn.read_body(limit=body_bytes)
        conn.mark("cut")
        conn.reset()

    return _named("rst_mid_request", behaviour)


def raw(data: bytes, then: str = "close") -> Behaviour:
    """Reads the request, writes ``data`` as is, then "close" (FIN),
    "reset" (RST) or "hold" (waits for the client to give up)."""
    assert then in ("close", "reset", "hold")

    def behaviour(conn: Conn) -> None:
        conn.read_request()
        conn.send(data)
        conn.mark("sent")
        if then == "hold":
            conn.hold()
        elif then == "reset":
            conn.reset()
        else:
            conn.close()

    return _named(f"raw({data[:24]!r}..., then={then})", behaviour)


def never_answer() -> Behaviour:
    """Reads the request and never answers (keeps the connection open until
    the client gives up)."""

    def behaviour(conn: Conn) -> None:
        conn.read_request()
        conn.hold()

    return _named("never_answer", behaviour)


def huge_body(total: int = 100 * 1024 * 1024, status: int = 200, chunk: int = 64 * 1024) -> Behaviour:
    """A status and ``Content-Length: total``, then ``total`` bytes as fast
    as the client takes them (with a small send buffer on our side)."""

    def behaviour(conn: Conn) -> None:
        conn.read_request()
        conn.limit_send_buffer()
        conn.send(_status_line(status) + f"Content-Length: {total}\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
        conn.mark("head-sent")
        block = b"x" * chunk
        left = total
        while left > 0:
            piece = block if left >= chunk else block[:left]
            conn.send(piece)
            left -= len(piece)
        conn.mark("body-complete")
        conn.close()

    return _named(f"huge_body({total}, {status})", behaviour)


def endless_chunked(status: int = 200, chunk: int = 4096) -> Behaviour:
    """A status with ``Transfer-Encoding: chunked``, then chunks for ever."""

    def behaviour(conn: Conn) -> None:
        conn.read_request()
        conn.limit_send_buffer()
        conn.send(_status_line(status) + b"Transfer-Encoding: chunked\r\n\r\n")
        conn.mark("head-sent")
        frame = f"{chunk:x}\r\n".encode() + b"y" * chunk + b"\r\n"
        while True:
            conn.send(frame)

    return _named(f"endless_chunked({status})", behaviour)


def slow_body(interval: float = 1.0, status: int = 200, length: int = 1000) -> Behaviour:
    """A status and headers at once, then the body one byte per ``interval``."""

    def behaviour(conn: Conn) -> None:
        conn.read_request()
        conn.send(_status_line(status) + f"Content-Length: {length}\r\n\r\n".encode())
        conn.mark("head-sent")
        for _ in range(length):
            conn.send(b"z")
            conn.mark("byte")
            conn.pause(interval)
        conn.close()

    return _named(f"slow_body({interval})", behaviour)


def slow_head(interval: float = 1.0, status: int = 200) -> Behaviour:
    """The status line and headers one byte per ``interval``."""

    def behaviour(conn: Conn) -> None:
        conn.read_request()
        for byte in _status_line(status) + b"Content-Length: 0\r\n\r\n":
            conn.send(bytes([byte]))
            conn.mark("byte")
            conn.pause(interval)
        conn.close()

    return _named(f"slow_head({interval})", behaviour)


# -- the receiver ------------------------------------------------------------------------
class HostileReceiver:
    """A raw-socket HTTP server on 127.0.0.1 (random free port) whose
    connections are served by scripted misbehaviours. Thread-safe; use it as
    a context manager or call :meth:`start` and :meth:`stop`."""

    def __init__(self, default: Behaviour | None = None, *, host: str = "127.0.0.1") -> None:
        self.host = host
        self._default = default or respond(200)
        self._routes: dict[str, Behaviour] = {}
        self._script: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._records: list[ConnRecord] = []
        self._accepted = 0
        self._live: dict[int, tuple[socket.socket, threading.Thread]] = {}
        self._errors: list[BaseException] = []
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread: threading.Thread | None = None
        self._port = 0
        #: Thread names that did not finish within the join timeout at stop().
        self.stuck: list[str] = []
        #: The most connections open at once.
        self.peak_active = 0

    # -- lifetime ------------------------------------------------------------------
    def start(self) -> HostileReceiver:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(128)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"HostileReceiver-{self._port}", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stops accepting, wakes every behaviour (held connections, drips),
        closes every socket and joins every thread. Idempotent."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
        self._wake_w.send(b"x")  # never read: wakes every select() for good
        if self._accept_thread is not None:
            self._accept_thread.join(_JOIN_TIMEOUT)
            if self._accept_thread.is_alive():
                self.stuck.append(self._accept_thread.name)
        with self._lock:
            live = list(self._live.values())
        for sock, _ in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for _, thread in live:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                self.stuck.append(thread.name)
        with self._lock:
            leftover = list(self._live.values())
            self._live.clear()
        for sock, _ in leftover:
            sock.close()
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> HostileReceiver:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def url_for(self, path: str = "/hook") -> str:
        return self.url + (path if path.startswith("/") else "/" + path)

    # -- scripting -----------------------------------------------------------------
    def route(self, path: str, behaviour: Behaviour) -> str:
        """Serves requests for ``path`` (exact request target) with
        ``behaviour``. Returns the full URL."""
        with self._lock:
            self._routes[path] = behaviour
        return self.url_for(path)

    def script(self, *behaviours: Behaviour) -> None:
        """Queues behaviours for the next connections, one each, in accept
        order (before any route or the default)."""
        with self._lock:
            self._script.extend(behaviours)

    # -- observations --------------------------------------------------------------
    @property
    def connections(self) -> list[ConnRecord]:
        """Records of every connection so far, in accept order (copies)."""
        with self._lock:
            return [ConnRecord(**{**r.__dict__, "marks": list(r.marks)}) for r in self._records]

    def connections_for(self, path: str) -> list[ConnRecord]:
        return [r for r in self.connections if r.path == path]

    @property
    def accepted(self) -> int:
        """Connections accepted since start (forget() does not change it)."""
        with self._lock:
            return self._accepted

    def forget(self) -> None:
        """Drops the records of connections that have ended (long runs keep
        memory flat; ``accepted`` still counts them)."""
        with self._lock:
            self._records = [r for r in self._records if r.ended_at is None]

    @property
    def active(self) -> int:
        """Connections whose behaviour has not finished yet."""
        with self._lock:
            return len(self._live)

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions raised by behaviours (not the client going away)."""
        with self._lock:
            return list(self._errors)

    def wait_until(self, predicate: Callable[[list[ConnRecord]], bool], timeout: float = 5.0) -> bool:
        """Blocks until ``predicate(records)`` holds (True) or ``timeout``
        passed (False). Re-checked whenever a connection changes."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._records), timeout)

    def wait_for_connections(self, n: int, timeout: float = 5.0) -> bool:
        return self.wait_until(lambda recs: len(recs) >= n, timeout)

    def wait_for_mark(self, mark: str, count: int = 1, timeout: float = 5.0, path: str | None = None) -> bool:
        """Blocks until ``count`` connections (of ``path``, if given) reached
        ``mark``."""
        return self.wait_until(
            lambda recs: sum(1 for r in recs if mark in r.marks and (path is None or r.path == path)) >= count,
            timeout,
        )

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Blocks until every connection accepted so far has ended."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._live, timeout)

    # -- internals -----------------------------------------------------------------
    def _update(self, record: ConnRecord, **deltas: object) -> None:
        with self._cond:
            for name, value in deltas.items():
                if name == "head":
                    record.head = value  # type: ignore[assignment]
                else:
                    setattr(record, name, getattr(record, name) + value)
            self._cond.notify_all()

    def _mark(self, record: ConnRecord, name: str) -> None:
        with self._cond:
            record.marks.append(name)
            self._cond.notify_all()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            readable, _, _ = select.select([self._listener, self._wake_r], [], [])
            if self._stopping.is_set():
                return
            if self._listener not in readable:
                continue
            try:
                sock, _ = self._listener.accept()
            except OSError:
                continue
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                self._accepted += 1
                record = ConnRecord(id=self._accepted, accepted_at=time.monotonic())
                self._records.append(record)
                behaviour = self._script.popleft() if self._script else None
                conn = Conn(self, sock, record)
                thread = threading.Thread(
                    target=self._serve, args=(conn, behaviour), name=f"Hostile-{self._port}-conn{record.id}", daemon=True
                )
                self._live[record.id] = (sock, thread)
                self.peak_active = max(self.peak_active, len(self._live))
                self._cond.notify_all()
            thread.start()

    def _serve(self, conn: Conn, behaviour: Behaviour | None) -> None:
        how = "done"
        try:
            if behaviour is None:
                head = conn.read_head()
                with self._lock:
                    behaviour = self._routes.get(head.target, self._default)
            with self._cond:
                conn.record.behaviour = getattr(behaviour, "__name__", repr(behaviour))
            behaviour(conn)
        except _PeerGone as gone:
            how = gone.how
        except _Stopping:
            how = "stopped"
        except OSError as exc:
            how = "stopped" if self._stopping.is_set() else f"error: {exc!r}"
        except BaseException as exc:  # a bug in a behaviour: the test must fail
            how = f"error: {exc!r}"
            with self._lock:
                self._errors.append(exc)
        finally:
            conn._close(how)

    def _finish(self, conn: Conn, how: str) -> None:
        with self._cond:
            if conn.record.ended_at is None:
                conn.record.ended_at = time.monotonic()
                conn.record.end = how
            self._live.pop(conn.record.id, None)
            self._cond.notify_all()
        try:
            conn.sock.close()
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"<HostileReceiver {self.url} connections={self._accepted} active={len(self._live)}>"


def chunked(frames: Iterable[bytes]) -> bytes:
    """Encodes byte strings as HTTP/1.1 chunks, with the final 0 chunk."""
    return b"".join(f"{len(f):x}\r\n".encode() + f + b"\r\n" for f in frames) + b"0\r\n\r\n"
