"""Headless Chromium for the browser tests (the web page, /docs): one launch per test module.

Import it after `pytest.importorskip("playwright")`. Needs Debian's Chromium (`apt-get install -y chromium`)
or `LIGHTONOCR_CHROMIUM=/path/to/chrome`; the `browser` fixture skips with the reason when there is none.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect, sync_playwright

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
