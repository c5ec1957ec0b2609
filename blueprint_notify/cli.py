"""The ``blueprint-notify`` command (also ``python -m blueprint_notify``).

    blueprint-notify demo [--host 127.0.0.1] [--port 8765] [--no-browser] [--once]
                          [--data-dir DIR | --no-store] [-v]

``demo`` serves the live web demo until Ctrl-C (``--port 0`` picks a free
port; the URL is printed). Its webhook deliveries and dead letters live in a
durable store, ``outbox.db`` under the data directory (default:
``$XDG_DATA_HOME/blueprint-notify/demo``, i.e.
``~/.local/share/blueprint-notify/demo``): stop the demo with deliveries
pending and they resume on the next start. ``--once`` instead runs a
scripted scenario against it over HTTP, checks the outcome and exits (0 when
every check passed; its store is a fresh temporary directory unless
``--data-dir`` is given); that is what ``make demo`` does in CI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from ._config import __version__

__all__ = ["main"]

DEFAULT_PORT = 8765

logger = logging.getLogger("blueprint_notify.demo")


class _Formatter(logging.Formatter):
    """``12:00:01  message`` for the demo's own INFO lines, the level and
    logger name for everything else."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.startswith("blueprint_notify.demo"):
            self._style._fmt = "%(asctime)s  %(message)s"
        else:
            self._style._fmt = "%(asctime)s  %(levelname)s %(name)s: %(message)s"
        return super().format(record)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    if not verbose:
        # The page (or the scripted run's summary) shows every failed attempt
        # and dead letter; the library's own warnings would repeat them.
        logging.getLogger("blueprint_notify").setLevel(logging.CRITICAL)
        logging.getLogger("blueprint_notify.demo").setLevel(logging.INFO)
        logging.getLogger("uvicorn").setLevel(logging.WARNING)


def _parser(prog: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "blueprint-notify",
        description="blueprint_notify: signed job webhooks and per-job Server-Sent Events.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="serve the live web demo",
        description=(
            "Serves a page where you start simulated jobs and watch their progress live over "
            "Server-Sent Events, see each signed webhook reach a built-in receiver, and make "
            "that endpoint fail to watch retries end in dead letters."
        ),
    )
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    demo.add_argument(
        "--port", type=int, default=None, help=f"port (default: {DEFAULT_PORT}; 0 picks a free one; --once: 0)"
    )
    demo.add_argument("--no-browser", action="store_true", help="do not open a browser")
    demo.add_argument(
        "--once",
        action="store_true",
        help="run a scripted scenario against the server over HTTP, check it and exit (status 0 if all is well)",
    )
    store = demo.add_mutually_exclusive_group()
    store.add_argument(
        "--data-dir",
        type=Path,
        help=f"directory of the durable store outbox.db (default: {default_data_dir()}; --once: a fresh temporary one)",
    )
    store.add_argument("--no-store", action="store_true", help="keep deliveries in memory only")
    demo.add_argument("-v", "--verbose", action="store_true", help="log the library, uvicorn and every request")
    listen = commands.add_parser(
        "listen",
        help="receive webhooks locally, verify and print each one",
        description=(
            "A local webhook receiver: verifies every delivery's signature (Standard Webhooks "
            "or X-Webhook-Signature) over the raw body, pretty-prints it, and answers 401 to "
            "a bad signature. Point a notifier's webhook_url at it."
        ),
    )
    listen.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    listen.add_argument("--port", type=int, default=8787, help="port (default: %(default)s; 0 picks a free one)")
    listen.add_argument(
        "--secret",
        default=os.environ.get("BLUEPRINT_NOTIFY_SECRET"),
        help="the signing secret (default: $BLUEPRINT_NOTIFY_SECRET)",
    )
    listen.add_argument("--tolerance", type=float, default=300, help="timestamp tolerance, seconds (default: 300)")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.command == "listen":
        if not args.secret:
            parser.error("listen needs --secret (or BLUEPRINT_NOTIFY_SECRET)")
        if not 0 <= args.port <= 65535:
            parser.error("--port must be from 0 to 65535")
        from .listen import listen

        return listen(args.host, args.port, args.secret, tolerance=args.tolerance)
    if args.command != "demo":
        parser.print_help()
        return 2
    if args.port is not None and not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    _setup_logging(args.verbose)
    try:
        from .demo import server  # needs uvicorn
    except ImportError as exc:
        if getattr(exc, "name", None) != "uvicorn":
            raise
        print(
            "the demo needs uvicorn: pip install 'blueprint_notify[demo]' (or pip install uvicorn)",
            file=sys.stderr,
        )
        return 2
    if args.once:
        if args.no_store or args.data_dir:
            store = None if args.no_store else _store_in(args.data_dir)
            return _once(args.host, 0 if args.port is None else args.port, args.verbose, store)
        with tempfile.TemporaryDirectory(prefix="blueprint-notify-demo-") as tmp:
            return _once(args.host, 0 if args.port is None else args.port, args.verbose, _store_in(Path(tmp)))
    port = DEFAULT_PORT if args.port is None else args.port
    store = None if args.no_store else _store_in(args.data_dir or default_data_dir())
    return server.serve_forever(args.host, port, open_browser=not args.no_browser, verbose=args.verbose, store_path=store)


def default_data_dir() -> Path:
    """Where the demo keeps its store: $XDG_DATA_HOME/blueprint-notify/demo."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "blueprint-notify" / "demo"


def _store_in(data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    return data_dir / "outbox.db"


def _once(host: str, port: int, verbose: bool, store: Path | None) -> int:
    from .demo.app import DemoApp
    from .demo.scripted import run_script
    from .demo.server import serve_in_thread

    app = DemoApp(store_path=store)
    try:
        with serve_in_thread(app, host, port, verbose=verbose) as url:
            print(f"blueprint_notify demo: {url}  (scripted run; store: {store or 'none, in memory'})", flush=True)
            return run_script(url)
    finally:
        app.close()
