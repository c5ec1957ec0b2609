"""The SSE app mounted in frameworks and run by servers: Starlette and
FastAPI (at "/" and under a sub-path), the README example verbatim,
uvicorn's root_path (behind a proxy that strips a prefix), hypercorn, and
framework lifespans."""

from __future__ import annotations

import contextlib

import httpx
import pytest
from fastapi import FastAPI
from httpx_sse import aconnect_sse
from sse_support import RETRY, RawHTTP, eventually, events_path, frame, frames, run_server, run_uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from blueprint_notify import JobEvent, JobStatus
from blueprint_notify.asgi import sse_app

DONE = JobStatus.COMPLETED
P = JobStatus.PROCESSING

# Paste into README (5 lines of app code):
README_SNIPPET = """\
from fastapi import FastAPI
from blueprint_notify import JobNotifier
from blueprint_notify.asgi import sse_app
notifier = JobNotifier(signing_secret="…")
app = FastAPI(); app.mount("/", sse_app(notifier))
"""


def client(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=5)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def health(request):
    return PlainTextResponse("ok")


async def check_stream(served, notifier, path_prefix: str = "", job: str = "job-1") -> None:
    """A live stream through the mount: replay, live events, the end."""
    token = notifier.register_job(job)
    first = JobEvent("queued", timestamp=1)
    notifier.notify(job, first)
    events = [JobEvent(P, progress=50, timestamp=2), JobEvent(DONE, result={"job": job}, timestamp=3)]
    async with client(served.url) as c:
        path = path_prefix + events_path(job)
        async with aconnect_sse(c, "GET", path, headers=bearer(token)) as source:
            r = source.response
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
            stream = source.aiter_sse()
            assert (await anext(stream)).retry == 3000
            got = [await anext(stream)]
            for e in events:
                notifier.notify(job, e)
            got += [e async for e in stream]
        assert [(s.id, s.event, s.data) for s in got] == [
            (str(i), e.status.value, e.to_json()) for i, e in enumerate([first, *events], 1)
        ]
        # The app's own errors come through the mount unchanged.
        r = await c.get(path)
        assert (r.status_code, r.headers["www-authenticate"]) == (401, "Bearer")
        r = await c.get(path, headers=bearer("nope"))
        assert (r.status_code, r.content) == (403, b'{"error": "forbidden"}')
        r = await c.post(path, headers=bearer(token))
        assert (r.status_code, r.headers["allow"]) == (405, "GET")


# -- the README example ---------------------------------------------------------------------------------
async def test_readme_example_verbatim() -> None:
    assert len(README_SNIPPET.strip().splitlines()) <= 5
    namespace: dict = {}
    exec(compile(README_SNIPPET, "<README>", "exec"), namespace)
    notifier, app = namespace["notifier"], namespace["app"]
    try:
        assert isinstance(app, FastAPI)
        with run_uvicorn(app) as served:
            await check_stream(served, notifier)
            async with client(served.url) as c:  # FastAPI's own routes still work
                assert (await c.get("/openapi.json")).status_code == 200
    finally:
        notifier.close(0)


# -- frameworks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_mounted_at_root(make_notifier, framework, server) -> None:
    n = make_notifier()
    sse = sse_app(n)
    if framework == "starlette":
        app = Starlette(routes=[Route("/health", health), Mount("/", app=sse)])
    else:
        app = FastAPI()
        app.add_api_route("/health", lambda: "ok")
        app.mount("/", sse)
    with run_server(server, app) as served:
        await check_stream(served, n, job="tenant/7/ünï ✓")
        async with client(served.url) as c:
            assert (await c.get("/health")).status_code == 200
            r = await c.get("/elsewhere")
            assert (r.status_code, r.content) == (404, b'{"error": "not found"}')  # the mounted app's 404
        await eventually(lambda: sse.open_streams == 0, 2, "streams released")


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_mounted_under_a_sub_path(make_notifier, framework, server) -> None:
    n = make_notifier()
    sse = sse_app(n, allow_origins=["http://x"])
    if framework == "starlette":
        app = Starlette(routes=[Route("/health", health), Mount("/sse", app=sse)])
    else:
        app = FastAPI()
        app.mount("/sse", sse)
    with run_server(server, app) as served:
        await check_stream(served, n, "/sse", job="a/b")
        token = n.register_job("sub")
        n.notify("sub", JobEvent(DONE, timestamp=1))
        async with client(served.url) as c:
            # Only under the mount.
            assert (await c.get(events_path("sub"), headers=bearer(token))).status_code == 404
            r = await c.get("/sse" + events_path("sub"), headers={**bearer(token), "Origin": "http://x"})
            assert r.status_code == 200
            assert r.content == RETRY + frame(1, JobEvent(DONE, timestamp=1))
            assert r.headers["access-control-allow-origin"] == "http://x"
            r = await c.options("/sse" + events_path("sub"), headers={"Origin": "http://x"})
            assert r.status_code == 204
            r = await c.get("/sse/v1/other", headers=bearer(token))
            assert (r.status_code, r.content) == (404, b'{"error": "not found"}')
        await eventually(lambda: sse.open_streams == 0, 2, "streams released")


async def test_nested_mounts(make_notifier) -> None:
    n = make_notifier()
    sse = sse_app(n, prefix="/jobs")
    app = Starlette(routes=[Mount("/api", routes=[Mount("/v2", app=sse)])])
    token = n.register_job("j")
    n.notify("j", JobEvent(DONE, timestamp=1))
    with run_uvicorn(app) as served:
        raw = await RawHTTP.request(served.port, "/api/v2/jobs/j/events", bearer(token))
        assert raw.status == 200
        assert await raw.read_to_end() == RETRY + frame(1, JobEvent(DONE, timestamp=1))
        await raw.close()


async def test_uvicorn_root_path_behind_a_proxy(make_notifier) -> None:
    # The proxy strips "/api"; uvicorn is told so with root_path.
    n = make_notifier()
    sse = sse_app(n)
    token = n.register_job("j")
    events = [JobEvent(P, timestamp=1), JobEvent(DONE, timestamp=2)]
    for e in events:
        n.notify("j", e)
    with run_uvicorn(sse, root_path="/api") as served:
        raw = await RawHTTP.request(served.port, events_path("j"), bearer(token))
        assert raw.status == 200
        assert await raw.read_to_end() == RETRY + frames(events)
        await raw.close()


# -- lifespan -----------------------------------------------------------------------------------------------
async def test_starlette_lifespan_with_open_streams(make_notifier) -> None:
    n = make_notifier()
    sse = sse_app(n)
    log: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app):
        log.append("startup")
        yield
        log.append("shutdown")

    app = Starlette(routes=[Mount("/", app=sse)], lifespan=lifespan)
    token = n.register_job("j")
    n.notify("j", JobEvent(P, timestamp=1))
    with run_uvicorn(app, lifespan="on", timeout_graceful_shutdown=None) as served:
        assert log == ["startup"]
        raw = await RawHTTP.request(served.port, events_path("j"), bearer(token))
        await raw.read_until(RETRY + frame(1, JobEvent(P, timestamp=1)))
        # Shutdown with the stream open: the stream ends, then the lifespan.
        took = served.stop()
    assert took < 2.0
    assert log == ["startup", "shutdown"]
    assert await raw.read_to_end() == RETRY + frame(1, JobEvent(P, timestamp=1))
    assert raw.complete
    await raw.close()
    assert sse.open_streams == 0


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_bare_app_handles_lifespan(make_notifier, server) -> None:
    n = make_notifier()
    sse = sse_app(n)
    kwargs = {"lifespan": "on"} if server == "uvicorn" else {}
    token = n.register_job("j")
    n.notify("j", JobEvent(DONE, timestamp=1))
    with run_server(server, sse, **kwargs) as served:  # uvicorn "on" exits if startup fails
        raw = await RawHTTP.request(served.port, events_path("j"), bearer(token))
        assert await raw.read_to_end() == RETRY + frame(1, JobEvent(DONE, timestamp=1))
        await raw.close()
        served.stop()
    assert not served.errors
