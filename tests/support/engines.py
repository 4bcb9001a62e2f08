"""Engine doubles for tests of the core through `OCRService(engine=...)`: no model, no server.

- `FakeEngine` answers each page by its page id (pages marked by tests/support/documents.py),
  so results can be matched to pages whatever order they run in.
- `ScriptedEngine` answers each call with the next scripted outcome, whatever the page,
  and records the sampling of every attempt (the retry ladder).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from PIL import Image

from app.engines.base import EngineBase, EngineInfo, Sampling
from app.errors import OCRError
from app.results import Generation
from tests.support.documents import page_id_of

DEFAULT_MODEL = "lightonai/LightOnOCR-2-1B"  # the default MODEL_NAME

# Answers a page (by its page id, see tests/support/documents.py) or raises an `OCRError`.
Answer = Callable[[int], Awaitable[Generation]]

# What a scripted attempt gives: a generation, or an error to raise.
Outcome = Generation | OCRError


async def clean(page: int) -> Generation:
    return Generation(text=f"page {page}", finish_reason="stop", tokens=2)


class EngineDouble(EngineBase):
    """The engine interface with nothing behind it; subclasses say how a page is answered."""

    def __init__(self, name: str, *, device: str = "none", window: int = 8, model: str = DEFAULT_MODEL) -> None:
        # The model is the settings' default: results name the model the engine reports.
        self._info = EngineInfo(engine=name, model=model, device=device, max_pages_in_flight=window)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def check_health(self) -> None:
        return None

    async def recognize(self, image: Image.Image, sampling: Sampling) -> Generation:
        raise NotImplementedError

    def info(self) -> EngineInfo:
        return self._info


class FakeEngine(EngineDouble):
    """Recognises marked pages with `answer`; records the pages it was asked for, in order."""

    def __init__(self, answer: Answer = clean, *, window: int = 8) -> None:
        super().__init__("fake", window=window)
        self.answer = answer
        self.asked: list[int] = []

    async def recognize(self, image: Image.Image, sampling: Sampling) -> Generation:
        page = page_id_of(image)
        assert page is not None, "pages must be marked (make_pdf marks them)"
        self.asked.append(page)
        return await self.answer(page)


class ScriptedEngine(EngineDouble):
    """Answers each `recognize` call with the next scripted outcome (a generation or an error to raise)."""

    def __init__(self, outcomes: Iterable[Outcome] = ()) -> None:
        super().__init__("scripted", device="cpu", window=1)
        self.outcomes = list(outcomes)
        self.calls: list[Sampling] = []

    async def recognize(self, image: Image.Image, sampling: Sampling) -> Generation:
        self.calls.append(sampling)
        if not self.outcomes:
            raise AssertionError(f"unexpected attempt {len(self.calls)} at T={sampling.temperature}")
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, OCRError):
            raise outcome
        return outcome

    @property
    def temperatures(self) -> list[float]:
        return [sampling.temperature for sampling in self.calls]
