"""The WebhookReceiver test helper itself (it is public API: the future
pytest plugin), driven with plain sockets so its HTTP behaviour is checked
independently of libcurl."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from blueprint_notify.testing import (
    Headers,
    Response,
    WebhookReceiver,
    compute_signature,
    verify_signature,
)

SECRET = "test-secret"


def _post(sock: socket.socket, host: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> None:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


def _read_response(f) -> tuple[int, dict[str, str], bytes]:
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while (size := int(f.readline().strip(), 16)) != 0:
            body += f.read(size)
            f.readline()
        f.readline()
        return status, headers, body
    return status, headers, f.read(int(headers.get("content-length", "0")))


def _signed(ts: int, body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"X-Webhook-Timestamp": str(ts), "X-Webhook-Signature": compute_signature(secret, ts, body)}


def test_keep_alive_script_and_signature(receiver) -> None:
    receiver.respond_with(500, times=2)
    receiver.respond_with(202, headers={"X-Reply": "yes"}, times=1, body=b"accepted")
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sock, sock.makefile("rb") as f:
        answers = []
        base = int(time.time())
        for i in range(5):
            body = b'{"i":%d}' % i
            headers = _signed(base + i, body) if i != 3 else {"X-Webhook-Signature": "sha256=00"}
            _post(sock, "x", f"/p{i}", body, headers)
            answers.append(_read_response(f))
    assert [a[0] for a in answers] == [500, 500, 202, 200, 200]
    assert answers[2][1]["x-reply"] == "yes" and answers[2][2] == b"accepted"
    assert all("content-length" in h for _, h, _ in answers)
    assert receiver.connections_accepted == 1
    reqs = receiver.requests
    assert [r.connection_id for r in reqs] == [1] * 5
    assert [r.index for r in reqs] == list(range(5))
    assert [r.path for r in reqs] == [f"/p{i}" for i in range(5)]
    assert [r.verified for r in reqs] == [True, True, True, False, True]
    assert [r.status for r in reqs] == [500, 500, 202, 200, 200]
    assert reqs[0].json() == {"i": 0}
    assert reqs[0].headers["x-webhook-timestamp"] == reqs[0].headers["X-WEBHOOK-TIMESTAMP"]
    assert reqs[0].timestamp == base


def test_default_response_can_be_changed(receiver) -> None:
    receiver.respond_with(418)
    receiver.respond_with(200, times=1)
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sock, sock.makefile("rb") as f:
        statuses = []
        for _ in range(3):
            _post(sock, "x", "/", b"{}")
            statuses.append(_read_response(f)[0])
    assert statuses == [200, 418, 418]


def test_handler_hook_and_errors(make_receiver) -> None:
    calls = []

    def handler(req):
        calls.append(req.path)
        if req.path == "/tuple":
            return (201, {"X-A": "1"}, b"t")
        if req.path == "/int":
            return 204
        if req.path == "/boom":
            raise RuntimeError("handler bug")
        return None

    r = WebhookReceiver(SECRET, handler=handler).start()
    try:
        with socket.create_connection(("127.0.0.1", r.port), timeout=5) as sock, sock.makefile("rb") as f:
            got = []
            for path in ("/tuple", "/int", "/none", "/boom"):
                _post(sock, "x", path, b"")
                got.append(_read_response(f)[0])
        assert got == [201, 204, 200, 500]
        assert calls == ["/tuple", "/int", "/none", "/boom"]
        assert len(r.errors) == 1 and "handler bug" in str(r.errors[0])
    finally:
        r.stop()


def test_chunked_request_body_and_streamed_response(receiver) -> None:
    receiver.respond(Response(200, stream=iter([b"ab", b"", b"cde"])), times=1)
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sock, sock.makefile("rb") as f:
        sock.sendall(
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n"
        )
        status, headers, body = _read_response(f)
    assert (status, headers["transfer-encoding"], body) == (200, "chunked", b"abcde")
    assert receiver.requests[0].body == b"abcde"


def test_wait_for_and_timeouts(receiver) -> None:
    start = time.monotonic()
    assert receiver.wait_for(0, timeout=0) is True
    assert receiver.wait_for(1, timeout=0.1) is False
    assert 0.08 <= time.monotonic() - start < 1

    def send() -> None:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sock, sock.makefile("rb") as f:
            _post(sock, "x", "/", b"x")
            _read_response(f)

    t = threading.Thread(target=send)
    t.start()
    assert receiver.wait_for(1, timeout=5) is True
    t.join(5)


def test_stop_is_prompt_with_open_connections_and_delays() -> None:
    r = WebhookReceiver().start()
    r.respond_with(200, delay=30)
    idle = socket.create_connection(("127.0.0.1", r.port), timeout=5)
    busy = socket.create_connection(("127.0.0.1", r.port), timeout=5)
    try:
        _post(busy, "x", "/", b"")
        assert r.wait_for(1, timeout=5)
        start = time.monotonic()
        r.stop()
        assert time.monotonic() - start < 2, "stop() must not wait for delays or idle keep-alive connections"
        assert not r.running
        assert busy.recv(100) == b""  # closed without an answer
        assert idle.recv(100) == b""
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", r.port), timeout=1).close()
        r.stop()  # idempotent
    finally:
        idle.close()
        busy.close()


def test_url_helpers_and_ipv6() -> None:
    with WebhookReceiver(host="::1") as r:
        assert r.url == f"http://[::1]:{r.port}"
        assert r.url_for("x") == r.url + "/x"
        assert r.url_for() == r.url + "/hook"
    with pytest.raises(RuntimeError):
        WebhookReceiver().url  # noqa: B018 - not started


def test_no_secret_means_unverified_none(make_receiver) -> None:
    r = make_receiver(secret=None)
    with socket.create_connection(("127.0.0.1", r.port), timeout=5) as sock, sock.makefile("rb") as f:
        _post(sock, "x", "/", b"{}")
        _read_response(f)
    assert r.requests[0].verified is None


def test_signature_helpers() -> None:
    body = b'{"a":1}'
    sig = compute_signature("k", 12, body)
    assert sig == compute_signature(b"k", "12", body)
    assert verify_signature("k", sig, "12", body)
    assert not verify_signature("k", sig, "13", body)
    assert not verify_signature("other", sig, "12", body)
    assert not verify_signature("k", None, "12", body)
    assert not verify_signature("k", "sha256=é", "12", body)


def test_headers_mapping() -> None:
    h = Headers([("X-One", "1"), ("x-one", "2"), ("X-Utf8", "Ã©")])
    assert h["x-ONE"] == "1, 2"
    assert "X-ONE" in h and 5 not in h
    assert h.get_bytes("x-utf8") == "é".encode()
    assert h.get_bytes("missing") is None
    assert len(h) == 2 and dict(h) == {"x-one": "1, 2", "x-utf8": "Ã©"}


def test_response_validation() -> None:
    with pytest.raises(ValueError):
        Response(42)
    with pytest.raises(TypeError):
        Response("200")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Response(200, headers={"X": "a\r\nb"})
    with pytest.raises(ValueError):
        Response(200, delay=-1)
    r = WebhookReceiver()
    with pytest.raises(ValueError):
        r.respond_with(200, times=0)
