"""VLLMEngine against the strict stub: request shape, retries, timeouts, health and the in-flight bound."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.engines.base import Sampling
from app.engines.vllm import VLLMEngine, json_body
from app.errors import EngineError, EngineTimeout, EngineUnavailable, PageRejected
from app.profiles import active_profile
from app.results import Generation
from app.settings import Settings
from tests.conftest import make_settings
from tests.support.documents import make_marked_image, page_id_of
from tests.support.http import free_port
from tests.support.openai_stub import DEFAULT_MODEL, Reply, SamplingParams, StubRequest, StubVLLM
from tests.support.server import ServedApp

pytestmark = pytest.mark.anyio


def settings_for(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"model_source": "vllm", "vllm_base_url": url, "vllm_retry_backoff_s": 0.01}
    return make_settings(**{**values, **overrides})


def sampling_of(settings: Settings) -> Sampling:
    return Sampling(active_profile(settings).temperature, active_profile(settings).top_p, settings.max_new_tokens)


def page(page_id: int = 1) -> Image.Image:
    """A small marked page: cheap to encode, and the stub can tell which page it got."""
    return make_marked_image(page_id, 200, 260)


async def recognize_one(settings: Settings, image: Image.Image | None = None) -> Generation:
    async with VLLMEngine(settings) as engine:
        return await engine.recognize(image or page(), sampling_of(settings))


# --------------------------------------------------------------------------- request shape


async def test_payload_is_the_authors_shape_with_settings_sampling(stub: StubVLLM) -> None:
    """The stub answers 400 to anything but the authors' request; sampling must come from settings."""
    settings = settings_for(stub.base_url, temperature=0.35, top_p=0.75, max_new_tokens=321)
    generation = await recognize_one(settings, page(5))
    assert generation == Generation(text="page 5", finish_reason="stop", tokens=2)
    assert stub.violations == []
    [record] = stub.requests
    assert record.params == SamplingParams(temperature=0.35, top_p=0.75, max_tokens=321)
    assert record.mode == "L"  # a gray page travels as 8-bit gray PNG: same pixels, fewer bytes
    assert (record.width, record.height) == (200, 260)  # the engine sends the page as given


async def test_payload_carries_the_per_call_sampling_not_the_settings(stub: StubVLLM) -> None:
    """The service passes a retry's own temperature per call: the engine must send it, not the settings'."""
    settings = settings_for(stub.base_url, temperature=0.35, top_p=0.75, max_new_tokens=321)
    async with VLLMEngine(settings) as engine:
        await engine.recognize(page(2), Sampling(temperature=0.7, top_p=0.5, max_new_tokens=99))
    [record] = stub.requests
    assert record.params == SamplingParams(temperature=0.7, top_p=0.5, max_tokens=99)


async def test_payload_builder_has_exactly_the_expected_keys() -> None:
    settings = settings_for("http://127.0.0.1:1/v1")
    body = VLLMEngine(settings).payload(b"\x89PNG\r\n\x1a\n", sampling_of(settings))
    assert set(body) == {"model", "messages", "temperature", "top_p", "max_tokens"}
    assert body["model"] == DEFAULT_MODEL
    [message] = body["messages"]
    assert message["role"] == "user"
    [part] = message["content"]
    assert part["type"] == "image_url"
    assert part["image_url"]["url"].startswith("data:image/png;base64,")


async def test_api_key_is_sent_as_bearer() -> None:
    with StubVLLM(api_key="s3cret") as keyed:
        settings = settings_for(keyed.base_url, vllm_api_key="s3cret")
        async with VLLMEngine(settings) as engine:
            await engine.check_health()
            assert (await engine.recognize(page(3), sampling_of(settings))).text == "page 3"
        assert keyed.violations == []


@pytest.mark.parametrize("key", [None, "wrong"])
async def test_missing_or_wrong_api_key_is_an_engine_error(key: str | None) -> None:
    """A 401 is the caller's configuration, not a transient fault: one attempt, then EngineError."""
    with StubVLLM(api_key="s3cret") as keyed:
        settings = settings_for(keyed.base_url, vllm_api_key=key)
        with pytest.raises(EngineError) as caught:
            await recognize_one(settings)
        assert type(caught.value) is EngineError
        assert caught.value.details["upstream_status"] == 401
        assert len(keyed.violations) == 1
        assert "unauthorized" in keyed.violations[0]


async def test_missing_api_key_makes_health_fail() -> None:
    with StubVLLM(api_key="s3cret") as keyed:
        async with VLLMEngine(settings_for(keyed.base_url)) as engine:
            with pytest.raises(EngineUnavailable, match="401"):
                await engine.check_health()


async def test_grounding_sends_the_image_then_the_text_grounding() -> None:
    """LightOn's client: grounding is the same request with a text part `grounding` after the image.

    A generation-3 model: the stand-in refuses the text part from the others (tests/engines/test_vllm_profiles.py).
    """
    with StubVLLM(model="lightonai/LightOnOCR-3-1B") as stub:
        await _grounding_round_trip(stub)


async def _grounding_round_trip(stub: StubVLLM) -> None:
    settings = settings_for(stub.base_url, model_name=stub.model)
    body = VLLMEngine(settings).payload(b"\x89PNG\r\n\x1a\n", Sampling(0.2, 0.9, 100, prompt="grounding"))
    [message] = body["messages"]
    assert [part["type"] for part in message["content"]] == ["image_url", "text"]
    assert message["content"][1] == {"type": "text", "text": "grounding"}
    seen: list[str | None] = []

    def responder(request: StubRequest) -> Reply:
        seen.append(request.prompt)
        return Reply(text="![text](1,2,3,4) x")

    stub.responder = responder
    async with VLLMEngine(settings) as engine:
        generation = await engine.recognize(page(3), Sampling(0.2, 0.9, 100, prompt="grounding"))
        await engine.recognize(page(4), Sampling(0.2, 0.9, 100))
    assert generation.text == "![text](1,2,3,4) x"
    assert seen == ["grounding", None]
    assert stub.violations == []


# --------------------------------------------------------------------------- retries


def fail_first(n: int, failure: Reply) -> Callable[[StubRequest], Reply]:
    """A responder that answers `failure` to the first `n` attempts at each page, then the page."""

    def respond(request: StubRequest) -> Reply:
        return failure if request.attempt <= n else Reply(text=f"page {page_id_of(request.image)}")

    return respond


TRANSIENT = [
    Reply(status=503),
    Reply(status=429, message="too many requests"),
    Reply(status=502),  # a proxy in front of vLLM
    Reply(status=500, message="EngineCore encountered an issue. See stack trace (above) for the root cause."),
    Reply(status=500, message="CUDA error: out of memory"),
    Reply(drop_connection=True),
]


@pytest.mark.parametrize("failure", TRANSIENT)
@pytest.mark.parametrize("failures", [1, 3])
async def test_transient_failures_are_retried(stub: StubVLLM, failure: Reply, failures: int) -> None:
    stub.responder = fail_first(failures, failure)
    generation = await recognize_one(settings_for(stub.base_url, vllm_max_retries=3), page(4))
    assert generation.text == "page 4"
    assert [record.attempt for record in stub.requests] == list(range(1, failures + 2))
    assert stub.violations == []


async def test_5xx_beyond_retries_is_an_engine_error(stub: StubVLLM) -> None:
    stub.responder = fail_first(99, Reply(status=503, message="overloaded"))
    with pytest.raises(EngineError, match="3 times") as caught:
        await recognize_one(settings_for(stub.base_url, vllm_max_retries=2))
    assert type(caught.value) is EngineError
    assert len(stub.requests) == 3


async def test_dropped_connections_beyond_retries_are_unavailable(stub: StubVLLM) -> None:
    stub.responder = fail_first(99, Reply(drop_connection=True))
    with pytest.raises(EngineUnavailable):
        await recognize_one(settings_for(stub.base_url, vllm_max_retries=2, retry_after_s=9))
    assert len(stub.requests) == 3
    assert stub.dropped == 3


async def test_no_retries_configured_means_one_attempt(stub: StubVLLM) -> None:
    stub.responder = fail_first(99, Reply(status=502))
    with pytest.raises(EngineError):
        await recognize_one(settings_for(stub.base_url, vllm_max_retries=0))
    assert len(stub.requests) == 1


@pytest.mark.parametrize("status", [404, 422])
async def test_4xx_is_not_retried(stub: StubVLLM, status: int) -> None:
    """vLLM's 4xx means the request itself is wrong; sending it again cannot help."""
    stub.responder = fail_first(99, Reply(status=status, message="bad page"))
    with pytest.raises(EngineError, match=str(status)) as caught:
        await recognize_one(settings_for(stub.base_url, vllm_max_retries=3))
    assert type(caught.value) is EngineError
    assert caught.value.details["upstream_status"] == status
    assert len(stub.requests) == 1


@pytest.mark.parametrize(
    "failure",
    [
        Reply(status=400, message="image has invalid size"),
        Reply(status=500, message="mode(): Expected reduction dim 0 to have non-zero size."),
    ],
)
async def test_a_page_vllm_cannot_process_fails_at_once(
    stub: StubVLLM, failure: Reply, caplog: pytest.LogCaptureFixture
) -> None:
    """A 400, or a 500 whose vLLM error body names a processing error, would get the same answer again."""
    stub.responder = fail_first(99, failure)
    with pytest.raises(PageRejected) as caught:
        await recognize_one(settings_for(stub.base_url, vllm_max_retries=3))
    assert caught.value.details["upstream_status"] == failure.status
    assert len(stub.requests) == 1
    assert failure.message is not None
    assert failure.message not in caught.value.message  # the upstream's words go to the log only
    assert any(failure.message in record.getMessage() for record in caplog.records)


async def test_a_page_under_28_px_is_padded_and_what_vllm_could_not_take_is_not_retried(stub: StubVLLM) -> None:
    """The stand-in answers 500 for a side under 28 px, as vLLM does; the engine pads, so it never sees one."""
    thin = Image.new("RGB", (20, 600), "white")
    settings = settings_for(stub.base_url, vllm_max_retries=3)
    generation = await recognize_one(settings, thin)
    assert generation.text == "image 28x600"
    (request,) = stub.requests
    assert (request.width, request.height, request.outcome) == (28, 600, "ok")

    stub.min_side = 100  # a stricter server: the padded page is still too thin for it
    stub.reset()
    with pytest.raises(PageRejected):
        await recognize_one(settings, thin)
    assert [r.status for r in stub.requests] == [500]


async def test_page_timeout_is_not_retried(stub: StubVLLM) -> None:
    """A page that took VLLM_PAGE_TIMEOUT_S once would likely do it again: fail fast instead."""
    stub.responder = lambda request: Reply(delay_s=2.0)
    with pytest.raises(EngineTimeout, match="VLLM_PAGE_TIMEOUT_S"):
        await recognize_one(settings_for(stub.base_url, vllm_page_timeout_s=0.3, vllm_max_retries=3))
    assert len(stub.requests) == 1
    # The stub saw the client leave before its 2 s answer: the engine gave up at the timeout
    # and closed the connection, so vLLM can abort the generation.
    await asyncio.to_thread(stub.wait_until, lambda s: s.cancelled == 1)


# --------------------------------------------------------------------------- health and reachability


async def test_unreachable_server_is_unavailable() -> None:
    settings = settings_for(f"http://127.0.0.1:{free_port()}/v1", vllm_max_retries=1, retry_after_s=7)
    async with VLLMEngine(settings) as engine:
        with pytest.raises(EngineUnavailable, match="unreachable") as health:
            await engine.check_health()
        assert health.value.retry_after == 7
        with pytest.raises(EngineUnavailable, match="2 attempts") as page_failure:
            await engine.recognize(page(), sampling_of(settings))
        assert page_failure.value.retry_after == 7


async def test_client_messages_carry_no_address_or_exception_repr(caplog: pytest.LogCaptureFixture) -> None:
    """What a client sees says what happened; the address and the exception go to the log."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    settings = settings_for(url, vllm_max_retries=1)
    async with VLLMEngine(settings) as engine:
        with pytest.raises(EngineUnavailable) as health:
            await engine.check_health()
        with pytest.raises(EngineUnavailable) as page_failure:
            await engine.recognize(page(), sampling_of(settings))
    for error in (health.value, page_failure.value):
        assert "127.0.0.1" not in error.message, error.message
        assert "ConnectError" not in error.message, error.message
    logged = [record.getMessage() for record in caplog.records]
    assert any(url in line and "ConnectError" in line for line in logged), logged


async def test_health_against_healthy_stub(stub: StubVLLM) -> None:
    async with VLLMEngine(settings_for(stub.base_url)) as engine:
        await engine.check_health()
    assert stub.violations == []


async def test_health_names_the_model_actually_served() -> None:
    with StubVLLM(model="someone/else") as other:
        async with VLLMEngine(settings_for(other.base_url)) as engine:
            with pytest.raises(EngineUnavailable, match="someone/else") as caught:
                await engine.check_health()
    assert caught.value.details["served"] == ["someone/else"]
    assert DEFAULT_MODEL in caught.value.message


async def test_engine_used_before_start_is_a_programming_error(stub: StubVLLM) -> None:
    engine = VLLMEngine(settings_for(stub.base_url))
    with pytest.raises(RuntimeError, match="before start"):
        await engine.check_health()


class Held:
    """Holds every page until `release` is set (from the test's thread)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    async def __call__(self, request: StubRequest) -> Reply:
        await asyncio.to_thread(self.release.wait, 10.0)
        return Reply(text=f"page {page_id_of(request.image)}")


async def test_health_is_not_starved_by_pages_in_flight(stub: StubVLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A saturated but healthy vLLM must stay ready; otherwise an orchestrator pulls busy replicas."""
    monkeypatch.setattr("app.engines.vllm._HEALTH_TIMEOUT_S", 0.5)  # fail fast instead of after 5 s
    held = Held()
    stub.responder = held
    settings = settings_for(stub.base_url, max_concurrent_pages=2)
    async with VLLMEngine(settings) as engine:
        pages = [asyncio.create_task(engine.recognize(page(i), sampling_of(settings))) for i in (1, 2)]
        try:
            await asyncio.to_thread(stub.wait_until, lambda s: s.in_flight == 2)
            await engine.check_health()
        finally:
            held.release.set()
            results = await asyncio.gather(*pages)
    assert [result.text for result in results] == ["page 1", "page 2"]


# --------------------------------------------------------------------------- concurrency


class BatchGate:
    """Holds each request until `size` requests are in flight together (or all `total` have arrived).

    With a correct bound of `size` pages the requests pass in batches; a looser bound
    would let more arrive at once, and a tighter one would never fill a batch (the test
    then times out instead of passing).
    """

    def __init__(self, size: int, total: int) -> None:
        self.size, self.total = size, total
        self.arrived = 0
        self._cond: asyncio.Condition | None = None

    async def __call__(self, request: StubRequest) -> Reply:
        if self._cond is None:
            self._cond = asyncio.Condition()  # created in the stub's own event loop
        async with self._cond:
            self.arrived += 1
            batch_end = min(self.total, -(-self.arrived // self.size) * self.size)
            self._cond.notify_all()
            await self._cond.wait_for(lambda: self.arrived >= batch_end)
        return Reply(text=f"page {page_id_of(request.image)}")


async def test_pages_in_flight_are_bounded_across_calls(stub: StubVLLM) -> None:
    stub.responder = BatchGate(size=3, total=12)
    settings = settings_for(stub.base_url, max_concurrent_pages=3)
    async with VLLMEngine(settings) as engine:
        sampling = sampling_of(settings)
        async with asyncio.timeout(20):
            results = await asyncio.gather(*(engine.recognize(page(i), sampling) for i in range(1, 13)))
    assert [result.text for result in results] == [f"page {i}" for i in range(1, 13)]
    assert stub.max_in_flight == 3
    assert stub.completed == 12
    assert stub.violations == []


# --------------------------------------------------------------------------- completion fields


async def test_length_and_completion_tokens_propagate(stub: StubVLLM) -> None:
    stub.responder = lambda request: Reply(text="cut off mid", finish_reason="length", completion_tokens=77)
    assert await recognize_one(settings_for(stub.base_url)) == Generation("cut off mid", "length", 77)


@pytest.mark.parametrize(
    "completion",
    [
        {"choices": [{"message": {"content": "cut"}, "finish_reason": "length"}]},
        {"choices": [{"message": {"content": "cut"}, "finish_reason": "length"}], "usage": None},
        {"choices": [{"message": {"content": "cut"}, "finish_reason": "length"}], "usage": {}},
    ],
)
async def test_a_completion_without_usage_counts_zero_tokens(completion: dict[str, Any]) -> None:
    """The stub always sends `usage`; a server that does not must still give a page, not an error."""

    async def chat(request: Request) -> JSONResponse:
        return JSONResponse(completion)

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    with ServedApp(app, lifespan="off") as served:
        generation = await recognize_one(settings_for(f"{served.url}/v1", max_new_tokens=64))
    assert generation == Generation("cut", "length", 0)


async def test_empty_completion_is_an_empty_page(stub: StubVLLM) -> None:
    stub.responder = lambda request: Reply(text="", completion_tokens=0)
    assert await recognize_one(settings_for(stub.base_url)) == Generation("", "stop", 0)


@pytest.mark.parametrize("prompt", [None, "grounding"])
def test_json_body_is_json_dumps_with_the_url_spliced_in(prompt: str | None) -> None:
    """The request bytes are exactly json.dumps' (the page's data URL is copied in, not scanned)."""
    settings = make_settings(model_source="vllm")
    payload = VLLMEngine(settings).payload(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 50, Sampling(0.2, 0.9, 9, prompt))
    payload["note"] = 'quotes " and unicode é'  # the rest is still escaped by json
    assert json_body(payload) == json.dumps(payload).encode()
    assert json.loads(json_body(payload)) == payload
