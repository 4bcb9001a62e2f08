"""Image encoding shared by engines and the API.

`encode_png` is on every page's path to vLLM, so it is tuned (bench/intake.py
measures it; docs/benchmarks.md has the numbers). Pillow's PNG writer tries
four filters on every row and was 4-10x slower than the rest of intake; we
write the PNG ourselves with no row filter and deflate it with ISA-L (`isal`,
level 1): a standard zlib stream, 4-5x faster than zlib's level 1 for 3% more bytes. The image is
still lossless: it decodes to exactly the pixels given
(tests/intake/test_pixel_equality.py checks every corpus page).
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable

from isal import isal_zlib
from PIL import Image, ImageChops

from app.intake import Document
from app.intake.pool import PooledDocument

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILTER_NONE = 0
FILTER_UP = 2
_COLOR_TYPE = {"L": 0, "RGB": 2}


def is_gray(image: Image.Image) -> bool:
    """True when an RGB image has R == G == B everywhere (most scans and text pages)."""
    if image.mode == "L":
        return True
    if image.mode != "RGB":
        return False
    red, green, blue = image.split()
    return ImageChops.difference(red, green).getbbox() is None and ImageChops.difference(green, blue).getbbox() is None


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG of the page; gray pages as 8-bit gray, which decodes to the same RGB pixels.

    Chosen by measurement over the corpus (bench/intake.py, docs/benchmarks.md): no row
    filter and ISA-L deflate level 1 (2.2 ms median per page, 6.5 MB for 13 pages) beat
    zlib level 1 with the Up filter and run-length strategy (11 ms, 6.3 MB) and Pillow's
    default (118 ms, 10.7 MB).
    """
    if image.mode not in _COLOR_TYPE:
        image = image.convert("RGB")
    if image.mode == "RGB" and is_gray(image):
        image = image.getchannel(0)
    return write_png(image, png_filter=FILTER_NONE, deflate=deflate_isal)


def deflate_isal(data: bytes) -> bytes:
    return isal_zlib.compress(data, 1)


def deflate_zlib(level: int, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> Callable[[bytes], bytes]:
    """zlib with a given level and strategy (kept for bench/intake.py's comparisons)."""

    def deflate(data: bytes) -> bytes:
        compressor = zlib.compressobj(level, zlib.DEFLATED, 15, 8, strategy)
        return compressor.compress(data) + compressor.flush()

    return deflate


def write_png(image: Image.Image, *, png_filter: int, deflate: Callable[[bytes], bytes]) -> bytes:
    """An 8-bit L or RGB image as PNG with one filter for every row (FILTER_NONE or FILTER_UP)."""
    idat = deflate(_scanlines(image, png_filter))
    width, height = image.size
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPE[image.mode], 0, 0, 0)
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _scanlines(image: Image.Image, png_filter: int) -> bytes:
    """The PNG's filtered rows, each prefixed by its filter byte, built with Pillow (C) operations.

    Rows are handled as bytes (an L view `channels` times wider): the Up filter is
    bytewise, so one modular subtraction of the image shifted down one row does it.
    """
    width, height = image.size
    row_bytes = width * len(image.getbands())
    data = image if image.mode == "L" else Image.frombytes("L", (row_bytes, height), image.tobytes())
    if png_filter not in (FILTER_NONE, FILTER_UP):
        raise ValueError(f"unsupported PNG filter {png_filter}")
    if png_filter == FILTER_UP and height > 1:
        above = Image.new("L", (row_bytes, height), 0)
        above.paste(data.crop((0, 0, row_bytes, height - 1)), (0, 1))
        data = ImageChops.subtract_modulo(data, above)
    rows = Image.new("L", (row_bytes + 1, height), png_filter)
    rows.paste(data, (1, 0))
    return rows.tobytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def page_png(document: Document, index: int) -> tuple[bytes, tuple[int, int]]:
    """Page `index` as the exact PNG the model is sent, and its size (blocking: run in a thread)."""
    if isinstance(document, PooledDocument):
        page = document.render_png(index)  # encoded by the worker
        return page.png, page.size
    image = document.render(index)
    return encode_png(image), image.size


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
