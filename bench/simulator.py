"""A vLLM stand-in whose latency follows continuous batching, for throughput benchmarks.

    uv run python -m bench.simulator --port 8001 [--speed 1] [--seed 0] ...

OpenAI protocol on loopback (Starlette + uvicorn, like vLLM): `GET /v1/models`,
`POST /v1/chat/completions` with the authors' payload (one PNG data URL). It does no
inference; one engine loop advances all admitted requests together, as vLLM's scheduler does:

- A page's image tokens are (H // 28) * (W // 28), read from the PNG header (no decoding).
- Its output length is drawn from a seeded normal distribution (mean `--tokens-mean`,
  sd `--tokens-sd`, at least 16, at most `max_tokens`), keyed by the PNG's hash, so the
  same page always gets the same length whoever sends it.
- The loop runs steps. A step lasts `base_ms + per_seq_ms * running` (decode: one token
  for every running sequence), plus `prefill_ms_per_1k * image_tokens / 1000` for each
  request admitted at that step (its prefill joins the batch). At most `--max-num-seqs`
  run; the rest wait, first come first served, like vLLM's waiting queue.
- Every time is divided by `--speed`, so a benchmark can run the same shape faster.

Defaults are rough H100 figures for a 1B model: 10 ms + 0.2 ms per sequence per step
(64 in flight: 22.8 ms/step, ~2,800 tokens/s), prefill 20 ms per 1,000 image tokens,
600 ± 200 tokens per page: ≈ 4.7 pages/s at 64 in flight, near LightOn's published 5.71.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import random
import struct
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

DEFAULT_MODEL = "lightonai/LightOnOCR-2-1B"
DATA_URL_PREFIX = "data:image/png;base64,"
MAX_MODEL_LEN = 16384


@dataclass(frozen=True)
class LatencyModel:
    """The continuous-batching cost model (milliseconds before `speed` is applied)."""

    base_ms: float = 10.0
    per_seq_ms: float = 0.2
    prefill_ms_per_1k: float = 20.0
    tokens_mean: float = 600.0
    tokens_sd: float = 200.0
    max_num_seqs: int = 256
    speed: float = 1.0
    seed: int = 0

    def step_s(self, running: int, prefill_tokens: int) -> float:
        ms = self.base_ms + self.per_seq_ms * running + self.prefill_ms_per_1k * prefill_tokens / 1000
        return ms / 1000 / self.speed

    def output_tokens(self, png_digest: bytes, max_tokens: int) -> int:
        rng = random.Random(self.seed.to_bytes(8, "little") + png_digest)
        return max(1, min(max_tokens, max(16, round(rng.gauss(self.tokens_mean, self.tokens_sd)))))


@dataclass
class _Sequence:
    image_tokens: int
    remaining: int
    total: int
    done: asyncio.Future[None]
    prefilled: bool = False


@dataclass
class Engine:
    """One loop stepping every running sequence, as vLLM's engine core does."""

    model: LatencyModel
    waiting: deque[_Sequence] = field(default_factory=deque)
    running: list[_Sequence] = field(default_factory=list)
    max_in_flight: int = 0
    served: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def generate(self, image_tokens: int, tokens: int) -> None:
        sequence = _Sequence(image_tokens, tokens, tokens, asyncio.get_running_loop().create_future())
        self.waiting.append(sequence)
        self._wake.set()
        try:
            await sequence.done
        finally:
            if not sequence.done.done():  # client went away: abort, like vLLM
                sequence.done.cancel()

    async def run(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
            self.running = [s for s in self.running if not s.done.done()]
            while self.waiting and len(self.running) < self.model.max_num_seqs:
                sequence = self.waiting.popleft()
                if not sequence.done.done():
                    self.running.append(sequence)
            self.max_in_flight = max(self.max_in_flight, len(self.running) + len(self.waiting))
            prefill = sum(s.image_tokens for s in self.running if not s.prefilled)
            for sequence in self.running:
                sequence.prefilled = True
            await asyncio.sleep(self.model.step_s(len(self.running), prefill))
            for sequence in self.running:
                sequence.remaining -= 1
                if sequence.remaining <= 0 and not sequence.done.done():
                    sequence.done.set_result(None)
                    self.served += 1


def image_tokens_of(png: bytes) -> int:
    """(H // 28) * (W // 28) from the IHDR chunk, as vLLM counts a LightOnOCR image."""
    width, height = struct.unpack(">II", png[16:24])
    return int((height // 28) * (width // 28))


def fake_text(tokens: int, seed: bytes) -> str:
    """Non-repetitive words (about one per token), so the service's loop detector keeps quiet."""
    rng = random.Random(seed)
    words = [f"w{rng.randrange(10**9)}" for _ in range(tokens)]
    return "\n\n".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12))


def build_app(model: LatencyModel, served_model: str = DEFAULT_MODEL) -> Starlette:
    engine = Engine(model)

    async def models(request: Request) -> JSONResponse:
        card = {"id": served_model, "object": "model", "owned_by": "simulator", "max_model_len": MAX_MODEL_LEN}
        return JSONResponse({"object": "list", "data": [card]})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse({"served": engine.served, "max_in_flight": engine.max_in_flight})

    async def chat(request: Request) -> JSONResponse:
        started = time.time()
        body: dict[str, Any] = json.loads(await request.body())
        try:
            url: str = body["messages"][0]["content"][0]["image_url"]["url"]
            max_tokens = int(body["max_tokens"])
        except (KeyError, IndexError, TypeError, ValueError):
            return JSONResponse({"error": {"message": "not the authors' request shape"}}, 400)
        if not url.startswith(DATA_URL_PREFIX):
            return JSONResponse({"error": {"message": "expected a PNG data URL"}}, 400)
        head = base64.b64decode(url[len(DATA_URL_PREFIX) : len(DATA_URL_PREFIX) + 32])
        digest = hashlib.sha256(url.encode("ascii")).digest()
        tokens = model.output_tokens(digest, max_tokens)
        await engine.generate(image_tokens_of(head), tokens)
        return JSONResponse(
            {
                "id": f"chatcmpl-{digest.hex()[:16]}",
                "object": "chat.completion",
                "created": int(started),
                "model": served_model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": fake_text(tokens, digest)},
                        "finish_reason": "length" if tokens >= max_tokens else "stop",
                    }
                ],
                "usage": {"prompt_tokens": image_tokens_of(head) + 10, "completion_tokens": tokens},
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()

    app = Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/stats", stats),
        ],
        lifespan=lifespan,
    )
    app.state.engine = engine
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    defaults = LatencyModel()
    for name in ("base_ms", "per_seq_ms", "prefill_ms_per_1k", "tokens_mean", "tokens_sd", "speed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args()
    model = LatencyModel(
        base_ms=args.base_ms,
        per_seq_ms=args.per_seq_ms,
        prefill_ms_per_1k=args.prefill_ms_per_1k,
        tokens_mean=args.tokens_mean,
        tokens_sd=args.tokens_sd,
        max_num_seqs=args.max_num_seqs,
        speed=args.speed,
        seed=args.seed,
    )
    uvicorn.run(build_app(model, args.model), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
