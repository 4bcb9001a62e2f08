"""Headless Chromium for the browser tests (the web page, /docs): one launch per test module.

Import it after `pytest.importorskip("playwright")`. Needs Debian's Chromium (`apt-get install -y chromium`)
or `LIGHTONOCR_CHROMIUM=/path/to/chrome`; the `browser` fixture skips with the reason when there is none.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

CHROMIUM = os.environ.get("LIGHTONOCR_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium tries to reach Google and, on a closed
# network, gets its connections refused.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000  # generous for two shared cores; waits end as soon as the condition holds
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` or set LIGHTONOCR_CHROMIUM")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@contextmanager
def watched_page(browser: Browser, *, height: int = 860, **context_options: Any) -> Iterator[Page]:
    """A fresh tab 1280 px wide whose JavaScript errors fail the test when it ends."""
    context = browser.new_context(viewport={"width": 1280, "height": height}, **context_options)
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"
