"""Streaming multipart reader that enforces size limits while the body arrives.

Starlette's form parser spools whole uploads to disk before a handler can look
at them; here the limit is checked on every chunk, so an oversized upload is
refused after at most MAX_FILE_SIZE_MB (plus one chunk) has been read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.errors import (
    FieldTooLarge,
    MalformedRequest,
    MissingFile,
    MultipleFiles,
    PayloadTooLarge,
    UploadTimeout,
)

FILE_FIELD = "file"
_MAX_FIELDS = 16
_MULTIPART_OVERHEAD = 64 * 1024  # headers, boundaries and small form fields


@dataclass
class Upload:
    data: bytes
    filename: str | None
    fields: dict[str, str]


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _Collector:
    """python-multipart callbacks; raises as soon as a limit is crossed."""

    def __init__(self, max_file_bytes: int, max_field_bytes: int) -> None:
        self.max_file_bytes = max_file_bytes
        self.max_field_bytes = max_field_bytes
        self.parts: list[_Part] = []
        self.complete = False  # set by the closing boundary; python-multipart's finalize() checks nothing
        self._header_field = bytearray()
        self._header_value = bytearray()

    @property
    def current(self) -> _Part:
        return self.parts[-1]

    def on_end(self) -> None:
        self.complete = True

    def on_part_begin(self) -> None:
        if len(self.parts) >= _MAX_FIELDS:
            raise MalformedRequest(f"too many form fields (at most {_MAX_FIELDS})")
        self.parts.append(_Part())

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self.current.headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        part = self.current
        _, options = parse_options_header(part.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise MalformedRequest("a multipart part has no name in its Content-Disposition header")
        part.name = name.decode("utf-8", "replace")
        filename = options.get(b"filename")
        part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        if part.name == FILE_FIELD and sum(p.name == FILE_FIELD for p in self.parts) > 1:
            raise MultipleFiles("send exactly one `file` per request")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.current
        part.data += data[start:end]
        if part.name == FILE_FIELD:
            if len(part.data) > self.max_file_bytes:
                raise PayloadTooLarge(
                    f"the file is larger than the limit of {self.max_file_bytes:,} bytes (MAX_FILE_SIZE_MB)",
                    max_bytes=self.max_file_bytes,
                )
        elif len(part.data) > self.max_field_bytes:
            raise FieldTooLarge(
                f"form field {part.name!r} is larger than {self.max_field_bytes:,} bytes",
                field=part.name,
                max_bytes=self.max_field_bytes,
            )


async def _next_chunk(chunks: AsyncIterator[bytes], idle_timeout_s: float) -> bytes | None:
    """The body's next chunk (None at its end); `UploadTimeout` when none arrives for `idle_timeout_s`."""
    try:
        async with asyncio.timeout(idle_timeout_s):
            return await anext(chunks)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise UploadTimeout(
            f"no byte of the upload arrived for {idle_timeout_s:g}s (UPLOAD_IDLE_TIMEOUT_S)",
            idle_timeout_s=idle_timeout_s,
        ) from None


async def read_upload(
    request: Request, *, max_file_bytes: int, max_field_bytes: int, timeout_s: float, idle_timeout_s: float
) -> Upload:
    """Read and check the multipart body as it arrives.

    Two clocks: `idle_timeout_s` without a byte means a stalled client; `timeout_s` caps the whole upload,
    so a slow but live client (15 KB/s on a poor link) is read to the end while a stalled one is cut early.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise MalformedRequest("send the document as multipart/form-data with the field `file`")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_file_bytes + _MULTIPART_OVERHEAD:
        raise PayloadTooLarge(
            f"the request body is {int(declared):,} bytes; the file limit is {max_file_bytes:,} bytes "
            "(MAX_FILE_SIZE_MB)",
            max_bytes=max_file_bytes,
        )
    collector = _Collector(max_file_bytes, max_field_bytes)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": collector.on_part_begin,
            "on_part_data": collector.on_part_data,
            "on_header_field": collector.on_header_field,
            "on_header_value": collector.on_header_value,
            "on_header_end": collector.on_header_end,
            "on_headers_finished": collector.on_headers_finished,
            "on_end": collector.on_end,
        },
    )
    try:
        chunks = request.stream()
        async with asyncio.timeout(timeout_s):
            while (chunk := await _next_chunk(chunks, idle_timeout_s)) is not None:
                parser.write(chunk)
        parser.finalize()
    except TimeoutError:
        raise UploadTimeout(f"the upload did not complete within {timeout_s:g}s (UPLOAD_TIMEOUT_S)") from None
    except FormParserError as exc:
        raise MalformedRequest(f"invalid multipart body: {exc}") from None
    if not collector.complete:
        raise MalformedRequest("the multipart body ended before its closing boundary (truncated upload?)")

    files = [part for part in collector.parts if part.name == FILE_FIELD]
    if not files:
        raise MissingFile("the request has no `file` field: send the document as multipart field `file`")
    fields = {
        part.name: bytes(part.data).decode("utf-8", "replace") for part in collector.parts if part.name != FILE_FIELD
    }
    return Upload(data=bytes(files[0].data), filename=files[0].filename, fields=fields)
