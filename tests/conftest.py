"""Shared fixtures and the asyncio runner for the blueprint_notify suite.

* ``async def`` tests run under ``asyncio.run()`` (no pytest-asyncio), each
  bounded by ``asyncio.wait_for`` (BPN_ASYNC_TEST_TIMEOUT, default 20 s).
* Every test is also guarded by faulthandler: a test (setup and teardown
  included) that takes longer than BPN_TEST_TIMEOUT seconds (default 60)
  dumps every thread's stack and ends the run instead of hanging CI.
* Every server binds a loopback address with port 0: nothing here talks to
  anything but this machine.
"""

from __future__ import annotations

import asyncio
import faulthandler
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from blueprint_notify import JobNotifier
from blueprint_notify.testing import WebhookReceiver

SECRET = "test-secret"
ASYNC_TEST_TIMEOUT = float(os.environ.get("BPN_ASYNC_TEST_TIMEOUT", "20"))
TEST_TIMEOUT = float(os.environ.get("BPN_TEST_TIMEOUT", "60"))


# -- async tests -------------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Runs ``async def`` test functions with asyncio.run()."""
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    funcargs = pyfuncitem.funcargs
    argnames = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: funcargs[name] for name in argnames}

    async def guarded() -> None:
        try:
            await asyncio.wait_for(func(**kwargs), ASYNC_TEST_TIMEOUT)
        finally:
            sse_support = sys.modules.get("sse_support")
            if sse_support is not None:
                await sse_support.abort_open_clients()

    asyncio.run(guarded())
    return True


# -- hang guard ----------------------------------------------------------------------
def _traceback_file(config: pytest.Config) -> Any:
    # pytest's faulthandler plugin keeps a dup of the real stderr (captured
    # output would be lost when the process exits); fall back to stderr.
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key

        return config.stash[fault_handler_stderr_fd_key]
    except Exception:
        return sys.__stderr__


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if TEST_TIMEOUT > 0:
        faulthandler.dump_traceback_later(
            TEST_TIMEOUT, exit=True, file=_traceback_file(item.config)
        )
    try:
        return (yield)
    finally:
        if TEST_TIMEOUT > 0:
            faulthandler.cancel_dump_traceback_later()


# -- fixtures ------------------------------------------------------------------------
@pytest.fixture
def make_receiver() -> Iterator[Callable[..., WebhookReceiver]]:
    """Factory of started WebhookReceivers (secret "test-secret" unless
    given, host 127.0.0.1 unless given); all are stopped at teardown, and a
    receiver whose handler hook raised fails the test."""
    receivers: list[WebhookReceiver] = []

    def make(secret: str | None = SECRET, **kwargs: Any) -> WebhookReceiver:
        r = WebhookReceiver(secret, **kwargs).start()
        receivers.append(r)
        return r

    yield make
    for r in receivers:
        r.stop()
    errors = [e for r in receivers for e in r.errors]
    assert not errors, f"WebhookReceiver errors: {errors!r}"


@pytest.fixture
def receiver(make_receiver: Callable[..., WebhookReceiver]) -> WebhookReceiver:
    """A started loopback WebhookReceiver verifying with "test-secret"."""
    return make_receiver()


@pytest.fixture
def make_notifier() -> Iterator[Callable[..., JobNotifier]]:
    """Factory of JobNotifiers with test-friendly defaults (signing secret
    "test-secret", loopback allowed, no retries, 10 ms backoff, 2 s timeout);
    keyword arguments override them. All are closed at teardown."""
    notifiers: list[JobNotifier] = []

    def make(**overrides: Any) -> JobNotifier:
        options: dict[str, Any] = {
            "signing_secret": SECRET,
            "allow_private_networks": True,
            "max_retries": 0,
            "retry_base_ms": 10,
            "timeout_secs": 2,
        }
        options.update(overrides)
        n = JobNotifier(**options)
        notifiers.append(n)
        return n

    yield make
    for n in notifiers:
        n.close(timeout=0)
