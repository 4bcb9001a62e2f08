"""MODEL_SOURCE=openai: the remote engine against servers that are not vLLM (the stand-in as llama-server).

llama.cpp's `llama-server` lists its model by file name (or `--alias`), has no `max_model_len` (its context is
`meta.n_ctx`), answers 503 "Loading model" while loading, samples with top_k/min_p unless told, and words its
errors its own way. The real one is exercised in tests/integration/test_llama_cpp.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from PIL import Image

from app.engines import build_engine
from app.engines.base import Sampling
from app.engines.servers import ServerKind, error_message, served_models
from app.engines.vllm import VLLMEngine
from app.errors import EngineNotReady, EngineUnavailable, PageRejected
from app.results import Generation
from app.service import OCRService
from app.settings import ModelSource, Settings, SettingsError
from tests.conftest import make_settings
from tests.support.documents import make_marked_image
from tests.support.openai_stub import DEFAULT_MODEL, LLAMA_SAMPLING, Reply, StubRequest, StubVLLM

pytestmark = pytest.mark.anyio

GGUF = "LightOnOCR-2-1B-Q8_0.gguf"  # what llama-server lists without --alias


def openai_settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_source": "openai",
        "vllm_base_url": url,
        "vllm_retry_backoff_s": 0.01,
        "model_load_retry_s": 0.05,
    }
    return make_settings(**{**values, **overrides})


def sampling_of(settings: Settings) -> Sampling:
    return Sampling(0.2, 0.9, settings.max_new_tokens)


def page(page_id: int = 1) -> Image.Image:
    return make_marked_image(page_id, 200, 260)


def llama_stub(**kwargs: Any) -> StubVLLM:
    return StubVLLM(model=kwargs.pop("model", GGUF), server="llama-server", **kwargs)


# --------------------------------------------------------------------------- the model name


async def test_without_model_name_the_one_served_model_is_used_and_sampled_as_the_authors_do() -> None:
    with llama_stub() as stub:
        settings = openai_settings(stub.base_url)
        engine = build_engine(settings)
        assert isinstance(engine, VLLMEngine)
        async with engine:
            await engine.check_health()
            generation = await engine.recognize(page(3), sampling_of(settings))
            info = engine.info()
    assert generation == Generation(text="page 3", finish_reason="stop", tokens=2)
    # The stub answers 400 unless model is the served id and top_k/min_p switch llama-server's defaults off.
    assert stub.violations == []
    assert (info.engine, info.model) == ("openai", GGUF)
    assert info.device == f"remote ({stub.base_url})"


async def test_model_name_may_be_a_llama_server_alias() -> None:
    with llama_stub(aliases=("LightOnOCR-2-1B",)) as stub:
        async with VLLMEngine(
            openai_settings(stub.base_url, model_name="LightOnOCR-2-1B"), source=ModelSource.OPENAI
        ) as e:
            await e.check_health()
            await e.recognize(page(), sampling_of(openai_settings(stub.base_url)))
    assert stub.violations == []


async def test_several_served_models_and_no_model_name_fail_the_start_naming_model_name() -> None:
    with StubVLLM(model="a/one", also_serves=("b/two",)) as stub:
        engine = VLLMEngine(openai_settings(stub.base_url), source=ModelSource.OPENAI)
        with pytest.raises(SettingsError, match="MODEL_NAME is not set") as caught:
            await engine.start()
        await engine.close()
    assert "'a/one', 'b/two'" in str(caught.value)


async def test_a_chosen_model_among_several_is_served() -> None:
    with StubVLLM(model="a/one", also_serves=("b/two",)) as stub:
        settings = openai_settings(stub.base_url, model_name="b/two")
        async with VLLMEngine(settings, source=ModelSource.OPENAI) as engine:
            await engine.check_health()
            await engine.recognize(page(), sampling_of(settings))
            assert engine.info().model == "b/two"
    assert stub.violations == []


async def test_vllm_source_keeps_the_default_model_name() -> None:
    """MODEL_SOURCE=vllm is unchanged: MODEL_NAME (default included) is asked for, nothing is guessed."""
    with StubVLLM(model="someone/else") as stub:
        settings = openai_settings(stub.base_url, model_source="vllm")
        async with build_engine(settings) as engine:
            assert engine.info().model == DEFAULT_MODEL
            with pytest.raises(EngineUnavailable, match="someone/else"):
                await engine.check_health()


async def test_start_waits_for_a_loading_llama_server_and_says_so() -> None:
    """llama-server answers 503 'Loading model' until its weights are in: the service says so, then serves."""
    with llama_stub() as stub:
        stub.loading = True
        service = OCRService(openai_settings(stub.base_url))
        await service.start()
        try:
            for _ in range(200):  # the first failed listing sets the status
                try:
                    service.check_started()
                except EngineUnavailable as exc:
                    if "Loading model" in exc.message:
                        break
                except EngineNotReady:
                    pass
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the start never said the server is loading")
            stub.loading = False
            for _ in range(500):
                try:
                    await service.check_ready()
                    break
                except EngineUnavailable:
                    await asyncio.sleep(0.01)
            assert service.engine.info().model == GGUF
        finally:
            await service.close()


async def test_unreachable_server_without_retries_fails_the_start() -> None:
    engine = VLLMEngine(openai_settings("http://127.0.0.1:1/v1", model_load_retry_s=0), source=ModelSource.OPENAI)
    with pytest.raises(EngineUnavailable, match="waiting for the model server to list its model"):
        await engine.start()
    await engine.close()


# --------------------------------------------------------------------------- readiness


async def test_readiness_checks_llama_server_context_as_vllm_max_model_len() -> None:
    with llama_stub(max_model_len=2048) as stub:
        async with VLLMEngine(openai_settings(stub.base_url, max_new_tokens=4096), source=ModelSource.OPENAI) as e:
            with pytest.raises(EngineUnavailable, match=r"context of 2048 tokens.*--ctx-size"):
                await e.check_health()


async def test_readiness_of_a_server_that_lists_ids_only(openai_ids_only: str) -> None:
    """No max_model_len, no n_ctx (mlx-vlm, LM Studio, a proxy): nothing to check, ready."""
    settings = openai_settings(openai_ids_only, max_new_tokens=100_000)
    async with VLLMEngine(settings, source=ModelSource.OPENAI) as engine:
        await engine.check_health()
        assert engine.info().model == "mlx-community/LightOnOCR-2-1B-bf16"


@pytest.fixture
def openai_ids_only() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tests.support.server import ServedApp

    async def models(_: Any) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "mlx-community/LightOnOCR-2-1B-bf16"}]})

    with ServedApp(Starlette(routes=[Route("/v1/models", models)]), lifespan="off") as served:
        yield f"{served.url}/v1"


# --------------------------------------------------------------------------- llama-server's errors


async def test_llama_server_image_failure_is_a_rejected_page_not_retried() -> None:
    with llama_stub(responder=lambda _: Reply(status=500, message="Failed to load image or audio file")) as stub:
        settings = openai_settings(stub.base_url)
        async with VLLMEngine(settings, source=ModelSource.OPENAI) as engine:
            with pytest.raises(PageRejected, match="model server answered HTTP 500"):
                await engine.recognize(page(), sampling_of(settings))
    assert len(stub.requests) == 1


async def test_llama_server_context_overflow_is_a_rejected_page() -> None:
    message = "request (3000 tokens) exceeds the available context size (2048 tokens), try increasing it"
    with llama_stub(responder=lambda _: Reply(status=400, message=message)) as stub:
        settings = openai_settings(stub.base_url)
        async with VLLMEngine(settings, source=ModelSource.OPENAI) as engine:
            with pytest.raises(PageRejected):
                await engine.recognize(page(), sampling_of(settings))
    assert len(stub.requests) == 1


async def test_llama_server_busy_is_retried() -> None:
    calls: list[int] = []

    def flaky(request: StubRequest) -> Reply:
        calls.append(request.attempt)
        return Reply(status=503, message="Loading model") if len(calls) == 1 else Reply(text="ok")

    with llama_stub(responder=flaky) as stub:
        settings = openai_settings(stub.base_url)
        async with VLLMEngine(settings, source=ModelSource.OPENAI) as engine:
            generation = await engine.recognize(page(), sampling_of(settings))
    assert generation.text == "ok"
    assert calls == [1, 2]


async def test_two_llama_servers_as_a_fleet() -> None:
    with llama_stub() as first, llama_stub() as second:
        settings = openai_settings(f"{first.base_url},{second.base_url}", max_concurrent_pages=1)
        async with VLLMEngine(settings, source=ModelSource.OPENAI) as engine:
            await engine.check_health()
            await asyncio.gather(*(engine.recognize(page(i), sampling_of(settings)) for i in range(4)))
            assert engine.info().device == "remote (2 model servers)"
    assert first.completed > 0
    assert second.completed > 0
    assert first.violations == second.violations == []


# --------------------------------------------------------------------------- the quirks module


def test_served_models_reads_each_servers_listing() -> None:
    vllm = served_models({"data": [{"id": "m", "owned_by": "vllm", "max_model_len": 16384}]})
    llama = served_models(
        {"data": [{"id": "x.gguf", "aliases": ["ocr"], "owned_by": "llamacpp", "meta": {"n_ctx": 8192}}], "models": []}
    )
    other = served_models({"data": [{"id": "mlx"}]})
    assert [(m.id, m.context, m.kind) for m in vllm] == [("m", 16384, ServerKind.VLLM)]
    assert [(m.id, m.names, m.context, m.kind) for m in llama] == [
        ("x.gguf", frozenset({"x.gguf", "ocr"}), 8192, ServerKind.LLAMA_CPP)
    ]
    assert [(m.id, m.context, m.kind) for m in other] == [("mlx", None, ServerKind.OTHER)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}}, "bad"),  # vLLM
        ({"error": {"code": 500, "message": "bad", "type": "server_error"}}, "bad"),  # llama-server
        ({"object": "error", "message": "bad", "type": "x", "code": 400}, "bad"),  # older vLLM
        ({"detail": "bad"}, "bad"),  # FastAPI servers (mlx-vlm)
        ({"error": "Unauthorized"}, "Unauthorized"),  # vLLM's 401
        ({"choices": []}, None),
        ([1, 2], None),
        (None, None),
    ],
)
def test_error_message_reads_each_servers_error_body(body: object, message: str | None) -> None:
    assert error_message(body) == message


def test_llama_sampling_is_what_the_engine_adds() -> None:
    from app.engines.servers import request_extras

    assert request_extras(ServerKind.LLAMA_CPP) == LLAMA_SAMPLING
    assert request_extras(ServerKind.VLLM) == request_extras(ServerKind.OTHER) == {}
