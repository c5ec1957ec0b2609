"""Running the demo app under uvicorn: in the foreground (``blueprint-notify
demo``) or in a background thread (``--once`` and the tests)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
import webbrowser
from collections.abc import Iterator
from typing import Any

import uvicorn

from .._core import StoreError
from .app import DemoApp

__all__ = ["DemoServer", "bind", "make_server", "serve_forever", "serve_in_thread", "url_for"]

logger = logging.getLogger("blueprint_notify.demo")


class DemoServer(uvicorn.Server):
    """uvicorn waits for open responses before it shuts down, and an event
    stream never ends by itself: end the demo's streams first."""

    def __init__(self, config: uvicorn.Config, app: DemoApp) -> None:
        super().__init__(config)
        self.demo = app

    async def shutdown(self, sockets: Any = None) -> None:
        self.demo.end_streams()
        await super().shutdown(sockets)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def make_server(app: DemoApp, *, verbose: bool = False) -> DemoServer:
    config = uvicorn.Config(
        app,
        lifespan="on",
        ws="none",
        log_config=None,  # the caller's logging setup stays as it is
        access_log=verbose,
        timeout_graceful_shutdown=3,
    )
    return DemoServer(config, app)


@contextlib.contextmanager
def serve_in_thread(
    app: DemoApp, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False, timeout: float = 10.0
) -> Iterator[str]:
    """Serves ``app`` in a background thread; yields its base URL (ending
    in "/"). On exit the server shuts down gracefully; ``app`` stays open."""
    sock = bind(host, port)
    server = make_server(app, verbose=verbose)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="demo-server", daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the demo server did not start")
            time.sleep(0.01)
        yield url_for(sock)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
        if thread.is_alive():
            logger.warning("the demo server thread did not stop within %.0f s", timeout)


def _can_open_browser() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    # Without a display, webbrowser would start a text-mode browser in this
    # very terminal (or nothing): only try with a graphical session.
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve_forever(
    host: str, port: int, *, open_browser: bool = True, verbose: bool = False, store_path: str | os.PathLike[str] | None = None
) -> int:
    """The interactive demo: serves until Ctrl-C, then closes the notifier
    (deliveries still pending stay in the store for the next run)."""
    try:
        sock = bind(host, port)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s (try --port 0 for a free port)", host, port, exc.strerror or exc)
        return 1
    try:
        app = DemoApp(store_path=store_path)
    except StoreError as exc:
        sock.close()
        logger.error("%s (another demo running? use --data-dir DIR or --no-store)", exc)
        return 1
    if store_path is not None:
        stats = app.notifier.stats()
        logger.info(
            "store: %s (%d pending deliveries resumed, %d dead letters kept)",
            store_path,
            stats["recovered"],
            len(app.dead),
        )
    server = make_server(app, verbose=verbose)
    url = url_for(sock)
    print(f"blueprint_notify demo: {url}  (Ctrl-C stops it)", flush=True)
    if host not in ("127.0.0.1", "::1", "localhost"):
        logger.warning("listening on %s: anyone who can reach it can start jobs", host)
    if open_browser and _can_open_browser():

        def open_when_ready() -> None:
            deadline = time.monotonic() + 10
            while not server.started and not server.should_exit and time.monotonic() < deadline:
                time.sleep(0.05)
            if server.started:
                webbrowser.open(url)

        threading.Thread(target=open_when_ready, name="demo-browser", daemon=True).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C after its graceful shutdown
        pass
    finally:
        sock.close()
        app.close()
    logger.info("stopped")
    return 0
