"""The vLLM stub must accept exactly the authors' request shape and behave like vLLM on the wire."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pypdfium2 as pdfium
import pytest
from PIL import Image, ImageOps, ImageSequence

from tests.support.documents import ImageFormat, make_image, make_jpeg, make_pdf, make_png, page_id_of
from tests.support.http import free_port
from tests.support.openai_stub import DEFAULT_MODEL, UNPROCESSABLE_MESSAGE, Reply, StubRequest, StubVLLM


def chat_body(png: bytes, **overrides: Any) -> dict[str, Any]:
    """The request exactly as LightOnOCR's authors send it."""
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 4096,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def post(stub: StubVLLM, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{stub.base_url}/chat/completions", json=body, timeout=10, **kwargs)


@pytest.fixture
def stub() -> Iterator[StubVLLM]:
    with StubVLLM() as server:
        yield server


def test_accepts_authors_request(stub: StubVLLM) -> None:
    png = make_png(400, 500, page_id=3)
    response = post(stub, chat_body(png))
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert data["model"] == DEFAULT_MODEL
    assert isinstance(data["created"], int)
    (choice,) = data["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "page 3"
    usage = data["usage"]
    assert usage["completion_tokens"] == 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert stub.violations == []
    assert stub.completed == 1
    (record,) = stub.requests
    assert (record.width, record.height, record.attempt, record.outcome) == (400, 500, 1, "ok")
    assert record.params.max_tokens == 4096
    assert stub.count_for(record.sha256) == 1


def test_plain_image_gets_size_description(stub: StubVLLM) -> None:
    response = post(stub, chat_body(make_png(320, 200)))
    assert response.json()["choices"][0]["message"]["content"] == "image 320x200"


def _text_and_image(body: dict[str, Any]) -> None:
    body["messages"][0]["content"].insert(0, {"type": "text", "text": "OCR this"})


def _system_message(body: dict[str, Any]) -> None:
    body["messages"].insert(0, {"role": "system", "content": "You are OCR."})


def _jpeg_prefix(body: dict[str, Any]) -> None:
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    body["messages"][0]["content"][0]["image_url"]["url"] = url.replace("image/png", "image/jpeg")


def _jpeg_bytes(body: dict[str, Any]) -> None:
    jpeg = base64.b64encode(make_jpeg(100, 100)).decode()
    body["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64," + jpeg


def _http_url(body: dict[str, Any]) -> None:
    body["messages"][0]["content"][0]["image_url"]["url"] = "https://example.com/page.png"


def _detail(body: dict[str, Any]) -> None:
    body["messages"][0]["content"][0]["image_url"]["detail"] = "high"


@pytest.mark.parametrize(
    ("overrides", "mutate", "status", "needle"),
    [
        ({"stream": False}, None, 400, "extra=['stream']"),
        ({"max_tokens": ...}, None, 400, "missing=['max_tokens']"),
        ({"max_tokens": 0}, None, 400, "max_tokens"),
        ({"max_tokens": 20000}, None, 400, "maximum context length"),
        ({"temperature": "0.2"}, None, 400, "temperature"),
        ({"top_p": 0}, None, 400, "top_p"),
        ({"model": "other/model"}, None, 404, "does not exist"),
        ({}, _text_and_image, 400, "messages must be exactly"),
        ({}, _system_message, 400, "messages must be exactly"),
        ({}, _detail, 400, "messages must be exactly"),
        ({}, _jpeg_prefix, 400, "must start with"),
        ({}, _http_url, 400, "must start with"),
        ({}, _jpeg_bytes, 400, "not a PNG"),
    ],
)
def test_rejects_violations(stub: StubVLLM, overrides: dict[str, Any], mutate: Any, status: int, needle: str) -> None:
    body = chat_body(make_png(64, 64), **overrides)
    if mutate is not None:
        mutate(body)
    response = post(stub, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status
    assert needle in error["message"]
    assert error["type"] == ("BadRequestError" if status == 400 else "NotFoundError")
    (violation,) = stub.violations
    assert needle in violation
    assert stub.requests == []
    assert stub.completed == 0


def test_rejects_oversized_and_corrupt_images(stub: StubVLLM) -> None:
    assert post(stub, chat_body(make_png(1541, 100))).status_code == 400
    assert post(stub, chat_body(make_png(100, 100)[:60])).status_code == 400
    response = post(stub, chat_body(b""), headers={})
    assert response.status_code == 400
    raw = httpx.post(f"{stub.base_url}/chat/completions", content=b"{}", timeout=5)
    assert raw.status_code == 400  # no JSON content type
    assert len(stub.violations) == 4
    assert any("exceeds longest edge 1540" in v for v in stub.violations)
    assert post(stub, chat_body(make_png(1540, 1000))).status_code == 200


@pytest.mark.parametrize("size", [(27, 900), (900, 27), (1, 1), (20, 1540)])
def test_images_with_a_side_under_28_px_get_vllms_500(stub: StubVLLM, size: tuple[int, int]) -> None:
    """As vLLM: the request is valid, but the processor cannot take the image (no 28-px merged patch)."""
    response = post(stub, chat_body(make_png(*size)))
    assert response.status_code == 500
    error = response.json()["error"]
    assert error == {"message": UNPROCESSABLE_MESSAGE, "type": "InternalServerError", "param": None, "code": 500}
    assert stub.violations == []  # not a protocol violation: the client sent a valid request
    (record,) = stub.requests
    assert (record.status, record.outcome) == (500, "error")
    assert post(stub, chat_body(make_png(28, 28))).status_code == 200


def test_models_health_and_unknown_routes(stub: StubVLLM) -> None:
    models = httpx.get(f"{stub.base_url}/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert (card["id"], card["object"], card["owned_by"], card["max_model_len"]) == (
        DEFAULT_MODEL,
        "model",
        "vllm",
        16384,
    )
    health = httpx.get(f"{stub.root_url}/health")
    assert health.status_code == 200
    assert health.content == b""
    assert httpx.get(f"{stub.base_url}/health").status_code == 404  # not under /v1
    assert stub.violations == ["unexpected GET /v1/health"]


def test_api_key() -> None:
    with StubVLLM(api_key="sekret") as stub:
        body = chat_body(make_png(50, 50))
        assert post(stub, body).status_code == 401
        bad = post(stub, body, headers={"Authorization": "Bearer nope"})
        assert (bad.status_code, bad.json()) == (401, {"error": "Unauthorized"})
        assert post(stub, body, headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(f"{stub.root_url}/health").status_code == 200  # no auth, like vLLM
        assert len(stub.violations) == 2
        assert stub.completed == 1


@pytest.mark.parametrize("size_pt", [(612, 792), (842, 595), (300, 300)])
def test_pdf_pages_round_trip_through_render_and_stub(stub: StubVLLM, size_pt: tuple[int, int]) -> None:
    document = pdfium.PdfDocument(make_pdf(4, page_size_pt=size_pt))
    texts = []
    for page in document:
        width, height = page.get_size()
        scale = min(200 / 72, 1540 / max(width, height))
        out = io.BytesIO()
        page.render(scale=scale).to_pil().convert("RGB").save(out, format="PNG")
        response = post(stub, chat_body(out.getvalue()))
        texts.append(response.json()["choices"][0]["message"]["content"])
    assert texts == ["page 1", "page 2", "page 3", "page 4"]
    assert max(max(r.width, r.height) for r in stub.requests) <= 1540
    assert stub.violations == []


def test_encrypted_pdf_needs_password() -> None:
    data = make_pdf(2, password="pw")
    with pytest.raises(pdfium.PdfiumError):
        pdfium.PdfDocument(data)
    document = pdfium.PdfDocument(data, password="pw")
    assert [page_id_of(page.render(scale=0.5).to_pil()) for page in document] == [1, 2]
    owner_only = pdfium.PdfDocument(make_pdf(1, owner_password="owner"))
    assert page_id_of(owner_only[0].render().to_pil()) == 1


def test_image_formats_carry_markers() -> None:
    formats: tuple[ImageFormat, ...] = ("PNG", "JPEG", "TIFF", "WEBP", "BMP", "GIF")
    for fmt in formats:
        assert page_id_of(Image.open(io.BytesIO(make_image(fmt, 200, 260, page_id=9)))) == 9, fmt
    for fmt in ("TIFF", "GIF", "WEBP"):
        image = Image.open(io.BytesIO(make_image(fmt, 200, 260, frames=3)))
        assert [page_id_of(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)] == [1, 2, 3], fmt
    rotated = Image.open(io.BytesIO(make_jpeg(200, 260, page_id=5, exif_orientation=6)))
    assert rotated.size == (260, 200)
    assert page_id_of(rotated) is None
    assert page_id_of(ImageOps.exif_transpose(rotated)) == 5


def test_max_in_flight_under_concurrency() -> None:
    with StubVLLM(lambda request: Reply(delay_s=0.4)) as stub:
        bodies = [chat_body(make_png(100, 100, page_id=i)) for i in range(1, 6)]

        async def run_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10) as client:
                url = f"{stub.base_url}/chat/completions"
                return await asyncio.gather(*(client.post(url, json=body) for body in bodies))

        started = time.monotonic()
        responses = asyncio.run(run_all())
        elapsed = time.monotonic() - started
        assert [r.json()["choices"][0]["message"]["content"] for r in responses] == [f"page {i}" for i in range(1, 6)]
        assert stub.max_in_flight == 5
        assert stub.in_flight == 0
        assert elapsed < 1.5  # answered concurrently, not one after another
        stub.reset()
        assert stub.max_in_flight == 0
        assert stub.requests == []


def test_attempts_error_status_and_async_responder() -> None:
    async def flaky(request: StubRequest) -> Reply:
        await asyncio.sleep(0)
        if request.attempt == 1:
            return Reply(status=503, message="engine overloaded")
        return Reply(text="ok", finish_reason="length", completion_tokens=7)

    with StubVLLM(flaky) as stub:
        body = chat_body(make_png(80, 80))
        first = post(stub, body)
        assert first.status_code == 503
        assert first.json()["error"] == {
            "message": "engine overloaded",
            "type": "ServiceUnavailableError",
            "param": None,
            "code": 503,
        }
        second = post(stub, body).json()
        assert second["choices"][0]["finish_reason"] == "length"
        assert second["usage"]["completion_tokens"] == 7
        assert [r.attempt for r in stub.requests] == [1, 2]
        assert [r.outcome for r in stub.requests] == ["error", "ok"]
        assert stub.completed == 1
        assert stub.violations == []
        assert stub.per_sha == {stub.requests[0].sha256: 2}


def test_drop_connection_gives_client_a_protocol_error() -> None:
    with StubVLLM(lambda request: Reply(drop_connection=request.attempt == 1)) as stub:
        body = chat_body(make_png(60, 60, page_id=2))
        with httpx.Client(timeout=5) as client:
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                client.post(f"{stub.base_url}/chat/completions", json=body)
            retry = client.post(f"{stub.base_url}/chat/completions", json=body)
        assert retry.json()["choices"][0]["message"]["content"] == "page 2"
        assert (stub.dropped, stub.completed, stub.violations) == (1, 1, [])
        assert [r.outcome for r in stub.requests] == ["dropped", "ok"]


def test_client_disconnect_cancels_request() -> None:
    with StubVLLM(lambda request: Reply(delay_s=5)) as stub:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{stub.base_url}/chat/completions", json=chat_body(make_png(30, 30)), timeout=0.3)
        stub.wait_until(lambda s: s.cancelled == 1, timeout=3)
        assert stub.in_flight == 0
        assert stub.completed == 0
        assert stub.requests[0].outcome == "cancelled"


def test_clean_shutdown_leaves_no_threads() -> None:
    before = set(threading.enumerate())
    with StubVLLM(lambda request: Reply(delay_s=0.05)) as stub:
        assert post(stub, chat_body(make_png(40, 40))).status_code == 200
        port = stub.port
    assert set(threading.enumerate()) <= before
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")


def test_cli_serves() -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "tests.support.openai_stub", "--port", str(port), "--latency-ms", "10"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                time.sleep(0.05)
        body = chat_body(make_png(40, 40, page_id=4))
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=5)
        assert response.json()["choices"][0]["message"]["content"] == "page 4"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert "completed=1" in output
    assert "violations=0" in output


def test_stop_with_request_in_flight_drops_it() -> None:
    stub = StubVLLM(lambda request: Reply(delay_s=30)).start()
    errors: list[Exception] = []

    def call() -> None:
        try:
            post(stub, chat_body(make_png(40, 40)))
        except httpx.HTTPError as exc:
            errors.append(exc)

    client = threading.Thread(target=call)
    client.start()
    stub.wait_until(lambda s: s.in_flight == 1)
    started = time.monotonic()
    stub.stop()  # ~1 s of grace, then in-flight requests are dropped
    client.join()
    assert time.monotonic() - started < 5
    assert [type(e) for e in errors] == [httpx.RemoteProtocolError]
    assert [r.outcome for r in stub.requests] == ["dropped"]
