"""pytest plugin (entry point ``pytest11``): fixtures for testing code that
sends job notifications.

- ``webhook_receiver``: a real loopback HTTP receiver
  (:class:`blueprint_notify.testing.WebhookReceiver`) that verifies every
  delivery's signature with ``webhook_secret``; ``.url``, ``.requests`` (with
  ``.headers``, ``.body``, ``.json()``, ``.verified``) and
  ``respond_with(status, headers=None, times=None, delay=None)``.
- ``job_notifier``: a :class:`blueprint_notify.JobNotifier` signing with
  ``webhook_secret``, ``allow_private_networks=True`` (the receiver is on
  loopback), fast retries (``max_retries=2``, ``retry_base_ms=10``), a 5 s
  timeout; closed at teardown.
- ``webhook_secret``: the secret both use (override the fixture to change it).

Wait with ``job_notifier.flush(timeout)`` (or ``await job_notifier.drain()``),
never with sleeps::

    def test_dead_letter(job_notifier, webhook_receiver):
        webhook_receiver.respond_with(500)
        job_notifier.notify("job-1", JobEvent(JobStatus.COMPLETED), webhook_receiver.url)
        assert job_notifier.flush(5)
        assert job_notifier.dead_letters()[0].last_error == "HTTP 500"
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._notifier import JobNotifier
from .testing import WebhookReceiver

__all__ = ["webhook_secret", "webhook_receiver", "job_notifier"]


@pytest.fixture
def webhook_secret() -> str:
    """The signing secret shared by ``job_notifier`` and ``webhook_receiver``."""
    return "whsec_dGVzdC1zZWNyZXQtZm9yLWJsdWVwcmludC1ub3RpZnk="


@pytest.fixture
def webhook_receiver(webhook_secret: str) -> Iterator[WebhookReceiver]:
    """A started loopback receiver verifying signatures; stopped at teardown."""
    with WebhookReceiver(webhook_secret) as receiver:
        yield receiver


@pytest.fixture
def job_notifier(webhook_secret: str) -> Iterator[JobNotifier]:
    """A JobNotifier for tests: loopback allowed, fast retries; closed at
    teardown (pending deliveries are dead-lettered, not waited for)."""
    notifier = JobNotifier(
        signing_secret=webhook_secret,
        allow_private_networks=True,
        max_retries=2,
        retry_base_ms=10,
        timeout_secs=5,
    )
    try:
        yield notifier
    finally:
        notifier.close(0)
