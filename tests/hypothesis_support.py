"""Strategies and oracles for the property-based tests (tests/test_properties.py).

Every strategy here draws inputs from the whole space a caller could pass
(wrong types, unicode, lone surrogates, control characters, huge values)
and every oracle says, from the documented rules alone, what the public
API must do with them: accept, or raise which exception naming which
field. The oracles are written from README.md, the docstrings and the
messages the API documents, never by calling the code under test.

Network safety: nothing here produces a URL that a test delivers to
unless its host is a loopback literal (or a name under the reserved
``.invalid`` TLD, which cannot resolve). URLs with any other host are only
ever given to a *closed* notifier, which validates them and then refuses
them without sending anything (see ``test_properties.py``).
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

from hypothesis import settings, strategies as st

from blueprint_notify import JobStatus

# Hypothesis caches (unicode tables, constants) go to a per-user temporary
# directory rather than a .hypothesis/ in the checkout, unless
# HYPOTHESIS_STORAGE_DIRECTORY says otherwise. No example database is used.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY",
    os.path.join(tempfile.gettempdir(), f"blueprint-notify-hypothesis-{os.getuid()}"),
)

# -- settings ------------------------------------------------------------------------------------
#: CI runs are reproducible (derandomized: the same examples every run) and
#: leave no example database behind; locally each run explores new
#: examples (set BPN_HYPOTHESIS_DERANDOMIZE=1 to replay CI's).
#: BPN_HYPOTHESIS_SCALE multiplies every max_examples (e.g. 10 for a long
#: local hunt, 0.3 for a quick smoke run).
DERANDOMIZE = os.environ.get("CI", "") not in ("", "0", "false") or os.environ.get("BPN_HYPOTHESIS_DERANDOMIZE") == "1"
SCALE = float(os.environ.get("BPN_HYPOTHESIS_SCALE", "1"))

settings.register_profile(
    "blueprint-notify",
    database=None,
    deadline=None,
    derandomize=DERANDOMIZE,
    print_blob=True,
)
BASE = settings.get_profile("blueprint-notify")


def props(max_examples: int, **kwargs: Any) -> settings:
    """The file's settings with ``max_examples`` scaled by BPN_HYPOTHESIS_SCALE."""
    return settings(BASE, max_examples=max(1, round(max_examples * SCALE)), **kwargs)


# -- characters ----------------------------------------------------------------------------------
#: ASCII control characters (C0 and DEL): never allowed in a job id, a
#: URL, a user agent or anything else that may reach a header or a
#: request line.
CONTROLS = "".join(map(chr, range(0x20))) + "\x7f"
#: Any code point, lone surrogates included.
ANY_CHAR = st.characters()
#: Any code point that has a UTF-8 form (no lone surrogates).
UTF8_CHAR = st.characters(codec="utf-8")
#: Printable-ish: UTF-8 encodable and no ASCII control character.
SAFE_CHAR = st.characters(codec="utf-8", exclude_characters=CONTROLS)
#: Characters that look like separators, quotes or escapes somewhere.
TRICKY = list("/%?#.&=+:@;, \\\"'<>{}[]|^`~!$*()") + [
    "é", "✓", "🚀", "ą", "\u00a0", "\u0085", "\u2028", "\u2029", "\ufeff", "\u202e", "\u200b",
    "\u3000", "ſ", "\uff0f", "\ufffd", "\U0010ffff",
]  # fmt: skip
NON_STR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.binary(max_size=8),
    st.builds(bytearray, st.binary(max_size=4)),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.builds(object),
)


def has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def insert(text: str, piece: str, where: int) -> str:
    i = where % (len(text) + 1)
    return text[:i] + piece + text[i:]


class StrSub(str):
    """A str subclass: accepted wherever a str is."""


class IntSub(int):
    """An int subclass (not bool): accepted wherever an int is."""


class Pct(enum.IntEnum):
    ZERO = 0
    HALF = 50
    FULL = 100
    OVER = 101


# -- job ids -------------------------------------------------------------------------------------
JOB_ID_MAX = 256  # bytes of UTF-8 (README / ARCHITECTURE: 1-256 bytes, no control characters)


def job_id_error(job_id: object) -> type[Exception] | None:
    """What every entry point taking a job id must raise for it (naming
    ``job_id``), or None if it is a valid job id."""
    if not isinstance(job_id, str):
        return TypeError
    try:
        data = job_id.encode("utf-8")
    except UnicodeEncodeError:
        return ValueError
    if not 1 <= len(data) <= JOB_ID_MAX:
        return ValueError
    if any(b < 0x20 or b == 0x7F for b in data):
        return ValueError
    return None


#: Valid job ids: unicode, slashes, quotes, percent signs, every length up
#: to 256 UTF-8 bytes.
VALID_JOB_IDS = st.one_of(
    st.text(SAFE_CHAR, min_size=1, max_size=40),
    st.text(st.sampled_from(TRICKY + list("aZ09-_")), min_size=1, max_size=24),
    st.builds(lambda ch, n: ch * n, st.sampled_from(["x", "é", "€", "🚀"]), st.integers(1, 64)),
    st.sampled_from(["x" * 256, "é" * 128, "€" * 85 + "x", "🚀" * 64, ".", "..", "/", "%2F", "?", "#", " "]),
    st.builds(StrSub, st.text(SAFE_CHAR, min_size=1, max_size=8)),
).filter(lambda j: job_id_error(j) is None)

#: Anything: valid ids, ids with a control character, too long, empty,
#: with lone surrogates, and other types.
JOB_IDS = st.one_of(
    VALID_JOB_IDS,
    st.builds(insert, st.text(SAFE_CHAR, max_size=20), st.sampled_from(list(CONTROLS) + ["\r\n", "\r\nX-Evil: 1"]), st.integers(0, 99)),
    st.text(ANY_CHAR, max_size=24),
    st.builds(insert, st.text(SAFE_CHAR, max_size=10), st.sampled_from(["\ud800", "\udfff", "\udcff"]), st.integers(0, 99)),
    st.builds(lambda ch, n: ch * n, st.sampled_from(["j", "é", "€", "🚀"]), st.integers(60, 300)),
    st.sampled_from(["", "x" * 257, "é" * 129, "€" * 86, "🚀" * 65, "x" * 100_000, "\x00", "\x7f", "a\r\nX-Evil: 1"]),
    st.builds(lambda n: "j" * n, st.integers(257, 300_000)),
    NON_STR,
)


# -- JSON values (event results) ----------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """A drawn ``result``: the value, whether it is JSON-serialisable
    (None: depends on the stack depth left, a very deep nesting) and the
    value json.loads gives back for it."""

    value: Any
    is_json: bool | None
    canonical: Any = None

    def __repr__(self) -> str:  # short, for falsifying examples
        text = repr(self.value)
        return f"Result({text[:300]}{'...' if len(text) > 300 else ''}, is_json={self.is_json})"


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return str(int(key))
    return float.__repr__(key)


def canonical(value: Any) -> Any:
    """What ``json.loads(json.dumps(value))`` gives, worked out by hand:
    tuples become lists, dict keys become strings."""
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {_json_key(k): canonical(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


def contains_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return has_surrogate(value)
    if isinstance(value, (list, tuple)):
        return any(contains_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(contains_surrogate(k) or contains_surrogate(v) for k, v in value.items())
    return False


def _big_int(digits: int) -> int:
    return 10**digits - 1  # exactly `digits` decimal digits


# Python refuses int <-> str conversions of more than 4300 digits (both
# when encoding and when decoding JSON): such a result is not JSON here.
_MAX_INT_DIGITS = 4300

_JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(UTF8_CHAR, max_size=20),
    st.sampled_from(["", "\u2028\u2029", '"\\/\b\f\n\r\t', "\x00\x1f\x7f", "</script>", "💩" * 3]),
)


def _json_values(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.tuples(children, children),  # serialised as a list
            st.dictionaries(st.text(UTF8_CHAR, max_size=6), children, max_size=4),
            st.dictionaries(st.integers(-5, 5), children, max_size=3),  # keys become "1", "-2"...
        ),
        max_leaves=12,
    )


JSON_VALUES = _json_values(_JSON_LEAVES)

_NON_JSON_LEAVES = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    st.builds(set, st.lists(st.integers(), max_size=2)),
    st.builds(frozenset, st.lists(st.integers(), max_size=2)),
    st.binary(max_size=4),
    st.builds(bytearray, st.binary(max_size=2)),
    st.builds(object),
    st.builds(complex, st.integers(), st.integers()),
    st.builds(lambda a, b: {(a, b): "tuple key"}, st.integers(), st.integers()),
    st.builds(_big_int, st.integers(_MAX_INT_DIGITS + 1, _MAX_INT_DIGITS + 200)),
)


def _circular() -> list[Any]:
    loop: list[Any] = []
    loop.append({"again": loop})
    return loop


def _poisoned(value: Any, leaf: Any, where: int) -> Any:
    """A JSON value with one non-JSON leaf put somewhere inside."""
    if where % 3 == 0:
        return [value, leaf]
    if where % 3 == 1:
        return {"ok": value, "bad": leaf}
    return leaf


def _nest(depth: int, kind: int) -> Any:
    value: Any = "bottom"
    for i in range(depth):
        value = [value] if (kind + i) % 2 else {"k": value}
    return value


RESULTS: st.SearchStrategy[Result] = st.one_of(
    st.builds(lambda v: Result(v, True, canonical(v)), JSON_VALUES),
    st.builds(lambda v: Result(v, True, canonical(v)), st.builds(_big_int, st.integers(1, _MAX_INT_DIGITS))),
    st.builds(lambda n: Result("x" * n, True, "x" * n), st.integers(10_000, 300_000)),
    st.builds(
        lambda n, v: Result([v] * n, True, [canonical(v)] * n), st.integers(100, 5_000), _JSON_LEAVES
    ),
    st.builds(lambda v, leaf, w: Result(_poisoned(v, leaf, w), False), JSON_VALUES, _NON_JSON_LEAVES, st.integers()),
    st.builds(lambda: Result(_circular(), False)),
    # Up to the documented limit (MAX_RESULT_DEPTH, 100); deeper: see test_properties.
    st.builds(lambda d, k: Result(_nest(d, k), True, _nest(d, k)), st.integers(1, 100), st.integers(0, 1)),
)
#: Results that are JSON and have a UTF-8 form (can be sent as they are).
SENDABLE_RESULTS = RESULTS.filter(lambda r: r.is_json is True and not contains_surrogate(r.value))


# -- JobEvent fields --------------------------------------------------------------------------------
_DEFAULT = object()  # "argument not passed"
STATUS_VALUES = [s.value for s in JobStatus]

STATUSES = st.one_of(
    st.sampled_from(list(JobStatus)),
    st.sampled_from(STATUS_VALUES),
    st.builds(StrSub, st.sampled_from(STATUS_VALUES)),
    st.sampled_from(["COMPLETED", "Completed", " completed", "completed ", "done", "", "complete", "queued\x00"]),
    st.text(ANY_CHAR, max_size=10),
    st.integers(-2, 6),
    st.none(),
    st.binary(max_size=10),
    st.floats(),
)
PROGRESSES = st.one_of(
    st.none(),
    st.integers(0, 100),
    st.integers(-3, 103),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from(list(Pct)),
    st.builds(IntSub, st.integers(-3, 103)),
    st.booleans(),
    st.floats(),
    st.text(max_size=3),
    st.binary(max_size=2),
)
ERRORS = st.one_of(
    st.none(),
    st.text(UTF8_CHAR, max_size=30),
    st.text(ANY_CHAR, max_size=10),
    st.sampled_from(["", "\r\nX-Evil: 1", "\x00", "line1\nline2", "\u2028", "x" * 100_000]),
    st.builds(StrSub, st.text(max_size=5)),
    st.integers(),
    st.binary(max_size=5),
    st.lists(st.text(max_size=2), max_size=2),
)
TIMESTAMPS = st.one_of(
    st.just(_DEFAULT),
    st.integers(0, 2**63 - 1),
    st.integers(-5, 5),
    st.integers(min_value=-(2**90), max_value=2**90),
    st.builds(IntSub, st.integers(-3, 2**40)),
    st.booleans(),
    st.floats(),
    st.text(max_size=10),
    st.none(),
)


def event_error(status: Any, progress: Any, error: Any, timestamp: Any) -> tuple[type[Exception], str] | None:
    """(exception, field) JobEvent(...) must raise, or None. Fields are
    checked in declaration order: status, progress, error, timestamp."""
    if not isinstance(status, JobStatus):
        if not isinstance(status, str):
            return TypeError, "status"
        if str(status) not in STATUS_VALUES and status not in STATUS_VALUES:
            return ValueError, "status"
    if progress is not None:
        if isinstance(progress, bool) or not isinstance(progress, int):
            return TypeError, "progress"
        if not 0 <= progress <= 100:
            return ValueError, "progress"
    if error is not None and not isinstance(error, str):
        return TypeError, "error"
    if timestamp is not _DEFAULT:
        if isinstance(timestamp, bool) or not isinstance(timestamp, int):
            return TypeError, "timestamp"
        if timestamp < 0:
            return ValueError, "timestamp"
    return None


def send_error(result: Result, error: str | None) -> tuple[type[Exception], str] | None:
    """What notify() must raise for a valid JobEvent with this result and
    error: TypeError naming result if it is not JSON; ValueError naming the
    field that holds a lone surrogate (no UTF-8 form); else None."""
    if result.is_json is False:
        return TypeError, "result"
    if error is not None and has_surrogate(error):
        return ValueError, "error"
    if contains_surrogate(result.value):
        return ValueError, "result"
    return None


@st.composite
def sendable_events(draw: st.DrawFn, statuses: st.SearchStrategy[Any] | None = None) -> Any:
    """Valid JobEvents that notify() accepts (JSON result, UTF-8 text)."""
    from blueprint_notify import JobEvent

    status = draw(statuses if statuses is not None else st.sampled_from(list(JobStatus)))
    progress = draw(st.one_of(st.none(), st.integers(0, 100)))
    result = draw(st.one_of(st.none(), SENDABLE_RESULTS.map(lambda r: r.value)))
    error = draw(st.one_of(st.none(), st.text(UTF8_CHAR, max_size=30)))
    timestamp = draw(st.one_of(st.integers(0, 2**63 - 1), st.integers(0, 2**70)))
    return JobEvent(status, progress=progress, result=result, error=error, timestamp=timestamp)


# -- webhook URLs ----------------------------------------------------------------------------------
URL_MAX = 4096  # bytes (ARCHITECTURE: curl_url, http/https, host, no spaces/controls, <= 4096 bytes)


@dataclass(frozen=True)
class Url:
    """A drawn webhook URL and whether the documented rules accept it
    (None where they leave it to curl_url's parser: either is fine)."""

    url: str
    ok: bool | None
    why: str = ""


_GOOD_SCHEMES = ["http", "https", "HTTP", "HTTPS", "Http", "hTTpS"]
_BAD_SCHEMES = [
    "ftp", "file", "gopher", "ws", "wss", "javascript", "data", "mailto", "ldap", "dict", "telnet",
    "tftp", "smb", "rtsp", "imap", "httpx", "http+unix", "htt", "h", "ttp", "1http",
    "httpſ", "httpѕ", "ｈｔｔｐ", "http\u200b", "htTp\u0131",
]  # fmt: skip
_UNRESERVED = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"
_SUB_DELIMS = "!$&'()*+,;="
_PCT = st.integers(0x21, 0xFF).map(lambda b: f"%{b:02X}") | st.integers(0x21, 0xFF).map(lambda b: f"%{b:02x}")
_PCT_CTL = st.sampled_from(["%00", "%0d", "%0A", "%0d%0a", "%20", "%09", "%7f"])
_NON_ASCII = st.characters(codec="utf-8", min_codepoint=0x80)


def _pieces(alphabet: str, extra: list[st.SearchStrategy[str]], max_size: int) -> st.SearchStrategy[str]:
    return st.lists(st.one_of(st.sampled_from(list(alphabet)), *extra), max_size=max_size).map("".join)


USERINFO = st.one_of(
    st.just(""),
    st.builds(
        lambda u, p: f"{u}@" if p is None else f"{u}:{p}@",
        _pieces(_UNRESERVED + _SUB_DELIMS, [_PCT, _NON_ASCII], 8),
        st.none() | _pieces(_UNRESERVED + _SUB_DELIMS + ":", [_PCT, _NON_ASCII], 8),
    ),
)


def _v6(i: int, exploded: bool) -> str:
    a = ipaddress.IPv6Address(i)
    return a.exploded if exploded else a.compressed


_HOSTS_OK = st.one_of(
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
    st.builds(lambda i, e: f"[{_v6(i, e)}]", st.integers(0, 2**128 - 1), st.booleans()),
    st.builds(lambda t: "[::ffff:%d.%d.%d.%d]" % t, st.tuples(*[st.integers(0, 255)] * 4)),
    st.builds(
        lambda i, z: f"[fe80::{i:x}%25{z}]", st.integers(0, 0xFFFF), st.text(st.sampled_from("abcxyz019.-_~"), min_size=1, max_size=8)
    ),
    st.sampled_from(["[::]", "[::1]", "[0:0:0:0:0:0:0:1]", "[::ffff:7f00:1]", "[64:ff9b::a00:1]", "[2002:a9fe:a9fe::1]"]),
    # reg-names: letters, digits, '-', '_', '~', '.', percent-escapes of
    # letters, non-ASCII (internationalised names).
    st.builds(
        lambda labels, tld: ".".join(labels + [tld]),
        st.lists(_pieces("abcdefghijklmnopqrstuvwxyz0123456789-_~", [st.sampled_from(["%41", "%7A", "%2E"]), _NON_ASCII], 12).filter(bool), min_size=0, max_size=3),
        st.sampled_from(["invalid", "INVALID", "example", "test"]),
    ),
)
_HOSTS_BAD = st.one_of(
    st.just(""),
    st.sampled_from(["[::1", "::1]", "[1::2::3]", "[12345::]", "[::g]", "[v1.x]", "[1.2.3.4]", "[::1]x", "[]"]),
    # percent-escapes of control characters and space in a host
    st.builds(lambda a, p, b: f"{a}{p}{b}.invalid", st.sampled_from(["a", ""]), _PCT_CTL.filter(lambda p: p != "%7f"), st.sampled_from(["b", ""])),
    # a host too long for an origin (scheme://host:port, at most 511 bytes)
    st.builds(lambda n: "h" * n + ".invalid", st.integers(520, 2000)),
)
_HOSTS_EITHER = st.one_of(
    # RFC 3986 allows sub-delims in a reg-name; curl refuses most of them.
    st.builds(lambda c: f"a{c}b.invalid", st.sampled_from(list(_SUB_DELIMS + "^`{}|\"<>"))),
    # IPv4-ish forms curl may normalise (or take as names)
    st.sampled_from(["1.2.3", "0", "4294967296", "256.1.1.1", "1.2.3.4.5", "0x7f.1", "-a.invalid", "a..invalid", "_"]),
    st.builds(lambda h: h + "%zz.invalid", st.sampled_from(["a", "b"])),
)
_PORTS_OK = st.one_of(
    st.just(""),
    st.just(":"),  # empty port: the scheme's default
    st.integers(1, 65535).map(lambda p: f":{p}"),
    st.sampled_from([":1", ":65535", ":080", ":000000000443"]),
)
_PORTS_BAD = st.one_of(
    # Port 0 cannot be connected to (refused since the fuzzer found it
    # accepted; it was retried until dead-lettered).
    st.sampled_from([":0", ":00", ":000"]),
    st.integers(65536, 10**6).map(lambda p: f":{p}"),
    st.integers(10**10, 10**40).map(lambda p: f":{p}"),
    st.sampled_from([":-1", ":+80", ":1a", ":0x50", ":80:80", ":٣", ":８０", ":1e3", ":65536"]),
)
_PATH_CHARS = _UNRESERVED + _SUB_DELIMS + ":@/" + "{}|\\^`<>\"[]"
PATHS = st.one_of(
    st.just(""),
    st.builds(lambda p: "/" + p, _pieces(_PATH_CHARS, [_PCT, _PCT_CTL, _NON_ASCII], 20)),
)
QUERIES = st.one_of(st.just(""), st.builds(lambda q: "?" + q, _pieces(_PATH_CHARS + "?", [_PCT, _PCT_CTL, _NON_ASCII], 16)))
FRAGMENTS = st.one_of(st.just(""), st.builds(lambda f: "#" + f, _pieces(_PATH_CHARS + "?", [_PCT, _NON_ASCII], 8)))
#: Never allowed anywhere in a URL: spaces and ASCII control characters
#: (a CR or LF would end the request line or a header).
FORBIDDEN = [" ", "\t", "\n", "\r", "\r\n", "\x00", "\x01", "\x0b", "\x0c", "\x1b", "\x1f", "\x7f", "\r\nX-Evil: 1", "\nHost: evil"]
#: Literal URLs with a known answer.
_LITERAL_BAD = [
    "", "javascript:alert(1)", "data:text/plain,x", "mailto:a@b.invalid", "http:a.invalid", "//a.invalid/x",
    "/relative/path", "a.invalid/x", "http://", "https://", "http://:80/", "http://@/", "http://u@/", "://a.invalid/",
    "http//a.invalid", "file:///etc/passwd", "http://a.invalid\\x", "not a url", "HTTP://", "http:///",
]  # fmt: skip
_LITERAL_OK = ["HTTP://A.INVALID", "https://a.invalid?", "http://a.invalid#", "http://[::1]:80/", "http://@a.invalid/"]


def _join(scheme: str, userinfo: str, host: str, port: str, path: str, query: str, fragment: str) -> str:
    return f"{scheme}://{userinfo}{host}{port}{path}{query}{fragment}"


@st.composite
def webhook_urls(draw: st.DrawFn) -> Url:
    """Structured URLs (every scheme, IPv4/IPv6 literals with zone ids and
    IPv4-mapped forms, userinfo, every port, percent-encoding, unicode
    hosts and paths), then maybe an injected space or control character,
    maybe padded to the length limit; with the documented verdict."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        lit = draw(st.sampled_from(_LITERAL_BAD + _LITERAL_OK))
        return Url(lit, lit in _LITERAL_OK, "literal")
    scheme_ok = draw(st.integers(0, 3)) > 0
    scheme = draw(st.sampled_from(_GOOD_SCHEMES if scheme_ok else _BAD_SCHEMES))
    host_kind = draw(st.integers(0, 9))
    if host_kind < 7:
        host, host_ok = draw(_HOSTS_OK), True
    elif host_kind < 9:
        host, host_ok = draw(_HOSTS_BAD), False
        if host == "":
            host_ok = None  # curl takes "http:///x" as host x (see _LITERAL_BAD for the sure cases)
    else:
        host, host_ok = draw(_HOSTS_EITHER), None
    port_ok = draw(st.integers(0, 5)) > 0
    port = draw(_PORTS_OK if port_ok else _PORTS_BAD)
    url = _join(scheme, draw(USERINFO), host, port, draw(PATHS), draw(QUERIES), draw(FRAGMENTS))
    ok: bool | None = None if host_ok is None else (scheme_ok and host_ok and port_ok)
    if not scheme_ok or host_ok is False or not port_ok:
        ok = False
    why = f"scheme_ok={scheme_ok} host_ok={host_ok} port_ok={port_ok}"
    if draw(st.integers(0, 4)) == 0:
        # unicode whitespace in the path: bytes >= 0x80, fine on the wire
        url = url.split("#")[0] + "/" + draw(st.sampled_from(["\u00a0", "\u2028", "\u3000", "\u0085", "\ufeff"]))
        why += " +unicode-space-in-path"
    pad = draw(st.sampled_from([None, None, None, 0, 1, "far"]))
    if pad is not None:
        base = url.split("#")[0]
        if "/" not in base.split("://", 1)[-1]:
            base += "/"
        size = len(base.encode("utf-8"))
        target = URL_MAX + (pad if pad != "far" else 10_000)
        if size < target:
            url = base + "a" * (target - size)
            if target > URL_MAX:
                ok, why = False, why + " +too-long"
    if draw(st.integers(0, 3)) == 0:
        url = insert(url, draw(st.sampled_from(FORBIDDEN)), draw(st.integers(0, 10**6)))
        ok, why = False, why + " +forbidden-char"
    return Url(url, ok, why)


#: Arbitrary text, or arbitrary text after a scheme-like prefix.
URL_TEXT = st.one_of(
    st.text(ANY_CHAR, max_size=60),
    st.builds(
        lambda prefix, rest: prefix + rest,
        st.sampled_from(["http://", "https://", "HTTP://", "http:", "http:/", "", "javascript:", "ftp://", "http://[", "http://a.invalid"]),
        st.text(ANY_CHAR, max_size=60),
    ),
)


def url_must_be_refused(url: str) -> str | None:
    """A reason the documented rules refuse this URL whatever curl thinks
    of the rest, or None."""
    if has_surrogate(url):
        return "lone surrogate"
    data = url.encode("utf-8")
    if not 1 <= len(data) <= URL_MAX:
        return "length"
    if any(b <= 0x20 or b == 0x7F for b in data):
        return "space or control character"
    m = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*):", url)
    if m is None or m.group(1).lower() not in ("http", "https"):
        return "scheme"
    return None


# Hosts for real deliveries: only ever loopback (or "this network", which
# Linux connects locally) or unresolvable names, so that not even a broken
# SSRF guard could send a packet off this machine.
#: Spellings of 127.0.0.1 (where the receiver listens).
RECEIVER_HOSTS = ["127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"]
#: Other addresses the guard must refuse (reason) that stay on this host.
LOCAL_REFUSED_HOSTS = {
    "[::1]": "loopback",
    "localhost": "loopback",
    "0.0.0.0": "this network",
    "0": "this network",
    "127.5.6.7": "loopback",
    "127.255.255.254": "loopback",
    "[::ffff:127.9.9.9]": "loopback",
}
#: Names that cannot resolve (RFC 6761): dead-lettered either way.
UNRESOLVABLE_HOSTS = ["nothing-here.invalid", "exämple.invalid", "ex%41mple.invalid"]


# -- SSRF oracle (check_address) --------------------------------------------------------------------
_V4_BLOCKED = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    )
]  # fmt: skip
_V6_BLOCKED = [
    ipaddress.ip_network(n)
    for n in ("::/128", "::1/128", "::/96", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8", "100::/64", "2001:db8::/32", "2001::/23")
]


def v4_blocked(addr: ipaddress.IPv4Address) -> bool:
    return any(addr in net for net in _V4_BLOCKED)


def address_refused(address: str) -> bool:
    """Whether the guard must refuse this address (ARCHITECTURE, Network
    guard): not global unicast, also in IPv4-mapped, NAT64 (64:ff9b::/96)
    and 6to4 (2002::/16) forms judged by the IPv4 address they carry."""
    addr = ipaddress.ip_address(address)
    if isinstance(addr, ipaddress.IPv4Address):
        return v4_blocked(addr)
    packed = addr.packed
    if addr.ipv4_mapped is not None or packed[:12] == bytes.fromhex("0064ff9b0000000000000000"):
        return v4_blocked(ipaddress.IPv4Address(packed[12:]))
    if packed[:2] == b"\x20\x02" and v4_blocked(ipaddress.IPv4Address(packed[2:6])):
        return True
    return any(addr in net for net in _V6_BLOCKED)


_V4_NETS = st.sampled_from(_V4_BLOCKED + [ipaddress.ip_network(n) for n in ("8.8.8.0/24", "1.0.0.0/8", "172.32.0.0/11", "100.128.0.0/9", "192.169.0.0/16")])
IPV4 = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.builds(lambda net, i: net[i % net.num_addresses], _V4_NETS, st.integers(0, 2**32)),
)
IPV6 = st.one_of(
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
    st.builds(lambda net, i: net[i % net.num_addresses], st.sampled_from(_V6_BLOCKED + [ipaddress.ip_network("2606:4700::/32")]), st.integers(0, 2**128)),
    IPV4.map(lambda a: ipaddress.IPv6Address("::ffff:" + str(a))),
    IPV4.map(lambda a: ipaddress.IPv6Address(b"\x00\x64\xff\x9b" + b"\x00" * 8 + a.packed)),
    IPV4.map(lambda a: ipaddress.IPv6Address(b"\x20\x02" + a.packed + b"\x00" * 10)),
)


# -- configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldRule:
    """How a NotifierConfig field is validated, from the README table and
    the field comments: the kind of value, a range every sane deployment
    uses (must be accepted), and what must be refused."""

    kind: str  # "int", "secs", "bool", "choice"
    #: (low, high) every sane deployment uses, or the allowed choices
    sane: tuple[float, float] | tuple[str, ...] = ()
    #: 0 must be refused too (negative values always are)
    positive: bool = False


RULES: dict[str, FieldRule] = {
    "max_retries": FieldRule("int", (0, 100)),
    "retry_base_ms": FieldRule("int", (0, 600_000)),
    "timeout_secs": FieldRule("secs", (0.001, 600), positive=True),
    "sse_capacity": FieldRule("int", (1, 100_000), positive=True),
    "max_channels": FieldRule("int", (1, 1_000_000), positive=True),
    "max_dead_letters": FieldRule("int", (0, 1_000_000)),
    "max_retry_delay_ms": FieldRule("int", (0, 3_600_000)),
    "max_connections": FieldRule("int", (1, 1024), positive=True),
    "max_connections_per_host": FieldRule("int", (1, 1), positive=True),  # sane: <= max_connections
    "max_response_bytes": FieldRule("int", (0, 1 << 20)),
    "close_timeout_secs": FieldRule("secs", (0, 3600)),
    "retention_secs": FieldRule("secs", (0, 86_400)),
    "delivered_retention_secs": FieldRule("secs", (0, 86_400)),
    "broker_buffer": FieldRule("int", (1, 1_000_000), positive=True),
    "broker_ttl_secs": FieldRule("secs", (1, 86_400), positive=True),
    "allow_private_networks": FieldRule("bool"),
    "signature_scheme": FieldRule("choice", ("blueprint", "standard", "both")),
    "durability": FieldRule("choice", ("batched", "sync")),
}

_NUMBERS = st.one_of(
    st.integers(-3, 3),
    st.integers(-(10**6), 10**6),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.floats(min_value=-5, max_value=5),
    st.sampled_from([0.0, -0.0, 5e-324, 1e-9, float("nan"), float("inf"), float("-inf"), 2**63, 2**64, 10**400]),
    st.builds(IntSub, st.integers(-3, 10**6)),
)
_WRONG_TYPES = st.one_of(st.none(), st.text(max_size=4), st.binary(max_size=3), st.lists(st.integers(), max_size=1), st.builds(object))


def field_values(name: str) -> st.SearchStrategy[Any]:
    rule = RULES.get(name)
    if rule is None:
        raise KeyError(name)
    if rule.kind in ("int", "secs"):
        return st.one_of(_NUMBERS, st.booleans(), _WRONG_TYPES)
    if rule.kind == "bool":
        return st.one_of(st.booleans(), st.integers(0, 1), st.none(), st.text(max_size=4))
    assert rule.kind == "choice"
    return st.one_of(
        st.sampled_from(list(rule.sane)),
        st.sampled_from([v.upper() for v in rule.sane] + [v + " " for v in rule.sane] + ["", "none", "async"]),
        st.text(max_size=8),
        st.integers(),
        st.none(),
        st.builds(StrSub, st.sampled_from(list(rule.sane))),
    )


Verdict = tuple[str, type[Exception] | None]  # ("ok" | "bad" | "either", exception)


def field_verdict(name: str, value: Any, config: dict[str, Any]) -> Verdict:
    """("ok", None): must be accepted; ("bad", exc): must be refused with
    exc naming the field; ("either", exc): either accepted or exc naming
    the field (a bound the documentation does not state)."""
    rule = RULES[name]
    if rule.kind == "bool":
        return ("ok", None) if isinstance(value, bool) else ("bad", TypeError)
    if rule.kind == "choice":
        if isinstance(value, str) and str(value) in rule.sane:
            return "ok", None
        return "bad", (ValueError if isinstance(value, str) else None)  # None: TypeError or ValueError
    if isinstance(value, bool):
        return "bad", TypeError
    if rule.kind == "int":
        if not isinstance(value, int):
            return "bad", TypeError
        lo, hi = rule.sane
        if name == "max_connections_per_host":
            conn = config.get("max_connections", 64)
            hi = min(conn, 1024) if isinstance(conn, int) and not isinstance(conn, bool) else 64
        if value < 0 or (rule.positive and value == 0):
            return "bad", ValueError
        return ("ok", None) if lo <= value <= hi else ("either", ValueError)
    # seconds: int or float
    if not isinstance(value, (int, float)):
        return "bad", TypeError
    if isinstance(value, int) and abs(value) > 2**1000:
        return "either", ValueError
    if math.isnan(value) or math.isinf(value) or value < 0 or (rule.positive and value == 0):
        return "bad", ValueError
    lo, hi = rule.sane
    return ("ok", None) if lo <= value <= hi else ("either", ValueError)


def whsec(raw: bytes, padded: bool) -> str:
    text = base64.b64encode(raw).decode()
    return "whsec_" + (text if padded else text.rstrip("="))


SECRETS_OK = st.one_of(
    st.text(UTF8_CHAR, min_size=1, max_size=30).filter(lambda s: not s.startswith("whsec_")),
    st.builds(whsec, st.binary(min_size=1, max_size=40), st.booleans()),
)
SECRETS_BAD_WHSEC = st.builds(lambda s: "whsec_" + s, st.text(st.sampled_from("!@#$%^&*()~`é"), min_size=1, max_size=8))


def broker_url_ok(url: str) -> bool:
    """README: redis://host[:port][/db], rediss://..., unix:///path."""
    from urllib.parse import urlsplit

    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        return False
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme in ("redis", "rediss"):
        db = parts.path.lstrip("/")
        return bool(parts.hostname) and port != 0 and (not db or (db.isascii() and db.isdigit()))
    if parts.scheme == "unix":
        return bool(parts.path)
    return False


# -- Last-Event-ID ---------------------------------------------------------------------------------
#: Header values an HTTP client can send: no CR, LF, NUL or other C0
#: controls (h11 refuses those), Latin-1 only (the header's bytes).
HEADER_CHAR = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.sampled_from(["\t"]),
    st.characters(min_codepoint=0x80, max_codepoint=0xFF),
)
#: Whitespace Python's str.strip() removes but HTTP does not know.
UNICODE_SPACES = [c for c in map(chr, range(0x10000)) if c.isspace() and c not in " \t\r\n"]


def last_event_ids(chars: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    def spaced(s: str, left: str, right: str) -> str:
        return left + s + right

    numbers = st.one_of(st.integers(0, 12), st.integers(0, 2**63 - 1), st.integers(2**63, 10**25), st.sampled_from([2**63 - 1, 2**63, 2**64]))
    return st.one_of(
        numbers.map(str),
        st.builds(lambda n, z: "0" * z + str(n), st.integers(0, 12), st.integers(1, 20)),  # leading zeros
        st.builds(spaced, numbers.map(str), st.sampled_from(["", " ", "\t", "  "]), st.sampled_from(["", " ", "\t"])),
        st.builds(lambda n, s: s + str(n), st.integers(0, 12), st.sampled_from(["+", "-", "0x", "−"])),
        st.sampled_from(["", " ", "1.0", "1e3", "1_0", "0x10", "1 2", "3a", "٣", "²", "５", "Infinity", "NaN", "1,2", "null"]),
        st.text(chars, max_size=12),
    )


def last_event_id_verdict(value: str | None) -> int | None | str:
    """The id the SSE app must resume after (README: ``Last-Event-ID``
    replays exactly the events after that id; invalid ids are 400): an int,
    None for "from the first event" (absent or empty), or "invalid".
    Surrounding spaces and tabs are HTTP's optional whitespace."""
    if value is None:
        return None
    text = value.strip(" \t")
    if value == "":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) >= 2**63:
        return "invalid"
    return int(text)
