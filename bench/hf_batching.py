"""Pages/s against HF_MAX_BATCH_SIZE, random LightOnOCR through the service's HuggingFaceEngine.

    uv run python -m bench.hf_batching [--pages 32] [--batch-sizes 1 2 4 8 16] [--size 400x520]
    uv run python -m bench.hf_batching --full-size --device cuda --size 1190x1540 --max-new-tokens 256

`--full-size` swaps the tiny model for `LightOnOcrConfig()`'s 1B architecture (random bf16 weights,
full 151,936-token head) behind the tiny checkpoint's processor: the engine's real path on a GPU
(processor, batcher, padding, `generate`, decoding) at the real model's cost per token.

The tiny checkpoint (tests/support/tiny_checkpoint.py: real classes and processor, random
weights) says nothing about the real model's speed; this measures what batching buys
the engine's own machinery (processor, padding, `generate`, the batcher) on this machine.
All pages are submitted at once; `batches` is what the batcher actually formed. Outputs
stop at random EOS tokens, so tokens/s is reported beside pages/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from app.engines.base import Sampling
from app.engines.huggingface import HuggingFaceEngine
from app.settings import load_settings
from bench.common import print_header, print_table
from tests.support.documents import make_marked_image
from tests.support.tiny_checkpoint import build_tiny_checkpoint


def make_full_size(checkpoint: Path) -> None:
    """Replace the tiny model in `checkpoint` by the full-size architecture, keeping its token ids."""
    from transformers import GenerationConfig, LightOnOcrConfig, LightOnOcrForConditionalGeneration

    tiny = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    config = LightOnOcrConfig(image_token_id=tiny["image_token_id"])
    text: Any = config.text_config
    text.eos_token_id = tiny["text_config"]["eos_token_id"]
    text.pad_token_id = tiny["text_config"]["pad_token_id"]
    text.bos_token_id = None
    torch.manual_seed(0)
    generation = GenerationConfig.from_pretrained(checkpoint)
    model: Any = LightOnOcrForConditionalGeneration(config)
    model = model.to(torch.bfloat16)
    model.generation_config = generation
    for stale in checkpoint.glob("model*.safetensors*"):
        stale.unlink()
    model.save_pretrained(checkpoint)


async def run(
    checkpoint: Path, device: str, batch: int, pages: int, size: tuple[int, int], max_new_tokens: int
) -> list[object]:
    settings = load_settings(
        _env_file=None,
        model_source="huggingface",
        model_name=str(checkpoint),
        device=device,
        hf_max_batch_size=batch,
        hf_batch_wait_ms=50,
        max_new_tokens=max_new_tokens,
    )
    images = [make_marked_image(i + 1, *size) for i in range(pages)]
    sampling = Sampling(0.2, 0.9, max_new_tokens)
    async with HuggingFaceEngine(settings) as engine:
        await engine.recognize(images[0], sampling)  # warm-up
        engine.batch_sizes.clear()
        started = time.perf_counter()
        results = await asyncio.gather(*(engine.recognize(image, sampling) for image in images))
        elapsed = time.perf_counter() - started
        batches = sorted(set(engine.batch_sizes))
    tokens = sum(result.tokens for result in results)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return [batch, pages / elapsed, tokens / elapsed, tokens / pages, ",".join(map(str, batches)), peak, elapsed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--size", default="400x520", help="page size in pixels, WxH")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", choices=["cpu", "cuda", "mps"], default="cpu")
    parser.add_argument("--full-size", action="store_true", help="the 1B architecture instead of the tiny one")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    kind = "full-size (1B, random weights)" if args.full_size else "tiny"
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    print_header(f"HuggingFaceEngine on {args.device}{gpu}, {kind} model, {args.pages} pages of {width}x{height}")
    print(f"torch threads: {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_tiny_checkpoint(Path(tmp))
        if args.full_size:
            make_full_size(checkpoint)
        for batch in args.batch_sizes:
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            size = (width, height)
            rows.append(asyncio.run(run(checkpoint, args.device, batch, args.pages, size, args.max_new_tokens)))
    headers = ["batch size", "pages/s", "tokens/s", "tokens/page", "batches formed", "peak GiB", "seconds"]
    print_table(headers, rows)


if __name__ == "__main__":
    main()
