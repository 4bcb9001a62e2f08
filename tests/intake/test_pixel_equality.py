"""The page the vLLM engine sends decodes to the reference pipeline's RGB image, pixel for pixel.

Every document test runs twice: intake in this process (INTAKE_WORKERS=0) and in the worker pool,
where the PNG comes encoded from the worker and the HF engine's RGB image comes back as pixels.

Intake and PNG encoding are tuned for speed (bench/intake.py: render straight to RGB,
gray pages as 8-bit gray PNG, our own PNG writer, LANCZOS on one channel for gray
images). None of that may change what the model sees: here the reference pipeline is
REFERENCE.md written out independently, and the comparison is on decoded bytes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import random
from pathlib import Path
from typing import Any

import pypdfium2 as pdfium
import pytest
from PIL import Image, ImageOps

from app.engines.base import Sampling
from app.engines.vllm import VLLMEngine
from app.imaging import encode_png, is_gray
from app.intake import DocType, EncodedPage, IntakeLimits, open_document, sniff
from app.intake.pool import IntakePool
from tests.conftest import CORPUS, corpus_manifest, make_settings
from tests.support.documents import make_image, make_marked_image, make_pdf

LIMITS = IntakeLimits(max_image_pixels=100_000_000)
ENGINE = VLLMEngine(make_settings(model_source="vllm"))
SAMPLING = Sampling(0.2, 0.9, 16)


def reference_pdf_page(data: bytes, index: int) -> Image.Image:
    """pypdfium2 at min(200/72, 1540 / longest side in points), converted to RGB.

    The scale is nudged down where float rounding would make pypdfium2's bitmap 1541 px:
    the reference says "at most 1540", and that is what the model must get.
    """
    pdf = pdfium.PdfDocument(data)
    page = pdf[index]
    width, height = page.get_size()
    scale = min(200 / 72, 1540 / max(width, height))
    while math.ceil(max(width, height) * scale) > 1540:
        scale = math.nextafter(scale, 0)
    image: Image.Image = page.render(scale=scale).to_pil().convert("RGB")
    pdf.close()
    return image


def reference_image_page(data: bytes, index: int) -> Image.Image:
    """EXIF orientation, RGB (alpha flattened on white), LANCZOS to at most 1540 px, never upscaled."""
    image: Image.Image = Image.open(io.BytesIO(data))
    image.seek(index)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("RGB")
    scale = 1540 / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def sent_image(image: Image.Image) -> Image.Image:
    """Decode the data URL the vLLM engine would POST for `image`, as vLLM does (to RGB)."""
    return decode_payload(ENGINE.encode_page(image, SAMPLING))


def assert_same_pixels(actual: Image.Image, expected: Image.Image) -> None:
    assert actual.mode == expected.mode == "RGB"
    assert actual.size == expected.size
    assert actual.tobytes() == expected.tobytes()


def decode_payload(payload: dict[str, Any]) -> Image.Image:
    """The page image in a chat-completions body, decoded as vLLM decodes it (to RGB)."""
    url: str = payload["messages"][0]["content"][0]["image_url"]["url"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    png = base64.b64decode(url[len(prefix) :])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = Image.open(io.BytesIO(png))
    decoded.load()
    return decoded.convert("RGB")


def reference_page(data: bytes, index: int) -> Image.Image:
    return reference_pdf_page(data, index) if sniff(data) is DocType.PDF else reference_image_page(data, index)


@pytest.fixture(params=["threads", "pool"])
def intake(request: pytest.FixtureRequest) -> IntakePool | None:
    """None: intake in this process's threads (INTAKE_WORKERS=0); else the shared worker pool."""
    if request.param == "threads":
        return None
    pool: IntakePool = request.getfixturevalue("intake_pool")
    return pool


def check_document(data: bytes, pool: IntakePool | None) -> int:
    """Every page of `data` through intake and the engine's encoding; returns the page count."""
    if pool is not None:
        return asyncio.run(check_pooled(pool, data))
    document = open_document(data, limits=LIMITS)
    try:
        for index in range(document.page_count):
            assert_same_pixels(sent_image(document.render(index)), reference_page(data, index))
    finally:
        document.close()
    return document.page_count


async def check_pooled(pool: IntakePool, data: bytes) -> int:
    """The worker's PNG as the vLLM engine sends it (padded there, never re-encoded), and the HF engine's pixels."""
    document = await pool.open(data, limits=LIMITS)
    try:
        for index in range(document.page_count):
            expected = reference_page(data, index)
            png = await document.page(index, png_min_side=ENGINE.png_min_side)
            assert isinstance(png, EncodedPage)
            assert png.size == expected.size
            assert_same_pixels(decode_payload(ENGINE.payload(png.png, SAMPLING)), expected)
            pixels = await document.page(index, png_min_side=None)
            assert isinstance(pixels, Image.Image)
            assert_same_pixels(pixels, expected)
    finally:
        document.close()
    return document.page_count


@pytest.mark.parametrize(
    "sizes",
    [
        [(612, 792)],  # US Letter: 1190 x 1540
        [(595, 842), (842, 595)],  # A4 portrait and landscape
        [(200, 100)],  # small: 200 DPI, not upscaled
        [(300, 300), (612, 1008), (100, 1400)],  # mixed sizes in one document
    ],
)
def test_generated_pdfs(sizes: list[tuple[float, float]], intake: IntakePool | None) -> None:
    assert check_document(make_pdf(len(sizes), page_sizes_pt=sizes), intake) == len(sizes)


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("PNG", {"mode": "RGB", "page_id": 3}),  # gray content in an RGB file
        ("PNG", {"mode": "L", "page_id": 4, "width": 2000, "height": 2600}),  # gray, downscaled
        ("PNG", {"mode": "1", "page_id": 5, "width": 1700, "height": 2200}),  # bilevel scan, downscaled
        ("PNG", {"mode": "P", "page_id": 6, "color": (250, 240, 200)}),
        ("PNG", {"alpha": True, "page_id": 7, "color": (200, 220, 255)}),
        ("PNG", {"mode": "L", "alpha": True, "page_id": 8}),
        ("JPEG", {"page_id": 9, "color": (255, 250, 235), "width": 1800, "height": 2400}),  # colour, downscaled
        ("JPEG", {"mode": "L", "page_id": 10, "exif_orientation": 6}),
        ("JPEG", {"page_id": 11, "exif_orientation": 3, "width": 1600, "height": 1200}),
        ("TIFF", {"mode": "L", "page_id": 12, "frames": 3}),
        ("WEBP", {"page_id": 13}),
        ("GIF", {"page_id": 14}),
        ("BMP", {"mode": "L", "page_id": 15}),
    ],
)
def test_generated_images(fmt: str, kwargs: dict[str, object], intake: IntakePool | None) -> None:
    assert check_document(make_image(fmt, **kwargs), intake) >= 1  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_noise_pages_round_trip(mode: str, intake: IntakePool | None) -> None:
    """Worst case for the PNG filters: random bytes, downscaled from an oversize image."""
    noise = Image.frombytes(mode, (1700, 1300), random.Random(0).randbytes(1700 * 1300 * len(mode)))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    assert check_document(buffer.getvalue(), intake) == 1


def test_almost_gray_page_keeps_its_colour() -> None:
    """One pixel off by one in blue must not be flattened to gray."""
    page = make_marked_image(1, 300, 400)
    page.putpixel((150, 200), (128, 128, 129))
    assert not is_gray(page)
    assert_same_pixels(sent_image(page), page)
    assert Image.open(io.BytesIO(encode_png(page))).mode == "RGB"


def test_gray_page_is_sent_as_8_bit_gray() -> None:
    """Three times fewer bytes to compress, send and decode; same RGB pixels once decoded."""
    page = make_marked_image(2, 300, 400)
    assert is_gray(page)
    png = Image.open(io.BytesIO(encode_png(page)))
    assert png.mode == "L"
    assert_same_pixels(png.convert("RGB"), page)


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (9, 1), (3, 2)])
def test_tiny_images_round_trip(size: tuple[int, int]) -> None:
    for page in (Image.new("RGB", size, (10, 200, 30)), Image.new("RGB", size, (77, 77, 77))):
        assert_same_pixels(Image.open(io.BytesIO(encode_png(page))).convert("RGB"), page)
        # What vLLM is sent: the same pixels top left, padded with white to one 28-px merged patch.
        sent = sent_image(page)
        assert sent.size == (28, 28)
        assert_same_pixels(sent.crop((0, 0, *size)), page)
        assert sent.getpixel((27, 27)) == (255, 255, 255)


def test_corpus_documents(intake: IntakePool | None) -> None:
    documents = corpus_manifest()
    checked = 0
    for entry in documents:
        path: Path = CORPUS / entry["file"]
        if not path.exists():
            continue
        assert check_document(path.read_bytes(), intake) == entry["pages"]
        checked += 1
    if checked == 0:
        pytest.skip("no corpus document present")


@pytest.mark.parametrize("size", [(1, 7), (9, 1)])
def test_tiny_images_padded_by_the_worker(size: tuple[int, int], intake_pool: IntakePool) -> None:
    """The worker pads as the engine would (white, top left), and reports the page's own size."""
    page = Image.new("RGB", size, (10, 200, 30))
    buffer = io.BytesIO()
    page.save(buffer, format="PNG")

    async def sent() -> tuple[Image.Image, tuple[int, int]]:
        document = await intake_pool.open(buffer.getvalue(), limits=LIMITS)
        try:
            png = await document.page(0, png_min_side=ENGINE.png_min_side)
        finally:
            document.close()
        assert isinstance(png, EncodedPage)
        return decode_payload(ENGINE.payload(png.png, SAMPLING)), png.size

    image, reported = asyncio.run(sent())
    assert reported == size
    assert image.size == (28, 28)
    assert_same_pixels(image.crop((0, 0, *size)), page)
    assert image.getpixel((27, 27)) == (255, 255, 255)
