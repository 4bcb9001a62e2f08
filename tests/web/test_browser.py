"""The web page end to end in real headless Chromium (Playwright) against a live service on loopback.

Needs Debian's Chromium (`apt-get install -y chromium`; `.ci/run` installs it when it can) or
`LIGHTONOCR_CHROMIUM=/path/to/chrome`; skips with the reason when there is none. Writes
screenshots to `artifacts/` (`web-page.png`, read; `web-page-empty.png`, before any upload;
`web-page-error.png`, after a refusal; `web-page-partial.png`, a truncated page); with
`LIGHTONOCR_DOCS_SCREENSHOT=1` also refreshes `docs/web-page.png`, the README's picture.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("playwright", reason="playwright is not installed (uv sync installs it)")

from playwright.sync_api import Browser, Page, expect

from tests.conftest import ServiceFactory
from tests.support.browser import TIMEOUT_MS, watched_page
from tests.support.browser import browser as browser  # the module-scoped fixture (skips without Chromium)
from tests.support.documents import make_pdf, page_id_of
from tests.support.openai_stub import Reply, StubRequest, StubVLLM

ROOT = Path(__file__).resolve().parents[2]
KEY = "browser-test-key"
PAGES = 3


def markdown_for(request: StubRequest) -> Reply:
    """Per page: a heading, an HTML table, display and inline math."""
    number = page_id_of(request.image)
    text = (
        f"# Heading {number}\n\nRevenue for *page {number}*, where $a_1 * b_2$ holds.\n\n"
        "<table><tr><td>A1</td></tr></table>\n\n$$E=mc^2$$"
    )
    if number == 2:  # model output is untrusted: none of this may run
        text += '\n\n<img src="x" onerror="window.__pwned = 1"><script>window.__pwned = 2</script>'
    return Reply(text=text)


class HoldPageOne:
    """`markdown_for`, but page 1 is answered only once the test releases it: it finishes last, for sure."""

    def __init__(self) -> None:
        self.release = threading.Event()

    async def __call__(self, request: StubRequest) -> Reply:
        if page_id_of(request.image) == 1:
            await asyncio.to_thread(self.release.wait, TIMEOUT_MS / 1000)
        return markdown_for(request)


@pytest.fixture
def hold_page_one(stub: StubVLLM) -> Iterator[HoldPageOne]:
    held = HoldPageOne()
    stub.responder = held
    yield held
    held.release.set()  # never leave the stub's request waiting


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    with watched_page(browser, accept_downloads=True) as tab:
        yield tab


@pytest.fixture
def pdf(tmp_path: Path) -> Path:
    path = tmp_path / "three-pages.pdf"
    path.write_bytes(make_pdf(PAGES, (200, 260)))
    return path


def read(page: Page, url: str, document: Path) -> None:
    page.goto(f"{url}/")
    expect_nothing_but_the_form(page)
    page.set_input_files("#file", document)
    page.click("#run")


def expect_nothing_but_the_form(page: Page) -> None:
    """Before any upload: no progress bar, no disabled buttons, no messages."""
    for hidden in ("#status", "#progress", "#download-md", "#error", "#notice"):
        expect(page.locator(hidden)).to_be_hidden()
    expect(page.locator("#run")).to_be_visible()


def expect_pages_read(page: Page) -> None:
    """Every page in page order, each with its table, typeset math and the image the model saw."""
    expect(page.locator("#progress-text")).to_contain_text("(100%)")
    slots = page.locator(".page")
    expect(slots).to_have_count(PAGES)
    assert [slots.nth(i).get_attribute("data-page") for i in range(PAGES)] == ["1", "2", "3"]
    for number in range(1, PAGES + 1):
        slot = page.locator(f'.page[data-page="{number}"]')
        expect(slot.locator(".markdown h1")).to_have_text(f"Heading {number}")
        expect(slot.locator(".markdown table td")).to_have_text("A1")
        expect(slot.locator(".markdown .katex-display")).to_have_count(1)
        expect(slot.locator(".markdown .katex")).to_have_count(2)  # and the inline one: `*` is not emphasis
        expect(slot.locator(".markdown em")).to_have_text(f"page {number}")
        expect(slot.locator(".badge")).to_have_text("ok")
        image = slot.locator("figure img")
        expect(image).to_be_visible()
        expect(slot.locator("figcaption")).to_contain_text("556 × 723 px")  # 200 DPI of 200x260 pt
        assert image.evaluate("img => img.complete && img.naturalWidth") == 556
    progress = page.locator("#progress")
    assert progress.evaluate("bar => [bar.value, bar.max]") == [PAGES, PAGES]
    expect(page.locator("#error")).to_be_hidden()


def test_streams_a_pdf_into_pages_with_tables_math_and_images(
    page: Page, hold_page_one: HoldPageOne, vllm_service: ServiceFactory, pdf: Path
) -> None:
    url = vllm_service()
    page.goto(f"{url}/")
    expect_nothing_but_the_form(page)
    save_screenshot(page, "web-page-empty.png")
    read(page, url, pdf)
    # Pages 2 and 3 arrive while page 1 is still being read: each lands in its own slot, in page order.
    for number in (2, 3):
        expect(page.locator(f'.page[data-page="{number}"] .markdown h1')).to_have_text(f"Heading {number}")
    expect(page.locator('.page[data-page="1"] .markdown')).to_have_text("Waiting for the model…")
    expect(page.locator('.page[data-page="1"] .badge')).to_have_text("reading…")
    expect(page.locator("#progress-text")).to_contain_text("2 / 3 pages")
    hold_page_one.release.set()
    expect_pages_read(page)
    assert page.locator(".page .markdown h1").all_inner_texts() == ["Heading 1", "Heading 2", "Heading 3"]
    expect(page.locator("#notice")).to_be_hidden()  # an `ok` document needs no note
    assert page.evaluate("window.__pwned") is None
    expect(page.locator('.page[data-page="2"] .markdown script')).to_have_count(0)

    with page.expect_download() as download:
        page.click("#download-md")
    markdown = Path(download.value.path()).read_text()
    assert download.value.suggested_filename == "three-pages.md"
    assert re.findall(r"# Heading (\d)", markdown) == ["1", "2", "3"]

    save_screenshot(page, "web-page.png", docs=True)


def test_api_key_is_asked_for_in_words_then_used(
    page: Page, stub: StubVLLM, vllm_service: ServiceFactory, pdf: Path
) -> None:
    stub.responder = markdown_for
    url = vllm_service(api_keys=KEY)
    read(page, url, pdf)  # the page itself loads without a key
    error = page.locator("#error")
    expect(error).to_have_text(re.compile(r"^API key required"))
    expect(error).to_have_attribute("data-code", "unauthorized")

    page.fill("#key", "not-the-key")
    page.click("#run")
    expect(error).to_have_text(re.compile(r"^API key invalid"))

    page.fill("#key", KEY)
    page.reload()  # the key survives in sessionStorage
    expect(page.locator("#key")).to_have_value(KEY)
    drop(page, pdf)  # this time the file is dropped, not picked
    expect(page.locator("#drop-text")).to_contain_text("three-pages.pdf")
    page.click("#run")
    expect_pages_read(page)


def test_errors_before_and_during_the_stream_are_shown_in_words(
    page: Page, stub: StubVLLM, vllm_service: ServiceFactory, pdf: Path
) -> None:
    stub.responder = lambda request: Reply(status=400, message="this page is not welcome")
    url = vllm_service(max_pages=2, vllm_max_retries=0, retry_temperatures="")
    read(page, url, pdf)  # 3 pages, limit 2: refused before the stream starts
    error = page.locator("#error")
    expect(error).to_contain_text("3 pages selected; the limit is 2 (MAX_PAGES)")
    expect(error).to_have_attribute("data-code", "too_many_pages")
    # The service writes `pages`: shown as code, not as backticks.
    expect(error.locator("code")).to_have_text(["pages"])
    expect(error).not_to_contain_text("`")
    # Nothing is uploading any more: no "Uploading…", no empty bar, no disabled buttons.
    expect(page.locator("#status")).to_be_hidden()
    expect(page.get_by_text("Uploading…")).to_have_count(0)
    save_screenshot(page, "web-page-error.png")

    page.fill("#pages", "1-2")
    page.click("#run")  # streamed, then every page fails: an `error` event ends the stream
    expect(page.locator(".page")).to_have_count(2)
    expect(error).to_have_attribute("data-code", "page_rejected")  # every page failed the same way: that error
    expect(error).not_to_be_empty()
    expect(page.locator('.page[data-page="1"] .markdown')).to_contain_text("This page failed")
    expect(page.locator('.page[data-page="1"] figure img')).to_be_visible()  # the image still shows
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"· stopped$"))


def test_a_partial_document_says_which_pages_and_what_truncated_means(
    page: Page, stub: StubVLLM, vllm_service: ServiceFactory, pdf: Path
) -> None:
    def cut_page_two(request: StubRequest) -> Reply:
        reply = markdown_for(request)
        return Reply(text=reply.text, finish_reason="length") if page_id_of(request.image) == 2 else reply

    stub.responder = cut_page_two
    read(page, vllm_service(retry_temperatures=""), pdf)
    expect(page.locator("#progress-text")).to_contain_text("(100%)")
    notice = page.locator("#notice")
    expect(notice).to_contain_text("Partial document: page 2 truncated.")
    expect(notice).to_contain_text("token limit")
    expect(notice.locator("code")).to_have_text(["MAX_NEW_TOKENS"])
    slot = page.locator('.page[data-page="2"]')
    expect(slot.locator(".badge")).to_have_text("truncated")
    expect(slot.locator(".page-note")).to_contain_text("the end of this page may be missing")
    expect(page.locator('.page[data-page="1"] .page-note')).to_have_count(0)
    expect(page.locator("#error")).to_be_hidden()
    save_screenshot(page, "web-page-partial.png")


def drop(page: Page, document: Path) -> None:
    """Drop `document` on the drop zone the way a browser does (a DataTransfer holding a File)."""
    transfer = page.evaluate_handle(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "application/pdf" }));
            return transfer;
        }""",
        [document.name, base64.b64encode(document.read_bytes()).decode()],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def save_screenshot(page: Page, name: str, *, docs: bool = False) -> None:
    artifact = ROOT / "artifacts" / name
    artifact.parent.mkdir(exist_ok=True)
    page.screenshot(path=artifact)
    if docs and os.environ.get("LIGHTONOCR_DOCS_SCREENSHOT") == "1":
        page.screenshot(path=ROOT / "docs" / name)
