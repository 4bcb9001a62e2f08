"""The streaming multipart reader's limits, at their exact boundaries (no server: a request fed chunk by chunk)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from starlette.requests import Request
from starlette.types import Message

from app.api.upload import Upload, read_upload
from app.errors import FieldTooLarge, MalformedRequest, MissingFile, MultipleFiles, PayloadTooLarge
from tests.conftest import make_settings

pytestmark = pytest.mark.anyio

BOUNDARY = "test-boundary-7d1f"
LIMIT = 10_000
FIELD_LIMIT = 100


def multipart(file: bytes | None, **fields: str) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    if file is not None:
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="doc.pdf"\r\n'
            "Content-Type: application/pdf\r\n\r\n".encode()
            + file
            + b"\r\n"
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def request_of(body: bytes, *, chunk: int = 4096, declare_length: bool = True) -> Request:
    chunks: Sequence[bytes] = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    pending = list(chunks)

    async def receive() -> Message:
        data = pending.pop(0)
        return {"type": "http.request", "body": data, "more_body": bool(pending)}

    headers = [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]
    if declare_length:
        headers.append((b"content-length", str(len(body)).encode()))
    return Request({"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": headers}, receive)


async def read(body: bytes, *, limit: int = LIMIT, **options: int | bool) -> Upload:
    return await read_upload(
        request_of(body, **options),  # type: ignore[arg-type]
        max_file_bytes=limit,
        max_field_bytes=FIELD_LIMIT,
        timeout_s=10,
        idle_timeout_s=10,
    )


@pytest.mark.parametrize("chunk", [1000, 4096, LIMIT + 500])
@pytest.mark.parametrize("declare_length", [True, False])
async def test_a_file_of_exactly_the_limit_is_accepted(chunk: int, declare_length: bool) -> None:
    data = bytes(range(256)) * (LIMIT // 256) + b"x" * (LIMIT % 256)
    assert len(data) == LIMIT
    upload = await read(multipart(data, pages="1-2"), chunk=chunk, declare_length=declare_length)
    assert upload.data == data
    assert upload.filename == "doc.pdf"
    assert upload.fields == {"pages": "1-2"}


@pytest.mark.parametrize("chunk", [1000, 4096, LIMIT + 500])
@pytest.mark.parametrize("declare_length", [True, False])
async def test_one_byte_more_is_refused(chunk: int, declare_length: bool) -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        await read(multipart(b"x" * (LIMIT + 1)), chunk=chunk, declare_length=declare_length)
    assert caught.value.details == {"max_bytes": LIMIT}
    assert "10,000 bytes" in caught.value.message


async def test_a_declared_length_past_the_limit_and_overhead_is_refused_before_reading() -> None:
    body = multipart(b"x" * 10)

    async def never(*_: object) -> Message:
        raise AssertionError("the body was read")

    headers = [
        (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
        (b"content-length", str(LIMIT + 64 * 1024 + 1).encode()),
    ]
    request = Request({"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": headers}, never)
    with pytest.raises(PayloadTooLarge):
        await read_upload(request, max_file_bytes=LIMIT, max_field_bytes=FIELD_LIMIT, timeout_s=10, idle_timeout_s=10)
    # Declared exactly at limit + overhead: read, and judged by what arrives.
    assert len(body) < LIMIT
    headers[1] = (b"content-length", str(LIMIT + 64 * 1024).encode())
    chunks = [body]

    async def receive() -> Message:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": headers}, receive)
    upload = await read_upload(
        request, max_file_bytes=LIMIT, max_field_bytes=FIELD_LIMIT, timeout_s=10, idle_timeout_s=10
    )
    assert upload.data == b"x" * 10


async def test_a_field_of_exactly_its_limit_is_accepted_one_byte_more_is_refused() -> None:
    upload = await read(multipart(b"%PDF-", pages="1" * FIELD_LIMIT))
    assert upload.fields["pages"] == "1" * FIELD_LIMIT
    with pytest.raises(FieldTooLarge) as caught:
        await read(multipart(b"%PDF-", pages="1" * (FIELD_LIMIT + 1)))
    assert caught.value.details == {"field": "pages", "max_bytes": FIELD_LIMIT}
    assert caught.value.message == "form field 'pages' is larger than 100 bytes"


async def test_the_file_limit_does_not_apply_to_fields_nor_the_field_limit_to_the_file() -> None:
    upload = await read(multipart(b"y" * (FIELD_LIMIT * 10)))
    assert len(upload.data) == FIELD_LIMIT * 10


async def test_missing_and_repeated_files() -> None:
    with pytest.raises(MissingFile):
        await read(multipart(None, pages="1"))
    two = multipart(b"a").removesuffix(f"--{BOUNDARY}--\r\n".encode()) + multipart(b"b")
    with pytest.raises(MultipleFiles):
        await read(two)


async def test_a_body_without_its_closing_boundary_is_malformed() -> None:
    with pytest.raises(MalformedRequest):
        await read(multipart(b"abc").removesuffix(f"--{BOUNDARY}--\r\n".encode()))


@pytest.mark.parametrize(("megabytes", "size"), [(10, 10 * 1024 * 1024), (0.5, 524_288), (1.25, 1_310_720)])
def test_max_file_size_mb_is_in_mebibytes(megabytes: float, size: int) -> None:
    assert make_settings(max_file_size_mb=megabytes).max_file_bytes == size


async def test_everything_read_is_held_to_the_file_limit_plus_the_multipart_overhead() -> None:
    """Without a Content-Length, big fields before the file count too: at most MAX_FILE_SIZE_MB + 64 KiB in all."""
    overhead = 64 * 1024

    async def read_big_fields(field: str) -> Upload:
        request = request_of(multipart(b"x" * LIMIT, pages=field), declare_length=False)
        return await read_upload(
            request, max_file_bytes=LIMIT, max_field_bytes=2 * overhead, timeout_s=10, idle_timeout_s=10
        )

    upload = await read_big_fields("1" * overhead)
    assert len(upload.data) == LIMIT
    with pytest.raises(PayloadTooLarge):
        await read_big_fields("1" * (overhead + 1))
