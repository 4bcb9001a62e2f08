"""Admission and fair scheduling of pages across requests and clients.

Three guards, checked in this order when a document's pages are known:
- a client's rate (pages per minute, token bucket) → 429 `rate_limited`;
- a client's pages admitted and not finished → 429 `too_many_pages_in_flight`;
- all pages admitted and not finished (MAX_QUEUED_PAGES) → 503 `overloaded`.
A request is never queued without bound: past a limit it is refused at once.

Admitted pages then take engine slots from `FairScheduler`, which hands a
freed slot to the next waiting client in round-robin order, so one client's
thousand queued pages cannot starve another client's one page.

One interface, `acquire`, two implementations: `Admission` keeps every count in
this process (one replica, SQLite); `SharedAdmission` keeps a client's rate and
pages in flight in the database, shared by every replica (PostgreSQL), while
MAX_QUEUED_PAGES stays this replica's own bound. A replica's shared counts
carry a lease it renews, so a replica killed with its pages in flight stops
counting against its clients once the lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from app.background import cancel_and_wait
from app.errors import Overloaded, RateLimited, TooManyPagesInFlight

log = logging.getLogger(__name__)


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

    async def acquire(self, client: str, pages: int, *, charge_rate: bool = True) -> Ticket:
        """Admit all of a document's pages or refuse at once (the interface every implementation shares)."""
        return self.admit(client, pages, charge_rate=charge_rate)

    def admit(self, client: str, pages: int, *, charge_rate: bool = True) -> Ticket:
        """Admit all of a document's pages or refuse at once; a lone big document is never refused."""
        mine = self._by_client.get(client, 0)
        self.check_client(client, mine, pages)
        self.check_queued(pages)
        if charge_rate:
            self.rate.take(client, pages)
        return self._admitted(client, pages)

    def check_client(self, client: str, mine: int, pages: int) -> None:
        """KEY_MAX_PAGES_IN_FLIGHT: `mine` pages of `client` already in flight (here, or on every replica)."""
        if self.per_client is not None and mine and mine + pages > self.per_client:
            raise TooManyPagesInFlight(
                f"{mine} of your pages are already in progress; "
                f"the limit is {self.per_client} (KEY_MAX_PAGES_IN_FLIGHT)",
                retry_after=self.retry_after,
                pages_in_flight=mine,
            )

    def check_queued(self, pages: int) -> None:
        if self.queued and self.queued + pages > self.max_queued:
            raise Overloaded(
                f"the service has {self.queued} pages waiting; try again later (MAX_QUEUED_PAGES={self.max_queued})",
                retry_after=self.retry_after,
            )

    def mine(self, client: str) -> int:
        """The client's pages admitted here and not finished."""
        return self._by_client.get(client, 0)

    def _admitted(self, client: str, pages: int) -> Ticket:
        self.queued += pages
        self._by_client[client] = self._by_client.get(client, 0) + pages
        return Ticket(client=client, pages=pages, _admission=self)

    def _release(self, client: str, pages: int) -> None:
        self.queued -= pages
        left = self._by_client.get(client, 0) - pages
        if left > 0:
            self._by_client[client] = left
        else:
            self._by_client.pop(client, None)


class LimitsBackend(Protocol):
    """The shared half of `SharedAdmission`: per-client rate buckets and pages in flight, in the database."""

    async def admit(self, request: SharedRequest) -> Refusal | None:
        """In one transaction: check the client's pages in flight (all replicas) and rate, then record this
        replica's new count (`request.mine + request.pages`) under a lease; a `Refusal` changes nothing."""
        ...

    async def publish(self, replica: str, counts: dict[str, int], lease_s: float) -> None:
        """This replica's pages in flight per client (0: none left) and a fresh lease on all of its rows."""
        ...

    async def in_flight(self) -> dict[str, int]:
        """Pages in flight per client across live replicas (what KEY_MAX_PAGES_IN_FLIGHT counts)."""
        ...


@dataclass(frozen=True, slots=True)
class SharedRequest:
    replica: str
    client: str
    pages: int
    mine: int  # this replica's pages in flight for the client, before these
    per_client: int | None
    rate: int | None
    charge_rate: bool
    lease_s: float


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the shared limits refused: `in_flight` (pages of the client on every replica) or `rate` (seconds)."""

    in_flight: int | None = None
    rate_wait_s: float | None = None


class SharedAdmission(Admission):
    """`Admission` whose per-client limits hold across replicas (state in the database, leased per replica)."""

    def __init__(
        self,
        backend: LimitsBackend,
        *,
        replica: str,
        lease_s: float,
        max_queued: int,
        per_client: int | None,
        pages_per_minute: int | None,
        retry_after: int,
    ) -> None:
        super().__init__(
            max_queued=max_queued, per_client=per_client, pages_per_minute=pages_per_minute, retry_after=retry_after
        )
        self.backend = backend
        self.replica = replica
        self.lease_s = lease_s
        self._dirty: set[str] = set()
        self._write = asyncio.Lock()  # one writer of this replica's rows at a time: counts stay in order
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def like(cls, local: Admission, backend: LimitsBackend, *, replica: str, lease_s: float) -> SharedAdmission:
        """The same limits as `local` (built from the settings), shared through `backend`."""
        return cls(
            backend,
            replica=replica,
            lease_s=lease_s,
            max_queued=local.max_queued,
            per_client=local.per_client,
            pages_per_minute=local.rate.rate,
            retry_after=local.retry_after,
        )

    async def start(self) -> None:
        self._task = asyncio.create_task(self._publish_loop(), name="shared-limits")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        with contextlib.suppress(Exception):  # our rows go now rather than when their lease ends
            await self._publish(everything=True)

    async def acquire(self, client: str, pages: int, *, charge_rate: bool = True) -> Ticket:
        async with self._write:
            mine = self.mine(client)
            self.check_queued(pages)
            request = SharedRequest(
                replica=self.replica,
                client=client,
                pages=pages,
                mine=mine,
                per_client=self.per_client,
                rate=self.rate.rate,
                charge_rate=charge_rate,
                lease_s=self.lease_s,
            )
            refusal = await self.backend.admit(request)
            if refusal is not None and refusal.in_flight is not None:
                self.check_client(client, refusal.in_flight, pages)
            if refusal is not None and refusal.rate_wait_s is not None:
                assert self.rate.rate is not None
                raise RateLimited(
                    f"rate limit of {self.rate.rate} pages per minute reached (RATE_LIMIT_PAGES_PER_MIN)",
                    retry_after=max(1, math.ceil(refusal.rate_wait_s)),
                    pages_per_minute=self.rate.rate,
                )
            return self._admitted(client, pages)

    def _release(self, client: str, pages: int) -> None:
        super()._release(client, pages)
        self._dirty.add(client)
        self._wake.set()  # published soon; until then the shared count is high, never low

    async def in_flight_by_client(self) -> dict[str, int]:
        return await self.backend.in_flight()

    async def _publish(self, *, everything: bool = False) -> None:
        async with self._write:
            clients = set(self._by_client) | self._dirty
            self._dirty = set()
            counts = {client: 0 if everything else self.mine(client) for client in clients}
            await self.backend.publish(self.replica, counts, self.lease_s)

    async def _publish_loop(self) -> None:
        """Releases reach the database within a moment; leases are renewed every third of their length."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.lease_s / 3):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._publish()
            except Exception:  # the database is away: counts are published again at the next turn
                log.warning("shared limits: cannot publish this replica's pages in flight", exc_info=True)
            await asyncio.sleep(0.05)  # a burst of releases is one write


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
