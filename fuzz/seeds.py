"""Writes the hand-picked seed inputs of fuzz/corpus/<target>/ (binary
layouts: see each harness's header comment). Run from anywhere:
``python3 fuzz/seeds.py``; it overwrites its own files and leaves the
others (those tools/fuzz.sh --merge added) alone. Standard library only."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"
NOW = 1700000000  # 2023-11-14, a realistic clock


def write(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def url() -> None:
    seeds = {
        "plain": "https://hooks.example.com/jobs",
        "port-userinfo-query": "https://user:pw@hooks.example.com:8443/a/b?x=1&y=%20#frag",
        "http-default-port": "http://example.com",
        "upper-scheme": "HTTPS://Example.COM:443/",
        "ipv4": "http://127.0.0.1:8787/hook",
        "ipv4-decimal": "http://2130706433/",
        "ipv4-octal-hex": "http://0x7f.0.0.01/",
        "ipv6": "http://[::1]:8080/",
        "ipv6-mapped": "http://[::ffff:169.254.169.254]/latest/meta-data",
        "ipv6-zone": "http://[fe80::1%25eth0]:80/",
        "idn": "https://bücher.example/ünïcode?q=ß",
        "punycode": "https://xn--bcher-kva.example/",
        "percent-host": "http://ex%61mple.com/",
        "percent-crlf": "http://example.com/%0d%0aX-Injected:%201",
        "percent-25-host": "https://ab%25bbcd.example/",
        "port-max": "http://example.com:65535/",
        "port-too-big": "http://example.com:65536/",
        "port-zero": "http://example.com:0/",
        "port-leading-zeros": "http://example.com:000443/",
        "empty-port": "http://example.com:/",
        "no-host": "http:///path",
        "gopher": "gopher://example.com/",
        "relative": "/just/a/path",
        "backslashes": "http:\\\\example.com\\path",
        "trailing-dot": "https://example.com./",
        "at-in-path": "https://example.com/@evil.com",
        "long-host": "https://" + "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61 + "/",
        "huge-host": "https://" + "h" * 600 + "/",
        "cache-edge-512": "https://example.com/" + "p" * (512 - 20),
        "cache-edge-513": "https://example.com/" + "p" * (513 - 20),
        # The longest URL, and one byte more: these also raise libFuzzer's
        # default input size limit (4096) for this target.
        "max-4096": "https://example.com/" + "p" * (4096 - 20),
        "too-long-4097": "https://example.com/" + "p" * (4097 - 20),
    }
    for name, value in seeds.items():
        write("url", name, value.encode())


def sockaddr(family: int, addr: str, port: int = 443) -> bytes:
    packed = socket.inet_pton(family, addr)
    if family == socket.AF_INET:
        raw = struct.pack("=H", family) + struct.pack(">H", port) + packed
        return bytes([0, 0, 16]) + raw
    raw = struct.pack("=H", family) + struct.pack(">H", port) + b"\0" * 4 + packed + b"\0" * 4
    return bytes([1, 0, 28]) + raw


def netguard() -> None:
    v4 = {
        "loopback": "127.0.0.1",
        "metadata": "169.254.169.254",
        "rfc1918-10": "10.1.2.3",
        "rfc1918-172": "172.31.255.255",
        "cgnat": "100.64.0.1",
        "this-network": "0.0.0.0",
        "multicast": "224.0.0.1",
        "broadcast": "255.255.255.255",
        "public": "93.184.216.34",
        "public-edge": "172.32.0.1",
    }
    for name, a in v4.items():
        write("netguard", "v4-" + name, sockaddr(socket.AF_INET, a))
    v6 = {
        "loopback": "::1",
        "unspecified": "::",
        "mapped-loopback": "::ffff:127.0.0.1",
        "mapped-public": "::ffff:93.184.216.34",
        "compat": "::127.0.0.1",
        "nat64-private": "64:ff9b::10.0.0.1",
        "6to4-private": "2002:c0a8:0101::1",
        "6to4-public": "2002:5db8:d822::1",
        "link-local": "fe80::1",
        "site-local": "fec0::1",
        "ula": "fd00::1",
        "multicast": "ff02::1",
        "documentation": "2001:db8::1",
        "teredo": "2001::1",
        "discard": "100::1",
        "public": "2606:4700:4700::1111",
    }
    for name, a in v6.items():
        write("netguard", "v6-" + name, sockaddr(socket.AF_INET6, a))
    write("netguard", "short-length", bytes([0, 0, 1]) + b"\x02\x00")
    write("netguard", "v6-family-v4-length", bytes([1, 0, 16]) + b"\x0a\x00" + b"\0" * 26)
    write("netguard", "unix-family", bytes([2, socket.AF_UNIX, 110]) + b"\x01\x00/tmp/sock")


def retry_after() -> None:
    now = struct.pack(">q", NOW)
    values = {
        "seconds": b"120",
        "zero": b"0",
        "spaces-tab": b" \t 7",
        "trailing-junk": b"5abc",
        "fraction": b"1.5",
        "negative": b"-5",
        "word": b"soon",
        "empty": b"",
        "max-exact": b"18446744073709551",
        "wraps": b"18446744073709552",
        "huge": b"99999999999999999999999999",
        "leading-zeros": b"0000000000000000000000000000000042",
        "imf-date": b"Wed, 21 Oct 2015 07:28:00 GMT",
        "imf-date-future": b"Fri, 31 Dec 9999 23:59:59 GMT",
        "rfc850-date": b"Sunday, 06-Nov-94 08:49:37 GMT",
        "asctime-date": b"Sun Nov  6 08:49:37 1994",
        "date-year-huge": b"Sun, 06 Nov 2147483647 08:49:37 GMT",
        "date-timezone": b"Tue, 14 Nov 2023 22:13:20 +0100",
    }
    for name, v in values.items():
        write("retry_after", name, now + v)
    write("retry_after", "date-now-negative", struct.pack(">q", -(2**62)) + b"Wed, 21 Oct 2015 07:28:00 GMT")
    write("retry_after", "date-now-max", struct.pack(">q", 2**63 - 1) + b"Wed, 21 Oct 2015 07:28:00 GMT")


def job_id() -> None:
    ids = {
        "plain": b"job-42",
        "unicode": "jöb-✓".encode(),
        "max": b"j" * 256,
        "too-long": b"j" * 257,
        "empty": b"",
        "crlf": b"job\r\nX-Injected: 1",
        "nul": b"job\x00",
        "del": b"job\x7f",
        "tab": b"job\t1",
        "quotes": b'job "a\\b"',
    }
    for name, v in ids.items():
        write("job_id", name, bytes([63]) + v)
    write("job_id", "tiny-err-buffer", bytes([0]) + b"bad\x01")


def token() -> None:
    t = bytes.fromhex("00112233445566778899aabbccddeeff" * 2).hex().encode()
    assert len(t) == 64
    write("token", "equal", t + t)
    write("token", "last-differs", t + t[:-1] + b"0")
    write("token", "first-differs", t + b"f" + t[1:])
    write("token", "short", t + t[:63])
    write("token", "long", t + t + b"0")
    write("token", "empty", t)
    write("token", "upper", t + t.upper())


def event() -> None:
    def ev(status: int, seq: int, payload: int, job: bytes, json: bytes) -> bytes:
        return bytes([status]) + struct.pack(">Q", seq) + bytes([payload, len(job)]) + job + json

    write("event", "processing", ev(1, 1, 1, b"job-42", b'{"status":"processing","progress":50,"timestamp":1700000000}'))
    write("event", "completed-result", ev(2, 7, 1, b"job-42", b'{"status":"completed","result":{"rows":42},"timestamp":1}'))
    write("event", "quotes-backslashes", ev(3, 2, 1, b'a"b\\c"\\', b'{"status":"failed","error":"x\\"y"}'))
    write("event", "seq-max", ev(4, 2**64 - 1, 0, b"j", b"{}"))
    write("event", "seq-zero", ev(0, 0, 1, b"j", b"{}"))
    write("event", "newline-json", ev(1, 3, 0, b"j", b'{"a":\n"b"}\r'))
    write("event", "empty-json", ev(1, 3, 1, b"", b""))
    write("event", "unicode", ev(1, 10, 1, "jöb".encode(), '{"error":"✓ \u2028"}'.encode()))


def codec() -> None:
    def c(key: bytes, msg_id: bytes, ts: int, body: bytes) -> bytes:
        return bytes([len(key)]) + key + bytes([len(msg_id)]) + msg_id + struct.pack(">q", ts) + body

    body = b'{"job_id":"job-42","event":{"status":"completed","timestamp":1700000000}}'
    write("codec", "standard", c(b"test-secret", b"msg_3f0c1e5a9b2d4c7e0000000000000001", NOW, body))
    write("codec", "empty-key-body", c(b"", b"m", 0, b""))
    write("codec", "negative-ts", c(b"k", b"msg_1", -(2**63), body))
    write("codec", "id-fills-prefix", c(b"k", b"i" * 137, -(2**63), body))  # 137 + 20 + 2 = 159 bytes
    write("codec", "id-too-long", c(b"k", b"i" * 138, -(2**63), body))
    write("codec", "nul-in-id", c(b"k", b"msg\x00tail", NOW, body))
    write("codec", "long-key", c(b"K" * 200, b"msg_1", NOW, body * 8))
    for name, raw in {
        "utf8-ok": "h\u00e9\u20ac\U0001f600".encode(),
        "utf8-surrogate": b"\xed\xa0\x80",
        "utf8-above-10ffff": b"\xf4\x90\x80\x80",
        "utf8-overlong": b"\xe0\x80\xaf",
        "utf8-truncated": b"abc\xe2\x82",
        "utf8-lone-continuation": b"\x80abc",
    }.items():
        write("codec", name, raw)


def store_row() -> None:
    def row(job: bytes, msg: bytes, url: bytes) -> bytes:
        return struct.pack(">H", len(job)) + job + bytes([len(msg)]) + msg + url

    good_msg = b"msg_3f0c1e5a9b2d4c7e0000000000000001"
    write("store_row", "good", row(b"job-42", good_msg, b"https://hooks.example.com:8443/jobs?x=1"))
    write("store_row", "unicode", row("jöb".encode(), good_msg, "https://bücher.example/ü".encode()))
    write("store_row", "job-crlf", row(b"job\r\nX-Injected: 1", good_msg, b"https://example.com/"))
    write("store_row", "job-not-utf8", row(b"j\xffob", good_msg, b"https://example.com/"))
    write("store_row", "job-nul-inside", row(b"job\x00x", good_msg, b"https://example.com/"))
    write("store_row", "job-max", row(b"j" * 256, good_msg, b"https://example.com/"))
    write("store_row", "msg-crlf", row(b"job", b"msg_1\r\nX: 1", b"https://example.com/"))
    write("store_row", "msg-39", row(b"job", b"m" * 39, b"https://example.com/"))
    write("store_row", "msg-40", row(b"job", b"m" * 40, b"https://example.com/"))
    write("store_row", "url-space", row(b"job", good_msg, b"http://127.0.0.1:1/a b"))
    write("store_row", "url-gopher", row(b"job", good_msg, b"gopher://127.0.0.1/"))
    write("store_row", "url-not-utf8", row(b"job", good_msg, b"http://qooks\xb5example.com/"))
    write("store_row", "url-nul-inside", row(b"job", good_msg, b"https://example.com/\x00\r\nX: 1"))
    write("store_row", "url-max-4096", row(b"job", good_msg, b"https://example.com/" + b"p" * (4096 - 20)))
    write("store_row", "url-too-long-4097", row(b"job", good_msg, b"https://example.com/" + b"p" * (4097 - 20)))


def store_log() -> None:
    def rec(at: float, dur: int, status: int, err: bytes) -> bytes:
        return struct.pack("=dIiH", at, dur, status, len(err)) + err

    one = rec(1700000000.25, 12, 500, b"HTTP 500")
    write("store_log", "one", one)
    write("store_log", "two", one + rec(1700000001.5, 2000, 0, b"Couldn't connect to server"))
    write("store_log", "truncated-tail", one + one[:10])
    write("store_log", "length-past-end", struct.pack("=dIiH", 1.0, 1, 1, 65535) + b"x" * 10)
    write("store_log", "long-error", rec(1.0, 1, 429, b"E" * 300))
    write("store_log", "nul-in-error", rec(1.0, 1, 503, b"ab\x00cd"))
    write("store_log", "nan-time", rec(float("nan"), 2**32 - 1, -1, b"\xff\xfe"))
    write("store_log", "over-cap", rec(2.0, 3, 404, b"HTTP 404") * 55)


def ingest() -> None:
    def step(op: int, job: int = 0) -> bytes:
        """The step byte: op is its value mod 7, job ("a", "b", "c") (byte >> 4) mod 3."""
        return bytes([next(x for x in range(256) if x % 7 == op and (x >> 4) % 3 == job)])

    def ing(job: int, eid: int, status: int = 1, alias: int | None = None, prev: int | None = None) -> bytes:
        flags = (0x40 if alias is not None else 0) | (0x20 if prev is not None else 0)
        f = next(x for x in range(flags, 256) if x & 0xE0 == flags and x % 5 == status)
        out = step(0, job) + bytes([f, eid])
        if alias is not None:
            out += bytes([alias])
        if prev is not None:
            out += bytes([prev])
        return out

    def sub(job: int, k: int, mode: str, after: int = 0) -> bytes:
        f = {"live": 0, "oldest": 1}.get(mode, 0)
        if mode == "after":
            f = next(x for x in range(256) if x % 3 == 2 and x % 40 == after)
        return step(3, job) + bytes([k, f])

    def pull(k: int, n: int) -> bytes:
        return step(4) + bytes([k, n - 1])

    def publish(job: int, status: int = 1) -> bytes:
        return step(2, job) + bytes([status])

    take = step(5)

    def leave(k: int) -> bytes:
        return step(6) + bytes([k])

    A, B, C = 0, 1, 2
    head = bytes([2, 1])  # ring of 3, 2 live channels
    write("ingest", "in-order", head + sub(A, 0, "oldest") + ing(A, 1) + ing(A, 2) + pull(0, 4) + ing(A, 3, 2) + take + pull(0, 4))
    write("ingest", "out-of-order", head + sub(A, 0, "oldest") + ing(A, 5) + ing(A, 3) + ing(A, 4) + pull(0, 2) + pull(0, 4))
    write("ingest", "duplicates-alias", head + sub(A, 0, "oldest") + ing(A, 5) + ing(A, 5) + ing(A, 9, alias=5) + pull(0, 4))
    write("ingest", "prev-gap", head + sub(A, 0, "oldest") + ing(A, 1) + ing(A, 16, prev=8) + ing(A, 5) + pull(0, 4))
    write(
        "ingest",
        "evictions",
        head + sub(A, 0, "after", 2) + b"".join(ing(A, i) for i in range(1, 9)) + pull(0, 4) + ing(A, 2) + pull(0, 4),
    )
    write(
        "ingest",
        "terminal-then-older",
        head + sub(A, 0, "oldest") + ing(A, 10, 2) + pull(0, 4) + ing(A, 7) + ing(A, 12) + pull(0, 4),
    )
    write(
        "ingest",
        "channel-limit",
        head + sub(A, 0, "live") + sub(B, 1, "oldest") + ing(B, 3) + ing(C, 4) + publish(A) + pull(1, 1) + take
        + pull(1, 4) + leave(0) + publish(C, 3),
    )


for fn in (url, netguard, retry_after, job_id, token, event, codec, store_row, store_log, ingest):
    fn()
