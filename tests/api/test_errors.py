"""Every client-visible error: exact HTTP status, stable code, one JSON shape."""

from __future__ import annotations

import logging
import select
import socket
from typing import Any

import httpx
import pytest

from tests.conftest import ServiceFactory
from tests.support.documents import make_image, make_pdf, make_png
from tests.support.http import free_port
from tests.support.openai_stub import StubVLLM

Files = dict[str, Any]


def post(url: str, files: Any = None, data: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/api/inference", files=files, data=data, timeout=30, **kwargs)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return body


@pytest.fixture
def url(vllm_service: ServiceFactory) -> str:
    return vllm_service(max_pages=3, max_file_size_mb=1, max_image_pixels=4_000_000)


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("page.png", b"<html><body>not an image</body></html>"),
        ("page.png", b"PK\x03\x04" + b"\0" * 100),  # a zip
        ("notes.txt", b"plain text"),
    ],
)
def test_unsupported_type_is_415(url: str, name: str, payload: bytes) -> None:
    body = assert_error(post(url, {"file": (name, payload)}), 415, "unsupported_media_type")
    assert "pdf" in body["error"]["details"]["supported"]


def test_type_comes_from_bytes_not_name(url: str) -> None:
    response = post(url, {"file": ("scan.pdf", make_png(200, 300, page_id=7), "application/pdf")})
    assert response.status_code == 200
    assert response.json()["pages"][0]["text"] == "page 7"


def test_empty_file_is_422(url: str) -> None:
    assert_error(post(url, {"file": ("a.pdf", b"")}), 422, "empty_document")


@pytest.mark.parametrize(
    "payload",
    [
        make_pdf(1)[:200],  # truncated PDF
        b"%PDF-1.7\n" + b"garbage" * 50,
        make_png(300, 300)[:100],  # truncated PNG
        make_image("JPEG", 300, 300)[:300],  # truncated JPEG
    ],
)
def test_corrupt_document_is_422(url: str, payload: bytes) -> None:
    assert_error(post(url, {"file": ("x", payload)}), 422, "corrupt_document")


def test_encrypted_pdf(url: str) -> None:
    pdf = make_pdf(2, password="s3cret")
    assert_error(post(url, {"file": ("x.pdf", pdf)}), 422, "password_required")
    assert_error(post(url, {"file": ("x.pdf", pdf)}, {"password": "nope"}), 422, "wrong_password")
    response = post(url, {"file": ("x.pdf", pdf)}, {"password": "s3cret"})
    assert response.status_code == 200
    assert [page["text"] for page in response.json()["pages"]] == ["page 1", "page 2"]


def test_too_many_pages_is_refused_not_cut(url: str, stub: StubVLLM) -> None:
    body = assert_error(post(url, {"file": ("x.pdf", make_pdf(5))}), 422, "too_many_pages")
    assert body["error"]["details"] == {"pages_selected": 5, "max_pages": 3}
    assert stub.requests == []  # refused before any page reached the engine
    # The same document with a selection within the limit is served, those pages only.
    selected = post(url, {"file": ("x.pdf", make_pdf(5))}, {"pages": "2-4"})
    assert selected.status_code == 200, selected.text
    pages = [(page["page"], page["text"]) for page in selected.json()["pages"]]
    assert pages == [(2, "page 2"), (3, "page 3"), (4, "page 4")]


@pytest.mark.parametrize("pages", ["abc", "0", "3-1", "9", "1-9", "-2", "1,,2"])
def test_bad_pages_value_is_422(url: str, pages: str) -> None:
    assert_error(post(url, {"file": ("x.pdf", make_pdf(3))}, {"pages": pages}), 422, "invalid_pages")


def test_image_over_pixel_limit_is_422(url: str) -> None:
    big = make_png(3000, 2000)  # 6 MP > 4 MP limit, a few KB on the wire
    body = assert_error(post(url, {"file": ("big.png", big)}), 422, "image_too_large")
    assert body["error"]["details"]["width"] == 3000


def test_missing_file_field(url: str) -> None:
    assert_error(post(url, {"document": ("x.pdf", make_pdf(1))}), 422, "missing_file")


def test_not_multipart_is_400(url: str) -> None:
    response = httpx.post(f"{url}/api/inference", content=make_pdf(1), headers={"content-type": "application/pdf"})
    assert_error(response, 400, "malformed_request")


def test_two_files_is_400(url: str) -> None:
    files = [("file", ("a.pdf", make_pdf(1))), ("file", ("b.pdf", make_pdf(1)))]
    assert_error(post(url, files), 400, "multiple_files")


def test_oversized_upload_is_413_by_declared_length(url: str) -> None:
    body = assert_error(post(url, {"file": ("big.pdf", b"%PDF-" + b"0" * 2_000_000)}), 413, "file_too_large")
    assert body["error"]["details"]["max_bytes"] == 1024 * 1024


def test_oversized_field_is_413(url: str) -> None:
    response = post(url, {"file": ("x.pdf", make_pdf(1))}, {"pages": "1" * 100_000})
    assert_error(response, 413, "field_too_large")


def test_oversized_chunked_upload_is_refused_while_reading(url: str) -> None:
    """No Content-Length: the server must stop reading soon after the limit, not buffer the body."""
    port = int(url.rsplit(":", 1)[1])
    limit = 1024 * 1024
    boundary = "xyz"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.pdf"\r\n\r\n%PDF-').encode()
    chunk = b"0" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /api/inference HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=" + boundary.encode() + b"\r\n\r\n"
        )
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        while sent < 100 * limit:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        sock.settimeout(10)
        received = b""
        while b'"file_too_large"' not in received and (data := sock.recv(65536)):
            received += data
        answer = received.decode("latin-1")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert '"file_too_large"' in answer
    # Kernel socket buffers hold a few MB at most; the server itself stopped at the limit.
    assert sent < 20 * limit


def test_unknown_route_uses_error_shape(url: str) -> None:
    assert_error(httpx.get(f"{url}/nope"), 404, "not_found")


def test_vllm_unreachable_is_503_with_retry_after(vllm_service: ServiceFactory) -> None:
    url = vllm_service(vllm_base_url=f"http://127.0.0.1:{free_port()}/v1", vllm_max_retries=1, retry_after_s=7)
    response = post(url, {"file": ("a.png", make_png(200, 200))})
    assert_error(response, 503, "engine_unavailable")
    assert response.headers["retry-after"] == "7"
    ready = httpx.get(f"{url}/ready")
    assert_error(ready, 503, "engine_unavailable")
    assert ready.headers["retry-after"] == "7"
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_vllm_serving_another_model_is_not_ready(vllm_service: ServiceFactory) -> None:
    url = vllm_service(model_name="someone/else")
    body = assert_error(httpx.get(f"{url}/ready"), 503, "engine_unavailable")
    assert "someone/else" in body["error"]["message"]


def test_max_new_tokens_beyond_server_context_is_not_ready(vllm_service: ServiceFactory) -> None:
    """The stub reports max_model_len 16384, like vLLM's /v1/models."""
    url = vllm_service(max_new_tokens=20000)
    body = assert_error(httpx.get(f"{url}/ready"), 503, "engine_unavailable")
    assert "MAX_NEW_TOKENS" in body["error"]["message"]


def test_not_ready_probes_log_at_debug_not_warning(
    vllm_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Orchestrators probe /ready every few seconds: a 503 there is an answer, not an incident to warn about."""
    caplog.set_level(logging.DEBUG, logger="app.api.errors")
    url = vllm_service(model_name="someone/else")  # never ready: the stub serves another model
    for _ in range(5):
        assert_error(httpx.get(f"{url}/ready"), 503, "engine_unavailable")
    probes = [r for r in caplog.records if r.name == "app.api.errors" and "/ready" in r.getMessage()]
    assert len(probes) == 5
    assert all(r.levelno == logging.DEBUG for r in probes), [(r.levelname, r.getMessage()) for r in probes]
    # A request that fails for the same reason is worth a warning.
    assert post(url, {"file": ("a.png", make_png(200, 200))}).status_code >= 500
    inference = [r for r in caplog.records if r.name == "app.api.errors" and "/api/inference" in r.getMessage()]
    assert [r.levelno for r in inference] == [logging.WARNING]
