"""Engines behind one interface; `build_engine` is the only place that reads MODEL_SOURCE."""

from __future__ import annotations

from app.engines.base import Engine, EngineInfo, Sampling
from app.settings import ModelSource, Settings


def build_engine(settings: Settings) -> Engine:
    # Imports are local so the vLLM path never imports torch.
    if settings.model_source is ModelSource.VLLM:
        from app.engines.vllm import VLLMEngine

        return VLLMEngine(settings)
    from app.engines.huggingface import HuggingFaceEngine

    return HuggingFaceEngine(settings)


__all__ = ["Engine", "EngineInfo", "Sampling", "build_engine"]
