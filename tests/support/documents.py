"""Deterministic in-memory test documents (images and PDFs) that carry a page marker.

Every generated page/frame can carry a *page marker*: two rows of 16 black/white
cells near the top edge, placed in fractions of the page size. Row A holds the
16-bit page id (black = 1, MSB first), row B its complement. Because the marker is
positioned relatively and only needs "dark vs light", it survives any rescaling,
aspect change, JPEG/WebP compression, palette quantisation and PDF rendering, and
:func:`page_id_of` can tell which page an image came from (e.g. inside the vLLM stub).

PDFs are written by a tiny hand-rolled writer (vector rectangles, so colours are
exact); ``password=`` produces a Standard Security Handler R3 (RC4-128) encrypted
PDF in pure Python, since neither pikepdf nor pypdf is a dependency.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Sequence
from typing import Literal

from PIL import Image, ImageDraw, ImageFont, ImageStat

Color = tuple[int, int, int]
ImageFormat = Literal["PNG", "JPEG", "TIFF", "WEBP", "BMP", "GIF"]

WHITE: Color = (255, 255, 255)
MARKER_BITS = 16
_X0, _X1 = 0.10, 0.90  # horizontal extent of the marker, as a fraction of the width
_ROWS = ((0.04, 0.10), (0.10, 0.16))  # (top, bottom) of rows A and B, fraction of height


def _marker_cells(page_id: int) -> list[tuple[float, float, float, float, bool]]:
    """Cells as (left, top, right, bottom) fractions plus whether they are dark."""
    if not 0 <= page_id < 1 << MARKER_BITS:
        raise ValueError(f"page_id must fit in {MARKER_BITS} bits, got {page_id}")
    step = (_X1 - _X0) / MARKER_BITS
    cells = []
    for row, (top, bottom) in enumerate(_ROWS):
        for k in range(MARKER_BITS):
            bit = bool(page_id >> (MARKER_BITS - 1 - k) & 1)
            cells.append((_X0 + k * step, top, _X0 + (k + 1) * step, bottom, bit != bool(row)))
    return cells


def make_marked_image(page_id: int, width: int = 850, height: int = 1100, color: Color = WHITE) -> Image.Image:
    """An RGB page with the marker for ``page_id`` plus a caption, as a PIL image."""
    image = Image.new("RGB", (width, height), color)
    draw = ImageDraw.Draw(image)
    for left, top, right, bottom, dark in _marker_cells(page_id):
        if dark:
            box = (round(left * width), round(top * height), round(right * width) - 1, round(bottom * height) - 1)
            draw.rectangle(box, fill=(0, 0, 0))
    size = max(8, height // 30)
    draw.text((width * 0.1, height * 0.3), f"Page {page_id}", fill=(40, 40, 40), font=ImageFont.load_default(size))
    return image


def page_id_of(image: Image.Image) -> int | None:
    """Recover the page id from a (possibly rescaled/recompressed) marked image, else None."""
    gray = image.convert("L")
    width, height = gray.size
    bits: list[list[bool]] = [[], []]
    for i, (left, top, right, bottom, _) in enumerate(_marker_cells(0)):
        # Sample the central half of each cell so edge anti-aliasing does not matter.
        dx, dy = (right - left) * width / 4, (bottom - top) * height / 4
        box = (
            round(left * width + dx),
            round(top * height + dy),
            round(right * width - dx),
            round(bottom * height - dy),
        )
        if box[2] <= box[0] or box[3] <= box[1]:
            return None
        mean = ImageStat.Stat(gray.crop(box)).mean[0]
        if 96 <= mean <= 160:
            return None
        bits[i // MARKER_BITS].append(mean < 96)
    if any(a == b for a, b in zip(*bits, strict=True)):
        return None
    return sum(int(bit) << (MARKER_BITS - 1 - k) for k, bit in enumerate(bits[0]))


# Pre-transform that ImageOps.exif_transpose() undoes for each EXIF orientation value.
_INVERSE_ORIENTATION: dict[int, Image.Transpose | None] = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _frame(page_id: int | None, width: int, height: int, color: Color, mode: str, alpha: bool) -> Image.Image:
    image = (
        make_marked_image(page_id, width, height, color)
        if page_id is not None
        else Image.new("RGB", (width, height), color)
    )
    if alpha:
        # Opaque page, but the bottom 10% is transparent *black*: flattening onto white
        # (correct) gives white there, a naive convert("RGB") gives black.
        image.paste((0, 0, 0), (0, height - height // 10, width, height))
        mask = Image.new("L", (width, height), 255)
        mask.paste(0, (0, height - height // 10, width, height))
        image.putalpha(mask)
        return image if mode in ("RGB", "RGBA") else image.convert("LA" if mode in ("L", "LA") else mode)
    return image if mode == "RGB" else image.convert(mode)


def make_image(
    fmt: ImageFormat,
    width: int = 850,
    height: int = 1100,
    *,
    color: Color = WHITE,
    mode: str = "RGB",
    page_id: int | None = None,
    frames: int = 1,
    alpha: bool = False,
    exif_orientation: int | None = None,
    quality: int = 90,
) -> bytes:
    """Encode a test image; multi-frame files (TIFF, GIF, WebP) mark frame k with ``(page_id or 1) + k - 1``.

    ``exif_orientation`` (JPEG/PNG/WebP) stores the pixels pre-rotated so that applying
    the orientation (``ImageOps.exif_transpose``) yields the upright ``width`` x ``height``
    page; without applying it the marker does not decode (orientation 2, a mirror,
    decodes to a different id).
    """
    if frames > 1:
        first = 1 if page_id is None else page_id
        images = [_frame(first + k, width, height, color, mode, alpha) for k in range(frames)]
    else:
        images = [_frame(page_id, width, height, color, mode, alpha)]
    kwargs: dict[str, object] = {}
    if exif_orientation is not None:
        if fmt not in ("JPEG", "PNG", "WEBP"):
            raise ValueError(f"EXIF orientation is not supported for {fmt}")
        transpose = _INVERSE_ORIENTATION[exif_orientation]
        if transpose is not None:
            images = [im.transpose(transpose) for im in images]
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    if fmt in ("JPEG", "WEBP"):
        kwargs["quality"] = quality
    if fmt == "GIF":
        kwargs.update(duration=100, loop=0)
    if len(images) > 1:
        kwargs.update(save_all=True, append_images=images[1:])
    out = io.BytesIO()
    images[0].save(out, format=fmt, **kwargs)
    return out.getvalue()


def make_png(
    width: int = 850, height: int = 1100, color: Color = WHITE, mode: str = "RGB", *, page_id: int | None = None
) -> bytes:
    """A PNG: solid ``color`` or, with ``page_id``, a marked page."""
    return make_image("PNG", width, height, color=color, mode=mode, page_id=page_id)


def make_jpeg(
    width: int = 850,
    height: int = 1100,
    color: Color = WHITE,
    *,
    page_id: int | None = None,
    exif_orientation: int | None = None,
    quality: int = 90,
) -> bytes:
    """A JPEG, optionally with an EXIF orientation tag (see :func:`make_image`)."""
    return make_image(
        "JPEG", width, height, color=color, page_id=page_id, exif_orientation=exif_orientation, quality=quality
    )


# --------------------------------------------------------------------------- PDF

_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")
_PERMISSIONS = -4  # every permission granted


def _rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) & 0xFF
        s[i], s[j] = s[j], s[i]
    out = bytearray(len(data))
    i = j = 0
    for n, byte in enumerate(data):
        i = (i + 1) & 0xFF
        j = (j + s[i]) & 0xFF
        s[i], s[j] = s[j], s[i]
        out[n] = byte ^ s[(s[i] + s[j]) & 0xFF]
    return bytes(out)


def _padded(password: str) -> bytes:
    return (password.encode("latin-1") + _PAD)[:32]


def _rc4_rounds(key: bytes, data: bytes) -> bytes:
    for i in range(20):
        data = _rc4(bytes(b ^ i for b in key), data)
    return data


def _security(user: str, owner: str, doc_id: bytes) -> tuple[bytes, bytes, bytes]:
    """(O, U, file key) per PDF 1.7 algorithms 2, 3 and 5 (revision 3, 128-bit RC4)."""
    digest = hashlib.md5(_padded(owner)).digest()
    for _ in range(50):
        digest = hashlib.md5(digest).digest()
    o_value = _rc4_rounds(digest, _padded(user))
    digest = hashlib.md5(_padded(user) + o_value + struct.pack("<i", _PERMISSIONS) + doc_id).digest()
    for _ in range(50):
        digest = hashlib.md5(digest).digest()
    key = digest
    u_value = _rc4_rounds(key, hashlib.md5(_PAD + doc_id).digest()) + bytes(16)
    return o_value, u_value, key


def _page_content(page_id: int, width: float, height: float) -> bytes:
    ops = ["0 0 0 rg"]
    for left, top, right, bottom, dark in _marker_cells(page_id):
        if dark:
            x, y, w, h = left * width, (1 - bottom) * height, (right - left) * width, (bottom - top) * height
            ops.append(f"{x:.3f} {y:.3f} {w:.3f} {h:.3f} re f")
    size = max(6.0, height / 30)
    ops.append(f"0.15 g BT /F1 {size:.2f} Tf {width * 0.1:.2f} {height * 0.7:.2f} Td (Page {page_id}) Tj ET")
    return "\n".join(ops).encode("ascii")


def make_pdf(
    n_pages: int,
    page_size_pt: tuple[float, float] = (612, 792),
    password: str | None = None,
    *,
    page_sizes_pt: Sequence[tuple[float, float]] | None = None,
    owner_password: str | None = None,
) -> bytes:
    """A real PDF whose page i (1-based) carries marker i and the text "Page i".

    ``password`` sets the user (open) password; ``owner_password`` alone yields an
    encrypted PDF that opens without a password, like many real-world "protected" PDFs.
    ``page_sizes_pt`` gives one size per page, overriding ``page_size_pt``.
    """
    sizes = list(page_sizes_pt) if page_sizes_pt is not None else [page_size_pt] * n_pages
    if len(sizes) != n_pages:
        raise ValueError("page_sizes_pt must have n_pages entries")
    doc_id = hashlib.md5(repr((n_pages, sizes, password, owner_password)).encode()).digest()
    encrypted = password is not None or owner_password is not None
    if encrypted:
        o_value, u_value, file_key = _security(password or "", owner_password or password or "", doc_id)

    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n_pages))
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for i, (width, height) in enumerate(sizes):
        number = 5 + 2 * i
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {width} {height}] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {number} 0 R >>".encode()
        )
        data = _page_content(i + 1, width, height)
        if encrypted:
            object_key = hashlib.md5(file_key + number.to_bytes(3, "little") + b"\0\0").digest()
            data = _rc4(object_key, data)
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(data), data))
    trailer = f"/Root 1 0 R /ID [<{doc_id.hex()}> <{doc_id.hex()}>]"
    if encrypted:
        objects.append(
            f"<< /Filter /Standard /V 2 /R 3 /Length 128 /P {_PERMISSIONS} "
            f"/O <{o_value.hex()}> /U <{u_value.hex()}> >>".encode()
        )
        trailer += f" /Encrypt {len(objects)} 0 R"

    out = io.BytesIO()
    out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(f"trailer\n<< /Size {len(objects) + 1} {trailer} >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


SMALL_PAGE_PT = (216, 288)  # 3 x 4 in: 600 x 800 px at 200 DPI, cheap to render and encode


def small_pdf(n_pages: int) -> bytes:
    """`n_pages` marked pages of SMALL_PAGE_PT: for tests about the pipeline, not about page sizes."""
    return make_pdf(n_pages, page_size_pt=SMALL_PAGE_PT)
