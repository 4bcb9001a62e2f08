"""Admission and fair scheduling of pages across requests and clients.

Three guards, checked in this order when a document's pages are known:
- a client's rate (pages per minute, token bucket) → 429 `rate_limited`;
- a client's pages admitted and not finished → 429 `too_many_pages_in_flight`;
- all pages admitted and not finished (MAX_QUEUED_PAGES) → 503 `overloaded`.
A request is never queued without bound: past a limit it is refused at once.

Admitted pages then take engine slots from `FairScheduler`, which hands a
freed slot to the next waiting client in round-robin order, so one client's
thousand queued pages cannot starve another client's one page.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from app.errors import Overloaded, RateLimited, TooManyPagesInFlight


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Pages per minute per client; a document larger than the bucket may borrow once it is full."""

    def __init__(self, pages_per_minute: int | None) -> None:
        self.rate = pages_per_minute
        self._buckets: dict[str, _Bucket] = {}

    def take(self, client: str, pages: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        bucket = self._buckets.setdefault(client, _Bucket(tokens=float(self.rate), updated=now))
        bucket.tokens = min(float(self.rate), bucket.tokens + (now - bucket.updated) * self.rate / 60)
        bucket.updated = now
        needed = min(pages, self.rate)
        if bucket.tokens < needed:
            wait = math.ceil((needed - bucket.tokens) * 60 / self.rate)
            raise RateLimited(
                f"rate limit of {self.rate} pages per minute reached (RATE_LIMIT_PAGES_PER_MIN)",
                retry_after=max(1, wait),
                pages_per_minute=self.rate,
            )
        bucket.tokens -= pages


@dataclass
class Ticket:
    """Pages admitted for one document; release them as they finish."""

    client: str
    pages: int
    _admission: Admission = field(repr=False)

    def release(self, pages: int = 1) -> None:
        pages = min(pages, self.pages)
        self.pages -= pages
        self._admission._release(self.client, pages)

    def close(self) -> None:
        self.release(self.pages)


class Admission:
    def __init__(self, *, max_queued: int, per_client: int | None, pages_per_minute: int | None, retry_after: int):
        self.max_queued = max_queued
        self.per_client = per_client
        self.retry_after = retry_after
        self.rate = RateLimiter(pages_per_minute)
        self.queued = 0
        self._by_client: dict[str, int] = {}

    def admit(self, client: str, pages: int, *, charge_rate: bool = True) -> Ticket:
        """Admit all of a document's pages or refuse at once; a lone big document is never refused."""
        mine = self._by_client.get(client, 0)
        if self.per_client is not None and mine and mine + pages > self.per_client:
            raise TooManyPagesInFlight(
                f"{mine} of your pages are already in progress; "
                f"the limit is {self.per_client} (KEY_MAX_PAGES_IN_FLIGHT)",
                retry_after=self.retry_after,
                pages_in_flight=mine,
            )
        if self.queued and self.queued + pages > self.max_queued:
            raise Overloaded(
                f"the service has {self.queued} pages waiting; try again later (MAX_QUEUED_PAGES={self.max_queued})",
                retry_after=self.retry_after,
            )
        if charge_rate:
            self.rate.take(client, pages)
        self.queued += pages
        self._by_client[client] = mine + pages
        return Ticket(client=client, pages=pages, _admission=self)

    def _release(self, client: str, pages: int) -> None:
        self.queued -= pages
        left = self._by_client.get(client, 0) - pages
        if left > 0:
            self._by_client[client] = left
        else:
            self._by_client.pop(client, None)


class FairScheduler:
    """`slots` engine places shared round-robin between clients."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.busy = 0
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._last: str | None = None  # client granted most recently, fast path included

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    @asynccontextmanager
    async def slot(self, client: str) -> AsyncIterator[None]:
        await self._acquire(client)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, client: str) -> None:
        if self.busy < self.slots and not self._waiting:
            self.busy += 1
            self._last = client
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(client, deque()).append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted and cancelled in the same tick: pass the slot on
            else:
                self._discard(client, future)
            raise

    def _discard(self, client: str, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(client)
        if queue is not None and future in queue:
            queue.remove(future)
            if not queue:
                del self._waiting[client]

    def _release(self) -> None:
        self.busy -= 1
        while self._waiting and self.busy < self.slots:
            if len(self._waiting) > 1 and next(iter(self._waiting)) == self._last:
                # The client served last (say, one that took every free slot) waits behind the others.
                self._waiting.move_to_end(self._last)
            client, queue = next(iter(self._waiting.items()))
            future = queue.popleft()
            # Round robin: the client just served goes to the back of the line.
            del self._waiting[client]
            if queue:
                self._waiting[client] = queue
            if not future.done():
                self.busy += 1
                self._last = client
                future.set_result(None)
