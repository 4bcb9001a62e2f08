"""Engines behind one interface; `build_engine` is the only place that reads MODEL_SOURCE."""

from __future__ import annotations

from app.engines.base import Engine, EngineInfo, Sampling
from app.settings import ModelSource, Settings


def build_engine(settings: Settings) -> Engine:
    # Imports are local so the remote path never imports torch.
    if settings.model_source in (ModelSource.VLLM, ModelSource.OPENAI):
        # One engine for vLLM and any other OpenAI-compatible server (llama-server, mlx-vlm): `source`
        # only decides how it names the server and whether MODEL_NAME may be left to the server.
        from app.engines.vllm import VLLMEngine

        return VLLMEngine(settings, source=settings.model_source)
    from app.engines.huggingface import HuggingFaceEngine

    return HuggingFaceEngine(settings)


__all__ = ["Engine", "EngineInfo", "Sampling", "build_engine"]
