"""X-Request-ID: taken from the caller or generated, echoed back, and on every log line of the request.

Logs are read the way an operator gets them: the service's JSON lines on stderr.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pytest

from tests.conftest import ServiceFactory
from tests.support.documents import make_pdf, page_id_of
from tests.support.openai_stub import Reply, StubRequest, StubVLLM, describe

PAGE_PT = (144, 180)
GENERATED = re.compile(r"[0-9a-f]{32}")


def json_lines(captured: str) -> list[dict[str, Any]]:
    lines = []
    for line in captured.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def lines_of(capsys: pytest.CaptureFixture[str], rid: str) -> list[dict[str, Any]]:
    """The request's lines, once its access line is out: the server logs it after the last byte is sent."""
    captured = ""
    deadline = time.monotonic() + 10
    while True:
        captured += capsys.readouterr().err
        lines = [line for line in json_lines(captured) if line["request_id"] == rid]
        if any(line["logger"] == "app.access" for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


@pytest.fixture
def url(stub: StubVLLM, vllm_service: ServiceFactory) -> str:
    """A JSON-logging service whose page 2 always fails, so every document logs a page-level line."""

    def responder(request: StubRequest) -> Reply:
        if page_id_of(request.image) == 2:
            return Reply(status=400, message="unreadable page")
        return Reply(text=describe(request.image))

    stub.responder = responder
    return vllm_service(log_format="json", vllm_max_retries=0)


def post(url: str, headers: dict[str, Any] | None = None) -> httpx.Response:
    pdf = make_pdf(3, PAGE_PT)
    response = httpx.post(f"{url}/api/inference", files={"file": ("a.pdf", pdf)}, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response


def assert_request_logged(lines: list[dict[str, Any]]) -> None:
    access = [line for line in lines if line["logger"] == "app.access"]
    assert len(access) == 1
    assert access[0]["route"] == "/api/inference"
    assert access[0]["status"] == 200
    assert access[0]["bytes_in"] > 0
    assert access[0]["bytes_out"] > 0
    pages = [line for line in lines if line["logger"] == "app.service" and "page 2 failed" in line["message"]]
    assert len(pages) == 1, lines
    assert pages[0]["level"] == "WARNING"


def test_given_id_is_echoed_and_logged(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    response = post(url, {"X-Request-ID": "batch-7/doc-42"})
    assert response.headers["X-Request-ID"] == "batch-7/doc-42"
    assert_request_logged(lines_of(capsys, "batch-7/doc-42"))


def test_id_is_generated_when_absent(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = post(url), post(url)
    rid = first.headers["X-Request-ID"]
    assert GENERATED.fullmatch(rid)
    assert second.headers["X-Request-ID"] != rid
    assert_request_logged(lines_of(capsys, rid))


@pytest.mark.parametrize("given", ["x" * 129, "", b"caf\xe9", "tab\there"], ids=["too-long", "empty", "latin1", "tab"])
def test_unsafe_ids_are_replaced(url: str, given: str | bytes) -> None:
    raw = given if isinstance(given, bytes) else given.encode()
    response = httpx.get(f"{url}/info", headers=[(b"X-Request-ID", raw)])
    assert response.status_code == 200
    assert GENERATED.fullmatch(response.headers["X-Request-ID"])


def test_streamed_pages_log_with_the_id(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    pdf = make_pdf(3, PAGE_PT)
    headers = {"Accept": "application/x-ndjson", "X-Request-ID": "stream-1"}
    with httpx.stream("POST", f"{url}/api/inference", files={"file": ("a.pdf", pdf)}, headers=headers) as response:
        assert response.headers["X-Request-ID"] == "stream-1"
        events = [json.loads(line) for line in response.iter_lines() if line]
    assert events[-1]["event"] == "result"
    assert_request_logged(lines_of(capsys, "stream-1"))


def test_errors_carry_the_id_too(url: str) -> None:
    files = {"file": ("a.pdf", b"not a pdf")}
    response = httpx.post(f"{url}/api/inference", files=files, headers={"X-Request-ID": "e1"})
    assert response.status_code == 415
    assert response.headers["X-Request-ID"] == "e1"
