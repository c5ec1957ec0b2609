"""The pytest plugin (``blueprint_notify.pytest_plugin``, entry point
``pytest11``): its fixtures ``webhook_receiver``, ``job_notifier`` and
``webhook_secret``, exercised by inner pytest runs (``pytester``) in
subprocesses.

The plugin is loaded explicitly with ``-p no:blueprint_notify -p
blueprint_notify.pytest_plugin``: that works whether or not the entry point
is registered in the environment (an editable install made before the entry
point was declared does not register it; ``-p`` of the module alone would
fail with "already registered" once it is). A fake distribution declaring
the same entry point checks both situations.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

import blueprint_notify
from blueprint_notify import pytest_plugin

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_ARGS = ("-p", "no:blueprint_notify", "-p", "blueprint_notify.pytest_plugin")
PACKAGE_DIR = str(Path(blueprint_notify.__file__).resolve().parent)

# The example of the plugin's docs: a dead letter asserted in four lines, no sleep.
README_EXAMPLE = '''
from blueprint_notify import JobEvent, JobStatus


def test_dead_letter(job_notifier, webhook_receiver):
    webhook_receiver.respond_with(500)
    job_notifier.notify("job-1", JobEvent(JobStatus.COMPLETED), webhook_receiver.url)
    assert job_notifier.flush(5)
    assert job_notifier.dead_letters()[0].last_error == "HTTP 500"
'''


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester project as strict as ours: warnings are errors."""
    pytester.makeini(
        """
        [pytest]
        filterwarnings = error
        addopts = -p no:cacheprovider
        """
    )
    return pytester


def _outcomes_text(result: pytest.RunResult) -> str:
    return "\n".join(result.outlines[-30:] + result.errlines[-30:])


def test_readme_example_passes(inner) -> None:
    inner.makepyfile(test_readme=README_EXAMPLE)
    result = inner.runpytest_subprocess(*PLUGIN_ARGS)
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK, _outcomes_text(result)


def test_readme_example_is_the_documented_one() -> None:
    """The docstring of the plugin carries the example run above."""
    doc = pytest_plugin.__doc__ or ""
    for line in README_EXAMPLE.strip().splitlines()[2:]:
        assert line.strip() in doc, line
    body = [ln for ln in README_EXAMPLE.strip().splitlines()[4:] if ln.strip()]
    assert len(body) == 4, "four lines, no sleep"
    assert not any("sleep" in ln for ln in body)


def _readme_code_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_a_runnable_plugin_example(inner) -> None:
    blocks = [b for b in _readme_code_blocks() if "job_notifier" in b and "webhook_receiver" in b]
    assert blocks, "README.md should show the plugin example"
    inner.makepyfile(test_from_readme=blocks[0])
    result = inner.runpytest_subprocess(*PLUGIN_ARGS)
    result.assert_outcomes(passed=1)


FIXTURE_TESTS = f'''
import json
import time

import blueprint_notify
from blueprint_notify import JobEvent, JobNotifier, JobStatus, verify
from blueprint_notify.testing import WebhookReceiver

SEEN = []


def test_imports_the_package_under_test():
    assert blueprint_notify.__file__.startswith({PACKAGE_DIR!r})


def test_webhook_receiver(webhook_receiver, webhook_secret):
    assert isinstance(webhook_receiver, WebhookReceiver)
    assert webhook_receiver.running
    assert webhook_receiver.url.startswith("http://127.0.0.1:")
    assert webhook_receiver.secret == webhook_secret
    assert webhook_receiver.requests == []


def test_job_notifier(job_notifier, webhook_secret):
    assert isinstance(job_notifier, JobNotifier)
    cfg = job_notifier.config
    assert cfg.allow_private_networks is True
    assert cfg.signing_secret == webhook_secret
    assert cfg.max_retries >= 1 and cfg.retry_base_ms <= 100, "fast retries"
    assert not job_notifier.closed
    SEEN.append(job_notifier)


def test_job_notifier_was_closed_at_teardown():
    (previous,) = SEEN
    assert previous.closed


def test_verified_delivery(job_notifier, webhook_receiver, webhook_secret):
    event = JobEvent(JobStatus.PROCESSING, progress=10)
    job_notifier.notify("job-2", event, webhook_receiver.url_for("/hook"))
    assert job_notifier.flush(5)
    (req,) = webhook_receiver.requests
    assert req.verified is True
    assert req.path == "/hook"
    assert req.headers["X-Job-Id"] == "job-2"
    assert "webhook-signature" in req.headers
    assert req.json() == {{"job_id": "job-2", "event": event.to_dict()}}
    assert verify(req.body, req.headers, webhook_secret) == req.json()
    assert job_notifier.dead_letters() == []


def test_scripted_responses(job_notifier, webhook_receiver):
    webhook_receiver.respond_with(503, headers={{"X-Why": "busy"}}, times=1)
    webhook_receiver.respond_with(200, delay=0.2)  # server-side delay
    start = time.monotonic()
    job_notifier.notify("job-3", JobEvent(JobStatus.COMPLETED), webhook_receiver.url)
    assert job_notifier.flush(5)
    assert time.monotonic() - start >= 0.2
    assert [r.status for r in webhook_receiver.requests] == [503, 200]
    assert all(r.verified for r in webhook_receiver.requests)
    assert job_notifier.dead_letters() == []


def test_drain_in_an_event_loop(job_notifier, webhook_receiver):
    import asyncio

    async def main():
        job_notifier.notify("job-4", JobEvent(JobStatus.COMPLETED), webhook_receiver.url)
        return await job_notifier.drain(5)

    assert asyncio.run(main())
    assert len(webhook_receiver.requests) == 1
'''


def test_fixtures(inner) -> None:
    inner.makepyfile(test_fixtures=FIXTURE_TESTS)
    result = inner.runpytest_subprocess(*PLUGIN_ARGS, "-p", "no:randomly", "-v")
    result.assert_outcomes(passed=7)


def test_webhook_secret_can_be_overridden(inner) -> None:
    inner.makeconftest(
        """
        import pytest

        @pytest.fixture
        def webhook_secret():
            return "my-own-secret"
        """
    )
    inner.makepyfile(
        test_override="""
        from blueprint_notify import JobEvent, JobStatus
        from blueprint_notify.testing import compute_signature

        def test_override(job_notifier, webhook_receiver):
            assert job_notifier.config.signing_secret == "my-own-secret"
            job_notifier.notify("j", JobEvent(JobStatus.COMPLETED), webhook_receiver.url)
            assert job_notifier.flush(5)
            (req,) = webhook_receiver.requests
            assert req.verified is True
            assert req.signature == compute_signature("my-own-secret", req.headers["X-Webhook-Timestamp"], req.body)
        """
    )
    result = inner.runpytest_subprocess(*PLUGIN_ARGS)
    result.assert_outcomes(passed=1)


def test_a_failing_test_reports_cleanly_and_teardown_closes(inner) -> None:
    """A test that fails with a delivery still pending: the failure is the
    test's own, teardown closes the notifier without waiting (it is quick)
    and nothing else errors."""
    inner.makepyfile(
        test_fails="""
        from blueprint_notify import JobEvent, JobStatus

        def test_fails(job_notifier, webhook_receiver):
            webhook_receiver.respond_with(200, delay=30)  # server-side delay
            job_notifier.notify("slow", JobEvent(JobStatus.COMPLETED), webhook_receiver.url)
            assert webhook_receiver.wait_for(1, 5)
            assert False, "deliberate"
        """
    )
    result = inner.runpytest_subprocess(*PLUGIN_ARGS, "--durations=0", "-vv")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: deliberate*"])
    durations = [ln for ln in result.outlines if "teardown" in ln and "test_fails" in ln]
    for ln in durations:
        assert float(ln.split("s", 1)[0]) < 5, ln


def test_pyproject_declares_the_pytest11_entry_point() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        section = re.search(r"^\[project\.entry-points\.pytest11\]\n((?:[^\[\n].*\n?)*)", text, flags=re.M)
        assert section, "pyproject.toml has no [project.entry-points.pytest11] table"
        assert re.search(r'^blueprint_notify\s*=\s*"blueprint_notify\.pytest_plugin"\s*$', section.group(1), flags=re.M)
    else:
        project = tomllib.loads(text)["project"]
        assert project["entry-points"]["pytest11"] == {"blueprint_notify": "blueprint_notify.pytest_plugin"}
    # Where the installed metadata already has it (after a reinstall), it matches.
    for ep in metadata.entry_points(group="pytest11"):
        if ep.name == "blueprint_notify":
            assert ep.value == "blueprint_notify.pytest_plugin"


def _fake_distribution(where: Path) -> Path:
    """A distribution that registers the plugin's entry point, as an
    install of this package would."""
    site = where / "fake-site"
    info = site / "bpn_entry_point_probe-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bpn-entry-point-probe\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[pytest11]\nblueprint_notify = blueprint_notify.pytest_plugin\n")
    return site


@pytest.mark.parametrize("args", [(), PLUGIN_ARGS], ids=["auto-loaded", "explicit"])
def test_plugin_with_the_entry_point_registered(inner, monkeypatch, args) -> None:
    site = _fake_distribution(inner.path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    inner.makepyfile(test_readme=README_EXAMPLE)
    result = inner.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)


def test_without_the_plugin_the_fixtures_are_missing(inner) -> None:
    """Control: the inner runs above pass because of the plugin."""
    inner.makepyfile(test_readme=README_EXAMPLE)
    result = inner.runpytest_subprocess("-p", "no:blueprint_notify")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'job_notifier' not found*"])


def test_plugin_module_fixtures() -> None:
    names = set(pytest_plugin.__all__)
    assert names == {"webhook_secret", "webhook_receiver", "job_notifier"}
    assert sys.modules["blueprint_notify.pytest_plugin"] is pytest_plugin
