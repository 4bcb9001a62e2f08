"""Overload and time, end to end: a full queue answers 503 at once, deadlines answer 504, and a
client that leaves stops costing engine time. The stub holds pages behind a `Gate` so every
ordering is forced by events, never by sleeping.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import ServiceFactory
from tests.support.documents import make_png, small_pdf
from tests.support.gate import Gate
from tests.support.http import ok, post
from tests.support.openai_stub import StubVLLM


@pytest.fixture
def gate(stub: StubVLLM) -> Iterator[Gate]:
    held = Gate()
    stub.responder = held
    yield held
    held.open()  # never leave the stub's requests hanging


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as executor:
        yield executor


# --------------------------------------------------------------------------- MAX_QUEUED_PAGES


def test_full_queue_refuses_at_once_and_loses_nothing(
    vllm_service: ServiceFactory, stub: StubVLLM, gate: Gate, pool: ThreadPoolExecutor
) -> None:
    url = vllm_service(max_queued_pages=4, max_concurrent_pages=4)
    admitted: list[Future[httpx.Response]] = [pool.submit(post, url, small_pdf(2)) for _ in range(2)]
    stub.wait_until(lambda s: s.in_flight == 4)  # both documents admitted, all 4 pages held

    refused = post(url, make_png(300, 300, page_id=9), "one.png")
    assert stub.in_flight == 4  # answered while the others are still held
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "5"
    error = refused.json()["error"]
    assert error["code"] == "overloaded"
    assert "MAX_QUEUED_PAGES=4" in error["message"]
    assert 9 not in gate.seen

    gate.open()
    for future in admitted:
        body = ok(future.result(timeout=30))
        assert [page["text"] for page in body["pages"]] == ["page 1", "page 2"]
    # The queue drained: the same request is served now.
    assert ok(post(url, make_png(300, 300, page_id=9), "one.png"))["text"] == "page 9"


# --------------------------------------------------------------------------- REQUEST_TIMEOUT_S


def test_request_deadline_answers_504_and_starts_no_more_pages(
    vllm_service: ServiceFactory, stub: StubVLLM, pool: ThreadPoolExecutor
) -> None:
    gate = Gate(answer_first=2)  # whichever two pages reach vLLM first are answered, the rest held
    stub.responder = gate
    try:
        url = vllm_service(max_concurrent_pages=2, request_timeout_s=1.5)
        response = post(url, small_pdf(10))
    finally:
        gate.open()
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "request_timeout"
    assert error["details"] == {"pages_done": 2, "pages_total": 10}
    # Two pages were answered, two more took the engine slots and were aborted; six never reached vLLM.
    stub.wait_until(lambda s: s.in_flight == 0)
    assert len(stub.requests) == 4
    assert len(set(gate.seen)) == 4
    assert stub.completed == 2
    assert stub.cancelled == 2
    assert stub.max_in_flight == 2  # the two held pages were in flight together: the bound was used, never passed


# --------------------------------------------------------------------------- client disconnect


def raw_upload(port: int, content: bytes) -> socket.socket:
    """Send a complete multipart upload on a raw socket and return it unread (the client then just leaves)."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="doc.pdf"\r\n'
            f"Content-Type: application/pdf\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /api/inference HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head + body)
    return sock


def test_client_disconnect_drops_pages_not_started(vllm_service: ServiceFactory, stub: StubVLLM, gate: Gate) -> None:
    url = vllm_service(max_concurrent_pages=2)
    port = int(url.rsplit(":", 1)[1])
    sock = raw_upload(port, small_pdf(10))
    stub.wait_until(lambda s: s.in_flight == 2)
    sock.close()  # the client gives up

    stub.wait_until(lambda s: s.cancelled == 2)  # the service hung up on vLLM for both pages in flight
    gate.open()
    # A later request completes, so anything the abandoned document could still send would have been sent.
    assert ok(post(url, make_png(300, 300, page_id=42), "one.png"))["text"] == "page 42"
    abandoned = [n for n in gate.seen if n != 42]
    assert len(abandoned) == 2  # only the two pages that held engine slots; eight never reached vLLM
    assert set(abandoned) <= {1, 2, 3, 4}  # pages start in document order (a few rendered ahead)
    assert len(stub.requests) == 3


def test_streaming_client_disconnect_drops_pages_not_started(
    vllm_service: ServiceFactory, stub: StubVLLM, gate: Gate
) -> None:
    """Closing a stream aborts its two pages in flight at vLLM and drops the eight never started."""
    url = vllm_service(max_concurrent_pages=2)
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{url}/api/inference",
            files={"file": ("doc.pdf", small_pdf(10))},
            headers={"Accept": "application/x-ndjson"},
        ) as response,
    ):
        assert response.status_code == 200
        stub.wait_until(lambda s: s.in_flight == 2)
    stub.wait_until(lambda s: s.cancelled == 2, timeout=10)  # the service hung up on vLLM for both
    # The service noticed: the document's admission was released (the queue gauge is back to 0).
    deadline = time.monotonic() + 10
    while "lightonocr_queued_pages 0.0" not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline, "the service never released the abandoned document"
        time.sleep(0.02)
    gate.open()
    assert ok(post(url, make_png(300, 300, page_id=42), "one.png"))["text"] == "page 42"
    assert len([n for n in gate.seen if n != 42]) == 2
    assert len(stub.requests) == 3
