"""HuggingFaceEngine on the tiny real checkpoint: loading, batching, padding, failures and shutdown.

Every test drives the real transformers classes and a real `generate` on CPU;
pages are small (a few hundred pixels) and generations short, so each test
costs well under a few seconds on two cores.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from PIL import Image

from app.engines.base import Sampling
from app.engines.huggingface import HuggingFaceEngine, _Pending, dtype_for
from app.errors import EngineError, EngineNotReady, EngineUnavailable, PageRejected
from app.results import Generation
from app.settings import HfDtype, Settings
from tests.conftest import make_settings
from tests.support.documents import make_marked_image

pytestmark = pytest.mark.anyio

MAX_NEW_TOKENS = 8
MAX_BATCH = 4
# temperature 0 -> do_sample=False: greedy, so results are reproducible.
GREEDY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS)
# The authors' sampling, as the service sends it by default.
SAMPLED = Sampling(temperature=0.2, top_p=0.9, max_new_tokens=MAX_NEW_TOKENS)
# Different sizes give different numbers of image tokens, hence prompts of different lengths.
SIZES = [(140, 196), (252, 168), (196, 196), (308, 280)]


def engine_settings(checkpoint: Path | str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_source": "huggingface",
        "model_name": str(checkpoint),
        "device": "cpu",
        "max_new_tokens": MAX_NEW_TOKENS,
        "hf_max_batch_size": MAX_BATCH,
    }
    return make_settings(**{**values, **overrides})


def page(index: int) -> Image.Image:
    """Page `index` (1-based) in its own size from SIZES."""
    width, height = SIZES[(index - 1) % len(SIZES)]
    return make_marked_image(index, width, height)


@pytest.fixture
async def engine(tiny_checkpoint: Path) -> AsyncIterator[HuggingFaceEngine]:
    async with HuggingFaceEngine(engine_settings(tiny_checkpoint)) as started:
        yield started


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1, also for the already-imported hub client (it reads the variable at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def assert_valid(generation: Generation, max_new_tokens: int = MAX_NEW_TOKENS) -> None:
    assert isinstance(generation, Generation)
    assert isinstance(generation.text, str)
    assert generation.text == generation.text.strip()
    assert generation.finish_reason in {"stop", "length"}
    assert 0 <= generation.tokens <= max_new_tokens
    if generation.finish_reason == "length":
        assert generation.tokens == max_new_tokens
    else:
        assert generation.tokens < max_new_tokens


async def settle(rounds: int = 5) -> None:
    """Let callbacks and woken tasks run: a few event-loop iterations, no wall-clock wait."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- loading and info


async def test_loads_on_cpu_and_reports_it(engine: HuggingFaceEngine, tiny_checkpoint: Path) -> None:
    info = engine.info()
    assert info.engine == "huggingface"
    assert info.model == str(tiny_checkpoint)
    assert info.device == "cpu"
    assert info.max_pages_in_flight == 2 * MAX_BATCH
    await engine.check_health()


@pytest.mark.parametrize(
    ("device", "avx512_bf16", "amx", "expected"),
    [
        ("cpu", False, False, torch.float32),  # AVX2 only (this project's machines): bf16 is emulated, 2x slower
        ("cpu", True, False, torch.bfloat16),
        ("cpu", False, True, torch.bfloat16),
        ("cuda", False, False, torch.bfloat16),
        ("mps", True, True, torch.float32),
    ],
)
def test_auto_precision_is_bf16_only_where_the_hardware_computes_in_it(
    monkeypatch: pytest.MonkeyPatch, device: str, avx512_bf16: bool, amx: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert dtype_for(torch.device(device)) == expected
    assert dtype_for(torch.device(device), HfDtype.BFLOAT16) == torch.bfloat16  # HF_DTYPE wins
    assert dtype_for(torch.device(device), HfDtype.FLOAT32) == torch.float32


@pytest.mark.parametrize("requested", ["bfloat16", "float32"])
async def test_the_model_is_loaded_in_hf_dtype_and_reads_a_page(tiny_checkpoint: Path, requested: str) -> None:
    async with HuggingFaceEngine(engine_settings(tiny_checkpoint, hf_dtype=requested)) as engine:
        assert engine._model is not None
        assert engine._model.dtype == getattr(torch, requested)
        assert_valid(await engine.recognize(page(1), GREEDY))


async def test_a_local_checkpoint_that_does_not_load_says_what_to_check(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the hub's advice (`hf download /some/dir` means nothing): what is missing, or what cannot be read."""
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_checkpoint, incomplete, ignore=shutil.ignore_patterns("*.safetensors"))
    engine = HuggingFaceEngine(engine_settings(incomplete, model_load_retry_s=0))
    with pytest.raises(EngineUnavailable) as missing:
        await engine.start()
    assert f"Check that {incomplete} holds a complete checkpoint" in missing.value.message
    assert "hf download" not in missing.value.message

    unreadable = tmp_path / "unreadable"
    shutil.copytree(tiny_checkpoint, unreadable)
    real_access = os.access

    def failing_load(*_: object) -> None:  # what transformers raises for weights it may not open
        raise OSError(f"No such file or directory: {unreadable}/model.safetensors")

    # Root reads every file: the weights are made unreadable to the engine's check, and the load fails as it would.
    monkeypatch.setattr("app.engines.huggingface.os.access",
                        lambda path, mode: Path(path).suffix != ".safetensors" and real_access(path, mode))  # fmt: skip
    monkeypatch.setattr("app.engines.huggingface._load_classes", failing_load)
    engine = HuggingFaceEngine(engine_settings(unreadable, model_load_retry_s=0))
    with pytest.raises(EngineUnavailable) as refused:
        await engine.start()
    assert f"cannot read model.safetensors in {unreadable}: fix their permissions" in refused.value.message


async def test_check_health_before_start_and_after_close(tiny_checkpoint: Path) -> None:
    engine = HuggingFaceEngine(engine_settings(tiny_checkpoint, retry_after_s=9))
    assert "not loaded" in engine.info().device
    with pytest.raises(EngineNotReady) as before:
        await engine.check_health()
    assert before.value.retry_after == 9
    await engine.start()
    try:
        await engine.check_health()
        assert engine.info().device == "cpu"
    finally:
        await engine.close()
    with pytest.raises(EngineNotReady):
        await engine.check_health()


async def test_cuda_on_a_cpu_only_machine_falls_back_with_one_warning(
    tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: no fallback to observe")
    caplog.set_level(logging.WARNING, logger="app.engines.huggingface")
    async with HuggingFaceEngine(engine_settings(tiny_checkpoint, device="cuda")) as engine:
        assert engine.info().device == "cpu"
        assert_valid(await engine.recognize(page(1), GREEDY))
    warnings = [r for r in caplog.records if r.name == "app.engines.huggingface" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "cuda" in warnings[0].getMessage().lower()
    assert "cpu" in warnings[0].getMessage().lower()


def assert_tells_what_to_do(error: EngineUnavailable, model_name: str) -> None:
    message = str(error)
    assert model_name in message
    assert "hf download" in message
    assert "local directory" in message
    assert_command_exists(message)


def assert_command_exists(message: str) -> None:
    """Issue 9 bug 8: the advice named `huggingface-cli`, gone from the locked huggingface_hub.

    The command in backticks must be one the installed hub client has, with the options it names.
    """
    match = re.search(r"`((?:hf|huggingface-cli) download [^`]*)`", message)
    assert match is not None, message
    words = shlex.split(match.group(1))
    executable = Path(sys.executable).parent / words[0]
    assert executable.exists(), f"{words[0]} is not installed with huggingface_hub"
    help_text = subprocess.run([str(executable), *words[1:2], "--help"], capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0, help_text.stderr
    for option in (word for word in words if word.startswith("--")):
        assert option in help_text.stdout, f"{option} is not an option of `{words[0]} download`"


@pytest.mark.usefixtures("offline_hub")
async def test_unknown_hub_id_offline_is_unavailable_with_instructions(tmp_path: Path) -> None:
    name = "no-such-org-lightonocr-tests/no-such-model"
    engine = HuggingFaceEngine(engine_settings(name, model_cache_dir=tmp_path / "cache", model_load_retry_s=0))
    with pytest.raises(EngineUnavailable) as raised:
        await engine.start()
    assert_tells_what_to_do(raised.value, name)
    assert "HF_HUB_OFFLINE" in raised.value.message  # says at once why, without trying the network
    with pytest.raises(EngineUnavailable, match="HF_HUB_OFFLINE"):
        await engine.check_health()
    await engine.close()


@pytest.mark.usefixtures("offline_hub")
async def test_missing_local_directory_is_unavailable_with_instructions(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-checkpoint")
    engine = HuggingFaceEngine(engine_settings(missing, model_cache_dir=tmp_path / "cache", model_load_retry_s=0))
    try:
        with pytest.raises(EngineUnavailable) as raised:
            await engine.start()
        assert_tells_what_to_do(raised.value, missing)
    finally:
        await engine.close()


# --------------------------------------------------------------------------- recognition


async def test_recognize_returns_a_bounded_generation(engine: HuggingFaceEngine) -> None:
    for sampling in (SAMPLED, GREEDY):
        assert_valid(await engine.recognize(page(1), sampling))
    short = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=3)
    assert_valid(await engine.recognize(page(2), short), max_new_tokens=3)


async def test_concurrent_pages_of_different_sizes_are_decoded_together(engine: HuggingFaceEngine) -> None:
    images = [page(i) for i in range(1, 7)]
    assert len({image.size for image in images}) > 1
    results = await asyncio.gather(*(engine.recognize(image, SAMPLED) for image in images))
    for result in results:
        assert_valid(result)
    sizes = list(engine.batch_sizes)
    assert sum(sizes) == len(images)
    assert max(sizes) > 1
    assert max(sizes) <= MAX_BATCH


@dataclass
class GenerateCall:
    prompt_lengths: list[int]  # real (unpadded) prompt length of each row
    logits: torch.Tensor  # (rows, steps, vocab), float32


def record_generate(engine: HuggingFaceEngine, monkeypatch: pytest.MonkeyPatch) -> list[GenerateCall]:
    """Wrap the model's `generate` to keep each call's prompt lengths and per-step logits."""
    model = engine._model
    assert model is not None
    original: Callable[..., Any] = model.generate
    calls: list[GenerateCall] = []

    def generate(**kwargs: Any) -> Any:
        output = original(**kwargs, return_dict_in_generate=True, output_logits=True)
        lengths = [int(n) for n in kwargs["attention_mask"].sum(dim=1).tolist()]
        calls.append(GenerateCall(lengths, torch.stack(output.logits, dim=1).float()))
        return output.sequences

    monkeypatch.setattr(model, "generate", generate)
    return calls


async def test_greedy_results_do_not_depend_on_batching(
    engine: HuggingFaceEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left padding is right: each page decodes the same alone and inside a batch of mixed sizes.

    The random model's greedy tokens barely depend on the image, so the per-step
    logits are compared too: with right padding they would be read at pad
    positions and differ by far more than bf16 rounding.
    """
    calls = record_generate(engine, monkeypatch)
    images = [page(i) for i in range(1, 5)]
    alone = [await engine.recognize(image, GREEDY) for image in images]
    together = await asyncio.gather(*(engine.recognize(image, GREEDY) for image in images))

    assert list(engine.batch_sizes) == [1, 1, 1, 1, 4]
    assert together == alone
    batch = calls[-1]
    assert len(set(batch.prompt_lengths)) == len(images)  # really padded
    for row, call in enumerate(calls[:-1]):
        assert call.prompt_lengths == [batch.prompt_lengths[row]]
        steps = min(call.logits.shape[1], batch.logits.shape[1])
        difference = (call.logits[0, :steps] - batch.logits[row, :steps]).abs().max().item()
        assert difference < 0.02, f"page {row + 1}: logits differ by {difference} alone vs batched"
    # The check has teeth: the image does change the logits (by much more than the tolerance).
    between_pages = (calls[0].logits[0, 0] - calls[1].logits[0, 0]).abs().max().item()
    assert between_pages > 0.05


async def test_the_vision_encoder_sees_one_page_at_a_time(
    engine: HuggingFaceEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's pages are encoded one by one: Pixtral's dense block mask is quadratic in the batch.

    The features match the batched encoder's (the block mask keeps pages apart), so the
    model reads the same thing at a cost linear in the batch size.
    """
    model = engine._model
    assert model is not None
    encoder = model.model.vision_encoder
    seen: list[int] = []
    original_forward = encoder.forward

    def forward(pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(len(kwargs["image_sizes"]))
        return original_forward(pixel_values, *args, **kwargs)

    monkeypatch.setattr(encoder, "forward", forward)
    images = [page(i) for i in range(1, 5)]
    engine.batch_sizes.clear()
    await asyncio.gather(*(engine.recognize(image, GREEDY) for image in images))
    assert list(engine.batch_sizes) == [4]
    assert seen == [1, 1, 1, 1]

    # Same features as one batched call of the unwrapped encoder.
    processor = engine._processor
    assert processor is not None
    conversation: Any = [[{"role": "user", "content": [{"type": "image"}]}]] * 4
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[[image] for image in images], return_tensors="pt", padding=True)
    pixels, sizes = inputs["pixel_values"].to(model.dtype), inputs["image_sizes"]
    with torch.inference_mode():
        one_by_one = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        together = type(model.model).get_image_features(model.model, pixel_values=pixels, image_sizes=sizes)
    assert len(one_by_one) == len(together.pooler_output) == 4
    for alone, batched in zip(one_by_one, together.pooler_output, strict=True):
        assert alone.shape == batched.shape
        assert (alone.float() - batched.float()).abs().max().item() < 0.02


async def test_a_failed_batch_fails_only_its_callers(
    engine: HuggingFaceEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `generate` runs once per sampling group: pages with POISON never share a call with the others.
    poison = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=3)
    original = engine._generate

    def generate(group: list[_Pending]) -> list[Generation]:
        if any(pending.sampling == poison for pending in group):
            raise RuntimeError("the processor choked on this page")
        return original(group)

    monkeypatch.setattr(engine, "_generate", generate)
    results = await asyncio.gather(
        engine.recognize(page(1), poison),
        engine.recognize(page(2), GREEDY),
        engine.recognize(page(3), poison),
        engine.recognize(page(4), GREEDY),
        return_exceptions=True,
    )
    for failed in (results[0], results[2]):
        assert isinstance(failed, PageRejected)  # the exception's own words go to the log only
    for served in (results[1], results[3]):
        assert isinstance(served, Generation)
        assert_valid(served)

    # The batcher survived: the engine is healthy and keeps serving.
    await engine.check_health()
    assert_valid(await engine.recognize(page(1), GREEDY))


async def test_a_page_that_fails_is_isolated_and_the_rest_of_its_batch_is_answered(
    engine: HuggingFaceEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One page the model cannot take fails alone; its batch-mates get what they get without it."""
    images = [page(i) for i in range(1, 5)]
    alone = [await engine.recognize(image, GREEDY) for image in images]
    bad = make_marked_image(9, 168, 140)  # a size no other page has: the fault recognises it
    original = engine._generate

    def generate(group: list[_Pending]) -> list[Generation]:
        if any(pending.image.size == bad.size for pending in group):
            raise RuntimeError("calculated shape of the array of sliding blocks as (55, 0)")
        return original(group)

    monkeypatch.setattr(engine, "_generate", generate)
    engine.batch_sizes.clear()
    results = await asyncio.gather(
        *(engine.recognize(image, GREEDY) for image in images[:2]),
        engine.recognize(bad, GREEDY),
        engine.recognize(images[2], GREEDY),
        return_exceptions=True,
    )
    failed = results[2]
    assert isinstance(failed, PageRejected)
    assert "sliding blocks" not in failed.message  # the detail is logged, not sent
    assert any("sliding blocks" in record.getMessage() for record in caplog.records)
    assert results[:2] + results[3:] == alone[:3]  # as if the bad page had never been there
    assert engine.batch_sizes[0] == 4
    assert len(engine.batch_sizes) > 1

    # The batcher survived: the engine keeps serving in batches.
    engine.batch_sizes.clear()
    assert await asyncio.gather(*(engine.recognize(image, GREEDY) for image in images)) == alone
    assert list(engine.batch_sizes) == [4]


async def test_out_of_memory_splits_the_batch_instead_of_failing_it(
    engine: HuggingFaceEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that does not fit (CUDA OOM, injected: no GPU here) is split until it fits."""
    images = [page(i) for i in range(1, 5)]
    alone = [await engine.recognize(image, GREEDY) for image in images]
    original = engine._generate
    freed: list[bool] = []
    monkeypatch.setattr("app.engines.huggingface._free_accelerator_memory", lambda: freed.append(True))

    def generate(group: list[_Pending]) -> list[Generation]:
        if len(group) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(group)

    monkeypatch.setattr(engine, "_generate", generate)
    engine.batch_sizes.clear()
    assert await asyncio.gather(*(engine.recognize(image, GREEDY) for image in images)) == alone
    assert list(engine.batch_sizes) == [4, 2, 1, 1, 2, 1, 1]
    assert len(freed) == 3  # the cache is emptied after every out-of-memory

    # One page that alone does not fit fails alone, with its own error.
    monkeypatch.setattr(engine, "_generate", lambda group: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("OOM")))
    with pytest.raises(EngineError, match="memory") as caught:
        await engine.recognize(images[0], GREEDY)
    assert type(caught.value) is EngineError


async def test_pages_thinner_than_a_merged_patch_are_padded_to_it(engine: HuggingFaceEngine) -> None:
    """The minimum comes from the loaded processor (patch 14 x merge 2 for the tiny checkpoint)."""
    assert engine._min_side == 28
    for size in [(20, 1540), (1540, 10), (13, 900), (1, 1540), (27, 27), (1, 1)]:
        assert_valid(await engine.recognize(Image.new("RGB", size, "white"), GREEDY))


# --------------------------------------------------------------------------- shutdown


@dataclass
class Blocked:
    """An engine whose one-page batches block inside `generate` until released."""

    engine: HuggingFaceEngine
    entered: threading.Event
    release: threading.Event


@pytest.fixture
async def blocked(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Blocked]:
    engine = HuggingFaceEngine(engine_settings(tiny_checkpoint, hf_max_batch_size=1))
    await engine.start()
    state = Blocked(engine, threading.Event(), threading.Event())
    original = engine._generate

    def generate(group: list[_Pending]) -> list[Generation]:
        state.entered.set()
        assert state.release.wait(timeout=60)
        return original(group)

    monkeypatch.setattr(engine, "_generate", generate)
    try:
        yield state
    finally:
        state.release.set()
        await engine.close()


async def close_while_generating(state: Blocked) -> tuple[asyncio.Task[Generation], asyncio.Task[Generation]]:
    """Page 1 is inside `generate`, page 2 waits in the queue, then close() runs; returns both callers."""
    in_flight = asyncio.create_task(state.engine.recognize(page(1), GREEDY))
    queued = asyncio.create_task(state.engine.recognize(page(2), GREEDY))
    assert await asyncio.to_thread(state.entered.wait, 60)
    await settle()
    assert not queued.done()
    closing = asyncio.create_task(state.engine.close())
    await settle()  # close() has asked the batcher to stop while the batch is still running
    state.release.set()
    await closing
    await settle()
    return in_flight, queued


async def test_close_fails_queued_callers(blocked: Blocked) -> None:
    in_flight, queued = await close_while_generating(blocked)
    try:
        assert queued.done(), "a queued caller was left hanging by close()"
        assert isinstance(queued.exception(), EngineUnavailable)
    finally:
        in_flight.cancel()
        queued.cancel()
        await settle()


async def test_close_fails_in_flight_callers(blocked: Blocked) -> None:
    in_flight, queued = await close_while_generating(blocked)
    try:
        assert in_flight.done(), "the caller whose page was being generated was left hanging by close()"
        assert isinstance(in_flight.exception(), EngineUnavailable | EngineError)
    finally:
        in_flight.cancel()
        queued.cancel()
        await settle()
