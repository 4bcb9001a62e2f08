"""mode=grounding and picture boxes end to end: HTTP in, the vLLM engine, the strict stand-in, blocks and crops out."""

from __future__ import annotations

import base64
import io
import json
import random
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import ServiceFactory
from tests.support.documents import small_pdf
from tests.support.http import ok, post
from tests.support.jobs import submit, wait_status
from tests.support.openai_stub import Reply, StubRequest, StubVLLM

GROUNDING_MODEL = "lightonai/LightOnOCR-3-1B"
BBOX_MODEL = "lightonai/LightOnOCR-2-1B-bbox"

GROUNDED_PAGE = """![header](40,20,960,50) Annual report 2026
![title](60,80,940,140) # Results
![text](60,160,480,700) Revenue grew in every region and
![text+](520,160,940,400) margins held.
![image](520,420,940,880) A bar chart of revenue by region.
![page_number](480,950,520,980) 7
"""


def noise_png(width: int = 600, height: int = 400) -> bytes:
    """A page whose every pixel differs from its neighbours, so a crop one pixel off cannot match."""
    rng = random.Random(13)
    image = Image.frombytes("RGB", (width, height), bytes(rng.randrange(256) for _ in range(width * height * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Answer:
    """Answers `text` to grounding requests (plain ones get `plain`) and keeps the page images the model saw."""

    def __init__(self, text: str, plain: str = "plain text") -> None:
        self.text, self.plain = text, plain
        self.seen: list[tuple[str | None, Image.Image]] = []
        self._lock = threading.Lock()

    def __call__(self, request: StubRequest) -> Reply:
        with self._lock:
            self.seen.append((request.prompt, request.image))
        return Reply(text=self.text if request.prompt == "grounding" else self.plain)


def decode(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.removeprefix("data:image/png;base64,"))))


def crop_of(image: Image.Image, bbox: list[int]) -> bytes:
    x1, y1, x2, y2 = bbox
    return image.crop((max(0, x1 - 5), max(0, y1 - 5), min(image.width, x2 + 5), min(image.height, y2 + 5))).tobytes()


@pytest.fixture
def model_stub(request: pytest.FixtureRequest) -> Iterator[StubVLLM]:
    with StubVLLM(model=getattr(request, "param", GROUNDING_MODEL)) as server:
        yield server


@pytest.fixture
def service(vllm_service: ServiceFactory, model_stub: StubVLLM) -> ServiceFactory:
    def start(**overrides: Any) -> str:
        return vllm_service(vllm_base_url=model_stub.base_url, model_name=model_stub.model, **overrides)

    return start


@pytest.mark.parametrize("intake_workers", [None, 0])  # pages rendered in worker processes (PNG) or in-process
def test_grounding_blocks_boxes_and_inline_crops(
    service: ServiceFactory, model_stub: StubVLLM, intake_workers: int | None
) -> None:
    answer = Answer(GROUNDED_PAGE)
    model_stub.responder = answer
    fields = {"mode": "grounding", "images": "inline", "drop_headers_footers": "true"}
    body = ok(post(service(intake_workers=intake_workers), noise_png(), "page.png", data=fields))
    assert model_stub.violations == []
    [(prompt, seen)] = answer.seen
    assert prompt == "grounding"
    [page] = body["pages"]
    assert (page["width"], page["height"]) == seen.size == (600, 400)
    assert "warnings" not in page
    blocks = body["blocks"]
    assert [block["label"] for block in blocks] == ["header", "title", "text", "image", "page_number"]
    title = blocks[1]
    assert title["type"] == "heading"
    assert title["level"] == 1
    assert title["bbox_norm"] == [60, 80, 940, 140]
    assert title["bbox"] == [36, 32, 564, 56]  # 0-1000 of 600 x 400 pixels
    assert blocks[2]["text"] == "Revenue grew in every region and margins held."
    assert blocks[2]["continuations"] == [{"bbox": [312, 64, 564, 160], "bbox_norm": [520, 160, 940, 400]}]
    picture = blocks[3]
    assert picture["picture"] == 1
    assert picture["bbox"] == [312, 168, 564, 352]
    # The crop is the page image the model saw, pixel for pixel, with a 5 px margin.
    crop = decode(picture["image"])
    assert crop.size == (252 + 10, 184 + 10)
    assert crop.convert("RGB").tobytes() == crop_of(seen, picture["bbox"])
    # The markdown: no markers, no header or page number, the picture referred to by name.
    assert page["text"] == (
        "# Results\n\nRevenue grew in every region and margins held.\n\n"
        "![image](page_1_image_1.png)\n\nA bar chart of revenue by region."
    )
    assert body["text"] == page["text"]


def test_grounding_without_options_keeps_headers_and_gives_no_crops(
    service: ServiceFactory, model_stub: StubVLLM
) -> None:
    model_stub.responder = Answer(GROUNDED_PAGE)
    body = ok(post(service(), noise_png(), "page.png", data={"mode": "grounding"}))
    assert body["text"].startswith("Annual report 2026\n\n# Results")
    assert body["text"].endswith("\n\n7")
    assert all("image" not in block for block in body["blocks"])


def test_plain_mode_on_a_grounding_model_sends_the_image_alone(service: ServiceFactory, model_stub: StubVLLM) -> None:
    answer = Answer(GROUNDED_PAGE)
    model_stub.responder = answer
    body = ok(post(service(), small_pdf(1)))
    assert [prompt for prompt, _ in answer.seen] == [None]
    assert body["blocks"] == [{"type": "paragraph", "page": 1, "text": "plain text", "level": None}]


def test_untrusted_markers_keep_the_page_and_say_so(service: ServiceFactory, model_stub: StubVLLM) -> None:
    output = "![text](10,10,990,1400) Tall box.\n![sidebar](10,500,300,900) Aside.\n![text](10,920,990,9"
    model_stub.responder = lambda request: Reply(text=output, finish_reason="length")
    body = ok(post(service(max_new_tokens=64), noise_png(), "page.png", data={"mode": "grounding"}))
    [page] = body["pages"]
    assert page["status"] == "truncated"
    assert sorted(warning["code"] for warning in page["warnings"]) == ["bad_box", "cut_marker", "unknown_label"]
    assert page["text"] == "Tall box.\n\nAside."
    assert "bbox" not in body["blocks"][0]
    assert body["blocks"][1]["label"] == "sidebar"


def test_streamed_page_events_carry_the_blocks(service: ServiceFactory, model_stub: StubVLLM) -> None:
    model_stub.responder = Answer(GROUNDED_PAGE)
    response = post(service(), small_pdf(2), data={"mode": "grounding"}, headers={"Accept": "application/x-ndjson"})
    events = [json.loads(line) for line in response.text.splitlines()]
    pages = [event for event in events if event["event"] == "page"]
    assert len(pages) == 2
    for event in pages:
        assert [block["label"] for block in event["blocks"]][:2] == ["header", "title"]
        assert {block["page"] for block in event["blocks"]} == {event["page"]["page"]}
    assert events[-1]["event"] == "result"


@pytest.mark.parametrize("model_stub", ["lightonai/LightOnOCR-2-1B"], indirect=True)
def test_grounding_on_a_model_without_it_is_refused(service: ServiceFactory, model_stub: StubVLLM) -> None:
    url = service()
    for response in (
        post(url, small_pdf(1), data={"mode": "grounding"}),
        submit(url, small_pdf(1), mode="grounding"),
    ):
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "mode_not_supported"
        assert "lightonai/LightOnOCR-2-1B" in error["message"]
        assert error["details"] == {"model": "lightonai/LightOnOCR-2-1B", "profile": "LightOnOCR-2-1B"}
    assert model_stub.requests == []


@pytest.mark.parametrize(("field", "value"), [("mode", "layout"), ("images", "yes"), ("drop_headers_footers", "maybe")])
def test_bad_option_values_are_refused(service: ServiceFactory, field: str, value: str) -> None:
    response = post(service(), small_pdf(1), data={field: value})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_option"
    assert error["details"]["field"] == field


@pytest.mark.parametrize("model_stub", [BBOX_MODEL], indirect=True)
def test_bbox_checkpoint_pictures_get_boxes_and_crops(service: ServiceFactory, model_stub: StubVLLM) -> None:
    answer = Answer("", plain="# Figures\n\n![image](image_1.png)100,250,400,750\n\nBelow the figure.")
    model_stub.responder = answer
    body = ok(post(service(), noise_png(), "page.png", data={"images": "inline"}))
    [(_, seen)] = answer.seen
    assert body["text"] == "# Figures\n\n![image](page_1_image_1.png)\n\nBelow the figure."
    picture = body["blocks"][1]
    assert picture["type"] == "image"
    assert picture["bbox"] == [60, 100, 240, 300]
    assert picture["bbox_norm"] == [100, 250, 400, 750]
    assert decode(picture["image"]).convert("RGB").tobytes() == crop_of(seen, picture["bbox"])


def test_a_grounding_job_and_its_pictures(service: ServiceFactory, model_stub: StubVLLM) -> None:
    answer = Answer(GROUNDED_PAGE)
    model_stub.responder = answer
    url = service()
    response = submit(url, noise_png(), mode="grounding", drop_headers_footers="true")
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    wait_status(url, job_id, "succeeded")
    result = httpx.get(f"{url}/api/jobs/{job_id}/result", timeout=10).json()
    assert [block["label"] for block in result["blocks"]] == ["header", "title", "text", "image", "page_number"]
    assert not result["text"].startswith("Annual report")
    [(prompt, seen)] = answer.seen
    assert prompt == "grounding"
    picture = httpx.get(f"{url}/api/jobs/{job_id}/pages/1/images/1", timeout=10)
    assert picture.status_code == 200
    assert picture.headers["content-type"] == "image/png"
    bbox = result["blocks"][3]["bbox"]
    assert Image.open(io.BytesIO(picture.content)).convert("RGB").tobytes() == crop_of(seen, bbox)
    missing = httpx.get(f"{url}/api/jobs/{job_id}/pages/1/images/2", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "picture_not_found"
    assert missing.json()["error"]["details"] == {"pictures": [1]}
