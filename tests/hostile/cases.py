"""The adversarial request set: every case is built by code and names its exact answer.

Each `Case` is one HTTP request to `POST /api/inference` (a multipart body, or a raw
malformed one) and the exact status and error `code` the service must answer with.
Documents are made in memory (tiny inline byte strings, hand-written PDFs and PNGs,
Pillow for the rest): nothing is read from disk, so the set is the same everywhere.
`send` delivers a case over a raw socket, so an answer is timed from the moment the
last body byte was written, and writing stops as soon as the server answers (which is
how "refused while reading" is observed).

Decisions, checked against the service (tests/hostile/test_hostile_input.py):

- pdfium repairs a broken cross-reference table (offsets off by 7, `startxref` pointing
  past the end) by scanning the file: those PDFs are read, 200. With no xref and no
  trailer at all there is no catalog to find: 422 `corrupt_document`.
- A PDF whose page tree is empty is refused by pdfium itself ("Failed to load document")
  without an error of its own: it has no pages, 422 `empty_document`.
- pdfium believes `/Count` up to about a million pages, so a one-page PDF claiming
  1,000,000 is refused `too_many_pages` without rendering, and asking for a page that
  exists only in `/Count` fails that page: 422 `corrupt_document`.
- The PNG bomb is complete and valid: 60,000 x 60,000 1-bit pixels with a ~440 KB IDAT.
  An honest bomb of "a few KB" is impossible (deflate expands at most ~1032:1, and the
  rows are 450 MB); the truncated variant (first 4 KB of IDAT) is the few-KB one.
  Both are refused from IHDR, before decoding.
- An empty body and a multipart body cut before its closing boundary are 400
  `malformed_request`: the upload reader requires the closing boundary.
- The 50 MB field and the 50 MB file go chunked (no Content-Length), so only reading
  can refuse them; with a Content-Length over the limit the header alone suffices.
"""

from __future__ import annotations

import functools
import io
import selectors
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from tests.support.documents import make_image, make_pdf, make_png

INFERENCE = "/api/inference"
BOUNDARY = "hostile-boundary-7f3a"

# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None
    disposition: bytes | None = None  # a raw Content-Disposition value, overriding name/filename


@dataclass(frozen=True)
class HttpRequest:
    """What goes on the wire after the request line: a content type and a body.

    `body` as bytes is sent with its Content-Length (or `content_length` when given, to lie);
    as a callable, its pieces are sent with chunked transfer encoding, `pause_s` apart, and
    the sender stops as soon as the server answers.
    """

    content_type: str | None
    body: bytes | Callable[[], Iterator[bytes]]
    content_length: int | None = None
    pause_s: float = 0.0
    piece_bytes: int = 64 * 1024  # a bytes body is written in pieces of this size


def multipart(parts: list[Part], boundary: str = BOUNDARY) -> bytes:
    out = io.BytesIO()
    for part in parts:
        out.write(f"--{boundary}\r\n".encode())
        disposition = part.disposition
        if disposition is None:
            text = f'form-data; name="{part.name}"'
            if part.filename is not None:
                text += f'; filename="{part.filename}"'
            disposition = text.encode()
        out.write(b"Content-Disposition: " + disposition + b"\r\n")
        if part.content_type is not None:
            out.write(f"Content-Type: {part.content_type}\r\n".encode())
        out.write(b"\r\n" + part.data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def form_type(boundary: str = BOUNDARY) -> str:
    return f"multipart/form-data; boundary={boundary}"


def upload(
    data: bytes,
    filename: str = "document",
    content_type: str = "application/octet-stream",
    **fields: str,
) -> HttpRequest:
    """The ordinary request: one `file` part plus text fields."""
    parts = [Part("file", data, filename, content_type)]
    parts += [Part(name, value.encode()) for name, value in fields.items()]
    return HttpRequest(form_type(), multipart(parts))


# ----------------------------------------------------------------------------- documents


def raw_pdf(objects: list[bytes], *, xref_shift: int = 0, startxref: int | None = None, trailer: bool = True) -> bytes:
    """A PDF of the given objects (numbered from 1, object 1 the catalog), with knobs to break it."""
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    if not trailer:
        return out.getvalue()
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % (offset + xref_shift) for offset in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\n" % (len(objects) + 1))
    out.write(b"startxref\n%d\n%%%%EOF\n" % (xref if startxref is None else startxref))
    return out.getvalue()


_CATALOG = b"<< /Type /Catalog /Pages 2 0 R >>"
_BLANK_CONTENT = b"<< /Length 0 >>\nstream\n\nendstream"


def shared_page_pdf(pages: int, *, count: int | None = None, media_box: str = "0 0 612 792") -> bytes:
    """`pages` entries in /Kids that all point at ONE page object and ONE content stream.

    10,000 pages cost ~60 KB (the Kids array: `3 0 R ` per page); `count` lets /Count lie.
    """
    kids = b" ".join([b"3 0 R"] * pages)
    return raw_pdf(
        [
            _CATALOG,
            b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages if count is None else count),
            b"<< /Type /Page /Parent 2 0 R /MediaBox [%s] /Contents 4 0 R >>" % media_box.encode(),
            _BLANK_CONTENT,
        ]
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def zeros_zlib(total: int, block: int = 1 << 20) -> bytes:
    """zlib stream of `total` zero bytes, built without ever holding them.

    Each block is deflated by a fresh raw compressor and full-flushed, so the
    compressed blocks are identical, self-contained and can simply be repeated;
    adler32 of n zeros is ((n mod 65521) << 16) | 1.
    """

    def deflate(size: int, final: bool) -> bytes:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        zeros = bytes(size)
        return compressor.compress(zeros) + compressor.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)

    full, rest = divmod(total, block)
    body = deflate(block, final=False) * full + deflate(rest, final=True)
    return b"\x78\xda" + body + struct.pack(">I", ((total % 65521) << 16) | 1)


@functools.cache
def png_bomb(width: int = 60_000, height: int = 60_000, *, truncate_idat: int | None = None) -> bytes:
    """A valid 1-bit grey PNG of width x height zero pixels; `truncate_idat` keeps only its first bytes."""
    row = 1 + (width + 7) // 8  # filter byte + packed pixels
    idat = zeros_zlib(row * height)
    if truncate_idat is not None:
        idat = idat[:truncate_idat]
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """Signature and IHDR, nothing else."""
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def jpeg_bomb(width: int = 65_000, height: int = 65_000) -> bytes:
    """A small real JPEG whose SOF0 frame header is patched to claim width x height."""
    data = bytearray(make_image("JPEG", 16, 16))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_bomb(width: int = 65_535, height: int = 65_535) -> bytes:
    """A small real GIF whose logical screen claims width x height."""
    data = bytearray(make_image("GIF", 16, 16))
    struct.pack_into("<HH", data, 6, width, height)
    return bytes(data)


def _save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


@functools.cache
def tiff_frames(frames: int, size: int = 4) -> bytes:
    images = [Image.new("L", (size, size), k % 256) for k in range(frames)]
    return _save(images[0], "TIFF", save_all=True, append_images=images[1:])


@functools.cache
def animated_gif() -> bytes:
    return make_image("GIF", 120, 160, frames=3, page_id=1)


def cmyk_jpeg() -> bytes:
    return _save(Image.new("CMYK", (200, 260), (0, 0, 0, 30)), "JPEG")


def png16() -> bytes:
    image = Image.new("I;16", (200, 260))
    image.putdata([(x * 257) % 65536 for x in range(200 * 260)])
    return _save(image, "PNG")


def palette_transparent_png() -> bytes:
    image = Image.new("P", (200, 260), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (50, 50, 150, 150))
    return _save(image, "PNG", transparency=0)


@functools.cache
def good_png() -> bytes:
    """The known-good request used to prove the service still works after each case."""
    return make_png(200, 300, page_id=7)


def zip_bytes() -> bytes:
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("page.png", good_png())
    return out.getvalue()


# ----------------------------------------------------------------------------- streamed bodies


def streamed_field(total: int, piece: int = 64 * 1024) -> Callable[[], Iterator[bytes]]:
    """A multipart body whose `pages` field is `total` bytes, produced lazily, then a file."""

    def pieces() -> Iterator[bytes]:
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="pages"\r\n\r\n'.encode()
        chunk = b"1" * piece
        for _ in range(total // piece):
            yield chunk
        yield b"\r\n" + multipart([Part("file", good_png(), "a.png", "image/png")])

    return pieces


def streamed_file(total: int, piece: int = 256 * 1024) -> Callable[[], Iterator[bytes]]:
    """A multipart body with a `file` of `total` bytes (a PNG signature, then zeros), produced lazily."""

    def pieces() -> Iterator[bytes]:
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode() + b"\x89PNG\r\n\x1a\n"
        chunk = bytes(piece)
        for _ in range(total // piece):
            yield chunk
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    return pieces


def trickle(data: bytes, piece: int = 64) -> Callable[[], Iterator[bytes]]:
    def pieces() -> Iterator[bytes]:
        for start in range(0, len(data), piece):
            yield data[start : start + piece]

    return pieces


# ----------------------------------------------------------------------------- the set


@dataclass(frozen=True)
class Case:
    """One hostile request and the exact answer it must get (`code` None: a 200 result)."""

    name: str
    status: int
    code: str | None
    why: str
    build: Callable[[], HttpRequest]
    pages: int | None = None  # for a 200: pages in the result
    refused_while_reading: bool = False  # the answer must come before the body was all sent
    slow_upload: bool = False  # run against a service with a short UPLOAD_TIMEOUT_S
    # From the last byte written to the whole answer: a bound that catches a hang or a read of the whole body,
    # not a speed (speed is measured in bench/, never asserted in a test on shared cores).
    max_latency_s: float = 10.0
    known_bug: str = ""  # the service answers otherwise today: the test is a strict xfail


CASES: list[Case] = []


def case(
    name: str,
    status: int,
    code: str | None,
    why: str,
    build: Callable[[], HttpRequest],
    **options: Any,
) -> None:
    CASES.append(Case(name, status, code, why, build, **options))


# -- transport and multipart
case(
    "empty_body",
    400,
    "malformed_request",
    "a multipart type but no body at all: not even the closing boundary",
    lambda: HttpRequest(form_type(), b""),
)
case("one_byte_body", 400, "malformed_request", "one byte is no multipart body", lambda: HttpRequest(form_type(), b"x"))
case(
    "not_multipart_json",
    400,
    "malformed_request",
    "JSON is not multipart/form-data",
    lambda: HttpRequest("application/json", b'{"file": "x"}'),
)
case(
    "not_multipart_raw_pdf",
    400,
    "malformed_request",
    "a raw PDF body, not a form",
    lambda: HttpRequest("application/pdf", make_pdf(1)),
)
case("no_content_type", 400, "malformed_request", "no Content-Type header", lambda: HttpRequest(None, b"abc"))
case(
    "multipart_without_boundary",
    400,
    "malformed_request",
    "multipart/form-data needs a boundary parameter",
    lambda: HttpRequest("multipart/form-data", multipart([Part("file", good_png(), "a.png")])),
)
case(
    "wrong_boundary",
    400,
    "malformed_request",
    "the header names one boundary, the body uses another",
    lambda: HttpRequest(form_type("other-boundary"), multipart([Part("file", good_png(), "a.png")])),
)
case(
    "truncated_multipart",
    400,
    "malformed_request",
    "the body stops inside the file part, before its closing boundary",
    lambda: HttpRequest(form_type(), multipart([Part("file", good_png(), "a.png")])[:-200]),
)
case(
    "part_without_name",
    400,
    "malformed_request",
    "a Content-Disposition without name",
    lambda: HttpRequest(form_type(), multipart([Part("file", good_png(), disposition=b'form-data; filename="a.png"')])),
)
case(
    "too_many_parts",
    400,
    "malformed_request",
    "17 form fields (at most 16)",
    lambda: HttpRequest(form_type(), multipart([Part(f"f{i}", b"x") for i in range(16)] + [Part("file", good_png())])),
)
case(
    "missing_file",
    422,
    "missing_file",
    "only a `pages` field",
    lambda: HttpRequest(form_type(), multipart([Part("pages", b"1")])),
)
case(
    "file_field_misnamed",
    422,
    "missing_file",
    "the document sent as `files`, not `file`",
    lambda: HttpRequest(form_type(), multipart([Part("files", good_png(), "a.png", "image/png")])),
)
case(
    "two_files",
    400,
    "multiple_files",
    "two `file` parts",
    lambda: HttpRequest(form_type(), multipart([Part("file", good_png(), "a.png"), Part("file", good_png(), "b.png")])),
)
case(
    "field_over_limit",
    413,
    "field_too_large",
    "a 65 KB password field (MAX_FIELD_SIZE_KB=64)",
    lambda: upload(good_png(), password="p" * (65 * 1024)),
)
case(
    "field_50mb_streamed",
    413,
    "field_too_large",
    "a 50 MB `pages` field sent chunked (no Content-Length to refuse up front): refused after 64 KB",
    lambda: HttpRequest(form_type(), streamed_field(50 * 1024 * 1024)),
    refused_while_reading=True,
)
case(
    "file_50mb_streamed",
    413,
    "file_too_large",
    "a 50 MB file sent chunked (no Content-Length): refused once 10 MB (MAX_FILE_SIZE_MB) were read",
    lambda: HttpRequest(form_type(), streamed_file(50 * 1024 * 1024)),
    refused_while_reading=True,
)
case(
    "declared_length_50mb",
    413,
    "file_too_large",
    "Content-Length says 50 MB: refused from the header, before any body is read",
    lambda: HttpRequest(form_type(), multipart([Part("file", good_png(), "a.png")]), content_length=50 * 1024 * 1024),
)
case(
    "trickled_upload",
    408,
    "upload_timeout",
    "64 bytes every 0.25 s against UPLOAD_TIMEOUT_S=1: the body would take ~20 s",
    lambda: HttpRequest(form_type(), trickle(multipart([Part("file", good_png(), "a.png")])), pause_s=0.25),
    refused_while_reading=True,
    slow_upload=True,
)

# -- what the bytes are
case(
    "empty_file", 422, "empty_document", "a `file` part with no bytes", lambda: upload(b"", "a.pdf", "application/pdf")
)
case("one_byte_file", 415, "unsupported_media_type", "one byte is no known format", lambda: upload(b"%", "a.pdf"))
case(
    "html_named_png",
    415,
    "unsupported_media_type",
    "HTML with a .png name and image/png type: type comes from the bytes",
    lambda: upload(b"<!doctype html><html><body>hi</body></html>", "page.png", "image/png"),
)
case(
    "zip_named_png",
    415,
    "unsupported_media_type",
    "a zip named .png",
    lambda: upload(zip_bytes(), "page.png", "image/png"),
)
case(
    "pdf_header_after_1kb",
    415,
    "unsupported_media_type",
    "`%PDF-` only after 2 KB of junk (readers look in the first KiB)",
    lambda: upload(b"\0" * 2048 + make_pdf(1), "a.pdf"),
)
case(
    "pdf_header_after_junk",
    200,
    None,
    "500 bytes of junk before `%PDF-`: within the first KiB, as readers allow",
    lambda: upload(b"junk" * 125 + make_pdf(1), "a.pdf"),
    pages=1,
)
case(
    "png_named_pdf",
    200,
    None,
    "a PNG named .pdf, sent as application/pdf",
    lambda: upload(good_png(), "scan.pdf", "application/pdf"),
    pages=1,
)
case(
    "webp_signature_garbage",
    422,
    "corrupt_document",
    "RIFF....WEBP followed by garbage",
    lambda: upload(b"RIFF\x20\0\0\0WEBPVP8 " + b"\xab" * 40, "a.webp"),
)
case("bmp_signature_garbage", 422, "corrupt_document", "`BM` then nothing usable", lambda: upload(b"BM" + b"\x01" * 30))

# -- broken files
case(
    "truncated_png",
    422,
    "corrupt_document",
    "a PNG cut in its IDAT: the header opens, decoding fails",
    lambda: upload(make_png(300, 300, page_id=3)[:400], "a.png"),
)
case(
    "truncated_jpeg",
    422,
    "corrupt_document",
    "a JPEG cut after 300 bytes",
    lambda: upload(make_image("JPEG", 300, 300, page_id=3)[:300], "a.jpg"),
)
case("truncated_pdf", 422, "corrupt_document", "the first half of a PDF", lambda: upload(make_pdf(2)[:600], "a.pdf"))
case(
    "pdf_header_then_garbage",
    422,
    "corrupt_document",
    "`%PDF-1.7` then garbage",
    lambda: upload(b"%PDF-1.7\n" + b"garbage " * 64, "a.pdf"),
)
case(
    "pdf_xref_offsets_wrong",
    200,
    None,
    "every xref offset off by 7: pdfium rebuilds the table by scanning",
    lambda: upload(raw_pdf(_one_page(), xref_shift=7), "a.pdf"),
    pages=1,
)
case(
    "pdf_startxref_nowhere",
    200,
    None,
    "startxref points past the end of the file: repaired",
    lambda: upload(raw_pdf(_one_page(), startxref=999_999), "a.pdf"),
    pages=1,
)
case(
    "pdf_no_xref_no_trailer",
    422,
    "corrupt_document",
    "objects only, no xref and no trailer: no catalog to find",
    lambda: upload(raw_pdf(_one_page(), trailer=False), "a.pdf"),
)
case(
    "pdf_zero_pages",
    422,
    "empty_document",
    "a page tree with no kids: pdfium refuses to load it without an error of its own",
    lambda: upload(raw_pdf([_CATALOG, b"<< /Type /Pages /Kids [] /Count 0 >>"]), "a.pdf"),
)
case(
    "pdf_missing_page_object",
    422,
    "corrupt_document",
    "/Kids names an object that does not exist: the only page fails to load",
    lambda: upload(raw_pdf([_CATALOG, b"<< /Type /Pages /Kids [9 0 R] /Count 1 >>"]), "a.pdf"),
)

# -- sizes and counts
case(
    "pdf_10000_pages",
    422,
    "too_many_pages",
    "10,000 pages sharing one page object (~60 KB): refused from the page count, nothing rendered",
    lambda: upload(shared_page_pdf(10_000), "a.pdf"),
)
case(
    "pdf_count_lies_million",
    422,
    "too_many_pages",
    "one real page, /Count 1,000,000: pdfium believes it, the limit refuses it",
    lambda: upload(shared_page_pdf(1, count=1_000_000), "a.pdf"),
)
case(
    "pdf_count_lies_page_past_real_end",
    422,
    "corrupt_document",
    "pages=2 of a 1-page PDF whose /Count says 10: page 2 cannot be loaded",
    lambda: upload(shared_page_pdf(1, count=10), "a.pdf", pages="2"),
)
case(
    "pdf_page_200_inches",
    200,
    None,
    "a 200 x 200 inch page renders at 1540 x 1540",
    lambda: upload(make_pdf(1, page_size_pt=(14_400, 14_400)), "a.pdf"),
    pages=1,
)
case(
    "pdf_page_1144pt_wide",
    200,
    None,
    "a 1144 x 192 pt page: 1540 / 1144 * 1144 = 1540.0000000000002, and pypdfium2 sizes the bitmap with ceil",
    lambda: upload(shared_page_pdf(1, media_box="0 0 1144 192"), "a.pdf"),
    pages=1,
)
case(
    "pdf_media_box_1e30",
    200,
    None,
    "an absurd MediaBox: pdfium falls back to a default page size",
    lambda: upload(shared_page_pdf(1, media_box="0 0 1e30 1e30"), "a.pdf"),
    pages=1,
)
case(
    "pdf_media_box_empty",
    200,
    None,
    "a zero-area MediaBox: pdfium falls back to a default page size",
    lambda: upload(shared_page_pdf(1, media_box="0 0 0 0"), "a.pdf"),
    pages=1,
)
case(
    "png_bomb_60000",
    422,
    "image_too_large",
    "60,000 x 60,000 pixels, a complete valid PNG of ~440 KB: refused from IHDR",
    lambda: upload(png_bomb(), "bomb.png", "image/png"),
)
case(
    "png_bomb_truncated",
    422,
    "image_too_large",
    "the same bomb cut to its first 4 KB of IDAT",
    lambda: upload(png_bomb(truncate_idat=4096), "bomb.png", "image/png"),
)
case(
    "png_header_claims_4g_squared",
    422,
    "image_too_large",
    "IHDR claiming 4,294,967,295 x 4,294,967,295 and one tiny IDAT",
    lambda: upload(png_header_only(2**32 - 1, 2**32 - 1) + _png_chunk(b"IDAT", zlib.compress(bytes(64))), "a.png"),
)
case(
    "png_ihdr_only",
    422,
    "corrupt_document",
    "signature and IHDR, then nothing: Pillow cannot identify it",
    lambda: upload(png_header_only(100_000, 100_000), "a.png"),
)
case(
    "png_zero_width",
    422,
    "corrupt_document",
    "IHDR with width 0",
    lambda: upload(png_header_only(0, 100) + _png_chunk(b"IDAT", zlib.compress(bytes(64))), "a.png"),
)
case(
    "png_at_pixel_limit",
    200,
    None,
    "8,000 x 10,000 = MAX_IMAGE_PIXELS exactly (a 10 KB PNG): decoded and downscaled; the heaviest legal image",
    lambda: upload(png_bomb(8_000, 10_000), "a.png"),
    pages=1,
)
case(
    "jpeg_bomb",
    422,
    "image_too_large",
    "a JPEG frame header claiming 65,000 x 65,000",
    lambda: upload(jpeg_bomb(), "a.jpg"),
)
case("gif_bomb", 422, "image_too_large", "a GIF screen of 65,535 x 65,535", lambda: upload(gif_bomb(), "a.gif"))
case(
    "tiff_1000_frames",
    422,
    "too_many_pages",
    "a TIFF of 1,000 4x4 frames: every frame is a page, more than MAX_PAGES",
    lambda: upload(tiff_frames(1000), "a.tiff"),
)
case(
    "tiff_1000_frames_one_selected",
    200,
    None,
    "the same TIFF with pages=1000: only the last frame is read",
    lambda: upload(tiff_frames(1000), "a.tiff", pages="1000"),
    pages=1,
)

# -- odd but valid images
case("animated_gif", 200, None, "3 frames: the first one is the page", lambda: upload(animated_gif(), "a.gif"), pages=1)
case("cmyk_jpeg", 200, None, "CMYK JPEG converted to RGB", lambda: upload(cmyk_jpeg(), "a.jpg"), pages=1)
case("png_16_bit", 200, None, "16-bit grey PNG, scaled to 8 bits", lambda: upload(png16(), "a.png"), pages=1)
case(
    "png_palette_transparency",
    200,
    None,
    "palette PNG with a transparent index, flattened on white",
    lambda: upload(palette_transparent_png(), "a.png"),
    pages=1,
)
case("png_1x1", 200, None, "a single pixel", lambda: upload(make_png(1, 1), "a.png"), pages=1)
case(
    "png_strip_20000x50",
    200,
    None,
    "a 20,000 x 50 strip: 1540 x 4 for the model",
    lambda: upload(make_png(20_000, 50), "a.png"),
    pages=1,
)

# -- pages thinner than one merged patch (28 px) once sized for the model: padded with white, answered 200
THIN_SHAPES = ((20, 3000), (5000, 10), (13, 900), (3, 5000), (27, 27), (1, 1))


def png_upload(width: int, height: int) -> HttpRequest:
    return upload(make_png(width, height), "a.png")


for _width, _height in THIN_SHAPES[:-1]:  # 1 x 1 is `png_1x1` above
    case(
        f"png_thin_{_width}x{_height}",
        200,
        None,
        f"a {_width} x {_height} page: its short side is padded with white to 28 px, never sent as it is",
        functools.partial(png_upload, _width, _height),
        pages=1,
    )

# -- the other fields
case(
    "pdf_encrypted_no_password",
    422,
    "password_required",
    "an RC4-128 encrypted PDF, no password",
    lambda: upload(make_pdf(1, password="s3cret"), "a.pdf"),
)
case(
    "pdf_encrypted_wrong_password",
    422,
    "wrong_password",
    "the wrong password",
    lambda: upload(make_pdf(1, password="s3cret"), "a.pdf", password="guess"),
)
case(
    "pdf_encrypted_right_password",
    200,
    None,
    "the right password",
    lambda: upload(make_pdf(2, password="s3cret"), "a.pdf", password="s3cret"),
    pages=2,
)
case(
    "password_on_plain_pdf",
    200,
    None,
    "a password sent with an unencrypted PDF is ignored",
    lambda: upload(make_pdf(1), "a.pdf", password="whatever"),
    pages=1,
)
case("pages_not_a_number", 422, "invalid_pages", "pages=abc", lambda: upload(make_pdf(2), "a.pdf", pages="abc"))
case("pages_past_end", 422, "invalid_pages", "pages=3 of 2", lambda: upload(make_pdf(2), "a.pdf", pages="3"))
case(
    "pages_huge_range",
    422,
    "invalid_pages",
    "pages=1-99999999999999999999 is refused before any range is built",
    lambda: upload(make_pdf(2), "a.pdf", pages="1-99999999999999999999"),
)
case("pages_zero", 422, "invalid_pages", "pages are 1-based", lambda: upload(make_pdf(2), "a.pdf", pages="0"))
case(
    "pages_control_characters",
    422,
    "invalid_pages",
    "NUL and unicode digits in pages",
    lambda: upload(make_pdf(2), "a.pdf", pages="1\x00,\u0663"),
)
case(
    "filename_not_utf8",
    200,
    None,
    "a file name of invalid UTF-8 and quotes",
    lambda: HttpRequest(
        form_type(),
        multipart([Part("file", good_png(), disposition=b'form-data; name="file"; filename="\xff\xfe\\"x.png"')]),
    ),
    pages=1,
)


def _one_page() -> list[bytes]:
    return [
        _CATALOG,
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
        _BLANK_CONTENT,
    ]


# ----------------------------------------------------------------------------- delivery


@dataclass
class Outcome:
    """What came back, and when, relative to the body."""

    status: int
    headers: dict[str, str]
    body: bytes
    latency_s: float  # answer complete minus the moment the last body byte was written
    body_complete: bool  # False when the server answered before the body was all sent
    bytes_sent: int


class NoAnswer(AssertionError):
    """The server closed or timed out without an HTTP answer."""


def _pieces(request: HttpRequest, host: str, port: int, path: str) -> tuple[bytes, Iterator[bytes], bool]:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close", "Accept: application/json"]
    if request.content_type is not None:
        lines.append(f"Content-Type: {request.content_type}")
    if isinstance(request.body, bytes):
        body = request.body
        lines.append(f"Content-Length: {len(body) if request.content_length is None else request.content_length}")
        size = request.piece_bytes
        pieces: Iterator[bytes] = (body[i : i + size] for i in range(0, len(body), size))
        chunked = False
    else:
        lines.append("Transfer-Encoding: chunked")
        pieces = request.body()
        chunked = True
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), pieces, chunked


def send(request: HttpRequest, host: str, port: int, *, path: str = INFERENCE, timeout_s: float = 60.0) -> Outcome:
    """Write the request piece by piece, stopping as soon as the server answers; read the answer.

    Bounded: everything must happen within `timeout_s`, or `NoAnswer` is raised.
    """
    head, pieces, chunked = _pieces(request, host, port, path)
    deadline = time.monotonic() + timeout_s
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    pending = head
    sent = 0
    last_write = time.monotonic()
    body_complete = False
    answered = False
    try:
        while not answered:
            if not pending:
                piece = next(pieces, None)
                if piece is None:
                    pending = b"0\r\n\r\n" if chunked else b""
                    body_complete = True
                    if not pending:
                        break
                elif chunked:
                    pending = b"%x\r\n%s\r\n" % (len(piece), piece) if piece else b""
                else:
                    pending = piece
                if request.pause_s and not body_complete and _wait_readable(selector, sock, request.pause_s):
                    answered = True
                    break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoAnswer(f"no answer within {timeout_s}s ({sent} bytes sent)")
            for _, events in selector.select(timeout=remaining):
                if events & selectors.EVENT_READ:
                    answered = True
                elif events & selectors.EVENT_WRITE and pending:
                    try:
                        n = sock.send(pending)
                    except (BrokenPipeError, ConnectionResetError):
                        answered = True
                        break
                    pending = pending[n:]
                    sent += n
                    last_write = time.monotonic()
            if body_complete and not pending:
                break
        body_complete = body_complete and not pending
        raw = _read_all(sock, deadline)
        done = time.monotonic()
    finally:
        selector.close()
        sock.close()
    status, headers, body = _parse_response(raw)
    return Outcome(status, headers, body, done - last_write, body_complete, sent)


def _wait_readable(selector: selectors.BaseSelector, sock: socket.socket, seconds: float) -> bool:
    """Wait up to `seconds` for the server to answer (the trickle's pause: no sleeping blind)."""
    selector.modify(sock, selectors.EVENT_READ)
    try:
        return bool(selector.select(timeout=seconds))
    finally:
        selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)


def _read_all(sock: socket.socket, deadline: float) -> bytes:
    """Read until the answer is complete by its own framing, as HTTP clients do, or the server closes.

    Not "until EOF": after refusing a body mid-way the server keeps the connection to read and drop the
    rest (lingering close), and ends it when the client stops sending and goes away.
    """
    chunks: list[bytes] = []
    sock.setblocking(True)
    while not _complete(b"".join(chunks)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NoAnswer("the answer did not complete in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break  # the server reset after answering (unread body): keep what arrived
        except TimeoutError:
            raise NoAnswer("the answer did not complete in time") from None
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    lines = head.decode("latin-1").lower().split("\r\n")
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip() == "content-length":
            return len(body) >= int(value)
        if key.strip() == "transfer-encoding" and "chunked" in value:
            return body.endswith(b"0\r\n\r\n")
    return False


def _parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise NoAnswer(f"no complete HTTP answer: {raw[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if len(body) < length:
            raise NoAnswer(f"answer body cut at {len(body)} of {length} bytes")
        body = body[:length]
    return status, headers, body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]
