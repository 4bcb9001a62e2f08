"""Admission guards and the fair scheduler, driven directly (no HTTP) so orderings are exact."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

import app.admission as admission_module
from app.admission import Admission, FairScheduler, RateLimiter
from app.errors import Overloaded, RateLimited, TooManyPagesInFlight

pytestmark = pytest.mark.anyio


class Clock:
    """A monotonic clock the test moves by hand, so token refills are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(admission_module, "time", SimpleNamespace(monotonic=fake))
    return fake


# --------------------------------------------------------------------------- FairScheduler


class Holder:
    """Holds one scheduler slot for `client` until `release()`; records when it got the slot."""

    def __init__(self, scheduler: FairScheduler, client: str, granted: list[str]) -> None:
        self.client = client
        self.got = asyncio.Event()
        self._done = asyncio.Event()
        self._granted = granted
        self.task = asyncio.create_task(self._run(scheduler))

    async def _run(self, scheduler: FairScheduler) -> None:
        async with scheduler.slot(self.client):
            self._granted.append(self.client)
            self.got.set()
            await self._done.wait()

    async def release(self) -> None:
        self._done.set()
        await self.task


async def settle() -> None:
    """Let every ready task run (a few loop turns; no wall-clock sleeping)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_free_slots_are_taken_at_once() -> None:
    scheduler = FairScheduler(2)
    granted: list[str] = []
    holders = [Holder(scheduler, "a", granted), Holder(scheduler, "b", granted)]
    await settle()
    assert granted == ["a", "b"]
    assert scheduler.busy == 2
    assert scheduler.waiting == 0
    for holder in holders:
        await holder.release()
    assert scheduler.busy == 0


async def test_one_waiting_page_of_b_is_served_before_a_hundred_of_a() -> None:
    scheduler = FairScheduler(1)
    granted: list[str] = []
    first = Holder(scheduler, "a", granted)
    await settle()
    flood = [Holder(scheduler, "a", granted) for _ in range(100)]
    await settle()
    lone = Holder(scheduler, "b", granted)
    await settle()
    assert scheduler.waiting == 101

    await first.release()
    await settle()
    assert granted == ["a", "b"], "B's page must take the very next free slot"
    await lone.release()
    for holder in flood:
        await holder.got.wait()
        await holder.release()
    assert granted == ["a", "b", *["a"] * 100]
    assert scheduler.busy == 0
    assert scheduler.waiting == 0


async def test_slots_alternate_between_waiting_clients() -> None:
    scheduler = FairScheduler(1)
    granted: list[str] = []
    blocker = Holder(scheduler, "x", granted)
    await settle()
    waiters = [Holder(scheduler, "a", granted) for _ in range(3)] + [Holder(scheduler, "b", granted) for _ in range(3)]
    await settle()
    await blocker.release()
    for _ in waiters:
        holder = next(h for h in waiters if h.got.is_set() and not h.task.done())
        await holder.release()
        await settle()
    assert granted == ["x", "a", "b", "a", "b", "a", "b"]


async def test_cancelled_waiter_leaves_the_queue_and_loses_no_slot() -> None:
    scheduler = FairScheduler(1)
    granted: list[str] = []
    holder = Holder(scheduler, "a", granted)
    await settle()
    quitter = Holder(scheduler, "b", granted)
    patient = Holder(scheduler, "c", granted)
    await settle()
    assert scheduler.waiting == 2

    quitter.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter.task
    assert scheduler.waiting == 1

    await holder.release()
    await patient.got.wait()
    assert granted == ["a", "c"]
    assert scheduler.busy == 1
    await patient.release()
    assert scheduler.busy == 0
    assert scheduler.waiting == 0


async def test_waiter_cancelled_right_after_its_grant_passes_the_slot_on() -> None:
    scheduler = FairScheduler(1)
    granted: list[str] = []
    go = asyncio.Event()
    unlucky: Holder | None = None

    async def hold_then_cancel_the_next() -> None:
        async with scheduler.slot("a"):
            granted.append("a")
            await go.wait()
        # Leaving the slot granted b's future; b has not resumed yet and is cancelled in the same tick.
        assert unlucky is not None
        unlucky.task.cancel()

    first = asyncio.create_task(hold_then_cancel_the_next())
    await settle()
    unlucky = Holder(scheduler, "b", granted)
    patient = Holder(scheduler, "c", granted)
    await settle()
    go.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await unlucky.task
    async with asyncio.timeout(5):
        await patient.got.wait()
    assert granted == ["a", "c"]
    await patient.release()
    assert scheduler.busy == 0
    assert scheduler.waiting == 0


# --------------------------------------------------------------------------- RateLimiter


def test_rate_limiter_off_by_default() -> None:
    limiter = RateLimiter(None)
    for _ in range(1000):
        limiter.take("a", 100)


def test_rate_limiter_refuses_with_retry_after_then_refills(clock: Clock) -> None:
    limiter = RateLimiter(10)  # one page every 6 s
    limiter.take("a", 10)
    with pytest.raises(RateLimited) as refused:
        limiter.take("a", 1)
    assert refused.value.retry_after == 6
    assert refused.value.details == {"pages_per_minute": 10}
    assert refused.value.message == "rate limit of 10 pages per minute reached (RATE_LIMIT_PAGES_PER_MIN)"
    limiter.take("b", 10)  # another client has its own bucket

    clock.now += 5.9
    with pytest.raises(RateLimited) as refused:
        limiter.take("a", 1)
    assert refused.value.retry_after == 1
    clock.now += 0.1
    limiter.take("a", 1)


def test_rate_limiter_lets_a_large_document_borrow_once(clock: Clock) -> None:
    limiter = RateLimiter(10)
    limiter.take("a", 25)  # larger than the bucket: allowed when the bucket is full
    with pytest.raises(RateLimited) as refused:
        limiter.take("a", 1)
    assert refused.value.retry_after == 96  # 15 pages owed + 1 needed, at 6 s each
    clock.now += 60
    with pytest.raises(RateLimited):
        limiter.take("a", 1)  # still repaying
    clock.now += 36
    limiter.take("a", 1)


# --------------------------------------------------------------------------- Admission


def make_admission(**overrides: int | None) -> Admission:
    values: dict[str, int | None] = {"max_queued": 10, "per_client": 4, "pages_per_minute": None, "retry_after": 7}
    values.update(overrides)
    return Admission(
        max_queued=values["max_queued"] or 0,
        per_client=values["per_client"],
        pages_per_minute=values["pages_per_minute"],
        retry_after=values["retry_after"] or 0,
    )


def test_per_client_limit_refuses_that_client_only() -> None:
    admission = make_admission()
    a = admission.admit("a", 3)
    with pytest.raises(TooManyPagesInFlight) as refused:
        admission.admit("a", 2)
    assert refused.value.retry_after == 7
    assert refused.value.details == {"pages_in_flight": 3}
    assert "3 of your pages are already in progress" in refused.value.message
    assert "KEY_MAX_PAGES_IN_FLIGHT" in refused.value.message
    admission.admit("b", 4)
    a.release()  # one page of a done: 2 in flight, room for 2 more
    admission.admit("a", 2)
    assert admission.queued == 8


def test_a_lone_document_larger_than_the_limits_is_admitted() -> None:
    admission = make_admission(max_queued=5, per_client=2)
    ticket = admission.admit("a", 50)
    assert admission.queued == 50
    with pytest.raises(Overloaded):
        admission.admit("b", 1)
    ticket.close()
    assert admission.queued == 0
    admission.admit("b", 1)


def test_global_queue_bound_refuses_with_retry_after() -> None:
    admission = make_admission(max_queued=10, per_client=None)
    first, second = admission.admit("a", 6), admission.admit("b", 4)
    with pytest.raises(Overloaded) as refused:
        admission.admit("c", 1)
    assert refused.value.retry_after == 7
    assert refused.value.status == 503
    assert "10 pages waiting" in refused.value.message
    assert "MAX_QUEUED_PAGES=10" in refused.value.message
    first.release(3)
    admission.admit("c", 3)
    first.close()
    second.close()
    assert admission.queued == 3


def test_tickets_release_exactly_what_they_hold() -> None:
    admission = make_admission(max_queued=100, per_client=None)
    ticket = admission.admit("a", 3)
    ticket.release()
    ticket.close()
    ticket.close()  # idempotent: nothing left to give back
    ticket.release(5)
    assert admission.queued == 0
    assert ticket.pages == 0
    admission.admit("a", 100)


def test_refusals_reserve_nothing() -> None:
    admission = make_admission(max_queued=4, per_client=3, pages_per_minute=5)
    admission.admit("a", 3)
    with pytest.raises(TooManyPagesInFlight):
        admission.admit("a", 1)
    with pytest.raises(Overloaded):
        admission.admit("b", 2)
    admission.admit("b", 1)
    assert admission.queued == 4


def test_rate_limit_is_checked_per_client(clock: Clock) -> None:
    admission = make_admission(max_queued=100, per_client=None, pages_per_minute=5)
    admission.admit("a", 5).close()
    with pytest.raises(RateLimited):
        admission.admit("a", 1)
    assert admission.queued == 0
    admission.admit("b", 5)


def test_a_client_with_two_documents_keeps_the_pages_of_the_one_still_running() -> None:
    """Releasing one of a client's documents leaves the other's pages counted against its limit."""
    admission = make_admission(max_queued=100, per_client=5)
    first, second = admission.admit("a", 2), admission.admit("a", 1)
    first.close()  # one page of `a` still in flight
    with pytest.raises(TooManyPagesInFlight) as refused:
        admission.admit("a", 5)
    assert refused.value.details == {"pages_in_flight": 1}
    admission.admit("a", 4).close()
    second.close()
    assert admission.queued == 0


async def test_a_release_hands_on_exactly_one_slot_when_several_are_busy() -> None:
    scheduler = FairScheduler(3)
    granted: list[str] = []
    holders = [Holder(scheduler, client, granted) for client in ("a", "b", "c")]
    await settle()
    waiters = [Holder(scheduler, client, granted) for client in ("d", "e", "f")]
    await settle()
    assert scheduler.waiting == 3
    await holders[0].release()
    await settle()
    assert granted == ["a", "b", "c", "d"]  # one slot freed, one waiter served
    assert (scheduler.busy, scheduler.waiting) == (3, 2)
    for holder in [*holders[1:], *waiters]:
        await holder.release()
    assert (scheduler.busy, scheduler.waiting) == (0, 0)


async def test_a_client_served_from_the_queue_then_waits_behind_the_others() -> None:
    """The round-robin rule holds after a queued grant too, not only after the fast path."""
    scheduler = FairScheduler(2)
    granted: list[str] = []
    a, b = Holder(scheduler, "a", granted), Holder(scheduler, "b", granted)
    await settle()
    c1 = Holder(scheduler, "c", granted)
    await settle()
    await a.release()  # c is served from the queue
    await settle()
    c2 = Holder(scheduler, "c", granted)  # c asks again, first in line
    await settle()
    d = Holder(scheduler, "d", granted)
    await settle()
    await b.release()
    await settle()
    assert granted == ["a", "b", "c", "d"]  # d goes before c's second page
    for holder in (c1, d, c2):
        await holder.release()
    assert (scheduler.busy, scheduler.waiting) == (0, 0)


async def test_a_waiter_cancelled_while_a_release_drops_its_queue_just_leaves() -> None:
    """Cancelled, then its client's queue emptied by a release in the same tick: no error, nothing held."""
    scheduler = FairScheduler(1)
    await scheduler._acquire("a")
    waiter = asyncio.create_task(scheduler._acquire("b"))
    await settle()
    waiter.cancel()  # cancels the waiter's future now; its clean-up runs at the next turn
    scheduler._release()  # ... after this release has dropped b's (cancelled) future and queue
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (scheduler.busy, scheduler.waiting) == (0, 0)
