"""A vLLM stand-in responder that holds pages until the test opens it: work in flight, without sleeps."""

from __future__ import annotations

import asyncio
import threading

from tests.support.documents import page_id_of
from tests.support.openai_stub import Reply, StubRequest, describe


class Gate:
    """An async stub responder that holds chosen pages until `open()` (called from the test thread).

    Waiters are asyncio events on the stub's loop, woken thread-safely, so any number of
    pages can be held without tying up threads.
    """

    def __init__(self, hold: set[int] | None = None, *, answer_first: int = 0, max_wait_s: float = 30.0) -> None:
        self.hold = hold  # page ids to hold; None: every page
        self.answer_first = answer_first  # requests answered at once before holding starts
        self.max_wait_s = max_wait_s
        self.seen: list[int | None] = []
        self._opened = False
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def __call__(self, request: StubRequest) -> Reply:
        number = page_id_of(request.image)
        event = asyncio.Event()
        with self._lock:
            self.seen.append(number)
            held = (
                not self._opened and len(self.seen) > self.answer_first and (self.hold is None or number in self.hold)
            )
            if held:
                self._waiters.append((asyncio.get_running_loop(), event))
        if held:
            await asyncio.wait_for(event.wait(), self.max_wait_s)  # bounded: a forgotten gate fails loudly
        return Reply(text=describe(request.image))

    def open(self) -> None:
        with self._lock:
            self._opened = True
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)
