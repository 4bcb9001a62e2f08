"""Streaming multipart reader that enforces size limits while the body arrives.

Starlette's form parser spools whole uploads to disk before a handler can look
at them; here the limit is checked on every chunk, so an oversized upload is
refused after at most MAX_FILE_SIZE_MB (plus one chunk) has been read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import (
    ClientDisconnected,
    FieldTooLarge,
    MalformedRequest,
    MissingFile,
    MultipleFiles,
    PayloadTooLarge,
    UnknownField,
    UploadTimeout,
)

FILE_FIELD = "file"
# The form fields besides `file` a route takes when its OpenAPI body does not say (the web page's render).
UPLOAD_FIELDS = frozenset({"pages", "password"})
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
    size: int = 0
    known: bool = True  # unknown parts are measured and named, their bytes dropped


class _Collector:
    """python-multipart callbacks; raises as soon as a limit is crossed."""

    def __init__(self, max_file_bytes: int, max_field_bytes: int, accepted: frozenset[str]) -> None:
        self.max_file_bytes = max_file_bytes
        self.max_field_bytes = max_field_bytes
        self.accepted = accepted
        self.received = 0  # all parts' bytes: a chunked body is held to what a declared length would be
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
        part.known = part.name == FILE_FIELD or part.name in self.accepted
        if part.name == FILE_FIELD and sum(p.name == FILE_FIELD for p in self.parts) > 1:
            raise MultipleFiles("send exactly one `file` per request")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.current
        part.size += end - start
        if part.known:
            part.data += data[start:end]
        # An unknown part is not kept: it is held to the file limit (a document under another name gets
        # `missing_file` with a hint, not a 413 for a form field).
        self.received += end - start
        if part.name == FILE_FIELD or not part.known:
            if part.size > self.max_file_bytes or self.received > self.max_file_bytes + _MULTIPART_OVERHEAD:
                raise PayloadTooLarge(
                    f"the file is larger than the limit of {self.max_file_bytes:,} bytes (MAX_FILE_SIZE_MB)",
                    max_bytes=self.max_file_bytes,
                )
        elif part.size > self.max_field_bytes:
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
    except ClientDisconnect:  # the client left mid-upload: nobody to answer, and nothing went wrong here
        raise ClientDisconnected("the client disconnected before the upload ended") from None
    except TimeoutError:
        raise UploadTimeout(
            f"no byte of the upload arrived for {idle_timeout_s:g}s (UPLOAD_IDLE_TIMEOUT_S)",
            idle_timeout_s=idle_timeout_s,
        ) from None


def accepted_fields(request: Request) -> frozenset[str]:
    """The form fields besides `file` this route takes: those its documented body lists, else UPLOAD_FIELDS.

    The OpenAPI body (`upload_schema`) is the one list, so /docs and the refusal of other fields agree
    (/api/jobs documents `callback_url` too).
    """
    extra = getattr(request.scope.get("route"), "openapi_extra", None)
    try:
        properties = extra["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]  # type: ignore[index]
    except (KeyError, TypeError):
        return UPLOAD_FIELDS
    return frozenset(str(name) for name in properties) - {FILE_FIELD}


def _listed(names: list[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


async def read_upload(
    request: Request, *, max_file_bytes: int, max_field_bytes: int, timeout_s: float, idle_timeout_s: float
) -> Upload:
    """Read and check the multipart body as it arrives.

    Two clocks: `idle_timeout_s` without a byte means a stalled client; `timeout_s` caps the whole upload,
    so a slow but live client (15 KB/s on a poor link) is read to the end while a stalled one is cut early.
    Fields the route does not take are refused by name (a `page=2` must not read the whole document), and
    so is any query parameter: these routes take none.
    """
    accepted = accepted_fields(request)
    if request.query_params:
        names = sorted(set(request.query_params.keys()))
        raise UnknownField(
            f"unknown query parameter(s) {_listed(names)}: send {_listed(sorted(accepted))} as multipart form "
            "fields, next to `file`",
            fields=names,
            accepted=[FILE_FIELD, *sorted(accepted)],
        )
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
    collector = _Collector(max_file_bytes, max_field_bytes, accepted)
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
    unknown = sorted({part.name for part in collector.parts if not part.known})
    if not files:
        misplaced = [
            part.name
            for part in collector.parts
            if not part.known and (part.filename is not None or part.size > max_field_bytes)
        ]
        if misplaced:
            raise MissingFile(
                f"the request has no `file` field: a file arrived as {_listed(misplaced[:1])}; "
                "send the document under the field name `file`",
                received_as=misplaced[0],
            )
        also = f" (it has {_listed(unknown)})" if unknown else ""
        raise MissingFile(f"the request has no `file` field{also}: send the document as multipart field `file`")
    if unknown:
        raise UnknownField(
            f"unknown form field(s) {_listed(unknown)}: this route takes {_listed([FILE_FIELD, *sorted(accepted)])}",
            fields=unknown,
            accepted=[FILE_FIELD, *sorted(accepted)],
        )
    fields = {
        part.name: bytes(part.data).decode("utf-8", "replace") for part in collector.parts if part.name != FILE_FIELD
    }
    return Upload(data=bytes(files[0].data), filename=files[0].filename, fields=fields)


# Lingering close (nginx's lingering_time / lingering_timeout): after refusing a request whose body is still
# arriving, read and drop the rest for at most this long, and stop when none arrives for LINGER_IDLE_S.
LINGER_S = 30.0
LINGER_IDLE_S = 5.0
LINGER_MIN_BYTES = 64 * 1024 * 1024  # at most max(4 x MAX_FILE_SIZE_MB, this) is read and dropped


class LingeringClose:
    """Reads and drops the rest of a refused upload, so clients that write the whole body first see the answer.

    Refusing an oversized upload early (413 from Content-Length or after MAX_FILE_SIZE_MB) leaves the rest of
    the body unread. Closing the connection then makes the kernel answer the client's next bytes with a reset,
    and a client that writes its whole body before reading (Python's urllib, many HTTP libraries) gets
    "connection reset" instead of the 413. So a 4xx answered before the body ended is sent at once, in full (a
    client reading concurrently has it immediately), and only its end is held back while the rest of the body
    is read and dropped: up to `max_bytes`, LINGER_S, and LINGER_IDLE_S without a byte. 408 is not drained (the
    client is stalled), nor a body the client was told to hold back (`Expect: 100-continue`, never continued).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        declared = headers.get("content-length", "")
        expected = int(declared) if declared.isdigit() else None
        body_done = not chunked and not expected
        continued = "100-continue" not in headers.get("expect", "").lower()
        received = 0
        status = 0

        async def watching_receive() -> Message:
            nonlocal body_done, continued, received
            continued = True  # uvicorn sends `100 Continue` on the first receive
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = body_done or not message.get("more_body", False)
            else:
                body_done = True  # disconnected: nothing more will come
            return message

        async def lingering_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                left = expected - received if expected is not None else 0
                if 400 <= status < 500 and status != 408 and not body_done and continued and left <= self.max_bytes:
                    if message.get("body"):
                        await send({**message, "more_body": True})
                    await _drop_rest(watching_receive, self.max_bytes)
                    message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, watching_receive, lingering_send)


async def _drop_rest(receive: Receive, max_bytes: int) -> None:
    """Read and drop the request body until it ends, or a bound is reached."""
    dropped = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER_S):
            while dropped <= max_bytes:
                async with asyncio.timeout(LINGER_IDLE_S):
                    message = await receive()
                if message["type"] != "http.request":
                    return
                dropped += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
