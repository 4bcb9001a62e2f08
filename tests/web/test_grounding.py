"""The web page in grounding mode, in real headless Chromium: boxes over the page image, coloured by label, lit
with their text (and the other way round). Writes `artifacts/grounding.png`; with `LIGHTONOCR_DOCS_SCREENSHOT=1`
also refreshes `docs/grounding.png`, the README's picture.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("playwright", reason="playwright is not installed (uv sync installs it)")

from playwright.sync_api import Browser, Locator, Page, expect

from tests.conftest import ServiceFactory
from tests.support.browser import TIMEOUT_MS
from tests.support.browser import browser as browser  # the module-scoped fixture (skips without Chromium)
from tests.support.documents import make_pdf
from tests.support.openai_stub import Reply, StubRequest, StubVLLM

ROOT = Path(__file__).resolve().parents[2]
MODEL = "lightonai/LightOnOCR-3-1B"
PAGE_PX = (556, 723)  # 200 x 260 pt at 200 DPI

GROUNDED = """![header](60,30,940,60) Quarterly report
![title](60,90,940,150) # Results
![text](60,180,480,600) Revenue grew in every region, and the
![text+](520,180,940,330) margins held through the year.
![image](520,360,940,600) A bar chart of revenue by region.
![table](60,640,940,880) <table><tr><td>Q1</td><td>12</td></tr></table>
![page_number](470,940,530,970) 3
"""
LABELS = ["header", "title", "text", "image", "table", "page_number"]


def grounded(request: StubRequest) -> Reply:
    return Reply(text=GROUNDED if request.prompt == "grounding" else "plain")


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


@pytest.fixture
def url(vllm_service: ServiceFactory) -> Iterator[str]:
    with StubVLLM(grounded, model=MODEL) as stub:
        yield vllm_service(vllm_base_url=stub.base_url, model_name=MODEL)
        assert stub.violations == []


def read_grounded(page: Page, url: str, document: Path, *, drop: bool = True) -> Locator:
    page.goto(f"{url}/")
    page.set_input_files("#file", document)
    page.select_option("#mode", "grounding")
    if drop:
        page.check("#drop-hf")
    page.click("#run")
    expect(page.locator("#progress-text")).to_contain_text("(100%)")
    slot = page.locator('.page[data-page="1"]')
    expect(slot.locator("figure .sheet img")).to_be_visible()
    return slot


def box_of(locator: Locator) -> tuple[float, float, float, float]:
    box = locator.bounding_box()
    assert box is not None
    return box["x"], box["y"], box["width"], box["height"]


def test_boxes_sit_on_the_page_image_coloured_by_label_and_light_with_their_text(
    page: Page, url: str, tmp_path: Path
) -> None:
    document = tmp_path / "report.pdf"
    document.write_bytes(make_pdf(1, (200, 260)))
    slot = read_grounded(page, url, document)
    blocks = slot.locator(".markdown .block")
    expect(blocks).to_have_count(len(LABELS))
    assert [blocks.nth(i).get_attribute("data-label") for i in range(len(LABELS))] == LABELS
    boxes = slot.locator(".sheet .box")
    expect(boxes).to_have_count(len(LABELS) + 1)  # the text's continuation in the right column has its own box

    # Every box where the model put it: its 0-1000 coordinates of the image as it is displayed.
    img_x, img_y, img_w, img_h = box_of(slot.locator(".sheet img"))
    title_box = slot.locator('.sheet .box[data-label="title"]')
    x, y, w, h = box_of(title_box)
    assert abs(x - (img_x + 0.060 * img_w)) < 1.5
    assert abs(y - (img_y + 0.090 * img_h)) < 1.5
    assert abs(w - 0.880 * img_w) < 1.5
    assert abs(h - 0.060 * img_h) < 1.5
    text_boxes = slot.locator('.sheet .box[data-label="text"]')
    expect(text_boxes).to_have_count(2)
    right = box_of(text_boxes.nth(0 if box_of(text_boxes.nth(0))[0] > box_of(text_boxes.nth(1))[0] else 1))
    assert abs(right[0] - (img_x + 0.520 * img_w)) < 1.5

    # Coloured by label: the title's box and its text's rule share the title's colour, the table's differs.
    title_colour = title_box.evaluate("box => getComputedStyle(box).borderTopColor")
    assert title_colour == "rgb(198, 40, 40)"
    assert blocks.nth(1).evaluate("block => getComputedStyle(block).borderLeftColor") == title_colour
    table_colour = slot.locator('.sheet .box[data-label="table"]').evaluate("b => getComputedStyle(b).borderTopColor")
    assert table_colour != title_colour

    # The merged paragraph, the picture's crop in the text, headers and footers dimmed (the option is on).
    expect(blocks.nth(2)).to_have_text("Revenue grew in every region, and the margins held through the year.")
    crop = blocks.nth(3).locator("img")
    expect(crop).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    assert (
        crop.evaluate("img => img.complete && img.naturalWidth")
        == round(0.94 * PAGE_PX[0]) - round(0.52 * PAGE_PX[0]) + 10
    )
    assert [blocks.nth(i).evaluate("b => b.classList.contains('dropped')") for i in range(len(LABELS))] == [
        True, False, False, False, False, True,
    ]  # fmt: skip

    # Pointer on a block's text: its boxes (both columns) light up, and nothing else.
    blocks.nth(2).hover()
    expect(slot.locator(".sheet .box.hot")).to_have_count(2)
    expect(text_boxes.nth(0)).to_have_class("box hot")
    expect(slot.locator(".block.hot")).to_have_count(1)
    save_screenshot(page, "grounding.png", docs=True)
    # And back: pointer on a box lights its block's text.
    slot.locator('.sheet .box[data-label="table"]').hover()
    expect(slot.locator(".block.hot")).to_have_attribute("data-label", "table")
    expect(slot.locator(".sheet .box.hot")).to_have_count(1)
    page.mouse.move(1, 1)
    expect(slot.locator(".hot")).to_have_count(0)


def test_plain_mode_shows_markdown_without_boxes(page: Page, url: str, tmp_path: Path) -> None:
    document = tmp_path / "report.pdf"
    document.write_bytes(make_pdf(1, (200, 260)))
    page.goto(f"{url}/")
    page.set_input_files("#file", document)
    page.click("#run")
    slot = page.locator('.page[data-page="1"]')
    expect(slot.locator(".markdown")).to_have_text("plain")
    expect(slot.locator("figure .sheet img")).to_be_visible()
    expect(slot.locator(".box")).to_have_count(0)
    expect(slot.locator(".block")).to_have_count(0)


def save_screenshot(page: Page, name: str, *, docs: bool = False) -> None:
    artifact = ROOT / "artifacts" / name
    artifact.parent.mkdir(exist_ok=True)
    page.screenshot(path=artifact)
    if docs and os.environ.get("LIGHTONOCR_DOCS_SCREENSHOT") == "1":
        page.screenshot(path=ROOT / "docs" / name)
