"""/docs in headless Chromium on a closed network: Swagger UI renders, and "Try it out" sends the key."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

pytest.importorskip("playwright", reason="playwright is not installed (uv sync installs it)")

from playwright.sync_api import Browser, Page, Route, expect

from tests.api.test_docs import KEY
from tests.conftest import ServiceFactory
from tests.support.browser import TIMEOUT_MS
from tests.support.browser import browser as browser  # the module-scoped fixture (skips without Chromium)


@pytest.fixture
def offline_page(browser: Browser) -> Iterator[tuple[Page, list[str]]]:
    """A tab on a closed network: any request that leaves loopback is aborted and recorded."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    outside: list[str] = []

    def gate(route: Route) -> None:
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", gate)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab, outside
    context.close()
    assert errors == [], errors


def test_docs_render_offline_and_try_it_out_sends_the_key(
    vllm_service: ServiceFactory, offline_page: tuple[Page, list[str]]
) -> None:
    page, outside = offline_page
    url = vllm_service(api_keys=[KEY])
    page.goto(f"{url}/docs")
    expect(page.locator(".opblock-summary-path[data-path='/api/inference']")).to_be_visible()
    page.locator("button.authorize").first.click()
    page.locator(".modal-ux input").first.fill(KEY)
    page.locator(".modal-ux button.modal-btn.auth.authorize").click()
    page.locator(".modal-ux button.btn-done").click()
    page.locator(".opblock-summary-path[data-path='/info']").click()
    page.locator(".try-out__btn").click()
    page.locator("button.execute").click()
    expect(page.locator(".live-responses-table tbody .response-col_status").first).to_have_text("200")
    assert outside == []
