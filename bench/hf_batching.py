"""Pages/s against HF_MAX_BATCH_SIZE on CPU, tiny random LightOnOCR through HuggingFaceEngine.

    uv run python -m bench.hf_batching [--pages 32] [--batch-sizes 1 2 4 8 16] [--size 400x520]

The tiny checkpoint (tests/support/tiny_checkpoint.py: real classes and processor, random
weights) says nothing about the real model's speed; this measures what batching buys
the engine's own machinery (processor, padding, `generate`, the batcher) on this machine.
All pages are submitted at once; `batches` is what the batcher actually formed. Outputs
stop at random EOS tokens, so tokens/s is reported beside pages/s.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch

from app.engines.base import Sampling
from app.engines.huggingface import HuggingFaceEngine
from app.settings import load_settings
from bench.common import print_header, print_table
from tests.support.documents import make_marked_image
from tests.support.tiny_checkpoint import build_tiny_checkpoint


async def run(checkpoint: Path, batch: int, pages: int, size: tuple[int, int], max_new_tokens: int) -> list[object]:
    settings = load_settings(
        _env_file=None,
        model_source="huggingface",
        model_name=str(checkpoint),
        device="cpu",
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
    return [batch, pages / elapsed, tokens / elapsed, tokens / pages, ",".join(map(str, batches)), elapsed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--size", default="400x520", help="page size in pixels, WxH")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    print_header(f"HuggingFaceEngine on CPU, tiny model, {args.pages} pages of {width}x{height}")
    print(f"torch threads: {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_tiny_checkpoint(Path(tmp))
        for batch in args.batch_sizes:
            rows.append(asyncio.run(run(checkpoint, batch, args.pages, (width, height), args.max_new_tokens)))
    print_table(["batch size", "pages/s", "tokens/s", "tokens/page", "batches formed", "seconds"], rows)


if __name__ == "__main__":
    main()
