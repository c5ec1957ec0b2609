"""Inputs the fuzz harnesses (fuzz/, tools/fuzz.sh) found to break a
property, replayed through the public API wherever Python can reach them.
Each names its file under fuzz/regressions/, which tools/fuzz.sh replays
against the C harness as well."""

from __future__ import annotations

import pytest

from blueprint_notify import JobEvent, JobNotifier, JobStatus
from blueprint_notify.testing import ReceivedRequest


def gaps(reqs: list[ReceivedRequest]) -> list[float]:
    return [b.received_at - a.received_at for a, b in zip(reqs, reqs[1:])]


# -- fuzz/regressions/url/port-zero ---------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://p:0/", "https://example.com:00/x", "http://[::1]:0"])
def test_port_zero_is_refused_at_notify(url: str) -> None:
    """Nothing can be reached on port 0: such a URL was accepted, then
    retried until dead-lettered."""
    n = JobNotifier(signing_secret="s")
    try:
        with pytest.raises(ValueError, match="invalid port"):
            n.notify("job", JobEvent(JobStatus.QUEUED), url)
        n.notify("job", JobEvent(JobStatus.QUEUED), "https://example.com:000443/x")  # leading zeros: 443
    finally:
        n.close(0)


# -- fuzz/regressions/retry_after/seconds-wrap-to-384ms -------------------------------------------------
def test_a_huge_retry_after_does_not_wrap_to_a_short_wait(make_notifier, receiver) -> None:
    """18446744073709552 seconds is more milliseconds than 64 bits hold: the
    product wrapped around to 384 ms. Now it saturates and the cap
    (max_retry_delay_ms) applies, as for any other huge value."""
    receiver.respond_with(429, headers={"Retry-After": "18446744073709552"}, times=1)
    n = make_notifier(max_retries=1, retry_base_ms=10, max_retry_delay_ms=1500)
    n.notify("ra-wrap", JobEvent(JobStatus.COMPLETED), receiver.url_for())
    assert n.flush(6)
    reqs = receiver.requests
    assert [r.status for r in reqs] == [429, 200]
    (gap,) = gaps(reqs)
    assert 1.5 <= gap < 2.5, f"the 1500 ms cap should apply, retried after {gap:.3f} s"
