"""Full-size LightOnOCR `generate` on a GPU: pages/s, tokens/s and peak memory against batch size.

    uv run python -m bench.hf_batching_gpu [--batch-sizes 1 2 4 8 16 32 64] [--new-tokens 512 1024]
        [--attn sdpa|eager] [--static-cache] [--compile] [--page 1190x1540]
    uv run python -m bench.hf_batching_gpu --smoke      # tiny config on CPU: checks the script runs

No download: the architecture is `LightOnOcrConfig()`'s defaults (Pixtral 24 layers + Qwen3
28 layers, 1B parameters) with random weights in bf16. Inputs are built directly, without
a processor: the chat prompt's shape with (H/28)*(W/28) image tokens (2,310 for a US-Letter
page at 1190x1540) and random pixel_values at the page's patch-aligned size. Every row
generates exactly N tokens (min_new_tokens = max_new_tokens), so batches compare fairly;
sampling is the authors' (temperature 0.2, top_p 0.9). The speed of random weights equals
the real model's: same shapes, same kernels.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from transformers import LightOnOcrConfig, LightOnOcrForConditionalGeneration

from bench.common import print_header, print_table

# <|im_start|>system<|im_end|>\n<|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n (REFERENCE.md);
# the text tokens' ids do not matter for speed, only their number.
PROMPT_PREFIX = 8
PROMPT_SUFFIX = 6


def smoke_config() -> LightOnOcrConfig:
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    return LightOnOcrConfig(
        spatial_merge_size=2,
        image_token_id=151655,
        vision_config={"model_type": "pixtral", **small, "head_dim": 32, "image_size": 1540, "patch_size": 14},
        text_config={"model_type": "qwen3", **small, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 151936},
    )


def page_inputs(config: LightOnOcrConfig, batch: int, width: int, height: int, device: torch.device) -> dict[str, Any]:
    vision: Any = config.vision_config
    patch: int = vision.patch_size
    merge: int = config.spatial_merge_size
    h, w = height // (patch * merge) * patch * merge, width // (patch * merge) * patch * merge
    image_tokens = (h // (patch * merge)) * (w // (patch * merge))
    text = torch.full((batch, PROMPT_PREFIX + image_tokens + PROMPT_SUFFIX), 100, dtype=torch.long)
    text[:, PROMPT_PREFIX : PROMPT_PREFIX + image_tokens] = config.image_token_id
    return {
        "input_ids": text.to(device),
        "attention_mask": torch.ones_like(text).to(device),
        "pixel_values": torch.randn(batch, 3, h, w).to(device, torch.bfloat16),
        "image_sizes": torch.tensor([[h, w]] * batch).to(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")
    parser.add_argument("--static-cache", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward (implies --static-cache)")
    parser.add_argument("--page", default="1190x1540", help="page size in pixels, WxH")
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU, batch 1-2, 4 tokens")
    args = parser.parse_args()
    if args.smoke:
        args.batch_sizes, args.new_tokens, args.page = [1, 2], [4], "280x364"
    width, height = (int(v) for v in args.page.split("x"))

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke here, or on a GPU machine")
    config = smoke_config() if args.smoke else LightOnOcrConfig()
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    model: Any = LightOnOcrForConditionalGeneration(config)
    model = model.to(device, torch.bfloat16).eval()
    if args.static_cache or args.compile:
        model.generation_config.cache_implementation = "static"
    if args.compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print_header(
        f"LightOnOCR generate, {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B params, {gpu}, "
        f"attn={args.attn} static_cache={args.static_cache or args.compile} compile={args.compile} page={args.page}"
    )

    rows: list[list[object]] = []
    for new_tokens in args.new_tokens:
        for batch in args.batch_sizes:
            inputs = page_inputs(config, batch, width, height, device)
            options: dict[str, Any] = {
                "max_new_tokens": new_tokens,
                "min_new_tokens": new_tokens,
                "do_sample": True,
                "temperature": 0.2,
                "top_p": 0.9,
                "top_k": None,
            }
            try:
                with torch.inference_mode():
                    model.generate(**inputs, **{**options, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    started = time.perf_counter()
                    output = model.generate(**inputs, **options)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - started
            except torch.OutOfMemoryError:
                rows.append([new_tokens, batch, "OOM", "", "", ""])
                torch.cuda.empty_cache()
                continue
            generated = output.shape[1] - inputs["input_ids"].shape[1]
            assert generated == new_tokens, (generated, new_tokens)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            rows.append([new_tokens, batch, batch / elapsed, batch * new_tokens / elapsed, peak, elapsed])
            del output, inputs
    image_tokens = page_inputs(config, 1, width, height, torch.device("cpu"))["input_ids"].shape[1]
    print(f"prompt tokens per page (image + chat template): {image_tokens}")
    print_table(["new tokens", "batch", "pages/s", "tokens/s", "peak GiB", "seconds"], rows)


if __name__ == "__main__":
    main()
