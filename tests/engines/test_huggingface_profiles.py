"""The huggingface engine per architecture: tiny random checkpoints named after the published ones.

LightOnOCR-3-1B is the 2-1B architecture (LightOnOcr classes) with another profile: driven end to end
through the service. LightOnOCR-3-4B is Qwen3.5-VL (`Qwen3_5ForConditionalGeneration`): its model is
built and loaded here; its processor (transformers' Qwen3VLProcessor) needs torchvision, which this
project does not install, so without it the engine must say exactly that.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from app.engines.base import Sampling
from app.engines.huggingface import HuggingFaceEngine, architecture_of, conversation, min_side_of
from app.errors import EngineUnavailable
from app.main import create_app
from app.profiles import GROUNDING_PROMPT
from tests.conftest import make_settings, wait_ready
from tests.support.documents import make_marked_image, make_pdf
from tests.support.http import ok, post
from tests.support.server import ServedApp
from tests.support.tiny_checkpoint import build_tiny_checkpoint, build_tiny_qwen3_5_checkpoint

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(scope="session")
def tiny_3_1b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Found by its directory's name, the way a user's local copy would be."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("v3") / "LightOnOCR-3-1B", name="")


@pytest.fixture(scope="session")
def tiny_3_4b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3_5_checkpoint(tmp_path_factory.mktemp("q35") / "weights")


@pytest.fixture(scope="module")
def service_3_1b(tiny_3_1b: Path) -> Iterator[str]:
    settings = make_settings(
        model_source="huggingface", model_name=str(tiny_3_1b), device="cpu", max_new_tokens=8, retry_temperatures=""
    )
    served = ServedApp(create_app(settings)).start()
    try:
        wait_ready(served.url)
        yield served.url
    finally:
        served.stop()


def test_3_1b_end_to_end_with_its_profile(service_3_1b: str) -> None:
    info = httpx.get(f"{service_3_1b}/info").json()
    assert info["profile"]["name"] == "LightOnOCR-3-1B"
    assert info["profile"]["supports_grounding"] is True
    assert info["sampling"] == {"temperature": 0.2, "top_p": 1.0}
    body = ok(post(service_3_1b, make_pdf(1, (595.28, 841.89))))
    page = body["pages"][0]
    assert page["status"] in ("ok", "truncated", "repetitive")
    assert max(page["width"], page["height"]) == 1540


def test_the_conversation_carries_the_grounding_text_after_the_image() -> None:
    assert conversation(None) == [{"role": "user", "content": [{"type": "image"}]}]
    assert conversation(GROUNDING_PROMPT)[0]["content"] == [{"type": "image"}, {"type": "text", "text": "grounding"}]


@pytest.mark.anyio
async def test_3_1b_grounding_request_runs(tiny_3_1b: Path) -> None:
    settings = make_settings(model_source="huggingface", model_name=str(tiny_3_1b), device="cpu")
    async with HuggingFaceEngine(settings) as engine:
        plain = await engine.recognize(make_marked_image(1, 200, 260), Sampling(0.2, 1.0, 4))
        grounded = await engine.recognize(make_marked_image(1, 200, 260), Sampling(0.2, 1.0, 4, GROUNDING_PROMPT))
    assert plain.tokens > 0
    assert grounded.tokens > 0


def test_the_architecture_comes_from_the_config(tiny_3_4b: Path, tiny_3_1b: Path) -> None:
    assert architecture_of(tiny_3_4b) == "qwen3_5"
    assert architecture_of(tiny_3_1b) == "lightonocr"


@pytest.mark.anyio
@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed: the processor can be built")
async def test_3_4b_without_torchvision_says_so(tiny_3_4b: Path) -> None:
    settings = make_settings(model_source="huggingface", model_name=str(tiny_3_4b), device="cpu", model_load_retry_s=0)
    engine = HuggingFaceEngine(settings)
    with pytest.raises(EngineUnavailable, match="torchvision"):
        await engine.start()
    await engine.close()


@pytest.fixture(scope="module")
def service_3_4b(tiny_3_4b: Path) -> Iterator[str]:
    settings = make_settings(
        model_source="huggingface", model_name=str(tiny_3_4b), device="cpu", max_new_tokens=6, retry_temperatures=""
    )
    served = ServedApp(create_app(settings)).start()
    try:
        wait_ready(served.url)
        yield served.url
    finally:
        served.stop()


@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' Qwen3VLProcessor needs torchvision (not installed)")
def test_3_4b_end_to_end_with_its_profile(service_3_4b: str) -> None:
    """Found by the name in its config.json; pages at 2048 px; thinking turned off in the chat template."""
    info = httpx.get(f"{service_3_4b}/info").json()
    assert info["profile"]["name"] == "LightOnOCR-3-4B"
    assert info["profile"]["architecture"] == "qwen3_5"
    body = ok(post(service_3_4b, make_pdf(1, (595.28, 841.89))))
    page = body["pages"][0]
    assert page["status"] in ("ok", "truncated", "repetitive")
    assert max(page["width"], page["height"]) == 2048


@pytest.mark.anyio
@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' Qwen3VLProcessor needs torchvision (not installed)")
async def test_3_4b_prompt_turns_thinking_off_and_carries_grounding(tiny_3_4b: Path) -> None:
    settings = make_settings(model_source="huggingface", model_name=str(tiny_3_4b), device="cpu")
    async with HuggingFaceEngine(settings) as engine:
        assert engine.prompt(Sampling(0.2, 1.0, 4, GROUNDING_PROMPT)).endswith(
            "<|vision_end|>grounding<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        )
        generation = await engine.recognize(make_marked_image(1, 200, 260), Sampling(0.2, 1.0, 4, GROUNDING_PROMPT))
    assert generation.tokens > 0


def test_the_qwen_processor_min_side_is_patch_times_merge() -> None:
    """Qwen3.5-VL's image processor: patch 16, merge 2 -> a page side shorter than 32 px is padded."""
    qwen_like = SimpleNamespace(image_processor=SimpleNamespace(patch_size=16, merge_size=2))
    assert min_side_of(qwen_like) == 32
