"""The vLLM servers behind VLLM_BASE_URL: which one takes the next page, and which are in the rotation.

Each page goes to the healthy server with the fewest pages in flight relative to its capacity, so faster
servers (which free their slots sooner) get proportionally more pages. A server that fails leaves the
rotation until a probe finds it serving MODEL_NAME again (the engine runs the probes). When no server is
healthy, pages still go to one (each attempt is then a probe, bounded by the engine's retry budget): with
one URL this is exactly the single-server behaviour.

Pure bookkeeping on the event loop: no I/O here, and no lock (asyncio runs one callback at a time).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx

from app.engines.base import EndpointState


def display_url(url: str) -> str:
    """The URL without user, password or query: what logs, /info and /metrics may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(eq=False)
class Endpoint:
    """One vLLM server: its client, its capacity and what it did."""

    index: int
    url: str  # as configured (may hold credentials): only for the client
    capacity: int
    client: httpx.AsyncClient
    display: str = ""
    healthy: bool = True
    in_flight: int = 0
    sent: int = 0  # attempts started here (spreads ties)
    pages: int = 0
    errors: int = 0
    last_problem: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.display = display_url(self.url)

    def state(self) -> EndpointState:
        return EndpointState(
            url=self.display,
            healthy=self.healthy,
            capacity=self.capacity,
            in_flight=self.in_flight,
            pages=self.pages,
            errors=self.errors,
        )


class Fleet:
    """Hands out endpoint slots; waiters wake whenever a slot frees or an endpoint's health changes."""

    def __init__(self, endpoints: list[Endpoint]) -> None:
        if not endpoints:
            raise ValueError("a fleet needs at least one endpoint")
        self.endpoints = endpoints
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def capacity(self) -> int:
        return sum(endpoint.capacity for endpoint in self.endpoints)

    @property
    def any_healthy(self) -> bool:
        return any(endpoint.healthy for endpoint in self.endpoints)

    def pick(self, avoid: Endpoint | None = None) -> Endpoint | None:
        """The least loaded endpoint with a free slot (healthy ones first; `avoid` last), or None when all are full."""
        healthy = [endpoint for endpoint in self.endpoints if endpoint.healthy]
        free = [endpoint for endpoint in healthy or self.endpoints if endpoint.in_flight < endpoint.capacity]
        others = [endpoint for endpoint in free if endpoint is not avoid]
        candidates = others or free
        if not candidates:
            return None
        return min(candidates, key=lambda e: (e.in_flight / e.capacity, e.sent / e.capacity, e.index))

    async def acquire(self, avoid: Endpoint | None = None) -> Endpoint:
        """A slot on the best endpoint, waiting while every candidate is full."""
        while True:
            endpoint = self.pick(avoid)
            if endpoint is not None:
                endpoint.in_flight += 1
                endpoint.sent += 1
                return endpoint
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(1)  # woken for a slot it will not take: pass the turn on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def release(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        self._wake(1)  # one slot freed: one waiter (waking all would cost O(waiters) per page)

    def mark_down(self, endpoint: Endpoint) -> bool:
        """Take the endpoint out of the rotation; True when it was in it."""
        was_healthy, endpoint.healthy = endpoint.healthy, False
        self._wake()  # when none is healthy any more, waiters fall back to the others
        return was_healthy

    def mark_up(self, endpoint: Endpoint) -> bool:
        """Put the endpoint back in the rotation; True when it was out of it."""
        was_down, endpoint.healthy = not endpoint.healthy, True
        self._wake()
        return was_down

    def _wake(self, count: int | None = None) -> None:
        """Wake the first `count` waiters (all when None: the set of candidate endpoints changed)."""
        woken = 0
        while self._waiters and (count is None or woken < count):
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                woken += 1
