"""Document type from magic bytes; file names and content types are never trusted."""

from __future__ import annotations

from enum import StrEnum

from app.errors import EmptyDocument, UnsupportedMediaType


class DocType(StrEnum):
    PDF = "pdf"
    PNG = "png"
    JPEG = "jpeg"
    TIFF = "tiff"
    WEBP = "webp"
    BMP = "bmp"
    GIF = "gif"


_SIGNATURES: tuple[tuple[bytes, DocType], ...] = (
    (b"\x89PNG\r\n\x1a\n", DocType.PNG),
    (b"\xff\xd8\xff", DocType.JPEG),
    (b"II*\x00", DocType.TIFF),
    (b"MM\x00*", DocType.TIFF),
    (b"GIF87a", DocType.GIF),
    (b"GIF89a", DocType.GIF),
    (b"BM", DocType.BMP),
)

# PDF readers accept the header anywhere in the first KiB (some scanners prepend junk).
_PDF_HEADER_WINDOW = 1024


def sniff(data: bytes) -> DocType:
    if not data:
        raise EmptyDocument("the uploaded file is empty")
    if b"%PDF-" in data[:_PDF_HEADER_WINDOW]:
        return DocType.PDF
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return DocType.WEBP
    for signature, doc_type in _SIGNATURES:
        if data.startswith(signature):
            return doc_type
    raise UnsupportedMediaType(
        "unsupported file type: expected PDF, PNG, JPEG, TIFF, WebP, BMP or GIF",
        supported=[t.value for t in DocType],
    )
