"""The one interface every engine implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Self, runtime_checkable

from PIL import Image

from app.errors import EngineNotReady, ServiceUnavailable
from app.intake.document import EncodedPage
from app.results import Generation


@dataclass(frozen=True, slots=True)
class Sampling:
    """Per-page sampling; the authors' defaults come from settings."""

    temperature: float
    top_p: float
    max_new_tokens: int
    # A text part sent after the image, for models that take one (generation 3: `grounding`,
    # app.profiles.GROUNDING_PROMPT); None: the image alone, the authors' plain request.
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointState:
    """One remote server of an engine (a vLLM fleet member), as /info and /metrics show it."""

    url: str  # without credentials
    healthy: bool
    capacity: int  # pages it may hold in flight
    in_flight: int
    pages: int  # pages it answered
    errors: int  # failed attempts (connection errors, 5xx, timeouts)


@dataclass(frozen=True, slots=True)
class EngineInfo:
    engine: str
    model: str
    device: str
    # How many pages a document should keep rendered and waiting for this engine:
    # enough to keep it busy, few enough to bound memory.
    max_pages_in_flight: int
    # Remote servers behind the engine (vLLM); empty for an in-process engine.
    endpoints: tuple[EndpointState, ...] = ()


class Engine(Protocol):
    """Recognises one page image at a time; concurrency comes from many callers.

    `start` may be slow (loading weights); `check_health` raises a
    `ServiceUnavailable` subclass when the engine cannot serve right now.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def check_health(self) -> None: ...

    async def recognize(self, image: Image.Image, sampling: Sampling) -> Generation: ...

    def info(self) -> EngineInfo: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...


@runtime_checkable
class SendsPng(Protocol):
    """An engine that sends pages as PNG (vLLM): with intake workers on, it gets the worker's PNG as is.

    `png_min_side`: the worker pads a page to at least this many pixels a side before encoding (the
    engine's `recognize` would have). The main process then never decodes or re-encodes the page.
    """

    @property
    def png_min_side(self) -> int: ...

    async def recognize_png(self, page: EncodedPage, sampling: Sampling) -> Generation: ...


def startup_status(engine: Engine) -> tuple[type[ServiceUnavailable], str]:
    """While `start` runs: the error and message saying what the engine is doing (for /ready, refused pages).

    An engine may define `startup_status()` (the huggingface engine does: downloading, waiting for
    the hub); it is optional, so engines written against the protocol alone keep working.
    """
    status: Callable[[], tuple[type[ServiceUnavailable], str]] | None = getattr(engine, "startup_status", None)
    return status() if status is not None else (EngineNotReady, "the model is still loading")


class EngineBase:
    """Gives engines the async-context-manager form: `async with engine: ...`."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
