"""Each checkpoint's request, end to end: service on loopback -> VLLMEngine -> the strict stand-in.

The stand-in (tests/support/openai_stub.py) knows from the served name, independently of
app/profiles.py, what LightOn's client sends that model: page size, extra fields, text part. A
request of the wrong shape is a violation it answers with HTTP 400, which the page shows.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from app.engines.base import Sampling
from app.engines.vllm import VLLMEngine
from app.errors import PageRejected
from app.main import create_app
from app.profiles import GROUNDING_PROMPT
from tests.conftest import make_settings, wait_ready
from tests.support.documents import make_pdf
from tests.support.http import ok, post
from tests.support.openai_stub import StubVLLM
from tests.support.server import ServedApp

# A4 at 200 DPI is 1654 x 2339 px: larger than either page size, so the cap shows.
A4 = (595.28, 841.89)
# served name -> (longest edge sent, top_p, whether chat_template_kwargs is sent)
CASES = {
    "lightonai/LightOnOCR-1B-1025": (1540, 0.9, False),
    "lightonai/LightOnOCR-2-1B": (1540, 0.9, False),
    "lightonai/LightOnOCR-2-1B-bbox": (1540, 0.9, False),
    "lightonai/LightOnOCR-3-1B": (1540, 1.0, False),
    "lightonai/LightOnOCR-3-0.8B": (2048, 1.0, True),
    "LightOnOCR-3-4B": (2048, 1.0, True),
    "my-served-ocr": (2048, 1.0, True),  # unknown: LightOn's fallback
}


@pytest.fixture
def served() -> Iterator[list[ServedApp]]:
    apps: list[ServedApp] = []
    yield apps
    for app in apps:
        app.stop()


def start_service(stub: StubVLLM, served: list[ServedApp], **overrides: object) -> str:
    settings = make_settings(
        model_source="vllm",
        vllm_base_url=stub.base_url,
        model_name=stub.model,
        vllm_retry_backoff_s=0.01,
        vllm_max_retries=0,
        retry_temperatures="",
        **overrides,
    )
    app = ServedApp(create_app(settings)).start()
    served.append(app)
    wait_ready(app.url, timeout=30)
    return app.url


@pytest.mark.parametrize("model", list(CASES))
def test_each_profile_sends_the_authors_request(model: str, served: list[ServedApp]) -> None:
    edge, top_p, no_thinking = CASES[model]
    with StubVLLM(model=model) as stub:
        url = start_service(stub, served)
        body = ok(post(url, make_pdf(1, A4)))
        info = httpx.get(f"{url}/info").json()
        assert stub.violations == []
        [record] = stub.requests
    assert body["pages"][0]["status"] == "ok"
    # The page is rendered for the model's size: A4's long side is the edge (never the 200-DPI cap here).
    assert max(record.width, record.height) == edge
    assert (body["pages"][0]["width"], body["pages"][0]["height"]) == (record.width, record.height)
    assert (record.params.temperature, record.params.top_p) == (0.2, top_p)
    extra = {"chat_template_kwargs": {"enable_thinking": False}} if no_thinking else {}
    assert info["profile"]["extra_request_fields"] == extra
    assert info["profile"]["longest_edge"] == edge
    assert info["sampling"] == {"temperature": 0.2, "top_p": top_p}
    assert info["profile"]["known"] is (model != "my-served-ocr")


def test_images_follow_the_profile_size_too(served: list[ServedApp]) -> None:
    image = Image.new("RGB", (3000, 1500), "white")
    png = io.BytesIO()
    image.save(png, format="PNG")
    with StubVLLM(model="lightonai/LightOnOCR-3-4B") as stub:
        url = start_service(stub, served)
        body = ok(post(url, png.getvalue(), "wide.png"))
        [record] = stub.requests
    assert (record.width, record.height) == (2048, 1024)
    assert body["pages"][0]["width"] == 2048


def test_settings_override_the_profile(served: list[ServedApp]) -> None:
    with StubVLLM(model="lightonai/LightOnOCR-3-4B") as stub:
        url = start_service(stub, served, render_longest_edge=1000, temperature=0.1, top_p=0.5)
        ok(post(url, make_pdf(1, A4)))
        info = httpx.get(f"{url}/info").json()
        [record] = stub.requests
    assert max(record.width, record.height) == 1000
    assert (record.params.temperature, record.params.top_p) == (0.1, 0.5)
    assert info["profile"]["overridden_by"] == ["TEMPERATURE", "TOP_P", "RENDER_LONGEST_EDGE"]


def test_a_wrong_shape_is_refused_by_the_stand_in(served: list[ServedApp]) -> None:
    """MODEL_PROFILE naming a 2-1B for a served 4B: no chat_template_kwargs, 1540 px -> the stand-in says 400."""
    with StubVLLM(model="lightonai/LightOnOCR-3-4B") as stub:
        url = start_service(stub, served, model_profile="LightOnOCR-2-1B")
        response = post(url, make_pdf(1, A4))
        violations = stub.violations
    assert response.status_code in (200, 502), response.text
    page = response.json()["pages"][0] if response.status_code == 200 else None
    if page is not None:
        assert page["status"] == "failed"
        assert page["error"]["code"] == "page_rejected"
    assert len(violations) == 1
    assert "chat_template_kwargs" in violations[0]


@pytest.mark.anyio
@pytest.mark.parametrize(("model", "allowed"), [("lightonai/LightOnOCR-3-0.8B", True), ("LightOnOCR-2-1B", False)])
async def test_the_grounding_text_part_is_for_generation_3_only(model: str, allowed: bool) -> None:
    """The stand-in takes `grounding` after the image from a generation-3 model only."""
    with StubVLLM(model=model) as stub:
        settings = make_settings(model_source="vllm", vllm_base_url=stub.base_url, model_name=model, vllm_max_retries=0)
        sampling = Sampling(0.2, 1.0, 64, prompt=GROUNDING_PROMPT)
        async with VLLMEngine(settings) as engine:
            if allowed:
                await engine.recognize(Image.new("RGB", (300, 400), "white"), sampling)
            else:
                with pytest.raises(PageRejected):
                    await engine.recognize(Image.new("RGB", (300, 400), "white"), sampling)
        requests, violations = stub.requests, stub.violations
    if allowed:
        assert violations == []
        assert requests[0].prompt == "grounding"
    else:
        assert len(violations) == 1
        assert "text part" in violations[0]
