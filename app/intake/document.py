"""Open a document and render its pages the way LightOnOCR's authors do.

Every function here is blocking: callers run them in worker threads. PDFium is
not thread-safe, so every call into it holds `PDFIUM_LOCK`; the expensive
work that follows (colour conversion, resizing, PNG encoding) runs outside it.
"""

from __future__ import annotations

import io
import logging
import math
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Protocol

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import (
    CorruptDocument,
    EmptyDocument,
    ImageTooLarge,
    PasswordRequired,
    WrongPassword,
)
from app.intake.sniff import DocType, sniff

# REFERENCE.md: longest edge at most 1540 px, PDFs at most 200 DPI, never upscaled. 1540 is
# LightOnOCR-1/2's size; the model's profile (app/profiles.py) may ask for another (2048).
LONGEST_EDGE = 1540
PDF_MAX_DPI = 200

log = logging.getLogger(__name__)

PDFIUM_LOCK = threading.Lock()

# We check pixel counts ourselves (with a clear error); Pillow's own guard would
# turn the same case into a warning or a generic exception.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    max_image_pixels: int
    # Longest edge of the page images, from the model's profile (or RENDER_LONGEST_EDGE).
    longest_edge: int = LONGEST_EDGE


@dataclass(frozen=True, slots=True)
class EncodedPage:
    """A page already encoded as the PNG an engine sends (by an intake worker); `size` is before any padding."""

    png: bytes
    size: tuple[int, int]


class Document(Protocol):
    """A parsed document whose pages are rendered one at a time."""

    doc_type: DocType
    page_count: int

    def render(self, index: int) -> Image.Image:
        """Page `index` (0-based) as an RGB image sized for the model."""
        ...

    def close(self) -> None: ...


def open_document(data: bytes, *, limits: IntakeLimits, password: str | None = None) -> Document:
    doc_type = sniff(data)
    if doc_type is DocType.PDF:
        return PdfDocument(data, password=password, limits=limits)
    return ImageDocument(data, doc_type=doc_type, limits=limits)


def pdf_scale(width_pt: float, height_pt: float, longest_edge: int = LONGEST_EDGE) -> float:
    """Render scale for a page: at most 200 DPI and `longest_edge` (1540) px on the longest edge.

    pypdfium2 rounds the bitmap size up, and `1540 / w * w` can land a hair above
    1540 in floating point (1541 px for ~5% of page sizes): step the scale down
    until the longest edge really fits.
    """
    longest = max(width_pt, height_pt)
    scale = min(PDF_MAX_DPI / 72, longest_edge / longest)
    while math.ceil(longest * scale) > longest_edge:
        scale = math.nextafter(scale, 0)
    return scale


def fit_to_model(image: Image.Image, longest_edge: int = LONGEST_EDGE) -> Image.Image:
    """Downscale (LANCZOS) so the longest edge is at most `longest_edge` (1540) px; never upscale."""
    width, height = image.size
    scale = longest_edge / max(width, height)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def pad_to_min_side(image: Image.Image, min_side: int) -> Image.Image:
    """White margin on the right and bottom so both sides are at least `min_side` px.

    The vision encoder cuts a page into patches merged 2x2 (28 px for LightOnOCR): a side
    shorter than that leaves no merged patch and the model fails. The content keeps its
    pixels and its place (top-left), so a thin strip of text can still be read; a page
    whose sides are both at least `min_side` is returned as it is (the same object).
    """
    width, height = image.size
    if width >= min_side and height >= min_side:
        return image
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    padded = Image.new(image.mode, (max(width, min_side), max(height, min_side)), "white")
    padded.paste(image, (0, 0))
    return padded


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency flattened on white; 16-bit samples scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = image.convert("I").point(lambda v: v / 257).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def normalise_image(frame: Image.Image, longest_edge: int = LONGEST_EDGE) -> Image.Image:
    """EXIF orientation, RGB, LANCZOS to at most `longest_edge` px; `frame` is consumed (transposed in place)."""
    ImageOps.exif_transpose(frame, in_place=True)
    if frame.mode in ("1", "L"):
        # Resize one channel instead of three: LANCZOS works per channel, so gray-then-RGB gives
        # the reference's pixels at a third of the cost (bench/intake.py, test_pixel_equality.py).
        return fit_to_model(frame.convert("L"), longest_edge).convert("RGB")
    return fit_to_model(to_rgb(frame), longest_edge)


# A path that never exists: opening it is how the last error is set to a known value (FPDF_ERR_FILE).
_NO_SUCH_FILE = b"/nonexistent/lightonocr/pdfium-error-reset.pdf"


def _load_pdf(data: bytes, password: str | None) -> pdfium.PdfDocument:
    """Open a PDF so that a refusal's error code is about this document, never a leftover.

    PDFium's last error is process-wide and only set by some failures: after an encrypted PDF
    was refused, a PDF with no page tree (refused without setting an error) came back as
    FPDF_ERR_PASSWORD, `password_required`, for everyone. Opening a file that does not exist
    first sets the error to FPDF_ERR_FILE, which loading from memory never sets; a refusal
    still carrying that code was refused without an error of its own. Callers hold PDFIUM_LOCK.
    """
    pdfium_c.FPDF_LoadDocument(_NO_SUCH_FILE, None)  # returns NULL; sets the last error to FPDF_ERR_FILE
    try:
        return pdfium.PdfDocument(data, password=password)
    except pdfium.PdfiumError as exc:
        if exc.err_code == pdfium_c.FPDF_ERR_FILE:
            exc.err_code = pdfium_c.FPDF_ERR_SUCCESS  # no error of its own
        raise


def _init_forms(pdf: pdfium.PdfDocument) -> None:
    """Draw filled AcroForm fields as every viewer does (REFERENCE.md, "Filled PDF forms").

    Without PDFium's form environment a field whose value has no appearance stream (common in forms
    filled by software, with NeedAppearances) renders blank; with it, PDFium draws the value
    (FPDF_FFLDraw, `render(may_draw_forms=True)`). It must be set up before any page is loaded. Pages
    without form fields render the same either way (tests/intake/test_forms.py). A document whose form
    cannot be set up is still rendered, without its field values. Callers hold PDFIUM_LOCK.
    """
    try:
        pdf.init_forms()
    except pdfium.PdfiumError as exc:  # pragma: no cover - PDFium only fails here on allocation failure
        log.warning("PDF form fields will not be drawn: %s", exc)


class PdfDocument:
    doc_type = DocType.PDF

    def __init__(self, data: bytes, *, password: str | None, limits: IntakeLimits) -> None:
        with PDFIUM_LOCK:
            try:
                self._pdf = _load_pdf(data, password or None)
            except pdfium.PdfiumError as exc:
                if exc.err_code == pdfium_c.FPDF_ERR_PASSWORD:
                    if password:
                        raise WrongPassword("the password does not open this PDF") from None
                    raise PasswordRequired("this PDF is encrypted: send its password in the `password` field") from None
                if exc.err_code == pdfium_c.FPDF_ERR_SUCCESS:
                    # PDFium refuses a document whose page tree is empty or missing without an
                    # error of its own (`_load_pdf` tells): it has no pages to read.
                    raise EmptyDocument("the PDF has no pages") from None
                raise CorruptDocument(f"the PDF cannot be read: {exc}") from None
            self.page_count = len(self._pdf)
            _init_forms(self._pdf)
        if self.page_count == 0:
            self.close()
            raise EmptyDocument("the PDF has no pages")
        self._limits = limits

    def render(self, index: int) -> Image.Image:
        with PDFIUM_LOCK:
            try:
                page = self._pdf[index]
                try:
                    width, height = page.get_size()
                    if not (width > 0 and height > 0):
                        raise CorruptDocument(f"page {index + 1} has no area", page=index + 1)
                    # rev_byteorder: PDFium writes RGB itself, saving a BGR -> RGB pass (bench/intake.py).
                    bitmap = page.render(
                        scale=pdf_scale(width, height, self._limits.longest_edge),
                        rev_byteorder=True,
                        may_draw_forms=True,  # filled form fields (`_init_forms`)
                    )
                    raw: Image.Image = bitmap.to_pil()
                    # to_pil() shares the bitmap's buffer only for L/RGBX/RGBA (Pillow's mappable
                    # modes): those are converted, i.e. copied, before the bitmap is freed. An RGB
                    # bitmap is already copied by Image.frombuffer, so copying it again is waste.
                    image = raw if raw.mode == "RGB" else raw.convert("RGB")
                finally:
                    page.close()
            except pdfium.PdfiumError as exc:
                raise CorruptDocument(f"page {index + 1} cannot be rendered: {exc}", page=index + 1) from None
        return image

    def close(self) -> None:
        with PDFIUM_LOCK:
            self._pdf.close()


class ImageDocument:
    """A raster image; TIFF frames are pages, GIF and WebP animations use their first frame."""

    def __init__(self, data: bytes, *, doc_type: DocType, limits: IntakeLimits) -> None:
        self.doc_type = doc_type
        self._limits = limits
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._image = Image.open(io.BytesIO(data))
            frames = getattr(self._image, "n_frames", 1) if doc_type is DocType.TIFF else 1
        # TypeError: Pillow's TIFF reader on IFDs with missing or non-integer tags (tests/hostile/test_fuzz_intake.py).
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as exc:
            # Pillow's messages name the BytesIO object (`<_io.BytesIO object at 0x...>`): drop that noise.
            reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
            raise CorruptDocument(f"the {doc_type.value.upper()} image cannot be read: {reason}") from None
        self.page_count = frames
        self._lock = threading.Lock()  # seek() moves shared state
        self._check_pixels(0)

    def _check_pixels(self, index: int) -> None:
        width, height = self._image.size
        if width * height > self._limits.max_image_pixels:
            raise ImageTooLarge(
                f"the image is {width}x{height} pixels; the limit is {self._limits.max_image_pixels:,} pixels",
                page=index + 1,
                width=width,
                height=height,
            )
        if width < 1 or height < 1:
            raise CorruptDocument("the image has no pixels", page=index + 1)

    def frame(self, index: int) -> Image.Image:
        """Frame `index` decoded as stored, in a copy of its own (bench/intake.py times this apart)."""
        with self._lock:
            self._image.seek(index)
            self._check_pixels(index)
            self._image.load()
            return self._image.copy()

    def render(self, index: int) -> Image.Image:
        try:
            return normalise_image(self.frame(index), self._limits.longest_edge)
        except (OSError, SyntaxError, ValueError, EOFError, TypeError) as exc:
            raise CorruptDocument(f"image page {index + 1} cannot be decoded: {exc}", page=index + 1) from None

    def close(self) -> None:
        self._image.close()
