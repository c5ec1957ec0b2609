"""The SSRF guard, redirects and proxies.

Real deliveries only ever target loopback receivers; other ranges are
checked through ``_core.check_address`` (the guard's own decision
function), never by sending traffic to them."""

from __future__ import annotations

import time

import pytest

from blueprint_notify import JobEvent, JobStatus
from blueprint_notify import _core

REFUSED = [
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "100.127.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "127.0.0.1",
    "127.255.255.254",
    "192.0.0.8",
    "192.0.2.1",
    "198.18.0.1",
    "198.51.100.7",
    "203.0.113.9",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fc00::1",
    "fd12::1",
    "fe80::1",
    "fec0::1",
    "ff02::1",
    "::ffff:10.0.0.1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",
    "64:ff9b::a00:1",
    "64:ff9b::7f00:1",
    "2002:0a00:0001::1",
    "2002:a9fe:a9fe::1",
    "2001:db8::1",
    "100::1",
]

ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "172.32.0.1",
    "100.128.0.1",
    "192.169.0.1",
    "2606:4700::1111",
    "2a00:1450:4001::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:0808:0808::1",
]


@pytest.mark.parametrize("address", REFUSED)
def test_check_address_refuses_special_purpose_ranges(address) -> None:
    reason = _core.check_address(address)
    assert isinstance(reason, str) and reason, f"{address} must be refused"


@pytest.mark.parametrize("address", ALLOWED)
def test_check_address_allows_global_unicast(address) -> None:
    assert _core.check_address(address) is None


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "this network"),
    ],
)
def test_check_address_reasons_are_specific(address, words) -> None:
    assert words in _core.check_address(address)


@pytest.mark.parametrize("bad", ["", "localhost", "1.2.3", "999.1.1.1", "::g", "10.0.0.1/8"])
def test_check_address_rejects_non_addresses(bad) -> None:
    with pytest.raises(ValueError):
        _core.check_address(bad)
    with pytest.raises(TypeError):
        _core.check_address(b"127.0.0.1")


# -- the guard on the real delivery path -------------------------------------------------
def _guarded_urls(v4, v6):
    return {
        "ipv4-loopback": (f"http://127.0.0.1:{v4.port}/hook", v4, "loopback"),
        "localhost-name": (f"http://localhost:{v4.port}/hook", v4, "loopback"),
        "ipv6-loopback": (f"http://[::1]:{v6.port}/hook", v6, "loopback"),
        "v4-mapped-loopback": (f"http://[::ffff:127.0.0.1]:{v4.port}/hook", v4, "loopback"),
        "this-network": (f"http://0.0.0.0:{v4.port}/hook", v4, "this network"),
        "decimal-ipv4": (f"http://2130706433:{v4.port}/hook", v4, "loopback"),
        "other-127": (f"http://127.1.2.3:{v4.port}/hook", v4, "loopback"),
    }


CASES = [
    "ipv4-loopback",
    "localhost-name",
    "ipv6-loopback",
    "v4-mapped-loopback",
    "this-network",
    "decimal-ipv4",
    "other-127",
]


@pytest.fixture
def loopback_pair(make_receiver):
    """Receivers on 127.0.0.1 and on ::1 (so [::1] URLs reach a real server)."""
    return make_receiver(), make_receiver(host="::1")


@pytest.mark.parametrize("case", CASES)
def test_guard_refuses_loopback_before_connecting(make_notifier, loopback_pair, case) -> None:
    v4, v6 = loopback_pair
    url, _, reason = _guarded_urls(v4, v6)[case]
    # Retries that would take seconds: a refusal must not be retried.
    n = make_notifier(allow_private_networks=False, max_retries=3, retry_base_ms=1000)
    n.notify("ssrf-job", JobEvent(JobStatus.COMPLETED), url)
    start = time.monotonic()
    assert n.flush(5)
    assert time.monotonic() - start < 0.5, "a refused address must be dead-lettered at once"
    (dead,) = n.dead_letters()
    assert dead.attempts == 1
    assert dead.job_id == "ssrf-job" and dead.url == url
    assert reason in dead.last_error, dead.last_error
    assert "allow_private_networks" in dead.last_error
    for r in (v4, v6):
        assert r.requests == []
        assert r.connections_accepted == 0, "the guard must refuse before connecting"
    s = n.stats()
    assert (s["attempts"], s["failed_attempts"], s["dead_lettered"], s["delivered"]) == (1, 1, 1, 0)


@pytest.mark.parametrize("case", [c for c in CASES if c != "other-127"])  # nothing listens there
def test_loopback_is_delivered_when_private_networks_are_allowed(make_notifier, loopback_pair, case) -> None:
    v4, v6 = loopback_pair
    url, target, _ = _guarded_urls(v4, v6)[case]
    n = make_notifier(allow_private_networks=True, max_retries=0)
    n.notify("allowed-job", JobEvent(JobStatus.COMPLETED), url)
    assert n.flush(5)
    assert n.dead_letters() == []
    assert target.wait_for(1, 1)
    (req,) = target.requests
    assert req.verified and req.job_id == "allowed-job"


def test_guard_is_the_default(make_receiver) -> None:
    from blueprint_notify import JobNotifier

    r = make_receiver()
    with JobNotifier(signing_secret="test-secret", max_retries=0, close_timeout_secs=2) as n:
        n.notify("default-guard", JobEvent(JobStatus.COMPLETED), r.url_for())
        assert n.flush(5)
        (dead,) = n.dead_letters()
        assert "allow_private_networks" in dead.last_error
    assert r.connections_accepted == 0


# -- redirects and proxies -------------------------------------------------------------------
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_not_followed(make_notifier, make_receiver, status) -> None:
    first, second = make_receiver(), make_receiver()
    first.respond_with(status, headers={"Location": second.url_for("/elsewhere")})
    n = make_notifier(max_retries=0)
    n.notify("redirect-job", JobEvent(JobStatus.COMPLETED), first.url_for())
    assert n.flush(5)
    assert len(first.requests) == 1
    assert second.requests == [] and second.connections_accepted == 0
    (dead,) = n.dead_letters()
    assert dead.last_error == f"HTTP {status}"
    assert n.stats()["delivered"] == 0


def test_proxy_environment_is_ignored(make_notifier, make_receiver, monkeypatch) -> None:
    target, proxy = make_receiver(), make_receiver(secret=None)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    n = make_notifier()
    n.notify("proxy-job", JobEvent(JobStatus.COMPLETED), target.url_for())
    assert n.flush(5)
    assert n.dead_letters() == []
    assert target.wait_for(1, 1)
    (req,) = target.requests
    assert req.path == "/hook", "a proxied request would carry an absolute URL"
    assert req.verified
    assert proxy.requests == [] and proxy.connections_accepted == 0
