"""The upload reader against real clients on loopback: slow and stalled senders.

Requests go over raw sockets (`tests.hostile.cases.send`, or by hand), so what the
server sees is exactly what a slow client on a real network would send.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ServiceFactory, make_settings
from tests.hostile.cases import HttpRequest, Part, form_type, good_png, multipart, send
from tests.support.documents import make_pdf, make_png
from tests.support.openai_stub import StubVLLM

HOST = "127.0.0.1"
IDLE_S = 1.0  # UPLOAD_IDLE_TIMEOUT_S in these tests: a tenth of a second between pieces is live


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_a_slow_but_steady_upload_is_read(vllm_service: ServiceFactory) -> None:
    """Bytes keep arriving for longer than the idle timeout (and than the old total timeout): still read."""
    url = vllm_service(upload_idle_timeout_s=IDLE_S, upload_timeout_s=120)
    body = multipart([Part("file", good_png(), "a.png", "image/png")])
    pieces = 30  # one every 0.1 s: about 3 s in all, three times the idle timeout

    def trickle() -> Iterator[bytes]:
        size = -(-len(body) // pieces)
        for start in range(0, len(body), size):
            yield body[start : start + size]

    outcome = send(HttpRequest(form_type(), trickle, pause_s=0.1), HOST, _port(url))
    assert outcome.status == 200, outcome.body
    assert json.loads(outcome.body)["text"] == "page 7"


def test_a_stalled_upload_gets_408(vllm_service: ServiceFactory) -> None:
    """Half the body, then nothing: refused once no byte came for UPLOAD_IDLE_TIMEOUT_S."""
    url = vllm_service(upload_idle_timeout_s=IDLE_S, upload_timeout_s=120)
    body = multipart([Part("file", good_png(), "a.png", "image/png")])
    head = (
        f"POST /api/inference HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {form_type()}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((HOST, _port(url)), timeout=30) as sock:
        sock.sendall(head + body[: len(body) // 2])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer[:300]
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "upload_timeout"
    assert "UPLOAD_IDLE_TIMEOUT_S" in error["message"]


def test_a_client_that_leaves_mid_upload_is_no_server_error(
    vllm_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Half a body, then the client closes: nothing to answer and nothing went wrong on the server's side (no
    "Exception in ASGI application"), and the next request is served as usual."""
    url = vllm_service()
    body = multipart([Part("file", good_png(), "a.png", "image/png")])
    head = (f"POST /api/inference HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {form_type()}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((HOST, _port(url)), timeout=10) as client:
        client.sendall(head + body[: len(body) // 2])
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1000) == b""  # no answer: the client is gone
    response = httpx.post(f"{url}/api/inference", files={"file": ("a.png", good_png(), "image/png")}, timeout=30)
    assert response.status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_default_total_cap_lets_a_slow_client_send_a_full_size_file() -> None:
    """At 15 KB/s (a poor mobile link) a file of MAX_FILE_SIZE_MB must fit in UPLOAD_TIMEOUT_S by default."""
    settings = make_settings()
    assert settings.upload_timeout_s >= settings.max_file_bytes / 15_000
    assert settings.upload_idle_timeout_s < settings.upload_timeout_s


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


@pytest.mark.parametrize("path", ["/api/inference", "/api/jobs", "/web/render"])
def test_unknown_form_fields_are_refused_by_name(vllm_service: ServiceFactory, stub: StubVLLM, path: str) -> None:
    """`page=2` (for `pages`) used to OCR the whole document without a word."""
    url = vllm_service()
    files = {"file": ("doc.pdf", make_pdf(3))}
    response = httpx.post(f"{url}{path}", files=files, data={"page": "2", "lang": "fr"}, timeout=30)
    error = _error(response, 422, "unknown_field")
    assert error["details"]["fields"] == ["lang", "page"]
    assert "`page`" in error["message"]
    assert "pages" in error["details"]["accepted"]
    assert stub.requests == []  # nothing was read


@pytest.mark.parametrize("path", ["/api/inference", "/api/jobs", "/web/render"])
def test_query_parameters_are_refused_by_name(vllm_service: ServiceFactory, path: str) -> None:
    url = vllm_service()
    response = httpx.post(f"{url}{path}?pages=2", files={"file": ("doc.pdf", make_pdf(3))}, timeout=30)
    error = _error(response, 422, "unknown_field")
    assert error["details"]["fields"] == ["pages"]
    assert "query" in error["message"]


def test_jobs_take_callback_url_but_inference_does_not(vllm_service: ServiceFactory) -> None:
    url = vllm_service()
    files = {"file": ("doc.pdf", make_pdf(1))}
    data = {"callback_url": "https://example.com/hook"}
    assert httpx.post(f"{url}/api/jobs", files=files, data=data, timeout=30).status_code == 202
    response = httpx.post(f"{url}/api/inference", files=files, data=data, timeout=30)
    assert _error(response, 422, "unknown_field")["details"]["fields"] == ["callback_url"]


def test_known_fields_still_work(vllm_service: ServiceFactory) -> None:
    url = vllm_service()
    files = {"file": ("doc.pdf", make_pdf(3))}
    response = httpx.post(f"{url}/api/inference", files=files, data={"pages": "2", "password": ""}, timeout=30)
    assert response.status_code == 200, response.text
    assert [page["text"] for page in response.json()["pages"]] == ["page 2"]


def test_a_file_under_another_name_is_missing_file_with_a_hint(vllm_service: ServiceFactory) -> None:
    """A 100 KB document sent as `document` used to get 413 field_too_large (it is over MAX_FIELD_SIZE_KB)."""
    url = vllm_service()
    document = make_png(600, 600, page_id=3) + b"\0" * 100_000
    response = httpx.post(f"{url}/api/inference", files={"document": ("a.png", document)}, timeout=30)
    error = _error(response, 422, "missing_file")
    assert error["details"]["received_as"] == "document"
    assert "`document`" in error["message"]
    assert "`file`" in error["message"]


def test_a_document_as_a_plain_field_under_another_name_is_missing_file(vllm_service: ServiceFactory) -> None:
    """`curl -F 'document=<a.png'` sends the bytes with no filename: too big for a form value, so named too."""
    url = vllm_service()
    document = make_png(600, 600, page_id=3) + b"\0" * 100_000
    response = httpx.post(f"{url}/api/inference", files={"document": (None, document)}, timeout=30)
    assert _error(response, 422, "missing_file")["details"]["received_as"] == "document"


def _urllib_post(url: str, body: bytes, boundary: str, *, chunked: bool) -> tuple[int, dict[str, Any]]:
    """POST the way urllib does: the whole body first (with `Connection: close`), then read the answer."""
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    data: bytes | Iterator[bytes] = body
    if chunked:  # no Content-Length: urllib sends an iterable chunked
        data = (body[start : start + 65536] for start in range(0, len(body), 65536))
    request = urllib.request.Request(f"{url}/api/inference", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversize_upload_from_a_client_that_reads_only_at_the_end_gets_the_413(
    vllm_service: ServiceFactory, chunked: bool
) -> None:
    """urllib writes the whole body before reading: it used to see a connection reset, not the answer."""
    url = vllm_service(max_file_size_mb=1)
    boundary = "lingering"
    # 12 MB: well past what the kernel's socket buffers absorb, within what the service reads and drops.
    body = multipart([Part("file", b"%PDF-" + b"0" * 12_000_000, "big.pdf")], boundary)
    status, answer = _urllib_post(url, body, boundary, chunked=chunked)
    assert status == 413
    assert answer["error"]["code"] == "file_too_large"
    # The connection was left in order: the service answers the next request at once.
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_unknown_parts_together_are_held_to_the_file_limit(vllm_service: ServiceFactory) -> None:
    """Unknown parts are dropped as they arrive; several of them still cannot make the body exceed the limit."""
    url = vllm_service(max_file_size_mb=1)
    parts = [Part(f"extra{i}", b"x" * 900_000, f"{i}.bin") for i in range(4)] + [Part("file", good_png(), "a.png")]

    def chunked() -> Iterator[bytes]:  # no Content-Length: only reading can refuse it
        yield multipart(parts)

    outcome = send(HttpRequest(form_type(), chunked), HOST, _port(url))
    assert outcome.status == 413, outcome.body
    assert json.loads(outcome.body)["error"]["code"] == "file_too_large"
