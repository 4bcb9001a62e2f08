"""In-process engine: LightOnOCR with transformers, pages decoded together in batches.

Concurrent `recognize` calls (one document's pages, or several requests at
once) land in a queue; a single batcher task takes up to HF_MAX_BATCH_SIZE of
them and runs one `generate` in a worker thread, so the event loop never
blocks and the accelerator sees full batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from PIL import Image

if TYPE_CHECKING:
    import torch
    from transformers import LightOnOcrForConditionalGeneration, LightOnOcrProcessor

from app.background import cancel_and_wait
from app.engines.base import EngineBase, EngineInfo, Sampling
from app.engines.hub import looks_like_path, resolve_checkpoint
from app.errors import EngineError, EngineNotReady, EngineUnavailable, PageRejected, ServiceUnavailable
from app.intake.document import pad_to_min_side
from app.profiles import Architecture, Profile, active_profile
from app.results import FinishReason, Generation
from app.settings import Device, HfDtype, Settings

log = logging.getLogger(__name__)


def conversation(prompt: str | None) -> list[dict[str, Any]]:
    """The authors' request (REFERENCE.md, LightOn's client): one user turn holding the image, then the
    text part when one is asked for (generation 3's `grounding`)."""
    content: list[dict[str, Any]] = [{"type": "image"}]
    if prompt is not None:
        content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def architecture_of(checkpoint: Path) -> Architecture:
    """Which classes load the checkpoint, from its config.json's model_type.

    `qwen3_5`: LightOnOCR-3 0.8B and 4B (Qwen3.5-VL). Anything else is loaded with the LightOnOcr
    classes (generation 1-2 and 3-1B say `mistral3` or `lighton_ocr`, which Auto* would get wrong).
    """
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "lightonocr"  # the load itself reports the missing or broken file
    return "qwen3_5" if isinstance(config, dict) and config.get("model_type") == "qwen3_5" else "lightonocr"


def encode_images_one_by_one(inner: Any) -> None:
    """Run the vision encoder once per page instead of once per batch.

    transformers' Pixtral encoder concatenates a batch's images into one sequence with a dense
    block-diagonal mask: memory and attention work grow with the square of the batch (measured on
    an H200, US-Letter pages: 14.9 GiB at 8 pages, 48.6 GiB at 16, out of memory at 32; see
    docs/benchmarks.md). Pages never attend to each other, so encoding them one by one gives the
    same features at a cost linear in the batch.
    """
    batched = inner.get_image_features

    def per_image(pixel_values: Any, image_sizes: Any, **kwargs: Any) -> Any:
        if len(image_sizes) <= 1:
            return batched(pixel_values=pixel_values, image_sizes=image_sizes, **kwargs)
        outputs = [
            batched(pixel_values=pixel_values[i : i + 1], image_sizes=image_sizes[i : i + 1], **kwargs)
            for i in range(len(image_sizes))
        ]
        merged = outputs[0]
        merged.pooler_output = tuple(feature for output in outputs for feature in output.pooler_output)
        merged.last_hidden_state = None  # per-page states have different lengths; generate reads pooler_output
        return merged

    inner.get_image_features = per_image


def resolve_device(requested: Device) -> torch.device:
    """Requested device if present, else CPU with one warning."""
    import torch

    if requested is Device.CUDA and not torch.cuda.is_available():
        log.warning("DEVICE=cuda but CUDA is not available: falling back to CPU")
        return torch.device("cpu")
    if requested is Device.MPS and not torch.backends.mps.is_available():
        log.warning("DEVICE=mps but MPS is not available: falling back to CPU")
        return torch.device("cpu")
    return torch.device(requested.value)


def dtype_for(device: torch.device, requested: HfDtype = HfDtype.AUTO) -> torch.dtype:
    """HF_DTYPE, or by default bf16 where the hardware computes in it: CUDA, and CPUs with AVX512-BF16 or AMX.

    Elsewhere float32: on an AVX2-only CPU bf16 goes through conversions and reads a page 2x slower than float32
    (docs/benchmarks.md §7: 792 s vs 400 s, for twice the memory); MPS kernels are incomplete for bf16.
    """
    import torch

    if requested is not HfDtype.AUTO:
        return torch.bfloat16 if requested is HfDtype.BFLOAT16 else torch.float32
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return torch.float32


@dataclass
class _Pending:
    image: Image.Image
    sampling: Sampling
    future: asyncio.Future[Generation] = field(repr=False)
    # The caller's context (its request id): the batcher logs a page's failure under it.
    context: contextvars.Context = field(default_factory=contextvars.copy_context, repr=False)

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class HuggingFaceEngine(EngineBase):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._profile: Profile = active_profile(settings).row
        self._device: torch.device | None = None
        self._model: LightOnOcrForConditionalGeneration | None = None
        self._processor: LightOnOcrProcessor | None = None
        self._stop_ids: set[int] = set()
        # Smallest side the processor can take (patch size x spatial merge); known once loaded.
        self._min_side = 0
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._batcher: asyncio.Task[None] | None = None
        self._status: tuple[type[ServiceUnavailable], str] = (EngineNotReady, "the model is not loaded")
        # Sizes of recent `generate` batches: the evidence that concurrent pages are decoded together.
        self.batch_sizes: deque[int] = deque(maxlen=1000)

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model; while it cannot be loaded, say why in `check_health` and try again.

        With MODEL_LOAD_RETRY_S > 0 a failed load (hub unreachable, offline with an empty
        cache, no checkpoint in the MODEL_NAME directory yet) is retried on that schedule
        until it succeeds, so the service becomes ready without a restart.
        """
        retry_s = self._settings.model_load_retry_s
        last_failure = ""
        while True:
            self._set_status(EngineNotReady, "loading the model")
            try:
                await anyio.to_thread.run_sync(self._load)
                break
            except EngineUnavailable as exc:
                if retry_s <= 0:
                    self._set_status(EngineUnavailable, exc.message)
                    raise
                self._set_status(EngineUnavailable, f"{exc.message}; retrying in {retry_s:g} s")
                if exc.message != last_failure:  # one line per new reason, not one per attempt
                    log.warning("the model cannot be loaded: %s; retrying every %g s", exc.message, retry_s)
                    last_failure = exc.message
                await asyncio.sleep(retry_s)
        self._batcher = asyncio.create_task(self._run_batches(), name="hf-batcher")

    def startup_status(self) -> tuple[type[ServiceUnavailable], str]:
        return self._status

    def _set_status(self, kind: type[ServiceUnavailable], message: str) -> None:
        """What `check_health` answers until the model is in (set from the loading thread too)."""
        self._status = (kind, message)

    def _load(self) -> None:
        settings = self._settings
        device = resolve_device(settings.device)
        source = settings.model_name
        checkpoint = resolve_checkpoint(
            source, settings.model_cache_dir, lambda message: self._set_status(EngineNotReady, message)
        )
        self._set_status(EngineNotReady, f"loading the weights on {device}")
        dtype = dtype_for(device, settings.hf_dtype)
        log.info("loading %s on %s (%s)", checkpoint, device, dtype)
        # Imported here, in the loading thread: importing torch takes seconds and must not hold up the
        # event loop (the app answers /health while this runs).
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        architecture = architecture_of(Path(checkpoint))
        if architecture != self._profile.architecture:
            log.warning(
                "the checkpoint's config says %s but the profile %s is %s: loading it as its config says",
                architecture,
                self._profile.name,
                self._profile.architecture,
            )
        try:
            processor, model = _load_classes(architecture, Path(checkpoint), dtype)
        except (OSError, ValueError) as exc:  # a missing file is an OSError; a bad config a ValueError
            log.warning("cannot load the checkpoint in %s: %s", checkpoint, exc)
            advice = _load_advice(source, Path(checkpoint), settings.model_cache_dir)
            raise EngineUnavailable(f"cannot load model {source!r}: {exc}. {advice}") from exc
        model.to(device)
        model.eval()
        if architecture == "lightonocr":
            encode_images_one_by_one(model.model)
        processor.tokenizer.padding_side = "left"  # batched decoding needs prompts aligned on the right
        tokenizer = processor.tokenizer
        stop_ids = set(_as_list(model.generation_config.eos_token_id))
        stop_ids.update(_as_list(tokenizer.eos_token_id))
        self._min_side = min_side_of(processor)
        self._device, self._model, self._processor, self._stop_ids = device, model, processor, stop_ids

    async def close(self) -> None:
        await cancel_and_wait(self._batcher)
        self._batcher = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(EngineUnavailable("the engine is shutting down"))
        self._model = None
        self._set_status(EngineNotReady, "the model is not loaded")

    async def check_health(self) -> None:
        if self._model is None or self._batcher is None or self._batcher.done():
            kind, message = self._status
            raise kind(message, retry_after=self._settings.retry_after_s)

    def info(self) -> EngineInfo:
        device = str(self._device) if self._device is not None else f"{self._settings.device.value} (not loaded)"
        return EngineInfo(
            engine="huggingface",
            model=self._settings.model_name,
            device=device,
            max_pages_in_flight=2 * self._settings.hf_max_batch_size,
        )

    # -- recognition ------------------------------------------------------------------

    async def recognize(self, image: Image.Image, sampling: Sampling) -> Generation:
        if self._batcher is None or self._batcher.done():
            raise EngineNotReady("the model is not loaded", retry_after=self._settings.retry_after_s)
        # A side shorter than one merged patch would make the processor fail: pad it with white.
        image = pad_to_min_side(image, self._min_side)
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(image, sampling, future))
        return await future

    async def _run_batches(self) -> None:
        max_batch = self._settings.hf_max_batch_size
        wait_s = self._settings.hf_batch_wait_ms / 1000
        while True:
            batch = [await self._queue.get()]
            try:
                # Give pages that arrive together a moment to join the batch.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        while len(batch) < max_batch:
                            batch.append(await self._queue.get())
                live = [p for p in batch if not p.future.done()]  # callers may have gone away
                for group in _group_by_sampling(live):
                    await self._run_group(group)
            finally:
                # On shutdown (cancellation) no caller of this batch may be left waiting.
                for pending in batch:
                    pending.fail(EngineUnavailable("the engine is shutting down"))

    async def _run_group(self, group: list[_Pending]) -> None:
        """Generate for `group`; a failing batch is split in halves until the failing page stands alone.

        One page the model cannot take must not fail the pages batched with it: they are
        generated again without it (a failed `generate` returns nothing for anyone). Out of
        memory is handled the same way: a batch that does not fit is split, not failed.
        """
        group = [p for p in group if not p.future.done()]
        if not group:
            return
        self.batch_sizes.append(len(group))
        try:
            results = await anyio.to_thread.run_sync(self._generate, group)
        except Exception as exc:  # one failed batch must not stop the batcher
            oom = _is_out_of_memory(exc)
            if oom:
                _free_accelerator_memory()
            if len(group) > 1:
                log.warning(
                    "generate %s for a batch of %d pages (%s); splitting it to isolate the cause",
                    "ran out of memory" if oom else "failed",
                    len(group),
                    _describe(exc),
                )
                half = len(group) // 2
                await self._run_group(group[:half])
                await self._run_group(group[half:])
                return
            pending = group[0]
            width, height = pending.image.size
            # Logged in the caller's context, so the line carries its request id.
            pending.context.run(
                log.error, "generate failed for a %dx%d page: %s", width, height, _describe(exc), exc_info=exc
            )
            if oom:
                pending.fail(EngineError("the page does not fit in the accelerator's memory"))
            else:
                pending.fail(PageRejected("the model cannot process this page (the detail is in the server log)"))
            return
        for pending, result in zip(group, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    def _generate(self, group: list[_Pending]) -> list[Generation]:
        import torch

        with torch.inference_mode():
            return self._generate_batch(group)

    def _generate_batch(self, group: list[_Pending]) -> list[Generation]:
        model, processor, device = self._model, self._processor, self._device
        if model is None or processor is None or device is None:
            raise EngineUnavailable("the model is not loaded")
        sampling = group[0].sampling
        prompt = self.prompt(sampling)
        inputs = processor(
            text=[prompt] * len(group), images=[p.image for p in group], return_tensors="pt", padding=True
        )
        inputs = inputs.to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        sample = sampling.temperature > 0
        output = model.generate(
            **inputs,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=None,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        return [self._decode(row, sampling.max_new_tokens) for row in new_tokens]

    def prompt(self, sampling: Sampling) -> str:
        """The chat template applied to the request, with the profile's switches (enable_thinking=False
        for the Qwen3.5-based checkpoints, as vLLM gets them in `chat_template_kwargs`)."""
        if self._processor is None:
            raise EngineUnavailable("the model is not loaded")
        prompt: str = self._processor.apply_chat_template(
            conversation(sampling.prompt),
            add_generation_prompt=True,
            tokenize=False,
            **self._profile.chat_template_kwargs,
        )
        return prompt

    def _decode(self, row: list[int], max_new_tokens: int) -> Generation:
        assert self._processor is not None
        end = next((i for i, token in enumerate(row) if token in self._stop_ids), None)
        finish: FinishReason = "stop" if end is not None or len(row) < max_new_tokens else "length"
        tokens = row[:end] if end is not None else row
        text = self._processor.tokenizer.decode(tokens, skip_special_tokens=True)
        return Generation(text=text.strip(), finish_reason=finish, tokens=len(tokens))


def _load_advice(source: str, checkpoint: Path, cache_dir: Path) -> str:
    """What to do about a checkpoint that does not load (transformers says "No such file" for an unreadable one)."""
    try:
        unreadable = sorted(f.name for f in checkpoint.iterdir() if f.is_file() and not os.access(f, os.R_OK))
    except OSError:  # not a directory, or one this user cannot list
        unreadable = [] if not checkpoint.is_dir() else ["its file list"]
    if unreadable:
        return (
            f"This user (uid {os.getuid()}) cannot read {', '.join(unreadable)} in {checkpoint}: fix their permissions"
        )
    if looks_like_path(source) or Path(source).is_dir():
        return (
            f"Check that {checkpoint} holds a complete checkpoint (config.json, model*.safetensors, the processor "
            "and tokenizer files)"
        )
    return (
        f"If this machine is offline, download it elsewhere with `hf download {source} --cache-dir {cache_dir}` and "
        "copy the cache, or set MODEL_NAME to a local directory holding the checkpoint"
    )


def _load_classes(architecture: Architecture, checkpoint: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """(processor, model) from a directory, with the architecture's own classes.

    LightOnOCR-1/2 and 3-1B: the explicit LightOnOcr classes (the hub config says mistral3/Pixtral,
    which Auto* would pick wrongly). LightOnOCR-3 0.8B/4B: `Qwen3_5ForConditionalGeneration` and the
    checkpoint's own processor (Qwen3VLProcessor), whose video half needs torchvision in transformers 5.2x.
    """
    if architecture == "qwen3_5":
        from transformers import AutoProcessor, Qwen3_5ForConditionalGeneration

        try:
            processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)  # type: ignore[no-untyped-call]
        except (ImportError, AttributeError) as exc:
            raise EngineUnavailable(
                f"cannot build the Qwen3.5 processor of {checkpoint}: {exc!r}. transformers' Qwen3VLProcessor "
                "needs torchvision (for its video half) to be installed beside torch"
            ) from exc
        qwen = Qwen3_5ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype, local_files_only=True)
        return processor, qwen
    from transformers import LightOnOcrForConditionalGeneration, LightOnOcrProcessor

    processor = LightOnOcrProcessor.from_pretrained(checkpoint, local_files_only=True)
    model = LightOnOcrForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype, local_files_only=True)
    return processor, model


def min_side_of(processor: Any) -> int:
    """The smallest image side the processor can take: one merged patch (patch size x spatial merge).

    Read from the loaded processor, so a checkpoint with other sizes gets its own minimum;
    28 (LightOnOCR's 14 x 2) when the processor does not say.
    """
    effective = getattr(processor, "effective_patch_size", None)
    if isinstance(effective, int) and effective > 0:
        return effective
    patch = getattr(getattr(processor, "image_processor", None), "patch_size", None) or getattr(
        processor, "patch_size", None
    )
    if isinstance(patch, dict):
        patch = max(int(patch.get("height", 0)), int(patch.get("width", 0))) or None
    # LightOnOcr's processor says spatial_merge_size; Qwen's image processor says merge_size (16 x 2 = 32).
    merge = (
        getattr(processor, "spatial_merge_size", None)
        or getattr(getattr(processor, "image_processor", None), "merge_size", None)
        or 1
    )
    if isinstance(patch, int) and isinstance(merge, int) and patch > 0:
        return patch * merge
    return 28


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the same failure worded by another backend (MPS, CPU allocator)."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return "out of memory" in str(exc).lower()


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _group_by_sampling(batch: list[_Pending]) -> list[list[_Pending]]:
    """`generate` takes one set of sampling parameters per call."""
    groups: dict[Sampling, list[_Pending]] = {}
    for pending in batch:
        groups.setdefault(pending.sampling, []).append(pending)
    return list(groups.values())
