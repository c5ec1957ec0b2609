"""A real ``redis-server`` for the broker tests (``tests/test_broker_*.py``).

* :class:`RedisServer`: ``redis-server`` in the foreground (a subprocess, no
  daemonize) on 127.0.0.1 and a free port, with its own directory, an
  append-only file fsynced on every write (``--appendonly yes
  --appendfsync always``) and no RDB snapshots. ``kill()`` SIGKILLs it,
  ``restart()`` starts it again on the same port and directory, so the AOF
  is reloaded (it returns once the server answers PING and has finished
  loading). Its output goes to ``redis.log`` in its directory.
* :func:`require_redis_server`: skips the calling test when
  ``redis-server`` is not installed, except in CI (``CI`` set and not
  ``0``/``false``), where that fails instead (``tools/sysdeps.sh`` installs
  it).
* :class:`PausableProxy`: a TCP proxy to the server (threads) whose
  forwarding can be paused and resumed: one process's Redis traffic held
  up while the others' goes on (the connections stay open).
* Fixture ``redis_server``: a started server per test, stopped at teardown
  (import it into a test module: ``from redis_util import redis_server  #
  noqa: F401``).

Every wait is bounded; nothing here sleeps to wait for work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import redis

HOST = "127.0.0.1"
REDIS_SERVER = os.environ.get("BPN_REDIS_SERVER", "/usr/bin/redis-server")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_PORT_ATTEMPTS = 5

logger = logging.getLogger(__name__)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def _redis_server_path() -> str | None:
    if os.path.isfile(REDIS_SERVER) and os.access(REDIS_SERVER, os.X_OK):
        return REDIS_SERVER
    return shutil.which("redis-server")


def require_redis_server() -> str:
    """The path of ``redis-server``; skips the test when there is none
    (fails instead in CI)."""
    path = _redis_server_path()
    reason = None
    if path is None:
        reason = f"{REDIS_SERVER} not found (apt-get install redis-server, or set BPN_REDIS_SERVER)"
    else:
        try:
            import redis  # noqa: F401
        except ImportError:
            reason = "the redis package is not installed (pip install -e '.[test]')"
    if reason is not None:
        if in_ci():
            pytest.fail(f"broker tests cannot run in CI: {reason}", pytrace=False)
        pytest.skip(reason)
    assert path is not None
    return path


def free_port() -> int:
    """A port that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _bounded_wait(seconds: float) -> None:
    threading.Event().wait(seconds)  # poll tick of a bounded wait, not a wait for work


class RedisServer:
    """One ``redis-server`` process (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, executable: str | None = None) -> None:
        self.executable = executable or _redis_server_path() or REDIS_SERVER
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="bpn-redis-") if directory is None else directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "redis.log"
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0  # where the current process's output begins
        self._spawned_port = 0

    # -- addresses -------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self.port is not None, "not started"
        return f"redis://{HOST}:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous redis-py client (short timeouts) for assertions;
        the caller closes it."""
        import redis

        assert self.port is not None, "not started"
        options: dict[str, Any] = {"socket_connect_timeout": 1.0, "socket_timeout": 5.0}
        options.update(kwargs)
        return redis.Redis(host=HOST, port=self.port, db=0, **options)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, since: int = 0) -> str:
        """The server's output so far (from byte ``since``), for failure
        messages."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> RedisServer:
        """Starts the server (on a free port the first time, on the same port
        afterwards) and waits until it answers PING."""
        assert not self.running, "already running"
        if self.port is not None:
            self._spawn(self.port)
            self._wait_ready()
            return self
        for attempt in range(_PORT_ATTEMPTS):
            port = free_port()
            self._spawn(port)
            try:
                self._wait_ready()
            except _PortTaken:
                logger.info("port %d was taken before redis-server bound it (attempt %d)", port, attempt + 1)
                continue
            self.port = port
            return self
        raise RuntimeError(f"redis-server found no free port in {_PORT_ATTEMPTS} attempts\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL (no shutdown, no final AOF rewrite); waits for the exit."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        if proc is not None:
            proc.wait(STOP_TIMEOUT)
        self._close_log()

    def restart(self) -> RedisServer:
        """kill() (if running), then start() on the same port and directory;
        returns once the AOF is loaded and the server answers PING."""
        assert self.port is not None, "never started"
        self.kill()
        return self.start()

    def stop(self) -> None:
        """SIGTERM (SIGKILL after STOP_TIMEOUT); removes the directory if
        this object made it."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                logger.warning("redis-server %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        self._close_log()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------
    def _spawn(self, port: int) -> None:
        self._close_log()
        self._log = open(self.log_path, "ab")
        self._log_start = self._log.tell()
        self._spawned_port = port
        args = [
            self.executable,
            "--port", str(port),
            "--bind", HOST,
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "",
            "--loglevel", "notice",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir
        )

    def _wait_ready(self) -> None:
        """Until PING answers and ``INFO persistence`` says loading:0."""
        import redis

        assert self.proc is not None
        port = self._spawned_port
        deadline = time.monotonic() + START_TIMEOUT
        client = redis.Redis(host=HOST, port=port, socket_connect_timeout=0.5, socket_timeout=1.0)
        try:
            while True:
                if self.proc.poll() is not None:
                    self._close_log()
                    log = self.log(self._log_start)
                    if "Address already in use" in log and self.port is None:
                        raise _PortTaken(port)
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode} at startup\n{log}")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    if client.ping() and int(client.info("persistence").get("loading", 1)) == 0:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server not ready within {START_TIMEOUT} s\n{self.log(self._log_start)}")
                _bounded_wait(0.01)
        finally:
            client.close()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class _PortTaken(Exception):
    pass


class PausableProxy:
    """A TCP proxy on 127.0.0.1 (a free port) to ``HOST:target_port``.
    ``pause()`` stops forwarding in both directions (bytes wait in the
    sockets; connections stay open) until ``resume()``. Threads: one
    accepting, two per connection; ``close()`` ends them all."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._open = threading.Event()  # set: forwarding
        self._open.set()
        self._closed = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._start(self._accept_loop, "proxy-accept")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        self._open.set()
        for sock in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(STOP_TIMEOUT)

    def __enter__(self) -> PausableProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, target: Any, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection((HOST, self.target_port), timeout=STOP_TIMEOUT)
                upstream.settimeout(None)
            except OSError:
                client.close()  # like the server being down
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
                self._start(self._pump, "proxy-up", client, upstream)
                self._start(self._pump, "proxy-down", upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                self._open.wait()  # paused: hold the bytes (released by resume() or close())
                if not data or self._closed:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started RedisServer (AOF in ``tmp_path / "redis"``), stopped at
    teardown."""
    require_redis_server()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
