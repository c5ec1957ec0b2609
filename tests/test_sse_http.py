"""The SSE endpoint over a real server (uvicorn, some tests also hypercorn)
on loopback, with real clients (httpx, httpx-sse, raw asyncio streams):
statuses, headers, exact frames, ping, authentication, routing, methods,
Last-Event-ID validation, the stream cap, CORS, odd job ids, websockets.

Tests with the default configuration share one uvicorn server per module
(the ``sse`` fixture); the others start their own (``make_sse``)."""

from __future__ import annotations

import base64
import os

import httpx
import pytest
from httpx_sse import aconnect_sse
from sse_support import (  # noqa: F401  (_module_sse, make_sse, sse: fixtures)
    PING,
    RETRY,
    RawHTTP,
    _module_sse,
    eventually,
    frame,
    frames,
    make_sse,
    retry,
    sse,
)

from blueprint_notify import JobEvent, JobStatus

DONE = JobStatus.COMPLETED
P = JobStatus.PROCESSING
FORBIDDEN = b'{"error": "forbidden"}'


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=5)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _events() -> list[JobEvent]:
    return [
        JobEvent("queued", timestamp=1_700_000_000),
        JobEvent(P, progress=40, timestamp=1_700_000_001),
        JobEvent(P, progress=80, error="retrying shard 3", timestamp=1_700_000_002),
        JobEvent(
            DONE,
            progress=100,
            result={"url": "s3://bucket/k", "n": [1, 2.5, None, True], "text": 'ünï ✓ "q" \\ \n'},
            timestamp=1_700_000_003,
        ),
    ]


# -- the stream ----------------------------------------------------------------------------------
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_stream_headers_and_exact_bytes(make_sse, server) -> None:
    sse = make_sse(server=server)
    job, token = sse.new_job()
    events = _events()
    for e in events:  # all before the first subscriber: replayed from the job's first event
        sse.notifier.notify(job, e)
    async with client() as c, c.stream("GET", sse.url_for(job), headers=bearer(token)) as r:
        body = b"".join([chunk async for chunk in r.aiter_raw()])
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-accel-buffering"] == "no"
    assert "connection" not in r.headers
    assert "content-length" not in r.headers
    assert r.headers["transfer-encoding"] == "chunked"
    assert body == RETRY + frames(events)
    # The data line is byte-equal to JobEvent.to_json().
    assert body.split(b"\n")[4] == b"data: " + events[0].to_json().encode()


async def test_live_events_with_httpx_sse(sse) -> None:
    job, token = sse.new_job()
    sent = [JobEvent(P, progress=i * 10) for i in range(1, 6)] + [JobEvent(DONE, result={"ok": True})]
    got = []
    async with client() as c, aconnect_sse(c, "GET", sse.url_for(job), headers=bearer(token)) as source:
        assert source.response.status_code == 200
        stream = source.aiter_sse()
        first = await anext(stream)
        assert (first.retry, first.data, first.id) == (3000, "", "")
        for i, event in enumerate(sent):
            sse.notifier.notify(job, event)  # one at a time: each is pushed live
            sse_event = await anext(stream)
            got.append(sse_event)
            assert sse_event.id == str(i + 1)
        assert [e async for e in stream] == []  # the stream ends after the terminal event
    assert [e.event for e in got] == ["processing"] * 5 + ["completed"]
    assert [e.data for e in got] == [e.to_json() for e in sent]
    assert [JobEvent.from_json(e.data) for e in got] == sent


async def test_retry_field_is_configurable(make_sse) -> None:
    sse = make_sse(retry_ms=0)
    job, token = sse.new_job()
    sse.notifier.notify(job, JobEvent(DONE, timestamp=5))
    raw = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token))
    assert await raw.read_to_end() == retry(0) + frame(1, JobEvent(DONE, timestamp=5))
    assert raw.complete
    await raw.close()


async def test_ping_comment_on_idle_stream(make_sse) -> None:
    sse = make_sse(ping_interval=0.1)
    job, token = sse.new_job()
    raw = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token))
    await raw.read_until(RETRY + PING + PING, timeout=3)
    done = JobEvent(DONE, timestamp=9)
    sse.notifier.notify(job, done)
    body = await raw.read_to_end()
    assert raw.complete
    tail = frame(1, done)
    assert body.startswith(RETRY) and body.endswith(tail)
    pings = body[len(RETRY) : -len(tail)]
    assert len(pings) >= 2 * len(PING) and pings == PING * (len(pings) // len(PING))
    await raw.close()


async def test_events_pushed_without_pings(sse) -> None:
    job, token = sse.new_job()
    raw = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token))
    await raw.read_until(RETRY)
    events = [JobEvent(P, progress=i, timestamp=i) for i in range(10)] + [JobEvent(DONE, timestamp=99)]
    for e in events:  # fewer than sse_capacity (16): no lag even in one burst
        sse.notifier.notify(job, e)
    assert await raw.read_to_end() == RETRY + frames(events)
    assert raw.complete
    await raw.close()


# -- authentication -----------------------------------------------------------------------------
async def test_token_in_query(sse) -> None:
    job, token = sse.new_job()
    sse.notifier.notify(job, JobEvent(DONE, timestamp=1))
    async with client() as c:
        r = await c.get(sse.url_for(job, f"token={token}"))
    assert r.status_code == 200
    assert r.content == RETRY + frame(1, JobEvent(DONE, timestamp=1))


@pytest.mark.parametrize("value", ["Bearer {t}", "bearer {t}", "BEARER {t}", "Bearer   {t}"])
async def test_bearer_header_forms(sse, value) -> None:
    job, token = sse.new_job()
    sse.notifier.notify(job, JobEvent(DONE, timestamp=1))
    raw = await RawHTTP.request(sse.port, sse.path_for(job), {"Authorization": value.format(t=token)})
    assert raw.status == 200
    assert await raw.read_to_end() == RETRY + frame(1, JobEvent(DONE, timestamp=1))
    await raw.close()


@pytest.mark.parametrize(
    "headers, query",
    [
        ({}, ""),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, ""),
        ({"Authorization": "Bearer"}, ""),
        ({"Authorization": "Token abc"}, ""),
        ({}, "token="),
        ({}, "tok=abc"),
    ],
    ids=["none", "basic", "bearer-no-token", "other-scheme", "empty-query", "other-param"],
)
async def test_missing_token_is_401(sse, headers, query) -> None:
    job, _ = sse.new_job()
    async with client() as c:
        r = await c.get(sse.url_for(job, query), headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    assert r.content == b'{"error": "missing bearer token"}'
    assert r.headers["content-length"] == str(len(r.content))


async def test_wrong_token_and_unknown_job_are_the_same_403(sse) -> None:
    job, token = sse.new_job()
    _, other = sse.new_job()
    responses = []
    async with client() as c:
        for job_id, tok in [
            (job, "0" * 64),
            (job, token[:-1]),
            (job, token + "0"),
            (job, token.upper()),
            (job, other),
            ("unknown-job", token),
            ("unknown-job", "x"),
        ]:
            responses.append(await c.get(sse.url_for(job_id), headers=bearer(tok)))
        responses.append(await c.get(sse.url_for(job, "token=" + "f" * 64)))
    for r in responses:
        assert r.status_code == 403
        assert r.content == FORBIDDEN
        headers = [(k, v) for k, v in r.headers.multi_items() if k != "date"]
        assert headers == [
            ("server", "uvicorn"),
            ("content-type", "application/json"),
            ("content-length", str(len(FORBIDDEN))),
            ("cache-control", "no-store"),
        ]


async def test_register_again_replaces_the_token(sse) -> None:
    job, old = sse.new_job()
    new = sse.notifier.register_job(job)
    sse.notifier.notify(job, JobEvent(DONE, timestamp=1))
    async with client() as c:
        assert (await c.get(sse.url_for(job), headers=bearer(old))).status_code == 403
        r = await c.get(sse.url_for(job), headers=bearer(new))
    assert r.status_code == 200 and r.content == RETRY + frame(1, JobEvent(DONE, timestamp=1))


# -- routing and methods ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v1/jobs",
        "/v1/jobs/",
        "/v1/jobs/events",
        "/v1/jobs//events",
        "/v1/jobs/{job}/events/",
        "/v1/jobs/{job}/event",
        "/v1/jobs/{job}",
        "/v2/jobs/{job}/events",
        "/v1/jobs{job}/events",
        "/V1/jobs/{job}/events",
    ],
)
async def test_other_paths_are_404(sse, path) -> None:
    job, token = sse.new_job()
    async with client() as c:
        r = await c.get(sse.url + path.format(job=job), headers=bearer(token))
    assert r.status_code == 404
    assert r.content == b'{"error": "not found"}'
    assert r.headers["content-type"] == "application/json"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
async def test_other_methods_are_405(sse, method) -> None:
    job, token = sse.new_job()
    async with client() as c:
        r = await c.request(method, sse.url_for(job), headers=bearer(token))
    assert r.status_code == 405
    assert r.headers["allow"] == "GET"
    assert r.content == (b"" if method == "HEAD" else b'{"error": "method not allowed"}')


async def test_custom_prefix(make_sse) -> None:
    sse = make_sse(prefix="/api/streams")
    job, token = sse.new_job()
    sse.notifier.notify(job, JobEvent(DONE, timestamp=1))
    async with client() as c:
        assert (await c.get(sse.url + f"/v1/jobs/{job}/events", headers=bearer(token))).status_code == 404
        r = await c.get(sse.url + f"/api/streams/{job}/events", headers=bearer(token))
    assert r.status_code == 200 and r.content == RETRY + frame(1, JobEvent(DONE, timestamp=1))


@pytest.mark.parametrize(
    "name",
    ["tenant/42/run", "ünïcødé ✓ job", "a b+c?d#e&f=g;h", "100%", "x/events", "日本語/ジョブ", "%2F"],
)
async def test_job_ids_with_slashes_and_unicode(sse, name) -> None:
    job, token = sse.new_job(name)
    done = JobEvent(DONE, result={"job": job}, timestamp=1)
    sse.notifier.notify(job, done)
    url = sse.url_for(job)
    assert "/" not in url.split("/v1/jobs/", 1)[1].removesuffix("/events")  # percent-encoded
    async with client() as c:
        r = await c.get(url, headers=bearer(token))
        # Another job's token does not open it; the id one character shorter is another job.
        _, other = sse.new_job(name)
        assert (await c.get(url, headers=bearer(other))).status_code == 403
        assert (await c.get(sse.url_for(job[:-1]), headers=bearer(token))).status_code == 403
    assert r.status_code == 200
    assert r.content == RETRY + frame(1, done)


async def test_unencoded_slashes_in_job_id(sse) -> None:
    job, token = sse.new_job("a/b/c")
    sse.notifier.notify(job, JobEvent(DONE, timestamp=1))
    async with client() as c:
        r = await c.get(sse.url + f"/v1/jobs/{job}/events", headers=bearer(token))
    assert r.status_code == 200 and r.content == RETRY + frame(1, JobEvent(DONE, timestamp=1))


# -- Last-Event-ID validation ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value", ["abc", "-1", "+1", "1.5", "1e3", "0x10", "1 2", "3a", "12345678901234567890"]
)
@pytest.mark.parametrize("where", ["header", "query"])
async def test_invalid_last_event_id_is_400(sse, value, where) -> None:
    job, token = sse.new_job()
    sse.notifier.notify(job, JobEvent(P))
    async with client() as c:
        if where == "header":
            r = await c.get(sse.url_for(job), headers={**bearer(token), "Last-Event-ID": value})
        else:
            r = await c.get(sse.url_for(job), headers=bearer(token), params={"last_event_id": value})
    assert r.status_code == 400
    assert r.content == b'{"error": "invalid Last-Event-ID"}'
    assert r.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    "raw_header, query",
    [
        (b"\xb2", ""),  # '²' (latin-1 header byte): isdigit() but int() raises -> 500
        (b"", "last_event_id=%C2%B2"),  # the same through the query -> 500
        (b"", "last_event_id=%D9%A1"),  # Arabic-Indic digit one: accepted as 1 -> 200
        (b"9223372036854775808", ""),  # 2**63: OverflowError in the C binding -> 500
        (b"9999999999999999999", ""),
    ],
    ids=["superscript-header", "superscript-query", "arabic-indic-query", "int64-max-plus-1", "19-nines"],
)
async def test_non_ascii_or_oversized_last_event_id_is_400(sse, raw_header, query) -> None:
    job, token = sse.new_job()
    sse.notifier.notify(job, JobEvent(P))
    sse.notifier.notify(job, JobEvent(DONE))
    headers = bearer(token)
    if raw_header:
        headers["Last-Event-ID"] = raw_header.decode("latin-1")
    raw = await RawHTTP.request(sse.port, sse.path_for(job, query), headers)
    body = await raw.read_to_end()
    await raw.close()
    assert (raw.status, body) == (400, b'{"error": "invalid Last-Event-ID"}')


async def test_last_event_id_at_int64_max_is_accepted(sse) -> None:
    job, token = sse.new_job()
    sse.notifier.notify(job, JobEvent(P, timestamp=1))
    raw = await RawHTTP.request(sse.port, sse.path_for(job), {**bearer(token), "Last-Event-ID": str(2**63 - 1)})
    assert raw.status == 200
    # Ahead of the history: nothing is replayed, the next event follows.
    await raw.read_until(RETRY)
    done = JobEvent(DONE, timestamp=2)
    sse.notifier.notify(job, done)
    assert await raw.read_to_end() == RETRY + frame(2, done)
    await raw.close()


# -- stream cap -----------------------------------------------------------------------------------------
async def test_max_streams_is_503_then_frees(make_sse) -> None:
    sse = make_sse(max_streams=2)
    job, token = sse.new_job()
    first = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token))
    second = await RawHTTP.request(sse.port, sse.path_for(job), bearer(token))
    await first.read_until(RETRY)
    await second.read_until(RETRY)
    assert sse.app.open_streams == 2
    async with client() as c:
        r = await c.get(sse.url_for(job), headers=bearer(token))
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        assert r.content == b'{"error": "too many streams"}'
        # Requests that would not open a stream get their own answer at the cap.
        assert (await c.get(sse.url_for(job))).status_code == 401
        assert (await c.get(sse.url + "/nope", headers=bearer(token))).status_code == 404
        await first.close()
        await eventually(lambda: sse.app.open_streams == 1, what="closed stream released")
        sse.notifier.notify(job, JobEvent(DONE, timestamp=1))
        r = await c.get(sse.url_for(job), headers=bearer(token))
    assert r.status_code == 200 and r.content == RETRY + frame(1, JobEvent(DONE, timestamp=1))
    assert await second.read_to_end() == RETRY + frame(1, JobEvent(DONE, timestamp=1))
    await second.close()


# -- CORS -------------------------------------------------------------------------------------------------
async def test_cors_on_stream_errors_and_preflight(make_sse) -> None:
    sse = make_sse(allow_origins=["http://x"])
    job, token = sse.new_job()
    sse.notifier.notify(job, JobEvent(DONE, timestamp=1))
    async with client() as c:
        r = await c.get(sse.url_for(job), headers={**bearer(token), "Origin": "http://x"})
        assert r.status_code == 200 and r.content == RETRY + frame(1, JobEvent(DONE, timestamp=1))
        assert r.headers["access-control-allow-origin"] == "http://x"
        assert r.headers["vary"] == "Origin"
        for origin in ("http://y", "http://x.evil", "https://x", "null"):
            r = await c.get(sse.url_for(job), headers={**bearer(token), "Origin": origin})
            assert r.status_code == 200
            assert "access-control-allow-origin" not in r.headers
        r = await c.get(sse.url_for(job), headers=bearer(token))
        assert "access-control-allow-origin" not in r.headers
        # Errors are readable cross-origin too.
        for headers, status in [({}, 401), (bearer("bad"), 403), ({**bearer(token), "Last-Event-ID": "x"}, 400)]:
            r = await c.get(sse.url_for(job), headers={**headers, "Origin": "http://x"})
            assert r.status_code == status
            assert r.headers["access-control-allow-origin"] == "http://x"
        # Preflight (an EventSource polyfill sending Authorization, or fetch).
        r = await c.options(
            sse.url_for(job),
            headers={
                "Origin": "http://x",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert r.status_code == 204
        assert r.content == b""
        assert r.headers["access-control-allow-origin"] == "http://x"
        assert r.headers["access-control-allow-methods"] == "GET"
        assert r.headers["access-control-allow-headers"] == "authorization, last-event-id"
        assert r.headers["access-control-max-age"] == "600"
        # A preflight from an origin not allowed is just another method.
        r = await c.options(sse.url_for(job), headers={"Origin": "http://y", "Access-Control-Request-Method": "GET"})
        assert r.status_code == 405 and "access-control-allow-origin" not in r.headers


async def test_cors_any_origin(make_sse) -> None:
    sse = make_sse(allow_origins=["*"])
    job, token = sse.new_job()
    sse.notifier.notify(job, JobEvent(DONE, timestamp=1))
    async with client() as c:
        r = await c.get(sse.url_for(job, f"token={token}"), headers={"Origin": "https://anything.example"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    assert "vary" not in r.headers


async def test_no_cors_headers_by_default(sse) -> None:
    job, token = sse.new_job()
    sse.notifier.notify(job, JobEvent(DONE, timestamp=1))
    async with client() as c:
        r = await c.get(sse.url_for(job), headers={**bearer(token), "Origin": "http://x"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = await c.options(sse.url_for(job), headers={"Origin": "http://x"})
        assert r.status_code == 405


# -- websockets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_websocket_is_refused(make_sse, server) -> None:
    sse = make_sse(server=server)
    job, token = sse.new_job()
    key = base64.b64encode(os.urandom(16)).decode()
    raw = await RawHTTP.request(
        sse.port,
        sse.path_for(job, f"token={token}"),
        {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"},
    )
    assert raw.status == 403
    assert raw.header("upgrade") is None
    assert await raw.read_to_end() == b""
    await raw.close()
