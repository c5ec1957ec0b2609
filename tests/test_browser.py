"""The demo page in headless Chromium (Playwright): a job's progress bar
fills to 100 % through EventSource, a stream dropped by the server is
resumed by EventSource's own reconnect with Last-Event-ID (no event id
missing or repeated), and a failing endpoint's retries end in the dead-letter
table.

Needs Debian's chromium at /usr/bin/chromium (``tools/sysdeps.sh`` installs
it; BPN_CHROMIUM overrides the path) and the playwright package (test
extra); no browser is downloaded. Skipped when either is missing, except in
CI (CI set), where that fails instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

CHROMIUM = os.environ.get("BPN_CHROMIUM", "/usr/bin/chromium")


def _missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} not found (apt-get install chromium, or set BPN_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    return None


_reason = _missing()
if _reason is not None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"browser test cannot run in CI: {_reason}", pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

from blueprint_notify.demo.app import DemoApp  # noqa: E402
from blueprint_notify.demo.server import serve_in_thread  # noqa: E402

TIMEOUT_MS = 10_000


_SANITIZER_ENV = ("ASAN_OPTIONS", "LSAN_OPTIONS", "UBSAN_OPTIONS", "PYTHONMALLOC")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    args = ["--disable-dev-shm-usage"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to sandbox as root (CI)
    # Under `make test-asan` the sanitizer runtimes are preloaded into every
    # child process: Playwright's node driver and Chromium are not ours to
    # check (and LeakSanitizer reports both), so they start without them.
    with pytest.MonkeyPatch.context() as mp:
        preload = [lib for lib in os.environ.get("LD_PRELOAD", "").split() if "san.so" not in lib]
        if preload:
            mp.setenv("LD_PRELOAD", " ".join(preload))
        else:
            mp.delenv("LD_PRELOAD", raising=False)
        for name in _SANITIZER_ENV:
            mp.delenv(name, raising=False)
        pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, timeout=TIMEOUT_MS)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        pw.stop()


@pytest.fixture
def open_demo(browser: Browser) -> Iterator[Callable[..., tuple[Page, DemoApp]]]:
    """Starts a demo server (DemoApp options as keywords) and opens its page;
    fails the test on any JavaScript error or console error."""
    opened: list[tuple[Any, DemoApp, Any]] = []
    problems: list[str] = []

    def open_(**options: Any) -> tuple[Page, DemoApp]:
        app = DemoApp(**options)
        server = serve_in_thread(app)
        url = server.__enter__()
        context = browser.new_context(viewport={"width": 1360, "height": 1000})
        opened.append((server, app, context))
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
        page.goto(url)
        expect(page.locator("#feed-state")).to_have_attribute("data-state", "live")
        return page, app

    yield open_
    for server, app, context in reversed(opened):
        context.close()
        server.__exit__(None, None, None)
        app.close()
    assert not problems, problems


def _ids(page: Page, job_id: str) -> list[int]:
    raw = page.locator(f'.job[data-job="{job_id}"] .log').get_attribute("data-ids") or ""
    return [int(x) for x in raw.split(",") if x]


def test_job_progress_bar_fills_to_completion(open_demo: Callable[..., tuple[Page, DemoApp]]) -> None:
    page, app = open_demo(job_steps=(5, 5), job_interval=(0.08, 0.12))
    page.click("#start-job")
    card = page.locator(".job").first
    expect(card).to_have_attribute("data-status", "completed")
    job_id = card.get_attribute("data-job")
    assert job_id
    expect(card.locator(".badge")).to_have_text("completed")
    expect(card.locator(".bar")).to_have_attribute("data-progress", "100")
    expect(card.locator(".pct")).to_have_text("100 %")
    # The bar is drawn full once its CSS transition is over.
    page.wait_for_function(
        "(el) => el.getBoundingClientRect().width >= el.parentElement.getBoundingClientRect().width - 0.5",
        arg=card.locator(".fill").element_handle(),
    )
    # queued, processing 0, 20, 40, 60, 80, 100, completed
    assert _ids(page, job_id) == list(range(1, 9))
    expect(card.locator(".conn")).to_have_attribute("data-state", "closed")
    expect(card.locator(".outcome code")).to_have_text(f"s3://demo-bucket/{job_id}.bin")
    # Each event arrived at the receiver as a webhook whose signature verified.
    rows = page.locator(f'#hooks tbody tr[data-job="{job_id}"]')
    expect(rows).to_have_count(8)
    expect(rows.locator(".sig.ok")).to_have_count(8)
    expect(rows.locator(".code.c2xx")).to_have_count(8)
    expect(card.locator(".job-hooks")).to_have_text("8 webhooks ✓")
    expect(page.locator("#stat-delivered")).to_have_text("8")
    expect(page.locator("#dead-empty")).to_be_visible()


def test_dropped_stream_resumes_via_last_event_id(open_demo: Callable[..., tuple[Page, DemoApp]]) -> None:
    # The server tells EventSource to wait 400 ms before reconnecting; the
    # job publishes every ~100 ms, so events are missed while it is away.
    page, app = open_demo(retry_ms=400)
    job_id = page.evaluate("() => window.demo.startJob({steps: 20, interval: 0.1})")
    card = page.locator(f'.job[data-job="{job_id}"]')
    page.wait_for_function("(id) => window.demo.ids(id).length >= 4", arg=job_id)
    assert page.evaluate("(id) => window.demo.dropStream(id)", job_id) == 1
    expect(card.locator(".log li.warn")).to_contain_text("reconnecting with Last-Event-ID")
    expect(card.locator(".log")).to_contain_text("reconnected")
    expect(card).to_have_attribute("data-status", "completed")
    ids = _ids(page, job_id)
    # queued + processing 0, 5, ..., 100 (21) + completed: each id once, in order.
    assert ids == list(range(1, 24)), ids
    # The browser's own reconnect sent the Last-Event-ID header (the page
    # never adds last_event_id to the URL), and events published while it
    # was away were replayed after it.
    resumes = [r for r in app.resumes if r["job_id"] == job_id]
    assert len(resumes) == 1 and resumes[0]["via"] == "Last-Event-ID header", resumes
    resumed_after = int(resumes[0]["last_event_id"])
    assert 4 <= resumed_after <= 20
    expect(card.locator(".log")).to_contain_text(f"server resumed after #{resumed_after}")


def test_failing_endpoint_fills_the_dead_letter_table(open_demo: Callable[..., tuple[Page, DemoApp]]) -> None:
    page, app = open_demo(retry_base_ms=30, job_steps=(1, 1), job_interval=(0.05, 0.05))
    page.click("#endpoint-toggle")
    expect(page.locator("#endpoint-label")).to_have_text("failing (500)")
    expect(page.locator("#endpoint-toggle")).to_have_attribute("aria-checked", "true")
    assert app.failing
    page.click("#start-job")
    card = page.locator(".job").first
    expect(card).to_have_attribute("data-status", "completed")
    job_id = card.get_attribute("data-job")
    # queued, processing 0, processing 100, completed: each tried 1 + 3 times.
    dead = page.locator(f'#dead tbody tr[data-job="{job_id}"]')
    expect(dead).to_have_count(4)
    expect(dead.first).to_contain_text("HTTP 500")
    expect(page.locator(f'#hooks tbody tr[data-job="{job_id}"] .code.c5xx')).to_have_count(16)
    expect(page.locator(f'#hooks tbody tr[data-job="{job_id}"] td.retry')).to_have_count(12)
    expect(page.locator("#stat-dead")).to_have_text("4")
    expect(card.locator(".job-hooks")).to_contain_text("4 dead")
    page.click("#endpoint-toggle")
    expect(page.locator("#endpoint-label")).to_have_text("healthy")
    assert not app.failing
