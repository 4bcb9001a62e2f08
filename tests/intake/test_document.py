"""Intake renders pages exactly as REFERENCE.md says, and refuses bad input before expensive work."""

from __future__ import annotations

import io
import math

import pypdfium2 as pdfium
import pytest
from PIL import Image

from app.errors import (
    CorruptDocument,
    EmptyDocument,
    ImageTooLarge,
    PasswordRequired,
    UnsupportedMediaType,
    WrongPassword,
)
from app.intake import DocType, IntakeLimits, open_document, parse_page_selection, sniff
from app.intake.document import LONGEST_EDGE, fit_to_model, pad_to_min_side, pdf_scale
from tests.conftest import CORPUS, corpus_manifest
from tests.hostile.cases import raw_pdf
from tests.support.documents import make_image, make_pdf, page_id_of

LIMITS = IntakeLimits(max_image_pixels=50_000_000)


@pytest.mark.parametrize(
    ("fmt", "doc_type"),
    [("PNG", DocType.PNG), ("JPEG", DocType.JPEG), ("TIFF", DocType.TIFF), ("WEBP", DocType.WEBP),
     ("BMP", DocType.BMP), ("GIF", DocType.GIF)],
)  # fmt: skip
def test_sniff_images(fmt: str, doc_type: DocType) -> None:
    assert sniff(make_image(fmt, 20, 20)) is doc_type  # type: ignore[arg-type]


def test_sniff_pdf_with_leading_junk() -> None:
    assert sniff(b"\r\n junk \n" + make_pdf(1)) is DocType.PDF


def test_sniff_refuses_others() -> None:
    with pytest.raises(EmptyDocument):
        sniff(b"")
    with pytest.raises(UnsupportedMediaType):
        sniff(b"<!doctype html><html></html>")


# Expected sizes worked out by hand from REFERENCE.md's rule, scale = min(200/72, 1540/longest_pt),
# with PDFium rounding each side up: never from the app's own `pdf_scale`.
@pytest.mark.parametrize(
    ("size_pt", "expected"),
    [
        ((612, 792), (1190, 1540)),  # US Letter: 1540/792 -> 612 * 1.944 = 1190
        ((595, 842), (1089, 1540)),  # A4: 1540/842 -> 595 * 1.829 = 1088.2, rounded up
        ((842, 595), (1540, 1089)),  # A4 landscape
        ((1000, 300), (1540, 462)),  # 1540/1000 -> 300 * 1.54 = 462
        ((72, 720), (154, 1540)),  # 1 x 10 inches: 1540/720 -> 72 * 2.139 = 154
        ((200, 100), (556, 278)),  # small page: 200 DPI (200 * 2.778 = 555.6), not upscaled to 1540
        ((100, 50), (278, 139)),  # 200 DPI: 277.8 x 138.9, rounded up
        ((500, 400), (1389, 1112)),  # under 1540 px at 200 DPI: 1388.9 x 1111.1, rounded up
        ((600, 600), (1540, 1540)),  # 1540/600 * 600 lands a hair above 1540 in floating point: still 1540
        ((14400, 14400), (1540, 1540)),  # 200 x 200 inches
    ],
)
def test_pdf_page_size(size_pt: tuple[int, int], expected: tuple[int, int]) -> None:
    document = open_document(make_pdf(1, size_pt), limits=LIMITS)
    image = document.render(0)
    assert image.mode == "RGB"
    assert image.size == expected
    assert page_id_of(image) == 1


def test_pdf_rendering_matches_reference_pipeline() -> None:
    """Reference: pypdfium2 at scale min(200/72, 1540/longest), RGB; for A4 that is 1540/842."""
    data = make_pdf(2, (595, 842))
    reference = pdfium.PdfDocument(data)
    document = open_document(data, limits=LIMITS)
    for index in range(2):
        expected = reference[index].render(scale=1540 / 842).to_pil().convert("RGB")
        assert expected.size == (1089, 1540)
        assert document.render(index).tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    ("size_pt", "scale"),
    [
        ((612, 792), 1540 / 792),
        ((792, 612), 1540 / 792),
        ((200, 100), 200 / 72),
        ((554.4, 300), 200 / 72),  # 554.4 pt at 200 DPI is exactly 1540 px: both bounds agree
        ((14400, 7200), 1540 / 14400),
    ],
)
def test_pdf_scale_is_the_smaller_of_200_dpi_and_1540_px(size_pt: tuple[float, float], scale: float) -> None:
    assert pdf_scale(*size_pt) == pytest.approx(scale, rel=1e-12)


@pytest.mark.parametrize("side_pt", [572, 580, 597, 600, 619, 663, 2151, 2207])
def test_pdf_scale_never_rounds_past_1540_px(side_pt: int) -> None:
    # For these sizes `1540 / side * side` is a hair above 1540, which PDFium would round up to 1541.
    scale = pdf_scale(side_pt, side_pt / 2)
    assert math.ceil(side_pt * scale) == 1540
    assert scale == pytest.approx(1540 / side_pt, rel=1e-12)


def test_pdf_pages_rendered_lazily_in_any_order() -> None:
    document = open_document(make_pdf(5, (144, 144)), limits=LIMITS)
    assert document.page_count == 5
    assert [page_id_of(document.render(i)) for i in (4, 0, 2)] == [5, 1, 3]
    document.close()


def test_encrypted_pdf() -> None:
    data = make_pdf(1, password="pw")
    with pytest.raises(PasswordRequired):
        open_document(data, limits=LIMITS)
    with pytest.raises(WrongPassword):
        open_document(data, limits=LIMITS, password="bad")
    assert open_document(data, limits=LIMITS, password="pw").page_count == 1
    # Owner-password-only PDFs open without a password, as in every viewer.
    assert open_document(make_pdf(1, owner_password="owner"), limits=LIMITS).page_count == 1


def test_broken_pdfs() -> None:
    with pytest.raises(CorruptDocument):
        open_document(make_pdf(2)[:300], limits=LIMITS)
    zero_pages = (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj 2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
        b"trailer<</Root 1 0 R>>\n%%EOF"
    )
    with pytest.raises((EmptyDocument, CorruptDocument)):  # no xref: PDFium's format error
        open_document(zero_pages, limits=LIMITS)


ZERO_PAGES = raw_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"])
NO_PAGE_TREE = raw_pdf([b"<< /Type /Catalog >>"])


@pytest.mark.parametrize("password", [None, "guess"])
def test_a_refused_encrypted_pdf_does_not_change_the_next_documents_error(password: str | None) -> None:
    """Issue 9 bug 2: PDFium's last error outlived the encrypted PDF it was about (same thread, same process)."""
    encrypted = make_pdf(1, password="s3cret")
    for _ in range(2):
        with pytest.raises(WrongPassword if password else PasswordRequired):
            open_document(encrypted, limits=LIMITS, password=password)
        for empty in (ZERO_PAGES, NO_PAGE_TREE):
            with pytest.raises(EmptyDocument):
                open_document(empty, limits=LIMITS, password=password)
        with pytest.raises(CorruptDocument):
            open_document(b"%PDF-1.4\ngarbage", limits=LIMITS, password=password)
        with pytest.raises(EmptyDocument):  # and a format error before does not leak either
            open_document(ZERO_PAGES, limits=LIMITS)


def test_large_image_downscaled_with_lanczos() -> None:
    data = make_image("PNG", 3080, 2000, page_id=3)
    image = open_document(data, limits=LIMITS).render(0)
    assert image.size == (LONGEST_EDGE, 1000)
    reference = Image.open(io.BytesIO(data)).convert("RGB").resize((1540, 1000), Image.Resampling.LANCZOS)
    assert image.tobytes() == reference.tobytes()
    assert page_id_of(image) == 3


def test_small_image_never_upscaled() -> None:
    assert open_document(make_image("PNG", 1, 1), limits=LIMITS).render(0).size == (1, 1)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1540, 900), (1540, 900)),  # exactly at the bound: untouched
        ((1541, 1000), (1540, 999)),  # 1000 * 1540/1541 = 999.35
        ((1000, 3080), (500, 1540)),  # portrait: the height is the longest edge
        ((3000, 1001), (1540, 514)),  # 1001 * 1540/3000 = 513.85, rounded to nearest
        ((20000, 5), (1540, 1)),  # a sliver never rounds to zero pixels
        ((5, 20000), (1, 1540)),
    ],
)
def test_fit_to_model_sizes(size: tuple[int, int], expected: tuple[int, int]) -> None:
    source = Image.new("RGB", size, (200, 10, 10))
    fitted = fit_to_model(source)
    assert fitted.size == expected
    if expected == size:
        assert fitted is source, "an image within the bound is passed through, not resampled"


def test_alpha_flattened_on_white() -> None:
    image = open_document(make_image("PNG", 100, 100, mode="RGBA", alpha=True), limits=LIMITS).render(0)
    assert image.mode == "RGB"
    assert image.getpixel((50, 99)) == (255, 255, 255)


def test_palette_with_transparency_flattened_on_white() -> None:
    source = Image.new("P", (10, 10), 0)
    source.putpalette([0, 0, 0, 255, 0, 0])
    source.info["transparency"] = 0
    buffer = io.BytesIO()
    source.save(buffer, format="PNG", transparency=0)
    assert open_document(buffer.getvalue(), limits=LIMITS).render(0).getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    source = Image.new("I;16", (8, 8), 32896)  # mid-gray in 16 bits
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    assert open_document(buffer.getvalue(), limits=LIMITS).render(0).getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_jpeg_becomes_rgb() -> None:
    buffer = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(buffer, format="JPEG")
    image = open_document(buffer.getvalue(), limits=LIMITS).render(0)
    assert image.mode == "RGB"


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_applied(orientation: int) -> None:
    data = make_image("JPEG", 400, 600, page_id=9, exif_orientation=orientation)
    image = open_document(data, limits=LIMITS).render(0)
    assert image.size == (400, 600)
    assert page_id_of(image) == 9


def test_tiff_frames_are_pages_and_gif_uses_first_frame() -> None:
    tiff = open_document(make_image("TIFF", 100, 120, frames=3), limits=LIMITS)
    assert tiff.page_count == 3
    assert [page_id_of(tiff.render(i)) for i in range(3)] == [1, 2, 3]
    gif = open_document(make_image("GIF", 100, 120, frames=4), limits=LIMITS)
    assert gif.page_count == 1
    assert page_id_of(gif.render(0)) == 1


def test_pixel_limit_checked_before_decoding() -> None:
    with pytest.raises(ImageTooLarge):
        open_document(make_image("PNG", 8000, 8000), limits=IntakeLimits(max_image_pixels=1_000_000))


def test_page_selection() -> None:
    assert parse_page_selection(None, 4) == [0, 1, 2, 3]
    assert parse_page_selection("", 4) == [0, 1, 2, 3]
    assert parse_page_selection("1-2, 4", 4) == [0, 1, 3]
    assert parse_page_selection("3-", 5) == [2, 3, 4]
    assert parse_page_selection("2,2,1", 3) == [0, 1]


def test_every_corpus_document_renders_within_bounds() -> None:
    for entry in corpus_manifest():
        document = open_document((CORPUS / entry["file"]).read_bytes(), limits=LIMITS)
        assert document.page_count == entry["pages"], entry["id"]
        for index in range(document.page_count):
            image = document.render(index)
            assert image.mode == "RGB"
            assert max(image.size) <= LONGEST_EDGE
            if "image_size" in entry:
                width, height = entry["image_size"]
                scale = min(1.0, LONGEST_EDGE / max(width, height))
                assert image.size == (max(1, round(width * scale)), max(1, round(height * scale)))
        document.close()


@pytest.mark.parametrize("size", [(10, 1540), (1540, 3), (13, 900), (27, 27), (1, 1)])
def test_thin_pages_are_padded_with_white_keeping_their_pixels_top_left(size: tuple[int, int]) -> None:
    page = Image.effect_noise(size, 80).convert("RGB")
    padded = pad_to_min_side(page, 28)
    assert padded.size == (max(size[0], 28), max(size[1], 28))
    assert padded.crop((0, 0, *size)).tobytes() == page.tobytes()
    margin = [padded.getpixel((x, y)) for x in range(padded.width) for y in range(padded.height)
              if x >= size[0] or y >= size[1]]  # fmt: skip
    assert set(margin) == {(255, 255, 255)}


@pytest.mark.parametrize("size", [(28, 28), (28, 1540), (850, 1100)])
def test_pages_at_least_one_merged_patch_wide_are_untouched(size: tuple[int, int]) -> None:
    page = Image.new("RGB", size, "white")
    assert pad_to_min_side(page, 28) is page
