"""The web page in grounding mode, in real headless Chromium: boxes over the page image, coloured by label, lit
with their text (and the other way round). Writes `artifacts/grounding*.png`; with `LIGHTONOCR_DOCS_SCREENSHOT=1`
also refreshes `docs/grounding.png`, the README's picture (a real two-column paper from the corpus).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pypdfium2 as pdfium
import pytest

pytest.importorskip("playwright", reason="playwright is not installed (uv sync installs it)")

from playwright.sync_api import Browser, Locator, Page, expect

from tests.conftest import ServiceFactory, corpus_document
from tests.support.browser import browser as browser  # the module-scoped fixture (skips without Chromium)
from tests.support.browser import watched_page
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
    with watched_page(browser, height=900) as tab:
        yield tab


@pytest.fixture
def serve(vllm_service: ServiceFactory) -> Iterator[Callable[[Callable[[StubRequest], Reply]], str]]:
    """A service whose model (LightOnOCR-3-1B, on the stand-in) answers with `responder`."""
    stubs: list[StubVLLM] = []

    def start(responder: Callable[[StubRequest], Reply]) -> str:
        stub = StubVLLM(responder, model=MODEL).start()
        stubs.append(stub)
        return vllm_service(vllm_base_url=stub.base_url, model_name=MODEL)

    yield start
    for stub in stubs:
        stub.stop()
        assert stub.violations == []


@pytest.fixture
def url(serve: Callable[[Callable[[StubRequest], Reply]], str]) -> str:
    return serve(grounded)


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
    save_screenshot(page, "grounding-synthetic.png")
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


def test_a_real_two_column_page(
    page: Page, serve: Callable[[Callable[[StubRequest], Reply]], str], tmp_path: Path
) -> None:
    """A scanned paper from the corpus, answered with blocks read from its born-digital twin's text layer."""
    scan = corpus_document("dev06_two_column.pdf")
    output = grounding_from_text_layer(corpus_document("text_layer/dev06_two_column.textlayer.pdf"))
    url = serve(lambda request: Reply(text=output if request.prompt == "grounding" else "plain"))
    page.set_viewport_size({"width": 1600, "height": 1000})
    slot = read_grounded(page, url, scan, drop=False)
    markers = output.count("![")
    continued = output.count("+](")
    expect(slot.locator(".sheet .box")).to_have_count(markers)
    expect(slot.locator(".markdown .block")).to_have_count(markers - continued)
    expect(slot.locator(".markdown h1")).to_have_text(
        "Trace-based Just-in-Time Type Specialization for Dynamic Languages"
    )
    # The introduction's paragraph runs on at the top of the right column: one block, two boxes.
    paragraph = slot.locator(".block", has_text="Dynamic languages such as JavaScript, Python")
    paragraph.hover()
    expect(slot.locator(".sheet .box.hot")).to_have_count(2)
    save_screenshot(slot, "grounding.png", docs=True)


def grounding_from_text_layer(path: Path) -> str:
    """LightOnOCR-3-style grounding output for page 1 of a born-digital PDF: its text lines grouped into blocks.

    A stand-in for the model on a real page: lines are joined when they are close and in the same column; the
    first block is the title, short one-line blocks are sections, blocks low on the page are footnotes (read
    last), and a paragraph that ends without a full stop at the bottom of the left column continues (`text+`) in
    the right one.
    """
    pdf = pdfium.PdfDocument(path)
    try:
        pdf_page = pdf[0]
        width, height = pdf_page.get_size()
        textpage = pdf_page.get_textpage()
        lines: list[tuple[float, float, float, float, str]] = []
        for i in range(textpage.count_rects()):
            x1, y1, x2, y2 = textpage.get_rect(i)
            text = textpage.get_text_bounded(x1, y1, x2, y2).strip()
            if not text:
                continue
            if lines:
                lx1, ly1, lx2, ly2, ltext = lines[-1]
                if ly1 - 2 <= (y1 + y2) / 2 <= ly2 + 2 and lx2 - 2 <= x1 < lx2 + 40:  # the same line
                    glue = "" if text[0] in ",.;:" or len(text) < 2 else " "
                    lines[-1] = (lx1, ly1, max(lx2, x2), ly2, ltext + glue + text)
                    continue
            lines.append((x1, y1, x2, y2, text))
    finally:
        pdf.close()

    def column(x1: float, x2: float) -> str:
        return "left" if x2 < width / 2 + 10 else "right" if x1 > width / 2 - 10 else "full"

    blocks: list[dict[str, object]] = []
    for x1, y1, x2, y2, text in lines:
        where, size = column(x1, x2), y2 - y1
        last = blocks[-1] if blocks else None
        if last and last["column"] == where and -2 < float(last["y1"]) - y2 < 0.8 * size:  # type: ignore[arg-type]
            last.update(x1=min(float(last["x1"]), x1), x2=max(float(last["x2"]), x2), y1=y1)  # type: ignore[arg-type]
            last["texts"].append(text)  # type: ignore[attr-defined]
            continue
        blocks.append({"column": where, "x1": x1, "x2": x2, "y1": y1, "y2": y2, "texts": [text]})
    out: list[str] = []
    notes: list[str] = []  # footnotes come last in reading order, after the right column
    last_text: tuple[str, str] | None = None  # column, text of the last `text` block
    for n, block in enumerate(blocks):
        texts: list[str] = block["texts"]  # type: ignore[assignment]
        text = re.sub(r"\x02\s*", "", " ".join(texts))  # PDFium marks a line-end hyphen with U+0002
        x1, y1, x2, y2 = (float(block[key]) for key in ("x1", "y1", "x2", "y2"))  # type: ignore[arg-type]
        top = (height - y2) / height
        label, plus = "text", ""
        if n == 0:
            label, text = "title", f"# {text}"
        elif len(texts) == 1 and len(text) < 30 and not text.endswith(".") and block["column"] != "full":
            label, text = "section", f"## {text}"
        elif top > 0.83:
            label = "footnote"
        elif last_text and last_text[0] == "left" and block["column"] == "right" and not last_text[1].endswith("."):
            plus = "+"
        if label == "text":
            last_text = (str(block["column"]), text)
        box = [x1 / width, (height - y2) / height, x2 / width, (height - y1) / height]
        (notes if label == "footnote" else out).append(
            f"![{label}{plus}]({','.join(str(round(1000 * v)) for v in box)}) {text}"
        )
    return "\n".join(out + notes)


def save_screenshot(target: Page | Locator, name: str, *, docs: bool = False) -> None:
    artifact = ROOT / "artifacts" / name
    artifact.parent.mkdir(exist_ok=True)
    target.screenshot(path=artifact)
    if docs and os.environ.get("LIGHTONOCR_DOCS_SCREENSHOT") == "1":
        target.screenshot(path=ROOT / "docs" / name)
