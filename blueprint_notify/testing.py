"""Test helpers for code that sends blueprint_notify webhooks.

:class:`WebhookReceiver` is a real HTTP/1.1 server on a loopback address and
a random free port, run in a background thread. It records every request
(method, path, headers, body, whether the webhook signature verifies, which
TCP connection carried it), answers with scripted responses, and lets a test
block until a number of requests have arrived::

    from blueprint_notify import JobEvent, JobNotifier
    from blueprint_notify.testing import WebhookReceiver

    with WebhookReceiver(secret="s3cret") as receiver, JobNotifier(
        signing_secret="s3cret", allow_private_networks=True
    ) as notifier:
        receiver.respond_with(500, times=1)          # first attempt fails
        notifier.notify("job-1", JobEvent("completed"), receiver.url_for("/hook"))
        assert notifier.flush(5)
        first, second = receiver.requests
        assert first.status == 500 and second.status == 200
        assert second.verified

The receiver is deliberately well behaved HTTP/1.1: it keeps connections
alive until the client closes them, always sends ``Content-Length`` (except
for streamed bodies, which are sent chunked) and never closes a connection
on its own unless a scripted response asks for it. That makes connection
reuse observable (:attr:`WebhookReceiver.connections_accepted`,
:attr:`ReceivedRequest.connection_id`).

Webhooks to loopback addresses are refused by the notifier's SSRF guard
unless it was created with ``allow_private_networks=True``.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import logging
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Union

__all__ = [
    "Handler",
    "HandlerResult",
    "Headers",
    "ReceivedRequest",
    "Response",
    "WebhookReceiver",
    "compute_signature",
    "verify_signature",
]

logger = logging.getLogger("blueprint_notify.testing")

#: Header names used by blueprint_notify webhooks.
SIGNATURE_HEADER = "X-Webhook-Signature"
TIMESTAMP_HEADER = "X-Webhook-Timestamp"
JOB_ID_HEADER = "X-Job-Id"

_MAX_BODY = 64 * 1024 * 1024
_JOIN_TIMEOUT = 5.0


def compute_signature(secret: str | bytes, timestamp: str | int | bytes, body: bytes) -> str:
    """The ``X-Webhook-Signature`` value a webhook with this timestamp and body
    must carry: ``"sha256=" + hex(HMAC-SHA256(secret, b"{timestamp}." + body))``.

    A str secret is used as its UTF-8 bytes, a str timestamp as its Latin-1
    bytes (what an HTTP header value carries on the wire)."""
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if isinstance(timestamp, int):
        ts = str(timestamp).encode("ascii")
    elif isinstance(timestamp, str):
        ts = timestamp.encode("latin-1")
    else:
        ts = bytes(timestamp)
    return "sha256=" + hmac.new(key, ts + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str | bytes,
    signature: str | None,
    timestamp: str | None,
    body: bytes,
) -> bool:
    """True if ``signature`` (an ``X-Webhook-Signature`` value) is the
    signature of ``body`` at ``timestamp`` (an ``X-Webhook-Timestamp`` value)
    under ``secret``. Compared in constant time; missing values are False."""
    if signature is None or timestamp is None:
        return False
    try:
        expected = compute_signature(secret, timestamp, body).encode("ascii")
        given = signature.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(given, expected)


def _verified(secret: str | bytes, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether the request carries a valid signature of either scheme (the
    Standard Webhooks one wins when both are present)."""
    from ._verify import SignatureError, verify

    key = secret.decode("utf-8") if isinstance(secret, bytes) else secret
    try:
        verify(body, headers, key)
    except (SignatureError, TypeError, ValueError):
        return False
    if "webhook-signature" in headers and SIGNATURE_HEADER in headers:
        # Both schemes present: the blueprint one must hold too.
        return verify_signature(secret, headers.get(SIGNATURE_HEADER), headers.get(TIMESTAMP_HEADER), body)
    return True


class Headers(Mapping[str, str]):
    """Request headers as a read-only, case-insensitive mapping.

    Values are the header bytes decoded as Latin-1 (as WSGI does), so every
    byte round-trips: ``headers["X-Job-Id"].encode("latin-1")`` are the exact
    bytes received; :meth:`get_bytes` does that for you. Repeated headers are
    joined with ``", "``; :attr:`raw` keeps every (name, value) as received.
    """

    __slots__ = ("_map", "raw")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self.raw: tuple[tuple[str, str], ...] = tuple(items)
        merged: dict[str, str] = {}
        for name, value in self.raw:
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        self._map = merged

    def __getitem__(self, name: str) -> str:
        return self._map[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def get_bytes(self, name: str) -> bytes | None:
        """The raw bytes of a header's value, or None if it is absent."""
        value = self._map.get(name.lower())
        return None if value is None else value.encode("latin-1")

    def __repr__(self) -> str:
        return f"Headers({self._map!r})"


@dataclass
class ReceivedRequest:
    """One HTTP request the receiver got.

    ``status`` is the status code the receiver chose to answer with (it is
    recorded before any scripted delay, so the request is visible to
    :meth:`WebhookReceiver.wait_for` while its answer is still pending).
    """

    #: Position in arrival order, from 0.
    index: int
    method: str
    #: The request target as sent (path and query).
    path: str
    headers: Headers
    body: bytes
    #: Whether the webhook signature verifies (None: the receiver has no secret).
    verified: bool | None
    #: Identifies the TCP connection (1, 2, ... in accept order).
    connection_id: int
    #: time.monotonic() when the request had been read.
    received_at: float
    #: The status code answered (0 until chosen).
    status: int = 0

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    @property
    def job_id(self) -> str | None:
        """The ``X-Job-Id`` header decoded as UTF-8 (None if absent)."""
        raw = self.headers.get_bytes(JOB_ID_HEADER)
        return None if raw is None else raw.decode("utf-8", "surrogateescape")

    @property
    def timestamp(self) -> int | None:
        """The ``X-Webhook-Timestamp`` header as an int (None if absent or bad)."""
        value = self.headers.get(TIMESTAMP_HEADER)
        try:
            return None if value is None else int(value)
        except ValueError:
            return None

    @property
    def signature(self) -> str | None:
        """The ``X-Webhook-Signature`` header (None if absent)."""
        return self.headers.get(SIGNATURE_HEADER)


@dataclass(frozen=True)
class Response:
    """A scripted answer.

    ``body`` is sent with a ``Content-Length``; ``stream`` (an iterable of
    byte chunks, or a callable returning one, called for each response) is
    sent with ``Transfer-Encoding: chunked`` instead and may be endless (it
    stops when the client goes away or the receiver stops). A plain iterator
    is used up by the first response that gets it: pass a callable for a
    response used more than once.
    ``delay`` seconds pass on the server before the answer is written.
    ``close`` closes the connection after answering and announces it with
    ``Connection: close``, unless ``headers`` has its own ``Connection``
    header (``{"Connection": "keep-alive"}`` with ``close=True`` simulates a
    server dropping a keep-alive connection unannounced).
    """

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float | None = None
    stream: Iterable[bytes] | Callable[[], Iterable[bytes]] | None = None
    close: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.status, bool) or not isinstance(self.status, int):
            raise TypeError(f"status must be an int, not {type(self.status).__name__}")
        if not 100 <= self.status <= 999:
            raise ValueError(f"status must be between 100 and 999, got {self.status}")
        if not isinstance(self.body, (bytes, bytearray, memoryview)):
            raise TypeError(f"body must be bytes, not {type(self.body).__name__}")
        if self.delay is not None and not self.delay >= 0:
            raise ValueError(f"delay must be a non-negative number of seconds, got {self.delay}")
        for name, value in self.headers.items():
            text = f"{name}{value}"
            if "\r" in text or "\n" in text:
                raise ValueError(f"header {name!r} must not contain CR or LF")


HandlerResult = Union[Response, tuple[int, Mapping[str, str], bytes], int, None]
#: A custom request handler: called (on a server thread) for every request
#: before the scripted responses; returning None falls back to them.
Handler = Callable[[ReceivedRequest], HandlerResult]


def _as_response(result: HandlerResult) -> Response | None:
    if result is None or isinstance(result, Response):
        return result
    if isinstance(result, int) and not isinstance(result, bool):
        return Response(result)
    if isinstance(result, tuple) and len(result) == 3:
        status, headers, body = result
        return Response(status, dict(headers or {}), bytes(body))
    raise TypeError(
        "a handler must return a Response, an int status, a (status, headers, body) "
        f"tuple or None, not {type(result).__name__}"
    )


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "blueprint-notify-testing"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection_id = self.server.owner._connection_id(self.request)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        logger.debug("%s - %s", self.address_string(), format % args)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            total = 0
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                total += size
                if total > _MAX_BODY:
                    raise ValueError("request body too large")
                parts.append(self.rfile.read(size))
                self.rfile.readline(3)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > _MAX_BODY:
            raise ValueError(f"bad Content-Length {length}")
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        owner = self.server.owner
        try:
            body = self._read_body()
        except ValueError:
            self.send_error(400, "bad request body")
            self.close_connection = True
            return
        req, response = owner._record(self, body)
        if response.delay:
            owner._stopping.wait(response.delay)  # server-side delay
        if owner._stopping.is_set():
            self.close_connection = True
            return
        self._send(response)

    def _send(self, response: Response) -> None:
        status = response.status
        reason = self.responses.get(status, ("",))[0]
        lines = [f"HTTP/1.1 {status} {reason}".rstrip()]
        lines.append(f"Server: {self.server_version}")
        lines.append(f"Date: {self.date_time_string()}")
        user = {name.lower() for name in response.headers}
        streamed = response.stream is not None and self.command != "HEAD"
        if streamed:
            lines.append("Transfer-Encoding: chunked")
        elif "content-length" not in user:
            lines.append(f"Content-Length: {len(response.body)}")
        if response.close and "connection" not in user:
            lines.append("Connection: close")
        for name, value in response.headers.items():
            lines.append(f"{name}: {value}")
            if name.lower() == "connection" and value.strip().lower() == "close":
                self.close_connection = True
        if response.close:
            self.close_connection = True
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.command == "HEAD":
            self.wfile.write(head)
        elif streamed:
            self.wfile.write(head)
            stopping = self.server.owner._stopping
            stream = response.stream
            assert stream is not None
            chunks = stream() if callable(stream) else stream
            for chunk in chunks:
                if stopping.is_set():
                    self.close_connection = True
                    return
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        else:
            # One write: no Nagle/delayed-ACK stall between head and body.
            self.wfile.write(head + bytes(response.body))
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # the owner joins its threads itself
    allow_reuse_address = False
    # socketserver's default backlog of 5 drops the SYNs of a burst of new
    # connections, which then wait a whole second for the retransmit.
    request_queue_size = 1024

    def __init__(self, owner: WebhookReceiver, host: str, port: int = 0) -> None:
        self.owner = owner
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _RequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn): skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        conn_id = self.owner._accepted(request)
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"WebhookReceiver-conn-{conn_id}",
            daemon=True,
        )
        self.owner._track_thread(thread)
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.finish_request(request, client_address)
        except (ConnectionError, TimeoutError):
            pass  # the client went away (or the receiver stopped)
        except OSError as exc:
            if not self.owner._stopping.is_set():
                self.owner._record_error(exc)
        except Exception as exc:  # a bug in a handler hook or in the receiver
            self.owner._record_error(exc)
        finally:
            self.shutdown_request(request)
            self.owner._forget(request)


class WebhookReceiver:
    """A real HTTP/1.1 keep-alive server on ``host`` and a random free port,
    served from background threads, that records webhook requests.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    Every method is thread-safe.

    Answers come, per request, from the optional ``handler`` hook first, then
    from responses queued with :meth:`respond_with` (first in, first out),
    then from the default response (200 with an empty body, or whatever the
    last ``respond_with(..., times=None)`` set).
    """

    def __init__(
        self,
        secret: str | bytes | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        handler: Handler | None = None,
    ) -> None:
        self.secret = secret
        self.host = host
        self._bind_port = port
        self._handler = handler
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._requests: list[ReceivedRequest] = []
        self._script: deque[list[Any]] = deque()  # [Response, times left]
        self._default = Response(200)
        self._connections: dict[socket.socket, int] = {}
        self._connections_accepted = 0
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._port = 0

    # -- lifetime ---------------------------------------------------------------
    def start(self) -> WebhookReceiver:
        """Binds the port and starts serving. Returns self."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError("WebhookReceiver already started")
            if self._stopping.is_set():
                raise RuntimeError("a stopped WebhookReceiver cannot be restarted")
            self._server = _Server(self, self.host, self._bind_port)
            self._port = int(self._server.server_address[1])
            self._serve_thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"WebhookReceiver-{self._port}",
                daemon=True,
            )
            self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Stops serving: ends pending delays and streams, closes the listening
        socket and every connection, and joins the threads. Idempotent."""
        with self._lock:
            server, self._server = self._server, None
            if server is None:
                self._stopping.set()
                return
            self._stopping.set()
        server.shutdown()  # returns once serve_forever has exited
        server.server_close()
        with self._lock:
            conns = list(self._connections)
            threads = list(self._threads)
            self._cond.notify_all()
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._serve_thread is not None:
            self._serve_thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            leftover = list(self._connections)
            self._connections.clear()
        for sock in leftover:  # only if a thread failed to finish in time
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        with self._lock:
            return self._server is not None

    # -- addresses --------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port (0 before start())."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT`` (IPv6 hosts in brackets)."""
        if not self._port:
            raise RuntimeError("WebhookReceiver is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    def url_for(self, path: str = "/hook") -> str:
        """``url`` joined with ``path`` (a leading slash is added if missing)."""
        return self.url + (path if path.startswith("/") else "/" + path)

    # -- scripting ----------------------------------------------------------------
    def respond_with(
        self,
        status: int,
        headers: Mapping[str, str] | None = None,
        times: int | None = None,
        delay: float | None = None,
        body: bytes = b"",
    ) -> None:
        """Scripts answers. With ``times=n`` the next n requests (after any
        answers queued before) get this answer; with ``times=None`` it becomes
        the default for every request once the queue is empty."""
        response = Response(status, dict(headers or {}), bytes(body), delay)
        self.respond(response, times=times)

    def respond(self, response: Response, *, times: int | None = None) -> None:
        """Like :meth:`respond_with`, with a prepared :class:`Response` (for
        streamed bodies or ``close``)."""
        if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
            raise ValueError(f"times must be a positive int or None, got {times!r}")
        with self._lock:
            if times is None:
                self._default = response
            else:
                self._script.append([response, times])

    def set_handler(self, handler: Handler | None) -> None:
        """Installs (or with None removes) the handler hook. It is called on a
        server thread for each request; returning None falls back to the
        script. Exceptions it raises are answered with 500 and kept in
        :attr:`errors`."""
        with self._lock:
            self._handler = handler

    def reset(self) -> None:
        """Forgets recorded requests, errors and scripted answers (the
        default answer becomes 200 again). Connection counts are kept."""
        with self._lock:
            self._requests.clear()
            self._errors.clear()
            self._script.clear()
            self._default = Response(200)

    # -- observations ---------------------------------------------------------------
    @property
    def requests(self) -> list[ReceivedRequest]:
        """A snapshot of the requests received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since start()."""
        with self._lock:
            return self._connections_accepted

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions from handler hooks or the server itself (client
        disconnects are not errors)."""
        with self._lock:
            return list(self._errors)

    def wait_for(self, n: int, timeout: float = 5.0) -> bool:
        """Blocks until at least ``n`` requests have arrived (True) or
        ``timeout`` seconds passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._requests) >= n, timeout)

    def __repr__(self) -> str:
        where = self.url if self._port else "not started"
        return (
            f"<WebhookReceiver {where} requests={len(self._requests)} "
            f"connections={self._connections_accepted}>"
        )

    # -- server callbacks (server threads) -------------------------------------------
    def _accepted(self, sock: socket.socket) -> int:
        with self._lock:
            self._connections_accepted += 1
            conn_id = self._connections_accepted
            self._connections[sock] = conn_id
            self._threads = [t for t in self._threads if t.is_alive()]
            if self._stopping.is_set():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return conn_id

    def _track_thread(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.append(thread)

    def _connection_id(self, sock: socket.socket) -> int:
        with self._lock:
            return self._connections.get(sock, 0)

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.pop(sock, None)

    def _record_error(self, exc: BaseException) -> None:
        logger.error("WebhookReceiver error: %r", exc, exc_info=exc)
        with self._lock:
            self._errors.append(exc)

    def _record(self, h: _RequestHandler, body: bytes) -> tuple[ReceivedRequest, Response]:
        headers = Headers(h.headers.items())
        verified: bool | None = None
        if self.secret is not None:
            verified = _verified(self.secret, headers, body)
        req = ReceivedRequest(
            index=-1,
            method=h.command,
            path=h.path,
            headers=headers,
            body=body,
            verified=verified,
            connection_id=h.connection_id,
            received_at=time.monotonic(),
        )
        with self._lock:
            handler = self._handler
        response: Response | None = None
        if handler is not None:
            try:
                response = _as_response(handler(req))
            except Exception as exc:
                self._record_error(exc)
                response = Response(500, {"Content-Type": "text/plain"}, repr(exc).encode())
        with self._cond:
            if response is None:
                if self._script:
                    entry = self._script[0]
                    response = entry[0]
                    entry[1] -= 1
                    if entry[1] == 0:
                        self._script.popleft()
                else:
                    response = self._default
            req.status = response.status
            req.index = len(self._requests)
            self._requests.append(req)
            self._cond.notify_all()
        return req, response
