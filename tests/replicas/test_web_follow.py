"""The web page follows a queued job (`/#job=<id>`) through GET /api/jobs/{id}/events, in real Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("playwright", reason="playwright is not installed (uv sync installs it)")

from playwright.sync_api import Browser, Page, expect

from tests.conftest import ServiceFactory
from tests.jobs.test_jobs_api import SMALL, Gates, holding
from tests.support.browser import browser as browser  # the module-scoped fixture (skips without Chromium)
from tests.support.browser import watched_page
from tests.support.documents import make_pdf
from tests.support.jobs import submit
from tests.support.openai_stub import StubVLLM


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    with watched_page(browser) as tab:
        yield tab


@pytest.fixture
def gates() -> Iterator[Gates]:
    held = Gates()
    yield held
    held.open_all()


def test_the_page_follows_a_job_as_its_pages_finish(
    stub: StubVLLM, vllm_service: ServiceFactory, tmp_path: Path, gates: Gates, page: Page
) -> None:
    stub.responder = holding(gates)
    url = vllm_service(jobs_db=tmp_path / "jobs.db")
    job_id = submit(url, make_pdf(3, SMALL)).json()["id"]
    page.goto(f"{url}/#job={job_id}")
    expect(page.locator(".page")).to_have_count(3)
    gates[2].set()
    expect(page.locator('.page[data-page="2"] .markdown')).to_have_text("page 2")
    expect(page.locator('.page[data-page="1"] .badge')).not_to_have_text("ok")
    expect(page.locator("#progress-text")).to_contain_text("1")
    gates.open_all()
    expect(page.locator("#progress-text")).to_contain_text("(100%)")
    for number in (1, 3):
        expect(page.locator(f'.page[data-page="{number}"] .markdown')).to_have_text(f"page {number}")
    expect(page.locator("#error")).to_be_hidden()
