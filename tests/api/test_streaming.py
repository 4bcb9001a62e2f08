"""Streaming: pages as they finish, same content as the JSON API, errors as events."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest

from app import streaming
from tests.conftest import ServiceFactory
from tests.support.documents import make_pdf, page_id_of
from tests.support.openai_stub import Reply, StubRequest, StubVLLM


def stream(url: str, files: Any, accept: str = "application/x-ndjson", **data: str) -> tuple[int, list[dict[str, Any]]]:
    with httpx.stream(
        "POST", f"{url}/api/inference", files=files, data=data, headers={"Accept": accept}, timeout=30
    ) as response:
        body = response.read().decode()
        if response.status_code != 200:
            return response.status_code, [json.loads(body)]
        assert response.headers["content-type"].startswith(accept)
    if accept == "text/event-stream":
        events = []
        for chunk in body.strip().split("\n\n"):
            name, data_line = chunk.split("\n")
            event = json.loads(data_line.removeprefix("data: "))
            assert name == f"event: {event['event']}"
            events.append(event)
        return 200, events
    return 200, [json.loads(line) for line in body.splitlines()]


def test_stream_matches_json_result(stub: StubVLLM, vllm_service: ServiceFactory) -> None:
    url = vllm_service()
    pdf = make_pdf(4, (200, 260))
    status, events = stream(url, {"file": ("a.pdf", pdf)})
    assert status == 200
    kinds = [event["event"] for event in events]
    assert kinds == ["start"] + ["page", "progress"] * 4 + ["result"]
    assert events[0] == {"event": "start", "total": 4, "pages": [1, 2, 3, 4]}
    assert [e["done"] for e in events if e["event"] == "progress"] == [1, 2, 3, 4]
    streamed = events[-1]["result"]
    plain = httpx.post(f"{url}/api/inference", files={"file": ("a.pdf", pdf)}, timeout=30).json()
    for document in (streamed, plain):
        for page in document["pages"]:
            page.pop("seconds")
    assert streamed == plain
    assert sorted(e["page"]["page"] for e in events if e["event"] == "page") == [1, 2, 3, 4]


def test_pages_arrive_as_they_finish(stub: StubVLLM, vllm_service: ServiceFactory) -> None:
    """Page 1 is held until page 3 has been streamed: events say which page they carry."""
    release = threading.Event()

    async def responder(request: StubRequest) -> Reply:
        if page_id_of(request.image) == 1:
            import asyncio

            await asyncio.to_thread(release.wait, 10)
        return Reply(text=f"page {page_id_of(request.image)}")

    stub.responder = responder
    url = vllm_service()
    order: list[int] = []
    with httpx.stream(
        "POST",
        f"{url}/api/inference",
        files={"file": ("a.pdf", make_pdf(3, (200, 260)))},
        headers={"Accept": "application/x-ndjson"},
        timeout=30,
    ) as response:
        for line in response.iter_lines():
            event = json.loads(line)
            if event["event"] == "page":
                order.append(event["page"]["page"])
                if len(order) == 2:
                    release.set()
            if event["event"] == "result":
                assert [p["page"] for p in event["result"]["pages"]] == [1, 2, 3]
    assert order[-1] == 1
    assert sorted(order) == [1, 2, 3]


def test_server_sent_events(stub: StubVLLM, vllm_service: ServiceFactory) -> None:
    status, events = stream(vllm_service(), {"file": ("a.pdf", make_pdf(2, (200, 260)))}, "text/event-stream")
    assert status == 200
    assert events[-1]["event"] == "result"
    assert events[-1]["result"]["text"] == "page 1\n\npage 2"


def test_refusals_keep_their_status(stub: StubVLLM, vllm_service: ServiceFactory) -> None:
    url = vllm_service(max_pages=2)
    status, body = stream(url, {"file": ("a.pdf", make_pdf(3, (200, 260)))})
    assert status == 422
    assert body[0]["error"]["code"] == "too_many_pages"
    status, body = stream(url, {"file": ("a.txt", b"hello")})
    assert status == 415


def test_error_midway_is_an_event(stub: StubVLLM, vllm_service: ServiceFactory) -> None:
    stub.responder = lambda request: Reply(status=400, message="boom")
    url = vllm_service(vllm_max_retries=0, max_failed_page_ratio=0)
    status, events = stream(url, {"file": ("a.pdf", make_pdf(2, (200, 260)))})
    assert status == 200
    assert events[-1]["event"] == "error"
    # Both pages refused the same way: the answer is that error itself, not document_failed.
    assert events[-1]["error"]["code"] == "page_rejected"
    assert httpx.get(f"{url}/health").status_code == 200


def test_quiet_streams_send_heartbeats(
    stub: StubVLLM, vllm_service: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a page runs, NDJSON gets `{"event": "ping"}` lines and SSE `: ping` comments; the page waits for them."""
    monkeypatch.setattr(streaming, "HEARTBEAT_S", 0.02)
    release = threading.Event()

    async def responder(request: StubRequest) -> Reply:
        await asyncio.to_thread(release.wait, 20)
        return Reply(text="done")

    stub.responder = responder
    url = vllm_service()
    pdf = make_pdf(1, (200, 260))
    for accept, ping in (("application/x-ndjson", '{"event":"ping"}'), ("text/event-stream", ": ping")):
        release.clear()
        headers = {"Accept": accept}
        with httpx.stream(
            "POST", f"{url}/api/inference", files={"file": ("a.pdf", pdf)}, headers=headers, timeout=30
        ) as response:
            lines = response.iter_lines()
            seen: list[str] = []
            for line in lines:
                seen.append(line)
                if line == ping:
                    break
            assert ping in seen, seen
            release.set()  # the page ends only once a heartbeat was seen
            rest = [line for line in lines if line and line != ping]
        assert '"event":"result"' in rest[-1].replace(" ", ""), rest
