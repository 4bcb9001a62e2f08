"""An engine double for tests of the core through `OCRService(engine=...)`: no model, no server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from PIL import Image

from app.engines.base import EngineBase, EngineInfo, Sampling
from app.results import Generation
from tests.support.documents import page_id_of

# Answers a page (by its page id, see tests/support/documents.py) or raises an `OCRError`.
Answer = Callable[[int], Awaitable[Generation]]


async def clean(page: int) -> Generation:
    return Generation(text=f"page {page}", finish_reason="stop", tokens=2)


class FakeEngine(EngineBase):
    """Recognises marked pages with `answer`; records the pages it was asked for, in order."""

    def __init__(self, answer: Answer = clean, *, window: int = 8) -> None:
        self.answer = answer
        self.asked: list[int] = []
        self._window = window

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def check_health(self) -> None:
        return None

    async def recognize(self, image: Image.Image, sampling: Sampling) -> Generation:
        page = page_id_of(image)
        assert page is not None, "pages must be marked (make_pdf marks them)"
        self.asked.append(page)
        return await self.answer(page)

    def info(self) -> EngineInfo:
        return EngineInfo(engine="fake", model="fake", device="none", max_pages_in_flight=self._window)
